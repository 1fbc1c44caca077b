// AdamW² step for whole matrices on the CPU, in three passes over each matrix (the eager step makes ~17).
//
// A (m × n, row-major) is a weight matrix with gradient G and moments M, V (all of type T); x_W, x_U are
// the fp32 warm-start vectors (length k = min(m, n)); B = A if n ≤ m else Aᵀ (the short side); U is
// AdamW's direction. With power_iters = 1 and the previous step's product b_W = B_W x_W kept:
//
//   pass 1  M ← β1 M + (1−β1) G,  V ← β2 V + (1−β2) G²   (stored in T)
//           U = (M / bc1) / (sqrt(V) / sqrt(bc2) + ε)     (from the stored M, V; written to a work buffer)
//           b_U = B_U x_U,  z_W = B_Wᵀ (c y_W) with y_W = b_W / ‖b_W‖,  and B_W x_W (to validate b_W)
//   pass 2  z_U = B_Uᵀ (c y_U) with y_U = b_U / ‖b_U‖
//           σ = ‖z‖ / c,  x ← z / ‖z‖ where σ is finite and > 0
//   cap     α' = lr · min(1, τ σ_W / (lr σ_U)) where σ_W > 0
//   pass 3  A ← A (1 − α' λ) − α' U,  and b_W = B_W x_W of the new A for the next step
//
// (c: a power of two keeping the products out of the subnormal range; 1 normally. ‖·‖ is scale-safe.)
// b_W is the first half of the next step's power iteration on the weights: computing it while the update
// writes A lets pass 1 do both halves (z_W needs all of y_W before the pass). It is used only if it is
// still B_W x_W: pass 1 also computes B_W x_W of the weights and x_W as they are now (it reads them
// anyway) and compares bit for bit (the same products in the same order give the same bits). Weights or
// x_W changed in any way since (an in-place edit, a permutation, a load, vectors reset) give a different
// product, which pass 2 then uses, as the eager step does; there is no fingerprint to defeat. Further
// power iterations (cold start; fresh tensors, for U; power_iters > 1) repeat both half-steps on W or on
// the stored U.
// The results are the eager step's (hf_weyl.core.functional) to float rounding. Rows are split across
// threads; column sums are accumulated per thread and added in thread order (deterministic for a given
// thread count).

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int kLanes = 16;

// Element access as fp32. bf16 is handled on its bits (round to nearest even, NaN kept), so that the
// compiler vectorises the loops; c10::BFloat16's own conversion branches.
inline float ld(const float* a, int64_t i) { return a[i]; }
inline void st(float* a, int64_t i, float x) { a[i] = x; }
inline float ld(const at::BFloat16* a, int64_t i) {
  const uint32_t bits = uint32_t(reinterpret_cast<const uint16_t*>(a)[i]) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return uint16_t(((u & 0x7FFFFFFFu) > 0x7F800000u) ? 0x7FC0u : rounded);
}
inline void st(at::BFloat16* a, int64_t i, float x) { reinterpret_cast<uint16_t*>(a)[i] = bf16_bits(x); }

struct Hyper {
  float beta1, beta2, eps, lr, weight_decay, tau;
};

// v ← v / ‖v‖ in place, returning ‖v‖, computed as max|v| · ‖v / max|v|‖ (no square under- or overflows).
// A zero vector stays zero (norm 0); a non-finite one gives a NaN norm (callers then keep their vector).
float unit_(std::vector<float>& v) {
  float scale = 0.f;
  bool finite = true;
  for (float a : v) {
    finite = finite && std::isfinite(a);
    scale = std::max(scale, std::fabs(a));
  }
  if (!finite) return NAN;
  if (!(scale > 0.f)) return 0.f;
  double sum = 0.0;
  for (float& a : v) {
    a = a / scale;
    sum += double(a) * double(a);
  }
  const float norm = float(std::sqrt(sum));
  const float div = std::max(norm, 1.f);
  for (float& a : v) a = a / div;
  return norm * scale;
}

