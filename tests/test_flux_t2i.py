"""Flux text-to-image through the CLI on a tiny FluxPipeline built offline: prepare (pooled CLIP projection beside
the T5 embeddings), compress with flow matching on packed latents and sigma timesteps, sample, report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffcr
from diffcr.cli import app
from t2i_helpers import build_tiny_flux_pipeline, write_caption_folder

runner = CliRunner()
PROMPT = "a cat on the left"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    pipe = build_tiny_flux_pipeline(root / "pipe")
    data = write_caption_folder(root / "data", count=4)
    result = invoke("prepare", "--base", pipe, "--data", data, "--out", root / "cache", "--resolution", 16)
    assert result.exit_code == 0, result.output
    result = invoke("compress", "--base", pipe, "--data", root / "cache", "--out", root / "run", "--mode", "routers",
                    "--steps", 3, "--batch-size", 4, "--target", 0.5, "--ratio-lr", 0.3)  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def test_flux_prediction_packs_latents_and_takes_sigma(run_dir):
    from diffcr.data.latent_cache import LatentCaptionDataset, load_text_to_image_pipeline
    from diffcr.train.conditioning import TextConditioning

    pipe = load_text_to_image_pipeline(run_dir / "pipe")
    conditioning = TextConditioning(LatentCaptionDataset(run_dir / "cache"), timestep_divisor=1000)
    conditioning.check_fits(pipe.transformer)
    clean, cond = conditioning.batch(torch.tensor([0, 1]), torch.tensor([False, True]), "cpu")
    seen = {}
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        out = conditioning.predict(pipe.transformer, clean, torch.tensor([250, 750]), cond)
    assert out.shape == clean.shape == (2, 4, 8, 8)
    assert seen["hidden_states"].shape == (2, 16, 16)  # 2x2 patches of 4 channels as tokens
    assert seen["timestep"].tolist() == [0.25, 0.75]  # sigma, as FluxPipeline passes it
    # the dropped caption is the empty prompt's embedding
    torch.testing.assert_close(cond["encoder_hidden_states"][1], conditioning.cache.empty_prompt["prompt_embeds"])


def test_flux_compress_cuts_regions_on_sigma(run_dir):
    """Flux receives sigma in [0, 1], so the regions of a compressed Flux cut [0, 1], not the scheduler's 1000 steps
    (on [0, 1000] every training sample and every sampling step would fall in region 0)."""
    import json

    artifact = run_dir / "run" / "artifact"
    saved = json.loads((artifact / "diffcr_config.json").read_text())
    assert saved["num_train_timesteps"] == saved["config"]["num_train_timesteps"] == 1
    assert json.loads((run_dir / "run" / "run.json").read_text())["diffcr"]["num_train_timesteps"] == 1
    from diffcr.data.latent_cache import load_text_to_image_pipeline

    model = diffcr.load(load_text_to_image_pipeline(run_dir / "pipe").transformer, artifact)
    assert model.diffcr.regions_of(torch.tensor([0.1, 0.4, 0.6, 0.9]), 4) == [0, 1, 2, 3]
    # training moved the kept ratio of every region its samples fell in (3 steps of 4 samples cover several)
    trained = (model.diffcr.kept_ratio < 1.0).any(dim=0)  # (R,)
    assert trained.sum() > 1, model.diffcr.kept_ratio


def test_flux_training_checks_the_sigma_range(run_dir, tmp_path):
    """A Flux config cuts [0, 1]: num_train_timesteps=1 trains, the scheduler's 1000 is refused, and so is a
    conditioning that would hand Flux the scheduler's steps instead of sigma."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffcr.data.latent_cache import LatentCaptionDataset, load_text_to_image_pipeline
    from diffcr.train import TrainConfig, train
    from diffcr.train.conditioning import TextConditioning

    def run(name, num_train_timesteps, divisor=1000):
        return train(
            tmp_path / name,
            load_text_to_image_pipeline(run_dir / "pipe").transformer,
            TextConditioning(LatentCaptionDataset(run_dir / "cache"), timestep_divisor=divisor),
            TrainConfig(mode="routers", steps=1, batch_size=2),
            diffcr_config=diffcr.DiffCRConfig(timestep_regions=4, num_train_timesteps=num_train_timesteps),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            progress=False,
        )

    assert diffcr.get_config(run("sigma", 1).model).num_train_timesteps == 1
    with pytest.raises(ValueError, match=r"num_train_timesteps=1000 but the model receives timesteps in \[0, 1\]"):
        run("steps", 1000)
    with pytest.raises(ValueError, match="set the conditioning's timestep_divisor to 1000"):
        run("undivided", None, divisor=1.0)
    assert not (tmp_path / "steps").exists() and not (tmp_path / "undivided").exists()


def test_flux_sampling_routes_each_step_by_its_sigma(run_dir):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(run_dir / "pipe")
    diffcr.load(pipe.transformer, run_dir / "run" / "artifact")
    seen = []  # (the timestep the transformer received, its samples' regions), per call
    pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs["timestep"][0].item(), m.diffcr._regions)), with_kwargs=True
    )
    pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=16, width=16, output_type="latent")
    sigmas = pipe.scheduler.sigmas[:4].tolist()  # 1, 0.75, 0.5, 0.25
    assert [t for t, _ in seen] == pytest.approx(sigmas)
    assert [regions for _, regions in seen] == [[min(3, int(s * 4))] for s in sigmas]  # [[3], [3], [2], [1]]


def test_sample_dense_and_routed_through_the_flux_pipeline(run_dir, tmp_path):
    from diffusers import FluxPipeline

    npz = {}
    for name, artifact in (("dense", "none"), ("routed", run_dir / "run" / "artifact")):
        npz[name] = tmp_path / f"{name}.npz"
        result = invoke("sample", "--base", run_dir / "pipe", "--artifact", artifact, "--prompt", PROMPT, "--num", 2,
                        "--steps", 2, "--seed", 4, "--height", 16, "--width", 16, "--out", tmp_path / f"{name}.png",
                        "--npz", npz[name])  # fmt: skip
        assert result.exit_code == 0, result.output
    pipe = FluxPipeline.from_pretrained(run_dir / "pipe")

    def plain():
        images = pipe([PROMPT, PROMPT], num_inference_steps=2, guidance_scale=4.5, height=16, width=16,
                      negative_prompt="", output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images  # fmt: skip
        return (images * 255).round().astype(np.uint8)

    dense = np.load(npz["dense"])["arr_0"]
    np.testing.assert_array_equal(dense, plain())
    assert not np.array_equal(np.load(npz["routed"])["arr_0"], dense)  # the artifact's routing changed the images
    diffcr.load(pipe.transformer, run_dir / "run" / "artifact")
    np.testing.assert_array_equal(np.load(npz["routed"])["arr_0"], plain())


def test_report_of_a_flux_run(run_dir):
    result = invoke("report", run_dir / "run", "--steps", 2)
    assert result.exit_code == 0, result.output
    assert "Router maps" in (run_dir / "run" / "report" / "report.html").read_text()
