"""What the local endpoint's HTTP front (front.py) and its app (serve.py) share: the body limits, the JSON
error body every error answer carries, and reason phrases. Standard library only, so importing it (predict
does, for the body limit) loads no server."""

from __future__ import annotations

import json
from http import HTTPStatus

MAX_BODY_BYTES = 6 * 1024 * 1024  # SageMaker's real-time invocation limit
DRAIN_BYTES = 64 * 1024 * 1024  # an oversized body is read and dropped up to this, so the client reads its 413


def phrase(status: int) -> str:
    """The reason phrase of `status`; "Error" for a status an artifact's own handlers made up."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_body(status: int, message: str) -> bytes:
    """Every error answer's body: {"error": "<one line>", "status": N}."""
    return json.dumps({"error": message, "status": status}).encode()
