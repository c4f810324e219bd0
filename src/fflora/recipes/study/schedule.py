"""When a study may start a cell: how long its cells take, measured, and a wall-clock deadline.

A job on a shared machine is ended at a time it knows in advance; a cell cut off in flight loses its
work since the last checkpoint (its evaluation entirely). `fflora study --until HH:MM` therefore
starts a cell only when the cells already measured say that it ends before then.

Measured time is *active* time: a study paused with `kill -STOP` (so that a latency benchmark has the
CPU to itself) does not run, and `PauseWatch` takes those gaps out of the cell's figures.
"""

from __future__ import annotations

import datetime as dt
import statistics
import threading
import time

# A cell is started only if its estimate, times this, fits in the time left (estimates come from a
# handful of cells on a machine whose speed drifts by 5-25% between runs).
SAFETY = 1.15


class PauseWatch:
    """Wall time and the part of it the process was stopped (SIGSTOP / SIGCONT), seen by a thread
    that wakes every `tick` seconds: a wake-up later than `gap` seconds after the last one was a pause.
    Use as a context manager; `active()` is the wall time so far minus the pauses."""

    def __init__(self, tick: float = 0.5, gap: float = 5.0) -> None:
        self.tick, self.gap = tick, gap
        self.paused_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fflora-pause-watch", daemon=True)
        self._start = time.monotonic()

    def __enter__(self) -> PauseWatch:
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            if now - last > self.gap:
                self.paused_s += now - last - self.tick
            last = now

    def wall(self) -> float:
        return time.monotonic() - self._start

    def active(self) -> float:
        return self.wall() - self.paused_s


def parse_until(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """The deadline `text` names: "HH:MM" is its next occurrence in local time (tomorrow's if that
    time of day has passed), or a full ISO date and time ("2026-12-07T01:50")."""
    now = now or dt.datetime.now()
    try:
        if "T" in text or "-" in text:
            return dt.datetime.fromisoformat(text)
        clock = dt.datetime.strptime(text, "%H:%M").time()
    except ValueError:
        raise ValueError(f"--until {text!r}: give a time of day as HH:MM (e.g. 01:50) or an ISO date and time "
                         "(e.g. 2026-12-07T01:50)") from None
    deadline = dt.datetime.combine(now.date(), clock)
    return deadline if deadline > now else deadline + dt.timedelta(days=1)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def seconds_per_step(records: list[dict], method: str) -> float | None:
    """Active training seconds per step, from the measured cells (those of `method` where there are
    any, else all): a cell's `timing` where it has one, else its run's own wall time (older records)."""
    def per_step(rows: list[dict]) -> list[float]:
        timed = [r["timing"]["train_s"] / r["timing"]["steps_run"] for r in rows
                 if r.get("timing", {}).get("steps_run")]
        if timed:
            return timed
        return [r["train"]["wall_time_s"] / r["train"]["global_step"] for r in rows
                if r.get("train", {}).get("wall_time_s") and r["train"].get("global_step")
                and not r["train"].get("resumed_from")]

    trained = [r for r in records if r["cell"]["phase"] in ("sweep", "final") and "diverged" not in r]
    own = per_step([r for r in trained if r["cell"]["method"] == method])
    return _median(own or per_step(trained))


def evaluation_seconds(records: list[dict]) -> float | None:
    """Active seconds a final cell spends on its evaluations (the base model's cell measures them too)."""
    return _median([r["timing"]["evaluate_s"] for r in records
                    if r["cell"]["phase"] in ("final", "base") and r.get("timing", {}).get("evaluate_s")])


def cell_seconds(phase: str, method: str, steps: int, records: list[dict]) -> float | None:
    """Estimated active seconds of a cell (its training steps, then its evaluation for final and base
    cells), or None where no measured cell says."""
    train = 0.0
    if phase != "base":
        step = seconds_per_step(records, method)
        if step is None:
            return None
        train = steps * step
    if phase == "sweep":
        return train
    evaluate = evaluation_seconds(records)
    return None if evaluate is None else train + evaluate


def study_seconds(records: dict[str, dict]) -> tuple[float, list[str]]:
    """The active seconds the study's cells (by key) took so far, and the keys of the cells estimated
    rather than measured. A cell that trained (and evaluated) in one run counts what it measured; one that
    resumed after a cut-off, or a record older than `timing`, counts `cell_seconds` of its kind."""
    total, estimated, rows = 0.0, [], list(records.values())
    for key, record in records.items():
        cell, timing = record["cell"], record.get("timing", {})
        steps = record.get("train", {}).get("global_step") or 0
        if timing.get("steps_run") == steps and (cell["phase"] == "sweep" or "evaluate_s" in timing
                                                 or "diverged" in record):
            total += timing["train_s"] + timing.get("evaluate_s", 0.0)
            continue
        total += cell_seconds(cell["phase"], cell["method"], steps, rows) or 0.0
        estimated.append(key)
    return total, estimated
