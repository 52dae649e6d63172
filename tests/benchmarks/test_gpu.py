"""benchmarks/gpu.py: the GPU benchmark's code runs (on the CPU, --dry-run) and skips cleanly without a GPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_measures_peak_cached_and_streamed_through_train_py():
    result = load().main(["--dry-run", "--archs", "resnet18"])
    names = [row["name"] for row in result["rows"]]
    assert names == ["gpu: resnet18@32 cached / peak", "gpu: resnet18@32 streamed / peak"]
    assert all(row["ratio"] > 0 and row["goal"] is None for row in result["rows"])  # a dry run has no goal
    (measured,) = result["results"]
    assert measured["peak"] > 0 and measured["bare"] > 0 and measured["cache_on"] == "cpu" and measured["workers"] == 1


def test_without_a_gpu_it_is_skipped_with_the_reason():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run for real")
    result = load().main([])
    assert result["ratio"] is None and result["skipped"] and "no CUDA device" in result["note"]
