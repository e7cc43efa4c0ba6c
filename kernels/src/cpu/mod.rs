//! The CPU backend: SIMD kernels with runtime detection, threads only over output tiles.
//!
//! * **ISA paths.** [`Isa::Avx512`] (AVX-512 F/BW/VL), [`Isa::Avx2`] (AVX2 + FMA + F16C) and
//!   [`Isa::Scalar`] (a plain loop over the 16 logical lanes, the path for every other target) all
//!   evaluate the same logical-lane order, so they agree with [`crate::reference`] bit for bit.
//!   Any path can be forced ([`CpuConfig::isa`]) so the contract tests cover each one.
//! * **Threads.** Work is cut into output tiles (rows of `M`, columns of `N`, query rows for
//!   attention — or, with fewer than four rows per thread, a query row's units of heads); one
//!   output element is always computed by one thread in the contract's order, so the thread count
//!   cannot change a bit. Every pass of tiles runs on the backend's [`team`]: the calling thread
//!   and `threads - 1` helpers that spin between a step's passes and park when idle (a rayon
//!   hand-off per pass cost SmolLM2's batch-1 decode ~10 % of its samples in the scheduler). A
//!   private rayon pool of `threads` workers keeps the rest: weight packing, fast mode's `gemm`,
//!   and the model step as a whole ([`Backend::step_pool`]: entered from outside, each of a
//!   decode step's pool calls parked the caller and woke the pool). Linears that read the same x
//!   (q/k/v, gate/up) run as one group ([`Backend::linear_group`]): one pass for all their tasks,
//!   x prepared once per format; each output keeps the bits of its own call.
//! * **Weights** stay as stored (f32 / bf16 / f16, usually memory-mapped) and are widened exactly
//!   in registers. The bf16 dot-product instructions (`vdpbf16ps`) are never used: their internal
//!   rounding is not the fma chain of the contract.
//! * **Fast mode** replaces the matmul by the `gemm` crate (shape-dependent blocking, not
//!   invariant) for comparison; everything else stays on the contract path.
//! * **Native mode** ([`KernelMode::Native`]) runs bf16/f16 linears with numerics of their own, in
//!   the best class the CPU has ([`native_exec`]): AMX tiles ([`amx`], fingerprint `native-amx`),
//!   else AVX512-BF16 dot products ([`dpbf16`], `native-avx512bf16`); other weight types and
//!   everything that is not a linear stay on the contract path. Starting it where the CPU has
//!   neither is an error naming what is missing. Block-quantized weights (Q8_0, Q4_0, Q4_1) run
//!   one rule of their own in both classes: int8 activations times the weights' integers,
//!   exactly, on AVX512-VNNI ([`qdot`]).

pub mod amx;
pub mod dpbf16;
mod linear;
mod ops;
mod pack_arena;
pub mod qdot;
mod team;
pub use ops::tree_combine;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::{
    reference, AttnParams, AttnSeq, Backend, DType, GroupLinear, HostWeight, KernelError, KernelMode, KvLayout,
    NumericsConfig, RopeTables, SampleRequest, SegmentRange, Segmentation, ShardSample, SharedBytes, VocabShard,
    WeightView,
};

/// A SIMD instruction-set path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
    /// Every path this CPU can run, best last.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.is_available()).collect()
    }
    pub fn best() -> Isa {
        *Isa::available().last().expect("scalar is always available")
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }
}

impl std::str::FromStr for Isa {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            o => Err(format!("unknown isa {o:?} (scalar|avx2|avx512)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuConfig {
    /// Worker threads (≥ 1).
    pub threads: usize,
    /// Force an ISA path; `None` picks the best available.
    pub isa: Option<Isa>,
    pub mode: KernelMode,
    pub numerics: NumericsConfig,
}

impl Default for CpuConfig {
    fn default() -> Self {
        CpuConfig {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            isa: None,
            mode: KernelMode::Invariant,
            numerics: NumericsConfig::default(),
        }
    }
}

pub struct CpuBackend {
    cfg: CpuConfig,
    isa: Isa,
    /// Work outside a step's passes: weight packing at load, fast mode's `gemm`, and the step
    /// itself where `step` is this pool.
    pool: std::sync::Arc<rayon::ThreadPool>,
    /// Where a step runs ([`Backend::step_pool`]): `pool` where it has one worker or fast mode's
    /// `gemm` runs inside the step, else a pool of one worker of its own. Entered on the shared
    /// pool, each step woke it and the worker the step did not land on spun through rayon's idle
    /// rounds (`sched_yield`) beside the step's thread and the team's helper: 3–5 % of a
    /// SmolLM2 batch-1 decode's samples on a 2-core host (BENCHMARKS §20.2).
    step: std::sync::Arc<rayon::ThreadPool>,
    /// Every pass inside a step ([`Self::run_tasks`]): the step's thread and `threads - 1` helpers.
    team: team::Team,
    /// The native class and who executes it (`None` in the other modes).
    native: Option<NativeExec>,
    /// Who executes native mode's rule for block weights.
    qdot: qdot::QdotExec,
    /// Where the weights' kept packings live, back to back in first-use order, and the vectors
    /// (`prepare_weight`), in load order.
    arena: pack_arena::PackArena,
}

/// A CPU native numerics class, with who executes its rule: the hardware, or the bit-exact
/// software model the tests use where the hardware is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NativeExec {
    Amx(amx::AmxExec),
    Avx512Bf16(dpbf16::Dpbf16Exec),
}

impl NativeExec {
    /// The class's name in the determinism fingerprint: each class promises its own bits.
    pub fn fingerprint_name(self) -> &'static str {
        match self {
            NativeExec::Amx(_) => "native-amx",
            NativeExec::Avx512Bf16(_) => "native-avx512bf16",
        }
    }
}

/// The revisions of the rules a backend of fingerprint name `backend` runs beyond its class's
/// first ones, for the determinism fingerprint: both CPU native classes run [`qdot::QDOT_RULE`]
/// for block weights. `None` for every other backend (their fingerprints stay as they were).
pub fn native_rule_revisions(backend: &str) -> Option<&'static str> {
    match backend {
        "native-amx" | "native-avx512bf16" => Some(qdot::QDOT_RULE),
        _ => None,
    }
}

