"""Two patches that keep smdebug 1.0.34's hook writing tensors on today's NumPy and torch.

- NumPy >= 2.3 removed ndarray.tostring, which smdebug still calls when it writes tensors: its
  make_tensor_proto gets arrays as a tiny ndarray view that has `tostring` (= tobytes).
- NumPy has no bfloat16, so `.numpy()` on a tensor that autocast made bfloat16 (activations such as
  the ReLU inputs PoorWeightInitialization reads, on any CPU or GPU running bfloat16 autocast) raises
  "Got unsupported ScalarType BFloat16" and fails the job at its first saved step. The hook's
  tensor-to-array conversion upcasts dtypes NumPy lacks to float32 (exact for bfloat16).

install() applies both (the first only where NumPy lacks tostring, unless force=True, for tests).
Standard library, numpy, torch and smdebug only; safe to call more than once.
"""

from __future__ import annotations


def install(force: bool = False) -> bool:
    """Patch smdebug where needed; returns True when the tostring shim is (now) in place."""
    _install_bfloat16()
    return _install_tostring(force)


def _install_tostring(force: bool) -> bool:
    import numpy as np

    if hasattr(np.ndarray, "tostring") and not force:
        return False
    import smdebug.core.tfevent.util as util
    import smdebug.core.writer as writer

    if getattr(util.make_tensor_proto, "_bincount_shim", False):
        return True

    class _Array(np.ndarray):
        def tostring(self, order="C"):
            return self.tobytes(order)

    original = util.make_tensor_proto

    def make_tensor_proto(nparray_data, tag):
        return original(np.asarray(nparray_data).view(_Array), tag)

    make_tensor_proto._bincount_shim = True
    util.make_tensor_proto = writer.make_tensor_proto = make_tensor_proto
    return True


# torch dtypes NumPy cannot hold: saved as float32 (every value of each is exactly representable there).
_NO_NUMPY = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


def _install_bfloat16() -> None:
    import torch
    from smdebug.pytorch.hook import Hook

    if getattr(Hook._make_numpy_array, "_bincount_shim", False):
        return
    upcast = {getattr(torch, name) for name in _NO_NUMPY if hasattr(torch, name)}
    original = Hook._make_numpy_array

    def _make_numpy_array(tensor_value):
        if isinstance(tensor_value, torch.Tensor) and tensor_value.dtype in upcast:
            tensor_value = tensor_value.detach().float()
        return original(tensor_value)

    _make_numpy_array._bincount_shim = True
    Hook._make_numpy_array = staticmethod(_make_numpy_array)
