"""DiffCR-LT against DiffCR-L at equal budget on the shipped DiT (docs/RESULTS.md, "DiffCR-LT against DiffCR-L").

Each variant is full fine-tuning of the shipped base at the bench's recipe (40 steps, batch 16), frozen, and then
sampled with dense from the same noise (300 images, batches interleaved; `diffcr.compare.run_contest`).

    python benchmarks/lt_vs_l.py --out runs/lt-vs-l                 # the table's rows at 1.5x and 2x
    python benchmarks/lt_vs_l.py --out runs/lt --targets 0.42 --offset-lrs 1.0

About 10 minutes per trained variant on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

import diffcr
from diffcr.compare import CompareRecipe, Contestant, run_contest, train_variant
from diffcr.data import load_dataset
from diffcr.models import load_base_model
from diffcr.models.classifier import load_classifier


def variants(target: float, offset_lrs: list[float], uncoupled: bool = True) -> dict[str, diffcr.DiffCRConfig]:
    """DiffCR-L, DiffCR-LT uncoupled (the paper's table; `uncoupled`), and DiffCR-LT coupled at each offset rate."""
    lt = diffcr.DiffCRConfig(target_kept_ratio=target, timestep_regions=4, ratio_loss_weight=0.3)
    configs = {"DiffCR-L": lt.replace(timestep_regions=1)}
    if uncoupled:
        configs["DiffCR-LT uncoupled"] = lt.replace(region_coupling=False)
    for offset_lr in offset_lrs:
        configs[f"DiffCR-LT coupled, offsets at {offset_lr:g}"] = lt.replace(region_offset_lr=offset_lr)
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--targets", default="0.58,0.42", help="target kept ratios (0.58: about 1.5x; 0.42: 2x)")
    parser.add_argument("--offset-lrs", default="1.0,0.2", help="region_offset_lr values of the coupled variants")
    parser.add_argument("--num-per-class", type=int, default=30)
    parser.add_argument("--no-uncoupled", action="store_true", help="leave out the uncoupled DiffCR-LT rows")
    parser.add_argument("--seed", type=int, default=0, help="the training seed (the sampling noise stays seed 0's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = CompareRecipe(num_per_class=args.num_per_class)
    train_recipe = CompareRecipe(num_per_class=args.num_per_class, seed=args.seed)
    train_set, heldout = load_dataset()
    dense = load_base_model(None).eval()
    sample_cfg = recipe.sample_config()
    contestants = [Contestant("dense", None, f"{recipe.sampler_steps} steps", dense, sample_cfg)]
    for target in (float(t) for t in args.targets.split(",")):
        offset_lrs = [float(v) for v in args.offset_lrs.split(",")]
        for name, config in variants(target, offset_lrs, not args.no_uncoupled).items():
            tag = f"{name}-{target:g}".replace(" ", "_").replace(",", "")
            model = train_variant(dense, train_set, args.out / "trained" / tag, train_recipe, config)
            contestants.append(Contestant(name, target, f"target kept {target:g}", model, sample_cfg))
    results, _ = run_contest(contestants, load_classifier(), heldout, recipe, progress=True)
    rows = [asdict(result) for result in results]
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("| method | target kept | measured speedup | mean kept | accuracy | feature FID | PSNR vs dense |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        kept = "-" if row["mean_kept_ratio"] is None else f"{row['mean_kept_ratio']:.2f}"
        psnr = "-" if row["psnr_vs_dense"] is None else f"{row['psnr_vs_dense']:.1f} dB"
        print(
            f"| {row['method']} | {row['target_speedup'] or '-'} | {row['speedup']:.2f}x | {kept} | "
            f"{100 * row['accuracy']:.1f} % | {row['fid']:.1f} | {psnr} |"
        )


if __name__ == "__main__":
    main()
