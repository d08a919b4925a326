"""Conformance suite every adapter passes: each test runs on tiny DiT, PixArt, SD3 and Flux models (the `case`
fixture; Flux's case holds both its double- and single-stream blocks)."""

from __future__ import annotations

import pytest
import torch

import diffcr
from conftest import all_blocks, image_of, run
from diffcr import DiffCRConfig

T_MIXED = [10, 300, 600, 900]  # one sample in each of 4 regions of [0, 1000)


def set_kept(model, table) -> None:
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.as_tensor(table, dtype=torch.float32).expand_as(model.diffcr.kept_ratio))


def count_block_tokens(model):
    """Record (layer, samples, image tokens) every block's MLP sees, per block call (the text stream of a joint
    block has its own MLP, `ff_context`). Consecutive calls of one layer with the same token count are one entry:
    Flux runs a routed block sample by sample (its rotary table follows each sample's tokens)."""
    seen: list[tuple[int, int, int]] = []
    text_len = {}  # layer -> text tokens of its current call

    def record(layer, tokens, text_tokens=0):
        batch, count = tokens.shape[0], tokens.shape[1] - text_tokens
        if seen and seen[-1][0] == layer and seen[-1][2] == count:
            batch += seen.pop()[1]
        seen.append((layer, batch, count))

    def remember_text(layer, args, kwargs):
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]  # (B, T, C)
        text_len[layer] = text.shape[1]

    for layer, block in enumerate(all_blocks(model)):
        if hasattr(block, "ff"):
            block.ff.register_forward_pre_hook(
                lambda mod, args, kwargs, layer=layer: record(layer, args[0]), with_kwargs=True
            )
            continue
        # Flux's single-stream block: its MLP (`proj_mlp`) sees the text tokens, then the block's image tokens
        block.register_forward_pre_hook(
            lambda mod, args, kwargs, layer=layer: remember_text(layer, args, kwargs), with_kwargs=True
        )
        block.proj_mlp.register_forward_pre_hook(lambda mod, args, layer=layer: record(layer, args[0], text_len[layer]))
    return seen


def mlp_gate_or_block(case) -> str:
    """gate="sigmoid_mlp" where every block has an `ff` MLP to gate, else "sigmoid_block" (Flux's single-stream
    blocks have none: `test_mlp_gate_without_an_mlp_is_refused`)."""
    return "sigmoid_mlp" if case.mlp_gate else "sigmoid_block"


def no_diffcr_hooks_or_state(model) -> bool:
    """No forward hook and no DiffCR attribute left on any submodule."""
    names = ("_diffcr_controller", "_diffcr_layer", "_diffcr_mlp_gate")
    return all(not m._forward_hooks and not any(n in m.__dict__ for n in names) for m in model.modules())


# -- equivalence at kept ratio 1.0 -------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg_batch"])
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_kept_ratio_one_matches_unpatched_model(case, cfg, train_mode):
    model = case.model()
    inputs = case.inputs(T_MIXED, cfg=cfg)
    with torch.no_grad():
        reference = run(model, inputs)
    diffcr.apply(model, DiffCRConfig(target_kept_ratio=0.5))
    model.train(train_mode)
    with torch.no_grad():
        routed = run(model, inputs)
    if train_mode:  # the 1.0 bin blended with weight 1 (and the 0.9 bin with weight 0)
        torch.testing.assert_close(routed, reference, atol=1e-6, rtol=0)
    else:  # no router call, no gather: the model's own blocks
        assert torch.equal(routed, reference)


