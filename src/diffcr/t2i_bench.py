"""`diffcr bench --task t2i`: the class-conditional comparison (`diffcr.compare`) repeated on the text-to-image
default, with prompt accuracy as the quality axis.

Every method is tuned to target sampling speedups over dense, measured on this machine by timing whole pipeline
calls (`sample_prompts` on a fixed batch of prompts, interleaved with dense). The trained variants (DiffCR-LT,
DiffCR-L, uniform routing and dense fine-tuning) get the same budget of training steps on digit scenes. Then every
method samples the same evaluation prompts from the same seeds, batches interleaved across methods, and each image
is judged by what its prompt asked for (`diffcr.scene_judge.prompt_accuracy`), next to a feature FID against
held-out scenes. Writes `results.json`, `results.md` and `t2i_quality_vs_speedup.png`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from diffcr.compare import (
    DENSE,
    DENSE_TUNED,
    DIFFCR_L,
    DIFFCR_LT,
    FBCACHE,
    FEWER_STEPS,
    RANDOM,
    TOME,
    UNIFORM,
    Contestant,
    frozen_uniform,
)
from diffcr.models.scene_pipeline import PRETRAIN_SNR_GAMMA, PRETRAIN_SNR_WEIGHTING
from diffcr.t2i_demo import T2IDemoRecipe

logger = logging.getLogger(__name__)

PROMPT_KINDS = ("heldout", "seen", "single")
# DiffCR-LT trained as the text-to-image demo trains it: a kept-ratio target per timestep region, uncoupled
DIFFCR_LT_REGIONS = "DiffCR-LT, region targets"
PLOT_NAME = "t2i_quality_vs_speedup.png"
# a row whose measured speedup is further than this (relative) from its target is marked "missed" (as harness.py)
OFF_TARGET = 0.15


@dataclass(frozen=True)
class T2IBenchRecipe:
    """Sizes of the text-to-image comparison.

    Args:
        speedups: the target measured sampling speedups over dense.
        timestep_regions: DiffCR-LT's regions (the paper's text-to-image setting, 4); DiffCR-L has one.
        ratio_loss_weight: lambda, the demo's: fine-tuning weighs the diffusion loss as pretraining did (about 6x
            the plain MSE), so the class-conditional 0.3 would leave the kept ratios near 1.0.
        train_steps, train_batch: the budget every trained variant gets (the text-to-image demo's).
        lr, router_lr, ratio_lr, lr_schedule: the demo's learning rates and their schedule (a cosine decay to 0:
            at this budget constant rates diverge, docs/RESULTS.md).
        region_targets, region_ratio_loss_weight, region_targets_at: one more row, DiffCR-LT as the demo trains it
            (a kept-ratio target per timestep region, cleanest first, regions uncoupled, the demo's lambda), listed
            under the target speedup `region_targets_at`, which must be one of `speedups`. Its table is fixed, not
            tuned to the target, so the row runs at whatever speed the table gives (the demo's: about 1.6x). None
            leaves the row out.
        freeze_schedule_at: the demo's: the step after which the routed variants' kept ratios stay at their bins
            (`TrainConfig.freeze_schedule_at`; 0 = never); dense fine-tuning has none.
        route_cross_attention: the demo's: False gives the tokens a block bypasses its cross-attention update (a
            diffcr option, docs/METHOD.md section 1) in every routed method (DiffCR-LT, DiffCR-L, uniform and
            random routing) and in the probes that match their kept ratio to a speedup; True is the paper's routing.
        train_uniform: train uniform routing's routers at the same budget (its kept ratios stay fixed), as the
            class-conditional comparison does; False samples the untrained frozen-uniform model.
        sampler_steps, guidance_scale: the pipeline's sampler steps and CFG (PixArt's 20 and 4.5).
        sample_batch: prompts per pipeline call, in the contest and in the speed probes.
        num_prompts: how many of `evaluation_prompts()` to sample (None = all 50), picked across kinds.
        num_reference: held-out scenes the feature FID compares against.
        search_repeats, search_iterations: timing repeats per probe and bisection steps per knob.
        probe_steps: sampler steps of the probes for methods whose cost is the same at every step.
        fbcache_max_threshold: the first-block cache's largest relative-change threshold searched.
        num_threads: CPU threads for training and sampling (None = leave torch's setting).
    """

    speedups: tuple[float, ...] = (1.5, 2.0)
    timestep_regions: int = T2IDemoRecipe.timestep_regions
    # the one-target demo's lambda, which every bench figure in docs/RESULTS.md used: the bench trains one target
    # per contestant, and the demo's 4.0 is for its region targets
    ratio_loss_weight: float = 2.0
    region_targets: tuple[float, ...] | None = T2IDemoRecipe.region_targets
    region_ratio_loss_weight: float = T2IDemoRecipe.ratio_loss_weight
    region_targets_at: float = 1.5
    train_steps: int = T2IDemoRecipe.steps
    train_batch: int = T2IDemoRecipe.batch_size
    lr: float = T2IDemoRecipe.lr
    router_lr: float = T2IDemoRecipe.router_lr
    ratio_lr: float = T2IDemoRecipe.ratio_lr
    lr_schedule: str = T2IDemoRecipe.lr_schedule
    freeze_schedule_at: int = T2IDemoRecipe.freeze_schedule_at
    route_cross_attention: bool = T2IDemoRecipe.route_cross_attention
    train_uniform: bool = True
    sampler_steps: int = 20
    guidance_scale: float = 4.5
    sample_batch: int = 10
    num_prompts: int | None = None
    num_reference: int = 500
    search_repeats: int = 3
    search_iterations: int = 4
    probe_steps: int = 5
    fbcache_max_threshold: float = 1.0
    num_threads: int | None = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_steps", "train_batch", "sample_batch", "search_repeats", "probe_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.sampler_steps < 2:
            raise ValueError(f"sampler_steps={self.sampler_steps} must be >= 2 (the 'fewer steps' method needs fewer)")
        if self.num_reference < 2:
            raise ValueError(f"num_reference={self.num_reference} must be >= 2 (FID needs two images)")
        if not self.speedups or any(s <= 1.0 for s in self.speedups):
            raise ValueError(f"speedups={self.speedups} must be a non-empty list of targets above 1.0")
        if self.region_targets is not None:
            if self.region_targets_at not in self.speedups:
                raise ValueError(
                    f"region_targets_at={self.region_targets_at} is not one of speedups={self.speedups}: list the "
                    "region-targets row under one of the targets, or set region_targets=None to leave it out"
                )
            self.region_targets_config()  # the table is checked against the bins now, not after an hour
        self.train_config(dense=False)  # the training fields, checked now rather than after the tuning probes

    @classmethod
    def quick(cls) -> T2IBenchRecipe:
        """A smoke run: one target, a few training steps, 10 prompts at 4 sampler steps."""
        return cls(
            speedups=(1.5,),
            train_steps=4,
            freeze_schedule_at=2,
            train_batch=4,
            sampler_steps=4,
            sample_batch=5,
            num_prompts=10,
            num_reference=50,
            search_repeats=1,
            search_iterations=2,
            probe_steps=2,
        )

    def prompts(self) -> tuple[list[str], list[str]]:
        """(prompts, kinds) of the evaluation prompts to sample: all of them, or `num_prompts` taken in turn from
        each kind, so that a short run still holds every kind."""
        from diffcr.data.scenes import evaluation_prompts

        items = evaluation_prompts()
        if self.num_prompts is not None and self.num_prompts < len(items):
            by_kind = [[item for item in items if item[1] == kind] for kind in PROMPT_KINDS]
            interleaved = [group[i] for i in range(len(items)) for group in by_kind if i < len(group)]
            items = interleaved[: self.num_prompts]
        return [prompt for prompt, _ in items], [kind for _, kind in items]

    def sample_config(self, steps: int | None = None):
        """The `PromptSampleConfig` every method samples with (`steps` overrides the sampler steps)."""
        from diffcr.text_to_image import PromptSampleConfig

        return PromptSampleConfig(
            steps=steps or self.sampler_steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.sample_batch,
            seed=self.seed,
        )

    def region_targets_config(self):
        """The `DiffCRConfig` of the region-targets row: the demo's (`T2IDemoRecipe.diffcr_config`, so its bins
        and coupling follow the demo's) with this recipe's table, lambda and routing."""
        targets = tuple(self.region_targets)
        demo = replace(
            T2IDemoRecipe(),
            region_targets=targets,
            target_kept_ratio=sum(targets) / len(targets),
            timestep_regions=len(targets),
            ratio_loss_weight=self.region_ratio_loss_weight,
            route_cross_attention=self.route_cross_attention,
        )
        return demo.diffcr_config()

    def train_config(self, dense: bool, ratio_lr: float | None = None):
        """The `TrainConfig` of one trained variant: a full fine-tune with DiffCR, or a dense one ("pretrain")."""
        from diffcr.train import TrainConfig

        return TrainConfig(
            mode="pretrain" if dense else "full",
            steps=self.train_steps,
            batch_size=self.train_batch,
            lr=self.lr,
            router_lr=self.router_lr,
            ratio_lr=self.ratio_lr if ratio_lr is None else ratio_lr,
            checkpoint_every=self.train_steps,
            lr_schedule=self.lr_schedule,
            freeze_schedule_at=0 if dense else self.freeze_schedule_at,  # a dense run has no kept ratios
            seed=self.seed,
            num_threads=self.num_threads,
            snr_gamma=PRETRAIN_SNR_GAMMA,
            snr_weighting=PRETRAIN_SNR_WEIGHTING,
        )


@dataclass
class PromptContestant(Contestant):
    """A `compare.Contestant` that samples prompts through a text-to-image pipeline: `model` is the transformer
    put into the pipeline for its runs, `sample_cfg` a `PromptSampleConfig`."""

    def sample(self, pipe, prompts: list[str], indices=None) -> np.ndarray:
        """uint8 images (n, H, W, 3) of `prompts` (image i from seed `sample_cfg.seed + i`).

        Args:
            pipe: the pipeline; its transformer is replaced by this contestant's (the pipelines share one VAE
                and text encoder, so that no method pays for loading them).
            indices: which images of the run to make (default all).
        """
        from diffcr.caption_attention import use_short_caption_attention
        from diffcr.text_to_image import sample_prompts

        pipe.transformer = self.model
        # every method, dense included, samples through here: all time the same attention kernels
        use_short_caption_attention(self.model)
        with self.run_context():
            return sample_prompts(pipe, prompts, self.sample_cfg, indices=indices)


@dataclass
class T2IRow:
    """One method's measured speed and judged quality."""

    name: str
    method: str
    target_speedup: float | None
    knob: str
    steps: int
    seconds_per_batch: float
    speedup: float
    flop_speedup: float
    digit_accuracy: float | None
    empty_accuracy: float | None
    image_accuracy: float | None
    by_kind: dict
    fid: float
    psnr_vs_dense: float | None
    note: str = ""
    mean_kept_ratio: float | None = None
    timestep_regions: int | None = None
    schedule: list[list[float]] = field(default_factory=list)
    route_cross_attention: bool | None = None


