"""The loop's GPU state without a GPU: resuming across AMP modes (a CPU GradScaler stands in for CUDA's),
GPU generator states that follow the rank when the job's layout changes (torch.cuda monkeypatched), the
non-finite check once per optimiser step, and the budget of host synchronisations per step."""
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import Dataset
from training_helpers import TINY, PretrainExamples

from model import LxmertForPreTraining
from tasks.pretrain import PretrainConfig, collate_pretrain, make_step
from tasks.training import loop
from tasks.training.checkpoints import (
    CheckpointWarning,
    list_checkpoints,
    load_latest_checkpoint,
    rng_state,
    set_rng_state,
)
from tasks.training.loop import NonFiniteLossError, StepOutput, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Line(Dataset):
    """y = 2x - 1 on 32 points; `poison` makes one input NaN."""

    def __init__(self, poison: int | None = None) -> None:
        self.x = torch.linspace(-1, 1, 32)
        if poison is not None:
            self.x[poison] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"ex{i}", "x": self.x[i : i + 1], "y": 2 * self.x[i : i + 1] - 1}


def collate(items: list[dict]) -> dict:
    return {"ids": [it["id"] for it in items], "x": torch.stack([it["x"] for it in items]),
            "y": torch.stack([it["y"] for it in items])}


def step(model, batch, ctx):
    # scaled down so that fp16 gradients times the GradScaler's first scale (65536) stay finite
    return StepOutput(0.01 * ((model(batch["x"]) - batch["y"]) ** 2).mean())


def fit(tmp_path, data=None, **kw):
    cfg = dict(output_dir=str(tmp_path / "run"), epochs=1, batch_size=8, lr=0.05, warmup_ratio=0.0,
               optimizer="adamw", num_workers=0, log_every=1, ckpt_every=2, progress=False, tensorboard=False,
               plots=False, device="cpu")
    cfg.update(kw)
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    return model, train(model, data or Line(), TrainConfig(**cfg), collate_fn=collate, step_fn=step)


# ----------------------------------------------------------------------------- AMP modes


def test_resuming_across_amp_modes_keeps_training(tmp_path, monkeypatch):
    # fp16 trains where a GradScaler exists; torch has one for the CPU, so the CPU stands in for CUDA
    monkeypatch.setattr(loop, "FP16_DEVICES", ("cuda", "cpu"))
    ckpts = tmp_path / "run" / "checkpoints"
    fit(tmp_path, max_steps=2)  # amp none: its checkpoint holds an empty scaler state
    assert load_latest_checkpoint(ckpts)[0]["scaler"] == {}
    with pytest.warns(CheckpointWarning, match=r"different settings \['amp', 'max_steps'\]"):
        _, result = fit(tmp_path, max_steps=3, amp="fp16")  # was: RuntimeError in scaler.load_state_dict({})
    assert result.step == 3
    scaler = load_latest_checkpoint(ckpts)[0]["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 1  # a fresh scale, one good step
    with pytest.warns(CheckpointWarning, match=r"different settings \['max_steps'\]"):
        fit(tmp_path, max_steps=4, amp="fp16")
    assert load_latest_checkpoint(ckpts)[0]["scaler"]["_growth_tracker"] == 2  # the saved scale continued
    for amp, steps in (("bf16", 5), ("none", 6)):  # and back from an fp16 checkpoint
        with pytest.warns(CheckpointWarning, match="different settings"):
            model, result = fit(tmp_path, max_steps=steps, amp=amp)
        assert result.step == steps and torch.isfinite(model.weight).all()
    assert [p.name for p in list_checkpoints(ckpts)][-1] == "step-00000006.pt"


# ----------------------------------------------------------------------------- GPU generators


class FakeGpus:
    """torch.cuda's generator functions over `count` GPUs of one machine, each with its own state;
    a device index past `count` fails as CUDA does."""

    def __init__(self, monkeypatch, count: int, machine: int) -> None:
        self.count = count
        self.states = {i: torch.full((8,), 10 * machine + i, dtype=torch.uint8) for i in range(count)}
        for name, fn in (("is_available", lambda: True), ("device_count", lambda: count),
                         ("get_rng_state", self.get), ("set_rng_state", self.set),
                         ("get_rng_state_all", lambda: [self.get(i) for i in range(count)]),
                         ("set_rng_state_all", lambda states: [self.set(s, i) for i, s in enumerate(states)])):
            monkeypatch.setattr(torch.cuda, name, fn)

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index}")
        return index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self.index(device)] = state.clone()


