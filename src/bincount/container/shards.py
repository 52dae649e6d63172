"""Shard channels: WebDataset-style tar files, the streaming training format (writer, reader, build script).

A shard channel is a folder (or S3 prefix) of `<split>-NNNNNN.tar` files, each with a sidecar
`<split>-NNNNNN.json` written after it ("offsets": where each item's .jpg header starts in the tar):

    {"format": "bincount-shards/1", "items": 4000, "counts": {"0": 610, ...}, "bytes": 251658240, "max_side": 448,
     "rows": [["00004", 3, "<sha256 of the source image>"], ...], "offsets": [0, 31232, ...], "skipped": [["00017", "bad_image: ..."]]}

A tar holds per item `<id>.jpg` (the bin photo, longest side <= max_side: resized, never cropped; an image
already within the bound keeps its original bytes) then `<id>.cls` (the count, decimal text): the WebDataset
convention, so `webdataset.WebDataset(urls)` reads these shards too, but nothing here needs webdataset.
A shard counts once its sidecar exists: a rebuild skips those (resumable), and readers list sidecars.
Readers split a pass into contiguous item ranges (seek to the first offset, read on): any number of shards
feeds any number of ranks x workers, each item read once per pass (epoch_plan).

Build (`python shards.py --items train.jsonl --source s3://aft-vbi-pds --dest s3://my-bucket/bincount/shards/train`):
items are split rows (`id`, `count`), shuffled once (seeded) so every shard mixes all counts, then cut into
shards of --items_per_shard, read from a folder or bucket in the ABID layout (bin-images/<id>.jpg) by threads;
each tar is written beside its destination folder (or to a temp file, then uploaded). This file is the
SageMaker Processing job's whole program: the standard library, Pillow and (for s3:// URIs) boto3; torch
only in the reader, which train.py uses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

FORMAT = "bincount-shards/1"
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # and no "..": workspace.check_id
PART = ".part"  # a file being written (beside its destination); never read as a shard


class ShardError(ValueError):
    """A shard channel that cannot be read as one (no shards, a bad sidecar or member, a count out of range)."""

    def __init__(self, message: str = ""):
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: keep the worker's one-line message
            last = message.rstrip().splitlines()[-1]
            message = last.partition("ShardError: ")[2] or last
        super().__init__(message)


# -- writing ---------------------------------------------------------------------------------------
def bounded_jpeg(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """The image as JPEG with its longest side <= max_side, never cropped; an RGB JPEG within it as it is."""
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

    fd, tmp_name = tempfile.mkstemp(dir=tmp, prefix=f".{name}.", suffix=PART)
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would stay on the shard
    os.close(fd)
    side = Path(tmp) / f".{name}.json{PART}"
    kept, skipped, counts, offsets = [], [], {}, []
    try:
        with tarfile.open(tmp_name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for row, jpg, sha, problem in pool.map(one, rows):
                if jpg is None:
                    skipped.append([str(row["id"]), problem])
                    continue
                ident, count = str(row["id"]), int(row["count"])
                offsets.append(tar.offset)  # where the item's .jpg header starts: readers seek there
                _member(tar, f"{ident}.jpg", jpg)
                _member(tar, f"{ident}.cls", str(count).encode())
                kept.append([ident, count, sha])
                counts[str(count)] = counts.get(str(count), 0) + 1
        sidecar = {"format": FORMAT, "items": len(kept), "counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
                   "bytes": os.path.getsize(tmp_name), "max_side": max_side, "rows": kept, "offsets": offsets,
                   "skipped": skipped}
        dest.put_file(f"{name}.tar", Path(tmp_name))
        side.write_text(json.dumps(sidecar) + "\n")
        dest.put_file(f"{name}.json", side)  # last: the shard now counts as done
    except OSError as exc:  # a full disk, a failed upload: one line naming the shard; a rerun resumes here
        raise ShardError(f"cannot write {dest.uri}/{name}.tar: {exc.strerror or exc} (finished shards are kept: "
                         "run the same command again)") from None
    finally:
        Path(tmp_name).unlink(missing_ok=True)
        side.unlink(missing_ok=True)
    return sidecar


def build(items: list[dict], split: str, source: Store, dest: Store, *, items_per_shard: int, max_side: int,
          quality: int = 90, workers: int = 16, seed: int = 0, part: tuple[int, int] = (0, 1),
          log=lambda message: print(message, file=sys.stderr, flush=True)) -> dict:
    """Write the shards of one split that are not there yet; part=(i, n): this process does shards k % n == i.
    Returns {"shards", "built", "present", "items", "skipped", "bytes", "seconds"} for this process's shards."""
    started = time.perf_counter()
    for number, row in enumerate(items, 1):  # an id becomes a source key, a file name and a tar member: no / or ..
        ident = str(row["id"]) if type(row.get("id")) in (str, int) else ""
        if not SAFE_ID.fullmatch(ident) or ".." in ident or type(row.get("count")) is not int or row["count"] < 0:
            raise ShardError(f"item {number}: needs an id (letters, digits, _ . -; no / or ..) and an integer count "
                             f">= 0, got {json.dumps(row, default=str)[:120]}")
    shards = plan(items, items_per_shard, seed)
    names = shard_names(split, len(shards))
    mine = [k for k in range(len(shards)) if k % part[1] == part[0]]
    stats = {"shards": len(mine), "built": 0, "present": 0, "items": 0, "skipped": 0, "bytes": 0}
    if dest.root is not None:  # temp files beside the destination: a rename never crosses file systems
        dest.root.mkdir(parents=True, exist_ok=True)
        for stale in dest.root.glob(f".{split}-*{PART}"):  # left by a killed build
            stale.unlink(missing_ok=True)
        scratch = contextlib.nullcontext(str(dest.root))
    else:
        scratch = tempfile.TemporaryDirectory(prefix="shards-")
    with scratch as tmp, ThreadPoolExecutor(workers, thread_name_prefix="shard") as pool:
        for done, k in enumerate(mine, 1):
            if dest.exists(f"{names[k]}.json"):
                stats["present"] += 1
                continue
            sidecar = write_shard(names[k], shards[k], source, dest, max_side, quality, pool, Path(tmp))
            stats["built"], stats["skipped"] = stats["built"] + 1, stats["skipped"] + len(sidecar["skipped"])
            stats["items"], stats["bytes"] = stats["items"] + sidecar["items"], stats["bytes"] + sidecar["bytes"]
            rate = stats["items"] / max(time.perf_counter() - started, 1e-9)
            log(f"[shards] {split}: {done}/{len(mine)} shards, {stats['items']} items, {rate:.0f} items/s")
    stats["seconds"] = round(time.perf_counter() - started, 3)
    return stats


