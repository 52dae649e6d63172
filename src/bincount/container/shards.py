"""Shard channels: WebDataset-style tar files, the streaming training format (writer, reader, build script).

A shard channel is a folder (or S3 prefix) of `<split>-NNNNNN.tar` files, each with a sidecar
`<split>-NNNNNN.json` written after it:

    {"format": "bincount-shards/1", "items": 4000, "counts": {"0": 610, ...}, "bytes": 251658240,
     "max_side": 448, "rows": [["00004", 3, "<sha256 of the source image>"], ...], "skipped": [["00017", "bad_image: ..."]]}

A tar holds per item `<id>.jpg` (the bin photo, longest side <= max_side: resized, never cropped;
an image already within the bound keeps its original bytes) then `<id>.cls` (the count, decimal
text): the WebDataset convention, so `webdataset.WebDataset(urls)` reads these shards too, but
nothing here needs webdataset (the SageMaker PyTorch containers do not have it; the standard
library's tarfile reads a tar as one sequential stream, which is what FastFile input mode serves best).
A shard counts once its sidecar exists: a rebuild skips those (resumable), and readers list sidecars.

Build (`python shards.py --items train.jsonl --source s3://aft-vbi-pds --dest s3://my-bucket/bincount/shards/train`):
items are split rows (`id`, `count`), shuffled once (seeded) so every shard mixes all counts, then cut into
shards of --items_per_shard. Images are read from a folder or bucket in the ABID layout
(bin-images/<id>.jpg) by threads, and each tar is written to a temp file, then moved or uploaded.
This file is the SageMaker Processing job's whole program: it imports only the standard library,
Pillow and (for s3:// URIs) boto3; torch only in the reader, which train.py uses.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORMAT = "bincount-shards/1"


class ShardError(ValueError):
    """A shard channel that cannot be read as one (no shards, a bad sidecar, a count out of range)."""


# -- writing ---------------------------------------------------------------------------------------
def bounded_jpeg(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """The image with its longest side <= max_side as JPEG: resized (aspect kept), never cropped.
    An RGB JPEG already within the bound is returned as it is (no second lossy encode)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.mode == "RGB" and max(image.size) <= max_side:
            image.load()  # raises on a truncated file
            return data
        image.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when it can (still >= max_side)
        image = image.convert("RGB")
        width, height = image.size
        if max(width, height) > max_side:
            scale = max_side / max(width, height)
            image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality)
        return out.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible: the same items give the same bytes
    tar.addfile(info, io.BytesIO(data))


def shard_names(split: str, n: int) -> list[str]:
    return [f"{split}-{k:06d}" for k in range(n)]


def plan(items: list[dict], items_per_shard: int, seed: int) -> list[list[dict]]:
    """Items (rows with id and count) sorted by id, shuffled with `seed`, cut into shards."""
    rows = sorted(items, key=lambda r: (len(str(r["id"])), str(r["id"])))
    random.Random(seed).shuffle(rows)
    return [rows[i:i + items_per_shard] for i in range(0, len(rows), items_per_shard)]


class Store:
    """A folder or s3://bucket/prefix: where the source images are read or the shards written."""

    def __init__(self, uri: str, endpoint_url: str | None = None, unsigned: bool = False, workers: int = 16):
        self.uri = uri.rstrip("/")
        if self.uri.startswith("s3://"):
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            bucket, _, prefix = self.uri[5:].partition("/")
            self.bucket, self.prefix, self.root = bucket, prefix.strip("/"), None
            config = Config(retries={"mode": "adaptive", "max_attempts": 8}, max_pool_connections=workers,
                            signature_version=UNSIGNED if unsigned else None)
            self.client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url or None, config=config,
                region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        else:
            self.root, self.client = Path(self.uri), None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes | None:
        if self.client is None:
            path = self.root / name
            return path.read_bytes() if path.is_file() else None
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(name))
        except self.client.exceptions.NoSuchKey:
            return None
        body = resp["Body"].read()
        if len(body) != resp.get("ContentLength", len(body)):
            raise OSError(f"short read of {name}: {len(body)} of {resp['ContentLength']} bytes")
        return body

    def exists(self, name: str) -> bool:
        if self.client is None:
            return (self.root / name).is_file()
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise

    def put_file(self, name: str, path: Path) -> None:
        """Move (folder) or upload (S3, multipart for big files) a finished file under `name`."""
        if self.client is None:
            self.root.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.root / name)
        else:
            self.client.upload_file(str(path), self.bucket, self._key(name))
            path.unlink()


