"""The catalogue of odd and bad requests (issue 6), each with what it must get back.

One list, used by the load script (`benchmarks/load.py`) and the end-to-end tests: valid posts with
awkward text (empty, whitespace, right-to-left, emoji, NUL bytes, 1 MB: cut, not refused), and
invalid requests with the words their error must contain: bad images (each kind of damage, a
decompression bomb, over the byte and pixel limits, SVG/PDF/text sent as an image), bad UTF-8, and
requests Triton itself refuses (missing input, wrong dtype, wrong shape) before any model runs.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from crisis_triton.client.triton_client import bytes_input
from crisis_triton.contract.spec import CAPTION_INPUT, IMAGE_INPUT, TEXT_INPUT
from crisis_triton.preprocess.posts import PreprocessSpec

# How a request is malformed at the protocol level (Triton checks these against the config).
POST, MISSING_TEXT, WRONG_DTYPE, WRONG_SHAPE = "post", "missing_text", "wrong_dtype", "wrong_shape"


@dataclass(frozen=True)
class Case:
    """One kind of request. `error` None: it must succeed; else words its error must contain."""

    name: str
    image: bytes
    text: bytes
    caption: bytes | None = None
    error: str | None = None
    form: str = POST
    weight: float = 1.0  # relative share in the load mix (big payloads are rarer)

    @property
    def valid(self) -> bool:
        return self.error is None

    def inputs(self, module: Any) -> list[Any]:
        """tritonclient InferInputs (`module` = tritonclient.http or tritonclient.grpc)."""

        def tensor(name: str, value: bytes, shape: tuple[int, ...] = (1, 1)) -> Any:
            return bytes_input(module, name, value, shape)

        if self.form == WRONG_DTYPE:
            image = module.InferInput(IMAGE_INPUT, [1, 1], "FP32")
            image.set_data_from_numpy(np.zeros((1, 1), np.float32))
        elif self.form == WRONG_SHAPE:
            image = tensor(IMAGE_INPUT, self.image, (1, 2))
        else:
            image = tensor(IMAGE_INPUT, self.image)
        inputs = [image]
        if self.form != MISSING_TEXT:
            inputs.append(tensor(TEXT_INPUT, self.text))
        if self.caption is not None:
            inputs.append(tensor(CAPTION_INPUT, self.caption))
        return inputs


# ------------------------------------------------------------------------------------- images


def jpeg(seed: int, size: tuple[int, int] = (320, 240)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(seed: int, size: tuple[int, int] = (200, 150)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def ico() -> bytes:
    """A real image in a format Pillow reads but `image_formats` does not allow (ICO)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "ICO")
    return buf.getvalue()


def black_bmp(size: tuple[int, int] = (64, 48)) -> bytes:
    """An image file that ends in zero bytes: they must reach the server intact."""
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, "BMP")
    assert buf.getvalue().endswith(b"\x00\x00\x00")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A small, well-formed PNG header declaring width x height (a decompression bomb's shape:
    a few hundred bytes that would decode to gigabytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 1024, 9)
    chunks = _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def corrupt_png(seed: int) -> bytes:
    """A valid container (signature, chunks, right lengths) whose compressed pixels are garbage."""
    data = bytearray(png(seed))
    start = data.index(b"IDAT") + 8
    data[start : start + 64] = bytes(range(64))
    return bytes(data)


# -------------------------------------------------------------------------------------- cases


