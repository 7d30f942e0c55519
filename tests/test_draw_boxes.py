"""draw_boxes / python -m extractor.draw: boxes land on the right pixels with Visual Genome captions."""
import cv2
import numpy as np
import pytest
import skimage.data
from PIL import Image

from extractor.detector.labels import attribute_names, object_names
from extractor.draw import caption, draw_boxes, main
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
