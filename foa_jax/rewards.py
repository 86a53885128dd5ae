"""Profile rewards and preference-mining statistics of FoA-SR (paper §3.2, Eq. 3–7, App. B; docs/method.md).

A candidate pool is the K samples one Flux2SR model draws for one LR input, differing only in the seed. Its metric
scores arrive as an array `(..., K, M)` (usually `(num_inputs, K, M)`, or `(K, M)` for one pool) whose last axis
follows a tuple of pyiqa metric names. From it:

    align:      s_m = ±score_m, so higher is always better (LPIPS, DISTS, NIQE … are negated)
    normalise:  s̃_m(y_k) = (s_m(y_k) − min_j s_m(y_j)) / (max_j s_m(y_j) − min_j s_m(y_j) + ε)    Eq. 3
    rewards:    R_F, R_A = weighted means of s̃ over the Faithful / Aesthetic metric sets,             Eq. 4–5
                R_H = (R_F + R_A) / 2 (the Hybrid ablation)
    mining:     winner = argmax R_p, loser = argmin R_p, gap Δ_p = R_p(winner) − R_p(loser),
                the pair is kept only if Δ_p ≥ τ                                                      Eq. 6–7

The normalisation is relative to the pool, so rewards rank candidates of one input and mean nothing across inputs;
evaluation tables use raw metric values instead (paper §3.2, "Mining versus evaluation").

Everything between `validate_scores` and the final averages is jax.numpy with static metric names and config, so it
jits (`jax.jit(f, static_argnames=("metric_names", "config"))`) and also takes NumPy arrays. The checks that need
values (NaN, inf) run on the host in `validate_scores`, which the mining entry points call before the jitted math.

Precision: the host-side entry points (`mining_statistics`, `nested_pool_statistics`, `mine_pairs`) always compute in
float64, whatever jax's global x64 flag says. ε in Eq. 3 makes the best candidate's score range/(range + ε), which
differs between metrics by ~ε/range; float64 keeps those differences, float32 rounds most of them to exactly 1. In
small pools (K = 2: every s̃ is 0 or ≈1) that decides whether R ties, and so the winner, the loser and whether ρ is
defined. Fixing the precision makes mining reproducible and equal to a float64 NumPy computation of Eq. 3–7.
This module knows metric *directions* only; how a metric is computed (pyiqa options) lives in `ports/iqa.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------------------------------------------------
# Metric directions


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """What the rewards need to know about a metric: its pyiqa name and whether a larger value is better."""

    name: str
    higher_is_better: bool


def _specs(*specs: MetricSpec) -> Mapping[str, MetricSpec]:
    return MappingProxyType({spec.name: spec for spec in specs})


# Names are pyiqa's, so a scorer's column names index this table directly; directions match pyiqa's `lower_better`.
METRIC_SPECS: Mapping[str, MetricSpec] = _specs(
    # full-reference
    MetricSpec("psnr", True),
    MetricSpec("psnry", True),
    MetricSpec("ssim", True),
    MetricSpec("ssimc", True),
    MetricSpec("lpips", False),
    MetricSpec("dists", False),
    MetricSpec("topiq_fr", True),
    MetricSpec("afine_fr", False),
    # no-reference
    MetricSpec("clipiqa", True),
    MetricSpec("clipiqa+", True),
    MetricSpec("musiq", True),
    MetricSpec("maniqa", True),
    MetricSpec("maniqa-pipal", True),
    MetricSpec("nima", True),
    MetricSpec("topiq_nr", True),
    MetricSpec("topiq_iaa", True),
    MetricSpec("niqe", False),
    MetricSpec("piqe", False),
    MetricSpec("afine_nr", False),
)


def metric_spec(name: str) -> MetricSpec:
    """The registered direction of `name`; an unknown name is an error, never a guessed direction."""
    try:
        return METRIC_SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown metric {name!r}: its direction (higher or lower is better) is not registered; "
            f"known metrics: {', '.join(sorted(METRIC_SPECS))}"
        ) from None


def _check_metric_names(metric_names: Sequence[str], what: str) -> tuple[str, ...]:
    names = tuple(metric_names)
    if not names:
        raise ValueError(f"{what}: expected at least one metric name, got none")
    for name in names:
        metric_spec(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{what}: metric names must be unique, {duplicates} repeat in {names}")
    return names


# --------------------------------------------------------------------------------------------------------------------
# Configuration

PROFILES = ("faithful", "aesthetic", "hybrid")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Metric sets, weights, ε and τ of the profile rewards.

    The metric sets are the paper's (Eq. 4–5). Weights are normalised to sum to one, so a reward stays in [0, 1);
    `None` means equal weights, the paper's plain mean. ε = 1e-8 and τ = 0.1 are ours: the paper calls ε "a small
    constant" and filters "low-gap pairs" without printing either. τ must be positive so that a pool whose
    candidates all tie (winner = loser, Δ = 0) can never yield a pair.
    """

    faithful_metrics: tuple[str, ...] = ("psnr", "ssim", "lpips", "dists")
    aesthetic_metrics: tuple[str, ...] = ("clipiqa", "musiq", "maniqa", "niqe")
    faithful_weights: tuple[float, ...] | None = None
    aesthetic_weights: tuple[float, ...] | None = None
    eps: float = 1e-8
    gap_threshold: float = 0.1

    def __post_init__(self):
        for profile in ("faithful", "aesthetic"):
            metrics_field, weights_field = f"{profile}_metrics", f"{profile}_weights"
            metrics = _check_metric_names(getattr(self, metrics_field), f"RewardConfig.{metrics_field}")
            object.__setattr__(self, metrics_field, metrics)
            weights = getattr(self, weights_field)
            if weights is None:
                continue
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(metrics):
                raise ValueError(
                    f"RewardConfig.{weights_field}: expected {len(metrics)} weights (one per metric of "
                    f"{metrics_field} {metrics}), got {len(weights)}"
                )
            if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(
                    f"RewardConfig.{weights_field}: expected finite non-negative weights with a positive sum, "
                    f"got {weights}"
                )
            object.__setattr__(self, weights_field, weights)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"RewardConfig.eps: expected a finite value > 0, got {self.eps}")
        if not (math.isfinite(self.gap_threshold) and self.gap_threshold > 0):
            raise ValueError(
                f"RewardConfig.gap_threshold: expected a finite value > 0 (a zero gap means winner = loser), "
                f"got {self.gap_threshold}"
            )


