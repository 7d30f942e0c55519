"""Disk full (and other OS errors) at every kind of write: a one-line WriteError naming the file and the
errno, no temporary file left, finished parts and checkpoints kept, and a rerun that gives the bytes
of an undisturbed run. Faults are injected in os.write / os.pwrite / os.fsync / os.ftruncate /
os.replace (tests/faults.py), through which the project writes every byte."""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import CALLS, Faults
from pipeline_helpers import feature_arrays
from torch import nn

from extractor.detector.weights import save_detectron2_weights
from extractor.fileio import WriteError, append_text, atomic_directory, atomic_write, write_error
from extractor.jsonstream import write_json_atomic
from extractor.store import FeatureWriter, ImageFeatures, merge, remove_stale_parts
from extractor.store.tsv import export_tsv
from tasks.training.checkpoints import list_checkpoints, load_latest_checkpoint, save_checkpoint

N, FLUSH = 23, 5
IDS = [f"img{i:04d}" for i in range(N)]
ENOSPC_LINE = re.compile(r"cannot write (/\S+): No space left on device \(ENOSPC\); free space and rerun: "
                         r"finished work is kept")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name)


def named_file(exc: BaseException) -> Path:
    """The file a WriteError's one line names (and the line is what we promise)."""
    text = str(exc)
    assert "\n" not in text
    m = ENOSPC_LINE.fullmatch(text)
    assert m, text
    return Path(m.group(1))


def record(i: int) -> ImageFeatures:
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, 7))
    x1, y1 = rng.uniform(0, 40, n), rng.uniform(0, 30, n)
    b = np.stack([x1, y1, x1 + rng.uniform(0, 40, n), y1 + rng.uniform(0, 30, n)], 1)
    return ImageFeatures(f"img{i:04d}", 60, 80, b.astype(np.float32), rng.standard_normal((n, 8)).astype(np.float32),
                         rng.integers(0, 1600, n), rng.uniform(0, 1, n).astype(np.float32),
                         rng.integers(0, 400, n), rng.uniform(0, 1, n).astype(np.float32))


def drive(out: Path, ids: list[str] = IDS) -> None:
    """What an extraction driver does: skip done ids, add records and failures, finalize."""
    if out.exists():
        remove_stale_parts(out)
        return
    with FeatureWriter(out, max_boxes=6, feature_dim=8, flush_every=FLUSH,
                       attrs={"box_strategy": "caffe", "detector_config": {"name": "tiny"}}) as w:
        done = w.done_ids()
        for i, img_id in ((int(x[3:]), x) for x in ids):
            if img_id in done:
                continue
            if i % 7 == 3:
                w.add_failure(f"/images/{img_id}.jpg", img_id, "truncated")
            else:
                w.add(record(i))
        w.finalize(order=ids)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An undisturbed run's files, and how many calls of each kind it makes."""
    root = tmp_path_factory.mktemp("ref")
    with pytest.MonkeyPatch.context() as mp:
        counting = Faults(root).install(mp)
        drive(root / "out.h5")
    return {"h5": digest(root / "out.h5"), "failures": digest(root / "out.h5.failures.jsonl"),
            "counts": dict(counting.counts)}


