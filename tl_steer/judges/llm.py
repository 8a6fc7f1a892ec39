"""An LLM judge: three 0-2 ratings of a text (concept, instruction, fluency) from any causal LM.

The judge asks one question per rating, in the manner of AxBench's rubrics, and reads the answer
strictly: a rating is accepted only when the answer holds exactly one ``[[0]]``, ``[[1]]`` or ``[[2]]``
(or is nothing but the digit itself). Anything else (no rating, two ratings, a 3, a 1.5, prose) is an
unparseable answer: the rating is NaN and ``llm_unparsed`` counts it, so failures are reported and
never guessed. The three ratings combine per text by their harmonic mean (0 if any is 0), as AxBench does.

Back ends: any callable mapping a prompt string to the answer string (so an API can be plugged in), a
local Hugging Face causal-LM folder (loaded with ``local_files_only=True``), or a HookedTransformer. The
default model (135M parameters) is far too small to judge well: use it to test the mechanics only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tl_steer.errors import ConfigError, FileFormatError, MissingDependencyError
from tl_steer.hosts import Host, is_bridge, is_hooked
from tl_steer.judges.base import Judge, check_texts

#: how each built-in concept is described to the judge
CONCEPT_DESCRIPTIONS = {
    "sentiment": "a positive, happy, approving attitude",
    "formality": "a formal, polite register",
    "refusal": "politely declining to do what was asked",
}

# The three rubrics, written for this project. {concept}, {prompt} and {text} are filled in.
_HEAD = "You grade a piece of text written as a continuation of a prompt.\n\nPrompt: {prompt}\n\nText: {text}\n\n"
_TAIL = "\nAnswer with the rating only, written as [[0]], [[1]] or [[2]]."
RUBRICS = {
    "concept": _HEAD
    + "Question: does the text show {concept}?\n"
    + "0 = not at all; 1 = somewhat, or only in passing or awkwardly; 2 = clearly, and it fits the text.\n"
    + _TAIL,
    "instruction": _HEAD
    + "Question: does the text follow on from the prompt, staying on its topic?\n"
    + "0 = unrelated to the prompt; 1 = partly related, or drifts away; 2 = a relevant continuation.\n"
    + _TAIL,
    "fluency": _HEAD
    + "Question: is the text fluent, grammatical English?\n"
    + "0 = broken, garbled or repeating itself; 1 = understandable but with clear errors; 2 = fluent.\n"
    + _TAIL,
}

_BRACKETED = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
_RATING = re.compile(r"\s*([012])\s*")


def parse_score(answer: object) -> int | None:
    """The rating 0, 1 or 2 in ``answer``, or ``None`` when the answer is not exactly one rating.

    Accepted: exactly one ``[[d]]`` (spaces allowed inside the brackets) with d an ASCII 0, 1 or 2, and no
    other ``[[...]]``; or an answer that is only the digit (surrounding whitespace and a final period
    allowed). Everything else is unparseable.
    """
    if not isinstance(answer, str):
        return None
    found = _BRACKETED.findall(answer)
    if len(found) == 1:
        match = _RATING.fullmatch(found[0])
        return int(match.group(1)) if match else None
    if found:
        return None
    bare = answer.strip().removesuffix(".")
    return int(bare) if bare in ("0", "1", "2") else None


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum(1 / v): 0 when any value is 0, NaN when any is NaN."""
    if any(math.isnan(v) for v in values):
        return float("nan")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


Backend = Callable[[str], str]


