"""raybary.validation: every bad-input class, with its message, on user-built Problems."""

from __future__ import annotations

import numpy as np
import pytest

from raybary.types import GMM, Problem
from raybary.validation import (
    PD_RTOL,
    SYMMETRY_RTOL,
    WEIGHT_SUM_ATOL,
    fmt_number,
    pd_rtol,
    problem_errors,
    problems_errors,
    validate_arrays,
)


def gmm(weights=(0.4, 0.6), d=2, shift=0.0):
    k = len(weights)
    means = np.arange(k * d, dtype=float).reshape(k, d) + shift
    covs = np.stack([np.eye(d) * (1.0 + i) for i in range(k)])
    return GMM(np.array(weights, dtype=float), means, covs)


def problem(*gmms, lambdas=None):
    gmms = gmms or (gmm(), gmm((0.2, 0.3, 0.5)), gmm((1.0,)))
    if lambdas is None:
        lambdas = np.full(len(gmms), 1.0 / len(gmms))
    return Problem(tuple(gmms), np.asarray(lambdas, dtype=float))


def replace(g: GMM, *, weights=None, means=None, covs=None) -> GMM:
    return GMM(
        g.weights.copy() if weights is None else weights,
        g.means.copy() if means is None else means,
        g.covs.copy() if covs is None else covs,
    )


def with_gmm(index: int, new: GMM, lambdas=None) -> Problem:
    base = problem()
    gmms = list(base.gmms)
    gmms[index] = new
    return problem(*gmms, lambdas=base.lambdas if lambdas is None else lambdas)


def error_of(p: Problem, pid: int = 17, **kw) -> str:
    clean, err = problem_errors(p, pid, **kw)
    assert clean is None and err is not None
    return err


def test_valid_problem_is_cleaned():
    base = problem(lambdas=[2.0, 1.0, 1.0])
    covs = base.gmms[0].covs.copy()
    covs[0, 0, 1] += 1e-9  # within the symmetry tolerance
    p = with_gmm(0, replace(base.gmms[0], covs=covs), lambdas=[2.0, 1.0, 1.0])
    clean, err = problem_errors(p, 3)
    assert err is None
    np.testing.assert_allclose(clean.lambdas, [0.5, 0.25, 0.25])
    c = clean.gmms[0].covs
    np.testing.assert_array_equal(c, np.swapaxes(c, -1, -2))
    for g in clean.gmms:
        assert g.weights.sum() == pytest.approx(1.0, abs=1e-15)


def test_float32_rounding_is_accepted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 3, 3))
    covs = (a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(3)).astype(np.float32).astype(np.float64)
    w = rng.dirichlet(np.ones(8)).astype(np.float32).astype(np.float64)
    p = Problem((GMM(w, rng.normal(size=(8, 3)), covs),), np.array([1.0]))
    assert problem_errors(p, 0)[1] is None


@pytest.mark.parametrize(
    "where, new, message",
    [
        (1, lambda g: replace(g, covs=g.covs * np.array([1, 1, -1])[:, None, None]),
         "problem 17, gmm 1, component 2: covariance is not positive definite (smallest eigenvalue -3.0)"),
        (0, lambda g: replace(g, covs=np.stack([np.array([[1.0, 3.0], [3.0, 1.0]]), g.covs[1]])),
         "problem 17, gmm 0, component 0: covariance is not positive definite (smallest eigenvalue -2.0)"),
        (0, lambda g: replace(g, covs=np.stack([g.covs[0], np.array([[1.0, 0.5], [0.0, 1.0]])])),
         "problem 17, gmm 0, component 1: covariance is not symmetric"),
        (2, lambda g: replace(g, covs=np.array([[[1.0, 0.0], [0.0, 1e-14]]])),
         "problem 17, gmm 2, component 0: covariance is numerically singular"),
        (0, lambda g: replace(g, covs=np.stack([g.covs[0], np.full((2, 2), np.nan)])),
         "problem 17, gmm 0, component 1: covariance is not finite"),
        (1, lambda g: replace(g, means=np.where(np.arange(6).reshape(3, 2) == 3, np.inf, g.means)),
         "problem 17, gmm 1, component 1: mean is not finite"),
        (0, lambda g: replace(g, weights=np.array([np.nan, 0.6])),
         "problem 17, gmm 0, component 0: weight is not finite (nan)"),
        (1, lambda g: replace(g, weights=np.array([0.5, 0.7, -0.2])),
         "problem 17, gmm 1, component 2: weight is negative (-0.2)"),
        (1, lambda g: replace(g, weights=np.array([0.2, 0.3, 0.4])),
         "problem 17, gmm 1: weights sum to 0.9, expected 1 within 1e-06"),
        (0, lambda g: replace(g, weights=np.array([0.0, 0.0])),
         "problem 17, gmm 0: no component has positive weight"),
        (0, lambda g: GMM(np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2, 2))),
         "problem 17, gmm 0: has no component"),
    ],
)
def test_component_and_gmm_errors(where, new, message):
    p = with_gmm(where, new(problem().gmms[where]))
    assert error_of(p).startswith(message)


