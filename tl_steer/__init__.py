"""tl_steer: steer a TransformerLens model at its hook points, and measure what the steering cost.

Every method returns an :class:`Intervention`, addressed by TransformerLens hook names and scaled by
one strength ``m`` (``m = 0`` is exactly the clean model)::

    import tl_steer
    model = tl_steer.load_default_model()
    pairs = tl_steer.load_pairs("sentiment")
    vector = tl_steer.diffmean(model, pairs, "blocks.15.hook_resid_post")
    with tl_steer.steer(model, vector, m=4.0):
        print(model.generate("I went to the cinema and", max_new_tokens=20))
"""

from tl_steer.analysis.ab import ab_accuracy
from tl_steer.analysis.capability import MCResult, mc_accuracy, mc_option_nll
from tl_steer.analysis.gap import Condition, GapResult, capability_behavior_gap
from tl_steer.analysis.manifold import ManifoldProbe
from tl_steer.analysis.manifold_sweep import ManifoldSweepResult, manifold_sweep
from tl_steer.analysis.method_comparison import ComparisonResult, compare_interventions, compare_methods
from tl_steer.analysis.preference_utility import PreferenceUtilityResult, preference_utility
from tl_steer.analysis.sample_efficiency import sample_efficiency
from tl_steer.data import (
    ABItem,
    ContrastivePair,
    MCItem,
    builtin_concepts,
    load_ab_items,
    load_mc_items,
    load_pairs,
    read_ab_items,
    read_mc_items,
    read_pairs,
)
from tl_steer.default_sae import load_default_sae
from tl_steer.errors import (
    ConfigError,
    DataError,
    FileFormatError,
    HookNameError,
    MissingDependencyError,
    ModelMismatchError,
    ShapeError,
    TlSteerError,
)
from tl_steer.hookpoints import get_act_name
from tl_steer.interventions import AddVector, Intervention
from tl_steer.io import load, read_metadata, save
from tl_steer.methods import (
    ColdFD,
    SAEFeatureEdit,
    cold_fd,
    cold_kernel,
    diffmean,
    rank_features,
    sae_feature,
    sft,
    split,
)
from tl_steer.models import hooked_from_hf, load_default_model, model_identity
from tl_steer.module_delta import LocalWeight, LoRA, ModuleDelta
from tl_steer.positions import PositionPolicy, prompt_boundary
from tl_steer.scoring import completion_nll, logits_budget, pair_nll
from tl_steer.steering import steer

__version__ = "0.1.0"

__all__ = [
    "ABItem",
    "ColdFD",
    "Condition",
    "GapResult",
    "MCItem",
    "MCResult",
    "capability_behavior_gap",
    "load_mc_items",
    "mc_accuracy",
    "mc_option_nll",
    "read_mc_items",
    "SAEFeatureEdit",
    "rank_features",
    "sae_feature",
    "ComparisonResult",
    "compare_interventions",
    "compare_methods",
    "ab_accuracy",
    "cold_fd",
    "cold_kernel",
    "load_ab_items",
    "read_ab_items",
    "sample_efficiency",
    "AddVector",
    "ConfigError",
    "ContrastivePair",
    "DataError",
    "FileFormatError",
    "HookNameError",
    "Intervention",
    "LoRA",
    "ManifoldProbe",
    "ManifoldSweepResult",
    "LocalWeight",
    "MissingDependencyError",
    "ModelMismatchError",
    "ModuleDelta",
    "PositionPolicy",
    "PreferenceUtilityResult",
    "ShapeError",
    "TlSteerError",
    "builtin_concepts",
    "completion_nll",
    "diffmean",
    "get_act_name",
    "hooked_from_hf",
    "load",
    "load_default_model",
    "load_default_sae",
    "load_pairs",
    "logits_budget",
    "manifold_sweep",
    "model_identity",
    "pair_nll",
    "preference_utility",
    "prompt_boundary",
    "read_metadata",
    "read_pairs",
    "save",
    "sft",
    "split",
    "steer",
]
