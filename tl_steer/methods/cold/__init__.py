"""COLD-Steer: steering from a few examples by the learning dynamics of one gradient step.

The change in the activation Z at a hook that one gradient step on N examples would cause,

    theta' = theta - (eta/N) sum_i grad_theta L_i
    dZ(x)  = Z(x; theta') - Z(x; theta)  ~  -eta J(x) g,      g = (1/N) sum_i grad_theta L_i,

is applied at inference without changing any weight (docs/methods.md, section 6). Losses on the examples
(:func:`example_losses`): for pairs, DPO without a reference model,
``L = -log sigmoid(beta (log p(A_p|q) - log p(A_n|q)))`` with ``log p`` minus the mean token NLL of the
completion (beta = 0.1); for positive-only examples, the mean token NLL of the completion.

- :func:`cold_kernel` (unit kernel, K = 1): ``dZ = -eta v`` with ``v`` the mean over examples of the
  gradient of the whole loss w.r.t. the activation at the hook (at the last prompt position, or averaged
  over the completion positions). The backward pass stops at the hook: no parameter gradient is computed.
  Returns an :class:`~tl_steer.interventions.AddVector`.
- :func:`cold_fd`: ``g`` over the parameters before the hook only; at inference, for each input,
  ``dZ(x) = -(eta/eps) [Z(x; theta + eps g) - Z(x; theta)]`` (``fd_method="fd"``: one perturbed pass that
  stops at the hook, with ``Z(x; theta)`` taken from the ordinary pass) or the exact forward-mode
  ``dZ(x) = -eta J(x) g`` (``fd_method="jvp"``, the default, ``torch.func.jvp`` over
  ``torch.func.functional_call``). Returns a :class:`ColdFD` intervention.

The package is split along its seams: :mod:`.examples` (validated examples, their tokenisation and
losses), :mod:`.blocks` (which hooks and parameters COLD acts through), :mod:`.kernel` (COLD-Kernel),
:mod:`.fd` (the COLD-FD gradient) and :mod:`.fd_intervention` (the :class:`ColdFD` intervention that
applies it at inference).
"""

from tl_steer.methods.cold.blocks import fd_blocks, parameters_before
from tl_steer.methods.cold.examples import (
    Example,
    Examples,
    Loss,
    _batches,
    _groups,
    _losses,
    _tokenize,
    completion_logprob,
    example_losses,
    prepare_examples,
)
from tl_steer.methods.cold.fd import PUBLISHED_EPS, cold_fd, cold_fd_prefixes
from tl_steer.methods.cold.fd_intervention import ColdFD
from tl_steer.methods.cold.kernel import cold_kernel, cold_kernel_prefixes

__all__ = [
    "PUBLISHED_EPS",
    "ColdFD",
    "Example",
    "Examples",
    "Loss",
    "_batches",
    "_groups",
    "_losses",
    "_tokenize",
    "cold_fd",
    "cold_fd_prefixes",
    "cold_kernel",
    "cold_kernel_prefixes",
    "completion_logprob",
    "example_losses",
    "fd_blocks",
    "parameters_before",
    "prepare_examples",
]
