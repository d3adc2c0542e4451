"""Preprocessing of one crisis post: text cleaning, CLIP tokenisation, image decoding and resizing.

This module is the single implementation used everywhere: in process (export verification, tests,
benchmarks) and inside Triton (it is copied verbatim next to the `preprocess` python-backend model).
It therefore depends on numpy, Pillow and `tokenizers` only: no torch, and nothing else of this
project. Its parameters are data (`PreprocessSpec`), written as `preprocess.json` beside the model.

Fidelity to the research code (see docs/fidelity.md):
- text = tweet_text + caption (no separator), then: leading "RT " removed, everything from the first
  http(s):// link to the end of its line removed together with the line breaks right after it, every
  "#" removed. Kept exactly, quirks included (a link eats the rest of its line, caption included).
- CLIP BPE (the OpenAI vocabulary), <|startoftext|> ... <|endoftext|>, padded/truncated to 77.
- image: RGB, padded to a black square (image centred), resized to 228x228 with PIL's BILINEAR
  filter (antialiased when shrinking), centre-cropped to 224x224, scaled to 0..1 and normalised with
  mean = std = 0.5.
Deliberate differences from the research code, all for robustness of a server: EXIF orientation
is applied, only the first frame of an animated image is used, 16-bit images are scaled to 8 bits
instead of clipped, and decoding is bounded by byte and pixel limits.
`fast_image` (off by default; export.py --fast-image, gated: docs/precision.md) trades exactness
for CPU: DCT-scaled JPEG decoding and the photo resized before padding (resize_then_pad).
"""

from __future__ import annotations

import codecs
import enum
import gzip
import io
import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The split pattern of CLIP's BPE tokenizer (OpenAI's simple_tokenizer, transformers').
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


# The counter the preprocess model (inside Triton) adds every refused post to, by `reason`.
REJECTED_POSTS_METRIC = "crisis_rejected_posts_total"


class RejectReason(str, enum.Enum):
    """Why a post was refused: the stable values of the `reason` label of REJECTED_POSTS_METRIC,
    declared once. Alert rules and dashboards (deploy/monitoring/) use them: add, never rename."""

    EMPTY = "empty"  # 0 bytes of image
    TOO_LARGE = "too_large"  # over max_image_bytes
    TOO_MANY_PIXELS = "too_many_pixels"  # over max_image_pixels
    DECOMPRESSION_BOMB = "decompression_bomb"  # over Pillow's own decompression-bomb limit
    NOT_AN_IMAGE = "not_an_image"  # text, SVG, PDF, unknown bytes, a format no decoder allowed
    FORMAT_NOT_ACCEPTED = "format_not_accepted"  # a known image format left out of image_formats
    CORRUPT = "corrupt"  # an image header, then unreadable or truncated data
    INVALID_UTF8 = "invalid_utf8"  # text or caption
    BATCH_MISMATCH = "batch_mismatch"  # inputs of one request with different batch sizes
    INTERNAL = "internal"  # an unforeseen error while preprocessing (a bug: see the log)
    NO_IMAGE = "no_image"  # a text-only post to a head that cannot answer it (docs/text-only.md)
    NO_TEXT = "no_text"  # a request without its text input (an image-only post sends "")


class PreprocessError(ValueError):
    """A request's input cannot be preprocessed; the message names the problem, `reason` says
    which kind of problem (the label the server counts it under)."""

    def __init__(self, message: str, *, reason: RejectReason) -> None:
        super().__init__(message)
        self.reason = RejectReason(reason)

    def __reduce__(self) -> tuple[object, ...]:  # pickling (process pools) keeps the reason
        return (_preprocess_error, (str(self), self.reason.value))


def _preprocess_error(message: str, reason: str) -> PreprocessError:
    return PreprocessError(message, reason=RejectReason(reason))


