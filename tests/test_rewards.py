"""foa_jax.rewards against hand-computed pools (Eq. 3–7 worked by hand), scipy's Spearman, pyiqa's declared metric
directions and a direct NumPy loop over random pools."""

import dataclasses
import importlib.util
import math
import pathlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from foa_jax import rewards as R

# --------------------------------------------------------------------------------------------------------------------
# A 3-candidate pool worked out by hand
#
#   candidate   psnr   lpips  musiq  niqe      s̃ psnr  s̃ lpips  s̃ musiq  s̃ niqe     R_F     R_A    R_H
#   0           20.0   0.30   60     5.0       0       0.5      0.5      2/3        0.25    7/12   5/12
#   1           22.0   0.20   50     6.0       1       1        0        0          1       0      1/2
#   2           21.5   0.40   70     4.5       0.75    0        1        1          0.375   1      11/16
#
# (lpips and niqe negated first: lpips −0.3, −0.2, −0.4 → range 0.2; niqe −5, −6, −4.5 → range 1.5.)
# Faithful: winner 1, loser 0, gap 0.75.  Aesthetic: winner 2, loser 1, gap 1.  Hybrid: winner 2, loser 0,
# gap 11/16 − 5/12 = 13/48.  Ranks R_F (1, 3, 2), R_A (2, 1, 3): ρ = −1 / sqrt(2·2) = −0.5.
# R_F(w_F) − R_F(w_A) = 1 − 0.375 = 0.625;  R_A(w_A) − R_A(w_F) = 1 − 0 = 1.

HAND_NAMES = ("psnr", "lpips", "musiq", "niqe")
HAND_POOL = np.array(
    [
        [20.0, 0.30, 60.0, 5.0],
        [22.0, 0.20, 50.0, 6.0],
        [21.5, 0.40, 70.0, 4.5],
    ]
)
HAND_CONFIG = R.RewardConfig(faithful_metrics=("psnr", "lpips"), aesthetic_metrics=("musiq", "niqe"))
ATOL32 = 1e-6


def test_hand_pool_normalisation_and_rewards():
    normalised = R.minmax_normalise(R.align_directions(HAND_POOL, HAND_NAMES), HAND_CONFIG.eps)
    expected = np.array([[0, 0.5, 0.5, 2 / 3], [1, 1, 0, 0], [0.75, 0, 1, 1]])
    np.testing.assert_allclose(normalised, expected, atol=ATOL32)

    rewards = R.profile_rewards(HAND_POOL, HAND_NAMES, HAND_CONFIG)
    np.testing.assert_allclose(rewards.faithful, [0.25, 1, 0.375], atol=ATOL32)
    np.testing.assert_allclose(rewards.aesthetic, [7 / 12, 0, 1], atol=ATOL32)
    np.testing.assert_allclose(rewards.hybrid, [5 / 12, 0.5, 11 / 16], atol=ATOL32)

    for reward, (winner, loser, gap) in [
        (rewards.faithful, (1, 0, 0.75)),
        (rewards.aesthetic, (2, 1, 1.0)),
        (rewards.hybrid, (2, 0, 13 / 48)),
    ]:
        w, l, g = R.winner_loser_gap(reward)
        assert (int(w), int(l)) == (winner, loser)
        assert float(g) == pytest.approx(gap, abs=ATOL32)


def test_hand_pool_weights():
    # faithful weights (3, 1): R_F = (3·s̃_psnr + s̃_lpips) / 4 = (0.5/4, 4/4, 2.25/4)
    config = R.RewardConfig(
        faithful_metrics=("psnr", "lpips"),
        aesthetic_metrics=("musiq", "niqe"),
        faithful_weights=(3, 1),
        aesthetic_weights=(0, 2),
    )
    rewards = R.profile_rewards(HAND_POOL, HAND_NAMES, config)
    np.testing.assert_allclose(rewards.faithful, [0.125, 1, 0.5625], atol=ATOL32)
    np.testing.assert_allclose(rewards.aesthetic, [2 / 3, 0, 1], atol=ATOL32)  # niqe alone


