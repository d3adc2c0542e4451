"""Client of the crisis-post classifier served by Triton (library: `triton_client`)."""

from crisis_triton.client.triton_client import (
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
