// linear_portable.cu — the contract's linear on CUDA cores, bit-identical to reference::linear.
//
// y[m, n] = Σ_k x[m, k] · W[n, k], W stored as f32 / bf16 / f16 (widened exactly) or as GGUF
// Q8_0 / Q4_0 / Q4_1 blocks (widened by the one formula of ls_load_w, in registers).
//
// Order (docs/DESIGN.md §2.1): K is cut into `count` segments of `seg_len` (a multiple of 16);
// inside a segment logical lane l accumulates elements l, l+16, … with fma from +0.0, the 16 lanes
// meet in the halving tree, the segment sums in the pairwise tree.
//
// Mapping: one half-warp computes one (output row n, segment s) pair, physical lane l being
// logical lane l, so the in-segment order is the contract's by construction; the lane tree is
// ls_half_warp_tree (shuffles). A block is 16 half-warps: with count < 16 segments a block covers
// 16/count output rows (all their segments at once); with more, each half-warp walks count/16
// segments of one row. Segment sums go to shared memory and one thread per output runs the
// pairwise tree. Each half-warp also carries MT rows of x (MT accumulators per lane), so a weight
// element is loaded once for MT rows: decode (M = 1) is a pure weight stream, read once, with 16
// consecutive elements per half-warp load (one 32-byte sector for bf16). MT is picked from M on
// the host — it changes how much work one thread does, never the order of any output's sum.
#include "common.cuh"

template <int DT, int MT>
__device__ __forceinline__ void linear_portable_impl(const float* __restrict__ x, const u8* __restrict__ w,
                                                     float* __restrict__ y, int M, int N, int k_real, int seg_len,
                                                     int count) {
    // [rows of this block][MT][count]; rows · count = max(16, count) ≤ 64.
    __shared__ float sums[64 * MT];
    const int hw = threadIdx.x >> 4;
    const int l = threadIdx.x & 15;
    const int hpr = count < 16 ? count : 16; // half-warps per output row
    const int rpb = 16 / hpr;                // output rows per block
    const int r_local = hw / hpr;
    const int sub = hw % hpr;
    // Past the last row / last x row, threads compute on a valid row and drop the result: every
    // lane of every warp must reach the shuffles.
    const int n_raw = blockIdx.x * rpb + r_local;
    const int n = n_raw < N ? n_raw : N - 1;
    const int m0 = blockIdx.y * MT;
    const float* xr[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        int m = m0 + i < M ? m0 + i : M - 1;
        xr[i] = x + (u64)m * (u64)k_real;
    }
    const u64 wrow = (u64)n * (u64)k_real;
    // Each half-warp of a warp walks count / hpr segments: a uniform trip count.
    for (int s = sub; s < count; s += hpr) {
        float acc[MT];
#pragma unroll
        for (int i = 0; i < MT; ++i) acc[i] = 0.0f;
        const int start = s * seg_len;
        const int end = min(start + seg_len, k_real); // padding past K is skipped: fma(0,0,a) = a
        int e = start + l;
        // Four elements of this lane per step: the loads are issued together, the fma chain then
        // runs in element order.
        for (; e + 48 < end; e += 64) {
            const float w0 = ls_load_w<DT>(w, wrow + e);
            const float w1 = ls_load_w<DT>(w, wrow + e + 16);
            const float w2 = ls_load_w<DT>(w, wrow + e + 32);
            const float w3 = ls_load_w<DT>(w, wrow + e + 48);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                const float x0 = xr[i][e], x1 = xr[i][e + 16], x2 = xr[i][e + 32], x3 = xr[i][e + 48];
                acc[i] = __fmaf_rn(x0, w0, acc[i]);
                acc[i] = __fmaf_rn(x1, w1, acc[i]);
                acc[i] = __fmaf_rn(x2, w2, acc[i]);
                acc[i] = __fmaf_rn(x3, w3, acc[i]);
            }
        }
#pragma unroll 4
        for (; e < end; e += 16) {
            const float w0 = ls_load_w<DT>(w, wrow + e);
#pragma unroll
            for (int i = 0; i < MT; ++i) acc[i] = __fmaf_rn(xr[i][e], w0, acc[i]);
        }
#pragma unroll
        for (int i = 0; i < MT; ++i) {
            const float v = ls_half_warp_tree(acc[i]);
            if (l == 0) sums[(r_local * MT + i) * count + s] = v;
        }
    }
    __syncthreads();
    if ((int)threadIdx.x < rpb * MT) {
        const int rl = threadIdx.x / MT;
        const int i = threadIdx.x % MT;
        const int nn = blockIdx.x * rpb + rl;
        const int m = m0 + i;
        if (nn < N && m < M) y[(u64)m * (u64)N + nn] = ls_segment_tree(&sums[(rl * MT + i) * count], count);
    }
}

