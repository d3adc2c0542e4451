"""The front of the embedded tritonserver: Debian's nginx, with TLS or without, and limits.

``serve.py --tls-cert CRT --tls-key KEY`` (or ``--front``, the same without TLS) keeps the public
HTTP and gRPC ports but has nginx answer them: HTTPS and gRPC over TLS (HTTP/2), or plain HTTP
and h2c gRPC. tritonserver itself listens on loopback-only ports behind it. nginx adds what Triton
lacks (docs/security.md):

- a request-body cap derived from the repository's own limits (:func:`body_cap`): a larger body
  gets 413 (gRPC: INVALID_ARGUMENT), and Triton never runs it (docs/security.md: HTTP bodies
  are buffered whole by nginx; gRPC streams, cut at the cap);
- a limit of requests in flight (:data:`MAX_CONNECTIONS`): one more gets 503 (gRPC:
  UNAVAILABLE), which clients retry, never a 500; so does a request while tritonserver cannot be
  reached (nginx's 502);
- timeouts for slow clients, and upstream read timeouts sized for inference.

Every number is a named constant below; :func:`front_limits` says what a configuration needs
(the container's /dev/shm is sized from it). :class:`FrontConfig` renders the nginx
configuration, :class:`NginxFront` runs ``nginx -p PREFIX -c CONF -g 'daemon off;'`` in a
temporary prefix (pid, logs, body buffers) and stops it gracefully.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from deploy.server_log import tail, tee

PathLike = str | os.PathLike[str]

NGINX_PATH = Path("/usr/sbin/nginx")  # Debian's nginx (scripts/setup.sh installs it)

# --------------------------------------------------------------------------- the limits, once
# Requests in flight at once, both ports together (nginx limit_conn: an HTTP/1.1 connection with a
# request, or one HTTP/2 stream). One more is answered 503 (gRPC: UNAVAILABLE), which the client
# retries with backoff. Sized for a CPU server: Triton queues what its instances cannot run yet.
MAX_CONNECTIONS = 64
OVER_LIMIT_STATUS = 503  # retryable: clients back off and retry; never 500
# The inference JSON header of the binary tensor extension (names, shapes, parameters) or the
# gRPC request's protobuf fields: generous for three inputs and a few outputs.
REQUEST_HEADER_BYTES = 64 * 1024
BYTES_LENGTH_PREFIX = 4  # Triton's binary BYTES element: a 4-byte length, then the bytes
# A character of text in a JSON body, worst case: a character outside the BMP is escaped as two
# \uXXXX (12 bytes); UTF-8 in the binary encoding needs at most 4.
JSON_BYTES_PER_CHAR = 12
TEXT_INPUTS = 2  # the tweet text and the caption, each cut to max_text_chars by the server
POSTS_PER_REQUEST = 1  # the project's clients send one post per request (shape [1, 1])
# Timeouts (seconds). Client side: between two reads of the header or body, between two writes
# of the answer (nginx: not the whole transfer). Upstream: the answer of an inference request,
# which waits in Triton's queue under load (the client's own default timeout is 30 s).
CLIENT_HEADER_TIMEOUT_S = 10
CLIENT_BODY_TIMEOUT_S = 30
SEND_TIMEOUT_S = 60
KEEPALIVE_TIMEOUT_S = 65
KEEPALIVE_REQUESTS = 1000
UPSTREAM_CONNECT_TIMEOUT_S = 5
UPSTREAM_READ_TIMEOUT_S = 300
UPSTREAM_KEEPALIVE = 16  # idle connections to Triton kept open, per port
# In-flight requests finish within this after SIGQUIT (graceful stop); inside serve.py's stop
# deadline (deploy/server.py STOP_TIMEOUT, 30 s), the rest of which is tritonserver's.
SHUTDOWN_TIMEOUT_S = 20
WORKER_PROCESSES = 1  # one event loop holds thousands of connections; inference is the bottleneck
WORKER_CONNECTIONS = 4096  # open connections per worker (idle keep-alive ones included)
CLIENT_BODY_BUFFER = 1024 * 1024  # bodies up to this stay in memory, larger ones go to a file
START_TIMEOUT_S = 10.0
# gRPC status codes the front answers itself (grpc/doc/statuscodes.md): a body over the cap can
# never succeed, so INVALID_ARGUMENT (clients retry UNAVAILABLE and RESOURCE_EXHAUSTED, and must
# not resend it); over the limit of requests in flight: UNAVAILABLE, retried with backoff.
GRPC_INVALID_ARGUMENT = 3
GRPC_UNAVAILABLE = 14


class FrontError(RuntimeError):
    """nginx is missing, refuses the configuration, or did not start; the message says why."""


# --------------------------------------------------------------------------- sizing


def post_bytes(max_image_bytes: int, max_text_chars: int) -> int:
    """The most bytes one post can take in a request body: the image (binary, with its 4-byte
    length prefix: Triton's JSON has no base64 for BYTES, so an image can only travel in binary
    form, server/src/http_server.cc) and TEXT_INPUTS texts in their worst JSON escaping. Texts
    longer than max_text_chars are cut by the server, never refused; the front refuses a body
    with more than this much text."""
    image = max_image_bytes + BYTES_LENGTH_PREFIX
    return image + TEXT_INPUTS * JSON_BYTES_PER_CHAR * max_text_chars


def body_cap(
    max_image_bytes: int, max_text_chars: int, posts_per_request: int = POSTS_PER_REQUEST
) -> int:
    """client_max_body_size: REQUEST_HEADER_BYTES + posts_per_request x :func:`post_bytes`."""
    if posts_per_request < 1:
        raise ValueError(f"posts_per_request must be at least 1, not {posts_per_request}")
    return REQUEST_HEADER_BYTES + posts_per_request * post_bytes(max_image_bytes, max_text_chars)


@dataclass(frozen=True)
class FrontLimits:
    """What the front allows: the body cap, the requests in flight, the timeouts (seconds)."""

    max_body_bytes: int
    max_connections: int = MAX_CONNECTIONS
    client_body_timeout_s: int = CLIENT_BODY_TIMEOUT_S
    upstream_read_timeout_s: int = UPSTREAM_READ_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")

    @property
    def max_inflight_bytes(self) -> int:
        """The most request bytes the front can pass to Triton at once (every request in flight
        at the cap): the bound a container's /dev/shm is sized against."""
        return self.max_body_bytes * self.max_connections