def _read_image(source: Store, ident: str, attempts: int = 5) -> bytes | None:
    for attempt in range(1, attempts + 1):
        try:
            return source.read(f"bin-images/{ident}.jpg")
        except Exception:  # noqa: BLE001 - the adaptive botocore retries already ran; back off and retry the whole read
            if attempt == attempts:
                raise
            time.sleep(min(5.0, 0.2 * 2 ** attempt) * random.random())
    return None


def write_shard(name: str, rows: list[dict], source: Store, dest: Store, max_side: int, quality: int,
                pool: ThreadPoolExecutor, tmp: Path) -> dict:
    """Read, bound and tar one shard's images; put the tar then its sidecar into `dest`; return the sidecar."""

    def one(row: dict) -> tuple[dict, bytes | None, str | None, str | None]:
        ident = str(row["id"])
        try:
            data = _read_image(source, ident)
        except Exception as exc:  # noqa: BLE001 - recorded in the sidecar, never fatal for the shard
            return row, None, None, f"fetch_error: {type(exc).__name__}: {exc}"
        if data is None:
            return row, None, None, "missing_image"
        try:
            return row, bounded_jpeg(data, max_side, quality), hashlib.sha256(data).hexdigest(), None
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
            return row, None, None, f"bad_image: {type(exc).__name__}: {exc}"

    fd, tmp_name = tempfile.mkstemp(dir=tmp, prefix=f".{name}.", suffix=".tar")
    os.close(fd)
    kept, skipped, counts = [], [], {}
    try:
        with tarfile.open(tmp_name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row, jpg, sha, problem in pool.map(one, rows):
                if jpg is None:
                    skipped.append([str(row["id"]), problem])
                    continue
                ident, count = str(row["id"]), int(row["count"])
                _member(tar, f"{ident}.jpg", jpg)
                _member(tar, f"{ident}.cls", str(count).encode())
                kept.append([ident, count, sha])
                counts[str(count)] = counts.get(str(count), 0) + 1
        sidecar = {"format": FORMAT, "items": len(kept), "counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
                   "bytes": os.path.getsize(tmp_name), "max_side": max_side, "rows": kept, "skipped": skipped}
        dest.put_file(f"{name}.tar", Path(tmp_name))
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    side = Path(tmp) / f".{name}.json"
    side.write_text(json.dumps(sidecar) + "\n")
    dest.put_file(f"{name}.json", side)  # last: the shard now counts as done
    return sidecar


def build(items: list[dict], split: str, source: Store, dest: Store, *, items_per_shard: int, max_side: int,
          quality: int = 90, workers: int = 16, seed: int = 0, part: tuple[int, int] = (0, 1),
          log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict:
    """Write the shards of one split that are not there yet; part=(i, n): this process does shards k % n == i.
    Returns {"shards", "built", "present", "items", "skipped", "bytes", "seconds"} for this process's shards."""
    started = time.perf_counter()
    for number, row in enumerate(items, 1):
        if "id" not in row or not isinstance(row.get("count"), int) or row["count"] < 0:
            raise ShardError(f"item {number}: needs an id and an integer count >= 0, got {row!r}")
    shards = plan(items, items_per_shard, seed)
    names = shard_names(split, len(shards))
    mine = [k for k in range(len(shards)) if k % part[1] == part[0]]
    stats = {"shards": len(mine), "built": 0, "present": 0, "items": 0, "skipped": 0, "bytes": 0}
    with tempfile.TemporaryDirectory(prefix="shards-") as tmp, ThreadPoolExecutor(workers, thread_name_prefix="shard") as pool:
        for done, k in enumerate(mine, 1):
            if dest.exists(f"{names[k]}.json"):
                stats["present"] += 1
                continue
            sidecar = write_shard(names[k], shards[k], source, dest, max_side, quality, pool, Path(tmp))
            stats["built"] += 1
            stats["items"] += sidecar["items"]
            stats["skipped"] += len(sidecar["skipped"])
            stats["bytes"] += sidecar["bytes"]
            rate = stats["items"] / max(time.perf_counter() - started, 1e-9)
            log(f"[shards] {split}: {done}/{len(mine)} shards, {stats['items']} items, {rate:.0f} items/s")
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


# -- reading ---------------------------------------------------------------------------------------
def is_shard_channel(folder: str | Path) -> bool:
    folder = Path(folder)
    return not (folder / "manifest.jsonl").is_file() and any(folder.glob("*.tar"))


def read_sidecars(folder: str | Path) -> list[dict]:
    """The channel's complete shards (sidecar with its tar), sorted by name; each gets "path" (the tar)."""
    folder = Path(folder)
    out = []
    for side in sorted(folder.glob("*.json")):
        tar = side.with_suffix(".tar")
        if not tar.is_file():
            continue
        try:
            meta = json.loads(side.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ShardError(f"{side}: not a shard sidecar ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ShardError(f"{side}: not a {FORMAT} sidecar")
        out.append({**meta, "path": str(tar)})
    if not out:
        raise ShardError(f"{folder} holds no complete shard (a .tar with its .json sidecar)")
    return out


def digest(folder: str | Path) -> str:
    """sha256 over sorted (id, count, sha256) rows: equal to train.py's manifest_digest for the same items."""
    rows = [list(row) for meta in read_sidecars(folder) for row in meta["rows"]]
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def iter_tar(path: str | Path):
    """(id, jpeg bytes, count) per item of a shard, reading the tar as one sequential stream."""
    pending: dict[str, bytes] = {}
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            data = tar.extractfile(member).read()
            if ext == "jpg":
                pending = {"key": key, "jpg": data}  # type: ignore[dict-item]
            elif ext == "cls" and pending.get("key") == key:
                yield key, pending["jpg"], int(data)
                pending = {}


def _slots(dist: tuple[int, int]) -> tuple[int, int]:
    """(this reader's slot, number of slots) over DDP ranks x DataLoader workers."""
    import torch

    rank, world = dist
    info = torch.utils.data.get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world * workers


def _shuffled(stream, size: int, rng: random.Random):
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def _torch_dataset():
    import torch

    class ShardStream(torch.utils.data.IterableDataset):
        """Decoded (uint8 [3,S,S], count) samples from shards, split over DDP ranks and DataLoader workers.

        Each reader slot (rank x worker) takes whole shards (k % slots == slot) when there are at least as
        many shards as slots, else every shard's samples i % slots == slot: each sample once per pass.
        Training (seed given): shard order shuffled per pass, a shuffle buffer of `buffer` samples, and
        endless passes (the caller stops after its steps); evaluation: one pass in order.
        """

        def __init__(self, paths: list[str], image_size: int, dist: tuple[int, int], seed: int | None, buffer: int):
            self.paths, self.image_size, self.dist, self.seed, self.buffer = paths, image_size, dist, seed, buffer

        def _samples(self, paths: list[str], slot: int, slots: int):
            if len(paths) >= slots:
                for path in paths[slot::slots]:
                    yield from iter_tar(path)
            else:
                i = 0
                for path in paths:
                    for sample in iter_tar(path):
                        if i % slots == slot:
                            yield sample
                        i += 1

        def __iter__(self):
            from PIL import Image

            try:
                from . import net
            except ImportError:
                import net

            slot, slots = _slots(self.dist)
            passes = 0
            while True:
                paths = list(self.paths)
                if self.seed is None:
                    stream = self._samples(paths, slot, slots)
                else:
                    random.Random(f"{self.seed}-{passes}").shuffle(paths)  # the same on every slot
                    rng = random.Random(f"{self.seed}-{passes}-{slot}")
                    stream = _shuffled(self._samples(paths, slot, slots), self.buffer, rng)
                produced = False
                for _, jpg, count in stream:
                    produced = True
                    with Image.open(io.BytesIO(jpg)) as image:
                        yield net.to_uint8(image, self.image_size), count
                if self.seed is None or not produced:  # evaluation, or a slot with no samples: end
                    return
                passes += 1

    return ShardStream


class ShardBatches:
    """train.py's batch source for a shard channel (the same interface as its in-memory/file Batches).

    iterate(order, drop_last_single=True) is a training epoch: this rank streams len(order) samples
    (the same number on every rank, so DDP steps stay equal), the shards shuffled with a new seed each
    epoch; iterate(order) without drop_last_single is an evaluation pass over this rank's share of every
    sample once. Labels come from the sidecars (for class weights and the sample count)."""

    cached = False

    def __init__(self, folder: str | Path, image_size: int, batch_size: int, num_classes: int,
                 num_workers: int | None, pin_memory: bool = False, seed: int = 0, shuffle_buffer: int = 1000):
        import torch

        self.shards = read_sidecars(folder)
        counts: dict[int, int] = {}
        for meta in self.shards:
            for key, n in meta["counts"].items():
                if not 0 <= int(key) < num_classes:
                    raise ShardError(f"{meta['path']}: count {key} outside 0..{num_classes - 1} (raise num_classes)")
                counts[int(key)] = counts.get(int(key), 0) + int(n)
        self.labels = torch.tensor([c for c, n in sorted(counts.items()) for _ in range(n)], dtype=torch.long)
        if not len(self.labels):
            raise ShardError(f"{folder}: the shards hold no items")
        self.image_size, self.batch_size, self.seed, self.buffer = image_size, batch_size, seed, shuffle_buffer
        self.num_workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
        self.pin_memory, self.epoch = pin_memory, 0

    def __len__(self) -> int:
        return len(self.labels)

    def _dist(self) -> tuple[int, int]:
        import torch.distributed as td

        return (td.get_rank(), td.get_world_size()) if td.is_available() and td.is_initialized() else (0, 1)

    def iterate(self, order, drop_last_single: bool = False):
        import torch

        training = drop_last_single
        need = len(order)
        if training:
            self.epoch += 1
            if need % self.batch_size == 1 and need > 1:
                need -= 1  # a batch of one breaks BatchNorm in training
        paths = [meta["path"] for meta in self.shards]
        dataset = _torch_dataset()(paths, self.image_size, self._dist(),
                                   self.seed * 1000003 + self.epoch if training else None, self.buffer)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                             pin_memory=self.pin_memory)
        seen = 0
        for images, labels in loader:
            if training and seen + len(labels) >= need:
                yield images[: need - seen], labels[: need - seen]
                return
            seen += len(labels)
            yield images, labels


# -- the build script (SageMaker Processing entry point) -----------------------------------------------
def _read_items(path: Path) -> list[dict]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ShardError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            items.append({"id": row.get("id"), "count": row.get("count")})
    return items


def _part() -> tuple[int, int]:
    """(this host's index, hosts) from SageMaker Processing's resource config; (0, 1) elsewhere."""
    config = Path("/opt/ml/config/resourceconfig.json")
    if config.is_file():
        data = json.loads(config.read_text())
        hosts = sorted(data.get("hosts") or [data.get("current_host")])
        return hosts.index(data["current_host"]), len(hosts)
    return 0, 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build shard channels from bin images in the ABID layout.")
    p.add_argument("--items", nargs="+", required=True, help="split files (JSON Lines with id and count); "
                   "the split's name is the file's stem: train.jsonl -> train-000000.tar")
    p.add_argument("--source", required=True, help="folder or s3://bucket/prefix in the ABID layout (bin-images/<id>.jpg)")
    p.add_argument("--dest", required=True, help="folder or s3://bucket/prefix; each split goes to <dest>/<split>/")
    p.add_argument("--items_per_shard", type=int, default=4000)
    p.add_argument("--max_side", type=int, default=448)
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=32, help="concurrent image reads and encodes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--endpoint_url", default=None, help="S3-compatible endpoint (both source and dest)")
    p.add_argument("--signed_source", action="store_true", help="sign source requests (default: anonymous, a public bucket)")
    args = p.parse_args(argv)
    if args.items_per_shard < 1 or args.max_side < 16 or not 1 <= args.quality <= 100 or args.workers < 1:
        print("error: need items_per_shard >= 1, max_side >= 16, quality 1..100, workers >= 1", file=sys.stderr)
        return 2
    source = Store(args.source, args.endpoint_url, unsigned=not args.signed_source, workers=args.workers)
    part = _part()
    try:
        for path in map(Path, args.items):
            dest = Store(f"{args.dest.rstrip('/')}/{path.stem}", args.endpoint_url, workers=args.workers)
            stats = build(_read_items(path), path.stem, source, dest, items_per_shard=args.items_per_shard,
                          max_side=args.max_side, quality=args.quality, workers=args.workers, seed=args.seed, part=part)
            print(json.dumps({"split": path.stem, **stats}), flush=True)
    except (ShardError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
