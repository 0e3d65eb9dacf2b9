"""Rank correlations between a generalization measure and a generalization target, as pure NumPy/SciPy functions.

- Kendall's τ-b (``scipy.stats.kendalltau``): for pairs of trials (a, b),
  τ_b = Σ sign(x_a − x_b)·sign(y_a − y_b) / sqrt(#pairs not tied in x · #pairs not tied in y);
  without ties it is Jiang et al.'s τ = (C − D)/(n(n−1)/2).
- Spearman's ρ: Pearson's correlation of the (average-tie) ranks.
- Granulated τ (Jiang, Neyshabur, Mobahi, Krishnan, Bengio 2019, "Fantastic generalization measures and where to
  find them", arXiv 1912.02178, §4, eq. 4): for hyperparameter i,

      ψ_i = (1/m_i) Σ_{θ_{−i}} τ({(μ(θ), g(θ)) : θ_i ∈ Θ_i, θ_{−i} fixed}),

  the mean, over the m_i settings θ_{−i} of the *other* hyperparameters, of τ across the trials that differ only in
  hyperparameter i; Ψ = (1/n) Σ_i ψ_i. Groups where τ is undefined (one trial, or all its measures or all its
  targets equal) are left out of the mean, and the number of groups used is reported.
- Percentile bootstrap confidence intervals: resample the trials with replacement (``numpy.random.default_rng``
  seeded), recompute every statistic, take the (α/2, 1 − α/2) percentiles.

A resampled trial that appears w times enters each pair sum with weight w_a·w_b (its copies are tied with each other,
so they count in neither the numerator nor the untied-pair counts), which is exactly τ-b of the resampled multiset;
this lets one bootstrap replicate of every group be a few vectorised sums.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse as _sparse
from scipy import stats as _sp

#: overall-τ bootstraps use the vectorised pair sums up to this many pairs (n ≈ 450), scipy per replicate above
_MAX_PAIRS = 100_000
_CHUNK = 4_000_000  # pair weights evaluated at once (replicates × pairs)


def _finite(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.isfinite(x) & np.isfinite(y)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of the pairs where both ``x`` and ``y`` are finite; NaN when undefined (< 2 pairs, constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = _finite(x, y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(_sp.kendalltau(x[ok], y[ok]).statistic)


def kendall_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided p-value of τ-b = 0 (scipy's exact/asymptotic choice); NaN when τ is undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = _finite(x, y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(_sp.kendalltau(x[ok], y[ok]).pvalue)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ of the pairs where both are finite; NaN when undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = _finite(x, y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return float("nan")
    return float(_sp.spearmanr(x[ok], y[ok]).statistic)


# ---- pair sums ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pairs:
    """Trial pairs (a < b) with a group id each (``groups`` groups); τ-b of a group is a sum over its pairs."""

    a: np.ndarray
    b: np.ndarray
    group: np.ndarray
    groups: int


def all_pairs(n: int) -> Pairs:
    """Every pair of ``n`` trials, as one group (the overall τ)."""
    a, b = np.triu_indices(n, 1)
    return Pairs(a, b, np.zeros(len(a), dtype=np.int64), 1)


def codes(values: Sequence) -> np.ndarray:
    """Integer codes of hyperparameter values (equal values, equal codes; NaN/None one code of their own)."""
    keys = [repr(v) if not (isinstance(v, float) and np.isnan(v)) else "nan" for v in values]
    _, inverse = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    return inverse.astype(np.int64)


def group_pairs(hparams: Mapping[str, Sequence], name: str) -> Pairs:
    """Pairs of trials whose hyperparameters other than ``name`` are all equal, grouped by those other values."""
    cols = [codes(v) for k, v in hparams.items() if k != name]
    n = len(next(iter(hparams.values())))
    if cols:
        _, gid = np.unique(np.stack(cols, axis=1), axis=0, return_inverse=True)
        gid = gid.reshape(-1)
    else:
        gid = np.zeros(n, dtype=np.int64)
    a_all, b_all, g_all = [], [], []
    used = 0
    for g in np.unique(gid):
        members = np.flatnonzero(gid == g)
        if len(members) < 2:
            continue
        ia, ib = np.triu_indices(len(members), 1)
        a_all.append(members[ia])
        b_all.append(members[ib])
        g_all.append(np.full(len(ia), used, dtype=np.int64))
        used += 1
    if not a_all:
        empty = np.zeros(0, dtype=np.int64)
        return Pairs(empty, empty, empty, 0)
    return Pairs(np.concatenate(a_all), np.concatenate(b_all), np.concatenate(g_all), used)


def weighted_group_tau(x: np.ndarray, y: np.ndarray, pairs: Pairs, weights: np.ndarray) -> np.ndarray:
    """τ-b of every group for each row of ``weights`` (replicates × trials, trial multiplicities): (replicates ×
    groups), NaN where a group has no untied pair in x or in y. Trials with a non-finite x or y get weight 0."""
    weights = np.atleast_2d(np.asarray(weights, float)) * _finite(x, y)
    out = np.full((weights.shape[0], pairs.groups), np.nan)
    if pairs.groups == 0:
        return out
    xa, xb = np.nan_to_num(x[pairs.a]), np.nan_to_num(x[pairs.b])
    ya, yb = np.nan_to_num(y[pairs.a]), np.nan_to_num(y[pairs.b])
    sx, sy = np.sign(xa - xb), np.sign(ya - yb)
    terms = np.stack([sx * sy, np.abs(sx), np.abs(sy)])  # 3 × pairs
    member = _sparse.csr_matrix((np.ones(len(pairs.group)), (pairs.group, np.arange(len(pairs.group)))))
    step = max(1, _CHUNK // max(1, len(pairs.a)))
    for lo in range(0, weights.shape[0], step):
        w = weights[lo : lo + step]
        pw = w[:, pairs.a] * w[:, pairs.b]  # replicates × pairs
        s, tx, ty = (np.asarray(member @ (pw * t).T).T for t in terms)  # each replicates × groups
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + step] = np.where((tx > 0) & (ty > 0), s / np.sqrt(tx * ty), np.nan)
    return out


# ---- granulated τ -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Granulated:
    """Jiang et al.'s granulated τ: ψ_i per hyperparameter, the number of groups each mean is over, and Ψ."""

    psi: dict[str, float]
    groups: dict[str, int]
    Psi: float


