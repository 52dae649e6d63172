"""container/shards.py: bounded re-encoding, the tar layout, splitting over ranks and workers, and the
build script's errors (tests/data/test_shard.py runs it against the local S3 server)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from bincount.container import shards as sh

SCRIPT = Path(sh.__file__)


def jpeg(width: int, height: int, mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), 128).save(out, "JPEG" if mode in ("RGB", "L") else "PNG")
    return out.getvalue()


def test_bounded_jpeg_resizes_keeping_the_whole_picture_and_keeps_small_jpegs_as_they_are():
    big = sh.bounded_jpeg(jpeg(1000, 500), 100)
    with Image.open(io.BytesIO(big)) as image:
        assert image.size == (100, 50) and image.format == "JPEG"  # aspect kept, nothing cropped
    small = jpeg(90, 60)
    assert sh.bounded_jpeg(small, 100) == small  # no second lossy encode
    with Image.open(io.BytesIO(sh.bounded_jpeg(jpeg(50, 300, "L"), 100))) as image:
        assert image.size == (17, 100) and image.mode == "RGB"
    with pytest.raises(Exception):
        sh.bounded_jpeg(small[: len(small) // 2], 100)  # truncated


@pytest.fixture(scope="module")
def built(synth_source, tmp_path_factory) -> tuple[Path, list[dict]]:
    items = [{"id": p.stem, "count": json.loads(p.read_text())["EXPECTED_QUANTITY"]}
             for p in sorted((synth_source / "metadata").glob("*.json"))]
    items.append({"id": "99999", "count": 1})  # no such image: skipped, recorded
    dest = tmp_path_factory.mktemp("shards") / "train"
    stats = sh.build(items, "train", sh.Store(str(synth_source)), sh.Store(str(dest)), items_per_shard=25,
                     max_side=48, workers=4, seed=3, log=lambda _: None)
    assert stats["built"] == 5 and stats["items"] == 120 and stats["skipped"] == 1
    return dest, items


def test_shards_hold_every_item_once_with_its_label_at_the_bounded_size(built, synth_source):
    dest, items = built
    want = {r["id"]: r["count"] for r in items if r["id"] != "99999"}
    seen = {}
    for tar_path in sorted(dest.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        assert [n.rsplit(".", 1)[1] for n in names] == ["jpg", "cls"] * (len(names) // 2)  # pairs, in order
        for ident, jpg, count in sh.iter_tar(tar_path):
            with Image.open(io.BytesIO(jpg)) as image:
                assert max(image.size) <= 48
            seen[ident] = count
    assert seen == want
    sidecars = sh.read_sidecars(dest)
    assert sum(m["items"] for m in sidecars) == 120 and [m["path"] for m in sidecars] == sorted(map(str, dest.glob("*.tar")))
    assert sum(len(set(m["counts"])) for m in sidecars) > len(sidecars)  # shuffled: shards mix counts
    assert [s for m in sidecars for s in m["skipped"]] == [["99999", "missing_image"]]
    # the digest is train.py's manifest digest of the same items (id, count, sha256 of the source image)
    import hashlib

    rows = [[i, c, hashlib.sha256((synth_source / "bin-images" / f"{i}.jpg").read_bytes()).hexdigest()] for i, c in want.items()]
    assert sh.digest(dest) == hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def test_a_rebuild_skips_finished_shards(built, synth_source):
    dest, items = built
    before = {p: p.stat().st_mtime_ns for p in dest.glob("*.tar")}
    stats = sh.build(items, "train", sh.Store(str(synth_source)), sh.Store(str(dest)), items_per_shard=25,
                     max_side=48, workers=4, seed=3, log=lambda _: None)
    assert stats["present"] == 5 and stats["built"] == 0
    assert before == {p: p.stat().st_mtime_ns for p in dest.glob("*.tar")}


def test_webdataset_reads_the_same_shards(built):
    import webdataset as wds

    dest, items = built
    urls = sorted(str(p) for p in dest.glob("*.tar"))
    got = {key: int(cls) for key, cls in wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "cls")}
    assert got == {r["id"]: r["count"] for r in items if r["id"] != "99999"}


_READS: dict = {"fd": None}


def _audit(event: str, args: tuple) -> None:
    """Logs every opening of a .tar for reading, in this process and in forked DataLoader workers."""
    if event == "open" and _READS["fd"] is not None and str(args[0]).endswith(".tar") and not (args[2] or 0) & 3:
        os.write(_READS["fd"], f"open\t{args[0]}\t0\n".encode())


class _Counted:
    """A file whose reads are logged (bytes per shard), whatever the reader does with it."""

    def __init__(self, f, path):
        self.f, self.path = f, str(path)

    def read(self, n=-1):
        data = self.f.read(n)
        os.write(_READS["fd"], f"read\t{self.path}\t{len(data)}\n".encode())
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def tar_reads(tmp_path, monkeypatch):
    """read() -> ({shard: opens}, {shard: bytes read}) since the last read(), over every reader process."""
    import builtins

    log = tmp_path / "reads.log"
    _READS["fd"] = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    if not _READS.get("hooked"):
        sys.addaudithook(_audit)  # cannot be removed: a no-op while _READS["fd"] is None
        _READS["hooked"] = True
    real_open = builtins.open

    def counting_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return _Counted(f, file) if str(file).endswith(".tar") and "r" in mode and "+" not in mode else f

    monkeypatch.setattr(builtins, "open", counting_open)

    def read():
        opens, got = Counter(), Counter()
        for line in log.read_text().splitlines():
            kind, path, n = line.split("\t")
            (opens if kind == "open" else got)[path] += 1 if kind == "open" else int(n)
        log.write_text("")
        return opens, got

    yield read
    os.close(_READS["fd"])
    _READS["fd"] = None


@pytest.mark.parametrize("per_shard", [25, 9])  # 5 shards for 6 readers; 14 shards of unequal share per reader
def test_every_epoch_is_a_permutation_and_no_reader_reads_a_shard_it_does_not_use(synth_source, tmp_path, monkeypatch,
                                                                                  tar_reads, per_shard):
    """A simulation with the real reader: 2 ranks x 3 DataLoader workers over 120 items whose labels are their
    numbers, 3 training epochs and an evaluation pass: each pass sees every item exactly once, and readers
    open only the shards in their share and read each shard's bytes at most once in all."""
    import torch.distributed as td

    files = sorted((synth_source / "metadata").glob("*.json"))[:120]
    items = [{"id": p.stem, "count": number} for number, p in enumerate(files)]
    sh.build(items, "train", sh.Store(str(synth_source)), sh.Store(str(tmp_path / "ch")), items_per_shard=per_shard,
             max_side=32, workers=2, log=lambda _: None)
    sizes = {m["path"]: m["bytes"] for m in sh.read_sidecars(tmp_path / "ch")}
    world, workers, batch = 2, 3, 8
    rank = {"now": 0}
    monkeypatch.setattr(td, "is_initialized", lambda: True)
    monkeypatch.setattr(td, "get_rank", lambda group=None: rank["now"])
    monkeypatch.setattr(td, "get_world_size", lambda group=None: world)
    readers = []
    for rank["now"] in range(world):
        readers.append(sh.ShardBatches(tmp_path / "ch", 16, batch, len(items), num_workers=workers, seed=5, shuffle_buffer=10))
    tar_reads()
    orders = []
    for training in (True, True, True, False):
        seen = []
        for rank["now"], reader in enumerate(readers):
            for images, labels in reader.iterate(list(range(len(items) // world)), drop_last_single=training):
                assert images.shape[1:] == (3, 16, 16) and len(labels) <= batch
                seen += labels.tolist()
        assert sorted(seen) == list(range(len(items))), f"{len(set(seen))} distinct of {len(seen)} seen"
        orders.append(seen)
        opens, got = tar_reads()
        assert set(opens) <= set(sizes) and sum(opens.values()) <= len(sizes) + world * workers - 1, opens
        assert all(got[path] <= size for path, size in sizes.items()), (got, sizes)
    assert orders[0] != orders[1] != orders[2]  # a new order every epoch


def test_epoch_plan_covers_each_ranks_share_once_in_whole_batches():
    sizes = [7, 30, 1, 12, 50]
    for world, workers, batch in [(1, 4, 8), (3, 2, 5), (2, 8, 4), (4, 1, 3)]:
        for seed in (None, 1, 2):
            per_rank = []
            for rank in range(world):
                plans = sh.epoch_plan(sizes, seed, rank, world, workers, batch)
                counts = [sum(b - a for _, a, b in plan) for plan in plans]
                assert all(n % batch == 0 for n in counts[:-1] if n)  # only a rank's last batch may be short
                per_rank.append({(k, i) for plan in plans for k, a, b in plan for i in range(a, b)})
                assert sum(counts) == len(per_rank[-1])
            everything = set().union(*per_rank)
            assert sum(map(len, per_rank)) == len(everything)  # no item twice
            total = sum(sizes)
            if seed is None:
                assert len(everything) == total
            else:
                share = total // world
                assert all(len(p) == share - (share % batch == 1) for p in per_rank)


def test_shard_channel_with_a_count_beyond_num_classes_is_a_clear_error(built):
    dest, _ = built
    with pytest.raises(sh.ShardError, match="outside 0..2"):
        sh.ShardBatches(dest, 16, 8, num_classes=3, num_workers=0)


def test_build_script_rejects_bad_items_with_one_line(tmp_path):
    items = tmp_path / "train.jsonl"
    items.write_text('{"id": "00001"}\n')
    done = subprocess.run([sys.executable, str(SCRIPT), "--items", str(items), "--source", str(tmp_path),
                           "--dest", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: item 1: needs an id and an integer count")


def test_a_reader_without_items_ends_instead_of_spinning(synth_source, tmp_path):
    """3 items over 4 DataLoader workers: two workers have nothing to read; each pass ends with its share."""
    items = [{"id": p.stem, "count": 2} for p in sorted((synth_source / "metadata").glob("*.json"))[:3]]
    sh.build(items, "train", sh.Store(str(synth_source)), sh.Store(str(tmp_path)), items_per_shard=10,
             max_side=32, workers=2, log=lambda _: None)
    said = []
    batches = sh.ShardBatches(tmp_path, 16, 2, 6, num_workers=4, seed=0, shuffle_buffer=2, log=said.append)
    assert said == [f"{tmp_path}: 3 items per rank fill 2 of 4 DataLoader workers (batch 2)"]
    for _ in range(2):
        assert [len(y) for _, y in batches.iterate([0, 1, 2], drop_last_single=True)] == [2]  # the lone third dropped
        assert sorted(len(y) for _, y in batches.iterate([0, 1, 2])) == [1, 2]  # evaluation: each item once
