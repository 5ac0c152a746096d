"""Progress on stderr that a CI log shows: whole lines, never a redrawn spinner.

One model: each phase (load, rewrite, save, verify...) as it starts, once the model has been
running a second (a fast run stays silent), and how long each slow phase took. Several models:
one line per finished model, ``[done/total]`` counting finished models (not the job's index:
with --jobs they finish out of order), with an estimate of the time left.

``--progress auto`` (the default): on when stderr is a terminal; when it is not (a CI log, a
file), on for text output and off under ``--format json`` (a program reads that run), unless
``--progress always``. ``-q`` and ``--progress never`` turn it off.
"""

from __future__ import annotations

import time
from collections.abc import Callable

QUIET_START_S = 1.0  # a phase starting before this (since the model's first) is not announced


def enabled(choice: str, *, tty: bool, quiet: bool, as_json: bool) -> bool:
    """Whether to show progress, from ``--progress`` and where stderr goes."""
    if choice == "never" or (quiet and choice != "always"):
        return False
    return choice == "always" or tty or not as_json


class Phases:
    """The ``Options.progress`` hook of one model run in this process: ``started(phase)`` as a
    phase starts, ``(phase, seconds)`` after it ends (``gconv_rewrite.report.Report.timed``)."""

    def __init__(self, say: Callable[[str], None], name: str = ""):
        self.say, self.prefix = say, f"{name}: " if name else ""
        self.first: float | None = None
        self.phase_start = 0.0

    def started(self, phase: str) -> None:
        now = time.perf_counter()
        if self.first is None or phase == "load":  # "load": the first phase of each model's run
            self.first = now
        self.phase_start = now
        if now - self.first >= QUIET_START_S:
            self.say(f"  {self.prefix}{phase} … ({now - self.first:.1f} s)")

    def __call__(self, phase: str, _seconds_so_far: float) -> None:
        took = time.perf_counter() - self.phase_start
        if took > QUIET_START_S:
            self.say(f"  {self.prefix}{phase} done ({took:.1f} s)")


class Finished:
    """One line per finished model: ``[3/10] models/a.onnx: rewritten (1.2 s); ETA 14 s``."""

    def __init__(self, say: Callable[[str], None], total: int):
        self.say, self.total, self.done = say, total, 0
        self.start = time.perf_counter()

    def __call__(self, path: str, status: str, seconds: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = self.total - self.done
        eta = f"; ETA {_duration(elapsed / self.done * left)}" if left else f"; all done in {_duration(elapsed)}"
        self.say(f"[{self.done}/{self.total}] {path}: {status} ({seconds:.1f} s){eta}")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
