"""The tests run with jaxtyping's run-time shape checks on tl_steer (tests/conftest.py): a call whose tensors
contradict the annotated shapes fails, while the project's own input checks still answer everything else."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPE_CHECKS
from jaxtyping import TypeCheckError

from tl_steer.methods.cold import completion_logprob


@pytest.mark.skipif(not SHAPE_CHECKS, reason="TL_STEER_SHAPE_CHECKS=0")
def test_jaxtyping_shapes_are_checked_at_run_time():
    logits = torch.zeros(2, 5, 7)
    starts, lengths = torch.tensor([1, 2]), torch.tensor([4, 5])
    assert completion_logprob(logits, torch.zeros(2, 5, dtype=torch.long), starts, lengths).shape == (2,)
    with pytest.raises(TypeCheckError):  # batch 3 against the logits' batch 2
        completion_logprob(logits, torch.zeros(3, 5, dtype=torch.long), starts, lengths)
    with pytest.raises(TypeCheckError):  # float token ids against Int[Tensor, "batch pos"]
        completion_logprob(logits, torch.zeros(2, 5), starts, lengths)
