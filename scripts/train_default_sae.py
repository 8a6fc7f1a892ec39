"""Train the default SAE of tl_steer with sae-lens' own training runner, offline, on CPU.

A TopK sparse autoencoder (d_sae 2304 = 4 x d_model, k 64) on ``blocks.15.hook_resid_post`` of the default
model (SmolLM2-135M-Instruct, loaded by ``tl_steer.load_default_model()``), trained on the corpus that
``scripts/build_sae_corpus.py`` writes (see its docstring for sources and licences). The SAE is saved in
sae-lens' disk format (``cfg.json`` + ``sae_weights.safetensors``, fp32) into
``tl_steer/data/sae/smollm2-135m-res-15/``, where ``tl_steer.load_default_sae()`` reads it.

Token handling, because this model's activations demand it: every 128-token row starts with the BOS token
(``<|im_start|>``) and documents are joined by it too. The residual stream at the first position of a row
is an attention sink with a norm about 100x the typical one, and the second position is sometimes one as
well, so training skips the first two positions of each row (sae-lens ``seqpos_slice=(2, None)``) and every
special token (``exclude_special_tokens``). ``tl_steer.analysis.sae_quality`` scores the same positions.

After training, the saved SAE is read back with ``SAE.load_from_disk`` and scored on the held-out part of
the corpus; the numbers are printed as JSON (they go into ``benchmarks/results/default_sae.md``).

    python scripts/build_sae_corpus.py
    python scripts/train_default_sae.py                 # about 20 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tl_steer" / "data" / "sae" / "smollm2-135m-res-15"
CONTEXT_SIZE = 128
# Leading positions of a row that training and scoring skip: the BOS sink and the position after it.
SKIP_FIRST = 2


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def token_rows(tokenizer: Any, docs: list[dict[str, Any]], *, seed: int) -> torch.Tensor:
    """Documents tokenized, joined by BOS and cut into rows of CONTEXT_SIZE that each begin with BOS.

    Uses sae-lens' own packing (the one it applies to untokenized datasets), in a seeded document order.
    """
    from sae_lens.tokenization_and_batching import concat_and_batch_sequences

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    bos = tokenizer.bos_token_id
    # The chat-form documents carry their special tokens as text; the tokenizer maps them to their ids.
    seqs = (torch.tensor(tokenizer(docs[i]["text"], add_special_tokens=False).input_ids) for i in order)
    rows = list(
        concat_and_batch_sequences(
            tokens_iterator=seqs,
            context_size=CONTEXT_SIZE,
            begin_batch_token_id=bos,
            sequence_separator_token_id=bos,
        )
    )
    return torch.stack(rows)


def build_runner_config(args: argparse.Namespace, model: Any, output_path: str) -> Any:
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig

    steps = args.training_tokens // args.batch_tokens
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(
            d_in=model.cfg.d_model,
            d_sae=args.d_sae,
            k=args.k,
            dtype="float32",
            device="cpu",
            # Scales inputs to norm sqrt(d_in) while training; the factor is folded into the saved weights.
            normalize_activations="expected_average_only_in",
        ),
        model_name=str(model.cfg.model_name),
        hook_name=args.hook,
        dataset_path="tl_steer/scripts/build_sae_corpus.py",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=CONTEXT_SIZE,
        prepend_bos=True,
        seqpos_slice=(SKIP_FIRST, None),
        exclude_special_tokens=sorted(model.tokenizer.all_special_ids),
        sequence_separator_token="bos",
        training_tokens=args.training_tokens,
        train_batch_size_tokens=args.batch_tokens,
        store_batch_size_prompts=16,
        # A buffer of ~32 training batches: enough shuffling across rows and documents.
        n_batches_in_buffer=max(1, 32 * args.batch_tokens // (CONTEXT_SIZE - SKIP_FIRST)),
        n_batches_for_norm_estimate=20,
        lr=args.lr,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=max(1, steps // 20),
        lr_end=args.lr / 10,
        # TopK's auxiliary loss counts a latent dead after this many steps without firing.
        dead_feature_window=max(10, steps // 10),
        feature_sampling_window=max(10, steps // 5),
        device="cpu",
        dtype="float32",
        seed=args.seed,
        # What the HookedTransformer was loaded with (tl_steer loads the default model unprocessed).
        model_from_pretrained_kwargs={
            "fold_ln": False,
            "center_writing_weights": False,
            "center_unembed": False,
            "fold_value_biases": False,
        },
        logger=LoggingConfig(log_to_wandb=False),
        n_checkpoints=0,
        checkpoint_path=None,
        output_path=output_path,
        verbose=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="folder of build_sae_corpus.py's output")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--hook", default="blocks.15.hook_resid_post")
    parser.add_argument("--d-sae", type=int, default=2304)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--training-tokens", type=int, default=500_000)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--generated-repeat", type=int, default=2, help="copies of each generated document")
    parser.add_argument("--eval-rows", type=int, default=64, help="held-out rows of 128 tokens to score")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    import tl_steer
    from tl_steer.analysis.sae_quality import sae_quality
    from tl_steer.models import cache_dir

    corpus = args.corpus or cache_dir() / "sae_corpus"
    if not (corpus / "train.jsonl").is_file():
        raise SystemExit(f"no corpus in {corpus}: run scripts/build_sae_corpus.py first")

    t_start = time.perf_counter()
    model = tl_steer.load_default_model()
    train_docs = read_jsonl(corpus / "train.jsonl")
    # Generation is slow on CPU, so the model's everyday prose is the smaller part of the corpus; repeating
    # it weights the training mix towards the text the default model is mostly steered on.
    train_docs += [d for d in train_docs if d["source"] == "smollm2-generated"] * (args.generated_repeat - 1)
    train_rows = token_rows(model.tokenizer, train_docs, seed=args.seed)
    heldout_rows = token_rows(model.tokenizer, read_jsonl(corpus / "heldout.jsonl"), seed=args.seed)
    print(f"corpus: {len(train_rows)} training rows, {len(heldout_rows)} held-out rows", file=sys.stderr)

    from datasets import Dataset
    from sae_lens import SAE, LanguageModelSAETrainingRunner

    dataset = Dataset.from_dict({"tokens": train_rows.tolist()})
    torch.manual_seed(args.seed)  # the SAE's initialisation and the buffer's shuffling
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_runner_config(args, model, tmp)
        runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
        t_train = time.perf_counter()
        runner.run()
        train_seconds = time.perf_counter() - t_train
        # Ship only the inference files; sae-lens also writes its runner config and sparsity log.
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("cfg.json", "sae_weights.safetensors"):
            shutil.copyfile(Path(tmp) / name, args.out / name)
        # The digest that tl_steer.load_default_sae() checks the shipped weights against.
        from tl_steer.default_sae import write_weights_digest

        write_weights_digest(args.out)

    sae = SAE.load_from_disk(str(args.out))
    quality = sae_quality(model, sae, heldout_rows[: args.eval_rows], skip_first=SKIP_FIRST)
    summary = {
        "hook": args.hook,
        "d_sae": args.d_sae,
        "k": args.k,
        "training_tokens": args.training_tokens,
        "train_batch_tokens": args.batch_tokens,
        "lr": args.lr,
        "generated_repeat": args.generated_repeat,
        "training_rows": len(train_rows),
        "row_tokens": int(train_rows.numel()),
        "training_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "weights_bytes": (args.out / "sae_weights.safetensors").stat().st_size,
        "heldout": quality.as_dict(),
        "threads": args.threads,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
