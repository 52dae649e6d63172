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
Limits, all checked from the image header before decoding (decompression bombs are refused cheaply):
6 MB per request body (SageMaker's real-time limit); 64 images per batch; a JPEG over 4 megapixels is
decoded in draft mode, at 1/2, 1/4 or 1/8 scale (libjpeg scales while decoding: less memory, faster);
at most 16.8 megapixels decoded per image (4096x4096; a bigger PNG is refused with 413). What decoding
really costs is counted in pixels of 4 bytes (decode_cost: the mode's bytes per pixel and the RGB copy,
libwebp's buffer, a progressive JPEG's full-size coefficients): at most 40 M per request (160 MB), and
a budget on what is decoded at once in this process (INFERENCE_PIXEL_BUDGET, default 48 M, 192 MB): a
request waits for room, up to INFERENCE_QUEUE_TIMEOUT_S (default 30) seconds, then gets a 503. Images
up to 4 megapixels decode exactly as before, so their answers do not change.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import threading
import warnings
import weakref

import torch

try:
    from . import net
except ImportError:  # SageMaker: code/ is on sys.path
    import net

MAX_BODY_BYTES = 6 * 1024 * 1024
MAX_PIXELS = 40_000_000  # decode cost per request (pixels of 4 bytes, see decode_cost), all images together
MAX_IMAGE_PIXELS = 4096 * 4096  # decoded pixels per image: a bigger PNG (no draft mode) is refused
MAX_SOURCE_PIXELS = 64_000_000  # pixels a JPEG's header may claim (draft mode still reads all of it)
DRAFT_ABOVE, DRAFT_SIDE = net.DRAFT_ABOVE, net.DRAFT_SIDE  # net.draft(): JPEGs over 4 MP decode at a reduced scale
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
    """A list of decoded images (or predictions) that remembers whether the request was a batch.

    Decoded images hold pixels of the process's PixelBudget until release() (predict_fn calls it), or
    until the batch is garbage collected.
    """

    def __init__(self, items=(), batch: bool = False):
        super().__init__(items)
        self.batch = batch
        self._release = None

    def hold(self, budget: PixelBudget, pixels: int) -> None:
        self._release = weakref.finalize(self, budget.release, pixels)

    def release(self) -> None:
        if self._release is not None:
            self._release()


class PixelBudget:
    """The pixels decoded at once in this process, bounded: a request waits for room, else a 503."""

    def __init__(self, total: int, timeout: float):
        self.total, self.timeout, self.used = total, timeout, 0
        self._room = threading.Condition()

    @classmethod
    def from_env(cls) -> PixelBudget:
        try:
            total = int(os.environ.get("INFERENCE_PIXEL_BUDGET", 48_000_000))
            timeout = float(os.environ.get("INFERENCE_QUEUE_TIMEOUT_S", 30))
        except ValueError:
            total, timeout = 48_000_000, 30.0
        return cls(max(total, 1), max(timeout, 0.0))

    def acquire(self, pixels: int) -> None:
        if pixels > self.total:
            raise RequestError(f"the request holds {pixels:,} pixels, over this server's budget of "
                               f"{self.total:,} decoded pixels; send fewer or smaller images", 413)
        with self._room:
            if not self._room.wait_for(lambda: self.used + pixels <= self.total, self.timeout):
                raise RequestError(f"server busy: no room to decode {pixels:,} pixels within "
                                   f"{self.timeout:g}s; retry later", 503)
            self.used += pixels

    def release(self, pixels: int) -> None:
        with self._room:
            self.used -= pixels
            self._room.notify_all()


PIXEL_BUDGET = PixelBudget.from_env()


def model_fn(model_dir: str) -> dict:
    model, meta = net.load_model(model_dir)
    return {"model": model, "meta": meta}


def _media_type(content_type) -> str:
    return str(content_type or "application/x-image").split(";")[0].strip().lower()


def _open(data: bytes, what: str = "body"):
    """Bytes -> an opened (not yet decoded) PIL image, set to decode at most MAX_IMAGE_PIXELS.

    Large JPEGs are set to draft mode; returns (image, pixels it will decode to), or RequestError.
    """
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
    if width < 1 or height < 1:
        raise RequestError(f"{what}: image is {width}x{height} pixels")
    if width * height <= MAX_SOURCE_PIXELS:
        try:
            net.draft(image)  # the decode training, evaluate and the shard reader use (net.decode)
        except Exception as exc:  # noqa: BLE001
            raise RequestError(f"{what}: truncated or corrupt image ({type(exc).__name__}: {exc})") from None
    pixels = image.size[0] * image.size[1]
    if pixels > MAX_IMAGE_PIXELS:
        raise RequestError(f"{what}: image is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} pixel limit "
                           f"per image (JPEGs up to {MAX_SOURCE_PIXELS:,} pixels are decoded at reduced scale)", 413)
    cost = decode_cost(image, data, width, height)
    if cost > MAX_PIXELS:
        raise RequestError(f"{what}: decoding this {width}x{height} {image.format} ({image.mode}"
                           f"{', several scans' if _coefficient_bytes(image, data, width, height) else ''}) would take "
                           f"{cost * 4 / 2**20:,.0f} MB, over the {MAX_PIXELS * 4 / 2**20:,.0f} MB a request may use", 413)
    return image, cost


MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2}  # PIL's storage per pixel; others 4
WEBP_EXTRA_BYTES = 12  # libwebp decodes into its own RGBA buffer, then PIL copies it (measured 15.4 B/pixel in all)