class LLMJudge(Judge):
    """Ratings ``llm_concept``, ``llm_instruction``, ``llm_fluency`` (0-2 each, NaN when unparseable),
    their harmonic mean ``llm_hmean``, and ``llm_unparsed`` (how many of the three answers failed).

    Args:
        backend: a callable prompt -> answer, a local Hugging Face causal-LM folder, or a HookedTransformer.
        concept: the concept's description (a built-in concept's name is replaced by its description).
        max_new_tokens: answer length for the folder and HookedTransformer back ends.
    """

    metrics = ("llm_concept", "llm_instruction", "llm_fluency", "llm_hmean", "llm_unparsed")

    def __init__(self, backend: Backend | str | Path | Host, *, concept: str, max_new_tokens: int = 12):
        if not isinstance(concept, str) or not concept.strip():
            raise ConfigError("give the concept the judge rates, e.g. concept='sentiment' or a description")
        self.concept = CONCEPT_DESCRIPTIONS.get(concept, concept)
        self.concept_name = concept
        self.max_new_tokens = max_new_tokens
        if is_hooked(backend) or is_bridge(backend):
            self.ask: Backend = _hooked_backend(backend, max_new_tokens)
            self.name = str(backend.cfg.model_name)
        elif isinstance(backend, (str, Path)):
            self.ask = _folder_backend(Path(backend), max_new_tokens)
            self.name = str(backend)
        elif callable(backend):
            self.ask = backend
            self.name = getattr(backend, "__name__", type(backend).__name__)
        else:
            raise ConfigError(
                f"the LLM judge's backend must be a callable, a model folder or a HookedTransformer, "
                f"got {type(backend).__name__}"
            )
        self.n_asked = 0
        self.n_unparsed = 0

    def prompt(self, rubric: str, prompt: str, text: str) -> str:
        """The question asked for one rubric ("concept", "instruction" or "fluency")."""
        return RUBRICS[rubric].format(concept=self.concept, prompt=prompt.strip(), text=text.strip())

    def score(self, model: Host, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        p, c = check_texts(prompts, completions)
        out = {k: np.full(len(c), np.nan) for k in self.metrics}
        out["llm_unparsed"] = np.zeros(len(c))
        for i, (prompt, text) in enumerate(zip(p, c, strict=True)):
            if not text.strip():
                continue
            ratings = []
            for rubric in ("concept", "instruction", "fluency"):
                answer = self.ask(self.prompt(rubric, prompt, text))
                value = parse_score(answer)
                self.n_asked += 1
                if value is None:
                    self.n_unparsed += 1
                    out["llm_unparsed"][i] += 1
                ratings.append(float("nan") if value is None else float(value))
                out[f"llm_{rubric}"][i] = ratings[-1]
            out["llm_hmean"][i] = harmonic_mean(ratings)
        return out

    def info(self) -> dict[str, object]:
        return {"judge": "llm", "model": self.name, "asked": self.n_asked, "unparsed": self.n_unparsed}


def _hooked_backend(model: Host, max_new_tokens: int) -> Backend:
    tokenizer = model.tokenizer
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))

    def ask(question: str) -> str:
        assert tokenizer is not None
        text = (
            str(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
                )
            )
            if chat
            else question
        )
        # the chat template writes its own special tokens
        tokens = model.to_tokens(text, prepend_bos=False) if chat else model.to_tokens(text)
        # The question may be long: keep its end (the rubric and answer format) within the context.
        tokens = tokens[:, -(model.cfg.n_ctx - max_new_tokens) :]
        with torch.no_grad():
            out = model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False, verbose=False)
        assert isinstance(out, torch.Tensor)
        return str(tokenizer.decode(out[0, tokens.shape[1] :], skip_special_tokens=True))

    return ask


def _folder_backend(folder: Path, max_new_tokens: int) -> Backend:
    """A greedy answerer from a local Hugging Face causal-LM folder; checked before anything is loaded."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise MissingDependencyError("the LLM judge needs transformers: pip install transformers") from exc
    if not folder.is_dir():
        raise FileNotFoundError(f"no such model folder: {folder}")
    if not (folder / "config.json").is_file():
        raise FileFormatError(f"{folder} is not a Hugging Face model folder (it has no config.json)")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read the config means the folder is not usable
        raise FileFormatError(f"{folder}: cannot read its config.json as a model configuration ({exc})") from exc
    archs = list(getattr(config, "architectures", None) or [])
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or (
        not archs and getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not causal:
        raise FileFormatError(
            f"{folder} holds a {', '.join(archs) or getattr(config, 'model_type', 'unknown')} model, not a causal "
            "language model (a *ForCausalLM architecture); the LLM judge needs a model that writes text"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise FileFormatError(f"{folder}: cannot load the model or its tokenizer ({exc})") from exc
    hf.eval()
    chat = bool(getattr(tokenizer, "chat_template", None))

    def ask(question: str) -> str:
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = question
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)
        with torch.no_grad():
            kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            out = hf.generate(**enc, **kw)  # type: ignore[misc]
        return str(tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))

    return ask