float subnormal_guard(float s) {
  if (s > 0.f && s < std::ldexp(1.f, -60)) {
    const int e = int(std::floor(std::log2(s)));
    return std::ldexp(1.f, std::min(-e, 126));
  }
  return 1.f;
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {  // pairwise: log2(16) dependent adds, not 16
#pragma omp simd
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  float s = acc[0];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float* out, const float* a, float s, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] += a[j] * s;
}

// One matrix-vector product accumulated row by row: rows of A are visited in order, each as a float
// buffer. "dot" products give one output per row (A·v); the others accumulate Aᵀ·v into per-thread
// partial sums over the columns, added up by finish().
struct Product {
  bool active = false;
  bool dot = false;
  const float* vec = nullptr;
  std::vector<float> out, partial;
  int64_t n = 0;

  void start(bool is_dot, const float* v, int64_t rows, int64_t cols) {
    active = true;
    dot = is_dot;
    vec = v;
    n = cols;
    out.assign(is_dot ? rows : cols, 0.f);
    if (!is_dot) partial.assign(static_cast<size_t>(at::get_num_threads()) * cols, 0.f);
  }
  inline void row(const float* vals, int64_t r, int tid) {
    if (!active) return;
    if (dot) {
      out[r] = ::dot(vals, vec, n);
    } else {
      axpy(partial.data() + static_cast<int64_t>(tid) * n, vals, vec[r], n);
    }
  }
  void finish() {
    if (!active || dot) return;
    const int64_t threads = static_cast<int64_t>(partial.size()) / std::max<int64_t>(n, 1);
    for (int64_t t = 0; t < threads; ++t) axpy(out.data(), partial.data() + t * n, 1.f, n);
  }
};

// B·x ("long": the product with the long side) and Bᵀ·y ("short") as row-wise products of A.
inline bool long_is_dot(int64_t m, int64_t n) { return n <= m; }   // tall: B = A, B x = A x
inline bool short_is_dot(int64_t m, int64_t n) { return n > m; }   // wide: B = Aᵀ, Bᵀ y = A y

template <typename T>
struct Matrix {
  T* w;
  const T* g;
  T* m;
  T* v;
  T* u;  // work buffer for U
  int64_t rows, cols;
  float inv_bc1, inv_bc2_sqrt;
};

// Row r of a T array as fp32: the array itself for fp32, else converted into `buf`.
template <typename T>
inline const float* row_as_float(const T* a, int64_t base, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return a + base;
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) buf[j] = ld(a, base + j);
    return buf;
  }
}

template <typename Fn>
void for_rows(int64_t m, int64_t n, Fn fn) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1));
  at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    std::vector<float> a(n), b(n);
    for (int64_t r = begin; r < end; ++r) fn(r, tid, a.data(), b.data());
  });
}

// Normalise b in place (y = b / ‖b‖) and scale it by the subnormal guard c; returns c.
float to_unit_scaled(std::vector<float>& b) {
  const float c = subnormal_guard(unit_(b));
  for (float& y : b) y *= c;
  return c;
}

// x ← z / ‖z‖ where σ = ‖z‖ / c is finite and positive; returns σ (0 where it is not).
float finish_sigma(std::vector<float>& z, float c, float* x) {
  const float sigma = unit_(z) / c;
  if (sigma > 0.f && std::isfinite(sigma)) {
    std::copy(z.begin(), z.end(), x);
    return sigma;
  }
  return 0.f;
}

// One full power step on the array A (T*, m × n) from x; returns σ.
template <typename T>
float power_step_on(const T* a, int64_t m, int64_t n, float* x) {
  Product first, second;
  first.start(long_is_dot(m, n), x, m, n);
  for_rows(m, n, [&](int64_t r, int tid, float* buf, float*) { first.row(row_as_float(a, r * n, n, buf), r, tid); });
  first.finish();
  const float c = to_unit_scaled(first.out);
  second.start(short_is_dot(m, n), first.out.data(), m, n);
  for_rows(m, n, [&](int64_t r, int tid, float* buf, float*) { second.row(row_as_float(a, r * n, n, buf), r, tid); });
  second.finish();
  return finish_sigma(second.out, c, x);
}

