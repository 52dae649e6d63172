"""`bincount audit --backend sagemaker`: a SageMaker Batch Transform job over the bins, joined into the audit report.

No endpoint is kept running: the job starts instances, sends each image object to the same
code/inference.py the endpoints run (one model.tar.gz serves real-time, serverless and batch), writes
one `<object>.out` per input and stops. The request:
  model       a PyTorchModel of the trained artifact, as `deploy` builds it (CreateModel), or the model an
              earlier audit recorded for the same artifact (reused, no CreateModel)
  input       S3DataType ManifestFile: a manifest object listing exactly the bins' images (so a selection
              from the public bucket, or images beside label files, transform nothing else), content type
              image/jpeg, SplitType None (each object is one image, one record)
  output      s3://<s3.bucket>/<s3.prefix>/transform/<job>/<path under the manifest prefix>.out, JSON
  resources   transform.instance_type x transform.instance_count; MaxPayloadInMB, MaxConcurrentTransforms,
              BatchStrategy and the invocation timeout from the transform settings
Transform jobs read S3 in their own region: the images' bucket must be in sagemaker.region, and the
execution role must be allowed to read it (the public ABID bucket is in us-east-1).

It waits (DescribeTransformJob every transform.poll_s, at most transform.max_wait_s) and joins the
outputs with the expected quantities into the local audit's ranked CSV and summary; with --no-wait it
returns at once, `bincount status` shows the job, and `audit --collect` (or the same audit again) joins
it once done. A bin without an output, or whose output is not a prediction, is listed as an error.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bincount.audit.core import AuditResult, Bin, Inputs, Reader, chunks, options, read_records, report, runner_up
from bincount.audit.trust import assess
from bincount.aws import Aws
from bincount.backends.sagemaker import jobs
from bincount.backends.sagemaker.endpoint import model_ref, resolve_model_data, serving_code
from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.results import Result, key_value_table
from bincount.state import SageMakerTransform
from bincount.workspace import Workspace

TERMINAL = ("Completed", "Failed", "Stopped")
CONTENT_TYPE = "image/jpeg"
JOIN_WORKERS = 16


class TransformResult(Result):
    """A Batch Transform job that has not ended yet (--no-wait, or the wait ran out)."""

    job: str  # the Batch Transform job's name
    status: str  # SageMaker's TransformJobStatus, one not ended yet (InProgress or Stopping)
    bins: int  # how many bins the job scores
    model_name: str  # the SageMaker model it runs
    input_manifest: str  # s3:// URI of the job's input ManifestFile
    output_path: str  # s3:// prefix of its outputs: one <entry>.out per input object
    note: str  # how to follow the job and join its outputs once it has ended

    def title(self) -> str:
        return "audit (sagemaker batch transform)"

    def rich(self) -> Any:
        table = key_value_table(title=f"transform job {self.job}: {self.status}")
        for key in ("bins", "model_name", "input_manifest", "output_path", "note"):
            table.add_row(key, str(getattr(self, key)))
        return table


# -- the request -----------------------------------------------------------------------------------
def job_name(settings: Settings) -> str:
    """<base>-audit-yyyymmdd-HHMMSS-xxxx: unique, within SageMaker's 63 characters."""
    import secrets

    return f"{settings.sagemaker.base_job_name[:30].rstrip('-')}-audit-{jobs.timestamp()}-{secrets.token_hex(2)}"


def _bucket_region(settings: Settings, bucket: str) -> str:
    from bincount.aws import is_source_bucket, job_region

    if is_source_bucket(settings, bucket):
        return settings.data.region
    return settings.s3.region or job_region(settings)


def common_prefix(prefix: str | None, key: str) -> str:
    """The longest folder prefix ("" or ending in /) shared by `prefix` (None: none yet) and `key`'s folder."""
    folder = key.rsplit("/", 1)[0] + "/" if "/" in key else ""
    if prefix is None:
        return folder
    while not folder.startswith(prefix):
        prefix = prefix[:-1].rsplit("/", 1)[0] + "/" if prefix.count("/") > 1 else ""
    return prefix


