"""load_image: the pixels cv2.imread(IMREAD_COLOR) would give, and short reasons for files it cannot read."""
import os
import struct
import zlib

import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from extractor.images import DEFAULT_MAX_PIXELS, ImageReadError, image_id, list_images, load_image

ASTRONAUT = skimage.data.astronaut()  # (512, 512, 3) RGB photo
CAMERA = skimage.data.camera()        # (512, 512) grayscale photo


def bgr(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., ::-1]


def reason(path) -> str:
    with pytest.raises(ImageReadError) as e:
        load_image(path)
    assert e.value.path == str(path) and str(path) in str(e.value)
    return e.value.reason


def test_rgb_png_exact_and_jpeg_matches_opencv(tmp_path):
    Image.fromarray(ASTRONAUT).save(tmp_path / "a.png")
    got = load_image(tmp_path / "a.png")
    assert got.shape == (512, 512, 3) and got.dtype == np.uint8 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, bgr(ASTRONAUT))
    Image.fromarray(ASTRONAUT).save(tmp_path / "a.jpg", quality=95)
    diff = np.abs(load_image(tmp_path / "a.jpg").astype(int) - cv2.imread(str(tmp_path / "a.jpg")))
    assert diff.mean() < 1.0 and diff.max() <= 8  # both libjpeg; IDCT rounding may differ slightly


@pytest.mark.parametrize("mode", ["L", "LA", "1", "P"])
def test_gray_bilevel_and_palette_match_opencv(tmp_path, mode):
    src = Image.fromarray(CAMERA if mode in ("L", "LA", "1") else ASTRONAUT).convert(mode)
    src.save(tmp_path / "x.png")
    got = load_image(tmp_path / "x.png")
    np.testing.assert_array_equal(got, cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_COLOR))
    if mode == "L":
        np.testing.assert_array_equal(got, np.repeat(CAMERA[..., None], 3, axis=2))


def test_rgba_drops_alpha_keeping_colour_under_transparency(tmp_path):
    rgba = np.dstack([ASTRONAUT, np.zeros(ASTRONAUT.shape[:2], np.uint8)])  # fully transparent
    Image.fromarray(rgba).save(tmp_path / "t.png")
    got = load_image(tmp_path / "t.png")
    np.testing.assert_array_equal(got, bgr(ASTRONAUT))
    np.testing.assert_array_equal(got, cv2.imread(str(tmp_path / "t.png"), cv2.IMREAD_COLOR))


def test_palette_with_transparency(tmp_path):
    p = Image.fromarray(ASTRONAUT).quantize(16)
    p.save(tmp_path / "p.png", transparency=0)
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), cv2.imread(str(tmp_path / "p.png")))


def test_16_bit_keeps_high_byte(tmp_path):
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (30, 40), dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(got, np.repeat((gray16 >> 8).astype(np.uint8)[..., None], 3, axis=2))
    np.testing.assert_array_equal(got, cv2.imread(str(tmp_path / "g16.png"), cv2.IMREAD_COLOR))
    colour16 = rng.integers(0, 65536, (30, 40, 3), dtype=np.uint16)  # BGR, as OpenCV writes it
    for name in ("c16.png", "c16.tif"):
        assert cv2.imwrite(str(tmp_path / name), colour16)
        np.testing.assert_array_equal(load_image(tmp_path / name), (colour16 >> 8).astype(np.uint8))


def test_cmyk_jpeg_colours(tmp_path):
    Image.fromarray(ASTRONAUT).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    got = load_image(tmp_path / "c.jpg").astype(int)
    assert np.abs(got - bgr(ASTRONAUT)).mean() < 3  # right colours, not inverted
    assert np.abs(got - cv2.imread(str(tmp_path / "c.jpg"))).mean() < 1.5


