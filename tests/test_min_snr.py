"""Min-SNR-gamma loss weighting: the weights, the loss it gives, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from diffcr.models.tiny_dit import build_scheduler
from diffcr.train import TrainConfig
from diffcr.train.loop import min_snr_weights, snr_weights, weighted_mse


def test_weights_follow_min_snr_for_epsilon_prediction():
    scheduler = build_scheduler("ddpm")
    timesteps = torch.tensor([0, 100, 500, 999])
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(weights, expected)
    assert weights[0] < 0.01  # nearly clean: fine detail, counts little
    assert weights[-1] == 1.0  # pure noise: SNR below gamma, full weight
    assert torch.all(weights[1:] >= weights[:-1])  # never less weight for more noise


def test_weighted_mse_is_the_plain_mse_without_gamma_and_weights_each_sample_with_it():
    scheduler = build_scheduler("ddpm")
    prediction, target = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    timesteps = torch.tensor([10, 400, 900])
    torch.testing.assert_close(
        weighted_mse(prediction, target, scheduler, timesteps, None), torch.nn.functional.mse_loss(prediction, target)
    )
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    expected = (min_snr_weights(scheduler, timesteps, 5.0) * per_sample).mean()
    torch.testing.assert_close(weighted_mse(prediction, target, scheduler, timesteps, 5.0), expected)


def test_v_prediction_weights_and_flow_matching_refused():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = build_scheduler("ddpm", prediction_type="v_prediction")
    timesteps = torch.tensor([50, 950])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    torch.testing.assert_close(
        min_snr_weights(scheduler, timesteps, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    )
    with pytest.raises(ValueError, match="flow matching"):
        weighted_mse(torch.zeros(1, 1), torch.zeros(1, 1), FlowMatchEulerDiscreteScheduler(), timesteps[:1], 5.0)


@pytest.mark.parametrize("gamma", [0.0, -1.0, float("nan"), float("inf")])
def test_config_refuses_a_bad_gamma(gamma):
    with pytest.raises(ValueError, match="snr_gamma"):
        TrainConfig(snr_gamma=gamma)


def test_inverse_weighting_turns_noisy_steps_into_an_x0_loss_up_to_gamma():
    scheduler = build_scheduler("ddpm")
    timesteps = torch.tensor([0, 250, 450, 600, 999])
    weights = snr_weights(scheduler, timesteps, 10.0, "inverse")
    alphas = scheduler.alphas_cumprod[timesteps]
    torch.testing.assert_close(weights, torch.clamp((1 - alphas) / alphas, 1.0, 10.0))
    assert weights[0] == 1.0 and weights[-1] == 10.0
    # between the clamps: the weighted epsilon error equals the x0 error the same prediction implies
    t = torch.tensor([450])
    alpha = scheduler.alphas_cumprod[t]
    assert 1.0 < float(weights[2]) < 10.0
    eps_error = torch.tensor([0.3])
    x0_error = eps_error * (1 - alpha).sqrt() / alpha.sqrt()
    torch.testing.assert_close(weights[2:3] * eps_error**2, x0_error**2)
    with pytest.raises(ValueError, match="snr_weighting"):
        TrainConfig(snr_gamma=5.0, snr_weighting="max")
