// Chunked selective scan, forward only (inference). Built on first use by ssamba/model/chunk_scan.py
// with nvcc for the local GPU and called through ctypes on torch's current stream.
//
//   h_t[c, n] = exp(dt_t[c] A[c, n]) h_{t-1}[c, n] + dt_t[c] u_t[c] B_t[g(c), n]
//   y_t[c]    = sum_n C_t[g(c), n] h_t[c, n] + D[c] u_t[c],    dt = softplus(delta + bias) (or delta + bias)
//
// One thread owns one channel and keeps its N states in registers, stepping through time one step at
// a time; tiles of TT steps are staged through shared memory so that global loads and stores are
// coalesced for either layout (time-contiguous or channel-contiguous).
//
// The sequence is cut into chunks of `chunk_len` steps so that batch x channels x chunks threads fill
// the GPU even at batch 1 (mamba-ssm's kernel walks each channel's whole sequence in one block):
//   1. chunk_state: each chunk (but the last) scanned from a zero state -> its end state, and the sum of
//      dt over the chunk (the chunk's decay is exp(A * sum dt));
//   2. carry: for each (channel, state) the chunks in order -> the state entering each chunk;
//   3. chunk_out: each chunk scanned again from its entering state, writing y.
// With one chunk only step 3 runs, from a zero state.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// Field order and types must match _Params in chunk_scan.py (every field 8 bytes).
struct Params {
  const void* u;
  const void* delta;
  const void* B;
  const void* C;
  const float* A;     // (param rows, N), negative
  const float* D;     // (param rows,) or null
  const float* bias;  // (param rows,) or null
  void* y;
  float* state;  // (batch, n_chunks, channels, N): end states, then (after carry) entering states
  float* dsum;   // (batch, n_chunks, channels): sum of dt over each chunk
  int64_t batch, channels, length;
  int64_t u_sb, u_sc, u_sl;
  int64_t d_sb, d_sc, d_sl;
  int64_t y_sb, y_sc, y_sl;
  int64_t b_sb, b_sg, b_sn, b_sl;
  int64_t c_sb, c_sg, c_sn, c_sl;
  int64_t group_size;  // channels per B/C group
  int64_t p_rep;       // parameter row of channel c: (c / (p_rep * p_div)) * p_div + c % p_div
  int64_t p_div;
  int64_t chunk_len;   // a multiple of TT
  int64_t n_chunks;
  int64_t softplus;
};

