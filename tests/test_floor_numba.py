"""benchmarks/floor_numba.py, the machine floor of ``bench_speed.py``: the
numba loops compute what raybary's Newton step computes. XLA's
``newton_init`` + k ``newton_step`` and the numba version, on the same batch,
agree to float32 rounding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from raybary.solvers import plans as pl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: (components per GMM, slots, atoms)
    "tutorial": ((2, 3, 5), 12, 6),  # bench_speed's floor: one whole 12 x 12 solve in XLA
    "unpadded": ((4, 1, 3), 8, 5),
    "blocks": ((5, 6, 4), 16, 8),  # more than 12 slots: XLA solves per block
}


@pytest.fixture(scope="module")
def floor():
    spec = importlib.util.spec_from_file_location("floor_numba",
                                                  ROOT / "benchmarks" / "floor_numba.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_XLA: dict = {}


def xla(name, cost, log_a, log_b, steps, epsilon, epsilon_start):
    """raybary's own ``newton_init`` and ``steps`` x ``newton_step``, vmapped."""
    ks, slots, n = LAYOUTS[name]
    J, L = len(ks), sum(ks)
    gmm_index = jnp.asarray(np.concatenate([np.repeat(np.arange(J), ks),
                                            np.zeros(slots - L, int)]), jnp.int32)
    comp = jnp.arange(slots) < L
    member = (gmm_index[None, :] == jnp.arange(J)[:, None]) & comp[None, :]
    options = pl.PlanOptions(tol=0.0)
    if name not in _XLA:
        @jax.jit
        def run(cost, log_a, log_b, steps, epsilon, epsilon_start):
            def one(c):
                geo = pl.plan_geometry(log_a, log_b, gmm_index, member, jnp.ones(J, c.dtype),
                                       jnp.ones(n, bool))
                state = pl.init_state(c, jnp.zeros((J, n), c.dtype), jnp.zeros(slots, c.dtype),
                                      geo.log_a, gmm_index)
                loop = pl.newton_init(state, geo, epsilon, epsilon_start, options)
                loop = jax.lax.fori_loop(
                    0, steps, lambda _, s: pl.newton_step(s, geo, epsilon, options), loop)
                return dict(f=loop.f, g=loop.g, error=loop.error, step=loop.step,
                            reduced=loop.reduced, epsilon=loop.epsilon)
            return jax.vmap(one)(cost)
        _XLA[name] = run
    f32 = np.float32
    out = _XLA[name](cost, log_a, log_b, steps, f32(epsilon), f32(epsilon_start))
    return {k: np.asarray(v) for k, v in out.items()}


def both(floor, name, steps, epsilon, epsilon_start=None, width=64, seed=3):
    ks, slots, n = LAYOUTS[name]
    cost, log_a, log_b, offsets, sizes = floor.tutorial_batch(ks, width, slots, n, seed=seed)
    start = epsilon if epsilon_start is None else epsilon_start
    ref = xla(name, cost, log_a, log_b, steps, epsilon, start)
    ours = floor.solve(cost, log_a, log_b, offsets, sizes, epsilon=epsilon, epsilon_start=start,
                       steps=steps)
    return ref, ours, sum(ks)


def assert_close(ref, ours, L, atol=1e-5):
    """Potentials, errors, the next proposal and the reduced cost on the real slots."""
    np.testing.assert_array_equal(ours["epsilon"], ref["epsilon"])
    np.testing.assert_allclose(ours["f"], ref["f"], rtol=0, atol=atol)
    np.testing.assert_allclose(ours["g"][:, :L], ref["g"][:, :L], rtol=0, atol=atol)
    np.testing.assert_allclose(ours["error"], ref["error"], rtol=0, atol=atol)
    np.testing.assert_allclose(ours["step"][:, :L], ref["step"][:, :L], rtol=1e-3, atol=atol)
    np.testing.assert_allclose(ours["reduced"][..., :L], ref["reduced"][..., :L], rtol=0,
                               atol=atol)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("steps", [0, 1, 5, 20])
def test_newton_steps_match_xla(floor, name, steps):
    """At the tutorial's epsilon the whole trajectory agrees to float32 rounding
    (measured: at most 4e-6 on costs of order 1): the same accepted steps, the
    same damping, the same proposals."""
    ref, ours, L = both(floor, name, steps, epsilon=0.1)
    assert_close(ref, ours, L)
    if steps == 20:  # solved, both
        assert ours["error"].max() < 1e-5 and ref["error"].max() < 1e-5


@pytest.mark.parametrize("steps", [2, 4, 8, 15])
def test_epsilon_schedule_matches_xla(floor, steps):
    """epsilon-scaling from 0.5 to 0.1: the level changes on the same steps."""
    ref, ours, L = both(floor, "tutorial", steps, epsilon=0.1, epsilon_start=0.5)
    assert_close(ref, ours, L)
    if steps == 2:
        assert np.all(ref["epsilon"] > np.float32(0.1))  # still above the target
    if steps == 15:
        assert np.all(ref["epsilon"] == np.float32(0.1))


def test_floor_epsilon_solves_the_same_plans(floor):
    """At the floor's epsilon (1e-2) the Newton systems of many problems are
    near singular, so one step's proposal depends on rounding (XLA's own
    float32 and float64 part after one step on about 15% of these problems)
    and the potentials drift along directions that move no mass: what both
    must agree on is the plans they solve to."""
    eps = 1e-2
    ref, ours, L = both(floor, "tutorial", 150, epsilon=eps, width=128)
    solved_ref, solved_ours = ref["error"].max(1) <= 1e-5, ours["error"].max(1) <= 1e-5
    assert solved_ref.mean() > 0.95 and solved_ours.mean() > 0.95
    solved = solved_ref & solved_ours
    plan_ref = np.exp(-ref["reduced"][solved][..., :L].astype(np.float64) / eps)
    plan_ours = np.exp(-ours["reduced"][solved][..., :L].astype(np.float64) / eps)
    l1 = np.abs(plan_ref - plan_ours).sum(axis=(1, 2))
    # measured: all but one of ~125 problems within 5e-6; that one 2e-3, its
    # potentials drifted to |f| ~ 3e3 in both (float32 spacing 2e-4 there) and
    # its plans differ by 2e-4 around a cycle of entries that no marginal sees
    assert np.mean(l1 < 1e-5) > 0.95 and l1.max() < 1e-2


def test_parallel_is_the_serial_loop(floor):
    cost, log_a, log_b, offsets, sizes = floor.tutorial_batch(width=37, seed=5)
    kw = dict(epsilon=0.05, epsilon_start=0.5, steps=12)
    serial = floor.solve(cost, log_a, log_b, offsets, sizes, **kw)
    parallel = floor.solve(cost, log_a, log_b, offsets, sizes, parallel=True, **kw)
    for key in serial:
        np.testing.assert_array_equal(parallel[key], serial[key])


def test_layout_and_floor(floor):
    offsets, sizes = floor.layout([0, 0, 1, 1, 1, 2, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0])
    assert offsets.tolist() == [0, 2, 5] and sizes.tolist() == [2, 3, 1]
    with pytest.raises(ValueError, match="contiguous"):
        floor.layout([0, 1, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="last"):
        floor.layout([0, 0, 1], [1, 0, 1])
    us = floor.numba_floor(width=32, iterations=5)
    assert np.isfinite(us) and us > 0
