"""A run folder over time: resuming (what may change, which checkpoint), atomic checkpoints that only ever
hold finite weights, what to do after a divergence, and the metrics log."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from diffcr.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    save_checkpoint,
    write_json_atomic,
)
from diffcr.train.config import TrainConfig, TrainingDiverged

logger = logging.getLogger(__name__)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# a resumed run may run longer, under another time limit, or with other learning rates, clipping and warmup (how a
# diverged run is rescued); anything else would change what its steps compute
RESUME_MAY_CHANGE = (
    "steps",
    "max_minutes",
    "checkpoint_every",
    "num_threads",
    "lr",
    "router_lr",
    "ratio_lr",
    "grad_clip",
    "warmup_steps",
    "gradient_checkpointing",
    "snr_gamma",
    "snr_weighting",
)


def _checkpoint_to_resume(
    run_dir: Path, resume: bool, base_model, diffcr_config, cfg: TrainConfig, run_info, log_changes: bool = True
):
    """The checkpoint a run continues from (None for a fresh run), after checking that it may be continued."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run (at {ckpt.name}); pass resume=True / --resume "
            "to continue it, or choose another run directory"
        )
    if resume and ckpt is None:
        raise FileNotFoundError(
            f"nothing to resume in {run_dir}: it holds no checkpoint (no {run_dir / 'latest'}); "
            "drop --resume to start a new run"
        )
    if ckpt is None:
        return None
    run_file = run_dir / "run.json"
    try:
        saved_run = json.loads(run_file.read_text())
        saved = saved_run["train"]
        if not isinstance(saved, dict):
            raise TypeError(f"'train' is {type(saved).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"cannot resume {run_dir}: {run_file} is missing or damaged ({type(err).__name__}: {err}); "
            "start afresh in a new folder"
        ) from err
    _check_same_run(run_dir, saved_run, base_model, diffcr_config, cfg, run_info)
    given = asdict(cfg)
    differ = sorted(k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != given.get(k))
    if differ:
        raise ValueError(
            f"cannot resume {run_dir}: its training config differs in {differ} "
            f"(saved {[saved[k] for k in differ]}, given {[given.get(k) for k in differ]}); give the saved "
            f"values, or start a new run (only {', '.join(RESUME_MAY_CHANGE)} may change on resume)"
        )
    rescue = ("lr", "router_lr", "ratio_lr", "grad_clip", "warmup_steps")  # a longer run is routine; these are not
    changed = {k: (saved[k], given[k]) for k in rescue if k in saved and saved[k] != given[k]}
    if changed and log_changes:
        logger.warning(
            "resuming %s with changed settings: %s",
            run_dir,
            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
        )
    return ckpt


def _load_checkpoint_into(ckpt: Path, model, optimizer, cfg: TrainConfig):
    """Copy a checkpoint's weights and optimizer state into `model` and `optimizer`; returns (its step, the weight
    average it holds: a `WeightAverage`, or None when the run does not average)."""
    trainable, opt_tensors, opt_described, meta = load_checkpoint(ckpt)
    params = trainable_state(model)
    missing = set(params) ^ set(trainable)
    if missing:
        raise ValueError(f"checkpoint {ckpt} does not match this model/mode; differing tensors: {sorted(missing)[:8]}")
    wrong = sorted(name for name, param in params.items() if param.shape != trainable[name].shape)
    if wrong:
        raise ValueError(f"checkpoint {ckpt} does not match this model: tensors of other shapes {wrong[:8]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trainable[name])
    try:
        optimizer.load_state_dict(optimizer_from_tensors(opt_tensors, opt_described))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"the optimizer state in {ckpt} does not fit this run ({err}); start afresh in a new folder"
        ) from err
    # the learning rates come from this call's config, not the checkpoint: lowering them is how a run
    # that diverged is continued from its last good checkpoint
    initial = {"base": cfg.lr, "router": cfg.router_lr, "ratio": cfg.ratio_lr}
    for group in optimizer.param_groups:
        group["initial_lr"] = initial.get(group.get("name"), group["initial_lr"])
    average = None
    if cfg.average_from:
        from diffcr.train.averaging import WeightAverage

        average = WeightAverage.from_checkpoint(ckpt, meta, meta["step"], cfg.average_from)
        average.check_fits(params, str(ckpt))
    return meta["step"], average


def _stop_if_diverged(accelerator, value: torch.Tensor, step: int, start_step: int, run_dir: Path, what: str) -> None:
    """Raise `TrainingDiverged` on every rank when `value` is not finite on any rank."""
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=value.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        shown = value.item() if value.numel() == 1 else "non-finite"
        advice = _after_divergence(run_dir, step, start_step, accelerator.is_main_process)
        raise TrainingDiverged(f"{what} became {shown} at step {step}; stopped before updating the weights. {advice}")


def _checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-", 1)[1])


