"""Metrics of scripts/train.py: a per-step table written as CSV and JSON, and the curves as PNG.

Also a command line that draws several runs on one figure (MoBA against full attention)::

    python scripts/train_log.py OUT.png RUN_DIR[:LABEL] [RUN_DIR[:LABEL] ...]

where each RUN_DIR holds the ``metrics.json`` of a run.
"""

from __future__ import annotations

import csv
import json
import os
import sys

COLUMNS = ("step", "loss", "eval_loss", "eval_acc", "lr", "tokens_per_s", "step_time_s", "peak_mem_gib")


class MetricsLog:
    """Rows keyed by step; ``update(step, **values)`` adds or merges columns of that step."""

    def __init__(self, rows: list[dict] | None = None):
        self.rows: dict[int, dict] = {int(r["step"]): dict(r) for r in rows or []}

    def update(self, step: int, **values) -> None:
        self.rows.setdefault(step, {"step": step}).update(values)

    def truncate(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (a resumed run rewrites them)."""
        self.rows = {s: r for s, r in self.rows.items() if s <= last_step}

    def as_list(self) -> list[dict]:
        return [self.rows[s] for s in sorted(self.rows)]

    def write(self, out_dir: str, meta: dict, chance: float | None = None, title: str = "") -> None:
        """``metrics.csv``, ``metrics.json`` (``meta`` plus the rows) and ``train_curves.png``."""
        os.makedirs(out_dir, exist_ok=True)
        rows = self.as_list()
        with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)
        plot_runs({"": rows}, os.path.join(out_dir, "train_curves.png"), chance=chance, title=title)


def plot_runs(runs: dict[str, list[dict]], path: str, *, chance: float | None = None,
              title: str = "") -> None:
    """Training loss (and eval loss) and eval accuracy against the step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        prefix = f"{label} " if label else ""
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [r for r in rows if r.get("eval_acc") is not None]
        if train:
            ax_loss.plot(*zip(*train), color=color, alpha=0.6, lw=1, label=f"{prefix}train")
        if evals:
            steps = [r["step"] for r in evals]
            ax_loss.plot(steps, [r["eval_loss"] for r in evals], "o-", color=color, ms=3,
                         label=f"{prefix}held-out")
            ax_acc.plot(steps, [r["eval_acc"] for r in evals], "o-", color=color, ms=3,
                        label=label or "held-out")
    if chance is not None:
        ax_acc.axhline(chance, color="gray", ls="--", lw=1, label=f"chance ({chance:.3g})")
    ax_loss.set(xlabel="step", ylabel="answer cross-entropy (nats)", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="retrieval accuracy (held-out)", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    runs, chance, titles = {}, None, []
    for spec in argv[1:]:
        run_dir, _, label = spec.partition(":")
        with open(os.path.join(run_dir, "metrics.json")) as f:
            data = json.load(f)
        runs[label or os.path.basename(os.path.normpath(run_dir))] = data["rows"]
        chance = data.get("chance", chance)
        titles.append(data.get("title", ""))
    plot_runs(runs, argv[0], chance=chance, title=titles[0] if titles else "")
    print(f"wrote {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
