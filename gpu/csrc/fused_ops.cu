// Fused elementwise kernels of the transformer layer, and the greedy argmax over logits
// (gpu/fused_ops.py loads them with CuPy).
//
// Each replaces a chain of torch ops with one launch and rounds to the storage dtype exactly where
// torch's chain does, so the results match the torch reference (gpu/fused_ops.TorchOps) to within
// float summation order. Compiled once per dtype: -DUSE_BF16=1 (bfloat16) or 0 (float16).
//
// At decode batch sizes these kernels move a few hundred KB each, so what they cost is latency:
// every thread moves 16-byte vectors (8 values), and add_rms_norm keeps its row in registers
// between the sum of squares and the scaling. The Python side checks the shapes this needs
// (row lengths a multiple of 8, head_dim a multiple of 16, 16-byte aligned tensors).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if USE_BF16
typedef __nv_bfloat16 T;
__device__ __forceinline__ float to_f(T x) { return __bfloat162float(x); }
__device__ __forceinline__ T from_f(float x) { return __float2bfloat16_rn(x); }
#else
typedef __half T;
__device__ __forceinline__ float to_f(T x) { return __half2float(x); }
__device__ __forceinline__ T from_f(float x) { return __float2half_rn(x); }
#endif

// Round a float to the storage dtype and back: what a torch op on T tensors does to its result.
__device__ __forceinline__ float rnd(float x) { return to_f(from_f(x)); }

union V8 {  // 8 values of T in one 16-byte load or store
  uint4 u;
  T h[8];
};
__device__ __forceinline__ V8 ld8(const T* p) { V8 v; v.u = *reinterpret_cast<const uint4*>(p); return v; }
__device__ __forceinline__ void st8(T* p, const V8& v) { *reinterpret_cast<uint4*>(p) = v.u; }

constexpr int NORM_VECS = 4;  // 8-value vectors a thread holds: blockDim >= hidden / 32 (gpu/fused_ops.py)

// One block per row. If delta is given, first x += delta in place (the residual add, rounded to T
// as torch's add rounds it). `parts` instead of delta: float32 split-K partials of the projection
// (nparts x rows x hidden, part_stride apart), summed and rounded to T as the unsplit GEMM's output
// is, then added. Then out = w * T(x * rsqrt(mean(x^2) + eps)), normalised in float and cast to T
// before the weight, like Hugging Face's LlamaRMSNorm.
extern "C" __global__ void add_rms_norm(T* __restrict__ x, const T* __restrict__ delta,
                                        const float* __restrict__ parts, int nparts, long long part_stride,
                                        const T* __restrict__ w, T* __restrict__ out, int hidden, float eps) {
  const int nvec = hidden >> 3;
  const long long base = (long long)blockIdx.x * hidden;
  V8 xv[NORM_VECS], wv[NORM_VECS];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < NORM_VECS; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * 8;
    if (c >= hidden) break;
    wv[i] = ld8(w + c);
    xv[i] = ld8(x + base + c);
    if (delta != nullptr || parts != nullptr) {
      float d[8];
      if (delta != nullptr) {
        const V8 dv = ld8(delta + base + c);
#pragma unroll
        for (int e = 0; e < 8; ++e) d[e] = to_f(dv.h[e]);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) d[e] = 0.f;
        for (int p = 0; p < nparts; ++p) {
          const float4* src = reinterpret_cast<const float4*>(parts + p * part_stride + base + c);
          const float4 a = src[0], b = src[1];
          d[0] += a.x, d[1] += a.y, d[2] += a.z, d[3] += a.w, d[4] += b.x, d[5] += b.y, d[6] += b.z, d[7] += b.w;
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) d[e] = rnd(d[e]);
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) xv[i].h[e] = from_f(to_f(xv[i].h[e]) + d[e]);
      st8(x + base + c, xv[i]);
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float f = to_f(xv[i].h[e]);
      ss += f * f;
    }
  }
  __shared__ float partial[32];
  for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = ss;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < (int)(blockDim.x >> 5); ++i) total += partial[i];
  const float inv = rsqrtf(total / hidden + eps);
#pragma unroll
  for (int i = 0; i < NORM_VECS; ++i) {
    const int c = (threadIdx.x + i * blockDim.x) * 8;
    if (c >= hidden) break;
    V8 o;
#pragma unroll
    for (int e = 0; e < 8; ++e) o.h[e] = from_f(to_f(wv[i].h[e]) * rnd(to_f(xv[i].h[e]) * inv));
    st8(out + base + c, o);
  }
}

