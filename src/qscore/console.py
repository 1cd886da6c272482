"""What every command shows on stderr: log lines, the one-line usage error, and progress.

Scoring, training, evaluation and synthesis share these, so they all look (and can be read
from cron logs) alike.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, NoReturn

from qscore.config import EXIT_USAGE, parse_sets
from qscore.types import UsageError

log = logging.getLogger("qscore")


def setup_logging(quiet: bool, verbose: bool = False) -> None:
    """Timestamped lines on stderr (readable in cron logs); only qscore's own logger is verbose."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr, force=True)
    log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)


def usage(message: str) -> NoReturn:
    """``qscore: <message>`` on stderr and exit code 2."""
    import typer

    typer.echo(f"qscore: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def overrides_from(sets: list[str] | None) -> dict[str, str]:
    """``--set KEY=VALUE`` options as model config overrides; a malformed one is a usage error."""
    try:
        return parse_sets(sets)
    except UsageError as e:
        usage(str(e))


class Progress:
    """A rich bar on a terminal (``enabled`` None: when stderr is one). Otherwise, with
    ``log_lines``, a plain log line every ``EVERY`` seconds, also while a long batch is still in
    flight, and one when the last file is done; else nothing.

    ``start`` begins a bar (one per epoch in training); ``advance`` moves it on, its ``note``
    (default: files/s and errors) shown beside it."""

    EVERY = 10.0

    def __init__(self, enabled: bool | None, log_lines: bool = False):
        self.bar = sys.stderr.isatty() if enabled is None else enabled
        self.log_lines = log_lines and not self.bar
        self.total = self.done = self.errors = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._rich: Any = None

    def __enter__(self) -> Progress:
        if self.bar:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._rich = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._rich.start()
        return self

    def start(self, title: str, total: int) -> Progress:
        self.total, self.done, self.errors, self.t0 = total, 0, 0, time.perf_counter()
        if self._rich is not None:
            self._task = self._rich.add_task(title, total=total, note="-")
        elif self.log_lines:
            log.info("%s %d file(s)", title, total)
            threading.Thread(target=self._beat, name="qscore-progress", daemon=True).start()
        return self

    def advance(self, n: int = 1, errors: int = 0, note: str | None = None) -> None:
        self.done += n
        self.errors += errors
        if self._rich is not None:
            if note is None:
                note = f"{self.done / max(time.perf_counter() - self.t0, 1e-9):.1f} files/s  errors {self.errors}"
            self._rich.update(self._task, advance=n, note=note)
        elif self.log_lines and self.done == self.total:
            self._line()

    def _beat(self) -> None:
        while not self._stop.wait(self.EVERY):
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / max(elapsed, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        log.info(
            "%d/%d files, %d error(s), %.2f files/s, elapsed %s, ETA %s",
            self.done, self.total, self.errors, rate, _hms(elapsed), _hms(eta),
        )

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._rich is not None:
            self._rich.stop()


def _hms(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
