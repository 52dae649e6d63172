"""Where bin images and labels come from: a local folder or an S3 bucket in the ABID layout
(bin-images/<id>.jpg, metadata/<id>.json), shared by fetch, index, shard, audit and predict.

- `open_source(settings)`: S3Source for s3://bucket[/prefix] (anonymous unless data.unsigned is false),
  LocalSource for a folder. Both list keys with their sizes (`list`) and read an object (`read`).
  S3Source reads anonymously (data.unsigned, no proxy) with the lean client of data/s3get.py (GET and
  LIST at a fifth of botocore's CPU, the same errors and retries; no boto3 client is made), else with boto3.
- Concurrency (`source.workers`): data.workers, else 256 requests in flight on S3 (sized for the
  network's latency, not the cores: at 50 ms a GET, 64 in flight cap a run at 1,280 GETs/s whatever
  the CPU; s5cmd's default is 256) and 4 per core for a local folder.
- Retries are botocore's own (its retry config: backoff on throttling, 5xx and connection errors),
  with data.retries as the total number of attempts for one object: botocore's attempts and any
  re-read of a body that broke off while streaming (which botocore cannot retry) share that budget.
- `bounded_map`: the thread (or process) pool helper that keeps a bounded number of tasks in flight.
- `BucketClients`: S3 reads of any s3:// URI (the data source's bucket with the data settings, any
  other bucket with the s3 settings: aws.s3_client), for audit and predict.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from bincount.aws import error_code, error_message
from bincount.config import Settings
from bincount.data import manifest as mf
from bincount.data import s3get
from bincount.errors import BincountError

T = TypeVar("T")
CHUNK = 256 * 1024
S3_WORKERS = 256  # requests in flight on S3 by default: s5cmd's default; at 50-100 ms a request, ~2,500-5,000/s
LOCAL_WORKERS_PER_CORE = 4  # a local folder: reads wait on the disk, not the network
FATAL_CODES = {"NoSuchBucket", "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
               "AllAccessDisabled", "InvalidBucketName", "PermanentRedirect", "301"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class ShortBody(Exception):
    """The body ended before ContentLength bytes arrived (read again, within the attempt budget)."""


def stream_broke(exc: BaseException) -> bool:
    """Did a body break off while streaming (botocore has returned the response, so it cannot retry)?"""
    from botocore.exceptions import ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return isinstance(exc, (ShortBody, ResponseStreamingError, IncompleteReadError, ReadTimeoutError,
                            ConnectionClosedError, ProtocolError, ConnectionError, TimeoutError))


def is_request_error(exc: BaseException) -> bool:
    """An error of the request itself (after all its attempts): the item is rejected, the run goes on."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, (BotoCoreError, ClientError, ShortBody, ConnectionError, TimeoutError))


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait before attempt `attempt + 1`: exponential with full jitter (botocore's rule)."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


def aws_message(exc: BaseException) -> str:
    """`Code: message` of an AWS error, else `Type: text`."""
    code = error_code(exc)
    if code:
        return f"{code}: {error_message(exc) or ''}".strip().rstrip(":")
    return f"{type(exc).__name__}: {exc}"


# -- sources -------------------------------------------------------------------------------------
class S3Source:
    """s3://bucket[/prefix] in the ABID layout, anonymous unless data.unsigned is false."""

    def __init__(self, settings: Settings):
        from bincount.aws import parse_s3_uri, resolve_region

        data = settings.data
        self.settings = settings
        self.uri = data.source.rstrip("/")
        self.bucket, self.prefix = parse_s3_uri(data.source)
        self.endpoint = data.endpoint_url or "AWS S3"
        self.attempts = data.retries
        self.workers = data.workers or S3_WORKERS
        # An endpoint that accepts connections and never answers would otherwise cost retries x timeout per
        # request: once it has been silent for `stall_s`, the next timeout stops the run.
        self.stall_s, self.last_answer = 3 * data.timeout, time.monotonic()
        self._budget = threading.local()  # attempts left for the object this thread reads (None: no budget)
        self._client: Any = None
        self._client_lock = threading.Lock()
        if s3get.usable(data.endpoint_url, data.unsigned):  # anonymous reads: the lean client of data/s3get.py
            self.reader: Any = s3get.PublicBucket(
                self.bucket, endpoint_url=data.endpoint_url, region=resolve_region(data.region),
                connections=self.workers, connect_timeout=min(5.0, data.timeout), read_timeout=data.timeout,
                attempts=data.retries, on_attempt=self._on_attempt)
        else:
            self.reader = self.client

    @property
    def client(self) -> Any:
        """The boto3 client (signed reads, proxies), made on first use: anonymous reads never need it, and
        its imports and service model cost 0.3 s of CPU, a tenth of a 2,000-object fetch."""
        from bincount.aws import s3_client

        with self._client_lock:
            if self._client is None:
                data = self.settings.data  # botocore's max_attempts counts the retries after the first: data.retries in all
                client = s3_client(self.settings, source=True, max_pool_connections=self.workers,
                                   max_attempts=data.retries - 1, connect_timeout=min(5.0, data.timeout),
                                   read_timeout=data.timeout)
                client.meta.events.register_first("needs-retry.s3", self._on_attempt)
                self._client = client
            return self._client

    def _on_attempt(self, response: Any = None, caught_exception: Any = None, operation: Any = None, **_: Any) -> None:
        """botocore's hook after every attempt: note answers, give up on a silent endpoint, and stop
        botocore's retries once the object's attempts are spent (raising what botocore would raise)."""
        from botocore.exceptions import ClientError, ConnectTimeoutError, ReadTimeoutError

        now = time.monotonic()
        if response is not None:  # any HTTP answer, even a 503: the endpoint is alive
            self.last_answer = now
        elif isinstance(caught_exception, (ReadTimeoutError, ConnectTimeoutError)) and now - self.last_answer > self.stall_s:
            raise BincountError(f"{self.endpoint} has not answered for {now - self.last_answer:.0f} s ({self.uri}): "
                                "check --endpoint-url and the network, or raise data.timeout for a slow link")
        left = getattr(self._budget, "left", None)
        if left is None:
            return None
        self._budget.left = left = left - 1
        if left <= 0:
            if caught_exception is not None:
                raise caught_exception
            if response is not None and response[0].status_code >= 300:
                raise ClientError(response[1], operation.name if operation is not None else "GetObject")
        return None  # no opinion: botocore's retry rules decide

    def key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def get(self, key: str) -> dict | None:
        """The one GET of an object (None: no such key); a fatal error is a BincountError."""
        from botocore.exceptions import ClientError, EndpointConnectionError

        try:
            return self.reader.get_object(Bucket=self.bucket, Key=self.key(key))
        except ClientError as exc:
            code = error_code(exc)
            if code in MISSING_CODES:
                return None
            if code in FATAL_CODES:
                hint = " (a private bucket needs --set data.unsigned=false and credentials)" if code in {"AccessDenied", "403"} else ""
                raise BincountError(f"s3://{self.bucket}/{self.key(key)}: {code}{hint}") from None
            raise
        except EndpointConnectionError:
            raise BincountError(f"cannot reach {self.endpoint} for {self.uri} (check --endpoint-url and the network)") from None

    def read(self, key: str, consume: Callable[[Iterator[bytes]], T]) -> T | None:
        """consume(the object's chunks), or None when there is no such key. At most data.retries
        attempts in all: botocore's retries, and a new GET when the body breaks off while streaming."""
        self._budget.left = self.attempts
        try:
            attempt = 0
            while True:
                resp = self.get(key)
                if resp is None:
                    return None
                try:
                    return consume(_chunks(resp))
                except Exception as exc:
                    if not stream_broke(exc) or self._budget.left <= 0:
                        raise
                attempt += 1
                time.sleep(backoff(attempt))
        finally:
            self._budget.left = None

    def list(self, folder: str, start: str = "") -> tuple[list[tuple[str, int]], int]:
        """(name, bytes) of the objects under <folder>/<start>, and the LIST calls that took."""
        prefix = self.key(f"{folder}/{start}")
        out, calls = [], 0
        if isinstance(self.reader, s3get.PublicBucket):
            pages = self.reader.list_objects(prefix)
        else:
            pages = ([(o["Key"], o["Size"]) for o in page.get("Contents", [])]
                     for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix))
        for page in pages:
            calls += 1
            out += [(key[len(prefix) - len(start):], int(size)) for key, size in page]
        return out, calls


