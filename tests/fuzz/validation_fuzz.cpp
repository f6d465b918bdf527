// libFuzzer target for the argument validation of the CPU API.
//
// The input decodes into a Shape (rank 1-6, extents small, zero, negative or huge), Options
// (eps and momentum from a list of edge values or raw bits), a layer class (BatchNorm1d/2d/3d,
// float or double) and a short program of calls: forward / forward_relu / backward /
// backward_relu (with this or another shape, null, overlapping or in-place pointers),
// load_state (members of right or wrong sizes, any num_batches_tracked), train / eval,
// zero_grad; or calls of the functional forward / backward with per-feature spans of right or
// wrong sizes and arbitrary ForwardConfig / BackwardConfig scalars.
//
// Host buffers are always honest (a span's size is its allocation's) and capped at a small
// element count; a call whose shape needs more than the cap gets null activation pointers, so
// it must be rejected before any memory is touched.
//
// Findings: any exception other than batchnorm::invalid_argument / batchnorm::state_error,
// any sanitizer report (out-of-bounds, use of null, signed overflow, ...), and any throwing
// call that changed the layer (state, gradients, counters, saved statistics) or an output
// buffer — the strong guarantee.
#include <batchnorm/batchnorm.hpp>
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <vector>

namespace bn = batchnorm;

namespace {

constexpr std::int64_t cap = 4096;        // largest activation buffer allocated
constexpr std::int64_t feature_cap = 4096;  // largest layer (num_features) constructed

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "FINDING: %s\n", what);
  std::abort();
}

/// spatial() and C · spatial() computed with overflow checks (-1 on overflow).
std::int64_t safe_spatial(const bn::Shape& s) {
  std::int64_t p = 1;
  for (int d = 2; d < s.rank(); ++d)
    if (__builtin_mul_overflow(p, s[d], &p)) return -1;
  return p;
}
std::int64_t safe_features(const bn::Shape& s) {
  const std::int64_t S = safe_spatial(s);
  std::int64_t f = 0;
  if (S < 0 || __builtin_mul_overflow(s.channels(), S, &f)) return -1;
  return f;
}

std::int64_t extent(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 15)) {
    case 0: return 0;
    case 1: return -in.ConsumeIntegralInRange<std::int64_t>(1, 3);
    case 2: return std::int64_t{1} << in.ConsumeIntegralInRange<int>(20, 62);
    case 3: return std::numeric_limits<std::int64_t>::max();
    case 4: return std::numeric_limits<std::int64_t>::min();
    case 5: return in.ConsumeIntegral<std::int64_t>();
    default: return in.ConsumeIntegralInRange<std::int64_t>(1, 9);
  }
}

double edge_double(FuzzedDataProvider& in, double typical) {
  switch (in.ConsumeIntegralInRange<int>(0, 11)) {
    case 0: return 0.0;
    case 1: return -typical;
    case 2: return std::numeric_limits<double>::quiet_NaN();
    case 3: return std::numeric_limits<double>::infinity();
    case 4: return -std::numeric_limits<double>::infinity();
    case 5: return std::numeric_limits<double>::denorm_min();
    case 6: return 1.0;
    case 7: return 1.0 + 1e-16 * in.ConsumeIntegralInRange<int>(0, 4);
    case 8: {
      double d;
      const std::uint64_t bits = in.ConsumeIntegral<std::uint64_t>();
      std::memcpy(&d, &bits, sizeof d);
      return d;
    }
    case 9: return in.ConsumeFloatingPointInRange<double>(-2.0, 2.0);
    default: return typical;
  }
}

/// Builds a Shape of rank 1-6 (1 and 6 are errors), or nothing when its constructor throws.
std::optional<bn::Shape> make_shape(FuzzedDataProvider& in) {
  const int rank = in.ConsumeIntegralInRange<int>(0, 15) == 0 ? (in.ConsumeBool() ? 1 : 6)
                                                               : in.ConsumeIntegralInRange<int>(2, 5);
  std::int64_t e[6];
  for (auto& v : e) v = extent(in);
  const auto layout = in.ConsumeBool() ? bn::Layout::channels_last : bn::Layout::contiguous;
  std::optional<bn::Shape> s;
  try {
    switch (rank) {
      case 1: s.emplace(bn::Shape({e[0]}, layout)); break;
      case 2: s.emplace(bn::Shape({e[0], e[1]}, layout)); break;
      case 3: s.emplace(bn::Shape({e[0], e[1], e[2]}, layout)); break;
      case 4: s.emplace(bn::Shape({e[0], e[1], e[2], e[3]}, layout)); break;
      case 5: s.emplace(bn::Shape({e[0], e[1], e[2], e[3], e[4]}, layout)); break;
      default: s.emplace(bn::Shape({e[0], e[1], e[2], e[3], e[4], e[5]}, layout)); break;
    }
  } catch (const bn::invalid_argument& ex) {
    if (ex.argument() != "shape") finding("Shape threw with an argument other than \"shape\"");
    if (rank == 2 && e[0] >= 0 && e[1] >= 0 && e[0] <= 1 << 20 && e[1] <= 1 << 20)
      finding("Shape rejected a small valid rank 2 shape");
    return std::nullopt;
  }
  if (rank == 1 || rank == 6) finding("Shape accepted a rank outside 2..5");
  // numel(), spatial() and the per_activation feature count C · spatial must all be
  // computable for an accepted shape (N = 0 makes numel() 0 but not C · spatial).
  if (safe_features(*s) < 0) {
#ifdef BATCHNORM_FUZZ_IGNORE_KNOWN
    return std::nullopt;  // known: errors_test ShapeErrors.ZeroSizeShapeWhoseOtherExtentsOverflow
#else
    finding("Shape accepted extents whose spatial() or C * spatial() overflows int64");
#endif
  }
  return s;
}

