"""Training: the loop (`loop`), its configuration and checks (`config`), run folders over time (`runs`),
conditioning by class labels or text embeddings (`conditioning`), the timestep range regions cut (`timesteps`), and
what a run leaves behind (`export`)."""

from diffcr.train.config import (
    TrainConfig,
    TrainingDiverged,
    TrainingInterrupted,
    TrainResult,
    check_dataset_fits_model,
    check_diffcr_config,
    check_mixed_precision,
)
from diffcr.train.export import export_model, finish_compression, load_compressed, merge_lora
from diffcr.train.loop import (
    LORA_TARGETS,
    diffusion_target,
    disable_label_dropout,
    draw_global_batch,
    is_main_process,
    prepare_model,
    resolve_mixed_precision,
    train,
)
from diffcr.train.runs import read_metrics, trainable_state
from diffcr.train.timesteps import TimestepRange, model_timestep_range

__all__ = [
    "LORA_TARGETS",
    "TrainConfig",
    "TimestepRange",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "check_dataset_fits_model",
    "check_diffcr_config",
    "check_mixed_precision",
    "diffusion_target",
    "disable_label_dropout",
    "draw_global_batch",
    "export_model",
    "finish_compression",
    "is_main_process",
    "load_compressed",
    "merge_lora",
    "model_timestep_range",
    "prepare_model",
    "read_metrics",
    "resolve_mixed_precision",
    "train",
    "trainable_state",
]
