"""Every architecture of the tiny suite, and LayerNorm folding.

The tiny suite has four architectures (tests/conftest.py, ARCHITECTURES): Llama (RMSNorm, rotary, gated
MLP, grouped-query attention), GPT-2 (LayerNorm, learned positions), GPT-2 after TransformerLens' weight
processing ("gpt2_folded": fold_ln, center_writing_weights, center_unembed, fold_value_biases, so
normalisation "LNPre") and GPT-NeoX / Pythia (LayerNorm, parallel attention and MLP, partial rotary).

Most per-architecture checks live beside their method and run on the ``tiny_any`` fixture (all four):

- DiffMean against run_with_cache (test_diffmean), completion NLL (test_scoring), steering m = 0 and a
  hand-written hook, left padding, cached = uncached generation (test_steering);
- LoRA / LocalWeight against hand-written hooks, m = 0, generation (test_split), SPLIT training in the three
  forms lowers the loss and raises the preference, model unchanged (test_split, ``trained``), the logged
  loss equals pair_nll (test_split);
- COLD-Kernel equals the gradient, COLD-FD and its JVP equal a real gradient step in float64 and agree in
  float32, save / load (test_cold);
- SAE add / clamp (against sae-lens' own forward) / ablate, rank_features (test_sae_steering);
- preference_utility with and without the cached prefix (test_preference_utility), ManifoldProbe.fit
  (test_manifold), mc option NLL (test_mc), ab_accuracy (test_ab), compare_interventions
  (test_method_comparison), sae_quality (test_default_sae); hooked_from_hf on a GPT-NeoX (test_models).

This file adds what those do not: SFT in every form, manifold_sweep and the capability-behaviour gap on
every architecture, the report on the parallel-attention layout, clear errors for hooks an architecture
lacks, and the folded / unfolded comparison.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import ARCHITECTURES, make_model, no_hooks_left
from sae_lens.saes.sae import SAEMetadata
from test_ab import ITEMS as AB_ITEMS
from test_gap import ITEMS as MC_ITEMS
from test_manifold import TEXTS, activations
from test_sae_steering import make_sae
from test_split import HELD_OUT, PAIRS, random_local_weight, random_lora

import tl_steer
from tl_steer import AddVector, ModelMismatchError
from tl_steer.analysis.ab import ab_accuracy
from tl_steer.analysis.gap import Condition, capability_behavior_gap
from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.analysis.manifold_sweep import manifold_sweep
from tl_steer.errors import HookNameError
from tl_steer.methods.sae import check_sae
from tl_steer.methods.split import FORMS, sft

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"


def arch_of(model) -> str:
    return str(model.cfg.model_name).split("-")[1]


def random_vector(model, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)


def log_probs(model, tokens, fwd_hooks=()) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks)), dim=-1)


# ----- the architectures are what they say ---------------------------------------------------------------


def test_the_architectures_are_what_they_say(tiny_any):
    model, cfg = tiny_any, tiny_any.cfg
    arch = arch_of(model)
    assert arch in ARCHITECTURES
    hooks = model.hook_dict
    params = dict(model.named_parameters())
    if arch == "llama":
        assert cfg.normalization_type == "RMS" and cfg.gated_mlp
        assert cfg.n_key_value_heads is not None and cfg.n_key_value_heads < cfg.n_heads
        assert "blocks.0.hook_resid_mid" in hooks
    elif arch == "gpt2":
        assert cfg.normalization_type == "LN" and "pos_embed.W_pos" in params and "blocks.0.ln1.w" in params
    elif arch == "gpt2_folded":
        assert cfg.normalization_type == "LNPre" and not any(".ln" in n or n.startswith("ln_") for n in params)
        # center_writing_weights: everything that writes to the residual stream has zero mean over d_model,
        # center_unembed: every unembedding row has zero mean over the vocabulary.
        for w in (model.W_E, model.W_pos, model.blocks[0].attn.W_O, model.blocks[0].mlp.W_out):
            assert w.mean(-1).abs().max() < 1e-12
        assert model.W_U.mean(-1).abs().max() < 1e-12
        assert "blocks.0.ln2.hook_scale" in hooks and "blocks.0.ln2.hook_normalized" in hooks
    else:
        assert arch == "neox"
        assert cfg.parallel_attn_mlp and cfg.normalization_type == "LN" and not cfg.rotary_adjacent_pairs
        assert cfg.positional_embedding_type == "rotary" and cfg.rotary_dim == cfg.d_head // 4
        assert cfg.n_key_value_heads is None and cfg.act_fn == "gelu"
        assert not any(name.endswith("hook_resid_mid") for name in hooks)


# ----- SFT in every form, on every architecture ----------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_sft_lowers_the_positive_nll_and_m0_is_clean(tiny_any, form):
    model = tiny_any
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 0.05 if form == "lora" else None  # as in test_split: the published LoRA lr is slow on tiny models
    iv, history = sft(model, PAIRS, 1, form, epochs=2, batch_size=4, lr=lr, progress=False)
    assert iv.method == "sft" and len(history) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert iv.hooks(0.0) == []
    lp0, ln0 = tl_steer.pair_nll(model, PAIRS)
    at0 = tl_steer.pair_nll(model, PAIRS, interventions=[iv], m=0.0)
    assert torch.equal(at0[0], lp0) and torch.equal(at0[1], ln0)
    lp, _ = tl_steer.pair_nll(model, PAIRS, interventions=[iv], m=1.0)
    assert float(lp.mean()) < float(lp0.mean()) - 0.1
    assert no_hooks_left(model)


# ----- analyses on every architecture --------------------------------------------------------------------


def test_manifold_sweep_scores_the_steered_activations(tiny_any):
    model = tiny_any
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few reference tokens for d_model = 32
        probe = ManifoldProbe.fit(model, TEXTS[:24], HOOK, k=4, progress=False)
        iv = AddVector(HOOK, random_vector(model, seed=3, scale=1.5), method="vec")
        result = manifold_sweep(model, iv, PAIRS[:3], (0.0, 2.0), probe, baselines=False, progress=False)
    assert no_hooks_left(model)
    table = result.table
    assert np.allclose(table[table["m"] == 0.0]["norm_ratio"], 1.0)
    pair = PAIRS[1]
    texts = [pair.prompt + pair.positive]
    steered, mask, _ = activations(model, texts, fwd_hooks=iv.hooks(2.0))
    clean, _, _ = activations(model, texts)
    expected = probe.score(steered, clean, mask=mask)[["mahalanobis", "knn_pct", "norm_ratio"]].mean()
    row = table[(table["m"] == 2.0) & (table["pair"] == 1)][["mahalanobis", "knn_pct", "norm_ratio"]]
    np.testing.assert_allclose(row.to_numpy()[0], expected.to_numpy(), rtol=1e-9)
    at2 = table[table["m"] == 2.0]["mahalanobis"].mean()
    assert at2 > table[table["m"] == 0.0]["mahalanobis"].mean()


def test_gap_scores_are_mc_ab_and_pair_nll(tiny_any):
    model = tiny_any
    iv = AddVector(HOOK, random_vector(model, seed=1), method="vec")
    items, ab_items, pairs = MC_ITEMS[:4], AB_ITEMS[:4], HELD_OUT[:3]
    result = capability_behavior_gap(
        model, [Condition("vec", iv)], pairs, items, ms=(0.0, 2.0), ab_items=ab_items, progress=False
    )
    summary = result.summary().set_index(["condition", "m", "metric"])
    for m in (0.0, 2.0):
        ivs = [iv] if m else []
        assert summary.loc[("vec", m, "capability"), "mean"] == pytest.approx(
            tl_steer.mc_accuracy(model, items, interventions=ivs, m=m).accuracy
        )
        assert summary.loc[("vec", m, "ab_accuracy"), "mean"] == pytest.approx(ab_accuracy(model, iv, ab_items, m=m))
        lp, ln = tl_steer.pair_nll(model, pairs, interventions=ivs, m=m)
        assert summary.loc[("vec", m, "pref_odds"), "mean"] == pytest.approx(float((ln - lp).mean()), abs=1e-5)
    assert no_hooks_left(model)


def test_the_report_runs_on_parallel_attention(tmp_path):
    """The whole report (every method, the sweeps, the probe, the gap, the SAE) on the NeoX layout, with the
    same checks as on Llama in test_report (the other layouts differ from these two in no hook it uses)."""
    import test_report

    from tl_steer.report.pipeline import run_report

    neox = make_model("neox")
    result = run_report(neox, test_report.data(), test_report.settings(), tmp_path, progress=False, log=lambda _: None)
    test_report.test_every_method_and_section_is_there((tmp_path, result), neox)


# ----- hooks an architecture lacks -----------------------------------------------------------------------


def test_parallel_attention_has_no_resid_mid_and_says_why():
    neox = make_model("neox")
    pairs = PAIRS[:2]
    name = "blocks.1.hook_resid_mid"
    with pytest.raises(HookNameError, match=r"parallel.*'blocks\.1\.hook_resid_pre'"):
        tl_steer.diffmean(neox, pairs, name)
    with pytest.raises(HookNameError, match="parallel"):
        tl_steer.cold_kernel(neox, pairs, name)
    with pytest.raises(HookNameError, match="parallel"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ManifoldProbe.fit(neox, TEXTS[:4], name, progress=False)
    iv = AddVector(name, random_vector(neox))
    with pytest.raises(HookNameError, match="parallel"), tl_steer.steer(neox, iv, m=1):
        pass
    # On a sequential model the same name is fine.
    gpt2 = make_model("gpt2")
    assert tl_steer.diffmean(gpt2, pairs, name).hook == name
    assert no_hooks_left(neox) and no_hooks_left(gpt2)


def test_hooks_that_exist_but_never_run_are_refused(tiny_any):
    """TransformerLens creates hook_mlp_in, hook_attn_in, hook_q_input and attn.hook_result on every model
    but runs them only when a config flag is set; steering there would silently do nothing."""
    model = tiny_any
    assert "blocks.1.hook_mlp_in" in model.hook_dict and not model.cfg.use_hook_mlp_in
    iv = AddVector("blocks.1.hook_mlp_in", random_vector(model))
    with pytest.raises(HookNameError, match=r"use_hook_mlp_in.*set_use_hook_mlp_in\(True\)"):
        tl_steer.pair_nll(model, PAIRS[:2], interventions=[iv])
    with pytest.raises(HookNameError, match="use_attn_in"):
        tl_steer.diffmean(model, PAIRS[:2], "blocks.1.hook_attn_in")
    with pytest.raises(HookNameError, match="use_split_qkv_input"):
        tl_steer.cold_kernel(model, PAIRS[:2], "blocks.1.hook_q_input")
    assert no_hooks_left(model)


def test_rotary_and_position_hooks_say_why():
    with pytest.raises(HookNameError, match="rotary positions; this model's are 'standard'"):
        tl_steer.diffmean(make_model("gpt2"), PAIRS[:2], "blocks.1.attn.hook_rot_q")
    with pytest.raises(HookNameError, match="no learned position embedding"):
        tl_steer.diffmean(make_model("neox"), PAIRS[:2], "hook_pos_embed")


# ----- LayerNorm folding -----------------------------------------------------------------------------------
#
# What folding changes. fold_ln moves each LayerNorm's weight and bias into the next linear layer;
# center_writing_weights makes every write to the residual stream mean-free, so the folded model's
# residual stream is the unfolded one projected onto the mean-free subspace, r_f = P r with
# P = I - 11^T / d_model (the mean is removed per token, not shifted by a constant); center_unembed
# subtracts a per-position constant from the logits; fold_value_biases moves b_V into b_O (hook_v and
# hook_z change, the residual stream does not). Every reader of the residual stream is a LayerNorm, which
# removes the mean first, so both models compute g(P r) for the same g.
#
# What agrees, therefore: log-probabilities and NLL; the residual at every resid hook up to P; the effect
# of adding any vector v at a resid hook or hook_mlp_out (it acts as P v on both); DiffMean (v_f = P v_u);
# COLD-Kernel (the gradient of g(P r) already lies in P's range); LoRA / LocalWeight with the same tensors
# (mlp.hook_post is unchanged); and everything trained against the loss as a function of the intervention's
# own parameters (SPLIT / SFT in every form), because that function is the same on both models.
# What does not: COLD-FD (a gradient step in weight space depends on how the weights are parameterised),
# SAEs (they read r, not P r), and anything checked against the model's identity (the embedding changed).


@pytest.fixture(scope="module")
def unfolded():
    return make_model("gpt2_folded", fold=False)


@pytest.fixture(scope="module")
def folded():
    return make_model("gpt2_folded")


def tokens_of(model) -> torch.Tensor:
    return model.to_tokens([p.prompt + p.positive for p in PAIRS[:4]], padding_side="right")


def centred(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def test_folding_keeps_the_log_probs(unfolded, folded):
    tokens = tokens_of(folded)
    with torch.no_grad():
        lu, lf = unfolded(tokens), folded(tokens)
    assert unfolded.cfg.normalization_type == "LN" and folded.cfg.normalization_type == "LNPre"
    torch.testing.assert_close(torch.log_softmax(lf, -1), torch.log_softmax(lu, -1), rtol=0, atol=1e-10)
    torch.testing.assert_close(lf, centred(lu), rtol=0, atol=1e-10)  # center_unembed
    assert (lf - lu).abs().max() > 1e-3  # the logits themselves did change
    # The fixture keeps TransformerLens' processing in float64 (conftest._process_weights_in_place_dtype);
    # TransformerLens' own process_weights_ (through float32) gives the same model to float32 rounding.
    reference = make_model("gpt2_folded", fold=False)
    reference.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
    ours, theirs = folded.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_folded_residual_stream_is_the_centred_one(unfolded, folded):
    tokens = tokens_of(folded)
    names = lambda n: n.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "mlp.hook_post"))  # noqa: E731
    _, cu = unfolded.run_with_cache(tokens, names_filter=names)
    _, cf = folded.run_with_cache(tokens, names_filter=names)
    assert cu.keys() == cf.keys() and len(cu) == 3 * 4
    for name in cu:
        expected = cu[name] if name.endswith("mlp.hook_post") else centred(cu[name])
        torch.testing.assert_close(cf[name], expected, rtol=0, atol=1e-10, msg=name)
        if not name.endswith("mlp.hook_post"):
            assert cu[name].mean(-1).abs().max() > 1e-3  # the unfolded stream is not centred


def test_steering_agrees_on_folded_and_unfolded(unfolded, folded):
    tokens = tokens_of(folded)
    v = random_vector(folded, seed=4) + 3.0  # far from mean-free, so the projection matters
    assert abs(float(v.mean())) > 1.0
    for hook in (HOOK, "blocks.2.hook_resid_pre", "blocks.1.hook_mlp_out"):
        iv = AddVector(hook, v)
        lu, lf = log_probs(unfolded, tokens, iv.hooks(1.5)), log_probs(folded, tokens, iv.hooks(1.5))
        torch.testing.assert_close(lf, lu, rtol=0, atol=1e-10, msg=hook)
        assert (lf - log_probs(folded, tokens)).abs().max() > 1e-2
    # The module-delta path (mlp.hook_post -> hook_mlp_out) on LNPre, with the same tensors on both.
    for iv in (random_lora(folded), random_local_weight(folded)):
        lu, lf = log_probs(unfolded, tokens, iv.hooks(1.0)), log_probs(folded, tokens, iv.hooks(1.0))
        torch.testing.assert_close(lf, lu, rtol=0, atol=1e-10)
        assert (lf - log_probs(folded, tokens)).abs().max() > 1e-2
    # pair NLL, through tl_steer's own scoring
    iv = AddVector(HOOK, v)
    for got, want in zip(
        tl_steer.pair_nll(folded, PAIRS, interventions=[iv], m=1.5),
        tl_steer.pair_nll(unfolded, PAIRS, interventions=[iv], m=1.5),
        strict=True,
    ):
        torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-5)


def test_methods_agree_on_folded_and_unfolded(unfolded, folded):
    d_model = folded.cfg.d_model
    P = torch.eye(d_model, dtype=torch.float64) - 1.0 / d_model
    vu, vf = tl_steer.diffmean(unfolded, PAIRS, HOOK).vector, tl_steer.diffmean(folded, PAIRS, HOOK).vector
    torch.testing.assert_close(vf, P @ vu, rtol=0, atol=1e-10)
    assert abs(float(vu.mean())) > 1e-3  # the unfolded DiffMean has a mean component, the folded one none
    ku, kf = tl_steer.cold_kernel(unfolded, PAIRS, HOOK).vector, tl_steer.cold_kernel(folded, PAIRS, HOOK).vector
    torch.testing.assert_close(kf, ku, rtol=0, atol=1e-12)
    assert ku.norm() > 1e-4
    # Training sees the same loss as a function of the intervention's parameters on both models; AdamW's
    # per-coordinate normalisation lets rounding grow to ~1e-8 over the steps.
    for form in FORMS:
        a, _ = tl_steer.split(unfolded, PAIRS, 1, form, epochs=1, batch_size=4, progress=False)
        b, _ = tl_steer.split(folded, PAIRS, 1, form, epochs=1, batch_size=4, progress=False)
        for key, value in a.tensors().items():
            torch.testing.assert_close(b.tensors()[key], value, rtol=0, atol=1e-7, msg=f"{form}.{key}")
        assert max(float(t.abs().max()) for key, t in b.tensors().items() if key != "A") > 1e-3  # trained
    # COLD-FD steps the weights before the hook, which folding re-parameterised: it need not agree.
    fu = tl_steer.cold_fd(unfolded, PAIRS, HOOK, method="jvp")
    ff = tl_steer.cold_fd(folded, PAIRS, HOOK, method="jvp")
    tokens = tokens_of(folded)
    du = log_probs(unfolded, tokens, fu.hooks(1.0, model=unfolded)) - log_probs(unfolded, tokens)
    df = log_probs(folded, tokens, ff.hooks(1.0, model=folded)) - log_probs(folded, tokens)
    assert (du - df).abs().max() > 1e-4


def test_what_folding_does_not_carry_over(unfolded, folded):
    # An intervention records its model: the weights were processed (the embedding centred), so it is another model.
    iv = tl_steer.diffmean(unfolded, PAIRS, HOOK)
    with pytest.raises(ModelMismatchError, match="unprocessed weights.*has processed weights"):
        tl_steer.pair_nll(folded, PAIRS[:2], interventions=[iv])
    # An SAE reads the raw residual stream, which folding centres: the SAE's load flags are checked.
    for model, sae_fold, warns in ((folded, False, True), (folded, True, False), (unfolded, True, True)):
        sae = make_sae(model.cfg.d_model)
        sae.cfg.metadata = SAEMetadata(hook_name=HOOK, model_from_pretrained_kwargs={"fold_ln": sae_fold})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_sae(model, sae)
        assert any("fold_ln" in str(w.message) for w in caught) == warns
