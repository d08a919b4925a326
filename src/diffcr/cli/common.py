"""Helpers shared by the commands: error reporting and checks of options that only the CLI has."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import typer


def friendly_errors(fn):
    """Turn the library's clear errors into a one-line message and exit code 2, without a traceback.

    Only errors whose messages the library writes for people are caught here (bad values, missing or damaged
    files, a diverged or locked run); anything else is a bug and keeps its traceback. Ctrl-C exits with 130.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from diffcr.checkpoint import RunInUse
        from diffcr.train import TrainingDiverged

        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, FileExistsError, TypeError, TrainingDiverged, RunInUse) as err:
            typer.echo(f"error: {with_flag_names(str(err))}", err=True)
            raise typer.Exit(code=2) from err
        except KeyboardInterrupt as err:
            typer.echo(f"interrupted: {err}" if str(err) else "interrupted", err=True)
            raise typer.Exit(code=130) from err

    return wrapper


# the library's configs name their fields; a person typed the flag
FLAG_OF_FIELD = {
    "label_drop_prob": "--drop-prob",
    "max_minutes": "--minutes",
    "target_kept_ratio": "--target",
    "ratio_loss_weight": "--lambda",
    "timestep_regions": "--regions",
    "num_per_prompt": "--num",
    "num_threads": "--threads",
    "router_lr": "--router-lr",
    "ratio_lr": "--ratio-lr",
    "weight_decay": "--weight-decay",
    "grad_clip": "--grad-clip",
    "warmup_steps": "--warmup-steps",
    "checkpoint_every": "--checkpoint-every",
    "lora_rank": "--lora-rank",
    "batch_size": "--batch-size",
    "guidance_scale": "--guidance-scale",
    "steps": "--steps",
    "seed": "--seed",
    "lr": "--lr",
}


# `--transformer` / `--transformer-subfolder`: one wording for prepare, compress, sample and evaluate
TRANSFORMER_HELP = (
    "text-to-image: a transformer folder or repo id that replaces the pipeline's own, e.g. "
    "PixArt-alpha/PixArt-Sigma-XL-2-512-MS with --base PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"
)
# `--dtype`: one wording for prepare, sample and evaluate
DTYPE_HELP = (
    "text-to-image: the precision the pipeline is loaded in: auto (bf16 on a CUDA GPU, fp32 on a CPU), fp32, bf16, "
    "or fp16 (CUDA only)"
)
TRANSFORMER_SUBFOLDER_HELP = (
    "where the transformer sits inside --transformer ('' = its top level; a local folder without this subfolder "
    "is read at its top level)"
)


def with_flag_names(message: str) -> str:
    """`label_drop_prob=nan must ...` -> `--drop-prob: label_drop_prob=nan must ...`: the flag a person typed."""
    import re

    def name_flag(match: re.Match) -> str:
        field, value = match.group(1), match.group(2)
        return f"{FLAG_OF_FIELD[field]}: {field}={value}"

    fields = "|".join(sorted(FLAG_OF_FIELD, key=len, reverse=True))
    return re.sub(rf"(?<![\w-])({fields})=(\S+?)(?=[\s,;:)]|$)", name_flag, message, count=1)


def check_int(option: str, value: int, low: int, high: int, why: str = "") -> None:
    """Refuse an integer option outside [low, high], naming the option and the range."""
    if not low <= value <= high:
        because = f" ({why})" if why else ""
        raise ValueError(f"{option} {value} is outside [{low}, {high}]{because}; choose a value in that range")


def check_float(option: str, value: float | None, low: float, high: float = math.inf, what: str = "") -> None:
    """Refuse a float option that is NaN, infinite, or outside [low, high] (None passes: "not given")."""
    if value is None:
        return
    about = f" ({what})" if what else ""
    if not math.isfinite(value):
        raise ValueError(f"{option} {value} must be a finite number{about}")
    if not low <= value <= high:
        raise ValueError(f"{option} {value} is outside [{low:g}, {high:g}]{about}")


def check_new_run_dir(out: Path, resume: bool) -> None:
    """Refuse an --out that cannot hold this run, before any data or model is loaded and before it is created.

    It must be writable; with --resume it must hold a checkpoint; without, it must be new, empty, or a run
    folder (whose own check then says "already holds a run"), so a run never scatters its files among others.
    """
    from diffcr.checkpoint import LATEST, check_writable_dir, latest_checkpoint

    check_writable_dir(out, "--out")
    if resume:
        if not out.is_dir() or latest_checkpoint(out) is None:
            raise FileNotFoundError(
                f"nothing to resume in {out}: it holds no checkpoint (no {out / LATEST}); "
                "drop --resume to start a new run"
            )
        return
    if out.is_dir() and not (out / "run.json").exists() and not (out / LATEST).exists():
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if others:
            raise ValueError(
                f"--out {out} already holds other files ({', '.join(others[:5])}) and no diffcr run; "
                "choose a new or empty folder"
            )


def check_base_data_fit(model, dataset, data: str) -> None:
    """A clearer wording of `check_dataset_fits_model` for the CLI's --base and --data."""
    from diffcr.train import check_dataset_fits_model

    try:
        check_dataset_fits_model(dataset, model)
    except ValueError as err:
        raise ValueError(f"--data {data} does not fit --base: {err}") from err
