"""Preprocessing: the research cleaning, CLIP tokenisation, image decoding/resizing. No torch."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from crisis_triton.preprocess.posts import (
    DEFAULT_ASSETS,
    PreprocessError,
    Preprocessor,
    PreprocessSpec,
    TextPreprocessor,
    clean_text,
    clip_vocab_and_merges,
    compose_text,
    decode_image,
    preprocess_image,
)

SPEC = PreprocessSpec()

TRICKY_TEXTS = [
    "a photo of a cat",
    "RT @RedCross: Flood waters rising in #Houston 🌊🚒🙏 https://t.co/AbC123 please share",
    "Help needed https://t.co/x1\nShelters open at the stadium #HurricaneHarvey",
    "Two links http://a.co/1 and https://b.co/2\n\nnext paragraph",
    "rt lower-case rt is not a retweet prefix",
    "#prayfor#mexico #earthquake ##double",
    "",
    "   \t\n ",
    "日本語のテキスト 地震が発生しました",
    "زلزال قوي يضرب المنطقة",
    "Землетрясение в Мексике",
    "भूकंप से भारी नुकसान",
    "Ünïcödé café naïve — “quotes” … ½ ①",
    "emoji only 👨‍👩‍👧‍👦🏳️‍🌈",
    "word " * 200,
    "x\x00y NUL inside",
    "can't won't it's we're they've I'm you'll he'd",
    "1234567890 3.14 $100 @user_name",
]


def test_reference_ids() -> None:
    """The reference model's documented example."""
    ids = TextPreprocessor(SPEC)(["a photo of a cat"])[0]
    assert ids[:8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert ids.shape == (77,) and ids.dtype == np.int64


def test_same_ids_as_transformers_clip_tokenizer() -> None:
    transformers = pytest.importorskip("transformers")
    vocab, merges = clip_vocab_and_merges(DEFAULT_ASSETS / SPEC.vocab_file)
    hf = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    ours = TextPreprocessor(SPEC)([clean_text(t, SPEC) for t in TRICKY_TEXTS])
    for text, row in zip(TRICKY_TEXTS, ours):
        theirs = hf(clean_text(text, SPEC), padding="max_length", truncation=True, max_length=77)
        assert row.tolist() == theirs["input_ids"], text


def test_truncation_keeps_end_token_and_padding_is_eos() -> None:
    long_ids, empty_ids = TextPreprocessor(SPEC)(["word " * 200, ""])
    assert long_ids[0] == 49406 and long_ids[-1] == 49407 and (long_ids[1:-1] != 49407).all()
    assert empty_ids[:2].tolist() == [49406, 49407] and (empty_ids[1:] == 49407).all()


@pytest.mark.parametrize(
    ("raw", "cleaned"),
    [
        ("RT @user: flood", "@user: flood"),
        ("RT  \n multi-space", "multi-space"),
        ("ART is not RT", "ART is not RT"),
        ("mid RT stays", "mid RT stays"),
        ("see https://t.co/abc more words\nnext line", "see next line"),
        ("see http://t.co/abc\r\n\r\nnext", "see next"),
        ("a https://x.y b\nc https://z.w d\ne", "a c e"),
        ("#tag1 #tag2 keep", "tag1 tag2 keep"),
        ("no url here", "no url here"),
    ],
)
def test_research_cleaning(raw: str, cleaned: str) -> None:
    assert clean_text(raw, SPEC) == cleaned


def test_caption_appended_without_separator_then_cleaned_like_research() -> None:
    assert compose_text("Flood downtown.", "A flooded street.", SPEC) == (
        "Flood downtown.A flooded street."
    )
    # The research quirk is kept: a link eats the rest of its line, caption included.
    text = compose_text("Flood https://t.co/x", " A flooded street.", SPEC)
    assert clean_text(text, SPEC) == "Flood "
    assert compose_text("tweet", None, SPEC) == "tweet"
    assert len(compose_text("x" * 1_000_000, None, SPEC)) == SPEC.max_text_chars


def _encode(img: Image.Image, fmt: str = "PNG", **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_pixels_shape_range_and_normalisation() -> None:
    pixels = preprocess_image(_encode(Image.new("RGB", (300, 300), (255, 0, 51))), SPEC)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    assert np.allclose(pixels[0], 1.0) and np.allclose(pixels[1], -1.0)
    assert np.allclose(pixels[2], (51 / 255 - 0.5) / 0.5, atol=1e-6)


def test_pad_to_square_centres_the_image_with_black() -> None:
    # 400x200 white: padded to 400x400 with 100 black rows on top and bottom.
    pixels = preprocess_image(_encode(Image.new("RGB", (400, 200), (255, 255, 255))), SPEC)
    column = pixels[0, :, 112]
    assert np.allclose(column[:40], -1.0) and np.allclose(column[-40:], -1.0)
    assert np.allclose(column[80:144], 1.0)
    assert np.allclose(pixels[0], pixels[0][::-1], atol=1e-6)  # centred: symmetric


def test_resize_is_pil_bilinear_with_antialias_and_centre_crop() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (500, 500, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    expected = np.asarray(img.resize((228, 228), Image.BILINEAR), dtype=np.float32)[2:226, 2:226]
    expected = ((expected / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    got = preprocess_image(_encode(img), SPEC)
    assert np.abs(got - expected).max() < 1e-6
    # A plain (non-antialiased) nearest/bilinear sampling would differ a lot on noise.
    naive = arr[::2, ::2][:228, :228][2:226, 2:226].astype(np.float32)
    assert np.abs(got - ((naive / 255 - 0.5) / 0.5).transpose(2, 0, 1)).mean() > 0.1


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 100))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    decoded = decode_image(_encode(img, "JPEG", exif=exif.tobytes(), quality=95), SPEC)
    assert decoded.size == (100, 200)
    top = np.asarray(decoded)[:100].mean()
    bottom = np.asarray(decoded)[100:].mean()
    assert top > 200 and bottom < 50  # left half ends on top after rotating 90 degrees CW


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.new("L", (64, 48), 128),
        lambda: Image.new("LA", (64, 48), (128, 10)),
        lambda: Image.new("RGBA", (64, 48), (10, 20, 30, 0)),
        lambda: Image.new("RGB", (64, 48), (128, 128, 128)).convert("P"),
        lambda: Image.new("1", (64, 48), 1),
    ],
    ids=["L", "LA", "RGBA", "P", "1"],
)
def test_modes_convert_to_rgb(make) -> None:
    img = decode_image(_encode(make()), SPEC)
    assert img.mode == "RGB" and img.size == (64, 48)


def test_rgba_alpha_dropped_not_composited() -> None:
    img = decode_image(_encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0))), SPEC)
    assert np.asarray(img)[0, 0].tolist() == [10, 20, 30]


