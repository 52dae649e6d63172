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
  checkpoint of the same hyperparameters and data (else it says so in one line and starts fresh); on
  SageMaker the job's subfolder is removed once the model is written or the loss diverged (SageMaker then
  removes it from the prefix, so later trials do not download it);
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
(--ema_decay: torch's AveragedModel with a decay that ramps up over the first steps; the averaged model is
validated, kept and shipped), optional inverse-frequency class weights,
channels_last, mixed precision (--amp: float16 on CUDA, bfloat16 on CPUs that run it natively, else
float32; recorded as meta.json "train_precision"), early stopping on val_acc with `patience`, best-epoch
weights kept. Images are decoded once by net.decode, the decode serving, evaluate and the shard reader use
(a JPEG over 4 megapixels at 1/2, 1/4 or 1/8 scale), and
cached as uint8 tensors when they fit in --cache_mb (on the GPU when they fit there), else decoded per
item by persistent DataLoader workers (on a GPU: all CPUs but one; on the CPU: min(cpus, 8)). On a GPU
the loop never waits for the host: uint8 batches are copied asynchronously from pinned memory and
augmented/normalised there, the optimizer is fused, the loss is summed on the device.

The script is split along its seams, siblings shipped with it (backends/sagemaker/estimator.TRAINING_FILES): hparams.py
(the hyperparameter table bincount's settings also read), batches.py (channels, decoding, batches,
augmentation), loop.py (processes, loss, EMA, one epoch, evaluation), checkpoints.py, debughook.py.
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
from pathlib import Path

import torch
from torch import nn

try:
    from . import epochlog, hparams, net, shards
    from .batches import channel_batches, manifest_digest
    from .checkpoints import (CHECKPOINT, CheckpointWriter, checkpoint_dir, drop, fingerprint, load_checkpoint,
                              usable_dir)
    from .debughook import make_hook, set_mode
    from .epochlog import log
    from .hparams import UsageError
    from .loop import (CountingLoss, Dist, better, check_finite, class_weights, clone_state, cpu_bf16, evaluate,
                       loss_limit, make_ema, make_optimizer, score, shard, train_epoch, warmup_cosine)
except ImportError:  # run as a script: this folder is on sys.path
    import epochlog
    import hparams
    import net
    import shards
    from batches import channel_batches, manifest_digest
    from checkpoints import (CHECKPOINT, CheckpointWriter, checkpoint_dir, drop, fingerprint, load_checkpoint,
                             usable_dir)
    from debughook import make_hook, set_mode
    from epochlog import log
    from hparams import UsageError
    from loop import (CountingLoss, Dist, better, check_finite, class_weights, clone_state, cpu_bf16, evaluate,
                      loss_limit, make_ema, make_optimizer, score, shard, train_epoch, warmup_cosine)

CODE_FILES = ("inference.py", "net.py", "epochlog.py")
PROGRESS_S = float(os.environ.get("TRAIN_PROGRESS_S") or 30)  # seconds between progress lines inside an epoch
SERVING_REQUIREMENTS = (
    "# Serving needs only torch, torchvision and Pillow, which the SageMaker PyTorch inference container has.\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The hyperparameters (hparams.HYPERPARAMETERS, shared with bincount's settings), then the arguments
    only this script takes: channels and output folders (SageMaker's SM_* variables) and run-time switches."""
    env, str2bool = os.environ.get, hparams.str2bool
    p = argparse.ArgumentParser(description="Train the bin-counting model (SageMaker script mode).")
    hparams.add_arguments(p)
    p.add_argument("--num_classes", type=int, default=6, help="counts 0..num_classes-1")
    p.add_argument("--download_weights", type=str2bool, default=False,
                   help="imagenet without a weights channel: let torchvision download them when not cached")
    p.add_argument("--weights_source", default=None, help="where the weights channel comes from (recorded in meta.json)")
    p.add_argument("--weights_dir", default=env("SM_CHANNEL_WEIGHTS"), help="the weights channel (one .pth/.pt file)")
    p.add_argument("--cache_mb", type=int, default=4096, help="cache decoded images when they fit")
    p.add_argument("--augment", type=str2bool, default=True)
    p.add_argument("--checkpoint_dir", default=env("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints"))
    p.add_argument("--keep_checkpoint", type=str2bool, default=False,
                   help="on SageMaker, keep this job's checkpoint folder (and so its copy in S3) once the job is over")
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

    ema = make_ema(model, args.ema_decay) if args.ema_decay > 0 else None  # ema.module is validated and shipped
    kept = ema.module if ema is not None else model  # the weights that are validated, kept and shipped
    ckpt_dir = usable_dir(checkpoint_dir(args.checkpoint_dir)) if dist.main else None
    expected = fingerprint(args, weights_record)
    ckpt = load_checkpoint(ckpt_dir, dist, expected)
    start, best_state, best_metrics, bad_epochs, history = 1, None, None, 0, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
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
                                 dist=dist, ema=ema, ticker=ticker, epoch=epoch)
        set_mode(hook, "eval")
        val = evaluate(kept, val_data, loss_fn, device, channels_last, amp, dist)
        metrics = {"train_loss": train_loss, "val_loss": val["loss"], "val_acc": val["acc"],
                   "val_rmse": val["rmse"], "lr": lr}
        try:  # the same on every rank: the losses are summed over all of them
            check_finite(epoch, metrics, args.lr, loss_limit(args.num_classes, args.count_loss))
        except UsageError:  # this job is over for good (a diverged tuning trial, typically)
            if writer is not None:
                writer.close()
            drop(ckpt_dir, args.keep_checkpoint)
            raise
        history.append({"epoch": epoch, **metrics})
        if better(metrics, best_metrics):
            best_metrics = {"epoch": epoch, **metrics}
            best_state = clone_state(kept, "cpu")
            bad_epochs = 0
        else:
            bad_epochs += 1
        stopped = args.patience > 0 and bad_epochs >= args.patience
        if dist.main:
            print(epochlog.format_epoch_line(epoch, **metrics), flush=True)
            if writer is not None:
                writer.save({
                    "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "best_state": best_state,
                    "best_metrics": best_metrics, "bad_epochs": bad_epochs, "history": history, "stopped": stopped,
                    "ema": ema.state_dict() if ema else None, "fingerprint": expected})
        if stopped:
            log(f"early stop: no better val_acc for {args.patience} epochs (best epoch {best_metrics['epoch']})")

    if writer is not None:
        writer.close()
    if best_state is None:
        raise UsageError("no epoch ran (epochs must be >= 1)")
    if dist.main:  # tuners score a job by the last value of the objective: make it the kept epoch's
        print(epochlog.format_best_line(best_metrics), flush=True)
    if args.test:
        shipped = net.build_model(args.arch, args.num_classes, "none", args.stem)  # as evaluate and serving load it
        shipped.load_state_dict(best_state)
        test_data = channel_batches(args.test, "test", args, device)
        test = score(shipped.to(device), test_data, loss_fn, device, dist, args.tta)
        best_metrics.update({"test_loss": test["loss"], "test_acc": test["acc"], "test_rmse": test["rmse"]})
        if dist.main:
            log(f"test_acc={test['acc']:.4f} test_rmse={test['rmse']:.4f} (best epoch {best_metrics['epoch']})")
    if dist.main:
        write_model(args, best_state, best_metrics, history, started, precision, weights_record)
        drop(ckpt_dir, args.keep_checkpoint)  # on SageMaker: the job is done, its checkpoint leaves the shared prefix
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
