"""A CrisisMMD-shaped data set of realistic difficulty for text-only answers: some posts' tweets
or photos say nothing about the post's class.

tests/crisis_data.py's posts carry their label in both the photo and the tweet, so a text-only
model is as good as a full one (about 1.0). In CrisisMMD a tweet often says little ("look at
this #harvey") and a photo may show nothing of the event. ``make_mixed_dataset`` writes
tests/crisis_data.py's data set and then, independently per post, replaces its tweet by filler
words alone with probability `text_noise` and its photo by a blank one with probability
`image_noise` (the label stays). With 0.25 each on a binary task, text alone can reach about
0.875 (a vague tweet is a coin flip) and the full post about 0.97 (both vague: 1 post in 16): the
image is worth learning, and a head that leans on it answers text-only posts worse than a model
of the text alone. Used by tests/test_text_only_training.py and benchmarks/text_only_sweep.py.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from tests.crisis_data import FILLER, Dataset, make_dataset

TEXT_NOISE = 0.25
IMAGE_NOISE = 0.25


def make_mixed_dataset(
    folder: Path,
    task: str = "task1",
    n: int = 600,
    seed: int = 0,
    text_noise: float = TEXT_NOISE,
    image_noise: float = IMAGE_NOISE,
) -> Dataset:
    """make_dataset(folder, task, n, seed), then each post's tweet (and final_text) replaced by
    filler words with probability `text_noise`, and its photo by a blank grey one with
    probability `image_noise`; labels unchanged. -> the data set."""
    data = make_dataset(folder, task, n, seed)
    rng = random.Random(seed + 7919)
    for path in data.tsv.values():
        lines = path.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t")
        col = {name: i for i, name in enumerate(header)}
        rows = []
        for line in lines[1:]:
            values = line.split("\t")
            if rng.random() < text_noise:
                text = " ".join(rng.sample(FILLER, rng.randint(3, 7)))
                values[col["tweet_text"]] = text
                if "final_text" in col:
                    values[col["final_text"]] = text
            if rng.random() < image_noise:
                (data.image_root / values[col["image"]]).write_bytes(blank_photo(rng))
            rows.append("\t".join(values))
        path.write_text("\n".join([lines[0], *rows]) + "\n", encoding="utf-8")
    return data


def blank_photo(rng: random.Random) -> bytes:
    """A grey JPEG of a random size and shade: a photo that shows nothing of any class."""
    from PIL import Image

    grey = rng.randint(90, 160)
    img = Image.new("RGB", (rng.randint(48, 96), rng.randint(48, 96)), (grey, grey, grey))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