template <typename T>
void step_matrix(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m_t, const at::Tensor& v_t,
                 const at::Tensor& work, const at::Tensor& xw_t, const at::Tensor& xu_t, at::Tensor& bw_t, int64_t rows,
                 double bc1, double bc2, const Hyper& h, int64_t iters_w, int64_t iters_u, float* out) {
  Matrix<T> a{p.data_ptr<T>(), g.data_ptr<T>(), m_t.data_ptr<T>(), v_t.data_ptr<T>(), work.data_ptr<T>(),
              rows, p.numel() / rows, float(1.0 / bc1), float(1.0 / std::sqrt(bc2))};
  const int64_t m = a.rows, n = a.cols;
  float* xw = xw_t.data_ptr<float>();
  float* xu = xu_t.data_ptr<float>();
  const int64_t len = long_is_dot(m, n) ? m : n;
  // The kept b_W is used only if pass 1's product of the current weights and x_W reproduces it exactly.
  const bool have_bw = bw_t.numel() == len;
  // (locals captured by value in the row loops: stores through float* could alias anything reached by
  // reference and force a reload of every constant in every iteration)
  const float b1 = h.beta1, b2 = h.beta2, c1 = 1.f - h.beta1, c2 = 1.f - h.beta2, eps = h.eps;
  const float inv_bc1 = a.inv_bc1, inv_bc2_sqrt = a.inv_bc2_sqrt;
  T* const w = a.w;
  const T* const gr = a.g;
  T* const mo = a.m;
  T* const ve = a.v;
  T* const ub = a.u;

  // pass 1: moments, U (stored), b_U = B_U x_U, b_W = B_W x_W, and z_W = B_Wᵀ y_W from the kept b_W
  std::vector<float> yw;
  float cw = 1.f;
  if (have_bw) {
    const double* kept = bw_t.data_ptr<double>();
    yw.assign(kept, kept + len);
    cw = to_unit_scaled(yw);
  }
  Product bu, bw, w_prod;
  bu.start(long_is_dot(m, n), xu, m, n);
  bw.start(long_is_dot(m, n), xw, m, n);
  if (have_bw) w_prod.start(short_is_dot(m, n), yw.data(), m, n);
  for_rows(m, n, [&, b1, b2, c1, c2, eps, inv_bc1, inv_bc2_sqrt](int64_t r, int tid, float* ubuf, float* wbuf) {
    const int64_t base = r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float gj = ld(gr, base + j);
      st(mo, base + j, b1 * ld(mo, base + j) + c1 * gj);
      st(ve, base + j, b2 * ld(ve, base + j) + c2 * gj * gj);
      const float mj = ld(mo, base + j), vj = ld(ve, base + j);  // U from the stored (rounded) moments
      st(ub, base + j, (mj * inv_bc1) / (std::sqrt(vj) * inv_bc2_sqrt + eps));
    }
    bu.row(row_as_float(ub, base, n, ubuf), r, tid);
    const float* wr = row_as_float(w, base, n, wbuf);
    bw.row(wr, r, tid);
    w_prod.row(wr, r, tid);
  });
  bu.finish();
  bw.finish();
  w_prod.finish();
  bool kept_valid = have_bw;  // bit for bit: NaN weights never validate
  if (have_bw) {
    const double* kept = bw_t.data_ptr<double>();
    for (int64_t i = 0; i < len && kept_valid; ++i) kept_valid = float(kept[i]) == bw.out[i];
  }

  // pass 2: z_U = B_Uᵀ y_U, and z_W = B_Wᵀ y_W from pass 1's b_W unless the kept one was valid
  const float cu = to_unit_scaled(bu.out);
  Product zu, w_late;
  zu.start(short_is_dot(m, n), bu.out.data(), m, n);
  if (!kept_valid) {
    cw = to_unit_scaled(bw.out);
    w_late.start(short_is_dot(m, n), bw.out.data(), m, n);
  }
  for_rows(m, n, [&](int64_t r, int tid, float* ubuf, float* wbuf) {
    const int64_t base = r * n;
    zu.row(row_as_float(ub, base, n, ubuf), r, tid);
    if (w_late.active) w_late.row(row_as_float(w, base, n, wbuf), r, tid);
  });
  zu.finish();
  w_late.finish();
  float su = finish_sigma(zu.out, cu, xu);
  float sw = finish_sigma(kept_valid ? w_prod.out : w_late.out, cw, xw);

  for (int64_t it = 1; it < iters_u; ++it) su = power_step_on(a.u, m, n, xu);  // cold/fresh, power_iters > 1
  for (int64_t it = 1; it < iters_w; ++it) sw = power_step_on(a.w, m, n, xw);

  const float limit = h.tau * sw, proposed = h.lr * su;
  const float ratio = (sw > 0.f && proposed > limit) ? limit / std::max(proposed, 1.17549435e-38f) : 1.f;
  const float eff_lr = h.lr * ratio;
  const float decay = 1.f - eff_lr * h.weight_decay;

  // pass 3: the update, and b_W = B_W x_W of the new weights for the next step
  Product next_bw;
  next_bw.start(long_is_dot(m, n), xw, m, n);
  for_rows(m, n, [&, decay, eff_lr](int64_t r, int tid, float* wbuf, float*) {
    const int64_t base = r * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) st(w, base + j, ld(w, base + j) * decay - eff_lr * ld(ub, base + j));
    next_bw.row(row_as_float(w, base, n, wbuf), r, tid);
  });
  next_bw.finish();
  bw_t.resize_({len});
  std::copy(next_bw.out.begin(), next_bw.out.end(), bw_t.data_ptr<double>());

  out[0] = ratio;
  out[1] = sw;
  out[2] = su;
}

}  // namespace