@dataclass(frozen=True)
class PreprocessSpec:
    """Every preprocessing parameter, declared once; written as preprocess.json beside the model."""

    image_size: int = 224
    resize_size: int = 228
    pad_to_square: bool = True
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    context_length: int = 77
    vocab_file: str = "bpe_simple_vocab_16e6.txt.gz"
    bos_token: str = "<|startoftext|>"
    eos_token: str = "<|endoftext|>"
    # Research-code text cleaning, applied in this order with Python's `re.sub`.
    clean_patterns: tuple[tuple[str, str], ...] = (
        (r"^RT[\s]+", ""),
        (r"https?:\/\/.*[\r\n]*", ""),
        (r"#", ""),
    )
    caption_separator: str = ""
    apply_exif_orientation: bool = True
    # The cheaper image path (crisis-export --fast-image, behind the precision gate; see
    # docs/precision.md): JPEG decoded DCT-scaled to at least FAST_IMAGE_DECODE_FACTOR times the
    # resize target, the photo resized before it is padded. Off: the exact path (the default).
    fast_image: bool = False
    # Limits of one request (the server refuses the request, naming the limit; text is cut).
    max_image_bytes: int = 5 * 1024 * 1024  # a tweet photo is at most 5 MB (deploy/sizing.py)
    max_image_pixels: int = 40_000_000
    max_text_chars: int = 20_000
    # Pillow decoders allowed to open request bytes. Others (EPS, which runs Ghostscript; PSD,
    # ICO, ...) are never tried: a request cannot reach a decoder that reads files or runs tools.
    image_formats: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
    extra: dict[str, str] = field(default_factory=dict)
    # Posts without an image (docs/text-only.md): answered with zero pixels and image_present 0
    # when the served head can answer them (cma_clip; the paper's head trained with modality
    # dropout), else refused with `no_image_reason`.
    image_optional: bool = False
    no_image_reason: str = "the served head was not trained for posts without an image"
    # Text at its own length (docs/fidelity.md): the served preprocess model trims each request's
    # ids to its longest row's first <|endoftext|> (trim_ids); with text_lengths (ascending, the
    # last = context_length) rounded up to the next of them, for backends without ragged batches.
    # Off: [N, context_length] ids, as before (an older preprocess.json loads so).
    trim_text: bool = False
    text_lengths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Checked when made, so a hand-edited preprocess.json stops the model from loading with
        a clear message instead of failing every request."""
        for name in ("max_image_bytes", "max_image_pixels", "max_text_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if Image.MAX_IMAGE_PIXELS and self.max_image_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"max_image_pixels {self.max_image_pixels} is over Pillow's decompression-bomb "
                f"limit ({Image.MAX_IMAGE_PIXELS} pixels), which refuses such images first"
            )
        if isinstance(self.image_formats, str) or not self.image_formats:
            raise ValueError(f"image_formats must be a list of Pillow format names, not "
                             f"{self.image_formats!r}")  # fmt: skip
        formats = tuple(str(f).upper() for f in self.image_formats)
        Image.init()
        unknown = [f for f in formats if f not in Image.OPEN]
        if unknown:
            known = ", ".join(sorted(Image.OPEN))
            raise ValueError(f"image_formats: Pillow cannot open {unknown}; it knows {known}")
        object.__setattr__(self, "image_formats", formats)
        lengths = tuple(int(n) for n in self.text_lengths)
        ascending = list(lengths) == sorted(set(lengths))
        if lengths and (not ascending or lengths[0] < 2 or lengths[-1] != self.context_length):
            raise ValueError(
                f"text_lengths must ascend from >= 2 to context_length {self.context_length}, "
                f"not {list(self.text_lengths)}"
            )
        object.__setattr__(self, "text_lengths", lengths)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PreprocessSpec:
        raw = json.loads(text)
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {unknown}")
        for key in ("mean", "std"):
            if key in raw:
                raw[key] = tuple(raw[key])
        if "image_formats" in raw:
            raw["image_formats"] = tuple(raw["image_formats"])
        if "text_lengths" in raw:
            raw["text_lengths"] = tuple(raw["text_lengths"])
        if "clean_patterns" in raw:
            raw["clean_patterns"] = tuple(tuple(p) for p in raw["clean_patterns"])
        return cls(**raw)

    @property
    def crop_offset(self) -> int:
        return (self.resize_size - self.image_size) // 2


DEFAULT_ASSETS = Path(__file__).resolve().parent / "assets"


# ----------------------------------------------------------------------------------------- text


def clean_text(text: str, spec: PreprocessSpec) -> str:
    """The research code's cleaning, in its order (see the module docstring)."""
    for pattern, repl in spec.clean_patterns:
        text = re.sub(pattern, repl, text)
    return text


def compose_text(tweet: str, caption: str | None, spec: PreprocessSpec) -> str:
    """tweet + caption (the paper's LLaVA image description), truncated to max_text_chars."""
    text = tweet if not caption else tweet + spec.caption_separator + caption
    # Very long text is cut before tokenisation (77 tokens never need more than a few hundred).
    return text[: spec.max_text_chars]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges exactly as OpenAI's simple_tokenizer builds them from the BPE file."""
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, [(a, b) for a, b in merges]


