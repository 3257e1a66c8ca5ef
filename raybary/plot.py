r"""Figures from stored results: the OTT-JAX tutorial's picture, for any problem.

For one problem, :func:`plot_problem` draws contours of the negative
log-density :math:`-\log p` of each input GMM (one colour map per GMM) and of
the barycenter (red, thicker), with the tutorial's log-scaled levels
``np.logspace(0, 1, 10)`` and ``LogNorm(vmin=1, vmax=10)``, a title, axis labels,
a legend and a label at each GMM's mode. :func:`plot_gallery` puts several
problems in one figure.

Where the log-densities come from (:func:`problem_grids`):

1. the grids the run stored (``grids.zarr``: the barycenter's, and the inputs'
   if the run stored ``input_gmms`` of them), on the run's extents;
2. otherwise they are computed here with :func:`raybary.log_density_grid` from
   the stored barycenter (``barycenters/``) and the input store recorded in the
   results' layout (``input_url``; pass ``input_url=`` if it moved).

Problems in ``d > 2`` show the 2-D marginal on the run's ``grid_dims``;
``d = 1`` problems are drawn as curves of :math:`-\log p` (linear axis: in 1-D
it is often below 1). Problems that are
``invalid`` or ``failed`` show their inputs (if readable) and the error.

matplotlib comes with the ``plot`` extra (``pip install 'raybary[plot]'``).
Only the Agg canvas is used (no pyplot, no display), so this works headless
and in threads.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raybary.errors import RaybaryError

__all__ = [
    "PlotError",
    "ProblemGrids",
    "problem_grids",
    "plot_problem",
    "plot_gallery",
    "save_figure",
    "LEVELS",
]

#: Contour levels of -log p, as in the tutorial.
LEVELS = np.logspace(0, 1, 10)
INPUT_CMAPS = ("Blues_r", "Greens_r", "Purples_r", "Oranges_r", "Greys_r", "YlOrBr_r",
               "BuGn_r", "PuRd_r")
BARYCENTER_CMAP = "Reds_r"
DEFAULT_SHAPE = (100, 100)


class PlotError(RaybaryError, ValueError):
    """A figure cannot be drawn (unknown problem, unreadable input store, no matplotlib)."""


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise PlotError(
            "plots need matplotlib: pip install 'raybary[plot]' (or pip install matplotlib)"
        ) from None
    return matplotlib


@dataclass
class ProblemGrids:
    """What one panel shows.

    Attributes:
      problem_id, status, error: from ``problems/``.
      dim: the problems' dimension (``None`` if the inputs were unreadable).
      dims: the two coordinates shown (``d > 2``).
      extent: ``(xmin, xmax, ymin, ymax)`` (2-D), or ``(xmin, xmax, nan, nan)`` (1-D).
      inputs: ``[J, H, W]`` log-densities of the input GMMs (``[J, W]`` in 1-D).
      barycenter: ``[H, W]`` (or ``[W]``) log-density, or ``None`` (no result).
      lambdas: the barycentric weights, or ``None`` if unknown.
      objective: the stored objective (``nan`` if none).
      n_components: the barycenter's components (0 if none).
      source: ``"stored"``, ``"computed"`` or ``"mixed"`` (some grids stored, the
        others computed on the stored extent).
    """

    problem_id: int
    status: str
    error: str | None
    dim: int | None
    dims: tuple[int, int]
    extent: np.ndarray
    inputs: np.ndarray
    barycenter: np.ndarray | None
    lambdas: np.ndarray | None
    objective: float
    n_components: int
    source: str


# ------------------------------------------------------------------ data
def _results(results) -> Any:
    from raybary.storage.results import Results, read_results

    if isinstance(results, Results):
        return results
    try:
        return read_results(str(results))
    except FileNotFoundError as e:
        raise PlotError(str(e)) from None


def _problem_row(res, problem_id: int):
    p = res.problems
    rows = p[p["problem_id"] == int(problem_id)] if len(p) else p
    if not len(rows):
        ids = p["problem_id"].to_numpy() if len(p) else np.array([], dtype=np.int64)
        known = (f"ids {ids.min()}..{ids.max()} ({len(ids)} problems)" if len(ids)
                 else "no committed problems")
        raise PlotError(f"problem {problem_id} is not in {res.url} ({known})")
    return rows.iloc[0]


def _barycenter_gmm(res, problem_id: int):
    from raybary.types import GMM

    b = res.barycenters
    rows = b[b["problem_id"] == int(problem_id)].sort_values("component") if len(b) else b
    if not len(rows):
        return None
    means = np.stack([np.asarray(m, dtype=np.float64) for m in rows["mean"]])
    d = means.shape[1]
    covs = np.stack([np.asarray(c, dtype=np.float64).reshape(d, d) for c in rows["cov"]])
    return GMM(rows["weight"].to_numpy(np.float64), means, covs)


def _input_problem(res, position: int, input_url: str | None):
    """The validated input problem at ``position``, its message, or raise PlotError."""
    from raybary.storage.store import open_store

    url = input_url or res.layout.get("input_url")
    if not url:
        raise PlotError(f"{res.url} does not record its input store; pass input_url / --input")
    try:
        store = open_store(url)
        shard = store.read(position, position + 1)
    except (OSError, ValueError, IndexError) as e:
        raise PlotError(f"cannot read the input store {url} ({e}); pass input_url / --input "
                        "if it moved") from None
    return shard.problems[0], shard.errors[0]


def _stored_grids(res, position: int):
    if res.layout.get("grid_shape") is None:
        return None
    if int(position) // int(res.layout["shard_size"]) not in res.committed_shards:
        return None
    try:
        g = res.grids(position, position + 1, inputs=True)
    except (OSError, KeyError, ValueError):
        return None
    bary = g.barycenter[0]
    inputs = None
    if g.inputs is not None:
        rows = [x for x in g.inputs[0] if np.isfinite(x).any()]
        inputs = np.stack(rows) if rows else None
    extent = g.extent[0]
    if not np.isfinite(extent).all():
        return None
    return extent, (bary if np.isfinite(bary).any() else None), inputs


def _options(res) -> dict:
    return (res.layout.get("options") or {}) if isinstance(res.layout, dict) else {}


def problem_grids(
    results,
    problem_id: int,
    *,
    shape: tuple[int, int] | None = None,
    bounds: Sequence[float] | None = None,
    input_url: str | None = None,
    source: str = "auto",
) -> ProblemGrids:
    """Log-density grids of one problem's inputs and barycenter (see the module docstring).

    Args:
      results: an output directory (path / URL) or a :class:`~raybary.storage.results.Results`.
      problem_id: the problem.
      shape: ``(H, W)`` when computing (default: the run's grid shape, else 100x100).
      bounds: ``(xmin, xmax, ymin, ymax)`` when computing (default: the run's
        extent for this problem if stored, else from all components).
      input_url: the input store, if not where the layout says.
      source: ``"auto"`` (stored grids where there are, computed otherwise),
        ``"stored"`` (fail if the run stored none) or ``"computed"``.
    """
    if source not in ("auto", "stored", "computed"):
        raise ValueError("source must be 'auto', 'stored' or 'computed'")
    res = _results(results)
    row = _problem_row(res, problem_id)
    pid, position = int(row["problem_id"]), int(row["position"])
    status = str(row["status"])
    error = None if row["error"] is None or row["error"] != row["error"] else str(row["error"])
    objective = float(row["objective"]) if row["objective"] == row["objective"] and \
        row["objective"] is not None else float("nan")
    opts = _options(res)
    dims = tuple(int(x) for x in (opts.get("grid_dims") or (0, 1)))
    bary_gmm = _barycenter_gmm(res, pid) if status == "ok" else None
    n_comp = 0 if bary_gmm is None else bary_gmm.n_components

    stored = None if source == "computed" or bounds is not None else _stored_grids(res, position)
    if source == "stored" and stored is None:
        raise PlotError(f"{res.url} has no stored grids for problem {pid}")

    problem, problem_error, read_error = None, None, None
    need_inputs = stored is None or stored[2] is None
    try:
        problem, problem_error = _input_problem(res, position, input_url)
    except PlotError as e:
        read_error = e
    if need_inputs and read_error is not None:
        if stored is None:
            raise read_error
        warnings.warn(f"{read_error}; drawing the stored barycenter grid only", stacklevel=2)
    lambdas = None if problem is None else problem.lambdas
    dim = problem.dim if problem is not None else (bary_gmm.dim if bary_gmm is not None else None)
    if error is None and problem_error is not None:
        error = problem_error

    if stored is not None and (stored[2] is not None or problem is None):
        extent, bary, inputs = stored
        hw = _stored_shape(res, stored)
        if bary is None and bary_gmm is not None:  # no stored row: compute on the run's extent
            from raybary.density import log_density_grid

            bary, _ = log_density_grid(bary_gmm, hw, extent, dims=_dims2(dims, dim))
        src = "stored"
        if inputs is None:
            inputs = np.empty((0, *hw))
        if problem is not None and len(inputs) < problem.n_gmms:  # the run stored fewer GMMs
            from raybary.density import log_density_grid

            more = [log_density_grid(g, hw, extent, dims=_dims2(dims, dim))[0]
                    for g in problem.gmms[len(inputs):]]
            inputs, src = np.concatenate([inputs, np.stack(more)]), "mixed"
        return ProblemGrids(pid, status, error, dim, dims, np.asarray(extent, np.float64),
                            inputs, bary, lambdas, objective, n_comp, src)

    gmms = [] if problem is None else list(problem.gmms)
    if dim is None:
        raise PlotError(f"problem {pid}: nothing to plot ({error or 'no inputs, no barycenter'})")
    if dim == 1:
        return _grids_1d(pid, status, error, gmms, bary_gmm, lambdas, objective, shape, bounds)

    from raybary.density import default_bounds, log_density_grid, marginal_components

    d2 = _dims2(dims, dim)
    if stored is not None:  # barycenter stored, inputs computed on the same extent
        extent, bary = stored[0], stored[1]
        hw = _stored_shape(res, stored)
        src = "mixed"
    else:
        grid_shape = res.layout.get("grid_shape")
        hw = tuple(shape or grid_shape or DEFAULT_SHAPE)
        if bounds is not None:
            extent = np.asarray(bounds, np.float64)
        else:
            comps = [(g.means, g.covs) for g in gmms]
            if bary_gmm is not None:
                comps.append((bary_gmm.means, bary_gmm.covs))
            m, c = marginal_components(np.concatenate([c[0] for c in comps]),
                                       np.concatenate([c[1] for c in comps]), d2)
            extent = _widen(default_bounds(m, c), 0.08)
        bary = None
        src = "computed"
    hw = (int(hw[0]), int(hw[1]))
    if bary is None and bary_gmm is not None:
        bary, _ = log_density_grid(bary_gmm, hw, extent, dims=d2)
    inputs = np.stack([log_density_grid(g, hw, extent, dims=d2)[0] for g in gmms]) if gmms \
        else np.empty((0, *hw))
    return ProblemGrids(pid, status, error, dim, dims, np.asarray(extent, np.float64), inputs,
                        bary, lambdas, objective, n_comp, src)


def _widen(bounds: np.ndarray, frac: float) -> np.ndarray:
    """Bounds grown by ``frac`` of their size on each side (room for the outer contours)."""
    b = np.asarray(bounds, np.float64).copy()
    dx, dy = (b[1] - b[0]) * frac, (b[3] - b[2]) * frac
    return b + np.array([-dx, dx, -dy, dy])


def _stored_shape(res, stored) -> tuple[int, int]:
    shape = res.layout.get("grid_shape") or DEFAULT_SHAPE
    return int(shape[0]), int(shape[1])


def _dims2(dims: tuple[int, int], dim: int | None) -> tuple[int, int]:
    if dim is not None and dim == 2:
        return (0, 1)
    return dims


def _grids_1d(pid, status, error, gmms, bary_gmm, lambdas, objective, shape, bounds):
    from raybary.density import log_density

    w = int((shape or DEFAULT_SHAPE)[-1]) * 4
    if bounds is not None:
        lo, hi = float(bounds[0]), float(bounds[1])
    else:
        comps = [(g.means[:, 0], np.sqrt(g.covs[:, 0, 0])) for g in gmms]
        if bary_gmm is not None:
            comps.append((bary_gmm.means[:, 0], np.sqrt(bary_gmm.covs[:, 0, 0])))
        m = np.concatenate([c[0] for c in comps])
        s = np.concatenate([c[1] for c in comps])
        lo, hi = float((m - 3 * s).min()), float((m + 3 * s).max())
    xs = np.linspace(lo, hi, w)[:, None]
    inputs = np.stack([log_density(g, xs) for g in gmms]) if gmms else np.empty((0, w))
    bary = None if bary_gmm is None else log_density(bary_gmm, xs)
    return ProblemGrids(pid, status, error, 1, (0, 0), np.array([lo, hi, np.nan, np.nan]),
                        inputs, bary, lambdas, objective,
                        0 if bary_gmm is None else bary_gmm.n_components, "computed")


# ------------------------------------------------------------------ drawing
def _new_figure(figsize):
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _cmap(name: str):
    """The darker 80% of a colour map, so that even the outer contour (-log p = 10) shows."""
    import matplotlib as mpl
    from matplotlib.colors import ListedColormap

    return ListedColormap(mpl.colormaps[name](np.linspace(0.0, 0.8, 256)), name=name + "_dark")


def _mode_label_position(x, y, neg_log):
    r, c = np.unravel_index(np.nanargmin(neg_log), neg_log.shape)
    return x[c], y[r]


def draw_problem(ax, g: ProblemGrids, *, fontsize: float = 12, title: str | None = None,
                 annotate: bool = True, legend: bool | str = True) -> dict:
    """Draw one problem's panel on a matplotlib ``ax``; return the contour sets by name."""
    import matplotlib as mpl
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    norm = LogNorm(vmin=1.0, vmax=10.0)
    j = len(g.inputs)
    handles, artists = [], {}
    names = [f"GMM {i + 1}" + ("" if g.lambdas is None or i >= len(g.lambdas)
                               else f" (λ={g.lambdas[i]:.2f})") for i in range(j)]
    if g.dim == 1:
        xs = np.linspace(g.extent[0], g.extent[1], g.inputs.shape[-1] if j else
                         (g.barycenter.shape[-1] if g.barycenter is not None else 2))
        for i in range(j):
            color = mpl.colormaps[INPUT_CMAPS[i % len(INPUT_CMAPS)]](0.3)
            (line,) = ax.plot(xs, -g.inputs[i], color=color, lw=1.5, label=names[i])
            artists[names[i]] = line
        if g.barycenter is not None:
            (line,) = ax.plot(xs, -g.barycenter, color=mpl.colormaps[BARYCENTER_CMAP](0.25),
                              lw=2.5, label=f"Barycenter (n={g.n_components})")
            artists["Barycenter"] = line
        curves = [-c for c in [*g.inputs, g.barycenter] if c is not None and np.isfinite(c).any()]
        if curves:  # -log p can be below 1 (or negative) in 1-D: a linear axis, zoomed on the modes
            low = float(min(np.nanmin(c) for c in curves))
            ax.set_ylim(low - 0.5, low + 12.0)
        ax.set_xlabel("$x_1$", fontsize=fontsize)
        ax.set_ylabel(r"$-\log p(x)$", fontsize=fontsize)
        if legend:
            ax.legend(fontsize=fontsize * 0.75, loc="upper right")
    else:
        h, w = (g.inputs.shape[-2:] if j else g.barycenter.shape) if (j or g.barycenter is not None) \
            else (2, 2)
        xs = np.linspace(g.extent[0], g.extent[1], w)
        ys = np.linspace(g.extent[2], g.extent[3], h)
        x, y = np.meshgrid(xs, ys)
        for i in range(j):
            cmap = INPUT_CMAPS[i % len(INPUT_CMAPS)]
            neg = -g.inputs[i]
            artists[names[i]] = ax.contour(x, y, neg, levels=LEVELS, norm=norm,
                                           cmap=_cmap(cmap), linewidths=1.0)
            handles.append(Line2D([], [], color=mpl.colormaps[cmap](0.3), lw=1.5, label=names[i]))
            if annotate and np.isfinite(neg).any():
                ax.annotate(f"GMM {i + 1}", _mode_label_position(xs, ys, neg),
                            xytext=(0, 8), textcoords="offset points", ha="center",
                            fontsize=fontsize, color=mpl.colormaps[cmap](0.15))
        if g.barycenter is not None and np.isfinite(g.barycenter).any():
            neg = -g.barycenter
            artists["Barycenter"] = ax.contour(x, y, neg, levels=LEVELS, norm=norm,
                                               cmap=_cmap(BARYCENTER_CMAP), linewidths=2.0)
            handles.append(Line2D([], [], color=mpl.colormaps[BARYCENTER_CMAP](0.25), lw=2.5,
                                  label=f"Barycenter (n={g.n_components})"))
            if annotate:
                ax.annotate("Barycenter", _mode_label_position(xs, ys, neg), xytext=(0, -14),
                            textcoords="offset points", ha="center", fontsize=fontsize,
                            fontweight="bold", color=mpl.colormaps[BARYCENTER_CMAP](0.1))
        ax.set_xlim(g.extent[0], g.extent[1])
        ax.set_ylim(g.extent[2], g.extent[3])
        ax.set_aspect("equal", adjustable="box")
        i0, i1 = (g.dims if g.dim and g.dim > 2 else (0, 1))
        ax.set_xlabel(f"$x_{{{i0 + 1}}}$", fontsize=fontsize)
        ax.set_ylabel(f"$x_{{{i1 + 1}}}$", fontsize=fontsize)
        if legend == "below" and handles:
            ax.figure.legend(handles=handles, fontsize=fontsize * 0.75, loc="outside lower center",
                             ncols=min(len(handles), 4), frameon=False)
        elif legend and handles:
            ax.legend(handles=handles, fontsize=fontsize * 0.75, loc="best", framealpha=0.8)
    if g.barycenter is None:
        msg = f"{g.status}: {g.error}" if g.error else f"status {g.status}: no barycenter"
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(msg, 40)[:6]), transform=ax.transAxes,
                ha="center", va="center", fontsize=fontsize * 0.8, color="darkred",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "darkred"})
    if title is None:
        what = f"{j} GMMs and their barycenter" if g.barycenter is not None else f"{j} GMMs"
        title = f"Problem {g.problem_id}: {what}"
    ax.set_title(title, fontsize=fontsize * 1.25)
    return artists


