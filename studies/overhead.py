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
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from matplotlib import ticker
from torch import nn

import lowrank as lr
from lowrank import plots, study
from lowrank.sweep import provenance, write_atomic

DEFAULTS = {
    "dims": [768, 1024, 4096],
    "ranks": [4, 8, 64],
    "tokens": 2048,
    "reps": 10,
    "variants": lr.variants(),
}
QUICK = {"dims": [128], "ranks": [8], "tokens": 256, "reps": 3}


PRESETS = {"quick": ("a run of seconds, used by the tests", QUICK)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = study.parser(__file__, __doc__, defaults=DEFAULTS, presets=PRESETS)
    p.add_argument(
        "--dims", nargs="+", type=study.positive_int, metavar="D", help="sides d of the d × d layers"
    )
    p.add_common("ranks")
    p.add_argument("--tokens", type=study.positive_int, help="rows of the input batch")
    p.add_argument("--reps", type=study.positive_int, help="interleaved rounds (a third of them at d ≥ 4096)")
    p.add_common("variants")
    p.add_argument(
        "--big-variants",
        nargs="+",
        type=study.variant,
        default=["lora", "dora"],
        metavar="VARIANT",
        help="variants timed at d ≥ 4096 (every one is slow there on a CPU)",
    )
    p.add_argument("--device", default="cpu", help="torch device of the layers (cpu or cuda)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64", "bfloat16"],
        help="dtype of the layers and inputs",
    )
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT reference")
    args = p.parse_args(argv)
    if min(args.ranks) > max(args.dims):
        p.error(f"every --ranks value is above every --dims value; pass ranks ≤ {max(args.dims)}")
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
    cfg = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["layer"], use_dora=kind == "dora", init_lora_weights=True
    )
    peft_model = get_peft_model(model, cfg)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.01)
    return peft_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def configurations(
    base: nn.Linear, rank: int, variants: list[str], peft: bool
) -> dict[str, tuple[nn.Module, bool]]:
    """name → (module, trains?) for one shape."""
    confs: dict[str, tuple[nn.Module, bool]] = {"base": (base, True)}
    for v in variants:
        try:
            ad = lr.make(v, copy.deepcopy(base), rank=rank)
        except ValueError:
            continue  # rank out of range for this variant's block shape
        if not lr.variant_class(v).takes_rank:  # full fine-tuning: nothing to merge
            confs[v] = (ad, True)
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


