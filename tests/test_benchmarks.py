"""The benchmark registry: every record is complete and is what fine-tuning, evaluation and the report use."""
import pytest

from tasks.benchmarks import BENCHMARKS, GQA, NLVR2, VQA, Benchmark
from tasks.evaluate import build_parser
from tasks.finetune import FinetuneConfig


def test_the_registry_lists_each_benchmark_once_by_its_name():
    assert list(BENCHMARKS) == ["vqa", "gqa", "nlvr2"]  # the report's row order
    assert all(isinstance(b, Benchmark) and BENCHMARKS[b.name] is b for b in (VQA, GQA, NLVR2))
    assert [(b.id_key, b.head_prefix, b.submission_suffix, b.answers) for b in BENCHMARKS.values()] == [
        ("question_id", "answer_head.", ".json", True), ("question_id", "answer_head.", ".json", True),
        ("identifier", "logit_fc.", ".csv", False)]


def test_every_registered_benchmark_is_a_command_and_a_task():
    commands = build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == list(BENCHMARKS)
    assert FinetuneConfig(task="gqa", train_files=["x"]).benchmark is GQA
    with pytest.raises(ValueError, match="task: unknown 'coco', expected one of"):
        FinetuneConfig(task="coco").validate()


def test_submission_files_and_headlines_per_benchmark(tmp_path):
    assert VQA.write_submission(tmp_path / "v.json", {1: "yes"}).read_text() == '[{"question_id": 1, "answer": "yes"}]'
    assert NLVR2.write_submission(tmp_path / "n.csv", {"dev-1-0-0": True}).read_text() == "dev-1-0-0,True\n"
    assert (VQA.headline({"overall": 41.5}), GQA.headline({"accuracy": 47.04123}),
            NLVR2.headline({"accuracy": 0.516666})) == (41.5, 47.04, 51.67)