def _after_divergence(run_dir: Path, step: int, start_step: int, is_main: bool) -> str:
    """Make `latest` point at a checkpoint that is really good, and say what to do next.

    Checkpoint c holds the weights that step c computes with. If this run wrote it and step c itself diverged, those
    weights are what broke (resuming from them diverges again at once): that checkpoint is removed and `latest` moves
    to the one before (training keeps two), or is removed when there is none. A checkpoint older than the diverging
    step is good: the steps after it were finite.
    """
    import shutil

    from diffcr.checkpoint import LATEST

    try:
        ckpt = latest_checkpoint(run_dir)
    except CheckpointError:
        ckpt = None
    lower = "lower the learning rates (--lr, --router-lr, --ratio-lr) or use --mixed-precision no"
    if ckpt is not None and _checkpoint_step(ckpt) == step and step > start_step:
        older = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) < step)
        if is_main:
            if older:
                write_json_atomic(run_dir / LATEST, {"checkpoint": older[-1].name, "step": _checkpoint_step(older[-1])})
            else:
                (run_dir / LATEST).unlink(missing_ok=True)
            shutil.rmtree(ckpt, ignore_errors=True)
            logger.warning("removed %s: its weights gave the non-finite value at step %d", ckpt, step)
        ckpt = older[-1] if older else None
    if ckpt is None:
        return (
            f"No checkpoint with sound weights is left in {run_dir}: {lower}, and start again without --resume "
            "(the same --out works)"
        )
    if _checkpoint_step(ckpt) == step:  # the run resumed from it and diverged at once
        return (
            f"This run resumed from {ckpt} and diverged at its first step: {lower} further and --resume again, "
            "or start afresh in a new --out"
        )
    # checkpoints are only written with finite weights (see _checkpoint), and the steps after this one were finite
    return f"The last good checkpoint, {ckpt} (step {_checkpoint_step(ckpt)}), is intact: {lower}, then --resume"


def _check_same_run(run_dir: Path, saved: dict, base_model, diffcr_config, cfg: TrainConfig, run_info) -> None:
    """Refuse to resume with another base model, DiffCR config or base source than the run started with."""
    problems = []

    def architecture(config: dict) -> dict:  # diffusers' "_" keys (source path, version, ...) are not the model
        return {k: v for k, v in config.items() if not k.startswith("_")}

    given_config = json.loads(json.dumps(dict(base_model.config), default=str))
    saved_arch, given_arch = architecture(saved.get("model_config") or {}), architecture(given_config)
    if saved_arch != given_arch:
        keys = sorted(k for k in saved_arch.keys() | given_arch.keys() if saved_arch.get(k) != given_arch.get(k))
        changes = ", ".join(f"{k} {saved_arch.get(k)!r} -> {given_arch.get(k)!r}" for k in keys)
        problems.append(
            f"the base model's config differs ({changes}); build the model the run started with (for `diffcr "
            "pretrain`, the same --num-layers / --width / --image-size)"
        )
    if cfg.mode != "pretrain":
        from diffcr.config import DiffCRConfig

        given = (diffcr_config or DiffCRConfig()).to_dict()
        stored = dict(saved.get("diffcr") or {})
        if stored.get("num_train_timesteps") is not None and given.get("num_train_timesteps") is None:
            given["num_train_timesteps"] = stored["num_train_timesteps"]
        if stored != given:
            problems.append(f"the DiffCR config differs (saved {stored}, given {given})")
    for key, value in (run_info or {}).items():
        if key in saved and not _same_source(saved[key], value):
            problems.append(f"{key} differs (saved {saved[key]!r}, given {value!r})")
    if problems:
        raise ValueError(f"cannot resume {run_dir}: " + "; ".join(problems))


def _same_source(saved, given) -> bool:
    """The same value, or two spellings of one existing path ("cache", "cache/", "./cache", absolute)."""
    if saved == given:
        return True
    if not isinstance(saved, str) or not isinstance(given, str):
        return False
    return Path(saved).exists() and Path(given).exists() and Path(saved).resolve() == Path(given).resolve()


def _checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, cfg: TrainConfig, average=None) -> None:
    accelerator.wait_for_everyone()
    tensors = trainable_state(accelerator.unwrap_model(model))
    # a checkpoint must be a sound place to resume from: never replace the last good one with broken weights
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise TrainingDiverged(
            f"weights became non-finite by step {step} ({bad[:4]}); this state was not checkpointed. "
            f"{_after_divergence(run_dir, step, step, accelerator.is_main_process)}"
        )
    if accelerator.is_main_process:
        # two are kept: if the newest one's weights diverge at once, the one before is still there to resume from
        kept_average = None if average is None else (average.mean, average.steps)
        save_checkpoint(run_dir, step, tensors, optimizer, {"train": asdict(cfg)}, keep=2, average=kept_average)


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep only rows with step <= upto_step, so a resumed run's log has each step once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
