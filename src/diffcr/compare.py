"""DiffCR against the alternatives a user would pick, on the embedded default (shipped DiT, bundled digits).

Every method is tuned to a target sampling speedup over dense (`match_knob` on measured latency), trained
where it learns (same budget for all), then every contestant samples the same noise with its batches
interleaved with everyone else's, so latencies are side by side. Each gets measured latency and speedup,
the FLOPs of what executed (counted), peak memory, and quality: classifier accuracy, feature FID against
the held-out split, PSNR / SSIM against dense samples from the same noise.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DIFFCR_LT = "DiffCR-LT"
DIFFCR_L = "DiffCR-L"
UNIFORM = "uniform routing (MoD)"
RANDOM = "random routing"
TOME = "ToMe (tomesd)"
FEWER_STEPS = "fewer steps"
FBCACHE = "first-block cache"
DENSE = "dense"
DENSE_TUNED = "dense, fine-tuned"


@dataclass(frozen=True)
class CompareRecipe:
    """Sizes of the comparison. `speedups`: the target measured speedups; every trained variant gets the
    same `train_steps` of full fine-tuning (the demo's learning rates, the quick demo's ratio lr)."""

    speedups: tuple[float, ...] = (1.25, 1.5, 2.0)
    gate_speedup: float = 1.5
    gates: tuple[str, ...] = ("straight_through", "sigmoid_block", "sigmoid_mlp")
    timestep_regions: int = 4
    ratio_loss_weight: float = 0.3
    train_steps: int = 40
    train_batch: int = 16
    lr: float = 1e-4
    router_lr: float = 1e-3
    ratio_lr: float = 3e-2
    classes: tuple[int, ...] = tuple(range(10))
    num_per_class: int = 10
    sample_batch: int = 10
    sampler_steps: int = 20
    guidance_scale: float = 3.0
    search_repeats: int = 3
    search_iterations: int = 4
    probe_steps: int = 5
    seed: int = 0

    @classmethod
    def quick(cls) -> CompareRecipe:
        return cls(
            speedups=(1.5,),
            train_steps=2,
            train_batch=4,
            classes=(0, 1),
            num_per_class=2,
            sample_batch=2,
            sampler_steps=4,
            search_repeats=1,
            search_iterations=2,
            probe_steps=2,
        )

    def sample_config(self, steps: int | None = None):
        from diffcr.sampling import SampleConfig

        return SampleConfig(
            scheduler="ddim",
            steps=steps or self.sampler_steps,
            guidance_scale=self.guidance_scale,
            batch_size=self.sample_batch,
            seed=self.seed,
        )


@dataclass
class Contestant:
    """One way of sampling: a model, a sampler config and a context entered around each sampling run."""

    method: str
    target_speedup: float | None
    knob: str
    model: torch.nn.Module
    sample_cfg: object
    run_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    note: str = ""

    @property
    def name(self) -> str:
        return self.method if self.target_speedup is None else f"{self.method} @{self.target_speedup:g}x"

    def sample(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from diffcr.models.tiny_dit import null_class_id
        from diffcr.sampling import denoise

        with self.run_context():
            return denoise(self.model, noise, labels, self.sample_cfg, null_class_id(self.model))


@dataclass
class ContestResult:
    name: str
    method: str
    target_speedup: float | None
    knob: str
    seconds_per_batch: float
    speedup: float
    gflops_per_image: float
    flop_speedup: float
    peak_memory_mib: float
    accuracy: float
    fid: float
    psnr_vs_dense: float | None
    ssim_vs_dense: float | None
    note: str = ""
    mean_kept_ratio: float | None = None
    schedule: list[list[float]] = field(default_factory=list)


# -- preparing contestants ------------------------------------------------------------------------------


def frozen_uniform(base, kept_ratio: float, **config_overrides):
    """A copy of `base` routing every block at `kept_ratio` (routers untrained): for latency probes only,
    since speed depends on how many tokens run, not on which. `config_overrides` go to `uniform_config`
    (e.g. `route_cross_attention=False`)."""
    import diffcr
    from diffcr.baselines import uniform_config

    model = copy.deepcopy(base)
    diffcr.apply(model, uniform_config(kept_ratio, **config_overrides))
    diffcr.freeze(model)
    return model.eval()


def sampling_latency(
    contestants: dict[str, Contestant], labels: torch.Tensor, repeats: int, warmup: int = 0
) -> dict[str, float]:
    """Median seconds of one sampling run of `labels` per contestant, runs interleaved."""
    from diffcr.benchmark import time_alternating
    from diffcr.sampling import initial_noise, model_image_shape

    first = next(iter(contestants.values()))
    noise = initial_noise(list(range(len(labels))), model_image_shape(first.model), first.sample_cfg.seed)
    fns = {name: (lambda c=c: c.sample(noise, labels)) for name, c in contestants.items()}
    return time_alternating(fns, repeats=repeats, warmup=warmup)


class SpeedupSearch:
    """Finds, per method, the knob whose measured speedup over dense is closest to a target. Measurements
    are cached per method, so the targets share their probes.

    Methods whose cost is the same at every step (routing at a uniform ratio, ToMe) are probed with
    `probe_steps` sampler steps to save time; step caching, whose savings depend on the trajectory, with all.
    """

    def __init__(self, dense: Contestant, labels: torch.Tensor, recipe: CompareRecipe):
        self.dense = dense
        self.labels = labels
        self.recipe = recipe
        self._cache: dict[str, dict[float, float]] = {}

    def speedup(self, method: str, make: Callable[[float], Contestant], knob: float, steps: int) -> float:
        cache = self._cache.setdefault(method, {})
        if knob not in cache:
            probe = make(knob)
            contestants = {
                name: replace(c, sample_cfg=replace(c.sample_cfg, steps=steps))
                for name, c in (("dense", self.dense), ("probe", probe))
            }
            seconds = sampling_latency(contestants, self.labels, self.recipe.search_repeats, warmup=1)
            cache[knob] = seconds["dense"] / seconds["probe"]
            logger.info("%s knob %.3f: %.2fx", method, knob, cache[knob])
        return cache[knob]

    def match(
        self,
        method: str,
        make: Callable[[float], Contestant],
        target: float,
        low: float,
        high: float,
        steps_constant: bool = True,
    ) -> tuple[float, float]:
        from diffcr.benchmark import match_knob

        steps = self.recipe.probe_steps if steps_constant else self.recipe.sampler_steps
        return match_knob(
            lambda knob: self.speedup(method, make, knob, steps), target, low, high, self.recipe.search_iterations
        )


def train_variant(
    base,
    train_set,
    out_dir: Path,
    recipe: CompareRecipe,
    diffcr_config=None,
    ratio_lr: float | None = None,
    progress: bool = False,
):
    """Full fine-tune of a copy of `base` with `diffcr_config` (None = dense) for the recipe's budget; returns
    the trained model in eval mode with its schedule frozen."""
    import diffcr
    from diffcr.train import TrainConfig, train

    cfg = TrainConfig(
        mode="full" if diffcr_config is not None else "pretrain",
        steps=recipe.train_steps,
        batch_size=recipe.train_batch,
        lr=recipe.lr,
        router_lr=recipe.router_lr,
        ratio_lr=recipe.ratio_lr if ratio_lr is None else ratio_lr,
        checkpoint_every=recipe.train_steps,
        seed=recipe.seed,
        num_threads=torch.get_num_threads(),  # the caller's: a bench pins its threads once for every part
    )
    model = copy.deepcopy(base)
    result = train(out_dir, model, train_set, cfg, diffcr_config=diffcr_config, progress=progress)
    if diffcr_config is not None:
        diffcr.freeze(result.model)
    return result.model.eval()


# -- the contest ----------------------------------------------------------------------------------------


def run_contest(
    contestants: list[Contestant], classifier, heldout, recipe: CompareRecipe, progress: bool = True
) -> tuple[list[ContestResult], dict[str, torch.Tensor]]:
    """Sample the recipe's images with every contestant (batches interleaved, order rotating), then score.

    The first contestant is the dense reference. Returns the results and the images per contestant.
    """
    from tqdm.auto import tqdm

    from diffcr.benchmark import count_flops, peak_memory
    from diffcr.evaluation import evaluate_samples
    from diffcr.sampling import initial_noise, interleaved_class_labels, model_image_shape

    labels = interleaved_class_labels(list(recipe.classes), recipe.num_per_class)
    shape = model_image_shape(contestants[0].model)
    names = [c.name for c in contestants]
    if len(set(names)) != len(names):
        raise ValueError(f"contestant names must be unique: {names}")
    # untimed: the first batch under the FLOP counter and the memory tracker (also warms every contestant up)
    first_idx = list(range(min(recipe.sample_batch, len(labels))))
    first_noise = initial_noise(first_idx, shape, recipe.seed)
    flops, memory = {}, {}
    for contestant in contestants:
        (_, peak), counted = count_flops(
            lambda c=contestant: peak_memory(
                lambda: c.sample(first_noise, labels[first_idx]), next(c.model.parameters()).device
            )
        )
        flops[contestant.name] = counted / len(first_idx)
        memory[contestant.name] = peak
    images: dict[str, list[torch.Tensor]] = {c.name: [] for c in contestants}
    seconds: dict[str, list[float]] = {c.name: [] for c in contestants}
    starts = list(range(0, len(labels), recipe.sample_batch))
    bar = tqdm(total=len(starts) * len(contestants), desc="sampling every method", disable=not progress)
    for batch_no, start in enumerate(starts):
        idx = list(range(start, min(start + recipe.sample_batch, len(labels))))
        noise = initial_noise(idx, shape, recipe.seed)
        shift = batch_no % len(contestants)
        for contestant in contestants[shift:] + contestants[:shift]:
            begin = time.perf_counter()
            images[contestant.name].append(contestant.sample(noise, labels[idx]))
            seconds[contestant.name].append(time.perf_counter() - begin)
            bar.update(1)
    bar.close()
    full = [i for i, start in enumerate(starts) if start + recipe.sample_batch <= len(labels)] or [0]
    median = {name: statistics.median(seconds[name][i] for i in full) for name in seconds}
    stacked = {name: torch.cat(chunks) for name, chunks in images.items()}
    dense = contestants[0]
    results = []
    for contestant in contestants:
        reference = None if contestant is dense else stacked[dense.name]
        quality = evaluate_samples(classifier, stacked[contestant.name], labels, heldout.images, reference)
        results.append(
            ContestResult(
                name=contestant.name,
                method=contestant.method,
                target_speedup=contestant.target_speedup,
                knob=contestant.knob,
                seconds_per_batch=median[contestant.name],
                speedup=median[dense.name] / median[contestant.name],
                gflops_per_image=flops[contestant.name] / 1e9,
                flop_speedup=flops[dense.name] / flops[contestant.name],
                peak_memory_mib=memory[contestant.name] / 2**20,
                accuracy=quality.accuracy,
                fid=quality.fid,
                psnr_vs_dense=quality.psnr_vs_dense,
                ssim_vs_dense=quality.ssim_vs_dense,
                note=contestant.note,
                **_schedule_fields(contestant.model),
            )
        )
    return results, {**stacked, "_labels": labels}


def _schedule_fields(model) -> dict:
    import diffcr

    if not diffcr.is_applied(model):
        return {}
    sched = diffcr.schedule(model)
    return {"mean_kept_ratio": sched.mean_kept_ratio, "schedule": sched.kept_ratio}


# -- the whole comparison -------------------------------------------------------------------------------


@dataclass
class Comparison:
    results: list[ContestResult]
    trained: dict[str, Path]
    uniform_knobs: dict[float, float]
    tome_note: str
    fbcache_note: str
    images: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    models: dict[str, torch.nn.Module] = field(repr=False, default_factory=dict)

    def rows(self) -> list[dict]:
        return [asdict(result) for result in self.results]


def compare_methods(
    out_dir: str | Path, recipe: CompareRecipe | None = None, base: str | None = None, progress: bool = True
) -> Comparison:
    """Tune, train and run every method on the shipped base; returns the results (also the trained models
    and the images, for the findings)."""
    import diffcr
    from diffcr.baselines import FirstBlockCache, apply_tome, randomize_routers, uniform_config
    from diffcr.data import load_dataset
    from diffcr.models import load_base_model
    from diffcr.models.classifier import load_classifier
    from diffcr.sampling import interleaved_class_labels

    recipe = recipe or CompareRecipe()
    out_dir = Path(out_dir)
    train_set, heldout = load_dataset()
    classifier = load_classifier()
    dense_model = load_base_model(base).eval()
    sample_cfg = recipe.sample_config()
    dense = Contestant(DENSE, None, f"{recipe.sampler_steps} steps", dense_model, sample_cfg)
    # a mix of classes, like the contest's batches
    probe_labels = interleaved_class_labels(list(recipe.classes), recipe.num_per_class)[: recipe.sample_batch]
    search = SpeedupSearch(dense, probe_labels, recipe)

    def routed(model, method, target, knob):
        return Contestant(method, target, knob, model, sample_cfg)

    def tome(ratio: float) -> Contestant:
        return Contestant(TOME, None, f"merge {ratio:.2f}", apply_tome(copy.deepcopy(dense_model), ratio), sample_cfg)

    def fbcache(threshold: float) -> Contestant:
        cache = FirstBlockCache(copy.deepcopy(dense_model), threshold)
        return Contestant(FBCACHE, None, f"threshold {threshold:.3f}", cache.model, sample_cfg, cache.sampling_run)

    def fewer_steps(steps: int) -> Contestant:
        return Contestant(FEWER_STEPS, None, f"{steps} steps", dense_model, recipe.sample_config(steps))

    contestants = [dense]
    trained: dict[str, Path] = {}
    models: dict[str, torch.nn.Module] = {}
    uniform_knobs: dict[float, float] = {}
    trained_dir = out_dir / "trained"
    if trained_dir.exists():  # the bench owns this folder: a re-run trains afresh
        import shutil

        shutil.rmtree(trained_dir)
    logger.info("training the dense fine-tuning reference")
    dense_tuned = train_variant(dense_model, train_set, trained_dir / "dense-tuned", recipe, None, progress=progress)
    contestants.append(Contestant(DENSE_TUNED, None, f"{recipe.train_steps} steps fine-tuned", dense_tuned, sample_cfg))
    for target in recipe.speedups:
        kept, _ = _match_kept(search, dense_model, sample_cfg, target)
        uniform_knobs[target] = kept
        base_cfg = diffcr.DiffCRConfig(
            target_kept_ratio=kept, timestep_regions=recipe.timestep_regions, ratio_loss_weight=recipe.ratio_loss_weight
        )
        variants = {
            DIFFCR_LT: (base_cfg, None),
            DIFFCR_L: (base_cfg.replace(timestep_regions=1), None),
            UNIFORM: (uniform_config(kept), 0.0),
        }
        for method, (config, ratio_lr) in variants.items():
            tag = f"{method.split()[0]}-{target:g}x"
            logger.info("training %s (target kept %.2f)", tag, kept)
            model = train_variant(dense_model, train_set, trained_dir / tag, recipe, config, ratio_lr, progress)
            trained[f"{method} @{target:g}x"] = trained_dir / tag
            models[f"{method} @{target:g}x"] = model
            contestants.append(routed(model, method, target, f"target kept {kept:.2f}"))
        random_model = randomize_routers(copy.deepcopy(models[f"{DIFFCR_LT} @{target:g}x"]), seed=recipe.seed)
        contestants.append(routed(random_model, RANDOM, target, "DiffCR-LT's schedule"))
        ratio, _ = search.match(TOME, tome, target, 0.0, 0.75)
        contestants.append(replace(tome(ratio), target_speedup=target))
        threshold, _ = search.match(FBCACHE, fbcache, target, 0.0, 1.0, steps_constant=False)
        contestants.append(replace(fbcache(threshold), target_speedup=target))
        # latency is proportional to the number of steps (same model, same batch): no probe needed
        steps = max(1, round(recipe.sampler_steps / target))
        contestants.append(replace(fewer_steps(steps), target_speedup=target))
    gate_target = recipe.gate_speedup
    if gate_target in uniform_knobs:
        for gate in recipe.gates:
            key = f"{DIFFCR_LT} @{gate_target:g}x"
            if gate == "straight_through":
                models[f"gate {gate}"] = models[key]
                continue
            config = diffcr.DiffCRConfig(
                target_kept_ratio=uniform_knobs[gate_target],
                timestep_regions=recipe.timestep_regions,
                ratio_loss_weight=recipe.ratio_loss_weight,
                gate=gate,
            )
            tag = f"gate-{gate}-{gate_target:g}x"
            model = train_variant(dense_model, train_set, trained_dir / tag, recipe, config, None, progress)
            trained[f"gate {gate}"] = trained_dir / tag
            models[f"gate {gate}"] = model
            contestants.append(routed(model, f"DiffCR-LT, gate {gate}", gate_target, "same budget"))
    results, images = run_contest(contestants, classifier, heldout, recipe, progress=progress)
    return Comparison(
        results=results,
        trained=trained,
        uniform_knobs=uniform_knobs,
        tome_note=TOME_NOTE,
        fbcache_note=FBCACHE_NOTE,
        images=images,
        models=models,
    )


def _match_kept(search: SpeedupSearch, dense_model, sample_cfg, target: float) -> tuple[float, float]:
    """The uniform kept ratio whose frozen routing reaches `target` (bigger knob = faster: search -kept)."""

    def make(negative_kept: float) -> Contestant:
        return Contestant(UNIFORM, None, "", frozen_uniform(dense_model, round(-negative_kept, 3)), sample_cfg)

    negative_kept, speedup = search.match("kept ratio", make, target, -0.95, -0.1)
    return round(-negative_kept, 3), speedup


TOME_NOTE = (
    "tomesd 0.1.3 runs on diffusers' DiT as is, but with its default max_downsample=1 it merges nothing: it "
    "infers a layer's downsampling from input pixels per token, and a DiT's patch size (2) counts as "
    "downsampling 2. diffcr sets max_downsample to the patch size, use_rand=False (fixed destination "
    "tokens), and merges for attention and MLP (tomesd's default merges for attention only, which leaves "
    "most of a DiT block's FLOPs untouched)."
)
FBCACHE_NOTE = (
    "diffusers' first-block cache (FirstBlockCacheConfig) attached to the DiT's blocks; DiT is not a "
    "CacheMixin, so diffcr sets the cache context around its own sampling loop (one context for the "
    "CFG-doubled batch, state reset per sampling run). The knob is the relative-change threshold."
)
