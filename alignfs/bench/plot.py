"""Drawing the benchmark picture (PNG or SVG) with matplotlib.

matplotlib is an optional extra (``pip install alignfs[plot]``) and heavy to
import, so it is imported inside :func:`draw` only: nothing on the mount or
write path, and no other ``alignfs bench`` command, loads it. What the
picture shows is decided in :mod:`alignfs.bench.figure`; this module only lays
it out. Output paths are checked before a benchmark starts (:func:`check_output`),
so a typo does not cost a run of several minutes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .figure import EVENT_LABELS, FigureData, Timeline

if TYPE_CHECKING:
    from matplotlib.axes import Axes

log = logging.getLogger(__name__)

#: File name extension -> matplotlib format.
FORMATS = {".png": "png", ".svg": "svg"}

DIRECT_COLOR = "#9e9e9e"
ALIGNFS_COLOR = "#1f6fb4"
BACKING_COLOR = "#e07b00"
LIMIT_COLOR = "#c62828"


class PlotError(Exception):
    """The picture cannot be written (bad extension, path, or no matplotlib)."""


def plot_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise PlotError(
            f"cannot tell the picture's format from {str(path)!r}: name it .png or .svg"
        ) from None


def check_output(path: Path) -> None:
    """Raise :class:`PlotError` unless a picture can be written at *path*."""
    plot_format(path)
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotError(
            "matplotlib is not installed: install alignfs with the plot extra "
            "(pip install 'alignfs[plot]', or scripts/setup.sh)"
        )
    if path.is_dir():
        raise PlotError(f"cannot write the picture to {path}: it is a directory")
    directory = path.parent
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".plot-check-"):
            pass
    except OSError as exc:
        raise PlotError(
            f"cannot write the picture to {path}: {exc.strerror or exc} ({directory})"
        ) from exc


def draw(data: FigureData, path: Path) -> None:
    """Write the picture to *path* (format by extension), atomically."""
    fmt = plot_format(path)
    import matplotlib
    from matplotlib.figure import Figure

    n = len(data.pairs)
    height = max(5.0, 1.6 + 0.62 * n)
    fig = Figure(figsize=(15, height), layout="constrained")
    bars_ax, time_ax = fig.subplots(1, 2, width_ratios=[1.15, 1])
    fig.suptitle(f"{data.title}\n{data.subtitle}", fontsize=11)
    _draw_pairs(bars_ax, data)
    if data.timeline is not None:
        _draw_timeline(time_ax, data.timeline)
    else:
        time_ax.set_axis_off()
        time_ax.text(0.5, 0.5, data.no_timeline, ha="center", va="center", wrap=True,
                     transform=time_ax.transAxes)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with tmp, matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "alignfs"}):
            metadata = {"Date": None} if fmt == "svg" else None
            fig.savefig(tmp, format=fmt, dpi=80, metadata=metadata)
        os.chmod(tmp.name, 0o644)
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise
    log.info("wrote %s", path)


def _draw_pairs(ax: Axes, data: FigureData) -> None:
    from matplotlib.patches import Patch

    pairs = data.pairs
    values = [v for p in pairs for v in (p.direct_mbps, p.alignfs_mbps) if v is not None]
    top = max(values + data.limits + [1.0])
    width = 0.38
    for i, p in enumerate(pairs):
        for offset, value, text, color in (
            (-width / 2, p.direct_mbps, p.direct_text, DIRECT_COLOR),
            (width / 2, p.alignfs_mbps, p.alignfs_text, ALIGNFS_COLOR),
        ):
            if not text:
                continue
            ax.barh(i + offset, value or 0.0, height=width, color=color)
            ax.text((value or 0.0) + top * 0.01, i + offset, text, va="center", fontsize=8)
        if p.speedup_text:
            ax.text(0.995, i, p.speedup_text, transform=ax.get_yaxis_transform(),
                    ha="right", va="center", fontsize=12, fontweight="bold",
                    color=ALIGNFS_COLOR)
    for limit in data.limits:
        ax.axvline(limit, color=LIMIT_COLOR, linestyle="--", linewidth=1.2)
        ax.text(limit, -0.75, f" HDD model limit {limit:.0f} MB/s", color=LIMIT_COLOR,
                fontsize=8, va="bottom")
    ax.set_yticks(range(len(pairs)), [p.label for p in pairs], fontsize=9)
    ax.set_ylim(len(pairs) - 0.5, -0.9)
    ax.set_xlim(0, top * 1.55)
    ax.set_xlabel(data.bar_axis_label + "; bold: speedup of alignfs")
    ax.legend(
        handles=[Patch(color=DIRECT_COLOR, label="direct: the client writes to the disk itself"),
                 Patch(color=ALIGNFS_COLOR, label="through alignfs")],
        loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)


def _draw_timeline(ax: Axes, tl: Timeline) -> None:
    ax.step(tl.seconds, tl.client_mb, where="post", color=ALIGNFS_COLOR, linewidth=1.8,
            label="written by the client into alignfs")
    ax.step(tl.seconds, tl.backing_mb, where="post", color=BACKING_COLOR, linewidth=1.8,
            label="reached BACKING (large O_DIRECT writes)")
    ax.fill_between(tl.seconds, 0, tl.dirty_mb, step="post", color=ALIGNFS_COLOR, alpha=0.25,
                    label="buffered in alignfs at that moment (dirty)")
    end = max(tl.seconds + list(tl.events.values()) + [0.1])
    top = max(tl.client_mb + tl.backing_mb + [1.0])
    if tl.limit_mbps:
        ax.plot([0, end], [0, tl.limit_mbps * end], color=LIMIT_COLOR, linestyle="--",
                linewidth=1, label=f"HDD model limit ({tl.limit_mbps:.0f} MB/s from t=0)")
    for key, when in sorted(tl.events.items(), key=lambda kv: kv[1]):
        ax.axvline(when, color="black", linewidth=0.8, linestyle=":")
        ax.text(when, top * 1.02, f" {EVENT_LABELS.get(key, key)} {when:.1f} s", rotation=90,
                va="top", ha="right", fontsize=8)
    ax.set_xlim(0, end * 1.02)
    ax.set_ylim(0, top * 1.08)
    ax.set_xlabel("seconds since the client started")
    ax.set_ylabel("MB (cumulative)")
    ax.set_title(f"{tl.title}\n{tl.summary}" if tl.summary else tl.title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
