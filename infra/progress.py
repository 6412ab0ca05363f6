"""One progress-bar style for every long job (rich), quiet when output is not a terminal."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[callable]:
    """Yields `advance(n=1, info=None)`; shows a bar with count, elapsed and remaining time, and the
    latest `info` text (e.g. loss and tokens/s)."""
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str | None = None) -> None:
            progress.update(task, advance=n, **({"info": info} if info is not None else {}))

        yield advance
