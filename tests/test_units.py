"""One meaning for m: each method's unit makes m = 1 the strength it was made for.

DiffMean adds its mean difference; COLD-Kernel and COLD-FD add DiffMean's norm on their examples; SAE
edits apply the value asked for. Each unit is checked against an independent computation: DiffMean
itself, and the change measured at the hook with the intervention installed.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SENTIMENT_PAIRS, TINY_HOOK, no_hooks_left
from transformer_lens import HookedTransformer

import tl_steer
from tl_steer import ContrastivePair
from tl_steer.methods.cold import cold_fd, cold_fd_prefixes, cold_kernel, cold_kernel_prefixes
from tl_steer.methods.cold.unit import POSITIVE_ONLY_FRACTION

HOOK = TINY_HOOK
PAIRS = [ContrastivePair(*t) for t in SENTIMENT_PAIRS[:4]]
POSITIVE_ONLY = [(p.prompt, p.positive) for p in PAIRS]


def mean_change_norm(model: HookedTransformer, iv: tl_steer.Intervention, texts: list[str]) -> float:
    """The mean norm of the change ``iv`` makes at m = 1 at ``HOOK``, over each text's positions but the
    first, each text run alone (no padding)."""
    norms = []
    seen: list[torch.Tensor] = []

    def grab(act, hook):
        seen.append(act.detach().clone())

    for text in texts:
        tokens = model.to_tokens(text)
        seen.clear()
        with torch.no_grad():
            model.run_with_hooks(tokens, fwd_hooks=[(HOOK, grab)], return_type=None)
            with tl_steer.steer(model, iv, m=1.0):
                model.run_with_hooks(tokens, fwd_hooks=[(HOOK, grab)], return_type=None)
        norms.append((seen[1] - seen[0])[0, 1:].norm(dim=-1))
    return float(torch.cat(norms).mean())


def test_diffmean_unit_is_1_and_m_1_adds_the_mean_difference(tiny):
    dm = tl_steer.diffmean(tiny, PAIRS, HOOK)
    assert dm.unit == 1.0
    assert mean_change_norm(tiny, dm, ["The food was awful"]) == pytest.approx(float(dm.vector.norm()), rel=1e-9)


def test_cold_kernel_m_1_adds_diffmeans_norm(tiny):
    reference = float(tl_steer.diffmean(tiny, PAIRS, HOOK).vector.norm())
    for eta in (1.0, 0.01):  # m = 1 does not depend on eta
        kernel = cold_kernel(tiny, PAIRS, HOOK, eta=eta)
        assert kernel.unit != 1.0
        assert float(kernel.vector.norm()) * kernel.unit == pytest.approx(reference, rel=1e-6)
        assert kernel.info["reference_norm"] == pytest.approx(reference, rel=1e-6)


def test_cold_kernel_positive_only_reference_is_a_fraction_of_the_activation_norm(tiny):
    kernel = cold_kernel(tiny, POSITIVE_ONLY, HOOK)
    # Independently: the activation norms over the completion tokens, from the scoring tokenisation.
    data = tl_steer.scoring.tokenize_completions(tiny, [p for p, _ in POSITIVE_ONLY], [c for _, c in POSITIVE_ONLY])
    norms = []
    for seq, start in zip(data.sequences, data.starts, strict=True):
        _, cache = tiny.run_with_cache(torch.tensor([seq]), names_filter=HOOK)
        norms.append(cache[HOOK][0, start:].norm(dim=-1))
    expected = POSITIVE_ONLY_FRACTION * float(torch.cat(norms).median())
    assert float(kernel.vector.norm()) * kernel.unit == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["fd", "jvp"])
def test_cold_fd_m_1_adds_diffmeans_norm_on_the_examples(tiny, method):
    model = tiny
    iv = cold_fd(model, PAIRS, HOOK, method=method, eps=1e-6 if method == "fd" else None)
    reference = float(tl_steer.diffmean(model, PAIRS, HOOK).vector.norm())
    texts = [p.prompt + c for p in PAIRS for c in (p.positive, p.negative)]
    # Measured by steering each example text alone (the unit was measured on padded batches).
    assert mean_change_norm(model, iv, texts) == pytest.approx(reference, rel=1e-4)
    assert iv.unit != 1.0 and iv.n_perturbed_passes == len(texts)  # the unit's passes are not counted
    assert no_hooks_left(model)


def test_prefix_units_equal_separate_runs(tiny):
    kernels = dict(cold_kernel_prefixes(tiny, PAIRS, HOOK, [1, 3], batch_size=2))
    fds = dict(cold_fd_prefixes(tiny, PAIRS, HOOK, [1, 3], batch_size=2))
    for n in (1, 3):
        assert kernels[n].unit == pytest.approx(cold_kernel(tiny, PAIRS[:n], HOOK).unit, rel=1e-9)
        assert fds[n].unit == pytest.approx(cold_fd(tiny, PAIRS[:n], HOOK).unit, rel=1e-9)


def test_cold_fd_loaded_without_a_model_steers_unchecked(tiny, tmp_path):
    iv = cold_fd(tiny, PAIRS, HOOK)
    path = tl_steer.save(iv, tmp_path / "fd")
    tokens = tiny.to_tokens("The food was awful")
    with tl_steer.steer(tiny, iv, m=1.0), torch.no_grad():
        expected = tiny(tokens)
    loaded = tl_steer.load(path)  # no model: nothing is bound to it
    with tl_steer.steer(tiny, loaded, m=1.0, check=False), torch.no_grad():
        torch.testing.assert_close(tiny(tokens), expected, rtol=0, atol=0)
    with pytest.raises(tl_steer.ConfigError, match=r"needs the model.*model=model"):
        loaded.hooks(1.0)


def test_units_of_sae_edits_are_1():
    sae_lens = pytest.importorskip("sae_lens")
    del sae_lens
    from tl_steer.methods.sae import SAEFeatureEdit

    iv = SAEFeatureEdit(HOOK, "add", [0], torch.tensor([2.0]), directions=torch.ones(1, 32))
    assert iv.unit == 1.0 and SAEFeatureEdit.linear_in_m and not SAEFeatureEdit.needs_model
