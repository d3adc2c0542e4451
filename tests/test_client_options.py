"""Client options (docs/client.md, "Client options") against the real embedded tritonserver:

- `-H/--header` goes with every call the client makes (a front in the test records them, HTTP
  and gRPC) and opens Triton's restricted APIs (the operator key of
  crisis_triton/serving/server.py);
- `--model-version N` reaches version N (an ensemble with versions 1 and 2 served at once: Triton's
  per-version statistics show which one answered);
- `https://` / `grpcs://` with `--root-certs`, and mutual TLS with `--client-cert/--client-key`,
  through a TLS-terminating front in this test (an ssl-wrapped HTTP server, a gRPC server with TLS
  credentials) that passes every request on to Triton byte for byte;
- retries: the front answers 503 / 429 (gRPC UNAVAILABLE / RESOURCE_EXHAUSTED) before passing
  requests on, as nginx does at its connection limit; 400 and 500 are not retried.

The front is a real server on a real socket, not a mock of Triton: everything it does not refuse is
answered by tritonserver. The same options against nginx: tests/test_front.py.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from crisis_triton.client import classify as cli
from crisis_triton.client.triton_client import (
    DEFAULT_RETRIES,
    AccessDeniedError,
    CertificateError,
    CrisisClient,
    Endpoint,
    ServerOverloadedError,
    backoff,
    parse_header,
    parse_url,
    plain_answer,
    shown_headers,
)
from crisis_triton.contract.names import ENSEMBLE
from crisis_triton.serving.net import free_port
from crisis_triton.serving.server import ADMIN_KEY_HEADER, GRPC_RESTRICTED_PREFIX, EmbeddedServer
from tests.conftest import ROOT, TINY_TASKS
from tests.serving import serve_repository
from tests.tls_certs import make_certificates, openssl_missing

IMAGE = ROOT / "examples" / "flooded_house.jpg"
TEXT = "Flood waters rising downtown #Harvey"
KEY, SECRET = ADMIN_KEY_HEADER, "s3cr3t-Value-of-the-operator"
GRPC_KEY = GRPC_RESTRICTED_PREFIX + KEY  # the name Triton's restricted gRPC protocols expect
HTTP_HEADER = ["-H", f"{KEY}:{SECRET}"]
GRPC_HEADER = ["-H", f"{GRPC_KEY}:{SECRET}"]
NGINX_503 = (
    b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n<body>\r\n"
    b"<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n<hr><center>nginx</center>"
    b"\r\n</body>\r\n</html>\r\n"
)


def run_cli(*args: str) -> tuple[int, str, str]:
    """The CLI in this process (exit code, stdout, stderr of its own lines)."""
    out, err = io.StringIO(), io.StringIO()
    real_err, sys.stderr = sys.stderr, err
    try:
        code = cli.main([str(IMAGE), TEXT, "--json", *args], stdout=out)
    finally:
        sys.stderr = real_err
    return code, out.getvalue(), err.getvalue()


def assert_answer(code: int, out: str, err: str) -> dict[str, Any]:
    assert code == 0, err
    answer = json.loads(out)
    assert tuple(answer) == TINY_TASKS
    return answer


def one_error_line(code: int, expected: int, out: str, err: str) -> str:
    assert code == expected, err
    lines = [line for line in err.splitlines() if "warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("classify.py: error: "), err
    assert out == ""
    return lines[0]


# -------------------------------------------------------------------------- no server needed


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        (None, None, Endpoint("http", "localhost:8000")),
        (None, "grpc", Endpoint("grpc", "localhost:8001")),
        ("triton:8000", None, Endpoint("http", "triton:8000")),
        ("triton:8001", "grpc", Endpoint("grpc", "triton:8001")),
        ("http://triton:8000/", None, Endpoint("http", "triton:8000")),
        (
            "https://triton.example.org:8443",
            None,
            Endpoint("http", "triton.example.org:8443", True),
        ),
        ("https://triton:8443", "http", Endpoint("http", "triton:8443", True)),
        ("HTTPS://triton:8443/triton", None, Endpoint("http", "triton:8443/triton", True)),
        ("grpc://triton:8001", None, Endpoint("grpc", "triton:8001")),
        ("grpcs://triton:8444", None, Endpoint("grpc", "triton:8444", True)),
        ("grpcs://[::1]:8444", "grpc", Endpoint("grpc", "[::1]:8444", True)),
    ],
)
def test_url_forms(url: str | None, protocol: str | None, expected: Endpoint) -> None:
    assert parse_url(url, protocol) == expected
    assert CrisisClient(url, protocol).endpoint == expected


@pytest.mark.parametrize(
    ("url", "protocol", "message"),
    [
        ("ftp://triton:21", None, "unsupported url scheme"),
        ("https://triton:8443", "grpc", "does not match protocol"),
        ("grpcs://triton:8444", "http", "does not match protocol"),
        ("grpcs://triton:8444/path", None, "no path"),
        ("https://", None, "no valid host"),
        ("https://user:pw@triton:8443", None, "credentials in the url"),
        ("triton:8000", "smtp", "protocol must be one of"),
    ],
)
def test_bad_urls(url: str, protocol: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url, protocol)


def test_headers_parse_and_mask() -> None:
    assert parse_header("admin-key: s3cr3t") == ("admin-key", "s3cr3t")
    assert parse_header("X-Trace:a:b:c") == ("X-Trace", "a:b:c")  # the first ':' splits
    for bad in ("no-colon", ":value", "bad name:v", "x:a\nb", "Content-Length:5"):
        with pytest.raises(ValueError):
            parse_header(bad)
    assert CrisisClient(headers={"x-note": "héllo"}).headers == {"x-note": "héllo"}  # HTTP: ok
    for grpc_bad in ({"x-note": "héllo"}, {"x-trace-bin": "abc"}):  # gRPC metadata cannot
        with pytest.raises(ValueError, match="gRPC metadata"):
            CrisisClient(protocol="grpc", headers=grpc_bad)
    assert CrisisClient(protocol="grpc", headers={"X-Trace": "1"}).headers == {"x-trace": "1"}
    shown = shown_headers(
        {"admin-key": "s", "Authorization": "Bearer t", "X-Api-Token": "t", "x-request-id": "r1"}
    )
    assert shown == "admin-key: ***, Authorization: ***, X-Api-Token: ***, x-request-id: r1"


def test_backoff_is_capped_exponential_with_jitter() -> None:
    for retry in range(12):
        step = min(2.0, 0.1 * 2**retry)
        waits = [backoff(retry) for _ in range(200)]
        assert all(step / 2 <= w <= step for w in waits), (retry, min(waits), max(waits))
        assert len(set(waits)) > 100  # jittered: clients turned away together spread out
    total = [sum(backoff(k) for k in range(DEFAULT_RETRIES)) for _ in range(200)]
    assert 1.55 <= min(total) and max(total) <= 3.1  # docs/client.md: the default's waits


@pytest.mark.parametrize(
    ("protocol", "status", "message", "kind"),
    [
        ("http", "503", "HTTP 503: Service Unavailable", "overload"),
        ("http", "429", "HTTP 429: Too Many Requests", "overload"),
        ("http", "502", "HTTP 502: Bad Gateway", "connect"),
        ("http", "504", "HTTP 504: Gateway Time-out", "front-timeout"),
        ("http", "400", "bad post", "server"),
        ("http", "500", "oops", "server"),
        ("http", "403", "This API is restricted, expecting header 'admin-key'", "denied"),
        # gRPC: an intermediary's HTTP status arrives as UNAVAILABLE (gRPC's status mapping)
        ("grpc", "StatusCode.UNAVAILABLE", "Received http2 header with status: 503", "overload"),
        ("grpc", "StatusCode.UNAVAILABLE", "Received http2 header with status: 502", "connect"),
        (
            "grpc",
            "StatusCode.UNAVAILABLE",
            "Received http2 header with status: 504",
            "front-timeout",
        ),  # fmt: skip
        ("grpc", "StatusCode.UNAVAILABLE", "failed to connect to all addresses", "connect"),
        ("grpc", "StatusCode.RESOURCE_EXHAUSTED", "queue full", "overload"),
        (
            "grpc",
            "StatusCode.UNAVAILABLE",
            "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'",
            "denied",
        ),  # fmt: skip
        ("grpc", "StatusCode.INVALID_ARGUMENT", "bad post", "server"),
    ],
)
def test_answers_are_classified(protocol: str, status: str, message: str, kind: str) -> None:
    """What each answer leads to (retried or not): the exceptions tritonclient raises for them
    (the real ones are met in the tests below, against fronts and tritonserver)."""
    from tritonclient.utils import InferenceServerException

    exc = InferenceServerException(msg=message, status=status)
    assert CrisisClient(protocol=protocol)._classify_exception(exc)[0] == kind


def test_plain_answer_of_a_front() -> None:
    decoding = (
        "an exception occurred in the client while decoding the response: Expecting value: "
        f"line 1 column 1 (char 0)\nresponse: {NGINX_503.decode()}"
    )
    assert plain_answer(decoding, "503") == "HTTP 503: 503 Service Temporarily Unavailable"
    assert plain_answer("This API is restricted", "403") == "This API is restricted"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--root-certs", "ca.pem"], "--root-certs: give a TLS --url"),
        (["--url", "http://h:1", "--client-cert", "c", "--client-key", "k"], "give a TLS --url"),
        (["--url", "https://h:1", "--client-cert", "c.pem"], "both --client-cert and --client-key"),
        (["--url", "grpcs://h:1", "--protocol", "http"], "does not match protocol"),
        (["-H", "admin-key"], "expected NAME:VALUE"),
        (["-H", "bad name:v"], "not a valid HTTP header name"),
        (["--retries", "-1"], "must be >= 0"),
        (["--model-version", "0"], "must be >= 1"),
    ],
)
def test_cli_option_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([str(IMAGE), TEXT, *argv])
    assert exited.value.code == cli.ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_defaults() -> None:
    args = cli.build_parser().parse_args([str(IMAGE), TEXT])
    assert args.retries == DEFAULT_RETRIES and "--retries" in cli.build_parser().format_help()
    assert f"(default: {DEFAULT_RETRIES})" in " ".join(cli.build_parser().format_help().split())


def test_tls_files_are_checked_before_any_connection(
    tmp_path: Path, certs: dict[str, Path]
) -> None:
    missing = tmp_path / "nope.pem"
    port = free_port()  # nothing listens: the files fail first, with their names
    code, out, err = run_cli("--url", f"https://127.0.0.1:{port}", "--root-certs", str(missing))
    assert f"root certificates file not found: {missing}" in one_error_line(code, 3, out, err)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    code, out, err = run_cli("--url", f"grpcs://127.0.0.1:{port}", "--root-certs", str(not_pem))
    assert f"cannot load root certificates {not_pem}" in one_error_line(code, 3, out, err)
    wrong_key = ["--client-cert", str(certs["client.pem"]), "--client-key", str(certs["ca.key"])]
    code, out, err = run_cli("--url", f"https://127.0.0.1:{port}", *wrong_key)
    assert "cannot load client certificate" in one_error_line(code, 3, out, err)
    with pytest.raises(CertificateError):
        CrisisClient(f"https://127.0.0.1:{port}", root_certs=str(missing))


# ------------------------------------------------------------------- a front in the test


class Front:
    """An HTTP/1.1 server (TLS with `context`) that answers the statuses of `script` first (to
    requests whose path contains `only`, all when None; 0: pass that one on), then passes requests
    on to Triton at `target` as they are. `seen`: (method, path, status, request headers)."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}

    def __init__(
        self,
        target: str,
        script: Sequence[int] = (),
        only: str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> None:
        self.target, self.script, self.only = target, list(script), only
        self.seen: list[tuple[str, str, int, dict[str, str]]] = []
        self.lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                front.handle(self)

            do_POST = do_GET

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self.lock:
            status = None
            if self.script and (self.only is None or self.only in request.path):
                status = self.script.pop(0)
        if status:
            data = NGINX_503 if status == 503 else json.dumps({"error": f"front: {status}"})
            payload = data if isinstance(data, bytes) else data.encode()
            self._record(request, status, headers)
            request.send_response(status)
            request.send_header("Content-Type", "text/html")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
            return
        host, port = self.target.rsplit(":", 1)
        upstream = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            forwarded = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
            upstream.request(request.command, request.path, body=body, headers=forwarded)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self._record(request, answer.status, headers)
        request.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in self.HOP:
                request.send_header(name, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _record(self, request: BaseHTTPRequestHandler, status: int, headers: dict) -> None:
        with self.lock:
            self.seen.append((request.command, request.path.split("?")[0], status, headers))

    def statuses(self) -> list[int]:
        return [s for _, _, s, _ in self.seen]

    def __enter__(self) -> Front:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class GrpcFront:
    """A gRPC server (TLS with `credentials`) that aborts the first calls with the codes of
    `script`, then passes every call on to Triton's gRPC port (request and answer bytes as they
    are, metadata too). `seen`: (method, code, metadata) per call."""

    def __init__(self, target: str, script: Sequence[Any] = (), credentials: Any = None) -> None:
        import grpc

        self.grpc = grpc
        self.script = list(script)
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.channel = grpc.insecure_channel(target)
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        front = self

        class Handler(grpc.GenericRpcHandler):
            def service(self, details: Any) -> Any:
                method = details.method
                return grpc.unary_unary_rpc_method_handler(
                    lambda request, context: front.call(method, request, context)
                )

        self.server.add_generic_rpc_handlers((Handler(),))
        address = "127.0.0.1:0"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)

    def call(self, method: str, request: bytes, context: Any) -> bytes:
        metadata = {
            k: v
            for k, v in context.invocation_metadata()
            if not k.startswith((":", "grpc-")) and k != "user-agent"
        }
        with self.lock:
            code = self.script.pop(0) if self.script else None
            self.seen.append((method, str(code or "OK"), metadata))
        if code is not None:
            context.abort(code, f"front: {code.name}")
        forward = self.channel.unary_unary(method)
        return forward(request, metadata=tuple(metadata.items()), timeout=60)

    def __enter__(self) -> GrpcFront:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)
        self.channel.close()


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate
    (tests/tls_certs.py), by the names these tests use."""
    if (why := openssl_missing()) is not None:
        pytest.skip(why)
    made = make_certificates(tmp_path_factory.mktemp("certs"))
    return {
        "ca.pem": made.ca_cert, "ca.key": made.ca_key,
        "server.pem": made.server_cert, "server.key": made.server_key,
        "client.pem": made.client_cert, "client.key": made.client_key,
    }  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """The tiny repository with its ensemble in two versions (1 and 2, both loaded), served with
    the operator key SECRET (the restricted APIs, e.g. the repository index, need KEY: SECRET)."""
    repo = shutil.copytree(tiny_repo, tmp_path_factory.mktemp("options") / "repo")
    ensemble = repo / ENSEMBLE
    shutil.copytree(ensemble / "1", ensemble / "2")
    config = ensemble / "config.pbtxt"
    config.write_text(config.read_text() + "version_policy: { all: {} }\n")
    with serve_repository(repo, admin_key=SECRET) as srv:
        yield srv


def inference_counts(server: EmbeddedServer) -> dict[str, int]:
    """Requests each version of the ensemble answered (Triton's statistics, not restricted)."""
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.url_http)
    try:
        stats = client.get_inference_statistics(ENSEMBLE)["model_stats"]
    finally:
        client.close()
    return {s["version"]: int(s["inference_count"]) for s in stats}


