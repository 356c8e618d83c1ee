// handgrad fused training step for the makemore MLP: forward, closed-form backward, SGD, many steps
// per call. The math is model.forward/backward + sgd_update (ops.py) written out once, on padded
// float32 buffers reused across steps. Loaded with ctypes by fast.py; no torch headers.
//
// Shape legend: B batch, T block_size, E n_embd, H n_hidden, V vocab; TE = T*E.
// Padded widths (multiples of the 16-float vector): Hp, Vp, TEp. Pads hold zeros and stay zero
// (padded weights, biases and gains are zero, so padded activations and gradients are zero).
//
// Vectors are GCC vector extensions (vector_size 64): one zmm register with AVX-512, two ymm with
// AVX2; no intrinsics, so -march=native picks the instructions. exp and tanh are vectorised
// Cephes-style polynomials (about 1-2 ulp); no -ffast-math, so NaN/inf propagate and are detected.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "vec.h"

// ---------------------------------------------------------------------------- GEMM
// C[M, NV*16] = init + A @ B. A(m, k) at A[m*am + k*ak] (any strides: it is broadcast), B row k at
// B + k*ldb (contiguous, padded), C row m at C + m*ldc. init: 0 zero, 1 bias row, 2 C itself.
// An MR x NR register tile of accumulators lives across the whole K loop.
template <int MR, int NR>
static inline void tile(int K, const float* A, long am, long ak, const float* B, long ldb, float* C, long ldc,
                        const float* bias, int mode) {
    v16 acc[MR][NR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j)
            acc[i][j] = mode == 0 ? vset1(0.0f) : mode == 1 ? vload(bias + VW * j) : vload(C + i * ldc + VW * j);
    for (int k = 0; k < K; ++k) {
        v16 b[NR];
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) b[j] = vload(B + k * ldb + VW * j);
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
            v16 a = vset1(A[i * am + k * ak]);
#pragma GCC unroll 4
            for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
        }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) vstore(C + i * ldc + VW * j, acc[i][j]);
}

template <int MR, int NR>
static void panel(int M, int K, const float* A, long am, long ak, const float* B, long ldb, float* C, long ldc,
                  const float* bias, int mode) {
    int m = 0;
    for (; m + MR <= M; m += MR) tile<MR, NR>(K, A + m * am, am, ak, B, ldb, C + m * ldc, ldc, bias, mode);
    if constexpr (MR > 1) {
        if (m < M) panel<MR - 1, NR>(M - m, K, A + m * am, am, ak, B, ldb, C + m * ldc, ldc, bias, mode);
    }
}

static void gemm(int M, int NV, int K, const float* A, long am, long ak, const float* B, long ldb, float* C,
                 long ldc, const float* bias, int mode) {
    for (int nv = 0; nv < NV;) {
        int left = NV - nv;
        const float* Bp = B + VW * nv;
        float* Cp = C + VW * nv;
        const float* bp = bias ? bias + VW * nv : nullptr;
        if (left >= 4) { panel<6, 4>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode); nv += 4; }
        else if (left == 3) { panel<7, 3>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode); nv += 3; }
        else if (left == 2) { panel<12, 2>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode); nv += 2; }
        else { panel<16, 1>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode); nv += 1; }
    }
}

// ---------------------------------------------------------------------------- buffers
struct Dims {
    int B, T, E, H, V, TE;
    long Hp, Vp, TEp;
    int R;  // rows per tile: B (everything kept) or the checkpointing tile
    bool ckpt;
};

struct Net {  // padded working copies of the parameters (and the transposes backward needs)
    float *C, *W1, *W1T, *b1, *W2, *W2T, *b2, *g, *bb;
};
struct Grads {
    float *dC, *dW1, *db1, *dW2, *db2, *dg, *dbb;
};
struct Acts {  // rows R each (R = B without checkpointing)
    float* embcat;   // (B, TE) always the whole batch: the checkpoint
    int32_t* y;      // (B,)
    float* raw;      // (R, Hp) hprebn, overwritten by bnraw
    float* h;        // (R, Hp) tanh output
    float* logits;   // (R, Vp) logits, overwritten by dlogits
    float* dh;       // (R, Hp) dh -> dhpreact -> dhprebn, in place
    float* dembcat;  // (R, TEp)
    float *mean, *var, *inv, *tmp;  // (Hp,) batch statistics; tmp for tile statistics
};

