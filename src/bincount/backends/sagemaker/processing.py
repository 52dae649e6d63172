"""`bincount shard --backend sagemaker`: a Processing job builds the shard channels bucket to bucket.

It runs container/shards.py (standard library, Pillow, boto3 only) on the PyTorch training image,
reads data.source (the public bucket) and writes s3://<s3.bucket>/<s3.prefix>/shards/<split>/, so no
image passes through this machine. The channels go to state.json with their format (shards).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bincount.aws import Aws
from bincount.backends.sagemaker import jobs
from bincount.config import Settings
from bincount.console import log
from bincount.data.shard import ShardResult, max_side, split_rows
from bincount.errors import BincountError
from bincount.workspace import Workspace


def shard(settings: Settings) -> ShardResult:
    """`bincount shard --backend sagemaker`: the Processing job's shard channels, recorded in state.json."""
    return _processing_job(settings, split_rows(Workspace(settings.workdir)))


def _processing_job(settings: Settings, rows: dict[str, list[dict]]) -> ShardResult:
    """Start (and with shard.wait, wait for) a Processing job that builds the shards from data.source in S3."""
    import tempfile

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

    started = time.perf_counter()
    with jobs.aws_errors("sagemaker shard"), jobs.sdk_output(), tempfile.TemporaryDirectory() as tmp:
        items_dir = Path(tmp)
        for split, items in rows.items():  # only what the job needs: id and count
            (items_dir / f"{split}.jsonl").write_text("".join(json.dumps({"id": r["id"], "count": r["count"]}) + "\n" for r in items))
        sm_session = jobs.session(Aws(settings))
        image = image_uris.retrieve("pytorch", sm_session.boto_region_name, version=smc.framework_version, py_version=smc.py_version,
                                    instance_type=cfg.instance_type, image_scope="training")
        processor = ScriptProcessor(
            role=role, image_uri=image, command=["python3"], instance_type=cfg.instance_type,
            instance_count=cfg.instance_count, volume_size_in_gb=cfg.volume_size_gb,
            max_runtime_in_seconds=cfg.max_runtime_s, base_job_name=f"{smc.base_job_name}-shards",
            sagemaker_session=sm_session, tags=jobs.tags(settings))
        job = name_from_base(f"{smc.base_job_name}-shards")
        arguments = ["--items", *(f"/opt/ml/processing/input/items/{split}.jsonl" for split in rows),
                     "--source", data.source, "--dest", dest, "--items_per_shard", str(cfg.items_per_shard),
                     "--max_side", str(side), "--quality", str(cfg.quality), "--workers", str(cfg.workers),
                     "--seed", str(cfg.seed)]
        if not data.unsigned:
            arguments.append("--signed_source")
        processor.run(code=str(jobs.container_dir() / "shards.py"), job_name=job, arguments=arguments, wait=False, logs=False,
                      inputs=[ProcessingInput(source=str(items_dir), destination="/opt/ml/processing/input/items",
                                              input_name="items")])
        log(f"processing job [bold]{job}[/] started: shards to {dest}")
        channels = {split: f"{dest}/{split}" for split in rows}
        Workspace(settings.workdir).update_state(channels=channels, channel_format="shards")
        status = "InProgress"
        if cfg.wait:
            processor.latest_job.wait(logs=False)
            status = sm_session.sagemaker_client.describe_processing_job(ProcessingJobName=job)["ProcessingJobStatus"]
            if status != "Completed":
                raise BincountError(f"processing job {job} ended {status}: see its CloudWatch logs")
    seconds = time.perf_counter() - started
    per_shard = cfg.items_per_shard
    shards = {split: -(-len(items) // per_shard) for split, items in rows.items()}
    return ShardResult(backend="sagemaker", channels=channels, shards=shards, items=sum(map(len, rows.values())),
                       skipped=0, bytes=0, max_side=side, seconds=round(seconds, 3), items_per_second=0.0,
                       job=job, status=status)
