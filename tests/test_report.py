import json

from tasks.report import summarize, write_report


def evaluation(acc, majority):
    return {"accuracy": acc, "majority_accuracy": majority}


def test_summary_and_report_files(tmp_path):
    evals = {"vqa": {"pretrained": evaluation(71.5, 22.0), "scratch": evaluation(60.25, 22.0)},
             "gqa": {"scratch": evaluation(40.0, 27.1)},
             "nlvr2": {}}
    summary = summarize(evals, {"map50": 0.8125}, seconds=312.46)
    assert summary == {"seconds": 312.5, "detector": {"map50": 0.8125},
                       "vqa": {"pretrained": 71.5, "scratch": 60.25, "majority": 22.0},
                       "gqa": {"pretrained": None, "scratch": 40.0, "majority": 27.1},
                       "nlvr2": {"pretrained": None, "scratch": None, "majority": None}}
    (tmp_path / "plots").mkdir()
    paths = write_report(tmp_path, summary, title="Demo", details={"x": 1},
                         curves=[tmp_path.joinpath("plots/mlm.png").relative_to(tmp_path)],
                         detections=[(tmp_path.joinpath("img.png").relative_to(tmp_path), "3 boxes <b>")])
    md = paths["markdown"].read_text()
    assert "| VQA v2 (accuracy, official) | 71.50 | 60.25 | 22.00 |" in md
    assert "| GQA (accuracy, official) | - | 40.00 | 27.10 |" in md
    assert "mAP@0.5 = 81.2" in md and "![mlm](plots/mlm.png)" in md
    page = paths["html"].read_text()
    assert "<td>71.50</td>" in page and "3 boxes &lt;b&gt;" in page and "<img src='img.png'>" in page
    assert json.loads(paths["summary"].read_text()) == summary
