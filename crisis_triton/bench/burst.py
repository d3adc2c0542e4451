"""A burst of large posts beside small ones (issue 18): no 500, every post answered in the end.

`run_burst` sends them from many clients to a served URL and counts every answer; `serve_and_burst`
first starts serve.py --front on a repository. Options, pass criteria and how to see the front's
/dev/shm limit at work: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_LARGE_BYTES = 5 * 1024 * 1024
SMALL_BYTES = 60_000
PNG_WIDTH = 1024
TEXT = "Flood waters rising in #Houston, families on rooftops"


def photo(target_bytes: int, seed: int = 0) -> bytes:
    """A valid PNG of random RGB pixels of at most ``target_bytes``, within one row of it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    row = 3 * PNG_WIDTH + 1  # a filter byte per row; stored (compress_level 0) deflate blocks
    height = max(1, (target_bytes - 1024) // row)
    while True:
        pixels = rng.integers(0, 256, (height, PNG_WIDTH, 3), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "PNG", compress_level=0)
        data = out.getvalue()
        if len(data) <= target_bytes:
            return data
        height -= max(1, -(-(len(data) - target_bytes) // row))
        if height < 1:
            raise ValueError(f"no PNG of {PNG_WIDTH} px rows fits in {target_bytes} bytes")


@dataclass
class BurstResult:
    """What the burst saw: every answer by kind ('200', 'overload 503', 'server 500', ...), the
    outcome of every post, and the time it took."""

    answers: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)  # --serve: /dev/shm, readiness after
    seconds: float = 0.0
    large_bytes: int = 0
    posts: int = 0

    @property
    def passed(self) -> bool:
        bad = [k for k in self.answers if k != "200" and not k.startswith("overload")]
        server_ok = self.server.get("ready_after", True) and not self.server.get("shm_full", False)
        answered = sum(self.outcomes.values()) == self.posts
        return not bad and not self.errors and answered and bool(server_ok)

    @property
    def retried(self) -> int:
        return sum(n for k, n in self.answers.items() if k.startswith("overload"))

    def as_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "posts": self.posts,
            "large_bytes": self.large_bytes,
            "seconds": self.seconds,
            "answers": dict(self.answers),
            "retried": self.retried,
            "outcomes": dict(self.outcomes),
            "errors": self.errors,
            "server": self.server,
        }


def _counting_client(result: BurstResult, lock: threading.Lock, **kwargs: Any) -> Any:
    """CrisisClient that counts every answer it classifies (overload ones it then retries)."""
    from crisis_triton.client.triton_client import CrisisClient, _status_of

    class Counting(CrisisClient):
        def _classify_exception(self, exc: BaseException) -> tuple[str, str]:
            kind, detail = super()._classify_exception(exc)
            with lock:
                result.answers[f"{kind} {_status_of(exc) or ''}".strip()] += 1
            return kind, detail

    return Counting(**kwargs)


def run_burst(
    url: str,
    *,
    clients: int = 32,
    large_each: int = 2,
    small_each: int = 2,
    large_bytes: int = DEFAULT_LARGE_BYTES,
    timeout: float = 300.0,
    retries: int = 60,
    protocol: str = "http",
) -> BurstResult:
    """Send the burst to ``url`` (host:port of ``protocol``, http or grpc) and count what came
    back."""
    from crisis_triton.client.triton_client import ClientError

    result = BurstResult(large_bytes=large_bytes, posts=clients * (large_each + small_each))
    large = [photo(large_bytes, seed) for seed in range(4)]
    small = photo(SMALL_BYTES, 99)
    lock = threading.Lock()
    client = _counting_client(
        result, lock, url=url, protocol=protocol, timeout=timeout, retries=retries
    )

    def one(kind: str, image: bytes) -> None:
        try:
            client.classify(image, TEXT)
        except ClientError as exc:
            with lock:
                result.errors.append(f"{kind}: {exc}")
            return
        with lock:
            result.answers["200"] += 1
            result.outcomes[f"{kind} answered"] += 1

    def worker(index: int) -> None:
        for k in range(max(large_each, small_each)):
            if k < large_each:
                one("large", large[(index + k) % len(large)])
            if k < small_each:
                one("small", small)

    client.model_info()  # metadata once, before the burst
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = round(time.monotonic() - start, 1)
    client.close()
    return result


def shm_state(shm_dir: Path = Path("/dev/shm")) -> dict[str, Any]:
    """How full /dev/shm is: 'full' when under 1 MiB is left (a pool could not grow)."""
    usage = shutil.disk_usage(shm_dir)
    return {
        "shm_total_mib": usage.total >> 20,
        "shm_used_mib": usage.used >> 20,
        "shm_full": usage.free < 1024 * 1024,
    }


def serve_and_burst(repo: Path, serve_flags: Sequence[str], **burst: Any) -> BurstResult:
    """serve.py --front on ``repo`` (free ports), the burst, then /dev/shm and readiness."""
    from crisis_triton.serving.net import free_port, http_request
    from crisis_triton.serving.server import READY_PATH

    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [
        sys.executable,
        "-m",
        "crisis_triton.serving.serve",
        "--model-repository",
        str(repo),
        "--front",
    ]
    command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    command += list(serve_flags)
    ready_url = f"http://127.0.0.1:{http}{READY_PATH}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while (answer := http_request("GET", ready_url)) is None or answer[0] != 200:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"serve.py did not get ready:\n{log.read()[-3000:]!r}")
                time.sleep(0.5)
            port = grpc if burst.get("protocol") == "grpc" else http
            result = run_burst(f"127.0.0.1:{port}", **burst)
            result.server = shm_state()
            answer = http_request("GET", ready_url)
            result.server["ready_after"] = answer is not None and answer[0] == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        result.server["serve_warnings"] = [
            line for line in log.read().decode(errors="replace").splitlines() if "warning:" in line
        ]
        result.server["serve_exit"] = proc.returncode
    return result


@dataclass(frozen=True)
class BurstPlan:
    """Every option of `benchmarks/burst.py`, typed: where to burst (`url`, or `serve` a
    repository first, with `serve_flags`) and the burst's shape. `large_bytes` None: the served
    max_image_bytes - 1024 (`preprocess_json`, else the served repository's, else the default);
    `json_out`: also write the result there."""

    url: str | None = None
    serve: Path | None = None
    serve_flags: tuple[str, ...] = ()
    protocol: str = "http"
    clients: int = 32
    large_each: int = 2
    small_each: int = 2
    large_bytes: int | None = None
    preprocess_json: Path | None = None
    json_out: Path | None = None

    def photo_bytes(self) -> int:
        """The size of the large photos."""
        limits = self.preprocess_json
        if self.serve and limits is None:
            limits = next(iter(sorted(self.serve.glob("*/[0-9]*/preprocess.json"))), None)
        limit = DEFAULT_LARGE_BYTES
        if limits:
            limit = int(json.loads(limits.read_text())["max_image_bytes"])
        return self.large_bytes or limit - 1024


def run_burst_plan(plan: BurstPlan) -> BurstResult:
    """The plan's burst, on `url` or on serve.py --front over `serve`; the result also written to
    `plan.json_out` when given."""
    if (plan.url is None) == (plan.serve is None):
        raise ValueError("a burst goes to one of url or serve")
    shape = {"clients": plan.clients, "large_each": plan.large_each}
    shape |= {"small_each": plan.small_each, "large_bytes": plan.photo_bytes()}
    if plan.serve:
        result = serve_and_burst(plan.serve, plan.serve_flags, **shape, protocol=plan.protocol)
    else:
        assert plan.url is not None
        result = run_burst(plan.url, **shape, protocol=plan.protocol)
    if plan.json_out:
        plan.json_out.write_text(json.dumps(result.as_json(), indent=2) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="host:port of the HTTP (or --protocol grpc: gRPC) endpoint")
    where.add_argument("--serve", type=Path, metavar="REPO", help="serve.py --front on REPO")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--large-each", type=int, default=2)
    parser.add_argument("--small-each", type=int, default=2)
    parser.add_argument("--large-bytes", type=int, default=None,
                        help="photo size (default: max_image_bytes - 1024 of --preprocess-json, "
                        f"else {DEFAULT_LARGE_BYTES - 1024})")  # fmt: skip
    parser.add_argument("--preprocess-json", type=Path, help="the served preprocess.json")
    parser.add_argument("--json", type=Path, help="also write the result here")
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    plan = BurstPlan(
        url=args.url,
        serve=args.serve,
        serve_flags=tuple(serve_flags),
        protocol=args.protocol,
        clients=args.clients,
        large_each=args.large_each,
        small_each=args.small_each,
        large_bytes=args.large_bytes,
        preprocess_json=args.preprocess_json,
        json_out=args.json,
    )
    result = run_burst_plan(plan)
    print(json.dumps(result.as_json(), indent=2))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
