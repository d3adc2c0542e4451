"""Client of the crisis-post classifier served by Triton (library: `client.triton_client`)."""

from client.triton_client import (
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
