// Selective scan for training: forward that keeps a state checkpoint every TT steps, and its backward.
// Built on first use by ssamba/ops/train_scan.py with nvcc for the local GPU and called through
// ctypes on torch's current stream.
//
//   h_t[c, n] = a_t[c, n] h_{t-1}[c, n] + dt_t[c] u_t[c] B_t[g(c), n],   a_t = exp(dt_t[c] A[c, n])
//   y_t[c]    = sum_n C_t[g(c), n] h_t[c, n] + D[c] u_t[c],              dt = softplus(delta + bias)
//
// One thread owns one channel of one sequence segment (a block is 32 channels of one B/C group, one
// warp) and keeps its N states in registers, stepping through time; tiles of TT steps go through shared
// memory so that the global loads and stores are coalesced.
//
// Segments. One thread per channel walking the whole sequence leaves most of the card idle at training
// sizes (tens of thousands of channels, hundreds of steps), so the sequence is cut into n_seg segments
// of seg_tiles tiles, each its own block (grid z). The recurrence is linear in h, and the product of a
// segment's decays is exp(A sum_t dt_t), so:
//   forward:  a local pass scans each segment but the last from a zero state, keeping its end state
//             hend[s] and sum dt[s]; the main pass starts segment s from
//             H_s = sum_{r < s} exp(A (sdt[r+1] + ... + sdt[s-1])) hend[r]  (folded left to right);
//   backward: a local pass walks each segment but the first in reverse from a zero adjoint, keeping
//             the carried adjoint gend[s] = (a g)_{first step of s}; the main pass starts segment s from
//             G_s = gend[s+1] + exp(A sdt[s+1]) G_{s+1}                        (folded right to left).
//
// Forward (main pass): writes y and, at the start of every tile, the state entering it (fp32
// checkpoints: N / TT floats per step and channel, i.e. 4 bytes at N = TT = 16).
//
// Backward (main pass), tiles from last to first: the tile's states are recomputed from its checkpoint,
// every second one kept in shared memory (the odd steps are rebuilt from the even ones while walking
// back), then walked in reverse with the adjoint g_t = dL/dh_t:
//   g_t       = dy_t C_t + a_{t+1} g_{t+1}
//   du_t      = dt_t sum_n g_t B_t + D dy_t
//   d(dt_t)   = sum_n g_t (A a_t h_{t-1} + u_t B_t),   a_t h_{t-1} = h_t - dt_t u_t B_t
//   dA        += g_t dt_t a_t h_{t-1}       (per channel, atomically added over batch and blocks)
//   dB_t[g,n] += g_t dt_t u_t, dC_t[g,n] += dy_t h_t   (summed over the group's channels: a warp
//                                                      reduce-scatter, then one atomic per block)
//   ddelta    = d(dt) * sigmoid(delta + bias) under softplus;  dbias += ddelta;  dD += dy u
// A is given as A_log (A = -exp(A_log)) and its gradient is returned for A_log.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// Field order and types must match _Params in train_scan.py (every field 8 bytes).
struct Params {
  const void* u;      // (batch, channels, L) contiguous
  const void* delta;  // (batch, channels, L) contiguous
  const void* B;      // (batch, groups, N, L), time stride 1
  const void* C;
  const float* A0;  // A_log of parameter set 0: (period, N); channel c uses set c / period, row c % period
  const float* A1;  // set 1 (or null: one set)
  const float* D0;
  const float* D1;
  const float* bias0;
  const float* bias1;
  void* y;       // (batch, channels, L)
  float* ckpt;   // (batch, n_tiles, N, channels)
  const void* dy;  // backward: (batch, channels, L) contiguous
  void* du;
  void* ddelta;
  float* dB;  // (batch, groups, N, L) fp32, zeroed by the caller
  float* dC;
  float* dA0;  // (period, N) fp32 per set, zeroed; gradients of A_log
  float* dA1;
  float* dD0;  // (period,)
  float* dD1;
  float* dbias0;
  float* dbias1;
  float* hend;  // (batch, n_seg, N, channels): each segment's end state scanned from zero (forward)
  float* sdt;   // (batch, n_seg, channels): sum of dt over each segment (forward; kept for backward)
  float* gend;  // (batch, n_seg, N, channels): each segment's carried adjoint from zero (backward)
  int64_t batch, channels, length, n_tiles;
  int64_t b_sb, b_sg, b_sn;
  int64_t c_sb, c_sg, c_sn;
  int64_t group_size, period, softplus;
  int64_t seg_tiles, n_seg;  // tiles per segment; segments (every one non-empty)
};

