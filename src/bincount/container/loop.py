"""train.py's training loop: processes (DDP), loss, EMA, optimizer and schedule, one epoch, evaluation."""

from __future__ import annotations

import json
import math
import os

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

try:
    from . import epochlog, net
    from .batches import to_input
    from .epochlog import log
    from .hparams import UsageError
except ImportError:  # run as a script: this folder is on sys.path
    import epochlog
    import net
    from batches import to_input
    from epochlog import log
    from hparams import UsageError


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


def ramped_ema(decay: float):
    """AveragedModel's multi_avg_fn: an exponential moving average whose decay ramps up over the first steps,
    min(decay, (1 + n) / (10 + n)) at the n-th average, so the early, fast-changing weights fade out quickly.

    The decay is computed from AveragedModel's step count as a tensor (no read back to the host); float
    parameters and buffers move by one multi-tensor lerp, integer buffers (BatchNorm's step counter) are copied.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if averaged[0].dtype.is_floating_point:
            keep = torch.clamp((1 + n) / (10 + n), max=decay).to(averaged[0].dtype)
            torch._foreach_lerp_(averaged, current, 1 - keep)
        else:
            for mine, theirs in zip(averaged, current):
                mine.copy_(theirs)

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """torch's AveragedModel over `model`'s parameters and buffers with the ramped decay; `.module` is the
    averaged model that is validated, kept and shipped. It starts from `model`'s current weights."""
    ema = AveragedModel(model, multi_avg_fn=ramped_ema(decay), use_buffers=True)
    ema.update_parameters(model)  # the first call copies: the average starts at the initial weights
    return ema


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
                ema: AveragedModel | None = None, ticker: epochlog.StepTicker | None = None,
                epoch: int | None = None) -> float:
    """One pass over `order`; the mean training loss (all ranks together). generator: augmentation, or None;
    ticker: prints progress lines inside the epoch; epoch: seeds a shard channel's order. The loss is summed on
    the device and read once at the end (no host sync per step)."""
    model.train()
    total, seen = torch.zeros((), device=device), 0
    for images, labels in data.iterate(order, drop_last_single=True, epoch=epoch):
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
            ema.update_parameters(getattr(model, "module", model))
        total += loss.detach().float() * len(y)
        seen += len(y)
        if ticker is not None:
            ticker.tick(len(y) * dist.world)
    total, seen = dist.sum([total.item(), seen])
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model, data: Batches, loss_fn, device, channels_last, amp, dist: Dist) -> dict[str, float]:
    """Validation: loss, accuracy and RMSE of the predicted counts over a split (all ranks together), at
    training's speed (autocast, channels_last)."""

    def predict(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device.type, enabled=amp):
            logits = model(to_input(images, device, channels_last, None))
        return logits.float(), logits.argmax(1)

    return _metrics(model, data, loss_fn, device, dist, predict)


@torch.no_grad()
def score(model, data: Batches, loss_fn, device, dist: Dist, tta: bool) -> dict[str, float]:
    """Test metrics as `bincount evaluate` and the endpoint compute them: net.probabilities (float32, no
    autocast, with test-time augmentation when the model records it) of the same decoded pixels, on `model`
    built as net.load_model builds the shipped one. The loss is of those probabilities (their log as logits)."""

    def predict(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = net.probabilities(model, images.to(device, non_blocking=True), tta=tta)
        return probs.clamp_min(1e-12).log(), probs.argmax(1)

    return _metrics(model, data, loss_fn, device, dist, predict)


def _metrics(model, data: Batches, loss_fn, device, dist: Dist, predict) -> dict[str, float]:
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, squared error: read once at the end
    n = 0
    for images, labels in data.iterate(shard(len(data), dist, None)):
        y = labels.to(device, non_blocking=True)
        logits, pred = predict(images)
        sums += torch.stack([loss_fn(logits, y).double() * len(y), (pred == y).sum().double(),
                             ((pred - y).double() ** 2).sum()])
        n += len(y)
    loss_sum, correct, sq_err, n = dist.sum([*sums.tolist(), n])
    n = max(n, 1.0)
    return {"loss": loss_sum / n, "acc": correct / n, "rmse": math.sqrt(sq_err / n)}


def better(a: dict, b: dict | None) -> bool:
    """Is epoch metrics `a` better than `b`: higher val_acc, then lower val_loss."""
    return b is None or (a["val_acc"], -a["val_loss"]) > (b["val_acc"], -b["val_loss"])


def loss_limit(num_classes: int, count_loss: float) -> float:
    """A loss above this is divergence, not learning: 100x what guessing scores (uniform cross-entropy ln C plus
    the count term's worst mean error, count_loss * (C - 1))."""
    return 100 * (math.log(num_classes) + count_loss * (num_classes - 1))


def check_finite(epoch: int, metrics: dict[str, float], lr: float, limit: float = math.inf) -> None:
    """Stop a run whose loss is no longer finite, or absurd (over `limit`: a diverged run, e.g. val_loss 1.2e10):
    nan or inf weights, or a diverged model, would be shipped otherwise, and a tuner would take it as a trial."""
    bad = {k: v for k, v in metrics.items() if k.endswith("loss") and not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k}={v}" for k, v in bad.items())
        raise UsageError(f"the loss is not finite at epoch {epoch} ({what}): training stopped and no model was "
                         f"written; lower the learning rate (lr {lr:g}) or check the data")
    absurd = {k: v for k, v in metrics.items() if k.endswith("loss") and v > limit}
    if absurd:
        what = ", ".join(f"{k}={v:.4g}" for k, v in absurd.items())
        raise UsageError(f"training diverged at epoch {epoch} ({what}, over {limit:.4g}, 100x a guess's loss): "
                         f"stopped and no model was written; lower the learning rate (lr {lr:g})")
