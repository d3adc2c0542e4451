"""Where Triton is and how to talk to it: the URL (`parse_url` -> `Endpoint`: protocol, address,
TLS), the TLS files (`check_tls_files`), the headers sent with every request (`parse_header`,
`check_header`, `shown_headers` for logs, secrets masked). No network: checks only."""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from crisis_triton.client.errors import CertificateError

Protocol = Literal["http", "grpc"]
PROTOCOLS: tuple[str, ...] = ("http", "grpc")
DEFAULT_URLS: dict[str, str] = {"http": "localhost:8000", "grpc": "localhost:8001"}
DEFAULT_TIMEOUT_S = 30.0
# URL schemes -> (protocol, TLS); a bare host:port takes the protocol argument (default http).
SCHEMES: dict[str, tuple[str, bool]] = {
    "http": ("http", False),
    "https": ("http", True),
    "grpc": ("grpc", False),
    "grpcs": ("grpc", True),
}
# Header names whose values -v/--verbose shows masked.
SECRET_HEADER = re.compile(r"key|token|secret|auth|passw|cookie|session|credential|signature", re.I)
# Headers that frame each request (tritonclient sets them per call): -H may not replace them.
FRAMING_HEADERS: frozenset[str] = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
     "trailer", "inference-header-content-length"}
)  # fmt: skip
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token (RFC 9110)


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
