"""Assess a compressed model against its dense base: sample both from the same noise with their batches
interleaved (so the latency ratio is measured side by side), then score quality and count FLOPs.

Writes `assessment.json`, `dense.npz` and `diffcr.npz` into the run directory; `diffcr report` reads them.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass
class Assessment:
    num_images: int
    sampler: dict
    dense_seconds_per_batch: float
    diffcr_seconds_per_batch: float
    speedup: float
    flop_ratio: float
    mean_kept_ratio_sampling: float
    dense: dict
    diffcr: dict
    real_fid_floor: float
    classifier_heldout_accuracy: float | None
    machine: dict
    schedule: list[list[float]] = field(default_factory=list)
    # facts of the training run (see `training_facts`) and the warnings they give (see `run_warnings`)
    training: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def sampling_flops(model, sample_cfg, num_tokens: int) -> tuple[float, float]:
    """(FLOPs per image of the whole sampling run, mean kept ratio over its steps) for a routed model's
    frozen schedule, following the timesteps the sampler actually visits (dense if not routed)."""
    import diffcr
    from diffcr.benchmark import model_flops
    from diffcr.models.tiny_dit import build_scheduler
    from diffcr.ratios import timestep_region

    scheduler = build_scheduler(sample_cfg.scheduler)
    scheduler.set_timesteps(sample_cfg.steps)
    passes = 2 if sample_cfg.guidance_scale != 1.0 else 1
    if not diffcr.is_applied(model):
        return passes * sample_cfg.steps * model_flops(model, num_tokens), 1.0
    sched = diffcr.schedule(model).kept_ratio
    controller = model.diffcr
    regions = timestep_region(
        scheduler.timesteps, controller.config.timestep_regions, controller.num_train_timesteps
    ).tolist()
    total, kept = 0.0, []
    for region in regions:
        column = [row[region] for row in sched]
        total += passes * model_flops(model, num_tokens, column)
        kept.append(sum(column) / len(column))
    return total, sum(kept) / len(kept)


def assess(
    run_dir: str | Path,
    dense_model,
    routed_model,
    classifier,
    heldout,
    train_set,
    sample_cfg,
    num_per_class: int,
    classes: list[int] | None = None,
    progress: bool = True,
) -> Assessment:
    """Sample `num_per_class` images per class with both models, interleaving their batches, and score them."""
    from tqdm.auto import tqdm

    import diffcr
    from diffcr.benchmark import machine_description
    from diffcr.evaluation import evaluate_samples, real_fid_floor
    from diffcr.models.tiny_dit import null_class_id
    from diffcr.sampling import denoise, initial_noise, interleaved_class_labels, model_image_shape, save_npz

    run_dir = Path(run_dir)
    classes = classes or list(range(heldout.num_classes))
    # every batch holds a mix of classes (same images either way: seeds follow the index)
    labels = interleaved_class_labels(classes, num_per_class)
    null_class = null_class_id(dense_model)
    shape = model_image_shape(dense_model)
    dense_model.eval()
    routed_model.eval()
    images = {"dense": [], "diffcr": []}
    seconds = {"dense": [], "diffcr": []}
    # one untimed batch each first (allocator, kernels, caches), then alternate which model goes first
    warm_idx = list(range(min(sample_cfg.batch_size, len(labels))))
    warm_noise = initial_noise(warm_idx, shape, sample_cfg.seed + 1_000_000)
    warm_cfg = replace(sample_cfg, steps=2)
    for model in (dense_model, routed_model):
        denoise(model, warm_noise, labels[warm_idx], warm_cfg, null_class)
    bar = tqdm(total=2 * len(labels), desc="sampling dense + DiffCR", disable=not progress, unit="img")
    contestants = [("dense", dense_model), ("diffcr", routed_model)]
    for batch_idx, start in enumerate(range(0, len(labels), sample_cfg.batch_size)):
        idx = list(range(start, min(start + sample_cfg.batch_size, len(labels))))
        noise = initial_noise(idx, shape, sample_cfg.seed)
        for name, model in contestants if batch_idx % 2 == 0 else contestants[::-1]:
            begin = time.perf_counter()
            images[name].append(denoise(model, noise, labels[idx], sample_cfg, null_class))
            seconds[name].append(time.perf_counter() - begin)
            bar.update(len(idx))
    bar.close()
    dense_images = torch.cat(images["dense"])
    routed_images = torch.cat(images["diffcr"])
    save_npz(run_dir / "dense.npz", dense_images, labels)
    save_npz(run_dir / "diffcr.npz", routed_images, labels)
    full_batches = [i for i in range(len(seconds["dense"])) if i < len(labels) // sample_cfg.batch_size] or list(
        range(len(seconds["dense"]))
    )
    dense_s = statistics.median(seconds["dense"][i] for i in full_batches)
    routed_s = statistics.median(seconds["diffcr"][i] for i in full_batches)
    num_tokens = (shape[1] // dense_model.config.patch_size) ** 2
    dense_flops, _ = sampling_flops(dense_model, sample_cfg, num_tokens)
    routed_flops, mean_kept = sampling_flops(routed_model, sample_cfg, num_tokens)
    dense_quality = evaluate_samples(classifier, dense_images, labels, heldout.images)
    routed_quality = evaluate_samples(classifier, routed_images, labels, heldout.images, dense_images)
    classifier_meta = getattr(classifier, "card", {}) or {}
    result = Assessment(
        num_images=len(labels),
        sampler=asdict(sample_cfg),
        dense_seconds_per_batch=dense_s,
        diffcr_seconds_per_batch=routed_s,
        speedup=dense_s / routed_s,
        flop_ratio=dense_flops / routed_flops,
        mean_kept_ratio_sampling=mean_kept,
        dense=asdict(dense_quality),
        diffcr=asdict(routed_quality),
        real_fid_floor=real_fid_floor(classifier, train_set.images, heldout.images, len(labels)),
        classifier_heldout_accuracy=classifier_meta.get("heldout_accuracy"),
        machine=machine_description(),
        schedule=diffcr.schedule(routed_model).kept_ratio if diffcr.is_applied(routed_model) else [],
        training=training_facts(run_dir),
    )
    result.warnings = run_warnings(asdict(result))
    for line in result.warnings:
        logger.warning(line)
    (run_dir / "assessment.json").write_text(result.to_json())
    return result


def load_assessment(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "assessment.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `diffcr demo` or assess the run first")
    return json.loads(path.read_text())


# how far the mean kept ratio while sampling may be from the target before a run is flagged
KEPT_RATIO_TOLERANCE = 0.03


def training_facts(run_dir: str | Path) -> dict:
    """What a run's training planned and did, from its `run.json` and `metrics.jsonl` ({} if it has none).

    Returns:
        {"planned_steps", "steps_done", "max_minutes", "train_seconds", "target_kept_ratio"} (the target is
        None for a dense run).
    """
    from diffcr.train import read_metrics

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        return {}
    run = json.loads((run_dir / "run.json").read_text())
    metrics = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    train = run.get("train") or {}
    return {
        "planned_steps": train.get("steps"),
        "steps_done": metrics[-1]["step"] if metrics else 0,
        "max_minutes": train.get("max_minutes"),
        "train_seconds": metrics[-1].get("seconds") if metrics else 0.0,
        "target_kept_ratio": (run.get("diffcr") or {}).get("target_kept_ratio"),
    }


def run_warnings(assessment: dict) -> list[str]:
    """The ways a run differs from what it planned, one line each (empty when it did what it planned):
    training stopped before its planned steps, or the mean kept ratio while sampling is more than
    `KEPT_RATIO_TOLERANCE` from the target.

    Args:
        assessment: an assessment as a dict (`assessment.json`); its "training" facts come from `training_facts`.

    Returns:
        Lines starting with "WARNING:", saying what happened and what it means.

    Example:
        >>> run_warnings({"training": {"planned_steps": 140, "steps_done": 62, "max_minutes": 5,
        ...               "target_kept_ratio": 0.5}, "mean_kept_ratio_sampling": 0.6})[0][:44]
        'WARNING: training stopped at step 62 of 140 '
    """
    facts = assessment.get("training") or {}
    lines = []
    planned, done = facts.get("planned_steps"), facts.get("steps_done")
    if planned is not None and done is not None and done < planned:
        cap = facts.get("max_minutes")
        if cap is not None:
            why, fix = f"the --minutes {cap:g} time cap", "rerun without --minutes"
        else:
            why, fix = "interrupted", "resume it (--resume) or rerun it"
        lines.append(
            f"WARNING: training stopped at step {done} of {planned} planned ({why}): the model is under-trained, "
            f"so the speed and quality measured here are not those of its recipe; {fix}"
        )
    target, kept = facts.get("target_kept_ratio"), assessment.get("mean_kept_ratio_sampling")
    if target is not None and kept is not None and abs(kept - target) > KEPT_RATIO_TOLERANCE:
        direction = "less" if kept > target else "more"
        lines.append(
            f"WARNING: the schedule missed its target: mean kept ratio while sampling {kept:.3f} vs target "
            f"{target:.3f} (tolerance {KEPT_RATIO_TOLERANCE}); the model is {direction} compressed than asked, "
            "so its speedup and quality are not those of the target; train longer (more steps)"
        )
    return lines


def summary_table(assessment: dict, warnings: bool = True) -> str:
    """The demo's summary as a Markdown table, followed (after a blank line) by the run's warnings, if any,
    unless `warnings` is False."""
    dense, routed = assessment["dense"], assessment["diffcr"]
    rows = [
        "| | dense | DiffCR |",
        "|---|---|---|",
        f"| sampling time per batch (s, median) | {assessment['dense_seconds_per_batch']:.2f} | "
        f"{assessment['diffcr_seconds_per_batch']:.2f} |",
        f"| measured speedup | 1.00x | {assessment['speedup']:.2f}x |",
        f"| FLOP-ideal speedup | 1.00x | {assessment['flop_ratio']:.2f}x |",
        f"| mean kept ratio while sampling | 1.00 | {assessment['mean_kept_ratio_sampling']:.2f} |",
        f"| classifier accuracy ({assessment['num_images']} samples) | {dense['accuracy']:.1%} | "
        f"{routed['accuracy']:.1%} |",
        f"| feature FID vs held-out (real floor {assessment['real_fid_floor']:.2f}) | {dense['fid']:.2f} | "
        f"{routed['fid']:.2f} |",
        f"| PSNR / SSIM vs dense, same noise | - | {routed['psnr_vs_dense']:.1f} dB / {routed['ssim_vs_dense']:.3f} |",
    ]
    flagged = run_warnings(assessment) if warnings else []
    return "\n".join(rows + ([""] + flagged if flagged else []))
