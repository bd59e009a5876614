"""Training throughput: the model, a no-op model (the data loader's ceiling), the matmul peak.

    python bench/train_bench.py                                   # default + ML-100K configs
    python bench/train_bench.py --configs configs/tiny.yaml --steps 20
    python bench/train_bench.py --configs configs/movielens-1m.yaml configs/gpu.yaml --steps 100

For each config, in one process:

* **model**: ``--steps`` training steps through the Lightning loop (no validation, no logger),
  examples/s = predicted positions per second over the steps after ``--warmup`` steps;
* **no-op**: the same DataModule and Trainer with a model that only counts positions, i.e. the
  ceiling that data loading and the training loop put on throughput;
* **FLOPs**: of one training step (forward + backward, counted by
  ``torch.utils.flop_counter``), per example, so ``examples/s x FLOPs/example`` is the achieved
  rate, compared with the **fp32 matmul peak** measured by timing large ``torch.mm`` calls on
  the same device in the same run (bf16 too on CUDA).

The load average is printed because the numbers only mean something on an otherwise idle
machine. Prints a Markdown table; ``--json`` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from twotower.train import fit  # noqa: E402


class _Clock(pl.Callback):
    """Examples/s over the training steps after ``warmup``."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.examples = 0
        self.start = 0.0
        self.end = 0.0

    def on_train_batch_end(
        self, trainer: Any, module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        if i + 1 == self.warmup:
            self.start = now
        elif i + 1 > self.warmup:
            self.examples += int(getattr(module, "_examples", 0))
            self.end = now

    @property
    def rate(self) -> float:
        return self.examples / max(self.end - self.start, 1e-9)


class NoOpModule(pl.LightningModule):
    """Counts the positions of each batch and does nothing else (one scalar parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        items = batch["items"]
        self._examples = int(((items[:, :-1] != 0) & (items[:, 1:] > 1)).sum())
        return self.w * 0.0

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best-of-``reps`` GFLOP/s of an ``n x n`` matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(reps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def step_flops(module: Any, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """FLOPs of one training step (forward + backward) and its number of examples."""
    from torch.utils.flop_counter import FlopCounterMode

    module.train()
    batch = {k: v.to(module.device) for k, v in batch.items()}
    with FlopCounterMode(display=False) as counter:
        loss, n = module.sequence_loss(batch)
        loss.backward()
    module.zero_grad(set_to_none=True)
    return float(counter.get_total_flops()), n


def bench_config(configs: list[str], steps: int, warmup: int, extra: dict[str, Any]) -> dict:
    """Model and no-op throughput of one config."""
    base = {
        "trainer.logger": False,
        "trainer.enable_checkpointing": False,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.limit_val_batches": 0,
        "trainer.num_sanity_val_steps": 0,
        "trainer.max_epochs": 1,
        "trainer.limit_train_batches": steps + warmup,
        "trainer.deterministic": False,
        **extra,
    }
    clock = _Clock(warmup)
    trainer, module, dm = fit(configs, base, callbacks=[clock])
    model_rate = clock.rate
    batch = next(iter(dm.train_dataloader()))
    flops, n = step_flops(module, batch)

    noop_clock = _Clock(warmup)
    noop = pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        limit_train_batches=steps + warmup,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator=trainer.accelerator.__class__.__name__.replace("Accelerator", "").lower(),
        devices=1,
        callbacks=[noop_clock],
    )
    noop.fit(NoOpModule(), train_dataloaders=dm.train_dataloader())
    return {
        "config": " + ".join(Path(c).name for c in configs),
        "device": str(module.device),
        "precision": str(trainer.precision),
        "batch_size": dm.batch_size,
        "window": dm.window,
        "examples_per_s": model_rate,
        "noop_examples_per_s": noop_clock.rate,
        "flops_per_example": flops / max(n, 1),
        "achieved_gflops": model_rate * flops / max(n, 1) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--configs",
        nargs="+",
        action="append",
        help="one benchmark per --configs (several files are layered)",
    )
    ap.add_argument("--steps", type=int, default=30, help="timed training steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    groups = args.configs or [
        [str(REPO / "configs" / "default.yaml")],
        [str(REPO / "configs" / "movielens-100k.yaml")],
    ]
    extra = dict(kv.split("=", 1) for kv in args.set)
    sys.argv = sys.argv[:1]  # LightningCLI inside fit() must not see this script's arguments
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    peak32 = matmul_peak(device, torch.float32)
    peaks = {"fp32": peak32}
    if device.type == "cuda":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, n=8192)
    rows = [bench_config(g, args.steps, args.warmup, extra) for g in groups]
    print(
        f"\n{device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"load average {load:.1f} at start); matmul peak "
        + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items())
    )
    print(
        "\n| config | precision | batch x window | examples/s | no-op examples/s | "
        "model / no-op | GFLOP/example | achieved GFLOP/s | % of fp32 peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['precision']} | {r['batch_size']} x {r['window']} | "
            f"{r['examples_per_s']:,.0f} | {r['noop_examples_per_s']:,.0f} | "
            f"{r['examples_per_s'] / r['noop_examples_per_s']:.1%} | "
            f"{r['flops_per_example'] / 1e9:.4f} | {r['achieved_gflops']:,.1f} | "
            f"{r['achieved_gflops'] / peak32:.1%} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"peaks": peaks, "load": load, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
