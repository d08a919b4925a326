"""What a routed model keeps of diffusers' contracts: `save_pretrained` / `from_pretrained` and `from_config`
(so `EMAModel` round trips), gradient checkpointing, device maps, layerwise casting, offloading and pickling.

`apply` swaps the model's class for a subclass made here, as it does for each block. The subclass keeps the
base class's name and module, because diffusers writes them into `config.json` (`_class_name`) and pipelines
into `model_index.json`: a routed model saved on its own or inside a pipeline stays a loadable diffusers
folder. What it changes:

- `save_pretrained` writes the clean base checkpoint (no `diffcr.*` keys) and the DiffCR artifact files
  (`diffcr/diffcr_weights.safetensors`, `diffcr/diffcr_config.json`) into the same folder; `config.json`
  records the DiffCR config under `_diffcr` (diffusers ignores keys that start with "_") and a marker,
  `diffcr_artifact`, that diffusers does not ignore: a plain `from_pretrained` of the folder gives the dense
  base *and* logs diffusers' warning "The config attributes {'diffcr_artifact': ...} were passed to ..., but
  are not expected and will be ignored", whose value says how to load the routed model. `diffcr.from_pretrained`
  or `diffcr.load` give the routed model; diffcr's own loaders do not repeat the warning.
- `from_config` / `from_pretrained` on the routed class return routed models, so that
  `EMAModel(model.parameters(), model_cls=type(model), model_config=model.config)` saves and loads routers and
  ratios with the base weights.
- gradient checkpointing recomputes each block with the timestep regions of the forward it belongs to.
- `_no_split_modules` and `_repeated_blocks` also name the routed block classes; layerwise casting skips
  `diffcr`.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import os
import re

from diffcr.adapters.base import ROUTABLE_BLOCKS, reduce_routed

ATTR = "diffcr"
CONFIG_KEY = "_diffcr"
# a config key without the leading "_": diffusers warns about it on a plain load, so that the routed model
# saved in a folder is never silently loaded dense; the value is what the warning shows the user
MARKER_KEY = "diffcr_artifact"
MARKER_VALUE = (
    "diffcr/ holds the DiffCR routers and kept ratios of this model; this plain load gives the dense base, "
    "load the routed model with diffcr.from_pretrained(folder)"
)
_MARKER_ENTRY = re.compile(rf"""(, )?{MARKER_KEY!r}: ('[^']*'|"[^"]*")(, )?""")
_QUIET_MARKER: contextvars.ContextVar[bool] = contextvars.ContextVar("diffcr_quiet_marker", default=False)

_ROUTED_MODEL_CLASSES: dict[type, type] = {}


def _with_routed_names(names, routed_too: bool):
    """`names` (class-name patterns) plus the routed block class names, or None if the base has none."""
    if names is None:
        return None
    extra = [routed_class_name(n) for n in names if n in ROUTABLE_BLOCKS] if routed_too else [ATTR]
    return [*names, *(n for n in extra if n not in names)]


def routed_class_name(block_name: str) -> str:
    return f"DiffCR{block_name}"


def _save_pretrained(self, save_directory, *args, **kwargs):
    """Write the clean base checkpoint and the DiffCR artifact into `save_directory`; `config.json` also gets the
    `diffcr_artifact` marker, so that a plain diffusers load of the folder warns that it gives the dense base."""
    from diffcr import api

    base_cls = type(self)._diffcr_base_class
    if kwargs.get("is_main_process", True):
        # the artifact first: a `push_to_hub=True` save uploads the folder at the end of the base save
        api.save(self, os.path.join(save_directory, api.PRETRAINED_SUBFOLDER))
    controller = self._modules[ATTR]
    names = list(self._modules)
    internal = self._internal_dict
    del self._modules[ATTR]  # the base checkpoint holds the base weights only
    self._internal_dict = type(internal)({**internal, MARKER_KEY: MARKER_VALUE})  # config.json only
    try:
        return base_cls.save_pretrained(self, save_directory, *args, **kwargs)
    finally:
        self._internal_dict = internal
        self._modules[ATTR] = controller
        # keep the original module order (and so the order of `parameters()`, which optimizers and EMA rely on)
        for name in names:
            self._modules[name] = self._modules.pop(name)


