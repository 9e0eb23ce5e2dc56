"""Images in chat requests: OpenAI `image_url` content parts turned into PIL images, under a strict rule.

- `data:image/...;base64,...` URLs are always accepted: the client sends the bytes itself.
- Local files (a plain path or a `file://` URL) only when the server was started with `--image-dir DIR`, and
  only inside DIR once links and `..` are resolved: otherwise anyone who can reach the API could make the
  server read any image file the server's user can.
- Remote `http(s)://` URLs are refused: fetching them would let a request make the server connect anywhere
  its network reaches (and wait on slow hosts inside the generation path).
Every refusal is a 400 that says which of these applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmbox_engine.data.images import decode_data_url, is_data_url, rgb_image, verify_image_bytes
from llmbox_engine.serve.errors import bad_request

MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_PIXELS = 40_000_000  # width x height: a decompression bomb is refused before it is decoded


class ImagePolicy:
    def __init__(self, image_dir: Path | None = None) -> None:
        self.image_dir = image_dir.resolve() if image_dir is not None else None

    def load(self, url: str, param: str) -> Any:
        """The RGB image a content part points at; ApiError (400) for anything the rule refuses."""
        if is_data_url(url):
            try:
                data = decode_data_url(url)
            except ValueError as exc:
                raise bad_request(f"{param}: {exc}", param) from None
            return _decode(data, "the data URL image", param)
        if url.startswith(("http://", "https://")):
            raise bad_request(
                f"{param}: remote image URLs are not fetched by this server; send the image as a "
                "data:image/...;base64 URL",
                param,
            )
        if "://" in url and not url.startswith("file://"):
            raise bad_request(f"{param}: unsupported image URL scheme {url.split('://')[0]!r}", param)
        return _decode(self._local_bytes(url.removeprefix("file://"), param), f"image {url}", param)

    def _local_bytes(self, name: str, param: str) -> bytes:
        if self.image_dir is None:
            raise bad_request(
                f"{param}: local image paths are refused: start the server with --image-dir DIR to allow files "
                "under DIR, or send the image as a data:image/...;base64 URL",
                param,
            )
        path = Path(name)
        target = (path if path.is_absolute() else self.image_dir / path).resolve()
        if not target.is_relative_to(self.image_dir):
            raise bad_request(f"{param}: {name} is outside the allowed image folder {self.image_dir}", param)
        try:
            return target.read_bytes()
        except OSError as exc:
            raise bad_request(f"{param}: cannot read image {name}: {exc.strerror or exc}", param) from None


def _decode(data: bytes, what: str, param: str) -> Any:
    try:
        width, height = verify_image_bytes(data, what)
    except ValueError as exc:
        raise bad_request(f"{param}: {exc}", param) from None
    if width * height > MAX_IMAGE_PIXELS:
        raise bad_request(f"{param}: {what} is {width}x{height} pixels, more than this server takes", param)
    return rgb_image(data)
