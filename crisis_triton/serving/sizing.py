"""How much /dev/shm a served repository needs, and how many requests the front may let in.

The deployment's one sizing rule: serve.py checks /dev/shm against it at start and lowers the
front's requests in flight to what fits; the container files carry its value for the default
repository. The rule, what it models and the measurements behind it: docs/reliability.md,
"Size /dev/shm".
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------ one request's bytes (the front's cap, /dev/shm)
# Requests in flight at once, both ports together (nginx limit_conn: an HTTP/1.1 connection with a
# request, or one HTTP/2 stream). One more is answered 503 (gRPC: UNAVAILABLE), which the client
# retries with backoff. Sized for a CPU server: Triton queues what its instances cannot run yet.
MAX_CONNECTIONS = 64
# The inference JSON header of the binary tensor extension (names, shapes, parameters) or the
# gRPC request's protobuf fields: generous for three inputs and a few outputs.
REQUEST_HEADER_BYTES = 64 * 1024
BYTES_LENGTH_PREFIX = 4  # Triton's binary BYTES element: a 4-byte length, then the bytes
# A character of text in a JSON body, worst case: a character outside the BMP is escaped as two
# \uXXXX (12 bytes); UTF-8 in the binary encoding needs at most 4.
JSON_BYTES_PER_CHAR = 12
TEXT_INPUTS = 2  # the tweet text and the caption, each cut to max_text_chars by the server
POSTS_PER_REQUEST = 1  # the project's clients send one post per request (shape [1, 1])


def post_bytes(max_image_bytes: int, max_text_chars: int) -> int:
    """The most bytes one post can take in a request body: the image (binary, with its 4-byte
    length prefix: Triton's JSON has no base64 for BYTES, so an image can only travel in binary
    form, server/src/http_server.cc) and TEXT_INPUTS texts in their worst JSON escaping. Texts
    longer than max_text_chars are cut by the server, never refused; the front refuses a body
    with more than this much text."""
    image = max_image_bytes + BYTES_LENGTH_PREFIX
    return image + TEXT_INPUTS * JSON_BYTES_PER_CHAR * max_text_chars


def body_cap(
    max_image_bytes: int, max_text_chars: int, posts_per_request: int = POSTS_PER_REQUEST
) -> int:
    """client_max_body_size: REQUEST_HEADER_BYTES + posts_per_request x :func:`post_bytes`."""
    if posts_per_request < 1:
        raise ValueError(f"posts_per_request must be at least 1, not {posts_per_request}")
    return REQUEST_HEADER_BYTES + posts_per_request * post_bytes(max_image_bytes, max_text_chars)


def json_body_cap(max_text_chars: int, posts_per_request: int = POSTS_PER_REQUEST) -> int:
    """The largest all-JSON request body (text-only posts: an image cannot travel in JSON):
    REQUEST_HEADER_BYTES + the texts in their worst JSON escaping."""
    return REQUEST_HEADER_BYTES + posts_per_request * TEXT_INPUTS * JSON_BYTES_PER_CHAR * (
        max_text_chars
    )


PathLike = str | os.PathLike[str]

SHM_DIR = Path("/dev/shm")
MIB = 1024 * 1024
# The python backend's shared-memory settings, passed to tritonserver explicitly (serve.py) so the
# rule does not depend on a backend release's defaults: each pool starts at 1 MiB and grows by at
# least 1 MiB (Triton 2.51's defaults; older python backends started at 64 MiB).
SHM_DEFAULT_BYTES = 1 * MIB
SHM_GROWTH_BYTES = 1 * MIB
# Allocator headers and growth rounding: the measured pools were within the rule's first MiB.
SHM_MARGIN = 1.05
# Container sizes are written in whole steps of this (512m, 576m, ...).
SHM_STEP = 64 * MIB
PREPROCESS_JSON = "preprocess.json"  # the preprocessing limits, beside the preprocess model

_DTYPE_BYTES = {
    "TYPE_BOOL": 1, "TYPE_UINT8": 1, "TYPE_INT8": 1,
    "TYPE_UINT16": 2, "TYPE_INT16": 2, "TYPE_FP16": 2, "TYPE_BF16": 2,
    "TYPE_UINT32": 4, "TYPE_INT32": 4, "TYPE_FP32": 4,
    "TYPE_UINT64": 8, "TYPE_INT64": 8, "TYPE_FP64": 8,
}  # fmt: skip


def python_backend_args() -> list[str]:
    """tritonserver flags that fix the python backend's pool sizes this rule assumes."""
    return [
        "--backend-config", f"python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
        "--backend-config", f"python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
    ]  # fmt: skip


