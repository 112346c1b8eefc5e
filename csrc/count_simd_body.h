// The CPU tile of the count reconstruction kernel (count_cpu.cpp), written
// once against an ops traits OpsT<T> (ScalarOps or simd::Vec<Isa, T>) that
// the including namespace defines next to its own copy of special_math_body.h
// and count_likelihoods_body.h. No #include and no include guard: included
// once per SIMD level (as special_eval_body.h is).
//
// A tile is kCountGeneBlock genes x plan.row_chunk examples. Examples are
// taken in order b = b0, b0 + 1, ...; each in chunks of kLanesMax genes:
// the chunk's inputs are widened into arrays of T, evaluated kLanes at a
// time by count_nll::FamilyNll, and the results added into float64 sums with
// one slot per position in the chunk (slot j holds genes j, j + 16, ... of
// the tile), so every sum has the same order at every SIMD level and for any
// thread count.

// Genes per chunk: a multiple of every lane count (AVX-512 float: 16).
constexpr int kLanesMax = 16;

// A chunk's values, widened to the arithmetic type T.
template <typename T> struct alignas(64) ChunkArrays {
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

template <typename S, CountFamily F>
void recon_tile(const CountReconParams &p, const CountReconPlan &w, double *scratch,
                int64_t *invalid_keys, int64_t tile) {
  using T = typename Elem<S>::T;
  using O = OpsT<T>;
  using Fam = count_nll::FamilyNll<F, O>;
  using G = Grad<S>;
  static_assert(kLanesMax % O::kLanes == 0, "a chunk is a whole number of vectors");
  const int64_t genes = p.genes, batch = p.batch;
  const int64_t block = tile % w.gene_blocks, chunk = tile / w.gene_blocks;
  const int64_t g0 = block * kCountGeneBlock, g_end = std::min(g0 + kCountGeneBlock, genes);
  const int64_t b0 = chunk * w.row_chunk, b_end = std::min(b0 + w.row_chunk, batch);
  const S *mu = static_cast<const S *>(p.mu);
  const S *counts = static_cast<const S *>(p.counts);
  const S *theta = static_cast<const S *>(p.theta);
  const S *zi = static_cast<const S *>(p.zi_logits);
  G *grad_mu = static_cast<G *>(p.grad_mu);
  G *grad_theta = static_cast<G *>(p.grad_theta);
  G *grad_zi = static_cast<G *>(p.grad_zi);
  // Where each parameter's gradient goes: written per element, or summed
  // into this tile's per-example (rows) or per-gene (cols) partials.
  const bool theta_elem = grad_theta != nullptr && w.theta == Broadcast::kPerElement;
  const bool zi_elem = grad_zi != nullptr && w.zi == Broadcast::kPerElement;
  double *theta_cols = w.theta_cols >= 0 ? scratch + w.theta_cols + chunk * genes + g0 : nullptr;
  double *zi_cols = w.zi_cols >= 0 ? scratch + w.zi_cols + chunk * genes + g0 : nullptr;
  double col_theta[kCountGeneBlock] = {}, col_zi[kCountGeneBlock] = {};
  int64_t first_bad = kNoInvalid;
  ChunkArrays<T> a;
  for (int j = 0; j < kLanesMax; ++j) // the lanes past a short chunk's end: valid filler
    a.x[j] = a.mu[j] = a.theta[j] = T(1), a.zi[j] = T(0);

  for (int64_t b = b0; b < b_end; ++b) {
    const double example_scale = p.row_scale != nullptr ? p.row_scale[b] : 1.0;
    const double elem_scale = p.grad_scale * example_scale;
    double loss_slots[kLanesMax] = {}, theta_slots[kLanesMax] = {}, zi_slots[kLanesMax] = {};
    for (int64_t gc = g0; gc < g_end; gc += kLanesMax) {
      const int64_t n = std::min<int64_t>(kLanesMax, g_end - gc);
      const int64_t at = b * genes + gc;
      for (int64_t j = 0; j < n; ++j) {
        a.x[j] = Elem<S>::load(counts[at + j]);
        a.mu[j] = Elem<S>::load(mu[at + j]);
      }
      if constexpr (Fam::kHasTheta) {
        const S *t = theta + b * p.theta_row_stride + gc * p.theta_col_stride;
        for (int64_t j = 0; j < n; ++j)
          a.theta[j] = Elem<S>::load(t[j * p.theta_col_stride]);
      }
      if constexpr (Fam::kHasZi) {
        const S *z = zi + b * p.zi_row_stride + gc * p.zi_col_stride;
        for (int64_t j = 0; j < n; ++j)
          a.zi[j] = Elem<S>::load(z[j * p.zi_col_stride]);
      }
      if (p.first_invalid != nullptr && first_bad == kNoInvalid) {
        for (int64_t j = 0; j < n; ++j) {
          const CountInput which = first_invalid_input(a.x[j], a.mu[j], a.theta[j], a.zi[j],
                                                       Fam::kHasTheta, Fam::kHasZi);
          if (which != CountInput::kCount) {
            first_bad = invalid_key(at + j, which);
            break;
          }
        }
      }
      for (int v = 0; v < kLanesMax; v += O::kLanes) {
        const count_nll::CountGrads<O> r = Fam::nll_grad(O::loadu(a.x + v), O::loadu(a.mu + v),
                                                         O::loadu(a.theta + v), O::loadu(a.zi + v));
        O::storeu(a.nll + v, r.nll);
        O::storeu(a.d_mu + v, r.d_mu);
        O::storeu(a.d_theta + v, r.d_theta);
        O::storeu(a.d_zi + v, r.d_zi_logits);
      }
      for (int64_t j = 0; j < n; ++j)
        loss_slots[j] += static_cast<double>(a.nll[j]);
      if (grad_mu != nullptr)
        store_scaled(grad_mu + at, a.d_mu, n, elem_scale);
      if (theta_elem)
        store_scaled(grad_theta + at, a.d_theta, n, elem_scale);
      if (zi_elem)
        store_scaled(grad_zi + at, a.d_zi, n, elem_scale);
      if (w.theta_rows >= 0)
        for (int64_t j = 0; j < n; ++j)
          theta_slots[j] += static_cast<double>(a.d_theta[j]);
      if (w.zi_rows >= 0)
        for (int64_t j = 0; j < n; ++j)
          zi_slots[j] += static_cast<double>(a.d_zi[j]);
      if (theta_cols != nullptr)
        for (int64_t j = 0; j < n; ++j)
          col_theta[gc - g0 + j] += static_cast<double>(a.d_theta[j]) * example_scale;
      if (zi_cols != nullptr)
        for (int64_t j = 0; j < n; ++j)
          col_zi[gc - g0 + j] += static_cast<double>(a.d_zi[j]) * example_scale;
    }
    const int64_t row_at = block * batch + b;
    scratch[w.loss + row_at] = sum_slots(loss_slots);
    if (w.theta_rows >= 0)
      scratch[w.theta_rows + row_at] = sum_slots(theta_slots);
    if (w.zi_rows >= 0)
      scratch[w.zi_rows + row_at] = sum_slots(zi_slots);
  }
  for (int64_t g = g0; g < g_end; ++g) {
    if (theta_cols != nullptr)
      theta_cols[g - g0] = col_theta[g - g0];
    if (zi_cols != nullptr)
      zi_cols[g - g0] = col_zi[g - g0];
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
