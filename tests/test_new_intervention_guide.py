"""docs/new_intervention.md: its code runs, and its example kind keeps the contract it describes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import no_hooks_left

import tl_steer
from tl_steer import ConfigError, ShapeError
from tl_steer.interventions import registry

GUIDE = Path(__file__).parent.parent / "docs" / "new_intervention.md"
HOOK = "blocks.1.hook_resid_post"
TEXT = "The food was wonderful"


def guide_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), flags=re.DOTALL)


@pytest.fixture(scope="module")
def namespace(tiny) -> dict:
    """The guide's python blocks, run in order in one namespace with ``model`` (a tiny model) given."""
    blocks = guide_blocks()
    assert len(blocks) == 2, "the guide has the example kind and its use"
    space: dict = {"__name__": "guide", "model": tiny}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{GUIDE.name}[python block {i}]", "exec"), space)
    assert no_hooks_left(tiny)
    return space


def resid(model, fwd_hooks=()):
    seen = {}

    def grab(act, hook):
        seen["act"] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(model.to_tokens(TEXT), fwd_hooks=[*fwd_hooks, (HOOK, grab)], return_type=None)
    return seen["act"]


def test_the_example_is_the_formula_of_the_guide(tiny, namespace) -> None:
    ProjectOut = namespace["ProjectOut"]
    d = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1), dtype=tiny.cfg.dtype)
    iv = ProjectOut(HOOK, d, unit=2.0)
    clean = resid(tiny)
    unit_d = d / d.norm()
    expected = clean - 0.6 * (clean @ unit_d)[..., None] * unit_d  # raw = m * unit = 0.3 * 2
    torch.testing.assert_close(resid(tiny, iv.hooks(0.3)), expected, rtol=0, atol=1e-10)
    # at m = 1 with unit 1 the component is gone
    removed = resid(tiny, ProjectOut(HOOK, d).hooks(1.0))
    assert float((removed @ unit_d).abs().max()) < 1e-10 < float((clean @ unit_d).abs().max())
    assert iv.hooks(0.0) == []


def test_the_example_keeps_the_rest_of_the_contract(tiny, namespace, tmp_path) -> None:
    ProjectOut = namespace["ProjectOut"]
    assert registry()["project_out"] is ProjectOut
    d = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(2), dtype=tiny.cfg.dtype)
    iv = ProjectOut(HOOK, d, unit=1.5, positions="last_prompt")
    tokens = tiny.to_tokens([TEXT, TEXT])
    with tl_steer.prompt_boundary(3):
        changed = (resid(tiny, iv.hooks(1.0)) - resid(tiny)).abs().amax(-1)[0] > 0
        assert changed.tolist() == [i == 2 for i in range(changed.shape[0])]
        # linear in m: a strength per row equals each row alone
        both = tiny.run_with_hooks(tokens, fwd_hooks=iv.row_hooks(torch.tensor([1.0, -0.5]), model=tiny))
        for row, m in ((0, 1.0), (1, -0.5)):
            alone = tiny.run_with_hooks(tokens[row : row + 1], fwd_hooks=iv.hooks(m))
            torch.testing.assert_close(both[row], alone[0], rtol=0, atol=1e-10)
    loaded = tl_steer.load(tl_steer.save(iv, tmp_path / "po"), tiny)
    assert loaded.unit == 1.5 and loaded.positions.kind == "last_prompt"
    with tl_steer.prompt_boundary(3):
        torch.testing.assert_close(resid(tiny, loaded.hooks(0.7)), resid(tiny, iv.hooks(0.7)), rtol=0, atol=0)
    with pytest.raises(ShapeError, match="non-zero 1-D direction"):
        ProjectOut(HOOK, torch.zeros(tiny.cfg.d_model))
    with pytest.raises(ConfigError, match="unit"):
        ProjectOut(HOOK, d, unit=0.0)
    assert no_hooks_left(tiny)
