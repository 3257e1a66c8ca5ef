"""CLI commands of the solver: ``raybary tutorial`` (one problem, in-process, no Ray)."""

from __future__ import annotations

import time

import click
import numpy as np

from raybary.cli.errors import user_errors
from raybary.options import DTYPES, SolverOptions


@click.command("tutorial")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the problem.")
@click.option("--bar-size", "-n", type=click.IntRange(min=1), default=SolverOptions.bar_size,
              show_default=True, help="Components of the barycenter.")
@click.option("--learn-weights", is_flag=True, help="Also optimise the barycenter's weights.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float64",
              show_default=True)
@user_errors()
def tutorial_cmd(seed: int, bar_size: int, learn_weights: bool, dtype: str) -> None:
    """Solve the OTT-JAX tutorial's problem (three 2-D GMMs) and print the barycenter.

    A quick check of an installation: no Ray, no files.
    """
    import raybary
    from raybary.storage.generate import tutorial_problems

    problem = tutorial_problems(1, seed=seed)[0]
    t0 = time.perf_counter()
    result = raybary.solve(problem, bar_size=bar_size, dtype=dtype, learn_weights=learn_weights)[0]
    secs = time.perf_counter() - t0
    click.echo(f"tutorial problem (seed {seed}): J={problem.n_gmms} GMMs with "
               f"{[g.n_components for g in problem.gmms]} components, lambdas "
               f"{np.round(problem.lambdas, 3).tolist()}")
    click.echo(f"barycenter, {bar_size} components ({dtype}, {secs:.2f} s with compilation):")
    with np.printoptions(precision=4, suppress=True):
        for i in np.argsort(result.means[:, 0]):
            cov = result.covs[i]
            click.echo(f"  weight {result.weights[i]:.4f}  mean {result.means[i]}  "
                       f"cov [[{cov[0, 0]:.4f}, {cov[0, 1]:.4f}], [{cov[1, 0]:.4f}, {cov[1, 1]:.4f}]]")
    click.echo(f"objective {result.objective:.6f}, {result.iterations} iterations, "
               f"converged {result.converged}, marginal error {result.marginal_error:.1e}")


def register(group: click.Group) -> None:
    """Add the solver commands to ``group``."""
    group.add_command(tutorial_cmd)
