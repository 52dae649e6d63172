"""Train the bin-counting model: a SageMaker script-mode entry point that runs the same way locally.

Contract (as SageMaker runs it):
- hyperparameters arrive as `--name value` (booleans as true/false); unknown ones are ignored with a note;
- data: SM_CHANNEL_TRAIN and SM_CHANNEL_VAL (SM_CHANNEL_TEST optional) each hold `manifest.jsonl` whose
  rows have `count` and `image` (relative to the channel folder, or absolute), or a shard channel: `*.tar`
  shards with `.json` sidecars (shards.py), streamed by DataLoader workers over a shuffle buffer;
- output: SM_MODEL_DIR gets model.pth (best-epoch state dict), meta.json and code/ (inference.py, net.py,
  epochlog.py, requirements.txt); SM_OUTPUT_DATA_DIR gets epochs.jsonl; on failure SM_OUTPUT_DIR/failure;
- checkpoints: --checkpoint_dir, else $SM_CHECKPOINT_DIR, else /opt/ml/checkpoints (SageMaker syncs it
  with checkpoint_s3_uri), in a subfolder named $TRAINING_JOB_NAME on SageMaker (tuning trials share one
  prefix); written atomically every epoch; a restarted run continues after the last one, but only from a
  checkpoint of the same hyperparameters and data (else it says so in one line and starts fresh);
- pretrained weights: --pretrained imagenet | none | channel | a file; with a `weights` channel
  (SM_CHANNEL_WEIGHTS) imagenet and channel load its one file; imagenet without it comes from the torch
  hub cache, or is downloaded when --download_weights is true; meta.json "weights" records where they
  came from and their sha256;
- distributed: under torchrun / SageMaker torch_distributed (WORLD_SIZE > 1) it runs DDP (nccl on GPU,
  gloo on CPU); only rank 0 writes files and prints epoch lines (several SM_HOSTS without it: only the
  first host writes); SM_CURRENT_HOST and SM_NUM_GPUS are logged;
- SageMaker Debugger: when smdebug imports, the hook comes from smd.get_hook(create_if_not_exists=True)
  (SageMaker's JSON config) or, when --debugger_out_dir / $DEBUGGER_OUT_DIR is set, an explicit one.

Each epoch prints exactly one line on stdout (epochlog.format_epoch_line), the form SageMaker's metric
definitions and the tuners parse:

    epoch=3 train_loss=0.9100 val_loss=0.8800 val_acc=0.6100 val_rmse=0.8700 lr=0.000900

val_acc is the share of exact counts, val_rmse the root mean squared count error of the predicted
class. Inside an epoch, a `progress epoch=3 step=120/500 images_per_s=231.4` line every $TRAIN_PROGRESS_S
seconds (default 30) says where it is. Other progress lines go to stderr with a "[train]" prefix. A usage error ends with one line
"error: ..." on stderr and exit code 2.

Recipe: the whole image is resized once to image_size (never cropped: a crop could cut objects out and
change the count); augmentation is count-preserving (flips, transpose, small brightness/contrast jitter),
done per batch on the device; AdamW or SGD, linear warm-up then cosine decay per step, label smoothing
plus a count-aware term (|expected count - count| on the softmax, --count_loss), an EMA of the weights
(--ema_decay: the EMA model is validated, kept and shipped), optional inverse-frequency class weights,
channels_last, mixed precision (--amp: float16 on CUDA, bfloat16 on CPUs that run it natively, else
float32; recorded as meta.json "train_precision"), early stopping on val_acc with `patience`, best-epoch
weights kept. Images are decoded once (JPEGs at reduced size when much bigger than image_size) and
cached as uint8 tensors when they fit in --cache_mb (on the GPU when they fit there), else decoded per
item by persistent DataLoader workers (on a GPU: all CPUs but one; on the CPU: min(cpus, 8)). On a GPU
the loop never waits for the host: uint8 batches are copied asynchronously from pinned memory and
augmented/normalised there, the optimizer is fused, the loss is summed on the device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

try:
    from . import epochlog, net, shards
except ImportError:  # run as a script: this folder is on sys.path
    import epochlog
    import net
    import shards

CODE_FILES = ("inference.py", "net.py", "epochlog.py")
PROGRESS_S = float(os.environ.get("TRAIN_PROGRESS_S") or 30)  # seconds between progress lines inside an epoch
SERVING_REQUIREMENTS = (
    "# Serving needs only torch, torchvision and Pillow, which the SageMaker PyTorch inference container has.\n")
CHECKPOINT = "checkpoint.pt"


class UsageError(Exception):
    """Bad input the user can fix: reported as one line, exit code 2."""


def log(message: str) -> None:
    print(f"[train] {message}", file=sys.stderr, flush=True)


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description="Train the bin-counting model (SageMaker script mode).")
    p.add_argument("--arch", default="resnet18", choices=net.ARCHS)
    p.add_argument("--stem", default="standard", choices=net.STEMS, help="small: less stem downsampling (small inputs)")
    p.add_argument("--pretrained", default="none", help="imagenet | none | channel (the weights channel's file) | a file")
    p.add_argument("--download_weights", type=str2bool, default=False,
                   help="imagenet without a weights channel: let torchvision download them when not cached")
    p.add_argument("--weights_source", default=None, help="where the weights channel comes from (recorded in meta.json)")
    p.add_argument("--weights_dir", default=env("SM_CHANNEL_WEIGHTS"), help="the weights channel (one .pth/.pt file)")
    p.add_argument("--num_classes", type=int, default=6, help="counts 0..num_classes-1")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight_decay", type=float, default=1e-4)
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup_epochs", type=int, default=1)
    p.add_argument("--label_smoothing", type=float, default=0.05)
    p.add_argument("--count_loss", type=float, default=0.5, help="weight of |expected count - count| in the loss")
    p.add_argument("--ema_decay", type=float, default=0.995, help="EMA of the weights (validated and shipped); 0 = off")
    p.add_argument("--class_weighting", type=str2bool, default=False)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--patience", type=int, default=5, help="early stopping; 0 = never stop early")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers when not cached")
    p.add_argument("--cache_mb", type=int, default=4096, help="cache decoded images when they fit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shuffle_buffer", type=int, default=1000, help="shard channels: samples in the shuffle buffer")
    p.add_argument("--amp", type=str2bool, default=True,
                   help="mixed precision: float16 on CUDA, bfloat16 on CPUs with native bfloat16 (else off)")
    p.add_argument("--augment", type=str2bool, default=True)
    p.add_argument("--tta", type=str2bool, default=False,
                   help="test-time augmentation: the shipped model averages the 8 flips/transposes (meta.json 'tta')")
    p.add_argument("--checkpoint_dir", default=env("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints"))
    p.add_argument("--debugger_out_dir", default=env("DEBUGGER_OUT_DIR"), help="local smdebug hook output")
    p.add_argument("--debugger_interval", type=int, default=5, help="steps between saved tensors (local hook)")
    p.add_argument("--model_dir", default=env("SM_MODEL_DIR", "/opt/ml/model"))
    p.add_argument("--train", default=env("SM_CHANNEL_TRAIN"))
    p.add_argument("--val", default=env("SM_CHANNEL_VAL"))
    p.add_argument("--test", default=env("SM_CHANNEL_TEST"))
    p.add_argument("--output_data_dir", default=env("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data"))
    args, unknown = p.parse_known_args(argv)
    if unknown:
        log(f"ignoring unknown arguments: {' '.join(unknown)}")
    return args


# -- data ------------------------------------------------------------------------------------------
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


def decode(path: Path, image_size: int) -> torch.Tensor:
    """An image file -> uint8 [3, S, S]; a JPEG at least twice the size is decoded at 1/2, 1/4 or 1/8 scale
    (PIL draft mode: the DCT does the first, count-safe downscale, several times faster than a full decode)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "JPEG" and min(image.size) >= 2 * image_size:
            image.draft("RGB", (image_size, image_size))  # keeps both sides >= image_size
        return net.to_uint8(image, image_size)


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
        return decode(path, self.image_size).permute(1, 2, 0), count


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

    def iterate(self, order: list[int], drop_last_single: bool = False):
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