class SizingError(ValueError):
    """A repository whose needs cannot be read, or a /dev/shm too small to serve one request."""


@dataclass(frozen=True)
class PythonModel:
    """One python-backend model as the rule sees it: its instances, its batch, and per post the
    bytes of its fixed-size inputs and outputs; ``string_inputs``: it also gets request bytes
    (bounded per request by the front's body cap)."""

    name: str
    instances: int
    max_batch_size: int
    fixed_bytes: int
    string_inputs: bool

    def pool_bytes(self, body_bytes: int, in_flight: int | None) -> int:
        """The pool of one instance after its largest batch."""
        batch = self.max_batch_size
        requests = batch if in_flight is None else min(in_flight, batch)
        strings = requests * body_bytes if self.string_inputs else 0
        return SHM_DEFAULT_BYTES + strings + batch * self.fixed_bytes


@dataclass(frozen=True)
class Sizing:
    """A repository's python models and request limits: what /dev/shm its serving needs."""

    models: tuple[PythonModel, ...]
    max_image_bytes: int | None  # None: the repository has no preprocess.json
    max_text_chars: int | None

    @property
    def body_cap(self) -> int:
        """The front's request-body cap for this repository (crisis_triton/serving/front.py)."""
        if self.max_image_bytes is None or self.max_text_chars is None:
            raise SizingError(
                f"the repository has no {PREPROCESS_JSON}: no request limits to derive the "
                "front's body cap from (give --max-body-bytes)"
            )
        return body_cap(self.max_image_bytes, self.max_text_chars)

    @property
    def max_batch_size(self) -> int:
        return max((m.max_batch_size for m in self.models), default=0)

    def shm_needed(self, in_flight: int | None = MAX_CONNECTIONS, body: int | None = None) -> int:
        """Bytes of /dev/shm for at most ``in_flight`` requests at once (None: any number) of at
        most ``body`` bytes each (default: the body cap)."""
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight}")
        body = self.body_cap if body is None else body
        total = sum(m.instances * m.pool_bytes(body, in_flight) for m in self.models)
        return math.ceil(total * SHM_MARGIN)

    def max_in_flight(self, shm_bytes: int, body: int | None = None) -> int | None:
        """The most requests in flight whose batches fit ``shm_bytes``: None when full batches
        fit (shared memory sets no limit), 0 when not even one request does."""
        if self.shm_needed(None, body) <= shm_bytes:
            return None
        fits = 0  # shm_needed grows with in_flight up to max_batch_size (then: full batches)
        low, high = 1, self.max_batch_size
        while low <= high:
            middle = (low + high) // 2
            if self.shm_needed(middle, body) <= shm_bytes:
                fits, low = middle, middle + 1
            else:
                high = middle - 1
        return fits

    def lines(self, in_flight: int | None = MAX_CONNECTIONS, body: int | None = None) -> list[str]:
        """What each model's pools need, for messages and docs."""
        out = []
        body = self.body_cap if body is None else body
        for m in self.models:
            each = m.pool_bytes(body, in_flight)
            out.append(f"{m.name}: {m.instances} x {each / MIB:.1f} MiB")
        return out


def container_shm(needed: int) -> str:
    """A container's shm size for ``needed`` bytes, in whole SHM_STEPs: '576m'."""
    return f"{math.ceil(needed / SHM_STEP) * SHM_STEP // MIB}m"


