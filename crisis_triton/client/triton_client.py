"""A thin client for the crisis-post classifier served by Triton
(`crisis_triton.contract.names.ENSEMBLE`).

One request = one post: the raw encoded image file, the tweet text and an optional caption. The
answer holds one `Prediction` per served task. Everything the client needs to know about the model
comes from the server: which tasks are served (the `probs_<task>` outputs in the model metadata),
how many classes each has (the output's shape) and the class labels (Triton's classification
extension, which reads each output's `label_filename`). Names come from
`crisis_triton.contract.names` (standard
library only: the client needs numpy and `tritonclient`, nothing of the export or serving stack).

Where and how (docs/client.md, "Client options"): a URL `host:port`, `http://`, `https://`,
`grpc://` or `grpcs://` (TLS: `root_certs`, and `client_cert` + `client_key` for mutual TLS),
`headers` sent with every request, `model_version` of the ensemble.

Failures are `ClientError`s with a one-line, human-readable message; subclasses say what went
wrong (`ServerUnreachableError`, `ServerOverloadedError`, `AccessDeniedError`,
`ModelNotReadyError`, `TaskNotServedError`, `InferenceError`, `RequestTimeoutError`,
`CertificateError`). Two kinds of failure are retried, with capped exponential backoff and jitter:
connection failures until `retry_deadline` seconds have passed (a server starting up), and overload
answers (HTTP 429 and 503, gRPC UNAVAILABLE and RESOURCE_EXHAUSTED: what a TLS front such as nginx
answers at its connection limit) up to `retries` times. Other answers (400s, 500) are not retried.

`tritonclient` is imported lazily (on the first request), so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import numpy as np

from crisis_triton.contract.names import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    MODALITIES,
    MODALITIES_USED,
    TEXT_INPUT,
    WEIGHTS_PARAMETER,
    modality_weights_name,
    probs_name,
    task_of_output,
)

Protocol = Literal["http", "grpc"]
PROTOCOLS: tuple[str, ...] = ("http", "grpc")
DEFAULT_URLS: dict[str, str] = {"http": "localhost:8000", "grpc": "localhost:8001"}
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRY_DEADLINE_S = 5.0
DEFAULT_RETRIES = 5  # overload answers: 5 retries wait 1.55 to 3.1 s in all (backoff())
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 2.0
# URL schemes -> (protocol, TLS); a bare host:port takes the protocol argument (default http).
SCHEMES: dict[str, tuple[str, bool]] = {
    "http": ("http", False),
    "https": ("http", True),
    "grpc": ("grpc", False),
    "grpcs": ("grpc", True),
}
# Answers meaning "busy now, try again" (a front's connection limit, Triton's queue): retried.
RETRY_STATUSES: frozenset[str] = frozenset(
    {"429", "503", "StatusCode.UNAVAILABLE", "StatusCode.RESOURCE_EXHAUSTED"}
)
# Answers meaning "not allowed": a missing/wrong header (Triton's restricted APIs, a front's auth).
DENIED_STATUSES: frozenset[str] = frozenset(
    {"401", "403", "StatusCode.PERMISSION_DENIED", "StatusCode.UNAUTHENTICATED"}
)
# Header names whose values -v/--verbose shows masked.
SECRET_HEADER = re.compile(r"key|token|secret|auth|passw|cookie|session|credential|signature", re.I)
# Headers that frame each request (tritonclient sets them per call): -H may not replace them.
FRAMING_HEADERS: frozenset[str] = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
     "trailer", "inference-header-content-length"}
)  # fmt: skip
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)

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


def raw_outputs(
    module: Any,
    url: str,
    image: bytes | None,
    text: str,
    caption: str | None,
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """One post through the ensemble with tritonclient alone (`module`: tritonclient.http or
    .grpc): the named outputs of its one row, FP32 unrounded. `image` None: a post without one
    (answered only by heads that can: docs/text-only.md). For checks against a reference."""
    inputs = [bytes_input(module, TEXT_INPUT, text.encode())]
    if image is not None:
        inputs.insert(0, bytes_input(module, IMAGE_INPUT, image))
    if caption is not None:
        inputs.append(bytes_input(module, CAPTION_INPUT, caption.encode()))
    outputs = [module.InferRequestedOutput(n) for n in names]
    client = module.InferenceServerClient(url)
    try:
        result = client.infer(ENSEMBLE, inputs, outputs=outputs)
    finally:
        client.close()
    return {n: result.as_numpy(n)[0] for n in names}


def raw_probabilities(
    module: Any,
    url: str,
    image: bytes | None,
    text: str,
    caption: str | None,
    tasks: Sequence[str],
) -> dict[str, np.ndarray]:
    """Each task's FP32 probabilities of one post (raw_outputs), unrounded (TritonClassifier reads
    the 6 decimals of Triton's classification extension)."""
    raw = raw_outputs(module, url, image, text, caption, [probs_name(t) for t in tasks])
    return {t: raw[probs_name(t)] for t in tasks}


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
    `modalities_used`: the post's modalities that went into the answer ("image", "text"), where the
    server says (crisis_triton.contract.names.MODALITIES_USED); `modality_weights`: how much the
    head weighed each
    modality for this task ({"image": w, "text": 1 - w}), where it says (the cma_clip head).
    """

    task: str
    label: str
    probabilities: dict[str, float]
    top: list[tuple[str, float]]
    modalities_used: tuple[str, ...] | None = None
    modality_weights: dict[str, float] | None = None

    def as_json(self, top_only: bool = False) -> dict[str, Any]:
        """`{"label": ..., "probabilities": {label: prob}}` (+ "modalities_used": [...] and
        "modality_weights": {"image": w, "text": w} where served); with `top_only`, only the top
        classes."""
        probs = dict(self.top) if top_only else dict(self.probabilities)
        out: dict[str, Any] = {"label": self.label, "probabilities": probs}
        if self.modalities_used is not None:
            out["modalities_used"] = list(self.modalities_used)
        if self.modality_weights is not None:
            out["modality_weights"] = dict(self.modality_weights)
        return out


@dataclass(frozen=True)
class Post:
    """One crisis post to classify (`image` None: a text-only post)."""

    image: bytes | None
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
    outputs: tuple[str, ...] = ()  # every output name

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
    outputs = tuple(str(t["name"]) for t in metadata.get("outputs", []))
    return ModelInfo(inputs=inputs, num_classes=num_classes, outputs=outputs)


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


_GRPC_HTTP_STATUS = re.compile(r"http2 header with status: (\d{3})")
_DECODE_FAILURE = "an exception occurred in the client while decoding the response"
_HTML_TITLE = re.compile(r"<title>(.*?)</title>|<h1>(.*?)</h1>", re.I | re.S)


def plain_answer(message: str, status: str = "") -> str:
    """A non-JSON HTTP answer (a front such as nginx answers HTML pages) in one readable piece:
    "HTTP 503: 503 Service Temporarily Unavailable" instead of tritonclient's decoding failure."""
    if not message.startswith(_DECODE_FAILURE):
        return message
    body = message.partition("response:")[2].strip()
    found = _HTML_TITLE.search(body)
    text = next((g for g in found.groups() if g), "") if found else body
    text = " ".join(re.sub(r"<[^>]+>", " ", text).split())[:200]
    prefix = f"HTTP {status}" if status else "HTTP error"
    return f"{prefix}: {text}" if text else f"{prefix} (no body)"


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