def test_remove_restores_exactly(case):
    model = case.model()
    inputs = case.inputs(T_MIXED)
    keys = list(model.state_dict())
    classes = [type(b) for b in all_blocks(model)]
    with torch.no_grad():
        reference = run(model, inputs)
    diffcr.apply(model, DiffCRConfig())
    set_kept(model, 0.5)
    with torch.no_grad():
        assert not torch.equal(run(model, inputs), reference)
    assert [k for k in model.state_dict() if not k.startswith("diffcr.")] == keys
    diffcr.remove(model)
    assert list(model.state_dict()) == keys
    assert [type(b) for b in all_blocks(model)] == classes
    assert not model._forward_pre_hooks
    assert not diffcr.is_applied(model)
    with torch.no_grad():
        assert torch.equal(run(model, inputs), reference)
    diffcr.apply(model, DiffCRConfig())  # and it can be applied again
    assert diffcr.is_applied(model)


def test_remove_after_sigmoid_mlp_leaves_no_trace(case):
    model = case.model()
    diffcr.apply(model, DiffCRConfig(gate=mlp_gate_or_block(case)))
    set_kept(model, 0.5)
    with torch.no_grad():
        run(model, case.inputs(T_MIXED))
    diffcr.remove(model)
    assert no_diffcr_hooks_or_state(model)


def test_mlp_gate_without_an_mlp_is_refused(case):
    if case.mlp_gate:
        pytest.skip("every block of this family has an `ff` MLP")
    model = case.model()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"gate='sigmoid_mlp' gates a block's `ff` MLP, which blocks \[1, 2\]"):
        diffcr.apply(model, DiffCRConfig(gate="sigmoid_mlp"))
    assert list(model.state_dict()) == keys and not diffcr.is_applied(model) and no_diffcr_hooks_or_state(model)


def test_positional_call_finds_the_timestep(case):
    import inspect

    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4))
    set_kept(model, [[1.0, 0.75, 0.5, 0.25]])
    inputs = case.inputs(T_MIXED)
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    positional = [inputs.pop(name) if name in inputs else None for name in names[: names.index("timestep") + 1]]
    with torch.no_grad():
        by_position = model(*positional, **inputs).sample
        by_name = run(model, case.inputs(T_MIXED))
    assert torch.equal(by_position, by_name)


def test_apply_twice_raises(case):
    model = diffcr.apply(case.model())
    with pytest.raises(ValueError, match="already applied"):
        diffcr.apply(model)


def test_failed_apply_leaves_model_untouched(case, monkeypatch):
    model = case.model()
    keys = list(model.state_dict())
    classes = [type(b) for b in all_blocks(model)]
    real = diffcr.api.routed_class
    calls = []

    def fails_on_second_block(cls):
        calls.append(cls)
        if len(calls) == 2:
            raise RuntimeError("simulated failure half-way through apply")
        return real(cls)

    monkeypatch.setattr(diffcr.api, "routed_class", fails_on_second_block)
    with pytest.raises(RuntimeError, match="simulated"):
        diffcr.apply(model, DiffCRConfig(gate=mlp_gate_or_block(case)))
    assert list(model.state_dict()) == keys
    assert [type(b) for b in all_blocks(model)] == classes
    assert not model._forward_pre_hooks
    assert no_diffcr_hooks_or_state(model)
    assert not diffcr.is_applied(model)


def test_unsupported_model_names_supported_classes():
    with pytest.raises(TypeError, match="DiTTransformer2DModel.*PixArtTransformer2DModel"):
        diffcr.apply(torch.nn.Linear(2, 2))


