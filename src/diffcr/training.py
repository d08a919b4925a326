"""One training loop for pretraining a base DiT and for compressing it with DiffCR, on accelerate.

The loop reads top to bottom: pick the step's samples, noise them, predict, add the ratio loss, step.
Everything random in a step (which images, which timesteps, which labels are dropped, the noise) is drawn
from a generator seeded by (seed, step) for the *global* batch, and each process takes its shard of it. So a
resumed run repeats exactly the steps the uninterrupted run would have taken, and N processes see the same
samples as one process does.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcr.checkpoint import (  # noqa: F401 - RunInUse is re-exported for callers of train
    CheckpointError,
    RunInUse,
    check_writable_dir,
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_tensors,
    run_lock,
    save_checkpoint,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

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
LORA_TARGETS = r".*transformer_blocks\.\d+\.(attn1\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during training; the message says where the last checkpoint is."""


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
    max_minutes: float | None = None
    num_threads: int | None = 2

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
        if not 0.0 <= self.label_drop_prob < 1.0:  # also refuses NaN
            raise ValueError(f"label_drop_prob={self.label_drop_prob} must be in [0, 1)")
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


def check_diffcr_config(diffcr_config, num_train_timesteps: int) -> None:
    """Refuse a DiffCR config that cannot train against a scheduler with `num_train_timesteps` steps.

    Raises:
        ValueError: the config's `num_train_timesteps` is not the scheduler's (its regions would cut the wrong
            timestep range), there are more regions than timesteps, or lambda is not finite or absurdly large.
    """
    if diffcr_config is None:
        return
    given = diffcr_config.num_train_timesteps
    if given is not None and given != num_train_timesteps:
        raise ValueError(
            f"the DiffCR config has num_train_timesteps={given} but the noise scheduler trains on "
            f"{num_train_timesteps} timesteps: its regions would cut the wrong range. Set num_train_timesteps to "
            f"{num_train_timesteps} (or null, to take the scheduler's) in the config"
        )
    regions = diffcr_config.timestep_regions
    if regions > num_train_timesteps:
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


def is_main_process() -> bool:
    """Whether this is the process that writes files, under `accelerate launch` or alone.

    It sets up accelerate's shared state as `train` does (cpu=True on a CPU-only machine, which is what makes
    torchrun-launched processes form a gloo group), so asking before training does not change the setup.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def disable_label_dropout(model: torch.nn.Module) -> None:
    """Stop diffusers' DiT blocks from dropping class labels on their own in train mode.

    Each DiT block's label embedder drops labels independently (10 %) when training, so different blocks
    would see different labels for one sample; the loop drops labels once, for the whole model, instead.
    """
    for module in model.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0


def resolve_mixed_precision(choice: str) -> str:
    """ "auto" means bf16 on CUDA and fp32 elsewhere: CPUs without native bf16 emulate it, which was 7x
    slower than fp32 on the 2-core AMD EPYC (AVX2) development machine."""
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() else "no"


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def draw_global_batch(
    step: int, cfg: TrainConfig, num_images: int, image_shape, num_train_timesteps: int, null_class: int | None
):
    """Everything random in one step for the whole (global) batch: a dict of CPU tensors."""
    gen = _step_generator(cfg.seed, step)
    batch = cfg.batch_size
    image_idx = torch.randint(num_images, (batch,), generator=gen)
    timesteps = torch.randint(num_train_timesteps, (batch,), generator=gen)
    noise = torch.randn((batch, *image_shape), generator=gen)
    drop = torch.rand(batch, generator=gen) < cfg.label_drop_prob
    return {"image_idx": image_idx, "timesteps": timesteps, "noise": noise, "drop": drop, "null_class": null_class}


def _shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if tensor.shape[0] % world:
        raise ValueError(f"batch size {tensor.shape[0]} is not divisible by the {world} processes")
    per = tensor.shape[0] // world
    return tensor[rank * per : (rank + 1) * per]


def diffusion_target(scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the model must predict, by the scheduler's own `prediction_type`."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(sample, noise, timesteps)
    if kind == "sample":
        return sample
    raise ValueError(f"unsupported prediction_type {kind!r}")


def model_prediction(model, noisy: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor | None):
    """The model's prediction with learned-sigma channels (if any) dropped: (B, C, H, W)."""
    out = model(noisy, timestep=timesteps, class_labels=labels).sample
    return out[:, : noisy.shape[1]]


