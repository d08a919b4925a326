"""Side-by-side speed measurement: dense and routed forwards alternate in one process, median of repeats.

Also analytic FLOPs of what a routed model actually executes, so every measured speedup stands next to
its FLOP-ideal value (dense FLOPs / routed FLOPs, attention's quadratic term included).
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from diffcr.adapters import get_adapter
from diffcr.ratios import num_kept_tokens

logger = logging.getLogger(__name__)


def machine_description() -> dict:
    """Hardware and software facts to print beside every figure."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_flops(
    model, num_tokens: int, kept_ratios: list[float] | None = None, context_tokens: int = 0, batch_size: int = 1
) -> int:
    """Analytic FLOPs of the transformer blocks for one forward.

    Args:
        model: a supported transformer (routed or not).
        num_tokens: image tokens per sample.
        kept_ratios: kept ratio per block (None = dense); each block computes `num_kept_tokens` tokens.
        context_tokens: text tokens for cross-attention (PixArt).
    """
    import diffcr

    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    kept_ratios = kept_ratios or [1.0] * len(blocks)
    # with route_cross_attention=False, bypassed tokens still run the block's cross-attention
    cross_on_bypassed = diffcr.is_applied(model) and not diffcr.get_config(model).route_cross_attention
    total = 0
    for kept in kept_ratios:
        kept_tokens = num_kept_tokens(kept, num_tokens)
        if kept_tokens:
            total += adapter.block_flops(model, kept_tokens, context_tokens)
        if cross_on_bypassed and kept_tokens < num_tokens:
            bypassed = num_tokens - kept_tokens
            total += adapter.cross_attention_flops(model, bypassed, context_tokens, text_projections=not kept_tokens)
        if kept_tokens not in (0, num_tokens):
            total += 2 * num_tokens * adapter.hidden_size(model)  # the router
    return total * batch_size


def schedule_flops(model, num_tokens: int, kept_table: list[list[float]], context_tokens: int = 0) -> float:
    """Mean FLOPs per sample of one forward under a (layer x region) schedule, regions equally likely."""
    regions = len(kept_table[0])
    per_region = [
        model_flops(model, num_tokens, [row[r] for row in kept_table], context_tokens) for r in range(regions)
    ]
    return sum(per_region) / regions


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved (a, b, c, a, b, c, ...) after warm-up,
    so that a noisy machine slows every contestant alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


@dataclass
class SpeedRow:
    family: str
    num_tokens: int
    batch_size: int
    kept_ratio: float
    dense_ms: float
    routed_ms: float
    speedup: float
    ideal_speedup: float

    @property
    def efficiency(self) -> float:
        return self.speedup / self.ideal_speedup


def random_transformer(
    family: str,
    num_tokens: int,
    width: int = 384,
    num_layers: int = 12,
    heads: int = 6,
    text_tokens: int = 120,
    seed: int = 0,
):
    """A random-weight transformer of the given family, shaped for `num_tokens` image tokens (patch 2).

    family "pixart": `PixArtTransformer2DModel` (adaLN-single, cross-attention to `text_tokens` tokens);
    "dit": `DiTTransformer2DModel` (adaLN-Zero, class labels); "sd3": `SD3Transformer2DModel` (joint attention
    with `text_tokens` text tokens); "flux": `FluxTransformer2DModel` (a third of the layers double-stream, the
    rest single-stream, as in Flux, rotary positions). Returns (model, make_inputs(batch)).
    """
    side = int(round(num_tokens**0.5)) * 2
    torch.manual_seed(seed)
    if family == "pixart":
        from diffusers import PixArtTransformer2DModel

        model = PixArtTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=4,
            out_channels=8,
            num_layers=num_layers,
            cross_attention_dim=width,
            sample_size=side,
            patch_size=2,
            caption_channels=width,
            norm_num_groups=32,
            # PixArt-Sigma's setting; diffusers would switch on PixArt-alpha's size conditioning at 128x128
            use_additional_conditions=False,
        )

        def make_inputs(batch: int) -> dict:
            return {
                "hidden_states": torch.randn(batch, 4, side, side),
                "timestep": torch.randint(0, 1000, (batch,)),
                "encoder_hidden_states": torch.randn(batch, text_tokens, width),
                "encoder_attention_mask": torch.ones(batch, text_tokens),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            }
    elif family == "dit":
        from diffusers import DiTTransformer2DModel

        model = DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=width // heads,
            in_channels=4,
            out_channels=8,
            num_layers=num_layers,
            sample_size=side,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )

        def make_inputs(batch: int) -> dict:
            return {
                "hidden_states": torch.randn(batch, 4, side, side),
                "timestep": torch.randint(0, 1000, (batch,)),
                "class_labels": torch.randint(0, 1000, (batch,)),
            }
    elif family == "sd3":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel(
            sample_size=side,
            patch_size=2,
            in_channels=16,
            num_layers=num_layers,
            attention_head_dim=width // heads,
            num_attention_heads=heads,
            joint_attention_dim=width,
            caption_projection_dim=width,
            pooled_projection_dim=width,
            out_channels=16,
            pos_embed_max_size=side,
        )

        def make_inputs(batch: int) -> dict:
            return {
                "hidden_states": torch.randn(batch, 16, side, side),
                "timestep": torch.rand(batch) * 1000,
                "encoder_hidden_states": torch.randn(batch, text_tokens, width),
                "pooled_projections": torch.randn(batch, width),
            }
    elif family == "flux":
        from diffusers import FluxTransformer2DModel

        head_dim = width // heads
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=num_layers // 3,
            num_single_layers=num_layers - num_layers // 3,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=width,
            pooled_projection_dim=width,
            axes_dims_rope=[head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8],
        )
        grid = side // 2  # packed latents: one token per 2x2 patch

        def make_inputs(batch: int) -> dict:
            ids = torch.meshgrid(torch.zeros(1), torch.arange(float(grid)), torch.arange(float(grid)), indexing="ij")
            return {
                "hidden_states": torch.randn(batch, grid * grid, 64),
                "timestep": torch.rand(batch),  # Flux receives sigma in [0, 1]
                "encoder_hidden_states": torch.randn(batch, text_tokens, width),
                "pooled_projections": torch.randn(batch, width),
                "img_ids": torch.stack(ids, -1).reshape(-1, 3),
                "txt_ids": torch.zeros(text_tokens, 3),
            }
    else:
        raise ValueError(f"unknown family {family!r}; use 'pixart', 'dit', 'sd3' or 'flux'")
    return model.eval(), make_inputs


