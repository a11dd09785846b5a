// Portable SIMD for the CPU kernel: GCC/Clang vector extensions, one vector = one register of the
// ISA the extension is compiled for (-march=native): 64 bytes with AVX-512, otherwise 32 (AVX2;
// on other ISAs the compiler splits them). Lanes hold consecutive pixels of one image row.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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

// x on every lane: one broadcast, from memory where x comes from there. (x - 0 is x for every x; 0 + x is
// not for x = -0, so ``Vec<T>{} + x`` compiled to a scalar add and a broadcast from a register, a shuffle
// that takes an FMA port on Intel cores.)
template <typename T>
inline Vec<T> splat(T x) {
  return x - Vec<T>{};
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

#if defined(__AVX2__) && !defined(__AVX512F__)
// -1 on the first n lanes, 0 after them: the mask of AVX2's masked loads and stores.
template <typename T>
inline __m256i first_lanes(int n) {
  using Bits = typename VecTraits<T>::bits;
  Bits lanes;
  for (int i = 0; i < kLanes<T>; ++i) lanes[i] = i;
  return reinterpret_cast<__m256i>(lanes < (Bits{} + n));
}
#endif

// The first n (1 <= n <= kLanes) lanes of v to p, the memory after them untouched: one masked store where
// the ISA has them. (A memcpy of n * sizeof(T) bytes compiles to scalar moves that reread v from the
// stack right after it was stored there: store-forwarding stalls, measured 20% of a k = 1 forward.)
template <typename T>
inline void store_first(T* p, Vec<T> v, int n) {
#if defined(__AVX512F__)
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (sizeof(T) == 4) {
    _mm512_mask_storeu_ps(p, mask, reinterpret_cast<__m512>(v));
  } else {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>(mask), reinterpret_cast<__m512d>(v));
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4) {
    _mm256_maskstore_ps(p, first_lanes<T>(n), reinterpret_cast<__m256>(v));
  } else {
    _mm256_maskstore_pd(p, first_lanes<T>(n), reinterpret_cast<__m256d>(v));
  }
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// The first n (1 <= n <= kLanes) lanes from p, zeros after them; nothing past p + n is read (store_first's
// counterpart, for the rare partial vector a product accumulates onto). One masked load where the ISA has them:
// a loop of lane writes made GCC keep every accumulator of the calling block in memory.
template <typename T>
inline Vec<T> load_first(const T* p, int n) {
#if defined(__AVX512F__)
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<Vec<T>>(_mm512_maskz_loadu_ps(mask, p));
  } else {
    return reinterpret_cast<Vec<T>>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask), p));
  }
#elif defined(__AVX2__)
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<Vec<T>>(_mm256_maskload_ps(p, first_lanes<T>(n)));
  } else {
    return reinterpret_cast<Vec<T>>(_mm256_maskload_pd(p, first_lanes<T>(n)));
  }
#else
  Vec<T> v{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

// rows[0 .. kLanes) transposed in registers: lane j of row i and lane i of row j exchanged. log2(kLanes) stages;
// stage H exchanges, in each pair of rows (i, i + H) with bit H of i clear, the lanes of i with bit H set and the
// lanes of i + H with bit H clear: two two-source shuffles of constant indices per pair (one vpermt2ps each with
// AVX-512).
template <typename T, int H>
inline void exchange_lanes(Vec<T>* rows) {
  using Bits = typename VecTraits<T>::bits;
  constexpr int L = kLanes<T>;
  Bits first, second;
  for (int c = 0; c < L; ++c) {
    first[c] = c & H ? L + c - H : c;   // row i: its own lanes with bit H clear, then row i + H's
    second[c] = c & H ? L + c : c + H;  // row i + H: row i's lanes with bit H set, then its own
  }
  for (int i = 0; i < L; ++i) {
    if (i & H) continue;
    const Vec<T> a = rows[i], b = rows[i + H];
    rows[i] = __builtin_shuffle(a, b, first);
    rows[i + H] = __builtin_shuffle(a, b, second);
  }
  if constexpr (H > 1) exchange_lanes<T, H / 2>(rows);
}

template <typename T>
inline void transpose(Vec<T>* rows) {
  exchange_lanes<T, kLanes<T> / 2>(rows);
}

// Lane-wise max and horizontal reductions; templates on the vector type (a Vec<T> argument would not
// deduce T through the alias).
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// Whether a > b on some lane (one compare and a mask test where the ISA has them).
template <typename V>
inline bool any_greater(V a, V b) {
  constexpr bool single = sizeof(a[0]) == 4;
#if defined(__AVX512F__)
  if constexpr (single) return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b), _CMP_GT_OQ);
  else return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(a), reinterpret_cast<__m512d>(b), _CMP_GT_OQ);
#elif defined(__AVX2__)
  if constexpr (single) return _mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b), _CMP_GT_OQ));
  else return _mm256_movemask_pd(_mm256_cmp_pd(reinterpret_cast<__m256d>(a), reinterpret_cast<__m256d>(b), _CMP_GT_OQ));
