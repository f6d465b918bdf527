// bench_cpu: the CPU backend side by side, in one process, on the same input buffers, with the
// peers a user would pick instead of it (issue 9):
//  - oneDNN (libdnnl-dev): dnnl::batch_normalization_forward / _backward primitives;
//  - libtorch (libtorch-dev, PyTorch's C++ side): at::native_batch_norm and
//    at::native_batch_norm_backward on CPU tensors wrapping our buffers;
//  - std::memcpy: of x into a same-size buffer (x_memcpy), and of 256 MiB buffers just before
//    and after each case's timed loop (the physical floor, x_floor).
// Storage: fp32, bf16, and fp16 (__half); neither peer takes half on the CPU, so its peers run
// bf16 on the same values (issue 9 sets our half against PyTorch's bf16), read from their own
// copy of x and dy; in fp32 and bf16 every implementation reads the same x and dy.
// Each peer is first CHECKED to compute what we compute on that shape and op (y, and libtorch's
// running statistics after a training forward; dx, dweight, dbias for backward) within a
// stated tolerance; a peer that is missing, refuses the case (throws) or differs is reported in
// the label and the *_ok counters and is not timed.
//
// Timing: every benchmark iteration calls each implementation once (ours, the same-size memcpy,
// the checked peers) in an order that rotates from one iteration to the next (interleaved, so
// drifts in clock speed or in the other tenants' load hit all alike); each call is timed with
// steady_clock; the reported time (manual time) is ours, and the counters hold
// per-implementation medians.
//
// Counters (see benchmarks/README.md): GBps = minimal bytes / our median time, where minimal
// bytes = forward (training or inference): x read + y written (2 S); backward: x and dy read +
// dx written (3 S) (S = numel * sizeof(storage type)); x_torch = torch median / ours,
// x_onednn = oneDNN median / ours (> 1: we are faster); x_floor = our median / (minimal bytes /
// memcpy_GBps), memcpy_GBps being the (read + write) bandwidth of the 256 MiB copies;
// x_memcpy = our median / same-size memcpy median.
//
// Threads: BN_BENCH_THREADS (default 1) sets omp_set_num_threads (ours, oneDNN: Debian's
// libdnnl uses the GNU OpenMP runtime) and at::set_num_threads (libtorch, also libgomp).
#include <batchnorm/batchnorm.hpp>
#if __has_include(<cuda_bf16.h>) && __has_include(<cuda_fp16.h>)
#define BN_BENCH_HAVE_BF16 1
#include <batchnorm/half.hpp>
#else
#define BN_BENCH_HAVE_BF16 0
#endif

#include <benchmark/benchmark.h>

#if BN_BENCH_HAVE_TORCH
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/version.h>
#endif
#if BN_BENCH_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GLIBC__) || __has_include(<malloc.h>)
#include <malloc.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace bn = batchnorm;

