"""The machine's floor for a Newton step of the plan solver: a plain compiled loop.

``raybary.solvers.plans.newton_step`` (with ``newton_init``), written again
as plain numba ``@njit`` loops over problems: one problem at a time, all of
its steps, in small work arrays allocated once per thread (nothing allocated
per step), float32 throughout. ``bench_speed.py`` reports raybary's wall time
per needed iteration as a multiple of this floor, beside XLA's own bare
Newton step (``newton_floor`` there), measured in the same run.

The arithmetic is the solver's, in the same order where it matters:

* rows exact (``_exact_rows``): per GMM and atom, a max and a sum of
  ``exp(-reduced / eps - max)``, ``df = eps (log a - log mu)``;
* columns (``_columns``): per component the max over atoms, the scaled
  exponentials, the log column sum, the plan, the residual ``b - P^T 1`` and
  each GMM's L1 error;
* the acceptance test (gain against ``armijo`` times the predicted gain, or
  a lower error; finite ``df`` and error), the damping update (4x down to
  ``damping``, 16x up to 1e4) and the epsilon schedule (down by ``decay``
  once every plan's error is at most ``level_tol``);
* the Jacobi-scaled direction (``_newton_direction``): ``((1 + tau) I -
  Q^T Q + u u^T) y = u (log b - log c)`` by Gauss-Jordan elimination without
  pivoting, ``eps y / u`` (Sinkhorn's step on underflowed columns).

The one difference in the work done: the Newton system is solved per GMM
block (``K_j x K_j``), where the solver, at up to 12 slots, eliminates the
whole block-diagonal ``L x L`` system at once (``_solve_whole``). Both do
the same operations on each block's entries (the other rows of the whole
system are updated by exact zeros), so the results agree to rounding: the
extra work of the whole system is XLA's choice, not the problem's.

"In registers" as far as numba allows: the work arrays of a problem (about
2 KB) are allocated once per thread and stay in L1; numba keeps arrays in
memory, not registers. No fast-math (the solver's NaN/inf tests must
survive; fast-math gained ~10% here). Where one step's ~1.9 us go on the
2-core AMD EPYC this was written on: about half in the ~140 scalar ``expf``
calls (no vector math library: replacing them by a multiply-add halves the
step), about a quarter in the Newton direction (Jacobi scaling, ``Q^T Q``,
the block solves).

Agreement with XLA (``tests/test_floor_numba.py``): at the tutorial's
epsilon (0.1) potentials, errors, proposals and reduced costs agree to a few
1e-6 after 0, 1, 5 and 20 steps, epsilon-scaling included. At the floor's
epsilon (1e-2) many problems' Newton systems are near singular, so a
proposal depends on rounding (XLA's own float32 and float64 runs part on
~15% of the problems after one step): there the plans both solve to agree.

Layout: ``cost (B, n, L)`` float32 with the components of GMM ``j`` in the
contiguous slots ``offsets[j] : offsets[j] + sizes[j]`` (slots past the last
GMM are padding and are ignored); every atom is real and every GMM has a
positive lambda. :func:`layout` gets ``offsets, sizes`` from the solver's
``gmm_index`` and component mask. Needs numba (the ``bench`` or ``test``
extra)::

    python benchmarks/floor_numba.py            # both floors on the tutorial batch
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np
from numba import njit, prange

F32 = np.float32
ZERO, HALF, ONE = F32(0.0), F32(0.5), F32(1.0)
QUARTER, SIXTEEN, DAMPING_MAX = F32(0.25), F32(16.0), F32(1e4)
NEG_INF = F32(-np.inf)
TINY = F32(np.finfo(np.float32).tiny ** 0.5)  # the solver's live-column threshold on sqrt(c)
CHUNK = 16  # problems per task of the parallel loop

# No fast-math: the floor runs the solver's arithmetic (and its NaN/inf tests) as written.
_jit = njit(cache=False, fastmath=False, error_model="numpy", boundscheck=False)


def layout(gmm_index, comp_mask) -> tuple[np.ndarray, np.ndarray]:
    """``offsets, sizes`` of each GMM's components in the solver's flat layout
    (``gmm_index (L,)``, ``comp_mask (L,)``); each GMM's components must be
    contiguous and in GMM order, padded slots last."""
    gmm_index, comp_mask = np.asarray(gmm_index), np.asarray(comp_mask, bool)
    real = int(comp_mask.sum())
    if not comp_mask[:real].all():
        raise ValueError("padded components must come last")
    idx = gmm_index[:real]
    if real and np.any(np.diff(idx) < 0):
        raise ValueError("each GMM's components must be contiguous, in GMM order")
    sizes = np.bincount(idx, minlength=int(idx.max()) + 1 if real else 0).astype(np.int64)
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), sizes


@_jit
def _nan_max(m, z):
    """``max`` as ``jnp.max`` takes it: a NaN wins."""
    return z if (z > m or z != z) else m


@_jit
def _rows(R, s, o, k, eps, log_a, Rt, df):
    """GMM block ``o : o + k``: ``Rt = R - s`` with the rows made exact
    (``_exact_rows``); ``df (n,)`` the change of ``f``. ``Rt`` holds
    ``-(R - s) / eps`` on the way (each quotient is taken once)."""
    n = R.shape[0]
    for i in range(n):
        zmax = NEG_INF
        for c in range(k):
            z = -(R[i, o + c] - s[o + c]) / eps
            Rt[i, c] = z
            zmax = _nan_max(zmax, z)
        if not math.isfinite(zmax):
            zmax = ZERO
        total = ZERO
        for c in range(k):
            total += math.exp(Rt[i, c] - zmax)
        log_mu = math.log(total) + zmax if total > ZERO else ZERO
        d = eps * (log_a[i] - log_mu)
        df[i] = d
        for c in range(k):
            Rt[i, c] = (R[i, o + c] - s[o + c]) - d


@_jit
def _columns(Rt, o, k, eps, b, Pt, rt, lct):
    """Plan ``Pt``, residual ``rt``, log column sums ``lct`` of the block
    (``_columns``); returns its L1 column error."""
    n = Rt.shape[0]
    err = ZERO
    for c in range(k):
        top = NEG_INF
        for i in range(n):
            z = -Rt[i, c] / eps
            Pt[i, c] = z
            top = _nan_max(top, z)
        if not math.isfinite(top):
            top = ZERO
        total = ZERO
        for i in range(n):
            e = math.exp(Pt[i, c] - top)
            Pt[i, c] = e
            total += e
        lct[c] = math.log(total) + top if total > ZERO else ZERO
        scale = math.exp(top)
        colsum = ZERO
        for i in range(n):
            p = Pt[i, c] * scale
            Pt[i, c] = p
            colsum += p
        r = b[o + c] - colsum
        rt[c] = r
        err += abs(r)
    return err


@_jit
def _direction(P, lc, o, k, tau, eps, root_a, log_b, st, q, u, v, aug, row):
    """The block's Newton proposal ``st[o : o + k]`` (``_newton_direction``
    with the block's Gauss-Jordan solve, ``gauss_jordan_solve``)."""
    n = P.shape[0]
    for c in range(k):
        v[c] = log_b[o + c] - lc[o + c]
        u[c] = math.exp(HALF * lc[o + c])
        live = u[c] > TINY
        for i in range(n):
            q[i, c] = P[i, o + c] / (root_a[i] * u[c]) if live else ZERO
    diag = ONE + tau
    for c1 in range(k):
        for c2 in range(k):
            qq = ZERO
            for i in range(n):
                qq += q[i, c1] * q[i, c2]
            coupling = qq - u[c1] * u[c2]
            aug[c1, c2] = (diag if c1 == c2 else ZERO) - coupling
        aug[c1, k] = u[c1] * v[c1]
    for p in range(k):
        pivot = aug[p, p]
        for c in range(k + 1):
            row[c] = aug[p, c] / pivot
        for r in range(k):
            factor = aug[r, p] - (ONE if r == p else ZERO)
            for c in range(k + 1):
                aug[r, c] = aug[r, c] - factor * row[c]
    for c in range(k):
        d = aug[c, k] / u[c] if u[c] > TINY else v[c]
        st[o + c] = eps * d