def settled_counts(server: EmbeddedServer, total: int | None = None) -> dict[str, int]:
    """inference_counts once they stop moving (Triton counts an ensemble request as it finishes,
    which can be just after the client has its answer) and, with `total`, reach that sum."""
    deadline = time.monotonic() + 10
    last = inference_counts(server)
    while True:
        time.sleep(0.2)
        now = inference_counts(server)
        settled = now == last and (total is None or sum(now.values()) >= total)
        if settled or time.monotonic() > deadline:
            return now
        last = now


# ------------------------------------------------------------------ headers, model version


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_headers_open_a_restricted_api(server: EmbeddedServer, protocol: str) -> None:
    """The client's headers go with its calls (the per-call arguments every request uses): they
    open Triton's restricted repository index; without them, or with a wrong key, it refuses."""
    url = f"{protocol}://" + (server.url_http if protocol == "http" else server.url_grpc)
    name = KEY if protocol == "http" else GRPC_KEY

    def index(headers: dict[str, str] | None) -> list[str]:
        with CrisisClient(url, headers=headers) as client:
            kw = {"headers": client._kwargs()["headers"]}
            if protocol == "grpc":
                kw["as_json"] = True
            answer = client._call("repository index", lambda c: c.get_model_repository_index(**kw))
        models = answer if protocol == "http" else answer.get("models", [])
        return [m["name"] for m in models]

    with pytest.raises(AccessDeniedError, match=f"expecting header '{name}'.*--header"):
        index(None)
    with pytest.raises(AccessDeniedError):
        index({name: "wrong-key-of-the-same-length"})  # the value is checked, not presence
    assert ENSEMBLE in index({name: SECRET})


