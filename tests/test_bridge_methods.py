"""Methods and steered text on a TransformerBridge: generation, model identity and saved files, SPLIT / SFT,
COLD-Kernel and COLD-FD, on tiny models whose HookedTransformer and bridge share their weights
(conftest.make_host_pair: one Hugging Face model converted and wrapped). Each result is compared with the same
computation on the other host."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import SENTIMENT_PAIRS, make_bridge, make_host_pair, no_hooks_left

import tl_steer
from tl_steer import AddVector, Condition, ContrastivePair, ModelMismatchError
from tl_steer.generation import generate, left_padding_ok

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [ContrastivePair(*t) for t in SENTIMENT_PAIRS]
HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["hello world, the", "I went to the market and bought fresh", "The film", "The food was awful and"]
TEXT = "The film was wonderful and the staff were kind"
# The hosts of a pair agree to ~1e-6 relative (the Llama conversion and the bridge's Llama softmax pass
# through float32); GPT-2 agrees to ~1e-14.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request: pytest.FixtureRequest):
    return make_host_pair(request.param)


def vector(model, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(model.cfg.d_model, generator=g, dtype=torch.float64)


def steered_logits(model, iv, m=1.0):
    tokens = model.to_tokens(TEXT)
    with torch.no_grad(), tl_steer.steer(model, iv, m=m):
        return model(tokens)


# ----- generation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["all", "generated", "prompt"])
def test_generation_gives_the_same_tokens_on_both_hosts(pair, positions):
    """Greedy text of the clean model and of a steered one, batched (left padding, KV cache) and one prompt
    at a time, without the cache too: the same completions on either host."""
    hooked, bridge = pair
    iv = AddVector(HOOK, vector(hooked), positions=positions, method="vec")
    conds = [None, iv, Condition("vec + prompting", iv, "The weather is fine.")]
    tables = {
        name: generate(model, conds, PROMPTS, [0.0, 1.5], max_new_tokens=6, batch_size=4)
        for name, model in (("hooked", hooked), ("bridge", bridge))
    }
    single = generate(bridge, conds, PROMPTS, [1.5], max_new_tokens=6, batch_size=1)
    texts = tables["bridge"]["completion"].tolist()
    assert texts == tables["hooked"]["completion"].tolist()
    steered = tables["bridge"][tables["bridge"]["m"] == 1.5]["completion"].tolist()
    assert steered == single[single["condition"] != "no steering"]["completion"].tolist()
    clean = tables["bridge"][tables["bridge"]["condition"] == "no steering"]["completion"].tolist()
    assert steered[: len(PROMPTS)] != clean  # steering changed the text
    # The bridge's own generate without the KV cache, under the same steering: the same tokens.
    eos = bridge.tokenizer.eos_token_id
    with tl_steer.steer(bridge, iv, m=1.5):
        out = bridge.generate(
            PROMPTS[2], max_new_tokens=6, do_sample=False, use_past_kv_cache=False, verbose=False, return_type="tokens"
        )
    new = out[0, bridge.to_tokens(PROMPTS[2]).shape[-1] :].tolist()
    assert steered[2] == bridge.tokenizer.decode(new[: new.index(eos)] if eos in new else new)
    assert no_hooks_left(hooked) and no_hooks_left(bridge)


def test_sampling_on_a_bridge_is_reproducible_by_seed():
    bridge = make_bridge("gpt2")
    iv = AddVector(HOOK, vector(bridge), method="vec")
    run = (
        lambda seed: generate(  # noqa: E731
            bridge, iv, PROMPTS[:2], max_new_tokens=6, do_sample=True, seed=seed, n_samples=2
        )["completion"].tolist()
    )
    a, b, c = run(3), run(3), run(4)
    assert a == b and a != c


def test_a_float64_rotary_bridge_is_generated_one_prompt_at_a_time():
    """TransformerLens' bridge takes the softmax of rotary attention in float32: in float64 the rows of the
    pad positions become NaN and spread into the real rows of a left-padded batch. The check finds it and
    generate falls back to one prompt at a time; a float32 bridge and a float64 GPT-2 bridge batch."""
    broken = make_bridge("llama")
    tokens = torch.tensor([[2, 0, 0], [0, 0, 0]])
    with torch.no_grad():
        logits = broken(tokens, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert not torch.isfinite(logits).all()  # what the check guards against
    assert not left_padding_ok(broken)
    assert left_padding_ok(make_bridge("llama", dtype=torch.float32)) and left_padding_ok(make_bridge("gpt2"))
    batched = generate(broken, None, PROMPTS, max_new_tokens=5, batch_size=4)
    single = generate(broken, None, PROMPTS, max_new_tokens=5, batch_size=1)
    assert batched["completion"].tolist() == single["completion"].tolist()
    assert "<bos>" * 5 not in batched["completion"].tolist()


# ----- model identity and saved files -----------------------------------------------------------------------
def test_model_identity_is_the_weights_not_the_class(pair):
    hooked, bridge = pair
    a, b = tl_steer.model_identity(hooked), tl_steer.model_identity(bridge)
    assert {k: v for k, v in a.items() if k != "embed_checksum"} == {
        k: v for k, v in b.items() if k != "embed_checksum"
    }
    assert a["embed_checksum"] == pytest.approx(b["embed_checksum"], rel=1e-6)
    bridge.cfg.model_name = "another/name"  # the name does not identify the weights
    try:
        AddVector(HOOK, vector(hooked), model_identity=a).check(bridge)
    finally:
        bridge.cfg.model_name = a["model_name"]
    other = make_bridge(hooked.cfg.model_name.split("-")[1])
    with torch.no_grad():
        for p in other.embed.parameters():
            p.mul_(1.01)  # other weights, the same shape
    with pytest.raises(ModelMismatchError, match="checksum"):
        AddVector(HOOK, vector(hooked), model_identity=a).check(other)


def test_a_bridge_in_compatibility_mode_is_told_apart():
    """enable_compatibility_mode() processes the weights (folded norms, centred residual stream on GPT-2):
    its activations differ, so an intervention made on the plain bridge is refused there, and back."""
    plain, processed = make_bridge("gpt2"), make_bridge("gpt2")
    processed.enable_compatibility_mode()
    a, b = tl_steer.model_identity(plain), tl_steer.model_identity(processed)
    assert a["processed_weights"] is False and b["processed_weights"] is True
    _, cache_a = plain.run_with_cache(TEXT)
    _, cache_b = processed.run_with_cache(TEXT)
    assert (cache_a[HOOK] - cache_b[HOOK]).abs().max() > 1e-2  # the activations do differ
    made_plain = tl_steer.diffmean(plain, PAIRS[:4], HOOK)
    made_processed = tl_steer.diffmean(processed, PAIRS[:4], HOOK)
    with pytest.raises(ModelMismatchError, match="processed weights"):
        made_plain.check(processed)
    with pytest.raises(ModelMismatchError, match="unprocessed weights"):
        made_processed.check(plain)
    # A processed HookedTransformer (LNPre) and the processed bridge share the flag.
    from conftest import make_model

    assert tl_steer.model_identity(make_model("gpt2_folded"))["processed_weights"] is True
    assert tl_steer.model_identity(make_model("gpt2"))["processed_weights"] is False


def test_a_file_saved_on_one_host_loads_and_steers_on_the_other(pair, tmp_path):
    hooked, bridge = pair
    made = {
        "hooked": tl_steer.diffmean(hooked, PAIRS[:4], HOOK),
        "bridge": tl_steer.diffmean(bridge, PAIRS[:4], HOOK),
    }
    for source, target in (("hooked", bridge), ("bridge", hooked)):
        path = tl_steer.save(made[source], tmp_path / f"{source}.safetensors")
        loaded = tl_steer.load(path, model=target)
        torch.testing.assert_close(steered_logits(target, loaded), steered_logits(target, made[source]), rtol=0, atol=0)
    torch.testing.assert_close(steered_logits(bridge, made["hooked"]), steered_logits(hooked, made["hooked"]), **TOL)
    processed = make_bridge(hooked.cfg.model_name.split("-")[1])
    processed.enable_compatibility_mode()
    with pytest.raises(ModelMismatchError):
        tl_steer.load(tmp_path / "hooked.safetensors", model=processed)


# ----- SPLIT / SFT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["vector", "lora", "local_weight"])
def test_split_trains_on_a_bridge_as_on_a_hooked_transformer(pair, form, tmp_path):
    """The same training run on either host: the same losses step by step, interventions that steer both
    hosts to the same logits, and the bridge's (Hugging Face) weights bit-identical afterwards."""
    hooked, bridge = pair
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    kw = dict(epochs=2, batch_size=3, progress=False)
    iv_h, hist_h = tl_steer.split(hooked, PAIRS, 1, form, **kw)
    iv_b, hist_b = tl_steer.split(bridge, PAIRS, 1, form, **kw)
    after = bridge.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad or p.grad is None for p in bridge.parameters())
    torch.testing.assert_close(
        torch.tensor(hist_b["loss"].tolist()), torch.tensor(hist_h["loss"].tolist()), rtol=1e-4, atol=1e-4
    )
    for name, t in iv_b.tensors().items():
        torch.testing.assert_close(t, iv_h.tensors()[name], rtol=1e-3, atol=1e-4, msg=name)
    clean = steered_logits(bridge, iv_b, m=0.0)
    assert (steered_logits(bridge, iv_b) - clean).abs().max() > 1e-3
    # Built on one host, it steers the other to the same logits.
    torch.testing.assert_close(steered_logits(hooked, iv_b), steered_logits(bridge, iv_b), **TOL)
    torch.testing.assert_close(steered_logits(bridge, iv_h), steered_logits(hooked, iv_h), **TOL)
    loaded = tl_steer.load(tl_steer.save(iv_b, tmp_path / f"{form}.safetensors"), model=hooked)
    torch.testing.assert_close(steered_logits(hooked, loaded), steered_logits(hooked, iv_b), rtol=0, atol=0)
    assert no_hooks_left(bridge)


