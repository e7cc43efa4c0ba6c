//! The CUDA kernel sources, run on the CPU by a small SIMT emulator, against the reference.
//!
//! There is no GPU here, so the `.cu` files (all but the tensor-core linear) are compiled as plain
//! C++ together with an emulator prelude: one fiber (ucontext) per CUDA thread, blocks one after
//! another, `__syncthreads` / `__syncwarp` as barriers (a thread that returns drops out, as on the
//! hardware), `__shfl_xor_sync` through a per-warp exchange, `__shared__` as static storage (shared
//! by the block's threads, since blocks run in turn), and each `_rn` intrinsic as the one IEEE
//! operation it names (x86-64 SSE arithmetic, `-ffp-contract=off`, glibc's correctly rounded
//! `fmaf`). The launches use the backend's own geometry (`cuda::plan`), and the results are
//! compared with `kernels/src/reference.rs` bit for bit.
//!
//! What this proves: the kernels' index arithmetic, lane/segment mapping, trees, chunking, the
//! shuffles' participation (a shuffle or barrier that some thread of its warp or block skips is
//! reported as a deadlock) and the transcription of the contract's math. The tensor-core kernel
//! runs with a host model of `mma.sync` (fragments pooled per warp, exact products summed in f64)
//! and is compared with a Rust model of the same rule: that checks its fragment ownership as
//! documented, tiling, segment boundaries and tree — not the tensor core's own rounding.
//! What it cannot prove: the GPU's memory model and scheduling, real shuffle and mma hardware,
//! the driver's JIT of the PTX — `deploy/gpu-check.sh` runs those on a GPU.
#![cfg(feature = "cuda")]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use lockstep_kernels::cuda::nvrtc;
use lockstep_kernels::cuda::plan::{self, Launch};
use lockstep_kernels::sampling::{gumbel, philox4x32_10, shard_sample, uniform};
use lockstep_kernels::{
    math, reference, AttnParams, AttnSeq, DType, HostWeight, KvLayout, RopeConfig, RopeScaling, RopeTables,
    SampleRequest, SamplingParams, Segmentation, VocabShard,
};

// ---------------------------------------------------------------- the emulator

const PRELUDE: &str = r#"
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <ucontext.h>
using std::max;
using std::min;

struct LsDim3 { unsigned x = 0, y = 0, z = 0; };
static LsDim3 threadIdx, blockIdx, blockDim, gridDim;
static float ls_slots[1024];
static std::vector<float> ls_dyn;

#define LS_DYNAMIC_SMEM(T, name) T* name = (T*)ls_dyn.data()
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static

static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __fmaf_rn(float a, float b, float c) { return std::fmaf(a, b, c); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return std::sqrt(a); }
static inline float __uint2float_rn(unsigned u) { return (float)u; }
static inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }

// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; the scheduler runs every
// runnable fiber until it finishes or waits at a barrier, then releases a warp whose live lanes
// all wait at __syncwarp (shuffles use two of those) or the block when every live thread waits at
// __syncthreads. Threads that returned drop out, as on the GPU. When fibers wait but no barrier
// can be released, some thread skipped a barrier or shuffle its warp / block reached: that is
// reported as a deadlock.
enum LsState { LS_RUN = 0, LS_WARP = 1, LS_BLOCK = 2, LS_DONE = 3 };
struct LsFiber { ucontext_t ctx; std::vector<char> stack; int state = LS_RUN; };
static std::vector<LsFiber> ls_fibers;
static ucontext_t ls_sched;
static unsigned ls_cur;
static std::function<void()> ls_kernel;
static const char* ls_kernel_name = "";

static void ls_yield(int st) {
    ls_fibers[ls_cur].state = st;
    swapcontext(&ls_fibers[ls_cur].ctx, &ls_sched);
}
static void ls_entry() {
    ls_kernel();
    ls_fibers[ls_cur].state = LS_DONE; // uc_link returns to the scheduler
}
static void __syncthreads() { ls_yield(LS_BLOCK); }
static void __syncwarp(unsigned = 0xffffffffu) { ls_yield(LS_WARP); }
static float __shfl_xor_sync(unsigned, float v, int lane_mask, int width = 32) {
    const unsigned t = threadIdx.x;
    ls_slots[t] = v;
    __syncwarp();
    const unsigned lane = t & 31u, src = lane ^ (unsigned)lane_mask;
    const float r = (src / width == lane / width) ? ls_slots[(t & ~31u) | src] : v;
    __syncwarp();
    return r;
}

template <class F> static void ls_launch(LsDim3 grid, unsigned block, size_t smem, F f) {
    gridDim = grid;
    blockDim = {block, 1, 1};
    ls_kernel = f;
    ls_fibers.resize(block);
    for (auto& fb : ls_fibers) fb.stack.resize(256 * 1024);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                // Dynamic shared memory starts as NaN: a read before a write shows up.
                ls_dyn.assign(smem / 4 + 1, std::nanf(""));
                for (unsigned t = 0; t < block; ++t) {
                    LsFiber& fb = ls_fibers[t];
                    getcontext(&fb.ctx);
                    fb.ctx.uc_stack.ss_sp = fb.stack.data();
                    fb.ctx.uc_stack.ss_size = fb.stack.size();
                    fb.ctx.uc_link = &ls_sched;
                    makecontext(&fb.ctx, ls_entry, 0);
                    fb.state = LS_RUN;
                }
                for (;;) {
                    for (unsigned t = 0; t < block; ++t) {
                        if (ls_fibers[t].state != LS_RUN) continue;
                        ls_cur = t;
                        threadIdx = {t, 0, 0};
                        swapcontext(&ls_sched, &ls_fibers[t].ctx);
                    }
                    bool live = false, released = false;
                    for (unsigned w = 0; w * 32 < block; ++w) {
                        bool any = false, all = true;
                        for (unsigned t = 32 * w; t < std::min(block, 32 * w + 32); ++t) {
                            int st = ls_fibers[t].state;
                            if (st == LS_DONE) continue;
                            any = true;
                            all = all && st == LS_WARP;
                        }
                        live = live || any;
                        if (any && all) {
                            for (unsigned t = 32 * w; t < std::min(block, 32 * w + 32); ++t)
                                if (ls_fibers[t].state == LS_WARP) ls_fibers[t].state = LS_RUN;
                            released = true;
                        }
                    }
                    if (!live) break;
                    if (released) continue;
                    bool all_block = true;
                    for (unsigned t = 0; t < block; ++t)
                        all_block = all_block && (ls_fibers[t].state == LS_DONE || ls_fibers[t].state == LS_BLOCK);
                    if (!all_block) {
                        std::fprintf(stderr, "deadlock in %s block (%u,%u,%u): threads wait at barriers that others skipped\n",
                                     ls_kernel_name, x, y, z);
                        std::exit(4);
                    }
                    for (unsigned t = 0; t < block; ++t)
                        if (ls_fibers[t].state == LS_BLOCK) ls_fibers[t].state = LS_RUN;
                }
            }
}

