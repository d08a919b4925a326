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
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    kept_ratios = kept_ratios or [1.0] * len(blocks)
    total = 0
    for kept in kept_ratios:
        kept_tokens = num_kept_tokens(kept, num_tokens)
        if kept_tokens:
            total += adapter.block_flops(model, kept_tokens, context_tokens)
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
    "dit": `DiTTransformer2DModel` (adaLN-Zero, class labels). Returns (model, make_inputs(batch)).
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
    else:
        raise ValueError(f"unknown family {family!r}; use 'pixart' or 'dit'")
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
        routed_flops = model_flops(dense, num_tokens, [kept] * len(dense.transformer_blocks), text_tokens)
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
