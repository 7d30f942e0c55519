"""SIGKILL a writing process at many points: the rerun's files equal an uninterrupted run's, byte for byte.

The child below is what an extraction driver does: skip ``done_ids()``, add records and failures,
``finalize(order=input order)``; when the output exists it only clears stale parts. Kill points are
injected by wrapping ``os.replace`` / ``h5py.Dataset.__setitem__`` / ``Path.unlink``
in the child, plus kills at random moments from the parent.
"""
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N = 40
FLUSH = 5

CHILD = textwrap.dedent('''
    import os, pathlib, signal, sys, time
    import h5py
    import numpy as np
    from extractor.store import FeatureWriter, ImageFeatures, remove_stale_parts

    out, crash = sys.argv[1], sys.argv[2]
    kind, _, arg = crash.partition(":")

    def patch(owner, name, hit, after=False):
        """SIGKILL ourselves on the call of owner.name that hit() picks, before or after it runs."""
        orig, count = getattr(owner, name), [0]
        def wrapped(*a, **k):
            count[0] += 1
            if not after and hit(count[0], a):
                os.kill(os.getpid(), signal.SIGKILL)
            result = orig(*a, **k)
            if after and hit(count[0], a):
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(owner, name, wrapped)

    nth = lambda count, args: count == int(arg)
    if kind == "replace":
        patch(os, "replace", nth)
    elif kind == "replaced":
        patch(os, "replace", nth, after=True)
    elif kind == "h5write":
        patch(h5py.Dataset, "__setitem__", nth)
    elif kind == "unlink":
        patch(pathlib.Path, "unlink", lambda count, args: args[0].name == arg)

    def record(i):
        rng = np.random.default_rng(i)
        n = int(rng.integers(0, 7))
        x1, y1 = rng.uniform(0, 40, n), rng.uniform(0, 30, n)
        b = np.stack([x1, y1, x1 + rng.uniform(0, 40, n), y1 + rng.uniform(0, 30, n)], 1)
        return ImageFeatures(f"img{i:04d}", 60, 80, b.astype(np.float32),
                             rng.standard_normal((n, 8)).astype(np.float32), rng.integers(0, 1600, n),
                             rng.uniform(0, 1, n).astype(np.float32), rng.integers(0, 400, n),
                             rng.uniform(0, 1, n).astype(np.float32))

    ids = [f"img{i:04d}" for i in range(%(n)d)]
    print("start", flush=True)
    t0 = time.perf_counter()
    if os.path.exists(out):
        remove_stale_parts(out)
        sys.exit(0)
    with FeatureWriter(out, max_boxes=6, feature_dim=8, flush_every=%(flush)d,
                       attrs={"box_strategy": "caffe", "detector_config": {"name": "tiny"}}) as w:
        done = w.done_ids()
        for i, img_id in enumerate(ids):
            if img_id in done:
                continue
            if kind == "add" and i == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            if i %% 7 == 3:
                w.add_failure(f"/images/{img_id}.jpg", img_id, "truncated")
            else:
                w.add(record(i))
        w.finalize(order=ids)
    print("work", time.perf_counter() - t0, flush=True)
''') % {"n": N, "flush": FLUSH}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Child:
    def __init__(self, tmp_path: Path):
        self.script = tmp_path / "child.py"
        self.script.write_text(CHILD)
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(self, out: Path, crash: str = "none") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(self.script), str(out), crash], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def kill_after(self, out: Path, delay: float) -> int:
        """Start the child, SIGKILL it ``delay`` seconds after its imports; return its exit status."""
        p = subprocess.Popen([sys.executable, str(self.script), str(out), "none"], env=self.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "start"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        return p.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    child = Child(d)
    out = d / "ref.h5"
    res = child.run(out)
    assert res.returncode == 0, res.stderr
    work = float(res.stdout.split()[-1])
    return {"h5": digest(out), "failures": digest(Path(str(out) + ".failures.jsonl")), "work": work,
            "out": out}


def finish_and_compare(child: Child, out: Path, reference: dict) -> None:
    res = child.run(out)
    assert res.returncode == 0, res.stderr
    assert digest(out) == reference["h5"]
    assert digest(Path(str(out) + ".failures.jsonl")) == reference["failures"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["child.py", "out.h5", "out.h5.failures.jsonl"]


def test_reference_run_content(reference):
    from extractor.store import FeatureReader, validate
    r = FeatureReader(reference["out"])
    assert r.ids == [f"img{i:04d}" for i in range(N) if i % 7 != 3]
    assert validate(reference["out"]) == []
    lines = Path(str(reference["out"]) + ".failures.jsonl").read_text().splitlines()
    assert len(lines) == len([i for i in range(N) if i % 7 == 3])


# os.replace calls: 1 meta.json, 2..9 the 8 parts, 10 failures file, 11 commit marker, 12 the final file;
# each case names a leftover that proves the kill landed where intended.
KILL_POINTS = {
    "h5write:7": "out.h5.parts/part-000000.h5.tmp",       # in the middle of writing a part
    "replace:4": "out.h5.parts/part-000002.h5.tmp",       # temp part complete, not renamed
    "add:23": "out.h5.parts/part-000003.h5",              # between flushes (buffer lost)
    "h5write:85": ".out.h5.tmp-*",                        # in the middle of finalize's copy
    "replace:11": "out.h5.parts/commit.json.tmp",         # failures file renamed, features file not
    "replace:12": "out.h5.parts/commit.json",             # just before the final rename
    "replaced:12": "out.h5.parts/part-000000.h5",         # just after it, before clean-up
    "unlink:part-000003.h5": "out.h5.parts/commit.json",  # in the middle of removing the parts
}


@pytest.mark.parametrize("crash", list(KILL_POINTS))
def test_sigkill_at_a_point_then_resume(tmp_path, reference, crash):
    child = Child(tmp_path)
    out = tmp_path / "out.h5"
    res = child.run(out, crash)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert list(tmp_path.glob(KILL_POINTS[crash])), sorted(str(p) for p in tmp_path.rglob("*"))
    if crash in ("replaced:12", "unlink:part-000003.h5"):  # after the rename: only clean-up is left
        assert digest(out) == reference["h5"]
        assert (tmp_path / "out.h5.parts").exists()
    else:
        assert not out.exists()  # never a partial file at the final path
    finish_and_compare(child, out, reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_moments_then_resume(tmp_path, reference, seed):
    rng = random.Random(seed)
    child = Child(tmp_path)
    out = tmp_path / "out.h5"
    for _ in range(3):
        rc = child.kill_after(out, rng.uniform(0, reference["work"] * 1.2))
        assert rc in (0, -signal.SIGKILL)
        if out.exists():
            assert digest(out) == reference["h5"]
    finish_and_compare(child, out, reference)
