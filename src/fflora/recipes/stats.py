"""Statistics for comparing methods: mean and spread over seeds, and a paired bootstrap interval.

The accuracy study compares two methods evaluated on the same test items, each trained with
several seeds. `paired_bootstrap` resamples the items (the same draw for both methods, within
each data set, so every set keeps its weight) and, independently per method, the seeds; the
interval is the 2.5th-97.5th percentile of the resampled differences.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (0 for one value), with the count."""
    values = list(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def set_average(values: np.ndarray, groups: Sequence[str], scale: float = 100.0) -> float:
    """The mean over data sets of each set's mean value, times `scale`: `values` is (items,) (0/1
    correctness: accuracy in %, with the default scale; a loss per item: scale 1), `groups` names
    each item's set."""
    groups = np.asarray(groups)
    return scale * float(np.mean([values[groups == g].mean() for g in dict.fromkeys(groups.tolist())]))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, groups: Sequence[str], replicates: int = 10000,
                     seed: int = 0, scale: float = 100.0) -> dict:
    """Difference of set-averaged values, method A minus method B, with a 95% bootstrap interval.

    `a` and `b` are arrays of shape (seeds, items): each row one trained seed, the columns the same
    test items in the same order for both methods (0/1 correctness, reported in percentage points
    with the default scale; or a per-item loss with scale 1); `groups` names each item's data set.
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=float)), np.atleast_2d(np.asarray(b, dtype=float))
    groups = np.asarray(groups)
    if a.shape[1] != b.shape[1] or a.shape[1] != len(groups):
        raise ValueError(f"both methods need the same items: {a.shape[1]} and {b.shape[1]} items, {len(groups)} groups")
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    diffs = np.empty(replicates)
    for k in range(replicates):
        rows_a = a[rng.integers(0, len(a), len(a))].mean(axis=0)  # per-item accuracy over resampled seeds
        rows_b = b[rng.integers(0, len(b), len(b))].mean(axis=0)
        per_set = []
        for idx in members:
            pick = idx[rng.integers(0, len(idx), len(idx))]
            per_set.append(rows_a[pick].mean() - rows_b[pick].mean())
        diffs[k] = scale * np.mean(per_set)
    observed = set_average(a.mean(axis=0), groups, scale) - set_average(b.mean(axis=0), groups, scale)
    low, high = np.percentile(diffs, [2.5, 97.5])
    return {"difference": observed, "ci95": [float(low), float(high)], "replicates": replicates,
            "excludes_zero": bool(low > 0 or high < 0)}
