"""A throwaway certificate authority, a server certificate and a client certificate it signed,
for the TLS tests.

Made with the openssl command-line tool (EC P-256 keys, valid one day): ``ca.crt`` is what a
client trusts (``--root-certs``), ``server.crt`` / ``server.key`` what the front serves, for
``localhost`` and 127.0.0.1, ``client.crt`` / ``client.key`` a client's (mutual TLS).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES = ("DNS:localhost", "IP:127.0.0.1")


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def openssl_missing() -> str | None:
    """Why certificates cannot be made here (a skip reason), or None."""
    return None if shutil.which("openssl") else "the openssl command-line tool is not installed"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args[:2])} failed: {done.stderr.strip()}")


def make_certificates(folder: Path, names: tuple[str, ...] = SERVER_NAMES) -> Certificates:
    """A CA and a server certificate for ``names`` (subjectAltName entries), in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=crisis-triton test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)  # fmt: skip
    usage = "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
    for name, subject, ext in (
        ("server", "/CN=localhost", f"subjectAltName={','.join(names)}\n{usage}"
                                    "extendedKeyUsage=serverAuth\n"),
        ("client", "/CN=crisis-triton test client", f"{usage}extendedKeyUsage=clientAuth\n"),
    ):  # fmt: skip
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=folder)  # fmt: skip
        (folder / f"{name}.ext").write_text(ext)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "1",
                 "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip
    return Certificates(
        *(folder / f for f in ("ca.crt", "ca.key", "server.crt", "server.key")),
        folder / "client.crt",
        folder / "client.key",
    )
