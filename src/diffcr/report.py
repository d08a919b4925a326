"""`diffcr report`: one self-contained HTML page (images embedded) plus the PNGs, for a compression run.

Reads the run directory: `run.json`, `metrics.jsonl`, `artifact/` or `model/`, and the assessment
(`assessment.json`, `dense.npz`, `diffcr.npz`) written by `diffcr.assess`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)


def _matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(kept_table: list[list[float]], region_bounds, path: Path) -> Path:
    """Heatmap of the kept ratio per layer (rows) and timestep region (columns)."""
    plt = _matplotlib()
    table = np.array(kept_table)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * table.shape[1], 0.9 + 0.4 * table.shape[0]))
    image = ax.imshow(table, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (row, col), value in np.ndenumerate(table):
        ax.text(col, row, f"{value:.1f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    from diffcr.api import Schedule

    labels = Schedule(kept_table, kept_table, list(region_bounds)).region_labels
    ax.set_xticks(range(table.shape[1]), labels, rotation=30)
    ax.set_yticks(range(table.shape[0]), [f"layer {i}" for i in range(table.shape[0])])
    ax.set_xlabel("timestep region (noisier to the right)")
    fig.colorbar(image, ax=ax, label="kept ratio")
    ax.set_title("learned kept ratio")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training_curves(metrics: list[dict], target: float, path: Path) -> Path:
    plt = _matplotlib()
    steps = [row["step"] for row in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(steps, [row["diffusion_loss"] for row in metrics], lw=0.8)
    axes[0].set_title("diffusion loss")
    axes[1].plot(steps, [row.get("ratio_loss", 0.0) for row in metrics], lw=0.8, color="tab:orange")
    axes[1].set_title("ratio loss")
    axes[1].set_yscale("log")
    axes[2].plot(steps, [row.get("mean_kept_ratio", 1.0) for row in metrics], lw=0.8, color="tab:green")
    axes[2].axhline(target, ls="--", color="gray", label=f"target {target}")
    axes[2].set_title("mean kept ratio (training)")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def side_by_side(dense: np.ndarray, routed: np.ndarray, columns: int, path: Path) -> Path:
    """Two uint8 (n, H, W, C) sets as grids, dense left and DiffCR right."""
    from diffcr.sampling import image_grid, save_png

    def to_tensor(arrays):
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1

    left = image_grid(to_tensor(dense), columns)
    right = image_grid(to_tensor(routed), columns)
    gap = np.full((left.shape[0], 8, left.shape[2]), 255, np.uint8)
    save_png(path, np.concatenate([left, gap, right], axis=1))
    return path


def router_maps(
    model, labels: torch.Tensor, sample_cfg, path: Path, layers: list[int] | None = None, num_images: int = 4
) -> Path:
    """Which tokens each of a few layers computed at an early, a middle and a late sampling step, drawn over
    the final images (computed tokens bright, bypassed ones dimmed)."""
    import diffcr
    from diffcr.models.tiny_dit import null_class_id
    from diffcr.ratios import num_kept_tokens, timestep_region
    from diffcr.routing import select_tokens
    from diffcr.sampling import denoise, initial_noise, model_image_shape

    plt = _matplotlib()
    controller = model.diffcr
    sched = diffcr.schedule(model).kept_ratio
    if layers is None:
        routed_layers = [i for i, row in enumerate(sched) if min(row) < 1.0]
        layers = (routed_layers or list(range(len(sched))))[:4]
    steps = sorted({0, sample_cfg.steps // 2, sample_cfg.steps - 1})
    captured: dict[tuple[int, int], torch.Tensor] = {}
    current = {"step": -1, "timestep": 0}

    def on_step(step_idx, timestep):
        current.update(step=step_idx, timestep=timestep)

    hooks = []
    for layer in layers:

        def grab(module, args, kwargs, layer=layer):
            if current["step"] in steps:
                hidden = args[0] if args else kwargs["hidden_states"]
                captured[(current["step"], layer)] = hidden[:num_images].detach()

        hooks.append(model.transformer_blocks[layer].register_forward_pre_hook(grab, with_kwargs=True))
    noise = initial_noise(list(range(num_images)), model_image_shape(model), sample_cfg.seed + 10_000)
    try:
        images = denoise(model, noise, labels[:num_images], sample_cfg, null_class_id(model), step_callback=on_step)
    finally:
        for hook in hooks:
            hook.remove()
    timesteps = {}
    from diffcr.models.tiny_dit import build_scheduler

    scheduler = build_scheduler(sample_cfg.scheduler)
    scheduler.set_timesteps(sample_cfg.steps)
    for step in steps:
        timesteps[step] = int(scheduler.timesteps[step])
    side = int(round((captured[(steps[0], layers[0])].shape[1]) ** 0.5))
    fig, axes = plt.subplots(
        len(layers) * num_images, len(steps), figsize=(1.6 * len(steps) + 1.5, 1.6 * len(layers) * num_images)
    )
    axes = np.atleast_2d(axes)
    for li, layer in enumerate(layers):
        for step_pos, step in enumerate(steps):
            hidden = captured[(step, layer)]
            region = int(
                timestep_region(
                    torch.tensor([timesteps[step]]), controller.config.timestep_regions, controller.num_train_timesteps
                )[0]
            )
            kept = sched[layer][region]
            num_kept = num_kept_tokens(kept, hidden.shape[1])
            logits = controller.router_logits(layer, hidden)
            mask = torch.zeros(hidden.shape[:2])
            if 0 < num_kept < hidden.shape[1]:
                mask.scatter_(1, select_tokens(logits, num_kept), 1.0)
            elif num_kept == hidden.shape[1]:
                mask[:] = 1.0
            for i in range(num_images):
                ax = axes[li * num_images + i, step_pos]
                picture = (images[i, 0].numpy() + 1) / 2
                grid = mask[i].reshape(side, side).numpy()
                overlay = np.kron(grid, np.ones((picture.shape[0] // side, picture.shape[1] // side)))
                ax.imshow(picture * (0.25 + 0.75 * overlay), cmap="gray", vmin=0, vmax=1)
                ax.imshow(np.ma.masked_where(overlay > 0, overlay), cmap="autumn", alpha=0.25)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"layer {layer}, step {step}\n(t={timesteps[step]}, kept {kept:.1f})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _embed(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _markdown_table_to_html(table: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in table.strip().splitlines()]
    head, body = lines[0], lines[2:]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>"]
    for row in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `report.html` and its PNGs for a compression run that has been assessed. Returns the HTML path."""
    import diffcr
    from diffcr.assess import load_assessment, run_warnings, summary_table, training_facts
    from diffcr.sampling import SampleConfig
    from diffcr.train import load_compressed, read_metrics

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "run.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a compression run (no run.json)")
    run = json.loads((run_dir / "run.json").read_text())
    assessment = load_assessment(run_dir)
    model_dir = run_dir / "model" if (run_dir / "model" / "config.json").is_file() else None
    artifact = model_dir or run_dir / "artifact"
    model = load_compressed(model_dir or run.get("base"), artifact)
    sample_cfg = SampleConfig(**assessment["sampler"])
    sched = diffcr.schedule(model)

    dense = np.load(run_dir / "dense.npz")
    routed = np.load(run_dir / "diffcr.npz")
    labels = torch.from_numpy(routed["labels"])
    per_row = 10
    shown = min(len(labels), 40)
    figures = {
        "samples": side_by_side(dense["arr_0"][:shown], routed["arr_0"][:shown], per_row, out_dir / "samples.png"),
        "schedule": plot_schedule(sched.kept_ratio, sched.region_bounds, out_dir / "schedule.png"),
        "curves": plot_training_curves(
            read_metrics(run_dir), run["diffcr"]["target_kept_ratio"], out_dir / "training_curves.png"
        ),
        "router_maps": router_maps(model, labels, sample_cfg, out_dir / "router_maps.png"),
    }
    # an assessment written before the training facts were stored: take them from the run now
    assessment["training"] = assessment.get("training") or training_facts(run_dir)
    summary = summary_table(assessment, warnings=False)
    warnings = run_warnings(assessment)
    (out_dir / "summary.md").write_text(summary_table(assessment) + "\n")
    train = run["train"]
    facts = assessment["training"]
    steps_done = facts.get("steps_done", len(read_metrics(run_dir)))
    planned = facts.get("planned_steps", steps_done)
    steps_text = f"{steps_done} steps" if steps_done == planned else f"{steps_done} of {planned} planned steps"
    warning_html = "".join(f'<p class="warning">{html.escape(line)}</p>\n' for line in warnings)
    body = f"""<h1>DiffCR report: {html.escape(str(run_dir))}</h1>
{warning_html}<p>Mode <b>{html.escape(train["mode"])}</b>, {steps_text}, batch {train["batch_size"]},
target kept ratio {run["diffcr"]["target_kept_ratio"]}, {run["diffcr"]["timestep_regions"]} timestep regions,
gate {html.escape(run["diffcr"]["gate"])}. Sampler: {html.escape(sample_cfg.scheduler.upper())}
{sample_cfg.steps} steps, guidance {sample_cfg.guidance_scale}. Machine: {html.escape(str(assessment["machine"]))}.</p>
<h2>Summary</h2>
{_markdown_table_to_html(summary)}
<p>Speed is measured side by side: dense and DiffCR sample the same batches in alternation in one process;
the table gives the median time per batch of {sample_cfg.batch_size} images. FLOP-ideal counts the transformer
blocks (attention's quadratic term included) over the timesteps the sampler visits. FID is computed in the
feature space of the shipped digit classifier against the 500 held-out digits; the real floor is the FID of
{assessment["num_images"]} real training digits against the same held-out set.</p>
<h2>Dense (left) vs DiffCR (right), same noise</h2>
{_embed(figures["samples"])}
<h2>Learned schedule</h2>
{_embed(figures["schedule"])}
<pre>{html.escape(str(sched))}</pre>
<h2>Router maps</h2>
<p>Tokens each layer computed (bright) and bypassed (dimmed, tinted) at an early, a middle and a late sampling
step, drawn over the final images.</p>
{_embed(figures["router_maps"])}
<h2>Training curves</h2>
{_embed(figures["curves"])}
"""
    return write_page(out_dir / "report.html", f"diffcr report: {run_dir.name}", body)


PAGE_STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}
th{background:#f3f3f3}img{max-width:100%}pre{background:#f7f7f7;padding:8px}
.warning{background:#fff3cd;border:2px solid #c77c02;padding:8px 12px;font-weight:bold}"""


def write_page(path: Path, title: str, body: str) -> Path:
    """A self-contained HTML page (the report's style) written atomically to `path`."""
    page = (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
        f"<style>{PAGE_STYLE}</style></head><body>\n{body}</body></html>\n"
    )
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path
