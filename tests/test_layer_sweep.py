"""Layer sweeps: the NLLs against per-layer preference-utility sweeps, the block-call count, DiffMean at all
layers from one pass, the best-layer rule, the figure and bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_bridge, make_host_pair, make_model, no_hooks_left

import tl_steer
from tl_steer import ContrastivePair
from tl_steer.analysis.layer_sweep import _sweep_layers, choose_best_layer, diffmean_layers, layer_count, layer_sweep
from tl_steer.analysis.preference_utility import _tokenize_pairs, preference_utility
from tl_steer.errors import ConfigError, HookNameError

PAIRS = [
    ContrastivePair("The film was", " wonderful and the staff were kind.", " awful and the staff were rude."),
    ContrastivePair("I went to the market and", " bought fresh bread.", " found stale bread."),
    ContrastivePair("hello world, the weather is", " fine today.", " cold and wet today."),
    ContrastivePair("The food was", " wonderful and fresh.", " awful and cold."),
]
TEST = [
    ContrastivePair("the world is", " wide and kind.", " cold and dirty."),
    ContrastivePair("The staff were", " kind and friendly.", " rude and cold."),
]
MS = (-1.0, 0.0, 1.0, 2.0)


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def model(request):
    # The tiny Llama on either host (the bridge's sweeps run every pass from the embedding).
    return make_model("llama", d_model=32) if request.param == "hooked" else make_bridge("llama")


@pytest.mark.parametrize("hook", ["resid_post", "resid_pre", "blocks.{layer}.hook_mlp_out"])
def test_nll_equals_per_layer_preference_utility(model, one_thread, hook):
    result = layer_sweep(
        model, "diffmean", PAIRS, [0, 1, 2], MS, hook=hook, test_pairs=TEST, batch_size=3, progress=False
    )
    for layer, iv in result.interventions.items():
        name = hook.format(layer=layer) if "{" in hook else f"blocks.{layer}.hook_{hook}"
        assert iv.hook_names == (name,)
        for split, items in (("train", PAIRS), ("test", TEST)):
            # The independent path: the plain per-strength full forward pass, no prefix reuse.
            ref = preference_utility(model, iv, items, MS, progress=False, cache_prefix=False, batch_size=2).table
            part = result.table[(result.table["layer"] == layer) & (result.table["split"] == split)]
            np.testing.assert_allclose(part[["L_p", "L_n"]], ref[["L_p", "L_n"]], rtol=0, atol=1e-5)
            np.testing.assert_allclose(part["util_odds"], ref["util_odds"], rtol=0, atol=1e-5)
    assert no_hooks_left(model)


def test_diffmean_at_every_layer_from_one_pass_equals_diffmean(model, one_thread):
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(3)]
    calls = []
    handle = model.embed.register_forward_hook(lambda *args: calls.append(1))
    try:
        vectors = diffmean_layers(model, PAIRS, hooks, batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1  # 8 sequences, one batch: one pass for all three layers
    for h in hooks:
        ref = tl_steer.diffmean(model, PAIRS, h)
        torch.testing.assert_close(vectors[h].vector, ref.vector, rtol=0, atol=1e-10)


def count_block_calls(model, run):
    counts = [0] * model.cfg.n_layers
    handles = [
        block.register_forward_hook(lambda *args, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return counts


def test_block_calls_follow_the_layer_count_theory(one_thread):
    model = make_model("llama", d_model=32)
    model4 = make_model("gpt2", d_model=32)  # another architecture, still 3 blocks
    for m in (model, model4):
        vectors = diffmean_layers(m, PAIRS, [f"blocks.{i}.hook_resid_post" for i in range(3)])
        ivs = {i: vectors[f"blocks.{i}.hook_resid_post"] for i in range(3)}
        data = _tokenize_pairs(m, PAIRS, False)  # 8 rows
        for iv in ivs.values():
            iv.check(m)  # reads the hook widths with a 2-token pass, once per model: not counted below
        # batch_size 8: one batch; grid of 4 strengths, 3 of them non-zero.
        counts = count_block_calls(
            m, lambda m=m, ivs=ivs, data=data: _sweep_layers(m, ivs, data, list(MS), "mean", 8, False, "")
        )
        # Block b runs in the clean pass and for every (layer l <= b, m != 0). Layer 0 cannot restart
        # (nothing before it), so it runs from the embedding: still blocks 0..2.
        assert counts == [1 + 3 * 1, 1 + 3 * 2, 1 + 3 * 3]
        sweep, separate = layer_count(3, [0, 1, 2], 3)
        assert sum(counts) == sweep
        # Separate cached-prefix sweeps (one per layer, m = 0 included in each) for comparison.
        sep = count_block_calls(
            m,
            lambda m=m, ivs=ivs: [
                preference_utility(m, iv, PAIRS, MS, progress=False, batch_size=8) for iv in ivs.values()
            ],
        )
        assert sum(sep) == separate
        assert sum(counts) < sum(sep)


def test_on_the_bridge_every_pass_runs_every_block(one_thread):
    # A bridge cannot restart at a later block (no start_at_layer): the same sweep runs every block in the
    # clean pass and in every (layer, m != 0) pass, and gives the NLLs of the HookedTransformer's restarts.
    hooked, bridge = make_host_pair("llama")
    vectors = diffmean_layers(hooked, PAIRS, [f"blocks.{i}.hook_resid_post" for i in range(3)])
    ivs = {i: vectors[f"blocks.{i}.hook_resid_post"] for i in range(3)}
    data = _tokenize_pairs(bridge, PAIRS, False)
    for iv in ivs.values():
        iv.check(bridge)
    tables = {}
    for name, m in (("hooked", hooked), ("bridge", bridge)):
        counts = count_block_calls(
            m,
            lambda m=m, name=name: tables.__setitem__(
                name, _sweep_layers(m, ivs, data, list(MS), "mean", 8, False, "")
            ),
        )
        expected = [1 + 3 * 1, 1 + 3 * 2, 1 + 3 * 3] if name == "hooked" else [1 + 3 * 3] * 3
        assert counts == expected, name
    (clean_a, by_layer_a), (clean_b, by_layer_b) = tables["hooked"], tables["bridge"]
    np.testing.assert_allclose(clean_b, clean_a, rtol=1e-5, atol=1e-5)
    for layer in ivs:
        np.testing.assert_allclose(by_layer_b[layer], by_layer_a[layer], rtol=1e-5, atol=1e-5)


def summary_table(rows):
    return pd.DataFrame(rows, columns=["split", "layer", "m", "pref_gain", "util_change"])


def test_best_layer_follows_its_rule():
    rows = [
        # train: layer 4 has the largest gain but loses 1.5 nats of utility; layer 8 is the best allowed.
        ("train", 2, 1.0, 0.5, -0.2),
        ("train", 4, 1.0, 3.0, -1.5),
        ("train", 8, 1.0, 2.0, -0.9),
        ("train", 8, 2.0, 9.0, 0.0),  # another strength: ignored at m = 1
        ("test", 2, 1.0, 0.4, -0.1),
        ("test", 4, 1.0, 2.0, -1.0),
        ("test", 8, 1.0, 1.7, -0.6),
    ]
    best = choose_best_layer(summary_table(rows))
    assert best.layer == 8
    assert (best.train_pref_gain, best.train_util_change) == (2.0, -0.9)
    assert (best.test_pref_gain, best.test_util_change) == (1.7, -0.6)
    assert choose_best_layer(summary_table(rows), within=2.0).layer == 4
    assert choose_best_layer(summary_table(rows), m=2.0).layer == 8
    assert choose_best_layer(summary_table(rows), within=0.1).layer is None
    with pytest.raises(ConfigError, match="no m = 3"):
        choose_best_layer(summary_table(rows), m=3.0)
    no_test = choose_best_layer(summary_table(rows[:4]))
    assert no_test.layer == 8 and np.isnan(no_test.test_pref_gain)


def test_result_summary_best_layer_plot_and_files(model, one_thread, tmp_path):
    result = layer_sweep(model, "diffmean", PAIRS, [1, 2], (0.0, 1.0), test_pairs=TEST, progress=False)
    summary = result.summary()
    assert set(summary["split"]) == {"train", "test"} and result.layers == [1, 2]
    clean = summary[summary["m"] == 0.0]
    assert (clean["pref_gain"] == 0).all() and (clean["util_change"] == 0).all()
    # The gain is the mean of per-pair differences to m = 0.
    t = result.table
    for layer in (1, 2):
        a = t[(t.split == "train") & (t.layer == layer) & (t.m == 1.0)]["pref_odds"].to_numpy()
        b = t[(t.split == "train") & (t.layer == layer) & (t.m == 0.0)]["pref_odds"].to_numpy()
        row = summary[(summary.split == "train") & (summary.layer == layer) & (summary.m == 1.0)]
        assert float(row["pref_gain"].iloc[0]) == pytest.approx((a - b).mean())
    best = result.best_layer()
    assert best == choose_best_layer(summary)
    fig = result.plot(tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 0 and fig is not None
    assert len(pd.read_csv(result.to_csv(tmp_path / "t.csv"))) == len(result.table)


def test_a_callable_method(model, one_thread):
    def method(m, pairs, hook):
        return tl_steer.AddVector(hook, torch.ones(m.cfg.d_model, dtype=m.cfg.dtype))

    result = layer_sweep(model, method, PAIRS, [1], (0.0, 1.0), progress=False)
    assert result.interventions[1].hook_names == ("blocks.1.hook_resid_post",)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [3]}, ConfigError, "past the model"),
        ({"layers": [-1]}, ConfigError, "past the model"),
        ({"layers": []}, ConfigError, "layer grid is empty"),
        ({"layers": [1, 1]}, ConfigError, "repeated layers"),
        ({"layers": 1}, ConfigError, "sequence of block indices"),
        ({"ms": []}, ConfigError, "empty"),
        ({"ms": [1.0, 1.0]}, ConfigError, "repeated"),
        ({"hook": "blocks.1.hook_resid_post"}, ConfigError, "names one layer"),
        ({"hook": "blocks.{layer}.hook_nothing"}, HookNameError, "no hook point"),
        ({"method": "nonsense"}, ConfigError, "method must be"),
    ],
)
def test_bad_input_raises_before_any_work(model, kwargs, error, match):
    calls = []
    handle = model.embed.register_forward_hook(lambda *args: calls.append(1))
    args = {"method": "diffmean", "layers": [1], "ms": MS, **kwargs}
    try:
        with pytest.raises(error, match=match):
            layer_sweep(model, args.pop("method"), PAIRS, args.pop("layers"), args.pop("ms"), progress=False, **args)
    finally:
        handle.remove()
    assert not calls and no_hooks_left(model)


def test_split_vector_at_each_layer_equals_split_there(model, one_thread):
    pairs = PAIRS * 2  # SPLIT needs at least batch_size (8) pairs
    result = layer_sweep(model, "split_vector", pairs, [1, 2], (0.0, 1.0), progress=False)
    for layer in (1, 2):
        ref, _ = tl_steer.split(model, pairs, layer, "vector", progress=False)
        got = result.interventions[layer]
        assert got.hook_names == ref.hook_names == (f"blocks.{layer}.hook_resid_post",)
        torch.testing.assert_close(got.vector, ref.vector)
    with pytest.raises(ConfigError, match="resid_post"):
        layer_sweep(model, "split_vector", pairs, [1], (0.0, 1.0), hook="resid_pre", progress=False)


@pytest.mark.parametrize("arch", ["gpt2", "neox"])
def test_nll_equals_per_layer_sweep_under_a_position_policy(one_thread, arch):
    model = make_model(arch)

    def method(m, pairs, hook):
        g = torch.Generator().manual_seed(len(hook))
        return tl_steer.AddVector(
            hook, torch.randn(m.cfg.d_model, generator=g, dtype=m.cfg.dtype), positions="generated"
        )

    result = layer_sweep(model, method, PAIRS, [2, 1], MS, hook="resid_pre", batch_size=3, progress=False)
    for layer, iv in result.interventions.items():
        ref = preference_utility(model, iv, PAIRS, MS, progress=False, cache_prefix=False).table
        part = result.table[result.table["layer"] == layer]
        np.testing.assert_allclose(part[["L_p", "L_n"]], ref[["L_p", "L_n"]], rtol=0, atol=1e-5)
