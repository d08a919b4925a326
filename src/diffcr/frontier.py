"""`diffcr bench --only frontier`: quality against measured end-to-end sampling speedup, per family of methods.

The families: fewer sampler steps alone, diffusers' first-block cache alone, DiffCR alone (several target kept
ratios), DiffCR composed with fewer steps, DiffCR composed with the first-block cache, and dense fine-tuned at
the same training budget. Every point samples the same noise as dense at the recipe's sampler steps (20), its
batches interleaved with every other point's (`compare.run_contest`), so speedups are measured side by side.

Classifier accuracy saturates on the class-conditional default, so the main quality axis is feature FID
against the held-out split. How much FID moves by chance is measured, not assumed: dense is sampled again from
disjoint noise seeds, and the spread of its FIDs is the band of "no measurable loss". Each family's Pareto
frontier (higher speedup, lower FID) is marked, and the goal (DiffCR x fewer steps reaches >= 3x at no
measurable loss where fewer steps alone cannot) is judged from the measured numbers.

Writes `results.json`, `results.md` and `frontier.png` into the output folder. The verdict is judged on a
`QualityAxis` (FID here); `diffcr.t2i_frontier` measures the same families on the text-to-image default with
prompt accuracy as the axis, reusing the points, the frontiers and the verdict.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffcr.compare import DENSE, DENSE_TUNED, FBCACHE, FEWER_STEPS, CompareRecipe, Contestant

logger = logging.getLogger(__name__)

DIFFCR = "DiffCR"  # DiffCR-L or DiffCR-LT, as the recipe's `timestep_regions` says
DIFFCR_STEPS = f"{DIFFCR} x {FEWER_STEPS}"
DIFFCR_FBCACHE = f"{DIFFCR} x {FBCACHE}"
# dense fine-tuned at DiffCR's budget, then sampled with fewer steps: it separates what DiffCR's fine-tuning alone
# buys from what routing adds
DENSE_TUNED_STEPS = f"{DENSE_TUNED} x {FEWER_STEPS}"
# the order of the table, the plot's legend and the contest (dense first: it is the reference)
FAMILIES = (DENSE, FEWER_STEPS, FBCACHE, DIFFCR, DIFFCR_STEPS, DIFFCR_FBCACHE, DENSE_TUNED, DENSE_TUNED_STEPS)
# the families that sample DiffCR models, and those that sample dense fine-tuned (each needs its training)
ROUTED_FAMILIES = (DIFFCR, DIFFCR_STEPS, DIFFCR_FBCACHE)
TUNED_FAMILIES = (DENSE_TUNED, DENSE_TUNED_STEPS)
GOAL_SPEEDUP = 3.0
PLOT_NAME = "frontier.png"
RESULT_KIND = "frontier"  # marks a frontier's results.json, so that a bench folder's is never overwritten


@dataclass(frozen=True)
class QualityAxis:
    """The measure that "no measurable loss" is judged on, and which way is better.

    Args:
        key: the row's field (e.g. "fid", "digit_accuracy").
        name: how sentences name it ("FID", "digit accuracy").
        higher_is_better: True for an accuracy, False for a distance such as FID.
        percent: the value is a fraction, shown as a percentage.
        limit_key: the verdict's key for the limit ("fid_limit", "accuracy_limit").
        frontier_key: the row's flag of its family's Pareto frontier on this axis (as `mark_frontiers` sets it).
        label: the plot's y-axis label.

    Example:
        >>> FID_AXIS.limit(10.0, 0.5), FID_AXIS.bound(10.5)
        (10.5, 'FID within 10.50')
    """

    key: str
    name: str
    higher_is_better: bool
    percent: bool
    limit_key: str
    frontier_key: str
    label: str

    def limit(self, reference: float, spread: float) -> float:
        """The worst value without measurable loss against `reference`, given the run-to-run `spread`."""
        return reference - spread if self.higher_is_better else reference + spread

    def within(self, value: float, limit: float) -> bool:
        """Whether `value` is no measurable loss against `limit` (NaN never is)."""
        return value >= limit if self.higher_is_better else value <= limit

    @property
    def scale(self) -> float:
        """What a value is multiplied by to be shown (100 for a percentage)."""
        return 100.0 if self.percent else 1.0

    def number(self, value: float) -> str:
        return f"{self.scale * value:.1f} %" if self.percent else f"{value:.2f}"

    def show(self, value: float) -> str:
        """`value` with the axis's name, e.g. "FID 10.40" or "digit accuracy 85.0 %"."""
        return f"{self.name} {self.number(value)}"

    def bound(self, limit: float) -> str:
        """The band of no measurable loss in words, e.g. "FID within 10.50"."""
        return f"{self.name} {'at or above' if self.higher_is_better else 'within'} {self.number(limit)}"


FID_AXIS = QualityAxis(
    "fid", "FID", False, False, "fid_limit", "on_frontier", "feature FID vs held-out (lower is better)"
)
CLASSIFIER_ACCURACY = QualityAxis(
    "accuracy", "accuracy", True, True, "accuracy_limit", "on_accuracy_frontier", "classifier accuracy (%)"
)


