"""One training loop for pretraining a base DiT and for compressing a DiT or PixArt with DiffCR, on accelerate.

The loop reads top to bottom: pick the step's samples, noise them, predict, add the ratio loss, step.
Everything random in a step (which images, which timesteps, which conditions are dropped, the noise) is drawn
from a generator seeded by (seed, step) for the *global* batch, and each process takes its shard of it. So a
resumed run repeats exactly the steps the uninterrupted run would have taken, and N processes see the same
samples as one process does. What differs between class labels and text embeddings sits behind the
conditioning interface of `diffcr.train.conditioning`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from diffcr.checkpoint import CheckpointError, check_writable_dir, latest_checkpoint, run_lock, write_json_atomic
from diffcr.train.averaging import WeightAverage, takes_sample
from diffcr.train.conditioning import as_conditioning
from diffcr.train.config import (
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    check_diffcr_config,
    check_mixed_precision,
)
from diffcr.train.runs import (
    _checkpoint,
    _checkpoint_to_resume,
    _load_checkpoint_into,
    _stop_if_diverged,
    _truncate_metrics,
    trainable_state,
)
from diffcr.train.timesteps import check_conditioning_timesteps, model_timestep_range

logger = logging.getLogger(__name__)


# self-attention, cross-attention (PixArt; DiT has none) and the MLP of every block, as the paper's PixArt recipe
LORA_TARGETS = r".*transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"


def is_main_process() -> bool:
    """Whether this is the process that writes files, under `accelerate launch` or alone.

    It sets up accelerate's shared state as `train` does (cpu=True on a CPU-only machine, which is what makes
    torchrun-launched processes form a gloo group), so asking before training does not change the setup.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process