@_jit
def _workspace(n, L, J, kmax):
    """Everything one problem's loop touches, allocated once per thread."""
    f32 = np.float32
    return (np.empty((n, L), f32), np.empty((n, L), f32), np.empty((n, kmax), f32),
            np.empty((n, kmax), f32), np.empty((n, kmax), f32), np.empty(n, f32),
            np.empty(L, f32), np.empty(L, f32), np.empty(L, f32),
            np.empty(kmax, f32), np.empty(kmax, f32), np.empty(kmax, f32), np.empty(kmax, f32),
            np.empty((kmax, kmax + 1), f32), np.empty(kmax + 1, f32), np.empty(J, f32),
            np.empty(J, f32))


@_jit
def _problem(cost, log_a, root_a, a, log_b, b, offsets, sizes, eps_target, eps_start, steps,
             damping, armijo, level_tol, decay, ws, f, g, error, step, reduced):
    """``newton_init`` and ``steps`` x ``newton_step`` of one problem from zero
    potentials; writes ``f (J, n)``, ``g (L,)``, ``error (J,)``, the next
    proposal ``step (L,)`` and the reduced cost ``(n, L)``; returns epsilon."""
    R, P, Rt, Pt, q, df, res, lc, st, rt, lct, u, v, aug, row, err, tau = ws
    n, L = cost.shape
    J = sizes.shape[0]
    for i in range(n):
        for l in range(L):
            R[i, l] = cost[i, l]
    for l in range(L):
        g[l] = ZERO
        st[l] = ZERO
        res[l] = ZERO
        lc[l] = ZERO
    eps = max(eps_start, eps_target)
    # newton_init: rows exact, columns, first proposal
    for j in range(J):
        o, k = offsets[j], sizes[j]
        _rows(R, st, o, k, eps, log_a, Rt, df)
        err[j] = _columns(Rt, o, k, eps, b, Pt, rt, lct)
        for i in range(n):
            f[j, i] = df[i]
            for c in range(k):
                R[i, o + c] = Rt[i, c]
                P[i, o + c] = Pt[i, c]
        for c in range(k):
            res[o + c] = rt[c]
            lc[o + c] = lct[c]
        tau[j] = damping
        _direction(P, lc, o, k, damping, eps, root_a, log_b, st, q, u, v, aug, row)
    for _ in range(steps):
        worst = err[0]
        for j in range(1, J):
            worst = _nan_max(worst, err[j])
        down = worst <= level_tol and eps > eps_target
        if down:  # next level: proposals dropped, every step accepted
            eps = max(eps_target, eps * decay)
            for l in range(L):
                st[l] = ZERO
        for j in range(J):
            o, k = offsets[j], sizes[j]
            _rows(R, st, o, k, eps, log_a, Rt, df)
            e_new = _columns(Rt, o, k, eps, b, Pt, rt, lct)
            gain = ZERO
            finite = True
            for i in range(n):
                gain += a[i] * df[i]
                finite = finite and math.isfinite(df[i])
            bstep = ZERO
            predicted = ZERO
            for c in range(k):
                bstep += b[o + c] * st[o + c]
                predicted += res[o + c] * st[o + c]
            gain = gain + bstep
            better = (gain >= armijo * predicted and gain >= ZERO) or e_new < err[j]
            if down or (finite and math.isfinite(e_new) and better):
                for i in range(n):
                    f[j, i] = f[j, i] + df[i]
                    for c in range(k):
                        R[i, o + c] = Rt[i, c]
                        P[i, o + c] = Pt[i, c]
                for c in range(k):
                    g[o + c] = g[o + c] + st[o + c]
                    res[o + c] = rt[c]
                    lc[o + c] = lct[c]
                err[j] = e_new
                tau[j] = max(tau[j] * QUARTER, damping)
            else:
                tau[j] = min(tau[j] * SIXTEEN, DAMPING_MAX)
            _direction(P, lc, o, k, tau[j], eps, root_a, log_b, st, q, u, v, aug, row)
    for j in range(J):
        error[j] = err[j]
    for l in range(L):
        step[l] = st[l]
        for i in range(n):
            reduced[i, l] = R[i, l]
    return eps