def valid_cases(seed: int = 0) -> list[Case]:
    """Posts that must be answered, however odd their text."""
    big = ("flood warning " * 80_000)[: 1024 * 1024]  # 1 MiB of text: cut, not refused
    return [
        Case("jpeg", jpeg(seed + 1), b"RT @news: Flood in #Houston https://t.co/x", weight=4),
        Case("png", png(seed + 2), b"Bridge collapsed on the highway", weight=4),
        Case("caption", jpeg(seed + 3), b"Volunteers bring water", b"people carry boxes", weight=2),
        Case("empty_text", jpeg(seed + 4), b""),
        Case("whitespace_text", jpeg(seed + 5), b" \t\n  \r\n "),
        Case("rtl_text", jpeg(seed + 6), "فيضان في المدينة · שיטפון בעיר".encode()),
        Case("emoji_text", jpeg(seed + 7), "🌊🏠💔🙏 #flood 👨‍👩‍👧".encode()),
        Case("nul_bytes", jpeg(seed + 8), b"flood\x00water\x00"),
        Case("bmp_ending_in_zeros", black_bmp(), b"Power outage downtown"),
        Case("megabyte_text", jpeg(seed + 9), big.encode(), weight=0.2),
    ]


def invalid_cases(spec: PreprocessSpec, seed: int = 0) -> list[Case]:
    """Requests that must fail alone, each with the words of its error. `spec` gives the limits
    (a repository's preprocess.json), so the over-limit cases are just over them."""
    good, text = jpeg(seed + 20), b"a post"
    side = int(spec.max_image_pixels**0.5) + 1  # over the pixel limit, under Pillow's own
    over_bytes = b"\xff\xd8\xff\xe0" + b"\x00" * spec.max_image_bytes  # limit + 4 bytes
    return [
        Case("empty_image", b"", text, error="image is empty"),
        Case(
            "random_bytes",
            b"\x00" + np.random.default_rng(seed).bytes(4095),
            text,
            error="not a recognised image format",
        ),  # fmt: skip
        Case("truncated_jpeg", good[: len(good) // 2], text, error="corrupt or truncated"),
        Case("truncated_png", png(seed + 21)[:300], text, error="corrupt or truncated"),
        Case("corrupt_png_data", corrupt_png(seed + 22), text, error="corrupt or truncated"),
        Case(
            "decompression_bomb", png_declaring(100_000, 100_000), text, error="decompression bomb"
        ),  # fmt: skip
        Case("over_pixel_limit", png_declaring(side, side), text, error="over the limit of"),
        Case("over_byte_limit", over_bytes, text, error="over the limit of", weight=0.05),
        Case(
            "svg",
            b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
            text,
            error="SVG",
        ),  # fmt: skip
        Case(
            "pdf",
            b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n",
            text,
            error="PDF document",
        ),  # fmt: skip
        Case(
            "postscript",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n",
            text,
            error="PostScript/EPS",
        ),  # fmt: skip
        Case("format_not_allowed", ico(), text, error="not a recognised image format"),
        Case("text_as_image", b"/etc/passwd", text, error="image bytes are text"),
        Case("bad_utf8_text", good, b"caf\xe9 \xff", error="text is not valid UTF-8"),
        Case("bad_utf8_caption", good, text, b"\xc3\x28", error="caption is not valid UTF-8"),
        Case("missing_text", good, text, form=MISSING_TEXT, error=TEXT_INPUT),
        Case("wrong_dtype", good, text, form=WRONG_DTYPE, error="FP32"),
        Case("wrong_shape", good, text, form=WRONG_SHAPE, error="shape"),
    ]


def all_cases(spec: PreprocessSpec, seed: int = 0) -> list[Case]:
    return valid_cases(seed) + invalid_cases(spec, seed)


def schedule(cases: list[Case], count: int, invalid_share: float, seed: int = 0) -> list[int]:
    """`count` case indices, valid ones drawn with (1 - invalid_share) of the total weight."""
    rng = np.random.default_rng(seed)
    valid_w = sum(c.weight for c in cases if c.valid)
    invalid_w = sum(c.weight for c in cases if not c.valid)
    weights = np.array(
        [
            c.weight * ((1 - invalid_share) / valid_w if c.valid else invalid_share / invalid_w)
            for c in cases
        ]
    )
    return [int(i) for i in rng.choice(len(cases), size=count, p=weights / weights.sum())]
