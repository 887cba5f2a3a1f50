// Paged flash attention over the KV arena: ONE launch per layer per step for a ragged batch.
// Owns: the fused new-K/V scatter, causal tiled attention (mma.sync, online softmax, fp32
// accumulation) and the in-kernel flash-decoding combine. Loaded by gpu/cuda_attention.py.
//
// Compiled by NVRTC (or nvcc) per specialisation with -DATTN_BF16=0|1 -DHEAD_DIM=64|128
// -DBLOCK_SIZE=n -DKV_BITS=16|8|4 (-DKV4_GROUP=n). Header-free on purpose: f16/bf16 are raw 16-bit
// words, converted with PTX.
//
// KV_BITS=8|4: the arena holds codes plus scales (gpu/arena.py, KVQuant; `kvq` below): int8, one
// float32 scale a (token, kv head) row; int4, two codes a byte and one float16 scale a group of
// KV4_GROUP values of the row. The fused write quantizes (absmax / qmax, round half to even); each
// K/V tile is streamed as codes + scales into shared memory, then dequantized into one 16-bit tile
// that the unchanged mma loop reads. The step's own tokens, read from k_new/v_new, are quantized on
// the fly by the same code as the write, so attention always sees exactly the stored codes.
//
// Grid: (x = q tile, y = kv head, z = KV split). A q tile is up to TQ = BM / G new tokens of one
// request times the G q heads that share kv head y, so one K/V tile read from the arena serves
// all G heads (GQA). Request r owns tiles [cu_q[r]/TQ + r, cu_q[r+1]/TQ + r + 1); spare tiles
// exit at once. When every request's new tokens fit one q tile (one_tile = 1: decode), tile r is
// request r and the grid has no spare tiles. Two variants share the body:
//   m64: BM = 64 rows, 4 warps stacked over rows    (prefill chunks, mixed batches), 2 stages
//   m16: BM = 16 rows, 4 warps side by side over keys (decode: q_len * G <= 16); memory-bound,
//        so a deeper cp.async pipeline (M16_STAGES tiles) keeps more bytes in flight
// Positions before the step's first new token come from the arena through the block table;
// the step's new positions come from the k/v inputs, so no block waits on another's write.
//
// Fused RoPE (m16 only, when rope_cos != null): q and k_new are the QKV projection's output as it
// is, not yet rotated, and q/k_new/v_new point into one (T, q_stride) buffer. q is rotated in its
// mma fragments; the new keys on their way into the arena (split 0) and, in the K tile that holds
// them, after it lands in shared memory (rotate_new_keys). The position of token i of request r is
// seq_lens[r] - q_len + i. Every product and sum is rounded to 16 bits as a rotation in the model's
// dtype rounds it, so the arena, the scores and the output are bit for bit those of rotating first.
// A decode step thus runs no separate RoPE kernel and copies no q/k/v out of the projection. The
// prefill variant has none of this: each of a prompt's q tiles would rotate all its keys again.

typedef unsigned short u16;
typedef unsigned int u32;

#define NEG_INF __int_as_float(0xff800000)

constexpr int BN = 64;         // KV positions per tile
constexpr int NTHREADS = 128;  // 4 warps

__device__ __forceinline__ u32 smem_addr(const void* p) {
  u32 a;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}
// 16-byte async copy global -> shared; src_bytes = 0 zero-fills (keeps NaN garbage out of P*V).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// N-byte async copy (a quantized row's scales: 4 or 8 bytes); src_bytes = 0 zero-fills.
template <int N>
__device__ __forceinline__ void cp_async_ca(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(dst), "l"(src), "n"(N), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N)); }

__device__ __forceinline__ void ldsm_x4(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t(u32 a, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(a));
}

