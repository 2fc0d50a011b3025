"""The training run as a process: its work dir, its signals and its failures.

- ``WorkDirLock``: one run per work dir, a POSIX record lock on ``<work_dir>/train.lock`` that
  belongs to the training process alone (forked DataLoader workers do not inherit it) and that
  the kernel releases the moment the process ends in any way (kill -9 included), so a crashed run
  never blocks the next one. The file names the holder's PID and host for a second run to show.
- ``check_new_run`` / ``move_previous_run``: a new run never overwrites an earlier one's
  checkpoints; ``--restart`` moves them into a dated sub-folder first.
- ``remove_stale_tmp``: the ``.<name>.<pid>.<hex>.tmp`` files of ``erfnet.outputs.atomic_write``
  that only a write killed with SIGKILL (or a power cut) leaves behind.
- How a run ends: ``StopFlag`` (SIGINT / SIGTERM stop it after saving), ``TrainingError``,
  ``is_peer_failure`` (another torchrun process is gone) and ``resume_hint``.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from erfnet.distributed import all_reduce_sum
from erfnet.errors import UserError
from erfnet.outputs import TMP_NAME_RE

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"
# What a run writes into its work dir (besides the lock): what --restart moves away.
RUN_FILES = ("latest.pth", "best.pth", "train.log", "args.json", "tensorboard", "encoder")
log = logging.getLogger("erfnet.train")


class WorkDirError(UserError):
    """The work dir cannot take this run; the message names it and says what to do."""


class WorkDirBusyError(WorkDirError):
    """Another live process holds the work dir's lock; the message names its PID and host."""


