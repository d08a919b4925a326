"""Encode an image-caption dataset once with a PixArt pipeline's own VAE and text encoder, as PixArt's training
does (the encoders dominate the cost of a training step), into safetensors shards plus a JSON manifest.

Latents are the VAE posterior *mean* times the VAE's `scaling_factor`: deterministic, so a cache is the same
on every rerun and a resumed training run sees the same inputs; the posterior's spread is tiny next to the
diffusion noise that training adds anyway. Text embeddings and attention masks come from the pipeline's own
`encode_prompt` at its `max_sequence_length` (300 for Sigma, 120 for Alpha), so training sees exactly what
sampling feeds the transformer; the empty prompt's embedding is stored once, for caption dropout and CFG.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
CACHE_TYPE = "diffcr.LatentCaptionCache"
CACHE_FORMAT = 1
TRANSFORMER_KEYS = ("in_channels", "sample_size", "patch_size", "caption_channels")
# pipeline class -> max_sequence_length of its text encoder (the pipeline's own default)
TEXT_TO_IMAGE_PIPELINES = {
    "PixArtSigmaPipeline": 300,
    "PixArtAlphaPipeline": 120,
    "StableDiffusion3Pipeline": 256,
    "FluxPipeline": 512,
}
# text tensors a cache holds per record; SD3 adds the pooled projection of its CLIP encoders
TEXT_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_projections")
MAX_RESOLUTION = 8192  # pixels; a typo (100000) would not fit in memory


# `--base t2i`: the shipped text-to-image default (`diffcr.models.scene_pipeline`)
SHIPPED_TEXT_TO_IMAGE = "t2i"


def pipeline_class_name(base: str | Path) -> str:
    """`_class_name` of a pipeline's `model_index.json` (a local folder or a hub repo id)."""
    from diffusers import DiffusionPipeline

    if str(base) == SHIPPED_TEXT_TO_IMAGE:
        return "PixArtSigmaPipeline"

    try:
        index = DiffusionPipeline.load_config(str(base))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{base} is not a diffusers pipeline folder or repo id (no readable model_index.json): {err}"
        ) from err
    if not isinstance(index, dict):
        raise ValueError(f"{base}: model_index.json holds a JSON {type(index).__name__}, not a pipeline's object")
    return str(index.get("_class_name"))


def is_text_to_image_pipeline(base: str | Path) -> bool:
    """Whether `base` is a local PixArt pipeline folder (its `model_index.json` names one), or "t2i"."""
    if str(base) == SHIPPED_TEXT_TO_IMAGE:
        return True
    index = Path(str(base)) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") in TEXT_TO_IMAGE_PIPELINES
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


