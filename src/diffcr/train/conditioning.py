"""What the training loop needs to know about a model's conditioning, behind one small interface.

The loop draws image indices and a drop mask for the global batch, then asks the conditioning for the clean
inputs and the model's keyword arguments; dropped samples get the "no condition" input (the null class, or
the empty prompt's embedding), which is what classifier-free guidance needs at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassConditioning:
    """Class labels: a class-conditional DiT on an `ImageDataset` (images in [-1, 1])."""

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model_prediction(model, noisy, timesteps, cond)

    dataset: object
    null_class: int

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.images.shape[1:])

    def batch(self, idx: torch.Tensor, drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        """(clean (b, C, H, W), model kwargs) for dataset rows `idx`, labels dropped where `drop`."""
        clean = self.dataset.images[idx].to(device)  # (b, C, H, W)
        labels = self.dataset.labels[idx].to(device)  # (b,)
        labels = torch.where(drop.to(device), self.null_class, labels)
        return clean, {"class_labels": labels}


@dataclass
class TextConditioning:
    """Text embeddings from a prepared cache (`diffcr.data.latent_cache`): a PixArt or SD3 transformer on latents.

    Args:
        cache: a `LatentCaptionDataset`.
        use_additional_conditions: whether the transformer takes PixArt-Alpha's micro-conditions (resolution
            and aspect ratio); the cache's images are square crops at its resolution.
    """

    cache: object
    use_additional_conditions: bool = False
    timestep_divisor: float = 1.0  # Flux's transformer takes sigma = t / T, not t

    @property
    def packed(self) -> bool:
        """Flux: the transformer takes 2x2 latent patches as tokens, with position ids."""
        return self.cache.manifest["pipeline"]["pipeline_class"] == "FluxPipeline"

    def __len__(self) -> int:
        return len(self.cache)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.cache.manifest["latent_shape"])

    def check_fits(self, model) -> None:
        """Refuse a cache whose latents or text embeddings do not fit the transformer."""
        config = model.config
        channels, height, width = self.sample_shape
        text_dim = self.cache.manifest["text_shape"][1]
        model_text_dim = config.get("caption_channels") or config.get("joint_attention_dim")
        problems = []
        takes = channels * 4 if self.packed else channels  # Flux packs 2x2 latent patches into one token
        if takes != config.in_channels:
            problems.append(f"latents have {channels} channels, the transformer takes {config.in_channels}")
        if height % config.patch_size or width % config.patch_size:
            problems.append(f"latents of {height}x{width} do not split into patches of {config.patch_size}")
        if text_dim != model_text_dim:
            problems.append(f"text embeddings are {text_dim}-dim, the transformer takes {model_text_dim}")
        if problems:
            raise ValueError(
                f"the cache in {self.cache.root} does not fit this transformer: " + "; ".join(problems) + "; run "
                "`diffcr prepare` with the pipeline you compress"
            )

    def predict(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The model's prediction (b, C, h, w); Flux's latents are packed into tokens and back."""
        if not self.packed:
            return model_prediction(model, noisy, timesteps, cond)
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        tokens = FluxPipeline._pack_latents(noisy, batch, channels, height, width)  # (b, h*w/4, 4C)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        # a guidance-distilled Flux (dev) is fine-tuned at guidance 1 (no extra guidance baked in)
        guidance = torch.ones(batch, device=noisy.device) if model.config.guidance_embeds else None
        out = model(
            hidden_states=tokens,
            timestep=timesteps.float() / self.timestep_divisor,
            guidance=guidance,
            img_ids=image_ids,
            txt_ids=text_ids,
            **cond,
        ).sample  # (b, h*w/4, 4C)
        return FluxPipeline._unpack_latents(out, height, width, 1)  # (b, C, h, w)

    def batch(self, idx: torch.Tensor, drop: torch.Tensor, device) -> tuple[torch.Tensor, dict]:
        """(latents (b, C, h, w), model kwargs) for cache rows `idx`, the empty prompt where `drop`."""
        latents, text = self.cache.batch(idx)  # (b, C, h, w), {name: (b, ...)}
        for key, value in text.items():
            dropped = drop.view(-1, *([1] * (value.dim() - 1)))  # (b, 1, ...)
            text[key] = torch.where(dropped, self.cache.empty_prompt[key], value).to(device)
        if "pooled_projections" in text:  # SD3 and Flux: joint attention over every text token, no mask
            return latents.to(device), {
                "encoder_hidden_states": text["prompt_embeds"],  # (b, L, D)
                "pooled_projections": text["pooled_projections"],  # (b, P)
            }
        resolution = float(self.cache.manifest["resolution"])
        batch = latents.shape[0]
        added = {"resolution": None, "aspect_ratio": None}
        if self.use_additional_conditions:
            added = {
                "resolution": torch.tensor([[resolution, resolution]], device=device).expand(batch, 2),
                "aspect_ratio": torch.ones(batch, 1, device=device),
            }
        return latents.to(device), {
            "encoder_hidden_states": text["prompt_embeds"],  # (b, L, D)
            "encoder_attention_mask": text["prompt_attention_mask"],  # (b, L)
            "added_cond_kwargs": added,
        }


def as_conditioning(data, model):
    """`data` as a conditioning for `model`: an `ImageDataset` becomes `ClassConditioning` (checked against the
    model's classes, channels and size); a conditioning is checked with its own `check_fits`."""
    if hasattr(data, "batch") and hasattr(data, "sample_shape"):
        data.check_fits(model)
        return data
    from diffcr.models.tiny_dit import null_class_id
    from diffcr.train.config import check_dataset_fits_model

    check_dataset_fits_model(data, model)
    return ClassConditioning(data, null_class_id(model))


def model_prediction(model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
    """The model's prediction (B, C, H, W) for the input channels.

    Models with learned variance (PixArt, DiT: `out_channels == 2 * in_channels`) also predict the variance
    interpolation; the diffusion loss uses the noise half only, and the variance half gets no gradient, so it
    stays as pretrained (the samplers diffcr uses, DDIM and DPM-Solver, ignore it).
    """
    out = model(noisy, timestep=timesteps, **cond).sample
    return out[:, : noisy.shape[1]]
