"""What routing means on an MMDiT (SD3 / SD3.5 `JointTransformerBlock`): image tokens are routed, every text
token is computed, the text stream is updated from the kept image tokens. The shared conformance suite runs on
SD3 too (the `case` fixture); these are the family's own checks."""

from __future__ import annotations

import pytest
import torch

import diffcr
from conftest import SD3Case, run, skipped_entirely
from diffcr import DiffCRConfig


def routed(kept: float):
    model = diffcr.apply(SD3Case.model(), DiffCRConfig(timestep_regions=1))
    with torch.no_grad():
        model.diffcr.kept_ratio.fill_(kept)
        for router in model.diffcr.routers:
            router.weight.normal_()
    return diffcr.freeze(model)


def block_calls(model, layer: int):
    """(inputs, output) of every call of block `layer`."""
    calls = []
    model.transformer_blocks[layer].register_forward_hook(
        lambda m, args, kwargs, out: calls.append((dict(kwargs), out)), with_kwargs=True
    )
    return calls


def test_text_stream_equals_dense_at_kept_one():
    dense, model = SD3Case.model(), routed(1.0)
    inputs = SD3Case.inputs([100, 700])
    dense_calls, routed_calls = block_calls(dense, 1), block_calls(model, 1)
    with torch.no_grad():
        torch.testing.assert_close(run(model, inputs), run(dense, inputs), atol=0, rtol=0)
    torch.testing.assert_close(routed_calls[0][1][0], dense_calls[0][1][0], atol=0, rtol=0)