def test_every_request_carries_the_headers(server: EmbeddedServer) -> None:
    """Health, readiness, config, metadata and inference: each request the client sends."""
    with Front(server.url_http) as front:
        code, out, err = run_cli(
            "--url", f"127.0.0.1:{front.port}", *HTTP_HEADER, "-H", "x-request-id:r-42"
        )
        assert_answer(code, out, err)
    paths = [path for _, path, _, _ in front.seen]
    model = f"/v2/models/{ENSEMBLE}"
    for expected in ("/v2/health/live", f"{model}/ready", f"{model}/config", model,
                     f"{model}/infer"):  # fmt: skip
        assert expected in paths, paths
    for method, path, status, headers in front.seen:
        assert status == 200, (method, path, status)
        assert headers.get(KEY) == SECRET and headers.get("x-request-id") == "r-42", path


def test_model_version_reaches_that_version(server: EmbeddedServer) -> None:
    url = f"http://{server.url_http}"
    before = settled_counts(server)
    assert set(before) == {"1", "2"}
    assert_answer(*run_cli("--url", url, "--model-version", "1"))
    after_1 = settled_counts(server, sum(before.values()) + 1)
    assert (after_1["1"] - before["1"], after_1["2"] - before["2"]) == (1, 0)
    assert_answer(
        *run_cli(
            "--url",
            url.replace("http", "grpc").replace(str(server.http_port), str(server.grpc_port)),
            "--model-version",
            "2",
        )
    )
    after_2 = settled_counts(server, sum(after_1.values()) + 1)
    assert (after_2["1"] - after_1["1"], after_2["2"] - after_1["2"]) == (0, 1)
    code, out, err = run_cli("--url", url, "--model-version", "3")
    line = one_error_line(code, cli.ExitCode.NOT_READY, out, err)
    assert f"model {ENSEMBLE} version 3 is not served" in line
    assert "its loaded version(s): 1, 2 (see --model-version)" in line


