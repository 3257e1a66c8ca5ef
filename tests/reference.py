"""Independent reference implementations used only by tests and benchmarks:
the tutorial's problem built with OTT-JAX's generator, OTT-JAX's solver, POT's
exact fixed point, POT's exact MW2 objective and POT's exact MW2 distance."""

from __future__ import annotations

import numpy as np

from raybary import GMM, Problem

TUTORIAL_CS = np.array([[-20.0, -15.0], [60.0, -15.0], [50.0, 65.0]])
TUTORIAL_SS = np.array([4.0, 3.0, 5.0])
TUTORIAL_K = (2, 3, 5)


def tutorial_problem(seed: int = 0, bar_size: int = 6):
    """The tutorial's problem exactly as the notebook builds it (OTT-JAX generator).

    Returns ``(problem, (init_means, init_covs))``; the init is the tutorial's
    random GaussianMixture.
    """
    import jax
    import jax.numpy as jnp
    from ott.tools.gaussian_mixture import gaussian_mixture

    key = jax.random.PRNGKey(seed)
    keys = jax.random.split(key, num=3)
    lambdas = jax.random.dirichlet(keys[0], alpha=jnp.ones(3) * 50.0)
    seeds = jax.random.randint(keys[1], shape=(3,), minval=0, maxval=100)
    ms = 0.1 * jnp.mean(jnp.asarray(TUTORIAL_CS), axis=1)
    gmms = []
    for i in range(3):
        g = gaussian_mixture.GaussianMixture.from_random(
            jax.random.PRNGKey(int(seeds[i])),
            n_components=TUTORIAL_K[i],
            n_dimensions=2,
            stdev_cov=float(TUTORIAL_SS[i]),
            stdev_mean=float(ms[i]),
            ridge=jnp.asarray(TUTORIAL_CS[i]),
        )
        gmms.append(
            GMM(
                np.asarray(g.component_weight_ob.probs(), np.float64),
                np.asarray(g.loc, np.float64),
                np.asarray(g.covariance, np.float64),
            )
        )
    init = gaussian_mixture.GaussianMixture.from_random(
        keys[2], n_components=bar_size, n_dimensions=2
    )
    problem = Problem(gmms, np.asarray(lambdas, np.float64))
    return problem, (np.asarray(init.loc, np.float64), np.asarray(init.covariance, np.float64))


def exact_objective(problem: Problem, weights, means, covs) -> float:
    """``sum_j lambda_j MW2^2(barycenter, GMM_j)`` with POT's exact LP (``ot.gmm.gmm_ot_loss``)."""
    import ot

    total = 0.0
    for lam, g in zip(problem.lambdas, problem.gmms):
        total += lam * float(
            ot.gmm.gmm_ot_loss(
                np.asarray(means, np.float64),
                g.means,
                np.asarray(covs, np.float64),
                g.covs,
                np.asarray(weights, np.float64),
                g.weights,
            )
        )
    return total


def pot_mw2(a: GMM, b: GMM) -> float:
    """POT's exact ``MW2^2(a, b)`` (``ot.gmm.gmm_ot_loss``: the LP over the
    components with the squared Bures cost)."""
    import ot

    return float(ot.gmm.gmm_ot_loss(a.means, b.means, a.covs, b.covs, a.weights, b.weights))


def pot_fixed_point(problem: Problem, init_means, init_covs, iterations: int = 100):
    """POT's exact fixed point (Tanguy, Delon & Gozlan 2024) with Bures projection."""
    import ot

    n = len(init_means)
    means, covs = ot.gmm.gmm_barycenter_fixed_point(
        [g.means for g in problem.gmms],
        [g.covs for g in problem.gmms],
        [g.weights for g in problem.gmms],
        # POT updates the initial arrays in place: give it copies.
        np.array(init_means, np.float64, copy=True),
        np.array(init_covs, np.float64, copy=True),
        np.asarray(problem.lambdas, np.float64),
        iterations=iterations,
        barycentric_proj_method="bures",
    )
    return np.full(n, 1.0 / n), np.asarray(means), np.asarray(covs)


def ott_solve_fn(dim: int, epsilon: float = 0.1):
    """OTT-JAX's FreeWassersteinBarycenter, jitted once: ``fn(ys, bs, lambdas, x_init)``."""
    import jax
    from ott.geometry import costs
    from ott.problems.linear import barycenter_problem
    from ott.solvers.linear import continuous_barycenter, sinkhorn

    b_cost = costs.Bures(dimension=dim)
    # The tutorial's FreeWassersteinBarycenter(lse_mode=True); newer OTT-JAX
    # takes the (log-domain by default) Sinkhorn solver explicitly.
    solver = continuous_barycenter.FreeWassersteinBarycenter(sinkhorn.Sinkhorn(lse_mode=True))

    def run(ys, bs, lambdas, x_init, num_per_segment):
        bar_p = barycenter_problem.FreeBarycenterProblem(
            y=ys,
            b=bs,
            weights=lambdas,
            num_per_segment=num_per_segment,
            cost_fn=b_cost,
            epsilon=epsilon,
        )
        out = solver(bar_p, bar_size=x_init.shape[0], x_init=x_init)
        return out.x

    return jax.jit(run, static_argnums=(4,))


def ott_solve(problem: Problem, init_means, init_covs, epsilon: float = 0.1, fn=None):
    """Run OTT-JAX's solver on ``problem``; returns ``(weights, means, covs)``."""
    import jax
    import jax.numpy as jnp
    from ott.geometry import costs

    d = problem.dim
    fn = fn or ott_solve_fn(d, epsilon)
    to_x = jax.vmap(costs.mean_and_cov_to_x, in_axes=[0, 0, None])
    ys = jnp.vstack([to_x(jnp.asarray(g.means), jnp.asarray(g.covs), d) for g in problem.gmms])
    bs = jnp.hstack([jnp.asarray(g.weights) for g in problem.gmms])
    x_init = to_x(jnp.asarray(init_means), jnp.asarray(init_covs), d)
    nps = tuple(g.n_components for g in problem.gmms)
    x = fn(ys, bs, jnp.asarray(problem.lambdas), x_init, nps)
    means, covs = costs.x_to_means_and_covs(x, d)
    n = len(init_means)
    return np.full(n, 1.0 / n), np.asarray(means, np.float64), np.asarray(covs, np.float64)
