// Backward of the fused CPU kernel, flash-style: the probabilities are recomputed from the saved
// log-sum-exp, p = exp(s - lse), dS = p (dP - delta) with dP = dO . v and delta = dO . O per query.
//
// One task = the query rows of one band of one image's group of heads (one head, or 2 whose pixels share the vectors
// where one head's row would leave lanes empty: kBackwardInterleave), taken kBackwardGroupRows at a time, against the
// key rows of their windows, kBackwardKeyRows at a time. For each key row, a query-centric sweep over
// the rows' blocks computes p and dS for all k column offsets (the logits and dP as in the forward),
// accumulates dQ += dS k (a shifted key row, as the forward aggregates v) and the per-query sums of dS
// over each row offset and each column offset (the relative gradients' k + k values per query), and
// leaves p and dS of each (query row, key row) pair (k values per pixel) in scratch. For each query
// row, a key-centric sweep over the key rows then reads them diagonally (key x, offset c pairs with
// query x - c + r; p is stored skewed so that these reads of it are aligned: scratch_margin) for dK += dS q and
// dV += p dO, with the key row's pixels in the lanes (shifts of whole pixels: the interleaved heads' lanes). Grouping
// rows lets each shifted load feed the FMAs of every row of a group (3 or 4 rows, below; contract.h). Each contraction is the
// forward's microkernel: 5 D MACs per (query, key) pair. Where every query row of a group meets every key row of a
// key group (the window's middle, 16 of 22 key rows at k = 19), dQ sums the key rows' pairs and dK and dV the query
// rows' pairs in one contraction each (4 x 19 terms per accumulator load and store instead of 19: the backward at
// k = 19 took 0.954-0.977 of the time at 28 x 28 and 32 x 32, batch 1 and 8, k = 7 0.965-0.967, AMD Zen 4 f25m17;
// k = 3 has no such group).
//
// Key rows are shared by neighbouring bands, so each task accumulates dK and dV into its own halo rows
// (band plus r rows either side); reduce_key_row sums the bands' halo rows in band order. With one band per
// plane the halo is the whole plane's: it lives in the thread's workspace and the task stores dK and dV. Relative
// gradients are summed per task and then over tasks in a fixed order. No atomics anywhere: the
// gradients depend on the band height, never on the thread count.
#pragma once

#include "forward.h"