def _chunks(resp: dict) -> Iterator[bytes]:
    expected, got = resp.get("ContentLength"), 0
    for chunk in resp["Body"].iter_chunks(CHUNK):
        got += len(chunk)
        yield chunk
    if expected is not None and got != expected:
        raise ShortBody(f"{got} of {expected} bytes")


class LocalSource:
    """A local folder in the bucket layout (bin-images/, metadata/), e.g. made by `bincount synth`."""

    def __init__(self, root: str, workers: int | None = None):
        self.root = Path(root).expanduser()
        self.uri = str(self.root)
        self.workers = workers or min(64, LOCAL_WORKERS_PER_CORE * (os.cpu_count() or 1))
        if not self.root.is_dir():
            raise BincountError(f"source {root} is neither an s3://bucket/prefix URI nor an existing folder")
        if not (self.root / mf.IMAGES).is_dir() and not (self.root / mf.LABELS).is_dir():
            raise BincountError(f"source {root} has no {mf.IMAGES}/ or {mf.LABELS}/ folder (the bucket layout)")

    def read(self, key: str, consume: Callable[[Iterator[bytes]], T]) -> T | None:
        path = self.root / key
        if not path.is_file():
            return None

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return consume(chunks())

    def list(self, folder: str, start: str = "") -> tuple[list[tuple[str, int]], int]:
        base = self.root / folder
        if not base.is_dir():
            return [], 0
        return [(e.name, e.stat().st_size) for e in base.iterdir() if e.name.startswith(start) and e.is_file()], 0


