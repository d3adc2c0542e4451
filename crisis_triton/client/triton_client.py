"""The client library under the name it has always had: `from crisis_triton.client.triton_client
import CrisisClient` (and every other name it exported) keeps working.

The code lives in one module per concern: `errors` (the `ClientError`s), `connection` (URL, TLS,
headers), `retries` (what is retried, the backoff, the loop), `messages` (Triton's error answers
made readable), `tensors` (request tensors, raw outputs), `results` (`Prediction`, `Post`),
`metadata` (`ModelInfo`) and `crisis_client` (`CrisisClient`)."""

from __future__ import annotations

from crisis_triton.client.connection import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URLS,
    FRAMING_HEADERS,
    PROTOCOLS,
    SCHEMES,
    SECRET_HEADER,
    Endpoint,
    Protocol,
    check_header,
    check_tls_files,
    normalize_url,
    parse_header,
    parse_url,
    shown_headers,
)
from crisis_triton.client.crisis_client import CrisisClient
from crisis_triton.client.errors import (
    AccessDeniedError,
    CertificateError,
    ClientError,
    InferenceError,
    ModelNotReadyError,
    RequestTimeoutError,
    ServerOverloadedError,
    ServerUnreachableError,
    TaskNotServedError,
)
from crisis_triton.client.messages import plain_answer, strip_triton_prefix
from crisis_triton.client.metadata import ModelInfo, model_info_from_metadata
from crisis_triton.client.results import (
    ClassScore,
    Post,
    Prediction,
    parse_classification,
    prediction_from_classification,
)
from crisis_triton.client.retries import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DEADLINE_S,
    DENIED_STATUSES,
    RETRY_STATUSES,
    backoff,
)
from crisis_triton.client.retries import status_of as _status_of
from crisis_triton.client.tensors import bytes_input, raw_outputs, raw_probabilities

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_RETRY_DEADLINE_S",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URLS",
    "DENIED_STATUSES",
    "FRAMING_HEADERS",
    "PROTOCOLS",
    "RETRY_STATUSES",
    "SCHEMES",
    "SECRET_HEADER",
    "AccessDeniedError",
    "CertificateError",
    "ClassScore",
    "ClientError",
    "CrisisClient",
    "Endpoint",
    "InferenceError",
    "ModelInfo",
    "ModelNotReadyError",
    "Post",
    "Prediction",
    "Protocol",
    "RequestTimeoutError",
    "ServerOverloadedError",
    "ServerUnreachableError",
    "TaskNotServedError",
    "_status_of",
    "backoff",
    "bytes_input",
    "check_header",
    "check_tls_files",
    "model_info_from_metadata",
    "normalize_url",
    "parse_classification",
    "parse_header",
    "parse_url",
    "plain_answer",
    "prediction_from_classification",
    "raw_outputs",
    "raw_probabilities",
    "shown_headers",
    "strip_triton_prefix",
]
