"""The CPU kernel for cross-attention to short captions: same results as diffusers' default, installed by the
loaders on dense and routed pipelines alike, and only where it applies."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import diffcr
from conftest import tiny_pixart
from diffcr.caption_attention import MAX_CAPTION_TOKENS, ShortCaptionAttnProcessor, use_short_caption_attention


def forward(model, caption_tokens: int, batch: int = 3, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    caption = torch.randn(batch, caption_tokens, 12, generator=generator)
    caption_mask = torch.ones(batch, caption_tokens, dtype=torch.long)
    caption_mask[0, caption_tokens // 2 :] = 0  # padding, as a tokenizer pads to its length
    timestep = torch.tensor([10, 500, 990])[:batch]
    return model(
        latents,
        encoder_hidden_states=caption,
        encoder_attention_mask=caption_mask,
        timestep=timestep,
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    ).sample


@pytest.mark.parametrize("caption_tokens", [5, MAX_CAPTION_TOKENS, MAX_CAPTION_TOKENS + 9])
def test_same_output_as_the_default_processor(caption_tokens):
    model = tiny_pixart()
    with torch.no_grad():
        reference = forward(model, caption_tokens)
        assert use_short_caption_attention(model) == 3
        ours = forward(model, caption_tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert not torch.equal(reference, forward(tiny_pixart(), caption_tokens, seed=2).detach())  # inputs matter


def test_a_routed_model_gives_the_same_output_with_either_kernel():
    dense = tiny_pixart()
    config = diffcr.DiffCRConfig(
        target_kept_ratio=0.5, timestep_regions=1, ratio_bins=(1.0, 0.5, 0.0), route_cross_attention=False
    )
    routed = diffcr.apply(tiny_pixart(), config)
    with torch.no_grad():
        routed.diffcr.kept_ratio.fill_(0.5)  # a bin: one pass a block, 8 of 16 tokens
        for router in routed.diffcr.routers:
            router.weight.normal_(0, 1.0)
    routed.eval()
    with torch.no_grad():
        reference = forward(routed, 7)
        use_short_caption_attention(routed)
        ours = forward(routed, 7)
        dense_out = forward(dense, 7)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (ours - dense_out).abs().max() > 1e-3  # routing did change the output: the comparison is not vacuous


def test_which_kernel_a_call_takes():
    processor = ShortCaptionAttnProcessor(max_caption_tokens=8)
    image = torch.zeros(2, 16, 4)
    with torch.no_grad():
        assert processor.uses_classic(image, torch.zeros(2, 8, 4))  # cross-attention to a short caption, on CPU
        assert not processor.uses_classic(image, torch.zeros(2, 9, 4))  # a longer caption
        assert not processor.uses_classic(image, None)  # self-attention
        assert not processor.uses_classic(image.to("meta"), torch.zeros(2, 8, 4, device="meta"))  # not on CPU
    assert not processor.uses_classic(image, torch.zeros(2, 8, 4))  # training keeps the fused kernel


def test_the_kernel_it_picks_is_the_one_that_runs(monkeypatch):
    model = tiny_pixart()
    use_short_caption_attention(model, max_caption_tokens=6)
    calls = []
    for name, kernel_class in (("classic", AttnProcessor), ("fused", AttnProcessor2_0)):
        original = kernel_class.__call__

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(kernel_class, "__call__", spy)
    with torch.no_grad():
        forward(model, 6)
    assert calls.count("classic") == 3  # every block's cross-attention; self-attention keeps the default
    calls.clear()
    with torch.no_grad():
        forward(model, 7)
    assert "classic" not in calls


def test_processors_a_user_set_are_kept_and_a_second_call_replaces_nothing():
    model = tiny_pixart()
    user_processor = AttnProcessor()
    model.transformer_blocks[1].attn2.set_processor(user_processor)
    assert use_short_caption_attention(model) == 2
    assert model.transformer_blocks[1].attn2.processor is user_processor
    assert all(type(block.attn1.processor) is AttnProcessor2_0 for block in model.transformer_blocks)
    assert use_short_caption_attention(model) == 0


def test_training_runs_exactly_as_with_the_default_processor():
    reference_model = tiny_pixart().train()
    model = tiny_pixart().train()
    use_short_caption_attention(model)
    forward(reference_model, 6).pow(2).mean().backward()
    loss = forward(model, 6).pow(2).mean()
    loss.backward()
    for block, reference in zip(model.transformer_blocks, reference_model.transformer_blocks):
        assert block.attn2.to_q.weight.grad.abs().sum() > 0
        assert torch.equal(block.attn2.to_q.weight.grad, reference.attn2.to_q.weight.grad)  # bit for bit


def test_bad_threshold_is_refused():
    with pytest.raises(ValueError, match="max_caption_tokens"):
        ShortCaptionAttnProcessor(max_caption_tokens=-1)


def test_shipped_pipelines_dense_and_routed_get_it():
    from diffcr.text_to_image import load_pipeline

    for artifact in ("none", "default"):
        pipe = load_pipeline("t2i", artifact)
        kinds = {type(block.attn2.processor) for block in pipe.transformer.transformer_blocks}
        assert kinds == {ShortCaptionAttnProcessor}, artifact
