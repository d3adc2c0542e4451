"""The nginx front (crisis_triton/serving/front.py) for real: serve.py --tls-cert started as a user
would, the
client over https:// and grpcs:// with a throwaway CA (tests/tls_certs.py), the body cap (413 at
the front, Triton never runs the request, the server stays ready), the limit of requests in
flight (a retryable 503 / UNAVAILABLE), and the plain front (--front: HTTP and h2c gRPC).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crisis_triton.client.triton_client import bytes_input
from crisis_triton.contract.names import ENSEMBLE, IMAGE_INPUT, TEXT_INPUT
from crisis_triton.repository.writer import read_preprocess_spec
from crisis_triton.serving.front import (
    FrontConfig,
    FrontLimits,
    LuaModules,
    NginxFront,
    front_limits,
    front_missing,
)
from crisis_triton.serving.net import free_port
from crisis_triton.serving.server import ADMIN_KEY_HEADER, admin_metadata
from crisis_triton.serving.sizing import MAX_CONNECTIONS, REQUEST_HEADER_BYTES, body_cap, post_bytes
from tests.conftest import ROOT
from tests.serving import run_serve_py, serve_py
from tests.tls_certs import Certificates, make_certificates, openssl_missing

KEY = "front-test-admin-key-0123"
_FAKE_MODULES = LuaModules(Path("/m/ndk.so"), Path("/m/lua.so"), Path("/c"), Path("/g"))
BIG = 30 * 1000 * 1000  # a 30 MB body
LIMIT = 2  # --max-connections of the served front


def _nginx_missing() -> str | None:
    return front_missing()


def _skip_reason() -> str | None:
    if importlib.util.find_spec("pytriton") is None:
        return "nvidia-pytriton is not installed"
    return _nginx_missing() or openssl_missing()


needs_front = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


# ------------------------------------------------------------------------------ no server


def test_body_cap_formula() -> None:
    """Header allowance + per post: the image in binary with its 4-byte length (the only form
    Triton takes an image in: no base64 in its JSON) and two texts at 12 bytes a character (JSON
    escapes of characters outside the BMP)."""
    image, chars = 5 * 1024 * 1024, 20_000
    assert post_bytes(image, chars) == image + 4 + 2 * 12 * chars
    assert body_cap(image, chars) == REQUEST_HEADER_BYTES + image + 4 + 2 * 12 * chars
    assert body_cap(image, chars, posts_per_request=4) == REQUEST_HEADER_BYTES + 4 * post_bytes(
        image, chars
    )
    assert post_bytes(5, 1) == 5 + 4 + 24  # tiny images: binary with its length prefix is larger
    assert body_cap(image, chars) < BIG  # the default limits refuse a 30 MB body
    with pytest.raises(ValueError, match="at least 1"):
        body_cap(image, chars, posts_per_request=0)


def test_front_limits_come_from_the_repository(tiny_repo: Path) -> None:
    spec = read_preprocess_spec(tiny_repo)
    limits = front_limits(tiny_repo)
    assert limits.max_body_bytes == body_cap(spec.max_image_bytes, spec.max_text_chars)
    assert limits.max_connections == MAX_CONNECTIONS
    assert limits.max_inflight_bytes == limits.max_body_bytes * MAX_CONNECTIONS
    assert front_limits(tiny_repo, max_body_bytes=1000, max_connections=3) == FrontLimits(1000, 3)
    with pytest.raises(ValueError, match="positive integer"):
        FrontLimits(0)


def test_front_config_is_checked_and_rendered(tmp_path: Path) -> None:
    limits = FrontLimits(12345, 7)
    with pytest.raises(ValueError, match="both a certificate and its key"):
        FrontConfig("127.0.0.1", 1, 2, 3, 4, limits, tls_cert=tmp_path / "c")
    with pytest.raises(ValueError, match="must all differ"):
        FrontConfig("127.0.0.1", 1, 2, 2, 4, limits)
    plain = FrontConfig("::", 8000, 8001, 9000, 9001, limits).render(
        tmp_path, error_log="x", modules=_FAKE_MODULES
    )
    assert "listen [::]:8000 ipv6only=off;" in plain  # `::`: IPv4 too, as for tritonserver
    assert "listen [::]:8001 http2 ipv6only=off;" in plain
    assert "client_max_body_size 12345;" in plain
    # requests in flight: front_guard.lua's counter (bodies that arrived), configured here
    assert '"max_in_flight": 7' in plain and "limit_conn per_client 32;" in plain
    assert "ssl" not in plain
    tls = FrontConfig("0.0.0.0", 8000, 8001, 9000, 9001, limits, tmp_path / "c", tmp_path / "k")
    text = tls.render(tmp_path, error_log="x", user="nobody nogroup", modules=_FAKE_MODULES)
    assert "listen 0.0.0.0:8000 ssl;" in text and "listen 0.0.0.0:8001 ssl http2;" in text
    assert f"ssl_certificate_key {tmp_path / 'k'};" in text and "user nobody nogroup;" in text
    assert "server 127.0.0.1:9000;" in text and "grpc_pass grpc://triton_grpc;" in text


@pytest.mark.skipif(_nginx_missing() is not None, reason=str(_nginx_missing()))
def test_an_unreachable_triton_is_a_retryable_answer() -> None:
    """nginx's 502 (nothing behind it: tritonserver restarting) reaches clients as 503 /
    UNAVAILABLE, which they retry; the front's temporary folder goes with it."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    config = FrontConfig("127.0.0.1", free_port(), free_port(), free_port(), free_port(),
                         FrontLimits(1000, 4))  # fmt: skip
    with NginxFront(config) as front:
        conn = http.client.HTTPConnection("127.0.0.1", config.http_port)
        status, body, answer = _request(conn, "GET", "/v2/health/ready")
        assert status == 503 and answer.getheader("Retry-After") == "1"
        assert "not reachable behind the front" in json.loads(body)["error"]
        client = grpc.InferenceServerClient(f"127.0.0.1:{config.grpc_port}")
        with pytest.raises(InferenceServerException, match="not reachable") as info:
            client.is_server_live()
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        prefix = front.prefix
        assert prefix is not None and prefix.is_dir()
    assert front.poll() == 0 and not prefix.exists()


@pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
def test_front_start_failures_say_why(tmp_path: Path) -> None:
    from crisis_triton.serving.front import FrontError

    certs = make_certificates(tmp_path / "certs")
    ports = [free_port() for _ in range(4)]
    mismatched = FrontConfig("127.0.0.1", *ports, FrontLimits(1000), certs.ca_cert,
                             certs.server_key)  # fmt: skip
    with pytest.raises(FrontError, match="refused its configuration.*key values mismatch"):
        NginxFront(mismatched).start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[0]))
        taken.listen()
        with pytest.raises(FrontError, match=f"port {ports[0]} .* already in use"):
            NginxFront(FrontConfig("127.0.0.1", *ports, FrontLimits(1000))).start()


def test_serve_py_refuses_front_flags_alone(tmp_path: Path) -> None:
    for args, message in (
        (["--tls-cert", str(tmp_path)], "go together"),
        (["--max-body-bytes", "10"], "add --front or --tls-cert"),
        (["--front", "--max-connections", "0"], "a positive integer"),
        (["--tls-cert", "no.crt", "--tls-key", "no.key"], "does not exist"),
    ):
        done = run_serve_py("--model-repository", str(tmp_path), *args, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


# ------------------------------------------------------------------------------ served


@dataclass
class Served:
    certs: Certificates
    http_port: int
    grpc_port: int
    metrics_port: int
    proc: subprocess.Popen[str]
    ready_line: str
    loopback: tuple[int, int]  # tritonserver itself behind the front: its HTTP and gRPC ports

    def https(self) -> http.client.HTTPSConnection:
        context = ssl.create_default_context(cafile=str(self.certs.ca_cert))
        return http.client.HTTPSConnection("localhost", self.http_port, context=context)


def _request(
    conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None, **headers
) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn.request(method, path, body=body, headers=headers)
    answer = conn.getresponse()
    return answer.status, answer.read(), answer


def _stats(conn: http.client.HTTPConnection) -> dict[str, int]:
    """The ensemble's request counters in Triton's statistics (open to clients)."""
    status, body, _ = _request(conn, "GET", f"/v2/models/{ENSEMBLE}/stats")
    assert status == 200, body
    stats = json.loads(body)["model_stats"][0]
    return {"success": stats["inference_stats"]["success"]["count"],
            "fail": stats["inference_stats"]["fail"]["count"]}  # fmt: skip


@pytest.fixture(scope="module")
def front_repo(small_batch_repo: Path) -> Path:
    """The tiny export with max_batch_size 4 (tests/conftest.py: /dev/shm of a container)."""
    if _skip_reason() is not None:
        pytest.skip(str(_skip_reason()))
    return small_batch_repo


@pytest.fixture(scope="module")
def served(front_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """serve.py --tls-cert/--tls-key on the tiny repository, started as a user would."""
    folder = tmp_path_factory.mktemp("front")
    certs = make_certificates(folder / "certs")
    key_file = folder / "admin.key"
    key_file.write_text(KEY + "\n")
    with serve_py(
        front_repo, "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
        "--max-connections", str(LIMIT), "--admin-key-file", str(key_file),
    ) as running:  # fmt: skip
        loopback = running.loopback()
        assert loopback, running.ready_line
        triton = (int(loopback[0].rsplit(":", 1)[1]), int(loopback[1].rsplit(":", 1)[1]))
        yield Served(certs, running.http_port, running.grpc_port, running.metrics_port,
                     running.proc, running.ready_line, triton)  # fmt: skip
    err = running.err
    assert running.returncode == 0, err
    assert "Traceback" not in err and "admin key" not in err  # a key from a file: not printed


@needs_front
def test_ready_line_names_the_tls_urls(served: Served, front_repo: Path) -> None:
    cap = front_limits(front_repo).max_body_bytes
    assert served.ready_line.startswith(
        f"crisis_classifier ready on https://127.0.0.1:{served.http_port} "
        f"grpcs://127.0.0.1:{served.grpc_port} metrics http://127.0.0.1:{served.metrics_port}"
    ), served.ready_line
    assert f"front: body cap {cap} bytes, {LIMIT} requests in flight" in served.ready_line
    # metrics stay plain HTTP on their own port, served by Triton
    status, body, _ = _request(
        http.client.HTTPConnection("127.0.0.1", served.metrics_port), "GET", "/metrics"
    )
    assert status == 200 and b"nv_inference_request_success" in body
    # the public ports speak TLS only
    status, body, _ = _request(
        http.client.HTTPConnection("127.0.0.1", served.http_port), "GET", "/v2/health/ready"
    )
    assert status == 400 and b"HTTPS" in body


def _classify(served: Served, url: str, image: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crisis_triton.client.classify", "--url", url, "--root-certs",
         str(served.certs.ca_cert), "--json", "--retries", "0", *extra, str(image),
         "Roads flooded near the bridge #harvey"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _jpeg(path: Path, size: int = 64, pad: int = 0) -> Path:
    """A JPEG file, ``pad`` bytes longer than the picture (trailing bytes decoders ignore)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue() + b"\0" * pad)
    return path


@needs_front
@pytest.mark.parametrize("scheme", ["https", "grpcs"])
def test_client_classifies_over_tls(served: Served, scheme: str, tmp_path: Path) -> None:
    port = served.http_port if scheme == "https" else served.grpc_port
    # 1.5 MB: more than nginx keeps in memory, so the body goes through its temp file
    image = _jpeg(tmp_path / "post.jpg", pad=1_500_000)
    done = _classify(served, f"{scheme}://localhost:{port}", image)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert {"task1", "task2", "task3"} <= set(json.dumps(answer).replace('"', " ").split())
    # a client that does not trust the CA is refused at the handshake
    done = subprocess.run(
        [sys.executable, "-m", "crisis_triton.client.classify", "--url", f"{scheme}://localhost:{port}",
         "--retries", "0", "--retry-deadline", "0", str(image), "text"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "certificate" in done.stderr.lower(), done.stderr


def _grpc_status(served: Served, image: bytes) -> str | None:
    """The gRPC status of one post sent with tritonclient alone (None: it succeeded)."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from crisis_triton.client.triton_client import bytes_input

    client = grpc.InferenceServerClient(
        f"localhost:{served.grpc_port}", ssl=True, root_certificates=str(served.certs.ca_cert)
    )
    inputs = [bytes_input(grpc, IMAGE_INPUT, image), bytes_input(grpc, TEXT_INPUT, b"text")]
    try:
        client.infer(ENSEMBLE, inputs)
    except InferenceServerException as exc:
        return exc.status()
    return None


@needs_front
def test_a_30_mb_body_is_refused_at_the_front(served: Served, tmp_path: Path) -> None:
    conn = served.https()
    before = _stats(conn)
    status, body, _ = _request(
        conn, "POST", f"/v2/models/{ENSEMBLE}/infer", b"\0" * BIG,
        **{"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": "2"},
    )  # fmt: skip
    assert status == 413 and "request body over the limit" in json.loads(body)["error"]
    # over gRPC: the client's own message, the front's status (never retried: not UNAVAILABLE)
    big = _jpeg(tmp_path / "big.jpg", pad=BIG)
    done = _classify(served, f"grpcs://localhost:{served.grpc_port}", big)
    assert done.returncode != 0 and "request body over the limit" in done.stderr, done.stderr
    assert _grpc_status(served, big.read_bytes()) == "StatusCode.INVALID_ARGUMENT"
    # Triton never ran them, is still ready, and the next request succeeds
    conn = served.https()
    assert _stats(conn) == before
    assert _request(conn, "GET", "/v2/health/ready")[0] == 200
    done = _classify(served, f"https://localhost:{served.http_port}", _jpeg(tmp_path / "ok.jpg"))
    assert done.returncode == 0, done.stderr
    after = _stats(served.https())
    assert after["success"] == before["success"] + 1 and after["fail"] == before["fail"]


def _hold_a_request(served: Served) -> ssl.SSLSocket:
    """A request whose body never finishes (a slow client): it holds a place of its own
    address's limit, none of the limit of requests in flight."""
    context = ssl.create_default_context(cafile=str(served.certs.ca_cert))
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", served.http_port)), server_hostname="localhost"
    )
    sock.sendall(
        f"POST /v2/models/{ENSEMBLE}/infer HTTP/1.1\r\nHost: localhost\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b"{"
    )
    return sock


def _post_over_https(served: Served, image: bytes) -> tuple[int, bytes, http.client.HTTPResponse]:
    import tritonclient.http as http_client

    inputs = [
        bytes_input(http_client, IMAGE_INPUT, image),
        bytes_input(http_client, TEXT_INPUT, b"x"),
    ]
    body, header_length = http_client.InferenceServerClient.generate_request_body(inputs)
    return _request(
        served.https(), "POST", f"/v2/models/{ENSEMBLE}/infer", body,
        **{"Inference-Header-Content-Length": str(header_length)},
    )  # fmt: skip


@needs_front
def test_requests_over_the_limit_get_a_retryable_answer(served: Served, tmp_path: Path) -> None:
    """The limit counts requests being proxied to Triton: slow bodies hold none of it; posts
    waiting inside Triton do, and one more gets a retryable 503 (gRPC UNAVAILABLE)."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    from tests.procs import stopped, triton_pid

    image = _jpeg(tmp_path / "post.jpg").read_bytes()
    held = [_hold_a_request(served) for _ in range(LIMIT + 1)]
    try:
        time.sleep(0.5)  # nginx has read their headers
        assert _post_over_https(served, image)[0] == 200  # slow bodies hold no place
    finally:
        for sock in held:
            sock.close()
    # Posts proxied to Triton hold the places: tritonserver stopped (SIGSTOP), they wait there.
    # (A stopped python stub would not do: the python backend fails requests to it at once.)
    waiting: list[int] = []
    with stopped([triton_pid(served.proc.pid)]):
        posts = [
            threading.Thread(target=lambda: waiting.append(_post_over_https(served, image)[0]))
            for _ in range(LIMIT)
        ]
        for post in posts:
            post.start()
        time.sleep(1.0)  # both proxied and waiting
        status, body, answer = _post_over_https(served, image)
        assert status == 503 and answer.getheader("Retry-After") == "1", body
        assert f"over {LIMIT} requests in flight" in json.loads(body)["error"]
        client = grpc.InferenceServerClient(
            f"localhost:{served.grpc_port}", ssl=True, root_certificates=str(served.certs.ca_cert)
        )
        inputs = [bytes_input(grpc, IMAGE_INPUT, image), bytes_input(grpc, TEXT_INPUT, b"x")]
        with pytest.raises(InferenceServerException, match="UNAVAILABLE") as info:
            client.infer(ENSEMBLE, inputs)
        assert f"over {LIMIT} requests in flight" in str(info.value)
    for post in posts:
        post.join(60)
    assert waiting == [200] * LIMIT  # the waiting posts were answered once Triton went on
    # health probes are never counted (no slot): the front's rendered locations say so
    conf = FrontConfig("127.0.0.1", 1, 2, 3, 4, FrontLimits(1000)).render(
        Path("/prefix"), error_log="x", modules=_FAKE_MODULES
    )
    for probe in ("/v2/health/ready", "/v2/health/live"):
        block = conf.split(f"location = {probe} {{", 1)[1].split("\n        }", 1)[0]
        assert "front_guard" not in block and "limit_conn" not in block
    assert _request(served.https(), "GET", "/v2/health/ready")[0] == 200


@needs_front
def test_admin_key_passes_the_front(served: Served) -> None:
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    path = "/v2/repository/index"
    assert _request(served.https(), "POST", path, b"{}")[0] == 403
    status, body, _ = _request(served.https(), "POST", path, b"{}", **{ADMIN_KEY_HEADER: KEY})
    assert status == 200 and ENSEMBLE in body.decode()
    client = grpc.InferenceServerClient(
        f"localhost:{served.grpc_port}", ssl=True, root_certificates=str(served.certs.ca_cert)
    )
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    index = client.get_model_repository_index(headers=admin_metadata(KEY))
    assert ENSEMBLE in str(index)


# ------------------------------------------------------------------------------ plain front


@needs_front
def test_plain_front_caps_bodies_over_http_and_h2c(
    served: Served, front_repo: Path, tmp_path: Path
) -> None:
    """--front without TLS (what a container uses): the same cap and limits, plain HTTP and h2c;
    a front of its own before the module's tritonserver (served's, on loopback)."""
    import tritonclient.grpc as grpc
    import tritonclient.http as http_client
    from tritonclient.utils import InferenceServerException

    from crisis_triton.client.triton_client import raw_probabilities

    limits = front_limits(front_repo, max_body_bytes=200_000)
    config = FrontConfig("127.0.0.1", free_port(), free_port(), *served.loopback, limits)
    with NginxFront(config) as front:
        assert front.prefix is not None and (front.prefix / "nginx.conf").exists()
        urls = {
            "http": f"127.0.0.1:{config.http_port}",
            "grpc": f"127.0.0.1:{config.grpc_port}",
        }
        image = _jpeg(tmp_path / "post.jpg")
        for protocol, module in (("http", http_client), ("grpc", grpc)):
            probs = raw_probabilities(module, urls[protocol], image.read_bytes(), "text",
                                      None, ("task1",))  # fmt: skip
            assert probs["task1"].shape[-1] > 1
            with pytest.raises(InferenceServerException, match="over the limit of 200000"):
                raw_probabilities(module, urls[protocol], b"\xff" * 300_000, "text", None,
                                  ("task1",))  # fmt: skip
        prefix = front.prefix
    assert front.poll() is not None and not prefix.exists()  # stopped, temp files removed
