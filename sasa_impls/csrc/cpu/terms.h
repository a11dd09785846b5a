// Per query block: the factorized relative logits and the column border mask.
//
// Relative logits are factorized (the design's FLOP accounting): q[:Dr] . rel_row[o] once per row offset
// and q[Dr:] . rel_col[c] once per column offset, k D MACs per query instead of k^2 D; a window
// position's logit adds the row term of its row and the column term of its column. The column term
// also carries the border mask: on lanes whose key column lies outside the image it is the masked
// logit, so the window loops need no other test (rows outside the image are never visited).
#pragma once

#include <vector>

#include "problem.h"

namespace sasa::cpu {

// rel_row[h] (k x Dr) and rel_col[h] (k x (D - Dr)) of one head in the accumulation type.
template <typename T>
struct RelTables {
  std::vector<T> rows, cols;

  template <typename S>
  void load(const Shape& shape, const S* rel_row, const S* rel_col, int head) {
    const int k = shape.kernel_size, dr = shape.row_channels(), dc = shape.col_channels();
    rows.assign(static_cast<size_t>(k) * dr, T(0));
    cols.assign(static_cast<size_t>(k) * dc, T(0));
    for (int i = 0; i < k * dr; ++i) rows[i] = static_cast<T>(rel_row[static_cast<int64_t>(head) * k * dr + i]);
    for (int i = 0; i < k * dc; ++i) cols[i] = static_cast<T>(rel_col[static_cast<int64_t>(head) * k * dc + i]);
  }
};

// Row terms (k vectors) and masked column terms (k vectors) of the query block at columns x0 ..
// x0 + lanes of a packed query row (channel d at q + d * q_stride). Without relative logits the terms
// are 0 (and the mask).
template <typename T>
void block_terms(Strided<T> row_terms, Strided<T> col_terms, const T* q, int64_t q_stride, const Shape& shape,
                 const RelTables<T>* rel, int x0) {
  const int k = shape.kernel_size, r = shape.radius(), dr = shape.row_channels(), dc = shape.col_channels();
  for (int o = 0; o < k; ++o) {
    row_terms.set(o, Vec<T>{});
    col_terms.set(o, Vec<T>{});
  }
  if (rel != nullptr) {
    const Vec<T> one = splat(T(1));
    contract(row_terms, k, one, Loads<T>{q, q_stride}, ScalarAt<T>{rel->rows.data(), 1, dr}, dr);
    contract(col_terms, k, one, Loads<T>{q + dr * q_stride, q_stride}, ScalarAt<T>{rel->cols.data(), 1, dc}, dc);
  }
  constexpr int L = kLanes<T>;
  if (x0 >= r && x0 + L - 1 + r < shape.width) return;  // every key column of the block is inside
  for (int c = 0; c < k; ++c) {
    Vec<T> terms = col_terms.get(c);
    for (int lane = 0; lane < L; ++lane) {
      if (!inside(key_at(x0 + lane, c, r), shape.width)) terms[lane] = static_cast<T>(kMaskedLogit);
    }
    col_terms.set(c, terms);
  }
}

}  // namespace sasa::cpu
