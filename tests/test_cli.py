"""The commands end to end on tiny settings, through `diffcr.cli` (typer's runner), asserting what they write."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from diffcr.cli import app

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pre"
    result = invoke(
        "pretrain",
        "--out",
        out,
        "--num-layers",
        "1",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "1",
        "--warmup-steps",
        "0",
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def compressed(pretrained):
    out = pretrained.parent / "comp"
    result = invoke(
        "compress",
        "--base",
        pretrained / "model",
        "--out",
        out,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--target",
        "0.5",
        "--ratio-lr",
        "0.2",
        "--freeze-schedule-at",
        "1",
    )
    assert result.exit_code == 0, result.output
    return out


def test_pretrain_writes_model_checkpoint_and_log(pretrained):
    assert (pretrained / "model" / "config.json").is_file()
    assert (pretrained / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert len((pretrained / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((pretrained / "latest").read_text())["step"] == 2
    assert json.loads((pretrained / "run.json").read_text())["train"]["mode"] == "pretrain"


def test_compress_writes_artifact_and_model(compressed):
    assert sorted(p.name for p in (compressed / "artifact").iterdir()) == [
        "diffcr_config.json",
        "diffcr_fine_tuning.json",  # the run's mode: diffcr.load copies in the run's fine-tuned weights
        "diffcr_weights.safetensors",
    ]
    names = {p.name for p in (compressed / "model").iterdir()}
    assert names == {"config.json", "diffusion_pytorch_model.safetensors", "diffcr"}  # as save_pretrained writes
    assert (compressed / "model" / "diffcr" / "diffcr_weights.safetensors").is_file()
    description = json.loads((compressed / "artifact" / "diffcr_config.json").read_text())
    assert description["frozen"] and description["config"]["target_kept_ratio"] == 0.5
    assert json.loads((compressed / "run.json").read_text())["train"]["freeze_schedule_at"] == 1
    rows = [json.loads(line) for line in (compressed / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "diffusion_loss", "ratio_loss", "mean_kept_ratio", "seconds"} <= set(rows[-1])


def test_sample_writes_png_and_npz(compressed, tmp_path):
    result = invoke(
        "sample",
        "--artifact",
        compressed / "model",
        "--classes",
        "0-1",
        "--num",
        "2",
        "--steps",
        "2",
        "--out",
        tmp_path / "grid.png",
        "--npz",
        tmp_path / "s.npz",
    )
    assert result.exit_code == 0, result.output
    data = np.load(tmp_path / "s.npz")
    assert data["arr_0"].shape == (4, 32, 32, 1) and data["labels"].tolist() == [0, 0, 1, 1]
    assert (tmp_path / "grid.png").stat().st_size > 0
    dense = invoke(
        "sample",
        "--base",
        compressed / "model",
        "--artifact",
        "none",
        "--classes",
        "0-1",
        "--num",
        "2",
        "--steps",
        "2",
        "--out",
        tmp_path / "dense.png",
        "--npz",
        tmp_path / "d.npz",
    )
    assert dense.exit_code == 0, dense.output
    assert not np.array_equal(np.load(tmp_path / "d.npz")["arr_0"], data["arr_0"])


def test_report_assesses_and_writes_html(compressed):
    result = invoke("report", compressed, "--num", "1")
    assert result.exit_code == 0, result.output
    report = compressed / "report"
    for name in ("report.html", "samples.png", "schedule.png", "router_maps.png", "training_curves.png"):
        assert (report / name).is_file(), name
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "measured speedup" in page
    assessment = json.loads((compressed / "assessment.json").read_text())
    assert assessment["num_images"] == 10 and 0 <= assessment["diffcr"]["accuracy"] <= 1


def test_demo_runs_end_to_end(pretrained, tmp_path):
    result = invoke(
        "demo", "--base", pretrained / "model", "--out", tmp_path / "demo", "--steps", "2", "--num-per-class", "1"
    )
    assert result.exit_code == 0, result.output
    assert "measured speedup" in result.output and "report:" in result.output
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert (tmp_path / "demo" / "artifact" / "diffcr_weights.safetensors").is_file()


def test_bad_inputs_give_clear_errors(pretrained, tmp_path):
    missing = invoke("compress", "--base", pretrained / "model", "--data", tmp_path / "nope", "--out", tmp_path / "x")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    assert not (tmp_path / "x").exists()
    bad_artifact = invoke("sample", "--base", pretrained / "model", "--artifact", tmp_path, "--out", tmp_path / "a.png")
    assert bad_artifact.exit_code == 2 and "diffcr_weights.safetensors is missing" in bad_artifact.output
    bad_classes = invoke("sample", "--base", pretrained / "model", "--artifact", "none", "--classes", "4-20")
    assert bad_classes.exit_code == 2 and "outside 0..9" in bad_classes.output
    bad_mode = invoke("compress", "--base", pretrained / "model", "--mode", "pretrain", "--out", tmp_path / "y")
    assert bad_mode.exit_code == 2 and "use --mode routers, lora or full" in bad_mode.output


def test_base_loads_from_a_path_object(pretrained, tmp_path):
    from diffcr.models import load_base_model
    from diffcr.train import TrainConfig, train
    from tests_helpers_data import tiny_digits

    model = load_base_model(pretrained / "model")  # a Path, as the CLI's default path is
    result = train(
        tmp_path / "r", model, tiny_digits(), TrainConfig(mode="routers", steps=1, batch_size=2), progress=False
    )
    assert json.loads((tmp_path / "r" / "run.json").read_text())["model_config"]["_name_or_path"]
    assert result.steps_done == 1
