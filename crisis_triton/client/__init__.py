"""Client of the crisis-post classifier served by Triton: the library (`CrisisClient`, its results
and errors; every name also imports from `crisis_triton.client.triton_client`) and the
`crisis-classify` command (`classify`)."""

from crisis_triton.client.triton_client import (  # one module per concern, re-exported there
    AccessDeniedError,
    CertificateError,
    ClassScore,
    ClientError,
    CrisisClient,
    InferenceError,
    ModelInfo,
    ModelNotReadyError,
    Post,
    Prediction,
    RequestTimeoutError,
    ServerOverloadedError,
    ServerUnreachableError,
    TaskNotServedError,
    parse_classification,
)

__all__ = [
    "AccessDeniedError",
    "CertificateError",
    "ClassScore",
    "ClientError",
    "CrisisClient",
    "InferenceError",
    "ModelInfo",
    "ModelNotReadyError",
    "Post",
    "Prediction",
    "RequestTimeoutError",
    "ServerOverloadedError",
    "ServerUnreachableError",
    "TaskNotServedError",
    "parse_classification",
]
