#!/usr/bin/env python3
"""Prints the targets and ratio tables of one orepa_bench run (Python 3 standard library only).

    orepa_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \\
                --benchmark_enable_random_interleaving=true --benchmark_format=json > run.json
    python3 benchmarks/ratios.py run.json

Uses the median aggregate when present (else the plain result) of every benchmark, so
every ratio compares two timings of the same run. The first table lists every target
with its value and whether it is met; rows whose benchmarks are missing from the run are
left out.
"""
import json
import sys

LAYERS = ("stem_k6", "c32_64_s2", "c64", "c128", "c256", "c512", "c64_k1")
SHAPES = ("c64_h56_n8", "c128_h28_n8")


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs = {}
    for b in data["benchmarks"]:
        name = b.get("run_name", b["name"]).removesuffix("/real_time")
        kind = b.get("aggregate_name")
        if kind not in (None, "median") or b.get("error_occurred"):  # skipped: no kernel on this CPU
            continue
        if kind == "median" or name not in runs:
            runs[name] = b
    return runs, data.get("context", {})


def ms(b):
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
    return b["real_time"] * scale


def gflops(b):
    g = b.get("gflops", 0)
    return g / 1e9 if g > 1e6 else g


def targets(r):
    """(target, where, value, limit, met) rows; limit is "<= x" or ">= x"."""
    rows = []

    def add(target, where, value, limit, at_least=False):
        rows.append((target, where, value, f"{'>=' if at_least else '<='} {limit:g}",
                     value >= limit if at_least else value <= limit))

    for n in (1, 8):
        for layer in LAYERS:
            raw = r.get(f"raw_onednn/{layer}/n{n}")
            if not raw:
                continue
            nhwc = r.get(f"deploy_nhwc/{layer}/n{n}")
            if nhwc and nhwc.get("label", "") == "nhwc":
                add("deploy_nhwc / raw (NHWC-preferring primitives)", f"{layer} n{n}", ms(nhwc) / ms(raw), 1.05)
            dep, rin, rout = (r.get(f"{k}/{layer}/n{n}") for k in ("deploy", "reorder_in", "reorder_out"))
            if dep and rin and rout:
                add("deploy_nchw / (raw + reorder_in + reorder_out)", f"{layer} n{n}",
                    ms(dep) / (ms(raw) + ms(rin) + ms(rout)), 1.05)
            blk = r.get(f"deploy_blocked/{layer}/n{n}")
            if blk:
                add("deploy_blocked / raw", f"{layer} n{n}", ms(blk) / ms(raw), 1.05)
            for p in ("bf16", "int8"):
                dep, praw = r.get(f"deploy_{p}_blocked/{layer}/n{n}"), r.get(f"raw_onednn_{p}/{layer}/n{n}")
                if dep and praw:
                    add(f"deploy_{p}_blocked / raw_onednn_{p}", f"{layer} n{n}", ms(dep) / ms(praw), 1.05)
    # Reduced precision against fp32, activations in the primitive's layout (64-512 channel 3x3, batch 8).
    for layer in ("c64", "c128", "c256", "c512"):
        fp = r.get(f"deploy_blocked/{layer}/n8")
        for p, limit in (("int8", 3.2), ("bf16", 1.85)):
            low = r.get(f"deploy_{p}_blocked/{layer}/n8")
            if fp and low:
                add(f"{p} speed-up over fp32 (deploy_blocked / deploy_{p}_blocked)", f"{layer} n8", ms(fp) / ms(low),
                    limit, at_least=True)
    fp, low = r.get("deploy_network/fp32/n256"), r.get("deploy_network/int8/n256")
    if fp and low:
        add("int8 InferenceChain speed-up over fp32 (the demo's classifier)", "n256", ms(fp) / ms(low), 2.5,
            at_least=True)
    for n in (1, 8):
        fp, low = r.get(f"deploy_chain/blocked/n{n}"), r.get(f"deploy_chain/int8/n{n}")
        if fp and low:
            add("int8 DeployedChain speed-up over fp32 (stem_k6 -> c32_64_s2 -> c64 -> c64_k1)", f"n{n}",
                ms(fp) / ms(low), 2.5, at_least=True)
    for shape in SHAPES:
        sq, sqb = r.get(f"squeeze/OREPA/{shape}"), r.get(f"squeeze_backward/OREPA/{shape}")
        if sq and sqb and shape.startswith("c128"):
            add("squeeze + adjoint, OREPA 128->128 k3 (ms)", shape, ms(sq) + ms(sqb), 0.6)
        o, c = r.get(f"train_step/OREPA/{shape}"), r.get(f"train_step/ConvBN/{shape}")
        if o and c:
            add("OREPA step / ConvBN step", shape, ms(o) / ms(c), 1.05)
            if "peak_step_bytes" in o and c.get("peak_step_bytes", 0) > 0:
                add("peak memory of 3 steps, OREPA / ConvBN", shape, o["peak_step_bytes"] / c["peak_step_bytes"], 1.10)
    return rows


