"""`DiffCRConfig.route_cross_attention=False`: bypassed tokens still get their block's cross-attention update."""

import pytest
import torch

import diffcr
from conftest import PixArtCase, run, tiny_dit, tiny_pixart
from diffcr.adapters import get_adapter
from diffcr.benchmark import model_flops
from diffcr.routing import complement_tokens, routed_forward, select_tokens


def _bypass_model(kept: float, route_cross_attention: bool = False, seed: int = 0):
    config = diffcr.DiffCRConfig(
        target_kept_ratio=0.5,
        timestep_regions=1,
        ratio_bins=(1.0, 0.75, 0.5, 0.25, 0.0),
        route_cross_attention=route_cross_attention,
    )
    model = diffcr.apply(tiny_pixart(num_layers=2, seed=seed), config)
    with torch.no_grad():
        model.diffcr.kept_ratio.fill_(kept)
        for router in model.diffcr.routers:
            router.weight.normal_(0, 1.0)
    return model.eval()


def test_complement_tokens_partitions_every_row():
    logits = torch.randn(3, 10)
    kept_idx = select_tokens(logits, 4)
    bypassed = complement_tokens(kept_idx, 10)
    assert bypassed.shape == (3, 6)
    for row in range(3):
        together = sorted(kept_idx[row].tolist() + bypassed[row].tolist())
        assert together == list(range(10))
        assert bypassed[row].tolist() == sorted(bypassed[row].tolist())


@pytest.mark.parametrize("num_kept", [0, 3, 8])
def test_routed_forward_gives_bypassed_tokens_only_the_bypass_update(num_kept):
    torch.manual_seed(0)
    tokens = torch.randn(2, 8, 4)
    logits = torch.randn(2, 8)
    seen = []

    def block_fn(kept_tokens, mlp_gate, kept_idx):
        return kept_tokens * 3.0 + 1.0

    def bypass_fn(bypassed):
        seen.append(bypassed.shape[1])
        return bypassed * -0.5 + 2.0

    out = routed_forward(tokens, logits, num_kept, block_fn, "straight_through", False, bypass_fn=bypass_fn)
    update = routed_forward(tokens, logits, num_kept, block_fn, "straight_through", True, bypass_fn=bypass_fn)
    kept = torch.zeros(2, 8, dtype=torch.bool)
    if num_kept:
        kept.scatter_(1, select_tokens(logits, num_kept), True)
    expected = torch.where(kept.unsqueeze(-1), tokens * 3.0 + 1.0, tokens + (tokens * -0.5 + 2.0))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(update, expected - tokens)
    # the bypass runs on the bypassed tokens alone (a dense pass has none and does not call it)
    assert seen == ([] if num_kept == 8 else [8 - num_kept] * 2)


def test_bypass_output_widens_dtypes_and_passes_gradients_to_every_row():
    # every row of the output is written (kept rows by the block, the rest by the bypass), with no copy of the
    # input first: the gradient must still reach each input row through its own path, and a block that returns
    # bf16 must not narrow the bypassed rows
    torch.manual_seed(1)
    tokens = torch.randn(2, 8, 4, requires_grad=True)
    logits = torch.randn(2, 8)
    kept = torch.zeros(2, 8, dtype=torch.bool)
    kept.scatter_(1, select_tokens(logits, 3), True)
    out = routed_forward(
        tokens,
        logits,
        3,
        lambda kept_tokens, mlp_gate, kept_idx: (kept_tokens * 3.0).to(torch.bfloat16),
        "straight_through",
        False,
        bypass_fn=lambda bypassed: bypassed * 0.5,
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[~kept], tokens[~kept] * 1.5, rtol=0, atol=0)
    (out.float() * torch.arange(1.0, 5.0)).sum().backward()
    expected_grad = torch.where(kept.unsqueeze(-1), 3.0, 1.5) * torch.arange(1.0, 5.0)  # (2, 8, 4)
    torch.testing.assert_close(tokens.grad, expected_grad)