# -- token counts, bypass, per-sample selection ------------------------------------------------------------
@pytest.mark.parametrize("kept", [0.5, 0.3, 0.8])
def test_blocks_see_exactly_num_kept_tokens(case, kept):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1))
    set_kept(model, kept)
    seen = count_block_tokens(model)
    with torch.no_grad():
        run(model, case.inputs([100, 700]))
    expected = -(-int(kept * 10) * case.num_tokens // 10)
    assert seen == [(layer, 2, expected) for layer in range(3)]


def test_bypassed_tokens_untouched_and_kept_idx_sorted(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1))
    set_kept(model, 0.5)
    captured = {}  # layer -> (input, output) image tokens, for every block kind

    def capture_in(mod, args, kwargs, layer):
        captured[layer] = (args[0] if args else kwargs["hidden_states"]).clone()

    def capture_out(mod, args, kwargs, output, layer):
        captured[layer] = (captured[layer], image_of(output).clone())

    for layer, block in enumerate(all_blocks(model)):
        block.register_forward_pre_hook(lambda m, a, k, layer=layer: capture_in(m, a, k, layer), with_kwargs=True)
        block.register_forward_hook(lambda m, a, k, o, layer=layer: capture_out(m, a, k, o, layer), with_kwargs=True)
    with torch.no_grad():
        run(model, case.inputs([100, 700, 300]))
    assert sorted(captured) == [0, 1, 2]
    for layer, (x, y) in captured.items():
        logits = model.diffcr.routers[layer](x).squeeze(-1)
        kept_idx = diffcr.routing.select_tokens(logits, case.num_tokens // 2)
        for b in range(x.shape[0]):
            assert torch.equal(kept_idx[b], kept_idx[b].unique(sorted=True))
            mask = torch.zeros(case.num_tokens, dtype=torch.bool)
            mask[kept_idx[b]] = True
            assert torch.equal(y[b, ~mask], x[b, ~mask])  # bit for bit
            assert not torch.allclose(y[b, mask], x[b, mask])  # computed


def test_selection_is_per_sample(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1))
    set_kept(model, 0.5)
    inputs = case.inputs([100, 700, 300], cfg=False)
    with torch.no_grad():
        together = run(model, inputs)
        for b in range(3):
            alone = run(model, _take(inputs, [b]))
            torch.testing.assert_close(alone[0], together[b], atol=1e-6, rtol=0)


def test_cfg_batch_routes_each_half_on_its_own(case):
    model = diffcr.apply(case.model(), DiffCRConfig())
    set_kept(model, [[0.9, 0.7, 0.5, 0.3]])
    inputs = case.inputs([100, 700, 100, 700], cfg=True)
    with torch.no_grad():
        stacked = run(model, inputs)
        cond = run(model, _take(inputs, [0, 1]))
        uncond = run(model, _take(inputs, [2, 3]))
    torch.testing.assert_close(stacked, torch.cat([cond, uncond]), atol=1e-6, rtol=0)


def _take(inputs: dict, idx: list[int]) -> dict:
    out = {}
    for key, value in inputs.items():  # Flux's position ids are shared by the batch
        out[key] = value[idx] if torch.is_tensor(value) and not key.endswith("_ids") else value
    return out


# -- timestep regions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_mixed_region_batch_equals_per_sample_runs(case, train_mode):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4))
    set_kept(model, [[1.0, 0.75, 0.45, 0.2]])
    model.train(train_mode)
    inputs = case.inputs(T_MIXED)
    with torch.no_grad():
        together = run(model, inputs)
        for b in range(4):
            alone = run(model, _take(inputs, [b]))
            torch.testing.assert_close(alone[0], together[b], atol=1e-6, rtol=0)


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
def test_pixart_padding_masks_that_differ_per_sample_equal_each_sample_alone(train_mode):
    """Captions of different lengths in one mixed-timestep batch: each sample's padded text tokens are masked by
    its own mask, so the batch gives each sample's output alone, and what sits in the padding does not matter."""
    from conftest import PixArtCase

    model = diffcr.apply(PixArtCase.model(), DiffCRConfig(timestep_regions=4))
    set_kept(model, [[1.0, 0.75, 0.45, 0.2]])
    model.train(train_mode)
    inputs = PixArtCase.inputs(T_MIXED)
    lengths = [5, 1, 3, 4]  # text tokens per sample; the rest is padding
    inputs["encoder_attention_mask"] = (torch.arange(5)[None] < torch.tensor(lengths)[:, None]).float()  # (4, 5)
    with torch.no_grad():
        together = run(model, inputs)
        for b in range(4):
            alone = run(model, _take(inputs, [b]))
            torch.testing.assert_close(alone[0], together[b], atol=1e-6, rtol=0)
        garbage = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
        for b, length in enumerate(lengths):
            garbage["encoder_hidden_states"][b, length:] = 100.0  # padding the masks must hide
        torch.testing.assert_close(run(model, garbage), together, atol=1e-5, rtol=0)


