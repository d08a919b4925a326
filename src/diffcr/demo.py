"""The embedded default, end to end: compress the shipped DiT on the bundled digits, sample dense and DiffCR
from the same noise, measure speed and quality side by side, and write the report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRecipe:
    """The default recipe (see docs/RESULTS.md for how it was chosen)."""

    target_kept_ratio: float = 0.5
    timestep_regions: int = 4
    ratio_loss_weight: float = 0.3
    mode: str = "full"
    steps: int = 140
    minutes: float = 5.0
    batch_size: int = 32
    lr: float = 1e-4
    router_lr: float = 1e-3
    ratio_lr: float = 1e-2
    num_per_class: int = 10
    sample_batch_size: int = 25
    sampler_steps: int = 20
    guidance_scale: float = 3.0

    @classmethod
    def quick(cls) -> DemoRecipe:
        # a higher ratio lr so that the ratios reach the target within the shorter budget
        return cls(steps=50, minutes=1.5, num_per_class=5, ratio_lr=3e-2)


def run_demo(
    out_dir: str | Path, recipe: DemoRecipe | None = None, base: str | None = None, progress: bool = True, seed: int = 0
) -> dict:
    """Run the whole demo into `out_dir`; returns {"assessment", "report", "seconds", "schedule"}."""
    import diffcr
    from diffcr.assess import assess
    from diffcr.data import load_dataset
    from diffcr.models import load_base_model
    from diffcr.models.classifier import load_classifier
    from diffcr.report import build_report
    from diffcr.sampling import SampleConfig
    from diffcr.training import TrainConfig, finish_compression, train

    recipe = recipe or DemoRecipe()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    torch.set_num_threads(2)
    train_set, heldout = load_dataset()
    classifier = load_classifier()
    dense = load_base_model(base)
    model = load_base_model(base)
    torch.manual_seed(seed)
    config = diffcr.DiffCRConfig(
        target_kept_ratio=recipe.target_kept_ratio,
        timestep_regions=recipe.timestep_regions,
        ratio_loss_weight=recipe.ratio_loss_weight,
    )
    cfg = TrainConfig(
        mode=recipe.mode,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        router_lr=recipe.router_lr,
        ratio_lr=recipe.ratio_lr,
        max_minutes=recipe.minutes,
        checkpoint_every=max(recipe.steps, 1),
        seed=seed,
    )
    result = train(
        out_dir,
        model,
        train_set,
        cfg,
        diffcr_config=config,
        progress=progress,
        run_info={"base": base or "default", "data": "mnist5k"},
    )
    finish_compression(result.model, out_dir, recipe.mode)
    sample_cfg = SampleConfig(
        scheduler="ddim",
        steps=recipe.sampler_steps,
        guidance_scale=recipe.guidance_scale,
        batch_size=recipe.sample_batch_size,
        seed=seed,
    )
    assessment = assess(
        out_dir,
        dense,
        result.model,
        classifier,
        heldout,
        train_set,
        sample_cfg,
        recipe.num_per_class,
        progress=progress,
    )
    report = build_report(out_dir)
    return {
        "assessment": assessment,
        "report": report,
        "seconds": time.perf_counter() - started,
        "schedule": diffcr.schedule(result.model),
        "train_steps": result.steps_done,
    }