def test_verbose_shows_what_is_sent_with_secrets_masked(server: EmbeddedServer) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "client" / "classify.py"), str(IMAGE), TEXT, "--json", "-v",
         "--url", f"grpc://{server.url_grpc}", *GRPC_HEADER, "-H", "x-request-id:r-7",
         "--model-version", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert tuple(json.loads(proc.stdout)) == TINY_TASKS  # stdout: the answer alone
    err = proc.stderr
    assert SECRET not in err
    assert f"{GRPC_KEY}: ***" in err and "x-request-id: r-7" in err
    assert f"inference: grpc://{server.url_grpc}, model {ENSEMBLE} version 2" in err
    assert "inference: answered in " in err and " ms" in err


# ------------------------------------------------------------------------------- retries


def test_overload_answers_are_retried_then_pass(server: EmbeddedServer) -> None:
    with Front(server.url_http, script=[503, 429, 503]) as front:
        code, out, err = run_cli("--url", f"127.0.0.1:{front.port}", "-v")
        answer = assert_answer(code, out, err)
    assert front.statuses()[:4] == [503, 429, 503, 200]  # the health check, retried 3 times
    assert all(s == 200 for s in front.statuses()[3:])
    assert err.count("(overload)") == 3
    direct = assert_answer(*run_cli("--url", server.url_http))
    assert answer == direct