#else
  for (size_t i = 0; i < sizeof(V) / sizeof(a[0]); ++i) {
    if (a[i] > b[i]) return true;
  }
  return false;
#endif
}

template <typename V>
inline auto hsum(V v) {
  auto total = v[0];
  for (size_t i = 1; i < sizeof(V) / sizeof(total); ++i) total += v[i];
  return total;
}

// Exponentials of the softmax, in base 2: e^(x - y) = 2^(x log2 e - y log2 e), one FMA for the argument
// (vexp_sub: the caller scales y once per key row or pixel instead of subtracting it from every logit).
// Arguments are <= 0 (a logit minus a running max or the log-sum-exp); masked logits (-1e30) must give
// exactly 0. t = n + f with n = round(t) (adding 1.5 * 2^23 rounds and leaves n in the low mantissa
// bits), |f| <= 1/2, 2^f by a degree-5 polynomial fitted to its relative error (2.3e-7 in fp32 on
// [-1/2, 1/2]), times 2^n: AVX-512's vscalefps (which also gives 0 for masked logits), elsewhere n's
// bits added to the exponent field and t < -125 set to 0. 9 vector operations with AVX-512, 12 with
// AVX2 (the natural-log reduction this replaced took 15).
inline constexpr double kLog2e = 1.44269504088896340736;

#ifdef SASA_PROFILE_NO_EXP
// Profiling build only (sasa-bench profile's ablation of the softmax's exp): a cheap stand-in that keeps
// the data dependence and bounded values; results are wrong by design and never gated.
inline Vec<float> vexp2(Vec<float> t) { return t * 1e-30f + 1.0f; }
inline Vec<double> vexp2(Vec<double> t) { return t * 1e-300 + 1.0; }
#else
inline Vec<float> vexp2(Vec<float> t) {
  const Vec<float> round_magic = splat(12582912.0f);
  const Vec<float> shifted = t + round_magic;
  const Vec<float> n = shifted - round_magic;
  const Vec<float> f = t - n;
  Vec<float> p = splat(1.327647196e-3f);
  p = p * f + 9.675541503e-3f;
  p = p * f + 5.550713275e-2f;
  p = p * f + 2.402211972e-1f;
  p = p * f + 6.931469671e-1f;
  p = p * f + 1.000000072f;
#if defined(__AVX512F__)
  static_assert(sizeof(Vec<float>) == sizeof(__m512));
  return reinterpret_cast<Vec<float>>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), reinterpret_cast<__m512>(n)));
#else
  using Bits = VecTraits<float>::bits;
  Bits bits, exponent;
  std::memcpy(&bits, &p, sizeof bits);
  std::memcpy(&exponent, &shifted, sizeof exponent);
  bits += exponent << 23;
  std::memcpy(&p, &bits, sizeof p);
  return t < splat(-125.0f) ? Vec<float>{} : p;
#endif
}

// fp64 (the accuracy tests' accumulation type): the C library's exp2 per lane.
inline Vec<double> vexp2(Vec<double> t) {
  for (int i = 0; i < kLanes<double>; ++i) t[i] = std::exp2(t[i]);
  return t;
}
#endif  // SASA_PROFILE_NO_EXP

// Natural log of positive normal floats (the softmax sums, >= 1), lane-wise: x = 2^e m with m in
// [sqrt(1/2), sqrt(2)), log m = 2 atanh(z) = 2 (z + z^3/3 + ... + z^9/9) with z = (m - 1) / (m + 1), |z| <
// 0.172, truncation error < 1e-9. One vector instead of a scalar logf call per lane (the log-sum-exp of
// every query block: a quarter of a k = 1 forward). fp64: the C library's log per lane.
inline Vec<float> vlog(Vec<float> x) {
  using Bits = VecTraits<float>::bits;
  Bits bits;
  std::memcpy(&bits, &x, sizeof bits);
  Bits exponent = (bits >> 23) - 127;
  bits = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
  Vec<float> m;
  std::memcpy(&m, &bits, sizeof m);
  const Bits high = m > splat(1.41421356f);  // -1 where m is halved
  m = high ? m * 0.5f : m;
  exponent -= high;
  const Vec<float> z = (m - 1.0f) / (m + 1.0f), z2 = z * z;
  Vec<float> series = splat(1.0f / 9);
  series = series * z2 + 1.0f / 7;
  series = series * z2 + 1.0f / 5;
  series = series * z2 + 1.0f / 3;
  series = series * z2 + 1.0f;
  return __builtin_convertvector(exponent, Vec<float>) * 0.693147181f + 2.0f * z * series;
}

inline Vec<double> vlog(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::log(x[i]);
  return x;
}

// e^(x - y) given y_log2e = y * T(kLog2e) (one FMA and vexp2).
inline Vec<float> vexp_sub(Vec<float> x, Vec<float> y_log2e) { return vexp2(x * static_cast<float>(kLog2e) - y_log2e); }
inline Vec<double> vexp_sub(Vec<double> x, Vec<double> y_log2e) { return vexp2(x * kLog2e - y_log2e); }

}  // namespace sasa::cpu