# -- training --------------------------------------------------------------------------------------
class Dist:
    """torch.distributed when launched with WORLD_SIZE > 1; otherwise a single process."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # Several SageMaker hosts without torch_distributed train independently: only the first one writes.
        hosts = json.loads(os.environ.get("SM_HOSTS") or "[]")
        self.spare_host = self.world == 1 and len(hosts) > 1 and os.environ.get("SM_CURRENT_HOST") != hosts[0]
        if self.spare_host:
            log(f"warning: {len(hosts)} hosts but no torch_distributed; only {hosts[0]} writes the model")
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0 and not self.spare_host

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled to mean 1 over the classes present."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (counts.clamp(min=1) * (counts > 0).sum()), 1.0)
    return weights


class CountingLoss(nn.modules.loss._Loss):  # a _Loss, as smdebug's register_loss requires
    """Cross-entropy plus `count_weight` x |expected count - count| (the softmax's mean count): ordinal-aware."""

    def __init__(self, weight: torch.Tensor | None, label_smoothing: float, count_weight: float):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.count_weight = count_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.ce(logits, target)
        if self.count_weight:
            counts = torch.arange(logits.shape[1], device=logits.device, dtype=torch.float32)
            expected = logits.float().softmax(1) @ counts
            loss = loss + self.count_weight * (expected - target.float()).abs().mean()
        return loss


class EMA:
    """Exponential moving average of the weights and float buffers; its decay ramps up over the first steps."""

    def __init__(self, model: nn.Module, decay: float):
        self.state, self.decay, self.steps = clone_state(model), decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        pairs = list(zip(self.state.values(), model.state_dict().values()))
        floats = [(e, v) for e, v in pairs if e.dtype.is_floating_point]
        others = [(e, v) for e, v in pairs if not e.dtype.is_floating_point]
        if floats:  # one multi-tensor kernel, not one launch per tensor
            torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1 - decay)
        for ema, live in others:
            ema.copy_(live)


