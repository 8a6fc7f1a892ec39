"""Options objects (SplitConfig, ProbeSettings, SampleEfficiencyConfig): the same result as the keywords,
refused together with them, and SPLIT's default margin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_model
from test_split import LAYER, PAIRS

from tl_steer import ConfigError
from tl_steer.analysis.manifold import ManifoldProbe, ProbeSettings
from tl_steer.analysis.sample_efficiency import SampleEfficiencyConfig, sample_efficiency
from tl_steer.config import is_default, resolve
from tl_steer.data.ab import ABItem
from tl_steer.methods.split import PUBLISHED_THETA, SplitConfig, sft, split

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(epochs=1, batch_size=4, progress=False)


def test_resolve_and_is_default():
    assert is_default(SplitConfig()) and not is_default(SplitConfig(lr=0.1))
    assert not is_default(SplitConfig(m_grid=torch.tensor([1.0, 2.0])))  # no tensor truthiness error
    given = SplitConfig(epochs=7)
    assert resolve(given, SplitConfig()) is given and resolve(None, given) is given
    with pytest.raises(ConfigError, match="not both: lr"):
        resolve(given, SplitConfig(lr=0.1))
    with pytest.raises(ConfigError, match="must be a SplitConfig"):
        resolve(ProbeSettings(), SplitConfig())


def test_split_config_equals_keywords(tiny):
    by_keywords, history_k = split(tiny, PAIRS, LAYER, "vector", lr=0.05, seed=3, **FAST)
    config = SplitConfig(lr=0.05, seed=3, epochs=1, batch_size=4)
    by_config, history_c = split(tiny, PAIRS, LAYER, "vector", config=config, progress=False)
    torch.testing.assert_close(by_config.tensors(), by_keywords.tensors(), rtol=0, atol=0)
    assert history_c.equals(history_k) and by_config.info["lr"] == 0.05
    with pytest.raises(ConfigError, match="not both: gamma"):
        split(tiny, PAIRS, LAYER, "vector", config=config, gamma=1.0, progress=False)
    with pytest.raises(ConfigError, match="must be a SplitConfig"):
        split(tiny, PAIRS, LAYER, "vector", config={"lr": 0.05}, progress=False)  # type: ignore[arg-type]


def test_sft_config_keeps_the_sft_loss(tiny):
    iv, _ = sft(tiny, PAIRS, LAYER, "vector", config=SplitConfig(gamma=9.0, theta=3.0, epochs=1, batch_size=4))
    assert (iv.info["lambda_p"], iv.info["lambda_n"], iv.info["gamma"], iv.info["theta"]) == (1.0, 0.0, 0.0, 0.0)
    same, _ = sft(tiny, PAIRS, LAYER, "vector", **FAST)
    torch.testing.assert_close(iv.tensors(), same.tensors(), rtol=0, atol=0)


def test_split_default_margin_is_two_and_the_published_one_is_an_argument_away(tiny):
    assert SplitConfig().theta == 2.0 and PUBLISHED_THETA == 0.5
    default, h_default = split(tiny, PAIRS, LAYER, "vector", **FAST)
    published, h_published = split(tiny, PAIRS, LAYER, "vector", theta=PUBLISHED_THETA, **FAST)
    assert default.info["theta"] == 2.0 and published.info["theta"] == 0.5
    # The first step starts from the same (zero) vector: the hinge relu(theta - margin) differs by 1.5
    # where it is active for both margins.
    assert h_default["hinge"][0] == pytest.approx(h_published["hinge"][0] + 1.5, abs=1e-6)


def test_probe_settings_equal_keywords():
    acts = torch.randn(400, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    by_keywords = ManifoldProbe.from_activations(acts, k=3, knn_k=4, n_reference=100, holdout=0.25, seed=5)
    settings = ProbeSettings(k=3, knn_k=4, n_reference=100, holdout=0.25, seed=5)
    by_settings = ManifoldProbe.from_activations(acts, settings=settings)
    assert by_settings.settings == settings == by_keywords.settings
    queries = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name, values in by_keywords.distances(queries).items():
        np.testing.assert_array_equal(by_settings.distances(queries)[name], values)
    with pytest.raises(ConfigError, match="not both: k"):
        ManifoldProbe.from_activations(acts, settings=settings, k=5)
    with pytest.raises(ConfigError, match="knn_k"):
        ManifoldProbe.from_activations(acts, settings=dataclasses.replace(settings, knn_k=0))


def test_sample_efficiency_config_equals_keywords():
    model = make_model("llama")
    items = [ABItem("Is it fine?", "fine", "cold", "A"), ABItem("Was it kind?", "awful", "kind", "B")]
    settings = dict(
        ns=(2,),
        seeds=(0,),
        hook="blocks.1.hook_resid_post",
        methods=("diffmean",),
        test_items=items,
        test_pairs=PAIRS[:2],
        train_on="pairs",
        train_pairs=PAIRS,
        baseline=False,
    )
    by_keywords = sample_efficiency(model, "sentiment", **settings)  # type: ignore[arg-type]
    config = SampleEfficiencyConfig(**settings)  # type: ignore[arg-type]
    by_config = sample_efficiency(model, "sentiment", config=config)
    assert by_config.equals(by_keywords)
    with pytest.raises(ConfigError, match="not both: ns"):
        sample_efficiency(model, "sentiment", config=config, ns=(1,))


# ----- one shape for result classes ------------------------------------------------------------------------
RESULT_CLASSES = [
    "tl_steer.analysis.preference_utility.PreferenceUtilityResult",
    "tl_steer.analysis.manifold_sweep.ManifoldSweepResult",
    "tl_steer.analysis.method_comparison.ComparisonResult",
    "tl_steer.analysis.gap.GapResult",
    "tl_steer.analysis.capability.MCResult",
    "tl_steer.analysis.generation_sweep.GenerationSweepResult",
    "tl_steer.analysis.layer_sweep.LayerSweepResult",
]


@pytest.mark.parametrize("path", RESULT_CLASSES)
def test_result_classes_share_summary_to_csv_plot(path):
    import importlib
    import inspect

    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    for method in ("summary", "to_csv", "plot"):
        assert callable(getattr(cls, method, None)), f"{name} has no {method}()"
    params = inspect.signature(cls.to_csv).parameters
    assert "summary" in params and list(params)[1] == "path"
    assert (
        list(inspect.signature(cls.plot).parameters)[1] == "path" and "title" in inspect.signature(cls.plot).parameters
    )


def test_mc_result_summary_csv_and_plot(tmp_path):
    import pandas as pd

    from tl_steer.analysis.capability import mc_result

    nll = torch.tensor([[0.1, 2.0, 3.0], [1.0, 0.5, 2.0], [0.3, 0.2, float("inf")], [1.0, 1.0, 0.1]])
    result = mc_result(nll, torch.tensor([0, 0, 1, 2]))
    row = result.summary().iloc[0]
    assert row["n"] == 4 and row["accuracy"] == 0.75 and row["accuracy_low"] <= 0.75 <= row["accuracy_high"]
    items = pd.read_csv(result.to_csv(tmp_path / "mc.csv"))
    assert items["correct"].tolist() == [True, False, True, True] and items["chosen"].tolist() == [0, 1, 1, 2]
    assert pd.read_csv(result.to_csv(tmp_path / "s.csv", summary=True))["accuracy"].tolist() == [0.75]
    result.plot(tmp_path / "mc.png")
    assert (tmp_path / "mc.png").stat().st_size > 0
