"""What every command that writes follows: one output rule, checked before the work, and one
atomic writer.

- ``check_outputs``: each output (a file, the files written beside it, or a folder), after
  resolving links and ``..``, is none of the command's inputs, lies inside no input folder, is
  no other output, is of the right kind (a file is not a folder and no file stands where a
  folder must be) and can be written. ``OutputError`` (one line naming the flag and the path)
  otherwise; nothing is created.
- ``printable``: a name as shown in logs, tables and plots, unable to forge or reverse a line.
- ``atomic_write``: a file written to a temporary sibling (``tmp_path``: ONE naming scheme,
  matched by ``TMP_NAME_RE`` and so by the work dir's stale-temp cleaner), then renamed over the
  target: a kill leaves the old file or the new one, never a partial one.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from erfnet.errors import UserError

PathLike = str | os.PathLike

# The one temporary name: ".latest.pth.1234.0a1b2c3d.tmp" beside "latest.pth".
TMP_NAME_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


class OutputError(UserError):
    """An output location that cannot or must not be written; one line naming flag and path."""


# Characters a name must not carry into a log line or a plot: C0/C1 controls (newline, escape,
# ...) and the bidirectional marks, embeddings, overrides and isolates (U+202E reverses a line).
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with control and bidi characters escaped (``"a\\nb"``, ``"\\u202e"``)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def tmp_path(path: PathLike) -> Path:
    """A unique temporary sibling of ``path`` (its name matches ``TMP_NAME_RE``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(
    path: PathLike, write_fn: Callable[[IO[bytes]], Any], *, fsync: bool = True
) -> Path:
    """Call ``write_fn`` on a binary file opened at ``tmp_path(path)``, fsync it (unless ``fsync``
    is False: bulk data a rerun makes again), then rename it over ``path``, creating the folder. Any
    failure removes the temporary file and re-raises (an ``OSError`` as it came). The rename
    replaces whatever entry ``path`` is, a planted link included, so no file outside the folder is
    ever written through it. The temporary file is opened exclusively (not ``tempfile.mkstemp``,
    whose 0600 mode the rename would keep): it honours the umask."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write_fn(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path`` by ``atomic_write``; an ``OSError`` becomes ``OutputError``
    naming the path."""
    try:
        return atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from None


@dataclass(frozen=True)
class Output:
    """One output of a command: ``flag`` names it in messages; ``folder`` when files are written
    into it; ``sidecars`` the files written beside a file (an OpenVINO IR's ``.bin``). A folder
    output may hold an input (``--work-dir .`` over ``data/cityscapes``): the files a command writes
    into it have names of their own, and a command that writes fixed names there (eval.py's report
    files) lists them as file outputs, each checked."""

    flag: str
    path: Path
    folder: bool = False
    sidecars: tuple[Path, ...] = ()

    def files(self) -> list[Path]:
        return [self.path, *self.sidecars]


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when ``a`` and ``b`` name one file (links, ``..`` and relative paths resolved)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return Path(a).resolve() == Path(b).resolve()


def _existing_folder(out: Output) -> Path:
    """The deepest existing folder (or file in its way) on the way to ``out``."""
    existing = out.path if out.folder else out.path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def _check_kind(out: Output) -> None:
    """A file output is no folder (nor is a sidecar); a folder output is no file; no file
    stands where a parent folder must be."""
    for path in out.files():
        if not out.folder and path.is_dir():
            what = "" if path == out.path else f": the file {path.name} written beside it"
            raise OutputError(f"{out.flag} {out.path}{what} is a folder; expected a file name")
    if out.folder and out.path.exists() and not out.path.is_dir():
        raise OutputError(f"{out.flag} {out.path} is a file, not a folder")
    parent = _existing_folder(out)
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"{out.flag} {out.path}: '{parent}' is a file, not a folder")


def _check_against_input(out: Output, label: str, given: PathLike) -> None:
    """``out`` (and what it writes beside it) neither is nor lies inside the input ``given``."""
    inp = Path(given).resolve()
    label = f"{label} {given}" if label else str(given)
    for path in out.files():
        if same_file(path, given):
            raise OutputError(
                f"{out.flag} {path} is the input {label}; writing it would destroy the input"
            )
        if inp in path.resolve().parents:  # strictly inside
            raise OutputError(
                f"{out.flag} {path} is inside the input {label}; choose a path outside the inputs"
            )


def _check_no_collision(outputs: list[Output]) -> None:
    """No two outputs (sidecars included) are one path."""
    seen: dict[Path, tuple[Output, Path]] = {}
    for out in outputs:
        for path in out.files():
            key = path.resolve()
            if key in seen:
                first, first_path = seen[key]
                what = f"{first.flag} {first_path}"
                if first_path != first.path:
                    what = f"the file {first_path} written beside {first.flag} {first.path}"
                raise OutputError(
                    f"{out.flag} {path} is also {what}; give each output its own path"
                )
            seen[key] = (out, path)


def _check_writable(out: Output) -> None:
    """The deepest existing folder on the way takes a new file: a probe file is written and
    removed at once (``os.access`` says yes to root on a read-only mount; a real file also shows
    a full inode table or an ACL). Creates nothing."""
    existing = _existing_folder(out)
    probe = existing / f".erfnet-write-test.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        probe.open("xb").close()
        probe.unlink()
        for path in [] if out.folder else out.files():
            if path.exists() and not os.access(path, os.W_OK):
                raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise OutputError(
            f"{out.flag} {out.path}: cannot write in '{existing}': {e.strerror or e}"
        ) from None


def check_outputs(
    outputs: Iterable[Output], inputs: Iterable[tuple[str, PathLike | None]] = ()
) -> None:
    """The one output rule (module docstring), before the work. ``inputs`` are (label, path)
    pairs, e.g. ("--classes", "base/classes.json") or ("split 'val' labels", "tvout/val");
    a None path is skipped."""
    outputs = list(outputs)
    given = [(label, path) for label, path in inputs if path is not None]
    for out in outputs:  # an input first: the most telling reason
        for label, path in given:
            _check_against_input(out, label, path)
        _check_kind(out)
    _check_no_collision(outputs)
    for out in outputs:
        _check_writable(out)


def output_file(flag: str, path: PathLike | None, *sidecars: PathLike) -> list[Output]:
    """``[Output(flag, path)]`` for a given file output; ``[]`` for None (a flag not given)."""
    if path is None:
        return []
    return [Output(flag, Path(path), sidecars=tuple(Path(p) for p in sidecars))]


def output_dir(flag: str, path: PathLike | None) -> list[Output]:
    """``[Output(flag, path, folder=True)]``; ``[]`` for None."""
    return [] if path is None else [Output(flag, Path(path), folder=True)]


def check_output_file(path: PathLike, flag: str, inputs: Iterable[PathLike | None] = ()) -> Path:
    """``check_outputs`` for one file against unlabelled inputs; returns the path."""
    check_outputs(output_file(flag, path), [("", p) for p in inputs])
    return Path(path)


def check_output_dir(path: PathLike, flag: str, inputs: Iterable[PathLike | None] = ()) -> Path:
    """``check_outputs`` for one folder against unlabelled inputs; returns the path."""
    check_outputs(output_dir(flag, path), [("", p) for p in inputs])
    return Path(path)
