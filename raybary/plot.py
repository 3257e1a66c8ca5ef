r"""Figures from stored results: the OTT-JAX tutorial's picture, for any problem.

For one problem, :func:`plot_problem` draws contours of the negative
log-density :math:`-\log p` of each input GMM (one colour map per GMM) and of
the barycenter (red, thicker), with the tutorial's log-scaled levels
``np.logspace(0, 1, 10)`` and ``LogNorm(vmin=1, vmax=10)``, a title, axis labels,
a legend and a label at each GMM's mode. :func:`plot_gallery` puts several
problems in one figure.

Where the log-densities come from (:func:`problem_grids`):

1. by default they are computed here, with :func:`raybary.log_density_grid`
   (:func:`raybary.log_density` for curves), from the stored barycenter
   (``barycenters/``: its exact weights, means and covariances) and the input
   store recorded in the results' layout (``input_url``; pass ``input_url=``
   if it moved), on a :data:`DEFAULT_SHAPE` (200x200) grid over a window that
   shows every input GMM and the barycenter whole
   (:func:`raybary.density.covering_extent`, as the run's extents);
2. when the input store cannot be read (or with ``source="stored"``), the
   grids the run stored are drawn (``grids.zarr``: the barycenter's, and the
   inputs' if the run stored ``input_gmms`` of them), on the run's extents.

Why computed first: the run's grids are sized for storage (50x50 by default:
9 KB per problem; 100x100 would take 36 KB per problem, 36 GB per million
problems, and four times the grid time), and 50x50 contours look jagged on a
10-inch figure, while the parameters are stored exactly and one problem's
200x200 grids take milliseconds.

Problems in ``d > 2`` show the 2-D marginal on the run's ``grid_dims``;
``d = 1`` problems are drawn as curves of :math:`-\log p` (linear axis: in 1-D
it is often below 1; stored curves: ``Results.curves``).
Problems that are ``invalid`` or ``failed`` show their inputs (if readable) and
the error.

matplotlib comes with the ``plot`` extra (``pip install 'raybary[plot]'``).
Only the Agg canvas is used (no pyplot, no display), so this works headless
and in threads.
"""

from __future__ import annotations

import math
import textwrap
import warnings
from collections.abc import Mapping, Sequence
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
#: Grid of the figures' log-densities when computed here (``d = 1``: ``max(H, W)``
#: points): smooth contours at 10 inches; the runs' stored grids are coarser.
DEFAULT_SHAPE = (200, 200)


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
      inputs: ``[J, H, W]`` log-densities of the input GMMs (``[J, L]`` in 1-D,
        at ``x = linspace(xmin, xmax, L)``).
      barycenter: ``[H, W]`` (or ``[L]``) log-density, or ``None`` (no result).
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
def _results(results, storage_options=None) -> Any:
    from raybary.storage.results import Results, read_results

    if isinstance(results, Results):
        return results
    try:
        return read_results(str(results), storage_options=storage_options)
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


def _input_problem(res, position: int, input_url: str | None, storage_options=None):
    """The validated input problem at ``position``, its message, or raise PlotError.
    The store is opened with ``storage_options``, by default the results' own."""
    from raybary.storage.store import open_store

    url = input_url or res.layout.get("input_url")
    if not url:
        raise PlotError(f"{res.url} does not record its input store; pass input_url / --input")
    if storage_options is None:
        storage_options = getattr(res, "storage_options", None)
    try:
        store = open_store(url, storage_options=storage_options)
        shard = store.read(position, position + 1)
    except (OSError, ValueError, IndexError) as e:
        raise PlotError(f"cannot read the input store {url} ({e}); pass input_url / --input "
                        "if it moved") from None
    return shard.problems[0], shard.errors[0]


