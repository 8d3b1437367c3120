"""Content-addressed image cache: each image crosses the wire once, then prompts refer to its hash."""

import io
import threading
from collections import OrderedDict

from PIL import Image

from protocol import ErrorCode, image_sha256


class ImageError(ValueError):
    def __init__(self, code: ErrorCode, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def decode_image(data: bytes, what: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode and bound one image; `what` names it in errors (a field path or the URL's hash)."""
    if len(data) > max_bytes:
        raise ImageError(
            ErrorCode.too_large,
            f"{what} is {len(data):,} bytes; the server accepts up to {max_bytes:,} (see --max-image-bytes)",
            413,
        )
    try:
        img = Image.open(io.BytesIO(data))
        # The header gives the size before any pixel is decoded: refuse decompression bombs here.
        if img.width * img.height > max_pixels:
            raise ImageError(
                ErrorCode.too_large,
                f"{what} is {img.width}x{img.height} = {img.width * img.height:,} pixels; the server "
                f"accepts up to {max_pixels:,} (see --max-pixels)",
                413,
            )
        img.load()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(ErrorCode.invalid_image, f"{what} is not a decodable image ({exc})") from None
    return img.convert("RGB")


class ImageCache:
    """Bounded LRU of decoded RGB images by sha256 of their encoded bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        # encoded images (video frames too) decoded since start, and their bytes: what crossed the wire rather
        # than being named by hash
        self.received = 0
        self.received_bytes = 0
        self._items: OrderedDict[str, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _size(img: Image.Image) -> int:
        return img.width * img.height * 4  # Pillow keeps an RGB pixel in 4 bytes (RGBX), not 3

    def __contains__(self, sha: str) -> bool:
        with self._lock:
            return sha in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, sha: str) -> Image.Image | None:
        with self._lock:
            img = self._items.get(sha)
            if img is not None:
                self._items.move_to_end(sha)
            return img

    def put(self, sha: str, img: Image.Image) -> None:
        with self._lock:
            if sha in self._items:
                self._items.move_to_end(sha)
                return
            self._items[sha] = img
            self.bytes += self._size(img)
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.bytes -= self._size(old)

    def add_bytes(self, data: bytes, what: str, max_bytes: int, max_pixels: int) -> tuple[str, Image.Image]:
        img = decode_image(data, what, max_bytes, max_pixels)
        with self._lock:
            self.received += 1
            self.received_bytes += len(data)
        sha = image_sha256(data)
        self.put(sha, img)
        return sha, img
