"""CLI commands of the storage layer (generate, convert, show).

Heavy imports (pyarrow, zarr) happen inside the commands, so ``raybary
--help`` stays fast; nothing here imports JAX.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

import click

from raybary.cli.errors import user_errors
from raybary.cli.storage_flags import output_storage_options_flag, storage_options_flag

#: The covariance forms (raybary.storage.columns.COVARIANCE_TYPES; spelt out so
#: that ``raybary --help`` imports nothing of the storage layer).
_COVARIANCE_TYPES = ("full", "diag", "spherical")

#: Built-in errors of the storage layer that are the user's to fix (bad input,
#: existing output, permissions, ...): printed as ``Error: ...`` without a traceback.
_USER_ERRORS = (ValueError, OSError, IndexError)


@contextlib.contextmanager
def _progress(length: int, label: str) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr; yields ``update(n)``.

    The bar appears with the first update, so an input refused before any
    work (wrong schema, existing output, ...) prints its error alone.
    """
    bar = None

    def update(n: int) -> None:
        nonlocal bar
        if bar is None:
            bar = click.progressbar(length=length, label=label, file=sys.stderr,
                                    show_pos=True, show_eta=True)
            bar.__enter__()
        bar.update(n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)


@click.command("generate")
@click.argument("out")
@click.option("--problems", "n_problems", type=click.IntRange(min=0), default=None,
              help="Number of problems (a problem store).")
@click.option("--gmms", "n_gmms", type=click.IntRange(min=0), default=None,
              help="Number of GMMs: write a GMM store instead (the input of `raybary "
                   "distances`; the tutorial family's GMMs, 2 to 5 components, *.parquet).")
@click.option("--family", type=click.Choice(["tutorial", "random"]), default="tutorial",
              show_default=True, help="Problem family (see docs/storage.md).")
@click.option("--dim", type=click.IntRange(min=1), default=None,
              help="Dimension d (tutorial: 2; random: mixed 1, 2, 3, 5).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--chunk-problems", type=click.IntRange(min=1), default=None,
              help="Zarr: problems (with --gmms: GMMs) per chunk (default 8192).")