def end_distributed() -> None:
    """Leave the process group cleanly when this process is one of several.

    Without it, gloo's worker threads are still alive when the interpreter exits, and a rank can abort with
    "terminate called without an active exception" after its work is done: the launcher then reports failure.
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    # no barrier: a rank that failed must not leave the others waiting for it
    torch.distributed.destroy_process_group()


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


def draw_global_batch(step: int, cfg: TrainConfig, num_images: int, image_shape, num_train_timesteps: int):
    """Everything random in one step for the whole (global) batch: a dict of CPU tensors."""
    gen = _step_generator(cfg.seed, step)
    batch = cfg.batch_size
    image_idx = torch.randint(num_images, (batch,), generator=gen)
    timesteps = torch.randint(num_train_timesteps, (batch,), generator=gen)
    noise = torch.randn((batch, *image_shape), generator=gen)
    drop = torch.rand(batch, generator=gen) < cfg.label_drop_prob
    return {"image_idx": image_idx, "timesteps": timesteps, "noise": noise, "drop": drop}


def _shard(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    if tensor.shape[0] % world:
        raise ValueError(f"batch size {tensor.shape[0]} is not divisible by the {world} processes")
    per = tensor.shape[0] // world
    return tensor[rank * per : (rank + 1) * per]


def is_flow_matching(scheduler) -> bool:
    """Whether the scheduler is a flow-matching one (SD3, Flux): `FlowMatchEulerDiscreteScheduler` and kin."""
    return type(scheduler).__name__.startswith("FlowMatch")


def noised(scheduler, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, num_train_timesteps: int):
    """The noisy input at `timesteps` and what the model must predict there.

    Flow matching (SD3): x_t = (1 - sigma) x_0 + sigma * noise with sigma = t / T, and the target is the velocity
    noise - x_0; t is drawn uniformly like every timestep here (SD3's own recipe draws sigma from a logit-normal,
    which weights the middle of the range more). Otherwise the scheduler's own forward process and prediction type.
    """
    if is_flow_matching(scheduler):
        sigma = (timesteps.float() / num_train_timesteps).view(-1, *([1] * (sample.dim() - 1)))  # (b, 1, 1, 1)
        return (1 - sigma) * sample + sigma * noise, noise - sample
    return scheduler.add_noise(sample, noise, timesteps), diffusion_target(scheduler, sample, noise, timesteps)


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, kind: str = "min") -> torch.Tensor:
    """Per-sample loss weights (b,): min-SNR-gamma (`min_snr_weights`) or, with kind "inverse",
    clamp(1 / SNR, 1, gamma) for epsilon prediction.

    The epsilon loss of a step is SNR times its x0 loss, so at the noisy steps where only the condition can say
    what the image will show (SNR of 0.01-0.1 under the linear schedule), getting the content wrong costs almost
    nothing; weighting those steps by 1 / SNR (capped at gamma) makes them count as an x0 loss would.
    """
    if kind == "min":
        return min_snr_weights(scheduler, timesteps, gamma)
    if scheduler.config.prediction_type != "epsilon":
        raise ValueError("snr_weighting='inverse' is defined for epsilon prediction")
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]  # (b,)
    inverse_snr = (1 - alphas_cumprod) / alphas_cumprod
    return torch.clamp(inverse_snr, min=1.0, max=gamma)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights (b,) of min-SNR-gamma: min(SNR, gamma) / SNR for epsilon prediction (steps with
    little noise, which teach fine detail but dominate the plain MSE's gradient, count less), and
    min(SNR, gamma) / (SNR + 1) for v-prediction."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps]  # (b,)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # "sample": x0 prediction


def weighted_mse(
    prediction, target, scheduler, timesteps: torch.Tensor, snr_gamma: float | None, snr_weighting: str = "min"
) -> torch.Tensor:
    """The diffusion loss: the plain MSE, or the min-SNR-gamma weighted one when `snr_gamma` is set."""
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    if is_flow_matching(scheduler):
        raise ValueError(
            "snr_gamma applies to DDPM-style schedulers; flow matching (SD3, Flux) has no SNR weighting here"
        )
    per_sample = ((prediction - target) ** 2).mean(dim=tuple(range(1, target.dim())))  # (b,)
    return (snr_weights(scheduler, timesteps, snr_gamma, snr_weighting) * per_sample).mean()


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


def _log_step(row: dict, metrics_file, bar) -> None:
    """One row of `metrics.jsonl` (main process) and the progress bar's figures."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
    postfix = {"loss": f"{row['diffusion_loss']:.4f}"}
    if "ratio_loss" in row:
        postfix.update(ratio=f"{row['ratio_loss']:.4f}", kept=f"{row['mean_kept_ratio']:.3f}")
    bar.set_postfix(postfix)
    bar.update(1)


def _run_description(cfg: TrainConfig, base_model, scheduler, conditioning, extra: dict) -> dict:
    """`run.json`: what a resumed run must match, and what a report shows."""
    return {
        "train": asdict(cfg),
        "model_class": type(base_model).__name__,
        "model_config": dict(base_model.config),
        "scheduler_config": dict(scheduler.config),
        "num_train_images": len(conditioning),
        **extra,
    }


def _diffusion_loss(accelerator, model, teacher, conditioning, inputs, true_target, scheduler, cfg: TrainConfig):
    """The step's diffusion loss: against the true target, or the frozen teacher's prediction (distillation)."""
    noisy, timesteps, cond = inputs
    if teacher is not None:
        with torch.no_grad(), accelerator.autocast():
            target = conditioning.predict(teacher, noisy, timesteps, cond).float()
    else:
        target = true_target
    with accelerator.autocast():
        prediction = conditioning.predict(model, noisy, timesteps, cond)
    return weighted_mse(prediction.float(), target, scheduler, timesteps, cfg.snr_gamma, cfg.snr_weighting)


def _metrics_row(step: int, loss, diffusion_loss, ratio_loss, mean_kept, started: float) -> dict:
    """One `metrics.jsonl` row; the ratio figures only for a routed run."""
    row = {
        "step": step,
        "loss": loss.item(),
        "diffusion_loss": diffusion_loss.item(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    if ratio_loss is not None:
        row.update(ratio_loss=ratio_loss.item(), mean_kept_ratio=float(mean_kept))
    return row


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """The learning rates' factor at `step` (0-based): linear warmup, then constant or a cosine decay to 0 at
    `cfg.steps` (every group decays, the kept ratios included, so a routed run ends on a settled schedule)."""
    warmup = 1.0 if cfg.warmup_steps <= 0 else min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return warmup
    progress = min(1.0, step / cfg.steps)
    return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))


