"""The exit codes of luigi.cfg's [retcode] section, as a cron job or a cluster script sees them."""
from __future__ import annotations

from pipeline_helpers import run_luigi, write_config


def test_a_missing_input_exits_35_and_a_failed_task_exits_30(tmp_path):
    config = write_config(tmp_path / "luigi.cfg", "[core]\nautoload_range = false\n")
    missing = run_luigi(tmp_path / "work", config, "PretrainLXMERT", "--local-scheduler",
                        "--PretrainLXMERT-corpus", f'["{tmp_path}/nope.json"]',
                        "--PretrainLXMERT-features", f'["{tmp_path}/nope.h5"]')
    assert missing.returncode == 35, missing.stderr[-2000:]
    assert "nope.json" in missing.stdout + missing.stderr
    assert not (tmp_path / "work").exists()  # nothing was run, not even the work directory made

    not_hdf5 = tmp_path / "features.h5"
    not_hdf5.write_text("not an HDF5 file\n")
    failed = run_luigi(tmp_path / "work", config, "ValidateFeatures", "--local-scheduler",
                       "--ValidateFeatures-features", str(not_hdf5))
    assert failed.returncode == 30, failed.stderr[-2000:]
    assert str(not_hdf5) in failed.stdout + failed.stderr