/// A row-parallel partial's operands fit each other: `x` `[m, k]`, `w` `[n, k]` with `k` the
/// segment range's real columns, `y` `[m, n]`.
fn assert_linear_shapes(x: &[f32], m: usize, w: WeightView<'_>, segs: SegmentRange, y: &[f32]) {
    assert_eq!(w.cols, segs.real_range().len(), "weight columns must cover the segment range");
    assert_eq!(x.len(), m * w.cols, "x shape");
    assert_eq!(y.len(), m * w.rows, "y shape");
}

/// Who a packing is made for, which decides where its memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PackFor {
    /// A held weight, packed at its first call and kept: appended to the backend's arena, in the
    /// order a step first reads the weights ([`pack_arena`]).
    Keeping,
    /// One call on a bare view: memory of its own, freed after the call.
    OneCall,
}
/// A weight in a native class's own layout, kept with the weight after its first native call.
pub enum NativePacked {
    /// `native-avx512bf16`: 16-row pair panels.
    Panels(dpbf16::PairPanels),
    /// `native-amx`: every B tile of the weight, for one segmentation.
    Tiles(amx::PackedB),
    /// Block weights, both classes: 16-row panels for `VPDPBUSD`.
    Blocks(qdot::QPanels),
}

/// The native class this CPU runs on its hardware: AMX where the CPU and Linux allow tiles (the
/// faster one for prefill), else AVX512-BF16; neither is an error naming what is missing.
pub fn native_exec() -> Result<NativeExec, KernelError> {
    match amx::amx_available() {
        Ok(()) => Ok(NativeExec::Amx(amx::AmxExec::Hardware)),
        Err(_) if dpbf16::avx512bf16_available() => Ok(NativeExec::Avx512Bf16(dpbf16::Dpbf16Exec::Hardware)),
        Err(KernelError::AmxUnavailable(why)) => {
            Err(KernelError::NativeUnavailable(format!("no AMX ({why}) and no AVX512-BF16")))
        }
        Err(other) => Err(other),
    }
}

/// Runs `f` on this thread's tile scratch of at least `len` vectors: a native tile's segment sums,
/// output-major (`[outputs][segments]`), so each output's segment tree runs in place on its own
/// slice. Kept per thread and only ever grown, so a tile call neither allocates nor clears
/// (a 4 KiB zeroed tree array and a growing `Vec` per tile call were ~2.5 % of a SmolLM2 decode
/// step). Every element a tile reads it has written first.
#[cfg(target_arch = "x86_64")]
pub(crate) fn with_tile_sums<R>(len: usize, f: impl FnOnce(&mut [std::arch::x86_64::__m512]) -> R) -> R {
    use std::arch::x86_64::__m512;
    thread_local! {
        static SUMS: std::cell::RefCell<Vec<__m512>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SUMS.with_borrow_mut(|sums| {
        if sums.len() < len {
            // SAFETY: an all-zero bit pattern is a valid `__m512`.
            sums.resize(len, unsafe { std::mem::zeroed() });
        }
        f(&mut sums[..len])
    })
}

/// Keeps segment `s`'s accumulators of an `MR × NB` native tile (output `(i, j)` in `acc[i][j]`)
/// in the tile scratch of [`with_tile_sums`], output-major with `count` segments per output.
///
/// # Safety
/// The CPU has AVX-512 F; `sums` holds `MR · NB · count` vectors and `s < count`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn keep_segment_sums<const MR: usize, const NB: usize>(
    acc: &[[std::arch::x86_64::__m512; NB]; MR],
    sums: &mut [std::arch::x86_64::__m512],
    count: usize,
    s: usize,
) {
    for (i, a) in acc.iter().enumerate() {
        for (j, &v) in a.iter().enumerate() {
            *sums.get_unchecked_mut((i * NB + j) * count + s) = v;
        }
    }
}

/// Asks for the output lines of an `MR × NB` native tile (rows `i0..`, 16-output panels `nb0..`
/// of the `[m, n]` output `out`) for writing, at the tile's start: with many rows a tile's
/// outputs lie on `MR` lines `n` floats apart, rarely cached, and their stores at the tile's end
/// otherwise wait for each line while the store queue fills (SmolLM2's prefill: ~20 % of the
/// samples in `store_tile_outputs`). A hint: no bit depends on it.
///
/// # Safety
/// The CPU has SSE (every x86-64); the tile's rows and panels lie inside the output.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) unsafe fn prefetch_tile_outputs<const MR: usize, const NB: usize>(
    out: *mut f32,
    n: usize,
    i0: usize,
    nb0: usize,
) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
    let (c0, c1) = (nb0 * 16, ((nb0 + NB) * 16).min(n));
    for i in 0..MR {
        let row = out.wrapping_add((i0 + i) * n) as *const i8;
        let (first, last) = (row.wrapping_add(4 * c0), row.wrapping_add(4 * c1 - 1));
        let mut line = first;
        while line <= last {
            _mm_prefetch::<_MM_HINT_ET0>(line);
            line = line.wrapping_add(64);
        }
        _mm_prefetch::<_MM_HINT_ET0>(last);
    }
}

/// [`reference::tree_reduce`] over each `count`-long slice of `values` at once, level by level
/// across the slices: each slice's total is left in its first element. Every slice gets the same
/// adds in the same order as alone (the runs and levels depend on `count` only). Interleaving the
/// slices matters for speed: one tree at a time reads each level's sums back from the stores just
/// made, a chain of store-to-load round trips (a native prefill tile's 16 trees were ~20 % of
/// SmolLM2's prefill samples).
#[inline(always)]
pub(crate) fn trees_in_place<T: Copy>(values: &mut [T], count: usize, add: impl Fn(T, T) -> T) {
    assert!(count > 0 && values.len().is_multiple_of(count), "whole trees of {count} values");
    let mut start = 0;
    while start < count {
        let run = 1usize << (usize::BITS - 1 - (count - start).leading_zeros());
        let mut width = run;
        while width > 1 {
            for tree in values.chunks_exact_mut(count) {
                let v = &mut tree[start..start + width];
                for i in 0..width / 2 {
                    v[i] = add(v[2 * i], v[2 * i + 1]);
                }
            }
            width /= 2;
        }
        if start > 0 {
            for tree in values.chunks_exact_mut(count) {
                tree[0] = add(tree[0], tree[start]);
            }
        }
        start += run;
    }
}