# `--dtype` of prepare, sample and evaluate: the precision the pipeline's weights are loaded in
PIPELINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_pipeline_dtype(choice: str = "auto", cuda: bool | None = None) -> torch.dtype:
    """The `torch_dtype` to load a text-to-image pipeline in, from `--dtype`.

    "auto" is bf16 on a CUDA GPU (about twice fp32's throughput there, and half the memory of T5-XXL's 4.7B
    parameters) and fp32 on a CPU (CPUs without native bf16 emulate it, slower than fp32).

    Args:
        choice: "auto", "fp32", "bf16" or "fp16".
        cuda: whether the pipeline runs on a CUDA GPU (default: whether one is available).

    Returns:
        torch.float32, torch.bfloat16 or torch.float16.

    Raises:
        ValueError: an unknown choice, or fp16 without a CUDA GPU.

    Example:
        >>> resolve_pipeline_dtype("auto", cuda=False)
        torch.float32
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if choice == "auto":
        return torch.bfloat16 if cuda else torch.float32
    if choice not in PIPELINE_DTYPES:
        raise ValueError(f"--dtype {choice!r} is not one of auto, {', '.join(PIPELINE_DTYPES)}")
    if choice == "fp16" and not cuda:
        raise ValueError(
            "--dtype fp16 needs a CUDA GPU (CPU half-precision kernels are slow or missing); use bf16 or fp32"
        )
    return PIPELINE_DTYPES[choice]


def load_text_to_image_pipeline(
    base: str | Path, transformer: str | Path | None = None, transformer_subfolder: str | None = "transformer", **kwargs
):
    """A PixArt-Sigma or PixArt-Alpha pipeline (or SD3, Flux) through diffusers' `from_pretrained` (safetensors
    only), optionally with its transformer loaded from elsewhere.

    Args:
        base: a pipeline folder or repo id (its `model_index.json` names the pipeline class).
        transformer: None for the pipeline's own transformer; else a folder or repo id whose transformer replaces
            it, as PixArt pairs its 512 px transformer (`PixArt-alpha/PixArt-Sigma-XL-2-512-MS`) with the parts of
            `PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers` (see `diffcr.data.transformer_source`).
        transformer_subfolder: where that transformer sits inside `transformer` (None or "": the top level).
        **kwargs: passed to diffusers' `from_pretrained` (e.g. `torch_dtype`).

    Raises:
        ValueError: `base` is another kind of pipeline, or not a pipeline; the transformer cannot be loaded or
            does not fit the pipeline's VAE and text encoder.
    """
    import diffusers

    from diffcr.models.scene_pipeline import is_scene_pipeline_folder, load_scene_pipeline

    shipped = str(base) == SHIPPED_TEXT_TO_IMAGE or is_scene_pipeline_folder(base)
    if shipped and transformer is not None:
        raise ValueError(
            "--transformer replaces the transformer of a diffusers pipeline; the text-to-image default ships its own "
            "(drop --transformer, or pass a diffusers PixArt pipeline as --base)"
        )
    if str(base) == SHIPPED_TEXT_TO_IMAGE:
        return _with_caption_attention(load_scene_pipeline(dtype=kwargs.get("torch_dtype", torch.float32)))
    if shipped:
        return _with_caption_attention(load_scene_pipeline(base, dtype=kwargs.get("torch_dtype", torch.float32)))
    name = pipeline_class_name(base)
    if name not in TEXT_TO_IMAGE_PIPELINES:
        raise ValueError(
            f"{base} holds a {name}; diffcr's text-to-image path supports {sorted(TEXT_TO_IMAGE_PIPELINES)} "
            "(a diffusers pipeline folder or repo id, e.g. PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, or "
            "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers with --transformer PixArt-alpha/PixArt-Sigma-XL-2-512-MS)"
        )
    pipe_cls = getattr(diffusers, name)
    if transformer is not None:
        from diffcr.data.transformer_source import load_transformer

        # passed as a component, so diffusers neither loads nor downloads the pipeline's own transformer
        kwargs["transformer"] = load_transformer(
            transformer, transformer_subfolder, name, torch_dtype=kwargs.get("torch_dtype")
        )
    try:
        pipe = pipe_cls.from_pretrained(str(base), use_safetensors=True, **kwargs)
    except OSError as err:
        raise ValueError(f"cannot load the {name} at {base} (diffcr reads safetensors weights only): {err}") from err
    if transformer is not None:
        from diffcr.data.transformer_source import check_transformer_fits

        check_transformer_fits(pipe, transformer)
    return _with_caption_attention(pipe)


def _with_caption_attention(pipe):
    """The pipeline with the CPU kernel for short captions in its cross-attention (`diffcr.caption_attention`):
    every pipeline diffcr loads gets it, so a dense and a routed pipeline time the same kernels."""
    from diffcr.caption_attention import use_short_caption_attention

    use_short_caption_attention(pipe.transformer)
    return pipe


def pipeline_source(base: str | Path, transformer: str | Path | None = None) -> str:
    """Where a pipeline came from, as runs and caches record it: "BASE", or "BASE + transformer T"."""
    return str(base) if transformer is None else f"{base} + transformer {transformer}"


def pipeline_identity(pipe, base: str | Path) -> dict:
    """What a cache depends on: which pipeline, and the shapes its encoders produce."""
    transformer = pipe.transformer.config
    return {
        "pipeline_class": type(pipe).__name__,
        "source": str(base),
        "transformer": {
            k: transformer.get(k) for k in ("in_channels", "sample_size", "patch_size", "caption_channels")
        },
        "vae_shift_factor": float(getattr(pipe.vae.config, "shift_factor", None) or 0.0),
        "vae_scaling_factor": float(pipe.vae.config.scaling_factor),
        "vae_scale_factor": int(pipe.vae_scale_factor),
        "text_encoder": type(pipe.text_encoder).__name__,
    }


def default_resolution(pipe) -> int:
    """The transformer's native image size in pixels (Flux's transformer has none: its pipeline's default)."""
    sample_size = pipe.transformer.config.get("sample_size") or pipe.default_sample_size
    return int(sample_size) * int(pipe.vae_scale_factor)