namespace {

constexpr int TT = 32;  // time steps per shared-memory tile
constexpr float kLog2e = 1.4426950408889634f;


__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ int64_t param_row(const Params& p, int64_t c) {
  return (c / (p.p_rep * p.p_div)) * p.p_div + c % p.p_div;
}

// Tile of BD channels x TT steps from global (element (c, t) at base[c * sc + t * sl]) into s[t][c]
// (row stride BD + 1: conflict-free whichever index consecutive threads take). Steps past `length` read 0.
template <typename T, int BD>
__device__ __forceinline__ void load_ct(float* s, const T* base, int64_t sc, int64_t sl, int64_t t0, int64_t length) {
  if (sl == 1) {  // time-contiguous: consecutive threads take consecutive steps
#pragma unroll 4
    for (int i = threadIdx.x; i < BD * TT; i += BD) {
      const int c = i / TT, t = i % TT;
      s[t * (BD + 1) + c] = (t0 + t < length) ? to_f(base[c * sc + (t0 + t)]) : 0.f;
    }
  } else {  // channel-contiguous (or any other stride): consecutive threads take consecutive channels
#pragma unroll 4
    for (int i = threadIdx.x; i < BD * TT; i += BD) {
      const int t = i / BD, c = i % BD;
      s[t * (BD + 1) + c] = (t0 + t < length) ? to_f(base[c * sc + (t0 + t) * sl]) : 0.f;
    }
  }
}

template <typename T, int BD>
__device__ __forceinline__ void store_ct(const float* s, T* base, int64_t sc, int64_t sl, int64_t t0, int64_t length) {
  if (sl == 1) {
#pragma unroll 4
    for (int i = threadIdx.x; i < BD * TT; i += BD) {
      const int c = i / TT, t = i % TT;
      if (t0 + t < length) base[c * sc + (t0 + t)] = from_f<T>(s[t * (BD + 1) + c]);
    }
  } else {
#pragma unroll 4
    for (int i = threadIdx.x; i < BD * TT; i += BD) {
      const int t = i / BD, c = i % BD;
      if (t0 + t < length) base[c * sc + (t0 + t) * sl] = from_f<T>(s[t * (BD + 1) + c]);
    }
  }
}

// TT steps x N states of B or C (one group) into s[t][n] (N contiguous: read back as float4).
template <typename T, int BD, int N>
__device__ __forceinline__ void load_tn(float* s, const T* base, int64_t sn, int64_t sl, int64_t t0, int64_t length) {
  for (int i = threadIdx.x; i < TT * N; i += BD) {
    const int t = i / N, n = i % N;
    s[i] = (t0 + t < length) ? to_f(base[n * sn + (t0 + t) * sl]) : 0.f;
  }
}

template <typename T, int BD, int N>
struct Tile {
  float x[TT * (BD + 1)];
  float d[TT * (BD + 1)];
  __align__(16) float b[TT * N];
  __align__(16) float c[TT * N];
};

__device__ __forceinline__ float step_dt(float v, bool softplus) {
  return (softplus && v <= 20.f) ? log1pf(__expf(v)) : v;
}

// kOut: write y (pass 3); else accumulate the chunk's end state and sum of dt (pass 1).
template <typename T, int BD, int N, bool kOut>
__global__ void __launch_bounds__(BD) scan_kernel(Params p) {
  __shared__ Tile<T, BD, N> tile;
  const int64_t c0 = (int64_t)blockIdx.x * BD;
  const int64_t chunk = blockIdx.y;
  const int64_t bi = blockIdx.z;
  const int64_t c = c0 + threadIdx.x;
  const int64_t g = c0 / p.group_size;
  const int64_t prow = param_row(p, c);
  const bool softplus = p.softplus != 0;

  float a2[N], h[N];
#pragma unroll
  for (int n = 0; n < N; ++n) a2[n] = p.A[prow * N + n] * kLog2e;
  const float dskip = p.D ? p.D[prow] : 0.f;
  const float bias = p.bias ? p.bias[prow] : 0.f;
  if (kOut && p.n_chunks > 1) {
    const float* st = p.state + ((bi * p.n_chunks + chunk) * p.channels + c) * N;
#pragma unroll
    for (int n = 0; n < N; ++n) h[n] = st[n];
  } else {
#pragma unroll
    for (int n = 0; n < N; ++n) h[n] = 0.f;
  }
  float dt_sum = 0.f;

  const T* u = static_cast<const T*>(p.u) + bi * p.u_sb + c0 * p.u_sc;
  const T* delta = static_cast<const T*>(p.delta) + bi * p.d_sb + c0 * p.d_sc;
  const T* Bg = static_cast<const T*>(p.B) + bi * p.b_sb + g * p.b_sg;
  const T* Cg = static_cast<const T*>(p.C) + bi * p.c_sb + g * p.c_sg;
  T* y = static_cast<T*>(p.y) + bi * p.y_sb + c0 * p.y_sc;

  const int64_t t_begin = chunk * p.chunk_len;
  const int64_t t_end = min(p.length, t_begin + p.chunk_len);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += TT) {
    __syncthreads();  // the previous tile is consumed
    load_ct<T, BD>(tile.x, u, p.u_sc, p.u_sl, t0, t_end);
    load_ct<T, BD>(tile.d, delta, p.d_sc, p.d_sl, t0, t_end);
    load_tn<T, BD, N>(tile.b, Bg, p.b_sn, p.b_sl, t0, t_end);
    if (kOut) load_tn<T, BD, N>(tile.c, Cg, p.c_sn, p.c_sl, t0, t_end);
    __syncthreads();
    const int steps = (int)min((int64_t)TT, t_end - t0);
#pragma unroll 2
    for (int t = 0; t < steps; ++t) {
      const float x = tile.x[t * (BD + 1) + threadIdx.x];
      const float dt = step_dt(tile.d[t * (BD + 1) + threadIdx.x] + bias, softplus);
      const float dtx = dt * x;
      const float4* bv = reinterpret_cast<const float4*>(tile.b + t * N);
      if (kOut) {
        const float4* cv = reinterpret_cast<const float4*>(tile.c + t * N);
        float acc = dskip * x;
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
          const float4 bb = bv[q], cc = cv[q];
          h[4 * q + 0] = exp2f(dt * a2[4 * q + 0]) * h[4 * q + 0] + dtx * bb.x;
          h[4 * q + 1] = exp2f(dt * a2[4 * q + 1]) * h[4 * q + 1] + dtx * bb.y;
          h[4 * q + 2] = exp2f(dt * a2[4 * q + 2]) * h[4 * q + 2] + dtx * bb.z;
          h[4 * q + 3] = exp2f(dt * a2[4 * q + 3]) * h[4 * q + 3] + dtx * bb.w;
          acc += h[4 * q + 0] * cc.x + h[4 * q + 1] * cc.y + h[4 * q + 2] * cc.z + h[4 * q + 3] * cc.w;
        }
        tile.x[t * (BD + 1) + threadIdx.x] = acc;  // y replaces x in place (same thread, same step)
      } else {
        dt_sum += dt;
#pragma unroll
        for (int q = 0; q < N / 4; ++q) {
          const float4 bb = bv[q];
          h[4 * q + 0] = exp2f(dt * a2[4 * q + 0]) * h[4 * q + 0] + dtx * bb.x;
          h[4 * q + 1] = exp2f(dt * a2[4 * q + 1]) * h[4 * q + 1] + dtx * bb.y;
          h[4 * q + 2] = exp2f(dt * a2[4 * q + 2]) * h[4 * q + 2] + dtx * bb.z;
          h[4 * q + 3] = exp2f(dt * a2[4 * q + 3]) * h[4 * q + 3] + dtx * bb.w;
        }
      }
    }
    if (kOut) {
      __syncthreads();
      store_ct<T, BD>(tile.x, y, p.y_sc, p.y_sl, t0, t_end);
    }
  }
  if (!kOut) {
    float* st = p.state + ((bi * p.n_chunks + chunk) * p.channels + c) * N;
#pragma unroll
    for (int n = 0; n < N; ++n) st[n] = h[n];
    p.dsum[(bi * p.n_chunks + chunk) * p.channels + c] = dt_sum;
  }
}