/// Finishes an `MR × NB` native tile: per output block (16 outputs, one vector) the contract's
/// segment tree over its kept segment sums, stored into the `[m, n]` output `out` at rows `i0..`
/// and 16-output panels `nb0..` (masked where the last panel passes `n`). Only the tile's first
/// `rows` rows are finished and stored (an AMX block has 16 rows whatever M is).
///
/// # Safety
/// The CPU has AVX-512 F; `sums` holds `MR · NB · count` vectors written by
/// [`keep_segment_sums`] (or a tile store in that layout); `rows ≤ MR`; the tile's first `rows`
/// rows and its panels lie inside the output, which no other task writes there.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn store_tile_outputs<const MR: usize, const NB: usize>(
    sums: &mut [std::arch::x86_64::__m512],
    count: usize,
    out: *mut f32,
    n: usize,
    i0: usize,
    nb0: usize,
    rows: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(rows <= MR);
    let live = rows * NB * count;
    // The usual segment counts get a copy of the tree for their count, one tree at a time in
    // registers: run on the scratch for any count, each level's adds were loads and stores of
    // the sums just made, plus the loop's control for runs of two to eight (~3 % of the samples
    // of a SmolLM2 batch-1 step's tiles, BENCHMARKS §20.2).
    match count {
        8 => trees_in_registers::<8>(&mut sums[..live]),
        12 => trees_in_registers::<12>(&mut sums[..live]),
        16 => trees_in_registers::<16>(&mut sums[..live]),
        24 => trees_in_registers::<24>(&mut sums[..live]),
        _ => trees_in_place(&mut sums[..live], count, |a, b| _mm512_add_ps(a, b)),
    }
    for i in 0..rows {
        for j in 0..NB {
            let v = sums[(i * NB + j) * count];
            let col = (nb0 + j) * 16;
            let valid = 16.min(n - col);
            let mask: __mmask16 = if valid == 16 { 0xffff } else { (1u16 << valid) - 1 };
            _mm512_mask_storeu_ps(out.add((i0 + i) * n + col), mask, v);
        }
    }
}

/// [`trees_in_place`] over each `COUNT`-long slice of `sums`, one slice at a time copied into
/// registers (the count a constant, so the tree unrolls): the same adds in the same order, each
/// slice's total left in its first element.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn trees_in_registers<const COUNT: usize>(sums: &mut [std::arch::x86_64::__m512]) {
    use std::arch::x86_64::_mm512_add_ps;
    for tree in sums.chunks_exact_mut(COUNT) {
        let mut v: [std::arch::x86_64::__m512; COUNT] = tree.try_into().expect("a whole tree");
        trees_in_place(&mut v, COUNT, |a, b| _mm512_add_ps(a, b));
        tree[0] = v[0];
    }
}

/// `x` prepared for a group of linears that read it (the same `x`, `m` and segment range), once
/// per format, at the first weight that needs it: q/k/v (and gate/up) of one format share one
/// quantization or packing of x.
struct GroupX<'x> {
    x: &'x [f32],
    m: usize,
    k: usize,
    segs: SegmentRange,
    /// 16-output panels of the whole group: a native linear sizes its tasks for the pass (k and v
    /// alone are a handful of panels, which alone would be cut one panel per task).
    panels: usize,
    padded: std::cell::OnceCell<linear::PaddedX<'x>>,
    quant: std::cell::OnceCell<qdot::PreparedX>,
    pairs: std::cell::OnceCell<dpbf16::PreparedX>,
    tiles: std::cell::OnceCell<amx::PreparedX>,
}

impl<'x> GroupX<'x> {
    fn new(x: &'x [f32], m: usize, k: usize, segs: SegmentRange, panels: usize) -> Self {
        GroupX {
            x,
            m,
            k,
            segs,
            panels,
            padded: Default::default(),
            quant: Default::default(),
            pairs: Default::default(),
            tiles: Default::default(),
        }
    }
}

