// Native CPU kernels (pure-torch twins in microserve/engine: attention.py, models/llama.py).
//
// Paged-attention decode: one query token per sequence, K/V read straight from
// the block pool through the block table (no gather into a contiguous buffer).
//
//   q      [B, Hq, D]                      this step's queries (RoPE applied)
//   cache  [2, NB, bs, Hkv, D]             one layer's pool: cache[0] = K, cache[1] = V
//   tables [B, max_blocks] int64           block ids, position p lives in tables[b][p / bs]
//   lens   [B] int64                       context length (keys 0 .. lens[b]-1, incl. this token)
//   out    [B, Hq, D]
//
// Work item = one sequence: its pages are read front to back (a token's row holds every KV
// head), each K/V row once for all Hq query heads (GQA: head hq reads KV head hq / G). Scores are computed in
// float32, softmax is exact (max-subtracted), accumulation in float32.
//
// Headers: ATen's tensor and the two ops used, plus torch's pybind11 casters, not <torch/extension.h>
// (the whole C++ frontend): the first-use build takes ~16 s of compiler time instead of ~30.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

namespace torch {
using namespace at;  // NOTE: torch::Tensor, torch::empty, torch::kFloat, as <torch/types.h> spells them
}

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

#ifdef __AVX2__
// e^x for 8 floats (Cephes expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6
// polynomial, 2^n put into the exponent bits); within 2 ulp of std::exp over the clamped
// range [-87.3, 88.3] (below: a denormal-free tiny value, above: ~2e38). std::exp is a
// scalar libm call: it made the softmax and SiLU the slowest part of their kernels.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// x[i] = e^(x[i] - m); returns the sum (a softmax's numerator and denominator in one pass)
inline float exp_sub_sum(float* __restrict x, int64_t n, float m) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef __AVX2__
  __m256 acc = _mm256_setzero_ps();
  const __m256 mv = _mm256_set1_ps(m);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float v : lanes) sum += v;
#endif
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

// Half precision rows are widened to float32 scratch rows, computed on in float32 and
// narrowed back, 8 lanes at a time: bf16 by a 16-bit shift (narrowing rounds to nearest
// even, NaN to the quiet NaN, bit for bit as c10::BFloat16), fp16 by F16C. Per-element
// c10::Half conversions are scalar bit twiddling: an fp16 decode step ran 4.5x slower than
// bf16 before this.
template <typename T>  // any other dtype (float64): element by element
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

inline void widen(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void widen(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void widen(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void narrow(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

inline void narrow(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#ifdef __AVX2__
  const __m256i lsb = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF), qnan = _mm256_set1_epi32(0x7FC0);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(x);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), lsb)));
    r = _mm256_srli_epi32(r, 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

inline void narrow(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// src as float32: itself for float (no copy), else widened into buf (>= n floats)
template <typename T>
inline const float* as_float(const T* src, float* buf, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    (void)buf, (void)n;
    return src;
  } else {
    widen(src, buf, n);
    return buf;
  }
}

template <typename T>
void decode_kernel(const T* __restrict q, const T* __restrict kbase, const T* __restrict vbase,
                   const int64_t* __restrict tables, const int64_t* __restrict lens, T* __restrict out,
                   float* __restrict lse, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                   int64_t max_blocks, float scale) {
  const int64_t G = Hq / Hkv;
  const int64_t row = Hkv * D;        // elements between consecutive tokens of one page
  const int64_t page = bs * row;      // elements per page: read front to back
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(Hq * D), acc(Hq * D), scores, pagef(std::is_same<T, float>::value ? 0 : page);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t ctx = lens[b];
      const int64_t* table = tables + b * max_blocks;
      scores.resize(Hq * ctx);  // [Hq, ctx]
      const T* qb = q + b * Hq * D;
      widen(qb, qf.data(), Hq * D);
      for (int64_t i = 0; i < Hq * D; ++i) qf[i] *= scale;
      // scores[hq, t] = q_hq . k_t[hq / G]
      for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t n = std::min(bs, ctx - t0);
        const float* kp = as_float(kbase + table[t0 / bs] * page, pagef.data(), n * row);
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t hq = 0; hq < Hq; ++hq) {
            const float* k = kp + j * row + (hq / G) * D;
            const float* qh = qf.data() + hq * D;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < D; ++d) s += qh[d] * k[d];
            scores[hq * ctx + t0 + j] = s;
          }
        }
      }
      // exact softmax over t, per query head
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float* sh = scores.data() + hq * ctx;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < ctx; ++t) m = std::max(m, sh[t]);
        const float sum = exp_sub_sum(sh, ctx, m);
        if (lse != nullptr) lse[b * Hq + hq] = m + std::log(sum);  // a part's weight when parts merge
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < ctx; ++t) sh[t] *= inv;
      }
      // acc[hq] = sum_t p[hq, t] * v_t[hq / G]
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < ctx; t0 += bs) {
        const int64_t n = std::min(bs, ctx - t0);
        const float* vp = as_float(vbase + table[t0 / bs] * page, pagef.data(), n * row);
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t hq = 0; hq < Hq; ++hq) {
            const float* v = vp + j * row + (hq / G) * D;
            const float p = scores[hq * ctx + t0 + j];
            float* a = acc.data() + hq * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
          }
        }
      }
      narrow(acc.data(), out + b * Hq * D, Hq * D);
    }
  });
}

