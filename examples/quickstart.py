"""Apply DiffCR to a small DiT, train routers and kept ratios for a few steps, freeze, save, load, remove.

Runs on a CPU in about a minute:  python examples/quickstart.py
"""

import copy
import tempfile

import torch
import torch.nn.functional as F

import diffcr
from diffcr.data import load_dataset
from diffcr.models import build_base_model, build_scheduler

torch.manual_seed(0)
torch.set_num_threads(2)

train, _ = load_dataset()  # the bundled MNIST-5k digits, 32x32 in [-1, 1]
model = build_base_model(num_layers=4)  # a class-conditional diffusers DiTTransformer2DModel
scheduler = build_scheduler("ddpm")
dense = copy.deepcopy(model).eval()

config = diffcr.DiffCRConfig(target_kept_ratio=0.5, timestep_regions=2)
diffcr.apply(model, config)
groups = diffcr.parameter_groups(model)
for param in groups["base"]:  # here only routers and ratios train; `diffcr compress` can also tune the base
    param.requires_grad_(False)
optimizer = torch.optim.AdamW(
    [
        {"params": groups["router"], "lr": 1e-3},
        {"params": groups["ratio"], "lr": 3e-2, "weight_decay": 0.0},  # never decay kept ratios
    ]
)
model.train()
for step in range(20):
    idx = torch.randint(len(train), (8,))
    clean, labels = train.images[idx], train.labels[idx]
    noise = torch.randn_like(clean)
    timestep = torch.randint(0, 1000, (8,))
    prediction = model(scheduler.add_noise(clean, noise, timestep), timestep=timestep, class_labels=labels).sample
    diffusion_loss = F.mse_loss(prediction, noise)
    loss = diffusion_loss + config.ratio_loss_weight * diffcr.ratio_loss(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 5 == 4:
        print(
            f"step {step + 1}: diffusion loss {diffusion_loss.item():.4f}, "
            f"mean kept ratio {diffcr.mean_kept_ratio_used(model):.3f}"
        )

diffcr.freeze(model)
print(diffcr.schedule(model))
with tempfile.TemporaryDirectory() as folder:
    diffcr.save(model, folder)
    reloaded = diffcr.load(copy.deepcopy(dense), folder)
x = torch.randn(2, 1, 32, 32)
t = torch.tensor([100, 900])
y = torch.tensor([3, 7])
with torch.no_grad():
    before = model.eval()(x, timestep=t, class_labels=y).sample
    after = reloaded.eval()(x, timestep=t, class_labels=y).sample
    same = torch.equal(before, after)
print("save/load round trip reproduces outputs:", same)
diffcr.remove(model)
print("removed; DiffCR applied:", diffcr.is_applied(model))
