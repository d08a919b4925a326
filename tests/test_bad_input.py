"""Bad input, faults and interruption (issue 8, item 5): every case is a one-line error with exit code 2 that names
what was wrong, raised before any work is done and before any output is written; or it is correct behaviour.

Tiny models (1 block, 8x8 images) and tiny image folders keep the whole file fast.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffcr.checkpoint import CheckpointError, RunInUse, latest_checkpoint, load_checkpoint, run_lock
from diffcr.cli import app
from diffcr.data import load_image_folder
from diffcr.data.mnist import ImageDataset
from diffcr.models import build_base_model, load_base_model
from diffcr.sampling import SampleConfig, parse_classes
from diffcr.train import TrainConfig, TrainingDiverged, TrainingInterrupted, train

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, *words: str) -> None:
    """Exit code 2, one 'error:' line, and every word of the message present."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, (word, result.output)


def tiny_base(num_layers: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    return build_base_model(num_layers=num_layers, num_attention_heads=2, attention_head_dim=8, sample_size=8)


def tiny_data(n: int = 16, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageDataset(images, labels, tuple(str(i) for i in range(10)))


def image_folder(root, classes: int = 2, per_class: int = 3, size: int = 8, mode: str = "L"):
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / f"c{c:02d}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "base"
    tiny_base().save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("bad") / "digits")


def routers_config(**changes) -> TrainConfig:
    base = dict(mode="routers", steps=2, batch_size=4, checkpoint_every=1, lr=1e-3, router_lr=1e-2, ratio_lr=5e-2)
    return TrainConfig(**{**base, **changes})


# --- numbers: out of range, NaN, infinite, huge ---------------------------------------------------------------

COMPRESS_NUMBERS = [
    (["--lr", "-1"], "lr=-1.0 must be >= 0"),
    (["--lr", "nan"], "lr=nan must be a finite number"),
    (["--ratio-lr", "nan"], "ratio_lr=nan"),
    (["--router-lr", "inf"], "router_lr=inf"),
    (["--weight-decay", "-1"], "weight_decay=-1.0 must be >= 0"),
    (["--lambda", "1e30"], "ratio_loss_weight"),
    (["--lambda", "nan"], "ratio_loss_weight"),
    (["--minutes", "0"], "max_minutes=0.0 must be > 0"),
    (["--minutes", "nan"], "max_minutes=nan"),
    (["--regions", "5000"], "timestep_regions=5000"),
    (["--regions", str(10**12)], "timestep_regions=1000000000000"),
    (["--batch-size", str(10**9)], "batch_size=1000000000 is outside [1, 65536]"),
    (["--seed", str(10**30)], "seed=1000000000000000000000000000000 is outside"),
    (["--seed", "-1"], "seed=-1 is outside"),
    (["--steps", "0"], "steps=0 is outside"),
    (["--checkpoint-every", "0"], "checkpoint_every=0"),
    (["--lora-rank", "0"], "lora_rank=0"),
    (["--target", "nan"], "target_kept_ratio"),
    (["--mode", "fulll"], "mode='fulll' is not one of"),
    (["--mode", "pretrain"], "use --mode routers, lora or full"),
    (["--mixed-precision", "fp8"], "mixed_precision='fp8'"),
    (["--mixed-precision", "fp16"], "needs a CUDA GPU") if not torch.cuda.is_available() else (["--lr", "-2"], "lr"),
    (["--gate", "topk"], "gate='topk'"),
]


@pytest.mark.parametrize("args,words", COMPRESS_NUMBERS, ids=[" ".join(a) for a, _ in COMPRESS_NUMBERS])
def test_compress_refuses_bad_numbers_before_any_work(args, words, tmp_path):
    result = invoke("compress", "--base", tmp_path / "never-read", "--out", tmp_path / "out", *args)
    refused(result, words)
    assert not (tmp_path / "out").exists()


def test_compress_refuses_diffcr_flags_that_config_would_override(tmp_path):
    config = tmp_path / "diffcr.json"
    config.write_text('{"target_kept_ratio": 0.6}')
    result = invoke("compress", "--out", tmp_path / "out", "--config", config, "--target", "0.4",
                    "--no-route-cross-attention")  # fmt: skip
    refused(result, "--route-cross-attention, --target would be ignored", "route_cross_attention, target_kept_ratio")
    assert not (tmp_path / "out").exists()


def test_compress_refuses_cross_attention_bypass_on_a_class_conditional_dit(tmp_path):
    result = invoke("compress", "--out", tmp_path / "out", "--steps", "1", "--batch-size", "2",
                    "--no-route-cross-attention")  # fmt: skip
    refused(result, "route_cross_attention=False", "leave out --no-route-cross-attention")
    assert "use route_cross_attention=True" in result.output
    assert not (tmp_path / "out").exists()


PRETRAIN_NUMBERS = [
    (["--lr", "nan"], "lr=nan"),
    (["--warmup-steps", "-1"], "warmup_steps=-1"),
    (["--num-layers", "0"], "--num-layers 0 is outside"),
    (["--num-layers", str(10**6)], "--num-layers 1000000 is outside"),
    (["--channels", "2"], "--channels 2 must be 1"),
    (["--image-size", "31"], "--image-size 31 must be a multiple"),
    (["--channels", "3"], "bundled MNIST-5k digits are 1x32x32"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--average-from", "99999"], "average_from=99999 is after the last step (6000)"),
    (["--average-from", "-1"], "average_from=-1 is outside"),
    (["--lr-schedule", "linear"], "lr_schedule='linear' must be one of"),
]


@pytest.mark.parametrize("args,words", PRETRAIN_NUMBERS, ids=[" ".join(a) for a, _ in PRETRAIN_NUMBERS])
def test_pretrain_refuses_bad_numbers_before_any_work(args, words, tmp_path):
    refused(invoke("pretrain", "--out", tmp_path / "out", *args), words)
    assert not (tmp_path / "out").exists()


SAMPLE_NUMBERS = [
    (["--guidance-scale", "nan"], "guidance_scale=nan"),
    (["--guidance-scale", "inf"], "guidance_scale=inf"),
    (["--guidance-scale", "-1"], "guidance_scale=-1.0 must be in [1, 100]"),
    (["--steps", "0"], "steps=0 is outside [1, 1000]"),
    (["--steps", "5000"], "steps=5000"),
    (["--num", "0"], "--num 0 is outside"),
    (["--batch-size", "0"], "batch_size=0"),
    (["--threads", "0"], "--threads 0 is outside"),
    (["--seed", "-5"], "seed=-5"),
    (["--scheduler", "euler"], "scheduler='euler'"),
]


@pytest.mark.parametrize("args,words", SAMPLE_NUMBERS, ids=[" ".join(a) for a, _ in SAMPLE_NUMBERS])
def test_sample_refuses_bad_numbers_before_any_work(args, words, tmp_path):
    result = invoke("sample", "--base", tmp_path / "never-read", "--out", tmp_path / "s.png", *args)
    refused(result, words)
    assert not (tmp_path / "s.png").exists()


def test_library_configs_refuse_bad_numbers_too():
    for bad in (
        dict(lr=float("nan")),
        dict(grad_clip=-1.0),
        dict(grad_clip=float("nan")),
        dict(weight_decay=float("inf")),
        dict(steps=1.5),
        dict(seed=2**40),
        dict(max_minutes=-1.0),
        dict(num_threads=0),
        dict(label_drop_prob=float("nan")),
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)
    for bad in (dict(guidance_scale=float("nan")), dict(guidance_scale=1e30), dict(steps=0), dict(seed=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SampleConfig(**bad)
    assert TrainConfig(grad_clip=0.0, warmup_steps=0).grad_clip == 0.0  # 0 = no clipping stays allowed


def test_classes_strings_name_the_bad_part():
    for text, words in (
        ("", "classes is empty"),
        ("9-3", "the range '9-3' is empty"),
        ("0-1000000000000", "outside 0..9"),
        ("10", "outside 0..9"),
        ("-1", "outside 0..9"),
        ("1,,2", "cannot read classes '1,,2' at ''"),
        ("one", "cannot read classes 'one'"),
    ):
        with pytest.raises(ValueError, match=words.replace(".", r"\.").replace("(", r"\(")):
            parse_classes(text, 10)


# --- DiffCR config against the scheduler ------------------------------------------------------------------------


def test_config_with_other_num_train_timesteps_is_refused(tmp_path, base_dir, data_dir):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"_type": "DiffCRConfig", "_version": 1, "num_train_timesteps": 10}))
    result = invoke("compress", "--base", base_dir, "--data", data_dir, "--config", config, "--out", tmp_path / "o")
    refused(result, "num_train_timesteps=10", "1000")
    assert not (tmp_path / "o").exists()
    import diffcr

    with pytest.raises(ValueError, match="num_train_timesteps=10"):
        train(
            tmp_path / "lib",
            tiny_base(),
            tiny_data(),
            routers_config(),
            diffcr_config=diffcr.DiffCRConfig(num_train_timesteps=10),
            progress=False,
        )
    assert not (tmp_path / "lib").exists()
    for text, words in (("{not json", "is not valid JSON"), ("[1]", "JSON list"), ('{"stepz": 1}', "stepz")):
        config.write_text(text)
        refused(invoke("compress", "--base", base_dir, "--config", config, "--out", tmp_path / "o"), str(config), words)
    refused(invoke("compress", "--config", tmp_path / "missing.json", "--out", tmp_path / "o"), "does not exist")


# --- output paths: checked before any work, no partial output --------------------------------------------------


def test_outputs_under_a_file_are_refused_before_any_work(tmp_path, base_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(invoke("compress", "--base", base_dir, "--out", blocker / "run"), "is a file, not a folder")
    refused(invoke("compress", "--base", base_dir, "--out", blocker), "is a file, not a folder")
    refused(invoke("pretrain", "--out", blocker / "run"), "is a file, not a folder")
    png = tmp_path / "s.png"
    common = ("sample", "--base", base_dir, "--artifact", "none", "--steps", "1", "--num", "1", "--classes", "0")
    refused(invoke(*common, "--out", png, "--npz", blocker / "s.npz"), "--npz", "is a file, not a folder")
    assert not png.exists()  # the PNG is not written when the npz cannot be
    refused(invoke(*common, "--out", tmp_path / "grid.xyz"), "unknown suffix '.xyz'")
    refused(invoke(*common, "--out", tmp_path), "is a folder")
    refused(invoke(*common, "--out", png, "--npz", png), "the same file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_missing_output_folders_are_created(tmp_path, base_dir):
    out, npz = tmp_path / "a" / "s.png", tmp_path / "no" / "such" / "dir" / "s.npz"
    common = ("sample", "--base", base_dir, "--artifact", "none", "--steps", "1", "--num", "1", "--classes", "0-1")
    result = invoke(*common, "--out", out, "--npz", npz)
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 0 and np.load(npz)["arr_0"].shape == (2, 8, 8, 1)


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot create entries in. For a normal user, a read-only folder (mode 555); root
    writes through permission bits, so for root /proc/self, where the kernel refuses new entries to everyone."""
    if os.geteuid() != 0:
        locked = tmp_path / "ro"
        locked.mkdir()
        locked.chmod(0o555)
        yield locked
        locked.chmod(0o755)
        return
    locked = Path("/proc/self")
    if not locked.is_dir() or os.access(locked, os.W_OK):
        pytest.skip("running as root without a /proc/self that refuses writes: no folder root cannot write")
    yield locked


def test_read_only_output_folder_is_refused(unwritable_folder, base_dir):
    refused(invoke("compress", "--base", base_dir, "--out", unwritable_folder / "run"), "no write permission")
    refused(invoke("sample", "--base", base_dir, "--out", unwritable_folder / "s.png"), "no write permission")
    refused(invoke("pretrain", "--out", unwritable_folder / "run", "--steps", "1"), "no write permission")
    assert not (unwritable_folder / "run").exists() and not (unwritable_folder / "s.png").exists()


def test_out_holding_other_files_is_refused(tmp_path, base_dir):
    (tmp_path / "notes.txt").write_text("mine")
    refused(invoke("compress", "--base", base_dir, "--out", tmp_path), "already holds other files", "notes.txt")


# --- base models -------------------------------------------------------------------------------------------------


def _base_variant(root, name: str):
    folder = root / name
    folder.mkdir()
    if name == "unet":
        (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8}))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    elif name == "no-weights":
        (folder / "config.json").write_text(
            json.dumps({"_class_name": "DiTTransformer2DModel", "num_embeds_ada_norm": 10})
        )
    elif name == "garbage-config":
        (folder / "config.json").write_text("{ this is not json")
    elif name == "pickled":
        model = tiny_base()
        model.save_pretrained(folder, safe_serialization=False)
    elif name == "truncated-weights":
        tiny_base().save_pretrained(folder, safe_serialization=True)
        weights = folder / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif name == "unconditional":
        (folder / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel"}))
    return folder


BASES = [
    ("unet", "holds a UNet2DModel, not a DiT"),
    ("no-weights", "has no weights"),
    ("garbage-config", "config.json is not valid JSON"),
    ("pickled", "only safetensors"),
    ("truncated-weights", "cannot load the base model from folder"),
    ("unconditional", "class-conditional"),
    ("empty", "has no config.json"),
]


@pytest.mark.parametrize("name,words", BASES, ids=[n for n, _ in BASES])
def test_wrong_base_folders_are_named(name, words, tmp_path):
    folder = _base_variant(tmp_path, name)
    with pytest.raises(ValueError, match=words):
        load_base_model(folder)
    refused(invoke("sample", "--base", folder, "--artifact", "none", "--out", tmp_path / "s.png"), str(folder), words)
    assert not (tmp_path / "s.png").exists()


def test_missing_base_path_is_named(tmp_path):
    refused(invoke("sample", "--base", tmp_path / "nope" / "x", "--artifact", "none"), "does not exist")
    (tmp_path / "f").write_text("x")
    refused(invoke("sample", "--base", tmp_path / "f", "--artifact", "none"), "is a file, not a folder")


# --- data --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [11, 12])
def test_more_classes_than_the_base_is_refused(classes, tmp_path, base_dir):
    data = image_folder(tmp_path / "data", classes=classes, per_class=2)
    result = invoke("compress", "--base", base_dir, "--data", data, "--out", tmp_path / "o")
    refused(result, f"the data has {classes} classes but the base model has 10", "null class")
    assert not (tmp_path / "o").exists()


def test_rgb_data_for_a_grayscale_base_is_refused(tmp_path, base_dir):
    data = image_folder(tmp_path / "data", mode="RGB")
    refused(invoke("compress", "--base", base_dir, "--data", data, "--out", tmp_path / "o"), "3x8x8", "takes 1x8x8")
    # the bundled 32x32 digits do not fit an 8x8 base either
    refused(invoke("compress", "--base", base_dir, "--out", tmp_path / "o"), "1x32x32", "takes 1x8x8")
    assert not (tmp_path / "o").exists()
    # pretrain follows the images' channels (or --channels)
    assert load_image_folder(data, image_size=8, channels=None).images.shape[1] == 3
    assert load_image_folder(image_folder(tmp_path / "grey"), image_size=8, channels=None).images.shape[1] == 1


@pytest.mark.parametrize(("mode", "channels", "expected"), [("RGB", None, 3), ("RGB", "1", 1), ("L", "3", 3)])
def test_pretrain_builds_a_model_with_the_channels_of_the_data(tmp_path, mode, channels, expected):
    data = image_folder(tmp_path / "data", mode=mode)
    out = tmp_path / "pre"
    args = ["pretrain", "--data", data, "--out", out, "--num-layers", "1", "--steps", "1", "--batch-size", "2"]
    args += ["--warmup-steps", "0", "--image-size", "8", *(["--channels", channels] if channels else [])]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["in_channels"] == config["out_channels"] == expected and config["sample_size"] == 8
    assert config["num_embeds_ada_norm"] == 2  # the folder's two classes
    model = load_base_model(out / "model")
    with torch.no_grad():
        sample = model(torch.zeros(1, expected, 8, 8), torch.tensor([5]), class_labels=torch.tensor([1])).sample
    assert sample.shape[1] == expected


def test_sixteen_bit_images_keep_their_range(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "a" / "mid.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "a" / "white.png")
    images = load_image_folder(tmp_path, image_size=8).images
    assert images[0].mean().item() == pytest.approx(0.0, abs=0.01)  # mid grey, not clipped to 1.0
    assert images[1].mean().item() == pytest.approx(1.0, abs=1e-5)


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims another size (what a decompression bomb looks like at open)."""
    import io

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_unreadable_images_are_named(tmp_path):
    image_folder(tmp_path)
    bomb = tmp_path / "c00" / "bomb.png"
    bomb.write_bytes(_png_claiming(40_000, 40_000))
    with pytest.raises(ValueError, match=r"bomb\.png.*too large to decode safely"):
        load_image_folder(tmp_path)
    bomb.unlink()
    (tmp_path / "c01" / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot read image .*empty\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "c01" / "empty.png").write_bytes((tmp_path / "c01" / "0.png").read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot read image .*empty\.png"):
        load_image_folder(tmp_path)
    (tmp_path / "c01" / "empty.png").unlink()
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes
    assert load_image_folder(tmp_path, image_size=8).class_names == ("c00", "c01")
    Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "c01" / "float.tif")
    with pytest.raises(ValueError, match=r"float\.tif.*floating-point pixels"):
        load_image_folder(tmp_path)


def test_non_finite_training_images_are_refused(tmp_path):
    data = tiny_data()
    data.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        train(tmp_path / "r", tiny_base(), data, routers_config(), progress=False)
    assert not (tmp_path / "r").exists()


# --- resume: nothing to resume, damaged checkpoints, a rescued divergence ----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("bad") / "run"
    train(run, tiny_base(), tiny_data(), routers_config(), progress=False)
    return run


def test_resume_with_nothing_to_resume_is_refused(tmp_path, base_dir, data_dir):
    for out in (tmp_path / "missing", tmp_path):
        result = invoke("compress", "--base", base_dir, "--data", data_dir, "--out", out, "--resume")
        refused(result, "nothing to resume", "drop --resume")
    assert not (tmp_path / "missing").exists()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(tmp_path / "lib", tiny_base(), tiny_data(), routers_config(), resume=True, progress=False)


DAMAGE = {
    "latest not JSON": ("latest", lambda p: p.write_text("checkpoint-0000002"), "latest is not valid JSON"),
    "latest escapes": ("latest", lambda p: p.write_text('{"checkpoint": "../x"}'), "does not name a checkpoint"),
    "truncated weights": (
        "checkpoint-0000002/trainable.safetensors",
        lambda p: p.write_bytes(p.read_bytes()[:50]),
        "trainable.safetensors",
    ),
    "missing optimizer.json": ("checkpoint-0000002/optimizer.json", lambda p: p.unlink(), "optimizer.json is missing"),
    "bad state.json": ("checkpoint-0000002/state.json", lambda p: p.write_text("{oops"), "state.json"),
    "bad run.json": ("run.json", lambda p: p.write_text("{oops"), "run.json is missing or damaged"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_named(case, finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    relative, damage, words = DAMAGE[case]
    damage(run / relative)
    with pytest.raises(CheckpointError, match=words) as info:
        train(run, tiny_base(), tiny_data(), routers_config(steps=3), resume=True, progress=False)
    assert "start afresh" in str(info.value) or "older checkpoint" in str(info.value)


def test_diverged_run_resumes_from_a_good_checkpoint_with_a_lower_lr(tmp_path, caplog):
    run = tmp_path / "run"
    full = dict(mode="full", grad_clip=0.0, checkpoint_every=1)
    train(run, tiny_base(), tiny_data(), routers_config(**full, steps=3), progress=False)
    # lr 1e3: one step breaks the weights (still finite), the next loss is NaN
    with pytest.raises(TrainingDiverged, match=r"step 4.*The last good checkpoint, .*checkpoint-0000003") as info:
        train(run, tiny_base(), tiny_data(), routers_config(**full, steps=8, lr=1e3), resume=True, progress=False)
    good = latest_checkpoint(run)
    assert good.name == "checkpoint-0000003" and str(good) in str(info.value)
    assert all(torch.isfinite(t).all() for t in load_checkpoint(good)[0].values())
    caplog.set_level("WARNING")
    resumed = train(run, tiny_base(), tiny_data(), routers_config(**full, steps=5), resume=True, progress=False)
    assert resumed.steps_done == 5 and "lr 1000.0 -> 0.001" in caplog.text
    # other settings still may not change
    with pytest.raises(ValueError, match=r"differs in \['weight_decay'\]"):
        train(run, tiny_base(), tiny_data(), routers_config(**full, steps=6, weight_decay=0.5), resume=True)


def test_interrupt_names_the_checkpoint_to_resume_from(tmp_path, monkeypatch):
    import diffcr.train.loop as training

    real = training.draw_global_batch

    def interrupted(step, *args, **kwargs):
        if step == 1:
            raise KeyboardInterrupt
        return real(step, *args, **kwargs)

    monkeypatch.setattr(training, "draw_global_batch", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"step 1; the last checkpoint, .*checkpoint-0000001.*--resume"):
        train(tmp_path / "r", tiny_base(), tiny_data(), routers_config(steps=3), progress=False)


# --- two runs into one folder --------------------------------------------------------------------------------------


def test_second_run_into_a_busy_folder_fails_at_once(tmp_path, base_dir, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); time.sleep(60)",
            str(out / ".lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ("--base", base_dir, "--data", data_dir, "--out", out, "--steps", "1", "--batch-size", "2")
        refused(invoke("compress", *args, "--mode", "routers"), "in use by another diffcr run", "4242")
        with pytest.raises(RunInUse):
            train(out, tiny_base(), tiny_data(), routers_config(), progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's lock file is left behind, but the OS released its lock: it does not block
    with run_lock(out):
        pass


# --- other commands -----------------------------------------------------------------------------------------------


def test_other_commands_name_bad_input(tmp_path, finished_run):
    refused(invoke("report", tmp_path), "is not a compression run")
    refused(invoke("report", tmp_path / "nope"), "is not a folder")
    pretrain_run = tmp_path / "pre"
    (pretrain_run).mkdir()
    (pretrain_run / "run.json").write_text(json.dumps({"train": {"mode": "pretrain"}}))
    refused(invoke("report", pretrain_run), "is a pretraining run")
    refused(invoke("report", finished_run), "has no finished artifact")
    refused(invoke("report", finished_run, "--num", "0"), "--num 0 is outside")
    refused(invoke("train-classifier", "--epochs", "0"), "--epochs 0 is outside")
    refused(invoke("bench", "--only", "x"), "--only 'x'")
    refused(invoke("bench", "--publish", tmp_path), "is not a bench folder")


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(tmp_path, base_dir, data_dir, monkeypatch):
    import diffcr.train as training

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted("training interrupted at step 3; the last checkpoint, X, is intact")

    monkeypatch.setattr(training, "train", interrupted)
    result = invoke("compress", "--base", base_dir, "--data", data_dir, "--out", tmp_path / "o", "--mode", "routers")
    assert result.exit_code == 130 and "interrupted: training interrupted at step 3" in result.output


def test_report_refuses_a_classifier_for_other_images(tmp_path):
    run = tmp_path / "run"
    (run / "artifact").mkdir(parents=True)
    (run / "artifact" / "diffcr_weights.safetensors").write_bytes(b"")
    model_config = {"in_channels": 1, "sample_size": 8, "num_embeds_ada_norm": 10}
    (run / "run.json").write_text(json.dumps({"train": {"mode": "routers"}, "model_config": model_config}))
    refused(invoke("report", run), "judges 1x32x32 images", "makes 1x8x8 images", "--classifier")
    assert sorted(p.name for p in run.iterdir()) == ["artifact", "run.json"]


def test_messages_name_the_flag_a_person_typed():
    from diffcr.cli.common import with_flag_names

    assert (
        with_flag_names("label_drop_prob=nan must be in [0, 1)") == "--drop-prob: label_drop_prob=nan must be in [0, 1)"
    )
    assert with_flag_names("ratio_loss_weight=1e+30 must be in [0, 10000]").startswith("--lambda: ratio_loss_weight=")
    assert with_flag_names("the folder x is missing") == "the folder x is missing"
