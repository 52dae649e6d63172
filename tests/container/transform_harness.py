"""A minimal driver of the real sagemaker-inference handler chain over an artifact's code/inference.py.

SageMaker's PyTorch serving containers (endpoints, serverless endpoints and Batch Transform alike) run
the model server, which calls sagemaker_inference's Transformer.transform(data, context) per request:
it imports the user module named by SAGEMAKER_PROGRAM from the model dir's code/ (on sys.path), calls
model_fn(model_dir) once, then input_fn -> predict_fn -> output_fn, and turns a
BaseInferenceToolkitError into that status code. Here the Context is a small stand-in for the model
server's (system properties, request headers, response status and content type); everything else is
the toolkit's own code. Runnable as a script: `python transform_harness.py MODEL_DIR FILE...` prints
one JSON line per file ({"status", "content_type", "body"}) and the peak RSS in MiB.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class Context:
    """What the model server hands Transformer.transform for one request."""

    def __init__(self, model_dir: str, content_type: str, accept: str = "application/json"):
        self.model_name = "model"  # the model server names the model it serves
        self.system_properties = {"model_dir": model_dir, "gpu_id": None}
        self._headers = {"Content-Type": content_type, "Accept": accept}
        self.request_processor = [self]
        self.status: int = 200
        self.phrase = "OK"
        self.content_type: str | None = None

    def get_request_properties(self) -> dict[str, str]:
        return dict(self._headers)

    def set_response_content_type(self, index: int, content_type: str) -> None:
        self.content_type = content_type

    def set_response_status(self, code: int = 200, phrase: str = "") -> None:
        self.status, self.phrase = code, phrase


class Container:
    """One model loaded the way the serving container loads it; `invoke` = one request."""

    def __init__(self, model_dir: Path | str):
        from sagemaker_inference.transformer import Transformer

        self.model_dir = str(model_dir)
        os.environ["SAGEMAKER_PROGRAM"] = "inference.py"
        code = str(Path(model_dir) / "code")
        for name in ("inference", "net", "epochlog"):  # the artifact's modules, not any imported earlier
            sys.modules.pop(name, None)
        if code not in sys.path:
            sys.path.insert(0, code)
        self.transformer = Transformer()

    def invoke(self, body: bytes, content_type: str, accept: str = "application/json") -> tuple[int, str | None, str]:
        """(status, response content type, response body) for one request, as the model server answers it."""
        context = Context(self.model_dir, content_type, accept)
        response = self.transformer.transform([{"body": body}], context)
        out = response[0]
        return context.status, context.content_type, out.decode() if isinstance(out, bytes) else str(out)

    def close(self) -> None:
        code = str(Path(self.model_dir) / "code")
        if code in sys.path:
            sys.path.remove(code)
        for name in ("inference", "net", "epochlog"):
            sys.modules.pop(name, None)


if __name__ == "__main__":
    container = Container(sys.argv[1])
    for path in sys.argv[2:]:
        status, content_type, body = container.invoke(Path(path).read_bytes(), "image/jpeg")
        print(json.dumps({"status": status, "content_type": content_type, "body": body}))
    # VmHWM, this process's own peak in MiB (ru_maxrss keeps the parent's across fork + exec: the test's size)
    print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024)
