"""What a compression run leaves behind, and loading it back: the frozen artifact, the fine-tuned base (LoRA
merged) with its artifact, and a base model with an artifact applied, ready to sample."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def export_model(model, out_dir: str | Path) -> Path:
    """Save a model as a diffusers folder, through a temporary folder renamed into place (a routed model's
    `save_pretrained` also writes its DiffCR artifact into the `diffcr/` subfolder)."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def finish_compression(model, out_dir: str | Path, mode: str) -> dict[str, Path]:
    """Freeze the learned schedule and write the results of a compression run.

    Writes `out_dir/artifact/`: routers and ratios (`diffcr.save`) plus the run's change to the base weights
    (`diffcr.fine_tuning`): its mode, and for "lora" the LoRA itself, for "full" a pointer to `model/`. So
    `diffcr.load(base, "out_dir/artifact")` gives the trained model in every mode. For "lora" and "full" it also
    writes `out_dir/model/`: the fine-tuned base as a diffusers folder with the DiffCR artifact in its `diffcr/`
    subfolder, as a routed model's `save_pretrained` writes it (`diffcr.from_pretrained` loads it in one call).

    In "lora" mode the LoRA is merged into `model` in place (`diffcr.fine_tuning.merge_lora`), so `model`, the
    `model/` folder and the artifact loaded onto the original base all hold the same weights, bit for bit.

    Returns:
        {"artifact": path, "model": path (if written)}.
    """
    from accelerate import PartialState

    import diffcr
    from diffcr.fine_tuning import save_fine_tuning

    out_dir = Path(out_dir)
    diffcr.freeze(model)
    state = PartialState()
    if not state.is_main_process:  # under accelerate launch one process writes; the others wait
        state.wait_for_everyone()
        return {}
    lora = None
    if mode == "lora":
        model, lora = merge_lora(model, keep=True)
    artifact = diffcr.save(model, out_dir / "artifact")
    save_fine_tuning(artifact, mode if mode in ("lora", "full") else "routers", lora=lora)
    written = {"artifact": artifact}
    if mode in ("lora", "full"):
        # a routed model's save_pretrained: the base at the top, the artifact in diffcr/, and the config.json
        # marker that makes a plain diffusers load of the folder warn that it gives the dense base
        export_model(model, out_dir / "model")
        written["model"] = out_dir / "model"
    state.wait_for_everyone()
    return written


def merge_lora(model, keep: bool = False):
    """Fold peft LoRA layers into their base linear layers, leaving a plain diffusers model (in place).

    The merge is `diffcr.fine_tuning.merge_lora` (fp32 on the CPU), the one `diffcr.load` uses for a LoRA run's
    artifact, so both give the same weights.

    Returns:
        The model; with `keep`, (the model, the `LoRA` that was merged).
    """
    from diffcr.fine_tuning import lora_from_peft, strip_peft
    from diffcr.fine_tuning import merge_lora as merge

    lora = lora_from_peft(model)
    strip_peft(model)
    merge(model, lora)
    return (model, lora) if keep else model


def load_compressed(base: str | Path | None = None, artifact: str | Path | None = None):
    """A base model with an optional DiffCR artifact applied, ready for sampling (eval mode).

    Args:
        base: None / "default" for the shipped base, else a diffusers folder or repo id. When `artifact` is a
            folder that also holds a diffusers model (written by `finish_compression`), that model is the base.
        artifact: None / "none" for the dense model, "default" for the shipped artifact, or a folder.
    """
    import contextlib

    import diffcr
    from diffcr.contracts import quiet_artifact_marker
    from diffcr.models.tiny_dit import SHIPPED_ARTIFACT_DIR, load_base_model

    if artifact is not None and str(artifact) == "default":
        artifact = SHIPPED_ARTIFACT_DIR
        if not (Path(artifact) / "diffcr_weights.safetensors").is_file():
            raise FileNotFoundError(f"no shipped DiffCR artifact at {artifact}; pass --artifact DIR")
    if artifact is not None and str(artifact) == "none":
        artifact = None
    carries_base = artifact is not None and (Path(artifact) / "config.json").is_file()
    if carries_base:
        if base not in (None, "default") and Path(str(base)).resolve() != Path(artifact).resolve():
            logger.warning(
                "the artifact %s carries its own fine-tuned base weights; using them instead of %s", artifact, base
            )
        base = artifact
    # the base of a routed folder is loaded, then routed below: diffusers' warning for plain loads would be wrong
    with quiet_artifact_marker() if carries_base else contextlib.nullcontext():
        model = load_base_model(base)
    if artifact is not None:
        diffcr.load(model, artifact)
    return model.eval()