def _forward(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The eval forward of ``m`` on ``x``, without autograd."""

    def run() -> object:
        with torch.no_grad():
            return m(x)

    return run


def _forward_backward(m: nn.Module, xg: torch.Tensor) -> Callable[[], object]:
    """The training forward+backward of ``m`` on ``xg`` (which requires grad), gradients cleared
    after."""

    def run() -> None:
        m(xg).sum().backward()
        xg.grad = None
        for p in m.parameters():
            p.grad = None

    return run


def _jobs(
    confs: dict[str, tuple[nn.Module, bool]], x: torch.Tensor
) -> list[tuple[str, str, Callable[[], object]]]:
    """(configuration, kind, call) for every measurement: each configuration's forward and,
    if it trains, its forward+backward (on a copy of ``x`` that requires grad); modules in eval mode."""
    xg = x.clone().requires_grad_(True)
    jobs = []
    for name, (m, trains) in confs.items():
        m.eval()
        jobs.append((name, "forward", _forward(m, x)))
        if trains:
            jobs.append((name, "forward+backward", _forward_backward(m, xg)))
    return jobs


def _interleaved_times(
    jobs: list[tuple[str, str, Callable[[], object]]], reps: int, device: str
) -> dict[tuple[str, str], list[float]]:
    """(configuration, kind) → seconds per round: one warm-up call each, then ``reps`` rounds
    that run every job once in an order shuffled by a generator seeded with 0."""
    for _, _, fn in jobs:  # warm-up
        fn()
    times: dict[tuple[str, str], list[float]] = {}
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(jobs)
        for name, kind, fn in jobs:
            times.setdefault((name, kind), []).append(measure(fn, device))
    return times


def _rows(
    times: dict[tuple[str, str], list[float]], d: int, rank: int, args: argparse.Namespace
) -> list[dict]:
    """One results row per (configuration, kind): median and minimum time, and the median over
    rounds of its time's ratio to the base layer's and to PEFT DoRA's in the same round."""
    rows = []
    for (name, kind), ts in times.items():
        ref = times[("base", kind)]
        peft = times.get(("peft dora", kind))
        rows.append(
            {
                "d": d,
                "rank": rank,
                "tokens": args.tokens,
                "config": name,
                "kind": kind,
                "median_ms": 1e3 * statistics.median(ts),
                "min_ms": 1e3 * min(ts),
                "reps": len(ts),
                # ratios of the same round's pair, then the median: robust to the machine's drift
                "ratio_to_base": statistics.median(t / b for t, b in zip(ts, ref)),
                "ratio_to_peft_dora": (
                    statistics.median(t / p for t, p in zip(ts, peft)) if peft else float("nan")
                ),
                "dtype": args.dtype,
                "device": args.device,
                "threads": torch.get_num_threads(),
                **provenance(),
            }
        )
    return rows


def bench_shape(d: int, rank: int, args: argparse.Namespace) -> list[dict]:
    """The rows of one shape: a d × d base Linear (seed 0), every configuration at ``rank``, a
    batch of ``args.tokens`` rows; at d ≥ 4096 only ``args.big_variants`` and a third of the rounds."""
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(args.device, dtype)
    base.requires_grad_(False)
    big = d >= 4096
    variants = [v for v in args.variants if not big or v in args.big_variants]
    confs = configurations(base, rank, variants, peft=not args.no_peft)
    x = torch.randn(args.tokens, d, device=args.device, dtype=dtype)
    reps = max(3, args.reps // 3) if big else args.reps
    times = _interleaved_times(_jobs(confs, x), reps, args.device)
    del confs
    gc.collect()
    return _rows(times, d, rank, args)


def config_label(config: str) -> str:
    """How the figure names a configuration: "lora (merged)" → "LoRA, merged", "peft dora" →
    "PEFT DoRA", "base" → "base Linear"."""
    merged = config.endswith(" (merged)")
    name = config.removesuffix(" (merged)")
    text = f"PEFT {plots.label(name[5:])}" if name.startswith("peft ") else plots.label(name)
    return f"{text}, merged" if merged else text


def figure(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """Dot plot of time relative to the base Linear (median over rounds of the paired ratio),
    per configuration; one panel per measurement kind, one marker per (d, r) shape; the dashed
    line is the base layer."""
    shapes = [tuple(x) for x in df[["d", "rank"]].drop_duplicates().to_numpy()]
    configs = sorted(df["config"].unique(), key=lambda c: (c != "base", config_label(c).lower()))
    names = [config_label(c) for c in configs]
    kinds = list(dict.fromkeys(df["kind"]))
    with plots.panels(1, len(kinds), 0.16 * len(configs) + 1.2, sharey=True) as (fig, axes):
        for ax, kind in zip(axes[0], kinds):
            sub = df[df["kind"] == kind]
            for j, (d, r) in enumerate(shapes):
                pts = sub[(sub["d"] == d) & (sub["rank"] == r)].set_index("config")
                ys = [i for i, c in enumerate(configs) if c in pts.index]
                xs = [pts.loc[c, "ratio_to_base"] for c in configs if c in pts.index]
                ax.scatter(
                    xs,
                    ys,
                    s=12,
                    color=plots.OKABE_ITO[j % len(plots.OKABE_ITO)],
                    marker=plots.MARKERS[j % len(plots.MARKERS)],
                    label=f"d={d}, r={r}",
                    zorder=3,
                )
            ax.axvline(1.0, color="0.4", ls="--", lw=0.8)
            ax.set_xscale("log")
            ticks = [
                t
                for t in (0.9, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
                if sub["ratio_to_base"].min() * 0.95 <= t <= sub["ratio_to_base"].max() * 1.05
            ]
            ax.set_xticks(ticks, [f"{t:g}×" for t in ticks])
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("time / base Linear's time (median ratio)")
            ax.set_title(f"{'eval forward' if kind == 'forward' else 'training ' + kind}")
            ax.set_yticks(range(len(configs)), names)
        axes[0, 0].set_ylabel("layer (lowrank variant unless PEFT)")
        axes[0, 0].invert_yaxis()  # shared y: once for all panels; base on top
        axes[0, 0].plot([], [], color="0.4", ls="--", lw=0.8, label="base Linear (1×)")
        plots.letter_panels(axes)
        plots.legend_below(fig, axes, max_cols=5)
        return plots.save(fig, stem)


def bench_all(args: argparse.Namespace) -> pd.DataFrame:
    """Every shape's rows (r ≤ d), the CSV rewritten after each shape."""
    rows = []
    for d in args.dims:
        for r in [r for r in args.ranks if r <= d]:
            rows += bench_shape(d, r, args)
            write_atomic(pd.DataFrame(rows), args.out)
            if not args.quiet:
                print(f"d={d} r={r} done ({time.perf_counter() - args.start:.0f} s)", file=sys.stderr)
    return pd.DataFrame(rows)


def report(df: pd.DataFrame) -> None:
    """Print the time ratios to the base layer of LoRA, DoRA, PEFT's and full fine-tuning."""
    show = df[
        df["config"].isin(
            ["lora", "lora (merged)", "dora", "dora (merged)", "peft lora", "peft dora", "full"]
        )
    ]
    table = show.pivot_table(index=["d", "rank", "config"], columns="kind", values="ratio_to_base").round(3)
    print(table.to_string())


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    df = study.results(args, lambda: bench_all(args), key=None)
    return study.finish(args, figure, df, report=report)


if __name__ == "__main__":
    sys.exit(main())
