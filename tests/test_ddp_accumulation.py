"""Two gloo processes under torchrun: gradient accumulation where one rank's micro-batch has no answers
keeps the ranks' weights equal, and a resume goes on from the checkpoint rank 0 picks even when another
rank's view of the shared folder lags behind."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_helpers import TINY

from model import LxmertForPreTraining

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_accumulation_worker.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def torchrun(out: Path, steps: int, *flags: str) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out), str(steps), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # ranks that disagree wait for each other forever: stop them all
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    return tuple(torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def test_accumulation_with_a_rank_lacking_answers_and_a_resume_keep_the_ranks_equal(tmp_path):
    first, second = torchrun(tmp_path, 2)
    assert first["step"] == second["step"] == 2
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
    # the answer head learned on both ranks although rank 0 had no answer in half its micro-batches
    torch.manual_seed(0)
    fresh = LxmertForPreTraining(TINY).state_dict()
    assert not torch.equal(first["model"]["answer_head.logit_fc.3.weight"], fresh["answer_head.logit_fc.3.weight"])

    # rank 1 lists the folder without the newest checkpoint (step 2): both ranks still resume from step 2
    first, second = torchrun(tmp_path, 4, "--resume-hidden")
    assert second["hidden_view"] == 1
    assert first["steps_run"] == second["steps_run"] == [2, 3]
    assert first["step"] == second["step"] == 4
    for key, value in first["model"].items():
        assert torch.equal(value, second["model"][key]), key
