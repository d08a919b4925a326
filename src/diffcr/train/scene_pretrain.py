"""Pretrain the text-to-image default from scratch: the scene VAE first, then the PixArt transformer on its
latents with all-MiniLM-L6-v2 captions. Both stages resume from their checkpoints; `out/pipeline` is the
result, in `PixArtSigmaPipeline.save_pretrained`'s layout without the text encoder (the package provides it)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _bypass_config():
    from diffcr.config import DiffCRConfig

    # the routing the text-to-image demo's DiffCR runs: 4 timestep regions, cross-attention on bypassed tokens
    return DiffCRConfig(timestep_regions=4, route_cross_attention=False)


def pretrain_scene_pipeline(
    out: str | Path,
    steps: int = 3000,
    vae_steps: int = 900,
    batch_size: int = 32,
    lr: float = 6e-4,
    warmup_steps: int = 200,
    seed: int = 0,
    resume: bool = False,
    checkpoint_every: int = 100,
    max_minutes: float | None = None,
    progress: bool = True,
    snr_gamma: float | None = None,
    snr_weighting: str = "min",
    transformer_overrides: dict | None = None,
    text_encoder_layers: int | None = None,
    init_from: str | Path | None = None,
    token_bypass: float = 0.0,
    focus_digits: tuple[int, ...] = (),
    focus_fraction: float = 0.0,
    average_from: int = 0,
    lr_schedule: str = "constant",
    drop_blocks: tuple[int, ...] = (),
) -> Path:
    """Train the scene VAE (`out/vae_run`) and then the transformer (`out/transformer_run`); export both to
    `out/pipeline`. Returns that folder.

    `transformer_overrides` change the transformer's config (`models.scene_pipeline.TRANSFORMER_CONFIG`), e.g.
    {"num_layers": 12, "num_attention_heads": 6, "cross_attention_dim": 192} for a deeper and wider one; a resumed
    run must pass the ones it started with (the loop refuses another architecture).

    `text_encoder_layers`: how many of MiniLM's layers give the caption states (default
    `models.scene_pipeline.TEXT_ENCODER_LAYERS`). `init_from`: a pipeline folder in the default's layout whose VAE
    is kept and whose transformer training starts from (no VAE is trained, and the architecture is that
    transformer's: `transformer_overrides` may only raise `num_layers`, which grows it deeper with new blocks that
    start as the identity, `diffcr.models.growth`); how the shipped transformer moved from MiniLM's last layer to
    its third. A resumed run goes on with the ones it started with and refuses others.

    `token_bypass`: in each step each (block, timestep region) routes a random subset of tokens past the block with
    this chance (`diffcr.train.bypass`), the way the demo's DiffCR routes them (bypassed tokens keep the block's
    cross-attention). `focus_digits` / `focus_fraction`: that fraction of every batch are two-digit
    scenes holding one of those digits (`SceneConditioning`). `average_from`: the transformer written is the mean
    of its weights at every checkpoint step from this one on and at the last step (`TrainConfig.average_from`), as
    the shipped one is. `lr_schedule`: `TrainConfig.lr_schedule`.

    `drop_blocks`: blocks (0-based) init_from's transformer loses first (`diffcr.models.growth.drop_blocks`).
    With `init_from`, `steps=0` writes the starting transformer (grown or with blocks dropped) untrained.
    """
    from diffusers import AutoencoderKL

    from diffcr.data.scenes import DigitScenes
    from diffcr.models.scene_pipeline import build_scene_transformer, load_text_encoder
    from diffcr.models.tiny_dit import build_scheduler
    from diffcr.train.config import TrainConfig
    from diffcr.train.loop import train
    from diffcr.train.scene_conditioning import SceneConditioning

    out = Path(out)
    run_dir = out / "transformer_run"
    if steps == 0:
        if init_from is None or resume or average_from:
            raise ValueError(
                "steps=0 writes the transformer of init_from as it starts (grown or with blocks dropped), without "
                "training: give init_from, no resume and no average_from, or steps >= 1"
            )
        return _write_untrained(
            out / "pipeline", Path(init_from), transformer_overrides, drop_blocks, text_encoder_layers
        )
    text_encoder_layers, init_from, drop_blocks = _resumed_choices(
        run_dir, resume, text_encoder_layers, init_from, tuple(drop_blocks)
    )
    if drop_blocks and init_from is None:
        raise ValueError(f"drop_blocks {list(drop_blocks)} drops blocks of init_from's transformer: give init_from")
    if init_from is not None:
        vae_dir, transformer = _start_from_pipeline(Path(init_from), transformer_overrides, drop_blocks)
    else:
        vae_dir = _trained_scene_vae(out / "vae_run", vae_steps, batch_size, seed, resume, progress)
        transformer = build_scene_transformer(**(transformer_overrides or {}))
    vae = AutoencoderKL.from_pretrained(vae_dir)
    tokenizer, text_encoder = load_text_encoder(text_encoder_layers)
    conditioning = SceneConditioning(
        DigitScenes("train", seed=seed), vae, tokenizer, text_encoder, tuple(focus_digits), focus_fraction
    )
    torch.manual_seed(seed)
    cfg = TrainConfig(
        mode="pretrain",
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        seed=seed,
        max_minutes=max_minutes,
        mixed_precision="no",
        snr_gamma=snr_gamma,
        snr_weighting=snr_weighting,
        token_bypass=token_bypass,
        average_from=average_from,
        lr_schedule=lr_schedule,
    )
    resume_transformer = resume and run_dir.is_dir() and any(run_dir.glob("checkpoint-*"))
    run_info = {"task": "t2i", "text_encoder_layers": text_encoder_layers}
    run_info |= {"init_from": str(init_from)} if init_from is not None else {"vae_steps": vae_steps}
    run_info |= {"drop_blocks": list(drop_blocks)} if drop_blocks else {}
    run_info |= {"focus_digits": sorted(focus_digits), "focus_fraction": focus_fraction}
    result = train(
        run_dir,
        transformer,
        conditioning,
        cfg,
        diffcr_config=_bypass_config() if token_bypass else None,
        scheduler=build_scheduler("ddpm"),
        resume=resume_transformer,
        progress=progress,
        run_info=run_info,
    )
    pipeline_dir = _write_pipeline(out / "pipeline", result.model, vae, text_encoder_layers)
    averaged = f" (the mean of steps {list(result.averaged_steps)})" if result.averaged_steps else ""
    logger.info("pretrained pipeline written to %s after %d steps%s", pipeline_dir, result.steps_done, averaged)
    return pipeline_dir


def _trained_scene_vae(run_dir: Path, steps: int, batch_size: int, seed: int, resume: bool, progress: bool) -> Path:
    """The folder of the scene VAE trained in `run_dir`, trained (or resumed) first unless it is there."""
    from diffcr.train.vae import train_scene_vae

    vae_dir = run_dir / "vae"
    if not (vae_dir / "config.json").is_file():
        train_scene_vae(run_dir, steps=steps, batch_size=batch_size, seed=seed, resume=resume, progress=progress)
    return vae_dir


def _write_untrained(
    pipeline_dir: Path, init_from: Path, transformer_overrides: dict | None, dropped, asked_layers: int | None
) -> Path:
    """`pretrain_scene_pipeline` with steps=0: `init_from`'s transformer as it starts (grown or with blocks
    dropped), untrained, on the text encoder layers it learned on (another count is refused)."""
    from diffusers import AutoencoderKL

    from diffcr.models.scene_pipeline import text_encoder_layers

    vae_dir, transformer = _start_from_pipeline(init_from, transformer_overrides, tuple(dropped))
    own_layers = text_encoder_layers(init_from)
    if asked_layers is not None and asked_layers != own_layers:
        raise ValueError(
            f"steps=0 keeps the transformer of {init_from} untrained, and it learned on {own_layers} text encoder "
            f"layers, not {asked_layers}: leave the option out, or train (steps >= 1) to move it to {asked_layers}"
        )
    _write_pipeline(pipeline_dir, transformer, AutoencoderKL.from_pretrained(vae_dir), own_layers)
    logger.info("wrote %s's transformer untrained (steps=0) to %s", init_from, pipeline_dir)
    return pipeline_dir


def _write_pipeline(pipeline_dir: Path, transformer, vae, text_encoder_layers: int) -> Path:
    """The pipeline folder in the default's layout (the text encoder is named, not stored)."""
    from diffcr.models.scene_pipeline import build_scene_scheduler, write_model_index

    transformer.eval().save_pretrained(pipeline_dir / "transformer")
    vae.save_pretrained(pipeline_dir / "vae")
    build_scene_scheduler().save_pretrained(pipeline_dir / "scheduler")
    write_model_index(pipeline_dir, text_encoder_layers)
    return pipeline_dir


