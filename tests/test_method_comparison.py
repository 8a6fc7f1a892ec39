"""compare_interventions / compare_methods: the SPLIT paper's comparison table on any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model, no_hooks_left
from test_split import HELD_OUT, PAIRS

import tl_steer
from tl_steer import AddVector
from tl_steer.analysis.method_comparison import compare_interventions, compare_methods
from tl_steer.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def test_table_matches_an_independent_pair_nll(tiny_any) -> None:
    model = tiny_any
    hook = "blocks.1.hook_resid_post"
    gen = torch.Generator().manual_seed(0)
    a = AddVector(hook, torch.randn(32, generator=gen, dtype=torch.float64), method="a")
    b = AddVector(hook, torch.randn(32, generator=gen, dtype=torch.float64), method="b", unit=3.0)
    result = compare_interventions(model, {"a": a, "b": b}, HELD_OUT, progress=False)
    table = result.table.set_index("condition")
    assert table.loc["a", "unit"] == 1.0 and table.loc["b", "unit"] == 3.0
    assert "m_trained" not in table and "r_low" not in table
    for name, iv, raw in (("a", a, 1.0), ("b", b, 3.0)):
        # Independently: the vector at raw strength 3 is b at m = 1.
        unscaled = AddVector(hook, iv.vector)
        lp, ln = tl_steer.pair_nll(model, HELD_OUT, interventions=[unscaled], m=raw)
        lp0, ln0 = tl_steer.pair_nll(model, HELD_OUT)
        pref, pref0 = float((ln - lp).double().mean()), float((ln0 - lp0).double().mean())
        assert table.loc[name, "pref_odds"] == pytest.approx(pref, abs=1e-5)
        assert table.loc[name, "d_pref"] == pytest.approx(pref - pref0, abs=1e-5)
        util = torch.logaddexp(-lp.double(), -ln.double())
        util = float((util - torch.log(-torch.expm1(util))).mean())
        assert table.loc[name, "util_odds"] == pytest.approx(util, abs=1e-5)
        assert table.loc[name, "pref_odds_low"] <= table.loc[name, "pref_odds"] <= table.loc[name, "pref_odds_high"]
    # every sweep ran over the same m: each intervention's m = 1 is its own strength
    for label in ("a", "b"):
        ms = sorted(result.sweeps.table.query(f"label == '{label}'")["m"].unique())
        assert ms == pytest.approx([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0])
    assert no_hooks_left(model)


def test_utility_range_follows_the_sweep(model) -> None:
    hook = "blocks.1.hook_resid_post"
    small = AddVector(hook, 0.05 * torch.ones(32, dtype=torch.float64), method="small", unit=2.0)
    result = compare_interventions(model, {"small": small}, HELD_OUT, within=0.002, progress=False)
    row = result.table.iloc[0]
    summary = result.sweeps.summary().query("label == 'small'").set_index("m")["util_odds"]
    floor = summary.loc[0.0] - 0.002
    # independent walk: the widest run of grid points around 0 whose utility stays above the floor
    inside = [
        m for m in summary.index if all(summary.loc[k] >= floor for k in summary.index if min(0, m) <= k <= max(0, m))
    ]
    assert (row["m_low"], row["m_high"]) == (min(inside), max(inside))
    assert row["m_high"] < 2.0, "on this model utility falls by more than 0.002 before m = 2"
    text = result.to_markdown()
    assert "| small | 2 |" in text and "within 0.002" in text


def test_compare_methods_trains_every_condition(model, tmp_path) -> None:
    result = compare_methods(
        model,
        PAIRS,
        HELD_OUT,
        1,
        forms=("vector", "lora"),
        train_kwargs={"epochs": 1, "batch_size": 4},
        split_kwargs={"theta": 1.0},
        ms=(0.0, 1.0),
        progress=False,
    )
    assert list(result.table["condition"]) == ["diffmean", "sft/vector", "split/vector", "sft/lora", "split/lora"]
    assert list(result.table["method"]) == ["diffmean", "sft", "split", "sft", "split"]
    assert np.isfinite(result.table["train_s"]).all()
    assert result.table.set_index("condition").loc["split/vector", "unit"] == 11.0
    fig_path = tmp_path / "comparison.png"
    result.plot(fig_path)
    assert fig_path.stat().st_size > 10_000
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forms": ("vector", "mlp")}, "valid forms: vector, lora, local_weight"),
        ({"objectives": ("dpo",)}, "valid objectives: sft, split"),
        ({"layer": 7}, "layer must be an integer in [0, 2]"),
    ],
)
def test_compare_methods_bad_input(model, kwargs, message) -> None:
    args = {"forms": ("vector",), "layer": 1, **kwargs}
    layer = args.pop("layer")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        compare_methods(model, PAIRS, HELD_OUT, layer, **args, progress=False)


def test_compare_interventions_bad_input(model) -> None:
    iv = AddVector("blocks.1.hook_resid_post", torch.ones(32, dtype=torch.float64))
    with pytest.raises(ConfigError, match="must include 0 and 1"):
        compare_interventions(model, {"a": iv}, HELD_OUT, ms=(0.0, 2.0))
    with pytest.raises(ConfigError, match="no interventions"):
        compare_interventions(model, {}, HELD_OUT)
    # The old spelling still works, with a deprecation warning.
    with pytest.warns(DeprecationWarning, match="relative="):
        old = compare_interventions(model, {"a": iv}, HELD_OUT, relative=(0.0, 1.0), progress=False)
    assert sorted(old.sweeps.table["m"].unique()) == [0.0, 1.0]