def test_regions_use_their_own_num_kept(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=2, ratio_bins=(1.0, 0.75, 0.5, 0.25)))
    set_kept(model, [[0.75, 0.25]])
    seen = count_block_tokens(model)
    with torch.no_grad():
        run(model, case.inputs([100, 900]))  # region 0 and region 1
    assert sorted(seen) == sorted([(layer, 1, 12) for layer in range(3)] + [(layer, 1, 4) for layer in range(3)])
    assert model.diffcr.used_kept_ratio().tolist() == [[0.75, 0.25]] * 3


def test_timestep_range_comes_from_config(case):
    if case.num_train_timesteps == 1:
        pytest.skip("Flux receives sigma in [0, 1]: a range of 100 does not apply")
    model = diffcr.apply(
        case.model(), DiffCRConfig(timestep_regions=2, num_train_timesteps=100, ratio_bins=(1.0, 0.75, 0.5, 0.25))
    )
    set_kept(model, [[0.75, 0.25]])
    with torch.no_grad():
        run(model, case.inputs([40, 60]))
    assert model.diffcr.used_kept_ratio()[0].tolist() == [0.75, 0.25]


# -- interpolation and gradients -----------------------------------------------------------------------------
def test_interpolation_blends_the_two_nearest_bins(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1, ratio_bins=(1.0, 0.9, 0.8, 0.7)))
    inputs = case.inputs([100, 700])
    block_out = {}
    all_blocks(model)[1].register_forward_hook(lambda m, a, out: block_out.__setitem__("y", image_of(out)))
    single = {}
    for kept in (0.9, 0.8):  # block 1 alone at each bin, one pass (eval)
        set_kept(model, [[1.0], [kept], [1.0]])
        with torch.no_grad():
            run(model.eval(), inputs)
        single[kept] = block_out["y"]
    set_kept(model, [[1.0], [0.85], [1.0]])
    with torch.no_grad():
        run(model.train(), inputs)
    # 0.85 is not exactly halfway in fp32 ((0.85 - 0.8) / 0.1 = 0.49999976): allow that much of the difference
    torch.testing.assert_close(block_out["y"], 0.5 * single[0.9] + 0.5 * single[0.8], atol=1e-5, rtol=0)
    assert not torch.allclose(single[0.9], single[0.8])


@pytest.mark.parametrize("coupled", [True, False])
def test_region_coupling_shares_each_layers_ratio_gradient(case, coupled):
    """Coupled, a region no sample falls in still learns its layer's share (0.25 g[l, r] + sum_r' g[l, r'] at
    region_offset_lr 0.25); uncoupled, it gets no gradient. The forward is the same either way."""
    config = DiffCRConfig(timestep_regions=4, target_kept_ratio=0.5, region_coupling=coupled, region_offset_lr=0.25)
    outputs, grads = [], []
    for coupling in (coupled, not coupled):
        torch.manual_seed(0)
        model = diffcr.apply(case.model(), config.replace(region_coupling=coupling))
        set_kept(model, [[0.85, 0.75, 0.65, 0.55]])
        model.train()
        out = run(model, case.inputs([100, 600]))  # regions 0 and 2 only
        (out.pow(2).mean() + 0.3 * diffcr.ratio_loss(model)).backward()
        outputs.append(out.detach())
        grads.append(model.diffcr.kept_ratio.grad.clone())
    assert torch.equal(outputs[0], outputs[1])
    coupled_grad, plain_grad = (grads[0], grads[1]) if coupled else (grads[1], grads[0])
    assert (plain_grad[:, [1, 3]] == 0).all() and (plain_grad[:, [0, 2]] != 0).all()
    expected = 0.25 * plain_grad + plain_grad.sum(dim=1, keepdim=True)  # (L, R)
    torch.testing.assert_close(coupled_grad, expected, rtol=1e-5, atol=1e-7)
    assert (coupled_grad[:, [1, 3]] != 0).all()


