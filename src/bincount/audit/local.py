"""The local audit: bins scored on this machine (worker processes over the artifact's handlers) or by an endpoint."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from bincount.audit.core import (AuditResult, Bin, Inputs, Reader, chunks, error_text, options,
                                 partial_path, read_records, report, result_record, resume, runner_up)
from bincount.config import Settings
from bincount.errors import BincountError
from bincount.workspace import Workspace


def with_expected(reader: Reader, bins: list[Bin], records: list[dict[str, Any]]) -> Iterator[tuple[Bin, int]]:
    """Each bin with its recorded count (from the bin, else its label); a bin whose label cannot be read becomes
    an error record in `records` instead."""
    for b in bins:
        try:
            expected = reader.expected(b.label) if b.expected is None else b.expected
        except ValueError as exc:
            records.append(result_record(b, error=error_text(exc)))
            continue
        yield b, expected


class ModelScorer:
    """The artifact's handlers in this process: input_fn per image, one predict_fn per chunk."""

    def __init__(self, settings: Settings, model_dir: str | Path, threads: int | None = None, handlers: Any = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        if handlers is None:
            from bincount.handlers import Handlers

            handlers = Handlers(model_dir)
        self.module, self.bundle, self.reader = handlers.module, handlers.bundle, Reader(settings)

    def score(self, bins: list[Bin]) -> list[dict[str, Any]]:
        records, images, slots = [], [], []
        for b, expected in with_expected(self.reader, bins, records):
            try:
                body, content_type = self.reader.image(b.path)
                images.extend(self.module.input_fn(body, content_type))
                slots.append(len(records))
                records.append(result_record(b, expected, sha256=hashlib.sha256(body).hexdigest()))
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the others
                records.append(result_record(b, expected, error=error_text(exc)))
        if images:
            try:
                predictions = self.module.predict_fn(images, self.bundle)
            except Exception as exc:  # noqa: BLE001
                for i in slots:
                    records[i]["error"] = f"internal error: {type(exc).__name__}: {exc}"
                return records
            for i, answer in zip(slots, predictions):
                records[i].update(predicted=int(answer["count"]), confidence=float(answer["confidence"]),
                                  **runner_up(answer.get("probabilities"), int(answer["count"])))
        return records


class TargetScorer:
    """An endpoint (local URL or SageMaker) answering one image per request."""

    def __init__(self, settings: Settings, target: Any):
        self.target, self.reader = target, Reader(settings)

    def score(self, bins: list[Bin]) -> list[dict[str, Any]]:
        records: list[dict[str, Any]] = []
        for b, expected in with_expected(self.reader, bins, records):
            try:
                from bincount.predict import parse_answer

                body, content_type = self.reader.image(b.path)
                count, confidence, probabilities = parse_answer(self.target.predict(body, content_type))
                records.append(result_record(b, expected, predicted=count, confidence=confidence,
                                             sha256=hashlib.sha256(body).hexdigest(),
                                             **runner_up(probabilities, count)))
            except Exception as exc:  # noqa: BLE001
                records.append(result_record(b, expected, error=error_text(exc)))
        return records


_WORKER: ModelScorer | None = None  # the scorer of a worker process


def _init_worker(settings_json: str, model_dir: str, threads: int, parent: int) -> None:
    import signal

    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    die_with_parent(parent)
    _WORKER = ModelScorer(Settings.model_validate_json(settings_json), model_dir, threads)


def die_with_parent(parent: int) -> None:
    """End this worker process when `parent` dies, however it dies (SIGKILL included), so no worker (~1 GB
    with its model) outlives an audit: prctl(PR_SET_PDEATHSIG, SIGKILL) on Linux (the pool starts its
    workers from the main thread), and everywhere a watchdog thread that checks the parent every second."""
    import signal
    import sys
    import threading

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)
    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _score_in_worker(bins: list[Bin]) -> list[dict[str, Any]]:
    return _WORKER.score(bins)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def score_local(settings: Settings, bins: Iterable[Bin], total: int, target: Any, write: Callable[[dict], None]) -> None:
    """Score `bins` and pass each result record to `write` as it arrives (in completion order).

    An in-process model: audit.workers processes (or threads), each with its own copy of the model and
    torch threads split between them; one bin chunk (audit.chunk) per task, 2 tasks per worker in flight.
    An endpoint: deploy.workers concurrent requests.
    """
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from bincount.data.source import bounded_map
    from bincount.predict import ModelTarget

    a = settings.audit
    work = chunks(bins, a.chunk)
    if not isinstance(target, ModelTarget):
        scorer = TargetScorer(settings, target)
        with ThreadPoolExecutor(settings.deploy.workers) as pool:
            for _, records in bounded_map(scorer.score, work, settings.deploy.workers, pool=pool):
                for record in records:
                    write(record)
        return
    workers = min(a.workers or cpu_count(), max(1, -(-total // a.chunk)))
    threads = a.threads or max(1, cpu_count() // workers)
    if workers == 1 or a.pool == "thread":
        import torch

        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        scorer = ModelScorer(settings, target.handlers.model_dir, handlers=target.handlers)
        try:
            if workers == 1:
                for chunk in work:
                    for record in scorer.score(chunk):
                        write(record)
                return
            pool: Any = ThreadPoolExecutor(workers)
            with pool:
                for _, records in bounded_map(scorer.score, work, workers, pool=pool):
                    for record in records:
                        write(record)
            return
        finally:
            torch.set_num_threads(saved)
    import multiprocessing

    model_dir = str(target.handlers.model_dir)
    target.handlers = None  # each worker loads its own copy; free this one
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(settings.model_dump_json(), model_dir, threads, os.getpid()))
    try:
        for _, records in bounded_map(_score_in_worker, work, workers, pool=pool):
            for record in records:
                write(record)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


# -- the val check: how often the bins the model trusts are right ------------------------------
def val_pairs(settings: Settings, target: Any, model_key: str) -> tuple[list[tuple[float, bool]], str]:
    """(confidence, right) of up to VAL_BINS val bins scored by `target`, cached under reports/audit-val/."""
    from bincount.audit.trust import VAL_BINS
    from bincount.predict import ModelTarget

    ws = Workspace(settings.workdir)
    if not ws.split("val").is_file():
        return [], "not checked: no val split (run `bincount split`)"
    inputs = Inputs(settings, ws.split("val"))
    key = hashlib.sha256(f"{model_key}\n{inputs.digest}".encode()).hexdigest()[:20]
    cache = ws.reports / "audit-val" / f"{key}.json"
    how = "scored {n} bins of the val split with this model"
    if cache.is_file():
        try:
            pairs = [(float(c), bool(r)) for c, r in json.loads(cache.read_text())]
            return pairs, how.format(n=len(pairs)) + " (cached)"
        except (OSError, ValueError, TypeError):
            pass
    if isinstance(target, ModelTarget):
        scorer: Any = ModelScorer(settings, target.handlers.model_dir, handlers=target.handlers)
    else:
        scorer = TargetScorer(settings, target)
    pairs = []
    from itertools import islice

    for chunk in chunks(islice(inputs, VAL_BINS), settings.audit.chunk):
        for record in scorer.score(chunk):
            if record.get("error") is None and record.get("predicted") is not None:
                pairs.append((float(record["confidence"]), record["predicted"] == record["expected"]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(pairs))
    os.replace(tmp, cache)
    return pairs, how.format(n=len(pairs))


# -- the partial results file is keyed by the scorer ----------------------------------------------
def model_key(target: Any) -> str:
    """What identifies the scorer: the digest of the artifact's weights, meta and handlers, else the endpoint."""
    from bincount.predict import ModelTarget

    if not isinstance(target, ModelTarget):
        return target.name
    from bincount.workspace import file_sha256

    root = Path(target.handlers.model_dir)
    files = [root / rel for rel in ("model.pth", "meta.json", "code/inference.py", "code/net.py")]
    digests = "".join(f"{path.relative_to(root)}\t{file_sha256(path)}\n" for path in files if path.is_file())
    return f"model:{hashlib.sha256(digests.encode()).hexdigest()}"


# -- the stage -------------------------------------------------------------------------------------
def audit(settings: Settings, manifest: Path | None = None, threshold: float = 0.6, endpoint: str | None = None,
          model: Path | None = None, out: Path | None = None, top: int | None = None, source: str | None = None,
          collect: bool = False) -> AuditResult:
    """Score every bin and rank the disagreements; writes a CSV report (resumable, see bincount.audit)."""
    source, out, top = options(settings, manifest, source, threshold, out, top)
    if collect:
        raise BincountError("--collect joins a SageMaker Batch Transform job: use it with --backend sagemaker")
    return audit_local(settings, source, threshold=threshold, endpoint=endpoint, model=model, out=out, top=top)


def audit_local(settings: Settings, source: str | Path | None, *, threshold: float, endpoint: str | None,
                model: Path | None, out: Path, top: int) -> AuditResult:
    from bincount.predict import resolve_target
    from bincount.workspace import disk_error

    ws = Workspace(settings.workdir)
    inputs = Inputs(settings, source)
    target = resolve_target(settings, endpoint, model)
    key = model_key(target)
    partial = partial_path(ws, f"{key}\n{inputs.digest}")
    try:
        return _score_and_report(settings, inputs, target, partial, threshold=threshold, out=out, top=top, key=key)
    except OSError as exc:  # a full disk or a read-only one: what was scored stays in `partial` for the rerun
        error = disk_error(Path(exc.filename or partial), exc)
        if error is exc:
            raise
        raise error from None


def _score_and_report(settings: Settings, inputs: Inputs, target: Any, partial: Path, *, threshold: float,
                      out: Path, top: int, key: str = "") -> AuditResult:
    from bincount.audit.trust import assess
    from bincount.console import progress

    started = time.perf_counter()
    try:
        quality = assess(settings, target, threshold, val_pairs(settings, target, key))  # before scoring: a process pool drops target.handlers
        partial.parent.mkdir(parents=True, exist_ok=True)
        done = resume(partial, settings)
        if done:
            from bincount.console import log

            log(f"resuming: {len(done)} of {inputs.total} bins already scored ({partial})")
        todo = (b for b in inputs if b.n not in done)
        with progress(transient=True) as bar, partial.open("a") as fh:
            task = bar.add_task("audit", total=inputs.total, completed=len(done))

            def write(record: dict) -> None:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                bar.advance(task)

            score_local(settings, todo, inputs.total - len(done), target, write)
    finally:
        target.close()
    result = report(read_records(partial), out, source=inputs.name, target=target.name, threshold=threshold, top=top,
                    resumed=len(done), seconds=round(time.perf_counter() - started, 3), total=inputs.total,
                    quality=quality, settings=settings)
    partial.unlink(missing_ok=True)
    return result
