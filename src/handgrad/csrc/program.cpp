// handgrad native program: a model's layers compiled by fast.py into a list of ops (embedding, linear
// over leading dims, batchnorm over leading dims, tanh, relu; flatten-consecutive is a reinterpretation
// of the same memory and costs nothing), run for K SGD steps per call on preallocated float32 buffers:
// forward, softmax cross-entropy, closed-form backward, SGD update, running statistics, non-finite
// detection. The math is ops.py's pairs written out once; loaded with ctypes, no torch headers.
// At a large batch the long sums are blocked for the cache and the large products may be split over
// two threads; neither changes the order in which any element is summed. Data-parallel, each rank runs
// its rows of the global batch and a hook (SyncFn) makes the step's collectives (handgrad.engines.parallel).
//
// Every activation is a row-major matrix (rows, ld): all leading dims are rows, the last dim is the row.
// A row holds nseg segments of c floats, segment s starting at s*segstride (nseg 1 unless flattened):
// Linear outputs are padded to segstride = pad16(c) with zero pads, so flattening a padded tensor leaves
// zero columns between segments, and the next Linear's padded weight copy has zero rows there. Pads of
// parameters, activations and gradients are zero and stay zero.
//
// Vectors are GCC vector extensions (vector_size 64: one zmm register with AVX-512, two ymm with AVX2);
// no intrinsics, so -march=native picks the instructions. exp and tanh are vectorised Cephes-style
// polynomials (about 1-2 ulp); no -ffast-math, so NaN/inf propagate and are detected.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <thread>

#include "vec.h"

// ---------------------------------------------------------------------------- GEMM
// C[M, N] = init + A @ B. A(m, k) at A[m*am + k*ak] (any strides: it is broadcast one float at a time),
// B row k at B + k*ldb (contiguous, readable up to pad16(N)), C row m at C + m*ldc. init: 0 zero,
// 1 bias row (readable up to pad16(N)), 2 C itself. Only the N columns are written (the last vector
// of a row may be partial: lastw floats). An MR x NR register tile of accumulators lives across the
// whole K loop.
template <int MR, int NR>
static inline void tile(int K, const float* A, long am, long ak, const float* B, long ldb, float* C, long ldc,
                        const float* bias, int mode, int lastw) {
    v16 acc[MR][NR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
        for (int j = 0; j < NR; ++j) {
            const float* c = C + i * ldc + VW * j;
            acc[i][j] = mode == 0 ? vset1(0.0f) : mode == 1 ? vload(bias + VW * j)
                        : (j == NR - 1 && lastw < VW) ? vload_n(c, lastw) : vload(c);
        }
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
        for (int j = 0; j < NR; ++j) {
            float* c = C + i * ldc + VW * j;
            if (j == NR - 1 && lastw < VW) vstore_n(c, acc[i][j], lastw);
            else vstore(c, acc[i][j]);
        }
}

template <int MR, int NR>
static void panel(int M, int K, const float* A, long am, long ak, const float* B, long ldb, float* C, long ldc,
                  const float* bias, int mode, int lastw) {
    int m = 0;
    for (; m + MR <= M; m += MR) tile<MR, NR>(K, A + m * am, am, ak, B, ldb, C + m * ldc, ldc, bias, mode, lastw);
    if constexpr (MR > 1) {
        if (m < M) panel<MR - 1, NR>(M - m, K, A + m * am, am, ak, B, ldb, C + m * ldc, ldc, bias, mode, lastw);
    }
}

static void gemm_kblock(int M, int N, int K, const float* A, long am, long ak, const float* B, long ldb,
                        float* C, long ldc, const float* bias, int mode);

// Long sums (dW = x^T dout at a large batch: K = rows) run in blocks of KC: each block's strips of A
// and B stay in cache while every tile of C uses them, and C is reloaded between blocks, so every
// element is still summed in the same order.
static const int KC = 256;

static void gemm(int M, int N, int K, const float* A, long am, long ak, const float* B, long ldb, float* C,
                 long ldc, const float* bias, int mode) {
    for (int k0 = 0; k0 < K || k0 == 0; k0 += KC) {
        const int kc = K - k0 < KC ? K - k0 : KC;
        gemm_kblock(M, N, kc, A + k0 * ak, am, ak, B + k0 * ldb, ldb, C, ldc, bias, k0 == 0 ? mode : 2);
    }
}

static void gemm_kblock(int M, int N, int K, const float* A, long am, long ak, const float* B, long ldb,
                        float* C, long ldc, const float* bias, int mode) {
    const int NV = (N + VW - 1) / VW, tail = N - (NV - 1) * VW;
    for (int nv = 0; nv < NV;) {
        int left = NV - nv;
        const float* Bp = B + VW * nv;
        float* Cp = C + VW * nv;
        const float* bp = bias ? bias + VW * nv : nullptr;
        int step = left >= 4 ? 4 : left;
        int lw = nv + step == NV ? tail : VW;
        if (step == 4) panel<6, 4>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode, lw);
        else if (step == 3) panel<7, 3>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode, lw);
        else if (step == 2) panel<12, 2>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode, lw);
        else panel<16, 1>(M, K, A, am, ak, Bp, ldb, Cp, ldc, bp, mode, lw);
        nv += step;
    }
}

// ---------------------------------------------------------------------------- profile
// Optional per-phase CPU time of the calling thread (hg_program_profile): off by default, one branch
// per phase when off; on, each phase costs a clock_gettime system call or two.
enum Phase { P_EMBED, P_LINEAR, P_BN, P_ACT, P_LOSS, P_DW, P_DX, P_BN_B, P_ACT_B, P_EMBED_B, P_SGD, P_OTHER,
             NPHASE };
static int prof_on = 0;
static double prof_ns[NPHASE];
static inline double now_ns() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);  // CPU time: a shared core does not inflate it
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}
struct Timed {  // adds the scope's wall time to its phase
    int ph; double t0;
    explicit Timed(int p) : ph(p), t0(prof_on ? now_ns() : 0.0) {}
    ~Timed() { if (prof_on) prof_ns[ph] += now_ns() - t0; }
};

// Products of at least this many multiply-adds are split over two threads (when allowed): about
// 100 us of one core, against the tens of microseconds that starting and joining a thread costs.
static const double PAR_MIN_MACS = 8.0 * (1 << 20);

// gemm, with C's rows split between this thread and one more when threads == 2 and the product is
// large. Every element is summed in the same order either way, so the results are bit-identical.
static void pgemm(int threads, int M, int N, int K, const float* A, long am, long ak, const float* B, long ldb,
                  float* C, long ldc, const float* bias, int mode) {
    if (threads < 2 || M < 12 || (double)M * N * K < PAR_MIN_MACS) {
        gemm(M, N, K, A, am, ak, B, ldb, C, ldc, bias, mode);
        return;
    }
    const int half = (M / 2 + 5) / 6 * 6;  // a multiple of the 6-row register tile
    std::thread other([=] { gemm(M - half, N, K, A + half * am, am, ak, B, ldb, C + half * ldc, ldc, bias, mode); });
    gemm(half, N, K, A, am, ak, B, ldb, C, ldc, bias, mode);
    other.join();
}

// ---------------------------------------------------------------------------- the program
enum Kind { EMBED = 1, LINEAR = 2, BATCHNORM = 3, TANH = 4, RELU = 5, BN_TANH = 6 };
enum ParamKind { TABLE = 1, WEIGHT = 2, BIAS = 3, FEATURE = 4 };

struct Tensor {
    long rpe;            // rows per example (rows of a tile of R examples: R * rpe)
    int nseg, c, segstride;
    long ld;             // nseg * segstride
    int alias;           // -1, or the tensor whose memory this one reinterprets (flatten)
    float *x, *g;        // activation and gradient, R * rpe rows of ld
};

struct Param {
    int kind;
    long n0, n1;          // logical shape (n0 rows of n1; a vector is 1 x n)
    int nseg, c, segstride;  // the layout its rows (WEIGHT) or features (FEATURE) map onto
    long prow, ld;        // physical rows and row stride of the padded copy
    long ldT;             // WEIGHT: row stride of the transposed copy (n1 rows)
    float *user, *w, *wt, *grad;
    long map(long k) const { return (k / c) * segstride + k % c; }
};

struct Op {
    int kind, in, out, p0, p1;  // tensors in/out; parameters (-1: none)
    float *run_mean, *run_var;  // BATCHNORM/BN_TANH: running statistics (logical, may be null)
    float eps, momentum;
    float* raw;                  // BATCHNORM/BN_TANH: bnraw (rows of the input's ld); may be the input itself
    float *mean, *var, *inv, *m2;  // (ld,) batch statistics; m2 merges tiles
    float *sum_g, *sum_b;        // (ld,) backward sums: sum dout*bnraw (dbngain) and sum dout (dbnbias)
    float* db_below;             // BATCHNORM/BN_TANH: the bias gradient of the Linear below, summed with dx
    bool db_above;               // LINEAR: its bias gradient is summed by the batchnorm above it
};