def routing_speed(
    family: str,
    num_tokens: int,
    batch_size: int,
    kept_ratios=(0.8, 0.5, 0.3),
    repeats: int = 7,
    warmup: int = 2,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    **shape,
) -> list[SpeedRow]:
    """Dense vs routed forward latency of one random-weight model, every kept ratio in one interleaved run.

    Each routed variant is a frozen uniform schedule (every block at the same kept ratio), so the figures
    show routing's cost and savings, not a learned schedule's.
    """
    import diffcr

    dense, make_inputs = random_transformer(family, num_tokens, **shape)
    dense = dense.to(device) if dtype == torch.float32 else dense.to(device=device, dtype=dtype)
    inputs = {
        k: (
            v.to(device=device, dtype=dtype)
            if torch.is_tensor(v) and v.is_floating_point()
            else v.to(device)
            if torch.is_tensor(v)
            else v
        )
        for k, v in make_inputs(batch_size).items()
    }
    text_tokens = inputs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in inputs else 0
    import copy

    routed_models = {}
    for kept in kept_ratios:
        routed = copy.deepcopy(dense)
        bins = tuple(sorted({1.0, float(kept), 0.05}, reverse=True))
        diffcr.apply(routed, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=bins, init_kept_ratio=kept))
        diffcr.freeze(routed)
        routed_models[kept] = routed

    def forward(model):
        def call():
            with torch.inference_mode():
                return model(**inputs).sample

        return call

    fns = {"dense": forward(dense)}
    fns.update({f"kept {kept}": forward(model) for kept, model in routed_models.items()})
    medians = time_alternating(fns, repeats=repeats, warmup=warmup)
    dense_flops = model_flops(dense, num_tokens, None, text_tokens)
    rows = []
    for kept in routed_models:
        routed_flops = model_flops(dense, num_tokens, [kept] * len(get_adapter(dense).blocks(dense)), text_tokens)
        rows.append(
            SpeedRow(
                family=family,
                num_tokens=num_tokens,
                batch_size=batch_size,
                kept_ratio=kept,
                dense_ms=medians["dense"] * 1e3,
                routed_ms=medians[f"kept {kept}"] * 1e3,
                speedup=medians["dense"] / medians[f"kept {kept}"],
                ideal_speedup=dense_flops / routed_flops,
            )
        )
    return rows


def speed_table_markdown(rows: list[SpeedRow]) -> str:
    lines = [
        "| family | tokens | batch | kept ratio | dense ms | routed ms | speedup | FLOP-ideal | measured / ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.family} | {row.num_tokens} | {row.batch_size} | {row.kept_ratio:.1f} | {row.dense_ms:.1f} | "
            f"{row.routed_ms:.1f} | {row.speedup:.2f}x | {row.ideal_speedup:.2f}x | {row.efficiency:.2f} |"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: list[SpeedRow]) -> list[dict]:
    return [{**asdict(row), "efficiency": row.efficiency} for row in rows]