namespace {

constexpr double kEps = 1e-5;
constexpr double kMomentum = 0.1;

enum class Op { train, infer, backward };
const char* op_name(Op op) { return op == Op::train ? "train" : op == Op::infer ? "infer" : "backward"; }

// Storage type of the activations (parameters and statistics are float in every case).
enum class Storage { fp32, bf16, fp16 };
const char* storage_name(Storage s) { return s == Storage::fp32 ? "fp32" : s == Storage::bf16 ? "bf16" : "fp16"; }

struct Case {
  std::vector<std::int64_t> dims;  // (N, C) or (N, C, H, W)
  bool nhwc = false;
  Storage storage = Storage::fp32;
};

std::int64_t numel(const std::vector<std::int64_t>& d) {
  std::int64_t n = 1;
  for (auto e : d) n *= e;
  return n;
}

std::string dims_string(const std::vector<std::int64_t>& d, const char* sep) {
  std::ostringstream os;
  for (std::size_t i = 0; i < d.size(); ++i) os << (i ? sep : "") << d[i];
  return os.str();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

template <class F>
double seconds(F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Storage values as doubles and from floats, with the toolkit's host conversions for the half
// types (independent of the library's own).
template <class T>
double as_double_any(const T& v) {
#if BN_BENCH_HAVE_BF16
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
#endif
  if constexpr (std::is_arithmetic_v<T>) return static_cast<double>(v);
}
template <class T>
T from_float(float f) {
#if BN_BENCH_HAVE_BF16
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(f);
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(f);
#endif
  if constexpr (std::is_arithmetic_v<T>) return f;
}

// The storage type the peers run a case in: our own, except for half, which neither peer takes
// on the CPU (PyTorch 1.13: "batch_norm" not implemented for 'Half'); issue 9 compares our half
// with the peers' bfloat16, on the same values.
template <class T>
struct peer_storage {
  using type = T;
};
#if BN_BENCH_HAVE_BF16
template <>
struct peer_storage<__half> {
  using type = __nv_bfloat16;
};
#endif

// Max |a - b| / max(1, max |b|): differences relative to the output's scale.
template <class A, class B>
double scaled_diff(const A* a, const B* b, std::size_t n) {
  double scale = 1, diff = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double ai = as_double_any(a[i]), bi = as_double_any(b[i]);
    scale = std::max(scale, std::abs(bi));
    const double d = std::abs(ai - bi);
    diff = (d > diff || std::isnan(d)) ? (std::isnan(d) ? INFINITY : d) : diff;
  }
  return diff / scale;
}

// One implementation in a benchmark: how to run it once, and whether it may be timed.
struct Impl {
  std::string name;
  std::function<void()> run;
  bool ok = false;
  double err = -1;   // scaled difference from ours (the largest over the compared outputs)
  std::string note;  // "missing", "refused: ...", "differs", "ok"
  std::vector<double> times;
};

// The inputs and the outputs of every implementation for one case.
// Every implementation reads the same input buffers x and dy when the peers' storage type P is
// ours (fp32, bf16): all of them then find the inputs equally warm or cold in the caches,
// whichever ran before (round fifteen measured a private copy for the peers, shared by PyTorch
// and oneDNN, costing ours up to 2x on a working set that fits in the last-level cache). Only
// for half (P = bfloat16) do the peers read their own copies, x_peer and dy_peer, of the same
// values.
template <class T, class P = typename peer_storage<T>::type>
struct Buffers {
  static constexpr bool kSharedInputs = std::is_same_v<P, T>;
  std::vector<T> x, dy, y_ours, dx_ours, copy;
  std::vector<P> x_peer, dy_peer, y_peer, dx_peer;  // x_peer, dy_peer: empty when kSharedInputs
  std::vector<float> weight, bias, running_mean, running_var;
  std::vector<float> dweight_peer, dbias_peer;
  // What the peers read for input @p ours (x or dy): that buffer itself, or its copy in P.
  P* peer_input(std::vector<T>& ours, std::vector<P>& copy) {
    if constexpr (kSharedInputs)
      return ours.data();
    else
      return copy.data();
  }
  Buffers(std::int64_t n, std::int64_t c)
      : x(n), dy(n), y_ours(n), dx_ours(n), copy(n), x_peer(kSharedInputs ? 0 : n), dy_peer(kSharedInputs ? 0 : n),
        y_peer(n), dx_peer(n), weight(c), bias(c), running_mean(c), running_var(c), dweight_peer(c), dbias_peer(c) {
    std::mt19937 gen(12345);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    // Per-feature offset and spread, so the statistics matter; x's layout does not matter
    // for the values' distribution.
    for (std::int64_t i = 0; i < n; ++i) x[i] = from_float<T>(0.5f + 2.f * normal(gen));
    for (std::int64_t i = 0; i < n; ++i) dy[i] = from_float<T>(normal(gen));
    if constexpr (!kSharedInputs) {
      for (std::int64_t i = 0; i < n; ++i) x_peer[i] = from_float<P>(static_cast<float>(as_double_any(x[i])));
      for (std::int64_t i = 0; i < n; ++i) dy_peer[i] = from_float<P>(static_cast<float>(as_double_any(dy[i])));
    }
    for (std::int64_t j = 0; j < c; ++j) {
      weight[j] = 0.5f + u(gen);
      bias[j] = u(gen) - 0.5f;
      running_mean[j] = 0.5f + 0.2f * (u(gen) - 0.5f);
      running_var[j] = 4.f * (0.5f + u(gen));
    }
  }
};

// Tolerances on the scaled difference: float peers accumulate in float (errors up to ~1e-4 of
// the scale measured in issue 9); bfloat16 outputs may round to neighbouring values (2^-8
// relative) from slightly different float intermediates; half against the peers' bfloat16 adds
// bfloat16's rounding of the inputs (2^-9 relative).
template <class T>
double tolerance() {
  return sizeof(T) == 2 ? 1.0 / 64 : 1e-3;
}

// The memory floor: bandwidth (bytes read + written per second) of std::memcpy between two
// buffers far larger than the caches, allocated and faulted in once.
struct LargeCopy {
  static constexpr std::size_t kBytes = std::size_t{256} << 20;
  std::vector<char> src = std::vector<char>(kBytes, 1), dst = std::vector<char>(kBytes, 0);
  std::vector<double> copy_times(int copies) {
    std::vector<double> t;
    for (int i = 0; i < copies; ++i) {
      t.push_back(seconds([&] { std::memcpy(dst.data(), src.data(), kBytes); }));
      benchmark::DoNotOptimize(dst.data());
    }
    return t;
  }
  static double GBps(double seconds) { return 2.0 * static_cast<double>(kBytes) / seconds * 1e-9; }
};
LargeCopy* g_large_copy = nullptr;
int g_threads = 1;

// ---------------------------------------------------------------------------------------------
#if BN_BENCH_HAVE_TORCH
template <class P>
at::ScalarType torch_dtype() {
  return sizeof(P) == 2 ? at::kBFloat16 : at::kFloat;  // P: float or bfloat16 (peer_storage)
}
at::Tensor torch_wrap(void* p, const Case& c, at::ScalarType dt) {
  const auto& d = c.dims;
  std::vector<std::int64_t> strides(d.size());
  if (c.nhwc) {  // (N, C, H, W) sizes, channels_last strides
    strides = {d[1] * d[2] * d[3], 1, d[3] * d[1], d[1]};
  } else {
    std::int64_t s = 1;
    for (std::size_t i = d.size(); i-- > 0;) strides[i] = s, s *= d[i];
  }
  return at::from_blob(p, d, strides, at::TensorOptions().dtype(dt).device(at::kCPU));
}
at::Tensor torch_vec(std::vector<float>& v) {
  return at::from_blob(v.data(), {static_cast<std::int64_t>(v.size())}, at::TensorOptions().dtype(at::kFloat));
}
// A torch result copied into our layout (contiguous, or channels_last for NHWC).
at::Tensor torch_in_our_layout(const at::Tensor& t, const Case& c) {
  return c.nhwc ? t.contiguous(at::MemoryFormat::ChannelsLast) : t.contiguous();
}
#endif

#if BN_BENCH_HAVE_ONEDNN
dnnl::engine& dnnl_engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}
dnnl::stream& dnnl_stream() {
  static dnnl::stream s(dnnl_engine());
  return s;
}
#endif

// ---------------------------------------------------------------------------------------------
template <class T, int Dims>
void run_case(benchmark::State& state, const Case& cs, Op op) {
  const std::int64_t n = numel(cs.dims), C = cs.dims[1];
  const std::size_t un = static_cast<std::size_t>(n);
  using P = typename peer_storage<T>::type;  // the peers' storage type
  Buffers<T> b(n, C);
  const bn::Shape shape(cs.dims.data(), cs.dims.size(), cs.nhwc ? bn::Layout::channels_last : bn::Layout::contiguous);

  // ---- ours
  bn::BatchNorm<T, Dims, bn::cpu> layer(C);
  bn::State<float> st;
  st.weight = b.weight;
  st.bias = b.bias;
  st.running_mean = b.running_mean;
  st.running_var = b.running_var;
  layer.load_state(st);
  std::vector<float> ours_dw, ours_db;
  Impl ours{"ours", {}, true, 0, "ok", {}};
  if (op == Op::train) {
    layer.train();
    ours.run = [&] { layer.forward(b.x.data(), b.y_ours.data(), shape); };
  } else if (op == Op::infer) {
    layer.eval();
    ours.run = [&] { layer.forward(b.x.data(), b.y_ours.data(), shape); };
  } else {
    layer.train();
    layer.forward(b.x.data(), b.y_ours.data(), shape);
    ours.run = [&] { layer.backward(b.x.data(), b.dy.data(), b.dx_ours.data(), shape); };
  }
  ours.run();
  std::vector<float> ours_running_mean, ours_running_var;  // after one training forward
  if (op == Op::backward) {
    const auto g = layer.gradients();
    ours_dw = g.grad_weight;
    ours_db = g.grad_bias;
  } else if (op == Op::train) {
    const auto s = layer.state();
    ours_running_mean = s.running_mean;
    ours_running_var = s.running_var;
  }
  // Compares the peer's outputs (in b.y_peer / b.dx_peer, b.dweight_peer, b.dbias_peer) with ours;
  // other_err: the largest difference of any other output the caller compared.
  auto compare = [&](Impl& p, double other_err) {
    if (op == Op::backward) {
      p.err = std::max({scaled_diff(b.dx_peer.data(), b.dx_ours.data(), un),
                        scaled_diff(b.dweight_peer.data(), ours_dw.data(), ours_dw.size()),
                        scaled_diff(b.dbias_peer.data(), ours_db.data(), ours_db.size())});
    } else {
      p.err = scaled_diff(b.y_peer.data(), b.y_ours.data(), un);
    }
    p.err = std::max(p.err, other_err);
    p.ok = p.err <= tolerance<T>();
    std::ostringstream os;
    os << (p.ok ? "ok" : "differs") << " (" << p.err << ")";
    p.note = os.str();
  };
  auto try_check = [&](Impl& p, const std::function<void()>& check) {
    try {
      check();
    } catch (const std::exception& e) {
      std::string what = e.what();
      what = what.substr(0, what.find('\n'));
      p.ok = false;
      p.note = "refused: " + what.substr(0, 80);
    }
  };

  (void)compare;  // unused when built without either peer
  (void)try_check;

  // ---- libtorch
  Impl torch{"torch", {}, false, -1, "missing", {}};
#if BN_BENCH_HAVE_TORCH
  const auto dt = torch_dtype<P>();
  at::Tensor tx = torch_wrap(b.peer_input(b.x, b.x_peer), cs, dt),
             tdy = torch_wrap(b.peer_input(b.dy, b.dy_peer), cs, dt);
  // Parameters as float (PyTorch's mixed bf16 mode); if the peer refuses that, bf16 params.
  std::vector<float> t_rm = b.running_mean, t_rv = b.running_var;
  at::Tensor tw = torch_vec(b.weight), tb = torch_vec(b.bias), trm = torch_vec(t_rm), trv = torch_vec(t_rv);
  try_check(torch, [&] {
    double running_err = 0;
    if (op != Op::backward) {
      const bool training = op == Op::train;
      auto fwd = [&, training] {
        return at::native_batch_norm(tx, tw, tb, trm, trv, training, kMomentum, kEps);
      };
      // PyTorch allocates y (and save_mean / save_invstd) per call: what its users pay.
      at::Tensor yl = torch_in_our_layout(std::get<0>(fwd()), cs);
      std::memcpy(b.y_peer.data(), yl.data_ptr(), un * sizeof(P));
      if (training)  // the running statistics after one update (unbiased variance, momentum 0.1)
        running_err = std::max(scaled_diff(t_rm.data(), ours_running_mean.data(), t_rm.size()),
                               scaled_diff(t_rv.data(), ours_running_var.data(), t_rv.size()));
      torch.run = [fwd] { benchmark::DoNotOptimize(fwd()); };
    } else {
      auto f = at::native_batch_norm(tx, tw, tb, trm, trv, true, kMomentum, kEps);
      at::Tensor sm = std::get<1>(f), si = std::get<2>(f);
      auto bwd = [&, sm, si] {
        return at::native_batch_norm_backward(tdy, tx, tw, trm, trv, sm, si, true, kEps, {true, true, true});
      };
      auto r = bwd();
      at::Tensor dxl = torch_in_our_layout(std::get<0>(r), cs);
      std::memcpy(b.dx_peer.data(), dxl.data_ptr(), un * sizeof(P));
      at::Tensor dw = std::get<1>(r).to(at::kFloat).contiguous(), db = std::get<2>(r).to(at::kFloat).contiguous();
      std::memcpy(b.dweight_peer.data(), dw.data_ptr(), C * sizeof(float));
      std::memcpy(b.dbias_peer.data(), db.data_ptr(), C * sizeof(float));
      torch.run = [bwd] { benchmark::DoNotOptimize(bwd()); };
    }
    compare(torch, running_err);
  });
#endif

  // ---- oneDNN
  Impl onednn{"onednn", {}, false, -1, "missing", {}};
#if BN_BENCH_HAVE_ONEDNN
  using dnnl::memory;
  using nf = dnnl::normalization_flags;
  std::vector<float> d_mean(C), d_var(C), d_scale = b.weight, d_shift = b.bias;
  std::unique_ptr<dnnl::primitive> d_prim;
  std::unordered_map<int, memory> d_args;
  try_check(onednn, [&] {
    auto& eng = dnnl_engine();
    const auto ddt = sizeof(P) == 2 ? memory::data_type::bf16 : memory::data_type::f32;
    const auto tag = cs.dims.size() == 2 ? memory::format_tag::nc
                     : cs.nhwc           ? memory::format_tag::nhwc
                                         : memory::format_tag::nchw;
    const memory::desc md(memory::dims(cs.dims.begin(), cs.dims.end()), ddt, tag);
    const memory::desc pmd({C}, memory::data_type::f32, memory::format_tag::a);
    const auto flags = nf::use_scale | nf::use_shift;
    memory src(md, eng, b.peer_input(b.x, b.x_peer)), dst(md, eng, b.y_peer.data());
    memory scale(pmd, eng, d_scale.data()), shift(pmd, eng, d_shift.data());
    memory mean(pmd, eng, d_mean.data()), var(pmd, eng, d_var.data());
    if (op == Op::infer) {
      std::copy(b.running_mean.begin(), b.running_mean.end(), d_mean.begin());
      std::copy(b.running_var.begin(), b.running_var.end(), d_var.begin());
    }
    const auto fwd_flags = op == Op::infer ? flags | nf::use_global_stats : flags;
    const auto prop = op == Op::infer ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
    dnnl::batch_normalization_forward::primitive_desc fpd(
        dnnl::batch_normalization_forward::desc(prop, md, static_cast<float>(kEps), fwd_flags), eng);
    std::unordered_map<int, memory> fargs{{DNNL_ARG_SRC, src},     {DNNL_ARG_DST, dst},  {DNNL_ARG_SCALE, scale},
                                          {DNNL_ARG_SHIFT, shift}, {DNNL_ARG_MEAN, mean}, {DNNL_ARG_VARIANCE, var}};
    auto fprim = std::make_unique<dnnl::batch_normalization_forward>(fpd);
    fprim->execute(dnnl_stream(), fargs);
    dnnl_stream().wait();
    if (op != Op::backward) {
      d_prim = std::move(fprim);
      d_args = fargs;
    } else {
      memory ddy(md, eng, b.peer_input(b.dy, b.dy_peer)), ddx(md, eng, b.dx_peer.data());
      memory dscale(pmd, eng, b.dweight_peer.data()), dshift(pmd, eng, b.dbias_peer.data());
      dnnl::batch_normalization_backward::primitive_desc bpd(
          dnnl::batch_normalization_backward::desc(dnnl::prop_kind::backward, md, md, static_cast<float>(kEps), flags),
          eng, fpd);
      d_prim = std::make_unique<dnnl::batch_normalization_backward>(bpd);
      d_args = {{DNNL_ARG_SRC, src},         {DNNL_ARG_MEAN, mean},         {DNNL_ARG_VARIANCE, var},
                {DNNL_ARG_DIFF_DST, ddy},    {DNNL_ARG_SCALE, scale},       {DNNL_ARG_SHIFT, shift},
                {DNNL_ARG_DIFF_SRC, ddx},
                {DNNL_ARG_DIFF_SCALE, dscale}, {DNNL_ARG_DIFF_SHIFT, dshift}};
      d_prim->execute(dnnl_stream(), d_args);
      dnnl_stream().wait();
    }
    onednn.run = [&] {
      d_prim->execute(dnnl_stream(), d_args);
      dnnl_stream().wait();
    };
    compare(onednn, 0);  // oneDNN keeps no running statistics
  });
#endif

  // ---- memcpy of the same buffers (x -> copy): the same working set's copy time.
  Impl copy{"memcpy", [&] { std::memcpy(b.copy.data(), b.x.data(), un * sizeof(T)); }, true, 0, "ok", {}};

  std::vector<Impl*> impls{&ours, &copy};
  if (torch.ok) impls.push_back(&torch);
  if (onednn.ok) impls.push_back(&onednn);
  // The floor of this case: large copies just before and just after its timed loop, so that it
  // sees the same load from the machine's other tenants as the timed calls.
  std::vector<double> floor_times = g_large_copy->copy_times(3);
  std::size_t start = 0;
  for (auto _ : state) {
    double t_ours = 0;
    for (std::size_t k = 0; k < impls.size(); ++k) {
      Impl* p = impls[(start + k) % impls.size()];
      const double t = seconds(p->run);
      p->times.push_back(t);
      if (p == &ours) t_ours = t;
    }
    start = (start + 1) % impls.size();
    benchmark::ClobberMemory();
    state.SetIterationTime(t_ours);
  }

  for (double t : g_large_copy->copy_times(3)) floor_times.push_back(t);
  const double memcpy_GBps = LargeCopy::GBps(median(floor_times));
  const double bytes = static_cast<double>(un * sizeof(T)) * (op == Op::backward ? 3 : 2);
  const double m_ours = median(ours.times);
  auto& k = state.counters;
  k["ms"] = m_ours * 1e3;
  k["GBps"] = bytes / m_ours * 1e-9;
  k["memcpy_GBps"] = memcpy_GBps;
  k["x_floor"] = m_ours / (bytes / (memcpy_GBps * 1e9));
  k["x_memcpy"] = m_ours / median(copy.times);
  k["x_torch"] = torch.ok ? median(torch.times) / m_ours : 0;
  k["x_onednn"] = onednn.ok ? median(onednn.times) / m_ours : 0;
  k["torch_ms"] = torch.ok ? median(torch.times) * 1e3 : 0;
  k["onednn_ms"] = onednn.ok ? median(onednn.times) * 1e3 : 0;
  k["torch_ok"] = torch.ok;
  k["onednn_ok"] = onednn.ok;
  k["torch_err"] = torch.err;
  k["onednn_err"] = onednn.err;
#ifdef _OPENMP
  k["omp_threads"] = omp_get_max_threads();
#endif
  const std::string peers_in = std::is_same_v<P, T> ? "" : "; peers ran bf16 on the same values";
  state.SetLabel("torch " + torch.note + "; onednn " + onednn.note + peers_in);
}

void register_all() {
  // Issue 9's table.
  const std::vector<std::pair<std::string, Case>> cases{
      {"nchw", {{8, 64, 112, 112}}},          {"nchw", {{8, 256, 56, 56}}}, {"nchw", {{8, 1024, 14, 14}}},
      {"nchw", {{8, 2048, 7, 7}}},            {"nchw", {{8, 4, 224, 224}}}, {"nc", {{125000, 50}}},
      {"nc", {{3136, 256}}},                  {"nc", {{128, 8192}}},        {"nhwc", {{8, 256, 56, 56}, true}},
      {"nc", {{16384, 1024}}},  // beyond issue 9's table: wide rows from memory (64 MiB)
      {"nchw", {{8, 256, 56, 56}, false, Storage::bf16}},
      {"nchw", {{8, 256, 56, 56}, false, Storage::fp16}},  // peers in bfloat16 (peer_storage)
      {"nhwc", {{8, 256, 56, 56}, true, Storage::bf16}},   // 16-bit rows: the channels-last loops
      {"nhwc", {{8, 256, 56, 56}, true, Storage::fp16}},
  };
  for (Op op : {Op::train, Op::infer, Op::backward}) {
    for (const auto& entry : cases) {
      const std::string& layout = entry.first;
      const Case cs = entry.second;  // a variable, not a structured binding: lambdas capture it
      const std::string name = std::string(op_name(op)) + "/" + layout + "/" + storage_name(cs.storage) + "/" +
                               dims_string(cs.dims, "x");
      benchmark::internal::Benchmark* bm = nullptr;
      if (cs.storage != Storage::fp32) {
#if BN_BENCH_HAVE_BF16
        bm = benchmark::RegisterBenchmark(name.c_str(), [cs, op](benchmark::State& s) {
          if (cs.storage == Storage::bf16)
            run_case<__nv_bfloat16, 2>(s, cs, op);
          else
            run_case<__half, 2>(s, cs, op);
        });
#else
        bm = benchmark::RegisterBenchmark(name.c_str(), [](benchmark::State& s) {
          s.SkipWithError("bf16 and fp16 need <cuda_bf16.h> and <cuda_fp16.h> (the CUDA toolkit's include directory) at build time");
        });
#endif
      } else if (cs.dims.size() == 2) {
        bm = benchmark::RegisterBenchmark(name.c_str(), [cs, op](benchmark::State& s) { run_case<float, 1>(s, cs, op); });
      } else {
        bm = benchmark::RegisterBenchmark(name.c_str(), [cs, op](benchmark::State& s) { run_case<float, 2>(s, cs, op); });
      }
      bm->UseManualTime()->Unit(benchmark::kMillisecond);
    }
  }
}

// Start-up floor: the median of 20 large copies (after one that warms up), and the fastest
// one (both stated in the context, as a measure of how much the machine's other tenants slowed
// the median).
std::pair<double, double> measure_memcpy_GBps() {
  g_large_copy->copy_times(1);
  const auto t = g_large_copy->copy_times(20);
  return {LargeCopy::GBps(median(t)), LargeCopy::GBps(*std::min_element(t.begin(), t.end()))};
}

}  // namespace

