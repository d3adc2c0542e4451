"""The one fixed set of synthetic posts every path is measured on: encoded JPEG bytes + tweet text.

The post mix is declared here once (`POST_MIXES`), and every load generator that sends the
benchmark's posts (loadgen, openloop, sweep, cache_stream, the perf_analyzer input data) takes them
from `make_posts` / `make_stream`:

- "realistic" (the default): tweet-size photos, 680x680 .. 2048x1536, JPEG quality 85, a gradient
  plus noise plus filled shapes so that JPEG sizes are those of photos (about 80 KiB .. 0.6 MiB,
  `REALISTIC_IMAGE_BYTES` bounds them), and tweet-length texts of 60-280 characters with a
  mention, hashtags, a t.co link and often emoji;
- "small": the earlier posts (640x480 .. 1200x675, about 100 KiB; 60-200 characters), which hide
  what decoding big photos costs.

Deterministic for a given kind, seed and count; generated once per (count, seed, kind) in a process.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZES = ((640, 480), (800, 600), (1024, 768), (480, 640), (1200, 675), (600, 600))
# Tweet photo sizes (width, height): square, landscape, portrait, up to the 2048x1536 the
# platforms keep as "large".
REALISTIC_SIZES = (
    (680, 680), (1200, 675), (1024, 768), (1080, 1350), (1600, 1200), (2048, 1536),
    (1536, 2048), (1280, 960),
)  # fmt: skip
REALISTIC_TEXT_CHARS = (60, 280)  # a tweet's length, characters
REALISTIC_IMAGE_BYTES = (60 * 1024, 1024 * 1024)  # what the realistic photos weigh as JPEG
MENTIONS = ("@FEMA", "@RedCross", "@NWS", "@localnews", "@CityOfHouston", "@CALFIRE")
EMOJI = ("🙏", "💧", "🔥", "🚨", "😢", "🏠", "⚠️")
WORDS = (
    "flood water rising downtown bridge collapsed road closed rescue teams volunteers "
    "shelter donations power outage hurricane earthquake wildfire smoke evacuation "
    "damaged houses cars stranded families need help please share update tonight"
).split()
TAGS = ("#HurricaneHarvey", "#Irma", "#MexicoEarthquake", "#CaliforniaWildfires", "#flood")


@dataclass(frozen=True)
class Post:
    """One post as a client sends it: encoded JPEG bytes and the tweet's text."""

    image: bytes
    text: str


@dataclass(frozen=True)
class PostMix:
    """What a kind of posts is made of: photo sizes (width, height) and how photos and texts are
    drawn."""

    name: str
    sizes: tuple[tuple[int, int], ...]
    description: str


POST_MIXES: dict[str, PostMix] = {
    "realistic": PostMix(
        "realistic",
        REALISTIC_SIZES,
        "tweet-size photos 680x680..2048x1536 (JPEG q85), tweet texts of 60-280 characters",
    ),
    "small": PostMix(
        "small",
        SIZES,
        "small photos 480x640..1200x675 (JPEG q85), texts of about 60-270 characters",
    ),
}
POST_KINDS: tuple[str, ...] = tuple(POST_MIXES)
DEFAULT_POST_KIND = "realistic"
# --quick (a smoke run of every path in seconds, tiny model): the small posts, which also fit a
# container's default 64 MB /dev/shm beside the one-task server
QUICK_POST_KIND = "small"


def _image(rng: np.random.Generator, width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32)
    arr = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    arr += rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _text(rng: np.random.Generator, i: int) -> str:
    words = " ".join(rng.choice(WORDS, size=int(rng.integers(6, 30))))
    parts = [words.capitalize(), str(rng.choice(TAGS))]
    if i % 3 == 0:
        parts.insert(0, "RT @localnews:")
    if i % 2 == 0:
        parts.append(f"https://t.co/{i:08x}")
    if i % 5 == 0:
        parts.append("🙏💧")
    return " ".join(parts)