class FrontierPlan:
    """What a frontier recipe's knobs decide, shared by the class-conditional and text-to-image recipes: their
    validation, which models are trained, and what a run costs. A recipe using it has the fields that
    `frontier_points` reads, `spread_seeds`, `train_steps`, `train_batch` and a `num_samples` property."""

    def _check_knobs(self) -> None:
        """Raise `ValueError` naming the bad knob, its valid range and the fix."""
        unknown = [family for family in self.families if family not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"families={self.families}: {unknown or 'none given'}; choose among {list(FAMILIES)}")
        for name in ("step_counts", "diffcr_step_counts", "tuned_step_counts"):
            bad = [steps for steps in getattr(self, name) if not 1 <= steps <= self.sampler_steps]
            if bad:
                raise ValueError(
                    f"{name}={getattr(self, name)}: {bad} outside [1, {self.sampler_steps}] (sampler_steps); "
                    "fewer steps means at most dense's"
                )
        if not self.step_counts or not self.diffcr_targets:
            raise ValueError("step_counts and diffcr_targets must each hold at least one value (their families)")
        bad_targets = [kept for kept in self.diffcr_targets if not 0.0 < kept <= 1.0]
        if bad_targets:
            raise ValueError(f"diffcr_targets={self.diffcr_targets}: {bad_targets} outside (0, 1] (kept ratios)")
        thresholds = self.fbcache_thresholds + self.diffcr_fbcache_thresholds
        if any(threshold < 0 for threshold in thresholds):
            raise ValueError(f"first-block cache thresholds {thresholds} must be >= 0 (0 = never skip)")
        if (
            not self.spread_seeds
            or any(k < 1 for k in self.spread_seeds)
            or len(set(self.spread_seeds)) != len(self.spread_seeds)
        ):
            raise ValueError(
                f"spread_seeds={self.spread_seeds} must be distinct seed sets >= 1 (set 0 is the contest's noise)"
            )

    @property
    def trains_diffcr(self) -> bool:
        """Whether some family measured samples the DiffCR models (one trained per target)."""
        return any(family in ROUTED_FAMILIES for family in self.families)

    @property
    def trains_dense_tuned(self) -> bool:
        """Whether some family measured samples dense fine-tuned."""
        return any(family in TUNED_FAMILIES for family in self.families)

    def workload(self) -> dict:
        """What a run costs, in counts: trainings and their steps, points, images and image-steps sampled."""
        points = frontier_points(self)
        spread_images = len(self.spread_seeds) * self.num_samples
        return {
            "trainings": len(self.diffcr_targets) * self.trains_diffcr + self.trains_dense_tuned,
            "train_steps": self.train_steps,
            "train_batch": self.train_batch,
            "points": len(points),
            "images": len(points) * self.num_samples + spread_images,
            "image_steps": sum(point.steps for point in points) * self.num_samples + spread_images * self.sampler_steps,
        }


@dataclass(frozen=True)
class FrontierRecipe(FrontierPlan):
    """Sizes of the frontier.

    Args:
        sampler_steps: dense's DDIM steps; every speedup is over dense at these steps.
        step_counts: the sampler steps of "fewer steps" (dense's own count included: that point is dense again,
            and its measured speedup shows the timing noise).
        diffcr_targets: the target kept ratios of the DiffCR models (one trained model each).
        diffcr_step_counts: the sampler steps each DiffCR model is composed with.
        fbcache_thresholds: the first-block cache's relative-change thresholds on dense.
        diffcr_fbcache_thresholds: the thresholds each DiffCR model is composed with.
        tuned_step_counts: the sampler steps dense fine-tuned is composed with.
        families: which families to measure (dense, the reference, always runs); only the models they sample are
            trained. A subset re-measures some families at the cost of those alone, from the same noise and seed.
        timestep_regions, ratio_loss_weight: DiffCR's regions and lambda.
        train_steps, train_batch, lr, router_lr, ratio_lr: the budget every trained model gets (the DiffCR
            models and dense fine-tuned alike); the comparison's learning rates.
        classes, num_per_class: which classes are sampled, and how many images each (every point samples them all).
        sample_batch: images per sampling batch (timed and interleaved batch by batch).
        guidance_scale: classifier-free guidance.
        spread_seeds: extra noise seed sets dense is sampled with, for FID's run-to-run spread. Set k draws image
            i from seed `seed + k * num_samples + i`, disjoint from the contest's set 0 and from each other.
        num_threads: CPU threads for sampling and timing (None = leave torch's setting). The training loop sets
            its own (`TrainConfig.num_threads`, 2).
        seed: the base seed of the noise and of training.

    Example:
        >>> FrontierRecipe.quick().num_samples
        4
    """

    sampler_steps: int = 20
    step_counts: tuple[int, ...] = (20, 16, 13, 10, 8, 6)
    diffcr_targets: tuple[float, ...] = (0.75, 0.58, 0.42)
    diffcr_step_counts: tuple[int, ...] = (13, 10, 8, 6)
    fbcache_thresholds: tuple[float, ...] = (0.1, 0.2, 0.3)
    diffcr_fbcache_thresholds: tuple[float, ...] = (0.1, 0.2)
    tuned_step_counts: tuple[int, ...] = (13, 10, 8, 6)
    families: tuple[str, ...] = FAMILIES
    timestep_regions: int = 4
    ratio_loss_weight: float = CompareRecipe.ratio_loss_weight
    train_steps: int = 100
    train_batch: int = CompareRecipe.train_batch
    lr: float = CompareRecipe.lr
    router_lr: float = CompareRecipe.router_lr
    ratio_lr: float = CompareRecipe.ratio_lr
    classes: tuple[int, ...] = CompareRecipe.classes
    num_per_class: int = 30
    sample_batch: int = CompareRecipe.sample_batch
    guidance_scale: float = CompareRecipe.guidance_scale
    spread_seeds: tuple[int, ...] = (1,)
    num_threads: int | None = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sampler_steps", "train_steps", "train_batch", "num_per_class", "sample_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if not self.classes:
            raise ValueError("classes=() is empty: give at least one class id, e.g. (0, 1)")
        self._check_knobs()

    @classmethod
    def quick(cls) -> FrontierRecipe:
        """A smoke run: every family, one or two points each, 4 images at 4 sampler steps, 2 training steps."""
        return cls(
            sampler_steps=4,
            step_counts=(4, 2),
            diffcr_targets=(0.5,),
            diffcr_step_counts=(2,),
            fbcache_thresholds=(0.2,),
            diffcr_fbcache_thresholds=(0.2,),
            tuned_step_counts=(2,),
            train_steps=2,
            train_batch=4,
            classes=(0, 1),
            num_per_class=2,
            sample_batch=2,
            num_threads=None,  # a smoke run's timings mean nothing: leave the caller's thread count
        )

    @property
    def num_samples(self) -> int:
        """Images every point samples."""
        return len(self.classes) * self.num_per_class

    def compare_recipe(self):
        """The `compare.CompareRecipe` that `train_variant` and `run_contest` read (budget, sizes, sampler)."""
        return CompareRecipe(
            timestep_regions=self.timestep_regions,
            ratio_loss_weight=self.ratio_loss_weight,
            train_steps=self.train_steps,
            train_batch=self.train_batch,
            lr=self.lr,
            router_lr=self.router_lr,
            ratio_lr=self.ratio_lr,
            classes=self.classes,
            num_per_class=self.num_per_class,
            sample_batch=self.sample_batch,
            sampler_steps=self.sampler_steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
        )


