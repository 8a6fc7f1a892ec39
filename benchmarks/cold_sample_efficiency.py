"""Sample efficiency of DiffMean, COLD-Kernel and COLD-FD on the default model (docs/methods.md, section 6).

    python benchmarks/cold_sample_efficiency.py [--behaviour sentiment] [--train-on pairs|ab] [--seeds 0 1 2]

For each method, interventions are built from N in {1, 2, 5, 10, 20, 50} training examples (nested sets of a
seeded permutation) at layer 15's residual stream and evaluated on the test splits: A/B accuracy and margin on
the behaviour's A/B test items, PrefOdds = mean(L_n - L_p) on its contrastive test pairs. Steering is applied
at all positions. The examples are the behaviour's contrastive train pairs (``--train-on pairs``, default) or
its A/B train items as CAA-style pairs (matching letter against the other letter, ``--train-on ab``).

Strength: equal added norm. The methods' natural scales differ by orders of magnitude (at m = 1 and eta = 1,
|DiffMean v| ~ 4-20, |COLD-Kernel v| ~ 5e-4, COLD-FD's |dZ| ~ 40-80 per position), so eta = 1 and each
intervention gets m = norm / (what it adds per position at m = 1, measured on 4 training examples). Every
method then adds about ``--norm`` per position (default 16, about 9% of the typical residual norm of 175 at
this layer) whatever N, and the table compares the quality of the directions. The default came from a quick
check on held-out train data (sentiment pairs, N = 50, norms 2..32): PrefOdds rises with the norm for all
three methods up to 16, and COLD-Kernel falls again at 32 (1.16 at 16, 0.71 at 32) while DiffMean and COLD-FD
still rise; ``--m`` sets fixed strengths instead.

COLD-FD uses the finite difference with eps = 1e-3: in float32 on this model the published eps = 1e-6 loses
about half of the parameter perturbation to rounding and is off from the exact JVP by more than 100% (the
check is printed first); eps = 1e-3 is within about 1% of the JVP and costs one partial pass (the JVP ~3).

Cost: the default run (3 seeds, 30 A/B test items, 24 test pairs) took 438 s wall / 818 s CPU on the
2-core machine when it was otherwise idle (49 min when other jobs shared the cores); ``--seeds 0`` takes a
third of that, ``--quick`` about a minute.

Writes benchmarks/results/cold_sample_efficiency{,_ab}.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tl_steer
from tl_steer.analysis.sample_efficiency import plot_sample_efficiency, sample_efficiency, summarize
from tl_steer.data.ab import ab_to_pairs, load_ab_items
from tl_steer.methods.cold import cold_fd
from tl_steer.scoring import pad_right, pad_token_id, tokenize_completions

RESULTS = Path(__file__).parent / "results"
HOOK = "blocks.15.hook_resid_post"
METHODS = ("diffmean", "cold_kernel", "cold_fd")
EPS = 1e-3


def log(*args: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *args, flush=True)


def capture(model, tokens, fwd_hooks=()):
    seen = {}

    def grab(act, hook):
        seen["act"] = act.detach().clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, (HOOK, grab)], return_type=None)
    return seen["act"]


def fd_precision_check(model, examples) -> None:
    """|fd - jvp| / |jvp| on 4 inputs, for the published eps and the one used here."""
    data = tokenize_completions(model, [p.prompt for p in examples[:4]], [p.positive for p in examples[:4]])
    tokens = pad_right(data.sequences, pad_token_id(model), model.cfg.device or "cpu")
    jvp = cold_fd(model, examples, HOOK, fd_method="jvp")
    clean = capture(model, tokens)
    # Raw steps (unit 1): each unit is measured from its own dZ, which would hide part of the difference.
    exact = capture(model, tokens, jvp.with_unit(1.0).hooks(1.0, model=model)) - clean
    for eps in (1e-6, EPS):
        fd = cold_fd(model, examples, HOOK, fd_method="fd", eps=eps)
        approx = capture(model, tokens, fd.with_unit(1.0).hooks(1.0, model=model)) - clean
        rel = float((approx - exact).norm() / exact.norm())
        log(
            f"COLD-FD eps={eps:g} (N={len(examples)}): |fd - jvp| / |jvp| = {rel:.3g}; share of eps*g lost to "
            f"float32 rounding = {fd.info['fd_rounding_error']:.3g}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behaviour", default="sentiment")
    parser.add_argument("--train-on", choices=["pairs", "ab"], default="pairs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50])
    parser.add_argument("--norm", type=float, default=16.0, help="added norm per position (equal for all methods)")
    parser.add_argument("--m", type=float, nargs=3, metavar=("DIFFMEAN", "KERNEL", "FD"), help="fixed strengths")
    parser.add_argument("--test-items", type=int, default=30, help="A/B test items used (the split has 40-50)")
    parser.add_argument("--test-pairs", type=int, default=24, help="contrastive test pairs used (the split has 40)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-check", action="store_true", help="skip the fd-vs-jvp precision check")
    parser.add_argument("--quick", action="store_true", help="a smoke run: ns 1 5, one seed, few test items")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.seeds, args.ns, args.test_items, args.test_pairs = [0], [1, 5], 8, 6
    args.out.mkdir(parents=True, exist_ok=True)
    start, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    model = tl_steer.load_default_model()
    log(f"model loaded; torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

    if not args.skip_check:
        if args.train_on == "pairs":
            train = tl_steer.load_pairs(args.behaviour, "train")
        else:
            train = ab_to_pairs(load_ab_items(args.behaviour, "train"))
        order = np.random.default_rng(1000).permutation(len(train))
        fd_precision_check(model, [train[i] for i in order[:10]])

    strength = dict(m=dict(zip(METHODS, args.m, strict=True))) if args.m else dict(norm=args.norm)
    table = sample_efficiency(
        model,
        args.behaviour,
        ns=args.ns,
        seeds=args.seeds,
        hook=HOOK,
        methods=METHODS,
        eps=EPS,
        n_test_items=args.test_items,
        n_test_pairs=args.test_pairs,
        train_on=args.train_on,
        on_row=lambda row: log({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
        **strength,  # type: ignore[arg-type]
    )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall, cpu = time.time() - start, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    summary = summarize(table)
    how = f"fixed m {args.m}" if args.m else f"equal added norm {args.norm:g} per position"
    source = "contrastive train pairs" if args.train_on == "pairs" else "A/B train items (CAA-style letter pairs)"
    settings = (
        f"SmolLM2-135M-Instruct (fp32), {HOOK}, behaviour '{args.behaviour}', examples: {source}; {how}; "
        f"positions 'all'; eta 1; COLD-FD finite difference eps {EPS:g}; DPO beta 0.1; seeds {args.seeds}; "
        f"{args.test_items} A/B test items, {args.test_pairs} test pairs"
    )
    stem = args.out / ("cold_sample_efficiency" + ("" if args.train_on == "pairs" else "_ab"))
    table.to_csv(f"{stem}.csv", index=False)
    text = summary.to_string(index=False, float_format=lambda x: f"{x:.3f}")
    Path(f"{stem}.md").write_text(
        f"# COLD sample efficiency\n\n{settings}\n\nwall {wall:.0f} s, CPU {cpu:.0f} s\n\n```\n{text}\n```\n"
    )
    plot_sample_efficiency(
        table,
        f"{stem}.png",
        title=f"Sample efficiency on '{args.behaviour}': DiffMean vs COLD-Kernel vs COLD-FD",
        subtitle=settings + ". Lines: mean over seeds; bands: min-max over seeds; dashed: no steering.",
    )
    print()
    print(settings)
    print(text)
    print(f"\nwall {wall:.0f} s, CPU {cpu:.0f} s; wrote {stem}.csv, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