def write_selection(settings: Settings, inputs: Inputs, folder: Path) -> tuple[str, str, int]:
    """bins.jsonl (every bin, for the join) in `folder`, and the transform manifest's text; (bucket, prefix, count)."""
    from bincount.aws import parse_s3_uri

    bucket, prefix, count = None, None, 0
    with (folder / "bins.jsonl").open("w") as fh:
        for b in inputs:
            if not b.path.startswith("s3://"):
                raise BincountError(f"{inputs.name}: bin {b.id} is not in S3 ({b.image}); a transform job reads S3 only: "
                                    "pass an s3:// prefix, an s3:// manifest, or a manifest of s3:// images "
                                    "(`bincount upload` puts the splits in S3)")
            b_bucket, key = parse_s3_uri(b.path)
            if bucket is None:
                bucket = b_bucket
            elif b_bucket != bucket:
                raise BincountError(f"{inputs.name}: bins in two buckets ({bucket}, {b_bucket}); one transform job reads "
                                    "one manifest prefix: audit each bucket separately")
            prefix = common_prefix(prefix, key)
            fh.write(json.dumps({"n": b.n, "id": b.id, "image": b.image, "path": b.path, "expected": b.expected,
                                 "label": b.label}) + "\n")
            count += 1
    with (folder / "input.manifest").open("w") as out, (folder / "bins.jsonl").open() as fh:
        out.write("[" + json.dumps({"prefix": f"s3://{bucket}/{prefix}"}))
        for line in fh:
            out.write(",\n" + json.dumps(parse_s3_uri(json.loads(line)["path"])[1][len(prefix):]))
        out.write("]\n")
    return bucket, prefix, count


def _output_path(settings: Settings, job: str) -> str:
    return jobs.s3_uri(settings, "transform", job) + "/"


def _transformer(settings: Settings, sm_session: Any, output_path: str,
                 recorded: SageMakerTransform | None) -> tuple[Any, str, str]:
    """A Transformer over the trained model; (transformer, model name, model data). CreateModel only when needed."""
    from sagemaker.pytorch import PyTorchModel
    from sagemaker.transformer import Transformer

    t = settings.transform
    options = dict(instance_count=t.instance_count, instance_type=t.instance_type, strategy=t.batch_strategy,
                   output_path=output_path, accept="application/json", max_concurrent_transforms=t.max_concurrent_transforms,
                   max_payload=t.max_payload_mb, tags=jobs.tags(settings))
    ref = model_ref(settings)
    if recorded and ref and recorded.model_ref == ref:
        name = recorded.model_name
        try:
            sm_session.sagemaker_client.describe_model(ModelName=name)
            log(f"reusing SageMaker model {name} (same artifact)")
            return Transformer(model_name=name, sagemaker_session=sm_session, **options), name, recorded.model_data
        except Exception:  # noqa: BLE001 - deleted since: create it again
            pass
    model_data = resolve_model_data(settings, sm_session)
    name = f"{settings.sagemaker.base_job_name[:30].rstrip('-')}-audit-model-{jobs.timestamp()}"
    with tempfile.TemporaryDirectory() as serving_dir:
        model = PyTorchModel(model_data=model_data, role=jobs.require_role(settings), entry_point="inference.py",
                             source_dir=str(serving_code(Path(serving_dir))),
                             framework_version=settings.deploy.framework_version, py_version=settings.deploy.py_version,
                             name=name, sagemaker_session=sm_session)
        transformer = model.transformer(**options)
    return transformer, name, model_data