@pytest.mark.parametrize(
    "lambdas, message",
    [
        ([0.5, np.nan, 0.5], "problem 17, gmm 1: lambda is not finite (nan)"),
        ([0.5, 0.6, -0.1], "problem 17, gmm 2: lambda is negative (-0.1)"),
        ([0.0, 0.0, 0.0], "problem 17: lambdas are all zero"),
        ([np.inf, 0.0, 0.0], "problem 17, gmm 0: lambda is not finite (inf)"),
    ],
)
def test_lambda_errors(lambdas, message):
    assert error_of(problem(*problem().gmms, lambdas=lambdas)) == message


def test_no_gmm_and_zero_dimension():
    assert error_of(Problem((), np.zeros(0))) == "problem 17: has no GMM"
    empty_d = GMM(np.ones(1), np.zeros((1, 0)), np.zeros((1, 0, 0)))
    assert "problem 17: dimension d is 0" in error_of(Problem((empty_d,), np.ones(1)))


def test_renormalize_flag():
    p = with_gmm(1, replace(problem().gmms[1], weights=np.array([2.0, 3.0, 5.0])))
    assert "weights sum to 10.0" in error_of(p)
    clean, err = problem_errors(p, 17, renormalize=True)
    assert err is None
    np.testing.assert_allclose(clean.gmms[1].weights, [0.2, 0.3, 0.5])
    # renormalising never hides negative weights or an all-zero GMM
    bad = with_gmm(1, replace(problem().gmms[1], weights=np.array([2.0, -1.0, 5.0])))
    assert "weight is negative" in error_of(bad, renormalize=True)


def test_weight_tolerance_boundary():
    inside = with_gmm(0, replace(problem().gmms[0], weights=np.array([0.4, 0.6 + 0.5 * WEIGHT_SUM_ATOL])))
    outside = with_gmm(0, replace(problem().gmms[0], weights=np.array([0.4, 0.6 + 3 * WEIGHT_SUM_ATOL])))
    assert problem_errors(inside, 1)[1] is None
    assert "weights sum to" in error_of(outside)


def test_symmetry_and_pd_tolerances():
    c = np.array([[[2.0, 1.0], [1.0 + 0.5 * SYMMETRY_RTOL * 2.0, 2.0]]])
    ok = Problem((GMM(np.ones(1), np.zeros((1, 2)), c),), np.ones(1))
    assert problem_errors(ok, 1)[1] is None
    tiny = np.array([[[1.0, 0.0], [0.0, 10 * PD_RTOL]]])
    assert problem_errors(Problem((GMM(np.ones(1), np.zeros((1, 2)), tiny),), np.ones(1)), 1)[1] is None


def test_several_errors_are_joined_with_locations():
    g = replace(problem().gmms[1], weights=np.array([-1.0, np.nan, -2.0]))
    err = error_of(with_gmm(1, g, lambdas=[1.0, -1.0, 0.5]), pid=5)
    parts = err.split("; ")
    assert parts[0] == "problem 5, gmm 1: lambda is negative (-1.0)"
    assert parts[1] == "problem 5, gmm 1, component 0: weight is negative (-1.0)"
    assert parts[2] == "problem 5, gmm 1, component 1: weight is not finite (nan)"
    assert parts[3] == "and 1 more error"


def test_gmm_labels_name_the_gmms():
    p = with_gmm(1, replace(problem().gmms[1], weights=np.array([0.5, 0.7, -0.2])))
    err = error_of(p, gmm_labels=[10, 20, 30])
    assert err.startswith("problem 17, gmm 20, component 2: weight is negative")


def test_fmt_number():
    assert fmt_number(-2.0) == "-2.0"
    assert fmt_number(0.1) == "0.1"
    assert fmt_number(1e-14) == "1e-14"
    assert fmt_number(float("nan")) == "nan"