def clone_state(model: nn.Module, device=None) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device).clone() for k, v in model.state_dict().items()}


def make_optimizer(model: nn.Module, args) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU the fused kernels: one launch per step, and GradScaler hands them its inf check as a tensor,
    # so a skipped fp16 step costs no host sync and the optimizer (not the scaler) skips it; the per-step
    # LR schedule counts it as a step, as it should (no "lr_scheduler.step() before optimizer.step()").
    fused = all(p.is_cuda for p in model.parameters()) or None
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=args.lr, fused=fused)


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_hook(args, dist: Dist, model: nn.Module, loss_fn: nn.Module):
    """The smdebug hook, or None (smdebug missing, broken, or not configured)."""
    if not dist.main:
        return None
    # smdebug's generated protobuf code is older than protobuf 4: newer protobufs (the DLC has 6.x) read it only
    # with the pure-Python implementation, which must be chosen before protobuf is first imported.
    if "google.protobuf" not in sys.modules:
        os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    try:
        try:
            from . import smdebug_compat
        except ImportError:
            import smdebug_compat
        smdebug_compat.install()
        import smdebug.pytorch as smd

        hook = smd.get_hook(create_if_not_exists=True)
        if hook is None and args.debugger_out_dir:
            from smdebug.core.reduction_config import ReductionConfig
            from smdebug.core.save_config import SaveConfig

            # Reductions (means, variances, norms), not whole tensors: a few KB per step instead of
            # the full weights and gradients; losses are kept whole.
            hook = smd.Hook(out_dir=args.debugger_out_dir, save_config=SaveConfig(save_interval=args.debugger_interval),
                            reduction_config=ReductionConfig(reductions=["mean", "variance"], abs_reductions=["mean"],
                                                             norms=["l2"]),
                            include_collections=["weights", "biases", "gradients", "losses"])
            hook.get_collection("losses").reduction_config = ReductionConfig()
        if hook is not None:
            hook.register_module(model)
            hook.register_loss(loss_fn)
            log(f"smdebug hook on ({getattr(hook, 'out_dir', '?')})")
        return hook
    except ImportError:
        return None
    except Exception as exc:  # smdebug is optional: never let it break training
        log(f"warning: smdebug hook disabled ({type(exc).__name__}: {exc})")
        return None


