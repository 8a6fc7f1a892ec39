"""Judges of generated text: each scores (prompt, completion) pairs with the clean model or a judge LM.

- :class:`ProbeJudge`: P(concept | text) from a linear probe on the clean model's activations, with its
  held-out AUROC measured when it is fitted;
- :class:`FluencyJudge`: the clean model's NLL per token of the completion, distinct-1/2 and repetition;
- :class:`RelevanceJudge`: pointwise mutual information of the completion with its own prompt;
- :class:`LLMJudge`: three 0-2 rubric scores (concept, instruction, fluency) from any causal LM, parsed
  strictly.

See ``docs/methods.md``, section "Judging generated text".
"""

from tl_steer.judges.base import Judge, judge_table
from tl_steer.judges.fluency import FluencyJudge, distinct_n, repeated_ngram_share
from tl_steer.judges.llm import LLMJudge, parse_score
from tl_steer.judges.probe import ProbeJudge, auroc
from tl_steer.judges.relevance import RelevanceJudge

__all__ = [
    "FluencyJudge",
    "Judge",
    "LLMJudge",
    "ProbeJudge",
    "RelevanceJudge",
    "auroc",
    "distinct_n",
    "judge_table",
    "parse_score",
    "repeated_ngram_share",
]