// lse: optional [B, Hq] float32, filled with each row's log-sum-exp of its scaled scores (DistAttention
// merges parts computed over disjoint keys with it)
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor cache, torch::Tensor tables, torch::Tensor lens,
                           double scale, std::optional<torch::Tensor> lse) {
  TORCH_CHECK(q.device().is_cpu() && cache.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && cache.size(0) == 2, "paged_decode: bad shapes");
  TORCH_CHECK(cache.is_contiguous(), "paged_decode: cache must be contiguous");
  q = q.contiguous();  // a view into the fused qkv row; [B, Hq, D] is small
  TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "paged_decode: q and cache dtypes differ");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong,
              "paged_decode: tables and lens must be int64");
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = cache.size(1), bs = cache.size(2), Hkv = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && Hq % Hkv == 0, "paged_decode: head layout mismatch");
  TORCH_CHECK(tables.size(0) == B && lens.size(0) == B, "paged_decode: batch mismatch");
  // NOTE: bounds are checked here (cheap: B * max_blocks ints) so a bad table is an error, not a wild read
  const int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lp[b] >= 1 && lp[b] <= max_blocks * bs, "paged_decode: context length ", lp[b], " out of range");
    for (int64_t i = 0; i < (lp[b] + bs - 1) / bs; ++i)
      TORCH_CHECK(tp[b * max_blocks + i] >= 0 && tp[b * max_blocks + i] < NB, "paged_decode: block id ",
                  tp[b * max_blocks + i], " out of range");
  }
  float* lse_p = nullptr;
  if (lse.has_value()) {
    TORCH_CHECK(lse->scalar_type() == torch::kFloat && lse->is_contiguous() && lse->dim() == 2 &&
                lse->size(0) == B && lse->size(1) == Hq, "paged_decode: lse must be a contiguous float32 [B, Hq]");
    lse_p = lse->data_ptr<float>();
  }
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_decode", [&] {
    const scalar_t* k = cache.data_ptr<scalar_t>();
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), k, k + NB * bs * Hkv * D, tables.data_ptr<int64_t>(),
                            lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), lse_p, B, Hq, Hkv, D, bs,
                            tables.size(1), static_cast<float>(scale));
  });
  return out;
}

template <typename T>
void silu_and_mul_kernel(const T* __restrict src, T* __restrict dst, int64_t T_, int64_t I) {
  constexpr bool f32 = std::is_same<T, float>::value;
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(f32 ? 0 : 3 * I);  // half precision: [gate | up] widened, then the output
    for (int64_t t = begin; t < end; ++t) {
      const float* g = as_float(src + t * 2 * I, buf.data(), 2 * I);
      const float* u = g + I;
      float* o;
      if constexpr (f32) o = dst + t * I; else o = buf.data() + 2 * I;
      int64_t i = 0;
#ifdef __AVX2__
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= I; i += 8) {
        const __m256 a = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), a));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < I; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
      if constexpr (!f32) narrow(o, dst + t * I, I);
    }
  });
}

// out[t, i] = silu(x[t, i]) * x[t, I + i]: the MLP's gate/up product in one pass (x = [T, 2I]).
torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: expects CPU [T, 2I]");
  x = x.contiguous();
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_kernel<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), T, I);
  });
  return out;
}

