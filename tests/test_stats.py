"""Mean/std over seeds and the paired bootstrap interval, on synthetic records with known answers."""

import numpy as np
import pytest

from fflora.recipes.stats import mean_std, paired_bootstrap, set_average


def test_mean_std_and_set_average():
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([5.0]) == {"mean": 5.0, "std": 0.0, "n": 1}
    # set x: 1 of 2 right (50%), set y: 3 of 3 right (100%): the sets weigh the same, not the items
    assert set_average(np.array([1, 0, 1, 1, 1.0]), ["x", "x", "y", "y", "y"]) == pytest.approx(75.0)


def test_identical_methods_differ_by_exactly_zero():
    a = np.random.default_rng(0).integers(0, 2, (3, 50))
    result = paired_bootstrap(a, a.copy(), ["s"] * 50, replicates=200)
    assert result["difference"] == 0.0 and not result["excludes_zero"]
    assert result["ci95"][0] <= 0.0 <= result["ci95"][1]


def test_a_method_right_everywhere_beats_one_wrong_everywhere_by_100_points():
    groups = ["x"] * 10 + ["y"] * 30
    result = paired_bootstrap(np.ones((2, 40)), np.zeros((3, 40)), groups, replicates=200)
    assert result["difference"] == 100.0 and result["ci95"] == [100.0, 100.0] and result["excludes_zero"]


def test_the_interval_matches_the_normal_approximation():
    """One set of 400 items, A right on a random half where B is always wrong: 50 +- 1.96 * 100 * sqrt(.25 / 400)."""
    rng = np.random.default_rng(1)
    a = np.zeros((1, 400))
    a[0, rng.permutation(400)[:200]] = 1
    result = paired_bootstrap(a, np.zeros((1, 400)), ["s"] * 400, replicates=4000, seed=2)
    assert result["difference"] == pytest.approx(50.0)
    half_width = 1.96 * 100 * np.sqrt(0.25 / 400)  # 4.9 points
    assert result["ci95"][0] == pytest.approx(50 - half_width, abs=0.8)
    assert result["ci95"][1] == pytest.approx(50 + half_width, abs=0.8)


def test_seed_spread_widens_the_interval():
    """Items identical, seeds disagree: resampling seeds must show the seed-to-seed variation."""
    items = 200
    a = np.zeros((3, items))
    a[0, :80], a[1, :100], a[2, :120] = 1, 1, 1  # 40, 50, 60 %
    b = np.zeros((3, items))
    b[:, :100] = 1  # 50 % every seed
    result = paired_bootstrap(a, b, ["s"] * items, replicates=2000)
    assert result["difference"] == pytest.approx(0.0)
    assert result["ci95"][1] - result["ci95"][0] > 10  # the seeds range over 20 points


def test_mismatched_items_are_refused():
    with pytest.raises(ValueError, match="both methods need the same items: 3 and 4 items"):
        paired_bootstrap(np.ones((1, 3)), np.ones((1, 4)), ["s"] * 3)
