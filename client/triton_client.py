"""A thin client for the crisis-post classifier served by Triton (`export.names.ENSEMBLE`).

One request = one post: the raw encoded image file, the tweet text and an optional caption. The
answer holds one `Prediction` per served task. Everything the client needs to know about the model
comes from the server: which tasks are served (the `probs_<task>` outputs in the model metadata),
how many classes each has (the output's shape) and the class labels (Triton's classification
extension, which reads each output's `label_filename`). Names come from `export.names` (standard
library only: the client needs numpy and `tritonclient`, nothing of the export or serving stack).

Failures are `ClientError`s with a one-line, human-readable message; subclasses say what went
wrong (`ServerUnreachableError`, `ModelNotReadyError`, `TaskNotServedError`, `InferenceError`,
`RequestTimeoutError`). Connection failures and "unavailable" answers (HTTP 503, gRPC UNAVAILABLE)
are retried with exponential backoff until `retry_deadline` seconds have passed.

`tritonclient` is imported lazily (on the first request), so importing this module is cheap.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import numpy as np

from export.names import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    TEXT_INPUT,
    WEIGHTS_PARAMETER,
    probs_name,
    task_of_output,
)

Protocol = Literal["http", "grpc"]
PROTOCOLS: tuple[str, ...] = ("http", "grpc")
DEFAULT_URLS: dict[str, str] = {"http": "localhost:8000", "grpc": "localhost:8001"}
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRY_DEADLINE_S = 5.0
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 2.0

T = TypeVar("T")

# ----------------------------------------------------------------------------------- errors


class ClientError(Exception):
    """Any failure of the client, with a clear one-line message (`str(error)`)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))

    @property
    def message(self) -> str:
        return str(self)


class ServerUnreachableError(ClientError):
    """No connection to Triton (or it kept answering "unavailable") until the retry deadline."""


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


# ------------------------------------------------------------------------------ predictions


def bytes_input(module: Any, name: str, value: bytes, shape: Sequence[int] = (1, 1)) -> Any:
    """A BYTES InferInput (`module`: tritonclient.http or .grpc) with `value` in every element.

    Built as an np.object_ array: numpy's bytes type (np.array of bytes, np.full) drops trailing
    NUL bytes, which corrupts binary payloads such as images."""
    tensor = module.InferInput(name, list(shape), "BYTES")
    array = np.empty(tuple(shape), dtype=np.object_)
    array.fill(value)
    tensor.set_data_from_numpy(array)
    return tensor


def raw_probabilities(
    module: Any,
    url: str,
    image: bytes,
    text: str,
    caption: str | None,
    tasks: Sequence[str],
) -> dict[str, np.ndarray]:
    """One post through the ensemble with tritonclient alone (`module`: tritonclient.http or
    .grpc): each task's FP32 probabilities, unrounded (TritonClassifier reads the 6 decimals of
    Triton's classification extension). For checks that compare numbers with a reference."""
    inputs = [
        bytes_input(module, IMAGE_INPUT, image),
        bytes_input(module, TEXT_INPUT, text.encode()),
    ]
    if caption is not None:
        inputs.append(bytes_input(module, CAPTION_INPUT, caption.encode()))
    outputs = [module.InferRequestedOutput(probs_name(t)) for t in tasks]
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(ENSEMBLE, inputs, outputs=outputs)
    finally:
        client.close()
    return {t: result.as_numpy(probs_name(t))[0] for t in tasks}


@dataclass(frozen=True)
class ClassScore:
    """One entry of Triton's classification extension: "prob:index:label"."""

    prob: float
    index: int
    label: str


@dataclass(frozen=True)
class Prediction:
    """The answer for one task.

    `probabilities` holds every class in class-index order; `top` the classes sorted by decreasing
    probability (ties: lower class index first), cut to `top_k` when one was asked for.
    """

    task: str
    label: str
    probabilities: dict[str, float]
    top: list[tuple[str, float]]

    def as_json(self, top_only: bool = False) -> dict[str, Any]:
        """`{"label": ..., "probabilities": {label: prob}}`; with `top_only`, only the top ones."""
        probs = dict(self.top) if top_only else dict(self.probabilities)
        return {"label": self.label, "probabilities": probs}


