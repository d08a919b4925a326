"""`diffcr evaluate`: dense vs DiffCR text-to-image in one run, FID in a local CLIP model's feature space."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from typer.testing import CliRunner

import diffcr
from diffcr.benchmark import count_flops
from diffcr.cli import app
from diffcr.text_to_image import PromptSampleConfig, load_pipeline, sample_prompts
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder

runner = CliRunner()


def tiny_clip_vision(folder):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("assess")
    pipe_dir = build_tiny_pixart_pipeline(root / "pipe")
    pipe = load_pipeline(pipe_dir)
    transformer = diffcr.apply(pipe.transformer, diffcr.DiffCRConfig(timestep_regions=1))
    with torch.no_grad():
        transformer.diffcr.kept_ratio.fill_(0.5)
    artifact = diffcr.save(diffcr.freeze(transformer), root / "artifact")
    return root, pipe_dir, artifact


def test_evaluate_measures_dense_and_diffcr_side_by_side(setup):
    root, pipe_dir, artifact = setup
    reference = write_caption_folder(root / "reference", count=4)
    clip = tiny_clip_vision(root / "clip")
    out = root / "eval"
    result = runner.invoke(app, [str(a) for a in (
        "evaluate", "--base", pipe_dir, "--artifact", artifact, "--prompt", "a cat on the left", "--num", 3,
        "--steps", 2, "--batch-size", 1, "--out", out, "--reference", reference, "--features", f"clip:{clip}",
        "--timing-rounds", 2,
    )])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "(5 timed batch pairs)" in result.output  # 3 batches twice, less the first, which warms up
    figures = json.loads((out / "t2i_assessment.json").read_text())
    assert figures["num_images"] == 3 and figures["mean_kept_ratio"] == 0.5
    assert set(figures["latency_per_image_s"]) == {"dense", "diffcr"} and figures["speedup"] > 0
    assert figures["peak_memory_bytes"]["dense"] > 0 and figures["peak_memory_bytes"]["diffcr"] > 0
    assert figures["fid"]["dense"] >= 0 and figures["fid_features"].startswith("clip:")
    assert figures["psnr_vs_dense_db"] < 100  # routed at 0.5: not the dense images
    assert (out / "pairs.png").is_file() and (out / "samples.npz").is_file()
    # FLOP-ideal: one image's pipeline call counted, dense over DiffCR; half the tokens in every block cost less
    dense_call = load_pipeline(pipe_dir)
    cfg = PromptSampleConfig(steps=2, batch_size=1)
    _, one_image = count_flops(lambda: sample_prompts(dense_call, ["a cat on the left"], cfg, indices=[0]))
    assert figures["flops_per_image"]["dense"] == one_image
    assert 0 < figures["flops_per_image"]["diffcr"] < one_image
    assert figures["flop_ratio"] == pytest.approx(one_image / figures["flops_per_image"]["diffcr"])
    assert f"FLOP-ideal {figures['flop_ratio']:.2f}x" in result.output


def test_flop_ratio_is_one_for_an_artifact_that_keeps_every_token(setup, tmp_path):
    from diffcr.t2i_assess import assess_text_to_image

    _, pipe_dir, _ = setup
    transformer = diffcr.apply(load_pipeline(pipe_dir).transformer, diffcr.DiffCRConfig(timestep_regions=1))
    dense_artifact = diffcr.save(diffcr.freeze(transformer), tmp_path / "dense-artifact")  # kept ratio 1.0
    cfg = PromptSampleConfig(steps=2, batch_size=1)
    figures = assess_text_to_image(pipe_dir, dense_artifact, ["a cat"], cfg, tmp_path / "eval", progress=False)
    assert figures["mean_kept_ratio"] == 1.0 and figures["flop_ratio"] == 1.0


def test_evaluate_refuses_bad_feature_options(setup, tmp_path):
    root, pipe_dir, artifact = setup
    args = ["evaluate", "--base", pipe_dir, "--artifact", artifact, "--prompt", "a cat", "--out", tmp_path / "o",
            "--reference", root]  # fmt: skip
    result = runner.invoke(app, [str(a) for a in [*args, "--timing-rounds", 0]])
    assert result.exit_code == 2 and "--timing-rounds" in result.output and "must be >= 1" in result.output
    result = runner.invoke(app, [str(a) for a in [*args, "--features", "vgg"]])
    assert result.exit_code == 2 and "use 'inception'" in result.output
    result = runner.invoke(app, [str(a) for a in [*args, "--features", f"clip:{tmp_path / 'none'}"]])
    assert result.exit_code == 2 and "no CLIP model folder" in result.output


def tiny_clip(folder):
    """A random CLIP (text and vision) with a character-level tokenizer, saved offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from t2i_helpers import tiny_clip_tokenizer

    tokenizer, vocab_size = tiny_clip_tokenizer(folder)
    torch.manual_seed(2)  # a seed whose cosines on the test's pairs are of both signs, with a positive mean
    text = dict(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_torchmetrics_formula_on_a_local_model(tmp_path):
    import numpy as np
    from transformers import CLIPModel, CLIPProcessor

    from diffcr.t2i_assess import clip_score

    folder = tiny_clip(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    prompts = ["a cat", "two dogs", "a red one", "nine", "left", "right"]
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=list(torch.from_numpy(images).permute(0, 3, 1, 2)), return_tensors="pt")
        tokens = processor(text=prompts, return_tensors="pt", padding=True)
        image_embeds = model.get_image_features(pixels["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(tokens["input_ids"], tokens["attention_mask"]).pooler_output
    cosine = torch.nn.functional.cosine_similarity(image_embeds, text_embeds)
    expected = float((100 * cosine).mean().clamp(min=0))  # torchmetrics clamps the mean at 0, not each pair
    assert expected > 0 and (cosine < 0).any()
    assert clip_score(images, prompts, folder) == pytest.approx(expected, abs=1e-3)


def test_the_speedup_pairs_each_batch_with_its_own_dense_time():
    from diffcr.t2i_assess import paired_speedup

    # a slow moment hit both calls of batch 2 and only DiffCR's call of batch 4: three of four batches say 1.5x
    dense = [6.0, 9.0, 6.0, 6.0]
    routed = [4.0, 6.0, 4.0, 6.0]
    assert paired_speedup(dense, routed) == pytest.approx(1.5)
    assert statistics.median(dense) / statistics.median(routed) == pytest.approx(1.2)  # what medians alone say
    assert paired_speedup([3.0, 2.0, 9.0], [1.0, 2.0, 3.0]) == pytest.approx(3.0)  # ratios 3, 1, 3
    with pytest.raises(ValueError, match="one time per batch"):
        paired_speedup([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="one time per batch"):
        paired_speedup([], [])


def test_more_timing_rounds_time_more_batch_pairs_and_keep_the_first_rounds_images(setup, tmp_path):
    import numpy as np

    from diffcr.t2i_assess import assess_text_to_image

    _, pipe_dir, artifact = setup
    cfg = PromptSampleConfig(steps=2, batch_size=1, num_per_prompt=3)
    once = assess_text_to_image(pipe_dir, artifact, ["a cat"], cfg, tmp_path / "once", progress=False)
    thrice = assess_text_to_image(
        pipe_dir, artifact, ["a cat"], cfg, tmp_path / "thrice", progress=False, timing_rounds=3
    )
    # 3 batches: the first round's first pair warms up, so 2 are timed in one round and 2 + 3 + 3 in three
    assert (once["timed_batches"], thrice["timed_batches"]) == (2, 8)
    images = [np.load(run / "samples.npz") for run in (tmp_path / "once", tmp_path / "thrice")]
    for name in ("dense", "diffcr"):
        assert images[0][name].shape[0] == images[1][name].shape[0] == 3
        np.testing.assert_array_equal(images[0][name], images[1][name])  # the same noise, the same images
    with pytest.raises(ValueError, match="timing_rounds=0 must be >= 1"):
        assess_text_to_image(pipe_dir, artifact, ["a cat"], cfg, tmp_path / "none", timing_rounds=0)
    assert not (tmp_path / "none").exists()


def test_assessing_in_a_fresh_process_gives_the_same_images_and_figures(setup, tmp_path):
    import numpy as np

    from diffcr.t2i_assess import assess_in_fresh_process, assess_text_to_image

    _, pipe_dir, artifact = setup
    cfg = PromptSampleConfig(steps=2, batch_size=2, num_per_prompt=2)
    here = assess_text_to_image(pipe_dir, artifact, ["a cat", "a dog"], cfg, tmp_path / "here", progress=False)
    fresh = assess_in_fresh_process(pipe_dir, artifact, ["a cat", "a dog"], cfg, tmp_path / "fresh", progress=False)
    images = [np.load(run / "samples.npz") for run in (tmp_path / "here", tmp_path / "fresh")]
    for name in ("dense", "diffcr"):
        assert images[1][name].shape == (4, *images[0][name].shape[1:])
        np.testing.assert_array_equal(images[0][name], images[1][name])  # same seeds, same kernels, same images
    for key in ("num_images", "timed_batches", "flops_per_image", "mean_kept_ratio", "psnr_vs_dense_db"):
        assert fresh[key] == here[key]
    # an error in the child reaches the caller, with its message
    with pytest.raises(RuntimeError, match="fresh process failed(.|\n)*compare the dense pipeline with itself"):
        assess_in_fresh_process(pipe_dir, "none", ["a cat"], cfg, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
