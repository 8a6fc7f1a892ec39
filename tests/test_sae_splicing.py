"""Steering composes with SAEs that sae-lens splices in (HookedSAETransformer, and SAETransformerBridge on a
TransformerBridge), in every order.

Each case compares the steered run with an independent computation: the same edit added by hand at the
SAE's own hook points (``hook_sae_input`` before, ``hook_sae_output`` after), or, with the error term on,
the model steered with no SAE at all (the error term makes the SAE transparent). On the bridge the reference
adds its edits under the bridge's own names (``blocks.1.hook_out.hook_sae_input``), as sae-lens registers
them; steering is given the HookedTransformer-style names.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_bridge, make_model
from sae_lens import HookedSAETransformer, SAETransformerBridge
from test_sae_steering import make_sae

import tl_steer
from tl_steer.errors import ConfigError, HookNameError
from tl_steer.hookpoints import validate_hook
from tl_steer.hosts import is_bridge
from tl_steer.sae_splicing import native_name

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
M = 3.0
TOKENS = torch.tensor([[1, 5, 7, 9, 3, 11], [2, 4, 6, 8, 10, 12]])


@pytest.fixture(scope="module", params=["hooked", "bridge"])
def base(request):
    return make_model("llama") if request.param == "hooked" else make_bridge("llama")


@pytest.fixture(scope="module")
def vector(base):
    return torch.randn(base.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def sae_bridge() -> SAETransformerBridge:
    """make_bridge("llama") (the same weights as the plain one) as sae-lens' SAETransformerBridge, converted as
    its boot_transformers converts the bridge it boots."""
    model = make_bridge("llama")
    model.__class__ = SAETransformerBridge
    model._acts_to_saes = {}
    model._transcoder_output_hooks = {}
    return model


def module_hooks(model) -> set[tuple[int, int]]:
    return {(id(m), k) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for k in d}


@pytest.fixture
def hst(base):
    if not is_bridge(base):
        model = HookedSAETransformer(base.cfg, tokenizer=base.tokenizer)
        model.load_state_dict(base.state_dict(), strict=False)
    else:
        model = sae_bridge()
    model.run_with_cache(TOKENS)  # a bridge wires its own permanent module hooks on its first passes
    model.own_hooks = module_hooks(model)
    yield model
    model.reset_saes()


def native(hst, name: str) -> str:
    """The name sae-lens' own hooks run under on ``hst`` (the bridge's own spelling on a bridge)."""
    return native_name(hst, name)


@pytest.fixture
def sae(base):
    return make_sae(base.cfg.d_model, 48, HOOK)


def add(vector, m=M):
    return lambda act, hook: act + m * vector.to(act.dtype)


def expected(base, hst, sae, vector, site: str, error_term: bool) -> torch.Tensor:
    """Logits of the independent computation for an SAE at HOOK steered by m * vector."""
    if error_term:  # the SAE is transparent: the model steered with no SAE at all
        return base.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, add(vector))])
    name = f"{HOOK}.hook_sae_input" if site == "before" else f"{HOOK}.hook_sae_output"
    return hst.run_with_hooks_with_saes(TOKENS, saes=[sae], fwd_hooks=[(native(hst, name), add(vector))])


def clean_with_sae(hst, sae) -> torch.Tensor:
    return hst.run_with_saes(TOKENS, saes=[sae])


def nothing_left(model, sae) -> bool:
    """No hook on any hook point of the model or of the SAE, no pre-hook on any module, no method patch."""
    modules = [*sae.modules()]
    hooked = [m for m in modules if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    others = module_hooks(model) - getattr(model, "own_hooks", set())
    backward = [m for m in model.modules() if m._backward_hooks]
    patched = "add_sae" in vars(model) or "_reset_sae" in vars(model)
    return not hooked and not others and not backward and not patched


@pytest.mark.parametrize("error_term", [False, True])
@pytest.mark.parametrize("site", ["before", "after"])
@pytest.mark.parametrize("order", ["attached_before", "add_inside", "run_with_saes", "run_with_cache_with_saes"])
def test_steering_composes_with_a_spliced_sae(base, hst, sae, vector, order, site, error_term) -> None:
    iv = tl_steer.AddVector(HOOK, vector)
    sae.use_error_term = error_term
    want = expected(base, hst, sae, vector, site, error_term)
    _, clean = hst.run_with_cache_with_saes(TOKENS, saes=[sae])
    if order == "attached_before":
        hst.add_sae(sae)
    with tl_steer.steer(hst, iv, m=M, sae_site=site):
        if order == "attached_before":
            got = hst(TOKENS)
        elif order == "add_inside":
            hst.add_sae(sae)
            got = hst(TOKENS)
        elif order == "run_with_saes":
            got = hst.run_with_saes(TOKENS, saes=[sae])
        else:
            got, cache = hst.run_with_cache_with_saes(TOKENS, saes=[sae])
            # the cache records what the SAE encoded: the steered activation before it, the clean one after
            key = native(hst, f"{HOOK}.hook_sae_input")
            shift = cache[key] - clean[key]
            if site == "before":
                torch.testing.assert_close(shift, (M * vector).expand_as(shift), rtol=0, atol=1e-10)
            else:
                assert shift.abs().max() == 0
    hst.reset_saes()
    assert (got - clean_with_sae(hst, sae)).abs().max() > 1e-3  # steering did something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert nothing_left(hst, sae)


def test_reset_saes_inside_the_block_keeps_steering(base, hst, sae, vector) -> None:
    """An SAE attached before the block and removed inside it: the model is then steered as if it had
    never had one (sae-lens puts a new hook point back; the hook moves to it)."""
    iv = tl_steer.AddVector(HOOK, vector)
    hst.add_sae(sae)
    with tl_steer.steer(hst, iv, m=M):
        hst.reset_saes()
        got = hst(TOKENS)
        hst.add_sae(sae)  # and back again: steered before the SAE
        again = hst(TOKENS)
    torch.testing.assert_close(got, base.run_with_hooks(TOKENS, fwd_hooks=[(HOOK, add(vector))]), rtol=0, atol=1e-10)
    torch.testing.assert_close(again, expected(base, hst, sae, vector, "before", False), rtol=0, atol=1e-10)
    hst.reset_saes()
    assert nothing_left(hst, sae)
    torch.testing.assert_close(hst(TOKENS), base(TOKENS), rtol=0, atol=1e-10)  # unsteered after the block


def test_generate_is_steered_through_the_sae(hst, sae, vector) -> None:
    hst.add_sae(sae)
    iv = tl_steer.AddVector(HOOK, vector)
    prompt = TOKENS[:1]
    clean = hst.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False)
    with tl_steer.steer(hst, iv, m=50.0):
        steered = hst.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False)
    assert not torch.equal(clean, steered)
    assert torch.equal(hst.generate(prompt, max_new_tokens=6, do_sample=False, verbose=False), clean)


def test_a_hook_point_swapped_by_hand_is_followed(base, hst, sae, vector) -> None:
    """Splicing that bypasses add_sae (sae-lens' set_deep_attr) is caught when the block runs next."""
    from sae_lens.analysis.hooked_sae_transformer import _SAEWrapper, set_deep_attr

    if is_bridge(hst):
        pytest.skip("HookedSAETransformer's splicing internals (setup()); the bridge splices through add_sae")
    iv = tl_steer.AddVector(HOOK, vector)
    with tl_steer.steer(hst, iv, m=M):
        wrapper = _SAEWrapper(sae)
        set_deep_attr(hst, HOOK, wrapper)
        hst._acts_to_saes[HOOK] = wrapper
        hst.setup()
        got = hst(TOKENS)
    hst.reset_saes()
    torch.testing.assert_close(got, expected(base, hst, sae, vector, "before", False), rtol=0, atol=1e-10)


def test_nested_blocks_on_an_sae_host(base, hst, sae, vector) -> None:
    iv = tl_steer.AddVector(HOOK, vector)
    with tl_steer.steer(hst, iv, m=1.0), tl_steer.steer(hst, iv, m=2.0):
        got = hst.run_with_saes(TOKENS, saes=[sae])
    torch.testing.assert_close(got, expected(base, hst, sae, vector, "before", False), rtol=0, atol=1e-10)
    assert nothing_left(hst, sae)


def test_occupied_hook_name_error_mentions_the_sae(hst, sae, vector) -> None:
    """Outside steer (collecting activations, checking an intervention) the occupied name is an error that
    names the SAE and the hook points that replaced it, not a list of unrelated 'closest' names."""
    hst.add_sae(sae)
    with pytest.raises(HookNameError, match=r"StandardSAE.*hook_sae_input.*hook_sae_output") as info:
        validate_hook(hst, HOOK)
    assert "Closest" not in str(info.value)
    with pytest.raises(HookNameError, match="spliced"):
        tl_steer.AddVector(HOOK, vector).check(hst)


def test_bad_sae_site_is_refused_before_any_hook(hst, sae, vector) -> None:
    iv = tl_steer.AddVector(HOOK, vector)
    with pytest.raises(ConfigError, match="sae_site"), tl_steer.steer(hst, iv, m=M, sae_site="inside"):
        pass
    assert nothing_left(hst, sae)


def test_steer_cleans_up_when_the_block_raises(hst, sae, vector) -> None:
    iv = tl_steer.AddVector(HOOK, vector)
    with pytest.raises(RuntimeError), tl_steer.steer(hst, iv, m=M):
        hst.add_sae(sae)
        raise RuntimeError("user error")
    hst.reset_saes()
    assert nothing_left(hst, sae)


@pytest.mark.default_model
def test_default_sae_composes_on_the_default_model(default_model) -> None:
    from tl_steer.default_sae import DEFAULT_SAE_HOOK

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hst = HookedSAETransformer(default_model.cfg, tokenizer=default_model.tokenizer)
    hst.load_state_dict(default_model.state_dict(), strict=False)
    sae = tl_steer.load_default_sae()
    vector = torch.randn(default_model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    iv = tl_steer.AddVector(DEFAULT_SAE_HOOK, vector)
    tokens = default_model.to_tokens("The capital of France is")
    with tl_steer.steer(hst, iv, m=4.0):
        got, cache = hst.run_with_cache_with_saes(tokens, saes=[sae])
    _, clean = hst.run_with_cache_with_saes(tokens, saes=[sae])
    shift = cache[f"{DEFAULT_SAE_HOOK}.hook_sae_input"] - clean[f"{DEFAULT_SAE_HOOK}.hook_sae_input"]
    torch.testing.assert_close(shift, (4.0 * vector).expand_as(shift), rtol=0, atol=1e-4)
    name = f"{DEFAULT_SAE_HOOK}.hook_sae_input"
    want = hst.run_with_hooks_with_saes(tokens, saes=[sae], fwd_hooks=[(name, add(vector, 4.0))])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_steering_an_sae_hook_point_that_is_removed_is_a_loud_error(hst, sae, vector) -> None:
    hst.add_sae(sae)
    iv = tl_steer.AddVector(f"{HOOK}.hook_sae_input", vector)
    clean = hst(TOKENS)
    with pytest.raises(HookNameError, match=r"hook_sae_input' is gone.*blocks\.1\.hook_resid_post"):  # noqa: SIM117
        with tl_steer.steer(hst, iv, m=M):
            assert (hst(TOKENS) - clean).abs().max() > 0  # steered while the SAE is there
            hst.reset_saes()
    assert nothing_left(hst, sae)


IN_HOOK, OUT_HOOK = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def make_transcoder(d: int):
    from sae_lens import Transcoder, TranscoderConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(3)
    cfg = TranscoderConfig(
        d_in=d,
        d_sae=48,
        d_out=d,
        dtype="float64",
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(hook_name=IN_HOOK, hook_name_out=OUT_HOOK),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transcoder = Transcoder(cfg)
    with torch.no_grad():
        transcoder.W_enc.normal_(0, 0.3)
        transcoder.b_enc.normal_(0, 0.1)
    return transcoder


@pytest.mark.parametrize("attached_before", [False, True])
@pytest.mark.parametrize("error_term", [False, True])
def test_a_transcoder_encodes_its_steered_input(base, hst, vector, error_term, attached_before) -> None:
    """Steering a transcoder's input hook: the transcoder reads the steered activation (steer's hook runs
    before the transcoder's capture); with the error term the model is the one steered without it."""
    transcoder = make_transcoder(base.cfg.d_model)
    transcoder.use_error_term = error_term
    iv = tl_steer.AddVector(IN_HOOK, vector)
    if error_term:
        want = base.run_with_hooks(TOKENS, fwd_hooks=[(IN_HOOK, add(vector))])
    else:
        name = native(hst, f"{OUT_HOOK}.hook_sae_input")
        want = hst.run_with_hooks_with_saes(TOKENS, saes=[transcoder], fwd_hooks=[(name, add(vector))])
    clean = hst.run_with_saes(TOKENS, saes=[transcoder])
    if attached_before:  # its capture hook is then older than steer's: steer's must still run first
        hst.add_sae(transcoder)
    with tl_steer.steer(hst, iv, m=M):
        got = hst(TOKENS) if attached_before else hst.run_with_saes(TOKENS, saes=[transcoder])
    hst.reset_saes()
    assert (got - clean).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert nothing_left(hst, transcoder)


def test_a_transcoder_output_site_steers_after_it_or_refuses(hst, vector) -> None:
    transcoder = make_transcoder(hst.cfg.d_model)
    iv = tl_steer.AddVector(OUT_HOOK, vector)
    hst.add_sae(transcoder)
    with pytest.raises(ConfigError, match=r"transcoder.*sae_site='after'"), tl_steer.steer(hst, iv, m=M):
        pass
    name = native(hst, f"{OUT_HOOK}.hook_sae_output")
    want = hst.run_with_hooks(TOKENS, fwd_hooks=[(name, add(vector))])
    with tl_steer.steer(hst, iv, m=M, sae_site="after"):
        got = hst(TOKENS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
