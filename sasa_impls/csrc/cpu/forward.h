// Forward of the fused CPU kernel: one task = the query rows of one band of one image's group of heads (one head,
// or 2 or 4 whose pixels share the vectors where one head's row would leave lanes empty: interleaved_heads).
//
// The task walks its query rows kGroupRows at a time, packing the key/value rows the windows add and the query
// rows (times scale) as it goes (pack.h). A query block is kLanes consecutive lanes of one row (pixels, or pixels
// of interleaved heads), its q one vector per channel; the blocks at the same columns of a group's rows go
// together, so each load of a key or value row feeds the FMAs of every row of the group whose window holds it
// (contract.h). For every key row of the windows: the logits of all k column offsets (D FMAs per offset, the key
// row loaded shifted by the offset), plus the factorized relative terms and the border mask (terms.h); then an
// online-softmax step per query row (running max m and sum l per lane, the D accumulators rescaled once per key
// row) and the aggregation p . v (k FMAs per channel). Nothing of size k^2 per pixel is ever stored: the scratch
// is a few k and D vectors besides the packed rows. Out of each block come y and the log-sum-exp m + log(l) from
// which the backward recomputes the probabilities.
#pragma once

#include "terms.h"

namespace sasa::cpu {

// Query rows per group: each load of a shifted key or value row feeds the FMAs of every row of the group. With
// AVX-512, 4 rows x 4 outputs fill a block's 16 accumulators (measured 8% faster forward at k = 19 than 2 rows;
// 3 rows 1.00-1.02 on an AMD Zen 4). AVX2's 16 registers hold 3 rows x 4 outputs with the 3 left vectors and the
// right one; at 4 rows x 3 outputs the left vectors do not fit and GCC folds their loads into every FMA: on an
// AMD Zen 4 (family 25 model 17), whose 256-bit and 512-bit FMA rates are equal, the AVX2 build took 1.66-1.70x
// the AVX-512 build's time at k = 19 with 4 rows; 3 rows took 0.69-0.76 of that (k = 7 0.87, k = 3 1.06), 2 rows
// 0.75-0.80 (AVX2-only CPUs not at hand).
#if defined(__AVX512F__)
inline constexpr int kGroupRows = 4;
#else
inline constexpr int kGroupRows = 3;
#endif

// Default band of the forward: whole groups; one band per plane where the planes balance the threads
// (whole_planes), else as few bands per plane as give each thread about 4 tasks. Each band packs its halo of 2r
// key rows again: at k = 19, 28 x 28, batch 1, the 2 planes of 4 interleaved heads in 8 bands took 1.08x the time
// of 2 whole planes (and an earlier kernel's backward, bands of 18 rows, 1.04x one band per plane). Groups start
// at multiples of kGroupRows whatever the band, so the forward's results depend neither on this choice nor on the
// thread count behind it.
inline int default_forward_band(const Shape& s, int threads) {
  const int planes = s.planes(), tasks_wanted = 4 * threads;
  const int bands = whole_planes(s, threads) ? 1 : (tasks_wanted + planes - 1) / planes;
  const int groups = (s.height + kGroupRows - 1) / kGroupRows;
  return kGroupRows * ((groups + bands - 1) / bands);
}

template <typename S, typename T>
struct ForwardArgs {
  Tensor5<const S> q, k, v;
  const S* rel_row;  // (heads, k, Dr) contiguous, or nullptr
  const S* rel_col;  // (heads, k, D - Dr) contiguous, or nullptr
  T scale;
  Tensor5<S> out;
  T* lse;  // (B, heads, H, W) contiguous
};

// Per-thread buffers (rows of shape.interleave heads): the packed rows (a ring of the 2r + kGroupRows key and value
// rows one group of query rows needs: memory independent of the band), per group row g k row terms, k column terms
// and k logits, and the group's results in the accumulation type (y as [row][D][padded lanes], the log-sum-exp as
// [row][padded lanes]) until they are stored in the caller's dtype and layout.
template <typename T>
struct ForwardWorkspace {
  int wp;  // lanes of a packed row, padded
  PackedRows<T> q, k, v;
  RelTables<T> rel;
  VecBuffer<T> row_terms, col_terms, logits;
  std::vector<T> y, lse;