def start(aws: Aws, inputs: Inputs) -> SageMakerTransform:
    """Write and upload the manifest, CreateModel if needed, CreateTransformJob; the transform record (in state.json)."""
    from bincount.aws import parse_s3_uri

    settings = aws.settings
    jobs.load_sdk()
    ws = Workspace(settings.workdir)
    job = job_name(settings)
    folder = ws.reports / "transform" / job
    folder.mkdir(parents=True, exist_ok=True)
    bucket, prefix, count = write_selection(settings, inputs, folder)
    region, jobs_in = _bucket_region(settings, bucket), aws.job_region
    if region != jobs_in:
        raise BincountError(f"the bins are in s3://{bucket} ({region}) but transform jobs run in sagemaker.region "
                            f"{jobs_in} and read S3 in their own region: use "
                            f"--set sagemaker.region={region}, or copy the images to a bucket in {jobs_in}")
    manifest_uri = jobs.s3_uri(settings, "transform", "input", f"{job}.manifest")
    out_bucket, out_key = parse_s3_uri(manifest_uri)
    with jobs.aws_errors("sagemaker audit"), jobs.sdk_output():
        aws.s3(max_pool_connections=JOIN_WORKERS).upload_file(str(folder / "input.manifest"), out_bucket, out_key)
        sm_session = jobs.session(aws)
        recorded = ws.state().transform
        output_path = _output_path(settings, job)
        transformer, model_name, model_data = _transformer(settings, sm_session, output_path, recorded)
        client_config = {"InvocationsMaxRetries": 1}
        if settings.transform.invocation_timeout_s:
            client_config["InvocationsTimeoutInSeconds"] = settings.transform.invocation_timeout_s
        transformer.transform(manifest_uri, data_type="ManifestFile", content_type=CONTENT_TYPE, split_type="None",
                              job_name=job, model_client_config=client_config, wait=False, logs=False)
    record = SageMakerTransform(job=job, status="InProgress", model_name=model_name, model_data=model_data,
                                model_ref=model_ref(settings), input_manifest=manifest_uri,
                                input_prefix=f"s3://{bucket}/{prefix}", input_key_prefix=prefix, output_path=output_path,
                                bins=count, bins_file=str(folder / "bins.jsonl"), source=inputs.name,
                                source_digest=inputs.digest)
    ws.update_state(transform=record)
    log(f"transform job [bold]{job}[/] started: {count} bins on {settings.transform.instance_count} x "
        f"{settings.transform.instance_type}")
    return record


# -- waiting and joining ---------------------------------------------------------------------------
def describe(aws: Aws, job: str) -> dict[str, Any]:
    with jobs.aws_errors(f"describe transform job {job}"):
        return aws.client("sagemaker", region=aws.job_region, max_attempts=4).describe_transform_job(
            TransformJobName=job)


def wait(aws: Aws, job: str) -> dict[str, Any]:
    """Poll DescribeTransformJob until the job ends or transform.max_wait_s passes; the last description."""
    t = aws.settings.transform
    started, last = time.monotonic(), None
    while True:
        desc = describe(aws, job)
        status = desc.get("TransformJobStatus", "?")
        if status != last:
            log(f"transform job {job}: {status} ({time.monotonic() - started:.0f} s)")
            last = status
        if status in TERMINAL or time.monotonic() - started + t.poll_s > t.max_wait_s:
            return desc
        time.sleep(t.poll_s)


def _read_output(s3: Any, uri: str) -> dict[str, Any]:
    from bincount.aws import parse_s3_uri

    bucket, key = parse_s3_uri(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read(1 << 20)
    except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404"):
            raise LookupError("no output") from None
        raise ValueError(f"cannot read {uri}: {code or type(exc).__name__}") from None
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"output is not JSON: {body[:80]!r}") from None
    if isinstance(answer, list) and len(answer) == 1:
        answer = answer[0]
    if not isinstance(answer, dict) or "count" not in answer or "confidence" not in answer:
        message = answer.get("error") or answer.get("message") if isinstance(answer, dict) else None
        raise ValueError(f"output is not a prediction: {message or str(answer)[:80]}")
    return answer


