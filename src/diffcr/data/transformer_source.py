"""A transformer loaded from somewhere else than its pipeline: `--transformer PATH_OR_REPO`.

Some checkpoints ship only a transformer. PixArt-Sigma's 512 px model (`PixArt-alpha/PixArt-Sigma-XL-2-512-MS`)
holds `transformer/` and nothing else, and PixArt's own instructions pair it with the VAE, T5 and scheduler of
`PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers`:

    transformer = PixArtTransformer2DModel.from_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-512-MS",
                                                           subfolder="transformer")
    pipe = PixArtSigmaPipeline.from_pretrained("PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers",
                                               transformer=transformer)

`load_transformer` does the first line with clear errors; `diffcr.data.latent_cache.load_text_to_image_pipeline`
passes the result as the second line does, so diffusers never loads (or downloads) the pipeline's own transformer.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_SUBFOLDER = "transformer"

# the transformer class each supported pipeline takes; "Transformer2DModel" is the name older PixArt checkpoint
# configs carry (diffusers maps them onto PixArtTransformer2DModel)
TRANSFORMER_CLASSES = {
    "PixArtSigmaPipeline": ("PixArtTransformer2DModel", "Transformer2DModel"),
    "PixArtAlphaPipeline": ("PixArtTransformer2DModel", "Transformer2DModel"),
    "StableDiffusion3Pipeline": ("SD3Transformer2DModel",),
    "FluxPipeline": ("FluxTransformer2DModel",),
}


def local_subfolder(source: str | Path, subfolder: str | None) -> str | None:
    """Where in a local folder the transformer's `config.json` is: `subfolder`, else the folder itself (a
    transformer saved with `save_pretrained` has its config at the top).

    Raises:
        ValueError: neither holds a `config.json`.
    """
    folder = Path(source)
    if subfolder and (folder / subfolder / "config.json").is_file():
        return subfolder
    if (folder / "config.json").is_file():
        return None
    looked = folder / "config.json"
    if subfolder:
        looked = f"{folder / subfolder / 'config.json'} nor {looked}"
    raise ValueError(
        f"--transformer {source} holds no transformer: there is no {looked}. Pass a transformer folder (as "
        "`save_pretrained` writes it) or a repo id, and --transformer-subfolder where it sits inside"
    )


def load_transformer(source: str | Path, subfolder: str | None, pipeline_class: str, **kwargs):
    """The transformer at `source` (a local folder or a hub repo id), of the class `pipeline_class` takes.

    Args:
        source: a folder or repo id.
        subfolder: where the transformer sits inside it ("transformer" in a pipeline or in PixArt's 512 px repo;
            None or "" for the top level). A local folder without it is read at its top level.
        pipeline_class: the `_class_name` of the pipeline it goes into.
        **kwargs: passed to diffusers' `from_pretrained` (e.g. `torch_dtype`).

    Raises:
        ValueError: nothing loadable there, or a model of another class (the message names both).
    """
    import diffusers

    if pipeline_class not in TRANSFORMER_CLASSES:
        raise ValueError(f"--transformer: a {pipeline_class} takes no separate transformer that diffcr knows")
    accepted = TRANSFORMER_CLASSES[pipeline_class]
    subfolder = subfolder or None
    if Path(str(source)).is_dir():
        subfolder = local_subfolder(source, subfolder)
        config_file = Path(source) / (subfolder or "") / "config.json"
        try:
            found = json.loads(config_file.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"--transformer: {config_file} is not a model config ({err})") from err
        if found not in accepted:
            raise ValueError(
                f"--transformer: {config_file} describes a {found}, but a {pipeline_class} takes a {accepted[0]}; "
                "pass the transformer of this kind of pipeline"
            )
    model_cls = getattr(diffusers, accepted[0])
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    try:
        return model_cls.from_pretrained(str(source), subfolder=subfolder, use_safetensors=True, **kwargs)
    except OSError as err:
        where = f"{source} (subfolder {subfolder!r})" if subfolder else str(source)
        raise ValueError(
            f"cannot load a {accepted[0]} from --transformer {where} (diffcr reads safetensors weights only): {err}"
        ) from err


def check_transformer_fits(pipe, source: str | Path) -> None:
    """Refuse a transformer that cannot take this pipeline's latents or text (it would fail mid-sampling)."""
    config = pipe.transformer.config
    problems = []
    latent_channels = pipe.vae.config.get("latent_channels")
    takes = config.get("in_channels")
    if type(pipe).__name__ == "FluxPipeline":  # Flux packs 2x2 latent patches into one token
        takes = takes // 4 if takes else takes
    if latent_channels is not None and takes is not None and takes != latent_channels:
        problems.append(f"it takes {takes} latent channels, the VAE makes {latent_channels}")
    caption_channels = config.get("caption_channels")
    text_width = getattr(getattr(pipe, "text_encoder", None), "config", None)
    text_width = getattr(text_width, "d_model", None)
    if caption_channels is not None and text_width is not None and caption_channels != text_width:
        problems.append(f"it takes {caption_channels}-dim text embeddings, the text encoder makes {text_width}")
    if problems:
        raise ValueError(
            f"--transformer {source} does not fit the pipeline's other parts: " + "; ".join(problems) + ". Pass a "
            "transformer trained with this pipeline's VAE and text encoder"
        )
