"""The nginx front of the embedded tritonserver (``serve.py --front`` / ``--tls-cert``).

nginx answers the public HTTP and gRPC ports (with TLS or without) and adds what Triton lacks: a
request-body cap from the repository's limits, only the public model reachable, the request
checks of ``front_guard.lua``, limits of requests in flight and per client, timeouts for slow
clients; tritonserver listens on loopback behind it. :class:`FrontConfig` renders the nginx
configuration, :class:`NginxFront` runs and stops nginx. What each limit does and why:
docs/security.md.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import re
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

from crisis_triton.serving.processes import stop_group
from crisis_triton.serving.server_log import tail, tee
from crisis_triton.serving.sizing import (
    MAX_CONNECTIONS,
    POSTS_PER_REQUEST,
    REQUEST_HEADER_BYTES,
    body_cap,
    json_body_cap,
    read_sizing,
)

PathLike = str | os.PathLike[str]

NGINX_PATH = Path("/usr/sbin/nginx")  # Debian's nginx (scripts/setup.sh installs it)
# nginx's Lua module and what it needs (Debian: libnginx-mod-http-lua, which brings the NDK
# module, and lua-cjson for LuaJIT's Lua 5.1 ABI); the request checks live in GUARD_LUA.
NGINX_MODULES_DIR = Path("/usr/lib/nginx/modules")
LUA_MODULES = ("ndk_http_module.so", "ngx_http_lua_module.so")
CJSON_GLOB = "/usr/lib/*/lua/5.1/cjson.so"
GUARD_LUA = Path(__file__).with_name("front_guard.lua")
FRONT_PACKAGES = "nginx libnginx-mod-http-lua lua-cjson"  # the Debian packages of the front
PUBLIC_MODEL = "crisis_classifier"  # the one model the front serves (the ensemble)

# --------------------------------------------------------------------------- the limits, once
OVER_LIMIT_STATUS = 503  # retryable: clients back off and retry; never 500
# Requests at once from one client address, counted from the end of their headers (a client that
# drips its bodies holds its own slots only). One more gets 429 (gRPC RESOURCE_EXHAUSTED), which
# clients retry. Behind an ingress or a load balancer that does not keep the client's address,
# every request comes from the proxy: raise it to MAX_CONNECTIONS there (serve.py
# --max-connections-per-client).
MAX_CONNECTIONS_PER_CLIENT = 32
PER_CLIENT_STATUS = 429
# A whole request body must arrive within this (counted from the request's start); a slower one
# is cut (408; gRPC INVALID_ARGUMENT) and never reaches Triton. 5.5 MiB in 60 s is 0.75 Mbit/s.
BODY_DEADLINE_S = 60
# JSON nesting the front accepts (a v2 inference request nests 5 levels). Measured on tritonserver
# 2.51 (docs/security.md): its recursive JSON parser exhausts an 8 MiB stack between 30,000 and
# 35,000 levels (a 64 MiB stack: between 200,000 and 300,000), so 32 leaves a margin of 1,000.
MAX_JSON_DEPTH = 32
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
# deadline (crisis_triton/serving/server.py STOP_TIMEOUT, 30 s), the rest of which is
# tritonserver's.
SHUTDOWN_TIMEOUT_S = 20
WORKER_PROCESSES = 1  # one event loop holds thousands of connections; inference is the bottleneck
WORKER_CONNECTIONS = 4096  # open connections per worker (idle keep-alive ones included)
CLIENT_BODY_BUFFER = 1024 * 1024  # bodies up to this stay in memory, larger ones go to a file
START_TIMEOUT_S = 10.0
# gRPC status codes the front answers itself (grpc/doc/statuscodes.md): a body over the cap can
# never succeed, so INVALID_ARGUMENT (clients retry UNAVAILABLE and RESOURCE_EXHAUSTED, and must
# not resend it); over the limit of requests in flight: UNAVAILABLE, retried with backoff.
GRPC_INVALID_ARGUMENT = 3
GRPC_NOT_FOUND = 5
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_UNAVAILABLE = 14
# Why the front answered a request itself (crisis_front_refused_total{reason}; front_guard.lua
# counts most of them, the nginx-generated ones are counted by their named locations).
REFUSAL_REASONS = (
    "too_large", "compressed", "slow_body", "too_deep", "bad_json", "bad_request", "not_found",
    "stream", "over_limit", "per_client", "unreachable", "bad_transfer_encoding",
)  # fmt: skip
# The counter's name (front_guard.lua writes it; deploy/monitoring/ rules and dashboard read it).
FRONT_REFUSED_METRIC = "crisis_front_refused_total"
# The access log (serve.py --access-log): off, or one JSON object per request on nginx's stdout,
# which is serve.py's (a container's log). Fields: docs/monitoring.md, "Logs". The path, not the
# query string (it may carry secrets); ``refused``: the front's REFUSAL_REASONS, "" when it passed
# the request on ($front_refused, set by front_guard.lua's count()).
ACCESS_LOGS = ("off", "json")
DEFAULT_ACCESS_LOG = "off"
ACCESS_LOG_PATH = "/dev/stdout"
ACCESS_LOG_FORMAT = (
    '{"ts":"$time_iso8601","level":"info","event":"access",'
    '"message":"$request_method $uri $status","client":"$remote_addr",'
    '"method":"$request_method","uri":"$uri","protocol":"$server_protocol",'
    '"port":$server_port,"status":$status,"bytes":$body_bytes_sent,'
    '"request_time":$request_time,"upstream_time":"$upstream_response_time",'
    '"refused":"$front_refused"}'
)


class FrontError(RuntimeError):
    """nginx is missing, refuses the configuration, or did not start; the message says why."""


# --------------------------------------------------------------------------- limits


@dataclass(frozen=True)
class FrontLimits:
    """What the front allows: the body cap, the requests in flight, the timeouts (seconds)."""

    max_body_bytes: int
    max_connections: int = MAX_CONNECTIONS
    client_body_timeout_s: int = CLIENT_BODY_TIMEOUT_S
    upstream_read_timeout_s: int = UPSTREAM_READ_TIMEOUT_S
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    body_deadline_s: int = BODY_DEADLINE_S
    # the largest all-JSON body (None: the body cap's header part, REQUEST_HEADER_BYTES)
    max_json_body_bytes: int | None = None
    max_json_depth: int = MAX_JSON_DEPTH

    def __post_init__(self) -> None:
        if self.max_json_body_bytes is None:
            cap = min(REQUEST_HEADER_BYTES, self.max_body_bytes)
            object.__setattr__(self, "max_json_body_bytes", cap)
        for name in (
            "max_body_bytes", "max_connections", "max_connections_per_client",
            "body_deadline_s", "max_json_body_bytes", "max_json_depth",
        ):  # fmt: skip
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
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT,
    body_deadline_s: int = BODY_DEADLINE_S,
) -> FrontLimits:
    """The limits of a front for ``repo``: the body cap and the all-JSON body cap from its
    preprocess.json (max_image_bytes, max_text_chars; the largest over the preprocess model's
    version folders, which a polling server may all serve), unless ``max_body_bytes`` overrides
    the body cap (the JSON cap then stays REQUEST_HEADER_BYTES where the repository says nothing).

    Raises:
        FileNotFoundError: no preprocess.json (not a crisis-triton export: give max_body_bytes).
        crisis_triton.serving.sizing.SizingError: a config or preprocess.json that does not read.
    """
    json_cap = None
    if max_body_bytes is None or (Path(repo) / "preprocess").is_dir():
        sizing = read_sizing(repo)  # json and the configs only: serving never imports export
        if sizing.max_text_chars is not None:
            json_cap = json_body_cap(sizing.max_text_chars, posts_per_request)
        if max_body_bytes is None:
            if sizing.max_image_bytes is None or sizing.max_text_chars is None:
                raise FileNotFoundError(f"no preprocess/<version>/preprocess.json in {repo}")
            max_body_bytes = body_cap(
                sizing.max_image_bytes, sizing.max_text_chars, posts_per_request
            )
    if json_cap is not None:
        json_cap = min(json_cap, max_body_bytes)
    return FrontLimits(
        max_body_bytes=max_body_bytes,
        max_connections=max_connections,
        max_connections_per_client=max_connections_per_client,
        body_deadline_s=body_deadline_s,
        max_json_body_bytes=json_cap,
    )


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


MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
HEALING_FLAG = "healing"  # a file in the front's prefix while serve.py heals tritonserver


@dataclass(frozen=True)
class FrontConfig:
    """One nginx front: public ``address`` ports, Triton's loopback ports behind, the limits and,
    when ``tls_cert``/``tls_key`` are given, TLS on both ports. ``public_model`` is the one model
    reachable through it; ``status_port`` (loopback) serves the front's counters
    (``/front/metrics``) when given."""

    address: str
    http_port: int
    grpc_port: int
    upstream_http_port: int
    upstream_grpc_port: int
    limits: FrontLimits
    tls_cert: Path | None = None
    tls_key: Path | None = None
    upstream_host: str = "127.0.0.1"
    public_model: str = PUBLIC_MODEL
    status_port: int | None = None
    access_log: bool = False  # one JSON line per request on stdout (ACCESS_LOG_FORMAT)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key (--tls-cert, --tls-key)")
        ports = (self.http_port, self.grpc_port, self.upstream_http_port, self.upstream_grpc_port)
        ports += (self.status_port,) if self.status_port is not None else ()
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is not a TCP port")
        if len(set(ports)) != len(ports):
            raise ValueError(f"the front's ports and Triton's must all differ: {ports}")
        if not MODEL_NAME.fullmatch(self.public_model):
            raise ValueError(f"model name {self.public_model!r}: letters, digits, _ . - only")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def guard_settings(self) -> dict[str, object]:
        """What front_guard.lua's configure() receives (as JSON)."""
        lim = self.limits
        return {
            "public_model": self.public_model,
            "max_in_flight": lim.max_connections,
            "body_deadline_s": lim.body_deadline_s,
            "max_json_body_bytes": lim.max_json_body_bytes,
            "max_json_header_bytes": min(REQUEST_HEADER_BYTES, lim.max_body_bytes),
            "max_json_depth": lim.max_json_depth,
            "reasons": list(REFUSAL_REASONS),
        }

    def render(
        self,
        prefix: Path,
        *,
        error_log: str,
        user: str | None = None,
        modules: LuaModules | None = None,
    ) -> str:
        """The nginx.conf text; temporary files, pid and logs live under ``prefix``; ``modules``
        (default: :func:`find_lua_modules`) are the Lua module files to load."""
        lim = self.limits
        mods = modules if modules is not None else find_lua_modules()
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
        model = re.escape(self.public_model)
        healing = _quote(prefix / HEALING_FLAG)
        settings = json.dumps(self.guard_settings())
        too_large = f"request body over the limit of {lim.max_body_bytes} bytes (front)"
        per_client = (
            f"over {lim.max_connections_per_client} requests at once from this address (front): "
            "retry later"
        )
        unreachable = "tritonserver is not reachable behind the front: retry later"
        not_found = f"not found: this endpoint serves only the model {self.public_model} (front)"
        bad_te = "unsupported Transfer-Encoding (front)"
        healing_text = "tritonserver is restarting (serve.py heals it): not ready (front)"
        status_server = ""
        if self.status_port is not None:
            status_server = f"""
    # The front's counters, on loopback only (serve.py adds them to its /metrics).
    server {{
        listen 127.0.0.1:{self.status_port};
        access_log off;  # serve.py's own scrape of every /metrics request
        location = /front/metrics {{
            content_by_lua_block {{ require("front_guard").status() }}
        }}
        location / {{
            return 404;
        }}
    }}
"""

        def proxy(read_timeout: str, uri: str = "") -> str:
            return f"""proxy_pass http://triton_http{uri};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout {UPSTREAM_CONNECT_TIMEOUT_S}s;
            proxy_send_timeout {read_timeout};
            proxy_read_timeout {read_timeout};"""

        infer_timeout = f"{lim.upstream_read_timeout_s}s"
        # what the location matched (nginx's decoded, normalised URI), not the raw request line:
        # Triton sees the very path the front checked
        matched = "$uri$is_args$args"
        short_timeout = f"{UPSTREAM_CONNECT_TIMEOUT_S}s"
        access_log = "access_log off;"
        if self.access_log:
            access_log = (f"log_format crisis_access escape=json '{ACCESS_LOG_FORMAT}';\n"
                          f"    access_log {ACCESS_LOG_PATH} crisis_access;")  # fmt: skip
        return f"""# Generated by serving/front.py for this run; do not edit (docs/security.md).
load_module {_quote(mods.ndk)};
load_module {_quote(mods.lua)};
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
    {access_log}
    default_type application/octet-stream;
    client_body_temp_path {_quote(prefix / "client_body_temp")};
    proxy_temp_path {_quote(prefix / "proxy_temp")};
    fastcgi_temp_path {_quote(prefix / "fastcgi_temp")};
    uwsgi_temp_path {_quote(prefix / "uwsgi_temp")};
    scgi_temp_path {_quote(prefix / "scgi_temp")};

    # The request checks (crisis_triton/serving/front_guard.lua) and their state: requests in
    # flight, refusals.
    lua_package_path "{_quote(mods.guard_dir)}/?.lua;;";
    lua_package_cpath "{_quote(mods.cjson_dir)}/?.so;;";
    lua_shared_dict front_state 1m;
    init_by_lua_block {{
        require("front_guard").configure([==[{settings}]==])
    }}
    # A request that took a slot of the in-flight limit gives it back when it ends, however it
    # ends (error pages included: $front_slot survives nginx's internal redirects).
    log_by_lua_block {{ require("front_guard").done() }}

    # The body cap (crisis_triton/serving/front.py body_cap): larger bodies get 413, Triton never
    # sees them.
    client_max_body_size {lim.max_body_bytes};
    client_body_buffer_size {CLIENT_BODY_BUFFER};
    client_body_in_single_buffer on;
    client_header_timeout {CLIENT_HEADER_TIMEOUT_S}s;
    client_body_timeout {lim.client_body_timeout_s}s;
    send_timeout {SEND_TIMEOUT_S}s;
    keepalive_timeout {KEEPALIVE_TIMEOUT_S}s;
    keepalive_requests {KEEPALIVE_REQUESTS};

    # Requests at once per client address, counted from their headers (the in-flight limit,
    # counted once a body is in, is front_guard.lua's).
    limit_conn_zone $binary_remote_addr zone=per_client:10m;
    limit_conn_status {PER_CLIENT_STATUS};
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
        set $front_slot "";
        set $front_refused "";  # the refusal's reason, for the access log (front_guard.lua)
        # The front's own refusals in Triton's JSON error shape: clients show the message.
        error_page 413 = @too_large;
        error_page {PER_CLIENT_STATUS} = @per_client;
        error_page 502 = @unreachable;
        error_page 501 = @bad_transfer_encoding;
        location @too_large {{
            default_type application/json;
            log_by_lua_block {{ require("front_guard").log_status("too_large") }}
            return 413 '{{"error":"{too_large}"}}';
        }}
        location @per_client {{
            default_type application/json;
            add_header Retry-After 1 always;
            log_by_lua_block {{ require("front_guard").log_status("per_client") }}
            return {PER_CLIENT_STATUS} '{{"error":"{per_client}"}}';
        }}
        location @unreachable {{
            default_type application/json;
            add_header Retry-After 1 always;
            log_by_lua_block {{ require("front_guard").log_status("unreachable") }}
            return {OVER_LIMIT_STATUS} '{{"error":"{unreachable}"}}';
        }}
        location @bad_transfer_encoding {{
            default_type application/json;
            log_by_lua_block {{ require("front_guard").log_status("bad_transfer_encoding") }}
            return 400 '{{"error":"{bad_te}"}}';
        }}
        # Health probes are not counted as requests in flight: a saturated server still answers
        # them (a kubelet must not restart a busy pod, nor take it out of its Service). While
        # serve.py heals tritonserver (the flag file), ready is 503 and live stays 200.
        location = /v2/health/ready {{
            if (-f {healing}) {{
                return 503 '{{"error":"{healing_text}"}}';
            }}
            {proxy(short_timeout)}
        }}
        location = /v2/health/live {{
            if (-f {healing}) {{
                return 200;
            }}
            {proxy(short_timeout)}
        }}
        location = /v2 {{
            limit_conn per_client {lim.max_connections_per_client};
            limit_except GET {{ deny all; }}
            {proxy(short_timeout)}
        }}
        # The public model's inference: front_guard.lua checks the request before Triton sees it.
        location ~ ^/v2/models/{model}(/versions/[0-9]+)?/infer$ {{
            limit_conn per_client {lim.max_connections_per_client};
            limit_except POST {{ deny all; }}
            access_by_lua_block {{ require("front_guard").http_infer() }}
            {proxy(infer_timeout, matched)}
        }}
        location ~ ^/v2/models/{model}(/versions/[0-9]+)?/ready$ {{
            if (-f {healing}) {{
                return 503 '{{"error":"{healing_text}"}}';
            }}
            limit_except GET {{ deny all; }}
            {proxy(short_timeout, matched)}
        }}
        location ~ ^/v2/models/{model}(/versions/[0-9]+)?(/config|/stats)?$ {{
            limit_conn per_client {lim.max_connections_per_client};
            limit_except GET {{ deny all; }}
            {proxy(short_timeout, matched)}
        }}
        # Triton's restricted APIs: Triton answers only with the admin key
        # (crisis_triton/serving/server.py).
        location ~ ^/v2/(repository|systemsharedmemory|cudasharedmemory|logging|trace)(/|$) {{
            limit_conn per_client {lim.max_connections_per_client};
            access_by_lua_block {{ require("front_guard").http_other() }}
            {proxy(short_timeout)}
        }}
        location ~ ^/v2/models/{model}(/versions/[0-9]+)?/trace/setting$ {{
            limit_conn per_client {lim.max_connections_per_client};
            access_by_lua_block {{ require("front_guard").http_other() }}
            {proxy(short_timeout)}
        }}
        # Everything else, the composing models among it: not here (loopback serves them).
        location / {{
            default_type application/json;
            log_by_lua_block {{ require("front_guard").log_status("not_found") }}
            return 404 '{{"error":"{not_found}"}}';
        }}
    }}

    server {{
        listen {listen_address(self.address, self.grpc_port)}{ssl} http2{both};
        set $front_slot "";
        set $front_refused "";  # the refusal's reason, for the access log (front_guard.lua)
        # gRPC clients read grpc-status, not the HTTP status: answer the front's own refusals
        # as gRPC (a bare 413 would read as UNKNOWN).
        error_page 413 = @grpc_too_large;
        error_page {PER_CLIENT_STATUS} = @grpc_per_client;
        error_page 502 = @grpc_unreachable;
        location / {{
            limit_conn per_client {lim.max_connections_per_client};
            access_by_lua_block {{ require("front_guard").grpc() }}
            grpc_pass grpc://triton_grpc;
            grpc_connect_timeout {UPSTREAM_CONNECT_TIMEOUT_S}s;
            grpc_send_timeout {lim.upstream_read_timeout_s}s;
            grpc_read_timeout {lim.upstream_read_timeout_s}s;
        }}
        location @grpc_too_large {{
            default_type application/grpc;
            add_header grpc-status {GRPC_INVALID_ARGUMENT} always;
            add_header grpc-message "{too_large}" always;
            log_by_lua_block {{ require("front_guard").log_status("too_large") }}
            return 204;
        }}
        location @grpc_per_client {{
            default_type application/grpc;
            add_header grpc-status {GRPC_RESOURCE_EXHAUSTED} always;
            add_header grpc-message "{per_client}" always;
            log_by_lua_block {{ require("front_guard").log_status("per_client") }}
            return 204;
        }}
        location @grpc_unreachable {{
            default_type application/grpc;
            add_header grpc-status {GRPC_UNAVAILABLE} always;
            add_header grpc-message "{unreachable}" always;
            log_by_lua_block {{ require("front_guard").log_status("unreachable") }}
            return 204;
        }}
    }}
{status_server}}}
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


@dataclass(frozen=True)
class LuaModules:
    """The files the front's Lua checks need: nginx's NDK and Lua modules, the folder of
    cjson.so (LuaJIT, Lua 5.1 ABI) and the folder of front_guard.lua."""

    ndk: Path
    lua: Path
    cjson_dir: Path
    guard_dir: Path


def find_lua_modules(modules_dir: Path = NGINX_MODULES_DIR) -> LuaModules:
    """Debian's libnginx-mod-http-lua and lua-cjson, or FrontError naming the packages."""
    missing = [name for name in LUA_MODULES if not (modules_dir / name).is_file()]
    cjson = sorted(glob.glob(CJSON_GLOB))
    if missing or not cjson:
        what = ", ".join(missing + ([] if cjson else ["cjson.so (Lua 5.1)"]))
        raise FrontError(
            f"the front's request checks need nginx's Lua module and lua-cjson ({what} not "
            f"found; Debian: apt-get install {FRONT_PACKAGES}; scripts/setup.sh does as root)"
        )
    return LuaModules(
        ndk=modules_dir / LUA_MODULES[0],
        lua=modules_dir / LUA_MODULES[1],
        cjson_dir=Path(cjson[0]).parent,
        guard_dir=GUARD_LUA.parent,
    )