def front_limits(
    repo: PathLike,
    *,
    max_body_bytes: int | None = None,
    max_connections: int = MAX_CONNECTIONS,
    posts_per_request: int = POSTS_PER_REQUEST,
) -> FrontLimits:
    """The limits of a front for ``repo``: the body cap from its preprocess.json (max_image_bytes,
    max_text_chars; the largest over the preprocess model's version folders, which a polling
    server may all serve), unless ``max_body_bytes`` overrides it.

    Raises:
        FileNotFoundError: no preprocess.json (not a crisis-triton export: give max_body_bytes).
        deploy.sizing.SizingError: a config or preprocess.json that does not read.
    """
    if max_body_bytes is None:
        from deploy.sizing import read_sizing  # sizing imports this module: import here

        sizing = read_sizing(repo)  # json and the configs only: deploy never imports export
        if sizing.max_image_bytes is None or sizing.max_text_chars is None:
            raise FileNotFoundError(f"no preprocess/<version>/preprocess.json in {repo}")
        max_body_bytes = body_cap(sizing.max_image_bytes, sizing.max_text_chars, posts_per_request)
    return FrontLimits(max_body_bytes=max_body_bytes, max_connections=max_connections)


# --------------------------------------------------------------------------- configuration


def listen_address(address: str, port: int) -> str:
    """nginx's ``listen`` value for a bind address ('' and 0.0.0.0: every IPv4 address)."""
    if address in ("", "0.0.0.0"):
        return f"0.0.0.0:{port}"
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _worker_user() -> str | None:
    """The ``user`` directive's value: as root, workers drop to nobody (nginx's master keeps root
    only to bind ports and read the TLS key); as anyone else nginx cannot switch and ignores it."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    import grp

    try:
        return f"{entry.pw_name} {grp.getgrgid(entry.pw_gid).gr_name}"
    except KeyError:
        return entry.pw_name


@dataclass(frozen=True)
class FrontConfig:
    """One nginx front: public ``address`` ports, Triton's loopback ports behind, the limits and,
    when ``tls_cert``/``tls_key`` are given, TLS on both ports."""

    address: str
    http_port: int
    grpc_port: int
    upstream_http_port: int
    upstream_grpc_port: int
    limits: FrontLimits
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        ports = (self.http_port, self.grpc_port, self.upstream_http_port, self.upstream_grpc_port)
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not a TCP port")
        if len(set(ports)) != len(ports):
            raise ValueError(f"the front's ports and Triton's must all differ: {ports}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def render(self, prefix: Path, *, error_log: str, user: str | None = None) -> str:
        """The nginx.conf text; temporary files, pid and logs live under ``prefix``."""
        lim = self.limits
        ssl = " ssl" if self.tls else ""
        # `::` means every address, IPv4 too (as for tritonserver): nginx's [::] is IPv6-only
        both = " ipv6only=off" if self.address == "::" else ""
        tls_lines = ""
        if self.tls:
            assert self.tls_cert is not None and self.tls_key is not None
            tls_lines = f"""
    ssl_certificate {_quote(self.tls_cert.resolve())};
    ssl_certificate_key {_quote(self.tls_key.resolve())};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_prefer_server_ciphers off;
    ssl_session_cache shared:front_tls:10m;
    ssl_session_timeout 1h;
    ssl_session_tickets off;"""
        upstream = self.upstream_host
        too_large = f"request body over the limit of {lim.max_body_bytes} bytes (front)"
        over_limit = f"over {lim.max_connections} requests in flight (front): retry later"
        unreachable = "tritonserver is not reachable behind the front: retry later"
        return f"""# Generated by deploy/front.py for this run; do not edit (docs/security.md).
{f"user {user};" if user else ""}
worker_processes {WORKER_PROCESSES};
pid {_quote(prefix / "nginx.pid")};
error_log {error_log} warn;
worker_shutdown_timeout {SHUTDOWN_TIMEOUT_S}s;

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
    server_tokens off;
    access_log off;
    default_type application/octet-stream;
    client_body_temp_path {_quote(prefix / "client_body_temp")};
    proxy_temp_path {_quote(prefix / "proxy_temp")};
    fastcgi_temp_path {_quote(prefix / "fastcgi_temp")};
    uwsgi_temp_path {_quote(prefix / "uwsgi_temp")};
    scgi_temp_path {_quote(prefix / "scgi_temp")};

    # The body cap (deploy/front.py body_cap): larger bodies get 413, Triton never sees them.
    client_max_body_size {lim.max_body_bytes};
    client_body_buffer_size {CLIENT_BODY_BUFFER};
    client_header_timeout {CLIENT_HEADER_TIMEOUT_S}s;
    client_body_timeout {lim.client_body_timeout_s}s;
    send_timeout {SEND_TIMEOUT_S}s;
    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;
    keepalive_requests {KEEPALIVE_REQUESTS};

    # Requests in flight, both ports together (one key for all): one more gets a retryable 503.
    map $server_port $front_all {{ default all; }}
    limit_conn_zone $front_all zone=front_requests:1m;
    limit_conn_status {OVER_LIMIT_STATUS};
    limit_conn_log_level warn;
{tls_lines}

    upstream triton_http {{
        server {upstream}:{self.upstream_http_port};
        keepalive {UPSTREAM_KEEPALIVE};
    }}
    upstream triton_grpc {{
        server {upstream}:{self.upstream_grpc_port};
        keepalive {UPSTREAM_KEEPALIVE};
    }}

    server {{
        listen {listen_address(self.address, self.http_port)}{ssl}{both};
        # The front's own refusals in Triton's JSON error shape: clients show the message.
        error_page 413 = @too_large;
        error_page {OVER_LIMIT_STATUS} = @over_limit;
        error_page 502 = @unreachable;
        location @too_large {{
            default_type application/json;
            return 413 '{{"error":"{too_large}"}}';
        }}
        location @over_limit {{
            default_type application/json;
            add_header Retry-After 1 always;
            return {OVER_LIMIT_STATUS} '{{"error":"{over_limit}"}}';
        }}
        location @unreachable {{
            default_type application/json;
            add_header Retry-After 1 always;
            return {OVER_LIMIT_STATUS} '{{"error":"{unreachable}"}}';
        }}
        location / {{
            limit_conn front_requests {lim.max_connections};
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout {UPSTREAM_CONNECT_TIMEOUT_S}s;
            proxy_send_timeout {lim.upstream_read_timeout_s}s;
            proxy_read_timeout {lim.upstream_read_timeout_s}s;
        }}
        # Health probes are not counted as requests in flight: a saturated server still answers
        # them (a kubelet must not restart a busy pod, nor take it out of its Service).
        location /v2/health/ {{
            proxy_pass http://triton_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout {UPSTREAM_CONNECT_TIMEOUT_S}s;
            proxy_read_timeout {UPSTREAM_CONNECT_TIMEOUT_S}s;
        }}
    }}

    server {{
        listen {listen_address(self.address, self.grpc_port)}{ssl} http2{both};
        # gRPC clients read grpc-status, not the HTTP status: answer the front's own refusals
        # as gRPC (a bare 413 would read as UNKNOWN).
        error_page 413 = @grpc_too_large;
        error_page {OVER_LIMIT_STATUS} = @grpc_unavailable;
        error_page 502 = @grpc_unreachable;
        location / {{
            limit_conn front_requests {lim.max_connections};
            grpc_pass grpc://triton_grpc;
            grpc_connect_timeout {UPSTREAM_CONNECT_TIMEOUT_S}s;
            grpc_send_timeout {lim.upstream_read_timeout_s}s;
            grpc_read_timeout {lim.upstream_read_timeout_s}s;
        }}
        location @grpc_too_large {{
            default_type application/grpc;
            add_header grpc-status {GRPC_INVALID_ARGUMENT} always;
            add_header grpc-message "{too_large}" always;
            return 204;
        }}
        location @grpc_unavailable {{
            default_type application/grpc;
            add_header grpc-status {GRPC_UNAVAILABLE} always;
            add_header grpc-message "{over_limit}" always;
            return 204;
        }}
        location @grpc_unreachable {{
            default_type application/grpc;
            add_header grpc-status {GRPC_UNAVAILABLE} always;
            add_header grpc-message "{unreachable}" always;
            return 204;
        }}
    }}
}}
"""


def _quote(path: Path) -> str:
    text = str(path)
    if any(c in text for c in " \";{}\\'$"):
        raise ValueError(f"path {text!r} has a character nginx configuration cannot quote here")
    return text


# --------------------------------------------------------------------------- running nginx


def find_nginx() -> Path:
    """Debian's nginx (NGINX_PATH), else the first ``nginx`` on PATH."""
    if NGINX_PATH.is_file() and os.access(NGINX_PATH, os.X_OK):
        return NGINX_PATH
    found = shutil.which("nginx")
    if found is None:
        raise FrontError(
            f"nginx not found ({NGINX_PATH}, PATH): the TLS front needs it "
            "(Debian: apt-get install nginx; scripts/setup.sh does as root)"
        )
    return Path(found)


