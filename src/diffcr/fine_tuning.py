"""What a compression run changed in the base weights, recorded beside its artifact, so that
`diffcr.load(base_model, "run/artifact")` gives the trained model whatever the run's mode.

A run's routers learn together with the weights they route: with `--mode lora` or `--mode full` the base weights
move too, and routers and ratios alone on the original weights are another model. So `diffcr compress` writes
`diffcr_fine_tuning.json` into `run/artifact/`, and `diffcr.load` reads it:

- mode "routers": the base did not change; nothing more to do.
- mode "lora": the LoRA matrices are stored beside the routers (`diffcr_lora.safetensors`, a few MB: rank x
  (in + out) per adapted layer) and merged into the user's own base weights when loaded. The merge is computed
  here, in fp32 on the CPU, both when the run is exported and when it is loaded, so `run/model/` (the merged
  transformer) and a load onto the original base hold the same weights bit for bit.
- mode "full": every weight moved, so the artifact cannot stay small: it points at the run's `model/` folder
  (the fine-tuned transformer, written with `save_pretrained`) and loading copies those weights in. Without that
  folder the load is refused with the path to load instead, never silently routed on the original weights.

Library code: torch and safetensors only (peft is not needed to load).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

FINE_TUNING_NAME = "diffcr_fine_tuning.json"
LORA_WEIGHTS_NAME = "diffcr_lora.safetensors"
FINE_TUNING_TYPE = "DiffCRFineTuning"
FINE_TUNING_VERSION = 1
MODES = ("routers", "lora", "full")
# where `finish_compression` writes the fine-tuned base of a full run, relative to the artifact folder
RUN_MODEL_FOLDER = "../model"
BASE_WEIGHTS = "diffusion_pytorch_model.safetensors"
BASE_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class LoRA:
    """LoRA matrices by the name of the linear layer they adapt: W + scaling * B @ A.

    Attributes:
        matrices: {layer name: (A (r, in), B (out, r))}, fp32 on the CPU.
        scaling: lora_alpha / rank.
        rank: r.
    """

    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    rank: int


@dataclass
class FineTuning:
    """A run's change to the base weights, read from an artifact folder and checked against a model."""

    mode: str
    source: Path
    lora: LoRA | None = None
    base_weights: list[Path] = field(default_factory=list)  # mode "full": the safetensors files to copy in


# -- export side: from a trained model with peft LoRA layers -------------------------------------------------
def lora_from_peft(model) -> LoRA:
    """The LoRA of every peft LoRA layer in `model` (adapter "default"), copied to fp32 CPU tensors.

    Raises:
        ValueError: no LoRA layer, or a kind this merge does not reproduce (DoRA, LoRA bias, another adapter).
    """
    matrices, scalings, ranks = {}, set(), set()
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "base_layer")):
            continue
        adapters = set(module.lora_A.keys())
        if adapters != {"default"}:
            raise ValueError(f"{name} holds LoRA adapters {sorted(adapters)}; diffcr exports the one named 'default'")
        if any(getattr(module, "use_dora", {}).values()) or any(getattr(module, "lora_bias", {}).values()):
            raise ValueError(f"{name} uses DoRA or a LoRA bias, which diffcr's merge does not reproduce")
        if not isinstance(module.base_layer, torch.nn.Linear):
            raise ValueError(f"{name} adapts a {type(module.base_layer).__name__}; diffcr merges LoRA on Linear only")
        a = module.lora_A["default"].weight.detach().float().cpu().clone()  # (r, in)
        b = module.lora_B["default"].weight.detach().float().cpu().clone()  # (out, r)
        matrices[name] = (a, b)
        scalings.add(float(module.scaling["default"]))
        ranks.add(a.shape[0])
    if not matrices:
        raise ValueError("the model holds no peft LoRA layer: a --mode lora run injects them before training")
    if len(scalings) != 1 or len(ranks) != 1:
        raise ValueError(f"LoRA layers differ in rank {sorted(ranks)} or scaling {sorted(scalings)}; expected one")
    return LoRA(matrices, scalings.pop(), ranks.pop())


