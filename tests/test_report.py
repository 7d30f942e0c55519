"""The report: summary.json, sections in Markdown and HTML, the benchmarks' breakdowns, one grid of
pretraining curves, the detector's AP per class, and examples that mix right and wrong answers."""
import csv
import json

import cv2
import pytest

from tasks.benchmarks import GQA, NLVR2, VQA
from tasks.report import (
    Body,
    benchmark_section,
    choose_examples,
    detector_section,
    pretraining_section,
    summarize,
    summary_section,
    write_report,
)


def evaluation(acc, majority, official=None):
    return {"accuracy": acc, "majority_accuracy": majority, "official": official}


def test_summary_numbers():
    evals = {"vqa": {"pretrained": evaluation(71.5, 22.0), "scratch": evaluation(60.25, 22.0)},
             "gqa": {"scratch": evaluation(40.0, 27.1)},
             "nlvr2": {}}
    summary = summarize(evals, {"map50": 0.8125}, seconds=312.46)
    assert summary == {"seconds": 312.5, "detector": {"map50": 0.8125},
                       "vqa": {"pretrained": 71.5, "scratch": 60.25, "majority": 22.0},
                       "gqa": {"pretrained": None, "scratch": 40.0, "majority": 27.1},
                       "nlvr2": {"pretrained": None, "scratch": None, "majority": None}}
    section = summary_section(summary)
    assert "| VQA v2 (accuracy, official) | 71.50 | 60.25 | 22.00 |" in section.markdown
    assert "| GQA (accuracy, official) | - | 40.00 | 27.10 |" in section.markdown
    assert "mAP@0.5 = 81.2%" in section.markdown and "<td>71.50</td>" in section.html


def test_sections_make_one_self_contained_page_in_both_formats(tmp_path):
    summary = summarize({}, None, 5.0)
    plain = Body().para("a <b> | c").table(["x", "y"], [["1|2", 0.5], [None, True]]).section("Odd & ends")
    paths = write_report(tmp_path, [summary_section(summary), None, plain], title="Demo", summary=summary,
                         metrics={"evaluations": {"vqa": {"x": 1}}})
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert md.startswith("# Demo\n\nSections: [Summary](#summary), [Odd & ends](#odd-ends).")
    assert "| x | y |\n|---|---|\n| 1\\|2 | 0.50 |\n| - | True |" in md
    assert "<section id='odd-ends'><h2>Odd &amp; ends</h2><p>a &lt;b&gt; | c</p>" in page
    assert "<nav><a href='#summary'>Summary</a><a href='#odd-ends'>Odd &amp; ends</a></nav>" in page
    assert page.count("<section") == 2 and "<a href='metrics.json'>metrics.json</a>" in page
    assert "[metrics.json](metrics.json)" in md and '"evaluations"' not in page  # linked, not printed
    assert json.loads(paths["metrics"].read_text()) == {"evaluations": {"vqa": {"x": 1}}}
    assert json.loads(paths["summary"].read_text()) == summary


def test_each_benchmark_shows_its_official_breakdowns():
    vqa = {"overall": 50.0, "perAnswerType": {"yes/no": 70.0, "number": 20.0},
           "perQuestionType": {"what color is the": 40.0, "how many": 20.0}}
    runs = {"pretrained": evaluation(50.0, 30.0, {"model": vqa, "majority": {**vqa, "perAnswerType": {
        "yes/no": 60.0, "number": 0.0}}}), "scratch": evaluation(40.0, 30.0, {"model": vqa, "majority": vqa})}
    md = benchmark_section(VQA, runs).markdown
    assert "### Per answer type\n\n| answer type | pretrained + fine-tuned | from scratch | majority answer |" in md
    assert "| number | 20.00 | 20.00 | 0.00 |\n| yes/no | 70.00 | 70.00 | 60.00 |" in md
    assert "| what color is the | 40.00 | 40.00 | 40.00 |" in md
    gqa = {"accuracy": 40.0, "binary": 60.0, "open": 20.0, "consistency": 30.0, "validity": 90.0,
           "plausibility": 80.0, "distribution": 0.12, "accuracyPerStructuralType": {"verify": 60.0},
           "accuracyPerSemanticType": {"attr": 35.0}, "accuracyPerSteps": {}, "accuracyPerLength": {}}
    md = benchmark_section(GQA, {"scratch": evaluation(40.0, 20.0, {"model": gqa, "majority": gqa})}).markdown
    rows = [line.split(" | ")[0][2:] for line in md.split("### Overall")[1].split("###")[0].splitlines()
            if line.startswith("| ") and "metric" not in line]
    assert rows == ["accuracy", "binary", "open", "consistency", "validity", "plausibility",
                    "distribution (chi-square / 100, lower is better)"]
    assert "| verify | 60.00 | 60.00 |" in md and "| attr | 35.00 | 35.00 |" in md
    nlvr2 = {"accuracy": 0.55, "consistency": 0.125}
    md = benchmark_section(NLVR2, {"pretrained": evaluation(55.0, 50.0, {"model": nlvr2, "majority": nlvr2})}).markdown
    assert "| accuracy | 55.00 | 55.00 |\n| consistency | 12.50 | 12.50 |" in md
    assert benchmark_section(NLVR2, {}) is None


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_pretraining_curves_are_one_grid_of_training_and_validation(tmp_path):
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    assert pretraining_section(run, out) is None  # nothing logged: no section
    write_csv(run / "logs" / "train.csv", [{"step": s, "loss": 5 - s / 10, "mlm": 3 - s / 20, "matched": 0.69,
                                            "qa": ""} for s in range(10, 60, 10)])
    write_csv(run / "logs" / "eval.csv", [{"step": 25, "valid_loss": 4.0, "valid_mlm": 2.5},
                                          {"step": 50, "valid_loss": 3.5, "valid_mlm": 2.0}])
    section = pretraining_section(run, out)
    assert section.markdown.startswith("![pretraining losses](figures/pretraining.png)")
    assert "5 logged steps, 2 validations" in section.markdown
    h, w = cv2.imread(str(out / "figures" / "pretraining.png")).shape[:2]
    assert (w, h) == (1600, 320)  # three panels (loss, mlm, matched; qa never logged) on one row of four


def test_detector_section_lists_ap_per_class_best_first():
    assert detector_section(None) is None and detector_section({"map50": None, "per_class": {}}) is None
    md = detector_section({"map50": 0.5, "per_class": {"circle": 0.25, "star": 0.75}, "val_images": 12,
                           "region_accuracy": {"object": 0.5}}).markdown
    assert md.startswith("mAP@0.5 = 50.0% over 2 classes on 12 validation images.")
    assert "| class | AP@0.5 (%) |\n|---|---|\n| star | 75.00 |\n| circle | 25.00 |" in md
    assert "object 50.0%" in md


@pytest.mark.parametrize("n_right", [10, 3])
def test_examples_mix_right_and_wrong_answers_at_a_fixed_seed(n_right):
    entries = [{"question_id": i, "sent": f"q{i}", "img_id": "a", "label": {"yes": 1.0}} for i in range(20)]
    predictions = {i: "yes" if i < n_right else "no" for i in range(20)}
    chosen = choose_examples(VQA, entries, predictions, 8, seed=0)
    right = [predictions[e["question_id"]] == "yes" for e in chosen]
    assert len(chosen) == 8 and sum(right) == min(4, n_right)
    assert right[:2 * min(4, n_right)] == [True, False] * min(4, n_right)  # in turn while both last
    assert chosen == choose_examples(VQA, entries, predictions, 8, seed=0)
    assert chosen != choose_examples(VQA, entries, predictions, 8, seed=1)
