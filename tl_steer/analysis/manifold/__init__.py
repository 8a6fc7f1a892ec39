"""Manifold-distance probes: how far activations sit from the distribution of clean activations at a hook.

docs/methods.md, section 9. A :class:`ManifoldProbe` is fitted on clean runs of a model (or on any array of
activations, :meth:`ManifoldProbe.from_activations`) and then scores activations token by token, steered
or not. Distances, each available on its own (:meth:`ManifoldProbe.distances`):

- ``norm`` = |h|, and ``norm_ratio`` = |h_steered| / |h_clean| at the same position (needs the clean run).
- ``mahalanobis``: sqrt((h - mu)^T Sigma^-1 (h - mu)), where Sigma is the Ledoit-Wolf shrunk covariance
  ``(1 - s) S + s (tr S / d) I`` of the clean tokens, held in low-rank-plus-isotropic form: the top-k
  eigenpairs (U_k, lambda_k) of Sigma, and sigma^2, the mean of its remaining d - k eigenvalues, for
  everything outside that subspace. With z = h - mu:
  ``mahalanobis_inside`` = |diag(lambda_k)^-1/2 U_k^T z| (the part inside the top-k principal subspace),
  ``mahalanobis_outside`` = |z - U_k U_k^T z| / sigma (the residual outside it), and
  ``mahalanobis`` = sqrt(inside^2 + outside^2). With k = d it is the exact Mahalanobis distance under Sigma.
  Scoring costs O(d k) per token, so it scales to a large d_model.
- ``knn``: the distance from the unit vector (h - mu)/|h - mu| to its knn_k-th nearest neighbour among a
  seeded subsample of clean tokens normalised the same way (= sqrt(2 - 2 cos)); exact, by a batched matmul
  and top-k. Centring first keeps the large mean of the residual stream from making every token look alike.
- ``sae_error`` = |h - decode(encode(h))| / |h| for an attached SAE (a sae-lens ``SAE``, or any object with
  ``encode`` and ``decode``).

Calibration: every distance except the norm ratio is also given as a percentile among held-out clean tokens
(``*_pct``: 0.99 = more unusual, i.e. larger, than 99% of clean tokens; mid-rank for ties; for the norm this
is one-sided too, so an unusually small norm gets a low percentile), and
:func:`auroc` gives the AUROC of clean against steered tokens.

Fitting streams the activations in padded batches and never holds them all. Statistics are accumulated in
float64 and merged with Chan et al.'s parallel formulas (:class:`RunningMoments`), so chunks merged in any
order give the same result. Besides the mean and the scatter matrix the merge carries sum |x - mu|^2 (x - mu)
and sum |x - mu|^4, whose merges are exact as well: that is all the Ledoit-Wolf shrinkage intensity needs, so
it is computed from the streaming statistics of all reference tokens (no subsample), and equals the usual
estimator (scikit-learn's ``ledoit_wolf_shrinkage``) on the same tokens. Position 0 (the BOS token, or the
first token that serves as the attention sink) is excluded, as is padding; tokens with an outlier norm
(> ``outlier_factor`` x the median norm of the first batch) are excluded from everything and counted. A
seeded share ``holdout`` of the tokens is kept out of the statistics for calibration; the same tokens are
held out at every hook. The random draws are made per text, in the order of the texts, so the fit does not
depend on the batch size, and the subsamples keep the rows with the smallest random keys, so they do not
depend on the order in which the rows arrive.

The package is split along its seams: :mod:`.moments` (streaming statistics), :mod:`.distances` (the
distances and the AUROC), :mod:`.inputs` (settings, hooks and token checks), :mod:`.probe` (the
:class:`ManifoldProbe`) and :mod:`.files` (saving and loading a probe).
"""

from tl_steer.analysis.manifold.distances import CALIBRATED, DISTANCES, auroc
from tl_steer.analysis.manifold.files import FORMAT, VERSION, _read_metadata
from tl_steer.analysis.manifold.inputs import ProbeSettings, _stop_layer, _token_lists
from tl_steer.analysis.manifold.moments import HookStatistics, RunningMoments
from tl_steer.analysis.manifold.probe import ManifoldProbe

__all__ = [
    "CALIBRATED",
    "DISTANCES",
    "FORMAT",
    "VERSION",
    "HookStatistics",
    "ManifoldProbe",
    "ProbeSettings",
    "RunningMoments",
    "_read_metadata",
    "_stop_layer",
    "_token_lists",
    "auroc",
]