def test_hand_pool_mining_statistics_and_pairs():
    stats = R.mining_statistics(HAND_POOL, HAND_NAMES, HAND_CONFIG)
    assert (stats.num_inputs, stats.pool_size) == (1, 3)
    assert stats.winner_disagreement == 1.0
    assert stats.mean_spearman == pytest.approx(-0.5, abs=ATOL32)
    assert stats.spearman_pools == 1
    assert stats.mean_faithful_gap == pytest.approx(0.75, abs=ATOL32)
    assert stats.mean_aesthetic_gap == pytest.approx(1.0, abs=ATOL32)
    assert stats.faithful_winner_advantage == pytest.approx(0.625, abs=ATOL32)
    assert stats.aesthetic_winner_advantage == pytest.approx(1.0, abs=ATOL32)

    # τ = 0.3 keeps the Faithful and Aesthetic pairs, drops the Hybrid one (gap 13/48 ≈ 0.271)
    config = R.RewardConfig(faithful_metrics=("psnr", "lpips"), aesthetic_metrics=("musiq", "niqe"), gap_threshold=0.3)
    pools = np.stack([HAND_POOL, HAND_POOL[[2, 0, 1]]])  # second input: candidates permuted
    faithful = R.mine_pairs(pools, HAND_NAMES, config, "faithful")
    np.testing.assert_array_equal(faithful.input_index, [0, 1])
    np.testing.assert_array_equal(faithful.winner, [1, 2])
    np.testing.assert_array_equal(faithful.loser, [0, 1])
    np.testing.assert_allclose(faithful.gap, [0.75, 0.75], atol=ATOL32)
    assert len(R.mine_pairs(pools, HAND_NAMES, config, "hybrid").input_index) == 0
    stats = R.mining_statistics(pools, HAND_NAMES, config)
    assert (stats.faithful_pairs_kept, stats.aesthetic_pairs_kept) == (2, 2)


# --------------------------------------------------------------------------------------------------------------------
# Ties, constant metrics, all-tied pools


def test_ties_go_to_the_lowest_index():
    names = ("psnr", "ssim")
    # candidates 1 and 3 identical and best, 0 and 2 identical and worst
    pool = np.array([[20.0, 0.5], [25.0, 0.9], [20.0, 0.5], [25.0, 0.9]])
    reward = R.profile_rewards(pool, names, R.RewardConfig(faithful_metrics=names, aesthetic_metrics=names)).faithful
    w, l, g = R.winner_loser_gap(reward)
    assert (int(w), int(l)) == (1, 0)
    # the same under a permutation putting the tied best at 2 and 3
    w, l, _ = R.winner_loser_gap(jnp.asarray(reward)[jnp.array([0, 2, 1, 3])])
    assert (int(w), int(l)) == (2, 0)
    assert float(g) == pytest.approx(1.0, abs=ATOL32)


def test_constant_metric_contributes_zero():
    # ssim is constant over the pool: s̃_ssim = 0 / (0 + ε) = 0 for every candidate, so R_F = s̃_psnr / 2
    names = ("psnr", "ssim", "clipiqa")
    pool = np.array([[20.0, 0.7, 0.1], [24.0, 0.7, 0.3], [22.0, 0.7, 0.2]])
    config = R.RewardConfig(faithful_metrics=("psnr", "ssim"), aesthetic_metrics=("clipiqa",))
    normalised = R.minmax_normalise(R.align_directions(pool, names), config.eps)
    np.testing.assert_array_equal(np.asarray(normalised)[:, 1], 0.0)
    rewards = R.profile_rewards(pool, names, config)
    np.testing.assert_allclose(rewards.faithful, [0, 0.5, 0.25], atol=ATOL32)
    assert np.all(np.isfinite(rewards.faithful))


