"""No state leaks: whatever fails inside a public function, the model comes back as it went in.

Every public entry point that takes a model runs once cleanly (counting its transformer-block calls,
forward and backward), then again with a failure injected at the k-th block call for a spread of k
from the first call to the last. After each injected failure the model must have no hook attached (on
any hook point or module), every parameter and buffer bit-identical, the same ``requires_grad`` flags,
the same train/eval mode and config, no patched ``generate``, and the process no prompt boundary left
declared and gradients still enabled.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import make_bridge, make_model, no_hooks_left
from test_sae_steering import make_sae
from transformer_lens import HookedTransformer

import tl_steer
from tl_steer import ABItem, Condition, ContrastivePair, MCItem
from tl_steer.positions import _BOUNDARY

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
PAIRS = [
    ContrastivePair("The film was", " wonderful and kind", " awful and cold"),
    ContrastivePair("The food was", " fresh and fine", " awful and dirty"),
    ContrastivePair("The staff were", " kind and friendly", " cold and rude"),
    ContrastivePair("The room was", " wide and fine", " cold and dirty"),
]
MC = [
    MCItem("The film was", (" wonderful", " awful", " cold"), 0),
    MCItem("The staff were", (" rude", " kind", " cold"), 1),
]
AB = [
    ABItem("How was it?", "fine", "cold", "A"),
    ABItem("Was the staff kind?", "awful", "kind", "B"),
]
TEXTS = [
    "hello world, the world is wide and the weather is fine today.",
    "I went to the market and bought fresh bread and a cup of tea.",
    "The film was wonderful and the staff were kind and friendly.",
]
TRAIN = dict(epochs=1, batch_size=2, progress=False)


class Injected(RuntimeError):
    """The failure the test injects; nothing in tl_steer may swallow or transform away the state check."""


@dataclass
class BlockCounter:
    """Counts transformer-block calls (forward, and backward through a block's output) and raises
    :class:`Injected` at call number ``fail_at`` (never when it is None)."""

    fail_at: int | None = None
    calls: int = 0
    handles: list[Any] = field(default_factory=list)

    def tick(self) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Injected(f"injected failure at block call {self.calls}")

    def pre(self, module: torch.nn.Module, args: Any) -> None:
        self.tick()

    def post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: self.tick())


@contextmanager
def counting(model: HookedTransformer, fail_at: int | None) -> Iterator[BlockCounter]:
    counter = BlockCounter(fail_at)
    for block in model.blocks:
        counter.handles.append(block.register_forward_pre_hook(counter.pre))
        counter.handles.append(block.register_forward_hook(counter.post))
    try:
        yield counter
    finally:
        for handle in counter.handles:
            handle.remove()


def _module_hooks(model: torch.nn.Module) -> dict[tuple[str, str], tuple[int, ...]]:
    """The ids of the hooks on every module, by (module name, kind)."""
    out = {}
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if handles := getattr(module, kind, None):
                out[name, kind] = tuple(handles)
    return out


@dataclass(frozen=True)
class Snapshot:
    state: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    training: bool
    cfg: dict[str, Any]
    module_hooks: dict[tuple[str, str], tuple[int, ...]]

    @staticmethod
    def of(model: HookedTransformer) -> Snapshot:
        return Snapshot(
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            model.training,
            dict(vars(model.cfg)),
            _module_hooks(model),
        )

    def problems(self, model: HookedTransformer) -> list[str]:
        out = []
        if not no_hooks_left(model):
            out.append("a hook point still has a hook")
        # A bridge keeps module hooks of its own (it wraps Hugging Face modules): what counts is that none were
        # added or removed. A HookedTransformer has none.
        hooks = _module_hooks(model)
        for name, kind in sorted(set(hooks) | set(self.module_hooks)):
            if hooks.get((name, kind)) != self.module_hooks.get((name, kind)):
                out.append(f"module {name or 'model'}: its {kind} changed")
        state = model.state_dict()
        if set(state) != set(self.state):
            out.append(f"state_dict keys changed: {sorted(set(state) ^ set(self.state))}")
        out += [f"{k} changed" for k, v in self.state.items() if k in state and not torch.equal(state[k], v)]
        flags = {k: p.requires_grad for k, p in model.named_parameters()}
        out += [f"{k}.requires_grad changed" for k in self.requires_grad if flags.get(k) != self.requires_grad[k]]
        out += [f"parameter {k}.grad left set" for k, p in model.named_parameters() if p.grad is not None]
        if model.training != self.training:
            out.append("train/eval mode changed")
        cfg = dict(vars(model.cfg))
        out += [f"cfg.{k} changed" for k in self.cfg if str(cfg.get(k)) != str(self.cfg[k])]
        if "generate" in vars(model):
            out.append("model.generate is still patched")
        if _BOUNDARY.get() is not None:
            out.append("a prompt boundary is still declared")
        if not torch.is_grad_enabled():
            out.append("gradients left disabled")
        return out


@pytest.fixture(scope="module", params=["llama", "neox", "bridge"])
def model(request: pytest.FixtureRequest) -> HookedTransformer:
    # Llama style, and NeoX style, whose parallel attention has no resid_mid for module deltas to read; and the
    # Llama style as a TransformerBridge (its hook points and blocks are the bridge's own).
    return make_bridge("llama") if request.param == "bridge" else make_model(request.param)


@pytest.fixture(scope="module")
def parts(model: HookedTransformer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    vector = tl_steer.diffmean(model, PAIRS, HOOK)
    lora, _ = tl_steer.sft(model, PAIRS, 1, "lora", **TRAIN)
    sae = make_sae(model.cfg.d_model, 48, HOOK)
    probe = tl_steer.ManifoldProbe.fit(model, TEXTS, HOOK, k=4, progress=False)
    path = tl_steer.save(vector, tmp_path_factory.mktemp("leaks") / "vector")
    return {"vector": vector, "lora": lora, "sae": sae, "probe": probe, "path": path}


def _generate(model: HookedTransformer, parts: dict[str, Any]) -> Any:
    with tl_steer.steer(model, parts["vector"], m=2.0):
        return model.generate("The film was", max_new_tokens=3, verbose=False, do_sample=False)


def _steer_many(model: HookedTransformer, parts: dict[str, Any]) -> Any:
    with tl_steer.steer(model, parts["vector"], parts["lora"], m=[1.0, 0.5]), tl_steer.steer(model, parts["vector"]):
        return model("The film was wonderful")


CALLS: dict[str, Callable[[HookedTransformer, dict[str, Any]], Any]] = {
    "steer+generate": _generate,
    "steer nested": _steer_many,
    "completion_nll": lambda m, p: tl_steer.completion_nll(m, ["The film was"], [" fine"], interventions=[p["lora"]]),
    "pair_nll": lambda m, p: tl_steer.pair_nll(m, PAIRS, interventions=[p["vector"]], m=2.0, batch_size=3),
    "preference_utility": lambda m, p: tl_steer.preference_utility(m, p["vector"], PAIRS, (-1, 0, 1), progress=False),
    "preference_utility lora": lambda m, p: tl_steer.preference_utility(m, p["lora"], PAIRS, (0, 1), progress=False),
    "diffmean": lambda m, p: tl_steer.diffmean(m, PAIRS, HOOK, batch_size=3),
    "split vector": lambda m, p: tl_steer.split(m, PAIRS, 1, "vector", **TRAIN),
    "split lora": lambda m, p: tl_steer.split(m, PAIRS, 1, "lora", **TRAIN),
    "sft local_weight": lambda m, p: tl_steer.sft(m, PAIRS, 1, "local_weight", **TRAIN),
    "cold_kernel": lambda m, p: tl_steer.cold_kernel(m, PAIRS, HOOK, batch_size=2),
    "cold_fd": lambda m, p: tl_steer.cold_fd(m, PAIRS, HOOK, batch_size=2, fd_method="fd", eps=1e-4),
    "cold_fd jvp": lambda m, p: tl_steer.cold_fd(m, PAIRS, HOOK, fd_method="jvp", batch_size=2),
    "cold_fd apply": lambda m, p: tl_steer.pair_nll(
        m, PAIRS[:2], interventions=[tl_steer.cold_fd(m, PAIRS[:2], HOOK, fd_method="fd", eps=1e-4)], m=1.0
    ),
    "sae_feature max_act": lambda m, p: tl_steer.sae_feature(
        p["sae"], 3, "add", 2.0, scale="max_act", model=m, reference_texts=TEXTS
    ),
    "rank_features": lambda m, p: tl_steer.rank_features(m, p["sae"], PAIRS, n_measure=2, n_tokens=5),
    "mc_accuracy": lambda m, p: tl_steer.mc_accuracy(m, MC, interventions=[p["vector"]], m=2.0),
    "ab_accuracy": lambda m, p: tl_steer.ab_accuracy(m, p["vector"], AB, m=2.0),
    "capability_behavior_gap": lambda m, p: tl_steer.capability_behavior_gap(
        m, [Condition("vec", p["vector"])], PAIRS, MC, ms=(0, 1), progress=False
    ),
    "compare_interventions": lambda m, p: tl_steer.compare_interventions(
        m, {"vec": p["vector"], "lora": p["lora"]}, PAIRS, ms=(0, 1), progress=False
    ),
    "compare_methods": lambda m, p: tl_steer.compare_methods(
        m,
        PAIRS,
        PAIRS,
        1,
        forms=("vector",),
        objectives=("split",),
        train_kwargs=TRAIN,
        ms=(0, 1),
        progress=False,
    ),
    "probe fit": lambda m, p: tl_steer.ManifoldProbe.fit(m, TEXTS, [HOOK, "blocks.0.hook_resid_post"], progress=False),
    "manifold_sweep": lambda m, p: tl_steer.manifold_sweep(
        m, p["vector"], PAIRS[:2], (0, 1), p["probe"], progress=False, batch_size=2
    ),
    "load with model": lambda m, p: tl_steer.pair_nll(m, PAIRS[:1], interventions=[tl_steer.load(p["path"], m)]),
}


def _fail_points(total: int) -> list[int]:
    """1..6, the last three and about ten spread between: every stage without running every call."""
    spread = {round(1 + i * (total - 1) / 11) for i in range(12)}
    return sorted(({*range(1, min(total, 6) + 1), *range(max(1, total - 2), total + 1)} | spread) - {0})


@pytest.mark.parametrize("name", sorted(CALLS))
def test_injected_failures_leave_no_state(model: HookedTransformer, parts: dict[str, Any], name: str) -> None:
    call = CALLS[name]
    before = Snapshot.of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(model, parts)  # warm-up: per-model caches (hook widths) fill on the first call
        # A bridge wires some capture hooks of its own into its Hugging Face modules the first time they are
        # needed, and keeps them: compare module hooks from here on (a call that leaks one leaks it again).
        before = dataclasses.replace(before, module_hooks=_module_hooks(model))
        with counting(model, None) as counter:
            call(model, parts)
    total = counter.calls
    assert total > 0, f"{name} ran no transformer block: the injection cannot reach it"
    assert before.problems(model) == [], f"{name} changed the model even without a failure"
    for k in _fail_points(total):
        with pytest.raises(Injected), counting(model, k), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call(model, parts)
        problems = before.problems(model)
        assert problems == [], f"{name}, failure at block call {k} of {total}: {problems}"


def test_injection_reaches_the_failure_points(model: HookedTransformer, parts: dict[str, Any]) -> None:
    # The harness itself: a failure at call k is raised at call k (so the sweep tests what it claims),
    # and a deliberately leaky function is caught by the snapshot.
    with pytest.raises(Injected, match="call 3"), counting(model, 3):
        tl_steer.pair_nll(model, PAIRS)
    before = Snapshot.of(model)
    model.hook_dict["blocks.0.hook_resid_pre"].add_hook(lambda x, hook: x)
    name, param = next(iter(model.named_parameters()))
    param.requires_grad_(False)
    try:
        problems = before.problems(model)
    finally:
        model.reset_hooks()
        param.requires_grad_(True)
    assert "a hook point still has a hook" in problems
    assert f"{name}.requires_grad changed" in problems
    assert before.problems(model) == []


def test_bad_input_leaves_no_state(model: HookedTransformer, parts: dict[str, Any]) -> None:
    # Errors raised by validation: nothing may be half-applied either.
    before = Snapshot.of(model)
    bad = [
        lambda: tl_steer.preference_utility(model, parts["vector"], PAIRS, ms=[0, float("nan")], progress=False),
        lambda: tl_steer.diffmean(model, PAIRS, "blocks.9.hook_resid_post"),
        lambda: tl_steer.split(model, PAIRS, 1, "vector", epochs=0, progress=False),
        lambda: tl_steer.pair_nll(model, PAIRS, interventions=[parts["vector"]], batch_size=0),
        lambda: tl_steer.cold_fd(model, PAIRS, HOOK, fd_method="fd", eps=0.0),
        lambda: tl_steer.mc_accuracy(model, MC, interventions=[parts["vector"], "oops"]),  # type: ignore[list-item]
    ]
    for i, call in enumerate(bad):
        with pytest.raises(tl_steer.TlSteerError):
            call()
        assert before.problems(model) == [], f"bad input {i}"