  explicit ForwardWorkspace(const Shape& s)
      : wp(padded_width<T>(s.lanes())),
        q(kGroupRows, s.channels, s.width, s.radius(), s.interleave),
        k(2 * s.radius() + kGroupRows, s.channels, s.width, s.radius(), s.interleave),
        v(2 * s.radius() + kGroupRows, s.channels, s.width, s.radius(), s.interleave),
        row_terms(kGroupRows * s.kernel_size),
        col_terms(kGroupRows * s.kernel_size),
        logits(kGroupRows * s.kernel_size),
        y(static_cast<size_t>(kGroupRows) * s.channels * wp),
        lse(static_cast<size_t>(kGroupRows) * wp) {}
};

// The online softmax moves its running max m only when a key row's max exceeds it by more than this
// (base 2) on some lane: between moves, probabilities are up to 2^kRescaleMargin instead of 1 (the sums
// stay far from fp32's range), and the key row needs neither the rescaling exp nor the multiply of the
// accumulators (FlashAttention-4's conditional rescaling). A row's first key row sets m (its max is a real
// logit: every window row holds the query's own column).
inline constexpr double kRescaleMargin = 8;

// The lane-wise max of vectors 0 .. n - 1 (n >= 1) in four independent chains: one chain of n dependent
// vmax would cost n times their latency per key row, which nothing else overlaps (the exps wait for it).
template <typename T>
inline Vec<T> row_max(Strided<T> v, int n) {
  Vec<T> m0 = v.get(0), m1 = m0, m2 = m0, m3 = m0;
  int c = 1;
  for (; c + 4 <= n; c += 4) {
    m0 = vmax(m0, v.get(c));
    m1 = vmax(m1, v.get(c + 1));
    m2 = vmax(m2, v.get(c + 2));
    m3 = vmax(m3, v.get(c + 3));
  }
  for (; c < n; ++c) m0 = vmax(m0, v.get(c));
  return vmax(vmax(m0, m1), vmax(m2, m3));
}

// The attention of the query rows [i0, i0 + rows), rows <= kGroupRows, from the packed rows (HEADS = shape.interleave
// heads per row) into ws.y and ws.lse. Independent of the caller's dtype (one instance per accumulation type).
template <typename T, int HEADS>
__attribute__((noinline)) void forward_rows(const Shape& shape, ForwardWorkspace<T>& ws, int i0, int rows) {
  constexpr int L = kLanes<T>, G = kGroupRows;
  const int k = shape.kernel_size, r = shape.radius(), D = shape.channels, H = shape.height, wp = ws.wp;
  const int64_t cs = ws.q.channel_stride();  // the same for q, k and v
  Strided<T> logits[G], acc[G], row_terms[G], col_terms[G];
  Loads<T> queries[G], probs[G];
  for (int g = 0; g < G; ++g) {
    logits[g] = {ws.logits.data() + g * k * L, L};
    probs[g] = {logits[g].base, L};
    row_terms[g] = {ws.row_terms.data() + g * k * L, L};
    col_terms[g] = {ws.col_terms.data() + g * k * L, L};
  }
  for (int x0 = 0; x0 < wp; x0 += L) {
    Vec<T> m_log2e[G], l[G], alpha[G], row_term[G];  // m_log2e: the running max (base 2), l: the sum
    for (int g = 0; g < rows; ++g) {
      queries[g] = {ws.q.at(i0 + g, 0, x0), cs};
      acc[g] = {ws.y.data() + static_cast<int64_t>(g) * D * wp + x0, wp};
      l[g] = Vec<T>{};
      for (int d = 0; d < D; ++d) acc[g].set(d, Vec<T>{});
    }
    block_terms<T, G, HEADS>(rows, row_terms, col_terms, queries, shape, shape.has_rel ? &ws.rel : nullptr, x0);
    for (int a = window_begin(i0, r); a < window_end(i0 + rows - 1, r, H); ++a) {
      int first, last;  // the group's rows whose windows hold key row a
      rows_within(a, i0, rows, r, first, last);
      for (int g = first; g <= last; ++g) row_term[g] = row_terms[g].get(offset_index(i0 + g, a, r));
      contract_rows<T, G>(last - first + 1, logits + first, k, RowPlusColumns<T>{row_term + first, col_terms + first},
                          queries + first, Shifted<T, HEADS>{ws.k.at(a, 0, x0 - r * HEADS), cs}, D);
      bool rescaled = false;
      for (int g = first; g <= last; ++g) {
        const Vec<T> row_max_log2e = row_max(logits[g], k) * static_cast<T>(kLog2e);
        alpha[g] = splat(T(1));
        if (a == window_begin(i0 + g, r)) {  // row g's first key row: nothing to rescale yet
          m_log2e[g] = row_max_log2e;
        } else if (any_greater(row_max_log2e, m_log2e[g] + static_cast<T>(kRescaleMargin))) {
          const Vec<T> m_new = vmax(m_log2e[g], row_max_log2e);
          alpha[g] = vexp2(m_log2e[g] - m_new);
          l[g] *= alpha[g];
          m_log2e[g] = m_new;
          rescaled = true;
        }
        Vec<T> sum = Vec<T>{};
        for (int c = 0; c < k; ++c) {
          const Vec<T> p = vexp_sub(logits[g].get(c), m_log2e[g]);
          logits[g].set(c, p);
          sum += p;
        }
        l[g] += sum;
      }
      const VectorAt<T> values{ws.v.at(a, 0, x0 - r * HEADS), HEADS, cs};
      if (rescaled) {
        contract_rows<T, G>(last - first + 1, acc + first, D, Rescale<T>{acc + first, alpha + first}, probs + first, values, k);
      } else {
        contract_rows<T, G>(last - first + 1, acc + first, D, Accumulate<T>{acc + first}, probs + first, values, k);
      }
    }
    for (int g = 0; g < rows; ++g) {
      const Vec<T> inv = splat(T(1)) / l[g];
      for (int d = 0; d < D; ++d) acc[g].set(d, acc[g].get(d) * inv);
      store(ws.lse.data() + static_cast<int64_t>(g) * wp + x0, m_log2e[g] * static_cast<T>(1 / kLog2e) + vlog(l[g]));
    }
  }
}

// One task: the query rows [row0, row1) of heads [h0, h0 + shape.interleave) of image b, a group of rows at a time:
// pack the key and value rows the group's windows add (each row once per task) and its query rows, compute, store
// y and the log-sum-exp.
template <typename S, typename T>
void forward_task(const Shape& shape, const ForwardArgs<S, T>& args, int b, int h0, int row0, int row1,
                  ForwardWorkspace<T>& ws) {
  constexpr int G = kGroupRows;
  const int r = shape.radius(), D = shape.channels, H = shape.height, W = shape.width, heads = shape.interleave;
  if (shape.has_rel) ws.rel.load(shape, args.rel_row, args.rel_col, h0, heads);
  const auto q = args.q.planes(b, h0, heads), k = args.k.planes(b, h0, heads), v = args.v.planes(b, h0, heads);
  const auto out = args.out.planes(b, h0, heads);
  Plane<T> lse[kMaxInterleave];  // the heads' (H, W) log-sum-exps as planes of one channel
  for (int s = 0; s < heads; ++s) {
    lse[s] = {args.lse + (static_cast<int64_t>(b) * shape.heads + h0 + s) * H * W, W, 1, 0};
  }
  int packed = window_begin(row0, r);  // key rows below are packed
  for (int i0 = row0; i0 < row1; i0 += G) {
    const int rows = row1 - i0 < G ? row1 - i0 : G;
    const int keys_end = window_end(i0 + rows - 1, r, H);
    ws.k.pack(k.of, packed, keys_end, T(1));
    ws.v.pack(v.of, packed, keys_end, T(1));
    packed = keys_end;
    ws.q.pack(q.of, i0, i0 + rows, args.scale);
    with_heads<T, kMaxInterleave>(heads, [&](auto h) { forward_rows<T, decltype(h)::value>(shape, ws, i0, rows); });
    for (int g = 0; g < rows; ++g) {
      store_row(out.of, heads, i0 + g, W, ws.y.data() + static_cast<int64_t>(g) * D * ws.wp, ws.wp, D, T(1));
      store_row(lse, heads, i0 + g, W, ws.lse.data() + static_cast<int64_t>(g) * ws.wp, ws.wp, 1, T(1));
    }
  }
}

}  // namespace sasa::cpu
