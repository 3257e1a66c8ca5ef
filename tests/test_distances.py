"""raybary.mw2 / mw2_batch: closed forms, invariances, POT's exact loss, plans, errors.

Shapes are kept few (dimensions 1, 2, 3, 5; components padded to 4 or 8;
batches of 8), so the module compiles a handful of programs.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import raybary
from raybary import GMM
from raybary.batch.distances import DEFAULT_MW2_RELATIVE_EPSILON, mw2, mw2_batch

DIMS = (1, 2, 3, 5)


def random_gmm(rng, d: int, k: int, shift: float = 0.0) -> GMM:
    w = rng.dirichlet(np.ones(k))
    m = rng.normal(size=(k, d)) * 3.0 + shift
    a = rng.normal(size=(k, d, d))
    return GMM(w, m, a @ a.transpose(0, 2, 1) / d + 0.3 * np.eye(d))


def ragged_pairs(seed: int, n: int) -> list[tuple[GMM, GMM]]:
    rng = np.random.default_rng(seed)
    return [(random_gmm(rng, DIMS[i % 4], int(rng.integers(1, 9))),
             random_gmm(rng, DIMS[i % 4], int(rng.integers(1, 9)), shift=1.0))
            for i in range(n)]


def gaussian(mean, var_diag) -> GMM:
    mean = np.asarray(mean, float)
    return GMM(np.ones(1), mean[None], np.diag(np.asarray(var_diag, float))[None])


def test_single_gaussians_closed_form():
    # Commuting covariances: W2^2 = |m1 - m2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    cases = [(gaussian([0.5], [2.0]), gaussian([-1.0], [0.5])),
             (gaussian([1.0, 2.0], [1.0, 4.0]), gaussian([-2.0, 0.0], [9.0, 0.25]))]
    got = mw2_batch(cases)
    want = [np.sum((a.means[0] - b.means[0]) ** 2)
            + np.sum((np.sqrt(np.diag(a.covs[0])) - np.sqrt(np.diag(b.covs[0]))) ** 2)
            for a, b in cases]
    assert want == pytest.approx([1.5**2 + (np.sqrt(2) - np.sqrt(0.5)) ** 2,
                                  9 + 4 + 4 + 2.25])
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_identical_mixtures_are_near_zero_and_scale_as_squares():
    a, b = ragged_pairs(3, 2)[1]  # d = 2
    values = mw2_batch([(a, a), (a, b), (b, b)])
    # Only epsilon's blur is left: far below the distance to another mixture.
    assert values[0] < 1e-4 * values[1] and values[2] < 1e-4 * values[1]
    assert values[0] >= 0 and values[2] >= 0
    # MW2 is translation invariant and scales as s**2.
    s, t = 7.0, np.array([100.0, -50.0])
    moved = [GMM(g.weights, s * g.means + t, s**2 * g.covs) for g in (a, b)]
    assert mw2(*moved) == pytest.approx(s**2 * values[1], rel=1e-4)


def test_symmetric_and_invariant_to_permuting_components():
    rng = np.random.default_rng(5)
    pairs = ragged_pairs(5, 4)
    swapped = [(b, a) for a, b in pairs]

    def shuffled(g: GMM) -> GMM:
        p = rng.permutation(g.n_components)
        return GMM(g.weights[p], g.means[p], g.covs[p])

    permuted = [(shuffled(a), shuffled(b)) for a, b in pairs]
    values = mw2_batch(pairs + swapped + permuted)
    base, sw, pe = values[:4], values[4:8], values[8:]
    np.testing.assert_allclose(sw, base, rtol=1e-4)
    np.testing.assert_allclose(pe, base, rtol=1e-4)


def test_matches_pot_exact_loss_on_ragged_pairs():
    pytest.importorskip("ot")
    from tests.reference import pot_mw2

    pairs = ragged_pairs(11, 12)
    exact = np.array([pot_mw2(a, b) for a, b in pairs])
    got = mw2_batch(pairs)
    np.testing.assert_allclose(got, exact, rtol=1e-3)
    # Closer as epsilon goes down: a coarse epsilon is measurably further off.
    coarse = mw2_batch(pairs, relative_epsilon=100 * DEFAULT_MW2_RELATIVE_EPSILON)
    err, err_coarse = np.abs(got - exact) / exact, np.abs(coarse - exact) / exact
    assert err.max() < err_coarse.max()
    assert np.all(coarse >= exact * (1 - 1e-5))  # the blurred plan costs at least the optimum


def test_absolute_epsilon_and_float64():
    pytest.importorskip("ot")
    from tests.reference import pot_mw2

    pairs = ragged_pairs(13, 2)  # d = 1 and 2
    exact = np.array([pot_mw2(a, b) for a, b in pairs])
    np.testing.assert_allclose(mw2_batch(pairs, dtype="float64"), exact, rtol=1e-6)
    # An absolute epsilon in squared data units: large blurs, small converges.
    np.testing.assert_allclose(mw2_batch(pairs, epsilon=1e-4), exact, rtol=1e-3)
    assert np.all(mw2_batch(pairs, epsilon=10.0) > exact * (1 + 1e-3))


def test_a_pair_the_fast_schedule_stalls_on_is_solved_again():
    # Pair 14 of these d = 2 pairs (K = 5 and 6): the plan solver's default
    # epsilon-scaling (x0.2 per level) stalls at marginal error 0.32 in float64.
    pytest.importorskip("ot")
    from tests.reference import pot_mw2

    rng = np.random.default_rng(2)
    pairs = [(random_gmm(rng, 2, int(rng.integers(1, 9))),
              random_gmm(rng, 2, int(rng.integers(1, 9)), shift=1.0)) for _ in range(15)]
    a, b = pairs[14]
    assert (a.n_components, b.n_components) == (5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = mw2(a, b, dtype="float64")
    assert value == pytest.approx(pot_mw2(a, b), rel=1e-6)
    # Capped at one iteration, no schedule can solve it: a warning names the pair.
    with pytest.warns(RuntimeWarning, match=r"pairs \[0\] did not reach"):
        mw2(a, b, dtype="float64", max_iterations=1)


def test_debiased_is_the_sinkhorn_divergence():
    pairs = ragged_pairs(23, 8)  # d = 1, 2, 3, 5
    a, b = next(p for p in pairs if p[0].n_components >= 3)
    copy = GMM(a.weights.copy(), a.means.copy(), a.covs.copy())
    values = mw2_batch([(a, a), (a, copy), (a, b), (b, a)], debiased=True)
    plain = mw2(a, b)
    # Identical mixtures (the same object or an equal copy): 0 up to rounding,
    # where the plain value keeps epsilon's blur.
    assert abs(values[0]) <= 1e-6 * plain and abs(values[1]) <= 1e-6 * plain
    assert values[2] == pytest.approx(values[3], rel=1e-5)  # symmetric
    # Well-separated pairs: close to the plain value (the blur terms are small), >= 0.
    debiased, plain_all = mw2_batch(pairs, debiased=True), mw2_batch(pairs)
    np.testing.assert_allclose(debiased, plain_all, rtol=1e-3)
    assert np.all(debiased >= 0)
    # One Gaussian each side: the plan is the product, KL = 0, the self terms
    # are 0, so the divergence is W2^2 exactly.
    g1, g2 = gaussian([0.5, 1.0], [2.0, 1.0]), gaussian([-1.0, 0.0], [0.5, 3.0])
    w2 = 1.5**2 + 1.0 + (np.sqrt(2) - np.sqrt(0.5)) ** 2 + (1 - np.sqrt(3)) ** 2
    assert mw2(g1, g2, debiased=True) == pytest.approx(w2, rel=1e-5)


def test_plans_have_the_shapes_and_marginals_of_the_pairs():
    pairs = ragged_pairs(17, 6)
    values, plans = mw2_batch(pairs, plans=True)
    assert values.shape == (6,) and len(plans) == 6
    for (a, b), plan, value in zip(pairs, plans, values):
        assert plan.shape == (a.n_components, b.n_components)
        assert np.all(plan >= 0)
        np.testing.assert_allclose(plan.sum(axis=1), a.weights, atol=2e-5)
        np.testing.assert_allclose(plan.sum(axis=0), b.weights, atol=2e-5)
        cost = np.array([[float(mw2(GMM(np.ones(1), a.means[i:i + 1], a.covs[i:i + 1]),
                                    GMM(np.ones(1), b.means[j:j + 1], b.covs[j:j + 1])))
                          for j in range(b.n_components)] for i in range(a.n_components)])
        assert np.sum(plan * cost) == pytest.approx(value, rel=1e-4)
        break  # one pair's cost matrix is enough (each entry is a solve)


def test_bad_inputs_name_the_pair_and_field():
    a, b = ragged_pairs(19, 1)[0]
    bad_w = GMM(np.r_[-0.5, 1.5], np.zeros((2, 1)), np.ones((2, 1, 1)))
    with pytest.raises(ValueError, match=r"pair 1, b, component 0: weight is negative"):
        mw2_batch([(a, b), (a, bad_w)])
    other = ragged_pairs(19, 2)[1][0]  # d = 2
    with pytest.raises(ValueError, match=r"pair 0: a and b differ in dimension \(a: 1, b: 2\)"):
        mw2(a, other)
    with pytest.raises(ValueError, match=r"pair 0: must be an \(a, b\) pair"):
        mw2_batch([a])
    with pytest.raises(ValueError, match="not both"):
        mw2(a, b, epsilon=0.1, relative_epsilon=1e-3)
    with pytest.raises(ValueError, match="max_iterations"):
        mw2(a, b, max_iterations=0)


def test_lazy_exports():
    assert raybary.mw2 is mw2 and raybary.mw2_batch is mw2_batch
    empty = mw2_batch([])
    assert empty.shape == (0,) and empty.dtype == np.float64


def test_docs_examples_run():
    from tests.docs_blocks import ROOT, blocks

    code = [c for info, c in blocks(ROOT / "docs" / "distances.md") if info == "python"]
    assert code
    namespace: dict = {}
    for block in code:
        exec(compile(block, "docs/distances.md", "exec"), namespace)


def test_accuracy_benchmark_runs(capsys):
    pytest.importorskip("ot")
    import importlib.util

    from tests.docs_blocks import ROOT

    spec = importlib.util.spec_from_file_location("bench_mw2", ROOT / "benchmarks" / "bench_mw2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--pairs", "4", "--eps", "1e-3", "--dtypes", "float32", "--no-tutorial"])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    errors = [float(x) for x in row.strip("|").split("|")[1:]]
    assert row.startswith("| 0.001 |") and len(errors) == 2 and max(errors) < 0.1
