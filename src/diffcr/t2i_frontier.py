"""`diffcr bench --only frontier --task t2i`: the speed-quality frontier on the text-to-image default.

The same families and knobs as the class-conditional frontier (`diffcr.frontier`): fewer sampler steps, the
first-block cache, DiffCR at several target kept ratios, DiffCR composed with fewer steps and with the cache, and
dense fine-tuned at the same training budget (alone and with fewer steps). Every point samples the 50 evaluation
prompts with several seeds each through the shipped PixArt pipeline, from the same seeds as dense, its batches
interleaved with every other point's (`t2i_bench.run_prompt_contest`), so speedups are whole pipeline calls
measured side by side.

The quality axis is prompt accuracy (`scene_judge.prompt_accuracy`: the digit each prompt asks for, read at its
slot; higher is better), with held-out-composition accuracy and feature FID beside it. How much accuracy moves by
chance is measured: dense is sampled again from disjoint seed sets, and the spread of its accuracies is the band
of "no measurable loss" (accuracy at least dense's minus the spread). The points, the Pareto frontiers and the
goal's verdict are `diffcr.frontier`'s, judged on `PROMPT_ACCURACY`.

Writes `results.json`, `results.md` and `frontier.png` into the output folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from diffcr.compare import DENSE, DENSE_TUNED, FBCACHE, FEWER_STEPS
from diffcr.frontier import (
    DIFFCR,
    DIFFCR_FBCACHE,
    FAMILIES,
    FID_AXIS,
    PLOT_NAME,
    RESULT_KIND,
    FrontierContestant,
    FrontierModels,
    FrontierPlan,
    FrontierPoint,
    FrontierRecipe,
    QualityAxis,
    _check_not_another_bench,
    _yes,
    frontier_points,
    judge_rows,
    plot_frontier,
    point_model,
    train_frontier_models,
    verdict_lines,
)
from diffcr.t2i_bench import PromptContestant, T2IBenchRecipe, T2IRow, _fmt, _percent

logger = logging.getLogger(__name__)

TASK = "t2i"  # results.json's "task": a frontier folder of the other task is not overwritten
PROMPT_ACCURACY = QualityAxis(
    key="digit_accuracy",
    name="digit accuracy",
    higher_is_better=True,
    percent=True,
    limit_key="accuracy_limit",
    frontier_key="on_accuracy_frontier",
    label="digits right at their slot (%, higher is better)",
)


@dataclass(frozen=True)
class T2IFrontierRecipe(FrontierPlan):
    """Sizes of the text-to-image frontier: `FrontierRecipe`'s families and knobs, the text-to-image bench's
    training budget and sampler.

    Args:
        sampler_steps: dense's sampler steps (the pipeline's scheduler); every speedup is over dense at these.
        step_counts: the sampler steps of "fewer steps" (dense's own count included: that point is dense again,
            and its measured speedup shows the timing noise).
        diffcr_targets: the target kept ratios of the DiffCR models (one trained model each).
        diffcr_step_counts: the sampler steps each DiffCR model is composed with.
        fbcache_thresholds: the first-block cache's relative-change thresholds on dense.
        diffcr_fbcache_thresholds: the thresholds each DiffCR model is composed with.
        tuned_step_counts: the sampler steps dense fine-tuned is composed with.
        families: which families to measure (dense, the reference, always runs); only the models they sample are
            trained.
        timestep_regions, ratio_loss_weight: DiffCR's regions (1: DiffCR-L) and lambda.
        route_cross_attention: the demo's and the bench's: False gives the tokens a block bypasses its
            cross-attention update (a diffcr option, docs/METHOD.md section 1; PixArt blocks only); True is the
            paper's routing.
        train_steps, train_batch, lr, router_lr, ratio_lr, lr_schedule, freeze_schedule_at: the budget every
            trained model gets (the DiffCR models and dense fine-tuned alike), on digit scenes: `T2IBenchRecipe`'s.
        guidance_scale: classifier-free guidance (PixArt's 4.5).
        sample_batch: prompts per pipeline call (timed and interleaved batch by batch).
        num_prompts: how many of the evaluation prompts (None = all 50), taken in turn from each kind.
        seeds_per_prompt: images per prompt, each from its own seed: every point samples
            `num_prompts x seeds_per_prompt` images (50 x 6 = 300 by default).
        num_reference: held-out scenes the feature FID compares against.
        spread_seeds: extra seed sets dense is sampled with, for accuracy's run-to-run spread. Set k draws image
            i from seed `seed + k * num_samples + i`, disjoint from the contest's set 0 and from each other.
        num_threads: CPU threads for training, sampling and timing (None = leave torch's setting).
        seed: the base seed of the images and of training.

    Example:
        >>> T2IFrontierRecipe().num_samples
        300
    """

    sampler_steps: int = T2IBenchRecipe.sampler_steps
    # the class-conditional frontier's knobs, so that the two frontiers are read side by side
    step_counts: tuple[int, ...] = FrontierRecipe.step_counts
    diffcr_targets: tuple[float, ...] = FrontierRecipe.diffcr_targets
    diffcr_step_counts: tuple[int, ...] = FrontierRecipe.diffcr_step_counts
    fbcache_thresholds: tuple[float, ...] = FrontierRecipe.fbcache_thresholds
    diffcr_fbcache_thresholds: tuple[float, ...] = FrontierRecipe.diffcr_fbcache_thresholds
    tuned_step_counts: tuple[int, ...] = FrontierRecipe.tuned_step_counts
    families: tuple[str, ...] = FAMILIES
    timestep_regions: int = 1
    ratio_loss_weight: float = T2IBenchRecipe.ratio_loss_weight
    route_cross_attention: bool = T2IBenchRecipe.route_cross_attention
    train_steps: int = T2IBenchRecipe.train_steps
    train_batch: int = T2IBenchRecipe.train_batch
    lr: float = T2IBenchRecipe.lr
    router_lr: float = T2IBenchRecipe.router_lr
    ratio_lr: float = T2IBenchRecipe.ratio_lr
    lr_schedule: str = T2IBenchRecipe.lr_schedule
    freeze_schedule_at: int = T2IBenchRecipe.freeze_schedule_at
    guidance_scale: float = T2IBenchRecipe.guidance_scale
    sample_batch: int = T2IBenchRecipe.sample_batch
    num_prompts: int | None = T2IBenchRecipe.num_prompts
    seeds_per_prompt: int = 6
    num_reference: int = T2IBenchRecipe.num_reference
    spread_seeds: tuple[int, ...] = (1, 2)
    num_threads: int | None = T2IBenchRecipe.num_threads
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sampler_steps", "train_steps", "train_batch", "sample_batch", "seeds_per_prompt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a whole number >= 1")
        if self.num_prompts is not None and (isinstance(self.num_prompts, bool) or self.num_prompts < 1):
            raise ValueError(f"num_prompts={self.num_prompts!r} must be >= 1, or None for all 50 evaluation prompts")
        if self.sampler_steps < 2:
            raise ValueError(f"sampler_steps={self.sampler_steps} must be >= 2 (fewer steps need fewer than dense's)")
        if self.num_reference < 2:
            raise ValueError(f"num_reference={self.num_reference} must be >= 2 (FID needs two images)")
        self._check_knobs()
        self.bench_recipe()  # the training fields, checked now rather than after the trained folder is cleared

    @classmethod
    def quick(cls) -> T2IFrontierRecipe:
        """A smoke run: every family, one or two points each, 10 prompts x 1 seed at 4 sampler steps, 4 training
        steps."""
        return cls(
            sampler_steps=4,
            step_counts=(4, 2),
            diffcr_targets=(0.5,),
            diffcr_step_counts=(2,),
            fbcache_thresholds=(0.2,),
            diffcr_fbcache_thresholds=(0.2,),
            tuned_step_counts=(2,),
            train_steps=4,
            freeze_schedule_at=2,
            train_batch=4,
            sample_batch=5,
            num_prompts=10,
            seeds_per_prompt=1,
            num_reference=50,
            num_threads=None,  # a smoke run's timings mean nothing: leave the caller's thread count
        )

    def bench_recipe(self) -> T2IBenchRecipe:
        """The `T2IBenchRecipe` that `train_t2i_variant` and `run_prompt_contest` read (budget, sizes, sampler)."""
        return T2IBenchRecipe(
            timestep_regions=self.timestep_regions,
            ratio_loss_weight=self.ratio_loss_weight,
            route_cross_attention=self.route_cross_attention,
            train_steps=self.train_steps,
            train_batch=self.train_batch,
            lr=self.lr,
            router_lr=self.router_lr,
            ratio_lr=self.ratio_lr,
            lr_schedule=self.lr_schedule,
            freeze_schedule_at=self.freeze_schedule_at,
            sampler_steps=self.sampler_steps,
            guidance_scale=self.guidance_scale,
            sample_batch=self.sample_batch,
            num_prompts=self.num_prompts,
            num_reference=self.num_reference,
            num_threads=self.num_threads,
            seed=self.seed,
        )

    def prompts(self) -> tuple[list[str], list[str]]:
        """(prompts, kinds) of every image a point samples: the evaluation prompts (`T2IBenchRecipe.prompts`),
        repeated `seeds_per_prompt` times. Image i is drawn from seed `seed + i`, so each repeat of a prompt has its
        own seed, and every batch mixes the prompt kinds."""
        prompts, kinds = self.bench_recipe().prompts()
        return prompts * self.seeds_per_prompt, kinds * self.seeds_per_prompt

    @property
    def num_samples(self) -> int:
        """Images every point samples."""
        return len(self.prompts()[0])


@dataclass
class PointContestant(PromptContestant, FrontierContestant):
    """A frontier point sampled through the pipeline: `PromptContestant`'s sampling, `FrontierContestant`'s name
    ("family: setting", unique across the points)."""


def build_prompt_contestant(point: FrontierPoint, models: FrontierModels, recipe: T2IFrontierRecipe):
    """The contestant that samples `point` through the pipeline: its transformer (a first-block cache on a copy
    when the point has a threshold, with its cache context around each run) and its sampler steps."""
    model, run_context = point_model(point, models)
    sample_cfg = recipe.bench_recipe().sample_config(point.steps)
    return PointContestant(point.family, None, point.setting, model, sample_cfg, run_context, point=point)


def measure_accuracy_spread(
    pipe, dense_model, recipe: T2IFrontierRecipe, reference: torch.Tensor, contest_dense: T2IRow
) -> dict:
    """Dense sampled again from each disjoint seed set of `spread_seeds`: its prompt accuracies and their spread
    (max - min, the contest's included), the band within which an accuracy difference is not measurable; held-out
    accuracy and FID likewise, for reference.

    Args:
        pipe: the pipeline; dense's transformer is put into it.
        dense_model: the shipped dense transformer.
        reference: held-out scenes (R, 1, 64, 64) for the feature FID.
        contest_dense: dense's judged row from the contest (seed set 0).
    """
    from diffcr.scene_judge import prompt_accuracy, scene_fid

    prompts, kinds = recipe.prompts()
    accuracies = [contest_dense.digit_accuracy]
    heldout = [_heldout(contest_dense.by_kind)]
    fids = [contest_dense.fid]
    for seed_set in recipe.spread_seeds:
        # seeds seed + k * n + i: disjoint from the contest's seed + i (k = 0) and from the other sets
        sample_cfg = replace(recipe.bench_recipe().sample_config(), seed=recipe.seed + seed_set * recipe.num_samples)
        images = PromptContestant(DENSE, None, "", dense_model, sample_cfg).sample(pipe, prompts)  # (n, H, W, 3)
        accuracy = prompt_accuracy(images, prompts, kinds)
        accuracies.append(accuracy["digit_accuracy"])
        heldout.append(_heldout(accuracy["by_kind"]))
        fids.append(scene_fid(reference, images))
    return {
        "seed_sets": [0, *recipe.spread_seeds],
        "dense_accuracies": accuracies,
        "dense_heldout_accuracies": heldout,
        "dense_fids": fids,
        "accuracy_spread": max(accuracies) - min(accuracies),
        "fid_spread": max(fids) - min(fids),
        "num_samples": recipe.num_samples,
    }


def _heldout(by_kind: dict) -> float | None:
    """Digit accuracy on the held-out compositions (None when no prompt of that kind was sampled)."""
    return by_kind.get("heldout", {}).get("digit_accuracy")


def run_t2i_frontier(
    out_dir: str | Path, recipe: T2IFrontierRecipe | None = None, base: str | Path = "t2i", progress: bool = True
) -> dict:
    """Train, sample and judge every point of the text-to-image frontier; write `results.json`, `results.md`,
    `frontier.png`.

    Args:
        out_dir: the output folder (created; a `trained/` folder of an earlier run in it is replaced).
        recipe: the sizes (default `T2IFrontierRecipe()`; `T2IFrontierRecipe.quick()` for a smoke run).
        base: "t2i" (the shipped pipeline) or a pipeline folder in its layout (`t2i_bench.load_bench_pipeline`).
        progress: show progress bars.

    Returns:
        What `results.json` holds: {"kind", "task", "rows", "spread", "verdict", "recipe", "workload", "machine",
        "base", "num_samples", "num_prompts", "num_reference", "seconds", "phase_seconds", "plot"}.

    Raises:
        ValueError: `out_dir` holds the results of another bench or of the class-conditional frontier; `base`
            cannot render digit scenes.

    Example:
        >>> result = run_t2i_frontier("runs/frontier-t2i", T2IFrontierRecipe.quick())  # doctest: +SKIP
        >>> result["verdict"]["reached"]  # doctest: +SKIP
    """
    from diffcr.api import check_config_fits
    from diffcr.benchmark import machine_description
    from diffcr.checkpoint import write_json_atomic, write_text_atomic
    from diffcr.config import DiffCRConfig
    from diffcr.data.scenes import DigitScenes
    from diffcr.t2i_bench import judge_contest, load_bench_pipeline, run_prompt_contest, train_t2i_variant
    from diffcr.train.scene_conditioning import SceneConditioning

    recipe = recipe or T2IFrontierRecipe()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_not_another_bench(out_dir, task=TASK)
    threads = recipe.num_threads or torch.get_num_threads()
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        torch.set_num_threads(threads)
    pipe = load_bench_pipeline(base)  # before any folder is made: a wrong base fails first
    dense_model = pipe.transformer  # taken now: every contestant's run puts its own transformer into the pipeline
    recipe, skipped = drop_families_that_cannot_run(recipe, dense_model)
    if recipe.trains_diffcr:  # a routing the blocks cannot run fails now, not after the first training
        planned = DiffCRConfig(
            timestep_regions=recipe.timestep_regions, route_cross_attention=recipe.route_cross_attention
        )
        check_config_fits(dense_model, planned)
    out_dir.mkdir(parents=True, exist_ok=True)
    trained_dir = out_dir / "trained"
    if trained_dir.exists():  # the frontier owns this folder: a re-run trains afresh
        shutil.rmtree(trained_dir)
    bench = recipe.bench_recipe()
    prompts, kinds = recipe.prompts()
    phase_seconds: dict[str, float] = {}

    phase_started = time.perf_counter()
    conditioning = SceneConditioning(
        DigitScenes("train", seed=recipe.seed), pipe.vae, pipe.tokenizer, pipe.text_encoder
    )

    def train_one(run_dir: Path, config) -> torch.nn.Module:
        if config is not None:
            config = config.replace(route_cross_attention=recipe.route_cross_attention)
        return train_t2i_variant(dense_model, conditioning, run_dir, bench, config, None, progress)

    models = train_frontier_models(dense_model, trained_dir, recipe, train_one)
    phase_seconds["training"] = time.perf_counter() - phase_started
    if on_cpu:
        # the training loop sets its own thread count (TrainConfig.num_threads): sampling and timing use the recipe's
        torch.set_num_threads(threads)

    phase_started = time.perf_counter()
    points = frontier_points(recipe)
    contestants = [build_prompt_contestant(point, models, recipe) for point in points]
    seconds, flops, images = run_prompt_contest(pipe, contestants, prompts, bench, progress)
    phase_seconds["sampling"] = time.perf_counter() - phase_started

    phase_started = time.perf_counter()
    reference = DigitScenes("heldout", seed=recipe.seed).batch(torch.arange(recipe.num_reference))[0]
    judged = judge_contest(contestants, images, seconds, flops, prompts, kinds, reference)
    phase_seconds["judging"] = time.perf_counter() - phase_started

    phase_started = time.perf_counter()
    logger.info("sampling dense again on %d disjoint seed sets for accuracy's spread", len(recipe.spread_seeds))
    spread = measure_accuracy_spread(pipe, dense_model, recipe, reference, judged[0])
    phase_seconds["spread"] = time.perf_counter() - phase_started

    rows, verdict = judge_t2i_rows(points, judged, spread["accuracy_spread"])
    result = {
        "kind": RESULT_KIND,
        "task": TASK,
        "rows": rows,
        "spread": spread,
        "verdict": verdict,
        "recipe": asdict(recipe),
        "workload": recipe.workload(),
        "machine": {**machine_description(), "dtype": "float32"},
        "base": str(base),
        "num_samples": recipe.num_samples,
        "num_prompts": len(prompts) // recipe.seeds_per_prompt,
        "num_reference": recipe.num_reference,
        "phase_seconds": phase_seconds,
        "skipped": skipped,
    }
    dense_accuracy = rows[0]["digit_accuracy"]
    plot_path = out_dir / PLOT_NAME
    result["plot"] = str(
        plot_frontier(rows, dense_accuracy, spread["accuracy_spread"], plot_path, PROMPT_ACCURACY, FID_AXIS)
    )
    result["seconds"] = time.perf_counter() - started
    write_json_atomic(out_dir / "results.json", result)
    write_text_atomic(out_dir / "results.md", results_markdown(result))
    return result


def drop_families_that_cannot_run(recipe: T2IFrontierRecipe, dense_model) -> tuple[T2IFrontierRecipe, list]:
    """The recipe without the first-block cache's families when diffusers' cache cannot attach to `dense_model`
    (a transformer of another layout), and what was dropped and why, so that the run does not fail after its
    training when it reaches the first cached point."""
    from diffcr.t2i_bench import check_fbcache

    cached = [family for family in recipe.families if family in (FBCACHE, DIFFCR_FBCACHE)]
    if not cached:
        return recipe, []
    problem = check_fbcache(dense_model)
    if problem is None:
        return recipe, []
    kept = tuple(family for family in recipe.families if family not in cached)
    if not [family for family in kept if family != DENSE]:
        raise ValueError(f"the frontier was asked for {', '.join(cached)} alone, and {problem}")
    logger.warning("leaving out %s: %s", ", ".join(cached), problem)
    return replace(recipe, families=kept), [{"family": family, "reason": problem} for family in cached]


def judge_t2i_rows(points: list[FrontierPoint], judged: list[T2IRow], accuracy_spread: float) -> tuple[list, dict]:
    """`frontier.judge_rows` on prompt accuracy: one row per point (its `T2IRow`, family, knobs and held-out
    accuracy), frontiers marked, `no_loss` set (digit accuracy at least dense's minus the spread); the verdict.

    Example:
        >>> rows, verdict = judge_t2i_rows(points, judged, 0.05)  # doctest: +SKIP
        >>> verdict["accuracy_limit"]  # dense's digit accuracy - 0.05  # doctest: +SKIP
    """
    rows, verdict = judge_rows(
        points, judged, judged[0].digit_accuracy, accuracy_spread, axis=PROMPT_ACCURACY, accuracy_key="digit_accuracy"
    )
    for row in rows:
        row["heldout_accuracy"] = _heldout(row["by_kind"])
    return rows, verdict


# -- report ---------------------------------------------------------------------------------------------


def results_table(rows: list[dict]) -> str:
    """The frontier as one Markdown table, grouped by family in `FAMILIES` order."""
    lines = [
        "| family | setting | measured speedup | FLOP speedup | mean kept ratio | digits right | held-out "
        "compositions | images right | feature FID | PSNR vs dense | no measurable loss | on accuracy frontier |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {family: number for number, family in enumerate(FAMILIES)}
    for row in sorted(rows, key=lambda r: order.get(r["family"], len(order))):
        lines.append(
            f"| {row['family']} | {row['setting']} | {row['speedup']:.2f}x | {row['flop_speedup']:.2f}x | "
            f"{_fmt(row.get('mean_kept_ratio'))} | {_percent(row['digit_accuracy'])} | "
            f"{_percent(row['heldout_accuracy'])} | {_percent(row['image_accuracy'])} | {_fmt(row['fid'], '.1f')} | "
            f"{_fmt(row['psnr_vs_dense'], '.1f')} | {_yes(row['no_loss'])} | {_yes(row['on_accuracy_frontier'])} |"
        )
    return "\n".join(lines)


def results_markdown(result: dict) -> str:
    """`results.md`: how the frontier ran, the table, the plot, accuracy's spread and the goal's verdict."""
    recipe, machine, spread, verdict = result["recipe"], result["machine"], result["spread"], result["verdict"]
    rows = result["rows"]
    dense = rows[0]
    again = [row for row in rows if row["family"] == FEWER_STEPS and row["steps"] == recipe["sampler_steps"]]
    phases = ", ".join(f"{phase} {seconds / 60:.1f} min" for phase, seconds in result["phase_seconds"].items())
    accuracies = ", ".join(_percent(value) for value in spread["dense_accuracies"])
    heldout = ", ".join(_percent(value) for value in spread["dense_heldout_accuracies"])
    fids = ", ".join(_fmt(value, ".1f") for value in spread["dense_fids"])
    by_setting = {(row["family"], row["setting"]): row for row in rows}

    def describe(family: str, best: dict) -> str:
        row = by_setting[(family, best["setting"])]
        return (
            f"{row['setting']}, {PROMPT_ACCURACY.show(row['digit_accuracy'])}, held-out "
            f"{_percent(row['heldout_accuracy'])}, FID {_fmt(row['fid'], '.1f')}"
        )

    regions, seeds = recipe["timestep_regions"], recipe["seeds_per_prompt"]
    out = [
        "### Speed-quality frontier (text-to-image default)",
        "",
        f"Base: {result['base']}, on digit scenes. Every point samples the same {result['num_samples']} images "
        f"({result['num_prompts']} evaluation prompts x {seeds} seed{'s' * (seeds != 1)}) from the same seeds as "
        f"dense (the pipeline's sampler, {recipe['sampler_steps']} steps, CFG {recipe['guidance_scale']}), batches of "
        f"{recipe['sample_batch']} prompts interleaved across all points; measured speedup = dense's median latency "
        "per full batch of a whole pipeline call (text encoding and VAE decoding included) over the point's. "
        f"{DIFFCR} here is "
        + ("DiffCR-L (layer ratios)" if regions == 1 else f"DiffCR-LT ({regions} timestep regions)")
        + (
            ", routed as the paper routes (bypassed tokens skip the whole block)"
            if recipe.get("route_cross_attention", True)
            else ", routed as the demo routes (the tokens a block bypasses still get its cross-attention update)"
        )
        + f". Every trained model ({DIFFCR} per target kept ratio, {DENSE_TUNED}) got the same budget: "
        f"{recipe['train_steps']} steps of full fine-tuning at batch {recipe['train_batch']} on digit scenes"
        + (
            f" ({DIFFCR}'s kept ratios frozen at their bins after step {recipe['freeze_schedule_at']})"
            if recipe.get("freeze_schedule_at")
            else ""
        )
        + ". FLOPs "
        "are counted on what executed. The quality axis is prompt accuracy: the shipped classifier reads the "
        "digit each prompt asks for at its slot (digits right, higher is better); accuracy on the held-out "
        "compositions (pairs no training scene holds), whole images right and feature FID against "
        f"{result['num_reference']} held-out scenes are shown beside it.",
        "",
        f"Machine: {machine.get('cpu')}{', ' + machine['gpu'] if machine.get('gpu') else ''}; torch "
        f"{machine.get('torch')}, {machine.get('threads')} threads. Whole run {result['seconds'] / 60:.1f} min "
        f"({phases}).",
        "",
        results_table(rows),
        "",
        f"![speed-quality frontier, text to image]({PLOT_NAME})",
        "",
        f"**Prompt accuracy's run-to-run spread**: dense on {len(spread['dense_accuracies'])} disjoint seed sets of "
        f"{spread['num_samples']} images each gets {accuracies} of the digits right: spread "
        f"{100 * spread['accuracy_spread']:.1f} points. A point has no measurable loss when its digit accuracy is "
        f"at least dense's {_percent(dense['digit_accuracy'])} - {100 * spread['accuracy_spread']:.1f} = "
        f"{PROMPT_ACCURACY.number(verdict[PROMPT_ACCURACY.limit_key])}. On the same seed sets, held-out "
        f"compositions: {heldout}; feature FID: {fids}."
        + (
            " With only two seed sets the spread is one difference: a rough band."
            if len(spread["dense_accuracies"]) == 2
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
    out += verdict_lines(verdict, PROMPT_ACCURACY, describe)
    for skipped in result.get("skipped", []):
        out += ["", f"Skipped, {skipped['family']}: {skipped['reason']}"]
    return "\n".join(out)
