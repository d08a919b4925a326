"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint directory is written under a temporary name and renamed into place, then the `latest` pointer
is replaced atomically, so a kill at any moment leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload) -> None:
    """Write JSON to `path` through a temporary file and `os.replace`."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None):
    """`safetensors.save_file` through a temporary file and `os.replace`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten `optimizer.state_dict()` into named tensors plus a JSON-able description."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], described: dict) -> dict:
    """Inverse of `optimizer_to_tensors`: a state dict for `optimizer.load_state_dict`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    for param_id, values in described["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    groups = []
    for group in described["param_groups"]:
        group = dict(group)
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: Path, step: int, tensors: dict[str, torch.Tensor], optimizer, meta: dict, keep: int = 1
) -> Path:
    """Write `run_dir/checkpoint-<step>` atomically and point `run_dir/latest` at it.

    Args:
        tensors: the trainable parameters (name -> tensor).
        optimizer: its state is saved beside them.
        meta: JSON-able training state (step, config, ...).
        keep: how many checkpoints to keep (older ones are deleted after the pointer moves).
    """
    run_dir = Path(run_dir)
    name = f"checkpoint-{step:07d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
    opt_tensors, opt_described = optimizer_to_tensors(optimizer)
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_described))
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(run_dir / LATEST, {"checkpoint": name, "step": step})
    old = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `run_dir/latest` points at, or None when the run has none."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    target = Path(run_dir) / json.loads(pointer.read_text())["checkpoint"]
    if not (target / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} points at {target}, which is missing or incomplete")
    return target


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict]:
    """Read a checkpoint: (trainable tensors, optimizer tensors, optimizer description, state meta)."""
    ckpt_dir = Path(ckpt_dir)
    trainable = load_file(str(ckpt_dir / "trainable.safetensors"))
    opt_tensors = load_file(str(ckpt_dir / "optimizer.safetensors"))
    opt_described = json.loads((ckpt_dir / "optimizer.json").read_text())
    meta = json.loads((ckpt_dir / "state.json").read_text())
    return trainable, opt_tensors, opt_described, meta