def main(path):
    r, ctx = load(path)
    print(f"run: {ctx.get('date', '?')}, {ctx.get('num_cpus', '?')} CPUs, {ctx.get('host_name', '?')}, "
          f"oneDNN ISA {ctx.get('onednn_isa', '?')}\n")
    rows = targets(r)
    if rows:
        print("| target | where | value | limit | met |")
        print("|---|---|---|---|---|")
        for target, where, value, limit, met in rows:
            print(f"| {target} | {where} | {value:.3g} | {limit} | {'met' if met else 'MISSED'} |")
        print()
    print("| shape | OREPA/ConvBN time | DBB/OREPA time | RepVGG/ConvBN time | peak memory OREPA/ConvBN "
          "| saved bytes OREPA/ConvBN | squeeze+adjoint share of OREPA step |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        t = {blk: r.get(f"train_step/{blk}/{shape}") for blk in ("ConvBN", "OREPA", "DBB", "RepVGGBlock_OREPA")}
        if not all(t.values()):
            continue
        sq, sqb = r.get(f"squeeze/OREPA/{shape}"), r.get(f"squeeze_backward/OREPA/{shape}")
        share = f"{(ms(sq) + ms(sqb)) / ms(t['OREPA']):.1%}" if sq and sqb else "-"
        peak = t["OREPA"].get("peak_step_bytes", 0) / max(t["ConvBN"].get("peak_step_bytes", 1), 1)
        saved = t["OREPA"]["bytes_saved_for_backward"] / t["ConvBN"]["bytes_saved_for_backward"]
        print(f"| {shape} | {ms(t['OREPA']) / ms(t['ConvBN']):.2f} | {ms(t['DBB']) / ms(t['OREPA']):.2f} "
              f"| {ms(t['RepVGGBlock_OREPA']) / ms(t['ConvBN']):.2f} | {peak:.2f} | {saved:.2f} | {share} |")
    print()
    print("| layer | batch | raw GFLOP/s | deploy_nhwc/raw | deploy/raw (NCHW) | (raw+reorders)/raw "
          "| deploy_blocked/raw | raw_nchw/raw |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (1, 8):
        for layer in LAYERS:
            raw = r.get(f"raw_onednn/{layer}/n{n}")
            if not raw:
                continue
            cell = lambda k: f"{ms(r[f'{k}/{layer}/n{n}']) / ms(raw):.2f}" if f"{k}/{layer}/n{n}" in r else "-"
            rin, rout = r.get(f"reorder_in/{layer}/n{n}"), r.get(f"reorder_out/{layer}/n{n}")
            reo = f"{(ms(raw) + ms(rin) + ms(rout)) / ms(raw):.2f}" if rin and rout else "-"
            print(f"| {layer} | {n} | {gflops(raw):.0f} | {cell('deploy_nhwc')} | {cell('deploy')} | {reo} "
                  f"| {cell('deploy_blocked')} | {cell('raw_onednn_nchw')} |")
    reduced = [(n, layer) for n in (1, 8) for layer in LAYERS
               if f"deploy_blocked/{layer}/n{n}" in r and (f"deploy_int8_blocked/{layer}/n{n}" in r
                                                           or f"deploy_bf16_blocked/{layer}/n{n}" in r)]
    if reduced:
        print("\n| layer | batch | fp32 GFLOP/s | bf16 speed-up (primitive) | int8 speed-up (primitive) "
              "| bf16 speed-up (NHWC float tensors) | int8 speed-up (NHWC float tensors) |")
        print("|---|---|---|---|---|---|---|")
        for n, layer in reduced:
            fp = r[f"deploy_blocked/{layer}/n{n}"]
            nhwc = r.get(f"deploy_nhwc/{layer}/n{n}")
            up = lambda k, base: f"{ms(base) / ms(r[f'{k}/{layer}/n{n}']):.2f}" if base and f"{k}/{layer}/n{n}" in r else "-"
            print(f"| {layer} | {n} | {gflops(fp):.0f} | {up('deploy_bf16_blocked', fp)} | {up('deploy_int8_blocked', fp)} "
                  f"| {up('deploy_bf16', nhwc)} | {up('deploy_int8', nhwc)} |")
    net = {p: r.get(f"deploy_network/{p}/n256") for p in ("fp32", "bf16", "int8")}
    if net["fp32"]:
        print("\nthe demo's classifier as an InferenceChain, batch 256: "
              + ", ".join(f"{p} {ms(b):.2f} ms ({ms(net['fp32']) / ms(b):.2f}x)" for p, b in net.items() if b))
    for n in (1, 8):
        a, b, c = (r.get(f"deploy_chain/{api}/n{n}") for api in ("nchw", "blocked", "int8"))
        if a and b:
            line = f"\nchain stem_k6 -> c32_64_s2 -> c64 -> c64_k1, n{n}: blocked/nchw time {ms(b) / ms(a):.2f}"
            print(line + (f", int8/blocked time {ms(c) / ms(b):.2f}" if c else ""))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/dev/stdin")
