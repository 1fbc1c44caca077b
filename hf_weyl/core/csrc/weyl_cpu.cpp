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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// 32 lanes: two independent vector accumulators (AVX-512; four with AVX2), so a dot product is not bound by
// the latency of one chain of dependent FMAs.
constexpr int kLanes = 32;

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
float unit_(float* v, int64_t n) {
  float scale = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    finite = finite && std::isfinite(v[i]);
    scale = std::max(scale, std::fabs(v[i]));
  }
  if (!finite) return NAN;
  if (!(scale > 0.f)) return 0.f;
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = v[i] / scale;
    sum += double(v[i]) * double(v[i]);
  }
  const float norm = float(std::sqrt(sum));
  const float div = std::max(norm, 1.f);
  for (int64_t i = 0; i < n; ++i) v[i] = v[i] / div;
  return norm * scale;
}
float unit_(std::vector<float>& v) { return unit_(v.data(), int64_t(v.size())); }

float subnormal_guard(float s) {
  if (s > 0.f && s < std::ldexp(1.f, -60)) {
    const int e = int(std::floor(std::log2(s)));
    return std::ldexp(1.f, std::min(-e, 126));
  }
  return 1.f;
}

// a · b + c rounded once where the CPU has a fused multiply-add (one instruction), else rounded twice: the same in
// every pass either way, which is what the row products below need (std::fma without the instruction is a slow
// library call).
inline float fmadd(float a, float b, float c) {
#if defined(__FMA__) || defined(__aarch64__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The end of a row's dot product over kLanes lanes: their pairwise sum, then the elements [j, n) by FMAs.
inline float finish_lanes(float* acc, const float* a, const float* x, int64_t j, int64_t n) {
  for (int width = kLanes / 2; width > 0; width /= 2) {
#pragma omp simd
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  float sum = acc[0];
  for (; j < n; ++j) sum = fmadd(a[j], x[j], sum);
  return sum;
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {  // pairwise: log2(32) dependent adds, not 32
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

// R consecutive rows (stride n) at once: out[r] = dot(a + r n, x, n) and out += Σ_r s[r] · a[r n ..]. Every product
// of row pieces but pass 1's of U goes through these two (or pair_rows, the same on two arrays): per row kLanes lanes,
// lane l summing the elements j ≡ l (mod kLanes) of the whole kLanes-blocks by FMAs in order, then the pairwise sum
// and the tail by FMAs; per column FMAs in row order. A result therefore never depends on how rows were grouped or
// which pass computed it: the update's B_W x_W, pass 2's check of it and pass 1's (no kept product) agree bit for bit.
// Grouping shares the loads of x and of `out` between rows and runs R independent chains.
template <int R>
void dot_rows(const float* a, int64_t n, const float* x, float* out) {
  float acc[R][kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int r = 0; r < R; ++r) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[r][l] = fmadd(a[r * n + j + l], x[j + l], acc[r][l]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = finish_lanes(acc[r], a + r * n, x, j, n);
}

template <int R>
void axpy_rows(float* out, const float* a, int64_t n, const float* s) {
  float sc[R];
  for (int r = 0; r < R; ++r) sc[r] = s[r];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float acc = out[j];
    for (int r = 0; r < R; ++r) acc = fmadd(a[r * n + j], sc[r], acc);
    out[j] = acc;
  }
}

// Pass 2's products on R rows of a (W) and b (U) in one loop, of one kind: `Dot`: oa[r] = a_r · va and
// ob[r] = b_r · vb; else oa += Σ_r va[r] a_r and ob += Σ_r vb[r] b_r. Each result is dot_rows' or axpy_rows' bit for
// bit (the same lanes, the same order per lane and per column); reading both arrays in one loop keeps two streams
// from memory in flight, where one array at a time leaves a core waiting on one (measured: pass 2 15.5 → 13.9 ms
// on GPT-2 small's partition, benchmarks/kernel_ab.py).
template <int R, bool Dot>
void pair_rows(const float* a, const float* b, int64_t n, const float* va, const float* vb, float* oa, float* ob) {
  if constexpr (Dot) {
    float acc_a[R][kLanes] = {}, acc_b[R][kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int r = 0; r < R; ++r) {
#pragma omp simd
        for (int l = 0; l < kLanes; ++l) {
          acc_a[r][l] = fmadd(a[r * n + j + l], va[j + l], acc_a[r][l]);
          acc_b[r][l] = fmadd(b[r * n + j + l], vb[j + l], acc_b[r][l]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      oa[r] = finish_lanes(acc_a[r], a + r * n, va, j, n);
      ob[r] = finish_lanes(acc_b[r], b + r * n, vb, j, n);
    }
  } else {
    float sa[R], sb[R];
    for (int r = 0; r < R; ++r) sa[r] = va[r], sb[r] = vb[r];
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float ca = oa[j], cb = ob[j];
      for (int r = 0; r < R; ++r) {
        ca = fmadd(a[r * n + j], sa[r], ca);
        cb = fmadd(b[r * n + j], sb[r], cb);
      }
      oa[j] = ca;
      ob[j] = cb;
    }
  }
}

constexpr int kRowBlock = 4;

template <typename Fn>
inline void by_rows(int rows, Fn fn) {  // fn(std::integral_constant<int, R>) for R = rows in 1..kRowBlock
  switch (rows) {
    case 4: fn(std::integral_constant<int, 4>()); break;
    case 3: fn(std::integral_constant<int, 3>()); break;
    case 2: fn(std::integral_constant<int, 2>()); break;
    default: fn(std::integral_constant<int, 1>()); break;
  }
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
float to_unit_scaled(float* b, int64_t n) {
  const float c = subnormal_guard(unit_(b, n));
  for (int64_t i = 0; i < n; ++i) b[i] *= c;
  return c;
}
float to_unit_scaled(std::vector<float>& b) { return to_unit_scaled(b.data(), int64_t(b.size())); }

// x ← z / ‖z‖ where σ = ‖z‖ / c is finite and positive; returns σ (0 where it is not).
float finish_sigma(float* z, int64_t n, float c, float* x) {
  const float sigma = unit_(z, n) / c;
  if (sigma > 0.f && std::isfinite(sigma)) {
    std::copy(z, z + n, x);
    return sigma;
  }
  return 0.f;
}
float finish_sigma(std::vector<float>& z, float c, float* x) { return finish_sigma(z.data(), int64_t(z.size()), c, x); }

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
// AdamW² does not cap, padding). A piece is whole when it holds all of its matrix. One warm power iteration over W
// and U of all pieces takes three passes with the vector reductions (done by the caller) between them:
//
//   pieces_pass1   over the whole partition: moments and U (stored); for each piece, its partial long products
//                  B_W x_W and B_U x_U (zeros outside its rows/columns), concatenated [W's | U's] (b). Given
//                  `kept_bw`, the partial B_W x_W the previous update computed of the weights it wrote, W is not
//                  read: the kept product stands in for B_W x_W, and pass 2 checks it. On tall pieces of whole rows
//                  (whole matrices; FSDP2's dim-0 shards) it also takes U's second half-step, z_U = B_Uᵀ b_U =
//                  Σ_i b_i U_i: b_i is row i's own product, complete on this rank, so each row is added while it is
//                  in the cache, and pass 2 need not read U there. (z: the short products, [W's | U's], and a flag.)
//   (all-reduce of b; y_W = c b_W / ‖b_W‖ scaled by the subnormal guard, and ‖b_U‖, by the caller)
//   pieces_pass2   into z: for each piece, its partial B_Wᵀ y_W, and B_Uᵀ b_U where pass 1 did not take it; then the
//                  flag: 1 where a kept product was used and is not this pass's B_W x_W of the weights and x_W as
//                  they are now, bit for bit (the same products in the same order give the same bits; any change
//                  of the weights, of x_W or of the thread count gives other bits). Its B_W x_W is returned: where
//                  some rank's flag is set, the caller repeats the W half with it. (`full`: every piece's B_Uᵀ y_U,
//                  for that repeat, or where B_Uᵀ b_U unnormalised is unsafe.)
//   (all-reduce of z; σ_W = ‖z_W‖ / c, σ_U = ‖z_U‖ / ‖b_U‖, the cap, by the caller)
//   pieces_update  A ← A (1 − α' λ) − α' U with α' per piece (the scheduled lr in the gaps), and each piece's
//                  partial B_W x_W of the new weights and the new x_W: the next step's kept product, computed
//                  while the rows are in cache, so that W is read twice per step, not three times.
//
// shards_pass1, shards_pass2, shards_update: the same passes on pieces that are tensors of their own (FSDP2's dim-0
// shards: piece i is params[i], with its gradient and moments, offset 0), U of the pieces one after the other in the
// work buffer, and no gaps (the caller steps the tensors it does not cap).
//
// The arithmetic per element is the whole-matrix kernel's. Each pass is one parallel region over tasks of about
// kTaskElements elements (row ranges of the pieces, or stretches of the gaps), dealt to the threads in runs of
// kDealTasks (row_tasks) and run in slots (for_task_slots); column sums are accumulated per slot and added in slot
// order (deterministic for a given thread count). (One region per pass, not per matrix: on a loaded machine every
// region waits for all its threads.) pieces_pass2_of and pieces_update_of take a 0/1 mask of the pieces to run (a
// step on more than one rank runs the pieces it holds whole while an all-reduce is in flight, the others after it):
// every task keeps its slot, so their results are those of the unmasked passes, bit for bit. all_finite reads a
// tensor once at memory speed: the non-finite check before a step.

namespace {

constexpr int64_t kTaskElements = 32768;
constexpr size_t kDealTasks = 32;  // consecutive tasks dealt to a thread at a time: 4 MB of fp32 rows, streamed

struct PieceRef {
  int64_t offset, start, numel, rows, cols;
  int64_t r_first() const { return start / cols; }
  int64_t r_last() const { return (start + numel - 1) / cols; }
  int64_t c_begin(int64_t r) const { return r == r_first() ? start % cols : 0; }
  int64_t c_end(int64_t r) const { return r == r_last() ? (start + numel - 1) % cols + 1 : cols; }
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

// Pieces a pass runs on: all (empty), else those with mask[i] != 0.
using PieceMask = std::vector<int64_t>;
inline bool in_mask(const PieceMask& mask, int64_t piece) { return mask.empty() || mask[size_t(piece)] != 0; }

// A piece of whole rows (its matrix whole, or a run of its rows: FSDP2's dim-0 shards): each row's long product of a
// tall matrix is complete on this rank.
inline bool whole_rows(const PieceRef& p) { return p.numel > 0 && p.start % p.cols == 0 && p.numel % p.cols == 0; }
// Pass 1 takes U's half-steps on a tall piece of whole rows: b_i = U_i · x_U per row, then z_U += b_i U_i with the row
// still in the cache (the short product of a tall matrix needs only its own row's b_i: on a piece of some of the rows,
// the partial z_U is what pass 2 would compute with the reduced b_U, where the other ranks add zeros to b_i).
inline bool u_in_pass1(const PieceRef& p) { return whole_rows(p) && long_is_dot(p.rows, p.cols); }

// The row tasks of the pieces, dealt out: with T threads, run k of kDealTasks consecutive tasks of the natural order
// (piece by piece, rows in order) goes to the part of the list numbered k mod T, so that at::parallel_for's split by
// count gives each thread every T-th run. A thread then gets as much of every kind of piece as the others (W alone
// or with U in pass 2, tall pieces of whole rows in pass 1), whatever the layout, where halves of the natural order can cost
// 20 % apart; runs of 4 MB keep each thread streaming (single tasks dealt out cost the update 37 %). Every pass uses
// this one list, so the column sums of a product come out the same in each (the update's B_W x_W and pass 2's
// check of it, bit for bit).
std::vector<RowTask> row_tasks(const std::vector<PieceRef>& pieces) {
  std::vector<RowTask> tasks;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const PieceRef& p = pieces[i];
    if (p.numel == 0) continue;
    const int64_t per = std::max<int64_t>(1, kTaskElements / p.cols);
    for (int64_t r = p.r_first(); r <= p.r_last(); r += per)
      tasks.push_back({int64_t(i), r, std::min(r + per, p.r_last() + 1)});
  }
  const size_t threads = size_t(std::max(1, at::get_num_threads())), deal = kDealTasks;
  std::vector<RowTask> dealt;
  dealt.reserve(tasks.size());
  for (size_t k = 0; k < threads; ++k)
    for (size_t t = k * deal; t < tasks.size(); t += threads * deal)
      dealt.insert(dealt.end(), tasks.begin() + t, tasks.begin() + std::min(tasks.size(), t + deal));
  return dealt;
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
  std::vector<float> partial, second;
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
  // `rows` consecutive rows r.. of piece i, columns [c0, c0 + len) (rows > 1: whole rows, stride len)
  inline void segment(int64_t i, const float* vals, int64_t r, int rows, int64_t c0, int64_t len, int tid) {
    if (dot[i]) {
      const float* x = vec + vec_at[i] + c0;
      float* o = out + out_at[i] + r;
      by_rows(rows, [&](auto k) { dot_rows<decltype(k)::value>(vals, len, x, o); });
    } else {
      const float* sv = vec + vec_at[i] + r;
      by_rows(rows, [&](auto k) { axpy_rows<decltype(k)::value>(partial_at(i, c0, tid), vals, len, sv); });
    }
  }
  // segment() of this product on rows of W (`vals`) and of `zu` (started on the same pieces: the same kind) on the same
  // rows of U (`u_vals`), in one loop (pair_rows).
  inline void segment_pass2(PieceProducts& zu, int64_t i, const float* vals, const float* u_vals, int64_t r, int rows,
                            int64_t c0, int64_t len, int tid) {
    if (dot[i]) {
      by_rows(rows, [&](auto k) {
        pair_rows<decltype(k)::value, true>(vals, u_vals, len, vec + vec_at[i] + c0, zu.vec + zu.vec_at[i] + c0,
                                            out + out_at[i] + r, zu.out + zu.out_at[i] + r);
      });
    } else {
      by_rows(rows, [&](auto k) {
        pair_rows<decltype(k)::value, false>(vals, u_vals, len, vec + vec_at[i] + r, zu.vec + zu.vec_at[i] + r,
                                             partial_at(i, c0, tid), zu.partial_at(i, c0, tid));
      });
    }
  }
  inline float* partial_at(int64_t i, int64_t c0, int tid) {
    return partial.data() + static_cast<int64_t>(tid) * axpy_total + axpy_at[i] + c0;
  }
  // A second set of per-thread partial sums (for rows read in lockstep with others of the same piece), added after
  // the first in finish().
  void with_second_half() { second.assign(partial.size(), 0.f); }
  inline float* second_at(int64_t i, int tid) {
    return second.data() + static_cast<int64_t>(tid) * axpy_total + axpy_at[i];
  }
  void finish(const std::vector<PieceRef>& pieces, const PieceMask& mask = {}) {
    for (size_t i = 0; i < pieces.size(); ++i) {
      if (dot[i] || !in_mask(mask, int64_t(i))) continue;
      for (int t = 0; t < threads; ++t) axpy(out + out_at[i], partial_at(int64_t(i), 0, t), 1.f, pieces[i].cols);
      if (second.empty()) continue;
      for (int t = 0; t < threads; ++t) axpy(out + out_at[i], second_at(int64_t(i), t), 1.f, pieces[i].cols);
    }
  }
};

// fn(piece index, first row, rows, first column, length, position in the partition, thread) for every row segment:
// a row cut by the piece's start or end alone, whole rows in groups of up to kRowBlock (then length = columns, and
// the group's elements are contiguous); then done() on each thread that ran some (e.g. a store fence).
struct NoEpilogue {
  void operator()() const {}
};

template <typename Fn>
inline void task_segments(const std::vector<PieceRef>& pieces, const RowTask& task, int tid, Fn& fn) {
  const PieceRef& p = pieces[task.piece];
  // (the piece's first and last rows and columns once per task: no division per row)
  const int64_t first = p.r_first(), last = p.r_last(), c_first = p.c_begin(first), c_last = p.c_end(last);
  const int64_t n = p.cols, base0 = p.offset - p.start;  // element (r, c) is at base0 + r n + c
  int64_t r = task.r0;
  if (r == first && (c_first > 0 || (r == last && c_last < n))) {  // a row cut by the piece's start
    const int64_t c1 = r == last ? c_last : n;
    fn(task.piece, r, 1, c_first, c1 - c_first, base0 + r * n + c_first, tid);
    ++r;
  }
  const int64_t whole_end = (task.r1 - 1 == last && c_last < n) ? task.r1 - 1 : task.r1;  // rows ending at n
  while (r < whole_end) {
    const int rows = int(std::min<int64_t>(kRowBlock, whole_end - r));
    fn(task.piece, r, rows, int64_t(0), n, base0 + r * n, tid);
    r += rows;
  }
  if (r < task.r1) fn(task.piece, r, 1, int64_t(0), c_last, base0 + r * n, tid);  // a row cut by the piece's end
}

// run(task, slot) for the tasks of the pieces in `mask`, in slots: the list split as at::parallel_for splits [0, N)
// among T threads (T = min(threads, N), consecutive chunks of ⌈N / T⌉), slot s running chunk s in order with the
// partial sums numbered s, whichever thread runs it. A task therefore adds into the same partial sums in every pass,
// over all pieces or some (masks split one power step's passes between pieces this rank holds whole and the others):
// the update's kept B_W x_W, pass 2's check of it and pass 1's own agree bit for bit in any split. done(): after
// each slot (e.g. a store fence).
template <typename Run, typename Done = NoEpilogue>
void for_task_slots(const std::vector<RowTask>& tasks, const PieceMask& mask, Run run, Done done = {}) {
  const int64_t count = int64_t(tasks.size());
  if (count == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t slots = (count > 1 && threads > 1 && !at::in_parallel_region()) ? std::min(threads, count) : 1;
  const int64_t chunk = (count + slots - 1) / slots;
  at::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t t = s * chunk; t < std::min(count, (s + 1) * chunk); ++t)
        if (in_mask(mask, tasks[t].piece)) run(tasks[t], int(s));
      done();
    }
  });
}

template <typename Fn, typename Done = NoEpilogue>
void for_row_segments(const std::vector<PieceRef>& pieces, const std::vector<RowTask>& tasks, Fn fn, Done done = {},
                      const PieceMask& mask = {}) {
  for_task_slots(tasks, mask, [&](const RowTask& task, int slot) { task_segments(pieces, task, slot, fn); }, done);
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

#if defined(__AVX512F__)
// Moments and U of one row stretch [base, base + len) with U written by streaming stores (U is read back by the next
// passes only, after the whole partition: bringing its old bytes into the cache first would be one more read of it),
// and U's product with the row taken on the way, while the row is in registers: `dot` (B x, B = A: a row's
// output), else `axpy` (B x, B = Aᵀ: p[j] += U[j] s over the row's columns; p: this thread's partial sums). The
// arithmetic per element is Moments::run's; the lanes of the dot differ from ::dot (this product is pass 1's alone).
struct StreamMoments {
  __m512 b1, b2, c1, c2, eps, i1, i2;
  explicit StreamMoments(const Moments& mo)
      : b1(_mm512_set1_ps(mo.b1)), b2(_mm512_set1_ps(mo.b2)), c1(_mm512_set1_ps(mo.c1)), c2(_mm512_set1_ps(mo.c2)),
        eps(_mm512_set1_ps(mo.eps)), i1(_mm512_set1_ps(mo.inv_bc1)), i2(_mm512_set1_ps(mo.inv_bc2_sqrt)) {}

  // U of the lanes in `mask` of g, m, v at j (m and v updated there).
  inline __m512 step(const float* g, float* m, float* v, int64_t j, __mmask16 mask) const {
    const __m512 gj = _mm512_maskz_loadu_ps(mask, g + j);
    const __m512 mj = _mm512_fmadd_ps(b1, _mm512_maskz_loadu_ps(mask, m + j), _mm512_mul_ps(c1, gj));
    const __m512 vj = _mm512_fmadd_ps(b2, _mm512_maskz_loadu_ps(mask, v + j), _mm512_mul_ps(_mm512_mul_ps(c2, gj), gj));
    _mm512_mask_storeu_ps(m + j, mask, mj);
    _mm512_mask_storeu_ps(v + j, mask, vj);
    return _mm512_div_ps(_mm512_mul_ps(mj, i1), _mm512_fmadd_ps(_mm512_sqrt_ps(vj), i2, eps));
  }

  // kind: 0 no product, 1 dot with x (returned), 2 axpy into p with scale s, 3 the dot of 1 with the row's U also
  // stored in p (a buffer the cache keeps, for the axpy that needs the dot first). x and p are indexed like the row.
  template <int kind>
  inline float row(const float* g, float* m, float* v, float* u, int64_t base, int64_t len, const float* x, float* p,
                   float s) const {
    g += base, m += base, v += base, u += base;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512 sv = _mm512_set1_ps(s);
    auto product = [&](__m512 q, int64_t j, __mmask16 mask, bool odd) {
      if constexpr (kind == 1 || kind == 3) {
        const __m512 t = _mm512_maskz_mul_ps(mask, q, _mm512_maskz_loadu_ps(mask, x + j));
        if (odd) acc1 = _mm512_add_ps(acc1, t); else acc0 = _mm512_add_ps(acc0, t);
        if constexpr (kind == 3) _mm512_mask_storeu_ps(p + j, mask, q);
      } else if constexpr (kind == 2) {
        _mm512_mask_storeu_ps(p + j, mask, _mm512_fmadd_ps(q, sv, _mm512_maskz_loadu_ps(mask, p + j)));
      }
    };
    const int64_t head = std::min<int64_t>(len, (16 - int64_t((reinterpret_cast<uintptr_t>(u) / 4) % 16)) % 16);
    int64_t j = 0;
    if (head > 0) {  // up to the first 64-byte boundary of U
      const __mmask16 mask = __mmask16((1u << head) - 1u);
      const __m512 q = step(g, m, v, 0, mask);
      _mm512_mask_storeu_ps(u, mask, q);
      product(q, 0, mask, false);
      j = head;
    }
    bool odd = true;
    for (; j + 16 <= len; j += 16, odd = !odd) {
      const __m512 q = step(g, m, v, j, __mmask16(0xFFFF));
      _mm512_stream_ps(u + j, q);
      product(q, j, __mmask16(0xFFFF), odd);
    }
    if (j < len) {
      const __mmask16 mask = __mmask16((1u << (len - j)) - 1u);
      const __m512 q = step(g, m, v, j, mask);
      _mm512_mask_storeu_ps(u + j, mask, q);
      product(q, j, mask, odd);
    }
    return (kind == 1 || kind == 3) ? _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) : 0.f;
  }
};

#endif

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

// The kept product of the pieces if it has their length (else none).
const float* kept_of(const at::Tensor& kept, int64_t long_total) {
  if (kept.numel() != long_total || long_total == 0) return nullptr;
  TORCH_CHECK(kept.is_contiguous() && kept.scalar_type() == at::kFloat, "hf_weyl cpu kernel: a kept product must be fp32");
  return kept.data_ptr<float>();
}

// Where the passes find the pieces' elements: element (r, c) of piece i is at X + offset_i − start_i + r n + c for X
// each of `of[i]`'s arrays — one flat partition: the partition's arrays for every piece; shards (one tensor per piece):
// each piece its own, offset 0, and its U in the work buffer at its place. `gaps` (flat partitions only): stretches
// of `flat`'s arrays stepped without a product.
struct Arrays {
  float* w = nullptr;
  const float* g = nullptr;
  float* m = nullptr;
  float* v = nullptr;
  float* u = nullptr;
};

struct PieceLayout {
  std::vector<PieceRef> pieces;
  std::vector<Arrays> of;
  Arrays flat;
  std::vector<SpanTask> gaps;
  int64_t long_total = 0, short_total = 0;
};

PieceLayout flat_layout(const at::Tensor& flat, const at::Tensor* grad, const at::Tensor* exp_avg,
                        const at::Tensor* exp_avg_sq, const at::Tensor& work, const std::vector<int64_t>& offsets,
                        const std::vector<int64_t>& starts, const std::vector<int64_t>& numels,
                        const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                        const std::vector<int64_t>& gap_offsets, const std::vector<int64_t>& gap_numels,
                        double gap_value) {
  const int64_t partition = flat.numel();
  for (const at::Tensor* t : {&flat, grad, exp_avg, exp_avg_sq, &work})
    if (t != nullptr) check_flat(*t, partition, "a partition tensor");
  PieceLayout out;
  out.pieces = pieces_of(offsets, starts, numels, rows, cols, partition);
  out.flat = {flat.data_ptr<float>(), grad ? grad->data_ptr<float>() : nullptr,
              exp_avg ? exp_avg->data_ptr<float>() : nullptr, exp_avg_sq ? exp_avg_sq->data_ptr<float>() : nullptr,
              work.data_ptr<float>()};
  out.of.assign(out.pieces.size(), out.flat);
  out.gaps = span_tasks(gap_offsets, gap_numels, std::vector<double>(gap_offsets.size(), gap_value), partition);
  out.long_total = total(out.pieces, long_len);
  out.short_total = total(out.pieces, short_len);
  return out;
}

// Shards: piece i is the whole tensor ws[i] (and gs[i], ms[i], vs[i] where given), elements [starts[i], starts[i] +
// numels[i]) of its (rows[i] × cols[i]) matrix; U of the pieces lies in `work`, one after the other.
PieceLayout shard_layout(const std::vector<at::Tensor>& ws, const std::vector<at::Tensor>& gs,
                         const std::vector<at::Tensor>& ms, const std::vector<at::Tensor>& vs, const at::Tensor& work,
                         const std::vector<int64_t>& starts, const std::vector<int64_t>& numels,
                         const std::vector<int64_t>& rows, const std::vector<int64_t>& cols) {
  const size_t count = ws.size();
  TORCH_CHECK((gs.empty() || gs.size() == count) && ms.size() == gs.size() && vs.size() == gs.size(),
              "hf_weyl cpu kernel: shard lists of different lengths");
  int64_t used = 0;
  for (int64_t n : numels) used += n;
  check_flat(work, used, "the work buffer");
  PieceLayout out;
  out.pieces = pieces_of(std::vector<int64_t>(count, 0), starts, numels, rows, cols, INT64_MAX);
  out.of.resize(count);
  float* u = work.data_ptr<float>();
  for (size_t i = 0; i < count; ++i) {
    for (const auto* list : {&ws, &gs, &ms, &vs}) {
      if (list->empty()) continue;
      const at::Tensor& t = (*list)[i];
      TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.numel() == numels[i],
                  "hf_weyl cpu kernel: a shard must be a contiguous fp32 CPU tensor of its piece's size");
    }
    out.of[i] = {ws[i].data_ptr<float>(), gs.empty() ? nullptr : gs[i].data_ptr<float>(),
                 ms.empty() ? nullptr : ms[i].data_ptr<float>(), vs.empty() ? nullptr : vs[i].data_ptr<float>(), u};
    u += numels[i];
  }
  out.long_total = total(out.pieces, long_len);
  out.short_total = total(out.pieces, short_len);
  return out;
}

Moments moments_of(double bc1, double bc2, double beta1, double beta2, double eps) {
  return {float(beta1), float(beta2), float(1 - beta1), float(1 - beta2), float(eps), float(1.0 / bc1),
          float(1.0 / std::sqrt(bc2))};
}

void check_vectors(const PieceLayout& l, std::initializer_list<const at::Tensor*> shorts,
                   std::initializer_list<const at::Tensor*> longs) {
  for (const at::Tensor* t : shorts)
    TORCH_CHECK(t->numel() == l.short_total && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "hf_weyl cpu kernel: the vectors do not match the pieces");
  for (const at::Tensor* t : longs)
    TORCH_CHECK(t->numel() == l.long_total && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "hf_weyl cpu kernel: the vectors do not match the pieces");
}

std::vector<at::Tensor> pass1(const PieceLayout& l, const at::Tensor& x_w, const at::Tensor& x_u, const Moments& mo,
                              const at::Tensor& kept_bw) {
  check_vectors(l, {&x_w, &x_u}, {});
  const auto& pieces = l.pieces;
  const auto& of = l.of;
  const auto& gaps = l.gaps;
  const int64_t long_total = l.long_total, short_total = l.short_total;
  const Arrays fl = l.flat;
  at::Tensor b = at::zeros({2 * long_total}, at::kFloat), z = at::zeros({2 * short_total + 1}, at::kFloat);
  const float* const kept = kept_of(kept_bw, long_total);
  const bool read_w = kept == nullptr;
  std::vector<char> fast_u(pieces.size());
  int64_t widest = 1;
  for (size_t i = 0; i < pieces.size(); ++i) {
    fast_u[i] = u_in_pass1(pieces[i]);
    widest = std::max(widest, pieces[i].cols);
  }
  PieceProducts bw, bu, zu;
  if (read_w) {
    bw.start(pieces, long_is_dot, long_len, short_len, x_w.data_ptr<float>(), b.data_ptr<float>());
  } else {
    std::copy(kept, kept + long_total, b.data_ptr<float>());
  }
  float* const b_u = b.data_ptr<float>() + long_total;
  bu.start(pieces, long_is_dot, long_len, short_len, x_u.data_ptr<float>(), b_u);
  zu.start(pieces, short_is_dot, short_len, long_len, b_u, z.data_ptr<float>() + short_total);  // z_U = B_Uᵀ b_U
#if defined(__AVX512F__)
  // U streamed out, its product taken in registers (StreamMoments); on tall pieces of whole rows the row also goes to a buffer
  // the cache keeps, for z_U. (Every AVX-512 pass 1 takes this path, with or without a kept product, so that a resumed
  // run, which has none at first, computes what the uninterrupted one does.)
  const StreamMoments sm(mo);
  at::parallel_for(0, int64_t(gaps.size()), 1, [&gaps, &sm, fl](int64_t bg, int64_t e) {
    for (int64_t t = bg; t < e; ++t)
      sm.row<0>(fl.g, fl.m, fl.v, fl.u, gaps[t].offset, gaps[t].numel, nullptr, nullptr, 0.f);
    _mm_sfence();
  });
  std::vector<float> rows_kept(static_cast<size_t>(at::get_num_threads()) * widest);
  for_row_segments(
      pieces, row_tasks(pieces),
      [&bw, &bu, &zu, &fast_u, &rows_kept, &of, widest, sm, read_w](int64_t i, int64_t r, int rows, int64_t c0,
                                                                      int64_t len, int64_t base, int tid) {
        const float* const g = of[i].g;
        float* const m = of[i].m;
        float* const v = of[i].v;
        float* const u = of[i].u;
        const float* const xv = bu.vec + bu.vec_at[i];
        if (fast_u[i]) {  // whole rows: b_i, then z_U += b_i U_i from the kept row
          float* const o = bu.out + bu.out_at[i] + r;
          float* const row = rows_kept.data() + static_cast<int64_t>(tid) * widest;
          for (int k = 0; k < rows; ++k) {
            o[k] = sm.row<3>(g, m, v, u, base + k * len, len, xv, row, 0.f);
            zu.segment(i, row, r + k, 1, 0, len, tid);
          }
        } else if (bu.dot[i]) {  // (rows > 1: whole rows, len apart)
          float* const o = bu.out + bu.out_at[i] + r;
          for (int k = 0; k < rows; ++k) o[k] = sm.row<1>(g, m, v, u, base + k * len, len, xv + c0, nullptr, 0.f);
        } else {
          float* const part = bu.partial_at(i, c0, tid);
          for (int k = 0; k < rows; ++k) sm.row<2>(g, m, v, u, base + k * len, len, nullptr, part, xv[r + k]);
        }
        if (read_w) bw.segment(i, of[i].w + base, r, rows, c0, len, tid);
      },
      [] { _mm_sfence(); });
#else
  at::parallel_for(0, int64_t(gaps.size()), 1, [&gaps, mo, fl](int64_t bg, int64_t e) {  // moments and U only
    for (int64_t t = bg; t < e; ++t) mo.run(fl.g, fl.m, fl.v, fl.u, gaps[t].offset, gaps[t].numel);
  });
  for_row_segments(pieces, row_tasks(pieces), [&bw, &bu, &zu, &fast_u, &of, mo, read_w](
                                                  int64_t i, int64_t r, int rows, int64_t c0, int64_t len, int64_t base, int tid) {
    const Arrays& a = of[i];
    mo.run(a.g, a.m, a.v, a.u, base, rows * len);
    if (read_w) bw.segment(i, a.w + base, r, rows, c0, len, tid);
    bu.segment(i, a.u + base, r, rows, c0, len, tid);
    if (fast_u[i]) zu.segment(i, a.u + base, r, rows, c0, len, tid);
  });
#endif
  if (read_w) bw.finish(pieces);
  bu.finish(pieces);
  zu.finish(pieces);
  return {b, z};
}

std::vector<at::Tensor> pieces_pass1(at::Tensor flat, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                                     at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> starts,
                                     std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                                     std::vector<int64_t> gap_offsets, std::vector<int64_t> gap_numels, at::Tensor x_w,
                                     at::Tensor x_u, double bc1, double bc2, double beta1, double beta2, double eps,
                                     at::Tensor kept_bw) {
  const PieceLayout l = flat_layout(flat, &grad, &exp_avg, &exp_avg_sq, work, offsets, starts, numels, rows, cols,
                                    gap_offsets, gap_numels, 0.0);
  return pass1(l, x_w, x_u, moments_of(bc1, bc2, beta1, beta2, eps), kept_bw);
}

std::vector<at::Tensor> shards_pass1(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                                     std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                                     at::Tensor work, std::vector<int64_t> starts, std::vector<int64_t> numels,
                                     std::vector<int64_t> rows, std::vector<int64_t> cols, at::Tensor x_w,
                                     at::Tensor x_u, double bc1, double bc2, double beta1, double beta2, double eps,
                                     at::Tensor kept_bw) {
  TORCH_CHECK(grads.size() == params.size(), "hf_weyl cpu kernel: shard lists of different lengths");
  const PieceLayout l = shard_layout(params, grads, exp_avgs, exp_avg_sqs, work, starts, numels, rows, cols);
  return pass1(l, x_w, x_u, moments_of(bc1, bc2, beta1, beta2, eps), kept_bw);
}

// Pass 2 on the rows [r0, r1) of a tall piece of whole rows whose U pass 1 has done: only W is read (B_Wᵀ y_W, and B_W x_W to
// check the kept one). The two halves of the rows are read in lockstep, blocks of up to kRowBlock rows from each, so
// that a core has two streams from memory in flight (as pair_rows gives the pieces whose W and U are both read);
// the second half's column sums go to zw's second partial sums.
void w_alone(PieceProducts& zw, PieceProducts& bw, const PieceRef& p, const RowTask& task, const float* w, bool check,
             int tid) {
  const int64_t n = p.cols, i = task.piece, mid = task.r0 + (task.r1 - task.r0 + 1) / 2;
  const float* const y = zw.vec + zw.vec_at[i];
  float* const za = zw.partial_at(i, 0, tid);
  float* const zb = zw.second_at(i, tid);
  const int64_t first = p.r_first();
  auto row = [w, &p, first, n](int64_t r) { return w + p.offset + (r - first) * n; };  // (whole rows: r_first's at offset)
  int64_t rb = mid;
  for (int64_t ra = task.r0; ra < mid;) {
    const int rows = int(std::min<int64_t>(kRowBlock, mid - ra));
    if (rb + rows <= task.r1) {
      by_rows(rows, [&](auto k) {
        constexpr int R = decltype(k)::value;
        pair_rows<R, false>(row(ra), row(rb), n, y + ra, y + rb, za, zb);
        if (check) {
          const float* const x = bw.vec + bw.vec_at[i];
          pair_rows<R, true>(row(ra), row(rb), n, x, x, bw.out + bw.out_at[i] + ra, bw.out + bw.out_at[i] + rb);
        }
      });
      rb += rows;
    } else {  // the first half's last rows, where the second has fewer left
      by_rows(rows, [&](auto k) { axpy_rows<decltype(k)::value>(za, row(ra), n, y + ra); });
      if (check) bw.segment(i, row(ra), ra, rows, 0, n, tid);
    }
    ra += rows;
  }
  for (; rb < task.r1; ++rb) {  // the second half's last rows, if any
    axpy_rows<1>(zb, row(rb), n, y + rb);
    if (check) bw.segment(i, row(rb), rb, 1, 0, n, tid);
  }
}

at::Tensor pass2(const PieceLayout& l, const at::Tensor& y_w, const at::Tensor& y_u, const at::Tensor& x_w,
                 const at::Tensor& kept_bw, at::Tensor& z, bool full, const PieceMask& mask = {}) {
  check_vectors(l, {&x_w}, {&y_w, &y_u});
  const auto& pieces = l.pieces;
  const auto& of = l.of;
  const int64_t long_total = l.long_total, short_total = l.short_total;
  TORCH_CHECK(z.numel() == 2 * short_total + 1 && z.is_contiguous() && z.scalar_type() == at::kFloat,
              "hf_weyl cpu kernel: z must hold both short sides and a flag");
  float* const out = z.data_ptr<float>();
  const float* const kept = kept_of(kept_bw, long_total);
  at::Tensor fresh = at::zeros({kept != nullptr ? long_total : 0}, at::kFloat);
  std::vector<char> u_here(pieces.size());  // U's short product still to take: all (full), else what pass 1 left
  for (size_t i = 0; i < pieces.size(); ++i) u_here[i] = full || !u_in_pass1(pieces[i]);
  PieceProducts zw, zu, bw;
  zw.start(pieces, short_is_dot, short_len, long_len, y_w.data_ptr<float>(), out);
  zu.start(pieces, short_is_dot, short_len, long_len, y_u.data_ptr<float>(), out + short_total);
  if (kept != nullptr) bw.start(pieces, long_is_dot, long_len, short_len, x_w.data_ptr<float>(), fresh.data_ptr<float>());
  const bool check = kept != nullptr;
  auto segment = [&zw, &zu, &bw, &of, check](int64_t i, int64_t r, int rows, int64_t c0, int64_t len, int64_t base,
                                             int tid) {
    zw.segment_pass2(zu, i, of[i].w + base, of[i].u + base, r, rows, c0, len, tid);
    if (check) bw.segment(i, of[i].w + base, r, rows, c0, len, tid);
  };
  if (std::find(u_here.begin(), u_here.end(), char(0)) != u_here.end()) zw.with_second_half();  // (w_alone's)
  for_task_slots(row_tasks(pieces), mask, [&](const RowTask& task, int slot) {
    if (u_here[task.piece]) {
      task_segments(pieces, task, slot, segment);
    } else {
      w_alone(zw, bw, pieces[task.piece], task, of[task.piece].w, check, slot);
    }
  });
  zw.finish(pieces, mask);
  zu.finish(pieces, mask);
  if (check) {
    bw.finish(pieces, mask);
    const float* const now = fresh.data_ptr<float>();
    bool same = true;  // bit for bit: NaN weights never validate (over the pieces of the mask)
    for (size_t i = 0; i < pieces.size() && same; ++i) {
      if (!in_mask(mask, int64_t(i))) continue;
      const int64_t at = bw.out_at[i], len = long_len(pieces[i].rows, pieces[i].cols);
      for (int64_t k = at; k < at + len && same; ++k) same = now[k] == kept[k];
    }
    out[2 * short_total] = same ? 0.f : 1.f;
  }
  return fresh;
}

void check_mask(const PieceLayout& l, const PieceMask& mask) {
  TORCH_CHECK(mask.empty() || mask.size() == l.pieces.size(), "hf_weyl cpu kernel: one mask entry per piece");
}

// (`mask`: the pieces to take, one 0/1 per piece; the other pieces' outputs are left as they are, and the flag says
// whether the kept product is stale on the pieces taken)
at::Tensor pieces_pass2_of(at::Tensor flat, at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> starts,
                           std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                           at::Tensor y_w, at::Tensor y_u, at::Tensor x_w, at::Tensor kept_bw, at::Tensor z, bool full,
                           PieceMask mask) {
  const PieceLayout l =
      flat_layout(flat, nullptr, nullptr, nullptr, work, offsets, starts, numels, rows, cols, {}, {}, 0.0);
  check_mask(l, mask);
  return pass2(l, y_w, y_u, x_w, kept_bw, z, full, mask);
}

at::Tensor pieces_pass2(at::Tensor flat, at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> starts,
                        std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                        at::Tensor y_w, at::Tensor y_u, at::Tensor x_w, at::Tensor kept_bw, at::Tensor z, bool full) {
  return pieces_pass2_of(flat, work, offsets, starts, numels, rows, cols, y_w, y_u, x_w, kept_bw, z, full, {});
}

at::Tensor shards_pass2(std::vector<at::Tensor> params, at::Tensor work, std::vector<int64_t> starts,
                        std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                        at::Tensor y_w, at::Tensor y_u, at::Tensor x_w, at::Tensor kept_bw, at::Tensor z, bool full) {
  const PieceLayout l = shard_layout(params, {}, {}, {}, work, starts, numels, rows, cols);
  return pass2(l, y_w, y_u, x_w, kept_bw, z, full);
}

at::Tensor update(const PieceLayout& l, const std::vector<double>& lrs, double weight_decay, const at::Tensor& x_w,
                  const PieceMask& mask = {}) {
  check_vectors(l, {&x_w}, {});
  const auto& pieces = l.pieces;
  const auto& of = l.of;
  const auto& gaps = l.gaps;
  TORCH_CHECK(lrs.size() == pieces.size(), "hf_weyl cpu kernel: one lr per piece");
  const float wd = float(weight_decay);
  auto step = [wd](float* wt, const float* ut, int64_t len, float eff_lr) {
    const float decay = 1.f - eff_lr * wd;
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) wt[j] = wt[j] * decay - eff_lr * ut[j];
  };
  const Arrays fl = l.flat;
  at::parallel_for(0, int64_t(gaps.size()), 1, [&gaps, &step, fl](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) step(fl.w + gaps[t].offset, fl.u + gaps[t].offset, gaps[t].numel, gaps[t].value);
  });
  std::vector<float> piece_lr(lrs.begin(), lrs.end());
  at::Tensor next = at::zeros({l.long_total}, at::kFloat);
  PieceProducts bw;
  bw.start(pieces, long_is_dot, long_len, short_len, x_w.data_ptr<float>(), next.data_ptr<float>());
  for_row_segments(pieces, row_tasks(pieces), [&bw, &step, &piece_lr, &of](
                                                  int64_t i, int64_t r, int rows, int64_t c0, int64_t len, int64_t base, int tid) {
    step(of[i].w + base, of[i].u + base, rows * len, piece_lr[i]);
    bw.segment(i, of[i].w + base, r, rows, c0, len, tid);
  }, NoEpilogue{}, mask);
  bw.finish(pieces, mask);
  return next;
}

// (`mask`: the pieces to update, one 0/1 per piece, with the gaps given; the kept product is left 0 elsewhere)
at::Tensor pieces_update_of(at::Tensor flat, at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> starts,
                            std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                            std::vector<double> lrs, std::vector<int64_t> gap_offsets, std::vector<int64_t> gap_numels,
                            double gap_lr, double weight_decay, at::Tensor x_w, PieceMask mask) {
  const PieceLayout l = flat_layout(flat, nullptr, nullptr, nullptr, work, offsets, starts, numels, rows, cols,
                                    gap_offsets, gap_numels, gap_lr);
  check_mask(l, mask);
  return update(l, lrs, weight_decay, x_w, mask);
}

at::Tensor pieces_update(at::Tensor flat, at::Tensor work, std::vector<int64_t> offsets, std::vector<int64_t> starts,
                         std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                         std::vector<double> lrs, std::vector<int64_t> gap_offsets, std::vector<int64_t> gap_numels,
                         double gap_lr, double weight_decay, at::Tensor x_w) {
  return pieces_update_of(flat, work, offsets, starts, numels, rows, cols, lrs, gap_offsets, gap_numels, gap_lr,
                          weight_decay, x_w, {});
}

at::Tensor shards_update(std::vector<at::Tensor> params, at::Tensor work, std::vector<int64_t> starts,
                         std::vector<int64_t> numels, std::vector<int64_t> rows, std::vector<int64_t> cols,
                         std::vector<double> lrs, double weight_decay, at::Tensor x_w) {
  const PieceLayout l = shard_layout(params, {}, {}, {}, work, starts, numels, rows, cols);
  return update(l, lrs, weight_decay, x_w);
}

// The power step's maths between the passes, per segment of a concatenated fp32 vector (the whole-matrix kernel's):
// segments_unit_scaled_ makes each segment y = c b / ‖b‖ in place and returns the guards c; segments_sigma_ returns
// σ = ‖z‖ / c per segment (0 where not finite and positive) and sets x to z / ‖z‖ where σ > 0 (z is normalised in
// place).
std::vector<int64_t> segment_starts(const at::Tensor& v, const std::vector<int64_t>& sizes) {
  TORCH_CHECK(v.is_contiguous() && v.scalar_type() == at::kFloat && v.device().is_cpu(),
              "hf_weyl cpu kernel: segment vectors must be contiguous fp32 CPU tensors");
  std::vector<int64_t> starts(sizes.size() + 1, 0);
  for (size_t i = 0; i < sizes.size(); ++i) starts[i + 1] = starts[i] + sizes[i];
  TORCH_CHECK(starts.back() == v.numel(), "hf_weyl cpu kernel: segment sizes do not add up to the vector");
  return starts;
}

// (segments in parallel, each computed as a whole by one thread: the same bits with any thread count)
template <typename Fn>
void for_segments(size_t count, Fn fn) {
  at::parallel_for(0, int64_t(count), 1, [&fn](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(size_t(i));
  });
}

at::Tensor segments_unit_scaled_(at::Tensor b, std::vector<int64_t> sizes) {
  const auto starts = segment_starts(b, sizes);
  at::Tensor c = at::empty({int64_t(sizes.size())}, at::kFloat);
  float* const data = b.data_ptr<float>();
  float* const out = c.data_ptr<float>();
  for_segments(sizes.size(), [&](size_t i) { out[i] = to_unit_scaled(data + starts[i], sizes[i]); });
  return c;
}

// ‖b‖ per segment (scale-safe, unit_'s), b unchanged.
at::Tensor segments_norm(at::Tensor b, std::vector<int64_t> sizes) {
  const auto starts = segment_starts(b, sizes);
  at::Tensor norms = at::empty({int64_t(sizes.size())}, at::kFloat);
  const float* const data = b.data_ptr<float>();
  float* const out = norms.data_ptr<float>();
  for_segments(sizes.size(), [&](size_t i) {
    std::vector<float> copy(data + starts[i], data + starts[i + 1]);
    out[i] = unit_(copy);
  });
  return norms;
}

at::Tensor segments_sigma_(at::Tensor z, std::vector<int64_t> sizes, at::Tensor c, at::Tensor x) {
  const auto starts = segment_starts(z, sizes);
  segment_starts(x, sizes);
  TORCH_CHECK(c.is_contiguous() && c.scalar_type() == at::kFloat && c.numel() == int64_t(sizes.size()),
              "hf_weyl cpu kernel: one guard per segment");
  at::Tensor sigma = at::empty({int64_t(sizes.size())}, at::kFloat);
  float* const zd = z.data_ptr<float>();
  float* const xd = x.data_ptr<float>();
  const float* const cd = c.data_ptr<float>();
  float* const out = sigma.data_ptr<float>();
  for_segments(sizes.size(), [&](size_t i) { out[i] = finish_sigma(zd + starts[i], sizes[i], cd[i], xd + starts[i]); });
  return sigma;
}

// Whether every element of a contiguous fp32 CPU tensor is finite (no inf, no NaN): one read at memory speed. An
// element is finite iff its exponent bits are not all ones, i.e. iff the largest (bits & exponent mask) is below it.
bool all_finite(at::Tensor t) {
  TORCH_CHECK(t.is_contiguous() && t.scalar_type() == at::kFloat && t.device().is_cpu(),
              "hf_weyl cpu kernel: all_finite takes a contiguous fp32 CPU tensor");
  const uint32_t* const bits = reinterpret_cast<const uint32_t*>(t.data_ptr<float>());
  const int64_t n = t.numel();
  constexpr uint32_t kExponent = 0x7F800000u;
  std::vector<uint32_t> top(static_cast<size_t>(at::get_num_threads()), 0u);
  at::parallel_for(0, n, kTaskElements, [&top, bits](int64_t b, int64_t e) {
    uint32_t lanes[kLanes] = {0u};
    int64_t j = b;
    for (; j + kLanes <= e; j += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], bits[j + l] & kExponent);
    }
    uint32_t most = 0u;
    for (int l = 0; l < kLanes; ++l) most = std::max(most, lanes[l]);
    for (; j < e; ++j) most = std::max(most, bits[j] & kExponent);
    uint32_t& slot = top[at::get_thread_num()];
    slot = std::max(slot, most);
  });
  return *std::max_element(top.begin(), top.end()) != kExponent;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("weyl_step", &weyl_step, "AdamW² step for a list of CPU matrices in three fused passes");
  module.def("pieces_pass1", &pieces_pass1,
             "moments, U, the partial long products of matrix pieces, U's short ones of tall pieces of whole rows (fp32)");
  module.def("pieces_pass2", &pieces_pass2,
             "the partial short products pass 1 left, and the kept product's check (fp32)");
  module.def("shards_pass1", &shards_pass1, "pieces_pass1 on pieces that are tensors of their own (FSDP2's shards)");
  module.def("shards_pass2", &shards_pass2, "pieces_pass2 on pieces that are tensors of their own");
  module.def("shards_update", &shards_update, "pieces_update on pieces that are tensors of their own");
  module.def("segments_norm", &segments_norm, "‖b‖ per segment, scale-safe");
  module.def("pieces_update", &pieces_update, "the capped update of a flat partition and its pieces' next partial B_W x_W (fp32)");
  module.def("pieces_pass2_of", &pieces_pass2_of, "pieces_pass2 on the pieces of a 0/1 mask");
  module.def("pieces_update_of", &pieces_update_of, "pieces_update on the pieces of a 0/1 mask (and the gaps given)");
  module.def("segments_unit_scaled_", &segments_unit_scaled_, "y = c b / ‖b‖ per segment, in place; returns c");
  module.def("segments_sigma_", &segments_sigma_, "σ = ‖z‖ / c per segment; x ← z / ‖z‖ where σ > 0");
  module.def("all_finite", &all_finite, "whether a contiguous fp32 CPU tensor holds no inf or NaN");
}
