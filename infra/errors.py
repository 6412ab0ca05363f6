"""The last line of defence of every `merg` command: an exception that escapes it becomes one line
saying what failed and why, plus a log file holding the full traceback (`--verbose` prints it too).

Logs go to `$MERG_LOG_DIR`, else `~/.cache/merg/logs/`, else the system's temp folder.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

LOG_DIR_ENV = "MERG_LOG_DIR"
USAGE_EXIT = 2  # the input cannot be used: an option, a path, a filter, a store without the data asked for


class InvalidInput(Exception):
    """A command's input cannot be used; the message says what to pass or run instead."""


class Interrupted(Exception):
    """A command stopped by SIGINT or SIGTERM; the message says where it stopped and how to go on."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.exit_status = 128 + signal_number  # the shell's status for a death by that signal


_RAY_PREFIX = re.compile(r"^ray::\S+\s*\(.*?\)\s*")


def log_dirs() -> list[Path]:
    """Where a failure log may go, in order of preference (a full or read-only disk falls through)."""
    configured = os.environ.get(LOG_DIR_ENV)
    return [Path(configured)] if configured else [Path.home() / ".cache" / "merg" / "logs", Path(tempfile.gettempdir()) / "merg-logs"]


def write_failure_log(command: str, argv: list[str], exc: BaseException) -> Path | None:
    """The command line and full traceback in a new log file; None when no folder can take it."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = f"{stamp}-{'-'.join(command.split()) or 'merg'}-{os.getpid()}.log"
    text = f"$ merg {' '.join(argv)}\n{datetime.now(timezone.utc).isoformat()}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__)
    )
    for folder in log_dirs():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return folder / name
        except OSError:
            continue
    return None


def _causes(exc: BaseException):
    """The exception, then what caused it (explicit cause, context, a Ray task's wrapped cause)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or getattr(exc, "cause", None) or exc.__context__


def _one_line(text: str, limit: int = 400) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = _RAY_PREFIX.sub("", lines[0]) if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def explain(exc: BaseException) -> str:
    """Why it failed, in one line: known machine faults get their fix, anything else its type and message."""
    from featurestore.storage import StorageError
    from featurestore.store import StoreError, explain_store_error
    from infra.tools import ToolUnavailable

    for cause in _causes(exc):
        text = str(cause)
        if isinstance(cause, (ToolUnavailable, StoreError, InvalidInput, Interrupted, StorageError)):  # merg's own messages say what to do
            return explain_store_error(cause) or _one_line(text)
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC or "No space left on device" in text or "os error 28" in text:
            where = f" ({cause.filename})" if isinstance(cause, OSError) and cause.filename else ""
            return (f"no space left on device{where}: free space (or copy the store to a roomier disk and point "
                    "--store at it), then run the same command again: committed work is kept and not redone")  # fmt: skip
        if isinstance(cause, OSError) and cause.errno == errno.EROFS or "Read-only file system" in text:
            return f"read-only file system{f' ({cause.filename})' if getattr(cause, 'filename', None) else ''}: {_one_line(text)}"
        damage = explain_store_error(cause)
        if damage:
            return damage
    return f"{type(exc).__name__}: {_one_line(str(exc)) or 'no message'}"


def exit_status(exc: BaseException) -> int:
    """1, or 2 for input that cannot be used, or 128 + N for a command stopped by signal N."""
    from featurestore.store import BadFilter

    if isinstance(exc, Interrupted):
        return exc.exit_status
    return USAGE_EXIT if isinstance(exc, (InvalidInput, BadFilter)) else 1


def report_failure(exc: BaseException, command: str, argv: list[str], verbose: bool = False) -> int:
    """Print the one-line failure (and the traceback when verbose) to stderr; the exit status to use."""
    log = write_failure_log(command, argv, exc)
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    label = f"merg {command}" if command else "merg"
    print(f"error: {label} failed: {explain(exc)}", file=sys.stderr)
    where = f"full traceback in {log}" if log else "no log written (no writable log folder; set $MERG_LOG_DIR)"
    print(f"  {where}{'' if verbose else ' (--verbose prints it)'}", file=sys.stderr)
    return exit_status(exc)
