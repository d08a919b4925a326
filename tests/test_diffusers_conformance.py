"""The pytest plugin that runs diffusers' own model tests on routed models
(`benchmarks/diffusers_conformance/diffcr_routed_models.py`, used by `scripts/diffusers_model_tests.sh`): what its
stand-in model class builds in each mode. The diffusers test files themselves are not in this repository."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import diffcr
from conftest import PixArtCase, run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "diffusers_conformance"))
import diffcr_routed_models as plugin  # noqa: E402

INIT = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8,
        "cross_attention_dim": 16, "sample_size": 8, "patch_size": 2, "caption_channels": 12}  # fmt: skip


def test_routed_mode_builds_frozen_models_below_kept_ratio_one(monkeypatch, tmp_path):
    from diffusers import PixArtTransformer2DModel

    monkeypatch.setenv("DIFFCR_MODE", "routed")
    stand_in = plugin.stand_in(PixArtTransformer2DModel)
    assert stand_in.__name__ == "PixArtTransformer2DModel" and stand_in._no_split_modules is not None
    model = stand_in(**INIT).eval()
    assert type(model) is not stand_in and isinstance(model, PixArtTransformer2DModel)
    assert diffcr.is_frozen(model) and diffcr.schedule(model).kept_ratio == [list(plugin.ROUTED_KEPT_RATIOS)] * 2
    again = stand_in(**INIT)
    for name, value in model.diffcr.state_dict().items():  # routers come from the plugin's own seeded generator
        torch.testing.assert_close(again.diffcr.state_dict()[name], value, atol=0, rtol=0)
    # the tests' save and reload round trip goes through the routed class's save_pretrained / from_pretrained
    inputs = PixArtCase.inputs([10, 300, 600, 900])
    model.save_pretrained(tmp_path)
    loaded = stand_in.from_pretrained(tmp_path).eval()
    assert diffcr.is_frozen(loaded)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, inputs), run(model, inputs), atol=1e-6, rtol=0)


def test_dense_mode_applies_diffcr_at_kept_ratio_one(monkeypatch):
    from diffusers import DiTTransformer2DModel

    monkeypatch.setenv("DIFFCR_MODE", "dense")
    init = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 2, "out_channels": 2}
    model = plugin.stand_in(DiTTransformer2DModel)(**init, sample_size=8, patch_size=2)
    assert diffcr.is_applied(model) and not diffcr.is_frozen(model)
    assert model.diffcr.kept_ratio.min().item() == 1.0


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("DIFFCR_MODE", "sparse")
    with pytest.raises(ValueError, match="DIFFCR_MODE='sparse' is not one of"):
        plugin.mode()
