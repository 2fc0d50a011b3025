"""The process around every entry point: console streams that cannot kill a save, the
--device / --threads / --workers flags, CPU thread / worker counts that do not oversubscribe the
cores, and an opt-in malloc setting for large CPU tensors (output paths: erfnet.outputs)."""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from erfnet.errors import FlagError

# Environment variables that already fix the intra-op thread count; we then leave it alone.
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class _GuardedStream:
    """A text stream whose writes never raise: after the first failure (the reader of a pipe is
    gone, e.g. ``train.py | tee log`` stopped by Ctrl-C) its file descriptor is pointed at
    /dev/null, so later writes, the interpreter's final flush and child processes go nowhere
    instead of killing the process between "saving latest.pth" and the save itself."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # BrokenPipeError, EIO, a closed file
                self._silence()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._silence()

    def _silence(self) -> None:
        self.broken = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # no descriptor (a test's StringIO): dropping the writes is enough

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... as the stream's
        return getattr(self._stream, name)


@contextmanager
def guarded_console() -> Iterator[None]:
    """``sys.stdout`` / ``sys.stderr`` replaced by streams whose write errors are ignored."""
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _GuardedStream(sys.stdout), _GuardedStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = old


def add_runtime_flags(parser: argparse._ActionsContainer, workers: bool = False) -> None:
    """--device and --threads (and with ``workers`` --workers), one text and default each;
    ``check_runtime_flags`` checks them."""
    # fmt: off
    parser.add_argument("--device", default="auto",
                        help="auto (this process's GPU if any, else cpu), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, metavar="N", default=None,
                        help="torch CPU threads (default on the CPU: cores - busy workers - 1, at"
                        " least 1, so a busy neighbour cannot stall every step; $OMP_NUM_THREADS"
                        " if set)")
    if workers:
        parser.add_argument("--workers", type=int, metavar="N", default=None,
                            help="DataLoader worker processes per process (default: on CUDA"
                            " min(4, cores - 1); on the CPU 0 up to 4 cores, else"
                            " min(4, cores / 4))")
    # fmt: on


def check_runtime_flags(args: argparse.Namespace, exported: bool = False) -> None:
    """``FlagError`` for --threads under 1, --workers under 0, and, for an exported model
    (``exported``: it runs on the CPU), a --device other than cpu / auto."""
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise FlagError(f"--threads must be at least 1, got {args.threads}")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise FlagError(f"--workers must be >= 0, got {args.workers}")
    if exported and args.device not in (None, "cpu", "auto"):
        raise FlagError(
            f"--model runs on the CPU (onnxruntime / OpenVINO), not on --device {args.device}"
        )


def available_cores() -> int:
    """The cores this process may run on (its affinity mask), shared by torchrun's local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


def cpu_plan(
    device_type: str, workers: int | None, threads: int | None, cores: int | None = None
) -> tuple[int, int | None]:
    """(loader workers, torch intra-op threads or None to leave torch's) for a process. Rule:
    threads + busy workers <= cores - 1 on the CPU, keeping a core for the OS and whatever else
    runs: a compute thread that has to share its core stalls every other one at each parallel op
    (docs/robustness.md), while one core's less compute costs at most 1/cores. Explicit
    ``--workers`` / ``--threads`` (or $OMP_NUM_THREADS) win."""
    cores = cores or available_cores()
    if device_type != "cpu":  # the GPU computes; workers decode, the main process feeds
        return (min(4, max(0, cores - 1)) if workers is None else workers), threads
    if workers is None:
        workers = 0 if cores <= 4 else min(4, cores // 4)
    if threads is None and not any(os.environ.get(v) for v in _THREAD_ENV):
        threads = max(1, cores - workers - 1)
    return workers, threads


def apply_cpu_plan(device_type: str, workers: int | None, threads: int | None) -> tuple[int, int]:
    """``cpu_plan``, with its thread count given to torch; (workers, the threads torch now uses)."""
    import torch  # not at the top: the console and path helpers above need no torch

    workers, planned = cpu_plan(device_type, workers, threads)
    if planned is not None:
        torch.set_num_threads(planned)
    return workers, torch.get_num_threads()


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def tune_cpu_allocator() -> bool:
    """Make glibc's malloc keep freed memory for reuse (process-wide); True if applied. By default
    glibc serves large blocks (a 512x1024 feature map is 8-40 MB) with fresh ``mmap`` pages and
    returns them on free, so every forward pass page-faults them back in (docs/speed.md). With mmap
    and trimming off they are faulted once and reused; the process keeps its peak memory. As
    ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``; no-op (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    # The largest int: never give the top of the heap back to the OS.
    return mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and ok
