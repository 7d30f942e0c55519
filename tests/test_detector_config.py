"""Detector configs: named presets, Detectron2-style YAML (py-bottom-up-attention files), label files."""
import json

import pytest

from extractor.detector.config import ConfigError, DetectorConfig, save_config_yaml
from extractor.detector.labels import attribute_names, display_name, object_names
from extractor.detector.model import VGDetector


def test_named_configs():
    r101 = DetectorConfig.load("VG-R101-C4")
    assert r101 == DetectorConfig.load() == DetectorConfig()
    assert r101.num_blocks == (3, 4, 23, 3) and r101.depth == 101 and r101.feature_dim == 2048
    assert (r101.min_size_test, r101.max_size_test) == (600, 1000)
    assert (r101.rpn_pre_nms_topk, r101.rpn_nms_thresh, r101.rpn_post_nms_topk) == (6000, 0.7, 300)
    assert r101.pixel_mean == (102.9801, 115.9465, 122.7717) and r101.num_anchors == 12
    assert (r101.num_classes, r101.num_attributes, r101.pooler_resolution) == (1600, 400, 14)
    assert r101.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0) and not r101.res5_halve
    assert DetectorConfig.load("VG-R50-C4").depth == 50
    tiny = DetectorConfig.load("tiny")
    assert tiny.feature_dim == 256 and tiny.depth is None and max(tiny.num_blocks) <= 2
    with pytest.raises(ConfigError, match="unknown config 'VG-R152'"):
        DetectorConfig.load("VG-R152")


def test_to_dict_is_json_and_round_trips():
    cfg = DetectorConfig.load("tiny")
    d = json.loads(cfg.to_json())
    assert d["num_blocks"] == list(cfg.num_blocks) and d["name"] == "tiny"
    assert DetectorConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match="colour"):
        DetectorConfig.from_dict({**d, "colour": 1})


