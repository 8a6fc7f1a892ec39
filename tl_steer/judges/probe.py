"""The concept judge: a linear probe on the clean model's activations of the text, with its validity measured.

A text's feature is the clean residual stream at a mid layer, averaged over its completion tokens (the
prompt is read but not pooled). An L2-regularised logistic regression on standardised features separates
the positive (label 1) from the negative (label 0) completions of the concept's training pairs; its AUROC
on the completions of held-out pairs is measured at fit time and travels with the judge, and a judge under
0.8 is flagged unreliable (``reliable``). Applied to generated text it gives P(concept | text). Steered
text can lie outside what the probe saw: its validity there is not guaranteed (compare with an LLM judge).
See ``docs/methods.md``, section "Judging generated text".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from scipy import stats
from torch import Tensor

from tl_steer.activations import completion_activations
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.errors import ConfigError, DataError
from tl_steer.hookpoints import validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import check_identity
from tl_steer.judges.base import Judge, check_clean, check_texts, nonempty
from tl_steer.models import model_identity
from tl_steer.scoring import tokenize_completions

#: a probe judge whose held-out AUROC is below this is flagged unreliable
RELIABLE_AUROC = 0.8


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of a random positive > score of a random negative), ties counting
    a half, computed from ranks (the Mann-Whitney U statistic / (n_pos n_neg))."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("AUROC needs at least one positive and one negative example")
    ranks = stats.rankdata(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def fit_logistic(
    x: Float[Tensor, "n d"], y: Float[Tensor, " n"], l2: float, max_iter: int = 200
) -> tuple[Float[Tensor, " d"], float]:
    """(w, b) minimising mean binary cross-entropy + l2/2 |w|^2 (float64, L-BFGS with a strong Wolfe search)."""
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


class ProbeJudge(Judge):
    """P(concept | text) from a logistic probe on the clean model's mean-pooled activations at ``hook``.

    Build it with :meth:`fit`. Attributes: ``concept``, ``hook``, ``auroc`` (held-out), ``n_train``,
    ``n_test``, ``model_identity`` (the model it was fitted on; any other model is refused).
    """

    metrics = ("concept",)

    def __init__(
        self,
        *,
        concept: str,
        hook: str,
        weight: Float[Tensor, " d"],
        bias: float,
        mean: Float[Tensor, " d"],
        scale: Float[Tensor, " d"],
        auroc: float,
        n_train: int,
        n_test: int,
        identity: dict[str, Any],
        chat: bool = False,
        batch_size: int = 16,
    ) -> None:
        self.concept, self.hook, self.bias = concept, hook, float(bias)
        self.weight, self.mean, self.scale = weight.double(), mean.double(), scale.double()
        self.auroc, self.n_train, self.n_test = float(auroc), int(n_train), int(n_test)
        self.model_identity = dict(identity)
        self.chat, self.batch_size = chat, batch_size

    @property
    def reliable(self) -> bool:
        """Whether the held-out AUROC is at least :data:`RELIABLE_AUROC` (0.8)."""
        return self.auroc >= RELIABLE_AUROC

    @classmethod
    def fit(
        cls,
        model: Host,
        train: Sequence[ContrastivePair],
        test: Sequence[ContrastivePair],
        *,
        concept: str,
        hook: str | None = None,
        l2: float = 1e-2,
        chat: bool = False,
        batch_size: int = 16,
    ) -> ProbeJudge:
        """Fit on the positive/negative completions of ``train`` (after their prompts, clean model) and
        measure the AUROC on those of ``test``. ``hook`` defaults to the residual stream after the middle
        block, ``blocks.{n_layers // 2}.hook_resid_post``."""
        train_pairs, test_pairs = check_pairs(train), check_pairs(test)
        if not isinstance(concept, str) or not concept:
            raise ConfigError("give the concept's name (concept='sentiment'): the judge refuses other concepts")
        if not l2 > 0:
            raise ConfigError(f"l2 must be > 0, got {l2!r}")
        hook = hook or f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
        validate_hook(model, hook)
        check_clean(model)
        x_train, y_train = _pair_features(model, train_pairs, hook, chat, batch_size)
        x_test, y_test = _pair_features(model, test_pairs, hook, chat, batch_size)
        mean = x_train.mean(0)
        scale = x_train.std(0).clamp_min(1e-8)
        w, b = fit_logistic((x_train - mean) / scale, y_train, l2)
        test_scores = ((x_test - mean) / scale) @ w + b
        return cls(
            concept=concept,
            hook=hook,
            weight=w,
            bias=b,
            mean=mean,
            scale=scale,
            auroc=auroc(test_scores.numpy(), y_test.numpy()),
            n_train=len(y_train),
            n_test=len(y_test),
            identity=model_identity(model),
            chat=chat,
            batch_size=batch_size,
        )

    def check(self, model: Host, concept: str | None = None) -> None:
        check_identity(self.model_identity, model)
        if concept is not None and concept != self.concept:
            raise ConfigError(
                f"this probe judge was fitted for the concept {self.concept!r}, not {concept!r}; fit one with "
                f"ProbeJudge.fit(model, load_pairs({concept!r}), load_pairs({concept!r}, 'test'), concept={concept!r})"
            )

    def probabilities(self, features: Float[Tensor, "n d"]) -> Float[Tensor, " n"]:
        """sigmoid(w . (x - mean) / scale + b) for features of this judge's hook."""
        return torch.sigmoid(((features.double() - self.mean) / self.scale) @ self.weight + self.bias)

    def score(self, model: Host, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        p, c = check_texts(prompts, completions)
        self.check(model)
        check_clean(model)
        out = np.full(len(c), np.nan)
        keep = nonempty(c)
        if keep.size:
            data = tokenize_completions(model, [p[i] for i in keep], [c[i] for i in keep], chat=self.chat)
            feats = completion_activations(model, data, self.hook, batch_size=self.batch_size)
            out[keep] = self.probabilities(feats).numpy()
        return {"concept": out}

    def info(self) -> dict[str, object]:
        return {
            "judge": "probe",
            "concept": self.concept,
            "hook": self.hook,
            "auroc": self.auroc,
            "reliable": self.reliable,
            "n_train": self.n_train,
            "n_test": self.n_test,
            "model": self.model_identity.get("model_name"),
        }

    def __repr__(self) -> str:
        flag = "" if self.reliable else ", UNRELIABLE"
        return f"ProbeJudge(concept={self.concept!r}, hook={self.hook!r}, held-out AUROC={self.auroc:.3f}{flag})"


def _pair_features(
    model: Host, pairs: list[ContrastivePair], hook: str, chat: bool, batch_size: int
) -> tuple[Float[Tensor, "n d"], Float[Tensor, " n"]]:
    prompts = [q.prompt for q in pairs] * 2
    completions = [q.positive for q in pairs] + [q.negative for q in pairs]
    data = tokenize_completions(model, prompts, completions, chat=chat)
    x = completion_activations(model, data, hook, batch_size=batch_size)
    y = torch.cat([torch.ones(len(pairs)), torch.zeros(len(pairs))]).double()
    return x, y
