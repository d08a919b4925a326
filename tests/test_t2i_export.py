"""What a compression run exports, and the README's two-line load of it: `diffcr.load(pipe.transformer,
"run/artifact")` onto the pipeline's own transformer gives exactly the trained model in every mode (the LoRA of a
lora run merged in; the fine-tuned weights of a full run copied in from the run's model/ folder)."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import diffcr
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from diffcr.data.latent_cache import prepare_cache

    root = tmp_path_factory.mktemp("export")
    pipe = build_tiny_pixart_pipeline(root / "pipe")
    prepare_cache(pipe, write_caption_folder(root / "data", count=4), root / "cache", progress=False)
    return pipe, root / "cache"


def compressed(prepared, run_dir, mode: str):
    """Train a few steps in `mode` (a learning rate that moves the weights visibly) and export as compress does."""
    from diffcr.cli.compress import load_text_to_image
    from diffcr.train import TrainConfig, finish_compression, train

    pipe, cache = prepared
    model, conditioning, scheduler = load_text_to_image(str(pipe), str(cache))
    cfg = TrainConfig(mode=mode, steps=2, batch_size=4, lr=0.05, lora_rank=4, checkpoint_every=2, num_threads=1)
    torch.manual_seed(0)
    config = diffcr.DiffCRConfig(target_kept_ratio=0.5, ratio_bins=(1.0, 0.75, 0.5, 0.25))
    result = train(run_dir, model, conditioning, cfg, diffcr_config=config, scheduler=scheduler, progress=False)
    written = finish_compression(result.model, run_dir, mode)
    with torch.no_grad():  # the routers learned little in 2 steps: make every layer route, so routing is tested
        result.model.diffcr.kept_ratio.fill_(0.5)
    diffcr.freeze(result.model)
    diffcr.save(result.model, written["artifact"])
    if "model" in written:
        diffcr.save(result.model, written["model"] / "diffcr")
    # diffcr's loaders give sampling a CPU kernel for short captions (`diffcr.caption_attention`), which rounds
    # differently; the README's two plain diffusers lines load diffusers' default, so compare under that one
    result.model.set_attn_processor(AttnProcessor2_0())
    return result.model.eval(), written


def transformer_inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return {
        "hidden_states": torch.randn(3, 4, 8, 8, generator=gen),
        "timestep": torch.tensor([10, 500, 990]),
        "encoder_hidden_states": torch.randn(3, 7, 16, generator=gen),
        "encoder_attention_mask": mask,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_line_load_gives_exactly_the_trained_model(prepared, tmp_path, mode):
    from diffusers import PixArtSigmaPipeline

    trained, written = compressed(prepared, tmp_path / "run", mode)
    assert not [name for name in trained.state_dict() if "lora" in name]  # a lora run's LoRA is merged
    pipe = PixArtSigmaPipeline.from_pretrained(prepared[0])  # the README's two lines
    diffcr.load(pipe.transformer, tmp_path / "run" / "artifact")
    loaded = pipe.transformer.eval()
    original = PixArtSigmaPipeline.from_pretrained(prepared[0]).transformer
    changed = [k for k, v in original.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed  # the run fine-tuned the base: routers alone on it would be another model
    inputs = transformer_inputs()
    with torch.no_grad():
        expected = trained(**inputs).sample
        assert torch.equal(loaded(**inputs).sample, expected)
        # the fine-tuned transformer folder is the same model again
        folder = diffcr.from_pretrained(written["model"]).eval()
        assert torch.equal(folder(**inputs).sample, expected)
    ours = {k: v for k, v in loaded.state_dict().items()}
    assert all(torch.equal(ours[k], v) for k, v in trained.state_dict().items())


def test_lora_artifact_stores_the_lora_and_the_mode(prepared, tmp_path):
    import json

    from safetensors.torch import load_file

    _, written = compressed(prepared, tmp_path / "run", "lora")
    record = json.loads((written["artifact"] / "diffcr_fine_tuning.json").read_text())
    assert record["mode"] == "lora" and record["lora"]["rank"] == 4 and record["lora"]["scaling"] == 1.0
    lora = load_file(str(written["artifact"] / record["lora"]["weights"]))
    names = {key.rsplit(".lora_", 1)[0] for key in lora}
    assert "transformer_blocks.0.attn2.to_k" in names and "transformer_blocks.1.ff.net.2" in names
    assert lora["transformer_blocks.0.attn1.to_q.lora_A.weight"].shape == (4, 16)  # rank x in: a few kB, not a model


def test_full_run_artifact_without_its_model_folder_is_refused(prepared, tmp_path):
    from diffusers import PixArtSigmaPipeline

    _, written = compressed(prepared, tmp_path / "run", "full")
    moved = tmp_path / "elsewhere"
    shutil.copytree(written["artifact"], moved)  # the artifact alone, without the run's model/ beside it
    pipe = PixArtSigmaPipeline.from_pretrained(prepared[0])
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError, match=r"--mode full run.*model/ folder.*missing: load that folder instead"):
        diffcr.load(pipe.transformer, moved)
    assert not diffcr.is_applied(pipe.transformer)  # refused before anything changed
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())
    # deleting the record is the documented way to route the original weights anyway
    (moved / "diffcr_fine_tuning.json").unlink()
    diffcr.load(pipe.transformer, moved)
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())


def test_routers_run_records_its_mode_and_leaves_the_base(prepared, tmp_path):
    import json

    from diffusers import PixArtSigmaPipeline

    trained, written = compressed(prepared, tmp_path / "run", "routers")
    assert "model" not in written
    assert json.loads((written["artifact"] / "diffcr_fine_tuning.json").read_text())["mode"] == "routers"
    pipe = PixArtSigmaPipeline.from_pretrained(prepared[0])
    diffcr.load(pipe.transformer, written["artifact"])
    inputs = transformer_inputs()
    with torch.no_grad():
        assert torch.equal(pipe.transformer.eval()(**inputs).sample, trained(**inputs).sample)


def test_lora_that_does_not_fit_is_refused(prepared, tmp_path):
    from diffusers import PixArtTransformer2DModel

    from diffcr.fine_tuning import read_fine_tuning

    _, written = compressed(prepared, tmp_path / "run", "lora")
    other = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=8, sample_size=8, patch_size=2, caption_channels=16, norm_num_groups=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="does not fit this model.*load the artifact onto the transformer"):
        read_fine_tuning(written["artifact"], other)


def test_the_example_gives_the_trained_model_for_the_default_mode(prepared, tmp_path, monkeypatch):
    """`diffcr compress` defaults to --mode full: the example's two lines must give that run's transformer."""
    import runpy
    from pathlib import Path

    import numpy as np
    from diffusers import PixArtSigmaPipeline
    from PIL import Image

    _, written = compressed(prepared, tmp_path / "run", "full")
    monkeypatch.chdir(tmp_path)
    example = Path(__file__).parents[1] / "examples" / "pixart_text_to_image.py"
    runpy.run_path(str(example))["main"](str(prepared[0]), str(written["artifact"]), "a cat on the left", steps=2)
    pipe = PixArtSigmaPipeline.from_pretrained(prepared[0])
    pipe.transformer = diffcr.from_pretrained(written["model"])  # the run's fine-tuned transformer
    image = pipe("a cat on the left", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 use_resolution_binning=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "diffcr.png")), np.asarray(image))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_a_load_that_fails_on_the_way_leaves_the_model_as_it_was(prepared, tmp_path, monkeypatch, mode):
    from diffusers import PixArtSigmaPipeline

    import diffcr.fine_tuning

    compressed(prepared, tmp_path / "run", mode)
    transformer = PixArtSigmaPipeline.from_pretrained(prepared[0]).transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}

    def out_of_memory(*args, **kwargs):
        raise MemoryError("simulated")

    # the last step of a load: merging the LoRA, or reading the fine-tuned weights
    target = "merged_lora_weights" if mode == "lora" else "_copy_in"
    monkeypatch.setattr(diffcr.fine_tuning, target, out_of_memory)
    with pytest.raises(MemoryError):
        diffcr.load(transformer, tmp_path / "run" / "artifact")
    assert not diffcr.is_applied(transformer)
    after = transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_sharded_model_folder_loads_and_a_damaged_index_is_a_clear_error(prepared, tmp_path):
    import json
    import re

    from diffusers import PixArtTransformer2DModel

    from diffcr.fine_tuning import BASE_WEIGHTS, BASE_WEIGHTS_INDEX, read_fine_tuning

    trained, written = compressed(prepared, tmp_path / "run", "full")
    model_dir = written["model"]
    shard = "diffusion_pytorch_model-00001-of-00001.safetensors"
    keys = list(PixArtTransformer2DModel.from_pretrained(prepared[0], subfolder="transformer").state_dict())
    (model_dir / BASE_WEIGHTS).rename(model_dir / shard)
    index = model_dir / BASE_WEIGHTS_INDEX

    def transformer():
        return PixArtTransformer2DModel.from_pretrained(prepared[0], subfolder="transformer")

    damaged = {
        "{not json": "is not valid JSON",
        json.dumps({"metadata": {}}): "has no 'weight_map'",
        json.dumps(["a list"]): "has no 'weight_map'",
        json.dumps({"weight_map": {}}): "lists no shard file names",
        json.dumps({"weight_map": {keys[0]: "gone.safetensors"}}): r"missing: \['gone\.safetensors'\]",
    }
    for text, message in damaged.items():
        index.write_text(text)
        with pytest.raises(ValueError, match=f"shard index {re.escape(str(index))}.*{message}"):
            read_fine_tuning(written["artifact"], transformer())
    # an intact index (as save_pretrained writes for a large model) gives the trained weights
    index.write_text(json.dumps({"metadata": {}, "weight_map": {key: shard for key in keys}}))
    loaded = diffcr.load(transformer(), written["artifact"])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())


@pytest.mark.parametrize("scaling", [float("nan"), float("inf"), "1.0", None])
def test_a_lora_scaling_that_is_not_a_finite_number_is_refused(prepared, tmp_path, scaling):
    import json

    from diffusers import PixArtTransformer2DModel

    from diffcr.fine_tuning import FINE_TUNING_NAME, read_fine_tuning

    _, written = compressed(prepared, tmp_path / "run", "lora")
    record = written["artifact"] / FINE_TUNING_NAME
    payload = json.loads(record.read_text())
    payload["lora"]["scaling"] = scaling
    record.write_text(json.dumps(payload))
    transformer = PixArtTransformer2DModel.from_pretrained(prepared[0], subfolder="transformer")
    with pytest.raises(ValueError, match=rf"{FINE_TUNING_NAME}: the LoRA scaling .* is not a finite number"):
        read_fine_tuning(written["artifact"], transformer)