# -- FLOPs and memory of what actually executed -------------------------------------------------------------


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), FLOPs of the matrix products it executed), counted by torch's `FlopCounterMode`.

    torch's counter misses the CPU flash-attention kernel, so it is registered here with torch's own SDPA
    formula. Elementwise work (norms, activations, gathers) is not counted, as in the analytic counts.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


class _LiveTensorBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Tracks the bytes of tensor storages that operators allocate while active, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            self.live -= self._bytes.pop(key)
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        input_tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {id(t) for t in input_tensors}
        input_storages = {t.untyped_storage().data_ptr() for t in input_tensors}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or id(tensor) in inputs:
                continue  # in-place ops return their input: no new memory
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or (key in input_storages and key not in self._refs):
                continue  # a view of memory that existed before (weights, inputs): nothing new
            if key not in self._refs:
                self._refs[key] = 0
                self._bytes[key] = storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self._refs[key] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def peak_memory(fn: Callable[[], object], device: str | torch.device = "cpu") -> tuple[object, int]:
    """(fn(), peak bytes of the tensors it allocated on `device`): on CUDA the allocator's peak above the
    starting level, on CPU the peak of live tensor storages that operators created (weights and inputs
    excluded)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return result, int(torch.cuda.max_memory_allocated() - start)
    with _LiveTensorBytes() as tracker:
        result = fn()
    return result, int(tracker.peak)


# -- matching a target speedup --------------------------------------------------------------------------


def match_knob(
    speedup_of: Callable[[float], float],
    target: float,
    low: float,
    high: float,
    iterations: int = 6,
    integer: bool = False,
) -> tuple[float, float]:
    """The knob value in [low, high] whose measured speedup is closest to `target`, by bisection.

    `speedup_of(knob)` must grow with the knob (pass a negated knob otherwise). Returns (knob, its
    speedup). Integer knobs (sampling steps) stop when the bracket closes.
    """
    if low > high:
        raise ValueError(f"low={low} must be <= high={high}")
    tried: dict[float, float] = {}

    def measure(knob: float) -> float:
        knob = float(round(knob)) if integer else knob
        if knob not in tried:
            tried[knob] = speedup_of(knob)
        return tried[knob]

    lo, hi = low, high
    if measure(hi) <= target:
        lo = hi
    elif measure(lo) >= target:
        hi = lo
    for _ in range(iterations):
        if (integer and hi - lo <= 1) or lo == hi:
            break
        mid = (lo + hi) / 2
        if integer:
            mid = float(round(mid))
            if mid in (lo, hi):
                break
        if measure(mid) < target:
            lo = mid
        else:
            hi = mid
    best = min(tried, key=lambda knob: abs(tried[knob] - target))
    return best, tried[best]


# -- training-step cost ---------------------------------------------------------------------------------


@dataclass
class TrainStepRow:
    family: str
    num_tokens: int
    batch_size: int
    kept_ratio: float
    dense_ms: float
    diffcr_ms: float
    cost_ratio: float


def train_step_cost(
    family: str,
    num_tokens: int,
    batch_size: int,
    kept_ratio: float = 0.45,
    repeats: int = 7,
    warmup: int = 1,
    **shape,
) -> TrainStepRow:
    """Forward + backward time of a DiffCR training step against a dense one of the same model, interleaved,
    median of `repeats`. Every block sits at `kept_ratio`, between two bins, so both bins' passes run: 0.95
    (bins 1.0 and 0.9, where training starts) is the costliest case, about two dense passes."""
    import copy

    import diffcr
    from diffcr.train import disable_label_dropout

    dense, make_inputs = random_transformer(family, num_tokens, **shape)
    disable_label_dropout(dense)
    dense.train()
    routed = copy.deepcopy(dense)
    diffcr.apply(routed, diffcr.DiffCRConfig(timestep_regions=1, init_kept_ratio=kept_ratio))
    routed.train()
    inputs = make_inputs(batch_size)

    def step(model, with_ratio_loss: bool):
        def call():
            model.zero_grad(set_to_none=True)
            out = model(**inputs).sample
            loss = out.float().pow(2).mean()
            if with_ratio_loss:
                loss = loss + diffcr.ratio_loss(model, 0.5)
            loss.backward()

        return call

    medians = time_alternating(
        {"dense": step(dense, False), "diffcr": step(routed, True)}, repeats=repeats, warmup=warmup
    )
    return TrainStepRow(
        family=family,
        num_tokens=num_tokens,
        batch_size=batch_size,
        kept_ratio=kept_ratio,
        dense_ms=medians["dense"] * 1e3,
        diffcr_ms=medians["diffcr"] * 1e3,
        cost_ratio=medians["diffcr"] / medians["dense"],
    )