// One thread per (batch, channel, state): the chunks in order. Replaces each chunk's end state (from a
// zero start) by the state entering it. Loads run kUnroll chunks ahead of the dependent update.
template <int N>
__global__ void carry_kernel(Params p) {
  constexpr int kUnroll = 16;
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.batch * p.channels * N) return;
  const int n = (int)(i % N);
  const int64_t c = (i / N) % p.channels;
  const int64_t bi = i / (N * p.channels);
  const float a2 = p.A[param_row(p, c) * N + n] * kLog2e;
  const int64_t nc = p.n_chunks;
  float h = 0.f;
  for (int64_t k0 = 0; k0 < nc; k0 += kUnroll) {
    float e[kUnroll], s[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t k = k0 + j;
      const bool has = k < nc - 1;  // the last chunk has no end state
      e[j] = has ? p.state[((bi * nc + k) * p.channels + c) * N + n] : 0.f;
      s[j] = has ? p.dsum[(bi * nc + k) * p.channels + c] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t k = k0 + j;
      if (k < nc) {
        p.state[((bi * nc + k) * p.channels + c) * N + n] = h;
        h = exp2f(a2 * s[j]) * h + e[j];
      }
    }
  }
}

template <typename T, int BD, int N>
int launch(const Params& p, cudaStream_t stream) {
  const dim3 block(BD);
  if (p.n_chunks > 1) {
    scan_kernel<T, BD, N, false><<<dim3(p.channels / BD, p.n_chunks - 1, p.batch), block, 0, stream>>>(p);
    const int64_t total = p.batch * p.channels * N;
    carry_kernel<N><<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(p);
  }
  scan_kernel<T, BD, N, true><<<dim3(p.channels / BD, p.n_chunks, p.batch), block, 0, stream>>>(p);
  return (int)cudaGetLastError();
}

template <typename T, int N>
int launch_bd(const Params& p, int block_d, cudaStream_t stream) {
  switch (block_d) {
    case 128: return launch<T, 128, N>(p, stream);
    case 64: return launch<T, 64, N>(p, stream);
    case 32: return launch<T, 32, N>(p, stream);
  }
  return -2;
}

template <typename T>
int launch_n(const Params& p, int n, int block_d, cudaStream_t stream) {
  switch (n) {
    case 8: return launch_bd<T, 8>(p, block_d, stream);
    case 16: return launch_bd<T, 16>(p, block_d, stream);
    case 32: return launch_bd<T, 32>(p, block_d, stream);
  }
  return -3;
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16 (u, delta, B, C and y alike). Returns a cudaError_t, or
// -1/-2/-3 for an unsupported dtype / block size / state size.
extern "C" __attribute__((visibility("default"))) int ssamba_chunk_scan(const Params* p, int dtype, int n_state, int block_d, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_n<float>(*p, n_state, block_d, s);
    case 1: return launch_n<__nv_bfloat16>(*p, n_state, block_d, s);
    case 2: return launch_n<__half>(*p, n_state, block_d, s);
  }
  return -1;
}

extern "C" __attribute__((visibility("default"))) const char* ssamba_chunk_scan_error(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