@dataclass(frozen=True)
class Post:
    """One crisis post to classify."""

    image: bytes
    text: str
    caption: str | None = None


def parse_classification(entry: str | bytes) -> ClassScore:
    """Parse one classification string "prob:index:label" (the label may itself contain ':')."""
    text = (
        bytes(entry).decode("utf-8", "replace")
        if isinstance(entry, bytes | bytearray)
        else str(entry)
    )
    parts = text.split(":", 2)
    if len(parts) < 2:
        raise ClientError(f"malformed classification result {text!r}: expected 'prob:index:label'")
    try:
        prob = float(parts[0])
        index = int(parts[1])
    except ValueError:
        raise ClientError(
            f"malformed classification result {text!r}: expected 'prob:index:label'"
        ) from None
    label = parts[2] if len(parts) == 3 else ""
    if not label:
        raise ClientError(
            f"classification result {text!r} has no label: the served output has no label file "
            "(label_filename)"
        )
    return ClassScore(prob=prob, index=index, label=label)


def prediction_from_classification(
    task: str, entries: Iterable[str | bytes], num_classes: int, top_k: int | None = None
) -> Prediction:
    """Build a task's `Prediction` from the `num_classes` classification strings Triton returned."""
    scores = [parse_classification(e) for e in entries]
    indices = sorted(s.index for s in scores)
    if indices != list(range(num_classes)):
        raise ClientError(
            f"output {probs_name(task)}: expected classes 0..{num_classes - 1} from the server, "
            f"got indices {indices}"
        )
    by_index = sorted(scores, key=lambda s: s.index)
    probabilities = {s.label: s.prob for s in by_index}
    if len(probabilities) != num_classes:
        raise ClientError(f"output {probs_name(task)}: duplicate labels in the server's label file")
    ranking = sorted(scores, key=lambda s: (-s.prob, s.index))
    k = num_classes if top_k is None else max(1, min(top_k, num_classes))
    return Prediction(
        task=task,
        label=ranking[0].label,
        probabilities=probabilities,
        top=[(s.label, s.prob) for s in ranking[:k]],
    )


# ----------------------------------------------------------------------------- model metadata


@dataclass(frozen=True)
class ModelInfo:
    """What the served model declares: its input names and, per served task, the class count."""

    inputs: tuple[str, ...]
    num_classes: dict[str, int]  # task -> C, in the model's output order

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.num_classes)


def model_info_from_metadata(metadata: dict[str, Any], model: str = ENSEMBLE) -> ModelInfo:
    """Parse Triton model metadata (HTTP JSON, or gRPC as_json: shapes may be strings)."""
    inputs = tuple(str(t["name"]) for t in metadata.get("inputs", []))
    missing = [n for n in (IMAGE_INPUT, TEXT_INPUT) if n not in inputs]
    if missing:
        raise ClientError(f"model {model} has no input(s) {missing}; its inputs are {list(inputs)}")
    num_classes: dict[str, int] = {}
    for out in metadata.get("outputs", []):
        task = task_of_output(str(out["name"]))
        if task is None:
            continue
        shape = [int(d) for d in out.get("shape", [])]
        if not shape or shape[-1] <= 0:
            raise ClientError(f"output {out['name']} of model {model} has no fixed class count")
        num_classes[task] = shape[-1]
    if not num_classes:
        raise ClientError(f"model {model} serves no task (no probs_<task> output)")
    return ModelInfo(inputs=inputs, num_classes=num_classes)


# ------------------------------------------------------------------------------ server errors

_BOILERPLATE = (
    re.compile(r"^\s*in ensemble '[^']*',\s*"),
    re.compile(
        r"^\s*Failed to process the request\(s\) for model (?:instance )?'[^']*',\s*message:\s*"
    ),
    re.compile(r"^\s*\[(?:StatusCode\.)?[A-Z_0-9]+\]\s*"),
    re.compile(r"^\s*(?:pb_utils\.)?(?:TritonModelException|TritonError)\s*:\s*"),
)

