"""Assess a text-to-image DiffCR artifact against its dense pipeline, in one run and from the same noise:
latency per image and peak memory (measured side by side), PSNR / SSIM against dense, FID of each against a
reference image folder (torchmetrics, in the feature space the user picks), and CLIP score (torchmetrics, with a
local CLIP model). Writes `t2i_assessment.json` and a picture of dense / DiffCR pairs with each prompt under them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

FEATURES_HELP = "'inception' (needs torch-fidelity and its weights) or 'clip:PATH' (a local CLIP model folder)"


class ClipImageFeatures(nn.Module):
    """A local CLIP vision model's image embeddings as a torchmetrics feature extractor (FID / KID).

    Takes uint8 images (n, 3, H, W), as torchmetrics passes them, and applies CLIP's own preprocessing.
    """

    def __init__(self, path: str | Path):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.model = CLIPVisionModelWithProjection.from_pretrained(str(path)).eval()
        self.processor = CLIPImageProcessor.from_pretrained(str(path))
        self.num_features = int(self.model.config.projection_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.to(torch.uint8).cpu()), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return self.model(pixel_values=pixels.to(self.model.dtype)).image_embeds.double()  # (n, D)


def feature_extractor(features: str):
    """The FID feature network named by `features` (see `FEATURES_HELP`)."""
    if features == "inception":
        # torchmetrics' own Inception needs torch-fidelity and its weights: find out now, not after sampling
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            FrechetInceptionDistance(feature=2048)
        except (ImportError, ModuleNotFoundError, RuntimeError, OSError) as err:
            raise ValueError(
                f"Inception FID is not available here ({err}); pass --features clip:PATH with a local CLIP model"
            ) from err
        return 2048
    if features.startswith("clip:"):
        path = Path(features[len("clip:") :])
        if not path.is_dir():
            raise FileNotFoundError(f"--features {features}: no CLIP model folder at {path}")
        return ClipImageFeatures(path)
    raise ValueError(f"--features {features!r}: use {FEATURES_HELP}")


def fid(reference: torch.Tensor, images: np.ndarray, features) -> float:
    """FID between uint8 reference images (n, 3, H, W) and generated uint8 images (m, H, W, 3)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=features, reset_real_features=True)
    except (ImportError, ModuleNotFoundError, RuntimeError, OSError) as err:
        raise ValueError(
            f"Inception FID is not available here ({err}); pass --features clip:PATH with a local CLIP model"
        ) from err
    metric.update(reference, real=True)
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), real=False)
    return float(metric.compute())


def check_clip_model(model_path: str | Path) -> None:
    """Refuse a --clip folder that holds no CLIP model, before any image is made."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"--clip {model_path}: no local CLIP model folder there")
    config = folder / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        model_type = None
    weights = [p for p in folder.glob("*.safetensors")]
    if model_type != "clip" or not weights:
        raise ValueError(
            f"--clip {model_path} holds no CLIP model (a transformers CLIPModel folder: config.json with model_type "
            "'clip', safetensors weights and the processor files)"
        )


def clip_score(images: np.ndarray, prompts: list[str], model_path: str | Path) -> float:
    """torchmetrics' CLIP score of images against their prompts, with a local CLIP model."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--clip {model_path}: no local CLIP model folder there")

    def local_clip():  # torchmetrics takes a loader for models that are not its named hub ones
        from transformers import CLIPModel, CLIPProcessor

        model = _EmbeddingsAsTensors(CLIPModel.from_pretrained(str(model_path)).eval())
        return model, CLIPProcessor.from_pretrained(str(model_path))

    metric = CLIPScore(model_name_or_path=local_clip)
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), prompts)
    return float(metric.compute())


