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

#include <initializer_list>

// Field order and types must match _Params in chunk_scan.py (every field 8 bytes).
struct Params {
  const void* u;
  const void* delta;
  const void* B;
  const void* C;
  const float* A;     // (param rows, N), negative
  const float* D;     // (param rows,) or null
  const float* bias;  // (param rows,) or null
  const float* A1;     // optional second parameter set (e.g. the backward direction): rows of set 1
  const float* D1;     // are read from A1/D1/bias1 instead of A/D/bias rows p_div..2 p_div-1
  const float* bias1;
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
  int64_t p_rep;       // parameter row of channel c: set (c / (p_rep * p_div)), row c % p_div in the set
  int64_t p_div;
  int64_t chunk_len;   // a multiple of TT
  int64_t n_chunks;
  int64_t softplus;
  int64_t a_log;  // A holds log(-A) (the A_log parameter): A = -exp(A_log)
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

// Parameters of channel c: set k = c / (p_rep * p_div), row i = c % p_div of the set; a set is rows
// k * p_div + i of A/D/bias, except set 1 when A1 is given (then row i of A1/D1/bias1).
struct ChannelParams {
  const float* a;  // N values (A or A_log)
  float d, bias;
};
__device__ __forceinline__ ChannelParams channel_params(const Params& p, int64_t c, int n_state) {
  const int64_t set = c / (p.p_rep * p.p_div), i = c % p.p_div;
  ChannelParams cp;
  if (set == 1 && p.A1 != nullptr) {
    cp.a = p.A1 + i * n_state;
    cp.d = p.D1 ? p.D1[i] : 0.f;
    cp.bias = p.bias1 ? p.bias1[i] : 0.f;
  } else {
    const int64_t row = set * p.p_div + i;
    cp.a = p.A + row * n_state;
    cp.d = p.D ? p.D[row] : 0.f;
    cp.bias = p.bias ? p.bias[row] : 0.f;
  }
  return cp;
}
__device__ __forceinline__ float a_log2(const Params& p, float a) {  // A * log2(e)
  return (p.a_log ? -expf(a) : a) * kLog2e;
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
  const ChannelParams cp = channel_params(p, c, N);
  const bool softplus = p.softplus != 0;

  float a2[N], h[N];
#pragma unroll
  for (int n = 0; n < N; ++n) a2[n] = a_log2(p, cp.a[n]);
  const float dskip = cp.d;
  const float bias = cp.bias;
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


// ---------------------------------------------------------------------------------------------------
// Pipelined variant for time-contiguous, 16-byte aligned tensors (the fast mixer's layout): tiles are
// copied global -> shared with cp.async, double-buffered (the next tile lands while this one is
// computed), in the global row layout [channel or state][step]; each thread reads VEC steps of its
// channel with one 16-byte shared load (row pitch an odd number of 16-byte units: conflict-free), and
// B/C rows are broadcast. Per step and state: one ex2 (MUFU), two multiplies, two FMAs.
// ---------------------------------------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int K> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(K)); }

template <typename T> struct Pack;  // VEC elements of T in 16 bytes, to and from float
template <> struct Pack<float> {
  static constexpr int VEC = 4;
  __device__ static void unpack(const void* p, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
  }
  __device__ static void pack(void* p, const float* in) { *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]); }
};
template <> struct Pack<__nv_bfloat16> {
  static constexpr int VEC = 8;
  __device__ static void unpack(const void* p, float* out) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ static void pack(void* p, const float* in) {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 v = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
      w[i] = *reinterpret_cast<const unsigned*>(&v);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
  }
};
template <> struct Pack<__half> {
  static constexpr int VEC = 8;
  __device__ static void unpack(const void* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static void pack(void* p, const float* in) {
    uint4 raw;
    __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
};

template <typename T, int BD, int N>
struct AsyncLayout {
  static constexpr int VEC = Pack<T>::VEC;
  static constexpr int PITCH = TT * (int)sizeof(T) + 16;  // bytes per row: an odd number of 16-byte units
  static constexpr int CPR = TT / VEC;                     // 16-byte chunks per row of a tile
  static constexpr int STAGE = (2 * BD + 2 * N) * PITCH;   // x, delta, B, C rows
  static constexpr int SMEM = 2 * STAGE;
};

// rows x TT steps (row r at base + r * rs, steps contiguous) -> smem rows of PITCH bytes; zero past t_end
template <typename T, int BD, int N>
__device__ __forceinline__ void issue_rows(char* dst, const T* base, int rows, int64_t rs, int64_t t0, int64_t t_end) {
  using L = AsyncLayout<T, BD, N>;
  for (int i = threadIdx.x; i < rows * L::CPR; i += BD) {
    const int r = i / L::CPR, q = i % L::CPR;
    const int64_t t = t0 + q * L::VEC;
    const int64_t left = t_end - t;
    const int bytes = left >= L::VEC ? 16 : (left > 0 ? (int)left * (int)sizeof(T) : 0);
    cp_async16(dst + r * L::PITCH + q * 16, bytes > 0 ? (const void*)(base + r * rs + t) : (const void*)base, bytes);
  }
}

template <typename T, int BD, int N, bool kOut>
__global__ void __launch_bounds__(BD) scan_kernel_async(Params p) {
  using L = AsyncLayout<T, BD, N>;
  constexpr int VEC = L::VEC;
  extern __shared__ __align__(16) char smem[];
  const int64_t c0 = (int64_t)blockIdx.x * BD;
  const int64_t chunk = blockIdx.y;
  const int64_t bi = blockIdx.z;
  const int64_t c = c0 + threadIdx.x;
  const int64_t g = c0 / p.group_size;
  const ChannelParams cp = channel_params(p, c, N);
  const bool softplus = p.softplus != 0;

  float a2[N], h[N];
#pragma unroll
  for (int n = 0; n < N; ++n) a2[n] = a_log2(p, cp.a[n]);
  const float dskip = cp.d;
  const float bias = cp.bias;
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
  const int ntiles = (int)((t_end - t_begin + TT - 1) / TT);

  auto issue = [&](int k) {
    char* st = smem + (k & 1) * L::STAGE;
    const int64_t t0 = t_begin + (int64_t)k * TT;
    issue_rows<T, BD, N>(st, u, BD, p.u_sc, t0, t_end);
    issue_rows<T, BD, N>(st + BD * L::PITCH, delta, BD, p.d_sc, t0, t_end);
    issue_rows<T, BD, N>(st + 2 * BD * L::PITCH, Bg, N, p.b_sn, t0, t_end);
    if (kOut) issue_rows<T, BD, N>(st + (2 * BD + N) * L::PITCH, Cg, N, p.c_sn, t0, t_end);
    cp_async_commit();
  };

  issue(0);
  for (int k = 0; k < ntiles; ++k) {
    if (k + 1 < ntiles) {
      issue(k + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile k is in shared memory for every thread
    char* st = smem + (k & 1) * L::STAGE;
    char* xrow = st + threadIdx.x * L::PITCH;
    const char* drow = st + (BD + threadIdx.x) * L::PITCH;
    const char* brows = st + 2 * BD * L::PITCH;
    const char* crows = st + (2 * BD + N) * L::PITCH;
#pragma unroll 1
    for (int q = 0; q < L::CPR; ++q) {
      float xv[VEC], dt[VEC], dtx[VEC], acc[VEC];
      Pack<T>::unpack(xrow + q * 16, xv);
      Pack<T>::unpack(drow + q * 16, dt);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        dt[j] = step_dt(dt[j] + bias, softplus);
        dtx[j] = dt[j] * xv[j];
        acc[j] = dskip * xv[j];
        if (!kOut) dt_sum += dt[j];
      }
#pragma unroll
      for (int n = 0; n < N; ++n) {
        float bv[VEC];
        Pack<T>::unpack(brows + n * L::PITCH + q * 16, bv);
        float hn = h[n];
        const float an = a2[n];
        if (kOut) {
          float cv[VEC];
          Pack<T>::unpack(crows + n * L::PITCH + q * 16, cv);
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            hn = exp2f(dt[j] * an) * hn + dtx[j] * bv[j];
            acc[j] += hn * cv[j];
          }
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) hn = exp2f(dt[j] * an) * hn + dtx[j] * bv[j];
        }
        h[n] = hn;
      }
      if (kOut) Pack<T>::pack(xrow + q * 16, acc);  // y over x: this thread's row, already read
    }
    if (kOut) {
      __syncthreads();  // every row of y written
      const int64_t t0 = t_begin + (int64_t)k * TT;
      for (int i = threadIdx.x; i < BD * L::CPR; i += BD) {
        const int r = i / L::CPR, q = i % L::CPR;
        const int64_t t = t0 + q * L::VEC;
        const char* src = st + r * L::PITCH + q * 16;
        T* dst = y + r * p.y_sc + t;
        if (t + L::VEC <= t_end) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int j = 0; j < L::VEC && t + j < t_end; ++j) dst[j] = reinterpret_cast<const T*>(src)[j];
        }
      }
    }
    __syncthreads();  // stage k & 1 is free for tile k + 2
  }
  if (!kOut) {
    float* stt = p.state + ((bi * p.n_chunks + chunk) * p.channels + c) * N;
#pragma unroll
    for (int n = 0; n < N; ++n) stt[n] = h[n];
    p.dsum[(bi * p.n_chunks + chunk) * p.channels + c] = dt_sum;
  }
}