@dataclass(frozen=True)
class FrontierPoint:
    """One setting to measure: its family, and the knobs it turns.

    `target_kept_ratio` picks a DiffCR model (None: dense weights), `threshold` a first-block cache around it
    (None: none), `fine_tuned` dense fine-tuned at the same budget instead of the shipped dense."""

    family: str
    steps: int
    target_kept_ratio: float | None = None
    threshold: float | None = None
    fine_tuned: bool = False

    @property
    def setting(self) -> str:
        parts = []
        if self.target_kept_ratio is not None:
            parts.append(f"kept {self.target_kept_ratio:.2f}")
        if self.threshold is not None:
            parts.append(f"threshold {self.threshold:g}")
        if self.fine_tuned:
            parts.append("fine-tuned")
        parts.append(f"{self.steps} steps")
        return ", ".join(parts)


def frontier_points(recipe: FrontierPlan) -> list[FrontierPoint]:
    """Every point of the recipe's families, dense at `sampler_steps` first (the reference of the contest)."""
    full = recipe.sampler_steps
    points = [FrontierPoint(DENSE, full)]
    points += [FrontierPoint(FEWER_STEPS, steps) for steps in recipe.step_counts]
    points += [FrontierPoint(FBCACHE, full, threshold=threshold) for threshold in recipe.fbcache_thresholds]
    points += [FrontierPoint(DIFFCR, full, target_kept_ratio=kept) for kept in recipe.diffcr_targets]
    points += [
        FrontierPoint(DIFFCR_STEPS, steps, target_kept_ratio=kept)
        for kept in recipe.diffcr_targets
        for steps in recipe.diffcr_step_counts
    ]
    points += [
        FrontierPoint(DIFFCR_FBCACHE, full, target_kept_ratio=kept, threshold=threshold)
        for kept in recipe.diffcr_targets
        for threshold in recipe.diffcr_fbcache_thresholds
    ]
    points.append(FrontierPoint(DENSE_TUNED, full, fine_tuned=True))
    points += [FrontierPoint(DENSE_TUNED_STEPS, steps, fine_tuned=True) for steps in recipe.tuned_step_counts]
    return [point for point in points if point.family == DENSE or point.family in recipe.families]


@dataclass
class FrontierContestant(Contestant):
    """A `compare.Contestant` named by its family and setting (a family has many points, none with a target)."""

    point: FrontierPoint | None = None

    @property
    def name(self) -> str:
        return f"{self.method}: {self.knob}"


# -- first-block cache on routed models -----------------------------------------------------------------


