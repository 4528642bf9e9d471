"""PNG plots of a ``gptfast bench`` run (matplotlib's Agg canvas, no display needed).

- ``gpt_<mode>_tokens_vs_batch.png``: tokens/s against batch size, one panel per context length;
- ``gpt_<mode>_tokens_vs_context.png``: tokens/s against context length, one panel per batch size;
- ``gpt_<mode>_memory_vs_context.png``: peak CUDA memory against context length, one panel per
  batch size (on a CPU run the figure says that memory is measured on CUDA only);
- ``kernels.png``: each kernel's throughput against its size, one panel per kernel
  (attention: per head dim), solid lines forward, dashed forward+backward.

One line per implementation in every panel, the same colour for an implementation in every
figure; x axes in powers of two (layer_norm: one slot per N x C shape); cells that ran out of
memory or failed have no point.
"""

from __future__ import annotations

import math
from pathlib import Path

from gptfast.extras import optional_import

with optional_import("matplotlib", "the PNG plots of gptfast bench"):
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, NullLocator

PANEL_WIDTH, PANEL_HEIGHT, MAX_COLUMNS = 5.0, 3.6, 3


def _panels(count: int, title: str):
    columns = min(MAX_COLUMNS, count)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(PANEL_WIDTH * columns, PANEL_HEIGHT * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[count:]:
        extra.set_visible(False)
    fig.suptitle(title)
    return fig, axes[:count]


def _log2_x(ax, values, label):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(values), [str(v) for v in sorted(values)])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(label)


def _colours(names):
    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _subtitle(meta):
    return f"{meta['device_name']}, {meta['dtype']}, {meta['run']}"