// ---- host models of the tensor-core kernel's PTX (linear_native.cu, LS_HOST_EMULATION)
#define LS_HOST_EMULATION 1
#define __align__(n) __attribute__((aligned(n)))
struct uint4 { unsigned x, y, z, w; };
static unsigned short ls_emu_f32_to_bf16(float f) {
    unsigned b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((b >> 16) | 0x40u);
    b += 0x7fffu + ((b >> 16) & 1u);
    return (unsigned short)(b >> 16);
}
static unsigned short ls_emu_f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short u;
    std::memcpy(&u, &h, 2);
    return u;
}
static double ls_emu_widen16(unsigned h, bool bf16) {
    if (bf16) return (double)__uint_as_float(h << 16);
    unsigned short u = (unsigned short)h;
    _Float16 v;
    std::memcpy(&v, &u, 2);
    return (double)(float)v;
}
// mma.m16n8k16 model: the warp's lanes pool their fragments; each output is
// f32(Σ_k A·B in f64, k ascending, + C) — the real unit's internal order is unknown, so the test
// compares against a Rust model with this very rule. What it checks is the kernel's fragment
// ownership (as documented above ls_mma), tiling, segment boundaries and tree.
static unsigned ls_mma_a[1024][4], ls_mma_b[1024][2];
static void ls_emu_mma(float* d, const unsigned* a, const unsigned* b, bool bf16) {
    const unsigned t = threadIdx.x, base = t & ~31u, lane = t & 31u;
    for (int i = 0; i < 4; ++i) ls_mma_a[t][i] = a[i];
    for (int i = 0; i < 2; ++i) ls_mma_b[t][i] = b[i];
    __syncwarp(0xffffffffu);
    auto A = [&](unsigned row, unsigned k) {
        unsigned v = ls_mma_a[base + (row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
        return ls_emu_widen16((k & 1) ? v >> 16 : v & 0xffffu, bf16);
    };
    auto B = [&](unsigned k, unsigned n) {
        unsigned v = ls_mma_b[base + n * 4 + (k % 8) / 2][k >= 8 ? 1 : 0];
        return ls_emu_widen16((k & 1) ? v >> 16 : v & 0xffffu, bf16);
    };
    const unsigned g = lane / 4, tq = lane % 4;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * tq + (i & 1);
        double s = 0;
        for (unsigned k = 0; k < 16; ++k) s += A(row, k) * B(k, col);
        out[i] = (float)(s + (double)d[i]);
    }
    __syncwarp(0xffffffffu);
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Kernel arguments from the command line: any pointer, an int, a float.
struct AnyPtr {
    void* p;
    template <class T> operator T*() const { return (T*)p; }
};
struct Arg { void* p = nullptr; long long i = 0; float f = 0; };
typedef std::map<std::string, std::function<void(std::vector<Arg>&)>> Table;
"#;

const MAIN: &str = r#"
static std::vector<unsigned char> ls_read(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

int main() {
    Table table = make_table();
    char op[64];
    while (std::scanf("%63s", op) == 1) {
        std::string o(op);
        if (o == "exp" || o == "ln" || o == "silu") {
            unsigned b; std::scanf("%x", &b);
            float x = __uint_as_float(b);
            float r = o == "exp" ? ls_exp(x) : o == "ln" ? ls_ln(x) : ls_silu(x);
            std::printf("%08x\n", __float_as_uint(r));
        } else if (o == "f16" || o == "bf16") {
            unsigned h; std::scanf("%x", &h);
            float r = o == "f16" ? ls_f16_to_f32((u16)h) : ls_bf16_to_f32((u16)h);
            std::printf("%08x\n", __float_as_uint(r));
        } else if (o == "philox") {
            u32 c[4], k0, k1;
            std::scanf("%x %x %x %x %x %x", &c[0], &c[1], &c[2], &c[3], &k0, &k1);
            ls_philox(c, k0, k1);
            std::printf("%08x %08x %08x %08x\n", c[0], c[1], c[2], c[3]);
        } else if (o == "noise") {
            unsigned long long seed, step; unsigned token;
            std::scanf("%llx %llx %x", &seed, &step, &token);
            std::printf("%08x %08x\n", __float_as_uint(ls_uniform(seed, step, token)),
                        __float_as_uint(ls_gumbel(seed, step, token)));
        } else if (o == "launch") {
            // launch NAME GX GY GZ BLOCK SMEM NARGS {B path | P n path… | I int | F hexbits}…
            char name[128]; unsigned gx, gy, gz, block; size_t smem; int nargs;
            std::scanf("%127s %u %u %u %u %zu %d", name, &gx, &gy, &gz, &block, &smem, &nargs);
            std::vector<Arg> args(nargs);
            std::vector<std::pair<std::string, std::vector<unsigned char>>> bufs;
            std::vector<std::vector<unsigned long long>> ptr_lists;
            bufs.reserve(256);
            ptr_lists.reserve(16);
            std::vector<std::pair<size_t, bool>> slots; // index into bufs, written back
            for (int i = 0; i < nargs; ++i) {
                char kind[4]; std::scanf("%3s", kind);
                if (kind[0] == 'B') {
                    char path[4096]; std::scanf("%4095s", path);
                    bufs.emplace_back(path, ls_read(path));
                    bufs.back().second.resize(bufs.back().second.size() + 16); // never empty
                    args[i].p = bufs.back().second.data();
                    slots.push_back({bufs.size() - 1, true});
                } else if (kind[0] == 'P') {
                    int n; std::scanf("%d", &n);
                    std::vector<unsigned long long> ptrs;
                    for (int j = 0; j < n; ++j) {
                        char path[4096]; std::scanf("%4095s", path);
                        bufs.emplace_back(path, ls_read(path));
                        bufs.back().second.resize(bufs.back().second.size() + 16);
                        ptrs.push_back((unsigned long long)bufs.back().second.data());
                        slots.push_back({bufs.size() - 1, false});
                    }
                    ptr_lists.push_back(ptrs);
                    args[i].p = ptr_lists.back().data();
                } else if (kind[0] == 'I') {
                    std::scanf("%lld", &args[i].i);
                } else {
                    unsigned b; std::scanf("%x", &b);
                    args[i].f = __uint_as_float(b);
                }
            }
            auto k = table.find(name);
            if (k == table.end()) { std::fprintf(stderr, "unknown kernel %s\n", name); return 3; }
            ls_kernel_name = name;
            ls_launch({gx, gy, gz}, block, smem, [&] { k->second(args); });
            for (auto& [idx, out] : slots) {
                if (!out) continue;
                auto& b = bufs[idx];
                std::ofstream f(b.first, std::ios::binary);
                f.write((const char*)b.second.data(), b.second.size() - 16);
            }
            std::printf("ok\n");
        } else {
            std::fprintf(stderr, "unknown command %s\n", op);
            return 2;
        }
        std::fflush(stdout);
    }
    return 0;
}
"#;

/// Every kernel the emulator can launch, with its parameter kinds (p = pointer, i = int,
/// f = float), in the order of the `.cu` signatures.
const KERNELS: &[(&str, &str)] = &[
    ("linear_portable_f32_m1", "pppiiiii"),
    ("linear_portable_f32_m2", "pppiiiii"),
    ("linear_portable_f32_m4", "pppiiiii"),
    ("linear_portable_f32_m8", "pppiiiii"),
    ("linear_portable_bf16_m1", "pppiiiii"),
    ("linear_portable_bf16_m2", "pppiiiii"),
    ("linear_portable_bf16_m4", "pppiiiii"),
    ("linear_portable_bf16_m8", "pppiiiii"),
    ("linear_portable_f16_m1", "pppiiiii"),
    ("linear_portable_f16_m2", "pppiiiii"),
    ("linear_portable_f16_m4", "pppiiiii"),
    ("linear_portable_f16_m8", "pppiiiii"),
    ("linear_portable_q8_0_m1", "pppiiiii"),
    ("linear_portable_q8_0_m2", "pppiiiii"),
    ("linear_portable_q8_0_m4", "pppiiiii"),
    ("linear_portable_q8_0_m8", "pppiiiii"),
    ("linear_portable_q4_0_m1", "pppiiiii"),
    ("linear_portable_q4_0_m2", "pppiiiii"),
    ("linear_portable_q4_0_m4", "pppiiiii"),
    ("linear_portable_q4_0_m8", "pppiiiii"),
    ("linear_portable_q4_1_m1", "pppiiiii"),
    ("linear_portable_q4_1_m2", "pppiiiii"),
    ("linear_portable_q4_1_m4", "pppiiiii"),
    ("linear_portable_q4_1_m8", "pppiiiii"),
    ("tree_combine", "piip"),
    ("add_bias_f32", "ppii"),
    ("add_bias_bf16", "ppii"),
    ("add_bias_f16", "ppii"),
    ("add_bias_q8_0", "ppii"),
    ("add_bias_q4_0", "ppii"),
    ("add_bias_q4_1", "ppii"),
    ("rms_norm_f32", "pppiiif"),
    ("rms_norm_bf16", "pppiiif"),
    ("rms_norm_f16", "pppiiif"),
    ("rms_norm_q8_0", "pppiiif"),
    ("rms_norm_q4_0", "pppiiif"),
    ("rms_norm_q4_1", "pppiiif"),
    ("rope", "pppiii"),
    ("swiglu", "pppi"),
    ("add_assign", "ppi"),
    ("embedding_f32", "pppii"),
    ("embedding_bf16", "pppii"),
    ("embedding_f16", "pppii"),
    ("embedding_q8_0", "pppii"),
    ("embedding_q4_0", "pppii"),
    ("embedding_q4_1", "pppii"),
    ("gather_rows", "pppii"),
    ("write_kv", "pppppii"),
    ("attention_paged", "ppppppiiiiifi"),
    ("sample_partials", "piiiiiippppp"),
    ("convert_x_bf16", "ppiii"),
    ("convert_x_f16", "ppiii"),
    ("linear_native_bf16_l0", "pppiiiii"),
    ("linear_native_bf16_l1", "pppiiiii"),
    ("linear_native_bf16_l2", "pppiiiii"),
    ("linear_native_bf16_l3", "pppiiiii"),
    ("linear_native_bf16_l4", "pppiiiii"),
    ("linear_native_bf16_l5", "pppiiiii"),
    ("linear_native_bf16_l6", "pppiiiii"),
    ("linear_native_f16_l0", "pppiiiii"),
    ("linear_native_f16_l1", "pppiiiii"),
    ("linear_native_f16_l2", "pppiiiii"),
    ("linear_native_f16_l3", "pppiiiii"),
    ("linear_native_f16_l4", "pppiiiii"),
    ("linear_native_f16_l5", "pppiiiii"),
    ("linear_native_f16_l6", "pppiiiii"),
];

fn harness_source() -> String {
    let mut src = String::from(PRELUDE);
    src.push_str(nvrtc::COMMON_CUH);
    for s in nvrtc::SOURCES {
        src.push_str(&format!("\n// ---- {}\n", s.file));
        src.push_str(&s.text.replace("#include \"common.cuh\"", ""));
    }
    src.push_str("\nstatic Table make_table() {\n    Table t;\n");
    for (name, sig) in KERNELS {
        let args: Vec<String> = sig
            .chars()
            .enumerate()
            .map(|(i, c)| match c {
                'p' => format!("AnyPtr{{a[{i}].p}}"),
                'i' => format!("(int)a[{i}].i"),
                'f' => format!("a[{i}].f"),
                _ => unreachable!(),
            })
            .collect();
        src.push_str(&format!(
            "    t[\"{name}\"] = [](std::vector<Arg>& a) {{ (void)a; {name}({}); }};\n",
            args.join(", ")
        ));
    }
    src.push_str("    return t;\n}\n");
    src.push_str(MAIN);
    src
}

enum Arg {
    /// A buffer (read back after the launch).
    B(Vec<u8>),
    /// A device array of pointers to these buffers.
    P(Vec<Vec<u8>>),
    I(i64),
    F(f32),
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn u32s(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn u64s(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn to_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

struct Emu {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    dir: PathBuf,
    files: usize,
}

/// Compile the emulator with every kernel source; `None` without a C++ compiler.
fn build_harness() -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    if Command::new(&cxx).arg("--version").output().is_err() {
        skip(&format!("SKIPPED: no C++ compiler ({cxx}) for the SIMT emulator"));
        return None;
    }
    let dir = std::env::temp_dir().join(format!("lockstep-simt-build-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("simt.cpp");
    let exe = dir.join("simt");
    std::fs::write(&src, harness_source()).unwrap();
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-w", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "building the SIMT emulator failed:\n{}", String::from_utf8_lossy(&out.stderr));
    Some(exe)
}

impl Emu {
    /// Start an emulator process (building it once per test binary), or `None` (test skipped)
    /// without a C++20 compiler.
    fn start() -> Option<Emu> {
        static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let exe = EXE.get_or_init(build_harness).clone()?;
        let dir = std::env::temp_dir().join(format!(
            "lockstep-simt-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(&exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        Some(Emu { child, stdin: Some(stdin), lines: rx, dir, files: 0 })
    }

    fn line(&mut self, what: &str) -> String {
        match self.lines.recv_timeout(Duration::from_secs(120)) {
            Ok(l) => l,
            Err(_) => {
                let _ = self.child.kill();
                panic!("emulated {what} did not answer: a deadlock (a shuffle or barrier not reached by every thread of its warp or block) or a crash")
            }
        }
    }

    fn file(&mut self, bytes: &[u8]) -> PathBuf {
        self.files += 1;
        let p = self.dir.join(format!("b{}.bin", self.files));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// Launch `kernel` with `l`'s geometry; returns the `B` buffers' contents afterwards.
    fn launch(&mut self, kernel: &str, l: Launch, args: Vec<Arg>) -> Vec<Vec<u8>> {
        let mut cmd =
            format!("launch {kernel} {} {} {} {} {} {}", l.grid.0, l.grid.1, l.grid.2, l.block, l.smem, args.len());
        let mut outs = Vec::new();
        for a in &args {
            match a {
                Arg::B(b) => {
                    let p = self.file(b);
                    cmd.push_str(&format!(" B {}", p.display()));
                    outs.push(p);
                }
                Arg::P(list) => {
                    cmd.push_str(&format!(" P {}", list.len()));
                    for b in list {
                        let p = self.file(b);
                        cmd.push_str(&format!(" {}", p.display()));
                    }
                }
                Arg::I(i) => cmd.push_str(&format!(" I {i}")),
                Arg::F(f) => cmd.push_str(&format!(" F {:08x}", f.to_bits())),
            }
        }
        let stdin = self.stdin.as_mut().expect("emulator input open");
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let reply = self.line(kernel);
        assert_eq!(reply, "ok", "{kernel}");
        outs.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }
}

impl Drop for Emu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------- test data

mod common;
use common::{columns_of, quant_weight, ContractData, Rng};

const DTYPES: [DType; 3] = [DType::F32, DType::Bf16, DType::F16];

fn sfx(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
        DType::Q8_0 => "q8_0",
        DType::Q4_0 => "q4_0",
        DType::Q4_1 => "q4_1",
    }
}

const QTYPES: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4_1];

fn weight(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> HostWeight {
    HostWeight::from_f32(&rng.vec(rows * cols), dtype, rows, cols)
}

/// The backend's portable linear, emulated: x [m, k_real of segs], w [n, same] → subtree sums.
fn emu_linear(emu: &mut Emu, x: &[f32], m: usize, w: &HostWeight, segs: lockstep_kernels::SegmentRange) -> Vec<f32> {
    let (mt, l) = plan::linear_portable(m, w.rows, segs.count);
    let out = emu.launch(
        &format!("linear_portable_{}_m{mt}", sfx(w.dtype)),
        l,
        vec![
            Arg::B(f32s(x)),
            Arg::B(w.bytes.as_slice().to_vec()),
            Arg::B(f32s(&vec![0.0; m * w.rows])),
            Arg::I(m as i64),
            Arg::I(w.rows as i64),
            Arg::I(w.cols as i64),
            Arg::I(segs.seg.seg_len as i64),
            Arg::I(segs.count as i64),
        ],
    );
    to_f32(&out[2])
}

// ---------------------------------------------------------------- tests

#[test]
fn emulated_common_cuh_math_equals_the_rust_contract() {
    let Some(mut emu) = Emu::start() else { return };
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        1e-45,
        -1e-45,
        f32::MAX,
        88.72284,
        88.72285,
        -103.97208,
        -103.97209,
        0.5,
        std::f32::consts::SQRT_2,
    ];
    let mut x = -110.0f32;
    while x < 95.0 {
        xs.push(x);
        x += 0.0173;
    }
    let mut b = 7u32;
    for _ in 0..60_000 {
        b = b.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
        xs.push(f32::from_bits(b));
    }
    let mut rng = Rng::new(99);
    let mut philox_cases = vec![([0u32; 4], [0u32; 2]), ([u32::MAX; 4], [u32::MAX; 2])];
    for _ in 0..2000 {
        let r = [rng.next_u64(), rng.next_u64(), rng.next_u64()];
        philox_cases.push((
            [r[0] as u32, (r[0] >> 32) as u32, r[1] as u32, (r[1] >> 32) as u32],
            [r[2] as u32, (r[2] >> 32) as u32],
        ));
    }
    let mut noise_cases = Vec::new();
    for i in 0..20_000u64 {
        let seed = if i % 3 == 0 { i } else { rng.next_u64() };
        let step = if i % 2 == 0 { i % 97 } else { rng.next_u64() };
        noise_cases.push((seed, step, (rng.next_u64() % 200_000) as u32));
    }
    // Write everything, then read the answers (a writer thread keeps the pipe from filling up).
    let mut input = String::new();
    for &v in &xs {
        for op in ["exp", "ln", "silu"] {
            input.push_str(&format!("{op} {:08x}\n", v.to_bits()));
        }
    }
    for h in 0..=u16::MAX {
        input.push_str(&format!("f16 {h:04x}\nbf16 {h:04x}\n"));
    }
    for (c, k) in &philox_cases {
        input.push_str(&format!("philox {:x} {:x} {:x} {:x} {:x} {:x}\n", c[0], c[1], c[2], c[3], k[0], k[1]));
    }
    for (seed, step, tok) in &noise_cases {
        input.push_str(&format!("noise {seed:x} {step:x} {tok:x}\n"));
    }
    let mut stdin = emu.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        stdin.write_all(input.as_bytes()).unwrap();
        stdin.flush().unwrap();
    });
    let hex = |s: &str| u32::from_str_radix(s, 16).unwrap();
    let same = |a: f32, b: u32| (a.is_nan() && f32::from_bits(b).is_nan()) || a.to_bits() == b;
    for &v in &xs {
        let (e, l, s) = (hex(&emu.line("exp")), hex(&emu.line("ln")), hex(&emu.line("silu")));
        assert!(same(math::exp(v), e), "exp({v:e}): rust {:#010x} cuh {e:#010x}", math::exp(v).to_bits());
        assert!(same(math::ln(v), l), "ln({v:e}): rust {:#010x} cuh {l:#010x}", math::ln(v).to_bits());
        assert!(same(math::silu(v), s), "silu({v:e}): rust {:#010x} cuh {s:#010x}", math::silu(v).to_bits());
    }
    for h in 0..=u16::MAX {
        let (f, b) = (hex(&emu.line("f16")), hex(&emu.line("bf16")));
        let le = h.to_le_bytes();
        assert!(
            same(DType::F16.widen(&le), f),
            "f16 {h:#06x}: rust {:#010x} cuh {f:#010x}",
            DType::F16.widen(&le).to_bits()
        );
        assert_eq!(DType::Bf16.widen(&le).to_bits(), b, "bf16 {h:#06x}");
    }
    for (c, k) in &philox_cases {
        let got: Vec<u32> = emu.line("philox").split_whitespace().map(hex).collect();
        assert_eq!(got, philox4x32_10(*c, *k).to_vec(), "philox {c:x?} {k:x?}");
    }
    for &(seed, step, tok) in &noise_cases {
        let got: Vec<u32> = emu.line("noise").split_whitespace().map(hex).collect();
        assert_eq!(got[0], uniform(seed, step, tok).to_bits(), "uniform({seed}, {step}, {tok})");
        assert_eq!(got[1], gumbel(seed, step, tok).to_bits(), "gumbel({seed}, {step}, {tok})");
    }
    writer.join().unwrap();
    println!(
        "common.cuh == Rust contract on {} exp/ln/silu inputs, 65536 f16 + bf16 patterns, {} philox and {} noise cases",
        xs.len(),
        philox_cases.len(),
        noise_cases.len()
    );
}

#[test]
fn emulated_portable_linear_equals_reference_for_every_dtype_segment_count_and_batch() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(1);
    let mut cases = 0;
    for case in 0..21 {
        let m = [1, 2, 3, 5, 9, 13, 20][case % 7];
        let k = 1 + rng.below(300);
        let n = 1 + rng.below(24);
        let segments = [1, 2, 4, 8, 16, 32, 64][(case / 3) % 7];
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * k);
        let w = weight(&mut rng, dtype, n, k);
        let segs = Segmentation::new(k, segments).unwrap().full();
        let want = bits(&reference::linear_partial(&x, m, w.view(), segs));
        let got = bits(&emu_linear(&mut emu, &x, m, &w, segs));
        assert_eq!(got, want, "m={m} k={k} n={n} S={segments} {dtype:?}");
        cases += 1;
    }
    // A row alone equals the same row inside batches of every MT.
    let (k, n) = (203, 9);
    let w = weight(&mut rng, DType::Bf16, n, k);
    let x = rng.vec(11 * k);
    let segs = Segmentation::new(k, 8).unwrap().full();
    let alone: Vec<Vec<u32>> =
        (0..11).map(|i| bits(&emu_linear(&mut emu, &x[i * k..(i + 1) * k], 1, &w, segs))).collect();
    for m in [2, 3, 4, 8, 11] {
        let y = emu_linear(&mut emu, &x[..m * k], m, &w, segs);
        for i in 0..m {
            assert_eq!(bits(&y[i * n..(i + 1) * n]), alone[i], "row {i} of M={m}");
        }
    }
    println!("portable linear == reference on {cases} random shapes; rows batch-invariant for M in 1..=11");
}

#[test]
fn emulated_quantized_linear_and_embedding_equal_reference_for_every_block_type() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(31);
    for case in 0..9 {
        let m = [1, 3, 9][case % 3];
        let k = 32 * (1 + rng.below(10));
        let n = 1 + rng.below(20);
        let segments = [1, 3, 6, 8, 12, 16, 24, 48, 4][case];
        let dtype = QTYPES[case % 3];
        let x = rng.vec(m * k);
        let w = quant_weight(&mut rng, dtype, n, k);
        let segs = Segmentation::new(k, segments).unwrap().full();
        let want = bits(&reference::linear_partial(&x, m, w.view(), segs));
        assert_eq!(bits(&emu_linear(&mut emu, &x, m, &w, segs)), want, "m={m} k={k} n={n} S={segments} {dtype:?}");
        let table = quant_weight(&mut rng, dtype, 5, 64);
        let ids = [4u32, 0, 2];
        let out = emu.launch(
            &format!("embedding_{}", sfx(dtype)),
            plan::elementwise(3 * 64),
            vec![
                Arg::B(u32s(&ids)),
                Arg::B(table.bytes.as_slice().to_vec()),
                Arg::B(f32s(&vec![0.0; 3 * 64])),
                Arg::I(3),
                Arg::I(64),
            ],
        );
        assert_eq!(bits(&to_f32(&out[2])), bits(&reference::embedding(&ids, table.view())), "embedding {dtype:?}");
    }
}

#[test]
fn emulated_three_way_row_parallel_shards_of_quantized_weights_equal_unsplit() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(32);
    for (case, &(k, segments, degrees)) in
        [(576, 12, &[3, 6][..]), (384, 6, &[3, 6]), (192, 3, &[3])].iter().enumerate()
    {
        let dtype = QTYPES[case % 3];
        let (m, n) = (2, 7);
        let x = rng.vec(m * k);
        let w = quant_weight(&mut rng, dtype, n, k);
        let seg = Segmentation::new(k, segments).unwrap();
        let full = emu_linear(&mut emu, &x, m, &w, seg.full());
        assert_eq!(bits(&full), bits(&reference::linear_partial(&x, m, w.view(), seg.full())));
        for &t in degrees {
            let mut parts = Vec::new();
            for r in 0..t {
                let segs = seg.shard(r, t).unwrap();
                let cols = segs.real_range();
                let xs: Vec<f32> = columns_of(&x, k, cols.clone());
                let wsh = w.columns(cols).unwrap();
                parts.push(f32s(&emu_linear(&mut emu, &xs, m, &wsh, segs)));
            }
            let out = emu.launch(
                "tree_combine",
                plan::elementwise(m * n),
                vec![Arg::P(parts), Arg::I(t as i64), Arg::I((m * n) as i64), Arg::B(f32s(&vec![0.0; m * n]))],
            );
            assert_eq!(bits(&to_f32(&out[0])), bits(&full), "t={t} k={k} S={segments} {dtype:?}");
        }
    }
}

#[test]
fn emulated_row_parallel_shards_tree_combine_and_bias_equal_unsplit() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(6);
    for case in 0..6 {
        let (m, k, n) = (1 + rng.below(5), 1 + rng.below(400), 1 + rng.below(20));
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * k);
        let wf = rng.vec(n * k);
        let w = HostWeight::from_f32(&wf, dtype, n, k);
        let bias = weight(&mut rng, dtype, 1, n);
        let seg = Segmentation::new(k, 8).unwrap();
        let full = emu_linear(&mut emu, &x, m, &w, seg.full());
        for t in [2, 4, 8] {
            let mut parts = Vec::new();
            for r in 0..t {
                let segs = seg.shard(r, t).unwrap();
                let cols = segs.real_range();
                let xs: Vec<f32> = columns_of(&x, k, cols.clone());
                let ws: Vec<f32> = (0..n).flat_map(|j| wf[j * k + cols.start..j * k + cols.end].to_vec()).collect();
                let wsh = HostWeight::from_f32(&ws, dtype, n, cols.len());
                let p = emu_linear(&mut emu, &xs, m, &wsh, segs);
                assert_eq!(bits(&p), bits(&reference::linear_partial(&xs, m, wsh.view(), segs)), "rank {r} of {t}");
                parts.push(f32s(&p));
            }
            let out = emu.launch(
                "tree_combine",
                plan::elementwise(m * n),
                vec![Arg::P(parts), Arg::I(t as i64), Arg::I((m * n) as i64), Arg::B(f32s(&vec![0.0; m * n]))],
            );
            assert_eq!(bits(&to_f32(&out[0])), bits(&full), "t={t} k={k} {dtype:?}");
        }
        let out = emu.launch(
            &format!("add_bias_{}", sfx(dtype)),
            plan::elementwise(m * n),
            vec![Arg::B(f32s(&full)), Arg::B(bias.bytes.as_slice().to_vec()), Arg::I((m * n) as i64), Arg::I(n as i64)],
        );
        let mut want = full.clone();
        reference::add_bias(&mut want, bias.view());
        assert_eq!(bits(&to_f32(&out[0])), bits(&want), "bias {dtype:?}");
    }
}

