"""Shared test settings: offline, seeded, few threads (CI has 2 cores)."""
import os
import random
from pathlib import Path

import luigi
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and subprocesses that also use one get the same arithmetic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def wd(tmp_path, monkeypatch) -> Path:
    """A fresh work folder for the pipeline's tasks (LXMERT_WORKDIR)."""
    monkeypatch.setenv("LXMERT_WORKDIR", str(tmp_path / "work"))
    return tmp_path / "work"


@pytest.fixture()
def demo_tiny():
    """The demo world's tiny preset for tasks that build it, whatever luigi.cfg says."""
    config = luigi.configuration.get_config()
    had = config.has_section("GenerateDemoWorld")
    old = config.get("GenerateDemoWorld", "preset", None)
    if not had:
        config.add_section("GenerateDemoWorld")
    config.set("GenerateDemoWorld", "preset", "tiny")
    yield
    if old is None:
        config.remove_option("GenerateDemoWorld", "preset")
    else:
        config.set("GenerateDemoWorld", "preset", old)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The reduced demo chain (tiny world, briefly trained detector, tiny network), run once for the session:
    (root, its luigi.cfg, the finished RunAll process)."""
    from pipeline_helpers import run_luigi, write_config

    root = tmp_path_factory.mktemp("demo")
    config = write_config(root / "tiny.cfg")
    # --no-lock: Luigi's process lock is keyed on the command line alone, so another session running the same
    # RunAll on this machine would make this one exit 0 at once, having done nothing
    proc = run_luigi(root / "work", config, "RunAll", "--local-scheduler", "--no-lock", timeout=600)
    return root, config, proc
