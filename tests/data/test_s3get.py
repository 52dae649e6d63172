"""data/s3get.py: the lean anonymous client reads what boto3 reads, fails as botocore fails, retries as
it retries, and costs a fraction of its CPU; the source uses it only for anonymous reads."""

from __future__ import annotations

import importlib.util
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, IncompleteReadError

from bincount.data.s3get import PublicBucket, usable

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def boto3_client(endpoint: str):
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(signature_version=UNSIGNED))


def test_reads_and_lists_what_boto3_does_with_botocores_errors(s3_server, abid_bucket):
    bucket = abid_bucket.removeprefix("s3://")
    lean, boto = PublicBucket(bucket, endpoint_url=s3_server, region="us-east-1"), boto3_client(s3_server)
    for key in ("metadata/00001.json", "bin-images/00002.jpg"):
        want = boto.get_object(Bucket=bucket, Key=key)["Body"].read()
        got = lean.get_object(Bucket=bucket, Key=key)
        assert got["ContentLength"] == len(want) and b"".join(got["Body"].iter_chunks(1000)) == want
    listed = [pair for page in lean.list_objects("metadata/0000") for pair in page]
    pages = boto.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="metadata/0000")
    assert listed == [(o["Key"], o["Size"]) for page in pages for o in page["Contents"]] and len(listed) == 9
    with pytest.raises(ClientError) as missing:
        lean.get_object(Bucket=bucket, Key="metadata/99999.json")
    assert missing.value.response["Error"]["Code"] == "NoSuchKey"
    with pytest.raises(ClientError) as no_bucket:
        PublicBucket("no-such-bucket", endpoint_url=s3_server, region="us-east-1").get_object(Bucket="no-such-bucket", Key="x")
    assert no_bucket.value.response["Error"]["Code"] == "NoSuchBucket"
    with pytest.raises(EndpointConnectionError):
        PublicBucket(bucket, endpoint_url="http://127.0.0.1:9", region="us-east-1", attempts=2).get_object(Bucket=bucket, Key="x")


def test_listing_follows_continuation_tokens():
    spec = importlib.util.spec_from_file_location("bench_s3static", BENCHMARKS / "s3static.py")
    s3static = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(s3static)
    store = s3static.Store("many", {f"metadata/{i:05d}.json": b"{}" * (i % 7) for i in range(2500)})
    with s3static.S3StaticServer(store) as url:
        pages = list(PublicBucket("many", endpoint_url=url, region="us-east-1").list_objects("metadata/"))
    assert [len(p) for p in pages] == [1000, 1000, 500]
    assert [pair for page in pages for pair in page] == [(k, len(store.objects[k][0])) for k in store.keys]


class Scripted:
    """A local HTTP server that answers from a script: each entry (status, headers, body, then) where
    then is "keep", "close" (drop the connection without saying so) or "short" (send half the body)."""

    def __init__(self, script: list[tuple[int, dict, bytes, str]]):
        self.script, self.requests = list(script), []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner.requests.append(self.path)
                status, headers, body, then = owner.script.pop(0) if owner.script else (200, {}, b"ok", "keep")
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if then == "short" else body)
                self.wfile.flush()
                if then in ("close", "short"):
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def make(script):
        servers.append(Scripted(script))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