template <typename T>
void add_rms_norm_kernel(const T* __restrict x, const T* __restrict res, const T* __restrict w, T* __restrict out,
                         T* __restrict res_out, int64_t T_, int64_t N, float eps) {
  constexpr bool f32 = std::is_same<T, float>::value;
  // small inputs (a decode batch) on one thread: waking the pool costs more than the work
  const int64_t grain = std::max<int64_t>(1, 32768 / N);
  at::parallel_for(0, T_, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> row(N), tmp(f32 ? 0 : N), wf(N);
    std::vector<T> rounded(f32 ? 0 : N);
    widen(w, wf.data(), N);
    for (int64_t t = begin; t < end; ++t) {
      if (res != nullptr) {
        const float* xr = as_float(x + t * N, row.data(), N);
        const float* rr = as_float(res + t * N, tmp.data(), N);
#pragma omp simd
        for (int64_t i = 0; i < N; ++i) row[i] = xr[i] + rr[i];
        narrow(row.data(), res_out + t * N, N);
        if constexpr (!f32) widen(res_out + t * N, row.data(), N);  // rounded like torch's add in T
      } else {
        widen(x + t * N, row.data(), N);
      }
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < N; ++i) ss += row[i] * row[i];
      const float rstd = 1.f / std::sqrt(ss / static_cast<float>(N) + eps);
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) row[i] *= rstd;
      if constexpr (!f32) {  // half precision: normalise in float32, round, then scale (as transformers does)
        narrow(row.data(), rounded.data(), N);
        widen(rounded.data(), row.data(), N);
      }
#pragma omp simd
      for (int64_t i = 0; i < N; ++i) row[i] *= wf[i];
      narrow(row.data(), out + t * N, N);
    }
  });
}

// (RMSNorm(x + residual), x + residual) in one pass over each row; without a residual,
// (RMSNorm(x), x). x, residual: [T, N]; weight: [N].
std::vector<torch::Tensor> add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor weight,
                                        double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type(),
              "add_rms_norm: expects CPU x [T, N] and weight [N] of x's dtype");
  x = x.contiguous();
  weight = weight.contiguous();
  const bool has_res = residual.has_value() && residual->defined();
  torch::Tensor res;
  if (has_res) {
    res = residual->contiguous();
    TORCH_CHECK(res.sizes() == x.sizes() && res.scalar_type() == x.scalar_type(),
                "add_rms_norm: residual must match x");
  }
  auto out = torch::empty_like(x);
  auto res_out = has_res ? torch::empty_like(x) : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), has_res ? res.data_ptr<scalar_t>() : nullptr,
                                  weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                  has_res ? res_out.data_ptr<scalar_t>() : nullptr, x.size(0), x.size(1),
                                  static_cast<float>(eps));
  });
  return {out, res_out};
}

template <typename T>
void rope_kernel(T* base, const float* cb, const float* sb, int64_t T_, int64_t ld, int64_t heads, int64_t D) {
  const int64_t half = D / 2;
  at::parallel_for(0, T_, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(heads * D);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cb + t * D;
      const float* s = sb + t * D;
      T* row = base + t * ld;  // the q and k heads: contiguous
      widen(row, xf.data(), heads * D);
      for (int64_t h = 0; h < heads; ++h) {
        float* x = xf.data() + h * D;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = x[d], x2 = x[d + half];
          x[d] = x1 * c[d] - x2 * s[d];
          x[d + half] = x2 * c[d + half] + x1 * s[d + half];
        }
      }
      narrow(xf.data(), row, heads * D);
    }
  });
}

// Rotate-half RoPE in place on the first `heads` heads of each row of qkv [T, >= heads * D]
// (q heads then k heads of the fused projection); cos, sin: [T, D] float32.
void rope_(torch::Tensor qkv, int64_t heads, int64_t D, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) >= heads * D &&
              D % 2 == 0, "rope_: expects CPU [T, >= heads * D] with unit inner stride");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && sin.scalar_type() == torch::kFloat && cos.is_contiguous() &&
              sin.is_contiguous() && cos.size(0) == qkv.size(0) && cos.size(-1) == D && sin.sizes() == cos.sizes(),
              "rope_: cos/sin must be [T, D] float32");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "rope_", [&] {
    rope_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), qkv.size(0),
                          qkv.stride(0), heads, D);
  });
}

