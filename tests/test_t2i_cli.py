"""Text-to-image through the CLI on a tiny PixArt-Sigma pipeline built offline: prepare -> compress -> sample,
resume, and the artifact loaded into the diffusers pipeline in two lines. Nothing downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import diffcr
from diffcr.cli import app
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder

runner = CliRunner()
PROMPT = "a cat on the left"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def compress_args(pipe, cache, out, steps: int, *extra):
    return ("compress", "--base", pipe, "--data", cache, "--out", out, "--steps", steps, "--batch-size", 4,
            "--target", 0.5, "--ratio-lr", 0.3, "--checkpoint-every", 2, *extra)  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    pipe = build_tiny_pixart_pipeline(root / "pipe")
    data = write_caption_folder(root / "data", count=6)
    (data / "nocap.png").write_bytes((data / "img00.png").read_bytes())
    result = invoke("prepare", "--base", pipe, "--data", data, "--out", root / "cache", "--shard-size", 4)
    assert result.exit_code == 0, result.output
    assert (
        "6 image-caption pairs encoded" in result.output and "skipped" in result.output and "nocap.png" in result.output
    )
    return root, pipe, root / "cache"


@pytest.fixture(scope="module")
def compressed(prepared):
    root, pipe, cache = prepared
    result = invoke(*compress_args(pipe, cache, root / "run", 4, "--mode", "lora", "--lora-rank", 4))
    assert result.exit_code == 0, result.output
    return root / "run"


def test_compress_writes_artifact_and_fine_tuned_transformer(compressed):
    assert (compressed / "artifact" / "diffcr_weights.safetensors").is_file()
    assert (compressed / "model" / "diffcr" / "diffcr_weights.safetensors").is_file()
    weights = load_file(str(compressed / "model" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in weights if "lora" in k or k.startswith("diffcr")]  # LoRA merged, base keys only
    ratios = load_file(str(compressed / "artifact" / "diffcr_weights.safetensors"))["kept_ratio"]
    assert ratios.shape == (2, 4) and ratios.min() < 0.9  # the ratios learned toward the target


def test_sample_dense_equals_the_plain_pipeline(prepared, tmp_path):
    from diffusers import PixArtSigmaPipeline

    _, pipe_dir, _ = prepared
    npz = tmp_path / "dense.npz"
    result = invoke("sample", "--base", pipe_dir, "--artifact", "none", "--prompt", PROMPT, "--num", 2,
                    "--steps", 3, "--seed", 11, "--out", tmp_path / "grid.png", "--npz", npz)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = np.load(npz)
    assert data["arr_0"].shape == (2, 16, 16, 3) and data["prompts"].tolist() == [PROMPT, PROMPT]
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == ["0000-seed11.png", "0000-seed12.png"]
    pipe = PixArtSigmaPipeline.from_pretrained(pipe_dir)
    for i, seed in enumerate((11, 12)):
        image = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(seed), output_type="np",
                     use_resolution_binning=False).images[0]  # fmt: skip
        np.testing.assert_array_equal(data["arr_0"][i], (image * 255).round().astype(np.uint8))


def test_artifact_loads_into_the_pipeline_in_two_lines(prepared, compressed, tmp_path):
    from diffusers import PixArtSigmaPipeline

    _, pipe_dir, _ = prepared
    npz = tmp_path / "routed.npz"
    result = invoke("sample", "--base", pipe_dir, "--artifact", compressed / "artifact", "--prompt", PROMPT,
                    "--num", 2, "--steps", 3, "--seed", 3, "--batch-size", 1, "--out", tmp_path / "g.png",
                    "--npz", npz)  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = PixArtSigmaPipeline.from_pretrained(pipe_dir)
    diffcr.load(pipe.transformer, compressed / "artifact")
    images = pipe([PROMPT, PROMPT], num_inference_steps=3, output_type="np", use_resolution_binning=False,
                  generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images  # fmt: skip
    np.testing.assert_array_equal(np.load(npz)["arr_0"], (images * 255).round().astype(np.uint8))
    # a lora run's artifact carries its LoRA: the two lines give the fine-tuned transformer folder's images exactly
    folder_npz, grid = tmp_path / "m.npz", tmp_path / "m.png"
    result = invoke("sample", "--base", pipe_dir, "--artifact", compressed / "model", "--prompt", PROMPT,
                    "--num", 2, "--steps", 3, "--seed", 3, "--out", grid, "--npz", folder_npz)  # fmt: skip
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(folder_npz)["arr_0"], np.load(npz)["arr_0"])


def test_resume_on_text_is_bit_exact(prepared, tmp_path):
    root, pipe, cache = prepared
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    assert invoke(*compress_args(pipe, cache, straight, 4, "--mode", "routers")).exit_code == 0
    assert invoke(*compress_args(pipe, cache, halves, 2, "--mode", "routers")).exit_code == 0
    result = invoke(*compress_args(pipe, cache, halves, 4, "--mode", "routers", "--resume"))
    assert result.exit_code == 0, result.output
    a = load_file(str(straight / "artifact" / "diffcr_weights.safetensors"))
    b = load_file(str(halves / "artifact" / "diffcr_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cache_of_another_pipeline_is_refused(prepared, tmp_path):
    root, _, cache = prepared
    other = build_tiny_pixart_pipeline(tmp_path / "other", image_size=32)
    result = invoke(*compress_args(other, cache, tmp_path / "o", 1))
    assert result.exit_code == 2 and "was made by another pipeline" in result.output
    result = invoke("compress", "--base", root / "pipe", "--data", root / "data", "--out", tmp_path / "p")
    assert result.exit_code == 2 and "must be a cache made by `diffcr prepare" in result.output
    result = invoke("sample", "--base", root / "pipe", "--artifact", "none", "--out", tmp_path / "s.png")
    assert result.exit_code == 2 and "pass --prompt TEXT or --prompts FILE" in result.output


def test_report_renders_a_text_to_image_run(compressed):
    result = invoke("report", compressed, "--steps", 2)
    assert result.exit_code == 0, result.output
    page = (compressed / "report" / "report.html").read_text()
    for part in ("text-to-image report", "measured speedup", "Router maps", "Learned schedule", "data:image/png"):
        assert part in page
    assert (compressed / "evaluation" / "t2i_assessment.json").is_file()
    assert (compressed / "report" / "router_maps.png").is_file()


def test_distill_and_micro_conditions(prepared, tmp_path):
    root, pipe, cache = prepared
    result = invoke(*compress_args(pipe, cache, tmp_path / "distill", 2, "--mode", "routers", "--distill"))
    assert result.exit_code == 0, result.output
    # PixArt-Alpha-style micro-conditions (resolution, aspect ratio) reach the transformer during training
    alpha = build_tiny_pixart_pipeline(tmp_path / "alpha", micro_conditions=True)
    seen = []
    from diffusers import PixArtTransformer2DModel

    real_forward = PixArtTransformer2DModel.forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("added_cond_kwargs"))
        return real_forward(self, *args, **kwargs)

    PixArtTransformer2DModel.forward = spy
    try:
        result = invoke(*compress_args(alpha, cache, tmp_path / "alpha_run", 1, "--mode", "routers"))
    finally:
        PixArtTransformer2DModel.forward = real_forward
    assert result.exit_code == 0, result.output
    conditions = seen[0]
    assert (
        conditions["resolution"].tolist() == [[16.0, 16.0]] * 4 and conditions["aspect_ratio"].tolist() == [[1.0]] * 4
    )


def test_no_route_cross_attention_flag_reaches_the_artifact(prepared, tmp_path):
    import json

    def routes_cross_attention(run):
        return json.loads((run / "artifact" / "diffcr_config.json").read_text())["config"]["route_cross_attention"]

    root, pipe, cache = prepared
    run = tmp_path / "xattn"
    result = invoke(*compress_args(pipe, cache, run, 1, "--mode", "routers", "--no-route-cross-attention"))
    assert result.exit_code == 0, result.output
    assert routes_cross_attention(run) is False
    # and the default is the paper's routing
    default_run = tmp_path / "paper"
    result = invoke(*compress_args(pipe, cache, default_run, 1, "--mode", "routers"))
    assert result.exit_code == 0, result.output
    assert routes_cross_attention(default_run) is True


def test_region_targets_flag_reaches_the_artifact_and_sets_the_target(prepared, tmp_path):
    import json

    def config_of(run):
        return json.loads((run / "artifact" / "diffcr_config.json").read_text())["config"]

    root, pipe, cache = prepared
    run = tmp_path / "regions"
    result = invoke(*compress_args(pipe, cache, run, 1, "--mode", "routers", "--region-targets", "0.8,0.2,0.7,0.3"))
    assert result.exit_code == 0, result.output
    assert config_of(run)["region_targets"] == [0.8, 0.2, 0.7, 0.3]
    # without --target, the target is their mean
    run = tmp_path / "mean"
    args = ("compress", "--base", pipe, "--data", cache, "--out", run, "--steps", 1, "--batch-size", 4, "--mode",
            "routers", "--region-targets", "0.9,0.5,0.3,0.1")  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert config_of(run)["target_kept_ratio"] == pytest.approx(0.45)
    result = invoke(*compress_args(pipe, cache, tmp_path / "bad", 1, "--region-targets", "0.8,half"))
    assert result.exit_code != 0 and "must be kept ratios separated by commas" in result.output
    result = invoke(*compress_args(pipe, cache, tmp_path / "off", 1, "--region-targets", "0.9,0.9,0.9,0.9"))
    assert result.exit_code != 0 and "is not the mean of region_targets" in result.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "off").exists()


def test_paths_spelled_differently_are_the_same_run_and_cache(prepared, tmp_path, monkeypatch):
    root, pipe, cache = prepared
    monkeypatch.chdir(root)
    assert invoke(*compress_args("pipe", "cache", tmp_path / "r", 2, "--mode", "routers")).exit_code == 0
    result = invoke(*compress_args("./pipe/", "cache/", tmp_path / "r", 3, "--mode", "routers", "--resume"))
    assert result.exit_code == 0, result.output
    result = invoke("prepare", "--base", root / "pipe", "--data", root / "data", "--out", "cache", "--shard-size", 4)
    assert result.exit_code == 0, result.output  # the same pipeline, by its absolute path


def test_prepare_reencodes_a_shard_whose_records_changed(tmp_path, prepared):
    _, pipe, _ = prepared
    data = write_caption_folder(tmp_path / "data", count=2)
    assert invoke("prepare", "--base", pipe, "--data", data, "--out", tmp_path / "c").exit_code == 0
    (data / "img01.txt").write_text("two red dogs")
    assert invoke("prepare", "--base", pipe, "--data", data, "--out", tmp_path / "c").exit_code == 0
    from diffcr.data.latent_cache import LatentCaptionDataset

    assert LatentCaptionDataset(tmp_path / "c").captions(2) == ["a zero on the right", "two red dogs"]


def test_a_caption_file_with_no_image_is_refused(prepared, tmp_path):
    _, pipe, _ = prepared
    data = write_caption_folder(tmp_path / "data", count=2)
    (data / "lonely.txt").write_text("a caption with no image")
    result = invoke("prepare", "--base", pipe, "--data", data, "--out", tmp_path / "c")
    assert result.exit_code == 2, result.output
    assert "captions with no image" in result.output and "lonely.txt" in result.output
    assert "add the image or remove the caption file" in result.output and not (tmp_path / "c").exists()


def test_more_bad_text_to_image_inputs(prepared, compressed, tmp_path):
    root, pipe, cache = prepared
    for value in (0, 100000):
        result = invoke(
            "prepare", "--base", pipe, "--data", root / "data", "--out", tmp_path / "c", "--resolution", value
        )
        assert result.exit_code == 2 and "--resolution" in result.output and not (tmp_path / "c").exists()
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "model_index.json").write_text("[1, 2]")
    result = invoke("prepare", "--base", odd, "--data", root / "data", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "not a pipeline's object" in result.output
    result = invoke("sample", "--base", pipe, "--artifact", "none", "--prompt", "a cat", "--out", tmp_path / "s.png",
                    "--npz", tmp_path / "s.arr")  # fmt: skip
    assert result.exit_code == 2 and "must end in .npz" in result.output
    result = invoke("evaluate", "--base", pipe, "--artifact", "none", "--prompt", "a cat", "--out", tmp_path / "e")
    assert result.exit_code == 2 and "compare the dense pipeline with itself" in result.output
    result = invoke("evaluate", "--base", pipe, "--artifact", compressed / "artifact", "--prompt", "a cat",
                    "--out", tmp_path / "e", "--clip", root)  # fmt: skip
    assert result.exit_code == 2 and "holds no CLIP model" in result.output and not (tmp_path / "e").exists()
    other = build_tiny_pixart_pipeline(tmp_path / "other", micro_conditions=True)  # another architecture
    result = invoke("sample", "--base", other, "--artifact", compressed / "model", "--prompt", "a cat",
                    "--out", tmp_path / "o.png")  # fmt: skip
    assert result.exit_code == 2 and "is not this pipeline's" in result.output


def test_dtype_loads_the_pipeline_in_that_precision(prepared, compressed, tmp_path, monkeypatch):
    import json

    import diffcr.text_to_image
    from diffcr.data.latent_cache import resolve_pipeline_dtype

    root, pipe_dir, _ = prepared
    assert resolve_pipeline_dtype("auto", cuda=True) == torch.bfloat16
    assert resolve_pipeline_dtype("auto", cuda=False) == torch.float32
    loaded = []
    load_pipeline = diffcr.text_to_image.load_pipeline

    def spy(*args, **kwargs):  # sample and evaluate load through it: record what they got
        pipe = load_pipeline(*args, **kwargs)
        loaded.append({pipe.transformer.dtype, pipe.text_encoder.dtype, pipe.vae.dtype})
        return pipe

    monkeypatch.setattr(diffcr.text_to_image, "load_pipeline", spy)
    sample = ("sample", "--base", pipe_dir, "--prompt", PROMPT, "--num", 1, "--steps", 2)
    if not torch.cuda.is_available():  # the default on a CPU: fp32
        result = invoke(*sample, "--artifact", "none", "--out", tmp_path / "fp32.png")
        assert result.exit_code == 0, result.output
        assert loaded.pop() == {torch.float32}
    npz = tmp_path / "bf16.npz"
    result = invoke(*sample, "--artifact", compressed / "artifact", "--out", tmp_path / "bf16.png", "--npz", npz,
                    "--dtype", "bf16")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert loaded.pop() == {torch.bfloat16} and np.load(npz)["arr_0"].shape == (1, 16, 16, 3)
    result = invoke("evaluate", "--base", pipe_dir, "--artifact", compressed / "artifact", "--prompt", PROMPT,
                    "--num", 1, "--steps", 2, "--out", tmp_path / "e", "--dtype", "bf16")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert loaded == [{torch.bfloat16}, {torch.bfloat16}]  # dense and DiffCR alike
    assert json.loads((tmp_path / "e" / "t2i_assessment.json").read_text())["dtype"] == "bfloat16"
    # prepare computes in bf16 too, and its cache keeps latents in fp32 and text embeddings in bf16
    result = invoke("prepare", "--base", pipe_dir, "--data", root / "data", "--out", tmp_path / "c", "--dtype", "bf16")
    assert result.exit_code == 0, result.output
    shard = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))
    assert (shard["latents"].dtype, shard["prompt_embeds"].dtype) == (torch.float32, torch.bfloat16)
    for value, message in (("fp64", "is not one of auto, fp32, bf16, fp16"), ("fp16", "needs a CUDA GPU")):
        if value == "fp16" and torch.cuda.is_available():
            continue
        result = invoke(*sample, "--artifact", "none", "--out", tmp_path / "x.png", "--dtype", value)
        assert result.exit_code == 2 and message in result.output, result.output


def test_sample_help_and_scheduler_for_text_to_image(prepared, tmp_path):
    _, pipe_dir, _ = prepared
    result = invoke("sample", "--help")
    assert result.exit_code == 0
    assert "clean_caption=False" in result.output and "class-conditional only" in result.output
    result = invoke("sample", "--base", pipe_dir, "--artifact", "none", "--prompt", PROMPT, "--scheduler", "dpm",
                    "--out", tmp_path / "s.png")  # fmt: skip
    assert result.exit_code == 2 and "--scheduler picks the class-conditional sampler" in result.output
    assert not (tmp_path / "s.png").exists()


def test_compress_warns_about_a_cache_at_another_resolution(prepared, tmp_path, caplog):
    from diffcr.data.latent_cache import prepare_cache

    root, pipe_dir, _ = prepared
    prepare_cache(pipe_dir, root / "data", tmp_path / "cache32", resolution=32, progress=False)
    with caplog.at_level("WARNING", logger="diffcr.data.latent_cache"):
        result = invoke(*compress_args(pipe_dir, tmp_path / "cache32", tmp_path / "run", 1, "--mode", "routers"))
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if "native size" in r.getMessage()]
    assert len(warned) == 1 and "prepared at 32 px, but the transformer's native size is 16 px" in warned[0]
