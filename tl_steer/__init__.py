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
from tl_steer.analysis.capability import MCCleanPrefix, MCResult, mc_accuracy, mc_option_nll
from tl_steer.analysis.gap import Condition, GapResult, capability_behavior_gap
from tl_steer.analysis.generation_sweep import (
    GenerationSweepResult,
    TextBehavior,
    generation_sweep,
    proxy_text_correlation,
)
from tl_steer.analysis.layer_sweep import BestLayer, LayerSweepResult, layer_sweep
from tl_steer.analysis.manifold import ManifoldProbe, ProbeSettings
from tl_steer.analysis.manifold_sweep import ManifoldSweepResult, manifold_sweep
from tl_steer.analysis.matched_gain import MatchedGainResult, matched_gain
from tl_steer.analysis.method_comparison import ComparisonResult, compare_interventions, compare_methods
from tl_steer.analysis.preference_utility import PreferenceUtilityResult, preference_utility
from tl_steer.analysis.sample_efficiency import SampleEfficiencyConfig, sample_efficiency
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
from tl_steer.data.prompts import load_prompts, read_prompts
from tl_steer.default_sae import load_default_sae
from tl_steer.errors import (
    ConfigError,
    DataError,
    FileFormatError,
    HookNameError,
    MissingDependencyError,
    ModelMismatchError,
    SaveError,
    ShapeError,
    TlSteerError,
)
from tl_steer.generation import generate
from tl_steer.hookpoints import get_act_name
from tl_steer.interventions import AddVector, Intervention
from tl_steer.io import load, read_metadata, save
from tl_steer.judges import FluencyJudge, LLMJudge, ProbeJudge, RelevanceJudge, judge_table
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
from tl_steer.methods.adaptive import (
    BudgetedAddition,
    Conditional,
    ProjectionClamp,
    Rotation,
    budgeted_addition,
    condition_probe,
    conditional,
    projection_clamp,
    rotation,
)
from tl_steer.methods.split_config import SplitConfig
from tl_steer.models import bridge_from_hf, hooked_from_hf, load_default_model, model_identity
from tl_steer.module_delta import LocalWeight, LoRA, ModuleDelta
from tl_steer.positions import PositionPolicy, prompt_boundary
from tl_steer.scoring import completion_nll, logits_budget, pair_nll
from tl_steer.steering import steer

__version__ = "0.2.0"

__all__ = [
    # the model and its hook points
    "load_default_model",
    "hooked_from_hf",
    "bridge_from_hf",
    "model_identity",
    "get_act_name",
    "load_default_sae",
    # interventions and steering
    "Intervention",
    "AddVector",
    "ModuleDelta",
    "LoRA",
    "LocalWeight",
    "SAEFeatureEdit",
    "ColdFD",
    "ProjectionClamp",
    "BudgetedAddition",
    "Rotation",
    "Conditional",
    "PositionPolicy",
    "prompt_boundary",
    "steer",
    # steering methods
    "diffmean",
    "split",
    "sft",
    "SplitConfig",
    "cold_kernel",
    "cold_fd",
    "sae_feature",
    "rank_features",
    "projection_clamp",
    "budgeted_addition",
    "rotation",
    "condition_probe",
    "conditional",
    # saving and loading
    "save",
    "load",
    "read_metadata",
    # data
    "ContrastivePair",
    "ABItem",
    "MCItem",
    "builtin_concepts",
    "load_pairs",
    "read_pairs",
    "load_ab_items",
    "read_ab_items",
    "load_mc_items",
    "read_mc_items",
    "load_prompts",
    "read_prompts",
    # scoring
    "completion_nll",
    "pair_nll",
    "logits_budget",
    "ab_accuracy",
    "mc_accuracy",
    "mc_option_nll",
    "MCCleanPrefix",
    "MCResult",
    # analyses and their results
    "preference_utility",
    "PreferenceUtilityResult",
    "layer_sweep",
    "LayerSweepResult",
    "BestLayer",
    "compare_interventions",
    "compare_methods",
    "ComparisonResult",
    "capability_behavior_gap",
    "Condition",
    "GapResult",
    "matched_gain",
    "MatchedGainResult",
    "ManifoldProbe",
    "ProbeSettings",
    "manifold_sweep",
    "ManifoldSweepResult",
    "sample_efficiency",
    "SampleEfficiencyConfig",
    # steered text: generation and its judges
    "generate",
    "generation_sweep",
    "GenerationSweepResult",
    "proxy_text_correlation",
    "TextBehavior",
    "judge_table",
    "FluencyJudge",
    "LLMJudge",
    "ProbeJudge",
    "RelevanceJudge",
    # errors
    "TlSteerError",
    "ConfigError",
    "DataError",
    "FileFormatError",
    "HookNameError",
    "MissingDependencyError",
    "ModelMismatchError",
    "SaveError",
    "ShapeError",
]
