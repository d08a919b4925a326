"""Prompt accuracy of a text-to-image default pipeline over several sampling seeds (docs/RESULTS.md).

The demo judges the 50 evaluation prompts once (90 named digits: a run's spread is several points). This samples
them `--seeds` times, image i of copy s from seed 1000 s + i (so two pipelines judged with the same seeds start
from the same noise), and judges every image with the shipped digit judge: named digits right at their slot, per
prompt kind (held-out compositions, seen, single digits) and per digit, empty slots empty, whole images right.

    python benchmarks/t2i_prompt_accuracy.py                               # the shipped pipeline, 4 seeds
    python benchmarks/t2i_prompt_accuracy.py --base runs/t2i/pipeline --seeds 2
    python benchmarks/t2i_prompt_accuracy.py --artifact default            # the shipped DiffCR artifact

The pipeline's own sampler (Euler ancestral for the shipped one), 20 steps, guidance 4.5 (the demo's). About 25-40
seconds a seed (50 images) for the dense shipped pipeline on two CPU threads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def judge(pipe, seeds: int, guidance_scale: float, sampler_steps: int) -> dict:
    from diffcr.data.scenes import evaluation_prompts
    from diffcr.scene_judge import judge_images, prompt_accuracy
    from diffcr.text_to_image import PromptSampleConfig, sample_prompts

    prompts, kinds = zip(*evaluation_prompts())
    images = []
    for copy in range(seeds):
        cfg = PromptSampleConfig(
            steps=sampler_steps, guidance_scale=guidance_scale, batch_size=10, seed=copy * 1000
        )  # image i of copy s: seed 1000 s + i
        images.append(sample_prompts(pipe, list(prompts), cfg))
    images = np.concatenate(images)
    all_prompts, all_kinds = list(prompts) * seeds, list(kinds) * seeds
    accuracy = prompt_accuracy(images, all_prompts, all_kinds)
    per_digit: dict[int, list[int]] = {}
    for verdict in judge_images(images, all_prompts):
        for wanted, read in zip(verdict["expected"], verdict["predicted"]):
            if wanted is not None:
                right_and_all = per_digit.setdefault(wanted, [0, 0])
                right_and_all[0] += int(wanted == read)
                right_and_all[1] += 1
    accuracy["per_digit"] = {digit: right / total for digit, (right, total) in sorted(per_digit.items())}
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="a pipeline folder in the default's layout (default: shipped)")
    parser.add_argument("--artifact", default=None, help="'default' (shipped), a DiffCR artifact folder, or none")
    parser.add_argument("--seeds", type=int, default=4, help="sampling passes over the 50 prompts")
    parser.add_argument("--guidance-scale", type=float, default=4.5)
    parser.add_argument("--sampler-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds} must be >= 1")
    torch.set_num_threads(args.threads)

    from diffcr.data.latent_cache import SHIPPED_TEXT_TO_IMAGE
    from diffcr.text_to_image import load_pipeline

    base = args.base or SHIPPED_TEXT_TO_IMAGE
    if args.artifact == "default" and args.base is not None:
        parser.error("--artifact default is the shipped pipeline's; with --base give an artifact folder")
    pipe = load_pipeline(base, args.artifact)
    pipe.set_progress_bar_config(disable=True)
    accuracy = judge(pipe, args.seeds, args.guidance_scale, args.sampler_steps)

    print(f"{accuracy['num_images']} images; named digits right at their slot: {accuracy['digit_accuracy']:.1%}")
    for kind, figures in accuracy["by_kind"].items():
        print(f"  {kind}: {figures['digit_accuracy']:.1%}")
    print(f"empty slots empty: {accuracy['empty_accuracy']:.1%}; whole images right: {accuracy['image_accuracy']:.1%}")
    print("per digit: " + ", ".join(f"{d} {share:.0%}" for d, share in accuracy["per_digit"].items()))
    if args.out is not None:
        args.out.write_text(json.dumps(accuracy, indent=2) + "\n")


if __name__ == "__main__":
    main()
