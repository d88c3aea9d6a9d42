"""One progress bar for the whole ls-* family: description, bar, done/total, rate, elapsed, ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

__all__ = ["RateColumn", "progress_bar"]


class RateColumn(ProgressColumn):
    """Items per second in the command's own unit (frames, images, lights ...)."""

    def __init__(self, unit: str = "", digits: int = 1):
        super().__init__()
        self.unit = unit
        self.digits = digits

    def render(self, task):
        s = task.finished_speed or task.speed
        return Text(f"-- {self.unit}/s" if s is None else f"{s:.{self.digits}f} {self.unit}/s")


def progress_bar(console: Console, unit: str = "", description: str = "[bold]{task.description}",
                 digits: int = 1, info: bool = False) -> Progress:
    """The shared bar; ``info=True`` adds a trailing ``{task.fields[info]}`` column (training
    losses): every task must then be added with ``info=""``."""
    extra = (TextColumn("{task.fields[info]}"),) if info else ()
    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(),
                    RateColumn(unit, digits), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), *extra, console=console, transient=False)
