"""train.py's checkpoints: written atomically in the background, resumed only when they fit the run."""

from __future__ import annotations

import argparse
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

try:
    from .batches import manifest_digest
    from .epochlog import log
    from .hparams import UsageError
except ImportError:  # run as a script: this folder is on sys.path
    from batches import manifest_digest
    from epochlog import log
    from hparams import UsageError

CHECKPOINT = "checkpoint.pt"
FORMAT = 2  # 2: the EMA is torch's AveragedModel state (1, unrecorded: a hand-rolled state dict)


def unfinished(path: Path) -> Path:
    """The temp file a checkpoint is written to before it is renamed to `path`."""
    return path.with_name(f".{path.name}.part")


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = unfinished(path)
    torch.save(state, tmp)
    os.replace(tmp, path)


def snapshot(obj):
    """A deep copy of the tensors in nested dicts/lists (on the CPU): what training mutates in place."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints in a background thread, so training does not wait for the disk.

    save() snapshots the state first (training goes on mutating the live tensors) and waits for the
    previous write; every write is atomic (temp file + rename), so an interrupted run finds the last
    complete checkpoint. close() waits for the last write and raises its error, if any.
    """

    def __init__(self, path: Path):
        self.path, self.pool, self.pending = path, ThreadPoolExecutor(1), None

    def save(self, state: dict) -> None:
        self.wait()
        self.pending = self.pool.submit(save_checkpoint, self.path, snapshot(state))

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


# Arguments that do not change what is trained: a checkpoint written under other values still resumes.
# epochs is the budget: a run given more epochs continues where it ended.
RUNTIME_ARGS = ("epochs", "model_dir", "train", "val", "test", "output_data_dir", "checkpoint_dir", "debugger_out_dir",
                "debugger_interval", "num_workers", "cache_mb", "weights_dir", "weights_source", "download_weights")


def fingerprint(args: argparse.Namespace, weights: dict | None) -> dict:
    """What a checkpoint must match to be resumed: its format, the hyperparameters, the train/val data and the weights."""
    return {"format": FORMAT, "hyperparameters": {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_ARGS},
            "train": manifest_digest(args.train), "val": manifest_digest(args.val),
            "weights": (weights or {}).get("sha256")}


def checkpoint_dir(path: str | None) -> Path | None:
    """The checkpoint folder of this run: on SageMaker a subfolder per training job, so that jobs (and the
    trials of a tuning job, which share one checkpoint prefix) never resume each other."""
    if not path:
        return None
    job = os.environ.get("TRAINING_JOB_NAME")
    return Path(path) / job if job else Path(path)


def drop(folder: Path | None, keep: bool = False) -> None:
    """On SageMaker, remove this job's checkpoint folder once the job is over (its model written, or its loss
    diverged), unless `keep` (--keep_checkpoint). SageMaker deletes what the container deletes from the
    checkpoint prefix too, so the trials of a tuning job, which share one prefix and each get all of it restored
    at start, never download a finished trial's checkpoint. A job name is never reused, so nothing could resume
    it. Locally the folder stays (bincount deletes it after the run unless train.keep_checkpoint)."""
    job = os.environ.get("TRAINING_JOB_NAME")
    if folder is not None and job and folder.name == job and folder.is_dir() and not keep:
        shutil.rmtree(folder, ignore_errors=True)
        log(f"removed this job's checkpoints ({folder}): the job is over, and the jobs that share its "
            "checkpoint prefix would download them")


def load_checkpoint(folder: Path | None, dist: Dist, expected: dict) -> dict | None:
    """The checkpoint to resume, or None: one written for other hyperparameters or data is named and ignored.
    A write a killed run left unfinished (its temp file) is removed: on SageMaker the checkpoint folder is
    synced to S3 and restored into every job sharing the prefix, so it would travel on for ever."""
    ckpt = None
    path = folder / CHECKPOINT if folder is not None else None
    if dist.main and path is not None:
        unfinished(path).unlink(missing_ok=True)
    if dist.main and path is not None and path.is_file():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt: a stream-reader error, an EOFError, ...
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            raise UsageError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first}); move it aside "
                             f"(mv {path} {path}.bad) to train this run again from epoch 1") from None
        found = ckpt.get("fingerprint") if isinstance(ckpt, dict) else None
        if found != expected:
            log(f"not resuming {path}: {mismatch(found, expected)}; starting fresh")
            ckpt = None
    return dist.broadcast(ckpt)


def mismatch(found: dict | None, expected: dict) -> str:
    """One line saying how a checkpoint's fingerprint differs from this run's."""
    if not isinstance(found, dict):
        return "it records no hyperparameters or data digest"
    if found.get("format", 1) != expected["format"]:
        return (f"it was written by an older train.py (checkpoint format {found.get('format', 1)}, this one reads "
                f"{expected['format']})")
    old, new = found.get("hyperparameters") or {}, expected["hyperparameters"]
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    changed += [f"{k} data changed" for k in ("train", "val") if found.get(k) != expected[k]]
    if found.get("weights") != expected["weights"]:
        changed.append("pretrained weights changed")
    return "it was written for other settings (" + ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "") + ")"


def usable_dir(path: Path | None) -> Path | None:
    if not path:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as exc:
        log(f"warning: no checkpoints ({path}: {exc.strerror})")
        return None


