"""The correctness gate of a reduced precision: the candidate chain against the FP32 export of the
same weights, on evaluation posts, through the same preprocessing.

Posts: `--eval-posts FILE.csv` (header image,text[,caption]; image paths relative to the file,
as the client's batch files) - the user's own posts, the check that counts on a real checkpoint -
or, without it, synthetic posts (the report says which). Per task: top-1 agreement with FP32
(>= `min_agreement` to pass), max and mean |difference of probabilities|; per encoder: the
minimum cosine between its FP32 and candidate features. The speed of each candidate at the
deployment's batch sizes is measured with the same sessions (`time_chain`), for `--precision auto`.

The cheaper image path (`--fast-image`, PreprocessSpec.fast_image) is gated the same way: the same
chain (same graphs, same precision) on the fast path's pixels against the exact path's pixels of
the same posts (`gate_fast_image`); without --eval-posts the posts are photo-sized synthetic ones
(`synthetic_photos`), since the fast path changes nothing below FAST_IMAGE_DECODE_FACTOR x the
resize target.
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from crisis_triton.contract.spec import IMAGE_PRESENT, ModelSpecs
from crisis_triton.preprocess.posts import (
    PreprocessError,
    Preprocessor,
    PreprocessSpec,
    preprocess_image,
    preprocess_post_image,
)
from crisis_triton.runtime.runtimes import Session, open_session

DEFAULT_MIN_AGREEMENT = 0.99
SYNTHETIC_POSTS = 96
GATE_BATCH = 8
WORDS = (
    "flood water rising downtown rescue teams boats roof family stranded bridge collapsed road "
    "closed power lines down fire smoke evacuate shelter donations volunteers hurricane storm "
    "damage houses destroyed earthquake injured people missing help needed praying for everyone "
    "stay safe trees fallen cars submerged streets #harvey #irma #maria RT https://t.co/abc"
).split()


# The sizes of synthetic_photos: a tweet photo's common shapes, square to panorama, both
# orientations, up to the largest a tweet photo is served at (2048 on the long side).
PHOTO_SIZES = ((680, 680), (1200, 900), (900, 1200), (1200, 675), (2048, 1536), (1536, 2048))


class EvalPostsError(ValueError):
    pass


@dataclass(frozen=True)
class Post:
    image: bytes
    text: str
    caption: str | None = None


def read_eval_posts(path: Path) -> list[Post]:
    """Posts of a CSV (or .tsv) file with header image,text[,caption]; every row must be usable
    (a gate over a silently shortened set would say less than it claims)."""
    if not path.is_file():
        raise EvalPostsError(f"--eval-posts: file not found: {path}")
    tsv = path.suffix.lower() in (".tsv", ".tab")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
        rows = [r for r in reader if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise EvalPostsError(f"--eval-posts {path}: expected a header image,text[,caption], rows")
    header = [h.strip().lower() for h in rows[0]]
    if "image" not in header or "text" not in header:
        raise EvalPostsError(f"--eval-posts {path}: header must be image,text[,caption]")
    ci, ct = header.index("image"), header.index("text")
    cc = header.index("caption") if "caption" in header else None
    posts = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) <= max(ci, ct):
            raise EvalPostsError(f"--eval-posts {path}, line {n}: expected image,text columns")
        image = path.resolve().parent / row[ci].strip()
        try:
            data = image.read_bytes()
        except OSError as exc:
            raise EvalPostsError(f"--eval-posts {path}, line {n}: {image}: {exc}") from None
        caption = row[cc] if cc is not None and cc < len(row) and row[cc] else None
        try:  # every post must be one the server would answer
            preprocess_image(data, PreprocessSpec())
        except PreprocessError as exc:
            raise EvalPostsError(f"--eval-posts {path}, line {n}: {image.name}: {exc}") from None
        posts.append(Post(data, row[ct], caption))
    return posts


def synthetic_posts(count: int = SYNTHETIC_POSTS, seed: int = 0) -> list[Post]:
    """Photo-like images (smooth gradients, blocks, noise, varied sizes and aspect ratios) and
    tweet-like texts: activations in the ranges real posts give, unlike uniform noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    posts = []
    for _ in range(count):
        w, h = int(rng.integers(160, 640)), int(rng.integers(160, 640))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(0, 255, 3)
        slope = rng.uniform(-0.4, 0.4, (2, 3))
        img = base + x[..., None] * slope[0] + y[..., None] * slope[1]
        img += rng.normal(0, rng.uniform(2, 30), img.shape)
        picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
            x1 = x0 + int(rng.integers(10, w // 2 + 11))
            y1 = y0 + int(rng.integers(10, h // 2 + 11))
            draw.rectangle((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=int(rng.integers(60, 95)))
        text = " ".join(rng.choice(WORDS, int(rng.integers(3, 30))))
        posts.append(Post(buf.getvalue(), text, None))
    return posts


def encode(spec: PreprocessSpec, posts: Sequence[Post]) -> tuple[np.ndarray, np.ndarray]:
    """pixels [N,3,H,W] and input ids [N, context_length], through the served preprocessing (the
    ids at their full width, so batches of different text lengths stack: exact either way)."""
    pre = Preprocessor(replace(spec, trim_text=False))
    pixels, ids = [], []
    for start in range(0, len(posts), GATE_BATCH):
        part = posts[start : start + GATE_BATCH]
        p, i = pre([x.image for x in part], [x.text for x in part], [x.caption for x in part])
        pixels.append(p)
        ids.append(i)
    return np.concatenate(pixels), np.concatenate(ids)


@dataclass
class Chain:
    """The three graphs of one precision, run one after the other."""

    specs: ModelSpecs
    image: Session
    text: Session
    head: Session

    @classmethod
    def open(
        cls,
        specs: ModelSpecs,
        files: Mapping[str, Path],
        precisions: Mapping[str, str],
        threads: int = 0,
        runtimes: Mapping[str, str] | None = None,
    ) -> Chain:
        def session(graph: str) -> Session:
            runtime = (runtimes or {}).get(graph) or None
            return open_session(
                files[graph], precisions.get(graph, "fp32"), runtime, threads=threads
            )

        return cls(
            specs,
            session(specs.image_encoder.name),
            session(specs.text_encoder.name),
            session(specs.head.name),
        )

    def __call__(self, pixels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        s = self.specs
        (fi,) = self.image.run({s.image_encoder.input_names[0]: pixels})
        (ft,) = self.text.run({s.text_encoder.input_names[0]: ids})
        feed = {s.image_encoder.output_names[0]: fi, s.text_encoder.output_names[0]: ft}
        if IMAGE_PRESENT in s.head.input_names:  # a head trained with modality dropout
            feed[IMAGE_PRESENT] = np.ones((len(pixels), 1), dtype=np.float32)
        probs = self.head.run({name: feed[name] for name in s.head.input_names})
        return {
            s.image_encoder.output_names[0]: fi,
            s.text_encoder.output_names[0]: ft,
            **dict(zip(s.head.output_names, probs)),
        }

    def outputs(self, pixels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
        parts = [
            self(pixels[i : i + GATE_BATCH], ids[i : i + GATE_BATCH])
            for i in range(0, len(pixels), GATE_BATCH)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-30)).min())


@dataclass
class GateResult:
    precision: str
    runtime: str
    posts: str  # where the posts came from
    count: int
    min_agreement: float
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)  # encoder output -> min cosine
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "precision": self.precision,
            "runtime": self.runtime,
            "posts": self.posts,
            "count": self.count,
            "min_agreement": self.min_agreement,
            "tasks": self.tasks,
            "min_cosine": self.features,
            "passed": self.passed,
            "failures": self.failures,
        }

    def lines(self) -> list[str]:
        head = (
            f"{'PASS' if self.passed else 'FAIL'} precision gate {self.precision} "
            f"({self.runtime}) vs fp32 on {self.count} {self.posts}"
        )
        out = [head]
        for task, t in self.tasks.items():
            out.append(
                f"    {task:<11} top-1 agreement {t['agreement']:.4f} (>= {self.min_agreement})"
                f"  max |dp| {t['max_abs_diff']:.2e}  mean |dp| {t['mean_abs_diff']:.2e}"
            )
        for name, cos in self.features.items():
            out.append(f"    {name:<15} min cosine vs fp32 {cos:.6f}")
        out += [f"    FAILED: {f}" for f in self.failures]
        return out


def gate(
    specs: ModelSpecs,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    precision: str,
    runtime: str,
    posts: str,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> GateResult:
    """Compare the candidate's outputs with the FP32 reference outputs of the same posts."""
    count = len(next(iter(reference.values())))
    result = GateResult(precision, runtime, posts, count, min_agreement)
    for task, name in zip(specs.tasks, specs.head.output_names):
        ref, got = reference[name], candidate[name]
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        agreement = float((ref.argmax(axis=1) == got.argmax(axis=1)).mean())
        finite = bool(np.isfinite(got).all())
        result.tasks[task] = {
            "agreement": round(agreement, 6),
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
        }
        if not finite:
            result.failures.append(f"{task}: non-finite probabilities")
        if agreement < min_agreement:
            result.failures.append(
                f"{task}: top-1 agreement {agreement:.4f} < --min-agreement {min_agreement}"
            )
    for graph in (specs.image_encoder, specs.text_encoder):
        name = graph.output_names[0]
        result.features[name] = round(_min_cosine(reference[name], candidate[name]), 7)
    result.passed = not result.failures
    return result


def time_chain(
    chain: Chain, pixels: np.ndarray, ids: np.ndarray, batch_sizes: Sequence[int], repeats: int = 3
) -> dict[int, float]:
    """Median ms per post of the encoders + head at each batch size (after one warm-up call)."""
    out = {}
    for b in batch_sizes:
        reps = -(-b // len(pixels))
        p, i = np.concatenate([pixels] * reps)[:b], np.concatenate([ids] * reps)[:b]
        chain(p, i)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            chain(p, i)
            times.append((time.perf_counter() - t0) * 1000 / b)
        out[b] = round(statistics.median(times), 3)
    return out


def synthetic_photos(count: int = SYNTHETIC_POSTS, seed: int = 0) -> list[Post]:
    """Photo-sized synthetic posts (PHOTO_SIZES in turn, JPEG quality 75..95): smooth gradients,
    waves, sensor-like noise and sharp-edged shapes, so the fast image path's DCT-scaled decoding
    and its resize before padding both change pixels, as on tweet photos (synthetic_posts' 160..640
    pixel images are below what the fast path decodes smaller)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    posts = []
    for n in range(count):
        w, h = PHOTO_SIZES[n % len(PHOTO_SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = rng.uniform(0, 255, 3).astype(np.float32)
        img = img + x[..., None] * (rng.uniform(-150, 150, 3) / w).astype(np.float32)
        img = img + y[..., None] * (rng.uniform(-150, 150, 3) / h).astype(np.float32)
        wave = np.sin(x / rng.uniform(15, 90)) * np.cos(y / rng.uniform(15, 90))
        img += np.float32(rng.uniform(10, 50)) * wave[..., None]
        img += rng.integers(-12, 13, img.shape, dtype=np.int8)
        picture = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(picture)
        for _ in range(int(rng.integers(4, 16))):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = (x0, y0, x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3)))
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        buf = io.BytesIO()
        picture.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
        text = " ".join(rng.choice(WORDS, int(rng.integers(3, 30))))
        posts.append(Post(buf.getvalue(), text, None))
    return posts


def image_pixels(spec: PreprocessSpec, posts: Sequence[Post]) -> np.ndarray:
    """[N, 3, S, S] pixels of the posts' images through `spec` (the image half of `encode`)."""
    return np.stack([preprocess_post_image(p.image, spec)[0] for p in posts])


def pixel_diff_stats(exact: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """|difference| of normalised pixels (units of the encoder's input; 2/255 is one step of 255):
    max, mean, 99th percentile, and the share of values that differ at all."""
    diff = np.abs(exact.astype(np.float64) - other.astype(np.float64))
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "p99": float(np.quantile(diff, 0.99)),
        "share_changed": float((diff > 0).mean()),
    }


@dataclass
class FastImageGate:
    """The fast image path's gate: one chain on the fast and on the exact pixels of the same
    posts (export_report.json's `fast_image`)."""

    precision: str
    runtime: str
    posts: str  # where the posts came from
    count: int
    min_agreement: float
    pixels: dict[str, float] = field(default_factory=dict)  # pixel_diff_stats
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)  # image features' min cosine
    passed: bool = False
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "image_path": "fast",
            "precision": self.precision,
            "runtime": self.runtime,
            "posts": self.posts,
            "count": self.count,
            "min_agreement": self.min_agreement,
            "pixel_diff": self.pixels,
            "tasks": self.tasks,
            "max_abs_diff": max((t["max_abs_diff"] for t in self.tasks.values()), default=0.0),
            "min_cosine": self.features,
            "passed": self.passed,
            "failures": self.failures,
        }

    def lines(self) -> list[str]:
        p = self.pixels
        out = [
            f"{'PASS' if self.passed else 'FAIL'} fast image gate ({self.precision}, "
            f"{self.runtime}) vs the exact image path on {self.count} {self.posts}",
            f"    pixels       max |d| {p['max']:.4f}  mean |d| {p['mean']:.5f}  "
            f"p99 |d| {p['p99']:.4f}  changed {p['share_changed']:.1%}",
        ]
        for task, t in self.tasks.items():
            out.append(
                f"    {task:<11} top-1 agreement {t['agreement']:.4f} (>= {self.min_agreement})"
                f"  max |dp| {t['max_abs_diff']:.2e}  mean |dp| {t['mean_abs_diff']:.2e}"
            )
        out += [f"    FAILED: {f}" for f in self.failures]
        return out


def gate_fast_image(
    chain: Chain,
    spec: PreprocessSpec,
    posts: Sequence[Post],
    precision: str,
    runtime: str,
    source: str,
    min_agreement: float = DEFAULT_MIN_AGREEMENT,
) -> FastImageGate:
    """`chain` on the posts' pixels through `spec` with fast_image on, against the same chain on
    the exact path's pixels (the same text ids): the agreement figures of `gate`, plus the
    pixels' differences. Passes where every task agrees on >= min_agreement of the posts."""
    exact_spec, fast_spec = replace(spec, fast_image=False), replace(spec, fast_image=True)
    exact, ids = encode(exact_spec, posts)
    fast = image_pixels(fast_spec, posts)
    compared = gate(
        chain.specs, chain.outputs(exact, ids), chain.outputs(fast, ids),
        precision, runtime, source, min_agreement,
    )  # fmt: skip
    image_features = chain.specs.image_encoder.output_names[0]
    return FastImageGate(
        precision, runtime, source, len(posts), min_agreement,
        pixels=pixel_diff_stats(exact, fast),
        tasks=compared.tasks,
        features={image_features: compared.features[image_features]},
        passed=compared.passed,
        failures=compared.failures,
    )  # fmt: skip


def time_image_path(spec: PreprocessSpec, posts: Sequence[Post], repeats: int = 3) -> float:
    """Median ms per post of the image half of preprocessing through `spec` (one process, one
    thread), for `--precision auto`'s choice between the exact and the fast image path."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        image_pixels(spec, posts)
        times.append((time.perf_counter() - t0) * 1000 / max(1, len(posts)))
    return round(statistics.median(times), 3)