def decode_cost(image, data: bytes, width: int, height: int) -> int:
    """What decoding `image` costs in memory, in pixels of 4 bytes (the unit of the budget and the limits).

    The decoded pixels at their mode's size, plus an RGB copy when the mode is not RGB (RGBA, palette, grey),
    plus libwebp's own buffer for WebP, plus, for a JPEG of several scans (progressive), the coefficients
    libjpeg holds for the whole source image, 2 bytes each, whatever the draft scale (measured: a progressive
    8000x8000 JPEG decoded at 1/4 scale took 199 MB, a baseline one 16 MB).
    """
    pixels = image.size[0] * image.size[1]
    total = pixels * MODE_BYTES.get(image.mode, 4) + (0 if image.mode == "RGB" else pixels * 4)
    if image.format == "WEBP":
        total += pixels * WEBP_EXTRA_BYTES
    total += _coefficient_bytes(image, data, width, height)
    return -(-total // 4)


def _coefficient_bytes(image, data: bytes, width: int, height: int) -> int:
    """The DCT coefficients libjpeg buffers for a JPEG of several scans (0 for a single-scan one)."""
    if image.format != "JPEG" or not (image.info.get("progressive") or _jpeg_scans(data) > 1):
        return 0
    layers = [(h, v) for _, h, v, *_ in getattr(image, "layer", None) or []] or [(1, 1)] * 3
    hmax, vmax = max(h for h, _ in layers) or 1, max(v for _, v in layers) or 1
    return sum(-(-(-(-width * h // hmax)) // 8) * -(-(-(-height * v // vmax)) // 8) * 64 * 2 for h, v in layers)


def _jpeg_scans(data: bytes) -> int:
    """How many scans (SOS markers) the main JPEG image has: its segments are walked (an EXIF thumbnail inside
    APP1 is skipped), then the entropy-coded data, where a marker byte cannot occur unstuffed, is searched."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
        elif marker == 0xDA:
            return 1 + data.count(b"\xff\xda", i + 2)
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return 1


def _load(image, what: str = "body"):
    """An opened image -> decoded RGB, or RequestError."""
    try:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated data raises OSError, SyntaxError, ...
        raise RequestError(f"{what}: truncated or corrupt image ({exc})") from None


def _decode(data: bytes, what: str = "body"):
    """Bytes -> (a decoded RGB PIL image, its pixel count), or RequestError saying why not."""
    image, pixels = _open(data, what)
    return _load(image, what), pixels


def _instances(body: bytes) -> list[str]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("body is JSON nested too deeply; send {\"instances\": [\"<base64 image>\", ...]}") from None
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
        opened = [_open(body)]
    else:
        opened = []
        for i, item in enumerate(_instances(body)):
            try:
                data = base64.b64decode(item, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(f"instances[{i}] is not valid base64") from None
            opened.append(_open(data, f"instances[{i}]"))
    pixels = sum(n for _, n in opened)  # what decoding costs, in pixels of 4 bytes (decode_cost)
    if pixels > MAX_PIXELS:
        raise RequestError(f"the request's images take {pixels * 4 / 2**20:,.0f} MB to decode in all, over the "
                           f"{MAX_PIXELS * 4 / 2**20:,.0f} MB ({MAX_PIXELS:,} pixel) limit; send fewer or smaller images", 413)
    PIXEL_BUDGET.acquire(pixels)
    images = Batch(batch=media not in IMAGE_TYPES)
    images.hold(PIXEL_BUDGET, pixels)
    try:
        for i, (image, _) in enumerate(opened):
            images.append(_load(image, f"instances[{i}]" if images.batch else "body"))
    except BaseException:
        images.release()
        raise
    return images


def predict_fn(images: list, bundle: dict) -> Batch:
    """Images -> one prediction dict per image: count, confidence, probabilities per count."""
    meta, model = bundle["meta"], bundle["model"]
    classes = meta["classes"]
    out = Batch(batch=getattr(images, "batch", len(images) != 1))
    try:
        with torch.inference_mode():
            for start in range(0, len(images), FORWARD_BATCH):
                chunk = images[start:start + FORWARD_BATCH]
                batch = torch.stack([net.to_uint8(im, meta["image_size"]) for im in chunk])
                probs = net.probabilities(model, batch, meta["mean"], meta["std"], bool(meta.get("tta")))
                for row in probs.tolist():
                    best = max(range(len(row)), key=row.__getitem__)
                    out.append({"count": classes[best], "confidence": row[best],
                                "probabilities": {str(c): p for c, p in zip(classes, row)}})
    finally:
        if isinstance(images, Batch):
            images.release()  # the decoded pixels are done with
    return out


def output_fn(prediction: list, accept: str = "application/json") -> str:
    """Predictions -> JSON: one object for a single raw image, a list for a JSON batch."""
    media = str(accept or "application/json").split(",")
    if not any(m.split(";")[0].strip().lower() in ("application/json", "*/*", "application/*", "") for m in media):
        raise RequestError(f"cannot answer in {accept!r}; this endpoint answers application/json", 406)
    batch = getattr(prediction, "batch", len(prediction) != 1)
    try:
        return json.dumps(list(prediction) if batch else prediction[0], allow_nan=False)
    except ValueError:  # NaN or infinity is not JSON: a broken model, never an answer
        raise ValueError("the model produced a non-finite probability (NaN or infinity): its weights or "
                         "meta.json are broken") from None