@dataclass(frozen=True)
class Endpoint:
    """Where Triton is: protocol, `host:port` (HTTP: optionally `/base/path`), TLS or not."""

    protocol: str  # "http" or "grpc"
    address: str  # what tritonclient takes: host:port, no scheme
    tls: bool = False

    @property
    def scheme(self) -> str:
        return self.protocol + ("s" if self.tls else "")

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.address}"


def parse_url(url: str | None, protocol: str | None = None) -> Endpoint:
    """`host:port` (protocol: the argument, default http), or `http://`, `https://`, `grpc://`,
    `grpcs://` + host:port (the scheme says the protocol and TLS; a `protocol` given must agree).
    No url: the protocol's default address, without TLS."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if not url:
        chosen = protocol or "http"
        return Endpoint(chosen, DEFAULT_URLS[chosen])
    scheme, sep, rest = url.partition("://")
    if sep:
        if scheme.lower() not in SCHEMES:
            raise ValueError(
                f"unsupported url scheme {scheme!r} in {url!r}: use host:port, http://, https://, "
                "grpc:// or grpcs://"
            )
        chosen, tls = SCHEMES[scheme.lower()]
        if protocol is not None and protocol != chosen:
            raise ValueError(f"url {url!r} does not match protocol {protocol!r}")
    else:
        chosen, tls, rest = protocol or "http", False, url
    address = rest.rstrip("/")
    if not address or address.startswith("/") or any(c.isspace() for c in address):
        raise ValueError(f"url {url!r} has no valid host[:port]")
    if chosen == "grpc" and "/" in address:
        raise ValueError(f"url {url!r}: a gRPC address has no path (host:port)")
    if "@" in address.partition("/")[0]:
        raise ValueError(
            "credentials in the url are not supported (they would show in logs): send them in a "
            "header, e.g. -H 'Authorization: Bearer ...'"
        )
    return Endpoint(chosen, address, tls)


def normalize_url(url: str | None, protocol: str) -> str:
    """host:port for tritonclient: default per protocol, scheme prefix ("http://") dropped."""
    return parse_url(url, protocol).address


def parse_header(text: str) -> tuple[str, str]:
    """ "NAME:VALUE" (the -H option, as curl's) -> (name, value); spaces around both dropped."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise ValueError(f"header {text!r}: expected NAME:VALUE, e.g. admin-key:secret")
    check_header(name, value)
    return name, value


def check_header(name: str, value: str, protocol: str | None = None) -> None:
    """A header name must be an HTTP token and not one the client sets itself (the framing of the
    request: `FRAMING_HEADERS`), its value one line (no CR, LF or NUL). gRPC metadata: no binary
    keys (`-bin`), and the value printable ASCII."""
    if not _HEADER_NAME.match(name):
        raise ValueError(f"header name {name!r} is not a valid HTTP header name")
    if name.lower() in FRAMING_HEADERS:
        raise ValueError(f"header {name!r} is set by the client itself for each request")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"header {name!r}: the value must be one line")
    if protocol == "grpc":
        if name.lower().endswith("-bin"):
            raise ValueError(f"header {name!r}: binary gRPC metadata (-bin) is not supported")
        if not all(" " <= c <= "~" for c in value):
            raise ValueError(f"header {name!r}: gRPC metadata values are printable ASCII")


