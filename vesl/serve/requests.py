"""`POST /v1/annotate` bodies in, rows out: parsing, limits, and the answer's shape.

A body is one JSON object `{"id"?, "image_base64" | "image_url", "alt_text"?}` or a list of them. A body
that is not that is a 400; one over a limit (bytes, images, an alt-text's length, an image's bytes) a
413; an image_url the service will not fetch a 422 `url_not_allowed`. Every answer to a bad request is
`{"reason", "stage", "message"}`, as a reject row has them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from schemas.rejects import RejectReason as R
from vesl.annotate.sources.rows import MAX_URI_CHARS, derive_image_id
from vesl.serve.guard import UrlNotAllowed, check_url

REQUEST_STAGE = "request"  # the stage of an answer about the request itself (not a pipeline stage's reject)
# The reasons of those answers (a pipeline stage's rejects keep the batch job's reasons, schemas.rejects).
BAD_REQUEST, BODY_TOO_LARGE, TOO_MANY_IMAGES = "bad_request", "body_too_large", "too_many_images"
ALT_TEXT_TOO_LONG, URL_NOT_ALLOWED, OVERLOADED = "alt_text_too_long", "url_not_allowed", "overloaded"
KEYS = {"id", "image_base64", "image_url", "alt_text"}
ROW_FIELDS = ("image_id", "width", "height", "alt_text", "caption", "vlm_caption", "caption_source", "phrases",
              "regions")


class RequestError(Exception):
    """A request the service answers with STATUS and {"reason", "stage", "message"}."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message

    def body(self) -> dict[str, str]:
        return {"reason": self.reason, "stage": REQUEST_STAGE, "message": self.message}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_images: int
    max_image_bytes: int
    max_alt_text_chars: int
    url_schemes: tuple[str, ...]
    allow_internal: bool


def parse_body(raw: bytes, limits: Limits) -> tuple[list[dict[str, Any]], bool]:
    """(input rows for the reader's columns, whether the body was a list)."""
    if len(raw) > limits.max_body_bytes:
        raise RequestError(413, BODY_TOO_LARGE, f"the body has more than {limits.max_body_bytes} bytes")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(400, BAD_REQUEST, f"the body is not JSON: {e}") from None
    many = isinstance(body, list)
    items = body if many else [body]
    if not items:
        raise RequestError(400, BAD_REQUEST, "the list of images is empty")
    if len(items) > limits.max_images:
        raise RequestError(413, TOO_MANY_IMAGES, f"{len(items)} images; at most {limits.max_images} a request")
    return [input_row(item, k if many else None, limits) for k, item in enumerate(items)], many


def _text(item: dict[str, Any], key: str, where: str) -> str | None:
    value = item.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(400, BAD_REQUEST, f"{where}{key} must be a string, not {type(value).__name__}")
    return value


def input_row(item: Any, index: int | None, limits: Limits) -> dict[str, Any]:
    """One body item as a reader row: image_id (the given id, else a hash of the URL or the bytes, as the batch
    reader derives it), image_uri or image_bytes, alt_text."""
    where = f"item {index}: " if index is not None else ""
    if not isinstance(item, dict):
        raise RequestError(400, BAD_REQUEST, f"{where}an image is a JSON object, not {type(item).__name__}")
    unknown = sorted(set(item) - KEYS)
    if unknown:
        raise RequestError(400, BAD_REQUEST, f"{where}unknown field(s) {unknown}; known: {sorted(KEYS)}")
    image_id, data64, url, alt = (_text(item, k, where) for k in ("id", "image_base64", "image_url", "alt_text"))
    if (data64 is None) == (url is None):
        raise RequestError(400, BAD_REQUEST, f"{where}give exactly one of image_base64 and image_url")
    if image_id is not None and not image_id.strip():
        raise RequestError(400, BAD_REQUEST, f"{where}id must not be empty")
    if alt is not None and len(alt) > limits.max_alt_text_chars:
        raise RequestError(413, ALT_TEXT_TOO_LONG, f"{where}alt_text has more than {limits.max_alt_text_chars} "
                           "characters")
    data = None
    if data64 is not None:
        if len(data64) > (limits.max_image_bytes + 2) // 3 * 4 + 4:
            raise RequestError(413, R.FILE_TOO_LARGE.value, f"{where}the image has more than "
                               f"{limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(data64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, BAD_REQUEST, f"{where}image_base64 is not base64: {e}") from None
    else:
        if len(url) > MAX_URI_CHARS:
            raise RequestError(413, R.BAD_URI.value, f"{where}image_url is longer than {MAX_URI_CHARS} characters")
        try:
            check_url(url, limits.url_schemes, limits.allow_internal)
        except UrlNotAllowed as e:
            raise RequestError(422, URL_NOT_ALLOWED, f"{where}{e}") from None
    return {"image_id": image_id or derive_image_id(url, data), "image_uri": url, "image_bytes": data,
            "alt_text": alt, "ordinal": index or 0}


def answer_row(row: dict[str, Any]) -> dict[str, Any]:
    """The shard row of a finished input, without the image bytes and the working columns."""
    return {k: row.get(k) for k in ROW_FIELDS}


def reject_body(row: dict[str, Any]) -> dict[str, Any]:
    return {"image_id": row["image_id"], "reason": row["reject_reason"], "stage": row["reject_stage"],
            "message": row.get("reject_message") or ""}