def test_routed_pixart_block_is_the_block_on_kept_tokens_and_cross_attention_on_the_rest():
    model = _bypass_model(0.5)
    block = model.transformer_blocks[0]
    captured = {}

    def grab(module, args, kwargs, output):
        captured.update(hidden=args[0] if args else kwargs["hidden_states"], kwargs=kwargs, output=output)

    handle = block.register_forward_hook(grab, with_kwargs=True)
    inputs = PixArtCase.inputs([500, 500])
    with torch.no_grad():
        run(model, inputs)
    handle.remove()
    hidden, kwargs = captured["hidden"], {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
    num_tokens = hidden.shape[1]
    with torch.no_grad():
        kept_idx = select_tokens(model.diffcr.router_logits(0, hidden), num_tokens // 2)  # (B, k)
        kept_tokens = torch.gather(hidden, 1, kept_idx.unsqueeze(-1).expand(-1, -1, hidden.shape[2]))
        kept_out = type(block)._diffcr_base_class.forward(block, kept_tokens, **kwargs)  # (B, k, C)
        cross = block.attn2(
            hidden,
            encoder_hidden_states=kwargs["encoder_hidden_states"],
            attention_mask=kwargs["encoder_attention_mask"],
        )  # (B, N, C): queries are independent, so rows of the full call are the bypassed tokens' own
    expected = hidden + cross
    expected.scatter_(1, kept_idx.unsqueeze(-1).expand(-1, -1, hidden.shape[2]), kept_out)
    torch.testing.assert_close(captured["output"], expected, rtol=1e-5, atol=1e-6)


def test_whole_block_skip_still_adds_the_cross_attention():
    """At kept 0 every token bypasses: each block is x + attn2(x), and the paper's variant is the identity."""
    model = _bypass_model(0.0)
    reference = tiny_pixart(num_layers=2, seed=0).eval()

    def cross_only(block):
        def forward(hidden_states, encoder_hidden_states=None, encoder_attention_mask=None, **_):
            return hidden_states + block.attn2(
                hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
            )

        return forward

    for block in reference.transformer_blocks:
        block.forward = cross_only(block)
    paper = _bypass_model(0.0, route_cross_attention=True)
    inputs = PixArtCase.inputs([100, 900])
    with torch.no_grad():
        ours = run(model, inputs)
        expected = run(reference, inputs)
        skipped = run(paper, inputs)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert (ours - skipped).abs().max() > 1e-3  # the caption changed the bypassed tokens


def test_dense_schedule_is_the_unrouted_model():
    model = _bypass_model(1.0)
    dense = tiny_pixart(num_layers=2, seed=0).eval()
    inputs = PixArtCase.inputs([10, 990])
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), run(dense, inputs), rtol=0, atol=0)


def test_training_forward_at_a_bin_matches_inference_and_trains_cross_attention_from_bypassed_tokens():
    model = _bypass_model(0.5)
    inputs = PixArtCase.inputs([300, 700])
    with torch.no_grad():
        expected = run(model, inputs)
    model.train()
    out = run(model, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    assert model.diffcr.kept_ratio.grad is not None and model.diffcr.kept_ratio.grad.abs().sum() > 0
    # with every token bypassed, only the bypass path reaches the cross-attention weights
    skip = _bypass_model(0.0).train()
    run(skip, inputs).square().mean().backward()
    for block in skip.transformer_blocks:
        assert block.attn2.to_q.weight.grad.abs().sum() > 0
        assert block.attn1.to_q.weight.grad is None or block.attn1.to_q.weight.grad.abs().sum() == 0


def test_refused_on_blocks_without_pixart_cross_attention_and_the_model_is_untouched():
    model = tiny_dit(num_layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"route_cross_attention=False .*PixArt"):
        diffcr.apply(model, diffcr.DiffCRConfig(route_cross_attention=False))
    assert not diffcr.is_applied(model)
    assert type(model).__name__ == "DiTTransformer2DModel"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


def test_config_round_trip_and_bad_value():
    config = diffcr.DiffCRConfig(route_cross_attention=False)
    assert diffcr.DiffCRConfig.from_json(config.to_json()).route_cross_attention is False
    assert diffcr.DiffCRConfig().route_cross_attention is True
    with pytest.raises(ValueError, match="route_cross_attention='no' must be true or false"):
        diffcr.DiffCRConfig(route_cross_attention="no")


def test_save_load_keeps_the_option(tmp_path):
    model = _bypass_model(0.5)
    diffcr.freeze(model)
    diffcr.save(model, tmp_path / "artifact")
    fresh = diffcr.load(tiny_pixart(num_layers=2, seed=0), tmp_path / "artifact").eval()
    assert diffcr.get_config(fresh).route_cross_attention is False
    inputs = PixArtCase.inputs([400, 600])
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inputs), run(model, inputs), rtol=0, atol=0)


def test_flops_count_the_cross_attention_of_bypassed_tokens():
    ours = _bypass_model(0.5)
    paper = _bypass_model(0.5, route_cross_attention=True)
    adapter = get_adapter(ours)
    num_tokens, context = 16, 5
    extra = model_flops(ours, num_tokens, [0.5, 0.0], context) - model_flops(paper, num_tokens, [0.5, 0.0], context)
    # block 0 keeps 8 tokens (the text projections already counted); block 1 keeps none (they are not)
    expected = adapter.cross_attention_flops(ours, 8, context, text_projections=False)
    expected += adapter.cross_attention_flops(ours, 16, context, text_projections=True)
    assert extra == expected > 0
    assert model_flops(ours, num_tokens, None, context) == model_flops(paper, num_tokens, None, context)
