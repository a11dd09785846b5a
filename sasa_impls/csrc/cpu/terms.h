// Per group of query blocks: the factorized relative logits and the column border mask.
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

// rel_row (k x Dr) and rel_col (k x (D - Dr)) of ``count`` heads from ``head`` in the accumulation type, the heads'
// values of one entry side by side ([o][d][head]: ScalarAt's PERIOD = count, pack.h's interleaved heads).
template <typename T>
struct RelTables {
  std::vector<T> rows, cols;

  template <typename S>
  void load(const Shape& shape, const S* rel_row, const S* rel_col, int head, int count) {
    const int k = shape.kernel_size, dr = shape.row_channels(), dc = shape.col_channels();
    rows.assign(static_cast<size_t>(k) * dr * count, T(0));
    cols.assign(static_cast<size_t>(k) * dc * count, T(0));
    for (int s = 0; s < count; ++s) {
      const int64_t h = head + s;
      for (int i = 0; i < k * dr; ++i) rows[i * count + s] = static_cast<T>(rel_row[h * k * dr + i]);
      for (int i = 0; i < k * dc; ++i) cols[i * count + s] = static_cast<T>(rel_col[h * k * dc + i]);
    }
  }
};

// The logits' first values against one window row (contract.h's init): the row term of the window row
// plus each column offset's masked term, per query row r.
template <typename T>
struct RowPlusColumns {
  const Vec<T>* row;
  const Strided<T>* cols;
  Vec<T> operator()(int r, int u) const { return row[r] + cols[r].get(u); }
};

// Row terms (k vectors) and masked column terms (k vectors) of ``rows`` query blocks at lanes x0 .. x0 + kLanes of
// packed query rows whose lanes interleave HEADS heads (pack.h: lane x0 + l is column (x0 + l) / HEADS; block g's
// channel d at queries[g](d)), rows <= MAXROWS: one contraction for all rows, so each load of a table entry feeds
// every row. Without relative logits the terms are 0 (and the mask, the same for every row: it depends on the
// columns only).
template <typename T, int MAXROWS, int HEADS>
void block_terms(int rows, const Strided<T>* row_terms, const Strided<T>* col_terms, const Loads<T>* queries,
                 const Shape& shape, const RelTables<T>* rel, int x0) {
  const int k = shape.kernel_size, r = shape.radius(), dr = shape.row_channels(), dc = shape.col_channels();
  if (rel != nullptr) {
    Loads<T> col_queries[MAXROWS];
    for (int g = 0; g < rows; ++g) col_queries[g] = {queries[g].base + dr * queries[g].stride, queries[g].stride};
    const ScalarAt<T, HEADS> row_table{rel->rows.data(), 1, dr}, col_table{rel->cols.data(), 1, dc};
    contract_rows<T, MAXROWS>(rows, row_terms, k, Zero<T>{}, queries, row_table, dr);
    contract_rows<T, MAXROWS>(rows, col_terms, k, Zero<T>{}, col_queries, col_table, dc);
  } else {
    for (int g = 0; g < rows; ++g) {
      for (int o = 0; o < k; ++o) {
        row_terms[g].set(o, Vec<T>{});
        col_terms[g].set(o, Vec<T>{});
      }
    }
  }
  constexpr int L = kLanes<T>;
  if (x0 / HEADS >= r && (x0 + L - 1) / HEADS + r < shape.width) return;  // every key column of the block is inside
  for (int c = 0; c < k; ++c) {
    for (int g = 0; g < rows; ++g) {
      Vec<T> terms = col_terms[g].get(c);
      for (int lane = 0; lane < L; ++lane) {
        if (!inside(key_at((x0 + lane) / HEADS, c, r), shape.width)) terms[lane] = static_cast<T>(kMaskedLogit);
      }
      col_terms[g].set(c, terms);
    }
  }
}

}  // namespace sasa::cpu
