"""container/train.py for real on tiny synthetic bins: artifact, resume, DDP, offline weights, contract."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

from bincount.container.epochlog import METRIC_DEFINITIONS, parse_epoch_line, parse_progress_line

from .conftest import SCRIPT, run_train, train_here

CONTAINER = SCRIPT.parent


def epochs_in(stdout: str) -> list[int]:
    return [int(m["epoch"]) for m in map(parse_epoch_line, stdout.splitlines()) if m]


@pytest.mark.slow
def test_trains_resumes_and_the_artifact_serves_itself(channels, tmp_path):
    from bincount.artifacts import extract_model, package_model

    run = tmp_path / "run"
    recipe = ["--class_weighting", "true", "--amp", "false", "--ema_decay", "0.9", "--count_loss", "0.5",
              "--stem", "small", "--tta", "true"]
    first = run_train(channels, run, "--epochs", "1", *recipe, "--sagemaker_extra", "ignored",
                      env={"TRAIN_PROGRESS_S": "1e-9"})
    assert first.returncode == 0, first.stderr[-2000:]
    assert epochs_in(first.stdout) == [1]
    # progress inside the epoch (72 images, batch 32: 3 steps), in a form no metric regex matches
    progress = [parse_progress_line(line) for line in first.stdout.splitlines() if line.startswith("progress ")]
    assert [(p["epoch"], p["step"], p["steps"]) for p in progress] == [(1, 1, 3), (1, 2, 3)]
    assert all(p["images_per_s"] > 0 for p in progress)
    assert not any(re.search(d["Regex"], line) for d in METRIC_DEFINITIONS
                   for line in first.stdout.splitlines() if line.startswith("progress "))
    assert "ignoring unknown arguments: --sagemaker_extra ignored" in first.stderr
    assert "device cpu (float32)" in first.stderr  # --amp false
    assert (run / "checkpoints" / "checkpoint.pt").is_file()

    # Restarted (as after a spot interruption) with the same checkpoint dir: continues at epoch 2.
    second = run_train(channels, run, "--epochs", "2", *recipe, env={"SM_CHANNEL_TEST": str(channels["test"])})
    assert second.returncode == 0, second.stderr[-2000:]
    assert epochs_in(second.stdout) == [2]
    # the closing line repeats the kept epoch's metrics, so "the last value" of an objective is the best one
    last_line = second.stdout.strip().splitlines()[-1]
    assert last_line.startswith("best_epoch=")
    regex = next(d["Regex"] for d in METRIC_DEFINITIONS if d["Name"] == "val_acc")
    last_val_acc = float(re.findall(regex, second.stdout)[-1])
    assert "resuming after epoch 1" in second.stderr

    model_dir = run / "model"
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta["arch"] == "mobilenet_v3_small" and meta["stem"] == "small" and meta["classes"] == list(range(6)) and meta["image_size"] == 32
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert meta["metrics"]["epoch"] in (1, 2) and 0.0 <= meta["metrics"]["test_acc"] <= 1.0
    assert last_val_acc == round(meta["metrics"]["val_acc"], 4)
    assert last_line.startswith(f"best_epoch={meta['metrics']['epoch']} ")
    assert meta["hyperparameters"]["class_weighting"] is True and len(meta["manifest_digest"]) == 64
    assert meta["tta"] is True  # the shipped model predicts with test-time augmentation
    assert meta["train_precision"] == "float32"  # --amp false
    assert len(meta["mean"]) == len(meta["std"]) == 3
    assert sorted(p.name for p in (model_dir / "code").iterdir()) == [
        "epochlog.py", "inference.py", "net.py", "requirements.txt"]
    assert (run / "output" / "data" / "epochs.jsonl").read_text().count("\n") == 2

    # Package, extract safely, and serve with the artifact's own handlers (imported from code/).
    tar = package_model(model_dir, tmp_path / "model.tar.gz")
    unpacked = extract_model(tar, tmp_path / "unpacked")
    sys.path.insert(0, str(unpacked / "code"))
    try:
        for name in ("inference", "net", "epochlog"):
            sys.modules.pop(name, None)
        import inference  # the artifact's copy

        assert Path(inference.__file__).parent == unpacked / "code"
        bundle = inference.model_fn(str(unpacked))
        body = (channels["train"] / "images").glob("*.jpg").__next__().read_bytes()
        out = json.loads(inference.output_fn(inference.predict_fn(inference.input_fn(body, "image/jpeg"), bundle),
                                             "application/json"))
        assert out["count"] in range(6) and 0 < out["confidence"] <= 1
        assert abs(sum(out["probabilities"].values()) - 1) < 1e-4
    finally:
        sys.path.remove(str(unpacked / "code"))
        for name in ("inference", "net", "epochlog"):
            sys.modules.pop(name, None)


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_write_one_artifact(channels, tmp_path):
    run = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = run_train(channels, run, "--epochs", "1", launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert epochs_in(res.stdout) == [1]  # rank 0 alone prints epoch lines
    assert "world 2" in res.stderr
    assert (run / "model" / "model.pth").is_file() and (run / "model" / "meta.json").is_file()
    assert list((run / "checkpoints").iterdir()) == [run / "checkpoints" / "checkpoint.pt"]


def test_imagenet_weights_offline_fail_fast_with_one_line(channels, tmp_path):
    res = train_here(channels, tmp_path / "run", "--epochs", "1", "--pretrained", "imagenet",
                     env={"TORCH_HOME": str(tmp_path / "empty-torch-home")})
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "not cached" in errors[0] and "pretrained=none" in errors[0]
    assert "Traceback" not in res.stderr
    assert (tmp_path / "run" / "output" / "failure").read_text().startswith("error: ")


def test_bad_channel_is_one_line_error(channels, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    res = run_train({**channels, "train": empty}, tmp_path / "run", "--epochs", "1", timeout=60)  # the script's
    assert res.returncode == 2 and "Traceback" not in res.stderr                                  # own process
    assert res.stderr.strip().splitlines()[-1] == f"error: train channel {empty} has no manifest.jsonl"
    assert (tmp_path / "run" / "output" / "failure").read_text() == f"error: train channel {empty} has no manifest.jsonl\n"


def test_container_imports_only_allowed_modules():
    """stdlib, torch, torchvision, PIL, numpy and siblings anywhere; smdebug and sagemaker_inference (present
    only in some containers) and boto3 (shards.py's Processing script, for s3:// URIs) only where a missing
    module is survivable: in a function or a try block."""
    required = set(sys.stdlib_module_names) | {"torch", "torchvision", "PIL", "numpy", "__future__",
                                               "inference", "net", "epochlog", "smdebug_compat", "shards",
                                               *(p.stem for p in CONTAINER.glob("*.py"))}
    optional = required | {"smdebug", "sagemaker_inference", "boto3", "botocore"}

    def imported(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            return [node.module or ""]
        return []

    for path in CONTAINER.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for name in imported(node):
                assert name.split(".")[0] in optional, f"{path.name} imports {name}"
        for node in tree.body:  # unguarded top-level imports: required modules only
            for name in imported(node):
                assert name.split(".")[0] in required, f"{path.name} imports {name} unguarded at top level"


def test_requirements_install_smdebug_for_the_hook():
    lines = [ln.split("#")[0].strip() for ln in (CONTAINER / "requirements.txt").read_text().splitlines()]
    assert "smdebug==1.0.34" in lines


def test_hyperparameters_from_settings_parse_as_sagemaker_passes_them():
    from bincount.backends.local.train import format_args
    from bincount.config import load_settings
    from bincount.container import train

    hp = load_settings(environ={}).train.hyperparameters(5)
    args = train.parse_args(format_args(hp))
    assert args.num_classes == 6 and args.amp is True and args.class_weighting is False
    assert args.arch == hp["arch"] and args.lr == hp["lr"] and args.patience == hp["patience"]
    assert train.parse_args(["--amp", "False", "--class_weighting", "True"]).class_weighting is True


def test_warmup_then_cosine_and_count_preserving_augmentation():
    import torch

    from bincount.container import batches, loop

    factor = loop.warmup_cosine(10, 110)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.505) and factor(110) == pytest.approx(0.01)
    images = torch.rand(8, 3, 16, 16)
    out = batches.augment(images.clone(), torch.Generator().manual_seed(0))
    assert out.shape == images.shape and 0 <= out.min() and out.max() <= 1
    # Flips and transposes move pixels but never drop any: sorted per-image values match up to jitter.
    weights = loop.class_weights(torch.tensor([0, 0, 0, 1]), 3)
    assert weights.tolist() == pytest.approx([2 / 3, 2.0, 1.0])


def test_checkpoint_writer_saves_a_snapshot_in_the_background(tmp_path):
    import torch

    from bincount.container import checkpoints

    live = {"model": {"w": torch.zeros(3)}, "history": [{"epoch": 1}], "epoch": 1}
    writer = checkpoints.CheckpointWriter(tmp_path / "checkpoint.pt")
    writer.save(live)
    live["model"]["w"].add_(1.0)  # training goes on mutating the live tensors
    live["history"].append({"epoch": 2})
    writer.close()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["model"]["w"].tolist() == [0.0, 0.0, 0.0] and saved["history"] == [{"epoch": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left

    failing = checkpoints.CheckpointWriter(tmp_path / "missing" / "checkpoint.pt")
    failing.save(live)
    with pytest.raises(RuntimeError, match="does not exist"):
        failing.close()  # a failed write is not lost in the thread


def test_test_time_augmentation_averages_the_eight_training_views():
    import torch

    from bincount.container import net

    class TopLeft(torch.nn.Module):  # "sees" only the top-left pixel: not flip-invariant at all
        def forward(self, x):
            return torch.stack([x[:, 0, 0, 0] * 10, torch.zeros(len(x))], 1)

    x = torch.zeros(1, 3, 8, 8)
    x[0, :, 0, 0] = 1.0
    assert len(net.views(x)) == 8 and len(net.views(torch.zeros(1, 3, 8, 6))) == 4
    plain = net.predict_proba(TopLeft(), x)
    averaged = net.predict_proba(TopLeft(), x, tta=True)
    # 2 of the 8 views (identity, transpose) keep the bright pixel at the top left
    expected = (2 * plain[0, 0] + 6 * 0.5) / 8
    assert averaged.shape == (1, 2) and averaged[0, 0].item() == pytest.approx(expected.item())
    assert averaged.sum().item() == pytest.approx(1.0)


def test_ema_counting_loss_and_small_stem():
    import torch

    from bincount.container import loop, net, train

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = loop.make_ema(model, decay=0.5)  # torch's AveragedModel, starting at the initial weights
    averaged = ema.module
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 3
    before = averaged[0].weight.detach().clone()
    ema.update_parameters(model)  # first step: the decay ramps, min(0.5, 2/11)
    assert torch.allclose(averaged[0].weight, before + 9 / 11)
    assert averaged[1].num_batches_tracked == model[1].num_batches_tracked == 3  # integer buffers are copied
    ema.update_parameters(model)  # second step: min(0.5, 3/12); then the decay itself
    assert torch.allclose(averaged[0].weight, before + 9 / 11 + (2 / 11) * 0.75)
    for _ in range(20):
        ema.update_parameters(model)
    assert torch.allclose(averaged[0].weight, model[0].weight, atol=1e-5)
    assert int(ema.n_averaged) == 23 and set(ema.state_dict()) >= {"n_averaged", "module.0.weight"}

    logits, target = torch.tensor([[0.0, 0.0, 10.0]]), torch.tensor([0])
    ce = loop.CountingLoss(None, 0.0, 0.0)(logits, target)
    assert loop.CountingLoss(None, 0.0, 1.0)(logits, target) == pytest.approx(ce.item() + 2.0, abs=1e-3)

    # small stem: 4x the feature-map area, same parameter names (debugger, pretrained files).
    standard, small = net.build_model("resnet18", 6), net.build_model("resnet18", 6, stem="small")
    assert [n for n, _ in standard.named_parameters()] == [n for n, _ in small.named_parameters()]
    x = torch.zeros(1, 3, 64, 64)
    assert small.layer4(small.layer3(small.layer2(small.layer1(small.maxpool(small.conv1(x)))))).shape[-1] == 4


def test_mixed_precision_on_cpu_is_bfloat16_where_native_and_trains():
    import torch

    from bincount.container import loop, net, train

    assert isinstance(loop.cpu_bf16(), bool)  # AVX512-BF16/AMX: on; elsewhere off (emulated would be slower)
    # train.py's autocast takes torch's per-device default: bfloat16 on the CPU, float16 on CUDA
    assert torch.get_autocast_dtype("cpu") is torch.bfloat16
    assert torch.get_autocast_dtype("cuda") is torch.float16
    # The training step under CPU autocast: bfloat16 logits, float32 loss and gradients on float32 weights.
    model = net.build_model("resnet18", 6).to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = loop.CountingLoss(None, 0.05, 0.5)(logits, torch.tensor([0, 1, 2, 5]))
    loss.backward()
    assert logits.dtype is torch.bfloat16 and loss.dtype is torch.float32 and torch.isfinite(loss)
    assert model.fc.weight.grad.dtype is torch.float32 and torch.isfinite(model.fc.weight.grad).all()


def test_smdebug_shim_writes_tensors_without_ndarray_tostring():
    import numpy as np

    from bincount.container import smdebug_compat

    assert smdebug_compat.install(force=True)
    assert smdebug_compat.install(force=True)  # idempotent
    import smdebug.core.writer as writer

    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    proto = writer.make_tensor_proto(nparray_data=array, tag="t")
    assert proto.tensor_content == array.tobytes()
    assert [d.size for d in proto.tensor_shape.dim] == [2, 3]


def test_a_loss_that_stops_being_finite_stops_the_run_and_ships_nothing(channels, tmp_path):
    res = train_here(channels, tmp_path / "run", "--epochs", "3", "--lr", "1e20", "--ema_decay", "0")
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the loss is not finite at epoch 1" in errors[0] and "lower the learning rate" in errors[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "run" / "model" / "model.pth").exists()
    # not even an epoch line with nan for a tuner to read (under load a progress line may come within the epoch:
    # it is no epoch line, and no metric regex reads it)
    assert not [line for line in res.stdout.splitlines() if parse_epoch_line(line)]
    assert not any(re.search(d["Regex"], line) for d in METRIC_DEFINITIONS for line in res.stdout.splitlines())
    res = train_here(channels, tmp_path / "run", "--epochs", "1", "--lr", "inf")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == "error: --lr inf is not a finite number"


def test_on_sagemaker_a_diverged_job_takes_its_checkpoints_away(channels, tmp_path):
    """Its job can never resume them, and the trials of a tuning job share one prefix that SageMaker restores
    into each new trial (issue 20.9); locally (no TRAINING_JOB_NAME) a run's checkpoints stay."""
    import torch

    mine = tmp_path / "run" / "checkpoints" / "tune-001-abc"
    mine.mkdir(parents=True)
    torch.save({"epoch": 1}, mine / "checkpoint.pt")  # an old one: not resumed, then training diverges
    others = tmp_path / "run" / "checkpoints" / "tune-002-def"
    others.mkdir()
    (others / "checkpoint.pt").write_bytes(b"another trial's")
    res = train_here(channels, tmp_path / "run", "--epochs", "3", "--lr", "1e20", "--ema_decay", "0",
                     env={"TRAINING_JOB_NAME": "tune-001-abc"})
    assert res.returncode == 2 and "the loss is not finite" in res.stderr
    assert not mine.exists() and (others / "checkpoint.pt").read_bytes() == b"another trial's"


def test_keep_checkpoint_keeps_a_sagemaker_jobs_folder_when_the_job_is_over(tmp_path, monkeypatch):
    """train.keep_checkpoint reaches a SageMaker job as --keep_checkpoint true: the job's folder (and so its copy
    under the S3 prefix) stays; without it only this job's folder goes; locally drop never deletes."""
    from bincount.container import checkpoints, train

    folders = {job: tmp_path / job for job in ("job-a", "job-b")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "checkpoint.pt").write_bytes(b"state")
    monkeypatch.delenv("TRAINING_JOB_NAME", raising=False)
    checkpoints.drop(folders["job-a"])
    assert folders["job-a"].is_dir()  # locally: bincount decides after the run
    monkeypatch.setenv("TRAINING_JOB_NAME", "job-a")
    assert train.parse_args(["--keep_checkpoint", "true"]).keep_checkpoint is True
    assert train.parse_args([]).keep_checkpoint is False
    checkpoints.drop(folders["job-a"], keep=True)
    assert folders["job-a"].is_dir()
    checkpoints.drop(folders["job-b"])  # another job's folder: never this job's to delete
    checkpoints.drop(folders["job-a"])
    assert not folders["job-a"].exists() and folders["job-b"].is_dir()


def test_a_truncated_checkpoint_names_the_file_and_how_to_restart(channels, tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    for damaged in (b"PK\x03\x04 truncated zip", b""):
        checkpoint.write_bytes(damaged)
        res = train_here(channels, run, "--epochs", "1")
        assert res.returncode == 2, res.stderr[-2000:]
        assert "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: checkpoint {checkpoint} is unreadable") and f"mv {checkpoint} " in last


@pytest.mark.slow
def test_jobs_resume_only_their_own_checkpoint_with_the_same_settings(channels, tmp_path):
    """SageMaker restores a checkpoint prefix into /opt/ml/checkpoints: a job resumes only its own folder
    (TRAINING_JOB_NAME), only a checkpoint written for the same hyperparameters and data, and takes its folder
    away when its model is written (issue 20.9); a local run (no job name) keeps its checkpoint."""
    import shutil

    run, job = tmp_path / "run", lambda name: {"TRAINING_JOB_NAME": name}  # noqa: E731 - set in every SageMaker job
    saved = run / "checkpoints"
    local = train_here(channels, run, "--epochs", "1")
    assert local.returncode == 0 and (saved / "checkpoint.pt").is_file(), local.stderr[-2000:]

    def interrupted(name: str) -> None:  # a job stopped after its first epoch (spot): its folder holds epoch 1
        (saved / name).mkdir(exist_ok=True)
        shutil.copy(saved / "checkpoint.pt", saved / name / "checkpoint.pt")

    interrupted("job-a")
    other_job = train_here(channels, run, "--epochs", "1", env=job("job-b"))  # a trial sharing the prefix
    assert other_job.returncode == 0 and "resuming" not in other_job.stderr and epochs_in(other_job.stdout) == [1]
    assert not (saved / "job-b").exists() and (saved / "job-a" / "checkpoint.pt").is_file()  # only its own went

    spot_restart = train_here(channels, run, "--epochs", "2", env=job("job-a"))  # the same job, restarted
    assert "resuming after epoch 1" in spot_restart.stderr and epochs_in(spot_restart.stdout) == [2]
    assert not (saved / "job-a").exists()

    interrupted("job-b")
    new_lr = train_here(channels, run, "--epochs", "1", "--lr", "0.004", env=job("job-b"))
    assert new_lr.returncode == 0, new_lr.stderr[-2000:]
    said = [line for line in new_lr.stderr.splitlines() if "not resuming" in line]
    assert len(said) == 1 and "lr 0.003 -> 0.004" in said[0] and "starting fresh" in said[0]
    assert epochs_in(new_lr.stdout) == [1]
    assert json.loads((run / "model" / "meta.json").read_text())["hyperparameters"]["lr"] == 0.004


def test_a_checkpoint_of_other_data_or_without_a_fingerprint_is_not_resumed(tmp_path, channels):
    import torch

    from bincount.container import checkpoints, loop, train

    args = train.parse_args(["--train", str(channels["train"]), "--val", str(channels["val"])])
    expected = checkpoints.fingerprint(args, None)
    dist = loop.Dist()
    torch.save({"epoch": 1, "fingerprint": expected}, tmp_path / checkpoints.CHECKPOINT)
    (tmp_path / f".{checkpoints.CHECKPOINT}.part").write_bytes(b"a write a kill cut short")
    assert checkpoints.unfinished(tmp_path / checkpoints.CHECKPOINT) == tmp_path / f".{checkpoints.CHECKPOINT}.part"
    assert checkpoints.load_checkpoint(tmp_path, dist, expected)["epoch"] == 1
    assert not (tmp_path / f".{checkpoints.CHECKPOINT}.part").exists()  # removed, not synced on to other jobs
    other_data = checkpoints.fingerprint(train.parse_args(["--train", str(channels["val"]), "--val", str(channels["val"])]), None)
    assert checkpoints.load_checkpoint(tmp_path, dist, other_data) is None
    assert "train data changed" in checkpoints.mismatch(expected, other_data)
    torch.save({"epoch": 1}, tmp_path / checkpoints.CHECKPOINT)  # written before checkpoints recorded what they are
    assert checkpoints.load_checkpoint(tmp_path, dist, expected) is None
    # Written by train.py before the EMA was torch's AveragedModel (format 1, unrecorded): named, not resumed.
    old = {k: v for k, v in expected.items() if k != "format"}
    torch.save({"epoch": 1, "fingerprint": old, "ema": {"0.weight": torch.zeros(2)}, "ema_steps": 3},
               tmp_path / checkpoints.CHECKPOINT)
    assert checkpoints.load_checkpoint(tmp_path, dist, expected) is None
    assert "older train.py (checkpoint format 1, this one reads 2)" in checkpoints.mismatch(old, expected)


def _weights_file(path: Path, arch: str) -> Path:
    import torch
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path


@pytest.mark.slow
def test_imagenet_weights_from_the_weights_channel_are_recorded_with_their_sha256(channels, tmp_path):
    import hashlib

    channel = tmp_path / "weights"
    weights = _weights_file(channel / "mobilenet_v3_small-047dcff4-0123456789abcdef.pth", "mobilenet_v3_small")
    env = {"SM_CHANNEL_WEIGHTS": str(channel), "TORCH_HOME": str(tmp_path / "empty-torch-home")}
    res = train_here(channels, tmp_path / "run", "--epochs", "1", "--pretrained", "imagenet",
                    "--weights_source", "s3://bucket/bincount/weights/x.pth", env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["weights"] == {"kind": "imagenet", "from": "s3://bucket/bincount/weights/x.pth", "file": weights.name,
                               "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert "weights_dir" not in meta["hyperparameters"]

    # A file that does not fit the backbone is a one-line error, not a silently random start.
    (channel / weights.name).unlink()
    _weights_file(channel / "resnet18.pth", "resnet18")
    bad = train_here(channels, tmp_path / "bad", "--epochs", "1", "--pretrained", "channel", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: pretrained weights file") and "does not fit" in bad.stderr


def test_imagenet_weights_from_the_torch_hub_cache_are_recorded(tmp_path, monkeypatch):
    from bincount.container import net, train

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cached = _weights_file(net.imagenet_cache_file("mobilenet_v3_small"), "mobilenet_v3_small")
    args = train.parse_args(["--arch", "mobilenet_v3_small", "--pretrained", "imagenet"])
    args.weights_dir = None
    pretrained, record = train.resolve_weights(args)
    assert pretrained == str(cached) and record["kind"] == "imagenet" and record["from"] == f"torch hub cache {cached}"
    net.build_model("mobilenet_v3_small", 6, "imagenet")  # loads the cached file, offline


@pytest.mark.parametrize("bf16", ["1", "0"], ids=["bfloat16-autocast", "float32"])
def test_the_debugger_hook_saves_activations_under_either_cpu_precision(channels, tmp_path, bf16):
    """SageMaker's hook config with PoorWeightInitialization's relu_input collection, on both sides of the CPU
    check: with bfloat16 autocast the saved activations are bfloat16, which NumPy cannot hold (every job on a
    CPU with native bfloat16 failed at its first step with "Got unsupported ScalarType BFloat16")."""
    from bincount.backends.sagemaker.debugger import activation_inputs_regex

    tensors = tmp_path / "tensors"
    config = tmp_path / "debughookconfig.json"
    config.write_text(json.dumps({"LocalPath": str(tensors), "HookParameters": {"save_interval": "1"},
                                  "CollectionConfigurations": [
                                      {"CollectionName": "relu_input", "CollectionParameters": {
                                          "include_regex": activation_inputs_regex("mobilenet_v3_small"),
                                          "save_interval": "1"}},
                                      {"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}}]}))
    res = run_train(channels, tmp_path / "run", "--epochs", "1", "--amp", "true", timeout=180,
                    env={"TRAIN_CPU_BF16": bf16, "SMDEBUG_CONFIG_FILE_PATH": str(config)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "smdebug hook disabled" not in res.stderr and "Traceback" not in res.stderr
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["train_precision"] == ("bfloat16" if bf16 == "1" else "float32")

    from smdebug.trials import create_trial

    trial = create_trial(str(tensors))
    names = trial.tensor_names(collection="relu_input")
    assert names, "no activation inputs saved"
    value = trial.tensor(names[0]).value(trial.steps()[0])
    assert value.dtype.name == "float32" and value.size > 0


def test_train_py_reports_the_test_metrics_that_bincount_evaluate_computes(channels, tmp_path):
    """One scoring path (issue 23.6): train.py's test_acc/test_rmse are evaluate's for the same model and images,
    even when training ran under bfloat16 autocast (forced here, so the check holds on every CPU)."""
    from bincount.config import load_settings
    from bincount.evaluate import evaluate

    run = tmp_path / "run"
    res = train_here(channels, run, "--arch", "resnet18", "--epochs", "1", "--lr", "1e-6", "--test",
                     str(channels["train"]), env={"TRAIN_CPU_BF16": "1"})  # near its initial, close-call weights
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["train_precision"] == "bfloat16"
    settings = load_settings(overrides={"workdir": str(tmp_path / "work")}, environ={})
    result = evaluate(settings, manifest=channels["train"] / "manifest.jsonl", model=run / "model")
    assert (result.n, result.skipped, result.tta) == (72, 0, False)
    assert (meta["metrics"]["test_acc"], meta["metrics"]["test_rmse"]) == \
        pytest.approx((result.accuracy, result.rmse), abs=1e-12)


def test_the_test_pass_scores_near_ties_as_evaluate_does(channels, tmp_path):
    """A model whose top two counts are close on every image: bfloat16 autocast or another decode would flip
    some of them (the validation pass may; the test pass, loop.score, must not)."""
    import torch

    from bincount.artifacts import write_model_dir
    from bincount.container import batches, loop, net
    from bincount.evaluate import compute_metrics, predict_counts

    items = batches.read_channel(str(channels["train"]), "train", 6)
    data = batches.Batches(items, 32, 16, cache_mb=64, num_workers=0)
    torch.manual_seed(0)
    model = net.build_model("resnet18", 6).eval()
    with torch.no_grad():  # counts 2 and 3 lead on every image, half of them each, by a few hundredths
        x = torch.cat([net.normalize(images.contiguous()) for images, _ in data.iterate(list(range(len(items))))])
        model.fc.bias[2:4] += 10.0
        logits = model(x)
        model.fc.bias[3] -= (logits[:, 3] - logits[:, 2]).median()
    model_dir = write_model_dir(tmp_path / "model", "resnet18", model=model)
    predicted, _ = predict_counts(model_dir, [path for path, _ in items], tta=False)
    expected = compute_metrics([count for _, count in items], predicted, list(range(6)))
    assert set(predicted) == {2, 3}  # a near tie that falls both ways
    loaded, _ = net.load_model(model_dir)
    test = loop.score(loaded, data, loop.CountingLoss(None, 0.05, 0.5), torch.device("cpu"), loop.Dist(), tta=False)
    assert (test["acc"], test["rmse"]) == pytest.approx((expected["accuracy"], expected["rmse"]), abs=1e-12)
