// libFuzzer target for the safetensors parser (include/batchnorm/io/safetensors.hpp).
//
// Properties checked on every input, besides the sanitizers' (no crash, leak, UB, out-of-
// bounds read, or exception other than batchnorm::format_error escaping):
//  - an accepted input round-trips: the parsed State, written again and re-parsed, is
//    bitwise the same State, and it loads into a layer built to match it;
//  - loading into a fixed layer either succeeds with exactly what the layer-less parser
//    returns, or throws format_error and leaves the layer bitwise unchanged.
// Seed corpus: tests/fuzz/corpus/safetensors/ (PyTorch-written files and broken variants).
#include <batchnorm/batchnorm.hpp>
#include <batchnorm/io/safetensors.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace bn = batchnorm;
namespace io = batchnorm::io;

namespace {

template <class P>
bool same_bits(const std::vector<P>& a, const std::vector<P>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(P)) == 0);
}

template <class P>
bool same_state(const bn::State<P>& a, const bn::State<P>& b) {
  return same_bits(a.weight, b.weight) && same_bits(a.bias, b.bias) && same_bits(a.running_mean, b.running_mean) &&
         same_bits(a.running_var, b.running_var) && a.num_batches_tracked == b.num_batches_tracked;
}

void check(bool ok) {
  if (!ok) std::abort();
}

template <class P>
void parse_and_round_trip(const std::uint8_t* data, std::size_t size, const std::string& prefix) {
  bn::State<P> s;
  try {
    s = io::state_from_safetensors_bytes<P>(data, size, prefix);
  } catch (const bn::format_error&) {
    return;
  }
  const std::vector<std::uint8_t> again = io::to_safetensors_bytes(s, prefix);
  check(same_state(io::state_from_safetensors_bytes<P>(again, prefix), s));

  bn::Options o;
  o.affine = !s.weight.empty();
  o.track_running_stats = !s.running_mean.empty();
  const auto features = static_cast<std::int64_t>(o.affine ? s.weight.size() : s.running_mean.size());
  bn::BatchNorm1d<P, bn::cpu> layer(features, o);
  io::load_safetensors_bytes(data, size, layer, prefix);  // must not throw
  check(same_state(layer.state(), s));
}

void load_into_fixed_layer(const std::uint8_t* data, std::size_t size) {
  bn::BatchNorm2d<float, bn::cpu> layer(4);
  bn::State<float> init = layer.state();
  init.weight = {1.5f, -2.0f, 0.25f, 3.0f};
  init.num_batches_tracked = 5;
  layer.load_state(init);
  try {
    io::load_safetensors_bytes(data, size, layer);
    check(same_state(layer.state(), io::state_from_safetensors_bytes<float>(data, size)));
  } catch (const bn::format_error&) {
    check(same_state(layer.state(), init));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  parse_and_round_trip<float>(data, size, "");
  parse_and_round_trip<double>(data, size, "");
  parse_and_round_trip<float>(data, size, "bn1.");
  load_into_fixed_layer(data, size);
  return 0;
}