# -- frontier and verdict -------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which of the (speedup, cost) points no other point dominates: none is at least as fast and at least as
    cheap, and strictly better in one of the two (higher speedup is better, lower cost is better).

    Example:
        >>> pareto_front([(1.0, 5.0), (2.0, 6.0), (1.5, 7.0), (2.0, 6.0)])
        [True, True, False, True]
    """
    on_front = []
    for speedup, cost in points:
        dominated = any(
            other_speedup >= speedup and other_cost <= cost and (other_speedup > speedup or other_cost < cost)
            for other_speedup, other_cost in points
        )
        on_front.append(not dominated)
    return on_front


def mark_frontiers(rows: list[dict], accuracy_key: str = "accuracy") -> None:
    """Set `on_frontier` (speedup vs FID) and `on_accuracy_frontier` (speedup vs accuracy) on every row, each
    family's frontier computed within the family.

    Args:
        rows: dicts with `family`, `speedup`, `fid` and the accuracy.
        accuracy_key: the rows' accuracy field ("accuracy": the classifier's; "digit_accuracy": prompt accuracy).
    """
    for family in dict.fromkeys(row["family"] for row in rows):
        mine = [row for row in rows if row["family"] == family]
        by_fid = pareto_front([(row["speedup"], row["fid"]) for row in mine])
        by_accuracy = pareto_front([(row["speedup"], -row[accuracy_key]) for row in mine])
        for row, on_fid, on_accuracy in zip(mine, by_fid, by_accuracy):
            row["on_frontier"] = on_fid
            row["on_accuracy_frontier"] = on_accuracy


def best_without_loss(rows: list[dict], limit: float, axis: QualityAxis = FID_AXIS) -> dict[str, dict | None]:
    """Per family, the row of highest measured speedup within `limit` on `axis` (None: no such row); on the
    default axis, FID at most `limit`."""
    best: dict[str, dict | None] = {}
    for family in dict.fromkeys(row["family"] for row in rows):
        within = [row for row in rows if row["family"] == family and axis.within(row[axis.key], limit)]
        best[family] = max(within, key=lambda row: row["speedup"]) if within else None
    return best


def _summary(row: dict | None, axis: QualityAxis) -> dict | None:
    """What a verdict keeps of a best row: its setting, speedup and quality on the axis."""
    return None if row is None else {key: row[key] for key in ("setting", "speedup", axis.key)}


def goal_verdict(
    rows: list[dict],
    dense_quality: float,
    quality_spread: float,
    goal: float = GOAL_SPEEDUP,
    axis: QualityAxis = FID_AXIS,
) -> dict:
    """Judge the goal from measured rows: DiffCR x fewer steps reaches `goal` speedup at no measurable loss (quality
    on `axis` within dense's and its run-to-run spread) where fewer steps alone do not.

    Args:
        rows: dicts with `family`, `setting`, `speedup`, `flop_speedup` and the axis's field.
        dense_quality: dense's quality on `axis` with the contest's noise (its FID on the default axis, its
            accuracy on an accuracy axis).
        quality_spread: that quality's run-to-run spread (dense against dense on disjoint noise).
        goal: the speedup to reach.
        axis: the quality axis: `FID_AXIS` (limit dense + spread) or an accuracy (limit dense - spread).

    Returns:
        {"axis" (its key), the axis's `limit_key` ("fid_limit" on the default axis), "goal", "best" (family ->
        {"setting", "speedup", the axis's key} or None), "composed_speedup", "steps_alone_speedup" (None where no
        point stays within the limit), "reached", "explanation", "against_tuned" (`against_dense_tuned`, None
        without a dense fine-tuned row)}.

    Example:
        >>> rows = [{"family": "dense", "setting": "20 steps", "speedup": 1.0, "flop_speedup": 1.0, "fid": 10.0}]
        >>> goal_verdict(rows, dense_quality=10.0, quality_spread=0.5)["fid_limit"]
        10.5
    """
    limit = axis.limit(dense_quality, quality_spread)
    best_rows = best_without_loss(rows, limit, axis)
    composed = best_rows.get(DIFFCR_STEPS)
    steps_alone = best_rows.get(FEWER_STEPS)
    composed_speedup = composed["speedup"] if composed else None
    steps_alone_speedup = steps_alone["speedup"] if steps_alone else None
    reached = composed_speedup is not None and composed_speedup >= goal and (steps_alone_speedup or 0.0) < goal
    return {
        "axis": axis.key,
        axis.limit_key: limit,
        "goal": goal,
        "best": {family: _summary(row, axis) for family, row in best_rows.items()},
        "composed_speedup": composed_speedup,
        "steps_alone_speedup": steps_alone_speedup,
        "reached": reached,
        "explanation": _explain(rows, best_rows, limit, goal, reached, axis),
        "against_tuned": against_dense_tuned(rows, quality_spread, axis),
    }


def against_dense_tuned(rows: list[dict], spread: float, axis: QualityAxis = FID_AXIS) -> dict | None:
    """DiffCR's fine-tuning also improves the dense weights (a confound): judge the compositions against dense
    fine-tuned at the same budget instead of the shipped dense.

    Returns:
        None without a dense fine-tuned row; else {the axis's `limit_key` (dense fine-tuned's quality with the
        spread), "best" (family -> {"setting", "speedup", the axis's key} or None, for `DIFFCR_STEPS` and
        `DENSE_TUNED_STEPS`), "explanation"}.
    """
    tuned = next((row for row in rows if row["family"] == DENSE_TUNED), None)
    if tuned is None:
        return None
    limit = axis.limit(tuned[axis.key], spread)
    best_rows = best_without_loss(rows, limit, axis)
    best = {family: _summary(best_rows.get(family), axis) for family in (DIFFCR_STEPS, DENSE_TUNED_STEPS)}

    def where(family: str) -> str:
        if family not in best_rows:
            return "not measured"
        found = best[family]
        return "no point within it" if found is None else f"{found['speedup']:.2f}x ({found['setting']})"

    explanation = (
        f"Against {DENSE_TUNED} ({axis.show(tuned[axis.key])}, limit {axis.number(limit)} with the spread): "
        f"{DIFFCR_STEPS} keeps quality up to {where(DIFFCR_STEPS)}, {DENSE_TUNED_STEPS} up to "
        f"{where(DENSE_TUNED_STEPS)}."
    )
    return {axis.limit_key: limit, "best": best, "explanation": explanation}


def _explain(
    rows: list[dict], best_rows: dict, limit: float, goal: float, reached: bool, axis: QualityAxis = FID_AXIS
) -> str:
    """Why the goal was reached or not, in sentences built from the measured numbers."""

    def where(row: dict | None) -> str:
        return "no point within the limit" if row is None else f"{row['speedup']:.2f}x ({row['setting']})"

    composed = best_rows.get(DIFFCR_STEPS)
    steps_alone = best_rows.get(FEWER_STEPS)
    diffcr_alone = best_rows.get(DIFFCR)
    if reached:
        return (
            f"Reached: {DIFFCR_STEPS} runs {where(composed)} at {axis.show(composed[axis.key])} (limit "
            f"{axis.number(limit)}), where {FEWER_STEPS} alone stop at {where(steps_alone)}."
        )
    sentences = []
    if composed is not None and composed["speedup"] >= goal:
        sentences.append(
            f"Not reached as posed: {DIFFCR_STEPS} runs {where(composed)} without measurable loss, but "
            f"{FEWER_STEPS} alone get there too ({where(steps_alone)}): on this model and measure the step count "
            "alone reaches the goal."
        )
        return " ".join(sentences)
    if composed is None:
        sentences.append(f"Not reached: no {DIFFCR_STEPS} point keeps {axis.bound(limit)}.")
    else:
        sentences.append(
            f"Not reached: {DIFFCR_STEPS} keeps {axis.bound(limit)} up to {where(composed)}, short of {goal:g}x."
        )
    if steps_alone is not None and diffcr_alone is not None:
        product = steps_alone["speedup"] * diffcr_alone["speedup"]
        sentences.append(
            f"Alone, {FEWER_STEPS} keep quality up to {where(steps_alone)} and {DIFFCR} up to {where(diffcr_alone)}; "
            f"if their quality losses add up, a composition keeps quality up to about the product of the two, "
            f"{product:.2f}x."
        )
        if product < goal:
            weaker = FEWER_STEPS if steps_alone["speedup"] < diffcr_alone["speedup"] else DIFFCR
            sentences.append(
                f"That is short of {goal:g}x, so the composition reaches it only if the losses partly cancel; "
                f"{weaker} is the ingredient that adds the least speedup without measurable loss."
            )
    composed_rows = [row for row in rows if row["family"] == DIFFCR_STEPS]
    lossy = [row for row in composed_rows if row["speedup"] >= goal]
    if lossy:
        sentences.append(
            f"The composed points at or above {goal:g}x lose quality (their losses add up): "
            + "; ".join(f"{row['setting']} {row['speedup']:.2f}x, {axis.show(row[axis.key])}" for row in lossy)
            + "."
        )
    elif composed_rows:
        fastest = max(row["speedup"] for row in composed_rows)
        sentences.append(f"No composed point is measured at {goal:g}x at all (the fastest runs {fastest:.2f}x).")
    diffcr_rows = [row for row in rows if row["family"] == DIFFCR and row["flop_speedup"] > 0]
    if diffcr_rows:
        realised = sum(row["speedup"] / row["flop_speedup"] for row in diffcr_rows) / len(diffcr_rows)
        if realised < 0.9:
            sentences.append(
                f"{DIFFCR}'s measured speedups are {realised:.0%} of its FLOP speedups on this machine (routing "
                "overhead), which caps what it adds."
            )
    return " ".join(sentences)


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class FrontierModels:
    """The weights the points sample with: the shipped dense, dense fine-tuned, and one DiffCR model per target."""

    dense: torch.nn.Module
    dense_tuned: torch.nn.Module | None
    diffcr: dict[float, torch.nn.Module]


def train_frontier_models(
    dense_model, trained_dir: Path, recipe: FrontierPlan, train_one: Callable[[Path, object], torch.nn.Module]
) -> FrontierModels:
    """Fine-tune dense and one DiffCR model per target kept ratio, every one with the recipe's budget (only those
    that the recipe's families sample).

    Args:
        dense_model: the shipped dense model (left untouched).
        trained_dir: where each training writes its run folder.
        recipe: a frontier recipe (its families, targets, `timestep_regions` and `ratio_loss_weight`).
        train_one: `train_one(run_dir, diffcr_config)` trains a copy of dense at the recipe's budget and returns it
            in eval mode; `diffcr_config` None fine-tunes dense.

    Returns:
        The `FrontierModels` the points sample with.
    """
    import diffcr

    dense_tuned = None
    if recipe.trains_dense_tuned:
        logger.info("training dense fine-tuned (%d steps)", recipe.train_steps)
        dense_tuned = train_one(trained_dir / "dense-tuned", None)
    routed = {}
    for kept in recipe.diffcr_targets if recipe.trains_diffcr else ():
        config = diffcr.DiffCRConfig(
            target_kept_ratio=kept, timestep_regions=recipe.timestep_regions, ratio_loss_weight=recipe.ratio_loss_weight
        )
        logger.info("training %s at target kept ratio %.2f (%d steps)", DIFFCR, kept, recipe.train_steps)
        routed[kept] = train_one(trained_dir / f"diffcr-kept{kept:g}", config)
    return FrontierModels(dense=dense_model, dense_tuned=dense_tuned, diffcr=routed)


def point_model(point: FrontierPoint, models: FrontierModels) -> tuple[torch.nn.Module, Callable]:
    """The model that samples `point` and the context around each of its sampling runs: a first-block cache on a
    copy of its weights when the point has a threshold, else the weights as they are and no context."""
    if point.fine_tuned:
        model = models.dense_tuned
    elif point.target_kept_ratio is not None:
        model = models.diffcr[point.target_kept_ratio]
    else:
        model = models.dense
    if point.threshold is None:
        return model, contextlib.nullcontext
    from diffcr.baselines import FirstBlockCache

    # a copy: the cache hooks the blocks in place, and other points sample with the same model uncached
    cache = FirstBlockCache(copy.deepcopy(model), point.threshold)
    return cache.model, cache.sampling_run


def build_contestant(point: FrontierPoint, models: FrontierModels, recipe: FrontierRecipe) -> FrontierContestant:
    """The contestant that samples `point`: its model, its steps, and a first-block cache around it if asked."""
    model, run_context = point_model(point, models)
    sample_cfg = recipe.compare_recipe().sample_config(point.steps)
    return FrontierContestant(point.family, None, point.setting, model, sample_cfg, run_context, point=point)


def measure_fid_spread(dense_model, classifier, heldout, recipe: FrontierRecipe, contest_fid: float) -> dict:
    """Dense sampled again from each disjoint seed set of `spread_seeds`: its FIDs and their spread (max - min,
    the contest's FID included), the band within which an FID difference is not measurable."""
    from diffcr.evaluation import evaluate_samples
    from diffcr.models.tiny_dit import null_class_id
    from diffcr.sampling import interleaved_class_labels, sample_images

    labels = interleaved_class_labels(list(recipe.classes), recipe.num_per_class)
    fids = [contest_fid]
    accuracies = []
    for seed_set in recipe.spread_seeds:
        # seeds seed + k * n + i: disjoint from the contest's seed + i (k = 0) and from the other sets
        sample_cfg = dataclasses.replace(
            recipe.compare_recipe().sample_config(), seed=recipe.seed + seed_set * recipe.num_samples
        )
        images = sample_images(dense_model, labels, sample_cfg, null_class_id(dense_model))
        quality = evaluate_samples(classifier, images, labels, heldout.images)
        fids.append(quality.fid)
        accuracies.append(quality.accuracy)
    return {
        "seed_sets": [0, *recipe.spread_seeds],
        "dense_fids": fids,
        "dense_accuracies": accuracies,
        "fid_spread": max(fids) - min(fids),
        "num_samples": recipe.num_samples,
    }


def run_frontier(
    out_dir: str | Path, recipe: FrontierRecipe | None = None, base: str | None = None, progress: bool = True
) -> dict:
    """Train, sample and score every point of the frontier; write `results.json`, `results.md`, `frontier.png`.

    Args:
        out_dir: the output folder (created; a `trained/` folder of an earlier frontier run in it is replaced).
        recipe: the sizes (default `FrontierRecipe()`, about an hour on 2 CPU cores; `FrontierRecipe.quick()`
            for a smoke run).
        base: the base DiT (None: the shipped one), as `models.load_base_model` takes it.
        progress: show progress bars.

    Returns:
        What `results.json` holds: {"kind", "rows", "spread", "verdict", "recipe", "workload", "machine", "base",
        "num_samples", "num_reference", "seconds", "phase_seconds", "plot"}.

    Raises:
        ValueError: `out_dir` holds the results of another bench (not a frontier).

    Example:
        >>> result = run_frontier("runs/frontier", FrontierRecipe.quick())  # doctest: +SKIP
        >>> result["verdict"]["reached"]  # doctest: +SKIP
    """
    from diffcr.benchmark import machine_description
    from diffcr.checkpoint import write_json_atomic, write_text_atomic
    from diffcr.compare import run_contest, train_variant
    from diffcr.data import load_dataset
    from diffcr.models import load_base_model
    from diffcr.models.classifier import load_classifier

    recipe = recipe or FrontierRecipe()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_not_another_bench(out_dir)
    threads = recipe.num_threads or torch.get_num_threads()
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        torch.set_num_threads(threads)
    dense_model = load_base_model(base).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, heldout = load_dataset()
    classifier = load_classifier()
    trained_dir = out_dir / "trained"
    if trained_dir.exists():  # the frontier owns this folder: a re-run trains afresh
        shutil.rmtree(trained_dir)
    phase_seconds: dict[str, float] = {}

    phase_started = time.perf_counter()
    compare_recipe = recipe.compare_recipe()

    def train_one(run_dir: Path, config) -> torch.nn.Module:
        return train_variant(dense_model, train_set, run_dir, compare_recipe, config, None, progress)

    models = train_frontier_models(dense_model, trained_dir, recipe, train_one)
    phase_seconds["training"] = time.perf_counter() - phase_started
    if on_cpu:
        # the training loop sets its own thread count (TrainConfig.num_threads): sampling and timing use the recipe's
        torch.set_num_threads(threads)

    phase_started = time.perf_counter()
    points = frontier_points(recipe)
    contestants = [build_contestant(point, models, recipe) for point in points]
    results, _ = run_contest(contestants, classifier, heldout, recipe.compare_recipe(), progress=progress)
    phase_seconds["sampling"] = time.perf_counter() - phase_started

    phase_started = time.perf_counter()
    dense_fid = results[0].fid
    spread = measure_fid_spread(dense_model, classifier, heldout, recipe, dense_fid)
    phase_seconds["spread"] = time.perf_counter() - phase_started

    rows, verdict = judge_rows(points, results, dense_fid, spread["fid_spread"])
    result = {
        "kind": RESULT_KIND,
        "rows": rows,
        "spread": spread,
        "verdict": verdict,
        "recipe": asdict(recipe),
        "workload": recipe.workload(),
        "machine": {**machine_description(), "dtype": "float32"},
        "base": base or "the shipped base DiT",
        "num_samples": recipe.num_samples,
        "num_reference": len(heldout.images),
        "phase_seconds": phase_seconds,
    }
    result["plot"] = str(plot_frontier(rows, dense_fid, spread["fid_spread"], out_dir / PLOT_NAME))
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(out_dir / "results.json", result)
    write_text_atomic(out_dir / "results.md", results_markdown(result))
    return result


def judge_rows(
    points: list[FrontierPoint],
    results: list,
    dense_quality: float,
    quality_spread: float,
    axis: QualityAxis = FID_AXIS,
    accuracy_key: str = "accuracy",
) -> tuple[list, dict]:
    """One row per point (its measured result, family and knobs), each family's frontiers marked, `no_loss` set
    (quality on `axis` within dense's and the spread); and the goal's verdict.

    Args:
        points: the points, dense first.
        results: one dataclass per point, in the same order (`compare.ContestResult`, `t2i_bench.T2IRow`).
        dense_quality, quality_spread: dense's quality on `axis` and its run-to-run spread (FID on the default
            axis).
        axis: the quality axis of the verdict and of `no_loss`.
        accuracy_key: the rows' accuracy field, for `mark_frontiers`.

    Returns:
        (rows as dicts, `goal_verdict`'s verdict).
    """
    rows = []
    for point, measured in zip(points, results):
        row = asdict(measured)
        row |= {"family": point.family, "setting": point.setting, "steps": point.steps}
        row |= {"target_kept_ratio": point.target_kept_ratio, "threshold": point.threshold}
        rows.append(row)
    mark_frontiers(rows, accuracy_key)
    verdict = goal_verdict(rows, dense_quality, quality_spread, axis=axis)
    for row in rows:
        row["no_loss"] = axis.within(row[axis.key], verdict[axis.limit_key])
    return rows, verdict


def _check_not_another_bench(out_dir: Path, task: str = "class") -> None:
    """Refuse a folder whose results.json another bench wrote, or the frontier of another task: this frontier's
    files would replace it (a frontier's results.json without "task" is the class-conditional one's)."""
    import json

    existing = out_dir / "results.json"
    if not existing.is_file():
        return
    try:
        payload = json.loads(existing.read_text())
        kind, its_task = payload.get("kind"), payload.get("task", "class")
    except (ValueError, AttributeError):
        kind, its_task = None, None
    if kind != RESULT_KIND or its_task != task:
        what = f"the --task {its_task} frontier's" if kind == RESULT_KIND else "another bench's"
        raise ValueError(f"{out_dir} holds {what} results.json, which the frontier would replace; use another --out")


# -- report ---------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".2f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def results_table(rows: list[dict]) -> str:
    """The frontier as one Markdown table, grouped by family in `FAMILIES` order."""
    lines = [
        "| family | setting | measured speedup | FLOP speedup | mean kept ratio | accuracy | feature FID "
        "| PSNR vs dense | no measurable loss | on frontier |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {family: number for number, family in enumerate(FAMILIES)}
    for row in sorted(rows, key=lambda r: order.get(r["family"], len(order))):
        lines.append(
            f"| {row['family']} | {row['setting']} | {row['speedup']:.2f}x | {row['flop_speedup']:.2f}x | "
            f"{_fmt(row.get('mean_kept_ratio'))} | {100 * row['accuracy']:.1f} % | {row['fid']:.2f} | "
            f"{_fmt(row['psnr_vs_dense'], '.1f')} | {_yes(row['no_loss'])} | {_yes(row['on_frontier'])} |"
        )
    return "\n".join(lines)


def results_markdown(result: dict) -> str:
    """`results.md`: how the frontier ran, the table, the plot, the FID spread and the goal's verdict."""
    recipe, machine, spread, verdict = result["recipe"], result["machine"], result["spread"], result["verdict"]
    rows = result["rows"]
    dense = next(row for row in rows if row["family"] == DENSE)
    again = [row for row in rows if row["family"] == FEWER_STEPS and row["steps"] == recipe["sampler_steps"]]
    phases = ", ".join(f"{phase} {seconds / 60:.1f} min" for phase, seconds in result["phase_seconds"].items())
    fids = ", ".join(f"{fid:.2f}" for fid in spread["dense_fids"])
    saturated = dense["accuracy"] >= 0.95
    out = [
        "### Speed-quality frontier (class-conditional default)",
        "",
        f"Base: {result['base']}, on the bundled digits. Every point samples the same {result['num_samples']} "
        f"images ({len(recipe['classes'])} classes x {recipe['num_per_class']}) from the same noise as dense "
        f"(DDIM {recipe['sampler_steps']} steps, CFG {recipe['guidance_scale']}), batches of {recipe['sample_batch']} "
        "interleaved across all points; measured speedup = dense's median latency per batch over the point's. "
        f"{DIFFCR} here is "
        + (
            "DiffCR-L (layer ratios)"
            if recipe["timestep_regions"] == 1
            else f"DiffCR-LT ({recipe['timestep_regions']} timestep regions)"
        )
        + f". Every trained model ({DIFFCR} per target kept ratio, {DENSE_TUNED}) got the same budget: "
        f"{recipe['train_steps']} steps of full fine-tuning at batch {recipe['train_batch']}. FLOPs are counted on "
        f"what executed. Feature FID against the {result['num_reference']} held-out images in the classifier's "
        "feature space is the quality axis"
        + (
            f"; classifier accuracy saturates (dense {100 * dense['accuracy']:.1f} %) and is shown for completeness."
            if saturated
            else f"; classifier accuracy (dense {100 * dense['accuracy']:.1f} %) is shown beside it."
        ),
        "",
        f"Machine: {machine.get('cpu')}{', ' + machine['gpu'] if machine.get('gpu') else ''}; torch "
        f"{machine.get('torch')}, {machine.get('threads')} threads. Whole run {result['seconds'] / 60:.1f} min "
        f"({phases}).",
        "",
        results_table(rows),
        "",
        f"![speed-quality frontier]({PLOT_NAME})",
        "",
        f"**FID's run-to-run spread**: dense on {len(spread['dense_fids'])} disjoint noise seed sets of "
        f"{spread['num_samples']} images each gives FID {fids}: spread {spread['fid_spread']:.2f}. A point has "
        f"no measurable loss when its FID is at most dense's {dense['fid']:.2f} + {spread['fid_spread']:.2f} = "
        f"{verdict['fid_limit']:.2f}."
        + (
            " With only two seed sets the spread is one difference: a rough band."
            if len(spread["dense_fids"]) == 2
            else ""
        ),
        "",
    ]
    if again:
        out += [
            f"Timing noise: the {recipe['sampler_steps']}-step point of {FEWER_STEPS} is dense again; its measured "
            f"speedup is {again[0]['speedup']:.2f}x.",
            "",
        ]
    out += verdict_lines(verdict)
    return "\n".join(out)


def verdict_lines(
    verdict: dict, axis: QualityAxis = FID_AXIS, describe: Callable[[str, dict], str] | None = None
) -> list[str]:
    """The report's closing Markdown lines: each family's highest measured speedup at no measurable loss, the
    goal's verdict, and the fine-tuning confound.

    Args:
        verdict: `goal_verdict`'s verdict on `axis`.
        axis: the quality axis of the verdict.
        describe: `describe(family, best)` gives what follows a best point's speedup in parentheses (default: its
            setting and quality on the axis, e.g. "10 steps, FID 10.40").
    """

    def default(family: str, best: dict) -> str:
        return f"{best['setting']}, {axis.show(best[axis.key])}"

    describe = describe or default
    out = ["**Highest measured speedup at no measurable loss, per family:**", ""]
    best_by_family = verdict["best"]
    ordered = [family for family in FAMILIES if family in best_by_family]
    ordered += [family for family in best_by_family if family not in ordered]
    for family in ordered:
        best = best_by_family[family]
        if best is None:
            out.append(f"- {family}: no point with {axis.bound(verdict[axis.limit_key])}")
        else:
            out.append(f"- {family}: {best['speedup']:.2f}x ({describe(family, best)})")
    out += [
        "",
        f"**Goal** ({DIFFCR_STEPS} reaches >= {verdict['goal']:g}x end to end at no measurable loss where "
        f"{FEWER_STEPS} alone cannot): {verdict['explanation']}",
        "",
    ]
    if verdict.get("against_tuned"):
        out += [f"**The fine-tuning confound.** {verdict['against_tuned']['explanation']}", ""]
    return out


def plot_frontier(
    rows: list[dict],
    dense_quality: float,
    spread: float,
    path: Path,
    axis: QualityAxis = FID_AXIS,
    other: QualityAxis = CLASSIFIER_ACCURACY,
) -> Path:
    """Two panels sharing x = measured speedup: quality on `axis` (top, FID by default) and on `other` (bottom,
    the classifier's accuracy by default). Each family one colour, its frontier a line, its other points open
    markers; dense a star; dense's quality ± its run-to-run `spread` shaded on the top panel; the goal dotted."""
    from diffcr.report import _matplotlib

    plt = _matplotlib()
    fig, (top_ax, bottom_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 7.5))
    panels = ((top_ax, axis), (bottom_ax, other))
    top_ax.axhspan(
        axis.scale * (dense_quality - spread),
        axis.scale * (dense_quality + spread),
        color="grey",
        alpha=0.2,
        label=f"dense {axis.name} ± run-to-run spread",
    )
    families = [family for family in FAMILIES if any(row["family"] == family for row in rows)]
    families += [family for family in dict.fromkeys(row["family"] for row in rows) if family not in families]
    for number, family in enumerate(families):
        colour = f"C{number}"
        mine = sorted((row for row in rows if row["family"] == family), key=lambda row: row["speedup"])
        if family == DENSE:
            for ax, panel in panels:
                speedups = [r["speedup"] for r in mine]
                ax.plot(speedups, [panel.scale * r[panel.key] for r in mine], "*", color="k", markersize=14)
            top_ax.plot([], [], "*", color="k", markersize=10, label=DENSE)
            continue
        for ax, panel in panels:
            front = [row for row in mine if row[panel.frontier_key]]
            others = [row for row in mine if not row[panel.frontier_key]]
            front_values = [panel.scale * r[panel.key] for r in front]
            other_values = [panel.scale * r[panel.key] for r in others]
            ax.plot([r["speedup"] for r in front], front_values, "o-", color=colour, markersize=6)
            ax.plot([r["speedup"] for r in others], other_values, "o", color=colour, mfc="none")
        top_ax.plot([], [], "o-", color=colour, label=family)
    for ax, panel in panels:
        ax.axvline(GOAL_SPEEDUP, color="k", linestyle=":", alpha=0.6, label=f"goal: {GOAL_SPEEDUP:g}x")
        ax.grid(alpha=0.3)
        ax.set_ylabel(panel.label)
        values = [row[panel.key] for row in rows if row[panel.key] is not None and row[panel.key] > 0]
        # a few very lossy points would flatten a distance's band: log scale
        if not panel.higher_is_better and values and max(values) > 3 * min(values):
            ax.set_yscale("log")
    top_ax.set_title("frontier of each family: line; other points: open markers", fontsize=9)
    top_ax.legend(fontsize=7, loc="best")
    bottom_ax.set_xlabel("measured end-to-end sampling speedup over dense")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
