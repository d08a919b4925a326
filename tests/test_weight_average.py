"""TrainConfig.average_from: the model a run returns is the mean of its weights at the chosen steps, the
checkpoints keep the weights as trained, and a resumed run ends on the same mean as a straight one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from diffcr.checkpoint import CheckpointError, latest_checkpoint
from diffcr.train import TrainConfig, train
from diffcr.train.averaging import takes_sample
from test_training import tiny_base, tiny_data


def config(**changes) -> TrainConfig:
    base = dict(mode="pretrain", steps=6, batch_size=8, checkpoint_every=2, lr=1e-2)
    return TrainConfig(**{**base, **changes})


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def weights_after_each_step(tmp_path, steps) -> dict[int, dict[str, torch.Tensor]]:
    """The weights of a plain run after each of `steps`, by resuming it step stretch by stretch (bit for bit)."""
    out = {}
    for i, step in enumerate(steps):
        result = train(tmp_path / "plain", tiny_base(), tiny_data(), config(steps=step), resume=i > 0, progress=False)
        out[step] = weights(result.model)
    return out


def test_takes_sample_at_checkpoint_steps_from_average_from():
    assert [s for s in range(1, 12) if takes_sample(s, average_from=4, checkpoint_every=3)] == [6, 9]
    assert not any(takes_sample(s, average_from=0, checkpoint_every=1) for s in range(1, 12))


def test_returned_model_is_the_mean_of_the_weights_at_the_averaged_steps(tmp_path):
    plain = weights_after_each_step(tmp_path, [2, 4, 6])
    result = train(tmp_path / "avg", tiny_base(), tiny_data(), config(average_from=3), progress=False)
    assert result.averaged_steps == (4, 6)
    for name, value in weights(result.model).items():
        expected = (plain[4][name] + plain[6][name]) / 2
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
        assert not torch.equal(plain[4][name], plain[6][name]) or name.endswith("bias")
    # averaging does not change training: the checkpoint holds the weights after step 6, and the mean beside them
    ckpt = latest_checkpoint(tmp_path / "avg")
    trained = load_file(str(ckpt / "trainable.safetensors"))
    assert all(torch.equal(trained[name], plain[6][name]) for name in trained)
    mean = load_file(str(ckpt / "average.safetensors"))
    assert all(torch.equal(mean[name], weights(result.model)[name]) for name in mean)
    assert json.loads((ckpt / "state.json").read_text())["average_steps"] == [4, 6]


def test_without_average_from_the_last_weights_are_returned(tmp_path):
    plain = weights_after_each_step(tmp_path, [6])
    result = train(tmp_path / "r", tiny_base(), tiny_data(), config(), progress=False)
    assert result.averaged_steps == ()
    assert all(torch.equal(value, plain[6][name]) for name, value in weights(result.model).items())
    assert not (latest_checkpoint(tmp_path / "r") / "average.safetensors").exists()


def test_resumed_run_ends_on_the_same_mean_as_a_straight_one(tmp_path):
    straight = train(tmp_path / "a", tiny_base(), tiny_data(), config(steps=8, average_from=2), progress=False)
    train(tmp_path / "b", tiny_base(), tiny_data(), config(steps=8, average_from=2, max_minutes=1e-9), progress=False)
    assert json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())["average_steps"] == []
    train(tmp_path / "b", tiny_base(), tiny_data(), config(steps=4, average_from=2), resume=True, progress=False)
    resumed = train(
        tmp_path / "b", tiny_base(seed=3), tiny_data(), config(steps=8, average_from=2), resume=True, progress=False
    )
    assert straight.averaged_steps == resumed.averaged_steps == (2, 4, 6, 8)
    for name, value in weights(straight.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name


def test_last_step_joins_the_returned_mean_but_not_the_kept_one(tmp_path):
    # 5 steps straight: checkpoint steps 2 and 4, and the last, 5
    straight = train(tmp_path / "a", tiny_base(), tiny_data(), config(steps=5, average_from=2), progress=False)
    assert straight.averaged_steps == (2, 4, 5)
    # 3 steps, then resumed to 5: step 3 ended the first call but is no checkpoint step of the longer run
    first = train(tmp_path / "b", tiny_base(), tiny_data(), config(steps=3, average_from=2), progress=False)
    assert first.averaged_steps == (2, 3)
    assert json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())["average_steps"] == [2]
    resumed = train(
        tmp_path / "b", tiny_base(), tiny_data(), config(steps=5, average_from=2), resume=True, progress=False
    )
    assert resumed.averaged_steps == (2, 4, 5)
    for name, value in weights(straight.model).items():
        assert torch.equal(value, weights(resumed.model)[name]), name
    # a run that stops before average_from returns its last weights
    early = train(
        tmp_path / "c", tiny_base(), tiny_data(), config(steps=6, average_from=4, max_minutes=1e-9), progress=False
    )
    assert early.steps_done == 1 and early.averaged_steps == ()


def test_lora_mode_refuses_averaging():
    with pytest.raises(ValueError, match="mode 'lora'"):
        config(mode="lora", average_from=2)


def test_average_of_another_model_is_refused_on_resume(tmp_path):
    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4, average_from=2), progress=False)
    ckpt = latest_checkpoint(tmp_path / "r")
    mean = load_file(str(ckpt / "average.safetensors"))
    name = sorted(mean)[0]
    mean[name] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(mean, str(ckpt / "average.safetensors"))
    with pytest.raises(ValueError, match="does not match this model"):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=6, average_from=2), resume=True, progress=False)


def test_average_from_is_checked_and_may_not_change_on_resume(tmp_path):
    with pytest.raises(ValueError, match="after the last step"):
        config(steps=6, average_from=7)
    with pytest.raises(ValueError, match=r"average_from=-1 is outside"):
        config(average_from=-1)
    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4, average_from=2), progress=False)
    with pytest.raises(ValueError, match=r"differs in \['average_from'\]"):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=6, average_from=4), resume=True, progress=False)


def test_resume_refuses_a_checkpoint_without_the_average_it_needs(tmp_path):
    # a run written before weight averaging existed: its run.json has no average_from
    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4), progress=False)
    run_file = tmp_path / "r" / "run.json"
    saved = json.loads(run_file.read_text())
    del saved["train"]["average_from"]
    run_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="written without a weight average"):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=6, average_from=2), resume=True, progress=False)
    # from a step after the checkpoint's, the average can start: nothing before it is missing
    later = config(steps=6, average_from=5)
    result = train(tmp_path / "r", tiny_base(), tiny_data(), later, resume=True, progress=False)
    assert result.averaged_steps == (6,)


def test_damaged_average_is_named(tmp_path):
    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4, average_from=2), progress=False)
    (latest_checkpoint(tmp_path / "r") / "average.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="average.safetensors"):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=6, average_from=2), resume=True, progress=False)


def _written_is_the_checkpoint_mean(written: dict[str, torch.Tensor], run_dir, prefix: str = "") -> None:
    ckpt = latest_checkpoint(run_dir)
    mean = load_file(str(ckpt / "average.safetensors"))
    trained = load_file(str(ckpt / "trainable.safetensors"))
    assert json.loads((ckpt / "state.json").read_text())["average_steps"] == [1, 2]
    assert set(mean) == {prefix + name for name in written}
    assert all(torch.equal(written[name], mean[prefix + name]) for name in written)
    assert any(not torch.equal(written[name], trained[prefix + name]) for name in written)


@pytest.mark.parametrize("task", ["class", "t2i"])
def test_pretrain_cli_writes_the_averaged_weights(task, tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app

    out = tmp_path / "run"
    args = ["pretrain", "--task", task, "--out", str(out), "--steps", "2", "--batch-size", "2", "--num-layers", "1",
            "--checkpoint-every", "1", "--average-from", "1", "--warmup-steps", "0", "--lr", "1e-2"]  # fmt: skip
    if task == "t2i":
        args += ["--vae-steps", "1", "--width", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    if task == "class":
        assert "the mean of the weights at steps 1-2, 2 checkpoints" in " ".join(result.output.split())
        written = load_file(str(out / "model" / "diffusion_pytorch_model.safetensors"))
        _written_is_the_checkpoint_mean(written, out)
    else:
        written = load_file(str(out / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
        _written_is_the_checkpoint_mean(written, out / "transformer_run")