def _routed_loss(model, unwrapped, diffusion_loss: torch.Tensor, ratio_weight: float):
    """(the loss to train on, the ratio loss, the mean kept ratio used) of a routed step. Once the schedule is
    frozen the ratio loss is a constant: logged, not trained on."""
    import diffcr

    ratio_loss = diffcr.ratio_loss(unwrapped)
    mean_kept = diffcr.mean_kept_ratio_used(unwrapped)
    frozen = diffcr.is_frozen(unwrapped)
    loss = diffusion_loss if frozen else diffusion_loss + ratio_weight * ratio_loss
    if frozen or unwrapped.diffcr.dense_regions:
        return _with_every_parameter(loss, model), ratio_loss, mean_kept
    return loss, ratio_loss, mean_kept


def _set_learning_rates(optimizer, step: int, cfg: TrainConfig) -> None:
    """Every group's rate at `step` (`_lr_factor`); the kept ratios' is 0 once their schedule is frozen."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * _lr_factor(step, cfg)
        if group.get("name") == "ratio" and _schedule_frozen_at(step, cfg):
            group["lr"] = 0.0


def _schedule_frozen_at(step: int, cfg: TrainConfig) -> bool:
    """Whether the kept ratios are frozen at their bins once `step` steps are done (`cfg.freeze_schedule_at`)."""
    return 0 < cfg.freeze_schedule_at <= step


def _freeze_schedule(model) -> None:
    """Snap the kept-ratio table to its nearest bins and run that schedule from now on, one pass per block, as
    `diffcr.freeze` does; unlike it, the routers keep training (and the table keeps `requires_grad`, so that
    checkpoints keep their layout; its learning rate is 0 from now on)."""
    controller = model.diffcr
    controller.frozen_schedule = controller.snapped_schedule()


def _with_every_parameter(loss: torch.Tensor, model) -> torch.Tensor:
    """`loss` plus a zero that touches every trainable parameter.

    At a frozen schedule the table is out of the forward, and a process whose samples all fall in regions where
    a block keeps every token (or none) skips that router (or block); so does one whose samples all fall in
    regions whose target is 1.0 (`DiffCRConfig.region_targets`), which use no kept ratio. DDP's reducer waits for
    a gradient of every parameter it registered; a zero gradient keeps them all in the graph on every process.
    (AdamW then moves an unused parameter on its momentum, as it would under DDP.)"""
    return loss + 0.0 * sum(param.sum() for param in model.parameters() if param.requires_grad)


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
    if cfg.gradient_checkpointing:  # recomputes each block in the backward pass: less memory, more time
        base_model.enable_gradient_checkpointing()
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


def train(
    run_dir: str | Path,
    base_model,
    train_data,
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
        train_data: an `ImageDataset` (images in [-1, 1] and class labels, for a class-conditional DiT) or a
            conditioning of `diffcr.train.conditioning` (e.g. `TextConditioning` over a prepared cache).
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
        ValueError: the data does not fit the model, the DiffCR config does not fit the timestep range the model
            receives (the scheduler's; sigma's [0, 1] for Flux), `run_dir` cannot be written, or a resumed run's
            settings differ from the saved ones.
    """
    from diffcr.models.tiny_dit import build_scheduler

    run_dir = Path(run_dir)
    scheduler = scheduler or build_scheduler("ddpm")
    # every check that can fail runs before the first file is written or the first step is taken
    check_writable_dir(run_dir, "run folder")
    routed = cfg.mode != "pretrain"
    if routed or cfg.token_bypass:  # regions cut the range of the timestep the model receives (Flux: sigma in [0, 1])
        timestep_range = model_timestep_range(base_model, scheduler)
        check_diffcr_config(diffcr_config, timestep_range.num_train_timesteps, timestep_range.continuous)
    conditioning = as_conditioning(train_data, base_model)
    if routed:
        check_conditioning_timesteps(conditioning, scheduler, timestep_range, base_model)
    check_mixed_precision(cfg.mixed_precision)
    _checkpoint_to_resume(run_dir, resume, base_model, diffcr_config, cfg, run_info, log_changes=False)
    if not is_main_process():  # the main process holds the run folder's lock for all of them
        return _train(run_dir, base_model, conditioning, cfg, diffcr_config, scheduler, resume, progress, run_info)
    with run_lock(run_dir):
        return _train(run_dir, base_model, conditioning, cfg, diffcr_config, scheduler, resume, progress, run_info)