@_jit
def _serial(cost, log_a, log_b, offsets, sizes, eps_target, eps_start, steps, damping, armijo,
            level_tol, decay, f, g, error, step, reduced, epsilon):
    B, n, L = cost.shape
    J = sizes.shape[0]
    root_a, a, b = np.sqrt(np.exp(log_a)), np.exp(log_a), np.exp(log_b)
    ws = _workspace(n, L, J, max(1, sizes.max()))
    for p in range(B):
        epsilon[p] = _problem(cost[p], log_a, root_a, a, log_b, b, offsets, sizes, eps_target,
                              eps_start, steps, damping, armijo, level_tol, decay, ws, f[p],
                              g[p], error[p], step[p], reduced[p])


@njit(cache=False, fastmath=False, error_model="numpy", boundscheck=False, parallel=True)
def _parallel(cost, log_a, log_b, offsets, sizes, eps_target, eps_start, steps, damping, armijo,
              level_tol, decay, f, g, error, step, reduced, epsilon):
    B, n, L = cost.shape
    J = sizes.shape[0]
    root_a, a, b = np.sqrt(np.exp(log_a)), np.exp(log_a), np.exp(log_b)
    kmax = max(1, sizes.max())
    chunks = (B + CHUNK - 1) // CHUNK
    for t in prange(chunks):
        ws = _workspace(n, L, J, kmax)
        for p in range(t * CHUNK, min(B, (t + 1) * CHUNK)):
            epsilon[p] = _problem(cost[p], log_a, root_a, a, log_b, b, offsets, sizes,
                                  eps_target, eps_start, steps, damping, armijo, level_tol,
                                  decay, ws, f[p], g[p], error[p], step[p], reduced[p])


