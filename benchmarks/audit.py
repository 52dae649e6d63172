"""Benchmark: the local audit (worker processes) against the in-process handlers on one thread; flat memory.

Throughput: resnet18 (the default arch, random weights) at 128 px on synthetic 256 px JPEG bins. The
baseline calls the artifact's handlers (input_fn -> predict_fn -> output_fn) image by image from one
thread with one torch thread, on the same images in this process. `bincount audit` then scores a
manifest of those images with audit.workers = one thread per core (its default), the whole stage
timed: start-up, reading, scoring, the partial file and the ranked CSV (baseline and audit interleaved,
best of --rounds each, judged by the load of the rest of the machine as in measure.py); and again with worker
processes (audit.pool: process). Each also once with start-up excluded (from the result after the first
two chunks per worker to the last). For information: the baseline with torch's default intra-op
threads, which on a loaded machine is far slower than one thread (threads waiting on each other).

Memory: the same audit over 1,000 and 10,000 bins (a tiny model, so it takes seconds), each in a fresh
process; the peak RSS of the audit process at 1,000 divided by the peak at 10,000. Flat memory is a ratio near 1; results are never held in a list.

    .venv/bin/python benchmarks/audit.py [--images 400] [--baseline-images 120] [--arch resnet18] [--image-size 128]
        [--rounds 2] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Batch Transform cost: the default transform instance, its us-east-1 on-demand list price (SageMaker
# inference/Batch Transform pricing page; check it: prices change) and its physical cores (4 vCPUs are
# 2 cores with hyperthreads; counting only the cores keeps the estimate conservative).
INSTANCE, PRICE_PER_HOUR, INSTANCE_CORES = "ml.m5.xlarge", 0.23, 2
sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402  (benchmarks/measure.py)

GOAL = 1.7  # audit images/s over one-thread handlers images/s, on 2 cores
MEMORY_GOAL = 0.9  # peak RSS at 1,000 bins / peak RSS at 10,000 bins (1.0 = perfectly flat)


def manifest(path: Path, images: list[Path], n: int) -> Path:
    """n bins cycling over `images` (distinct ids, files read and decoded each time)."""
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"{i:06d}", "count": i % 6, "image": str(images[i % len(images)])}) + "\n")
    return path


def baseline(model_dir: Path, bodies: list[bytes], threads: int | None) -> float:
    """images/s of Handlers.invoke called image by image from this thread."""
    import torch

    from bincount.handlers import Handlers

    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        handlers = Handlers(model_dir)
        for body in bodies[:4]:
            handlers.invoke(body, "image/jpeg")  # warm-up
        t0 = time.perf_counter()
        for body in bodies:
            handlers.invoke(body, "image/jpeg")
        return len(bodies) / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(saved)


def cpu_seconds_per_image(model_dir: Path, bodies: list[bytes]) -> float:
    """CPU time (not wall time: robust to a shared machine) of one image through the handlers on one torch thread."""
    import torch

    from bincount.handlers import Handlers

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        handlers = Handlers(model_dir)
        for body in bodies[:2]:
            handlers.invoke(body, "image/jpeg")
        t0 = time.process_time()
        for body in bodies:
            handlers.invoke(body, "image/jpeg")
        return (time.process_time() - t0) / len(bodies)
    finally:
        torch.set_num_threads(saved)


def run_audit(work: Path, source: Path, model_dir: Path, **sets) -> tuple[int, float]:
    """(bins, seconds) of the whole audit stage: worker start-up, reading, scoring, partial file, ranked CSV."""
    from bincount.audit.local import audit
    from bincount.config import load_settings

    settings = load_settings(overrides={"workdir": str(work), **{f"audit.{k}": v for k, v in sets.items()}})
    t0 = time.perf_counter()
    result = audit(settings, source=str(source), model=model_dir, out=work / "audit.csv")
    seconds = time.perf_counter() - t0
    assert result.errors == 0, result.rows[:3]
    return result.bins, seconds


def steady_rate(work: Path, source: Path, model_dir: Path, **sets) -> float:
    """images/s once the workers are up: from the result after the first 2 chunks per worker to the last."""
    from bincount.audit.core import Inputs
    from bincount.audit.local import score_local
    from bincount.config import load_settings
    from bincount.predict import ModelTarget

    settings = load_settings(overrides={"workdir": str(work), **{f"audit.{k}": v for k, v in sets.items()}})
    inputs = Inputs(settings, str(source))
    stamps: list[float] = []
    score_local(settings, iter(inputs), inputs.total, ModelTarget(model_dir), lambda record: stamps.append(time.perf_counter()))
    skip = 2 * (sets.get("workers") or 1) * settings.audit.chunk
    return (len(stamps) - 1 - skip) / (stamps[-1] - stamps[skip])


MEMORY_CHILD = """
import sys
from pathlib import Path
from bincount.audit.local import audit
from bincount.config import load_settings
work, source, model = map(Path, sys.argv[1:4])
settings = load_settings(overrides={"workdir": str(work), "audit.workers": 2})
result = audit(settings, source=str(source), model=model, out=work / "audit.csv")
assert result.errors == 0
# VmHWM, this process's own peak: Linux keeps ru_maxrss across fork + exec, so it would report the benchmark's
# size (1,276 MiB at both sizes, a flat 1.000 whatever the audit did)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_rss_kib(work: Path, source: Path, model_dir: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(work), str(source), str(model_dir)], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="bins per audit run")
    parser.add_argument("--baseline-images", type=int, default=120, help="images for the one-thread baseline")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--rounds", type=int, default=2, help="baseline and audit interleaved, best of each")
    args = parser.parse_args([] if argv is None else argv)

    from bincount.artifacts import write_model_dir
    from bincount.audit.local import cpu_count
    from bincount.data.synth import synthesize

    cores = cpu_count()
    with tempfile.TemporaryDirectory(prefix="bincount-bench-audit-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "bins", n=48, image_size=256, seed=0)
        images = sorted((tmp / "bins" / "bin-images").glob("*.jpg"))
        bodies = [images[i % len(images)].read_bytes() for i in range(args.baseline_images)]
        model_dir = write_model_dir(tmp / "model", args.arch, args.image_size, manifest_digest="benchmark")
        source = manifest(tmp / "bins.jsonl", images, args.images)

        one = threads = 0.0
        with measure.watching(lambda: {os.getpid()}) as others:  # the audit's worker processes are its children
            for r in range(args.rounds):  # baseline and audit interleaved: drift in the load hits both
                one = max(one, baseline(model_dir, bodies, threads=1))
                n, seconds = run_audit(tmp / f"thread-{r}", source, model_dir, workers=cores, pool="thread")
                threads = max(threads, n / seconds)
        comparable = measure.calm(others.mean)
        n, seconds = run_audit(tmp / "process", source, model_dir, workers=cores, pool="process")
        processes = n / seconds
        processes_marginal = steady_rate(tmp / "process-steady", source, model_dir, workers=cores, pool="process")
        threads_marginal = steady_rate(tmp / "thread-steady", source, model_dir, workers=cores, pool="thread")
        default = baseline(model_dir, bodies[: max(8, len(bodies) // 4)], threads=None)
        ratio = threads / one  # the default pool
        print(f"model {args.arch}@{args.image_size}px (random weights), 256 px JPEG bins; {cores} cores; "
              f"{args.images} bins per audit, {len(bodies)} for the baseline; "
              f"load average {os.getloadavg()[0]:.1f} at the end")
        print(f"handlers, 1 thread (1 torch thread):          {one:7.1f} images/s")
        print(f"handlers, 1 thread (torch default threads):   {default:7.1f} images/s")
        print(f"audit, {cores} worker threads, whole stage:       {threads:7.1f} images/s  ({ratio:.2f}x, goal >= {GOAL}; "
              f"others {others.mean:.1f} runnable threads{'' if comparable else ': not comparable'})")
        print(f"audit, {cores} worker threads, start-up excluded:   {threads_marginal:5.1f} images/s  "
              f"({threads_marginal / one:.2f}x)")
        print(f"audit, {cores} worker processes, whole stage:     {processes:7.1f} images/s  ({processes / one:.2f}x)")
        print(f"audit, {cores} worker processes, start-up excluded: {processes_marginal:5.1f} images/s  "
              f"({processes_marginal / one:.2f}x)")
        rows = [{"name": "audit", "ratio": ratio, "goal": GOAL, "comparable": comparable,
                 "note": f"{threads:.1f} vs {one:.1f} images/s with {cores} threads, others {others.mean:.1f} (start-up excluded "
                         f"{threads_marginal / one:.2f}x); processes {processes / one:.2f}x "
                         f"({processes_marginal / one:.2f}x start-up excluded)"}]
        result = {"name": "audit", "ratio": ratio, "goal": GOAL, "images_per_s": {
            "one_thread": one, "torch_default_threads": default, "processes": processes,
            "processes_marginal": processes_marginal, "threads": threads, "threads_marginal": threads_marginal}}
        # the cost of 10,000 bins on the default transform instance, for the default model (resnet18 at 224 px)
        default_model = write_model_dir(tmp / "default", "resnet18", 224, manifest_digest="benchmark")
        per_image = cpu_seconds_per_image(default_model, bodies[:24])
        hours = 10_000 * per_image / INSTANCE_CORES / 3600
        cost = hours * PRICE_PER_HOUR
        print(f"resnet18@224px: {per_image * 1000:.0f} ms CPU per image on one thread -> 10,000 bins take "
              f"{hours * 60:.1f} min on {INSTANCE} ({INSTANCE_CORES} cores, max_concurrent_transforms >= cores) "
              f"= ${cost:.3f} at ${PRICE_PER_HOUR}/h, plus the job's start-up (minutes)")
        rows.append({"name": "audit: $ per 10,000 bins", "ratio": cost, "goal": None,
                     "note": f"{INSTANCE} at ${PRICE_PER_HOUR}/h, {per_image * 1000:.0f} ms CPU/image (resnet18@224), "
                             "start-up not included"})
        result["cost_per_10000"] = {"usd": cost, "cpu_ms_per_image": per_image * 1000, "instance": INSTANCE}
        if not args.skip_memory:
            tiny = write_model_dir(tmp / "tiny", "mobilenet_v3_small", 32, manifest_digest="benchmark")
            small, big = (manifest(tmp / f"m{n}.jsonl", images, n) for n in (1000, 10000))
            rss_small = peak_rss_kib(tmp / "m-small", small, tiny)
            rss_big = peak_rss_kib(tmp / "m-big", big, tiny)
            flat = rss_small / rss_big
            print(f"peak RSS of the audit process (2 worker threads): {rss_small / 1024:.1f} MiB at 1,000 bins, "
                  f"{rss_big / 1024:.1f} MiB at 10,000 ({flat:.3f}, goal >= {MEMORY_GOAL})")
            rows.append({"name": "audit memory", "ratio": flat, "goal": MEMORY_GOAL,
                         "note": f"peak RSS {rss_small / 1024:.0f} MiB at 1k bins, {rss_big / 1024:.0f} MiB at 10k"})
            result["peak_rss_mib"] = {"1000": rss_small / 1024, "10000": rss_big / 1024}
        result["rows"] = rows
        return result


if __name__ == "__main__":
    main(sys.argv[1:])