// Data-parallel hook (null in one process): the collectives of a step among `ranks` processes, made
// by the caller (handgrad.engines.parallel, over torch.distributed). It only moves floats; the maths stays
// here. buf holds n floats:
//   SYNC_STATS: all-gather: out (ranks, n) receives every rank's buf in rank order (batchnorm mean|M2);
//   SYNC_SUMS:  all-reduce (sum) in place, out null (batchnorm backward sums), *started* only: the
//               step computes what does not need the sums, then SYNC_WAIT (buf null) waits for it;
//   SYNC_GRADS: all-reduce (sum) in place, out null ([loss share, every gradient]).
// Returns 0, or non-zero when a collective failed (the step stops; the caller raises its error).
enum SyncWhat { SYNC_STATS = 0, SYNC_SUMS = 1, SYNC_GRADS = 2, SYNC_WAIT = 3 };
typedef int (*SyncFn)(int what, float* buf, long n, float* out);

static bool is_batchnorm(const Op& o) { return o.kind == BATCHNORM || o.kind == BN_TANH; }

struct Prog {
    int B, T, K, R, nt, nop, np;
    int ranks, rank, BG;         // processes, this one, examples of the global batch (B * ranks)
    SyncFn sync;                 // null in one process
    float* gathered;             // (ranks, 2 * ld) of the widest batchnorm: every rank's mean|M2
    struct Counted* counted;     // the first batchnorm's statistics from counts (and deferred), or null
    bool count;                  // counted asked for in one process (data-parallel: always tried)
    int threads;                 // 1, or 2: large matrix products are split over two threads
    long nrows;
    bool tiled;
    Tensor* t;
    Op* op;
    Param* p;
    int* check;                  // parameter indices in the order gradients are checked
    int32_t* y;                  // (R,) targets of the current tile
};

// Float buffers are carved from one allocation. parse() runs twice: with base null to add up the
// bytes (the pointers it hands out are then offsets and never used), then on the real allocation.
struct Arena {
    char* base = nullptr;
    size_t used = 0;
    float* take(size_t nfloat) {
        size_t bytes = (nfloat * sizeof(float) + 63) / 64 * 64;
        float* q = reinterpret_cast<float*>(base + used);
        used += bytes;
        return q;
    }
};

// Descriptor layout (int64), written by fast.py:
//   header: B, T, K, nrows, R (examples per tile; R >= B: no recomputation), nt, nop, np, threads,
//           ranks, rank (data-parallel processes, each with B examples of the global batch of B * ranks:
//           idx holds the global batch, this process takes columns rank*B .. rank*B + B-1),
//           count (1: the first batchnorm counted and deferred in one process too; data-parallel always)
//   nt tensors:  rpe, nseg, c, segstride, alias
//   nop ops:     kind, in, out, p0, p1, bn (this batchnorm's index: eps/momentum in fdesc, buffers)
//   np params:   kind, n0, n1, op (the op whose input layout the rows/features map onto)
//   np entries:  the order in which gradients are checked
static const int HDR = 12, TW = 5, OW = 6, PW = 4;

static bool parse(const int64_t* d, const double* fd, float** params, float** bufs, Prog& g, Arena& a) {
    g.B = (int)d[0]; g.T = (int)d[1]; g.K = (int)d[2]; g.nrows = d[3];
    g.R = d[4] > 0 && d[4] < g.B ? (int)d[4] : g.B;
    g.tiled = g.R < g.B;
    g.nt = (int)d[5]; g.nop = (int)d[6]; g.np = (int)d[7];
    g.threads = d[8] > 1 ? 2 : 1;
    g.ranks = d[9] >= 1 && d[9] <= 65536 ? (int)d[9] : 0;
    g.rank = d[10] >= 0 && d[10] < g.ranks ? (int)d[10] : 0;
    g.BG = d[0] * d[9] <= (1L << 30) ? g.B * g.ranks : 0;
    if (d[10] != g.rank) return false;
    g.sync = nullptr;
    g.gathered = nullptr;
    g.counted = nullptr;
    g.count = d[11] != 0;
    if (g.B < 1 || g.BG < 2 || g.T < 1 || g.K < 0 || g.nt < 1 || g.nop < 2 || g.np < 1 || g.nt > 4096 || g.nop > 4096
        || g.np > 4096)
        return false;
    const int64_t* td = d + HDR;
    const int64_t* od = td + TW * g.nt;
    const int64_t* pd = od + OW * g.nop;
    const int64_t* cd = pd + PW * g.np;
    const long R = g.R;
    g.y = reinterpret_cast<int32_t*>(a.take(g.B));
    for (int i = 0; i < g.nt; ++i) {
        Tensor& t = g.t[i];
        t.rpe = td[TW * i]; t.nseg = (int)td[TW * i + 1]; t.c = (int)td[TW * i + 2];
        t.segstride = (int)td[TW * i + 3]; t.alias = (int)td[TW * i + 4];
        t.ld = (long)t.nseg * t.segstride;
        if (t.rpe < 1 || t.nseg < 1 || t.c < 1 || t.segstride < t.c || t.alias >= i) return false;
        if (t.alias >= 0) {
            const Tensor& s = g.t[t.alias];
            if (t.rpe * t.ld != s.rpe * s.ld) return false;
            t.x = s.x; t.g = s.g;
        } else {
            t.x = a.take(R * t.rpe * t.ld + VW);
            t.g = a.take(R * t.rpe * t.ld + VW);
        }
    }
    for (int i = 0; i < g.nop; ++i) {
        Op& o = g.op[i];
        o.kind = (int)od[OW * i]; o.in = (int)od[OW * i + 1]; o.out = (int)od[OW * i + 2];
        o.p0 = (int)od[OW * i + 3]; o.p1 = (int)od[OW * i + 4];
        long bn = od[OW * i + 5];
        if (o.out < 0 || o.out >= g.nt || o.in >= g.nt || o.p0 >= g.np || o.p1 >= g.np) return false;
        if ((i == 0) != (o.kind == EMBED) || (o.kind != EMBED && o.in < 0)) return false;  // indices first
        o.run_mean = o.run_var = nullptr;
        o.raw = nullptr;
        o.db_below = nullptr;
        o.db_above = false;
        const bool bnorm = o.kind == BATCHNORM || o.kind == BN_TANH;
        if ((o.kind == EMBED || o.kind == LINEAR || bnorm) && o.p0 < 0) return false;
        if (bnorm && o.p1 < 0) return false;
        if ((bnorm || o.kind == TANH || o.kind == RELU) && g.t[o.in].ld % VW) return false;  // whole vectors
        if (!bnorm) continue;
        if (bn < 0) return false;
        o.eps = (float)fd[2 * bn]; o.momentum = (float)fd[2 * bn + 1];
        if (bufs) { o.run_mean = bufs[2 * bn]; o.run_var = bufs[2 * bn + 1]; }
        const Tensor& in = g.t[o.in];
        // bnraw overwrites a Linear's output in place (nothing else reads it); else its own buffer
        int src = o.in;
        while (g.t[src].alias >= 0) src = g.t[src].alias;
        bool inplace = false;
        for (int j = 0; j < i; ++j) {
            int dst = g.op[j].out;
            while (g.t[dst].alias >= 0) dst = g.t[dst].alias;
            if (g.op[j].kind == LINEAR && dst == src) inplace = true;
        }
        o.raw = inplace ? in.x : a.take(R * in.rpe * in.ld);
        o.mean = a.take(2 * in.ld); o.m2 = o.mean + in.ld;  // one buffer each: one collective each
        o.var = a.take(in.ld); o.inv = a.take(in.ld);
        o.sum_g = a.take(2 * in.ld); o.sum_b = o.sum_g + in.ld;
    }
    const Tensor& last = g.t[g.op[g.nop - 1].out];
    if (last.rpe != 1 || last.nseg != 1 || last.ld % VW) return false;  // logits (B, V)
    for (int i = 0; i < g.np; ++i) {
        Param& p = g.p[i];
        p.kind = (int)pd[PW * i]; p.n0 = pd[PW * i + 1]; p.n1 = pd[PW * i + 2];
        long opi = pd[PW * i + 3];
        if (opi < 0 || opi >= g.nop || p.n0 < 1 || p.n1 < 1) return false;
        p.user = params ? params[i] : nullptr;
        const Tensor* in = g.op[opi].in >= 0 ? &g.t[g.op[opi].in] : nullptr;
        p.nseg = in ? in->nseg : 1; p.c = in ? in->c : (int)p.n1; p.segstride = in ? in->segstride : (int)p.n1;
        p.ldT = 0;
        p.wt = nullptr;
        if (p.kind == TABLE) { p.prow = p.n0; p.ld = p.n1; }
        else if (p.kind == WEIGHT) {
            p.prow = (long)(p.nseg - 1) * p.segstride + p.c; p.ld = pad16(p.n1); p.ldT = pad16(p.prow);
            if ((long)p.nseg * p.c != p.n0) return false;
        } else if (p.kind == BIAS) { p.prow = 1; p.ld = pad16(p.n1); }
        else if (p.kind == FEATURE) {
            p.prow = 1; p.ld = in ? in->ld : 0;
            if (!in || p.n0 != 1 || (long)p.nseg * p.c != p.n1) return false;
        } else return false;
        p.w = a.take(p.prow * p.ld + VW);
        p.grad = a.take(p.prow * p.ld + VW);
        if (p.kind == WEIGHT) p.wt = a.take(p.n1 * p.ldT + VW);
    }
    for (int i = 0; i < g.nop; ++i) {  // each op's output layout follows from its input and parameters
        const Op& o = g.op[i];
        const Tensor& out = g.t[o.out];
        if (o.kind == EMBED && (g.p[o.p0].kind != TABLE || out.rpe != g.T || out.nseg != 1 || out.c != g.p[o.p0].n1))
            return false;
        if (o.kind == LINEAR) {
            const Param& W = g.p[o.p0];
            if (W.kind != WEIGHT || out.rpe != g.t[o.in].rpe || out.nseg != 1 || out.c != W.n1
                || out.segstride != pad16(W.n1) || (o.p1 >= 0 && (g.p[o.p1].kind != BIAS || g.p[o.p1].n1 != W.n1)))
                return false;
        }
        if (o.kind != EMBED && o.kind != LINEAR) {
            const Tensor& in = g.t[o.in];
            if (out.rpe != in.rpe || out.nseg != in.nseg || out.c != in.c || out.segstride != in.segstride)
                return false;
        }
    }
    for (int i = 0; i < g.np; ++i) {
        if (cd[i] < 0 || cd[i] >= g.np) return false;
        g.check[i] = (int)cd[i];
    }
    // An elementwise op (batchnorm, tanh, relu) writes its input's gradient over its output's, in place
    // (one buffer streamed instead of two), unless another tensor reinterprets that input's memory.
    for (int i = 1; i < g.nop; ++i) {
        const Op& o = g.op[i];
        if (o.kind == LINEAR || g.t[o.in].alias >= 0) continue;
        bool viewed = false;
        for (int j = 0; j < g.nt; ++j) viewed = viewed || g.t[j].alias == o.in;
        if (!viewed) g.t[o.in].g = g.t[o.out].g;
    }
    for (int i = 1; i < g.nop; ++i) {  // a Linear with a bias right below a batchnorm: db summed with dx
        Op &o = g.op[i], &below = g.op[i - 1];
        if (is_batchnorm(o) && below.kind == LINEAR && below.p1 >= 0 && below.out == o.in) {
            o.db_below = g.p[below.p1].grad;
            below.db_above = true;
        }
    }
    return true;
}