def front_missing() -> str | None:
    """Why the front cannot run on this machine (nginx, its Lua module or lua-cjson missing),
    or None when it can."""
    try:
        find_nginx()
        find_lua_modules()
    except FrontError as exc:
        return str(exc)
    return None


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

    def set_healing(self, on: bool) -> None:
        """While ``on``, the front answers readiness (server and public model) with 503 and
        liveness with 200 itself: serve.py is restarting tritonserver, which a probe must see
        as "not ready" but not as "dead" (crisis_triton/serving/supervisor.py). A flag file in the
        prefix,
        which nginx checks on every probe."""
        if self._prefix is None:
            return
        flag = self._prefix / HEALING_FLAG
        if on:
            flag.touch()
            flag.chmod(0o644)
        else:
            flag.unlink(missing_ok=True)

    def status_text(self, timeout: float = 2.0) -> str | None:
        """The front's counters in Prometheus' text format (its loopback status page), or None
        when the front has no status port or does not answer."""
        port = self.config.status_port
        if port is None:
            return None
        from crisis_triton.serving.net import http_request

        answer = http_request("GET", f"http://127.0.0.1:{port}/front/metrics", timeout=timeout)
        if answer is None or answer[0] != 200:
            return None
        return answer[1].decode("utf-8", "replace")

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
        from crisis_triton.serving.net import port_in_use

        for port in (cfg.http_port, cfg.grpc_port):
            if port_in_use(cfg.address, port):
                raise FrontError(f"port {port} on {cfg.address or '0.0.0.0'} is already in use")
        binary = self._nginx_arg or find_nginx()
        modules = find_lua_modules()
        prefix = Path(tempfile.mkdtemp(prefix="crisis-front-"))
        self._prefix = prefix
        user = _worker_user()
        if user is not None:  # workers (nobody) reach their body-buffer folders inside it
            prefix.chmod(0o711)
        conf = prefix / "nginx.conf"
        error_log = "stderr" if self.echo_log else str(prefix / "error.log")
        self.conf_text = cfg.render(prefix, error_log=error_log, user=user, modules=modules)
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
                    stdout=None if cfg.access_log else log,  # ACCESS_LOG_PATH: ours
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
            stop_group(proc, signal.SIGQUIT, grace)  # and the workers left by a killed master
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
