"""The paper authors' PixArt-Sigma 512 recipe as a file `compress --recipe` reads, and `--grad-clip`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffcr import DiffCRConfig
from diffcr.cli import app
from diffcr.train.recipe import Recipe
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder

CONFIGS = Path(__file__).parents[1] / "configs"
AUTHORS = CONFIGS / "recipes" / "pixart_sigma_512_authors.json"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_the_authors_recipe_is_complete():
    recipe = Recipe.from_json(AUTHORS)
    assert recipe.train == {
        "mode": "lora",
        "lora_rank": 32,
        "lr": 2e-5,
        "router_lr": 2e-5,
        "ratio_lr": 2e-5,
        "weight_decay": 0.0,
        "grad_clip": 0.01,
        "warmup_steps": 200,
        "batch_size": 128,
        "steps": 60000,
        "label_drop_prob": 0.1,
        "mixed_precision": "no",
        "gradient_checkpointing": True,
        "checkpoint_every": 1000,  # diffcr's, not the authors': a checkpoint every 50 steps would stall 8 GPUs
    }
    config = recipe.diffcr
    assert (config.target_kept_ratio, config.timestep_regions, config.gate, config.ratio_loss_weight) == (
        0.8,
        4,
        "sigmoid_mlp",
        50.0,
    )
    assert config.ratio_bins == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    # one source of truth: the DiffCR preset of the same name says the same
    assert config == DiffCRConfig.from_json(CONFIGS / "pixart_sigma_512_authors.json")


R = "DiffCRRecipe"


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"_type": "DiffCRConfig", "target_kept_ratio": 0.8}, "not a training recipe.*alone goes to --config"),
        ({"_type": R, "diffcr": {}, "extra": 1}, r"unknown recipe keys \['extra'\]"),
        ({"_type": R, "train": {}}, "needs a 'diffcr' object"),
        ({"_type": R, "diffcr": {}, "train": {"grad_clipping": 1}}, r"unknown training keys \['grad_clipping'\]"),
        ({"_type": R, "diffcr": {}, "train": {"grad_clip": -1}}, "'train' settings are invalid: grad_clip=-1"),
        ({"_type": R, "diffcr": {"gate": "nope"}}, "'diffcr' settings are invalid"),
        ({"_type": R, "_version": 99, "diffcr": {}}, "newer than this diffcr reads"),
    ],
)
def test_bad_recipes_are_refused(tmp_path, payload, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        Recipe.from_json(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    pipe = build_tiny_pixart_pipeline(root / "pipe")
    data = write_caption_folder(root / "data", count=4)
    assert invoke("prepare", "--base", pipe, "--data", data, "--out", root / "cache").exit_code == 0
    return pipe, root / "cache"


def test_compress_with_the_recipe_and_flags_that_override_it(prepared, tmp_path):
    pipe, cache = prepared
    result = invoke("compress", "--base", pipe, "--data", cache, "--out", tmp_path / "run", "--recipe", AUTHORS,
                    "--steps", 1, "--batch-size", 4, "--lora-rank", 4, "--target", 0.6)  # fmt: skip
    assert result.exit_code == 0, result.output
    said = re.search(r"recipe \S+: [^\n]*", result.output).group()  # after the progress bars on its line
    assert "grad_clip=0.01" in said and "lora_rank" not in said  # what the recipe set, not what the flags did
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    train = run["train"]
    # from the recipe
    assert (train["mode"], train["lr"], train["grad_clip"], train["warmup_steps"]) == ("lora", 2e-5, 0.01, 200)
    assert train["gradient_checkpointing"] is True and train["mixed_precision"] == "no"
    assert (run["diffcr"]["gate"], run["diffcr"]["ratio_loss_weight"], run["diffcr"]["timestep_regions"]) == (
        "sigmoid_mlp",
        50.0,
        4,
    )
    # from the flags given, over the recipe
    assert (train["steps"], train["batch_size"], train["lora_rank"]) == (1, 4, 4)
    assert run["diffcr"]["target_kept_ratio"] == 0.6
    assert (tmp_path / "run" / "artifact" / "diffcr_lora.safetensors").is_file()


def test_grad_clip_and_warmup_flags(prepared, tmp_path):
    pipe, cache = prepared
    result = invoke("compress", "--base", pipe, "--data", cache, "--out", tmp_path / "run", "--mode", "routers",
                    "--steps", 1, "--batch-size", 4, "--grad-clip", 0.01, "--warmup-steps", 5)  # fmt: skip
    assert result.exit_code == 0, result.output
    train = json.loads((tmp_path / "run" / "run.json").read_text())["train"]
    assert (train["grad_clip"], train["warmup_steps"]) == (0.01, 5)
    result = invoke("compress", "--base", pipe, "--data", cache, "--out", tmp_path / "bad", "--grad-clip", -1)
    assert result.exit_code == 2 and "--grad-clip" in result.output
    result = invoke("compress", "--base", pipe, "--data", cache, "--out", tmp_path / "bad", "--recipe",
                    CONFIGS / "pixart_sigma_512_authors.json")  # fmt: skip
    assert result.exit_code == 2 and "DiffCRConfig alone goes to --config" in result.output
