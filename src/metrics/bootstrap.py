"""Uncertainty over images: percentile-bootstrap intervals of a mean and paired tests of two systems.

Every function here is seeded and reproducible from its arguments alone (a fresh
``numpy.random.default_rng(seed)`` per call), vectorised (resample means are one fancy-indexing pass per
block of resamples, never a Python loop over resamples), and ignores non-finite values (a NaN score is
a missing image, not a zero).

* ``bootstrap_ci(x)``: percentile bootstrap 95 % interval of ``mean(x)`` over images (Efron &
  Tibshirani ch. 13). Resample ``b`` draws ``n`` indices with replacement; the interval is the
  2.5th / 97.5th percentile of the ``n_boot`` resample means.
* ``paired_test(x, y)``: two systems scored on the *same* images (``x[i]``, ``y[i]`` belong to image
  ``i``). The statistic is the mean difference ``mean(x − y)``; its interval is the percentile bootstrap
  of the per-image differences (images resampled, pairs kept together), and its p-value is a two-sided
  sign-flip permutation test (under H0 "the two systems are exchangeable on every image" each
  difference's sign is a fair coin): ``p = (1 + #{|mean(s·d)| ≥ |mean(d)|}) / (1 + n_perm)``.

The tests (``tests/test_bootstrap.py``) check that the interval covers a known mean at ~95 % and that
the paired test holds its level under H0 and rejects a real shift.
"""

from __future__ import annotations

import math

import numpy as np

BOOT_N = 1000
BOOT_SEED = 0
LEVEL = 0.95
_BLOCK_ELEMS = 2**20  # indices drawn per block: bounds memory to ~8 MB


def finite(values) -> np.ndarray:
    """The finite entries of ``values`` as a float64 vector."""
    x = np.asarray(values, dtype=np.float64).ravel()
    return x[np.isfinite(x)]


def bootstrap_means(x: np.ndarray, n_boot: int = BOOT_N, seed: int = BOOT_SEED) -> np.ndarray:
    """``n_boot`` resample means of ``x`` (float64 vector, no NaN), reproducible from (x, n_boot, seed).

    ``rng = np.random.default_rng(seed)``; indices are drawn in blocks of ``B = max(1, 2**20 // n)``
    resamples, in order: ``rng.integers(0, n, size=(min(B, resamples left), n))``; resample b's mean is
    ``x[idx_b].mean()``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMS // max(x.size, 1))
    return np.concatenate([x[rng.integers(0, x.size, size=(min(block, n_boot - s), x.size))].mean(axis=1)
                           for s in range(0, n_boot, block)])


def bootstrap_ci(values, n_boot: int = BOOT_N, seed: int = BOOT_SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite ``values``.

    The interval is ``np.percentile(bootstrap_means(x), [50·(1−level), 50·(1+level)])`` (linear
    interpolation). ``(NaN, NaN)`` when there is no finite value.
    """
    x = finite(values)
    if x.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(bootstrap_means(x, n_boot, seed), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def sign_flip_p(d: np.ndarray, n_perm: int = BOOT_N, seed: int = BOOT_SEED) -> float:
    """Two-sided sign-flip permutation p-value of ``mean(d) = 0`` for paired differences ``d``.

    ``p = (1 + #{b: |mean(s_b · d)| >= |mean(d)|}) / (1 + n_perm)`` with ``s_b`` uniform random signs
    (``rng.integers(0, 2, ...)`` in blocks as in ``bootstrap_means``); 1.0 when every difference is 0.
    """
    d = finite(d)
    if d.size == 0:
        return math.nan
    obs = abs(d.mean())
    if not np.any(d):
        return 1.0
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMS // d.size)
    hits = 0
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))  # equal statistics must count as "as extreme"
    for s in range(0, n_perm, block):
        signs = rng.integers(0, 2, size=(min(block, n_perm - s), d.size)) * 2 - 1
        hits += int((np.abs((signs * d).mean(axis=1)) >= obs - tol).sum())
    return (1 + hits) / (1 + n_perm)


def paired_test(x, y, n_boot: int = BOOT_N, seed: int = BOOT_SEED, level: float = LEVEL) -> dict[str, float]:
    """Compare two systems scored on the same images (``x[i]``, ``y[i]`` of image i).

    Pairs with a non-finite member are left out. Returns ``n`` (pairs used), ``mean_a`` / ``mean_b``
    (means over those pairs), ``diff`` = mean(x − y), ``diff_ci95_lo`` / ``diff_ci95_hi`` (percentile
    bootstrap over images of the differences) and ``p_perm`` (two-sided sign-flip permutation test with
    ``n_boot`` permutations, same seed).
    """
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test needs equal lengths, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size == 0:
        nan = math.nan
        return {"n": 0, "mean_a": nan, "mean_b": nan, "diff": nan, "diff_ci95_lo": nan, "diff_ci95_hi": nan,
                "p_perm": nan}
    d = a - b
    lo, hi = bootstrap_ci(d, n_boot, seed, level)
    return {"n": int(a.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "diff": float(d.mean()),
            "diff_ci95_lo": lo, "diff_ci95_hi": hi, "p_perm": sign_flip_p(d, n_boot, seed)}
