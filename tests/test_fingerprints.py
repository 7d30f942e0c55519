"""Outputs follow contents: fingerprints of input paths, and task signatures that change with them (issue 14)."""
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import luigi
import pytest

from extractor.images import list_images
from pipeline import fingerprint as fp
from pipeline import tasks as pt
from pipeline.base import InputPathParameter, PipelineTask


@pytest.fixture(autouse=True)
def fresh_memo(tmp_path, monkeypatch):
    """Each test sees the files as a new process would (the memo lives as long as a process)."""
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "w"))
    fp.forget_fingerprints()
    yield
    fp.forget_fingerprints()


def digest(path, members=None) -> str:
    fp.forget_fingerprints()
    return fp.fingerprint(path, members)["digest"]


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_folder_follows_names_sizes_and_mtimes_and_skips_hidden_files(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "sub/c.jpg"):
        (folder / name).write_bytes(name.encode())
    before = digest(folder)
    assert before.startswith("stat:") and fp.fingerprint(folder) == {"digest": before, "files": 3, "bytes": 19}
    (folder / ".DS_Store").write_bytes(b"x")
    (folder / ".nfs0001").write_bytes(b"x")
    assert digest(folder) == before
    (folder / "d.jpg").write_bytes(b"new")
    assert digest(folder) != before
    (folder / "d.jpg").unlink()
    assert digest(folder) == before
    bump_mtime(folder / "sub" / "c.jpg")
    assert digest(folder) != before


def test_small_file_by_content_big_file_by_size_and_mtime(tmp_path, monkeypatch):
    small = tmp_path / "vocab.txt"
    small.write_text("[PAD]\nhello\n")
    before = digest(small)
    assert before.startswith("sha256:")
    bump_mtime(small)  # rewritten with the same bytes: same fingerprint, no rerun
    assert digest(small) == before
    small.write_text("[PAD]\nhellp\n")  # same size, other bytes
    assert digest(small) != before
    monkeypatch.setattr(fp, "HASH_LIMIT", 4)
    big = digest(small)
    assert big.startswith("stat:")
    bump_mtime(small)
    assert digest(small) != big