def set_mode(hook, mode: str) -> None:
    if hook is not None:
        import smdebug.pytorch as smd

        hook.set_mode(smd.modes.TRAIN if mode == "train" else smd.modes.EVAL)


def shard(n: int, dist: Dist, generator: torch.Generator | None) -> list[int]:
    """This rank's indices: shuffled with a generator shared by all ranks, then strided."""
    if generator is None:  # evaluation: every item once
        return list(range(n))[dist.rank::dist.world]
    order = torch.randperm(n, generator=generator).tolist()
    return order[: n - n % dist.world][dist.rank::dist.world]  # equal steps on every rank


def cpu_bf16() -> bool:
    """Does this CPU run bfloat16 natively (AVX512-BF16 / AMX)? Emulated bfloat16 would be slower than float32.

    $TRAIN_CPU_BF16=1 or 0 forces the answer, so tests run both sides of it on any CPU."""
    forced = os.environ.get("TRAIN_CPU_BF16", "")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train_epoch(model, data: Batches, order, *, optimizer, scheduler, loss_fn, scaler, device: torch.device,
                channels_last: bool, amp: bool, generator: torch.Generator | None, dist: Dist,
                ema: EMA | None = None, ticker: epochlog.StepTicker | None = None) -> float:
    """One pass over `order`; the mean training loss (all ranks together). generator: augmentation, or None;
    ticker: prints progress lines inside the epoch. The loss is summed on the device and read once at the end (no host sync per step)."""
    model.train()
    total, seen = torch.zeros((), device=device), 0
    for images, labels in data.iterate(order, drop_last_single=True):
        x = to_input(images, device, channels_last, generator)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):  # float16 on CUDA, bfloat16 on the CPU
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(getattr(model, "module", model))
        total += loss.detach().float() * len(y)
        seen += len(y)
        if ticker is not None:
            ticker.tick(len(y) * dist.world)
    total, seen = dist.sum([total.item(), seen])
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model, data: Batches, loss_fn, device, channels_last, amp, dist: Dist, tta: bool = False) -> dict[str, float]:
    """Loss, accuracy and RMSE of the predicted counts over a split (all ranks together).

    tta: counts from net.predict_proba's averaged views (as the shipped model predicts); the loss stays plain.
    """
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, squared error: read once at the end
    n = 0
    for images, labels in data.iterate(shard(len(data), dist, None)):
        x = to_input(images, device, channels_last, None)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(x)
            pred = net.predict_proba(model, x, tta=True).argmax(1) if tta else logits.argmax(1)
        sums += torch.stack([loss_fn(logits.float(), y).double() * len(y), (pred == y).sum().double(),
                             ((pred - y).double() ** 2).sum()])
        n += len(y)
    loss_sum, correct, sq_err, n = dist.sum([*sums.tolist(), n])
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc": correct / n, "rmse": math.sqrt(sq_err / n)}


def better(a: dict, b: dict | None) -> bool:
    """Is epoch metrics `a` better than `b`: higher val_acc, then lower val_loss."""
    return b is None or (a["val_acc"], -a["val_loss"]) > (b["val_acc"], -b["val_loss"])


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.part")
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
    """What a checkpoint must match to be resumed: the hyperparameters, the train/val data and the weights."""
    return {"hyperparameters": {k: v for k, v in sorted(vars(args).items()) if k not in RUNTIME_ARGS},
            "train": manifest_digest(args.train), "val": manifest_digest(args.val),
            "weights": (weights or {}).get("sha256")}


