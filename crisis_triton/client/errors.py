"""The client's failures: `ClientError` and its subclasses, one per kind of trouble.

Each carries a one-line, human-readable message (`str(error)`); the command maps each class to
an exit code (crisis_triton/client/classify.py)."""

from __future__ import annotations


class ClientError(Exception):
    """Any failure of the client, with a clear one-line message (`str(error)`)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class ServerUnreachableError(ClientError):
    """No connection to Triton until the retry deadline, or a failed TLS handshake."""


class ServerOverloadedError(ServerUnreachableError):
    """Triton (or a front before it) answered "overloaded" (HTTP 429/503, gRPC UNAVAILABLE /
    RESOURCE_EXHAUSTED) to every try: the first and `retries` retries."""


class AccessDeniedError(ClientError):
    """The server refused the request: HTTP 401/403, gRPC PERMISSION_DENIED / UNAUTHENTICATED, or
    one of Triton's restricted APIs called without its header (see `headers`)."""


class CertificateError(ClientError):
    """A TLS file (root certificates, client certificate or key) is missing or unusable."""


class ModelNotReadyError(ClientError):
    """Triton answers, but the classifier model is not loaded / not ready."""


class TaskNotServedError(ClientError):
    """A requested task (or the caption input) is not served by the deployed model."""


class RequestTimeoutError(ClientError):
    """Triton did not answer a request within the client's timeout."""


class InferenceError(ClientError):
    """Triton rejected a request; the message is the server's (e.g. the model's "invalid image")."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status
