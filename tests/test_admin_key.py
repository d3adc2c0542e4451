"""The admin key of the restricted APIs reaches serve.py from a file, never from a log.

A non-loopback --address without a key file exits 2 and says how to give one; the generate option
writes a 0600 file whose content never appears on stdout or stderr, and that key (and only it)
opens the repository API through the front of a real serve.py, whose /metrics also counts the
front's refusal of an oversize body (crisis_front_refused_total{reason="too_large"}).
"""

from __future__ import annotations

import http.client
import re
import stat
from pathlib import Path

import pytest

from crisis_triton.serving.front import FRONT_REFUSED_METRIC, front_limits
from crisis_triton.serving.server import ADMIN_KEY_HEADER, check_admin_key
from tests.serving import run_serve_py, serve_py
from tests.test_front import needs_front


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.0.2.1"])
def test_a_public_address_needs_a_key_file(tmp_path: Path, address: str) -> None:
    done = run_serve_py("--model-repository", str(tmp_path), "--address", address, "--front")
    assert done.returncode == 2, done.stderr
    assert "--admin-key-file FILE" in done.stderr and "--generate-admin-key-file" in done.stderr


def test_a_key_on_the_command_line_still_works_but_warns(tmp_path: Path) -> None:
    """Compatibility: --admin-key passes the public-address check, with a warning about ps."""
    done = run_serve_py("--model-repository", str(tmp_path / "missing"), "--address", "0.0.0.0",
                        "--front", "--admin-key", "k" * 16)  # fmt: skip
    assert "--admin-key shows the key" in done.stderr and "--admin-key-file" in done.stderr
    assert "serves others" not in done.stderr  # it got past the key check (then the repository)


def _post(port: int, path: str, body: bytes = b"", **headers: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


@needs_front
def test_generated_key_file_is_private_and_never_printed(
    small_batch_repo: Path, tmp_path: Path
) -> None:
    key_path = tmp_path / "admin-key"
    key_path.write_text("an older key, with a looser mode\n")
    key_path.chmod(0o644)
    with serve_py(small_batch_repo, "--address", "0.0.0.0", "--front",
                  "--generate-admin-key-file", str(key_path)) as running:  # fmt: skip
        mode = stat.S_IMODE(key_path.stat().st_mode)
        key = check_admin_key(key_path.read_text().strip())
        denied, _ = _post(running.http_port, "/v2/repository/index")
        allowed, index = _post(running.http_port, "/v2/repository/index", **{ADMIN_KEY_HEADER: key})
        cap = front_limits(small_batch_repo).max_body_bytes
        too_large, _ = _post(
            running.http_port, "/v2/models/crisis_classifier/infer", b"\0" * (cap + 1),
            **{"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": "2"},
        )  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", running.metrics_port, timeout=10)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
    assert mode == 0o600
    assert str(key_path) in running.err  # the path is printed ...
    assert key not in running.err and key not in running.out  # ... the key never
    assert key not in running.ready_line
    assert (denied, allowed) == (403, 200), index
    assert too_large == 413
    assert re.search(rf'^{FRONT_REFUSED_METRIC}\{{reason="too_large"\}} [1-9]', metrics, re.M), (
        metrics
    )
