//! CPU native numerics (`KernelMode::Native`, fingerprint name `native-amx`): bf16 and f16 linears
//! on Intel AMX tiles (`TDPBF16PS`), batch-, thread- and TP-invariant within the AMX class.
//!
//! # The numerics (docs/DESIGN.md §2.2, "CPU native (AMX)")
//!
//! * Activations are rounded to bf16 (round to nearest even): that is what the tile unit
//!   multiplies. bf16 weights are used as stored; an f16 weight `v` is split exactly into two bf16
//!   planes `hi = bf16(v)`, `lo = bf16(v − hi)` (`hi + lo = v`: an f16 significand has 11 bits).
//! * The contract's segments are kept (`seg_len`, `S`, the segment tree — so TP shards holding
//!   whole segments finish the same tree). Each segment is walked in K tiles of 32 bf16 (16 pairs)
//!   from its start, the last one zero-padded. Per segment the accumulator tile starts at +0 and
//!   takes one `TDPBF16PS` per K tile in increasing order (f16: the `hi` plane, then the `lo`
//!   plane of the same K tile). The segment sums meet in the contract's segment tree.
//! * A row of x is one row of the A tile and a tile row's result depends on that row only (the
//!   instruction's definition), so M, the other rows, the thread count and the TP degree cannot
//!   change a bit. Tile shapes are fixed: 16 rows × 64 bytes for every tile, every call.
//!
//! # One tile program, two executors
//!
//! The packing (`pack_a`, `pack_b`), the tile configuration ([`TileConfig`]) and the
//! instruction sequence (`tile_program`) are written once, over `TileUnit`. `HardTiles`
//! issues the instructions with `asm!`; `SoftTiles` is a bit-exact software model of them
//! (Intel SDM pseudo-code of `TDPBF16PS`: per pair an f32 fma with DAZ and FTZ, round to nearest
//! even, even and odd products in separate accumulators, then `dest + (even + odd)`). The model
//! runs everywhere, so the tests check the packing, the configuration bytes and the order on any
//! machine; the `asm!` path runs only where the CPU has AMX.
//!
//! # Permission and detection
//!
//! Linux keeps AMX tile data off until a process asks: `arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)` must succeed before the first tile instruction, or it faults with SIGILL
//! (the usual cause of "AMX crashes on this VM"). [`amx_available`] asks once per process and
//! reads the permission back, after CPUID said AMX-BF16 and AMX-TILE are there.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use super::{CpuBackend, SharedOut};
use crate::{DType, KernelError, SegmentRange, WeightView};

/// bf16 elements of one K tile: 16 pairs, one 64-byte tile row of A.
pub const K_TILE: usize = 32;
/// Rows of every tile: 16 rows of x (A, C) and 16 pairs of K (B).
pub const TILE_ROWS: usize = 16;
/// Output columns of one tile (f32 elements of a 64-byte C row; weight rows per B tile).
pub const TILE_COLS: usize = 16;
/// Bytes of one tile row, for every tile of the program.
const TILE_ROW_BYTES: usize = 64;
/// Dwords (bf16 pairs) of one tile.
const TILE_WORDS: usize = TILE_ROWS * TILE_COLS;

/// Whether native numerics run this weight type on tiles; the others take the portable kernels.
pub fn takes(dtype: DType) -> bool {
    matches!(dtype, DType::Bf16 | DType::F16)
}

/// bf16 planes a weight type is multiplied as (f16: `hi`, `lo`).
pub(super) fn planes(dtype: DType) -> usize {
    match dtype {
        DType::F16 => 2,
        _ => 1,
    }
}

/// Which executor runs the tile program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmxExec {
    /// The CPU's tile unit (`asm!`); needs [`amx_available`].
    Hardware,
    /// The bit-exact software model (`SoftTiles`): slow, runs anywhere.
    Model,
}

// ---------------------------------------------------------------- detection and permission