@pytest.mark.parametrize("orientation, corner", [(1, (0, 0)), (6, (0, -1)), (3, (-1, -1)), (8, (-1, 0))])
def test_exif_orientation_applied(tmp_path, orientation, corner):
    stored = np.full((40, 60, 3), 255, np.uint8)  # 60 wide, 40 high, red block at stored top-left
    stored[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.jpg", quality=100, exif=exif)
    got = load_image(tmp_path / "o.jpg")
    assert got.shape[:2] == ((40, 60) if orientation in (1, 3) else (60, 40))
    r, c = corner
    np.testing.assert_allclose(got[r * 5 if r else 5, c * 5 if c else 5], (0, 0, 255), atol=12)  # BGR red
    assert np.abs(got.astype(int) - cv2.imread(str(tmp_path / "o.jpg"))).max() <= 8  # OpenCV rotates too


def test_one_pixel_and_large_images(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    np.testing.assert_array_equal(load_image(tmp_path / "one.png"), [[[30, 20, 10]]])
    big = np.tile(ASTRONAUT, (6, 8, 1))  # 3072 x 4096, far above the detector's 1000 px limit
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=80)
    assert load_image(tmp_path / "big.jpg").shape == (3072, 4096, 3)
    too_large = reason_with(tmp_path / "big.jpg", max_pixels=10_000_000)
    assert too_large == "too large: 4096x3072 pixels > 10000000"


def reason_with(path, **kw) -> str:
    with pytest.raises(ImageReadError) as e:
        load_image(path, **kw)
    return e.value.reason


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_decompression_bomb_refused_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(5000, 4000))
    assert reason_with(tmp_path / "bomb.png", max_pixels=10**7) == "too large: 5000x4000 pixels > 10000000"
    (tmp_path / "huge.png").write_bytes(png_header_only(30000, 30000))  # 900 MP: over the default limit
    assert reason(tmp_path / "huge.png").startswith("too large")


def test_size_limit_is_one_constant_and_names_the_size_even_past_pillows_own_limit(tmp_path):
    """Pillow refuses over 2 x Image.MAX_IMAGE_PIXELS by itself; our limit decides alone and says the size."""
    assert DEFAULT_MAX_PIXELS == 89_478_485 == 2 ** 30 // 4 // 3
    (tmp_path / "over.png").write_bytes(png_header_only(9460, 9460))  # 89,491,600
    assert reason(tmp_path / "over.png") == "too large: 9460x9460 pixels > 89478485"
    (tmp_path / "huge.png").write_bytes(png_header_only(15000, 13000))  # 195 MP: Pillow's own error before
    assert reason(tmp_path / "huge.png") == "too large: 15000x13000 pixels > 89478485"
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # Pillow's global is left as it was


