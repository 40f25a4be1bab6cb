"""vlmc.train.loop on a toy task: files written, early stop, and a stop mid-epoch resumed to the same result."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmc.train.loop import BEST, HISTORY, LAST, Loop, Task, add_optim_args
from vlmc.utils.stop import StopRequested

torch.set_num_threads(1)
LOG = logging.getLogger("test_train_loop")
FIELDS = ("epoch", "train_loss", "val_loss", "lr", "seconds")


class Batches:
    """Four batches of a fixed regression set, shuffled per epoch; ``set_epoch(e, start)`` skips ``start``."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y, self.order, self.start = x, y, list(range(4)), 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.order = torch.randperm(4, generator=torch.Generator().manual_seed(epoch)).tolist()
        self.start = start

    def __iter__(self):
        for i in self.order[self.start:]:
            yield self.x[i * 4:(i + 1) * 4], self.y[i * 4:(i + 1) * 4]

    def __len__(self) -> int:
        return 4


class ToyTask(Task):
    """MSE of a linear map; the toy spec is the layer's shape."""

    history_fields = FIELDS
    counters = {"sse": 0.0, "n": 0}

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, generator=g)
        y = x @ torch.randn(3, 2, generator=g)
        torch.manual_seed(0)
        self.model, self.device, self.lr, self.n_batches = nn.Linear(3, 2), torch.device("cpu"), 0.05, 4
        self.loader = self.sampler = Batches(x, y)
        self.val = (x[:4], y[:4])
        self.spec = argparse.Namespace(to_dict=lambda: {"toy": [3, 2]})

    def loss(self, batch: Any, state: dict[str, Any]) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self.model(x), y)
        state["sse"] += float(loss.detach()) * y.numel()
        state["n"] += y.numel()
        return loss

    def train_metrics(self, state: dict[str, Any]) -> dict[str, float]:
        return {"train_loss": state["sse"] / max(state["n"], 1)}

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        return {"val_loss": float(F.mse_loss(self.model(self.val[0]), self.val[1]))}

    def describe(self, metrics: dict[str, float]) -> str:
        return f"train {metrics['train_loss']:.4f} val {metrics['val_loss']:.4f}"

    def best_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"state_dict": self.model.state_dict(), "meta": {"epoch": state["best_epoch"]}}


class StopAfter:
    """A stop flag that trips after ``n`` looks (the loop looks once per optimizer step)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __bool__(self) -> bool:
        self.n -= 1
        return self.n < 0


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_optim_args(p, epochs=3, lr=0.05, warmup_steps=1, patience=0)
    p.add_argument("--run_name", default=None)
    p.add_argument("--wandb", default="off")
    return p.parse_args(["--accumulation_steps", "2", *argv])


def _run(out: Path, stop: Any, *argv: str) -> int:
    out.mkdir(exist_ok=True)
    return Loop(_args(*argv), ToyTask(), out, stop, LOG).run()


def _history(out: Path) -> list[dict[str, str]]:
    with open(out / HISTORY, newline="") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def test_loop_writes_its_files_and_a_stop_resumes_to_the_same_run(tmp_path):
    ref = tmp_path / "ref"
    assert _run(ref, StopAfter(10**6)) == 0
    assert {p.name for p in ref.iterdir()} == {BEST, LAST, HISTORY}
    assert [r["epoch"] for r in _history(ref)] == ["1", "2", "3"] and list(_history(ref)[0]) == list(FIELDS[:-1])
    out = tmp_path / "out"
    with pytest.raises(StopRequested):
        _run(out, StopAfter(3))  # mid-epoch 2 (2 optimizer steps per epoch)
    assert not torch.load(out / LAST, weights_only=True)["state"]["finished"]
    assert _run(out, StopAfter(10**6)) == 0
    assert _history(out) == _history(ref)
    a, b = (torch.load(d / BEST, weights_only=True) for d in (out, ref))
    assert a["meta"] == b["meta"] and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_patience_stops_early_and_a_finished_run_is_left_alone(tmp_path):
    out = tmp_path / "o"
    assert _run(out, StopAfter(10**6), "--epochs", "6", "--lr", "5", "--warmup_steps", "0", "--patience", "1",
                "--min_delta", "1e9") == 0
    assert len(_history(out)) == 2  # epoch 1 is the best; epoch 2 cannot beat it by 1e9
    state = torch.load(out / LAST, weights_only=True)["state"]
    assert state["finished"] and state["best_epoch"] == 1
    before = (out / HISTORY).read_text()
    assert _run(out, StopAfter(10**6), "--epochs", "6") == 0 and (out / HISTORY).read_text() == before
