r"""Initialisation of the barycenter's atoms.

k-means++ seeding (Arthur & Vassilvitskii 2007) over the input components,
with the Bures–Wasserstein cost as the squared distance and the mass
:math:`\lambda_{j(l)} w_l` of each component as its weight: the first atom is
drawn with probability proportional to the mass, each next one proportional to
mass times the cost to the nearest atom drawn so far. When every component
with mass is already an atom (``n`` larger than the number of distinct
components), draws fall back to the mass alone, and an atom drawn on a
component that is already an atom has its mean jittered by a tenth of the
component's standard deviation: exact copies would get identical plans and
stay copies for ever.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from raybary.geometry.bures import bures_cost

__all__ = ["kmeanspp_init", "mass_init"]


def _mass(weights, lambdas, gmm_index):
    """Mass :math:`\\lambda_{j(l)} w_l` of each component (the weights alone if all lambdas are 0)."""
    mass = jnp.where(weights > 0, weights * lambdas[gmm_index], 0.0)
    return jnp.where(jnp.sum(mass) > 0, mass, jnp.where(weights > 0, weights, 0.0))


def _logits(score):
    """``log score``, ``-inf`` where the score is not positive."""
    return jnp.where(score > 0, jnp.log(jnp.where(score > 0, score, 1.0)), -jnp.inf)


def kmeanspp_init(
    key: jax.Array,
    weights: jnp.ndarray,
    means: jnp.ndarray,
    covs: jnp.ndarray,
    lambdas: jnp.ndarray,
    gmm_index: jnp.ndarray,
    n: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Draw ``n`` atoms ``(means (n, d), covs (n, d, d))`` from the flat components.

    Args:
      key: PRNG key.
      weights, means, covs: the flat components ``(L,)``, ``(L, d)``, ``(L, d, d)``;
        padded components have weight 0.
      lambdas: barycentric weights ``(J,)``.
      gmm_index: GMM of each component ``(L,)``.
      n: number of atoms (static).
    """
    mass = _mass(weights, lambdas, gmm_index)

    def step(carry, _):
        dmin, key = carry
        score = jnp.where(jnp.isfinite(dmin), mass * dmin, mass)
        score = jnp.where(jnp.sum(score) > 0, score, mass)
        key, sub, jit = jax.random.split(key, 3)
        idx = jax.random.categorical(sub, _logits(score))
        # Exactly 0 at idx: the self-cost can round to a few ulps above 0.
        d = bures_cost(means[idx][None], covs[idx][None], means, covs).at[idx].set(0.0)
        copy = jnp.isfinite(dmin[idx]) & (dmin[idx] <= 0)
        sd = jnp.sqrt(jnp.maximum(jnp.trace(covs[idx]) / means.shape[-1], 0.0))
        shift = jnp.where(copy, 0.1 * sd, 0.0) * jax.random.normal(jit, means.shape[-1:], means.dtype)
        return (jnp.minimum(dmin, d), key), (idx, shift)

    dmin0 = jnp.full(weights.shape, jnp.inf, dtype=weights.dtype)
    _, (idx, shift) = jax.lax.scan(step, (dmin0, key), None, length=n)
    return means[idx] + shift, covs[idx]


def mass_init(
    key: jax.Array,
    weights: jnp.ndarray,
    means: jnp.ndarray,
    covs: jnp.ndarray,
    lambdas: jnp.ndarray,
    gmm_index: jnp.ndarray,
    n: int,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``n`` components drawn with replacement, proportionally to their mass
    :math:`\\lambda_{j(l)} w_l`, means jittered by half a standard deviation.

    Unlike k-means++ it puts several atoms on a heavy component and none on
    light ones; restarts alternate between the two (arguments as
    :func:`kmeanspp_init`).
    """
    k1, k2 = jax.random.split(key)
    idx = jax.random.categorical(k1, _logits(_mass(weights, lambdas, gmm_index)), shape=(n,))
    sd = jnp.sqrt(jnp.maximum(jnp.trace(covs[idx], axis1=-2, axis2=-1) / means.shape[-1], 0.0))
    noise = jax.random.normal(k2, (n, means.shape[-1]), means.dtype)
    return means[idx] + 0.5 * sd[:, None] * noise, covs[idx]
