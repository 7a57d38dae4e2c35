"""`aeplat score`: score image files with a registered model and draw their anomaly heatmaps."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from aeplat.platform import env

if TYPE_CHECKING:
    from aeplat.deploy.files import ImageScore

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"

# Columns of the table when stdout is a file or pipe, where lines need not fit a screen.
PIPED_OUTPUT_WIDTH = 4000


def add_score_parser(commands: Any) -> None:
    """Add the `score` command to the subparsers of the aeplat command line."""
    score = commands.add_parser(
        "score",
        help="score image files with a registered model and write anomaly heatmaps",
        description=(
            "Score PNG, JPEG, DICOM and NIfTI files with a registered aeplat model. Each file is prepared as the "
            "model's training images were; a 3-D NIfTI volume is scored slice by slice. The score is the mean "
            "squared reconstruction error, and higher means more abnormal."
        ),
    )
    score.add_argument("files", nargs="+", type=Path, metavar="FILE", help="image files to score")
    score.add_argument(
        "--model",
        required=True,
        help="registered model as NAME@ALIAS or NAME/VERSION (for example brats-flair@champion), or any MLflow model URI",
    )
    score.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking and registry URI (default: $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI} in the working directory)",
    )
    score.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="folder for one heatmap PNG per scored image and scores.csv (default: write no files)",
    )


def model_uri_from_argument(value: str) -> str:
    """Return an MLflow model URI for NAME@ALIAS, NAME/VERSION or an existing URI."""
    if ":/" in value or value.startswith("/"):
        return value
    return f"models:/{value}"


def run_score(args: argparse.Namespace, console: Console) -> int:
    """Score the files of `args` and print a table. Return 0, 1 when a file failed, 2 when the model failed to load."""
    from aeplat.deploy.files import SCORES_CSV_NAME, score_files, write_scores_csv

    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        console.print(f"[bold red]error:[/] --output-dir {escape(str(args.output_dir))} is a file; pass a folder for the heatmaps.")
        return 2

    tracking_uri = args.tracking_uri or env.tracking_uri_from_env() or DEFAULT_TRACKING_URI
    model_uri = model_uri_from_argument(args.model)
    model = _load_model(model_uri, tracking_uri, console)
    if model is None:
        return 2

    rows = score_files(model, args.files, args.output_dir)
    _stdout_console().print(_scores_table(rows, model_uri))

    if args.output_dir is not None:
        csv_path = write_scores_csv(rows, args.output_dir / SCORES_CSV_NAME)
        console.print(f"Wrote {sum(row.heatmap is not None for row in rows)} heatmaps and {csv_path}.")

    failed = sorted({str(row.path) for row in rows if row.error})
    if failed:
        console.print(f"[bold red]error:[/] {len(failed)} of {len(args.files)} files were not scored: {escape(', '.join(failed))}.")
        return 1
    return 0


def _stdout_console() -> Console:
    """Return a console for the table: terminal width on a terminal, else wide enough never to cut a path."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_OUTPUT_WIDTH)


def _load_model(model_uri: str, tracking_uri: str, console: Console) -> Any:
    """Return the pyfunc model, or None after printing why it failed to load."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from aeplat.deploy import load_scoring_model

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        return load_scoring_model(model_uri)
    except MlflowException as error:
        console.print(
            f"[bold red]error:[/] failed to load model {escape(model_uri)} from {escape(tracking_uri)}: {escape(error.message)} "
            "Check --model (NAME@ALIAS or NAME/VERSION) and --tracking-uri, or run `aeplat search` to register a model."
        )
    except (OSError, ValueError) as error:
        console.print(
            f"[bold red]error:[/] failed to load model {escape(model_uri)} from {escape(tracking_uri)}: {escape(str(error))}. "
            "Check that the model was logged by `aeplat search`."
        )
    return None


def _scores_table(rows: list[ImageScore], model_uri: str) -> Table:
    table = Table(title=f"Anomaly scores ({escape(model_uri)}; higher is more abnormal)")
    table.add_column("file")
    table.add_column("slice", justify="right")
    table.add_column("score", justify="right")
    table.add_column("heatmap or error")

    for row in rows:
        slice_text = "" if row.slice_index < 0 else str(row.slice_index)
        score_text = "" if row.score is None else f"{row.score:.6f}"
        if row.error:
            detail = Text(row.error, style="red")
        else:
            detail = Text("" if row.heatmap is None else str(row.heatmap))
        table.add_row(Text(str(row.path)), slice_text, score_text, detail)
    return table
