// Fused elementwise kernels of the transformer layer (gpu/fused_ops.py loads them with CuPy).
//
// Each replaces a chain of torch ops with one launch and rounds to the storage dtype exactly where
// torch's chain does, so the results match the torch reference (gpu/fused_ops.TorchOps) to within
// float summation order. Compiled once per dtype: -DUSE_BF16=1 (bfloat16) or 0 (float16).
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

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) partial[0] = v;
    }
    __syncthreads();
    return partial[0];
}

// One block per row. If delta is given, first x += delta in place (the residual add, rounded to
// T as torch's add rounds it). Then out = w * T(x * rsqrt(mean(x^2) + eps)), the normalisation in
// float and cast to T before the weight, like Hugging Face's LlamaRMSNorm.
extern "C" __global__ void add_rms_norm(T* __restrict__ x, const T* __restrict__ delta, const T* __restrict__ w,
                                        T* __restrict__ out, int hidden, float eps) {
    const long long base = (long long)blockIdx.x * hidden;
    T* xr = x + base;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = to_f(xr[i]);
        if (delta != nullptr) {
            v = rnd(v + to_f(delta[base + i]));
            xr[i] = from_f(v);
        }
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        out[base + i] = from_f(to_f(w[i]) * rnd(to_f(xr[i]) * inv));
    }
}

// One block per token. qkv: (T, (hq + 2*hkv) * D) rows of one fused projection. Writes q (T, hq, D)
// and k (T, hkv, D) rotated by the rotate-half RoPE at each token's position, and v (T, hkv, D)
// copied, all contiguous. cos/sin: float tables (max_position, D), cast to T before use, as the
// torch reference casts its gathered tables.
extern "C" __global__ void split_rope(const T* __restrict__ qkv, const long long* __restrict__ positions,
                                      const float* __restrict__ cos_table, const float* __restrict__ sin_table,
                                      T* __restrict__ q, T* __restrict__ k, T* __restrict__ v,
                                      int hq, int hkv, int head_dim) {
    const int row = blockIdx.x, half = head_dim >> 1, heads = hq + 2 * hkv;
    const T* src_row = qkv + (long long)row * heads * head_dim;
    const long long p = positions[row];
    const float* cs = cos_table + p * head_dim;
    const float* sn = sin_table + p * head_dim;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int head = i / half, j = i - head * half;
        const T* src = src_row + head * head_dim;
        T* dst;
        if (head < hq) {
            dst = q + ((long long)row * hq + head) * head_dim;
        } else if (head < hq + hkv) {
            dst = k + ((long long)row * hkv + head - hq) * head_dim;
        } else {
            dst = v + ((long long)row * hkv + head - hq - hkv) * head_dim;
            dst[j] = src[j];
            dst[j + half] = src[j + half];
            continue;
        }
        const float x1 = to_f(src[j]), x2 = to_f(src[j + half]);
        const float c1 = rnd(cs[j]), c2 = rnd(cs[j + half]), s1 = rnd(sn[j]), s2 = rnd(sn[j + half]);
        // out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded to T
        dst[j] = from_f(rnd(x1 * c1) + rnd(-x2 * s1));
        dst[j + half] = from_f(rnd(x2 * c2) + rnd(x1 * s2));
    }
}

// gate_up: (rows, 2 * inter) = [gate | up]; out: (rows, inter) = T(silu(gate)) * up.
// Grid (column blocks, row blocks): no integer division per element.
extern "C" __global__ void silu_mul(const T* __restrict__ gate_up, T* __restrict__ out, int rows, int inter) {
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const T* gate = gate_up + (long long)row * 2 * inter;
        const T* up = gate + inter;
        T* dst = out + (long long)row * inter;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < inter; c += gridDim.x * blockDim.x) {
            const float g = to_f(gate[c]);
            dst[c] = from_f(rnd(g / (1.f + expf(-g))) * to_f(up[c]));
        }
    }
}
