"""`aeplat report`: print what a search did, from its MLflow runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from aeplat.platform.review import SearchReport, TrialSummary

DEFAULT_TOP = 10

# Columns of the output when stdout is a file or pipe, wide enough for failure reasons.
PIPED_OUTPUT_WIDTH = 200


def add_report_parser(commands: Any) -> None:
    """Add the `report` command to the subparsers of the aeplat command line."""
    report = commands.add_parser(
        "report",
        help="print a search's settings, best and failed trials, budget and registered model",
        description=(
            "Print what a search did, read from its MLflow parent run and its trials' child runs: settings, "
            "the best trials, every failed trial with its reason, the budget used, the registered model, and "
            "where to open the runs in the MLflow UI."
        ),
    )
    report.add_argument(
        "search",
        metavar="SEARCH",
        help="parent run id of a search, or an experiment or registered model name (such as brats-flair) for its newest search",
    )
    report.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)",
    )
    report.add_argument(
        "--top", type=_positive_int, default=DEFAULT_TOP, metavar="N", help="number of best trials to list (default: %(default)s)"
    )


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def run_report(args: argparse.Namespace, console: Console) -> int:
    """Print the report of args.search to stdout. Return 0, or 2 when the store or the search is not found."""
    from mlflow.tracking import MlflowClient

    from aeplat.platform.review import SearchNotFoundError, collect_report, find_search_run
    from aeplat.platform.search import check_tracking_store, resolve_tracking_uri_option
    from aeplat.platform.settings import SettingsError

    tracking_uri = resolve_tracking_uri_option(args.tracking_uri)
    missing = _missing_sqlite_file(tracking_uri)
    if missing is not None:
        console.print(
            f"[bold red]error:[/] there is no MLflow store at {escape(str(missing))}. Pass the --tracking-uri of the "
            "search, or run `aeplat report` in the folder where `aeplat search` ran."
        )
        return 2
    try:
        check_tracking_store(tracking_uri)
    except SettingsError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}")
        return 2

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        run = find_search_run(client, args.search)
    except SearchNotFoundError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}")
        return 2

    print_report(collect_report(client, run, tracking_uri), args.top, _stdout_console())
    return 0


def _missing_sqlite_file(tracking_uri: str) -> Path | None:
    """Return the file of a sqlite:/// URI that does not exist, which MLflow would create empty; else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = Path(tracking_uri[len("sqlite:///") :])
    return None if path.is_file() else path


def _stdout_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_OUTPUT_WIDTH)


def print_report(report: SearchReport, top: int, console: Console) -> None:
    """Print a search report: header, best trials, failed trials, budget, registration, links."""
    _print_header(report, console)
    console.print(_trials_table(report.top(top), f"Best {min(top, len(report.trials))} of {len(report.trials)} trials"))
    _print_failed(report, console)
    _print_budget(report, console)
    _print_registration(report, console)
    _print_links(report, console)


def _print_header(report: SearchReport, console: Console) -> None:
    from aeplat.platform.review import format_timestamp

    console.rule(Text(f"Search {report.run_name or report.run_id}"))
    status = Text(report.status, style=_STATUS_STYLES.get(report.status, ""))
    console.print(Text.assemble("status: ", status, f"   run {report.run_id}   experiment {report.experiment_name}"))
    if report.failure_reason:
        console.print(Text(f"reason: {report.failure_reason}", style="red"))

    settings = report.settings
    lines = [
        ("dataset", f"{report.dataset} (modality {report.modality}, model name {report.model_name})"),
        ("data", settings.get("data_dir", "-")),
        ("trials requested", settings.get("trials", "-")),
        ("epochs per trial", f"at most {settings.get('epochs', '-')} (grace period {settings.get('grace_period', '-')})"),
        ("image size", settings.get("image_size", "-")),
        ("seed / repeats", f"{settings.get('seed', '-')} / {settings.get('repeats', '-')}"),
        ("started", format_timestamp(report.started_ms)),
    ]
    for label, value in lines:
        console.print(Text(f"{label + ':':<18}{value}"))


