"""The trainer: ratios move toward the target, what trains and what does not, exact resume, clear failures."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import diffcr
from diffcr.checkpoint import latest_checkpoint, load_checkpoint
from diffcr.data.mnist import ImageDataset
from diffcr.models import build_base_model
from diffcr.ratios import snap_to_bin
from diffcr.train import TrainConfig, TrainingDiverged, train


def tiny_base(num_layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_base_model(num_layers=num_layers, num_attention_heads=2, attention_head_dim=8, sample_size=8)


def tiny_data(n: int = 64, seed: int = 0) -> ImageDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=gen) * 2 - 1
    labels = torch.randint(0, 10, (n,), generator=gen)
    return ImageDataset(images, labels, tuple(str(i) for i in range(10)))


def config(**changes) -> TrainConfig:
    base = dict(mode="routers", steps=4, batch_size=8, checkpoint_every=2, lr=1e-3, router_lr=1e-2, ratio_lr=5e-2)
    return TrainConfig(**{**base, **changes})


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_kept_ratio_moves_toward_target_and_ratio_loss_falls(tmp_path):
    result = train(
        tmp_path / "run",
        tiny_base(),
        tiny_data(),
        config(steps=8),
        diffcr_config=diffcr.DiffCRConfig(target_kept_ratio=0.3, timestep_regions=2),
        progress=False,
    )
    log = rows(tmp_path / "run")
    assert len(log) == 8 and [r["step"] for r in log] == list(range(1, 9))
    assert log[0]["mean_kept_ratio"] == pytest.approx(1.0)
    assert log[-1]["mean_kept_ratio"] < 0.8
    assert log[-1]["ratio_loss"] < 0.5 * log[0]["ratio_loss"]
    assert result.model.diffcr.kept_ratio.max().item() < 1.0
    for name in ("run.json", "latest", "metrics.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["train"]["mode"] == "routers" and run["diffcr"]["target_kept_ratio"] == 0.3


def test_ratios_get_their_own_lr_and_no_weight_decay(tmp_path):
    from diffcr.train.loop import _build_optimizer, prepare_model

    model = prepare_model(tiny_base(), config(mode="full", weight_decay=0.1), diffcr.DiffCRConfig())
    optimizer = _build_optimizer(model, config(mode="full", weight_decay=0.1))
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["ratio"]["params"] == [model.diffcr.kept_ratio]
    assert groups["ratio"]["weight_decay"] == 0.0 and groups["ratio"]["lr"] == 5e-2
    assert groups["router"]["weight_decay"] == 0.1 and groups["base"]["weight_decay"] == 0.1
    # with no gradient on the ratios (lambda 0, dense forward), decay alone would move them: it must not
    model.diffcr.kept_ratio.grad = torch.zeros_like(model.diffcr.kept_ratio)
    before = model.diffcr.kept_ratio.detach().clone()
    optimizer.step()
    assert torch.equal(model.diffcr.kept_ratio.detach(), before)


def test_routers_mode_leaves_base_weights_unchanged(tmp_path):
    model = tiny_base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(tmp_path / "run", model, tiny_data(), config(steps=3), progress=False)
    after = result.model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert result.model.diffcr.kept_ratio.max().item() < 1.0  # while the ratios did train
    ckpt = load_checkpoint(latest_checkpoint(tmp_path / "run"))[0]
    assert set(ckpt) == {f"diffcr.routers.{i}.weight" for i in range(2)} | {"diffcr.kept_ratio"}


def test_full_and_lora_modes_train_the_right_parameters(tmp_path):
    full = train(tmp_path / "full", tiny_base(), tiny_data(), config(mode="full", steps=1), progress=False)
    assert all(p.requires_grad for p in full.model.parameters())
    lora = train(tmp_path / "lora", tiny_base(), tiny_data(), config(mode="lora", steps=2, lora_rank=4), progress=False)
    trainable = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and "diffcr.kept_ratio" in trainable
    assert not any(n.endswith("to_q.base_layer.weight") for n in trainable)
    from diffcr.train import finish_compression, load_compressed

    written = finish_compression(lora.model, tmp_path / "lora", "lora")
    merged = load_compressed(written["model"], written["model"])
    assert not any("lora" in name for name, _ in merged.named_parameters())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(x, timestep=t, class_labels=y).sample,
            lora.model.eval()(x, timestep=t, class_labels=y).sample,
            atol=1e-5,
            rtol=1e-5,
        )


def test_resume_is_bit_for_bit(tmp_path):
    straight = train(tmp_path / "a", tiny_base(), tiny_data(), config(mode="full", steps=4), progress=False)
    train(tmp_path / "b", tiny_base(), tiny_data(), config(mode="full", steps=2), progress=False)
    resumed = train(
        tmp_path / "b", tiny_base(seed=5), tiny_data(), config(mode="full", steps=4), resume=True, progress=False
    )
    assert resumed.steps_done == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    opt_a = load_file(str(latest_checkpoint(tmp_path / "a") / "optimizer.safetensors"))
    opt_b = load_file(str(latest_checkpoint(tmp_path / "b") / "optimizer.safetensors"))
    assert opt_a.keys() == opt_b.keys() and all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    assert [r["step"] for r in rows(tmp_path / "b")] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows(tmp_path / "b")] == [r["loss"] for r in rows(tmp_path / "a")]


def test_existing_run_needs_resume_and_matching_config(tmp_path):
    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=2), progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=2), progress=False)
    with pytest.raises(ValueError, match=r"differs in \['weight_decay'\]"):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4, weight_decay=0.5), resume=True, progress=False)
    # learning rates may change on resume: that is how a diverged run is continued
    resumed = train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=3, lr=0.5), resume=True, progress=False)
    assert resumed.steps_done == 3


def test_checkpoint_of_another_model_is_refused(tmp_path):
    train(tmp_path / "r", tiny_base(num_layers=2), tiny_data(), config(steps=2), progress=False)
    with pytest.raises(ValueError, match="the base model's config differs"):
        train(tmp_path / "r", tiny_base(num_layers=3), tiny_data(), config(steps=4), resume=True, progress=False)
    with pytest.raises(ValueError, match="the DiffCR config differs"):
        train(
            tmp_path / "r",
            tiny_base(num_layers=2),
            tiny_data(),
            config(steps=4),
            resume=True,
            progress=False,
            diffcr_config=diffcr.DiffCRConfig(target_kept_ratio=0.3),
        )


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path):
    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=2), progress=False)
    good = latest_checkpoint(tmp_path / "r")
    good_bytes = (good / "trainable.safetensors").read_bytes()
    poisoned = tiny_base()  # routers mode: a NaN in a frozen base weight makes the loss NaN
    with torch.no_grad():
        poisoned.proj_out_2.bias.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 2.*resumed from .*checkpoint-0000002"):
        train(tmp_path / "r", poisoned, tiny_data(), config(steps=4), resume=True, progress=False)
    assert latest_checkpoint(tmp_path / "r") == good
    assert (good / "trainable.safetensors").read_bytes() == good_bytes


def test_non_finite_gradient_stops_before_the_update(tmp_path, monkeypatch):
    model = tiny_base()
    train(tmp_path / "r", model, tiny_data(), config(steps=2, mode="full"), progress=False)
    good = latest_checkpoint(tmp_path / "r")
    fresh = tiny_base()
    # a finite loss whose gradient is infinite: a hook poisons one gradient
    fresh.proj_out_2.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(TrainingDiverged, match="gradient norm became inf at step 2"):
        train(tmp_path / "r", fresh, tiny_data(), config(steps=4, mode="full"), resume=True, progress=False)
    assert torch.isfinite(fresh.proj_out_2.weight).all()
    assert latest_checkpoint(tmp_path / "r") == good


def test_ratios_stay_inside_the_bins_range(tmp_path):
    # lambda 0 and a large ratio lr: only the diffusion loss moves the ratios; projection keeps them in range
    result = train(
        tmp_path / "r",
        tiny_base(),
        tiny_data(),
        config(steps=3, ratio_lr=5.0),
        progress=False,
        diffcr_config=diffcr.DiffCRConfig(ratio_loss_weight=0.0, target_kept_ratio=0.25, ratio_bins=(1.0, 0.5, 0.25)),
    )
    kept = result.model.diffcr.kept_ratio
    assert kept.min().item() >= 0.25 and kept.max().item() <= 1.0


def test_interrupted_checkpoint_write_leaves_previous_one(tmp_path, monkeypatch):
    import diffcr.checkpoint as checkpoint

    train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=2), progress=False)
    good = latest_checkpoint(tmp_path / "r")
    real_save = checkpoint.save_file

    def killed_mid_write(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            raise KeyboardInterrupt("killed while writing")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4), resume=True, progress=False)
    assert latest_checkpoint(tmp_path / "r") == good
    assert sorted(p.name for p in (tmp_path / "r").glob("checkpoint-*")) == [good.name]
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    resumed = train(tmp_path / "r", tiny_base(), tiny_data(), config(steps=4), resume=True, progress=False)
    assert resumed.steps_done == 4


def test_distillation_matches_the_dense_teacher(tmp_path):
    result = train(tmp_path / "d", tiny_base(), tiny_data(), config(steps=2, distill=True), progress=False)
    first = rows(tmp_path / "d")[0]
    # at step 1 the student is the teacher (kept ratio 1.0, straight-through gate): the loss is the ratio term
    assert first["diffusion_loss"] < 1e-9
    assert diffcr.is_applied(result.model)


def test_pretrain_mode_trains_a_dense_model(tmp_path):
    result = train(tmp_path / "p", tiny_base(), tiny_data(), config(mode="pretrain", steps=2), progress=False)
    assert not diffcr.is_applied(result.model)
    assert "ratio_loss" not in rows(tmp_path / "p")[0]


def test_bad_train_config():
    with pytest.raises(ValueError, match="mode='fast' is not one of"):
        TrainConfig(mode="fast")
    with pytest.raises(ValueError, match="distill needs a DiffCR mode"):
        TrainConfig(mode="pretrain", distill=True)
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"stepz": 3})


def test_cosine_lr_schedule_decays_every_group_to_zero(tmp_path):
    import math

    from diffcr.train.loop import _lr_factor

    cosine = config(steps=10, warmup_steps=2, lr_schedule="cosine")
    factors = [_lr_factor(step, cosine) for step in range(10)]
    assert factors[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(0)))  # warmup 1/2, decay not begun
    assert factors[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a > b for a, b in zip(factors[1:], factors[2:])) and factors[-1] < 0.03
    assert [_lr_factor(step, config(steps=10, warmup_steps=2)) for step in (0, 1, 9)] == [0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_schedule='linear' must be one of"):
        config(lr_schedule="linear")
    # in a run, every group (routers and kept ratios too) took the last step's factor
    result = train(
        tmp_path / "run",
        tiny_base(),
        tiny_data(),
        config(steps=4, lr_schedule="cosine", ratio_lr=0.5),
        diffcr_config=diffcr.DiffCRConfig(target_kept_ratio=0.3, timestep_regions=1),
        progress=False,
    )
    assert result.steps_done == 4
    _, _, described, _ = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    last = 0.5 * (1 + math.cos(math.pi * 3 / 4))  # the factor of the last update (step 3 of 4)
    for group in described["param_groups"]:
        assert group["lr"] == pytest.approx(group["initial_lr"] * last), group["name"]


def _count_block_passes(monkeypatch) -> list[int]:
    """Patch the adapters' `routed_forward` to count its calls (one per pass of a routed block)."""
    import diffcr.adapters.base as adapter_base

    calls = []
    real = adapter_base.routed_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter_base, "routed_forward", counting)
    return calls