#[test]
fn emulated_row_and_elementwise_ops_equal_reference() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(2);
    for case in 0..14 {
        let m = 1 + rng.below(4);
        let n = 1 + rng.below(300);
        let segments = [1, 2, 4, 8, 16, 32, 64][case % 7];
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * n);
        let w = weight(&mut rng, dtype, 1, n);
        let seg = Segmentation::new(n, segments).unwrap();
        let out = emu.launch(
            &format!("rms_norm_{}", sfx(dtype)),
            plan::rms_norm(m),
            vec![
                Arg::B(f32s(&x)),
                Arg::B(w.bytes.as_slice().to_vec()),
                Arg::B(f32s(&vec![0.0; m * n])),
                Arg::I(n as i64),
                Arg::I(seg.segments as i64),
                Arg::I(seg.seg_len as i64),
                Arg::F(1e-5),
            ],
        );
        assert_eq!(
            bits(&to_f32(&out[2])),
            bits(&reference::rms_norm(&x, w.view(), 1e-5, segments)),
            "rms_norm n={n} S={segments} {dtype:?}"
        );

        let g = rng.vec(m * n);
        let out = emu.launch(
            "swiglu",
            plan::elementwise(m * n),
            vec![Arg::B(f32s(&g)), Arg::B(f32s(&x)), Arg::B(f32s(&vec![0.0; m * n])), Arg::I((m * n) as i64)],
        );
        assert_eq!(bits(&to_f32(&out[2])), bits(&reference::swiglu(&g, &x)), "swiglu");
        let out = emu.launch(
            "add_assign",
            plan::elementwise(m * n),
            vec![Arg::B(f32s(&x)), Arg::B(f32s(&g)), Arg::I((m * n) as i64)],
        );
        assert_eq!(bits(&to_f32(&out[0])), bits(&reference::add(&x, &g)), "add_assign");

        let table = weight(&mut rng, dtype, 7, n);
        let ids: Vec<u32> = (0..m).map(|_| rng.below(7) as u32).collect();
        let out = emu.launch(
            &format!("embedding_{}", sfx(dtype)),
            plan::elementwise(m * n),
            vec![
                Arg::B(u32s(&ids)),
                Arg::B(table.bytes.as_slice().to_vec()),
                Arg::B(f32s(&vec![0.0; m * n])),
                Arg::I(m as i64),
                Arg::I(n as i64),
            ],
        );
        assert_eq!(bits(&to_f32(&out[2])), bits(&reference::embedding(&ids, table.view())), "embedding {dtype:?}");

        let rows: Vec<u32> = (0..3).map(|_| rng.below(m) as u32).collect();
        let out = emu.launch(
            "gather_rows",
            plan::elementwise(3 * n),
            vec![Arg::B(f32s(&x)), Arg::B(u32s(&rows)), Arg::B(f32s(&vec![0.0; 3 * n])), Arg::I(3), Arg::I(n as i64)],
        );
        let want: Vec<f32> = rows.iter().flat_map(|&r| x[r as usize * n..(r as usize + 1) * n].to_vec()).collect();
        assert_eq!(bits(&to_f32(&out[2])), bits(&want), "gather_rows");
    }
    // write_kv into random slots of a garbage-filled cache.
    let (width, slots_total) = (24, 40);
    let kc = rng.vec(slots_total * width);
    let vc = rng.vec(slots_total * width);
    let slots: Vec<u32> = vec![5, 39, 0, 17];
    let k = rng.vec(slots.len() * width);
    let v = rng.vec(slots.len() * width);
    let out = emu.launch(
        "write_kv",
        plan::elementwise(k.len()),
        vec![
            Arg::B(f32s(&kc)),
            Arg::B(f32s(&vc)),
            Arg::B(f32s(&k)),
            Arg::B(f32s(&v)),
            Arg::B(u32s(&slots)),
            Arg::I(slots.len() as i64),
            Arg::I(width as i64),
        ],
    );
    let (mut wk, mut wv) = (kc.clone(), vc.clone());
    for (i, &s) in slots.iter().enumerate() {
        let s = s as usize;
        wk[s * width..(s + 1) * width].copy_from_slice(&k[i * width..(i + 1) * width]);
        wv[s * width..(s + 1) * width].copy_from_slice(&v[i * width..(i + 1) * width]);
    }
    assert_eq!(bits(&to_f32(&out[0])), bits(&wk));
    assert_eq!(bits(&to_f32(&out[1])), bits(&wv));
}