// Steps every matrix of the lists (contiguous, of one dtype: fp32 or bf16); `products` holds each
// matrix's kept b_W (fp64; empty when there is none; used only if it is still B_W x_W) and receives the
// next one. Returns a (3, N) fp32
// tensor: lr ratio, σ_W, σ_U per matrix.
at::Tensor weyl_step(std::vector<at::Tensor> params, std::vector<at::Tensor> grads, std::vector<at::Tensor> exp_avgs,
                     std::vector<at::Tensor> exp_avg_sqs, at::Tensor work, std::vector<at::Tensor> weight_vectors,
                     std::vector<at::Tensor> update_vectors, std::vector<at::Tensor> products, std::vector<int64_t> rows,
                     std::vector<double> bias1, std::vector<double> bias2, double lr, double beta1, double beta2,
                     double eps, double weight_decay, double tau, int64_t iters_w, int64_t iters_u) {
  const int64_t count = static_cast<int64_t>(params.size());
  at::Tensor stats = at::zeros({count, 3}, at::kFloat);
  const Hyper h{float(beta1), float(beta2), float(eps), float(lr), float(weight_decay), float(tau)};
  for (int64_t i = 0; i < count; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_contiguous() && grads[i].is_contiguous() && exp_avgs[i].is_contiguous() &&
                    exp_avg_sqs[i].is_contiguous() && work.is_contiguous(),
                "hf_weyl cpu kernel: tensors must be contiguous");
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type() && exp_avgs[i].scalar_type() == p.scalar_type() &&
                    exp_avg_sqs[i].scalar_type() == p.scalar_type() && work.scalar_type() == p.scalar_type(),
                "hf_weyl cpu kernel: one dtype per call");
    TORCH_CHECK(work.numel() >= p.numel(), "hf_weyl cpu kernel: work buffer too small");
    TORCH_CHECK(weight_vectors[i].scalar_type() == at::kFloat && update_vectors[i].scalar_type() == at::kFloat,
                "hf_weyl cpu kernel: power-iteration vectors must be fp32");
    TORCH_CHECK(products[i].scalar_type() == at::kDouble, "hf_weyl cpu kernel: kept products must be fp64");
    float* out = stats.data_ptr<float>() + 3 * i;
    const auto dtype = p.scalar_type();
    if (dtype == at::kFloat) {
      step_matrix<float>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], work, weight_vectors[i], update_vectors[i],
                         products[i], rows[i], bias1[i], bias2[i], h, iters_w, iters_u, out);
    } else if (dtype == at::kBFloat16) {
      step_matrix<at::BFloat16>(p, grads[i], exp_avgs[i], exp_avg_sqs[i], work, weight_vectors[i],
                                update_vectors[i], products[i], rows[i], bias1[i], bias2[i], h, iters_w, iters_u, out);
    } else {
      TORCH_CHECK(false, "hf_weyl cpu kernel: unsupported dtype ", dtype);
    }
  }
  return stats.t().contiguous();
}