def _trials_table(trials: list[TrialSummary], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("trial", "status", "best val AUC", "d", "λ", "model", "lr", "epochs"):
        table.add_column(column, no_wrap=True, justify="right" if column in ("best val AUC", "epochs") else "left")

    for trial in trials:
        params = trial.params
        table.add_row(
            trial.trial_id,
            Text(trial.status, style=_TRIAL_STYLES.get(trial.status, "")),
            "-" if trial.best_val_auc is None else f"{trial.best_val_auc:.4f}",
            params.get("latent_dim", "-"),
            _short_number(params.get("entropy_weight")),
            params.get("model", "-"),
            _short_number(params.get("lr")),
            str(trial.epochs),
        )
    return table


def _print_failed(report: SearchReport, console: Console) -> None:
    failed = report.failed
    if not failed:
        console.print("No trial failed.")
        return

    table = Table(title=f"Failed trials ({len(failed)})", title_justify="left")
    for column in ("trial", "d", "λ", "model", "lr", "epochs"):
        table.add_column(column, no_wrap=True, justify="right" if column == "epochs" else "left")
    table.add_column("reason (aeplat.failure_reason)")
    for trial in failed:
        params = trial.params
        table.add_row(
            trial.trial_id,
            params.get("latent_dim", "-"),
            _short_number(params.get("entropy_weight")),
            params.get("model", "-"),
            _short_number(params.get("lr")),
            str(trial.epochs),
            Text(trial.failure_reason or "no reason recorded", style="red"),
        )
    console.print(table)


def _print_budget(report: SearchReport, console: Console) -> None:
    requested = "-" if report.trials_requested is None else str(report.trials_requested)
    counts = ", ".join(
        f"{report.count(status)} {status}"
        for status in ("finished", "stopped early", "failed", "killed", "running")
        if status in ("finished", "stopped early", "failed") or report.count(status)
    )
    budget = report.epoch_budget
    share = f" ({100 * report.epochs_run / budget:.0f} %)" if budget else ""
    ended = "" if report.ended_ms is not None else " so far"

    console.rule(Text("Budget"), align="left")
    console.print(Text(f"trials:     {len(report.trials)} of {requested} requested: {counts}"))
    console.print(Text(f"epochs:     {report.epochs_run} run of {budget if budget else '-'} (trials requested × epochs){share}"))
    console.print(Text(f"wall time:  {_format_duration(report.wall_time_s)}{ended}"))


def _print_registration(report: SearchReport, console: Console) -> None:
    from aeplat.platform.review import REPORTED_METRICS

    console.rule(Text("Result"), align="left")
    metrics = report.metrics
    if metrics:
        values = ", ".join(f"{name} {metrics[name]:.4f}" for name in REPORTED_METRICS if name in metrics)
        console.print(Text(f"best trial {report.best_trial_id or '-'}: {values}"))
    if report.registered_model is None:
        console.print("No model was registered by this search.")
        return

    champion = {True: "yes", False: "no (the champion then scored higher)", None: "-"}[report.champion_at_registration]
    current = report.current_champion_version or "none"
    console.print(Text(f"registered: {report.registered_model}   champion when registered: {champion}   champion now: version {current}"))


def _print_links(report: SearchReport, console: Console) -> None:
    from aeplat.platform.review import run_url

    console.rule(Text("Links"), align="left")
    parent_url = run_url(report.tracking_uri, report.experiment_id, report.run_id)
    if parent_url is not None:
        console.print(Text(f"search run: {parent_url}"))
        if report.best_run_id:
            console.print(Text(f"best trial: {run_url(report.tracking_uri, report.experiment_id, report.best_run_id)}"))
    else:
        mlflow_command = Path(sys.executable).parent / "mlflow"
        console.print(Text(f"open:       {mlflow_command} ui --backend-store-uri {report.tracking_uri}"))
        console.print(Text(f"search run: {report.run_id} (experiment {report.experiment_id})"))
        if report.best_run_id:
            console.print(Text(f"best trial: {report.best_run_id}"))
    if report.artifacts:
        console.print(Text(f"artifacts of the search run: {', '.join(report.artifacts)}"))


_STATUS_STYLES = {"FINISHED": "green", "FAILED": "bold red", "KILLED": "yellow", "RUNNING": "cyan"}
_TRIAL_STYLES = {"finished": "green", "stopped early": "", "failed": "red", "killed": "yellow", "running": "cyan"}


def _short_number(text: str | None) -> str:
    if text is None or text == "":
        return "-"
    try:
        return f"{float(text):.3g}"
    except ValueError:
        return text


def _format_duration(seconds: float) -> str:
    minutes, second = divmod(int(round(seconds)), 60)
    hours, minute = divmod(minutes, 60)
    return f"{hours} h {minute:02d} min {second:02d} s" if hours else f"{minute} min {second:02d} s"
