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
    quick: bool = typer.Option(False, help="a shorter run (about 3 minutes)"),
    seed: int = typer.Option(0),
    base: str = typer.Option("default", help="base model: 'default' (shipped) or a diffusers folder"),
    steps: int = typer.Option(None, help="override the recipe's training steps"),
    minutes: float = typer.Option(None, help="override the recipe's training time limit"),
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
    result = run_demo(out, recipe, base=base, seed=seed)
    assessment = result["assessment"]
    typer.echo("")
    typer.echo(str(result["schedule"]))
    typer.echo("")
    typer.echo(summary_table(assessment.__dict__))
    typer.echo("")
    typer.echo(f"{result['train_steps']} training steps; whole demo {result['seconds'] / 60:.1f} min")
    typer.echo(f"report: {result['report']}")
