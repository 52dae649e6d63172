"""Model building, preprocessing and loading, shared by train.py and inference.py.

Counting is classification over counts 0..num_classes-1 on a torchvision backbone.
Imports only torch, torchvision, PIL and the standard library.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")
STEMS = ("standard", "small")  # small: 2x less downsampling in the stem, for inputs below ~128 px
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline and not cached)."""


def imagenet_url(arch: str) -> str:
    import torchvision.models as models

    return models.get_model_weights(arch).DEFAULT.url


def imagenet_cache_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of `arch` (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(imagenet_url(arch))


def imagenet_file(arch: str, download: bool = False) -> Path:
    """The cached ImageNet weights file of `arch`; downloaded by torchvision only when `download` is true."""
    cache = imagenet_cache_file(arch)
    if not cache.exists():
        if not download:
            raise WeightsUnavailable(
                f"ImageNet weights for {arch} are not cached at {cache}; download them once with network access "
                f"(python -c \"import torchvision; torchvision.models.{arch}(weights='DEFAULT')\"), "
                "pass a local weights file as pretrained, or use pretrained=none")
        import torchvision.models as models

        models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False, check_hash=True)
    return cache


def build_model(arch: str, num_classes: int, pretrained: str = "none", stem: str = "standard",
                download: bool = False) -> nn.Module:
    """A torchvision backbone with a `num_classes` head. pretrained: imagenet | none | path to weights.

    A weights file must fit the backbone (its classifier head is dropped; any other missing or unexpected
    key is an error). stem="small" keeps 4x more feature-map area for small inputs: resnet drops the stem's
    max-pool, mobilenet's first convolution gets stride 1 (same weights, so pretrained files still load).
    """
    import torchvision.models as models

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of {', '.join(STEMS)}")
    model = models.get_model(arch, weights=None)
    if pretrained == "imagenet":
        pretrained = str(imagenet_file(arch, download))
    if pretrained not in ("none", "", None):
        if str(pretrained).startswith("s3://"):
            raise WeightsUnavailable(f"pretrained={pretrained}: an s3:// URI reaches only SageMaker jobs (as their "
                                     "weights channel); pass a local .pth/.pt file here")
        if not Path(pretrained).is_file():
            raise WeightsUnavailable(f"pretrained weights file {pretrained} not found; pass an existing .pth/.pt file, imagenet or none")
        state = torch.load(pretrained, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise WeightsUnavailable(f"pretrained weights file {pretrained} holds no state dict")
        result = model.load_state_dict({k: v for k, v in state.items() if not _is_head(k)}, strict=False)
        wrong = [k for k in (*result.missing_keys, *result.unexpected_keys) if not _is_head(k)]
        if wrong:
            raise WeightsUnavailable(f"pretrained weights file {pretrained} does not fit {arch}: {len(wrong)} missing or "
                                     f"unexpected keys (e.g. {wrong[0]})")
    if arch.startswith("resnet"):
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    else:
        last = model.classifier[-1]
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
    if stem == "small":
        if arch.startswith("resnet"):
            model.maxpool = nn.Identity()
        else:
            model.features[0][0].stride = (1, 1)
    return model


def _is_head(key: str) -> bool:
    return key.startswith(("fc.", "classifier.3.", "classifier.6."))


DRAFT_ABOVE = 2048 * 2048  # JPEGs over this many pixels are decoded at a reduced scale ...
DRAFT_SIDE = 1024  # ... the smallest of 1/2, 1/4, 1/8 that keeps both sides at least this long


def draft(image) -> None:
    """Set an opened, not yet decoded JPEG over DRAFT_ABOVE pixels to decode at 1/2, 1/4 or 1/8 scale (libjpeg
    scales while decoding: less memory, several times faster), keeping both sides >= DRAFT_SIDE; else nothing.

    The rule does not depend on the model's image_size, so the serving handlers (which decode before they
    see the model) apply it exactly as training, evaluation and the shard reader do.
    """
    if image.format == "JPEG" and image.size[0] * image.size[1] > DRAFT_ABOVE:
        image.draft("RGB", (DRAFT_SIDE, DRAFT_SIDE))


def decode(source, image_size: int) -> torch.Tensor:
    """THE image decode: a path, bytes or an opened (not yet decoded) PIL image -> uint8 [3, S, S].

    draft() then to_uint8(): train.py (files), the shard reader, `bincount evaluate` and the serving
    handlers (input_fn drafts and decodes, predict_fn calls preprocess) all go through these two steps,
    so they see the same pixels (tests/container/test_decode.py compares the four).
    """
    import io

    from PIL import Image

    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    if isinstance(source, Image.Image):
        draft(source)
        return to_uint8(source, image_size)
    with Image.open(source) as image:
        draft(image)
        return to_uint8(image, image_size)


def to_uint8(image, image_size: int) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, S, S]: the whole picture resized once (nothing cropped away).

    train.py caches these tensors; preprocess() normalises them, so training and serving see the same pixels.
    """
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    if image.mode != "RGB":  # (convert() to the same mode would copy the whole image)
        image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BILINEAR)
    return pil_to_tensor(image)


def standardize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Float images in 0..1 [..., 3, S, S] -> normalised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(3, 1, 1)
    return (images - mean_t) / std_t


def normalize(batch: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float, scaled to 0..1 and normalised per channel."""
    return standardize(batch.float().div_(255), mean, std)