struct Arena {
    char* base = nullptr;
    size_t used = 0, cap = 0;
    float* take(size_t nfloat) {
        size_t bytes = (nfloat * sizeof(float) + 63) / 64 * 64;
        float* p = reinterpret_cast<float*>(base + used);
        used += bytes;
        return p;
    }
};

static size_t layout(const Dims& d, Arena& a, Net* n, Grads* g, Acts* s) {
    Net nn; Grads gg; Acts ss;
    if (!n) n = &nn;
    if (!g) g = &gg;
    if (!s) s = &ss;
    long V = d.V, E = d.E, H = d.H, TE = d.TE, B = d.B, R = d.R;
    n->C = a.take(V * E); n->W1 = a.take(TE * d.Hp); n->W1T = a.take(H * d.TEp); n->b1 = a.take(d.Hp);
    n->W2 = a.take(H * d.Vp); n->W2T = a.take(V * d.Hp); n->b2 = a.take(d.Vp);
    n->g = a.take(d.Hp); n->bb = a.take(d.Hp);
    g->dC = a.take(V * E); g->dW1 = a.take(TE * d.Hp); g->db1 = a.take(d.Hp); g->dW2 = a.take(H * d.Vp);
    g->db2 = a.take(d.Vp); g->dg = a.take(d.Hp); g->dbb = a.take(d.Hp);
    s->embcat = a.take(B * TE); s->y = reinterpret_cast<int32_t*>(a.take(B));
    s->raw = a.take(R * d.Hp); s->h = a.take(R * d.Hp); s->logits = a.take(R * d.Vp); s->dh = a.take(R * d.Hp);
    s->dembcat = a.take(R * d.TEp);
    s->mean = a.take(d.Hp); s->var = a.take(d.Hp); s->inv = a.take(d.Hp); s->tmp = a.take(2 * d.Hp);
    return a.used;
}

// ---------------------------------------------------------------------------- pieces of the step
static void gather(const Dims& d, const Net& n, const int64_t* X, const int64_t* Y, const int64_t* ix, Acts& s) {
    for (int b = 0; b < d.B; ++b) {
        int64_t r = ix[b];
        const int64_t* xr = X + r * d.T;
        for (int t = 0; t < d.T; ++t) memcpy(s.embcat + (long)b * d.TE + t * d.E, n.C + xr[t] * d.E, d.E * 4);
        s.y[b] = (int32_t)Y[r];
    }
}

static inline void lin1(const Dims& d, const Net& n, const float* embcat, int rows, float* out) {
    gemm(rows, d.Hp / VW, d.TE, embcat, d.TE, 1, n.W1, d.Hp, out, d.Hp, n.b1, 1);  // hprebn = embcat @ W1 + b1
}

// per-feature mean and M2 (sum of squared deviations) of rows x (rows, Hp): two passes
static void col_mean_m2(const Dims& d, const float* x, int rows, float* mean, float* m2) {
    for (long j = 0; j < d.Hp; j += VW) {
        v16 s = vset1(0.0f);
        for (int b = 0; b < rows; ++b) s += vload(x + b * d.Hp + j);
        v16 mu = s / (float)rows;
        v16 q = vset1(0.0f);
        for (int b = 0; b < rows; ++b) { v16 t = vload(x + b * d.Hp + j) - mu; q += t * t; }
        vstore(mean + j, mu); vstore(m2 + j, q);
    }
}