def _photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG (quality 85): a colour gradient spread over the whole frame, sensor-like
    noise and a dozen filled shapes, so it weighs what a photo of that size weighs."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3).astype(np.float32)
    slope = rng.uniform(-0.3, 0.3, (2, 3)).astype(np.float32) * (640 / max(width, height))
    arr = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    arr += rng.normal(0, 14, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 20))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(20, width // 3))
        y1 = y0 + int(rng.integers(20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _tweet(rng: np.random.Generator, i: int) -> str:
    """A crisis tweet of `REALISTIC_TEXT_CHARS` characters: words, a mention, hashtags, a t.co
    link, often emoji, sometimes a retweet prefix."""
    low, high = REALISTIC_TEXT_CHARS
    target = int(rng.integers(low, high + 1))
    link = f"https://t.co/{int(rng.integers(0, 2**40)):010x}"
    tail = [str(rng.choice(MENTIONS)), str(rng.choice(TAGS)), link]
    if rng.random() < 0.6:
        tail.insert(2, "".join(rng.choice(EMOJI, size=int(rng.integers(1, 4)))))
    head = "RT @localnews: " if i % 3 == 0 else ""
    room = max(8, target - len(head) - len(" ".join(tail)) - 1)
    body = str(rng.choice(WORDS))
    while len(body) < room:
        word = str(rng.choice(WORDS))
        if len(body) + 1 + len(word) > room:
            break
        body += " " + word
    body = body.capitalize()
    text = f"{head}{body} {' '.join(tail)}"
    return text[:high] if len(text) > high else text.ljust(low, ".")


def _post_image(rng: np.random.Generator, kind: str, n: int) -> bytes:
    """The `n`-th new photo of a kind's mix."""
    sizes = POST_MIXES[kind].sizes
    make = _photo if kind == "realistic" else _image
    return make(rng, *sizes[n % len(sizes)])


def _post_text(rng: np.random.Generator, kind: str, i: int) -> str:
    return _tweet(rng, i) if kind == "realistic" else _text(rng, i)


def _check_kind(kind: str) -> None:
    if kind not in POST_MIXES:
        raise ValueError(f"unknown posts kind {kind!r}; known: {POST_KINDS}")


def make_posts(count: int, seed: int = 0, kind: str = DEFAULT_POST_KIND) -> list[Post]:
    """`count` posts (at least 1) of a kind (`POST_KINDS`), the same for the same arguments; made
    once per process (big JPEGs take a while) and shared."""
    _check_kind(kind)
    return list(_cached_posts(max(1, count), seed, kind))


@functools.lru_cache(maxsize=16)
def _cached_posts(count: int, seed: int, kind: str) -> tuple[Post, ...]:
    rng = np.random.default_rng(seed)
    return tuple(Post(_post_image(rng, kind, i), _post_text(rng, kind, i)) for i in range(count))


def describe(posts: list[Post], kind: str = DEFAULT_POST_KIND) -> dict[str, float | int | str]:
    """What the posts are, for the reports: their kind, count, JPEG and text sizes."""
    sizes = [len(p.image) for p in posts]
    chars = [len(p.text) for p in posts]
    return {
        "kind": kind,
        "posts": len(posts),
        "image_kib_mean": round(float(np.mean(sizes)) / 1024, 1),
        "image_kib_min": round(min(sizes) / 1024, 1),
        "image_kib_max": round(max(sizes) / 1024, 1),
        "text_chars_mean": round(float(np.mean(chars)), 1),
        "text_chars_min": min(chars),
        "text_chars_max": max(chars),
    }


def make_stream(
    count: int, repeat: float, seed: int, gap: int = 1, kind: str = DEFAULT_POST_KIND
) -> list[Post]:
    """`count` posts, every text new, a share `repeat` of them carrying a photo of an earlier post
    (docs/cache.md: the same photo shared with other words). A repeat reuses a photo at least
    `gap` posts back: in a closed loop at concurrency `gap` that post has been answered (and
    cached) when the repeat is sent. Deterministic for a given seed."""
    _check_kind(kind)
    if not 0.0 <= repeat < 1.0:
        raise ValueError(f"repeat is a share of the posts in [0, 1), not {repeat}")
    if count < 1 or gap < 1:
        raise ValueError("count and gap must be >= 1")
    rng = np.random.default_rng(seed)
    wanted = round(repeat * count)
    if wanted > count - gap:
        raise ValueError(
            f"{count} posts with a gap of {gap} hold at most {count - gap} repeats, not {wanted}"
        )
    repeats = set(rng.choice(np.arange(gap, count), size=wanted, replace=False).tolist())
    posts: list[Post] = []
    new_photos = 0
    for i in range(count):
        text = f"{_post_text(rng, kind, i)} #{seed}x{i}"  # never twice the same text
        if i in repeats:
            image = posts[int(rng.integers(0, i - gap + 1))].image
        else:
            image = _post_image(rng, kind, new_photos)
            new_photos += 1
        posts.append(Post(image, text))
    return posts