def preprocess(image, image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL image -> normalised float tensor [3, S, S]: the whole picture resized (nothing cropped away)."""
    return normalize(to_uint8(image, image_size), mean, std)


def views(batch: torch.Tensor) -> list[torch.Tensor]:
    """The count-preserving views of a batch [B, 3, H, W]: 4 flips, times 2 with the transpose when square."""
    flips = [batch, batch.flip(3), batch.flip(2), batch.flip(2, 3)]
    return flips + [v.transpose(2, 3) for v in flips] if batch.shape[2] == batch.shape[3] else flips


def predict_proba(model: nn.Module, batch: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Softmax over the counts [B, num_classes]; with tta, averaged over views(batch) (test-time augmentation).

    The model was trained on exactly these flips and transposes. Averaging them costs 8x the compute; it
    gained 1-2 points on well-trained models and lost some on a weak one, so measure it (evaluate --tta).
    """
    if not tta:
        return model(batch).float().softmax(1)
    return torch.stack([model(v).float().softmax(1) for v in views(batch)]).mean(0)


def probabilities(model: nn.Module, images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  tta: bool = False) -> torch.Tensor:
    """THE scoring of decoded images: uint8 [B, 3, S, S] -> softmax over the counts [B, num_classes], in
    float32 (no autocast), as the endpoint (predict_fn), `bincount evaluate` and train.py's test metrics
    all compute it, so a model scores the same everywhere (tests/test_evaluate.py checks train.py's
    test_rmse against evaluate's)."""
    return predict_proba(model, normalize(images.contiguous(), mean, std), tta)


def check_meta(meta: object) -> dict:
    """meta.json's values within sane bounds (it sizes the model and every input), else ValueError naming the first
    bad one: an artifact whose code passes the trust rule may still carry image_size 12000 (13.5 GB for one
    prediction) or std 0 (NaN answers)."""
    import math

    def number(v: object, lo: float, hi: float) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi

    def whole(v: object, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if not isinstance(meta, dict):
        raise ValueError("meta.json: not a JSON object")
    n = meta.get("num_classes")
    rules = {
        "arch": (lambda v: v in ARCHS, f"one of {', '.join(ARCHS)}"),
        "stem": (lambda v: v in STEMS, f"one of {', '.join(STEMS)}"),
        "num_classes": (lambda v: whole(v, 1, 1000), "a whole number 1..1000"),
        "classes": (lambda v: isinstance(v, list) and len(v) == n and len(set(map(repr, v))) == len(v)
                    and all(whole(c, 0, 100_000) for c in v), "num_classes distinct whole numbers 0..100000"),
        "image_size": (lambda v: whole(v, 16, 1024), "a whole number of pixels 16..1024"),
        "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(number(x, 0, 1) for x in v), "3 numbers 0..1"),
        "std": (lambda v: isinstance(v, list) and len(v) == 3 and all(number(x, 1e-3, 10) for x in v),
                "3 numbers 0.001..10"),
        "tta": (lambda v: isinstance(v, bool), "true or false"),
    }
    defaults = {"stem": "standard", "tta": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    for key, (ok, want) in rules.items():
        value = meta.get(key, defaults.get(key))
        if not ok(value):
            raise ValueError(f"meta.json: {key} is {repr(value)[:40]}; expected {want}")
    return meta


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Load model.pth (weights_only) and meta.json from a model dir; returns (model in eval mode, meta)."""
    model_dir = Path(model_dir)
    meta = check_meta(json.loads((model_dir / "meta.json").read_text()))
    model = build_model(meta["arch"], meta["num_classes"], "none", meta.get("stem", "standard"))
    state = torch.load(model_dir / "model.pth", map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta
