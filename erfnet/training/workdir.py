"""What keeps a work dir safe: one run at a time, no stale temporary files.

- ``WorkDirLock``: an OS file lock (``flock``) on ``<work_dir>/train.lock``, held for the whole
  run. The kernel releases it when the process ends in any way (kill -9 included), so a crashed
  run never leaves a lock that blocks the next one; the file keeps the holder's PID and host so
  a second run can say who holds it.
- ``remove_stale_tmp``: the ``.<name>.pth.<pid>.<hex>.tmp`` files that ``atomic_save`` writes
  before its rename; only a write killed with SIGKILL (or a power cut) leaves one behind.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from pathlib import Path

from erfnet.checkpoint import TMP_NAME_RE

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"
log = logging.getLogger("erfnet.train")


class WorkDirBusyError(RuntimeError):
    """Another live process holds the work dir's lock; the message names its PID and host."""


class WorkDirLock:
    """``flock`` on ``<work_dir>/train.lock`` for as long as this object is held.

    ``acquire`` raises ``WorkDirBusyError`` at once (no waiting) when another process holds it.
    """

    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.path = Path(work_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise WorkDirBusyError(
                        f"--work-dir '{self.path.parent}' is in use by another training run"
                        f" ({holder}); wait for it to finish or stop it, or choose another"
                        " --work-dir"
                    ) from None
                # A file system without flock (some network mounts): run unlocked, as the
                # README says, rather than refuse to train.
                log.warning("--work-dir '%s': no file lock here (%s); a second run into it"
                            " would not be stopped", self.path.parent, e.strerror)  # fmt: skip
        self._fd = fd  # from here on release() closes it, whatever fails below
        try:  # the holder's name is only informational: a full disk must not stop the run
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        except OSError:
            pass

    def release(self) -> None:
        """Unlock (closing the file releases the flock); the file stays, harmless when unlocked."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


def remove_stale_tmp(folder: str | os.PathLike) -> tuple[int, int]:
    """Delete ``atomic_save``'s leftover temporary files in ``folder``; (count, bytes) removed.

    Call it only while holding the folder's ``WorkDirLock``: then no live writer owns them.
    """
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
