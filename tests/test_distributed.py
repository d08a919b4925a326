"""Two CPU processes under `accelerate launch`: identical weights on both ranks, and sharded sampling that
gives exactly the images one process makes."""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffcr.sampling import SampleConfig, class_labels, sample_images


@pytest.mark.slow
def test_two_process_training_and_sharded_sampling(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate's launcher is installed with the package"
    worker = Path(__file__).parent / "distributed_worker.py"
    with socket.socket() as probe:  # a free port, so that a port still closing from an earlier run cannot clash
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    subprocess.run(
        # on a CPU-only machine `--multi_gpu` is accelerate's torchrun launcher; the processes form a gloo group
        [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(port),
            str(worker),
            str(tmp_path),
        ],
        check=True,
        timeout=600,
    )
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["world"] == 2 and rank0["digest"] == rank1["digest"]
    assert "images" in rank0 and "images" not in rank1
    # one process, the same seeds: the same images
    sys.path.insert(0, str(Path(__file__).parent))
    import diffcr
    from diffcr.train import train
    from test_training import config, tiny_base, tiny_data

    cfg = config(mode="full", steps=3, freeze_schedule_at=1)
    single = train(tmp_path / "single", tiny_base(), tiny_data(), cfg, progress=False)
    diffcr.freeze(single.model)
    images = sample_images(single.model.eval(), class_labels([1, 2, 3], 1), SampleConfig(steps=2, batch_size=2), 10)
    torch.testing.assert_close(torch.tensor(rank0["images"]), images.flatten(), atol=1e-4, rtol=0)