// One thread per (token, head, 8-value chunk of the first half of the head). qkv: (T, (hq + 2*hkv)
// * D) rows of one fused projection. Writes q (T, hq, D) and k (T, hkv, D) rotated by the
// rotate-half RoPE at each token's position, and v (T, hkv, D) copied, all contiguous. cos/sin:
// float tables (max_position, D), cast to T before use, as the torch reference casts its gathered
// tables.
extern "C" __global__ void split_rope(const T* __restrict__ qkv, const long long* __restrict__ positions,
                                      const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                      T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                                      int rows, int hq, int hkv, int head_dim) {
  const int half = head_dim >> 1, chunks = half >> 3, heads = hq + 2 * hkv;
  const long long total = (long long)rows * heads * chunks;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / (heads * chunks);
    const int rest = (int)(i - row * heads * chunks), head = rest / chunks, j = (rest - head * chunks) * 8;
    const T* src = qkv + (row * heads + head) * head_dim + j;
    const V8 a = ld8(src), b = ld8(src + half);  // x1 = a (dims j..j+7), x2 = b (j+half..)
    T* dst;
    if (head < hq) {
      dst = q + (row * hq + head) * head_dim + j;
    } else if (head < hq + hkv) {
      dst = k + (row * hkv + head - hq) * head_dim + j;
    } else {
      dst = v + (row * hkv + head - hq - hkv) * head_dim + j;
      st8(dst, a);
      st8(dst + half, b);
      continue;
    }
    const long long p = positions[row];
    const float* cs = cos_table + p * head_dim + j;
    const float* sn = sin_table + p * head_dim + j;
    V8 o1, o2;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float x1 = to_f(a.h[e]), x2 = to_f(b.h[e]);
      const float c1 = rnd(cs[e]), c2 = rnd(cs[e + half]), s1 = rnd(sn[e]), s2 = rnd(sn[e + half]);
      // out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded to T
      o1.h[e] = from_f(rnd(x1 * c1) + rnd(-x2 * s1));
      o2.h[e] = from_f(rnd(x2 * c2) + rnd(x1 * s2));
    }
    st8(dst, o1);
    st8(dst + half, o2);
  }
}

// gate_up: (rows, 2 * inter) = [gate | up]; out: (rows, inter) = T(silu(gate)) * up. One thread
// per 8 outputs, grid-stride.
extern "C" __global__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int rows, int inter) {
  const int per_row = inter >> 3;
  const long long total = (long long)rows * per_row;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long row = i / per_row;
    const int c = (int)(i - row * per_row) * 8;
    const T* gate = gate_up + row * 2 * inter + c;
    const V8 g = ld8(gate), u = ld8(gate + inter);
    V8 o;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float gf = to_f(g.h[e]);
      o.h[e] = from_f(rnd(gf / (1.f + expf(-gf))) * to_f(u.h[e]));
    }
    st8(out + row * inter + c, o);
  }
}

// Does (v, i) come before the best so far (bv, bi) in torch.argmax's order? The largest value,
// NaN above everything, and the first index among equals.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
  const bool vn = v != v, bn = bv != bv;
  if (vn != bn) return vn;
  return (!vn && v > bv) || ((vn || v == bv) && i < bi);
}

// One block per row of x (rows, vocab): out[row] = torch.argmax(x[row]). vocab % 8 == 0. Each
// thread issues ARGMAX_UNROLL independent 16-byte loads before it compares: enough bytes in flight
// to stream the logits at memory speed.
constexpr int ARGMAX_UNROLL = 4;
extern "C" __global__ void argmax_rows(const T* __restrict__ x, long long* __restrict__ out, int vocab) {
  const T* row = x + (long long)blockIdx.x * vocab;
  const int stride = blockDim.x * 8;
  float bv = __int_as_float(0xff800000);  // -inf
  int bi = 0x7fffffff;
  for (int c0 = threadIdx.x * 8; c0 < vocab; c0 += stride * ARGMAX_UNROLL) {
    V8 v[ARGMAX_UNROLL];
#pragma unroll
    for (int u = 0; u < ARGMAX_UNROLL; ++u)
      if (c0 + u * stride < vocab) v[u] = ld8(row + c0 + u * stride);
#pragma unroll
    for (int u = 0; u < ARGMAX_UNROLL; ++u) {
      const int c = c0 + u * stride;
      if (c >= vocab) break;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float f = to_f(v[u].h[e]);
        if (better(f, c + e, bv, bi)) bv = f, bi = c + e;
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (better(ov, oi, bv, bi)) bv = ov, bi = oi;
  }
  __shared__ float s_v[32];
  __shared__ int s_i[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) s_v[warp] = bv, s_i[warp] = bi;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
      if (better(s_v[w], s_i[w], bv, bi)) bv = s_v[w], bi = s_i[w];
    out[blockIdx.x] = bi;
  }
}