/// Runs @p fn; a batchnorm typed error returns true, any other exception is a finding.
template <class Fn>
bool throws_typed(Fn&& fn) {
  try {
    fn();
    return false;
  } catch (const bn::invalid_argument& e) {
    if (e.argument().empty()) finding("invalid_argument with an empty argument()");
    if (std::strlen(e.what()) == 0) finding("invalid_argument with an empty message");
    return true;
  } catch (const bn::state_error& e) {
    if (std::strlen(e.what()) == 0) finding("state_error with an empty message");
    return true;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "untyped exception: %s\n", e.what());
    finding("an exception other than batchnorm::invalid_argument / state_error");
  } catch (...) {
    finding("a non-std exception");
  }
}

template <class E>
bool same_bits(const std::vector<E>& a, const std::vector<E>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(E)) == 0);
}

/// Activation buffers for one call: x, y, dy, dx, z in one pool so that overlaps can be made.
template <class T>
struct Activations {
  std::vector<T> pool;
  T *x = nullptr, *y = nullptr, *dy = nullptr, *dx = nullptr, *z = nullptr, *fy = nullptr;

  Activations(FuzzedDataProvider& in, const bn::Shape& s) {
    const std::int64_t n = s.numel();
    if (n > cap) return;  // all null: the call must be refused before touching memory
    pool.resize(static_cast<std::size_t>(6 * n + 8));
    for (std::size_t i = 0; i < pool.size(); ++i) pool[i] = static_cast<T>(std::sin(0.37 * static_cast<double>(i)) * 3.0);
    if (in.ConsumeIntegralInRange<int>(0, 31) == 0) pool[in.ConsumeIntegralInRange<std::size_t>(0, pool.size() - 1)] = T(NAN);
    T* base = pool.data();
    // Slots 0..5 of n elements each (+1 spare); a pointer may be moved into another slot,
    // shifted by a few elements (partial overlap), or be null.
    auto pick = [&](int slot) -> T* {
      switch (in.ConsumeIntegralInRange<int>(0, 15)) {
        case 0: return nullptr;
        case 1: return base + static_cast<std::int64_t>(in.ConsumeIntegralInRange<int>(0, 5)) * n;
        case 2: return base + slot * n + in.ConsumeIntegralInRange<int>(1, 7);
        default: return base + slot * n;
      }
    };
    x = pick(0);
    y = pick(1);
    dy = pick(2);
    dx = pick(3);
    z = pick(4);
    fy = pick(5);
    // Keep every pointer inside the pool: a shifted slot 5 could run past the end.
    auto clamp = [&](T*& p) {
      if (p && p + n > base + pool.size()) p = base + (pool.size() - static_cast<std::size_t>(n));
    };
    for (T** p : {&x, &y, &dy, &dx, &z, &fy}) clamp(*p);
  }
};

/// What a throwing call must leave alone.
template <class Layer>
struct Snapshot {
  using P = typename Layer::param_type;
  bn::State<P> state;
  bn::Gradients<P> grads;
  std::vector<P> save_mean, save_invstd;
  std::int64_t batches, skipped;
  bool training;

  explicit Snapshot(const Layer& l)
      : state(l.state()),
        grads(l.gradients()),
        save_mean(l.save_mean_data(), l.save_mean_data() + l.num_features()),
        save_invstd(l.save_invstd_data(), l.save_invstd_data() + l.num_features()),
        batches(l.num_batches_tracked()),
        skipped(l.nonfinite_batches_skipped()),
        training(l.is_training()) {}

