"""The two hosts, HookedTransformer and TransformerBridge: hosts.py's own functions, hook names in either
spelling, and one result on either host for the core (DiffMean, steering, scoring, the analyses) on tiny
models with the same weights (make_host_pair: one Hugging Face model converted and wrapped)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BRIDGE_ARCHITECTURES, MC_QUESTIONS, SENTIMENT_PAIRS, make_hf, make_host_pair, no_hooks_left

import tl_steer
from tl_steer import AddVector, ContrastivePair, HookNameError, MCItem
from tl_steer.hookpoints import HookSite, bridge_equivalent, hooked_equivalent, validate_hook
from tl_steer.hosts import can_restart, canonical_name, check_host, fired_name, is_bridge, is_hooked
from tl_steer.prefix import PrefixCache, reusable_start
from tl_steer.scoring import tokenize_completions

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [ContrastivePair(*t) for t in SENTIMENT_PAIRS[:4]]
MC = [MCItem(*t) for t in MC_QUESTIONS[:3]]
HOOK = "blocks.1.hook_resid_post"
TEXT = "hello world, the weather is fine"
# The two hosts of a pair agree to ~1e-6 relative (the Llama conversion passes through float32).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=BRIDGE_ARCHITECTURES)
def pair(request: pytest.FixtureRequest):
    return make_host_pair(request.param)


@pytest.fixture(scope="module")
def llama_pair():
    return make_host_pair("llama")


# ----- hosts.py ---------------------------------------------------------------------------------------------
def test_host_predicates_and_restart(llama_pair):
    hooked, bridge = llama_pair
    assert is_hooked(hooked) and not is_bridge(hooked) and can_restart(hooked)
    assert is_bridge(bridge) and not is_hooked(bridge) and not can_restart(bridge)
    assert reusable_start(hooked, 1) == 1 and reusable_start(bridge, 1) is None


def test_a_model_that_is_neither_host_is_told_how_to_wrap_it():
    hf = make_hf("llama")
    with pytest.raises(TypeError, match="bridge_from_hf"):
        check_host(hf)
    for call in (
        lambda: tl_steer.diffmean(hf, PAIRS, HOOK),
        lambda: tl_steer.pair_nll(hf, PAIRS),
        lambda: tl_steer.steer(hf, AddVector(HOOK, torch.ones(32))).__enter__(),
    ):
        with pytest.raises(TypeError, match="HookedTransformer or TransformerBridge"):
            call()


def test_fired_and_canonical_names(llama_pair):
    hooked, bridge = llama_pair
    assert fired_name(bridge, HOOK) == "blocks.1.hook_out"
    assert fired_name(hooked, HOOK) == HOOK
    assert canonical_name(bridge, "blocks.1.hook_out") == HOOK
    assert canonical_name(bridge, "blocks.1.attn.o.hook_in") == "blocks.1.attn.hook_z"
    assert canonical_name(hooked, "blocks.1.hook_out") == "blocks.1.hook_out"


# ----- hook names in either spelling ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", BRIDGE_ARCHITECTURES)
def test_the_static_table_matches_each_bridges_alias_map(arch):
    # hookpoints reads a bridge's own names without a model: its table must be what the bridge itself says.
    from conftest import make_bridge

    bridge = make_bridge(arch)
    flags = {flag: bool(getattr(bridge.cfg, flag, False)) for flag in ("gated_mlp", "parallel_attn_mlp")}
    checked = 0
    for alias, point in bridge.hook_dict.items():
        own = str(point.name)
        if alias == own or alias == "hook_unembed" or own.startswith("rotary_emb."):
            continue  # the logits, and a rotary model's hook_pos_embed: neither fires on a HookedTransformer
        assert hooked_equivalent(own, **flags) == alias, own
        assert bridge_equivalent(alias, **flags) == own, alias
        checked += 1
    # A parallel block's ln2 input is the block's input, not a resid_mid (which it has none of).
    assert hooked_equivalent("blocks.1.ln2.hook_in", **flags) == (
        None if flags["parallel_attn_mlp"] else "blocks.1.hook_resid_mid"
    )
    assert checked >= 14 * bridge.cfg.n_layers  # 14 per block without resid_mid (NeoX), 15 with


@pytest.mark.parametrize(
    "own, hooked",
    [
        ("blocks.2.hook_in", "blocks.2.hook_resid_pre"),
        ("blocks.2.hook_out", "blocks.2.hook_resid_post"),
        ("blocks.2.ln2.hook_in", "blocks.2.hook_resid_mid"),
        ("blocks.2.attn.o.hook_in", "blocks.2.attn.hook_z"),
        ("blocks.2.attn.q.hook_out", "blocks.2.attn.hook_q"),
        ("blocks.2.mlp.out.hook_in", "blocks.2.mlp.hook_post"),
        ("blocks.2.attn.hook_attn_scores", "blocks.2.attn.hook_attn_scores"),
        ("embed.hook_out", "hook_embed"),
        ("ln_final.hook_out", "ln_final.hook_normalized"),
    ],
)
def test_hook_site_reads_either_spelling(own, hooked):
    a, b = HookSite.parse(own), HookSite.parse(hooked)
    assert (a.layer, a.pre_attention, a.first_layer(3)) == (b.layer, b.pre_attention, b.first_layer(3))
    assert a.offset_source(3) == b.offset_source(3)
    assert a.name == own


def test_validate_hook_on_each_host(llama_pair):
    hooked, bridge = llama_pair
    for name in (HOOK, "blocks.1.hook_out", "blocks.1.attn.hook_z", "blocks.1.attn.o.hook_in"):
        assert validate_hook(bridge, name) == name
    with pytest.raises(HookNameError, match="on a HookedTransformer this is 'blocks.1.hook_resid_post'"):
        validate_hook(hooked, "blocks.1.hook_out")
    with pytest.raises(HookNameError, match="on a HookedTransformer this is 'blocks.0.mlp.hook_post'"):
        validate_hook(hooked, "blocks.0.mlp.out.hook_in")
    # The error lists the close names of the model at hand: the bridge's own names too.
    with pytest.raises(HookNameError, match="blocks.1.hook_out"):
        validate_hook(bridge, "blocks.1.hook_outt")
    with pytest.raises(HookNameError, match="3 blocks"):
        validate_hook(bridge, "blocks.7.hook_resid_post")


def test_a_parallel_bridge_says_why_it_has_no_resid_mid():
    from conftest import make_bridge

    with pytest.raises(HookNameError, match="in parallel"):
        validate_hook(make_bridge("neox"), "blocks.1.hook_resid_mid")


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_result", "blocks.1.hook_q_input", "blocks.1.hook_mlp_in"])
def test_flagged_hooks_are_refused_on_the_bridge_until_enabled(llama_pair, name):
    # The bridge, like HookedTransformer, runs these only with a cfg flag: refused before any hook goes on.
    _, bridge = llama_pair
    iv = AddVector(name, torch.ones(32, dtype=torch.float64))
    with pytest.raises(HookNameError, match="set_use_"), tl_steer.steer(bridge, iv):
        pass
    assert no_hooks_left(bridge)


def test_a_hook_the_bridge_lists_but_never_runs_is_refused(llama_pair):
    _, bridge = llama_pair
    iv = AddVector("hook_pos_embed", torch.ones(32, dtype=torch.float64))
    with pytest.raises(HookNameError, match="did not run.*rotary"), tl_steer.steer(bridge, iv):
        pass
    assert no_hooks_left(bridge)


# ----- one result on either host --------------------------------------------------------------------------
def test_diffmean_and_steering_agree_across_hosts(pair):
    hooked, bridge = pair
    on_hooked = tl_steer.diffmean(hooked, PAIRS, HOOK)
    on_bridge = tl_steer.diffmean(bridge, PAIRS, HOOK)
    native = tl_steer.diffmean(bridge, PAIRS, "blocks.1.hook_out")  # the bridge's own name: the same vector
    torch.testing.assert_close(on_bridge.vector, on_hooked.vector, **TOL)
    torch.testing.assert_close(native.vector, on_bridge.vector, rtol=0, atol=0)
    tokens = hooked.to_tokens(TEXT)
    with torch.no_grad():
        clean = hooked(tokens)
        for made_on in (on_hooked, on_bridge):
            with tl_steer.steer(hooked, made_on, m=3.0):
                a = hooked(tokens)
            with tl_steer.steer(bridge, made_on, m=3.0):
                b = bridge(tokens)
            torch.testing.assert_close(b, a, **TOL)
            assert (a - clean).abs().max() > 1e-2  # the steering did something
    assert no_hooks_left(hooked) and no_hooks_left(bridge)


@pytest.mark.parametrize("policy", ["all", "prompt", "generated", "last_prompt"])
def test_scoring_and_generation_agree_across_hosts(llama_pair, policy):
    hooked, bridge = llama_pair
    iv = AddVector(HOOK, tl_steer.diffmean(hooked, PAIRS, HOOK).vector, positions=policy)
    a = tl_steer.pair_nll(hooked, PAIRS, interventions=[iv], m=2.0, batch_size=3)
    b = tl_steer.pair_nll(bridge, PAIRS, interventions=[iv], m=2.0, batch_size=3)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, **TOL)
    out = {}
    for name, model in (("hooked", hooked), ("bridge", bridge)):
        for cache in (True, False):
            with tl_steer.steer(model, iv, m=4.0):
                out[name, cache] = model.generate(
                    "The film was", max_new_tokens=6, do_sample=False, verbose=False, use_past_kv_cache=cache
                )
    assert len(set(out.values())) == 1, out
    assert no_hooks_left(bridge) and "generate" not in vars(bridge)


def test_run_with_cache_under_steering_on_both_hosts(llama_pair):
    # The cache holds the steered activation, under either spelling on the bridge, as on the HookedTransformer.
    hooked, bridge = llama_pair
    v = torch.linspace(-1, 1, 32, dtype=torch.float64)
    tokens = hooked.to_tokens(TEXT)
    caches = {}
    for name, model in (("hooked", hooked), ("bridge", bridge)):
        with torch.no_grad(), tl_steer.steer(model, AddVector(HOOK, v, positions="last_prompt"), m=3.0):
            _, caches[name] = model.run_with_cache(tokens)
    a, b = caches["hooked"][HOOK], caches["bridge"][HOOK]
    torch.testing.assert_close(b, a, **TOL)
    torch.testing.assert_close(caches["bridge"]["blocks.1.hook_out"], b, rtol=0, atol=0)
    with torch.no_grad():
        _, clean = hooked.run_with_cache(tokens)
    delta = a - clean[HOOK]
    torch.testing.assert_close(delta[0, -1], 3.0 * v, **TOL)  # last_prompt: the last position only
    assert delta[0, :-1].abs().max() == 0
    assert no_hooks_left(bridge)


def test_activation_capture_by_alias_on_the_bridge(llama_pair):
    # The bridge calls a hook added as 'blocks.1.hook_resid_post' with the name 'blocks.1.hook_out': code that
    # keys what it captured by hook.name must not lose it (the "did not run in a forward pass").
    hooked, bridge = llama_pair
    data = tokenize_completions(bridge, [p.prompt for p in PAIRS], [p.positive for p in PAIRS])
    from tl_steer.activations import completion_activations

    a = completion_activations(hooked, data, HOOK)
    b = completion_activations(bridge, data, HOOK)
    torch.testing.assert_close(b, a, **TOL)


def test_preference_utility_and_mc_agree_across_hosts(pair):
    hooked, bridge = pair
    iv = tl_steer.diffmean(hooked, PAIRS, HOOK)
    ms = (-1.0, 0.0, 2.0)
    a = tl_steer.preference_utility(hooked, iv, PAIRS, ms, progress=False).table
    b = tl_steer.preference_utility(bridge, iv, PAIRS, ms, progress=False).table
    np.testing.assert_allclose(b[["L_p", "L_n", "util_odds"]], a[["L_p", "L_n", "util_odds"]], **TOL)
    # MC: each host shares each question's keys and values through its own KV cache.
    mc_a = tl_steer.mc_option_nll(hooked, MC, interventions=[iv], m=2.0)
    mc_b = tl_steer.mc_option_nll(bridge, MC, interventions=[iv], m=2.0)
    torch.testing.assert_close(mc_b, mc_a, **TOL)
    assert no_hooks_left(bridge)


def test_layer_sweep_on_the_bridge_equals_per_layer_preference_utility(llama_pair):
    _, bridge = llama_pair
    ms = (-1.0, 0.0, 2.0)
    result = tl_steer.layer_sweep(bridge, "diffmean", PAIRS, [0, 2], ms, batch_size=3, progress=False)
    for layer, iv in result.interventions.items():
        torch.testing.assert_close(
            iv.vector, tl_steer.diffmean(bridge, PAIRS, f"blocks.{layer}.hook_resid_post").vector, **TOL
        )
        ref = tl_steer.preference_utility(bridge, iv, PAIRS, ms, progress=False, cache_prefix=False).table
        part = result.table[result.table["layer"] == layer]
        np.testing.assert_allclose(part[["L_p", "L_n"]], ref[["L_p", "L_n"]], **TOL)
    assert no_hooks_left(bridge)


def test_prefix_cache_falls_back_to_full_passes_on_the_bridge(llama_pair):
    hooked, bridge = llama_pair
    data = tokenize_completions(hooked, [p.prompt for p in PAIRS], [p.positive for p in PAIRS])
    idx = [0, 1, 2]
    tokens, _, lens = data.batch(idx, 2, "cpu")
    restarted = PrefixCache(hooked, data, 1, 4)
    full = PrefixCache(bridge, data, 1, 4)
    assert restarted.enabled and not full.enabled
    with torch.no_grad():
        a, b = restarted.logits(idx, tokens, 2), full.logits(idx, tokens, 2)
        torch.testing.assert_close(b, bridge(tokens)[:, 2:], rtol=0, atol=0)
    for row, n in enumerate(lens.tolist()):  # real positions (the restart leaves padding undefined)
        torch.testing.assert_close(b[row, : n - 2], a[row, : n - 2], **TOL)


def test_ab_and_sample_efficiency_agree_across_hosts(llama_pair):
    from tl_steer import ABItem
    from tl_steer.analysis.sample_efficiency import sample_efficiency

    hooked, bridge = llama_pair
    items = [
        ABItem("Is it fine?", "fine", "cold", "A"),
        ABItem("Was it kind?", "awful", "kind", "B"),
        ABItem("The bread?", "fresh", "awful", "A"),
        ABItem("The room?", "dirty", "fine", "B"),
    ]
    iv = tl_steer.diffmean(hooked, PAIRS, HOOK)
    from tl_steer.analysis.ab import ab_scores

    torch.testing.assert_close(ab_scores(bridge, iv, items, m=2.0), ab_scores(hooked, iv, items, m=2.0), **TOL)
    tables = [
        sample_efficiency(
            model,
            "sentiment",
            ns=(1, 2),
            seeds=(0,),
            hook=HOOK,
            methods=("diffmean", "cold_kernel"),
            m={"diffmean": 1.0, "cold_kernel": 10.0},
            train_items=items,
            test_items=items[:2],
            test_pairs=PAIRS[:2],
        )
        for model in (hooked, bridge)
    ]
    assert tables[0][["method", "N"]].equals(tables[1][["method", "N"]])
    cols = ["ab_margin", "pref_odds"]
    np.testing.assert_allclose(tables[1][cols].to_numpy(float), tables[0][cols].to_numpy(float), **TOL)
    assert no_hooks_left(bridge)


def test_mc_on_the_bridge_shares_each_question_through_hugging_faces_cache(llama_pair, monkeypatch):
    from tl_steer.analysis import capability

    _, bridge = llama_pair
    calls = []
    shared = capability._bridge_shared_logprobs
    monkeypatch.setattr(capability, "_bridge_shared_logprobs", lambda *a: calls.append(1) or shared(*a))
    iv = AddVector(HOOK, torch.ones(32, dtype=torch.float64), positions="generated")
    fast = tl_steer.mc_option_nll(bridge, MC, interventions=[iv], m=2.0)
    assert calls == [1]  # one chunk of questions: one question pass and one option pass
    slow = tl_steer.mc_option_nll(bridge, MC, interventions=[iv], m=2.0, shared_prefix=False)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    assert no_hooks_left(bridge)


@pytest.mark.default_model
def test_the_default_model_agrees_on_both_hosts(default_model):
    # The failing call, on the default model as a bridge: DiffMean at an alias, and what it steers.
    bridge = tl_steer.load_default_model(host="bridge")
    hook = "blocks.15.hook_resid_post"
    train = tl_steer.load_pairs("sentiment", "train")[:8]
    test = tl_steer.load_pairs("sentiment", "test")[:3]
    a, b = tl_steer.diffmean(default_model, train, hook), tl_steer.diffmean(bridge, train, hook)
    assert float((a.vector - b.vector).norm() / a.vector.norm()) < 1e-5
    for x, y in zip(
        tl_steer.pair_nll(default_model, test, interventions=[a], m=4.0),
        tl_steer.pair_nll(bridge, test, interventions=[a], m=4.0),
        strict=True,
    ):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    items = tl_steer.load_mc_items("general")[:4]
    torch.testing.assert_close(
        tl_steer.mc_option_nll(bridge, items, interventions=[a], m=2.0),
        tl_steer.mc_option_nll(default_model, items, interventions=[a], m=2.0),
        rtol=1e-4,
        atol=1e-4,
    )
    assert no_hooks_left(bridge)
