"""The benchmark's statistics (the JAX/torch ratio's bootstrap interval against SciPy's, the verdict), its
worker pooling, the table, the warm-up, and its JAX steps on `foa_jax.sr`'s losses (the DPO step against torch's)."""

import jax
import numpy as np
import pytest
from scipy import stats as scipy_stats

from experiments.bench import measure, report, stats, steps, workers
from experiments.bench.workloads import Workload
from foa_jax.models import flux2

# The tiny transformer, one block per stack, on a 2 x 2 token grid (32 px through the tiny VAE): the steps' code
# paths at a test's cost.
MINI = Workload("mini", flux2.preset("tiny").replace(num_layers=1, num_single_layers=1, scan_unroll=1), batch=1,
                grid=(2, 2), text_len=4)


def lognormal_times(median_ms: float, spread: float, calls: int, seed: int) -> np.ndarray:
    return median_ms * np.exp(spread * np.random.default_rng(seed).standard_normal(calls))


@pytest.mark.parametrize("calls", [(9, 9), (31, 17)])
@pytest.mark.parametrize("level", [0.9, 0.95])
def test_ratio_interval_matches_scipy_bootstrap(calls, level):
    jax_ms = lognormal_times(450.0, 0.08, calls[0], seed=1)
    torch_ms = lognormal_times(430.0, 0.05, calls[1], seed=2)
    ours = stats.ratio_interval(jax_ms, torch_ms, level=level, resamples=20_000)
    reference = scipy_stats.bootstrap((jax_ms, torch_ms), lambda a, b, axis: np.median(a, axis) / np.median(b, axis),
                                paired=False, confidence_level=level, n_resamples=20_000, method="percentile",
                                vectorized=True, rng=np.random.default_rng(7)).confidence_interval
    assert ours["ratio"] == pytest.approx(np.median(jax_ms) / np.median(torch_ms), rel=1e-12)
    assert ours["low"] == pytest.approx(reference.low, rel=0.01)
    assert ours["high"] == pytest.approx(reference.high, rel=0.01)
    assert ours["low"] < ours["ratio"] < ours["high"]
    assert ours["calls"] == list(calls)


def test_interval_narrows_with_calls_and_is_seeded():
    few = stats.ratio_interval(lognormal_times(1, 0.1, 6, 3), lognormal_times(1, 0.1, 6, 4))
    many = stats.ratio_interval(lognormal_times(1, 0.1, 60, 3), lognormal_times(1, 0.1, 60, 4))
    assert many["high"] - many["low"] < few["high"] - few["low"]
    assert stats.ratio_interval([5, 6, 7, 8, 9], [6, 7, 8, 9, 9]) == stats.ratio_interval([5, 6, 7, 8, 9],
                                                                                         [6, 7, 8, 9, 9])


@pytest.mark.parametrize("jax_median, expected", [(300.0, "met"), (430.0, "undecided"), (600.0, "missed")])
def test_verdict(jax_median, expected):
    interval = stats.ratio_interval(lognormal_times(jax_median, 0.05, 12, 5), lognormal_times(430.0, 0.05, 12, 6))
    assert stats.verdict(interval) == expected


def test_too_few_calls_give_no_interval():
    interval = stats.ratio_interval([10.0, 11.0, 12.0, 13.0], [10.0, 10.0, 10.0, 10.0, 10.0])
    assert interval["ratio"] == pytest.approx(1.15)
    assert interval["low"] is None and interval["high"] is None
    assert stats.verdict(interval).startswith("undecided (< 5 calls)")


def two_stage_reference(jax_ms, torch_ms, level, resamples, seed):
    """The two-stage bootstrap written out one resample at a time: processes with replacement, then calls."""
    rng = np.random.default_rng(seed)

    def median(processes):
        chosen = [processes[i] for i in rng.integers(len(processes), size=len(processes))]
        return np.median(np.concatenate([rng.choice(calls, size=len(calls)) for calls in chosen]))

    ratios = [median(jax_ms) / median(torch_ms) for _ in range(resamples)]
    return np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])