def test_freeze_schedule_at_fixes_the_ratios_and_keeps_training_the_routers(tmp_path, monkeypatch):
    regions = diffcr.DiffCRConfig(target_kept_ratio=0.4, timestep_regions=2)

    def run(name: str, steps: int, resume: bool = False):
        cfg = config(mode="full", steps=steps, ratio_lr=0.2, freeze_schedule_at=min(steps, 3))
        done = train(tmp_path / name, tiny_base(), tiny_data(), cfg, regions, resume=resume, progress=False)
        return {key: tensor.detach().clone() for key, tensor in done.model.named_parameters()}, done.model

    table = "diffcr.kept_ratio"
    at_2, _ = run("two", 2)
    at_3, _ = run("run", 3)
    calls = _count_block_passes(monkeypatch)
    at_5, model = run("run", 5, resume=True)
    # the ratios learned until step 3, then stayed exactly where they were; they run snapped to their bins
    assert not torch.equal(at_2[table], at_3[table])
    assert torch.equal(at_3[table], at_5[table])
    assert diffcr.is_frozen(model)
    bins = model.diffcr.config.ratio_bins
    expected = [[snap_to_bin(value, bins) for value in row] for row in at_3[table].tolist()]
    assert model.diffcr.frozen_schedule == expected == diffcr.schedule(model).kept_ratio
    assert min(min(row) for row in expected) < 1.0
    # the routers and the weights went on training
    changed = [name for name in at_3 if not torch.equal(at_3[name], at_5[name])]
    assert set(changed) == set(at_3) - {table}
    # training at the fixed schedule runs one pass per routed block (the blended steps ran two)
    assert len(calls) > 0
    calls.clear()
    model.zero_grad(set_to_none=True)
    batch = tiny_data()
    timestep = torch.tensor([10, 20])  # both in region 0 of 2
    model(batch.images[:2], timestep=timestep, class_labels=batch.labels[:2]).sample.square().mean().backward()
    assert model.training and len(calls) == sum(1 for row in expected if row[0] < 1.0)
    assert model.diffcr.kept_ratio.grad is None  # the table is out of the forward
    routed_layer = next(layer for layer, row in enumerate(expected) if row[0] < 1.0)
    assert model.diffcr.routers[routed_layer].weight.grad.abs().sum() > 0  # its router still learns