static void finish_stats(const Dims& d, Acts& s, const float* m2) {
    for (long j = 0; j < d.Hp; j += VW) {
        v16 var = vload(m2 + j) / (float)(d.B - 1);  // Bessel's n-1
        vstore(s.var + j, var);
        v16 sq = var + 1e-5f;
        for (int l = 0; l < VW; ++l) sq[l] = 1.0f / sqrtf(sq[l]);
        vstore(s.inv + j, sq);
    }
}

// bnraw = (hprebn - mean) * inv (in place), h = tanh(gain * bnraw + bias)
static void bn_tanh(const Dims& d, const Net& n, const Acts& s, int rows, float* raw, float* h) {
    for (int b = 0; b < rows; ++b)
        for (long j = 0; j < d.Hp; j += VW) {
            v16 r = (vload(raw + b * d.Hp + j) - vload(s.mean + j)) * vload(s.inv + j);
            vstore(raw + b * d.Hp + j, r);
            vstore(h + b * d.Hp + j, vtanh(vload(n.g + j) * r + vload(n.bb + j)));
        }
}

// softmax cross-entropy fused: returns the summed loss of the rows, turns logits into dlogits
// = (softmax - onehot) / B in place (pads stay 0).
static double cross_entropy(const Dims& d, float* logits, const int32_t* y, int rows) {
    double total = 0.0;
    const float invB = 1.0f / (float)d.B;
    const int nv = (int)(d.Vp / VW);
    for (int b = 0; b < rows; ++b) {
        float* l = logits + b * d.Vp;
        float mx = l[0];
        for (int v = 1; v < d.V; ++v) mx = l[v] > mx || l[v] != l[v] ? l[v] : mx;  // NaN wins
        v16 e[8];  // Vp <= 128 checked at entry
        v16 sum = vset1(0.0f);
        for (int k = 0; k < nv; ++k) {
            v16 x = vexp(vload(l + VW * k) - mx);
            for (int q = 0; q < VW; ++q)
                if (VW * k + q >= d.V) x[q] = 0.0f;
            e[k] = x;
            sum += x;
        }
        float s = 0.0f;
        for (int q = 0; q < VW; ++q) s += sum[q];
        total += (double)(logf(s) - (l[y[b]] - mx));
        float sc = invB / s;
        for (int k = 0; k < nv; ++k) vstore(l + VW * k, e[k] * sc);
        l[y[b]] -= invB;
    }
    return total;
}

static void col_sum_add(const Dims& d, const float* x, long ld, long width, int rows, float* out) {
    for (long j = 0; j < width; j += VW) {
        v16 s = vload(out + j);
        for (int b = 0; b < rows; ++b) s += vload(x + b * ld + j);
        vstore(out + j, s);
    }
}

// dhpreact = (1 - h^2) * dh (in place); dbngain += sum bnraw * dhpreact; dbnbias += sum dhpreact
static void tanh_bn_back1(const Dims& d, const float* raw, const float* h, float* dh, int rows, Grads& g) {
    for (long j = 0; j < d.Hp; j += VW) {
        v16 sg = vload(g.dg + j), sb = vload(g.dbb + j);
        for (int b = 0; b < rows; ++b) {
            long o = b * d.Hp + j;
            v16 hv = vload(h + o);
            v16 dp = (1.0f - hv * hv) * vload(dh + o);
            vstore(dh + o, dp);
            sg += vload(raw + o) * dp;
            sb += dp;
        }
        vstore(g.dg + j, sg); vstore(g.dbb + j, sb);
    }
}

// closed-form batchnorm backward: dhprebn = gain*inv*(dhpreact - dbnbias/n - bnraw*dbngain/(n-1));
// db1 += sum dhprebn
static void bn_back2(const Dims& d, const Net& n, const Acts& s, const float* raw, float* dh, int rows, Grads& g) {
    const float nb = (float)d.B;
    for (long j = 0; j < d.Hp; j += VW) {
        v16 a = vload(n.g + j) * vload(s.inv + j);
        v16 mb = vload(g.dbb + j) / nb, mg = vload(g.dg + j) / (nb - 1.0f);
        v16 sb = vload(g.db1 + j);
        for (int b = 0; b < rows; ++b) {
            long o = b * d.Hp + j;
            v16 dx = a * (vload(dh + o) - mb - vload(raw + o) * mg);
            vstore(dh + o, dx);
            sb += dx;
        }
        vstore(g.db1 + j, sb);
    }
}

