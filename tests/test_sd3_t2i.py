"""SD3 text-to-image through the CLI on a tiny StableDiffusion3Pipeline built offline: prepare (two CLIP encoders'
pooled projection beside the embeddings), compress with the flow-matching objective, sample through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import diffcr
from conftest import skipped_entirely
from diffcr.cli import app
from t2i_helpers import build_tiny_sd3_pipeline, write_caption_folder

runner = CliRunner()
PROMPT = "a cat on the left"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3")
    pipe = build_tiny_sd3_pipeline(root / "pipe")
    data = write_caption_folder(root / "data", count=4)
    assert invoke("prepare", "--base", pipe, "--data", data, "--out", root / "cache").exit_code == 0
    result = invoke("compress", "--base", pipe, "--data", root / "cache", "--out", root / "run", "--mode", "routers",
                    "--steps", 3, "--batch-size", 4, "--target", 0.5, "--ratio-lr", 0.3)  # fmt: skip
    assert result.exit_code == 0, result.output
    return root


def test_cache_holds_pooled_projections_and_shifted_latents(run_dir):
    from diffcr.data.latent_cache import LatentCaptionDataset, load_image, load_text_to_image_pipeline

    cache = LatentCaptionDataset(run_dir / "cache")
    latents, text = cache[0]
    assert set(text) == {"prompt_embeds", "prompt_attention_mask", "pooled_projections"}
    pipe = load_text_to_image_pipeline(run_dir / "pipe")
    with torch.no_grad():
        mean = pipe.vae.encode(load_image(run_dir / "data" / "img00.png", 16)[None]).latent_dist.mean[0]
        _, _, pooled, _ = pipe.encode_prompt("a zero on the right", None, None, do_classifier_free_guidance=False)
    config = pipe.vae.config
    torch.testing.assert_close(latents, (mean - config.shift_factor) * config.scaling_factor, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text["pooled_projections"], pooled[0], atol=1e-6, rtol=0)


def test_flow_matching_objective():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffcr.train.loop import noised

    clean, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([0, 500, 999])
    noisy, target = noised(FlowMatchEulerDiscreteScheduler(), clean, noise, timesteps, 1000)
    sigma = torch.tensor([0.0, 0.5, 0.999]).view(3, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * clean + sigma * noise)
    torch.testing.assert_close(target, noise - clean)


def test_sample_dense_and_routed_through_the_sd3_pipeline(run_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    npz = {}
    for name, artifact in (("dense", "none"), ("routed", run_dir / "run" / "artifact")):
        npz[name] = tmp_path / f"{name}.npz"
        result = invoke("sample", "--base", run_dir / "pipe", "--artifact", artifact, "--prompt", PROMPT, "--num", 2,
                        "--steps", 2, "--seed", 4, "--out", tmp_path / f"{name}.png", "--npz", npz[name])  # fmt: skip
        assert result.exit_code == 0, result.output
    pipe = StableDiffusion3Pipeline.from_pretrained(run_dir / "pipe")

    def plain():
        images = pipe([PROMPT, PROMPT], num_inference_steps=2, guidance_scale=4.5, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images  # fmt: skip
        return (images * 255).round().astype(np.uint8)

    np.testing.assert_array_equal(np.load(npz["dense"])["arr_0"], plain())
    diffcr.load(pipe.transformer, run_dir / "run" / "artifact")  # the artifact in the pipeline, in two lines
    np.testing.assert_array_equal(np.load(npz["routed"])["arr_0"], plain())
    assert not np.array_equal(np.load(npz["routed"])["arr_0"], np.load(npz["dense"])["arr_0"])


def test_skip_layer_guidance_through_the_pipeline_at_kept_below_one(run_dir):
    """`skip_guidance_layers` makes the pipeline call the transformer once more per step on the conditional half,
    with `skip_layers`: each such call must equal the routed transformer with those blocks skipped entirely."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(run_dir / "pipe")
    model = diffcr.apply(pipe.transformer, diffcr.DiffCRConfig(timestep_regions=2))
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.tensor([[0.5, 0.75], [0.25, 0.5]]))
        for router in model.diffcr.routers:
            router.weight.normal_()
    diffcr.freeze(model)
    calls = []  # (kwargs, output) of every transformer call
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append((dict(kwargs), out[0])), with_kwargs=True)
    pipe(PROMPT, num_inference_steps=3, guidance_scale=4.5, output_type="latent", skip_guidance_layers=[0],
         skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0,
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    skip_calls = [(kwargs, out) for kwargs, out in calls if kwargs.get("skip_layers")]
    assert len(calls) == 5 and len(skip_calls) == 2  # steps 1 and 2 add a skip-layer call on the conditional half
    for kwargs, out in skip_calls:
        rest = {k: v for k, v in kwargs.items() if k != "skip_layers"}
        with torch.no_grad():
            with skipped_entirely(model, [0]):
                expected = model(**rest)[0]
            kept_all = model(**rest)[0]
        assert out.shape[0] == 1
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert not torch.allclose(out, kept_all)  # the skip mattered
