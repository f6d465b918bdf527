#!/usr/bin/env python3
"""PyTorch peer of benchmarks/bench_cuda: times torch.nn.functional.batch_norm on the suite that
bench_cuda writes (--suite_json), with CUDA events, in the same units (minimum bytes moved), so
that tools/gpu_check.sh can report our speed as a ratio to PyTorch's.

  python3 tools/gpu_peer.py --suite suite.json --out peer.json [--iterations 20] [--budget-s 150]

For each case x dtype (f32, f16, bf16; fp32 parameters as bench_cuda) x op:
  train_forward  F.batch_norm(x, running_mean, running_var, weight, bias, training=True)
  infer_forward  the same with training=False
  backward       torch.autograd.grad of a training forward's output w.r.t. (x, weight, bias)
                 with a given dy (the graph kept: only BatchNorm's backward runs)
Layouts: NHWC as channels_last tensors; per-activation as BatchNorm1d on (N, C*H*W).

Without torch or without a CUDA device, writes {"skipped": reason} and exits 0 (dry runs).
Stops starting new cases after --budget-s seconds (the rest are marked "not run").
"""
import argparse
import json
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, help="suite JSON written by bench_cuda --suite_json")
    parser.add_argument("--out", required=True, help="results JSON")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=150.0)
    args = parser.parse_args()

    with open(args.suite) as f:
        suite = json.load(f)
    result = {"suite": args.suite, "results": []}

    def finish(reason=None):
        if reason:
            result["skipped"] = reason
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"gpu_peer: {len(result['results'])} results" + (f"; skipped: {reason}" if reason else ""))

    try:
        import torch
        import torch.nn.functional as F
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer here"
        return finish(f"PyTorch not importable: {e}")
    if not torch.cuda.is_available():
        return finish(f"torch {torch.__version__}: no CUDA device")

    result["torch"] = torch.__version__
    result["cudnn"] = torch.backends.cudnn.version()
    result["device"] = torch.cuda.get_device_name()
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    started = time.monotonic()

    def timed(fn, iterations):
        fn()
        fn()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / iterations

    for case in suite:
        N, C, H, W = case["N"], case["C"], case["H"], case["W"]
        for dname, dtype in dtypes.items():
            for op in ("train_forward", "infer_forward", "backward"):
                entry = {"key": case["key"], "dtype": dname, "op": op}
                if time.monotonic() - started > args.budget_s:
                    entry["error"] = "not run (time budget)"
                    result["results"].append(entry)
                    continue
                try:
                    gen = torch.Generator(device="cuda").manual_seed(1)
                    shape = (N, C) if H == 0 else (N, C, H, W)
                    x = torch.rand(shape, device="cuda", dtype=dtype, generator=gen) * 2 - 0.5
                    if case["nhwc"] and H != 0:
                        x = x.contiguous(memory_format=torch.channels_last)
                    if case["per_activation"]:
                        x = x.reshape(N, -1)
                    features = x.shape[1]
                    weight = torch.ones(features, device="cuda")
                    bias = torch.zeros(features, device="cuda")
                    rm = torch.full((features,), 0.5, device="cuda")
                    rv = torch.full((features,), 1.0 / 3.0, device="cuda")
                    numel = x.numel()
                    if op == "backward":
                        xg = x.detach().requires_grad_(True)
                        wg = weight.clone().requires_grad_(True)
                        bg = bias.clone().requires_grad_(True)
                        y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=0.1, eps=1e-5)
                        dy = torch.rand_like(y)
                        t = timed(lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True), args.iterations)
                        moved = 3 * numel * x.element_size()
                        del y, dy, xg
                    else:
                        training = op == "train_forward"
                        with torch.no_grad():
                            t = timed(lambda: F.batch_norm(x, rm, rv, weight, bias, training=training, momentum=0.1,
                                                           eps=1e-5), args.iterations)
                        moved = 2 * numel * x.element_size()
                    entry.update({"us": t * 1e6, "GBps": moved / t / 1e9, "bytes": moved})
                    del x
                except Exception as e:  # noqa: BLE001 - report and go on with the next case
                    entry["error"] = f"{type(e).__name__}: {e}"[:300]
                result["results"].append(entry)
        torch.cuda.empty_cache()
    finish()


if __name__ == "__main__":
    sys.exit(main())