def spread(n: int) -> list[int]:
    """The first, second, last and a few evenly spaced call numbers out of n."""
    return sorted({1, 2, n // 3, n // 2, 2 * n // 3, n - 1, n} & set(range(1, n + 1)))


@pytest.mark.parametrize("call", CALLS)
def test_feature_store_full_disk_at_any_write_fails_cleanly_and_reruns_to_the_same_bytes(
        call, reference, tmp_path, monkeypatch):
    n = reference["counts"][call]
    assert n >= 1, reference["counts"]
    for nth in spread(n):
        out = tmp_path / str(nth) / "out.h5"
        out.parent.mkdir()
        with monkeypatch.context() as mp:
            faults = Faults(out.parent, call, nth).install(mp)
            with pytest.raises(WriteError) as caught:
                drive(out)
        assert faults.fired, (call, nth)
        name = named_file(caught.value).relative_to(out.parent)
        assert re.fullmatch(r"out\.h5(\.failures\.jsonl|\.parts/(meta\.json|commit\.json|part-\d{6}\.h5))?",
                            str(name)), name
        assert temporaries(out.parent) == [], (call, nth)
        for kept in faults.replaced:  # every part renamed into place before the fault is still there
            if "/part-" in kept:
                assert Path(kept).is_file(), (call, nth, kept)
        if out.exists():  # only a fault after the final rename (the folder's fsync) leaves it, complete
            assert digest(out) == reference["h5"]
        drive(out)  # the rerun, with space again
        drive(out)  # a later run only clears stale parts (what extraction does for an existing file)
        assert digest(out) == reference["h5"], (call, nth)
        assert digest(Path(str(out) + ".failures.jsonl")) == reference["failures"]
        assert sorted(p.name for p in out.parent.iterdir()) == ["out.h5", "out.h5.failures.jsonl"]


@pytest.mark.parametrize("call", ["write", "pwrite"])
def test_a_short_write_before_the_error_leaves_nothing_half_written(call, reference, tmp_path, monkeypatch):
    n = reference["counts"][call]
    for nth in sorted({1, n // 2, n - 1} & set(range(1, n + 1))):
        out = tmp_path / str(nth) / "out.h5"
        out.parent.mkdir()
        with monkeypatch.context() as mp:
            faults = Faults(out.parent, call, nth, short=True).install(mp)
            with pytest.raises(WriteError):
                drive(out)
        assert faults.fired and temporaries(out.parent) == []
        drive(out)
        assert digest(out) == reference["h5"]


@pytest.mark.parametrize(("err", "text"), [
    (errno.EIO, "Input/output error (EIO); fix the filesystem and rerun: finished work is kept"),
    (errno.EDQUOT, "Disk quota exceeded (EDQUOT); free space (or raise the quota) and rerun"),
    (errno.EROFS, "Read-only file system (EROFS); make the filesystem writable and rerun"),
])
def test_other_os_errors_name_their_errno(err, text, reference, tmp_path, monkeypatch):
    out = tmp_path / "out.h5"
    with monkeypatch.context() as mp:
        Faults(tmp_path, "pwrite", 3, err=err, match="/.out.h5.tmp-").install(mp)  # in finalize's copy
        with pytest.raises(WriteError) as caught:
            drive(out)
    assert str(caught.value).startswith(f"cannot write {out}: {text}")
    assert caught.value.errno == err and temporaries(tmp_path) == []
    assert len(list((tmp_path / "out.h5.parts").glob("part-*.h5"))) == -(-N // FLUSH)  # every part kept
    drive(out)
    assert digest(out) == reference["h5"]


def test_write_error_is_an_oserror_that_survives_pickling():
    err = write_error("/x/features.h5", OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename == "/x/features.h5"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is WriteError and str(again) == str(err)
    assert str(err) == ("cannot write /x/features.h5: No space left on device (ENOSPC); free space and rerun: "
                        "finished work is kept")


# ---------------------------------------------------------------- merge and TSV export

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    paths = [root / "a.h5", root / "b.h5"]
    drive(paths[0], IDS[:12])
    drive(paths[1], IDS[12:])
    return paths


@pytest.mark.parametrize("virtual", [False, True])
def test_merge_full_disk_fails_cleanly_keeps_the_shards_and_reruns_to_the_same_bytes(
        virtual, shards, tmp_path, monkeypatch):
    before = {p: digest(p) for p in shards}
    merge(shards, tmp_path / "ref.h5", virtual=virtual)
    counts = {}
    with monkeypatch.context() as mp:
        counting = Faults(tmp_path, match="m0.h5").install(mp)
        merge(shards, tmp_path / "m0.h5", virtual=virtual)
        counts = dict(counting.counts)
    for call in CALLS:
        for nth in spread(counts.get(call, 0)):
            out = tmp_path / f"m-{call}-{nth}.h5"
            with monkeypatch.context() as mp:
                faults = Faults(tmp_path, call, nth, match=out.name).install(mp)
                with pytest.raises(WriteError) as caught:
                    merge(shards, out, virtual=virtual)
            assert faults.fired
            assert named_file(caught.value) in (out, Path(str(out) + ".failures.jsonl"))
            assert temporaries(tmp_path) == []
            assert {p: digest(p) for p in shards} == before
            merge(shards, out, virtual=virtual, overwrite=True)
            if virtual:  # HDF5 stamps a virtual dataset with its creation time: compare what it holds
                got, want = feature_arrays(out), feature_arrays(tmp_path / "ref.h5")
                assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
            else:
                assert digest(out) == digest(tmp_path / "ref.h5")


def test_tsv_export_full_disk_fails_cleanly_and_keeps_the_old_file(shards, tmp_path, monkeypatch):
    tsv = tmp_path / "features.tsv"
    tsv.write_text("old\n")
    with monkeypatch.context() as mp:
        Faults(tmp_path, "write", 3).install(mp)
        with pytest.raises(WriteError) as caught:
            export_tsv(shards[0], tsv)
    assert named_file(caught.value) == tsv
    assert tsv.read_text() == "old\n" and temporaries(tmp_path) == []
    assert export_tsv(shards[0], tsv) == 10


# ---------------------------------------------------------------- the file primitives

def test_atomic_write_keeps_the_old_file_at_each_step(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    path.write_text("old")
    for call in ("write", "fsync", "replace"):
        with monkeypatch.context() as mp:
            Faults(tmp_path, call, 1).install(mp)
            with pytest.raises(WriteError) as caught:
                write_json_atomic(path, {"new": 1})
        assert named_file(caught.value) == path
        assert path.read_text() == "old" and temporaries(tmp_path) == []
    write_json_atomic(path, {"new": 1})
    assert json.loads(path.read_text()) == {"new": 1}


def test_append_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "train.csv"
    append_text(path, "step,loss\r\n1,0.5\r\n")
    with monkeypatch.context() as mp:
        Faults(tmp_path, "write", 1, short=True).install(mp)  # half the row reaches the disk, then ENOSPC
        with pytest.raises(WriteError) as caught:
            append_text(path, "2,0.25\r\n")
    assert named_file(caught.value) == path
    assert path.read_bytes() == b"step,loss\r\n1,0.5\r\n"  # the half row was cut off again


def test_atomic_directory_keeps_the_old_folder_and_names_the_file_in_it(tmp_path, monkeypatch):
    final = tmp_path / "final"
    final.mkdir()
    (final / "weights.bin").write_bytes(b"old")
    with monkeypatch.context() as mp:
        Faults(tmp_path, "write", 2).install(mp)
        with pytest.raises(WriteError) as caught:
            with atomic_directory(final) as tmp:
                atomic_write(tmp / "config.json", "{}")
                atomic_write(tmp / "weights.bin", b"new" * 100)
    assert named_file(caught.value) == final / "weights.bin"  # named where it was going, not the temporary
    assert tree(tmp_path) == {"final/weights.bin": hashlib.sha256(b"old").hexdigest()}
    with atomic_directory(final) as tmp:
        atomic_write(tmp / "weights.bin", b"new")
    assert (final / "weights.bin").read_bytes() == b"new" and temporaries(tmp_path) == []


# ---------------------------------------------------------------- training checkpoints, logs, exports

class Toy(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(32, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"ex{i}", "x": self.x[i], "y": self.y[i]}


def collate(items: list[dict]) -> dict:
    return {"ids": [it["id"] for it in items], "x": torch.stack([it["x"] for it in items]),
            "y": torch.stack([it["y"] for it in items])}


def toy_step(model, batch, ctx):
    from tasks.training.loop import StepOutput
    return StepOutput(((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean())


def train_toy(out: Path) -> None:
    from tasks.training.loop import TrainConfig, train
    torch.manual_seed(0)
    cfg = TrainConfig(output_dir=str(out), epochs=2, batch_size=8, lr=0.05, warmup_ratio=0.0, optimizer="adamw",
                      weight_decay=0.0, num_workers=0, log_every=1, ckpt_every=3, keep_last=2, progress=False,
                      tensorboard=False, plots=True, device="cpu")
    train(nn.Linear(4, 1), Toy(), cfg, collate_fn=collate, step_fn=toy_step)


def train_csv(out: Path) -> list[dict]:
    with (out / "logs" / "train.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in ("examples_per_s", "elapsed_s")} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    train_toy(out)
    return out


@pytest.mark.parametrize(("call", "match", "nth", "names"), [
    pytest.param("write", "/checkpoints/step-", 2, r"checkpoints/step-\d{8}\.pt", id="checkpoint-write"),
    pytest.param("fsync", "/checkpoints/step-", 1, r"checkpoints/step-\d{8}\.pt", id="checkpoint-fsync"),
    pytest.param("write", "/checkpoints/step-00000006.json", 1, r"checkpoints/step-00000006\.json", id="manifest"),
    pytest.param("replace", "/checkpoints/step-00000008", 1, r"checkpoints/step-00000008\.pt", id="last-rename"),
    pytest.param("write", "/logs/train.csv", 5, r"logs/train\.csv", id="log-row"),
    pytest.param("write", "/plots/", 1, r"plots/loss\.png", id="plot"),
    pytest.param("write", "/.final.tmp-", 1, r"final/model\.pt", id="export"),
])
def test_training_full_disk_fails_cleanly_then_resumes_to_the_same_weights_and_logs(
        call, match, nth, names, trained, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        faults = Faults(tmp_path, call, nth, match=match, short=call == "write").install(mp)
        with pytest.raises(WriteError) as caught:
            train_toy(out)
    assert faults.fired
    assert re.fullmatch(names, str(named_file(caught.value).relative_to(out)))
    assert temporaries(tmp_path) == []
    kept = list_checkpoints(out / "checkpoints")
    assert [p for p in (out / "checkpoints").glob("*.pt") if p not in kept] == []  # no .pt without manifest
    if kept:
        state, path = load_latest_checkpoint(out / "checkpoints")
        assert path == kept[-1] and state["step"] == int(path.stem[5:])
    train_toy(out)  # the rerun resumes from the newest checkpoint
    assert train_csv(out) == train_csv(trained)
    assert torch.equal(torch.load(out / "final" / "model.pt")["weight"],
                       torch.load(trained / "final" / "model.pt")["weight"])


def test_checkpoint_save_failure_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
    state = {"w": torch.arange(1000.0)}
    for step in (1, 2):
        save_checkpoint(state, tmp_path, step, keep_last=3)
    with monkeypatch.context() as mp:
        Faults(tmp_path, "write", 1, short=True).install(mp)
        with pytest.raises(WriteError) as caught:
            save_checkpoint(state, tmp_path, 3, keep_last=3)
    assert named_file(caught.value) == tmp_path / "step-00000003.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000001.json", "step-00000001.pt", "step-00000002.json", "step-00000002.pt"]
    assert list_checkpoints(tmp_path) == [tmp_path / "step-00000001.pt", tmp_path / "step-00000002.pt"]


def test_tensorboard_errors_name_its_folder(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    from tasks.training.logs import RunLogs
    logs = RunLogs(tmp_path, ["loss"], None, tensorboard=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    with pytest.raises(WriteError) as caught:
        logs.train_row({"step": 1, "epoch": 0, "lr": 0.1, "loss": 1.0})
    assert named_file(caught.value) == tmp_path / "logs" / "tb"
    monkeypatch.undo()
    logs.close(None)


def test_safetensors_export_names_the_file(tmp_path, monkeypatch):
    from model import LxmertConfig, LxmertForQuestionAnswering
    from model.checkpoint import SAFETENSORS_NAME
    from tasks.training.checkpoints import export_model
    from tasks.training.weights import MODEL_PRESETS

    model = LxmertForQuestionAnswering(LxmertConfig(**{**MODEL_PRESETS["tiny"], "num_qa_labels": 3}))
    original = Path.write_bytes

    def full(self, data):
        if self.name == SAFETENSORS_NAME:
            original(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    final = tmp_path / "final"
    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_bytes", full)
        with pytest.raises(WriteError) as caught:
            with atomic_directory(final) as tmp:
                export_model(model, tmp)
    assert named_file(caught.value) == final / SAFETENSORS_NAME
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(final) as tmp:
        export_model(model, tmp)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", SAFETENSORS_NAME]


# ---------------------------------------------------------------- detector weights, detector files, demo world

def test_detector_weights_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    from extractor.detector.config import DetectorConfig, save_config_yaml
    from extractor.detector.model import VGDetector

    torch.manual_seed(0)
    model = VGDetector(DetectorConfig.load("tiny"))
    path = tmp_path / "weights.pkl"
    path.write_bytes(b"old weights")
    with monkeypatch.context() as mp:
        Faults(tmp_path, "write", 2, short=True).install(mp)
        with pytest.raises(WriteError) as caught:
            save_detectron2_weights(model, path)
    assert named_file(caught.value) == path
    assert path.read_bytes() == b"old weights" and temporaries(tmp_path) == []
    sha = save_detectron2_weights(model, path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()

    yaml_path = tmp_path / "detector.yaml"
    with monkeypatch.context() as mp:
        Faults(tmp_path, "replace", 1).install(mp)
        with pytest.raises(WriteError) as caught:
            save_config_yaml(DetectorConfig.load("tiny"), yaml_path)
    assert named_file(caught.value) == yaml_path and not yaml_path.exists() and temporaries(tmp_path) == []


def test_demo_world_full_disk_leaves_nothing_and_reruns_to_the_same_files(tmp_path, monkeypatch):
    import dataclasses

    from tasks.demo.world import PRESETS, generate_world
    small = dataclasses.replace(PRESETS["tiny"], coco_train_images=2, coco_val_images=2, vg_train_images=2,
                                vg_val_images=2, nlvr2_train_sets=1, nlvr2_dev_sets=1)
    generate_world(tmp_path / "ref", seed=0, config=small, workers=1)
    out = tmp_path / "sub" / "world"
    for nth in (1, 7):  # a data file, then an image
        with monkeypatch.context() as mp:
            Faults(tmp_path / "sub", "write", nth).install(mp)
            with pytest.raises(WriteError) as caught:
                generate_world(out, seed=0, config=small, workers=2)
        assert out in named_file(caught.value).parents  # named where it was going
        assert list((tmp_path / "sub").iterdir()) == []
    generate_world(out, seed=0, config=small, workers=1)
    assert tree(out) == tree(tmp_path / "ref")