def _stored_grids(res, position: int, dim: int | None):
    """What the run stored for the problem at ``position``: ``(kind, extent, barycenter,
    inputs)`` with kind ``"grid"`` (``d >= 2``) or ``"curve"`` (``d = 1``), or ``None``."""

    if res.layout.get("grid_shape") is None:
        return None
    if int(position) // int(res.layout["shard_size"]) not in res.committed_shards:
        return None
    kinds = ("curve",) if dim == 1 else ("grid",) if dim else ("grid", "curve")
    for kind in kinds:
        try:
            if kind == "grid":
                g = res.grids(position, position + 1, inputs=True)
                extent, bary, inputs = g.extent[0], g.barycenter[0], g.inputs
            else:
                c = res.curves(position, position + 1, inputs=True)
                extent, bary, inputs = c.extent[0], c.curve[0], c.inputs
        except (OSError, KeyError, ValueError):
            continue
        if not np.isfinite(extent).all():
            continue
        if inputs is not None:
            rows = [x for x in inputs[0] if np.isfinite(x).any()]
            inputs = np.stack(rows) if rows else None
        return kind, extent, (bary if np.isfinite(bary).any() else None), inputs
    return None


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
    storage_options: Mapping[str, Any] | None = None,
    input_storage_options: Mapping[str, Any] | None = None,
) -> ProblemGrids:
    """Log-density grids (curves in 1-D) of one problem's inputs and barycenter
    (see the module docstring).

    Args:
      results: an output directory (path / URL) or a :class:`~raybary.storage.results.Results`.
      problem_id: the problem.
      shape: ``(H, W)`` when computing (default :data:`DEFAULT_SHAPE`, 200x200);
        a ``d = 1`` curve gets ``max(H, W)`` points.
      bounds: ``(xmin, xmax, ymin, ymax)`` when computing (``xmin, xmax`` for
        ``d = 1``); default: the run's ``grid_bounds`` if it had fixed ones,
        else a window that shows every input GMM and the barycenter whole
        (:func:`raybary.density.covering_extent`, as the run's extents).
      input_url: the input store, if not where the layout says.
      source: ``"auto"`` (computed when the input store can be read, else
        the grids the run stored), ``"computed"`` or ``"stored"`` (fail if
        the run stored none; input grids it did not store are computed on
        its extent).
      storage_options: fsspec options of the results' URL, and of the input
        store's unless
      input_storage_options: are given (not merged: e.g. another bucket's
        credentials).
    """
    if source not in ("auto", "stored", "computed"):
        raise ValueError("source must be 'auto', 'stored' or 'computed'")
    res = _results(results, storage_options)
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

    problem, problem_error, read_error = None, None, None
    try:
        problem, problem_error = _input_problem(res, position, input_url, input_storage_options)
    except PlotError as e:
        read_error = e
    lambdas = None if problem is None else problem.lambdas
    dim = problem.dim if problem is not None else (bary_gmm.dim if bary_gmm is not None else None)
    if error is None and problem_error is not None:
        error = problem_error

    def grids(kind, extent, bary, inputs, src):
        return ProblemGrids(pid, status, error, 1 if kind == "curve" else dim, dims,
                            np.asarray(extent, np.float64), inputs, bary, lambdas, objective,
                            n_comp, src)

    if source == "computed" or (source == "auto" and (read_error is None or bounds is not None)):
        if read_error is not None:
            raise read_error
        if dim is None:
            raise PlotError(f"problem {pid}: nothing to plot ({error or 'no inputs, no barycenter'})")
        return grids(*_computed(problem, bary_gmm, dim, _dims2(dims, dim), shape, bounds, opts))

    stored = _stored_grids(res, position, dim)
    if stored is None:
        if source == "stored":
            raise PlotError(f"{res.url} has no stored grids for problem {pid}")
        raise read_error
    kind, extent, bary, inputs = stored
    if read_error is not None:
        only = "" if inputs is not None else " (the barycenter's only)"
        warnings.warn(f"{read_error}; drawing the grids the run stored{only}", stacklevel=2)
    size = (_curve_points(res),) if kind == "curve" else _stored_shape(res)

    def density(g):
        if kind == "curve":
            return _curve(g, extent, size[0])
        from raybary.density import log_density_grid

        return log_density_grid(g, size, extent, dims=_dims2(dims, dim))[0]

    if bary is None and bary_gmm is not None:  # no stored row: compute on the run's extent
        bary = density(bary_gmm)
    src = "stored"
    if inputs is None:
        inputs = np.empty((0, *size))
    if problem is not None and len(inputs) < problem.n_gmms:  # the run stored fewer GMMs
        more = [density(g) for g in problem.gmms[len(inputs):]]
        inputs, src = np.concatenate([inputs, np.stack(more)]), "mixed"
    if kind == "curve":
        extent = np.r_[extent, np.nan, np.nan]
    return grids(kind, extent, bary, inputs, src)