# -- reading ---------------------------------------------------------------------------------------
BLOCK = 512  # tar members start on 512-byte blocks
MIN_ITEM_BYTES = 3 * BLOCK  # an item's least footprint: the .jpg header, the .cls header and its data block
MAX_MEMBER_BYTES = 16 * 2**20  # an image member over this is refused before it is read (shards hold bounded JPEGs)
MAX_IMAGE_PIXELS = 4096 * 4096  # an image claiming more is refused before it is decoded (a decompression bomb)


def is_shard_channel(folder: str | Path) -> bool:
    return not (Path(folder) / "manifest.jsonl").is_file() and any(Path(folder).glob("*.tar"))


def _checked(meta, side: Path, tar: Path) -> dict:
    """A sidecar checked against itself and its tar: rows, counts, byte size and member offsets agree."""
    bad = lambda why: ShardError(f"{side}: {why}")  # noqa: E731
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} sidecar")
    rows = meta.get("rows")
    if not isinstance(rows, list) or type(meta.get("items")) is not int or meta["items"] != len(rows):
        raise bad(f"says {str(meta.get('items'))[:20]} items but lists {len(rows) if isinstance(rows, list) else 'no'} rows")
    counts: dict[str, int] = {}
    for number, row in enumerate(rows, 1):
        if not (isinstance(row, list) and len(row) >= 2 and isinstance(row[0], str) and row[0]
                and type(row[1]) is int and row[1] >= 0):
            raise bad(f"row {number} is not [id, count, sha256]: {json.dumps(row)[:80]}")
        counts[str(row[1])] = counts.get(str(row[1]), 0) + 1
    if meta.get("counts") != counts:
        raise bad("its counts do not match its rows")
    size = tar.stat().st_size
    if meta.get("bytes") != size:
        raise bad(f"says {str(meta.get('bytes'))[:20]} bytes, {tar.name} has {size}")
    offsets = meta.get("offsets")
    if offsets is None:  # written before sidecars had offsets: walk the tar's headers once
        offsets = tar_offsets(tar, [row[0] for row in rows])
    elif not isinstance(offsets, list) or len(offsets) != len(rows) or not all(type(o) is int for o in offsets):
        raise bad("its offsets do not match its rows")
    ends = [*offsets[1:], size]  # an item takes at least MIN_ITEM_BYTES before the next (or the tar's end)
    if any(o < 0 or o % BLOCK or end - o < MIN_ITEM_BYTES for o, end in zip(offsets, ends)):
        raise bad(f"its offsets do not fit {tar.name} ({size} bytes, {len(rows)} items)")
    return {**meta, "path": str(tar), "offsets": offsets}


