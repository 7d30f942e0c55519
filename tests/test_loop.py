"""The shared loop on a toy regression: checkpoints, fallback, NaN stop, accumulation, logs."""
import csv
import json
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from tasks.training.checkpoints import CheckpointWarning, list_checkpoints, load_latest_checkpoint, save_checkpoint
from tasks.training.loop import NonFiniteLossError, StepOutput, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Toy(Dataset):
    """y = x . w with one example optionally poisoned by a NaN input."""

    def __init__(self, n: int = 32, poison: int | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
        if poison is not None:
            self.x[poison, 0] = float("nan")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"id": f"ex{i}", "x": self.x[i], "y": self.y[i]}


def collate(items: list[dict]) -> dict:
    return {"ids": [it["id"] for it in items], "x": torch.stack([it["x"] for it in items]),
            "y": torch.stack([it["y"] for it in items])}


def step(model, batch, ctx):
    pred = model(batch["x"]).squeeze(-1)
    loss = ((pred - batch["y"]) ** 2).mean()
    return StepOutput(loss, {"abs": (pred - batch["y"]).abs().mean()})


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), epochs=2, batch_size=8, lr=0.05, warmup_ratio=0.0,
                optimizer="adamw", weight_decay=0.0, num_workers=0, log_every=1, ckpt_every=2, keep_last=2,
                progress=False, tensorboard=False, plots=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def run(tmp_path, data=None, **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    result = train(model, data or Toy(), config(tmp_path, **kw), collate_fn=collate, step_fn=step,
                   loss_names=["abs"])
    return model, result


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_checkpoints_logs_plots_and_exports(tmp_path):
    model, result = run(tmp_path, tensorboard=True, plots=True)
    out = tmp_path / "run"
    assert result.step == 8 and result.epoch == 2
    # every 2 steps plus epoch ends, only the newest two kept, each with a manifest
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000006.pt", "step-00000008.pt"]
    manifest = json.loads((out / "checkpoints" / "step-00000008.json").read_text())
    assert manifest["step"] == 8 and len(manifest["sha256"]) == 64
    state, _ = load_latest_checkpoint(out / "checkpoints")
    assert state["epoch"] == 2 and state["batch_in_epoch"] == 0
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    logged = rows(out / "logs" / "train.csv")
    assert [int(r["step"]) for r in logged] == list(range(1, 9))
    assert float(logged[-1]["loss"]) < float(logged[0]["loss"]) and logged[0]["abs"] != ""
    assert list(logged[0]) == ["step", "epoch", "lr", "loss", "abs", "examples_per_s", "grad_norm",
                               "elapsed_s"]
    assert (out / "plots" / "loss.png").stat().st_size > 1000 and (out / "plots" / "abs.png").exists()
    assert any((out / "logs" / "tb").glob("events.out.tfevents.*"))
    assert (out / "final" / "model.pt").exists()


def test_resume_in_process_continues_exactly_and_truncates_logs(tmp_path):
    ref_model, _ = run(tmp_path / "a")
    ref = rows(tmp_path / "a" / "run" / "logs" / "train.csv")
    run(tmp_path / "b")
    # pretend the run died after the step-6 checkpoint: drop the newest one
    ckpts = tmp_path / "b" / "run" / "checkpoints"
    (ckpts / "step-00000008.json").unlink()
    model, result = run(tmp_path / "b")
    assert result.step == 8
    again = rows(tmp_path / "b" / "run" / "logs" / "train.csv")
    assert [r["step"] for r in again] == [r["step"] for r in ref]
    assert [r["loss"] for r in again] == [r["loss"] for r in ref]
    assert torch.equal(model.weight, ref_model.weight)
    # a finished run asked again returns its summary without training; changed settings are flagged
    _, again = run(tmp_path / "b")
    assert again.step == 8 and again.last_losses == result.last_losses
    with pytest.warns(CheckpointWarning, match=r"different settings \['lr'\]"):
        run(tmp_path / "b", lr=0.1)


def test_resume_between_log_rows_logs_the_uninterrupted_averages(tmp_path):
    # rows every 4 steps, checkpoints every 2: the step-6 checkpoint sits inside an open logging window
    ref_model, _ = run(tmp_path / "a", log_every=4, keep_last=4)
    ref = rows(tmp_path / "a" / "run" / "logs" / "train.csv")
    run(tmp_path / "b", log_every=4, keep_last=4)
    for name in ("step-00000008.json", "step-00000008.pt"):
        (tmp_path / "b" / "run" / "checkpoints" / name).unlink()
    model, result = run(tmp_path / "b", log_every=4, keep_last=4)
    again = rows(tmp_path / "b" / "run" / "logs" / "train.csv")
    assert [r["step"] for r in again] == [r["step"] for r in ref] == ["4", "8"]
    assert [(r["loss"], r["abs"]) for r in again] == [(r["loss"], r["abs"]) for r in ref]
    assert torch.equal(model.weight, ref_model.weight)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path):
    run(tmp_path)
    ckpts = tmp_path / "run" / "checkpoints"
    newest = ckpts / "step-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(CheckpointWarning, match="step-00000008.pt is unreadable"):
        state, path = load_latest_checkpoint(ckpts)
    assert path.name == "step-00000006.pt" and state["step"] == 6


