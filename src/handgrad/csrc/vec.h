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
