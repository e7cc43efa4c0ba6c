// linear_native.cu — tensor-core linear (mma.sync m16n8k16, bf16 or f16 in, f32 accumulate).
//
// Native numerics are NOT the CPU contract: x is rounded to the weight's 16-bit type, and the
// tensor core sums each k16 block in its own internal order. They are still batch- and
// TP-invariant within one GPU class, because every output element is always produced by the same
// instruction sequence:
// * one tile configuration for every M, N and K: 64×64 outputs per block, 4 warps of 32×32,
//   K walked in steps of 16 in increasing order; no split-K, no shape-dependent choice;
// * K is cut into the same `count` segments of `seg_len` as the contract (seg_len is a multiple
//   of 16, so a k16 step never straddles two segments); each segment accumulates from +0.0 and
//   the segment sums meet in the contract's pairwise tree. The tree is built incrementally, like
//   a binary counter: when segment s closes, for each level where s has a 1 bit the stored left
//   sibling is added (left + right); at the first 0 bit the running sum is parked. LEVELS =
//   log2(count) is a template parameter so the parked sums stay in registers.
// So a row-parallel rank holding segments [r·S/t, (r+1)·S/t) computes exactly one subtree and
// tree_combine finishes the same tree: TP-invariant like the portable path, with native bits.
// x is converted first (convert_x_*) into a zero-padded [M, Kp] 16-bit buffer, Kp = count·seg_len,
// so every A-tile load is an aligned 16-byte vector.
#include "common.cuh"

#define NT_BM 64
#define NT_BN 64
#define NT_BK 32
#define NT_LDS (NT_BK + 8) // smem row stride in halves: 80 bytes, conflict-free fragment loads

// Under the CPU emulator of the test suite (LS_HOST_EMULATION) the three PTX instructions below
// are replaced by host models: conversions with round-to-nearest-even, and an mma whose lanes
// exchange fragments — which is what checks this file's fragment layouts and tiling off the GPU.
__device__ __forceinline__ u16 ls_f32_to_bf16_rn(float f) {
#ifdef LS_HOST_EMULATION
    return ls_emu_f32_to_bf16(f);
#else
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}
__device__ __forceinline__ u16 ls_f32_to_f16_rn(float f) {
#ifdef LS_HOST_EMULATION
    return ls_emu_f32_to_f16(f);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#endif
}

// xh[m, k] = round16(x[m, k]) for k < k_real, +0 up to Kp.
template <bool BF16> __device__ __forceinline__ void convert_x_impl(const float* x, u16* xh, int M, int k_real, int Kp) {
    const u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)M * (u64)Kp) return;
    const int m = (int)(i / (u64)Kp);
    const int k = (int)(i % (u64)Kp);
    u16 h = 0;
    if (k < k_real) {
        const float v = x[(u64)m * (u64)k_real + k];
        h = BF16 ? ls_f32_to_bf16_rn(v) : ls_f32_to_f16_rn(v);
    }
    xh[i] = h;
}
extern "C" __global__ void convert_x_bf16(const float* x, u16* xh, int M, int k_real, int Kp) {
    convert_x_impl<true>(x, xh, M, k_real, Kp);
}
extern "C" __global__ void convert_x_f16(const float* x, u16* xh, int M, int k_real, int Kp) {
    convert_x_impl<false>(x, xh, M, k_real, Kp);
}

