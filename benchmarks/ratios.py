#!/usr/bin/env python3
"""Prints the ratio table of one orepa_bench run (Python 3 standard library only).

    orepa_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \\
                --benchmark_format=json > run.json
    python3 benchmarks/ratios.py run.json

Uses the median aggregate when present (else the plain result) of every benchmark, so
every ratio compares two timings of the same run.
"""
import json
import sys


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs = {}
    for b in data["benchmarks"]:
        name = b.get("run_name", b["name"]).removesuffix("/real_time")
        kind = b.get("aggregate_name")
        if kind not in (None, "median"):
            continue
        if kind == "median" or name not in runs:
            runs[name] = b
    return runs


def ms(b):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
    return b["real_time"] * scale


def main(path):
    r = load(path)
    print("| shape | OREPA/ConvBN time | DBB/OREPA time | RepVGG/ConvBN time | saved bytes OREPA/ConvBN "
          "| DBB/ConvBN | RepVGG/ConvBN | squeeze+adjoint share of OREPA step |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in ("c64_h56_n8", "c128_h28_n8"):
        t = {blk: r.get(f"train_step/{blk}/{shape}") for blk in ("ConvBN", "OREPA", "DBB", "RepVGGBlock_OREPA")}
        if not all(t.values()):
            continue
        sq = r.get(f"squeeze/OREPA/{shape}")
        sqb = r.get(f"squeeze_backward/OREPA/{shape}")
        share = f"{(ms(sq) + ms(sqb)) / ms(t['OREPA']):.1%}" if sq and sqb else "-"
        mem = {k: v["bytes_saved_for_backward"] / t["ConvBN"]["bytes_saved_for_backward"] for k, v in t.items()}
        print(f"| {shape} | {ms(t['OREPA']) / ms(t['ConvBN']):.2f} | {ms(t['DBB']) / ms(t['OREPA']):.2f} "
              f"| {ms(t['RepVGGBlock_OREPA']) / ms(t['ConvBN']):.2f} | {mem['OREPA']:.2f} | {mem['DBB']:.2f} "
              f"| {mem['RepVGGBlock_OREPA']:.2f} | {share} |")
    print()
    print("| layer | batch | deploy/raw (NCHW API) | deploy_blocked/raw | raw GFLOP/s | deploy GFLOP/s "
          "| deploy_blocked GFLOP/s | raw_nchw/raw |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (1, 8):
        for layer in ("stem_k6", "c32_64_s2", "c64", "c128", "c256", "c512", "c64_k1"):
            raw = r.get(f"raw_onednn/{layer}/n{n}")
            dep = r.get(f"deploy/{layer}/n{n}")
            blk = r.get(f"deploy_blocked/{layer}/n{n}")
            nchw = r.get(f"raw_onednn_nchw/{layer}/n{n}")
            if not (raw and dep and blk):
                continue
            g = lambda b: b["gflops"] / 1e9 if b["gflops"] > 1e6 else b["gflops"]
            print(f"| {layer} | {n} | {ms(dep) / ms(raw):.2f} | {ms(blk) / ms(raw):.2f} | {g(raw):.0f} | {g(dep):.0f} "
                  f"| {g(blk):.0f} | {ms(nchw) / ms(raw):.2f} |" if nchw else "| - |")
    for n in (1, 8):
        a, b = r.get(f"deploy_chain/nchw/n{n}"), r.get(f"deploy_chain/blocked/n{n}")
        if a and b:
            print(f"\nchain stem_k6 -> c32_64_s2 -> c64 -> c64_k1, n{n}: blocked/nchw time {ms(b) / ms(a):.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
