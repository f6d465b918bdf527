#!/usr/bin/env bash
# One-command GPU check (issue 11): build on the GPU machine, run every gpu-labelled test,
# compute-sanitizer (memcheck, racecheck, initcheck, synccheck) on a subset that runs every
# kernel, the quickstart, bench_cuda (vs cuDNN, with the device's copy bandwidth) and the
# PyTorch peer (tools/gpu_peer.py); write report.md and raw logs (8 files at most) to --out.
# Every stage is time-boxed (`timeout`) so that the whole run ends within --budget-s (default
# 450 s: with the 10 s grace of a killed stage, under 8 minutes) even when something hangs; a
# stage that ran out of time is reported as such and the run goes on with the next one.
#
#   tools/prepare_gpu_deps.sh                      # once, on a machine with network (fills .deps/)
#   tools/gpu_check.sh --out DIR                   # on the GPU machine (carry .deps)
#   tools/gpu_check.sh --dry-run --out DIR [--build-dir build]
#       no GPU needed: reuses an existing build dir (no configure, no build), runs the same
#       stages (gpu tests skip, sanitizer absent, benchmarks skip, peer skips) and the report
#       writer, and checks the output folder (ctest: tools_gpu_check_dry_run).
#
# Options: --build-dir DIR (default build-gpu; dry run: build), --budget-s N, --jobs N.
# Exit status: 0 when every stage that ran passed (dry run: when the script and the report
# writer worked), 1 otherwise, 2 for bad usage.
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out="" build="" dry_run=0 budget=450 jobs=$(nproc 2>/dev/null || echo 4)
while (($#)); do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --build-dir) build=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --budget-s) budget=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n $out ]] || { echo "gpu_check: --out DIR is required" >&2; exit 2; }
[[ -n $build ]] || build=$([[ $dry_run == 1 ]] && echo build || echo build-gpu)
[[ $build == /* ]] || build=$root/$build
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PATH="/usr/local/cuda/bin:$PATH"

# The 8 output files.
report=$out/report.md
env_log=$out/env-build.log
tests_log=$out/tests.log
sanitizer_log=$out/sanitizer.log
quickstart_log=$out/quickstart.log
bench_json=$out/bench.json
bench_log=$out/bench-peer.log
peer_json=$out/peer.json
rm -f "$report" "$env_log" "$tests_log" "$sanitizer_log" "$quickstart_log" "$bench_json" "$bench_log" "$peer_json"
stages=$(mktemp)      # name<TAB>status<TAB>seconds<TAB>log
scratch=$(mktemp -d)  # not part of the output
trap 'rm -rf "$scratch" "$stages"' EXIT

started=$SECONDS
remaining() { echo $((budget - (SECONDS - started))); }

# run_stage NAME CAP RESERVE LOG CMD...: runs CMD with a timeout of min(CAP, remaining − RESERVE)
# seconds (RESERVE: what the later stages need at least), appending its output to LOG.
# Status: pass, FAIL (exit code), TIMEOUT, or skipped (no time left).
run_stage() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local left=$(($(remaining) - reserve)) limit=$cap
  ((left < limit)) && limit=$left
  if ((limit < 5)); then
    printf '%s\tskipped (no time left)\t0\t%s\n' "$name" "$(basename "$log")" >> "$stages"
    echo "== $name: skipped, no time left" >> "$log"
    return 0
  fi
  echo "== $name (limit ${limit}s): $*" >> "$log"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local status=pass
  if ((rc == 124 || rc == 137)); then status="TIMEOUT after ${limit}s"; elif ((rc != 0)); then status="FAIL (exit $rc)"; fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" $((SECONDS - t0)) "$(basename "$log")" >> "$stages"
  echo "== $name: $status ($((SECONDS - t0))s)" >> "$log"
  return 0
}
note_stage() { printf '%s\t%s\t0\t%s\n' "$1" "$2" "$3" >> "$stages"; }

# ---- environment ------------------------------------------------------------------------------
{
  echo "gpu_check $(date -u +%FT%TZ) dry_run=$dry_run budget=${budget}s jobs=$jobs"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "host: $(uname -srm), $(nproc) cores"
  command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2
  cmake --version | head -1
  python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' 2>&1 | tail -1
} >> "$env_log" 2>&1
device=$(command -v nvidia-smi >/dev/null && timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
[[ -n $device ]] || device="none found"

# ---- configure + build --------------------------------------------------------------------------
deps=$root/.deps
if ((dry_run)); then
  if [[ ! -f $build/CMakeCache.txt ]]; then
    echo "gpu_check: --dry-run needs an existing build dir ($build has no CMakeCache.txt)" >&2
    exit 2
  fi
  note_stage configure "reused $build (dry run)" "$(basename "$env_log")"
  for d in googletest benchmark json; do
    [[ -d $deps/$d ]] || echo "note: $deps/$d missing (tools/prepare_gpu_deps.sh prepares it for the GPU machine)" >> "$env_log"
  done
else
  cmake_args=(-S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90
              -DBATCHNORM_BUILD_EXAMPLES=ON -DBATCHNORM_BUILD_BENCHMARKS=ON -DBATCHNORM_BUILD_TESTS=ON)
  # The carried copies (tools/prepare_gpu_deps.sh) win over whatever the machine has.
  [[ -f $deps/googletest/CMakeLists.txt ]] &&
    cmake_args+=(-DCMAKE_DISABLE_FIND_PACKAGE_GTest=ON -DBATCHNORM_GTEST_SOURCE_DIR="$deps/googletest")
  [[ -d $deps/benchmark ]] && cmake_args+=(-Dbenchmark_DIR="$deps/benchmark/usr/lib/x86_64-linux-gnu/cmake/benchmark")
  [[ -d $deps/json ]] && cmake_args+=(-Dnlohmann_json_DIR="$deps/json/usr/share/cmake/nlohmann_json")
  # cuDNN: the toolkit's or the system's (found by CMake), else the one PyTorch's wheel brings.
  if ! ls /usr/local/cuda/include/cudnn.h /usr/include/cudnn.h /usr/include/x86_64-linux-gnu/cudnn.h >/dev/null 2>&1; then
    wheel=$(python3 -c 'import nvidia.cudnn, os; print(os.path.dirname(nvidia.cudnn.__file__))' 2>/dev/null || true)
    if [[ -n $wheel && -f $wheel/include/cudnn.h ]]; then
      lib=$(ls "$wheel"/lib/libcudnn.so* 2>/dev/null | head -1)
      cmake_args+=(-DCUDNN_INCLUDE_DIR="$wheel/include" -DCUDNN_LIBRARY="$lib")
      export LD_LIBRARY_PATH="$wheel/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
  fi
  run_stage configure 90 300 "$env_log" cmake "${cmake_args[@]}"
  targets=$(ninja -C "$build" -t targets all 2>/dev/null | grep -oE '^gpu_[A-Za-z0-9_]+_test:' | tr -d : | sort -u)
  # Everything the later stages run; the CPU tests are not built here (CI runs them).
  run_stage build 240 200 "$env_log" cmake --build "$build" -j "$jobs" --target $targets example_quickstart bench_cuda
fi

# ---- gpu-labelled tests ----------------------------------------------------------------------
# Every gpu test binary, each run whole (one process and one CUDA context per binary, not one
# per test case as `ctest -L gpu` would start: 360+ context creations cost a minute on their
# own); each time-boxed on its own. The quickstart (also labelled gpu) is its own stage below.
reserve=200
# Issue 11's own tests first (if time runs short, the older suites are the ones cut).
for binary in "$build/tests/gpu_launch_checks_test" "$build/tests/gpu_torch_extension_flags_test" \
              $(ls "$build"/tests/gpu_*_test 2>/dev/null | grep -v -e launch_checks -e torch_extension_flags); do
  [[ -x $binary && ! -d $binary ]] || continue
  run_stage "gpu test $(basename "$binary")" 90 "$reserve" "$tests_log" "$binary" --gtest_color=no
done
[[ -n $(ls "$build"/tests/gpu_*_test 2>/dev/null) ]] || note_stage "gpu tests" "FAIL (no gpu test binaries in $build/tests)" "$(basename "$tests_log")"

# ---- compute-sanitizer on the subset that runs every kernel ------------------------------------
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
if [[ -z $sanitizer ]]; then
  echo "compute-sanitizer not found" >> "$sanitizer_log"
  note_stage "compute-sanitizer" "$( ((dry_run)) && echo 'skipped (not installed; dry run)' || echo 'FAIL (not installed)')" \
    "$(basename "$sanitizer_log")"
else
  # The subset: GpuKernels.* runs every kernel (planar and row-major reductions and
  # elementwise passes, both finalizations, the deferred running update, eval constants) in
  # float, half and bfloat16; the torch-flags test runs the half types through the layers.
  reserve=130
  for tool in memcheck racecheck initcheck synccheck; do
    reserve=$((reserve - 10))
    extra=()
    [[ $tool == memcheck ]] && extra=(--leak-check full)
    run_stage "sanitizer $tool: gpu_launch_checks_test" 40 "$reserve" "$sanitizer_log" \
      "$sanitizer" --tool "$tool" --error-exitcode 1 "${extra[@]}" "$build/tests/gpu_launch_checks_test" \
      '--gtest_filter=GpuKernels.*'
    run_stage "sanitizer $tool: gpu_torch_extension_flags_test" 40 "$reserve" "$sanitizer_log" \
      "$sanitizer" --tool "$tool" --error-exitcode 1 "${extra[@]}" "$build/tests/gpu_torch_extension_flags_test"
  done
fi

# ---- quickstart ------------------------------------------------------------------------------
run_stage quickstart 30 100 "$quickstart_log" "$build/examples/example_quickstart"

# ---- bench_cuda (one process per op: a time-out loses one op, not all) and the PyTorch peer ----
bench=$build/benchmarks/bench_cuda
if [[ -x $bench ]]; then
  "$bench" --suite_json="$scratch/suite.json" --benchmark_filter=NONE >> "$bench_log" 2>&1
  reserve=70
  for op in train_forward infer_forward backward; do
    reserve=$((reserve - 5))
    run_stage "bench_cuda $op" 60 "$reserve" "$bench_log" "$bench" --benchmark_filter="^(DeviceCopy|$op/)" \
      --benchmark_out="$scratch/bench-$op.json" --benchmark_out_format=json
  done
else
  note_stage bench_cuda "FAIL (not built: Google Benchmark missing?)" "$(basename "$bench_log")"
fi
peer_limit=$(($(remaining) - 15))
((peer_limit > 90)) && peer_limit=90
if [[ -f $scratch/suite.json ]]; then
  run_stage "PyTorch peer (tools/gpu_peer.py)" 90 15 "$bench_log" \
    python3 "$root/tools/gpu_peer.py" --suite "$scratch/suite.json" --out "$peer_json" --budget-s $((peer_limit - 20))
fi

# ---- report ----------------------------------------------------------------------------------
# The writer: merges the per-op bench outputs (ARG 3: their folder) into OUT/bench.json, joins
# them with OUT/peer.json, and writes OUT/report.md. Exit 1 when a stage failed or timed out.
cat > "$scratch/report.py" <<'PY'
import glob, json, math, os, re, sys

out, stages_file, scratch, device, dry_run, elapsed, budget = sys.argv[1:8]
dry_run = dry_run == "1"

def read(path, limit=None):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""

# Merge the per-op bench JSON files into bench.json (a killed process leaves an unreadable one).
benchmarks, contexts, broken = [], [], []
for path in sorted(glob.glob(os.path.join(scratch, "bench-*.json"))):
    try:
        data = json.load(open(path))
        contexts.append(data.get("context", {}))
        benchmarks += data.get("benchmarks", [])
    except (OSError, ValueError):
        broken.append(os.path.basename(path))
json.dump({"context": contexts[0] if contexts else {}, "benchmarks": benchmarks, "unreadable": broken},
          open(os.path.join(out, "bench.json"), "w"), indent=1)

peer = {}
try:
    peer = json.load(open(os.path.join(out, "peer.json")))
except (OSError, ValueError):
    peer = {"skipped": "no peer.json"}
peer_by = {(r["op"], r["dtype"], r["key"]): r for r in peer.get("results", [])}

lines = []
w = lines.append
commit = re.search(r"^commit: (.*)$", read(os.path.join(out, "env-build.log")), re.M)
w("# GPU check report" + (" (DRY RUN: no GPU, nothing below was measured)" if dry_run else ""))
w("")
w(f"- device: {device}")
w(f"- commit: {commit.group(1) if commit else 'unknown'}")
w(f"- total: {elapsed} s of a {budget} s budget")
w("")
w("## Stages")
w("")
w("| stage | status | s | log |")
w("|---|---|---|---|")
failed = False
for line in read(stages_file).splitlines():
    name, status, seconds, log = (line.split("\t") + ["", "", "", ""])[:4]
    failed |= status.startswith("FAIL") or status.startswith("TIMEOUT")
    w(f"| {name} | {status} | {seconds} | {log} |")
w("")

tests = read(os.path.join(out, "tests.log"))
w("## gpu-labelled tests")
w("")
w("| binary | status | ran | passed | skipped | failed |")
w("|---|---|---|---|---|---|")
failed_names = []
for m in re.finditer(r"^== gpu test (\S+) \(limit.*?$(.*?)^== gpu test \1: (.*?)$", tests, re.M | re.S):
    body = m.group(2)
    count = lambda pattern: sum(int(x) for x in re.findall(pattern, body, re.M))
    ran = count(r"^\[==========\] (\d+) tests? from .* ran")
    passed = count(r"^\[  PASSED  \] (\d+) tests?")
    skipped = count(r"^\[  SKIPPED \] (\d+) tests?, listed below")
    failed = count(r"^\[  FAILED  \] (\d+) tests?, listed below")
    failed_names += re.findall(r"^\[  FAILED  \] (\S+)$", body, re.M)
    w(f"| {m.group(1)} | {m.group(3)} | {ran} | {passed} | {skipped} | {failed} |")
for name in failed_names[:40]:
    w(f"- FAILED: {name}")
w("")

san = read(os.path.join(out, "sanitizer.log"))
w("## compute-sanitizer")
w("")
for m in re.finditer(r"^== (sanitizer \S+: \S+) .*?$(.*?)^== \1: (.*?)$", san, re.M | re.S):
    errors = re.findall(r"ERROR SUMMARY: .*", m.group(2))
    w(f"- {m.group(1)}: {m.group(3)}; {errors[-1] if errors else 'no ERROR SUMMARY line'}")
if "compute-sanitizer not found" in san:
    w("- compute-sanitizer not found")
w("")

qs = read(os.path.join(out, "quickstart.log")).strip().splitlines()
w("## quickstart")
w("")
w("```")
lines += qs[-8:] if qs else ["(no output)"]
w("```")
w("")

# ---- benchmarks --------------------------------------------------------------------------------
w("## Benchmarks")
w("")
copy = [b for b in benchmarks if b.get("name", "").startswith("DeviceCopy") and not b.get("error_occurred")]
copy_gbps = copy[0]["GBps"] if copy else None
w(f"- device copy bandwidth (cudaMemcpyAsync D2D, read + write): "
  + (f"{copy_gbps:.0f} GB/s" if copy_gbps else "not measured"))
w(f"- PyTorch peer: " + (peer.get("skipped") or f"torch {peer.get('torch')} cuDNN {peer.get('cudnn')} on {peer.get('device')}"))
if broken:
    w(f"- unreadable (timed out?) bench outputs: {', '.join(broken)}")
errors = [b for b in benchmarks if b.get("error_occurred")]
if errors:
    w(f"- {len(errors)} benchmarks reported an error, e.g. `{errors[0].get('name')}`: {errors[0].get('error_message')}")
w("")
w("GB/s counts the minimum traffic (forward: x read + y written; backward: x, dy read + dx written). "
  "x cuDNN = cuDNN time / our time and x torch = PyTorch time / our time (> 1: we are faster); "
  "cuDNN is timed only where it computed the same result (checked before timing).")
w("")

rows, ratios = [], {}
for b in benchmarks:
    name = b.get("name", "")
    if name.startswith("DeviceCopy") or b.get("error_occurred"):
        continue
    parts = name.split("/")
    if len(parts) < 5:
        continue
    op, dtype, key = parts[0], parts[1], "/".join(parts[2:5])
    ours_us = b.get("us", 0)
    cudnn_ok, cudnn_us = b.get("cudnn_ok", -1), b.get("cudnn_us", 0)
    x_cudnn = cudnn_us / ours_us if ours_us and cudnn_us else None
    p = peer_by.get((op, dtype, key), {})
    x_torch = p["us"] / ours_us if ours_us and p.get("us") else None
    cudnn_cell = (f"{x_cudnn:.2f}" if x_cudnn else
                  ("mismatch (err %.2g)" % b.get("cudnn_err", -1) if cudnn_ok == 0
                   else "n/a " + b.get("label", "").replace("|", "/")[:40]))
    rows.append(f"| {op} | {dtype} | {key} | {ours_us:.1f} | {b.get('GBps', 0):.0f} | {b.get('pct_copy', 0):.0f}% "
                f"| {cudnn_cell} | {('%.2f' % x_torch) if x_torch else p.get('error', 'n/a')[:40].replace('|', '/')} |")
    agg = ratios.setdefault((op, dtype), {"pct": [], "cudnn": [], "torch": []})
    agg["pct"].append(b.get("pct_copy", 0))
    if x_cudnn:
        agg["cudnn"].append(x_cudnn)
    if x_torch:
        agg["torch"].append(x_torch)

def geomean(v):
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None

w("### Summary per op and type (geometric means over the suite)")
w("")
w("| op | type | cases | median % of copy | x cuDNN | x torch |")
w("|---|---|---|---|---|---|")
for (op, dtype), agg in ratios.items():
    pct = sorted(agg["pct"])
    med = pct[len(pct) // 2] if pct else 0
    gc, gt = geomean(agg["cudnn"]), geomean(agg["torch"])
    w(f"| {op} | {dtype} | {len(pct)} | {med:.0f}% | {('%.2f' % gc) if gc else 'n/a'} | {('%.2f' % gt) if gt else 'n/a'} |")
if not ratios:
    w("| (no measurements) | | | | | |")
w("")
w("### Every case")
w("")
w("| op | type | case | us | GB/s | % copy | x cuDNN | x torch |")
w("|---|---|---|---|---|---|---|---|")
lines += rows if rows else ["| (no measurements) | | | | | | | |"]
w("")

with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print(f"report: {os.path.join(out, 'report.md')}")
sys.exit(1 if failed else 0)
PY
python3 "$scratch/report.py" "$out" "$stages" "$scratch" "$device" "$dry_run" "$((SECONDS - started))" "$budget"
report_rc=$?

# ---- the output folder: at most 8 files, each well under 16 MiB ---------------------------------
for f in "$out"/*; do
  size=$(stat -c %s "$f")
  if ((size > 8 * 1024 * 1024)); then  # keep the end of an oversized log
    tail -c $((8 * 1024 * 1024)) "$f" > "$scratch/trim" && mv "$scratch/trim" "$f"
  fi
done
count=$(find "$out" -maxdepth 1 -type f | wc -l)
if ((count > 8)) || [[ ! -s $report ]]; then
  echo "gpu_check: output folder check failed: $count files, report.md $([[ -s $report ]] && echo present || echo missing)" >&2
  exit 1
fi
echo "gpu_check: $count files in $out ($((SECONDS - started)) s)"
if ((dry_run)); then
  # Every stage and the writer ran (the stages' results are expected skips here). The writer's
  # arithmetic has nothing to chew on without a GPU: feed it one made-up measurement per source
  # (copy 3000 GB/s; ours 100 us, 2000 GB/s; cuDNN 150 us; PyTorch 200 us) and check the row.
  selftest=$scratch/selftest
  mkdir -p "$selftest/bench"
  cat > "$selftest/bench/bench-train_forward.json" <<'JSON'
{"context": {}, "benchmarks": [
 {"name": "DeviceCopy/iterations:3/manual_time", "GBps": 3000.0},
 {"name": "train_forward/f32/resnet50/32x64x112x112/nchw/iterations:1/manual_time", "us": 100.0, "GBps": 2000.0,
  "pct_copy": 66.7, "cudnn_ok": 1, "cudnn_us": 150.0, "cudnn_err": 1e-6}]}
JSON
  echo '{"torch": "x", "results": [{"key": "resnet50/32x64x112x112/nchw", "dtype": "f32", "op": "train_forward", "us": 200.0}]}' \
    > "$selftest/peer.json"
  printf 'bench\tpass\t1\tbench.log\n' > "$selftest/stages"
  python3 "$scratch/report.py" "$selftest" "$selftest/stages" "$selftest/bench" "selftest" 0 1 1 > /dev/null || exit 1
  want='| train_forward | f32 | resnet50/32x64x112x112/nchw | 100.0 | 2000 | 67% | 1.50 | 2.00 |'
  grep -qF "$want" "$selftest/report.md" || { echo "gpu_check: report writer self-test: row not found: $want" >&2; exit 1; }
  grep -qF '3000 GB/s' "$selftest/report.md" || { echo "gpu_check: report writer self-test: copy bandwidth missing" >&2; exit 1; }
  grep -q '^## Benchmarks' "$report" && grep -q '^| gpu test gpu_launch_checks_test | pass' "$report" || exit 1
  echo "gpu_check: dry run OK (report writer self-test passed)"
  exit 0
fi
exit "$report_rc"