def checkpoint_dir(path: str | None) -> Path | None:
    """The checkpoint folder of this run: on SageMaker a subfolder per training job, so that jobs (and the
    trials of a tuning job, which share one checkpoint prefix) never resume each other."""
    if not path:
        return None
    job = os.environ.get("TRAINING_JOB_NAME")
    return Path(path) / job if job else Path(path)


def load_checkpoint(folder: Path | None, dist: Dist, expected: dict) -> dict | None:
    """The checkpoint to resume, or None: one written for other hyperparameters or data is named and ignored."""
    ckpt = None
    if dist.main and folder is not None and (folder / CHECKPOINT).is_file():
        path = folder / CHECKPOINT
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt: a stream-reader error, an EOFError, ...
            first = (str(exc).strip().splitlines() or [""])[0][:120]
            raise UsageError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {first}); move it aside "
                             f"(mv {path} {path}.bad) to train this run again from epoch 1") from None
        found = ckpt.get("fingerprint") if isinstance(ckpt, dict) else None
        if found != expected:
            log(f"not resuming {folder / CHECKPOINT}: {mismatch(found, expected)}; starting fresh")
            ckpt = None
    return dist.broadcast(ckpt)


def mismatch(found: dict | None, expected: dict) -> str:
    """One line saying how a checkpoint's fingerprint differs from this run's."""
    if not isinstance(found, dict):
        return "it records no hyperparameters or data digest"
    old, new = found.get("hyperparameters") or {}, expected["hyperparameters"]
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    changed += [f"{k} data changed" for k in ("train", "val") if found.get(k) != expected[k]]
    if found.get("weights") != expected["weights"]:
        changed.append("pretrained weights changed")
    return "it was written for other settings (" + ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "") + ")"