def test_list_file_covers_the_images_it_lists(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(bytes([i]) * 10)
    listing = tmp_path / "list.txt"
    listing.write_text("img/0.png\nimg/1.png\n")
    before = digest(listing, list_images)
    (tmp_path / "img" / "2.png").write_bytes(b"not listed")  # not in the list: no change
    assert digest(listing, list_images) == before
    (tmp_path / "img" / "1.png").write_bytes(b"changed, longer")
    assert digest(listing, list_images) != before
    assert fp.fingerprint(listing, list_images)["files"] == 3


def test_missing_or_unreadable_inputs_give_a_marker_not_an_error(tmp_path):
    assert digest(tmp_path / "nope") == "missing"
    listing = tmp_path / "list.txt"
    listing.write_text("gone.png\n")
    assert digest(listing, list_images).startswith("unreadable: images not found")


def test_fingerprints_are_computed_once_per_process(tmp_path):
    f = tmp_path / "a.json"
    f.write_text("[]")
    first = fp.fingerprint(f)
    f.write_text("[1]")
    assert fp.fingerprint(f) == first  # Luigi asks many times: one answer per process
    fp.forget_fingerprints()
    assert fp.fingerprint(f) != first


def test_tasks_given_no_input_path_keep_their_folders():
    """Signatures of tasks given no input path do not depend on fingerprints (default luigi.cfg). The values are
    pinned: a change reruns every user's outputs, so it must be deliberate (max_pixels, issue 14, was one; issue 15's
    data seam another: valid_ids, NLVR2's train_ / valid_statements, the vocabulary kept by the data tasks; issue 17's
    report a third: its examples and seed replace images, so only Report and RunAll rerun; issue 18's extraction
    settings resize, amp and tf32 a fourth: ExtractFeatures and everything downstream; issue 16's pointing accuracy a
    fifth: Report depends on MeasurePointing, so only Report and RunAll rerun; the demo profile's amp = auto and
    11 pretraining epochs a sixth: ExtractFeatures and everything downstream)."""
    assert {t.get_task_family(): t.signature() for t in (
        pt.GenerateDemoWorld(), pt.TrainDetector(), pt.ExtractFeatures(), pt.BuildNLVR2Data(),
        pt.PretrainLXMERT(), pt.FinetuneNLVR2(), pt.RunAll())} == {
        "GenerateDemoWorld": "3a216fae7429", "TrainDetector": "eab72b5b98df", "ExtractFeatures": "ee663c45b184",
        "BuildNLVR2Data": "406a502f24d1", "PretrainLXMERT": "5700162c480c", "FinetuneNLVR2": "94274d792c05",
        "RunAll": "fa2832061b16"}


class CopyInput(PipelineTask):
    data = InputPathParameter(kind="file")

    def build(self, out: Path) -> None:
        shutil.copy(self.data, out / "copy.txt")


def test_task_json_records_the_fingerprints(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("one")
    assert luigi.build([CopyInput(data=str(data))], local_scheduler=True, log_level="WARNING")
    record = json.loads((CopyInput(data=str(data)).output_dir() / "task.json").read_text())
    assert record["fingerprints"] == {"data": [{"path": str(data), "digest": fp.fingerprint(data)["digest"],
                                                "files": 1, "bytes": 3}]}


@contextmanager
def config_values(section: str, values: dict[str, str]):
    """Set luigi.cfg values of one section for the duration of a with-block."""
    config = luigi.configuration.get_config()
    if not config.has_section(section):
        config.add_section(section)
    for key, value in values.items():
        config.set(section, key, value)
    try:
        yield
    finally:
        for key in values:
            config.remove_option(section, key)


def test_changed_json_input_reruns_the_data_task_and_its_downstream(tmp_path):
    lines = (Path(__file__).parent / "data" / "nlvr2_dev.jsonl").read_text().splitlines(keepends=True)
    train, valid = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(lines[:40]))
    valid.write_text("".join(lines[40:60]))
    with config_values("BuildNLVR2Data", {"train": str(train), "valid": str(valid)}):
        assert luigi.build([pt.BuildNLVR2Data()], local_scheduler=True, log_level="WARNING")
        first = pt.BuildNLVR2Data().output_dir()
        downstream = {t.get_task_family(): t.output_dir() for t in (pt.FinetuneNLVR2(), pt.EvaluateNLVR2())}
        assert len(json.loads((first / "train.json").read_text())) == 40
        train.write_text("".join(lines[:41]))  # the cron job's next run sees one more statement
        fp.forget_fingerprints()
        assert luigi.build([pt.BuildNLVR2Data()], local_scheduler=True, log_level="WARNING")
        second = pt.BuildNLVR2Data().output_dir()
        assert second != first and first.is_dir()  # a new folder; the old result is kept, never overwritten
        assert len(json.loads((second / "train.json").read_text())) == 41
        for family, old in {t.get_task_family(): t.output_dir()
                            for t in (pt.FinetuneNLVR2(), pt.EvaluateNLVR2())}.items():
            assert old != downstream[family]


def test_import_tsv_after_the_tsv_gained_a_row_gives_a_new_output_with_it(tmp_path):
    from extractor.store import FeatureReader

    rows = (Path(__file__).parent / "data" / "train2014_obj36_sample.tsv").read_text().splitlines(keepends=True)
    tsv = tmp_path / "features.tsv"
    tsv.write_text("".join(rows[:-1]))
    assert luigi.build([pt.ImportTSVFeatures(tsv=str(tsv))], local_scheduler=True, log_level="WARNING")
    first = pt.ImportTSVFeatures(tsv=str(tsv)).output_dir()
    with FeatureReader(first / "features.h5") as reader:
        before = reader.ids
    assert len(before) == len(rows) - 1
    tsv.write_text("".join(rows))
    fp.forget_fingerprints()
    assert luigi.build([pt.ImportTSVFeatures(tsv=str(tsv))], local_scheduler=True, log_level="WARNING")
    second = pt.ImportTSVFeatures(tsv=str(tsv)).output_dir()
    assert second != first
    with FeatureReader(second / "features.h5") as reader:
        assert reader.ids[:-1] == before and len(reader.ids) == len(rows)
        assert reader.ids[-1] == rows[-1].split("\t")[0]


def test_a_name_or_path_parameter_counts_as_an_input_when_it_names_a_path(tmp_path):
    from pipeline.base import input_fingerprints

    yaml = tmp_path / "detector.yaml"
    yaml.write_text("MODEL:\n  RESNETS:\n    DEPTH: 101\n")
    before = pt.ExtractFeatures(config=str(yaml)).signature()
    yaml.write_text("MODEL:\n  RESNETS:\n    DEPTH: 50\n")
    fp.forget_fingerprints()
    assert pt.ExtractFeatures(config=str(yaml)).signature() != before
    assert "config" not in input_fingerprints(pt.ExtractFeaturesShard(config="tiny"))

    init = tmp_path / "run"
    init.mkdir()
    (init / "pytorch_model.bin").write_bytes(b"weights")
    before = pt.FinetuneVQA(init=str(init)).signature()
    (init / "pytorch_model.bin").write_bytes(b"other weights")
    fp.forget_fingerprints()
    assert pt.FinetuneVQA(init=str(init)).signature() != before
    assert input_fingerprints(pt.FinetuneVQA(init="scratch")) == {}
