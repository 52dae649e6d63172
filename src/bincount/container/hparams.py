"""The training hyperparameters, declared once: name, type, default, choices and help.

train.py builds its argument parser from HYPERPARAMETERS; bincount's config.py builds its `train`
settings from the same table (their defaults and descriptions), so the two cannot drift. Standard
library only: config.py imports this module without importing torch.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple


class UsageError(Exception):
    """Bad input the user can fix: train.py reports it as one line, exit code 2."""


class Hyperparameter(NamedTuple):
    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


def str2bool(value: str | bool) -> bool:
    """SageMaker passes booleans as text: true/false (and 1/0, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


H = Hyperparameter
ARCHS = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large")  # = net.ARCHS (a test checks)
STEMS = ("standard", "small")  # = net.STEMS

HYPERPARAMETERS: tuple[Hyperparameter, ...] = (
    H("arch", str, "resnet18", "torchvision backbone", ARCHS),
    H("stem", str, "standard", "small: no stem max-pool (mobilenet: stride-1 first conv), for inputs below ~128 px", STEMS),
    H("pretrained", str, "none", "imagenet | none | a local .pth/.pt file (made absolute) | an s3:// URI of one "
      "(sagemaker backend: the job's weights channel)"),
    H("epochs", int, 20, "maximum epochs (early stopping may end sooner)"),
    H("batch_size", int, 64, "images per step (per process under DDP)"),
    H("lr", float, 1e-3, "peak learning rate (after warm-up; cosine decay to the end)"),
    H("weight_decay", float, 1e-4, "decoupled weight decay (AdamW) or L2 (SGD)"),
    H("optimizer", str, "adamw", "adamw or sgd", ("adamw", "sgd")),
    H("momentum", float, 0.9, "SGD momentum"),
    H("warmup_epochs", int, 1, "epochs of linear learning-rate warm-up"),
    H("label_smoothing", float, 0.05, "label smoothing of the cross-entropy loss"),
    H("count_loss", float, 0.5, "weight of |expected count - count| (softmax mean) added to the loss"),
    H("ema_decay", float, 0.995, "validate and ship an exponential moving average of the weights (0 = off)"),
    H("class_weighting", bool, False, "weight the loss by inverse class frequency (for unbalanced counts)"),
    H("image_size", int, 224, "input size in pixels: the whole bin is resized, never cropped"),
    H("tta", bool, False, "test-time augmentation, recorded in the model: evaluate, serve and predict average the "
      "8 flips/transposes of each bin (8x the inference cost; check with evaluate --tta/--no-tta)"),
    H("patience", int, 5, "early stopping: epochs without a better val metric (0 = never stop)"),
    H("num_workers", int, None, "DataLoader workers; default sized to the machine"),
    H("seed", int, 0, "random seed for initialisation, shuffling and augmentation"),
    H("shuffle_buffer", int, 1000, "shard channels: samples in the streaming shuffle buffer"),
    H("amp", bool, True, "mixed precision: float16 on CUDA, bfloat16 on CPUs with native bfloat16 (else off)"),
)
BY_NAME = {h.name: h for h in HYPERPARAMETERS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--name value` for each hyperparameter, as SageMaker passes them (booleans as true/false)."""
    for h in HYPERPARAMETERS:
        parser.add_argument(f"--{h.name}", type=str2bool if h.type is bool else h.type, default=h.default,
                            choices=h.choices, help=h.help)
