"""python -m tasks.ask on what RunAll made: answers as the evaluation did, on features extracted as the
model's were; a released-style model without a record; every bad input one line and exit 2."""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pipeline_helpers import env_for, tiny_detector_weights

from extractor.store import FeatureReader
from tasks.ask import Extraction, main
from tasks.benchmarks import BENCHMARKS
from tasks.benchmarks.datasets import collate_task
from tasks.data.batches import model_inputs
from tasks.data.features import open_stores
from tasks.inference import InferenceError, answer, load_finetuned

pytestmark = pytest.mark.usefixtures("one_thread")  # the pipeline ran on one thread: the same arithmetic


class Run:
    """The finished tiny RunAll: its folders, and where its images are."""

    def __init__(self, root: Path, proc: subprocess.CompletedProcess) -> None:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        self.root, self.work, self.stdout = root, root / "work", proc.stdout
        [self.detector] = (self.work / "TrainDetector").glob("*/weights.pkl")
        [self.features] = (self.work / "ExtractFeatures").glob("*/features.h5")
        self.images = {p.stem: p for p in (self.work / "GenerateDemoWorld").rglob("*.png")}

    def evaluation(self, task: str, init: str = "pretrained") -> tuple[Path, dict]:
        """(the evaluated fine-tuning run folder, the evaluation's predictions)."""
        for metrics in (self.work / f"Evaluate{task.upper()}").glob("*/metrics.json"):
            m = json.loads(metrics.read_text())
            if m["init"] == init:
                return Path(m["weights"]).parent, BENCHMARKS[task].read_submission(metrics.parent / m["predictions"])
        raise AssertionError(f"no Evaluate{task.upper()} {init}")

    def valid(self, task: str) -> list[dict]:
        [data] = (self.work / f"Build{task.upper()}Data").glob("*/valid.json")
        return json.loads(data.read_text())


@pytest.fixture(scope="module")
def run(demo_run) -> Run:
    root, _, proc = demo_run
    return Run(root, proc)