def test_freeze_schedule_at_resumes_bit_for_bit(tmp_path):
    regions = diffcr.DiffCRConfig(target_kept_ratio=0.4, timestep_regions=2)
    straight = train(
        tmp_path / "a", tiny_base(), tiny_data(), config(mode="full", steps=4, freeze_schedule_at=2),
        diffcr_config=regions, progress=False,
    )  # fmt: skip
    train(
        tmp_path / "b", tiny_base(), tiny_data(), config(mode="full", steps=2, freeze_schedule_at=2),
        diffcr_config=regions, progress=False,
    )  # fmt: skip
    resumed = train(
        tmp_path / "b", tiny_base(seed=5), tiny_data(), config(mode="full", steps=4, freeze_schedule_at=2),
        diffcr_config=regions, resume=True, progress=False,
    )  # fmt: skip
    assert resumed.model.diffcr.frozen_schedule == straight.model.diffcr.frozen_schedule
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert [r["loss"] for r in rows(tmp_path / "b")] == [r["loss"] for r in rows(tmp_path / "a")]
    with pytest.raises(ValueError, match=r"differs in \['freeze_schedule_at'\]"):
        train(
            tmp_path / "b", tiny_base(), tiny_data(), config(mode="full", steps=6, freeze_schedule_at=3),
            diffcr_config=regions, resume=True, progress=False,
        )  # fmt: skip