def test_cmyk_jpeg_and_16_bit_png() -> None:
    cmyk = decode_image(_encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG"), SPEC)
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[..., 0].mean() > 200
    arr16 = np.full((32, 32), 40000, dtype=np.uint16)
    img16 = decode_image(_encode(Image.fromarray(arr16)), SPEC)
    assert img16.mode == "RGB"
    assert abs(int(np.asarray(img16)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1  # scaled


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = decode_image(buf.getvalue(), SPEC)
    r, g, b = np.asarray(img)[8, 8]
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, r"corrupt or truncated \(a PNG header"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, r"corrupt or truncated \(a JPEG header"),
        (b"not an image at all", "image bytes are text, not an image"),
        (b"/etc/passwd", "image bytes are text, not an image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", r"are SVG \(vector graphics\)"),
        (b"<?xml version='1.0'?>\n<svg/>", r"are SVG \(vector graphics\)"),
        (b"<html><body>hi</body></html>", "are HTML/XML text"),
        (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "are a PDF document"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "are PostScript/EPS"),
        (bytes(range(256)) * 4, "not a recognised image format"),
    ],
)
def test_bad_images_raise_a_specific_error(data: bytes, message: str) -> None:
    with pytest.raises(PreprocessError, match=message):
        preprocess_image(data, SPEC)


def test_only_the_allowed_decoders_open_request_bytes() -> None:
    """A real image in a format outside `image_formats` is never decoded (ICO: not recognised);
    one Pillow knows but the spec leaves out is refused by name."""
    ico = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), "ICO")
    with pytest.raises(PreprocessError, match="not a recognised image format"):
        preprocess_image(ico, SPEC)
    bmp = _encode(Image.new("RGB", (16, 16), (1, 2, 3)), "BMP")
    assert preprocess_image(bmp, SPEC).shape == (3, 224, 224)
    no_bmp = PreprocessSpec(image_formats=("JPEG", "PNG"))
    with pytest.raises(PreprocessError, match="image format BMP is not accepted"):
        preprocess_image(bmp, no_bmp)
    assert PreprocessSpec.from_json(no_bmp.to_json()) == no_bmp


def test_truncated_jpeg_and_limits() -> None:
    jpeg = _encode(Image.new("RGB", (256, 256), (1, 2, 3)), "JPEG")
    with pytest.raises(PreprocessError, match="corrupt or truncated"):
        preprocess_image(jpeg[: len(jpeg) // 2], SPEC)
    png = bytearray(
        _encode(Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3)))
    )
    idat = png.index(b"IDAT") + 8
    png[idat : idat + 40] = b"\xff" * 40  # valid container, corrupt compressed data
    with pytest.raises(PreprocessError, match="corrupt or truncated"):
        preprocess_image(bytes(png), SPEC)
    small = PreprocessSpec(max_image_bytes=100, max_image_pixels=1000)
    with pytest.raises(PreprocessError, match="over the limit of 100 bytes"):
        preprocess_image(jpeg, small)
    with pytest.raises(PreprocessError, match="pixels"):
        preprocess_image(_encode(Image.new("L", (100, 100))), PreprocessSpec(max_image_pixels=1000))


def test_spec_round_trips_through_json() -> None:
    assert PreprocessSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_json('{"image_sise": 3}')


def test_preprocessor_batches_and_has_no_torch_dependency() -> None:
    img = _encode(Image.new("RGB", (50, 80), (9, 9, 9)))
    pixels, ids = Preprocessor(SPEC)([img, img], ["a", "b"], [None, "c"])
    assert pixels.shape == (2, 3, 224, 224) and ids.shape == (2, 77)
    code = (
        "import sys, crisis_triton.preprocess.posts as p; p.Preprocessor(p.PreprocessSpec());"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=DEFAULT_ASSETS.parents[1])