def size_multiple(pipe) -> int:
    """What image sizes must be a multiple of: the VAE factor times the patch (Flux packs 2x2 latents)."""
    patch = 2 if type(pipe).__name__.startswith("Flux") else int(pipe.transformer.config.patch_size)
    return int(pipe.vae_scale_factor) * patch


def load_image(path_or_image, resolution: int) -> torch.Tensor:
    """An image resized (shorter side) and center-cropped to `resolution`, RGB in [-1, 1]: (3, R, R)."""
    import numpy as np
    from PIL import Image

    image = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    with image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32)  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


@dataclass
class EncodeSettings:
    resolution: int
    max_sequence_length: int
    batch_size: int = 8
    shard_size: int = 256
    text_dtype: torch.dtype = torch.bfloat16


def prepare_cache(
    base: str | Path,
    src: str | Path,
    out: str | Path,
    resolution: int | None = None,
    batch_size: int = 8,
    shard_size: int = 256,
    progress: bool = True,
    device: str | None = None,
    transformer: str | Path | None = None,
    transformer_subfolder: str | None = "transformer",
    torch_dtype: torch.dtype | None = None,
) -> dict:
    """Encode `src` (see `diffcr.data.captions`) with the pipeline at `base` into the cache folder `out`.

    A rerun skips the shards already written; a cache made by another pipeline or resolution is refused.
    `transformer` / `transformer_subfolder`: a transformer from elsewhere (`load_text_to_image_pipeline`); it sets
    the default resolution and is recorded in the manifest, since a cache fits one transformer's input.
    `torch_dtype`: what the VAE and text encoder compute in (default: as diffusers loads them, fp32); the cache
    stores latents in fp32 and text embeddings in bf16 whatever it is.

    Returns:
        The manifest (also written to `out/manifest.json`).

    Raises:
        ValueError: a bad pipeline, source, resolution, or a cache in `out` made differently.
    """
    from tqdm.auto import tqdm

    from diffcr.checkpoint import save_file_atomic, write_json_atomic
    from diffcr.data.captions import read_caption_source

    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
    from diffcr.checkpoint import check_writable_dir

    out = Path(out)
    check_writable_dir(out, "--out")
    if resolution is not None and (isinstance(resolution, bool) or not 1 <= resolution <= MAX_RESOLUTION):
        raise ValueError(f"--resolution {resolution} must be in [1, {MAX_RESOLUTION}] pixels (or omitted: native size)")
    source = read_caption_source(src)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    pipe = load_text_to_image_pipeline(base, transformer, transformer_subfolder, **dtype).to(device)
    identity = pipeline_identity(pipe, pipeline_source(base, transformer))
    resolution = default_resolution(pipe) if resolution is None else resolution
    multiple = size_multiple(pipe)
    if resolution < multiple or resolution % multiple:
        raise ValueError(f"--resolution {resolution} must be a positive multiple of {multiple} (VAE factor x patch)")
    settings = EncodeSettings(resolution, TEXT_TO_IMAGE_PIPELINES[identity["pipeline_class"]], batch_size, shard_size)
    records = source.records
    num_shards = math.ceil(len(records) / shard_size)
    manifest = {
        "_type": CACHE_TYPE,
        "format": CACHE_FORMAT,
        "pipeline": identity,
        "resolution": resolution,
        "max_sequence_length": settings.max_sequence_length,
        "latents": "VAE posterior mean x scaling_factor",
        "num_records": len(records),
        "shard_size": shard_size,
        "complete": False,
    }
    _check_existing(out, manifest)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / MANIFEST, manifest)
    for name, why in source.skipped:
        logger.warning("skipped %s: %s", name, why)

    with torch.no_grad():
        empty = _encode_text(pipe, [""], settings, device)
        save_file_atomic(empty, out / EMPTY_PROMPT)
        shards, skipped = [], list(source.skipped)
        bar = tqdm(total=len(records), desc="encoding", disable=not progress, dynamic_ncols=True)
        for index in range(num_shards):
            chunk = records[index * shard_size : (index + 1) * shard_size]
            path = out / f"shard-{index:05d}.safetensors"
            fingerprint = _fingerprint(chunk)
            entry = _shard_entry(path) if path.is_file() else None
            if entry is not None and entry.pop("fingerprint") == fingerprint:
                # finished by an earlier run on the same records (shards are written atomically)
                shards.append(entry)
                skipped += shards[-1].pop("skipped")
                bar.update(len(chunk))
                continue
            tensors, names, bad = _encode_shard(pipe, chunk, settings, device, bar)
            skipped += bad
            for name, why in bad:
                logger.warning("skipped %s: %s", name, why)
            captions = [r.caption for r in chunk if r.name in set(names)]
            metadata = {
                "names": json.dumps(names),
                "captions": json.dumps(captions),
                "skipped": json.dumps(bad),
                "fingerprint": fingerprint,
            }
            save_file_atomic(tensors, path, metadata=metadata)
            shards.append({"file": path.name, "count": len(names)})
        bar.close()
    counts = [s["count"] for s in shards]
    if not sum(counts):
        if created:  # nothing usable: leave no half-made cache behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise ValueError(f"no image of {src} could be encoded; skipped: {skipped[:5]}")
    manifest.update(
        complete=True,
        shards=shards,
        count=sum(counts),
        skipped=[list(item) for item in skipped],
        latent_shape=list(_first_shape(out / shards[0]["file"], "latents")),
        text_shape=list(empty["prompt_embeds"].shape[1:]),
    )
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _check_existing(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    try:
        existing = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete the folder and run prepare again") from err
    keys = ("pipeline", "resolution", "max_sequence_length", "num_records", "shard_size")

    def comparable(payload: dict, key: str):  # where the pipeline was loaded from is not what it is
        value = payload.get(key)
        return {k: v for k, v in value.items() if k != "source"} if key == "pipeline" and value else value

    differ = [k for k in keys if comparable(existing, k) != comparable(manifest, k)]
    if differ:
        raise ValueError(
            f"{out} holds a cache made with another {', '.join(differ)} "
            f"(there: {[existing.get(k) for k in differ]}, now: {[manifest[k] for k in differ]}); "
            "choose another --out, or delete that folder"
        )


def _encode_text(pipe, captions: list[str], settings: EncodeSettings, device) -> dict[str, torch.Tensor]:
    """The pipeline's own text encoding of `captions`: embeddings (n, L, D), attention mask (n, L) and, for SD3,
    the pooled projection (n, P)."""
    if type(pipe).__name__ == "FluxPipeline":
        embeds, pooled, _ = pipe.encode_prompt(
            captions, None, device=device, max_sequence_length=settings.max_sequence_length
        )  # text ids are all zero in Flux: not stored
        mask = torch.ones(embeds.shape[:2])
        extra = {"pooled_projections": pooled.float().cpu()}
    elif type(pipe).__name__ == "StableDiffusion3Pipeline":
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=settings.max_sequence_length,
        )
        mask = torch.ones(embeds.shape[:2])  # SD3 attends to every text token
        extra = {"pooled_projections": pooled.float().cpu()}
    else:
        embeds, mask, _, _ = pipe.encode_prompt(
            captions,
            do_classifier_free_guidance=False,
            device=device,
            clean_caption=False,
            max_sequence_length=settings.max_sequence_length,
        )
        extra = {}
    text = {"prompt_embeds": embeds.to(settings.text_dtype).cpu(), "prompt_attention_mask": mask.to(torch.uint8).cpu()}
    return {**text, **extra}