def test_overload_retries_are_bounded(server: EmbeddedServer) -> None:
    with Front(server.url_http, script=[503] * 10, only="/infer") as front:
        code, out, err = run_cli("--url", f"127.0.0.1:{front.port}", "--retries", "2")
        line = one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)
        assert "overloaded (inference): 503 HTTP 503: 503 Service Temporarily Unavailable" in line
        assert "after 2 retries" in line
        infers = [s for _, path, s, _ in front.seen if path.endswith("/infer")]
        assert infers == [503, 503, 503]  # the first try and 2 retries, no more
        with CrisisClient(f"127.0.0.1:{front.port}", retries=0) as client:
            with pytest.raises(ServerOverloadedError):
                client.classify(IMAGE.read_bytes(), TEXT)
        assert len([p for _, p, _, _ in front.seen if p.endswith("/infer")]) == 4  # one more


@pytest.mark.parametrize("status", [400, 500])
def test_bad_requests_and_server_errors_are_not_retried(
    server: EmbeddedServer, status: int
) -> None:
    with Front(server.url_http, script=[status], only="/infer") as front:
        code, out, err = run_cli("--url", f"127.0.0.1:{front.port}")
    line = one_error_line(code, cli.ExitCode.REJECTED, out, err)
    assert f"front: {status}" in line
    assert [s for _, p, s, _ in front.seen if p.endswith("/infer")] == [status]