# --------------------------------------------------------------------------------------------------------------------
# Validation (host side)


def _check_pool_shape(shape: tuple[int, ...], metric_names: tuple[str, ...]) -> None:
    """Shape checks shared by the host validator and the traced functions (shapes are static under jit)."""
    if len(shape) < 2:
        raise ValueError(f"scores: expected shape (..., K candidates, M metrics), got {shape}")
    if shape[-1] != len(metric_names):
        raise ValueError(
            f"scores: last axis has {shape[-1]} entries but {len(metric_names)} metric names were given {metric_names}"
        )
    if shape[-2] < 2:
        raise ValueError(
            f"scores: a pool needs at least 2 candidates to have a winner and a loser, got K = {shape[-2]} "
            f"(shape {shape})"
        )


def validate_scores(scores, metric_names: Sequence[str]) -> np.ndarray:
    """Check a score array on the host and return it as a float NumPy array.

    `scores` is `(num_inputs, K, M)` or one pool `(K, M)`. The first non-finite entry is reported by input index,
    candidate index and metric name: a NaN would otherwise poison min/max for the whole pool and argmax would pick
    it silently.
    """
    names = _check_metric_names(metric_names, "metric_names")
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim not in (2, 3):
        raise ValueError(f"scores: expected shape (K, M) or (num_inputs, K, M), got {array.shape}")
    _check_pool_shape(array.shape, names)
    bad = np.argwhere(~np.isfinite(array))
    if len(bad):
        *input_index, candidate, metric = (int(i) for i in bad[0])
        where = f"input {input_index[0]}, " if input_index else ""
        raise ValueError(
            f"scores: non-finite value {array[tuple(bad[0])]} at {where}candidate {candidate}, metric "
            f"{names[metric]!r} ({len(bad)} non-finite entries in total)"
        )
    return array


# --------------------------------------------------------------------------------------------------------------------
# Rewards (jit-able; metric names and config are static)


def _as_float(scores) -> jax.Array:
    array = jnp.asarray(scores)
    return array if jnp.issubdtype(array.dtype, jnp.inexact) else array.astype(jnp.result_type(float))


def align_directions(scores, metric_names: Sequence[str]) -> jax.Array:
    """Negate lower-is-better metrics so that a larger aligned score is always better (the `s_m` of Eq. 3)."""
    names = tuple(metric_names)
    scores = _as_float(scores)
    _check_pool_shape(scores.shape, names)
    signs = np.array([1.0 if metric_spec(name).higher_is_better else -1.0 for name in names])
    return scores * jnp.asarray(signs, dtype=scores.dtype)