class WorkDirLock:
    """The lock on ``<work_dir>/train.lock``: ``acquire`` raises ``WorkDirBusyError`` at once (no
    waiting) when another process holds it, ``WorkDirError`` when the work dir is not writable."""

    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.path = Path(work_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:  # O_CLOEXEC: no program this process starts gets the descriptor
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WorkDirError(
                f"--work-dir '{self.path.parent}': cannot write in it ({e.strerror})"
            ) from None
        if not _try_lock(fd, self.path):
            error = _busy(self.path.parent, fd)
            os.close(fd)
            raise error
        self._fd = fd  # from here on release() closes it, whatever fails below
        try:  # the holder's name is only informational: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        except OSError:
            pass

    def release(self) -> None:
        """Unlock (closing the file releases the lock); the file stays, harmless when unlocked."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _try_lock(fd: int, path: Path) -> bool:
    """Take the POSIX write lock of ``fd`` without waiting (unlike ``flock``'s, it is this
    process's, not the forked workers'); False when another process has it."""
    if fcntl is None:
        return True
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        # A file system without locks (some network mounts): run unlocked, as the README
        # says, rather than refuse to train.
        log.warning(
            "--work-dir '%s': no file lock here (%s); a second run into it would not be stopped",
            path.parent,
            e.strerror,
        )
    return True


def _busy(work_dir: Path, fd: int) -> WorkDirBusyError:
    """The error that names the lock's holder (read from the lock file ``fd``)."""
    try:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        holder = ""
    return WorkDirBusyError(
        f"--work-dir '{work_dir}' is in use by another training run ({holder or 'pid unknown'});"
        " wait for it to finish or stop it, or choose another --work-dir"
    )


def check_not_busy(work_dir: str | os.PathLike) -> None:
    """``WorkDirBusyError`` if a live run holds ``work_dir``'s lock; creates nothing."""
    path = Path(work_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or not ours to open): nobody holds it, or acquire() will say
    try:
        if not _try_lock(fd, path):
            raise _busy(path.parent, fd)
    finally:
        os.close(fd)  # also releases the test lock just taken


def previous_run_files(work_dir: str | os.PathLike) -> list[Path]:
    """The files (and TensorBoard folder) of an earlier run in ``work_dir``, sorted."""
    folder = Path(work_dir)
    if not folder.is_dir():
        return []
    found = [folder / name for name in RUN_FILES if (folder / name).exists()]
    found += [p for p in folder.glob("iter_*.pth") if p.stem[len("iter_") :].isdigit()]
    return sorted(found)


def check_new_run(work_dir: str | os.PathLike, resume: bool, restart: bool) -> None:
    """A new run (no ``resume``) must not overwrite the checkpoints an earlier run left in
    ``work_dir``: ``WorkDirError`` naming the choices, unless ``restart`` (which moves them)."""
    if resume or restart:
        return
    checkpoints = [p.name for p in previous_run_files(work_dir) if p.suffix == ".pth"]
    if checkpoints:
        shown = ", ".join(checkpoints[:4]) + (" ..." if len(checkpoints) > 4 else "")
        raise WorkDirError(
            f"--work-dir '{work_dir}' holds the checkpoints of an earlier run ({shown}): add"
            " --resume to continue it, choose another --work-dir, or add --restart to start"
            " over (it moves that run's files into a dated sub-folder)"
        )


def move_previous_run(work_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's files (under the work dir's lock) into
    ``work_dir/previous-<date>-<time>/``; that folder, or None when there was nothing to move."""
    files = previous_run_files(work_dir)
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = Path(work_dir) / f"previous-{stamp}"
    n = 1
    while target.exists():  # two restarts within a second
        target, n = Path(work_dir) / f"previous-{stamp}-{n}", n + 1
    try:
        target.mkdir()
        for p in files:
            p.rename(target / p.name)  # the same file system: a rename, nothing copied
    except OSError as e:
        raise WorkDirError(
            f"--restart: cannot move the earlier run's files into '{target}' ({e.strerror})"
        ) from None
    return target


def remove_stale_tmp(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete ``atomic_write``'s leftover temporary files in ``folder``; (count, bytes) removed.
    Only while holding the folder's ``WorkDirLock``: then no live writer owns them."""
    count = size = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0, 0
    for p in folder.iterdir():
        if TMP_NAME_RE.match(p.name) and p.is_file():
            try:
                n = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            count, size = count + 1, size + n
    return count, size


class TrainingError(UserError):
    """Training cannot go on (e.g. the loss stayed non-finite); the message says what to do."""


class StopRequested(BaseException):  # like KeyboardInterrupt: not an error to catch
    """A stop signal arrived inside ``StopFlag.interruptible()``: leave what was being done."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = signum


class StopFlag:
    """SIGINT/SIGTERM set a flag the loop checks after each iteration; a second one aborts.
    Inside ``interruptible()`` (the long parts that change no training state: the data check, a
    batch wait, validation) a signal raises ``StopRequested`` at once. Under torchrun
    (``immediate=False``) the ranks must stop together: the flag only, all-reduced."""

    def __init__(self, immediate: bool = True) -> None:
        self.signum = 0
        self.immediate = immediate
        self._raise_now = False
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def requested(self, device: torch.device | None = None) -> bool:
        """Whether to stop after this iteration. Under DDP (pass the ``device``): whether any
        process was signalled, so that all stop at the same iteration (torchrun signals every
        process, but not necessarily between the same two iterations)."""
        if device is None:
            return bool(self.signum)
        flag = torch.tensor([1.0 if self.signum else 0.0], device=device)
        return all_reduce_sum(flag).item() > 0

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A stop signal received before or inside the block raises ``StopRequested``."""
        if not self.immediate:
            yield
            return
        if self.signum:
            raise StopRequested(self.signum)
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False

    def name(self) -> str:
        return signal_name(self.signum)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting")
        self.signum = signum
        if self._raise_now:
            self._raise_now = False
            log.warning("received %s: stopping now", signal.Signals(signum).name)
            raise StopRequested(signum)
        log.warning(
            "received %s: saving latest.pth after this iteration, then exiting"
            " (send it again to abort without saving)",
            signal.Signals(signum).name,
        )


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


PEER_FAILED = "another process of this torchrun job failed or was killed (its output says why)"


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank is gone (gloo says so at
    once; NCCL after its timeout)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def resume_hint(work_dir: Path) -> str:
    """Where the run can continue from: a sentence that never names a file that is not there."""
    if (work_dir / "latest.pth").is_file():
        return f"The last good checkpoint, {work_dir / 'latest.pth'}, is intact (--resume)."
    return f"No checkpoint was written in {work_dir} yet; --resume has nothing to continue."
