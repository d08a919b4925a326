"""Text-to-image sampling through a tiny PixArt-Sigma pipeline, dense and with DiffCR."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import diffcr
from diffcr.text_to_image import PromptSampleConfig, load_pipeline, read_prompts, sample_prompts, save_npz, to_uint8
from t2i_helpers import build_tiny_pixart_pipeline

PROMPTS = ["a cat on the left", "two red dogs"]


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pipe") / "pipe")


@pytest.fixture(scope="module")
def artifact_dir(pipeline_dir, tmp_path_factory):
    pipe = load_pipeline(pipeline_dir)
    transformer = diffcr.apply(pipe.transformer, diffcr.DiffCRConfig(timestep_regions=4))
    with torch.no_grad():
        transformer.diffcr.kept_ratio.fill_(0.5)
        for router in transformer.diffcr.routers:
            router.weight.normal_()
    return diffcr.save(diffcr.freeze(transformer), tmp_path_factory.mktemp("artifact"))


def plain_images(pipe, cfg: PromptSampleConfig):
    """What a user gets from the plain pipeline, one call per image with the image's own seed."""
    images = []
    for prompt_idx, prompt in enumerate(PROMPTS):
        for j in range(cfg.num_per_prompt):
            seed = cfg.seed + prompt_idx * cfg.num_per_prompt + j
            out = pipe(
                prompt,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                generator=torch.Generator().manual_seed(seed),
                output_type="np",
                use_resolution_binning=False,
                clean_caption=False,
            ).images
            images.append(to_uint8(out)[0])
    return np.stack(images)


def test_dense_sampling_equals_the_plain_pipeline(pipeline_dir):
    pipe = load_pipeline(pipeline_dir, "none")
    cfg = PromptSampleConfig(steps=3, num_per_prompt=2, seed=5, batch_size=3)
    images = sample_prompts(pipe, PROMPTS, cfg)
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, plain_images(pipe, cfg))


def test_routed_sampling_is_batch_invariant_and_differs_from_dense(pipeline_dir, artifact_dir):
    pipe = load_pipeline(pipeline_dir, artifact_dir)
    assert diffcr.is_applied(pipe.transformer) and diffcr.is_frozen(pipe.transformer)
    by_batch = {
        size: sample_prompts(pipe, PROMPTS, PromptSampleConfig(steps=3, num_per_prompt=2, seed=5, batch_size=size))
        for size in (1, 4)
    }
    np.testing.assert_array_equal(by_batch[1], by_batch[4])
    dense = sample_prompts(load_pipeline(pipeline_dir), PROMPTS, PromptSampleConfig(steps=3, num_per_prompt=2, seed=5))
    assert not np.array_equal(dense, by_batch[1])
    # the same images through the plain pipeline object, DiffCR loaded by hand in two lines
    by_hand = load_pipeline(pipeline_dir)
    diffcr.load(by_hand.transformer, artifact_dir)
    np.testing.assert_array_equal(
        plain_images(by_hand, PromptSampleConfig(steps=3, num_per_prompt=2, seed=5)), by_batch[1]
    )


def test_ancestral_sampling_keeps_each_images_seed(pipeline_dir, artifact_dir):
    """The shipped default samples with Euler ancestral, which draws fresh noise at every step: image i must still
    come from its own seed alone, whatever the batch, and match the plain pipeline called with that seed."""
    from diffusers import EulerAncestralDiscreteScheduler

    cfg = PromptSampleConfig(steps=3, num_per_prompt=2, seed=5)
    images = {}
    for artifact in ("none", artifact_dir):
        pipe = load_pipeline(pipeline_dir, artifact)
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
        one, four = (sample_prompts(pipe, PROMPTS, replace(cfg, batch_size=size)) for size in (1, 4))
        np.testing.assert_array_equal(one, four)
        np.testing.assert_array_equal(one, plain_images(pipe, cfg))
        images[str(artifact)] = one
    # the swap took effect (the pipeline's own DPM-Solver++ gives other images from the same seeds), and routing
    # changes them
    assert not np.array_equal(images["none"], sample_prompts(load_pipeline(pipeline_dir, "none"), PROMPTS, cfg))
    assert not np.array_equal(images["none"], images[str(artifact_dir)])


def test_npz_holds_images_and_their_prompts(tmp_path):
    cfg = PromptSampleConfig(num_per_prompt=2)
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)
    data = np.load(save_npz(tmp_path / "s.npz", images, PROMPTS, cfg))
    assert data["arr_0"].shape == (4, 16, 16, 3)
    assert data["prompts"].tolist() == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_scale": float("nan")}, "guidance_scale=nan must be a finite number"),
        ({"steps": 0}, r"steps=0 must be an integer in \[1, 1000\]"),
        ({"num_per_prompt": 10**8}, r"num_per_prompt=100000000 must be an integer in \[1, 10000\]"),
        ({"seed": -1}, "seed=-1 must be an integer"),
        ({"height": 3}, "height=3 must be an integer >= 8"),
    ],
)
def test_bad_sample_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptSampleConfig(**kwargs)


def test_prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# evaluation prompts\na cat\n\ntwo dogs\n")
    assert read_prompts(None, path) == ["a cat", "two dogs"]
    with pytest.raises(ValueError, match="exactly one of --prompt"):
        read_prompts("a", path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(None, tmp_path / "none.txt")


def test_the_example_runs(pipeline_dir, artifact_dir, tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    example = Path(__file__).parents[1] / "examples" / "pixart_text_to_image.py"
    namespace = runpy.run_path(str(example))
    namespace["main"](str(pipeline_dir), str(artifact_dir), "a cat on the left", steps=2)
    assert (tmp_path / "dense.png").is_file() and (tmp_path / "diffcr.png").is_file()
