"""`diffcr bench`: speed scaling, DiffCR against the alternatives, and the paper's findings, in one run; with
`--only frontier`, the speed-quality frontier of every family of methods (`--task t2i`: on the text-to-image
default)."""

from __future__ import annotations

from pathlib import Path

import typer

from diffcr.cli import app
from diffcr.cli.common import friendly_errors


@app.command()
@friendly_errors
def bench(
    task: str = typer.Option(
        "class",
        help="'class': the class-conditional DiT on digits (all parts, or --only frontier); 't2i': every method at "
        "matched speedups on the text-to-image PixArt pipeline, judged by prompt accuracy (or --only frontier)",
    ),
    out: Path = typer.Option(
        None,
        help="output folder (default: a new runs/bench-<date>-<time>, runs/bench-t2i-..., runs/frontier-... or "
        "runs/frontier-t2i-...)",
    ),
    quick: bool = typer.Option(False, help="tiny sizes: the whole harness in about 2 minutes (a smoke run)"),
    only: str = typer.Option(
        "all",
        help="'all', or one part: 'scaling' (random-weight speed), 'train' (training-step cost), 'compare'; or "
        "'frontier': quality against measured speedup for fewer steps, first-block cache, DiffCR and their "
        "compositions, into its own folder (not part of 'all': about an hour on 2 CPU cores; with --task t2i, "
        "judged by prompt accuracy, longer)",
    ),
    base: str = typer.Option("default", help="base model: 'default' (shipped) or a diffusers folder"),
    publish: Path = typer.Option(
        None, help="instead of running: copy the results of this bench folder into --results-md and its images"
    ),
    results_md: Path = typer.Option(Path("docs/RESULTS.md"), help="the Markdown file --publish writes into"),
    paper_routing: bool = typer.Option(
        False,
        "--paper-routing",
        help="--task t2i: every routed method lets the tokens a block bypasses skip all of it, cross-attention "
        "included (the paper's routing); by default they still get each block's cross-attention, as the demo's "
        "DiffCR does (docs/METHOD.md section 1)",
    ),
) -> None:
    """Measure everything side by side and write results.json, results.md and plots (--task t2i: every method on
    the text-to-image default, judged by prompt accuracy; --only frontier: quality against measured speedup for
    every family of methods and their compositions, with frontier.png, on either task)."""
    from diffcr.checkpoint import check_writable_dir, check_writable_file
    from diffcr.harness import publish as publish_results
    from diffcr.harness import run_bench

    if paper_routing and task != "t2i":
        raise ValueError(
            "--paper-routing belongs to --task t2i: the class-conditional DiT has no cross-attention, so its "
            "routed blocks already follow the paper (bypassed tokens skip the whole block)"
        )
    if publish is not None:
        if not publish.is_dir() or not any((publish / name).is_file() for name in ("results.json", "results.md")):
            raise FileNotFoundError(
                f"--publish {publish} is not a bench folder (no results.json); run `diffcr bench --out {publish}` first"
            )
        check_writable_file(results_md, "--results-md")
        check_writable_dir(results_md.parent / "images" / "bench", "the images folder beside --results-md")
        typer.echo(f"updated {publish_results(publish, results_md)}")
        return
    if task not in ("class", "t2i"):
        raise ValueError(f"--task {task!r} must be 'class' or 't2i'")
    if task == "t2i":
        if publish is not None or only not in ("all", "frontier"):
            raise ValueError(
                "--publish and --only (other than 'frontier') belong to --task class; --task t2i takes --out, "
                "--quick, --base and --only frontier"
            )
        if only == "frontier":
            _bench_t2i_frontier(out, quick, "t2i" if base == "default" else base, paper_routing)
        else:
            _bench_t2i(out, quick, "t2i" if base == "default" else base, paper_routing)
        return
    if only not in ("all", "scaling", "train", "compare", "frontier"):
        raise ValueError(f"--only {only!r}: use 'all', 'scaling', 'train', 'compare' or 'frontier'")
    if out is None:
        import time

        prefix = "frontier" if only == "frontier" else "bench"
        out = Path("runs") / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--out")
    if base != "default":
        from diffcr.models import load_base_model

        load_base_model(base)  # a wrong --base fails now, with its message, not minutes into the bench
    if only == "frontier":
        _bench_frontier(out, quick, None if base == "default" else base)
        return
    result = run_bench(out, quick=quick, base=None if base == "default" else base, parts=(only,))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"whole bench {result.seconds / 60:.1f} min; results in {out}")


def _bench_t2i(out: Path | None, quick: bool, base: str, paper_routing: bool = False) -> None:
    """Run `diffcr.t2i_bench.run_t2i_bench` into `out` and print its table."""
    import time
    from dataclasses import replace

    from diffcr.checkpoint import check_writable_dir
    from diffcr.t2i_bench import T2IBenchRecipe, run_t2i_bench

    out = out or Path("runs") / time.strftime("bench-t2i-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--out")
    recipe = T2IBenchRecipe.quick() if quick else T2IBenchRecipe()
    if paper_routing:
        recipe = replace(recipe, route_cross_attention=True)
    result = run_t2i_bench(out, recipe, base=base)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"whole text-to-image bench {result['seconds'] / 60:.1f} min; results in {out}")


def _bench_frontier(out: Path, quick: bool, base: str | None) -> None:
    """Print what the frontier will cost, run `diffcr.frontier.run_frontier` into `out`, print its table."""
    from diffcr.frontier import FrontierRecipe, run_frontier

    recipe = FrontierRecipe.quick() if quick else FrontierRecipe()
    typer.echo(
        _frontier_estimate("frontier", recipe, "FID's spread") + ("" if quick else "; about an hour on 2 CPU cores")
    )
    result = run_frontier(out, recipe, base=base)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"whole frontier {result['seconds'] / 60:.1f} min; results in {out}")


def _bench_t2i_frontier(out: Path | None, quick: bool, base: str, paper_routing: bool = False) -> None:
    """Print what the text-to-image frontier will cost, run `diffcr.t2i_frontier.run_t2i_frontier` into `out`,
    print its table."""
    import time
    from dataclasses import replace

    from diffcr.checkpoint import check_writable_dir
    from diffcr.t2i_frontier import T2IFrontierRecipe, run_t2i_frontier

    out = out or Path("runs") / time.strftime("frontier-t2i-%Y%m%d-%H%M%S")
    check_writable_dir(out, "--out")
    recipe = T2IFrontierRecipe.quick() if quick else T2IFrontierRecipe()
    if paper_routing:
        recipe = replace(recipe, route_cross_attention=True)
    typer.echo(
        _frontier_estimate("text-to-image frontier", recipe, "prompt accuracy's spread")
        + ("" if quick else "; several hours on 2 CPU cores (a 20-point run took over 90 minutes on one thread)")
    )
    result = run_t2i_frontier(out, recipe, base=base)
    typer.echo((out / "results.md").read_text())
    typer.echo(f"whole text-to-image frontier {result['seconds'] / 60:.1f} min; results in {out}")


def _frontier_estimate(name: str, recipe, spread_of: str) -> str:
    """One line of what a frontier recipe costs, in counts (`FrontierPlan.workload`)."""
    work = recipe.workload()
    return (
        f"{name}: {work['trainings']} trainings x {work['train_steps']} steps (batch {work['train_batch']}), then "
        f"{work['points']} points x {recipe.num_samples} images + {len(recipe.spread_seeds)} x {recipe.num_samples} "
        f"for {spread_of} = {work['images']} images ({work['image_steps']} image-steps before savings)"
    )
