"""Benchmark: shard channels. Building (items/s and CPU seconds per item, re-encoding to the bounded
size) and reading (train.py's ShardBatches vs its file-per-image Batches, streamed, on the same
images, same worker count), measured in one run on synthetic bins of --size px.

The per-item CPU cost is what the README's whole-dataset estimates scale from (535K bins on named
instance types): those estimates are computed from these numbers, not measured on AWS.

    .venv/bin/python benchmarks/shards.py [--items 300] [--size 640] [--image-size 224] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--size", type=int, default=640, help="side of the synthetic source images")
    p.add_argument("--image-size", type=int, default=224, help="training resolution (shards keep 2x)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for both readers")
    args = p.parse_args(argv or [])
    import torch

    from bincount.container import shards as sh
    from bincount.container.train import Batches
    from bincount.data.synth import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "src", n=args.items, image_size=args.size, max_count=5, seed=0)
        items = [{"id": f.stem, "count": json.loads(f.read_text())["EXPECTED_QUANTITY"]}
                 for f in sorted((root / "src" / "metadata").glob("*.json"))]
        src_bytes = sum(f.stat().st_size for f in (root / "src" / "bin-images").glob("*.jpg"))

        cpu, wall = time.process_time(), time.perf_counter()
        stats = sh.build(items, "train", sh.Store(str(root / "src")), sh.Store(str(root / "shards")),
                         items_per_shard=100, max_side=2 * args.image_size, workers=os.cpu_count() or 1, log=lambda _: None)
        build_s, build_cpu = time.perf_counter() - wall, time.process_time() - cpu

        def rate(batches, order) -> float:
            list(batches.iterate(order[:64], drop_last_single=False))  # warm the page cache and the workers
            started = time.perf_counter()
            n = sum(len(y) for _, y in batches.iterate(order, drop_last_single=False))
            return n / (time.perf_counter() - started)

        torch.set_num_threads(1)
        import io

        from PIL import Image

        from bincount.container import net

        samples = [jpg for tar in sorted((root / "shards").glob("*.tar")) for _, jpg, _ in sh.iter_tar(tar)]
        cpu = time.process_time()
        for jpg in samples:
            with Image.open(io.BytesIO(jpg)) as image:
                net.to_uint8(image, args.image_size)
        decode_cpu = (time.process_time() - cpu) / len(samples)
        order = list(range(len(items)))
        shard_rate = rate(sh.ShardBatches(root / "shards", args.image_size, 32, 6, args.workers), order)
        files = [(root / "src" / "bin-images" / f"{r['id']}.jpg", r["count"]) for r in items]
        file_rate = rate(Batches(files, args.image_size, 32, 0, args.workers), order)

    report = {
        "items": args.items, "source_px": args.size, "max_side": 2 * args.image_size,
        "build_items_per_s": round(stats["items"] / build_s, 1), "build_cpu_ms_per_item": round(1000 * build_cpu / stats["items"], 1),
        "source_kb_per_item": round(src_bytes / args.items / 1024, 1), "shard_kb_per_item": round(stats["bytes"] / stats["items"] / 1024, 1),
        "read_shards_images_per_s": round(shard_rate, 1), "read_files_images_per_s": round(file_rate, 1),
        "decode_cpu_ms_per_image": round(decode_cpu * 1000, 2), "reader_workers": args.workers, "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    return {"name": "shard reader vs file reader", "ratio": shard_rate / file_rate, "goal": None,
            "note": f"{shard_rate:.0f} vs {file_rate:.0f} images/s at {args.image_size} px from {args.size} px sources; "
                    f"build {report['build_cpu_ms_per_item']} ms CPU/item", "report": report}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main(sys.argv[1:])
