"""Text-conditioned training on a PixArt transformer: caption dropout as classifier-free guidance needs it, and
LoRA where the paper's recipe puts it."""

from __future__ import annotations

from pathlib import Path

import torch

from conftest import tiny_pixart
from diffcr.train import TrainConfig, draw_global_batch, prepare_model
from diffcr.train.conditioning import TextConditioning

TEXT_LENGTH, TEXT_DIM = 6, 12  # tiny_pixart takes 12-dim captions


class FakeCache:
    """What `TextConditioning` reads from a prepared cache, held in memory: captions of different lengths."""

    root = Path("in-memory cache")

    def __init__(self, count: int = 10):
        gen = torch.Generator().manual_seed(0)
        self.latents = torch.randn(count, 4, 8, 8, generator=gen)
        self.embeds = torch.randn(count, TEXT_LENGTH, TEXT_DIM, generator=gen)
        lengths = torch.randint(2, TEXT_LENGTH + 1, (count,), generator=gen)
        self.masks = (torch.arange(TEXT_LENGTH)[None] < lengths[:, None]).long()  # (n, L)
        empty_mask = torch.zeros(TEXT_LENGTH, dtype=torch.long)
        empty_mask[0] = 1  # the empty prompt is one end-of-text token
        self.empty_prompt = {"prompt_embeds": torch.randn(TEXT_LENGTH, TEXT_DIM, generator=gen),
                             "prompt_attention_mask": empty_mask}  # fmt: skip
        self.text_keys = ["prompt_embeds", "prompt_attention_mask"]
        self.manifest = {
            "pipeline": {"pipeline_class": "PixArtSigmaPipeline"},
            "latent_shape": [4, 8, 8],
            "text_shape": [TEXT_LENGTH, TEXT_DIM],
            "resolution": 16,
        }

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, indices):
        return self.latents[indices], self.text(indices)

    def text(self, i) -> dict:
        """Caption row(s) `i`: embeddings (.., L, D) and attention mask (.., L)."""
        return {"prompt_embeds": self.embeds[i], "prompt_attention_mask": self.masks[i]}


def test_caption_dropout_swaps_embedding_and_mask_for_the_empty_prompts():
    cache = FakeCache()
    conditioning = TextConditioning(cache)
    idx = torch.tensor([0, 3, 3, 7, 9])
    drop = torch.tensor([True, False, True, False, True])
    _, cond = conditioning.batch(idx, drop, "cpu")
    embeds, masks = cond["encoder_hidden_states"], cond["encoder_attention_mask"]
    for row, (i, dropped) in enumerate(zip(idx.tolist(), drop.tolist())):
        want = cache.empty_prompt if dropped else cache.text(i)
        assert torch.equal(embeds[row], want["prompt_embeds"])
        assert torch.equal(masks[row], want["prompt_attention_mask"])  # the mask too: else padding would be attended


def test_captions_are_dropped_at_the_configured_rate_in_training(tmp_path):
    """The loop's drawn drop mask reaches the model: every sample it marks sees the empty prompt (embedding and
    mask), the others their own caption, and the marked share is the configured rate."""
    from diffusers import DDPMScheduler

    import diffcr
    from diffcr.train import train

    cfg = TrainConfig(mode="routers", steps=4, batch_size=16, label_drop_prob=0.25, checkpoint_every=4, num_threads=1)
    cache = FakeCache()
    seen = []
    model = tiny_pixart(num_layers=2)
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"])),
        with_kwargs=True,
    )
    train(tmp_path / "run", model, TextConditioning(cache), cfg, diffcr_config=diffcr.DiffCRConfig(),
          scheduler=DDPMScheduler(), progress=False)  # fmt: skip
    assert len(seen) == cfg.steps
    for step, (embeds, masks) in enumerate(seen):
        drawn = draw_global_batch(step, cfg, len(cache), (4, 8, 8), 1000)
        for row, (i, dropped) in enumerate(zip(drawn["image_idx"].tolist(), drawn["drop"].tolist())):
            source = cache.empty_prompt if dropped else cache.text(i)
            assert torch.equal(embeds[row], source["prompt_embeds"])
            assert torch.equal(masks[row], source["prompt_attention_mask"])
    # the rate: over many steps' draws, the share of dropped captions is the configured probability
    dropped = torch.cat([draw_global_batch(s, cfg, len(cache), (4, 8, 8), 1000)["drop"] for s in range(400)])
    assert abs(dropped.float().mean().item() - 0.25) < 0.02  # 6400 draws: 5 standard deviations


def test_lora_wraps_self_attention_cross_attention_and_mlp_of_every_pixart_block():
    from peft.tuners.lora import LoraLayer

    model = prepare_model(tiny_pixart(num_layers=2), TrainConfig(mode="lora", lora_rank=4))
    wrapped = sorted(name for name, module in model.named_modules() if isinstance(module, LoraLayer))
    per_block = ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v",
                 "attn2.to_k", "attn2.to_out.0", "attn2.to_q", "attn2.to_v", "ff.net.0.proj", "ff.net.2"]  # fmt: skip
    assert wrapped == sorted(f"transformer_blocks.{b}.{name}" for b in range(2) for name in per_block)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "transformer_blocks.1.attn2.to_k.lora_A.default.weight" in trainable
    assert "transformer_blocks.0.ff.net.2.lora_B.default.weight" in trainable
    assert not [name for name in trainable if "lora" not in name and not name.startswith("diffcr.")]  # base frozen
