// norm_rope_swiglu.cu — the row-wise and element-wise ops, bit-identical to the reference.
//
// RMSNorm follows reference::rms_norm: ss = dot(x, x) with the dot rule over the hidden size
// (one half-warp per segment, lane l = logical lane l, ls_half_warp_tree, then the pairwise
// segment tree by one thread), mean = ss / n, r = 1 / sqrt(mean + eps) with correctly rounded
// sqrt and division, out = (x·r)·w. RoPE is rotate-half with products rounded, then one add.
// The rest are plain element-wise loops or copies with the contract's one rounding per op.
#include "common.cuh"

// One block (256 threads = 16 half-warps) per row.
template <int DT>
__device__ __forceinline__ void rms_norm_impl(const float* __restrict__ x, const u8* __restrict__ w,
                                              float* __restrict__ out, int n, int segs, int seg_len, float eps) {
    __shared__ float sums[64];
    __shared__ float r_shared;
    const float* xr = x + (u64)blockIdx.x * (u64)n;
    float* orow = out + (u64)blockIdx.x * (u64)n;
    const int hw = threadIdx.x >> 4;
    const int l = threadIdx.x & 15;
    // Same trip count for every half-warp, so whole warps reach the shuffles.
    for (int s0 = 0; s0 < segs; s0 += 16) {
        const int s = s0 + hw;
        float acc = 0.0f;
        if (s < segs) {
            const int end = min((s + 1) * seg_len, n);
            for (int e = s * seg_len + l; e < end; e += 16) {
                const float v = xr[e];
                acc = __fmaf_rn(v, v, acc);
            }
        }
        const float t = ls_half_warp_tree(acc);
        if (s < segs && l == 0) sums[s] = t;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const float ss = ls_segment_tree(sums, segs);
        const float mean = __fdiv_rn(ss, (float)n);
        r_shared = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    }
    __syncthreads();
    const float r = r_shared;
    for (int i = threadIdx.x; i < n; i += blockDim.x) orow[i] = __fmul_rn(__fmul_rn(xr[i], r), ls_load_w<DT>(w, (u64)i));
}
extern "C" __global__ void __launch_bounds__(256)
    rms_norm_f32(const float* x, const u8* w, float* out, int n, int segs, int seg_len, float eps) {
    rms_norm_impl<LS_F32>(x, w, out, n, segs, seg_len, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    rms_norm_bf16(const float* x, const u8* w, float* out, int n, int segs, int seg_len, float eps) {
    rms_norm_impl<LS_BF16>(x, w, out, n, segs, seg_len, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    rms_norm_f16(const float* x, const u8* w, float* out, int n, int segs, int seg_len, float eps) {
    rms_norm_impl<LS_F16>(x, w, out, n, segs, seg_len, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    rms_norm_q8_0(const float* x, const u8* w, float* out, int n, int segs, int seg_len, float eps) {
    rms_norm_impl<LS_Q8_0>(x, w, out, n, segs, seg_len, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    rms_norm_q4_0(const float* x, const u8* w, float* out, int n, int segs, int seg_len, float eps) {
    rms_norm_impl<LS_Q4_0>(x, w, out, n, segs, seg_len, eps);
}
extern "C" __global__ void __launch_bounds__(256)
    rms_norm_q4_1(const float* x, const u8* w, float* out, int n, int segs, int seg_len, float eps) {
    rms_norm_impl<LS_Q4_1>(x, w, out, n, segs, seg_len, eps);
}

// Rotate-half RoPE in place on [T, n_heads·d]; cos/sin hold the T rows of the table ([T, d/2]),
// gathered on the host from the crate's RopeTables (never computed here).
extern "C" __global__ void rope(float* x, const float* cosr, const float* sinr, int t, int n_heads, int d) {
    const int h2 = d / 2;
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t * n_heads * h2) return;
    const int k = (int)(i % h2);
    const u64 rh = i / h2; // row · n_heads + head
    const int row = (int)(rh / n_heads);
    float* head = x + rh * (u64)d;
    const float c = cosr[(u64)row * h2 + k];
    const float s = sinr[(u64)row * h2 + k];
    const float a = head[k];
    const float b = head[k + h2];
    head[k] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    head[k + h2] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// silu(gate) · up.
extern "C" __global__ void swiglu(const float* gate, const float* up, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __fmul_rn(ls_silu(gate[i]), up[i]);
}

extern "C" __global__ void add_assign(float* y, const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __fadd_rn(y[i], x[i]);
}

// Rows of the embedding table, widened exactly (block types: by the one quantized formula).
template <int DT> __device__ __forceinline__ void embedding_impl(const u32* ids, const u8* table, float* out, int t, int cols) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t * cols) return;
    const u64 r = i / cols;
    const u64 c = i % cols;
    out[i] = ls_load_w<DT>(table, (u64)ids[r] * (u64)cols + c);
}
extern "C" __global__ void embedding_f32(const u32* ids, const u8* table, float* out, int t, int cols) {
    embedding_impl<LS_F32>(ids, table, out, t, cols);
}
extern "C" __global__ void embedding_bf16(const u32* ids, const u8* table, float* out, int t, int cols) {
    embedding_impl<LS_BF16>(ids, table, out, t, cols);
}
extern "C" __global__ void embedding_f16(const u32* ids, const u8* table, float* out, int t, int cols) {
    embedding_impl<LS_F16>(ids, table, out, t, cols);
}
extern "C" __global__ void embedding_q8_0(const u32* ids, const u8* table, float* out, int t, int cols) {
    embedding_impl<LS_Q8_0>(ids, table, out, t, cols);
}
extern "C" __global__ void embedding_q4_0(const u32* ids, const u8* table, float* out, int t, int cols) {
    embedding_impl<LS_Q4_0>(ids, table, out, t, cols);
}
extern "C" __global__ void embedding_q4_1(const u32* ids, const u8* table, float* out, int t, int cols) {
    embedding_impl<LS_Q4_1>(ids, table, out, t, cols);
}

// out[i, :] = x[rows[i], :].
extern "C" __global__ void gather_rows(const float* x, const u32* rows, float* out, int n_rows, int width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)n_rows * width) return;
    out[i] = x[(u64)rows[i / width] * (u64)width + i % width];
}

// Store token i's K and V rows at cache slot slots[i].
extern "C" __global__ void write_kv(float* kc, float* vc, const float* k, const float* v, const u32* slots, int t,
                                    int width) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)t * width) return;
    const u64 dst = (u64)slots[i / width] * (u64)width + i % width;
    kc[dst] = k[i];
    vc[dst] = v[i];
}
