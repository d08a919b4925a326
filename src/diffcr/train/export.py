"""What a compression run leaves behind, and loading it back: the frozen artifact, the fine-tuned base (LoRA
merged) with its artifact, and a base model with an artifact applied, ready to sample."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def export_model(model, out_dir: str | Path) -> Path:
    """Save a (dense) base model as a diffusers folder, through a temporary folder renamed into place."""
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

    Writes `out_dir/artifact/` (routers and ratios, `diffcr.save`) and, when the base weights changed
    (modes "lora" and "full"), `out_dir/model/`: the fine-tuned base as a diffusers folder (LoRA merged) with
    the DiffCR artifact in its `diffcr/` subfolder, as a routed model's `save_pretrained` writes it, so that
    one folder loads the whole compressed model (`diffcr.from_pretrained`).

    Returns:
        {"artifact": path, "model": path (if written)}.
    """
    from accelerate import PartialState

    import diffcr

    out_dir = Path(out_dir)
    diffcr.freeze(model)
    state = PartialState()
    if not state.is_main_process:  # under accelerate launch one process writes; the others wait
        state.wait_for_everyone()
        return {}
    written = {"artifact": diffcr.save(model, out_dir / "artifact")}
    if mode in ("lora", "full"):
        base = copy.deepcopy(model)
        diffcr.remove(base)
        if mode == "lora":
            base = merge_lora(base)
        export_model(base, out_dir / "model")
        # the layout of a routed model's save_pretrained: the base at the top, the artifact in diffcr/
        diffcr.save(model, out_dir / "model" / diffcr.api.PRETRAINED_SUBFOLDER)
        written["model"] = out_dir / "model"
    state.wait_for_everyone()
    return written


def merge_lora(model):
    """Fold peft LoRA layers into their base linear layers, leaving a plain diffusers model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def load_compressed(base: str | Path | None = None, artifact: str | Path | None = None):
    """A base model with an optional DiffCR artifact applied, ready for sampling (eval mode).

    Args:
        base: None / "default" for the shipped base, else a diffusers folder or repo id. When `artifact` is a
            folder that also holds a diffusers model (written by `finish_compression`), that model is the base.
        artifact: None / "none" for the dense model, "default" for the shipped artifact, or a folder.
    """
    import diffcr
    from diffcr.models.tiny_dit import SHIPPED_ARTIFACT_DIR, load_base_model

    if artifact is not None and str(artifact) == "default":
        artifact = SHIPPED_ARTIFACT_DIR
        if not (Path(artifact) / "diffcr_weights.safetensors").is_file():
            raise FileNotFoundError(f"no shipped DiffCR artifact at {artifact}; pass --artifact DIR")
    if artifact is not None and str(artifact) == "none":
        artifact = None
    if artifact is not None and (Path(artifact) / "config.json").is_file():
        if base not in (None, "default") and Path(str(base)).resolve() != Path(artifact).resolve():
            logger.warning(
                "the artifact %s carries its own fine-tuned base weights; using them instead of %s", artifact, base
            )
        base = artifact
    model = load_base_model(base)
    if artifact is not None:
        diffcr.load(model, artifact)
    return model.eval()
