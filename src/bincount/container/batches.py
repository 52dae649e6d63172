"""train.py's data: channel manifests, decoded image batches (cached or streamed), augmentation."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

try:
    from . import net, shards
    from .epochlog import log
    from .hparams import UsageError
except ImportError:  # run as a script: this folder is on sys.path
    import net
    import shards
    from epochlog import log
    from hparams import UsageError


def read_channel(channel: str | None, name: str, num_classes: int) -> list[tuple[Path, int]]:
    """(image path, count) pairs of a channel folder's manifest.jsonl."""
    if not channel:
        raise UsageError(f"no {name} channel: set SM_CHANNEL_{name.upper()} (a folder with manifest.jsonl)")
    folder = Path(channel)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise UsageError(f"{name} channel {folder} has no manifest.jsonl")
    items = []
    for number, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            count, image = int(row["count"]), Path(row["image"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{manifest}:{number}: need 'count' and 'image' ({exc})") from None
        if not 0 <= count < num_classes:
            raise UsageError(f"{manifest}:{number}: count {count} outside 0..{num_classes - 1} (raise num_classes)")
        items.append((image if image.is_absolute() else folder / image, count))
    if not items:
        raise UsageError(f"{name} channel {manifest} is empty")
    return items


def manifest_digest(channel: str) -> str:
    """sha256 over (id, count, sha256) of a channel's rows: the same for local and S3 layouts and shards."""
    if shards.is_shard_channel(channel):
        return shards.digest(channel)
    rows = []
    for line in (Path(channel) / "manifest.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append([str(row.get("id") or Path(row["image"]).stem), int(row["count"]), row.get("sha256")])
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def channel_batches(channel: str | None, name: str, args: argparse.Namespace, device: torch.device):
    """A channel's batch source: a shard channel (*.tar, see shards.py) streams, a manifest channel uses Batches."""
    if channel and shards.is_shard_channel(channel):
        try:
            workers = loader_workers(device) if args.num_workers is None else args.num_workers  # CPUs per GPU
            return shards.ShardBatches(channel, args.image_size, args.batch_size, args.num_classes, workers,
                                       device.type == "cuda", args.seed, args.shuffle_buffer, log=log)
        except shards.ShardError as exc:
            raise UsageError(f"{name} channel: {exc}") from None
    return Batches(read_channel(channel, name, args.num_classes), args.image_size, args.batch_size, args.cache_mb,
                   args.num_workers, device=device)


class Images(torch.utils.data.Dataset):
    """Decoded on demand (in DataLoader workers): one decode and one resize per item per epoch.

    Items are height x width x channel uint8 tensors, PIL's own layout (no transposing copy); a batch of
    them viewed as [B, 3, S, S] is already channels_last, the layout the model runs in.
    """

    def __init__(self, items: list[tuple[Path, int]], image_size: int):
        self.items, self.image_size = items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, count = self.items[i]
        return net.decode(path, self.image_size).permute(1, 2, 0), count


class Order(torch.utils.data.Sampler):
    """The index order of the next pass: one sampler per loader, so its workers persist across epochs."""

    def __init__(self):
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def loader_workers(device: torch.device) -> int:
    """DataLoader workers: on a GPU all CPUs this process's share (one kept for the training loop),
    on the CPU at most 8 (they compete with the training itself)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)
    return min(cpus, 8)


CACHE_PROCESSES_FROM = 1024  # images: fewer are decoded by threads (no worker start-up)


class Batches:
    """Batches of (uint8 images [B,3,S,S], counts [B]) over the given index order.

    Cached: every image decoded once (worker processes, or threads for a small set) and kept as one
    uint8 tensor, on the GPU when it fits in half its free memory; batches are index gathers there.
    Streamed: a DataLoader decodes per item in persistent worker processes (pinned batches on a GPU).
    Both keep images as [N, S, S, 3] and hand out channels_last views [B, 3, S, S] of them.
    """

    def __init__(self, items, image_size: int, batch_size: int, cache_mb: int, num_workers: int | None,
                 device: torch.device | str = "cpu"):
        self.items, self.batch_size, self.device = items, batch_size, torch.device(device)
        self.labels = torch.tensor([c for _, c in items])
        size = len(items) * 3 * image_size * image_size
        self.cached = size <= cache_mb * 2**20
        self.num_workers = loader_workers(self.device) if num_workers is None else num_workers
        self.dataset = Images(items, image_size)
        cuda = self.device.type == "cuda"
        if self.cached:
            self.images = self._decode_all(image_size)
            if cuda and size < torch.cuda.mem_get_info(self.device)[0] // 2:
                self.images, self.labels = self.images.to(self.device), self.labels.to(self.device)
        else:
            self.order = Order()
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=batch_size, sampler=self.order, num_workers=self.num_workers,
                pin_memory=cuda, persistent_workers=self.num_workers > 0,
                prefetch_factor=2 if self.num_workers > 0 else None)  # x workers: dozens in flight

    def _decode_all(self, image_size: int) -> torch.Tensor:
        """All images as one uint8 tensor: decoded by worker processes (all cores, no GIL) when there are many."""
        workers = max(1, self.num_workers)
        if len(self.items) < CACHE_PROCESSES_FROM or workers == 1:
            with ThreadPoolExecutor(workers) as pool:
                return torch.stack(list(pool.map(lambda i: self.dataset[i][0], range(len(self.items)))))
        images = torch.empty(len(self.items), image_size, image_size, 3, dtype=torch.uint8)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=64, num_workers=workers)  # keeps the order
        start = 0
        for batch, _ in loader:
            images[start:start + len(batch)] = batch
            start += len(batch)
        return images

    def __len__(self) -> int:
        return len(self.items)

    def iterate(self, order: list[int], drop_last_single: bool = False, epoch: int | None = None):
        """Batches over `order` (already the epoch's: `epoch` is for the shard reader's interface)."""
        if drop_last_single and len(order) % self.batch_size == 1 and len(order) > 1:
            order = order[:-1]  # a batch of one breaks BatchNorm in training
        if self.cached:
            index = torch.tensor(order).to(self.images.device, non_blocking=True)  # one copy per pass
            for start in range(0, len(order), self.batch_size):
                part = index[start:start + self.batch_size]
                images, labels = self.images[part], self.labels[part]
                if self.device.type == "cuda" and not images.is_cuda:  # a cache too big for the GPU
                    images = images.pin_memory()
                yield images.permute(0, 3, 1, 2), labels
        else:
            self.order.order = order
            for images, labels in self.loader:
                yield images.permute(0, 3, 1, 2), labels


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Count-preserving augmentation of a float batch in [0, 1]: flips, transpose, brightness/contrast."""
    n = images.shape[0]
    draws = torch.cat([torch.rand(3, n, generator=generator), torch.rand(2, n, generator=generator)])
    if images.is_cuda:  # the generator is on the CPU: one small asynchronous copy per batch
        draws = draws.pin_memory().to(images.device, non_blocking=True)
    coins = draws[:3] < 0.5
    pick = lambda coin, a, b: torch.where(coin.view(-1, 1, 1, 1), a, b)  # noqa: E731
    images = pick(coins[0], images.flip(3), images)
    images = pick(coins[1], images.flip(2), images)
    if images.shape[2] == images.shape[3]:
        images = pick(coins[2], images.transpose(2, 3), images)
    jitter = (draws[3:] * 0.3 + 0.85).view(2, n, 1, 1, 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * jitter[1] + mean * jitter[0]
    return images.clamp_(0, 1)


def to_input(images: torch.Tensor, device, channels_last: bool, generator: torch.Generator | None) -> torch.Tensor:
    """uint8 batch -> normalised float batch on the device (augmented when a generator is given)."""
    images = images.to(device, non_blocking=True).float().div_(255)
    if generator is not None:
        images = augment(images, generator)
    images = net.standardize(images)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images

