"""Data-plane fixtures: a public bucket in the real ABID layout on the local S3 server."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from bincount.config import load_settings

PUBLIC_READ = {
    "Version": "2012-10-17",
    "Statement": [{"Sid": "PublicRead", "Effect": "Allow", "Principal": "*",
                   "Action": ["s3:GetObject", "s3:ListBucket"],
                   "Resource": ["arn:aws:s3:::{b}", "arn:aws:s3:::{b}/*"]}],
}

# Odd items beside the 120 good synthetic ones (ids 1..120): one per kind of trouble.
ODD_IDS = {
    "bad_json": "00201", "missing_image": "00202", "truncated": "00203", "missing_key": "00204",
    "out_of_range": "00205", "mismatch": "00206", "missing_label": "00207",
}


def s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _odd_items(source: Path) -> dict[str, bytes]:
    """Keys -> bodies for the odd items, built from good synthetic files."""
    jpg = (source / "bin-images" / "00001.jpg").read_bytes()
    label = {"BIN_FCSKU_DATA": {"B0X": {"asin": "B0X", "quantity": 1}}, "EXPECTED_QUANTITY": 1}
    i = ODD_IDS
    return {
        f"metadata/{i['bad_json']}.json": b'{"EXPECTED_QUANTITY": 2,',
        f"bin-images/{i['bad_json']}.jpg": jpg,
        f"metadata/{i['missing_image']}.json": json.dumps(label).encode(),
        f"metadata/{i['truncated']}.json": json.dumps(label).encode(),
        f"bin-images/{i['truncated']}.jpg": jpg[: len(jpg) // 2],
        f"metadata/{i['missing_key']}.json": json.dumps({"BIN_FCSKU_DATA": {}}).encode(),
        f"bin-images/{i['missing_key']}.jpg": jpg,
        f"metadata/{i['out_of_range']}.json": json.dumps({"BIN_FCSKU_DATA": {}, "EXPECTED_QUANTITY": 9}).encode(),
        f"bin-images/{i['out_of_range']}.jpg": jpg,
        f"metadata/{i['mismatch']}.json": json.dumps({**label, "EXPECTED_QUANTITY": 2}).encode(),
        f"bin-images/{i['mismatch']}.jpg": jpg,
        f"bin-images/{i['missing_label']}.jpg": jpg,
    }


@pytest.fixture(scope="session")
def abid_bucket(s3_server, synth_source) -> str:
    """A public-read bucket in the ABID layout: ids 1..120 good, 201..207 odd. Yields s3://abid-test."""
    client = s3(s3_server)
    bucket = "abid-test"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(PUBLIC_READ).replace("{b}", bucket))
    for path in sorted(synth_source.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            client.put_object(Bucket=bucket, Key=path.relative_to(synth_source).as_posix(), Body=path.read_bytes())
    for key, body in _odd_items(synth_source).items():
        client.upload_fileobj(io.BytesIO(body), bucket, key)
    return f"s3://{bucket}"


@pytest.fixture
def make_settings(s3_server, abid_bucket, tmp_path):
    """Settings for a fetch from the test bucket into a fresh work dir: make_settings(**dotted overrides)."""

    def make(workdir: Path | None = None, **overrides):
        dotted = {"workdir": workdir or tmp_path / "work", "data.source": abid_bucket,
                  "data.endpoint_url": s3_server, "data.workers": 8}
        dotted.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_settings(overrides=dotted, environ={})

    return make


@pytest.fixture
def count_requests(monkeypatch):
    """Count S3 GetObject calls per key of every client bincount makes; optionally fail after N image GETs."""
    from bincount.data.source import S3Source

    real = S3Source.get
    calls: list[str] = []
    fail_after = {"images": None}

    def get(self, key):  # every GET of the source, whichever client makes it (boto3 or data/s3get.py)
        calls.append(key)
        limit = fail_after["images"]
        if limit is not None and "bin-images/" in key and sum("bin-images/" in k for k in calls) > limit:
            raise RuntimeError("simulated crash")
        return real(self, key)

    monkeypatch.setattr(S3Source, "get", get)
    return calls, fail_after
