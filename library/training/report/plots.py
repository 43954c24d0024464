"""A run's plots, from its loss rows, as PNGs in the output folder:

    loss.png       training loss (dots), its moving average, validation loss (with the baseline before
                   the first step as a dashed line)
    lr.png         learning rate per step
    grad_norm.png  gradient norm before clipping (when measured)
    experts.png    WAN 2.2 A14B: each expert's training loss on its own timestep range
    timesteps.png  histogram of the timesteps that were trained, per expert

matplotlib (the optional `report` extra) draws them with its Agg renderer, never through pyplot, so no
window or global backend is touched. Without it only loss.png is drawn, with OpenCV. Every file is
written atomically; a plot without data is skipped (its old file removed), NaN values are left out, and a
plot that fails is logged once and skipped: plotting never fails a run.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from pathlib import Path

from ..files import atomic_write_bytes
from .fallback import draw_loss_opencv

logger = logging.getLogger(__name__)

PLOT_FILES = {"loss": "loss.png", "lr": "lr.png", "grad_norm": "grad_norm.png", "experts": "experts.png",
              "timesteps": "timesteps.png"}
INSTALL_HINT = 'pip install matplotlib (or pip install -e ".[report]")'
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
_warned: set[str] = set()


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, height), dpi=100)  # fixed margins: a third faster than a constrained layout
    fig.subplots_adjust(left=0.1, right=0.98, top=0.9, bottom=0.16 if height < 3 else 0.14)
    ax = fig.add_subplot()
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
    return fig, ax


def _save(fig, path: Path, ax=None, xlabel: str = "step", ylabel: str = "", legend: bool = True) -> bool:
    """Label and grid `ax` (when given), then write the figure as a PNG atomically."""
    if ax is not None:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if legend:
            ax.legend(loc="upper right", fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _train(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["kind"] == "train" and math.isfinite(r["loss"])]


def _loss(rows: list[dict], path: Path, experts: dict) -> bool:
    train = _train(rows)
    val = [r for r in rows if r["kind"] == "val" and math.isfinite(r["loss"])]
    if not train and not val:
        return False
    fig, ax = _figure()
    if train:
        ax.scatter([r["step"] for r in train], [r["loss"] for r in train], s=6, alpha=0.35, color=COLORS[0],
                   label="loss")
        avg = [r for r in train if math.isfinite(r["avg_loss"])]
        ax.plot([r["step"] for r in avg], [r["avg_loss"] for r in avg], color=COLORS[0], lw=2, label="moving average")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="x", color=COLORS[1], lw=1.5,
                label="validation")
        if val[0]["step"] == 0:
            ax.axhline(val[0]["loss"], color=COLORS[1], ls="--", lw=1, alpha=0.6, label="validation before training")
    return _save(fig, path, ax, ylabel="loss")


def _series(rows: list[dict], key: str, ylabel: str, path: Path, log: bool = False) -> bool:
    points = [(r["step"], r[key]) for r in rows if r["kind"] == "train" and math.isfinite(r.get(key, math.nan))]
    if not points:
        return False
    fig, ax = _figure(2.6)
    ax.plot([p[0] for p in points], [p[1] for p in points], color=COLORS[2] if key == "lr" else COLORS[3], lw=1.5)
    if log and min(p[1] for p in points) > 0:
        ax.set_yscale("log")
    return _save(fig, path, ax, ylabel=ylabel, legend=False)


def _label(name: str, experts: dict) -> str:
    if name in experts:
        lo, hi = experts[name]
        return f"{name} (t {lo:.0f}-{hi:.0f})"
    return name


def _experts(rows: list[dict], path: Path, experts: dict, ema: float = 0.9) -> bool:
    train = [r for r in _train(rows) if r.get("expert")]
    names = sorted({r["expert"] for r in train}, key=lambda n: (n != "high_noise", n))
    if len(names) < 2:
        return False
    fig, ax = _figure()
    for color, name in zip(COLORS, names):
        mine = [r for r in train if r["expert"] == name]
        ax.scatter([r["step"] for r in mine], [r["loss"] for r in mine], s=6, alpha=0.3, color=color)
        avg, smooth = None, []
        for r in mine:
            avg = r["loss"] if avg is None else ema * avg + (1 - ema) * r["loss"]
            smooth.append(avg)
        ax.plot([r["step"] for r in mine], smooth, color=color, lw=2, label=_label(name, experts))
    ax.set_title("per expert (each on its own timestep range)", fontsize=9)
    return _save(fig, path, ax, ylabel="training loss")


def _timesteps(rows: list[dict], path: Path, experts: dict) -> bool:
    by_expert: dict[str, list[float]] = {}
    for r in rows:
        if r["kind"] == "train":
            by_expert.setdefault(r.get("expert") or "dit", []).extend(
                t for t in r.get("timesteps", ()) if math.isfinite(t))
    by_expert = {k: v for k, v in by_expert.items() if v}
    if not by_expert:
        return False
    fig, ax = _figure(2.6)
    names = sorted(by_expert, key=lambda n: (n != "high_noise", n))
    ax.hist([by_expert[n] for n in names], bins=40, range=(0, 1000), stacked=True,
            color=list(COLORS[:len(names)]), label=[_label(n, experts) for n in names])
    ax.set_xlim(0, 1000)
    return _save(fig, path, ax, xlabel="timestep (0-1000)", ylabel="samples trained")


def _warn_once(kind: str, message: str, *args) -> None:
    if kind not in _warned:
        _warned.add(kind)
        logger.warning(message, *args)


def draw_plots(rows: list[dict], folder: str | Path, experts: dict | None = None) -> dict[str, Path]:
    """Draw every plot the rows allow into `folder`; returns {plot: path} of those written. Never raises."""
    folder, experts, written = Path(folder), experts or {}, {}
    if not matplotlib_available():
        _warn_once("matplotlib", "matplotlib is not installed: only loss.png is drawn (with OpenCV); %s for the "
                   "learning-rate, gradient-norm, per-expert and timestep plots", INSTALL_HINT)
        try:
            if draw_loss_opencv(rows, folder / PLOT_FILES["loss"]):
                written["loss"] = folder / PLOT_FILES["loss"]
        except Exception as exc:  # noqa: BLE001 - a plot must never stop training
            _warn_once("loss", "loss.png could not be drawn (%s); training goes on", exc)
        return written
    draws = {"loss": lambda p: _loss(rows, p, experts),
             "lr": lambda p: _series(rows, "lr", "learning rate", p),
             "grad_norm": lambda p: _series(rows, "grad_norm", "gradient norm (before clipping)", p, log=True),
             "experts": lambda p: _experts(rows, p, experts),
             "timesteps": lambda p: _timesteps(rows, p, experts)}
    for name, draw in draws.items():
        path = folder / PLOT_FILES[name]
        try:
            with warnings.catch_warnings():  # a finite loss near the float limit overflows a tick computation
                warnings.simplefilter("ignore", RuntimeWarning)
                drawn = draw(path)
            if drawn:
                written[name] = path
            elif path.exists() and name != "loss":
                path.unlink()  # no data for it (any more): no stale picture
        except Exception as exc:  # noqa: BLE001 - a plot must never stop training
            _warn_once(name, "%s could not be drawn (%s: %s); training goes on", path.name, type(exc).__name__, exc)
    return written
