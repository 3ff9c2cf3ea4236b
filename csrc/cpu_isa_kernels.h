// The loops behind cpu_isa.h, written once with at::vec and compiled by each cpu_isa_<isa>.cpp
// with its own target. Include only from those files, after they set the target and define
// CPU_CAPABILITY (the inline namespace that keeps each copy of at::vec apart) and
// SUPEREXPERTS_ISA (the name of the table function to define).
//
// Nothing compiled here may reach code outside the table: the loops live in an anonymous
// namespace and at::vec in its per-target CPU_CAPABILITY namespace, so no other file links
// to a copy built for this target (tests/test_native.py checks the built library for it).
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>

#include "cpu_isa.h"

#define SUPEREXPERTS_CONCAT_(a, b) a##b
#define SUPEREXPERTS_CONCAT(a, b) SUPEREXPERTS_CONCAT_(a, b)
#define SUPEREXPERTS_STR_(a) #a
#define SUPEREXPERTS_STR(a) SUPEREXPERTS_STR_(a)

namespace superexperts::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
// One step of the row loops: two float vectors, one vector of a 16-bit type.
constexpr int64_t kStep = 2 * Vec::size();

// NaN above every number: a NaN in y is the max, as torch.max has it.
inline bool above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }

inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }  // propagates NaN

inline float reduce_max(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return vmax(a, b); }, v);
}

// Two float vectors from kStep values of T at p.
template <typename T>
inline std::tuple<Vec, Vec> load2(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return {Vec::loadu(p), Vec::loadu(p + Vec::size())};
  } else {
    return at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

// Stores kStep values as T at p; returns them as read back from T (rounded).
template <typename T>
inline std::tuple<Vec, Vec> store2(T* p, const Vec& v0, const Vec& v1) {
  if constexpr (std::is_same_v<T, float>) {
    v0.store(p);
    v1.store(p + Vec::size());
    return {v0, v1};
  } else {
    const auto rounded = at::vec::convert_from_float<T>(v0, v1);
    rounded.store(p);
    return at::vec::convert_to_float<T>(rounded);
  }
}

// Folds |v0|, |v1| (the kStep values at channel c) into the running max m and, with
// kChannels, into chan[c ...].
template <bool kChannels>
inline void fold(Vec& m, Vec v0, Vec v1, float* chan, int64_t c) {
  v0 = v0.abs();
  v1 = v1.abs();
  m = vmax(m, vmax(v0, v1));
  if constexpr (kChannels) {
    vmax(Vec::loadu(chan + c), v0).store(chan + c);
    vmax(Vec::loadu(chan + c + Vec::size()), v1).store(chan + c + Vec::size());
  }
}

// The same for one value of the tail.
template <bool kChannels>
inline void fold_one(float& m, float v, float* chan, int64_t c) {
  const float a = std::abs(v);
  m = above(a, m) ? a : m;
  if constexpr (kChannels) chan[c] = above(a, chan[c]) ? a : chan[c];
}

template <typename T, bool kStats, bool kChannels>
float round_row_impl(const float* acc, const float* bias, T* out, float* chan, int64_t n) {
  Vec m(0.f);
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    Vec v0 = Vec::loadu(acc + c), v1 = Vec::loadu(acc + c + Vec::size());
    if (bias) {
      v0 = v0 + Vec::loadu(bias + c);
      v1 = v1 + Vec::loadu(bias + c + Vec::size());
    }
    std::tie(v0, v1) = store2<T>(out + c, v0, v1);
    if constexpr (kStats) fold<kChannels>(m, v0, v1, chan, c);
  }
  float row_max = kStats ? reduce_max(m) : 0.f;
  for (; c < n; ++c) {
    const T v = static_cast<T>(bias ? acc[c] + bias[c] : acc[c]);
    out[c] = v;
    if constexpr (kStats) fold_one<kChannels>(row_max, static_cast<float>(v), chan, c);
  }
  return std::abs(row_max);
}

template <typename T>
float round_row(const float* acc, const float* bias, T* out, float* chan, int64_t n) {
  return chan ? round_row_impl<T, true, true>(acc, bias, out, chan, n)
              : round_row_impl<T, true, false>(acc, bias, out, nullptr, n);
}

template <typename T>
void round_row_nostats(const float* acc, const float* bias, T* out, int64_t n) {
  round_row_impl<T, false, false>(acc, bias, out, nullptr, n);
}

template <typename T, bool kChannels>
float absmax_row_impl(const T* x, float* chan, int64_t n) {
  Vec m(0.f);
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    const auto [v0, v1] = load2<T>(x + c);
    fold<kChannels>(m, v0, v1, chan, c);
  }
  float row_max = reduce_max(m);
  for (; c < n; ++c) fold_one<kChannels>(row_max, static_cast<float>(x[c]), chan, c);
  return std::abs(row_max);
}

template <typename T>
float absmax_row(const T* x, float* chan, int64_t n) {
  return chan ? absmax_row_impl<T, true>(x, chan, n) : absmax_row_impl<T, false>(x, nullptr, n);
}

template <typename T>
void to_float(const T* src, float scale, float* dst, int64_t n) {
  const Vec s(scale);
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    auto [v0, v1] = load2<T>(src + c);
    (v0 * s).store(dst + c);
    (v1 * s).store(dst + c + Vec::size());
  }
  for (; c < n; ++c) dst[c] = static_cast<float>(src[c]) * scale;
}

template <typename T>
void from_float(const float* src, float scale, T* dst, int64_t n) {
  const Vec s(scale);
  int64_t c = 0;
  for (; c + kStep <= n; c += kStep) {
    store2<T>(dst + c, Vec::loadu(src + c) * s, Vec::loadu(src + c + Vec::size()) * s);
  }
  for (; c < n; ++c) dst[c] = static_cast<T>(src[c] * scale);
}

float max(const float* x, int64_t n) {
  if (n <= 0) return -std::numeric_limits<float>::infinity();
  return at::vec::reduce_all<float>([](const Vec& a, const Vec& b) { return vmax(a, b); }, x, n);
}

float exp_sum(float* x, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(x + j) - vm).exp_u20();
    e.store(x + j);
    acc = acc + e;
  }
  if (j < n) {
    const int64_t rest = n - j;
    // loadu fills the lanes past `rest` with zeros: keep their exp(-m) out of the sum.
    const Vec e = Vec::set(Vec(0.f), (Vec::loadu(x + j, rest) - vm).exp_u20(), rest);
    e.store(x + j, rest);
    acc = acc + e;
  }
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, acc);
}

void scale(float* x, int64_t n, float alpha) {
  at::vec::map([alpha](const Vec& a) { return a * Vec(alpha); }, x, x, n);
}

template <typename T>
constexpr TypedKernels<T> typed() {
  return {&round_row<T>, &round_row_nostats<T>, &absmax_row<T>, &to_float<T>, &from_float<T>};
}

constexpr Kernels kTable{SUPEREXPERTS_STR(SUPEREXPERTS_ISA),
                         typed<float>(),
                         typed<c10::BFloat16>(),
                         typed<c10::Half>(),
                         &max,
                         &exp_sum,
                         &scale};

}  // namespace

const Kernels* SUPEREXPERTS_CONCAT(kernels_, SUPEREXPERTS_ISA)() { return &kTable; }

}  // namespace superexperts::cpu
