"""What a training run leaves to read: the losses averaged over each logging window and all ranks,
rank 0's CSV of logged steps and evaluations, TensorBoard events, and PNG plots of each loss at the
end. Every write is whole rows, so a kill leaves no half line."""
from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from extractor.fileio import append_text, atomic_write, writing
from tasks.training.distributed import DistEnv, all_reduce_sum


class LossWindow:
    """Sums of the logged losses since the last log row, kept on the device (one sync per row)."""

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(names), dtype=torch.float64, device=device)
        self.steps, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.sums[0] += loss.detach()
            self.counts[0] += 1
            for i, name in enumerate(self.names[1:], start=1):
                if name in parts:
                    self.sums[i] += parts[name].detach().float()
                    self.counts[i] += 1

    def state(self) -> tuple[list[float], list[float], int]:
        """The open window, saved in checkpoints so the first row after a resume averages the same steps."""
        return self.sums.tolist(), self.counts.tolist(), self.steps

    def restore(self, saved: list[Any] | None, env: DistEnv) -> None:
        """Reopen this rank's saved window when the checkpoint's job had the same shape."""
        if saved is None or len(saved) != env.world_size or len(saved[env.rank][0]) != len(self.names):
            return
        sums, counts, self.steps = saved[env.rank]
        self.sums += torch.tensor(sums, dtype=torch.float64, device=self.sums.device)
        self.counts += torch.tensor(counts, dtype=torch.float64, device=self.counts.device)

    def close(self, env: DistEnv) -> dict[str, float]:
        """Mean of each logged loss over the window and over all ranks; the window starts again."""
        packed = torch.stack([self.sums, self.counts])
        all_reduce_sum(env, packed)
        means = {name: float(packed[0, i] / packed[1, i]) for i, name in enumerate(self.names) if packed[1, i] > 0}
        self.sums.zero_()
        self.counts.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return means


class RunLogs:
    """Rank 0's CSV of every logged step, TensorBoard events and, at the end, PNG plots."""

    def __init__(self, root: Path, columns: list[str], resume_step: int | None, tensorboard: bool) -> None:
        self.dir = root / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.train_csv = self.dir / "train.csv"
        self.eval_csv = self.dir / "eval.csv"
        self.columns = ["step", "epoch", "lr", *columns, "examples_per_s", "grad_norm", "elapsed_s"]
        for path in (self.train_csv, self.eval_csv):
            self._truncate(path, resume_step)
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            purge = resume_step + 1 if resume_step is not None else None
            with writing(self.dir / "tb"):
                self.tb = SummaryWriter(log_dir=str(self.dir / "tb"), purge_step=purge)

    @staticmethod
    def _truncate(path: Path, resume_step: int | None) -> None:
        """Drop rows logged after the checkpoint we resume from (they will be logged again)."""
        if not path.exists():
            return
        if resume_step is None:
            path.unlink()
            return
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= resume_step] if rows else []
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        atomic_write(path, text.getvalue())

    @staticmethod
    def _append(path: Path, columns: list[str], row: dict[str, Any]) -> None:
        """Add a row (and the header to a new file) in one write, all or nothing, so no half row is left."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        if not path.exists():
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in columns})
        append_text(path, text.getvalue())

    def train_row(self, row: dict[str, Any]) -> None:
        self._append(self.train_csv, self.columns, row)
        if self.tb is not None:
            with writing(self.dir / "tb"):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value != "" and value is not None:
                        self.tb.add_scalar(f"train/{key}", value, row["step"])

    def eval_row(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        columns = ["step", "epoch", *sorted(metrics)]
        if self.eval_csv.exists():
            with self.eval_csv.open(newline="") as f:
                columns = next(csv.reader(f))
        self._append(self.eval_csv, columns, {"step": step, "epoch": epoch, **metrics})
        if self.tb is not None:
            with writing(self.dir / "tb"):
                for key, value in metrics.items():
                    self.tb.add_scalar(f"eval/{key}", value, step)

    def close(self, plot_columns: Sequence[str] | None) -> None:
        if self.tb is not None:
            with writing(self.dir / "tb"):
                self.tb.close()
        if plot_columns:
            plot_curves(self.train_csv, self.dir.parent / "plots", plot_columns)


def plot_curves(csv_path: Path, out_dir: Path, columns: Sequence[str]) -> list[Path]:
    """One PNG per loss column of a training CSV (step on x), for a glance without TensorBoard."""
    from matplotlib.figure import Figure

    if not csv_path.exists():
        return []
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with writing(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for column in columns:
        points = [(int(r["step"]), float(r[column])) for r in rows if r.get(column) not in (None, "")]
        if not points:
            continue
        fig = Figure(figsize=(6, 4), dpi=100)
        ax = fig.subplots()
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(column)
        ax.set_title(f"training {column}")
        ax.grid(True, alpha=0.3)
        path = out_dir / f"{column}.png"
        png = io.BytesIO()
        fig.savefig(png, format="png")
        atomic_write(path, png.getvalue())
        written.append(path)
    return written