// The metadata arrays of a descriptor (nt, nop, np read from its header), zeroed; false if too large.
static bool alloc_meta(const int64_t* d, Prog& g) {
    long nt = d[5], nop = d[6], np = d[7];
    if (nt < 1 || nop < 1 || np < 1 || nt > 4096 || nop > 4096 || np > 4096) return false;
    g.t = static_cast<Tensor*>(calloc(nt, sizeof(Tensor)));
    g.op = static_cast<Op*>(calloc(nop, sizeof(Op)));
    g.p = static_cast<Param*>(calloc(np, sizeof(Param)));
    g.check = static_cast<int*>(calloc(np, sizeof(int)));
    return g.t && g.op && g.p && g.check;
}

static void free_meta(Prog& g) { free(g.t); free(g.op); free(g.p); free(g.check); }

// ---------------------------------------------------------------------------- parameters
// wt (n1, ldT) = w^T over the prow x n1 block (vec.h's transpose)
static void transpose(const Param& p) { transpose(p.w, p.prow, p.n1, p.ld, p.wt, p.ldT); }

// logical element (r, j) of a parameter <-> its place in the padded copy
static inline long place(const Param& p, long r, long j) {
    if (p.kind == WEIGHT) return p.map(r) * p.ld + j;
    if (p.kind == FEATURE) return p.map(j);
    return r * p.ld + j;
}

static void copy_in(const Param& p) {
    for (long r = 0; r < p.n0; ++r)
        for (long j = 0; j < p.n1; ++j) p.w[place(p, r, j)] = p.user[r * p.n1 + j];
    if (p.kind == WEIGHT) transpose(p);
}

static void copy_out(const Param& p, const float* src, float* dst) {
    for (long r = 0; r < p.n0; ++r)
        for (long j = 0; j < p.n1; ++j) dst[r * p.n1 + j] = src[place(p, r, j)];
}

static bool grad_nonfinite(const Param& p) {  // x*0 is NaN iff x is NaN or inf; logical elements only
    float t = 0.0f;
    if (p.kind == WEIGHT) {
        for (long r = 0; r < p.n0; ++r) {
            const float* row = p.grad + p.map(r) * p.ld;
            v16 acc = vset1(0.0f);
            long j = 0;
            for (; j + VW <= p.n1; j += VW) acc += vload(row + j) * 0.0f;
            if (j < p.n1) acc += vload_n(row + j, (int)(p.n1 - j)) * 0.0f;
            for (int l = 0; l < VW; ++l) t += acc[l];
        }
        return t != t;
    }
    for (long r = 0; r < p.n0; ++r)
        for (long j = 0; j < p.n1; ++j) t += p.grad[place(p, r, j)] * 0.0f;
    return t != t;
}

static void sgd(const Param& p, float lr) {
    long n = p.prow * p.ld;
    v16 l = vset1(lr);
    long i = 0;
    for (; i + VW <= n; i += VW) vstore(p.w + i, vload(p.w + i) - l * vload(p.grad + i));
    for (; i < n; ++i) p.w[i] -= lr * p.grad[i];
    if (p.kind == WEIGHT) transpose(p);
}

// ---------------------------------------------------------------------------- forward ops
// Each op works on the rows of one tile: e0 is the tile's first example, ne its examples.
static bool embed_forward(const Prog& g, const Op& o, const int64_t* X, const int64_t* ix, int ne) {
    const Param& C = g.p[o.p0];
    const Tensor& out = g.t[o.out];
    const long E = C.n1;
    for (int b = 0; b < ne; ++b) {
        const int64_t* xr = X + ix[b] * g.T;
        for (int t = 0; t < g.T; ++t) {
            int64_t v = xr[t];
            if (v < 0 || v >= C.n0) return false;
            memcpy(out.x + ((long)b * g.T + t) * out.ld, C.w + v * E, sizeof(float) * E);
        }
    }
    return true;
}

static void linear_forward(const Prog& g, const Op& o, int ne) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const Param& W = g.p[o.p0];
    const float* bias = o.p1 >= 0 ? g.p[o.p1].w : nullptr;
    pgemm(g.threads, (int)(ne * in.rpe), (int)W.n1, (int)W.prow, in.x, in.ld, 1, W.w, W.ld, out.x, out.ld, bias, bias ? 1 : 0);
}

// per-column mean and M2 (sum of squared deviations) of rows x (rows, ld): two passes
// Column loops run over chunks of RCH rows (one chunk of a few arrays stays in L2 while every
// column visits it) with the running sums stored between chunks: each column is still summed row
// after row, so a large batch gives the same floats as one pass would.
static const long RCH = 64;

static void col_mean_m2(const float* x, long rows, long ld, float* mean, float* m2) {
    for (long j = 0; j < ld; j += VW) vstore(m2 + j, vset1(0.0f));
    for (long r0 = 0; r0 < rows; r0 += RCH) {  // m2 holds the column sums for now
        const long r1 = rows - r0 < RCH ? rows : r0 + RCH;
        for (long j = 0; j < ld; j += VW) {
            v16 s = vload(m2 + j);
            for (long r = r0; r < r1; ++r) s += vload(x + r * ld + j);
            vstore(m2 + j, s);
        }
    }
    for (long j = 0; j < ld; j += VW) { vstore(mean + j, vload(m2 + j) / (float)rows); vstore(m2 + j, vset1(0.0f)); }
    for (long r0 = 0; r0 < rows; r0 += RCH) {
        const long r1 = rows - r0 < RCH ? rows : r0 + RCH;
        for (long j = 0; j < ld; j += VW) {
            v16 mu = vload(mean + j), q = vload(m2 + j);
            for (long r = r0; r < r1; ++r) { v16 d = vload(x + r * ld + j) - mu; q += d * d; }
            vstore(m2 + j, q);
        }
    }
}

static void finish_stats(const Op& o, long ld, long n) {
    for (long j = 0; j < ld; j += VW) {
        v16 var = vload(o.m2 + j) / (float)(n - 1);  // Bessel's n-1
        vstore(o.var + j, var);
        v16 sq = var + o.eps;
        for (int l = 0; l < VW; ++l) sq[l] = 1.0f / sqrtf(sq[l]);
        vstore(o.inv + j, sq);
    }
}