SLOW_DOWN = (503, {}, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>", "keep")


def test_throttling_is_retried_within_the_attempts_and_every_attempt_is_reported(scripted):
    server = scripted([SLOW_DOWN, SLOW_DOWN, (200, {}, b"body", "keep")])
    seen = []
    client = PublicBucket("b", endpoint_url=server.url, region="us-east-1", attempts=3,
                          on_attempt=lambda response=None, caught_exception=None, **_: seen.append(response[0].status_code))
    assert client.get_object(Bucket="b", Key="k")["Body"].read() == b"body"
    assert seen == [503, 503, 200] and server.requests == ["/b/k"] * 3
    server = scripted([SLOW_DOWN, SLOW_DOWN])
    with pytest.raises(ClientError) as error:
        PublicBucket("b", endpoint_url=server.url, region="us-east-1", attempts=2).get_object(Bucket="b", Key="k")
    assert error.value.response["Error"]["Code"] == "SlowDown" and len(server.requests) == 2


def test_a_short_body_is_botocores_incomplete_read_and_its_connection_is_not_reused(scripted):
    server = scripted([(200, {}, b"x" * 100, "short"), (200, {}, b"y" * 10, "keep")])
    client = PublicBucket("b", endpoint_url=server.url, region="us-east-1", attempts=1)
    with pytest.raises(IncompleteReadError):
        b"".join(client.get_object(Bucket="b", Key="k")["Body"].iter_chunks(16))
    assert client.get_object(Bucket="b", Key="k")["Body"].read() == b"y" * 10


def test_a_kept_alive_connection_the_server_dropped_is_replaced_without_using_an_attempt(scripted):
    server = scripted([(200, {}, b"a", "close"), (200, {}, b"b", "close"), (200, {}, b"c", "keep")])
    client = PublicBucket("b", endpoint_url=server.url, region="us-east-1", attempts=1)
    assert [client.get_object(Bucket="b", Key=k)["Body"].read() for k in "xyz"] == [b"a", b"b", b"c"]


def test_s3s_redirect_to_the_buckets_region_is_followed_once(scripted, monkeypatch):
    moved = (301, {"x-amz-bucket-region": "eu-west-1"},
             b"<Error><Code>PermanentRedirect</Code><Message>use the right endpoint</Message></Error>", "keep")
    server = scripted([moved, (200, {}, b"here", "keep")])
    client = PublicBucket("b", endpoint_url=server.url, region="us-east-1", attempts=1)
    client.custom = False  # as on AWS, but the requests still go to the local server
    regions = []
    monkeypatch.setattr(client, "_endpoint", lambda url, region: (regions.append(region), setattr(client, "region", region)))
    assert client.get_object(Bucket="b", Key="k")["Body"].read() == b"here" and regions == ["eu-west-1"]
    server.script = [moved, moved]
    with pytest.raises(ClientError, match="PermanentRedirect"):  # the same region again: not followed twice
        client.get_object(Bucket="b", Key="k")


def test_a_connection_to_the_host_a_redirect_left_behind_is_not_reused(scripted):
    server = scripted([(200, {}, b"old host", "keep"), (200, {}, b"new host", "keep")])
    client = PublicBucket("b", endpoint_url=server.url, region="us-east-1")
    body = client.get_object(Bucket="b", Key="k")["Body"]  # in flight while another thread follows a redirect
    client.host = "localhost"  # what _endpoint sets: the same server under another name
    assert body.read() == b"old host" and not client._idle
    assert client.get_object(Bucket="b", Key="k")["Body"].read() == b"new host"
    assert [c.host for c in client._idle] == ["localhost"]


def test_addresses_virtual_hosted_on_aws_and_path_style_elsewhere():
    aws = PublicBucket("aft-vbi-pds", endpoint_url=None, region="us-east-1")
    assert (aws.endpoint_url, aws.prefix) == ("https://aft-vbi-pds.s3.us-east-1.amazonaws.com", "/")
    dotted = PublicBucket("my.bucket", endpoint_url=None, region="eu-west-1")
    assert (dotted.endpoint_url, dotted.prefix) == ("https://s3.eu-west-1.amazonaws.com", "/my.bucket/")
    assert PublicBucket("b", endpoint_url=None, region="cn-north-1").endpoint_url == "https://b.s3.cn-north-1.amazonaws.com.cn"
    custom = PublicBucket("b", endpoint_url="http://127.0.0.1:9000/base/", region="us-east-1")
    assert (custom.endpoint_url, custom.prefix) == ("http://127.0.0.1:9000", "/base/b/")


def test_only_anonymous_reads_without_a_proxy_take_the_lean_path(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    assert usable(None, True) and usable("http://127.0.0.1:9000", True)
    assert not usable(None, False) and not usable("http://127.0.0.1:9000", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert not usable(None, True) and usable("http://127.0.0.1:9000", True)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert not usable("http://127.0.0.1:9000", True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert usable("http://127.0.0.1:9000", True)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example.com")
    assert not usable(None, True)  # botocore's endpoint rules apply: stay on boto3


def test_the_source_reads_anonymously_with_it_and_signed_with_boto3(make_settings):
    from bincount.data.fetch import fetch
    from bincount.data.source import open_source

    assert isinstance(open_source(make_settings()).reader, PublicBucket)
    signed = make_settings(data__unsigned=False, data__ids="1-4")
    assert not isinstance(open_source(signed).reader, PublicBucket)
    result = fetch(signed)  # credentials (the tests' fake ones) and SigV4 through boto3, as before
    assert result.items == 4 and result.fetched == 4


def test_a_get_costs_well_under_half_the_cpu_of_botocores(s3_server, abid_bucket):
    bucket = abid_bucket.removeprefix("s3://")
    lean, boto = PublicBucket(bucket, endpoint_url=s3_server, region="us-east-1"), boto3_client(s3_server)
    keys = [f"metadata/{i:05d}.json" for i in range(1, 41)]

    def cpu(get) -> float:  # this thread's CPU only: moto serves from other threads
        for key in keys[:5]:
            get(key)
        started = time.thread_time()
        for key in keys:
            get(key)
        return time.thread_time() - started

    costs = [(cpu(lambda k: lean.get_object(Bucket=bucket, Key=k)["Body"].read()),
              cpu(lambda k: boto.get_object(Bucket=bucket, Key=k)["Body"].read())) for _ in range(3)]
    lean_s, boto_s = min(c[0] for c in costs), min(c[1] for c in costs)
    assert lean_s < 0.5 * boto_s, f"lean {lean_s * 25:.2f} ms vs botocore {boto_s * 25:.2f} ms per GET"