// D = A·B + D for one warp: A 16×16 (row-major fragments), B 16×8 ("col": k contiguous per n),
// f32 accumulators. Fragment ownership (PTX ISA, mma.m16n8k16 for 16-bit types), with
// g = lane / 4 and t = lane % 4: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
// a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..][g]; d[0..1] = D[g][2t..2t+1],
// d[2..3] = D[g+8][2t..]; the lower k (or column) sits in the low half of each 32-bit register.
template <bool BF16> __device__ __forceinline__ void ls_mma(float* d, const u32* a, const u32* b) {
#ifdef LS_HOST_EMULATION
    ls_emu_mma(d, a, b, BF16);
#else
    if (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

struct NtChunk {
    uint4 a[2];
    uint4 b[2];
};

// One stage's global loads: the 64×32 A tile and 64×32 B tile are 256 16-byte chunks each;
// thread t takes chunks t and t+128 of both (row = c/4, k = (c%4)·8). Rows past M/N and
// columns past Kp/k_real read as zeros. `w_vec`: k_real % 8 == 0, so weight rows are 16-byte
// aligned and a chunk is entirely inside or outside the real columns.
__device__ __forceinline__ void nt_load(NtChunk& st, const u16* xh, const u16* w, int M, int N, int k_real, int Kp,
                                        int m0, int n0, int k0, bool w_vec) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int c = threadIdx.x + j * 128;
        const int row = c >> 2;
        const int kc = (c & 3) * 8;
        uint4 za;
        za.x = za.y = za.z = za.w = 0u;
        st.a[j] = za;
        if (m0 + row < M && k0 + kc < Kp) st.a[j] = *(const uint4*)(xh + (u64)(m0 + row) * (u64)Kp + k0 + kc);
        st.b[j] = za;
        if (n0 + row < N) {
            const u16* wr = w + (u64)(n0 + row) * (u64)k_real;
            if (w_vec) {
                if (k0 + kc < k_real) st.b[j] = *(const uint4*)(wr + k0 + kc);
            } else {
                u16 h[8];
#pragma unroll
                for (int q = 0; q < 8; ++q) h[q] = (k0 + kc + q < k_real) ? wr[k0 + kc + q] : (u16)0;
                st.b[j].x = (u32)h[0] | ((u32)h[1] << 16);
                st.b[j].y = (u32)h[2] | ((u32)h[3] << 16);
                st.b[j].z = (u32)h[4] | ((u32)h[5] << 16);
                st.b[j].w = (u32)h[6] | ((u32)h[7] << 16);
            }
        }
    }
}

__device__ __forceinline__ void nt_store(const NtChunk& st, u16* As, u16* Bs) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int c = threadIdx.x + j * 128;
        const int row = c >> 2;
        const int kc = (c & 3) * 8;
        *(uint4*)(As + row * NT_LDS + kc) = st.a[j];
        *(uint4*)(Bs + row * NT_LDS + kc) = st.b[j];
    }
}