def test_all_tied_pool_is_never_a_pair_and_has_no_spearman():
    names = ("psnr", "musiq")
    tied = np.tile([[21.0, 60.0]], (4, 1))
    ordered = np.array([[20.0, 50.0], [21.0, 70.0], [22.0, 60.0], [23.0, 40.0]])
    config = R.RewardConfig(faithful_metrics=("psnr",), aesthetic_metrics=("musiq",), gap_threshold=1e-6)
    stats = jax.jit(R.pool_statistics, static_argnames=("metric_names", "config"))(
        np.stack([tied, ordered]), metric_names=names, config=config
    )
    assert (int(stats.faithful_winner[0]), int(stats.faithful_loser[0]), float(stats.faithful_gap[0])) == (0, 0, 0.0)
    assert math.isnan(float(stats.spearman[0]))
    pairs = R.mine_pairs(np.stack([tied, ordered]), names, config, "faithful")
    np.testing.assert_array_equal(pairs.input_index, [1])
    summary = R.mining_statistics(np.stack([tied, ordered]), names, config)
    # ρ over the one defined pool: ranks psnr (1,2,3,4), musiq (2,4,3,1)
    assert summary.spearman_pools == 1
    assert summary.mean_spearman == pytest.approx(scipy.stats.spearmanr(ordered[:, 0], ordered[:, 1])[0], abs=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Validation


def test_nonfinite_scores_are_rejected_with_their_location():
    names = ("psnr", "lpips")
    scores = np.ones((3, 4, 2)) + np.arange(4)[None, :, None]
    for bad in (np.nan, np.inf, -np.inf):
        broken = scores.copy()
        broken[1, 2, 1] = bad
        with pytest.raises(ValueError, match=r"input 1, candidate 2, metric 'lpips'"):
            R.validate_scores(broken, names)
        with pytest.raises(ValueError, match=r"input 1, candidate 2, metric 'lpips'"):
            R.mining_statistics(broken, names, R.RewardConfig(("psnr", "lpips"), ("psnr",)))
    single = scores[0].copy()
    single[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"candidate 3, metric 'psnr'"):
        R.validate_scores(single, names)


def test_shape_and_pool_size_errors():
    names = ("psnr", "lpips")
    config = R.RewardConfig(("psnr", "lpips"), ("psnr",))
    with pytest.raises(ValueError, match="at least 2 candidates"):
        R.validate_scores(np.ones((5, 1, 2)), names)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        R.profile_rewards(np.ones((1, 2)), names, config)
    with pytest.raises(ValueError, match="3 entries but 2 metric names"):
        R.validate_scores(np.ones((4, 3)), names)
    with pytest.raises(ValueError, match=r"\(K, M\) or \(num_inputs, K, M\)"):
        R.validate_scores(np.ones((2, 2, 2, 2)), names)
    with pytest.raises(ValueError, match=r"needs metrics \['clipiqa'\]"):
        R.profile_rewards(np.ones((3, 2)), names, R.RewardConfig(("psnr",), ("clipiqa",)))
    with pytest.raises(ValueError, match="nested pool size 6"):
        R.nested_pool_statistics(np.random.default_rng(0).normal(size=(2, 4, 2)), names, config, (2, 6))


def test_unknown_metric_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown metric 'psnr_y'.*known metrics: .*lpips.*psnr"):
        R.metric_spec("psnr_y")
    with pytest.raises(ValueError, match="unknown metric 'foo'"):
        R.validate_scores(np.ones((2, 1)), ("foo",))
    with pytest.raises(ValueError, match="unknown metric 'foo'"):
        R.RewardConfig(faithful_metrics=("psnr", "foo"))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"faithful_metrics": ()}, "faithful_metrics"),
        ({"aesthetic_metrics": ("niqe", "niqe")}, "aesthetic_metrics"),
        ({"faithful_weights": (1.0, 1.0)}, "faithful_weights"),
        ({"aesthetic_weights": (1.0, -1.0, 1.0, 1.0)}, "aesthetic_weights"),
        ({"aesthetic_weights": (0.0, 0.0, 0.0, 0.0)}, "aesthetic_weights"),
        ({"eps": 0.0}, "eps"),
        ({"gap_threshold": 0.0}, "gap_threshold"),
        ({"gap_threshold": math.nan}, "gap_threshold"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        R.RewardConfig(**kwargs)


def test_config_coerces_lists_and_is_hashable():
    config = R.RewardConfig(faithful_metrics=["psnr", "ssim"], faithful_weights=[1, 2])
    assert config.faithful_metrics == ("psnr", "ssim") and config.faithful_weights == (1.0, 2.0)
    hash(config)
    with pytest.raises(ValueError, match="profile"):
        R.mine_pairs(HAND_POOL, HAND_NAMES, HAND_CONFIG, "faithfull")


# --------------------------------------------------------------------------------------------------------------------
# Directions


def _pyiqa_default_configs():
    """pyiqa's metric table, loaded from its source file alone (importing pyiqa would pull in torch and take ~10 s)."""
    spec = importlib.util.find_spec("pyiqa")
    path = pathlib.Path(spec.origin).parent / "default_model_configs.py"
    module_spec = importlib.util.spec_from_file_location("pyiqa_default_model_configs", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.DEFAULT_CONFIGS


def test_directions_match_pyiqa():
    pyiqa = _pyiqa_default_configs()
    for name, spec in R.METRIC_SPECS.items():
        assert name in pyiqa, f"{name} is not a pyiqa metric name"
        assert spec.higher_is_better == (not pyiqa[name].get("lower_better", False)), name
    lower = {name for name, spec in R.METRIC_SPECS.items() if not spec.higher_is_better}
    assert {"lpips", "dists", "niqe"} <= lower
    assert not {"psnr", "ssim", "clipiqa", "musiq", "maniqa", "nima", "topiq_nr", "clipiqa+"} & lower


def test_lower_is_better_metric_is_negated():
    # lpips falls with the index, niqe rises: the lpips winner is the last candidate, the niqe winner the first
    names = ("lpips", "niqe")
    pool = np.array([[0.4, 3.0], [0.3, 4.0], [0.2, 5.0]])
    rewards = R.profile_rewards(pool, names, R.RewardConfig(("lpips",), ("niqe",)))
    np.testing.assert_allclose(rewards.faithful, [0, 0.5, 1], atol=ATOL32)
    np.testing.assert_allclose(rewards.aesthetic, [1, 0.5, 0], atol=ATOL32)
    np.testing.assert_allclose(R.align_directions(pool, names), -pool, atol=ATOL32)


# --------------------------------------------------------------------------------------------------------------------
# Spearman against scipy


@pytest.mark.parametrize("length", [2, 3, 4, 8])
def test_spearman_matches_scipy(length):
    rng = np.random.default_rng(length)
    # small integer ranges force many ties, including constant rows
    x = rng.integers(0, 3, size=(200, length)).astype(np.float64)
    y = np.where(
        rng.random((200, length)) < 0.5, rng.integers(0, 3, size=(200, length)), rng.normal(size=(200, length))
    )
    ours = np.asarray(jax.jit(R.spearman)(x, y))
    np.testing.assert_allclose(R.average_ranks(x), scipy.stats.rankdata(x, axis=-1), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input, returning NaN as we do
        theirs = np.array([scipy.stats.spearmanr(a, b)[0] for a, b in zip(x, y)])
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    assert np.isnan(theirs).any() and not np.isnan(theirs).all()
    np.testing.assert_allclose(ours[~np.isnan(ours)], theirs[~np.isnan(theirs)], atol=1e-6)


# --------------------------------------------------------------------------------------------------------------------
# Random pools against a direct NumPy loop

DIRECTIONS = {"psnr": 1, "ssim": 1, "lpips": -1, "dists": -1, "clipiqa": 1, "musiq": 1, "maniqa": 1, "niqe": -1}
NAMES = tuple(DIRECTIONS)


def _random_scores(rng, num_inputs, pool_size):
    """Scores on each metric's own scale, with shared per-input offsets so pools differ as real ones do."""
    centre = np.array([22.0, 0.65, 0.28, 0.21, 0.6, 68.0, 0.66, 5.0])
    spread = np.array([1.5, 0.05, 0.04, 0.03, 0.08, 3.0, 0.04, 0.6])
    offset = rng.normal(size=(num_inputs, 1, len(NAMES))) * spread
    return centre + offset + rng.normal(size=(num_inputs, pool_size, len(NAMES))) * spread


def _reference_pool(pool, names, faithful, aesthetic, eps):
    """Eq. 3–7 for one pool by explicit loops in float64."""
    k_count, m_count = pool.shape
    normalised = np.zeros_like(pool)
    for m in range(m_count):
        aligned = [DIRECTIONS[names[m]] * pool[k, m] for k in range(k_count)]
        low, high = min(aligned), max(aligned)
        for k in range(k_count):
            normalised[k, m] = (aligned[k] - low) / (high - low + eps)

    def reward(metrics):
        return [sum(normalised[k, names.index(m)] for m in metrics) / len(metrics) for k in range(k_count)]

    def first_best(values, better):
        best = 0
        for k in range(1, len(values)):
            if better(values[k], values[best]):
                best = k
        return best

    out = {}
    r_f, r_a = reward(faithful), reward(aesthetic)
    for profile, r in (("faithful", r_f), ("aesthetic", r_a)):
        winner = first_best(r, lambda a, b: a > b)
        loser = first_best(r, lambda a, b: a < b)
        out[profile] = (winner, loser, r[winner] - r[loser])
    out["spearman"] = scipy.stats.spearmanr(r_f, r_a)[0]
    out["faithful_advantage"] = r_f[out["faithful"][0]] - r_f[out["aesthetic"][0]]
    out["aesthetic_advantage"] = r_a[out["aesthetic"][0]] - r_a[out["faithful"][0]]
    return out


def _reference_stats(scores, config):
    pools = [_reference_pool(p, NAMES, config.faithful_metrics, config.aesthetic_metrics, config.eps) for p in scores]
    return {
        "winner_disagreement": np.mean([p["faithful"][0] != p["aesthetic"][0] for p in pools]),
        "mean_spearman": np.mean([p["spearman"] for p in pools]),
        "mean_faithful_gap": np.mean([p["faithful"][2] for p in pools]),
        "mean_aesthetic_gap": np.mean([p["aesthetic"][2] for p in pools]),
        "faithful_winner_advantage": np.mean([p["faithful_advantage"] for p in pools]),
        "aesthetic_winner_advantage": np.mean([p["aesthetic_advantage"] for p in pools]),
        "faithful_pairs_kept": sum(p["faithful"][2] >= config.gap_threshold for p in pools),
        "aesthetic_pairs_kept": sum(p["aesthetic"][2] >= config.gap_threshold for p in pools),
        "winners": [(p["faithful"][:2], p["aesthetic"][:2]) for p in pools],
    }


RANDOM_CONFIG = R.RewardConfig(gap_threshold=0.6)


@pytest.fixture(scope="module")
def random_mining():
    """60 random pools of 8 and their nested-pool statistics (computed once: each pool size compiles)."""
    scores = _random_scores(np.random.default_rng(7), num_inputs=60, pool_size=8)
    return scores, R.nested_pool_statistics(scores, NAMES, RANDOM_CONFIG)


def test_random_pools_match_numpy_loop(random_mining):
    """Every statistic, for the nested pools k = 2, 4, 6, 8 of 60 random pools of 8, against the float64 loop."""
    scores, nested = random_mining
    config = RANDOM_CONFIG
    assert sorted(nested) == [2, 4, 6, 8]
    for k, ours in nested.items():
        reference = _reference_stats(scores[:, :k], config)
        assert (ours.num_inputs, ours.pool_size, ours.spearman_pools) == (60, k, 60)
        for name, expected in reference.items():
            if name != "winners":
                assert getattr(ours, name) == pytest.approx(expected, abs=1e-12), (k, name)
    # mining runs in float64 whatever the global flag (K = 2 ties hinge on ε-level differences)
    with jax.enable_x64(True):
        assert R.mining_statistics(scores[:, :2], NAMES, config) == nested[2]
    # a nested pool is a fresh pool: re-normalised, equal to mining its candidates alone
    assert nested[4] == R.mining_statistics(scores[:, :4].copy(), NAMES, config)
    assert nested[4].mean_faithful_gap != pytest.approx(nested[8].mean_faithful_gap, abs=1e-3)

    # the jit-able per-pool function in the caller's precision (float32 here): same winners and losers
    per_pool = jax.jit(R.pool_statistics, static_argnames=("metric_names", "config"))(
        scores.astype(np.float32), metric_names=NAMES, config=config
    )
    reference = _reference_stats(scores, config)
    ours_winners = [
        ((int(fw), int(fl)), (int(aw), int(al)))
        for fw, fl, aw, al in zip(
            per_pool.faithful_winner, per_pool.faithful_loser, per_pool.aesthetic_winner, per_pool.aesthetic_loser
        )
    ]
    assert ours_winners == reference["winners"]
    assert float(np.mean(per_pool.faithful_gap)) == pytest.approx(reference["mean_faithful_gap"], abs=2e-6)
    assert float(np.mean(per_pool.spearman)) == pytest.approx(reference["mean_spearman"], abs=2e-6)


# --------------------------------------------------------------------------------------------------------------------
# jit, NumPy inputs, the paper table


def test_jit_matches_eager_and_accepts_numpy():
    rng = np.random.default_rng(11)
    scores = _random_scores(rng, num_inputs=5, pool_size=4).astype(np.float32)
    config = R.RewardConfig()
    jitted = jax.jit(R.profile_rewards, static_argnames=("metric_names", "config"))
    eager = R.profile_rewards(scores, NAMES, config)
    for a, b in zip(jitted(jnp.asarray(scores), metric_names=NAMES, config=config), eager):
        np.testing.assert_allclose(a, b, atol=1e-7)
    stats = jax.jit(R.pool_statistics, static_argnames=("metric_names", "config"))(
        scores, metric_names=NAMES, config=config
    )
    np.testing.assert_array_equal(stats.faithful_winner, R.winner_loser_gap(eager.faithful)[0])
    assert stats.spearman.shape == (5,)
    # integer scores are promoted to float
    ints = R.profile_rewards(
        np.array([[1, 2], [3, 1], [2, 3]]), ("psnr", "musiq"), R.RewardConfig(("psnr",), ("musiq",))
    )
    np.testing.assert_allclose(ints.faithful, [0, 1, 0.5], atol=ATOL32)


def test_compare_with_paper_rows(random_mining):
    _, nested = random_mining
    rows = {(k, name): (ours, paper) for k, name, ours, paper in R.compare_with_paper(nested)}
    assert rows[(4, "winner_disagreement")] == (nested[4].winner_disagreement, 0.784)
    assert rows[(4, "faithful_winner_advantage")][1] == 0.3338
    assert rows[(4, "aesthetic_winner_advantage")][1] == 0.3411
    assert rows[(8, "mean_aesthetic_gap")][1] == 0.7300
    assert rows[(2, "faithful_winner_advantage")][1] is None
    assert rows[(2, "num_inputs")] == (60, 500)
    # every statistic the paper prints names a MiningStats field
    fields = {f.name for f in dataclasses.fields(R.MiningStats)}
    assert all(set(values) <= fields for values in R.PAPER_MINING_STATS.values())