/// Whether this process may run tile instructions: CPUID reports AMX-BF16 and AMX-TILE and Linux
/// granted tile-data permission. Asked once per process; the error says what is missing.
pub fn amx_available() -> Result<(), KernelError> {
    static STATUS: OnceLock<Result<(), String>> = OnceLock::new();
    STATUS.get_or_init(probe).clone().map_err(KernelError::AmxUnavailable)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn probe() -> Result<(), String> {
    let (bf16, tile) = cpu_amx_flags();
    match (bf16, tile) {
        (true, true) => {}
        (false, false) => return Err("this CPU has none".into()),
        (false, true) => return Err("this CPU lacks amx-bf16".into()),
        (true, false) => return Err("this CPU lacks amx-tile".into()),
    }
    request_tile_data()
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn probe() -> Result<(), String> {
    Err("AMX is an x86-64 feature and this build drives it through Linux only".into())
}

/// CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
#[cfg(target_arch = "x86_64")]
fn cpu_amx_flags() -> (bool, bool) {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only when leaf 0 says it exists.
    #[allow(unused_unsafe)]
    let edx = unsafe {
        if __cpuid(0).eax < 7 {
            return (false, false);
        }
        __cpuid_count(7, 0).edx
    };
    (edx & (1 << 22) != 0, edx & (1 << 24) != 0)
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, then `ARCH_GET_XCOMP_PERM` to confirm.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> Result<(), String> {
    const ARCH_GET_XCOMP_PERM: libc::c_long = 0x1022;
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these codes takes an integer (REQ) or a pointer to a u64 it writes
    // (GET); `mask` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
    if rc != 0 {
        let errno = std::io::Error::last_os_error();
        return Err(format!("Linux refused tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA: {errno})"));
    }
    let mut mask: u64 = 0;
    // SAFETY: as above.
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mut mask as *mut u64) };
    if rc != 0 || mask & (1 << XFEATURE_XTILEDATA) == 0 {
        return Err(format!("Linux did not grant tile data (ARCH_GET_XCOMP_PERM: rc {rc}, mask {mask:#x})"));
    }
    Ok(())
}

// ---------------------------------------------------------------- the tile configuration

/// A tile register, `tmm0`..`tmm7`. The program keeps its accumulators (C) in `tmm0..tmm3`, the
/// rows of x (A) in `tmm4..` and the weights (B) in the registers after those ([`Block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tmm(pub u8);

/// Tile registers of palette 1.
pub const TILE_REGISTERS: usize = 8;

/// The 64-byte `LDTILECFG` operand: palette 1, `start_row` 0, and for every tile register 16 rows
/// of 64 bytes (`colsb` u16 little-endian at byte `16 + 2i`, `rows` at byte `48 + i`).
#[repr(C, align(64))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileConfig(pub [u8; 64]);

impl TileConfig {
    pub fn program() -> Self {
        let mut b = [0u8; 64];
        b[0] = 1;
        for i in 0..TILE_REGISTERS {
            b[16 + 2 * i..18 + 2 * i].copy_from_slice(&(TILE_ROW_BYTES as u16).to_le_bytes());
            b[48 + i] = TILE_ROWS as u8;
        }
        TileConfig(b)
    }
    pub fn rows(&self, t: usize) -> usize {
        self.0[48 + t] as usize
    }
    pub fn colsb(&self, t: usize) -> usize {
        u16::from_le_bytes([self.0[16 + 2 * t], self.0[17 + 2 * t]]) as usize
    }
}

// ---------------------------------------------------------------- packing (shared)

/// Where each segment's K tiles lie in a packed row: `tiles` per segment, `count` segments.
#[derive(Debug, Clone, Copy)]
struct KLayout {
    seg_len: usize,
    tiles: usize,
    count: usize,
    /// Real columns of the range (x's row length, W's row length); beyond: zeros.
    k_real: usize,
}

impl KLayout {
    fn new(segs: SegmentRange, k_real: usize) -> Self {
        let seg_len = segs.seg.seg_len;
        KLayout { seg_len, tiles: seg_len.div_ceil(K_TILE), count: segs.count, k_real }
    }
    /// bf16 elements of one packed A row.
    fn row_elems(&self) -> usize {
        self.count * self.tiles * K_TILE
    }
    /// Segment `s`'s real columns (empty once the segments pass the end of the row).
    fn segment_cols(&self, s: usize) -> Range<usize> {
        let lo = (s * self.seg_len).min(self.k_real);
        lo..((s + 1) * self.seg_len).min(self.k_real)
    }
    /// Where segment `s` starts in a packed row (bf16 elements).
    fn segment_start(&self, s: usize) -> usize {
        s * self.tiles * K_TILE
    }
}

pub(super) fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

/// Dwords from one packed A row to the next: the row's K tiles and one 64-byte line more. The
/// line keeps an A tile's 16 rows on 16 different L1 sets: at K = 896 a row is 2 KiB, and rows
/// 2 KiB apart share two sets, so a 2 × 2 block's 32 A rows evicted each other (its A tile
/// loads were most of the tile program's samples).
fn a_row_words(kl: &KLayout) -> usize {
    kl.row_elems() / 2 + TILE_ROW_BYTES / 4
}

/// x (`[m, k_real]` f32) as the A panel, in bf16 pairs (two bf16 a dword, the first in the low
/// half, as a tile row holds them): rows padded to a multiple of 16 with zero rows, each row
/// rounded to bf16 and laid out segment by segment in whole K tiles, zeros in the padding. The
/// rounding is the AVX512-BF16 class's x packing ([`super::dpbf16::pack_x_row`]: `half`'s round
/// to nearest even, NaN kept quiet, 16 lanes at a time where AVX-512 exists); rows are split among
/// the team's threads when there are many (M = 512 × K = 4864 is 2.5 M roundings). The lines are
/// the previous panel's on this thread where it had one ([`PreparedX`] gives them back), so a
/// panel (up to 5 MB at M = 512) is not cleared first: each row writes the zeros of its K tiles
/// itself. The line past a row's K tiles and the rows past M keep what they held: no tile load
/// reads the first, and a tile row's results depend on that row only, so the second's are never
/// stored.
fn pack_a(be: &CpuBackend, x: &[f32], m: usize, kl: &KLayout) -> Vec<Line> {
    let width = a_row_words(kl);
    let mut lines = SPARE_PANEL.take();
    let len = m.div_ceil(TILE_ROWS) * TILE_ROWS * width / 16;
    // Longer is kept as it is: a layer's down panel (K = 4864) follows three of K = 896, and
    // cutting the lines to each would clear 4 MB again for every down.
    if lines.len() < len {
        lines.resize(len, Line([0; 16]));
    }
    // SAFETY: a line is 16 dwords without padding; the slice covers the panel's lines.
    let a = unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u32, len * 16) };
    let row = |i: usize, dst: &mut [u32]| {
        let xr = &x[i * kl.k_real..(i + 1) * kl.k_real];
        for s in 0..kl.count {
            let cols = kl.segment_cols(s);
            // Segments start at a whole K tile in the panel and at an even column of x (`seg_len`
            // is a multiple of 16), so pairs of x are pairs of the panel.
            let (at, pairs) = (kl.segment_start(s) / 2, cols.len().div_ceil(2));
            super::dpbf16::pack_x_row(&xr[cols], &mut dst[at..at + pairs]);
            dst[at + pairs..kl.segment_start(s + 1) / 2].fill(0);
        }
    };
    if m >= TILE_ROWS && be.threads() > 1 {
        be.run_chunks(&mut a[..m * width], width, row);
    } else {
        a.chunks_exact_mut(width).take(m).enumerate().for_each(|(i, dst)| row(i, dst));
    }
    lines
}

