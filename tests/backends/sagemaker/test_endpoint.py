"""`deploy --backend sagemaker` under moto with IAM authorization on: credentials that may write S3 but not
use SageMaker get a one-line error before any model is uploaded (issue 20.11)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest

from bincount.errors import BincountError

_spec = importlib.util.spec_from_file_location("bincount_test_sagemaker", Path(__file__).with_name("test_sagemaker.py"))
_sagemaker_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sagemaker_tests)
sm = _sagemaker_tests.sm  # the moto SageMaker fixture with request capture (shared, not copied)
BUCKET, make_settings = _sagemaker_tests.BUCKET, _sagemaker_tests.make_settings


def test_deploy_checks_the_credentials_before_uploading_the_model(sm, tmp_path, monkeypatch):
    import boto3
    from moto import settings as moto_settings
    from moto.core.authorization import ActionAuthenticatorMixin
    from moto.core.config import default_user_config

    from bincount.backends.sagemaker import endpoint as sm_endpoint

    iam = boto3.client("iam", region_name="us-east-1")
    iam.create_user(UserName="s3-only")
    iam.put_user_policy(UserName="s3-only", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "sts:GetCallerIdentity"],
                                                "Resource": "*"}]}))
    key = iam.create_access_key(UserName="s3-only")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setitem(default_user_config["core"], "mock_credentials", False)
    # what moto's set_initial_no_auth_action_count(0) does: every request from here is authorized against IAM
    monkeypatch.setattr(ActionAuthenticatorMixin, "request_count", 0)
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)

    model = tmp_path / "model.tar.gz"
    with tarfile.open(model, "w:gz") as tar:
        info = tarfile.TarInfo("meta.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(BincountError, match="(?s)sagemaker deploy: .*AccessDenied.*sagemaker:ListEndpoints"):
        sm_endpoint.deploy(make_settings(tmp_path, **{"deploy.model_data": str(model)}))
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert "Contents" not in boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket=BUCKET)
    assert not sm.calls("CreateModel")
