"""The PNG figures of a run: learning curves, and (regression) fits before/after adaptation."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(metrics_path: Path, out_path: Path) -> Path:
    """Training loss/metric per iteration and the periodic meta-test evaluations."""
    plt = _pyplot()
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    metric = "mse" if "mse" in records[0] else "accuracy"
    its = [r["iteration"] for r in records]
    evals = [r for r in records if "eval" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(its, [r["loss"] for r in records], lw=0.5, label="meta-train query loss")
    axes[0].set_xlabel("iteration")
    axes[0].set_yscale("log")
    axes[0].legend()
    axes[1].plot(
        its, [r[metric] for r in records], lw=0.5, alpha=0.5, label=f"meta-train {metric} (query)"
    )
    axes[1].errorbar(
        [r["iteration"] for r in evals], [r["eval"]["mean"] for r in evals],
        yerr=[r["eval"]["ci95"] for r in evals], fmt="o-",
        label=f"meta-test {metric}, {evals[-1]['eval'].get('steps', '?') if evals else '?'} steps (95% CI)",
    )  # fmt: skip
    axes[1].set_xlabel("iteration")
    if metric == "mse":
        axes[1].set_yscale("log")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def regression_fits(maml, sampler, out_path: Path, device, steps=(1, 10), tasks: int = 4) -> Path:
    """True curve, support points, and predictions before and after ``steps`` inner steps."""
    plt = _pyplot()
    batch, params = sampler.spawn(12345).sample_with_params(tasks)
    xs, ys = (t.to(device) for t in batch["train"])
    grid = torch.linspace(-5, 5, 200).view(1, -1, 1).expand(tasks, -1, -1)
    truth = sampler.true_function(params, grid)
    was_training = maml.training
    maml.eval()
    curves = {}
    for k in (0, *steps):
        fast = maml.adapt(xs, ys, num_steps=k)
        with torch.no_grad():
            curves[k] = maml.model(grid.to(device), params=fast).cpu()
    maml.train(was_training)
    fig, axes = plt.subplots(1, tasks, figsize=(4 * tasks, 3.2), sharey=True)
    for t, ax in enumerate(axes):
        ax.plot(grid[t, :, 0], truth[t, :, 0], "k", lw=2, label="true function")
        for k, curve in curves.items():
            label = "before adaptation" if k == 0 else f"after {k} step{'s' if k > 1 else ''}"
            ax.plot(grid[t, :, 0], curve[t, :, 0], "--" if k == 0 else "-", label=label)
        ax.plot(xs[t, :, 0].cpu(), ys[t, :, 0].cpu(), "^", color="C3", label="support points")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return out_path


def write_all(out: Path, metrics_path: Path, maml, eval_sampler, config, device) -> list[str]:
    paths = [learning_curves(metrics_path, out / "learning_curves.png")]
    if config.regression:
        paths.append(regression_fits(maml, eval_sampler, out / "fits.png", device))
    return [str(p) for p in paths]