_PYTHON_TRACE = re.compile(r"\n\s*At:\s*\n")


def strip_triton_prefix(message: str) -> str:
    """Drop Triton's wrapping ("in ensemble 'x', ...") of the error message of a model."""
    message = _PYTHON_TRACE.split(message, maxsplit=1)[0]  # python backend's "At: file(line)"
    previous = None
    while previous != message:
        previous = message
        for pattern in _BOILERPLATE:
            message = pattern.sub("", message, count=1)
    return " ".join(message.split()) or "(no message)"


# ------------------------------------------------------------------------------------ client


def normalize_url(url: str | None, protocol: str) -> str:
    """host:port for tritonclient: default per protocol, scheme prefix ("http://") dropped."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not url:
        return DEFAULT_URLS[protocol]
    for scheme in ("http://", "grpc://"):
        if url.startswith(scheme):
            if scheme.removesuffix("://") != protocol:
                raise ValueError(f"url {url!r} does not match protocol {protocol!r}")
            url = url.removeprefix(scheme)
    if "://" in url:
        raise ValueError(f"unsupported url scheme in {url!r} (use host:port)")
    return url.rstrip("/")


class CrisisClient:
    """Client of the crisis classifier ensemble over Triton's HTTP or gRPC protocol.

    Thread-safe: `classify` may be called from several threads. HTTP: tritonclient's HTTP client is
    gevent-based and bound to the thread that made it, so each thread gets its own (one connection
    each); gRPC: one shared channel. Use as a context manager, or call `close()`.
    `classify_many` runs up to `concurrency` requests in parallel.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol | str = "http",
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        concurrency: int = 1,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE_S,
        model: str = ENSEMBLE,
        verbose: bool = False,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retry_deadline < 0:
            raise ValueError(f"retry_deadline must be >= 0, got {retry_deadline}")
        self.protocol: str = protocol
        self.url: str = normalize_url(url, protocol)
        self.timeout = float(timeout)
        self.concurrency = int(concurrency)
        self.retry_deadline = float(retry_deadline)
        self.model = model
        self.verbose = verbose
        self._lock = threading.Lock()
        self._local = threading.local()
        self._clients: list[Any] = []  # every tritonclient client made, closed by close()
        self._pool: ThreadPoolExecutor | None = None  # classify_many's threads, kept for reuse
        self._pool_workers = 0
        self._shared: Any = None
        self._info: ModelInfo | None = None

    # -------------------------------------------------------------------- connection plumbing

    def __enter__(self) -> CrisisClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            clients, self._clients, self._shared = self._clients, [], None
            pool, self._pool = self._pool, None
            self._local = threading.local()
        if pool is not None:
            pool.shutdown(wait=True)
        for c in clients:
            try:
                c.close()
            except Exception:  # closing is best effort
                pass

    def _where(self) -> str:
        return f"{self.url} ({self.protocol})"

    def _client(self) -> Any:
        """The tritonclient client for this call: gRPC's is shared, HTTP's is per thread."""
        if self.protocol == "grpc":
            with self._lock:
                if self._shared is None:
                    import tritonclient.grpc as grpcclient

                    self._shared = grpcclient.InferenceServerClient(self.url, verbose=self.verbose)
                    self._clients.append(self._shared)
                return self._shared
        client = getattr(self._local, "client", None)
        if client is None:
            # gevent-based: a client may only be used by the thread that created it.
            import tritonclient.http as httpclient

            client = httpclient.InferenceServerClient(
                self.url,
                verbose=self.verbose,
                concurrency=1,
                connection_timeout=self.timeout,
                network_timeout=self.timeout,
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _kwargs(self) -> dict[str, Any]:
        """Per-call timeout: gRPC takes it per call, HTTP has it on the client."""
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    def _classify_exception(self, exc: BaseException) -> tuple[str, str]:
        """-> (kind, detail): kind is 'connect' / 'unavailable' (retried), 'timeout', 'server'."""
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            status = str(exc.status() or "")
            msg = str(exc.message() or exc)
            if status in ("503", "StatusCode.UNAVAILABLE"):
                low = msg.lower()
                if self.protocol == "grpc" and any(
                    w in low for w in ("connect", "refused", "dns", "unreachable", "socket")
                ):
                    return "connect", msg
                return "unavailable", msg
            if status == "StatusCode.DEADLINE_EXCEEDED":
                return "timeout", msg
            if status == "" and "failed to obtain inference response" in msg:
                return "timeout", msg
            return "server", msg
        if isinstance(exc, TimeoutError):
            return "timeout", str(exc) or type(exc).__name__
        if isinstance(exc, OSError):
            return "connect", exc.strerror or str(exc) or type(exc).__name__
        try:
            from geventhttpclient.response import HTTPParseError
        except ImportError:  # pragma: no cover - only with the grpc extra alone
            HTTPParseError = ()  # type: ignore[assignment,misc]
        if isinstance(exc, HTTPParseError):
            return "connect", f"connection closed ({exc})"
        try:
            import gevent

            if isinstance(exc, gevent.Timeout):
                return "timeout", str(exc)
        except ImportError:  # pragma: no cover
            pass
        raise exc

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(client)`; retry connection failures / 503 / UNAVAILABLE until the deadline."""
        start = time.monotonic()
        deadline = start + self.retry_deadline
        delay = _BACKOFF_START_S
        while True:
            try:
                return fn(self._client())
            except Exception as exc:  # classified below, unknown ones re-raised
                kind, detail = self._classify_exception(exc)
                status = _status_of(exc)
            if kind == "server":
                raise InferenceError(strip_triton_prefix(detail), status=status) from None
            if kind == "timeout":
                raise RequestTimeoutError(
                    f"Triton at {self._where()} did not answer ({what}) within the "
                    f"{self.timeout:g}s timeout"
                ) from None
            now = time.monotonic()
            if now >= deadline:
                waited = now - start
                if kind == "connect":
                    raise ServerUnreachableError(
                        f"cannot reach Triton at {self._where()}: {detail} "
                        f"(gave up after {waited:.1f}s; is the server running?)"
                    ) from None
                raise ServerUnreachableError(
                    f"Triton at {self._where()} is unavailable ({what}): "
                    f"{strip_triton_prefix(detail)} (gave up after {waited:.1f}s)"
                ) from None
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _BACKOFF_MAX_S)

    # ------------------------------------------------------------------------ health, metadata

    def check_ready(self) -> None:
        """Raise `ServerUnreachableError` / `ModelNotReadyError` unless the model can serve now."""
        kw = self._kwargs()
        live = self._call("health check", lambda c: c.is_server_live(**kw))
        if not live:
            raise ServerUnreachableError(f"Triton at {self._where()} is not live")
        try:
            ready = self._call("model readiness", lambda c: c.is_model_ready(self.model, **kw))
        except InferenceError as exc:
            raise ModelNotReadyError(
                f"model {self.model} is not ready on {self._where()}: {exc}"
            ) from None
        if not ready:
            raise ModelNotReadyError(
                f"model {self.model} is not ready on {self._where()} (not loaded, still loading "
                "or failed to load: see the server log or /v2/repository/index)"
            )

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.5) -> None:
        """Poll `check_ready` until it passes; after `timeout` seconds raise its last error."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.check_ready()
                return
            except (ServerUnreachableError, ModelNotReadyError):
                if time.monotonic() + poll > deadline:
                    raise
            time.sleep(poll)

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The served model's inputs and tasks (cached after the first call)."""
        if self._info is None or refresh:
            kw = self._kwargs()
            if self.protocol == "grpc":
                meta = self._call(
                    "model metadata", lambda c: c.get_model_metadata(self.model, as_json=True, **kw)
                )
            else:
                meta = self._call("model metadata", lambda c: c.get_model_metadata(self.model))
            self._info = model_info_from_metadata(meta, self.model)
        return self._info

    def weights_note(self) -> str:
        """Where the served weights came from (the ensemble config's parameter; '' if absent)."""
        kw = self._kwargs()
        if self.protocol == "grpc":
            config = self._call(
                "model config", lambda c: c.get_model_config(self.model, as_json=True, **kw)
            ).get("config", {})
        else:
            config = self._call("model config", lambda c: c.get_model_config(self.model))
        return config.get("parameters", {}).get(WEIGHTS_PARAMETER, {}).get("string_value", "")

    def tasks(self) -> tuple[str, ...]:
        """The tasks the served model answers, in its output order."""
        return self.model_info().tasks

    def select_tasks(self, tasks: Sequence[str] | None = None) -> tuple[str, ...]:
        """Validate requested tasks against the served ones (None -> all served)."""
        served = self.tasks()
        if tasks is None:
            return served
        wanted = tuple(dict.fromkeys(tasks))
        if not wanted:
            raise ValueError("no task requested")
        unknown = [t for t in wanted if t not in served]
        if unknown:
            raise TaskNotServedError(
                f"task(s) {', '.join(unknown)} not served by model {self.model} on "
                f"{self._where()}; served: {', '.join(served)}"
            )
        return wanted

    # ---------------------------------------------------------------------------- inference

    def classify(
        self,
        image_bytes: bytes,
        text: str,
        caption: str | None = None,
        tasks: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> dict[str, Prediction]:
        """Classify one post; returns {task: Prediction} for the requested (default: all) tasks."""
        if not isinstance(image_bytes, bytes | bytearray | memoryview):
            raise TypeError(f"image_bytes must be bytes, got {type(image_bytes).__name__}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        info = self.model_info()
        selected = self.select_tasks(tasks)
        if caption and CAPTION_INPUT not in info.inputs:
            raise TaskNotServedError(
                f"model {self.model} on {self._where()} has no {CAPTION_INPUT!r} input"
            )
        mod = self._module()
        tensors = [(IMAGE_INPUT, bytes(image_bytes)), (TEXT_INPUT, text.encode("utf-8"))]
        if caption:
            tensors.append((CAPTION_INPUT, caption.encode("utf-8")))
        inputs = [bytes_input(mod, name, value) for name, value in tensors]
        outputs = [
            mod.InferRequestedOutput(probs_name(t), class_count=info.num_classes[t])
            for t in selected
        ]
        kw = self._kwargs()
        result = self._call(
            "inference",
            lambda c: c.infer(self.model, inputs, outputs=outputs, **kw),
        )
        predictions: dict[str, Prediction] = {}
        for task in selected:
            arr = result.as_numpy(probs_name(task))
            if arr is None:
                raise ClientError(f"Triton's answer has no output {probs_name(task)}")
            predictions[task] = prediction_from_classification(
                task, np.asarray(arr).reshape(-1).tolist(), info.num_classes[task], top_k
            )
        return predictions

    def classify_many(
        self,
        posts: Iterable[Post],
        tasks: Sequence[str] | None = None,
        top_k: int | None = None,
        concurrency: int | None = None,
    ) -> list[dict[str, Prediction] | ClientError]:
        """Classify posts in parallel (`concurrency` threads; default the client's).

        Returns one entry per post, in order: its predictions, or the `ClientError` it failed with.
        Errors that concern the server rather than one post (unreachable, model not ready, task not
        served) are raised instead.
        """
        items = list(posts)
        selected = self.select_tasks(tasks)  # fail fast, and fill the metadata cache once

        def one(post: Post) -> dict[str, Prediction] | ClientError:
            try:
                return self.classify(post.image, post.text, post.caption, selected, top_k)
            except (ServerUnreachableError, ModelNotReadyError, TaskNotServedError):
                raise
            except ClientError as exc:
                return exc

        workers = concurrency or self.concurrency
        if workers <= 1 or len(items) <= 1:
            return [one(post) for post in items]
        with self._lock:
            if self._pool is None or self._pool_workers != workers:
                old, self._pool = self._pool, ThreadPoolExecutor(workers, "crisis-client")
                self._pool_workers = workers
            else:
                old = None
            pool = self._pool
        if old is not None:
            old.shutdown(wait=False)
        return list(pool.map(one, items))

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as mod
        else:
            import tritonclient.http as mod
        return mod


def _status_of(exc: BaseException) -> str | None:
    status = getattr(exc, "status", None)
    return str(status()) if callable(status) and status() is not None else None