#[test]
fn emulated_rope_equals_reference() {
    let Some(mut emu) = Emu::start() else { return };
    let cfg = RopeConfig {
        head_dim: 16,
        theta: 500000.0,
        scaling: Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        }),
    };
    let t = RopeTables::new(&cfg, 300).unwrap();
    let mut rng = Rng::new(3);
    let (n_heads, d) = (3, 16);
    let pos = [0u32, 3, 17, 255, 299];
    let x = rng.vec(pos.len() * n_heads * d);
    let mut want = x.clone();
    reference::rope(&mut want, n_heads, &pos, &t);
    // The backend sends only this call's rows of the tables.
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &pos {
        let (c, s) = t.row(p as usize).unwrap();
        cos.extend_from_slice(c);
        sin.extend_from_slice(s);
    }
    let out = emu.launch(
        "rope",
        plan::elementwise(pos.len() * n_heads * d / 2),
        vec![
            Arg::B(f32s(&x)),
            Arg::B(f32s(&cos)),
            Arg::B(f32s(&sin)),
            Arg::I(pos.len() as i64),
            Arg::I(n_heads as i64),
            Arg::I(d as i64),
        ],
    );
    assert_eq!(bits(&to_f32(&out[0])), bits(&want));
}

#[test]
fn emulated_paged_attention_equals_reference() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(10);
    let shape = [(0usize, 9usize), (30, 1), (5, 3), (0, 1), (70, 2)];
    for (n_heads, n_kv, d) in [(4, 2, 16), (8, 4, 8), (2, 2, 20), (6, 1, 64)] {
        let block_size = 4;
        let blocks_needed: usize = shape.iter().map(|&(f, n)| (f + n).div_ceil(block_size)).sum();
        let layout = KvLayout { num_blocks: blocks_needed + 5, block_size, n_kv_heads: n_kv, head_dim: d };
        let mut free: Vec<u32> = (0..layout.num_blocks as u32).collect();
        let mut tables_owned = Vec::new();
        let mut row = 0;
        let mut meta = Vec::new();
        for &(first_pos, n_q) in &shape {
            let table: Vec<u32> =
                (0..(first_pos + n_q).div_ceil(block_size)).map(|_| free.swap_remove(rng.below(free.len()))).collect();
            tables_owned.push(table);
            meta.push((row, n_q, first_pos));
            row += n_q;
        }
        let q = rng.vec(row * n_heads * d);
        let kc = rng.vec(layout.floats());
        let vc = rng.vec(layout.floats());
        let seqs: Vec<AttnSeq> = meta
            .iter()
            .zip(&tables_owned)
            .map(|(&(q_row, n_q, first_pos), t)| AttnSeq { block_table: t, q_row, n_q, first_pos })
            .collect();
        // Row metadata exactly as the backend builds it.
        let mut rows: Vec<i32> = Vec::new();
        let mut tables: Vec<u32> = Vec::new();
        for s in &seqs {
            let off = tables.len() as i32;
            tables.extend_from_slice(s.block_table);
            for i in 0..s.n_q {
                rows.extend_from_slice(&[(s.q_row + i) as i32, (s.first_pos + i) as i32, off]);
            }
        }
        for kv_chunk in [1, 5, 64] {
            let p = AttnParams { n_heads, n_kv_heads: n_kv, head_dim: d, block_size, kv_chunk };
            let want = bits(&reference::attention(&q, &seqs, &kc, &vc, &layout, p));
            let (warps, launch) = plan::attention(rows.len() / 3, n_heads, kv_chunk);
            let out = emu.launch(
                "attention_paged",
                launch,
                vec![
                    Arg::B(f32s(&q)),
                    Arg::B(f32s(&vec![0.0; q.len()])),
                    Arg::B(f32s(&kc)),
                    Arg::B(f32s(&vc)),
                    Arg::B(i32s(&rows)),
                    Arg::B(u32s(&tables)),
                    Arg::I(n_heads as i64),
                    Arg::I(n_kv as i64),
                    Arg::I(d as i64),
                    Arg::I(block_size as i64),
                    Arg::I(kv_chunk as i64),
                    Arg::F(p.scale()),
                    Arg::I(warps as i64),
                ],
            );
            assert_eq!(bits(&to_f32(&out[1])), want, "heads={n_heads}/{n_kv} d={d} chunk={kv_chunk}");
        }
    }
}

