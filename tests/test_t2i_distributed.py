"""Text-to-image under `accelerate launch` with two CPU processes: compress on a prepared cache, then sharded
sampling through the pipeline gives exactly the images one process makes."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from diffcr.cli import app
from t2i_helpers import build_tiny_pixart_pipeline, write_caption_folder


def launch(*args, timeout: int = 600):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               "-m", "diffcr.cli", *map(str, args)]  # fmt: skip
    subprocess.run(command, check=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_text_to_image(tmp_path):
    runner = CliRunner()
    pipe = build_tiny_pixart_pipeline(tmp_path / "pipe")
    data = write_caption_folder(tmp_path / "data", count=4)
    assert (
        runner.invoke(
            app, ["prepare", "--base", str(pipe), "--data", str(data), "--out", str(tmp_path / "c")]
        ).exit_code
        == 0
    )
    launch("compress", "--base", pipe, "--data", tmp_path / "c", "--out", tmp_path / "run", "--mode", "routers",
           "--steps", 2, "--batch-size", 4, "--target", 0.5, "--ratio-lr", 0.3)  # fmt: skip
    artifact = tmp_path / "run" / "artifact"
    assert (artifact / "diffcr_weights.safetensors").is_file()
    sample = ["sample", "--base", pipe, "--artifact", artifact, "--prompt", "a cat on the left", "--num", 3,
              "--steps", 2, "--batch-size", 1]  # fmt: skip
    launch(*sample, "--out", tmp_path / "two.png", "--npz", tmp_path / "two.npz")
    result = runner.invoke(
        app, [str(a) for a in [*sample, "--out", tmp_path / "one.png", "--npz", tmp_path / "one.npz"]]
    )
    assert result.exit_code == 0, result.output
    two, one = np.load(tmp_path / "two.npz"), np.load(tmp_path / "one.npz")
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    assert two["prompts"].tolist() == one["prompts"].tolist()