  bool operator==(const Snapshot& o) const {
    return same_bits(state.weight, o.state.weight) && same_bits(state.bias, o.state.bias) &&
           same_bits(state.running_mean, o.state.running_mean) && same_bits(state.running_var, o.state.running_var) &&
           state.num_batches_tracked == o.state.num_batches_tracked && same_bits(grads.grad_weight, o.grads.grad_weight) &&
           same_bits(grads.grad_bias, o.grads.grad_bias) && same_bits(save_mean, o.save_mean) &&
           same_bits(save_invstd, o.save_invstd) && batches == o.batches && skipped == o.skipped &&
           training == o.training;
  }
};

bn::Options make_options(FuzzedDataProvider& in) {
  bn::Options o;
  o.eps = in.ConsumeBool() ? 1e-5 : edge_double(in, 1e-3);
  if (in.ConsumeBool()) {
    o.momentum = in.ConsumeBool() ? std::optional<double>() : std::optional<double>(edge_double(in, 0.1));
  }
  o.affine = in.ConsumeIntegralInRange<int>(0, 3) != 0;
  o.track_running_stats = in.ConsumeIntegralInRange<int>(0, 3) != 0;
  o.mode = in.ConsumeIntegralInRange<int>(0, 3) == 0 ? bn::Mode::per_activation : bn::Mode::per_channel;
  o.skip_nonfinite_updates = in.ConsumeBool();
  o.accumulate_gradients = in.ConsumeBool();
  return o;
}

template <class P>
std::vector<P> member(FuzzedDataProvider& in, std::int64_t features) {
  std::int64_t n = features;
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: n = 0; break;
    case 1: n = features <= feature_cap ? features + in.ConsumeIntegralInRange<int>(-2, 2) : 0; break;
    default: break;
  }
  if (n < 0 || n > feature_cap) n = 0;
  std::vector<P> v(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<P>(edge_double(in, 0.5 + 0.01 * double(i)));
  return v;
}

/// A layer and a program of calls on it.
template <class T, int D>
void fuzz_layer(FuzzedDataProvider& in) {
  using Layer = bn::BatchNorm<T, D, bn::cpu>;
  using P = typename Layer::param_type;
  const bn::Options o = make_options(in);
  auto first = make_shape(in);
  std::int64_t features = in.ConsumeIntegralInRange<std::int64_t>(-2, 64);
  if (first && in.ConsumeBool()) {
    // Usually the feature count the shape needs (when it is small), so that calls get deep.
    const std::int64_t f = o.mode == bn::Mode::per_channel ? first->channels() : safe_features(*first);
    if (f >= 1 && f <= feature_cap) features = f;
  }
  std::optional<Layer> layer;
  const bool bad_options = !(std::isfinite(o.eps) && o.eps > 0) ||
                           (o.momentum && !(std::isfinite(*o.momentum) && *o.momentum >= 0 && *o.momentum <= 1));
  const bool refused = throws_typed([&] { layer.emplace(features, o); });
  if (refused != (bad_options || features < 1)) finding("constructor accepted bad options or refused good ones");
  if (refused) return;

  std::optional<bn::Shape> shape = first;
  for (int step = 0; step < 8 && in.remaining_bytes() > 0; ++step) {
    if (!shape || in.ConsumeIntegralInRange<int>(0, 7) == 0) shape = make_shape(in);
    if (!shape) continue;
    const bn::Shape s = *shape;
    Activations<T> a(in, s);
    const int op = in.ConsumeIntegralInRange<int>(0, 9);
    const Snapshot<Layer> before(*layer);
    const std::vector<T> pool_before = a.pool;
    bool threw = false;
    switch (op) {
      case 0:
      case 1: threw = throws_typed([&] { layer->forward(a.x, a.y, s); }); break;
      case 2: threw = throws_typed([&] { layer->forward_relu(a.x, a.z, a.y, s); }); break;
      case 3:
      case 4: threw = throws_typed([&] { layer->backward(a.x, a.dy, a.dx, s); }); break;
      case 5: threw = throws_typed([&] { layer->backward_relu(a.x, a.fy, a.dy, a.dx, a.z, s); }); break;
      case 6: {
        bn::State<P> st;
        st.weight = member<P>(in, layer->num_features());
        st.bias = member<P>(in, layer->num_features());
        st.running_mean = member<P>(in, layer->num_features());
        st.running_var = member<P>(in, layer->num_features());
        st.num_batches_tracked = in.ConsumeBool() ? in.ConsumeIntegral<std::int64_t>()
                                                  : std::numeric_limits<std::int64_t>::max() - in.ConsumeIntegralInRange<int>(0, 2);
        threw = throws_typed([&] { layer->load_state(st); });
        if (!threw && layer->num_batches_tracked() != st.num_batches_tracked) finding("load_state lost the count");
        break;
      }
      case 7: layer->train(in.ConsumeBool()); break;
      case 8: layer->eval(); break;
      default: layer->zero_grad(); break;
    }
    if (threw && !(Snapshot<Layer>(*layer) == before)) finding("a throwing call changed the layer (strong guarantee)");
    if (threw && !same_bits(a.pool, pool_before)) finding("a throwing call wrote an activation buffer");
    if (layer->num_batches_tracked() < 0) finding("num_batches_tracked went negative");
    if (!threw && s.numel() > cap && (op <= 5)) finding("a call on a shape without buffers succeeded");
  }
}