// Chan et al.'s merge of a tile's mean/M2 (tm, tq over nb rows) into the running (mean, m2) over na rows
static void merge_stats(const Op& o, long ld, const float* tm, const float* tq, long na, long nb) {
    float fa = (float)na, fb = (float)nb, tot = fa + fb;
    for (long j = 0; j < ld; j += VW) {
        v16 delta = vload(tm + j) - vload(o.mean + j);
        vstore(o.mean + j, vload(o.mean + j) + delta * (fb / tot));
        vstore(o.m2 + j, vload(o.m2 + j) + vload(tq + j) + delta * delta * (fa * fb / tot));
    }
}

// Data-parallel: this rank's mean|M2 over its `rows` rows (every rank has as many) -> those of every
// rank's rows: all-gathered, then merged in rank order (so every rank gets the same floats).
static bool sync_stats(const Prog& g, const Op& o, long ld, long rows) {
    if (g.sync(SYNC_STATS, o.mean, 2 * ld, g.gathered)) return false;
    memcpy(o.mean, g.gathered, sizeof(float) * 2 * ld);  // rank 0's mean and M2
    for (int r = 1; r < g.ranks; ++r) {
        const float* q = g.gathered + r * 2 * ld;
        merge_stats(o, ld, q, q + ld, r * rows, rows);
    }
    return true;
}

// ---------------------------------------------------------------------------- the first batchnorm, counted
// Data-parallel, the batchnorm at op 2 whose input is a Linear (op 1) of embedding rows (op 0, through
// flattens: every preset) needs no collective for its statistics. Every rank knows the whole global
// batch's indices, and the Linear is affine in its input rows x (D = nseg * E features, segment s of
// row r of example i being C[X[i, r*nseg + s]]), so over the N rows of the global batch
//     mean(x W + b) = mean(x) W + b,        M2(x W)_j = W_j^T M2(x) W_j,
// and mean(x), M2(x) (D x D) follow from counts of characters per segment and of pairs per two
// segments of a row: sum x_(s,e) = sum_v cnt_s[v] C[v,e], sum x_(s,e) x_(s',e') = sum_(v,v')
// pair_(s,s')[v,v'] C[v,e] C[v',e']. In double: M2 = sum x x^T - N mean mean^T loses nothing there.
// One process can ask for it too (header `count`): with the deferred backward below, the mlp's tiled step
// is then one pass over tiles that stay in the cache (no statistics pass, nothing recomputed).
struct Counted {
    long V, E, nseg, rpe, D;
    int32_t *cnt, *pair;         // (nseg, V), (nseg, nseg, V, V): s < s' used
    uint8_t* X8;                 // (nrows, T) X in bytes (V <= 254; 255: outside the vocabulary), or null
    double *mu, *M, *Q;          // (D), (D, D), (V, E) scratch
    double *Wd, *MW;             // (D, n1): the first Linear's weight (logical rows) and M W, this step
    double *K, *y, *u, *beta, *gamma;  // the deferred backward (below): (D, D), (D), (D), (n1), (n1)
    float* WaT;                  // (n1, ldT): W^T with row j scaled by gain_j * inv_j, this step
    float* xmu;                  // (ld): the float mean of the rows x in their layout (pads 0), this step
};

static const long COUNTED_MAX = 1L << 22;  // pair counts; a larger vocabulary or row uses the collective

// Whether op 2 is such a batchnorm (and its counts fit); the sizes in c.
static bool counted_shape(const Prog& g, Counted& c) {
    if (g.nop < 3 || g.op[0].kind != EMBED || g.op[1].kind != LINEAR || !is_batchnorm(g.op[2])) return false;
    int src = g.op[1].in;
    while (g.t[src].alias >= 0) src = g.t[src].alias;
    const Tensor& x = g.t[g.op[1].in];
    const Param& C = g.p[g.op[0].p0];
    if (src != g.op[0].out || g.op[2].in != g.op[1].out || x.c != C.n1 || x.rpe * x.nseg != g.T) return false;
    c.V = C.n0; c.E = C.n1; c.nseg = x.nseg; c.rpe = x.rpe; c.D = c.nseg * c.E;
    return c.nseg * c.nseg * c.V * c.V <= COUNTED_MAX;
}

// The counts of the global batch gix (BG examples); false for a row outside X or a character outside the
// vocabulary.
// Every rank reads every example of the global batch here, at random rows of X: from the byte copy X8
// when there is one (8x smaller than X, it stays in the cache).
template <typename Id>
static bool count_ids(const Prog& g, Counted& c, const Id* X, const int64_t* gix) {
    const long V = c.V, S = c.nseg;
    memset(c.cnt, 0, sizeof(int32_t) * S * V);
    memset(c.pair, 0, sizeof(int32_t) * S * S * V * V);
    const long ahead = 64;  // rows: the example's characters are fetched this far ahead (random rows of X)
    for (long b = 0; b < g.BG; ++b) {
        if (b + ahead < g.BG && (uint64_t)gix[b + ahead] < (uint64_t)g.nrows)
            __builtin_prefetch(X + gix[b + ahead] * g.T);
        if (gix[b] < 0 || gix[b] >= g.nrows) return false;  // another rank's row (this rank's are checked)
        for (long r = 0; r < c.rpe; ++r) {
            const Id* p = X + gix[b] * g.T + r * S;  // the row's nseg characters
            for (long s = 0; s < S; ++s) {
                if (p[s] < 0 || (long)p[s] >= V) return false;
                c.cnt[s * V + p[s]]++;
                for (long t = s + 1; t < S; ++t) c.pair[((s * S + t) * V + p[s]) * V + p[t]]++;
            }
        }
    }
    return true;
}

static bool count_rows(const Prog& g, Counted& c, const int64_t* X, const int64_t* gix) {
    return c.X8 ? count_ids(g, c, c.X8, gix) : count_ids(g, c, X, gix);
}

// mean and M2 of the batchnorm's input over the global batch, from the counts (see above).
static void counted_stats(const Prog& g, Counted& c, const Op& bn) {
    const Param& C = g.p[g.op[0].p0];
    const Op& lin = g.op[1];
    const Param& W = g.p[lin.p0];
    const long V = c.V, E = c.E, S = c.nseg, D = c.D;
    const double N = (double)g.BG * c.rpe;
    for (long s = 0; s < S; ++s)
        for (long e = 0; e < E; ++e) {
            double m = 0.0;
            for (long v = 0; v < V; ++v) m += c.cnt[s * V + v] * (double)C.w[v * E + e];
            c.mu[s * E + e] = m / N;
        }
    for (long s = 0; s < S; ++s)
        for (long t = s; t < S; ++t) {
            // Q (V, E) = pair_(s,t) C (or diag(cnt_s) C when t == s); block (s, t) = C^T Q
            for (long v = 0; v < V; ++v)
                for (long e = 0; e < E; ++e) {
                    double q = 0.0;
                    if (t == s) q = c.cnt[s * V + v] * (double)C.w[v * E + e];
                    else
                        for (long w = 0; w < V; ++w) q += c.pair[((s * S + t) * V + v) * V + w] * (double)C.w[w * E + e];
                    c.Q[v * E + e] = q;
                }
            for (long e = 0; e < E; ++e)
                for (long f = 0; f < E; ++f) {
                    double m = 0.0;
                    for (long v = 0; v < V; ++v) m += (double)C.w[v * E + e] * c.Q[v * E + f];
                    m -= N * c.mu[s * E + e] * c.mu[t * E + f];
                    c.M[(s * E + e) * D + t * E + f] = m;
                    c.M[(t * E + f) * D + s * E + e] = m;
                }
        }
    const float* b = lin.p1 >= 0 ? g.p[lin.p1].w : nullptr;
    const long n1 = W.n1;
    for (long k = 0; k < D; ++k)
        for (long j = 0; j < n1; ++j) c.Wd[k * n1 + j] = W.w[W.map(k) * W.ld + j];
    for (long k = 0; k < D; ++k) {  // MW = M Wd
        double* row = c.MW + k * n1;
        for (long j = 0; j < n1; ++j) row[j] = 0.0;
        for (long l = 0; l < D; ++l) {
            const double m = c.M[k * D + l];
            const double* w = c.Wd + l * n1;
            for (long j = 0; j < n1; ++j) row[j] += m * w[j];
        }
    }
    for (long j = 0; j < n1; ++j) {
        double mean = b ? (double)b[j] : 0.0, m2 = 0.0;
        for (long k = 0; k < D; ++k) {
            mean += c.mu[k] * c.Wd[k * n1 + j];
            m2 += c.Wd[k * n1 + j] * c.MW[k * n1 + j];
        }
        bn.mean[j] = (float)mean;
        bn.m2[j] = (float)(m2 > 0.0 ? m2 : 0.0);
    }
}

