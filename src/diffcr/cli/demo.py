"""`diffcr demo`: the embedded default, end to end on a CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def demo(
    out: Path = typer.Option(None, help="run directory (default: a new runs/demo-<date>-<time>)"),
    quick: bool = typer.Option(False, help="a shorter run: 60 training steps, 50 samples (about 2 minutes)"),
    seed: int = typer.Option(0),
    base: str = typer.Option("default", help="base model: 'default' (shipped) or a diffusers folder"),
    steps: int = typer.Option(None, help="override the recipe's training steps (its budget; default 120)"),
    minutes: float = typer.Option(
        None,
        help="stop training after this many minutes (default: no cap, the run is budgeted in steps); "
        "a run the cap cuts short is flagged in the summary and the report",
    ),
    num_per_class: int = typer.Option(None, help="override the recipe's samples per class"),
) -> None:
    """Compress the shipped DiT on the bundled digits, sample dense and DiffCR, measure, report."""
    from dataclasses import replace

    from diffcr.assess import summary_table
    from diffcr.demo import DemoRecipe, run_demo

    recipe = DemoRecipe.quick() if quick else DemoRecipe()
    overrides = {"steps": steps, "minutes": minutes, "num_per_class": num_per_class}
    recipe = replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
    if out is None:
        import time

        out = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")

    def show_estimate(estimate) -> None:
        typer.echo(estimate.describe())

    result = run_demo(out, recipe, base=base, seed=seed, on_estimate=show_estimate)
    assessment = result["assessment"]
    typer.echo("")
    typer.echo(str(result["schedule"]))
    typer.echo("")
    typer.echo(summary_table(assessment.__dict__))
    typer.echo("")
    done, planned = result["train_steps"], result["planned_steps"]
    steps_text = f"{done} training steps" if done == planned else f"{done} of {planned} planned training steps"
    typer.echo(
        f"{steps_text} ({result['train_seconds'] / 60:.1f} min); whole demo {result['seconds'] / 60:.1f} min "
        f"(estimated {result['estimate'].total_seconds / 60:.1f})"
    )
    typer.echo(f"report: {result['report']}")
