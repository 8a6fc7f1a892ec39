"""Performance harness of tl_steer: ``make bench`` (or ``python benchmarks/bench.py [--quick]``).

Writes benchmarks/results/bench.md (a markdown table to quote) and bench.json (every repetition's time).
Each section runs in its own subprocess (its peak resident memory is reported); every process uses one
torch thread. Within a section the conditions being compared are run back to back in each repetition, in
alternating order (A B, B A, ...), after a warm-up; a ratio is the median over repetitions of the paired
ratio, so slow drift of the machine's load cancels. Absolute median times are shown alongside.
Methodology and how to read the table: benchmarks/README.md.

Sections (default model = tl_steer.load_default_model(), SmolLM2-135M-Instruct, CPU, float32):

- steer: steering overhead of a DiffMean vector (forward pass, 32-token greedy generation), and the peer
  library `steering-vectors` on the Hugging Face model (benchmarks/bench_peer_worker.py, own venv);
- sweep: preference-utility sweep, 9 strengths at layer 15 of 30, naive against cached prefix;
- cold: COLD-FD at inference (fd, jvp) against two plain forward passes; COLD set-up against N
  forward-backward passes;
- train: SPLIT / SFT, time per epoch per form;
- manifold: ManifoldProbe fitting throughput and scoring cost;
- adaptive: a forward pass steered by each adaptive form (clamp, budget, rotation, conditional) against a
  clean one;
- layers: a layer sweep over every layer x 9 strengths against separate cached-prefix sweeps, and
  multiple-choice scoring with the question prefix shared against full sequences;
- bridge: the default model as a TransformerBridge against the HookedTransformer and plain Hugging Face:
  steered greedy generation, a forward pass, load time (benchmarks/bridge_generation.py, own three models);
- tiny: the same measurements on a tiny random HookedTransformer (tests/conftest.py make_model).

    python benchmarks/bench.py                 # everything, about 10-15 min on a busy 2-core machine
    python benchmarks/bench.py --quick         # fewer repetitions and smaller inputs, about 6 min
    python benchmarks/bench.py --sections sweep cold --out out/bench.md
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
WORKER = BENCH / "bench_peer_worker.py"
DEFAULT_PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
SECTIONS = ("steer", "sweep", "cold", "train", "manifold", "generation", "adaptive", "layers", "bridge", "tiny")
TITLES = {
    "steer": "1. Steering overhead",
    "sweep": "2. Preference-utility sweep",
    "cold": "3. COLD",
    "train": "4. SPLIT / SFT training",
    "manifold": "5. Manifold probe",
    "peer": "6. Peer library (steering-vectors)",
    "generation": "7. Batched steered generation",
    "adaptive": "8. Adaptive steering",
    "layers": "9. Layer sweep and multiple-choice scoring",
    "bridge": "10. TransformerBridge against HookedTransformer and Hugging Face",
}
GEN_PROMPT = "I went to the cinema and"


@dataclass(frozen=True)
class Settings:
    fwd_tokens: int = 64  # length of the forward-pass input
    fwd_reps: int = 15
    gen_new: int = 32
    gen_reps: int = 3
    sweep_pairs: int = 4
    sweep_reps: int = 5
    cold_n: int = 8
    cold_setup_reps: int = 2
    cold_inf_reps: int = 5
    train_pairs: int = 24
    train_reps: int = 2
    fit_texts: int = 200  # about 5,200 tokens: the kNN reference set reaches its cap of 4,096 tokens
    score_pairs: int = 8
    manifold_reps: int = 2
    tiny_scale: int = 4  # repetitions multiplier on the tiny model
    tiny_inner: int = 20  # calls per timed repetition on the tiny model (one call is ~1 ms)
    mc_questions: int = 60  # multiple-choice questions scored per call (section layers)


FULL = Settings()
QUICK = Settings(
    fwd_reps=7,
    gen_reps=1,
    sweep_pairs=2,
    sweep_reps=2,
    cold_n=4,
    cold_setup_reps=1,
    cold_inf_reps=3,
    train_pairs=8,
    train_reps=1,
    fit_texts=32,
    score_pairs=4,
    manifold_reps=2,
    tiny_scale=2,
    tiny_inner=10,
    mc_questions=20,
)


# ----- timing -----------------------------------------------------------------------------------------------------


class Timed(float):
    """Times measured by the callee itself (the peer worker): wall (the float) and CPU seconds, used instead of
    this process's own clocks around the call."""

    cpu: float

    def __new__(cls, wall: float, cpu: float) -> Timed:
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj


@dataclass
class Times:
    """Per condition, the CPU time (``times[name]``, what ratios use) and the wall time of every repetition."""

    cpu: dict[str, list[float]]
    wall: dict[str, list[float]]

    def __getitem__(self, name: str) -> list[float]:
        return self.cpu[name]


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    warmups: dict[str, Callable[[], Any]] | None = None,
) -> Times:
    """Run every function once as a warm-up (``warmups`` replaces it by a cheaper call), then ``repeats``
    repetitions of all functions back to back, the order reversed every other repetition. Each call is timed
    with the process's CPU clock (``time.process_time``: with one torch thread, time spent waiting for a core
    taken by another job does not count) and with the wall clock."""
    names = list(fns)
    for name in names:
        (warmups or fns).get(name, fns[name])()
    times = Times({name: [] for name in names}, {name: [] for name in names})
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            out = fns[name]()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            if isinstance(out, Timed):
                wall, cpu = float(out), out.cpu
            times.cpu[name].append(cpu)
            times.wall[name].append(wall)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def paired(times: Times | dict[str, list[float]], num: str, den: str, factor: float = 1.0) -> list[float]:
    return [a / (factor * b) for a, b in zip(times[num], times[den], strict=True)]


