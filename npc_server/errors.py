"""Errors a client may see. Each carries an HTTP status, a stable code and a message safe to show."""

from __future__ import annotations


class NpcError(Exception):
    """Base error: the message is written for the client and never holds paths or internals."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotFound(NpcError):
    status = 404
    code = "not_found"


class InvalidInput(NpcError):
    status = 422
    code = "invalid_input"


class PayloadTooLarge(NpcError):
    status = 413
    code = "payload_too_large"


class UnsupportedMedia(NpcError):
    status = 415
    code = "unsupported_media"


class NotReady(NpcError):
    status = 503
    code = "not_ready"
