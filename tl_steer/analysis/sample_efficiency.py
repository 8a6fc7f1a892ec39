"""Sample efficiency: how steering quality grows with the number of examples N, per method.

For each seed, a seeded permutation of the training examples gives nested example sets (the first N for
each N). The examples are either the behavior's A/B train items turned into contrastive pairs (prompt =
the formatted item, positive = the matching letter, negative = the other letter; CAA-style,
``train_on="ab"``) or the behavior's contrastive train pairs with open-ended completions
(``train_on="pairs"``). Each method builds an intervention from them
(COLD-Kernel and COLD-FD compute all N from one pass over the examples, since their statistics are
running means), which is evaluated on the test splits:

- ``ab_accuracy``: share of A/B test items whose matching letter is the more probable answer;
- ``ab_margin``: mean ``logit(matching) - logit(other)`` over those items (with A/B balanced, a constant
  preference for one letter cancels out, so this moves even when the accuracy is pinned at 0.5);
- ``pref_odds``: mean ``L_n - L_p`` (completion NLL of the negative minus the positive completion) on the
  behavior's contrastive test pairs (:func:`tl_steer.load_pairs`): does the steering carry over from the
  A/B format to open-ended completions?

One row per (method, N, seed), plus one row ``method="none"``, ``N=0`` for the unsteered model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from tl_steer.analysis.ab import ab_scores
from tl_steer.config import resolve
from tl_steer.data.ab import ABItem, ab_to_pairs, check_ab_items, load_ab_items
from tl_steer.data.pairs import ContrastivePair, check_pairs, load_pairs
from tl_steer.errors import ConfigError
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector, Intervention
from tl_steer.methods.cold import cold_fd_prefixes, cold_kernel_prefixes
from tl_steer.methods.diffmean import diffmean
from tl_steer.positions import PositionsLike
from tl_steer.scoring import pad_right, pad_token_id, pair_nll, tokenize_completions

METHODS = ("diffmean", "cold_kernel", "cold_fd")
COLUMNS = ["method", "N", "seed", "m", "ab_accuracy", "ab_margin", "pref_odds"]


def _per_method(value: float | Mapping[str, float], methods: Sequence[str], name: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        missing = [m for m in methods if m not in value]
        if missing:
            raise ConfigError(f"{name} gives no value for {missing}")
        return {m: float(value[m]) for m in methods}
    return {m: float(value) for m in methods}


def evaluate(
    model: Host,
    intervention: Intervention | None,
    items: Sequence[ABItem],
    pairs: Sequence[ContrastivePair],
    *,
    m: float = 1.0,
    batch_size: int = 16,
) -> dict[str, float]:
    """A/B accuracy and margin on ``items`` and PrefOdds on ``pairs`` (``None``: the clean model)."""
    scores = ab_scores(model, intervention, items, m=m, batch_size=batch_size)
    ivs = [intervention] if intervention is not None else []
    lp, ln = pair_nll(model, pairs, interventions=ivs, m=m, batch_size=batch_size)
    return {
        "ab_accuracy": float((scores > 0).float().mean()),
        "ab_margin": float(scores.mean()),
        "pref_odds": float((ln - lp).double().mean()),
    }


def reference_batch(model: Host, pairs: Sequence[ContrastivePair]) -> tuple[Tensor, list[int]]:
    """Right-padded token ids of ``prompt + positive`` of each pair, and their lengths: the inputs on which
    :func:`added_norm` measures an input-dependent intervention."""
    items = check_pairs(pairs)
    data = tokenize_completions(model, [p.prompt for p in items], [p.positive for p in items])
    tokens = pad_right(data.sequences, pad_token_id(model), model.cfg.device or "cpu")
    return tokens, [len(s) for s in data.sequences]


def added_norm(
    model: Host, intervention: Intervention, tokens: Int[Tensor, "batch pos"], lengths: Sequence[int]
) -> float:
    """The norm an intervention adds per position at m = 1: the vector's norm for an AddVector; otherwise
    the mean norm of the change at its (single) hook over the real positions of ``tokens`` except the
    first one (the attention sink, whose activation is one to two orders of magnitude larger)."""
    if isinstance(intervention, AddVector):
        return float(intervention.vector.norm()) * intervention.unit
    (name,) = intervention.hook_names
    seen: list[Tensor] = []

    def grab(act: Tensor, hook: HookPoint) -> None:
        seen.append(act.detach())

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, grab)], return_type=None)
        model.run_with_hooks(tokens, fwd_hooks=[*intervention.hooks(1.0, model=model), (name, grab)], return_type=None)
    delta = seen[1] - seen[0]
    rows = [delta[i, 1:n] for i, n in enumerate(lengths)]
    return float(torch.cat(rows).norm(dim=-1).mean())


def build_interventions(
    model: Host,
    method: str,
    examples: Sequence[ContrastivePair],
    hook: str,
    ns: Sequence[int],
    *,
    eta: float = 1.0,
    fd_method: str = "fd",
    eps: float = 1e-3,
    positions: PositionsLike = "all",
    batch_size: int = 8,
) -> Iterator[tuple[int, Intervention]]:
    """``(N, intervention)`` from the first N examples, for each N in ``ns`` (increasing), lazily."""
    if method == "diffmean":
        for n in sorted(set(ns)):
            yield n, diffmean(model, examples[:n], hook, positions=positions, batch_size=batch_size)
    elif method == "cold_kernel":
        yield from cold_kernel_prefixes(model, examples, hook, ns, eta=eta, positions=positions, batch_size=batch_size)
    elif method == "cold_fd":
        yield from cold_fd_prefixes(
            model,
            examples,
            hook,
            ns,
            eta=eta,
            fd_method=fd_method,  # type: ignore[arg-type]
            eps=eps if fd_method == "fd" else None,  # the JVP has no step
            positions=positions,
            batch_size=batch_size,
        )
    else:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


@dataclass(frozen=True)
class SampleEfficiencyConfig:
    """The settings of :func:`sample_efficiency` as one object (each described there)."""

    ns: Sequence[int] = (1, 2, 5, 10, 20, 50)
    seeds: Sequence[int] = (0, 1, 2)
    hook: str = "blocks.15.hook_resid_post"
    methods: Sequence[str] = METHODS
    m: float | Mapping[str, float] = 1.0
    norm: float | None = None
    eta: float | Mapping[str, float] = 1.0
    fd_method: str = "fd"
    eps: float = 1e-3
    positions: PositionsLike = "all"
    concept: str | None = None
    train_items: Sequence[ABItem] | None = None
    test_items: Sequence[ABItem] | None = None
    test_pairs: Sequence[ContrastivePair] | None = None
    n_test_items: int | None = None
    n_test_pairs: int | None = None
    train_on: str = "ab"
    train_pairs: Sequence[ContrastivePair] | None = None
    baseline: bool = True
    batch_size: int = 8


def sample_efficiency(
    model: Host,
    behavior: str,
    *,
    ns: Sequence[int] = (1, 2, 5, 10, 20, 50),
    seeds: Sequence[int] = (0, 1, 2),
    hook: str = "blocks.15.hook_resid_post",
    methods: Sequence[str] = METHODS,
    m: float | Mapping[str, float] = 1.0,
    norm: float | None = None,
    eta: float | Mapping[str, float] = 1.0,
    fd_method: str = "fd",
    eps: float = 1e-3,
    positions: PositionsLike = "all",
    concept: str | None = None,
    train_items: Sequence[ABItem] | None = None,
    test_items: Sequence[ABItem] | None = None,
    test_pairs: Sequence[ContrastivePair] | None = None,
    n_test_items: int | None = None,
    n_test_pairs: int | None = None,
    train_on: str = "ab",
    train_pairs: Sequence[ContrastivePair] | None = None,
    baseline: bool = True,
    batch_size: int = 8,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    config: SampleEfficiencyConfig | None = None,
) -> pd.DataFrame:
    """A/B accuracy, A/B margin and PrefOdds on the test splits against the number of examples N.

    Args:
        model: the model to steer.
        behavior: a built-in A/B behavior (:func:`tl_steer.data.ab.ab_behaviors`); its A/B train
            split gives the examples, its A/B test split and the contrastive test pairs of ``concept``
            (default: the same name) the evaluation. ``train_items``, ``test_items``, ``test_pairs``
            replace the built-in data.
        ns: the numbers of examples; for each seed the sets are nested (first N of one permutation).
        seeds: seeds of the permutations.
        hook: where every method steers.
        methods: among "diffmean", "cold_kernel", "cold_fd".
        m: the strength, one for all methods or one per method (their natural scales differ by orders
            of magnitude). Ignored when ``norm`` is given.
        norm: compare at equal added norm: each intervention gets ``m = norm / added_norm(...)``, measured
            at m = 1 on the first 4 training examples (:func:`added_norm`), so that every method adds
            about ``norm`` per position whatever N; the m used is in the table.
        eta: COLD's step size, one or per method (it only multiplies m).
        fd_method, eps: COLD-FD's "fd" (finite difference, step eps) or "jvp" (exact). The default, "fd"
            with eps = 1e-3, is within 1% of the JVP on the default model in float32 (0.2% .. 0.7% off in
            the steered logits' change) at a third of its cost; the published eps = 1e-6 is not (>100%).
        positions: the position policy of every intervention.
        n_test_items, n_test_pairs: evaluate on the first this many test items / pairs only.
        train_on: "ab" (examples from the A/B train items, CAA-style) or "pairs" (the contrastive train
            pairs of ``concept``, or ``train_pairs``).
        baseline: add a row for the unsteered model (method "none", N = 0).
        on_row: called with each row as soon as it is computed (e.g. to print progress).
        config: the settings ns .. batch_size as one :class:`SampleEfficiencyConfig` (the keywords must
            then keep their defaults).

    Returns:
        a DataFrame with columns method, N, seed, m, ab_accuracy, ab_margin, pref_odds.
    """
    cfg = resolve(
        config,
        SampleEfficiencyConfig(
            ns=ns,
            seeds=seeds,
            hook=hook,
            methods=methods,
            m=m,
            norm=norm,
            eta=eta,
            fd_method=fd_method,
            eps=eps,
            positions=positions,
            concept=concept,
            train_items=train_items,
            test_items=test_items,
            test_pairs=test_pairs,
            n_test_items=n_test_items,
            n_test_pairs=n_test_pairs,
            train_on=train_on,
            train_pairs=train_pairs,
            baseline=baseline,
            batch_size=batch_size,
        ),
    )
    # One object in, plain names below: the body reads the resolved settings only.
    ns, seeds, hook, m, norm, eta = cfg.ns, cfg.seeds, cfg.hook, cfg.m, cfg.norm, cfg.eta
    fd_method, eps, positions, concept, train_on = cfg.fd_method, cfg.eps, cfg.positions, cfg.concept, cfg.train_on
    train_items, test_items, test_pairs, train_pairs = cfg.train_items, cfg.test_items, cfg.test_pairs, cfg.train_pairs
    n_test_items, n_test_pairs, baseline, batch_size = cfg.n_test_items, cfg.n_test_pairs, cfg.baseline, cfg.batch_size
    methods = list(cfg.methods)
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    strengths = _per_method(m, methods, "m")
    etas = _per_method(eta, methods, "eta")
    if train_on == "ab":
        train: list[ContrastivePair] = ab_to_pairs(
            train_items if train_items is not None else load_ab_items(behavior, "train")
        )
    elif train_on == "pairs":
        train = check_pairs(train_pairs if train_pairs is not None else load_pairs(concept or behavior, "train"))
    else:
        raise ConfigError(f"train_on must be 'ab' or 'pairs', got {train_on!r}")
    test = check_ab_items(test_items if test_items is not None else load_ab_items(behavior, "test"))
    pairs = check_pairs(test_pairs if test_pairs is not None else load_pairs(concept or behavior, "test"))
    test = test[:n_test_items] if n_test_items else test
    pairs = pairs[:n_test_pairs] if n_test_pairs else pairs
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ConfigError(f"ns must hold positive numbers of examples, got {ns}")
    if ns[-1] > len(train):
        raise ConfigError(f"N = {ns[-1]} needs more examples than the {len(train)} training examples")
    if norm is not None and not (np.isfinite(norm) and norm > 0):
        raise ConfigError(f"norm must be a positive number, got {norm}")
    reference = reference_batch(model, train[:4]) if norm is not None else None
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    if baseline:
        add({"method": "none", "N": 0, "seed": 0, "m": 0.0, **evaluate(model, None, test, pairs)})
    total = len(seeds) * len(methods) * len(ns)
    bar = tqdm(total=total, desc="sample efficiency", disable=not progress)
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(train))
        examples = [train[i] for i in order[: ns[-1]]]
        for method in methods:
            built = build_interventions(
                model,
                method,
                examples,
                hook,
                ns,
                eta=etas[method],
                fd_method=fd_method,
                eps=eps,
                positions=positions,
                batch_size=batch_size,
            )
            for n, iv in built:
                strength = strengths[method]
                if norm is not None and reference is not None:
                    strength = norm / added_norm(model, iv, *reference)
                scores = evaluate(model, iv, test, pairs, m=strength)
                add({"method": method, "N": n, "seed": int(seed), "m": strength, **scores})
                bar.update(1)
                del iv
    bar.close()
    return pd.DataFrame(rows, columns=COLUMNS)


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds, per method and N."""
    metrics = ["ab_accuracy", "ab_margin", "pref_odds"]
    grouped = table.groupby(["method", "N"], sort=False)[metrics]
    out = grouped.agg(["mean", "std"])
    out.columns = [f"{a}_{b}" for a, b in out.columns]
    out["n_seeds"] = grouped.size()
    return out.reset_index()


def plot_sample_efficiency(table: pd.DataFrame, path: str | None = None, *, title: str = "", subtitle: str = "") -> Any:
    """A/B accuracy and PrefOdds against N (log axis), one line per method (mean over seeds, with the
    seed range shaded), the unsteered model as a dashed line. Writes a PNG to ``path`` if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    base = table[table["method"] == "none"]
    metrics = [
        ("ab_accuracy", "A/B accuracy (test)"),
        ("ab_margin", "A/B margin: logit(match) - logit(other)"),
        ("pref_odds", "PrefOdds: mean(L_n - L_p) (test pairs)"),
    ]
    for ax, (metric, label) in zip(axes, metrics, strict=True):
        for method, group in table[table["method"] != "none"].groupby("method", sort=False):
            stats = group.groupby("N")[metric].agg(["mean", "min", "max"])
            ax.plot(stats.index, stats["mean"], marker="o", label=str(method))
            ax.fill_between(stats.index, stats["min"], stats["max"], alpha=0.15)
        if len(base):
            ax.axhline(float(base[metric].mean()), color="gray", linestyle="--", label="no steering")
        ax.set_xscale("log")
        steered = sorted(int(n) for n in table.loc[table["method"] != "none", "N"].unique())
        ax.set_xticks(steered, [str(n) for n in steered])
        ax.minorticks_off()
        ax.set_xlabel("number of examples N")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    if subtitle:
        fig.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


__all__ = [
    "SampleEfficiencyConfig",
    "added_norm",
    "build_interventions",
    "evaluate",
    "plot_sample_efficiency",
    "reference_batch",
    "sample_efficiency",
    "summarize",
]