def parse_size(text: str) -> int:
    """'512m', '576Mi', '1g', '1Gi', '1024' (bytes) -> bytes, as docker/compose/Kubernetes write
    sizes of /dev/shm."""
    match = re.fullmatch(r"(\d+)\s*(?:([kmg])i?)?b?", text.strip().lower())
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 512m, 576Mi, 1g)")
    return int(match[1]) * 1024 ** " kmg".index(match[2] or " ")


def _tensor_bytes(tensors: Iterable[object], longest: int | None) -> tuple[int, bool]:
    """(bytes of one post's tensors at their largest, whether any is a string). `longest`: what
    a dynamic (-1) dim takes at most (the text's context length: token ids and token features at
    each post's own length, docs/fidelity.md); None where the repository does not say."""
    from tritonclient.grpc import model_config_pb2

    fixed, strings = 0, False
    for tensor in tensors:
        dtype = model_config_pb2.DataType.Name(tensor.data_type)  # type: ignore[attr-defined]
        if dtype == "TYPE_STRING":
            strings = True
            continue
        dims = list(tensor.dims)  # type: ignore[attr-defined]
        if longest is not None:
            dims = [longest if d == -1 else d for d in dims]
        if dtype not in _DTYPE_BYTES or any(d < 0 for d in dims):
            raise SizingError(f"tensor {tensor.name}: {dtype} with dims {list(tensor.dims)} has no "  # type: ignore[attr-defined]
                              "fixed size")  # fmt: skip
        fixed += _DTYPE_BYTES[dtype] * math.prod(dims)
    return fixed, strings


def read_sizing(repo: PathLike) -> Sizing:
    """The python models of ``repo`` (config.pbtxt) and its request limits (preprocess.json; the
    largest over the version folders, which may all be served).

    Raises:
        SizingError: a config that does not parse, a limit missing from preprocess.json, a
            tensor of no fixed size.
    """
    from crisis_triton.serving.repository_check import ConfigParseError, parse_config

    root = Path(repo)
    limits = []
    for path in sorted(root.glob(f"*/[0-9]*/{PREPROCESS_JSON}")):
        try:
            limits.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            raise SizingError(f"{path}: {exc}") from exc
    lengths = [int(x["context_length"]) for x in limits if "context_length" in x]
    longest = max(lengths) if lengths else None
    models = []
    for config_path in sorted(root.glob("*/config.pbtxt")):
        try:
            config = parse_config(config_path)
        except (OSError, ConfigParseError) as exc:
            raise SizingError(f"{config_path}: {exc}") from exc
        if config.platform or config.backend != "python":
            continue
        instances = sum(g.count or 1 for g in config.instance_group) or 1
        fixed_in, strings = _tensor_bytes(config.input, longest)
        fixed_out, string_out = _tensor_bytes(config.output, longest)
        if string_out:
            raise SizingError(f"{config_path}: string outputs have no fixed size")
        models.append(PythonModel(
            name=config_path.parent.name, instances=instances,
            max_batch_size=max(1, config.max_batch_size),
            fixed_bytes=fixed_in + fixed_out, string_inputs=strings,
        ))  # fmt: skip
    if not limits:
        return Sizing(tuple(models), max_image_bytes=None, max_text_chars=None)
    try:
        image = max(int(x["max_image_bytes"]) for x in limits)
        text = max(int(x["max_text_chars"]) for x in limits)
    except (KeyError, TypeError, ValueError) as exc:
        raise SizingError(f"{root}: {PREPROCESS_JSON} lacks a limit: {exc}") from exc
    return Sizing(tuple(models), max_image_bytes=image, max_text_chars=text)


def shm_total(shm_dir: Path = SHM_DIR) -> int | None:
    """The size of /dev/shm in bytes (None where it cannot be read)."""
    try:
        return shutil.disk_usage(shm_dir).total
    except OSError:
        return None


