"""serve.py's public metrics port: Triton's /metrics, then serve.py's own series.

Triton's metrics port closes when tritonserver dies, but the supervisor's counters must outlive
it: serve.py answers ``--address:--metrics-port`` itself and fetches Triton's text from a
loopback port (its own series only while tritonserver is down). docs/monitoring.md.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import threading
from collections.abc import Callable

from crisis_triton.serving.net import http_request

METRICS_PATH = "/metrics"
# Seconds a scrape waits for Triton's text, well within Prometheus' default scrape timeout (10 s):
# a Triton that does not answer by then is left out of that scrape (serve.py's series answer).
UPSTREAM_TIMEOUT_S = 3.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text format


class MetricsEndpoint:
    """``GET /metrics`` on ``address:port``: ``upstream_url``'s text, then ``own_series()``.

    Args:
        address: bind address ('' and 0.0.0.0: every IPv4 address; '::' every address, IPv4
            too, as for tritonserver and the front).
        port: the public metrics port.
        upstream_url: Triton's metrics URL (loopback).
        own_series: serve.py's series in Prometheus' text format.

    :meth:`bind` takes the port (OSError when it is in use: serve.py says so before starting
    anything); :meth:`start` answers on it, from a daemon thread; :meth:`stop` closes it.
    """

    def __init__(
        self, address: str, port: int, upstream_url: str, own_series: Callable[[], str]
    ) -> None:
        self.address = address
        self.port = port
        self.upstream_url = upstream_url
        self.own_series = own_series
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def body(self) -> bytes:
        """What ``GET /metrics`` answers: Triton's series (when it answers), then ours."""
        answer = http_request("GET", self.upstream_url, timeout=UPSTREAM_TIMEOUT_S)
        triton = answer[1] if answer is not None and answer[0] == 200 else b""
        if triton and not triton.endswith(b"\n"):
            triton += b"\n"
        return triton + self.own_series().encode()

    def bind(self) -> MetricsEndpoint:
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 (BaseHTTPRequestHandler's naming)
                if self.path.split("?", 1)[0] == METRICS_PATH:
                    self._answer(200, endpoint.body(), CONTENT_TYPE)
                else:
                    self._not_found()

            def _not_found(self) -> None:
                self._answer(404, b"not found\n", "text/plain; charset=utf-8")

            do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_found  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # no line per scrape on serve.py's stderr

        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET

        class Server(http.server.ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

            def server_bind(self) -> None:
                if family == socket.AF_INET6:  # '::' serves IPv4 too, as for tritonserver
                    with contextlib.suppress(OSError):
                        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                # TCPServer's bind: HTTPServer's would look the host's name up (getfqdn), which
                # can wait seconds on DNS in a container with no resolver.
                socketserver.TCPServer.server_bind(self)
                self.server_name = str(self.server_address[0])
                self.server_port = int(self.server_address[1])

        host = self.address.strip("[]") or "0.0.0.0"
        self._httpd = Server((host, self.port), Handler, bind_and_activate=False)
        try:
            self._httpd.server_bind()
        except OSError:
            self._httpd.server_close()
            self._httpd = None
            raise
        self.port = int(self._httpd.server_address[1])  # the port taken, where 0 was asked
        return self

    def start(self) -> MetricsEndpoint:
        """Listen and answer (binds first if :meth:`bind` was not called)."""
        if self._httpd is None:
            self.bind()
        assert self._httpd is not None
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the port (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        if self._thread is not None:
            httpd.shutdown()
            self._thread.join(5.0)
            self._thread = None
        httpd.server_close()