def minmax_normalise(aligned, eps: float) -> jax.Array:
    """Eq. 3: min–max normalise each metric over the candidate axis (-2) of `(..., K, M)` aligned scores.

    The best candidate gets range/(range + ε), just below 1; the worst gets 0. A metric that is constant over the
    pool (max = min) gives 0 to every candidate: it expresses no preference, so it cannot move the ranking, but it
    still counts in its profile's mean and so shrinks that reward's range (e.g. R_F ≤ 3/4 when one of its four
    metrics is constant). That is what Eq. 3–4 say; we do not drop the metric from the mean.
    """
    aligned = _as_float(aligned)
    low = jnp.min(aligned, axis=-2, keepdims=True)
    high = jnp.max(aligned, axis=-2, keepdims=True)
    return (aligned - low) / (high - low + eps)


def _column_indices(metric_names: tuple[str, ...], wanted: tuple[str, ...]) -> np.ndarray:
    missing = [name for name in wanted if name not in metric_names]
    if missing:
        raise ValueError(
            f"the reward over {wanted} needs metrics {missing}, which the scores do not have; score columns: "
            f"{metric_names}"
        )
    return np.array([metric_names.index(name) for name in wanted])


def profile_reward(
    normalised, metric_names: Sequence[str], metrics: Sequence[str], weights: Sequence[float] | None = None
) -> jax.Array:
    """Eq. 4/5: the weighted mean of normalised scores `(..., K, M)` over `metrics`, giving `(..., K)`."""
    names = tuple(metric_names)
    columns = _column_indices(names, tuple(metrics))
    w = np.ones(len(columns)) if weights is None else np.asarray(weights, dtype=np.float64)
    normalised = _as_float(normalised)
    return normalised[..., columns] @ jnp.asarray(w / w.sum(), dtype=normalised.dtype)


class ProfileRewards(NamedTuple):
    """R_F, R_A and R_H, each `(..., K)`."""

    faithful: jax.Array
    aesthetic: jax.Array
    hybrid: jax.Array


def profile_rewards(scores, metric_names: Sequence[str], config: RewardConfig) -> ProfileRewards:
    """Raw scores `(..., K, M)` → the three profile rewards of every candidate."""
    names = tuple(metric_names)
    normalised = minmax_normalise(align_directions(scores, names), config.eps)
    faithful = profile_reward(normalised, names, config.faithful_metrics, config.faithful_weights)
    aesthetic = profile_reward(normalised, names, config.aesthetic_metrics, config.aesthetic_weights)
    return ProfileRewards(faithful, aesthetic, (faithful + aesthetic) / 2)


