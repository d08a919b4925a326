"""The report of a text-to-image compression run: the assessment's figures, dense / DiffCR pairs with their
prompts, the learned schedule, router maps drawn over generated images, and the training curves, in one
self-contained HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import torch


def is_text_to_image_run(run: dict) -> bool:
    """Whether a run's `run.json` describes a compression of a PixArt pipeline on a prepared cache."""
    from diffcr.data.latent_cache import MANIFEST

    data = run.get("data")
    return bool(data) and (Path(str(data)) / MANIFEST).is_file()


def run_source(run: dict) -> dict:
    """Where a run's transformer came from, when not from its pipeline (`compress --transformer`)."""
    if not run.get("transformer"):
        return {}
    return {"transformer": run["transformer"], "transformer_subfolder": run.get("transformer_subfolder", "transformer")}


def run_artifact(run_dir: Path) -> Path:
    """The fine-tuned transformer folder (lora / full) or the artifact of routers and ratios (routers)."""
    model_dir = run_dir / "model"
    return model_dir if (model_dir / "config.json").is_file() else run_dir / "artifact"


def pipeline_router_maps(pipe, prompt: str, cfg, path: Path, layers: list[int] | None = None) -> Path:
    """Which image tokens a few layers computed (bright) or bypassed (dimmed) at an early, a middle and a late
    sampling step, drawn over the image the pipeline made for `prompt`."""
    import diffcr
    from diffcr.ratios import num_kept_tokens, timestep_region
    from diffcr.report import _matplotlib
    from diffcr.routing import select_tokens
    from diffcr.text_to_image import sample_prompts

    plt = _matplotlib()
    transformer = pipe.transformer
    controller = transformer.diffcr
    sched = diffcr.schedule(transformer).kept_ratio
    if layers is None:
        routed_layers = [i for i, row in enumerate(sched) if min(row) < 1.0]
        layers = (routed_layers or list(range(len(sched))))[:4]
    steps = sorted({0, cfg.steps // 2, cfg.steps - 1})
    calls = {"step": -1, "timestep": None}
    captured: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}

    def count_call(module, args, kwargs):
        calls["step"] += 1
        calls["timestep"] = float(torch.as_tensor(kwargs["timestep"]).flatten()[-1])

    def grab(module, args, kwargs, layer):
        if calls["step"] in steps:
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[(calls["step"], layer)] = (hidden[-1:].detach(), calls["timestep"])  # the conditional half

    hooks = [transformer.register_forward_pre_hook(count_call, with_kwargs=True)]
    from diffcr.adapters import get_adapter

    blocks = get_adapter(transformer).blocks(transformer)  # Flux: double-stream, then single-stream blocks
    for layer in layers:
        block = blocks[layer]
        hooks.append(
            block.register_forward_pre_hook(lambda m, a, k, layer=layer: grab(m, a, k, layer), with_kwargs=True)
        )
    try:
        image = sample_prompts(pipe, [prompt], cfg, indices=[0])[0]  # (H, W, 3) uint8
    finally:
        for hook in hooks:
            hook.remove()
    fig, axes = plt.subplots(len(layers), len(steps), figsize=(2.2 * len(steps), 2.2 * len(layers)), squeeze=False)
    for li, layer in enumerate(layers):
        for si, step in enumerate(steps):
            hidden, timestep = captured[(step, layer)]
            region = int(timestep_region(torch.tensor([timestep]), len(sched[0]), controller.num_train_timesteps)[0])
            kept = sched[layer][region]
            num_kept = num_kept_tokens(kept, hidden.shape[1])
            side = int(round(hidden.shape[1] ** 0.5))
            mask = torch.ones(hidden.shape[1]) if num_kept >= hidden.shape[1] else torch.zeros(hidden.shape[1])
            if 0 < num_kept < hidden.shape[1]:
                mask[select_tokens(controller.router_logits(layer, hidden), num_kept)[0]] = 1.0
            cell = image.shape[0] // side
            overlay = np.kron(mask.reshape(side, side).numpy(), np.ones((cell, cell)))[..., None]
            ax = axes[li, si]
            ax.imshow((image * (0.25 + 0.75 * overlay)).astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"layer {layer}, step {step}\n(t={timestep:.0f}, kept {kept:.1f})", fontsize=7)
    fig.suptitle(prompt[:60], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def t2i_run_warnings(figures: dict) -> list[str]:
    """The class demo's run warnings (`diffcr.assess.run_warnings`) for a text-to-image evaluation: training
    stopped before its planned steps, or the mean kept ratio is more than the tolerance from the target.

    Args:
        figures: the evaluation (`t2i_assessment.json`) with the run's "training" facts
            (`diffcr.assess.training_facts`); without them, no warning.

    Returns:
        Lines starting with "WARNING:".

    Example:
        >>> t2i_run_warnings({"mean_kept_ratio": 0.9, "training": {"planned_steps": 200, "steps_done": 200,
        ...                   "max_minutes": None, "target_kept_ratio": 0.5}})[0][:38]
        'WARNING: the schedule missed its targe'
    """
    from diffcr.assess import run_warnings

    return run_warnings(
        {"training": figures.get("training") or {}, "mean_kept_ratio_sampling": figures.get("mean_kept_ratio")}
    )


def build_t2i_report(run_dir: str | Path, evaluation_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `report.html` and its PNGs for an evaluated text-to-image run. Returns the HTML path."""
    import diffcr
    from diffcr.assess import training_facts
    from diffcr.data.latent_cache import pipeline_source
    from diffcr.report import _embed, plot_schedule, plot_training_curves, write_page
    from diffcr.text_to_image import PromptSampleConfig, load_pipeline
    from diffcr.train import read_metrics

    run_dir, evaluation_dir = Path(run_dir), Path(evaluation_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    run = json.loads((run_dir / "run.json").read_text())
    figures = json.loads((evaluation_dir / "t2i_assessment.json").read_text())
    figures["training"] = figures.get("training") or training_facts(run_dir)
    prompts = list(dict.fromkeys(np.load(evaluation_dir / "samples.npz")["prompts"].tolist()))  # in order, once
    pipe = load_pipeline(run["base"], run_artifact(run_dir), **run_source(run))
    sched = diffcr.schedule(pipe.transformer)
    size = int(np.load(evaluation_dir / "samples.npz")["dense"].shape[1])
    cfg = PromptSampleConfig(
        steps=figures["steps"], guidance_scale=figures["guidance_scale"], batch_size=1, height=size, width=size
    )
    pictures = {
        "schedule": plot_schedule(sched.kept_ratio, sched.region_bounds, out_dir / "schedule.png"),
        "curves": plot_training_curves(
            read_metrics(run_dir), run["diffcr"]["target_kept_ratio"], out_dir / "curves.png"
        ),
        "router_maps": pipeline_router_maps(pipe, prompts[0], cfg, out_dir / "router_maps.png"),
        "pairs": evaluation_dir / "pairs.png",
    }
    rows = [
        ("latency per image (s)", figures["latency_per_image_s"]["dense"], figures["latency_per_image_s"]["diffcr"]),
        ("measured speedup", 1.0, figures["speedup"]),
        *([("FLOP-ideal speedup", 1.0, figures["flop_ratio"])] if "flop_ratio" in figures else []),
        ("peak memory while sampling (MB)", *(figures["peak_memory_bytes"][k] / 2**20 for k in ("dense", "diffcr"))),
        ("mean kept ratio", 1.0, figures["mean_kept_ratio"]),
        ("PSNR / SSIM vs dense", "-", f"{figures['psnr_vs_dense_db']:.1f} dB / {figures['ssim_vs_dense']:.3f}"),
    ]
    for key, label in (("fid", f"FID ({figures.get('fid_features')}, {figures.get('num_reference')} reference)"),
                       ("clip_score", "CLIP score")):  # fmt: skip
        if key in figures:
            rows.append((label, figures[key]["dense"], figures[key]["diffcr"]))

    rows += _scene_rows(evaluation_dir)

    def cell(value) -> str:
        return html.escape(f"{value:.3f}" if isinstance(value, float) else str(value))

    table = "".join(f"<tr><td>{html.escape(name)}</td><td>{cell(a)}</td><td>{cell(b)}</td></tr>" for name, a, b in rows)
    train = run["train"]
    steps_done = len(read_metrics(run_dir))
    planned = figures["training"].get("planned_steps") or steps_done
    steps_text = f"{steps_done} steps" if steps_done >= planned else f"{steps_done} of {planned} planned steps"
    warning_html = "".join(f'<p class="warning">{html.escape(line)}</p>\n' for line in t2i_run_warnings(figures))
    source = pipeline_source(run["base"], run.get("transformer"))
    body = f"""<h1>DiffCR text-to-image report: {html.escape(str(run_dir))}</h1>
{warning_html}<p>Pipeline {html.escape(source)}, data {html.escape(str(run["data"]))}.
Mode <b>{html.escape(train["mode"])}</b>, {steps_text}, batch {train["batch_size"]},
target kept ratio {run["diffcr"]["target_kept_ratio"]}, {run["diffcr"]["timestep_regions"]} timestep regions.
{figures["num_images"]} images per model, {figures["steps"]} sampler steps, guidance {figures["guidance_scale"]},
dense and DiffCR batches alternating from the same seeds.</p>
<table><tr><th></th><th>dense</th><th>DiffCR</th></tr>{table}</table>
<h2>Dense | DiffCR, same noise (prompt under each pair)</h2>
{_embed(pictures["pairs"])}
<h2>Learned schedule</h2>
{_embed(pictures["schedule"])}
<pre>{html.escape(str(sched))}</pre>
<h2>Router maps</h2>
<p>Image tokens each layer computed (bright) and bypassed (dimmed) at an early, a middle and a late sampling step.</p>
{_embed(pictures["router_maps"])}
<h2>Training curves</h2>
{_embed(pictures["curves"])}
"""
    return write_page(out_dir / "report.html", f"diffcr report: {run_dir.name}", body)


def _scene_rows(evaluation_dir: Path) -> list[tuple]:
    """The digit-scene judge's rows (`diffcr demo --task t2i`), when the evaluation has them."""
    path = evaluation_dir / "scene_judgement.json"
    if not path.is_file():
        return []
    judged = json.loads(path.read_text())
    dense, routed = judged["dense"], judged["diffcr"]

    def pct(value: float) -> str:
        return f"{value:.1%}"

    rows = [
        ("prompt accuracy: digits at their slot", *(pct(d["accuracy"]["digit_accuracy"]) for d in (dense, routed))),
        ("prompt accuracy: empty slots empty", *(pct(d["accuracy"]["empty_accuracy"]) for d in (dense, routed))),
        ("prompt accuracy: whole image right", *(pct(d["accuracy"]["image_accuracy"]) for d in (dense, routed))),
    ]
    for kind, part in dense["accuracy"]["by_kind"].items():
        other = routed["accuracy"]["by_kind"][kind]
        rows.append((f"digits right, {kind} prompts", pct(part["digit_accuracy"]), pct(other["digit_accuracy"])))
    rows.append((f"feature FID vs {judged['num_reference']} held-out scenes", dense["fid"], routed["fid"]))
    strokes = judged.get("router_strokes")
    if strokes:
        rows.append(
            (
                "computed tokens on digit strokes (chance)",
                "-",
                f"{pct(strokes['on_stroke'])} ({pct(strokes['chance'])})",
            )
        )
    return rows