def test_save_is_atomic_and_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint({"step": step}, tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000002.json", "step-00000002.pt", "step-00000003.json", "step-00000003.pt"]
    # a file without its manifest (killed before the manifest) does not count
    (tmp_path / "step-00000004.pt").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002.pt", "step-00000003.pt"]


def test_nan_loss_stops_naming_step_and_examples(tmp_path):
    data = Toy(poison=5)
    order = []  # find the optimiser step whose batch holds example 5 (shuffled by the seed)
    from torch.utils.data import DistributedSampler
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=9595, drop_last=True)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order += list(sampler)
    bad_step = order.index(5) // 8
    with pytest.raises(NonFiniteLossError) as err:
        run(tmp_path, data=data, ckpt_every=1)
    assert err.value.step == bad_step and "ex5" in err.value.batch_ids
    assert f"optimiser step {bad_step + 1}" in str(err.value) and "ex5" in str(err.value)
    report = json.loads((tmp_path / "run" / "logs" / "nonfinite.json").read_text())
    assert report["step"] == bad_step + 1 and "ex5" in report["batch_ids"]
    newest = list_checkpoints(tmp_path / "run" / "checkpoints")
    if bad_step:
        assert newest[-1].name == f"step-{bad_step:08d}.pt"
        state, _ = load_latest_checkpoint(tmp_path / "run" / "checkpoints")
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    else:
        assert newest == []


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    full, _ = run(tmp_path / "full", optimizer="bertadam", epochs=1)
    accum, _ = run(tmp_path / "accum", optimizer="bertadam", epochs=1, grad_accum=4)
    assert torch.allclose(full.weight, accum.weight, atol=1e-6)
    assert not torch.equal(full.weight, nn.Linear(4, 1).weight)


def test_config_errors_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="batch_size: 10 is not divisible"):
        run(tmp_path, batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="amp: fp16 needs CUDA"):
        run(tmp_path, amp="fp16")
    with pytest.raises(ValueError, match="optimizer: unknown"):
        run(tmp_path, optimizer="lamb")


def test_configs_round_trip_through_json_and_flags(tmp_path):
    from tasks.pretrain import PretrainConfig
    from tasks.training.runconfig import load_json, parse_config, save_json

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"corpus": ["a.json"], "qa": False, "train": {"lr": 0.5, "epochs": 3}}))
    cfg = parse_config(PretrainConfig, ["--config", str(path), "--epochs", "7", "--no-mlm",
                                        "--features", "x.h5", "y.h5", "--init-from", "none"])
    assert cfg.corpus == ["a.json"] and cfg.features == ["x.h5", "y.h5"] and cfg.init_from is None
    assert (cfg.qa, cfg.mlm) == (False, False)
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size) == (0.5, 7, 256)  # file, flag, default
    save_json(cfg, tmp_path / "saved.json")
    assert load_json(PretrainConfig, tmp_path / "saved.json") == cfg
    path.write_text(json.dumps({"train": {"learning_rate": 1}}))
    with pytest.raises(ValueError, match=r"cfg.json.train: unknown field\(s\) \['learning_rate'\]"):
        parse_config(PretrainConfig, ["--config", str(path)])


@pytest.mark.parametrize("has_bf16", [False, True])
def test_auto_amp_trains_in_bf16_only_where_the_cpu_has_it(tmp_path, monkeypatch, has_bf16):
    """amp="auto": bf16 autocast on a CPU with bf16 instructions, float32 elsewhere (bit-identical to amp="none");
    the result names the mode that ran."""
    from extractor import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    seen = []

    def watching(model, batch, ctx):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return step(model, batch, ctx)

    def fit(folder, amp):
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        result = train(model, Toy(), config(folder, amp=amp, epochs=1), collate_fn=collate, step_fn=watching,
                       loss_names=["abs"])
        return model, result

    auto_model, auto = fit(tmp_path / "auto", "auto")
    assert auto.amp == ("bf16" if has_bf16 else "none") and set(seen) == {has_bf16}
    plain_model, plain = fit(tmp_path / "plain", "none")
    assert plain.amp == "none"
    assert torch.equal(auto_model.weight, plain_model.weight) != has_bf16
