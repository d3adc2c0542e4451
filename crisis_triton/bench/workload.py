"""The one fixed set of synthetic posts every path is measured on: encoded JPEG bytes + tweet text.

Images have the sizes of typical tweet photos (smooth gradients plus noise, so JPEG sizes are
realistic: tens of kB); texts look like crisis tweets (retweet prefix, hashtags, links, emoji).
Deterministic for a given seed and count.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZES = ((640, 480), (800, 600), (1024, 768), (480, 640), (1200, 675), (600, 600))
WORDS = (
    "flood water rising downtown bridge collapsed road closed rescue teams volunteers "
    "shelter donations power outage hurricane earthquake wildfire smoke evacuation "
    "damaged houses cars stranded families need help please share update tonight"
).split()
TAGS = ("#HurricaneHarvey", "#Irma", "#MexicoEarthquake", "#CaliforniaWildfires", "#flood")


@dataclass(frozen=True)
class Post:
    image: bytes
    text: str


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


def make_posts(count: int, seed: int = 0) -> list[Post]:
    rng = np.random.default_rng(seed)
    return [Post(_image(rng, *SIZES[i % len(SIZES)]), _text(rng, i)) for i in range(max(1, count))]


def describe(posts: list[Post]) -> dict[str, float | int]:
    sizes = [len(p.image) for p in posts]
    return {
        "posts": len(posts),
        "image_kib_mean": round(float(np.mean(sizes)) / 1024, 1),
        "text_chars_mean": round(float(np.mean([len(p.text) for p in posts])), 1),
    }


def make_stream(count: int, repeat: float, seed: int, gap: int = 1) -> list[Post]:
    """`count` posts, every text new, a share `repeat` of them carrying a photo of an earlier post
    (docs/cache.md: the same photo shared with other words). A repeat reuses a photo at least
    `gap` posts back: in a closed loop at concurrency `gap` that post has been answered (and
    cached) when the repeat is sent. Deterministic for a given seed."""
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
        text = f"{_text(rng, i)} #{seed}x{i}"  # never twice the same text
        if i in repeats:
            image = posts[int(rng.integers(0, i - gap + 1))].image
        else:
            image = _image(rng, *SIZES[new_photos % len(SIZES)])
            new_photos += 1
        posts.append(Post(image, text))
    return posts
