"""`bincount shard`: the splits as shard channels (WebDataset-style tar files; format in container/shards.py).

- local backend: <workdir>/shards/<split>/, built on this machine by container/shards.py's build().
  Images come from raw/ when fetch put every listed image there, else straight from data.source (a
  folder or bucket in the ABID layout, read through data/source.py as fetch reads it: splits made by
  `split --from-index` need no fetch at all).
  Local training and `upload` then use these shards (shard.channels: auto).
- sagemaker backend (bincount.backends.sagemaker.processing): a SageMaker Processing job runs container/shards.py (standard library, Pillow,
  boto3 only) on the PyTorch training image; it reads data.source (the public bucket) and writes the
  shards to s3://<s3.bucket>/<s3.prefix>/shards/<split>/, so no image passes through this machine.
  The channels are recorded in state.json with their format, and training reads them in FastFile mode.

Images are stored with their longest side at most shard.max_side (default 2 x train.image_size):
resized, never cropped, so a count never changes. Rebuilding skips shards whose sidecar exists.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.workspace import SPLITS, Workspace, atomic_write_text, read_manifest

BUILD_FILE = "_build.json"  # what a shard folder was built from; a change means a rebuild


class ShardResult(Result):
    backend: str  # local or sagemaker (a Processing job)
    channels: dict[str, str]  # split -> its shard folder (local) or s3:// URI (sagemaker)
    shards: dict[str, int]  # split -> shard .tar files (local: in its folder; sagemaker: planned)
    items: int  # local: items written into the shards built this run; sagemaker: items in the splits
    skipped: int  # items left out of the shards built this run (missing or bad image, fetch error; sagemaker: 0)
    bytes: int  # size of the shards built this run, bytes (sagemaker: 0)
    max_side: int  # images' longest side is at most this, pixels (shard.max_side, default 2 x train.image_size)
    seconds: float  # wall time, seconds
    items_per_second: float  # items written per second (sagemaker: 0.0)
    job: str | None = None  # the SageMaker Processing job's name (None: local backend)
    status: str | None = None  # the job's status: InProgress (not waited for) or Completed (None: local backend)

    def rich(self) -> Any:
        table = key_value_table(title=f"shards ({self.backend})")
        if self.job:
            table.add_row("processing job", f"{self.job} ({self.status})")
        for split, uri in self.channels.items():
            table.add_row(split, f"{uri}  ({self.shards.get(split, '?')} shards)")
        if not self.job:
            table.add_row("items", f"{self.items} ({self.skipped} skipped, {self.bytes / 1e6:.1f} MB)")
            table.add_row("rate", f"{self.items_per_second:.0f} items/s in {self.seconds:.1f} s")
        table.add_row("max side", f"{self.max_side} px")
        return table


def max_side(settings: Any) -> int:
    return settings.shard.max_side or 2 * settings.train.image_size


def shard_dir(ws: Workspace, split: str) -> Path:
    return ws.root / "shards" / split


def local_shards(settings: Any) -> dict[str, Path] | None:
    """The shard folders `bincount shard` built for train and val (and test), or None (per shard.channels)."""
    from bincount.container.shards import is_shard_channel

    mode = settings.shard.channels
    if mode == "files":
        return None
    ws = Workspace(settings.workdir)
    found = {split: shard_dir(ws, split) for split in SPLITS if is_shard_channel(shard_dir(ws, split))}
    if "train" in found and "val" in found:
        return found
    if mode == "shards":
        raise BincountError(f"shard.channels is shards but {ws.root / 'shards'} has no train and val shards: run `bincount shard`")
    return None


def split_rows(ws: Workspace) -> dict[str, list[dict]]:
    rows = {}
    for split in SPLITS:
        path = ws.split(split)
        if not path.is_file():
            if split == "test":
                continue
            raise BincountError(f"{path} not found: run `bincount split` first")
        rows[split] = read_manifest(path, need=("id", "count"))  # a bad row: one line naming file and line
        if not rows[split] and split != "test":
            raise BincountError(f"{path} is empty")
    return rows


def _local_source(ws: Workspace, rows: dict[str, list[dict]]) -> bool:
    """Are all listed images in raw/ (the bucket layout fetch mirrors)?"""
    return all("image" in r and (ws.raw / "bin-images" / f"{r['id']}.jpg").is_file() for part in rows.values() for r in part)


class _SourceImages:
    """What build() reads images with (container/shards.Store's read), over data/source.py: data.source
    with the data settings (region, endpoint, unsigned, timeout, data.retries), as fetch reads it."""

    def __init__(self, settings: Settings):
        from bincount.data.source import open_source

        self.source = open_source(settings)

    def read(self, name: str) -> bytes | None:
        return self.source.read(name, b"".join)


def shard(settings: Settings) -> ShardResult:
    """Build shard channels from the splits (see the module docstring)."""
    ws = Workspace(settings.workdir)
    return _local(settings, ws, split_rows(ws))


def _local(settings: Any, ws: Workspace, rows: dict[str, list[dict]]) -> ShardResult:
    from bincount.container import shards as sh

    started = time.perf_counter()
    data, cfg = settings.data, settings.shard
    side = max_side(settings)
    if _local_source(ws, rows):
        source: Any = sh.Store(str(ws.raw))
    else:
        log(f"images not all in {ws.raw}: reading them from {data.source}")
        source = _SourceImages(settings)
    total = {"items": 0, "skipped": 0, "bytes": 0}
    channels, counts = {}, {}
    for split, items in rows.items():
        folder = shard_dir(ws, split)
        recipe = {"items": _items_digest(items), "items_per_shard": cfg.items_per_shard, "max_side": side,
                  "quality": cfg.quality, "seed": cfg.seed}
        build_file = folder / BUILD_FILE
        if folder.exists() and (not build_file.is_file() or json.loads(build_file.read_text()) != recipe):
            log(f"{folder} was built from other items or settings: rebuilding it")
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(build_file, json.dumps(recipe, sort_keys=True) + "\n")
        try:
            stats = sh.build([{"id": r["id"], "count": r["count"]} for r in items], split, source, sh.Store(str(folder)),
                             items_per_shard=cfg.items_per_shard, max_side=side, quality=cfg.quality,
                             workers=cfg.workers, seed=cfg.seed, log=log)
        except sh.ShardError as exc:  # a shard that cannot be written (a full disk) names itself, a bad item its split
            raise BincountError(str(exc) if str(exc).startswith("cannot write") else f"{ws.split(split)}: {exc}") from None
        for key in total:
            total[key] += stats[key]
        channels[split] = str(folder)
        counts[split] = len(list(folder.glob("*.tar")))
    seconds = time.perf_counter() - started
    return ShardResult(backend="local", channels=channels, shards=counts, max_side=side, seconds=round(seconds, 3),
                       items_per_second=round(total["items"] / seconds, 1) if seconds > 0 else 0.0, **total)


def _items_digest(items: list[dict]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted([str(r["id"]), int(r["count"])] for r in items)).encode()).hexdigest()

