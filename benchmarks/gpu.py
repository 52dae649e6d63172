"""Benchmark: train.py's input pipeline on a GPU, as a share of the model's peak measured in the same run.

For each --archs (resnet18, resnet50) at --image-size 224, on one CUDA device:
- peak: train.py's own training pass (train_epoch: fp16 autocast, channels_last, fused AdamW, GradScaler,
  EMA, count-aware loss, flips/transposes/jitter and normalisation on the GPU) fed uint8 batches that
  already sit on the GPU: the most the loop can do when input costs nothing;
- cached: train.py's Batches with every image decoded once into memory (the default while the data fits
  --cache_mb; the cache lives on the GPU when it fits there);
- streamed: Batches with cache_mb=0 (`--cache_mb 0`): persistent DataLoader workers decode every JPEG per
  epoch, pinned uint8 batches are copied asynchronously.
Rows: images/s of cached and streamed / peak, goal >= 0.8 each. For information: the bare step (the model's
forward/backward and fused AdamW on ready float tensors, no EMA, augmentation or loss extras) and the rate
at which the cache is filled (decoding with all CPUs). Each rate is the best of --passes timed passes after
one warm-up pass (cuDNN autotuning, worker start-up).

Data: --unique synthetic bins (counts 0..5) re-encoded as --source-size JPEGs (320x256 like the issue's
measurement), listed --images times in all (files repeat, so they sit in the page cache as a warm data set
would). The loader workers are train.py's default (all CPUs but one) unless --num-workers is given.

Without a CUDA device it says so and is skipped. --dry-run runs the same code on the CPU at a toy size
(tests/benchmarks/test_gpu.py runs it, so the script cannot rot); its numbers measure nothing.

    .venv/bin/python benchmarks/gpu.py [--archs resnet18,resnet50] [--images 4096] [--batch-size 256]
                                       [--image-size 224] [--source-size 320x256] [--num-workers N] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.8


def make_items(root: Path, images: int, unique: int, source_size: tuple[int, int]) -> list[tuple[Path, int]]:
    """`images` (path, count) items over `unique` synthetic JPEG bins of source_size (width, height)."""
    import json

    from PIL import Image

    from bincount.data.synth import synthesize

    synthesize(root, n=unique, image_size=max(source_size), seed=0)
    files = []
    for label in sorted((root / "metadata").glob("*.json")):
        path = root / "bin-images" / f"{label.stem}.jpg"
        with Image.open(path) as image:
            image.convert("RGB").resize(source_size, Image.BILINEAR).save(path, quality=90)
        files.append((path, json.loads(label.read_text())["EXPECTED_QUANTITY"]))
    return [files[i % len(files)] for i in range(images)]


class Ready:
    """The peak's data: one uint8 batch already on the device, handed out as train.py's Batches would."""

    def __init__(self, n: int, batch_size: int, image_size: int, device):
        import torch

        self.n, self.batch_size = n, batch_size
        self.images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
        self.images = self.images.contiguous(memory_format=torch.channels_last)  # the layout Batches hands out
        self.labels = torch.randint(0, 6, (batch_size,), device=device)

    def __len__(self) -> int:
        return self.n

    def iterate(self, order, drop_last_single: bool = False, epoch: int | None = None):
        for start in range(0, len(order), self.batch_size):
            size = min(self.batch_size, len(order) - start)
            yield self.images[:size], self.labels[:size]


class Loop:
    """train.py's training state for one arch, built with train.py's own functions and defaults."""

    def __init__(self, arch: str, args, device):
        import torch

        from bincount.container import loop, net, train

        self.loop, self.device = loop, device
        self.args = train.parse_args(["--arch", arch, "--image_size", str(args.image_size),
                                       "--batch_size", str(args.batch_size)])
        cuda = device.type == "cuda"
        self.amp = self.args.amp and (cuda or loop.cpu_bf16())
        torch.backends.cudnn.benchmark = cuda
        self.model = net.build_model(arch, self.args.num_classes).to(device).to(memory_format=torch.channels_last)
        self.optimizer = loop.make_optimizer(self.model, self.args)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and cuda)
        self.loss_fn = loop.CountingLoss(None, self.args.label_smoothing, self.args.count_loss)
        self.ema = loop.make_ema(self.model, self.args.ema_decay)
        self.dist = loop.Dist()

    def rate(self, data, passes: int) -> float:
        """Best images/s of `passes` timed train_epoch passes over all of `data`, after one warm-up pass."""
        import torch

        best = 0.0
        for number in range(passes + 1):
            generator = torch.Generator().manual_seed(number)
            order = torch.randperm(len(data), generator=generator).tolist()
            self.sync()
            start = time.perf_counter()
            self.loop.train_epoch(self.model, data, order, optimizer=self.optimizer, scheduler=self.scheduler,
                                  loss_fn=self.loss_fn, scaler=self.scaler, device=self.device, channels_last=True,
                                  amp=self.amp, generator=generator, dist=self.dist, ema=self.ema)
            self.sync()
            if number:  # the first pass warms up (cuDNN autotuning, allocator, worker start-up)
                best = max(best, len(order) / (time.perf_counter() - start))
        return best

    def bare_rate(self, n: int, passes: int) -> float:
        """The model alone: forward/backward and the optimizer on ready float tensors (no EMA, augmentation)."""
        import torch

        x = torch.randn(self.args.batch_size, 3, self.args.image_size, self.args.image_size, device=self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, self.args.num_classes, (self.args.batch_size,), device=self.device)
        loss_fn, steps, best = torch.nn.CrossEntropyLoss(), max(1, n // self.args.batch_size), 0.0
        self.model.train()
        for number in range(passes + 1):
            self.sync()
            start = time.perf_counter()
            for _ in range(steps):
                with torch.autocast(self.device.type, enabled=self.amp):
                    loss = loss_fn(self.model(x), y)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.sync()
            if number:
                best = max(best, steps * self.args.batch_size / (time.perf_counter() - start))
        return best

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def measure(arch: str, items, args, device) -> dict:
    from bincount.container.batches import Batches

    loop = Loop(arch, args, device)
    out = {"arch": arch, "peak": loop.rate(Ready(len(items), args.batch_size, args.image_size, device), args.passes)}
    started = time.perf_counter()
    cached = Batches(items, args.image_size, args.batch_size, cache_mb=1 << 20, num_workers=args.num_workers,
                     device=device)
    out["fill"] = len(items) / (time.perf_counter() - started)
    out["cache_on"] = str(cached.images.device)
    out["cached"] = loop.rate(cached, args.passes)
    del cached
    streamed = Batches(items, args.image_size, args.batch_size, cache_mb=0, num_workers=args.num_workers,
                       device=device)
    out["workers"] = streamed.num_workers
    out["streamed"] = loop.rate(streamed, args.passes)
    del streamed
    out["bare"] = loop.bare_rate(len(items), args.passes)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="resnet18,resnet50")
    p.add_argument("--images", type=int, default=4096, help="images per pass")
    p.add_argument("--unique", type=int, default=256, help="distinct synthetic bins drawn (the rest repeat them)")
    p.add_argument("--source-size", default="320x256", help="WIDTHxHEIGHT of the JPEG files")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: train.py's)")
    p.add_argument("--passes", type=int, default=2, help="timed passes per rate (after one warm-up pass)")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at a toy size (measures nothing)")
    args = p.parse_args(argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else [])

    import torch

    if args.dry_run:
        args.images, args.unique, args.source_size = min(args.images, 8), min(args.unique, 4), "80x64"
        args.image_size, args.batch_size, args.passes = 32, 4, 1
        args.num_workers = 1 if args.num_workers is None else args.num_workers
        torch.set_num_threads(1)  # a toy model on a shared machine: more threads only wait for each other
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        message = ("skipped: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine: "
                   "python benchmarks/gpu.py")
        print(f"gpu: {message}", flush=True)
        return {"name": "gpu", "ratio": None, "goal": None, "skipped": True, "note": message}
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    width, height = (int(v) for v in args.source_size.lower().split("x"))
    where = "CPU (dry run: measures nothing)" if args.dry_run else torch.cuda.get_device_name(device)
    print(f"gpu: {where}; {args.images} images per pass ({args.unique} distinct {width}x{height} JPEGs) at "
          f"{args.image_size} px, batch {args.batch_size}", flush=True)

    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bincount-bench-gpu-") as tmp:
        items = make_items(Path(tmp), args.images, args.unique, (width, height))
        for arch in args.archs.split(","):
            r = measure(arch, items, args, device)
            results.append(r)
            print(f"gpu: {arch}@{args.image_size}: peak {r['peak']:.0f} images/s (bare step {r['bare']:.0f}), "
                  f"cached {r['cached']:.0f} (cache filled at {r['fill']:.0f} images/s, on {r['cache_on']}), "
                  f"streamed {r['streamed']:.0f} ({r['workers']} workers)", flush=True)
            for path in ("cached", "streamed"):
                rows.append({"name": f"gpu: {arch}@{args.image_size} {path} / peak", "ratio": r[path] / r["peak"],
                             "goal": None if args.dry_run else GOAL,
                             "note": f"{r[path]:.0f} vs {r['peak']:.0f} images/s on {where}"})
    for row in rows:
        print(f"{row['name']}: {row['ratio']:.3f}" + ("" if row["goal"] is None else f" (goal >= {row['goal']})"),
              flush=True)
    return {"name": "gpu", "rows": rows, "results": results, **rows[0]}


if __name__ == "__main__":
    main()
