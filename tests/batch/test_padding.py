"""raybary.batch.padding: shape classes and exact padding (NumPy only, no JAX)."""

from __future__ import annotations

import numpy as np

from raybary.batch.padding import (
    Bucket,
    block_class,
    bucket_of,
    bucket_size,
    next_pow2,
    pad_problems,
)
from raybary.types import GMM, Problem


def gmm(k, d, shift):
    rng = np.random.default_rng(k * 10 + d)
    covs = np.stack([np.eye(d) * (0.5 + i) for i in range(k)])
    return GMM(np.full(k, 1.0 / k), rng.normal(size=(k, d)) + shift, covs)


def test_size_classes():
    assert [next_pow2(x) for x in (0, 1, 2, 3, 5, 16, 17)] == [1, 1, 2, 4, 8, 16, 32]
    assert [bucket_size(x) for x in (1, 2, 3, 4, 5, 7, 9, 13, 17)] == [1, 2, 3, 4, 6, 8, 12, 16, 24]
    # d 4 and 5 share a class (padded with N(0, 1) dimensions); J, L, K coarse.
    p = Problem((gmm(2, 4, 0.0), gmm(5, 4, 1.0)), np.array([0.5, 0.5]))
    assert bucket_of(p, 3) == Bucket(d=5, n=3, J=3, L=12, K=6)
    big = Problem(tuple(gmm(8, 2, j) for j in range(6)), np.full(6, 1 / 6))
    assert bucket_of(big, 5) == Bucket(d=2, n=6, J=6, L=48, K=8)
    assert [block_class(k) for k in (1, 4, 5, 6, 7, 9, 13)] == [4, 4, 6, 6, 8, 12, 16]


def test_the_newton_system_is_solved_per_block_where_that_pays():
    from raybary.solvers.plans import blocks_pay

    assert blocks_pay(6, 12, 3, 6)       # the tutorial's (2, 3, 5) in blocks of 6
    assert not blocks_pay(6, 12, 3, 8)   # blocks of 8 cost about the whole 12 x 12
    assert not blocks_pay(6, 12, 1, 12)  # one GMM: the whole system is its block
    assert blocks_pay(6, 24, 6, 8)       # too large to unroll


def test_pad_problems_masks_blocks_and_normalisation():
    p0 = Problem((gmm(2, 2, 100.0), gmm(3, 2, 103.0)), np.array([0.25, 0.75]))
    p1 = Problem((gmm(1, 2, -5.0),), np.array([1.0]))
    bucket = Bucket(d=3, n=4, J=3, L=12, K=4)
    keys = np.array([[1, 2], [3, 4]], np.uint32)
    out, norm = pad_problems([p0, p1], [3, 2], bucket, 4, epsilons=[0.1, 0.2],
                             relative_epsilon=False, inits=[None, None], keys=keys,
                             dtype=np.dtype("float64"))
    assert out["weights"].shape == (4, 12) and out["covs"].shape == (4, 12, 3, 3)
    np.testing.assert_array_equal(out["atom_mask"][:2].sum(axis=1), [3, 2])
    np.testing.assert_array_equal(out["gmm_index"][0, :5], [0, 0, 1, 1, 1])
    assert (out["weights"][0, 5:] == 0).all() and (out["lambdas"][0, 2:] == 0).all()
    # block_index: the k-th component of GMM j, L (= 12) past the GMM's end.
    np.testing.assert_array_equal(out["block_index"][0, :2], [[0, 1, 12, 12], [2, 3, 4, 12]])
    # The padded third dimension is N(0, 1) in every component.
    np.testing.assert_array_equal(out["means"][0, :5, 2], 0.0)
    np.testing.assert_array_equal(out["covs"][0, :5, 2], [[0, 0, 1]] * 5)
    # Undoing the normalisation gives the data back; the mass-weighted centre
    # is at 0 and the second moment is 1 in solver coordinates.
    c, s = norm.center[0, :2], norm.scale[0]
    means = np.concatenate([g.means for g in p0.gmms])
    np.testing.assert_allclose(out["means"][0, :5, :2] * s + c, means)
    mass = out["weights"][0, :5] * out["lambdas"][0, out["gmm_index"][0, :5]]
    mass = mass / mass.sum()
    np.testing.assert_allclose(mass @ out["means"][0, :5, :2], 0.0, atol=1e-12)
    second = mass @ (np.sum(out["means"][0, :5, :2] ** 2, axis=1)
                     + np.trace(out["covs"][0, :5, :2, :2], axis1=1, axis2=2))
    np.testing.assert_allclose(second, 1.0)
    # An absolute epsilon is in squared data units: divided by scale^2.
    np.testing.assert_allclose(out["epsilon"][:2], [0.1 / s**2, 0.2 / norm.scale[1] ** 2])
    # The components' covariance roots, computed once here.
    np.testing.assert_allclose(out["comp_sqrt"] @ out["comp_sqrt"], out["covs"], atol=1e-12)
    # Filler rows repeat problem 0.
    np.testing.assert_array_equal(out["weights"][2], out["weights"][0])
    np.testing.assert_array_equal(out["key"][:2], keys)