def shown_headers(headers: Mapping[str, str]) -> str:
    """Headers for a log line, secret-looking ones (`SECRET_HEADER`) masked: "admin-key: ***"."""
    return ", ".join(f"{k}: {'***' if SECRET_HEADER.search(k) else v}" for k, v in headers.items())


def backoff(retry: int) -> float:
    """Seconds to wait before retry number `retry` (0, 1, ...): capped exponential backoff with
    equal jitter, between half and all of min(_BACKOFF_MAX_S, _BACKOFF_START_S * 2**retry), so that
    clients turned away together do not all come back together."""
    step = min(_BACKOFF_MAX_S, _BACKOFF_START_S * 2 ** min(retry, 30))
    return step / 2 + random.uniform(0, step / 2)


def check_tls_files(
    root_certs: str | None, client_cert: str | None, client_key: str | None
) -> None:
    """Load the files as TLS would, so that a wrong one fails now with its name (not as a failed
    connection later): root certificates (PEM), client certificate + key (PEM, must match)."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("mutual TLS needs both a client certificate and its key")
    for what, path in (
        ("root certificates", root_certs),
        ("client certificate", client_cert),
        ("client key", client_key),
    ):
        if path is not None and not Path(path).is_file():
            raise CertificateError(f"{what} file not found: {path}")
    try:
        context = ssl.create_default_context(cafile=root_certs)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"cannot load root certificates {root_certs}: {exc}") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(client_cert, client_key)
        except (ssl.SSLError, OSError) as exc:
            raise CertificateError(
                f"cannot load client certificate {client_cert} with key {client_key} (PEM files, "
                f"the key matching the certificate): {exc}"
            ) from None


class CrisisClient:
    """Client of the crisis classifier ensemble over Triton's HTTP or gRPC protocol.

    Thread-safe: `classify` may be called from several threads. HTTP: tritonclient's HTTP client is
    gevent-based and bound to the thread that made it, so each thread gets its own (one connection
    each); gRPC: one shared channel. Use as a context manager, or call `close()`.
    `classify_many` runs up to `concurrency` requests in parallel.

    Args:
        url: `host:port` or `http://`, `https://`, `grpc://`, `grpcs://` + host:port (`parse_url`).
        protocol: "http" or "grpc" for a bare host:port (default http); must agree with a scheme.
        root_certs: PEM file of the CAs to trust (TLS urls; default: the system's).
        client_cert, client_key: PEM files for mutual TLS (both or neither).
        headers: sent with every request (gRPC: as metadata, names lowercased).
        model_version: the version of `model` to ask for (default: the server's choice).
        retries: how many times an overload answer is retried (0: never).
        retry_deadline: seconds during which connection failures are retried.
        verbose: log each call (address, model, version, headers with secret-looking values
            masked, timing, retries) through `log` (default: stderr).
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: Protocol | str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        concurrency: int = 1,
        retry_deadline: float = DEFAULT_RETRY_DEADLINE_S,
        retries: int = DEFAULT_RETRIES,
        model: str = ENSEMBLE,
        model_version: int | None = None,
        headers: Mapping[str, str] | None = None,
        root_certs: str | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        verbose: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if retry_deadline < 0:
            raise ValueError(f"retry_deadline must be >= 0, got {retry_deadline}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if model_version is not None and (isinstance(model_version, bool) or model_version < 1):
            raise ValueError(f"model_version must be a positive integer, got {model_version!r}")
        self.endpoint = parse_url(url, protocol)
        self.protocol: str = self.endpoint.protocol
        self.url: str = self.endpoint.address
        tls_files = (root_certs, client_cert, client_key)
        if not self.endpoint.tls and any(f is not None for f in tls_files):
            raise ValueError(
                "root certificates and client certificates need a TLS url (https:// or grpcs://)"
            )
        if self.endpoint.tls:
            check_tls_files(root_certs, client_cert, client_key)
        self.root_certs, self.client_cert, self.client_key = tls_files
        self.headers: dict[str, str] = {}
        for name, value in (headers or {}).items():
            check_header(name, value, self.protocol)
            # gRPC metadata keys must be lowercase; HTTP header names ignore case.
            self.headers[name.lower() if self.protocol == "grpc" else name] = value
        self.model_version = model_version
        self.timeout = float(timeout)
        self.concurrency = int(concurrency)
        self.retry_deadline = float(retry_deadline)
        self.retries = int(retries)
        self.model = model
        self.verbose = verbose
        self._log_fn = log
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
        return f"{self.url} ({self.endpoint.scheme})"

    def _what_model(self) -> str:
        if self.model_version is None:
            return f"model {self.model}"
        return f"model {self.model} version {self.model_version}"

    @property
    def _version(self) -> str:
        """tritonclient's model_version argument: '' lets the server choose."""
        return "" if self.model_version is None else str(self.model_version)

    def _log(self, message: str) -> None:
        if not self.verbose:
            return
        if self._log_fn is not None:
            self._log_fn(message)
        else:
            sys.stderr.write(f"crisis-client: {message}\n")
            sys.stderr.flush()

    def _client(self) -> Any:
        """The tritonclient client for this call: gRPC's is shared, HTTP's is per thread."""
        if self.protocol == "grpc":
            with self._lock:
                if self._shared is None:
                    import tritonclient.grpc as grpcclient

                    tls: dict[str, Any] = {}
                    if self.endpoint.tls:
                        tls = {
                            "ssl": True,
                            "root_certificates": self.root_certs,
                            "private_key": self.client_key,
                            "certificate_chain": self.client_cert,
                        }
                    self._shared = grpcclient.InferenceServerClient(self.url, **tls)
                    self._clients.append(self._shared)
                    self._log(f"connecting to {self.endpoint.url}{self._tls_note()}")
                return self._shared
        client = getattr(self._local, "client", None)
        if client is None:
            # gevent-based: a client may only be used by the thread that created it.
            import tritonclient.http as httpclient

            ssl_args: dict[str, Any] = {}
            if self.endpoint.tls:
                # geventhttpclient's SSLConnectionPool: "ca_certs" replaces the system's CAs,
                # "certfile" + "keyfile" are loaded into the context (mutual TLS).
                options: dict[str, str] = {}
                if self.root_certs is not None:
                    options["ca_certs"] = self.root_certs
                if self.client_cert is not None and self.client_key is not None:
                    options.update(certfile=self.client_cert, keyfile=self.client_key)
                ssl_args = {"ssl": True, "ssl_options": options}
            client = httpclient.InferenceServerClient(
                self.url,
                concurrency=1,
                connection_timeout=self.timeout,
                network_timeout=self.timeout,
                **ssl_args,
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
            self._log(f"connecting to {self.endpoint.url}{self._tls_note()}")
        return client

    def _unreachable_hint(self, detail: str) -> str:
        """What to check when connections keep failing."""
        closed = any(w in detail.lower() for w in ("eof occurred", "socket closed"))
        if self.endpoint.tls and self.client_cert is None and closed:
            return (
                "the server closed the TLS connection: does it require a client certificate? "
                "see --client-cert, --client-key"
            )
        return "is the server running?"

    def _tls_note(self) -> str:
        if not self.endpoint.tls:
            return ""
        roots = self.root_certs or "the system's"
        note = f" (TLS, root certificates {roots}"
        if self.client_cert is not None:
            note += f", client certificate {self.client_cert}"
        return note + ")"

    def _kwargs(self) -> dict[str, Any]:
        """Per-call arguments: the headers; gRPC takes the timeout per call (HTTP: the client's)."""
        kw: dict[str, Any] = {"headers": dict(self.headers) if self.headers else None}
        if self.protocol == "grpc":
            kw["client_timeout"] = self.timeout
        return kw

    def _classify_exception(self, exc: BaseException) -> tuple[str, str]:
        """-> (kind, detail). kind: 'connect' (retried until the deadline), 'overload' (retried
        `retries` times), 'denied', 'tls', 'timeout', 'front-timeout', 'server' (not retried)."""
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            status = str(exc.status() or "")
            msg = plain_answer(str(exc.message() or exc), status)
            low = msg.lower()
            if "restricted, expecting header" in low:  # Triton's restricted APIs (any protocol)
                return "denied", msg
            if status in DENIED_STATUSES:
                return "denied", msg
            # A front's HTTP status; over gRPC it arrives as UNAVAILABLE (gRPC's mapping of an
            # intermediary's 429/502/503/504) with "Received http2 header with status: N".
            front = _GRPC_HTTP_STATUS.search(msg) if self.protocol == "grpc" else None
            http_status = front[1] if front else status
            if http_status == "502":  # a front that cannot reach Triton: a failed connection
                return "connect", msg
            if http_status == "504":  # a front that gave up waiting for Triton
                return "front-timeout", msg
            if status == "StatusCode.UNAVAILABLE" and self.protocol == "grpc":
                if any(w in low for w in ("ssl", "handshake", "certificate", "tls")):
                    return "tls", msg
                if any(w in low for w in ("connect", "refused", "dns", "unreachable", "socket")):
                    return "connect", msg
            if status in RETRY_STATUSES:
                return "overload", msg
            if status == "StatusCode.DEADLINE_EXCEEDED":
                return "timeout", msg
            if status == "" and "failed to obtain inference response" in msg:
                return "timeout", msg
            return "server", msg
        if isinstance(exc, ssl.SSLError) and not isinstance(
            exc, ssl.SSLEOFError | ssl.SSLZeroReturnError
        ):
            if isinstance(exc, ssl.SSLCertVerificationError):
                return "tls", f"certificate verify failed: {exc.verify_message}"
            return "tls", str(exc.reason or exc)
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
        """Run `fn(client)`; retry connection failures until the deadline and overload answers
        `retries` times, with capped exponential backoff and jitter (`backoff`)."""
        start = time.monotonic()
        deadline = start + self.retry_deadline
        connect_retries = overload_retries = 0
        if self.verbose:
            headers = f", headers {shown_headers(self.headers)}" if self.headers else ""
            self._log(f"{what}: {self.endpoint.url}, {self._what_model()}{headers}")
        while True:
            sent = time.monotonic()
            try:
                result = fn(self._client())
            except Exception as exc:  # classified below, unknown ones re-raised
                kind, detail = self._classify_exception(exc)
                status = _status_of(exc)
            else:
                self._log(f"{what}: answered in {1e3 * (time.monotonic() - sent):.1f} ms")
                return result
            now = time.monotonic()
            self._log(
                f"{what}: {kind} ({status or 'no status'}) after {1e3 * (now - sent):.1f} ms: "
                f"{strip_triton_prefix(detail)}"
            )
            if kind == "server":
                raise InferenceError(strip_triton_prefix(detail), status=status) from None
            if kind == "denied":
                raise AccessDeniedError(
                    f"Triton at {self._where()} refused the {what} ({status}): "
                    f"{strip_triton_prefix(detail)} (a missing or wrong header? see --header)"
                ) from None
            if kind == "tls":
                hint = "see --root-certs, --client-cert"
                if "CERTIFICATE_REQUIRED" in detail.upper():  # the server's alert (TLS 1.3)
                    hint = "the server requires a client certificate: see --client-cert"
                raise ServerUnreachableError(
                    f"TLS with {self._where()} failed: {detail} ({hint})"
                ) from None
            if kind == "front-timeout":
                raise RequestTimeoutError(
                    f"the front at {self._where()} gave up waiting for Triton ({what}): {detail}"
                ) from None
            if kind == "timeout":
                raise RequestTimeoutError(
                    f"Triton at {self._where()} did not answer ({what}) within the "
                    f"{self.timeout:g}s timeout"
                ) from None
            waited = now - start
            if kind == "overload":
                if overload_retries >= self.retries:
                    raise ServerOverloadedError(
                        f"Triton at {self._where()} is overloaded ({what}): {status} "
                        f"{strip_triton_prefix(detail)} (still after {self.retries} retries in "
                        f"{waited:.1f}s; see --retries)"
                    ) from None
                pause = backoff(overload_retries)
                overload_retries += 1
                self._log(
                    f"{what}: retry {overload_retries}/{self.retries} in {pause:.2f}s (overload)"
                )
            else:  # "connect"
                if now >= deadline:
                    raise ServerUnreachableError(
                        f"cannot reach Triton at {self._where()}: {detail} "
                        f"(gave up after {waited:.1f}s; {self._unreachable_hint(detail)})"
                    ) from None
                pause = min(backoff(connect_retries), deadline - now)
                connect_retries += 1
                self._log(f"{what}: retry in {pause:.2f}s (connection failed)")
            time.sleep(pause)

    # ------------------------------------------------------------------------ health, metadata

    def _health(self, client: Any, uri: str, public: Callable[[], bool]) -> bool:
        """A health endpoint: True (200) or False (400: not live / not ready). HTTP: read through
        tritonclient's `_get`, because its is_server_live / is_model_ready say False for any
        status, which would turn a front's 503 (retry) or a restricted API's 403 (a header is
        missing) into "not ready"; other statuses raise as every other call does. gRPC (and a
        tritonclient without `_get`): the public method."""
        get = getattr(client, "_get", None) if self.protocol == "http" else None
        if get is None:
            return public()
        response = get(uri, self.headers or None, None)
        if response.status_code == 200:
            return True
        if response.status_code == 400:
            return False
        from tritonclient.utils import InferenceServerException

        body = response.read().decode("utf-8", "replace")
        try:
            message = str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            message = f"{_DECODE_FAILURE}\nresponse: {body}"
        raise InferenceServerException(msg=message, status=str(response.status_code))

    def check_ready(self) -> None:
        """Raise `ServerUnreachableError` / `ModelNotReadyError` unless the model can serve now."""
        kw = self._kwargs()
        live = self._call(
            "health check",
            lambda c: self._health(c, "v2/health/live", lambda: c.is_server_live(**kw)),
        )
        if not live:
            raise ServerUnreachableError(f"Triton at {self._where()} is not live")
        ready_uri = f"v2/models/{quote(self.model)}"
        if self.model_version is not None:
            ready_uri += f"/versions/{self.model_version}"
        try:
            ready = self._call(
                "model readiness",
                lambda c: self._health(
                    c,
                    ready_uri + "/ready",
                    lambda: c.is_model_ready(self.model, self._version, **kw),
                ),
            )
        except InferenceError as exc:
            raise ModelNotReadyError(
                f"{self._what_model()} is not ready on {self._where()}: {exc}"
            ) from None
        if not ready:
            if self.model_version is not None:
                loaded = self.loaded_versions()
                if loaded is not None and str(self.model_version) not in loaded:
                    raise ModelNotReadyError(
                        f"{self._what_model()} is not served on {self._where()}: its loaded "
                        f"version(s): {', '.join(loaded) or 'none'} (see --model-version)"
                    )
            raise ModelNotReadyError(
                f"{self._what_model()} is not ready on {self._where()} (not loaded, still loading "
                "or failed to load: see the server log or /v2/repository/index)"
            )

    def loaded_versions(self) -> list[str] | None:
        """The versions of the model the server has loaded, from Triton's statistics extension
        (sorted numerically); None when the server does not say (e.g. a restricted API)."""
        kw = self._kwargs()
        try:
            if self.protocol == "grpc":
                stats = self._call(
                    "model statistics",
                    lambda c: c.get_inference_statistics(self.model, as_json=True, **kw),
                )
            else:
                stats = self._call(
                    "model statistics", lambda c: c.get_inference_statistics(self.model, **kw)
                )
            versions = {str(s["version"]) for s in stats.get("model_stats", [])}
        except (ClientError, KeyError, TypeError, AttributeError):
            return None
        return sorted(versions, key=lambda v: (len(v), v))

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
                    "model metadata",
                    lambda c: c.get_model_metadata(self.model, self._version, as_json=True, **kw),
                )
            else:
                meta = self._call(
                    "model metadata",
                    lambda c: c.get_model_metadata(self.model, self._version, **kw),
                )
            self._info = model_info_from_metadata(meta, self.model)
        return self._info

    def weights_note(self) -> str:
        """Where the served weights came from (the ensemble config's parameter; '' if absent)."""
        kw = self._kwargs()
        if self.protocol == "grpc":
            config = self._call(
                "model config",
                lambda c: c.get_model_config(self.model, self._version, as_json=True, **kw),
            ).get("config", {})
        else:
            config = self._call(
                "model config", lambda c: c.get_model_config(self.model, self._version, **kw)
            )
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
        image_bytes: bytes | None,
        text: str,
        caption: str | None = None,
        tasks: Sequence[str] | None = None,
        top_k: int | None = None,
    ) -> dict[str, Prediction]:
        """Classify one post; returns {task: Prediction} for the requested (default: all) tasks.
        `image_bytes` None: a text-only post, answered only by a served head that can (else an
        InferenceError whose message says why: docs/text-only.md)."""
        if image_bytes is not None and not isinstance(image_bytes, bytes | bytearray | memoryview):
            raise TypeError(f"image_bytes must be bytes or None, got {type(image_bytes).__name__}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        info = self.model_info()
        selected = self.select_tasks(tasks)
        if caption and CAPTION_INPUT not in info.inputs:
            raise TaskNotServedError(
                f"model {self.model} on {self._where()} has no {CAPTION_INPUT!r} input"
            )
        mod = self._module()
        tensors = [(TEXT_INPUT, text.encode("utf-8"))]
        if image_bytes is not None:
            tensors.insert(0, (IMAGE_INPUT, bytes(image_bytes)))
        if caption:
            tensors.append((CAPTION_INPUT, caption.encode("utf-8")))
        inputs = [bytes_input(mod, name, value) for name, value in tensors]
        outputs = [
            mod.InferRequestedOutput(probs_name(t), class_count=info.num_classes[t])
            for t in selected
        ]
        # What older servers lack is not asked for: the modalities used, the modality weights.
        extra = [MODALITIES_USED] * (MODALITIES_USED in info.outputs) + [
            modality_weights_name(t) for t in selected if modality_weights_name(t) in info.outputs
        ]
        outputs += [mod.InferRequestedOutput(name) for name in extra]
        kw = self._kwargs()
        result = self._call(
            "inference",
            lambda c: c.infer(
                self.model, inputs, model_version=self._version, outputs=outputs, **kw
            ),
        )
        modal = {name: _modality_values(result, name) for name in extra}
        used = modal.get(MODALITIES_USED)
        predictions: dict[str, Prediction] = {}
        for task in selected:
            arr = result.as_numpy(probs_name(task))
            if arr is None:
                raise ClientError(f"Triton's answer has no output {probs_name(task)}")
            prediction = prediction_from_classification(
                task, np.asarray(arr).reshape(-1).tolist(), info.num_classes[task], top_k
            )
            weights = modal.get(modality_weights_name(task))
            predictions[task] = dataclasses.replace(
                prediction,
                modalities_used=None if used is None else tuple(m for m, u in used.items() if u),
                modality_weights=weights,
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
            except (
                ServerUnreachableError,
                ModelNotReadyError,
                TaskNotServedError,
                AccessDeniedError,
            ):
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


def _modality_values(result: Any, name: str) -> dict[str, float]:
    """An [image, text] output of one post (names.MODALITIES order) as {modality: value}."""
    arr = result.as_numpy(name)
    values = [] if arr is None else np.asarray(arr, dtype=np.float64).reshape(-1).tolist()
    if len(values) != len(MODALITIES):
        raise ClientError(f"Triton's answer has no output {name} of {len(MODALITIES)} values")
    return {m: round(float(v), 6) for m, v in zip(MODALITIES, values)}


def _status_of(exc: BaseException) -> str | None:
    status = getattr(exc, "status", None)
    return str(status()) if callable(status) and status() is not None else None