def test_validate_arrays_agrees_with_problem_errors():
    rng = np.random.default_rng(1)
    problems = []
    for _ in range(30):
        gs = []
        for _ in range(rng.integers(1, 4)):
            k = int(rng.integers(1, 4))
            a = rng.normal(size=(k, 2, 2))
            covs = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(2)
            if rng.random() < 0.2:
                covs[0] = -covs[0]
            w = rng.dirichlet(np.ones(k))
            if rng.random() < 0.2:
                w = w * 1.1
            gs.append(GMM(w, rng.normal(size=(k, 2)), covs))
        problems.append(Problem(tuple(gs), rng.dirichlet(np.ones(len(gs)))))
    gmms = [g for p in problems for g in p.gmms]
    out = validate_arrays(
        problem_ids=np.arange(30) + 100,
        gmm_offset=np.concatenate([[0], np.cumsum([p.n_gmms for p in problems])]),
        lambdas=np.concatenate([p.lambdas for p in problems]),
        comp_offset=np.concatenate([[0], np.cumsum([g.n_components for g in gmms])]),
        weights=np.concatenate([g.weights for g in gmms]),
        means=np.concatenate([g.means for g in gmms]),
        covs=np.concatenate([g.covs for g in gmms]),
    )
    n_bad = 0
    for i, p in enumerate(problems):
        clean, err = problem_errors(p, 100 + i)
        assert out.errors[i] == err
        n_bad += err is not None
        if err is None:
            np.testing.assert_allclose(out.problem(i).gmms[0].covs, clean.gmms[0].covs)
    assert 0 < n_bad < 30


def test_pd_tolerance_depends_on_the_solve_dtype():
    # Ratio 1e-8: representable in float64, not in float32 (entries rounded to
    # float32 move the eigenvalues by ~6e-8 x the largest).
    ill = Problem((GMM(np.ones(1), np.zeros((1, 2)), np.array([[[1.0, 0.0], [0.0, 1e-8]]])),),
                  np.ones(1))
    assert pd_rtol("float64") == PD_RTOL
    assert 1e-6 < pd_rtol("float32") < 1e-5
    assert problem_errors(ill, 3)[1] is None
    err = problem_errors(ill, 3, dtype="float32")[1]
    assert err.startswith("problem 3, gmm 0, component 0: covariance is numerically singular")
    assert "float64" in err
    assert problems_errors([ill, problem()], dtype="float32")[1] is None
    assert problems_errors([ill], dtype="float32")[0] == err.replace("problem 3", "problem 0")
    # Singular even in float64: no advice to switch precision.
    hopeless = problem_errors(
        Problem((GMM(np.ones(1), np.zeros((1, 2)), np.array([[[1.0, 0.0], [0.0, 1e-14]]])),),
                np.ones(1)), 3, dtype="float32")[1]
    assert "numerically singular" in hopeless and "float64" not in hopeless
    # raybary.solve checks with its own dtype before compiling anything.
    import raybary

    with pytest.raises(ValueError, match="problem 0, gmm 0, component 0: covariance is numerically"):
        raybary.solve([ill], bar_size=1, dtype="float32")


def test_stored_covariance_forms_name_their_field():
    """Covariances read from a diagonal or spherical store: the same rules, messages
    that name ``cov_diag`` / ``cov_spherical`` and quote variances, not eigenvalues."""
    variances = np.array([[1.0, 2.0], [1.0, -2.0], [np.nan, 1.0], [1e-15, 1.0], [0.0, 0.0]])
    covs = np.zeros((5, 2, 2))
    covs[:, [0, 1], [0, 1]] = variances
    args = dict(problem_ids=np.arange(5) + 40, gmm_offset=np.arange(6),
                lambdas=np.ones(5), comp_offset=np.arange(6), weights=np.ones(5),
                means=np.zeros((5, 2)), covs=covs)
    full = validate_arrays(**args).errors
    diag = validate_arrays(**args, covariance_type="diag").errors
    assert full[0] is None and diag[0] is None
    assert full[1] == "problem 41, gmm 0, component 0: covariance is not positive definite " \
                      "(smallest eigenvalue -2.0)"
    assert diag[1] == "problem 41, gmm 0, component 0: cov_diag has a non-positive variance (-2.0)"
    assert diag[2] == "problem 42, gmm 0, component 0: cov_diag is not finite"
    assert diag[3] == "problem 43, gmm 0, component 0: cov_diag is numerically singular " \
                      "(smallest variance 1e-15, largest 1.0)"
    assert diag[4] == "problem 44, gmm 0, component 0: cov_diag has a non-positive variance (0.0)"
    # cleaned covariances are the same whatever the form
    np.testing.assert_array_equal(validate_arrays(**args, covariance_type="diag").covs[0], covs[0])

    sph = np.zeros((3, 2, 2))
    sph[:, [0, 1], [0, 1]] = np.array([2.0, -1.0, np.inf])[:, None]
    args.update(problem_ids=np.arange(3), gmm_offset=np.arange(4), lambdas=np.ones(3),
                comp_offset=np.arange(4), weights=np.ones(3), means=np.zeros((3, 2)), covs=sph)
    assert validate_arrays(**args, covariance_type="spherical").errors == [
        None,
        "problem 1, gmm 0, component 0: cov_spherical is not positive (-1.0)",
        "problem 2, gmm 0, component 0: cov_spherical is not finite (inf)",
    ]
    with pytest.raises(ValueError, match="covariance_type must be one of"):
        validate_arrays(**args, covariance_type="tied")