// ---------------------------------------------------------------------------------------
// GEMM for the projections: y[M, N] = x[M, K] @ w[K, N] (+ bias). Named for where it
// began (decode's few rows); with rows in blocks of 64 it matches oneDNN on prefill chunks.
// MKL's sgemm is slow for 2 <= M <= 32 on this shape class (an lm_head at M = 8 costs 3x
// M = 1). Here every thread owns a range of 16-column tiles of w and streams each tile
// once, for groups of <= 4 rows with the 4 x 16 outputs in 8 AVX2 registers: the k-loop is
// one broadcast + 2 FMAs per row. NOTE: groups of 5-6 rows (12 accumulators) ran at half
// the speed on Zen (an lm_head at M = 32: 16.7 vs 7.7 ms); rows are split into near-equal
// groups, so no group is a lone row. While the second group runs, the next tile is
// prefetched into L2: the first group of the next tile then does not wait on memory.
//
// Weights may be float32, bfloat16 or float16 (W); x, the accumulators and the bias are
// float32 (the caller converts), and the caller rounds y to the model's dtype: a half
// precision GEMM with float32 accumulation, as MKL's and cuBLAS's are. Half weights are
// widened in registers (bf16: a 16-bit shift; fp16: F16C), so decode streams half the bytes.
// NOTE: torch's own bf16 / fp16 GEMMs on CPUs without AVX512-BF16 / AMX run at scalar
// speed (38 ms for one [32, 512] x [512, 2752] product on this 2-core AVX2 machine).

#ifdef __AVX2__
inline void load16(const float* p, __m256& a, __m256& b) {
  a = _mm256_loadu_ps(p);
  b = _mm256_loadu_ps(p + 8);
}

inline __m256 bf16x8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }

inline void load16(const c10::BFloat16* p, __m256& a, __m256& b) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  a = bf16x8(_mm256_castsi256_si128(h));
  b = bf16x8(_mm256_extracti128_si256(h, 1));
}

inline void load16(const c10::Half* p, __m256& a, __m256& b) {
#ifdef __F16C__
  a = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  b = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
#else
  alignas(32) float f[16];
  for (int j = 0; j < 16; ++j) f[j] = static_cast<float>(p[j]);
  a = _mm256_load_ps(f);
  b = _mm256_load_ps(f + 8);
#endif
}
#endif

template <int R, typename W>
inline void tile16(const float* __restrict x, int64_t K, const W* __restrict w, int64_t ldw, int64_t N,
                   float* __restrict y, const float* __restrict bias, const W* prefetch) {
#ifdef __AVX2__
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    // NOTE: one 64-byte line holds 16 float32 weights (one k) or 32 halves (two k)
    if (prefetch && (sizeof(W) == 4 || (k & 1) == 0))
      _mm_prefetch(reinterpret_cast<const char*>(prefetch + k * 16), _MM_HINT_T1);
    __m256 w0, w1;
    load16(w + k * ldw, w0, w1);
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
      acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
    }
  }
  const __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * N, _mm256_add_ps(acc[r][0], b0));
    _mm256_storeu_ps(y + r * N + 8, _mm256_add_ps(acc[r][1], b1));
  }
#else
  (void)prefetch;
  float acc[R][16] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 16; ++j) acc[r][j] += x[r * K + k] * to_f(w[k * ldw + j]);
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 16; ++j) y[r * N + j] = acc[r][j] + (bias ? bias[j] : 0.f);
#endif
}

// `next`: the next tile (packed layout only; nullptr: no prefetch)
template <typename W>
inline void rows_tile16(const float* x, int64_t rows, int64_t K, const W* w, int64_t ldw, int64_t N, float* y,
                        const float* bias, const W* next) {
  const int64_t groups = (rows + 3) / 4;
  for (int64_t g = 0, r0 = 0; g < groups; ++g) {
    const int64_t n = (rows - r0) / (groups - g);
    const float* xr = x + r0 * K;
    float* yr = y + r0 * N;
    const W* pf = g == 1 ? next : nullptr;
    switch (n) {
      case 4: tile16<4>(xr, K, w, ldw, N, yr, bias, pf); break;
      case 3: tile16<3>(xr, K, w, ldw, N, yr, bias, pf); break;
      case 2: tile16<2>(xr, K, w, ldw, N, yr, bias, pf); break;
      default: tile16<1>(xr, K, w, ldw, N, yr, bias, pf); break;
    }
    r0 += n;
  }
}