/// One linear of a group, prepared: its tasks, each owning a disjoint block of its output.
enum LinearJob<'a> {
    Invariant(linear::Job<'a>),
    Blocks(qdot::Job<'a>),
    Pairs(dpbf16::Job<'a>),
    Tiles(amx::Job<'a>),
}

impl LinearJob<'_> {
    fn tasks(&self) -> usize {
        match self {
            LinearJob::Invariant(j) => j.tasks(),
            LinearJob::Blocks(j) => j.tasks(),
            LinearJob::Pairs(j) => j.tasks(),
            LinearJob::Tiles(j) => j.tasks(),
        }
    }
    fn run(&self, t: usize) {
        match self {
            LinearJob::Invariant(j) => j.run(t),
            LinearJob::Blocks(j) => j.run(t),
            LinearJob::Pairs(j) => j.run(t),
            LinearJob::Tiles(j) => j.run(t),
        }
    }
}

/// A raw pointer that tiles of one output may share across threads: every tile writes a disjoint
/// set of elements, which is what makes this sound.
pub(crate) struct SharedOut<T = f32>(pub *mut T);
impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedOut<T> {}
// SAFETY: the pointer is only written through, at elements no other thread writes (see above),
// and the output it points into outlives the scoped threads that hold it.
unsafe impl<T: Send> Send for SharedOut<T> {}
// SAFETY: as for `Send`: shared references only ever write disjoint elements.
unsafe impl<T: Send> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The `len` elements from `start`.
    ///
    /// # Safety
    /// They lie inside the output, and no other task reads or writes them while the slice lives.
    pub(crate) unsafe fn slice<'a>(self, start: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

impl CpuBackend {
    pub fn new(cfg: CpuConfig) -> Result<Self, KernelError> {
        let native = if cfg.mode == KernelMode::Native { Some(native_exec()?) } else { None };
        Self::with_exec(cfg, native)
    }

    /// Native numerics on the bit-exact software model of the tile unit (`amx::SoftTiles`)
    /// instead of the CPU's: the same packing, configuration and instruction order, so it checks
    /// the tile program on machines without AMX (slowly). `cfg.mode` is taken as native.
    pub fn with_amx_model(cfg: CpuConfig) -> Result<Self, KernelError> {
        Self::with_native(cfg, NativeExec::Amx(amx::AmxExec::Model))
    }

    /// Native numerics in a given class and executor (`cfg.mode` is taken as native). A hardware
    /// executor the CPU lacks is an error.
    pub fn with_native(cfg: CpuConfig, exec: NativeExec) -> Result<Self, KernelError> {
        match exec {
            NativeExec::Amx(amx::AmxExec::Hardware) => amx::amx_available()?,
            NativeExec::Avx512Bf16(dpbf16::Dpbf16Exec::Hardware) if !dpbf16::avx512bf16_available() => {
                return Err(KernelError::NativeUnavailable("this CPU has no AVX512-BF16".into()))
            }
            _ => {}
        }
        Self::with_exec(CpuConfig { mode: KernelMode::Native, ..cfg }, Some(exec))
    }

    fn with_exec(cfg: CpuConfig, native: Option<NativeExec>) -> Result<Self, KernelError> {
        cfg.numerics.validate()?;
        let isa = cfg.isa.unwrap_or_else(Isa::best);
        if !isa.is_available() {
            return Err(KernelError::IsaUnavailable(isa));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("lockstep-cpu-{i}"))
            .build()
            .expect("thread pool");
        let team = team::Team::new(cfg.threads.max(1), "lockstep-team");
        let qdot = qdot::QdotExec::best();
        let pool = std::sync::Arc::new(pool);
        let step = if cfg.threads > 1 && cfg.mode != KernelMode::Fast {
            let step = rayon::ThreadPoolBuilder::new().num_threads(1).thread_name(|_| "lockstep-step".into());
            std::sync::Arc::new(step.build().expect("thread pool"))
        } else {
            pool.clone()
        };
        Ok(CpuBackend { cfg, isa, pool, step, team, native, qdot, arena: Default::default() })
    }

    /// The same backend with native mode's block-weight rule run by `exec` (tests run the
    /// model on any CPU). The hardware where the CPU lacks AVX512-VNNI is an error.
    pub fn with_qdot_exec(mut self, exec: qdot::QdotExec) -> Result<Self, KernelError> {
        if exec == qdot::QdotExec::Hardware && !qdot::vnni_available() {
            return Err(KernelError::NativeUnavailable("this CPU has no AVX512-VNNI".into()));
        }
        self.qdot = exec;
        Ok(self)
    }
    /// Who runs native mode's rule for block weights.
    pub fn qdot_exec(&self) -> qdot::QdotExec {
        self.qdot
    }
    pub fn isa(&self) -> Isa {
        self.isa
    }
    /// The backend's name in the determinism fingerprint. ISA and thread count are absent on
    /// purpose (they cannot change a bit). The invariant CPU kernels and the CUDA backend's
    /// portable mode share the name `portable`: they promise the same bits, so the same
    /// fingerprint. Fast mode gets its own name, since it promises nothing. Native mode promises
    /// its own bits within its class, the one this CPU would run ([`native_exec`]):
    /// `native-amx` or `native-avx512bf16` (`native-unavailable` where it has neither: such a
    /// backend cannot start).
    pub fn fingerprint_name_for(mode: KernelMode) -> &'static str {
        match mode {
            KernelMode::Invariant => "portable",
            KernelMode::Fast => "cpu-fast",
            KernelMode::Native => native_exec().map_or("native-unavailable", NativeExec::fingerprint_name),
        }
    }
    /// The native class and executor (`None` outside native mode).
    pub fn native(&self) -> Option<NativeExec> {
        self.native
    }
    pub fn threads(&self) -> usize {
        self.cfg.threads.max(1)
    }
    pub fn config(&self) -> &CpuConfig {
        &self.cfg
    }
    pub(crate) fn pool(&self) -> &rayon::ThreadPool {
        &self.pool
    }
    /// `len` zeroed words for a packing made for `purpose`, on 2 MiB pages where Linux allows
    /// them.
    pub(crate) fn packed_words(&self, len: usize, purpose: PackFor) -> pack_arena::PackedWords {
        match purpose {
            PackFor::Keeping => self.arena.alloc(len),
            PackFor::OneCall => pack_arena::PackedWords::standalone(len),
        }
    }
    /// Panels per task for a weight of `panels` panels, from a tile's `widest` down to `narrowest`
    /// (halving): narrower where a small weight would leave threads idle (q/k/v at decode), at
    /// least four tasks per thread when it can. The tile shape never changes a bit.
    pub(crate) fn panels_per_task(&self, panels: usize, widest: usize, narrowest: usize) -> usize {
        let mut nb = widest;
        while nb > narrowest && panels.div_ceil(nb) < 4 * self.threads() {
            nb /= 2;
        }
        nb
    }

    /// Runs `task(0..tasks)` as one pass of the backend's team (this thread and the helpers), in
    /// order on this thread where there is one task or thread. Tasks own disjoint outputs, so
    /// where they run changes no bit. Public for the benches, which price a pass.
    pub fn run_tasks(&self, tasks: usize, task: impl Fn(usize) + Sync) {
        self.team.run(tasks, &task)
    }

    /// Runs `task(i, chunk)` over `out` cut into chunks of `len` elements (the last may be
    /// shorter), one task per chunk, as [`Self::run_tasks`].
    pub(crate) fn run_chunks<T: Send>(&self, out: &mut [T], len: usize, task: impl Fn(usize, &mut [T]) + Sync) {
        assert!(len > 0 || out.is_empty(), "chunks of no elements");
        let total = out.len();
        let dst = SharedOut(out.as_mut_ptr());
        self.run_tasks(total.div_ceil(len.max(1)), |i| {
            let start = i * len;
            // SAFETY: chunk `i` lies inside `out`, and each chunk belongs to one task.
            task(i, unsafe { dst.slice(start, len.min(total - start)) })
        });
    }

    /// Row-parallel partial on slices: `x` is `[m, segs.real_range().len()]`, `w` `[n, same]`.
    pub fn linear_partial_into(&self, x: &[f32], m: usize, w: WeightView<'_>, segs: SegmentRange, y: &mut [f32]) {
        assert_linear_shapes(x, m, w, segs, y);
        match (self.cfg.mode, self.native) {
            (KernelMode::Native, Some(NativeExec::Amx(exec))) if amx::takes(w.dtype) => {
                amx::linear_native(self, exec, x, m, w, segs, None, y)
            }
            // A bare view has no cache for its packed panels: pack for this call.
            (KernelMode::Native, Some(NativeExec::Avx512Bf16(exec))) if amx::takes(w.dtype) => {
                dpbf16::linear_native(self, exec, x, m, &dpbf16::PairPanels::pack(self, w, PackFor::OneCall), segs, y)
            }
            (KernelMode::Native, Some(_)) if qdot::takes(w.dtype) => {
                let packed =
                    (self.qdot == qdot::QdotExec::Hardware).then(|| qdot::QPanels::pack(self, w, PackFor::OneCall));
                qdot::linear_native(self, self.qdot, x, m, w, packed.as_ref(), segs, y)
            }
            (KernelMode::Fast, _) => crate::fast::linear_fast(self, x, m, w, y),
            _ => linear::linear_invariant(self, x, m, w, segs, y),
        }
    }

    /// [`Self::linear_partial_into`] for a held weight: a native class packs it once, at its first
    /// call, keeps the packing with the weight (`HostWeight::native_packed`) and drops the
    /// file map's resident pages of the original, which the linears no longer read.
    pub fn linear_weight_partial_into(&self, x: &[f32], m: usize, w: &HostWeight, segs: SegmentRange, y: &mut [f32]) {
        self.linear_group_partial_into(x, m, segs, &mut [(w, y)]);
    }

    /// [`Self::linear_weight_partial_into`] for several weights that read the same `x` (q/k/v,
    /// gate/up), in ONE pass over the team: every weight's tasks are enumerated together, each
    /// still owning a disjoint block of its own output, and `x` is quantized or packed once per
    /// format the group needs. Where a task runs never changes a bit, so each output has the bits
    /// of its own call. Every weight has the columns of `segs`.
    pub fn linear_group_partial_into(
        &self,
        x: &[f32],
        m: usize,
        segs: SegmentRange,
        group: &mut [(&HostWeight, &mut [f32])],
    ) {
        let Some(k) = group.first().map(|(w, _)| w.cols) else { return };
        let panels = group.iter().map(|(w, _)| w.rows.div_ceil(qdot::PANEL_ROWS)).sum();
        let gx = GroupX::new(x, m, k, segs, panels);
        let mut jobs = Vec::with_capacity(group.len());
        for (w, y) in group.iter_mut() {
            assert_linear_shapes(x, m, w.view(), segs, y);
            jobs.extend(self.prepare_linear(&gx, w, y));
        }
        let total = jobs.iter().map(LinearJob::tasks).sum();
        self.run_tasks(total, |mut t| {
            for job in &jobs {
                if t < job.tasks() {
                    return job.run(t);
                }
                t -= job.tasks();
            }
        });
    }

    /// `w`'s linear on `gx`, prepared to run as tasks; `None` where it ran here already (fast
    /// mode, empty shapes, a weight packed for another layout).
    fn prepare_linear<'a>(&self, gx: &'a GroupX<'_>, w: &'a HostWeight, y: &mut [f32]) -> Option<LinearJob<'a>> {
        let (x, m, segs) = (gx.x, gx.m, gx.segs);
        debug_assert_eq!(gx.k, w.cols);
        if m == 0 || w.rows == 0 {
            return None;
        }
        // Block weights pack only for the hardware executor; the model reads them as stored.
        let blocks = qdot::takes(w.dtype) && self.qdot == qdot::QdotExec::Hardware;
        let native = match (self.cfg.mode, self.native) {
            (KernelMode::Native, Some(exec)) if blocks || amx::takes(w.dtype) => exec,
            (KernelMode::Native, Some(_)) if qdot::takes(w.dtype) => {
                let xq = gx.quant.get_or_init(|| qdot::PreparedX::new(self, x, m, gx.k, segs));
                return Some(LinearJob::Blocks(qdot::Job::new(self, self.qdot, xq, w.view(), None, gx.panels, y)));
            }
            (KernelMode::Fast, _) => {
                crate::fast::linear_fast(self, x, m, w.view(), y);
                return None;
            }
            _ => {
                let px = gx.padded.get_or_init(|| linear::PaddedX::new(self, x, m, gx.k, segs));
                return Some(LinearJob::Invariant(linear::Job::new(self, px, w.view(), segs, y)));
            }
        };
        let packed = w.native_packed.get_or_init(|| {
            let packed = match native {
                _ if blocks => NativePacked::Blocks(qdot::QPanels::pack(self, w.view(), PackFor::Keeping)),
                NativeExec::Avx512Bf16(_) => {
                    NativePacked::Panels(dpbf16::PairPanels::pack(self, w.view(), PackFor::Keeping))
                }
                NativeExec::Amx(_) => NativePacked::Tiles(amx::PackedB::pack(self, w.view(), segs, PackFor::Keeping)),
            };
            w.bytes.release_resident();
            packed
        });
        Some(match (native, packed) {
            (_, NativePacked::Blocks(p)) => {
                let xq = gx.quant.get_or_init(|| qdot::PreparedX::new(self, x, m, gx.k, segs));
                LinearJob::Blocks(qdot::Job::new(self, self.qdot, xq, w.view(), Some(p), gx.panels, y))
            }
            (NativeExec::Avx512Bf16(e), NativePacked::Panels(p)) => {
                let xp = gx.pairs.get_or_init(|| dpbf16::PreparedX::new(self, x, m, gx.k, segs));
                LinearJob::Pairs(dpbf16::Job::new(self, e, xp, p, gx.panels, y))
            }
            (NativeExec::Amx(e), NativePacked::Tiles(t)) if t.fits(w.view(), segs) => {
                let xa = gx.tiles.get_or_init(|| amx::PreparedX::new(self, x, m, gx.k, segs));
                LinearJob::Tiles(amx::Job::new(e, xa, w.view(), Some(t), y))
            }
            // A weight packed for another layout (tests reuse weights across segmentations):
            // the view path packs for this call.
            _ => {
                self.linear_partial_into(x, m, w.view(), segs, y);
                return None;
            }
        })
    }

    /// `y = x · Wᵀ (+ bias)` on slices.
    pub fn linear_into(&self, x: &[f32], m: usize, w: WeightView<'_>, bias: Option<WeightView<'_>>, y: &mut [f32]) {
        let segs = Segmentation::new(w.cols, self.cfg.numerics.reduce_segments).expect("validated").full();
        self.linear_partial_into(x, m, w, segs, y);
        if let Some(b) = bias {
            ops::add_bias(y, b);
        }
    }

    pub fn rms_norm_into(&self, x: &[f32], w: WeightView<'_>, eps: f32, out: &mut [f32]) {
        ops::rms_norm(self, x, w, eps, out)
    }

    pub fn swiglu_into(&self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        ops::swiglu(self, gate, up, out)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn attention_into(
        &self,
        q: &[f32],
        seqs: &[AttnSeq<'_>],
        k_cache: &[f32],
        v_cache: &[f32],
        layout: &KvLayout,
        p: AttnParams,
        out: &mut [f32],
    ) {
        ops::attention(self, q, seqs, k_cache, v_cache, layout, p, out)
    }

    pub fn sample_shard_slice(
        &self,
        logits: &[f32],
        shard: VocabShard,
        requests: &[SampleRequest],
    ) -> Vec<ShardSample> {
        assert_eq!(logits.len(), requests.len() * shard.rows);
        let row = |i: usize| &logits[i * shard.rows..(i + 1) * shard.rows];
        // Fewer rows than threads (batch-1 decode): one row at a time, each spreading its vocab
        // segments over the team. Otherwise a task per row (a row's segments then run inline).
        if requests.len() < self.threads() {
            return requests.iter().enumerate().map(|(i, req)| ops::shard_sample(self, row(i), &shard, req)).collect();
        }
        let mut samples: Vec<Option<ShardSample>> = requests.iter().map(|_| None).collect();
        self.run_chunks(&mut samples, 1, |i, sample| {
            sample[0] = Some(ops::shard_sample(self, row(i), &shard, &requests[i]));
        });
        samples.into_iter().map(|s| s.expect("every request sampled")).collect()
    }
}

/// One layer's paged K and V in host memory.
pub struct CpuKvCache {
    pub layout: KvLayout,
    pub k: KvFloats,
    pub v: KvFloats,
}

/// The floats of one half (K or V) of a layer's paged cache, zeroed, on 2 MiB pages from the
/// first slot on where Linux grants them. A decode step's attention reads every layer's keys
/// from DRAM (the weights' stream evicts them), one KV head's slice of each slot, a new 4 KiB
/// page every five slots at SmolLM2's shape: on 2 MiB pages its cold-decode bench rows cost
/// ~20 % less (BENCHMARKS §19.2). A `Vec` from the allocator starts a page past a mapping's
/// start, so a cache's first slots, which a scheduler hands out first, stayed on 4 KiB pages.
pub struct KvFloats(pack_arena::PackedWords);

impl KvFloats {
    /// `len` zeroed floats.
    pub fn zeros(len: usize) -> KvFloats {
        KvFloats(pack_arena::PackedWords::on_huge_pages(len))
    }
}

impl From<Vec<f32>> for KvFloats {
    fn from(values: Vec<f32>) -> KvFloats {
        let mut floats = KvFloats::zeros(values.len());
        floats.copy_from_slice(&values);
        floats
    }
}

impl std::ops::Deref for KvFloats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: the words are u32s, aligned for f32 and of its size, and every bit pattern is
        // an f32; the borrow of the words bounds the slice's.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const f32, self.0.len()) }
    }
}

