"""SageMaker inference handlers: model_fn, input_fn, predict_fn, output_fn.

The same functions serve on a SageMaker PyTorch endpoint and in `bincount serve`.
Response: {"count": 3, "confidence": 0.71, "probabilities": {"0": ..., "5": ...}} (a list for a batch).
"""

from __future__ import annotations

import io
import json

import torch

try:
    from . import net
except ImportError:  # SageMaker: code/ is on sys.path
    import net


def model_fn(model_dir: str) -> dict:
    model, meta = net.load_model(model_dir)
    return {"model": model, "meta": meta}


def input_fn(body: bytes, content_type: str = "application/x-image") -> list:
    from PIL import Image

    image = Image.open(io.BytesIO(body))
    image.load()
    return [image]


@torch.inference_mode()
def predict_fn(images: list, bundle: dict) -> list[dict]:
    meta, model = bundle["meta"], bundle["model"]
    batch = torch.stack([net.preprocess(im, meta["image_size"], meta["mean"], meta["std"]) for im in images])
    probs = torch.softmax(model(batch), dim=1)
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"count": meta["classes"][best], "confidence": row[best],
                    "probabilities": {str(c): p for c, p in zip(meta["classes"], row)}})
    return out


def output_fn(prediction: list[dict], accept: str = "application/json") -> str:
    return json.dumps(prediction[0] if len(prediction) == 1 else prediction)
