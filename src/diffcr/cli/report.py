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
    classifier: Path = typer.Option(
        None, help="the classifier that judges samples (default: the shipped digit classifier; see train-classifier)"
    ),
    prompts: Path = typer.Option(None, help="text-to-image runs: prompts file (default: 4 captions of the cache)"),
    steps: int = typer.Option(20, help="text-to-image runs: sampler steps"),
    reference: Path = typer.Option(None, help="text-to-image runs: real images for FID"),
    features: str = typer.Option("inception", help="text-to-image runs: FID features, 'inception' or 'clip:PATH'"),
    clip: Path = typer.Option(None, help="text-to-image runs: a local CLIP model for the CLIP score"),
) -> None:
    """Write RUN_DIR/report/report.html (self-contained) and its PNGs; assesses the run first if needed."""
    import json

    import torch

    from diffcr.assess import assess, load_assessment, summary_table
    from diffcr.checkpoint import check_writable_dir
    from diffcr.cli.common import check_int
    from diffcr.data import load_dataset
    from diffcr.models.classifier import load_classifier
    from diffcr.report import build_report
    from diffcr.sampling import SampleConfig
    from diffcr.train import load_compressed

    check_int("--num", num, 1, 1000, "images per class for the assessment")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder; pass a compression run folder (`diffcr compress --out`)")
    run_file = run_dir / "run.json"
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a compression run (no run.json); pass a `diffcr compress` --out")
    try:
        run = json.loads(run_file.read_text())
        mode = run["train"]["mode"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{run_file} is damaged ({type(err).__name__}: {err}); rerun `diffcr compress`") from err
    if mode == "pretrain":
        raise ValueError(f"{run_dir} is a pretraining run; a report compares a compression run (`diffcr compress`)")
    if not (run_dir / "artifact" / "diffcr_weights.safetensors").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no finished artifact ({run_dir / 'artifact'}); finish the run (`diffcr compress "
            "--resume`) first"
        )
    check_writable_dir(out or run_dir / "report", "--out")
    torch.set_num_threads(2)
    from diffcr.t2i_report import is_text_to_image_run

    if is_text_to_image_run(run):
        path = report_text_to_image(run_dir, run, out, prompts, steps, reference, features, clip)
        typer.echo(f"report: {path}")
        return
    if not (run_dir / "assessment.json").is_file():
        judge = load_classifier(classifier)
        check_classifier_fits(judge, run.get("model_config") or {}, classifier)
        model_dir = run_dir / "model" if (run_dir / "model" / "config.json").is_file() else None
        routed = load_compressed(model_dir or run.get("base"), model_dir or run_dir / "artifact")
        dense = load_compressed(run.get("base"), None)
        model_config = run.get("model_config") or {}
        train_set, heldout = load_dataset(
            run.get("data"),
            image_size=model_config.get("sample_size", 32),
            channels=model_config.get("in_channels", 1),
        )
        assess(run_dir, dense, routed, judge, heldout, train_set, SampleConfig(batch_size=25), num)
    path = build_report(run_dir, out)
    typer.echo(summary_table(load_assessment(run_dir)))
    typer.echo(f"report: {path}")


def check_classifier_fits(judge, model_config: dict, classifier: Path | None) -> None:
    """Refuse to judge a run's images with a classifier made for other images (it would fail, or mean nothing)."""
    size = model_config.get("sample_size")
    made = (model_config.get("in_channels"), size, size)
    judged = tuple(judge.config.get(k) for k in ("in_channels", "image_size", "image_size"))
    if made != judged:
        which = f"the classifier in {classifier}" if classifier else "the shipped digit classifier"
        raise ValueError(
            f"{which} judges {judged[0]}x{judged[1]}x{judged[2]} images, but this run's model makes "
            f"{made[0]}x{made[1]}x{made[2]} images: train one on the run's data with "
            "`diffcr train-classifier --data DIR --out CLS` and pass --classifier CLS"
        )


def report_text_to_image(run_dir: Path, run: dict, out, prompts, steps: int, reference, features: str, clip) -> Path:
    """Evaluate a text-to-image run (unless done: RUN_DIR/evaluation) and write its report."""
    from diffcr.data.latent_cache import LatentCaptionDataset, resolve_pipeline_dtype
    from diffcr.t2i_assess import assess_text_to_image
    from diffcr.t2i_report import build_t2i_report, run_artifact, run_source
    from diffcr.text_to_image import PromptSampleConfig, read_prompts

    evaluation = run_dir / "evaluation"
    if not (evaluation / "t2i_assessment.json").is_file():
        cache = LatentCaptionDataset(run["data"])
        texts = read_prompts(None, prompts) if prompts else cache.captions(4)
        size = cache.manifest["resolution"]  # the size the run trained at
        cfg = PromptSampleConfig(steps=steps, num_per_prompt=2, batch_size=2, height=size, width=size)
        artifact = run_artifact(run_dir)
        # in bf16 on a GPU, fp32 on a CPU, as `diffcr evaluate --dtype auto`
        source = {**run_source(run), "torch_dtype": resolve_pipeline_dtype("auto")}
        assess_text_to_image(run["base"], artifact, texts, cfg, evaluation, reference, features, clip, source=source)
    return build_t2i_report(run_dir, evaluation, out)