namespace sasa::cpu {

// Query rows and key rows per group in the backward. Its per-group scratch holds p and dS of every (query
// row, key row) pair of a group, G GK k padded rows each. More rows per group feed each shifted load to more
// FMAs (contract.h's microkernel on a Zen 5: 4 rows at 67-70% of the FMA-only rate, 2 rows at 50-54%), but
// the scratch of 4 x 4 pairs outgrows L1. Measured at k = 19, 2 threads, interleaved against 2 x 2:
// - AMD EPYC Zen 5 (family 26 model 2, AVX-512): 4 x 4 0.87-0.90 of the time (28 x 28 and 32 x 32, batch
//   1 and 8; k = 7 0.93), 4 x 2 0.93-0.94, 2 x 4 0.95;
// - the same CPU, AVX2 build (16 registers): 4 x 4 1.19-1.21, 4 x 2 1.15;
// - Intel Xeon family 6 model 167 (AVX-512): 4 x 4 0.93-0.99 (0.94 on 1 thread; k = 7 0.98-0.99); an
//   earlier kernel had read 1.07 there (4 x 2 1.01-1.02, 2 x 4 0.98);
// - AMD EPYC Zen 4 (family 25 model 17, AVX-512 on 256-bit units): 2 x 2 1.04-1.07, 4 x 2 1.00-1.05, 2 x 4
//   1.03-1.04 of 4 x 4's time; its AVX2 build, against 2 x 2: 3 x 3 0.91-0.93 (k = 7 0.93, k = 3 0.97; 3 rows x
//   4 outputs and their 3 left vectors fill AVX2's 16 registers), 3 x 2 0.95-0.99, 2 x 3 0.97.
// So every CPU with AVX-512 (32 vector registers) takes 4 x 4, AVX2 3 x 3.
#if defined(__AVX512F__)
inline constexpr int kBackwardGroupRows = 4, kBackwardKeyRows = 4;
#else
inline constexpr int kBackwardGroupRows = 3, kBackwardKeyRows = 3;
#endif

// Heads interleaved in the backward's packed rows (interleaved_heads): at most 2. Its per-task buffers grow with a
// row's lanes (the p / dS scratch, the band's rows of dQ and of the relative sums, the plane's dK / dV halo: about
// 2.7 MB per thread for 4 heads of 28 x 28 at k = 19, against 1 MB of L2 on a Zen 4): 4 heads of 28 x 28 took
// 0.96-0.98x the time of one head per row alone (batch 8 and 1) but 0.998x and 1.047x in the layer's chained
// kernels (scripts/native_ab.py chainbwd), 1.14x at k = 3.
// 2 heads, against one (AMD Zen 4 f25m17, 2 threads): 56 x 56 batch 2 k = 19 0.966, k = 7 and 3 1.03; 7 x 7 batch
// 8 k = 19 0.605, k = 7 0.789, k = 3 0.892.
inline constexpr int kBackwardInterleave = 2;

template <typename S, typename T>
struct BackwardArgs {
  Tensor5<const S> q, k, v, out, grad_out;
  const S* rel_row;  // (heads, k, Dr) contiguous, or nullptr
  const S* rel_col;
  const T* lse;  // (B, heads, H, W) contiguous
  T scale;
  Tensor5<S> dq, dk, dv;
  T* halo;                     // every task's halo rows: [rows][dK, dV][D][lanes]; unused with one band per plane
  const int64_t* halo_offset;  // first halo row of band t within one plane, t <= band count
  T* rel_partial;              // (B, heads, bands, k, D): per-task relative gradients, or nullptr
};

// Halo rows of a band: the key rows its queries' windows touch.
inline int halo_begin(const Shape& s, const Bands& bands, int t) { return window_begin(bands.begin(t), s.radius()); }
inline int halo_end(const Shape& s, const Bands& bands, int t) { return window_end(bands.end(t) - 1, s.radius(), s.height); }

// Elements of one halo row: dK and dV of all channels, a packed row's lanes (padded).
template <typename T>
inline int64_t halo_row_size(const Shape& s) {
  return 2 * static_cast<int64_t>(s.channels) * padded_width<T>(s.lanes());
}

// The p / dS scratch rows: query lane 0 at ``margin`` (r columns of lanes rounded up to whole vectors: the exp loop's
// stores of dS and the loads of dQ's contraction are aligned; at r = 9 every one straddled two cache lines), r
// or more zero columns after the padded lanes, rows of whole vectors. p, which only dV's key-centric sweep reads, is
// stored skewed: row c (column offset c) holds query lane y at margin + y - (r - c) interleave, so that the sweep,
// which pairs key lane x with query lane x + (r - c) interleave, reads it aligned at margin + x (a position no query
// lane is stored at reads the zero left there). The diagonal loads, 15 of 16 across two cache lines of a scratch
// that lives in L2, cost 6-9% of the backward where dS and p are both read that way (aligned loads in their place,
// wrong values: 0.915-0.937 of the time); p skewed (its stores now across lines) took 0.970 [0.964, 0.975] of the
// backward's time at 28 x 28 batch 8, 0.984 at batch 1, 0.977 at 32 x 32 batch 1, the layer's chained kernels 0.977
// and 0.988 (AMD Zen 5 f26m2, the same bits). dS skewed as well, as a second copy for dK (dQ reads it unskewed):
// 1.01 of that.
template <typename T>
inline int scratch_margin(const Shape& s) { return padded_width<T>(s.radius() * s.interleave); }

template <typename T>
struct BackwardWorkspace {
  int wp, margin, ws;  // padded lanes; query lane 0 of a scratch row; width of a scratch row
  int64_t pair_size;   // k * ws: p or dS of one (query row, key row) pair
  PackedRows<T> q, grad_out, k, v;
  PackedRows<T> out;                      // one row of O, for delta
  RelTables<T> rel;
  std::vector<T> lse, delta;              // [band rows][wp]
  std::vector<T> row_terms, col_terms;    // [G][k][wp]: the relative terms of the group's query rows
  VecBuffer<T> probs, dscores;            // [G][GK][k][ws]: p (skewed) and dS of (query row g, key row a0 + e)
  std::vector<T> ds_rows, ds_cols;        // [band rows][k][wp]: sums of dS per row / column offset
  std::vector<T> dq;                      // [band rows][D][wp]: dQ / scale
  VecBuffer<T> logits, dp;                // G k vectors each
  std::vector<T> plane_halo;              // with one band per plane: the plane's dK and dV, [H][dK, dV][D][wp]