def process_times(medians, spread, calls, seed):
    return np.stack([lognormal_times(m, spread, calls, seed + i) for i, m in enumerate(medians)])


@pytest.mark.parametrize("jax_medians", [(400.0, 480.0), (430.0, 445.0, 470.0)])
def test_two_stage_interval_matches_a_direct_loop(jax_medians):
    jax_ms = process_times(jax_medians, 0.02, 9, seed=10)
    torch_ms = process_times((440.0, 450.0), 0.02, 9, seed=20)
    ours = stats.ratio_interval(jax_ms, torch_ms, resamples=20_000)
    low, high = two_stage_reference(list(jax_ms), list(torch_ms), 0.95, 20_000, seed=3)
    assert ours["low"] == pytest.approx(low, rel=0.01) and ours["high"] == pytest.approx(high, rel=0.01)
    assert ours["ratio"] == pytest.approx(np.median(jax_ms) / np.median(torch_ms), rel=1e-12)
    assert ours["processes"] == [len(jax_medians), 2] and ours["calls"] == [9 * len(jax_medians), 18]


def test_process_differences_widen_the_interval():
    """Two JAX processes 20 % apart, each with tight calls: one process's calls claim a narrow interval that misses
    the other process's ratio; both processes, resampled in two stages, cover both, a little beyond what their pooled
    calls resampled as one process give."""
    jax_ms = process_times((400.0, 480.0), 0.01, 12, seed=30)
    torch_ms = process_times((440.0, 440.0), 0.01, 12, seed=40)
    alone = stats.ratio_interval(jax_ms[0], torch_ms[0])
    assert alone["high"] < 0.95 and stats.verdict(alone) == "met"
    flat = stats.ratio_interval(jax_ms.ravel(), torch_ms.ravel())
    two_stage = stats.ratio_interval(jax_ms, torch_ms)
    assert two_stage["low"] < 400 / 440 * 1.01 and two_stage["high"] > 480 / 440 * 0.99
    assert two_stage["low"] <= flat["low"] and two_stage["high"] >= flat["high"]
    assert stats.verdict(two_stage) == "undecided"
    one = lognormal_times(450.0, 0.05, 9, seed=50)
    assert stats.ratio_interval(one[None], one[::-1][None]) == stats.ratio_interval(one, one[::-1])


@pytest.mark.parametrize("bad", [[], [1.0, np.nan, 2.0], [1.0, 0.0, 2.0], [[1.0, 2.0], [1.0]], [[[1.0, 2.0]]]])
def test_bad_times_raise(bad):
    with pytest.raises(ValueError, match="jax_ms: expected a non-empty list of positive, finite times, or one such"):
        stats.ratio_interval(bad, [1.0] * 5)


def test_worker_processes_alternate_and_pool():
    assert workers.process_order(1) == ["jax", "torch"]
    assert workers.process_order(3) == ["jax", "torch", "torch", "jax", "jax", "torch"]
    runs = [{"all_ms": [3.0, 1.0, 2.0], "loss": 0.5, "rss_increase_mib": 600.0, "rss_peak_steps_mib": 2600.0,
             "rss_peak_first_call_mib": 2500.0},
            {"all_ms": [6.0, 5.0, 4.0], "loss": 0.5, "rss_increase_mib": 1200.0, "rss_peak_steps_mib": 3100.0,
             "rss_peak_first_call_mib": 2400.0}]
    merged = workers.pooled(runs)
    assert merged["process_ms"] == [[3.0, 1.0, 2.0], [6.0, 5.0, 4.0]] and merged["median_ms"] == 3.5
    assert merged["rss_increase_mib"] == 1200.0 and merged["rss_increase_per_process_mib"] == [600.0, 1200.0]
    assert merged["rss_peak_first_call_mib"] == 2500.0 and merged["loss"] == 0.5
    timing = {"median_ms": 1.0, "all_ms": [1.0] * 6}
    rows = report.comparisons({"lora_step": {"jax": {**merged, "grad_norm": 0.1}, "torch": {**timing, "loss": 0.5,
                                                                                          "grad_norm": 0.1}}})
    assert rows[0]["interval"]["processes"] == [2, 1]


