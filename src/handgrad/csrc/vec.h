// handgrad native code: the 16-float vector type and its exact element functions (vectorised
// Cephes-style exp and tanh, about 1-2 ulp), shared by step.cpp and program.cpp. GCC vector
// extensions (vector_size 64), no intrinsics: -march=native picks the instructions.
#pragma once

#include <cstdint>
#include <cstring>

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
static const int VW = 16;

static inline v16 vload(const float* p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float* p, v16 v) { memcpy(p, &v, sizeof v); }
static inline v16 vload_n(const float* p, int n) { v16 v = {}; memcpy(&v, p, sizeof(float) * n); return v; }
static inline void vstore_n(float* p, v16 v, int n) { memcpy(p, &v, sizeof(float) * n); }
static inline v16 vset1(float x) { v16 v = {}; return v + x; }
static inline long pad16(long n) { return (n + VW - 1) / VW * VW; }

// ---------------------------------------------------------------------------- exp, tanh
// exp(x) = 2^n * exp(r), x = n ln2 + r, |r| <= ln2/2 (Cephes expf). NaN passes every comparison
// untouched, so it reaches the result.
static inline v16 vexp(v16 x) {
    x = x < -87.0f ? vset1(-87.0f) : x;
    x = x > 88.0f ? vset1(88.0f) : x;
    v16 fx = x * 1.44269504088896341f + 0.5f;
    vi16 ti = __builtin_convertvector(fx, vi16);  // truncation, then floor
    v16 t = __builtin_convertvector(ti, v16);
    v16 n = t > fx ? t - 1.0f : t;
    v16 r = x - n * 0.693359375f - n * (-2.12194440e-4f);
    v16 z = r * r;
    v16 y = (((((1.9875691500E-4f * r + 1.3981999507E-3f) * r + 8.3334519073E-3f) * r + 4.1665795894E-2f) * r
              + 1.6666665459E-1f) * r + 5.0000001201E-1f) * z + r + 1.0f;
    vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
    v16 p2;
    memcpy(&p2, &bits, sizeof p2);
    return y * p2;
}

// tanh (Cephes tanhf): odd polynomial for |x| <= 0.625, 1 - 2/(exp(2|x|)+1) above (|x| capped at 9,
// where tanh is 1.0f).
static inline v16 vtanh(v16 x) {
    v16 ax = x < 0.0f ? -x : x;
    v16 z = x * x;
    v16 small = ((((-5.70498872745E-3f * z + 2.06390887954E-2f) * z - 5.37397155531E-2f) * z
                  + 1.33314422036E-1f) * z - 3.33332819422E-1f) * z * x + x;
    v16 axc = ax > 9.0f ? vset1(9.0f) : ax;
    v16 e = vexp(axc + axc);
    v16 big = 1.0f - 2.0f / (e + 1.0f);
    big = x < 0.0f ? -big : big;
    return ax > 0.625f ? big : small;
}

// ---------------------------------------------------------------------------- transpose
// A 16 x 16 block in registers transposed by swapping off-diagonal sub-blocks of size 8, 4, 2, 1
// between rows i and i + b (each swap exchanges one bit of the row index with that of the column):
// 64 two-register shuffles per 256 floats.
template <int b>
static inline void swap_blocks(v16* r) {
    const vi16 lo = {0 & b ? 16 + 0 - b : 0, 1 & b ? 16 + 1 - b : 1, 2 & b ? 16 + 2 - b : 2,
                     3 & b ? 16 + 3 - b : 3, 4 & b ? 16 + 4 - b : 4, 5 & b ? 16 + 5 - b : 5,
                     6 & b ? 16 + 6 - b : 6, 7 & b ? 16 + 7 - b : 7, 8 & b ? 16 + 8 - b : 8,
                     9 & b ? 16 + 9 - b : 9, 10 & b ? 16 + 10 - b : 10, 11 & b ? 16 + 11 - b : 11,
                     12 & b ? 16 + 12 - b : 12, 13 & b ? 16 + 13 - b : 13, 14 & b ? 16 + 14 - b : 14,
                     15 & b ? 16 + 15 - b : 15};
    const vi16 hi = {0 & b ? 16 : b, 1 & b ? 17 : 1 + b, 2 & b ? 18 : 2 + b, 3 & b ? 19 : 3 + b,
                     4 & b ? 20 : 4 + b, 5 & b ? 21 : 5 + b, 6 & b ? 22 : 6 + b, 7 & b ? 23 : 7 + b,
                     8 & b ? 24 : 8 + b, 9 & b ? 25 : 9 + b, 10 & b ? 26 : 10 + b, 11 & b ? 27 : 11 + b,
                     12 & b ? 28 : 12 + b, 13 & b ? 29 : 13 + b, 14 & b ? 30 : 14 + b, 15 & b ? 31 : 15 + b};
#pragma GCC unroll 16
    for (int i = 0; i < VW; ++i) {
        if (i & b) continue;
        v16 x = r[i], y = r[i + b];
        r[i] = __builtin_shuffle(x, y, lo);
        r[i + b] = __builtin_shuffle(x, y, hi);
    }
}

// dst (cols, ldd) = src^T over a rows x cols block, 16 x 16 at a time: src rows are readable to
// pad16(cols) and dst rows writable to pad16(rows) (ldd >= pad16(rows)); pads come out zero.
static void transpose(const float* src, long rows, long cols, long lds, float* dst, long ldd) {
    for (long kb = 0; kb < rows; kb += VW) {
        const long kn = rows - kb < VW ? rows - kb : VW;
        for (long nb = 0; nb < cols; nb += VW) {
            v16 r[VW];
            for (int i = 0; i < VW; ++i) r[i] = i < kn ? vload(src + (kb + i) * lds + nb) : vset1(0.0f);
            swap_blocks<8>(r); swap_blocks<4>(r); swap_blocks<2>(r); swap_blocks<1>(r);
            const long nn = cols - nb < VW ? cols - nb : VW;
            for (int j = 0; j < nn; ++j) vstore(dst + (nb + j) * ldd + kb, r[j]);
        }
    }
}