def _lr_factor(step: int, warmup_steps: int) -> float:
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def _build_optimizer(model, cfg: TrainConfig):
    """AdamW with separate groups: base weights (or LoRA), routers, and ratios (own lr, never decayed)."""
    groups = []
    if cfg.mode != "pretrain":
        import diffcr

        parts = diffcr.parameter_groups(model)
        groups.append(
            {"params": parts["router"], "lr": cfg.router_lr, "weight_decay": cfg.weight_decay, "name": "router"}
        )
        # decoupled weight decay would pull kept ratios toward 0, i.e. toward more compression
        groups.append({"params": parts["ratio"], "lr": cfg.ratio_lr, "weight_decay": 0.0, "name": "ratio"})
        base = [p for p in parts["base"] if p.requires_grad]
    else:
        base = [p for p in model.parameters() if p.requires_grad]
    if base:
        groups.insert(0, {"params": base, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "base"})
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.AdamW(groups, betas=(0.9, 0.999))


def prepare_model(base_model, cfg: TrainConfig, diffcr_config=None):
    """Set up what trains: DiffCR attached (unless pretraining), LoRA injected in "lora" mode, and
    `requires_grad` set by mode. Returns the model (changed in place)."""
    disable_label_dropout(base_model)
    if cfg.mode == "pretrain":
        base_model.requires_grad_(True)
        return base_model
    import diffcr

    if not diffcr.is_applied(base_model):
        diffcr.apply(base_model, diffcr_config or diffcr.DiffCRConfig())
    parts = diffcr.parameter_groups(base_model)
    for param in parts["base"]:
        param.requires_grad_(cfg.mode == "full")
    if cfg.mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, target_modules=LORA_TARGETS)
        inject_adapter_in_model(lora, base_model)
        for name, param in base_model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    for param in parts["router"] + parts["ratio"]:
        param.requires_grad_(True)
    return base_model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def train(
    run_dir: str | Path,
    base_model,
    train_dataset,
    cfg: TrainConfig,
    diffcr_config=None,
    scheduler=None,
    resume: bool = False,
    progress: bool = True,
    run_info: dict | None = None,
) -> TrainResult:
    """Train `base_model` (pretraining or DiffCR compression) and write checkpoints to `run_dir`.

    Args:
        run_dir: folder for `run.json`, `metrics.jsonl` and `checkpoint-*` (created if missing).
        base_model: a diffusers DiT; changed in place (DiffCR attached for compression modes).
        train_dataset: an `ImageDataset` (images in [-1, 1], labels).
        cfg: the `TrainConfig`.
        diffcr_config: the `DiffCRConfig` for compression modes (default `DiffCRConfig()`).
        scheduler: the diffusers noise scheduler defining the forward process (default: the base recipe's).
        resume: continue from `run_dir`'s latest checkpoint, bit for bit.
        run_info: extra JSON-able facts for `run.json` (e.g. where the base model came from).

    Returns:
        A `TrainResult` with the trained model (unwrapped) and the number of steps done.

    Raises:
        TrainingDiverged: the loss, a gradient or the weights became NaN or infinite (the last checkpoint, which
            holds finite weights, is intact).
        FileExistsError: `run_dir` already holds a run and `resume` is False.
        FileNotFoundError: `resume` is True but `run_dir` holds no checkpoint.
        CheckpointError: the checkpoint to resume from is damaged (the message names the file).
        RunInUse: another process is training into `run_dir`.
        ValueError: the data does not fit the model, the DiffCR config does not fit the scheduler, `run_dir`
            cannot be written, or a resumed run's settings differ from the saved ones.
    """
    from diffcr.models.tiny_dit import build_scheduler

    run_dir = Path(run_dir)
    scheduler = scheduler or build_scheduler("ddpm")
    # every check that can fail runs before the first file is written or the first step is taken
    check_writable_dir(run_dir, "run folder")
    if cfg.mode != "pretrain":
        check_diffcr_config(diffcr_config, scheduler.config.num_train_timesteps)
    check_dataset_fits_model(train_dataset, base_model)
    check_mixed_precision(cfg.mixed_precision)
    _checkpoint_to_resume(run_dir, resume, base_model, diffcr_config, cfg, run_info, log_changes=False)
    if not is_main_process():  # the main process holds the run folder's lock for all of them
        return _train(run_dir, base_model, train_dataset, cfg, diffcr_config, scheduler, resume, progress, run_info)
    with run_lock(run_dir):
        return _train(run_dir, base_model, train_dataset, cfg, diffcr_config, scheduler, resume, progress, run_info)