#[test]
fn emulated_sampling_partials_equal_shard_sample() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(8);
    let params = [
        SamplingParams { temperature: 0.0, ..Default::default() },
        SamplingParams { temperature: 0.8, seed: 42, ..Default::default() },
        SamplingParams { temperature: 1.3, seed: u64::MAX - 5, ..Default::default() },
    ];
    let reqs: Vec<SampleRequest> =
        params.iter().flat_map(|&p| [0u64, 7, 1 << 33].map(|step| SampleRequest { params: p, step })).collect();
    for vocab in [1usize, 17, 1000, 4099] {
        let rows: Vec<Vec<f32>> = (0..reqs.len()).map(|_| rng.vec(vocab).iter().map(|v| v * 6.0).collect()).collect();
        let seg = Segmentation::new(vocab, 8).unwrap();
        for t in [1usize, 2, 8] {
            for r in 0..t {
                let shard = VocabShard::new(seg.shard(r, t).unwrap());
                let logits: Vec<f32> =
                    rows.iter().flat_map(|l| l[shard.offset..shard.offset + shard.rows].to_vec()).collect();
                let count = shard.segs.count;
                let n = reqs.len();
                let out = emu.launch(
                    "sample_partials",
                    plan::sample(count, n),
                    vec![
                        Arg::B(f32s(&logits)),
                        Arg::I(shard.rows as i64),
                        Arg::I(shard.offset as i64),
                        Arg::I(seg.len as i64),
                        Arg::I(seg.seg_len as i64),
                        Arg::I(shard.segs.first as i64),
                        Arg::I(count as i64),
                        Arg::B(f32s(&reqs.iter().map(|q| q.params.temperature).collect::<Vec<_>>())),
                        Arg::B(u64s(&reqs.iter().map(|q| q.params.seed).collect::<Vec<_>>())),
                        Arg::B(u64s(&reqs.iter().map(|q| q.step).collect::<Vec<_>>())),
                        Arg::B(f32s(&vec![0.0; n * count * 5])),
                        Arg::B(u32s(&vec![0; n * count * 2])),
                    ],
                );
                let (pf, pu) = (to_f32(&out[4]), to_u32(&out[5]));
                for (i, req) in reqs.iter().enumerate() {
                    let got = plan::assemble_sample(&pf, &pu, i, count);
                    let want = shard_sample(&logits[i * shard.rows..(i + 1) * shard.rows], &shard, req);
                    let key = |s: &lockstep_kernels::ShardSample| {
                        (
                            s.lse.max.to_bits(),
                            s.lse.sum.to_bits(),
                            s.best.map(|c| (c.id, c.logit.to_bits(), c.z.to_bits(), c.score.to_bits())),
                            s.lse_scaled.is_none() && s.candidates.is_empty(),
                        )
                    };
                    assert_eq!(key(&got), key(&want), "vocab={vocab} shard {r}/{t} {req:?}");
                }
            }
        }
    }
}

