"""The default model on the two TransformerLens hosts: load time, a forward pass, and steered greedy generation on
the TransformerBridge against the HookedTransformer and against clean Hugging Face generation, in one process.

Three copies of SmolLM2-135M-Instruct with the same weights (all from tl_steer's cache): the HookedTransformer
(``load_default_model(host="hooked")``), the TransformerBridge (``host="bridge"``) and a plain Hugging Face
``LlamaForCausalLM`` (rebuilt from the same cache, never wrapped). Steering is a DiffMean vector (8 sentiment
train pairs) at ``blocks.15.hook_resid_post``, m = 1, all positions, entered with ``tl_steer.steer`` on each
call. Generation is greedy with the KV cache, EOS ignored (every call makes exactly N tokens), on equal-length
prompts (no padding: the 8 sentiment test prompts cut to the shortest one's length), batch 1 and 8.

Timing as ``bench.py``: one torch thread, the conditions of a configuration run back to back in alternating
order after a warm-up, CPU time per call (``time.process_time``: time spent waiting for a core taken by
another process does not count) and wall time; a ratio is the median over repetitions of the paired ratio.

    python benchmarks/bridge_generation.py [--quick]      # writes results/bridge_generation.md (+ .json)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
HOOK = "blocks.15.hook_resid_post"


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: bool = True) -> dict[str, dict[str, list]]:
    """Each function once as a warm-up, then ``repeats`` rounds of all, the order reversed every other round;
    per function the CPU and wall seconds of every call."""
    names = list(fns)
    if warmup:
        for name in names:
            fns[name]()
    out: dict[str, dict[str, list]] = {"cpu": {n: [] for n in names}, "wall": {n: [] for n in names}}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            c0, w0 = time.process_time(), time.perf_counter()
            fns[name]()
            out["cpu"][name].append(time.process_time() - c0)
            out["wall"][name].append(time.perf_counter() - w0)
    return out


def ratios(times: dict[str, dict[str, list]], num: str, den: str, clock: str = "cpu") -> list[float]:
    return [a / b for a, b in zip(times[clock][num], times[clock][den], strict=True)]


def ratio(times: dict[str, dict[str, list]], num: str, den: str, clock: str = "cpu") -> float:
    return _median(ratios(times, num, den, clock))


def load_models() -> tuple[dict[str, Any], dict[str, float]]:
    """The three copies of the default model, and each one's load time (s, from a warm cache)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    import tl_steer
    from tl_steer import models

    tl_steer.load_default_model(host="bridge")  # make sure the cache exists (and import everything once)
    loads: dict[str, float] = {}
    t0 = time.perf_counter()
    hooked = tl_steer.load_default_model(host="hooked")
    loads["hooked"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    bridge = tl_steer.load_default_model(host="bridge")
    loads["bridge"] = time.perf_counter() - t0
    folder = next(models.cache_dir().glob(f"{models.DEFAULT_MODEL_NAME}-*/model.safetensors")).parent
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = models._cache_to_llama(models.load_file(str(folder / "model.safetensors")), config)
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    hf.eval()
    return {"hooked": hooked, "bridge": bridge, "hf": hf}, loads


def measure(quick: bool) -> dict[str, Any]:
    import torch

    import tl_steer

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    hosts, loads = load_models()
    bridge, hf = hosts["bridge"], hosts["hf"]
    train = tl_steer.load_pairs("sentiment", "train")[:8]
    vector = tl_steer.diffmean(bridge, train, HOOK).vector
    steer_with = {name: tl_steer.AddVector(HOOK, vector) for name in ("hooked", "bridge")}

    prompts = [bridge.to_tokens(p.prompt)[0] for p in tl_steer.load_pairs("sentiment", "test")[:8]]
    width = min(len(p) for p in prompts)
    batch8 = torch.stack([p[:width] for p in prompts])

    # ----- a forward pass of 8 x 128 tokens -----
    text = " ".join(p.prompt + p.positive for p in tl_steer.load_pairs("sentiment", "test"))
    long = bridge.to_tokens(text)[:, :128].repeat(8, 1)

    def forward(name: str) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                hosts[name](long) if name != "hf" else hf(long)

        return run

    fwd = interleaved({n: forward(n) for n in ("hf", "bridge", "hooked")}, 2 if quick else 3)
    agree: dict[str, bool] = {}

    def generate(name: str, tokens: Any, new: int, steered: bool) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                if name == "hf":
                    out = hf.generate(
                        tokens,
                        attention_mask=torch.ones_like(tokens),
                        max_new_tokens=new,
                        min_new_tokens=new,
                        do_sample=False,
                        pad_token_id=0,
                    )
                else:
                    model = hosts[name]
                    kwargs = dict(max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False)
                    if steered:
                        with tl_steer.steer(model, steer_with[name], m=1.0):
                            out = model.generate(tokens, **kwargs)
                    else:
                        out = model.generate(tokens, **kwargs)
            results[(name, steered, tokens.shape[0], new)] = out[:, tokens.shape[1] :].clone()

        return run

    results: dict[tuple, Any] = {}
    configs = [(1, 32), (8, 32), (1, 128), (8, 128)]
    if quick:
        configs = configs[:2]
    gen_rows = []
    for batch, new in configs:
        tokens = batch8[:batch]
        fns = {
            "hf_clean": generate("hf", tokens, new, False),
            "bridge_clean": generate("bridge", tokens, new, False),
            "bridge_steered": generate("bridge", tokens, new, True),
            "hooked_steered": generate("hooked", tokens, new, True),
        }
        reps = (2 if new > 32 else 3) if not quick else 1
        times = interleaved(fns, reps, warmup=new == 32)
        same_clean = torch.equal(results[("hf", False, batch, new)], results[("bridge", False, batch, new)])
        same_steered = torch.equal(results[("bridge", True, batch, new)], results[("hooked", True, batch, new)])
        agree[f"b{batch}_{new}"] = same_clean and same_steered
        gen_rows.append(
            {
                "batch": batch,
                "new_tokens": new,
                "reps": reps,
                "cpu_s": {k: _median(v) for k, v in times["cpu"].items()},
                "wall_s": {k: _median(v) for k, v in times["wall"].items()},
                "bridge_steered_over_hf": ratio(times, "bridge_steered", "hf_clean"),
                "bridge_steered_over_bridge_clean": ratio(times, "bridge_steered", "bridge_clean"),
                "hooked_over_bridge_steered": ratio(times, "hooked_steered", "bridge_steered"),
                "wall_bridge_steered_over_hf": ratio(times, "bridge_steered", "hf_clean", "wall"),
                "wall_hooked_over_bridge_steered": ratio(times, "hooked_steered", "bridge_steered", "wall"),
                "hf_equals_bridge_clean": same_clean,
                "bridge_equals_hooked_steered": same_steered,
                "raw": times,
            }
        )
    return {
        "loads_s": loads,
        "forward": {
            "cpu_s": {k: _median(v) for k, v in fwd["cpu"].items()},
            "bridge_over_hf": ratio(fwd, "bridge", "hf"),
            "hooked_over_hf": ratio(fwd, "hooked", "hf"),
            "raw": fwd,
        },
        "generation": gen_rows,
        "prompt_tokens": width,
    }


def report(res: dict[str, Any], header: dict[str, Any]) -> str:
    f = res["forward"]
    lines = [
        "# The default model on both hosts: steered generation, forward pass, load time",
        "",
        "`python benchmarks/bridge_generation.py` (also `make bench`, section 10). "
        + ", ".join(f"{k} {v}" for k, v in header.items())
        + ".",
        "",
        "SmolLM2-135M-Instruct, float32, CPU, one torch thread; the same weights on every host. Steered = DiffMean "
        f"at {HOOK}, m = 1, entered with `tl_steer.steer` on every call. Greedy, KV cache, EOS ignored; "
        f"prompts of {res['prompt_tokens']} tokens. Times are medians of per-call CPU seconds; ratios are medians "
        "of paired ratios (CPU time; wall time beside).",
        "",
        "## Steered greedy generation",
        "",
        "| batch | new tokens | clean HF | clean bridge | steered bridge | steered HookedTransformer "
        "| steered bridge / clean HF (goal <= 1.10) | steering on the bridge / clean bridge "
        "| HookedTransformer / bridge, steered (goal >= 2.5 at batch 1) | same tokens | reps |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for g in res["generation"]:
        c = g["cpu_s"]
        same = "yes" if g["hf_equals_bridge_clean"] and g["bridge_equals_hooked_steered"] else "no"
        lines.append(
            f"| {g['batch']} | {g['new_tokens']} | {c['hf_clean']:.2f} s | {c['bridge_clean']:.2f} s | "
            f"{c['bridge_steered']:.2f} s | {c['hooked_steered']:.2f} s | **{g['bridge_steered_over_hf']:.3f}x** "
            f"(wall {g['wall_bridge_steered_over_hf']:.3f}x) | {g['bridge_steered_over_bridge_clean']:.3f}x | "
            f"**{g['hooked_over_bridge_steered']:.2f}x** (wall {g['wall_hooked_over_bridge_steered']:.2f}x) | "
            f"{same} | {g['reps']} |"
        )
    lines += [
        "",
        "'same tokens': clean Hugging Face and clean bridge generated the same tokens, and so did the steered bridge "
        "and the steered HookedTransformer ('no': a float32 near-tie flipped a greedy choice somewhere in the batch).",
        "",
        "Reading: "
        + "; ".join(
            f"batch {g['batch']}, {g['new_tokens']} tokens: clean bridge / clean HF "
            f"{ratio(g['raw'], 'bridge_clean', 'hf_clean'):.2f}x"
            for g in res["generation"]
        )
        + ". The clean bridge itself is slower than Hugging Face's generation: TransformerBridge wraps every module "
        "of the Hugging Face model in components with hook points, which multiplies the Python module calls per "
        "token (for 32 tokens at batch 1: 56,384 module calls against Hugging Face's 12,672); tl_steer's "
        "steering adds only the ratio in the 'steering on "
        "the bridge' column.",
        "",
        "## Forward pass (8 x 128 tokens) and load time",
        "",
        "| | Hugging Face | bridge | HookedTransformer |",
        "|---|---:|---:|---:|",
        f"| forward pass, CPU s | {f['cpu_s']['hf']:.2f} | {f['cpu_s']['bridge']:.2f} | {f['cpu_s']['hooked']:.2f} |",
        f"| ratio to Hugging Face | 1 | {f['bridge_over_hf']:.3f}x | {f['hooked_over_hf']:.3f}x |",
        f"| `load_default_model(host=...)` from the cache, wall s | | {res['loads_s']['bridge']:.2f} | "
        f"{res['loads_s']['hooked']:.2f} |",
        "",
    ]
    return "\n".join(lines)


def rows_for_bench(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The measurements as rows of bench.py's table (section 'bridge')."""
    rows = []
    for g in res["generation"]:
        what = f"steered greedy generation, batch {g['batch']}, {g['new_tokens']} new tokens"
        times = dict(g["cpu_s"])
        vs_hf = ratios(g["raw"], "bridge_steered", "hf_clean")
        vs_hooked = ratios(g["raw"], "hooked_steered", "bridge_steered")
        rows.append(
            {
                "section": "bridge",
                "what": what + ": steered bridge / clean Hugging Face",
                "model": "default",
                "result": f"**{g['bridge_steered_over_hf']:.3f}x**",
                "ratio": g["bridge_steered_over_hf"],
                "ratio_min": min(vs_hf),
                "ratio_max": max(vs_hf),
                "wall_ratio": g["wall_bridge_steered_over_hf"],
                "reference": "goal <= 1.10x",
                "times": times,
                "reps": g["reps"],
                "note": "benchmarks/bridge_generation.py; clean bridge and clean Hugging Face: "
                + ("same tokens" if g["hf_equals_bridge_clean"] else "tokens differ"),
            }
        )
        rows.append(
            {
                "section": "bridge",
                "what": what + ": steered HookedTransformer / steered bridge",
                "model": "default",
                "result": f"**{g['hooked_over_bridge_steered']:.2f}x**",
                "ratio": g["hooked_over_bridge_steered"],
                "ratio_min": min(vs_hooked),
                "ratio_max": max(vs_hooked),
                "wall_ratio": g["wall_hooked_over_bridge_steered"],
                "reference": "goal >= 2.5x at batch 1",
                "times": times,
                "reps": g["reps"],
                "note": "same tokens" if g["bridge_equals_hooked_steered"] else "tokens differ",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens only, one repetition")
    parser.add_argument("--out", default=str(RESULTS / "bridge_generation.md"))
    args = parser.parse_args(argv)
    import importlib.metadata as md

    start = time.perf_counter()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    res = measure(args.quick)
    header = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load average at start": load,
        "at end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": md.version("torch"),
        "transformer-lens": md.version("transformer-lens"),
        "transformers": md.version("transformers"),
        "wall": f"{time.perf_counter() - start:.0f} s",
    }
    text = report(res, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"header": header, **res}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    sys.exit(main())
