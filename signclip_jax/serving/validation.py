"""Request validation for the HTTP server: JSON bodies, fields, limits, base64 .pose data.

Every check raises `ApiError(status, message)`, which the app answers as JSON
{"error": message, "status": status}: 400 malformed, 413 over a limit, 422 unusable pose
data, 501 video input without the video environment. Nothing here knows Flask.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from signclip_jax.data import pose as pose_lib
from signclip_jax.errors import DataError, UserError
from signclip_jax.serving import video_input

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses: HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class SlowClient(ApiError):
    """408: the client did not send its request headers (or body) within `seconds` of their
    first byte. Raised by the server worker's socket reads (server.py), never by Flask."""

    def __init__(self, what: str, seconds: float):
        super().__init__(408, f"request {what} not received within {seconds:g} s")


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
               float: "number", type(None): "null"}  # fmt: skip


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Request body bytes -> JSON object, or ApiError(400)."""
    if not raw.strip():
        raise ApiError(400, "empty request body: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(body)}")
    return body


def string_items(body: dict[str, Any], field: str, limit: int) -> list[str] | None:
    """`field` as a non-empty list of strings (a single string is a list of one); None if absent."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(
            400, f"'{field}' must be a string or a list of strings, got {_json_type(value)}"
        )
    if not value:
        raise ApiError(400, f"'{field}' is an empty list")
    if len(value) > limit:
        raise ApiError(413, f"'{field}' has {len(value)} items; at most {limit} per request")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ApiError(400, f"'{field}'[{i}] must be a string, got {_json_type(item)}")
    return value


def check_model_name(body: dict[str, Any], served: Sequence[str]) -> str:
    """The request's `model_name` (default: the first served), or 400 naming the served ones."""
    name = body.get("model_name", served[0])
    if not isinstance(name, str):
        raise ApiError(400, f"'model_name' must be a string, got {_json_type(name)}")
    if name not in served:
        names = ", ".join(map(repr, served))
        raise ApiError(400, f"unknown model_name {name!r}: this server serves {names}")
    return name


def check_texts(texts: list[str], max_chars: int) -> list[str]:
    for i, text in enumerate(texts):
        if len(text) > max_chars:
            raise ApiError(413, f"'text'[{i}] has {len(text)} characters; at most {max_chars}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"'text'[{i}] is not valid Unicode (lone surrogate)") from None
    return texts


def decode_base64(value: str, what: str) -> bytes:
    """Standard base64 (line breaks and spaces allowed, as `base64 FILE` writes) -> bytes."""
    try:
        data = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{what}: not valid base64 ({e})") from None
    if not data:
        raise ApiError(400, f"{what}: empty")
    return data


# Decoding one request's pose may take at most this many times the request body limit (128 MiB
# at the default 16 MiB), never more than data/pose.py's MAX_POSE_ALLOC_BYTES. Any .pose that
# fits a body decodes in about twice its size; only amplifying files (format v0.0 frames
# without a person, 2 bytes each) come near it.
POSE_ALLOC_PER_BODY_BYTE = 8


def pose_alloc_limit(max_body_bytes: int) -> int:
    """Bytes decoding one pose of a request may allocate, for a server with `max_body_bytes`."""
    return min(pose_lib.MAX_POSE_ALLOC_BYTES, POSE_ALLOC_PER_BODY_BYTE * max_body_bytes)


def pose_features(
    data: bytes,
    spec: Any,
    *,
    name: str,
    max_frames: int,
    max_alloc_bytes: int = pose_lib.MAX_POSE_ALLOC_BYTES,
) -> np.ndarray:
    """.pose bytes -> features [min(T, spec.max_frames), D] exactly as `Embedder.pose_features`.

    The frame count, point count and decoding memory that the header declares are checked
    before anything is decoded (`pose_lib.read_pose`): 413 over a limit, 422 when unusable.
    """
    try:
        pose = pose_lib.read_pose(
            data, name=name, max_frames=max_frames, max_alloc_bytes=max_alloc_bytes
        )
        return pose_lib.to_features(pose_lib.pose_to_array(pose, spec, name=name), spec)
    except pose_lib.PoseLimitError as e:
        raise ApiError(413, str(e)) from None
    except DataError as e:
        raise ApiError(422, str(e)) from None
    except (ApiError, MemoryError):
        raise
    except Exception as e:  # a crafted file must give a 4xx, not a 500
        log.debug("unusable pose %s", name, exc_info=True)
        raise ApiError(422, f"{name}: not a usable .pose file ({type(e).__name__})") from None


def video_pose_bytes(data: bytes, name: str) -> bytes:
    """Video bytes -> .pose bytes through the optional video module (embed's hook): 501 when
    the video environment is not installed, 422 for a video it cannot convert."""
    try:
        return video_input.video_to_pose_bytes(data, name=name)
    except video_input.VideoUnavailable as e:
        # The detail names the server's video environment (its paths): the log gets it, the
        # client only what to install.
        log.warning("video input refused: %s", e)
        raise ApiError(501, f"{name}: {video_input.VIDEO_HELP}") from None
    except UserError as e:
        raise ApiError(422, str(e)) from None


__all__ = [
    "ApiError",
    "SlowClient",
    "check_model_name",
    "check_texts",
    "decode_base64",
    "parse_json_body",
    "pose_alloc_limit",
    "pose_features",
    "string_items",
    "video_pose_bytes",
]
