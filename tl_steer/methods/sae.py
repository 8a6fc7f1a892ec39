"""SAE feature steering with sae-lens SAEs, and scores for choosing the features (docs/methods.md, section 7).

Three edits at the SAE's own hook (``sae.cfg.metadata.hook_name``), each scaled by the strength m:

- ``add``:    h <- h + m * sum_i c_i W_dec[i]
- ``clamp``:  h <- h + m * (D(z') - D(z)),  z = E(h), z' = z with z_i set to c_i
- ``ablate``: the same with c_i = 0

Their unit is 1: m = 1 is the edit as asked for (clamp and ablate set the feature exactly; add adds the
coefficients c_i, in the unit :func:`sae_feature`'s ``scale`` chose).

where E and D are the SAE's own encode and decode. ``D(z') - D(z)`` equals decoding z' and adding back
the SAE's error term ``h - D(z)``, so m = 0, and clamping a feature to its current value, are exactly the
clean model: the SAE's reconstruction error never leaks into the steered run.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from scipy.stats import rankdata
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.activations import completion_activations
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, HookNameError, MissingDependencyError, ShapeError
from tl_steer.hookpoints import validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import EditEntry, Intervention, hook_widths
from tl_steer.models import model_identity
from tl_steer.positions import PositionsLike
from tl_steer.scoring import pair_nll, tokenize_completions

Mode = Literal["add", "clamp", "ablate"]
Scale = Literal["raw", "max_act", "norm"]
MODES = ("add", "clamp", "ablate")
SCALES = ("raw", "max_act", "norm")


def _sae_class() -> Any:
    try:
        from sae_lens import SAE
    except ImportError as exc:  # sae-lens cannot be installed beside TransformerLens 4
        from tl_steer.hosts import sae_lens_install_hint

        raise MissingDependencyError(f"SAE feature steering needs sae-lens: {sae_lens_install_hint()}") from exc
    return SAE


def sae_hook(sae: Any) -> str:
    """The hook name an sae-lens SAE reads (``sae.cfg.metadata.hook_name``); raise if it has none."""
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if not isinstance(hook, str) or not hook:
        raise HookNameError("this SAE records no hook name (sae.cfg.metadata.hook_name); set it to the hook it reads")
    if getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        raise HookNameError(f"SAEs on per-head activations ({hook!r}, hook_z) are not supported for steering yet")
    return hook


def check_sae(model: Host, sae: Any) -> str:
    """Raise before any work if ``sae`` does not fit ``model``; return its hook name.

    Checks that the hook exists and that its width is the SAE's d_in, and warns when the SAE was trained
    on a model loaded with LayerNorm folding and this one was not (or the other way round): its features
    then read a differently scaled residual stream.
    """
    hook = sae_hook(sae)
    validate_hook(model, hook)
    width = hook_widths(model, [hook])[hook]
    if width != sae.cfg.d_in:
        raise ShapeError(
            f"the SAE reads vectors of width d_in={sae.cfg.d_in}, but {hook!r} of this model has width {width}; "
            "was the SAE trained for another model?"
        )
    kwargs = getattr(sae.cfg.metadata, "model_from_pretrained_kwargs", None) or {}
    folded = model.cfg.normalization_type in ("LNPre", "RMSPre")
    if "fold_ln" in kwargs and bool(kwargs["fold_ln"]) != folded:
        warnings.warn(
            f"the SAE was trained with fold_ln={kwargs['fold_ln']}, but this model's normalisation is "
            f"{model.cfg.normalization_type!r} (fold_ln={folded}); load the model with the SAE's "
            "model_from_pretrained_kwargs for faithful features",
            stacklevel=3,
        )
    return hook


def _frozen_copy(sae: Any) -> Any:
    sae = copy.deepcopy(sae)
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae


def _json_safe(value: dict[str, Any]) -> dict[str, Any]:
    """The SAE config as plain JSON (tuples to lists, anything else exotic to its string)."""
    return json.loads(json.dumps(value, default=str))


class SAEFeatureEdit(Intervention):
    """Adds, clamps or ablates SAE features at the SAE's hook; see the module docstring for the formulas.

    ``add`` keeps only the features' decoder rows; ``clamp`` and ``ablate`` keep a frozen copy of the SAE.
    """

    kind = "sae_feature"
    # clamp and ablate too: the change D(z') - D(z) does not depend on m, which only scales it.
    linear_in_m = True

    def __init__(
        self,
        hook: str,
        mode: Mode,
        features: Sequence[int],
        values: Float[Tensor, " k"],
        *,
        directions: Float[Tensor, "k d"] | None = None,
        sae: Any = None,
        positions: PositionsLike | None = None,
        method: str | None = None,
        info: dict[str, Any] | None = None,
        model_identity: dict[str, Any] | None = None,
        unit: float = 1.0,
    ) -> None:
        super().__init__(
            positions=positions, method=method or "sae", info=info, model_identity=model_identity, unit=unit
        )
        if mode not in MODES:
            raise ConfigError(f"unknown SAE edit mode {mode!r}; valid modes: {', '.join(MODES)}")
        if not isinstance(hook, str):
            raise HookNameError(f"the hook must be a hook name string, got {hook!r:.100}")
        if isinstance(features, (str, bytes)) or not all(
            isinstance(f, (int, np.integer)) and not isinstance(f, bool) and f >= 0 for f in features
        ):
            raise ConfigError(f"SAE features must be a list of non-negative feature indices, got {features!r:.200}")
        self.hook, self.mode, self.features = hook, mode, [int(f) for f in features]
        self.values = torch.as_tensor(values, dtype=torch.float64).detach().clone().reshape(-1)
        if len(self.features) != self.values.numel() or not self.features:
            raise ShapeError(f"{len(self.features)} features but {self.values.numel()} values; give one value each")
        if not torch.isfinite(self.values).all():
            raise ConfigError("the SAE feature values must be finite")
        self.directions: Tensor | None
        self.sae: Any
        if mode == "add":
            if directions is None or directions.ndim != 2 or directions.shape[0] != len(self.features):
                raise ShapeError("mode 'add' needs one decoder direction per feature: directions of shape [k, d]")
            if directions.shape[1] == 0:
                raise ShapeError("mode 'add' needs decoder directions of a non-zero width")
            self.directions, self.sae = directions.detach().clone(), None
            self.width = int(directions.shape[1])
        else:
            if sae is None:
                raise ConfigError(f"mode {mode!r} needs the SAE itself (to encode the activation)")
            d_sae = getattr(sae.cfg, "d_sae", None)
            if isinstance(d_sae, int) and max(self.features) >= d_sae:
                raise ShapeError(f"feature {max(self.features)} is out of range: the SAE has {d_sae} features")
            self.directions, self.sae = None, sae
            self.width = int(sae.cfg.d_in)

    @property
    def hook_names(self) -> tuple[str, ...]:
        return (self.hook,)

    def widths(self) -> dict[str, int]:
        return {self.hook: self.width}

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        if self.mode == "add":
            assert self.directions is not None
            vector = (self.values.to(self.directions.dtype)[:, None] * self.directions).sum(0)

            def add(activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
                return raw * vector.to(device=activation.device, dtype=activation.dtype)

            return [(self.hook, add)]
        sae, index, values = self.sae, torch.tensor(self.features), self.values

        def clamp(activation: Tensor, hook: HookPoint, raw: float) -> Tensor:
            x = activation.to(dtype=sae.dtype, device=sae.device)
            z = sae.encode(x)
            target = z.clone()
            target[..., index] = values.to(dtype=z.dtype, device=z.device)
            edited = sae.decode(target)
            # encode again: SAEs normalising their input keep the statistics for exactly one decode
            sae.encode(x)
            return raw * (edited - sae.decode(z))

        return [(self.hook, clamp)]

    def tensors(self) -> dict[str, Tensor]:
        out = {"values": self.values}
        if self.directions is not None:
            out["directions"] = self.directions
        else:
            out |= {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        return out

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"hook": self.hook, "mode": self.mode, "features": self.features}
        if self.sae is not None:
            cfg["sae_cfg"] = _json_safe(self.sae.cfg.to_dict())
        return cfg

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> SAEFeatureEdit:
        sae = None
        if config["mode"] != "add":
            sae = _saved_sae(
                config["sae_cfg"], {k.removeprefix("sae."): v for k, v in tensors.items() if k.startswith("sae.")}
            )
        return cls(
            config["hook"],
            config["mode"],
            config["features"],
            tensors["values"],
            directions=tensors.get("directions"),
            sae=sae,
            **common,
        )


def _saved_sae(cfg: Any, state: dict[str, Tensor]) -> Any:
    """The sae-lens SAE of a saved clamp / ablate edit, from its config and state dict.

    Its widths are checked against the saved ``W_enc`` before sae-lens allocates anything (a config
    claiming a huge SAE would otherwise allocate it), and whatever sae-lens refuses in the config or the
    state dict is a :class:`ShapeError` naming it.
    """
    if not isinstance(cfg, dict):
        raise ShapeError(f"the saved SAE config must be an object, got {type(cfg).__name__}")
    w_enc = state.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        raise ShapeError("the saved SAE has no 2-D W_enc tensor ('sae.W_enc')")
    for key, size in (("d_in", w_enc.shape[0]), ("d_sae", w_enc.shape[1])):
        if cfg.get(key) != size or isinstance(cfg.get(key), bool):
            raise ShapeError(
                f"the saved SAE config has {key}={cfg.get(key)!r:.50}, but its W_enc has shape {tuple(w_enc.shape)}"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sae = _sae_class().from_dict({**cfg, "device": "cpu"})
            sae.load_state_dict(state)
            # sae-lens does not check the config's types (e.g. apply_b_dec_to_input: null), so a bad
            # value would only fail inside a hook: encode and decode one zero activation here instead.
            with torch.no_grad():
                z = sae.encode(torch.zeros(1, w_enc.shape[0], dtype=sae.dtype))
                out = sae.decode(z)
            if tuple(z.shape) != (1, w_enc.shape[1]) or tuple(out.shape) != (1, w_enc.shape[0]):
                raise ValueError(f"encode / decode give shapes {tuple(z.shape)} / {tuple(out.shape)}")
    # sae-lens validates the config with its own exceptions; none of them is ours to let through.
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:
        raise ShapeError(f"sae-lens cannot rebuild the saved SAE: {exc!r:.300}") from exc
    return _frozen_copy(sae)


def _check_features(sae: Any, feature: int | Sequence[int]) -> list[int]:
    features = [feature] if isinstance(feature, (int, np.integer)) else list(feature)
    if not features:
        raise ConfigError("no SAE feature given")
    for f in features:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= int(f) < sae.cfg.d_sae:
            raise ConfigError(f"SAE feature index {f!r} is out of range: this SAE has d_sae={sae.cfg.d_sae} features")
    if len(set(features)) != len(features):
        raise ConfigError(f"SAE features repeat: {features}")
    return [int(f) for f in features]


@torch.no_grad()
def feature_reference(
    model: Host, sae: Any, texts: Sequence[str], *, batch_size: int = 16
) -> tuple[Float[Tensor, " d_sae"], float]:
    """(max activation of every feature, median activation norm) over the tokens of ``texts`` at the SAE's
    hook, position 0 excluded (the BOS / attention-sink position, whose norm is an outlier)."""
    hook = check_sae(model, sae)
    if not texts:
        raise ConfigError("reference_texts is empty; give some ordinary text for the feature statistics")
    tokens = model.to_tokens(list(texts), padding_side="right")
    pad = model.tokenizer.pad_token_id if model.tokenizer is not None else None
    max_act = torch.zeros(sae.cfg.d_sae)
    norms: list[Tensor] = []
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size]
        _, cache = model.run_with_cache(batch, names_filter=hook, return_type=None)
        acts = cache[hook][:, 1:]
        keep = torch.ones(acts.shape[:2], dtype=torch.bool) if pad is None else (batch[:, 1:] != pad).cpu()
        flat = acts.reshape(-1, acts.shape[-1])[keep.reshape(-1)]
        codes = sae.encode(flat.to(dtype=sae.dtype, device=sae.device)).float().cpu()
        max_act = torch.maximum(max_act, codes.max(0).values)
        norms.append(flat.float().norm(dim=-1).cpu())
    return max_act, float(torch.cat(norms).median())


def sae_feature(
    sae: Any,
    feature: int | Sequence[int],
    mode: Mode = "add",
    value: float | Sequence[float] = 1.0,
    *,
    scale: Scale = "raw",
    model: Host | None = None,
    reference_texts: Sequence[str] | None = None,
    positions: PositionsLike | None = None,
) -> SAEFeatureEdit:
    """An intervention that adds, clamps or ablates SAE ``feature`` (one index or several) at the SAE's hook.

    Args:
        sae: any sae-lens ``SAE``; it reads ``sae.cfg.metadata.hook_name``.
        mode: ``"add"`` (h + m * value * W_dec[i]), ``"clamp"`` (set the feature to ``value``) or
            ``"ablate"`` (set it to 0; ``value`` is ignored). The change is scaled by m.
        value: the coefficient (add) or the target activation (clamp), one per feature.
        scale: the unit of ``value``: ``"raw"`` (feature activation units), ``"max_act"`` (the feature's
            maximum activation on ``reference_texts``), or ``"norm"`` (add only: ``value`` 1 adds a vector
            whose norm is the median activation norm at the hook on ``reference_texts``).
        model, reference_texts: needed for the scales other than "raw"; with ``model``, the SAE is also
            checked against it (hook, width, LayerNorm folding).

    The strength: the edit's ``unit`` is 1, so ``m = 1`` applies exactly what was asked for (clamp and
    ablate set the feature to its target; add adds ``value`` in the unit of ``scale``) and ``m`` scales
    the change. For add, pick the amount with ``scale``: ``"raw"`` with value 1 adds ``W_dec[i]`` itself,
    whose norm is about 1 for the usual unit-norm decoders, small against the activation (its median norm
    is about 180 at layer 15 of the default model); ``"max_act"`` with value 1 adds the feature at the
    largest activation it reaches on ``reference_texts``, a natural "fully on"; or pass
    ``value = norm / |W_dec[i]|`` to add the norm of a DiffMean vector, as the report and
    :func:`rank_features` do, to compare with DiffMean at equal added norm.
    """
    _sae_class()  # an SAE comes from sae-lens: without it, say what to install
    if mode not in MODES:
        raise ConfigError(f"unknown SAE edit mode {mode!r}; valid modes: {', '.join(MODES)}")
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    hook = sae_hook(sae)
    features = _check_features(sae, feature)
    raw = [0.0] * len(features) if mode == "ablate" else value
    values = torch.as_tensor(raw, dtype=torch.float64).reshape(-1)
    if values.numel() == 1 and len(features) > 1:
        values = values.expand(len(features)).clone()
    if values.numel() != len(features):
        raise ShapeError(f"{len(features)} features but {values.numel()} values; give one value or one per feature")
    if model is not None:
        check_sae(model, sae)
    directions = sae.W_dec.detach()[features].cpu()
    info: dict[str, Any] = {"mode": mode, "scale": scale, "features": features, "value": values.tolist()}
    if scale != "raw" and mode != "ablate":
        if model is None or reference_texts is None:
            raise ConfigError(f"scale={scale!r} needs model= and reference_texts= to measure the feature statistics")
        max_act, median_norm = feature_reference(model, sae, reference_texts)
        if scale == "max_act":
            unit = max_act[features]
        else:
            if mode != "add":
                raise ConfigError("scale='norm' is for mode 'add' (a clamp target is an activation, not a norm)")
            unit = median_norm / directions.double().norm(dim=-1)
        values = values * unit.double()
        info |= {"unit": unit.tolist(), "median_norm": median_norm}
    identity = model_identity(model) if model is not None else None
    if mode == "add":
        return SAEFeatureEdit(
            hook, mode, features, values, directions=directions, positions=positions, info=info, model_identity=identity
        )
    return SAEFeatureEdit(
        hook, mode, features, values, sae=_frozen_copy(sae), positions=positions, info=info, model_identity=identity
    )


def concept_tokens(model: Host, pairs: Sequence[ContrastivePair], n: int = 20) -> tuple[list[int], list[int]]:
    """The ``n`` token ids most over-represented in the positive completions against the negative ones,
    and the ``n`` most over-represented in the negative ones (by count difference; ties by id)."""
    tok = model.tokenizer
    if tok is None:
        raise ConfigError("concept tokens need a model with a tokenizer")
    pos = Counter(t for p in pairs for t in tok(p.positive, add_special_tokens=False).input_ids)
    neg = Counter(t for p in pairs for t in tok(p.negative, add_special_tokens=False).input_ids)
    diff = {t: pos[t] - neg[t] for t in set(pos) | set(neg)}
    ranked = sorted(diff, key=lambda t: (-diff[t], t))
    up = [t for t in ranked if diff[t] > 0][:n]
    down = [t for t in reversed(ranked) if diff[t] < 0][:n]
    if not up or not down:
        raise ConfigError("the positive and negative completions use the same tokens; no concept tokens to score")
    return up, down


@torch.no_grad()
def output_scores(
    model: Host, directions: Float[Tensor, "k d"], up: Sequence[int], down: Sequence[int]
) -> Float[Tensor, " k"]:
    """The logit lens of each direction onto the concept tokens:
    ``mean_{t in up} logit_t - mean_{t in down} logit_t`` with ``logits = ln_final(w) W_U``."""
    w = directions.to(dtype=model.cfg.dtype, device=model.cfg.device)[:, None, :]
    # The unembedding in at least float32: the score is a difference of two means of logits, and a
    # float16 / bfloat16 matmul's rounding of each logit is larger than that difference.
    dtype = torch.promote_types(model.cfg.dtype, torch.float32)
    logits = (model.ln_final(w)[:, 0].to(dtype) @ model.W_U.to(dtype)).float().cpu()
    return logits[:, list(up)].mean(1) - logits[:, list(down)].mean(1)


def rank_features(
    model: Host,
    sae: Any,
    pairs: Sequence[ContrastivePair],
    *,
    n_measure: int = 8,
    eval_pairs: Sequence[ContrastivePair] | None = None,
    norm: float | None = None,
    n_tokens: int = 20,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Input and output scores of every SAE feature for the concept of ``pairs``, and the measured effect
    of steering with the best candidates.

    - Input score: each completion's feature activation averaged over its tokens; ``mean_diff`` (positive
      minus negative) and ``auroc`` (the probability that a positive completion activates the feature more
      than a negative one).
    - Output score (``output``): :func:`output_scores` of W_dec[i] on :func:`concept_tokens`.
    - ``d_pref``: the change in mean PrefOdds on ``eval_pairs`` (default: ``pairs``) when W_dec[i] alone is
      added with norm ``norm`` (default: the norm of the DiffMean vector of ``pairs`` at the same hook, so
      that features and DiffMean are compared at equal added norm); measured for the ``n_measure`` features
      with the highest AUROC and the ``n_measure`` with the highest output score (NaN for the rest).

    Returns one row per feature, sorted by AUROC (highest first).
    """
    _sae_class()  # an SAE comes from sae-lens: without it, say what to install
    hook = check_sae(model, sae)
    items = check_pairs(pairs)
    if not isinstance(n_measure, int) or n_measure < 0:
        raise ConfigError(f"n_measure must be a non-negative integer, got {n_measure!r}")
    n = len(items)
    data = tokenize_completions(
        model, [p.prompt for p in items] * 2, [p.positive for p in items] + [p.negative for p in items]
    )

    def encode_too(acts: Tensor) -> Tensor:
        # At least float32: codes cast back to a float16 / bfloat16 model's dtype would be rounded before
        # they are averaged.
        acts = acts.to(torch.promote_types(acts.dtype, torch.float32))
        codes = sae.encode(acts.to(dtype=sae.dtype, device=sae.device)).to(acts.device, acts.dtype)
        return torch.cat([acts, codes], dim=-1)

    both = completion_activations(model, data, hook, batch_size=batch_size, transform=encode_too)
    resid, codes = both[:, : sae.cfg.d_in], both[:, sae.cfg.d_in :].numpy().astype(np.float64)
    ranks = rankdata(codes, axis=0)
    auroc = (ranks[:n].sum(0) - n * (n + 1) / 2) / (n * n)
    table = pd.DataFrame(
        {
            "feature": np.arange(sae.cfg.d_sae),
            "mean_diff": codes[:n].mean(0) - codes[n:].mean(0),
            "auroc": auroc,
            "frac_active": (codes > 0).mean(0),
        }
    )
    up, down = concept_tokens(model, items, n_tokens)
    directions = sae.W_dec.detach().float().cpu()
    table["output"] = output_scores(model, directions, up, down).numpy()
    added = float((resid[:n] - resid[n:]).mean(0).norm()) if norm is None else float(norm)
    if not np.isfinite(added) or added <= 0:
        raise ConfigError(f"norm must be positive and finite, got {norm!r}")
    table["d_pref"] = np.nan
    candidates = list(
        dict.fromkeys(
            table.nlargest(n_measure, "auroc")["feature"].tolist()
            + table.nlargest(n_measure, "output")["feature"].tolist()
        )
    )
    if candidates:
        evaluation = check_pairs(eval_pairs) if eval_pairs is not None else items
        lp, ln = pair_nll(model, evaluation, batch_size=batch_size)
        clean = float((ln - lp).double().mean())
        for f in candidates:
            iv = sae_feature(sae, f, "add", added / float(directions[f].norm()))
            lp, ln = pair_nll(model, evaluation, interventions=[iv], m=1.0, batch_size=batch_size)
            table.loc[table["feature"] == f, "d_pref"] = float((ln - lp).double().mean()) - clean
    table.attrs |= {"hook": hook, "added_norm": added, "up_tokens": up, "down_tokens": down}
    return table.sort_values("auroc", ascending=False, ignore_index=True)