def _with_timestep_range(diffcr_config, base_model, scheduler):
    """The DiffCR config (default if None) with `num_train_timesteps` set, when it is not, to the range of the
    timestep the model receives: regions cut that range (Flux receives sigma in [0, 1])."""
    from diffcr.config import DiffCRConfig

    diffcr_config = diffcr_config or DiffCRConfig()
    if diffcr_config.num_train_timesteps is not None:
        return diffcr_config
    received = model_timestep_range(base_model, scheduler).num_train_timesteps
    return diffcr_config.replace(num_train_timesteps=received)


def _attach_routing(base_model, cfg: TrainConfig, diffcr_config, scheduler):
    """(model, the DiffCR config it runs or None, the `TokenBypass` or None): what trains set up by
    `prepare_model`, with DiffCR for compression modes or random token bypass for a bypassed pretraining."""
    routed = cfg.mode != "pretrain"
    if routed or cfg.token_bypass:
        diffcr_config = _with_timestep_range(diffcr_config, base_model, scheduler)
    model = prepare_model(base_model, cfg, diffcr_config)
    bypass = None
    if cfg.token_bypass:  # pretraining with random token bypass: routing that never trains (`diffcr.train.bypass`)
        from diffcr.train.bypass import TokenBypass

        bypass = TokenBypass.attach(model, diffcr_config, cfg.token_bypass, cfg.seed)
    if routed:
        import diffcr

        diffcr_config = diffcr.get_config(model)
    return model, diffcr_config, bypass