def strip_peft(model) -> None:
    """Put each peft LoRA layer's base layer back in its place (without merging: `merge_lora` does that)."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())


def merge_lora(model, lora: LoRA) -> None:
    """W <- W + scaling * B @ A for every adapted layer, in place (see `merged_lora_weights`)."""
    _copy_in(model, merged_lora_weights(model, lora))


def merged_lora_weights(model, lora: LoRA) -> dict[str, torch.Tensor]:
    """The merged weight W + scaling * B @ A of every adapted layer, by parameter name; `model` is not changed.

    The sum is computed in fp32 on the CPU and cast to the weight's dtype and device, so the same base weights
    and LoRA give the same bits on any machine (a GPU matmul would sum in another order).
    """
    merged = {}
    with torch.no_grad():
        for name, (a, b) in lora.matrices.items():
            weight = model.get_submodule(name).weight  # (out, in)
            value = weight.detach().float().cpu() + lora.scaling * (b @ a)
            merged[f"{name}.weight"] = value.to(dtype=weight.dtype, device=weight.device)
    return merged


def _copy_in(model, values: dict[str, torch.Tensor]) -> None:
    params = _base_state(model)
    with torch.no_grad():
        for key, value in values.items():
            params[key].copy_(value)


def save_fine_tuning(folder: str | Path, mode: str, lora: LoRA | None = None) -> Path:
    """Record a run's mode (and its LoRA) in an artifact folder written by `diffcr.save`. Returns the JSON path."""
    from diffcr.checkpoint import save_file_atomic, write_json_atomic

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if (mode == "lora") != (lora is not None):
        raise ValueError("a LoRA goes with mode 'lora', and mode 'lora' needs its LoRA")
    folder = Path(folder)
    description = {"_type": FINE_TUNING_TYPE, "_version": FINE_TUNING_VERSION, "mode": mode}
    weights = folder / LORA_WEIGHTS_NAME
    if lora is not None:
        tensors = {}
        for name, (a, b) in lora.matrices.items():
            tensors[f"{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{name}.lora_B.weight"] = b.contiguous()
        save_file_atomic(tensors, weights)
        description["lora"] = {"weights": LORA_WEIGHTS_NAME, "rank": lora.rank, "scaling": lora.scaling}
    elif weights.exists():  # a stale LoRA must not ride along with another mode's artifact
        weights.unlink()
    if mode == "full":
        description["base_weights"] = RUN_MODEL_FOLDER
    path = folder / FINE_TUNING_NAME
    write_json_atomic(path, description)
    return path


# -- load side: onto a user's base model ---------------------------------------------------------------------
def read_fine_tuning(path: str | Path, model) -> FineTuning | None:
    """The fine-tuning recorded beside the artifact at `path`, checked against `model`; None when there is none
    to apply (an artifact of a "routers" run, or one written by `diffcr.save` outside a run).

    Nothing in `model` changes here, so a refusal leaves it as it was.

    Raises:
        ValueError: the record is damaged; a full run's fine-tuned weights are not where it points (the message
            says which folder to load instead); or the LoRA / weights do not fit `model`.
    """
    folder = Path(path)
    folder = folder if folder.is_dir() else folder.parent
    record = folder / FINE_TUNING_NAME
    if not record.is_file():
        return None
    try:
        description = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{record} is not valid JSON ({err}); export the run again (diffcr compress --resume)"
        ) from err
    if not isinstance(description, dict) or description.get("_type") != FINE_TUNING_TYPE:
        raise ValueError(f"{record} is not a {FINE_TUNING_TYPE} record; export the run again")
    if description.get("_version", 0) > FINE_TUNING_VERSION:
        raise ValueError(f"{record} was written by a newer diffcr; upgrade diffcr")
    mode = description.get("mode")
    if mode not in MODES:
        raise ValueError(f"{record}: mode {mode!r} is not one of {MODES}")
    if mode == "routers":
        return None
    if mode == "lora":
        return FineTuning(mode, folder, lora=_read_lora(folder, description.get("lora"), record, model))
    return FineTuning(mode, folder, base_weights=_full_weights(folder, description, record, model))


def apply_fine_tuning(model, fine_tuning: FineTuning | None):
    """Apply what `read_fine_tuning` found (already checked against `model`): merge the LoRA, or copy in the
    fine-tuned weights. Returns the model.

    Every new weight is computed or read first and copied in only then, so a failure on the way (memory, a
    damaged file) leaves the model's weights as they were.
    """
    if fine_tuning is None:
        return model
    if fine_tuning.lora is not None:
        _copy_in(model, merged_lora_weights(model, fine_tuning.lora))
        logger.info(
            "merged the LoRA of the run (%d layers) from %s", len(fine_tuning.lora.matrices), fine_tuning.source
        )
        return model
    from safetensors import safe_open

    params = _base_state(model)
    values = {}
    for file in fine_tuning.base_weights:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                values[key] = handle.get_tensor(key).to(dtype=params[key].dtype, device=params[key].device)
    _copy_in(model, values)
    logger.info("loaded the fine-tuned weights of the --mode full run from %s", fine_tuning.base_weights[0].parent)
    return model


def _base_state(model) -> dict[str, torch.Tensor]:
    """The model's own tensors by state-dict key (DiffCR's, if attached, are not base weights)."""
    return {key: value for key, value in model.state_dict(keep_vars=True).items() if not key.startswith("diffcr.")}