def solve(cost, log_a, log_b, offsets, sizes, *, epsilon, epsilon_start=None, steps=0,
          damping=1e-6, armijo=0.1, level_tol=1e-3, decay=0.3, parallel=False) -> dict:
    """``newton_init`` and ``steps`` Newton steps of every problem of ``cost (B, n, L)``
    from zero potentials (the options are ``PlanOptions``'). Returns ``f (B, J, n)``,
    ``g (B, L)`` (0 on padded slots), ``error (B, J)``, the next proposal ``step (B, L)``,
    the reduced cost ``reduced (B, n, L)`` (the plans are ``exp(-reduced / epsilon)``
    on the real slots) and ``epsilon (B,)``, float32."""
    cost = np.ascontiguousarray(cost, np.float32)
    B, n, L = cost.shape
    offsets = np.ascontiguousarray(offsets, np.int64)
    sizes = np.ascontiguousarray(sizes, np.int64)
    J = len(sizes)
    if J == 0 or len(offsets) != J or offsets.min() < 0 or (offsets + sizes).max() > L:
        raise ValueError("offsets and sizes must describe GMM blocks within L slots")
    out = dict(f=np.zeros((B, J, n), np.float32), g=np.zeros((B, L), np.float32),
               error=np.zeros((B, J), np.float32), step=np.zeros((B, L), np.float32),
               reduced=np.zeros((B, n, L), np.float32), epsilon=np.zeros(B, np.float32))
    start = epsilon if epsilon_start is None else epsilon_start
    fn = _parallel if parallel else _serial
    with numba.parallel_chunksize(1):  # tasks of CHUNK problems, dealt out as threads free up
        fn(cost, np.ascontiguousarray(log_a, np.float32), np.ascontiguousarray(log_b, np.float32),
           offsets, sizes, F32(epsilon), F32(start), int(steps), F32(damping), F32(armijo),
           F32(level_tol), F32(decay), out["f"], out["g"], out["error"], out["step"],
           out["reduced"], out["epsilon"])
    return out


def tutorial_batch(ks=(2, 3, 5), width=1024, pad_to=12, n=6, seed=1):
    """The batch of ``bench_speed.newton_floor``: uniform costs ``(width, n,
    pad_to)``, uniform atom weights, each GMM's components of equal weight."""
    L = sum(ks)
    slots = pad_to or L
    cost = np.random.default_rng(seed).uniform(0, 1, (width, n, slots)).astype(np.float32)
    sizes = np.asarray(ks, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    log_b = np.zeros(slots, np.float32)
    log_b[:L] = np.log(1.0 / np.repeat(sizes, sizes))
    log_a = np.full(n, -np.log(n), np.float32)
    return cost, log_a, log_b, offsets, sizes


def numba_floor(ks=(2, 3, 5), width=1024, pad_to=12, n=6, iterations=200,
                parallel=False) -> float:
    """Microseconds per problem of one Newton step as a plain compiled loop, on the
    batch of ``bench_speed.newton_floor`` (same shapes, costs, epsilon 1e-2, no
    level change), one core or (``parallel``) every core numba uses."""
    cost, log_a, log_b, offsets, sizes = tutorial_batch(ks, width, pad_to, n)
    kw = dict(epsilon=1e-2, steps=iterations, parallel=parallel)
    solve(cost, log_a, log_b, offsets, sizes, **kw)  # compile and warm
    t = time.perf_counter()
    solve(cost, log_a, log_b, offsets, sizes, **kw)
    return (time.perf_counter() - t) / iterations / width * 1e6


def threads() -> int:
    """Threads of numba's parallel loop."""
    return numba.get_num_threads()


if __name__ == "__main__":
    print(f"numba {numba.__version__}: one core {numba_floor():.3f} us per problem-step, "
          f"{threads()} threads {numba_floor(parallel=True):.3f} us")
