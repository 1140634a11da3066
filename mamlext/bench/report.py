"""Tables, CSV, chart and header lines: the output of both benchmarks.

Generic helpers (``markdown_table``, ``write_table_csv``, ``markdown_page``,
``machine_info``, ``package_line``) serve the peer benchmark and the op benchmark
(:mod:`mamlext.bench.op`); the rest renders the peer benchmark's rows.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

import mamlext
from mamlext.bench.peers import NOTES

Columns = dict[str, tuple[str, str]]  # row key: (header, format of a value)
EXACT_F32 = 1e-4  # float32 relative error below which a meta-gradient counts as exact


# ---- shared by both benchmarks -----------------------------------------------------------


def markdown_table(
    rows: list[dict], columns: Columns, bold: Callable[[dict, str], bool] | None = None
) -> str:
    """The rows as a Markdown table, one column per key some row has a value for.

    Args:
        rows: one dict per table row; a missing or ``None`` value is an empty cell.
        columns: ``{key: (header, format)}`` in column order, e.g. ``"{:.1f}"``.
        bold: ``bold(row, key)``: whether that cell is bold.
    """
    keys = [k for k in columns if any(r.get(k) is not None for r in rows)]
    lines = [
        "| " + " | ".join(columns[k][0] for k in keys) + " |",
        "|" + "|".join("---" for _ in keys) + "|",
    ]
    for r in rows:
        cells = []
        for k in keys:
            value = r.get(k)
            cell = "" if value in (None, "") else columns[k][1].format(value)
            cells.append(f"**{cell}**" if bold and bold(r, k) else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table_csv(rows: list[dict], path: Path, fields: list[str]) -> None:
    """One CSV line per row with the ``fields`` columns, the numbers unformatted."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown_page(info: str, table: str, title: str | None = None) -> str:
    """A Markdown file's text: the title, the info lines (hard line breaks), the table."""
    head = f"# {title}\n\n" if title else ""
    return head + info.replace("\n", "  \n") + "\n\n" + table + "\n"


def machine_info(device: str) -> str:
    """CPU, torch, threads, GPU and the kernel serving ``fused_sgd`` on ``device``."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = models[0] if models else cpu
    lines = [
        f"CPU: {cpu} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    ]
    device_type = torch.device(device).type
    if device_type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    status = mamlext.backend_info()[device_type]
    lines.append(f"fused_sgd on {device_type}: {status.kernel} kernel ({status.reason})")
    return "\n".join(lines)


def package_line(import_root: Path) -> str:
    """``mamlext <version>``, plus ``(commit <hash>)`` if ``import_root``, the folder the
    package was imported from, is a git checkout (not an installed wheel)."""
    line = f"mamlext {mamlext.__version__}"
    commit = _git_commit(import_root) if (import_root / ".git").exists() else None
    return f"{line} (commit {commit})" if commit else line


def _git_commit(checkout: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=checkout,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):  # no git here
        return None
    return done.stdout.strip() or None


def dist_version(dist: str) -> str:
    """The installed version of the distribution ``dist``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---- the peer benchmark's rows -----------------------------------------------------------


def exact(row: dict) -> bool:
    """Whether the row's float32 meta-gradient was checked and agrees with higher's."""
    return row.get("err_f32") is not None and row["err_f32"] < EXACT_F32


def add_speedups(rows: list[dict]) -> list[dict]:
    """``speedup`` = higher's median / the peer's; ``best``: the fastest exact peer."""
    higher = {r["config"]: r.get("median_ms") for r in rows if r["peer"] == "higher"}
    for r in rows:
        base, ms = higher.get(r["config"]), r.get("median_ms")
        r["speedup"] = base / ms if base and ms else None
        r["best"] = False
    for config in {r["config"] for r in rows}:
        timed = [r for r in rows if r["config"] == config and r["speedup"] and exact(r)]
        if timed:
            max(timed, key=lambda r: r["speedup"])["best"] = True
    return rows


COLUMNS: Columns = {
    "config": ("config", "{}"),
    "peer": ("peer", "{}"),
    "path": ("path", "{}"),
    "median_ms": ("median ms", "{:.1f}"),
    "speedup": ("speed-up vs higher", "{:.2f}x"),
    "peak_mb": ("peak MB", "{:.0f}"),
    "err_f32": ("rel. err. f32", "{:.1e}"),
    "err_f64": ("rel. err. f64", "{:.1e}"),
    "note": ("note", "{}"),  # errors and the peer's known flaw
}
CSV_FIELDS = [*COLUMNS, "best", "status"]


def _with_note(row: dict) -> dict:
    return {**row, "note": "; ".join(filter(None, [row.get("error"), NOTES.get(row["peer"])]))}


def markdown(rows: list[dict]) -> str:
    """The peer rows as a Markdown table; the best speed-up of an exact peer in bold."""
    return markdown_table(
        [_with_note(r) for r in rows],
        COLUMNS,
        bold=lambda row, key: key == "speedup" and row["best"],
    )


def write_csv(rows: list[dict], path: Path) -> None:
    """One line per peer row, the numbers unformatted; ``note`` holds errors and flags."""
    write_table_csv([_with_note(r) for r in rows], path, CSV_FIELDS)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Grouped bars: speed-up vs higher per config (groups) and peer (bars); hatched: a
    peer whose meta-gradient is not exact somewhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    peers = [
        p
        for p in dict.fromkeys(r["peer"] for r in rows)
        if any(r["peer"] == p and r["speedup"] for r in rows)
    ]
    width = 0.8 / max(len(peers), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs) + 2), 4))
    for i, peer in enumerate(peers):
        values = {r["config"]: r["speedup"] for r in rows if r["peer"] == peer}
        xs = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(configs))]
        wrong = any(r["peer"] == peer and r["speedup"] and not exact(r) for r in rows)
        label = f"{peer} (meta-gradient not exact)" if wrong else peer
        ax.bar(
            xs,
            [values.get(c) or 0 for c in configs],
            width,
            label=label,
            hatch="//" if wrong else None,
        )
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_ylabel("speed-up vs higher (higher = 1)")
    ax.set_title(title)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