// ------------------------------------------------------------------------------------------------------
// Matrices split across ranks (DeepSpeed ZeRO's flat fp32 partitions, e.g. under optimizer offload).
//
// Piece i of a flat partition is flat[offset_i, offset_i + numel_i) = the row-major elements
// [start_i, start_i + numel_i) of an (m_i × n_i) matrix; `gaps` are the partition's other elements (tensors
// AdamW² does not cap, padding). One warm power iteration over W and U of all pieces takes three passes with
// the vector reductions (done by the caller) between them:
//
//   pieces_pass1   over the whole partition: moments and U (stored); for each piece, its partial long products
//                  B_W x_W and B_U x_U (zeros outside its rows/columns), concatenated [W's | U's]
//   (all-reduce; y = b / ‖b‖ scaled by the subnormal guard, by the caller)
//   pieces_pass2   for each piece, its partial short products B_Wᵀ y_W and B_Uᵀ y_U, concatenated [W's | U's]
//   (all-reduce; σ = ‖z‖ / c, the cap, by the caller)
//   pieces_update  A ← A (1 − α' λ) − α' U with α' per piece (the scheduled lr in the gaps)
//
// The arithmetic per element is the whole-matrix kernel's. Each pass is one parallel region over tasks of about
// kTaskElements elements (row ranges of the pieces, or stretches of the gaps), split evenly across the
// threads; column sums are accumulated per thread and added in thread order (deterministic for a given thread
// count). (One region per pass, not per matrix: on a loaded machine every region waits for all its threads.)

namespace {

constexpr int64_t kTaskElements = 32768;

struct PieceRef {
  int64_t offset, start, numel, rows, cols;
  int64_t r_first() const { return start / cols; }
  int64_t r_last() const { return (start + numel - 1) / cols; }
  int64_t c_begin(int64_t r) const { return r == r_first() ? start % cols : 0; }
  int64_t c_end(int64_t r) const { return r == r_last() ? (start + numel - 1) % cols + 1 : cols; }
  int64_t flat(int64_t r, int64_t c) const { return offset + r * cols + c - start; }  // position in the partition
};

std::vector<PieceRef> pieces_of(const std::vector<int64_t>& offsets, const std::vector<int64_t>& starts,
                                const std::vector<int64_t>& numels, const std::vector<int64_t>& rows,
                                const std::vector<int64_t>& cols, int64_t partition) {
  const size_t count = offsets.size();
  TORCH_CHECK(starts.size() == count && numels.size() == count && rows.size() == count && cols.size() == count,
              "hf_weyl cpu kernel: piece lists of different lengths");
  std::vector<PieceRef> out(count);
  for (size_t i = 0; i < count; ++i) {
    out[i] = {offsets[i], starts[i], numels[i], rows[i], cols[i]};
    TORCH_CHECK(rows[i] > 0 && cols[i] > 0 && starts[i] >= 0 && numels[i] >= 0 &&
                    starts[i] + numels[i] <= rows[i] * cols[i] && offsets[i] >= 0 && offsets[i] + numels[i] <= partition,
                "hf_weyl cpu kernel: a piece lies outside its matrix or the partition");
  }
  return out;
}

// Long side (B x) and short side (Bᵀ y) lengths of an (m × n) matrix: B = A if n ≤ m else Aᵀ.
inline int64_t long_len(int64_t m, int64_t n) { return long_is_dot(m, n) ? m : n; }
inline int64_t short_len(int64_t m, int64_t n) { return long_is_dot(m, n) ? n : m; }

struct RowTask {
  int64_t piece, r0, r1;  // rows [r0, r1) of a piece
};

std::vector<RowTask> row_tasks(const std::vector<PieceRef>& pieces) {
  std::vector<RowTask> tasks;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const PieceRef& p = pieces[i];
    if (p.numel == 0) continue;
    const int64_t per = std::max<int64_t>(1, kTaskElements / p.cols);
    for (int64_t r = p.r_first(); r <= p.r_last(); r += per)
      tasks.push_back({int64_t(i), r, std::min(r + per, p.r_last() + 1)});
  }
  return tasks;
}