static void scatter_dC(const Dims& d, const float* dembcat, const int64_t* X, const int64_t* ix, int rows, Grads& g) {
    for (int b = 0; b < rows; ++b) {
        const int64_t* xr = X + ix[b] * d.T;
        for (int t = 0; t < d.T; ++t) {
            float* dst = g.dC + xr[t] * d.E;
            const float* src = dembcat + b * d.TEp + t * d.E;
            for (int e = 0; e < d.E; ++e) dst[e] += src[e];  // rows used twice get both contributions
        }
    }
}

// idx rows inside [0, n), characters inside [0, V): checked per step on the rows it uses
static bool indices_ok(const Dims& d, const int64_t* X, const int64_t* Y, const int64_t* ix, long n) {
    for (int b = 0; b < d.B; ++b) {
        int64_t r = ix[b];
        if (r < 0 || r >= n || Y[r] < 0 || Y[r] >= d.V) return false;
        for (int t = 0; t < d.T; ++t)
            if (X[r * d.T + t] < 0 || X[r * d.T + t] >= d.V) return false;
    }
    return true;
}

static bool nonfinite(const float* p, long n) {
    v16 acc = vset1(0.0f);
    long i = 0;
    for (; i + VW <= n; i += VW) acc += vload(p + i) * 0.0f;  // inf*0 and NaN*0 are NaN
    float t = 0.0f;
    for (; i < n; ++i) t += p[i] * 0.0f;
    for (int l = 0; l < VW; ++l) t += acc[l];
    return t != t;
}

static void axpy(float* p, const float* g, long n, float lr) {
    long i = 0;
    v16 l = vset1(lr);
    for (; i + VW <= n; i += VW) vstore(p + i, vload(p + i) - l * vload(g + i));
    for (; i < n; ++i) p[i] -= lr * g[i];
}

