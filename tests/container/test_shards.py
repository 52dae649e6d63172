"""container/shards.py: bounded re-encoding, the tar layout, splitting over ranks and workers, and the
build script's errors (tests/data/test_shard.py runs it against the local S3 server)."""

from __future__ import annotations

import io
import json
import os
import re
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


def test_a_resumed_run_reads_each_epoch_in_the_order_an_uninterrupted_run_did(built):
    """The pass order is seeded by the epoch train.py names, not by how many passes this reader made: a reader
    made when a run resumes at epoch 3 reads epoch 3 as the first reader read it."""
    dest, items = built
    labels = lambda reader, **kw: [n for _, batch in reader.iterate([], True, **kw) for n in batch.tolist()]  # noqa: E731
    whole = sh.ShardBatches(dest, 16, 8, 6, num_workers=0, seed=5, shuffle_buffer=4)
    epochs = [labels(whole, epoch=e) for e in (1, 2, 3)]
    resumed = sh.ShardBatches(dest, 16, 8, 6, num_workers=0, seed=5, shuffle_buffer=4)
    assert labels(resumed, epoch=3) == epochs[2] != epochs[0]
    counted = sh.ShardBatches(dest, 16, 8, 6, num_workers=0, seed=5, shuffle_buffer=4)  # no epoch: the next pass
    assert [labels(counted) for _ in range(2)] == epochs[:2]


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
    for bad in ('{"id": "00001"}', '{"id": "00001", "count": true}', '{"id": "../../etc/passwd", "count": 1}',
                '{"id": "a/b", "count": 1}', '{"count": 1}'):
        items.write_text(bad + "\n")
        done = subprocess.run([sys.executable, str(SCRIPT), "--items", str(items), "--source", str(tmp_path),
                               "--dest", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and done.stderr.startswith(
            "error: item 1: needs an id (letters, digits, _ . -; no / or ..) and an integer count >= 0, got {"), done.stderr
    assert not (tmp_path / "out").exists()


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


# -- hostile shards: each is train.py's one-line error (exit 2) naming the shard and the member or sidecar ------------
def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """A tar (as the writer makes it) of members, and each .jpg header's offset."""
    out, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name.endswith(".jpg"):
                offsets.append(tar.offset)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), offsets


def _shard(folder: Path, truth: list[tuple[str, int]], members: list[tuple[str, bytes]], data: bytes | None = None,
           **override) -> Path:
    """train-000000.tar of members (or raw `data`) with a truthful sidecar for `truth` (id, count), then `override` applied."""
    folder.mkdir(parents=True, exist_ok=True)
    tar, offsets = _tar(members)
    tar = tar if data is None else data
    counts: dict[str, int] = {}
    for _, count in truth:
        counts[str(count)] = counts.get(str(count), 0) + 1
    sidecar = {"format": sh.FORMAT, "items": len(truth), "counts": counts, "bytes": len(tar), "max_side": 64,
               "rows": [[i, c, "0" * 64] for i, c in truth], "offsets": offsets, "skipped": [], **override}
    (folder / "train-000000.tar").write_bytes(tar)
    (folder / "train-000000.json").write_text(json.dumps({k: v for k, v in sidecar.items() if v is not None}))
    return folder / "train-000000.tar"


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, "PNG")
    return out.getvalue()


