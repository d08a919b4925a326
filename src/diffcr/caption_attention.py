"""Cross-attention to a short caption on CPU: diffusers' classic kernel, where torch's fused one is slower.

For a caption of a few dozen tokens, torch's fused CPU attention (`scaled_dot_product_attention`, its flash kernel)
takes 1.5-2x as long as diffusers' classic `AttnProcessor` (one batched matmul, a softmax, another), and its
processor adds contiguity copies around it. Measured on the text-to-image default's blocks (2 CPU threads, batch 20,
256 image tokens, width 128; `benchmarks/caption_attention.py`): 4.5-5.3 ms against 7.8-9.8 ms a call at 24 caption
tokens; the two cross between 24 and 48 tokens (even at 48), and the classic one is slower from 77 on. At
PixArt-Sigma's width (1152) the projections dominate and the two tie to within noise up to about 120 tokens. So the
processor here picks the classic kernel only for cross-attention on CPU with a short caption, and torch's fused one
everywhere else (GPU, self-attention, long captions such as T5's 300 tokens), and in training.

Training (any call that records gradients) keeps the fused kernel: the classic one saved only 3 % of a fine-tuning
step of the default, and it changes a run's rounding, which 400 steps compound into another model. The demo's
recipe trained with it drew 56.7 % of the digits right where the same recipe draws 62.2 % (a run's spread at this
budget, not the kernel's quality), so keeping training as it was keeps every documented training run reproducible.

It changes no result beyond float rounding (about 1e-6), and the loaders install it on dense and routed pipelines
alike (`diffcr.data.latent_cache.load_text_to_image_pipeline`, `diffcr.text_to_image.load_pipeline`), so measured
speedups compare the same kernels. With DiffCR's `route_cross_attention=False`, bypassed tokens still run each
block's cross-attention, so its cost weighs more in a routed model than in the dense one.
"""

from __future__ import annotations

import torch

# at most this many caption tokens take the classic kernel on CPU (the kernels cross between 24 and 48)
MAX_CAPTION_TOKENS = 32


class ShortCaptionAttnProcessor:
    """A diffusers attention processor: the classic `AttnProcessor` for cross-attention on CPU to at most
    `max_caption_tokens` tokens when no gradient is recorded (sampling), `AttnProcessor2_0` (torch's fused
    attention) otherwise."""

    def __init__(self, max_caption_tokens: int = MAX_CAPTION_TOKENS) -> None:
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        if isinstance(max_caption_tokens, bool) or not isinstance(max_caption_tokens, int) or max_caption_tokens < 0:
            raise ValueError(f"max_caption_tokens={max_caption_tokens!r} must be an integer >= 0")
        self.max_caption_tokens = max_caption_tokens
        self.classic = AttnProcessor()
        self.fused = AttnProcessor2_0()

    def uses_classic(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None) -> bool:
        """Whether a call with these inputs takes the classic kernel."""
        return (
            encoder_hidden_states is not None
            and not torch.is_grad_enabled()
            and hidden_states.device.type == "cpu"
            and encoder_hidden_states.shape[1] <= self.max_caption_tokens
        )

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        kernel = self.classic if self.uses_classic(hidden_states, encoder_hidden_states) else self.fused
        return kernel(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)


def use_short_caption_attention(transformer, max_caption_tokens: int = MAX_CAPTION_TOKENS) -> int:
    """Give every cross-attention of `transformer` that runs diffusers' default processor
    (`AttnProcessor2_0`) a `ShortCaptionAttnProcessor`; processors a user set (LoRA, IP-Adapter, ...) stay.

    Args:
        transformer: a diffusers transformer whose blocks hold `attn2` (PixArt); other models are left as they are.
        max_caption_tokens: the longest caption that takes the classic kernel on CPU.

    Returns:
        how many processors were replaced.

    Example:
        >>> from diffcr.caption_attention import use_short_caption_attention
        >>> from diffcr.data.latent_cache import load_text_to_image_pipeline
        >>> pipe = load_text_to_image_pipeline("t2i")  # already done by the loader
        >>> use_short_caption_attention(pipe.transformer)  # nothing left to replace
        0
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    replaced = 0
    for block in getattr(transformer, "transformer_blocks", []):
        cross_attention = getattr(block, "attn2", None)
        if cross_attention is None or type(cross_attention.processor) is not AttnProcessor2_0:
            continue
        cross_attention.set_processor(ShortCaptionAttnProcessor(max_caption_tokens))
        replaced += 1
    return replaced