// One step's loss and gradients into g (zeroed here). Returns the mean loss.
static double forward_backward(const Dims& d, const Net& n, Grads& g, Acts& s, const int64_t* X,
                               const int64_t* Y, const int64_t* ix) {
    const long Hp = d.Hp, Vp = d.Vp;
    memset(g.dC, 0, sizeof(float) * d.V * d.E);  // accumulated into (scatter, column sums)
    memset(g.db1, 0, sizeof(float) * Hp);
    memset(g.db2, 0, sizeof(float) * Vp);
    memset(g.dg, 0, sizeof(float) * Hp);
    memset(g.dbb, 0, sizeof(float) * Hp);
    gather(d, n, X, Y, ix, s);
    double loss = 0.0;
    if (!d.ckpt) {  // every activation of the batch kept
        const int B = d.B;
        lin1(d, n, s.embcat, B, s.raw);                                                   // (B, Hp) hprebn
        col_mean_m2(d, s.raw, B, s.mean, s.tmp);
        finish_stats(d, s, s.tmp);
        bn_tanh(d, n, s, B, s.raw, s.h);                                                  // bnraw, h
        gemm(B, Vp / VW, d.H, s.h, Hp, 1, n.W2, Vp, s.logits, Vp, n.b2, 1);               // (B, Vp) logits
        loss = cross_entropy(d, s.logits, s.y, B);                                        // -> dlogits
        col_sum_add(d, s.logits, Vp, Vp, B, g.db2);                                       // (Vp,)
        gemm(d.H, Vp / VW, B, s.h, 1, Hp, s.logits, Vp, g.dW2, Vp, nullptr, 0);           // (H, Vp) h^T dlogits
        gemm(B, Hp / VW, d.V, s.logits, Vp, 1, n.W2T, Hp, s.dh, Hp, nullptr, 0);          // (B, Hp) dlogits W2^T
        tanh_bn_back1(d, s.raw, s.h, s.dh, B, g);                                         // dhpreact, dg, dbb
        bn_back2(d, n, s, s.raw, s.dh, B, g);                                             // dhprebn, db1
        gemm(d.TE, Hp / VW, B, s.embcat, 1, d.TE, s.dh, Hp, g.dW1, Hp, nullptr, 0);       // (TE, Hp)
        gemm(B, d.TEp / VW, d.H, s.dh, Hp, 1, n.W1T, d.TEp, s.dembcat, d.TEp, nullptr, 0);  // (B, TEp)
        scatter_dC(d, s.dembcat, X, ix, B, g);
        return loss / d.B;
    }
    // Activation checkpointing: only embcat (B, TE) and per-feature statistics are kept for the
    // whole batch; hprebn/bnraw/h/logits/dh are recomputed tile by tile (R rows) when needed.
    // Pass 1: batch statistics, merged per tile (Chan et al.); pass 2: loss, dW2, db2, dbngain,
    // dbnbias; pass 3 (needs the full dbngain/dbnbias): dhprebn, dW1, db1, dC.
    // dW1 and dW2 accumulate over tiles here (the path above overwrites them: init mode 0).
    memset(g.dW1, 0, sizeof(float) * d.TE * Hp);
    memset(g.dW2, 0, sizeof(float) * d.H * Vp);
    float* m2 = s.tmp + Hp;
    memset(s.mean, 0, sizeof(float) * Hp);
    memset(m2, 0, sizeof(float) * Hp);
    long seen = 0;
    for (int r0 = 0; r0 < d.B; r0 += d.R) {
        int rows = d.B - r0 < d.R ? d.B - r0 : d.R;
        lin1(d, n, s.embcat + (long)r0 * d.TE, rows, s.raw);
        col_mean_m2(d, s.raw, rows, s.var, s.inv);  // tile mean, tile M2 (scratch)
        float fa = (float)seen, fb = (float)rows, tot = fa + fb;
        for (long j = 0; j < Hp; j += VW) {
            v16 delta = vload(s.var + j) - vload(s.mean + j);
            vstore(s.mean + j, vload(s.mean + j) + delta * (fb / tot));
            vstore(m2 + j, vload(m2 + j) + vload(s.inv + j) + delta * delta * (fa * fb / tot));
        }
        seen += rows;
    }
    finish_stats(d, s, m2);
    for (int pass = 2; pass <= 3; ++pass) {
        for (int r0 = 0; r0 < d.B; r0 += d.R) {
            int rows = d.B - r0 < d.R ? d.B - r0 : d.R;
            const float* emb = s.embcat + (long)r0 * d.TE;
            lin1(d, n, emb, rows, s.raw);
            bn_tanh(d, n, s, rows, s.raw, s.h);
            gemm(rows, Vp / VW, d.H, s.h, Hp, 1, n.W2, Vp, s.logits, Vp, n.b2, 1);
            double l = cross_entropy(d, s.logits, s.y + r0, rows);
            if (pass == 2) {
                loss += l;
                col_sum_add(d, s.logits, Vp, Vp, rows, g.db2);
                gemm(d.H, Vp / VW, rows, s.h, 1, Hp, s.logits, Vp, g.dW2, Vp, nullptr, 2);
            }
            gemm(rows, Hp / VW, d.V, s.logits, Vp, 1, n.W2T, Hp, s.dh, Hp, nullptr, 0);
            if (pass == 2) {
                tanh_bn_back1(d, s.raw, s.h, s.dh, rows, g);
                continue;
            }
            Grads scratch = g;  // recompute dhpreact without adding to dg/dbb again
            scratch.dg = s.tmp; scratch.dbb = s.tmp + Hp;
            tanh_bn_back1(d, s.raw, s.h, s.dh, rows, scratch);
            bn_back2(d, n, s, s.raw, s.dh, rows, g);
            gemm(d.TE, Hp / VW, rows, emb, 1, d.TE, s.dh, Hp, g.dW1, Hp, nullptr, 2);
            gemm(rows, d.TEp / VW, d.H, s.dh, Hp, 1, n.W1T, d.TEp, s.dembcat, d.TEp, nullptr, 0);
            scatter_dC(d, s.dembcat, X, ix + r0, rows, g);
        }
    }
    return loss / d.B;
}