// w: [K, N] row-major, or packed [N / 16, K, 16] (each 16-column tile contiguous: the k-loop
// then reads memory front to back instead of one 64-byte piece per row of w). x, w and the
// bias share one dtype: float32, bfloat16 or float16; y has it too.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "skinny_linear: CPU tensors only");
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16 || dtype == torch::kHalf,
              "skinny_linear: float32, bfloat16 or float16 only, got ", dtype);
  TORCH_CHECK(x.scalar_type() == dtype, "skinny_linear: x is ", x.scalar_type(), ", w is ", dtype);
  const bool packed = w.dim() == 3;
  TORCH_CHECK(x.dim() == 2 && (w.dim() == 2 || (packed && w.size(2) == 16)) && x.size(1) == w.size(packed ? 1 : 0),
              "skinny_linear: shapes [M, K] @ [K, N] or packed [N / 16, K, 16]");
  TORCH_CHECK(w.is_contiguous() && (packed || w.size(1) % 16 == 0),
              "skinny_linear: w must be contiguous, N a multiple of 16");
  x = x.to(torch::kFloat).contiguous();  // no copy for float32; [M, K] is small next to w
  const int64_t M = x.size(0), K = x.size(1), N = packed ? w.size(0) * 16 : w.size(1);
  const int64_t ldw = packed ? 16 : N, tile_stride = packed ? K * 16 : 16;
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->numel() == N, "skinny_linear: bias must be ", dtype, " [N]");
    b = bias->to(torch::kFloat).contiguous();
    bp = b.data_ptr<float>();
  }
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // NOTE: rows in blocks of 64 (x's block stays in L2 while the thread's tiles stream past it
  // from L3): a 2048-row prefill chunk runs at oneDNN's speed, ~150 GFLOP/s on 2 AVX2 cores
  constexpr int64_t kRowBlock = 64;
  const int64_t tiles = N / 16;
  const auto run = [&](const auto* wp) {
    at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r0 = 0; r0 < M; r0 += kRowBlock) {
        const int64_t rows = std::min(kRowBlock, M - r0);
        for (int64_t t = begin; t < end; ++t)
          rows_tile16(xp + r0 * K, rows, K, wp + t * tile_stride, ldw, N, yp + r0 * N + t * 16,
                      bp ? bp + t * 16 : nullptr, packed && t + 1 < end ? wp + (t + 1) * tile_stride : nullptr);
      }
    });
  };
  if (dtype == torch::kFloat)
    run(w.data_ptr<float>());
  else if (dtype == torch::kBFloat16)
    run(w.data_ptr<c10::BFloat16>());
  else
    run(w.data_ptr<c10::Half>());
  return dtype == torch::kFloat ? y : y.to(dtype);
}


// -- Sampling: one token per row from softmax(logits / T) under min-p and top-p, exactly the distribution
// of sampler._truncated_draw (torch ops), in a few passes over a row held in L2 (max, exponentials, zeroing,
// sum, scan; each top-p round one more sum and scan) instead of ~12 full-batch tensor ops.
//   e_i = exp((l_i - max) / T), zeroed below min_p (e_max = 1, so that is min_p x the largest probability);
//   a draw by inverse CDF (a running sum against u x sum(e)); top-p by rejection with pivots (FlashInfer's):
//   the token stands when the mass strictly more likely than it is <= top_p x sum(e), else the row draws
//   again among those strictly more likely tokens only. Ties at a cut stay (the test is strict).
// Random numbers: splitmix64 from a per-row seed the caller draws from its torch.Generator.
inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline double uniform01(uint64_t& s) { return (splitmix64(s) >> 11) * (1.0 / 9007199254740992.0); }

// the index where the running sum of the weights above `floor` (strictly) first exceeds `target`; the last
// such index when rounding leaves the target unreached; -1 when no weight is above `floor`
inline int64_t scan_above(const float* e, int64_t n, float floor, double target) {
  double run = 0.0;
  int64_t last = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (e[i] > floor) {
      run += e[i];
      last = i;
      if (run > target) return i;
    }
  }
  return last;
}

