"""Token merging (ToMe for Stable Diffusion, Bolya & Hoffman 2023) on diffusers' DiT, through the `tomesd`
package.

tomesd patches every `BasicTransformerBlock`, and its patched forward handles adaLN-Zero, so it runs on
diffusers' DiT as is. One setting matters: tomesd merges only in layers whose downsampling (input pixels per
token, as it infers it) is at most `max_downsample`, default 1. A DiT's patch size is such a downsampling (2
for DiT-XL/2), so with the defaults tomesd silently merges nothing; `apply_tome` sets it to the patch size.
"""

from __future__ import annotations


def _tomesd():
    try:
        import tomesd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("ToMe needs the tomesd package: pip install 'diffcr[bench]' (or pip install tomesd)") from err
    return tomesd


def apply_tome(model, ratio: float, merge_mlp: bool = True):
    """Patch `model` in place with ToMe merging `ratio` of the tokens in every block.

    Args:
        ratio: fraction of tokens merged away, at most 0.75 (tomesd's 2x2 destination stride).
        merge_mlp: also run the MLP on merged tokens (tomesd's default merges for attention only, which
            saves little in a DiT, whose MLP holds most of the FLOPs).
    """
    if not 0.0 <= ratio <= 0.75:
        raise ValueError(f"ToMe ratio={ratio} must lie in [0, 0.75] (tomesd merges at most 3 of each 4 tokens)")
    for block in model.transformer_blocks:
        if getattr(block, "norm_type", None) not in ("ada_norm_zero", "layer_norm", "ada_norm"):
            raise TypeError(f"tomesd's patched block does not handle norm_type={getattr(block, 'norm_type', None)!r}")
    tomesd = _tomesd()
    # use_rand=False: the destination token of each 2x2 cell is fixed, so every run merges alike
    tomesd.apply_patch(
        model,
        ratio=ratio,
        max_downsample=int(model.config.patch_size),
        merge_attn=True,
        merge_mlp=merge_mlp,
        use_rand=False,
    )
    return model


def remove_tome(model):
    _tomesd().remove_patch(model)
    return model