// Element stretches [offset, offset + numel) cut into tasks of at most kTaskElements, with a value each.
struct SpanTask {
  int64_t offset, numel;
  float value;
};

std::vector<SpanTask> span_tasks(const std::vector<int64_t>& offsets, const std::vector<int64_t>& numels,
                                 const std::vector<double>& values, int64_t partition) {
  TORCH_CHECK(offsets.size() == numels.size() && numels.size() == values.size(), "hf_weyl cpu kernel: segment lists differ");
  std::vector<SpanTask> tasks;
  for (size_t i = 0; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= 0 && numels[i] >= 0 && offsets[i] + numels[i] <= partition,
                "hf_weyl cpu kernel: a segment lies outside the partition");
    for (int64_t b = 0; b < numels[i]; b += kTaskElements)
      tasks.push_back({offsets[i] + b, std::min(kTaskElements, numels[i] - b), float(values[i])});
  }
  return tasks;
}

// The products of the pieces in one pass: "dot" pieces write one output per row, the others accumulate Aᵀ·v
// into per-thread partial sums over their columns (`axpy_at[i]`: piece i's place in a thread's partial buffer).
struct PieceProducts {
  std::vector<char> dot;
  std::vector<int64_t> out_at, vec_at, axpy_at;
  int64_t axpy_total = 0;
  int threads = 1;
  std::vector<float> partial;
  const float* vec = nullptr;
  float* out = nullptr;

  // `is_dot(m, n)`: this product's kind; outputs of length out_len(m, n) and inputs of length vec_len(m, n),
  // both concatenated in piece order.
  template <typename Kind, typename OutLen, typename VecLen>
  void start(const std::vector<PieceRef>& pieces, Kind is_dot, OutLen out_len, VecLen vec_len, const float* v, float* o) {
    vec = v;
    out = o;
    int64_t opos = 0, vpos = 0;
    for (const auto& p : pieces) {
      const bool d = is_dot(p.rows, p.cols);
      dot.push_back(d);
      out_at.push_back(opos);
      vec_at.push_back(vpos);
      axpy_at.push_back(axpy_total);
      if (!d) axpy_total += p.cols;
      opos += out_len(p.rows, p.cols);
      vpos += vec_len(p.rows, p.cols);
    }
    threads = at::get_num_threads();
    partial.assign(static_cast<size_t>(threads) * axpy_total, 0.f);
  }
  inline void segment(int64_t i, const float* vals, int64_t r, int64_t c0, int64_t len, int tid) {
    if (dot[i]) {
      out[out_at[i] + r] = ::dot(vals, vec + vec_at[i] + c0, len);
    } else {
      axpy(partial.data() + static_cast<int64_t>(tid) * axpy_total + axpy_at[i] + c0, vals, vec[vec_at[i] + r], len);
    }
  }
  void finish(const std::vector<PieceRef>& pieces) {
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (dot[i]) continue;
      for (int t = 0; t < threads; ++t)
        axpy(out + out_at[i], partial.data() + static_cast<int64_t>(t) * axpy_total + axpy_at[i], 1.f, pieces[i].cols);
    }
  }
};