# a resumed run may run longer, under another time limit, or with other learning rates, clipping and warmup (how a
# diverged run is rescued); anything else would change what its steps compute
RESUME_MAY_CHANGE = (
    "steps",
    "max_minutes",
    "checkpoint_every",
    "num_threads",
    "lr",
    "router_lr",
    "ratio_lr",
    "grad_clip",
    "warmup_steps",
)


def _checkpoint_to_resume(
    run_dir: Path, resume: bool, base_model, diffcr_config, cfg: TrainConfig, run_info, log_changes: bool = True
):
    """The checkpoint a run continues from (None for a fresh run), after checking that it may be continued."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is not None and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run (at {ckpt.name}); pass resume=True / --resume "
            "to continue it, or choose another run directory"
        )
    if resume and ckpt is None:
        raise FileNotFoundError(
            f"nothing to resume in {run_dir}: it holds no checkpoint (no {run_dir / 'latest'}); "
            "drop --resume to start a new run"
        )
    if ckpt is None:
        return None
    run_file = run_dir / "run.json"
    try:
        saved_run = json.loads(run_file.read_text())
        saved = saved_run["train"]
        if not isinstance(saved, dict):
            raise TypeError(f"'train' is {type(saved).__name__}, not an object")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"cannot resume {run_dir}: {run_file} is missing or damaged ({type(err).__name__}: {err}); "
            "start afresh in a new folder"
        ) from err
    _check_same_run(run_dir, saved_run, base_model, diffcr_config, cfg, run_info)
    given = asdict(cfg)
    differ = sorted(k for k in saved if k not in RESUME_MAY_CHANGE and saved[k] != given.get(k))
    if differ:
        raise ValueError(
            f"cannot resume {run_dir}: its training config differs in {differ} "
            f"(saved {[saved[k] for k in differ]}, given {[given.get(k) for k in differ]}); give the saved "
            f"values, or start a new run (only {', '.join(RESUME_MAY_CHANGE)} may change on resume)"
        )
    rescue = ("lr", "router_lr", "ratio_lr", "grad_clip", "warmup_steps")  # a longer run is routine; these are not
    changed = {k: (saved[k], given[k]) for k in rescue if k in saved and saved[k] != given[k]}
    if changed and log_changes:
        logger.warning(
            "resuming %s with changed settings: %s",
            run_dir,
            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()),
        )
    return ckpt


def _train(
    run_dir: Path, base_model, train_dataset, cfg: TrainConfig, diffcr_config, scheduler, resume, progress, run_info
):
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    ckpt = _checkpoint_to_resume(run_dir, resume, base_model, diffcr_config, cfg, run_info)

    # cpu=True on a CPU-only machine: that is what makes torchrun-launched processes form a gloo group
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.mixed_precision), cpu=not torch.cuda.is_available()
    )
    num_train_timesteps = scheduler.config.num_train_timesteps

    teacher = None
    if cfg.distill:
        teacher = copy.deepcopy(base_model).eval().requires_grad_(False).to(accelerator.device)
    if cfg.mode != "pretrain":
        from diffcr.config import DiffCRConfig

        diffcr_config = diffcr_config or DiffCRConfig()
        if diffcr_config.num_train_timesteps is None:  # regions cut the range this scheduler trains on
            diffcr_config = diffcr_config.replace(num_train_timesteps=num_train_timesteps)
    model = prepare_model(base_model, cfg, diffcr_config)
    routed = cfg.mode != "pretrain"
    if routed:
        import diffcr

        diffcr_config = diffcr.get_config(model)
        ratio_weight = diffcr_config.ratio_loss_weight
    optimizer = _build_optimizer(model, cfg)

    start_step = 0
    if ckpt is not None:
        start_step = _load_checkpoint_into(ckpt, model, optimizer, cfg)
        logger.info("resumed %s at step %d", run_dir, start_step)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            run_dir / "run.json",
            {
                "train": asdict(cfg),
                "diffcr": diffcr_config.to_dict() if routed else None,
                "model_class": type(base_model).__name__,
                "model_config": dict(base_model.config),
                "scheduler_config": dict(scheduler.config),
                "num_train_images": len(train_dataset),
                **(run_info or {}),
            },
        )
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    images = train_dataset.images
    labels_all = train_dataset.labels
    image_shape = tuple(images.shape[1:])
    from diffcr.models.tiny_dit import null_class_id

    null_class = null_class_id(base_model)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        disable=not (progress and accelerator.is_main_process),
        desc=cfg.mode,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    step = start_step
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    try:
        while step < cfg.steps:
            # 1. the step's samples: each process takes its shard of the global batch
            drawn = draw_global_batch(step, cfg, len(images), image_shape, num_train_timesteps, null_class)
            idx = _shard(drawn["image_idx"], rank, world)
            clean = images[idx].to(device)  # (b, C, H, W)
            noise = _shard(drawn["noise"], rank, world).to(device)
            timesteps = _shard(drawn["timesteps"], rank, world).to(device)  # (b,)
            labels = labels_all[idx].to(device)
            labels = torch.where(_shard(drawn["drop"], rank, world).to(device), null_class, labels)
            noisy = scheduler.add_noise(clean, noise, timesteps)

            # 2. the loss: diffusion (or distillation) + lambda * ratio loss
            if teacher is not None:
                with torch.no_grad(), accelerator.autocast():
                    target = model_prediction(teacher, noisy, timesteps, labels).float()
            else:
                target = diffusion_target(scheduler, clean, noise, timesteps)
            with accelerator.autocast():
                prediction = model_prediction(model, noisy, timesteps, labels)
            diffusion_loss = F.mse_loss(prediction.float(), target)
            loss = diffusion_loss
            ratio_loss = mean_kept = None
            if routed:
                unwrapped = accelerator.unwrap_model(model)
                ratio_loss = diffcr.ratio_loss(unwrapped)
                mean_kept = diffcr.mean_kept_ratio_used(unwrapped)
                loss = diffusion_loss + ratio_weight * ratio_loss
            _stop_if_diverged(accelerator, loss, step, start_step, run_dir, "loss")

            # 3. the update; a non-finite gradient stops training before it can reach the weights
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * _lr_factor(step, cfg.warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            _stop_if_diverged(accelerator, grad_norm, step, start_step, run_dir, "gradient norm")
            optimizer.step()
            if routed:  # keep every kept ratio inside the bins' range (METHOD section 2)
                with torch.no_grad():
                    unwrapped.diffcr.kept_ratio.clamp_(min(diffcr_config.ratio_bins), 1.0)
            step += 1

            # 4. logging and checkpoints
            row = {
                "step": step,
                "loss": loss.item(),
                "diffusion_loss": diffusion_loss.item(),
                "seconds": round(time.perf_counter() - started, 3),
            }
            if routed:
                row["ratio_loss"] = ratio_loss.item()
                row["mean_kept_ratio"] = float(mean_kept)
            if metrics_file is not None:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            postfix = {"loss": f"{row['diffusion_loss']:.4f}"}
            if routed:
                postfix.update(ratio=f"{row['ratio_loss']:.4f}", kept=f"{row['mean_kept_ratio']:.3f}")
            bar.set_postfix(postfix)
            bar.update(1)
            out_of_time = cfg.max_minutes is not None and (time.perf_counter() - started) > cfg.max_minutes * 60
            if world > 1:  # every rank must stop (and checkpoint) at the same step
                flag = torch.tensor([float(out_of_time)], device=device)
                out_of_time = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                _checkpoint(accelerator, run_dir, step, model, optimizer, cfg)
            if out_of_time:
                logger.info("stopping at step %d: max_minutes=%s reached", step, cfg.max_minutes)
                break
    except KeyboardInterrupt as err:
        ckpt = None
        try:
            ckpt = latest_checkpoint(run_dir)
        except CheckpointError:
            pass
        where = f"the last checkpoint, {ckpt}, is intact: --resume continues from it" if ckpt else "no checkpoint yet"
        raise TrainingInterrupted(f"training interrupted at step {step}; {where}") from err
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
    accelerator.wait_for_everyone()
    return TrainResult(run_dir, accelerator.unwrap_model(model), step, time.perf_counter() - started)


def _load_checkpoint_into(ckpt: Path, model, optimizer, cfg: TrainConfig) -> int:
    """Copy a checkpoint's weights and optimizer state into `model` and `optimizer`; returns its step."""
    trainable, opt_tensors, opt_described, meta = load_checkpoint(ckpt)
    params = trainable_state(model)
    missing = set(params) ^ set(trainable)
    if missing:
        raise ValueError(f"checkpoint {ckpt} does not match this model/mode; differing tensors: {sorted(missing)[:8]}")
    wrong = sorted(name for name, param in params.items() if param.shape != trainable[name].shape)
    if wrong:
        raise ValueError(f"checkpoint {ckpt} does not match this model: tensors of other shapes {wrong[:8]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(trainable[name])
    try:
        optimizer.load_state_dict(optimizer_from_tensors(opt_tensors, opt_described))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(
            f"the optimizer state in {ckpt} does not fit this run ({err}); start afresh in a new folder"
        ) from err
    # the learning rates come from this call's config, not the checkpoint: lowering them is how a run
    # that diverged is continued from its last good checkpoint
    initial = {"base": cfg.lr, "router": cfg.router_lr, "ratio": cfg.ratio_lr}
    for group in optimizer.param_groups:
        group["initial_lr"] = initial.get(group.get("name"), group["initial_lr"])
    return meta["step"]


def _stop_if_diverged(accelerator, value: torch.Tensor, step: int, start_step: int, run_dir: Path, what: str) -> None:
    """Raise `TrainingDiverged` on every rank when `value` is not finite on any rank."""
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=value.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        shown = value.item() if value.numel() == 1 else "non-finite"
        advice = _after_divergence(run_dir, step, start_step, accelerator.is_main_process)
        raise TrainingDiverged(f"{what} became {shown} at step {step}; stopped before updating the weights. {advice}")


def _checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name.split("-", 1)[1])