def test_sft_and_cold_kernel_agree_across_hosts(pair):
    hooked, bridge = pair
    for make in (
        lambda m: tl_steer.sft(m, PAIRS, 1, "vector", epochs=1, batch_size=3, progress=False)[0],
        lambda m: tl_steer.cold_kernel(m, PAIRS, HOOK),
    ):
        a, b = make(hooked), make(bridge)
        torch.testing.assert_close(b.vector, a.vector, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(steered_logits(bridge, a), steered_logits(hooked, b), **TOL)


# ----- COLD-FD ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_pair():
    return make_host_pair("gpt2")


@pytest.mark.parametrize(
    ("fd_method", "hook"),
    [("jvp", HOOK), ("fd", HOOK), ("jvp", "blocks.2.hook_resid_post"), ("fd", "blocks.2.hook_resid_pre")],
)
def test_cold_fd_agrees_across_hosts(gpt2_pair, fd_method, hook):
    """COLD-FD made on each host from the same examples: the same gradient norm and unit, and the same
    steered logits. On the bridge its parameters are Hugging Face's (the embedding tied to the unembedding),
    and its perturbed pass runs from the embedding: the same dZ."""
    hooked, bridge = gpt2_pair
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    kw = dict(fd_method=fd_method, eps=1e-4) if fd_method == "fd" else dict(fd_method=fd_method)
    a = tl_steer.cold_fd(hooked, PAIRS[:4], hook, **kw)
    b = tl_steer.cold_fd(bridge, PAIRS[:4], hook, **kw)
    again = tl_steer.cold_fd(bridge, PAIRS[:4], hook, **kw)  # a second run sees the same (unperturbed) model
    assert again.info["norm_g"] == b.info["norm_g"] and again.unit == b.unit
    assert b.info["norm_g"] == pytest.approx(a.info["norm_g"], rel=1e-4)
    assert b.unit == pytest.approx(a.unit, rel=1e-3)
    torch.testing.assert_close(b.embed_grad, a.embed_grad, rtol=1e-4, atol=1e-7)
    la, lb = steered_logits(hooked, a), steered_logits(bridge, b)
    assert (la - steered_logits(hooked, a, m=0.0)).abs().max() > 1e-2
    # jvp agrees to float64 rounding; fd's difference quotient to ~1e-11 (measured)
    torch.testing.assert_close(lb, la, rtol=1e-8, atol=1e-8)
    assert b.n_perturbed_passes >= 1 and no_hooks_left(bridge)
    after = bridge.state_dict()  # the perturbed passes leave the weights bit for bit as they were
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Made on one host, refused on the other with a way out, before anything runs.
    with pytest.raises(ModelMismatchError, match="Make it again on this model"):
        b.check(hooked)
    with pytest.raises(ModelMismatchError, match="made on a HookedTransformer"):
        a.check(bridge)


def test_cold_fd_agrees_across_hosts_on_neox():
    """GPT-NeoX (parallel attention and MLP, partial rotary, biases on both hosts): the same steered logits."""
    hooked, bridge = make_host_pair("neox")
    a = tl_steer.cold_fd(hooked, PAIRS[:4], HOOK)
    b = tl_steer.cold_fd(bridge, PAIRS[:4], HOOK)
    assert b.unit == pytest.approx(a.unit, rel=1e-5)
    torch.testing.assert_close(steered_logits(bridge, b), steered_logits(hooked, a), **TOL)


def test_cold_fd_on_a_llama_bridge_moves_its_weights_only():
    """A HookedTransformer made from a Llama has zero biases that are parameters (b_Q, b_in, ...); the Hugging
    Face model, and so the bridge, has none. COLD-FD's gradient on the bridge is the hooked one without them."""
    hooked, bridge = make_host_pair("llama")
    a = tl_steer.cold_fd(hooked, PAIRS[:4], HOOK)
    b = tl_steer.cold_fd(bridge, PAIRS[:4], HOOK)

    def norm(tensors):
        return float(sum(t.double().pow(2).sum() for t in tensors)) ** 0.5

    biases = [v for k, v in a.grads.items() if k.rsplit(".", 1)[-1].lstrip("_").startswith("b_")]
    weights = [v for k, v in a.grads.items() if not k.rsplit(".", 1)[-1].lstrip("_").startswith("b_")]
    assert norm(biases) > 1e-3  # the hooked gradient does move the zero biases
    assert norm([*b.grads.values()]) == pytest.approx(norm(weights), rel=1e-4)
    torch.testing.assert_close(b.embed_grad, a.embed_grad, rtol=1e-4, atol=1e-7)
    assert len(b.grads) == len(weights)


def test_cold_fd_on_a_bridge_with_left_padding_and_generation():
    """Left padding: the pad keys are found from a bridge's attention scores (masked with the dtype's minimum,
    not -inf), so each row of a padded batch is steered as it is alone; steered text equals the hooked one."""
    hooked, bridge = make_host_pair("gpt2")
    a = tl_steer.cold_fd(hooked, PAIRS[:4], HOOK)
    b = tl_steer.cold_fd(bridge, PAIRS[:4], HOOK)
    tokens = bridge.to_tokens(PROMPTS, padding_side="left")
    mask = (tokens != bridge.tokenizer.pad_token_id).long()
    with torch.no_grad(), tl_steer.steer(bridge, b, m=1.0):
        batched = bridge(tokens, attention_mask=mask)[:, -1]
        alone = torch.stack([bridge(p)[0, -1] for p in PROMPTS])
    torch.testing.assert_close(batched, alone, rtol=1e-6, atol=1e-6)
    for positions in ("prompt", "all"):
        texts = [
            generate(model, iv.with_positions(positions), PROMPTS, [1.0], max_new_tokens=5, batch_size=4)
            for model, iv in ((hooked, a), (bridge, b))
        ]
        assert texts[0]["completion"].tolist() == texts[1]["completion"].tolist()
    assert no_hooks_left(bridge)


# ----- judges and the generation sweep ----------------------------------------------------------------------
def test_judges_and_generation_sweep_agree_across_hosts(gpt2_pair):
    """The probe, fluency and relevance judges, the LLM judge with a bridge as its back end, and a whole
    generation sweep: the same texts and scores on either host; a probe fitted on one host judges the other."""
    from test_judges import pairs as judge_pairs

    from tl_steer import FluencyJudge, LLMJudge, ProbeJudge, RelevanceJudge, generation_sweep

    hooked, bridge = gpt2_pair
    probes = {
        name: ProbeJudge.fit(model, judge_pairs(12), judge_pairs(6, offset=3), concept="toy")
        for name, model in (("hooked", hooked), ("bridge", bridge))
    }
    assert probes["bridge"].auroc == pytest.approx(probes["hooked"].auroc, abs=1e-9)
    texts = ([p.prompt for p in PAIRS[:3]], [p.positive for p in PAIRS[:3]])
    for judge in (probes["hooked"], FluencyJudge(), RelevanceJudge()):
        a, b = judge.score(hooked, *texts), judge.score(bridge, *texts)
        for key in a:
            # NLLs are taken in float32 (log_softmax of the scored positions on the HookedTransformer, of every
            # position on the bridge): relevance, a difference of two NLLs, agrees to float32 rounding
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=2e-6, err_msg=key)
    question = "Rate the text from 0 to 2: hello world, the weather is fine."
    answers = [LLMJudge(m, concept="toy", max_new_tokens=5).ask(question) for m in (hooked, bridge)]
    assert answers[0] == answers[1]

    iv = AddVector(HOOK, vector(hooked), method="vec")
    conds = [iv, Condition("prompting", instruction="The weather is fine.")]
    judges = [probes["hooked"], FluencyJudge(), RelevanceJudge()]
    runs = [
        generation_sweep(model, conds, PROMPTS, [0.0, 2.0], judges, concept="toy", max_new_tokens=5)
        for model in (hooked, bridge)
    ]
    assert runs[0].items["completion"].tolist() == runs[1].items["completion"].tolist()
    numeric = runs[0].summary().select_dtypes("number").columns
    np.testing.assert_allclose(
        runs[1].summary()[numeric].to_numpy(float), runs[0].summary()[numeric].to_numpy(float), rtol=1e-6, atol=5e-6
    )  # relevance differs by float32 rounding (see above)
    assert no_hooks_left(bridge)


