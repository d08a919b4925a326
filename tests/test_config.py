import json
import subprocess
import sys

import pytest

from diffcr import DiffCRConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_kept_ratio": 0.0}, r"target_kept_ratio=0.0 is outside \(0, 1\]"),
        ({"target_kept_ratio": 1.2}, r"target_kept_ratio=1.2 is outside \(0, 1\]"),
        ({"ratio_bins": (1.0, 1.5, 0.5)}, r"outside \[0, 1\]: \[1.5\]"),
        ({"ratio_bins": (1.0, -0.1)}, r"outside \[0, 1\]"),
        ({"ratio_bins": (1.0, 0.5, 0.8)}, "must be sorted descending"),
        ({"ratio_bins": (1.0, 0.5, 0.5)}, "has duplicates"),
        ({"ratio_bins": (0.9, 0.5)}, "must start at 1.0"),
        ({"ratio_bins": (1.0,)}, "at least two bins"),
        ({"timestep_regions": 0}, r"timestep_regions=0 must be in \[1, 1000\]"),
        ({"timestep_regions": 10**6}, r"timestep_regions=1000000 must be in \[1, 1000\]"),
        ({"timestep_regions": True}, "must be an integer, got bool"),
        ({"ratio_bins": (1.0, 0.9, 0.8), "target_kept_ratio": 0.2}, "below the lowest bin 0.8"),
        ({"ratio_bins": "1.0,0.5"}, "must be a sequence"),
        ({"ratio_bins": (1.0, float("nan"))}, "must be finite"),
        ({"ratio_loss_weight": float("nan")}, "ratio_loss_weight=nan must be finite"),
        ({"ratio_loss_weight": 1e30}, r"ratio_loss_weight=1e\+30 must be in \[0, 10000\]"),
        ({"target_kept_ratio": "0.5"}, "target_kept_ratio='0.5' must be a number, got str"),
        ({"target_kept_ratio": float("inf")}, "must be finite"),
        ({"num_train_timesteps": 0}, "num_train_timesteps=0 must be >= 1"),
        ({"timestep_regions": 2.5}, "timestep_regions=2.5"),
        ({"gate": "magic"}, "gate='magic' is not one of"),
        ({"ratio_loss_weight": -1}, "ratio_loss_weight=-1"),
        ({"init_kept_ratio": 0.05}, r"init_kept_ratio=0.05 must lie in \[0.1, 1.0\]"),
        ({"region_coupling": "yes"}, "region_coupling='yes' must be true or false"),
        ({"region_offset_lr": 1.5}, r"region_offset_lr=1.5 must be in \[0, 1\]"),
    ],
)
def test_bad_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffCRConfig(**kwargs)


def test_config_json_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DiffCRConfig JSON file at"):
        DiffCRConfig.from_json(tmp_path / "missing.json")
    garbage = tmp_path / "garbage.json"
    garbage.write_text("target: 0.5")
    with pytest.raises(ValueError, match="garbage.json is not valid JSON"):
        DiffCRConfig.from_json(garbage)
    with pytest.raises(ValueError, match="must be an object"):
        DiffCRConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match="timestep_regions='4' must be an integer, got str"):
        DiffCRConfig.from_dict({"timestep_regions": "4"})


def test_json_round_trip_and_version():
    config = DiffCRConfig(target_kept_ratio=0.55, timestep_regions=4, ratio_bins=(1.0, 0.5, 0.0), gate="sigmoid_mlp")
    payload = json.loads(config.to_json())
    assert payload["_type"] == "DiffCRConfig" and payload["_version"] == 1
    assert DiffCRConfig.from_json(config.to_json()) == config
    assert DiffCRConfig.from_dict(payload) == config


def test_region_targets_round_trip_and_older_configs_have_none():
    config = DiffCRConfig(target_kept_ratio=0.475, timestep_regions=4, region_targets=[0.45, 1, 0.3, 0.15])
    assert config.region_targets == (0.45, 1.0, 0.3, 0.15)
    payload = json.loads(config.to_json())
    assert payload["region_targets"] == [0.45, 1.0, 0.3, 0.15]
    assert DiffCRConfig.from_json(config.to_json()) == config
    older = {k: v for k, v in DiffCRConfig().to_dict().items() if k != "region_targets"}
    assert DiffCRConfig.from_dict(older).region_targets is None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"region_targets": (0.5, 0.5), "timestep_regions": 4}, "has 2 values for timestep_regions=4"),
        ({"region_targets": (0.5,), "timestep_regions": 1}, "needs timestep_regions > 1"),
        ({"region_targets": (1.2, 0.4, 0.4, 0.0)}, r"outside the bins' range \[0.1, 1.0\]"),
        ({"region_targets": (0.9, 0.9, 0.9, 0.9)}, r"0.5 is not the mean .* set target_kept_ratio=0.9"),
        ({"region_targets": "0.5,0.5,0.5,0.5"}, "must be a sequence of kept ratios"),
        ({"region_targets": (0.5, None, 0.5, 0.5)}, "a value of region_targets=None must be a number"),
    ],
)
def test_bad_region_targets_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        DiffCRConfig(**{"target_kept_ratio": 0.5, "timestep_regions": 4, **changes})


def test_unknown_keys_and_newer_versions_are_refused(tmp_path):
    payload = DiffCRConfig().to_dict()
    with pytest.raises(ValueError, match=r"unknown DiffCRConfig keys \['kept'\]"):
        DiffCRConfig.from_dict({**payload, "kept": 0.5})
    with pytest.raises(ValueError, match="_version=7 is not supported"):
        DiffCRConfig.from_dict({**payload, "_version": 7})
    with pytest.raises(ValueError, match="expected a DiffCRConfig"):
        DiffCRConfig.from_dict({**payload, "_type": "Other"})
    path = tmp_path / "c.json"
    path.write_text(DiffCRConfig(target_kept_ratio=0.3).to_json())
    assert DiffCRConfig.from_json(path).target_kept_ratio == 0.3


def test_presets_load():
    from pathlib import Path

    presets = sorted((Path(__file__).parents[1] / "configs").glob("*.json"))
    assert presets
    for preset in presets:
        DiffCRConfig.from_json(preset)


def test_import_diffcr_does_not_import_diffusers():
    heavy = "('diffusers', 'accelerate', 'peft', 'transformers')"
    code = f"import sys, diffcr; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
