"""Images in training data: where a reference points, whether it decodes, how big it is.

A reference is a path (absolute, or relative to the data file's folder, `~` expanded) or a `data:` URL with
base64 content. Every image is opened and verified when its record is read, so a missing or corrupt file is
one clear error naming the file and the record, before any model is loaded, instead of a crash mid-epoch.
Pillow is imported lazily: the rest of the data package stays light.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DATA_URL_PREFIX = "data:"


def is_data_url(ref: str) -> bool:
    return ref.startswith(DATA_URL_PREFIX)


def decode_data_url(ref: str) -> bytes:
    """The bytes of `data:image/png;base64,...`; ValueError for anything else."""
    header, sep, payload = ref.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ValueError("expected a base64 data URL (data:image/...;base64,...)")
    if not header[len(DATA_URL_PREFIX) :].startswith("image/"):
        raise ValueError(f"a data URL of type {header[len(DATA_URL_PREFIX) : -len(';base64')]!r} is not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data URL's base64 content is malformed") from None


def resolve_image(ref: str, base_dir: Path) -> str:
    """An absolute path (or the data URL itself), checked to exist and to decode as an image.

    ValueError says what is wrong, naming the file; the caller adds the data file and record.
    """
    if is_data_url(ref):
        verify_image_bytes(decode_data_url(ref), "the data URL image")
        return ref
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"image {path} cannot be read: {exc.strerror or exc}") from None
    verify_image_bytes(data, f"image {path}")
    return str(path.resolve())


def verify_image_bytes(data: bytes, what: str) -> tuple[int, int]:
    """(width, height) of an encoded image; ValueError naming `what` if Pillow cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            image.verify()  # checksums and structure, without decoding every pixel
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{what} cannot be decoded as an image ({type(exc).__name__}: {exc})") from None
    return int(size[0]), int(size[1])


def load_image(ref: str) -> Any:
    """An RGB `PIL.Image` from a path or a data URL (already checked by `resolve_image`)."""
    return rgb_image(decode_data_url(ref) if is_data_url(ref) else Path(ref).read_bytes())


def rgb_image(data: bytes) -> Any:
    """An encoded image (already verified) decoded to an RGB `PIL.Image`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def image_size(ref: str) -> tuple[int, int]:
    """(width, height) from the header alone."""
    from PIL import Image

    source: Any = io.BytesIO(decode_data_url(ref)) if is_data_url(ref) else ref
    with Image.open(source) as image:
        return int(image.size[0]), int(image.size[1])


def image_statistics(refs: Iterable[str]) -> dict[str, Any]:
    """Count and size range of the images (each distinct image once), for `llmbox data`."""
    distinct = list(dict.fromkeys(refs))
    sizes = [image_size(ref) for ref in distinct]
    if not sizes:
        return {"images": 0}
    smallest = min(sizes, key=lambda s: s[0] * s[1])
    largest = max(sizes, key=lambda s: s[0] * s[1])
    return {
        "images": len(distinct),
        "min_size": f"{smallest[0]}x{smallest[1]}",
        "max_size": f"{largest[0]}x{largest[1]}",
        "min_width": min(s[0] for s in sizes),
        "max_width": max(s[0] for s in sizes),
        "min_height": min(s[1] for s in sizes),
        "max_height": max(s[1] for s in sizes),
    }