@pytest.mark.parametrize("layout", [(2, 4), (8, 1)], ids=["2 machines x 4 GPUs", "one GPU bound per process"])
def test_gpu_generator_states_follow_the_rank_when_the_layout_changes(monkeypatch, layout):
    # written by 8 processes on one machine of 8 GPUs: what the loop gathers, one entry per rank
    gpus = FakeGpus(monkeypatch, 8, machine=0)
    saved = [rng_state(torch.device("cuda", rank)) for rank in range(8)]
    assert [int(s["cuda"][0]) for s in saved] == list(range(8))  # each rank saved its own GPU only
    machines, per_machine = layout
    for m in range(machines):
        gpus = FakeGpus(monkeypatch, per_machine, machine=m + 1)
        for local in range(per_machine):
            rank = m * per_machine + local
            device = torch.device("cuda", local if per_machine > 1 else 0)
            set_rng_state(saved[rank], device)
            assert torch.equal(gpus.get(device), saved[rank]["cuda"]), rank


def test_a_cpu_run_saves_no_gpu_state_and_old_checkpoints_restore_by_device(monkeypatch):
    gpus = FakeGpus(monkeypatch, 2, machine=0)
    assert rng_state(torch.device("cpu"))["cuda"] is None
    state = rng_state(torch.device("cpu"))
    set_rng_state(state, torch.device("cpu"))
    assert [int(gpus.get(i)[0]) for i in range(2)] == [0, 1]  # untouched
    # checkpoints written before held every visible GPU's state by index: the device's own is taken
    old = {**state, "cuda": [torch.full((8,), 70 + i, dtype=torch.uint8) for i in range(4)]}
    set_rng_state(old, torch.device("cuda", 1))
    assert [int(gpus.get(i)[0]) for i in range(2)] == [0, 71]


# ----------------------------------------------------------------------------- one check per step


def test_a_nan_inside_an_accumulated_step_stops_before_the_update_naming_its_examples(tmp_path):
    # 4 micro-batches of 2 per step; example 5 sits in some micro-batch of a step that is not the first
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(Line(), num_replicas=1, rank=0, shuffle=True, seed=9595, drop_last=True)
    order = list(sampler)
    position = order.index(5)
    bad_step, micro = position // 8, position // 2
    with pytest.raises(NonFiniteLossError) as err:
        fit(tmp_path, data=Line(poison=5), grad_accum=4, ckpt_every=1)
    assert err.value.step == bad_step
    assert err.value.batch_ids == [f"ex{i}" for i in order[2 * micro : 2 * micro + 2]]
    good = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in good] == ([f"step-{bad_step:08d}.pt"] if bad_step else [])


class SyncCounter(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value (`.item()`, `bool()`),
    an output sized by data (nonzero, boolean-mask indexing, masked_select, unique), a device-to-host copy."""

    ops = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
           torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.equal.default,
           torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
           torch.ops.aten.repeat_interleave.Tensor}
    indexing = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                torch.ops.aten._index_put_impl_.default}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:
            self.seen.append(str(func))
        elif func in self.indexing and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                           for i in args[1]):
            self.seen.append(f"{func} with a boolean mask")
        elif func is torch.ops.aten._to_copy.default and args[0].device.type != "cpu" \
                and torch.device(kwargs.get("device") or args[0].device).type == "cpu":
            self.seen.append("device-to-host copy")
        elif func is torch.ops.aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.seen.append("device-to-host copy")
        return func(*args, **kwargs)


def test_a_pretraining_step_waits_for_the_device_once_and_its_micro_batches_never(tmp_path, monkeypatch):
    counts: dict[str, list[list[str]]] = {"forward_backward": [], "optimizer_step": []}
    for name, calls in counts.items():
        def counted(self, *args, _name=name, _calls=calls, **kwargs):
            with SyncCounter() as counter:
                out = getattr(loop._Run, f"_plain_{_name}")(self, *args, **kwargs)
            _calls.append(counter.seen)
            return out
        monkeypatch.setattr(loop._Run, f"_plain_{name}", getattr(loop._Run, name), raising=False)
        monkeypatch.setattr(loop._Run, name, counted)
    torch.manual_seed(0)
    model = LxmertForPreTraining(dataclasses.replace(TINY, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), epochs=1, max_steps=2, batch_size=8, grad_accum=2,
                      num_workers=0, log_every=100, ckpt_every=0, progress=False, tensorboard=False, plots=False,
                      device="cpu")
    train(model, PretrainExamples(32), cfg, collate_fn=collate_pretrain, step_fn=make_step(PretrainConfig()),
          export_fn=lambda m, d: None)
    assert len(counts["forward_backward"]) == 4 and len(counts["optimizer_step"]) == 2
    assert counts["forward_backward"] == [[]] * 4  # forward, five losses, backward: no wait
    assert counts["optimizer_step"] == [["aten._local_scalar_dense.default"]] * 2  # the non-finite check