// The first batchnorm's statistics from the counts (its mean, var, inv), and what the deferred backward
// (below) reads at every tile of this step: the rows' mean in their layout, W^T scaled by gain * inv.
static void counted_first_bn(const Prog& g, Counted& c, const Op& bn) {
    const Tensor& in = g.t[bn.in];
    const Param& W = g.p[g.op[1].p0];
    const float* gain = g.p[bn.p0].w;
    counted_stats(g, c, bn);
    finish_stats(bn, in.ld, (long)g.BG * in.rpe);
    const Tensor& x = g.t[g.op[1].in];
    for (long k = 0; k < x.ld; ++k) c.xmu[k] = 0.0f;
    for (long k = 0; k < c.D; ++k) c.xmu[W.map(k)] = (float)c.mu[k];
    for (long j = 0; j < W.n1; ++j) {
        const float a = gain[j] * bn.inv[j];
        for (long k = 0; k < W.ldT; ++k) c.WaT[j * W.ldT + k] = a * W.wt[j * W.ldT + k];
    }
}

// ---------------------------------------------------------------------------- the first batchnorm's backward, deferred
// Data-parallel with counted statistics, the first batchnorm's backward sums need no collective of their
// own either: they are dbngain and dbnbias, which travel in the gradient all-reduce anyway, and what is
// left of the backward below them (dx of the batchnorm, dW and db of the first Linear, dC) is linear in
// this rank's dpre plus terms that need only the global sums and the counts. With the global sums
// sg = sum dpre*bnraw, sb = sum dpre over N rows, a = gain*inv, and the closed form (bnraw_i =
// ((x_i - mu) W + r) * inv, r = mu W + b - mean: zero up to rounding, mu the float mean of the rows x):
//     dx_i = a*dpre_i - beta - ((x_i - mu) W) * gamma,   gamma = a*inv*sg/(N-1),  beta = a*sb/N + gamma*r,
// so, with P = sum_i (x_i - mu)^T dpre_i (each rank's rows, summed by the all-reduce), d = mean - mu
// (double minus float: the rows' exact mean sum_i (x_i - mu) = N d) and M2(x) from the counts,
//     db = sum_i dx_i = -N gamma * (r + d W)
//     dW = a*P - N d beta^T - (M2 + N d d^T) W * gamma + mu db^T
//     dC[v] (segment s) = sum over the rows holding v there of dx_i W^T = (a*dpre_i) W^T (each rank's
//         rows, scattered and all-reduced) + cnt_s[v] u - (S_sv - cnt_s[v] mu) K, u = -W beta,
//         K = W diag(gamma) W^T, S_sv = sum of those rows x_i (from the pair counts)
// (Ioffe & Szegedy 2015 for the batchnorm backward; the rest is its linearity.) The mlp's step then has
// one collective: the gradients.

// Before the all-reduce, on this rank's rows (or a tile of them): dW <- P (+= over tiles; the rows x
// centred in place: nothing reads them after this), dx <- (a*dpre) W^T into the embedding's gradient and
// scattered into dC; db stays 0.
static void deferred_local(const Prog& g, Counted& c, int ne) {
    const Op &bn = g.op[2], &lin = g.op[1];
    const Tensor &in = g.t[lin.in], &mid = g.t[bn.out];
    const Param& W = g.p[lin.p0];
    const long rows = (long)ne * in.rpe;
    {
        Timed tm(P_DW);
        for (long r = 0; r < rows; ++r)
            for (long k = 0; k < in.ld; ++k) in.x[r * in.ld + k] -= c.xmu[k];
        pgemm(g.threads, (int)W.prow, (int)W.n1, (int)rows, in.x, 1, in.ld, mid.g, mid.ld, W.grad, W.ld, nullptr,
              g.tiled ? 2 : 0);  // tiles add up
    }
    Timed tm(P_DX);
    pgemm(g.threads, (int)rows, (int)W.prow, (int)W.n1, mid.g, mid.ld, 1, c.WaT, W.ldT, in.g, in.ld, nullptr, 0);
}

// After the all-reduce: gain.grad and bias.grad hold the global sg and sb, W.grad the global P, dC the
// global scattered (a*dpre) W^T; the terms above that need the global sums are added (in double).
static void deferred_finish(const Prog& g, Counted& c) {
    const Op &bn = g.op[2], &lin = g.op[1];
    const Param &W = g.p[lin.p0], &C = g.p[g.op[0].p0], &gain = g.p[bn.p0], &bias = g.p[bn.p1];
    const float* b = lin.p1 >= 0 ? g.p[lin.p1].w : nullptr;
    const long V = c.V, E = c.E, S = c.nseg, D = c.D, n1 = W.n1;
    const double N = (double)g.BG * c.rpe;
    double* d = c.y;  // (D) mean - mu: the double mean minus the float one the rows were centred by
    for (long k = 0; k < D; ++k) d[k] = c.mu[k] - (double)(float)c.mu[k];
    for (long j = 0; j < n1; ++j) {
        const long f = gain.map(j);
        const double a = (double)(gain.w[f] * bn.inv[f]), inv = bn.inv[f];
        double r = (b ? (double)b[j] : 0.0) - (double)bn.mean[f], dw = 0.0;  // r: mu W + b - mean
        for (long k = 0; k < D; ++k) {
            r += (double)(float)c.mu[k] * c.Wd[k * n1 + j];
            dw += d[k] * c.Wd[k * n1 + j];
        }
        const double gamma = a * inv * (double)gain.grad[f] / (N - 1.0);
        const double beta = a * (double)bias.grad[bias.map(j)] / N + gamma * r;
        const double db = -N * gamma * (r + dw);
        c.gamma[j] = gamma;
        c.beta[j] = beta;
        if (lin.p1 >= 0) g.p[lin.p1].grad[j] = (float)db;
        for (long k = 0; k < D; ++k) {  // dW column j; (M2 + N d d^T) W = MW + N d (d W)
            float* p = W.grad + W.map(k) * W.ld + j;
            const double mw = c.MW[k * n1 + j] + N * d[k] * dw;
            *p = (float)(a * (double)*p - N * d[k] * beta - mw * gamma + (double)(float)c.mu[k] * db);
        }
    }
    for (long k = 0; k < D; ++k) {  // u = -W beta, K = W diag(gamma) W^T
        const double* wk = c.Wd + k * n1;
        double s = 0.0;
        for (long j = 0; j < n1; ++j) s -= wk[j] * c.beta[j];
        c.u[k] = s;
        for (long l = 0; l <= k; ++l) {
            const double* wl = c.Wd + l * n1;
            double q = 0.0;
            for (long j = 0; j < n1; ++j) q += wk[j] * c.gamma[j] * wl[j];
            c.K[k * D + l] = c.K[l * D + k] = q;
        }
    }
    for (long s = 0; s < S; ++s)
        for (long v = 0; v < V; ++v) {
            const double n = c.cnt[s * V + v];
            if (n == 0.0) continue;  // no row holds v in segment s
            for (long t = 0; t < S; ++t)  // y = S_sv - n mu: the rows' sum, centred
                for (long e = 0; e < E; ++e) {
                    double q = 0.0;
                    if (t == s) q = n * (double)C.w[v * E + e];
                    else if (t > s)
                        for (long x = 0; x < V; ++x) q += c.pair[((s * S + t) * V + v) * V + x] * (double)C.w[x * E + e];
                    else
                        for (long x = 0; x < V; ++x) q += c.pair[((t * S + s) * V + x) * V + v] * (double)C.w[x * E + e];
                    c.y[t * E + e] = q - n * (double)(float)c.mu[t * E + e];
                }
            for (long e = 0; e < E; ++e) {
                const long k = s * E + e;
                double q = n * c.u[k];
                for (long l = 0; l < D; ++l) q -= c.y[l] * c.K[l * D + k];
                C.grad[v * C.ld + e] += (float)q;
            }
        }
}

// bnraw = (x - mean) * inv; then out = gain * bnraw + bias, or h = tanh(gain * bnraw + bias)
static void bn_apply(const Prog& g, const Op& o, int ne) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const float *gain = g.p[o.p0].w, *bias = g.p[o.p1].w;
    const long rows = ne * in.rpe, ld = in.ld;
    const bool th = o.kind == BN_TANH;
    for (long r = 0; r < rows; ++r)
        for (long j = 0; j < ld; j += VW) {
            long q = r * ld + j;
            v16 raw = (vload(in.x + q) - vload(o.mean + j)) * vload(o.inv + j);
            vstore(o.raw + q, raw);
            v16 y = vload(gain + j) * raw + vload(bias + j);
            vstore(out.x + q, th ? vtanh(y) : y);
        }
}

static void act_forward(const Prog& g, const Op& o, int ne) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const long n = ne * in.rpe * in.ld;
    for (long i = 0; i < n; i += VW) {
        v16 x = vload(in.x + i);
        vstore(out.x + i, o.kind == TANH ? vtanh(x) : (x > 0.0f ? x : vset1(0.0f)));
    }
}

