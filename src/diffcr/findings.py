"""The paper's findings, measured in miniature on trained DiffCR models: does the mean kept ratio reach its
target, do layers and timestep regions learn different ratios, and do routers spend compute on content."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class Convergence:
    run: str
    target: float
    final_train_kept_ratio: float
    train_gap: float
    frozen_kept_ratio: float
    frozen_gap: float


def ratio_convergence(run_dir: str | Path, model, last: int = 5) -> Convergence:
    """Target vs the mean kept ratio of the last `last` training steps (continuous ratios) and vs the
    frozen (snapped) schedule that sampling runs."""
    import diffcr
    from diffcr.train import read_metrics

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    target = float(info["diffcr"]["target_kept_ratio"])
    metrics = [row for row in read_metrics(run_dir) if "mean_kept_ratio" in row]
    if not metrics:
        raise ValueError(f"{run_dir}/metrics.jsonl has no mean_kept_ratio: not a DiffCR training run")
    tail = [row["mean_kept_ratio"] for row in metrics[-last:]]
    final = sum(tail) / len(tail)
    frozen = diffcr.schedule(model).mean_kept_ratio
    return Convergence(run_dir.name, target, final, final - target, frozen, frozen - target)


def layer_ratios(model) -> list[float]:
    """Mean kept ratio of each layer over the timestep regions (frozen schedule)."""
    import diffcr

    return [sum(row) / len(row) for row in diffcr.schedule(model).kept_ratio]


def region_ratios(model) -> list[tuple[tuple[int, int], float]]:
    """[((t_start, t_end), mean kept ratio over layers)] per timestep region (frozen schedule)."""
    import diffcr

    sched = diffcr.schedule(model)
    columns = list(zip(*sched.kept_ratio))
    return [(bounds, sum(col) / len(col)) for bounds, col in zip(sched.region_bounds, columns)]


def stroke_tokens(images: torch.Tensor, patch_size: int, threshold: float = 0.0) -> torch.Tensor:
    """(B, N) bool: the patch tokens of images (B, 1, H, W) in [-1, 1] that touch a stroke (any pixel
    brighter than `threshold`; the background is -1)."""
    pooled = torch.nn.functional.max_pool2d(images[:, :1], patch_size)  # (B, 1, H/p, W/p)
    return (pooled > threshold).flatten(1)  # (B, N)


@dataclass
class StrokeAlignment:
    """Per routed layer: the fraction of computed tokens that lie on strokes, and chance (the stroke
    fraction of all tokens when that layer routed), pooled over images and sampling steps."""

    layers: list[int]
    on_stroke: list[float]
    chance: list[float]
    by_phase: dict[str, tuple[float, float]]

    @property
    def lift(self) -> list[float]:
        return [a / c if c else float("nan") for a, c in zip(self.on_stroke, self.chance)]


def computed_token_masks(
    model, labels: torch.Tensor, sample_cfg, seed_offset: int = 20_000
) -> tuple[torch.Tensor, list[tuple[int, int, torch.Tensor]]]:
    """Sample `labels` with a routed model and record, at every step and routed block, which tokens the block
    computed (rebuilt from the router logits the forward itself used, so random routing is covered too).

    Returns:
        images: (B, C, H, W) in [-1, 1];
        computed: [(step, layer, (B, N) bool)] for the conditional half of the CFG batch.
    """
    import diffcr
    from diffcr.models.tiny_dit import null_class_id
    from diffcr.ratios import num_kept_tokens, timestep_region
    from diffcr.routing import select_tokens
    from diffcr.sampling import denoise, initial_noise, model_image_shape

    controller = model.diffcr
    sched = diffcr.schedule(model).kept_ratio
    batch = len(labels)
    current = {"step": -1, "region": 0}
    computed: list[tuple[int, int, torch.Tensor]] = []
    original = controller.router_logits
    replaced = "router_logits" in vars(controller)  # e.g. random routing's scorer

    def recording(layer: int, tokens: torch.Tensor) -> torch.Tensor:
        logits = original(layer, tokens)  # (2B or B, N)
        num_kept = num_kept_tokens(sched[layer][current["region"]], logits.shape[1])
        mask = torch.zeros(logits.shape, dtype=torch.bool)
        mask.scatter_(1, select_tokens(logits.detach().cpu(), num_kept), True)
        computed.append((current["step"], layer, mask[:batch]))
        return logits

    def on_step(step_idx: int, timestep: int) -> None:
        region = timestep_region(
            torch.tensor([timestep]), controller.config.timestep_regions, controller.num_train_timesteps
        )
        current.update(step=step_idx, region=int(region[0]))

    noise = initial_noise(list(range(batch)), model_image_shape(model), sample_cfg.seed + seed_offset)
    controller.router_logits = recording
    try:
        images = denoise(model, noise, labels, sample_cfg, null_class_id(model), step_callback=on_step)
    finally:
        del controller.router_logits
        if replaced:
            controller.router_logits = original
    return images, computed


def stroke_alignment(model, labels: torch.Tensor, sample_cfg, seed_offset: int = 20_000) -> StrokeAlignment:
    """Which tokens each routed block computed while sampling `labels` (`computed_token_masks`), against the
    strokes of the final images."""
    images, computed = computed_token_masks(model, labels, sample_cfg, seed_offset)
    strokes = stroke_tokens(images, model.config.patch_size)  # (B, N)
    stroke_share = float(strokes.float().mean())  # chance: the same for every layer and phase
    layers = sorted({layer for _, layer, _ in computed})
    on_stroke = []
    phases = {"early (noisy)": [], "middle": [], "late (clean)": []}
    steps = sample_cfg.steps
    for layer in layers:
        masks = [(step, mask) for step, lay, mask in computed if lay == layer]
        hits = sum(int((mask & strokes).sum()) for _, mask in masks)
        total = sum(int(mask.sum()) for _, mask in masks)
        on_stroke.append(hits / total)
        for step, mask in masks:
            phase = list(phases)[min(2, 3 * step // steps)]
            phases[phase].append((int((mask & strokes).sum()), int(mask.sum())))
    by_phase = {
        phase: (sum(h for h, _ in pairs) / max(1, sum(t for _, t in pairs)), stroke_share)
        for phase, pairs in phases.items()
        if pairs
    }
    return StrokeAlignment(layers, on_stroke, [stroke_share] * len(layers), by_phase)
