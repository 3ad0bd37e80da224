"""Per-step metrics to stdout, a JSONL file and TensorBoard, and the final reward/KL plot."""
from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    """Writes one record per step. Values must already be Python numbers (one host sync per
    step happens in the trainer, not here).

    Args:
        output_dir: directory for ``metrics.jsonl``, ``tensorboard/`` and ``reward_curve.png``.
        tensorboard: also write TensorBoard event files.
        stdout: print a one-line summary per step (off when a progress bar shows it).
        history: records to start metrics.jsonl from (a resumed run), instead of appending.
    """

    SHOWN = {"reward/mean": "reward", "kl/mean": "kl", "loss/policy": "pg_loss", "loss/value": "vf_loss",
             "policy/entropy": "entropy", "eval/reward": "eval_reward", "time/step_s": "step_s"}

    def __init__(self, output_dir: str | Path, *, tensorboard: bool = True, stdout: bool = True,
                 history: list[dict] | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if history is not None:  # resuming: the file restarts from the checkpoint's records
            self.jsonl = (self.dir / "metrics.jsonl").open("w")
            for record in history:
                self.jsonl.write(json.dumps(record) + "\n")
        else:
            self.jsonl = (self.dir / "metrics.jsonl").open("a")
        self.stdout = stdout
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tensorboard"))
        self.history: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self.history.append(record)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.stdout:
            shown = " ".join(f"{name}={record[k]:.4g}" for k, name in self.SHOWN.items()
                             if isinstance(record.get(k), float))
            print(f"step {step}: {shown}", flush=True)

    def close(self) -> None:
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()


def plot_curves(history: list[dict], path: str | Path, *, title: str = "PPO") -> Path | None:
    """PNG of reward (mean ± std) and KL per step. Returns the path, or None without data."""
    rows = [r for r in history if "reward/mean" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    mean = [r["reward/mean"] for r in rows]
    std = [r.get("reward/std", 0.0) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(steps, mean, marker="o", ms=3, label="reward (rollout mean)")
    ax1.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    evals = [r for r in history if "eval/reward" in r]
    if evals:
        ax1.plot([r["step"] for r in evals], [r["eval/reward"] for r in evals], "s--", label="held-out reward")
    ax1.set_xlabel("step")
    ax1.set_ylabel("reward")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r.get("kl/mean", float("nan")) for r in rows], color="tab:red", marker="o", ms=3)
    ax2.set_xlabel("step")
    ax2.set_ylabel("KL(policy || reference), per sequence")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