impl std::ops::DerefMut for KvFloats {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as for `deref`; `&mut self` makes this the words' only reference.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut f32, self.0.len()) }
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Weight = HostWeight;
    type KvCache = CpuKvCache;

    fn fingerprint_name(&self) -> String {
        Self::fingerprint_name_for(self.cfg.mode).to_string()
    }
    fn numerics(&self) -> NumericsConfig {
        self.cfg.numerics
    }
    fn mode(&self) -> KernelMode {
        self.cfg.mode
    }
    /// A pool at every thread count, one included (which one: the `step` field): a one-thread
    /// backend (each rank of a TP group sharing a host's cores) left outside its pool handed
    /// every norm, attention and sampling call of a step to the pool's one worker and back (~75
    /// hand-offs per decode step, BENCHMARKS §11), where a step entered once on the worker runs
    /// them all inline.
    fn step_pool(&self) -> Option<std::sync::Arc<rayon::ThreadPool>> {
        Some(self.step.clone())
    }
    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }
    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn prepare_weight(&self, w: HostWeight) -> HostWeight {
        // Matrices are read as stored (fast mode widens tiles per call, see `fast`; native mode
        // packs at the first call). A vector (a norm weight, a bias) is read whole by every call
        // that uses it: read in place from the file map, each RMSNorm waited on a TLB miss of a
        // 4 KiB page (the f32 norm weights were ~1 % of a SmolLM2 batch-1 step), and a bf16 one
        // was widened into a fresh `Vec` per call. So a vector is widened once, exactly, into the
        // arena: the model's vectors lie back to back in load order on 2 MiB pages.
        if w.rows != 1 || w.dtype.is_quantized() {
            return w;
        }
        let mut words = self.arena.alloc(w.cols);
        let mut wide = Vec::with_capacity(w.cols);
        w.view().widen_rows_into(0..1, &mut wide);
        for (word, value) in words.iter_mut().zip(wide) {
            *word = value.to_bits();
        }
        let len = 4 * words.len();
        HostWeight::new(DType::F32, SharedBytes::new(std::sync::Arc::new(words), 0..len), 1, w.cols)
            .expect("the arena holds exactly the vector's f32 bytes")
    }
    fn alloc_kv(&self, layout: KvLayout) -> CpuKvCache {
        CpuKvCache { layout, k: KvFloats::zeros(layout.floats()), v: KvFloats::zeros(layout.floats()) }
    }
    fn linear(&self, x: &Vec<f32>, m: usize, w: &HostWeight, bias: Option<&HostWeight>, y: &mut Vec<f32>) {
        self.linear_group(x, m, &mut [GroupLinear { weight: w, bias, out: y }]);
    }
    fn linear_group(&self, x: &Vec<f32>, m: usize, group: &mut [GroupLinear<'_, HostWeight, Vec<f32>>]) {
        let Some(k) = group.first().map(|g| g.weight.cols) else { return };
        assert!(group.iter().all(|g| g.weight.cols == k), "a group's weights read the same x");
        let segs = Segmentation::new(k, self.cfg.numerics.reduce_segments).expect("validated").full();
        let mut outs: Vec<(&HostWeight, &mut [f32])> =
            group.iter_mut().map(|g| (g.weight, g.out.as_mut_slice())).collect();
        self.linear_group_partial_into(x, m, segs, &mut outs);
        for g in group.iter_mut() {
            if let Some(b) = g.bias {
                ops::add_bias(g.out, b.view());
            }
        }
    }
    fn linear_partial(&self, x: &Vec<f32>, m: usize, w: &HostWeight, segs: SegmentRange, y: &mut Vec<f32>) {
        self.linear_weight_partial_into(x, m, w, segs, y)
    }
    fn tree_combine(&self, partials: &[&Vec<f32>], y: &mut Vec<f32>) {
        let parts: Vec<&[f32]> = partials.iter().map(|p| p.as_slice()).collect();
        ops::tree_combine(&parts, y)
    }
    fn add_bias(&self, y: &mut Vec<f32>, bias: &HostWeight) {
        ops::add_bias(y, bias.view())
    }
    fn embedding(&self, ids: &[u32], table: &HostWeight, out: &mut Vec<f32>) {
        let t = table.view();
        assert_eq!(out.len(), ids.len() * t.cols);
        let mut wide = Vec::with_capacity(t.cols);
        for (row, &id) in out.chunks_exact_mut(t.cols).zip(ids) {
            wide.clear();
            t.widen_rows_into(id as usize..id as usize + 1, &mut wide);
            row.copy_from_slice(&wide);
        }
    }
    fn rms_norm(&self, x: &Vec<f32>, weight: &HostWeight, eps: f32, out: &mut Vec<f32>) {
        self.rms_norm_into(x, weight.view(), eps, out)
    }
    fn rope(&self, x: &mut Vec<f32>, n_heads: usize, positions: &[u32], tables: &RopeTables) {
        reference::rope(x, n_heads, positions, tables)
    }
    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>, out: &mut Vec<f32>) {
        self.swiglu_into(gate, up, out)
    }
    fn add_assign(&self, y: &mut Vec<f32>, x: &Vec<f32>) {
        assert_eq!(y.len(), x.len());
        for (a, b) in y.iter_mut().zip(x) {
            *a += b;
        }
    }
    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], out: &mut Vec<f32>) {
        assert_eq!(out.len(), rows.len() * width);
        for (o, &r) in out.chunks_exact_mut(width).zip(rows) {
            o.copy_from_slice(&x[r as usize * width..(r as usize + 1) * width]);
        }
    }
    fn write_kv(&self, cache: &mut CpuKvCache, k: &Vec<f32>, v: &Vec<f32>, slots: &[u32]) {
        let w = cache.layout.row_width();
        assert!(k.len() == slots.len() * w && v.len() == k.len());
        for (i, &s) in slots.iter().enumerate() {
            let s = s as usize;
            cache.k[s * w..(s + 1) * w].copy_from_slice(&k[i * w..(i + 1) * w]);
            cache.v[s * w..(s + 1) * w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
    }
    fn attention(
        &self,
        q: &Vec<f32>,
        seqs: &[AttnSeq<'_>],
        cache: &CpuKvCache,
        params: AttnParams,
        out: &mut Vec<f32>,
    ) {
        self.attention_into(q, seqs, &cache.k, &cache.v, &cache.layout, params, out)
    }
    fn sample_shard(&self, logits: &Vec<f32>, shard: VocabShard, requests: &[SampleRequest]) -> Vec<ShardSample> {
        self.sample_shard_slice(logits, shard, requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tile's interleaved trees are the contract's tree, slice by slice, bit for bit (sums
    /// whose order shows: wide exponents and cancellation).
    #[test]
    fn trees_in_place_equal_the_reference_tree_for_every_count() {
        let mut rng = crate::splitmix::SplitMix64::new(7);
        for count in 1..=40 {
            for slices in [1, 3, 16] {
                let values: Vec<f32> = (0..slices * count)
                    .map(|_| ((rng.unit_f64() - 0.5) * 2f64.powi((rng.unit_f64() * 40.0) as i32 - 20)) as f32)
                    .collect();
                let mut got = values.clone();
                trees_in_place(&mut got, count, |a, b| a + b);
                for (t, tree) in values.chunks_exact(count).enumerate() {
                    let want = reference::tree_reduce(&mut tree.to_vec(), |a, b| a + b);
                    assert_eq!(got[t * count].to_bits(), want.to_bits(), "count {count}, slice {t}");
                }
            }
        }
    }

    /// A native tile's stored outputs are each output's segment tree of the contract, bit for
    /// bit, for every segment count: the counts with a tree in registers and the others.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_outputs_are_the_reference_tree_of_their_segment_sums_for_every_count() {
        use std::arch::x86_64::__m512;
        if !Isa::Avx512.is_available() {
            eprintln!("SKIPPED tile_outputs_are_the_reference_tree_of_their_segment_sums_for_every_count: no AVX-512");
            return;
        }
        const MR: usize = 2;
        const NB: usize = 3;
        let mut rng = crate::splitmix::SplitMix64::new(5);
        let n = NB * 16 - 5; // the last panel is masked
        for count in 1..=40 {
            let values: Vec<f32> = (0..MR * NB * count * 16)
                .map(|_| ((rng.unit_f64() - 0.5) * 2f64.powi((rng.unit_f64() * 40.0) as i32 - 20)) as f32)
                .collect();
            // SAFETY: any 16 floats are a valid `__m512`.
            let mut sums: Vec<__m512> = values
                .chunks_exact(16)
                .map(|v| unsafe { std::mem::transmute::<[f32; 16], __m512>(v.try_into().unwrap()) })
                .collect();
            let mut out = vec![f32::NAN; MR * n];
            // SAFETY: AVX-512 checked above; the tile's rows and panels lie inside `out`.
            unsafe { store_tile_outputs::<MR, NB>(&mut sums, count, out.as_mut_ptr(), n, 0, 0, MR) };
            for i in 0..MR {
                for c in 0..n {
                    let (j, lane) = (c / 16, c % 16);
                    let mut seg: Vec<f32> =
                        (0..count).map(|s| values[(((i * NB + j) * count + s) * 16) + lane]).collect();
                    let want = reference::tree_reduce(&mut seg, |a, b| a + b);
                    assert_eq!(out[i * n + c].to_bits(), want.to_bits(), "count {count}, row {i}, column {c}");
                }
            }
        }
    }

    /// A vector the backend prepared (a norm weight, a bias) is its exact f32 values, in the arena
    /// right after the vector prepared before it (what an RMSNorm's prefetch of the next norm
    /// relies on), and RMSNorm and the bias add give the bits they give on the weight as loaded;
    /// matrices and block-type vectors stay as loaded.
    #[test]
    fn prepared_vectors_are_exact_f32_back_to_back_and_keep_norm_and_bias_bits() {
        let be = CpuBackend::new(CpuConfig { threads: 2, ..CpuConfig::default() }).unwrap();
        let mut rng = crate::splitmix::SplitMix64::new(11);
        let n = 576;
        let x: Vec<f32> = (0..3 * n).map(|_| (rng.unit_f64() as f32 - 0.5) * 8.0).collect();
        let mut last_end: Option<usize> = None;
        for dtype in [DType::F32, DType::Bf16, DType::F16] {
            let values: Vec<f32> = (0..n).map(|_| (rng.unit_f64() as f32 - 0.5) * 3.0).collect();
            let loaded = HostWeight::from_f32(&values, dtype, 1, n);
            let prepared = be.prepare_weight(loaded.clone());
            assert_eq!((prepared.dtype, prepared.rows, prepared.cols), (DType::F32, 1, n));
            let wide = prepared.view().as_f32().expect("an aligned f32 vector");
            assert!(wide.iter().zip(loaded.view().to_f32()).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype:?}");
            let start = wide.as_ptr() as usize;
            #[cfg(target_os = "linux")]
            if let Some(end) = last_end {
                assert_eq!(start, end.next_multiple_of(pack_arena::PACKING_ALIGN), "{dtype:?} follows the last vector");
            }
            last_end = Some(start + 4 * n);
            let (mut want, mut got) = (vec![0.0; x.len()], vec![0.0; x.len()]);
            be.rms_norm(&x, &loaded, 1e-5, &mut want);
            be.rms_norm(&x, &prepared, 1e-5, &mut got);
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype:?} norm");
            let (mut want, mut got) = (x.clone(), x.clone());
            reference::add_bias(&mut want, loaded.view());
            be.add_bias(&mut got, &prepared);
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{dtype:?} bias");
        }
        let matrix = HostWeight::from_f32(&x, DType::Bf16, 3, n);
        // Q8_0 blocks of scale 0x3c00 (1.0) and arbitrary quants.
        let block: Vec<u8> = (0..n / 32).flat_map(|b| [[0x00, 0x3c].as_slice(), &[b as u8; 32]].concat()).collect();
        let block = HostWeight::new(DType::Q8_0, SharedBytes::from_vec(block), 1, n).unwrap();
        for kept in [matrix, block] {
            let prepared = be.prepare_weight(kept.clone());
            assert_eq!(prepared.dtype, kept.dtype);
            assert_eq!(prepared.bytes.as_slice().as_ptr(), kept.bytes.as_slice().as_ptr(), "used as loaded");
        }
    }

    /// A backend with helpers runs its steps on one worker of their own (the shared pool's workers
    /// then sleep through a decode), except in fast mode, whose `gemm` inside a step runs on the
    /// shared pool without a hand-off.
    #[test]
    fn a_backend_with_helpers_steps_on_a_one_worker_pool_of_its_own_except_in_fast_mode() {
        let be = CpuBackend::new(CpuConfig { threads: 2, ..CpuConfig::default() }).unwrap();
        let step = be.step_pool().expect("a step pool");
        assert_eq!(step.current_num_threads(), 1);
        step.install(|| assert_eq!(std::thread::current().name(), Some("lockstep-step")));
        let fast = CpuBackend::new(CpuConfig { threads: 2, mode: KernelMode::Fast, ..CpuConfig::default() }).unwrap();
        let step = fast.step_pool().expect("a step pool");
        step.install(|| {
            let step_thread = std::thread::current().id();
            fast.pool().install(|| assert_eq!(std::thread::current().id(), step_thread));
        });
    }

    /// A one-thread backend (a TP rank on a shared host) runs a step on its pool's worker, and the
    /// kernels' own `install`s inside the step stay on that thread instead of handing off.
    #[test]
    fn a_one_thread_backend_runs_its_steps_on_its_pool_without_hand_offs() {
        let be = CpuBackend::new(CpuConfig { threads: 1, ..CpuConfig::default() }).unwrap();
        let pool = be.step_pool().expect("a one-thread backend has a step pool");
        pool.install(|| {
            let step_thread = std::thread::current();
            assert_eq!(step_thread.name(), Some("lockstep-cpu-0"));
            be.pool().install(|| assert_eq!(std::thread::current().id(), step_thread.id()));
        });
    }
}