/// The emulated native linear: convert x to 16 bits, then the tensor-core kernel.
fn emu_native(emu: &mut Emu, x: &[f32], m: usize, w: &HostWeight, segs: lockstep_kernels::SegmentRange) -> Vec<f32> {
    let t = sfx(w.dtype);
    let kp = segs.padded_len();
    let out = emu.launch(
        &format!("convert_x_{t}"),
        plan::elementwise(m * kp),
        vec![
            Arg::B(f32s(x)),
            Arg::B(vec![0u8; m * kp * 2]),
            Arg::I(m as i64),
            Arg::I(w.cols as i64),
            Arg::I(kp as i64),
        ],
    );
    let xh = out[1].clone();
    let out = emu.launch(
        &format!("linear_native_{t}_l{}", segs.count.trailing_zeros()),
        plan::linear_native(m, w.rows),
        vec![
            Arg::B(xh),
            Arg::B(w.bytes.as_slice().to_vec()),
            Arg::B(f32s(&vec![0.0; m * w.rows])),
            Arg::I(m as i64),
            Arg::I(w.rows as i64),
            Arg::I(w.cols as i64),
            Arg::I(kp as i64),
            Arg::I(segs.seg.seg_len as i64),
        ],
    );
    to_f32(&out[2])
}

/// Rust model of the native linear under the emulator's mma rule: x rounded to the weight's
/// 16-bit type, each k16 block `acc = f32(Σ f64(x)·f64(w) + f64(acc))` from +0 per segment, the
/// contract's pairwise tree over segments.
fn native_model(x: &[f32], m: usize, w: &HostWeight, segs: lockstep_kernels::SegmentRange) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let xr = HostWeight::from_f32(x, w.dtype, m, k);
    let seg_len = segs.seg.seg_len;
    let mut y = Vec::with_capacity(m * n);
    for i in 0..m {
        for j in 0..n {
            let sums: Vec<f32> = (0..segs.count)
                .map(|s| {
                    let mut acc = 0.0f32;
                    for kb in (s * seg_len..(s + 1) * seg_len).step_by(16) {
                        let mut sum = 0.0f64;
                        for kk in kb..kb + 16 {
                            if kk < k {
                                sum += xr.view().get(i, kk) as f64 * w.view().get(j, kk) as f64;
                            } else {
                                sum += 0.0;
                            }
                        }
                        acc = (sum + acc as f64) as f32;
                    }
                    acc
                })
                .collect();
            y.push(reference::segment_tree(&sums));
        }
    }
    y
}

