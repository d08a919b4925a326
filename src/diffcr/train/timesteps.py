"""Which timestep range a DiffCR run's regions cut: the range of the value the model receives.

The loop draws integer steps t in [0, T_s) of the noise scheduler (T_s = 1000) and noises with them; what the
transformer then receives as `timestep` depends on the family. PixArt and DiT receive t, and SD3 receives
t = sigma x 1000, so their regions cut the scheduler's [0, T_s]. Flux receives sigma = t / T_s in [0, 1] (its
pipeline divides by 1000 and the model multiplies by 1000 itself), so its regions cut [0, 1]: cut on [0, 1000]
instead, every training sample and every sampling step would fall in region 0.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimestepRange:
    """[0, num_train_timesteps]: the range of the timestep a model receives.

    Attributes:
        num_train_timesteps: T, the end of the range (the `DiffCRConfig.num_train_timesteps` a run records).
        continuous: the model receives a continuous value (Flux's sigma), so any number of regions cuts the range;
            otherwise at most T regions are not empty.
    """

    num_train_timesteps: int
    continuous: bool = False


def model_timestep_range(model, scheduler) -> TimestepRange:
    """The range of the timestep `model` receives when it is trained against `scheduler`.

    Args:
        model: a diffusers transformer diffcr supports (routed or not).
        scheduler: the noise scheduler whose integer steps the loop draws.

    Returns:
        The model's own continuous range where its adapter declares one (Flux: sigma, T = 1), else the scheduler's
        `num_train_timesteps` (PixArt, DiT: the DDPM step; SD3: sigma x 1000).

    Example:
        >>> from diffusers import FlowMatchEulerDiscreteScheduler
        >>> from diffcr.models import build_base_model
        >>> model_timestep_range(build_base_model(num_layers=1), FlowMatchEulerDiscreteScheduler())
        TimestepRange(num_train_timesteps=1000, continuous=False)
    """
    from diffcr.adapters import get_adapter

    adapter = get_adapter(model)
    if adapter.continuous_timesteps:
        return TimestepRange(adapter.num_train_timesteps(model), continuous=True)
    return TimestepRange(int(scheduler.config.num_train_timesteps))


def check_conditioning_timesteps(conditioning, scheduler, timestep_range: TimestepRange, model) -> None:
    """Refuse a conditioning that hands the model timesteps outside the range its regions cut.

    The conditioning passes the drawn step t divided by its `timestep_divisor` (1 unless set), so the model
    receives values in [0, T_s / divisor]; that must be the model's own range.

    Raises:
        ValueError: the two ranges differ (e.g. a Flux `TextConditioning` without `timestep_divisor=1000`, which
            would hand Flux t in [0, 1000] instead of sigma).
    """
    divisor = float(getattr(conditioning, "timestep_divisor", 1.0))
    steps = scheduler.config.num_train_timesteps
    passed = steps / divisor
    wanted = timestep_range.num_train_timesteps
    if passed != wanted:
        raise ValueError(
            f"the conditioning hands {type(model).__name__} timesteps in [0, {passed:g}] (the scheduler's {steps} "
            f"steps / timestep_divisor {divisor:g}) but it takes them in [0, {wanted}]: set the conditioning's "
            f"timestep_divisor to {steps / wanted:g}"
        )