  BackwardWorkspace(const Shape& s, int band)
      : wp(padded_width<T>(s.lanes())),
        margin(scratch_margin<T>(s)),
        ws(padded_width<T>(margin + wp + s.radius() * s.interleave)),
        pair_size(static_cast<int64_t>(s.kernel_size) * ws),
        q(band, s.channels, s.width, s.radius(), s.interleave),
        grad_out(band, s.channels, s.width, s.radius(), s.interleave),
        k(band + 2 * s.radius(), s.channels, s.width, s.radius(), s.interleave),
        v(band + 2 * s.radius(), s.channels, s.width, s.radius(), s.interleave),
        out(1, s.channels, s.width, s.radius(), s.interleave),
        lse(static_cast<size_t>(band) * wp),
        delta(static_cast<size_t>(band) * wp),
        row_terms(static_cast<size_t>(kBackwardGroupRows) * s.kernel_size * wp),
        col_terms(static_cast<size_t>(kBackwardGroupRows) * s.kernel_size * wp),
        probs(kBackwardGroupRows * kBackwardKeyRows * pair_size / kLanes<T>),
        dscores(kBackwardGroupRows * kBackwardKeyRows * pair_size / kLanes<T>),
        ds_rows(static_cast<size_t>(band) * s.kernel_size * wp),
        ds_cols(static_cast<size_t>(band) * s.kernel_size * wp),
        dq(static_cast<size_t>(band) * s.channels * wp),
        logits(kBackwardGroupRows * s.kernel_size),
        dp(kBackwardGroupRows * s.kernel_size),
        plane_halo(Bands{s.height, band}.count() == 1 ? s.height * halo_row_size<T>(s) : 0) {}

