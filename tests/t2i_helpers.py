"""A tiny PixArt-Sigma pipeline built offline from config (T5 tokenizer from a word list), and caption data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = "a the on left right and small large zero one two three four five six seven eight nine red blue cat dog".split()


def tiny_tokenizer():
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -float(i)) for i, w in enumerate(WORDS)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def tiny_vae(image_size: int, **options):
    """A random `AutoencoderKL`: RGB to 4 latent channels at half the size."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=image_size,
        **options,
    )


def build_tiny_pixart_pipeline(
    folder: str | Path, seed: int = 0, image_size: int = 16, micro_conditions: bool | None = False
) -> Path:
    """Save a random-weight PixArtSigmaPipeline (4-channel latents at image_size / 2, 2 blocks) to `folder`.

    `micro_conditions=None` leaves the choice to diffusers, as real PixArt-XL-2-1024-MS does: its config has no
    `use_additional_conditions` key (removed from the saved config.json here too), and the model takes
    resolution and aspect ratio when sample_size is 128 (image_size 256).
    """
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    vae = tiny_vae(image_size)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8 if micro_conditions is False else 12,  # micro-conditions split the width in 3
        in_channels=4,
        out_channels=8,
        num_layers=2,
        cross_attention_dim=16 if micro_conditions is False else 24,
        sample_size=image_size // 2,
        patch_size=2,
        caption_channels=16,
        norm_num_groups=2,
        use_additional_conditions=micro_conditions,
    )
    with torch.no_grad():  # random modulation, so that blocks are not the identity
        for block in transformer.transformer_blocks:
            block.scale_shift_table.normal_(0, 0.3)
    pipe = PixArtSigmaPipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.save_pretrained(folder)
    if micro_conditions is None:
        import json

        config_file = Path(folder) / "transformer" / "config.json"
        config = json.loads(config_file.read_text())
        del config["use_additional_conditions"]
        config_file.write_text(json.dumps(config, indent=2))
    return Path(folder)


def write_caption_folder(folder: str | Path, count: int = 6, size: int = 20, seed: int = 0) -> Path:
    """`count` random RGB images with same-stem .txt captions."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a {WORDS[8 + i % 10]} on the {'left' if i % 2 else 'right'}")
    return folder


def tiny_clip_tokenizer(folder: Path):
    """A character-level CLIP tokenizer written offline (vocab.json + merges.txt with no merges)."""
    import json
    import string

    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77
    )
    return tokenizer, len(vocab)


def build_tiny_sd3_pipeline(folder: str | Path, seed: int = 0, image_size: int = 16) -> Path:
    """Save a random-weight StableDiffusion3Pipeline (two CLIP encoders, a T5, flow matching) to `folder`."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_tokenizer, vocab_size = tiny_clip_tokenizer(folder.parent / f"{folder.name}-clip-vocab")

    def clip():
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=16,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )  # fmt: skip
        )

    vae = tiny_vae(image_size, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    with torch.no_grad():  # adaLN-Zero starts as the identity: random modulation, so that blocks do something
        for block in transformer.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip(),
        tokenizer=clip_tokenizer,
        text_encoder_2=clip(),
        tokenizer_2=clip_tokenizer,
        text_encoder_3=T5EncoderModel(
            T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        ),  # fmt: skip
        tokenizer_3=tiny_tokenizer(),
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_flux_pipeline(folder: str | Path, seed: int = 0, image_size: int = 16) -> Path:
    """Save a random-weight FluxPipeline (CLIP and T5 encoders, flow matching, packed latents) to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    clip_tokenizer, vocab_size = tiny_clip_tokenizer(folder.parent / f"{folder.name}-clip-vocab")
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )  # fmt: skip
    )
    vae = tiny_vae(image_size, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=[4, 4, 8],
    )
    with torch.no_grad():  # adaLN-Zero starts as the identity: random modulation, so that blocks do something
        for module in transformer.modules():
            if type(module).__name__ in ("AdaLayerNormZero", "AdaLayerNormZeroSingle"):
                module.linear.weight.normal_(0, 0.3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tiny_tokenizer(),
        transformer=transformer,
    )
    pipe.save_pretrained(folder)
    return folder