def _after_divergence(run_dir: Path, step: int, start_step: int, is_main: bool) -> str:
    """Make `latest` point at a checkpoint that is really good, and say what to do next.

    Checkpoint c holds the weights that step c computes with. If this run wrote it and step c itself diverged, those
    weights are what broke (resuming from them diverges again at once): that checkpoint is removed and `latest` moves
    to the one before (training keeps two), or is removed when there is none. A checkpoint older than the diverging
    step is good: the steps after it were finite.
    """
    import shutil

    from diffcr.checkpoint import LATEST

    try:
        ckpt = latest_checkpoint(run_dir)
    except CheckpointError:
        ckpt = None
    lower = "lower the learning rates (--lr, --router-lr, --ratio-lr) or use --mixed-precision no"
    if ckpt is not None and _checkpoint_step(ckpt) == step and step > start_step:
        older = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) < step)
        if is_main:
            if older:
                write_json_atomic(run_dir / LATEST, {"checkpoint": older[-1].name, "step": _checkpoint_step(older[-1])})
            else:
                (run_dir / LATEST).unlink(missing_ok=True)
            shutil.rmtree(ckpt, ignore_errors=True)
            logger.warning("removed %s: its weights gave the non-finite value at step %d", ckpt, step)
        ckpt = older[-1] if older else None
    if ckpt is None:
        return (
            f"No checkpoint with sound weights is left in {run_dir}: {lower}, and start again without --resume "
            "(the same --out works)"
        )
    if _checkpoint_step(ckpt) == step:  # the run resumed from it and diverged at once
        return (
            f"This run resumed from {ckpt} and diverged at its first step: {lower} further and --resume again, "
            "or start afresh in a new --out"
        )
    # checkpoints are only written with finite weights (see _checkpoint), and the steps after this one were finite
    return f"The last good checkpoint, {ckpt} (step {_checkpoint_step(ckpt)}), is intact: {lower}, then --resume"


