"""Atomic checkpoints in safetensors.

Layout of ``<output_dir>/checkpoints``::

    step-000010/            one directory per checkpoint, written to a temporary name and renamed
        actor.safetensors   trainable model state (value head included when shared)
        critic.safetensors  a separate critic, if any
        optim.safetensors   every tensor of the optimizer/scheduler/RNG state, flattened
        state.json          everything else (step, data position, KL coefficient, ...), and the
                            structure needed to rebuild the optimizer state from the tensors
    latest                  a text file naming the newest complete checkpoint (replaced atomically)

A crash at any point leaves the previous checkpoint and ``latest`` intact.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _flatten(obj, prefix: str, tensors: dict):
    """Replace every tensor in a nested structure by a reference, collecting the tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        out = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": out} if isinstance(obj, tuple) else out
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return {"__float__": repr(obj)}
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, *, models: dict[str, dict[str, torch.Tensor]], state: dict) -> Path:
    """Write ``models`` (name -> state dict) and ``state`` (nested, may hold tensors) atomically.

    Returns the checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=root))
    try:
        for name, sd in models.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
        tensors: dict[str, torch.Tensor] = {}
        structure = _flatten(state, "s", tensors)
        save_file(tensors, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "state": structure}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        backup = None
        if final.exists():  # re-saving a step: keep the old copy until the new one is in place
            backup = root / f".old-{final.name}"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, root / "latest")
        _fsync_dir(root)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    root = Path(root)
    latest = latest_checkpoint(root)
    dirs = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in dirs[:-keep] if keep > 0 else []:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def _step_number(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def resume_point(root: str | Path) -> Path | None:
    """The checkpoint a resumed run starts from, or None when ``root`` holds no checkpoint at all.

    The one ``latest`` names; if that pointer is missing or names no complete checkpoint (``latest`` is replaced
    last, so that takes a damaged directory, or a crash between the two renames of a re-saved step, which leaves
    only ``.old-step-N``), the newest complete checkpoint, with a warning (a ``.old-`` copy is moved back and
    ``latest`` rewritten). Raises ValueError when checkpoint directories exist but none is complete: a resumed run
    must never restart from the initial weights and prune the directory."""
    root = Path(root)
    latest = latest_checkpoint(root)
    if latest is not None:
        return latest
    dirs = [p for pattern in ("step-*", ".old-step-*") for p in root.glob(pattern)
            if p.is_dir() and re.fullmatch(r"(\.old-)?step-\d+", p.name)]
    complete = sorted((p for p in dirs if (p / "state.json").is_file()), key=_step_number)
    if not complete:
        if dirs or (root / "latest").exists():
            raise ValueError(f"run.resume: {root} holds checkpoint directories but none is complete (no state.json "
                             f"in {', '.join(sorted(p.name for p in dirs)) or 'any'}); nothing to resume from. Set "
                             "run.resume=false with run.overwrite=true to start again, or restore a checkpoint")
        return None
    chosen = complete[-1]
    if chosen.name.startswith(".old-"):
        target = root / chosen.name[len(".old-"):]
        if not target.exists():
            os.replace(chosen, target)
            chosen = target
    pointer = root / "latest"
    said = pointer.read_text().strip() if pointer.is_file() else None
    what = f"names {said!r}, which is not a complete checkpoint" if said else "is missing"
    warnings.warn(f"run.resume: {root}/latest {what}; resuming from the newest complete checkpoint, {chosen.name}",
                  stacklevel=2)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(chosen.name)
    os.replace(latest_tmp, pointer)
    return chosen


def check_run_dir(output_dir: str | Path, *, overwrite: bool) -> list[Path]:
    """What of an earlier run ``output_dir`` holds (``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``); a
    ValueError naming ``run.output_dir`` when there is any and not ``overwrite``. Deletes nothing (``clear_run``)."""
    out = Path(output_dir)
    owned = [out / "checkpoints", out / "metrics.jsonl", out / "tensorboard"]
    found = [p for p in owned if p.is_file() or (p.is_dir() and any(p.iterdir()))]
    if found and not overwrite:
        raise ValueError(f"run.output_dir: {out} holds an earlier run ({', '.join(p.name for p in found)}); set "
                         "run.resume=true to continue it, run.overwrite=true to replace it, or choose another "
                         "run.output_dir")
    return found


def clear_run(output_dir: str | Path, *, overwrite: bool) -> None:
    """Before a fresh (not resumed) run: refuse an ``output_dir`` that holds an earlier run's checkpoints or
    metrics, unless ``overwrite``, which deletes them (``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``).
    A fresh run in an earlier run's directory would otherwise mix the two runs' checkpoints and metrics, and could
    leave the earlier run's weights as the newest checkpoint."""
    for p in check_run_dir(output_dir, overwrite=overwrite):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def latest_checkpoint(root: str | Path) -> Path | None:
    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, int]:
    """Returns (models, state, step) as saved by :func:`save_checkpoint`."""
    path = Path(path)
    meta_file = path / "state.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"checkpoint: no state.json in {path}")
    try:
        meta = json.loads(meta_file.read_text())
        tensors = load_file(str(path / "optim.safetensors"))
        models = {f.stem: load_file(str(f)) for f in path.glob("*.safetensors") if f.stem != "optim"}
        if "actor" not in models:
            raise FileNotFoundError("no actor.safetensors")
        return models, _unflatten(meta["state"], tensors), int(meta["step"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"checkpoint {path} is incomplete or corrupt ({type(e).__name__}: {e}); delete that "
                         "directory to resume from the newest complete one before it") from e