int main(int argc, char** argv) {
  // libtorch allocates its outputs (y; dx, dweight, dbias) on every call with malloc. glibc
  // serves a block above its mmap threshold (initially 128 KiB, raised as such blocks are
  // freed) with fresh pages, faulted in on first touch: then libtorch's time would depend on
  // which cases ran before in the process (backward on (8,2048,7,7) measured 22.8 ms alone,
  // 2.3 ms in a full run, 1.8 ms with this setting). Fixing the thresholds at their ceiling
  // serves every block up to 32 MiB from a heap that is reused, as in a long-running training
  // process.
  std::string malloc_setting = "glibc defaults";
#if defined(M_MMAP_THRESHOLD) && defined(M_TRIM_THRESHOLD)
  if (mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 && mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1)
    malloc_setting = "mallopt M_MMAP_THRESHOLD = 32 MiB, M_TRIM_THRESHOLD = 1 GiB";
#endif
  if (const char* e = std::getenv("BN_BENCH_THREADS")) g_threads = std::max(1, std::atoi(e));
#ifdef _OPENMP
  omp_set_num_threads(g_threads);
#endif
#if BN_BENCH_HAVE_TORCH
  at::set_num_threads(g_threads);
#endif
  LargeCopy large_copy;
  g_large_copy = &large_copy;
  const auto [memcpy_median, memcpy_best] = measure_memcpy_GBps();
  register_all();

  benchmark::Initialize(&argc, argv);
  const char* omp_env = std::getenv("OMP_NUM_THREADS");
  benchmark::AddCustomContext("BN_BENCH_THREADS", std::to_string(g_threads));
  benchmark::AddCustomContext("OMP_NUM_THREADS", omp_env ? omp_env : "(unset)");
  benchmark::AddCustomContext("benchmark_threads", "1 (each benchmark runs in one Google Benchmark thread)");
#ifdef _OPENMP
  benchmark::AddCustomContext("omp_max_threads", std::to_string(omp_get_max_threads()));
#else
  benchmark::AddCustomContext("omp_max_threads", "(bench_cpu built without OpenMP)");
#endif
  benchmark::AddCustomContext("malloc", malloc_setting);
  benchmark::AddCustomContext("memcpy_GBps", std::to_string(memcpy_median));
  benchmark::AddCustomContext("memcpy_best_GBps", std::to_string(memcpy_best));
#if BN_BENCH_HAVE_TORCH
  benchmark::AddCustomContext("torch", std::string(TORCH_VERSION) + ", at::get_num_threads() = " +
                                           std::to_string(at::get_num_threads()));
#else
  benchmark::AddCustomContext("torch", "missing (libtorch-dev not found at build time)");
#endif
#if BN_BENCH_HAVE_ONEDNN
  {
    const auto* v = dnnl::version();
    std::ostringstream os;
    const unsigned rt = v->cpu_runtime;
    os << v->major << "." << v->minor << "." << v->patch << ", cpu runtime "
       << (rt == DNNL_RUNTIME_OMP ? "OpenMP" : rt == DNNL_RUNTIME_TBB ? "TBB" : rt == DNNL_RUNTIME_SEQ ? "sequential" : "other")
       << ", effective isa 0x" << std::hex << static_cast<unsigned>(dnnl::get_effective_cpu_isa());
    benchmark::AddCustomContext("onednn", os.str());
  }
#else
  benchmark::AddCustomContext("onednn", "missing (libdnnl-dev not found at build time)");
#endif
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