def test_table_prints_interval_and_verdict():
    def timing(median_ms, seed):
        times = lognormal_times(median_ms, 0.03, 8, seed)
        return {"median_ms": float(np.median(times)), "all_ms": times.tolist()}

    results = {"transformer": {"tiny": {"jax_fwd": timing(100, 1), "torch_fwd": timing(200, 2),
                                        "jax_fwd_bwd": timing(400, 3), "torch_fwd_bwd": timing(200, 4),
                                        "max_abs_diff_out": 2e-5, "loss_jax": 1.0, "loss_torch": 1.0}}}
    lines = report.table(results)
    forward, backward = lines[1], lines[2]
    assert forward.startswith("transformer tiny forward ") and " met " in forward and "max|Δout| 2.0e-05" in forward
    assert backward.startswith("transformer tiny forward+backward") and " missed " in backward
    rows = report.comparisons(results)
    assert [r["verdict"] for r in rows] == ["met", "missed"]
    assert f"[{rows[0]['interval']['low']:.2f}, {rows[0]['interval']['high']:.2f}]" in forward


def test_warm_up_repeats_while_calls_grow_the_heap(monkeypatch):
    """A call that page-faults more than SETTLED_FAULTS times counts as warm-up; the first call that does not ends
    it, and a function that never settles stops at MAX_WARMUP_CALLS. (The fault counter is driven by the function:
    how many faults touching fresh memory costs depends on the kernel's huge-page setting.)"""
    counter = {"faults": 0}
    monkeypatch.setattr(measure, "minor_faults", lambda: counter["faults"])
    calls = []

    def grows_three_times():
        calls.append(None)
        counter["faults"] += 10_000 if len(calls) <= 3 else 5

    warm = measure.warm_up(grows_three_times)
    assert len(warm["warmup_ms"]) == 4 and warm["warmup_faults"] == [10_000, 10_000, 10_000, 5]
    assert warm["first_ms"] == warm["warmup_ms"][0]

    def always_grows():
        counter["faults"] += 10_000

    assert len(measure.warm_up(always_grows)["warmup_ms"]) == measure.MAX_WARMUP_CALLS
    first = []
    timing = measure.timed(lambda: None, 6, warmup=lambda: first.append(None))
    assert len(timing["all_ms"]) == 6 and len(timing["warmup_ms"]) == 1 and first == [None]


def test_dpo_step_matches_torch():
    """The JAX DPO step (`sr.dpo_loss`) and the torch one agree on the first step's loss, Δ and gradient norm."""
    ours, theirs = steps.dpo_step_jax(MINI, 1), steps.dpo_step_torch(MINI, 1)
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-3)
    assert ours["delta"] == pytest.approx(theirs["delta"], abs=1e-6)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)


def test_lora_step_loss_takes_the_setup():
    """The LoRA step's loss (`sr.sft_loss`, LPIPS frozen) traces on the bench's setup and reports every term (shapes
    only: compiling the decoder and LPIPS backward is what the bench itself measures)."""
    from foa_jax import sr
    from foa_jax.models import layers
    from ports.lpips_weights import load_lpips_params

    s = steps.sft_setup(MINI)
    models = sr.Models(s.params, s.vae_params, jax.numpy.asarray(s.prompt), MINI.config, steps.TINY_VAE)
    frozen = {"models": models, "lpips": layers.with_frozen_conv_kernels(load_lpips_params(s.loss.lpips_net))}
    loss = sr.sft_loss("lora", s.loss, MINI.grid, 1.0, steps.LORA.scale)
    value, terms = jax.eval_shape(loss, s.adapter, frozen, s.batch, jax.random.PRNGKey(0), 0)
    assert value.shape == () and {"fm", "pix", "lpips"} <= set(terms)