def test_region_offset_lr_zero_moves_every_region_with_its_layer():
    """At region_offset_lr 0 the regions of a layer get one gradient: an LT table trains as DiffCR-L's ratios."""
    from diffcr.controller import couple_regions

    table = torch.tensor([[0.9, 0.8, 0.7]], requires_grad=True)
    coupled = couple_regions(table, 0.0)
    assert torch.equal(coupled, table.detach())
    (coupled * torch.tensor([[1.0, -3.0, 0.5]])).sum().backward()
    assert table.grad.tolist() == [[-1.5, -1.5, -1.5]]


def test_region_coupling_is_off_for_layer_ratios_and_in_eval(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1, target_kept_ratio=0.5))
    assert model.diffcr() is model.diffcr.kept_ratio  # one region: nothing to share
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4, target_kept_ratio=0.5))
    with torch.no_grad():
        assert model.diffcr() is model.diffcr.kept_ratio


@pytest.mark.parametrize("gate", ["straight_through", "sigmoid_block", "sigmoid_mlp"])
def test_gradients_reach_router_and_ratios_not_frozen_base(case, gate):
    if gate == "sigmoid_mlp" and not case.mlp_gate:
        pytest.skip("refused without an `ff` MLP: test_mlp_gate_without_an_mlp_is_refused")
    model = diffcr.apply(case.model(), DiffCRConfig(gate=gate, timestep_regions=2, target_kept_ratio=0.5))
    groups = diffcr.parameter_groups(model)
    for param in groups["base"]:
        param.requires_grad_(False)
    set_kept(model, [[0.85, 0.55]])
    model.train()
    out = run(model, case.inputs([100, 700, 200]))
    loss = out.pow(2).mean() + 0.3 * diffcr.ratio_loss(model)
    loss.backward()
    for router in model.diffcr.routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert model.diffcr.kept_ratio.grad is not None
    assert (model.diffcr.kept_ratio.grad != 0).all()
    assert all(p.grad is None for p in groups["base"])
    ids = {id(p) for g in groups.values() for p in g}
    assert len(ids) == sum(1 for _ in model.parameters())


def test_ratio_loss_is_squared_gap_of_used_ratios(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=2, target_kept_ratio=0.5))
    set_kept(model, [[0.9, 0.3], [0.8, 0.4], [0.7, 0.6]])
    model.train()
    run(model, case.inputs([100, 100, 900]))
    used = torch.tensor([[0.9, 0.9, 0.3], [0.8, 0.8, 0.4], [0.7, 0.7, 0.6]])
    assert diffcr.ratio_loss(model).item() == pytest.approx((used.mean().item() - 0.5) ** 2)
    assert diffcr.ratio_loss(model, target=0.9).item() == pytest.approx((used.mean().item() - 0.9) ** 2)
    assert diffcr.mean_kept_ratio_used(model) == pytest.approx(used.mean().item())


def test_region_targets_pull_each_sample_to_its_own_regions_target(case):
    """With a target per timestep region, the ratio loss is the mean over samples of (the mean over blocks of a
    sample's kept ratios - its region's target)^2, and its gradient raises a region under its target and lowers
    one over it."""
    config = DiffCRConfig(timestep_regions=2, target_kept_ratio=0.6, region_targets=(0.9, 0.3), region_coupling=False)
    model = diffcr.apply(case.model(), config)
    set_kept(model, [[0.9, 0.3], [0.8, 0.4], [0.7, 0.6]])
    model.train()
    run(model, case.inputs([100, 100, 900]))
    sample_means = torch.tensor([0.8, 0.8, (0.3 + 0.4 + 0.6) / 3])  # region 0, region 0, region 1
    expected = ((sample_means - torch.tensor([0.9, 0.9, 0.3])) ** 2).mean()
    loss = diffcr.ratio_loss(model)
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    grad = model.diffcr.kept_ratio.grad  # (L, 2)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()  # region 0 under its 0.9, region 1 over its 0.3
    # a target passed in still means one target for the mean of every block and sample
    used = torch.tensor([[0.9, 0.9, 0.3], [0.8, 0.8, 0.4], [0.7, 0.7, 0.6]])
    assert diffcr.ratio_loss(model, target=0.9).item() == pytest.approx((used.mean().item() - 0.9) ** 2)