// softmax cross-entropy fused: returns the summed loss of the rows and writes dlogits =
// (softmax - onehot) / BG into the gradient buffer (pads 0): the mean is over the global batch.
static double cross_entropy(const Prog& g, const Tensor& t, const int32_t* y, int ne) {
    Timed tm(P_LOSS);
    double total = 0.0;
    const float invB = 1.0f / (float)g.BG;
    const int V = t.c;
    const int nv = (V + VW - 1) / VW, tail = V - (nv - 1) * VW;
    for (int b = 0; b < ne; ++b) {
        const float* l = t.x + b * t.ld;
        float* d = t.g + b * t.ld;
        float mx = l[0];
        for (int v = 1; v < V; ++v) mx = l[v] > mx || l[v] != l[v] ? l[v] : mx;  // NaN wins
        v16 sum = vset1(0.0f);
        for (int k = 0; k < nv; ++k) {
            v16 x = vexp(vload(l + VW * k) - mx);
            if (k == nv - 1)
                for (int q = tail; q < VW; ++q) x[q] = 0.0f;
            vstore(d + VW * k, x);
            sum += x;
        }
        float s = 0.0f;
        for (int q = 0; q < VW; ++q) s += sum[q];
        total += (double)(logf(s) - (l[y[b]] - mx));
        float sc = invB / s;
        for (int k = 0; k < nv; ++k) vstore(d + VW * k, vload(d + VW * k) * sc);
        d[y[b]] -= invB;
    }
    return total;
}

// ---------------------------------------------------------------------------- backward ops
static void col_sum_add(const float* x, long ld, long width, long rows, float* out) {
    for (long r0 = 0; r0 < rows; r0 += RCH) {
        const long r1 = rows - r0 < RCH ? rows : r0 + RCH;
        for (long j = 0; j < width; j += VW) {
            v16 s = vload(out + j);
            for (long r = r0; r < r1; ++r) s += vload(x + r * ld + j);
            vstore(out + j, s);
        }
    }
}

// db += sum dout; dW (=, or += when accumulating over tiles) x^T dout; dx = dout W^T
static void linear_backward(const Prog& g, const Op& o, int ne, bool grads, bool need_dx) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const Param& W = g.p[o.p0];
    const int rows = (int)(ne * in.rpe);
    if (grads) {
        Timed tm(P_DW);
        if (o.p1 >= 0 && !o.db_above) col_sum_add(out.g, out.ld, pad16(W.n1), rows, g.p[o.p1].grad);
        pgemm(g.threads, (int)W.prow, (int)W.n1, rows, in.x, 1, in.ld, out.g, out.ld, W.grad, W.ld, nullptr, g.tiled ? 2 : 0);
    }
    Timed tm(P_DX);
    if (need_dx) pgemm(g.threads, rows, (int)W.prow, (int)W.n1, out.g, out.ld, 1, W.wt, W.ldT, in.g, in.ld, nullptr, 0);
}

// dpre = dout (batchnorm) or (1 - h^2) * dout (tanh fused; in place); sums of dpre * bnraw and dpre
static void bn_back_sums(const Prog& g, const Op& o, int ne, float* sg, float* sb) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const long rows = ne * in.rpe, ld = in.ld;
    const bool th = o.kind == BN_TANH;
    for (long r0 = 0; r0 < rows; r0 += RCH) {
        const long r1 = rows - r0 < RCH ? rows : r0 + RCH;
        for (long j = 0; j < ld; j += VW) {
            v16 a = vload(sg + j), b = vload(sb + j);
            for (long r = r0; r < r1; ++r) {
                long q = r * ld + j;
                v16 dp = vload(out.g + q);
                if (th) { v16 h = vload(out.x + q); dp = (1.0f - h * h) * dp; vstore(out.g + q, dp); }
                a += vload(o.raw + q) * dp;
                b += dp;
            }
            vstore(sg + j, a); vstore(sb + j, b);
        }
    }
}

// closed-form batchnorm backward over n rows (all tiles): dx = gain*inv*(dpre - sum_b/n - bnraw*sum_g/(n-1));
// db (the Linear below's bias gradient, or null) += column sums of dx in the same pass (row after row:
// col_sum_add's order)
static void bn_back_dx(const Prog& g, const Op& o, int ne, long n, float* db_below) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const float* gain = g.p[o.p0].w;
    const long rows = ne * in.rpe, ld = in.ld;
    const float fn = (float)n;
    for (long r0 = 0; r0 < rows; r0 += RCH) {
        const long r1 = rows - r0 < RCH ? rows : r0 + RCH;
        for (long j = 0; j < ld; j += VW) {
            v16 a = vload(gain + j) * vload(o.inv + j);
            v16 mb = vload(o.sum_b + j) / fn, mg = vload(o.sum_g + j) / (fn - 1.0f);
            v16 db = db_below ? vload(db_below + j) : vset1(0.0f);
            for (long r = r0; r < r1; ++r) {
                long q = r * ld + j;
                v16 dx = a * (vload(out.g + q) - mb - vload(o.raw + q) * mg);
                vstore(in.g + q, dx);
                db += dx;
            }
            if (db_below) vstore(db_below + j, db);
        }
    }
}

static void act_backward(const Prog& g, const Op& o, int ne) {
    const Tensor &in = g.t[o.in], &out = g.t[o.out];
    const long n = ne * in.rpe * in.ld;
    for (long i = 0; i < n; i += VW) {
        v16 y = vload(out.x + i), d = vload(out.g + i);
        vstore(in.g + i, o.kind == TANH ? (1.0f - y * y) * d : (y > 0.0f ? d : vset1(0.0f)));
    }
}

static void embed_backward(const Prog& g, const Op& o, const int64_t* X, const int64_t* ix, int ne) {
    const Param& C = g.p[o.p0];
    const Tensor& out = g.t[o.out];
    const long E = C.n1;
    for (int b = 0; b < ne; ++b) {
        const int64_t* xr = X + ix[b] * g.T;
        for (int t = 0; t < g.T; ++t) {
            float* dst = C.grad + xr[t] * E;
            const float* src = out.g + ((long)b * g.T + t) * out.ld;
            for (long e = 0; e < E; ++e) dst[e] += src[e];  // rows used twice get both contributions
        }
    }
}

// ---------------------------------------------------------------------------- one step
// Batchnorm forward modes: INLINE computes the statistics of these rows (the whole batch) and
// normalises; ACCUM merges this tile's statistics and stops the pass; APPLY uses the stored ones.
enum BNMode { INLINE, ACCUM, APPLY };

// What a step can stop on (besides non-finite values, checked after it).
enum StepStatus { OK = 0, BAD_INDEX = 1, SYNC_FAILED = 2 };

// Forward over ops [0, upto) on one tile; at op `upto` (a batchnorm, when upto < nop) the tile's
// statistics are merged. INLINE statistics are over the global batch when data-parallel (g.sync).
static StepStatus forward(const Prog& g, const int64_t* X, const int64_t* ix, int ne, int upto, BNMode mode,
                          long seen) {
    for (int i = 0; i < g.nop && i <= upto; ++i) {
        const Op& o = g.op[i];
        switch (o.kind) {
            case EMBED: { Timed tm(P_EMBED); if (!embed_forward(g, o, X, ix, ne)) return BAD_INDEX; break; }
            case LINEAR: { Timed tm(P_LINEAR); linear_forward(g, o, ne); break; }
            case TANH: case RELU: { Timed tm(P_ACT); act_forward(g, o, ne); break; }
            case BATCHNORM: case BN_TANH: {
                Timed tm(P_BN);
                const Tensor& in = g.t[o.in];
                const long rows = ne * in.rpe;
                if (i == upto && mode == ACCUM) {  // tile statistics into sum_g/sum_b (scratch), merged
                    col_mean_m2(in.x, rows, in.ld, o.sum_g, o.sum_b);
                    merge_stats(o, in.ld, o.sum_g, o.sum_b, seen * in.rpe, rows);
                    return OK;
                }
                if (mode == INLINE && i == 2 && g.counted) {
                    counted_first_bn(g, *g.counted, o);  // data-parallel, no collective
                } else if (mode == INLINE) {
                    col_mean_m2(in.x, rows, in.ld, o.mean, o.m2);
                    if (g.sync && !sync_stats(g, o, in.ld, rows)) return SYNC_FAILED;
                    finish_stats(o, in.ld, (long)g.BG * in.rpe);
                }
                bn_apply(g, o, ne);
                break;
            }
        }
    }
    return OK;
}

