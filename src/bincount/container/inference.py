"""SageMaker inference handlers: model_fn, input_fn, predict_fn, output_fn.

The same functions serve on a SageMaker PyTorch endpoint and in `bincount serve`.

Requests (Content-Type):
  image/jpeg, image/png, application/x-image, application/octet-stream: the image bytes (one image);
  application/json: {"instances": ["<base64 image>", ...]} or just ["<base64 image>", ...] (a batch).
Response (application/json):
  {"count": 3, "confidence": 0.71, "probabilities": {"0": ..., "5": ...}} for one raw image,
  a list of those for a JSON batch (always a list, even of one).

Bad input raises `RequestError` carrying an HTTP status (400 bad image, 413 too large, 415 wrong type,
406 unacceptable Accept). `bincount serve` answers it as a 4xx JSON error. In SageMaker's PyTorch
serving containers RequestError extends sagemaker_inference's BaseInferenceToolkitError, so the
endpoint answers the same 4xx there; any other handler exception becomes a 500 with its message.
Limits: 6 MB per request body (SageMaker's real-time limit), 40 megapixels per request (checked from
the image header before decoding, so decompression bombs are refused cheaply), 64 images per batch.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings

import torch

try:
    from . import net
except ImportError:  # SageMaker: code/ is on sys.path
    import net

MAX_BODY_BYTES = 6 * 1024 * 1024
MAX_PIXELS = 40_000_000  # per request, all images together
MAX_BATCH = 64
FORWARD_BATCH = 32  # images per forward pass (bounds memory for big batches)
IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image", "application/octet-stream")
JSON_TYPES = ("application/json",)
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # decoders we let PIL use on untrusted bytes


try:  # present in SageMaker's serving containers: its errors carry their HTTP status to the client
    from sagemaker_inference.errors import BaseInferenceToolkitError as _ErrorBase
except ImportError:
    _ErrorBase = Exception


class RequestError(_ErrorBase):
    """The request cannot be served as sent; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        if _ErrorBase is Exception:
            super().__init__(message)
        else:  # BaseInferenceToolkitError(status_code, message, phrase)
            super().__init__(status, message, message)
        self.status = self.status_code = status
        self.message = message

    def __str__(self) -> str:
        return self.message


class Batch(list):
    """A list of decoded images (or predictions) that remembers whether the request was a batch."""

    def __init__(self, items=(), batch: bool = False):
        super().__init__(items)
        self.batch = batch


def model_fn(model_dir: str) -> dict:
    model, meta = net.load_model(model_dir)
    return {"model": model, "meta": meta}


def _media_type(content_type) -> str:
    return str(content_type or "application/x-image").split(";")[0].strip().lower()


def _decode(data: bytes, what: str = "body"):
    """Bytes -> a loaded RGB PIL image, or RequestError saying why not."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError(f"empty {what}: send the image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise RequestError(f"{what}: image too large to decode ({exc})", 413) from None
        except UnidentifiedImageError:
            raise RequestError(f"{what} is not an image (expected JPEG, PNG, WEBP, BMP or GIF)") from None
        except Exception as exc:  # noqa: BLE001 - a malformed header can raise many things
            raise RequestError(f"{what}: truncated or corrupt image ({type(exc).__name__}: {exc})") from None
        width, height = image.size
        if width < 1 or height < 1 or width * height > MAX_PIXELS:
            raise RequestError(f"{what}: image is {width}x{height} pixels, over the {MAX_PIXELS:,} pixel limit", 413)
        try:
            image.load()
            return image.convert("RGB"), width * height
        except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, SyntaxError, ...
            raise RequestError(f"{what}: truncated or corrupt image ({exc})") from None


def _instances(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"body is not valid JSON ({exc})") from None
    items = doc.get("instances") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise RequestError('JSON body must be {"instances": ["<base64 image>", ...]} or a list of base64 strings')
    if not items:
        raise RequestError("JSON batch is empty")
    if len(items) > MAX_BATCH:
        raise RequestError(f"JSON batch has {len(items)} images, over the limit of {MAX_BATCH}", 413)
    return items


def input_fn(body, content_type: str = "application/x-image") -> Batch:
    """Request body -> a Batch (list) of RGB PIL images. Raises RequestError on bad input."""
    if isinstance(body, str):
        body = body.encode()
    body = bytes(body or b"")
    media = _media_type(content_type)
    if media not in IMAGE_TYPES + JSON_TYPES:
        raise RequestError(f"unsupported content type {media!r}; send one of {', '.join(IMAGE_TYPES + JSON_TYPES)}", 415)
    if not body:
        raise RequestError("empty body: send an image, or a JSON batch of base64 images")
    if len(body) > MAX_BODY_BYTES:
        raise RequestError(f"body is {len(body):,} bytes, over the {MAX_BODY_BYTES:,} byte limit", 413)
    if media in IMAGE_TYPES:
        return Batch([_decode(body)[0]], batch=False)
    images, pixels = [], 0
    for i, item in enumerate(_instances(body)):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"instances[{i}] is not valid base64") from None
        image, n = _decode(data, f"instances[{i}]")
        pixels += n
        if pixels > MAX_PIXELS:
            raise RequestError(f"the batch holds over {MAX_PIXELS:,} pixels in all; send fewer or smaller images", 413)
        images.append(image)
    return Batch(images, batch=True)


def predict_fn(images: list, bundle: dict) -> Batch:
    """Images -> one prediction dict per image: count, confidence, probabilities per count."""
    meta, model = bundle["meta"], bundle["model"]
    classes = meta["classes"]
    out = Batch(batch=getattr(images, "batch", len(images) != 1))
    with torch.inference_mode():
        for start in range(0, len(images), FORWARD_BATCH):
            chunk = images[start:start + FORWARD_BATCH]
            batch = torch.stack([net.preprocess(im, meta["image_size"], meta["mean"], meta["std"]) for im in chunk])
            probs = net.predict_proba(model, batch, bool(meta.get("tta")))
            for row in probs.tolist():
                best = max(range(len(row)), key=row.__getitem__)
                out.append({"count": classes[best], "confidence": row[best],
                            "probabilities": {str(c): p for c, p in zip(classes, row)}})
    return out


def output_fn(prediction: list, accept: str = "application/json") -> str:
    """Predictions -> JSON: one object for a single raw image, a list for a JSON batch."""
    media = str(accept or "application/json").split(",")
    if not any(m.split(";")[0].strip().lower() in ("application/json", "*/*", "application/*", "") for m in media):
        raise RequestError(f"cannot answer in {accept!r}; this endpoint answers application/json", 406)
    batch = getattr(prediction, "batch", len(prediction) != 1)
    return json.dumps(list(prediction) if batch else prediction[0])
