"""Client of the crisis-post classifier served by Triton (library: `client.triton_client`)."""

from client.triton_client import (
    ClassScore,
    ClientError,
    CrisisClient,
    InferenceError,
    ModelInfo,
    ModelNotReadyError,
    Post,
    Prediction,
    RequestTimeoutError,
    ServerUnreachableError,
    TaskNotServedError,
    parse_classification,
)

__all__ = [
    "ClassScore",
    "ClientError",
    "CrisisClient",
    "InferenceError",
    "ModelInfo",
    "ModelNotReadyError",
    "Post",
    "Prediction",
    "RequestTimeoutError",
    "ServerUnreachableError",
    "TaskNotServedError",
    "parse_classification",
]