def test_a_region_whose_target_is_one_runs_dense_in_one_pass_and_learns_nothing(case):
    """Region 0's target is the top bin: whatever its learnable values, training runs each block once on every
    token there (a blended ratio runs two passes), its ratios get no gradient, and eval, the schedule and
    `freeze` keep it at 1.0."""
    config = DiffCRConfig(timestep_regions=2, target_kept_ratio=0.75, region_targets=(1.0, 0.5), region_coupling=False)
    model = diffcr.apply(case.model(), config)
    set_kept(model, [[0.75, 0.75]])
    model.train()
    seen = count_block_tokens(model)
    run(model, case.inputs([100, 100]))  # both samples in region 0
    assert seen == [(layer, 2, case.num_tokens) for layer in range(3)]
    assert model.diffcr.used_kept_ratio().tolist() == [[1.0, 1.0]] * 3
    seen.clear()
    run(model, case.inputs([900, 900]))  # region 1 blends its two bins around 0.75: 0.8 and 0.7 of 16
    samples_per_pass = {}  # (layer, tokens) -> samples (Flux runs a routed block sample by sample)
    for layer, samples, count in seen:
        samples_per_pass[layer, count] = samples_per_pass.get((layer, count), 0) + samples
    assert samples_per_pass == {(layer, count): 2 for layer in range(3) for count in (13, 12)}
    out = run(model, case.inputs([100, 900]))
    (out.pow(2).mean() + diffcr.ratio_loss(model)).backward()
    grad = model.diffcr.kept_ratio.grad  # (L, 2)
    assert (grad[:, 0] == 0).all() and (grad[:, 1] != 0).all()
    assert diffcr.schedule(model).kept_ratio == [[1.0, 0.8]] * 3
    assert diffcr.schedule(model).continuous == [[1.0, 0.75]] * 3
    diffcr.freeze(model)
    assert diffcr.schedule(model).kept_ratio == [[1.0, 0.8]] * 3


def test_ratio_loss_before_forward_raises(case):
    model = diffcr.apply(case.model())
    with pytest.raises(RuntimeError, match="no complete forward"):
        diffcr.ratio_loss(model)


