"""benchmarks/s3static.py: the fetch benchmark's S3 server answers boto3, s5cmd and bincount fetch as S3 does."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def served(synth_source):
    s3static = load("s3static")
    store = s3static.Store.from_folder("abid", synth_source)
    with s3static.S3StaticServer(store, latency_ms=1) as url:
        yield url, store


def test_boto3_gets_heads_ranges_and_lists_like_s3(served):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ClientError

    url, store = served
    s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1", config=Config(signature_version=UNSIGNED))
    key = "bin-images/00003.jpg"
    body = store.objects[key][0]
    assert s3.get_object(Bucket="abid", Key=key)["Body"].read() == body
    assert s3.head_object(Bucket="abid", Key=key)["ContentLength"] == len(body)
    part = s3.get_object(Bucket="abid", Key=key, Range="bytes=10-19")
    assert part["Body"].read() == body[10:20] and part["ContentRange"] == f"bytes 10-19/{len(body)}"
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="abid", Prefix="metadata/", PaginationConfig={"PageSize": 50})
    listed = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert listed == [k for k in store.keys if k.startswith("metadata/")] and len(listed) == 120
    with pytest.raises(ClientError, match="NoSuchKey"):
        s3.get_object(Bucket="abid", Key="bin-images/99999.jpg")
    with pytest.raises(ClientError, match="NoSuchBucket"):
        s3.get_object(Bucket="other", Key=key)


def test_s5cmd_and_bincount_fetch_copy_the_same_objects(served, tmp_path):
    url, store = served
    s5cmd = Path(sys.executable).parent / "s5cmd"
    s5cmd = str(s5cmd) if s5cmd.exists() else shutil.which("s5cmd")
    assert s5cmd, "s5cmd is in the test extra"
    fetch = load("fetch")
    keys = [f"{folder}/{i:05d}.{ext}" for i in (1, 2, 3) for folder, ext in (("metadata", "json"), ("bin-images", "jpg"))]
    fetch.BUCKET = "abid"
    fetch.run_s5cmd(s5cmd, url, keys, tmp_path / "s5cmd", workers=4)
    fetched = fetch.run_fetch(url, 3, tmp_path / "work", workers=4)
    assert fetched.items == 3
    for key in keys:
        assert (tmp_path / "s5cmd" / key).read_bytes() == store.objects[key][0]
        assert (tmp_path / "work" / "raw" / key).read_bytes() == store.objects[key][0]
    listing = subprocess.run([s5cmd, "--endpoint-url", url, "--no-sign-request", "ls", "s3://abid/metadata/*"],
                             capture_output=True, text=True, check=True, env=fetch._aws_env())
    assert len(listing.stdout.splitlines()) == 120  # ListObjectsV2 pages, as s5cmd asks for them


def test_a_reused_connection_does_not_wait_for_a_delayed_ack(served):
    """The headers and the body are two writes: with Nagle's algorithm on, each GET on a kept-alive
    connection waited ~40 ms for the client's delayed ACK, so '20 ms per request' was 60."""
    import http.client
    import time

    url, store = served  # 1 ms per request
    conn = http.client.HTTPConnection(url.removeprefix("http://"))
    started = time.perf_counter()
    for _ in range(20):
        conn.request("GET", "/abid/metadata/00001.json")
        assert conn.getresponse().read() == store.objects["metadata/00001.json"][0]
    conn.close()
    assert time.perf_counter() - started < 0.5  # 20 x (1 ms + 40 ms) before