// fn(piece index, row, first column, length, position in the partition, thread) for every row segment.
template <typename Fn>
void for_row_segments(const std::vector<PieceRef>& pieces, const std::vector<RowTask>& tasks, Fn fn) {
  at::parallel_for(0, int64_t(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    for (int64_t t = begin; t < end; ++t) {
      const RowTask& task = tasks[t];
      const PieceRef& p = pieces[task.piece];
      for (int64_t r = task.r0; r < task.r1; ++r) {
        const int64_t c0 = p.c_begin(r);
        fn(task.piece, r, c0, p.c_end(r) - c0, p.flat(r, c0), tid);
      }
    }
  });
}

struct Moments {
  float b1, b2, c1, c2, eps, inv_bc1, inv_bc2_sqrt;
  inline void run(const float* g, float* m, float* v, float* u, int64_t base, int64_t len) const {
    const float b1_ = b1, b2_ = b2, c1_ = c1, c2_ = c2, eps_ = eps, i1 = inv_bc1, i2 = inv_bc2_sqrt;
    g += base, m += base, v += base, u += base;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const float gj = g[j];
      const float mj = b1_ * m[j] + c1_ * gj, vj = b2_ * v[j] + c2_ * gj * gj;
      m[j] = mj;
      v[j] = vj;
      u[j] = (mj * i1) / (std::sqrt(vj) * i2 + eps_);
    }
  }
};

void check_flat(const at::Tensor& t, int64_t partition, const char* what) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "hf_weyl cpu kernel: ", what, " must be a contiguous fp32 CPU tensor");
  TORCH_CHECK(t.numel() >= partition, "hf_weyl cpu kernel: ", what, " is shorter than the partition");
}

int64_t total(const std::vector<PieceRef>& pieces, int64_t (*len)(int64_t, int64_t)) {
  int64_t sum = 0;
  for (const auto& p : pieces) sum += len(p.rows, p.cols);
  return sum;
}

}  // namespace

at::Tensor pieces_pass1(at::Tensor flat, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq, at::Tensor work,
                        std::vector<int64_t> offsets, std::vector<int64_t> starts, std::vector<int64_t> numels,
                        std::vector<int64_t> rows, std::vector<int64_t> cols, std::vector<int64_t> gap_offsets,
                        std::vector<int64_t> gap_numels, at::Tensor x_w, at::Tensor x_u, double bc1, double bc2,
                        double beta1, double beta2, double eps) {
  const int64_t partition = flat.numel();
  for (const at::Tensor* t : {&flat, &grad, &exp_avg, &exp_avg_sq, &work}) check_flat(*t, partition, "a partition tensor");
  const auto pieces = pieces_of(offsets, starts, numels, rows, cols, partition);
  const int64_t long_total = total(pieces, long_len), short_total = total(pieces, short_len);
  TORCH_CHECK(x_w.numel() == short_total && x_u.numel() == short_total && x_w.is_contiguous() && x_u.is_contiguous() &&
                  x_w.scalar_type() == at::kFloat && x_u.scalar_type() == at::kFloat,
              "hf_weyl cpu kernel: the vectors do not match the pieces");
  const Moments mo{float(beta1), float(beta2), float(1 - beta1), float(1 - beta2), float(eps), float(1.0 / bc1),
                   float(1.0 / std::sqrt(bc2))};
  float* const w = flat.data_ptr<float>();
  const float* const g = grad.data_ptr<float>();
  float* const m = exp_avg.data_ptr<float>();
  float* const v = exp_avg_sq.data_ptr<float>();
  float* const u = work.data_ptr<float>();
  const auto gaps = span_tasks(gap_offsets, gap_numels, std::vector<double>(gap_offsets.size(), 0.0), partition);
  at::parallel_for(0, int64_t(gaps.size()), 1, [&gaps, mo, g, m, v, u](int64_t b, int64_t e) {  // moments and U only
    for (int64_t t = b; t < e; ++t) mo.run(g, m, v, u, gaps[t].offset, gaps[t].numel);
  });
  at::Tensor out = at::zeros({2 * long_total}, at::kFloat);
  PieceProducts bw, bu;
  bw.start(pieces, long_is_dot, long_len, short_len, x_w.data_ptr<float>(), out.data_ptr<float>());
  bu.start(pieces, long_is_dot, long_len, short_len, x_u.data_ptr<float>(), out.data_ptr<float>() + long_total);
  for_row_segments(pieces, row_tasks(pieces), [&bw, &bu, mo, g, m, v, u, w](int64_t i, int64_t r, int64_t c0,
                                                                           int64_t len, int64_t base, int tid) {
    mo.run(g, m, v, u, base, len);
    bw.segment(i, w + base, r, c0, len, tid);
    bu.segment(i, u + base, r, c0, len, tid);
  });
  bw.finish(pieces);
  bu.finish(pieces);
  return out;
}