def _train(
    run_dir: Path, base_model, conditioning, cfg: TrainConfig, diffcr_config, scheduler, resume, progress, run_info
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
    num_train_timesteps = scheduler.config.num_train_timesteps  # the steps drawn; the model may receive t / T

    teacher = None
    if cfg.distill:
        teacher = copy.deepcopy(base_model).eval().requires_grad_(False).to(accelerator.device)
    routed = cfg.mode != "pretrain"
    model, diffcr_config, bypass = _attach_routing(base_model, cfg, diffcr_config, scheduler)
    if routed:
        ratio_weight = diffcr_config.ratio_loss_weight
    optimizer = _build_optimizer(model, cfg)

    start_step = 0
    average = WeightAverage() if cfg.average_from else None
    if ckpt is not None:
        start_step, average = _load_checkpoint_into(ckpt, model, optimizer, cfg)
        logger.info("resumed %s at step %d", run_dir, start_step)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        description = {"diffcr": diffcr_config.to_dict() if routed or bypass else None, **(run_info or {})}
        write_json_atomic(run_dir / "run.json", _run_description(cfg, base_model, scheduler, conditioning, description))
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)

    if routed and _schedule_frozen_at(start_step, cfg):  # resumed past the step: the same table, the same bins
        _freeze_schedule(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
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
            drawn = draw_global_batch(step, cfg, len(conditioning), conditioning.sample_shape, num_train_timesteps)
            idx = _shard(drawn["image_idx"], rank, world)
            drop = _shard(drawn["drop"], rank, world)  # (b,): condition dropped (null class / empty prompt)
            clean, cond = conditioning.batch(idx, drop, device)  # (b, C, H, W), the model's condition kwargs
            noise = _shard(drawn["noise"], rank, world).to(device)
            timesteps = _shard(drawn["timesteps"], rank, world).to(device)  # (b,)
            noisy, true_target = noised(scheduler, clean, noise, timesteps, num_train_timesteps)
            if bypass is not None:
                bypass.draw(step)

            # 2. the loss: diffusion (or distillation) + lambda * ratio loss
            diffusion_loss = _diffusion_loss(
                accelerator, model, teacher, conditioning, (noisy, timesteps, cond), true_target, scheduler, cfg
            )
            loss, ratio_loss, mean_kept = diffusion_loss, None, None
            if routed:
                unwrapped = accelerator.unwrap_model(model)
                loss, ratio_loss, mean_kept = _routed_loss(model, unwrapped, diffusion_loss, ratio_weight)
            _stop_if_diverged(accelerator, loss, step, start_step, run_dir, "loss")

            # 3. the update; a non-finite gradient stops training before it can reach the weights
            _set_learning_rates(optimizer, step, cfg)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            _stop_if_diverged(accelerator, grad_norm, step, start_step, run_dir, "gradient norm")
            optimizer.step()
            if routed:  # keep every kept ratio inside the bins' range (METHOD section 2)
                with torch.no_grad():
                    unwrapped.diffcr.kept_ratio.clamp_(min(diffcr_config.ratio_bins), 1.0)
            step += 1
            if routed and cfg.freeze_schedule_at == step:
                _freeze_schedule(unwrapped)
                logger.info("step %d: kept ratios frozen at their bins: %s", step, unwrapped.diffcr.frozen_schedule)

            # 4. logging and checkpoints
            _log_step(_metrics_row(step, loss, diffusion_loss, ratio_loss, mean_kept, started), metrics_file, bar)
            out_of_time = cfg.max_minutes is not None and (time.perf_counter() - started) > cfg.max_minutes * 60
            if world > 1:  # every rank must stop (and checkpoint) at the same step
                flag = torch.tensor([float(out_of_time)], device=device)
                out_of_time = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if average is not None and takes_sample(step, cfg.average_from, cfg.checkpoint_every):
                average.add(trainable_state(accelerator.unwrap_model(model)), step)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
                _checkpoint(accelerator, run_dir, step, model, optimizer, cfg, average)
            if out_of_time:
                logger.info("stopping at step %d: max_minutes=%s reached", step, cfg.max_minutes)
                break
    except KeyboardInterrupt as err:
        raise _interrupted(run_dir, step) from err
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if bypass is not None:  # the caller's model comes back plain, whether training finished or not
            bypass.detach()
    accelerator.wait_for_everyone()
    trained = accelerator.unwrap_model(model)
    averaged_steps = _end_on_average(trained, average, step, cfg)
    return TrainResult(run_dir, trained, step, time.perf_counter() - started, averaged_steps)


def _interrupted(run_dir: Path, step: int) -> TrainingInterrupted:
    """The error for Ctrl-C at `step`, saying where the run can resume from."""
    ckpt = None
    try:
        ckpt = latest_checkpoint(run_dir)
    except CheckpointError:
        pass
    where = f"the last checkpoint, {ckpt}, is intact: --resume continues from it" if ckpt else "no checkpoint yet"
    return TrainingInterrupted(f"training interrupted at step {step}; {where}")


def _end_on_average(trained, average, step: int, cfg: TrainConfig) -> tuple[int, ...]:
    """Put the weight average (with the weights of the last step) into `trained`; returns the steps it holds, or ()
    when the run does not average or stopped before `average_from`. The checkpoints keep the weights as trained."""
    if average is None or step < cfg.average_from:
        return ()
    params = trainable_state(trained)
    final = average.ending_with(params, step)
    final.copy_into(params)
    logger.info("the model returned is the mean of the weights at steps %s", _describe_steps(tuple(final.steps)))
    return tuple(final.steps)


def _describe_steps(steps: tuple[int, ...]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)})"
