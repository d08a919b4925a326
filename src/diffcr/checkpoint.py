"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint directory is written under a temporary name and renamed into place, then the `latest` pointer
is replaced atomically, so a kill at any moment leaves the previous checkpoint readable.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

LATEST = "latest"
LOCK = ".lock"
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")


class CheckpointError(ValueError):
    """A run folder's checkpoint cannot be read; the message names the file and what to do about it."""


class RunInUse(RuntimeError):
    """Another process is writing to the same run folder."""


def check_writable_dir(path: str | Path, what: str = "output folder") -> None:
    """Raise `ValueError` unless `path` is a folder, or could be created as one, that this process can write.

    Creates nothing, so it can run before any work; `what` names the option in the message (e.g. "--out").
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file, not a folder; choose a folder path")
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(
            f"{what} {str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a folder; choose another path"
        )
    # W for creating entries, X for reaching them; os.access also sees read-only file systems
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(
            f"{what} {str(path)!r} cannot be written: no write permission in {str(ancestor)!r}; "
            "choose a folder you can write to"
        )


def check_writable_file(path: str | Path, what: str = "output file") -> None:
    """Raise `ValueError` unless a file can be written at `path` (its missing parent folders may be created).

    Creates nothing, so every output of a command can be checked before the first one is written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a folder; give the path of a file (inside it, or elsewhere)")
    if path.name in ("", ".", ".."):
        raise ValueError(f"{what} {str(path)!r} is not a file name; give a path such as 'out/samples.png'")
    check_writable_dir(path.parent, f"the folder of {what}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{what} {str(path)!r} exists and is read-only; choose another path or make it writable")


_HELD_LOCKS: dict[str, list] = {}  # resolved run folder -> [file descriptor, depth]; makes run_lock re-entrant


@contextmanager
def run_lock(run_dir: str | Path):
    """Hold an exclusive lock on `run_dir` (created if missing) for the duration of the block.

    A second process that asks for the same folder gets `RunInUse` at once instead of overwriting the first
    one's checkpoints and artifact. The lock is `flock` on `run_dir/.lock`: the operating system releases it
    when the holder exits, even when it is killed, so a stale lock file never blocks a later run. Re-entrant
    within one process (the CLI holds it around `train`, which takes it again).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock; runs are not protected from each other there
        yield
        return
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunInUse(
            f"{run_dir} is in use by another diffcr run (pid {holder}); wait for it to finish, "
            "or choose another output folder"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCKS[key] = [fd, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
    run_dir: Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optimizer,
    meta: dict,
    keep: int = 1,
    average: tuple[dict[str, torch.Tensor], list[int]] | None = None,
) -> Path:
    """Write `run_dir/checkpoint-<step>` atomically and point `run_dir/latest` at it.

    Args:
        tensors: the trainable parameters (name -> tensor).
        optimizer: its state is saved beside them.
        meta: JSON-able training state (step, config, ...).
        keep: how many checkpoints to keep (older ones are deleted after the pointer moves).
        average: (mean tensors, the steps they average) of a run that averages its weights
            (`diffcr.train.averaging`): written beside the weights, its steps in state.json.
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
    if average is not None:
        mean, average_steps = average
        meta = {**meta, "average_steps": list(average_steps)}
        if average_steps:
            save_file({k: v.contiguous().cpu() for k, v in mean.items()}, str(tmp / "average.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**meta, "step": step}, indent=2, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(run_dir / LATEST, {"checkpoint": name, "step": step})
    old = sorted(p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name != name)
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _older_checkpoints_hint(run_dir: Path, exclude: str | None = None) -> str:
    older = sorted(p.name for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name != exclude)
    if older:
        return (
            f"point {run_dir / LATEST} at an older checkpoint ({', '.join(older)}) with "
            f'{{"checkpoint": "{older[-1]}", "step": N}}, or start afresh in a new folder'
        )
    return "start afresh: drop --resume and choose a new output folder"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `run_dir/latest` points at, or None when the run has none.

    Raises:
        CheckpointError: the pointer is not the JSON `save_checkpoint` writes, or names a missing checkpoint.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    expected = '{"checkpoint": "checkpoint-0000100", "step": 100}'
    try:
        payload = json.loads(pointer.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{pointer} is not valid JSON ({err}); it should read {expected}: " + _older_checkpoints_hint(run_dir)
        ) from err
    name = payload.get("checkpoint") if isinstance(payload, dict) else None
    # the name must be a plain checkpoint folder: a pointer must never lead outside the run folder
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(
            f"{pointer} does not name a checkpoint folder (got {payload!r}); it should read {expected}: "
            + _older_checkpoints_hint(run_dir)
        )
    target = run_dir / name
    if not (target / "state.json").is_file():
        raise CheckpointError(
            f"{pointer} points at {target}, which is missing or incomplete: "
            + _older_checkpoints_hint(run_dir, exclude=name)
        )
    return target


def load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict]:
    """Read a checkpoint: (trainable tensors, optimizer tensors, optimizer description, state meta).

    Raises:
        CheckpointError: a file is missing, truncated or not what `save_checkpoint` writes (the file is named).
    """
    ckpt_dir = Path(ckpt_dir)
    hint = _older_checkpoints_hint(ckpt_dir.parent, exclude=ckpt_dir.name)

    def read(name: str, reader):
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete: {hint}")
        try:
            return reader(path)
        except Exception as err:  # safetensors, json and OS errors alike: the file is damaged
            raise CheckpointError(f"cannot read checkpoint file {path} ({type(err).__name__}: {err}): {hint}") from err

    trainable = read("trainable.safetensors", lambda p: load_file(str(p)))
    opt_tensors = read("optimizer.safetensors", lambda p: load_file(str(p)))
    opt_described = read("optimizer.json", lambda p: json.loads(p.read_text()))
    meta = read("state.json", lambda p: json.loads(p.read_text()))
    if not isinstance(opt_described, dict) or not {"param_groups", "scalars"} <= set(opt_described):
        raise CheckpointError(f"{ckpt_dir / 'optimizer.json'} lacks 'param_groups' and 'scalars': {hint}")
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise CheckpointError(f"{ckpt_dir / 'state.json'} lacks a valid 'step' (got {meta!r:.200}): {hint}")
    bad = sorted(name for name, tensor in trainable.items() if not torch.isfinite(tensor).all())
    if bad:
        raise CheckpointError(f"checkpoint {ckpt_dir} holds non-finite weights ({bad[:4]}): {hint}")
    return trainable, opt_tensors, opt_described, meta
