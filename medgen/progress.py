"""Progress bars with rate and ETA for long work (``rich.progress``), on a terminal only.

``track(items, what)`` yields ``items`` unchanged and, when both stdout and stderr are terminals
and the console is not ``-q``, draws a bar for them. Elsewhere — CI logs, output piped to a file,
a Ray actor or a site's ClientApp worker (no terminal) — it draws nothing, so logs stay short and
``run.log`` has only the result lines. ``MEDGEN_PROGRESS=0`` turns the bars off, ``=1`` forces them
on (for a screenshot or a test). Bars opened while one is showing join its display (rich shows one
live display at a time) and disappear when their work is done; log lines print above them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from medgen import logs

T = TypeVar("T")
ENV = "MEDGEN_PROGRESS"
_shown = None  # the rich Progress on the screen, if any


def enabled() -> bool:
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stdout.isatty() and sys.stderr.isatty() and logs.verbosity() >= 0


def track(items: Iterable[T], what: str, total: int | None = None, unit: str = "") -> Iterator[T]:
    """``items``, with a bar "what  ━━━━  3/10  1.2 unit/s  0:00:04 ETA 0:00:09" while they are consumed.
    ``total``: how many there are when ``items`` has no ``len``."""
    if not enabled():
        yield from items
        return
    global _shown
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    progress, owner = _shown, _shown is None
    if owner:
        progress = _shown = _new_progress()
        progress.start()
    task = progress.add_task(what, total=total, unit=unit)
    try:
        for item in items:
            yield item
            progress.advance(task)
    finally:
        if owner:
            progress.stop()  # its last frame shows the finished count and rate, then it clears
            _shown = None
        else:
            progress.remove_task(task)


def _new_progress():
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.3g} {task.fields.get('unit') or 'it'}/s" if speed else "")

    forced = os.environ.get(ENV, "").strip() == "1"
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True, force_terminal=forced or None),
                    transient=True, redirect_stdout=sys.stdout.isatty(), redirect_stderr=False)