def read_sidecars(folder: str | Path) -> list[dict]:
    """The channel's complete shards (sidecar with its tar, checked against it) by name, with "path" (the tar)."""
    folder = Path(folder)
    out = []
    for side in sorted(folder.glob("*.json")):
        tar = side.with_suffix(".tar")
        if not tar.is_file():
            continue
        try:
            meta = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{side}: not a shard sidecar ({exc})") from None
        out.append(_checked(meta, side, tar))
    if not out:
        raise ShardError(f"{folder} holds no complete shard (a .tar with its .json sidecar)")
    return out


def digest(folder: str | Path) -> str:
    """sha256 over sorted (id, count, sha256) rows: equal to train.py's manifest_digest for the same items."""
    rows = [list(row[:3]) for meta in read_sidecars(folder) for row in meta["rows"]]
    return hashlib.sha256(json.dumps(sorted(rows)).encode()).hexdigest()


def iter_tar(path: str | Path):
    """(id, jpeg bytes, count) per item of a shard, reading the tar as one sequential stream (tarfile's reader)."""
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


def _header(block: bytes, shard, where: str) -> tuple[str, int]:
    """(name, size) of a tar header block, or a ShardError naming the shard and the place."""
    if len(block) < BLOCK:
        raise ShardError(f"{shard}: truncated at {where}")
    try:
        size = int(block[124:136].rstrip(b"\0 ").decode("ascii"), 8)
        checksum = int(block[148:156].rstrip(b"\0 ").decode("ascii"), 8)
    except (ValueError, UnicodeDecodeError):
        raise ShardError(f"{shard}: no tar header at {where}") from None
    if checksum != sum(block[:148]) + 256 + sum(block[156:]):  # the checksum field counts as 8 spaces
        raise ShardError(f"{shard}: a corrupt tar header at {where}")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar" and block[345]:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), size