thread_local! {
    /// The lines of the last A panel dropped on this thread, for the next [`pack_a`] to fill.
    static SPARE_PANEL: std::cell::Cell<Vec<Line>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One 64-byte line of the A panel: the panel starts on a line, so no tile row straddles two.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// The bf16 planes of one weight (f16: the exact split `hi`, `lo`).
#[inline]
pub(super) fn weight_planes(dtype: DType, row: &[u8], col: usize) -> [u16; 2] {
    match dtype {
        DType::Bf16 => [u16::from_le_bytes([row[2 * col], row[2 * col + 1]]), 0],
        DType::F16 => {
            let v = dtype.widen_at(row, col);
            let hi = bf16_bits(v);
            // Exact: v has 11 significant bits, hi its rounded top 8, so v − hi fits in bf16.
            let lo = bf16_bits(v - f32::from_bits((hi as u32) << 16));
            [hi, lo]
        }
        other => unreachable!("{other:?} never takes the tile path"),
    }
}

/// Weight rows `n0..n0 + 16` (zeros past `w.rows`) as B tiles, one per (K tile, plane) in that
/// order: tile row `r` holds, for output column `j`, the pair (`W[n0+j][2r]`, `W[n0+j][2r+1]`)
/// of the K tile as one little-endian dword — the pair-interleaved layout `TDPBF16PS` reads as
/// a 16×32 bf16 matrix. For bf16 that is a 16×16 dword transpose of the weight rows.
fn pack_b(w: WeightView<'_>, n0: usize, kl: &KLayout, out: &mut Vec<u32>) {
    let planes = planes(w.dtype);
    out.clear();
    out.resize(kl.count * kl.tiles * planes * TILE_WORDS, 0);
    let bf16_at = |row: &[u8], c: usize| u16::from_le_bytes([row[2 * c], row[2 * c + 1]]) as u32;
    for j in 0..TILE_COLS.min(w.rows.saturating_sub(n0)) {
        let row = w.row(n0 + j);
        for s in 0..kl.count {
            let cols = kl.segment_cols(s);
            for c in cols.clone().step_by(2) {
                let q = (c - cols.start) / 2;
                let kt = s * kl.tiles + q / TILE_ROWS;
                let at = |p: usize| (kt * planes + p) * TILE_WORDS + (q % TILE_ROWS) * TILE_COLS + j;
                let pair = c + 1 < cols.end;
                match w.dtype {
                    DType::Bf16 => out[at(0)] = bf16_at(row, c) | if pair { bf16_at(row, c + 1) << 16 } else { 0 },
                    _ => {
                        let [h0, l0] = weight_planes(w.dtype, row, c);
                        let [h1, l1] = if pair { weight_planes(w.dtype, row, c + 1) } else { [0, 0] };
                        out[at(0)] = h0 as u32 | (h1 as u32) << 16;
                        out[at(1)] = l0 as u32 | (l1 as u32) << 16;
                    }
                }
            }
        }
    }
}

/// Every B tile of a weight for one segmentation, packed once and kept with the weight: block
/// `n0 / 16` at `block * per_block` words, laid out as [`pack_b`] lays one block. Decode reads each
/// weight once per step, so packing per call would triple its memory traffic.
pub struct PackedB {
    words: super::pack_arena::PackedWords,
    per_block: usize,
    rows: usize,
    cols: usize,
    seg_len: usize,
    count: usize,
}

impl PackedB {
    pub(crate) fn pack(be: &CpuBackend, w: WeightView<'_>, segs: SegmentRange, purpose: super::PackFor) -> PackedB {
        let kl = KLayout::new(segs, w.cols);
        let per_block = kl.count * kl.tiles * planes(w.dtype) * TILE_WORDS;
        let mut words = be.packed_words(w.rows.div_ceil(TILE_COLS) * per_block, purpose);
        be.pool().install(|| {
            words.par_chunks_mut(per_block.max(1)).enumerate().for_each_init(Vec::new, |b, (i, dst)| {
                pack_b(w, i * TILE_COLS, &kl, b);
                dst.copy_from_slice(b);
            })
        });
        PackedB { words, per_block, rows: w.rows, cols: w.cols, seg_len: kl.seg_len, count: kl.count }
    }
    /// Whether these tiles were packed from a weight of this shape for this segmentation.
    pub(crate) fn fits(&self, w: WeightView<'_>, segs: SegmentRange) -> bool {
        (self.rows, self.cols, self.seg_len, self.count) == (w.rows, w.cols, segs.seg.seg_len, segs.count)
    }
    fn block(&self, n0: usize) -> &[u32] {
        let b = n0 / TILE_COLS;
        &self.words[b * self.per_block..(b + 1) * self.per_block]
    }
}

// ---------------------------------------------------------------- the tile program (shared)

/// The tile instructions the program uses, as one executor issues them.
///
/// # Safety
/// Every method is unsafe for the same reasons: the unit must be configured
/// ([`TileUnit::configure`] with [`TileConfig::program`]) before any other call, and loads and
/// stores go through raw pointers that must cover 16 rows of 64 bytes at `stride`.
pub(crate) trait TileUnit {
    /// `LDTILECFG`.
    unsafe fn configure(&mut self, cfg: &TileConfig);
    /// `TILEZERO t`.
    unsafe fn zero(&mut self, t: Tmm);
    /// `TILELOADD t, [src + stride]`.
    unsafe fn load(&mut self, t: Tmm, src: *const u8, stride: usize);
    /// `TDPBF16PS c, a, b` (one of the triples a [`Block`] names).
    unsafe fn dot(&mut self, c: Tmm, a: Tmm, b: Tmm);
    /// `TILESTORED [dst + stride], t`.
    unsafe fn store(&mut self, t: Tmm, dst: *mut u8, stride: usize);
    /// `TILERELEASE`.
    unsafe fn release(&mut self);
}

/// The register plan of an `R × C` block (R row tiles of 16 rows of x, C column tiles of 16
/// outputs): its `R·C ≤ 4` accumulators in `tmm0..`, one A register per row tile from `tmm4`,
/// and the remaining registers for B, taken in turn by the column tiles (`1 × 4`: three B
/// registers for four columns; `2 × 2`: two). Independent accumulators let the unit overlap
/// `TDPBF16PS`s, which one accumulator chains; each A load serves C products and each B load R.
pub(crate) struct Block<const R: usize, const C: usize>;

impl<const R: usize, const C: usize> Block<R, C> {
    const FITS: () = assert!(R >= 1 && C >= 1 && R * C <= 4 && R < 4, "a block needs its registers");
    fn c(r: usize, c: usize) -> Tmm {
        Tmm((r * C + c) as u8)
    }
    fn a(r: usize) -> Tmm {
        Tmm((4 + r) as u8)
    }
    fn b(c: usize) -> Tmm {
        Tmm((4 + R + c % (TILE_REGISTERS - 4 - R)) as u8)
    }
}

/// Bytes between one accumulator tile row and the next in a block's segment sums: the sums lie
/// output-major, vector `(i·C + j)·count + s` holding row `i`, column tile `j`, segment `s` (the
/// layout `super::store_tile_outputs` finishes), so a tile store's rows are `C·count` vectors apart.
fn sums_stride<const C: usize>(count: usize) -> usize {
    C * count * TILE_ROW_BYTES
}

/// One `R × C` block over the range's segments: per segment every accumulator from +0, then per K
/// tile and plane each row tile's A (loaded once per K tile) times each column tile's B (loaded
/// once per plane) with `TDPBF16PS`; the accumulators then go to `sums` (output-major, see
/// [`sums_stride`]). Per accumulator that is the rule's order: the segment's K tiles in increasing
/// order, planes in order within a K tile — whatever R and C are.
///
/// # Safety
/// The unit is configured with [`TileConfig::program`]; `a` points at `16·R` packed A rows of
/// `a_stride` bytes, `b[j]` at column tile `j`'s `count × tiles × planes` packed B tiles, `sums`
/// at `16·R·C·count` writable vectors of 64 bytes.
unsafe fn tile_program<U: TileUnit, const R: usize, const C: usize>(
    u: &mut U,
    a: *const u8,
    a_stride: usize,
    b: [*const u8; C],
    kl: &KLayout,
    planes: usize,
    sums: *mut u8,
) {
    let () = Block::<R, C>::FITS;
    let stride = sums_stride::<C>(kl.count);
    for s in 0..kl.count {
        for r in 0..R {
            for c in 0..C {
                u.zero(Block::<R, C>::c(r, c));
            }
        }
        for t in 0..kl.tiles {
            let kt = s * kl.tiles + t;
            // Row tile by row tile, each A loaded just before its first product and each B before
            // the first row tile's: a tile register is reloaded only after the products that read
            // it were issued several instructions earlier (2 × 2: A0 B0 C00 B1 C01 A1 C10 C11),
            // where loading both A first made each wait on the previous K tile's last product.
            for p in 0..planes {
                for r in 0..R {
                    if p == 0 {
                        u.load(Block::<R, C>::a(r), a.add(r * TILE_ROWS * a_stride + kt * TILE_ROW_BYTES), a_stride);
                    }
                    for (c, bc) in b.iter().enumerate() {
                        if r == 0 {
                            u.load(Block::<R, C>::b(c), bc.add((kt * planes + p) * TILE_WORDS * 4), TILE_ROW_BYTES);
                        }
                        u.dot(Block::<R, C>::c(r, c), Block::<R, C>::a(r), Block::<R, C>::b(c));
                    }
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let at = ((r * TILE_ROWS * C + c) * kl.count + s) * TILE_ROW_BYTES;
                u.store(Block::<R, C>::c(r, c), sums.add(at), stride);
            }
        }
    }
}

// ---------------------------------------------------------------- the software model

/// A bit-exact software model of the tile unit for the instructions above, following the Intel
/// SDM pseudo-code: `rows`/`colsb` come from the configuration bytes, loads zero what lies past
/// them, `TDPBF16PS` does per row `m`, K pair `k` and column `n`
/// `even[n] = fma(A[m][2k], B[k][2n], even[n])`, `odd[n] = fma(A[m][2k+1], B[k][2n+1], odd[n])`
/// (even and odd from +0, f32, round to nearest even, inputs denormal → 0, outputs denormal → 0),
/// then `C[m][n] = C[m][n] + (even[n] + odd[n])` with the same rounding and flushing.
#[derive(Clone)]
pub(crate) struct SoftTiles {
    cfg: [u8; 64],
    tmm: [[u32; TILE_ROWS * TILE_COLS]; TILE_REGISTERS],
}

impl Default for SoftTiles {
    fn default() -> Self {
        SoftTiles { cfg: [0; 64], tmm: [[0; TILE_ROWS * TILE_COLS]; TILE_REGISTERS] }
    }
}

/// DAZ on an input, FTZ on a result: a denormal becomes zero of its sign. A result is flushed
/// when its rounded f32 is denormal; x86 detects tininess after rounding as well (an unbounded
/// exponent result within half a denormal ulp of 2^-126 is the one case this could misjudge).
#[inline]
pub(super) fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

#[inline]
pub(super) fn bf16_f32(bits: u32) -> f32 {
    f32::from_bits(bits << 16)
}

impl SoftTiles {
    fn shape(&self, t: usize) -> (usize, usize) {
        let c = TileConfig(self.cfg);
        (c.rows(t), c.colsb(t))
    }
}

impl TileUnit for SoftTiles {
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        self.cfg = cfg.0;
        self.tmm = [[0; TILE_ROWS * TILE_COLS]; TILE_REGISTERS];
    }
    unsafe fn zero(&mut self, t: Tmm) {
        self.tmm[t.0 as usize] = [0; TILE_ROWS * TILE_COLS];
    }
    unsafe fn load(&mut self, t: Tmm, src: *const u8, stride: usize) {
        let (rows, colsb) = self.shape(t.0 as usize);
        let tile = &mut self.tmm[t.0 as usize];
        *tile = [0; TILE_ROWS * TILE_COLS];
        for r in 0..rows {
            for d in 0..colsb / 4 {
                let p = src.add(r * stride + d * 4);
                tile[r * TILE_COLS + d] = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
            }
        }
    }
    unsafe fn dot(&mut self, ct: Tmm, at: Tmm, bt: Tmm) {
        let (c_rows, c_colsb) = self.shape(ct.0 as usize);
        let (_, a_colsb) = self.shape(at.0 as usize);
        let (a, b) = (self.tmm[at.0 as usize], self.tmm[bt.0 as usize]);
        let c = &mut self.tmm[ct.0 as usize];
        for m in 0..c_rows {
            let mut even = [0.0f32; TILE_COLS];
            let mut odd = [0.0f32; TILE_COLS];
            for k in 0..a_colsb / 4 {
                let ap = a[m * TILE_COLS + k];
                let (a0, a1) = (flush(bf16_f32(ap & 0xffff)), flush(bf16_f32(ap >> 16)));
                for n in 0..c_colsb / 4 {
                    let bp = b[k * TILE_COLS + n];
                    let (b0, b1) = (flush(bf16_f32(bp & 0xffff)), flush(bf16_f32(bp >> 16)));
                    even[n] = flush(a0.mul_add(b0, flush(even[n])));
                    odd[n] = flush(a1.mul_add(b1, flush(odd[n])));
                }
            }
            for n in 0..c_colsb / 4 {
                let pair = flush(flush(even[n]) + flush(odd[n]));
                let acc = flush(f32::from_bits(c[m * TILE_COLS + n]));
                c[m * TILE_COLS + n] = flush(acc + pair).to_bits();
            }
        }
    }
    unsafe fn store(&mut self, t: Tmm, dst: *mut u8, stride: usize) {
        let (rows, colsb) = self.shape(t.0 as usize);
        for r in 0..rows {
            for d in 0..colsb / 4 {
                let bytes = self.tmm[t.0 as usize][r * TILE_COLS + d].to_le_bytes();
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.add(r * stride + d * 4), 4);
            }
        }
    }
    unsafe fn release(&mut self) {
        *self = SoftTiles::default();
    }
}