/// The functional API: one forward or backward with fuzzed spans and scalars.
template <class T>
void fuzz_functional(FuzzedDataProvider& in) {
  using P = bn::param_t<T>;
  auto shape = make_shape(in);
  if (!shape) return;
  const bn::Shape s = *shape;
  const auto mode = in.ConsumeBool() ? bn::Mode::per_activation : bn::Mode::per_channel;
  // make_shape() guarantees that C · spatial fits int64; feature sized buffers only for small shapes.
  const std::int64_t features = s.numel() <= cap ? bn::feature_count(s, mode) : in.ConsumeIntegralInRange<int>(0, 8);
  Activations<T> a(in, s);
  auto span_of = [&](std::vector<P>& v) -> bn::span<P> {
    v = member<P>(in, features);
    if (in.ConsumeIntegralInRange<int>(0, 5) == 0) return {};
    return bn::span<P>(v.data(), static_cast<std::int64_t>(v.size()));
  };
  std::vector<P> w, b, rm, rv, sm, si, gw, gb;
  std::int64_t skipped = 0;
  const std::vector<T> pool_before = a.pool;
  if (in.ConsumeBool()) {
    bn::ForwardArgs<T> f;
    f.x = a.x;
    f.y = a.y;
    f.residual = in.ConsumeBool() ? a.z : nullptr;
    const auto ws = span_of(w), bs = span_of(b);
    f.weight = bn::span<const P>(ws.data, ws.size);
    f.bias = bn::span<const P>(bs.data, bs.size);
    f.running_mean = span_of(rm);
    f.running_var = span_of(rv);
    f.save_mean = span_of(sm);
    f.save_invstd = span_of(si);
    f.skipped_updates = in.ConsumeBool() ? &skipped : nullptr;
    bn::ForwardConfig c;
    c.mode = mode;
    c.batch_statistics = in.ConsumeBool();
    c.eps = in.ConsumeBool() ? 1e-5 : edge_double(in, 1e-3);
    c.exponential_average_factor = in.ConsumeBool() ? 0.1 : edge_double(in, 0.5);
    c.skip_nonfinite_updates = in.ConsumeBool();
    c.activation = in.ConsumeBool() ? bn::Activation::relu : bn::Activation::identity;
    const auto rm0 = rm, rv0 = rv, sm0 = sm, si0 = si;
    if (throws_typed([&] { bn::forward(bn::cpu{}, s, f, c); })) {
      if (!same_bits(a.pool, pool_before) || !same_bits(rm, rm0) || !same_bits(rv, rv0) || !same_bits(sm, sm0) ||
          !same_bits(si, si0) || skipped != 0)
        finding("a throwing functional forward wrote a buffer");
    } else if (s.numel() > cap) {
      finding("functional forward without buffers succeeded");
    }
  } else {
    bn::BackwardArgs<T> g;
    g.x = a.x;
    g.dy = a.dy;
    g.dx = a.dx;
    g.y = a.fy;
    g.dresidual = in.ConsumeBool() ? a.z : nullptr;
    const auto ws = span_of(w), ms = span_of(rm), is = span_of(rv);
    g.weight = bn::span<const P>(ws.data, ws.size);
    g.mean = bn::span<const P>(ms.data, ms.size);
    g.invstd = bn::span<const P>(is.data, is.size);
    g.grad_weight = span_of(gw);
    g.grad_bias = span_of(gb);
    bn::BackwardConfig c;
    c.mode = mode;
    c.batch_statistics = in.ConsumeBool();
    c.accumulate = in.ConsumeBool();
    c.activation = in.ConsumeBool() ? bn::Activation::relu : bn::Activation::identity;
    const auto gw0 = gw, gb0 = gb;
    if (throws_typed([&] { bn::backward(bn::cpu{}, s, g, c); })) {
      if (!same_bits(a.pool, pool_before) || !same_bits(gw, gw0) || !same_bits(gb, gb0))
        finding("a throwing functional backward wrote a buffer");
    } else if (s.numel() > cap) {
      finding("functional backward without buffers succeeded");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: fuzz_layer<float, 1>(in); break;
    case 1: fuzz_layer<float, 2>(in); break;
    case 2: fuzz_layer<float, 3>(in); break;
    case 3: fuzz_layer<double, 1>(in); break;
    case 4: fuzz_layer<double, 2>(in); break;
    case 5: fuzz_layer<double, 3>(in); break;
    case 6: fuzz_functional<float>(in); break;
    default: fuzz_functional<double>(in); break;
  }
  return 0;
}
