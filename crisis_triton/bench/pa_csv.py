"""perf_analyzer's CSV (`perf_analyzer -f FILE`) from the benchmark's Triton rows (`--pa-csv`).

The same columns, units and order as perf_analyzer's `ReportWriter::GenerateReport`
(triton-inference-server/perf_analyzer, src/report_writer.cc): one line per concurrency (closed
loop) or offered request rate (open loop), times in integer microseconds, lines sorted by
increasing Inferences/Second. How each column is derived:

- Server Queue / Compute Input / Compute Infer / Compute Output: Triton's statistics extension,
  the delta over the measured requests (loadgen.stats_delta), per-request averages summed over the
  ensemble's composing models, as perf_analyzer's `GetTotalEnsembleDurations` does for an ensemble;
- Client Send: the time tritonclient takes to build one request's body from the pre-made inputs
  (HTTP: `generate_request_body`, the JSON header and the binary tensors; gRPC: the
  `ModelInferRequest` serialised), measured in process on the same posts (`client_send_us`);
- Client Recv: 0: the responses (a few hundred bytes of scores) are not timed apart, their
  decoding stays in Network+Server Send/Recv;
- Network+Server Send/Recv: mean client latency - send - recv - server queue - server compute,
  at least 0 (perf_analyzer's formula);
- p50..p99 latency: the client's percentiles.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crisis_triton.bench.report import STEP_FIELDS, TRITON_PATHS, Row, label
from crisis_triton.bench.workload import Post
from crisis_triton.client.tensors import bytes_input
from crisis_triton.contract.spec import ENSEMBLE, IMAGE_INPUT, TEXT_INPUT

CONCURRENCY = "Concurrency"
REQUEST_RATE = "Request Rate"
# perf_analyzer's columns after the first (Concurrency or Request Rate), without --verbose-csv.
COLUMNS = (
    "Inferences/Second",
    "Client Send",
    "Network+Server Send/Recv",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client Recv",
    "p50 latency",
    "p90 latency",
    "p95 latency",
    "p99 latency",
)


def header(mode: str) -> list[str]:
    """The CSV header of a closed-loop ("closed": Concurrency) or open-loop ("open": Request
    Rate) file."""
    return [REQUEST_RATE if mode == "open" else CONCURRENCY, *COLUMNS]


def _us(ms: float) -> int:
    return int(round(ms * 1000.0))


def client_send_us(protocol: str, posts: Sequence[Post], repeat: int = 3) -> int:
    """Mean microseconds tritonclient spends building one request of these posts (the inputs made
    beforehand, as the load generators make them): the `Client Send` column."""
    if protocol == "http":
        import tritonclient.http as module

        def build(inputs: list[Any]) -> Any:
            return module.InferenceServerClient.generate_request_body(inputs)

    else:
        import tritonclient.grpc as module
        from tritonclient.grpc import _utils

        def build(inputs: list[Any]) -> Any:
            request = _utils._get_inference_request(
                ENSEMBLE, inputs, "", "", None, 0, False, False, 0, None, None
            )
            return request.SerializeToString()

    requests = [
        [
            bytes_input(module, IMAGE_INPUT, p.image),
            bytes_input(module, TEXT_INPUT, p.text.encode()),
        ]
        for p in posts
    ]
    start = time.perf_counter()
    for _ in range(repeat):
        for inputs in requests:
            build(inputs)
    return int((time.perf_counter() - start) * 1e6 / (repeat * len(requests)))


def pa_line(row: Row, send_us: int, recv_us: int = 0) -> list[int | float]:
    """One CSV line of a Triton row (loadgen.closed_loop or openloop.open_loop)."""
    steps = row.get("server") or {}
    split = {f: sum(_us(s.get(f, 0.0)) for s in steps.values()) for f in STEP_FIELDS}
    compute = split["compute_input_ms"] + split["compute_infer_ms"] + split["compute_output_ms"]
    wait = _us(row["mean_ms"]) - send_us - recv_us
    network = max(0, wait - split["queue_ms"] - compute)
    first = row["offered_rps"] if row.get("mode") == "open" else row["concurrency"]
    return [
        first,
        row["throughput_rps"],
        send_us,
        network,
        split["queue_ms"],
        split["compute_input_ms"],
        split["compute_infer_ms"],
        split["compute_output_ms"],
        recv_us,
        *(_us(row[k]) for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms")),
    ]


def groups(rows: Sequence[Row]) -> dict[tuple[str, str, str, str], list[Row]]:
    """The Triton rows measured with load, by (path, precision, protocol, mode): perf_analyzer
    writes one file per model, protocol and mode."""
    out: dict[tuple[str, str, str, str], list[Row]] = {}
    for r in rows:
        if r.get("path") in TRITON_PATHS and r.get("requests") and "server" in r:
            key = (r["path"], label(r), r["protocol"], r.get("mode", "closed"))
            out.setdefault(key, []).append(r)
    return out


def file_for(path: Path, key: tuple[str, str, str, str], several: bool) -> Path:
    """`path` itself when the run made one group, else `stem.PATH-PRECISION-PROTOCOL[-rate].csv`
    beside it."""
    if not several:
        return path
    name, precision, protocol, mode = key
    parts = [name, precision.replace(":", "_"), protocol] + (["rate"] if mode == "open" else [])
    tag = "-".join(p for p in parts if p)
    return path.with_name(f"{path.stem}.{tag}{path.suffix or '.csv'}")


def write(path: Path, rows: Sequence[Row], posts: Sequence[Post]) -> list[Path]:
    """perf_analyzer CSV files of the Triton rows (see `groups`, `file_for`); -> the files
    written (none when no Triton row was measured)."""
    found = groups(rows)
    send = {proto: client_send_us(proto, posts) for proto in {k[2] for k in found}}
    written = []
    for key, members in found.items():
        target = file_for(path, key, len(found) > 1)
        target.parent.mkdir(parents=True, exist_ok=True)
        lines = sorted((pa_line(r, send[key[2]]) for r in members), key=lambda line: float(line[1]))
        with target.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header(key[3]))
            writer.writerows(lines)
        written.append(target)
    return written


def read(path: Path) -> list[dict[str, str]]:
    """A perf_analyzer CSV (this module's or perf_analyzer's own) as one dict per line."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))