def _accepts(address: str, port: int) -> bool:
    host = address if address not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = host.strip("[]")
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class NginxFront:
    """nginx on a :class:`FrontConfig`, as a context manager (like EmbeddedServer).

    Args:
        config: the front.
        nginx: the binary (default :func:`find_nginx`).
        echo_log: nginx's error log to this process's stderr (containers) instead of a file.
    """

    def __init__(
        self, config: FrontConfig, *, nginx: PathLike | None = None, echo_log: bool = False
    ) -> None:
        self.config = config
        self._nginx_arg = Path(nginx) if nginx is not None else None
        self.echo_log = echo_log
        self._proc: subprocess.Popen[bytes] | None = None
        self._prefix: Path | None = None
        self._tee_thread: threading.Thread | None = None
        self.returncode: int | None = None
        self.conf_text = ""

    @property
    def prefix(self) -> Path | None:
        """The run's temporary folder (nginx.conf, pid, error log, body buffers)."""
        return self._prefix

    @property
    def error_log(self) -> Path | None:
        return self._prefix / "error.log" if self._prefix is not None else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def poll(self) -> int | None:
        return self._proc.poll() if self._proc is not None else self.returncode

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.error_log, lines) if self.error_log is not None else ""

    def start(self, timeout: float = START_TIMEOUT_S) -> NginxFront:
        """Check the configuration (nginx -t), start nginx, wait until both ports accept.

        Raises:
            FrontError: nginx missing, a port taken, the configuration or a TLS file refused,
                or not listening within ``timeout``; with nginx's own error lines.
        """
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError(f"nginx already running (pid {self._proc.pid})")
        cfg = self.config
        for path in (cfg.tls_cert, cfg.tls_key):
            if path is not None and not path.is_file():
                raise FrontError(f"TLS file {path} does not exist")
        from deploy.net import port_in_use

        for port in (cfg.http_port, cfg.grpc_port):
            if port_in_use(cfg.address, port):
                raise FrontError(f"port {port} on {cfg.address or '0.0.0.0'} is already in use")
        binary = self._nginx_arg or find_nginx()
        prefix = Path(tempfile.mkdtemp(prefix="crisis-front-"))
        self._prefix = prefix
        user = _worker_user()
        if user is not None:  # workers (nobody) reach their body-buffer folders inside it
            prefix.chmod(0o711)
        conf = prefix / "nginx.conf"
        error_log = "stderr" if self.echo_log else str(prefix / "error.log")
        self.conf_text = cfg.render(prefix, error_log=error_log, user=user)
        conf.write_text(self.conf_text)
        # -e: nginx opens its compiled-in error log (/var/log/nginx) before reading the config:
        # a permission alert on every start as a non-root user; point it into the prefix.
        base = [str(binary), "-p", f"{prefix}/", "-e", str(prefix / "error.log"), "-c", str(conf)]
        try:
            check = subprocess.run(
                [*base, "-t", "-q", "-g", "daemon off;"], capture_output=True, text=True
            )
        except OSError as exc:  # not executable, vanished: no prefix left behind
            self._remove_prefix()
            raise FrontError(f"cannot run nginx ({binary}): {exc}") from exc
        if check.returncode != 0:
            self._remove_prefix()
            raise FrontError(f"nginx refused its configuration: {check.stderr.strip()}")
        log = (prefix / "error.log").open("ab")
        try:
            with log:
                self._proc = subprocess.Popen(
                    [*base, "-g", "daemon off;"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.PIPE if self.echo_log else log,
                    start_new_session=True,
                )
        except OSError as exc:
            self._remove_prefix()
            raise FrontError(f"cannot run nginx ({binary}): {exc}") from exc
        if self.echo_log:
            assert self._proc.stderr is not None
            self._tee_thread = threading.Thread(
                target=tee, args=(self._proc.stderr, prefix / "error.log"), daemon=True
            )
            self._tee_thread.start()
        deadline = time.monotonic() + timeout
        while not (_accepts(cfg.address, cfg.http_port) and _accepts(cfg.address, cfg.grpc_port)):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                returncode = self._proc.poll()
                self.stop(grace=1.0, keep=True)
                why = f"exited with code {returncode}" if returncode is not None else "timed out"
                message = (
                    f"nginx {why} before listening on ports {cfg.http_port} and "
                    f"{cfg.grpc_port}:\n{self.log_tail()}"
                )
                self._remove_prefix()
                raise FrontError(message)
            time.sleep(0.05)
        return self

    def stop(self, grace: float = SHUTDOWN_TIMEOUT_S + 5, *, keep: bool = False) -> int | None:
        """Graceful stop (SIGQUIT: no new connections, in-flight requests finish within
        SHUTDOWN_TIMEOUT_S), SIGKILL after ``grace`` s. Idempotent; removes the prefix unless
        ``keep`` (its error log then stays for the error message)."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGQUIT)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers left by a killed master
            if self._tee_thread is not None:
                self._tee_thread.join(5.0)
            self.returncode = proc.returncode
            self._proc = None
        if not keep:
            self._remove_prefix()
        return self.returncode

    def _remove_prefix(self) -> None:
        if self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def __enter__(self) -> NginxFront:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
