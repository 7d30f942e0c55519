"""How fast a network learns image-sentence matching when the sentence names what a box shows.

A probe for the demo's slow matching objective (docs/demo.md): synthetic images of a few boxes whose
features encode a colour and a shape (a fixed random vector per colour plus one per shape plus noise),
and a three-word sentence "[CLS] colour shape [SEP]". Half the sentences are true of the image; the
other half name what no box shows: with ``--task color`` a colour no box has (a bag of words and boxes
suffices), with ``--task pair`` a colour-shape pair no single box has (the word must be tied to the box).
Only the matching objective is trained; held-out accuracy is printed every ``--eval`` steps.

    python bench/matching_probe.py --task color --dropout 0.1 --lr 1e-4 --steps 400
    python bench/matching_probe.py --task pair --dropout 0 --lr 1e-4 --steps 600
"""
from __future__ import annotations

import argparse
import time

import torch
from machine import cpu_model

from model.config import LxmertConfig
from model.layers import set_fast_cpu_dropout
from model.modeling import LxmertForPreTraining
from tasks.training.weights import MODEL_PRESETS

COLORS = SHAPES = 7
CLS, SEP, FIRST_COLOR, FIRST_SHAPE = 1, 2, 3, 3 + COLORS


def make_batch(n: int, boxes: int, protos: tuple[torch.Tensor, torch.Tensor], task: str,
               g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """n images of `boxes` boxes, their sentences and matched labels (1 = the sentence is true)."""
    color_proto, shape_proto = protos
    c = torch.randint(0, COLORS, (n, boxes), generator=g)
    s = torch.randint(0, SHAPES, (n, boxes), generator=g)
    feats = torch.relu(color_proto[c] + shape_proto[s] + 0.5 * torch.randn(n, boxes, color_proto.shape[1], generator=g))
    pos = torch.rand(n, boxes, 4, generator=g).sort(-1).values
    matched = torch.randint(0, 2, (n,), generator=g)
    k = torch.randint(0, boxes, (n,), generator=g)
    qc, qs = c[torch.arange(n), k].clone(), s[torch.arange(n), k].clone()
    for i in torch.nonzero(matched == 0).flatten().tolist():
        while True:
            a, b = torch.randint(0, COLORS, (2,), generator=g).tolist()
            shown = (c[i] == a) & (s[i] == b) if task == "pair" else (c[i] == a)
            if not bool(shown.any()):
                qc[i], qs[i] = a, b
                break
    ids = torch.stack([torch.full((n,), CLS), FIRST_COLOR + qc, FIRST_SHAPE + qs, torch.full((n,), SEP)], 1)
    return ids, feats, pos, matched


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["color", "pair"], default="pair")
    p.add_argument("--dropout", type=float, default=0.1, help="both dropout rates of the network")
    p.add_argument("--native-dropout", action="store_true", help="torch's dropout kernel, not the CPU speed path")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--boxes", type=int, default=4)
    p.add_argument("--feature-dim", type=int, default=256)
    p.add_argument("--model", default="demo", choices=sorted(MODEL_PRESETS))
    p.add_argument("--eval", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    set_fast_cpu_dropout(not args.native_dropout)
    cfg = LxmertConfig(**MODEL_PRESETS[args.model], vocab_size=FIRST_SHAPE + SHAPES, visual_feat_dim=args.feature_dim,
                       hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout,
                       task_mask_lm=False, task_obj_predict=False, task_qa=False)
    model = LxmertForPreTraining(cfg)
    protos = (torch.randn(COLORS, args.feature_dim), torch.randn(SHAPES, args.feature_dim))
    g, held_out = torch.Generator().manual_seed(args.seed + 1), torch.Generator().manual_seed(args.seed + 2)
    val = make_batch(512, args.boxes, protos, args.task, held_out)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    print(f"task {args.task}, dropout {args.dropout}{' (native)' if args.native_dropout else ''}, lr {args.lr}, "
          f"model {args.model}, CPU {cpu_model()}, {args.threads} thread(s)", flush=True)
    t0 = time.process_time()
    for step in range(1, args.steps + 1):
        ids, feats, pos, matched = make_batch(args.batch_size, args.boxes, protos, args.task, g)
        model.train()
        loss = model(ids, feats, pos, matched_label=matched).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.eval == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                acc = (model(*val[:3]).cross_relationship_score.argmax(1) == val[3]).float().mean().item()
            print(f"step {step}: held-out matching accuracy {acc:.3f}, training loss {loss.item():.3f} "
                  f"({time.process_time() - t0:.0f} s CPU)", flush=True)


if __name__ == "__main__":
    main()
