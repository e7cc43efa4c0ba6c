// sampling.cu — per-segment partials of one vocab shard for greedy / Gumbel-max sampling.
//
// One block (256 threads) per (segment of the shard, request row). It reports, for its segment of
// the canonical vocab segmentation (sampling::lse_shard):
// * the log-sum-exp partial: max (order-free), then Σ exp(x − max) in 16 logical lanes — lane l
//   takes the segment's elements l, l+16, … in increasing order — and the contract's lane tree.
//   The exps are computed by all 256 threads into shared memory, 256 elements at a time; threads
//   0..15 then add them in each lane's order, so the sum is sequential per lane as the contract
//   requires. An all-(−inf/NaN) segment reports the empty partial (−inf, 0);
// * the segment's best candidate: z = logit / T, score = z + gumbel(seed, step, id) with
//   Philox4x32-10 noise (or the raw logit when greedy), ranked by (score desc, id asc) with NaN
//   never winning — a total order, so the reduction order cannot matter.
// The host (kernels/src/cuda/backend.rs) finishes the pairwise LSE tree and the best-of-segments
// with the CPU's own functions. Requests with top-k / top-p take the host path instead.
#include "common.cuh"

#define SP_THREADS 256

// out_f[(r·count + s)·5 ..] = (max, sum, best logit, best z, best score);
// out_u[(r·count + s)·2 ..] = (has best, best id).
extern "C" __global__ void __launch_bounds__(SP_THREADS)
    sample_partials(const float* __restrict__ logits, int shard_rows, int offset, int vocab_len, int seg_len,
                    int first_seg, int count, const float* __restrict__ temps, const u64* __restrict__ seeds,
                    const u64* __restrict__ steps, float* __restrict__ out_f, u32* __restrict__ out_u) {
    __shared__ float sh_max[SP_THREADS];
    __shared__ float sh_logit[SP_THREADS];
    __shared__ float sh_z[SP_THREADS];
    __shared__ float sh_score[SP_THREADS];
    __shared__ u32 sh_id[SP_THREADS];
    __shared__ u32 sh_have[SP_THREADS];
    __shared__ float sh_v[SP_THREADS];
    const int tid = threadIdx.x;
    const int s_local = blockIdx.x;
    const int r = blockIdx.y;
    const int s = first_seg + s_local;
    const int lo = min(s * seg_len, vocab_len);
    const int hi = min((s + 1) * seg_len, vocab_len);
    const int nseg = hi - lo;
    const float* xs = logits + (u64)r * (u64)shard_rows + (lo - offset);
    const float temp = temps[r];
    const u64 seed = seeds[r];
    const u64 step = steps[r];

    float mx = ls_f(LS_NEG_INF);
    u32 have = 0, bid = 0;
    float blogit = 0.0f, bz = 0.0f, bscore = 0.0f;
    for (int i = tid; i < nseg; i += SP_THREADS) {
        const float x = xs[i];
        mx = ls_max(mx, x);
        const u32 id = (u32)(lo + i);
        float z = x, sc = x;
        if (temp > 0.0f) {
            z = __fdiv_rn(x, temp);
            sc = __fadd_rn(z, ls_gumbel(seed, step, id));
        }
        if (!have || ls_ranks_before(sc, id, bscore, bid)) {
            have = 1;
            bid = id;
            blogit = x;
            bz = z;
            bscore = sc;
        }
    }
    sh_max[tid] = mx;
    sh_have[tid] = have;
    sh_id[tid] = bid;
    sh_logit[tid] = blogit;
    sh_z[tid] = bz;
    sh_score[tid] = bscore;
    __syncthreads();
    for (int w = SP_THREADS / 2; w >= 1; w /= 2) {
        if (tid < w) {
            sh_max[tid] = ls_max(sh_max[tid], sh_max[tid + w]);
            const int o = tid + w;
            if (sh_have[o] && (!sh_have[tid] || ls_ranks_before(sh_score[o], sh_id[o], sh_score[tid], sh_id[tid]))) {
                sh_have[tid] = 1;
                sh_id[tid] = sh_id[o];
                sh_logit[tid] = sh_logit[o];
                sh_z[tid] = sh_z[o];
                sh_score[tid] = sh_score[o];
            }
        }
        __syncthreads();
    }
    const float m = sh_max[0];
    float lane_acc = 0.0f;
    if (m != ls_f(LS_NEG_INF)) { // uniform: every thread reads the same shared value
        for (int base = 0; base < nseg; base += SP_THREADS) {
            const int i = base + tid;
            sh_v[tid] = i < nseg ? ls_exp(__fsub_rn(xs[i], m)) : 0.0f;
            __syncthreads();
            if (tid < 16) {
                // Element base + 16·j + tid belongs to lane tid (base is a multiple of 16).
                for (int j = 0; j < 16; ++j) {
                    const int idx = 16 * j + tid;
                    if (base + idx < nseg) lane_acc = __fadd_rn(lane_acc, sh_v[idx]);
                }
            }
            __syncthreads();
        }
    }
    if (tid < 16) sh_v[tid] = lane_acc;
    __syncthreads();
    if (tid == 0) {
        const u64 o = (u64)r * (u64)count + s_local;
        const bool empty = m == ls_f(LS_NEG_INF);
        out_f[o * 5 + 0] = m;
        out_f[o * 5 + 1] = empty ? 0.0f : ls_lane_tree_array(sh_v);
        out_f[o * 5 + 2] = sh_logit[0];
        out_f[o * 5 + 3] = sh_z[0];
        out_f[o * 5 + 4] = sh_score[0];
        out_u[o * 2 + 0] = sh_have[0];
        out_u[o * 2 + 1] = sh_id[0];
    }
}
