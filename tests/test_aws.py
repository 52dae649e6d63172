"""bincount.aws: the error code and message of a real S3 error, and None for anything else."""

from __future__ import annotations

import pytest

from bincount.aws import client, error_code, error_message


def test_error_code_and_message_of_a_real_s3_error(s3_server):
    from botocore.exceptions import ClientError

    s3 = client("s3", endpoint_url=s3_server, max_attempts=1)
    s3.create_bucket(Bucket="aws-errors")
    with pytest.raises(ClientError) as missing_key:
        s3.get_object(Bucket="aws-errors", Key="nope")
    assert error_code(missing_key.value) == "NoSuchKey"
    assert "does not exist" in error_message(missing_key.value)
    with pytest.raises(ClientError) as missing_bucket:
        s3.head_object(Bucket="no-such-bucket-here", Key="k")  # HEAD: a bare status code, no message
    assert error_code(missing_bucket.value) == "404"

    for other in (ValueError("x"), OSError(5, "io"), type("Odd", (Exception,), {"response": "not a dict"})()):
        assert error_code(other) is None and error_message(other) is None


def test_one_s3_client_factory_picks_the_source_or_the_work_bucket_settings(monkeypatch):
    from botocore import UNSIGNED

    from bincount.aws import Aws, s3_client
    from bincount.config import load_settings

    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    settings = load_settings(overrides={
        "data.source": "s3://public-bins/abid", "data.endpoint_url": "http://127.0.0.1:9001", "data.region": "us-west-2",
        "s3.bucket": "mine", "s3.endpoint_url": "http://127.0.0.1:9002"}, environ={})
    source = s3_client(settings, "public-bins")
    assert source.meta.endpoint_url == "http://127.0.0.1:9001" and source.meta.region_name == "us-west-2"
    assert source.meta.config.signature_version is UNSIGNED
    for work in (s3_client(settings), s3_client(settings, "mine")):
        assert work.meta.endpoint_url == "http://127.0.0.1:9002" and work.meta.region_name == "eu-west-1"
        assert work.meta.config.signature_version is not UNSIGNED
    assert s3_client(settings, source=True).meta.endpoint_url == "http://127.0.0.1:9001"

    aws = Aws(settings)  # one per command: each client made once
    assert aws.s3() is aws.s3("mine") and aws.s3("public-bins") is aws.s3(source=True) is not aws.s3()
    assert aws.sagemaker is aws.sagemaker and aws.region == "eu-west-1"


def test_region_rule_and_its_source(monkeypatch, tmp_path):
    from bincount.aws import job_region, region_source, resolve_region
    from bincount.config import load_settings
    from bincount.errors import BincountError

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    assert (resolve_region(), region_source()) == ("us-east-1", "the default")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-2")
    assert (resolve_region(), region_source()) == ("eu-west-2", "AWS_DEFAULT_REGION")
    assert (resolve_region("ap-south-1"), region_source("ap-south-1")) == ("ap-south-1", "sagemaker.region")
    assert job_region(load_settings(overrides={"s3.region": "eu-west-2"}, environ={})) == "eu-west-2"
    with pytest.raises(BincountError, match="s3.region=us-west-1 but the SageMaker jobs run in eu-west-2"):
        job_region(load_settings(overrides={"s3.region": "us-west-1"}, environ={}))


def test_sessions_share_one_loader_so_a_service_model_is_parsed_once(monkeypatch):
    """Each command's sessions (the SDK's, the clients') read a service model once per process, not per session."""
    import botocore.loaders

    from bincount import aws

    parsed = []
    real = botocore.loaders.JSONFileLoader.load_file
    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file",
                        lambda self, path: parsed.append(path) or real(self, path))
    sessions = [aws.session("eu-west-1") for _ in range(3)]
    clients = [s.client("sagemaker") for s in sessions] + [aws.client("sagemaker", region="us-west-2")]
    assert sum("sagemaker" in p and "service-2" in p for p in parsed) <= 1
    assert [c.meta.region_name for c in clients] == ["eu-west-1"] * 3 + ["us-west-2"]
    paths = sessions[0]._loader.search_paths  # boto3 adds its data folder per Session: still once
    assert len(paths) == len(set(paths))
