"""The README's tour runs as written: its Python blocks are executed, in order, on the default model, as a
HookedTransformer and as a TransformerBridge."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def tour_blocks(text: str) -> list[str]:
    """The ```python blocks between the "## A tour" heading and the next level-2 heading."""
    match = re.search(r"^## A tour\n(.*?)(?=^## )", text, flags=re.M | re.S)
    if match is None:
        raise AssertionError("README.md has no '## A tour' section followed by another '## ' section")
    return re.findall(r"^```python\n(.*?)^```", match.group(1), flags=re.M | re.S)


def test_tour_blocks_are_found_and_compile() -> None:
    blocks = tour_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) >= 2
    assert "load_default_model" in blocks[0] and "preference_utility" in blocks[0]
    for i, block in enumerate(blocks):
        compile(block, f"README tour block {i}", "exec")


def test_tour_blocks_stop_at_the_next_section() -> None:
    text = "## A tour\n```python\na = 1\n```\n## Next\n```python\nb = 2\n```\n"
    assert tour_blocks(text) == ["a = 1\n"]


@pytest.mark.default_model
@pytest.mark.parametrize("host", ["hooked", "bridge"])
def test_readme_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    """The tour as written, with ``tl_steer.load_default_model()`` giving each host in turn (unchanged code)."""
    import tl_steer
    from tl_steer.hosts import is_bridge

    monkeypatch.chdir(tmp_path)  # the tour writes a figure and a saved intervention
    monkeypatch.setattr(tl_steer, "load_default_model", functools.partial(tl_steer.load_default_model, host=host))
    namespace: dict[str, object] = {"__name__": "readme_tour"}
    for i, block in enumerate(tour_blocks(README.read_text(encoding="utf-8"))):
        exec(compile(block, f"README tour block {i}", "exec"), namespace)
    assert is_bridge(namespace["model"]) == (host == "bridge")
    # What the tour claims, checked loosely: steering at m = 1 raised the preference on the test pairs,
    # and the saved vector came back.
    summary = namespace["result"].summary()  # type: ignore[attr-defined]
    by_m = dict(zip(summary["m"], summary["pref_odds"], strict=True))
    assert by_m[1.0] > by_m[0.0]
    assert (tmp_path / "sentiment_l15.safetensors").is_file()
    assert (tmp_path / "preference_utility.png").is_file()
