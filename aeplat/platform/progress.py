"""Terminal display of a running search: trials finished, running and failed, best AUC so far."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from ray.tune import Callback
from ray.tune.experiment import Trial


class SearchProgress(Callback):
    """Tune callback that draws one progress bar for the whole search on the driver's terminal."""

    def __init__(self, total_trials: int, console: Console | None = None) -> None:
        self._total = total_trials
        self._console = console
        self._progress: Progress | None = None
        self._task_id: int | None = None
        self._running: set[str] = set()
        self._finished = 0
        self._failed = 0
        self._best_auc = float("-inf")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_progress=None, _task_id=None, _console=None)
        return state

    def start(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self._console or Console(stderr=True),
            transient=False,
        )
        self._task_id = self._progress.add_task(self._describe(), total=self._total)
        self._progress.start()

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _describe(self) -> str:
        best = f"{self._best_auc:.4f}" if math.isfinite(self._best_auc) else "-"
        return f"running {len(self._running)} · failed {self._failed} · best val AUC {best}"

    def _refresh(self) -> None:
        if self._progress is None:
            # A callback restored from Tune's saved state was never started.
            self.start()
        if self._progress is None or self._task_id is None:
            return
        self._progress.update(self._task_id, completed=self._finished + self._failed, description=self._describe())

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        value = result.get("best_val_auc")
        if isinstance(value, (int, float)) and math.isfinite(value):
            self._best_auc = max(self._best_auc, float(value))
        self._refresh()

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._running.discard(trial.trial_id)
        self._finished += 1
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._running.discard(trial.trial_id)
        self._failed += 1
        self._refresh()


def best_trials_table(rows: list[dict[str, Any]], limit: int = 5) -> Table:
    """Build a table of the best trials, highest best validation AUC first."""
    table = Table(title="Best trials")
    for column in ("trial", "model", "d", "λ", "lr", "epochs", "best val AUC", "status"):
        table.add_column(column, no_wrap=True)

    ranked = sorted(rows, key=lambda row: _sort_key(row.get("best_val_auc")), reverse=True)
    for row in ranked[:limit]:
        table.add_row(
            str(row.get("trial_id", "")),
            str(row.get("model", "")),
            str(row.get("latent_dim", "")),
            _format_number(row.get("entropy_weight")),
            _format_number(row.get("lr")),
            str(row.get("epoch", "")),
            _format_number(row.get("best_val_auc"), digits=4),
            str(row.get("status", "")),
        )
    return table


def _sort_key(value: Any) -> float:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return float("-inf")


def _format_number(value: Any, digits: int = 3) -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.{digits}g}" if digits != 4 else f"{value:.4f}"
    return "-"