def row(
    section: str,
    what: str,
    model: str,
    *,
    times: Times | None = None,
    num: str | None = None,
    den: str | None = None,
    factor: float = 1.0,
    result: str | None = None,
    reference: str = "",
    show: dict[str, str] | None = None,
    scale: float = 1.0,
    note: str = "",
) -> dict[str, Any]:
    """One line of the table. With ``num``/``den``: the median paired CPU-time ratio num / (factor x den), its
    range, and the same on wall time; ``show`` maps a series to its label in the 'median times' column
    (``scale`` converts, e.g. to one call of a repeated loop)."""
    out: dict[str, Any] = {"section": section, "what": what, "model": model, "reference": reference, "note": note}
    if times is not None and num is not None and den is not None:
        ratios = paired(times, num, den, factor)
        walls = paired(times.wall, num, den, factor)
        out.update(ratio=median(ratios), ratio_min=min(ratios), ratio_max=max(ratios), reps=len(ratios))
        out.update(wall_ratio=median(walls), wall_ratio_min=min(walls), wall_ratio_max=max(walls))
        result = result or f"**{median(ratios):.3f}x**"
    out["result"] = result or ""
    if times is not None:
        labels = show if show is not None else {k: k for k in (num, den) if k}
        out["times"] = {label: median(times[key]) * scale for key, label in labels.items()}
        out["wall_times"] = {label: median(times.wall[key]) * scale for key, label in labels.items()}
        out["raw_cpu"] = {key: [t * scale for t in times.cpu[key]] for key in labels}
        out["raw_wall"] = {key: [t * scale for t in times.wall[key]] for key in labels}
    return out


# ----- models and shared inputs -----------------------------------------------------------------------------------


@dataclass
class Target:
    """The model a section measures, with the sizes that fit it."""

    model: Any
    label: str
    layer: int  # the steered block: blocks.{layer}.hook_resid_post
    reps: int = 1  # repetitions multiplier
    inner: int = 1  # calls per timed repetition of a forward pass
    manifold_k: int = 32

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.hook_resid_post"

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)


def load_default() -> Target:
    import tl_steer

    return Target(tl_steer.load_default_model(), "default", layer=15)


def load_tiny(s: Settings) -> Target:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model  # the tiny models of the test suite

    # float32 like the default model (the tests use float64 for exact comparisons).
    return Target(
        make_model("llama", dtype=torch.float32), "tiny", layer=1, reps=s.tiny_scale, inner=s.tiny_inner, manifold_k=8
    )


def diffmean_vector(t: Target, tmp: Path) -> Any:
    """The DiffMean vector on the 100 sentiment train pairs at t.hook, computed once per run and model."""
    import tl_steer

    path = tmp / f"diffmean_{t.label}.safetensors"
    if path.is_file():
        return tl_steer.load(path, model=t.model)
    vector = tl_steer.diffmean(t.model, tl_steer.load_pairs("sentiment", "train"), t.hook)
    tl_steer.save(vector, path)
    return vector


def forward_tokens(t: Target, n: int) -> Any:
    """One sequence of n tokens of the sentiment test texts (prompt + positive completion)."""
    import tl_steer

    text = " ".join(p.prompt + p.positive for p in tl_steer.load_pairs("sentiment", "test"))
    tokens = t.model.to_tokens(text)[:, :n]
    assert tokens.shape[1] == n, f"only {tokens.shape[1]} tokens"
    return tokens


