"""The SageMaker source_dir: train.py and its siblings (backends/sagemaker/estimator.TRAINING_FILES), inference.py,
net.py, epochlog.py, requirements.txt.

These files import only the standard library, torch, torchvision, PIL (and smdebug when present),
never the bincount package, so they run unchanged inside SageMaker's PyTorch containers and locally.
Sibling imports use `try: from . import x / except ImportError: import x` so both work.
"""