def ask(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_runall_prints_a_command_that_answers(run, tmp_path):
    lines = run.stdout.splitlines()
    command = shlex.split(lines[lines.index("[lxmert] ask the fine-tuned model about an image:") + 1])
    assert command[:3] == [sys.executable, "-m", "tasks.ask"] and command[-2:] == ["--draw", "answer.png"]
    done = subprocess.run(command, cwd=tmp_path, env=env_for(run.work, run.root / "tiny.cfg"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert printed[0].startswith("question: ") and [ln[:3] for ln in printed[1:6]] == [f"{n:>2}." for n in range(1, 6)]
    probabilities = [float(ln.split()[-1]) for ln in printed[1:6]]
    assert probabilities == sorted(probabilities, reverse=True) and all(0 < p < 1 for p in probabilities)
    assert printed[6].startswith("attention: ") and printed[7] == "drawn: answer.png"
    assert min(cv2.imread(str(tmp_path / "answer.png")).shape[:2]) >= 384


@pytest.mark.parametrize("task", ["vqa", "gqa"])
def test_answers_are_the_evaluations_on_features_extracted_as_the_models(run, capsys, tmp_path, task):
    folder, predictions = run.evaluation(task)
    entries = [e for e in run.valid(task) if e["question_id"] in predictions][:3]
    stored = FeatureReader(run.features)
    extraction = Extraction(load_finetuned(folder), run.detector.parent, None, None)
    for e in entries:
        fresh = extraction.features(run.images[e["img_id"]], tmp_path, "cpu")
        kept = stored.get(e["img_id"])
        np.testing.assert_allclose(fresh.boxes, kept.boxes, atol=1e-3)
        np.testing.assert_allclose(fresh.features.astype(np.float32), kept.features.astype(np.float32), atol=1e-2)
        code, out, _ = ask(capsys, "--model", folder, "--detector", run.detector.parent, "--image",
                           run.images[e["img_id"]], "--question", e["sent"])
        assert code == 0
        assert out.splitlines()[1].split()[1] == predictions[e["question_id"]]


def test_a_statement_about_two_images_is_true_or_false_as_evaluated(run, capsys, tmp_path):
    folder, predictions = run.evaluation("nlvr2")
    e = next(e for e in run.valid("nlvr2") if e["identifier"] in predictions)
    code, out, _ = ask(capsys, "--model", folder, "--detector", run.detector, "--image", run.images[e["img0"]],
                       "--image", run.images[e["img1"]], "--statement", e["sent"], "--draw", tmp_path / "pair.png")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"statement: {e['sent']}"
    verdict, probability = lines[1].split(" (probability ")
    assert verdict == str(predictions[e["identifier"]]) and 0.5 <= float(probability.rstrip(")")) <= 1
    assert lines[2].startswith("image 1 attention: ") and lines[3].startswith("image 2 attention: ")
    h, w = cv2.imread(str(tmp_path / "pair.png")).shape[:2]
    assert h >= 384 and w >= 2 * 384


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_answer_is_the_models_forward_and_attention_a_share_per_box(run, task):
    folder, _ = run.evaluation(task)
    model = load_finetuned(folder)
    benchmark = BENCHMARKS[task]
    e = run.valid(task)[0]
    stores = open_stores([str(run.features)])
    dataset = benchmark.dataset([e], stores, model.tokenizer, model.table, model.max_seq_length, 0)
    with torch.no_grad():
        out = model.model(**model_inputs(collate_task([dataset[0]])))
    result = answer(model, e["sent"], [stores[0].get(e[k]) for k in benchmark.image_keys], top=3)
    if task == "nlvr2":
        probs = out.logits.softmax(-1)[0]
        assert result.top[0] == (bool(probs.argmax()), pytest.approx(float(probs.max()), abs=1e-5))
    else:
        probs = out.question_answering_score.sigmoid()[0]
        best = probs.topk(3)
        assert [a for a, _ in result.top] == [model.table.answer(i) for i in best.indices.tolist()]
        assert [p for _, p in result.top] == pytest.approx(best.values.tolist(), abs=1e-5)
    for shares, key in zip(result.attention, benchmark.image_keys):
        assert len(shares) == stores[0].get(e[key]).num_boxes and shares.sum() == pytest.approx(1.0, abs=1e-5)


def test_a_model_without_a_record_needs_its_task_and_takes_the_detector_as_given(run, capsys, tmp_path):
    folder, predictions = run.evaluation("vqa")
    released = tmp_path / "released"
    shutil.copytree(folder / json.loads((folder / "metrics.json").read_text())["model"].split("/")[-1], released)
    table = tmp_path / "ans2label.json"
    answers = json.loads((folder / "inference.json").read_text())["answers"]
    table.write_text(json.dumps({a: i for i, a in enumerate(answers)}))
    e = next(e for e in run.valid("vqa") if e["question_id"] in predictions)
    base = ["--model", released, "--detector", run.detector, "--image", run.images[e["img_id"]], "--question",
            e["sent"]]
    code, _, err = ask(capsys, *base)
    assert code == 2 and err.strip() == (f"error: --model: {released} is not a fine-tuning run of this project (no "
                                         "inference.json): give --task (vqa / gqa / nlvr2)")
    code, out, err = ask(capsys, *base, "--task", "vqa", "--answers", table, "--boxes", "8")
    assert code == 0 and err.startswith(f"note: {released} records no detector; extracting with {run.detector}")
    assert len(out.splitlines()) == 7 and out.splitlines()[1].split()[1] in answers
    code, _, err = ask(capsys, *base, "--task", "vqa")  # the released VQA table does not fit this head
    assert code == 2 and "--answers: the table has 3129 answers but the answer head of" in err


def test_bad_input_is_one_line_and_exit_2(run, capsys, tmp_path):
    folder, _ = run.evaluation("vqa")
    pair, _ = run.evaluation("nlvr2")
    image = next(iter(run.images.values()))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    other = tiny_detector_weights(tmp_path / "other.pkl")
    (tmp_path / "a_file").write_text("")
    good = ["--model", folder, "--detector", run.detector, "--image", image, "--question", "what color is it?"]
    cases = {
        "--model: no model at /nowhere": ["--model", "/nowhere", *good[2:]],
        f"--image: {broken}: ": [*good[:5], broken, *good[6:]],
        "--image: /no/such.png: not found": [*good[:5], "/no/such.png", *good[6:]],
        "--question: 25 word pieces, longer than the 18 the model reads (max_seq_length 20); shorten it":
            [*good[:7], "is " * 25],
        f"--detector: {other} (sha256 ": [*good[:3], other, *good[4:]],
        "--detector: no detector weights at /no/detector.pkl": [*good[:3], "/no/detector.pkl", *good[4:]],
        "--statement: a nlvr2 model takes --statement, not --question": ["--model", pair, *good[2:]],
        "--image: a nlvr2 model takes 2 image(s), 1 given": ["--model", pair, *good[2:6], "--statement", "x"],
        "--task: gqa given, but": [*good, "--task", "gqa"],
        "--boxes: the model records its box rule": [*good, "--boxes", "36"],
        "--draw: cannot write": [*good, "--draw", tmp_path / "a_file" / "out.png"],
    }
    for starts, args in cases.items():
        code, out, err = ask(capsys, *args)
        assert (code, out) == (2, ""), (starts, out, err)
        assert err.startswith("error: " + starts) and err.count("\n") == 1, (starts, err)


def test_an_image_is_refused_when_its_features_would_differ_from_the_models(run, tmp_path):
    folder, _ = run.evaluation("vqa")
    model = load_finetuned(folder)
    model.features[0]["resize_mode"] = "longest"  # a setting this extraction does not apply
    extraction = Extraction(model, run.detector.parent, None, None)
    expected = r"--image: .*\.png: its features would differ from the model's training features in 'resize_mode' "
    with pytest.raises(InferenceError, match=expected + r"\(None here, 'longest' in training\)"):
        extraction.features(next(iter(run.images.values())), tmp_path, "cpu")


def test_features_extracted_on_a_gpu_with_amp_or_tf32_are_matched_in_float32(run, tmp_path):
    folder, _ = run.evaluation("vqa")
    model = load_finetuned(folder)
    model.features[0].update(amp="bf16", tf32=True)  # how a GPU run may have extracted them
    record = Extraction(model, run.detector.parent, None, None).features(next(iter(run.images.values())), tmp_path,
                                                                         "cpu")
    assert record.num_boxes > 0


def test_a_run_from_before_inference_json_is_read_from_its_config(run, capsys, tmp_path):
    folder, predictions = run.evaluation("vqa")
    earlier = tmp_path / "FinetuneVQA" / "earlier"
    shutil.copytree(folder, earlier, ignore=shutil.ignore_patterns("inference.json", "checkpoints"))
    e = next(e for e in run.valid("vqa") if e["question_id"] in predictions)
    args = ["--model", earlier, "--detector", run.detector, "--image", run.images[e["img_id"]], "--question", e["sent"]]
    code, out, _ = ask(capsys, *args)
    assert code == 0 and out.splitlines()[1].split()[1] == predictions[e["question_id"]]
    config = json.loads((earlier / "config.json").read_text())
    (earlier / "config.json").write_text(json.dumps({**config, "features": [str(tmp_path / "gone.h5")]}))
    code, _, err = ask(capsys, *args)
    assert code == 2 and err == (f"error: --model: {earlier} was fine-tuned before runs kept inference.json, and the "
                                 f"files its config.json names are gone ({tmp_path / 'gone.h5'}); give --task and "
                                 "--answers\n")
    table = tmp_path / "ans2label.json"
    table.write_text(json.dumps({a: i for i, a in enumerate(json.loads((folder / "inference.json").read_text())
                                                          ["answers"])}))
    code, out, err = ask(capsys, *args, "--task", "vqa", "--answers", table, "--boxes", "8")
    assert code == 0 and err.startswith("note: ") and len(out.splitlines()) == 7


@pytest.mark.parametrize("recorded, has_bf16, device, expected", [
    ("none", True, "cpu", None), ("bf16", True, "cpu", "bf16"), ("bf16", False, "cpu", None),
    ("fp16", True, "cpu", None)])
def test_new_images_are_extracted_in_the_training_features_precision_where_the_device_has_it(
        monkeypatch, capsys, recorded, has_bf16, device, expected):
    from extractor import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    extraction = Extraction.__new__(Extraction)
    extraction.amp = recorded
    assert extraction.precision(device) == expected
    note = capsys.readouterr().err
    assert ("extracting in float32" in note) == (recorded != "none" and expected is None)
