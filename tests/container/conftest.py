"""Channel folders (train/val/test manifest.jsonl over the synthetic bins) as SageMaker hands them to train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "src" / "bincount" / "container" / "train.py"
FAST = ["--arch", "mobilenet_v3_small", "--image_size", "32", "--batch_size", "32", "--num_classes", "6",
        "--warmup_epochs", "0", "--lr", "0.003"]


@pytest.fixture(scope="session")
def channels(synth_source: Path, tmp_path_factory) -> dict[str, Path]:
    """train (72 images, image paths relative to the channel), val (24, absolute), test (24, absolute)."""
    root = tmp_path_factory.mktemp("channels")
    labels = sorted((synth_source / "metadata").glob("*.json"))
    rows = [{"id": p.stem, "count": json.loads(p.read_text())["EXPECTED_QUANTITY"]} for p in labels]
    parts = {"train": rows[:72], "val": rows[72:96], "test": rows[96:]}
    out = {}
    for split, items in parts.items():
        folder = root / split
        (folder / "images").mkdir(parents=True)
        lines = []
        for row in items:
            source = synth_source / "bin-images" / f"{row['id']}.jpg"
            if split == "train":  # the S3 layout: images/<id>.jpg beside the manifest
                (folder / "images" / source.name).write_bytes(source.read_bytes())
                image = f"images/{source.name}"
            else:
                image = str(source)
            lines.append(json.dumps({**row, "image": image}))
        (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
        out[split] = folder
    return out


def run_train(channels: dict[str, Path], run: Path, *args: str, env: dict[str, str] | None = None,
              launcher: list[str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run train.py as SageMaker does: SM_* variables and --name value hyperparameters."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SM_")}
    full_env.update({
        "SM_MODEL_DIR": str(run / "model"), "SM_OUTPUT_DATA_DIR": str(run / "output" / "data"),
        "SM_OUTPUT_DIR": str(run / "output"), "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1",
        "SM_NUM_GPUS": "0", "SM_CHANNEL_TRAIN": str(channels["train"]), "SM_CHANNEL_VAL": str(channels["val"]),
        "SM_CHECKPOINT_DIR": str(run / "checkpoints"),
    })
    full_env.update(env or {})
    command = [*(launcher or [sys.executable]), str(SCRIPT), *FAST, *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)
