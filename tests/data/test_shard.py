"""bincount shard: shard channels from fetched files (then uploaded and trained on locally), and the
Processing job's script run for real against the local S3 server (bucket to bucket)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bincount.container import shards as sh
from bincount.workspace import Workspace, read_jsonl

from .conftest import s3

SCRIPT = Path(sh.__file__)


@pytest.fixture
def fetched(synth_source, tmp_path):
    """A work dir after fetch (from the synthetic folder) and split."""
    from bincount.config import load_settings
    from bincount.data.fetch import fetch
    from bincount.data.split import split

    def make(**overrides):
        return load_settings(overrides={"workdir": tmp_path / "work", "data.source": str(synth_source),
                                        "shard.max_side": 40, "shard.items_per_shard": 20, "shard.workers": 4,
                                        "train.image_size": 32, **overrides}, environ={})

    settings = make(**{"data.limit": 120})
    fetch(settings)
    split(settings)
    return make


def test_shard_builds_channels_from_the_splits_with_their_labels(fetched, tmp_path, cli):
    out = cli("shard", "--workdir", tmp_path / "work", "--set", "shard.max_side=40", "--set", "shard.items_per_shard=20", "--json")
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    ws = Workspace(tmp_path / "work")
    assert result["items"] == 120 and result["skipped"] == 0 and result["max_side"] == 40
    for split in ("train", "val", "test"):
        rows = read_jsonl(ws.split(split))
        folder = Path(result["channels"][split])
        assert result["shards"][split] == len(list(folder.glob("*.tar"))) == -(-len(rows) // 20)
        got = {i: c for tar in sorted(folder.glob("*.tar")) for i, _, c in sh.iter_tar(tar)}
        assert got == {r["id"]: r["count"] for r in rows}
        # the same digest train.py records for the image-file channel of these rows
        from bincount.container.train import manifest_digest

        (tmp_path / split).mkdir()
        (tmp_path / split / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        assert sh.digest(folder) == manifest_digest(str(tmp_path / split))
    again = cli("shard", "--workdir", tmp_path / "work", "--set", "shard.max_side=40", "--set", "shard.items_per_shard=20", "--json")
    assert json.loads(again.stdout)["items"] == 0  # all present
    bigger = cli("shard", "--workdir", tmp_path / "work", "--set", "shard.max_side=48", "--set", "shard.items_per_shard=20", "--json")
    assert json.loads(bigger.stdout)["items"] == 120  # other settings: rebuilt, not mixed


def test_upload_sends_the_shards_as_channels_and_records_their_format(fetched, s3_server, tmp_path):
    from bincount.data.shard import shard
    from bincount.data.upload import upload

    shard(fetched())
    client = s3(s3_server)
    client.create_bucket(Bucket="shard-channels")
    settings = fetched(**{"s3.bucket": "shard-channels", "s3.endpoint_url": s3_server})
    result = upload(settings)
    assert result.channels == {s: f"s3://shard-channels/bincount/shards/{s}" for s in ("train", "val", "test")}
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="shard-channels")["Contents"]}
    assert all(k.endswith((".tar", ".json")) and "/images/" not in k for k in keys) and len(keys) == 2 * (4 + 2 + 2)
    assert result.items == {"train": 72, "val": 24, "test": 24}
    state = Workspace(tmp_path / "work").state()
    assert state.channel_format == "shards" and state.channels == result.channels
    assert upload(settings).skipped == len(keys)  # idempotent
    files = upload(fetched(**{"s3.bucket": "shard-channels", "s3.endpoint_url": s3_server, "shard.channels": "files"}))
    assert files.channels["train"] == "s3://shard-channels/bincount/train"
    assert Workspace(tmp_path / "work").state().channel_format == "files"


@pytest.mark.slow
def test_local_training_reads_the_shards(fetched, tmp_path):
    from bincount.backends.local.train import make_channels, train
    from bincount.data.shard import shard

    shard(fetched())
    settings = fetched(**{"train.arch": "mobilenet_v3_small", "train.epochs": 1, "train.batch_size": 16,
                          "train.warmup_epochs": 0, "train.num_workers": 2, "train.shuffle_buffer": 16})
    assert make_channels(settings)["train"] == (tmp_path / "work" / "shards" / "train").resolve()
    result = train(settings)
    log = (tmp_path / "work" / "models" / result.run / "train.log").read_text()
    meta = json.loads((Path(result.model_dir) / "meta.json").read_text())
    assert meta["manifest_digest"] == sh.digest(tmp_path / "work" / "shards" / "train")
    assert 0 <= result.metrics["val_acc"] <= 1 and "test_acc" in result.metrics
    assert "72 train / 24 val images" in log


def test_build_script_reads_the_bucket_and_writes_shards_to_another(s3_server, abid_bucket, tmp_path):
    """The Processing job's program, run as a process: public bucket in, user's bucket out, no package import."""
    client = s3(s3_server)
    client.create_bucket(Bucket="user-bucket")
    items = tmp_path / "train.jsonl"
    rows = [{"id": f"{n:05d}", "count": n % 6} for n in range(1, 31)] + [{"id": "00203", "count": 1}]  # 203: truncated
    items.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "PATH": "/usr/bin:/bin", "PYTHONPATH": ""}
    command = [sys.executable, str(SCRIPT), "--items", str(items), "--source", abid_bucket,
               "--dest", "s3://user-bucket/run1/shards", "--endpoint_url", s3_server, "--items_per_shard", "12",
               "--max_side", "40", "--workers", "4"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout.splitlines()[-1])
    assert stats == {**stats, "split": "train", "built": 3, "items": 30, "skipped": 1}
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="user-bucket")["Contents"])
    assert keys == [f"run1/shards/train/train-00000{k}.{ext}" for k in range(3) for ext in ("json", "tar")]
    local = tmp_path / "down"
    local.mkdir()
    for key in keys:
        client.download_file("user-bucket", key, str(local / key.rsplit("/", 1)[1]))
    got = {ident: count for tar in sorted(local.glob("*.tar")) for ident, _, count in sh.iter_tar(tar)}
    assert got == {r["id"]: r["count"] for r in rows[:30]}
    assert [s[0] for m in sh.read_sidecars(local) for s in m["skipped"]] == ["00203"]
    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["present"] == 3  # resumable
