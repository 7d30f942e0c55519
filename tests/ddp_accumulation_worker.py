"""One process of tests/test_ddp_accumulation.py, started by torchrun (gloo): a tiny LXMERT pretrained with
gradient accumulation where rank 0's last micro-batch of every step has no answers (its QA target is None)
while rank 1's have them. `--resume-hidden` resumes the run while rank 1's listing of the checkpoint folder
lacks the newest checkpoint, as a rank on a shared filesystem may see it. Each rank writes its weights
and what it saw to OUT/rank<r>.pt.

    torchrun --nproc_per_node 2 tests/ddp_accumulation_worker.py OUT STEPS [--resume-hidden]
"""
import sys
from pathlib import Path

import torch

from model import LxmertForPreTraining
from tasks.pretrain import PretrainConfig, collate_pretrain, make_step
from tasks.training import checkpoints
from tasks.training.distributed import cleanup_distributed, init_distributed
from tasks.training.loop import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_helpers import TINY, PretrainExamples  # noqa: E402

GRAD_ACCUM = 2


def main(out: Path, steps: int, resume_hidden: bool) -> None:
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    seen = None
    if resume_hidden and env.rank == 1:
        listed = checkpoints.list_checkpoints
        checkpoints.list_checkpoints = lambda directory: listed(directory)[:-1]
        seen = checkpoints.load_latest_checkpoint(out / "run" / "checkpoints")[0]["step"]
    pretrain = make_step(PretrainConfig())
    calls = []

    def step(model, batch, ctx):
        calls.append(ctx.step)
        if env.rank == 0 and len(calls) % GRAD_ACCUM == 0:
            assert batch["ans"] is not None
            batch = {**batch, "ans": None}  # no answer in this micro-batch: no QA loss, no answer head gradient
        return pretrain(model, batch, ctx)

    torch.manual_seed(0)
    model = LxmertForPreTraining(TINY)
    cfg = TrainConfig(output_dir=str(out / "run"), max_steps=steps, batch_size=8, grad_accum=GRAD_ACCUM,
                      lr=1e-2, warmup_ratio=0.0, num_workers=0, log_every=1, ckpt_every=1, keep_last=4,
                      progress=False, tensorboard=False, plots=False, device="cpu")
    result = train(model, PretrainExamples(32), cfg, collate_fn=collate_pretrain, step_fn=step, env=env,
                   export_fn=lambda m, d: None)
    torch.save({"model": model.state_dict(), "step": result.step, "steps_run": sorted(set(calls)),
                "hidden_view": seen}, out / f"rank{env.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), "--resume-hidden" in sys.argv)
