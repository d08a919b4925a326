"""The embedded default, end to end: compress the shipped DiT on the bundled digits, sample dense and DiffCR
from the same noise, measure speed and quality side by side, and write the report.

The run is budgeted in training steps, not minutes, so that its result does not depend on the machine's speed:
a slow machine takes longer, it does not train less. Before training, `run_demo` times a probe step and a
probe sampling step and reports an estimate of the whole run (see `DemoEstimate`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRecipe:
    """The default recipe (see docs/RESULTS.md for how it was chosen).

    `steps` is the training budget: 120 steps at batch 16 take about 2 minutes on the 2-core CPU of
    docs/RESULTS.md, so that the whole demo stays under 10 minutes on a machine half as fast; the higher ratio lr
    brings the kept ratios to the target by about step 50, leaving the rest of the run to adapt to them.
    `minutes` is an optional time cap (None = no cap): a run it cuts short is flagged in the summary and the
    report, since its speed and quality are not those of the recipe.
    """

    target_kept_ratio: float = 0.5
    timestep_regions: int = 4
    ratio_loss_weight: float = 0.3
    mode: str = "full"
    steps: int = 120
    minutes: float | None = None
    batch_size: int = 16
    lr: float = 1e-4
    router_lr: float = 1e-3
    ratio_lr: float = 2e-2
    num_per_class: int = 10
    sample_batch_size: int = 25
    sampler_steps: int = 20
    guidance_scale: float = 3.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_per_class", "sample_batch_size", "sampler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise ValueError(f"minutes={self.minutes} must be a positive number of minutes (or None for no time cap)")

    @classmethod
    def quick(cls) -> DemoRecipe:
        # half the steps and samples; a higher ratio lr so that the ratios still reach the target in time
        return cls(steps=60, num_per_class=5, ratio_lr=4e-2)

    def train_config(self, seed: int = 0):
        """The `TrainConfig` of this recipe."""
        from diffcr.train import TrainConfig

        return TrainConfig(
            mode=self.mode,
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            router_lr=self.router_lr,
            ratio_lr=self.ratio_lr,
            max_minutes=self.minutes,
            checkpoint_every=self.steps,
            seed=seed,
        )

    def sample_config(self, seed: int = 0):
        """The `SampleConfig` both models sample with."""
        from diffcr.sampling import SampleConfig

        return SampleConfig(
            scheduler="ddim",
            steps=self.sampler_steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.sample_batch_size,
            seed=seed,
        )


# Sampling with DiffCR costs about this fraction of dense, plus `target_kept_ratio` times the rest (measured
# 0.56 of dense at a target of 0.5 for the shipped DiT on a 2-core CPU: embeddings and the sampler are not routed).
ROUTED_SAMPLING_FIXED_FRACTION = 0.2
# Sampler steps of dense-batch cost spent outside the timed batches: the two models' warm-up batches, the
# report's router maps, the FID features, loading and plotting (measured on the machine of docs/RESULTS.md).
OTHER_SAMPLER_STEPS = 12


@dataclass(frozen=True)
class DemoEstimate:
    """How long a demo should take on this machine, from one timed training step and sampling step."""

    steps: int
    seconds_per_step: float
    sampling_seconds: float
    other_seconds: float
    max_minutes: float | None = None

    @property
    def capped_at_step(self) -> int | None:
        """The step the `max_minutes` cap should stop training at, or None if it should not stop it."""
        if self.max_minutes is None or self.steps * self.seconds_per_step <= self.max_minutes * 60:
            return None
        return max(1, math.ceil(self.max_minutes * 60 / self.seconds_per_step))

    @property
    def train_seconds(self) -> float:
        return (self.capped_at_step or self.steps) * self.seconds_per_step

    @property
    def total_seconds(self) -> float:
        return self.train_seconds + self.sampling_seconds + self.other_seconds

    def describe(self) -> str:
        """Two or three lines for a person, e.g. "training 120 steps, about 1.8 min on this machine (0.90 s/step)"."""
        lines = [
            f"training {self.steps} steps, about {self.steps * self.seconds_per_step / 60:.1f} min on this machine "
            f"({self.seconds_per_step:.2f} s/step)"
        ]
        if self.capped_at_step is not None:
            lines.append(
                f"the --minutes {self.max_minutes:g} cap will stop training near step {self.capped_at_step} of "
                f"{self.steps}: the result will not be the recipe's (the summary will say so)"
            )
        lines.append(
            f"then sampling, measuring and the report, about {(self.sampling_seconds + self.other_seconds) / 60:.1f}"
            f" min; whole demo about {self.total_seconds / 60:.1f} min"
        )
        return "\n".join(lines)


def _probe_train_step(model, train_set, recipe: DemoRecipe, diffcr_config, seed: int) -> float:
    """Seconds of one training step of `recipe` on a copy of `model`: two steps into a scratch folder, the first
    untimed (allocator, kernels)."""
    from diffcr.train import train

    cfg = replace(recipe, steps=2, minutes=None).train_config(seed)
    with tempfile.TemporaryDirectory(prefix="diffcr-probe-") as scratch:
        train(Path(scratch) / "run", copy.deepcopy(model), train_set, cfg, diffcr_config=diffcr_config, progress=False)
        rows = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
    return rows[1]["seconds"] - rows[0]["seconds"]


def _probe_sampler_step(model, labels: torch.Tensor, sample_cfg) -> float:
    """Seconds of one sampler step of `model` on a full sampling batch (after one untimed step)."""
    from diffcr.models.tiny_dit import null_class_id
    from diffcr.sampling import denoise, initial_noise, model_image_shape

    idx = list(range(min(sample_cfg.batch_size, len(labels))))
    noise = initial_noise(idx, model_image_shape(model), sample_cfg.seed + 2_000_000)
    model.eval()
    denoise(model, noise, labels[idx], replace(sample_cfg, steps=1), null_class_id(model))
    begin = time.perf_counter()
    denoise(model, noise, labels[idx], replace(sample_cfg, steps=2), null_class_id(model))
    return (time.perf_counter() - begin) / 2


def estimate_demo(model, train_set, recipe: DemoRecipe, diffcr_config, num_classes: int, seed: int = 0):
    """Time one training step and one sampling step of `recipe` on this machine and estimate the whole demo.

    Args:
        model: the base model (not changed: the training probe runs on a copy).
        train_set: the training `ImageDataset`.
        recipe: the `DemoRecipe`.
        diffcr_config: the `DiffCRConfig` the demo trains with.
        num_classes: classes sampled (`recipe.num_per_class` images each).
        seed: the demo's seed.

    Returns:
        A `DemoEstimate`; `describe()` gives the lines to show.

    Example:
        >>> estimate = estimate_demo(load_base_model(None), train_set, DemoRecipe(), config, 10)  # doctest: +SKIP
        >>> print(estimate.describe())  # doctest: +SKIP
    """
    from diffcr.sampling import interleaved_class_labels

    seconds_per_step = _probe_train_step(model, train_set, recipe, diffcr_config, seed)
    sample_cfg = recipe.sample_config(seed)
    labels = interleaved_class_labels(list(range(num_classes)), recipe.num_per_class)
    sampler_step = _probe_sampler_step(model, labels, sample_cfg)
    batches = math.ceil(len(labels) / sample_cfg.batch_size)
    routed = ROUTED_SAMPLING_FIXED_FRACTION + (1 - ROUTED_SAMPLING_FIXED_FRACTION) * recipe.target_kept_ratio
    sampling = batches * sample_cfg.steps * sampler_step * (1 + routed)
    return DemoEstimate(
        steps=recipe.steps,
        seconds_per_step=seconds_per_step,
        sampling_seconds=sampling,
        other_seconds=OTHER_SAMPLER_STEPS * sampler_step,
        max_minutes=recipe.minutes,
    )


def run_demo(
    out_dir: str | Path,
    recipe: DemoRecipe | None = None,
    base: str | None = None,
    progress: bool = True,
    seed: int = 0,
    on_estimate: Callable[[DemoEstimate], None] | None = None,
) -> dict:
    """Run the whole demo into `out_dir`.

    Args:
        out_dir: the run directory (must not hold a run yet).
        recipe: the `DemoRecipe` (default `DemoRecipe()`).
        base: a diffusers folder for the base model (default: the shipped one).
        progress: show progress bars.
        seed: seed of training and sampling.
        on_estimate: called with the `DemoEstimate` before training (the CLI prints it); it is logged either way.

    Returns:
        {"assessment", "report", "seconds", "train_seconds", "schedule", "train_steps", "planned_steps",
        "estimate", "warnings"}; "warnings" lists what makes this run differ from its recipe (an early stop, a
        missed target), as the summary and the report show them.
    """
    import diffcr
    from diffcr.assess import assess, run_warnings
    from diffcr.data import load_dataset
    from diffcr.models import load_base_model
    from diffcr.models.classifier import load_classifier
    from diffcr.report import build_report
    from diffcr.train import finish_compression, train

    recipe = recipe or DemoRecipe()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    torch.set_num_threads(2)
    train_set, heldout = load_dataset()
    classifier = load_classifier()
    dense = load_base_model(base)
    model = load_base_model(base)
    config = diffcr.DiffCRConfig(
        target_kept_ratio=recipe.target_kept_ratio,
        timestep_regions=recipe.timestep_regions,
        ratio_loss_weight=recipe.ratio_loss_weight,
    )
    estimate = estimate_demo(dense, train_set, recipe, config, heldout.num_classes, seed)
    logger.info("demo estimate:\n%s", estimate.describe())
    if on_estimate is not None:
        on_estimate(estimate)
    torch.manual_seed(seed)
    result = train(
        out_dir,
        model,
        train_set,
        recipe.train_config(seed),
        diffcr_config=config,
        progress=progress,
        run_info={"base": base or "default", "data": "mnist5k"},
    )
    if result.steps_done < recipe.steps:
        logger.warning("training stopped at step %d of %d planned", result.steps_done, recipe.steps)
    finish_compression(result.model, out_dir, recipe.mode)
    assessment = assess(
        out_dir,
        dense,
        result.model,
        classifier,
        heldout,
        train_set,
        recipe.sample_config(seed),
        recipe.num_per_class,
        progress=progress,
    )
    report = build_report(out_dir)
    return {
        "assessment": assessment,
        "report": report,
        "seconds": time.perf_counter() - started,
        "train_seconds": result.seconds,
        "schedule": diffcr.schedule(result.model),
        "train_steps": result.steps_done,
        "planned_steps": recipe.steps,
        "estimate": estimate,
        "warnings": run_warnings(assessment.__dict__),
    }