def _encode_shard(pipe, chunk, settings: EncodeSettings, device, bar):
    """Latents and text embeddings of one shard's records; unreadable images are skipped by name."""
    from PIL import Image, UnidentifiedImageError

    latents, texts, names, bad = [], [], [], []
    scaling = pipe.vae.config.scaling_factor
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0  # SD3's VAE centres its latents
    for start in range(0, len(chunk), settings.batch_size):
        batch = chunk[start : start + settings.batch_size]
        images, kept = [], []
        for record in batch:
            try:
                images.append(load_image(record.image, settings.resolution))
                kept.append(record)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
                bad.append((record.name, f"unreadable image: {err}"))
        bar.update(len(batch))
        if not kept:
            continue
        pixels = torch.stack(images).to(device=device, dtype=pipe.vae.dtype)  # (b, 3, R, R)
        posterior = pipe.vae.encode(pixels).latent_dist
        latents.append(((posterior.mean - shift) * scaling).float().cpu())  # (b, C, R/f, R/f)
        texts.append(_encode_text(pipe, [r.caption for r in kept], settings, device))
        names += [r.name for r in kept]
    if not names:
        return {"latents": torch.zeros(0), "prompt_embeds": torch.zeros(0)}, [], bad
    tensors = {"latents": torch.cat(latents)}  # (n, C, h, w)
    tensors.update({key: torch.cat([t[key] for t in texts]) for key in texts[0]})  # (n, L, D), (n, L), (n, P)
    return tensors, names, bad


