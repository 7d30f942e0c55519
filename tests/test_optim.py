"""BertAdam's update rule and the warm-up / linear-decay schedule, against hand-computed values."""
import io
import math

import pytest
import torch
from torch import nn

from tasks.training.optim import BertAdam, build_optimizer, warmup_linear_factor, warmup_linear_schedule


def test_bertadam_first_steps_have_no_bias_correction_and_decay_every_parameter():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = BertAdam([p], lr=0.1, eps=1e-6, weight_decay=0.01, param_clip=0.0)
    g = torch.tensor([0.5, 0.25])
    p.grad = g.clone()
    opt.step()
    m, v = 0.1 * g, 0.001 * g * g
    update = m / (v.sqrt() + 1e-6) + 0.01 * torch.tensor([1.0, -2.0])
    expected = torch.tensor([1.0, -2.0]) - 0.1 * update
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    # without bias correction the first Adam step is sqrt(1000) * 0.1 = 3.16 times the lr, not 1
    assert math.isclose(float(m[0] / v[0].sqrt()), 0.1 / math.sqrt(0.001), rel_tol=1e-6)

    prev = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    m2, v2 = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    expected2 = prev - 0.1 * (m2 / (v2.sqrt() + 1e-6) + 0.01 * prev)
    assert torch.allclose(p.detach(), expected2, atol=1e-6)


def test_bertadam_clips_each_gradient_tensor_on_its_own():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(1))
    opt = BertAdam([a, b], lr=1.0, weight_decay=0.0, param_clip=1.0)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.5])
    opt.step()
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.8]), atol=1e-5)  # norm 5 -> 1
    assert torch.allclose(b.grad, torch.tensor([0.5]))                  # norm 0.5 stays
    assert torch.allclose(opt.state[a]["exp_avg"], torch.tensor([0.06, 0.08]), atol=1e-6)


def test_build_optimizer_decay_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    bert = build_optimizer(model, "bertadam", lr=1e-3, weight_decay=0.01)
    assert isinstance(bert, BertAdam)
    assert len(bert.param_groups) == 1 and bert.param_groups[0]["weight_decay"] == 0.01
    assert len(bert.param_groups[0]["params"]) == 4
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, eps=1e-6)
    decayed, plain = adamw.param_groups
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])]
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0 and len(plain["params"]) == 3
    with pytest.raises(ValueError, match="optimizer: unknown 'sgd'"):
        build_optimizer(model, "sgd", lr=1e-3)


def test_warmup_then_linear_decay_to_zero():
    factors = [warmup_linear_factor(s, 100, 0.1) for s in (0, 5, 10, 55, 100, 120)]
    assert factors == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    p = nn.Parameter(torch.zeros(1))
    opt = BertAdam([p], lr=1e-4)
    sched = warmup_linear_schedule(opt, total_steps=20, warmup_ratio=0.05)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-4)          # warm-up over 1 step
    assert lrs[11] == pytest.approx(1e-4 * 9 / 19) and lrs[-1] == pytest.approx(1e-4 / 19)


def test_schedule_state_survives_a_weights_only_round_trip():
    p = nn.Parameter(torch.zeros(1))
    opt = BertAdam([p], lr=1.0)
    sched = warmup_linear_schedule(opt, total_steps=10, warmup_ratio=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"sched": sched.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = BertAdam([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_linear_schedule(opt2, total_steps=10, warmup_ratio=0.5)
    sched2.load_state_dict(state["sched"])
    opt2.load_state_dict(state["opt"])
    assert sched2.get_last_lr() == pytest.approx([0.6]) == sched.get_last_lr()


def test_multi_tensor_update_equals_the_per_tensor_one():
    from tasks.training.optim import _multi_tensor_update, _single_tensor_update

    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 3 for s in shapes]
    group = {"betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.01, "param_clip": 1.0, "lr": 0.05}
    one = [[t.clone() for t in ts] for ts in (params, grads, [torch.zeros(s) for s in shapes],
                                             [torch.zeros(s) for s in shapes])]
    many = [[t.clone() for t in ts] for ts in one]
    for _ in range(3):
        for p, gr, m, v in zip(*one):
            _single_tensor_update(p, gr, m, v, group)
        _multi_tensor_update(*many, group)
    for a, b in zip(one[0], many[0]):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(one[0][0], params[0])