def _mean(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over finite entries (NaN where none), without numpy's empty-slice warning."""
    ok = np.isfinite(values)
    n = ok.sum(axis=axis)
    total = np.where(ok, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, total / np.maximum(n, 1), np.nan)


def granulated_tau(
    x: Sequence[float], y: Sequence[float], hparams: Mapping[str, Sequence], nuisance: Collection[str] = ()
) -> Granulated:
    """ψ_i for every hyperparameter in ``hparams`` (name → one value per trial) and Ψ = mean of the defined ψ_i
    over the hyperparameters not in ``nuisance``.

    Trials with a non-finite ``x`` or ``y`` are left out. A hyperparameter without any group of two comparable
    trials (e.g. drawn at random, so no two trials share the other values) has ψ_i = NaN and 0 groups. A nuisance
    key (the seed) still fixes the groups of the others and gets its own ψ (how a measure follows the gap from seed
    to seed), but it is not a hyperparameter of the study, so it is left out of Ψ (Jiang et al. 2019 average over
    the hyperparameter axes only).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ones = np.ones((1, len(x)))
    psi, groups = {}, {}
    for name in hparams:
        taus = weighted_group_tau(x, y, group_pairs(hparams, name), ones)[0]
        psi[name] = float(_mean(taus))
        groups[name] = int(np.isfinite(taus).sum())
    vals = np.array([v for k, v in psi.items() if k not in nuisance], float)
    return Granulated(psi, groups, float(_mean(vals)) if vals.size else float("nan"))


# ---- bootstrap ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Correlation:
    """Point estimates with percentile bootstrap intervals (``(lo, hi)``; NaN without bootstrap) for one measure."""

    n: int
    tau: float
    tau_p: float
    tau_ci: tuple[float, float]
    rho: float
    rho_ci: tuple[float, float]
    granulated: Granulated
    Psi_ci: tuple[float, float]
    psi_ci: dict[str, tuple[float, float]] = field(default_factory=dict)


def resample_weights(n: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates × n) multiplicities of ``n`` trials drawn with replacement, seeded."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(replicates, n))
    w = np.zeros((replicates, n))
    np.add.at(w, (np.repeat(np.arange(replicates), n), idx.ravel()), 1.0)
    return w


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    s = samples[np.isfinite(samples)]
    if s.size == 0:
        return (float("nan"), float("nan"))
    q = 100 * (1 - level) / 2
    lo, hi = np.percentile(s, [q, 100 - q])
    return (float(lo), float(hi))


def _boot_tau(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = len(x)
    if n * (n - 1) // 2 <= _MAX_PAIRS:
        return weighted_group_tau(x, y, all_pairs(n), w)[:, 0]
    out = np.empty(len(w))
    for r, wr in enumerate(w):
        idx = np.repeat(np.arange(n), wr.astype(int))
        out[r] = kendall_tau(x[idx], y[idx])
    return out


def _boot_rho(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    n = len(x)
    out = np.empty(len(w))
    step = max(1, _CHUNK // max(1, n))
    for lo in range(0, len(w), step):
        wr = w[lo : lo + step].astype(int)
        idx = np.stack([np.repeat(np.arange(n), r) for r in wr])
        rx, ry = _sp.rankdata(x[idx], axis=1), _sp.rankdata(y[idx], axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + step] = np.where(den > 0, (rx * ry).sum(axis=1) / den, np.nan)
    return out


def correlate(
    x: Sequence[float],
    y: Sequence[float],
    hparams: Mapping[str, Sequence],
    bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    nuisance: Collection[str] = (),
) -> Correlation:
    """τ-b (with its p-value), Spearman's ρ and the granulated τ of measure ``x`` against target ``y``, each with a
    percentile bootstrap interval over ``bootstrap`` resamples of the trials where both are finite (seeded: the same
    inputs give the same intervals). ``bootstrap=0`` skips the intervals (NaN). ``nuisance``: keys of ``hparams``
    left out of Ψ (:func:`granulated_tau`)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = _finite(x, y)
    xs, ys = x[ok], y[ok]
    hp = {k: [v for v, keep in zip(vals, ok) if keep] for k, vals in hparams.items()}
    gran = granulated_tau(xs, ys, hp, nuisance) if hp else Granulated({}, {}, float("nan"))
    nan2 = (float("nan"), float("nan"))
    result = dict(
        n=int(ok.sum()),
        tau=kendall_tau(xs, ys),
        tau_p=kendall_p(xs, ys),
        rho=spearman_rho(xs, ys),
        granulated=gran,
        tau_ci=nan2,
        rho_ci=nan2,
        Psi_ci=nan2,
        psi_ci={k: nan2 for k in hp},
    )
    if bootstrap <= 0 or len(xs) < 3:
        return Correlation(**result)
    w = resample_weights(len(xs), bootstrap, seed)
    result["tau_ci"] = _interval(_boot_tau(xs, ys, w), level)
    result["rho_ci"] = _interval(_boot_rho(xs, ys, w), level)
    if hp:
        psis = np.stack([_mean(weighted_group_tau(xs, ys, group_pairs(hp, k), w)) for k in hp], axis=1)
        result["psi_ci"] = {k: _interval(psis[:, i], level) for i, k in enumerate(hp)}
        # Ψ of a replicate: the mean of the ψ_i that are defined in the point estimate (same terms as Ψ itself)
        defined = [i for i, k in enumerate(hp) if np.isfinite(gran.psi[k]) and k not in nuisance]
        result["Psi_ci"] = _interval(_mean(psis[:, defined]), level) if defined else nan2
    return Correlation(**result)