def _check_same_run(run_dir: Path, saved: dict, base_model, diffcr_config, cfg: TrainConfig, run_info) -> None:
    """Refuse to resume with another base model, DiffCR config or base source than the run started with."""
    problems = []

    def architecture(config: dict) -> dict:  # diffusers' "_" keys (source path, version, ...) are not the model
        return {k: v for k, v in config.items() if not k.startswith("_")}

    given_config = json.loads(json.dumps(dict(base_model.config), default=str))
    if architecture(saved.get("model_config") or {}) != architecture(given_config):
        problems.append("the base model's config differs")
    if cfg.mode != "pretrain":
        from diffcr.config import DiffCRConfig

        given = (diffcr_config or DiffCRConfig()).to_dict()
        stored = dict(saved.get("diffcr") or {})
        if stored.get("num_train_timesteps") is not None and given.get("num_train_timesteps") is None:
            given["num_train_timesteps"] = stored["num_train_timesteps"]
        if stored != given:
            problems.append(f"the DiffCR config differs (saved {stored}, given {given})")
    for key, value in (run_info or {}).items():
        if key in saved and saved[key] != value:
            problems.append(f"{key} differs (saved {saved[key]!r}, given {value!r})")
    if problems:
        raise ValueError(f"cannot resume {run_dir}: " + "; ".join(problems))


