"""`bincount shard --backend sagemaker`: a Processing job builds the shard channels bucket to bucket.

It runs container/shards.py (standard library, Pillow, boto3 only) on the PyTorch training image,
reads data.source (the public bucket) and writes s3://<s3.bucket>/<s3.prefix>/shards/<split>/, so no
image passes through this machine. Its code and item lists go under s3://<s3.bucket>/<s3.prefix>/processing/<job>/
(where `cleanup` finds them). The job is recorded in state.json (`processing`); its channels become the
recorded channels, with their format (shards), only once it has completed: `status`, `train` and `tune`
refresh it, and train and tune refuse while it runs or after it failed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from bincount.aws import Aws, parse_s3_uri
from bincount.backends.sagemaker import jobs
from bincount.config import Settings
from bincount.console import log
from bincount.data.shard import ShardResult, max_side, split_rows
from bincount.errors import BincountError
from bincount.state import SageMakerProcessing, State
from bincount.workspace import Workspace

ENDED = ("Completed", "Failed", "Stopped")


def shard(settings: Settings) -> ShardResult:
    """`bincount shard --backend sagemaker`: the Processing job's shard channels, recorded in state.json."""
    return _processing_job(settings, split_rows(Workspace(settings.workdir)))


def _processing_job(settings: Settings, rows: dict[str, list[dict]]) -> ShardResult:
    """Start (and with shard.wait, wait for) a Processing job that builds the shards from data.source in S3."""
    data, cfg, smc = settings.data, settings.shard, settings.sagemaker
    if not data.source.startswith("s3://"):
        raise BincountError(f"the sagemaker backend reads the images from S3, and data.source is {data.source}: "
                            "pass --source s3://bucket (the public one is s3://aft-vbi-pds), or shard locally")
    role = jobs.require_role(settings)
    dest = jobs.s3_uri(settings, "shards")
    side = max_side(settings)
    jobs.load_sdk()
    from sagemaker import image_uris
    from sagemaker.processing import ProcessingInput, ScriptProcessor
    from sagemaker.utils import name_from_base

    ws = Workspace(settings.workdir)
    started = time.perf_counter()
    with jobs.aws_errors("sagemaker shard"), jobs.sdk_output():
        aws = Aws(settings)
        sm_session = jobs.session(aws)
        job = name_from_base(f"{smc.base_job_name}-shards")
        # the code and the item lists (only what the job needs: id and count) under s3.prefix, not the SDK's
        # s3://<bucket>/<job>/ outside it, so that `cleanup` deletes them
        base = jobs.s3_uri(settings, "processing", job)
        bucket, key = parse_s3_uri(base)
        s3 = aws.s3()
        for split, items in rows.items():
            body = "".join(json.dumps({"id": r["id"], "count": r["count"]}) + "\n" for r in items)
            s3.put_object(Bucket=bucket, Key=f"{key}/items/{split}.jsonl", Body=body.encode())
        s3.put_object(Bucket=bucket, Key=f"{key}/code/shards.py", Body=(jobs.container_dir() / "shards.py").read_bytes())
        image = image_uris.retrieve("pytorch", sm_session.boto_region_name, version=smc.framework_version, py_version=smc.py_version,
                                    instance_type=cfg.instance_type, image_scope="training")
        processor = ScriptProcessor(
            role=role, image_uri=image, command=["python3"], instance_type=cfg.instance_type,
            instance_count=cfg.instance_count, volume_size_in_gb=cfg.volume_size_gb,
            max_runtime_in_seconds=cfg.max_runtime_s, base_job_name=f"{smc.base_job_name}-shards",
            sagemaker_session=sm_session, tags=jobs.tags(settings))
        arguments = ["--items", *(f"/opt/ml/processing/input/items/{split}.jsonl" for split in rows),
                     "--source", data.source, "--dest", dest, "--items_per_shard", str(cfg.items_per_shard),
                     "--max_side", str(side), "--quality", str(cfg.quality), "--workers", str(cfg.workers),
                     "--seed", str(cfg.seed)]
        if not data.unsigned:
            arguments.append("--signed_source")
        processor.run(code=f"{base}/code/shards.py", job_name=job, arguments=arguments, wait=False, logs=False,
                      inputs=[ProcessingInput(source=f"{base}/items", destination="/opt/ml/processing/input/items",
                                              input_name="items")])
        channels = {split: f"{dest}/{split}" for split in rows}
        ws.update_state(processing=SageMakerProcessing(job=job, status="InProgress", channels=channels))
        log(f"processing job [bold]{job}[/] started: shards to {dest} (the channels count once it has completed)")
        status = "InProgress"
        if cfg.wait:
            client = sm_session.sagemaker_client
            try:
                processor.latest_job.wait(logs=False)
            except KeyboardInterrupt:
                jobs.interrupted("processing", job, lambda: jobs.stop_job(client, "processing", job))
            except Exception as exc:  # noqa: BLE001 - a job that failed: the SDK raises; recorded and said below
                if type(exc).__name__ != "UnexpectedStatusException":
                    raise
            status = client.describe_processing_job(ProcessingJobName=job)["ProcessingJobStatus"]
            settle(ws, job, status)
            if status != "Completed":
                raise BincountError(f"processing job {job} ended {status}: see its CloudWatch logs; "
                                    "the shard channels are not recorded")
    seconds = time.perf_counter() - started
    per_shard = cfg.items_per_shard
    shards = {split: -(-len(items) // per_shard) for split, items in rows.items()}
    return ShardResult(backend="sagemaker", channels=channels, shards=shards, items=sum(map(len, rows.values())),
                       skipped=0, bytes=0, max_side=side, seconds=round(seconds, 3), items_per_second=0.0,
                       job=job, status=status)


def settle(ws: Workspace, job: str, status: str) -> State:
    """Record a status of the Processing job `job` (if it is still the recorded one); Completed makes its
    channels the recorded channels (format shards)."""
    def change(state: State) -> dict[str, Any]:
        record = state.processing
        if record is None or record.job != job:
            return {}
        out: dict[str, Any] = {"processing": record.model_copy(update={"status": status})}
        if status == "Completed" and record.status != "Completed":
            out.update(channels=record.channels, channel_format="shards")
        return out

    return ws.update_state(change)


def check_channels(aws: Aws) -> None:
    """Refuse, in one line, to train or tune while the recorded shard Processing job runs or after it failed
    (its channels would be whatever shards exist); a job that has ended since is recorded first."""
    ws = Workspace(aws.settings.workdir)
    record = ws.state().processing
    if record is None or record.status == "Completed":
        return
    if record.status not in ENDED:
        with jobs.aws_errors(f"describe processing job {record.job}"):
            client = aws.client("sagemaker", region=aws.job_region)
            status = client.describe_processing_job(ProcessingJobName=record.job)["ProcessingJobStatus"]
        record = settle(ws, record.job, status).processing or record
        if record.status == "Completed":
            log(f"processing job {record.job} has completed: its shard channels are recorded")
            return
    if record.status in ENDED:
        raise BincountError(f"the shard processing job {record.job} ended {record.status}, so its channels are "
                            "incomplete: run `bincount shard --backend sagemaker` again (or `bincount upload`)")
    raise BincountError(f"the shard processing job {record.job} is {record.status}: train once it has completed "
                        "(`bincount status` shows it; `bincount stop --job " + record.job + " --yes` stops it)")
