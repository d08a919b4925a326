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
        focus_digits, focus_fraction: over-sample two-digit scenes that hold one of `focus_digits`: the first
            `focus_fraction` of every batch are such scenes (each index moves to the next index whose scene is
            one, so the batch stays a function of its indices). Empty / 0: every scene as drawn.
    """

    def __init__(self, scenes, vae, tokenizer, text_encoder, focus_digits=(), focus_fraction: float = 0.0):
        if not 0.0 <= focus_fraction <= 1.0:
            raise ValueError(f"focus_fraction={focus_fraction} must be in [0, 1]")
        if focus_fraction and not focus_digits:
            raise ValueError("focus_fraction > 0 needs focus_digits (the digits whose scenes to over-sample)")
        bad = [d for d in focus_digits if d not in range(10)]
        if bad:
            raise ValueError(f"focus_digits {bad} are not digits 0-9")
        self.focus_digits = frozenset(focus_digits)
        self.focus_fraction = focus_fraction
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

    def focused(self, index: int) -> int:
        """The first index from `index` on whose scene holds two digits, one of them in `focus_digits`."""
        while True:
            left, right = self.scenes.spec(index).digits
            if left is not None and right is not None and {left, right} & self.focus_digits:
                return index
            index += 1

    def batch(self, idx: torch.Tensor, drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        """(latents (b, 4, 16, 16), model kwargs) for scenes `idx`, the empty prompt where `drop`."""
        num_focused = round(self.focus_fraction * len(idx))
        if num_focused:
            idx = torch.tensor([self.focused(int(i)) for i in idx[:num_focused]] + idx[num_focused:].tolist())
        images, captions, _, _ = self.scenes.batch(idx)  # (b, 1, 64, 64)
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
        embeds, mask = self.encode_text(captions)  # (b, L, D), (b, L)
        return self.latents(images).to(device), {
            "encoder_hidden_states": embeds.to(device),
            "encoder_attention_mask": mask.to(device),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