// c (16x8 f32) += a (16x16, row) * b (16x8, col)
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
  if constexpr (BF16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one 32-bit word of two 16-bit values, lo in the low half.
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
  if constexpr (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <bool BF16>
__device__ __forceinline__ float to_f32(u32 h) {  // the 16-bit value in the low half of h
  if constexpr (BF16) return __uint_as_float(h << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
  return f;
}

// 8 consecutive 16-bit values as floats; zeros when p is null.
template <bool BF16>
__device__ __forceinline__ void load8(const u16* p, float (&x)[8]) {
  const uint4 w = p ? *reinterpret_cast<const uint4*>(p) : uint4{0u, 0u, 0u, 0u};
  const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    x[2 * i] = to_f32<BF16>(ws[i] & 0xffffu);
    x[2 * i + 1] = to_f32<BF16>(ws[i] >> 16);
  }
}

// ---- quantized KV (KV_BITS=8|4) ---------------------------------------------------------------
// kvq<BITS, D>: how the arena stores a row of D values. BITS=16: the model's 16-bit dtype. Else
// KVQuant in gpu/arena.py: signed codes in [-QMAX, QMAX], one scale per GROUP values, 8 codes of
// one lane in a `word_t` (pack/unpack), codes decoded to floats exactly (the bits of 2^23 + u,
// minus 2^23 + bias: no int-to-float conversion).
template <int BITS, int D> struct kvq {
  typedef u16 code_t;
  typedef float scale_t;
  static constexpr int QMAX = 0, GROUP = D;
};
template <int D> struct kvq<8, D> {
  typedef signed char code_t;
  typedef float scale_t;  // one a row
  typedef uint2 word_t;
  static constexpr int QMAX = 127, GROUP = D;
  __device__ static __forceinline__ scale_t store_scale(float s) { return s; }
  __device__ static __forceinline__ float load_scale(scale_t s) { return s; }
  __device__ static __forceinline__ word_t pack(const int (&c)[8]) {
    u32 w[2];
#pragma unroll
    for (int h = 0; h < 2; ++h)
      w[h] = (u32)(c[4 * h] & 255) | (u32)(c[4 * h + 1] & 255) << 8 | (u32)(c[4 * h + 2] & 255) << 16 |
             (u32)(c[4 * h + 3] & 255) << 24;
    return uint2{w[0], w[1]};
  }
  __device__ static __forceinline__ void unpack(word_t w, float (&f)[8]) {
    const u32 x = w.x ^ 0x80808080u, y = w.y ^ 0x80808080u;  // offset binary: code + 128 per byte
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      f[e] = __int_as_float(0x4b000000 | ((x >> 8 * e) & 255)) - 8388736.f;
      f[4 + e] = __int_as_float(0x4b000000 | ((y >> 8 * e) & 255)) - 8388736.f;
    }
  }
};
#ifndef KV4_GROUP
#define KV4_GROUP 32
#endif
template <int D> struct kvq<4, D> {
  typedef unsigned char code_t;
  typedef u16 scale_t;  // float16, one a group; saturates at 65504 as KVQuant.quantize clamps
  typedef u32 word_t;   // value e in bits 4e..4e+3: two a byte, the even one low
  static constexpr int QMAX = 7, GROUP = KV4_GROUP;
  __device__ static __forceinline__ scale_t store_scale(float s) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(fminf(s, 65504.f)));
    return h;
  }
  __device__ static __forceinline__ float load_scale(scale_t s) { return to_f32<false>(s); }
  __device__ static __forceinline__ word_t pack(const int (&c)[8]) {
    u32 w = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) w |= (u32)(c[e] & 15) << 4 * e;
    return w;
  }
  __device__ static __forceinline__ void unpack(word_t w, float (&f)[8]) {
    const u32 x = w ^ 0x88888888u;  // offset binary: code + 8 per nibble
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = __int_as_float(0x4b000000 | ((x >> 4 * e) & 15)) - 8388616.f;
  }
};

// Symmetric quantization of one lane's 8 values of a row; the GROUP / 8 consecutive lanes of a group
// share its absmax (a butterfly: every lane of the warp must call it). The same float ops as
// KVQuant.quantize in gpu/arena.py (scale = absmax * (1/QMAX) rounded to its storage dtype, x times
// the reciprocal of that with IEEE rounding, round half to even), so codes and scales match torch
// bit for bit. Returns the stored scale.
template <int BITS, int D>
__device__ __forceinline__ typename kvq<BITS, D>::scale_t quantize_chunk(const float (&x)[8], int (&c)[8]) {
  typedef kvq<BITS, D> Q;
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(x[e]));
#pragma unroll
  for (int o = 1; o < Q::GROUP / 8; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const typename Q::scale_t stored = Q::store_scale(__fmul_rn(amax, 1.0f / Q::QMAX));
  const float scale = Q::load_scale(stored);
  const float inv = scale > 0.f ? __frcp_rn(scale) : 0.f;  // all-zero group: codes 0
  constexpr float QM = Q::QMAX;
#pragma unroll
  for (int e = 0; e < 8; ++e) c[e] = (int)fminf(fmaxf(rintf(__fmul_rn(x[e], inv)), -QM), QM);
  return stored;
}
// ---- fused RoPE ---------------------------------------------------------------------------------
template <bool BF16>
__device__ __forceinline__ float round16(float x) { return to_f32<BF16>(pack2<BF16>(x, 0.f) & 0xffffu); }
// One rotated value: x * cos - y * sin in the first half of a head, x * cos + y * sin in the second
// (y is the value half a head away), every product rounded to 16 bits and the caller rounding the
// sum: what the torch chain x * cos + rotate_half(x) * sin in 16-bit tensors computes.
template <bool BF16>
__device__ __forceinline__ float rope1(float x, float y, float c, float s, bool first) {
  const float a = round16<BF16>(x * round16<BF16>(c)), b = round16<BF16>(y * round16<BF16>(s));
  return first ? a - b : a + b;
}
// Chunk `ch` (8 values) of a new key row starting at `row`, as floats; rotated and rounded to 16
// bits when cs/sn (the RoPE tables' rows at the key's position) are given. Zeros when row is null.
template <bool BF16, int D>
__device__ __forceinline__ void load8_k(const u16* row, int ch, const float* cs, const float* sn, float (&x)[8]) {
  load8<BF16>(row ? row + ch * 8 : nullptr, x);
  if (!row || !cs) return;
  constexpr int HALF = D / 16;  // chunks in half a head
  float y[8];
  load8<BF16>(row + (ch ^ HALF) * 8, y);
  const int col = ch * 8;
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = round16<BF16>(rope1<BF16>(x[e], y[e], cs[col + e], sn[col + e], ch < HALF));
}
template <bool BF16>
__device__ __forceinline__ uint4 pack8(const float (&x)[8]) {
  return uint4{pack2<BF16>(x[0], x[1]), pack2<BF16>(x[2], x[3]), pack2<BF16>(x[4], x[5]), pack2<BF16>(x[6], x[7])};
}