bool aligned16(const void* ptr, int64_t esize, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16) return false;
  for (int64_t s : strides)
    if ((s * esize) % 16) return false;
  return true;
}

// The pipelined kernel needs every (batch, channel/state) row time-contiguous and 16-byte aligned.
template <typename T>
bool async_ok(const Params& p) {
  const int64_t e = sizeof(T);
  return p.u_sl == 1 && p.d_sl == 1 && p.y_sl == 1 && p.b_sl == 1 && p.c_sl == 1 &&
         aligned16(p.u, e, {p.u_sb, p.u_sc}) && aligned16(p.delta, e, {p.d_sb, p.d_sc}) &&
         aligned16(p.y, e, {p.y_sb, p.y_sc}) && aligned16(p.B, e, {p.b_sb, p.b_sg, p.b_sn}) &&
         aligned16(p.C, e, {p.c_sb, p.c_sg, p.c_sn});
}

template <typename T, int BD, int N, bool kOut>
int launch_async(const Params& p, dim3 grid, cudaStream_t stream) {
  constexpr int smem = AsyncLayout<T, BD, N>::SMEM;
  static bool configured = false;  // per instantiation (one device per process is assumed for the attribute)
  if (!configured) {
    const cudaError_t e = cudaFuncSetAttribute(scan_kernel_async<T, BD, N, kOut>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    configured = true;
  }
  scan_kernel_async<T, BD, N, kOut><<<grid, BD, smem, stream>>>(p);
  return 0;
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
  const float a2 = a_log2(p, channel_params(p, c, N).a[n]);
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
int launch(const Params& p, int variant, cudaStream_t stream) {
  const bool use_async = variant == 1 || (variant == 0 && async_ok<T>(p));
  if (variant == 1 && !async_ok<T>(p)) return -4;
  const dim3 block(BD);
  if (p.n_chunks > 1) {
    const dim3 grid1(p.channels / BD, p.n_chunks - 1, p.batch);
    if (use_async) {
      const int e = launch_async<T, BD, N, false>(p, grid1, stream);
      if (e) return e;
    } else {
      scan_kernel<T, BD, N, false><<<grid1, block, 0, stream>>>(p);
    }
    const int64_t total = p.batch * p.channels * N;
    carry_kernel<N><<<(unsigned)((total + 255) / 256), 256, 0, stream>>>(p);
  }
  const dim3 grid3(p.channels / BD, p.n_chunks, p.batch);
  if (use_async) {
    const int e = launch_async<T, BD, N, true>(p, grid3, stream);
    if (e) return e;
  } else {
    scan_kernel<T, BD, N, true><<<grid3, block, 0, stream>>>(p);
  }
  return (int)cudaGetLastError();
}

template <typename T, int N>
int launch_bd(const Params& p, int block_d, int variant, cudaStream_t stream) {
  switch (block_d) {
    case 128: return launch<T, 128, N>(p, variant, stream);
    case 64: return launch<T, 64, N>(p, variant, stream);
    case 32: return launch<T, 32, N>(p, variant, stream);
  }
  return -2;
}

template <typename T>
int launch_n(const Params& p, int n, int block_d, int variant, cudaStream_t stream) {
  switch (n) {
    case 8: return launch_bd<T, 8>(p, block_d, variant, stream);
    case 16: return launch_bd<T, 16>(p, block_d, variant, stream);
    case 32: return launch_bd<T, 32>(p, block_d, variant, stream);
  }
  return -3;
}

}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16 (u, delta, B, C and y alike). variant: 0 the pipelined kernel
// where the layout allows it, else the general one; 1 the pipelined one only; 2 the general one only.
// Returns a cudaError_t, or -1/-2/-3/-4 for an unsupported dtype / block size / state size / layout.
extern "C" __attribute__((visibility("default"))) int ssamba_chunk_scan(const Params* p, int dtype, int n_state, int block_d, int variant,
                                                                   void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0: return launch_n<float>(*p, n_state, block_d, variant, s);
    case 1: return launch_n<__nv_bfloat16>(*p, n_state, block_d, variant, s);
    case 2: return launch_n<__half>(*p, n_state, block_d, variant, s);
  }
  return -1;
}

extern "C" __attribute__((visibility("default"))) const char* ssamba_chunk_scan_error(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