def test_freeze_schedule_at_is_checked():
    with pytest.raises(ValueError, match="freeze_schedule_at=5 is after the last step"):
        config(steps=4, freeze_schedule_at=5)
    with pytest.raises(ValueError, match="freeze_schedule_at=2 freezes DiffCR's kept ratios, which pretraining"):
        config(mode="pretrain", freeze_schedule_at=2)
    with pytest.raises(ValueError, match=r"freeze_schedule_at=-1 is outside"):
        config(freeze_schedule_at=-1)
    # an average from before the freeze would mix tables, so the artifact could ship other bins than it trained at
    with pytest.raises(ValueError, match="give average_from >= 3"):
        config(steps=4, freeze_schedule_at=3, average_from=2)
    assert config(steps=4, freeze_schedule_at=3, average_from=3).average_from == 3


def test_a_step_whose_samples_all_fall_in_a_dense_region_touches_every_parameter():
    """Under DDP every process must give every registered parameter a gradient: samples that all fall in a region
    whose target is 1.0 use no kept ratio and skip no block, so the step's loss adds a zero that touches them."""
    from diffcr.train.loop import _routed_loss

    config = diffcr.DiffCRConfig(
        timestep_regions=2, target_kept_ratio=0.75, region_targets=(1.0, 0.5), region_coupling=False
    )
    model = diffcr.apply(tiny_base(), config)
    model.train()
    images = torch.randn(2, 1, 8, 8)
    out = model(images, timestep=torch.tensor([100, 200]), class_labels=torch.tensor([1, 2])).sample  # region 0
    loss, _, mean_kept = _routed_loss(model, model, out.pow(2).mean(), ratio_weight=1.0)
    loss.backward()
    assert mean_kept == 1.0
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    assert trainable and all(param.grad is not None for param in model.parameters() if param.requires_grad)
    assert (model.diffcr.kept_ratio.grad == 0).all()