// ---------------------------------------------------------------- the tile unit (asm!)

/// The CPU's tile unit. Each method is one instruction in its own `asm!` block: the tile
/// registers are invisible to the compiler (it never allocates them in code that uses no AMX
/// intrinsics, and Rust has no tile operands), so their contents live on from one block to the
/// next, and the blocks — none `pure` — keep their order.
#[cfg(target_arch = "x86_64")]
pub(crate) struct HardTiles(());

#[cfg(target_arch = "x86_64")]
impl HardTiles {
    /// # Safety
    /// [`amx_available`] must have returned `Ok` in this process.
    pub(crate) unsafe fn new() -> Self {
        HardTiles(())
    }
}

/// `$body` with `$n` a constant naming tile register `$t` (an `asm!` operand must be one): one
/// match arm per register, `$body` in each.
#[cfg(target_arch = "x86_64")]
macro_rules! with_tmm {
    ($t:expr, $n:ident => $body:expr) => {
        with_tmm!(@arms $t, $n, $body, 0 1 2 3 4 5 6 7)
    };
    (@arms $t:expr, $n:ident, $body:expr, $($k:literal)*) => {
        match $t.0 {
            $($k => {
                const $n: u8 = $k;
                $body
            })*
            other => unreachable!("no tile register tmm{other}"),
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl TileUnit for HardTiles {
    unsafe fn configure(&mut self, cfg: &TileConfig) {
        std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly, preserves_flags));
    }
    unsafe fn zero(&mut self, t: Tmm) {
        with_tmm!(t, T => std::arch::asm!("tilezero tmm{t}", t = const T, options(nostack, nomem, preserves_flags)))
    }
    unsafe fn load(&mut self, t: Tmm, src: *const u8, stride: usize) {
        with_tmm!(t, T => std::arch::asm!("tileloadd tmm{t}, [{0} + {1}*1]", in(reg) src, in(reg) stride, t = const T,
            options(nostack, readonly, preserves_flags)))
    }
    unsafe fn dot(&mut self, c: Tmm, a: Tmm, b: Tmm) {
        // The triples the block plans name (`Block::<R, C>`: C in tmm0..3, A in tmm4/5, B after
        // them), spelled out: three nested register matches would be 512 arms.
        macro_rules! dots {
            ($(($c:literal, $a:literal, $b:literal)),*) => {
                match (c.0, a.0, b.0) {
                    $(($c, $a, $b) => std::arch::asm!(
                        concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
                        options(nostack, nomem, preserves_flags)
                    ),)*
                    other => unreachable!("no block plan dots {other:?}"),
                }
            };
        }
        dots!(
            // 1 × C: A tmm4, B tmm5, 6, 7 in turn.
            (0, 4, 5),
            (1, 4, 6),
            (2, 4, 7),
            (3, 4, 5),
            // 2 × C: A tmm4, tmm5, B tmm6, 7.
            (0, 4, 6),
            (1, 4, 7),
            (2, 5, 6),
            (3, 5, 7),
            // 2 × 1: A tmm4, tmm5, B tmm6.
            (1, 5, 6)
        )
    }
    unsafe fn store(&mut self, t: Tmm, dst: *mut u8, stride: usize) {
        with_tmm!(t, T => std::arch::asm!("tilestored [{0} + {1}*1], tmm{t}", in(reg) dst, in(reg) stride, t = const T,
            options(nostack, preserves_flags)))
    }
    unsafe fn release(&mut self) {
        std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}

/// Runs `rounds` rounds of four independent `TDPBF16PS` (the 2 × 2 block's, on tiles loaded once
/// from zeros) on this thread: the benches time it for the tile unit's throughput.
pub fn dot_throughput_probe(rounds: usize) -> Result<(), KernelError> {
    amx_available()?;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX is available (checked above); the unit is configured before its first tile
    // instruction and released after its last, on this thread; the loads read 16 rows of 64
    // bytes of `zeros`.
    unsafe {
        let zeros = [0u8; TILE_ROWS * TILE_ROW_BYTES];
        let mut u = HardTiles::new();
        u.configure(&TileConfig::program());
        for t in 0..TILE_REGISTERS {
            u.load(Tmm(t as u8), zeros.as_ptr(), TILE_ROW_BYTES);
        }
        for _ in 0..rounds {
            for r in 0..2 {
                for c in 0..2 {
                    u.dot(Block::<2, 2>::c(r, c), Block::<2, 2>::a(r), Block::<2, 2>::b(c));
                }
            }
        }
        u.release();
    }
    Ok(())
}

// ---------------------------------------------------------------- the linear

/// Output columns per task (four tiles). A task takes every row, so each B tile is packed once
/// per call and then serves all of M.
const TASK_COLS: usize = 64;

/// `x` prepared once for every linear of a group that reads it (the same `x`, `m` and segment
/// range): the packed A panel.
pub(crate) struct PreparedX {
    /// The panel in its first lines (more may follow, left from a larger panel: [`pack_a`]).
    a: Vec<Line>,
    a_stride: usize,
    kl: KLayout,
    m: usize,
}

impl PreparedX {
    pub(crate) fn new(be: &CpuBackend, x: &[f32], m: usize, k_real: usize, segs: SegmentRange) -> PreparedX {
        let kl = KLayout::new(segs, k_real);
        PreparedX { a: pack_a(be, x, m, &kl), a_stride: a_row_words(&kl) * 4, kl, m }
    }
}

impl Drop for PreparedX {
    /// The panel's lines go back to this thread's spare for the next call's [`pack_a`].
    fn drop(&mut self) {
        SPARE_PANEL.set(std::mem::take(&mut self.a));
    }
}

/// One linear call cut into tasks of [`TASK_COLS`] output columns over every row: the A panel
/// and what the tasks need to pack B and write their outputs.
pub(crate) struct Job<'a> {
    x: &'a PreparedX,
    exec: AmxExec,
    w: WeightView<'a>,
    /// The weight's B tiles packed at its first call, when it is a held weight.
    packed: Option<&'a PackedB>,
    planes: usize,
    out: SharedOut,
    /// Whether blocks are finished with AVX-512 ([`super::store_tile_outputs`]); else lane by
    /// lane, the same adds in the same order.
    vector_finish: bool,
}

impl<'a> Job<'a> {
    /// Row-parallel partial of a bf16/f16 linear in the native numerics: `x` prepared for `w`'s
    /// columns (those of its segment range), `w` `[n, k_real]`; `y` `[m, n]` receives the subtree
    /// sums. `packed`: the weight's B tiles for this segmentation, if it has them; else each task
    /// packs its own.
    pub(crate) fn new(
        exec: AmxExec,
        x: &'a PreparedX,
        w: WeightView<'a>,
        packed: Option<&'a PackedB>,
        y: &mut [f32],
    ) -> Job<'a> {
        assert!(takes(w.dtype), "{:?} weights never take the tile path", w.dtype);
        assert_eq!(x.kl.k_real, w.cols, "x prepared for another K");
        #[cfg(target_arch = "x86_64")]
        let vector_finish = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let vector_finish = false;
        Job { x, exec, w, packed, planes: planes(w.dtype), out: SharedOut(y.as_mut_ptr()), vector_finish }
    }

    pub(crate) fn tasks(&self) -> usize {
        if self.x.m == 0 {
            0
        } else {
            self.w.rows.div_ceil(TASK_COLS)
        }
    }

    /// Task `t`: columns `t·TASK_COLS..` over every row.
    pub(crate) fn run(&self, t: usize) {
        let n = self.w.rows;
        let (rows, cols) = (0..self.x.m, t * TASK_COLS..((t + 1) * TASK_COLS).min(n));
        match self.exec {
            AmxExec::Model => {
                let mut unit = SoftTiles::default();
                // SAFETY: configured before use; tasks own disjoint output blocks.
                unsafe {
                    unit.configure(&TileConfig::program());
                    self.run_on(&mut unit, rows, cols);
                }
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the backend selects `Hardware` only after `amx_available` succeeded. The
            // tile configuration is per thread: set here before this task's first tile
            // instruction and released after its last, and a task runs on one thread throughout.
            // Tasks own disjoint output blocks.
            AmxExec::Hardware => unsafe {
                let mut unit = HardTiles::new();
                unit.configure(&TileConfig::program());
                self.run_on(&mut unit, rows, cols);
                unit.release();
            },
            #[cfg(not(target_arch = "x86_64"))]
            AmxExec::Hardware => unreachable!("no AMX outside x86-64"),
        }
    }

    /// Output rows `rows` × columns `cols` (one task's), in blocks on `u`: with at most 16 rows of
    /// x one row tile × four column tiles (a task's 64 columns: each A load serves four
    /// products), else two × two (each A and each B load serves two). Row blocks run outside
    /// column blocks, so the task's B tiles (64 columns × K) stay in L2 while x streams past.
    ///
    /// # Safety
    /// `u` is configured with [`TileConfig::program`]; no other task writes this block of `out`.
    unsafe fn run_on<U: TileUnit>(&self, u: &mut U, rows: Range<usize>, cols: Range<usize>) {
        let kl = &self.x.kl;
        let per_block = kl.count * kl.tiles * self.planes * TILE_WORDS;
        // A bare view: this task's column tiles packed once, for every row block.
        let mut own = Vec::new();
        if self.packed.is_none() {
            let mut b = Vec::new();
            for n0 in cols.clone().step_by(TILE_COLS) {
                pack_b(self.w, n0, kl, &mut b);
                own.extend_from_slice(&b);
            }
        }
        let tiles = |n0: usize| -> *const u8 {
            match self.packed {
                Some(p) => p.block(n0).as_ptr() as *const u8,
                None => own[(n0 - cols.start) / TILE_COLS * per_block..].as_ptr() as *const u8,
            }
        };
        let (rt, ct) = if self.x.m <= TILE_ROWS { (1, 4) } else { (2, 2) };
        with_block_sums(rt * TILE_ROWS * ct * kl.count, |sums| {
            for i0 in rows.clone().step_by(rt * TILE_ROWS) {
                let live = (rows.end - i0).min(rt * TILE_ROWS);
                for n0 in cols.clone().step_by(ct * TILE_COLS) {
                    let nc = (cols.end - n0).div_ceil(TILE_COLS).min(ct);
                    macro_rules! block {
                        ($r:literal, $c:literal, $mr:literal) => {
                            self.block::<U, $r, $c, $mr>(
                                u,
                                i0,
                                n0,
                                live,
                                std::array::from_fn(|c| tiles(n0 + c * TILE_COLS)),
                                sums,
                            )
                        };
                    }
                    match (live.div_ceil(TILE_ROWS), nc) {
                        (1, 1) => block!(1, 1, 16),
                        (1, 2) => block!(1, 2, 16),
                        (1, 3) => block!(1, 3, 16),
                        (1, 4) => block!(1, 4, 16),
                        (2, 1) => block!(2, 1, 32),
                        (2, 2) => block!(2, 2, 32),
                        other => unreachable!("no {other:?} block"),
                    }
                }
            }
        })
    }

    /// One `R × C` block at rows `i0..i0 + live` and columns `n0..`: the tile program, then each
    /// output's segment tree and the stores (`MR = 16·R` rows of sums, the first `live` finished).
    ///
    /// # Safety
    /// As for [`Self::run_on`]; `b` are the block's column tiles, `live ≤ MR` rows from `i0` lie
    /// inside x, and `sums` holds `MR·C·count` vectors.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<U: TileUnit, const R: usize, const C: usize, const MR: usize>(
        &self,
        u: &mut U,
        i0: usize,
        n0: usize,
        live: usize,
        b: [*const u8; C],
        sums: &mut [Lanes],
    ) {
        debug_assert!(MR == R * TILE_ROWS && live <= MR);
        let (kl, n) = (&self.x.kl, self.w.rows);
        let a = (self.x.a.as_ptr() as *const u8).add(i0 * self.x.a_stride);
        let sums = &mut sums[..MR * C * kl.count];
        tile_program::<U, R, C>(u, a, self.x.a_stride, b, kl, self.planes, sums.as_mut_ptr() as *mut u8);
        #[cfg(target_arch = "x86_64")]
        if self.vector_finish {
            // SAFETY: AVX-512 F was detected; the sums are in the layout it reads; rows
            // `i0..i0 + live` and the block's columns lie inside the output, this task's.
            return super::store_tile_outputs::<MR, C>(sums, kl.count, self.out.0, n, i0, n0 / TILE_COLS, live);
        }
        // SAFETY: a vector of sums is 16 f32 (64 bytes, no padding).
        let lanes = std::slice::from_raw_parts_mut(sums.as_mut_ptr() as *mut [f32; TILE_COLS], sums.len());
        let lanes = &mut lanes[..live * C * kl.count];
        super::trees_in_place(lanes, kl.count, |x, y| std::array::from_fn(|l| x[l] + y[l]));
        for i in 0..live {
            for j in 0..C {
                let col = n0 + j * TILE_COLS;
                let valid = TILE_COLS.min(n - col);
                let src = &lanes[(i * C + j) * kl.count];
                std::ptr::copy_nonoverlapping(src.as_ptr(), self.out.0.add((i0 + i) * n + col), valid);
            }
        }
    }
}