// One lane's 8 values of a key/value row, dequantized (codes * scale in fp32) to 16-bit words for
// the mma. History rows decode their codes; a fresh row (this step's token, `fresh_row` in
// k_new/v_new, rotated when cs is given) is quantized first, exactly as the fused write stores it.
// `codes`: the lane's code word in shared memory, `scale`: its group's. Warp-uniform entry.
template <bool BF16, int BITS, int D>
__device__ __forceinline__ uint4 dequant_chunk(const u16* fresh_row, int ch, const float* cs, const float* sn,
                                               const unsigned char* codes, float scale) {
  typedef kvq<BITS, D> Q;
  float f[8];
  if (__any_sync(0xffffffffu, fresh_row != nullptr)) {  // uniform branch: quantize_chunk shuffles
    float x[8];
    int c[8];
    load8_k<BF16, D>(fresh_row, ch, cs, sn, x);
    const float s = Q::load_scale(quantize_chunk<BITS, D>(x, c));
    if (fresh_row) {
      scale = s;
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = (float)c[e];
    }
  }
  if (!fresh_row) Q::unpack(*reinterpret_cast<const typename Q::word_t*>(codes), f);
  return uint4{pack2<BF16>(f[0] * scale, f[1] * scale), pack2<BF16>(f[2] * scale, f[3] * scale),
               pack2<BF16>(f[4] * scale, f[5] * scale), pack2<BF16>(f[6] * scale, f[7] * scale)};
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// L2-only loads for the split combine: other blocks wrote these in this very launch.
__device__ __forceinline__ float ld_cg(const float* p) {
  float x;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(x) : "l"(p));
  return x;
}
__device__ __forceinline__ float4 ld_cg4(const float* p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ float shfl_max4(float x) {  // max over the 4 lanes sharing a row
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float shfl_sum4(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Byte offset of 16-byte chunk `ch` of row `row` in a [rows][D] 16-bit tile. XOR-swizzling the
// chunk with row%8 makes the 8 row addresses of each ldmatrix phase hit distinct bank groups.
template <int D>
__device__ __forceinline__ u32 swz(int row, int ch) {
  return (u32)(row * D + ((ch ^ (row & 7)) << 3)) * 2u;
}

// Rotate, in a landed 16-bit K tile (BN rows from position p0, swizzled), the rows of positions
// [ctx_start, kv_end): the step's new keys, copied in as the projection wrote them. One thread per
// pair of chunks half a head apart.
template <bool BF16, int D>
__device__ __forceinline__ void rotate_new_keys(u16* tile, int p0, int ctx_start, int kv_end, const float* rope_cos,
                                                const float* rope_sin) {
  constexpr int HALF = D / 16;  // chunks in half a head
  const int lo = max(ctx_start - p0, 0), hi = min(kv_end - p0, BN);
  for (int c = threadIdx.x; c < (hi - lo) * HALF; c += NTHREADS) {
    const int row = lo + c / HALF, ch = c % HALF;
    uint4* a = reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(tile) + swz<D>(row, ch));
    uint4* b = reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(tile) + swz<D>(row, ch + HALF));
    const uint4 wa = *a, wb = *b;
    const u32 xa[4] = {wa.x, wa.y, wa.z, wa.w}, xb[4] = {wb.x, wb.y, wb.z, wb.w};
    const float* cs = rope_cos + (long long)(p0 + row) * D + ch * 8;
    const float* sn = rope_sin + (long long)(p0 + row) * D + ch * 8;
    float o1[8], o2[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const u32 wx = xa[e / 2], wy = xb[e / 2];
      const float x = to_f32<BF16>(e & 1 ? wx >> 16 : wx & 0xffffu), y = to_f32<BF16>(e & 1 ? wy >> 16 : wy & 0xffffu);
      o1[e] = rope1<BF16>(x, y, cs[e], sn[e], true);
      o2[e] = rope1<BF16>(y, x, cs[D / 2 + e], sn[D / 2 + e], false);
    }
    *a = pack8<BF16>(o1);
    *b = pack8<BF16>(o2);
  }
}

// STAGES: K/V tiles in flight in shared memory. KVB: bits a stored K/V value, 16 (the model's
// dtype) or 8 / 4 (codes + scales, kvq). ROPE: the variant can apply RoPE (when rope_cos is given);
// without it the code is compiled out.
template <bool BF16, int KVB, bool ROPE, int D, int BS, int WARPS_N, int STAGES>
__device__ __forceinline__ void attention_tile(
    u16* __restrict__ out, const u16* __restrict__ q, const u16* __restrict__ k_new,
    const u16* __restrict__ v_new, typename kvq<KVB, D>::code_t* __restrict__ k_cache,
    typename kvq<KVB, D>::code_t* __restrict__ v_cache, typename kvq<KVB, D>::scale_t* __restrict__ k_scales,
    typename kvq<KVB, D>::scale_t* __restrict__ v_scales,
    const int* __restrict__ cu_seqlens_q, const int* __restrict__ seq_lens, const int* __restrict__ cu_blocks,
    const int* __restrict__ block_tables, const long long* __restrict__ slot_mapping, float* __restrict__ ws_o,
    float* __restrict__ ws_ml, int* __restrict__ counters, const float* __restrict__ rope_cos_arg,
    const float* __restrict__ rope_sin, int q_stride, int kv_stride, int num_seqs, int num_q_heads, int num_kv_heads,
    float scale_log2, int one_tile) {
  constexpr int WARPS_M = 4 / WARPS_N;
  constexpr int BM = 16 * WARPS_M;  // rows = (token, q head of the group) pairs
  constexpr int NW = BN / WARPS_N;  // key columns per warp
  constexpr int NT = NW / 8;        // n8 score tiles per warp
  constexpr int DC = D / 8;         // 16-byte chunks per row
  constexpr int OS = D + 4;         // fp32 row stride of the epilogue buffer (padding vs bank conflicts)
  // Quantized arenas (QUANT): a row is RB bytes of codes and NSC scales (SB bytes); LANES lanes of
  // 8 values share a scale.
  typedef kvq<KVB, D> Q;
  typedef typename Q::scale_t scale_t;
  constexpr bool QUANT = KVB != 16;
  constexpr int RB = D * KVB / 8, LANES = Q::GROUP / 8, NSC = D / Q::GROUP, SB = NSC * (int)sizeof(scale_t);
  // 16-bit tiles the mma loop reads: every stage (16-bit arena), or one dequantized tile (quantized).
  constexpr int TILES16 = QUANT ? 1 : STAGES;
  constexpr int SMEM = TILES16 * 2 * BN * D * 2 + (QUANT ? STAGES * 2 * BN * RB : 0);  // gpu/cuda_attention.py
  static_assert(WARPS_N * BM * OS * 4 <= SMEM, "epilogue buffer must fit in the stages");
  static_assert(STAGES >= 2 && BN <= NTHREADS && (BN * DC) % NTHREADS == 0, "tile shape");
  static_assert(!QUANT || ((BN * RB / 16) % NTHREADS == 0 && 32 % DC == 0 && D % Q::GROUP == 0 &&
                           Q::GROUP % 8 == 0 && (SB == 4 || SB == 8 || SB == 16)), "quantized tile shape");

  const float* __restrict__ rope_cos = ROPE ? rope_cos_arg : nullptr;  // null: inputs already rotated
  extern __shared__ __align__(16) unsigned char smem[];
  u16* sK = reinterpret_cast<u16*>(smem);    // TILES16 x (BN, D)
  u16* sV = sK + TILES16 * BN * D;           // TILES16 x (BN, D)
  unsigned char* sCK = reinterpret_cast<unsigned char*>(sV + TILES16 * BN * D);  // codes: STAGES x (BN, RB)
  unsigned char* sCV = sCK + STAGES * BN * RB;                                    // codes: STAGES x (BN, RB)
  float* sO = reinterpret_cast<float*>(sK);  // epilogue: (WARPS_N*BM, OS), reuses the stages
  __shared__ long long s_off[STAGES][BN];    // per stage: element offset of each key row's source
  __shared__ __align__(16) unsigned char s_scale[2][QUANT ? STAGES : 1][BN * SB];  // K and V rows' scales per stage
  __shared__ float red_m[WARPS_N][BM], red_l[WARPS_N][BM];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % WARPS_M, wn = warp / WARPS_M;
  const int bx = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
  const int G = num_q_heads / num_kv_heads;
  const int TQ = BM / G;  // tokens per q tile

  // Request owning tile bx: the largest r with cu_q[r]/TQ + r <= bx. The left side strictly
  // increases in r, so that r is the count of r in [1, num_seqs) that pass. The block tests
  // NTHREADS x 4 candidates at once and counts them in barriers: one load's latency before the
  // first K/V tile can be fetched, where a binary search waited for log2(num_seqs) in a row.
  int req = one_tile ? bx : 0;
  for (int base = 1; !one_tile && base < num_seqs; base += 4 * NTHREADS) {  // uniform: barriers inside
    int pass[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = base + i * NTHREADS + tid;
      pass[i] = r < num_seqs && cu_seqlens_q[r] / TQ + r <= bx;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) req += __syncthreads_count(pass[i]);
  }
  const int q_start = cu_seqlens_q[req];
  const int q_len = cu_seqlens_q[req + 1] - q_start;
  const int req_tiles = (q_len + TQ - 1) / TQ;
  const int local = one_tile ? 0 : bx - (q_start / TQ + req);
  if (local >= req_tiles) return;             // spare tile
  const int t0 = (req_tiles - 1 - local) * TQ;  // last (longest) q tiles first: shorter causal tail
  const int nq = min(TQ, q_len - t0);
  const int ctx_start = seq_lens[req] - q_len;  // position of the step's first new token
  const int kv_hi = ctx_start + t0 + nq;        // this tile attends to keys [0, kv_hi)
  const int n_tiles = (kv_hi + BN - 1) / BN;
  const int tps = (n_tiles + nsplit - 1) / nsplit;  // key tiles per split
  const int n_active = (n_tiles + tps - 1) / tps;   // splits that own at least one tile
  if (split >= n_active) return;
  const int tile_lo = split * tps;
  const int tile_hi = min(n_tiles, tile_lo + tps);
  const int kv_end = min(kv_hi, tile_hi * BN);
  const int* bt = block_tables + cu_blocks[req];
  const long long head_off = (long long)kvh * BS * D;      // arena: (block, head, slot, d)
  const long long blk_stride = (long long)num_kv_heads * BS * D;

  // Fused scatter of this tile's new K/V into the arena (split 0 only, so each token once).
  // Nothing in this launch reads these slots: new positions are read from k_new/v_new below.
  if (split == 0 && !QUANT) {
    for (int c = tid; c < nq * DC; c += NTHREADS) {
      const int tok = q_start + t0 + c / DC, ch = c % DC;
      const long long slot = slot_mapping[tok];
      const long long dst = (slot / BS) * blk_stride + head_off + (slot % BS) * D + ch * 8;
      const long long src = (long long)tok * kv_stride + kvh * D;  // the token's row of this kv head
      if (rope_cos) {
        const long long pos = ctx_start + t0 + c / DC;
        float x[8];
        load8_k<BF16, D>(k_new + src, ch, rope_cos + pos * D, rope_sin + pos * D, x);
        *reinterpret_cast<uint4*>(k_cache + dst) = pack8<BF16>(x);
      } else {
        *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(k_new + src + ch * 8);
      }
      *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(v_new + src + ch * 8);
    }
  }
  // Quantized, split 0 only: a group's LANES lanes share its absmax, so every lane takes the same
  // trip count (spare rows hold zeros).
  if constexpr (QUANT) {
    for (int c0 = 0; split == 0 && c0 < nq * DC; c0 += NTHREADS) {
      const int c = c0 + tid, ch = c % DC, tok = q_start + t0 + c / DC;
      const bool ok = c < nq * DC;
      const long long src = (long long)tok * kv_stride + kvh * D, pos = ctx_start + t0 + c / DC;
      float xk[8], xv[8];
      load8_k<BF16, D>(ok ? k_new + src : nullptr, ch, rope_cos ? rope_cos + pos * D : nullptr,
                       rope_sin + pos * D, xk);
      load8<BF16>(ok ? v_new + src + ch * 8 : nullptr, xv);
      int ck[8], cv[8];
      const scale_t sk = quantize_chunk<KVB, D>(xk, ck), sv = quantize_chunk<KVB, D>(xv, cv);
      if (ok) {
        const long long slot = slot_mapping[tok];
        const long long row = (slot / BS) * num_kv_heads * BS + (long long)kvh * BS + slot % BS;  // row index
        *reinterpret_cast<typename Q::word_t*>(k_cache + row * RB + ch * KVB) = Q::pack(ck);  // KVB bytes: 8 codes
        *reinterpret_cast<typename Q::word_t*>(v_cache + row * RB + ch * KVB) = Q::pack(cv);
        if (ch % LANES == 0) {
          k_scales[row * NSC + ch / LANES] = sk;
          v_scales[row * NSC + ch / LANES] = sv;
        }
      }
    }
  }

  // Element offset of key row `row` of `tile`, into k_cache/v_cache (history, through the block
  // table) or k_new/v_new (this step's tokens). Computed a tile before its loads are issued, by
  // threads < BN, and kept in s_off: the block-table load's latency never delays a cp.async.
  auto row_off = [&](int tile, int row) -> long long {
    const int p = tile * BN + row;
    if (p >= kv_end) return 0;  // zero-filled row
    if (p >= ctx_start) return (long long)(q_start + p - ctx_start) * kv_stride + kvh * D;
    return (long long)bt[p / BS] * blk_stride + head_off + (long long)(p % BS) * D;
  };
  auto load_kv = [&](int tile, int stage) {
    if constexpr (QUANT) {  // history rows' codes (RB bytes) and scales; fresh rows are read later
      constexpr int RC = RB / 16;  // 16-byte chunks per row of codes
      const u32 dk = smem_addr(sCK + stage * BN * RB), dv = smem_addr(sCV + stage * BN * RB);
#pragma unroll
      for (int i = 0; i < BN * RC / NTHREADS; ++i) {
        const int c = tid + i * NTHREADS, row = c / RC, ch = c % RC, p = tile * BN + row;
        const bool hist = p < ctx_start && p < kv_end;
        const long long o = hist ? s_off[stage][row] / D * RB + ch * 16 : 0;  // s_off counts D values a row
        cp_async16(dk + row * RB + ch * 16, k_cache + o, hist ? 16 : 0);
        cp_async16(dv + row * RB + ch * 16, v_cache + o, hist ? 16 : 0);
      }
      if (tid < BN) {
        const int p = tile * BN + tid;
        const bool hist = p < ctx_start && p < kv_end;
        const long long r = hist ? s_off[stage][tid] / D : 0;  // scales share the codes' row index
        cp_async_ca<SB>(smem_addr(&s_scale[0][stage][tid * SB]), k_scales + r * NSC, hist ? SB : 0);
        cp_async_ca<SB>(smem_addr(&s_scale[1][stage][tid * SB]), v_scales + r * NSC, hist ? SB : 0);
      }
    } else {
      const u32 dk = smem_addr(sK + stage * BN * D), dv = smem_addr(sV + stage * BN * D);
#pragma unroll 4
      for (int i = 0; i < BN * DC / NTHREADS; ++i) {
        const int c = tid + i * NTHREADS, row = c / DC, ch = c % DC, p = tile * BN + row;
        const long long o = s_off[stage][row] + ch * 8;
        const bool hist = p < ctx_start;
        const int bytes = p < kv_end ? 16 : 0;
        cp_async16(dk + swz<D>(row, ch), (hist ? k_cache : k_new) + o, bytes);
        cp_async16(dv + swz<D>(row, ch), (hist ? v_cache : v_new) + o, bytes);
      }
    }
  };
  // Pipeline: tile i lives in stage i % STAGES and is cp.async group i (empty groups past the end
  // keep the count uniform); STAGES - 1 tiles are in flight while one is computed.
  if (tid < BN) {
#pragma unroll
    for (int st = 0; st < STAGES; ++st)
      if (tile_lo + st < tile_hi) s_off[st][tid] = row_off(tile_lo + st, tid);
  }
  __syncthreads();
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (tile_lo + st < tile_hi) load_kv(tile_lo + st, st);
    cp_async_commit();
  }

  // This thread's two rows: lane/4 and lane/4 + 8 of the warp's 16. Q goes straight from global
  // memory into mma A fragments (read once per block; keeps shared memory for K/V stages).
  int qpos[2];
  const u16* qrow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wm * 16 + (lane >> 2) + r * 8, tok = row / G;
    const bool ok = row < TQ * G && tok < nq;
    qpos[r] = ok ? ctx_start + t0 + tok : -1;
    qrow[r] = ok ? q + (long long)(q_start + t0 + tok) * q_stride + (kvh * G + row % G) * D : nullptr;
  }
  u32 qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {  // A fragment: h&1 picks row g / g+8, h>>1 the k half
      const u16* r = qrow[h & 1];
      qf[kk][h] = r ? *reinterpret_cast<const u32*>(r + kk * 16 + (h >> 1) * 8 + 2 * (lane & 3)) : 0u;
    }
  }
  if (rope_cos) {  // rotate q in its fragments: the word of columns c, c+1 pairs with c+D/2, c+D/2+1,
#pragma unroll     // which this lane holds in fragment kk + D/32
    for (int kk = 0; kk < D / 32; ++kk) {
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        if (qpos[h & 1] < 0) continue;
        const int col = kk * 16 + (h >> 1) * 8 + 2 * (lane & 3);
        const float* cs = rope_cos + (long long)qpos[h & 1] * D + col;
        const float* sn = rope_sin + (long long)qpos[h & 1] * D + col;
        const u32 w1 = qf[kk][h], w2 = qf[kk + D / 32][h];
        const float a0 = to_f32<BF16>(w1 & 0xffffu), a1 = to_f32<BF16>(w1 >> 16);
        const float b0 = to_f32<BF16>(w2 & 0xffffu), b1 = to_f32<BF16>(w2 >> 16);
        qf[kk][h] = pack2<BF16>(rope1<BF16>(a0, b0, cs[0], sn[0], true), rope1<BF16>(a1, b1, cs[1], sn[1], true));
        qf[kk + D / 32][h] = pack2<BF16>(rope1<BF16>(b0, a0, cs[D / 2], sn[D / 2], false),
                                         rope1<BF16>(b1, a1, cs[D / 2 + 1], sn[D / 2 + 1], false));
      }
    }
  }
  const int mask_from = min(kv_end, ctx_start + t0 + 1);  // tiles ending past this need masks

  float acc[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

  const int n_it = tile_hi - tile_lo;
  for (int it = 0; it < n_it; ++it) {
    const int stage = it % STAGES, tile = tile_lo + it;
    if (it + STAGES - 1 < n_it) load_kv(tile + STAGES - 1, (it + STAGES - 1) % STAGES);  // that stage
    cp_async_commit();  // was computed last iteration (closing barrier) and its s_off filled then
    // Row offsets of tile+STAGES go to s_off[stage] (tile's own loads were issued long ago). Loaded
    // here, stored after the compute below, so the block-table latency hides behind it.
    const bool next_off = tid < BN && tile + STAGES < tile_hi;
    const long long off_next = next_off ? row_off(tile + STAGES, tid) : 0;
    cp_async_wait<STAGES - 1>();  // group `it` (this tile) has landed, for this thread
    __syncthreads();  // sync point: this stage's tile visible to all warps
    if constexpr (QUANT) {  // codes stage -> the 16-bit tile (same swizzle), rows of D/8 lanes
#pragma unroll 2
      for (int i = 0; i < BN * DC / NTHREADS; ++i) {
        const int c = tid + i * NTHREADS, row = c / DC, ch = c % DC, p = tile * BN + row;
        const bool fresh = p >= ctx_start && p < kv_end;  // this step's token: from k_new/v_new
        const long long o = s_off[stage][row];  // a fresh row's start in k_new/v_new
        const int at = (stage * BN + row) * RB + ch * KVB;  // this lane's code word
        const int sc = row * SB + ch / LANES * (int)sizeof(scale_t);  // its group's scale
        const float* cs = rope_cos ? rope_cos + (long long)p * D : nullptr;
        const float sk = Q::load_scale(*reinterpret_cast<const scale_t*>(&s_scale[0][stage][sc]));
        const float sv = Q::load_scale(*reinterpret_cast<const scale_t*>(&s_scale[1][stage][sc]));
        const uint4 kx = dequant_chunk<BF16, KVB, D>(fresh ? k_new + o : nullptr, ch, cs,
                                                     rope_sin + (long long)p * D, sCK + at, sk);
        const uint4 vx = dequant_chunk<BF16, KVB, D>(fresh ? v_new + o : nullptr, ch, nullptr, nullptr, sCV + at, sv);
        *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(sK) + swz<D>(row, ch)) = kx;
        *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(sV) + swz<D>(row, ch)) = vx;
      }
      __syncthreads();  // sync point: the dequantized tile visible to all warps
    } else if (rope_cos && (tile + 1) * BN > ctx_start) {  // uniform: this tile holds new keys, landed
      rotate_new_keys<BF16, D>(sK + stage * BN * D, tile * BN, ctx_start, kv_end, rope_cos, rope_sin);
      __syncthreads();  // sync point: the rotated keys visible to all warps
    }
    const int t16 = QUANT ? 0 : stage;
    const u32 kb = smem_addr(sK + t16 * BN * D), vb = smem_addr(sV + t16 * BN * D);

    // S = Q K^T for this warp's 16 rows x NW keys.
    float s[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int k2 = 0; k2 < D / 32; ++k2) {
        u32 b0, b1, b2, b3;
        const int row = wn * NW + j * 8 + (lane & 7), ch = k2 * 4 + (lane >> 3);
        ldsm_x4(kb + swz<D>(row, ch), b0, b1, b2, b3);
        mma16816<BF16>(s[j], qf[2 * k2], b0, b1);
        mma16816<BF16>(s[j], qf[2 * k2 + 1], b2, b3);
      }
    }

    // Online softmax in the log2 domain.
    const int n0 = tile * BN + wn * NW;
    const bool need_mask = (tile + 1) * BN > mask_from;
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if (need_mask) {
          const int p = n0 + j * 8 + 2 * (lane & 3) + (e & 1);
          if (p > qpos[e >> 1] || p >= kv_end) x = NEG_INF;
        }
        s[j][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float mu[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = shfl_max4(mx[r]);
      mu[r] = mx[r] == NEG_INF ? 0.f : mx[r];  // fully masked row so far: avoid inf - inf
      const float alpha = ex2(m_run[r] - mu[r]);
      m_run[r] = mx[r];
      l_run[r] *= alpha;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[n][2 * r] *= alpha;
        acc[n][2 * r + 1] *= alpha;
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = ex2(s[j][e] - mu[e >> 1]);
        l_run[e >> 1] += s[j][e];
      }
    }

    // O += P V; P's accumulator layout is exactly the A-fragment layout of the next mma.
