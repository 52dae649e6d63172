"""container/shards.py: bounded re-encoding, the tar layout, splitting over ranks and workers, and the
build script's errors (tests/data/test_shard.py runs it against the local S3 server)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
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


@pytest.mark.parametrize("items_per_shard", [25, 200])  # more shards than slots, and fewer
def test_ranks_and_workers_split_the_samples_without_overlap(synth_source, tmp_path, items_per_shard):
    items = [{"id": p.stem, "count": 1} for p in sorted((synth_source / "metadata").glob("*.json"))]
    sh.build(items, "val", sh.Store(str(synth_source)), sh.Store(str(tmp_path)), items_per_shard=items_per_shard,
             max_side=32, workers=2, log=lambda _: None)
    paths = [m["path"] for m in sh.read_sidecars(tmp_path)]
    dataset = sh._torch_dataset()
    per_slot = []
    for rank in range(2):
        stream = dataset(paths, 16, (rank, 2), None, 10)
        per_slot.append([image.shape for image, _ in stream])
    assert sum(map(len, per_slot)) == 120 and all(40 <= len(s) <= 80 for s in per_slot)
    # training: every rank streams exactly the steps it was asked for, in batches
    batches = sh.ShardBatches(tmp_path, 16, 16, 6, num_workers=2, seed=1, shuffle_buffer=8)
    assert len(batches) == 120 and batches.labels.tolist() == [1] * 120
    sizes = [len(y) for _, y in batches.iterate(list(range(49)), drop_last_single=True)]
    assert sum(sizes) == 48 and max(sizes) == 16  # 49 % 16 == 1: the lone last sample is dropped
    assert sum(len(y) for _, y in batches.iterate(list(range(120)))) == 120  # evaluation: each sample once


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


def test_a_reader_slot_without_samples_ends_instead_of_spinning(synth_source, tmp_path):
    """3 samples over 4 DataLoader workers: one worker has nothing to read; training still gets its steps."""
    items = [{"id": p.stem, "count": 2} for p in sorted((synth_source / "metadata").glob("*.json"))[:3]]
    sh.build(items, "train", sh.Store(str(synth_source)), sh.Store(str(tmp_path)), items_per_shard=10,
             max_side=32, workers=2, log=lambda _: None)
    batches = sh.ShardBatches(tmp_path, 16, 2, 6, num_workers=4, seed=0, shuffle_buffer=2)
    assert sum(len(y) for _, y in batches.iterate([0, 1, 2, 3, 4, 5], drop_last_single=True)) == 6
