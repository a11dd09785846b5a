// Portable SIMD for the CPU kernel: GCC/Clang vector extensions, one vector = one register of the
// ISA the extension is compiled for (-march=native): 64 bytes with AVX-512, otherwise 32 (AVX2;
// on other ISAs the compiler splits them). Lanes hold consecutive pixels of one image row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sasa::cpu {

#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
#else
inline constexpr int kVectorBytes = 32;
#endif

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float type __attribute__((vector_size(kVectorBytes)));
  typedef int32_t bits __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VecTraits<double> {
  typedef double type __attribute__((vector_size(kVectorBytes)));
  typedef int64_t bits __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
using Vec = typename VecTraits<T>::type;

// Pixels per vector for accumulation type T (8 or 16 for float, 4 or 8 for double).
template <typename T>
inline constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));

template <typename T>
inline Vec<T> splat(T x) {
  return Vec<T>{} + x;
}

// Unaligned load/store (memcpy compiles to one vmovups).
template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
inline void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}

// Lane-wise max and horizontal reductions; templates on the vector type (a Vec<T> argument would not
// deduce T through the alias).
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

template <typename V>
inline auto hsum(V v) {
  auto total = v[0];
  for (size_t i = 1; i < sizeof(V) / sizeof(total); ++i) total += v[i];
  return total;
}

// exp of every lane for x <= 0 (a logit minus a running max or the log-sum-exp); masked logits
// (-1e30) must give exactly 0. x = n ln2 + f with n = round(x log2 e) and |f| <= ln2 / 2, f computed
// exactly with ln2 split in two (Cephes); e^f by a degree-5 polynomial fitted to its relative error;
// 2^n added to the exponent bits. Adding 1.5 * 2^23 rounds x log2 e and leaves n in the low mantissa
// bits, so shifting those bits by 23 gives n's exponent field directly. Relative error below 2e-7
// on [-87, 0]; x < -87 (2^n below FLT_MIN) gives 0. 12 vector operations.
#ifdef SASA_PROFILE_NO_EXP
// Profiling build only (sasa-bench profile's ablation of the softmax's exp): a cheap stand-in that keeps
// the data dependence and bounded values; results are wrong by design and never gated.
inline Vec<float> vexp(Vec<float> x) { return x * 1e-30f + 1.0f; }
inline Vec<double> vexp(Vec<double> x) { return x * 1e-300 + 1.0; }
#else
inline Vec<float> vexp(Vec<float> x) {
  using Bits = VecTraits<float>::bits;
  const Vec<float> round_magic = splat(12582912.0f);
  const Vec<float> shifted = x * 1.44269504088896341f + round_magic;
  const Vec<float> n = shifted - round_magic;
  Vec<float> f = x - n * 0.693359375f;
  f = f - n * -2.12194440e-4f;
  Vec<float> p = splat(8.290303871035576e-3f);
  p = p * f + 4.1897907853126526e-2f;
  p = p * f + 1.666763573884964e-1f;
  p = p * f + 4.999915063381195e-1f;
  p = p * f + 9.999997019767761e-1f;
  p = p * f + 1.0f;
  Bits bits, exponent;
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&exponent, &shifted, sizeof exponent);
  bits += exponent << 23;
  std::memcpy(&p, &bits, sizeof p);
  return x < splat(-87.0f) ? Vec<float>{} : p;
}

// fp64 (the accuracy tests' accumulation type): the C library's exp per lane.
inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}
#endif  // SASA_PROFILE_NO_EXP

}  // namespace sasa::cpu
