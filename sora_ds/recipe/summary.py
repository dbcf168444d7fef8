"""What a run leaves behind for people: the kept-rank heatmap, the summary numbers, the end-of-run table."""

from __future__ import annotations

import re
from pathlib import Path

_LAYER = re.compile(r"\.(\d+)\.")


def _layer_and_kind(name: str) -> tuple[str, str]:
    m = _LAYER.search(name)
    layer = m.group(1) if m else "-"
    return layer, name.rsplit(".", 1)[-1] if m else name


def adapter_params(report: dict[str, dict[str, int]], shapes: dict[str, tuple[int, int]], which: str = "kept") -> int:
    """Adapter parameters at the ``"kept"`` or ``"initial"`` ranks: ``rank * (in + out + 1)`` per module (A, B, gate)."""
    return sum(r[which] * (shapes[n][0] + shapes[n][1] + 1) for n, r in report.items())


def retained_fraction(report: dict[str, dict[str, int]], shapes: dict[str, tuple[int, int]]) -> float:
    """Kept / initial adapter parameters (see :func:`adapter_params`)."""
    initial = adapter_params(report, shapes, "initial")
    return adapter_params(report, shapes) / initial if initial else 0.0


def rank_table(report: dict[str, dict[str, int]]) -> str:
    """A readable layers x module-kinds table of ``kept/initial`` ranks."""
    layers, kinds, cells = [], [], {}
    for name, r in report.items():
        layer, kind = _layer_and_kind(name)
        layers += [layer] if layer not in layers else []
        kinds += [kind] if kind not in kinds else []
        cells[layer, kind] = f"{r['kept']}/{r['initial']}"
    width = max([len(k) for k in kinds] + [5])
    lines = ["layer".ljust(6) + "".join(k.rjust(width + 1) for k in kinds)]
    for layer in layers:
        lines.append(layer.ljust(6) + "".join(cells.get((layer, k), "").rjust(width + 1) for k in kinds))
    kept = sum(r["kept"] for r in report.values())
    initial = sum(r["initial"] for r in report.values())
    lines.append(f"total kept ranks: {kept}/{initial}")
    return "\n".join(lines)


def serving_lines(serving: dict) -> str:
    """The ``serving`` block of summary.json for people: sizes and FLOPs per token at the kept, vLLM-padded and
    unpruned ranks, and the engines each written adapter loads in."""
    size, flops = serving["adapter_bytes"], serving["flops_per_token"]

    def row(what: str, values: dict) -> str:
        return f"{what:22s}" + "".join(f"{'-' if values[k] is None else values[k]:>14,}" for k in ("kept", "padded",
                                                                                                      "unpruned"))

    lines = [f"serving: max kept rank {serving['max_kept_rank']}, vLLM max_lora_rank {serving['vllm_max_lora_rank']}",
             f"{'':22s}{'kept ranks':>14s}{'vLLM padded':>14s}{'unpruned':>14s}",
             row("adapter bytes", size), row("adapter FLOPs/token", flops)]
    for folder, record in serving.get("formats", {}).items():
        if "error" in record:
            lines.append(f"{folder}/: not written: {record['error']}")
            continue
        lines.append(f"{folder}/ ({record['format']}, r={record['r']}):")
        lines += [f"  {engine:7s} {verdict}" for engine, verdict in record["engines"].items()]
    return "\n".join(lines)


def plot_rank_heatmap(report: dict[str, dict[str, int]], path: str | Path) -> None:
    """Layers (rows) x module kinds (columns), colour and label = kept rank; the colour scale runs from 0 to the
    initial rank (not the largest kept one), so two runs of the same r compare by colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, kinds = [], []
    for name in report:
        layer, kind = _layer_and_kind(name)
        layers += [layer] if layer not in layers else []
        kinds += [kind] if kind not in kinds else []
    grid = np.full((len(layers), len(kinds)), np.nan)
    for name, r in report.items():
        layer, kind = _layer_and_kind(name)
        grid[layers.index(layer), kinds.index(kind)] = r["kept"]
    r_max = max(r["initial"] for r in report.values())
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.35 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=r_max, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, int(v), ha="center", va="center", color="white" if v < r_max / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="kept rank")
    ax.set_title(f"kept ranks per module (colour: 0 to the initial rank {r_max:g})")  # same scale in every run
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
