"""The central scheduler: two workers share a multi-shard extraction, each shard runs exactly once."""
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from pipeline_helpers import (
    REPO,
    env_for,
    feature_arrays,
    free_port,
    luigi_cmd,
    run_luigi,
    sample_images,
    started,
    tiny_detector_weights,
    write_config,
)


@pytest.fixture()
def luigid(tmp_path):
    """A luigid on a free loopback port; its log folder must exist before it starts."""
    port = free_port()
    (tmp_path / "luigid-logs").mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "from luigi.cmdline import luigid; luigid()",
                             "--address", "127.0.0.1", "--port", str(port), "--logdir", str(tmp_path / "luigid-logs"),
                             "--state-path", str(tmp_path / "state.pickle")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("luigid did not start")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


def test_two_workers_on_one_scheduler_run_each_shard_once(tmp_path, luigid):
    images = sample_images(tmp_path / "images", count=8)
    weights = tiny_detector_weights(tmp_path / "tiny.pkl")
    config = write_config(tmp_path / "cfg.cfg", "[core]\nautoload_range = false\n")
    work = tmp_path / "work"
    args = ["ExtractFeatures", "--shards", "4", "--images", str(images), "--weights", str(weights),
            "--config", "tiny", "--boxes", "5", "--decode-workers", "0",
            "--scheduler-host", "127.0.0.1", "--scheduler-port", str(luigid), "--no-lock"]
    workers = [subprocess.Popen(luigi_cmd(*args), cwd=REPO, env=env_for(work, config), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], logs
    ran = [s for log in logs for s in started(log, "ExtractFeaturesShard")]
    assert len(ran) == 4 and len(set(ran)) == 4  # every shard once, none twice
    assert sum(len(started(log, "ExtractFeatures")) for log in logs) == 1
    [merged] = (work / "ExtractFeatures").glob("*/features.h5")
    single = run_luigi(tmp_path / "single", config, "ExtractFeatures", "--shards", "1", "--images", str(images),
                       "--weights", str(weights), "--config", "tiny", "--boxes", "5", "--decode-workers", "0",
                       "--local-scheduler")
    assert single.returncode == 0
    [one] = (tmp_path / "single" / "ExtractFeatures").glob("*/features.h5")
    expected = feature_arrays(one)
    for key, value in feature_arrays(merged).items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
