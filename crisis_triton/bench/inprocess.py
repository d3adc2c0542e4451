"""In-process paths: the research path (PyTorch eager) and ONNX Runtime on the exported graphs.

Both preprocess with `crisis_triton.preprocess.posts.Preprocessor`, the very code the Triton
`preprocess` model
runs; preprocessing time is measured apart from model time so each row says what it includes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crisis_triton.bench.report import Row, Tick, make_row
from crisis_triton.bench.workload import Post
from crisis_triton.contract.spec import IMAGE_PRESENT, ModelSpecs
from crisis_triton.preprocess.posts import Preprocessor
from crisis_triton.repository.config import Deployment
from crisis_triton.repository.writer import model_dir
from crisis_triton.runtime.runtimes import open_session


@dataclass(frozen=True)
class Tensors:
    """Every post preprocessed once: the pre-made tensors of the model-only measurements."""

    pixels: np.ndarray
    ids: np.ndarray

    def batch(self, start: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(start, start + size) % len(self.pixels)
        return np.ascontiguousarray(self.pixels[idx]), np.ascontiguousarray(self.ids[idx])


def premade(pre: Preprocessor, posts: list[Post]) -> Tensors:
    pixels, ids = pre([p.image for p in posts], [p.text for p in posts])
    return Tensors(pixels, ids)


def _ms(seconds: float) -> float:
    return seconds * 1000.0


# ------------------------------------------------------------------------------- research path


def research_path(
    enc: Any,
    head: Any,
    pre: Preprocessor,
    posts: list[Post],
    requests: int,
    warmup: int,
    device: str = "cpu",
    tick: Tick | None = None,
) -> list[Row]:
    """One request at a time: preprocess one post, image + text towers, fused head (PyTorch)."""
    import torch

    image, text, head = enc.image.to(device).eval(), enc.text.to(device).eval(), head.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    pre_ms, model_ms = [], []
    started = None
    with torch.inference_mode():
        for i in range(warmup + requests):
            if i == warmup:
                started = time.perf_counter()
            post = posts[i % len(posts)]
            t0 = time.perf_counter()
            pixels, ids = pre([post.image], [post.text])
            t1 = time.perf_counter()
            head(image(torch.from_numpy(pixels).to(device)), text(torch.from_numpy(ids).to(device)))
            sync()
            t2 = time.perf_counter()
            if i >= warmup:
                pre_ms.append(_ms(t1 - t0))
                model_ms.append(_ms(t2 - t1))
                if tick:
                    tick(1)
    assert started is not None
    wall = time.perf_counter() - started
    pre_total, model_total = sum(pre_ms) / 1000, sum(model_ms) / 1000
    suffix = "" if device == "cpu" else f"-{device.split(':')[0]}"
    extra = {"device": device.split(":")[0], "threads": torch.get_num_threads()}
    both = [a + b for a, b in zip(pre_ms, model_ms)]
    rows = [
        make_row(
            f"research{suffix}",
            "inprocess",
            latencies_ms=model_ms,
            samples=requests,
            seconds=model_total,
            preprocess_ms_mean=round(float(np.mean(pre_ms)), 3),
            **extra,
        ),
        make_row(
            f"research+preprocess{suffix}",
            "inprocess",
            latencies_ms=both,
            samples=requests,
            seconds=wall,
            **extra,
        ),
    ]
    if device == "cpu":  # preprocessing runs on the CPU whatever the model's device: report once
        rows.append(
            make_row(
                "preprocess",
                "inprocess",
                latencies_ms=pre_ms,
                samples=requests,
                seconds=pre_total,
                device="cpu",
                threads=1,
            )
        )
    return rows


# ------------------------------------------------------------------------------- ONNX Runtime

ORT_VARIANTS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def ort_variants(want_gpu: bool) -> list[str]:
    """'cpu', plus 'cuda'/'tensorrt' when this onnxruntime build has them and a GPU is wanted."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = ["cpu"]
    if want_gpu:
        out += [v for v in ("cuda", "tensorrt") if ORT_VARIANTS[v][0] in have]
    return out


