"""DiffMean / CAA: the difference of mean activations between positive and negative completions."""

from __future__ import annotations

from collections.abc import Sequence

from tl_steer.activations import Reduce, completion_activations
from tl_steer.data.pairs import ContrastivePair, check_pairs
from tl_steer.dtypes import master_dtype
from tl_steer.hookpoints import validate_hook
from tl_steer.hosts import Host
from tl_steer.interventions import AddVector
from tl_steer.models import model_identity
from tl_steer.positions import PositionsLike
from tl_steer.scoring import tokenize_completions


def diffmean(
    model: Host,
    pairs: Sequence[ContrastivePair],
    hook: str,
    *,
    reduce: Reduce = "mean",
    positions: PositionsLike = "all",
    chat: bool = False,
    batch_size: int = 16,
) -> AddVector:
    """A steering vector from contrastive pairs (Rimsky et al.'s CAA, "difference of means").

        v = (1/N) sum_i [ a(q_i + A_p,i) - a(q_i + A_n,i) ]

    where a(.) is the activation at ``hook`` averaged over the completion's tokens (``reduce="mean"``)
    or taken at its last token (``reduce="last"``). The result adds ``m * v`` at ``hook`` at the
    positions of ``positions``.

    The means are taken in float64; the vector is float32 (float64 for a float64 model) and is cast to the
    activation's dtype when applied, so a float16 / bfloat16 model gets its mean difference unrounded.
    """
    items = check_pairs(pairs)
    validate_hook(model, hook)
    prompts = [p.prompt for p in items] * 2
    completions = [p.positive for p in items] + [p.negative for p in items]
    data = tokenize_completions(model, prompts, completions, chat=chat)
    acts = completion_activations(model, data, hook, reduce=reduce, batch_size=batch_size)
    n = len(items)
    vector = (acts[:n] - acts[n:]).mean(0)  # float64
    return AddVector(
        hook,
        vector.to(master_dtype(model)),
        positions=positions,
        method="diffmean",
        info={"n_pairs": n, "reduce": reduce, "chat": chat, "norm": float(vector.norm())},
        model_identity=model_identity(model),
    )
