#!/usr/bin/env python3
"""Turns bench_cpu's JSON output into issue 9's markdown table.

Usage:
  BN_BENCH_THREADS=1 build/benchmarks/bench_cpu --benchmark_format=json > bench_cpu.json
  tools/bench_cpu_table.py bench_cpu.json            # markdown on stdout

Ratios are peer time / our time (median of interleaved calls; > 1: we are faster), read from
the counters x_torch and x_onednn; the floor columns are our time / (minimal bytes / memcpy
bandwidth), the counter x_floor, with the bandwidth of large copies made around each case's timed
loop (last column: their range over the row's three ops). A peer that was missing, refused the case or computed
something else is shown as "–" with a note under the table (bench_cpu never times it). With
--benchmark_repetitions, the "median" aggregate rows are used.
"""
import json
import sys

OPS = ("train", "backward", "infer")


def shape_label(layout, dtype, dims):
    d = "(" + dims.replace("x", ",") + ")"
    if dtype in ("bf16", "fp16"):  # fp16: the peers ran bf16 (bench_cpu's peer_storage)
        return f"{dtype} {layout.upper()} {d}"
    if layout == "nc":
        return f"BN1d {d}"
    if layout == "nhwc":
        return f"NHWC {d}"
    return d


def load(path):
    with open(path) as f:
        data = json.load(f)
    runs = data["benchmarks"]
    if any(r.get("run_type") == "aggregate" for r in runs):
        runs = [r for r in runs if r.get("run_type") == "aggregate" and r.get("aggregate_name") == "median"]
    rows, order = {}, []
    for r in runs:
        name = r.get("run_name", r["name"]).replace("/manual_time", "")
        parts = name.split("/")
        if len(parts) != 4 or parts[0] not in OPS:
            continue
        op, layout, dtype, dims = parts
        key = shape_label(layout, dtype, dims)
        if key not in rows:
            rows[key] = {}
            order.append(key)
        rows[key][op] = r
    return data.get("context", {}), rows, order


def fmt(x, digits=2):
    if 0 < abs(x) < 0.095:  # small ratios: two significant digits rather than 0.00
        return f"{x:.2g}"
    return f"{x:.{digits}f}"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    ctx, rows, order = load(sys.argv[1])
    notes = []

    def ratio(r, peer):
        if r is None:
            return "·"
        if r.get("error_occurred"):
            note = f"{r['name'].replace('/manual_time', '')}: not run: {r.get('error_message', '')}"
            if note not in notes:
                notes.append(note)
            return "–"
        if not r.get(f"{peer}_ok"):
            label = r.get("label", "")
            part = next((p.strip() for p in label.split(";") if p.strip().startswith(peer)), peer)
            notes.append(f"{r['name'].replace('/manual_time', '')}: {part}")
            return "–"
        return fmt(r[f"x_{peer}"])

    def pair(r):
        return f"{ratio(r, 'torch')} / {ratio(r, 'onednn')}"

    def floor(r):
        if r is None or r.get("error_occurred"):
            return "·"
        return fmt(r["x_floor"], 1) + "×"

    print(
        f"start-up memcpy {float(ctx.get('memcpy_GBps', 'nan')):.1f} GB/s (best copy "
        f"{float(ctx.get('memcpy_best_GBps', 'nan')):.1f}); threads: BN_BENCH_THREADS="
        f"{ctx.get('BN_BENCH_THREADS', '?')}, OMP_NUM_THREADS={ctx.get('OMP_NUM_THREADS', '?')}, "
        f"omp_get_max_threads()={ctx.get('omp_max_threads', '?')}; torch {ctx.get('torch', '?')}; "
        f"oneDNN {ctx.get('onednn', '?')}; {ctx.get('host_name', '')} {ctx.get('date', '')}"
    )
    print()
    print("| shape | training forward vs PyTorch / oneDNN | backward vs PyTorch / oneDNN "
          "| inference vs PyTorch / oneDNN | training fwd / floor | backward / floor | inference / floor "
          "| ours: train / backward / infer ms | memcpy GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in order:
        r = rows[key]
        ms = " / ".join(fmt(r[op]["ms"], 3) if "ms" in r.get(op, {}) else "·" for op in OPS)
        bw = [r[op]["memcpy_GBps"] for op in OPS if "memcpy_GBps" in r.get(op, {})]
        bw = f"{min(bw):.1f}–{max(bw):.1f}" if bw else "·"
        print(f"| {key} | {pair(r.get('train'))} | {pair(r.get('backward'))} | {pair(r.get('infer'))} "
              f"| {floor(r.get('train'))} | {floor(r.get('backward'))} | {floor(r.get('infer'))} | {ms} | {bw} |")
    if notes:
        print()
        print("Not timed (peer missing, refused or differs from ours; case not run):")
        for n in notes:
            print(f"- {n}")


if __name__ == "__main__":
    main()
