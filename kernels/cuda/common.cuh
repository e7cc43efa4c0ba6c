// common.cuh — shared by every lockstep kernel file.
//
// The Rust loader (kernels/src/cuda/nvrtc.rs) pastes this text in place of the
// `#include "common.cuh"` line of each .cu file before handing it to NVRTC, so the kernels need no
// include path and no CUDA toolkit headers (NVRTC ships none of them: everything here is built on
// NVRTC's built-in intrinsics).
//
// Section 1 is the scalar numerics contract (docs/DESIGN.md §2.1) written with explicit
// round-to-nearest intrinsics: __fmaf_rn, __fadd_rn, __fsub_rn, __fmul_rn, __fdiv_rn, __fsqrt_rn.
// They are compiled with --fmad=false --ftz=false --prec-div=true --prec-sqrt=true on top, but the
// intrinsics are what guarantee it: the PTX then holds `fma.rn` / `add.rn` / `mul.rn` forms that
// ptxas may not contract or flush, whatever options a later driver JIT uses.
//
// Section 2 holds the warp-level helpers (shuffles).
//
// Everything here, and every kernel except the tensor-core one, also compiles as plain C++ against
// a small SIMT emulator (kernels/tests/cuda_nvrtc.rs: one OS thread per CUDA thread, barriers for
// __syncthreads / __syncwarp / shuffles, IEEE operations for the _rn intrinsics). That is how the
// test suite checks the kernels bit for bit against kernels/src/reference.rs on a machine without
// a GPU; so keep to what the emulator provides (no other intrinsics, dynamic shared memory only
// through LS_DYNAMIC_SMEM).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// Weight storage types, as the Rust side numbers them (kernels/src/cuda/backend.rs `dtype_code`).
#define LS_F32 0
#define LS_BF16 1
#define LS_F16 2
#define LS_Q8_0 3
#define LS_Q4_0 4
#define LS_Q4_1 5

// ---------------------------------------------------------------- section 1: scalar contract

// Constants as exact f32 bit patterns, copied from the Rust constants of kernels/src/math.rs (a
// test re-derives every one of them from Rust and compares): no decimal literal can round
// differently on another compiler.
#define LS_LOG2E 0x3fb8aa3bu   // std::f32::consts::LOG2_E
#define LS_LN2_HI 0x3f318000u  // 0.693_359_4
#define LS_LN2_LO 0xb95e8083u  // -2.121_944_4e-4
#define LS_EXP_MAX 0x42b17218u // 88.722_84
#define LS_EXP_MIN 0xc2cff1b4u // -103.972_08
#define LS_EXP_P0 0x39500d01u  // 1/5040
#define LS_EXP_P1 0x3ab60b61u  // 1/720
#define LS_EXP_P2 0x3c088889u  // 1/120
#define LS_EXP_P3 0x3d2aaaabu  // 1/24
#define LS_EXP_P4 0x3e2aaaabu  // 1/6
#define LS_EXP_P5 0x3f000000u  // 1/2
#define LS_SQRT2 0x3fb504f3u   // std::f32::consts::SQRT_2
#define LS_LN_P0 0x3dba2e8cu   // 1/11
#define LS_LN_P1 0x3de38e39u   // 1/9
#define LS_LN_P2 0x3e124925u   // 1/7
#define LS_LN_P3 0x3e4ccccdu   // 1/5
#define LS_LN_P4 0x3eaaaaabu   // 1/3
#define LS_MIN_POSITIVE 0x00800000u // f32::MIN_POSITIVE
#define LS_TWO_23 0x4b000000u  // 2^23
#define LS_TWO_M24 0x33800000u // 2^-24
#define LS_INF 0x7f800000u
#define LS_NEG_INF 0xff800000u

__device__ __forceinline__ float ls_f(u32 bits) { return __uint_as_float(bits); }

// Exact widening of stored weights. bf16 is the top half of an f32. f16 is decoded with integer
// operations (not cvt.f32.f16) so the host test can run the very same code; NaNs come out quiet
// with their payload, as the `half` crate and F16C do on the CPU.
__device__ __forceinline__ float ls_bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

