"""Solver tests: closed forms, independent implementations (POT, OTT-JAX),
edge cases, invariances and learned weights. Shapes are kept few (compiles are
slow on small machines) and every assertion can fail."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
from scipy.stats import ortho_group

import raybary
from raybary import GMM, Problem


def psd_sqrt(c):
    lam, v = np.linalg.eigh(c)
    return (v * np.sqrt(lam)) @ v.T


# --------------------------------------------------------------------------- closed forms


def commuting_problem(rng, d, J=3):
    """One Gaussian per input, covariances sharing eigenvectors."""
    u = ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
    gmms, lams = [], rng.dirichlet(np.ones(J) * 2)
    for _ in range(J):
        c = (u * rng.uniform(0.2, 5.0, size=d)) @ u.T
        gmms.append(GMM([1.0], rng.normal(size=(1, d)) * 3, c[None]))
    return Problem(gmms, lams)


def test_closed_form_commuting_gaussians():
    rng = np.random.default_rng(0)
    problems = [commuting_problem(rng, d) for d in (1, 2, 4) for _ in range(2)]
    results = raybary.solve(problems, bar_size=1, dtype="float64")
    for p, r in zip(problems, results):
        mean = sum(lam * g.means[0] for lam, g in zip(p.lambdas, p.gmms))
        root = sum(lam * psd_sqrt(g.covs[0]) for lam, g in zip(p.lambdas, p.gmms))
        cov = root @ root
        np.testing.assert_allclose(r.means[0], mean, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(r.covs[0], cov, rtol=1e-6, atol=1e-9 * np.abs(cov).max())
        assert r.converged and r.status == "ok"
        assert r.weights.tolist() == [1.0]


def test_closed_form_d1_objective():
    """d = 1: W2^2 = (m1-m2)^2 + (s1-s2)^2, the barycenter has s = sum lambda_j s_j."""
    p = Problem(
        [GMM([1.0], [[0.0]], [[[1.0]]]), GMM([1.0], [[4.0]], [[[9.0]]])], np.array([0.25, 0.75])
    )
    r = raybary.solve(p, bar_size=1, dtype="float64")[0]
    m, s = 0.25 * 0 + 0.75 * 4, 0.25 * 1 + 0.75 * 3
    assert r.means[0, 0] == pytest.approx(m, rel=1e-9)
    assert r.covs[0, 0, 0] == pytest.approx(s**2, rel=1e-9)
    want = 0.25 * ((m - 0) ** 2 + (s - 1) ** 2) + 0.75 * ((m - 4) ** 2 + (s - 3) ** 2)
    assert r.objective == pytest.approx(want, rel=1e-9)


# --------------------------------------------------------------------------- tutorial


@pytest.fixture(scope="module")
def tutorial():
    return [ref.tutorial_problem(seed) for seed in range(3)]


def test_tutorial_against_pot_and_ott(tutorial):
    problems = [p for p, _ in tutorial]
    inits = [i for _, i in tutorial]
    ours = raybary.solve(problems, bar_size=6, init=inits, dtype="float64")
    ours32 = raybary.solve(problems, bar_size=6, init=inits)
    ott_fn = ref.ott_solve_fn(2, epsilon=0.1)
    for (p, init), r, r32 in zip(tutorial, ours, ours32):
        exact = ref.exact_objective(p, r.weights, r.means, r.covs)
        exact32 = ref.exact_objective(p, r32.weights, r32.means, r32.covs)
        pot = ref.exact_objective(p, *ref.pot_fixed_point(p, *init))
        ott = ref.exact_objective(p, *ref.ott_solve(p, *init, fn=ott_fn))
        assert exact <= ott * (1 + 1e-9), (exact, ott)
        assert exact <= pot * (1 + 1e-4), (exact, pot)
        assert exact32 <= pot * (1 + 1e-4), (exact32, pot)
        # The transport objective of entropic plans is at least the exact one.
        assert r.objective >= exact * (1 - 1e-6)
        assert r.objective <= exact * (1 + 1e-3)


# --------------------------------------------------------------------------- random ragged


def random_problem(rng, d, ill=False):
    J = int(rng.integers(1, 7))
    gmms = []
    for _ in range(J):
        K = int(rng.integers(1, 9))
        means = rng.normal(size=(K, d)) * 5 + rng.normal(size=d) * 10
        covs = []
        for _ in range(K):
            u = ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
            spread = 4.0 if ill else 1.0
            lam = np.exp(rng.uniform(-spread, spread, size=d))
            covs.append((u * lam) @ u.T)
        gmms.append(GMM(rng.dirichlet(np.ones(K) * 3), means, np.array(covs)))
    n = int(rng.integers(1, 11))
    return Problem(gmms, rng.dirichlet(np.ones(J) * 3)), n


@pytest.fixture(scope="module")
def ragged():
    rng = np.random.default_rng(7)
    items = []
    for i in range(52):
        d = (1, 2, 3, 5, 4)[i % 5]  # d = 4 is padded to 5 (an N(0, 1) dimension)
        p, n = random_problem(rng, d, ill=(i % 3 == 0))
        m0 = np.concatenate([g.means for g in p.gmms])
        c0 = np.concatenate([g.covs for g in p.gmms])
        pick = rng.choice(len(m0), size=n, replace=True)
        items.append((p, n, (m0[pick] + rng.normal(size=(n, d)) * 0.5, c0[pick])))
    return items


def test_random_ragged_against_pot(ragged):
    problems = [p for p, _, _ in ragged]
    sizes = [n for _, n, _ in ragged]
    inits = [i for _, _, i in ragged]
    same_init = raybary.solve(problems, bar_size=sizes, init=inits, dtype="float64")
    best = raybary.solve(problems, bar_size=sizes, dtype="float64", restarts=16)
    gaps, gaps_default = [], []
    for (p, _n, init), r, rb in zip(ragged, same_init, best):
        pot = ref.exact_objective(p, *ref.pot_fixed_point(p, *init, iterations=20))
        ours = ref.exact_objective(p, r.weights, r.means, r.covs)
        ours_default = ref.exact_objective(p, rb.weights, rb.means, rb.covs)
        assert np.all(np.isfinite(r.means)) and np.all(np.isfinite(r.covs))
        gaps.append((ours - pot) / max(pot, 1e-12))
        gaps_default.append((ours_default - pot) / max(pot, 1e-12))
    gaps, gaps_default = np.array(gaps), np.array(gaps_default)
    assert np.median(gaps) <= 1e-4, np.sort(gaps)[-5:]
    assert gaps_default.max() <= 1e-3, np.sort(gaps_default)[-5:]


# --------------------------------------------------------------------------- edge cases


def test_edge_cases_no_nan():
    rng = np.random.default_rng(3)
    g2 = GMM([0.3, 0.7], [[0.0, 0.0], [3.0, 1.0]], [np.eye(2), np.diag([2.0, 0.5])])
    even = GMM([0.5, 0.5], g2.means, g2.covs)
    ill = np.diag([1.0, 1e-6])
    far = Problem([GMM([0.5, 0.5], [[1e4, 1e4], [1e4 + 3, 1e4]], [np.eye(2), np.eye(2)])] * 2, [0.5, 0.5])
    cases = {
        "J=1": (Problem([even], [1.0]), 2),
        "K=1": (Problem([GMM([1.0], [[1.0, 2.0]], [np.eye(2)]), g2], [0.5, 0.5]), 2),
        "n>components": (Problem([g2, GMM([1.0], [[5.0, 5.0]], [np.eye(2)])], [0.4, 0.6]), 6),
        "identical": (Problem([g2, g2, g2], [0.2, 0.3, 0.5]), 2),
        "cond 1e6": (Problem([GMM([1.0], [[0.0, 0.0]], [ill]), g2], [0.5, 0.5]), 2),
        "far": (far, 2),
    }
    results = raybary.solve(
        [p for p, _ in cases.values()], bar_size=[n for _, n in cases.values()], dtype="float64"
    )
    for (name, (_p, n)), r in zip(cases.items(), results):
        assert r.status == "ok", name
        for arr in (r.weights, r.means, r.covs):
            assert np.all(np.isfinite(arr)), name
        assert r.means.shape == (n, 2) and r.weights.sum() == pytest.approx(1.0)
        assert np.all(np.linalg.eigvalsh(r.covs) > 0), name
    # Copies of one GMM with n = K: with uniform barycenter weights the
    # barycenter cannot be g2 (weights 0.3, 0.7), but with learned weights it is.
    ident = raybary.solve(cases["identical"][0], bar_size=2, dtype="float64", learn_weights=True)[0]
    order = np.argsort(ident.means[:, 0])
    # (The weights sit at a kink of the objective, where the mirror-descent
    # steps converge slowly: a few 1e-4, against 0.2 for uniform weights.)
    np.testing.assert_allclose(ident.weights[order], g2.weights, atol=2e-3)
    np.testing.assert_allclose(ident.means[order], g2.means, atol=5e-3)
    np.testing.assert_allclose(ident.covs[order], g2.covs, atol=5e-3)
    assert ident.objective == pytest.approx(0.0, abs=1e-2)
    copies = raybary.solve(Problem([even] * 3, [0.2, 0.3, 0.5]), bar_size=2, dtype="float64")[0]
    order = np.argsort(copies.means[:, 0])
    np.testing.assert_allclose(copies.means[order], even.means, atol=1e-6)
    np.testing.assert_allclose(copies.covs[order], even.covs, atol=1e-6)
    assert copies.objective == pytest.approx(0.0, abs=1e-6)
    far_r = results[5]
    np.testing.assert_allclose(np.sort(far_r.means[:, 0]), [1e4, 1e4 + 3], atol=1e-5)
    # J=1: with n = K (and the input's weights uniform) the barycenter is the input itself.
    j1 = results[0]
    np.testing.assert_allclose(j1.means[np.argsort(j1.means[:, 0])], even.means, atol=1e-6)
    np.testing.assert_allclose(j1.covs[np.argsort(j1.means[:, 0])], even.covs, atol=1e-6)
    del rng


def test_float32_far_from_origin_matches_float64():
    p = Problem(
        [
            GMM([0.5, 0.5], [[1e4, 0.0], [1e4 + 5, 1.0]], [np.eye(2), np.diag([2.0, 0.5])]),
            GMM([1.0], [[1e4 + 2, 3.0]], [np.diag([1.0, 3.0])]),
        ],
        [0.5, 0.5],
    )
    r32 = raybary.solve(p, bar_size=2, dtype="float32")[0]
    r64 = raybary.solve(p, bar_size=2, dtype="float64")[0]
    assert r32.objective == pytest.approx(r64.objective, rel=1e-3)
    o32, o64 = np.argsort(r32.means[:, 1]), np.argsort(r64.means[:, 1])
    np.testing.assert_allclose(r32.means[o32], r64.means[o64], atol=1e-2)


# --------------------------------------------------------------------------- invariances


def test_invariances(tutorial):
    p, init = tutorial[0]
    perm_g = [2, 0, 1]
    permuted_gmms = Problem([p.gmms[j] for j in perm_g], p.lambdas[perm_g])
    rng = np.random.default_rng(0)
    shuffled = []
    for g in p.gmms:
        o = rng.permutation(g.n_components)
        shuffled.append(GMM(g.weights[o], g.means[o], g.covs[o]))
    permuted_comps = Problem(shuffled, p.lambdas)
    t = np.array([123.0, -45.0])
    translated = Problem([GMM(g.weights, g.means + t, g.covs) for g in p.gmms], p.lambdas)
    variants = [p, permuted_gmms, permuted_comps, translated]
    inits = [init, init, init, (init[0] + t, init[1])]
    base, pg, pc, tr = raybary.solve(variants, bar_size=6, init=inits, dtype="float64")
    for other, shift in ((pg, 0.0), (pc, 0.0), (tr, t)):
        assert other.objective == pytest.approx(base.objective, rel=1e-6)
        np.testing.assert_allclose(other.means - shift, base.means, atol=1e-4)
        np.testing.assert_allclose(other.covs, base.covs, atol=1e-4)


# --------------------------------------------------------------------------- learned weights


def test_learned_weights(tutorial):
    problems = [p for p, _ in tutorial]
    inits = [i for _, i in tutorial]
    uniform = raybary.solve(problems, bar_size=6, init=inits, dtype="float64")
    learned = raybary.solve(problems, bar_size=6, init=inits, dtype="float64", learn_weights=True)
    improved = 0
    for p, u, lw in zip(problems, uniform, learned):
        assert np.all(lw.weights >= 0) and lw.weights.sum() == pytest.approx(1.0, abs=1e-9)
        assert lw.objective <= u.objective * (1 + 1e-6)
        ex_u = ref.exact_objective(p, u.weights, u.means, u.covs)
        ex_l = ref.exact_objective(p, lw.weights, lw.means, lw.covs)
        assert ex_l <= ex_u * (1 + 1e-5)
        improved += ex_l < ex_u * (1 - 1e-4)
        assert not np.allclose(lw.weights, 1 / 6)
    assert improved >= 1


# --------------------------------------------------------------------------- per-input costs and plans


@pytest.mark.parametrize("learn_weights", [False, True])
def test_costs_and_plans_make_up_the_objective(tutorial, learn_weights):
    """``Result.costs[j]`` is ``<P_j, C_j>`` of ``Result.plans[j]`` under the
    squared Bures cost to the returned atoms (POT's ``dist_bures_squared``,
    computed independently), the objective is ``sum_j lambda_j costs[j]``,
    each plan couples the barycenter's weights with GMM j's, and each cost is
    at least POT's exact ``MW2^2`` (a coupling's cost) and close to it. A GMM
    of lambda 0 takes no part: NaN cost, no plan."""
    import ot

    problems = [p for p, _ in tutorial]
    inits = [i for _, i in tutorial]
    off = Problem(problems[0].gmms, [0.5, 0.5, 0.0])  # same shapes: no new compile
    results = raybary.solve(problems + [off], bar_size=6, init=inits + [inits[0]],
                            dtype="float64", learn_weights=learn_weights)
    for p, r in zip(problems + [off], results):
        lam = p.lambdas / p.lambdas.sum()
        assert len(r.costs) == len(r.plans) == p.n_gmms
        taking = lam > 0
        assert r.objective == pytest.approx(float(lam[taking] @ r.costs[taking]), rel=1e-12)
        for j, g in enumerate(p.gmms):
            if not taking[j]:
                assert np.isnan(r.costs[j]) and r.plans[j] is None
                continue
            plan = r.plans[j]
            assert plan.shape == (6, g.n_components)
            np.testing.assert_allclose(plan.sum(axis=1), r.weights, atol=1e-7)
            np.testing.assert_allclose(plan.sum(axis=0), g.weights, atol=1e-7)
            cost = ot.gmm.dist_bures_squared(r.means, g.means, r.covs, g.covs)
            assert float(np.sum(plan * cost)) == pytest.approx(r.costs[j], rel=1e-9)
            exact = ref.pot_mw2(r.gmm(), g)
            assert exact * (1 - 1e-9) <= r.costs[j] <= exact * (1 + 1e-2), (j, r.costs[j], exact)
    # lambda 0 for GMM 2: the others' barycenter, as if it were not there (up to
    # the warm starts, whose schedule sees GMM 2's costs move too)
    two = raybary.solve(Problem(problems[0].gmms[:2], [0.5, 0.5]), bar_size=6, init=[inits[0]],
                        dtype="float64", learn_weights=learn_weights)[0]
    assert results[-1].objective == pytest.approx(two.objective, rel=1e-6)
    np.testing.assert_allclose(results[-1].costs[:2], two.costs, rtol=1e-5)


# --------------------------------------------------------------------------- API behaviour


def test_restarts_keep_the_best(tutorial):
    p, _ = tutorial[1]
    one = raybary.solve(p, bar_size=6, restarts=1, seed=5)[0]
    many = raybary.solve(p, bar_size=6, restarts=4, seed=5)[0]
    assert many.objective <= one.objective * (1 + 1e-6)
    again = raybary.solve(p, bar_size=6, restarts=4, seed=5)[0]
    np.testing.assert_array_equal(again.means, many.means)


def test_ids_seed_each_problem_not_its_position(tutorial):
    """With ``ids``, a problem's draws (hence its result) do not depend on the
    call or its place in it: alone, or third of three, it is the same."""
    problems = [p for p, _ in tutorial]
    together = raybary.solve(problems, bar_size=6, restarts=4, seed=5, ids=[7, 8, 9])
    alone = raybary.solve(problems[2], bar_size=6, restarts=4, seed=5, ids=[9])[0]
    np.testing.assert_allclose(alone.objective, together[2].objective, rtol=1e-5)
    np.testing.assert_allclose(alone.means, together[2].means, rtol=1e-4, atol=1e-4)
    assert alone.restart == together[2].restart
    with pytest.raises(ValueError, match="ids has shape"):
        raybary.solve(problems, bar_size=6, ids=[1, 2])


def test_bad_arguments_are_named():
    g = GMM([1.0], [[0.0, 0.0]], [np.eye(2)])
    p = Problem([g], [1.0])
    with pytest.raises(ValueError, match="not both"):
        raybary.solve(p, bar_size=1, epsilon=0.1, relative_epsilon=1e-3)
    with pytest.raises(ValueError, match="bar_size must be at least 1"):
        raybary.solve(p, bar_size=0)
    with pytest.raises(ValueError, match="dtype"):
        raybary.solve(p, bar_size=1, dtype="float16")
    with pytest.raises(ValueError, match=r"init of problem 0: expected means \(2, 2\)"):
        raybary.solve(p, bar_size=2, init=[(np.zeros((1, 2)), np.eye(2)[None])])
    bad = Problem([GMM([1.0], [[0.0, 0.0]], [[[1.0, 3.0], [3.0, 1.0]]])], [1.0])
    with pytest.raises(ValueError, match="problem 1, gmm 0, component 0: covariance is not positive definite"):
        raybary.solve([p, bad], bar_size=1)


def test_log_density_matches_scipy():
    from scipy.stats import multivariate_normal as mvn

    rng = np.random.default_rng(2)
    g = GMM([0.2, 0.8, 0.0], rng.normal(size=(3, 3)), np.stack([np.eye(3) * s for s in (1, 2, 3)]))
    x = rng.normal(size=(7, 3))
    want = np.log(sum(w * mvn(m, c).pdf(x) for w, m, c in zip(g.weights[:2], g.means, g.covs)))
    np.testing.assert_allclose(raybary.log_density(g, x), want, rtol=1e-10)
    grid, bounds = raybary.log_density_grid(g, (5, 4), dims=(0, 2), dtype="float64")
    assert grid.shape == (5, 4)
    xs, ys = np.linspace(bounds[0], bounds[1], 4), np.linspace(bounds[2], bounds[3], 5)
    pts = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    idx = [0, 2]
    marg = sum(
        w * mvn(m[idx], c[np.ix_(idx, idx)]).pdf(pts)
        for w, m, c in zip(g.weights[:2], g.means, g.covs)
    )
    np.testing.assert_allclose(grid.ravel(), np.log(marg), rtol=1e-8)
    with pytest.raises(ValueError, match="dims"):
        raybary.log_density_grid(g, (5, 4), dims=(0, 0))


def test_plans_the_dtype_cannot_resolve_stop_the_problem_early(tutorial):
    # Plan solves that end at their iteration cap with a large marginal error
    # (what float32 gives on ill-conditioned problems at small epsilon; forced
    # here by a cap of 2 iterations) used to run every outer iteration to the
    # cap (30,000 plan iterations for one such problem of the ragged
    # benchmark). Now the problem stops after STALL_LIMIT of them, not
    # converged, with finite atoms; a normal solve is unaffected.
    from raybary.solvers.barycenter import STALL_LIMIT, SolverConfig

    p, _ = tutorial[1]
    capped = SolverConfig(plan_max_iterations=2)
    [r] = raybary.solve(p, bar_size=6, epsilon=0.1, config=capped)
    assert not r.converged and r.status == "ok"
    assert r.iterations == STALL_LIMIT
    assert r.extra["plan_iterations"] == STALL_LIMIT * 2
    assert np.all(np.isfinite(r.means)) and np.all(np.isfinite(r.covs))
    [normal] = raybary.solve(p, bar_size=6, epsilon=0.1)
    assert normal.converged and normal.iterations > STALL_LIMIT


def test_compiled_programs_are_dropped_before_memory_maps_run_out(tutorial, monkeypatch):
    # XLA's CPU backend maps each compiled program in ~2,000 pieces; past
    # vm.max_map_count (65,530 by default, ~30 programs) the next compile
    # aborts the process. The guard drops the solver's programs first (forced
    # here with a headroom above the limit), never the caller's own; the
    # solve goes on, the same.
    import jax
    import jax.numpy as jnp

    from raybary.batch import engine as eng

    if eng.memory_maps() is None:
        pytest.skip("this system has no /proc/self/maps")
    p, _ = tutorial[1]
    engine = eng.Engine()
    want = raybary.solve(p, bar_size=6, epsilon=0.1, engine=engine)[0]
    mine = jax.jit(lambda x: jnp.cos(x) * 3.0)
    mine(jnp.ones(3))
    assert mine._cache_size() == 1
    used, limit = eng.memory_maps()
    monkeypatch.setattr(eng, "MAP_HEADROOM", limit + 1)
    engine.keep_map_room()  # the solver's programs' maps go with them
    assert eng.memory_maps()[0] < used - 1000
    assert mine._cache_size() == 1 and engine.cache_clears == 1 and not engine.compiled
    got = raybary.solve(p, bar_size=6, epsilon=0.1, engine=engine)[0]
    assert engine.cache_clears > 1
    np.testing.assert_allclose(got.objective, want.objective, rtol=1e-6)
    np.testing.assert_allclose(got.means, want.means, rtol=1e-5, atol=1e-5)


def test_progress_counts_each_problem_once_across_chunks(tutorial):
    # restarts=3 with batch_size=4: a problem's restarts fall on both sides of
    # chunk boundaries; progress counted problems per chunk and reached 7 of 5
    problems = [p for p, _ in tutorial] + [tutorial[0][0], tutorial[1][0]]
    seen = []
    raybary.solve(problems, bar_size=2, restarts=3, batch_size=4, progress=seen.append)
    assert seen == sorted(seen) and seen[-1] == len(problems) and max(seen) <= len(problems)
    assert len(seen) == 4  # one call per chunk: 15 rows in chunks of 4


def test_batch_size_defaults_to_the_engines_lane_rule(tutorial):
    # batch_size=None: the engine's LaneRule.batch_size (4,096 on a CPU, 2**20
    # on a GPU); the same chunks as the test above when the rule says 4;
    # a batch_size that is not a positive integer is refused
    from raybary.batch.engine import Engine, LaneRule

    problems = [p for p, _ in tutorial] + [tutorial[0][0], tutorial[1][0]]
    seen = []
    engine = Engine(lanes=LaneRule(batch_size=4))
    raybary.solve(problems, bar_size=2, restarts=3, progress=seen.append, engine=engine)
    assert len(seen) == 4 and seen[-1] == len(problems)
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            raybary.solve(problems, bar_size=2, batch_size=bad)


def test_solve_leaves_the_callers_jax_and_engine_state_alone(tutorial):
    # an engine of one's own keeps its own compiled-program table; the default
    # engine is one object; a given config's fields are kept (only the options'
    # learn_weights / max_iterations / tol replace them)
    from raybary.batch.engine import Engine, default_engine
    from raybary.solvers.config import SolverConfig

    p, _ = tutorial[0]
    mine = Engine()
    before = set(default_engine().compiled)
    [r] = raybary.solve(p, bar_size=2, epsilon=0.1, engine=mine, max_iterations=3,
                        config=SolverConfig(plan_max_iterations=50))
    assert mine.compiled and default_engine().compiled == before
    assert default_engine() is default_engine()
    assert r.iterations <= 3
