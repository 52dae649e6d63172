"""A model's own request handlers: the artifact's `code/inference.py` (model_fn, input_fn, predict_fn,
output_fn), loaded from the model dir as SageMaker loads it, so what works here works there.

Used by the local endpoint (bincount.serve) and by `predict --model` (no server). Handler errors with a
4xx or 503 `status` (inference.RequestError) are the client's answer; anything else is a 500.
Only load artifacts you trust: their code/ runs in this process, as it does on SageMaker.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

from bincount.errors import BincountError

SIBLINGS = ("inference", "net", "epochlog")  # modules an artifact's code/ may import by bare name
_LOAD_LOCK = threading.Lock()


# -- the model: load the artifact's own handlers (artifacts.resolve_model finds it) --------------
def load_handlers(model_dir: Path | str) -> ModuleType:
    """The artifact's code/inference.py as a module (code/ on sys.path for its `import net`).

    Falls back to the packaged bincount.container.inference when the artifact has no code/.
    """
    code = Path(model_dir) / "code"
    script = code / "inference.py"
    if not script.is_file():
        from bincount.container import inference

        return inference
    with _LOAD_LOCK:
        saved = {name: sys.modules.pop(name) for name in SIBLINGS if name in sys.modules}
        sys.path.insert(0, str(code))
        try:
            name = f"bincount_artifact_{hashlib.sha256(str(script.resolve()).encode()).hexdigest()[:12]}"
            spec = importlib.util.spec_from_file_location(name, script)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken artifact should say so in one line
            raise BincountError(f"cannot load {script}: {type(exc).__name__}: {exc}") from None
        finally:
            sys.path.remove(str(code))
            for sibling in SIBLINGS:  # the loaded module keeps its own references
                sys.modules.pop(sibling, None)
            sys.modules.update(saved)
    for fn in ("model_fn", "input_fn", "predict_fn", "output_fn"):
        if not callable(getattr(module, fn, None)):
            raise BincountError(f"{script} has no {fn}()")
    return module


class Handlers:
    """The four handlers over one loaded model: `invoke(body, content_type, accept) -> JSON text`.

    Requests run concurrently: an eval-mode model's forward pass changes no state, so it is thread-safe,
    and benchmarks/serve.py measures it faster than serialising predict_fn (lock=True) on CPU.
    """

    def __init__(self, model_dir: Path | str, lock: bool = False):
        self.model_dir = Path(model_dir)
        self.module = load_handlers(self.model_dir)
        try:
            self.bundle = self.module.model_fn(str(self.model_dir))
        except Exception as exc:  # noqa: BLE001 - a broken model.pth or meta.json: one line, not a traceback
            from bincount.artifacts import load_error

            raise load_error(self.model_dir, exc) from None
        self._lock = threading.Lock() if lock else None

    def invoke(self, body: bytes, content_type: str | None = None, accept: str | None = None) -> str:
        data = self.module.input_fn(body, content_type or "application/x-image")
        if self._lock is None:
            prediction = self.module.predict_fn(data, self.bundle)
        else:
            with self._lock:
                prediction = self.module.predict_fn(data, self.bundle)
        return self.module.output_fn(prediction, accept or "application/json")


def client_status(exc: BaseException) -> int | None:
    """The 4xx or 503 status an exception asks for (inference.RequestError and the like), else None."""
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and (400 <= status < 500 or status == 503) else None
