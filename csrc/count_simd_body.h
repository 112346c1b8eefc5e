// The CPU tile of the count reconstruction kernel (count_cpu.cpp), written
// once against an ops traits OpsT<T> (ScalarOps or simd::Vec<Isa, T>) that
// the including namespace defines next to its own copy of special_math_body.h
// and count_likelihoods_body.h. No #include and no include guard: included
// once per SIMD level (as special_eval_body.h is).
//
// A tile is kCountGeneBlock genes x plan.row_chunk examples. Examples are
// taken in order b = b0, b0 + 1, ...; each example's genes of the block are
// widened into a RowArrays and evaluated by count_nll::FamilyNll in two
// passes: nll_grad_zero on every vector of kLanes genes that holds a zero
// count (no lgamma or digamma: most of a single-cell matrix), then the full
// nll_grad on the other counts, packed kLanes at a time and their results
// scattered back over the first pass's. Each element's result is the same
// bits as the full formula's (nll_grad selects nll_grad_zero's value at
// x = 0; every operation is lane-wise). The results are then added into
// float64 sums with one slot per position in a chunk of kLanesMax genes
// (slot j holds genes j, j + 16, ... of the tile), so every sum has the same
// order at every SIMD level and for any thread count.

// Genes per chunk: a multiple of every lane count (AVX-512 float: 16).
constexpr int kLanesMax = 16;
constexpr int kBlockGenes = static_cast<int>(kCountGeneBlock);
static_assert(kBlockGenes % kLanesMax == 0, "a block is a whole number of chunks");

// One example's genes of a tile, widened to the arithmetic type T, and their
// results. The lanes from the block's end to the next multiple of kLanes
// hold valid filler (x = mu = theta = 1, zi = 0), evaluated and never read.
template <typename T> struct alignas(64) RowArrays {
  T x[kBlockGenes], mu[kBlockGenes], theta[kBlockGenes], zi[kBlockGenes];
  T nll[kBlockGenes], d_mu[kBlockGenes], d_theta[kBlockGenes], d_zi[kBlockGenes];
};

// One vector (kLanes <= kLanesMax) of a row's nonzero counts, packed, and
// their results.
template <typename T> struct alignas(64) PackedLanes {
  T x[kLanesMax], mu[kLanesMax], theta[kLanesMax], zi[kLanesMax];
  T nll[kLanesMax], d_mu[kLanesMax], d_theta[kLanesMax], d_zi[kLanesMax];
};

// ((s0 + s1) + (s2 + s3)) + ...: the slots of a row sum, in a fixed order.
inline double sum_slots(const double *s) {
  double level[kLanesMax];
  for (int j = 0; j < kLanesMax; ++j)
    level[j] = s[j];
  for (int width = kLanesMax / 2; width >= 1; width /= 2)
    for (int j = 0; j < width; ++j)
      level[j] = level[2 * j] + level[2 * j + 1];
  return level[0];
}

// Stores v * scale (rounded once, from float64) to out[0..n).
template <typename G, typename T> void store_scaled(G *out, const T *v, int64_t n, double scale) {
  for (int64_t j = 0; j < n; ++j)
    out[j] = static_cast<G>(static_cast<double>(v[j]) * scale);
}

// slots[j] += v[j + 16 k] for k = 0, 1, ... in that order (see the top).
template <typename T> void add_to_slots(double *slots, const T *v, int n) {
  for (int c = 0; c < n; c += kLanesMax) {
    const int len = std::min(kLanesMax, n - c);
    for (int j = 0; j < len; ++j)
      slots[j] += static_cast<double>(v[c + j]);
  }
}

// cols[g] += v[g] * scale, g < n: a per-gene parameter's sum over examples.
template <typename T> void add_to_cols(double *cols, const T *v, int n, double scale) {
  for (int g = 0; g < n; ++g)
    cols[g] += static_cast<double>(v[g]) * scale;
}

// Every input lane of the row valid filler (see RowArrays).
template <typename T> void fill_valid(RowArrays<T> &row) {
  for (int j = 0; j < kBlockGenes; ++j)
    row.x[j] = row.mu[j] = row.theta[j] = T(1), row.zi[j] = T(0);
}

// dst[j] = src[j * stride], widened, j < n.
template <typename S, typename T> void load_strided(T *dst, const S *src, int64_t stride, int n) {
  for (int j = 0; j < n; ++j)
    dst[j] = Elem<S>::load(src[j * stride]);
}

// Example b's n genes from g0 (a family's absent parameters keep their filler).
template <typename S, class Fam, typename T>
void load_row(const CountReconParams &p, int64_t b, int64_t g0, int n, RowArrays<T> &row) {
  const int64_t at = b * p.genes + g0;
  load_strided(row.x, static_cast<const S *>(p.counts) + at, 1, n);
  load_strided(row.mu, static_cast<const S *>(p.mu) + at, 1, n);
  if constexpr (Fam::kHasTheta)
    load_strided(row.theta,
                 static_cast<const S *>(p.theta) + b * p.theta_row_stride + g0 * p.theta_col_stride,
                 p.theta_col_stride, n);
  if constexpr (Fam::kHasZi)
    load_strided(row.zi,
                 static_cast<const S *>(p.zi_logits) + b * p.zi_row_stride + g0 * p.zi_col_stride,
                 p.zi_col_stride, n);
}

