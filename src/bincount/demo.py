"""The offline end-to-end demo: every stage of the real pipeline, with no network and no AWS account.

synth -> a local S3 server (moto, 127.0.0.1) holding the bins in the ABID bucket layout -> fetch as
from the real bucket -> split -> train -> evaluate -> deploy the local endpoint -> predict -> audit ->
undeploy. Nothing is left running afterwards.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from bincount.config import Settings
from bincount.console import log
from bincount.errors import BincountError
from bincount.results import Result, key_value_table


FIX = "bincount demo --budget 600"  # what buys a model above chance on a slow or busy CPU


class DemoResult(Result):
    workdir: str  # the work dir the demo ran in
    images: int  # synthetic bins drawn, served from a local S3 server and fetched
    accuracy: float  # the trained model's exact-count accuracy on the test split, 0..1
    chance: float = Field(description="the test split's majority rate: what always answering one count scores")
    trustworthy: bool = Field(description="false when test accuracy is near chance: the model is not to be used")
    rmse: float  # root mean squared count error on the test split, objects
    within_one: float  # share of test images predicted within one of the true count, 0..1
    agreement: float  # audit of the test split: share of scored bins whose prediction matches the label, 0..1
    recount: int  # bins the audit sends to a person (the audit's `recount`)
    predictions: list[dict[str, Any]]  # {image, count, confidence} for the first four test images (None: it failed)
    reports: dict[str, str]  # name -> path: metrics, confusion_matrix, training_curve, audit (CSV), audit_page (HTML)
    seconds: float  # the demo's wall time, seconds

    @property
    def exit_code(self) -> int:
        return 0 if self.trustworthy else 1

    def rich(self) -> Any:
        title = ("bincount demo: done (nothing left running)" if self.trustworthy else
                 f"bincount demo: the model is NOT trustworthy: test accuracy {self.accuracy:.1%} is near chance "
                 f"({self.chance:.1%}); train longer: {FIX}")
        table = key_value_table(title=title)
        table.add_row("test accuracy", f"{self.accuracy:.1%} (chance {self.chance:.1%})")
        table.add_row("test RMSE", f"{self.rmse:.3f}")
        table.add_row("within one", f"{self.within_one:.1%}")
        table.add_row("audit agreement", f"{self.agreement:.1%} ({self.recount} bins to recount)")
        for p in self.predictions:
            table.add_row(f"predict {Path(p['image']).name}", f"count {p['count']} (confidence {p['confidence']:.2f})")
        for name, path in self.reports.items():
            table.add_row(name, path)
        table.add_row("time", f"{self.seconds:.0f} s")
        return table


def _serve_bucket(source: Path, bucket: str) -> tuple[Any, str]:
    """Start moto's S3 server on a free 127.0.0.1 port and fill a public-read bucket from `source`."""
    import json
    import logging
    import socket
    from concurrent.futures import ThreadPoolExecutor

    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise BincountError("the demo needs moto's S3 server: pip install 'bincount[test]' (make install does)") from None
    from bincount.aws import client

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    s3 = client("s3", endpoint_url=url, max_pool_connections=16)
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    files = [p for p in sorted(source.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: s3.upload_file(str(p), bucket, p.relative_to(source).as_posix()), files))
    return server, url


def _calibrate(settings: Settings, ws: Any, budget_s: float) -> Any:
    """Set train.epochs (and, if needed, train.image_size) so training fits budget_s here; returns the plan.
    Shows a progress bar while it measures (a slow CPU takes a while to time even a few steps)."""
    from bincount.calibrate import plan
    from bincount.console import progress
    from bincount.workspace import read_jsonl

    t = settings.train
    train_images, val_images = len(read_jsonl(ws.split("train"))), len(read_jsonl(ws.split("val")))
    with progress(transient=True) as bar:
        task = bar.add_task("measuring training speed", total=None)

        def on_step(size: int, done: int, total: int) -> None:
            bar.update(task, description=f"measuring training speed at {size} px", completed=done, total=total)

        chosen = plan(t.arch, t.image_size, t.batch_size, settings.data.max_count + 1, t.amp, train_images,
                      val_images, budget_s, max_epochs=t.epochs, warmup_epochs=t.warmup_epochs, on_step=on_step)
    t.epochs, t.image_size = chosen.epochs, chosen.image_size
    return chosen