#[test]
fn emulated_native_linear_matches_its_mma_model_and_is_batch_and_tp_invariant() {
    let Some(mut emu) = Emu::start() else { return };
    let mut rng = Rng::new(21);
    for (case, &(m, k, n, segments)) in
        [(1, 64, 9, 1), (5, 37, 70, 2), (70, 96, 13, 8), (3, 300, 64, 64), (66, 200, 65, 4), (2, 16, 1, 32)]
            .iter()
            .enumerate()
    {
        let dtype = [DType::Bf16, DType::F16][case % 2];
        let x = rng.vec(m * k);
        let w = weight(&mut rng, dtype, n, k);
        let segs = Segmentation::new(k, segments).unwrap().full();
        let got = emu_native(&mut emu, &x, m, &w, segs);
        assert_eq!(bits(&got), bits(&native_model(&x, m, &w, segs)), "m={m} k={k} n={n} S={segments} {dtype:?}");
        // Close to the reference: only x's rounding to 16 bits (relative 2^-8 for bf16) differs,
        // so the error is bounded by 2^-7 · Σ|x·w| per output.
        let exact = reference::linear(&x, m, w.view(), None, segments);
        for (o, (a, b)) in got.iter().zip(&exact).enumerate() {
            let (i, j) = (o / n, o % n);
            let mag: f32 = (0..k).map(|kk| (x[i * k + kk] * w.view().get(j, kk)).abs()).sum();
            assert!((a - b).abs() <= mag / 128.0 + 1e-6, "native {a} vs reference {b} (Σ|x·w| = {mag})");
        }
    }
    // Batch invariance: rows alone == rows inside M = 70 (two 64-row tiles).
    let (k, n) = (80, 20);
    let w = weight(&mut rng, DType::Bf16, n, k);
    let x = rng.vec(70 * k);
    let segs = Segmentation::new(k, 8).unwrap().full();
    let batch = emu_native(&mut emu, &x, 70, &w, segs);
    for i in [0, 1, 31, 63, 64, 69] {
        let alone = emu_native(&mut emu, &x[i * k..(i + 1) * k], 1, &w, segs);
        assert_eq!(bits(&batch[i * n..(i + 1) * n]), bits(&alone), "row {i}");
    }
    // TP invariance: shards of segments + the tree == unsplit.
    let wf = rng.vec(n * k);
    let w = HostWeight::from_f32(&wf, DType::Bf16, n, k);
    let xm = &x[..3 * k];
    let seg = Segmentation::new(k, 8).unwrap();
    let full = emu_native(&mut emu, xm, 3, &w, seg.full());
    for t in [2, 4, 8] {
        let mut parts = Vec::new();
        for r in 0..t {
            let segs = seg.shard(r, t).unwrap();
            let cols = segs.real_range();
            let xs: Vec<f32> = (0..3).flat_map(|i| xm[i * k + cols.start..i * k + cols.end].to_vec()).collect();
            let ws: Vec<f32> = (0..n).flat_map(|j| wf[j * k + cols.start..j * k + cols.end].to_vec()).collect();
            let wsh = HostWeight::from_f32(&ws, DType::Bf16, n, cols.len());
            parts.push(f32s(&emu_native(&mut emu, &xs, 3, &wsh, segs)));
        }
        let out = emu.launch(
            "tree_combine",
            plan::elementwise(3 * n),
            vec![Arg::P(parts), Arg::I(t as i64), Arg::I((3 * n) as i64), Arg::B(f32s(&vec![0.0; 3 * n]))],
        );
        assert_eq!(bits(&to_f32(&out[0])), bits(&full), "native t={t}");
    }
}

/// A skip line straight to the stderr handle: libtest captures `println!`/`eprintln!` and shows
/// them only for a failing test, and a skip must be seen.
fn skip(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}
