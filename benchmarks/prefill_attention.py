# ruff: noqa: E501  (the C++ source below keeps its own line lengths)
"""A candidate causal prefill attention kernel for CPU against torch's flash SDPA (issue 34), one
sequence of fresh prompt tokens, float32, head_dim 64, GQA.

The candidate (AVX2/FMA, built here with torch's cpp_extension): K transposed per KV head in slabs of 16 keys ([D][16], contiguous); per
(KV head, block of 4 query rows) the scores of 4 rows x 16 keys as a register tile, the block's causal
scores kept whole (exact softmax, no online rescaling), then P.V a row at a time. Not used by the
engine yet: this measures whether it is worth moving into microserve/csrc/.

    python benchmarks/prefill_attention.py        # prints a table: tokens, threads, SDPA ms, candidate ms
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline

# NOTE: e^x for 8 floats is the engine's own (microserve/csrc/cpu_kernels.cpp), not a copy
CSRC = (Path(__file__).resolve().parents[1] / "microserve" / "csrc" / "cpu_kernels.cpp").read_text()
_EXP8 = CSRC[CSRC.index("inline __m256 exp8("):CSRC.index("\n}\n", CSRC.index("inline __m256 exp8(")) + 3]
src = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <vector>
EXP8
// q [n, hq, D], k/v [n, hkv, D], causal, one sequence; D == 64
torch::Tensor causal(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  const int64_t n = q.size(0), hq = q.size(1), D = q.size(2), hkv = k.size(1), G = hq / hkv;
  TORCH_CHECK(D == 64);
  auto o = torch::empty_like(q);
  const int64_t np = (n + 15) / 16 * 16;
  auto kt = torch::zeros({hkv, np / 16, D, 16}, q.options());  // K transposed in 16-key slabs per kv head
  const float* Q = q.data_ptr<float>(); const float* K = k.data_ptr<float>(); const float* V = v.data_ptr<float>();
  float* O = o.data_ptr<float>(); float* KT = kt.data_ptr<float>();
  at::parallel_for(0, hkv, 1, [&](int64_t b, int64_t e) {
    for (int64_t g = b; g < e; ++g) for (int64_t j = 0; j < n; ++j) for (int64_t d = 0; d < D; ++d)
      KT[((g * (np / 16) + j / 16) * D + d) * 16 + j % 16] = K[(j * hkv + g) * D + d];
  });
  const int64_t BR = 4, nblk = (n + BR - 1) / BR;
  // work items: (kv head, query block), heaviest (last) blocks first for balance
  at::parallel_for(0, hkv * nblk, 1, [&](int64_t b, int64_t e) {
    std::vector<float> S(BR * np);
    for (int64_t w = b; w < e; ++w) {
      const int64_t g = w % hkv, blk = nblk - 1 - w / hkv;
      const int64_t i0 = blk * BR, rows = std::min(BR, n - i0), kend = i0 + rows;  // keys [0, kend)
      const float* kt_g = KT + g * D * np;  // np / 16 slabs of [D][16]
      for (int64_t hh = 0; hh < G; ++hh) {
        const int64_t h = g * G + hh;
        const float* qr[4];
        for (int64_t r = 0; r < BR; ++r) qr[r] = Q + ((i0 + std::min(r, rows - 1)) * hq + h) * D;
        const __m256 sc = _mm256_set1_ps((float)scale);
        for (int64_t jb = 0; jb < kend; jb += 16) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
          const float* kp = kt_g + (jb / 16) * D * 16;
          const bool two = jb + 8 < np;
          for (int64_t d = 0; d < D; ++d) {
            const __m256 kv = _mm256_loadu_ps(kp + d * 16);
            const __m256 kw = two ? _mm256_loadu_ps(kp + d * 16 + 8) : kv;
            const __m256 q0 = _mm256_broadcast_ss(qr[0] + d), q1 = _mm256_broadcast_ss(qr[1] + d);
            const __m256 q2 = _mm256_broadcast_ss(qr[2] + d), q3 = _mm256_broadcast_ss(qr[3] + d);
            a0 = _mm256_fmadd_ps(q0, kv, a0); b0 = _mm256_fmadd_ps(q0, kw, b0);
            a1 = _mm256_fmadd_ps(q1, kv, a1); b1 = _mm256_fmadd_ps(q1, kw, b1);
            a2 = _mm256_fmadd_ps(q2, kv, a2); b2 = _mm256_fmadd_ps(q2, kw, b2);
            a3 = _mm256_fmadd_ps(q3, kv, a3); b3 = _mm256_fmadd_ps(q3, kw, b3);
          }
          _mm256_storeu_ps(&S[0 * np + jb], _mm256_mul_ps(a0, sc));
          _mm256_storeu_ps(&S[1 * np + jb], _mm256_mul_ps(a1, sc));
          _mm256_storeu_ps(&S[2 * np + jb], _mm256_mul_ps(a2, sc));
          _mm256_storeu_ps(&S[3 * np + jb], _mm256_mul_ps(a3, sc));
          if (two) {
            _mm256_storeu_ps(&S[0 * np + jb + 8], _mm256_mul_ps(b0, sc));
            _mm256_storeu_ps(&S[1 * np + jb + 8], _mm256_mul_ps(b1, sc));
            _mm256_storeu_ps(&S[2 * np + jb + 8], _mm256_mul_ps(b2, sc));
            _mm256_storeu_ps(&S[3 * np + jb + 8], _mm256_mul_ps(b3, sc));
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          float* s = &S[r * np];
          const int64_t len = i0 + r + 1;
          float m = -INFINITY;
          for (int64_t j = 0; j < len; ++j) m = std::max(m, s[j]);
          __m256 acc = _mm256_setzero_ps(); const __m256 mv = _mm256_set1_ps(m);
          int64_t j = 0;
          for (; j + 8 <= len; j += 8) { __m256 x = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)); _mm256_storeu_ps(s + j, x); acc = _mm256_add_ps(acc, x); }
          float tot = 0; float t8[8]; _mm256_storeu_ps(t8, acc); for (int q_ = 0; q_ < 8; ++q_) tot += t8[q_];
          for (; j < len; ++j) { s[j] = std::exp(s[j] - m); tot += s[j]; }
          const float inv = 1.f / tot;
          __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0;
          for (int64_t jj = 0; jj < len; ++jj) {
            const __m256 p = _mm256_set1_ps(s[jj]);
            const float* vp = V + (jj * hkv + g) * D;
            o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp), o0); o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 8), o1);
            o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 16), o2); o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 24), o3);
            o4 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 32), o4); o5 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 40), o5);
            o6 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 48), o6); o7 = _mm256_fmadd_ps(p, _mm256_loadu_ps(vp + 56), o7);
          }
          float* op = O + ((i0 + r) * hq + h) * D; const __m256 iv = _mm256_set1_ps(inv);
          _mm256_storeu_ps(op, _mm256_mul_ps(o0, iv)); _mm256_storeu_ps(op + 8, _mm256_mul_ps(o1, iv));
          _mm256_storeu_ps(op + 16, _mm256_mul_ps(o2, iv)); _mm256_storeu_ps(op + 24, _mm256_mul_ps(o3, iv));
          _mm256_storeu_ps(op + 32, _mm256_mul_ps(o4, iv)); _mm256_storeu_ps(op + 40, _mm256_mul_ps(o5, iv));
          _mm256_storeu_ps(op + 48, _mm256_mul_ps(o6, iv)); _mm256_storeu_ps(op + 56, _mm256_mul_ps(o7, iv));
        }
      }
    }
  });
  return o;
}
'''
src = src.replace("EXP8", _EXP8)
m = load_inline("prefill_attention_candidate", cpp_sources=src, functions=["causal"], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def bench(f, reps: int = 20) -> float:
    f()
    t0 = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> int:
    hq, hkv, D = 8, 4, 64
    print("| tokens | threads | max abs diff | SDPA ms | SDPA GFLOP/s | candidate ms | candidate GFLOP/s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (512, 2048):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            q, k, v = torch.randn(n, hq, D), torch.randn(n, hkv, D), torch.randn(n, hkv, D)

            def sdpa(q=q, k=k, v=v):
                return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                      v.transpose(0, 1)[None], is_causal=True, scale=D ** -0.5,
                                                      enable_gqa=True)[0].transpose(0, 1)

            diff = (m.causal(q, k, v, D ** -0.5) - sdpa()).abs().max().item()
            t_ref, t_new = bench(sdpa), bench(lambda q=q, k=k, v=v: m.causal(q, k, v, D ** -0.5))
            flop = 2 * 2 * hq * D * n * (n + 1) / 2 / 1e9
            print(f"| {n} | {threads} | {diff:.1e} | {t_ref:.2f} | {flop / t_ref * 1e3:.0f} | {t_new:.2f} | "
                  f"{flop / t_new * 1e3:.0f} | {t_ref / t_new:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
