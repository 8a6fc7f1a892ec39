"""Conditional steering (CAST-like): apply any intervention only at the tokens (or in the prompts) where a
linear condition probe fires on the activation before the edit (``docs/methods.md``, section "Adaptive
steering")."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_steer.data.pairs import ContrastivePair
from tl_steer.errors import ConfigError, FileFormatError, HookNameError, ShapeError, TlSteerError
from tl_steer.hookpoints import HookSite
from tl_steer.hosts import Host
from tl_steer.interventions import EditEntry, Intervention, ReadOnly, registry
from tl_steer.judges.probe import fit_logistic
from tl_steer.methods.adaptive._fit import (
    ConceptActivations,
    check_direction,
    check_hook_name,
    check_level,
    check_scalar,
    resolve_activations,
)
from tl_steer.positions import PositionPolicy, PositionState, steer_mask

FiresOn = Literal["positive", "negative"]
Per = Literal["token", "prompt"]
PERS: tuple[str, ...] = ("token", "prompt")
_INNER = "inner."


@dataclass
class ConditionProbe:
    """A linear condition probe on the raw activation at ``hook``: it fires where sigmoid(w . h + b) > tau.

    ``fires_on``: the completions it was trained to fire on ("positive": the concept's, "negative": their
    opposites); ``rate_positive`` / ``rate_negative``: the share of the training pairs' positive / negative
    completion tokens where it fires (clean model).
    """

    hook: str
    weight: Float[Tensor, " d"]
    bias: float
    tau: float
    fires_on: FiresOn
    rate_positive: float
    rate_negative: float
    identity: dict[str, Any]

    def fires(self, h: Float[Tensor, "... d"]) -> Tensor:
        """A boolean per row of ``h``: sigmoid(w . h + b) > tau."""
        return probe_fires(h, self.weight, self.bias, self.tau)


def probe_fires(h: Tensor, weight: Tensor, bias: float, tau: float) -> Tensor:
    """sigmoid(w . h + b) > tau per row of h, computed in float64."""
    logits = h.to(torch.float64) @ weight.to(device=h.device, dtype=torch.float64) + bias
    return torch.sigmoid(logits) > tau


def condition_probe(
    model: Host,
    pairs: Sequence[ContrastivePair] | None,
    hook: str,
    *,
    fires_on: FiresOn = "positive",
    tau: float = 0.5,
    l2: float = 1e-2,
    min_rate: float = 0.01,
    activations: ConceptActivations | None = None,
    chat: bool = False,
    batch_size: int = 16,
) -> ConditionProbe:
    """Fit a :class:`ConditionProbe` at ``hook``: an L2-regularised logistic regression (the concept judge's
    :func:`~tl_steer.judges.probe.fit_logistic`, on standardised features) separating the clean completion
    tokens of the positive from those of the negative completions of ``pairs``, labelled 1 on the side
    ``fires_on``. The standardisation is folded into (w, b), so the probe reads the raw activation.

    Warns, with the firing rates, when the probe fires on less than ``min_rate`` of the tokens of the
    completions it was trained to fire on: a condition that never fires leaves the model clean.
    """
    check_hook_name(hook)
    if fires_on not in ("positive", "negative"):
        raise ConfigError(f"fires_on must be 'positive' or 'negative', got {fires_on!r}")
    tau = check_level(tau, "tau")
    if not l2 > 0:
        raise ConfigError(f"l2 must be > 0, got {l2!r}")
    acts = resolve_activations(model, pairs, hook, activations, chat, batch_size)
    x = torch.cat([acts.positive, acts.negative])
    y = torch.cat([torch.ones(len(acts.positive)), torch.zeros(len(acts.negative))]).double()
    if fires_on == "negative":
        y = 1.0 - y
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-8)
    w, b = fit_logistic((x - mean) / scale, y, l2)
    weight = w / scale
    bias = float(b - (mean / scale) @ w)
    rate_pos = float(probe_fires(acts.positive, weight, bias, tau).double().mean())
    rate_neg = float(probe_fires(acts.negative, weight, bias, tau).double().mean())
    own = rate_pos if fires_on == "positive" else rate_neg
    if own < min_rate:
        warnings.warn(
            f"the condition probe at {hook!r} fires on only {own:.1%} of the tokens of the {fires_on} training "
            f"completions it should fire on ({rate_pos:.1%} of positive, {rate_neg:.1%} of negative tokens): "
            "steering conditioned on it will barely act. Lower tau or fit it at another hook.",
            UserWarning,
            stacklevel=2,
        )
    return ConditionProbe(hook, weight.to(torch.float32), bias, tau, fires_on, rate_pos, rate_neg, acts.identity)


class Conditional(Intervention):
    """``inner``'s change, applied only at the tokens (``per="token"``) or in the prompts (``per="prompt"``)
    where the condition probe fires.

    ``per="token"``: at each token the gate g = [sigmoid(w . h + b) > tau] is computed on the activation at
    ``hook`` before any edit of this intervention, and every change of ``inner`` at that token is multiplied
    by g. ``per="prompt"``: one gate per batch row, g = [mean_p sigmoid(w . h_p + b) > tau], the mean over
    the row's prompt positions p < P (padding skipped), decided on the pass that starts at position 0 and
    kept for the KV-cache steps that follow it; a steered row gets ``inner``'s change at every position the
    position policy selects. P is the declared prompt boundary (``steer``'s generate wrapper declares it),
    else the whole input of that pass.

    ``hook`` must be one of ``inner``'s hooks in the first block it edits, or a hook of an earlier block
    (for ``per="prompt"``, not a hook before block 0's attention). The strength, unit (``inner``'s by
    default) and position policy are this intervention's; linear in m when ``inner`` is. Build it with
    :func:`conditional`.
    """

    kind = "conditional"

    def __init__(
        self,
        inner: Intervention,
        hook: str,
        weight: Float[Tensor, " d"],
        bias: float,
        tau: float = 0.5,
        per: Per = "token",
        **common: Any,
    ) -> None:
        if per not in PERS:
            raise ConfigError(f"per must be 'token' or 'prompt', got {per!r}")
        if not isinstance(inner, Intervention):
            raise ConfigError(f"Conditional wraps an Intervention, got {type(inner).__name__}")
        if isinstance(inner, Conditional):
            raise ConfigError("Conditional cannot wrap another Conditional; fit one probe for both conditions")
        common.setdefault("positions", inner.positions)
        common.setdefault("model_identity", inner.model_identity)
        common.setdefault("unit", inner.unit)
        common.setdefault("method", f"conditional {inner.method}")
        super().__init__(**common)
        self.inner = inner
        self.hook = check_hook_name(hook)
        _check_order(self.hook, inner.hook_names)
        self.weight = check_direction(weight, "the condition probe's weight")
        self.bias = check_scalar(bias, "the condition probe's bias")
        self.tau = check_level(tau, "tau")
        self.per: Per = per
        if per == "prompt" and self._scores_hook() is None:
            raise HookNameError(
                f"a per-prompt condition cannot read {self.hook!r}: it fires before any attention layer, where "
                "the padding and the KV-cache offset are unknown. Fit the probe at 'blocks.0.hook_resid_post' "
                "or later."
            )
        self.linear_in_m = inner.linear_in_m  # type: ignore[misc]

    @property
    def hook_names(self) -> tuple[str, ...]:
        names = self.inner.hook_names
        return names if self.hook in names else (self.hook, *names)

    def gate(self, h: Float[Tensor, "... d"]) -> Tensor:
        """The gate g per row of ``h`` (activations at :attr:`hook`), as a boolean tensor."""
        return probe_fires(h, self.weight, self.bias, self.tau)

    def _scores_hook(self) -> str | None:
        """The attention-scores hook that fires before :attr:`hook` in every pass (offset and padding)."""
        site = HookSite.parse(self.hook)
        return site.offset_source((site.layer or 0) + 1)

    def prompt_gate(self, h: Float[Tensor, "batch pos d"], use: Bool[Tensor, "batch pos"]) -> Bool[Tensor, " batch"]:
        """The per-prompt gate per batch row: mean of sigmoid(w . h + b) over the positions where ``use``
        is true, > tau (float64; a row without such positions is not steered)."""
        scores = torch.sigmoid(h.to(torch.float64) @ self.weight.to(device=h.device, dtype=torch.float64) + self.bias)
        weights = use.to(torch.float64)
        mean = (scores * weights).sum(-1) / weights.sum(-1)
        return mean > self.tau  # NaN (no prompt position) compares False

    def _edits(self, model: Host | None) -> list[tuple[str, EditEntry]]:
        if model is None and self.inner.needs_model:
            raise ConfigError(f"the wrapped {type(self.inner).__name__} needs the model: call .hooks(m, model=model)")
        recorded: dict[str, Tensor] = {}
        state = PositionState()

        def read_scores(scores: Tensor, hook: HookPoint) -> None:
            state.record_offset(scores, hook)
            # A real key is attended by at least its own query; a padding key is masked (-inf) for every query.
            recorded["keys"] = torch.isfinite(scores[:, 0]).any(dim=-2)

        def read(activation: Tensor, hook: HookPoint) -> None:
            if self.per == "token":
                recorded["gate"] = self.gate(activation)
                return
            batch, q_len = activation.shape[0], activation.shape[1]
            keys = recorded.pop("keys", None)
            if (state.offset or 0) == 0:
                prompt = steer_mask(PositionPolicy("prompt"), state, batch, q_len, activation.device)
                use = torch.ones(batch, q_len, dtype=torch.bool, device=activation.device)
                if prompt is not None:
                    use = use & prompt
                if keys is not None:
                    use = use & keys[:, :q_len].to(activation.device)
                recorded["decision"] = self.prompt_gate(activation, use)
            else:
                state.take_offset()
                if "decision" not in recorded:
                    raise TlSteerError(
                        "a per-prompt Conditional saw a KV-cache step without the prompt pass it continues; "
                        "build its hooks before the prompt pass (e.g. with tl_steer.steer around generate)"
                    )
            decision = recorded["decision"]
            if decision.shape[0] != batch:
                raise ShapeError(
                    f"the per-prompt condition was decided for {decision.shape[0]} rows but this pass has {batch}"
                )
            recorded["gate"] = decision[:, None].expand(batch, q_len)

        out: list[tuple[str, EditEntry]] = []
        if self.per == "prompt":
            scores_hook = self._scores_hook()
            assert scores_hook is not None  # refused in __init__
            out.append((scores_hook, ReadOnly(read_scores)))
        out.append((self.hook, ReadOnly(read)))
        for name, entry in self.inner._edits(model):
            if isinstance(entry, ReadOnly):
                out.append((name, entry))
                continue

            def gated(activation: Tensor, hook: HookPoint, raw: float, _edit: Any = entry) -> Tensor:
                delta = _edit(activation, hook, raw)
                g = recorded["gate"]
                if tuple(g.shape) != tuple(activation.shape[: g.ndim]):
                    raise ShapeError(
                        f"the condition gate has shape {tuple(g.shape)} but the activation at {hook.name!r} "
                        f"{tuple(activation.shape)}"
                    )
                g = g.view(*g.shape, *([1] * (activation.ndim - g.ndim)))
                return delta * g.to(delta.dtype)

            out.append((name, gated))
        return out

    def widths(self) -> dict[str, int]:
        return {**self.inner.widths(), self.hook: int(self.weight.shape[0])}

    def check(self, model: Host) -> None:
        super().check(model)
        self.inner.check(model)

    def tensors(self) -> dict[str, Tensor]:
        out = {"weight": self.weight}
        for name, t in self.inner.tensors().items():
            # Index tensors travel as float64 (exact below 2^53): a Conditional file holds floats only.
            out[_INNER + name] = t.to(torch.float64) if name in self.inner.saved_index_tensors else t
        return out

    def config(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "bias": self.bias,
            "tau": self.tau,
            "per": self.per,
            "inner_kind": self.inner.kind,
            "inner_config": self.inner.config(),
            "inner_method": self.inner.method,
            "inner_info": self.inner.info,
            "inner_unit": self.inner.unit,
        }

    @classmethod
    def from_saved(cls, config: dict[str, Any], tensors: dict[str, Tensor], common: dict[str, Any]) -> Conditional:
        kind = config["inner_kind"]
        inner_cls = registry().get(kind) if isinstance(kind, str) else None
        if inner_cls is None or inner_cls is Conditional:
            raise FileFormatError(f"unknown wrapped intervention kind {kind!r:.100}")
        for key, kinds in (("inner_config", dict), ("inner_info", dict), ("inner_method", str)):
            if not isinstance(config[key], kinds):
                raise FileFormatError(f"{key!r} must be a {kinds.__name__}, got {type(config[key]).__name__}")
        inner_tensors = {}
        for name, t in tensors.items():
            if name.startswith(_INNER):
                key = name[len(_INNER) :]
                inner_tensors[key] = t.long() if key in inner_cls.saved_index_tensors else t
        inner_common = {
            "positions": common.get("positions"),
            "method": config["inner_method"],
            "info": config["inner_info"],
            "model_identity": common.get("model_identity"),
        }
        inner = inner_cls.from_saved(config["inner_config"], inner_tensors, inner_common)
        inner.unit = config["inner_unit"]
        per = config.get("per", "token")  # files written before the per-prompt mode gate per token
        if per not in PERS:
            raise FileFormatError(f"'per' must be 'token' or 'prompt', got {per!r:.100}")
        return cls(inner, config["hook"], tensors["weight"], config["bias"], config["tau"], per, **common)


def _check_order(hook: str, inner_hooks: tuple[str, ...]) -> None:
    """The gate must be known before the first edit: ``hook`` is an inner hook of the first edited block,
    or in an earlier block."""
    site = HookSite.parse(hook)
    layers = [HookSite.parse(h).layer for h in inner_hooks]
    if site.layer is None or any(layer is None for layer in layers):
        raise HookNameError(f"the condition hook {hook!r} and the steered hooks must be inside blocks ('blocks.N....')")
    first = min(layer for layer in layers if layer is not None)
    if site.layer > first or (site.layer == first and hook not in inner_hooks):
        raise HookNameError(
            f"the condition probe reads {hook!r}, which does not run before the edits at {list(inner_hooks)}; "
            f"fit it at one of the steered hooks or in a block before {first}"
        )


def conditional(
    inner: Intervention, probe: ConditionProbe, *, tau: float | None = None, per: Per = "token"
) -> Conditional:
    """``inner`` gated by ``probe`` (see :class:`Conditional`) per token or per prompt (``per``); ``tau``
    overrides the probe's threshold. The probe must come from the same model as ``inner`` (when both record
    it). ``info`` records the probe's firing rates (per token) and the mode."""
    if not isinstance(probe, ConditionProbe):
        raise ConfigError(f"probe must be a ConditionProbe (from condition_probe), got {type(probe).__name__}")
    if inner.model_identity is not None and probe.identity:
        _same_model(inner.model_identity, probe.identity)
    iv = Conditional(inner, probe.hook, probe.weight, probe.bias, probe.tau if tau is None else tau, per)
    iv.info = {
        "inner": inner.method,
        "fires_on": probe.fires_on,
        "tau": iv.tau,
        "per": per,
        "rate_positive": probe.rate_positive,
        "rate_negative": probe.rate_negative,
        **{f"inner_{k}": v for k, v in inner.info.items() if isinstance(v, (int, float, str, bool))},
    }
    return iv


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Raise unless two :func:`~tl_steer.models.model_identity` records name the same weights (by shape,
    embedding checksum and weight processing, not by name: the same weights are named differently on a
    HookedTransformer and a TransformerBridge)."""
    from tl_steer.errors import ModelMismatchError

    for key in ("d_model", "n_layers", "d_vocab", "processed_weights"):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            raise ModelMismatchError(
                f"the condition probe was fitted on a model with {key}={b[key]!r}, the intervention made for {a[key]!r}"
            )
    x, y = a.get("embed_checksum"), b.get("embed_checksum")
    if x is not None and y is not None and not math.isclose(x, y, rel_tol=1e-3):
        raise ModelMismatchError(
            f"the condition probe was fitted on model {b.get('model_name')!r} and the intervention made for "
            f"{a.get('model_name')!r}: their embedding checksums differ ({y:.6g} vs {x:.6g}), so their weights do"
        )


__all__ = ["ConditionProbe", "Conditional", "condition_probe", "conditional"]
