"""Overhead benchmark: time and memory of every variant against the plain Linear layer it wraps.

For each shape (d × d layer, rank r, a batch of tokens) and each configuration — the base
Linear, every lowrank variant unmerged and merged, full fine-tuning, and PEFT's LoRA and DoRA
when PEFT is installed — it measures the eval forward and the training forward+backward
(the input requires grad, as inside a network). Repetitions are interleaved (each round runs
every configuration once, in a shuffled order) and medians are reported, so slow drift of the
machine affects all configurations alike. Ratios are to the base layer measured in the same
rounds; PEFT ratios compare the same shapes in the same process.

    python studies/overhead.py              # d ∈ {768, 1024, 4096}, r ∈ {4, 8, 64}, 2048 tokens
    python studies/overhead.py --quick      # seconds; used by the tests
    python studies/overhead.py --plot-only
"""

from __future__ import annotations

import argparse
import copy
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import lowrank as lr
from lowrank import plots
from lowrank.sweep import provenance, saved_results, write_atomic

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dims", nargs="+", type=int, default=[768, 1024, 4096])
    p.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 64])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10, help="interleaved rounds (a third of them at d ≥ 4096)")
    p.add_argument("--variants", nargs="+", default=None, help="default: every registered variant")
    p.add_argument("--big-variants", nargs="+", default=["lora", "dora"],
                   help="variants timed at d ≥ 4096 (every one is slow there on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT reference")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="d=128, r=8, 256 tokens, 3 rounds")
    p.add_argument("--plot-only", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.ranks, args.tokens, args.reps = [128], [8], 256, 3
    name = "overhead_quick" if args.quick else "overhead"
    args.out = args.out or ROOT / "results" / f"{name}.csv"
    args.figure = args.figure or ROOT / "paper_figures" / name
    args.variants = args.variants or lr.variants()
    for v in args.variants:
        lr.variant_class(v)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return args


def _peft_layer(kind: str, base: nn.Linear, rank: int) -> nn.Module | None:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = nn.Sequential()
    model.add_module("layer", copy.deepcopy(base))
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"], use_dora=kind == "dora",
                     init_lora_weights=True)
    peft_model = get_peft_model(model, cfg)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.01)
    return peft_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def configurations(base: nn.Linear, rank: int, variants: list[str], peft: bool
                   ) -> dict[str, tuple[nn.Module, bool]]:
    """name → (module, trains?) for one shape."""
    confs: dict[str, tuple[nn.Module, bool]] = {"base": (base, True)}
    for v in variants:
        try:
            ad = lr.make(v, copy.deepcopy(base), rank=rank)
        except ValueError:
            continue  # rank out of range for this variant's block shape
        if v == "full":
            confs["full"] = (ad, True)
            continue
        with torch.no_grad():
            for p in ad.parameters():
                if p.requires_grad and p.abs().sum() == 0:
                    p.normal_(std=0.01)
        confs[v] = (ad, True)
        merged = copy.deepcopy(ad)
        merged.merge()
        confs[f"{v} (merged)"] = (merged, False)
    if peft:
        for kind in ("lora", "dora"):
            m = _peft_layer(kind, base, rank)
            if m is not None:
                confs[f"peft {kind}"] = (m, True)
    return confs


def measure(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def bench_shape(d: int, rank: int, args: argparse.Namespace) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(args.device, dtype)
    base.requires_grad_(False)
    big = d >= 4096
    variants = [v for v in args.variants if not big or v in args.big_variants]
    confs = configurations(base, rank, variants, peft=not args.no_peft)
    x = torch.randn(args.tokens, d, device=args.device, dtype=dtype)
    xg = x.clone().requires_grad_(True)
    reps = max(3, args.reps // 3) if big else args.reps
    times: dict[tuple[str, str], list[float]] = {}

    def fwd(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return m(x)
        return run

    def fwd_bwd(m: nn.Module) -> Callable[[], object]:
        def run() -> None:
            m(xg).sum().backward()
            xg.grad = None
            for p in m.parameters():
                p.grad = None
        return run

    jobs = []
    for name, (m, trains) in confs.items():
        m.eval()
        jobs.append((name, "forward", fwd(m)))
        if trains:
            jobs.append((name, "forward+backward", fwd_bwd(m)))
    for _, _, fn in jobs:  # warm-up
        fn()
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(jobs)
        for name, kind, fn in jobs:
            times.setdefault((name, kind), []).append(measure(fn, args.device))
    rows = []
    for (name, kind), ts in times.items():
        ref = times[("base", kind)]
        peft = times.get(("peft dora", kind))
        rows.append({
            "d": d, "rank": rank, "tokens": args.tokens, "config": name, "kind": kind,
            "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "reps": len(ts),
            # ratios of the same round's pair, then the median: robust to the machine's drift
            "ratio_to_base": statistics.median(t / b for t, b in zip(ts, ref)),
            "ratio_to_peft_dora": (statistics.median(t / p for t, p in zip(ts, peft))
                                   if peft else float("nan")),
            "dtype": args.dtype, "device": args.device, "threads": torch.get_num_threads(),
            **provenance(),
        })
    del confs
    gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if not args.plot_only:
        rows = []
        start = time.perf_counter()
        for d in args.dims:
            for r in args.ranks:
                if r > d:
                    continue
                rows += bench_shape(d, r, args)
                write_atomic(pd.DataFrame(rows), args.out)
                print(f"d={d} r={r} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    try:
        df = saved_results(args.out, key=None) if args.plot_only else pd.DataFrame(rows)
    except FileNotFoundError as e:
        print(f"{e}; run without --plot-only first", file=sys.stderr)
        return 1
    if df.empty:
        return 1
    paths = plots.overhead(df, args.figure)
    show = df[df["config"].isin(["lora", "lora (merged)", "dora", "dora (merged)", "peft lora",
                                 "peft dora", "full"])]
    table = show.pivot_table(index=["d", "rank", "config"], columns="kind",
                             values="ratio_to_base").round(3)
    print(table.to_string())
    print(f"results: {args.out}\nfigure: {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
