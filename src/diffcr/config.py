"""`DiffCRConfig`: what `diffcr.apply` attaches, validated on construction, versioned as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

CONFIG_TYPE = "DiffCRConfig"
CONFIG_VERSION = 1
GATES = ("straight_through", "sigmoid_block", "sigmoid_mlp")
DEFAULT_RATIO_BINS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
# more regions than this leave most regions without a single training timestep (the paper found 4..10 useful)
MAX_TIMESTEP_REGIONS = 1000
# the authors' code weights the ratio loss 50; far above that it drowns the diffusion loss and the model
MAX_RATIO_LOSS_WEIGHT = 1e4
# how far target_kept_ratio may sit from the mean of region_targets (rounding in a JSON or on a command line)
REGION_TARGETS_TOLERANCE = 1e-3


def _check_number(name: str, value, integer: bool = False) -> None:
    """Refuse what is not a finite real number (or integer): a clear message instead of a later TypeError."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name}={value!r} must be {kind}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be finite")


@dataclass(frozen=True)
class DiffCRConfig:
    """How DiffCR routes tokens and learns kept ratios.

    Args:
        target_kept_ratio: mean fraction of image tokens the blocks should compute, in (0, 1]
            (0.8 = the paper's "20 % compression").
        timestep_regions: R, the number of equal timestep regions with their own ratios (1 = DiffCR-L,
            layer ratios only; 4 = the paper's text-to-image DiffCR-LT).
        ratio_bins: kept-ratio bins, strictly descending, starting at 1.0; 0.0 allowed (whole-block skip).
        gate: how the router learns through the top-k choice: "straight_through" (forward exactly the
            model's own output), "sigmoid_block" (the paper: block update x router score) or "sigmoid_mlp"
            (the authors' pseudocode: only the MLP update x router score).
        ratio_loss_weight: lambda in loss = diffusion_loss + lambda * ratio_loss.
        num_train_timesteps: T, the timestep range cut into regions; None = the model's own, else 1000.
        init_kept_ratio: starting value of every learnable kept ratio (1.0 = dense).
        region_coupling: with more than one timestep region, share each layer's ratio gradient among its
            regions during training (a layer ratio plus per-region offsets; docs/METHOD.md section 3), so that
            DiffCR-LT learns its layers' shares from every sample, as DiffCR-L does. Inference is unaffected.
        region_offset_lr: with `region_coupling`, how fast the regions of a layer may depart from their layer's
            share: the per-region offsets' learning rate relative to the layer ratio's (0 = the regions move
            together, as DiffCR-L's one ratio; 1 = as fast as the layer). At 0.05 DiffCR-LT matched or beat
            DiffCR-L at 1.5x and 2x on the shipped DiT (0.2 beat it at 1.5x and lost at 2x; docs/RESULTS.md).
        route_cross_attention: True (the paper): a bypassed token skips the whole block, cross-attention
            included. False (a diffcr extension, PixArt's adaLN-single blocks only): a bypassed token still gets
            the block's cross-attention update, so the caption reaches every token in every block; it costs the
            cross-attention on every token (about 13 % of a block's FLOPs on the shipped text-to-image default,
            where it raised prompt accuracy from 31 % to 51-54 % at half the tokens; docs/RESULTS.md).
        region_targets: None (the paper): one target, `target_kept_ratio`, for the mean of the whole table.
            Or a kept-ratio target per timestep region, from the cleanest (t near 0) to the noisiest (a diffcr
            extension): the ratio loss pulls the mean over blocks of each sample's kept ratios to its own
            region's target, and the blocks' shares within a region are still learned. Their mean must be
            `target_kept_ratio`. A region whose target is 1.0 runs dense: its ratios are not learned, and
            training runs one pass per block there instead of two. For when the diffusion loss's weighting puts
            compute where your metric does not look: on the shipped text-to-image default the learned table kept
            the cleanest region dense, while the digits are decided at t 250-499 (docs/RESULTS.md).

    Example:
        >>> DiffCRConfig(target_kept_ratio=0.8, timestep_regions=4).ratio_bins[:3]
        (1.0, 0.9, 0.8)
    """

    target_kept_ratio: float = 0.8
    timestep_regions: int = 4
    ratio_bins: tuple[float, ...] = field(default=DEFAULT_RATIO_BINS)
    gate: str = "straight_through"
    ratio_loss_weight: float = 0.3
    num_train_timesteps: int | None = None
    init_kept_ratio: float = 1.0
    region_coupling: bool = True
    region_offset_lr: float = 0.05
    route_cross_attention: bool = True
    region_targets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        _check_number("target_kept_ratio", self.target_kept_ratio)
        _check_number("timestep_regions", self.timestep_regions, integer=True)
        _check_number("ratio_loss_weight", self.ratio_loss_weight)
        _check_number("init_kept_ratio", self.init_kept_ratio)
        if not isinstance(self.region_coupling, bool):
            raise ValueError(f"region_coupling={self.region_coupling!r} must be true or false")
        _check_number("region_offset_lr", self.region_offset_lr)
        if not isinstance(self.route_cross_attention, bool):
            raise ValueError(f"route_cross_attention={self.route_cross_attention!r} must be true or false")
        if not 0.0 <= self.region_offset_lr <= 1.0:
            raise ValueError(
                f"region_offset_lr={self.region_offset_lr} must be in [0, 1] (0: regions move with their layer; "
                "1: as fast as the layer)"
            )
        if self.num_train_timesteps is not None:
            _check_number("num_train_timesteps", self.num_train_timesteps, integer=True)
        if not isinstance(self.gate, str) or self.gate not in GATES:
            raise ValueError(f"gate={self.gate!r} is not one of {GATES}")
        if isinstance(self.ratio_bins, (str, bytes)) or not hasattr(self.ratio_bins, "__iter__"):
            raise ValueError(f"ratio_bins={self.ratio_bins!r} must be a sequence of kept ratios, e.g. (1.0, 0.9, 0.8)")
        for value in self.ratio_bins:
            _check_number("a value of ratio_bins", value)
        object.__setattr__(self, "ratio_bins", tuple(float(b) for b in self.ratio_bins))
        if not 0.0 < self.target_kept_ratio <= 1.0:
            raise ValueError(
                f"target_kept_ratio={self.target_kept_ratio} is outside (0, 1]; it is the fraction of tokens "
                "kept (0.8 = 20 % compression)"
            )
        if not 1 <= self.timestep_regions <= MAX_TIMESTEP_REGIONS:
            raise ValueError(
                f"timestep_regions={self.timestep_regions} must be in [1, {MAX_TIMESTEP_REGIONS}] (1 = DiffCR-L; "
                "the paper uses 4 to 10)"
            )
        bins = self.ratio_bins
        if len(bins) < 2:
            raise ValueError(f"ratio_bins={bins} needs at least two bins, e.g. (1.0, 0.9, ..., 0.1)")
        bad = [b for b in bins if not 0.0 <= b <= 1.0]
        if bad:
            raise ValueError(f"ratio_bins has values outside [0, 1]: {bad}; bins are kept ratios")
        if len(set(bins)) != len(bins):
            raise ValueError(f"ratio_bins={bins} has duplicates; give each kept ratio once")
        if list(bins) != sorted(bins, reverse=True):
            raise ValueError(f"ratio_bins={bins} must be sorted descending, e.g. {tuple(sorted(bins, reverse=True))}")
        if bins[0] != 1.0:
            raise ValueError(f"ratio_bins={bins} must start at 1.0 so that a layer can stay dense")
        if self.target_kept_ratio < bins[-1]:
            raise ValueError(
                f"target_kept_ratio={self.target_kept_ratio} is below the lowest bin {bins[-1]}: no schedule can "
                f"reach it; raise the target or add lower bins (ratio_bins={bins})"
            )
        if not 0.0 <= self.ratio_loss_weight <= MAX_RATIO_LOSS_WEIGHT:
            raise ValueError(
                f"ratio_loss_weight={self.ratio_loss_weight} must be in [0, {MAX_RATIO_LOSS_WEIGHT:g}] (the paper: "
                "0.3; the authors' code: 50); far larger weights drown the diffusion loss"
            )
        if self.num_train_timesteps is not None and self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps} must be >= 1 (or None)")
        if not bins[-1] <= self.init_kept_ratio <= 1.0:
            raise ValueError(f"init_kept_ratio={self.init_kept_ratio} must lie in [{bins[-1]}, 1.0] (the bins' range)")
        if self.region_targets is not None:
            self._check_region_targets()

    def _check_region_targets(self) -> None:
        targets = self.region_targets
        if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
            raise ValueError(f"region_targets={targets!r} must be a sequence of kept ratios, one per timestep region")
        for value in targets:
            _check_number("a value of region_targets", value)
        targets = tuple(float(t) for t in targets)
        object.__setattr__(self, "region_targets", targets)
        if self.timestep_regions == 1:
            raise ValueError(
                "region_targets needs timestep_regions > 1; with one region the target is target_kept_ratio"
            )
        if len(targets) != self.timestep_regions:
            raise ValueError(
                f"region_targets has {len(targets)} values for timestep_regions={self.timestep_regions}; give one "
                "target per region, from the cleanest (t near 0) to the noisiest"
            )
        low = self.ratio_bins[-1]
        outside = [t for t in targets if not low <= t <= 1.0]
        if outside:
            raise ValueError(
                f"region_targets {outside} lie outside the bins' range [{low}, 1.0]: no schedule reaches them"
            )
        mean = sum(targets) / len(targets)
        if abs(mean - self.target_kept_ratio) > REGION_TARGETS_TOLERANCE:
            raise ValueError(
                f"target_kept_ratio={self.target_kept_ratio} is not the mean of region_targets {targets} "
                f"({mean:.4g}); set target_kept_ratio={mean:.4g}"
            )

    def replace(self, **changes) -> DiffCRConfig:
        return DiffCRConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["ratio_bins"] = list(self.ratio_bins)
        if self.region_targets is not None:
            payload["region_targets"] = list(self.region_targets)
        return {"_type": CONFIG_TYPE, "_version": CONFIG_VERSION, **payload}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, payload: dict) -> DiffCRConfig:
        """Build from `to_dict` output; refuses other types, newer versions and unknown keys."""
        if not isinstance(payload, dict):
            raise ValueError(f"a {CONFIG_TYPE} JSON must be an object, got {type(payload).__name__}")
        payload = dict(payload)
        kind = payload.pop("_type", CONFIG_TYPE)
        version = payload.pop("_version", CONFIG_VERSION)
        if kind != CONFIG_TYPE:
            raise ValueError(f"expected a {CONFIG_TYPE} JSON, got _type={kind!r}")
        if not isinstance(version, int) or version > CONFIG_VERSION or version < 1:
            raise ValueError(
                f"{CONFIG_TYPE} _version={version!r} is not supported by this diffcr (reads versions 1.."
                f"{CONFIG_VERSION}); upgrade diffcr"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"unknown {CONFIG_TYPE} keys {unknown}; valid keys: {sorted(known)}")
        if isinstance(payload.get("ratio_bins"), list):
            payload["ratio_bins"] = tuple(payload["ratio_bins"])
        if isinstance(payload.get("region_targets"), list):
            payload["region_targets"] = tuple(payload["region_targets"])
        return cls(**payload)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> DiffCRConfig:
        """Parse a JSON string, or read a `.json` file (e.g. a preset in `configs/`)."""
        text = str(text_or_path)
        source = "the JSON text"
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            if not path.is_file():
                raise FileNotFoundError(f"no {CONFIG_TYPE} JSON file at {path} (see configs/*.json for presets)")
            text, source = path.read_text(), str(path)
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON ({err}); a {CONFIG_TYPE} looks like configs/*.json") from err
        return cls.from_dict(payload)