// The key of the row's first invalid element (flat index at + j), or
// kNoInvalid: whole vectors are checked first (CountInputRule over O, the
// filler lanes valid), the elements one by one only in a row with a bad one.
template <class Fam, class O, typename T>
int64_t first_invalid_in_row(const RowArrays<T> &row, int n, int64_t at) {
  using Rule = count_nll::CountInputRule<O>;
  typename O::R bad = O::set1(T(0));
  for (int v = 0; v < n; v += O::kLanes) {
    const typename O::C ok = Rule::all(O::loadu(row.x + v), O::loadu(row.mu + v),
                                       O::loadu(row.theta + v), O::loadu(row.zi + v));
    bad = O::max(bad, O::select(ok, O::set1(T(0)), O::set1(T(1))));
  }
  alignas(64) T lanes[kLanesMax];
  O::storeu(lanes, bad);
  bool any_bad = false;
  for (int k = 0; k < O::kLanes; ++k)
    any_bad |= lanes[k] != T(0);
  if (!any_bad)
    return kNoInvalid;
  for (int j = 0; j < n; ++j) {
    const CountInput which = first_invalid_input(row.x[j], row.mu[j], row.theta[j], row.zi[j],
                                                 Fam::kHasTheta, Fam::kHasZi);
    if (which != CountInput::kCount)
      return invalid_key(at + j, which);
  }
  return kNoInvalid;
}

template <class O, typename T>
void store_results(const count_nll::CountGrads<O> &r, T *nll, T *d_mu, T *d_theta, T *d_zi) {
  O::storeu(nll, r.nll);
  O::storeu(d_mu, r.d_mu);
  O::storeu(d_theta, r.d_theta);
  O::storeu(d_zi, r.d_zi_logits);
}

// Pass 1: every vector with a zero count (x == 0, so -0 too and not NaN)
// gets nll_grad_zero; its other lanes are overwritten by pass 2.
template <class Fam, class O, typename T> void eval_zero_counts(RowArrays<T> &row, int n) {
  for (int v = 0; v < n; v += O::kLanes) {
    bool any_zero = false;
    for (int k = 0; k < O::kLanes; ++k)
      any_zero |= row.x[v + k] == T(0);
    if (!any_zero)
      continue;
    const count_nll::CountGrads<O> r =
        Fam::nll_grad_zero(O::loadu(row.mu + v), O::loadu(row.theta + v), O::loadu(row.zi + v));
    store_results<O>(r, row.nll + v, row.d_mu + v, row.d_theta + v, row.d_zi + v);
  }
}

// pos[0..m): the positions j < n of the counts that are not 0 (NaN among
// them), in order; returns m.
template <typename T> int nonzero_positions(const T *x, int n, int *pos) {
  int m = 0;
  for (int j = 0; j < n; ++j) {
    pos[m] = j;
    m += x[j] != T(0);
  }
  return m;
}

// Lanes k < width of `lanes` from the row's genes at[k]; past `count` the
// last one again (its result is dropped).
template <typename T>
void gather_lanes(PackedLanes<T> &lanes, const RowArrays<T> &row, const int *at, int count,
                  int width) {
  for (int k = 0; k < width; ++k) {
    const int g = at[std::min(k, count - 1)];
    lanes.x[k] = row.x[g], lanes.mu[k] = row.mu[g];
    lanes.theta[k] = row.theta[g], lanes.zi[k] = row.zi[g];
  }
}

template <typename T>
void scatter_lanes(RowArrays<T> &row, const PackedLanes<T> &lanes, const int *at, int count) {
  for (int k = 0; k < count; ++k) {
    const int g = at[k];
    row.nll[g] = lanes.nll[k], row.d_mu[g] = lanes.d_mu[k];
    row.d_theta[g] = lanes.d_theta[k], row.d_zi[g] = lanes.d_zi[k];
  }
}

// Pass 2: the full formula on the nonzero counts, packed kLanes at a time.
template <class Fam, class O, typename T> void eval_nonzero_counts(RowArrays<T> &row, int n) {
  int pos[kBlockGenes];
  const int m = nonzero_positions(row.x, n, pos);
  PackedLanes<T> lanes;
  for (int v = 0; v < m; v += O::kLanes) {
    const int count = std::min(O::kLanes, m - v);
    gather_lanes(lanes, row, pos + v, count, O::kLanes);
    const count_nll::CountGrads<O> r = Fam::nll_grad(O::loadu(lanes.x), O::loadu(lanes.mu),
                                                     O::loadu(lanes.theta), O::loadu(lanes.zi));
    store_results<O>(r, lanes.nll, lanes.d_mu, lanes.d_theta, lanes.d_zi);
    scatter_lanes(row, lanes, pos + v, count);
  }
}