def _saved_run_info(run_dir: Path) -> dict | None:
    """The `run.json` of a transformer run to resume, or None when there is none yet."""
    import json

    path = run_dir / "run.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot resume: {path} is not JSON ({err})") from err
    return saved if isinstance(saved, dict) else None


def _resumed_choices(
    run_dir: Path, resume: bool, text_encoder_layers, init_from, drop_blocks: tuple[int, ...] = ()
) -> tuple[int, Path | None, tuple[int, ...]]:
    """(text encoder layers, init_from, drop_blocks) for the run: what a resumed run started with (refusing
    others), else what was asked, with `TEXT_ENCODER_LAYERS` by default."""
    from diffcr.models.scene_pipeline import MINILM_LAYERS, TEXT_ENCODER_LAYERS, check_text_encoder_layers

    saved = _saved_run_info(run_dir) if resume else None
    if saved is not None:
        # a resumed run goes on with what it started with (runs from before the choice existed used all of MiniLM)
        started_layers = saved.get("text_encoder_layers", MINILM_LAYERS)
        if text_encoder_layers is not None and text_encoder_layers != started_layers:
            raise ValueError(
                f"cannot resume {run_dir}: it was trained on {started_layers} text encoder layers, not "
                f"{text_encoder_layers}; leave the option out to go on with {started_layers}, or start a new run"
            )
        text_encoder_layers = started_layers
        if init_from is not None and saved.get("init_from") is None:
            raise ValueError(
                f"cannot resume {run_dir} from {init_from}: it started from scratch, with its own VAE; leave out "
                "init_from to go on with it, or start a new run"
            )
        init_from = saved.get("init_from") if init_from is None else init_from
        started_drop = tuple(sorted(saved.get("drop_blocks", ())))
        if drop_blocks and tuple(sorted(drop_blocks)) != started_drop:
            started = f"dropping {list(started_drop)}" if started_drop else "with no block dropped"
            raise ValueError(
                f"cannot resume {run_dir} dropping blocks {sorted(drop_blocks)}: it started {started}; leave the "
                "option out to go on as it started, or start a new run"
            )
        drop_blocks = started_drop
    layers = check_text_encoder_layers(TEXT_ENCODER_LAYERS if text_encoder_layers is None else text_encoder_layers)
    return layers, None if init_from is None else Path(init_from), drop_blocks


