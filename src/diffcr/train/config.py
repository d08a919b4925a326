"""What a training run is: `TrainConfig` (validated), the checks that run before any work, and the errors."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

TRAIN_MODES = ("pretrain", "routers", "lora", "full")


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


SEED_LIMIT = 2**32  # seeds are mixed with the step (seed * 1_000_003 + step) and must stay inside int64


MAX_BATCH_SIZE = 65_536  # the whole global batch of noise is drawn at once in host memory


# name: (lowest, highest, why the highest): the highest values stop typos (10**9) before they allocate
INT_LIMITS = {
    "steps": (1, 10**8, "a run of more steps would not finish"),
    "batch_size": (1, MAX_BATCH_SIZE, "each step draws its whole global batch of noise at once in memory"),
    "checkpoint_every": (1, 10**8, "checkpoints are counted in steps"),
    "lora_rank": (1, 4096, "a LoRA rank above the layers' width adds nothing"),
    "warmup_steps": (0, 10**8, "warmup is counted in steps"),
    "seed": (0, SEED_LIMIT - 1, "seeds are 32-bit"),
    "num_threads": (1, 4096, "CPU threads per process"),
    "average_from": (0, 10**8, "the first step whose weights join the average, or 0 for no average"),
    "freeze_schedule_at": (0, 10**8, "the step after which the kept ratios stay at their bins, or 0 for never"),
}


# name: (lowest, whether the lowest is excluded, what it is); every one must also be finite
FLOAT_LIMITS = {
    # 0 is allowed: it holds a group fixed (the uniform-routing baseline keeps its kept ratios with ratio_lr=0)
    "lr": (0.0, False, "the base (or LoRA) learning rate"),
    "router_lr": (0.0, False, "the routers' learning rate"),
    "ratio_lr": (0.0, False, "the kept ratios' learning rate"),
    "weight_decay": (0.0, False, "AdamW's decoupled weight decay"),
    "grad_clip": (0.0, False, "the gradient-norm clip (0 = no clipping)"),
}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during training; the message says where the last checkpoint is."""


