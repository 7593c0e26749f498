"""Image loading and the model's image transform, with Pillow only.

:func:`load_image` turns anything a user may pass as an image (a PIL image, a file path, raw
bytes, a ``data:image/...;base64,...`` URL, or an http(s) URL when explicitly allowed) into an
RGB ``PIL.Image.Image``. It honours EXIF orientation, flattens transparency onto white, scales
16-bit and float images to 8 bits, takes the first frame of animations, and refuses images with
more than ``max_pixels`` pixels before decoding them (read from the header), then decodes every
pixel at once, strictly (a truncated or corrupt file fails here, whatever Pillow's
``ImageFile.LOAD_TRUNCATED_IMAGES`` says), so nothing decodes later. Every failure is an
:class:`~interleaf.errors.InputError` naming ``where`` the image came from and how to fix it.

:class:`ImageTransform` resizes (shortest edge + centre crop, or squash), scales to [0, 1] and
normalises with per-channel mean and std, giving a ``(3, S, S)`` float tensor.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError, OfflineError

ACCEPTED_IMAGE_TYPES = (
    "a PIL.Image.Image, a file path (str or pathlib.Path), raw bytes, "
    "or a 'data:image/...;base64,...' URL string"
)
_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_WHITE = (255, 255, 255, 255)


def load_image(
    item: Any,
    *,
    where: str,
    max_pixels: int = 50_000_000,
    allow_urls: bool = False,
    timeout: float = 10.0,
    max_bytes: int = 20_000_000,
) -> Image.Image:
    """Load ``item`` as an RGB image.

    ``where`` says where the image came from (e.g. ``"batch row 1, prompt item 3"``) and starts
    every error message. http(s) URLs are fetched only with ``allow_urls=True`` (with ``timeout``
    seconds and at most ``max_bytes`` bytes); otherwise an :class:`OfflineError` is raised.
    """
    if isinstance(item, Image.Image):
        _check_pixels(item.size, where, max_pixels)
        # A PIL image may still be lazy (Image.open reads only the header): decode it here, so a
        # truncated file fails now with ``where`` named, not later inside the transform.
        return _decode(item, where, "the image")
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(item), where, max_pixels, "the image bytes")
    if isinstance(item, str):
        text = item.strip()
        if text.startswith("data:"):
            return _open_bytes(_decode_data_url(text, where, max_bytes), where, max_pixels, "the data URL")
        if text.startswith(("http://", "https://")):
            data = _fetch_url(text, where, allow_urls=allow_urls, timeout=timeout, max_bytes=max_bytes)
            return _open_bytes(data, where, max_pixels, f"the image at {text}")
        return _open_path(Path(item), where, max_pixels)
    if isinstance(item, Path):
        return _open_path(item, where, max_pixels)
    raise InputError(
        f"{where}: unsupported image of type {type(item).__name__}; pass {ACCEPTED_IMAGE_TYPES}"
    )


def to_rgb(img: Image.Image, *, where: str = "image") -> Image.Image:
    """Any Pillow image -> RGB: first frame, EXIF orientation, transparency on white, 16-bit scaled."""
    if getattr(img, "is_animated", False):
        img.seek(0)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a malformed EXIF block should not make the picture unusable
        pass
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _TRANSPARENT_MODES or "transparency" in img.info:
        try:
            rgba = img.convert("RGBA")
        except ValueError as e:  # a mode Pillow cannot convert (e.g. "La")
            raise InputError(
                f"{where}: cannot convert an image of mode {mode!r} to RGB ({e}); save it as PNG or JPEG first"
            ) from e
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        # Read as 16-bit: 0..65535 -> 0..255.
        arr = np.asarray(img, dtype=np.float64)
        return _gray_to_rgb(np.clip(arr, 0, 65535) * (255.0 / 65535.0))
    if mode == "F":
        # Float images: [0, 1] when they fit in it, else [0, 255] clipped.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return _gray_to_rgb(np.clip(arr, 0, 255))
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(
            f"{where}: cannot convert an image of mode {mode!r} to RGB ({e}); save it as PNG or JPEG first"
        ) from e


def _gray_to_rgb(arr: np.ndarray) -> Image.Image:
    gray = np.rint(arr).astype(np.uint8)  # (H, W)
    return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")  # (H, W, 3)


def _check_pixels(size: tuple[int, int], where: str, max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise InputError(f"{where}: the image is empty ({w}x{h} pixels)")
    if w * h > max_pixels:
        raise InputError(
            f"{where}: the image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}; "
            "downscale it, or raise max_pixels if you trust the source"
        )


def _open_bytes(data: bytes, where: str, max_pixels: int, what: str) -> Image.Image:
    if not data:
        raise InputError(f"{where}: {what} are empty; pass the bytes of an image file (PNG, JPEG, ...)")
    return _open_stream(io.BytesIO(data), where, max_pixels, what)


def _open_path(path: Path, where: str, max_pixels: int) -> Image.Image:
    try:
        path = path.expanduser()
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, no home directory
        raise InputError(f"{where}: {str(path)[:200]!r} is not a usable file path ({e}); check the path") from e
    if not exists:
        raise InputError(
            f"{where}: image file {str(path)!r} does not exist (relative paths are resolved against "
            f"{Path.cwd()}); check the path"
        )
    if is_dir:
        raise InputError(f"{where}: {str(path)!r} is a directory, not an image file; pass the path of a file")
    try:
        with open(path, "rb") as f:
            return _open_stream(f, where, max_pixels, f"file {str(path)!r}")
    except PermissionError as e:
        raise InputError(f"{where}: cannot read image file {str(path)!r} ({e}); check its permissions") from e
    except OSError as e:  # a FIFO, a device, an I/O error
        raise InputError(f"{where}: cannot read image file {str(path)!r} ({e}); pass a regular image file") from e


def _open_stream(stream, where: str, max_pixels: int, what: str) -> Image.Image:
    with warnings.catch_warnings():
        # Our own limit replaces Pillow's decompression-bomb warning. Its warnings about a damaged
        # file (a TIFF tag past the end, corrupt EXIF) are noise here: decoding below either
        # succeeds or raises the error that names the input.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            with _strict_decoding():
                img = Image.open(stream)
        except Image.DecompressionBombError as e:
            raise InputError(
                f"{where}: {what} has too many pixels to decode safely ({e}); downscale it"
            ) from e
        except UnidentifiedImageError as e:
            raise InputError(
                f"{where}: {what} could not be read: not a recognised image (truncated or corrupt data, or an "
                "unsupported format); pass a valid PNG, JPEG, GIF, WebP, BMP or TIFF image"
            ) from e
        except Exception as e:  # a header cut short or garbled: Pillow's plugins raise many types
            raise _undecodable(where, what, e) from e
        _check_pixels(img.size, where, max_pixels)  # from the header, before decoding
        return _decode(img, where, what)


def _decode(img: Image.Image, where: str, what: str) -> Image.Image:
    """Decode every pixel of ``img`` now and convert it to RGB; any failure names ``where``.

    The image returned is fully in memory: nothing decodes later, where an error could not say
    which input it came from.
    """
    try:
        with _strict_decoding():
            img.load()
            rgb = to_rgb(img, where=where)
            rgb.load()  # seeking to the first frame of an animation may have made it lazy again
    except InputError:
        raise
    except Image.DecompressionBombError as e:
        raise InputError(f"{where}: {what} has too many pixels to decode safely ({e}); downscale it") from e
    except Exception as e:  # OSError, SyntaxError, EOFError, ValueError, struct.error, ... from a decoder
        raise _undecodable(where, what, e) from e
    return rgb


def _undecodable(where: str, what: str, error: Exception) -> InputError:
    return InputError(
        f"{where}: {what} could not be decoded ({type(error).__name__}: {error}); the data is truncated or "
        "corrupt: re-export or re-download the image"
    )


# Pillow reads ImageFile.LOAD_TRUNCATED_IMAGES (a process-wide switch other code may turn on) at
# decode time; with it on, a truncated file decodes to an image with grey or black rows instead of
# failing. Our decoding turns it off while any of it runs and puts the caller's value back after.
_strict_lock = threading.Lock()
_strict_users = 0
_saved_load_truncated = False


@contextlib.contextmanager
def _strict_decoding():
    global _strict_users, _saved_load_truncated
    with _strict_lock:
        if _strict_users == 0:
            _saved_load_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
        _strict_users += 1
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        with _strict_lock:
            _strict_users -= 1
            if _strict_users == 0 and ImageFile.LOAD_TRUNCATED_IMAGES is False:
                ImageFile.LOAD_TRUNCATED_IMAGES = _saved_load_truncated


def _decode_data_url(url: str, where: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InputError(
            f"{where}: a data URL must look like 'data:image/<type>;base64,<data>', got {url[:40]!r}..."
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise InputError(f"{where}: the data URL holds more than {max_bytes:,} bytes; send a smaller image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{where}: the data URL's base64 payload is invalid ({e}); re-encode the image") from e


def _fetch_url(url: str, where: str, *, allow_urls: bool, timeout: float, max_bytes: int) -> bytes:
    if not allow_urls:
        raise OfflineError(
            f"{where}: image URL {url!r} is not fetched: interleaf never uses the network unless asked; "
            "pass allow_urls=True to fetch it, or download the image and pass its path"
        )
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (http(s) only)
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise InputError(f"{where}: could not fetch image URL {url!r} ({e}); check the URL and the network") from e
    if len(data) > max_bytes:
        raise InputError(f"{where}: image URL {url!r} is larger than {max_bytes:,} bytes; raise max_bytes or resize it")
    return data


class ImageTransform:
    """RGB PIL image -> normalised ``(3, S, S)`` float tensor.

    ``resize="shortest_edge_crop"`` scales the shortest edge to S (bicubic) and crops the centre;
    ``resize="squash"`` resizes straight to S x S, ignoring the aspect ratio.
    """

    RESIZE_MODES = ("shortest_edge_crop", "squash")

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize: str = "shortest_edge_crop",
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
            raise InputError(f"ImageTransform: image_size must be a positive integer, got {image_size!r}")
        if resize not in self.RESIZE_MODES:
            raise InputError(f"ImageTransform: resize must be one of {list(self.RESIZE_MODES)}, got {resize!r}")
        mean, std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise InputError(f"ImageTransform: need three means and three positive stds, got {mean}, {std}")
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.resize = resize
        self._mean = torch.tensor(mean).view(3, 1, 1)
        self._std = torch.tensor(std).view(3, 1, 1)

    @classmethod
    def from_vision_config(cls, vision_cfg) -> "ImageTransform":
        """The transform a :class:`~interleaf.config.VisionConfig` describes."""
        return cls(vision_cfg.image_size, vision_cfg.image_mean, vision_cfg.image_std, vision_cfg.resize)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        s = self.image_size
        if img.size != (s, s):
            if self.resize == "squash":
                img = img.resize((s, s), Image.Resampling.BICUBIC)
            else:
                img = self._shortest_edge_crop(img, s)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (S, S, 3)
        pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (3, S, S)
        return (pixels - self._mean) / self._std

    # Above this many pixels the resized image is not built whole: only the kept centre is resized.
    MAX_RESIZED_PIXELS = 16_000_000

    @staticmethod
    def _shortest_edge_crop(img: Image.Image, s: int) -> Image.Image:
        """Scale the shortest edge to ``s`` (bicubic) and take the centre ``s x s``.

        An image of extreme aspect ratio would first become huge (1 x 50,000,000 pixels -> 32 x
        1,600,000,000, 20 GB): past :attr:`MAX_RESIZED_PIXELS` only the centre region is resized
        (Pillow's ``box``), the same resampling up to the rounding of overshoots on sharp edges.
        """
        w, h = img.size
        # The long side as torchvision's Resize(s) and transformers' shortest-edge resize size it:
        # int(s * long / short), truncated (rounding it would resample 405x300 to 454x336, not 453x336).
        long = max(s, int(s * max(w, h) / min(w, h)))
        nw, nh = (s, long) if w <= h else (long, s)
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))  # the crop, in resized pixels
        if nw * nh > ImageTransform.MAX_RESIZED_PIXELS:
            sx, sy = nw / w, nh / h
            box = (left / sx, top / sy, (left + s) / sx, (top + s) / sy)  # the same crop, in source pixels
            return img.resize((s, s), Image.Resampling.BICUBIC, box=box)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        return img.crop((left, top, left + s, top + s))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "resize": self.resize}

    @classmethod
    def from_dict(cls, data: dict) -> "ImageTransform":
        known = {"image_size", "mean", "std", "resize"}
        if not isinstance(data, dict) or not {"image_size", "mean", "std"} <= set(data) or set(data) - known:
            raise InputError(
                f"ImageTransform.from_dict: expected keys {sorted(known)} (resize optional), got {data!r}"
            )
        return cls(data["image_size"], data["mean"], data["std"], data.get("resize", "shortest_edge_crop"))

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, resize={self.resize!r})"
