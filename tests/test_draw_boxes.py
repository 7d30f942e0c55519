"""draw_boxes / python -m extractor.draw: boxes land on the right pixels with Visual Genome captions."""
import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from extractor.detector.labels import attribute_names, object_names
from extractor.draw import (
    _colour,
    _label_spots,
    box_name,
    caption,
    draw_attention,
    draw_boxes,
    main,
    readable,
    side_by_side,
)
from extractor.store import FeatureWriter, ImageFeatures

OBJECTS, ATTRIBUTES = object_names(), attribute_names()


def record(boxes, conf=None, objects=None, attrs=None, h=100, w=200) -> ImageFeatures:
    n = len(boxes)
    return ImageFeatures(
        "img", h, w, np.asarray(boxes, np.float32), np.zeros((n, 4), np.float32),
        np.asarray(objects if objects is not None else [0] * n, np.int64),
        np.asarray(conf if conf is not None else [0.9] * n, np.float32),
        np.asarray(attrs if attrs is not None else [0] * n, np.int64), np.full(n, 0.5, np.float32))


def changed(a, b):
    return (a != b).any(axis=-1)


def test_caption_uses_visual_genome_names():
    rec = record([[0, 0, 10, 10], [0, 0, 5, 5]], conf=[0.853, 0.2], objects=[OBJECTS.index("plate"), -1],
                 attrs=[ATTRIBUTES.index("white"), -1])
    assert caption(rec, 0, OBJECTS, ATTRIBUTES) == "white plate 0.85"
    assert caption(rec, 1, OBJECTS, ATTRIBUTES) == "#-1 0.20"  # unlabeled (Caffe TSV import)
    assert OBJECTS[OBJECTS.index("stop sign")] == "stop sign"  # first synonym of "stop sign,stopsign"


def test_box_edges_drawn_where_the_box_is():
    img = np.full((100, 200, 3), 255, np.uint8)
    out = draw_boxes(img, record([[50, 40, 150, 90]]), OBJECTS, ATTRIBUTES)
    assert out.shape == img.shape and (img == 255).all()  # input untouched
    diff = changed(out, img)
    assert diff[65, 50] and diff[65, 150] and diff[90, 100]  # left, right and bottom edges
    assert not diff[65, 100] and not diff[5:30, 160:].any()  # inside and far away stay white


def test_boxes_rescaled_to_a_resized_image():
    img = np.full((50, 100, 3), 255, np.uint8)  # half the record's 100 x 200
    diff = changed(draw_boxes(img, record([[50, 40, 150, 90]]), OBJECTS, ATTRIBUTES), img)
    assert diff[32, 25] and diff[32, 75] and not diff[32, 50]


def test_top_boxes_by_confidence():
    img = np.full((100, 200, 3), 255, np.uint8)
    rec = record([[10, 60, 40, 95], [150, 60, 190, 95]], conf=[0.3, 0.8])
    diff = changed(draw_boxes(img, rec, OBJECTS, ATTRIBUTES, max_boxes=1), img)
    assert diff[80, 150] and not diff[80, 10]  # only the more confident box


def test_bad_image_refused():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        draw_boxes(np.zeros((10, 10), np.uint8), record([[0, 0, 1, 1]]), OBJECTS, ATTRIBUTES)


def test_command_line(tmp_path, capsys):
    photo = skimage.data.astronaut()
    Image.fromarray(photo).save(tmp_path / "astronaut.png")
    rec = record([[100, 50, 300, 400], [20, 20, 80, 80]], conf=[0.9, 0.6],
                 objects=[OBJECTS.index("man"), OBJECTS.index("flag")], attrs=[ATTRIBUTES.index("white"), 0],
                 h=512, w=512)
    rec.img_id = "astronaut"
    with FeatureWriter(tmp_path / "f.h5", max_boxes=4, feature_dim=4) as w:
        w.add(rec)
        w.finalize()
    out = tmp_path / "viz" / "astronaut.png"
    features = ["--features", str(tmp_path / "f.h5")]
    args = features + ["--image", str(tmp_path / "astronaut.png"), "--output", str(out)]
    assert main(args + ["--img-id", "astronaut", "--top", "1"]) == 0
    assert "1 boxes of astronaut" in capsys.readouterr().out
    drawn = cv2.imread(str(out))
    diff = changed(drawn, photo[..., ::-1])
    assert drawn.shape == (512, 512, 3) and diff[200, 100] and not diff[50, 20]
    with pytest.raises(SystemExit):
        main(args + ["--img-id", "nobody"])
    assert "--img-id nobody is not in" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(features + ["--image", str(tmp_path / "gone.png"), "--output", str(out),
                         "--img-id", "astronaut"])
    assert "gone.png: not found" in capsys.readouterr().err


def test_readable_scales_the_shorter_side_to_384_within_a_longest_side():
    assert readable(np.zeros((128, 256, 3), np.uint8)).shape == (384, 768, 3)
    assert readable(np.zeros((480, 640, 3), np.uint8)).shape == (384, 512, 3)
    assert readable(np.zeros((200, 2000, 3), np.uint8)).shape == (102, 1024, 3)  # a panorama: the long side caps


def test_attention_shades_each_box_by_its_share_and_labels_the_most_attended():
    img = np.full((100, 200, 3), 200, np.uint8)
    boxes = np.array([[0, 0, 50, 50], [100, 50, 200, 100], [60, 0, 90, 30]], np.float32)
    rec = record(boxes, objects=[OBJECTS.index("plate"), OBJECTS.index("cup"), OBJECTS.index("fork")],
                 attrs=[ATTRIBUTES.index("white"), -1, -1])
    assert box_name(rec, 0, OBJECTS, ATTRIBUTES) == "white plate"
    out = draw_attention(readable(img), boxes, np.array([0.6, 0.3, 0.1]), [box_name(rec, j, OBJECTS, ATTRIBUTES)
                                                                         for j in range(3)], (100, 200))
    assert out.shape == (384, 768, 3)
    def brightness(x: int, y: int) -> int:  # the image is scaled x3.84: pixels well inside each box
        return int(out[y, x].astype(int).sum())

    # the top box keeps its brightness; the others 0.25 + 0.75 x their share relative to it; outside: 0.25
    assert [brightness(*xy) for xy in ((100, 150), (600, 300), (290, 80), (500, 100))] == [600, 375, 225, 150]
    for rank, (top, bottom) in enumerate(((0, 40), (150, 192), (0, 40))):  # captions above, or inside the top
        assert (out[top:bottom] == _colour(rank)).all(axis=-1).sum() > 200, rank
    with pytest.raises(ValueError, match="3 boxes, 2 weights"):
        draw_attention(img, boxes, np.array([0.5, 0.5]), ["a", "b", "c"], (100, 200))


def test_captions_never_cover_each_other():
    same_place = [(10, 40, 60, 90)] * 4
    spots = _label_spots(same_place, ["one 40%", "two 30%", "three 20%", "four 10%"], 0.5, (200, 200))
    assert spots[0][3] == 40  # the first sits just above its box
    for i, a in enumerate(spots):
        assert 0 <= a[1] and a[3] <= 200
        for b in spots[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])


def test_side_by_side_puts_a_pair_on_one_row():
    row = side_by_side([np.zeros((384, 384, 3), np.uint8), np.zeros((192, 256, 3), np.uint8)])
    assert row.shape == (384, 384 + 8 + 512, 3) and (row[:, 384:392] == 255).all()