class _EmbeddingsAsTensors(nn.Module):
    """A CLIP model whose `get_image_features` / `get_text_features` return the projected embeddings as tensors:
    transformers 5 returns output objects (embeddings in `pooler_output`), torchmetrics 1.9 expects tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _as_tensor(self.model.get_text_features(*args, **kwargs))


def _as_tensor(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.pooler_output


def load_reference(folder: str | Path, size: int) -> torch.Tensor:
    """The images of a folder, center-cropped and resized to `size`: uint8 (n, 3, size, size)."""
    from diffcr.data.captions import IMAGE_SUFFIXES
    from diffcr.data.latent_cache import load_image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(
            f"--reference {folder} holds {len(files)} images; FID needs at least 2 (thousands to be stable)"
        )
    images = torch.stack([load_image(p, size) for p in files])  # (n, 3, size, size) in [-1, 1]
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def assess_text_to_image(
    base: str | Path,
    artifact: str | Path,
    prompts: list[str],
    cfg,
    out_dir: str | Path,
    reference: str | Path | None = None,
    features: str = "inception",
    clip_model: str | Path | None = None,
    progress: bool = True,
    source: dict | None = None,
    timing_rounds: int = 1,
) -> dict:
    """Sample `prompts` with the dense pipeline and with DiffCR from the same seeds, batches alternating, and
    measure both. `cfg` is a `diffcr.text_to_image.PromptSampleConfig`; `source` holds `transformer` and
    `transformer_subfolder` when the pipeline's transformer comes from elsewhere, and `torch_dtype` (both
    pipelines are loaded in it; default fp32). `timing_rounds` > 1 samples every batch pair that many times, the
    images of the first round kept: the speedup is then the median of more pairs. `flop_ratio` is the FLOP-ideal
    speedup: dense's matrix-product FLOPs for one image's pipeline call over DiffCR's, counted as they run (torch's
    `FlopCounterMode`). Returns (and writes) the figures."""
    from diffcr.benchmark import count_flops, peak_memory
    from diffcr.evaluation import psnr_ssim
    from diffcr.text_to_image import image_seeds, load_pipeline, sample_prompts

    if artifact is None or str(artifact) == "none":
        raise ValueError("--artifact none would compare the dense pipeline with itself; pass a DiffCR artifact folder")
    if timing_rounds < 1:
        raise ValueError(f"timing_rounds={timing_rounds} must be >= 1 (1 times the batches that make the images)")
    out_dir = Path(out_dir)
    fid_features = feature_extractor(features) if reference is not None else None
    real = load_reference(reference, cfg.height or 0) if reference is not None and cfg.height else None
    if clip_model is not None:
        check_clip_model(clip_model)
    source = {key: value for key, value in (source or {}).items() if value is not None}
    dense = load_pipeline(base, "none", **source)
    routed = load_pipeline(base, artifact, **source)
    device = dense.transformer.device
    total = len(image_seeds(len(prompts), cfg))
    chunks = [list(range(i, min(i + cfg.batch_size, total))) for i in range(0, total, cfg.batch_size)]
    images = {"dense": [], "diffcr": []}
    seconds = {"dense": [], "diffcr": []}
    pipes = {"dense": dense, "diffcr": routed}

    def sample_pair(number: int, chunk: list[int]) -> dict:
        """One batch from each pipeline, back to back, alternating which goes first; both calls timed."""
        batches = {}
        for name in ("dense", "diffcr") if number % 2 == 0 else ("diffcr", "dense"):
            start = time.perf_counter()
            batches[name] = sample_prompts(pipes[name], prompts, cfg, indices=chunk)
            seconds[name].append((time.perf_counter() - start) / len(chunk))
        return batches

    for number, chunk in enumerate(chunks):
        for name, batch in sample_pair(number, chunk).items():
            images[name].append(batch)
        if progress:
            logger.info("assessed %d of %d images", chunk[-1] + 1, total)
    for _ in range(timing_rounds - 1):
        # the same batch pairs again, timed only: one pair's ratio moves by 10-15 % on a shared CPU
        for number, chunk in enumerate(chunks):
            sample_pair(number, chunk)
    images = {name: np.concatenate(parts) for name, parts in images.items()}
    # the first batch of each warms caches and kernels up: latency is the median of the others when there are any
    timed = {name: values[1:] or values for name, values in seconds.items()}
    latency = {name: float(np.median(values)) for name, values in timed.items()}
    speedup = paired_speedup(timed["dense"], timed["diffcr"])
    # one image's whole pipeline call per model gives its peak memory and its matrix products, counted as they run
    # (the FLOP ratio is a speedup this machine's noise cannot move, against which the measured one reads as an
    # efficiency); the two counters watch the same call and give what each gives alone
    one_image = {
        name: peak_memory(
            lambda p=pipes[name]: count_flops(lambda: sample_prompts(p, prompts[:1], cfg, indices=[0])), device
        )
        for name in pipes
    }
    memory = {name: peak for name, (_, peak) in one_image.items()}
    flops = {name: counted for name, ((_, counted), _) in one_image.items()}
    as_float = {name: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 127.5 - 1 for name, a in images.items()}
    psnr, ssim = psnr_ssim(as_float["diffcr"], as_float["dense"])
    result = {
        "base": str(base),
        "transformer": source.get("transformer"),
        "dtype": str(dense.transformer.dtype).removeprefix("torch."),  # what both pipelines computed in
        "artifact": str(artifact),
        "num_images": total,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "latency_per_image_s": latency,
        "speedup": speedup,
        "speedup_of_median_latency": latency["dense"] / latency["diffcr"],
        "timed_batches": len(timed["dense"]),
        "flops_per_image": flops,
        "flop_ratio": flops["dense"] / max(1, flops["diffcr"]),
        "peak_memory_bytes": memory,
        "memory_vs_dense": memory["diffcr"] / max(1, memory["dense"]),
        "psnr_vs_dense_db": psnr,
        "ssim_vs_dense": ssim,
        "mean_kept_ratio": float(np.mean(_kept_table(routed.transformer))),
    }
    if reference is not None:
        real = real if real is not None else load_reference(reference, images["dense"].shape[1])
        result["fid"] = {name: fid(real, batch, fid_features) for name, batch in images.items()}
        result["fid_features"] = features
        result["num_reference"] = int(real.shape[0])
    if clip_model is not None:
        per_image = [prompts[p] for p, _ in image_seeds(len(prompts), cfg)]
        result["clip_score"] = {name: clip_score(batch, per_image, clip_model) for name, batch in images.items()}
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a run that fails leaves no folder behind
    per_image = np.asarray([prompts[p] for p, _ in image_seeds(len(prompts), cfg)])
    np.savez(out_dir / "samples.npz", dense=images["dense"], diffcr=images["diffcr"], prompts=per_image)
    pairs_figure(out_dir / "pairs.png", images, prompts, cfg)
    (out_dir / "t2i_assessment.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def assess_in_fresh_process(
    base: str | Path,
    artifact: str | Path,
    prompts: list[str],
    cfg,
    out_dir: str | Path,
    progress: bool = True,
    timing_rounds: int = 1,
) -> dict:
    """`assess_text_to_image` run in a new Python process with this one's torch thread count; its figures.

    A process that has just trained times routed sampling slower than a fresh one does, and dense sampling not: one
    text-to-image demo artifact read 1.48-1.55x in four runs in training processes and 1.56-1.60x in three fresh
    ones (docs/RESULTS.md, "Timing in a fresh process"). glibc's heap after training looks like the cause: with its
    mmap threshold and trimming switched off (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) a training
    process read 1.59x. A user samples an artifact in a fresh process (`diffcr sample`), so a run that trains times
    it in one.
    """
    import dataclasses
    import os
    import subprocess
    import sys

    import diffcr

    out_dir = Path(out_dir)
    request = {
        "base": str(base),
        "artifact": str(artifact),
        "prompts": list(prompts),
        "cfg": dataclasses.asdict(cfg),
        "out_dir": str(out_dir),
        "progress": progress,
        "timing_rounds": timing_rounds,
        "num_threads": torch.get_num_threads(),
    }
    # the child imports this very package, wherever the parent found it (a source checkout on sys.path included)
    package_root = str(Path(diffcr.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "diffcr.t2i_assess"]  # the request comes on stdin: any number of prompts
    # with progress the child's output (the pipelines' progress bars, its error) shows as it comes; without, the
    # error's last lines go into the exception
    captured = None if progress else subprocess.PIPE
    finished = subprocess.run(command, env=env, input=json.dumps(request), stdout=captured, stderr=captured, text=True)
    if finished.returncode != 0:
        tail = "\n".join((finished.stderr or "").strip().splitlines()[-8:]) or "(its error is printed above)"
        raise RuntimeError(f"assessing {artifact} in a fresh process failed (exit {finished.returncode}):\n{tail}")
    return json.loads((out_dir / "t2i_assessment.json").read_text())


def _assess_request(request_json: str) -> None:
    """The fresh process of `assess_in_fresh_process`."""
    from diffcr.text_to_image import PromptSampleConfig

    request = json.loads(request_json)
    torch.set_num_threads(request["num_threads"])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    assess_text_to_image(
        request["base"],
        request["artifact"],
        request["prompts"],
        PromptSampleConfig(**request["cfg"]),
        request["out_dir"],
        progress=request["progress"],
        timing_rounds=request["timing_rounds"],
    )


def paired_speedup(dense_seconds: list[float], routed_seconds: list[float]) -> float:
    """The median over batches of dense's time over DiffCR's for the same images.

    A batch's two calls run back to back, so their ratio is spared the machine's slower drifts in speed (on a shared
    CPU a dense batch moved between 5.3 and 8.8 s within minutes), which a ratio of the two medians is not.
    """
    if len(dense_seconds) != len(routed_seconds) or not dense_seconds:
        raise ValueError(f"one time per batch for each pipeline, got {len(dense_seconds)} and {len(routed_seconds)}")
    return float(np.median([dense / routed for dense, routed in zip(dense_seconds, routed_seconds)]))


def _kept_table(transformer) -> list[list[float]]:
    import diffcr

    return diffcr.schedule(transformer).kept_ratio if diffcr.is_applied(transformer) else [[1.0]]


def pairs_figure(path: Path, images: dict, prompts: list[str], cfg, max_pairs: int = 8) -> Path:
    """Dense / DiffCR pairs from the same noise, the prompt under each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffcr.text_to_image import image_seeds

    plan = image_seeds(len(prompts), cfg)[:max_pairs]
    fig, axes = plt.subplots(1, len(plan), figsize=(2.6 * len(plan), 1.9), squeeze=False)
    for ax, i in zip(axes[0], range(len(plan))):
        ax.imshow(np.concatenate([images["dense"][i], images["diffcr"][i]], axis=1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(prompts[plan[i][0]][:40], fontsize=7)
        ax.set_title("dense | DiffCR", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import sys

    _assess_request(sys.stdin.read())