def demo(settings: Settings, images: int = 900, image_size: int = 128, budget_s: float = 120) -> DemoResult:
    """Run the whole pipeline offline on synthetic bins and summarise it.

    budget_s: training is sized to take about this long on this machine (calibrate.plan: epochs, and a
    smaller input size if needed); 0 trains exactly as configured.
    """
    import os

    from bincount.audit import local as audit_stage
    from bincount import evaluate as evaluate_stage
    from bincount import quality
    from bincount import predict as predict_stage
    from bincount.backends.local import endpoint as local_endpoint
    from bincount.backends.local import train as local_train
    from bincount.data import fetch, split, synth
    from bincount.workspace import Workspace, read_jsonl

    start = time.monotonic()
    # Fake credentials for the local S3 server only; fetch itself uses unsigned requests.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "demo")
    ws = Workspace(settings.workdir)
    bucket = settings.data.source.removeprefix("s3://").split("/")[0] or "demo-bins"
    log(f"[bold]1/8 synth[/] {images} bins of {image_size} px")
    synth.synthesize(ws.root / "synth", images, image_size, settings.data.max_count, seed=settings.data.seed)
    server, url = _serve_bucket(ws.root / "synth", bucket)
    endpoint_up = False
    try:
        settings.data.source, settings.data.endpoint_url, settings.data.unsigned = f"s3://{bucket}", url, True
        settings.data.limit = images
        log(f"[bold]2/8 fetch[/] from s3://{bucket} on {url} (a local S3 server)")
        fetch.fetch(settings)
        log("[bold]3/8 split[/]")
        split.split(settings)
        replan = None
        if budget_s > 0:
            from bincount import calibrate

            configured = settings.train.epochs
            log(f"[bold]4/8 train[/] measuring this machine to size training to about {budget_s:.0f} s")
            chosen = _calibrate(settings, ws, budget_s)
            log(f"[bold]4/8 train[/] sized to about {budget_s:.0f} s on this machine: "
                f"{chosen.describe(len(read_jsonl(ws.split('train'))))}")
            # after the first epoch: the epochs its measured time fits (local_train calls it with that time)
            replan = functools.partial(calibrate.replan, chosen, budget_s=budget_s, max_epochs=configured,
                                       warmup_epochs=settings.train.warmup_epochs)
        else:
            log("[bold]4/8 train[/]")
        local_train.train(settings, replan=replan)
        log("[bold]5/8 evaluate[/]")
        metrics = evaluate_stage.evaluate(settings)
        chance = quality.chance(metrics.confusion)
        if quality.near_chance(metrics.accuracy, chance):
            log(f"[bold red]warning:[/] test accuracy {metrics.accuracy:.1%} is near chance ({chance:.1%}): "
                f"this model is not trustworthy; train longer with `{FIX}`")
        log("[bold]6/8 deploy[/] the local endpoint")
        local_endpoint.deploy_local(settings)
        endpoint_up = True
        log("[bold]7/8 predict and audit[/]")
        test_rows = read_jsonl(ws.split("test"))[:4]
        predicted = predict_stage.predict(settings, [str(ws.root / r["image"]) for r in test_rows])
        audited = audit_stage.audit(settings, threshold=0.6, top=10)
    finally:
        if endpoint_up:
            log("[bold]8/8 undeploy[/]")
            local_endpoint.undeploy_local(settings, yes=True)
        server.stop()
    return DemoResult(
        workdir=str(ws.root), images=images,
        accuracy=metrics.accuracy, chance=chance, trustworthy=not quality.near_chance(metrics.accuracy, chance),
        rmse=metrics.rmse, within_one=metrics.within_one,
        agreement=audited.agreement or 0.0, recount=audited.recount,
        predictions=[{"image": p.image, "count": p.count, "confidence": p.confidence} for p in predicted.items],
        reports={**metrics.reports, "audit": audited.csv, "audit_page": audited.html or ""},
        seconds=time.monotonic() - start,
    )