static void copy_in(const Dims& d, Net& n, const float* C, const float* W1, const float* b1, const float* W2,
                    const float* b2, const float* g, const float* bb) {
    memcpy(n.C, C, sizeof(float) * d.V * d.E);
    for (int k = 0; k < d.TE; ++k) memcpy(n.W1 + k * d.Hp, W1 + (long)k * d.H, sizeof(float) * d.H);
    memcpy(n.b1, b1, sizeof(float) * d.H);
    for (int j = 0; j < d.H; ++j) memcpy(n.W2 + j * d.Vp, W2 + (long)j * d.V, sizeof(float) * d.V);
    memcpy(n.b2, b2, sizeof(float) * d.V);
    memcpy(n.g, g, sizeof(float) * d.H);
    memcpy(n.bb, bb, sizeof(float) * d.H);
}

static void copy_out(const Dims& d, const float* C, const float* W1, const float* b1, const float* W2,
                     const float* b2, const float* g, const float* bb, float* oC, float* oW1, float* ob1,
                     float* oW2, float* ob2, float* og, float* obb) {
    memcpy(oC, C, sizeof(float) * d.V * d.E);
    for (int k = 0; k < d.TE; ++k) memcpy(oW1 + (long)k * d.H, W1 + k * d.Hp, sizeof(float) * d.H);
    memcpy(ob1, b1, sizeof(float) * d.H);
    for (int j = 0; j < d.H; ++j) memcpy(oW2 + (long)j * d.V, W2 + j * d.Vp, sizeof(float) * d.V);
    memcpy(ob2, b2, sizeof(float) * d.V);
    memcpy(og, g, sizeof(float) * d.H);
    memcpy(obb, bb, sizeof(float) * d.H);
}

static bool make_dims(const int* dims, Dims& d) {
    d.B = dims[0]; d.T = dims[1]; d.E = dims[2]; d.H = dims[3]; d.V = dims[4];
    int tile = dims[5];
    if (d.B < 2 || d.T < 1 || d.E < 1 || d.H < 1 || d.V < 2) return false;
    d.TE = d.T * d.E;
    d.Hp = pad16(d.H); d.Vp = pad16(d.V); d.TEp = pad16(d.TE);
    if (d.Vp > 128) return false;
    d.ckpt = tile > 0 && tile < d.B;
    d.R = d.ckpt ? tile : d.B;
    return true;
}