// the sum of the weights strictly above `floor`
inline double sum_above(const float* e, int64_t n, float floor) {
  int64_t i = 0;
  double sum = 0.0;
#ifdef __AVX2__
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  const __m256 f = _mm256_set1_ps(floor);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(e + i);
    const __m256 kept = _mm256_and_ps(v, _mm256_cmp_ps(v, f, _CMP_GT_OQ));
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(kept)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(kept, 1)));
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(acc0, acc1));
  for (double v : lanes) sum += v;
#endif
  for (; i < n; ++i) sum += e[i] > floor ? e[i] : 0.0;
  return sum;
}

// logits [B, V] float32; temperature, top_p, min_p [B] float32; seeds [B] int64 -> tokens [B] int64
torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor temperature, torch::Tensor top_p, torch::Tensor min_p,
                          torch::Tensor seeds) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat, "logits: [B, V] float32");
  logits = logits.contiguous();
  temperature = temperature.to(torch::kFloat).contiguous();
  top_p = top_p.to(torch::kFloat).contiguous();
  min_p = min_p.to(torch::kFloat).contiguous();
  seeds = seeds.to(torch::kLong).contiguous();
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(temperature.numel() == B && top_p.numel() == B && min_p.numel() == B && seeds.numel() == B,
              "one temperature, top_p, min_p and seed per row");
  auto out = torch::empty({B}, logits.options().dtype(torch::kLong));
  const float* L = logits.data_ptr<float>();
  const float* T = temperature.data_ptr<float>();
  const float* P = top_p.data_ptr<float>();
  const float* M = min_p.data_ptr<float>();
  const int64_t* S = seeds.data_ptr<int64_t>();
  int64_t* O = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(V);
    float* e = buf.data();
    for (int64_t b = b0; b < b1; ++b) {
      const float* l = L + b * V;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < V; ++i) m = std::max(m, l[i]);
      const float inv_t = 1.f / T[b];
      for (int64_t i = 0; i < V; ++i) e[i] = (l[i] - m) * inv_t;  // NOTE: vectorized by the compiler
      exp_sub_sum(e, V, 0.f);
      // NOTE: exp8 clamps its input at -87.3 (e = 1.2e-38): a masked (-inf) logit would keep that weight, so
      // weights below 1.5e-38 x the largest (where float32 softmax underflows too) are zeroed with min-p's
      const float floor = std::max(M[b], 1.5e-38f);
      for (int64_t i = 0; i < V; ++i) e[i] = e[i] < floor ? 0.f : e[i];
      uint64_t state = static_cast<uint64_t>(S[b]);
      double total = sum_above(e, V, 0.f);
      int64_t tok = scan_above(e, V, 0.f, uniform01(state) * total);
      if (P[b] < 1.f) {
        const double budget = static_cast<double>(P[b]) * total;
        for (;;) {
          const float pivot = e[tok];
          const double above = sum_above(e, V, pivot);
          if (above <= budget) break;
          tok = scan_above(e, V, pivot, uniform01(state) * above);
        }
      }
      O[b] = tok < 0 ? 0 : tok;
    }
  });
  return out;
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged attention, one query token per sequence (CPU)", py::arg("q"),
        py::arg("cache"), py::arg("tables"), py::arg("lens"), py::arg("scale"), py::arg("lse") = py::none());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over a fused [T, 2I] projection (CPU)");
  m.def("simd", [] {
#ifdef __AVX2__
    return true;
#else
    return false;
#endif
  }, "whether the kernels were built with AVX2 + FMA (else scalar loops: the GEMM is then not worth using)");
  m.def("skinny_linear", &skinny_linear, "x[M, K] @ w[K, N] (+ bias): float32 accumulation, float32 / bf16 / fp16 weights (CPU)",
        py::arg("x"), py::arg("w"), py::arg("bias") = py::none());
  m.def("sample_rows", &sample_rows, "one token per row from softmax(logits / T) under min-p and top-p (CPU)",
        py::arg("logits"), py::arg("temperature"), py::arg("top_p"), py::arg("min_p"), py::arg("seeds"));
  m.def("rope_", &rope_, "rotate-half RoPE in place on the leading heads of a fused qkv row (CPU)");
  m.def("add_rms_norm", &add_rms_norm, "(RMSNorm(x + residual), x + residual) in one pass (CPU)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
}
