"""Model artifacts: build model.tar.gz from a model dir, unpack it safely, find the model to use.

Layout (what SageMaker's PyTorch inference container expects): model.pth, meta.json and
code/ (inference.py, net.py, epochlog.py, requirements.txt) at the top of the archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bincount.errors import BincountError
from bincount.state import LocalTraining, Training
from bincount.workspace import file_sha256, new_dir_mode, temp_beside

if TYPE_CHECKING:
    from bincount.config import Settings

CONTAINER = Path(__file__).resolve().parent / "container"
SERVING_FILES = ("inference.py", "net.py", "epochlog.py")  # what an endpoint imports (container/train.py: CODE_FILES)
CODE_FILES = (*SERVING_FILES, "requirements.txt")
# container/requirements.txt installs smdebug for training; an endpoint needs nothing beyond the inference
# container (and may have no internet). container/train.py writes the same text (it cannot import this package).
SERVING_REQUIREMENTS = (
    "# Serving needs only torch, torchvision and Pillow, which the SageMaker PyTorch inference container has.\n")
REQUIRED = ("model.pth", "meta.json")
# Extraction caps: a bincount artifact is weights (resnet50: ~100 MB), meta.json and a few code files.
MAX_MEMBERS = 64
MAX_MEMBER_BYTES = 512 << 20  # 512 MiB
MAX_TOTAL_BYTES = 512 << 20  # 512 MiB, all members together


def write_serving_code(dest: Path) -> Path:
    """An artifact's code/ folder (or an endpoint's source_dir): the serving modules and requirements.txt."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in SERVING_FILES:
        shutil.copy(CONTAINER / name, dest / name)
    (dest / "requirements.txt").write_text(SERVING_REQUIREMENTS)
    return dest


def package_model(model_dir: Path, out_tar: Path) -> Path:
    """Write `out_tar` (atomically) from model_dir's model.pth, meta.json and code/.

    code/ files missing from the model dir are taken from this package's serving code (write_serving_code).
    """
    model_dir, out_tar = Path(model_dir), Path(out_tar)
    for name in REQUIRED:
        if not (model_dir / name).is_file():
            raise BincountError(f"{model_dir} has no {name}: not a trained model dir")
    out_tar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(out_tar)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in REQUIRED:
                tar.add(model_dir / name, arcname=name)
            with tempfile.TemporaryDirectory() as fallback:
                serving = write_serving_code(Path(fallback))
                for name in CODE_FILES:
                    source = model_dir / "code" / name
                    tar.add(source if source.is_file() else serving / name, arcname=f"code/{name}")
        os.replace(tmp, out_tar)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_tar


def _check_member(member: tarfile.TarInfo, tar_path: Path) -> None:
    name = member.name
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or (parts and ":" in parts[0]):
        raise BincountError(f"{tar_path}: unsafe path {name!r} in archive")
    if not (member.isfile() or member.isdir()):
        raise BincountError(f"{tar_path}: {name!r} is a link or special file; refusing to extract")


def extract_model(tar_path: Path, dest: Path) -> Path:
    """Unpack model.tar.gz into `dest` (regular files and folders only) and return `dest`.

    Absolute paths, '..' components, links and device files are rejected before anything is written;
    the files land in a temp folder renamed into place, so `dest` is never half-written.
    """
    tar_path, dest = Path(tar_path), Path(dest)
    if not tar_path.is_file():
        raise BincountError(f"{tar_path} not found")
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = []
            for member in tar:  # headers only: sizes are checked before a byte is written
                members.append(member)
                if len(members) > MAX_MEMBERS:
                    raise BincountError(f"{tar_path}: over {MAX_MEMBERS} files in the archive; not a bincount model")
                _check_member(member, tar_path)
                if member.size > MAX_MEMBER_BYTES:
                    raise BincountError(f"{tar_path}: {member.name!r} would expand to {member.size:,} bytes, over "
                                        f"the {MAX_MEMBER_BYTES:,} byte limit per file")
            total = sum(m.size for m in members)
            if total > MAX_TOTAL_BYTES:
                raise BincountError(f"{tar_path}: the archive would expand to {total:,} bytes, over the "
                                    f"{MAX_TOTAL_BYTES:,} byte limit")
            names = {Path(m.name).as_posix().lstrip("./") for m in members if m.isfile()}
            missing = [n for n in REQUIRED if n not in names]
            if missing:
                raise BincountError(f"{tar_path}: not a bincount model archive (missing {', '.join(missing)})")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
            tmp.chmod(new_dir_mode())  # mkdtemp makes it 0700 whatever the umask
            try:
                tar.extractall(tmp, members=members, filter="data")
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(tmp, dest)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        reason = "not a tar or tar.gz file" if isinstance(exc, tarfile.ReadError) else " ".join(str(exc).split())
        raise BincountError(f"{tar_path}: cannot read the model archive ({reason})") from None
    return dest