extern "C" {

int hg_abi_version() { return 1; }

// Bytes of working memory hg_steps allocates for these dims (parameters, gradients, activations).
long hg_workspace_bytes(const int* dims) {
    Dims d;
    if (!make_dims(dims, d)) return -1;
    Arena a;
    return (long)layout(d, a, nullptr, nullptr, nullptr) + 64;
}

// K SGD steps in place. dims = {B, T, E, H, V, tile (0: keep all activations), K, n rows of X}.
// params: C (V,E) W1 (TE,H) b1 (H) W2 (H,V) b2 (V) gain (H) bias (H), contiguous float32.
// run_mean/run_var (H) or null. X (n,T) Y (n) idx (K,B) int64; lrs (K) float64; losses (K) out.
// grads_out (null, or K == 1: no update, the gradients written unpadded in the order above).
// Returns -1 on success, k*8 + which (0 loss, 1 dC, 2 dW1, 3 db1, 4 dW2, 5 db2, 6 dbngain,
// 7 dbnbias) at the first non-finite step k (parameters hold the state before that step), or
// -2 (bad dims), -3 (out of memory), -4 (an index out of range; parameters hold the state
// before that step).
long hg_steps(const int* dims, float* C, float* W1, float* b1, float* W2, float* b2, float* gain, float* bias,
              float* run_mean, float* run_var, double momentum, const int64_t* X, const int64_t* Y,
              const int64_t* idx, const double* lrs, double* losses, float* grads_out) {
    Dims d;
    if (!make_dims(dims, d)) return -2;
    const long K = dims[6], nrows = dims[7];
    Arena a;
    size_t bytes = layout(d, a, nullptr, nullptr, nullptr) + 64;
    a.base = static_cast<char*>(aligned_alloc(64, (bytes + 63) / 64 * 64));
    if (!a.base) return -3;
    memset(a.base, 0, bytes);
    a.used = 0;
    Net n; Grads g; Acts s;
    layout(d, a, &n, &g, &s);
    copy_in(d, n, C, W1, b1, W2, b2, gain, bias);
    transpose(n.W1, d.TE, d.H, d.Hp, n.W1T, d.TEp);
    transpose(n.W2, d.H, d.V, d.Vp, n.W2T, d.Hp);
    const float mom = (float)momentum, keep = (float)(1.0 - momentum);
    long status = -1;
    for (long k = 0; k < K; ++k) {
        const int64_t* ix = idx + k * d.B;
        if (!indices_ok(d, X, Y, ix, nrows)) { status = -4; break; }
        double loss = forward_backward(d, n, g, s, X, Y, ix);
        losses[k] = loss;
        int bad = 0;
        // checked in the order backward produces them (Sequential.backward: last layer first)
        if (!std::isfinite(loss)) bad = 0 + 1;
        else if (nonfinite(g.dW2, d.H * d.Vp)) bad = 4 + 1;
        else if (nonfinite(g.db2, d.Vp)) bad = 5 + 1;
        else if (nonfinite(g.dg, d.Hp)) bad = 6 + 1;
        else if (nonfinite(g.dbb, d.Hp)) bad = 7 + 1;
        else if (nonfinite(g.dW1, d.TE * d.Hp)) bad = 2 + 1;
        else if (nonfinite(g.db1, d.Hp)) bad = 3 + 1;
        else if (nonfinite(g.dC, (long)d.V * d.E)) bad = 1 + 1;
        if (grads_out) {  // unpadded, one after the other in the order of the parameters
            float *oC = grads_out, *oW1 = oC + (long)d.V * d.E, *ob1 = oW1 + (long)d.TE * d.H,
                  *oW2 = ob1 + d.H, *ob2 = oW2 + (long)d.H * d.V, *og = ob2 + d.V, *obb = og + d.H;
            copy_out(d, g.dC, g.dW1, g.db1, g.dW2, g.db2, g.dg, g.dbb, oC, oW1, ob1, oW2, ob2, og, obb);
        }
        if (bad) { status = k * 8 + bad - 1; break; }
        if (grads_out) break;  // no update
        const float lr = (float)lrs[k];
        axpy(n.C, g.dC, (long)d.V * d.E, lr);
        axpy(n.W1, g.dW1, d.TE * d.Hp, lr);
        axpy(n.b1, g.db1, d.Hp, lr);
        axpy(n.W2, g.dW2, d.H * d.Vp, lr);
        axpy(n.b2, g.db2, d.Vp, lr);
        axpy(n.g, g.dg, d.Hp, lr);
        axpy(n.bb, g.dbb, d.Hp, lr);
        transpose(n.W1, d.TE, d.H, d.Hp, n.W1T, d.TEp);
        transpose(n.W2, d.H, d.V, d.Vp, n.W2T, d.Hp);
        if (run_mean) {
            for (int j = 0; j < d.H; ++j) {
                run_mean[j] = run_mean[j] * keep + s.mean[j] * mom;
                run_var[j] = run_var[j] * keep + s.var[j] * mom;
            }
        }
    }
    if (!grads_out) copy_out(d, n.C, n.W1, n.b1, n.W2, n.b2, n.g, n.bb, C, W1, b1, W2, b2, gain, bias);
    free(a.base);
    return status;
}

}  // extern "C"
