"""pytest plugin: run diffusers' own model tests with every model they build routed by DiffCR.

diffusers' model tests (`tests/models/transformers/test_models_*.py` in a diffusers source checkout) build their
models through the test class's `model_class` property: `self.model_class(**init_dict)`,
`self.model_class.from_pretrained(folder)`. This plugin replaces that property on every collected test class
whose model class DiffCR supports with a stand-in class that builds the diffusers model and applies
`diffcr.apply` to it; `from_pretrained` / `from_config` are the routed class's own, so a test's save and reload
round trip goes through DiffCR's `save_pretrained` story. No diffusers test code is copied or changed.

`DIFFCR_MODE` picks what the tests see:
    off     the plain diffusers models (the baseline: failures here are not DiffCR's)
    dense   DiffCR applied at kept ratio 1.0, trainable (the model must compute its original function)
    routed  DiffCR applied with kept ratios below 1.0 (0.7, 0.5, 0.5, 0.3 per timestep region), seeded random
            routers, frozen: every block computes only the chosen tokens

Use it with `scripts/diffusers_model_tests.sh DIFFUSERS_SRC`, or by hand from the checkout:
    PYTHONPATH=/path/to/diffcr/benchmarks/diffusers_conformance \
        python -m pytest -p diffcr_routed_models tests/models/transformers/test_models_dit_transformer2d.py
"""

from __future__ import annotations

import os

# imported before the checkout's tests/conftest.py puts the checkout's `src` on sys.path: the tests run against
# the installed diffusers (the one diffcr is used with), not the checkout's copy
import diffusers
import torch

import diffcr
from diffcr.contracts import routed_model_class

MODES = ("off", "dense", "routed")
ROUTED_KEPT_RATIOS = (0.7, 0.5, 0.5, 0.3)  # one per timestep region, every layer alike
ROUTER_SEED = 1234

_STAND_INS: dict[type, type] = {}
_BUILT = {"models": 0}  # how many models the tests built through a stand-in: 0 would mean nothing was routed


def mode() -> str:
    value = os.environ.get("DIFFCR_MODE", "routed")
    if value not in MODES:
        raise ValueError(f"DIFFCR_MODE={value!r} is not one of {MODES}")
    return value


def route(model):
    """Apply DiffCR to a freshly built diffusers model as `DIFFCR_MODE` says."""
    if mode() == "dense":
        return diffcr.apply(model, diffcr.DiffCRConfig(target_kept_ratio=1.0))
    diffcr.apply(model, diffcr.DiffCRConfig(target_kept_ratio=0.5, timestep_regions=len(ROUTED_KEPT_RATIOS)))
    controller = model.diffcr
    # a local generator: the tests' own seeding of the global one stays as it was
    generator = torch.Generator().manual_seed(ROUTER_SEED)
    with torch.no_grad():
        controller.kept_ratio.copy_(torch.tensor(ROUTED_KEPT_RATIOS).expand_as(controller.kept_ratio))
        for router in controller.routers:
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
    return diffcr.freeze(model)


def stand_in(base: type) -> type:
    """A subclass of the routed class whose constructor returns `route(base(...))`.

    `stand_in(base)(**init_dict)` is a routed model (its class is diffcr's routed class, so the instance is not
    a stand-in and `__init__` does not run twice); `from_pretrained`, `from_config`, `_no_split_modules` and
    every other class attribute the tests read are the routed class's.
    """
    if base not in _STAND_INS:

        def __new__(cls, *args, **kwargs):
            _BUILT["models"] += 1
            return route(base(*args, **kwargs))

        _STAND_INS[base] = type(base.__name__, (routed_model_class(base),), {"__new__": __new__})
    return _STAND_INS[base]


def _supported(model_class) -> bool:
    from diffcr.adapters import ADAPTERS

    return isinstance(model_class, type) and model_class.__name__ in ADAPTERS


def pytest_report_header(config):
    return f"diffcr conformance: DIFFCR_MODE={mode()}, diffusers {diffusers.__version__} from {diffusers.__file__}"


def pytest_collection_modifyitems(session, config, items):
    if mode() == "off":
        return
    patched = set()
    for item in items:
        cls = getattr(item, "cls", None)
        if cls is None or cls in patched or not isinstance(getattr(cls, "model_class", None), property):
            continue
        base = cls.model_class.fget(object.__new__(cls))
        if _supported(base):
            cls.model_class = property(lambda self, base=base: stand_in(base))
            patched.add(cls)
    if not patched:
        raise RuntimeError("diffcr conformance: no collected test class builds a model DiffCR supports")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if mode() != "off":
        terminalreporter.write_line(f"diffcr conformance: {_BUILT['models']} models built with DiffCR ({mode()})")