def _subtitle(g: ProblemGrids) -> str:
    bits = [f"d={g.dim}"] if g.dim else []
    if g.dim and g.dim > 2:
        bits.append(f"marginal on $x_{{{g.dims[0] + 1}}}, x_{{{g.dims[1] + 1}}}$")
    if g.objective == g.objective:
        bits.append(f"objective {g.objective:.4g}")
    bits.append(f"contours of $-\\log p$ at {LEVELS[0]:g}..{LEVELS[-1]:g}")
    return ", ".join(bits)


def plot_problem(
    results,
    problem_id: int,
    *,
    shape: tuple[int, int] | None = None,
    bounds: Sequence[float] | None = None,
    input_url: str | None = None,
    source: str = "auto",
    figsize: tuple[float, float] = (10, 10),
    title: str | None = None,
):
    """The tutorial's figure for one problem; returns a matplotlib ``Figure`` (Agg).

    See :func:`problem_grids` for the arguments.
    """
    g = problem_grids(results, problem_id, shape=shape, bounds=bounds, input_url=input_url,
                      source=source)
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    draw_problem(ax, g, fontsize=16, title=title, legend="below")
    fig.suptitle(_subtitle(g), fontsize=11, color="dimgray")
    return fig


def pick_problems(results, n: int = 6) -> list[int]:
    """Up to ``n`` problem ids for a gallery: ok problems first, then a failed / invalid one."""
    res = _results(results)
    p = res.problems
    if not len(p):
        raise PlotError(f"{res.url} has no committed problems")
    ok = p[p["status"] == "ok"]["problem_id"].tolist()
    bad = p[p["status"] != "ok"]["problem_id"].tolist()
    take = ok[: max(n - (1 if bad else 0), 0)] + bad[:1]
    return [int(i) for i in (take if len(take) >= min(n, len(p)) else p["problem_id"][:n])]


