"""Ports and local HTTP for the embedded tritonserver: a free port (tests), whether a port is
taken, the host a client on this machine connects to, and one proxy-free HTTP request (the
launcher's readiness polling)."""

from __future__ import annotations

import ipaddress
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port free on ``address`` right now (for tests; another process may take it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def port_in_use(address: str, port: int) -> bool:
    """True if a server could not bind ``address:port`` now (SO_REUSEADDR, as servers do)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


def client_host(address: str) -> str:
    """Host a client on this machine connects to, for a server bound to ``address``."""
    if address in ("", "0.0.0.0"):
        return "127.0.0.1"
    if address == "::":
        return "[::1]"
    if ":" in address and not address.startswith("["):
        return f"[{address}]"
    return address


def is_loopback(address: str) -> bool:
    """Whether a bind ``address`` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


# No proxies: an http_proxy in the environment must not see (or break) local polling.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_request(
    method: str, url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes] | None:
    """(status, body) of a request, or None when nothing answers."""
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError):
        return None