__device__ __forceinline__ float ls_f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16;
    u32 ex = ((u32)h >> 10) & 0x1fu;
    u32 man = (u32)h & 0x3ffu;
    u32 bits;
    if (ex == 0x1fu) {
        bits = man == 0 ? (sign | 0x7f800000u) : (sign | 0x7fc00000u | (man << 13));
    } else if (ex != 0) {
        bits = sign | ((ex + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {
        // Subnormal: man · 2^-24 with its top bit at position p (0..9) is 1.f · 2^(p-24).
        int p = 31 - __clz(man);
        bits = sign | ((u32)(p + 103) << 23) | ((man << (23 - p)) & 0x7fffffu);
    }
    return __uint_as_float(bits);
}

// GGUF block types (kernels/src/quant.rs): blocks of 32 weights; weight j of a block is
// Q8_0 f32(q[j])·d, Q4_0 f32(n−8)·d, Q4_1 f32(n)·d + m — each product and sum rounded once, never
// fused — with n the low nibble of qs[j] for j < 16 and the high nibble of qs[j−16] after. Scales
// are read byte by byte (a block of 18 or 34 bytes need not be 4-aligned).
__device__ __forceinline__ float ls_f16_at(const u8* p) { return ls_f16_to_f32((u16)(p[0] | ((u16)p[1] << 8))); }

__device__ __forceinline__ u32 ls_nibble(const u8* qs, u32 j) { return j < 16 ? (qs[j] & 0xfu) : (qs[j - 16] >> 4); }

template <int DT> __device__ __forceinline__ float ls_load_w(const u8* base, u64 idx) {
    if (DT == LS_F32) {
        return ((const float*)base)[idx];
    } else if (DT == LS_BF16) {
        return ls_bf16_to_f32(((const u16*)base)[idx]);
    } else if (DT == LS_F16) {
        return ls_f16_to_f32(((const u16*)base)[idx]);
    } else if (DT == LS_Q8_0) {
        const u8* b = base + (idx >> 5) * 34;
        return __fmul_rn((float)(int)(signed char)b[2 + (idx & 31)], ls_f16_at(b));
    } else if (DT == LS_Q4_0) {
        const u8* b = base + (idx >> 5) * 18;
        return __fmul_rn((float)((int)ls_nibble(b + 2, (u32)(idx & 31)) - 8), ls_f16_at(b));
    } else {
        const u8* b = base + (idx >> 5) * 20;
        return __fadd_rn(__fmul_rn((float)(int)ls_nibble(b + 4, (u32)(idx & 31)), ls_f16_at(b)), ls_f16_at(b + 2));
    }
}

__device__ __forceinline__ float ls_pow2i(int n) { return __uint_as_float(((u32)(n + 127)) << 23); }

// The contract's exp (math::exp): range reduction by ln 2 in two fused steps, degree-7 Horner
// with fma, two exact power-of-two multiplies so subnormal results round once.
__device__ __forceinline__ float ls_exp(float x) {
    if (x != x) return x;
    if (x > ls_f(LS_EXP_MAX)) return ls_f(LS_INF);
    if (x < ls_f(LS_EXP_MIN)) return 0.0f;
    float n = rintf(__fmul_rn(x, ls_f(LS_LOG2E)));
    float r = __fmaf_rn(-n, ls_f(LS_LN2_HI), x);
    r = __fmaf_rn(-n, ls_f(LS_LN2_LO), r);
    float p = ls_f(LS_EXP_P0);
    p = __fmaf_rn(p, r, ls_f(LS_EXP_P1));
    p = __fmaf_rn(p, r, ls_f(LS_EXP_P2));
    p = __fmaf_rn(p, r, ls_f(LS_EXP_P3));
    p = __fmaf_rn(p, r, ls_f(LS_EXP_P4));
    p = __fmaf_rn(p, r, ls_f(LS_EXP_P5));
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    int ni = (int)n;
    int n1 = ni >> 1;
    int n2 = ni - n1;
    return __fmul_rn(__fmul_rn(p, ls_pow2i(n1)), ls_pow2i(n2));
}

// The contract's natural log (math::ln): x = 2^e·f with f in (√2/2, √2], atanh series in u².
__device__ __forceinline__ float ls_ln(float x) {
    if (x != x || x < 0.0f) return __uint_as_float(0x7fc00000u);
    if (x == 0.0f) return ls_f(LS_NEG_INF);
    if (x == ls_f(LS_INF)) return x;
    u32 bits = __float_as_uint(x);
    int e = 0;
    if (x < ls_f(LS_MIN_POSITIVE)) {
        bits = __float_as_uint(__fmul_rn(x, ls_f(LS_TWO_23)));
        e = -23;
    }
    e += (int)((bits >> 23) & 0xffu) - 127;
    float f = __uint_as_float((bits & 0x007fffffu) | 0x3f800000u);
    if (f > ls_f(LS_SQRT2)) {
        f = __fmul_rn(f, 0.5f);
        e += 1;
    }
    float u = __fdiv_rn(__fsub_rn(f, 1.0f), __fadd_rn(f, 1.0f));
    float u2 = __fmul_rn(u, u);
    float q = ls_f(LS_LN_P0);
    q = __fmaf_rn(q, u2, ls_f(LS_LN_P1));
    q = __fmaf_rn(q, u2, ls_f(LS_LN_P2));
    q = __fmaf_rn(q, u2, ls_f(LS_LN_P3));
    q = __fmaf_rn(q, u2, ls_f(LS_LN_P4));
    q = __fmaf_rn(q, u2, 1.0f);
    float lnf = __fmul_rn(__fadd_rn(u, u), q);
    float ef = (float)e;
    return __fmaf_rn(ef, ls_f(LS_LN2_HI), __fmaf_rn(ef, ls_f(LS_LN2_LO), lnf));
}

// SiLU as the contract defines it: x / (1 + exp(-x)), correctly rounded division.
__device__ __forceinline__ float ls_silu(float x) { return __fdiv_rn(x, __fadd_rn(1.0f, ls_exp(-x))); }

// f32 max with the CPU's NaN rule (f32::max / IEEE maxNum: a NaN operand loses).
__device__ __forceinline__ float ls_max(float a, float b) {
    if (a != a) return b;
    if (b != b) return a;
    return a > b ? a : b;
}

// The canonical tree (reference::tree_reduce), in place: n cut by its binary digits, highest
// first, into runs of 2^j values; each run a balanced tree of adjacent pairs ((v0+v1)+(v2+v3))+…;
// the runs added left to right. (n = 2^k: the balanced tree; n = 3·2^k: two thirds + one third.)
__device__ __forceinline__ float ls_segment_tree(float* v, int n) {
    float total = 0.0f;
    int start = 0;
    while (start < n) {
        int run = 1;
        while (run * 2 <= n - start) run *= 2;
        float* r = v + start;
        for (int m = run; m > 1; m /= 2)
            for (int i = 0; i < m / 2; ++i) r[i] = __fadd_rn(r[2 * i], r[2 * i + 1]);
        total = start == 0 ? r[0] : __fadd_rn(total, r[0]);
        start += run;
    }
    return total;
}

// The contract's fold of 16 lanes held in an array: (l, l+8), (l, l+4), (l, l+2), (l, l+1).
__device__ __forceinline__ float ls_lane_tree_array(float* a) {
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l) a[l] = __fadd_rn(a[l], a[l + w]);
    return a[0];
}

// Philox4x32-10 (sampling::philox4x32_10), counter c updated in place.
__device__ __forceinline__ void ls_philox(u32* c, u32 k0, u32 k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u64 p0 = (u64)0xD2511F53u * (u64)c[0];
        u64 p1 = (u64)0xCD9E8D57u * (u64)c[2];
        u32 n0 = ((u32)(p1 >> 32)) ^ c[1] ^ k0;
        u32 n1 = (u32)p1;
        u32 n2 = ((u32)(p0 >> 32)) ^ c[3] ^ k1;
        u32 n3 = (u32)p0;
        c[0] = n0;
        c[1] = n1;
        c[2] = n2;
        c[3] = n3;
    }
}