#pragma unroll
    for (int kp = 0; kp < NW / 16; ++kp) {
      u32 pa[4];
      pa[0] = pack2<BF16>(s[2 * kp][0], s[2 * kp][1]);
      pa[1] = pack2<BF16>(s[2 * kp][2], s[2 * kp][3]);
      pa[2] = pack2<BF16>(s[2 * kp + 1][0], s[2 * kp + 1][1]);
      pa[3] = pack2<BF16>(s[2 * kp + 1][2], s[2 * kp + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        u32 b0, b1, b2, b3;
        const int row = wn * NW + kp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ch = dp * 2 + (lane >> 4);
        ldsm_x4_t(vb + swz<D>(row, ch), b0, b1, b2, b3);
        mma16816<BF16>(acc[2 * dp], pa, b0, b1);
        mma16816<BF16>(acc[2 * dp + 1], pa, b2, b3);
      }
    }
    if (next_off) s_off[stage][tid] = off_next;
    __syncthreads();  // sync point: stage free before the next iteration's prefetch overwrites it
  }

  cp_async_wait<0>();  // only empty groups remain; the stages become the epilogue buffer
  // Epilogue: merge the WARPS_N column-warps of each row through shared memory.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l_run[r] = shfl_sum4(l_run[r]);
    if ((lane & 3) == 0) {
      const int row = wm * 16 + (lane >> 2) + r * 8;
      red_m[wn][row] = m_run[r];
      red_l[wn][row] = l_run[r];
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = wm * 16 + (lane >> 2) + r * 8;
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) M = fmaxf(M, red_m[w][row]);
    const float f = M == NEG_INF ? 0.f : ex2(m_run[r] - M);
    float* dst = sO + (wn * BM + row) * OS + 2 * (lane & 3);
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dst + n * 8) = float2{acc[n][2 * r] * f, acc[n][2 * r + 1] * f};
  }
  __syncthreads();

  const long long part0 = ((long long)bx * num_kv_heads + kvh) * nsplit;  // first partial of this tile
  for (int e = tid; e < BM * D / 4; e += NTHREADS) {
    const int row = e / (D / 4), c4 = e % (D / 4), tok = row / G;
    if (row >= TQ * G || tok >= nq) continue;
    float M = NEG_INF, L = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) M = fmaxf(M, red_m[w][row]);
    float4 o = float4{0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < WARPS_N; ++w) {
      L += M == NEG_INF ? 0.f : red_l[w][row] * ex2(red_m[w][row] - M);
      const float4 x = *reinterpret_cast<const float4*>(sO + (w * BM + row) * OS + c4 * 4);
      o.x += x.x; o.y += x.y; o.z += x.z; o.w += x.w;
    }
    if (n_active == 1) {
      const float inv = L > 0.f ? 1.f / L : 0.f;
      const long long dst = ((long long)(q_start + t0 + tok) * num_q_heads + kvh * G + row % G) * D + c4 * 4;
      *reinterpret_cast<uint2*>(out + dst) = uint2{pack2<BF16>(o.x * inv, o.y * inv), pack2<BF16>(o.z * inv, o.w * inv)};
    } else {  // unnormalised partial of this split
      const long long pb = (part0 + split) * BM + row;
      *reinterpret_cast<float4*>(ws_o + pb * D + c4 * 4) = o;
      if (c4 == 0) {
        ws_ml[2 * pb] = M;
        ws_ml[2 * pb + 1] = L;
      }
    }
  }
  if (n_active == 1) return;

  // Flash-decoding combine inside this launch: the last split block of the tile to finish merges
  // the partials (threadfence + counter, as in CUDA's threadFenceReduction sample), then re-arms
  // the counter to 0 for the next launch (keeps CUDA-graph replays valid).
  __threadfence();
  __syncthreads();
  int* counter = counters + (long long)bx * num_kv_heads + kvh;
  if (tid == 0) s_last = atomicAdd(counter, 1) == n_active - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int e = tid; e < BM * D / 4; e += NTHREADS) {
    const int row = e / (D / 4), c4 = e % (D / 4), tok = row / G;
    if (row >= TQ * G || tok >= nq) continue;
    float M = NEG_INF;
    for (int sp = 0; sp < n_active; ++sp) M = fmaxf(M, ld_cg(ws_ml + 2 * ((part0 + sp) * BM + row)));
    float L = 0.f;
    float4 o = float4{0.f, 0.f, 0.f, 0.f};
    for (int sp = 0; sp < n_active; ++sp) {
      const long long pb = (part0 + sp) * BM + row;
      const float w = ex2(ld_cg(ws_ml + 2 * pb) - M);  // M is finite: split 0 holds key 0
      L += w * ld_cg(ws_ml + 2 * pb + 1);
      const float4 x = ld_cg4(ws_o + pb * D + c4 * 4);
      o.x += w * x.x; o.y += w * x.y; o.z += w * x.z; o.w += w * x.w;
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;
    const long long dst = ((long long)(q_start + t0 + tok) * num_q_heads + kvh * G + row % G) * D + c4 * 4;
    *reinterpret_cast<uint2*>(out + dst) = uint2{pack2<BF16>(o.x * inv, o.y * inv), pack2<BF16>(o.z * inv, o.w * inv)};
  }
  if (tid == 0) *counter = 0;
}

