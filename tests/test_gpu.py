"""The conformance checks that matter on a CUDA device (skipped without one): run by scripts/gpu_check.sh."""

import pytest
import torch

import diffcr
from conftest import CASES, run
from diffcr import DiffCRConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _to(inputs, dtype):
    out = {}
    for key, value in inputs.items():
        if torch.is_tensor(value):
            value = value.cuda()
            if value.is_floating_point() and key != "timestep":
                value = value.to(dtype)
        out[key] = value
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_equivalence_and_mixed_batches(case):
    model = case.model().cuda()
    inputs = _to(case.inputs([10, 300, 600, 900]), torch.float32)
    with torch.no_grad():
        reference = run(model, inputs)
    diffcr.apply(model, DiffCRConfig(timestep_regions=4))
    with torch.no_grad():
        assert torch.equal(run(model, inputs), reference)
        model.diffcr.kept_ratio.copy_(torch.tensor([[1.0, 0.7, 0.5, 0.3]]).expand_as(model.diffcr.kept_ratio))
        together = run(model, inputs)
        for b in range(4):
            # Flux's position ids (`img_ids`, `txt_ids`) are shared by the batch
            alone = run(model, {k: (v[b : b + 1] if torch.is_tensor(v) and not k.endswith("_ids") else v)
                                for k, v in inputs.items()})  # fmt: skip
            torch.testing.assert_close(alone[0], together[b], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_cuda_bf16_training_step(case):
    model = diffcr.apply(case.model().cuda(), DiffCRConfig(timestep_regions=4)).train()
    with torch.no_grad():
        model.diffcr.kept_ratio.copy_(torch.tensor([[0.95, 0.7, 0.5, 0.3]]).expand_as(model.diffcr.kept_ratio))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = run(model, _to(case.inputs([10, 300, 600, 900]), torch.float32))
        loss = out.float().pow(2).mean() + diffcr.ratio_loss(model)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.diffcr.kept_ratio.grad).all()