def test_text_stream_comes_from_all_text_and_the_kept_image_tokens():
    model = routed(0.5)
    calls = block_calls(model, 1)
    with torch.no_grad():
        run(model, SD3Case.inputs([100, 700]))
    kwargs, (text_out, image_out) = calls[0]
    image_in, text_in = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
    block = model.transformer_blocks[1]
    logits = model.diffcr.routers[1](image_in).squeeze(-1)
    kept_idx = diffcr.routing.select_tokens(logits, SD3Case.num_tokens // 2)
    kept = diffcr.routing.gather_tokens(image_in, kept_idx)
    base_forward = type(block)._diffcr_base_class.forward
    with torch.no_grad():
        expected_text, expected_kept = base_forward(
            block, kept, text_in, kwargs["temb"], kwargs["joint_attention_kwargs"]
        )
    assert text_out.shape == text_in.shape  # every text token computed
    torch.testing.assert_close(text_out, expected_text, atol=1e-6, rtol=0)
    torch.testing.assert_close(diffcr.routing.gather_tokens(image_out, kept_idx), expected_kept, atol=1e-6, rtol=0)


def test_last_block_without_text_stream_and_skip_layer_guidance():
    model = routed(0.5)
    last = block_calls(model, 2)
    skipped = block_calls(model, 1)
    with torch.no_grad():
        out = model(**SD3Case.inputs([100, 700]), skip_layers=[1]).sample
    assert torch.isfinite(out).all()
    assert last[0][1][0] is None  # SD3's last block returns no text stream, routed or not
    assert skipped == []  # skip-layer guidance's call leaves layer 1 out entirely
    # at kept 1.0 a skip-layer call is exactly the dense model's
    dense, full = SD3Case.model(), routed(1.0)
    inputs = SD3Case.inputs([100, 700])
    with torch.no_grad():
        torch.testing.assert_close(full(**inputs, skip_layers=[0]).sample, dense(**inputs, skip_layers=[0]).sample)


def test_flops_count_the_text_tokens_of_joint_attention():
    from diffcr.adapters import get_adapter

    model = SD3Case.model()
    adapter = get_adapter(model)
    with_text = adapter.block_flops(model, 16, context_tokens=5)
    without = adapter.block_flops(model, 16)
    width = 16
    text_share = 2 * 5 * 4 * width * width + 2 * 2 * (2 * 16 + 5) * 5 * width + 2 * 5 * 2 * width * 4 * width
    assert with_text - without == text_share


@pytest.mark.parametrize("skip", [[0], [1, 2]], ids=["first", "middle_and_last"])
def test_skip_layer_guidance_skips_the_layer_and_keeps_the_others_routing(skip):
    """Skip-layer guidance calls the transformer once more with `skip_layers`: those blocks must not run at all
    (not even their routers), and every other block must route exactly as it would with those blocks removed."""
    model = diffcr.apply(SD3Case.model(), DiffCRConfig(timestep_regions=4))
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(
            torch.tensor([[0.5, 0.75, 0.25, 0.5], [0.25, 0.5, 0.75, 0.5], [0.5, 1.0, 0.25, 0.75]])
        )
        for router in model.diffcr.routers:
            router.weight.normal_()
    diffcr.freeze(model)
    inputs = SD3Case.inputs([100, 300, 600, 900])  # one sample per region: each routes at its own kept ratios
    router_calls = []
    for layer, router in enumerate(model.diffcr.routers):
        router.register_forward_hook(lambda m, a, out, layer=layer: router_calls.append(layer))
    with torch.no_grad():
        skipped = model(**inputs, skip_layers=skip).sample
        assert set(router_calls) == set(range(3)) - set(skip)  # a skipped layer's router never ran
        with skipped_entirely(model, skip):
            reference = run(model, inputs)
        plain = run(model, inputs)
        dense = SD3Case.model()(**inputs, skip_layers=skip).sample
    torch.testing.assert_close(skipped, reference, atol=0, rtol=0)
    assert not torch.allclose(skipped, plain)  # the skip changed the output
    assert not torch.allclose(skipped, dense)  # and routing is at work in the layers that ran


def test_every_adapter_runs_the_conformance_suite():
    from conftest import CASES, all_blocks
    from diffcr.adapters import ADAPTERS, get_adapter
    from diffcr.adapters.base import ROUTABLE_BLOCKS

    models = [case.model() for case in CASES]
    covered = {type(model).__name__ for model in models}
    assert set(ADAPTERS) <= covered, f"add a Case to tests/conftest.py for {sorted(set(ADAPTERS) - covered)}"
    # every block kind diffcr routes is in some Case's model, where the suite's `all_blocks` reaches it
    for model in models:
        assert all_blocks(model) == get_adapter(model).blocks(model), type(model).__name__
    kinds = {type(block).__name__ for model in models for block in all_blocks(model)}
    missing = sorted(set(ROUTABLE_BLOCKS) - kinds)
    assert not missing, f"no Case in tests/conftest.py builds a model with {missing} blocks"


# -- Flux: double- and single-stream blocks, rotary positions -------------------------------------------------------
def flux_with_single_blocks(kept: float):
    from conftest import tiny_flux

    model = diffcr.apply(tiny_flux(num_layers=1, num_single_layers=2), DiffCRConfig(timestep_regions=4))
    with torch.no_grad():
        model.diffcr.kept_ratio.fill_(kept)
        for router in model.diffcr.routers:
            router.weight.normal_()
    return diffcr.freeze(model)


def test_flux_routes_single_stream_blocks_per_sample():
    from conftest import FluxCase, tiny_flux

    model = flux_with_single_blocks(0.5)
    assert model.diffcr.num_layers == 3  # one double-stream and two single-stream blocks
    seen = []
    model.single_transformer_blocks[0].norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    inputs = FluxCase.inputs([100, 400, 900])
    with torch.no_grad():
        together = run(model, inputs)
        for b in range(3):
            alone = run(model, {k: v if k.endswith("_ids") else v[b : b + 1] for k, v in inputs.items()})
            torch.testing.assert_close(alone[0], together[b], atol=1e-6, rtol=0)
    assert seen[0] == (1, 5 + 8, 32)  # every text token and half of the 16 image tokens, one sample at a time
    dense, full = tiny_flux(num_layers=1, num_single_layers=2), flux_with_single_blocks(1.0)
    with torch.no_grad():
        torch.testing.assert_close(run(full, inputs), run(dense, inputs), atol=0, rtol=0)


def test_flux_rotary_rows_follow_the_kept_tokens():
    from conftest import FluxCase

    model = flux_with_single_blocks(0.5)
    block = model.single_transformer_blocks[1]
    calls = {}
    block.register_forward_pre_hook(lambda m, args, kwargs: calls.update(block=dict(kwargs)), with_kwargs=True)
    block.attn.register_forward_pre_hook(lambda m, args, kwargs: calls.update(attn=dict(kwargs)), with_kwargs=True)
    with torch.no_grad():
        run(model, FluxCase.inputs([300]))
    full_cos, full_sin = calls["block"]["image_rotary_emb"]
    cos, sin = calls["attn"]["image_rotary_emb"]
    image = calls["block"]["hidden_states"]
    logits = model.diffcr.routers[2](image).squeeze(-1)
    kept_idx = diffcr.routing.select_tokens(logits, 8)[0]
    rows = torch.cat([torch.arange(5), 5 + kept_idx])  # text rows first, then the kept image tokens' rows
    assert cos.shape == (13, full_cos.shape[1])
    torch.testing.assert_close(cos, full_cos[rows], atol=0, rtol=0)
    torch.testing.assert_close(sin, full_sin[rows], atol=0, rtol=0)


def test_guidance_distilled_flux_routes_exactly():
    """Flux dev (`guidance_embeds=True`) adds a guidance embedding to each sample's conditioning: routing is exact at
    kept 1.0, and a batch mixing timesteps and guidance values equals each sample run alone."""
    from conftest import FluxCase, tiny_flux

    def guided():
        return tiny_flux(num_layers=1, num_single_layers=2, guidance_embeds=True)

    inputs = {**FluxCase.inputs([100, 300, 600, 900]), "guidance": torch.tensor([1.0, 3.5, 5.0, 2.0])}
    model = diffcr.apply(guided(), DiffCRConfig(timestep_regions=4))
    with torch.no_grad():
        dense = run(guided(), inputs)
        assert torch.equal(run(model.eval(), inputs), dense)  # kept 1.0: the model's own blocks
        model.diffcr.kept_ratio.copy_(torch.tensor([[1.0, 0.75, 0.5, 0.25]]).expand(3, 4))
        for router in model.diffcr.routers:
            router.weight.normal_()
        together = run(model, inputs)
        for b in range(4):
            alone = run(model, {k: v if k.endswith("_ids") else v[b : b + 1] for k, v in inputs.items()})
            torch.testing.assert_close(alone[0], together[b], atol=1e-6, rtol=0)
        other_guidance = run(model, {**inputs, "guidance": torch.tensor([4.0, 1.0, 2.0, 6.0])})
    assert not torch.allclose(together, dense)  # routed
    assert not torch.allclose(other_guidance, together)  # the guidance embedding reaches the blocks


def test_flux_regions_come_from_sigma_and_block_lists_name_routed_classes():
    from conftest import FluxCase

    model = flux_with_single_blocks(1.0)
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.tensor([[1.0, 0.9, 0.8, 0.7]]).expand(3, 4))
    model.diffcr.frozen_schedule = None
    model.eval()
    with torch.no_grad():
        run(model, FluxCase.inputs([100, 300, 600, 900]))  # sigma 0.1, 0.3, 0.6, 0.9: one per region
    assert model.diffcr.used_kept_ratio()[0].tolist() == pytest.approx([1.0, 0.9, 0.8, 0.7])
    for names in (model._repeated_blocks, model._no_split_modules):
        assert {"DiffCRFluxTransformerBlock", "DiffCRFluxSingleTransformerBlock"} <= set(names)
    assert "t 0-0.25" in str(diffcr.schedule(model))