def winner_loser_gap(rewards) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eq. 6–7 over the last axis: winner = argmax, loser = argmin, gap = R(winner) − R(loser).

    Ties go to the lowest candidate index (argmax/argmin return the first extremum), which makes mining
    deterministic. Only exactly equal rewards tie: near-ties that ε leaves behind in Eq. 3 (range/(range + ε)
    differs slightly between metrics) are real, if tiny, differences and are ranked as such (how many survive depends
    on the precision: see the module docstring). If all candidates tie,
    winner = loser and the gap is 0, which the gap filter (τ > 0) always drops.
    """
    rewards = _as_float(rewards)
    winner = jnp.argmax(rewards, axis=-1)
    loser = jnp.argmin(rewards, axis=-1)
    gap = jnp.max(rewards, axis=-1) - jnp.min(rewards, axis=-1)
    return winner, loser, gap


# --------------------------------------------------------------------------------------------------------------------
# Rank statistics


def average_ranks(values) -> jax.Array:
    """1-based ranks along the last axis, tied values sharing the mean of their ranks (scipy's 'average').

    rank_i = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2. Pairwise counting is O(K²), which for pools of a
    handful of candidates is cheaper and simpler under jit than a sort with tie bookkeeping.
    """
    values = _as_float(values)
    below = jnp.sum(values[..., None, :] < values[..., :, None], axis=-1)
    equal = jnp.sum(values[..., None, :] == values[..., :, None], axis=-1)
    return (below + (equal + 1) / 2).astype(values.dtype)


def spearman(x, y) -> jax.Array:
    """Spearman's ρ along the last axis: the Pearson correlation of average ranks.

    ρ is undefined when either ranking is constant (all candidates tie); like scipy we return NaN there, and the
    mining statistics average ρ over the pools where it is defined and report how many those are.
    """
    rx, ry = average_ranks(x), average_ranks(y)
    dx = rx - jnp.mean(rx, axis=-1, keepdims=True)
    dy = ry - jnp.mean(ry, axis=-1, keepdims=True)
    denominator = jnp.sqrt(jnp.sum(dx * dx, axis=-1) * jnp.sum(dy * dy, axis=-1))
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, jnp.sum(dx * dy, axis=-1) / safe, jnp.nan)


# --------------------------------------------------------------------------------------------------------------------
# Per-pool mining quantities (jit-able) and their averages (host)


class PoolStatistics(NamedTuple):
    """Per-pool quantities behind the mining report, each `(...)` over the leading axes of the scores."""

    faithful_winner: jax.Array
    faithful_loser: jax.Array
    faithful_gap: jax.Array
    aesthetic_winner: jax.Array
    aesthetic_loser: jax.Array
    aesthetic_gap: jax.Array
    spearman: jax.Array  # ρ(R_F, R_A) over the pool; NaN where a ranking is constant
    faithful_winner_advantage: jax.Array  # R_F(w_F) − R_F(w_A)
    aesthetic_winner_advantage: jax.Array  # R_A(w_A) − R_A(w_F)


def _take(rewards: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(rewards, index[..., None], axis=-1)[..., 0]


def pool_statistics(scores, metric_names: Sequence[str], config: RewardConfig) -> PoolStatistics:
    """Winners, losers, gaps, ρ and cross-profile advantages of every pool in `scores` `(..., K, M)`."""
    rewards = profile_rewards(scores, metric_names, config)
    f_win, f_lose, f_gap = winner_loser_gap(rewards.faithful)
    a_win, a_lose, a_gap = winner_loser_gap(rewards.aesthetic)
    return PoolStatistics(
        faithful_winner=f_win,
        faithful_loser=f_lose,
        faithful_gap=f_gap,
        aesthetic_winner=a_win,
        aesthetic_loser=a_lose,
        aesthetic_gap=a_gap,
        spearman=spearman(rewards.faithful, rewards.aesthetic),
        faithful_winner_advantage=_take(rewards.faithful, f_win) - _take(rewards.faithful, a_win),
        aesthetic_winner_advantage=_take(rewards.aesthetic, a_win) - _take(rewards.aesthetic, f_win),
    )


_pool_statistics_jit = jax.jit(pool_statistics, static_argnames=("metric_names", "config"))


@dataclasses.dataclass(frozen=True)
class MiningStats:
    """The mining report of paper Table 5 (and Table 3 per pool size). Disagreement is a fraction, not a percent."""

    num_inputs: int
    pool_size: int
    winner_disagreement: float
    mean_spearman: float  # over the `spearman_pools` pools where ρ is defined; NaN if none
    spearman_pools: int
    mean_faithful_gap: float
    mean_aesthetic_gap: float
    faithful_winner_advantage: float  # mean R_F(w_F) − R_F(w_A)
    aesthetic_winner_advantage: float  # mean R_A(w_A) − R_A(w_F)
    faithful_pairs_kept: int  # pools whose Faithful gap passes τ
    aesthetic_pairs_kept: int


def _as_pools(scores, metric_names: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    array = validate_scores(scores, metric_names)
    return (array[None] if array.ndim == 2 else array), tuple(metric_names)


def _summarise(pools: np.ndarray, names: tuple[str, ...], config: RewardConfig) -> MiningStats:
    with jax.enable_x64(True):
        stats = jax.device_get(_pool_statistics_jit(pools, metric_names=names, config=config))
    rho = np.asarray(stats.spearman, dtype=np.float64)
    defined = np.isfinite(rho)
    return MiningStats(
        num_inputs=pools.shape[0],
        pool_size=pools.shape[1],
        winner_disagreement=float(np.mean(stats.faithful_winner != stats.aesthetic_winner)),
        mean_spearman=float(np.mean(rho[defined])) if defined.any() else math.nan,
        spearman_pools=int(defined.sum()),
        mean_faithful_gap=float(np.mean(stats.faithful_gap)),
        mean_aesthetic_gap=float(np.mean(stats.aesthetic_gap)),
        faithful_winner_advantage=float(np.mean(stats.faithful_winner_advantage)),
        aesthetic_winner_advantage=float(np.mean(stats.aesthetic_winner_advantage)),
        faithful_pairs_kept=int(np.sum(stats.faithful_gap >= config.gap_threshold)),
        aesthetic_pairs_kept=int(np.sum(stats.aesthetic_gap >= config.gap_threshold)),
    )


def mining_statistics(scores, metric_names: Sequence[str], config: RewardConfig) -> MiningStats:
    """Validate `(num_inputs, K, M)` (or one `(K, M)` pool) scores and summarise Faithful-vs-Aesthetic mining."""
    pools, names = _as_pools(scores, metric_names)
    return _summarise(pools, names, config)


def nested_pool_statistics(
    scores, metric_names: Sequence[str], config: RewardConfig, pool_sizes: Sequence[int] = (2, 4, 6, 8)
) -> dict[int, MiningStats]:
    """Paper Table 3: statistics of the nested pools made of each input's first k candidates, for k in pool_sizes.

    Each nested pool is re-normalised on its own (Eq. 3 is within-pool), so a k-pool's rewards are not a slice of
    the full pool's rewards.
    """
    pools, names = _as_pools(scores, metric_names)
    available = pools.shape[1]
    for k in pool_sizes:
        if not 2 <= k <= available:
            raise ValueError(f"pool_sizes: nested pool size {k} must be in [2, {available}] (candidates per input)")
    return {int(k): _summarise(pools[:, :k], names, config) for k in pool_sizes}


# --------------------------------------------------------------------------------------------------------------------
# Preference pairs


class PreferencePairs(NamedTuple):
    """The pairs one profile keeps (Eq. 6–7), as NumPy arrays of equal length."""

    input_index: np.ndarray
    winner: np.ndarray
    loser: np.ndarray
    gap: np.ndarray


def _profile_winner_loser_gap(scores, metric_names: tuple[str, ...], config: RewardConfig, profile: str):
    return winner_loser_gap(getattr(profile_rewards(scores, metric_names, config), profile))


_winner_loser_gap_jit = jax.jit(_profile_winner_loser_gap, static_argnames=("metric_names", "config", "profile"))


def mine_pairs(scores, metric_names: Sequence[str], config: RewardConfig, profile: str) -> PreferencePairs:
    """Winner–loser pairs of `profile` ('faithful', 'aesthetic' or 'hybrid') whose gap is at least τ."""
    if profile not in PROFILES:
        raise ValueError(f"profile: expected one of {PROFILES}, got {profile!r}")
    pools, names = _as_pools(scores, metric_names)
    with jax.enable_x64(True):
        choice = _winner_loser_gap_jit(pools, metric_names=names, config=config, profile=profile)
        winner, loser, gap = (np.asarray(a) for a in jax.device_get(choice))
    keep = gap >= config.gap_threshold
    return PreferencePairs(np.flatnonzero(keep), winner[keep], loser[keep], gap[keep])


# --------------------------------------------------------------------------------------------------------------------
# The paper's numbers, for side-by-side reports

PAPER_MINING_STATS_SOURCE = (
    "FoA-SR paper: Table 3 (nested pools k = 2, 4, 6, 8 of one pool "
    "of 8, 500 LR inputs: gaps, winner disagreement, Spearman) and Appendix B Table 5 (k = 4: the two "
    "winner-advantage rows). Disagreement converted from percent to a fraction."
)

PAPER_MINING_STATS: Mapping[int, Mapping[str, float]] = MappingProxyType(
    {
        2: MappingProxyType(
            {
                "num_inputs": 500,
                "mean_faithful_gap": 0.5628,
                "mean_aesthetic_gap": 0.5700,
                "winner_disagreement": 0.552,
                "mean_spearman": -0.1690,
            }
        ),
        4: MappingProxyType(
            {
                "num_inputs": 500,
                "mean_faithful_gap": 0.6517,
                "mean_aesthetic_gap": 0.7097,
                "winner_disagreement": 0.784,
                "mean_spearman": -0.0312,
                "faithful_winner_advantage": 0.3338,
                "aesthetic_winner_advantage": 0.3411,
            }
        ),
        6: MappingProxyType(
            {
                "num_inputs": 500,
                "mean_faithful_gap": 0.6749,
                "mean_aesthetic_gap": 0.7216,
                "winner_disagreement": 0.854,
                "mean_spearman": -0.0429,
            }
        ),
        8: MappingProxyType(
            {
                "num_inputs": 500,
                "mean_faithful_gap": 0.6741,
                "mean_aesthetic_gap": 0.7300,
                "winner_disagreement": 0.908,
                "mean_spearman": -0.0380,
            }
        ),
    }
)


def compare_with_paper(stats_by_pool_size: Mapping[int, MiningStats]) -> list[tuple[int, str, float, float | None]]:
    """Rows `(k, statistic, ours, paper)` for every statistic we computed; `paper` is None where it printed none."""
    rows = []
    for k, stats in sorted(stats_by_pool_size.items()):
        paper = PAPER_MINING_STATS.get(k, {})
        for field in dataclasses.fields(MiningStats):
            if field.name != "pool_size":
                rows.append((k, field.name, getattr(stats, field.name), paper.get(field.name)))
    return rows