SNR_WEIGHTINGS = ("min", "inverse")


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """How to train. `mode`: "pretrain" (dense, no DiffCR), "routers" (routers and ratios only), "lora"
    (peft LoRA on the blocks plus routers and ratios) or "full" (everything)."""

    mode: str = "full"
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-4
    router_lr: float = 1e-3
    ratio_lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    label_drop_prob: float = 0.1
    mixed_precision: str = "auto"
    checkpoint_every: int = 100
    seed: int = 0
    distill: bool = False
    lora_rank: int = 32
    gradient_checkpointing: bool = False
    max_minutes: float | None = None
    num_threads: int | None = 2
    # min-SNR-gamma loss weighting (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    # ICCV 2023): None = the plain diffusion MSE; 5 is the paper's value
    snr_gamma: float | None = None
    # "min": min-SNR-gamma; "inverse": clamp(1 / SNR, 1, gamma), which turns the epsilon loss of noisy steps into
    # an x0 loss (capped), where a text-to-image model must learn what the prompt says
    snr_weighting: str = "min"
    # pretraining only: the chance that a block routes a random subset of the image tokens past itself, drawn per
    # (block, timestep region) and step, at a kept ratio drawn from 0.9 ... 0.1 (`diffcr.train.bypass`); 0 = dense
    token_bypass: float = 0.0
    # "constant" after warmup, or "cosine": every learning rate decays to 0 at `steps`
    lr_schedule: str = "constant"
    # > 0: the model a run returns (and so exports) is the mean of its weights at every multiple of
    # `checkpoint_every` from this step on and at the step it ends on (`diffcr.train.averaging`); the checkpoints
    # hold the weights as trained, and the running mean beside them
    average_from: int = 0
    # > 0: after this many steps the kept-ratio table snaps to its nearest bins and stays there; the routers and
    # the weights go on training at that schedule with one pass per block, as at inference, instead of the two
    # blended passes a learnable ratio needs (about half the step's cost at kept 0.5; docs/RESULTS.md)
    freeze_schedule_at: int = 0

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {TRAIN_MODES}; choose one of them")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(f"mixed_precision={self.mixed_precision!r}; use 'auto', 'no', 'bf16' or 'fp16'")
        for name, (low, high, why) in INT_LIMITS.items():
            value = getattr(self, name)
            if name == "num_threads" and value is None:
                continue
            _check_int(name, value, low, high, why)
        for name, (low, low_open, what) in FLOAT_LIMITS.items():
            _check_float(name, getattr(self, name), low, low_open, what)
        if self.max_minutes is not None:
            _check_float("max_minutes", self.max_minutes, 0.0, True, "a time limit in minutes (or None for none)")
        if self.snr_gamma is not None:
            _check_float("snr_gamma", self.snr_gamma, 0.0, True, "the min-SNR weighting's gamma (or None for none)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if self.snr_weighting not in SNR_WEIGHTINGS:
            raise ValueError(f"snr_weighting={self.snr_weighting!r} must be one of {SNR_WEIGHTINGS}")
        if not 0.0 <= self.label_drop_prob < 1.0:  # also refuses NaN
            raise ValueError(f"label_drop_prob={self.label_drop_prob} must be in [0, 1)")
        if isinstance(self.token_bypass, bool) or not isinstance(self.token_bypass, (int, float)):
            raise ValueError(f"token_bypass={self.token_bypass!r} must be a probability in [0, 1]")
        if not 0.0 <= self.token_bypass <= 1.0:  # also refuses NaN
            raise ValueError(f"token_bypass={self.token_bypass} must be a probability in [0, 1]")
        if self.token_bypass and self.mode != "pretrain":
            raise ValueError(
                f"token_bypass is for pretraining (mode 'pretrain'), not mode {self.mode!r}: DiffCR modes route by "
                "their learned routers"
            )
        if self.average_from > self.steps:
            raise ValueError(
                f"average_from={self.average_from} is after the last step ({self.steps}): no weights would be "
                f"averaged; give a step in 1..{self.steps}, or 0 for no average"
            )
        if self.average_from and self.mode == "lora":
            raise ValueError(
                "average_from does not work with mode 'lora': the mean of LoRA's two factors is not the mean of the "
                "weight change they make; use mode 'full' or 'routers', or average_from=0"
            )
        if self.freeze_schedule_at > self.steps:
            raise ValueError(
                f"freeze_schedule_at={self.freeze_schedule_at} is after the last step ({self.steps}): the schedule "
                f"would never be frozen; give a step in 1..{self.steps}, or 0 to let the kept ratios learn "
                "throughout (a resumed run keeps its freeze_schedule_at: give it at least that many steps)"
            )
        if self.freeze_schedule_at and self.mode == "pretrain":
            raise ValueError(
                f"freeze_schedule_at={self.freeze_schedule_at} freezes DiffCR's kept ratios, which pretraining has "
                "none of: use a DiffCR mode (routers, lora or full), or 0 when pretraining"
            )
        if 0 < self.average_from < self.freeze_schedule_at:
            raise ValueError(
                f"average_from={self.average_from} is before freeze_schedule_at={self.freeze_schedule_at}: the "
                "average would mix kept-ratio tables from before the freeze, and the artifact could ship bins the "
                f"weights never trained at; give average_from >= {self.freeze_schedule_at}"
            )
        if self.distill and self.mode == "pretrain":
            raise ValueError("distill needs a DiffCR mode (routers, lora or full): pretraining has no teacher")

    @classmethod
    def from_dict(cls, payload: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(payload) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**payload)


def _check_int(name: str, value, low: int, high: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be a whole number in [{low}, {high}]")
    if not low <= value <= high:
        raise ValueError(f"{name}={value} is outside [{low}, {high}] ({why}); choose a value in that range")


def _check_float(name: str, value, low: float, low_open: bool, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number ({what})")
    if value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{name}={value} must be {bound} ({what})")


# lambda scales the ratio loss against the diffusion loss (about 0.01 to 1): far above this bound the ratio
# term is all the gradient sees, so routers learn nothing about image quality and the run is a misconfiguration
MAX_RATIO_LOSS_WEIGHT = 1e4


def check_diffcr_config(diffcr_config, num_train_timesteps: int, continuous: bool = False) -> None:
    """Refuse a DiffCR config that cannot train a model receiving timesteps in [0, `num_train_timesteps`].

    Args:
        num_train_timesteps: the end of the range the model receives (`diffcr.train.timesteps`): the scheduler's
            steps for PixArt, DiT and SD3, 1 for Flux (sigma).
        continuous: the model receives a continuous timestep, so any number of regions cuts its range.

    Raises:
        ValueError: the config's `num_train_timesteps` is not the model's (its regions would cut the wrong
            timestep range), there are more regions than timesteps, or lambda is not finite or absurdly large.
    """
    if diffcr_config is None:
        return
    given = diffcr_config.num_train_timesteps
    if given is not None and given != num_train_timesteps:
        raise ValueError(
            f"the DiffCR config has num_train_timesteps={given} but the model receives timesteps in "
            f"[0, {num_train_timesteps}]: its regions would cut the wrong range. Set num_train_timesteps to "
            f"{num_train_timesteps} (or null, to take the model's) in the config"
        )
    regions = diffcr_config.timestep_regions
    if regions > num_train_timesteps and not continuous:
        raise ValueError(
            f"timestep_regions={regions} is more than the scheduler's {num_train_timesteps} timesteps; "
            f"use 1..{num_train_timesteps} regions (the paper uses 1 or 4)"
        )
    weight = diffcr_config.ratio_loss_weight
    if not math.isfinite(weight) or not 0 <= weight <= MAX_RATIO_LOSS_WEIGHT:
        raise ValueError(
            f"ratio_loss_weight (--lambda) = {weight} must be a finite number in [0, {MAX_RATIO_LOSS_WEIGHT:g}]: it "
            "weighs the ratio loss against the diffusion loss (typically 0.01 to 1), and far above that only the "
            "ratio target would be learned"
        )


def check_mixed_precision(choice: str) -> None:
    """Refuse a mixed precision this machine cannot run (accelerate would fail only after setup)."""
    if choice == "fp16" and not torch.cuda.is_available():
        raise ValueError("mixed_precision='fp16' needs a CUDA GPU; on a CPU use 'no' (or 'bf16')")


def check_dataset_fits_model(dataset, model) -> None:
    """Refuse training data whose image shape or classes the model cannot take.

    Raises:
        ValueError: images are not (C, H, W) = (in_channels, sample_size, sample_size), a label is the model's
            null class or beyond it (class-conditional DiTs reserve id `num_embeds_ada_norm` for "no class"),
            or the images hold NaN / infinite values.
    """
    config = model.config
    expected = (config.in_channels, config.sample_size, config.sample_size)
    got = tuple(dataset.images.shape[1:])
    if got != expected:
        raise ValueError(
            f"the training images are {got[0]}x{got[1]}x{got[2]} (channels x height x width) but the base model "
            f"takes {expected[0]}x{expected[1]}x{expected[2]}: use images of the model's size and channels "
            "(an image folder is resized to the model's size; convert colour to grayscale or back as needed)"
        )
    num_classes = getattr(config, "num_embeds_ada_norm", None)
    if num_classes is not None and len(dataset) and int(dataset.labels.max()) >= num_classes:
        names = getattr(dataset, "class_names", ())
        raise ValueError(
            f"the data has {max(len(names), int(dataset.labels.max()) + 1)} classes but the base model has "
            f"{num_classes} (ids 0..{num_classes - 1}; id {num_classes} is its null class for guidance): "
            f"use at most {num_classes} class folders, or pretrain a base with more classes"
        )
    if len(dataset) and int(dataset.labels.min()) < 0:
        raise ValueError(f"the data has a negative class label ({int(dataset.labels.min())}); labels start at 0")
    if not torch.isfinite(dataset.images).all():
        raise ValueError("the training images hold NaN or infinite values; check the data")


@dataclass
class TrainResult:
    run_dir: Path
    model: torch.nn.Module
    steps_done: int
    seconds: float
    # the steps whose weights `model` holds the mean of (empty: the weights after the last step)
    averaged_steps: tuple[int, ...] = ()
