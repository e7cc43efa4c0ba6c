// attention.cu — paged causal attention with GQA, bit-identical to reference::attention.
//
// One warp per (query row, head). Keys are walked in chunks [c·C, (c+1)·C) counted from position 0
// (C = kv_chunk), in chunk order, exactly as the contract says:
// * score s = dot16(q, k) · scale: the head is one zero-padded segment of the dot rule, so the
//   two half-warps each take one key, lane l accumulating elements l, l+16, … with fma from +0.0
//   and ls_half_warp_tree folding the lanes; scores of the chunk go to shared memory;
// * m_c = max s (order-free), p = exp(s − m_c) written back in place, l_c = Σ p summed in
//   ascending position by every lane (a sequential sum, so all lanes hold the same bits and no
//   broadcast is needed), o_c[j] = Σ fma(p, v[j], ·) in ascending position, lane j owning
//   dimensions j, j+32, …;
// * chunk states merged in order: m = max(m, m_c), l = l·e^(m_old−m) + l_c·e^(m_c−m), o likewise
//   (products rounded, then one add — no fma, as in the reference); finally o / l.
// head_dim ≤ 256 (q is kept in registers: 16 per lane).
#include "common.cuh"

#define ATTN_MAXD 256

// rows[3·i ..]: (batch row, absolute position, offset of its block table in `tables`).
extern "C" __global__ void attention_paged(const float* __restrict__ q, float* __restrict__ out,
                                           const float* __restrict__ kc, const float* __restrict__ vc,
                                           const int* __restrict__ rows, const u32* __restrict__ tables, int n_heads,
                                           int n_kv, int d, int block_size, int kv_chunk, float scale,
                                           int warps_per_block) {
    LS_DYNAMIC_SMEM(float, attn_smem);
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int h = blockIdx.y * warps_per_block + warp;
    if (h >= n_heads) return; // whole warp: h depends on the warp only
    const int row = rows[3 * blockIdx.x];
    const int pos = rows[3 * blockIdx.x + 1];
    const u32* table = tables + rows[3 * blockIdx.x + 2];
    float* p = attn_smem + warp * kv_chunk;
    const int width = n_heads * d;
    const int kvh = h / (n_heads / n_kv);
    const float* qh = q + (u64)row * (u64)width + (u64)h * d;
    const int half = lane >> 4;
    const int l = lane & 15;

    float qreg[ATTN_MAXD / 16];
#pragma unroll
    for (int j = 0; j < ATTN_MAXD / 16; ++j) {
        const int e = l + 16 * j;
        qreg[j] = e < d ? qh[e] : 0.0f;
    }
    float o[ATTN_MAXD / 32];
    float oc[ATTN_MAXD / 32];
#pragma unroll
    for (int jj = 0; jj < ATTN_MAXD / 32; ++jj) o[jj] = 0.0f;
    float m = ls_f(LS_NEG_INF);
    float lsum = 0.0f;

    const int nchunks = pos / kv_chunk + 1;
    for (int c = 0; c < nchunks; ++c) {
        const int first = c * kv_chunk;
        const int keys = min((c + 1) * kv_chunk, pos + 1) - first;
        // Scores, two keys per step (one per half-warp); a half-warp without a key recomputes
        // the step's first key and drops it, so both halves reach the shuffles.
        for (int i0 = 0; i0 < keys; i0 += 2) {
            const int i = i0 + half;
            const int kp = first + (i < keys ? i : i0);
            const u64 slot = (u64)table[kp / block_size] * (u64)block_size + (u64)(kp % block_size);
            const float* kr = kc + (slot * (u64)n_kv + (u64)kvh) * (u64)d;
            float acc = 0.0f;
#pragma unroll
            for (int j = 0; j < ATTN_MAXD / 16; ++j) {
                const int e = l + 16 * j;
                if (e < d) acc = __fmaf_rn(qreg[j], kr[e], acc);
            }
            const float s = __fmul_rn(ls_half_warp_tree(acc), scale);
            if (l == 0 && i < keys) p[i] = s;
        }
        __syncwarp();
        float mc = ls_f(LS_NEG_INF);
        for (int i = lane; i < keys; i += 32) mc = ls_max(mc, p[i]);
        mc = ls_warp_max(mc);
        // Each lane rewrites only the scores it read above.
        for (int i = lane; i < keys; i += 32) p[i] = ls_exp(__fsub_rn(p[i], mc));
        __syncwarp();
        float lc = 0.0f;
        for (int i = 0; i < keys; ++i) lc = __fadd_rn(lc, p[i]);
#pragma unroll
        for (int jj = 0; jj < ATTN_MAXD / 32; ++jj) oc[jj] = 0.0f;
        // Unrolled so the next keys' V rows are in flight while the fma chains run in key order.
#pragma unroll 4
        for (int i = 0; i < keys; ++i) {
            const float pr = p[i];
            const int kp = first + i;
            const u64 slot = (u64)table[kp / block_size] * (u64)block_size + (u64)(kp % block_size);
            const float* vr = vc + (slot * (u64)n_kv + (u64)kvh) * (u64)d;
#pragma unroll
            for (int jj = 0; jj < ATTN_MAXD / 32; ++jj) {
                const int j = lane + 32 * jj;
                if (j < d) oc[jj] = __fmaf_rn(pr, vr[j], oc[jj]);
            }
        }
        if (c == 0) {
            m = mc;
            lsum = lc;
#pragma unroll
            for (int jj = 0; jj < ATTN_MAXD / 32; ++jj) o[jj] = oc[jj];
        } else {
            const float mn = ls_max(m, mc);
            const float fa = ls_exp(__fsub_rn(m, mn));
            const float fb = ls_exp(__fsub_rn(mc, mn));
            lsum = __fadd_rn(__fmul_rn(lsum, fa), __fmul_rn(lc, fb));
#pragma unroll
            for (int jj = 0; jj < ATTN_MAXD / 32; ++jj) o[jj] = __fadd_rn(__fmul_rn(o[jj], fa), __fmul_rn(oc[jj], fb));
            m = mn;
        }
        __syncwarp(); // the next chunk overwrites p
    }
    float* orow = out + (u64)row * (u64)width + (u64)h * d;
#pragma unroll
    for (int jj = 0; jj < ATTN_MAXD / 32; ++jj) {
        const int j = lane + 32 * jj;
        if (j < d) orow[j] = __fdiv_rn(o[jj], lsum);
    }
}
