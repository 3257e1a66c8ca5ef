"""``raybary plot``: the tutorial's figure (or a gallery) from stored results.

The drawing lives in :mod:`raybary.plot`; this module only parses options.
"""

from __future__ import annotations

import click

from raybary.cli.errors import user_errors
from raybary.cli.storage_flags import input_storage_options_flag, storage_options_flag


def _ids(values: tuple[str, ...]) -> list[int]:
    out = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(int(part))
            except ValueError:
                raise click.BadParameter(f"problem ids are integers, got {part!r}",
                                         param_hint="--problem") from None
    return out


def _shape(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2 or min(sizes) < 2:
        raise click.BadParameter(f"expected H or HxW (e.g. 100x100), got {text!r}",
                                 param_hint="--grid")
    return sizes[0], sizes[1]


def _bounds(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 4 or not (vals[0] < vals[1] and vals[2] < vals[3]):
        raise click.BadParameter(f"expected xmin,xmax,ymin,ymax, got {text!r}",
                                 param_hint="--bounds")
    return vals


@click.command("plot")
@click.argument("output", metavar="OUTPUT")
@click.option("--problem", "-p", "problems", multiple=True, metavar="ID[,ID...]",
              help="Problem id(s). One id: the tutorial's figure; several (repeat or "
                   "comma-separate): a gallery. Default: a gallery of --gallery problems.")
@click.option("--gallery", "gallery", type=click.IntRange(min=1), default=None, metavar="N",
              help="A gallery of N problems picked from the results (ok ones first, "
                   "then a failed/invalid one). [default: 6 when no --problem]")
@click.option("-o", "--out", "out", default=None, metavar="FILE",
              help="Figure file; the format follows the suffix (png, pdf, svg). "
                   "[default: problem-ID.png or gallery.png]")
@click.option("--grid", "grid", default=None, metavar="HxW",
              help="Grid of the log-densities computed here; d = 1: max(H, W) points "
                   "[default: 200x200].")
@click.option("--bounds", "bounds", default=None, metavar="XMIN,XMAX,YMIN,YMAX",
              help="Plot window (computed grids; d = 1 uses XMIN,XMAX) [default: the run's "
                   "--grid-bounds, or a window that shows every input GMM and the "
                   "barycenter whole].")
@click.option("--source", type=click.Choice(["auto", "stored", "computed"]), default="auto",
              show_default=True,
              help="computed: from the stored barycenters and the input store; stored: "
                   "the grids the run stored; auto: computed when the input store can be "
                   "read, else stored.")
@click.option("--input", "input_url", default=None, metavar="URL",
              help="The input store, if it is no longer where the results record it.")
@click.option("--columns", type=click.IntRange(min=1), default=None,
              help="Gallery columns [default: about sqrt(N)].")
@click.option("--dpi", type=click.IntRange(min=20), default=100, show_default=True)
@click.option("--title", default=None, help="Figure title.")
@storage_options_flag
@input_storage_options_flag
@user_errors(ValueError, FileNotFoundError)
def plot_cmd(output, problems, gallery, out, grid, bounds, source, input_url, columns, dpi,
             title, storage_options, input_storage_options):
    """Contours of -log p of each input GMM and of the barycenter, from OUTPUT
    (curves of -log p for d = 1 problems).

    \b
      raybary plot out/ --problem 17 -o fig.png      # one problem
      raybary plot out/ --problem 1,2,3,4 -o g.png    # a gallery of these
      raybary plot out/ --gallery 9 -o g.png          # 9 problems picked for you

    Needs matplotlib: pip install 'raybary[plot]'.
    """
    from raybary import plot as rp

    ids = _ids(problems)
    shape, window = _shape(grid), _bounds(bounds)
    if gallery is not None and len(ids) == 1:
        raise click.UsageError("give one --problem for a single figure, or --gallery N, not both")
    rp._matplotlib()
    where = {"storage_options": storage_options, "input_storage_options": input_storage_options}
    if len(ids) == 1:
        fig = rp.plot_problem(output, ids[0], shape=shape, bounds=window, input_url=input_url,
                              source=source, title=title, **where)
        out = out or f"problem-{ids[0]}.png"
    else:
        if window is not None:
            raise click.UsageError("--bounds applies to a single --problem")
        fig = rp.plot_gallery(output, ids or None, n=gallery or 6, ncols=columns,
                              shape=shape, input_url=input_url, source=source, title=title,
                              **where)
        out = out or "gallery.png"
    rp.save_figure(fig, out, dpi=dpi)
    click.echo(f"wrote {out}")


def register(group: click.Group) -> None:
    group.add_command(plot_cmd)
