"""The generation table for every built-in concept: what DiffMean does to the text the default model writes.

For each concept: DiffMean at ``blocks.15.hook_resid_post`` from the concept's training pairs; greedy
completions (32 new tokens) of the 16 held-out prompts of its built-in prompt set at m = 0, 1, 2; judged by
a probe judge fitted on the concept's train/test pairs (its held-out AUROC is reported), the fluency judge
(NLL, repeated 4-gram share) and the relevance judge (PMI with the prompt). See ``docs/methods.md``, section
"Judging generated text". CIs are 95% percentile bootstraps over prompts; the gain over m = 0 is paired
(per prompt, DiffMean at m minus DiffMean at m = 0, which is the clean model's text).

    OMP_NUM_THREADS=1 python benchmarks/generation_concepts.py [--concepts sentiment formality refusal]
"""

from __future__ import annotations

import argparse
import html
import platform
import time
from datetime import date
from pathlib import Path

import pandas as pd
import torch
from transformer_lens import HookedTransformer

import tl_steer
from tl_steer.analysis.stats import bootstrap_ci
from tl_steer.data import load_pairs
from tl_steer.data.prompts import load_prompts
from tl_steer.judges import FluencyJudge, ProbeJudge, RelevanceJudge

RESULTS = Path(__file__).parent / "results"
HOOK = "blocks.15.hook_resid_post"


def _ci(mean: float, low: float, high: float, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(mean)} [{low:.3f}, {high:.3f}]"


def _escape(text: str, width: int = 150) -> str:
    """One line, cut to ``width`` characters, safe inside a Markdown table cell."""
    flat = " ".join(str(text).split())
    if len(flat) > width:
        flat = flat[: width - 1] + "…"
    return html.escape(flat, quote=False).replace("|", "&#124;").replace("`", "&#96;") or "(empty)"


def run_concept(model: HookedTransformer, concept: str, ms: list[float], n_tokens: int) -> dict:
    train, test = load_pairs(concept, "train"), load_pairs(concept, "test")
    prompts = load_prompts(concept, "test")
    t0 = time.perf_counter()
    probe = ProbeJudge.fit(model, train, test, concept=concept)
    iv = tl_steer.diffmean(model, train, HOOK)
    res = tl_steer.generation_sweep(
        model,
        iv,
        prompts,
        ms,
        [probe, FluencyJudge(), RelevanceJudge()],
        concept=concept,
        max_new_tokens=n_tokens,
    )
    seconds = time.perf_counter() - t0
    summary = res.summary()
    per = res.per_prompt()
    name = iv.method
    steer = per[per["condition"] == name]
    ref = steer[steer["m"] == 0.0].set_index("item")["concept"]
    rows = []
    for m in ms:
        s = summary[(summary["condition"] == name) & (summary["m"] == m)].iloc[0]
        gains = (steer[steer["m"] == m].set_index("item")["concept"] - ref).dropna().to_numpy()
        g_low, g_high = bootstrap_ci(gains)
        rows.append(
            {
                "concept": concept,
                "m": m,
                "n": int(s["n"]),
                "score": _ci(s["concept"], s["concept_low"], s["concept_high"]),
                "gain": _ci(float(gains.mean()), g_low, g_high, signed=True) if m != 0.0 else "-",
                "nll": _ci(s["nll"], s["nll_low"], s["nll_high"]),
                "rep4": f"{s['rep4']:.3f}",
                "relevance": f"{s['relevance']:.3f}",
                "hmean": f"{s['hmean']:.3f}",
                "auroc": f"{probe.auroc:.3f}",
                "raw_score": float(s["concept"]),
                "raw_gain": float(gains.mean()),
                "gain_low": g_low,
                "gain_high": g_high,
            }
        )
    items = res.items[res.items["condition"] == name]
    examples = []
    for prompt in prompts[:2]:
        texts = {m: items[(items["prompt"] == prompt) & (items["m"] == m)]["completion"].iloc[0] for m in (0.0, 1.0)}
        examples.append((prompt, texts))
    print(f"{concept}: probe AUROC {probe.auroc:.3f}, {seconds:.0f} s", flush=True)
    for r in rows:
        print(f"  m={r['m']:g} score {r['score']} gain {r['gain']} nll {r['nll']} rep4 {r['rep4']}", flush=True)
    return {"rows": rows, "examples": examples, "seconds": seconds, "norm": float(iv.info["norm"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["sentiment", "formality", "refusal"])
    parser.add_argument("--ms", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", default=str(RESULTS / "generation_concepts.md"))
    args = parser.parse_args()
    if 0.0 not in args.ms or 1.0 not in args.ms:
        parser.error("--ms must include 0 and 1 (the gains and the examples use them)")

    torch.manual_seed(0)
    model = tl_steer.load_default_model()
    results = {c: run_concept(model, c, args.ms, args.tokens) for c in args.concepts}

    table = pd.DataFrame([r for c in args.concepts for r in results[c]["rows"]])
    lines = [
        "# Steered text for every built-in concept",
        "",
        f"{date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, default model, `benchmarks/generation_concepts.py`.",
        "",
        f"DiffMean at `{HOOK}` from each concept's training pairs; greedy completions ({args.tokens} new tokens) "
        "of the 16 held-out prompts of the concept's built-in prompt set. Concept score: the probe judge's "
        "P(concept | text) (probe fitted on the concept's training pairs, AUROC on its test pairs). NLL: nats "
        "per token under the clean model. rep4: share of repeated 4-grams. Relevance: PMI with the prompt, "
        "nats per token. hmean: per-text harmonic mean of the three 0-2 scores (AxBench style), averaged. "
        "Brackets: 95% bootstrap CI over prompts; the gain is paired per prompt against m = 0 (the clean text).",
        "",
        "| concept | m | concept score [CI] | gain over m = 0 [CI] | NLL [CI] | rep4 | relevance | hmean "
        "| probe AUROC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['concept']} | {r['m']:g} | {r['score']} | {r['gain']} | {r['nll']} | {r['rep4']} "
            f"| {r['relevance']} | {r['hmean']} | {r['auroc']} |"
        )
    lines += ["", "Run time per concept (probe fit + DiffMean + generation + judging, CPU, shared machine): "]
    lines[-1] += ", ".join(f"{c} {results[c]['seconds']:.0f} s" for c in args.concepts) + "."
    lines += ["", "## Example texts (m = 0 and m = 1, cut to 150 characters)", ""]
    lines += ["| concept | prompt | m = 0 | m = 1 |", "|---|---|---|---|"]
    for c in args.concepts:
        for prompt, texts in results[c]["examples"]:
            lines.append(f"| {c} | {_escape(prompt, 80)} | {_escape(texts[0.0])} | {_escape(texts[1.0])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