template <bool BF16, int LEVELS>
__device__ __forceinline__ void linear_native_impl(const u16* __restrict__ xh, const u16* __restrict__ w,
                                                   float* __restrict__ y, int M, int N, int k_real, int Kp,
                                                   int seg_len) {
    __shared__ __align__(16) u16 As[2][NT_BM * NT_LDS];
    __shared__ __align__(16) u16 Bs[2][NT_BN * NT_LDS];
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2; // groupID
    const int t4 = lane & 3; // threadID_in_group
    const int wm = warp >> 1;
    const int wn = warp & 1;
    const int m0 = blockIdx.y * NT_BM;
    const int n0 = blockIdx.x * NT_BN;
    const bool w_vec = (k_real & 7) == 0;

    float acc[2][4][4];
    float stk[LEVELS > 0 ? LEVELS : 1][2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;

    const int nsteps = Kp / 16;
    const int steps_per_seg = seg_len / 16;
    const int ntiles = (Kp + NT_BK - 1) / NT_BK;

    NtChunk st;
    nt_load(st, xh, w, M, N, k_real, Kp, m0, n0, 0, w_vec);
    nt_store(st, As[0], Bs[0]);
    __syncthreads();

    for (int kt = 0; kt < ntiles; ++kt) {
        const int buf = kt & 1;
        if (kt + 1 < ntiles) nt_load(st, xh, w, M, N, k_real, Kp, m0, n0, (kt + 1) * NT_BK, w_vec);
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
            const int step = kt * 2 + ks;
            if (step < nsteps) { // uniform across the block
                const int ko = ks * 16;
                u32 a[2][4];
                u32 b[4][2];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    const u16* base = As[buf] + (wm * 32 + mi * 16) * NT_LDS + ko + 2 * t4;
                    a[mi][0] = *(const u32*)(base + g * NT_LDS);
                    a[mi][1] = *(const u32*)(base + (g + 8) * NT_LDS);
                    a[mi][2] = *(const u32*)(base + g * NT_LDS + 8);
                    a[mi][3] = *(const u32*)(base + (g + 8) * NT_LDS + 8);
                }
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const u16* base = Bs[buf] + (wn * 32 + ni * 8 + g) * NT_LDS + ko + 2 * t4;
                    b[ni][0] = *(const u32*)(base);
                    b[ni][1] = *(const u32*)(base + 8);
                }
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) ls_mma<BF16>(acc[mi][ni], a[mi], b[ni]);

                if ((step + 1) % steps_per_seg == 0) {
                    // Segment `seg` closed: push its sum into the pairwise tree.
                    const int seg = step / steps_per_seg;
                    bool parked = false;
#pragma unroll
                    for (int lvl = 0; lvl < LEVELS; ++lvl) {
                        if (!parked) {
                            if ((seg >> lvl) & 1) {
#pragma unroll
                                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                                    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                                        for (int r = 0; r < 4; ++r)
                                            acc[mi][ni][r] = __fadd_rn(stk[lvl][mi][ni][r], acc[mi][ni][r]);
                            } else {
#pragma unroll
                                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                                    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                                        for (int r = 0; r < 4; ++r) stk[lvl][mi][ni][r] = acc[mi][ni][r];
                                parked = true;
                            }
                        }
                    }
                    // After the last segment `acc` holds the whole tree; otherwise start afresh.
                    if (step + 1 < nsteps) {
#pragma unroll
                        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                                for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;
                    }
                }
            }
        }
        if (kt + 1 < ntiles) nt_store(st, As[buf ^ 1], Bs[buf ^ 1]);
        __syncthreads();
    }

#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int row = m0 + wm * 32 + mi * 16 + g;
            const int col = n0 + wn * 32 + ni * 8 + 2 * t4;
            if (row < M) {
                if (col < N) y[(u64)row * N + col] = acc[mi][ni][0];
                if (col + 1 < N) y[(u64)row * N + col + 1] = acc[mi][ni][1];
            }
            if (row + 8 < M) {
                if (col < N) y[(u64)(row + 8) * N + col] = acc[mi][ni][2];
                if (col + 1 < N) y[(u64)(row + 8) * N + col + 1] = acc[mi][ni][3];
            }
        }
    }
}

#define LS_LINEAR_NATIVE(NAME, BF16, LEVELS)                                                                          \
    extern "C" __global__ void __launch_bounds__(128)                                                                 \
        NAME(const u16* xh, const u16* w, float* y, int M, int N, int k_real, int Kp, int seg_len) {                  \
        linear_native_impl<BF16, LEVELS>(xh, w, y, M, N, k_real, Kp, seg_len);                                        \
    }

LS_LINEAR_NATIVE(linear_native_bf16_l0, true, 0)
LS_LINEAR_NATIVE(linear_native_bf16_l1, true, 1)
LS_LINEAR_NATIVE(linear_native_bf16_l2, true, 2)
LS_LINEAR_NATIVE(linear_native_bf16_l3, true, 3)
LS_LINEAR_NATIVE(linear_native_bf16_l4, true, 4)
LS_LINEAR_NATIVE(linear_native_bf16_l5, true, 5)
LS_LINEAR_NATIVE(linear_native_bf16_l6, true, 6)
LS_LINEAR_NATIVE(linear_native_f16_l0, false, 0)
LS_LINEAR_NATIVE(linear_native_f16_l1, false, 1)
LS_LINEAR_NATIVE(linear_native_f16_l2, false, 2)
LS_LINEAR_NATIVE(linear_native_f16_l3, false, 3)
LS_LINEAR_NATIVE(linear_native_f16_l4, false, 4)
LS_LINEAR_NATIVE(linear_native_f16_l5, false, 5)
LS_LINEAR_NATIVE(linear_native_f16_l6, false, 6)