def maxrss_mib() -> float:
    """Peak resident memory of this process in MiB: getrusage's maxrss, or on Linux the kernel's VmHWM where
    it is lower (Linux carries the parent's maxrss across fork + exec, so a child started by a big process
    reports at least the parent's peak in ru_maxrss; VmHWM is the peak of this process's own memory)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm = proc_status_mib("VmHWM")
    return rss if hwm is None else min(rss, hwm)


def proc_status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ----- 1 and 6: steering overhead, and the peer library -----------------------------------------------------------


class PeerError(RuntimeError):
    pass


class Peer:
    """The peer worker process (its own venv); one JSON line per command and reply."""

    def __init__(self, python: Path, gguf: Path, log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), str(gguf)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=env,
        )
        self.info: dict[str, Any] = {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            tail = self.log.read_text().strip().splitlines()[-3:]
            raise PeerError(f"the worker exited (code {self.proc.returncode}): {' | '.join(tail)}")
        msg = json.loads(line)
        if not msg.get("ok"):
            raise PeerError(msg.get("error", "unknown error"))
        return msg

    def ready(self) -> dict[str, Any]:
        self.info = self._read()
        return self.info

    def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> float | None:
        try:
            return float(self.ask(op="exit")["maxrss_kib"]) / 1024
        except Exception:
            return None
        finally:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_peer(python: Path, tmp: Path) -> tuple[Peer | None, str | None]:
    """Start the worker early (it loads while tl_steer loads); (None, why) if it cannot even start."""
    if not python.exists():
        return None, (
            f"{python} does not exist: the peer venv was not built (make bench builds it from "
            "benchmarks/peer-requirements.txt; see its output for the pip error)"
        )
    from tl_steer.models import default_gguf_path

    return Peer(python, default_gguf_path(), tmp / "peer_worker.log"), None


def section_steer(t: Target, s: Settings, tmp: Path, peer_python: Path | None) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file, save_file

    import tl_steer

    peer, blocked = (None, "not run on this model") if peer_python is None else start_peer(peer_python, tmp)
    model = t.model
    vector = diffmean_vector(t, tmp)
    fwd = forward_tokens(t, s.fwd_tokens)
    gen = model.to_tokens(GEN_PROMPT)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    extra: dict[str, Any] = {}

    if peer is not None:
        try:
            info = peer.ready()
            extra["peer"] = {k: info[k] for k in ("versions", "model", "load_seconds")}
            save_file({"vector": vector.vector.detach().float().contiguous()}, str(tmp / "peer_vector.safetensors"))
            peer.ask(op="vector", path=str(tmp / "peer_vector.safetensors"), layer=t.layer)
        except PeerError as exc:
            blocked = f"the worker could not load the model or the vector: {exc}"
            peer.close()
            peer = None

    def tl_forward(steered: bool) -> Callable[[], Any]:
        def run() -> None:
            if steered:
                with tl_steer.steer(model, vector, m=1.0):
                    model(fwd)
            else:
                model(fwd)

        def loop() -> None:
            for _ in range(t.inner):
                run()

        return loop

    hooks = vector.hooks(1.0, model=model)

    def hooks_only() -> None:
        # TransformerLens' own hook context with the hooks built once: the per-pass cost of the hook alone.
        for _ in range(t.inner):
            with model.hooks(fwd_hooks=hooks):
                model(fwd)

    last: dict[str, Any] = {}

    def tl_generate(steered: bool, new: int) -> Callable[[], Any]:
        def run() -> None:
            kwargs = dict(max_new_tokens=new, do_sample=False, stop_at_eos=False, verbose=False)
            if steered:
                with tl_steer.steer(model, vector, m=1.0):
                    last["tl"] = model.generate(gen, **kwargs)
            else:
                model.generate(gen, **kwargs)

        return run

    def peer_call(op: str, steered: bool, new: int = 0) -> Callable[[], Any]:
        tokens = (fwd if op == "forward" else gen)[0].tolist()

        def run() -> Timed:
            assert peer is not None
            reply = peer.ask(op=op, tokens=tokens, steered=steered, m=1.0, new=new)
            if op == "generate" and steered:
                last["peer"] = reply["tokens"]
            return Timed(reply["seconds"], reply["cpu_seconds"])

        return run

    with torch.no_grad():
        fns = {"clean": tl_forward(False), "steered": tl_forward(True), "hooks only": hooks_only}
        if peer is not None:
            fns |= {"peer clean": peer_call("forward", False), "peer steered": peer_call("forward", True)}
        f_times = interleaved(fns, s.fwd_reps * t.reps)
        gens = {"clean": tl_generate(False, s.gen_new), "steered": tl_generate(True, s.gen_new)}
        warm = {"clean": tl_generate(False, 2), "steered": tl_generate(True, 2)}
        if peer is not None:
            gens |= {
                "peer clean": peer_call("generate", False, s.gen_new),
                "peer steered": peer_call("generate", True, s.gen_new),
            }
        g_times = interleaved(gens, s.gen_reps * t.reps, warmups=warm)

    show = {"clean": "clean", "steered": "steered"}
    per_call = 1.0 / t.inner
    rows.append(
        row(
            "steer",
            f"forward pass ({s.fwd_tokens} tokens), steered / clean",
            t.label,
            times=f_times,
            num="steered",
            den="clean",
            reference="goal <= 1.03",
            show=show,
            scale=per_call,
            note="DiffMean at m = 1, `steer()` entered and left in every call (checks, hooks on and off)",
        )
    )
    rows.append(
        row(
            "steer",
            f"forward pass ({s.fwd_tokens} tokens), hooks built once / clean",
            t.label,
            times=f_times,
            num="hooks only",
            den="clean",
            reference="goal <= 1.03",
            show={"hooks only": "hooks only"},
            scale=per_call,
            note="`with model.hooks(fwd_hooks=vector.hooks(1.0))`: the hook's own cost, without `steer()`'s checks",
        )
    )
    rows.append(
        row(
            "steer",
            f"greedy generation ({s.gen_new} new tokens, KV cache), steered / clean",
            t.label,
            times=g_times,
            num="steered",
            den="clean",
            reference="goal <= 1.03",
            show=show,
        )
    )

    if t.label == "default":
        # Where a TransformerLens forward pass spends its time: explains the peer comparison below.
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(fwd)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        copies = sum(e.self_cpu_time_total for e in events if e.key == "aten::copy_")
        rows.append(
            row(
                "steer",
                "share of a clean TransformerLens forward pass spent in `aten::copy_`",
                t.label,
                result=f"{copies / total:.2f}",
                reference="",
                note="torch.profiler, one pass: TransformerLens 3.x copies (transposes) weight matrices in every "
                "forward pass, the unembedding (49,152 x 576) included, whatever the sequence length",
            )
        )

    if t.label != "default":
        return {"rows": rows, "notes": notes, "extra": extra}
    if peer is None:
        rows.append(row("peer", "steering-vectors on the Hugging Face model", t.label, result=f"blocked: {blocked}"))
        return {"rows": rows, "notes": notes, "extra": extra}

    # Agreement of the steered logits (and of the clean ones: the two implementations of the model).
    with torch.no_grad():
        clean_tl = model(fwd)[0].float()
        with tl_steer.steer(model, vector, m=1.0):
            steered_tl = model(fwd)[0].float()
    path = tmp / "peer_logits.safetensors"
    peer.ask(op="logits", tokens=fwd[0].tolist(), m=1.0, path=str(path))
    theirs = load_file(str(path))
    d_steered = float((theirs["steered"] - steered_tl).abs().max())
    d_clean = float((theirs["clean"] - clean_tl).abs().max())
    effect = float((steered_tl - clean_tl).abs().max())
    same_tokens = last.get("tl") is not None and last["tl"][0, gen.shape[1] :].tolist() == last.get("peer")
    extra["peer"]["maxrss_mib"] = peer.close()
    pshow = {"peer clean": "peer clean", "peer steered": "peer steered"}
    rows += [
        row(
            "peer",
            f"forward pass ({s.fwd_tokens} tokens), peer steered / peer clean",
            t.label,
            times=f_times,
            num="peer steered",
            den="peer clean",
            show=pshow,
            note="steering-vectors' own overhead, `SteeringVector.apply()` entered and left in every call",
        ),
        row(
            "peer",
            f"greedy generation ({s.gen_new} new tokens), peer steered / peer clean",
            t.label,
            times=g_times,
            num="peer steered",
            den="peer clean",
            show=pshow,
        ),
        row(
            "peer",
            "forward pass, peer steered / tl_steer steered",
            t.label,
            times=f_times,
            num="peer steered",
            den="steered",
            show={"peer steered": "peer steered", "steered": "tl_steer steered"},
            note=f"clean / clean: {median(paired(f_times, 'peer clean', 'clean')):.3f}x (Hugging Face against "
            "TransformerLens, no steering)",
        ),
        row(
            "peer",
            f"greedy generation ({s.gen_new} new tokens), peer steered / tl_steer steered",
            t.label,
            times=g_times,
            num="peer steered",
            den="steered",
            show={"peer steered": "peer steered", "steered": "tl_steer steered"},
            note=f"clean / clean: {median(paired(g_times, 'peer clean', 'clean')):.3f}x; the same {s.gen_new} "
            f"steered tokens: {'yes' if same_tokens else 'no'}",
        ),
        row(
            "peer",
            "steered logits, max |peer - tl_steer|",
            t.label,
            result=f"{d_steered:.2e}",
            reference=f"clean logits: {d_clean:.2e}",
            note=f"{s.fwd_tokens} positions x 49,152; steering moves the logits by up to {effect:.2f}. Vector and "
            "logits exchanged as safetensors files",
        ),
    ]
    return {"rows": rows, "notes": notes, "extra": extra}


# ----- 2: preference-utility sweep --------------------------------------------------------------------------------


def section_sweep(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    """The procedure of benchmarks/preference_utility_speed.py (naive and cached paths of
    tl_steer.preference_utility on the same pairs and 9 strengths), interleaved and with fewer pairs. That
    script keeps its logic inside main() and writes its own results file, so it is not imported."""
    import numpy as np
    import torch

    import tl_steer

    model = t.model
    vector = diffmean_vector(t, tmp)
    pairs = tl_steer.load_pairs("sentiment", "test")[: s.sweep_pairs]
    ms = np.linspace(-4, 4, 9)
    tables: dict[bool, Any] = {}

    def run(cached: bool, items: list[Any]) -> Callable[[], None]:
        def go() -> None:
            result = tl_steer.preference_utility(model, vector, items, ms, cache_prefix=cached, progress=False)
            tables[cached] = result.table[["L_p", "L_n"]].to_numpy()

        return go

    with torch.no_grad():
        times = interleaved(
            {"naive": run(False, pairs), "cached": run(True, pairs)},
            s.sweep_reps * t.reps,
            warmups={"naive": run(False, pairs[:1]), "cached": run(True, pairs[:1])},
        )
    diff = float(np.abs(tables[False] - tables[True]).max())
    n_layers, layer = t.n_layers, vector.first_layer(t.n_layers)
    # the unembedding only at the positions that predict a completion token, against the full logits
    from unittest import mock

    from tl_steer.analysis import preference_utility as pu_module

    def logits(full: bool, items: list[Any]) -> Callable[[], None]:
        def go() -> None:
            with mock.patch.object(pu_module, "scores_from_final", lambda *a: False) if full else nullcontext():
                result = tl_steer.preference_utility(model, vector, items, ms, progress=False)
            tables[full] = result.table[["L_p", "L_n"]].to_numpy()

        return go

    with torch.no_grad():
        unembed = interleaved(
            {"full": logits(True, pairs), "scored": logits(False, pairs)},
            s.sweep_reps * t.reps,
            warmups={"full": logits(True, pairs[:1]), "scored": logits(False, pairs[:1])},
        )
    unembed_diff = float(np.abs(tables[True] - tables[False]).max())
    theory = 9 / (layer / n_layers + 9 * (n_layers - layer) / n_layers)
    tokens = sum(len(model.to_tokens(p.prompt + c)[0]) for p in pairs for c in (p.positive, p.negative))
    return {
        "rows": [
            row(
                "sweep",
                f"9 strengths at layer {layer} of {n_layers}: naive full forward per strength / cached prefix",
                t.label,
                times=times,
                num="naive",
                den="cached",
                reference=f"theory 9 / ({layer}/{n_layers} + 9 x {n_layers - layer}/{n_layers}) = {theory:.2f}x",
                note=f"{len(pairs)} sentiment test pairs ({2 * len(pairs)} sequences, {tokens} tokens), one batch; "
                f"max |NLL difference| between the paths {diff:.1e}",
            ),
            row(
                "sweep",
                "9 strengths, cached prefix: unembedding only the positions that predict a completion token / "
                "the full logits",
                t.label,
                times=unembed,
                num="scored",
                den="full",
                note=f"the same pairs; max |NLL difference| between the paths {unembed_diff:.1e}",
            ),
        ]
    }


# ----- 3: COLD ----------------------------------------------------------------------------------------------------


def forward_backward(model: Any, examples: list[Any]) -> Callable[[], None]:
    """The reference of the COLD set-up: every example's forward and backward pass to all parameters (the
    DPO loss of COLD, both completions of a pair, in COLD's own batches of 8 examples)."""
    import torch

    from tl_steer.methods.cold import _batches, _groups, _losses, _tokenize, completion_logprob, prepare_examples

    ex = prepare_examples(examples)
    data = _tokenize(model, ex, False)

    def run() -> None:
        with torch.enable_grad():
            for b in _batches(model, ex, data, _groups(ex, data, 8)):
                logits = model(b.tokens)
                loss = _losses(completion_logprob(logits, b.tokens, b.starts, b.lengths), ex.loss, 0.1).sum()
                loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def section_cold(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    import torch

    import tl_steer
    from tl_steer.methods.cold import fd_blocks

    model = t.model
    examples = tl_steer.load_pairs("sentiment", "train")[: s.cold_n]
    built: dict[str, Any] = {}

    def setup(kind: str, items: list[Any]) -> Callable[[], None]:
        def run() -> None:
            if kind == "kernel":
                built[kind] = tl_steer.cold_kernel(model, items, t.hook)
            else:
                # eps = 1e-3: the published 1e-6 loses part of the perturbation to fp32 rounding (and warns).
                built[kind] = tl_steer.cold_fd(model, items, t.hook, fd_method="fd", eps=1e-3)

        return run

    fns = {
        "kernel": setup("kernel", examples),
        "fd": setup("fd", examples),
        "fwd-bwd": forward_backward(model, examples),
    }
    warm = {"kernel": setup("kernel", examples[:1]), "fd": setup("fd", examples[:1])}
    warm["fwd-bwd"] = forward_backward(model, examples[:1])
    set_times = interleaved(fns, s.cold_setup_reps * t.reps, warmups=warm)
    # The set-up is the same for both methods: the jvp form is the fd one with another fd_method.
    iv_fd = built["fd"]
    iv_jvp = tl_steer.ColdFD(
        iv_fd.hook,
        iv_fd.grads,
        embed_index=iv_fd.embed_index,
        embed_grad=iv_fd.embed_grad,
        pos_grad=iv_fd.pos_grad,
        eta=iv_fd.eta,
        eps=iv_fd.eps,
        fd_method="jvp",
        n_blocks=iv_fd.n_blocks,
        d_model=iv_fd.d_model,
        positions=iv_fd.positions,
        info=iv_fd.info,
        model_identity=iv_fd.model_identity,
    )
    fwd = forward_tokens(t, s.fwd_tokens)

    def plain() -> None:
        for _ in range(t.inner):
            model(fwd)

    def steered(iv: Any) -> Callable[[], None]:
        def run() -> None:
            for _ in range(t.inner):
                with tl_steer.steer(model, iv, m=1.0):
                    model(fwd)

        return run

    with torch.no_grad():
        inf_times = interleaved(
            {"plain": plain, "fd": steered(iv_fd), "jvp": steered(iv_jvp)}, s.cold_inf_reps * t.reps
        )
    blocks = fd_blocks(model, t.hook)
    theory = (1 + blocks / t.n_layers) / 2
    n = len(examples)
    ref = f"{n} forward-backward passes"
    per_call = 1.0 / t.inner
    return {
        "rows": [
            row(
                "cold",
                f"COLD-FD (fd) forward pass ({s.fwd_tokens} tokens) / two plain forward passes",
                t.label,
                times=inf_times,
                num="fd",
                den="plain",
                factor=2.0,
                reference=f"theory (1 + {blocks}/{t.n_layers}) / 2 = {theory:.2f}x",
                show={"fd": "COLD-FD fd", "plain": "one plain pass"},
                scale=per_call,
                note=f"the perturbed pass runs {blocks} of {t.n_layers} blocks; `steer()` entered in every call "
                "(the perturbed parameters are built once per entry)",
            ),
            row(
                "cold",
                f"COLD-FD (jvp) forward pass ({s.fwd_tokens} tokens) / two plain forward passes",
                t.label,
                times=inf_times,
                num="jvp",
                den="plain",
                factor=2.0,
                reference="(forward-mode AD through the same blocks)",
                show={"jvp": "COLD-FD jvp", "plain": "one plain pass"},
                scale=per_call,
            ),
            row(
                "cold",
                f"COLD-Kernel set-up, N = {n} pairs / {n} forward-backward passes",
                t.label,
                times=set_times,
                num="kernel",
                den="fwd-bwd",
                reference="< 1: backward stops at the hook, no weight gradients",
                show={"kernel": "COLD-Kernel", "fwd-bwd": ref},
                note="reference: DPO loss of every pair (both completions), COLD's batches, backward to all parameters",
            ),
            row(
                "cold",
                f"COLD-FD set-up, N = {n} pairs / {n} forward-backward passes",
                t.label,
                times=set_times,
                num="fd",
                den="fwd-bwd",
                reference=f"gradients of the parameters of {blocks} of {t.n_layers} blocks and the embedding",
                show={"fd": "COLD-FD", "fwd-bwd": ref},
                note="includes the token-recovery check",
            ),
        ]
    }


# ----- 4: SPLIT / SFT training ------------------------------------------------------------------------------------


def section_train(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    import torch

    import tl_steer
    from tl_steer.methods.split import FORMS
    from tl_steer.scoring import pad_right, pad_token_id, tokenize_completions

    model = t.model
    pairs = tl_steer.load_pairs("sentiment", "train")[: s.train_pairs]
    data = tokenize_completions(
        model, [p.prompt for p in pairs] * 2, [p.positive for p in pairs] + [p.negative for p in pairs]
    )
    n_tokens = sum(len(seq) for seq in data.sequences)
    n_params: dict[str, int] = {}

    def train(objective: str, form: str, items: list[Any]) -> Callable[[], None]:
        fn = tl_steer.split if objective == "split" else tl_steer.sft

        def run() -> None:
            iv, _ = fn(model, items, t.layer, form, epochs=1, batch_size=8, progress=False, seed=0)
            n_params[form] = sum(v.numel() for v in iv.tensors().values())

        return run

    def clean_forward() -> None:
        # The same sequences in batches of 16 (8 pairs x 2 completions, as the trainer batches them).
        with torch.no_grad():
            for i in range(0, len(data.sequences), 16):
                model(pad_right(data.sequences[i : i + 16], pad_token_id(model), "cpu"))

    fns: dict[str, Callable[[], Any]] = {"forward": clean_forward}
    warm: dict[str, Callable[[], Any]] = {}
    for objective in ("split", "sft"):
        for form in FORMS:
            fns[f"{objective} {form}"] = train(objective, form, pairs)
            warm[f"{objective} {form}"] = train(objective, form, pairs[:8])
    times = interleaved(fns, s.train_reps * t.reps, warmups=warm)
    rows = []
    for objective in ("split", "sft"):
        for form in FORMS:
            key = f"{objective} {form}"
            epoch = median(times[key])
            rows.append(
                row(
                    "train",
                    f"{objective.upper()} {form}: one epoch / clean forward passes over the same data",
                    t.label,
                    times=times,
                    num=key,
                    den="forward",
                    show={key: "epoch", "forward": "clean forward"},
                    note=f"{len(pairs)} pairs, {n_tokens} tokens, batch 8 pairs, {n_params.get(form, 0):,} "
                    f"parameters; {n_tokens / epoch:.0f} tokens per CPU second",
                )
            )
    return {"rows": rows}


# ----- 5: manifold probe ------------------------------------------------------------------------------------------


def section_manifold(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    import torch

    import tl_steer
    from tl_steer.analysis.manifold import _stop_layer, _token_lists
    from tl_steer.scoring import batches, pad_right, pad_token_id

    sys.path.insert(0, str(BENCH))
    from manifold_probe import capture_pass, fit_texts  # the procedure of benchmarks/manifold_probe.py

    model = t.model
    every = fit_texts()
    texts = every[:: max(1, len(every) // s.fit_texts)][: s.fit_texts]  # all three concepts
    sequences = _token_lists(model, texts)
    n_tokens = sum(len(q) for q in sequences)
    stop = _stop_layer(model, [t.hook])
    probes: list[Any] = []

    def fit(items: list[str]) -> Callable[[], None]:
        def run() -> None:
            probes[:] = [tl_steer.ManifoldProbe.fit(model, items, t.hook, k=t.manifold_k, batch_size=8, progress=False)]

        return run

    fit_times = interleaved(
        {"fit": fit(texts), "capture": lambda: capture_pass(model, sequences, t.hook, 8, stop)},
        s.manifold_reps * t.reps,
        warmups={"fit": fit(texts[:8]), "capture": lambda: capture_pass(model, sequences[:8], t.hook, 8, stop)},
    )
    probe = probes[0]
    state = probe.stats[t.hook]
    test = tl_steer.load_pairs("sentiment", "test")[: s.score_pairs]
    test_seqs = _token_lists(model, [p.prompt + c for p in test for c in (p.positive, p.negative)])
    lengths = [len(q) for q in test_seqs]
    groups = batches(lengths, 16)
    acts = capture_pass(model, test_seqs, t.hook, 16, stop)
    rows_ = torch.cat([a[r, 1 : lengths[i]] for a, idx in zip(acts, groups, strict=True) for r, i in enumerate(idx)])

    def full_forward() -> None:
        with torch.no_grad():
            for idx in groups:
                model(pad_right([test_seqs[i] for i in idx], pad_token_id(model), "cpu"))

    score_times = interleaved(
        {"score": lambda: probe.distances(rows_, t.hook), "forward": full_forward}, s.manifold_reps * t.reps * 2
    )
    fit_s = median(fit_times["fit"])
    return {
        "rows": [
            row(
                "manifold",
                "probe fit / capture pass alone (same texts and batches)",
                t.label,
                times=fit_times,
                num="fit",
                den="capture",
                result=None,
                show={"fit": "fit", "capture": "capture"},
                note=f"**{n_tokens / fit_s:.0f} tokens per CPU second** fitted ({len(texts)} texts, {n_tokens} tokens, "
                f"{state.n} reference tokens kept, k = {probe.k}); the capture pass stops at block {stop}",
            ),
            row(
                "manifold",
                "scoring all distances / full forward pass (with logits) over the same texts",
                t.label,
                times=score_times,
                num="score",
                den="forward",
                show={"score": "scoring", "forward": "forward"},
                note=f"{len(rows_)} tokens of {len(test_seqs)} sentiment test texts (position 0 excluded)",
            ),
        ]
    }


def section_generation(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    """tl_steer.generate on 8 held-out sentiment prompts in one left-padded batch (KV cache, greedy), steered
    by the DiffMean vector at m = 1 against the same call on the clean model (issue 17: goal <= 1.05x)."""
    import tl_steer

    model = t.model
    vector = diffmean_vector(t, tmp)
    prompts = tl_steer.load_prompts("sentiment", "test")[:8]
    n_new = s.gen_new

    steps: dict[float, int] = {}

    def run(m: float) -> Callable[[], Any]:
        def call() -> None:
            table = tl_steer.generate(model, vector, prompts, [m], max_new_tokens=n_new, batch_size=8)
            # A batch runs until its last row ends (EOS or n_new): the longest text sets the decoding steps.
            steps[m] = int(table["n_tokens"].max())

        return call

    times = interleaved({"steered": run(1.0), "clean": run(0.0)}, s.gen_reps * t.reps)
    return {
        "rows": [
            row(
                "generation",
                f"batched generation of {len(prompts)} prompts (<= {n_new} new tokens, KV cache), steered / clean",
                t.label,
                times=times,
                num="steered",
                den="clean",
                reference="goal <= 1.05x",
                note=f"tl_steer.generate, DiffMean at m = 1 vs m = 0 (m = 0 installs no hook); decoding steps "
                f"{steps[1.0]} steered, {steps[0.0]} clean (a batch stops when every row has reached EOS)",
            )
        ]
    }


def section_adaptive(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    """A forward pass steered by each adaptive form at m = 1 (projection clamp, probe-budgeted addition,
    rotation, conditional DiffMean; tl_steer.methods.adaptive) against the clean pass (issue 18: goal
    <= 1.05x), all back to back; fitted on the first s.train_pairs sentiment train pairs."""
    import torch

    import tl_steer
    from tl_steer.methods import adaptive

    model = t.model
    pairs = tl_steer.load_pairs("sentiment", "train")[: s.train_pairs]
    acts = adaptive.concept_activations(model, pairs, t.hook)
    base = diffmean_vector(t, tmp)
    texts = [p.prompt + c for p in pairs for c in (p.positive, p.negative)]
    probe = tl_steer.ManifoldProbe.fit(model, texts, t.hook, k=t.manifold_k, progress=False)
    forms = {
        "clamp": adaptive.projection_clamp(model, None, t.hook, base=base, activations=acts),
        "budget": adaptive.budgeted_addition(model, None, t.hook, probe, q=0.99, base=base, activations=acts),
        "rotation": adaptive.rotation(model, None, t.hook, base=base, activations=acts),
        "conditional": adaptive.conditional(
            base, adaptive.condition_probe(model, None, t.hook, activations=acts, fires_on="negative")
        ),
    }
    fwd = forward_tokens(t, s.fwd_tokens)

    def forward(iv: Any) -> Callable[[], None]:
        def run() -> None:
            for _ in range(t.inner):
                if iv is None:
                    model(fwd)
                else:
                    with tl_steer.steer(model, iv, m=1.0):
                        model(fwd)

        return run

    with torch.no_grad():
        times = interleaved({"clean": forward(None)} | {k: forward(v) for k, v in forms.items()}, s.fwd_reps * t.reps)
    return {
        "rows": [
            row(
                "adaptive",
                f"forward pass ({s.fwd_tokens} tokens), {name} at m = 1 / clean",
                t.label,
                times=times,
                num=name,
                den="clean",
                reference="goal <= 1.05x",
                show={name: name, "clean": "clean"},
                scale=1.0 / t.inner,
                note=f"`steer()` entered and left in every call; the hook at block {t.layer} of {t.n_layers}",
            )
            for name in forms
        ]
    }


# ----- 9: layer sweep and multiple-choice scoring --------------------------------------------------------------


def section_layers(t: Target, s: Settings, tmp: Path) -> dict[str, Any]:
    """tl_steer.layer_sweep's scoring (one clean pass per batch, every layer's suffix per strength) against
    preference_utility run separately per layer (each with its own cached prefix): every layer of the model,
    9 strengths, DiffMean vectors from one pass; and multiple-choice scoring with the question prefix shared
    (KV cache, unembedding only at scored positions) against full question + option sequences."""
    import numpy as np
    import torch

    import tl_steer
    from tl_steer.analysis.layer_sweep import _sweep_layers, diffmean_layers, layer_count
    from tl_steer.analysis.preference_utility import _tokenize_pairs

    model, n_layers = t.model, t.n_layers
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]
    built = diffmean_layers(model, tl_steer.load_pairs("sentiment", "train")[:16], hooks)
    ivs = {layer: built[h] for layer, h in enumerate(hooks)}
    pairs = tl_steer.load_pairs("sentiment", "test")[: s.sweep_pairs]
    grid = [float(m) for m in np.linspace(-4, 4, 9)]

    def sweep(items: list[Any]) -> Callable[[], None]:
        data = _tokenize_pairs(model, items, False)
        return lambda: _sweep_layers(model, ivs, data, grid, "mean", 16, False, "")

    def separate(items: list[Any]) -> Callable[[], None]:
        def run() -> None:
            for iv in ivs.values():
                tl_steer.preference_utility(model, iv, items, grid, progress=False)

        return run

    with torch.no_grad():
        times = interleaved(
            {"sweep": sweep(pairs), "separate": separate(pairs)},
            s.sweep_reps * t.reps,
            warmups={"sweep": sweep(pairs[:1]), "separate": separate(pairs[:1])},
        )
    blocks, blocks_sep = layer_count(n_layers, [iv.first_layer(n_layers) for iv in ivs.values()], len(grid) - 1)
    rows = [
        row(
            "layers",
            f"layer sweep, all {n_layers} layers x 9 strengths: one clean pass per batch / separate cached-prefix "
            "sweeps",
            t.label,
            times=times,
            num="sweep",
            den="separate",
            reference=f"goal <= 0.95x; block count {blocks}/{blocks_sep} = {blocks / blocks_sep:.2f}x",
            note=f"{len(pairs)} sentiment test pairs, DiffMean at every resid_post from one pass",
        )
    ]
    items = tl_steer.load_mc_items("general")[: s.mc_questions]
    vector = ivs[t.layer]

    def mc(shared: bool, subset: list[Any]) -> Callable[[], None]:
        return lambda: tl_steer.mc_option_nll(model, subset, interventions=[vector], m=1.0, shared_prefix=shared)

    with torch.no_grad():
        times = interleaved(
            {"shared": mc(True, items), "full": mc(False, items)},
            s.sweep_reps * t.reps,
            warmups={"shared": mc(True, items[:2]), "full": mc(False, items[:2])},
        )
    fast = tl_steer.mc_option_nll(model, items, interventions=[vector], shared_prefix=True)
    slow = tl_steer.mc_option_nll(model, items, interventions=[vector], shared_prefix=False)
    finite = torch.isfinite(slow)  # inf marks the missing options of items with fewer
    diff = float((fast[finite] - slow[finite]).abs().max())
    rows.append(
        row(
            "layers",
            f"multiple choice, {len(items)} questions steered at m = 1: shared question prefix / full sequences",
            t.label,
            times=times,
            num="shared",
            den="full",
            reference="goal <= 0.6x",
            note=f"built-in general set; max |NLL difference| between the paths {diff:.1e}",
        )
    )
    # the gap's later scorings of the same items: the clean blocks before the steered one kept once
    from tl_steer.analysis.capability import MCCleanPrefix, restart_layer

    clean = MCCleanPrefix(model, restart_layer(vector, n_layers))
    kept = tl_steer.mc_option_nll(model, items, interventions=[vector], clean_prefix=clean)  # fills it

    def mc_clean(keep: bool, m: float = 1.0) -> Callable[[], None]:
        extra = {"clean_prefix": clean} if keep else {}
        return lambda: tl_steer.mc_option_nll(model, items, interventions=[vector], m=m, **extra)

    with torch.no_grad():
        times = interleaved({"kept": mc_clean(True), "shared": mc_clean(False)}, s.sweep_reps * t.reps)
    diff = float((kept[finite] - fast[finite]).abs().max())
    rows.append(
        row(
            "layers",
            f"multiple choice, {len(items)} questions steered at m = 1, the items scored before at this layer: "
            "clean blocks kept (MCCleanPrefix) / shared question prefix",
            t.label,
            times=times,
            num="kept",
            den="shared",
            reference=f"block count {n_layers - clean.start}/{n_layers} = {(n_layers - clean.start) / n_layers:.2f}x",
            note=f"the capability-behaviour gap's 2nd and later scorings; max |NLL difference| {diff:.1e}",
        )
    )
    return {"rows": rows}


# ----- running a section in this process --------------------------------------------------------------------------


def run_section(name: str, s: Settings, tmp: Path, peer_python: Path | None) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    start = time.perf_counter()
    funcs = {
        "sweep": section_sweep,
        "cold": section_cold,
        "train": section_train,
        "manifold": section_manifold,
        "generation": section_generation,
        "adaptive": section_adaptive,
        "layers": section_layers,
    }
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    if name == "bridge":  # loads its own three copies of the default model: benchmarks/bridge_generation.py
        sys.path.insert(0, str(BENCH))
        import bridge_generation

        measured_bridge = bridge_generation.measure(quick=s == QUICK)
        rows += bridge_generation.rows_for_bench(measured_bridge)
        extra = {"bridge": {k: v for k, v in measured_bridge.items() if k != "generation"}}
        return {
            "section": name,
            "model": "default",
            "rows": rows,
            "extra": extra,
            "memory": {"peak_with_load_mib": maxrss_mib()},
            "wall_s": time.perf_counter() - start,
            "torch_threads": torch.get_num_threads(),
        }
    if name == "tiny":
        t = load_tiny(s)
        rows += section_steer(t, s, tmp, None)["rows"]
        for sec in funcs.values():
            rows += sec(t, s, tmp)["rows"]
        memory = {}
    else:
        t = load_default()
        gc.collect()
        memory = {"resident_after_load_mib": proc_status_mib("VmRSS"), "peak_with_load_mib": maxrss_mib()}
        measured = reset_peak()  # from here on VmHWM is the peak of the section's own work (model resident)
        out = section_steer(t, s, tmp, peer_python) if name == "steer" else funcs[name](t, s, tmp)
        rows += out["rows"]
        extra = out.get("extra", {})
        # After the reset both VmHWM and ru_maxrss restart from the current RSS: the load's peak was read before.
        memory["peak_section_mib"] = proc_status_mib("VmHWM") if measured else None
        memory["peak_with_load_mib"] = max(memory["peak_with_load_mib"], maxrss_mib())
    return {
        "section": name,
        "model": t.label,
        "rows": rows,
        "extra": extra,
        "memory": memory,
        "wall_s": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }


# ----- report -----------------------------------------------------------------------------------------------------


def fmt_times(r: dict[str, Any]) -> str:
    def one(v: float) -> str:
        return f"{v * 1000:.2f} ms" if v < 0.1 else f"{v:.2f} s"

    return ", ".join(f"{k} {one(v)}" for k, v in r.get("times", {}).items())


def fmt_reps(r: dict[str, Any]) -> str:
    if "reps" not in r:
        return ""
    return f"{r['reps']} [{r['ratio_min']:.3f}-{r['ratio_max']:.3f}]"


def version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(results: list[dict[str, Any]], header: dict[str, Any], quick: bool) -> str:
    lines = [
        f"# tl_steer performance ({header['date']}{', --quick' if quick else ''})",
        "",
        f"Machine: {header['machine']}, {header['cores']} cores, CPU only; torch threads {header['threads']} in "
        f"every process; load average at start {header['load_start']} (1, 5, 15 min), at end {header['load_end']}. "
        f"Python {header['python']}, torch {header['torch']}, transformer-lens {header['transformer_lens']}, "
        f"transformers {header['transformers']}. Total wall time {header['wall_s'] / 60:.1f} min.",
        "",
        "Each ratio is the median over repetitions of a paired ratio of CPU times (the two sides run back to back "
        "in each repetition, in alternating order, after a warm-up; one torch thread, so CPU time is the work "
        "done, without the time spent waiting for a core that other jobs hold); the reps column gives the number "
        "of repetitions and the range of the paired ratios; the wall-clock ratio is the same median on wall "
        "times. Median CPU times alongside (wall times in bench.json). Method: `benchmarks/README.md`. "
        "Default model: SmolLM2-135M-Instruct (30 layers, "
        "float32, CPU), DiffMean on the 100 sentiment train pairs at `blocks.15.hook_resid_post`, m = 1; tiny: "
        "a random 3-layer Llama-style HookedTransformer (d_model 32, float32), steered at `blocks.1.hook_resid_post`.",
        "",
        "| section | measurement | model | result | wall-clock ratio | reference | median CPU times | reps [range] "
        "| notes |",
        "|---|---|---|---:|---:|---|---|---|---|",
    ]
    all_rows = [r for res in results for r in res.get("rows", [])]
    for sec in TITLES:  # every section in its numbered order
        for r in sorted((r for r in all_rows if r["section"] == sec), key=lambda r: r["model"] != "default"):
            wall = f"{r['wall_ratio']:.3f}x" if "wall_ratio" in r else ""
            cells = [TITLES[sec], r["what"], r["model"], r["result"], wall, r["reference"], fmt_times(r), fmt_reps(r)]
            cells.append(r["note"])
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    for res in results:
        if res.get("error"):
            lines.append(f"| {res['section']} | failed | | {res['error']} | | | | | |")
    lines += [
        "",
        "Memory of each default-model section, run in its own subprocess (MiB): resident right after loading the "
        "model; the peak during the section's own work (the kernel's peak counter reset after the load, so the "
        "model's resident weights are included but the load's transient peak is not); and the peak of the whole "
        "process, load included (`resource.getrusage` maxrss).",
        "",
        "| subprocess | model | resident after load | peak of the section's work | peak with the load | wall (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def mib(v: float | None) -> str:
        return "" if v is None else f"{v:.0f}"

    for res in results:
        mem = res.get("memory", {})
        if mem:
            lines.append(
                f"| {res['section']} | {res.get('model', '')} | {mib(mem.get('resident_after_load_mib'))} | "
                f"{mib(mem.get('peak_section_mib'))} | {mib(mem.get('peak_with_load_mib'))} | "
                f"{res.get('wall_s', 0):.0f} |"
            )
        peer = res.get("extra", {}).get("peer")
        if peer and peer.get("maxrss_mib"):
            v = peer["versions"]
            lines.append(
                f"| steer: peer worker (steering-vectors {v['steering-vectors']}, transformers {v['transformers']}, "
                f"torch {v['torch']}) | default, Hugging Face {peer['model']} | | | {peer['maxrss_mib']:.0f} | |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller inputs (about 6 min)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--peer-python", default=str(DEFAULT_PEER_PYTHON), help="python of the peer venv")
    parser.add_argument("--out", default=str(BENCH / "results" / "bench.md"))
    parser.add_argument("--run-section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL

    if args.run_section:  # a child process
        try:
            out = run_section(args.run_section, settings, Path(args.tmp), Path(args.peer_python))
        except Exception as exc:
            traceback.print_exc()
            out = {"section": args.run_section, "error": f"{type(exc).__name__}: {exc}", "rows": []}
        Path(args.json).write_text(json.dumps(out, indent=1))
        return

    load_start = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.perf_counter()
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="tl_steer_bench_") as tmp:
        for name in args.sections:
            print(f"[bench] {name} ...", flush=True)
            t0 = time.perf_counter()
            out_json = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-section", name, "--json", str(out_json)]
            cmd += ["--tmp", tmp, "--peer-python", args.peer_python] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, env=env, cwd=ROOT)
            if out_json.is_file():
                res = json.loads(out_json.read_text())
            else:
                res = {"section": name, "error": f"the subprocess exited with code {proc.returncode}", "rows": []}
            results.append(res)
            for r in res.get("rows", []):
                print(f"  {r['model']:8s} {r['what']}: {r['result']}  {fmt_times(r)}", flush=True)
            if res.get("error"):
                print(f"  FAILED: {res['error']}", flush=True)
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    header = {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "threads": ", ".join(sorted({str(r.get("torch_threads", "?")) for r in results if "torch_threads" in r})),
        "load_start": load_start,
        "load_end": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformer_lens": version("transformer-lens"),
        "transformers": version("transformers"),
        "wall_s": time.perf_counter() - start,
    }
    text = report(results, header, args.quick)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "results": results}, indent=1))
    print(text)
    if any(res.get("error") for res in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
