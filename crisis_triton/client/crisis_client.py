"""`CrisisClient`: the classifier ensemble (`crisis_triton.contract.names.ENSEMBLE`) over Triton's
HTTP or gRPC protocol, one post per request.

The answer holds one `Prediction` per served task. Everything the client needs to know about the
model comes from the server: which tasks are served (the `probs_<task>` outputs in the model
metadata), how many classes each has (the output's shape) and the class labels (Triton's
classification extension, which reads each output's `label_filename`). Where and how to connect:
crisis_triton/client/connection.py; what is retried: crisis_triton/client/retries.py; options:
docs/client.md. `tritonclient` is imported lazily (on the first request), so importing this
module is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np

from crisis_triton.client.connection import (
    DEFAULT_TIMEOUT_S,
    Protocol,
    check_header,
    check_tls_files,
    parse_url,
    shown_headers,
)
from crisis_triton.client.errors import (
    AccessDeniedError,
    ClientError,
    InferenceError,
    ModelNotReadyError,
    ServerUnreachableError,
    TaskNotServedError,
)
from crisis_triton.client.messages import DECODE_FAILURE
from crisis_triton.client.metadata import ModelInfo, model_info_from_metadata
from crisis_triton.client.results import (
    Post,
    Prediction,
    modality_values,
    prediction_from_classification,
)
from crisis_triton.client.retries import (
    DEFAULT_RETRIES,
    DEFAULT_RETRY_DEADLINE_S,
    call_with_retries,
    classify_failure,
)
from crisis_triton.client.tensors import bytes_input
from crisis_triton.contract.names import (
    CAPTION_INPUT,
    ENSEMBLE,
    IMAGE_INPUT,
    MODALITIES_USED,
    TEXT_INPUT,
    WEIGHTS_PARAMETER,
    modality_weights_name,
    probs_name,
)

T = TypeVar("T")


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
        """-> (kind, detail) of a failed call (`classify_failure`); a hook for subclasses that
        count the answers (crisis_triton/bench/burst.py)."""
        return classify_failure(exc, self.protocol)

    def _call(self, what: str, fn: Callable[[Any], T]) -> T:
        """Run `fn(client)`; retry connection failures until the deadline and overload answers
        `retries` times, with capped exponential backoff and jitter (`call_with_retries`)."""
        if self.verbose:
            headers = f", headers {shown_headers(self.headers)}" if self.headers else ""
            self._log(f"{what}: {self.endpoint.url}, {self._what_model()}{headers}")
        return call_with_retries(
            what,
            lambda: fn(self._client()),
            classify=self._classify_exception,
            retries=self.retries,
            retry_deadline=self.retry_deadline,
            timeout=self.timeout,
            where=self._where(),
            unreachable_hint=self._unreachable_hint,
            log=self._log,
        )

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
            message = f"{DECODE_FAILURE}\nresponse: {body}"
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
        modal = {name: modality_values(result, name) for name in extra}
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
