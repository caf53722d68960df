"""What a run prints and draws: the table printed row by row as results arrive, the pivot summaries, the plot of
time / base time."""
from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Column:
    key: str
    header: str
    width: int
    fmt: str = ""  # format spec for numbers, e.g. ".3f"; '' -> str()

    def render(self, value) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            text = "-"
        elif self.fmt and isinstance(value, (int, float)):
            text = format(value, self.fmt)
        else:
            text = str(value)
        return text.rjust(self.width)


class TablePrinter:
    """Fixed-width table printed row by row as results arrive (long runs show progress)."""

    def __init__(self, columns: Sequence[Column], stream=None):
        self.columns = list(columns)
        self.stream = stream or sys.stdout

    def header(self) -> None:
        line = " ".join(c.header.rjust(c.width) for c in self.columns)
        print(line, file=self.stream)
        print("-" * len(line), file=self.stream, flush=True)

    def row(self, values: dict) -> None:
        print(" ".join(c.render(values.get(c.key)) for c in self.columns), file=self.stream, flush=True)


def print_pivot(rows: Sequence[dict], *, row_keys: Sequence[str], col_key: str, value_key: str, title: str,
                fmt: str = ".2f", stream=None) -> None:
    """A compact summary: one line per distinct `row_keys` values, one column per `col_key` value."""
    stream = stream or sys.stdout
    cols = sorted({r[col_key] for r in rows})
    lines: dict[tuple, dict] = {}
    for r in rows:
        lines.setdefault(tuple(r[k] for k in row_keys), {})[r[col_key]] = r.get(value_key)
    label_w = max([len(" ".join(map(str, k))) for k in lines] + [len(" ".join(row_keys))])
    cell = Column("", "", max(7, *(len(str(c)) for c in cols)) if cols else 7, fmt)
    print(title, file=stream)
    print(" ".join(row_keys).ljust(label_w) + " " + " ".join(str(c).rjust(cell.width) for c in cols), file=stream)
    for k, values in lines.items():
        print(" ".join(map(str, k)).ljust(label_w) + " " + " ".join(cell.render(values.get(c)) for c in cols),
              file=stream)
    stream.flush()


def plot_ratio_to_base(rows: Sequence[dict], path: Path, *, title: str, panel_key: str = "shape", x_key: str = "M",
                       series_key: str = "impl", style_key: str | None = None, mode_key: str = "mode",
                       base: str = "base") -> Path | None:
    """Grid of panels (one row per mode, one column per `panel_key` value): ms / ms(base) against `x_key` (log x),
    one line per `series_key` value (colour) and `style_key` value (line style). Returns None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot skipped: matplotlib is not available ({exc})", flush=True)
        return None
    rows = [r for r in rows if r.get("vs_base") is not None and r[series_key] != base]
    if not rows:
        print("plot skipped: no rows with a ratio to the base op", flush=True)
        return None
    modes = list(dict.fromkeys(r[mode_key] for r in rows))
    panels = list(dict.fromkeys(r[panel_key] for r in rows))
    series = list(dict.fromkeys(r[series_key] for r in rows))
    styles = list(dict.fromkeys(r[style_key] for r in rows)) if style_key else [None]
    colors = {s: f"C{i}" for i, s in enumerate(series)}
    linestyles = dict(zip(styles, itertools.cycle(["-", "--", ":", "-."])))
    markers = dict(zip(styles, itertools.cycle(["o", "s", "^", "D"])))
    fig, axes = plt.subplots(len(modes), len(panels), figsize=(4.6 * len(panels) + 0.4, 3.6 * len(modes)),
                             squeeze=False, sharex=True)
    for i, mode in enumerate(modes):
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.axhline(1.0, color="0.4", lw=1, ls="--")
            for s, st in itertools.product(series, styles):
                pts = sorted((r[x_key], r["vs_base"]) for r in rows if r[mode_key] == mode and r[panel_key] == panel
                             and r[series_key] == s and (st is None or r[style_key] == st))
                if pts:
                    label = s if st is None else f"{s} {style_key}={st}"
                    ax.plot(*zip(*pts), color=colors[s], ls=linestyles[st], marker=markers[st], ms=3.5, lw=1.3,
                            label=label)
            ax.set_xscale("log", base=2)
            xs = sorted({r[x_key] for r in rows})
            ax.set_xticks(xs)
            ax.set_xticklabels([str(v) for v in xs], rotation=45 if len(xs) > 5 else 0, fontsize=8)
            ax.minorticks_off()
            ymax = max((r["vs_base"] for r in rows if r[mode_key] == mode), default=1.0)
            if ymax > 6:
                ax.set_yscale("log")
            ax.set_title(f"{panel_key} {panel} - {mode}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("time / base time")
            if i == len(modes) - 1:
                ax.set_xlabel(x_key)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # every series, even those missing from the first panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    handles.append(plt.Line2D([], [], color="0.4", lw=1, ls="--"))
    labels.append(f"{base} (= 1)")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    legend_rows = math.ceil(len(labels) / min(len(labels), 7))
    fig.tight_layout(rect=(0, 0.03 + 0.035 * legend_rows, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