def _checkpoint(accelerator, run_dir: Path, step: int, model, optimizer, cfg: TrainConfig) -> None:
    accelerator.wait_for_everyone()
    tensors = trainable_state(accelerator.unwrap_model(model))
    # a checkpoint must be a sound place to resume from: never replace the last good one with broken weights
    bad = sorted(name for name, tensor in tensors.items() if not torch.isfinite(tensor).all())
    if bad:
        raise TrainingDiverged(
            f"weights became non-finite by step {step} ({bad[:4]}); this state was not checkpointed. "
            f"{_after_divergence(run_dir, step, step, accelerator.is_main_process)}"
        )
    if accelerator.is_main_process:
        # two are kept: if the newest one's weights diverge at once, the one before is still there to resume from
        save_checkpoint(run_dir, step, tensors, optimizer, {"train": asdict(cfg)}, keep=2)


def _truncate_metrics(path: Path, upto_step: int) -> None:
    """Keep only rows with step <= upto_step, so a resumed run's log has each step once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto_step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(row + "\n" for row in rows))
    tmp.replace(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl`."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def export_model(model, out_dir: str | Path) -> Path:
    """Save a (dense) base model as a diffusers folder, through a temporary folder renamed into place."""
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.replace(out_dir)
    return out_dir


def finish_compression(model, out_dir: str | Path, mode: str) -> dict[str, Path]:
    """Freeze the learned schedule and write the results of a compression run.

    Writes `out_dir/artifact/` (routers and ratios, `diffcr.save`) and, when the base weights changed
    (modes "lora" and "full"), `out_dir/model/`: the fine-tuned base as a diffusers folder (LoRA merged) with
    the DiffCR artifact files beside its weights, so that one folder loads the whole compressed model.

    Returns:
        {"artifact": path, "model": path (if written)}.
    """
    from accelerate import PartialState

    import diffcr

    out_dir = Path(out_dir)
    diffcr.freeze(model)
    state = PartialState()
    if not state.is_main_process:  # under accelerate launch one process writes; the others wait
        state.wait_for_everyone()
        return {}
    written = {"artifact": diffcr.save(model, out_dir / "artifact")}
    if mode in ("lora", "full"):
        base = copy.deepcopy(model)
        diffcr.remove(base)
        if mode == "lora":
            base = merge_lora(base)
        export_model(base, out_dir / "model")
        diffcr.save(model, out_dir / "model")
        written["model"] = out_dir / "model"
    state.wait_for_everyone()
    return written


def merge_lora(model):
    """Fold peft LoRA layers into their base linear layers, leaving a plain diffusers model."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def load_compressed(base: str | Path | None = None, artifact: str | Path | None = None):
    """A base model with an optional DiffCR artifact applied, ready for sampling (eval mode).

    Args:
        base: None / "default" for the shipped base, else a diffusers folder or repo id. When `artifact` is a
            folder that also holds a diffusers model (written by `finish_compression`), that model is the base.
        artifact: None / "none" for the dense model, "default" for the shipped artifact, or a folder.
    """
    import diffcr
    from diffcr.models.tiny_dit import SHIPPED_ARTIFACT_DIR, load_base_model

    if artifact is not None and str(artifact) == "default":
        artifact = SHIPPED_ARTIFACT_DIR
        if not (Path(artifact) / "diffcr_weights.safetensors").is_file():
            raise FileNotFoundError(f"no shipped DiffCR artifact at {artifact}; pass --artifact DIR")
    if artifact is not None and str(artifact) == "none":
        artifact = None
    if artifact is not None and (Path(artifact) / "config.json").is_file():
        if base not in (None, "default") and Path(str(base)).resolve() != Path(artifact).resolve():
            logger.warning(
                "the artifact %s carries its own fine-tuned base weights; using them instead of %s", artifact, base
            )
        base = artifact
    model = load_base_model(base)
    if artifact is not None:
        diffcr.load(model, artifact)
    return model.eval()
