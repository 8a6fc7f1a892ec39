"""A finite but huge strength is refused at the first forward pass, naming m and the hook, instead of
giving NaN logits (m = 1e38 in float32) or a uniform distribution (m = 1e30)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import make_model, no_hooks_left

import tl_steer
from tl_steer.errors import ConfigError
from tl_steer.overflow import largest_safe_edit

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
TOKENS = torch.tensor([[1, 5, 7, 9, 3, 11]])


@pytest.fixture(scope="module", params=[torch.float32, torch.float16])
def model(request):
    return make_model("llama", dtype=request.param)


def vector(model) -> tl_steer.AddVector:
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    return tl_steer.AddVector(HOOK, v / v.abs().max())  # largest entry 1: the edit's size is |m|


def test_the_bound_is_where_the_normalisation_overflows() -> None:
    assert largest_safe_edit(torch.float32, 576) == pytest.approx(math.sqrt(torch.finfo(torch.float32).max / 576))
    assert largest_safe_edit(torch.float16, 576) == torch.finfo(torch.float16).max  # norms run in float32
    assert largest_safe_edit(torch.float64, 4) == pytest.approx(math.sqrt(torch.finfo(torch.float64).max / 4))


@pytest.mark.parametrize("m", [1e38, 1e30, -1e25])
def test_huge_strengths_are_refused_at_the_first_pass(model, m) -> None:
    if model.cfg.dtype == torch.float16:
        m = m / 1e20 if abs(m) > 1e20 else m  # still far past float16's 65504
    clean = model(TOKENS)
    with (
        pytest.raises(ConfigError, match=re.escape(f"m={m:g} is too large at {HOOK!r}")),
        tl_steer.steer(model, vector(model), m=m),
    ):
        model(TOKENS)
    assert no_hooks_left(model)
    assert torch.equal(model(TOKENS), clean)


def test_huge_strength_in_generate_is_refused(model) -> None:
    with pytest.raises(ConfigError, match="too large"), tl_steer.steer(model, vector(model), m=1e30):
        model.generate(TOKENS, max_new_tokens=3, verbose=False)
    assert no_hooks_left(model)


def test_what_passes_gives_finite_distinct_logits(model) -> None:
    """Just under the bound steering still works (finite logits, not the uniform distribution)."""
    bound = largest_safe_edit(model.cfg.dtype, model.cfg.d_model)
    m = min(bound / 4, 1e4)
    with tl_steer.steer(model, vector(model), m=m):
        logits = model(TOKENS).float()
    assert torch.isfinite(logits).all()
    assert logits[0, -1].std() > 0


def test_an_activation_that_was_already_infinite_is_not_blamed_on_m(model) -> None:
    """Only activations that the edit made non-finite count: a model already overflowing is its own problem."""
    iv = vector(model)
    inf_at = [("blocks.1.hook_resid_mid", lambda a, hook: torch.full_like(a, math.inf))]
    with tl_steer.steer(model, iv, m=1.0):
        out = model.run_with_hooks(TOKENS, fwd_hooks=inf_at)
    assert not torch.isfinite(out).all()