/// A vector of 16 segment sums in a block's scratch (64 bytes).
#[cfg(target_arch = "x86_64")]
type Lanes = std::arch::x86_64::__m512;
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lanes([f32; TILE_COLS]);

/// Runs `f` on this thread's block scratch of `len` vectors (the native tile scratch where there
/// is one).
fn with_block_sums<T>(len: usize, f: impl FnOnce(&mut [Lanes]) -> T) -> T {
    #[cfg(target_arch = "x86_64")]
    {
        super::with_tile_sums(len, f)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        f(&mut vec![Lanes([0.0; TILE_COLS]); len])
    }
}

/// Row-parallel partial of a bf16/f16 linear in the native numerics (see [`Job::new`]), `x`
/// `[m, k_real]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_native(
    be: &CpuBackend,
    exec: AmxExec,
    x: &[f32],
    m: usize,
    w: WeightView<'_>,
    segs: SegmentRange,
    packed: Option<&PackedB>,
    y: &mut [f32],
) {
    if m == 0 || w.rows == 0 {
        return;
    }
    let xa = PreparedX::new(be, x, m, w.cols, segs);
    let job = Job::new(exec, &xa, w, packed, y);
    be.run_tasks(job.tasks(), |t| job.run(t));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tile_configuration_is_palette_1_with_eight_16_by_64_byte_tiles() {
        let c = TileConfig::program();
        assert_eq!(c.0[0], 1, "palette");
        assert_eq!(c.0[1], 0, "start_row");
        for t in 0..TILE_REGISTERS {
            assert_eq!((c.rows(t), c.colsb(t)), (16, 64), "tmm{t}");
        }
        assert!(c.0[2..16].iter().chain(&c.0[56..]).all(|&b| b == 0), "reserved bytes are zero");
    }

    /// Every register a block plan names exists, accumulators, A and B registers are distinct, and
    /// the hardware's `dot` lists each (C, A, B) triple the plans use.
    #[test]
    fn block_plans_use_distinct_registers() {
        fn check<const R: usize, const C: usize>() {
            let cs: Vec<u8> = (0..R).flat_map(|r| (0..C).map(move |c| Block::<R, C>::c(r, c).0)).collect();
            let as_: Vec<u8> = (0..R).map(|r| Block::<R, C>::a(r).0).collect();
            let bs: Vec<u8> = (0..C).map(|c| Block::<R, C>::b(c).0).collect();
            for (i, t) in cs.iter().chain(&as_).enumerate() {
                assert!((*t as usize) < TILE_REGISTERS, "{R}×{C}: tmm{t}");
                assert!(!cs.iter().chain(&as_).skip(i + 1).any(|u| u == t), "{R}×{C}: tmm{t} twice");
                assert!(!bs.contains(t), "{R}×{C}: B shares tmm{t}");
            }
            assert!(bs.iter().all(|&b| (b as usize) < TILE_REGISTERS));
        }
        check::<1, 1>();
        check::<1, 2>();
        check::<1, 3>();
        check::<1, 4>();
        check::<2, 1>();
        check::<2, 2>();
    }

    /// One `TDPBF16PS` on the model, with C, A and B as given.
    fn one_dot(a: &[u8; 1024], b: &[u8; 1024]) -> [f32; 256] {
        dot_on(&mut SoftTiles::default(), &[0f32; 256], a, b)
    }

    /// One `TDPBF16PS` on `u` from the accumulator `c0`, with A and B as given.
    fn dot_on<U: TileUnit>(u: &mut U, c0: &[f32; 256], a: &[u8; 1024], b: &[u8; 1024]) -> [f32; 256] {
        let mut c = *c0;
        // SAFETY: every buffer holds 16 rows of 64 bytes; the unit is configured first and
        // released last.
        unsafe {
            u.configure(&TileConfig::program());
            u.load(Tmm(0), c.as_ptr() as *const u8, 64);
            u.load(Tmm(4), a.as_ptr(), 64);
            u.load(Tmm(5), b.as_ptr(), 64);
            u.dot(Tmm(0), Tmm(4), Tmm(5));
            u.store(Tmm(0), c.as_mut_ptr() as *mut u8, 64);
            u.release();
        }
        c
    }

    /// A bf16 with a random sign, significand and an exponent anywhere from denormal to infinity
    /// (biased exponent 0..=255, weighted towards the ends where flushing and overflow happen).
    #[cfg(target_arch = "x86_64")]
    fn extreme_bf16(rng: &mut crate::splitmix::SplitMix64) -> u16 {
        let r = rng.next_u64();
        let exp = match r % 4 {
            0 => (r >> 8) % 8,        // denormals and the smallest normals
            1 => 248 + (r >> 8) % 8,  // the largest normals, infinity and NaN
            2 => 60 + (r >> 8) % 16,  // products near 2^-126
            _ => 100 + (r >> 8) % 60, // ordinary magnitudes
        };
        let sign = (r >> 20) & 1;
        let mant = (r >> 24) & 0x7f;
        ((sign << 15) | (exp << 7) | mant) as u16
    }

    /// The tile unit gives the model's bits on operands chosen to hit flushing, rounding at the
    /// denormal boundary, overflow and the separate even/odd accumulators: the edges the SDM
    /// pseudo-code defines and random normal operands rarely reach. NaNs compare as NaN (their
    /// payloads are not part of the rule).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_tile_unit_gives_the_models_bits_on_denormals_overflow_and_even_odd_sums() {
        if let Err(why) = amx_available() {
            eprintln!("SKIPPED amx_tile_unit_gives_the_models_bits_on_denormals_overflow_and_even_odd_sums: {why}");
            return;
        }
        let mut rng = crate::splitmix::SplitMix64::new(0x9e37_79b9_7f4a_7c15);
        for case in 0..200 {
            let (mut a, mut b) = ([0u8; 1024], [0u8; 1024]);
            for v in a.chunks_exact_mut(2).chain(b.chunks_exact_mut(2)) {
                v.copy_from_slice(&extreme_bf16(&mut rng).to_le_bytes());
            }
            let mut c0 = [0f32; 256];
            for v in c0.iter_mut() {
                // Accumulators from denormal to huge, as a chain of K tiles leaves them.
                let hi = extreme_bf16(&mut rng) as u32;
                *v = f32::from_bits(hi << 16 | (rng.next_u64() as u32 & 0xffff));
            }
            // SAFETY: amx_available() succeeded in this process.
            let hw = dot_on(&mut unsafe { HardTiles::new() }, &c0, &a, &b);
            let model = dot_on(&mut SoftTiles::default(), &c0, &a, &b);
            for (i, (h, m)) in hw.iter().zip(&model).enumerate() {
                let same = h.to_bits() == m.to_bits() || (h.is_nan() && m.is_nan());
                assert!(
                    same,
                    "case {case}, output {i}: tile unit {h:e} ({:#010x}), model {m:e} ({:#010x}), C was {:e}",
                    h.to_bits(),
                    m.to_bits(),
                    c0[i]
                );
            }
        }
        // The crafted cases of the model's own test, on the tile unit.
        let (mut a, mut b) = ([0u8; 1024], [0u8; 1024]);
        let put = |buf: &mut [u8], at: usize, v: u16| buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
        put(&mut a, 0, bf16_bits(2f32.powi(24)));
        put(&mut b, 0, bf16_bits(1.0));
        put(&mut a, 6, bf16_bits(1.0));
        put(&mut b, 64 + 2, bf16_bits(1.0));
        put(&mut a, 10, bf16_bits(1.0));
        put(&mut b, 128 + 2, bf16_bits(1.0));
        put(&mut a, 64, bf16_bits(2f32.powi(-70)));
        put(&mut b, 4, bf16_bits(2f32.powi(-70)));
        // SAFETY: as above.
        let hw = dot_on(&mut unsafe { HardTiles::new() }, &[0f32; 256], &a, &b);
        assert_eq!(hw[0], 2f32.powi(24) + 2.0, "even and odd products accumulate apart on silicon");
        assert_eq!(hw[16 + 1].to_bits(), 0, "a denormal product is flushed on silicon");
    }

    #[test]
    fn the_model_flushes_denormal_inputs_and_results_and_sums_even_and_odd_apart() {
        let mut a = [0u8; 1024];
        let mut b = [0u8; 1024];
        let put = |buf: &mut [u8], at: usize, v: u16| buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
        // Row 0 × column 0: 2^-70 · 2^-70 = 2^-140, a denormal result, is flushed to +0.
        put(&mut a, 0, bf16_bits(2f32.powi(-70)));
        put(&mut b, 0, bf16_bits(2f32.powi(-70)));
        // Row 1 × column 1: the denormal bf16 2^-130 reads as zero (not 2^-130 · 2^10 = 2^-120).
        put(&mut a, 64, bf16_bits(2f32.powi(-130)));
        put(&mut b, 4, bf16_bits(2f32.powi(10)));
        // Row 2 × column 2: normal values go through: 3 · 1 = 3.
        put(&mut a, 128, bf16_bits(3.0));
        put(&mut b, 8, bf16_bits(1.0));
        let c = one_dot(&a, &b);
        assert_eq!(c[0].to_bits(), 0, "denormal result flushed");
        assert_eq!(c[16 + 1].to_bits(), 0, "denormal input read as zero");
        assert_eq!(c[32 + 2], 3.0);
        // Even and odd products accumulate apart and meet once: even 2^24 (pair 0), odd 1 + 1
        // (pairs 1, 2) give 2^24 + 2 exactly; one accumulator in pair order would lose both ones
        // (2^24 + 1 rounds to 2^24).
        let (mut a, mut b) = ([0u8; 1024], [0u8; 1024]);
        put(&mut a, 0, bf16_bits(2f32.powi(24)));
        put(&mut b, 0, bf16_bits(1.0));
        put(&mut a, 6, bf16_bits(1.0));
        put(&mut b, 64 + 2, bf16_bits(1.0));
        put(&mut a, 10, bf16_bits(1.0));
        put(&mut b, 128 + 2, bf16_bits(1.0));
        let c = one_dot(&a, &b);
        assert_eq!(c[0], 2f32.powi(24) + 2.0);
    }

    #[test]
    fn f16_weights_split_into_two_bf16_planes_exactly() {
        for bits in (0u16..=0xffff).step_by(7) {
            let v = half::f16::from_bits(bits);
            if !v.is_finite() {
                continue;
            }
            let row = bits.to_le_bytes();
            let [hi, lo] = weight_planes(DType::F16, &row, 0);
            let sum = bf16_f32(hi as u32) + bf16_f32(lo as u32);
            assert_eq!(sum, v.to_f32(), "f16 {bits:#06x}");
            assert!(!bf16_f32(lo as u32).is_subnormal(), "lo of {bits:#06x} would be flushed");
        }
    }
}