#if defined(HEAD_DIM) && defined(BLOCK_SIZE) && defined(ATTN_BF16)
#ifndef KV_BITS
#define KV_BITS 16
#endif
// k_cache/v_cache: 16-bit words, or codes with k_scales/v_scales (null for a 16-bit arena).
#define ATTN_PARAMS                                                                                          \
  u16 *out, const u16 *q, const u16 *k_new, const u16 *v_new, void *k_cache, void *v_cache, void *k_scales,  \
      void *v_scales, const int *cu_seqlens_q, const int *seq_lens, const int *cu_blocks,                    \
      const int *block_tables, const long long *slot_mapping, float *ws_o, float *ws_ml, int *counters,       \
      const float *rope_cos, const float *rope_sin, int q_stride, int kv_stride, int num_seqs, int num_q_heads, \
      int num_kv_heads, float scale_log2, int one_tile
#define KV_T kvq<KV_BITS, HEAD_DIM>::code_t
#define SC_T kvq<KV_BITS, HEAD_DIM>::scale_t
#define ATTN_ARGS                                                                                          \
  out, q, k_new, v_new, static_cast<KV_T*>(k_cache), static_cast<KV_T*>(v_cache), static_cast<SC_T*>(k_scales), \
      static_cast<SC_T*>(v_scales),                                                                         \
      cu_seqlens_q, seq_lens, cu_blocks, block_tables, slot_mapping, ws_o, ws_ml, counters, rope_cos,       \
      rope_sin, q_stride, kv_stride, num_seqs, num_q_heads, num_kv_heads, scale_log2, one_tile

