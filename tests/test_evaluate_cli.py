"""`python -m tasks.evaluate`: one JSON object on stdout; exit 2 and one line on stderr for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.evaluate import main

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "tests" / "data" / "nlvr2_dev.jsonl"


def write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def vqa(tmp_path):
    def ann(qid, qtype, atype, gts):
        return {"question_id": qid, "image_id": 1, "question_type": qtype, "answer_type": atype,
                "multiple_choice_answer": gts[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(gts)]}
    anns = {"annotations": [ann(1, "is this", "yes/no", ["yes"] * 10),
                            ann(2, "how many", "number", ["2"] + ["3"] * 9),
                            ann(3, "what color", "other", ["red"] * 2 + ["blue"] * 8)]}
    qs = {"data_subtype": "val2014",
          "questions": [{"image_id": 1, "question": "Q?", "question_id": i} for i in (1, 2, 3)]}
    return {"q": write(tmp_path / "q_val2014.json", qs), "a": write(tmp_path / "a.json", anns),
            "dir": tmp_path}


def test_vqa(capsys, vqa):
    preds = write(vqa["dir"] / "p.json", [{"question_id": q, "answer": a} for q, a in
                                          ((1, "Yes"), (2, "two"), (3, "red"))])
    code, out, err = run(capsys, "vqa", "--questions", vqa["q"], "--annotations", vqa["a"],
                         "--predictions", preds)
    assert code == 0 and err == ""
    assert json.loads(out) == {"overall": 30.0,   # "Yes" vs ten "yes": 0; "two" -> "2": 0.3; "red": 0.6
                               "perQuestionType": {"is this": 0.0, "how many": 30.0, "what color": 60.0},
                               "perAnswerType": {"yes/no": 0.0, "number": 30.0, "other": 60.0}}
    assert out.count("\n") == 1
    code, out, _ = run(capsys, "vqa", "--annotations", vqa["a"], "--predictions", preds, "--rules", "legacy")
    assert code == 0 and json.loads(out)["overall"] == 63.33


def test_vqa_missing_and_unknown_predictions(capsys, vqa):
    preds = write(vqa["dir"] / "p.json", [{"question_id": 1, "answer": "yes"}])
    code, out, err = run(capsys, "vqa", "--annotations", vqa["a"], "--predictions", preds)
    assert code == 2 and out == ""
    assert err == ("error: 2 of 3 questions have no prediction (first: 2, 3); "
                   "--allow-missing (allow_missing=True) scores them as wrong\n")
    code, out, _ = run(capsys, "vqa", "--annotations", vqa["a"], "--predictions", preds, "--allow-missing")
    assert code == 0 and json.loads(out)["overall"] == 33.33
    extra = write(vqa["dir"] / "x.json", [{"question_id": i, "answer": "yes"} for i in (1, 2, 3, 77, 78)])
    code, _, err = run(capsys, "vqa", "--annotations", vqa["a"], "--predictions", extra)
    assert code == 2 and "2 predictions are for unknown question ids (first: 77, 78)" in err


def test_vqa_questions_must_match_annotations(capsys, vqa):
    qs = write(vqa["dir"] / "q2_val2014.json",
               {"questions": [{"image_id": 1, "question": "Q?", "question_id": 1}]})
    preds = write(vqa["dir"] / "p.json", [{"question_id": i, "answer": "yes"} for i in (1, 2, 3)])
    code, _, err = run(capsys, "vqa", "--questions", qs, "--annotations", vqa["a"], "--predictions", preds)
    assert code == 2 and "do not hold the same questions (2 differ, first: [2, 3])" in err


@pytest.mark.parametrize("content, message", [
    ("[{\"question_id\": 1, \"answer\": \"yes\"},", "p.json: record 1: unexpected end of file"),
    ("[{\"question_id\": 1, \"answer\": \"yes\"} {}]", "p.json: record 0: expected ',' or ']'"),
    ("{\"question_id\": 1}", "p.json: expected a top-level JSON array"),
    ("[{\"question_id\": 1, \"answer\": 3}]", "p.json: record 0: question_id should be an integer"),
])
def test_malformed_predictions_exit_2_with_one_line(capsys, vqa, content, message):
    (vqa["dir"] / "p.json").write_text(content)
    code, out, err = run(capsys, "vqa", "--annotations", vqa["a"], "--predictions", vqa["dir"] / "p.json")
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_missing_file_names_the_option(capsys, tmp_path):
    code, _, err = run(capsys, "gqa", "--questions", tmp_path / "nope.json",
                       "--predictions", tmp_path / "p.json")
    assert code == 2 and err.startswith("error: --predictions: no such file:")


def test_gqa(capsys, tmp_path):
    def q(answer, structural, group):
        return {"imageId": "1", "question": "Is it red?", "answer": answer, "isBalanced": True,
                "types": {"structural": structural, "semantic": "attr", "detailed": "x"},
                "groups": {"global": group, "local": "l"}, "entailed": [], "semantic": []}
    qs = write(tmp_path / "testdev_balanced_questions.json",
               {"a": q("yes", "verify", None), "b": q("red", "query", "color"),
                "c": q("blue", "query", "color")})
    preds = write(tmp_path / "p.json", [{"questionId": k, "prediction": v}
                                        for k, v in {"a": "yes", "b": "red", "c": "green"}.items()])
    choices = write(tmp_path / "c.json", {k: {"valid": ["yes", "red", "blue"], "plausible": ["yes", "red"]}
                                          for k in "abc"})
    code, out, _ = run(capsys, "gqa", "--questions", qs, "--predictions", preds, "--choices", choices)
    r = json.loads(out)
    assert code == 0
    assert r["accuracy"] == pytest.approx(200 / 3) and r["binary"] == 100.0 and r["open"] == 50.0
    assert r["validity"] == pytest.approx(200 / 3) and r["plausibility"] == pytest.approx(200 / 3)
    assert r["distribution"] == pytest.approx(0.01) and "consistency" not in r   # blue: (0 - 1)^2 / 1 / 100


def test_nlvr2_on_the_real_dev_split(capsys, tmp_path):
    ids = [json.loads(line)["identifier"] for line in DEV.read_text().splitlines() if line.strip()]
    csv = tmp_path / "p.csv"
    csv.write_text("".join(f"{i},True\n" for i in ids))
    code, out, _ = run(capsys, "nlvr2", "--data", DEV, "--predictions", csv)
    assert code == 0 and json.loads(out) == {"accuracy": 3551 / 6982, "consistency": 78 / 2018}
    csv.write_text("".join(f"{i},True\n" for i in ids[:-5]))
    code, _, err = run(capsys, "nlvr2", "--data", DEV, "--predictions", csv)
    assert code == 2 and err.startswith("error: 5 of 6982 examples have no prediction (first: 'dev-")


def test_python_dash_m_entry_point(tmp_path):
    ids = [json.loads(line)["identifier"] for line in DEV.read_text().splitlines()[:8]]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(DEV.read_text().splitlines()[:8]) + "\n")
    csv = tmp_path / "p.csv"
    csv.write_text("".join(f"{i},False\n" for i in ids))
    ok = subprocess.run([sys.executable, "-m", "tasks.evaluate", "nlvr2", "--data", str(data),
                         "--predictions", str(csv)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"accuracy": 0.5, "consistency": 0.0}
    csv.write_text("dev-850-0-0,Perhaps\n")
    bad = subprocess.run([sys.executable, "-m", "tasks.evaluate", "nlvr2", "--data", str(data),
                          "--predictions", str(csv)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    expected = f"error: {csv}: line 1: expected `identifier,True|False`, got 'dev-850-0-0,Perhaps'\n"
    assert bad.stderr == expected


@pytest.mark.parametrize("option", ["--annotations", "--predictions", "--questions"])
def test_json_nested_100000_deep_exits_2_with_one_line(vqa, option):
    """json gives up with a RecursionError at this depth; the command line reports it as bad input."""
    deep, nested = vqa["dir"] / "deep.json", "[" * 100_000 + "]" * 100_000
    key = {"--annotations": "annotations", "--questions": "questions"}.get(option)
    deep.write_text(nested if key is None else f'{{"{key}": {nested}}}')
    preds = write(vqa["dir"] / "p.json", [{"question_id": i, "answer": "yes"} for i in (1, 2, 3)])
    files = {"--annotations": vqa["a"], "--predictions": preds, "--questions": vqa["q"], option: deep}
    argv = [str(a) for pair in files.items() for a in pair]
    proc = subprocess.run([sys.executable, "-m", "tasks.evaluate", "vqa", *argv], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith(f"error: {deep}:") and "nested too deeply to parse" in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_gqa_and_nlvr2_deep_truth_files_exit_2(capsys, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("{\"q\": " + "[" * 100_000 + "]" * 100_000 + "}")
    preds = write(tmp_path / "p.json", [])
    code, out, err = run(capsys, "gqa", "--questions", deep, "--predictions", preds)
    assert code == 2 and out == "" and err == f"error: {deep}: key 'q': invalid JSON: nested too deeply to parse " \
                                              "(character 6)\n"
    lines = tmp_path / "d.jsonl"
    lines.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    (tmp_path / "p.csv").write_text("")
    code, out, err = run(capsys, "nlvr2", "--data", lines, "--predictions", tmp_path / "p.csv")
    assert code == 2 and err == f"error: {lines}: line 1: invalid JSON: nested too deeply to parse\n"


def test_duplicated_annotation_exits_2(capsys, vqa):
    anns = json.loads(vqa["a"].read_text())
    anns["annotations"].append(anns["annotations"][1])
    twice = write(vqa["dir"] / "twice.json", anns)
    preds = write(vqa["dir"] / "p.json", [{"question_id": i, "answer": "yes"} for i in (1, 2, 3)])
    code, out, err = run(capsys, "vqa", "--annotations", twice, "--predictions", preds)
    assert (code, out) == (2, "")
    assert err == f"error: {twice}: question 2 appears twice in the ground truth; each question must be scored once\n"