@dataclass(frozen=True)
class ShmPlan:
    """What serve.py does about /dev/shm: the front's requests in flight, and what to say."""

    in_flight: int | None  # the front's limit (None: no front)
    warning: str | None
    needed: int  # bytes for the configuration asked for


def plan(
    sizing: Sizing,
    shm_bytes: int | None,
    *,
    front: bool,
    max_connections: int | None = None,
    body: int | None = None,
) -> ShmPlan:
    """The front's requests in flight for ``shm_bytes`` of /dev/shm (None: unknown, not limited),
    at most ``max_connections`` (default MAX_CONNECTIONS), with a warning when /dev/shm lowers it;
    without a front, a warning when /dev/shm cannot hold full batches of requests of the body cap.
    ``body``: the front's body cap when not the repository's own.

    Raises:
        SizingError: /dev/shm cannot hold one request of the body cap beside the pools.
    """
    wanted = MAX_CONNECTIONS if max_connections is None else max_connections
    if body is None and sizing.max_image_bytes is None and not front:
        return ShmPlan(None, None, 0)  # no limits to size against (not a crisis-triton export)
    body = sizing.body_cap if body is None else body
    needed = sizing.shm_needed(wanted if front else None, body)
    if shm_bytes is None or shm_bytes >= needed:
        return ShmPlan(wanted if front else None, None, needed)
    have = f"{SHM_DIR} holds {shm_bytes / MIB:.0f} MiB"
    fix = f"give it {container_shm(needed)} (--shm-size, compose shm_size, a Memory emptyDir)"
    if not front:
        return ShmPlan(None, (
            f"{have}; full batches of {sizing.max_batch_size} requests of up to {body / MIB:.1f} "
            f"MiB need {needed / MIB:.0f} MiB ({'; '.join(sizing.lines(None, body))}), and "
            "without --front nothing caps a request's size: under load requests will fail with "
            "HTTP 500 ('Failed to increase the shared memory pool size'). Serve with --front, "
            f"or {fix}"
        ), needed)  # fmt: skip
    fits = sizing.max_in_flight(shm_bytes, body)
    if fits is not None and fits < 1:
        raise SizingError(
            f"{have}: not even one request of {body / MIB:.1f} MiB (the front's body cap) fits "
            f"beside the pools ({sizing.shm_needed(1, body) / MIB:.0f} MiB needed); "
            f"{wanted} requests in flight need {needed / MIB:.0f} MiB: {fix}"
        )
    if fits is None or fits >= wanted:
        return ShmPlan(wanted, None, needed)
    return ShmPlan(fits, (
        f"{have}: the front lets {fits} requests in flight, not {wanted} (more get 503, which "
        f"clients retry); {wanted} need {needed / MIB:.0f} MiB "
        f"({'; '.join(sizing.lines(wanted, body))}): {fix}"
    ), needed)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m crisis_triton.serving.sizing REPO [--in-flight N] [--max-body-bytes N]`: what
    /dev/shm REPO
    needs, per model, and the container size to give it."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m crisis_triton.serving.sizing", description=main.__doc__
    )
    parser.add_argument("repository", type=Path)
    parser.add_argument(
        "--in-flight",
        type=int,
        default=MAX_CONNECTIONS,
        help=f"requests in flight through the front ({MAX_CONNECTIONS})",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, help="the front's body cap (default: from preprocess.json)"
    )
    args = parser.parse_args(argv)
    if not args.repository.is_dir():
        parser.error(f"{args.repository} is not a directory")
    try:
        sizing = read_sizing(args.repository)
        body = args.max_body_bytes or sizing.body_cap
        needed = sizing.shm_needed(args.in_flight, body)
    except (SizingError, ValueError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"body cap {body} bytes, {args.in_flight} requests in flight:")
    for line in sizing.lines(args.in_flight, body):
        print(f"  {line}")
    print(f"/dev/shm needed: {needed / MIB:.1f} MiB (x{SHM_MARGIN} margin included); "
          f"give it {container_shm(needed)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