def check_finite(epoch: int, metrics: dict[str, float], lr: float) -> None:
    """Stop a run whose loss is no longer finite (nan or inf weights would be shipped otherwise)."""
    bad = {k: v for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UsageError(f"the loss is not finite at epoch {epoch} ({what}): training stopped and no model was "
                         f"written; lower the learning rate (lr {lr:g}) or check the data")


def usable_dir(path: Path | None) -> Path | None:
    if not path:
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as exc:
        log(f"warning: no checkpoints ({path}: {exc.strerror})")
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(args: argparse.Namespace) -> tuple[str, dict | None]:
    """(what net.build_model loads, meta.json's "weights" record: kind, where from, file, sha256) or ("none", None)."""
    kind = args.pretrained
    if kind in ("none", "", None):
        return "none", None
    channel = Path(args.weights_dir) if args.weights_dir else None
    if channel is not None and kind in ("imagenet", "channel"):
        files = sorted(p for p in channel.rglob("*") if p.is_file() and p.suffix in (".pth", ".pt"))
        if len(files) != 1:
            raise UsageError(f"the weights channel {channel} must hold exactly one .pth/.pt file, found {len(files)}")
        source = args.weights_source or f"weights channel ({files[0].name})"
        return str(files[0]), {"kind": kind, "from": source, "file": files[0].name, "sha256": sha256_file(files[0])}
    if kind == "channel":
        raise UsageError("pretrained=channel needs a weights channel (SM_CHANNEL_WEIGHTS or --weights_dir)")
    if kind == "imagenet":
        cached = net.imagenet_cache_file(args.arch).exists()
        path = net.imagenet_file(args.arch, download=args.download_weights)
        source = f"torch hub cache {path}" if cached else f"downloaded by torchvision from {net.imagenet_url(args.arch)}"
        return str(path), {"kind": "imagenet", "from": source, "file": path.name, "sha256": sha256_file(path)}
    if kind.startswith("s3://"):
        raise UsageError(f"pretrained={kind}: an s3:// URI reaches only SageMaker jobs (as their weights channel); "
                         "pass a local .pth/.pt file here")
    path = Path(kind)
    if not path.is_file():
        raise UsageError(f"pretrained weights file {path} not found; pass an existing .pth/.pt file, imagenet or none")
    return str(path), {"kind": "file", "from": f"file {path.resolve()}", "file": path.name, "sha256": sha256_file(path)}


def write_model(args, best_state, best_metrics, history, started: float, precision: str, weights: dict | None) -> None:
    model_dir = Path(args.model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.save(best_state, model_dir / "model.pth")
    hyperparameters = {k: v for k, v in vars(args).items()
                       if k not in ("model_dir", "train", "val", "test", "output_data_dir", "checkpoint_dir",
                                    "debugger_out_dir", "weights_dir")}
    meta = {
        "arch": args.arch, "stem": args.stem, "num_classes": args.num_classes, "classes": list(range(args.num_classes)),
        "image_size": args.image_size, "mean": list(net.IMAGENET_MEAN), "std": list(net.IMAGENET_STD), "tta": args.tta,
        "metrics": best_metrics, "hyperparameters": hyperparameters,
        "manifest_digest": manifest_digest(args.train), "weights": weights, "history": history,
        "train_seconds": round(time.time() - started, 1), "train_precision": precision, "torch": torch.__version__,
    }
    (model_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    here, code = Path(__file__).resolve().parent, model_dir / "code"
    code.mkdir(exist_ok=True)
    for name in CODE_FILES:
        shutil.copy2(here / name, code / name)
    (code / "requirements.txt").write_text(SERVING_REQUIREMENTS)
    if args.output_data_dir:
        out = Path(args.output_data_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "epochs.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def run(args: argparse.Namespace) -> dict:
    """Train; returns the best epoch's metrics (on rank 0; other ranks get them too)."""
    started = time.time()
    if args.num_classes < 2:
        raise UsageError("num_classes must be at least 2")
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name} {value} is not a finite number")
    dist = Dist()
    device = dist.device
    cuda = device.type == "cuda"
    amp, channels_last = args.amp and (cuda or cpu_bf16()), True  # channels_last: faster convs on CPU and GPU
    precision = str(torch.get_autocast_dtype(device.type)).removeprefix("torch.") if amp else "float32"
    torch.backends.cudnn.benchmark = cuda  # fixed input size: let cuDNN pick the fastest kernels once
    torch.manual_seed(args.seed)

    train_data = channel_batches(args.train, "train", args, device)
    val_data = channel_batches(args.val, "val", args, device)
    if dist.main:
        log(f"{len(train_data)} train / {len(val_data)} val images at {args.image_size}px "
            f"({'cached' if train_data.cached else 'streamed'}), {args.arch}, device {device} ({precision}), "
            f"world {dist.world}, "
            f"host {os.environ.get('SM_CURRENT_HOST', 'local')} "
            f"({os.environ.get('SM_NUM_GPUS') or torch.cuda.device_count()} GPUs)")

    pretrained, weights_record = resolve_weights(args)
    model = net.build_model(args.arch, args.num_classes, pretrained, args.stem).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weights = class_weights(train_data.labels, args.num_classes).to(device) if args.class_weighting else None
    loss_fn = CountingLoss(weights, args.label_smoothing, args.count_loss)
    optimizer = make_optimizer(model, args)
    steps = math.ceil(len(train_data) / dist.world / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(args.warmup_epochs * steps, args.epochs * steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and cuda)  # bfloat16 needs no loss scaling

    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None  # its weights are validated and shipped
    ckpt_dir = usable_dir(checkpoint_dir(args.checkpoint_dir)) if dist.main else None
    expected = fingerprint(args, weights_record)
    ckpt = load_checkpoint(ckpt_dir, dist, expected)
    start, best_state, best_metrics, bad_epochs, history = 1, None, None, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema") is not None:
            ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
            ema.steps = ckpt["ema_steps"]
        start, best_state, best_metrics = ckpt["epoch"] + 1, ckpt["best_state"], ckpt["best_metrics"]
        bad_epochs, history = ckpt["bad_epochs"], ckpt["history"]
        log(f"resuming after epoch {ckpt['epoch']} from {ckpt_dir / CHECKPOINT}")
    stopped = ckpt is not None and ckpt.get("stopped", False)
    writer = CheckpointWriter(ckpt_dir / CHECKPOINT) if ckpt_dir is not None else None

    hook = make_hook(args, dist, model, loss_fn)
    ddp = model
    if dist.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)

    for epoch in range(start, args.epochs + 1):
        if stopped:
            break
        generator = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        order = shard(len(train_data), dist, generator)
        set_mode(hook, "train")
        lr = optimizer.param_groups[0]["lr"]
        aug = generator if args.augment else None
        ticker = epochlog.StepTicker(epoch, math.ceil(len(order) / args.batch_size), PROGRESS_S) if dist.main else None
        train_loss = train_epoch(ddp, train_data, order, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn,
                                 scaler=scaler, device=device, channels_last=channels_last, amp=amp, generator=aug,
                                 dist=dist, ema=ema, ticker=ticker)
        set_mode(hook, "eval")
        live = clone_state(model) if ema is not None else None
        if ema is not None:
            model.load_state_dict(ema.state)
        val = evaluate(model, val_data, loss_fn, device, channels_last, amp, dist)
        metrics = {"train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"],
                   "val_rmse": val["rmse"], "lr": lr}
        check_finite(epoch, metrics, args.lr)  # the same on every rank: the losses are summed over all of them
        history.append({"epoch": epoch, **metrics})
        if better(metrics, best_metrics):
            best_metrics = {"epoch": epoch, **metrics}
            best_state = clone_state(model, "cpu")
            bad_epochs = 0
        else:
            bad_epochs += 1
        if live is not None:
            model.load_state_dict(live)
        stopped = args.patience > 0 and bad_epochs >= args.patience
        if dist.main:
            print(epochlog.format_epoch_line(epoch, **metrics), flush=True)
            if writer is not None:
                writer.save({
                    "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best_state": best_state,
                    "best_metrics": best_metrics, "bad_epochs": bad_epochs, "history": history, "stopped": stopped,
                    "ema": ema.state if ema else None, "ema_steps": ema.steps if ema else 0, "fingerprint": expected})
        if stopped:
            log(f"early stop: no better val_acc for {args.patience} epochs (best epoch {best_metrics['epoch']})")

    if writer is not None:
        writer.close()
    if best_state is None:
        raise UsageError("no epoch ran (epochs must be >= 1)")
    if dist.main:  # tuners score a job by the last value of the objective: make it the kept epoch's
        print(epochlog.format_best_line(best_metrics), flush=True)
    if args.test:
        model.load_state_dict(best_state)
        test = evaluate(model, channel_batches(args.test, "test", args, device), loss_fn, device, channels_last, amp, dist, args.tta)
        best_metrics.update({"test_loss": test["loss"], "test_acc": test["acc"], "test_rmse": test["rmse"]})
        if dist.main:
            log(f"test_acc={test['acc']:.4f} test_rmse={test['rmse']:.4f} (best epoch {best_metrics['epoch']})")
    if dist.main:
        write_model(args, best_state, best_metrics, history, started, precision, weights_record)
    if hook is not None:
        try:
            hook.close()
        except Exception as exc:  # noqa: BLE001 - the model is written; a hook problem is only a warning
            log(f"warning: smdebug hook close failed ({exc})")
    dist.barrier()
    dist.close()
    return best_metrics


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except (UsageError, net.WeightsUnavailable, shards.ShardError) as exc:  # ShardError: a hostile shard, mid-pass
        message = f"error: {exc}"
        print(message, file=sys.stderr, flush=True)
        failure_dir = os.environ.get("SM_OUTPUT_DIR")
        if failure_dir:  # SageMaker shows this file as the job's FailureReason
            try:
                Path(failure_dir).mkdir(parents=True, exist_ok=True)
                (Path(failure_dir) / "failure").write_text(message + "\n")
            except OSError:
                pass
        return 2


if __name__ == "__main__":
    sys.exit(main())
