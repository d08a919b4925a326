"""Peak memory, dense vs DiffCR: one sampling forward, and one training step (forward + backward).

A random-weight transformer (PixArt-shaped by default: 12 blocks of width 384, 1024 image tokens, 120 text
tokens). Routed variants keep the same ratio in every block. Training is measured two ways: while the ratios
still learn (each block runs the two bins around its ratio and blends them, so the kept ratio sits between two
bins), and with the schedule frozen (one pass per block, base weights trained: fine-tuning after `freeze`).
Peak = the allocator's peak above the start on CUDA; on CPU the peak of live tensor storages the step creates
(weights and inputs excluded), from `diffcr.benchmark.peak_memory`.

    python benchmarks/memory.py [--tokens 1024] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

import diffcr
from diffcr.benchmark import machine_description, peak_memory, random_transformer
from diffcr.train import disable_label_dropout


def routed_copy(dense, kept: float, frozen: bool):
    routed = copy.deepcopy(dense)
    bins = tuple(sorted({1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, kept}, reverse=True))
    diffcr.apply(routed, diffcr.DiffCRConfig(timestep_regions=1, ratio_bins=bins, init_kept_ratio=kept))
    if frozen:
        diffcr.freeze(routed)
    return routed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="pixart")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--kept", default="0.8,0.5")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, make_inputs = random_transformer(args.family, args.tokens)
    disable_label_dropout(dense)
    dense = dense.to(args.device)
    inputs = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in make_inputs(args.batch).items()}

    def sampling(model):
        model.eval()
        with torch.inference_mode():
            return peak_memory(lambda: model(**inputs), args.device)[1]

    def training(model, ratio_loss: bool):
        model.train()

        def step():
            model.zero_grad(set_to_none=True)
            loss = model(**inputs).sample.float().pow(2).mean()
            if ratio_loss:
                loss = loss + diffcr.ratio_loss(model, 0.5)
            loss.backward()

        step()  # gradients allocated once, as in a training loop
        return peak_memory(step, args.device)[1]

    rows = [{"variant": "dense", "sampling": sampling(dense), "training": training(dense, False)}]
    for kept in (float(k) for k in args.kept.split(",")):
        # a ratio between bins (0.05 below its bin) runs both neighbouring bins while learning
        learning = routed_copy(dense, kept - 0.05, frozen=False)
        frozen = routed_copy(dense, kept, frozen=True)
        rows.append(
            {
                "variant": f"DiffCR kept {kept}, frozen",
                "sampling": sampling(frozen),
                "training": training(frozen, False),
            }
        )
        rows.append(
            {
                "variant": f"DiffCR kept {kept - 0.05:.2f}, learning ratios",
                "sampling": None,
                "training": training(learning, True),
            }
        )
    base = rows[0]
    print(f"{args.family}, {args.tokens} tokens, batch {args.batch}, {args.device}: peak MiB above weights and inputs")
    print("| variant | sampling forward | vs dense | training step | vs dense |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = []
        for key in ("sampling", "training"):
            if row[key] is None:
                cells += ["-", "-"]
            else:
                cells += [f"{row[key] / 2**20:.1f}", f"{row[key] / base[key] - 1:+.1%}"]
        print(f"| {row['variant']} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine_description(), "args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