@lru_cache(maxsize=4)
def build_tokenizer(bpe_path: str):  # -> tokenizers.Tokenizer
    """CLIP BPE with `tokenizers`, built as transformers' CLIPTokenizer builds it (offline)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = clip_vocab_and_merges(Path(bpe_path))
    tok = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token="<|endoftext|>",
        )
    )
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tok


class TextPreprocessor:
    """clean + tokenise a batch of texts into [N, context_length] int64 ids."""

    def __init__(self, spec: PreprocessSpec, assets_dir: Path = DEFAULT_ASSETS) -> None:
        self.spec = spec
        path = Path(assets_dir) / spec.vocab_file
        if not path.is_file():
            raise FileNotFoundError(f"CLIP BPE vocabulary not found: {path}")
        self.tokenizer = build_tokenizer(str(path))
        self.bos_id = self.tokenizer.token_to_id(spec.bos_token)
        self.eos_id = self.tokenizer.token_to_id(spec.eos_token)

    def __call__(self, texts: list[str]) -> np.ndarray:
        length = self.spec.context_length
        cleaned = [clean_text(t, self.spec) for t in texts]
        encodings = self.tokenizer.encode_batch(cleaned, add_special_tokens=False)
        ids = np.full((len(texts), length), self.eos_id, dtype=np.int64)  # pad = <|endoftext|>
        for row, enc in zip(ids, encodings):
            body = enc.ids[: length - 2]
            row[0] = self.bos_id
            row[1 : 1 + len(body)] = body
            row[1 + len(body)] = self.eos_id
        return ids


# The lengths (in tokens) text is padded up to where a backend cannot batch ragged requests
# (onnxruntime, openvino, tensorrt flavours), and the groups the python flavour batches text in;
# context_length is added as the last (text_buckets).
TEXT_LENGTH_BUCKETS: tuple[int, ...] = (16, 24, 32, 48, 64)


def text_buckets(context_length: int) -> tuple[int, ...]:
    """TEXT_LENGTH_BUCKETS below `context_length`, then `context_length`: every bucket a text of
    at most context_length tokens fits in."""
    return (*(n for n in TEXT_LENGTH_BUCKETS if n < context_length), context_length)


def token_lengths(ids: np.ndarray, eos_id: int) -> np.ndarray:
    """[N] int: each row's length up to and including its first <|endoftext|> (the token CLIP's
    text tower pools at; what follows it changes nothing). A row without one: its full width."""
    is_eos = ids == eos_id
    return np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, ids.shape[1])


def trim_ids(ids: np.ndarray, eos_id: int, lengths: tuple[int, ...] = ()) -> np.ndarray:
    """[N, T] ids cut to their longest row's token_lengths (at least 2: <|startoftext|>
    <|endoftext|>), rounded up to the next of `lengths` where given (ascending, the last >= any
    row's length); rows shorter than that keep their <|endoftext|> padding. Exact: CLIP's text
    tower is causal and read at the first <|endoftext|>."""
    if ids.shape[0] == 0:
        return ids
    width = max(int(token_lengths(ids, eos_id).max()), min(2, ids.shape[1]))
    if lengths:
        width = next((n for n in lengths if n >= width), ids.shape[1])
    return np.ascontiguousarray(ids[:, : min(width, ids.shape[1])])


def decode_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreprocessError(
            f"{what} is not valid UTF-8 (byte {exc.start})", reason=RejectReason.INVALID_UTF8
        ) from None


# ---------------------------------------------------------------------------------------- image


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; alpha is dropped (not composited), as `convert('RGB')` does."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit integer) grayscale: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


_MAGIC = (
    ("JPEG", b"\xff\xd8\xff"),
    ("PNG", b"\x89PNG\r\n\x1a\n"),
    ("GIF", b"GIF8"),
    ("WEBP", b"RIFF"),
    ("BMP", b"BM"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
)


def _printable(data: bytes) -> bool:
    """Whether the first 4 KiB read as UTF-8 text (a character cut at the end is not an error)."""
    try:
        sample = codecs.getincrementaldecoder("utf-8")().decode(data[:4096], final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in sample)


def _not_an_image(data: bytes, spec: PreprocessSpec) -> PreprocessError:
    """Why `data` was refused as an image, naming what it looks like instead."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n")
    for fmt, magic in _MAGIC:
        if data.startswith(magic) and (fmt != "WEBP" or data[8:12] == b"WEBP"):
            if fmt in spec.image_formats:
                return PreprocessError(
                    f"image data is corrupt or truncated (a {fmt} header, then unreadable data)",
                    reason=RejectReason.CORRUPT,
                )
            return PreprocessError(
                f"image format {fmt} is not accepted (accepted: {', '.join(spec.image_formats)})",
                reason=RejectReason.FORMAT_NOT_ACCEPTED,
            )
    if head.startswith(b"%PDF"):
        what = "a PDF document"
    elif head.startswith(b"%!PS") or head.startswith(b"\xc5\xd0\xd3\xc6"):
        what = "PostScript/EPS"
    elif not _printable(data):
        what = "not a recognised image format"
    elif head.startswith(b"<") and b"<svg" in head.lower():
        what = "SVG (vector graphics)"
    elif head.startswith(b"<"):
        what = "HTML/XML text"
    else:
        what = "text"
    accepted = ", ".join(spec.image_formats)
    return PreprocessError(
        f"image bytes are {what}, not an image (accepted formats: {accepted})",
        reason=RejectReason.NOT_AN_IMAGE,
    )