class _OrtRun:
    """An ONNX Runtime session on a GPU provider, called like export/runtimes.Session."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feed)


class OrtChain:
    """image encoder, text encoder, head: three sessions on the repository's model.onnx files.

    `served=True` runs them as the python flavour serves them: intra-op threads = `threads`
    (the deployment's cores / instances), thread spinning off, and the two encoders at the same
    time (the ensemble runs them in parallel). `served=False` keeps ONNX Runtime's default
    thread spinning and runs the encoders one after the other (same thread count): the plain
    in-process script."""

    def __init__(
        self,
        repo: Path,
        specs: ModelSpecs,
        variant: str,
        threads: int,
        served: bool = True,
        dep: Deployment | None = None,
    ) -> None:
        """`dep`: the repository's deployment; on CPU each graph runs in the precision and on the
        runtime its config names (crisis_triton/runtime/runtimes.py, as the python flavour's
        model.py)."""
        dep = dep or Deployment()
        self.precision = dep.precision + (f":{dep.runtime}" if dep.runtime else "")
        self.runtime = (
            dep.graph_runtime(specs.image_encoder.name) if variant == "cpu" else "onnxruntime"
        )

        def session(name: str) -> Any:
            path = model_dir(repo, name) / dep.graph_file(name)
            if variant == "cpu":
                return open_session(path, dep.graph_precision(name), dep.graph_runtime(name),
                                    threads=threads, spinning=not served)  # fmt: skip
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            if served:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            providers = ORT_VARIANTS[variant]
            return _OrtRun(ort.InferenceSession(str(path), options, providers=providers))

        self.specs = specs
        self.threads = threads
        self.served = served
        self.image = session(specs.image_encoder.name)
        self.text = session(specs.text_encoder.name)
        self.head = session(specs.head.name)
        self.pixels_name = specs.image_encoder.input_names[0]
        self.ids_name = specs.text_encoder.input_names[0]
        self.head_inputs = specs.head.input_names
        # the encoders' outputs by name: pooled features, or token sequences (cma_clip)
        self.image_outputs = specs.image_encoder.output_names
        self.text_outputs = specs.text_encoder.output_names
        self.pool = ThreadPoolExecutor(1) if served else None

    @property
    def path(self) -> str:
        return "onnxruntime" if self.served else "onnxruntime-sequential"

    def __call__(self, pixels: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
        if self.pool is not None:  # the text encoder beside the image encoder
            text = self.pool.submit(self.text.run, {self.ids_name: ids})
            image = self.image.run({self.pixels_name: pixels})
            txt = text.result()
        else:
            image = self.image.run({self.pixels_name: pixels})
            txt = self.text.run({self.ids_name: ids})
        feed = {**dict(zip(self.image_outputs, image)), **dict(zip(self.text_outputs, txt))}
        if IMAGE_PRESENT in self.head_inputs:  # every benchmark post has its image
            feed[IMAGE_PRESENT] = np.ones((len(pixels), 1), dtype=np.float32)
        return self.head.run({name: feed[name] for name in self.head_inputs})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def ort_calls(samples: int, batch: int) -> int:
    """Calls at one batch size: `samples` posts, and at least 5 calls (a p90 needs a few)."""
    return max(5, -(-samples // batch))


def ort_samples(samples: int, batch: int) -> int:
    return ort_calls(samples, batch) * batch


def ort_path(
    chain: OrtChain,
    variant: str,
    pre: Preprocessor,
    posts: list[Post],
    tensors: Tensors,
    batch_sizes: list[int],
    samples: int,
    warmup: int,
    tick: Tick | None = None,
) -> list[Row]:
    """Batch 1 one post at a time (preprocess + model, timed apart); larger batches on pre-made
    tensors, `samples` posts per batch size (at least 5 calls)."""
    suffix = "" if variant == "cpu" else f"-{variant}"
    extra = {
        "device": "cpu" if variant == "cpu" else "cuda",
        "precision": chain.precision,
        "runtime": chain.runtime,
        "threads": chain.threads,
        "threading": "as served: encoders in parallel, no spinning"
        if chain.served
        else "ORT's default spinning, encoders in sequence",
    }
    rows: list[Row] = []
    for b in batch_sizes:
        calls = ort_calls(samples, b)
        batches = [tensors.batch(k * b, b) for k in range(min(calls, 64))]
        for k in range(warmup):
            chain(*batches[k % len(batches)])
        lat, pre_ms = [], []
        started = time.perf_counter()
        for k in range(calls):
            if b == 1:
                post = posts[k % len(posts)]
                t0 = time.perf_counter()
                pixels, ids = pre([post.image], [post.text])
                pre_ms.append(_ms(time.perf_counter() - t0))
            else:
                pixels, ids = batches[k % len(batches)]
            t1 = time.perf_counter()
            chain(pixels, ids)
            lat.append(_ms(time.perf_counter() - t1))
            if tick:
                tick(b)
        wall = time.perf_counter() - started
        rows.append(
            make_row(
                f"{chain.path}{suffix}",
                "inprocess",
                latencies_ms=lat,
                samples=calls * b,
                seconds=sum(lat) / 1000,
                batch_size=b,
                **extra,
            )
        )
        if b == 1:
            rows[-1]["preprocess_ms_mean"] = round(float(np.mean(pre_ms)), 3)
            both = [a + c for a, c in zip(pre_ms, lat)]
            rows.append(
                make_row(
                    f"{chain.path}+preprocess{suffix}",
                    "inprocess",
                    latencies_ms=both,
                    samples=calls,
                    seconds=wall,
                    **extra,
                )
            )
    return rows