def _start_from_pipeline(init_from: Path, transformer_overrides: dict | None, dropped: tuple[int, ...] = ()):
    """(VAE folder, transformer) of the pipeline folder `init_from`. An override of `num_layers` above its
    transformer's grows it deeper, each new block starting as the identity (`diffcr.models.growth`); `dropped`
    removes those blocks instead; any other change to its architecture is refused."""
    from diffusers import PixArtTransformer2DModel

    from diffcr.models.growth import check_grown_matches, drop_blocks, grow_depth
    from diffcr.models.scene_pipeline import is_scene_pipeline_folder

    if not is_scene_pipeline_folder(init_from) or not (init_from / "transformer" / "config.json").is_file():
        raise ValueError(
            f"init_from {str(init_from)!r} is not a pipeline folder in the default's layout (model_index.json "
            "naming MiniLM, transformer/ and vae/ subfolders), as `diffcr pretrain --task t2i` writes to OUT/pipeline"
        )
    transformer = PixArtTransformer2DModel.from_pretrained(init_from / "transformer")
    if dropped and (transformer_overrides or {}).get("num_layers") is not None:
        raise ValueError(
            f"num_layers={transformer_overrides['num_layers']} and dropping blocks {list(dropped)} at once: drop "
            "the blocks, then grow or drop more in a second run"
        )
    changed = {k: v for k, v in (transformer_overrides or {}).items() if transformer.config.get(k) != v}
    grown_layers = changed.pop("num_layers", None)
    if changed:
        raise ValueError(
            f"the transformer starts from {init_from}, so its architecture is that one's (it may only grow deeper); "
            f"drop the overrides {changed}"
        )
    if dropped:
        source_layers = transformer.config.num_layers
        transformer = drop_blocks(transformer, dropped)
        logger.info("dropped blocks %s of the %d of %s's transformer", list(dropped), source_layers, init_from)
    if grown_layers is not None:
        if grown_layers < transformer.config.num_layers:
            raise ValueError(
                f"num_layers={grown_layers}: the transformer of {init_from} has {transformer.config.num_layers} "
                "blocks, and starting from it may add blocks but not remove them"
            )
        grown = grow_depth(transformer, grown_layers)
        check_grown_matches(transformer, grown, atol=1e-5)
        logger.info(
            "grew the transformer of %s from %d to %d blocks", init_from, transformer.config.num_layers, grown_layers
        )
        transformer = grown
    return init_from / "vae", transformer