def join(aws: Aws, record: SageMakerTransform, desc: dict[str, Any], *, threshold: float, out: Path,
         top: int) -> AuditResult:
    """Each bin with its <name>.out (read concurrently) and expected quantity, ranked into the audit report."""
    from bincount.aws import parse_s3_uri

    status = desc.get("TransformJobStatus", "?")
    why = f"no output (job {status}" + (f": {desc['FailureReason']}" if desc.get("FailureReason") else "") + ")"
    s3, reader = aws.s3(max_pool_connections=JOIN_WORKERS), Reader(aws.settings)
    prefix = record.input_key_prefix
    output = record.output_path.rstrip("/") + "/"

    def score(bins: list[Bin]) -> list[dict[str, Any]]:
        rows = []
        for b in bins:
            row = {"n": b.n, "id": b.id, "image": b.image, "expected": b.expected, "predicted": None,
                   "confidence": None, "error": None, "path": b.path}
            try:
                if b.expected is None:
                    row["expected"] = reader.expected(b.label)
                answer = _read_output(s3, output + parse_s3_uri(b.path)[1][len(prefix):] + ".out")
                row.update(predicted=int(answer["count"]), confidence=float(answer["confidence"]),
                           **runner_up(answer.get("probabilities"), int(answer["count"])))
            except LookupError:
                row["error"] = why
            except (ValueError, TypeError, KeyError) as exc:
                row["error"] = str(exc)
            rows.append(row)
        return rows

    def bins() -> Any:
        for line in read_records(Path(record.bins_file)):
            yield Bin(line["n"], line["id"], line["image"], line["path"], line["expected"], line.get("label"))

    from bincount.console import progress
    from bincount.data.source import bounded_map

    results = Path(record.bins_file).with_name("results.jsonl")
    with progress(transient=True) as bar, results.open("w") as fh:
        task = bar.add_task("join outputs", total=record.bins)
        for _, rows in bounded_map(score, chunks(bins(), 16), JOIN_WORKERS):
            for row in rows:
                fh.write(json.dumps(row) + "\n")
                bar.advance(task)
    return report(read_records(results), out, source=record.source,
                  target=f"SageMaker Batch Transform job {record.job} ({status})", threshold=threshold, top=top,
                  total=record.bins, settings=aws.settings,
                  quality=assess(aws.settings, f"SageMaker model of job {record.job}", threshold))


# -- the stage ------------------------------------------------------------------------------------
def audit(settings: Settings, manifest: Path | None = None, threshold: float = 0.6, endpoint: str | None = None,
          model: Path | None = None, out: Path | None = None, top: int | None = None, source: str | None = None,
          collect: bool = False) -> AuditResult | TransformResult:
    """`bincount audit --backend sagemaker`: a Batch Transform audit; with --endpoint or --model, the local one."""
    source, out, top = options(settings, manifest, source, threshold, out, top)
    if endpoint or model:
        from bincount.audit.local import audit_local

        return audit_local(settings, source, threshold=threshold, endpoint=endpoint, model=model, out=out, top=top)
    return batch_audit(settings, source, threshold=threshold, out=out, top=top, collect=collect)


def batch_audit(settings: Settings, source: str | Path | None, *, threshold: float, out: Path, top: int,
                collect: bool = False) -> AuditResult | TransformResult:
    """Run (or join) a Batch Transform audit; see the module docstring."""
    aws, ws = Aws(settings), Workspace(settings.workdir)
    recorded = ws.state().transform
    if collect:
        if recorded is None:
            raise BincountError("no Batch Transform job recorded in state.json: run `bincount audit --backend sagemaker` first")
        if source is not None and str(source) != recorded.source:
            raise BincountError(f"--collect joins the recorded job over {recorded.source}, not {source}")
        record = recorded
    else:
        inputs = Inputs(settings, source if source is not None else default_source(settings))
        if recorded is not None and recorded.source_digest == inputs.digest and not recorded.joined:
            log(f"joining transform job {recorded.job}, started earlier over the same bins")
            record = recorded
        else:
            record = start(aws, inputs)
    try:
        desc = wait(aws, record.job) if settings.transform.wait else describe(aws, record.job)
    except KeyboardInterrupt:
        client = aws.client("sagemaker", region=aws.job_region)
        jobs.interrupted("transform", record.job, lambda: jobs.stop_job(client, "transform", record.job))
    status = desc.get("TransformJobStatus", "?")
    record = record.model_copy(update={"status": status})
    ws.update_state(transform=record)
    if status not in TERMINAL:
        note = ("bincount status shows it; run `bincount audit --backend sagemaker --collect` to join its outputs "
                "once it has ended")
        return TransformResult(job=record.job, status=status, bins=record.bins, model_name=record.model_name,
                               input_manifest=record.input_manifest, output_path=record.output_path, note=note)
    result = join(aws, record, desc, threshold=threshold, out=out, top=top)
    ws.update_state(transform=record.model_copy(update={"joined": True}))
    return result


def default_source(settings: Settings) -> str:
    """The uploaded test channel's manifest (its images are beside it in S3)."""
    channel = Workspace(settings.workdir).state().channels.get("test")
    if not channel:
        raise BincountError("say which bins to audit: --source s3://bucket/prefix (bucket layout), an s3:// or local "
                            "manifest of s3:// images, or run `bincount upload` to audit the test split")
    return channel.rstrip("/") + "/manifest.jsonl"