def _from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
    """The routed model saved in `pretrained_model_name_or_path` (see `diffcr.from_pretrained`)."""
    from diffcr import api

    with quiet_artifact_marker():
        return api.from_pretrained(pretrained_model_name_or_path, model_cls=cls._diffcr_base_class, **kwargs)


def _from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
    """The base class's `from_config`, then DiffCR applied with the config recorded under `_diffcr`."""
    from diffcr import api
    from diffcr.config import DiffCRConfig

    base_cls = cls._diffcr_base_class
    if isinstance(config, (str, os.PathLike)):  # a folder, as `EMAModel.from_pretrained` passes
        config = base_cls.load_config(config)
    config = {k: v for k, v in dict(config or {}).items() if k != MARKER_KEY}  # the routed model is what it marks
    result = base_cls.from_config(config, return_unused_kwargs, **kwargs)
    model = result[0] if return_unused_kwargs else result
    payload = config.get(CONFIG_KEY)
    if payload is None:
        raise ValueError(
            f"this config has no {CONFIG_KEY!r} entry, so it does not say how to route; build the dense model "
            f"with {cls._diffcr_base_class.__name__}.from_config and call diffcr.apply(model, config)"
        )
    api.apply(model, DiffCRConfig.from_dict(payload))
    return result


class _MarkerFilter(logging.Filter):
    """Inside `quiet_artifact_marker`, drop the marker from diffusers' "config attributes ... are not expected"
    warning (and the warning itself when the marker was the only such key); elsewhere, change nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not _QUIET_MARKER.get():
            return True
        text = record.getMessage()
        if not _MARKER_ENTRY.search(text):
            return True
        text = _MARKER_ENTRY.sub(lambda m: ", " if m.group(1) and m.group(3) else "", text)
        if "attributes {} were" in text:  # the marker was the only unexpected key
            return False
        record.msg, record.args = text, ()
        return True


_MARKER_FILTER = _MarkerFilter()


@contextlib.contextmanager
def quiet_artifact_marker():
    """Load base weights of a folder that a routed model saved, without diffusers' warning about the marker.

    diffcr's own loaders use it: they go on to apply the artifact, so the warning meant for plain loads would
    be wrong there. Other unexpected config keys are still reported.

    Example:
        >>> with quiet_artifact_marker():
        ...     pass  # e.g. model_cls.from_pretrained(folder)
    """
    # diffusers' warning comes from this logger; adding a filter by name does not import diffusers
    logger = logging.getLogger("diffusers.configuration_utils")
    if _MARKER_FILTER not in logger.filters:
        logger.addFilter(_MARKER_FILTER)
    token = _QUIET_MARKER.set(True)
    try:
        yield
    finally:
        _QUIET_MARKER.reset(token)


def _get_checkpointing_func(self):
    inner = self.__dict__.get("_gradient_checkpointing_func")
    controller = self._modules.get(ATTR)
    if inner is None or controller is None:
        return inner
    return _ReplayingCheckpoint(inner, controller)


def _set_checkpointing_func(self, value) -> None:
    self.__dict__["_gradient_checkpointing_func"] = value


class _ReplayingCheckpoint:
    """diffusers' gradient-checkpointing function, with each block recomputed under the timestep regions of
    the forward that first ran it (not those of the model's latest forward)."""

    def __init__(self, inner, controller):
        self.inner = inner
        self.controller = controller

    def __call__(self, block, *args, **kwargs):
        controller = self.controller
        regions = controller._regions
        calls = 0

        def run(*run_args, **run_kwargs):
            nonlocal calls
            calls += 1
            replay = controller.replaying(regions) if calls > 1 else contextlib.nullcontext()
            with replay:
                return block(*run_args, **run_kwargs)

        return self.inner(run, *args, **kwargs)


def routed_model_class(model_cls: type) -> type:
    """The routed subclass of a diffusers model class (cached: one per class)."""
    if model_cls not in _ROUTED_MODEL_CLASSES:
        namespace = {
            "__module__": model_cls.__module__,
            "__qualname__": model_cls.__qualname__,
            "__doc__": model_cls.__doc__,
            "_diffcr_base_class": model_cls,
            "_diffcr_factory": staticmethod(routed_model_class),
            "__reduce_ex__": reduce_routed,
            "save_pretrained": _save_pretrained,
            "from_pretrained": classmethod(_from_pretrained),
            "from_config": classmethod(_from_config),
            "_gradient_checkpointing_func": property(_get_checkpointing_func, _set_checkpointing_func),
            # each forward argument's position after self, for the timestep pre-hook
            "_diffcr_forward_positions": {
                name: index for index, name in enumerate(list(inspect.signature(model_cls.forward).parameters)[1:])
            },
        }
        for name in ("_no_split_modules", "_repeated_blocks"):
            if hasattr(model_cls, name):
                namespace[name] = _with_routed_names(getattr(model_cls, name), routed_too=True)
        if not namespace.get("_repeated_blocks"):
            # routed blocks compile regionally by design (`adapters.base.compile_routed`), so diffusers'
            # `compile_repeated_blocks` works on routed models whose base class names no repeated blocks
            namespace["_repeated_blocks"] = [routed_class_name(name) for name in ROUTABLE_BLOCKS]
        # layerwise casting (fp8 storage) must not touch the routers: their scores pick the kept tokens
        patterns = list(getattr(model_cls, "_skip_layerwise_casting_patterns", None) or [])
        namespace["_skip_layerwise_casting_patterns"] = _with_routed_names(patterns, routed_too=False)
        _ROUTED_MODEL_CLASSES[model_cls] = type(model_cls.__name__, (model_cls,), namespace)
    return _ROUTED_MODEL_CLASSES[model_cls]


def register_config(model, payload: dict | None) -> None:
    """Record the DiffCR config in the model's diffusers config (`model.config["_diffcr"]`), or drop it."""
    internal = getattr(model, "_internal_dict", None)
    if internal is None:
        return
    # a dense model loaded plainly from a routed model's folder carries the marker from its config.json: drop it
    values = {k: v for k, v in internal.items() if k not in (CONFIG_KEY, MARKER_KEY)}
    if payload is not None:
        values[CONFIG_KEY] = payload
    model._internal_dict = type(internal)(values)


def execution_device(model):
    """Where the model computes: an offloading hook's execution device if it has one (accelerate's
    `cpu_offload` / `cpu_offload_with_hook`, diffusers' group offloading), else its parameters' device."""
    import torch

    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or [hook]:
            device = getattr(one, "execution_device", None)
            if device is not None:
                return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
        registry = getattr(module, "_diffusers_hook", None)
        for one in getattr(registry, "hooks", {}).values():
            group = getattr(one, "group", None)
            if getattr(group, "onload_device", None) is not None:
                return torch.device(group.onload_device)
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def retarget_hooked_forward(module, old_func, new_func) -> None:
    """Point the forward that hooks saved at `new_func` (bound to `module`) where it was `old_func`.

    accelerate's `add_hook_to_module` (sequential and model CPU offload) and diffusers' `HookRegistry` (group
    offloading, caches) wrap a module's forward *as it was when they were attached*, as an instance attribute.
    A class swap after that would be bypassed silently (the model would run dense), and a swap back would
    leave the routed forward in place. So `apply` and `remove` retarget what those hooks call.

    Raises:
        ValueError: the forward is wrapped by something else, which diffcr cannot see through.
    """
    import types

    if "forward" not in module.__dict__:
        return

    def is_old(function) -> bool:
        return getattr(function, "__self__", None) is module and getattr(function, "__func__", None) is old_func

    new_bound = types.MethodType(new_func, module)
    found = False
    if is_old(module.__dict__["forward"]):
        module.__dict__["forward"] = new_bound
        found = True
    if is_old(module.__dict__.get("_old_forward")):
        module.__dict__["_old_forward"] = new_bound
        found = True
    registry = module.__dict__.get("_diffusers_hook")
    for ref in getattr(registry, "_fn_refs", None) or []:
        for name in ("forward", "original_forward"):
            if is_old(getattr(ref, name, None)):
                setattr(ref, name, new_bound)
                found = True
    if not found:
        raise ValueError(
            f"the forward of this {type(module).__name__} is wrapped by a hook diffcr does not know "
            f"({module.__dict__['forward']!r}); apply DiffCR before adding such hooks, or remove them first"
        )
