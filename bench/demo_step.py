"""What sizing the demo network for its world buys, per training step, on this machine.

One pretraining step (forward with all five losses, backward, fused AdamW) of the `demo` network
on demo-shaped batches (batch 64, 20 tokens, 10 boxes of 256-d features, answer table of 60),
in four settings that add one change at a time:

    bert      BERT's 30,522-word vocabulary, 1600 / 400 object / attribute heads, native dropout
    +vocab    the world's 114-word vocabulary (tasks.data.tokenization.sub_vocabulary)
    +heads    heads sized for the demo detector's 7 objects / 9 attributes
    +dropout  dropout masks from 16-bit draws on CPU (model.layers.dropout), what the demo runs

Native dropout is torch.native_dropout for hidden layers and SDPA's own attention dropout, as
before the change. The settings alternate in one process, `--repeats` rounds of `--steps`
timed steps each, and the median ms/step of each is printed with the speed-up over `bert`.

    python bench/demo_step.py
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from machine import cpu_model

import model.layers as layers
from model import LxmertForPreTraining
from tasks.training.weights import model_config_from

B, L, O, D, ANSWERS = 64, 20, 10, 256, 60


@contextlib.contextmanager
def native_dropout() -> Iterator[None]:
    """Dropout as it was: the native kernel for hidden layers, SDPA's dropout for attention."""
    saved = layers.dropout, layers.Attention.forward

    def hidden(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        return torch.native_dropout(x, p, True)[0] if training and p > 0 else x

    def attention(self: layers.Attention, x: torch.Tensor, context: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self.split_heads(f(t)) for f, t in ((self.query, x), (self.key, context), (self.value, context)))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout_p if self.training else 0.0)
        return y.transpose(1, 2).flatten(2)

    layers.dropout, layers.Attention.forward = hidden, attention
    try:
        yield
    finally:
        layers.dropout, layers.Attention.forward = saved


def setting(vocab: int, labels: tuple[int, int],
            dropout: float | None = None) -> tuple[LxmertForPreTraining, torch.optim.Optimizer, dict]:
    """The demo network (every dropout rate set to `dropout`, None: the preset's), its optimiser and a batch."""
    torch.manual_seed(0)
    config = model_config_from("demo")
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    config.vocab_size, (config.num_object_labels, config.num_attr_labels) = vocab, labels
    config.visual_feat_dim, config.num_qa_labels = D, ANSWERS
    net = LxmertForPreTraining(config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(1)
    labels_mlm = torch.full((B, L), -100)
    labels_mlm[:, 3] = torch.randint(5, vocab, (B,), generator=g)
    labels_mlm[:, 7] = torch.randint(5, vocab, (B,), generator=g)
    feat_mask = (torch.rand(B, O, generator=g) < 0.15).float()
    batch = {
        "input_ids": torch.randint(5, vocab, (B, L), generator=g),
        "attention_mask": torch.ones(B, L, dtype=torch.long),
        "token_type_ids": torch.zeros(B, L, dtype=torch.long),
        "visual_feats": torch.randn(B, O, D, generator=g),
        "visual_pos": torch.rand(B, O, 4, generator=g),
        "visual_attention_mask": torch.ones(B, O),
        "labels": labels_mlm,
        "obj_labels": {"obj": (torch.randint(0, labels[0], (B, O), generator=g), torch.rand(B, O, generator=g)),
                       "attr": (torch.randint(0, labels[1], (B, O), generator=g), torch.rand(B, O, generator=g)),
                       "feat": (torch.randn(B, O, D, generator=g), feat_mask)},
        "matched_label": torch.randint(0, 2, (B,), generator=g),
        "ans": torch.randint(0, ANSWERS, (B,), generator=g),
    }
    return net, opt, batch


def step(net: LxmertForPreTraining, opt: torch.optim.Optimizer, batch: dict) -> None:
    loss = net(**batch).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timing_args(doc: str) -> argparse.Namespace:
    """`--steps`, `--repeats` and `--threads` of a timing script (torch's threads set from the last)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def alternate(settings: dict[str, tuple[Callable[[], contextlib.AbstractContextManager], Callable[[], None]]],
              steps: int, repeats: int) -> dict[str, float]:
    """Median ms per call of each setting's function, run inside its context: the settings alternate,
    `repeats` rounds of one warm call and `steps` timed calls each."""
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(repeats):
        for name, (context, run) in settings.items():
            with context():
                run()  # warm
                start = time.perf_counter()
                for _ in range(steps):
                    run()
                times[name].append((time.perf_counter() - start) / steps * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    args = timing_args(__doc__)
    settings = {
        "bert": (30522, (1600, 400), True),
        "+vocab": (114, (1600, 400), True),
        "+heads": (114, (7, 9), True),
        "+dropout": (114, (7, 9), False),
    }
    built = {name: setting(vocab, labels) for name, (vocab, labels, _) in settings.items()}
    ms = alternate({name: (native_dropout if native else contextlib.nullcontext, functools.partial(step, *built[name]))
                    for name, (_, _, native) in settings.items()}, args.steps, args.repeats)
    rows = {name: {"ms_per_step": round(t, 1), "speedup": round(ms["bert"] / t, 2)} for name, t in ms.items()}
    print(json.dumps({"machine": cpu_model(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "batch": B, "steps": args.steps, "repeats": args.repeats,
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