def _hostile(case: str, folder: Path, images: list[tuple[str, bytes]]) -> str:
    """Writes the hostile shard `case` into folder; returns the regex its error line must match."""
    rows = [(ident, n % 6) for n, (ident, _) in enumerate(images)]
    members = [m for (ident, jpg), (_, count) in zip(images, rows) for m in ((f"{ident}.jpg", jpg), (f"{ident}.cls", str(count).encode()))]
    victim = images[3][0]
    at = 2 * 3  # the victim's .jpg member
    tar_name = re.escape(str(folder / "train-000000.tar"))
    side_name = re.escape(str(folder / "train-000000.json"))
    if case == "garbage cls":
        members[at + 1] = (f"{victim}.cls", b"\xff\x00 three")
        _shard(folder, rows, members)
        return rf"{tar_name}: member {victim}\.cls holds b'\\xff\\x00 three', the sidecar says 3"
    if case == "out-of-range cls":
        rows[3] = (victim, 9)
        members[at + 1] = (f"{victim}.cls", b"9")
        _shard(folder, rows, members)
        return rf"train channel: {tar_name}: item {victim}: count 9 outside 0\.\.5"
    if case == "cls disagrees with the sidecar":
        members[at + 1] = (f"{victim}.cls", b"5")
        _shard(folder, rows, members)
        return rf"{tar_name}: member {victim}\.cls holds b'5', the sidecar says 3"
    if case == "not an image":
        members[at] = (f"{victim}.jpg", b"<html>not a picture</html>")
        _shard(folder, rows, members)
        return rf"{tar_name}: member {victim}\.jpg is not a usable image \(UnidentifiedImageError"
    if case == "decompression bomb":
        members[at] = (f"{victim}.jpg", _png(6000, 6000))  # 36M pixels from a few kB
        _shard(folder, rows, members)
        return rf"{tar_name}: member {victim}\.jpg is 6000x6000 pixels, over the 16,777,216 pixel limit"
    if case == "member over the image cap":  # a header claiming 64 MiB: refused before anything is read
        info = tarfile.TarInfo(f"{images[0][0]}.jpg")
        info.size = 64 * 2**20
        data = info.tobuf(tarfile.USTAR_FORMAT) + b"\xff\xd8" + b"\0" * 4094
        _shard(folder, rows[:1], members[:2], data=data, offsets=[0])
        return rf"{tar_name}: member {images[0][0]}\.jpg is 67,108,864 bytes, over the 16,777,216 byte image limit"
    if case == "truncated tar":
        whole, _ = _tar(members)
        _shard(folder, rows, members, data=whole[: len(whole) * 3 // 5], bytes=len(whole))
        return rf"train channel: {side_name}: says {len(whole)} bytes, train-000000\.tar has {len(whole) * 3 // 5}"
    if case == "truncated tar, sidecar without offsets":
        whole, _ = _tar(members)
        cut = whole[: len(whole) * 3 // 5]
        _shard(folder, rows, members, data=cut, bytes=len(cut), offsets=None)  # a sidecar from before offsets
        return rf"train channel: {tar_name}: truncated at member \d+\.(jpg|cls)"
    if case == "malformed sidecar":
        _shard(folder, rows, members)
        (folder / "train-000000.json").write_text('{"format": "bincount-shards/1", "items": ')
        return rf"train channel: {side_name}: not a shard sidecar \(Expecting value"
    if case == "sidecar rows of the wrong shape":
        _shard(folder, rows, members, rows=[["00001", "three"]], items=1, counts={"three": 1})
        return rf"train channel: {side_name}: row 1 is not \[id, count, sha256\]"
    if case == "sidecar claims 100,000 items":
        fake = rows + [(f"{n:06d}", 0) for n in range(100_000 - len(rows))]
        _shard(folder, fake, members, offsets=[n * sh.MIN_ITEM_BYTES for n in range(100_000)])
        return rf"train channel: {side_name}: its offsets do not fit train-000000\.tar \(\d+ bytes, 100000 items\)"
    if case == "sidecar claims 100,000 items, no offsets":
        fake = rows + [(f"{n:06d}", 0) for n in range(100_000 - len(rows))]
        _shard(folder, fake, members, offsets=None)
        return rf"train channel: {tar_name}: no tar header at member 000000\.jpg"
    raise AssertionError(case)


HOSTILE = ["garbage cls", "out-of-range cls", "cls disagrees with the sidecar", "not an image", "decompression bomb",
           "member over the image cap", "truncated tar", "truncated tar, sidecar without offsets", "malformed sidecar",
           "sidecar rows of the wrong shape", "sidecar claims 100,000 items", "sidecar claims 100,000 items, no offsets"]


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_shard_stops_training_with_one_line_naming_shard_and_member(case, synth_source, tmp_path):
    from .conftest import train_here  # train.py's main() in this process: a code path, not the script's contract

    images = [(p.stem, p.read_bytes()) for p in sorted((synth_source / "bin-images").glob("*.jpg"))[:12]]
    expected = _hostile(case, tmp_path / "train", images)
    val = tmp_path / "val"
    _shard(val, [(i, 1) for i, _ in images[:4]], [m for i, jpg in images[:4] for m in ((f"{i}.jpg", jpg), (f"{i}.cls", b"1"))])
    res = train_here({"train": tmp_path / "train", "val": val}, tmp_path / "run", "--epochs", "1", "--batch_size", "4",
                     "--num_workers", "1")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"error: {expected}.*", last), last


@pytest.mark.parametrize("gpus_per_host, workers", [(1, 47), (4, 11), (8, 5)])  # 48 vCPUs (ml.g5.12xlarge: 4 GPUs)
def test_shard_readers_get_the_cpus_per_gpu_as_the_file_reader_does(built, monkeypatch, gpus_per_host, workers):
    """Not capped at 8: each rank (one per GPU) gets its share of the host's CPUs, one kept for its loop."""
    import argparse

    import torch

    from bincount.container import batches

    dest, _ = built
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(48)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(gpus_per_host))
    args = argparse.Namespace(image_size=16, batch_size=8, num_classes=6, num_workers=None, seed=0, shuffle_buffer=10,
                              cache_mb=0)
    reader = batches.channel_batches(str(dest), "train", args, torch.device("cuda"))
    assert isinstance(reader, sh.ShardBatches) and reader.num_workers == workers
    assert batches.channel_batches(str(dest), "train", args, torch.device("cpu")).num_workers == 8  # on the CPU: 8 at most


@pytest.mark.slow
def test_ddp_two_processes_train_on_shard_channels(synth_source, tmp_path):
    """Real torch.distributed (gloo, 2 ranks x 2 workers) on shard channels: equal steps per rank, or it hangs."""
    from .conftest import run_train

    labels = sorted((synth_source / "metadata").glob("*.json"))
    items = [{"id": p.stem, "count": json.loads(p.read_text())["EXPECTED_QUANTITY"]} for p in labels]
    for split, part in (("train", items[:75]), ("val", items[75:100])):  # 75 // 2 ranks = 37 = 32 + 5: ragged
        sh.build(part, split, sh.Store(str(synth_source)), sh.Store(str(tmp_path / split)), items_per_shard=30,
                 max_side=48, workers=2, log=lambda _: None)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = run_train({"train": tmp_path / "train", "val": tmp_path / "val"}, tmp_path / "run", "--epochs", "2",
                    "--num_workers", "2", launcher=launcher, env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "world 2" in res.stderr and "75 train / 25 val images" in res.stderr
    assert (tmp_path / "run" / "model" / "model.pth").is_file()
