"""`crisis-load`: parse the command line into a `LoadPlan`, run it, print the report.

The run is crisis_triton.bench.reliability.run_load; exit 0 when it passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from crisis_triton.extras import missing_extra

if _missing := missing_extra("load.py", "bench", ("PIL", "tokenizers", "pytriton")):
    sys.exit(_missing)

from crisis_triton.bench import repos
from crisis_triton.bench.reliability import LoadError, LoadPlan, run_load

DESCRIPTION = (
    "Reliability under load (issue 6): many mixed valid and invalid requests, every answer checked."
)
EPILOG = """\
    python benchmarks/load.py                 # 10,000 requests at concurrency 32, HTTP + gRPC
    python benchmarks/load.py --quick         # 400 requests, the same checks (used by a test)

Every kind of request of `crisis_triton/bench/cases.py` (odd but valid posts, bad images, bad UTF-8,
requests Triton itself refuses) is first sent ALONE, over each protocol, to record its answer.
Then `--requests` of them, drawn at random (`--invalid-share` invalid), go out from
`--concurrency` closed-loop workers, half over HTTP and half over gRPC, each with its own request
id. The run passes when: every valid request got the probabilities it got alone (max abs diff
<= 1e-6) and every invalid one the very error it got alone; no request is lost; every response
carries its request's id (errors: where Triton quotes it); the ensemble's success count grew by
exactly the number of valid requests (none run twice, none dropped); the ensemble is ready
afterwards; and the server's resident memory
(tritonserver and its python-backend stubs, PSS: shared memory counted once) grew by at most
`--max-memory-growth-mib` over the second half of the load (warm-up growth, such as ONNX
Runtime's arenas reaching the largest batch, happens in the first half; a leak grows in both).
Exit 0 when it passes, 1 otherwise; load.json and load.md in --out say what was seen, memory per
process included.

The default model is the tiny architecture (the request path is the same at every size; the
full-size model makes the run 10x longer): `--size base` for ViT-B/32, `--repo` for any exported
repository, `--url` for a running server (then no memory figures).
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="load.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--protocols", default="http,grpc", help="workers alternate between these")
    p.add_argument("--invalid-share", type=float, default=0.25)
    p.add_argument("--skip-cases", default="", help="comma-separated case names to leave out")
    p.add_argument("--quick", action="store_true", help="400 requests (a smoke run)")
    p.add_argument("--size", choices=tuple(repos.SIZES), default="tiny")
    p.add_argument("--repo", type=Path, help="an exported repository to serve")
    p.add_argument("--url", help="HTTP host:port of a running server (no embedded server)")
    p.add_argument("--grpc-url", help="gRPC host:port of that server")
    p.add_argument(
        "--preprocess-json",
        type=Path,
        help="with --url: the served preprocess.json, so the over-limit cases match its limits",
    )
    p.add_argument("--cache", type=Path, help="where exports are kept and reused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-memory-growth-mib",
        type=float,
        default=64.0,
        help="fail when the server's PSS grows more than this over the second half of the load",
    )
    p.add_argument("--out", type=Path, default=Path("results/load"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick and args.requests == 10_000:
        args.requests = 400
    if args.url and not args.grpc_url and "grpc" in args.protocols:
        p.error("--grpc-url is needed with --url for the grpc protocol")
    return args


def plan_from_args(args: argparse.Namespace) -> LoadPlan:
    """The plan the parsed options describe (`--quick` already applied to `requests`)."""
    return LoadPlan(
        requests=args.requests,
        concurrency=args.concurrency,
        protocols=tuple(args.protocols.split(",")),
        invalid_share=args.invalid_share,
        skip_cases=tuple(filter(None, args.skip_cases.split(","))),
        size=args.size,
        repo=args.repo,
        url=args.url,
        grpc_url=args.grpc_url,
        preprocess_json=args.preprocess_json,
        cache=args.cache,
        seed=args.seed,
        max_memory_growth_mib=args.max_memory_growth_mib,
        out=args.out,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the embedded server is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python benchmarks/load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        done = run_load(plan_from_args(args), command)
    except LoadError as exc:
        raise SystemExit(f"load.py: {exc}") from None
    print(done.markdown)
    return 0 if done.passed else 1


if __name__ == "__main__":
    sys.exit(main())