// A tile's per-gene sums over its examples (a per-gene or scalar parameter's
// gradient), each sum only where the plan has it.
struct TileCols {
  double *theta_out, *zi_out; // the scratch partials, or null
  double theta[kBlockGenes], zi[kBlockGenes];
};

// Example b's results into its gradients, its slots and the tile's columns;
// writes its row sums to the scratch partials.
template <typename S, typename T>
void add_row(const CountReconParams &p, const CountReconPlan &w, double *scratch,
             const RowArrays<T> &row, int64_t block, int64_t b, int n, TileCols &cols) {
  using G = Grad<S>;
  const int64_t at = b * p.genes + block * kCountGeneBlock;
  const double example_scale = p.row_scale != nullptr ? p.row_scale[b] : 1.0;
  const double elem_scale = p.grad_scale * example_scale;
  if (p.grad_mu != nullptr)
    store_scaled(static_cast<G *>(p.grad_mu) + at, row.d_mu, n, elem_scale);
  if (p.grad_theta != nullptr && w.theta == Broadcast::kPerElement)
    store_scaled(static_cast<G *>(p.grad_theta) + at, row.d_theta, n, elem_scale);
  if (p.grad_zi != nullptr && w.zi == Broadcast::kPerElement)
    store_scaled(static_cast<G *>(p.grad_zi) + at, row.d_zi, n, elem_scale);
  if (cols.theta_out != nullptr)
    add_to_cols(cols.theta, row.d_theta, n, example_scale);
  if (cols.zi_out != nullptr)
    add_to_cols(cols.zi, row.d_zi, n, example_scale);
  auto write_row_sum = [&](int64_t partials, const T *values) {
    double slots[kLanesMax] = {};
    add_to_slots(slots, values, n);
    scratch[partials + block * p.batch + b] = sum_slots(slots);
  };
  write_row_sum(w.loss, row.nll);
  if (w.theta_rows >= 0)
    write_row_sum(w.theta_rows, row.d_theta);
  if (w.zi_rows >= 0)
    write_row_sum(w.zi_rows, row.d_zi);
}

template <typename S, CountFamily F>
void recon_tile(const CountReconParams &p, const CountReconPlan &w, double *scratch,
                int64_t *invalid_keys, int64_t tile) {
  using T = typename Elem<S>::T;
  using O = OpsT<T>;
  using Fam = count_nll::FamilyNll<F, O>;
  static_assert(kLanesMax % O::kLanes == 0, "a chunk is a whole number of vectors");
  const int64_t genes = p.genes;
  const int64_t block = tile % w.gene_blocks, chunk = tile / w.gene_blocks;
  const int64_t g0 = block * kCountGeneBlock;
  const int n = static_cast<int>(std::min(kCountGeneBlock, genes - g0));
  const int64_t b0 = chunk * w.row_chunk, b_end = std::min(b0 + w.row_chunk, p.batch);
  // Where each parameter's per-gene sums go (their per-example sums and
  // per-element gradients: add_row).
  TileCols cols{w.theta_cols >= 0 ? scratch + w.theta_cols + chunk * genes + g0 : nullptr,
                w.zi_cols >= 0 ? scratch + w.zi_cols + chunk * genes + g0 : nullptr,
                {},
                {}};
  int64_t first_bad = kNoInvalid;
  RowArrays<T> row;
  fill_valid(row);
  for (int64_t b = b0; b < b_end; ++b) {
    load_row<S, Fam>(p, b, g0, n, row);
    if (p.first_invalid != nullptr && first_bad == kNoInvalid)
      first_bad = first_invalid_in_row<Fam, O>(row, n, b * genes + g0);
    eval_zero_counts<Fam, O>(row, n);
    eval_nonzero_counts<Fam, O>(row, n);
    add_row<S>(p, w, scratch, row, block, b, n, cols);
  }
  for (int g = 0; g < n; ++g) {
    if (cols.theta_out != nullptr)
      cols.theta_out[g] = cols.theta[g];
    if (cols.zi_out != nullptr)
      cols.zi_out[g] = cols.zi[g];
  }
  if (invalid_keys != nullptr)
    invalid_keys[tile] = first_bad;
}

// Tiles [begin, end) of the call, for the family and storage type of p.
template <typename S>
void recon_tiles(const CountReconParams &p, const CountReconPlan &w, double *scratch,
                 int64_t *invalid_keys, int64_t begin, int64_t end) {
  for (int64_t tile = begin; tile < end; ++tile) {
    switch (p.family) {
#define KLANNEAL_COUNT_TILE_CASE(enumerator, name)                                                 \
  case CountFamily::enumerator:                                                                    \
    recon_tile<S, CountFamily::enumerator>(p, w, scratch, invalid_keys, tile);                     \
    break;
      KLANNEAL_COUNT_FAMILIES(KLANNEAL_COUNT_TILE_CASE)
#undef KLANNEAL_COUNT_TILE_CASE
    }
  }
}

// The instantiation of this level for storage type S.
template <typename S> RunTiles run_tiles_for() { return &recon_tiles<S>; }
