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

from .conftest import ODD_IDS, s3

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
        from bincount.container.batches import manifest_digest

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


def test_shard_writes_beside_its_destination_so_no_rename_crosses_file_systems(fetched, tmp_path, monkeypatch):
    """The system temp dir on another file system (a tmpfs /tmp, a work dir on another volume): a rename
    out of it fails with EXDEV, as the kernel's does; shard must not need one."""
    import errno
    import os
    import tempfile

    from bincount.data.shard import shard

    settings = fetched()
    real_replace, real_rename = os.replace, os.rename

    def same_folder_only(real):
        def move(src, dst, *args, **kwargs):
            if Path(src).resolve().parent != Path(dst).resolve().parent:
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", same_folder_only(real_replace))
    monkeypatch.setattr(os, "rename", same_folder_only(real_rename))
    other = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path / "elsewhere"
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    result = shard(settings)
    assert result.items == 120
    folder = tmp_path / "work" / "shards"
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")]  # no temp file left behind
    assert {p.stat().st_mode & 0o777 for p in folder.rglob("*.tar")} == {0o644}


def test_a_full_disk_during_shard_is_one_line_and_a_rerun_resumes(fetched, tmp_path, cli, monkeypatch):
    import errno

    fetched()
    real = sh._member
    calls = {"n": 0}

    def full_after_two_shards(tar, name, data):
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 20 + 5:  # two 20-item shards of .jpg + .cls, then some of the third
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tar, name, data)

    monkeypatch.setattr(sh, "_member", full_after_two_shards)
    args = ["shard", "--workdir", tmp_path / "work", "--set", "shard.max_side=40", "--set", "shard.items_per_shard=20", "--json"]
    out = cli(*args)
    folder = tmp_path / "work" / "shards" / "train"
    assert out.exit_code == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"error: cannot write {folder}/train-000002.tar: No space left on device (finished shards are kept")
    assert sorted(p.name for p in folder.iterdir()) == ["_build.json", *(f"train-00000{k}.{e}" for k in (0, 1) for e in ("json", "tar"))]
    monkeypatch.setattr(sh, "_member", real)
    again = cli(*args)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["items"] == 120 - 40  # the two finished shards were kept, not rebuilt
    rows = read_jsonl(Workspace(tmp_path / "work").split("train"))
    assert {i: c for tar in sorted(folder.glob("*.tar")) for i, _, c in sh.iter_tar(tar)} == {r["id"]: r["count"] for r in rows}


@pytest.mark.parametrize("bad", ['"three"', "-1", "2.5", "true", "null"])
def test_a_bad_count_in_a_split_is_one_line_naming_the_file_and_line(fetched, tmp_path, cli, bad):
    fetched()
    path = Workspace(tmp_path / "work").split("val")
    lines = path.read_text().splitlines()
    row = json.loads(lines[4])
    lines[4] = json.dumps(row).replace(f'"count": {row["count"]}', f'"count": {bad}')
    path.write_text("\n".join(lines) + "\n")
    out = cli("shard", "--workdir", tmp_path / "work")
    assert out.exit_code == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == f'error: {path}:5: a row needs an integer "count" >= 0'
    assert not (tmp_path / "work" / "shards").exists()  # checked before anything is built


def test_a_split_from_the_index_is_sharded_from_the_bucket_through_the_data_source(make_settings, count_requests, tmp_path):
    """No fetch: the local build reads data.source through data/source.py, with fetch's client and settings
    (before, container/shards.Store made its own client, with the region of the environment)."""
    from bincount.data.index import index
    from bincount.data.shard import shard
    from bincount.data.split import split

    calls, _ = count_requests
    settings = make_settings(**{"data.balanced": True, "data.counts": "0-5", "shard.max_side": 40,
                                "shard.items_per_shard": 20, "shard.workers": 4, "train.image_size": 32})
    index(settings)
    split(settings, from_index=True)
    calls.clear()
    result = shard(settings)
    wanted = {r["id"] for s in ("train", "val", "test") for r in read_jsonl(settings.workdir / "splits" / f"{s}.jsonl")}
    bad = int(ODD_IDS["truncated"] in wanted)  # its label is fine (the index keeps it); its image does not decode
    assert result.items == len(wanted) - bad and result.skipped == bad
    assert not (settings.workdir / "raw").exists()
    assert sorted(calls) == sorted(f"bin-images/{i}.jpg" for i in wanted)  # each image once, through the source


@pytest.mark.parametrize("bad", ["../../../etc/passwd", "sub/00001"])
def test_an_id_that_would_read_outside_the_source_is_refused(fetched, tmp_path, cli, bad):
    """An edited split whose id holds / or .. (a file read outside raw/) stops shard in one line naming
    the file and line, before anything is built (issue 22.12)."""
    fetched()
    path = Workspace(tmp_path / "work").split("train")
    lines = path.read_text().splitlines()
    row = json.loads(lines[2])
    row["id"] = bad
    lines[2] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    out = cli("shard", "--workdir", tmp_path / "work")
    assert out.exit_code == 1 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {path}:3: id ") and "not a safe item id" in last, last
    assert not (tmp_path / "work" / "shards").exists()


def test_shard_max_side_stays_within_what_the_shard_reader_decodes(tmp_path):
    """The reader refuses images over 4096 x 4096 pixels (decompression bombs): shards are never built bigger."""
    from bincount.config import load_settings
    from bincount.errors import BincountError

    assert load_settings(overrides={"workdir": tmp_path, "shard.max_side": 4096}, environ={}).shard.max_side == 4096
    with pytest.raises(BincountError, match="max_side"):
        load_settings(overrides={"workdir": tmp_path, "shard.max_side": 4097}, environ={})
    done = subprocess.run([sys.executable, str(SCRIPT), "--items", str(tmp_path / "x.jsonl"), "--source", str(tmp_path),
                           "--dest", str(tmp_path / "out"), "--max_side", "5000"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "max_side 16..4096" in done.stderr