def test_sigmoid_mlp_scales_only_the_mlp_update(case):
    if not case.mlp_gate:
        pytest.skip("refused without an `ff` MLP: test_mlp_gate_without_an_mlp_is_refused")
    model = case.model()
    reference = case.model()
    diffcr.apply(model, DiffCRConfig(gate="sigmoid_mlp", timestep_regions=1))
    with torch.no_grad():
        model.diffcr.routers[0].weight.zero_()  # every score sigmoid(0) = 0.5
    set_kept(model, [[0.5], [1.0], [1.0]])
    inputs = case.inputs([100, 700])
    # the reference: block 0 on the same kept tokens, its MLP output halved by a hook
    block = reference.transformer_blocks[0]
    with torch.no_grad():
        routed = run(model, inputs)
        captured = {}
        block.register_forward_pre_hook(
            lambda m, a, k: captured.update(x=a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        run(reference, inputs)
    x = captured["x"]
    kept_idx = diffcr.routing.select_tokens(torch.zeros(x.shape[:2]), case.num_tokens // 2)
    handle = block.ff.register_forward_hook(lambda m, a, out: out * 0.5)
    block_out = {}

    def replace_block0(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kept = diffcr.routing.gather_tokens(hidden, kept_idx)
        new = type(mod).forward(mod, kept, *args[1:], **rest)
        image = diffcr.routing.scatter_tokens(hidden, kept_idx, image_of(new))
        block_out["y"] = (new[0], image) if isinstance(new, tuple) else image

    hook = block.register_forward_pre_hook(replace_block0, with_kwargs=True)
    with torch.no_grad():
        run(reference, inputs)
    handle.remove()
    hook.remove()
    # feed the manual block-0 output through the rest of the reference model and compare
    with torch.no_grad():
        block.forward = lambda *a, **k: block_out["y"]
        manual = run(reference, inputs)
    torch.testing.assert_close(routed, manual, atol=1e-6, rtol=0)


# -- eval mode, freeze, save / load --------------------------------------------------------------------------
@pytest.mark.parametrize("use_freeze", [False, True], ids=["eval", "freeze"])
def test_inference_runs_one_pass_at_the_nearest_bin(case, use_freeze):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1))
    set_kept(model, [[0.83], [0.46], [0.97]])
    if use_freeze:
        diffcr.freeze(model)
        model.train()  # a frozen schedule ignores train mode
    else:
        model.eval()
    seen = count_block_tokens(model)
    with torch.no_grad():
        run(model, case.inputs([100, 700]))
    assert seen == [(0, 2, 13), (1, 2, 8), (2, 2, 16)]  # bins 0.8, 0.5, 1.0 of 16 tokens
    assert diffcr.schedule(model).kept_ratio == [[0.8], [0.5], [1.0]]


def test_freeze_stops_gradients_and_schedule_prints(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=2))
    set_kept(model, [[0.83, 0.3]])
    diffcr.freeze(model)
    assert not any(p.requires_grad for p in model.diffcr.parameters())
    text = str(diffcr.schedule(model))
    halves = ("t 0-0.5", "t 0.5-1") if case.num_train_timesteps == 1 else ("t 0-499", "t 500-999")
    assert all(label in text for label in halves) and "0.80" in text and "0.30" in text
    assert diffcr.schedule(model).mean_kept_ratio == pytest.approx(0.55)


@pytest.mark.parametrize("frozen", [False, True])
def test_save_load_round_trip(case, tmp_path, frozen):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=2, gate="sigmoid_block"))
    set_kept(model, [[0.66, 0.31], [0.9, 0.5], [1.0, 0.2]])
    with torch.no_grad():
        for router in model.diffcr.routers:
            router.weight.normal_()
    if frozen:
        diffcr.freeze(model)
    inputs = case.inputs(T_MIXED)
    with torch.no_grad():
        expected = run(model.eval(), inputs)
    diffcr.save(model, tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["diffcr_config.json", "diffcr_weights.safetensors"]
    fresh = diffcr.load(case.model(), tmp_path / "art")
    assert diffcr.is_frozen(fresh) == frozen
    assert diffcr.get_config(fresh) == diffcr.get_config(model).replace(num_train_timesteps=case.num_train_timesteps)
    with torch.no_grad():
        assert torch.equal(run(fresh.eval(), inputs), expected)


def test_artifact_holds_only_diffcr_tensors(case, tmp_path):
    from safetensors.torch import load_file

    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4))
    diffcr.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "diffcr_weights.safetensors"))
    assert set(tensors) == {f"routers.{i}.weight" for i in range(3)} | {"kept_ratio"}
    assert tensors["kept_ratio"].shape == (3, 4)


def test_load_rejects_another_model(case, tmp_path):
    diffcr.save(diffcr.apply(case.model(num_layers=3)), tmp_path)
    other = case.model(num_layers=2)
    with pytest.raises(ValueError, match="num_layers: artifact 3, model 2"):
        diffcr.load(other, tmp_path)
    assert not diffcr.is_applied(other)