# ----- adaptive forms and SAE features ----------------------------------------------------------------------
def test_adaptive_forms_agree_across_hosts(pair):
    """Clamp, budget, rotation and conditional (per token and per prompt), fitted on each host: the same
    edits, and built on one host they steer the other to the same logits."""
    from tl_steer import (
        ManifoldProbe,
        budgeted_addition,
        condition_probe,
        conditional,
        projection_clamp,
        rotation,
    )

    texts = [p.prompt + p.positive for p in PAIRS] + [p.prompt + p.negative for p in PAIRS]

    def kinds(model):
        base = tl_steer.diffmean(model, PAIRS, "blocks.2.hook_resid_post")
        probe = ManifoldProbe.fit(model, texts, HOOK, k=4, holdout=0.3, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a tiny random model's condition probe may barely fire
            gate = condition_probe(model, PAIRS, HOOK)
        return {
            "clamp": projection_clamp(model, PAIRS, HOOK),
            "budget": budgeted_addition(model, PAIRS, HOOK, probe, q=0.6),
            "rotation": rotation(model, PAIRS, HOOK),
            "conditional token": conditional(base, gate, per="token"),
            "conditional prompt": conditional(base, gate, per="prompt"),
        }

    hooked, bridge = pair
    made = {"hooked": kinds(hooked), "bridge": kinds(bridge)}
    for kind, iv in made["hooked"].items():
        other = made["bridge"][kind]
        la = steered_logits(hooked, iv)
        assert (la - steered_logits(hooked, iv, m=0.0)).abs().max() > 1e-3, kind
        torch.testing.assert_close(steered_logits(bridge, iv), la, **TOL, msg=kind)
        torch.testing.assert_close(steered_logits(bridge, other), la, rtol=1e-4, atol=1e-4, msg=kind)


def test_sae_features_agree_across_hosts(pair):
    """SAE feature steering on a plain bridge (no splicing) and the feature ranking: as on the
    HookedTransformer with the same weights."""
    from test_sae_steering import make_sae

    from tl_steer.methods.sae import rank_features, sae_feature

    hooked, bridge = pair
    sae = make_sae()
    for mode, value in (("add", 2.0), ("clamp", 3.0), ("ablate", 0.0)):
        iv = sae_feature(sae, [5, 9], mode, [value, value], model=bridge)
        torch.testing.assert_close(steered_logits(bridge, iv), steered_logits(hooked, iv), **TOL, msg=mode)
    a = rank_features(hooked, sae, PAIRS, n_measure=2)
    b = rank_features(bridge, sae, PAIRS, n_measure=2)
    assert a["feature"].tolist()[:5] == b["feature"].tolist()[:5]
    np.testing.assert_allclose(b.fillna(0).to_numpy(float), a.fillna(0).to_numpy(float), rtol=1e-4, atol=1e-5)


# ----- the default model on both hosts ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_bridge():
    return tl_steer.load_default_model(host="bridge")


@pytest.mark.default_model
def test_default_model_is_one_model_on_both_hosts(default_model, default_bridge, tmp_path):
    """The default model's identity is the same on either host; DiffMean made on one host, saved and loaded
    on the other, steers it to the same logits (float32), and the greedy steered text is the same."""
    from tl_steer.data import load_pairs

    hooked, bridge = default_model, default_bridge
    assert tl_steer.model_identity(hooked) == tl_steer.model_identity(bridge)
    pairs = load_pairs("sentiment")[:8]
    made = tl_steer.diffmean(hooked, pairs, "blocks.15.hook_resid_post")
    loaded = tl_steer.load(tl_steer.save(made, tmp_path / "dm.safetensors"), model=bridge)
    tokens = hooked.to_tokens("The film was")
    with torch.no_grad():
        with tl_steer.steer(hooked, made, m=4.0):
            want = hooked(tokens)
        with tl_steer.steer(bridge, loaded, m=4.0):
            got = bridge(tokens)
    assert (want - hooked(tokens)).abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    texts = [generate(m, loaded, ["The film was"], [4.0], max_new_tokens=12) for m in (hooked, bridge)]
    assert texts[0]["completion"].tolist() == texts[1]["completion"].tolist()


@pytest.mark.default_model
def test_default_sae_steers_through_an_sae_transformer_bridge(default_bridge):
    """The default SAE spliced into the default model's bridge by sae-lens' SAETransformerBridge: steering
    before it shifts what it encodes by exactly the edit, and the logits equal the edit added by hand at the
    SAE's input hook (sae-lens' own path)."""
    from sae_lens import SAETransformerBridge

    from tl_steer.default_sae import DEFAULT_SAE_HOOK
    from tl_steer.sae_splicing import native_name

    hst = tl_steer.load_default_model(host="bridge")  # its own copy: the class is changed as sae-lens does
    hst.__class__ = SAETransformerBridge
    hst._acts_to_saes, hst._transcoder_output_hooks = {}, {}
    sae = tl_steer.load_default_sae()
    vector = torch.randn(hst.cfg.d_model, generator=torch.Generator().manual_seed(0))
    iv = AddVector(DEFAULT_SAE_HOOK, vector)
    tokens = hst.to_tokens("The capital of France is")
    name = native_name(hst, f"{DEFAULT_SAE_HOOK}.hook_sae_input")
    with torch.no_grad():
        with tl_steer.steer(hst, iv, m=4.0):
            got, cache = hst.run_with_cache_with_saes(tokens, saes=[sae])
        _, clean = hst.run_with_cache_with_saes(tokens, saes=[sae])
        want = hst.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(name, lambda a, hook: a + 4.0 * vector)])
    torch.testing.assert_close(cache[name] - clean[name], (4.0 * vector).expand_as(clean[name]), rtol=0, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - hst.run_with_saes(tokens, saes=[sae])).abs().max() > 1e-2