def _computed(problem, bary_gmm, dim: int, dims2: tuple[int, int], shape, bounds, opts):
    """Everything computed here: ``(kind, extent, barycenter, inputs, "computed")``."""
    from raybary.density import covering_extent, log_density_grid

    gmms = list(problem.gmms)
    hw = tuple(int(x) for x in (shape or DEFAULT_SHAPE))
    if bounds is not None:
        extent = np.asarray(bounds, np.float64)
    elif opts.get("grid_bounds") is not None:  # the run's fixed window
        extent = np.asarray(opts["grid_bounds"], np.float64)
    else:
        extent = covering_extent([*gmms, bary_gmm], (0,) if dim == 1 else dims2)
    if dim == 1:
        n = max(hw)
        bary = None if bary_gmm is None else _curve(bary_gmm, extent, n)
        inputs = np.stack([_curve(g, extent, n) for g in gmms]) if gmms else np.empty((0, n))
        return "curve", np.r_[extent[:2], np.nan, np.nan], bary, inputs, "computed"
    bary = None if bary_gmm is None else log_density_grid(bary_gmm, hw, extent, dims=dims2)[0]
    inputs = np.stack([log_density_grid(g, hw, extent, dims=dims2)[0] for g in gmms]) if gmms \
        else np.empty((0, *hw))
    return "grid", extent, bary, inputs, "computed"


def _curve(gmm, extent, n: int) -> np.ndarray:
    """Log-density of a 1-D GMM at ``linspace(extent[0], extent[1], n)``."""
    from raybary.density import log_density

    return log_density(gmm, np.linspace(float(extent[0]), float(extent[1]), n)[:, None])


def _stored_shape(res) -> tuple[int, int]:
    shape = res.layout["grid_shape"]
    return int(shape[0]), int(shape[1])


def _curve_points(res) -> int:
    from raybary.storage.results.layout import curve_length

    return curve_length(res.layout["grid_shape"])


def _dims2(dims: tuple[int, int], dim: int | None) -> tuple[int, int]:
    if dim is not None and dim == 2:
        return (0, 1)
    return dims


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
        ax.set_xlim(g.extent[0], g.extent[1])
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
    if g.dim == 1:
        bits.append("curves of $-\\log p$")
    else:
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
    storage_options: Mapping[str, Any] | None = None,
    input_storage_options: Mapping[str, Any] | None = None,
):
    """The tutorial's figure for one problem; returns a matplotlib ``Figure`` (Agg).

    See :func:`problem_grids` for the arguments.
    """
    g = problem_grids(results, problem_id, shape=shape, bounds=bounds, input_url=input_url,
                      source=source, storage_options=storage_options,
                      input_storage_options=input_storage_options)
    fig = _new_figure(figsize)
    ax = fig.add_subplot()
    draw_problem(ax, g, fontsize=16, title=title, legend="below")
    fig.suptitle(_subtitle(g), fontsize=11, color="dimgray")
    return fig


def pick_problems(results, n: int = 6, *,
                  storage_options: Mapping[str, Any] | None = None) -> list[int]:
    """Up to ``n`` problem ids for a gallery: ok problems first, then a failed / invalid one."""
    res = _results(results, storage_options)
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
    storage_options: Mapping[str, Any] | None = None,
    input_storage_options: Mapping[str, Any] | None = None,
):
    """Several problems in one figure (a grid of panels); returns the ``Figure``.

    ``problem_ids`` default: :func:`pick_problems` ``(results, n)``; storage
    options as :func:`problem_grids`.
    """
    res = _results(results, storage_options)
    ids = list(problem_ids) if problem_ids is not None else pick_problems(res, n)
    if not ids:
        raise PlotError("no problems to plot")
    grids = [problem_grids(res, i, shape=shape, input_url=input_url, source=source,
                           input_storage_options=input_storage_options) for i in ids]
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
