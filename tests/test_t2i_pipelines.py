"""Pipelines as users have them: a transformer that lives apart from its pipeline (PixArt-Sigma 512 px, whose repo
holds only `transformer/`: `--transformer`), and PixArt-XL-2-1024-MS, whose config has no
`use_additional_conditions` key (diffusers turns micro-conditions on because sample_size is 128)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffcr
from diffcr.cli import app
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder

runner = CliRunner()
PROMPT = "a cat on the left"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A pipeline folder, and a transformer of the same architecture with other weights saved on its own (config
    at the top, as `save_pretrained` writes it) and inside a `transformer/` subfolder (as PixArt's 512 px repo)."""
    from diffusers import PixArtTransformer2DModel

    root = tmp_path_factory.mktemp("parts")
    pipe = build_tiny_pixart_pipeline(root / "pipe", seed=0)
    donor = build_tiny_pixart_pipeline(root / "donor", seed=1)
    PixArtTransformer2DModel.from_pretrained(donor, subfolder="transformer").save_pretrained(root / "alone")
    return root, pipe, donor


def test_transformer_from_elsewhere_through_prepare_compress_sample(parts, tmp_path):
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    root, pipe, donor = parts
    data = write_caption_folder(tmp_path / "data", count=4)
    result = invoke("prepare", "--base", pipe, "--transformer", donor, "--data", data, "--out", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["pipeline"]["source"] == f"{pipe} + transformer {donor}"
    result = invoke("compress", "--base", pipe, "--transformer", donor, "--data", tmp_path / "cache", "--out",
                    tmp_path / "run", "--mode", "routers", "--steps", 2, "--batch-size", 4, "--target", 0.5,
                    "--ratio-lr", 0.3)  # fmt: skip
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["transformer"] == str(donor) and run["transformer_subfolder"] == "transformer"
    # the run trained the donor's transformer: its routers load onto it, in the pipeline diffusers builds the same way
    swapped = PixArtSigmaPipeline.from_pretrained(
        pipe, transformer=PixArtTransformer2DModel.from_pretrained(donor, subfolder="transformer")
    )
    diffcr.load(swapped.transformer, tmp_path / "run" / "artifact")
    for artifact, model in ((tmp_path / "run" / "artifact", swapped), ("none", None)):
        npz = tmp_path / "s.npz"
        result = invoke("sample", "--base", pipe, "--transformer", root / "alone", "--artifact", artifact,
                        "--prompt", PROMPT, "--steps", 2, "--num", 1, "--seed", 5, "--out", tmp_path / "s.png",
                        "--npz", npz)  # fmt: skip
        assert result.exit_code == 0, result.output
        if model is None:  # dense: the donor's transformer, not the pipeline's own
            model = PixArtSigmaPipeline.from_pretrained(
                pipe, transformer=PixArtTransformer2DModel.from_pretrained(root / "alone")
            )
        image = model(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np",
                      use_resolution_binning=False).images[0]  # fmt: skip
        np.testing.assert_array_equal(np.load(npz)["arr_0"][0], (image * 255).round().astype(np.uint8))
    own = PixArtSigmaPipeline.from_pretrained(pipe)
    image = own(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(5), output_type="np",
                use_resolution_binning=False).images[0]  # fmt: skip
    assert not np.array_equal(np.load(npz)["arr_0"][0], (image * 255).round().astype(np.uint8))
    artifact = tmp_path / "run" / "artifact"
    result = invoke("evaluate", "--base", pipe, "--transformer", donor, "--artifact", artifact, "--prompt", PROMPT,
                    "--steps", 2, "--num", 1, "--batch-size", 1, "--out", tmp_path / "eval")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval" / "t2i_assessment.json").read_text())["transformer"] == str(donor)
    result = invoke("report", tmp_path / "run", "--steps", 2)  # reloads the pipeline with the run's transformer
    assert result.exit_code == 0, result.output
    assert f"+ transformer {donor}" in (tmp_path / "run" / "report" / "report.html").read_text()


def test_bad_transformer_sources_are_refused(parts, tmp_path):
    from diffusers import PixArtTransformer2DModel

    root, pipe, _ = parts
    data = write_caption_folder(tmp_path / "data", count=1)

    def prepare(*extra):
        return invoke("prepare", "--base", pipe, "--data", data, "--out", tmp_path / "c", *extra)

    result = prepare("--transformer", tmp_path / "nowhere")
    assert result.exit_code == 2 and "cannot load a PixArtTransformer2DModel from --transformer" in result.output
    result = prepare("--transformer", pipe, "--transformer-subfolder", "vae")
    assert result.exit_code == 2 and "describes a AutoencoderKL, but a PixArtSigmaPipeline takes" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = prepare("--transformer", empty)
    assert result.exit_code == 2 and "holds no transformer" in result.output
    PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=8, norm_num_groups=2,
    ).save_pretrained(tmp_path / "narrow")  # fmt: skip
    result = prepare("--transformer", tmp_path / "narrow")
    assert result.exit_code == 2 and "takes 8-dim text embeddings, the text encoder makes 16" in result.output
    assert not (tmp_path / "c").exists()
    result = invoke("compress", "--transformer", root / "alone", "--out", tmp_path / "r", "--steps", 1)
    assert result.exit_code == 2 and "class-conditional --base is one model already" in result.output
    result = invoke("sample", "--transformer", root / "alone", "--artifact", "none", "--out", tmp_path / "s.png")
    assert result.exit_code == 2 and "pass --prompt or --prompts" in result.output


def test_micro_conditions_follow_the_model_not_the_config_key(tmp_path):
    """PixArt-XL-2-1024-MS's config has no `use_additional_conditions`; diffusers gives the model resolution and
    aspect-ratio embedders because sample_size is 128. Training must feed them (it read the absent key as False
    and crashed). The tiny model takes 8x8 latents whatever its sample_size (positions are recomputed)."""
    from diffusers import PixArtTransformer2DModel

    pipe = build_tiny_pixart_pipeline(tmp_path / "alpha1024", image_size=256, micro_conditions=None)
    config = json.loads((pipe / "transformer" / "config.json").read_text())
    assert "use_additional_conditions" not in config and config["sample_size"] == 128
    data = write_caption_folder(tmp_path / "data", count=4)
    result = invoke("prepare", "--base", pipe, "--data", data, "--out", tmp_path / "cache", "--resolution", 16)
    assert result.exit_code == 0, result.output
    seen = []
    real_forward = PixArtTransformer2DModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("added_cond_kwargs"))
        return real_forward(self, *args, **kwargs)

    PixArtTransformer2DModel.forward = spy
    try:
        result = invoke("compress", "--base", pipe, "--data", tmp_path / "cache", "--out", tmp_path / "run",
                        "--mode", "routers", "--steps", 1, "--batch-size", 4)  # fmt: skip
    finally:
        PixArtTransformer2DModel.forward = real_forward
    assert result.exit_code == 0, result.output
    assert seen[0]["resolution"].tolist() == [[16.0, 16.0]] * 4 and seen[0]["aspect_ratio"].tolist() == [[1.0]] * 4