def decode_image(data: bytes, spec: PreprocessSpec) -> Image.Image:
    """Encoded bytes -> RGB PIL image, bounded by the spec's byte and pixel limits and opened only
    by the decoders of `spec.image_formats`."""
    if len(data) == 0:
        raise PreprocessError("image is empty (0 bytes)", reason=RejectReason.EMPTY)
    if len(data) > spec.max_image_bytes:
        raise PreprocessError(
            f"image is {len(data)} bytes, over the limit of {spec.max_image_bytes} bytes",
            reason=RejectReason.TOO_LARGE,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(spec.image_formats))
            width, height = img.size
            if width * height > spec.max_image_pixels:
                raise PreprocessError(
                    f"image is {width}x{height} pixels, over the limit of "
                    f"{spec.max_image_pixels} pixels",
                    reason=RejectReason.TOO_MANY_PIXELS,
                )
            img.seek(0)  # first frame of an animated image
            if spec.fast_image:
                img.draft("RGB", fast_decode_size(width, height, spec))  # JPEG only; else no-op
            img.load()
            if spec.apply_exif_orientation:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except PreprocessError:
        raise
    except UnidentifiedImageError:
        raise _not_an_image(data, spec) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PreprocessError(
            f"image rejected as a decompression bomb: {exc}",
            reason=RejectReason.DECOMPRESSION_BOMB,
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise PreprocessError(
            f"image data is corrupt or truncated: {exc}", reason=RejectReason.CORRUPT
        ) from None


# The fast image path (spec.fast_image): a JPEG is decoded DCT-scaled (Pillow's draft, libjpeg's
# 1/2, 1/4, 1/8 scaling) to no less than this many times the resize target on the square canvas's
# side, so the bilinear filter still averages >= 2 decoded pixels per output pixel.
FAST_IMAGE_DECODE_FACTOR = 2
# resize_then_pad: black canvas kept around the photo, in output pixels: more than the bilinear
# filter's reach (1 output pixel each side) plus the rounding of the photo's place to pixels.
_PAD_MARGIN = 3


def fast_decode_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """The smallest decoded size the fast path accepts for a width x height photo: the photo's
    share of FAST_IMAGE_DECODE_FACTOR x resize_size on the side of its square canvas (each side
    with pad_to_square off). Pillow's draft picks the largest DCT scale that keeps both sides at
    or above it (never above the photo's own size)."""
    target = FAST_IMAGE_DECODE_FACTOR * spec.resize_size
    if not spec.pad_to_square:
        return min(width, target), min(height, target)
    side = max(width, height)
    return min(width, -(-width * target // side)), min(height, -(-height * target // side))


def resize_then_pad(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The fast path's [resize_size]^2 image of a non-square photo: what padding it to a black
    square and resizing the square gives (image_to_pixels' exact path), with only the photo and a
    thin black margin resized (Pillow's `box`: the same output grid), the large canvas never made.
    Equal to the exact path up to the rounding of the filter's coefficients (1 unit of 255 where
    it differs)."""
    w, h = img.size
    side, size = max(w, h), spec.resize_size
    scale = side / size  # canvas pixels per output pixel
    margin = math.ceil(_PAD_MARGIN * scale) + 2
    px, py = (side - w) // 2, (side - h) // 2  # the photo's place on the exact path's canvas
    x0, y0 = max(0, px - margin), max(0, py - margin)
    x1, y1 = min(side, px + w + margin), min(side, py + h + margin)
    region = Image.new("RGB", (x1 - x0, y1 - y0), (0, 0, 0))
    region.paste(img, (px - x0, py - y0))
    # output pixels whose centres fall in the region; the rest are black on the exact path too
    # (integer arithmetic: ceil/floor of x * size / side without float rounding)
    a, b = -(-x0 * size // side), x1 * size // side
    c, d = -(-y0 * size // side), y1 * size // side
    # the box in region pixels; max(0, ...): a*scale - x0 may round to -1e-14, which Pillow refuses
    box = (
        max(0.0, a * scale - x0),
        max(0.0, c * scale - y0),
        min(b * scale, x1) - x0,
        min(d * scale, y1) - y0,
    )
    part = region.resize((b - a, d - c), Image.Resampling.BILINEAR, box=box)
    out = Image.new("RGB", (size, size), (0, 0, 0))
    out.paste(part, (a, c))
    return out


def image_to_pixels(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> [3, image_size, image_size] float32, normalised."""
    if spec.interpolation != "bilinear":
        raise ValueError(f"unsupported interpolation {spec.interpolation!r}")
    if spec.fast_image and spec.pad_to_square and img.width != img.height:
        img = resize_then_pad(img, spec)
    else:
        if spec.pad_to_square and img.width != img.height:
            side = max(img.width, img.height)
            square = Image.new("RGB", (side, side), (0, 0, 0))
            square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = square
        img = img.resize((spec.resize_size, spec.resize_size), Image.BILINEAR)
    o, s = spec.crop_offset, spec.image_size
    img = img.crop((o, o, o + s, o + s))
    arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1))


def preprocess_image(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return image_to_pixels(decode_image(data, spec), spec)


def preprocess_post_image(data: bytes | None, spec: PreprocessSpec) -> tuple[np.ndarray, float]:
    """(pixels [3, S, S], image_present) of a post's image; a post without one (None) gets zero
    pixels and 0.0 where the served head answers text-only posts, else a PreprocessError that says
    why it is refused."""
    if data is not None:
        return preprocess_image(data, spec), 1.0
    if not spec.image_optional:
        raise PreprocessError(
            f"the post has no image, and {spec.no_image_reason}", reason=RejectReason.NO_IMAGE
        )
    return np.zeros((3, spec.image_size, spec.image_size), dtype=np.float32), 0.0


def modalities_used(image_present: np.ndarray, ids: np.ndarray, eos_id: int) -> np.ndarray:
    """[N, 2] float32 = [image, text]: the image where the post had one, the text where its cleaned
    text has a token (an empty text is <|startoftext|> <|endoftext|> only)."""
    text = (ids[:, 1] != eos_id).astype(np.float32)
    return np.stack([image_present.reshape(-1).astype(np.float32), text], axis=1)


@dataclass(frozen=True)
class Preprocessed:
    """What the ensemble's first step gives for a batch of posts."""

    pixels: np.ndarray  # [N, 3, S, S] float32; zeros for a post without an image
    input_ids: np.ndarray  # [N, T] int64; T <= context_length where spec.trim_text
    image_present: np.ndarray  # [N, 1] float32: 1.0 with an image, 0.0 without
    modalities_used: np.ndarray  # [N, 2] float32: [image, text] (see modalities_used)


class Preprocessor:
    """Both halves together, as the ensemble's first step runs them."""

    def __init__(self, spec: PreprocessSpec, assets_dir: Path = DEFAULT_ASSETS) -> None:
        self.spec = spec
        self.text = TextPreprocessor(spec, assets_dir)

    def encode(
        self,
        images: list[bytes | None],
        tweets: list[str],
        captions: list[str | None] | None = None,
    ) -> Preprocessed:
        """Every output of the preprocess model; an image None is a post without one (refused
        unless spec.image_optional, as the served model refuses it). With spec.trim_text, the ids
        are cut as the served model cuts one request's (trim_ids)."""
        captions = captions if captions is not None else [None] * len(tweets)
        rows = [preprocess_post_image(b, self.spec) for b in images]
        texts = [compose_text(t, c, self.spec) for t, c in zip(tweets, captions)]
        ids = self.text(texts)
        if self.spec.trim_text:
            ids = trim_ids(ids, self.text.eos_id, self.spec.text_lengths)
        present = np.array([[p] for _, p in rows], dtype=np.float32)
        return Preprocessed(
            np.stack([px for px, _ in rows]), ids, present,
            modalities_used(present, ids, self.text.eos_id),
        )  # fmt: skip

    def __call__(
        self,
        images: list[bytes | None],
        tweets: list[str],
        captions: list[str | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pixels, input_ids): what the image and text encoders take."""
        out = self.encode(images, tweets, captions)
        return out.pixels, out.input_ids