// Backward from the loss down to op `lo` (inclusive). Parameter gradients are accumulated only for
// ops in [lo, hi); a batchnorm at hi is passed through with its stored sums; the batchnorm at lo (when
// accumulating, tiled) only adds its sums and stops. INLINE (one tile = the batch) does it all at once,
// the sums over the global batch when data-parallel: the dW and db of the Linear above a batchnorm
// (which do not need its sums) are computed while the sums travel. false: a collective failed.
static bool backward(const Prog& g, const int64_t* X, const int64_t* ix, int ne, int lo, int hi, BNMode mode) {
    const long nB = g.BG;
    int pending = -1;  // a Linear whose dW, db wait for the batchnorm below it (data-parallel)
    for (int i = g.nop - 1; i >= lo; --i) {
        const Op& o = g.op[i];
        const bool grads = i < hi;
        switch (o.kind) {
            case EMBED: { Timed tm(P_EMBED_B); if (grads) embed_backward(g, o, X, ix, ne); break; }
            case LINEAR:
                if (g.sync && mode == INLINE && grads && i > 0 && is_batchnorm(g.op[i - 1])) {
                    linear_backward(g, o, ne, false, true);  // dx now
                    pending = i;
                } else {
                    linear_backward(g, o, ne, grads, i > 0);
                }
                break;
            case TANH: case RELU: { Timed tm(P_ACT_B); act_backward(g, o, ne); break; }
            case BATCHNORM: case BN_TANH: {
                Timed tm(P_BN_B);
                const Tensor& in = g.t[o.in];
                const long n = nB * in.rpe;
                Param &gain = g.p[o.p0], &bias = g.p[o.p1];
                if (mode == INLINE) {
                    memset(o.sum_g, 0, sizeof(float) * in.ld);
                    memset(o.sum_b, 0, sizeof(float) * in.ld);
                    bn_back_sums(g, o, ne, o.sum_g, o.sum_b);
                    memcpy(gain.grad, o.sum_g, sizeof(float) * in.ld);  // this rank's share
                    memcpy(bias.grad, o.sum_b, sizeof(float) * in.ld);
                    if (i == 2 && g.counted) {  // the rest waits for the gradient all-reduce (above)
                        if (pending >= 0) linear_backward(g, g.op[pending], ne, true, false);
                        deferred_local(g, *g.counted, ne);
                        Timed te(P_EMBED_B);
                        embed_backward(g, g.op[0], X, ix, ne);
                        return true;
                    }
                    if (g.sync) {
                        if (g.sync(SYNC_SUMS, o.sum_g, 2 * in.ld, nullptr)) return false;  // started
                        if (pending >= 0) linear_backward(g, g.op[pending], ne, true, false);
                        pending = -1;
                        if (g.sync(SYNC_WAIT, nullptr, 0, nullptr)) return false;
                    }
                    bn_back_dx(g, o, ne, n, i - 1 >= lo && i - 1 < hi ? o.db_below : nullptr);
                } else if (i == lo && mode == ACCUM) {
                    bn_back_sums(g, o, ne, gain.grad, bias.grad);  // dbngain, dbnbias accumulate
                    if (i == 2 && g.counted) {  // deferred: this tile's part of what lies below
                        deferred_local(g, *g.counted, ne);
                        Timed te(P_EMBED_B);
                        embed_backward(g, g.op[0], X, ix, ne);
                    }
                    return true;
                } else {
                    if (o.kind == BN_TANH) {  // recompute dpre in place (the sums are already known)
                        const Tensor& out = g.t[o.out];
                        const long m = ne * in.rpe * in.ld;
                        for (long q = 0; q < m; q += VW) {
                            v16 h = vload(out.x + q);
                            vstore(out.g + q, (1.0f - h * h) * vload(out.g + q));
                        }
                    }
                    bn_back_dx(g, o, ne, n, i - 1 >= lo && i - 1 < hi ? o.db_below : nullptr);
                }
                break;
            }
        }
    }
    return true;
}

static bool indices_ok(const Prog& g, const int64_t* Y, const int64_t* ix, long V) {
    for (int b = 0; b < g.B; ++b) {
        int64_t r = ix[b];
        if (r < 0 || r >= g.nrows || Y[r] < 0 || Y[r] >= V) return false;
    }
    return true;
}

// One step's mean loss (this rank's share: its rows' losses over BG), gradients in the params' grad
// buffers (this rank's shares when data-parallel). gix: the global batch (ix is this rank's part).
static StepStatus step(const Prog& g, const int64_t* X, const int64_t* Y, const int64_t* ix, const int64_t* gix,
                       double* loss) {
    const Tensor& last = g.t[g.op[g.nop - 1].out];
    // The embedding gradient is scattered (+=); biases of Linear and dW over tiles accumulate.
    for (int i = 0; i < g.np; ++i)
        if (g.p[i].kind == TABLE || g.p[i].kind == BIAS || g.tiled)
            memset(g.p[i].grad, 0, sizeof(float) * g.p[i].prow * g.p[i].ld);
    if (!g.tiled) {
        for (int b = 0; b < g.B; ++b) g.y[b] = (int32_t)Y[ix[b]];
        if (g.counted && !count_rows(g, *g.counted, X, gix)) return BAD_INDEX;
        StepStatus st = forward(g, X, ix, g.B, g.nop, INLINE, 0);
        if (st != OK) return st;
        *loss = cross_entropy(g, last, g.y, g.B) / g.BG;
        return backward(g, X, ix, g.B, 0, g.nop, INLINE) ? OK : SYNC_FAILED;
    }
    // Activation checkpointing: only per-feature statistics and sums are kept for the whole batch;
    // every activation is recomputed tile by tile (R examples) from the indices. One pass per
    // batchnorm for its statistics (the ones below it already known), then one backward pass per
    // batchnorm from the top (each needs the full sums of the one above it), then a last pass to the
    // embedding: the price of keeping nothing is these passes.
    int bns[64], nbn = 0;
    for (int i = 0; i < g.nop; ++i)
        if (g.op[i].kind == BATCHNORM || g.op[i].kind == BN_TANH) {
            if (nbn == 64) return BAD_INDEX;  // parse() allows at most 4096 ops; fast.py fewer than 64 batchnorms
            bns[nbn++] = i;
        }
    // Counted (data-parallel, or asked for in one process), the first batchnorm's statistics come from the
    // counts and its backward is deferred: no statistics pass for it and no last pass below it (for the
    // mlp: one pass in all).
    const int first = g.counted ? 1 : 0;
    if (g.counted) {
        if (!count_rows(g, *g.counted, X, gix)) return BAD_INDEX;
        counted_first_bn(g, *g.counted, g.op[bns[0]]);
    }
    for (int l = first; l < nbn; ++l) {
        const Op& o = g.op[bns[l]];
        const long ld = g.t[o.in].ld;
        memset(o.mean, 0, sizeof(float) * ld);
        memset(o.m2, 0, sizeof(float) * ld);
        for (int e0 = 0; e0 < g.B; e0 += g.R) {
            int ne = g.B - e0 < g.R ? g.B - e0 : g.R;
            StepStatus st = forward(g, X, ix + e0, ne, bns[l], ACCUM, e0);
            if (st != OK) return st;
        }
        const long rows = (long)g.B * g.t[o.in].rpe;
        if (g.sync && !sync_stats(g, o, ld, rows)) return SYNC_FAILED;
        finish_stats(o, ld, (long)g.BG * g.t[o.in].rpe);
    }
    int hi = g.nop;
    double total = 0.0;
    for (int l = nbn; l >= first; --l) {
        int lo = l > 0 ? bns[l - 1] : 0;
        for (int e0 = 0; e0 < g.B; e0 += g.R) {
            int ne = g.B - e0 < g.R ? g.B - e0 : g.R;
            for (int b = 0; b < ne; ++b) g.y[b] = (int32_t)Y[ix[e0 + b]];
            forward(g, X, ix + e0, ne, g.nop, APPLY, 0);
            double s = cross_entropy(g, last, g.y, ne);
            if (l == nbn) total += s;
            backward(g, X, ix + e0, ne, lo, hi, l > 0 ? ACCUM : APPLY);  // no collective when tiled
        }
        if (l > first) {  // the batchnorm at lo now has its full sums: its gradients, and what dx needs
            const Op& o = g.op[lo];
            const long ld = g.t[o.in].ld;
            memcpy(o.sum_g, g.p[o.p0].grad, sizeof(float) * ld);
            memcpy(o.sum_b, g.p[o.p1].grad, sizeof(float) * ld);
            if (g.sync && (g.sync(SYNC_SUMS, o.sum_g, 2 * ld, nullptr) || g.sync(SYNC_WAIT, nullptr, 0, nullptr)))
                return SYNC_FAILED;
        }
        hi = lo;
    }
    *loss = total / g.BG;
    return OK;
}

// Data-parallel: [loss share, every gradient] summed over the ranks in one collective (flat: 1 + the
// logical elements of every parameter), written back into the padded gradient buffers.
static bool sync_grads(const Prog& g, double* loss, float* flat, long n) {
    flat[0] = (float)*loss;
    float* o = flat + 1;
    for (int i = 0; i < g.np; ++i) { copy_out(g.p[i], g.p[i].grad, o); o += g.p[i].n0 * g.p[i].n1; }
    if (g.sync(SYNC_GRADS, flat, n, nullptr)) return false;
    *loss = flat[0];
    o = flat + 1;
    for (int i = 0; i < g.np; ++i) {
        const Param& p = g.p[i];
        for (long r = 0; r < p.n0; ++r)
            for (long j = 0; j < p.n1; ++j) p.grad[place(p, r, j)] = o[r * p.n1 + j];
        o += p.n0 * p.n1;
    }
    return true;
}