def check_code(model_dir: Path, trust: bool = False) -> Path:
    """The trust rule for code inside model artifacts, used wherever a model is loaded (serve, deploy,
    predict, evaluate, audit): an artifact's code/ runs in this process only if every file in it is
    byte-identical to this bincount version's serving code, or the user trusts it (deploy.trust_code).
    Model weights never run code (torch.load with weights_only=True); meta.json is plain JSON.
    """
    code = Path(model_dir) / "code"
    if trust or not code.is_dir():
        return model_dir
    shutil.rmtree(code / "__pycache__", ignore_errors=True)  # bytecode cannot be compared: Python rebuilds it
    ours = {name: (CONTAINER / name).read_bytes() for name in SERVING_FILES}
    foreign = []
    for path in sorted(code.iterdir()):
        if path.name == "requirements.txt" and path.is_file():
            continue  # read by SageMaker's container at deploy time, never run here
        if path.name not in ours or not path.is_file() or path.read_bytes() != ours[path.name]:
            foreign.append(path.name)
    if foreign:
        raise BincountError(f"{model_dir} carries code that is not this bincount version's ({', '.join(foreign[:5])} "
                            f"in code/): it would run in this process. If you trust its source, pass --set "
                            "deploy.trust_code=true; else delete its code/ folder to use this version's code")
    return model_dir


def model_dir_from(path: Path, cache: Path) -> Path:
    """A model dir from a model dir itself, or a model.tar.gz unpacked safely once into cache/<sha256 prefix>/."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "meta.json").is_file() or not (path / "model.pth").is_file():
            raise BincountError(f"{path} is not a model dir (needs meta.json and model.pth)")
        return path.resolve()
    if not path.is_file():
        raise BincountError(f"model {path} not found: pass a model dir, a model.tar.gz or an s3:// URI")
    dest = Path(cache) / file_sha256(path)[:16]
    if not (dest / "meta.json").is_file():
        extract_model(path, dest)
    return dest.resolve()


def load_error(model_dir: Path, exc: Exception) -> BincountError:
    """A one-line error for a model dir whose model.pth or meta.json cannot be loaded."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return BincountError(f"cannot load the model in {model_dir} (model.pth, meta.json): {type(exc).__name__}: {first}")


def _trained_model(training: Training | None, option: str) -> str:
    """The last trained model recorded in state.json: its local dir if still there, else its model.tar.gz."""
    if isinstance(training, LocalTraining) and (Path(training.model_dir) / "meta.json").is_file():
        return training.model_dir
    if training and training.model_data:
        return training.model_data
    raise BincountError(f"no trained model recorded: run `bincount train` first, or pass {option} PATH|s3://URI")


def _download(settings: Settings, uri: str, dest: Path) -> Path:
    from bincount.aws import parse_s3_uri, s3_client

    bucket, key = parse_s3_uri(uri)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    try:
        s3_client(settings, bucket).download_file(bucket, key, str(tmp))
    except Exception as exc:  # noqa: BLE001 - botocore raises many kinds
        tmp.unlink(missing_ok=True)
        raise BincountError(f"cannot download {uri}: {exc}") from None
    os.replace(tmp, dest)
    return dest


def resolve_model(settings: Settings, model: Path | str | None = None, option: str = "--model") -> Path:
    """A local model dir for `model`: a model dir, a model.tar.gz, an s3:// URI of one, or None for the
    run evaluate, deploy, predict and audit use (runs.used_training: the newest, or the pinned one). Archives are downloaded and unpacked safely once, into
    <workdir>/models/cache/, and reused. `option` names the CLI option in the error when there is none.
    Its code/ must pass check_code (the trust rule).
    """
    from bincount.runs import used_training
    from bincount.workspace import Workspace

    ws = Workspace(settings.workdir)
    source = str(model) if model else _trained_model(used_training(ws), option)
    cache = ws.models / "cache"
    if source.startswith("s3://"):
        name = hashlib.sha256(source.encode()).hexdigest()[:16]
        model_dir = model_dir_from(_download(settings, source, cache / "downloads" / f"{name}.tar.gz"), cache)
    else:
        model_dir = model_dir_from(Path(source), cache)
    return check_code(model_dir, settings.deploy.trust_code)


def write_model_dir(dest: Path, arch: str = "resnet18", image_size: int = 32, *, num_classes: int = 6,
                    seed: int = 0, model: Any = None, **meta: Any) -> Path:
    """A model dir in the artifact layout: model.pth, meta.json (every contract key) and code/.

    `model` (an nn.Module of `arch`) defaults to a randomly initialised one (seeded); `meta` adds or
    overrides meta.json keys. For tests, benchmarks and trying the serving path without training.
    """
    import torch

    from bincount.container import net

    dest = Path(dest)
    write_serving_code(dest / "code")
    if model is None:
        torch.manual_seed(seed)
        model = net.build_model(arch, num_classes)
    torch.save(model.state_dict(), dest / "model.pth")
    meta = {"arch": arch, "num_classes": num_classes, "classes": list(range(num_classes)), "image_size": image_size,
            "mean": list(net.IMAGENET_MEAN), "std": list(net.IMAGENET_STD), "tta": False, "metrics": {},
            "hyperparameters": {}, "manifest_digest": "", **meta}
    (dest / "meta.json").write_text(json.dumps(meta))
    return dest
