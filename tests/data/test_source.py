"""data/source.py: the shared source (listing, reading, the attempt budget) and bounded_map."""

import io
import threading
import time

import pytest

from bincount.data.fetch import fetch
from bincount.data.source import LocalSource, bounded_map, open_source, read_label
from bincount.workspace import read_jsonl


@pytest.fixture(params=["boto3", "lean"])
def inject(monkeypatch, request):
    """Failures injected into every GetObject attempt of the source's S3 client: plan[key] is a list of
    "503" (a SlowDown answer), "short" (a body that breaks off) or "real" (the request goes to the local
    S3 server), consumed one per attempt; once it is empty, "503" for ever. Returns (plan, attempts per
    key). Run for both clients the source reads with: boto3 (by botocore's before-send hook) and the
    lean anonymous client of data/s3get.py (at its one request function)."""
    import bincount.aws
    from botocore.awsrequest import AWSResponse

    from bincount.data import s3get

    plan: dict[str, list[str]] = {}
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def planned(key: str) -> str | None:
        if key not in plan:
            return None
        with lock:
            attempts[key] = attempts.get(key, 0) + 1
            return plan[key].pop(0) if plan[key] else "503"

    slow_down = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
    if request.param == "boto3":
        real = bincount.aws.client
        monkeypatch.setattr(s3get, "usable", lambda *args: False)

        def wrapped(*args, **kwargs):
            client = real(*args, **kwargs)

            def before_send(request, **_):
                what = planned(request.url.split("?")[0].split("/", 4)[-1])
                if what == "503":
                    return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Raw(slow_down))
                if what == "short":
                    return AWSResponse(request.url, 200, {"Content-Length": "5000", "Content-Type": "image/jpeg"}, _Raw(b"x" * 10))
                return None

            client.meta.events.register("before-send.s3.GetObject", before_send)
            return client

        monkeypatch.setattr(bincount.aws, "client", wrapped)
    else:
        real_send = s3get.PublicBucket._send

        def send(self, path):
            what = planned(path.split("?")[0].split("/", 2)[-1])
            if what == "503":
                return _FakeConnection(), _FakeAnswer(503, slow_down, {})
            if what == "short":
                return _FakeConnection(), _FakeAnswer(200, b"x" * 10, {"Content-Length": "5000"})
            return real_send(self, path)

        monkeypatch.setattr(s3get.PublicBucket, "_send", send)
        monkeypatch.setattr(s3get.PublicBucket, "_backoff", staticmethod(lambda attempt: None))
    monkeypatch.setattr("bincount.data.source.backoff", lambda attempt: 0.0)
    monkeypatch.setattr("botocore.retries.standard.ExponentialBackoff.delay_amount", lambda self, context: 0.0)
    # adaptive retries also slow the client's send rate after each SlowDown (a token bucket): 7 s of waiting here
    monkeypatch.setattr("botocore.retries.bucket.TokenBucket.acquire", lambda self, amount=1, block=True: True)
    return plan, attempts


class _FakeConnection:
    sock = None

    def close(self):
        pass