// ---------------------------------------------------------------------------- entry points
// Bytes of the arena for this descriptor, 0 if it is invalid.
static size_t workspace(const int64_t* d, const double* fd) {
    Prog g{};
    Arena a;
    size_t bytes = alloc_meta(d, g) && parse(d, fd, nullptr, nullptr, g, a) ? a.used + 64 : 0;
    free_meta(g);
    return bytes;
}

extern "C" {

int hg_program_abi() { return 4; }

// The size (multiply-adds) from which a product is split over two threads when allowed.
double hg_program_par_min_macs() { return PAR_MIN_MACS; }

// The core's FMA throughput: `iters` rounds of 12 independent vector FMA chains (12 * 16 * 2 FLOP a
// round), enough chains to cover the FMA latency on every pipe; the caller times it. Returns a sum
// of the accumulators so nothing is optimised away.
double hg_fma_loop(long iters) {
    v16 acc[12];
    for (int i = 0; i < 12; ++i) acc[i] = vset1(1.0f + i * 1e-3f);
    const v16 a = vset1(0.999999f), c = vset1(1e-7f);
    for (long n = 0; n < iters; ++n)
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) acc[i] = acc[i] * a + c;
    double s = 0.0;
    for (int i = 0; i < 12; ++i)
        for (int l = 0; l < VW; ++l) s += acc[i][l];
    return s;
}

// Per-phase profile: on != 0 starts it (zeroed); out (NPHASE doubles) receives the nanoseconds so far.
// P_OTHER is the whole step (every phase included). Returns NPHASE.
int hg_program_profile(int on, double* out) {
    if (out) memcpy(out, prof_ns, sizeof prof_ns);
    if (on && !prof_on) memset(prof_ns, 0, sizeof prof_ns);
    prof_on = on;
    return NPHASE;
}

// Bytes hg_program_steps allocates for this program (padded parameters, gradients, activations); 0 if
// the descriptor is invalid.
long hg_program_bytes(const int64_t* desc, const double* fdesc) { return (long)workspace(desc, fdesc); }

// K SGD steps in place. desc/fdesc: the program (see parse). params[i]: the i-th parameter, contiguous
// float32 of its logical shape; bufs[2j], bufs[2j+1]: running mean and variance of batchnorm j (or null).
// X (nrows, T) Y (nrows) idx (K, B) int64; lrs (K) float64; losses (K) out. grads_out: null, or (K == 1)
// no update and every parameter's gradient written unpadded, one after the other.
// sync: null in one process; data-parallel, the collectives (SyncFn above): idx then holds each step's
// global batch of B * ranks (this process takes its columns), and the losses are the global mean losses.
// Returns -1 on success; at the first non-finite step k: k * (np + 1) + 0 for the loss, + 1 + i for
// the i-th parameter's gradient (in the check order), parameters holding the state before that step;
// -2 bad descriptor; -3 out of memory; -4 - 2k: an index out of range at step k (the state before it);
// -5 - 2k: a collective failed at step k (the state before it).
long hg_program_steps(const int64_t* desc, const double* fdesc, float** params, float** bufs, const int64_t* X,
                      const int64_t* Y, const int64_t* idx, const double* lrs, double* losses, float* grads_out,
                      SyncFn sync) {
    size_t bytes = workspace(desc, fdesc);
    if (!bytes) return -2;
    Arena a;
    a.base = static_cast<char*>(aligned_alloc(64, (bytes + 63) / 64 * 64));
    Prog g{};
    if (!a.base || !alloc_meta(desc, g)) { free(a.base); free_meta(g); return -3; }
    memset(a.base, 0, bytes);
    parse(desc, fdesc, params, bufs, g, a);
    g.sync = sync;
    long nflat = 1, widest = 0;
    for (int i = 0; i < g.np; ++i) nflat += g.p[i].n0 * g.p[i].n1;
    for (int i = 0; i < g.nop; ++i)
        if (g.op[i].kind == BATCHNORM || g.op[i].kind == BN_TANH) widest = std::max(widest, g.t[g.op[i].in].ld);
    float* flat = sync ? static_cast<float*>(malloc(sizeof(float) * nflat)) : nullptr;
    g.gathered = sync ? static_cast<float*>(malloc(sizeof(float) * (g.ranks * 2 * widest + 1))) : nullptr;
    if (sync && (!flat || !g.gathered)) { free(flat); free(g.gathered); free(a.base); free_meta(g); return -3; }
    Counted counted{};
    if ((sync || g.count) && counted_shape(g, counted)) {
        const long S = counted.nseg, V = counted.V, D = counted.D;
        counted.cnt = static_cast<int32_t*>(malloc(sizeof(int32_t) * S * V));
        counted.pair = static_cast<int32_t*>(malloc(sizeof(int32_t) * S * S * V * V));
        const Param& W = g.p[g.op[1].p0];
        const long ld = g.t[g.op[1].in].ld;
        counted.mu = static_cast<double*>(malloc(sizeof(double) * (2 * D * D + 3 * D + V * counted.E + 2 * W.n1
                                                                   + 2 * D * W.n1)));
        counted.WaT = static_cast<float*>(aligned_alloc(64, (sizeof(float) * (W.n1 * W.ldT + VW) + 63) / 64 * 64));
        counted.xmu = static_cast<float*>(malloc(sizeof(float) * ld));
        if (V <= 254) {  // X in bytes, 255 for a value outside the vocabulary (count_rows refuses it)
            counted.X8 = static_cast<uint8_t*>(malloc(g.nrows * g.T));
            for (long i = 0; counted.X8 && i < g.nrows * g.T; ++i)
                counted.X8[i] = X[i] >= 0 && X[i] < V ? (uint8_t)X[i] : 255;
        }
        if (counted.cnt && counted.pair && counted.mu && counted.WaT && counted.xmu && (V > 254 || counted.X8)) {
            counted.M = counted.mu + D;
            counted.Q = counted.M + D * D;
            counted.K = counted.Q + V * counted.E;
            counted.y = counted.K + D * D;
            counted.u = counted.y + D;
            counted.beta = counted.u + D;
            counted.gamma = counted.beta + W.n1;
            counted.Wd = counted.gamma + W.n1;
            counted.MW = counted.Wd + D * W.n1;
            g.counted = &counted;
        }
    }
    for (int i = 0; i < g.np; ++i) copy_in(g.p[i]);
    const Tensor& last = g.t[g.op[g.nop - 1].out];
    long status = -1;
    for (long k = 0; k < g.K; ++k) {
        const int64_t* gix = idx + k * g.BG;  // the global batch; this process's part:
        const int64_t* ix = gix + (long)g.rank * g.B;
        double loss = 0.0;
        Timed tstep(P_OTHER);
        if (!indices_ok(g, Y, ix, last.c)) { status = -4 - 2 * k; break; }
        StepStatus st = step(g, X, Y, ix, gix, &loss);
        if (st == OK && sync && !sync_grads(g, &loss, flat, nflat)) st = SYNC_FAILED;
        if (st == OK && g.counted) deferred_finish(g, *g.counted);
        if (st != OK) { status = (st == BAD_INDEX ? -4 : -5) - 2 * k; break; }
        losses[k] = loss;
        int bad = -1;
        if (!std::isfinite(loss)) bad = 0;
        for (int c = 0; c < g.np && bad < 0; ++c)
            if (grad_nonfinite(g.p[g.check[c]])) bad = 1 + g.check[c];
        if (grads_out) {
            float* o = grads_out;
            for (int i = 0; i < g.np; ++i) { copy_out(g.p[i], g.p[i].grad, o); o += g.p[i].n0 * g.p[i].n1; }
        }
        if (bad >= 0) { status = k * (g.np + 1) + bad; break; }
        if (grads_out) break;  // no update
        const float lr = (float)lrs[k];
        Timed tm(P_SGD);
        for (int i = 0; i < g.np; ++i) sgd(g.p[i], lr);
        for (int i = 0; i < g.nop; ++i) {
            const Op& o = g.op[i];
            if (!o.run_mean || (o.kind != BATCHNORM && o.kind != BN_TANH)) continue;
            const Param& gain = g.p[o.p0];
            const float m = o.momentum, keep = 1.0f - o.momentum;
            for (long f = 0; f < gain.n1; ++f) {
                long j = gain.map(f);
                o.run_mean[f] = o.run_mean[f] * keep + o.mean[j] * m;
                o.run_var[f] = o.run_var[f] * keep + o.var[j] * m;
            }
        }
    }
    if (!grads_out)
        for (int i = 0; i < g.np; ++i) copy_out(g.p[i], g.p[i].w, g.p[i].user);
    free(flat);
    free(g.gathered);
    free(counted.cnt);
    free(counted.pair);
    free(counted.mu);
    free(counted.WaT);
    free(counted.xmu);
    free(counted.X8);
    free(a.base);
    free_meta(g);
    return status;
}

}  // extern "C"
