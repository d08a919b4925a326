"""Digit scenes as training data for a PixArt transformer: scenes drawn on the fly, encoded by the frozen
scene VAE and text encoder, behind the training loop's conditioning interface (`diffcr.train.conditioning`)."""

from __future__ import annotations

import torch

from diffcr.train.conditioning import model_prediction

# each index draws its own scene (digits, jitter, sizes, wording), so the loop never sees the same one twice
NUM_VIRTUAL_SCENES = 10**9


class SceneConditioning:
    """Training scenes for the text-to-image default.

    Args:
        scenes: a `DigitScenes` (the "train" split).
        vae: the frozen scene `AutoencoderKL`; latents are its posterior means times `scaling_factor`.
        tokenizer, text_encoder: the frozen text encoder the pipeline uses (all-MiniLM-L6-v2 by default).
    """

    def __init__(self, scenes, vae, tokenizer, text_encoder):
        self.scenes = scenes
        self.vae = vae.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self._text_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        latent_side = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
        self._sample_shape = (vae.config.latent_channels, latent_side, latent_side)

    def __len__(self) -> int:
        return NUM_VIRTUAL_SCENES

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._sample_shape

    def check_fits(self, model) -> None:
        config = model.config
        problems = []
        if config.in_channels != self._sample_shape[0]:
            problems.append(
                f"latents have {self._sample_shape[0]} channels, the transformer takes {config.in_channels}"
            )
        if config.get("caption_channels") != self.text_encoder.config.hidden_size:
            problems.append(
                f"text embeddings are {self.text_encoder.config.hidden_size}-dim, the transformer takes "
                f"{config.get('caption_channels')}"
            )
        if problems:
            raise ValueError("the digit scenes do not fit this transformer: " + "; ".join(problems))

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model_prediction(model, noisy, timesteps, cond)

    def encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (b, L, D), mask (b, L)) for `captions`, each caption encoded once and remembered."""
        from diffcr.models.scene_pipeline import encode_captions

        missing = sorted({c for c in captions if c not in self._text_cache})
        if missing:
            embeds, mask = encode_captions(self.tokenizer, self.text_encoder, missing)
            for caption, e, m in zip(missing, embeds, mask):
                self._text_cache[caption] = (e, m)
        return (
            torch.stack([self._text_cache[c][0] for c in captions]),
            torch.stack([self._text_cache[c][1] for c in captions]),
        )

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means (b, 4, 16, 16) of images (b, 1, 64, 64) in [-1, 1]."""
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def batch(self, idx: torch.Tensor, drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        """(latents (b, 4, 16, 16), model kwargs) for scenes `idx`, the empty prompt where `drop`."""
        images, captions, _, _ = self.scenes.batch(idx)  # (b, 1, 64, 64)
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        embeds, mask = self.encode_text(captions)  # (b, L, D), (b, L)
        return self.latents(images).to(device), {
            "encoder_hidden_states": embeds.to(device),
            "encoder_attention_mask": mask.to(device),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
