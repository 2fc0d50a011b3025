"""train.py's command line with a fault: a signal sent to the training process at a chosen point,
as a user's Ctrl-C, a scheduler's SIGTERM or the OOM killer's SIGKILL would arrive. Not a test
module: the tests run it as a subprocess (conftest's ``train_command``).

    python tests/fault_launcher.py SIGNAL@WHEN[:rankR] ARGS...   # ARGS: train.py's flags

SIGNAL is sigterm, sigint or sigkill; WHEN is K (right after the K-th training step), ``check``
(while the data check reads its first file), ``batch`` (while the first training sample loads)
or ``val`` (while validation runs the model on its first image). ``:rankR`` limits the fault to
the torchrun process of rank R.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import erfnet.data.check
import erfnet.model
import erfnet.training.resume
from erfnet.training import step

TRAIN = str(Path(__file__).resolve().parents[1] / "train.py")
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}
MAIN_PID = os.getpid()  # the training process: DataLoader workers signal it, not themselves


class SignalOnCall:
    """Wraps ``function``: its ``at``-th call (counting those ``counts`` accepts) sends
    ``signum`` to the training process, after the call (``after``) or before it."""

    def __init__(
        self,
        function: Callable,
        signum: int,
        at: int = 1,
        after: bool = False,
        counts: Callable[..., bool] | None = None,
    ) -> None:
        self.function, self.signum, self.at, self.after = function, signum, at, after
        self.counts, self.calls = counts, 0

    def __get__(self, instance: Any, owner: type | None = None) -> Any:  # as a method: bind
        return self if instance is None else partial(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.counts is None or self.counts(*args, **kwargs):
            self.calls += 1
        due = self.calls == self.at
        if due and not self.after:
            os.kill(MAIN_PID, self.signum)
        result = self.function(*args, **kwargs)
        if due and self.after:
            os.kill(MAIN_PID, self.signum)
        return result


def in_eval_mode(model: Any, *args: Any, **kwargs: Any) -> bool:
    return not model.training


def install(spec: str) -> None:
    """Put the fault ``spec`` in place (see the module docstring)."""
    what, _, rank = spec.partition(":rank")
    kind, _, when = what.partition("@")
    if kind not in SIGNALS or not (when.isdigit() or when in ("check", "batch", "val")):
        raise SystemExit(f"fault_launcher.py: bad fault {spec!r} (see its docstring)")
    if rank and os.environ.get("RANK", "0") != rank:
        return
    signum = SIGNALS[kind]
    if when.isdigit():
        step.train_step = SignalOnCall(step.train_step, signum, int(when), after=True)
    elif when == "check":
        erfnet.data.check.check_sample = SignalOnCall(erfnet.data.check.check_sample, signum)
    elif when == "batch":
        seeded = erfnet.training.resume.SeededDataset
        seeded.__getitem__ = SignalOnCall(seeded.__getitem__, signum)
    else:
        net = erfnet.model.ERFNet
        net.forward = SignalOnCall(net.forward, signum, counts=in_eval_mode)


def main() -> None:
    install(sys.argv[1])
    sys.argv = [TRAIN, *sys.argv[2:]]
    runpy.run_path(TRAIN, run_name="__main__")


if __name__ == "__main__":
    main()