def test_a_front_without_triton_behind_it(server: EmbeddedServer) -> None:
    """502 (the front cannot reach Triton) is a failed connection: retried until
    --retry-deadline, exit 4. 504 (the front gave up waiting) is a timeout: not retried, exit 7."""
    with Front(server.url_http, script=[502] * 1000, only="/infer") as front:
        code, out, err = run_cli("--url", f"127.0.0.1:{front.port}", "--retry-deadline", "0.5")
    line = one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)
    assert "cannot reach Triton" in line and "front: 502" in line
    assert len([p for _, p, _, _ in front.seen if p.endswith("/infer")]) >= 2  # retried
    with Front(server.url_http, script=[504] * 10, only="/infer") as front:
        code, out, err = run_cli("--url", f"127.0.0.1:{front.port}")
    line = one_error_line(code, cli.ExitCode.TIMEOUT, out, err)
    assert "gave up waiting for Triton (inference): front: 504" in line
    assert [s for _, p, s, _ in front.seen if p.endswith("/infer")] == [504]


def test_access_refused_by_a_front_is_not_retried(server: EmbeddedServer) -> None:
    with Front(server.url_http, script=[403]) as front:
        code, out, err = run_cli("--url", f"127.0.0.1:{front.port}")
    assert "refused the health check (403)" in one_error_line(code, cli.ExitCode.DENIED, out, err)
    assert front.statuses() == [403]
    with (
        Front(server.url_http, script=[401], only="/infer") as front,
        CrisisClient(f"127.0.0.1:{front.port}", headers={KEY: SECRET}) as client,
    ):
        with pytest.raises(AccessDeniedError, match="401"):
            client.classify(IMAGE.read_bytes(), TEXT)


def test_grpc_overload_codes_are_retried(server: EmbeddedServer) -> None:
    import grpc

    codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    with GrpcFront(server.url_grpc, script=codes) as front:
        code, out, err = run_cli("--url", f"grpc://127.0.0.1:{front.port}", *GRPC_HEADER)
        assert_answer(code, out, err)
    assert [c for _, c, _ in front.seen][:3] == ["StatusCode.UNAVAILABLE",
                                                 "StatusCode.RESOURCE_EXHAUSTED", "OK"]  # fmt: skip
    assert all(md.get(GRPC_KEY) == SECRET for _, _, md in front.seen)  # metadata on every call
    with GrpcFront(server.url_grpc, script=[grpc.StatusCode.RESOURCE_EXHAUSTED] * 3) as front:
        code, out, err = run_cli("--url", f"grpc://127.0.0.1:{front.port}",
                                 "--retries", "1")  # fmt: skip
    assert "is overloaded" in one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)
    assert len(front.seen) == 2
    with GrpcFront(server.url_grpc, script=[grpc.StatusCode.INVALID_ARGUMENT]) as front:
        code, out, err = run_cli("--url", f"grpc://127.0.0.1:{front.port}")
    one_error_line(code, cli.ExitCode.REJECTED, out, err)
    assert len(front.seen) == 1  # not retried


