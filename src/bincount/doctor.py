"""`bincount doctor`: check the AWS setup before any money is spent, one line per check.

credentials (sts get-caller-identity), one region for jobs and bucket, the role (exists, SageMaker may
assume it), the bucket (reachable, in the jobs' region), the instance types against the mode (GPU for
DDP), the pretrained weights, and the service quota for the training instance type where the Service
Quotas API answers. A check that cannot be made reads "unknown" and does not fail the run; a failed
check makes the exit code 1.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel

from bincount.config import Settings
from bincount.results import Result

Status = Literal["ok", "fail", "unknown", "skip"]


class Check(BaseModel):
    check: str
    status: Status
    detail: str


class DoctorResult(Result):
    checks: list[Check]

    @property
    def exit_code(self) -> int:
        return 1 if any(c.status == "fail" for c in self.checks) else 0

    def rich(self) -> Any:
        from rich.table import Table

        table = Table(title="bincount doctor (AWS setup)", title_justify="left", show_header=False)
        for column in ("check", "status", "detail"):
            table.add_column(column)
        styles = {"ok": "green", "fail": "bold red", "unknown": "yellow", "skip": "dim"}
        for c in self.checks:
            table.add_row(c.check, c.status, c.detail, style=styles[c.status])
        return table


def _reason(exc: Exception) -> str:
    from bincount.aws import error_code, error_message

    if error_code(exc):
        return f"{error_code(exc)}: {error_message(exc) or ''}".rstrip(": ")
    return " ".join(str(exc).split()) or type(exc).__name__


def _trusts_sagemaker(policy: Any) -> bool:
    """Whether a trust policy lets sagemaker.amazonaws.com call sts:AssumeRole."""
    if isinstance(policy, str):
        from urllib.parse import unquote

        policy = json.loads(unquote(policy))
    statements = policy.get("Statement", [])
    for st in statements if isinstance(statements, list) else [statements]:
        actions = st.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        services = (st.get("Principal") or {}).get("Service", []) if isinstance(st.get("Principal"), dict) else []
        services = [services] if isinstance(services, str) else services
        if (st.get("Effect") == "Allow" and any(a in ("sts:AssumeRole", "sts:*", "*") for a in actions)
                and "sagemaker.amazonaws.com" in services):
            return True
    return False


def _imagenet_cache(arch: str):
    from pathlib import Path

    import torch
    import torchvision.models as models

    url = models.get_model_weights(arch).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


class _Doctor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.checks: list[Check] = []
        self.account: str | None = None
        self.region: str | None = None

    def add(self, check: str, status: Status, detail: str) -> None:
        self.checks.append(Check(check=check, status=status, detail=detail))

    def client(self, service: str) -> Any:
        from bincount.aws import client, s3_client

        if service == "s3":  # the work bucket's client
            return s3_client(self.settings, max_attempts=2)
        return client(service, region=self.region, max_attempts=2)

    def credentials(self) -> None:
        try:
            who = self.client("sts").get_caller_identity()
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            from botocore.exceptions import NoCredentialsError

            detail = "no AWS credentials found (a profile or AWS_* variables)" if isinstance(exc, NoCredentialsError) else _reason(exc)
            self.add("credentials", "fail", detail)
            return
        self.account = who["Account"]
        self.add("credentials", "ok", f"account {who['Account']} as {who['Arn']}")

    def regions(self) -> None:
        from bincount.aws import job_region, region_source, resolve_region
        from bincount.errors import BincountError

        try:
            self.region = job_region(self.settings)
        except BincountError as exc:
            self.region = resolve_region(self.settings.sagemaker.region)
            self.add("region", "fail", str(exc))
            return
        self.add("region", "ok", f"{self.region} (from {region_source(self.settings.sagemaker.region)}) for jobs, endpoints and the bucket")

    def role(self) -> None:
        arn = self.settings.sagemaker.role
        if not arn:
            self.add("role", "fail", "sagemaker.role is not set (an IAM role ARN SageMaker can assume)")
            return
        account = arn.split(":")[4]
        if self.account and account != self.account:
            self.add("role", "fail", f"{arn} is in account {account}, the credentials in {self.account}")
            return
        name = arn.rsplit("/", 1)[-1]
        try:
            role = self.client("iam").get_role(RoleName=name)["Role"]
        except Exception as exc:  # noqa: BLE001
            from bincount.aws import error_code

            status: Status = "fail" if error_code(exc) == "NoSuchEntity" else "unknown"
            self.add("role", status, f"{arn}: {_reason(exc)}")
            return
        if role["Arn"] != arn:
            self.add("role", "fail", f"{arn} does not exist (the role named {name} is {role['Arn']})")
        elif not _trusts_sagemaker(role.get("AssumeRolePolicyDocument") or {}):
            self.add("role", "fail", f"{name}: its trust policy does not let sagemaker.amazonaws.com assume it")
        else:
            self.add("role", "ok", f"{name} exists and SageMaker may assume it")

    def bucket(self) -> None:
        from bincount.aws import bucket_region

        bucket = self.settings.s3.bucket
        if not bucket:
            self.add("bucket", "fail", "s3.bucket is not set")
            return
        s3 = self.client("s3")
        try:
            s3.head_bucket(Bucket=bucket)
            found = bucket_region(s3, bucket)
        except Exception as exc:  # noqa: BLE001
            self.add("bucket", "fail", f"s3://{bucket}: {_reason(exc)}")
            return
        if found != self.region:
            self.add("bucket", "fail", f"s3://{bucket} is in {found}, the jobs in {self.region}")
        else:
            self.add("bucket", "ok", f"s3://{bucket} is reachable, in {found}")

    def instances(self) -> None:
        from bincount.backends.sagemaker.estimator import check_instances, is_gpu_instance
        from bincount.errors import BincountError

        sm = self.settings.sagemaker
        try:
            check_instances(self.settings)
        except BincountError as exc:
            self.add("training instance", "fail", str(exc))
            return
        kind = "GPU" if is_gpu_instance(sm.instance_type) else "CPU (no CUDA: training runs on the CPU)"
        ddp = f", {sm.instance_count} instances under torch_distributed" if sm.instance_count > 1 else ""
        self.add("training instance", "ok", f"{sm.instance_type}: {kind}{ddp}")
        d = self.settings.deploy
        if d.mode == "serverless":
            self.add("endpoint", "ok", f"serverless, {d.memory_size_mb} MB, up to {d.max_concurrency} at once")
        else:
            self.add("endpoint", "ok", f"{d.instance_count} x {d.instance_type} "
                     f"({'GPU' if is_gpu_instance(d.instance_type) else 'CPU'} inference image)")

    def weights(self) -> None:
        pretrained = self.settings.train.pretrained
        if pretrained == "none":
            self.add("pretrained weights", "skip", "train.pretrained=none (trained from scratch)")
        elif pretrained.startswith("s3://"):
            from bincount.aws import parse_s3_uri

            bucket, key = parse_s3_uri(pretrained)
            try:
                size = self.client("s3").head_object(Bucket=bucket, Key=key)["ContentLength"]
            except Exception as exc:  # noqa: BLE001
                self.add("pretrained weights", "fail", f"{pretrained}: {_reason(exc)}")
                return
            self.add("pretrained weights", "ok", f"{pretrained} ({size / 2**20:.1f} MiB)")
        elif pretrained == "imagenet":
            cache = _imagenet_cache(self.settings.train.arch)
            if cache.is_file():
                self.add("pretrained weights", "ok", f"ImageNet {self.settings.train.arch} cached at {cache} (the job's weights channel)")
            elif self.settings.sagemaker.enable_network_isolation:
                self.add("pretrained weights", "fail", f"ImageNet weights not cached at {cache} and a network-isolated "
                         "job cannot download them")
            else:
                self.add("pretrained weights", "ok", f"ImageNet weights not cached here: the job downloads them")
        else:
            from pathlib import Path

            path = Path(pretrained)
            status: Status = "ok" if path.is_file() else "fail"
            self.add("pretrained weights", status, f"{path} {'exists' if status == 'ok' else 'not found'}")

    def quota(self) -> None:
        """The account's applied quota "<type> for training job usage" (spot: "... for spot training job usage")."""
        sm = self.settings.sagemaker
        name = f"{sm.instance_type} for {'spot ' if sm.use_spot_instances else ''}training job usage"
        try:
            paginator = self.client("service-quotas").get_paginator("list_service_quotas")
            value = None
            for page in paginator.paginate(ServiceCode="sagemaker"):
                for quota in page.get("Quotas", []):
                    if quota.get("QuotaName") == name:
                        value = quota.get("Value")
                if value is not None:
                    break
        except Exception as exc:  # noqa: BLE001 - no permission, or an endpoint without the API
            self.add("quota", "unknown", f"{name}: the Service Quotas API did not answer ({_reason(exc)})")
            return
        if value is None:
            self.add("quota", "unknown", f"no quota named {name!r} in the Service Quotas list")
        elif value < sm.instance_count:
            self.add("quota", "fail", f"{name} is {value:g}, the job needs {sm.instance_count}: request an increase "
                     "in the Service Quotas console")
        else:
            self.add("quota", "ok", f"{name}: {value:g} (the job needs {sm.instance_count})")


def doctor(settings: Settings) -> DoctorResult:
    """Check credentials, region, role, bucket, instance types, weights and quota; one line each."""
    d = _Doctor(settings)
    d.regions()
    d.credentials()
    d.role()
    d.bucket()
    d.instances()
    d.weights()
    d.quota()
    return DoctorResult(checks=d.checks)
