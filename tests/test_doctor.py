"""`bincount doctor` against moto's STS, IAM and S3 (moto has no Service Quotas: that check reads unknown)."""

from __future__ import annotations

import json

import pytest

TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


@pytest.fixture
def aws(monkeypatch):
    """moto's STS/IAM/S3: a role SageMaker may assume, one it may not, and a bucket in us-east-1."""
    from moto import mock_aws

    for name in ("AWS_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        import boto3

        iam = boto3.client("iam", region_name="us-east-1")
        role = iam.create_role(RoleName="SageMakerRole", AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]["Arn"]
        ec2_trust = json.loads(json.dumps(TRUST).replace("sagemaker", "ec2"))
        other = iam.create_role(RoleName="Ec2Role", AssumeRolePolicyDocument=json.dumps(ec2_trust))["Role"]["Arn"]
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bincount-ok")
        boto3.client("s3", region_name="eu-west-1").create_bucket(
            Bucket="bincount-eu", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        yield {"role": role, "ec2_role": other}


def run(cli, tmp_path, *sets):
    args = ["doctor", "--workdir", tmp_path, "--json"]
    for s in sets:
        args += ["--set", s]
    out = cli(*args)
    return out.exit_code, {c["check"]: c for c in json.loads(out.stdout)["checks"]}


def test_a_good_setup_passes_and_the_quota_is_unknown(aws, cli, tmp_path):
    code, checks = run(cli, tmp_path, f"sagemaker.role={aws['role']}", "s3.bucket=bincount-ok")
    assert code == 0, checks
    assert checks["credentials"]["status"] == "ok" and "123456789012" in checks["credentials"]["detail"]
    assert checks["region"]["status"] == "ok" and "us-east-1 (from AWS_DEFAULT_REGION)" in checks["region"]["detail"]
    assert checks["role"]["status"] == "ok" and checks["bucket"]["status"] == "ok"
    assert checks["training instance"]["status"] == "ok" and "GPU" in checks["training instance"]["detail"]
    assert checks["pretrained weights"]["status"] == "skip"
    assert checks["quota"]["status"] == "unknown" and "ml.g4dn.xlarge for training job usage" in checks["quota"]["detail"]

    out = cli("doctor", "--workdir", tmp_path, "--set", f"sagemaker.role={aws['role']}", "--set", "s3.bucket=bincount-ok")
    assert out.exit_code == 0 and "credentials" in out.stdout and "quota" in out.stdout


@pytest.mark.parametrize("sets, check, message", [
    (["sagemaker.role=arn:aws:iam::123456789012:role/Missing"], "role", "NoSuchEntity"),
    (["sagemaker.role={ec2_role}"], "role", "does not let sagemaker.amazonaws.com"),
    (["sagemaker.role=arn:aws:iam::999999999999:role/SageMakerRole"], "role", "account 999999999999"),
    (["s3.bucket=bincount-eu"], "bucket", "is in eu-west-1, the jobs in us-east-1"),
    (["s3.bucket=no-such-bucket"], "bucket", "s3://no-such-bucket"),
    (["s3.region=eu-west-1"], "region", "s3.region=eu-west-1"),
    (["sagemaker.instance_count=2", "sagemaker.instance_type=ml.c5.xlarge"], "training instance", "GPU"),
    (["train.pretrained=s3://bincount-ok/weights/none.pth"], "pretrained weights", "s3://bincount-ok/weights/none.pth"),
])
def test_each_failed_check_is_one_line_and_exit_1(aws, cli, tmp_path, sets, check, message):
    base = [f"sagemaker.role={aws['role']}", "s3.bucket=bincount-ok"]
    code, checks = run(cli, tmp_path, *base, *[s.format(**aws) for s in sets])
    assert code == 1
    failed = [name for name, c in checks.items() if c["status"] == "fail"]
    assert failed == [check] and message in checks[check]["detail"]
    assert "\n" not in checks[check]["detail"]


def test_no_credentials(monkeypatch, cli, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    # botocore finds no credentials before it would send anything (and the instance metadata lookup is off)
    code, checks = run(cli, tmp_path, "s3.bucket=bincount-ok")
    assert code == 1 and checks["credentials"]["status"] == "fail"
    assert "no AWS credentials" in checks["credentials"]["detail"]