Source = S3Source | LocalSource


def open_source(settings: Settings) -> Source:
    """The source data.source names: an s3:// bucket (the data settings) or a local folder."""
    data = settings.data
    return S3Source(settings) if data.source.startswith("s3://") else LocalSource(data.source, data.workers)


def read_label(source: Source, ident: str) -> bytes | None:
    """The label file of `ident`, or None when the source has none."""
    return source.read(mf.label_key(ident), b"".join)


# -- concurrency ---------------------------------------------------------------------------------
def bounded_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, stop: Callable[[], bool] = lambda: False,
                pool: Any = None) -> Iterator[tuple[Any, Any]]:
    """Yield (item, fn(item)) as they complete, keeping at most 2*workers in flight and pulling
    `items` lazily, on `pool` (an executor; default a thread pool of `workers`). Once stop() is true
    nothing new starts, but all started items are still yielded (so the items done are always a
    prefix of `items`). Errors propagate; pending work is cancelled."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    if pool is None:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bounded-map") as own:
            yield from bounded_map(fn, items, workers, stop, own)
        return
    done: queue.SimpleQueue = queue.SimpleQueue()
    it = iter(items)
    pending: dict[Any, Any] = {}

    def fill() -> None:
        while len(pending) < 2 * workers and not stop():
            try:
                item = next(it)
            except StopIteration:
                return
            future = pool.submit(fn, item)
            pending[future] = item
            future.add_done_callback(done.put)

    fill()
    try:
        while pending:
            future = done.get()
            yield pending.pop(future), future.result()
            fill()
    finally:
        for future in pending:
            future.cancel()


# -- any s3:// URI (audit, predict) ----------------------------------------------------------------
class BucketClients:
    """S3 reads of any s3:// URI, each bucket with its own settings (aws.s3_client: the data source's
    bucket with the data settings, any other bucket with the s3 settings); thread-safe."""

    def __init__(self, settings: Settings):
        from bincount.aws import Aws

        self.aws, self.pool = Aws(settings), max(10, settings.deploy.workers)

    def client(self, bucket: str) -> Any:
        return self.aws.s3(bucket, max_pool_connections=self.pool, max_attempts=4)

    def list(self, bucket: str, prefix: str, suffixes: tuple[str, ...]) -> Iterator[dict]:
        """The objects (Key, Size, ETag, ...) under prefix/ whose key ends with one of `suffixes`."""
        pages = self.client(bucket).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/" if prefix else "")
        for page in pages:
            yield from (obj for obj in page.get("Contents", []) if obj["Key"].lower().endswith(suffixes))

    def get(self, uri: str) -> dict:
        """The GetObject response of an s3:// URI (errors as botocore raises them)."""
        from bincount.aws import parse_s3_uri

        bucket, key = parse_s3_uri(uri)
        return self.client(bucket).get_object(Bucket=bucket, Key=key)