def plot_gallery(
    results,
    problem_ids: Sequence[int] | None = None,
    *,
    n: int = 6,
    ncols: int | None = None,
    shape: tuple[int, int] | None = None,
    input_url: str | None = None,
    source: str = "auto",
    panel_size: float = 4.5,
    title: str | None = None,
):
    """Several problems in one figure (a grid of panels); returns the ``Figure``.

    ``problem_ids`` default: :func:`pick_problems` ``(results, n)``.
    """
    res = _results(results)
    ids = list(problem_ids) if problem_ids is not None else pick_problems(res, n)
    if not ids:
        raise PlotError("no problems to plot")
    grids = [problem_grids(res, i, shape=shape, input_url=input_url, source=source) for i in ids]
    ncols = ncols or min(len(ids), math.ceil(math.sqrt(len(ids))))
    nrows = math.ceil(len(ids) / ncols)
    fig = _new_figure((panel_size * ncols, panel_size * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, g in zip(axes.flat, grids):
        draw_problem(ax, g, fontsize=9, annotate=False, legend=True,
                     title=f"Problem {g.problem_id}" + ("" if g.status == "ok"
                                                        else f" ({g.status})"))
    for ax in list(axes.flat)[len(grids):]:
        ax.set_axis_off()
    ok = sum(g.status == "ok" for g in grids)
    fig.suptitle(title or f"{len(grids)} problems and their barycenters ({ok} ok) — {res.url}",
                 fontsize=13)
    return fig


def save_figure(fig, path: str, *, dpi: int = 100) -> str:
    """Write ``fig`` to ``path`` (format from the suffix: png, pdf, svg, ...)."""
    fig.savefig(str(path), dpi=dpi)
    return str(path)