def test_py_bottom_up_attention_yaml_chain_gives_the_released_model(tmp_path):
    (tmp_path / "Base-VG-Detection.yaml").write_text(
        '_BASE_: "https://raw.githubusercontent.com/facebookresearch/detectron2/master/configs/Base-RCNN-C4.yaml"\n'
        "MODEL:\n  ROI_HEADS:\n    NAME: Res5ROIHeadsForVGStride\n")
    (tmp_path / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml").write_text("""
_BASE_: "Base-VG-Detection.yaml"
MODEL:
  CAFFE_MAXPOOL: True
  PIXEL_MEAN: [102.9801, 115.9465, 122.7717]
  MASK_ON: False
  RESNETS:
    DEPTH: 101
  PROPOSAL_GENERATOR:
    HID_CHANNELS: 512
  ANCHOR_GENERATOR:
    SIZES: [[64, 128, 256, 512]]
  RPN:
    POST_NMS_TOPK_TEST: 300
  ROI_HEADS:
    NUM_CLASSES: 1600
    SCORE_THRESH_TEST: 0.2
  ROI_BOX_HEAD:
    RES5HALVE: False
    POOLER_TYPE: "ROIPool"
    ATTR: True
    NUM_ATTRS: 400
INPUT:
  MIN_SIZE_TEST: 600
  MAX_SIZE_TEST: 1000
SOLVER:
  STEPS: (210000, 250000)
  MAX_ITER: 270000
""")
    cfg = DetectorConfig.load(tmp_path / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml")
    assert cfg.name == "faster_rcnn_R_101_C4_attr_caffemaxpool"
    # the same network; its input is Detectron2's resize, as py-bottom-up-attention runs it
    assert cfg.resize == "detectron2"
    assert cfg.replace(name="VG-R101-C4", resize="caffe") == DetectorConfig.load("VG-R101-C4")
    yml = tmp_path / "faster_rcnn_R_101_C4_attr_caffemaxpool.yaml"
    yml.write_text(yml.read_text().replace("  MAX_SIZE_TEST: 1000", "  MAX_SIZE_TEST: 1000\n  RESIZE: caffe"))
    assert DetectorConfig.load(yml).replace(name="VG-R101-C4") == DetectorConfig.load("VG-R101-C4")


def test_resize_modes_of_the_named_configs_and_yaml(tmp_path):
    assert DetectorConfig.load("VG-R101-C4").resize == "caffe"  # the released weights' own input rule
    assert DetectorConfig.load("VG-R50-C4").resize == "caffe"
    assert DetectorConfig.load("tiny").resize == "detectron2"  # trained here, one rule at train and test
    assert DetectorConfig.load("detectron2-C4").resize == "detectron2"
    yml = tmp_path / "r.yaml"
    yml.write_text("_BASE_: tiny\nINPUT: {RESIZE: caffe}\n")
    assert DetectorConfig.load(yml).resize == "caffe"
    yml.write_text("_BASE_: tiny\nINPUT: {RESIZE: opencv}\n")
    with pytest.raises(ConfigError, match="resize must be one of"):
        DetectorConfig.load(yml)
    saved = save_config_yaml(DetectorConfig.load("tiny").replace(resize="caffe"), tmp_path / "out" / "c.yaml")
    assert "RESIZE: caffe" in saved.read_text()
    assert DetectorConfig.load(saved).resize == "caffe"


def test_yaml_on_a_named_base_with_own_labels(tmp_path):
    (tmp_path / "objects.txt").write_text("red cube\nblue ball,ball\ngreen cone\n")
    (tmp_path / "attributes.txt").write_text("shiny\nmatte\n")
    yml = tmp_path / "demo.yaml"
    yml.write_text("_BASE_: tiny\nNAME: demo\nMODEL:\n  ROI_HEADS: {NUM_CLASSES: 3}\n"
                   "  ROI_ATTRIBUTE_HEAD: {NUM_ATTRIBUTES: 2}\n  RESNETS: {NUM_BLOCKS: [1, 1, 1, 1]}\n"
                   "INPUT: {MIN_SIZE_TEST: 160, MAX_SIZE_TEST: 200}\n"
                   "LABELS: {OBJECTS: objects.txt, ATTRIBUTES: attributes.txt}\n")
    cfg = DetectorConfig.load(str(yml))
    assert (cfg.name, cfg.num_classes, cfg.num_attributes, cfg.num_blocks) == ("demo", 3, 2, (1, 1, 1, 1))
    assert cfg.res2_out_channels == 32 and cfg.min_size_test == 160
    assert object_names(cfg.object_labels) == ["red cube", "blue ball", "green cone"]
    sd = VGDetector(cfg).state_dict()
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (4, 256)
    assert sd["roi_heads.box_predictor.attr_score.weight"].shape == (3, 64)
    yml.write_text(yml.read_text().replace("NUM_CLASSES: 3", "NUM_CLASSES: 4"))
    with pytest.raises(ConfigError, match="object label file has 3 names but num_classes is 4"):
        DetectorConfig.load(yml)


@pytest.mark.parametrize("text, message", [
    ("MODEL:\n  RPN:\n    PRE_NMS_TOPK_TSET: 10\n", "unknown config key MODEL.RPN.PRE_NMS_TOPK_TSET"),
    ("MODEL:\n  ROI_BOX_HEAD:\n    CLS_AGNOSTIC_BBOX_REG: True\n",
     "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True is not supported"),
    ("INPUT:\n  MIN_SIZE_TEST: '600'\n", "INPUT.MIN_SIZE_TEST must be an integer"),
    ("MODEL:\n  RESNETS:\n    DEPTH: 34\n", "MODEL.RESNETS.DEPTH must be one of"),
    ("_BASE_: nowhere.yaml\n", "_BASE_ 'nowhere.yaml' is neither"),
    ("MODEL:\n  ROI_BOX_HEAD:\n    POOLER_TYPE: ROIMagic\n", "pooler_type must be one of"),
])
def test_bad_yaml_is_an_error_naming_the_key(tmp_path, text, message):
    yml = tmp_path / "bad.yaml"
    yml.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DetectorConfig.load(yml)
    with pytest.raises(ConfigError, match="config file not found"):
        DetectorConfig.load(tmp_path / "missing.yaml")


def test_shipped_labels():
    objects, attributes = object_names(), attribute_names()
    assert len(objects) == 1600 and len(attributes) == 400
    assert objects[0] == "yolk" and objects[16] == "stop sign"  # line 17 is "stop sign,stopsign"
    assert attributes[0] == "gray"  # "gray,grey"
    assert all(name and "," not in name for name in objects + attributes)
    assert display_name(" tshirt,t-shirt,t shirt ") == "tshirt"
