"""NumPy >= 2.3 removed ndarray.tostring, which smdebug 1.0.34 still calls when it writes tensors.

install() wraps smdebug's make_tensor_proto so arrays reach it as a tiny ndarray view that has
`tostring` (= tobytes). A no-op when NumPy still has tostring, unless force=True (for tests).
Standard library, numpy and smdebug only; safe to call more than once.
"""

from __future__ import annotations


def install(force: bool = False) -> bool:
    """Patch smdebug if needed; returns True when the shim is (now) in place."""
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
