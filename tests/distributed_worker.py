"""Run under `accelerate launch --num_processes 2 --cpu` by test_distributed.py: trains 2 steps, then samples
sharded; each rank writes what it holds so the test can compare ranks."""

import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from accelerate import Accelerator  # noqa: E402

import diffcr  # noqa: E402
from diffcr.sampling import SampleConfig, class_labels, sample_sharded  # noqa: E402
from diffcr.train import train  # noqa: E402
from diffcr.train.loop import end_distributed  # noqa: E402
from test_training import config, tiny_base, tiny_data  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
# the schedule frozen after step 1: steps 2 and 3 run with the kept-ratio table out of the forward, under DDP
# (without a gradient for every parameter, the reducer stops step 3)
result = train(
    out / "run", tiny_base(), tiny_data(), config(mode="full", steps=3, freeze_schedule_at=1), progress=False
)
state = result.model.state_dict()
digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).hexdigest()
accelerator = Accelerator(cpu=True)
diffcr.freeze(result.model)
images = sample_sharded(
    result.model.eval(), class_labels([1, 2, 3], 1), SampleConfig(steps=2, batch_size=2), 10, accelerator
)
payload = {"digest": digest, "world": accelerator.num_processes}
if images is not None:
    payload["images"] = images.flatten().tolist()
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(payload))

# a rank that exits with gloo's threads still running can abort after its work is done
end_distributed()
