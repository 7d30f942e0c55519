"""How many examples per GPU fit a training step of LXMERT, estimated on the CPU from counted tensors.

The activations a step keeps for backward are counted with `torch.autograd.graph.saved_tensors_hooks`
(each storage once, parameters apart) at two batch sizes; their difference gives the bytes per
example, the rest is fixed. Weights, gradients and BertAdam's two moments are 16 bytes per parameter
(fp32). Under autocast the bf16 copies of the weights are among the fixed saved tensors. The largest
per-GPU micro-batch is (budget - fixed) / per example, with `--reserve` GiB kept for the CUDA context,
cuBLAS workspaces and the allocator's fragmentation. On a GPU the fused attention kernels keep less
than the CPU's explicit softmax (it saves the attention probabilities), so the estimate errs on the safe
side; with 20 words and 36 boxes the attention matrices are a few percent of the activations.

    python bench/memory_estimate.py                        # base: pretraining, VQA, NLVR2 at 80 GB
    python bench/memory_estimate.py --amp none --gpu-gib 40
"""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch
from torch import nn

from model import LxmertConfig, LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering
from tasks.data.batches import IGNORE
from tasks.pretrain import PretrainConfig, collate_pretrain, make_step
from tasks.training.loop import StepContext, autocast
from tasks.training.weights import MODEL_PRESETS

OPTIMIZER_BYTES = 16  # fp32 weight, gradient and BertAdam's two moments, per parameter


def pretrain_batch(n: int, config: LxmertConfig, words: int, boxes: int) -> dict:
    """n examples of `words` tokens (15% masked) and `boxes` boxes (15% masked), all with answers."""
    rng = np.random.default_rng(0)
    examples = []
    for i in range(n):
        labels = np.where(rng.random(words) < 0.15, rng.integers(1, config.vocab_size, words), IGNORE)
        feats = rng.standard_normal((boxes, config.visual_feat_dim)).astype(np.float32)
        examples.append({"id": str(i), "input_ids": rng.integers(1, config.vocab_size, words), "labels": labels,
                         "visual_feats": feats, "visual_pos": rng.random((boxes, 4)).astype(np.float32),
                         "obj_ids": rng.integers(0, config.num_object_labels, boxes),
                         "obj_conf": rng.random(boxes).astype(np.float32),
                         "attr_ids": rng.integers(0, config.num_attr_labels, boxes),
                         "attr_conf": rng.random(boxes).astype(np.float32), "feat_target": feats,
                         "feat_mask": (rng.random(boxes) < 0.15).astype(np.float32), "matched": i % 2,
                         "ans": int(rng.integers(0, config.num_qa_labels)), "index": i, "shown": i})
    return collate_pretrain(examples)


def loss_of(task: str, model: nn.Module, batch: dict, images: int) -> torch.Tensor:
    """The training loss of `task` on `batch` (NLVR2 pairs each sentence with `images` images)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    feats, pos = batch["visual_feats"], batch["visual_pos"]
    if task == "pretrain":
        return make_step(PretrainConfig())(model, batch, StepContext(0, 0)).loss
    if task == "nlvr2":
        feats, pos = feats[:, None].expand(-1, images, -1, -1), pos[:, None].expand(-1, images, -1, -1)
        return model(**inputs, visual_feats=feats, visual_pos=pos, labels=batch["matched_label"]).loss
    scores = model(**inputs, visual_feats=feats, visual_pos=pos).question_answering_score
    return nn.functional.binary_cross_entropy_with_logits(scores.float(), torch.zeros_like(scores, dtype=torch.float))


def saved_bytes(task: str, model: nn.Module, batch: dict, amp: str) -> int:
    """Bytes of the tensors the forward pass keeps for backward, each storage once, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(amp, torch.device("cpu")):
        loss_of(task, model, batch, images=2)
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="base", choices=sorted(MODEL_PRESETS))
    p.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    p.add_argument("--words", type=int, default=20)
    p.add_argument("--boxes", type=int, default=36)
    p.add_argument("--gpu-gib", type=float, default=80.0)
    p.add_argument("--reserve", type=float, default=6.0, help="GiB kept free (context, workspaces, fragmentation)")
    args = p.parse_args()
    torch.manual_seed(0)
    config = LxmertConfig(**MODEL_PRESETS[args.model])
    models = {"pretrain": LxmertForPreTraining(config),
              "vqa": LxmertForQuestionAnswering(dataclasses.replace(config, num_qa_labels=3129)),
              "nlvr2": LxmertForNLVR2(config)}
    small, large = 2, 6
    print(f"{args.model}, amp {args.amp}, {args.words} words, {args.boxes} boxes, {args.gpu_gib:.0f} GiB "
          f"less {args.reserve:.0f} reserved")
    print(f"{'task':9}{'params M':>9}{'state GiB':>10}{'fixed GiB':>10}{'MiB/example':>12}{'max/GPU':>9}")
    for task, model in models.items():
        model.train()
        a, b = (saved_bytes(task, model, pretrain_batch(n, config, args.words, args.boxes), args.amp)
                for n in (small, large))
        per_example = (b - a) / (large - small)
        fixed = max(a - small * per_example, 0.0)
        n_params = sum(p.numel() for p in model.parameters())
        state = n_params * OPTIMIZER_BYTES
        budget = (args.gpu_gib - args.reserve) * 2**30 - state - fixed
        print(f"{task:9}{n_params / 1e6:9.1f}{state / 2**30:10.2f}{fixed / 2**30:10.2f}"
              f"{per_example / 2**20:12.1f}{int(budget // per_example):9d}")


if __name__ == "__main__":
    main()