def _as_model_input(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Cached text tensors as the model takes them: float embeddings, integer masks."""
    return tensor.long() if key == "prompt_attention_mask" else tensor.float()


def _fingerprint(chunk) -> str:
    """What a shard was made from: each record's name and caption, and the image file's size and time."""
    import hashlib

    parts = []
    for record in chunk:
        stat = Path(record.image).stat() if isinstance(record.image, (str, Path)) else None
        parts.append([record.name, record.caption, stat and stat.st_size, stat and stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _shard_entry(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    names = json.loads(metadata.get("names", "[]"))
    return {
        "file": path.name,
        "count": len(names),
        "skipped": [tuple(x) for x in json.loads(metadata.get("skipped", "[]"))],
        "fingerprint": metadata.get("fingerprint"),
    }


def _first_shape(path: Path, key: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return tuple(handle.get_slice(key).get_shape()[1:])


class LatentCaptionDataset:
    """A prepared cache, read lazily: `dataset[i]` -> (latents (C, h, w), {"prompt_embeds": (L, D),
    "prompt_attention_mask": (L,), and for SD3 "pooled_projections": (P,)}).

    Shards are memory-mapped by safetensors, so a cache larger than memory trains as well as a small one.
    """

    def __init__(self, root: str | Path):
        from safetensors import safe_open

        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root} is not a prepared cache (no {MANIFEST}); run `diffcr prepare` first")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); run `diffcr prepare` again") from err
        if self.manifest.get("_type") != CACHE_TYPE or self.manifest.get("format", 0) > CACHE_FORMAT:
            raise ValueError(f"{path} is not a cache this diffcr reads (type {self.manifest.get('_type')!r})")
        if not self.manifest.get("complete"):
            raise ValueError(
                f"the cache in {self.root} is incomplete (prepare was interrupted); rerun `diffcr prepare`"
            )
        self._handles = [safe_open(str(self.root / s["file"]), framework="pt") for s in self.manifest["shards"]]
        self._index = [(h, row) for h, s in zip(self._handles, self.manifest["shards"]) for row in range(s["count"])]
        with safe_open(str(self.root / EMPTY_PROMPT), framework="pt") as handle:
            self.text_keys = [key for key in TEXT_KEYS if key in handle.keys()]
            self.empty_prompt = {key: _as_model_input(key, handle.get_tensor(key)[0]) for key in self.text_keys}

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int):
        handle, row = self._index[i]
        latents = handle.get_slice("latents")[row : row + 1][0].float()
        text = {key: _as_model_input(key, handle.get_slice(key)[row : row + 1][0]) for key in self.text_keys}
        return latents, text

    def captions(self, count: int) -> list[str]:
        """The first `count` captions of the cache (for prompts in reports)."""
        found: list[str] = []
        for handle in self._handles:
            found += json.loads((handle.metadata() or {}).get("captions", "[]"))
            if len(found) >= count:
                break
        return found[:count]

    def batch(self, indices: torch.Tensor):
        """Stacked items for `indices`: latents (b, C, h, w) and the text tensors, each with the batch first."""
        items = [self[int(i)] for i in indices]
        latents = torch.stack([latent for latent, _ in items])
        return latents, {key: torch.stack([text[key] for _, text in items]) for key in self.text_keys}

    def check_pipeline(self, pipe, base) -> None:
        """Refuse to train a pipeline on a cache another pipeline (or resolution) made, and warn when the cache's
        resolution is not the transformer's native size (it trains at the cache's size, then samples best there).
        """
        identity = pipeline_identity(pipe, base)
        cached = dict(self.manifest["pipeline"])
        differ = [k for k in identity if k != "source" and identity[k] != cached.get(k)]
        if differ:
            raise ValueError(
                f"the cache in {self.root} was made by another pipeline ({cached['source']}): it differs in {differ}; "
                "run `diffcr prepare` with this --base"
            )
        native, resolution = default_resolution(pipe), self.manifest.get("resolution")
        if resolution is not None and resolution != native:
            logger.warning(
                "the cache in %s was prepared at %s px, but the transformer's native size is %s px: the run "
                "trains at %s px (sample at that size: --height/--width %s), or run `diffcr prepare` again "
                "without --resolution to train at %s px",
                self.root, resolution, native, resolution, resolution, native,
            )  # fmt: skip
