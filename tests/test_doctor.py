"""`bincount doctor` against moto's STS, IAM and S3 (moto has no Service Quotas: that check reads unknown)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

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
    # moto has neither SageMaker's quotas nor iam:SimulatePrincipalPolicy: both read unknown, never fail
    assert checks["quota"]["status"] == "unknown" and "Service Quotas API did not answer" in checks["quota"]["detail"]
    assert checks["role permissions"]["status"] == "unknown"

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


# -- what moto does not have, answered the way AWS answers (botocore validates each request against the API
# model before the before-call hook sees it, so a malformed request still fails here) --------------------------

ROOT = Path(__file__).parents[1]


def readme_policy(bucket: str, account: str = "123456789012", region: str = "us-east-1") -> dict:
    """The execution role's policy exactly as the README's walk-through writes it."""
    text = (ROOT / "README.md").read_text()
    body = text.split("cat > bincount-policy.json <<JSON\n", 1)[1].split("\nJSON\n", 1)[0]
    for name, value in (("$BUCKET", bucket), ("$ACCOUNT", account), ("$AWS_REGION", region)):
        body = body.replace(name, value)
    return json.loads(body)


def allowed(policy: dict, action: str, resource: str) -> bool:
    """IAM's answer for Allow-only policies: some statement names the action and matches the resource."""
    for st in policy["Statement"]:
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        if st["Effect"] == "Allow" and any(fnmatch.fnmatchcase(action, a) for a in actions) \
                and any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


@pytest.fixture
def answers(monkeypatch):
    """Answers for iam:SimulatePrincipalPolicy (from a policy) and SageMaker's Service Quotas; records requests."""
    from botocore.awsrequest import AWSResponse

    from bincount import doctor

    state = {"policy": None, "applied": [], "defaults": [], "requests": []}
    original = doctor._Doctor.client

    def simulate(params, **_):
        state["requests"].append(("SimulatePrincipalPolicy", params))
        return {"EvaluationResults": [
            {"EvalActionName": action, "EvalResourceName": resource,
             "EvalDecision": "allowed" if allowed(state["policy"], action, resource) else "implicitDeny"}
            for action in params["ActionNames"] for resource in params["ResourceArns"]]}

    def quotas(key):
        def answer(params, **_):
            state["requests"].append((key, params))
            return {"Quotas": [{"ServiceCode": "sagemaker", "QuotaName": n, "Value": v} for n, v in state[key]]}
        return answer

    def answer(made, event: str, respond) -> None:
        # before-parameter-build sees the API parameters; before-call (after botocore has validated and
        # serialised them) short-circuits the HTTP request with the answer
        seen: list[dict] = []
        made.meta.events.register(f"before-parameter-build.{event}", lambda params, **kw: seen.append(dict(params)))
        made.meta.events.register(f"before-call.{event}", lambda **kw: (AWSResponse(None, 200, {}, None), respond(seen.pop())))

    def client(self, service):
        made = original(self, service)
        if service == "iam":
            answer(made, "iam.SimulatePrincipalPolicy", simulate)
        if service == "service-quotas":
            answer(made, "service-quotas.ListServiceQuotas", quotas("applied"))
            answer(made, "service-quotas.ListAWSDefaultServiceQuotas", quotas("defaults"))
        return made

    monkeypatch.setattr(doctor._Doctor, "client", client)
    return state


def test_the_readmes_role_policy_allows_what_the_walk_through_does(aws, answers, cli, tmp_path):
    """The Batch Transform audit of public-bucket images reads s3://aft-vbi-pds with the role: the README's
    policy must allow it (it did not), and doctor says so before a job fails with AccessDenied."""
    answers["policy"] = readme_policy("bincount-ok")
    code, checks = run(cli, tmp_path, f"sagemaker.role={aws['role']}", "s3.bucket=bincount-ok")
    assert checks["role permissions"]["status"] == "ok", checks["role permissions"]
    asked = [params for name, params in answers["requests"] if name == "SimulatePrincipalPolicy"]
    resources = {arn for params in asked for arn in params["ResourceArns"]}
    assert {"arn:aws:s3:::aft-vbi-pds", "arn:aws:s3:::bincount-ok"} <= resources
    assert any(arn.startswith("arn:aws:s3:::aft-vbi-pds/bin-images/") for arn in resources)
    assert all(params["PolicySourceArn"] == aws["role"] for params in asked)


def test_a_role_that_cannot_read_the_source_fails_in_one_line(aws, answers, cli, tmp_path):
    policy = readme_policy("bincount-ok")
    policy["Statement"] = [st for st in policy["Statement"] if "aft-vbi-pds" not in json.dumps(st)]
    answers["policy"] = policy
    code, checks = run(cli, tmp_path, f"sagemaker.role={aws['role']}", "s3.bucket=bincount-ok")
    assert code == 1 and checks["role permissions"]["status"] == "fail"
    assert "s3:GetObject on arn:aws:s3:::aft-vbi-pds/bin-images/" in checks["role permissions"]["detail"]
    assert "\n" not in checks["role permissions"]["detail"]


def test_quotas_cover_every_instance_kind_and_fall_back_to_the_default(aws, answers, cli, tmp_path):
    answers["policy"] = readme_policy("bincount-ok")
    answers["applied"] = [("ml.g4dn.xlarge for training job usage", 1.0)]
    answers["defaults"] = [("ml.g4dn.xlarge for training job usage", 0.0),
                           ("ml.m5.xlarge for processing job usage", 0.0),
                           ("ml.m5.xlarge for transform job usage", 4.0),
                           ("ml.m5.large for endpoint usage", 2.0)]
    code, checks = run(cli, tmp_path, f"sagemaker.role={aws['role']}", "s3.bucket=bincount-ok",
                       "tune.max_parallel_jobs=2")
    assert code == 1
    assert checks["quota: training"]["status"] == "ok" and "1 (applied)" in checks["quota: training"]["detail"]
    # two trials at once on one instance each: 2 needed, 1 applied
    assert checks["quota: tuning"]["status"] == "fail" and "2 needed" in checks["quota: tuning"]["detail"]
    assert checks["quota: processing (shard)"]["status"] == "fail"
    assert "0 (AWS default)" in checks["quota: processing (shard)"]["detail"]
    assert checks["quota: batch transform (audit)"]["status"] == "ok"
    assert checks["quota: endpoint"]["status"] == "ok" and "AWS default" in checks["quota: endpoint"]["detail"]
    assert {name for name, _ in answers["requests"]} >= {"applied", "defaults"}
    assert all(params["ServiceCode"] == "sagemaker" for name, params in answers["requests"] if name != "SimulatePrincipalPolicy")

    code, checks = run(cli, tmp_path, f"sagemaker.role={aws['role']}", "s3.bucket=bincount-ok", "deploy.mode=serverless")
    assert checks["quota: endpoint"]["status"] == "unknown" and "serverless" in checks["quota: endpoint"]["detail"]
