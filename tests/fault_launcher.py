"""train.py's command line with a fault: a signal sent to the training process right after its
K-th training step, as a user's Ctrl-C, a scheduler's SIGTERM or the OOM killer's SIGKILL would
arrive. Not a test module: the tests run it as a subprocess (conftest's ``train_command``).

    python tests/fault_launcher.py sigterm@2 --data synthetic ...   # train.py's flags follow
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from erfnet.training import step

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}


class SignalAfterStep:
    """``train_step`` that sends ``signum`` to this process when its ``at``-th call returns."""

    def __init__(self, train_step: Callable[..., float], signum: int, at: int) -> None:
        self.train_step, self.signum, self.at, self.calls = train_step, signum, at, 0

    def __call__(self, *args: Any, **kwargs: Any) -> float:
        loss = self.train_step(*args, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return loss


def main() -> None:
    kind, _, at = sys.argv[1].partition("@")
    if kind not in SIGNALS or not at.isdigit():
        raise SystemExit(f"usage: fault_launcher.py sigterm@K|sigint@K|sigkill@K ARGS, got {kind}")
    step.train_step = SignalAfterStep(step.train_step, SIGNALS[kind], int(at))
    sys.argv = [TRAIN, *sys.argv[2:]]
    runpy.run_path(TRAIN, run_name="__main__")


if __name__ == "__main__":
    main()