def tar_offsets(path: Path, ids: list[str]) -> list[int]:
    """Each item's .jpg header offset, found by walking the tar's headers (for sidecars without offsets)."""
    offsets, at = [], 0
    with open(path, "rb") as f:
        for ident in ids:
            for ext in ("jpg", "cls"):
                f.seek(at)
                name, size = _header(f.read(BLOCK), path, f"member {ident}.{ext} (byte {at})")
                if name != f"{ident}.{ext}":
                    raise ShardError(f"{path}: the sidecar lists {ident}.{ext} at byte {at}, the tar has {name[:80]!r}")
                if ext == "jpg":
                    offsets.append(at)
                at += BLOCK + -(-size // BLOCK) * BLOCK
    return offsets


def read_items(shard: dict, first: int, stop: int, max_bytes: int = MAX_MEMBER_BYTES):
    """(id, jpeg bytes, count) of a shard's items first..stop-1: two reads each, checked against the sidecar."""
    path, rows, offsets = shard["path"], shard["rows"], shard["offsets"]
    try:
        with open(path, "rb", buffering=0) as f:
            for i in range(first, stop):
                ident, count, at = rows[i][0], rows[i][1], offsets[i]
                if f.tell() != at:
                    f.seek(at)
                name, size = _header(f.read(BLOCK), path, f"member {ident}.jpg (byte {at})")
                if name != f"{ident}.jpg":
                    raise ShardError(f"{path}: the sidecar lists {ident}.jpg at byte {at}, the tar has {name[:80]!r}")
                if size > max_bytes:
                    raise ShardError(f"{path}: member {ident}.jpg is {size:,} bytes, over the {max_bytes:,} byte image limit")
                padded = -(-size // BLOCK) * BLOCK
                body = f.read(padded + 2 * BLOCK)  # the image, the .cls header and its one data block
                cname, csize = _header(body[padded:padded + BLOCK], path, f"member {ident}.cls")
                if cname != f"{ident}.cls" or csize > BLOCK or len(body) < padded + 2 * BLOCK:
                    raise ShardError(f"{path}: member {ident}.jpg is not followed by its {ident}.cls "
                                     f"({'truncated' if len(body) < padded + 2 * BLOCK else repr(cname[:80])})")
                text = body[padded + BLOCK:padded + BLOCK + csize]
                if not text.strip().isdigit() or int(text) != count:
                    raise ShardError(f"{path}: member {ident}.cls holds {text[:20]!r}, the sidecar says {count}")
                yield ident, body[:size], count
    except OSError as exc:
        raise ShardError(f"{path}: {exc.strerror or exc}") from None


def epoch_plan(sizes: list[int], seed: int | None, rank: int, world: int, workers: int, batch: int) -> list[list[tuple[int, int, int]]]:
    """Each DataLoader worker's (shard, first, stop) item ranges of this rank's share of one pass: the shards'
    items one after another (in a seeded order in training, the same on every rank), a contiguous equal share
    per rank (training drops the last total % world items and a lone last sample, as the file reader does),
    cut into whole batches, a contiguous run of them per worker: each item read once per pass, by one reader."""
    order = list(range(len(sizes)))
    total = sum(sizes)
    if seed is not None:
        random.Random(seed).shuffle(order)
        per = total // world
        lo, hi = rank * per, rank * per + per
        if per % batch == 1 and per > 1:
            hi -= 1  # a batch of one breaks BatchNorm in training
    else:
        base, extra = divmod(total, world)
        lo = rank * base + min(rank, extra)
        hi = lo + base + (rank < extra)
    batches = -(-(hi - lo) // batch)
    plans = []
    for w in range(workers):
        a, b = lo + batches * w // workers * batch, min(lo + batches * (w + 1) // workers * batch, hi)
        segments, at = [], 0
        for k in order:
            s, e = max(a, at), min(b, at + sizes[k])
            if s < e:
                segments.append((k, s - at, e - at))
            at += sizes[k]
        plans.append(segments)
    return plans


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


def decode_item(shard: str, ident: str, jpg: bytes, image_size: int):
    """A shard member's JPEG -> uint8 [S, S, 3] (the file reader's layout), or a ShardError naming it."""
    from PIL import Image

    try:
        from . import net
    except ImportError:
        import net

    try:
        with Image.open(io.BytesIO(jpg)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ShardError(f"{shard}: member {ident}.jpg is {image.width}x{image.height} pixels, "
                                 f"over the {MAX_IMAGE_PIXELS:,} pixel limit")
            return net.decode(image, image_size).permute(1, 2, 0)  # the one decode: train, serve, evaluate
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a file that is not an image
        raise ShardError(f"{shard}: member {ident}.jpg is not a usable image ({type(exc).__name__}: {str(exc)[:120]})") from None


def _torch_dataset():
    import torch

    class ShardStream(torch.utils.data.IterableDataset):
        """Decoded (uint8 [S,S,3], count) samples of this rank's share of a pass (see epoch_plan): each
        DataLoader worker reads its item ranges, through a shuffle buffer in training. The pass's seed and
        mode come from `params`, a shared-memory tensor [seed, training], so workers persist across passes."""

        def __init__(self, shards: list[dict], image_size: int, batch: int, dist: tuple[int, int], buffer: int, params):
            self.shards, self.image_size, self.batch, self.dist, self.buffer = shards, image_size, batch, dist, buffer
            self.params = params

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
            seed, training = self.params.tolist()
            rank, world = self.dist
            plan = epoch_plan([len(s["rows"]) for s in self.shards], seed if training else None, rank, world,
                              workers, self.batch)[worker]
            stream = ((self.shards[k]["path"], *item) for k, a, b in plan for item in read_items(self.shards[k], a, b))
            if training:
                stream = _shuffled(stream, self.buffer, random.Random(f"{seed}-{rank}-{worker}"))
            for path, ident, jpg, count in stream:
                yield decode_item(path, ident, jpg, self.image_size), count

    return ShardStream


class ShardBatches:
    """train.py's batch source for a shard channel (the file Batches' interface): iterate(order, True, epoch) is
    a training pass over this rank's equal share (in an order seeded by epoch, default the next), iterate(order)
    an evaluation pass over its share of every item once; batches are channels_last views [B, 3, S, S] of
    [B, S, S, 3], labels come from the sidecars, and the DataLoader workers persist across passes."""

    cached = False

    def __init__(self, folder: str | Path, image_size: int, batch_size: int, num_classes: int,
                 num_workers: int | None, pin_memory: bool = False, seed: int = 0, shuffle_buffer: int = 1000,
                 log=lambda message: print(message, file=sys.stderr, flush=True)):
        import torch

        self.shards = read_sidecars(folder)
        for meta in self.shards:
            for ident, count, *_ in meta["rows"]:
                if count >= num_classes:
                    raise ShardError(f"{meta['path']}: item {ident}: count {count} outside 0..{num_classes - 1} "
                                     "(raise num_classes)")
        self.labels = torch.tensor([row[1] for meta in self.shards for row in meta["rows"]], dtype=torch.long)
        if not len(self.labels):
            raise ShardError(f"{folder}: the shards hold no items")
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.num_workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers
        self.dist = self._dist()
        rank, world = self.dist
        share = len(self.labels) // world
        if share == 0:
            raise ShardError(f"{folder}: {len(self.labels)} items cannot feed {world} ranks")
        busy = min(self.num_workers, -(-share // batch_size))
        if busy < self.num_workers:
            log(f"{folder}: {share} items per rank fill {busy} of {self.num_workers} DataLoader workers (batch {batch_size})")
        self.params = torch.zeros(2, dtype=torch.int64).share_memory_()  # [seed, training] of the next pass
        dataset = _torch_dataset()(self.shards, image_size, batch_size, self.dist, shuffle_buffer, self.params)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=self.num_workers, pin_memory=pin_memory,
            persistent_workers=self.num_workers > 0, prefetch_factor=2 if self.num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.labels)

    def _dist(self) -> tuple[int, int]:
        import torch.distributed as td

        return (td.get_rank(), td.get_world_size()) if td.is_available() and td.is_initialized() else (0, 1)

    def iterate(self, order, drop_last_single: bool = False, epoch: int | None = None):
        training = drop_last_single
        if training:
            self.epoch = self.epoch + 1 if epoch is None else epoch
        seed = self.seed * 1000003 + self.epoch if training else 0
        self.params[0], self.params[1] = seed, int(training)
        rank, world = self.dist
        plan = epoch_plan([len(s["rows"]) for s in self.shards], seed if training else None, rank, world, 1, self.batch_size)
        want, seen = sum(b - a for _, a, b in plan[0]), 0
        for images, labels in self.loader:
            seen += len(labels)
            yield images.permute(0, 3, 1, 2), labels
        if seen != want:  # the plan guarantees it; a broken pass must not look like a short epoch
            raise ShardError(f"a pass over {self.shards[0]['path']}'s channel gave {seen} of {want} items")


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
    if args.items_per_shard < 1 or not 16 <= args.max_side <= 4096 or not 1 <= args.quality <= 100 or args.workers < 1:
        print("error: need items_per_shard >= 1, max_side 16..4096, quality 1..100, workers >= 1", file=sys.stderr)
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