@click.option("--covariance-type", type=click.Choice(_COVARIANCE_TYPES), default="full",
              show_default=True,
              help="Store the covariances full (cov), as their diagonals (cov_diag) or as their "
                   "mean variances (cov_spherical); the same random draws either way.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@storage_options_flag
@user_errors(*_USER_ERRORS)
def generate_cmd(out: str, n_problems: int | None, n_gmms: int | None, family: str,
                 dim: int | None, seed: int, chunk_problems: int | None, covariance_type: str,
                 overwrite: bool, storage_options) -> None:
    """Write a seeded batch of problems (--problems) or of GMMs (--gmms) to OUT
    (*.parquet or *.zarr)."""
    from raybary.storage.generate import generate

    if (n_problems is None) == (n_gmms is None):
        raise click.UsageError("give one of --problems N (a problem store) and --gmms N "
                               "(a GMM store)")
    t0 = time.perf_counter()
    if n_gmms is not None:
        fmt = _generate_gmms(out, n_gmms, family, dim, seed, covariance_type, overwrite,
                             chunk_problems, storage_options)
        click.echo(f"wrote {n_gmms} GMMs to {out} ({fmt}) in {time.perf_counter() - t0:.1f} s")
        return
    with _progress(n_problems, "generating") as update:
        store = generate(out, n_problems, family=family, dim=dim, seed=seed,
                         overwrite=overwrite, chunk_problems=chunk_problems, progress=update,
                         covariance_type=covariance_type, storage_options=storage_options)
    kind = "" if covariance_type == "full" else f", {covariance_type} covariances"
    click.echo(f"wrote {store.n_problems} {family} problems to {out} ({store.format}{kind}) "
               f"in {time.perf_counter() - t0:.1f} s")


def _generate_gmms(out: str, n_gmms: int, family: str, dim: int | None, seed: int,
                   covariance_type: str, overwrite: bool, chunk_gmms: int | None,
                   storage_options) -> str:
    """``generate --gmms``: the tutorial family's GMMs into a GMM store; its format id."""
    from raybary.storage.gmm_store import generate_gmms

    if family != "tutorial":
        raise click.UsageError("--gmms draws the tutorial family's GMMs (--family tutorial)")
    return generate_gmms(out, n_gmms, dim=dim or 2, seed=seed, covariance_type=covariance_type,
                         overwrite=overwrite, chunk_gmms=chunk_gmms,
                         storage_options=storage_options).format


@click.command("convert")
@click.argument("src", metavar="IN")
@click.argument("dst", metavar="OUT")
@click.option("--chunk-problems", type=click.IntRange(min=1), default=None,
              help="Zarr output: problems (of a GMM store: GMMs) per chunk (default 8192).")
@click.option("--covariance-type", type=click.Choice(_COVARIANCE_TYPES), default=None,
              help="How OUT stores the covariances: full (cov), diag (cov_diag) or spherical "
                   "(cov_spherical) [default: as IN]. Refused, naming the first component, "
                   "if that would drop information (non-zero off-diagonals, unequal variances).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@storage_options_flag
@output_storage_options_flag
@user_errors(*_USER_ERRORS)
def convert_cmd(src: str, dst: str, chunk_problems: int | None, covariance_type: str | None,
                overwrite: bool, storage_options, output_storage_options) -> None:
    """Convert a problem store or a GMM store IN to OUT (format from the
    suffixes: *.parquet, *.zarr)."""
    from raybary.storage.conversion import convert
    from raybary.storage.gmm_store import convert_gmms

    t0 = time.perf_counter()
    store, kind = _open_input(src, storage_options)
    if kind == "GMMs":
        out = convert_gmms(store, dst, overwrite=overwrite, chunk_gmms=chunk_problems,
                           covariance_type=covariance_type,
                           output_storage_options=output_storage_options)
    else:
        with _progress(store.n_problems, "converting") as update:
            out = convert(store, dst, overwrite=overwrite, chunk_problems=chunk_problems,
                          progress=update, covariance_type=covariance_type,
                          storage_options=storage_options,
                          output_storage_options=output_storage_options)
    click.echo(f"converted {out.n_problems} {kind} from {src} ({store.format}, "
               f"{store.covariance_type} covariances) to {dst} ({out.format}, "
               f"{out.covariance_type} covariances) in {time.perf_counter() - t0:.1f} s")


def _open_input(src: str, storage_options) -> tuple:
    """``(store, "problems")`` for a problem store, else ``(store, "GMMs")`` if
    ``src`` opens as a GMM store; else the problem store's refusal is raised."""
    from raybary.storage import StoreFormatError
    from raybary.storage.gmm_store import open_gmm_store
    from raybary.storage.store import open_store

    try:
        return open_store(src, storage_options=storage_options), "problems"
    except StoreFormatError as refusal:
        try:
            return open_gmm_store(src, storage_options=storage_options), "GMMs"
        except StoreFormatError:
            raise refusal from None


@click.command("show")
@click.argument("path", metavar="OUT")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="How many slowest / failed / invalid problems to list.")
@click.option("--all", "scan_all", is_flag=True,
              help="Problem store: validate every problem (default: the first 1000).")
@click.option("--renormalize", is_flag=True,
              help="Problem store: rescale component weights that do not sum to 1 "
                   "instead of reporting them (store.read(..., renormalize=True)).")
@storage_options_flag
@user_errors(*_USER_ERRORS)
def show_cmd(path: str, top: int, scan_all: bool, renormalize: bool, storage_options) -> None:
    """Summarise a results directory OUT (a run's or a distance job's), or
    describe and validate a problem store or a GMM store."""
    from raybary.storage import _fs
    from raybary.storage.results import LAYOUT_FILE, summarize
    from raybary.storage.results.distances import is_distances, summarize_distances

    fs, root = _fs.url_to_fs(path, storage_options)
    if fs.exists(root.rstrip("/") + "/" + LAYOUT_FILE):
        text = (summarize_distances if is_distances(path, storage_options=storage_options)
                else summarize)
        click.echo(text(path, top=top, storage_options=storage_options))
        return
    if not fs.exists(root):
        raise click.ClickException(f"nothing at {_fs.redact_url(path)} (expected a results "
                                   "directory, a problem store or a GMM store)")
    store, kind = _open_input(path, storage_options)
    click.echo(f"{'problem' if kind == 'problems' else 'GMM'} store {path}")
    unit = "problem" if kind == "problems" else "gmm"
    for key, value in store.describe().items():
        if key == "dim" and value is None:
            value = f"per {unit} (Parquet; mixed dimensions allowed)"
        if key != "url":
            key = key.replace("n_problems", f"n_{kind.lower()}").replace("problem", unit)
            click.echo(f"  {key}: {value}")
    if store.n_problems:
        _validate_store(store, top, scan_all, renormalize, kind)


def _validate_store(store, top: int, scan_all: bool, renormalize: bool,
                    kind: str = "problems") -> None:
    """Validate the first 1000 problems (GMMs), or all; print how many are
    invalid and the first ``top`` messages (a GMM store's name the GMM)."""
    from raybary.storage.gmm_store import gmm_message

    n = store.n_problems if scan_all else min(store.n_problems, 1000)
    n_invalid, shown = 0, []
    with _progress(n, "validating") as update:
        for start in range(0, n, 10_000):
            shard = store.read(start, min(start + 10_000, n), renormalize=renormalize)
            n_invalid += shard.n_invalid
            shown += [e for e in shard.errors if e][: top - len(shown)]
            update(len(shard))
    what = "all" if n == store.n_problems else "first"
    click.echo(f"  {what} {n} {kind}: {n_invalid} invalid"
               + (" (weights renormalised)" if renormalize else ""))
    for err in shown:
        click.echo(f"    {gmm_message(err) if kind == 'GMMs' else err}")


def register(group: click.Group) -> None:
    """Add the storage commands to ``group``."""
    group.add_command(generate_cmd)
    group.add_command(convert_cmd)
    group.add_command(show_cmd)
