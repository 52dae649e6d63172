"""`bincount doctor`: check the AWS setup before any money is spent, one line per check.

credentials (sts get-caller-identity), one region for jobs and bucket, the role (exists, SageMaker may
assume it, and its policies allow what the jobs do: iam:SimulatePrincipalPolicy), the bucket (reachable,
in the jobs' region), the instance types against the mode (GPU for DDP), the pretrained weights, and the
service quotas of every instance kind the settings would start (training, tuning, Processing, Batch
Transform, endpoint) where the Service Quotas API answers, the applied value or else AWS's default.
A check that cannot be made reads "unknown" and does not fail the run; a failed check makes the exit
code 1.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, Field

from bincount.config import Settings
from bincount.results import Result

Status = Literal["ok", "fail", "unknown", "skip"]


class Check(BaseModel):
    check: str = Field(description="what was checked, e.g. credentials, region, role, bucket, quota")
    status: Status = Field(description="ok, fail (makes the exit code 1), unknown (could not be checked) or skip")
    detail: str = Field(description="what was found, or why it failed or was skipped")


class DoctorResult(Result):
    checks: list[Check]  # one per check, in the order made

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
        from bincount.aws import Aws

        self.settings, self.aws = settings, Aws(settings)  # one per run: each client made once
        self.checks: list[Check] = []
        self.account: str | None = None
        self.region: str | None = None

    def add(self, check: str, status: Status, detail: str) -> None:
        self.checks.append(Check(check=check, status=status, detail=detail))

    def client(self, service: str) -> Any:
        if service == "s3":  # the work bucket's client
            return self.aws.s3(max_attempts=2)
        return self.aws.client(service, region=self.region, max_attempts=2)

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
        ddp = (f", {sm.instance_count} instances," if sm.instance_count > 1 else "") + \
            (" one training process per GPU (torch_distributed)" if is_gpu_instance(sm.instance_type) else "")
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
                self.add("pretrained weights", "ok", "ImageNet weights not cached here: the job downloads them")
        else:
            from pathlib import Path

            path = Path(pretrained)
            status: Status = "ok" if path.is_file() else "fail"
            self.add("pretrained weights", status, f"{path} {'exists' if status == 'ok' else 'not found'}")

    def permissions(self) -> None:
        """Ask IAM whether the role's policies allow what the jobs do with S3 (the policy in the README allows it)."""
        if not any(c.check == "role" and c.status == "ok" for c in self.checks):
            self.add("role permissions", "skip", "the role check did not pass")
            return
        iam = self.client("iam")
        denied: list[str] = []
        try:
            for actions, resource in role_needs(self.settings):
                found = iam.simulate_principal_policy(PolicySourceArn=self.settings.sagemaker.role,
                                                      ActionNames=actions, ResourceArns=[resource])
                denied += [f"{r['EvalActionName']} on {r.get('EvalResourceName', resource)}"
                           for r in found.get("EvaluationResults", []) if r.get("EvalDecision") != "allowed"]
        except Exception as exc:  # noqa: BLE001 - the caller may not be allowed to simulate
            self.add("role permissions", "unknown", f"iam:SimulatePrincipalPolicy did not answer ({_reason(exc)})")
            return
        if denied:
            self.add("role permissions", "fail", f"the role may not {'; '.join(denied)} (the README's policy allows it)")
        else:
            self.add("role permissions", "ok", "the role may read the sources and read/write its bucket prefix")

    def quotas(self) -> None:
        """Each instance kind the settings would start against its quota: the applied value, else AWS's default."""
        try:
            values = self._quota_values()
        except Exception as exc:  # noqa: BLE001 - no permission, or an endpoint without the API
            self.add("quota", "unknown", f"the Service Quotas API did not answer ({_reason(exc)})")
            return
        for check, name, needed in quota_needs(self.settings):
            found = values.get(name)
            if found is None:
                self.add(check, "unknown", f"no quota named {name!r} in the Service Quotas lists")
                continue
            value, source = found
            if value < needed:
                self.add(check, "fail", f"{name} is {value:g} ({source}), {needed} needed: request an increase "
                         "in the Service Quotas console")
            else:
                self.add(check, "ok", f"{name}: {value:g} ({source}), {needed} needed")

    def _quota_values(self) -> dict[str, tuple[float, str]]:
        """{quota name: (value, "applied" | "AWS default")}; an applied value wins over the default."""
        client = self.client("service-quotas")
        values: dict[str, tuple[float, str]] = {}
        for operation, source in (("list_aws_default_service_quotas", "AWS default"), ("list_service_quotas", "applied")):
            for page in client.get_paginator(operation).paginate(ServiceCode="sagemaker"):
                for quota in page.get("Quotas", []):
                    if quota.get("QuotaName") and quota.get("Value") is not None:
                        values[quota["QuotaName"]] = (float(quota["Value"]), source)
        return values


def role_needs(settings: Settings) -> list[tuple[list[str], str]]:
    """(actions, resource ARN) the execution role needs for the walk-through: its bucket prefix (channels,
    outputs, checkpoints, Debugger data, models), and read access to the data source's bucket, which a Batch
    Transform audit of public-bucket images reads with the role."""
    from bincount.aws import parse_s3_uri

    needs: list[tuple[list[str], str]] = []
    bucket = settings.s3.bucket
    if bucket:
        prefix = settings.s3.prefix.strip("/")
        needs.append((["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                      f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}doctor-check"))
        needs.append((["s3:ListBucket"], f"arn:aws:s3:::{bucket}"))
    if settings.data.source.startswith("s3://"):
        source, key = parse_s3_uri(settings.data.source)
        needs.append((["s3:GetObject"], f"arn:aws:s3:::{source}/{key + '/' if key else ''}bin-images/00004.jpg"))
        needs.append((["s3:ListBucket"], f"arn:aws:s3:::{source}"))
    return needs


def quota_needs(settings: Settings) -> list[tuple[str, str, int]]:
    """(check, Service Quotas name, instances needed at once) for everything the settings would start."""
    sm, t = settings.sagemaker, settings.sagemaker.instance_type
    spot = "spot " if sm.use_spot_instances else ""
    needs = [("quota: training", f"{t} for {spot}training job usage", sm.instance_count),
             ("quota: tuning", f"{t} for {spot}training job usage", sm.instance_count * settings.tune.max_parallel_jobs),
             ("quota: processing (shard)", f"{settings.shard.instance_type} for processing job usage",
              settings.shard.instance_count),
             ("quota: batch transform (audit)", f"{settings.transform.instance_type} for transform job usage",
              settings.transform.instance_count)]
    d = settings.deploy
    if d.mode == "serverless":
        needs.append(("quota: endpoint", "Maximum total concurrency that can be allocated across all serverless endpoints",
                      d.max_concurrency))
    else:
        needs.append(("quota: endpoint", f"{d.instance_type} for endpoint usage", d.instance_count))
    return needs


def doctor(settings: Settings) -> DoctorResult:
    """Check credentials, region, role and its permissions, bucket, instance types, weights and quotas."""
    d = _Doctor(settings)
    d.regions()
    d.credentials()
    d.role()
    d.permissions()
    d.bucket()
    d.instances()
    d.weights()
    d.quotas()
    return DoctorResult(checks=d.checks)
