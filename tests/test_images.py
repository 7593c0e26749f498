"""Image loading (every Pillow mode, EXIF, animation, bad inputs) and the image transform."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from interleaf.config import VisionConfig
from interleaf.errors import InputError, OfflineError
from interleaf.processing import ImageTransform, load_image

S = 8
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def png_bytes(img: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save_kwargs)
    return buf.getvalue()


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    """(3, S, S) normalised -> [0, 1] pixels."""
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.fixture
def transform() -> ImageTransform:
    return ImageTransform(S, MEAN, STD)


def assert_colour(x: torch.Tensor, rgb: tuple[int, int, int], atol: float = 1.5 / 255):
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, S, S) / 255
    torch.testing.assert_close(unnormalise(x), expected, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGB", (10, 12), (10, 200, 30)), (10, 200, 30)),
        (lambda: Image.new("RGBA", (10, 12), (255, 0, 0, 0)), (255, 255, 255)),  # fully transparent -> white
        (lambda: Image.new("RGBA", (10, 12), (0, 0, 0, 255)), (0, 0, 0)),
        (lambda: Image.new("LA", (9, 9), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (9, 9), 77), (77, 77, 77)),
        (lambda: Image.new("1", (9, 9), 1), (255, 255, 255)),
        (lambda: Image.new("CMYK", (9, 9), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.new("I;16", (9, 9), 65535), (255, 255, 255)),  # 16-bit max -> white
        (lambda: Image.new("I;16", (9, 9), 257 * 100), (100, 100, 100)),
        (lambda: Image.new("I", (9, 9), 65535), (255, 255, 255)),
        (lambda: Image.new("F", (9, 9), 0.5), (128, 128, 128)),
        (lambda: Image.new("F", (9, 9), 200.0), (200, 200, 200)),
    ],
    ids=["RGB", "RGBA-clear", "RGBA-opaque", "LA", "L", "1", "CMYK", "I16-max", "I16-mid", "I", "F-unit", "F-255"],
)
def test_every_mode_becomes_rgb_tensor(make, expected, transform):
    img = load_image(make(), where="test")
    assert img.mode == "RGB"
    assert_colour(transform(img), expected)


def test_palette_with_transparency_composited_on_white(transform):
    img = Image.new("P", (6, 6), 0)
    img.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    data = png_bytes(img, transparency=0)  # index 0 is transparent
    assert_colour(transform(load_image(data, where="t")), (255, 255, 255))
    opaque = png_bytes(img)
    assert_colour(transform(load_image(opaque, where="t")), (0, 0, 255))


def test_sixteen_bit_png_file_round_trips(tmp_path, transform):
    arr = np.full((5, 7), 65535, dtype=np.uint16)
    arr[:, :3] = 0
    path = tmp_path / "gray16.png"
    Image.fromarray(arr).save(path)
    img = load_image(path, where="t")
    assert img.size == (7, 5)
    px = np.asarray(img)
    assert px[:, :3].max() == 0 and px[:, 3:].min() == 255


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (4, 2), (255, 0, 0))
    img.paste((0, 0, 255), (2, 0, 4, 2))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(png_bytes(img, exif=exif), where="t")
    assert out.size == (2, 4)
    px = np.asarray(out)
    assert tuple(px[0, 0]) == (255, 0, 0) and tuple(px[-1, 0]) == (0, 0, 255)  # red on top after rotation
    plain = load_image(png_bytes(img), where="t")
    assert plain.size == (4, 2)


def test_animated_gif_takes_first_frame(transform):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert_colour(transform(load_image(buf.getvalue(), where="t")), (255, 0, 0), atol=3 / 255)
    animated = Image.open(io.BytesIO(buf.getvalue()))
    animated.seek(1)
    assert_colour(transform(load_image(animated, where="t")), (255, 0, 0), atol=3 / 255)


def test_paths_bytes_and_data_urls(tmp_path, transform):
    img = Image.new("RGB", (5, 5), (0, 255, 0))
    path = tmp_path / "g.png"
    img.save(path)
    url = "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()
    for item in (path, str(path), png_bytes(img), bytearray(png_bytes(img)), url):
        assert_colour(transform(load_image(item, where="t")), (0, 255, 0))


def _fake_huge_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but that holds no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "item, needle",
    [
        (b"this is not an image", "not a recognised image"),
        (png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "truncated or corrupt"),
        (_fake_huge_png(10_000, 10_000), "more than the limit of 50,000,000"),  # refused from the header
        (_fake_huge_png(100_000, 100_000), "too many pixels"),  # Pillow's own bomb check
        (12345, "unsupported image of type int"),
        (b"", "empty"),
        ("data:image/png;base64,@@@@", "base64"),
        ("data:text/plain,hello", "data URL must look like"),
    ],
    ids=["corrupt", "truncated", "limit", "bomb", "unsupported", "empty", "bad-base64", "not-image-data-url"],
)
def test_bad_inputs_name_where_and_what(item, needle):
    with pytest.raises(InputError) as e:
        load_image(item, where="batch row 1, prompt item 3")
    assert "batch row 1, prompt item 3" in str(e.value)
    assert needle in str(e.value)


def test_pixel_limit_and_fix_hint():
    with pytest.raises(InputError, match=r"10x10 = 100 pixels, more than the limit of 99.*max_pixels"):
        load_image(Image.new("RGB", (10, 10)), where="w", max_pixels=99)
    assert load_image(Image.new("RGB", (10, 10)), where="w", max_pixels=100).size == (10, 10)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(InputError, match=r"item 0: image file .*nope\.png' does not exist"):
        load_image(tmp_path / "nope.png", where="item 0")
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path, where="item 0")


def test_urls_are_not_fetched_unless_asked():
    with pytest.raises(OfflineError) as e:
        load_image("https://example.com/cat.png", where="batch row 0, prompt item 1")
    msg = str(e.value)
    assert "batch row 0, prompt item 1" in msg and "allow_urls=True" in msg


def test_transform_resize_modes():
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    img.paste((0, 255, 0), (10, 0, 20, 10))  # red | green | blue thirds
    img.paste((0, 0, 255), (20, 0, 30, 10))
    crop = ImageTransform(10, (0, 0, 0), (1, 1, 1), resize="shortest_edge_crop")(img)
    assert crop.shape == (3, 10, 10)
    assert crop[1].min() > 0.99 and crop[0].max() < 0.01  # only the green middle survives the crop
    squash = ImageTransform(10, (0, 0, 0), (1, 1, 1), resize="squash")(img)
    assert squash[0, :, 0].min() > 0.9 and squash[2, :, -1].min() > 0.9  # all three thirds kept


def test_transform_normalises_and_serialises():
    t = ImageTransform(4, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    x = t(Image.new("RGB", (4, 4), (255, 255, 255)))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([2.0, 1.0, 0.5]))
    t2 = ImageTransform.from_dict(t.to_dict())
    assert t2.to_dict() == t.to_dict()
    cfg = VisionConfig(image_size=16, patch_size=4, resize="squash")
    t3 = ImageTransform.from_vision_config(cfg)
    assert (t3.image_size, t3.resize, t3.mean) == (16, "squash", cfg.image_mean)
    with pytest.raises(InputError, match="resize"):
        ImageTransform(4, (0, 0, 0), (1, 1, 1), resize="stretch")
    with pytest.raises(InputError, match="expected keys"):
        ImageTransform.from_dict({"image_size": 4})


# -- truncated and corrupt files fail when loaded, in every format, naming the input --

FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]


def noisy(size=(40, 32), seed=0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # (H, W, 3)
    return Image.fromarray(arr, mode="RGB")


def encoded(fmt: str, img: Image.Image | None = None) -> bytes:
    buf = io.BytesIO()
    (img or noisy()).save(buf, format=fmt)
    return buf.getvalue()


def cut_points(n: int) -> list[int]:
    """Inside the signature, inside the header, and a quarter, half and three quarters in."""
    return [4, 16, 30, n // 4, n // 2, n * 3 // 4]


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_fail_when_loaded_naming_the_item(fmt):
    data = encoded(fmt)
    whole = load_image(data, where="w")  # the whole file decodes (so the cuts below are what fails)
    assert whole.size == (40, 32) and whole.mode == "RGB"
    for cut in cut_points(len(data)):
        with pytest.raises(InputError) as e:
            load_image(data[:cut], where="batch row 1, prompt item 2")
        msg = str(e.value)
        assert msg.startswith("batch row 1, prompt item 2: the image bytes") and "corrupt" in msg, (cut, msg)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_fail_even_when_pillow_is_told_to_load_truncated_images(fmt, monkeypatch):
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encoded(fmt)
    for cut in cut_points(len(data))[3:]:
        with pytest.raises(InputError, match=r"^item 0: .*corrupt"):
            load_image(data[:cut], where="item 0")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is put back


def test_a_truncated_webp_is_refused_already_by_image_open():
    """So the lazy-image case below cannot be built for WebP (its decoder reads the stream when it opens)."""
    data = encoded("WEBP")
    with pytest.raises(OSError):
        Image.open(io.BytesIO(data[: len(data) // 2]))


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "WEBP"])
def test_lazily_opened_truncated_image_fails_in_load_image_not_later(fmt, transform):
    data = encoded(fmt)
    lazy = Image.open(io.BytesIO(data[: len(data) // 2]))  # reads the header only
    with pytest.raises(InputError, match=r"^message 2, part 0: the image could not be decoded"):
        load_image(lazy, where="message 2, part 0")
    ok = load_image(Image.open(io.BytesIO(data)), where="w")
    assert transform(ok).shape == (3, S, S)  # a lazy image that is whole loads, and needs no second decode
    assert ok.getbbox() is not None


def test_flipped_bytes_in_png_pixel_data_fail_the_checksum():
    data = bytearray(encoded("PNG"))
    start = data.index(b"IDAT") + 4
    for offset in (10, 200, 1000):
        broken = bytearray(data)
        broken[start + offset] ^= 0xFF
        with pytest.raises(InputError, match=r"^row 3: the image bytes could not be decoded .*corrupt"):
            load_image(bytes(broken), where="row 3")


def test_header_only_truncation_of_every_format_is_an_input_error_not_oserror():
    # Cut inside the header chunks: Pillow raises OSError('Truncated File Read') or ValueError here.
    for fmt in FORMATS:
        data = encoded(fmt)
        for cut in range(1, 64):
            with pytest.raises(InputError):
                load_image(data[:cut], where="w")


def test_extreme_aspect_ratio_is_cropped_before_it_is_resized():
    # 1 x 3,000,000 pixels: scaling the shortest edge to 224 first would build 224 x 672,000,000
    # pixels (600 GB); only the kept centre is resized.
    tall = Image.new("RGB", (1, 3_000_000), (10, 200, 30))
    x = ImageTransform(224, (0, 0, 0), (1, 1, 1))(tall)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x[:, 112, 112], torch.tensor([10, 200, 30]) / 255.0)


def test_centre_only_resize_matches_the_whole_resize(monkeypatch):
    yy, xx = np.mgrid[0:333, 0:39]
    smooth = np.stack([xx * 255 // 38, yy * 255 // 332, (xx + yy) % 256], axis=-1).astype(np.uint8)  # (H, W, 3)
    img = Image.fromarray(smooth)
    whole = np.asarray(ImageTransform._shortest_edge_crop(img, 32))
    monkeypatch.setattr(ImageTransform, "MAX_RESIZED_PIXELS", 0)  # force the centre-only path
    centre = np.asarray(ImageTransform._shortest_edge_crop(img, 32))
    assert whole.shape == centre.shape == (32, 32, 3)
    np.testing.assert_array_equal(centre, whole)
