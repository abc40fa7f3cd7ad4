"""Image and mask normalisation, and image <-> tensor conversions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from webui import images
from webui.errors import InvalidRequestError
from webui.images import (
    image_to_tensor,
    mask_to_tensor,
    normalize_image,
    normalize_mask,
    resize_to,
    tensor_to_images,
)


def _rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# --- normalize_image -----------------------------------------------------------------------------


def test_rgb_image_is_returned_unchanged_as_a_copy():
    arr = _rng().integers(0, 256, (7, 5, 3), dtype=np.uint8)
    src = Image.fromarray(arr)
    out = normalize_image(src, "init_image")
    assert out.mode == "RGB" and out.size == (5, 7)
    assert np.array_equal(np.asarray(out), arr)
    assert out is not src


def test_rgba_transparent_pixels_become_white_and_opaque_ones_keep_their_colour():
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 1] = 10
    arr[..., 2] = 30
    arr[:2, :, 3] = 0  # top half fully transparent (colour underneath is arbitrary)
    arr[2:, :, 3] = 255
    arr[3, 3, 3] = 128  # one half-transparent pixel
    out = np.asarray(normalize_image(Image.fromarray(arr), "init_image"))
    assert out.shape == (4, 4, 3)
    assert (out[:2] == 255).all()
    assert (out[2, :] == [200, 10, 30]).all()
    assert (out[3, :3] == [200, 10, 30]).all()
    r, g, b = (int(v) for v in out[3, 3])
    assert abs(r - (200 + 255) / 2) <= 1 and abs(g - (10 + 255) / 2) <= 1 and abs(b - (30 + 255) / 2) <= 1


def test_la_image_is_flattened_on_white():
    la = Image.new("LA", (3, 2), (40, 0))
    la.putpixel((0, 0), (40, 255))
    out = np.asarray(normalize_image(la, "init_image"))
    assert tuple(out[0, 0]) == (40, 40, 40)
    assert tuple(out[1, 2]) == (255, 255, 255)


def test_palette_image_matches_pillow_rgb_conversion():
    arr = _rng().integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pal = Image.fromarray(arr).quantize(colors=12)
    assert pal.mode == "P"
    out = normalize_image(pal, "init_image")
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(pal.convert("RGB")))


def test_palette_image_with_transparent_index_is_flattened_on_white():
    pal = Image.new("P", (4, 1))
    pal.putpalette([10, 20, 30, 90, 80, 70] + [0] * (256 * 3 - 6))
    pal.putdata([0, 1, 0, 1])
    pal.info["transparency"] = 1
    out = np.asarray(normalize_image(pal, "seg_map"))
    assert out[0].tolist() == [[10, 20, 30], [255, 255, 255], [10, 20, 30], [255, 255, 255]]


def test_grayscale_becomes_three_equal_channels():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = np.asarray(normalize_image(Image.fromarray(arr), "init_image"))
    assert out.shape == (16, 16, 3)
    for c in range(3):
        assert np.array_equal(out[..., c], arr)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_gradient_becomes_monotone_eight_bit(mode):
    values = np.linspace(0, 65535, 300).round().astype(np.uint16)
    arr = np.tile(values, (3, 1))
    if mode == "I;16":
        img = Image.fromarray(arr.astype("<u2"))
    elif mode == "I;16B":
        img = Image.frombytes("I;16B", (300, 3), arr.astype(">u2").tobytes())
    else:
        img = Image.fromarray(arr.astype(np.int32))
    assert img.mode == mode
    out = np.asarray(normalize_image(img, "init_image"))
    row = out[0, :, 0].astype(int)
    assert out.dtype == np.uint8
    assert (np.diff(row) >= 0).all()
    assert row[0] == 0 and row.max() == 255
    assert np.array_equal(row, (values >> 8).astype(int))
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_sixteen_bit_png_round_trip(tmp_path):
    values = np.linspace(0, 65535, 64).round().astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(np.tile(values, (2, 1)).astype("<u2")).save(path)
    out = np.asarray(normalize_image(path, "init_image"))
    assert np.array_equal(out[0, :, 0], (values >> 8).astype(np.uint8))


def test_float_image_in_unit_range_is_scaled_to_255():
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(normalize_image(Image.fromarray(arr), "init_image"))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_float_image_outside_byte_range_is_stretched():
    arr = np.array([[-10.0, 0.0, 1000.0]], dtype=np.float32)
    out = np.asarray(normalize_image(Image.fromarray(arr), "init_image"))
    assert out[0, 0, 0] == 0 and out[0, 2, 0] == 255 and 0 < out[0, 1, 0] < 10


def test_cmyk_is_converted_like_pillow():
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    out = normalize_image(cmyk, "init_image")
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(cmyk.convert("RGB")))
    assert tuple(np.asarray(out)[0, 0]) == (255, 0, 0)


def test_exif_orientation_six_rotates_the_image(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    arr[:, :20] = (255, 0, 0)  # left half red
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, quality=95, exif=exif)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif().get(0x0112) == 6
    out = normalize_image(path, "init_image")
    assert out.size == (20, 40)
    px = np.asarray(out).astype(int)
    # after a clockwise turn the former left half (red) is at the top
    assert px[5, 10, 0] > 200 and px[5, 10, 1] < 60
    assert px[35, 10, 0] < 60


def test_exif_orientation_applies_to_an_open_pil_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "r.jpg"
    Image.new("RGB", (30, 10), (0, 0, 255)).save(path, exif=exif)
    with Image.open(path) as raw:
        assert normalize_image(raw, "init_image").size == (10, 30)


def test_numpy_arrays_are_accepted():
    arr = _rng().integers(0, 256, (6, 9, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(normalize_image(arr, "init_image")), arr)
    gray = np.full((4, 4), 77, dtype=np.uint8)
    assert np.asarray(normalize_image(gray, "init_image"))[0, 0].tolist() == [77, 77, 77]
    unit = np.full((2, 2, 3), 1.0, dtype=np.float32)
    assert np.asarray(normalize_image(unit, "init_image")).min() == 255


def test_zero_size_image_is_refused_with_the_field_name():
    with pytest.raises(InvalidRequestError, match="init_image.*empty"):
        normalize_image(Image.new("RGB", (0, 10)), "init_image")
    with pytest.raises(InvalidRequestError, match="seg_map"):
        normalize_image(np.zeros((0, 4, 3), dtype=np.uint8), "seg_map")


def test_huge_image_is_refused(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    normalize_image(Image.new("RGB", (10, 10)), "init_image")  # exactly at the limit: accepted
    with pytest.raises(InvalidRequestError, match=r"init_image is too large: 11x10 .*limit is 100"):
        normalize_image(Image.new("RGB", (11, 10)), "init_image")
    with pytest.raises(InvalidRequestError, match="mask"):
        normalize_mask(Image.new("L", (50, 50)), (10, 10))


def test_huge_image_file_is_refused_before_decoding(monkeypatch, tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(InvalidRequestError, match="seg_map is too large"):
        normalize_image(path, "seg_map")


def test_default_pixel_limit():
    assert images.MAX_PIXELS == 8192 * 8192


@pytest.mark.parametrize("bad", [None, 42, "definitely/not/a/file.png", b"\x89PNG", [[1, 2], [3, 4]]])
def test_non_images_are_refused(bad):
    with pytest.raises(InvalidRequestError, match="init_image"):
        normalize_image(bad, "init_image")


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello")
    with pytest.raises(InvalidRequestError, match="init_image is not a readable image"):
        normalize_image(path, "init_image")


def test_bad_array_shape_is_refused():
    with pytest.raises(InvalidRequestError, match="init_image"):
        normalize_image(np.zeros((4, 4, 2), dtype=np.uint8), "init_image")


# --- normalize_mask ------------------------------------------------------------------------------


def test_mask_size_mismatch_is_resized_not_refused():
    mask = Image.new("L", (32, 16), 0)
    mask.paste(255, (0, 0, 16, 16))  # left half white
    out = normalize_mask(mask, (64, 48))
    assert out.mode == "L" and out.size == (64, 48)
    px = np.asarray(out)
    assert px[24, 5] == 255 and px[24, 60] == 0
    # bilinear filtering keeps it grayscale: the edge between the halves is soft
    assert set(np.unique(px).tolist()) - {0, 255}


def test_mask_of_the_right_size_is_kept_exactly():
    arr = _rng().integers(0, 256, (10, 12), dtype=np.uint8)
    out = normalize_mask(Image.fromarray(arr), (12, 10))
    assert np.array_equal(np.asarray(out), arr)


def test_rgba_mask_with_transparency_uses_alpha():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[..., :3] = 255  # white everywhere: luminance would say "all masked"
    arr[0, 0, 3] = 255
    arr[1, 1, 3] = 100
    out = np.asarray(normalize_mask(Image.fromarray(arr), (2, 2)))
    assert out.tolist() == [[255, 0], [0, 100]]


def test_opaque_rgba_mask_uses_luminance():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[..., 3] = 255
    arr[0, 1, :3] = 255
    out = np.asarray(normalize_mask(Image.fromarray(arr), (2, 2)))
    assert out.tolist() == [[0, 255], [0, 0]]


def test_rgb_and_bilevel_masks_become_l():
    rgb = Image.new("RGB", (3, 3), (255, 255, 255))
    assert np.asarray(normalize_mask(rgb, (3, 3))).min() == 255
    one = Image.new("1", (3, 3), 1)
    out = normalize_mask(one, (3, 3))
    assert out.mode == "L" and np.asarray(out).min() == 255


def test_sixteen_bit_mask_is_scaled():
    arr = np.array([[0, 65535]], dtype=np.uint16)
    out = normalize_mask(Image.fromarray(arr.astype("<u2")), (2, 1))
    assert np.asarray(out).tolist() == [[0, 255]]


def test_zero_size_mask_is_refused():
    with pytest.raises(InvalidRequestError, match="mask"):
        normalize_mask(Image.new("L", (0, 0)), (8, 8))


# --- tensors -------------------------------------------------------------------------------------


def test_image_tensor_shape_range_and_exact_round_trip():
    arr = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    arr = arr.astype(np.uint8)
    img = Image.fromarray(arr)
    t = image_to_tensor(img)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32
    assert t.min().item() == -1.0 and t.max().item() == 1.0
    back = tensor_to_images(t)
    assert len(back) == 1
    assert np.array_equal(np.asarray(back[0]), arr)


def test_every_byte_value_survives_the_round_trip():
    values = np.arange(256, dtype=np.uint8)
    arr = np.stack([values, values[::-1], values], axis=-1)[None]  # (1, 256, 3)
    back = tensor_to_images(image_to_tensor(Image.fromarray(arr)))[0]
    assert np.array_equal(np.asarray(back), arr)


def test_mask_tensor():
    mask = Image.fromarray(np.array([[0, 255], [51, 102]], dtype=np.uint8))
    t = mask_to_tensor(mask)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert torch.allclose(t[0, 0], torch.tensor([[0.0, 1.0], [0.2, 0.4]]))


def test_tensor_to_images_clamps_and_handles_batches():
    t = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5).clone()
    t[1] = -t[1]
    out = tensor_to_images(t)
    assert len(out) == 2
    assert np.asarray(out[0])[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert np.asarray(out[1])[0, :, 0].tolist() == [255, 255, 128, 0, 0]
    assert len(tensor_to_images(t[0])) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_to_images_matches_diffusers_postprocess(dtype):
    diffusers_ip = pytest.importorskip("diffusers.image_processor")
    gen = torch.Generator().manual_seed(0)
    t = (torch.randn(2, 3, 33, 17, generator=gen) * 0.8).to(dtype)
    ours = tensor_to_images(t)
    theirs = diffusers_ip.VaeImageProcessor().postprocess(t, output_type="pil")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs, strict=True):
        assert a.mode == b.mode == "RGB"
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_image_to_tensor_matches_diffusers_preprocess():
    diffusers_ip = pytest.importorskip("diffusers.image_processor")
    arr = _rng().integers(0, 256, (16, 24, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    theirs = diffusers_ip.VaeImageProcessor(do_resize=False).preprocess(img)
    assert torch.equal(image_to_tensor(img), theirs)


def test_tensor_to_images_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        tensor_to_images(torch.zeros(1, 2, 4, 4))


# --- resize_to -----------------------------------------------------------------------------------


def test_resize_to():
    img = Image.new("RGB", (10, 20), (9, 8, 7))
    out = resize_to(img, 30, 12)
    assert out.size == (30, 12) and tuple(np.asarray(out)[5, 5]) == (9, 8, 7)
    same = resize_to(img, 10, 20)
    assert same.size == (10, 20) and same is not img
    nearest = resize_to(Image.fromarray(np.array([[0, 255]], dtype=np.uint8)), 4, 1, Image.Resampling.NEAREST)
    assert np.asarray(nearest).tolist() == [[0, 0, 255, 255]]
    with pytest.raises(InvalidRequestError):
        resize_to(img, 0, 5)
