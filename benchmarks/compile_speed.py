"""Compiled dense vs compiled DiffCR: whole-model `torch.compile` and regional compilation, side by side.

A random-weight transformer (PixArt-shaped by default: 12 blocks of width 384, 1024 image tokens, 120 text
tokens) runs dense and routed (a frozen uniform schedule at `--kept`), each eager, whole-model compiled and
regionally compiled (`block.compile()` on every block, what diffusers' `compile_repeated_blocks` does; routed
blocks compile their own computation on the kept tokens, routing stays eager). Latencies are medians of
interleaved calls after warm-up; compile time is the first call's; graphs are counted with dynamo's counters.
Then a 4-region schedule (a different kept ratio per timestep region) is run through every region to count
whole-model recompiles.

    python benchmarks/compile_speed.py                         # CPU, about 10 minutes on 2 cores
    python benchmarks/compile_speed.py --device cuda --dtype bf16 --width 1152 --layers 28 --heads 16 \\
        --tokens 4096 --modes default,reduce-overhead          # the GPU check
    python benchmarks/compile_speed.py --quick                 # tiny shapes, a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from torch._dynamo.utils import counters

import diffcr
from diffcr.benchmark import machine_description, model_flops, random_transformer, time_alternating


def routed_copy(model, table: list[list[float]]):
    routed = copy.deepcopy(model)
    bins = tuple(sorted({1.0, 0.05, *(v for row in table for v in row)}, reverse=True))
    config = diffcr.DiffCRConfig(
        target_kept_ratio=0.5, timestep_regions=len(table[0]), ratio_bins=bins, num_train_timesteps=1000
    )
    diffcr.apply(routed, config)
    with torch.no_grad():
        routed.diffcr.kept_ratio.copy_(torch.tensor(table))
    return diffcr.freeze(routed).eval()


def regional(model):
    compiled = copy.deepcopy(model)
    for block in compiled.transformer_blocks:
        block.compile()
    return compiled


def first_call_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="pixart")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--kept", type=float, default=0.5)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--modes", default="default", help="torch.compile modes, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.tokens, args.width, args.layers, args.heads, args.repeats = 64, 64, 2, 2, 3
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    dense, make_inputs = random_transformer(
        args.family, args.tokens, width=args.width, num_layers=args.layers, heads=args.heads
    )
    dense = dense.to(args.device, dtype).eval()
    inputs = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in make_inputs(args.batch).items()}
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    routed = routed_copy(dense, [[args.kept]] * args.layers)
    text_tokens = inputs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in inputs else 0
    ideal = model_flops(dense, args.tokens, None, text_tokens) / model_flops(
        dense, args.tokens, [args.kept] * args.layers, text_tokens
    )

    results = {"machine": machine_description(), "args": vars(args), "flop_ideal": ideal, "modes": {}}
    with torch.inference_mode():
        for mode in args.modes.split(","):
            options = {} if mode == "default" else {"mode": mode}
            variants = {"eager dense": dense, "eager DiffCR": routed}
            compile_seconds = {}
            for name, model in (("dense", dense), ("DiffCR", routed)):
                torch._dynamo.reset()
                counters.clear()
                whole = torch.compile(model, **options)
                compile_seconds[f"whole {name}"] = first_call_seconds(lambda m=whole: m(**inputs))
                variants[f"whole {name}"] = whole
                block_model = copy.deepcopy(model)
                for block in block_model.transformer_blocks:
                    block.compile(**options)
                compile_seconds[f"regional {name}"] = first_call_seconds(lambda m=block_model: m(**inputs))
                variants[f"regional {name}"] = block_model
            seconds = time_alternating(
                {name: (lambda m=model: m(**inputs)) for name, model in variants.items()}, repeats=args.repeats
            )
            rows = {}
            for kind in ("eager", "whole", "regional"):
                dense_ms, routed_ms = seconds[f"{kind} dense"] * 1e3, seconds[f"{kind} DiffCR"] * 1e3
                rows[kind] = {
                    "dense_ms": dense_ms,
                    "diffcr_ms": routed_ms,
                    "speedup": dense_ms / routed_ms,
                    "of_ideal": dense_ms / routed_ms / ideal,
                    "compile_s_dense": compile_seconds.get(f"{kind} dense"),
                    "compile_s_diffcr": compile_seconds.get(f"{kind} DiffCR"),
                }
            results["modes"][mode] = rows
        results["recompiles"] = region_recompiles(dense, inputs, args.layers)
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


def region_recompiles(dense, inputs: dict, num_layers: int) -> dict:
    """Graphs a 4-region schedule compiles into, whole model and regional, over every region and a mixed batch."""
    table = [[1.0, 0.8, 0.5, 0.3]] * num_layers
    batch = inputs["hidden_states"].shape[0]
    timesteps = [[t] * batch for t in (100, 400, 600, 900)]
    if batch > 1:
        timesteps.append([100 + 800 * (i % 2) for i in range(batch)])
    found = {}
    for kind in ("whole", "regional"):
        model = routed_copy(dense, table)
        if kind == "whole":
            model = torch.compile(model)
        else:
            for block in model.transformer_blocks:
                block.compile()
        torch._dynamo.reset()
        counters.clear()
        start = time.perf_counter()
        for values in timesteps:
            model(**{**inputs, "timestep": torch.tensor(values, device=inputs["hidden_states"].device)})
        found[kind] = {
            "batches": len(timesteps),
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "seconds": time.perf_counter() - start,
        }
    return found


def print_table(results: dict) -> None:
    args = results["args"]
    print(
        f"{args['family']}, {args['tokens']} tokens, batch {args['batch']}, kept {args['kept']}, "
        f"{args['layers']} blocks of width {args['width']}, {args['device']} {args['dtype']}; "
        f"FLOP-ideal {results['flop_ideal']:.2f}x"
    )
    print("| mode | compiled | dense ms | DiffCR ms | speedup | of FLOP-ideal | compile s (dense / DiffCR) |")
    print("|---|---|---|---|---|---|---|")
    for mode, rows in results["modes"].items():
        for kind, row in rows.items():
            compile_s = "-"
            if row["compile_s_dense"] is not None:
                compile_s = f"{row['compile_s_dense']:.0f} / {row['compile_s_diffcr']:.0f}"
            print(
                f"| {mode} | {kind} | {row['dense_ms']:.1f} | {row['diffcr_ms']:.1f} | {row['speedup']:.2f}x | "
                f"{row['of_ideal']:.2f} | {compile_s} |"
            )
    for kind, found in results["recompiles"].items():
        print(
            f"4-region schedule, {kind}: {found['graphs']} graphs, {found['graph_breaks']} graph breaks over "
            f"{found['batches']} batches ({found['seconds']:.0f} s with compiling)"
        )


if __name__ == "__main__":
    main()