def test_load_rejects_another_family(tmp_path):
    from conftest import DiTCase, PixArtCase

    diffcr.save(diffcr.apply(DiTCase.model()), tmp_path)
    with pytest.raises(ValueError, match="model_class: artifact 'DiTTransformer2DModel'"):
        diffcr.load(PixArtCase.model(), tmp_path)


def test_load_rejects_truncated_file(case, tmp_path):
    diffcr.save(diffcr.apply(case.model()), tmp_path)
    weights = tmp_path / "diffcr_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    model = case.model()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        diffcr.load(model, tmp_path)
    assert not diffcr.is_applied(model)


def test_load_rejects_newer_version(case, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    diffcr.save(diffcr.apply(case.model()), tmp_path)
    weights = tmp_path / "diffcr_weights.safetensors"
    description = json.loads((tmp_path / "diffcr_config.json").read_text())
    description["config"]["_version"] = 99
    save_file(load_file(str(weights)), str(weights), metadata={"diffcr": json.dumps(description)})
    with pytest.raises(ValueError, match="newer than this diffcr"):
        diffcr.load(case.model(), tmp_path)


def test_load_missing_artifact(case, tmp_path):
    with pytest.raises(FileNotFoundError, match="diffcr_weights.safetensors is missing"):
        diffcr.load(case.model(), tmp_path)


# -- training plumbing ---------------------------------------------------------------------------------------
def test_gradient_checkpointing_keeps_working(case):
    inputs = case.inputs(T_MIXED)
    results = []
    for checkpointing in (False, True):
        model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4))
        set_kept(model, [[0.95, 0.75, 0.45, 0.2]])
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        calls = count_block_tokens(model)
        out = run(model, inputs)
        forward_calls = len(calls)
        (out.pow(2).mean() + diffcr.ratio_loss(model)).backward()
        assert len(calls) == (2 * forward_calls if checkpointing else forward_calls)  # recomputed in backward
        grads = (model.diffcr.kept_ratio.grad.clone(), model.diffcr.routers[2].weight.grad.clone())
        results.append((out.detach(), *grads))
    for plain, ckpt in zip(*results):
        torch.testing.assert_close(plain, ckpt, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_training_step_is_finite(case):
    model = diffcr.apply(case.model(), DiffCRConfig())
    set_kept(model, [[1.0, 0.7, 0.5, 0.3]])
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, case.inputs(T_MIXED))
        loss = out.float().pow(2).mean() + diffcr.ratio_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(model.diffcr.kept_ratio.grad).all() and model.diffcr.kept_ratio.grad.abs().sum() > 0


def test_bf16_model_stays_bf16(case):
    model = diffcr.apply(case.model().to(torch.bfloat16), DiffCRConfig(gate="sigmoid_block"))
    set_kept(model, [[1.0, 0.7, 0.5, 0.3]])
    inputs = {
        k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in case.inputs(T_MIXED).items()
    }
    for mode in (False, True):
        with torch.no_grad():
            out = run(model.train(mode), inputs)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bf16_autocast_forward_is_finite(case):
    model = diffcr.apply(case.model(), DiffCRConfig())
    set_kept(model, [[1.0, 0.7, 0.5, 0.3]])
    for mode in (True, False):
        model.train(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out = run(model, case.inputs(T_MIXED))
        assert torch.isfinite(out).all()
        assert torch.isfinite(diffcr.ratio_loss(model))


def test_whole_block_skip_with_zero_bin(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=1, ratio_bins=(1.0, 0.5, 0.0)))
    set_kept(model, [[1.0], [0.0], [1.0]])
    seen = count_block_tokens(model)
    with torch.no_grad():
        run(model, case.inputs([100, 700]))
    assert [layer for layer, _, _ in seen] == [0, 2]


def test_regions_need_a_timestep(case):
    model = diffcr.apply(case.model(), DiffCRConfig(timestep_regions=4))
    inputs = case.inputs([100, 700])
    inputs["timestep"] = None
    with pytest.raises(ValueError, match="needs the timestep"):
        run(model, inputs)
