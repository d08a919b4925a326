"""The public verbs: apply, remove, freeze, save, load, and what a trainer needs (ratio loss, parameter groups).

One mechanism for every family: each routable block's class is swapped for a routing subclass (so its
attributes, hooks and state-dict keys stay as they were), a `DiffCRController` is attached as `model.diffcr`,
and a forward pre-hook on the model records the timestep each sample receives.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from diffcr.adapters import get_adapter
from diffcr.adapters.base import check_cross_attention_bypass, mlp_gate_hook, routed_class
from diffcr.config import CONFIG_VERSION, DiffCRConfig
from diffcr.contracts import (
    execution_device,
    quiet_artifact_marker,
    register_config,
    retarget_hooked_forward,
    routed_model_class,
)
from diffcr.controller import DiffCRController
from diffcr.fine_tuning import apply_fine_tuning, read_fine_tuning
from diffcr.ratios import ratio_loss_value

logger = logging.getLogger(__name__)

ATTR = "diffcr"
WEIGHTS_NAME = "diffcr_weights.safetensors"
CONFIG_NAME = "diffcr_config.json"
# inside a `save_pretrained` folder the artifact sits in this subfolder, so that the folder's top level is
# exactly diffusers' layout (tools that count or convert `*.safetensors` there see the base weights only)
PRETRAINED_SUBFOLDER = "diffcr"
ARTIFACT_FORMAT = 1


def is_applied(model) -> bool:
    """Whether `apply` has attached DiffCR to `model`."""
    return isinstance(getattr(model, "_modules", {}).get(ATTR), DiffCRController)


def _controller(model) -> DiffCRController:
    if not is_applied(model):
        raise ValueError(
            f"DiffCR is not applied to this {type(model).__name__}; call diffcr.apply(model, config) first"
        )
    return model._modules[ATTR]


def _timestep_pre_hook(model, args, kwargs):
    # by name or position (the timestep is the 2nd positional argument of DiT but the 3rd of PixArt), through
    # positions read once per class: binding a signature at every call would be traced at every compile
    positions = type(model)._diffcr_forward_positions

    def argument(name: str):
        if name in kwargs:
            return kwargs[name]
        position = positions.get(name)
        return args[position] if position is not None and position < len(args) else None

    model._modules[ATTR].begin_forward(argument("timestep"), argument("hidden_states").shape[0])


def check_config_fits(model, config: DiffCRConfig):
    """Refuse a config that `apply` would refuse on `model`, without touching the model.

    Returns:
        (the model's adapter, its blocks, the number of training timesteps its regions cut).

    Raises:
        ValueError: the config does not fit the model (a gate its blocks lack, cross-attention for bypassed
            tokens on blocks that cannot run it, more regions than timesteps).
    """
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    if config.gate == "sigmoid_mlp":
        without_mlp = [i for i, b in enumerate(blocks) if not isinstance(getattr(b, "ff", None), torch.nn.Module)]
        if without_mlp:
            raise ValueError(
                f"gate='sigmoid_mlp' gates a block's `ff` MLP, which blocks {without_mlp} do not have (e.g. Flux's "
                "single-stream blocks); use gate='straight_through' or 'sigmoid_block'"
            )
        chunked = [i for i, b in enumerate(blocks) if getattr(b, "_chunk_size", None) is not None]
        if chunked:
            raise ValueError(
                f"gate='sigmoid_mlp' cannot gate chunked feed-forward (blocks {chunked}); "
                "disable feed-forward chunking or use another gate"
            )
    if not config.route_cross_attention:
        check_cross_attention_bypass(blocks)
    num_train_timesteps = config.num_train_timesteps or adapter.num_train_timesteps(model)
    if config.timestep_regions > num_train_timesteps and not adapter.continuous_timesteps:
        raise ValueError(
            f"timestep_regions={config.timestep_regions} is more than the model's {num_train_timesteps} training "
            f"timesteps: regions would be empty; use at most {num_train_timesteps} (the paper uses 4 to 10)"
        )
    return adapter, blocks, num_train_timesteps


def apply(model, config: DiffCRConfig | None = None):
    """Attach routers and learnable kept ratios to every block of `model`, in place.

    At the start every kept ratio is `config.init_kept_ratio` (1.0: dense), and with the default
    "straight_through" gate the model computes exactly its original function.

    Args:
        model: a supported diffusers transformer (see `diffcr.adapters.ADAPTERS`).
        config: the `DiffCRConfig` (default `DiffCRConfig()`).

    Returns:
        The same model, routed.

    Raises:
        TypeError: the model class is not supported (the message lists those that are).
        ValueError: DiffCR is already applied, or the config does not fit the model.

    Example:
        >>> import diffcr
        >>> from diffcr.models import build_base_model
        >>> model = diffcr.apply(build_base_model(num_layers=2), diffcr.DiffCRConfig(target_kept_ratio=0.5))
        >>> diffcr.is_applied(model)
        True
    """
    config = config or DiffCRConfig()
    if not isinstance(config, DiffCRConfig):
        raise TypeError(f"config must be a DiffCRConfig, got {type(config).__name__}")
    if is_applied(model):
        raise ValueError("DiffCR is already applied to this model; call diffcr.remove(model) first")
    adapter, blocks, num_train_timesteps = check_config_fits(model, config)
    controller = DiffCRController(config, len(blocks), adapter.hidden_size(model), num_train_timesteps)
    # fp32 on the device the model computes on (the controller keeps fp32 through later casts); on a model
    # that is already offloaded the controller stays there: it is a few kilobytes
    controller.to(device=execution_device(model))
    controller.train(model.training)

    # every change below is undone if any step fails, so a failed apply leaves the model as it was
    done: list = []
    try:
        model.add_module(ATTR, controller)
        done.append(("attr", None))
        model_cls = type(model)
        model.__class__ = routed_model_class(model_cls)
        done.append(("class", (model, model_cls)))
        register_config(model, config.replace(num_train_timesteps=num_train_timesteps).to_dict())
        for layer, block in enumerate(blocks):
            base_cls = type(block)
            block.__class__ = routed_class(base_cls)
            done.append(("class", (block, base_cls)))
            # offloading hooks attached before `apply` call the forward they saw: make them call the routed one
            retarget_hooked_forward(block, base_cls.forward, block.__class__.forward)
            object.__setattr__(block, "_diffcr_controller", controller)
            object.__setattr__(block, "_diffcr_layer", layer)
            if config.gate == "sigmoid_mlp":
                done.append(("hook", block.ff.register_forward_hook(mlp_gate_hook)))
        handle = model.register_forward_pre_hook(_timestep_pre_hook, with_kwargs=True)
        done.append(("hook", handle))
        object.__setattr__(model, "_diffcr_handles", [h for kind, h in done if kind == "hook"])
    except BaseException:
        _undo(model, done)
        raise
    dropping = [m for m in model.modules() if type(m).__name__ == "LabelEmbedding" and m.dropout_prob > 0]
    if dropping and model.training:
        logger.warning(
            "%s drops class labels inside each block in train mode (dropout_prob=%s): the two blended bin passes "
            "and each region group would see different labels. Set dropout_prob = 0 on its LabelEmbedding modules "
            "and drop labels once in the training loop (diffcr.train.disable_label_dropout does this).",
            type(model).__name__,
            dropping[0].dropout_prob,
        )
    logger.info(
        "DiffCR applied to %s: %d blocks, %d timestep regions, target kept ratio %.3f",
        type(model).__name__,
        len(blocks),
        config.timestep_regions,
        config.target_kept_ratio,
    )
    return model


def _undo(model, done: list) -> None:
    _strip(model, [item for kind, item in done if kind == "hook"])


def _strip(model, handles) -> None:
    """Remove every trace of DiffCR that `apply` may have left, whether it finished or failed half-way."""
    for handle in handles:
        handle.remove()
    for module in model.modules():
        for name in ("_diffcr_controller", "_diffcr_layer", "_diffcr_mlp_gate"):
            module.__dict__.pop(name, None)
        base_cls = getattr(type(module), "_diffcr_base_class", None)
        if base_cls is not None:
            if "forward" in type(module).__dict__:
                retarget_hooked_forward(module, type(module).forward, base_cls.forward)
            module.__class__ = base_cls
            module.__dict__.pop("_diffcr_compiled_forward", None)
            compile_arguments = module.__dict__.pop("_diffcr_compile_arguments", None)
            if compile_arguments is not None:  # the block was compiled while routed: it stays compiled
                module.compile(*compile_arguments[0], **compile_arguments[1])
    register_config(model, None)
    model._modules.pop(ATTR, None)
    model.__dict__.pop("_diffcr_handles", None)


def remove(model):
    """Detach DiffCR: the original blocks, no hooks, no `diffcr.*` parameters. Returns the model.

    Raises:
        ValueError: DiffCR is not applied.
    """
    _controller(model)
    _strip(model, model.__dict__.get("_diffcr_handles", []))
    return model


def get_config(model) -> DiffCRConfig:
    """The `DiffCRConfig` applied to `model`."""
    return _controller(model).config


def freeze(model):
    """Snap every kept ratio to its nearest bin and fix the schedule: one pass per block, in any mode.

    DiffCR parameters stop requiring gradients. Returns the model.
    """
    controller = _controller(model)
    controller.frozen_schedule = controller.snapped_schedule()
    controller.requires_grad_(False)
    return model


def is_frozen(model) -> bool:
    return _controller(model).frozen_schedule is not None


def ratio_loss(model, target: float | None = None) -> torch.Tensor:
    """(mean kept ratio used in the last forward - target)^2, the mean over blocks and samples.

    With `DiffCRConfig.region_targets` (and no `target` given): the mean over samples of (the mean over blocks of
    a sample's kept ratios - its timestep region's target)^2.

    In training mode the kept ratios are the continuous learnable ones (differentiable); in eval mode or
    after `freeze`, the bins actually run.

    Args:
        target: kept-ratio target; default the config's `target_kept_ratio`.
    """
    controller = _controller(model)
    used = controller.used_kept_ratio()  # (L, B)
    region_targets = controller.config.region_targets
    if target is None and region_targets is not None:
        # each sample's blocks are pulled to its own timestep region's target
        targets = torch.tensor(region_targets, dtype=used.dtype, device=used.device)  # (R,)
        regions = torch.tensor(controller._regions, device=used.device)  # (B,)
        return ratio_loss_value(used.mean(0), targets[regions]).mean()
    target = controller.config.target_kept_ratio if target is None else target
    return ratio_loss_value(used.mean(), target)


def mean_kept_ratio_used(model) -> float:
    """The mean kept ratio over blocks and samples in the last forward."""
    return float(_controller(model).used_kept_ratio().detach().mean())


def parameter_groups(model) -> dict[str, list[torch.nn.Parameter]]:
    """Split parameters into "router", "ratio" (give these their own lr and no weight decay) and "base".

    Example:
        >>> import diffcr
        >>> from diffcr.models import build_base_model
        >>> groups = diffcr.parameter_groups(diffcr.apply(build_base_model(num_layers=2)))
        >>> [len(groups[k]) for k in ("router", "ratio")]
        [2, 1]
    """
    controller = _controller(model)
    router = list(controller.routers.parameters())
    ratio = [controller.kept_ratio]
    own = {id(p) for p in router + ratio}
    base = [p for p in model.parameters() if id(p) not in own]
    return {"router": router, "ratio": ratio, "base": base}


@dataclass(frozen=True)
class Schedule:
    """Kept ratio per block (rows) and timestep region (columns).

    Attributes:
        kept_ratio: what runs at inference (snapped to bins).
        continuous: the learnable values (clamped to the bins' range).
        region_bounds: [start, end) timestep values of each region.
    """

    kept_ratio: list[list[float]]
    continuous: list[list[float]]
    region_bounds: list[tuple[float, float]]

    @property
    def region_labels(self) -> list[str]:
        """'t 0-249' for integer timesteps (both ends in the region), 't 0.25-0.5' for a continuous range."""
        integer = all(isinstance(lo, int) and isinstance(hi, int) for lo, hi in self.region_bounds)
        if integer:
            return [f"t {lo}-{hi - 1}" for lo, hi in self.region_bounds]
        return [f"t {lo:g}-{hi:g}" for lo, hi in self.region_bounds]

    @property
    def mean_kept_ratio(self) -> float:
        values = [v for row in self.kept_ratio for v in row]
        return sum(values) / len(values)

    def __str__(self) -> str:
        labels = self.region_labels
        header = "layer | " + " | ".join(labels)
        lines = [header, "-" * len(header)]
        for layer, row in enumerate(self.kept_ratio):
            lines.append(
                f"{layer:5d} | " + " | ".join(f"{v:>{max(4, len(label))}.2f}" for v, label in zip(row, labels))
            )
        lines.append(f"mean kept ratio {self.mean_kept_ratio:.3f} (compression {1 - self.mean_kept_ratio:.1%})")
        return "\n".join(lines)


def schedule(model) -> Schedule:
    """The kept-ratio schedule, as a table a person can read (`print(diffcr.schedule(model))`)."""
    controller = _controller(model)
    regions = controller.config.timestep_regions
    total = controller.num_train_timesteps
    if get_adapter(model).continuous_timesteps:  # e.g. Flux's sigma in [0, 1]
        bounds = [(r * total / regions, (r + 1) * total / regions) for r in range(regions)]
    else:
        bounds = [(-(-r * total // regions), -(-(r + 1) * total // regions)) for r in range(regions)]
    low = min(controller.config.ratio_bins)
    continuous = controller.kept_ratio.detach().clamp(low, 1.0)  # (L, R)
    continuous[:, sorted(controller.dense_regions)] = 1.0  # regions whose target is 1.0 run dense
    return Schedule(
        kept_ratio=controller.frozen_schedule or controller.snapped_schedule(),
        continuous=continuous.tolist(),
        region_bounds=bounds,
    )


def _artifact_description(model) -> dict:
    controller = _controller(model)
    return {
        "format": ARTIFACT_FORMAT,
        "config": controller.config.to_dict(),
        "model_class": type(model).__name__,
        "num_layers": controller.num_layers,
        "hidden_size": controller.hidden_size,
        "num_train_timesteps": controller.num_train_timesteps,
        "frozen": controller.frozen_schedule is not None,
        "schedule": schedule(model).kept_ratio,
        "model_shape": _model_shape(model),
    }


SHAPE_KEYS = ("in_channels", "out_channels", "patch_size", "sample_size")


def _model_shape(model) -> dict:
    """What besides depth and width tells models apart: a router trained on one does not fit another."""
    config = getattr(model, "config", {}) or {}
    return {key: config.get(key) for key in SHAPE_KEYS}


def save(model, path: str | os.PathLike) -> Path:
    """Write the DiffCR artifact: `diffcr_weights.safetensors` (routers and ratios only, the description in
    its metadata) and `diffcr_config.json` beside it. Files are written atomically.

    Returns:
        The artifact folder.
    """
    from diffcr.checkpoint import save_file_atomic, write_json_atomic

    controller = _controller(model)
    description = _artifact_description(model)
    folder = Path(path)
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ValueError(f"cannot save the DiffCR artifact in {folder}: {blocker} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach() for name, t in controller.state_dict().items()}
    # the values the model uses: a custom loop that does not clamp may leave ratios past the bins' range
    tensors["kept_ratio"] = tensors["kept_ratio"].clamp(min(controller.config.ratio_bins), 1.0)
    save_file_atomic(tensors, folder / WEIGHTS_NAME, metadata={"diffcr": json.dumps(description)})
    write_json_atomic(folder / CONFIG_NAME, description)
    return folder


_DESCRIPTION_TYPES = {
    "format": int,
    "config": dict,
    "model_class": str,
    "num_layers": int,
    "hidden_size": int,
    "num_train_timesteps": int,
    "frozen": bool,
}


def _check_description(description, source: str) -> dict:
    """Refuse a description that is not what `save` writes: a clear message naming the field."""
    if not isinstance(description, dict):
        raise ValueError(f"{source}: the DiffCR description must be a JSON object, got {type(description).__name__}")
    for key, kind in _DESCRIPTION_TYPES.items():
        value = description.get(key)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ValueError(
                f"{source}: field {key!r} must be {kind.__name__}, found {value!r}; the artifact is damaged or "
                "was not written by diffcr.save: save it again"
            )
    if description["format"] > ARTIFACT_FORMAT:
        raise ValueError(
            f"{source}: artifact format {description['format']} is newer than this diffcr reads ({ARTIFACT_FORMAT}); "
            "upgrade diffcr"
        )
    version = description["config"].get("_version", 0)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(
            f"{source}: artifact config version {version!r} is newer than this diffcr reads ({CONFIG_VERSION}); "
            "upgrade diffcr"
        )
    try:
        DiffCRConfig.from_dict(description["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: its DiffCR config is invalid: {err}") from err
    return description


def _parse_json(text: str, source: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{source} is not valid JSON ({err}); the artifact is damaged: save it again with diffcr.save"
        ) from err


def read_artifact(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read and check an artifact folder: (description, tensors).

    The description is the JSON in the weights' metadata; `diffcr_config.json` beside them, when present, must
    say the same (a hand-edited JSON that no longer matches the weights is refused, not ignored).

    Raises:
        FileNotFoundError: no artifact there.
        ValueError: the files are damaged, disagree, or come from a newer diffcr; the message says which.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    weights = folder / WEIGHTS_NAME if folder.is_dir() else folder
    if folder.is_dir() and not weights.is_file() and (folder / PRETRAINED_SUBFOLDER / WEIGHTS_NAME).is_file():
        weights = folder / PRETRAINED_SUBFOLDER / WEIGHTS_NAME  # a routed model's save_pretrained folder
    if not weights.is_file():
        raise FileNotFoundError(
            f"no DiffCR artifact at {folder}: {WEIGHTS_NAME} is missing (written by diffcr.save or "
            "model.save_pretrained of a routed model)"
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from err
    if "diffcr" not in metadata:
        raise ValueError(f"{weights} has no DiffCR description in its metadata; it was not written by diffcr.save")
    description = _check_description(_parse_json(metadata["diffcr"], f"the metadata of {weights}"), str(weights))
    beside = weights.with_name(CONFIG_NAME)
    if beside.is_file():
        described = _check_description(_parse_json(beside.read_text(), str(beside)), str(beside))
        differ = sorted(k for k in set(description) | set(described) if description.get(k) != described.get(k))
        if differ:
            raise ValueError(
                f"{beside} disagrees with the description inside {weights.name} in {differ}; the JSON was edited or "
                f"belongs to another artifact. Save the artifact again (diffcr.save), or delete {CONFIG_NAME} to "
                "use the weights' own description"
            )
    else:
        logger.warning("%s has no %s beside it; using the description inside the weights", weights, CONFIG_NAME)
    _check_tensors(tensors, description, str(weights))
    return description, tensors


def _check_tensors(tensors: dict[str, torch.Tensor], description: dict, source: str) -> None:
    """Finite routers and ratios, and ratios inside the bins' range (the trainer keeps them there)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: tensor {name!r} holds NaN or infinite values; the artifact is unusable")
    ratios = tensors.get("kept_ratio")
    if ratios is not None:
        low = min(description["config"].get("ratio_bins") or [0.0])
        if ratios.numel() and (ratios.min() < low - 1e-6 or ratios.max() > 1.0 + 1e-6):
            raise ValueError(
                f"{source}: kept ratios range over [{ratios.min().item():.4g}, {ratios.max().item():.4g}], outside "
                f"the bins' range [{low}, 1.0]; the artifact is damaged"
            )


def load(model, path: str | os.PathLike):
    """Apply DiffCR to a base `model` from an artifact written by `save`, in place. Returns the model.

    Raises:
        ValueError: the artifact is corrupt, of a newer version, or made for another model (the message lists
            every mismatch: class, depth, width), or a full run's model/ folder is missing.
    """
    description, tensors = read_artifact(path)
    adapter = get_adapter(model)
    expected = {
        "model_class": type(model).__name__,
        "num_layers": len(adapter.blocks(model)),
        "hidden_size": adapter.hidden_size(model),
    }
    if "model_shape" in description:  # artifacts written before it was recorded lack it
        expected["model_shape"] = _model_shape(model)
    mismatches = [
        f"{key}: artifact {description.get(key)!r}, model {value!r}"
        for key, value in expected.items()
        if description.get(key) != value
    ]
    if mismatches:
        raise ValueError(f"DiffCR artifact {path} does not fit this model: " + "; ".join(mismatches))
    # a lora / full run's change to the base weights, checked now: nothing in the model changes before apply
    fine_tuning = read_fine_tuning(path, model)
    config = DiffCRConfig.from_dict(description["config"]).replace(
        num_train_timesteps=description["num_train_timesteps"]
    )
    apply(model, config)
    try:
        controller = _controller(model)
        own = controller.state_dict()
        if set(own) != set(tensors) or any(own[k].shape != tensors[k].shape for k in own):
            raise ValueError(
                f"DiffCR artifact {path} tensors do not match: expected "
                f"{ {k: tuple(v.shape) for k, v in own.items()} }, found "
                f"{ {k: tuple(v.shape) for k, v in tensors.items()} }"
            )
        controller.load_state_dict(tensors)
        if description.get("frozen"):
            freeze(model)
        apply_fine_tuning(model, fine_tuning)  # changes no weight unless every new one is ready
    except BaseException:
        remove(model)
        raise
    return model


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs):
    """Load a routed model in one call from a folder (or hub repo) written by `model.save_pretrained` of a routed
    model: the base weights through the model class's own `from_pretrained`, then the DiffCR artifact beside
    them.

    Args:
        pretrained_model_name_or_path: a local folder or a hub repo id.
        subfolder: e.g. "transformer" inside a pipeline folder.
        **kwargs: passed to diffusers' `from_pretrained` (`torch_dtype`, `revision`, ...); `model_cls` picks the
            diffusers class (default: `_class_name` of its config.json).

    Returns:
        The routed model (frozen if it was saved frozen).

    Raises:
        FileNotFoundError: the folder has no DiffCR artifact (a dense checkpoint: load it with diffusers and call
            `diffcr.apply`).

    Example:
        >>> import diffcr, tempfile
        >>> from diffcr.models import build_base_model
        >>> folder = tempfile.mkdtemp()
        >>> diffcr.apply(build_base_model(num_layers=2)).save_pretrained(folder)
        >>> diffcr.is_applied(diffcr.from_pretrained(folder))
        True
    """
    model_cls = kwargs.pop("model_cls", None) or _model_class(pretrained_model_name_or_path, subfolder, kwargs)
    kwargs.setdefault("use_safetensors", True)  # never unpickle a checkpoint someone hands us
    artifact = _artifact_folder(pretrained_model_name_or_path, subfolder, kwargs)
    with quiet_artifact_marker():  # the marker in config.json warns plain loads, not this one
        model = model_cls.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
    return load(model, artifact)


def _model_class(path, subfolder: str | None, kwargs: dict) -> type:
    import diffusers

    config_file = _fetch(path, subfolder, "config.json", kwargs)
    name = _parse_json(config_file.read_text(), str(config_file)).get("_class_name")
    model_cls = getattr(diffusers, str(name), None)
    if model_cls is None:
        raise ValueError(f"{config_file} names no diffusers model class (_class_name={name!r})")
    return model_cls


def _artifact_folder(path, subfolder: str | None, kwargs: dict) -> Path:
    """The local folder holding the artifact files (downloaded into the hub cache for a repo id)."""
    inner = "/".join(part for part in (subfolder, PRETRAINED_SUBFOLDER) if part)
    beside = _fetch(path, subfolder, WEIGHTS_NAME, {}) if Path(path).is_dir() else None
    if beside is not None and beside.is_file():  # an artifact written beside the weights (diffcr before 0.2)
        return beside.parent
    weights = _fetch(path, inner, WEIGHTS_NAME, kwargs)
    if Path(path).is_dir() and not weights.is_file():
        raise FileNotFoundError(
            f"{weights.parent.parent} holds no DiffCR artifact ({PRETRAINED_SUBFOLDER}/{WEIGHTS_NAME}); for a dense "
            "checkpoint, load it with diffusers and call diffcr.apply(model, config) or diffcr.load(model, artifact)"
        )
    _fetch(path, inner, CONFIG_NAME, kwargs)
    return weights.parent


def _fetch(path, subfolder: str | None, filename: str, kwargs: dict) -> Path:
    """`filename` in a local folder, or downloaded from a hub repo into the cache."""
    if Path(path).is_dir():
        return Path(path) / (subfolder or "") / filename
    from huggingface_hub import hf_hub_download

    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    return Path(hf_hub_download(str(path), filename, subfolder=subfolder, **hub))