at::Tensor pieces_pass2(at::Tensor flat, at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> starts,
                        std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                        at::Tensor y_w, at::Tensor y_u) {
  const int64_t partition = flat.numel();
  for (const at::Tensor* t : {&flat, &work}) check_flat(*t, partition, "a partition tensor");
  const auto pieces = pieces_of(offsets, starts, numels, rows, cols, partition);
  const int64_t long_total = total(pieces, long_len), short_total = total(pieces, short_len);
  TORCH_CHECK(y_w.numel() == long_total && y_u.numel() == long_total && y_w.is_contiguous() && y_u.is_contiguous() &&
                  y_w.scalar_type() == at::kFloat && y_u.scalar_type() == at::kFloat,
              "hf_weyl cpu kernel: the vectors do not match the pieces");
  const float* const w = flat.data_ptr<float>();
  const float* const u = work.data_ptr<float>();
  at::Tensor out = at::zeros({2 * short_total}, at::kFloat);
  PieceProducts zw, zu;
  zw.start(pieces, short_is_dot, short_len, long_len, y_w.data_ptr<float>(), out.data_ptr<float>());
  zu.start(pieces, short_is_dot, short_len, long_len, y_u.data_ptr<float>(), out.data_ptr<float>() + short_total);
  for_row_segments(pieces, row_tasks(pieces), [&zw, &zu, w, u](int64_t i, int64_t r, int64_t c0, int64_t len,
                                                               int64_t base, int tid) {
    zw.segment(i, w + base, r, c0, len, tid);
    zu.segment(i, u + base, r, c0, len, tid);
  });
  zw.finish(pieces);
  zu.finish(pieces);
  return out;
}

void pieces_update(at::Tensor flat, at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> numels,
                   std::vector<double> lrs, double weight_decay) {
  const int64_t partition = flat.numel();
  for (const at::Tensor* t : {&flat, &work}) check_flat(*t, partition, "a partition tensor");
  const auto tasks = span_tasks(offsets, numels, lrs, partition);
  float* const w = flat.data_ptr<float>();
  const float* const u = work.data_ptr<float>();
  const float wd = float(weight_decay);
  at::parallel_for(0, int64_t(tasks.size()), 1, [&tasks, w, u, wd](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* const wt = w + tasks[t].offset;
      const float* const ut = u + tasks[t].offset;
      const float eff_lr = tasks[t].value, decay = 1.f - eff_lr * wd;
      const int64_t len = tasks[t].numel;
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) wt[j] = wt[j] * decay - eff_lr * ut[j];
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("weyl_step", &weyl_step, "AdamW² step for a list of CPU matrices in three fused passes");
  module.def("pieces_pass1", &pieces_pass1, "moments, U and the partial long products of matrix pieces (fp32)");
  module.def("pieces_pass2", &pieces_pass2, "the partial short products of matrix pieces (fp32)");
  module.def("pieces_update", &pieces_update, "the capped update of a flat partition, lr per segment (fp32)");
}
