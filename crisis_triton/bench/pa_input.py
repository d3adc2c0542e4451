"""The benchmark's posts as perf_analyzer's `--input-data` JSON: both tools send the same requests.

`python -m crisis_triton.bench.pa_input --out FILE [--posts N] [--posts-kind realistic|small]
[--seed S]` writes `{"data": [{"image": {"b64": ...}, "text": {"b64": ...}}, ...]}`: one entry per
post of workload.make_posts (the same count, kind and seed give the same posts as
`crisis-benchmark --posts N --posts-kind K --seed S`). perf_analyzer's BYTES (STRING) tensors in
b64 are the serialized tensor: each element a 4-byte little-endian length then its bytes
(perf_analyzer docs/input_data.md); the ensemble's inputs are one element each (dims [1]).
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crisis_triton.bench import workload
from crisis_triton.contract.names import IMAGE_INPUT, TEXT_INPUT


def serialized(value: bytes) -> bytes:
    """One BYTES element as Triton serializes it: uint32 little-endian length, then the bytes."""
    return struct.pack("<I", len(value)) + value


def element(data: bytes) -> bytes:
    """The one element of a serialized single-element BYTES tensor (inverse of `serialized`)."""
    (length,) = struct.unpack_from("<I", data)
    if len(data) != 4 + length:
        raise ValueError(f"not one serialized element: {len(data)} bytes, length says {length}")
    return data[4:]


def input_data(posts: Sequence[workload.Post]) -> dict[str, Any]:
    """perf_analyzer's --input-data document of these posts, in their order."""

    def b64(value: bytes) -> dict[str, str]:
        return {"b64": base64.b64encode(serialized(value)).decode("ascii")}

    return {"data": [{IMAGE_INPUT: b64(p.image), TEXT_INPUT: b64(p.text.encode())} for p in posts]}


def read_posts(path: Path) -> list[workload.Post]:
    """The posts of an --input-data file written by `input_data` (for checks)."""
    entries = json.loads(path.read_text())["data"]
    return [
        workload.Post(
            element(base64.b64decode(e[IMAGE_INPUT]["b64"])),
            element(base64.b64decode(e[TEXT_INPUT]["b64"])).decode(),
        )
        for e in entries
    ]


def write(out: Path, posts: int, kind: str, seed: int) -> Path:
    """Write the input data of `posts` benchmark posts of `kind` and `seed` to `out`."""
    made = workload.make_posts(posts, seed=seed, kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(input_data(made), indent=1) + "\n")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m crisis_triton.bench.pa_input",
        description="Write the benchmark's posts as perf_analyzer --input-data JSON.",
    )
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument("--posts", type=int, default=32, help="default: %(default)s (the benchmark's)")
    p.add_argument("--posts-kind", choices=workload.POST_KINDS, default=workload.DEFAULT_POST_KIND)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    done = write(args.out, args.posts, args.posts_kind, args.seed)
    print(f"{done}: {args.posts} {args.posts_kind} posts (seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
