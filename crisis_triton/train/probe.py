"""A text-only reference model: how well the text alone answers a feature cache's posts.

``text_probe(cache, task)`` fits a logistic regression (a linear softmax layer, full-batch L-BFGS)
on the cached pooled text features of the train split, picks its L2 strength on dev accuracy and
scores the test split. It is the yardstick for a head's text-only answers (``test_text_only`` of
a head file): a head that answers posts without an image as well as this probe has learnt from
the text all that a linear model on the same features finds there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from crisis_triton.contract.names import LABELS
from crisis_triton.train.data import encode_labels
from crisis_triton.train.features import FeatureCache
from crisis_triton.train.metrics import classification_metrics

if TYPE_CHECKING:
    import torch

PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # the L2 strengths tried; the best dev accuracy is kept


def text_probe(cache: FeatureCache, task: str, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on the pooled text features. -> {"dev": metrics, "test": metrics,
    "l2": the strength kept} (classification_metrics; the first of equal dev accuracies kept)."""
    import torch

    data = {}
    for name in ("train", "dev", "test"):
        split = cache.split(name, ("text_features",))
        x = torch.from_numpy(np.asarray(split.arrays["text_features"], dtype=np.float32))
        data[name] = (x, encode_labels(split.labels, task, f"{cache.folder} ({name})"))
    x_train, y_train = data["train"]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardised: one scale for every L2
    best: dict[str, Any] = {}
    for l2 in PROBE_L2:
        layer = _fit((x_train - mean) / std, torch.from_numpy(y_train), task, l2, seed)
        with torch.no_grad():
            scores = {
                name: classification_metrics(y, layer((x - mean) / std).argmax(1).numpy())
                for name, (x, y) in data.items()
                if name != "train"
            }
        if not best or scores["dev"]["accuracy"] > best["dev"]["accuracy"]:
            best = {**scores, "l2": l2}
    return best


def _fit(x: torch.Tensor, y: torch.Tensor, task: str, l2: float, seed: int) -> torch.nn.Linear:
    """A linear softmax layer fitted to (x, y) by full-batch L-BFGS with L2 strength `l2`."""
    import torch

    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], len(LABELS[task]))
    opt = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer
