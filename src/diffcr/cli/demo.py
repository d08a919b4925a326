"""`diffcr demo`: the embedded default, end to end on a CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def demo(
    task: str = typer.Option(
        "class", help="'class': the class-conditional DiT on digits; 't2i': the text-to-image PixArt pipeline"
    ),
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
    """Compress the shipped DiT on the bundled digits (or, with --task t2i, the shipped text-to-image pipeline on
    digit scenes), sample dense and DiffCR, measure, report."""
    from dataclasses import replace

    if task not in ("class", "t2i"):
        raise ValueError(f"--task {task!r} must be 'class' or 't2i'")
    if task == "t2i":
        if quick or num_per_class is not None or minutes is not None:
            raise ValueError("--quick, --minutes and --num-per-class belong to --task class; --task t2i takes --steps")
        _demo_t2i(out, seed, None if base == "default" else base, steps)
        return

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


def _demo_t2i(out, seed: int, base: str | None, steps: int | None) -> None:
    import time
    from dataclasses import replace

    from diffcr.t2i_demo import T2IDemoRecipe, run_t2i_demo, summary_table

    recipe = T2IDemoRecipe() if steps is None else replace(T2IDemoRecipe(), steps=steps)
    out = out or Path("runs") / time.strftime("demo-t2i-%Y%m%d-%H%M%S")
    result = run_t2i_demo(out, recipe, base=base, seed=seed, on_estimate=lambda e: typer.echo(e.describe()))
    typer.echo("")
    typer.echo(str(result["schedule"]))
    typer.echo("")
    typer.echo(summary_table(result["evaluation"], result["judgement"]))
    typer.echo("")
    typer.echo(
        f"{result['train_steps']} training steps ({result['train_seconds'] / 60:.1f} min); whole demo "
        f"{result['seconds'] / 60:.1f} min (estimated {result['estimate'].total_seconds / 60:.1f})"
    )
    typer.echo(f"artifact: {result['artifact']}")
    typer.echo(f"report: {result['report']}")