def test_raised_limit_decodes_what_pillow_alone_would_refuse(tmp_path, monkeypatch):
    """A scaled-down stand-in for a 200 MP scan: Pillow's limit at 1,000 refuses 64 x 64 (over 2,000) by itself."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.fromarray(ASTRONAUT[:64, :64]).save(tmp_path / "scan.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "scan.png")
    assert reason_with(tmp_path / "scan.png", max_pixels=4095) == "too large: 64x64 pixels > 4095"
    np.testing.assert_array_equal(load_image(tmp_path / "scan.png", max_pixels=4096), bgr(ASTRONAUT[:64, :64]))
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_symlinks_in_a_folder_are_listed_and_broken_ones_give_reasons(tmp_path):
    Image.fromarray(ASTRONAUT[:32, :48]).save(tmp_path / "good.png")
    for name, target in (("link.png", "good.png"), ("dangling.jpg", "gone/missing.jpg"), ("loop.jpg", "loop.jpg"),
                         ("ping.jpg", "pong.jpg"), ("pong.jpg", "ping.jpg")):
        os.symlink(target, tmp_path / name)
    names = ["dangling.jpg", "good.png", "link.png", "loop.jpg", "ping.jpg", "pong.jpg"]
    assert list_images(tmp_path) == [tmp_path / n for n in names]
    np.testing.assert_array_equal(load_image(tmp_path / "link.png"), load_image(tmp_path / "good.png"))
    assert reason(tmp_path / "dangling.jpg") == "dangling symlink -> gone/missing.jpg"
    assert reason(tmp_path / "loop.jpg") == "symlink loop"
    assert reason(tmp_path / "ping.jpg") == "symlink loop"
    # a list file naming a broken link lists it too (its failure is the image's); a name with nothing behind it
    # is a mistake in the list, refused before any work
    lst = tmp_path / "list.txt"
    lst.write_text("good.png\ndangling.jpg\nloop.jpg\n")
    assert list_images(lst) == [tmp_path / n for n in ("good.png", "dangling.jpg", "loop.jpg")]
    lst.write_text("good.png\nnothing.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"list\.txt:2: .*nothing\.jpg"):
        list_images(lst)
    with pytest.raises(FileNotFoundError, match=r"dangling\.jpg does not exist \(a dangling symlink -> gone"):
        list_images(str(tmp_path / "dangling.jpg"))


def test_names_that_are_not_utf8_are_refused_before_work(tmp_path):
    """An id the feature store could not hold (a Latin-1 file name) is named up front, not at the first flush."""
    Image.fromarray(ASTRONAUT[:8, :8]).save(tmp_path / "ok.png")
    (tmp_path / "sub").mkdir()
    latin1 = os.path.join(os.fsencode(tmp_path / "sub"), b"caf\xe9.png")
    with open(latin1, "wb") as f:
        f.write((tmp_path / "ok.png").read_bytes())
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(rename them\): .*: b'.*/sub/caf\\xe9\.png'"):
        list_images(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"ok.png\nsub/caf\xe9.png\n")
    with pytest.raises(ValueError, match=r"list\.txt:2: b'.*caf\\xe9\.png'"):
        list_images(lst)


def test_bad_files_give_short_reasons(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(ASTRONAUT).save(good, quality=90)
    data = good.read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "noeoi.jpg").write_bytes(data[:-2])
    (tmp_path / "header.jpg").write_bytes(data[:600])
    assert reason(tmp_path / "empty.jpg") == "empty file"
    assert reason(tmp_path / "text.jpg") == "not an image"
    assert reason(tmp_path / "half.jpg") == "truncated"
    assert reason(tmp_path / "noeoi.jpg") == "truncated"
    assert reason(tmp_path / "header.jpg") == "truncated"
    assert reason(tmp_path / "missing.jpg") == "not found"
    assert reason(tmp_path) == "not a file"


def test_truncated_and_corrupt_png(tmp_path):
    Image.fromarray(ASTRONAUT).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    for cut in (1, 12, 1000, len(data) // 2):  # 12 drops exactly the IEND chunk, which Pillow ignores
        (tmp_path / "cut.png").write_bytes(data[:-cut])
        assert reason(tmp_path / "cut.png") == "truncated", cut
    broken = bytearray(data)
    broken[200:300] = bytes(100)  # zeros inside the compressed stream
    (tmp_path / "broken.png").write_bytes(bytes(broken))
    assert reason(tmp_path / "broken.png").startswith("corrupt")


def test_image_id_is_the_stem():
    assert image_id("/data/coco/train2014/COCO_train2014_000000132417.jpg") == "COCO_train2014_000000132417"
    assert image_id("vg/2375429.jpg") == "2375429"
    assert image_id("nlvr2/train/10/train-10171-0-img0.png") == "train-10171-0-img0"


def make_tree(root):
    for rel in ("b/2.JPG", "a/1.png", "a/deep/3.jpeg", "c.Tif", ".hidden/4.jpg", "a/._5.jpg", "notes.txt"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_list_images_directory_recursive_sorted(tmp_path):
    make_tree(tmp_path)
    assert list_images(tmp_path) == [tmp_path / "a/1.png", tmp_path / "a/deep/3.jpeg", tmp_path / "b/2.JPG",
                                     tmp_path / "c.Tif"]
    assert list_images(str(tmp_path / "c.Tif")) == [tmp_path / "c.Tif"]


def test_list_images_list_file(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "lists").mkdir()
    lst = tmp_path / "lists" / "images.txt"
    lst.write_text(f"# images for a test\n\n../b/2.JPG\n  {tmp_path / 'a/1.png'}  \n../c.Tif\r\n")
    assert list_images(lst) == [tmp_path / "lists/../b/2.JPG", tmp_path / "a/1.png",
                                tmp_path / "lists/../c.Tif"]
    lst.write_text("../b/2.JPG\n# fine\n../b/missing.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"images\.txt:3: .*missing\.jpg"):
        list_images(lst)
    with pytest.raises(FileNotFoundError, match="nowhere.txt does not exist"):
        list_images(tmp_path / "nowhere.txt")


def test_list_images_python_list_and_duplicates(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "1.jpg").write_bytes(b"x")
    two = [tmp_path / "c.Tif", tmp_path / "a/1.png"]
    assert list_images([two[0], str(two[1])]) == two
    with pytest.raises(ValueError, match=r"duplicate image id '1': .*a/1\.png .* and .*x/1\.jpg"):
        list_images(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"entry 1: .*gone\.jpg"):
        list_images([tmp_path / "c.Tif", tmp_path / "gone.jpg"])
    lst = tmp_path / "l.txt"
    lst.write_text("c.Tif\nc.Tif\n")
    with pytest.raises(ValueError, match=r"duplicate image id 'c': .*l\.txt:1\) and .*l\.txt:2\)"):
        list_images(lst)


def test_float_tiff_is_an_unsupported_mode(tmp_path):
    Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)).save(tmp_path / "f.tif")
    assert reason(tmp_path / "f.tif") == "unsupported mode F"