#define LS_LINEAR_PORTABLE(NAME, DT, MT)                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                                 \
        NAME(const float* x, const u8* w, float* y, int M, int N, int k_real, int seg_len, int count) {               \
        linear_portable_impl<DT, MT>(x, w, y, M, N, k_real, seg_len, count);                                          \
    }

LS_LINEAR_PORTABLE(linear_portable_f32_m1, LS_F32, 1)
LS_LINEAR_PORTABLE(linear_portable_f32_m2, LS_F32, 2)
LS_LINEAR_PORTABLE(linear_portable_f32_m4, LS_F32, 4)
LS_LINEAR_PORTABLE(linear_portable_f32_m8, LS_F32, 8)
LS_LINEAR_PORTABLE(linear_portable_bf16_m1, LS_BF16, 1)
LS_LINEAR_PORTABLE(linear_portable_bf16_m2, LS_BF16, 2)
LS_LINEAR_PORTABLE(linear_portable_bf16_m4, LS_BF16, 4)
LS_LINEAR_PORTABLE(linear_portable_bf16_m8, LS_BF16, 8)
LS_LINEAR_PORTABLE(linear_portable_f16_m1, LS_F16, 1)
LS_LINEAR_PORTABLE(linear_portable_f16_m2, LS_F16, 2)
LS_LINEAR_PORTABLE(linear_portable_f16_m4, LS_F16, 4)
LS_LINEAR_PORTABLE(linear_portable_f16_m8, LS_F16, 8)
LS_LINEAR_PORTABLE(linear_portable_q8_0_m1, LS_Q8_0, 1)
LS_LINEAR_PORTABLE(linear_portable_q8_0_m2, LS_Q8_0, 2)
LS_LINEAR_PORTABLE(linear_portable_q8_0_m4, LS_Q8_0, 4)
LS_LINEAR_PORTABLE(linear_portable_q8_0_m8, LS_Q8_0, 8)
LS_LINEAR_PORTABLE(linear_portable_q4_0_m1, LS_Q4_0, 1)
LS_LINEAR_PORTABLE(linear_portable_q4_0_m2, LS_Q4_0, 2)
LS_LINEAR_PORTABLE(linear_portable_q4_0_m4, LS_Q4_0, 4)
LS_LINEAR_PORTABLE(linear_portable_q4_0_m8, LS_Q4_0, 8)
LS_LINEAR_PORTABLE(linear_portable_q4_1_m1, LS_Q4_1, 1)
LS_LINEAR_PORTABLE(linear_portable_q4_1_m2, LS_Q4_1, 2)
LS_LINEAR_PORTABLE(linear_portable_q4_1_m4, LS_Q4_1, 4)
LS_LINEAR_PORTABLE(linear_portable_q4_1_m8, LS_Q4_1, 8)

// Finish the segment tree over t partials (rank order), element by element: y[j] = tree(p_r[j]).
// `parts` holds t device pointers (the partial buffers, or the slots of an all-gather buffer).
extern "C" __global__ void tree_combine(const u64* parts, int t, int n, float* y) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    float v[64];
    for (int r = 0; r < t; ++r) v[r] = ((const float*)parts[r])[j];
    y[j] = ls_segment_tree(v, t);
}

// y[j] += bias[j mod nb], once, after the tree (reference::add_bias).
template <int DT> __device__ __forceinline__ void add_bias_impl(float* y, const u8* bias, int total, int nb) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j < total) y[j] = __fadd_rn(y[j], ls_load_w<DT>(bias, (u64)(j % nb)));
}
extern "C" __global__ void add_bias_f32(float* y, const u8* b, int total, int nb) { add_bias_impl<LS_F32>(y, b, total, nb); }
extern "C" __global__ void add_bias_bf16(float* y, const u8* b, int total, int nb) { add_bias_impl<LS_BF16>(y, b, total, nb); }
extern "C" __global__ void add_bias_f16(float* y, const u8* b, int total, int nb) { add_bias_impl<LS_F16>(y, b, total, nb); }
extern "C" __global__ void add_bias_q8_0(float* y, const u8* b, int total, int nb) { add_bias_impl<LS_Q8_0>(y, b, total, nb); }
extern "C" __global__ void add_bias_q4_0(float* y, const u8* b, int total, int nb) { add_bias_impl<LS_Q4_0>(y, b, total, nb); }
extern "C" __global__ void add_bias_q4_1(float* y, const u8* b, int total, int nb) { add_bias_impl<LS_Q4_1>(y, b, total, nb); }
