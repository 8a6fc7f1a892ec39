"""Preference-utility sweep: log-odds, the cached-prefix path, the decay fit, results and bad input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import no_hooks_left

import tl_steer
from tl_steer import AddVector, ContrastivePair
from tl_steer.analysis.decay import curve, fit_decay
from tl_steer.analysis.preference_utility import log_odds, preference_utility


@pytest.fixture(scope="module")
def tiny(tiny_host):
    """The tiny Llama on either host: each test here that takes ``tiny`` runs on a HookedTransformer and on a
    TransformerBridge (conftest's ``tiny_host``)."""
    return tiny_host


PAIRS = [
    ContrastivePair("The film was", " wonderful and the staff were kind.", " awful and the staff were rude."),
    ContrastivePair("I went to the market and", " bought fresh bread.", " found stale bread."),
    ContrastivePair("hello world, the weather is", " fine today.", " cold and wet today."),
    ContrastivePair("The food was", " wonderful and fresh.", " awful and cold."),
    ContrastivePair("the world is", " wide and kind.", " cold and dirty."),
]
MS = (-2.0, -1.0, 0.0, 1.0, 2.0)


def vector(model, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=model.cfg.dtype)


def test_log_odds_formula_and_clipping():
    L_p, L_n = np.array([2.0, 0.1]), np.array([3.0, 0.2])
    pref, util, clipped = log_odds(L_p, L_n, eps=1e-6)
    np.testing.assert_allclose(pref, [1.0, 0.1])
    p_u = math.exp(-2.0) + math.exp(-3.0)
    assert util[0] == pytest.approx(math.log(p_u / (1 - p_u)), rel=1e-12)
    # exp(-0.1) + exp(-0.2) > 1: clipped to 1 - eps, finite, and counted.
    assert clipped.tolist() == [False, True]
    assert util[1] == pytest.approx(math.log((1 - 1e-6) / 1e-6), rel=1e-6)
    assert np.isfinite(util).all()


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out"])
@pytest.mark.parametrize("policy", ["all", "generated"])
def test_cached_prefix_equals_plain_forward_and_pair_nll(tiny_any, hook, policy):
    model = tiny_any
    iv = AddVector(hook, vector(model), positions=policy)
    fast = preference_utility(model, iv, PAIRS, MS, progress=False, batch_size=3)
    slow = preference_utility(model, iv, PAIRS, MS, progress=False, cache_prefix=False, batch_size=3)
    np.testing.assert_allclose(fast.table[["L_p", "L_n"]], slow.table[["L_p", "L_n"]], rtol=0, atol=1e-5)
    for m in MS:
        L_p, L_n = tl_steer.pair_nll(model, PAIRS, interventions=[iv], m=m)
        part = fast.table[fast.table["m"] == m]
        np.testing.assert_allclose(part["L_p"], L_p.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(part["L_n"], L_n.numpy(), rtol=0, atol=1e-5)
    assert no_hooks_left(model)


def test_the_table_the_summary_and_files(tiny, tmp_path):
    iv = AddVector("blocks.1.hook_resid_post", vector(tiny), method="diffmean")
    result = preference_utility(tiny, iv, PAIRS, MS, progress=False)
    table = result.table
    assert len(table) == len(PAIRS) * len(MS)
    np.testing.assert_allclose(table["pref_odds"], table["L_n"] - table["L_p"])
    summary = result.summary()
    assert list(summary["m"]) == list(MS) and set(summary["label"]) == {"diffmean"}
    row = summary[summary["m"] == 1.0].iloc[0]
    assert row["pref_odds_low"] <= row["pref_odds"] <= row["pref_odds_high"]
    assert row["pref_odds"] == pytest.approx(table[table["m"] == 1.0]["pref_odds"].mean())
    csv = result.to_csv(tmp_path / "pu.csv")
    assert pd.read_csv(csv).shape == table.shape
    png = tmp_path / "pu.png"
    result.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompting_baseline_and_combined_results(tiny, tmp_path):
    instruction = "Answer in a positive way."
    prompted = preference_utility(tiny, None, PAIRS, instruction=instruction, progress=False)
    assert prompted.labels == ["prompting"] and set(prompted.table["m"]) == {0.0}
    with_text = [ContrastivePair(f"{instruction}\n{p.prompt}", p.positive, p.negative) for p in PAIRS]
    L_p, _ = tl_steer.pair_nll(tiny, with_text)
    np.testing.assert_allclose(prompted.table["L_p"], L_p.numpy(), atol=1e-6)
    clean = preference_utility(tiny, None, PAIRS, progress=False)
    assert not np.allclose(clean.table["L_p"], prompted.table["L_p"])
    steered = preference_utility(tiny, AddVector("blocks.1.hook_resid_post", vector(tiny)), PAIRS, MS, progress=False)
    both = tl_steer.PreferenceUtilityResult.concat([clean, prompted, steered])
    assert both.labels == ["clean", "prompting", "add_vector"]
    both.plot(tmp_path / "all.png")
    assert (tmp_path / "all.png").stat().st_size > 10_000


def test_bad_grids_and_non_finite_nll(tiny):
    iv = AddVector("blocks.1.hook_resid_post", vector(tiny))
    with pytest.raises(ValueError, match="empty"):
        preference_utility(tiny, iv, PAIRS, [], progress=False)
    with pytest.raises(ValueError, match="finite"):
        preference_utility(tiny, iv, PAIRS, [0.0, float("nan")], progress=False)
    with pytest.warns(UserWarning, match="no m = 0"):
        preference_utility(tiny, iv, PAIRS, [1.0, 2.0], progress=False)
    # A strength that overflows the activations is refused at the first steered pass, naming m and the hook.
    with pytest.raises(tl_steer.ConfigError, match=r"m=1e\+308 is too large at 'blocks"):
        preference_utility(tiny, iv, PAIRS, [0.0, 1e308], progress=False)
    with pytest.raises(tl_steer.DataError, match="empty"):
        preference_utility(tiny, iv, [], MS, progress=False)
    assert no_hooks_left(tiny)


def test_decay_fit_recovers_known_parameters():
    p_plus, m_plus, L_plus, m_minus, L_minus = 1.5, 0.5, 2.0, -0.4, 3.0
    p_minus = p_plus * math.log1p(m_plus**2 / L_plus) / math.log1p(m_minus**2 / L_minus)  # continuity at 0
    decay = dict(m_plus=m_plus, L_plus=L_plus, p_plus=p_plus, m_minus=m_minus, L_minus=L_minus, p_minus=p_minus)
    m = np.linspace(-6, 6, 49)
    pref_true = dict(alpha=1.2, beta=0.3, b=-0.2, **decay)
    util_true = dict(beta=4.0, b=-6.0, **decay)
    for kind, truth in (("pref", pref_true), ("util", util_true)):
        y = curve(m, truth, kind)
        fit = fit_decay(m, y, kind=kind)
        assert fit.r2 > 0.9999
        for name, value in truth.items():
            assert fit.params[name] == pytest.approx(value, rel=0.05, abs=0.02), (kind, name)
        np.testing.assert_allclose(fit(m), y, atol=1e-3)


def test_decay_fit_is_continuous_at_zero_and_reaches_r2_on_noisy_data():
    rng = np.random.default_rng(0)
    m = np.linspace(-4, 4, 17)
    truth = dict(alpha=0.8, beta=0.5, b=0.1, m_plus=0.3, L_plus=1.5, p_plus=1.0, m_minus=-0.3, L_minus=1.5, p_minus=1.0)
    y = curve(m, truth, "pref") + rng.normal(0, 0.02, m.shape)
    fit = fit_decay(m, y, kind="pref")
    assert fit.r2 > 0.97
    assert fit(np.array([-1e-9]))[0] == pytest.approx(fit(np.array([0.0]))[0], abs=1e-5)
    with pytest.raises(ValueError, match="both sides"):
        fit_decay(np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), np.zeros(6))


def test_result_fit_and_plot_overlay(tiny, tmp_path):
    iv = AddVector("blocks.1.hook_resid_post", vector(tiny, scale=6.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = preference_utility(tiny, iv, PAIRS, np.linspace(-4, 4, 9), progress=False)
    fits = result.fit_decay()
    assert set(fits["add_vector"]) == {"pref", "util"}
    assert all(0.0 <= f.r2 <= 1.0 for f in fits["add_vector"].values())
    result.plot(tmp_path / "fit.png", fit=True)
    assert (tmp_path / "fit.png").exists()


def test_utility_range_walks_out_from_zero():
    util = {-3.0: -9.0, -2.0: -3.5, -1.0: -3.2, 0.0: -3.0, 1.0: -3.9, 2.0: -4.5, 3.0: -3.1}
    rows = [
        {
            "label": "x",
            "m": m,
            "pair": 0,
            "L_p": 1.0,
            "L_n": 1.0,
            "pref_odds": 0.0,
            "util_odds": u,
            "util_clipped": False,
        }
        for m, u in util.items()
    ]
    result = tl_steer.PreferenceUtilityResult(pd.DataFrame(rows), "mean", 1e-6)
    out = result.utility_range(within=1.0).iloc[0]
    # -2 and -1 stay within 1 of -3.0; -3 drops out. +1 stays, +2 drops, so +3 is not reached.
    assert (out["m_low"], out["m_high"], out["util_at_0"]) == (-2.0, 1.0, -3.0)
