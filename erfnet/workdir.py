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
import os
import re
import socket
from pathlib import Path

try:  # POSIX; elsewhere runs are not locked (documented in the README)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "train.lock"
# atomic_save's temporary names: ".latest.pth.1234.0a1b2c3d.tmp"
_TMP_RE = re.compile(r"^\..+\.pth\.\d+\.[0-9a-f]{8}\.tmp$")


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
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise WorkDirBusyError(
                    f"--work-dir '{self.path.parent}' is in use by another training run"
                    f" ({holder}); wait for it to finish or stop it, or choose another --work-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd

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
        if _TMP_RE.match(p.name) and p.is_file():
            try:
                n = p.stat().st_size
                p.unlink()
            except OSError:
                continue
            count, size = count + 1, size + n
    return count, size
