"""`bincount cleanup` in a bucket and an account shared with others (issue 22.1): it deletes only what this
work dir made. The real CLI in its own process against a real moto server (S3 and the SageMaker control
plane over HTTP on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bincount
from bincount.state import SageMakerEndpoint
from bincount.workspace import Workspace

SRC = str(Path(bincount.__file__).resolve().parents[1])
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
THEIRS = ["bincountX/other.txt", "bincount-old/keep.txt", "other/data.txt", "root.txt", "bincount.txt"]
OURS = ["bincount/channels/train/1.jpg", "bincount/output/job/model.tar.gz", "bincount/code/sourcedir.tar.gz"]


@pytest.fixture
def aws(s3_server):
    import boto3

    kw = {"endpoint_url": s3_server, "region_name": "us-east-1"}
    return boto3.client("s3", **kw), boto3.client("sagemaker", **kw)


def cleanup(workdir: Path, s3_server: str, bucket: str, *sets: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BINCOUNT_")}, "PYTHONPATH": SRC,
           "AWS_ENDPOINT_URL_SAGEMAKER": s3_server}
    args = ["cleanup", "--yes", "--json", "--workdir", str(workdir), "--set", f"s3.bucket={bucket}",
            "--set", f"s3.endpoint_url={s3_server}", "--set", "sagemaker.region=us-east-1", *sets]
    return subprocess.run([sys.executable, "-m", "bincount", *args], env=env, capture_output=True, text=True, timeout=300)


def endpoint(sm, name: str, tags: list[dict[str, str]], bucket: str = "b") -> None:
    sm.create_model(ModelName=f"{name}-model", ExecutionRoleArn=ROLE, Tags=tags,
                    PrimaryContainer={"Image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1",
                                      "ModelDataUrl": f"s3://{bucket}/{name}-model/model.tar.gz"})
    sm.create_endpoint_config(EndpointConfigName=f"{name}-config", Tags=tags, ProductionVariants=[{
        "VariantName": "AllTraffic", "ModelName": f"{name}-model", "InitialInstanceCount": 1,
        "InstanceType": "ml.m5.large"}])
    sm.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config", Tags=tags)


def names(sm) -> set[str]:
    return ({e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]}
            | {c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]}
            | {m["ModelName"] for m in sm.list_models()["Models"]})


def keys(s3, bucket: str) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}


def test_cleanup_deletes_only_what_this_work_dir_made(tmp_path, s3_server, aws):
    s3, sm = aws
    bucket = "shared-team-bucket"
    s3.create_bucket(Bucket=bucket)
    for key in THEIRS + OURS + ["bincount-ours-model/model.tar.gz"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    before = names(sm)
    ws = Workspace(tmp_path / "w")
    me = ws.identity()
    endpoint(sm, "bincount-ours", [{"Key": "bincount:workdir", "Value": me}], bucket)  # tagged, recorded below
    endpoint(sm, "bincount-earlier", [{"Key": "bincount:workdir", "Value": me}])  # tagged, no longer recorded
    endpoint(sm, "bincount-colleague", [{"Key": "bincount:workdir", "Value": "another-work-dir"}])
    endpoint(sm, "bincount-team-b", [{"Key": "team", "Value": "b"}])  # another owner's bincount-*
    ws.update_state(endpoint=SageMakerEndpoint(name="bincount-ours", mode="realtime", model_data="s3://x/m.tar.gz",
                                               config_name="bincount-ours-config", model_name="bincount-ours-model"))
    theirs = {f"{n}{s}" for n in ("bincount-colleague", "bincount-team-b") for s in ("", "-config", "-model")}

    # an empty prefix or the bucket's root as output path is refused before anything is deleted
    for bad in (("--set", "s3.prefix="), ("--set", f"sagemaker.output_path=s3://{bucket}/")):
        res = cleanup(ws.root, s3_server, bucket, *bad)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error:") and "root of" in res.stderr
        assert keys(s3, bucket) >= set(THEIRS + OURS) and len(names(sm) - before) == 12

    res = cleanup(ws.root, s3_server, bucket)
    assert res.returncode == 0, res.stderr
    assert keys(s3, bucket) == set(THEIRS)  # bincountX/ and the bucket's other owners kept
    assert names(sm) - before == theirs
    deleted = set(json.loads(res.stdout)["deleted"])
    assert {"endpoint bincount-ours", "endpoint bincount-earlier", "model bincount-earlier-model"} <= deleted
    assert Workspace(ws.root).state().endpoint is None

    res = cleanup(ws.root, s3_server, bucket)  # again: nothing of ours is left, the others' things stay
    assert res.returncode == 0 and json.loads(res.stdout)["deleted"] == [] and names(sm) - before == theirs


def test_a_work_dir_without_an_id_deletes_no_unrecorded_resources(tmp_path, s3_server, aws):
    """A work dir that never tagged anything (no id yet) takes nothing it did not record."""
    s3, sm = aws
    s3.create_bucket(Bucket="another-shared-bucket")
    endpoint(sm, "bincount-stranger", [])
    res = cleanup(tmp_path / "fresh", s3_server, "another-shared-bucket")
    assert res.returncode == 0, res.stderr
    assert {"bincount-stranger", "bincount-stranger-config", "bincount-stranger-model"} <= names(sm)