# -- loading and training -------------------------------------------------------------------------------


def load_bench_pipeline(base: str | Path):
    """The text-to-image pipeline to compare on: "t2i" (the shipped default) or a folder in its layout (what
    `diffcr pretrain --task t2i` writes: transformer/ and vae/, the text encoder from its package), or a diffusers
    PixArt pipeline folder whose VAE takes the scenes' one gray channel.

    Raises:
        ValueError: the pipeline cannot render digit scenes (its VAE is not one-channel).
    """
    from diffcr.data.latent_cache import load_text_to_image_pipeline
    from diffcr.models.scene_pipeline import load_scene_pipeline

    folder = Path(str(base))
    if (
        str(base) != "t2i"
        and (folder / "transformer" / "config.json").is_file()
        and not (folder / "model_index.json").is_file()
    ):
        pipe = load_scene_pipeline(folder)
    else:
        pipe = load_text_to_image_pipeline(base)
    if pipe.vae.config.in_channels != 1:
        raise ValueError(
            f"the text-to-image bench trains and judges on digit scenes: --base {base} has a "
            f"{pipe.vae.config.in_channels}-channel VAE; use the default (t2i) or a `diffcr pretrain --task t2i` folder"
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.eval()
    return pipe


def train_t2i_variant(
    base, conditioning, run_dir: Path, recipe: T2IBenchRecipe, diffcr_config=None, ratio_lr=None, progress=False
):
    """Fine-tune a copy of the transformer `base` on digit scenes for the recipe's budget.

    Args:
        base: the dense transformer (left untouched).
        conditioning: a `SceneConditioning` over the training scenes.
        diffcr_config: the `DiffCRConfig` to train with; None fine-tunes the dense transformer.
        ratio_lr: overrides the recipe's (0 holds uniform routing's kept ratios fixed).

    Returns:
        The trained transformer in eval mode, its schedule frozen when routed.
    """
    import diffcr
    from diffcr.models.tiny_dit import build_scheduler
    from diffcr.train import train

    torch.manual_seed(recipe.seed)
    result = train(
        run_dir,
        copy.deepcopy(base),
        conditioning,
        recipe.train_config(dense=diffcr_config is None, ratio_lr=ratio_lr),
        diffcr_config=diffcr_config,
        scheduler=build_scheduler("ddpm"),
        progress=progress,
        run_info={"data": "digit-scenes", "task": "t2i-bench"},
    )
    if diffcr_config is not None:
        diffcr.freeze(result.model)
    return result.model.eval()


# -- matching speedups ----------------------------------------------------------------------------------


class PipelineSpeedupSearch:
    """Finds, per method, the knob whose measured speedup over dense is closest to a target, like
    `compare.SpeedupSearch`, but timing whole pipeline calls of a fixed batch of prompts (text encoding and VAE
    decoding included, as a user's latency would). Measurements are cached per method, so targets share probes.

    Args:
        pipe: the pipeline the contestants sample through.
        dense: the dense contestant.
        prompts: the fixed probe batch.
    """

    def __init__(self, pipe, dense: PromptContestant, prompts: list[str], recipe: T2IBenchRecipe):
        self.pipe = pipe
        self.dense = dense
        self.prompts = prompts
        self.recipe = recipe
        self._cache: dict[str, dict[float, float]] = {}

    def latency(self, contestants: dict[str, PromptContestant], warmup: int = 1) -> dict[str, float]:
        """Median seconds of one call per contestant on the probe batch, calls interleaved."""
        from diffcr.benchmark import time_alternating

        fns = {name: (lambda c=c: c.sample(self.pipe, self.prompts)) for name, c in contestants.items()}
        return time_alternating(fns, repeats=self.recipe.search_repeats, warmup=warmup)

    def speedup(self, method: str, make: Callable[[float], PromptContestant], knob: float, full_steps: bool) -> float:
        """Measured speedup of `make(knob)` over dense.

        Args:
            full_steps: keep each contestant's own sampler steps; False runs both at `probe_steps` (cheaper, and
                the same ratio for methods whose cost is the same at every step).
        """
        cache = self._cache.setdefault(method, {})
        if knob not in cache:
            pair = {"dense": self.dense, "probe": make(knob)}
            if not full_steps:
                pair = {
                    name: replace(c, sample_cfg=replace(c.sample_cfg, steps=self.recipe.probe_steps))
                    for name, c in pair.items()
                }
            seconds = self.latency(pair)
            cache[knob] = seconds["dense"] / seconds["probe"]
            logger.info("%s knob %.3f: %.2fx", method, knob, cache[knob])
        return cache[knob]

    def match(
        self, method, make, target: float, low: float, high: float, full_steps: bool = False
    ) -> tuple[float, float]:
        """(knob, its measured speedup) closest to `target` in [low, high]; the speedup must grow with the knob."""
        from diffcr.benchmark import match_knob

        return match_knob(
            lambda knob: self.speedup(method, make, knob, full_steps), target, low, high, self.recipe.search_iterations
        )


def match_kept_ratio(
    search: PipelineSpeedupSearch, dense_model, target: float, route_cross_attention: bool = True
) -> tuple[float, float]:
    """The uniform kept ratio whose frozen routing reaches `target`: the kept ratio DiffCR trains towards.

    Speed depends on how many tokens run, not on which, so untrained routers serve the probes. A bigger knob
    must be faster, hence the search runs over -kept. `route_cross_attention` as in the routed methods: with
    False, bypassed tokens' cross-attention is part of the cost.
    """

    def make(negative_kept: float) -> PromptContestant:
        model = frozen_uniform(dense_model, round(-negative_kept, 3), route_cross_attention=route_cross_attention)
        return PromptContestant(UNIFORM, None, "", model, search.dense.sample_cfg)

    negative_kept, speedup = search.match("kept ratio", make, target, -0.95, -0.1)
    return round(-negative_kept, 3), speedup


@dataclass(frozen=True)
class StepLatency:
    """Seconds of one pipeline call as an affine function of the sampler steps: the text encoding and the VAE
    decoding are paid once per call, the transformer once per step, so halving the steps does not halve latency."""

    fixed_seconds: float
    seconds_per_step: float
    full_steps: int

    def steps_for(self, target: float) -> int:
        """The sampler steps whose predicted speedup over `full_steps` is closest to `target`, always fewer."""
        if self.seconds_per_step <= 0:  # a noisy probe: fall back to latency proportional to steps
            steps = round(self.full_steps / target)
        else:
            full = self.fixed_seconds + self.full_steps * self.seconds_per_step
            steps = round((full / target - self.fixed_seconds) / self.seconds_per_step)
        return int(min(self.full_steps - 1, max(1, steps)))


def measure_step_latency(search: PipelineSpeedupSearch) -> StepLatency:
    """Time the probe batch at the full sampler steps and at one step, interleaved, and fit `StepLatency`."""
    full_steps = search.dense.sample_cfg.steps
    one = replace(search.dense, sample_cfg=replace(search.dense.sample_cfg, steps=1))
    seconds = search.latency({"full": search.dense, "one": one})
    per_step = (seconds["full"] - seconds["one"]) / (full_steps - 1)
    return StepLatency(seconds["one"] - per_step, per_step, full_steps)


# -- the contestants ------------------------------------------------------------------------------------


@dataclass
class Lineup:
    """Everything that samples in the contest, and what was learned while preparing it."""

    contestants: list[PromptContestant]
    skipped: list[dict] = field(default_factory=list)
    uniform_knobs: dict[float, float] = field(default_factory=dict)
    fbcache_knobs: dict[float, float] = field(default_factory=dict)
    step_latency: StepLatency | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def check_tome(dense_model) -> str | None:
    """Why ToMe cannot run on this transformer, or None when it can."""
    from diffcr.baselines import apply_tome

    try:
        apply_tome(copy.deepcopy(dense_model), 0.5)
    except (ImportError, TypeError, ValueError) as err:
        return f"{err}: tomesd patches DiT-style blocks, and PixArt's adaLN-single blocks are not among them"
    return None


def check_fbcache(dense_model) -> str | None:
    """Why diffusers' first-block cache cannot attach to this transformer, or None when it can."""
    from diffcr.baselines import FirstBlockCache

    try:
        FirstBlockCache(copy.deepcopy(dense_model), 0.1)
    except (ImportError, TypeError, ValueError, AttributeError) as err:
        return f"diffusers' first-block cache does not attach here: {err}"
    return None


def prepare_lineup(
    pipe, conditioning, search: PipelineSpeedupSearch, recipe: T2IBenchRecipe, trained_dir: Path, progress: bool
) -> Lineup:
    """Tune every knob to every target, train the variants that learn, and line everyone up, dense first."""
    import diffcr
    from diffcr.baselines import FirstBlockCache, randomize_routers, uniform_config

    dense_model = search.dense.model
    sample_cfg = search.dense.sample_cfg
    lineup = Lineup([search.dense])
    timer = _PhaseTimer(lineup.seconds)

    def fbcache(threshold: float) -> PromptContestant:
        cache = FirstBlockCache(copy.deepcopy(dense_model), threshold)
        return PromptContestant(
            FBCACHE, None, f"threshold {threshold:.3f}", cache.model, sample_cfg, cache.sampling_run
        )

    tome_problem, fbcache_problem = check_tome(dense_model), check_fbcache(dense_model)
    if tome_problem:
        lineup.skipped.append({"method": TOME, "reason": tome_problem})
    if fbcache_problem:
        lineup.skipped.append({"method": FBCACHE, "reason": fbcache_problem})
    with timer("tuning"):
        lineup.step_latency = measure_step_latency(search)
    with timer("training"):
        logger.info("training the dense fine-tuning reference")
        tuned = train_t2i_variant(dense_model, conditioning, trained_dir / "dense-tuned", recipe, progress=progress)
    lineup.contestants.append(
        PromptContestant(DENSE_TUNED, None, f"{recipe.train_steps} steps fine-tuned", tuned, sample_cfg)
    )
    for target in recipe.speedups:
        with timer("tuning"):
            kept, _ = match_kept_ratio(search, dense_model, target, recipe.route_cross_attention)
        lineup.uniform_knobs[target] = kept
        config = diffcr.DiffCRConfig(
            target_kept_ratio=kept,
            timestep_regions=recipe.timestep_regions,
            ratio_loss_weight=recipe.ratio_loss_weight,
            route_cross_attention=recipe.route_cross_attention,
        )
        variants = {DIFFCR_LT: (config, None), DIFFCR_L: (config.replace(timestep_regions=1), None)}
        if recipe.train_uniform:
            # ratio_lr 0: only the routers learn
            uniform = uniform_config(kept, route_cross_attention=recipe.route_cross_attention)
            variants[UNIFORM] = (uniform, 0.0)
        trained = {}
        for method, (method_config, ratio_lr) in variants.items():
            tag = f"{method.split()[0]}-{target:g}x"
            logger.info("training %s (target kept %.2f)", tag, kept)
            with timer("training"):
                trained[method] = train_t2i_variant(
                    dense_model, conditioning, trained_dir / tag, recipe, method_config, ratio_lr, progress
                )
            lineup.contestants.append(
                PromptContestant(method, target, f"target kept {kept:.2f}", trained[method], sample_cfg)
            )
        if recipe.region_targets is not None and target == recipe.region_targets_at:
            table = _table_text(recipe.region_targets)
            logger.info("training %s (region targets %s)", DIFFCR_LT_REGIONS, table)
            with timer("training"):
                model = train_t2i_variant(
                    dense_model,
                    conditioning,
                    trained_dir / f"DiffCR-LT-regions-{target:g}x",
                    recipe,
                    recipe.region_targets_config(),
                    progress=progress,
                )
            lineup.contestants.append(
                PromptContestant(DIFFCR_LT_REGIONS, target, f"region targets {table}", model, sample_cfg)
            )
        if not recipe.train_uniform:
            model = frozen_uniform(dense_model, kept, route_cross_attention=recipe.route_cross_attention)
            lineup.contestants.append(
                PromptContestant(UNIFORM, target, f"kept {kept:.2f}, untrained", model, sample_cfg)
            )
        # the same schedule as DiffCR-LT (same speed), tokens drawn at random: what the learned router is worth
        random_model = randomize_routers(copy.deepcopy(trained[DIFFCR_LT]), seed=recipe.seed)
        lineup.contestants.append(PromptContestant(RANDOM, target, "DiffCR-LT's schedule", random_model, sample_cfg))
        if not fbcache_problem:
            with timer("tuning"):
                # the cache's savings depend on the trajectory: probe with every sampler step
                threshold, _ = search.match(
                    FBCACHE, fbcache, target, 0.0, recipe.fbcache_max_threshold, full_steps=True
                )
            lineup.fbcache_knobs[target] = threshold
            lineup.contestants.append(replace(fbcache(threshold), target_speedup=target))
        steps = lineup.step_latency.steps_for(target)
        lineup.contestants.append(
            PromptContestant(
                FEWER_STEPS, target, f"{steps} step{'s' * (steps != 1)}", dense_model, recipe.sample_config(steps)
            )
        )
    return lineup


class _PhaseTimer:
    """Adds the seconds spent inside `with timer(phase):` to `totals[phase]`."""

    def __init__(self, totals: dict[str, float]):
        self.totals = totals

    @contextlib.contextmanager
    def __call__(self, phase: str):
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - begin


# -- the contest ----------------------------------------------------------------------------------------


def run_prompt_contest(
    pipe, contestants: list[PromptContestant], prompts: list[str], recipe: T2IBenchRecipe, progress: bool = True
) -> tuple[dict[str, float], dict[str, int], dict[str, np.ndarray]]:
    """Sample `prompts` with every contestant from the same seeds, batches interleaved, order rotating.

    Returns:
        (median seconds per full batch, FLOPs per image counted on the first batch, uint8 images (n, H, W, 3)),
        each keyed by contestant name.
    """
    from tqdm.auto import tqdm

    from diffcr.benchmark import count_flops

    names = [c.name for c in contestants]
    if len(set(names)) != len(names):
        raise ValueError(f"contestant names must be unique: {names}")
    starts = list(range(0, len(prompts), recipe.sample_batch))
    # untimed: the first batch under the FLOP counter, which also warms every contestant up
    first = list(range(min(recipe.sample_batch, len(prompts))))
    flops = {c.name: count_flops(lambda c=c: c.sample(pipe, prompts, first))[1] // len(first) for c in contestants}
    images: dict[str, list[np.ndarray]] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    bar = tqdm(total=len(starts) * len(contestants), desc="sampling every method", disable=not progress)
    for batch_no, start in enumerate(starts):
        indices = list(range(start, min(start + recipe.sample_batch, len(prompts))))
        shift = batch_no % len(contestants)
        for contestant in contestants[shift:] + contestants[:shift]:
            begin = time.perf_counter()
            images[contestant.name].append(contestant.sample(pipe, prompts, indices))
            seconds[contestant.name].append(time.perf_counter() - begin)
            bar.update(1)
    bar.close()
    # a short last batch would look fast: only full batches count, unless there are none
    full = [i for i, start in enumerate(starts) if start + recipe.sample_batch <= len(prompts)] or [0]
    median = {name: statistics.median(seconds[name][i] for i in full) for name in names}
    return median, flops, {name: np.concatenate(chunks) for name, chunks in images.items()}


def judge_contest(
    contestants: list[PromptContestant],
    images: dict[str, np.ndarray],
    seconds: dict[str, float],
    flops: dict[str, int],
    prompts: list[str],
    kinds: list[str],
    reference: torch.Tensor,
) -> list[T2IRow]:
    """One row per contestant: speed against the first (dense), prompt accuracy, FID and PSNR against dense.

    Args:
        reference: held-out scenes (R, 1, 64, 64) in [-1, 1] for the feature FID.
    """
    from diffcr.evaluation import psnr_ssim
    from diffcr.scene_judge import prompt_accuracy, scene_fid

    dense = contestants[0]
    dense_float = _as_float(images[dense.name])
    rows = []
    for contestant in contestants:
        accuracy = prompt_accuracy(images[contestant.name], prompts, kinds)
        psnr = None if contestant is dense else psnr_ssim(_as_float(images[contestant.name]), dense_float)[0]
        rows.append(
            T2IRow(
                name=contestant.name,
                method=contestant.method,
                target_speedup=contestant.target_speedup,
                knob=contestant.knob,
                steps=contestant.sample_cfg.steps,
                seconds_per_batch=seconds[contestant.name],
                speedup=seconds[dense.name] / seconds[contestant.name],
                flop_speedup=flops[dense.name] / max(1, flops[contestant.name]),
                digit_accuracy=accuracy["digit_accuracy"],
                empty_accuracy=accuracy["empty_accuracy"],
                image_accuracy=accuracy["image_accuracy"],
                by_kind=accuracy["by_kind"],
                fid=scene_fid(reference, images[contestant.name]),
                psnr_vs_dense=psnr,
                note=contestant.note,
                **_schedule_fields(contestant.model),
            )
        )
    return rows


def _as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _schedule_fields(model) -> dict:
    import diffcr

    if not diffcr.is_applied(model):
        return {}
    sched = diffcr.schedule(model)
    return {
        "mean_kept_ratio": sched.mean_kept_ratio,
        "timestep_regions": len(sched.kept_ratio[0]),
        "schedule": sched.kept_ratio,
        "route_cross_attention": diffcr.get_config(model).route_cross_attention,
    }


# -- the whole bench ------------------------------------------------------------------------------------


def run_t2i_bench(
    out_dir: str | Path, recipe: T2IBenchRecipe | None = None, base: str | Path = "t2i", progress: bool = True
) -> dict:
    """Tune, train, sample and judge every method on the text-to-image default; write the results to `out_dir`.

    Args:
        out_dir: the output folder (created; a `trained/` folder of an earlier run in it is replaced).
        recipe: the sizes (default `T2IBenchRecipe()`; `T2IBenchRecipe.quick()` for a smoke run).
        base: "t2i" (the shipped pipeline) or a pipeline folder in its layout.

    Returns:
        What `results.json` holds: {"rows", "skipped", "uniform_knobs", "fbcache_knobs", "step_latency",
        "recipe", "machine", "base", "num_prompts", "num_reference", "seconds", "phase_seconds", "notes", "plot"}.
    """
    from diffcr.benchmark import machine_description
    from diffcr.checkpoint import write_json_atomic, write_text_atomic
    from diffcr.data.scenes import DigitScenes
    from diffcr.train.scene_conditioning import SceneConditioning

    recipe = recipe or T2IBenchRecipe()
    started = time.perf_counter()
    if recipe.num_threads and not torch.cuda.is_available():
        torch.set_num_threads(recipe.num_threads)
    pipe = load_bench_pipeline(base)  # first: a wrong base fails before any folder is made
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained_dir = out_dir / "trained"
    if trained_dir.exists():  # the bench owns this folder: a re-run trains afresh
        shutil.rmtree(trained_dir)
    conditioning = SceneConditioning(
        DigitScenes("train", seed=recipe.seed), pipe.vae, pipe.tokenizer, pipe.text_encoder
    )
    prompts, kinds = recipe.prompts()
    dense = PromptContestant(DENSE, None, f"{recipe.sampler_steps} steps", pipe.transformer, recipe.sample_config())
    search = PipelineSpeedupSearch(pipe, dense, prompts[: recipe.sample_batch], recipe)
    lineup = prepare_lineup(pipe, conditioning, search, recipe, trained_dir, progress)
    timer = _PhaseTimer(lineup.seconds)
    with timer("sampling"):
        seconds, flops, images = run_prompt_contest(pipe, lineup.contestants, prompts, recipe, progress)
    with timer("judging"):
        reference = DigitScenes("heldout", seed=recipe.seed).batch(torch.arange(recipe.num_reference))[0]
        rows = judge_contest(lineup.contestants, images, seconds, flops, prompts, kinds, reference)
    result = {
        "rows": [asdict(row) for row in rows],
        "skipped": lineup.skipped,
        "uniform_knobs": {str(k): v for k, v in lineup.uniform_knobs.items()},
        "fbcache_knobs": {str(k): v for k, v in lineup.fbcache_knobs.items()},
        "step_latency": asdict(lineup.step_latency),
        "recipe": asdict(recipe),
        "machine": {**machine_description(), "dtype": "float32"},
        "base": str(base),
        "num_prompts": len(prompts),
        "num_reference": recipe.num_reference,
        "phase_seconds": lineup.seconds,
        "notes": {"fbcache": FBCACHE_NOTE, "fewer_steps": FEWER_STEPS_NOTE},
    }
    result["plot"] = str(plot_quality_vs_speedup(result["rows"], out_dir / PLOT_NAME))
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(out_dir / "results.json", result)
    write_text_atomic(out_dir / "results.md", results_markdown(result))
    return result


FBCACHE_NOTE = (
    "diffusers' first-block cache (FirstBlockCacheConfig) on the PixArt transformer's blocks; the PixArt pipeline "
    "sets no cache context, so diffcr sets one around each sampling run (one context for the CFG-doubled batch, "
    "state reset per run). The knob is the relative-change threshold, tuned with every sampler step."
)
FEWER_STEPS_NOTE = (
    "The dense pipeline with fewer sampler steps. A pipeline call's latency is affine in the steps (text "
    "encoding and VAE decoding are paid once), so the steps come from a fitted fixed + per-step latency, not "
    "from steps / target."
)


# -- report ---------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _percent(value) -> str:
    return _fmt(None if value is None else 100 * value, ".0f") + (" %" if value is not None else "")


def results_table(rows: list[dict]) -> str:
    """The comparison as a Markdown table, one row per method and target."""
    lines = [
        "| method | target | setting | steps | latency / batch (s) | measured speedup | FLOP speedup | digits right "
        "| heldout | seen | single | images right | feature FID | PSNR vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = r["target_speedup"]
        missed = target and abs(r["speedup"] / target - 1) > OFF_TARGET
        kinds = [_percent(r["by_kind"].get(kind, {}).get("digit_accuracy")) for kind in PROMPT_KINDS]
        lines.append(
            f"| {r['method']} | {_fmt(target, 'g')}{'x' if target else ''}{' (missed)' if missed else ''} | "
            f"{r['knob']} | {r['steps']} | {r['seconds_per_batch']:.2f} | {r['speedup']:.2f}x | "
            f"{r['flop_speedup']:.2f}x | {_percent(r['digit_accuracy'])} | {' | '.join(kinds)} | "
            f"{_percent(r['image_accuracy'])} | {_fmt(r['fid'], '.1f')} | {_fmt(r['psnr_vs_dense'], '.1f')} |"
        )
    return "\n".join(lines)


def _routing_sentence(route_cross_attention: bool) -> str:
    if route_cross_attention:
        return "Routed methods use the paper's routing (bypassed tokens skip the whole block). "
    return (
        "Routed methods (and the probes that match their kept ratios) give the tokens a block bypasses its "
        "cross-attention update, as the demo's recipe does (`route_cross_attention=False`). "
    )


def _table_text(region_targets) -> str:
    return " / ".join(f"{ratio:g}" for ratio in region_targets)


def _regions_sentence(recipe: dict) -> str:
    targets = recipe.get("region_targets")
    if not targets:
        return ""
    return (
        f"{DIFFCR_LT_REGIONS} is DiffCR-LT trained as the text-to-image demo trains it: a target per timestep region, "
        f"{_table_text(targets)} (cleanest first), regions uncoupled, lambda "
        f"{recipe['region_ratio_loss_weight']:g}; its table is fixed, not tuned, so it runs at the speed the table "
        f"gives and is listed under {recipe['region_targets_at']:g}x. "
    )


def results_markdown(result: dict) -> str:
    """`results.md`: how the bench ran, the table, the plot, and what was skipped and why."""
    recipe, machine = result["recipe"], result["machine"]
    phases = ", ".join(f"{phase} {seconds / 60:.1f} min" for phase, seconds in result["phase_seconds"].items())
    out = [
        "### Methods at matched speedups (text-to-image default)",
        "",
        f"Base: {result['base']}. {result['num_prompts']} evaluation prompts per method, one image each, the same "
        f"seeds for every method (the pipeline's sampler, {recipe['sampler_steps']} steps, "
        f"CFG {recipe['guidance_scale']}), "
        f"batches of {recipe['sample_batch']} interleaved across all methods; latency = median per full batch of "
        "a whole pipeline call (text encoding and VAE decoding included). Every trained variant got the same "
        f"budget: {recipe['train_steps']} steps at batch {recipe['train_batch']} on digit scenes. "
        + _routing_sentence(recipe.get("route_cross_attention", True))
        + _regions_sentence(recipe)
        + "Knobs were "
        "tuned by bisection on measured latency; a trained model's schedule then lands near, not at, its target "
        f"(marked (missed) when more than {OFF_TARGET:.0%} away). Digits right: the shipped classifier reads the "
        "prompt's digit in its slot (overall, and per prompt kind); images right: every slot as asked. Feature "
        f"FID against {result['num_reference']} held-out scenes in the classifier's feature space.",
        "",
        f"Machine: {machine.get('cpu')}{', ' + machine['gpu'] if machine.get('gpu') else ''}; torch "
        f"{machine.get('torch')}, {machine.get('threads')} threads. Whole run {result['seconds'] / 60:.1f} min "
        f"({phases}).",
        "",
        results_table(result["rows"]),
        "",
        f"![prompt accuracy vs speedup]({PLOT_NAME})",
        "",
        f"Step caching: {result['notes']['fbcache']}",
        "",
        f"Fewer steps: {result['notes']['fewer_steps']}",
        "",
    ]
    for skipped in result["skipped"]:
        out += [f"Skipped, {skipped['method']}: {skipped['reason']}", ""]
    return "\n".join(out)


def plot_quality_vs_speedup(rows: list[dict], path: Path) -> Path:
    """Measured speedup (x) against digit accuracy (y), one marker per method."""
    from diffcr.report import _matplotlib

    plt = _matplotlib()
    markers = "*sDo^v<>pPhX"
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for number, method in enumerate(methods):
        points = sorted(
            (r["speedup"], r["digit_accuracy"])
            for r in rows
            if r["method"] == method and r["digit_accuracy"] is not None
        )
        ax.plot(
            [p[0] for p in points],
            [100 * p[1] for p in points],
            marker=markers[number % len(markers)],
            linestyle="-" if len(points) > 1 else "none",
            markersize=9 if method.startswith("dense") else 7,
            label=method,
        )
    ax.set_xlabel("measured sampling speedup over dense")
    ax.set_ylabel("digits right at their slot (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
