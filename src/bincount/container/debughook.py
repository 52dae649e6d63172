"""train.py's SageMaker Debugger hook (smdebug): optional, never allowed to break training."""

from __future__ import annotations

import os
import sys

from torch import nn

try:
    from .epochlog import log
except ImportError:  # run as a script: this folder is on sys.path
    from epochlog import log


def make_hook(args, dist: Dist, model: nn.Module, loss_fn: nn.Module):
    """The smdebug hook, or None (smdebug missing, broken, or not configured)."""
    if not dist.main:
        return None
    # smdebug's generated protobuf code is older than protobuf 4: newer protobufs (the DLC has 6.x) read it only
    # with the pure-Python implementation, which must be chosen before protobuf is first imported.
    if "google.protobuf" not in sys.modules:
        os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    try:
        try:
            from . import smdebug_compat
        except ImportError:
            import smdebug_compat
        smdebug_compat.install()
        import smdebug.pytorch as smd

        hook = smd.get_hook(create_if_not_exists=True)
        if hook is None and args.debugger_out_dir:
            from smdebug.core.reduction_config import ReductionConfig
            from smdebug.core.save_config import SaveConfig

            # Reductions (means, variances, norms), not whole tensors: a few KB per step instead of
            # the full weights and gradients; losses are kept whole.
            hook = smd.Hook(out_dir=args.debugger_out_dir, save_config=SaveConfig(save_interval=args.debugger_interval),
                            reduction_config=ReductionConfig(reductions=["mean", "variance"], abs_reductions=["mean"],
                                                             norms=["l2"]),
                            include_collections=["weights", "biases", "gradients", "losses"])
            hook.get_collection("losses").reduction_config = ReductionConfig()
        if hook is not None:
            hook.register_module(model)
            hook.register_loss(loss_fn)
            log(f"smdebug hook on ({getattr(hook, 'out_dir', '?')})")
        return hook
    except ImportError:
        return None
    except Exception as exc:  # smdebug is optional: never let it break training
        log(f"warning: smdebug hook disabled ({type(exc).__name__}: {exc})")
        return None


def set_mode(hook, mode: str) -> None:
    if hook is not None:
        import smdebug.pytorch as smd

        hook.set_mode(smd.modes.TRAIN if mode == "train" else smd.modes.EVAL)