// M64_MIN_BLOCKS=3 caps registers at 168 so three prefill blocks share an SM at D=128 (a few
// spills; without it ptxas takes ~172 registers and two blocks fit). D=64 fits three unbounded.
#if defined(M64_MIN_BLOCKS) && M64_MIN_BLOCKS > 1 && HEAD_DIM > 64
#define M64_BOUNDS __launch_bounds__(NTHREADS, M64_MIN_BLOCKS)
#else
#define M64_BOUNDS __launch_bounds__(NTHREADS)
#endif
extern "C" __global__ void M64_BOUNDS paged_attention_m64(ATTN_PARAMS) {
  attention_tile<ATTN_BF16 != 0, KV_BITS, false, HEAD_DIM, BLOCK_SIZE, 1, 2>(ATTN_ARGS);
}
// Decode is memory-bound: 3 stages (96 KB, 2 blocks/SM) measured best at D=128, 2 stages (32 KB,
// 4+ blocks/SM) at D=64. The loader passes -DM16_STAGES (the bench can vary it).
#ifndef M16_STAGES
#define M16_STAGES (HEAD_DIM == 64 ? 2 : 3)
#endif
// At D=64 the bound holds the decode kernel to 128 registers, so 4 blocks share an SM (the fused
// RoPE code would otherwise take it to ~138 and 3 blocks).
extern "C" __global__ void __launch_bounds__(NTHREADS, HEAD_DIM == 64 ? 4 : 1) paged_attention_m16(ATTN_PARAMS) {
  attention_tile<ATTN_BF16 != 0, KV_BITS, true, HEAD_DIM, BLOCK_SIZE, 4, M16_STAGES>(ATTN_ARGS);
}
#endif