class _FakeAnswer(io.BytesIO):
    """What the lean client reads of an http.client answer."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]):
        super().__init__(body)
        self.status, self.reason, self.headers = status, "injected", headers

    def getheader(self, name, default=None):
        return self.headers.get(name, default)

    def isclosed(self):
        return self.tell() == len(self.getvalue())


class _Raw(io.BytesIO):
    """A urllib3-like raw body for an injected response."""

    def stream(self, amt=1024, decode_content=None):
        while chunk := self.read(amt):
            yield chunk


def test_data_retries_is_the_total_number_of_attempts_per_object(make_settings, inject):
    """botocore retries the request, fetch no longer retries on top: an object that always fails is tried
    exactly data.retries times (before: data.retries x (data.retries + 1))."""
    plan, attempts = inject
    plan.update({"metadata/00001.json": [], "bin-images/00002.jpg": []})
    settings = make_settings(data__ids="1-3", data__retries=3, data__workers=2)
    result = fetch(settings)
    assert attempts == {"metadata/00001.json": 3, "bin-images/00002.jpg": 3}
    rejects = {r["id"]: r["reason"] for r in read_jsonl(settings.workdir / "reports" / "fetch-rejects.jsonl")}
    assert rejects == {"00001": "fetch_error", "00002": "fetch_error"} and result.items == 1


def test_a_body_that_breaks_off_is_read_again_within_the_same_budget(make_settings, inject, synth_source):
    plan, attempts = inject
    settings = make_settings(data__retries=3)
    source = open_source(settings)
    key = "bin-images/00004.jpg"
    plan[key] = ["503", "short", "real"]  # a botocore retry, then a body re-read: 3 attempts in all
    assert source.read(key, b"".join) == (synth_source / key).read_bytes() and attempts[key] == 3
    plan[key], attempts[key] = ["short", "503", "short", "real"], 0
    from botocore.exceptions import IncompleteReadError

    with pytest.raises(IncompleteReadError):  # the third attempt broke off too: the budget is spent
        source.read(key, b"".join)
    assert attempts[key] == 3
    plan[key], attempts[key] = ["short", "503", "503", "real"], 0
    with pytest.raises(Exception, match="SlowDown"):  # botocore stops when the object's budget is spent
        source.read(key, b"".join)
    assert attempts[key] == 3
    assert read_label(source, "00005") == (synth_source / "metadata" / "00005.json").read_bytes()  # no budget left over
    assert read_label(source, "99999") is None


def test_listing_and_reading_are_the_same_for_a_folder_and_a_bucket(make_settings, synth_source):
    bucket = open_source(make_settings())
    folder = LocalSource(str(synth_source))
    for part in ("000", "001", "0011"):  # the bucket holds odd items 002xx beside the folder's
        in_bucket, calls = bucket.list("bin-images", part)
        assert sorted(in_bucket) == sorted(folder.list("bin-images", part)[0]) and calls >= 1
    assert read_label(bucket, "00007") == read_label(folder, "00007") is not None
    assert bucket.read("bin-images/00404.jpg", b"".join) is None and folder.read("bin-images/00404.jpg", b"".join) is None


def test_bounded_map_keeps_the_bound_pulls_lazily_and_stops_on_request():
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    running, peak, lock, pulled = [0], [0], threading.Lock(), []

    def work(n):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002)
        with lock:
            running[0] -= 1
        return n * n

    def items():
        for n in range(200):
            pulled.append(n)
            yield n

    results = dict(bounded_map(work, items(), 3))
    assert results == {n: n * n for n in range(200)} and peak[0] <= 3
    done: list[int] = []
    pulled.clear()
    for n, _ in bounded_map(work, items(), 2, stop=lambda: len(done) >= 10):
        done.append(n)
    assert sorted(done) == list(range(len(done))) and len(pulled) <= 10 + 2 * 2 + 1
    with ThreadPoolExecutor(2) as pool:
        assert sorted(r for _, r in bounded_map(abs, [-1, -2, -3], 2, pool=pool)) == [1, 2, 3]
    with ProcessPoolExecutor(1) as pool:  # audit's worker processes go through the same helper
        assert sorted(r for _, r in bounded_map(abs, [-4, 5], 1, pool=pool)) == [4, 5]
    with pytest.raises(ZeroDivisionError):
        list(bounded_map(lambda n: 1 // n, [1, 0, 2], 2))


def test_requests_in_flight_are_sized_for_latency_on_s3_and_per_core_for_a_folder(make_settings, synth_source):
    """data.workers unset: 256 requests in flight on S3 (at 50 ms a GET, 64 capped a run at 1,280 GETs/s,
    0.56x s5cmd in the index benchmark), 4 per core (at most 64) for a local folder; set, it is what it says."""
    import os

    from bincount.data.source import S3_WORKERS

    bucket = open_source(make_settings(data__workers=None))
    assert bucket.workers == S3_WORKERS == 256 and bucket.reader.connections == 256
    assert open_source(make_settings(data__workers=12)).workers == 12
    assert LocalSource(str(synth_source)).workers == min(64, 4 * (os.cpu_count() or 1))
    assert open_source(make_settings(data__source=str(synth_source), data__workers=3)).workers == 3


def test_anonymous_reads_never_make_the_boto3_client(make_settings, synth_source):
    """The lean client reads, lists and retries on its own: the boto3 client (0.3 s of imports and service
    model, a tenth of a 2,000-object fetch) is made only where it is used, for signed reads and proxies."""
    bucket = open_source(make_settings())
    assert read_label(bucket, "00007") == (synth_source / "metadata" / "00007.json").read_bytes()
    assert bucket.list("bin-images", "000")[0] and bucket._client is None
    signed = open_source(make_settings(data__unsigned=False))
    assert signed.reader is signed.client is not None
