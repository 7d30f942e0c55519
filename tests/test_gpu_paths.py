"""CUDA paths proven without a GPU: the network's forward and loss passes on fake CUDA tensors (a device
mismatch or a host synchronisation fails), tensor factories that name their device, bf16 autocast on the
CPU (a training step, an image without boxes), and which GPU a process takes."""
import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from training_helpers import TINY, pretrain_example

from model import LxmertForNLVR2, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel
from tasks.benchmarks.datasets import collate_task
from tasks.finetune import FinetuneConfig
from tasks.finetune import make_step as finetune_step
from tasks.pretrain import OBJECTIVES, PretrainConfig, collate_pretrain
from tasks.pretrain import make_step as pretrain_step
from tasks.training.distributed import resolve_device
from tasks.training.loop import StepContext, autocast, to_device
from tasks.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda", 0)


def fake_cuda(monkeypatch) -> FakeTensorMode:
    """Fake tensors that claim a CUDA device (shapes, dtypes and devices only; no data), with CUDA
    autocast switched on although torch sees no GPU.

    A fake op whose inputs sit on different devices raises FakeTensorDeviceMismatchError; one whose
    output size depends on data (nonzero, boolean-mask indexing) or that reads a value (`.item()`)
    raises too, so a pass that completes has neither. Autograd's engine needs a real CUDA context,
    so backward passes cannot run this way."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return FakeTensorMode(allow_non_fake_inputs=True)


def qa_examples(n: int) -> list[dict]:
    """VQA / GQA examples as QADataset returns them: the first labelled, the others not."""
    out = []
    for i in range(n):
        e = pretrain_example(i)
        target = np.zeros(TINY.num_qa_labels, dtype=np.float32)
        target[i % TINY.num_qa_labels] = 0.9 if i == 0 else 0.0
        out.append({"key": i, "input_ids": e["input_ids"], "visual_feats": e["visual_feats"],
                    "visual_pos": e["visual_pos"], "target": target})
    return out


def nlvr2_examples(n: int) -> list[dict]:
    """NLVR2 examples as NLVR2Dataset returns them: a sentence, two images of 4 boxes."""
    out = []
    for i in range(n):
        a, b = pretrain_example(2 * i, boxes=4), pretrain_example(2 * i + 1, boxes=4)
        out.append({"key": f"p{i}", "input_ids": a["input_ids"],
                    "visual_feats": np.stack([a["visual_feats"], b["visual_feats"]]),
                    "visual_pos": np.stack([a["visual_pos"], b["visual_pos"]]),
                    "box_mask": np.ones((2, 4), np.float32), "label": i % 2})
    return out


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_forward_and_losses_run_on_fake_cuda_tensors_without_host_syncs(monkeypatch, amp):
    ctx = StepContext(epoch=0, step=0)
    pretrain_batch = collate_pretrain([pretrain_example(i) for i in range(4)])
    qa_batch, nlvr2_batch = collate_task(qa_examples(3)), collate_task(nlvr2_examples(2))
    with fake_cuda(monkeypatch):
        with torch.device("cuda"):  # parameters on the fake GPU; tensors made in forward get no default
            pre, qa = LxmertForPreTraining(TINY).train(), LxmertForQuestionAnswering(TINY).train()
            nlvr2 = LxmertForNLVR2(TINY).train()
        assert pre.lxmert.embeddings.word_embeddings.weight.device == CUDA
        with autocast(amp, CUDA):
            out = pretrain_step(PretrainConfig())(pre, to_device(pretrain_batch, CUDA), ctx)
            assert out.loss.device == CUDA and out.loss.dtype == torch.float32
            assert set(out.parts) == set(OBJECTIVES) and all(v.device == CUDA for v in out.parts.values())
            for task, loss in (("vqa", "bce"), ("gqa", "ce")):
                batch = to_device(qa_batch, CUDA)
                out = finetune_step(FinetuneConfig(task=task, loss=loss))(qa, batch, ctx)
                assert out.loss.device == CUDA and out.loss.dtype == torch.float32 and out.loss.shape == ()
            batch = to_device(nlvr2_batch, CUDA)
            out = finetune_step(FinetuneConfig(task="nlvr2"))(nlvr2, batch, ctx)
            assert out.loss.device == CUDA and out.loss.shape == ()
            # inference: every word's logits, and the cross-attention maps of the explicit softmax
            pre.eval()
            inputs = {k: v for k, v in to_device(pretrain_batch, CUDA).items()
                      if k in ("input_ids", "attention_mask", "token_type_ids", "visual_pos",
                               "visual_attention_mask")}
            feats = to_device(pretrain_batch["visual_feats"], CUDA)
            scores = pre(visual_feats=feats, **inputs).prediction_logits
            assert scores.device == CUDA and scores.shape == (4, pretrain_batch["input_ids"].shape[1], 40)
            assert scores.dtype == {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
            maps = pre.lxmert(visual_feats=feats, output_attentions=True, **inputs).cross_encoder_attentions
            assert len(maps) == TINY.x_layers and all(m.device == CUDA for m in maps)


def test_fake_cuda_catches_a_device_mismatch_and_a_host_sync(monkeypatch):
    # the harness above is only as good as these two failures
    with fake_cuda(monkeypatch):
        x = torch.ones(3, device="cuda")
        with pytest.raises(RuntimeError, match="found at least two devices"):
            x + torch.ones(3)  # a factory without device=: the CPU
        with pytest.raises(RuntimeError, match="nonzero"):
            x[x > 0]  # a boolean mask: its size is known only on the device


FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "logspace", "eye", "scalar_tensor", "empty_strided"}
# functions of the network that build modules or move files, never run in a forward or loss pass
NOT_FORWARD = {"__init__", "init_weights", "from_pretrained", "save_pretrained", "init_answer_head_from",
               "set_fast_cpu_dropout", "classifier"}


def factories_without_device(path: Path, checked) -> list[str]:
    """`torch.<factory>(...)` calls without `device=` inside the functions `checked(name)` picks."""
    found = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) or not checked(fn.name):
            continue
        for call in ast.walk(fn):
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "torch"
                    and call.func.attr in FACTORIES and not any(k.arg == "device" for k in call.keywords)):
                found.append(f"{path.name}:{call.lineno} {fn.name}: torch.{call.func.attr}")
    return found


def test_tensor_factories_in_forward_and_loss_code_name_their_device(tmp_path):
    def model_code(name: str) -> bool:
        return name not in NOT_FORWARD

    def loss_code(name: str) -> bool:
        return name in ("loss", "step", "targets") or name.endswith("_loss")

    found = [f for path in (ROOT / "model").glob("*.py") if path.name in ("layers.py", "modeling.py")
             for f in factories_without_device(path, model_code)]
    found += [f for path in [*(ROOT / "tasks" / "benchmarks").glob("*.py"), ROOT / "tasks" / "pretrain.py",
                             ROOT / "tasks" / "finetune.py"]
              for f in factories_without_device(path, loss_code)]
    assert found == []
    # the checker itself: a factory without device= in a forward is reported, one with it is not
    code = tmp_path / "code.py"
    code.write_text("import torch\ndef forward(x):\n    return x + torch.zeros(3) + torch.ones(3, device=x.device)\n")
    assert factories_without_device(code, model_code) == ["code.py:3 forward: torch.zeros"]


def test_a_bf16_autocast_training_step_on_cpu_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = LxmertForPreTraining(TINY).train()
    batch = collate_pretrain([pretrain_example(i) for i in range(6)])
    step = pretrain_step(PretrainConfig())
    ctx = StepContext(epoch=0, step=0)
    fp32 = step(model, batch, ctx)
    with autocast("bf16", torch.device("cpu")):
        bf16 = step(model, batch, ctx)
    assert bf16.loss.dtype == torch.float32 and torch.isfinite(bf16.loss)
    assert float(bf16.loss.detach()) == pytest.approx(float(fp32.loss.detach()), rel=2e-2)
    for name in OBJECTIVES:
        want = float(fp32.parts[name].detach())
        assert float(bf16.parts[name].detach()) == pytest.approx(want, rel=5e-2, abs=1e-2), name
    bf16.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)
    before = model.cls.seq_relationship.weight.detach().clone()
    build_optimizer(model, "bertadam", lr=1e-2).step()
    assert not torch.equal(before, model.cls.seq_relationship.weight)


def test_an_image_without_boxes_under_bf16_autocast_attends_as_in_fp32():
    # every key of its rows is masked: fp32's additive mask rounded to -inf in bf16, and the words
    # attended to nothing (zeros) instead of uniformly over the padding as in fp32
    torch.manual_seed(0)
    model = LxmertModel(dataclasses.replace(TINY, initializer_range=0.2)).eval()  # attention that matters
    batch = collate_pretrain([pretrain_example(0, boxes=0), pretrain_example(1, boxes=4)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "visual_feats",
                                    "visual_pos", "visual_attention_mask")}
    assert batch["visual_attention_mask"][0].sum() == 0
    with torch.no_grad():
        fp32 = model(**inputs).language_output
        with autocast("bf16", torch.device("cpu")):
            bf16 = model(**inputs).language_output.float()
    assert torch.isfinite(bf16).all()
    assert torch.allclose(bf16, fp32, atol=0.1), (bf16 - fp32).abs().amax(dim=(1, 2))


@pytest.mark.parametrize(("visible", "local_rank", "want"), [(8, 3, 3), (1, 3, 0), (1, 0, 0), (4, 0, 0)])
def test_each_process_takes_its_own_gpu_or_the_only_one_it_sees(monkeypatch, visible, local_rank, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert resolve_device("cuda", local_rank) == torch.device("cuda", want)
    assert resolve_device("auto", local_rank) == torch.device("cuda", want)


def test_more_processes_than_visible_gpus_is_one_line_naming_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(RuntimeError, match=r"^device: LOCAL_RANK 2 needs GPU 2 but this process sees 2 "
                                           r"\(CUDA_VISIBLE_DEVICES=4,5\)"):
        resolve_device("cuda", 2)