def _line_figure(rows, meta, colours, *, x_key, x_label, panel_key, panel_label, y_key, y_label,
                 title, engineering_y=True):
    panels = sorted({r[panel_key] for r in rows})
    fig, axes = _panels(len(panels), f"{title}\n{_subtitle(meta)}")
    for ax, panel in zip(axes, panels):
        in_panel = [r for r in rows if r[panel_key] == panel]
        for impl, colour in colours.items():
            points = sorted((r[x_key], r[y_key]) for r in in_panel
                            if r["impl"] == impl and r["status"] == "ok" and r.get(y_key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", color=colour, label=impl)
        _log2_x(ax, {r[x_key] for r in in_panel}, x_label)
        ax.set_ylabel(y_label)
        if engineering_y:
            ax.yaxis.set_major_formatter(EngFormatter())  # 250k, 1.2M
        ax.set_ylim(bottom=0)
        ax.set_title(f"{panel_label} = {panel}")
        ax.grid(True, alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize="small")
    return fig


def _note_figure(title, text):
    fig = Figure(figsize=(PANEL_WIDTH * 1.6, PANEL_HEIGHT), layout="constrained")
    fig.suptitle(title)
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def _gpt_figures(rows, meta, colours):
    figures = {}
    for mode in sorted({r["mode"] for r in rows}):
        of_mode = [r for r in rows if r["mode"] == mode]
        what = "training step" if mode == "train" else "inference forward"
        model = meta.get("model_name", "")
        figures[f"gpt_{mode}_tokens_vs_batch.png"] = _line_figure(
            of_mode, meta, colours, x_key="batch_size", x_label="batch size B (sequences)",
            panel_key="context_length", panel_label="context length T", y_key="tokens_per_s",
            y_label="throughput (tokens/s)", title=f"GPT {model} {what}: tokens/s vs batch size")
        figures[f"gpt_{mode}_tokens_vs_context.png"] = _line_figure(
            of_mode, meta, colours, x_key="context_length", x_label="context length T (tokens)",
            panel_key="batch_size", panel_label="batch size B", y_key="tokens_per_s",
            y_label="throughput (tokens/s)", title=f"GPT {model} {what}: tokens/s vs context length")
        name = f"gpt_{mode}_memory_vs_context.png"
        title = f"GPT {model} {what}: peak memory vs context length"
        if any(r.get("peak_mem_gb") is not None for r in of_mode):
            figures[name] = _line_figure(
                of_mode, meta, colours, x_key="context_length", x_label="context length T (tokens)",
                panel_key="batch_size", panel_label="batch size B", y_key="peak_mem_gb",
                y_label="peak memory allocated (GB)", engineering_y=False, title=title)
        else:
            figures[name] = _note_figure(
                f"{title}\n{_subtitle(meta)}",
                "Peak memory is measured on CUDA devices only (torch.cuda.max_memory_allocated);\n"
                "this run was on the CPU, so there is nothing to plot.")
    return figures


def _kernel_figure(rows, meta, colours):
    from .report import KERNEL_ORDER, kernel_column

    def panel_of(row):
        if row["kernel"] == "causal_attention":
            return f"causal_attention, head dim {row['head_dim']}"
        if row["kernel"] == "document_attention":
            window = f"window {row['window']}" if row.get("window") else "no window"
            return f"document_attention, head dim {row['head_dim']}, {window}"
        if row["kernel"] == "nanochat_attention":  # one case per panel: several share a T
            return f"nanochat_attention, {row['shape']}"
        return row["kernel"]

    x_labels = {"layer_norm": "N x C (rows x features)", "cross_entropy": "rows N (V = 50257)",
                "linear_cross_entropy": "rows N (C = 768, V = 50257)",
                "causal_attention": "context length T (B*T = 16384 tokens)",
                "document_attention": "mean document length (T: one document)",
                "nanochat_attention": "context length T"}
    # the norms' sizes are (N, C) pairs, several with the same N*C: one slot per shape
    norms = ("layer_norm", "rms_norm", "add_rms_norm")
    ln_shapes = list(dict.fromkeys(r["shape"] for r in rows if r["kernel"] in norms))
    order = {kernel: i for i, kernel in enumerate(KERNEL_ORDER)}
    in_order = sorted(rows, key=lambda r: (order.get(r["kernel"], len(order)), r.get("head_dim") or 0))
    panels = list(dict.fromkeys(panel_of(r) for r in in_order))
    fig, axes = _panels(len(panels), f"Kernels: throughput vs size\n{_subtitle(meta)}")
    for ax, panel in zip(axes, panels):
        in_panel = [r for r in rows if panel_of(r) == panel]
        kernel = in_panel[0]["kernel"]
        categorical = kernel in norms

        def x_of(row):
            return ln_shapes.index(row["shape"]) if categorical else row["size"]

        for column in dict.fromkeys(kernel_column(r) for r in in_panel):
            of_column = [r for r in in_panel if kernel_column(r) == column]
            points = sorted((x_of(r), r["throughput"]) for r in of_column if r["status"] == "ok")
            if points:
                ax.plot(*zip(*points), marker="o", color=colours.get(of_column[0]["impl"]),
                        linestyle="--" if of_column[0]["pass"] == "fwd+bwd" else "-", label=column)
        if categorical:
            ax.set_xticks(range(len(ln_shapes)), ln_shapes)
            ax.set_xlim(-0.5, len(ln_shapes) - 0.5)
            ax.set_xlabel(x_labels["layer_norm"])
        else:
            _log2_x(ax, {r["size"] for r in in_panel}, x_labels.get(kernel, "size"))
        ax.set_ylabel(in_panel[0]["unit"])
        ax.set_ylim(bottom=0)
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small")
    return fig


def write_plots(rows: list[dict], out_dir: Path, meta: dict) -> list[Path]:
    """Write every figure the rows allow; returns the paths written."""
    out_dir = Path(out_dir)
    gpt = [r for r in rows if r["suite"] == "gpt"]
    kernels = [r for r in rows if r["suite"] == "kernels"]
    order = list(meta.get("impl_order", ()))
    impls = order + sorted({r["impl"] for r in gpt + kernels} - set(order))
    colours = _colours(impls)
    figures = _gpt_figures(gpt, meta, colours) if gpt else {}
    if kernels:
        figures["kernels.png"] = _kernel_figure(kernels, meta, colours)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=110)
        paths.append(out_dir / name)
    return paths
