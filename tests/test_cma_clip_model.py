"""The cma_clip head and the encoders' token sequences (models/cma_clip.py, models/encoders.py)."""

from __future__ import annotations

import pytest
import torch

from crisis_triton.contract.spec import LABELS
from crisis_triton.models.cma_clip import (
    CMAClipConfig,
    CMAClipHead,
    build_multitask_cma_clip,
    random_cma_clip_head,
)
from crisis_triton.models.encoders import DEFAULT_ENCODERS, EncoderLoadError, Encoders, hf_encoders
from crisis_triton.preprocess.posts import PreprocessSpec, TextPreprocessor

TEXTS = ["flood water in the streets", "", "a photo of a cat " * 30, "RT donate now #help"]


@pytest.fixture(scope="module")
def enc() -> Encoders:
    return hf_encoders(DEFAULT_ENCODERS, True, "tiny", seed=5)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.from_numpy(TextPreprocessor(PreprocessSpec())(TEXTS))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(len(TEXTS), 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_image_tokens_shape_and_cls_is_pooled_feature(enc: Encoders, pixels: torch.Tensor) -> None:
    with torch.no_grad():
        tokens = enc.image_tokens(pixels)
        pooled = enc.image(pixels)
    assert tokens.shape == (len(TEXTS), 1 + (224 // 32) ** 2, enc.config.image_dim)
    torch.testing.assert_close(tokens[:, 0], pooled, rtol=0, atol=1e-6)


def test_text_tokens_mask_and_eos_is_pooled_feature(enc: Encoders, ids: torch.Tensor) -> None:
    with torch.no_grad():
        tokens, mask = enc.text_tokens(ids)
        pooled = enc.text(ids)
    assert tokens.shape == (len(TEXTS), 77, enc.config.text_dim)
    assert mask.dtype == torch.float32 and mask.shape == (len(TEXTS), 77)
    eos = ids.argmax(dim=1)  # the first 49407 of the OpenAI vocabulary
    for b in range(len(TEXTS)):
        assert mask[b, : eos[b] + 1].eq(1).all() and mask[b, eos[b] + 1 :].eq(0).all()
        torch.testing.assert_close(tokens[b, eos[b]], pooled[b], rtol=0, atol=1e-6)
    assert mask[1].sum() == 2  # empty text: SOT + EOS
    assert mask[2].sum() == 77  # truncated: EOS at the last position


def test_openclip_encoders_refused_with_reason() -> None:
    fake = Encoders(torch.nn.Identity(), torch.nn.Identity(), None, "OpenCLIP x", False)  # type: ignore[arg-type]
    with pytest.raises(EncoderLoadError, match="cma_clip needs Hugging Face CLIP encoders"):
        fake.token_encoders()


@pytest.fixture(scope="module")
def inputs(enc: Encoders, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        img = enc.image_tokens(pixels)
        txt, mask = enc.text_tokens(ids)
    present = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    return img, txt, mask, present


def _head(enc: Encoders, task: str = "task2", seed: int = 7) -> CMAClipHead:
    return random_cma_clip_head(
        enc.config.image_dim, enc.config.text_dim, task, seed, dim=32, heads=4
    )


def test_shapes_and_probabilities(enc: Encoders, inputs: tuple[torch.Tensor, ...]) -> None:
    head = _head(enc)
    with torch.no_grad():
        probs, weights = head(*inputs)
    assert probs.shape == (4, len(LABELS["task2"])) and weights.shape == (4, 2)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    torch.testing.assert_close(weights.sum(1), torch.ones(4))
    assert (weights[[0, 1, 3], 0] > 0).all()  # the image counts where present


def test_masked_text_tokens_change_nothing(enc: Encoders, inputs: tuple[torch.Tensor, ...]) -> None:
    head = _head(enc)
    img, txt, mask, present = inputs
    noisy = txt + 100.0 * (1 - mask).unsqueeze(-1) * torch.randn_like(txt)
    assert not torch.equal(noisy, txt)
    with torch.no_grad():
        a = head(img, txt, mask, present)
        b = head(img, noisy, mask, present)
        # and unmasking them does change the answer (the mask is what hides them)
        c = head(img, noisy, torch.ones_like(mask), present)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert not torch.allclose(a[0][0], c[0][0], atol=1e-4)


def test_absent_image_has_weight_zero_and_its_tokens_are_irrelevant(
    enc: Encoders, inputs: tuple[torch.Tensor, ...]
) -> None:
    head = _head(enc)
    img, txt, mask, present = inputs
    other = img.clone()
    other[2] = torch.randn_like(other[2]) * 50.0  # row 2: image_present 0
    zeros = img.clone()
    zeros[2] = 0.0
    with torch.no_grad():
        a = head(img, txt, mask, present)
        b = head(other, txt, mask, present)
        z = head(zeros, txt, mask, present)
        with_image = head(img, txt, mask, torch.ones_like(present))
    assert a[1][2, 0] == 0.0 and a[1][2, 1] == 1.0
    for x, y, w in zip(a, b, z):
        torch.testing.assert_close(x[2], y[2], rtol=0, atol=1e-6)
        torch.testing.assert_close(x[2], w[2], rtol=0, atol=1e-6)
    assert not torch.allclose(a[0][2], with_image[0][2], atol=1e-4)


def test_batch_invariance(enc: Encoders, inputs: tuple[torch.Tensor, ...]) -> None:
    head = _head(enc, "task3")
    with torch.no_grad():
        probs, weights = head(*inputs)
        for b in range(4):
            p1, w1 = head(*(x[b : b + 1] for x in inputs))
            torch.testing.assert_close(p1[0], probs[b], rtol=0, atol=1e-6)
            torch.testing.assert_close(w1[0], weights[b], rtol=0, atol=1e-6)
        # reversed order: each row keeps its answer
        p_rev, _ = head(*(x.flip(0) for x in inputs))
    torch.testing.assert_close(p_rev.flip(0), probs, rtol=0, atol=1e-6)


def test_seeded_and_dropout_only_in_training(
    enc: Encoders, inputs: tuple[torch.Tensor, ...]
) -> None:
    a, b, c = _head(enc, seed=3), _head(enc, seed=3), _head(enc, seed=4)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    with torch.no_grad():
        e1, e2 = a(*inputs)[0], a(*inputs)[0]
        torch.testing.assert_close(e1, e2, rtol=0, atol=0)
        a.train()
        t1 = a(*inputs)[0]
    assert not torch.allclose(t1, e1, atol=1e-5)  # dropout 0.1 acts in training


def test_multitask_wrapper_order(enc: Encoders, inputs: tuple[torch.Tensor, ...]) -> None:
    heads = {t: _head(enc, t, seed=i) for i, t in enumerate(("task1", "task2"))}
    multi = build_multitask_cma_clip(heads, ["task1", "task2"])
    with torch.no_grad():
        out = multi(*inputs)
        p1, w1 = heads["task1"](*inputs)
        p2, w2 = heads["task2"](*inputs)
    for x, y in zip(out, (p1, p2, w1, w2)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="multiple of heads"):
        CMAClipConfig(8, 8, 2, dim=30, heads=4)
    with pytest.raises(ValueError, match="unknown task"):
        random_cma_clip_head(8, 8, "task9", 0)
