"""A small CrisisMMD-shaped data set, made on the spot, whose photos and texts carry the label.

``make_dataset(folder, task, n)`` writes JPEG photos under ``folder/data_image/<event>/`` and one
annotation TSV per split (train/dev/test) in the research code's layout (or the plain CrisisMMD
v2.0 columns), and returns where they are. Each class has its own colour and shape in the photo
and its own words in the tweet (with filler words, jitter and random sizes around them), so even
random encoders give features a head can learn from. Used by tests/test_train.py and by the
serving tests (``trained_head`` makes a trained head file quickly).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from crisis_triton.contract.names import LABELS

RESEARCH_COLUMNS_12 = (
    "event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "label_text",
    "label_image", "label_text_image", "final_text", "LLaVA_text", "event_category", "split",
)  # fmt: skip
RESEARCH_COLUMNS_3 = (
    "event_name", "tweet_id", "image_id", "tweet_text", "image", "label", "final_text",
    "LLaVA_text", "event_category", "split",
)  # fmt: skip
CRISISMMD_COLUMNS_12 = RESEARCH_COLUMNS_12[:9]
CRISISMMD_COLUMNS_3 = RESEARCH_COLUMNS_3[:6]

# (colour, shape, words) per class index; more than any task has classes.
CLASS_SIGNAL = (
    ((220, 30, 30), "disc", "calm sunny quiet nothing happened"),
    ((30, 60, 220), "block", "flood water collapsed bridge emergency"),
    ((30, 190, 60), "bars", "volunteers donate food rescue teams"),
    ((230, 210, 30), "ring", "cars crushed vehicle wreck street"),
    ((200, 40, 200), "cross", "injured people hospital victims help"),
    ((30, 200, 200), "triangle", "power lines down outage utility"),
)
FILLER = "the a of in at on today now via please news update people city storm".split()
EVENTS = ("hurricane_harvey", "california_wildfires", "mexico_earthquake")
SPLIT_SHARES = (("train", 0.6), ("dev", 0.2), ("test", 0.2))


@dataclass(frozen=True)
class Dataset:
    image_root: Path
    tsv: dict[str, Path]  # split -> annotation file
    task: str

    def split_args(self) -> list[str]:
        """cache_features.py's --split options for this data set."""
        return [a for s, p in self.tsv.items() for a in ("--split", f"{s}={p}")]


def _labels_of(task: str) -> tuple[str, ...]:
    """The label strings the TSVs carry: task2 also uses the two labels it merges."""
    if task == "task2":
        return (*LABELS["task2"], "injured_or_dead_people", "missing_or_found_people")
    return LABELS[task]


def photo(cls: int, rng: random.Random) -> bytes:
    from PIL import Image, ImageDraw

    colour, shape, _ = CLASS_SIGNAL[cls % len(CLASS_SIGNAL)]
    w, h = rng.randint(48, 96), rng.randint(48, 96)
    grey = rng.randint(90, 160)
    img = Image.new("RGB", (w, h), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    x0, y0 = rng.randint(0, w // 4), rng.randint(0, h // 4)
    x1, y1 = w - rng.randint(0, w // 4), h - rng.randint(0, h // 4)
    if shape == "disc":
        draw.ellipse((x0, y0, x1, y1), fill=jitter)
    elif shape == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=jitter, width=max(3, w // 8))
    elif shape == "bars":
        for x in range(x0, x1, 10):
            draw.rectangle((x, y0, x + 5, y1), fill=jitter)
    elif shape == "cross":
        draw.rectangle(((x0 + x1) // 2 - 6, y0, (x0 + x1) // 2 + 6, y1), fill=jitter)
        draw.rectangle((x0, (y0 + y1) // 2 - 6, x1, (y0 + y1) // 2 + 6), fill=jitter)
    elif shape == "triangle":
        draw.polygon(((x0, y1), (x1, y1), ((x0 + x1) // 2, y0)), fill=jitter)
    else:
        draw.rectangle((x0, y0, x1, y1), fill=jitter)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tweet(cls: int, rng: random.Random) -> str:
    words = CLASS_SIGNAL[cls % len(CLASS_SIGNAL)][2].split()
    picked = rng.sample(words, 3) + rng.sample(FILLER, rng.randint(2, 5))
    rng.shuffle(picked)
    text = " ".join(picked)
    if rng.random() < 0.3:
        text = "RT " + text + " #" + words[0]
    if rng.random() < 0.2:
        text += " https://t.co/abc" + str(rng.randint(0, 999))
    return text


def make_dataset(
    folder: Path, task: str = "task1", n: int = 300, seed: int = 0, layout: str = "research"
) -> Dataset:
    """n posts, classes balanced (label strings cycling), split 60/20/20, in `layout`
    ("research": the research code's columns; "crisismmd": plain CrisisMMD v2.0 columns)."""
    if layout not in ("research", "crisismmd"):
        raise ValueError(f"layout {layout!r}: research or crisismmd")
    folder = Path(folder)
    rng = random.Random(seed)
    labels = _labels_of(task)
    index = {label: i for i, label in enumerate(LABELS[task])}
    merged = {"injured_or_dead_people": "affected_individuals",
              "missing_or_found_people": "affected_individuals"}  # fmt: skip
    if task == "task3":
        columns = RESEARCH_COLUMNS_3 if layout == "research" else CRISISMMD_COLUMNS_3
    else:
        columns = RESEARCH_COLUMNS_12 if layout == "research" else CRISISMMD_COLUMNS_12
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        cls = index[merged.get(label, label)]
        event = EVENTS[i % len(EVENTS)]
        tweet_id = str(900000000000000000 + seed * 100000 + i)
        rel = f"data_image/{event}/{tweet_id}_0.jpg"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo(cls, rng))
        text = tweet(cls, rng)
        values = {
            "event_name": event,
            "tweet_id": tweet_id,
            "image_id": f"{tweet_id}_0",
            "tweet_text": text,
            "image": rel,
            "label": label,
            "label_text": label,
            "label_image": label,
            "label_text_image": "Positive",
            "final_text": text,
            "LLaVA_text": f" The image shows a {CLASS_SIGNAL[cls][1]}.",
            "event_category": "disaster",
            "split": "",
        }
        rows.append(values)
    rng.shuffle(rows)
    tsv: dict[str, Path] = {}
    start = 0
    for split, share in SPLIT_SHARES:
        end = n if split == "test" else start + int(n * share)
        path = folder / f"{task}_{split}.tsv"
        lines = ["\t".join(columns)]
        lines += ["\t".join({**r, "split": split}[c] for c in columns) for r in rows[start:end]]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tsv[split] = path
        start = end
    return Dataset(folder, tsv, task)


# The encoders of tests/conftest.py TINY_EXPORT_ARGS (export.py's options, cache_features.py's too).
TINY_ENCODER_ARGS = ("--random-weights", "--size", "tiny", "--seed", "3")


def cache_dataset(data: Dataset, out: Path, *extra: str) -> Path:
    """cache_features.py over `data` with the tiny random encoders; -> the cache folder."""
    from crisis_triton.train.cache_features import parse_request
    from crisis_triton.train.caching import cache_features

    request = parse_request([*data.split_args(), "--image-root", str(data.image_root),
                             "--out", str(out), *TINY_ENCODER_ARGS, *extra])  # fmt: skip
    return cache_features(request).out


def trained_head(
    folder: Path,
    head: str = "guided_ca_diff",
    task: str = "task1",
    n: int = 150,
    extra: tuple[str, ...] = (),
) -> Path:
    """A head file trained on a fresh data set (tiny random encoders, a few seconds for the
    paper's heads): export it with TINY_ENCODER_ARGS + ``--head HEAD --head-weights TASK=FILE``.
    `extra`: more train_head.py options (e.g. "--modality-dropout", "0.3")."""
    from crisis_triton.train.train_head import parse_request
    from crisis_triton.train.training import train_head

    folder = Path(folder)
    data = make_dataset(folder / "data", task, n)
    cache = cache_dataset(data, folder / "cache")
    out = folder / f"{task}_{head}.pt"
    sizes = ("--cma-dim", "64", "--cma-layers", "1") if head == "cma_clip" else ()
    request = parse_request(["--features", str(cache), "--task", task, "--head", head,
                             "--out", str(out), "--epochs", "4", "--patience", "2",
                             "--threads", "1", *sizes, *extra])  # fmt: skip
    return train_head(request).out