  // p or dS of (query row g, key row a0 + e) of the current groups, at query column -margin
  T* pair(VecBuffer<T>& scratch, int g, int e) { return scratch.data() + (g * kBackwardKeyRows + e) * pair_size; }
};

// lse and delta = dO . O of the band's query rows, heads [h0, h0 + interleave) in the packed rows' lanes; padding
// lanes get lse = +1e30, which makes their p (and so their dS) exactly 0: they never reach dK, dV or the relative
// gradients.
template <typename S, typename T>
void load_row_stats(const Shape& shape, const BackwardArgs<S, T>& args, int b, int h0, int row0, int row1,
                    BackwardWorkspace<T>& ws) {
  const int W = shape.width, D = shape.channels, heads = shape.interleave;
  const auto out = args.out.planes(b, h0, heads);
  for (int i = row0; i < row1; ++i) {
    T* lse_row = ws.lse.data() + static_cast<int64_t>(i - row0) * ws.wp;
    T* delta_row = ws.delta.data() + static_cast<int64_t>(i - row0) * ws.wp;
    std::fill(lse_row, lse_row + ws.wp, static_cast<T>(-kMaskedLogit));
    for (int s = 0; s < heads; ++s) {
      const T* lse = args.lse + ((static_cast<int64_t>(b) * shape.heads + h0 + s) * shape.height + i) * W;
      for (int x = 0; x < W; ++x) lse_row[x * heads + s] = lse[x];
    }
    ws.out.pack(out.of, i, i + 1, T(1));  // O's row in the lanes of dO's
    std::fill(delta_row, delta_row + ws.wp, T(0));
    for (int d = 0; d < D; ++d) {
      const T* g = ws.grad_out.at(i, d, 0);
      const T* o = ws.out.at(i, d, 0);
      for (int x = 0; x < ws.wp; ++x) delta_row[x] += g[x] * o[x];
    }
  }
}

// The sum of the lanes l of v with l % period == phase, in lane order (hsum where period is 1).
template <typename V>
inline auto lane_sum(V v, int phase, int period) {
  auto total = v[phase];
  for (size_t l = phase + period; l < sizeof(V) / sizeof(total); l += period) total += v[l];
  return total;
}

// The (scaled) relative gradients of a band: out[o][d] = sum over its pixels of sums[o] q[d] for the channels
// [d_begin, d_end), sums = ws.ds_rows (the row channels) or ws.ds_cols; head s of the interleaved ones at out + s
// head_stride. A k x D product reduced over the band's pixels, in tiles of NO offsets x NC channels whose
// accumulators stay in registers for the whole band (accumulating into memory per pixel block had one load and one
// store per FMA: 7% of a k = 19 backward).
template <typename T, int NO, int NC>
void sum_products_tile(const Shape& shape, const BackwardWorkspace<T>& ws, const std::vector<T>& sums, int o0, int d0,
                       int row0, int row1, T* out, int64_t head_stride) {
  constexpr int L = kLanes<T>;
  const int k = shape.kernel_size, wp = ws.wp;
  Vec<T> acc[NO][NC] = {};
  for (int i = row0; i < row1; ++i) {
    const T* sum_row = sums.data() + (static_cast<int64_t>(i - row0) * k + o0) * wp;
    for (int x0 = 0; x0 < wp; x0 += L) {
      Vec<T> q[NC];
      for (int c = 0; c < NC; ++c) q[c] = load(ws.q.at(i, d0 + c, x0));
      for (int o = 0; o < NO; ++o) {
        const Vec<T> s = load(sum_row + static_cast<int64_t>(o) * wp + x0);
        for (int c = 0; c < NC; ++c) acc[o][c] += s * q[c];
      }
    }
  }
  for (int s = 0; s < shape.interleave; ++s) {
    for (int o = 0; o < NO; ++o) {
      for (int c = 0; c < NC; ++c) {
        out[s * head_stride + (o0 + o) * shape.channels + d0 + c] = lane_sum(acc[o][c], s, shape.interleave);
      }
    }
  }
}

// A tile of no <= NO offsets x nc <= NC channels.
template <typename T, int NO, int NC>
void sum_products_rest(const Shape& shape, const BackwardWorkspace<T>& ws, const std::vector<T>& sums, int o0, int no,
                       int d0, int nc, int row0, int row1, T* out, int64_t head_stride) {
  if constexpr (NO > 1) {
    if (no < NO) return sum_products_rest<T, NO - 1, NC>(shape, ws, sums, o0, no, d0, nc, row0, row1, out, head_stride);
  }
  if constexpr (NC > 1) {
    if (nc < NC) return sum_products_rest<T, NO, NC - 1>(shape, ws, sums, o0, no, d0, nc, row0, row1, out, head_stride);
  }
  sum_products_tile<T, NO, NC>(shape, ws, sums, o0, d0, row0, row1, out, head_stride);
}

template <typename T>
void sum_products(const Shape& shape, const BackwardWorkspace<T>& ws, const std::vector<T>& sums, int d_begin,
                  int d_end, int row0, int row1, T* out, int64_t head_stride) {
  constexpr int NO = 4, NC = kAccumulators / NO;  // 16 or 12 accumulators
  for (int o0 = 0; o0 < shape.kernel_size; o0 += NO) {
    for (int d0 = d_begin; d0 < d_end; d0 += NC) {
      sum_products_rest<T, NO, NC>(shape, ws, sums, o0, std::min(NO, shape.kernel_size - o0), d0,
                                   std::min(NC, d_end - d0), row0, row1, out, head_stride);
    }
  }
}

// The gradients of query rows [row0, row1) (one band) from the packed rows (HEADS = shape.interleave heads per
// row): dQ / scale into ws.dq, dK and dV into the band's halo rows (key rows from hb), the relative gradients into
// ``rel_partial`` (k x D per head, head_stride apart). Independent of the caller's dtype (one instance per
// accumulation type).
template <typename T, int HEADS>
__attribute__((noinline)) void backward_rows(const Shape& shape, BackwardWorkspace<T>& ws, int row0, int row1, int hb,
                                             T* halo, T* rel_partial, int64_t head_stride) {
  constexpr int L = kLanes<T>, G = kBackwardGroupRows, GK = kBackwardKeyRows;
  const int k = shape.kernel_size, r = shape.radius(), D = shape.channels, H = shape.height;
  const int dr = shape.row_channels(), dc = shape.col_channels();
  const int wp = ws.wp, wsc = ws.ws, margin = ws.margin;
  const int64_t cs = ws.q.channel_stride();
  const int64_t row_size = halo_row_size<T>(shape);
  std::fill(halo, halo + (window_end(row1 - 1, r, H) - hb) * row_size, T(0));
  std::fill(ws.dq.begin(), ws.dq.end(), T(0));
  std::fill(ws.ds_rows.begin(), ws.ds_rows.end(), T(0));  // offsets whose key row is outside stay 0
  std::fill(ws.ds_cols.begin(), ws.ds_cols.end(), T(0));
  Strided<T> logits[G], dp[G];
  for (int g = 0; g < G; ++g) {
    logits[g] = {ws.logits.data() + g * k * L, L};
    dp[g] = {ws.dp.data() + g * k * L, L};
  }

  for (int i0 = row0; i0 < row1; i0 += G) {
    const int rows = row1 - i0 < G ? row1 - i0 : G;
    const auto row_terms = [&](int g, int o) { return ws.row_terms.data() + (static_cast<int64_t>(g) * k + o) * wp; };
    const auto col_terms = [&](int g, int c) { return ws.col_terms.data() + (static_cast<int64_t>(g) * k + c) * wp; };
    const auto ds_rows = [&](int g, int o) { return ws.ds_rows.data() + (static_cast<int64_t>(i0 + g - row0) * k + o) * wp; };
    const auto ds_cols = [&](int g, int c) { return ws.ds_cols.data() + (static_cast<int64_t>(i0 + g - row0) * k + c) * wp; };
    const auto dq_row = [&](int g) { return ws.dq.data() + static_cast<int64_t>(i0 + g - row0) * D * wp; };
    // dK of key row a0 + e at columns x0 ..; its dV follows D padded rows later
    const auto dk_row = [&](int a0, int e, int x0) { return Strided<T>{halo + (a0 + e - hb) * row_size + x0, wp}; };
    // dS of (query row g, key row e) read diagonally for key lanes x0 ..: offset c at query lane x0 + (r - c) HEADS;
    // p, stored skewed (scratch_margin), read the same way with aligned loads
    const auto diagonal_dscores = [&](int g, int e, int x0) {
      return Loads<T>{ws.pair(ws.dscores, g, e) + margin + r * HEADS + x0, wsc - HEADS};
    };
    const auto diagonal_probs = [&](int g, int e, int x0) {
      return Loads<T>{ws.pair(ws.probs, g, e) + margin + x0, wsc};
    };
    for (int x0 = 0; x0 < wp; x0 += L) {
      Strided<T> block_rows[G], block_cols[G];
      Loads<T> queries[G];
      for (int g = 0; g < rows; ++g) {
        block_rows[g] = {row_terms(g, 0) + x0, wp};
        block_cols[g] = {col_terms(g, 0) + x0, wp};
        queries[g] = {ws.q.at(i0 + g, 0, x0), cs};
      }
      block_terms<T, G, HEADS>(rows, block_rows, block_cols, queries, shape, shape.has_rel ? &ws.rel : nullptr, x0);
    }

    // Key rows [full_begin, full_end) are in the window of every row of the group. Groups of key rows start at
    // full_begin: a group there pairs every query row with every key row, and its dQ, dK and dV contractions each
    // sum all of its pairs at once (contract.h's parts); the groups before and after (the window's edges) take
    // each query row's key rows, or each key row's query rows, alone.
    const int a_end = window_end(i0 + rows - 1, r, H);
    const int full_begin = window_begin(i0 + rows - 1, r), full_end = window_end(i0, r, H);
    for (int a0 = window_begin(i0, r); a0 < a_end;) {
      const int group_end = a0 < full_begin ? full_begin : a0 < full_end ? full_end : a_end;
      const int keys = group_end - a0 < GK ? group_end - a0 : GK;
      const bool full = a0 >= full_begin && a0 + keys <= full_end;
      for (int e = 0; e < keys; ++e) {  // queries of the group against key row a0 + e
        const int a = a0 + e;
        int first, last;
        rows_within(a, i0, rows, r, first, last);
        const T* key_row = ws.k.at(a, 0, -r * HEADS);
        const T* value_row = ws.v.at(a, 0, -r * HEADS);
        for (int x0 = 0; x0 < wp; x0 += L) {
          Loads<T> queries[G], grads[G], dscores[G];
          Strided<T> dq[G], cols[G];
          Vec<T> row_term[G];
          for (int g = first; g <= last; ++g) {
            row_term[g] = load(row_terms(g, offset_index(i0 + g, a, r)) + x0);
            cols[g] = {col_terms(g, 0) + x0, wp};
            queries[g] = {ws.q.at(i0 + g, 0, x0), cs};
            grads[g] = {ws.grad_out.at(i0 + g, 0, x0), cs};
            dscores[g] = {ws.pair(ws.dscores, g, e) + margin + x0, wsc};
            dq[g] = {dq_row(g) + x0, wp};
          }
          const int count = last - first + 1;
          contract_rows<T, G>(count, logits + first, k, RowPlusColumns<T>{row_term + first, cols + first}, queries + first,
                              Shifted<T, HEADS>{key_row + x0, cs}, D);
          contract_rows<T, G>(count, dp + first, k, Zero<T>{}, grads + first, Shifted<T, HEADS>{value_row + x0, cs}, D);
          for (int g = first; g <= last; ++g) {
            const int64_t stat = static_cast<int64_t>(i0 + g - row0) * wp + x0;
            const Vec<T> lse_log2e = load(ws.lse.data() + stat) * static_cast<T>(kLog2e);
            const Vec<T> delta = load(ws.delta.data() + stat);
            T* probs = ws.pair(ws.probs, g, e) + margin - r * HEADS + x0;  // offset c at + c (wsc + HEADS): skewed
            T* scores = ws.pair(ws.dscores, g, e) + margin + x0;
            T* col_sums = ds_cols(g, 0) + x0;
            Vec<T> row_sum = Vec<T>{};
            for (int c = 0; c < k; ++c) {
              const Vec<T> p = vexp_sub(logits[g].get(c), lse_log2e);
              const Vec<T> ds = p * (dp[g].get(c) - delta);
              store(probs + c * (wsc + HEADS), p);
              store(scores + c * wsc, ds);
              row_sum += ds;
              store(col_sums + c * wp, load(col_sums + c * wp) + ds);
            }
            store(ds_rows(g, offset_index(i0 + g, a, r)) + x0, row_sum);
          }
          if (!full) {
            contract_rows<T, G>(count, dq + first, D, Accumulate<T>{dq + first}, dscores + first,
                                VectorAt<T>{key_row + x0, HEADS, cs}, k);
          }
        }
      }
      if (full) {
        for (int x0 = 0; x0 < wp; x0 += L) {  // dQ of the group's rows summed over its key rows (the parts)
          Strided<T> dq[G];
          Loads<T> dscores[GK][G];
          Part<T, VectorAt<T>> key_parts[GK];
          for (int g = 0; g < rows; ++g) dq[g] = {dq_row(g) + x0, wp};
          for (int e = 0; e < keys; ++e) {
            for (int g = 0; g < rows; ++g) dscores[e][g] = {ws.pair(ws.dscores, g, e) + margin + x0, wsc};
            key_parts[e] = {dscores[e], VectorAt<T>{ws.k.at(a0 + e, 0, x0 - r * HEADS), HEADS, cs}};
          }
          contract_rows<T, G>(rows, dq, D, Accumulate<T>{dq}, key_parts, keys, k);
        }
        for (int x0 = 0; x0 < wp; x0 += L) {  // dK and dV of the group's key rows summed over its query rows
          Strided<T> dk[GK], dv[GK];
          Loads<T> dscores[G][GK], probs[G][GK];
          Part<T, VectorAt<T>> query_parts[G], grad_parts[G];
          for (int e = 0; e < keys; ++e) {
            dk[e] = dk_row(a0, e, x0);
            dv[e] = {dk[e].base + static_cast<int64_t>(D) * wp, wp};
          }
          for (int g = 0; g < rows; ++g) {
            for (int e = 0; e < keys; ++e) {
              dscores[g][e] = diagonal_dscores(g, e, x0);
              probs[g][e] = diagonal_probs(g, e, x0);
            }
            query_parts[g] = {dscores[g], VectorAt<T>{ws.q.at(i0 + g, 0, x0 + r * HEADS), -HEADS, cs}};
            grad_parts[g] = {probs[g], VectorAt<T>{ws.grad_out.at(i0 + g, 0, x0 + r * HEADS), -HEADS, cs}};
          }
          contract_rows<T, GK>(keys, dk, D, Accumulate<T>{dk}, query_parts, rows, k);
          contract_rows<T, GK>(keys, dv, D, Accumulate<T>{dv}, grad_parts, rows, k);
        }
      } else {
        for (int g = 0; g < rows; ++g) {  // keys of rows a0 .. a0 + keys: offset c pairs key x with query x - c + r
          int first, last;
          rows_within(i0 + g, a0, keys, r, first, last);
          if (first > last) continue;
          for (int x0 = 0; x0 < wp; x0 += L) {
            Strided<T> dk[GK], dv[GK];
            Loads<T> dscores[GK], probs[GK];
            for (int e = first; e <= last; ++e) {
              dk[e] = dk_row(a0, e, x0);
              dv[e] = {dk[e].base + static_cast<int64_t>(D) * wp, wp};
              dscores[e] = diagonal_dscores(g, e, x0);
              probs[e] = diagonal_probs(g, e, x0);
            }
            const int count = last - first + 1;
            contract_rows<T, GK>(count, dk + first, D, Accumulate<T>{dk + first}, dscores + first,
                                 VectorAt<T>{ws.q.at(i0 + g, 0, x0 + r * HEADS), -HEADS, cs}, k);
            contract_rows<T, GK>(count, dv + first, D, Accumulate<T>{dv + first}, probs + first,
                                 VectorAt<T>{ws.grad_out.at(i0 + g, 0, x0 + r * HEADS), -HEADS, cs}, k);
          }
        }
      }
      a0 += keys;
    }

    for (int g = 0; g < rows && shape.has_rel; ++g) {
      for (int x0 = 0; x0 < wp; x0 += L) {  // dQ's relative part
        contract(Strided<T>{dq_row(g) + x0, wp}, dr, Loads<T>{ds_rows(g, 0) + x0, wp},
                 ScalarAt<T, HEADS>{ws.rel.rows.data(), dr, 1}, k);
        contract(Strided<T>{dq_row(g) + dr * wp + x0, wp}, dc, Loads<T>{ds_cols(g, 0) + x0, wp},
                 ScalarAt<T, HEADS>{ws.rel.cols.data(), dc, 1}, k);
      }
    }
  }
  if (shape.has_rel) {
    sum_products(shape, ws, ws.ds_rows, 0, dr, row0, row1, rel_partial, head_stride);
    sum_products(shape, ws, ws.ds_cols, dr, D, row0, row1, rel_partial, head_stride);
  }
}

// One task: pack the band's rows of heads [h0, h0 + shape.interleave) of image b, compute, store dQ (dK and dV stay
// in the halo rows).
template <typename S, typename T>
void backward_task(const Shape& shape, const Bands& bands, const BackwardArgs<S, T>& args, int b, int h0, int t,
                   BackwardWorkspace<T>& ws) {
  const int D = shape.channels, W = shape.width, heads = shape.interleave;
  const int row0 = bands.begin(t), row1 = bands.end(t);
  const int hb = halo_begin(shape, bands, t), he = halo_end(shape, bands, t);
  ws.q.pack(args.q.planes(b, h0, heads).of, row0, row1, args.scale);
  ws.grad_out.pack(args.grad_out.planes(b, h0, heads).of, row0, row1, T(1));
  ws.k.pack(args.k.planes(b, h0, heads).of, hb, he, T(1));
  ws.v.pack(args.v.planes(b, h0, heads).of, hb, he, T(1));
  if (shape.has_rel) ws.rel.load(shape, args.rel_row, args.rel_col, h0, heads);
  load_row_stats(shape, args, b, h0, row0, row1, ws);
  const int64_t plane = shape.plane(b, h0);
  // one band per plane: its halo is the whole plane's, stored below, so it lives in this thread's workspace (a
  // halo for every plane took 7.3 MB at 28 x 28, batch 8, freshly mapped pages on every call)
  T* halo = bands.count() == 1 ? ws.plane_halo.data()
                               : args.halo + (plane * args.halo_offset[bands.count()] + args.halo_offset[t]) *
                                                 halo_row_size<T>(shape);
  // the relative gradients of (b, h0 + s, t), s < heads, (B, heads, bands, k, D)
  const int64_t head_stride = static_cast<int64_t>(bands.count()) * shape.kernel_size * D;
  const int64_t first_part = (static_cast<int64_t>(b) * shape.heads + h0) * bands.count() + t;
  T* rel_partial = shape.has_rel ? args.rel_partial + first_part * shape.kernel_size * D : nullptr;
  with_heads<T, kBackwardInterleave>(heads, [&](auto h) {
    backward_rows<T, decltype(h)::value>(shape, ws, row0, row1, hb, halo, rel_partial, head_stride);
  });
  if (bands.count() == 1) {  // the plane's only halo: dK and dV are final, stored while still in this core's caches
    for (int a = hb; a < he; ++a) store_key_row(shape, args, b, h0, a, halo + (a - hb) * halo_row_size<T>(shape));
  }
  const auto dq = args.dq.planes(b, h0, heads);
  for (int i = row0; i < row1; ++i) {
    store_row(dq.of, heads, i, W, ws.dq.data() + static_cast<int64_t>(i - row0) * D * ws.wp, ws.wp, D, args.scale);
  }
}

// dK and dV of key row a of heads [h0, h0 + shape.interleave) of image b from ``row``, halo-row layout ([dK,
// dV][D][lanes]).
template <typename S, typename T>
void store_key_row(const Shape& shape, const BackwardArgs<S, T>& args, int b, int h0, int a, T* row) {
  const int D = shape.channels, W = shape.width, wp = padded_width<T>(shape.lanes()), heads = shape.interleave;
  store_row(args.dk.planes(b, h0, heads).of, heads, a, W, row, wp, D, T(1));
  store_row(args.dv.planes(b, h0, heads).of, heads, a, W, row + static_cast<int64_t>(D) * wp, wp, D, T(1));
}

// dK and dV of key row a of the plane of image b from head h0: the halo rows of every band that touches it,
// summed in band order (a row only one band touches is stored from its halo row).
template <typename S, typename T>
void reduce_key_row(const Shape& shape, const Bands& bands, const BackwardArgs<S, T>& args, int b, int h0, int a,
                    std::vector<T>& sum) {
  const int r = shape.radius();
  const int64_t row_size = halo_row_size<T>(shape);
  T* head = args.halo + shape.plane(b, h0) * args.halo_offset[bands.count()] * row_size;
  const auto halo_row = [&](int t) { return head + (args.halo_offset[t] + a - halo_begin(shape, bands, t)) * row_size; };
  const int first = window_begin(a, r) / bands.band, last = (window_end(a, r, shape.height) - 1) / bands.band;
  if (first == last) return store_key_row(shape, args, b, h0, a, halo_row(first));
  std::fill(sum.begin(), sum.end(), T(0));
  for (int t = first; t <= last; ++t) {
    const T* row = halo_row(t);
    for (int64_t e = 0; e < row_size; ++e) sum[e] += row[e];
  }
  store_key_row(shape, args, b, h0, a, sum.data());
}

}  // namespace sasa::cpu
