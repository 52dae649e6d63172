"""Benchmark: local training. (1) Does the recipe learn the counting task? (2) Is the input pipeline free?

(1) Learning: synthesise --images bins (counts 0..5, 128 px) in the ABID layout, then the real chain:
`fetch` (from the local folder) -> `split` (70/10/20, stratified: 10% validation picks the kept epoch of
the fixed cosine schedule; 20% = 300 held-out test images) -> `train` (local backend: train.py in a
subprocess, as SageMaker runs it) -> `evaluate` on the test split. The goal is stated per compute
budget, so it means the same on every CPU: test accuracy >= 0.90 after seeing 63,000 training images
(1,050 train images x 60 epochs at 96 px, resnet18). The wall time of training plus evaluation is
reported for information (346 s on a 2-core CPU with AVX512-BF16, 468 s there in float32; a 2-core CPU
without native bfloat16 and under load takes longer), never as a goal.
Defaults: resnet18 at 96 px from scratch, 60 epochs, AdamW 3e-3, an EMA of the weights (0.995), a
count-aware loss term (0.5), channels_last, bfloat16 autocast where the CPU runs it natively (train.py's
default; float32 elsewhere), and test-time augmentation (the model is recorded with tta, so evaluate
averages the 8 flips/transposes it was trained on).

Measured on a 2-core CPU with AVX512-BF16 (300 test images, so +-2 points of noise between runs):
- 96 px, 60 epochs, bfloat16 (the default): `make bench` 0.920 with TTA, RMSE 0.300, in 346 s;
  --seed 1 (other bins, other split): 0.923. --no-amp (float32, as on a CPU without native
  bfloat16): 0.923 in 468 s, also within the limit.
- What got it there: 96 px instead of 64, paid for by bfloat16 autocast (1.6x faster training at
  96 px, 1.4x at 64 px). The 128 px synthetic bins shrunk to 64 px lose the small and overlapping objects
  (validation loss 0.70 at 64 px vs 0.47-0.52 at 96-112 px, train accuracy ~0.98 in both). train.py
  on the same data, TTA: 96 px 45 epochs 0.907, 0.907 (seeds 0, 1); 96 px 60 epochs, seed 1: 0.907;
  96 px 65 epochs 0.920; 112 px 45 epochs 0.910; 128 px 30 epochs 0.867 (too few epochs).
- The previous recipe (float32, 64 px, 80 epochs): `make bench` 0.877 with TTA in 397 s; train.py runs
  0.877, 0.853, 0.853, 0.860 plain and 0.887, 0.877, 0.870, 0.877 with TTA (TTA: +1.0 to +2.4 points
  in each of these runs, though -3.9 on the demo's weaker model); an ensemble of four 0.900.
- 60/20/20 split (900 train images), 64 px: 0.823 (0.797 without EMA and count loss).
Tried, not better (one run each, 64 px float32 and 60/20/20 unless noted): weight decay 0.05 (0.783);
colour-channel shuffling (0.787; 70/10/20: 0.850, 0.860 with TTA); zoom-out/shift augmentation to
0.75 (0.740: objects get smaller); EMA decay 0.998 (70/10/20, TTA: 0.887 and 0.870 on seeds 0 and 1);
batch 32 (0.830); 80 px (0.833); 110 epochs (70/10/20: 0.853); SGD lr 0.1 (0.62 at epoch 65);
mobilenet_v3_large at 96 px from scratch (did not learn: 0.20 val at epoch 32); --stem small costs
2-4x per epoch; torch.compile (no faster than eager bfloat16 on this CPU, plus ~40 s of compiling).

(2) Input pipeline: the same training step (forward, backward, AdamW step) on the same batches, fed
(a) by train.py's real loader (decoded-once uint8 cache -> float, count-preserving augmentation,
normalisation) and (b) from a list of ready float batches held in memory. Ratio = images/s (a) / (b),
goal >= 0.85; both steps run under the precision train.py picks. Also reported, for information only
(no goal): the streamed loader (DataLoader workers decoding JPEGs per item, the path for data sets
larger than --cache_mb), and, on a CPU with native bfloat16, bfloat16 vs float32 images/s of the
in-memory step. Rounds alternate and the best of each is kept (the machine may be shared).

    .venv/bin/python benchmarks/train.py [--images 1500] [--arch resnet18] [--image-size 96] [--epochs 60]
                                         [--no-tta] [--no-amp] [--val-share 0.1] [--test-share 0.2] [--skip-learning]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

GOAL_ACC, GOAL_PIPELINE = 0.90, 0.85


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def learning(root: Path, args) -> dict:
    from bincount.backends.local.train import train
    from bincount.config import load_settings
    from bincount.data.fetch import fetch
    from bincount.data.split import split
    from bincount.data.synth import synthesize
    from bincount.evaluate import evaluate

    synthesize(root / "synth", n=args.images, image_size=args.synth_size, max_count=5, seed=args.seed)
    settings = load_settings(environ={}, overrides={
        "workdir": str(root / "work"), "data.source": str(root / "synth"), "data.limit": args.images,
        "train.arch": args.arch, "train.image_size": args.image_size, "train.epochs": args.epochs,
        "train.batch_size": args.batch_size, "train.lr": args.lr, "train.optimizer": args.optimizer,
        "train.weight_decay": args.weight_decay, "train.warmup_epochs": 2, "train.patience": 0,
        "train.stem": args.stem, "train.ema_decay": args.ema_decay, "train.count_loss": args.count_loss,
        "train.label_smoothing": args.label_smoothing,
        "train.tta": args.tta, "train.amp": args.amp, "train.seed": args.seed,
        "split.train": 1 - args.val_share - args.test_share, "split.val": args.val_share, "split.test": args.test_share})
    fetch(settings)
    split(settings)
    started = time.perf_counter()
    result = train(settings)
    scored = evaluate(settings)
    seconds = time.perf_counter() - started
    precision = json.loads((Path(result.model_dir) / "meta.json").read_text())["train_precision"]  # as trained
    print(f"learning: {args.arch} ({args.stem} stem) {args.image_size}px, {result.epochs} epochs, tta {args.tta}, "
          f"{precision}, train + evaluate in {seconds:.0f} s; "
          f"test accuracy {scored.accuracy:.3f}, RMSE {scored.rmse:.3f}, within one {scored.within_one:.3f} "
          f"({scored.n} test images)", flush=True)
    return {"accuracy": scored.accuracy, "rmse": scored.rmse, "seconds": seconds, "epochs": result.epochs,
            "precision": precision,
            "train_images": len((root / "work" / "channels" / "train" / "manifest.jsonl").read_text().splitlines()),
            "channels": root / "work" / "channels"}


def pipeline(channel: Path, args, steps: int = 12, rounds: int = 3) -> dict:
    import torch

    from bincount.container import batches, loop, net

    items = batches.read_channel(str(channel), "train", 6)
    torch.manual_seed(0)
    model = net.build_model(args.arch, 6, stem=args.stem).to(memory_format=torch.channels_last)  # as train.py
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    device = torch.device("cpu")
    n = steps * args.batch_size
    order = list(range(min(n, len(items))))

    amp = args.amp and loop.cpu_bf16()  # as train.py: bfloat16 autocast where the CPU runs it natively

    def step(x, y, amp=amp):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def via_loader(data) -> float:
        generator = torch.Generator().manual_seed(0)
        model.train()
        start, seen = time.perf_counter(), 0
        for images, labels in data.iterate(order, drop_last_single=True):
            step(batches.to_input(images, device, True, generator), labels)
            seen += len(labels)
        return seen / (time.perf_counter() - start)

    cached = batches.Batches(items, args.image_size, args.batch_size, cache_mb=4096, num_workers=None)
    streamed = batches.Batches(items, args.image_size, args.batch_size, cache_mb=0, num_workers=None)
    generator = torch.Generator().manual_seed(0)
    ready = [(batches.to_input(x, device, True, generator), y) for x, y in cached.iterate(order, True)]

    def in_memory(amp=amp) -> float:
        model.train()
        start, seen = time.perf_counter(), 0
        for x, y in ready:
            step(x, y, amp)
            seen += len(y)
        return seen / (time.perf_counter() - start)

    via_loader(cached)  # warm-up (allocator, kernels)
    best = {"memory": 0.0, "cached": 0.0, "streamed": 0.0, "float32": 0.0, "amp": amp}
    for _ in range(rounds):
        best["memory"] = max(best["memory"], in_memory())
        if amp:
            best["float32"] = max(best["float32"], in_memory(amp=False))
        best["cached"] = max(best["cached"], via_loader(cached))
        best["streamed"] = max(best["streamed"], via_loader(streamed))
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--synth-size", type=int, default=128)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--stem", default="standard", choices=("standard", "small"))
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--count-loss", type=float, default=0.5)
    p.add_argument("--label-smoothing", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="test-time augmentation")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                   help="train.amp: bfloat16 autocast on CPUs with native bfloat16 (--no-amp: float32)")
    p.add_argument("--val-share", type=float, default=0.1, help="validation share (picks the kept epoch)")
    p.add_argument("--test-share", type=float, default=0.2, help="held-out test share (the reported accuracy)")
    p.add_argument("--skip-learning", action="store_true", help="only the input-pipeline part (synthesises less)")
    args = p.parse_args(argv if argv is not None else sys.argv[1:] if __name__ == "__main__" else [])

    rows = []
    with tempfile.TemporaryDirectory(prefix="bincount-bench-train-") as tmp:
        root = Path(tmp)
        if args.skip_learning:
            args.images = min(args.images, 400)
            from bincount.data.synth import synthesize

            synthesize(root / "synth", n=args.images, image_size=args.synth_size, seed=args.seed)
            channel = root / "channel"
            channel.mkdir()
            lines = [json.dumps({"count": json.loads(p.read_text())["EXPECTED_QUANTITY"],
                                 "image": str(root / "synth" / "bin-images" / f"{p.stem}.jpg")})
                     for p in sorted((root / "synth" / "metadata").glob("*.json"))]
            (channel / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        else:
            learned = learning(root, args)
            channel = learned["channels"] / "train"
            seen = learned["train_images"] * learned["epochs"]
            rows.append({"name": f"train: test accuracy after {seen:,} training images seen", "ratio": learned["accuracy"],
                         "goal": GOAL_ACC,
                         "note": f"{args.arch} {args.stem} stem {args.image_size}px, {learned['epochs']} epochs, "
                                 f"{'with' if args.tta else 'no'} TTA, {learned['precision']}, "
                                 f"{learned['train_images']} train images, "
                                 f"RMSE {learned['rmse']:.3f}"})
            rows.append({"name": "train: training + evaluation seconds, this CPU", "ratio": learned["seconds"],
                         "goal": None, "note": f"{cpu_name()}, {learned['precision']}; time depends on the CPU and "
                                               "its load: the goal is the accuracy per images seen"})
        speeds = pipeline(channel, args)
    cached = speeds["cached"] / speeds["memory"]
    streamed = speeds["streamed"] / speeds["memory"]
    rows.append({"name": "train: input pipeline (default loader / in memory)", "ratio": cached,
                 "goal": GOAL_PIPELINE, "note": f"{speeds['cached']:.0f} vs {speeds['memory']:.0f} images/s; "
                                                f"for information, streamed loader: {streamed:.2f}"})
    if speeds["amp"]:
        rows.append({"name": "train: bfloat16 / float32 training images/s",
                     "ratio": speeds["memory"] / speeds["float32"], "goal": None,
                     "note": f"{speeds['memory']:.0f} vs {speeds['float32']:.0f} images/s, in-memory batches, "
                             f"{args.arch} {args.image_size}px"})
    for row in rows:
        goal = "no goal, for information" if row["goal"] is None else f"goal >= {row['goal']}"
        verdict = "" if row["goal"] is None else " pass" if row["ratio"] >= row["goal"] else " miss"
        print(f"{row['name']}: {row['ratio']:.3f} ({goal}){verdict}; {row['note']}", flush=True)
    return {"name": "train", "rows": rows, **rows[0]}


if __name__ == "__main__":
    main()