def test_batch_stops_on_persistent_overload_and_resumes(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """A front that stays overloaded stops a batch like an unreachable server (exit 4, rows done so
    far kept); the rerun does the rest."""
    shutil.copy(IMAGE, tmp_path / "a.jpg")
    batch = tmp_path / "posts.csv"
    batch.write_text("image,text\n" + "".join(f"a.jpg,post {i}\n" for i in range(4)))
    results = tmp_path / "results.jsonl"
    argv = ["--batch", str(batch), "--results", str(results), "--concurrency", "1",
            "--no-progress"]  # fmt: skip
    # 2 rows pass, then every inference is answered 503: the first try and 1 retry, then stop.
    with Front(server.url_http, script=[0, 0] + [503] * 20, only="/infer") as front:
        code = cli.main([*argv, "--url", f"127.0.0.1:{front.port}", "--retries", "1"])
    assert code == cli.ExitCode.UNREACHABLE
    infers = [s for _, p, s, _ in front.seen if p.endswith("/infer")]
    # rows 0, 1 answered; row 2 tried twice (the first try, 1 retry); row 3, already under way
    # in the batch's queue when row 2 stopped it, may have been tried twice too (not recorded)
    assert infers[:2] == [200, 200] and infers[2:] in ([503] * 2, [503] * 4), infers
    assert not results.with_name(results.name + ".partial").exists()
    done = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["row"] for r in done] == [0, 1] and all(r["ok"] for r in done)
    assert cli.main([*argv, "--url", server.url_http]) == 0
    final = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["row"] for r in final] == [0, 1, 2, 3] and all(r["ok"] for r in final)


# ----------------------------------------------------------------------------------- TLS


def server_context(certs: dict[str, Path], client_auth: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs["server.pem"], certs["server.key"])
    if client_auth:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs["ca.pem"])
    return context


def test_https_with_root_certs(server: EmbeddedServer, certs: dict[str, Path]) -> None:
    with Front(server.url_http, context=server_context(certs, False)) as front:
        url = f"https://127.0.0.1:{front.port}"
        assert_answer(*run_cli("--url", url, "--root-certs", str(certs["ca.pem"])))
        assert front.seen and all(s == 200 for s in front.statuses())
        seen = len(front.seen)
        code, out, err = run_cli("--url", url)  # the system's CAs: not this one
        line = one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)
        assert "TLS with 127.0.0.1" in line and "certificate verify failed" in line
        assert len(front.seen) == seen  # nothing got through
        code, out, err = run_cli("--url", f"http://127.0.0.1:{front.port}",
                                 "--retry-deadline", "0")  # fmt: skip
        assert code == cli.ExitCode.UNREACHABLE  # plain HTTP to a TLS port
        assert len(front.seen) == seen


def test_https_mutual_tls(server: EmbeddedServer, certs: dict[str, Path]) -> None:
    mine = ["--client-cert", str(certs["client.pem"]), "--client-key", str(certs["client.key"])]
    with Front(server.url_http, context=server_context(certs, True)) as front:
        url = f"https://localhost:{front.port}"  # by name: the certificate's DNS name
        roots = ["--root-certs", str(certs["ca.pem"])]
        assert_answer(*run_cli("--url", url, *roots, *mine))
        seen = len(front.seen)
        code, out, err = run_cli("--url", url, *roots, "--retry-deadline", "0")
        line = one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)  # no client certificate
        # the server's alert, or its closing the connection, depending on timing
        assert ("requires a client certificate" in line) or (
            "does it require a client certificate? see --client-cert" in line
        ), line
        assert len(front.seen) == seen


def test_grpcs_with_root_certs_and_mutual_tls(
    server: EmbeddedServer, certs: dict[str, Path]
) -> None:
    import grpc

    credentials = grpc.ssl_server_credentials(
        [(certs["server.key"].read_bytes(), certs["server.pem"].read_bytes())],
        root_certificates=certs["ca.pem"].read_bytes(),
        require_client_auth=True,
    )
    mine = ["--client-cert", str(certs["client.pem"]), "--client-key", str(certs["client.key"])]
    roots = ["--root-certs", str(certs["ca.pem"])]
    with GrpcFront(server.url_grpc, credentials=credentials) as front:
        url = f"grpcs://127.0.0.1:{front.port}"
        assert_answer(*run_cli("--url", url, *roots, *mine))
        assert front.seen and all(c == "OK" for _, c, _ in front.seen)
        seen = len(front.seen)
        code, out, err = run_cli("--url", url, *roots, "--retry-deadline", "0")
        line = one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)  # no client certificate
        assert ("requires a client certificate" in line) or (
            "does it require a client certificate? see --client-cert" in line
        ), line
        code, out, err = run_cli("--url", url, *mine, "--retry-deadline", "0")
        line = one_error_line(code, cli.ExitCode.UNREACHABLE, out, err)  # unknown CA
        assert "TLS with 127.0.0.1" in line and "CERTIFICATE_VERIFY_FAILED" in line
        assert len(front.seen) == seen