def _refuse_offloaded(model, names, what: str) -> None:
    for name in names:
        if model.get_parameter(name).is_meta:
            raise ValueError(
                f"cannot apply the run's {what}: the model's weights are offloaded (on the meta device). Load the "
                "artifact first, then enable offloading"
            )


def _read_lora(folder: Path, about, record: Path, model) -> LoRA:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(about, dict) or not {"weights", "rank", "scaling"} <= set(about):
        raise ValueError(f"{record}: the 'lora' entry needs weights, rank and scaling; export the run again")
    weights = folder / str(about["weights"])
    if not weights.is_file():
        raise ValueError(
            f"{record} records a --mode lora run, but its LoRA {weights} is missing: the routers were trained "
            "together with it. Copy the run's whole artifact folder, or load the run's model/ folder with "
            "diffcr.from_pretrained"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated?): {err}") from err
    names = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    matrices, problems = {}, []
    for name in names:
        a, b = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if a is None or b is None:
            problems.append(f"{name}: A or B missing")
        elif not isinstance(layer, torch.nn.Linear):
            problems.append(f"{name}: no such linear layer in this {type(model).__name__}")
        elif layer.weight.shape != (b.shape[0], a.shape[1]) or a.shape[0] != b.shape[1]:
            problems.append(
                f"{name}: LoRA {tuple(b.shape)} x {tuple(a.shape)} does not fit {tuple(layer.weight.shape)}"
            )
        elif not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            problems.append(f"{name}: NaN or infinite values")
        else:
            matrices[name] = (a.float(), b.float())
    if problems or not matrices:
        raise ValueError(
            f"the LoRA in {weights} does not fit this model: "
            + "; ".join(problems[:5] or ["it is empty"])
            + "; load the artifact onto the transformer the run trained"
        )
    _refuse_offloaded(model, [f"{name}.weight" for name in matrices], "LoRA")
    return LoRA(matrices, _lora_scaling(about["scaling"], record), int(about["rank"]))


def _lora_scaling(value, record: Path) -> float:
    """The LoRA `scaling` (lora_alpha / rank) an artifact records: a finite number, or a clear error."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number):
        raise ValueError(
            f"{record}: the LoRA scaling {value!r} is not a finite number (lora_alpha / rank, 1.0 for a diffcr run); "
            "the record is damaged: export the run again (diffcr compress --resume)"
        )
    return float(number)


def _full_weights(folder: Path, description: dict, record: Path, model) -> list[Path]:
    """The safetensors files of a full run's fine-tuned base, checked against `model` by key and shape."""
    from safetensors import safe_open

    model_folder = (folder / str(description.get("base_weights", RUN_MODEL_FOLDER))).resolve()
    index = model_folder / BASE_WEIGHTS_INDEX
    if (model_folder / BASE_WEIGHTS).is_file():
        files = [model_folder / BASE_WEIGHTS]
    elif index.is_file():
        files = _shard_files(index)
    else:
        raise ValueError(
            f"{folder} holds the routers of a --mode full run, which trained them together with every base weight; "
            f"on the original weights they would give another model. Its fine-tuned transformer belongs in "
            f"{model_folder} (the run's model/ folder), which is missing: load that folder instead "
            f'(diffcr.from_pretrained("{model_folder}") or `diffcr sample --artifact {model_folder}`), or keep '
            f"it beside the artifact. To route the original weights anyway, delete {record}"
        )
    own = _base_state(model)
    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            found.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
    differ = sorted(set(own) ^ set(found))
    wrong = sorted(key for key in set(own) & set(found) if tuple(own[key].shape) != found[key])
    if differ or wrong:
        raise ValueError(
            f"the fine-tuned weights in {model_folder} do not fit this model (keys differ: {differ[:4]}; shapes "
            f"differ: {wrong[:4]}); load the artifact onto the transformer the run trained"
        )
    _refuse_offloaded(model, [key for key, value in own.items() if isinstance(value, torch.nn.Parameter)], "weights")
    return files


def _shard_files(index: Path) -> list[Path]:
    """The shard files a `save_pretrained` index lists, each checked to exist; a damaged index is a ValueError."""
    fix = "save the run's model/ folder again (or copy it whole from where the run wrote it)"
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"the shard index {index} is not valid JSON ({err}); {fix}") from err
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"the shard index {index} has no 'weight_map' of key -> shard file names; {fix}") from err
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"the shard index {index} lists no shard file names in its 'weight_map'; {fix}")
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        raise ValueError(f"the shard index {index} lists shard files that are missing: {missing[:5]}; {fix}")
    return [index.parent / name for name in names]
