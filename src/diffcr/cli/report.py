"""`diffcr report RUN_DIR`: the HTML report of an assessed compression run."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def report(
    run_dir: Path = typer.Argument(..., help="a compression run (from `diffcr compress` or `diffcr demo`)"),
    num: int = typer.Option(10, help="images per class to sample when the run has not been assessed yet"),
    out: Path = typer.Option(None, help="output folder (default RUN_DIR/report)"),
) -> None:
    """Write RUN_DIR/report/report.html (self-contained) and its PNGs; assesses the run first if needed."""
    import torch

    from diffcr.assess import assess, load_assessment, summary_table
    from diffcr.data import load_dataset
    from diffcr.models.classifier import load_classifier
    from diffcr.report import build_report
    from diffcr.sampling import SampleConfig
    from diffcr.training import load_compressed

    torch.set_num_threads(2)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a compression run (no run.json)")
    if not (run_dir / "assessment.json").is_file():
        model_dir = run_dir / "model" if (run_dir / "model" / "config.json").is_file() else None
        import json

        run = json.loads((run_dir / "run.json").read_text())
        routed = load_compressed(model_dir or run.get("base"), model_dir or run_dir / "artifact")
        dense = load_compressed(run.get("base"), None)
        train_set, heldout = load_dataset(run.get("data"))
        assess(run_dir, dense, routed, load_classifier(), heldout, train_set, SampleConfig(batch_size=25), num)
    path = build_report(run_dir, out)
    typer.echo(summary_table(load_assessment(run_dir)))
    typer.echo(f"report: {path}")