namespace {

constexpr int TT = 16;  // time steps per tile (and per checkpoint)
constexpr int BD = 32;  // channels per block: one warp
constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

// BD channels x TT steps (channel rows `length` apart, time-contiguous) into s[t][c] (row pitch BD + 1).
template <typename T>
__device__ __forceinline__ void load_ct(float* s, const T* base, int64_t length, int64_t t0, int steps) {
#pragma unroll 4
  for (int i = threadIdx.x; i < BD * TT; i += BD) {
    const int c = i / TT, t = i % TT;
    s[t * (BD + 1) + c] = (t < steps) ? to_f(base[c * length + t0 + t]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_ct(const float* s, T* base, int64_t length, int64_t t0, int steps) {
#pragma unroll 4
  for (int i = threadIdx.x; i < BD * TT; i += BD) {
    const int c = i / TT, t = i % TT;
    if (t < steps) base[c * length + t0 + t] = from_f<T>(s[t * (BD + 1) + c]);
  }
}

// TT steps x N states of one group's B or C into s[t][n].
template <typename T, int N>
__device__ __forceinline__ void load_tn(float* s, const T* base, int64_t sn, int64_t t0, int steps) {
#pragma unroll 4
  for (int i = threadIdx.x; i < TT * N; i += BD) {
    const int n = i / TT, t = i % TT;
    s[t * N + n] = (t < steps) ? to_f(base[n * sn + t0 + t]) : 0.f;
  }
}

struct Channel {
  int64_t set, row;
};
__device__ __forceinline__ Channel channel_of(const Params& p, int64_t c) {
  return {c / p.period, c % p.period};
}
__device__ __forceinline__ const float* set_ptr(const float* p0, const float* p1, int64_t set) {
  return set == 0 ? p0 : p1;
}
__device__ __forceinline__ float* set_ptr(float* p0, float* p1, int64_t set) { return set == 0 ? p0 : p1; }

__device__ __forceinline__ float softplus_f(float v) { return v <= 20.f ? log1pf(__expf(v)) : v; }


// What every kernel knows about its thread: the channel, its batch row, its segment's tiles, the
// per-channel parameters.
template <int N>
struct Lane {
  int64_t c0, bi, c, g, seg, k0, k1;
  Channel ch;
  float a2[N];  // A log2(e): exp(dt A) = exp2(dt a2)
  float dskip, bias;
  __device__ __forceinline__ Lane(const Params& p, int64_t segment) {
    c0 = (int64_t)blockIdx.x * BD;
    bi = blockIdx.y;
    c = c0 + threadIdx.x;
    g = c0 / p.group_size;
    seg = segment;
    k0 = seg * p.seg_tiles;
    k1 = min(p.n_tiles, k0 + p.seg_tiles);
    ch = channel_of(p, c);
    const float* A = set_ptr(p.A0, p.A1, ch.set);
    const float* Dp = set_ptr(p.D0, p.D1, ch.set);
    const float* biasp = set_ptr(p.bias0, p.bias1, ch.set);
#pragma unroll
    for (int n = 0; n < N; ++n) a2[n] = -__expf(A[ch.row * N + n]) * kLog2e;
    dskip = Dp ? Dp[ch.row] : 0.f;
    bias = biasp ? biasp[ch.row] : 0.f;
  }
  __device__ __forceinline__ int64_t seg_index(const Params& p, int64_t s) const {
    return (bi * p.n_seg + s);
  }
};

__device__ __forceinline__ float dt_of(float v, bool softplus) { return softplus ? softplus_f(v) : v; }

// Run f(t) for t = 0 .. steps-1 (or reversed), fully unrolled when the tile is full.
template <bool REVERSE, typename F>
__device__ __forceinline__ void for_steps(int steps, F&& f) {
  if (steps == TT) {
#pragma unroll
    for (int i = 0; i < TT; ++i) f(REVERSE ? TT - 1 - i : i);
  } else {
    for (int i = 0; i < steps; ++i) f(REVERSE ? steps - 1 - i : i);
  }
}

// Forward, local pass (segments 0 .. n_seg-2): scan from a zero state; keep the end state and sum dt.
template <typename T, int N>
__global__ void __launch_bounds__(BD) forward_local_kernel(Params p) {
  __shared__ float xs[TT * (BD + 1)];
  __shared__ float ds[TT * (BD + 1)];
  __shared__ __align__(16) float bs[TT * N];
  const Lane<N> ln(p, blockIdx.z);
  const bool softplus = p.softplus != 0;
  const int64_t L = p.length;
  const T* u = static_cast<const T*>(p.u) + (ln.bi * p.channels + ln.c0) * L;
  const T* delta = static_cast<const T*>(p.delta) + (ln.bi * p.channels + ln.c0) * L;
  const T* Bg = static_cast<const T*>(p.B) + ln.bi * p.b_sb + ln.g * p.b_sg;
  float h[N];
#pragma unroll
  for (int n = 0; n < N; ++n) h[n] = 0.f;
  float sum_dt = 0.f;
  for (int64_t k = ln.k0; k < ln.k1; ++k) {
    const int64_t t0 = k * TT;
    const int steps = (int)min((int64_t)TT, L - t0);
    __syncthreads();  // the previous tile is used
    load_ct<T>(xs, u, L, t0, steps);
    load_ct<T>(ds, delta, L, t0, steps);
    load_tn<T, N>(bs, Bg, p.b_sn, t0, steps);
    __syncthreads();
    for_steps<false>(steps, [&](int t) {
      const float x = xs[t * (BD + 1) + threadIdx.x];
      const float dt = dt_of(ds[t * (BD + 1) + threadIdx.x] + ln.bias, softplus);
      const float dtx = dt * x;
      sum_dt += dt;
#pragma unroll
      for (int n = 0; n < N; ++n) h[n] = exp2f(dt * ln.a2[n]) * h[n] + dtx * bs[t * N + n];
    });
  }
  const int64_t si = ln.seg_index(p, ln.seg);
  float* he = p.hend + si * N * p.channels + ln.c;
#pragma unroll
  for (int n = 0; n < N; ++n) he[n * p.channels] = h[n];
  p.sdt[si * p.channels + ln.c] = sum_dt;
}

// Forward, main pass: start from the state entering the segment, write y and the tile checkpoints.
template <typename T, int N>
__global__ void __launch_bounds__(BD) forward_kernel(Params p) {
  __shared__ float xs[TT * (BD + 1)];
  __shared__ float ds[TT * (BD + 1)];
  __shared__ float ys[TT * (BD + 1)];
  __shared__ __align__(16) float bs[TT * N];
  __shared__ __align__(16) float cs[TT * N];
  const Lane<N> ln(p, blockIdx.z);
  const bool softplus = p.softplus != 0;
  const int64_t L = p.length;
  const T* u = static_cast<const T*>(p.u) + (ln.bi * p.channels + ln.c0) * L;
  const T* delta = static_cast<const T*>(p.delta) + (ln.bi * p.channels + ln.c0) * L;
  const T* Bg = static_cast<const T*>(p.B) + ln.bi * p.b_sb + ln.g * p.b_sg;
  const T* Cg = static_cast<const T*>(p.C) + ln.bi * p.c_sb + ln.g * p.c_sg;
  T* y = static_cast<T*>(p.y) + (ln.bi * p.channels + ln.c0) * L;
  float h[N];
#pragma unroll
  for (int n = 0; n < N; ++n) h[n] = 0.f;
  for (int64_t s = 0; s < ln.seg; ++s) {  // fold the earlier segments' local results
    const int64_t si = ln.seg_index(p, s);
    const float sd = p.sdt[si * p.channels + ln.c];
    const float* he = p.hend + si * N * p.channels + ln.c;
#pragma unroll
    for (int n = 0; n < N; ++n) h[n] = exp2f(sd * ln.a2[n]) * h[n] + he[n * p.channels];
  }
  for (int64_t k = ln.k0; k < ln.k1; ++k) {
    const int64_t t0 = k * TT;
    const int steps = (int)min((int64_t)TT, L - t0);
    float* ck = p.ckpt + (ln.bi * p.n_tiles + k) * N * p.channels + ln.c;
#pragma unroll
    for (int n = 0; n < N; ++n) ck[n * p.channels] = h[n];
    __syncthreads();  // the previous tile is stored
    load_ct<T>(xs, u, L, t0, steps);
    load_ct<T>(ds, delta, L, t0, steps);
    load_tn<T, N>(bs, Bg, p.b_sn, t0, steps);
    load_tn<T, N>(cs, Cg, p.c_sn, t0, steps);
    __syncthreads();
    for_steps<false>(steps, [&](int t) {
      const float x = xs[t * (BD + 1) + threadIdx.x];
      const float dt = dt_of(ds[t * (BD + 1) + threadIdx.x] + ln.bias, softplus);
      const float dtx = dt * x;
      const float4* bv = reinterpret_cast<const float4*>(bs + t * N);
      const float4* cv = reinterpret_cast<const float4*>(cs + t * N);
      float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
      for (int q = 0; q < N / 4; ++q) {
        const float4 b4 = bv[q], c4 = cv[q];
        const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
        const float cc[4] = {c4.x, c4.y, c4.z, c4.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int n = 4 * q + j;
          h[n] = exp2f(dt * ln.a2[n]) * h[n] + dtx * bb[j];
          if (j & 1) acc1 += cc[j] * h[n]; else acc0 += cc[j] * h[n];
        }
      }
      ys[t * (BD + 1) + threadIdx.x] = acc0 + acc1 + ln.dskip * x;
    });
    __syncthreads();
    store_ct<T>(ys, y, L, t0, steps);
  }
}

// One level of a warp reduce-scatter: lanes with bit OFF set keep the upper half of vals[0, 2 OFF), the
// others the lower half, each adding its partner's copy; after OFF = 16, 8, 4, 2, 1, lane l holds in
// vals[0] the sum over the warp of vals[l].
template <int OFF>
__device__ __forceinline__ void reduce_scatter(float* vals, int lane) {
  const bool upper = (lane & OFF) != 0;
#pragma unroll
  for (int i = 0; i < OFF; ++i) {
    const float send = upper ? vals[i] : vals[i + OFF];
    const float keep = upper ? vals[i + OFF] : vals[i];
    vals[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
  }
}

// Backward, local pass (segments 1 .. n_seg-1, grid z + 1): the adjoint walked back from zero through the
// segment; keeps the carried adjoint at its first step.
template <typename T, int N>
__global__ void __launch_bounds__(BD) backward_local_kernel(Params p) {
  __shared__ float ds[TT * (BD + 1)];
  __shared__ float gs[TT * (BD + 1)];
  __shared__ __align__(16) float cs[TT * N];
  const Lane<N> ln(p, (int64_t)blockIdx.z + 1);
  const int lane = threadIdx.x;
  const bool softplus = p.softplus != 0;
  const int64_t L = p.length;
  const int64_t off = (ln.bi * p.channels + ln.c0) * L;
  const T* delta = static_cast<const T*>(p.delta) + off;
  const T* dy = static_cast<const T*>(p.dy) + off;
  const T* Cg = static_cast<const T*>(p.C) + ln.bi * p.c_sb + ln.g * p.c_sg;
  float gn[N];
#pragma unroll
  for (int n = 0; n < N; ++n) gn[n] = 0.f;
  for (int64_t k = ln.k1 - 1; k >= ln.k0; --k) {
    const int64_t t0 = k * TT;
    const int steps = (int)min((int64_t)TT, L - t0);
    __syncthreads();
    load_ct<T>(ds, delta, L, t0, steps);
    load_ct<T>(gs, dy, L, t0, steps);
    load_tn<T, N>(cs, Cg, p.c_sn, t0, steps);
    __syncthreads();
    for_steps<true>(steps, [&](int t) {
      const float dt = dt_of(ds[t * (BD + 1) + lane] + ln.bias, softplus);
      const float dyt = gs[t * (BD + 1) + lane];
#pragma unroll
      for (int n = 0; n < N; ++n) gn[n] = (gn[n] + dyt * cs[t * N + n]) * exp2f(dt * ln.a2[n]);
    });
  }
  float* ge = p.gend + ln.seg_index(p, ln.seg) * N * p.channels + ln.c;
#pragma unroll
  for (int n = 0; n < N; ++n) ge[n * p.channels] = gn[n];
}

// Backward, main pass.
template <typename T, int N>
__global__ void __launch_bounds__(BD) backward_kernel(Params p) {
  static_assert(2 * N == 32, "the warp reduce-scatter takes 2 N == 32 values per lane");
  static_assert(TT % 2 == 0, "states are kept for every second step");
  __shared__ float xs[TT * (BD + 1)];
  __shared__ float ds[TT * (BD + 1)];   // delta in, ddelta out
  __shared__ float gs[TT * (BD + 1)];   // dy in, du out
  __shared__ __align__(16) float bs[TT * N];
  __shared__ __align__(16) float cs[TT * N];
  __shared__ float hist[(TT / 2) * N * BD];  // recomputed states of the even steps, [t / 2][n][channel]
  __shared__ float red[TT * 2 * N];          // per step: the block's sums of dB (n) and dC (N + n)
  const Lane<N> ln(p, blockIdx.z);
  const int lane = threadIdx.x;
  const bool softplus = p.softplus != 0;
  float gn[N], dA[N];
#pragma unroll
  for (int n = 0; n < N; ++n) {
    gn[n] = 0.f;
    dA[n] = 0.f;
  }
  if (ln.seg + 1 < p.n_seg) {  // fold the later segments' local adjoints, last first
    const int64_t last = p.n_seg - 1;
    {
      const float* ge = p.gend + ln.seg_index(p, last) * N * p.channels + ln.c;
#pragma unroll
      for (int n = 0; n < N; ++n) gn[n] = ge[n * p.channels];
    }
    for (int64_t s = last - 1; s > ln.seg; --s) {
      const int64_t si = ln.seg_index(p, s);
      const float sd = p.sdt[si * p.channels + ln.c];
      const float* ge = p.gend + si * N * p.channels + ln.c;
#pragma unroll
      for (int n = 0; n < N; ++n) gn[n] = ge[n * p.channels] + exp2f(sd * ln.a2[n]) * gn[n];
    }
  }
  float dD = 0.f, dbias = 0.f;
  const int64_t L = p.length;
  const int64_t off = (ln.bi * p.channels + ln.c0) * L;
  const T* u = static_cast<const T*>(p.u) + off;
  const T* delta = static_cast<const T*>(p.delta) + off;
  const T* dy = static_cast<const T*>(p.dy) + off;
  T* du = static_cast<T*>(p.du) + off;
  T* ddelta = static_cast<T*>(p.ddelta) + off;
  const T* Bg = static_cast<const T*>(p.B) + ln.bi * p.b_sb + ln.g * p.b_sg;
  const T* Cg = static_cast<const T*>(p.C) + ln.bi * p.c_sb + ln.g * p.c_sg;
  const int64_t groups = p.channels / p.group_size;
  float* dBg = p.dB + (ln.bi * groups + ln.g) * N * L;
  float* dCg = p.dC + (ln.bi * groups + ln.g) * N * L;

  for (int64_t k = ln.k1 - 1; k >= ln.k0; --k) {
    const int64_t t0 = k * TT;
    const int steps = (int)min((int64_t)TT, L - t0);
    __syncthreads();  // the previous tile's outputs are stored
    load_ct<T>(xs, u, L, t0, steps);
    load_ct<T>(ds, delta, L, t0, steps);
    load_ct<T>(gs, dy, L, t0, steps);
    load_tn<T, N>(bs, Bg, p.b_sn, t0, steps);
    load_tn<T, N>(cs, Cg, p.c_sn, t0, steps);
    __syncthreads();
    {  // recompute the tile's states from its checkpoint; keep the even steps'
      const float* ck = p.ckpt + (ln.bi * p.n_tiles + k) * N * p.channels + ln.c;
      float h[N];
#pragma unroll
      for (int n = 0; n < N; ++n) h[n] = ck[n * p.channels];
      for_steps<false>(steps, [&](int t) {
        const float x = xs[t * (BD + 1) + lane];
        const float dt = dt_of(ds[t * (BD + 1) + lane] + ln.bias, softplus);
        const float dtx = dt * x;
#pragma unroll
        for (int n = 0; n < N; ++n) {
          h[n] = exp2f(dt * ln.a2[n]) * h[n] + dtx * bs[t * N + n];
          if ((t & 1) == 0) hist[((t >> 1) * N + n) * BD + lane] = h[n];
        }
      });
    }
    for_steps<true>(steps, [&](int t) {
      const float x = xs[t * (BD + 1) + lane];
      const float v = ds[t * (BD + 1) + lane] + ln.bias;
      const float dt = dt_of(v, softplus);
      const float dtx = dt * x;
      const float dyt = gs[t * (BD + 1) + lane];
      const bool odd = (t & 1) != 0;
      float vals[2 * N];
      float gb0 = 0.f, gb1 = 0.f, ddt0 = 0.f, ddt1 = 0.f;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const float a = exp2f(dt * ln.a2[n]);
        const float kept = hist[((t >> 1) * N + n) * BD + lane];  // h_t (even t) or h_{t-1} (odd t)
        const float bn = bs[t * N + n];
        const float cn = cs[t * N + n];
        const float prev = odd ? a * kept : kept - dtx * bn;  // a_t h_{t-1}
        const float hn = odd ? prev + dtx * bn : kept;        // h_t
        const float gt = gn[n] + dyt * cn;                    // g_t
        const float an = ln.a2[n] * (1.f / kLog2e);           // A
        vals[n] = gt * dtx;                                   // dB partial
        vals[N + n] = dyt * hn;                               // dC partial
        if (n & 1) {
          gb1 += gt * bn;
          ddt1 += gt * (an * prev + x * bn);
        } else {
          gb0 += gt * bn;
          ddt0 += gt * (an * prev + x * bn);
        }
        dA[n] += gt * dt * prev;
        gn[n] = gt * a;  // a_t g_t: carried to step t - 1
      }
      const float ddt = ddt0 + ddt1;
      gs[t * (BD + 1) + lane] = dt * (gb0 + gb1) + ln.dskip * dyt;  // du
      const float dv = softplus ? (v <= 20.f ? ddt / (1.f + __expf(-v)) : ddt) : ddt;
      ds[t * (BD + 1) + lane] = dv;  // ddelta
      dbias += dv;
      dD += dyt * x;
      // reduce-scatter over the warp: lane l ends with the sum of vals[l] over all lanes
      reduce_scatter<16>(vals, lane);
      reduce_scatter<8>(vals, lane);
      reduce_scatter<4>(vals, lane);
      reduce_scatter<2>(vals, lane);
      reduce_scatter<1>(vals, lane);
      red[t * 2 * N + lane] = vals[0];
    });
    __syncthreads();
    store_ct<T>(gs, du, L, t0, steps);
    store_ct<T>(ds, ddelta, L, t0, steps);
    // one atomic per (value, step) and block; consecutive lanes take consecutive steps
#pragma unroll 4
    for (int i = lane; i < 2 * N * TT; i += BD) {
      const int j = i / TT, t = i % TT;
      if (t < steps) {
        float* dst = j < N ? dBg + j * L : dCg + (j - N) * L;
        atomicAdd(dst + t0 + t, red[t * 2 * N + j]);
      }
    }
  }
  float* dAp = set_ptr(p.dA0, p.dA1, ln.ch.set);
#pragma unroll
  for (int n = 0; n < N; ++n) {
    // dL/dA_log = dL/dA * A
    atomicAdd(dAp + ln.ch.row * N + n, dA[n] * ln.a2[n] * (1.f / kLog2e));
  }
  float* dDp = set_ptr(p.dD0, p.dD1, ln.ch.set);
  if (dDp) atomicAdd(dDp + ln.ch.row, dD);
  float* dbp = set_ptr(p.dbias0, p.dbias1, ln.ch.set);
  if (dbp) atomicAdd(dbp + ln.ch.row, dbias);
}

template <typename T>
int launch(const Params& p, int n_state, bool backward, cudaStream_t stream) {
  if (n_state != 16) return -3;
  if (p.channels % BD || p.group_size % BD || p.period % BD) return -2;
  if (p.batch > 65535) return -5;
  // every segment non-empty, within the grid's z limit
  if (p.n_seg < 1 || p.n_seg > 65535 || p.seg_tiles < 1 || p.seg_tiles * p.n_seg < p.n_tiles ||
      (p.n_seg - 1) * p.seg_tiles >= p.n_tiles)
    return -6;
  if (p.n_seg > 1 && (!p.sdt || !(backward ? p.gend : p.hend))) return -6;
  const unsigned gx = (unsigned)(p.channels / BD), gy = (unsigned)p.batch;
  const dim3 grid(gx, gy, (unsigned)p.n_seg);
  const dim3 local(gx, gy, (unsigned)(p.n_seg - 1));
  if (backward) {
    if (p.n_seg > 1) backward_local_kernel<T, 16><<<local, BD, 0, stream>>>(p);
    backward_kernel<T, 16><<<grid, BD, 0, stream>>>(p);
  } else {
    if (p.n_seg > 1) forward_local_kernel<T, 16><<<local, BD, 0, stream>>>(p);
    forward_kernel<T, 16><<<grid, BD, 0, stream>>>(p);
  }
  return (int)cudaGetLastError();
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16 (u, delta, B, C, y, dy, du, ddelta alike). Returns a
// cudaError_t, or -1 dtype, -2 channels/group/period not a multiple of 32, -3 state size not 16,
// -5 batch over 65535, -6 bad segments.
extern "C" __attribute__((visibility("default"))) int ssamba_train_scan(const Params* p, int dtype, int n_state,
                                                                   int backward, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch<float>(*p, n_state, backward != 0, s);
    case 1: return launch<__nv_bfloat16>(*p, n_state, backward != 0, s);
    case 2: return launch<__half>(*p, n_state, backward != 0, s);
  }
  return -1;
}

extern "C" __attribute__((visibility("default"))) const char* ssamba_train_scan_error(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
