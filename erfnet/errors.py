"""The one error convention of every entry point.

- ``UserError``: bad input that one line explains (a file that is missing, unreadable or at odds
  with a flag; an output that cannot be written). The entry point prints ``error: <line>`` and
  exits 1.
- ``FlagError``: a flag bad in itself (out of range, a combination that cannot work). The entry
  point reports it through its parser's own error (usage + the line) and exits 2.

Library code raises these (or subclasses); only ``run_cli`` turns them into exit statuses.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any


class UserError(ValueError):
    """One line for the user; exit 1."""


class FlagError(UserError):
    """A flag bad in itself; exit 2 through the parser."""


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line, also for an error re-raised from a DataLoader worker
    (whose text is "Caught X in DataLoader worker process N. Original Traceback ...")."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(e).__name__


def os_error_line(e: OSError) -> str:
    """An OSError as one line naming the file: "'<file>': <reason>"."""
    if e.filename is not None and e.strerror:
        return f"'{e.filename}': {e.strerror}"
    return one_line(e)


def run_cli(parser: argparse.ArgumentParser, main: Callable[[], Any]) -> Any:
    """Run ``main`` under the convention and return what it returns (None as 0):
    ``FlagError`` -> ``parser.error`` (exit 2), ``UserError`` -> ``SystemExit("error: <one
    line>")`` (exit 1), an ``OSError`` the checks could not foresee (a full disk, a file gone
    meanwhile) -> the same, naming the file; anything else propagates."""
    try:
        result = main()
    except FlagError as e:
        parser.error(one_line(e))
    except UserError as e:
        raise SystemExit(f"error: {one_line(e)}") from None
    except OSError as e:
        raise SystemExit(f"error: {os_error_line(e)}") from None
    return 0 if result is None else result


def cli_main(
    make_parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None = None,
) -> Any:
    """An entry point's ``main``: parse ``argv`` with ``make_parser()``, then ``run(args)``
    under ``run_cli``; Ctrl-C ends it with one line and exit 130, not a traceback (train.py,
    which saves a run on a signal, keeps its own handling)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return run_cli(parser, partial(run, args))
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(130) from None