// sampling::uniform: 23 random bits as the odd numerator 2j+1 over 2^24 (exact in f32).
__device__ __forceinline__ float ls_uniform(u64 seed, u64 step, u32 token) {
    u32 c[4] = {token, (u32)step, (u32)(step >> 32), 0x6c6f636bu /* "lock" */};
    ls_philox(c, (u32)seed, (u32)(seed >> 32));
    return __fmul_rn(__uint2float_rn((c[0] >> 9) * 2u + 1u), ls_f(LS_TWO_M24));
}

// sampling::gumbel: -ln(-ln u) with the contract's ln.
__device__ __forceinline__ float ls_gumbel(u64 seed, u64 step, u32 token) {
    return -ls_ln(-ls_ln(ls_uniform(seed, step, token)));
}

// Sampling rank key: NaN never wins.
__device__ __forceinline__ float ls_rank_key(float x) { return x != x ? ls_f(LS_NEG_INF) : x; }

// `a` ranks before `b`: higher key first, ties to the lower token id (sampling::ranks_before).
__device__ __forceinline__ bool ls_ranks_before(float av, u32 aid, float bv, u32 bid) {
    float ka = ls_rank_key(av), kb = ls_rank_key(bv);
    return ka > kb || (ka == kb && aid < bid);
}

// ---------------------------------------------------------------- section 2: warp helpers

#define LS_FULL_MASK 0xffffffffu

// A kernel's dynamic shared memory (the emulator maps it to a host buffer).
#ifndef LS_DYNAMIC_SMEM
#define LS_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// The contract's 16-lane tree across a half-warp: logical lane l lives in physical lane l of its
// half. After the xor-8 step lane l holds a[l] + a[l+8] (addition is commutative, so lane l+8
// holds the same bits), then xor 4, 2, 1: every lane of the half-warp ends with the contract's
// a[0]. Every lane of the warp must execute this (full mask).
__device__ __forceinline__ float ls_half_warp_tree(float a) {
    a = __fadd_rn(a, __shfl_xor_sync(LS_FULL_MASK, a, 8, 16));
    a = __fadd_rn(a, __shfl_xor_sync(LS_FULL_MASK, a, 4, 16));
    a = __fadd_rn(a, __shfl_xor_sync(LS_FULL_MASK, a, 2, 16));
    a = __fadd_rn(a, __shfl_xor_sync(LS_FULL_MASK, a, 1, 16));
    return a;
}

// Max over a whole warp: order-free (max is exact), so any butterfly gives the same bits.
__device__ __forceinline__ float ls_warp_max(float a) {
    for (int o = 16; o >= 1; o /= 2) a = ls_max(a, __shfl_xor_sync(LS_FULL_MASK, a, o));
    return a;
}
