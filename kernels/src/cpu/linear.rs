//! The invariant linear: tiling, threading and the portable lane loop.
//!
//! A *tile* is `MR` rows of `x` times `NR` rows of `W`; its kernel computes every one of the
//! `MR × NR` dot products in the contract order (16 lanes → lane tree per segment → segment tree),
//! so the tile shape — chosen by `M` and the ISA — never changes a result bit. `x` is first copied
//! into a zero-padded buffer so kernels read whole 16-lane blocks of it; weight rows are read in
//! place and the block that crosses the end of the real row is loaded with a mask (zeros beyond).
//!
//! **K-blocking (AVX-512, M ≥ 8).** Whole-K tiles re-read a task's x rows from L2 or beyond for
//! every column tile (64 rows × K f32 do not fit in L2 at K = 4864). So rows in groups of 8 run an
//! 8×3 tile chunk by chunk along K: a chunk is a group of whole short segments (a tile folds
//! each one's lanes as it ends, while the next one's FMAs already run), or an equal piece of a
//! long segment. Each tile keeps its state between chunks — its lane accumulators while a
//! segment is unfinished, then its segment-tree stack — so every output still sees exactly the
//! contract's fma chain per lane, lane tree per segment and segment tree: only *when* each step
//! runs changes, never its operands. Within a chunk, one 8-row block of x stays in L1 while the
//! task's weight columns pass by; x is packed into those blocks on the team, one task per 8
//! rows, into the buffer the calling thread's previous call left (see `PaddedX::kb_pack`).
//! Finished outputs are stored row by row into output lines fetched for writing during the
//! task's last chunk: an 8×3 tile's 24 results lie on 8 rows `N` floats apart, and storing them
//! where they fall missed the cache on every row (~9 % of a 512-token prefill's CPU time went to
//! that write-out).
//!
//! **Lane-major tiles (AVX-512, segments ≤ 640 columns, M ≥ 64 — or fewer rows for weights
//! the K-blocked tiles widen in their FMA loop, see `takes_lane_major`).** The K-blocked tiles
//! hold the 16 lanes of one output per register, so every segment ends in a shuffle tree per
//! output (~15 % of their time at Qwen2.5's 112-column segments). The contract's
//! lanes are independent chains, so these tiles compute the same chains the other way round: a
//! register holds one lane of 16 outputs, x is broadcast, and the lane tree becomes vertical adds
//! of whole registers (see `x86::lanes512`). They read the weights as a panel in their own order,
//! widened to f32 (block types by the `crate::quant` formula, as every tile widens them) —
//! packed per call into a per-thread buffer, once per 48-column block, and reused by the
//! thread's later tasks of the same block — so no copy of the weights outlives the call, and x
//! packed lane by lane (on the team, 8 rows a task, into a buffer the calling thread
//! keeps for its next call). Tasks run pair of column blocks after pair, and within a
//! pair each 64-row block meets both column blocks in turn: a thread keeps both panels, and a
//! row block's packed x (229 KB at Qwen2.5's K) comes from memory once per pair and from L2 the
//! second time — at M = 512 the packed x (1.8 MB) no longer fits in L2 beside the rest, so
//! running one column block at a time streamed it once per block. Each task fetches its share of
//! the next pair's weights into L2 while it computes, so packing those panels does not wait on
//! memory. Tiles run 4 rows × 2 lanes at once. Decode never takes them. GGUF block types take
//! them too: the K-blocked tiles widen each weight once per 8 rows inside the FMA loop, the
//! panel once per call (BENCHMARKS §26).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use super::{CpuBackend, Isa, SharedOut};
use crate::sampling::lane_tree;
use crate::{DType, SegmentRange, WeightView, LANES};

/// Shape of one tile call: pointers to `MR` padded x rows and `NR` weight rows.
pub(crate) struct Tile<'a> {
    pub xs: &'a [*const f32],
    pub ws: &'a [*const u8],
    pub dtype: DType,
    /// Real elements per weight row (beyond: zeros).
    pub k_real: usize,
    pub seg_len: usize,
    pub count: usize,
    /// Bytes of weights the *next* tile will read (contiguous rows), to prefetch while this one
    /// computes: a decode step streams every weight once, and rows are too short for the
    /// hardware prefetcher to ramp up on its own.
    pub prefetch: &'a [u8],
}

/// Rows of output per task and columns per task: small enough that a task's x and W blocks stay
/// in L2, numerous enough to balance two to eight threads.
const TASK_ROWS: usize = 64;
const TASK_COLS: usize = 64;
/// Columns per task when K-blocked tiles run: a multiple of their 3 columns and of the other
/// tiles' 4 and 16.
const KB_TASK_COLS: usize = 48;
/// Longest K chunk: 8 x rows of it (20 KiB of f32) stay in L1 while it meets every column tile
/// (Qwen2.5's K = 896 at S = 8: two chunks of four 112-column segments).
const KB_CHUNK: usize = 640;

/// Columns `begin..end` of the padded row (see the module comment).
#[derive(Clone, Copy)]
struct ChunkSpan {
    begin: usize,
    end: usize,
}

/// The K chunks of `count` segments of `seg_len`: short segments are grouped, as many whole ones
/// per chunk as fit in [`KB_CHUNK`] columns (equal groups, so a tile folds one segment while
/// the FMAs of the next already run and its call and tree-stack traffic is paid once per
/// group); a segment longer than [`KB_CHUNK`] is cut into equal pieces, each a multiple of 32
/// columns (block types decode whole 32-weight blocks).
fn k_chunks(count: usize, seg_len: usize) -> Vec<ChunkSpan> {
    if seg_len <= KB_CHUNK {
        let groups = (count * seg_len).div_ceil(KB_CHUNK);
        let per_group = count.div_ceil(groups);
        return (0..count)
            .step_by(per_group)
            .map(|s| ChunkSpan { begin: s * seg_len, end: (s + per_group).min(count) * seg_len })
            .collect();
    }
    let pieces = seg_len.div_ceil(KB_CHUNK);
    let piece = seg_len.div_ceil(pieces).next_multiple_of(32);
    let mut spans = Vec::with_capacity(count * pieces);
    for seg in 0..count {
        let (start, stop) = (seg * seg_len, (seg + 1) * seg_len);
        let mut begin = start;
        while begin < stop {
            let end = (begin + piece).min(stop);
            spans.push(ChunkSpan { begin, end });
            begin = end;
        }
    }
    spans
}

thread_local! {
    /// Per-thread state of the K-blocked tiles of one task (reused: no allocation per call).
    static KB_STATES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The largest x pack (lane-major or K-blocked) of the `PaddedX`s dropped on this thread, for
    /// the next to fill.
    static SPARE_X_PACK: Cell<Option<AlignedF32>> = const { Cell::new(None) };
    /// Per-thread weight panel and tree stacks of the lane-major tiles (reused across calls).
    static LANE_BUFS: RefCell<LaneBufs> =
        const { RefCell::new(LaneBufs { packed: [None; LANE_PAIR], panels: [Vec::new(), Vec::new()], scratch: Vec::new() }) };
}

/// Whether a batch of `m` rows (x padded to `padded` columns) through weights of `dtype` takes
/// the lane-major tiles (given segments of at most `LM_MAX_SEG` columns). Their weight panel is
/// packed per call and pays off over enough rows: 64 always; below that only where the K-blocked
/// tiles would widen every weight inside their FMA loop once per 8 rows — 32 for bf16/f16 where
/// the panel is short (K ≤ 2048: 48 outputs × K f32 ≤ 384 KB, re-read from L2 by every 4-row
/// tile; the down projection's 934 KB panel at M = 32 made its linear 20–30 % slower than
/// K-blocked, and f32, which the K-blocked tiles read as it is, gained nothing), 16 for GGUF
/// block types (BENCHMARKS §26: batch 16–32 decode ×1.2–1.8 for block types, +15–35 % for the
/// bf16 linears at M = 32).
fn takes_lane_major(m: usize, padded: usize, dtype: DType) -> bool {
    if dtype.is_quantized() {
        m >= 16
    } else {
        m >= 64 || (m >= 32 && padded <= 2048 && dtype != DType::F32)
    }
}

/// Column blocks a lane-major row block meets in turn (see `Job::lane_task`); a thread keeps the
/// panel of each.
const LANE_PAIR: usize = 2;

/// Tells one `Job` from every other, so a thread's packed panel is never taken for another call's.
static NEXT_JOB_ID: AtomicU64 = AtomicU64::new(0);

/// A thread's lane-major buffers: per slot `cb % LANE_PAIR`, the panel of column block
/// `packed[slot].1` of job `packed[slot].0`; and the scratch of one tile's tree stacks (all
/// 64-byte aligned from their align offset on).
struct LaneBufs {
    packed: [Option<(u64, usize)>; LANE_PAIR],
    panels: [Vec<f32>; LANE_PAIR],
    scratch: Vec<f32>,
}

/// `x` prepared once for every linear of a group that reads it (the same `x`, `m` and segment
/// range): rows padded to the segment range, and the 8-row packs of the K-blocked or the
/// lane-major tiles, each built at the first linear that reads it.
pub(crate) struct PaddedX<'x> {
    x: &'x [f32],
    /// Rows `kb_rows()..m`, padded (the rows no pack holds).
    xp: Vec<f32>,
    /// The K-blocked tiles' 8-row packs (see `KChunk::x`).
    kb_pack: OnceLock<AlignedF32>,
    /// The lane-major tiles' 8-row packs (see [`PaddedX::lane_pack`]).
    lane_pack: OnceLock<AlignedF32>,
    m: usize,
    k_real: usize,
    padded: usize,
    segs: SegmentRange,
    isa: Isa,
    kblocked: bool,
    chunks: Vec<ChunkSpan>,
}

/// Floats from a cache-line boundary on: every 16-float load of a packed tile is then one line.
struct AlignedF32 {
    buf: Vec<f32>,
    align: usize,
}

impl AlignedF32 {
    fn within(buf: Vec<f32>) -> AlignedF32 {
        let align = buf.as_ptr().align_offset(64);
        AlignedF32 { buf, align }
    }
    /// `len` floats of this thread's spare x pack (grown if short), their contents whatever they
    /// were: for a caller that overwrites all of them.
    fn spare(len: usize) -> AlignedF32 {
        let mut buf = SPARE_X_PACK.take().map(|p| p.buf).unwrap_or_default();
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        AlignedF32::within(buf)
    }
    fn as_mut_slice(&mut self, len: usize) -> &mut [f32] {
        &mut self.buf[self.align..self.align + len]
    }
    fn as_ptr(&self) -> *const f32 {
        self.buf[self.align..].as_ptr()
    }
}

impl<'x> PaddedX<'x> {
    /// Rows 0..m/8·8, those of the K-blocked or lane-major tiles (every task's such rows start
    /// at a multiple of 8 and stop at the last whole 8 of its block).
    fn kb_rows(&self) -> usize {
        if self.kblocked {
            self.m / KB_MR * KB_MR
        } else {
            0
        }
    }

    /// The K-blocked tiles' packs: column `col` of row `i` of a pack at `col · 8 + i · 16` (`col`
    /// a multiple of 16, plus its lane), so one 16-column block of 8 rows is 512 contiguous bytes,
    /// zeros past `k_real`. Packed on the team, one task per 8 rows, into this thread's spare
    /// pack, as [`PaddedX::lane_pack`] is (the padding written, not assumed).
    fn kb_pack(&self, be: &CpuBackend) -> &AlignedF32 {
        let (x, k_real, padded, rows) = (self.x, self.k_real, self.padded, self.kb_rows());
        assert_eq!(padded % 16, 0, "segment ranges pad to whole 16-column blocks");
        self.kb_pack.get_or_init(|| {
            let mut pack = AlignedF32::spare(rows * padded);
            be.run_chunks(pack.as_mut_slice(rows * padded), KB_MR * padded, |t, tile| {
                for i in 0..KB_MR {
                    let row = &x[(t * KB_MR + i) * k_real..][..k_real];
                    for b in 0..padded / 16 {
                        let (lo, hi) = ((b * 16).min(k_real), ((b + 1) * 16).min(k_real));
                        let dst = &mut tile[b * 16 * KB_MR + i * 16..][..16];
                        dst[..hi - lo].copy_from_slice(&row[lo..hi]);
                        dst[hi - lo..].fill(0.0);
                    }
                }
            });
            pack
        })
    }

    /// The lane-major tiles' packs: element `e = s · seg_len + 16t + l` of row `i` of a pack at
    /// `((s · 16 + l) · steps + t) · 8 + i` — a lane's elements in order, the pack's 8 rows side by
    /// side — so a tile's broadcasts of one lane walk one run of lines. Packed on the team, one
    /// task per 8 rows, into the buffer the last `PaddedX` of this thread left (the packing
    /// writes every float of it): packing on one thread, into fresh memory, left the other
    /// threads waiting (BENCHMARKS §25.2).
    fn lane_pack(&self, be: &CpuBackend) -> &AlignedF32 {
        let (x, k_real, padded, rows) = (self.x, self.k_real, self.padded, self.kb_rows());
        let seg_len = self.segs.seg.seg_len;
        self.lane_pack.get_or_init(|| {
            let mut pack = AlignedF32::spare(rows * padded);
            let one = |p: usize, dst: &mut [f32]| {
                let rows = &x[p * KB_MR * k_real..(p + 1) * KB_MR * k_real];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: lane-major tiles run only where AVX-512 is available (`kblocked`); the
                // rows hold 8 × k_real floats and the pack 8 × padded.
                unsafe {
                    super::x86::pack_x_lanes_avx512(rows, k_real, seg_len, padded / seg_len, dst)
                };
                #[cfg(not(target_arch = "x86_64"))]
                {
                    let _ = (rows, dst);
                    unreachable!("lane-major tiles run on AVX-512 only");
                }
            };
            be.run_chunks(pack.as_mut_slice(rows * padded), KB_MR * padded, one);
            pack
        })
    }
}

impl Drop for PaddedX<'_> {
    /// The x packs go back to this thread's spare for the next call's (the largest is kept: a
    /// layer's down projection packs 5.4 times the floats of the others).
    fn drop(&mut self) {
        for pack in [self.lane_pack.take(), self.kb_pack.take()].into_iter().flatten() {
            let keep = match SPARE_X_PACK.take() {
                Some(old) if old.buf.len() > pack.buf.len() => old,
                _ => pack,
            };
            SPARE_X_PACK.set(Some(keep));
        }
    }
}

impl<'x> PaddedX<'x> {
    pub(crate) fn new(be: &CpuBackend, x: &'x [f32], m: usize, k_real: usize, segs: SegmentRange) -> PaddedX<'x> {
        let padded = segs.padded_len();
        let isa = be.isa();
        let kblocked = cfg!(target_arch = "x86_64") && isa == Isa::Avx512 && m >= KB_MR;
        // Rows 0..m/8·8 are the K-blocked tiles' (every task's K-blocked rows start at a multiple
        // of 8 and stop at the last whole 8 of its block): they read x packed per tile instead.
        let kb_rows = if kblocked { m / KB_MR * KB_MR } else { 0 };
        // The other rows are read in place, padded (row `kb_rows + i` at `i · padded`): only
        // they, so a prefill does not allocate and fault in a padded copy it never reads.
        let mut xp = vec![0.0f32; (m - kb_rows) * padded];
        for (i, row) in xp.chunks_exact_mut(padded).enumerate() {
            row[..k_real].copy_from_slice(&x[(kb_rows + i) * k_real..][..k_real]);
        }
        let chunks = if kblocked { k_chunks(segs.count, segs.seg.seg_len) } else { Vec::new() };
        PaddedX {
            x,
            xp,
            kb_pack: OnceLock::new(),
            lane_pack: OnceLock::new(),
            m,
            k_real,
            padded,
            segs,
            isa,
            kblocked,
            chunks,
        }
    }
}

/// One invariant linear cut into tasks of `TASK_ROWS` rows × `task_cols` columns, each owning
/// its block of the output.
pub(crate) struct Job<'a> {
    x: &'a PaddedX<'a>,
    /// The packs of x the K-blocked or lane-major tiles read (built for this job if no job of
    /// the group built them yet).
    xpack: Option<&'a AlignedF32>,
    w: WeightView<'a>,
    segs: SegmentRange,
    out: SharedOut,
    task_cols: usize,
    col_blocks: usize,
    row_blocks: usize,
    tasks: usize,
    /// Lane-major tiles (see the module comment): tasks then run in pairs of column blocks
    /// ([`Job::lane_task`]), so a thread's consecutive tasks mostly share its two packed panels.
    lanes: bool,
    id: u64,
}

impl<'a> Job<'a> {
    /// `y = x · Wᵀ` for `x` prepared for `w`'s columns and `segs`.
    pub(crate) fn new(
        be: &CpuBackend,
        x: &'a PaddedX<'a>,
        w: WeightView<'a>,
        segs: SegmentRange,
        y: &mut [f32],
    ) -> Job<'a> {
        assert_eq!(x.k_real, w.cols, "x prepared for another K");
        let task_cols = if x.kblocked { KB_TASK_COLS } else { TASK_COLS };
        let col_blocks = w.rows.div_ceil(task_cols);
        let row_blocks = x.m.div_ceil(TASK_ROWS);
        let tasks = row_blocks * col_blocks;
        let lanes = x.kblocked && segs.seg.seg_len <= LM_MAX_SEG && takes_lane_major(x.m, x.padded, w.dtype);
        let id = NEXT_JOB_ID.fetch_add(1, Relaxed);
        let xpack = match (lanes, x.kblocked) {
            (true, _) => Some(x.lane_pack(be)),
            (false, true) => Some(x.kb_pack(be)),
            (false, false) => None,
        };
        Job { x, xpack, w, segs, out: SharedOut(y.as_mut_ptr()), task_cols, col_blocks, row_blocks, tasks, lanes, id }
    }

    pub(crate) fn tasks(&self) -> usize {
        self.tasks
    }

    /// Task `t`: rows of block `t / col_blocks` × columns of block `t % col_blocks` (lane-major:
    /// see [`Job::lane_task`]).
    pub(crate) fn run(&self, t: usize) {
        let Job { x: px, w, segs, out, task_cols, col_blocks, .. } = *self;
        let (m, n, k_real, padded, isa) = (px.m, w.rows, px.k_real, px.padded, px.isa);
        // (MR, NR) of the multi-row tile and NR of the single-row tile, per ISA.
        let (mr, nr, nr1) = match isa {
            Isa::Avx512 => (4, 4, 16),
            Isa::Avx2 => (1, 4, 4),
            Isa::Scalar => (1, 1, 1),
        };
        let row_bytes = w.row_bytes();
        let wbase = w.bytes.as_ptr();
        let ((rb, cb), place) = if self.lanes { self.lane_task(t) } else { ((t / col_blocks, t % col_blocks), (0, 1)) };
        let (r0, r1) = (rb * TASK_ROWS, ((rb + 1) * TASK_ROWS).min(m));
        let (c0, c1) = (cb * task_cols, ((cb + 1) * task_cols).min(n));
        // Rows past the packed ones (every row this reaches is: see `PaddedX::new`).
        let xrow = |i: usize| px.xp.as_ptr().wrapping_add((i - px.kb_rows()) * padded);
        // Past the last real column, tiles read the last row again and drop the results.
        let wrow = |j: usize| wbase.wrapping_add(j.min(n - 1) * row_bytes);
        // The bytes of weight rows `first..first + rows` (clamped to W): contiguous in row-major W.
        let next_rows = |first: usize, rows: usize| -> &[u8] {
            let (a, b) = (first.min(n), (first + rows).min(n));
            &w.bytes[a * row_bytes..b * row_bytes]
        };
        let mut res = [0.0f32; 16];
        let kb_end = if px.kblocked { r0 + (r1 - r0) / KB_MR * KB_MR } else { r0 };
        if kb_end > r0 {
            let kb =
                KTiles { dtype: w.dtype, k_real, seg_len: segs.seg.seg_len, count: segs.count, chunks: &px.chunks };
            let xpack = self.xpack.expect("K-blocked rows read packed x").as_ptr();
            let xtile = |rt: usize| xpack.wrapping_add(rt * KB_MR * padded);
            // Output row `r`; the task writes only its columns c0..c1 of it (blocks are disjoint).
            let yrow = |r: usize| out.0.wrapping_add(r * n);
            if self.lanes {
                self.run_lanes((cb, place), r0..kb_end, c0..c1, xtile, wrow, yrow);
            } else {
                kb.run(r0..kb_end, c0..c1, xtile, wrow, yrow);
            }
        }
        let multi_end = if mr > 1 { kb_end + (r1 - kb_end) / mr * mr } else { kb_end };
        for rq in (kb_end..multi_end).step_by(mr) {
            for cq in (c0..c1).step_by(nr) {
                let mut xs = [std::ptr::null(); 4];
                let mut ws = [std::ptr::null(); 16];
                (0..mr).for_each(|i| xs[i] = xrow(rq + i));
                (0..nr).for_each(|j| ws[j] = wrow(cq + j));
                // The first row quad meets each weight row first: prefetch the next quad's rows.
                let prefetch = if rq == kb_end { next_rows(cq + nr, nr) } else { &[][..] };
                run_tile(
                    isa,
                    &Tile {
                        xs: &xs[..mr],
                        ws: &ws[..nr],
                        dtype: w.dtype,
                        k_real,
                        seg_len: segs.seg.seg_len,
                        count: segs.count,
                        prefetch,
                    },
                    &mut res,
                );
                for i in 0..mr {
                    for j in 0..nr.min(c1 - cq) {
                        // SAFETY: (rq+i, cq+j) is inside this task's block; blocks are disjoint.
                        unsafe { *out.0.add((rq + i) * n + cq + j) = res[i * nr + j] };
                    }
                }
            }
        }
        for r in multi_end..r1 {
            for cq in (c0..c1).step_by(nr1) {
                let xs = [xrow(r)];
                let mut ws = [std::ptr::null(); 16];
                (0..nr1).for_each(|j| ws[j] = wrow(cq + j));
                let prefetch = next_rows(cq + nr1, nr1);
                run_tile(
                    isa,
                    &Tile {
                        xs: &xs,
                        ws: &ws[..nr1],
                        dtype: w.dtype,
                        k_real,
                        seg_len: segs.seg.seg_len,
                        count: segs.count,
                        prefetch,
                    },
                    &mut res,
                );
                for j in 0..nr1.min(c1 - cq) {
                    // SAFETY: as above.
                    unsafe { *out.0.add(r * n + cq + j) = res[j] };
                }
            }
        }
    }
}

impl Job<'_> {
    /// Lane-major task `t`'s (row block, column block), and its place among the tasks of its pair
    /// of column blocks with their count: pairs run one after the other, and within a pair a row
    /// block meets both column blocks in turn, so its x is read from memory once per pair and
    /// from L2 the second time.
    fn lane_task(&self, t: usize) -> ((usize, usize), (usize, usize)) {
        let (rbs, cbs) = (self.row_blocks, self.col_blocks);
        let paired = cbs / LANE_PAIR * LANE_PAIR * rbs;
        if t < paired {
            let (pair, r) = (t / (LANE_PAIR * rbs), t % (LANE_PAIR * rbs));
            ((r / LANE_PAIR, pair * LANE_PAIR + r % LANE_PAIR), (r, LANE_PAIR * rbs))
        } else {
            ((t - paired, cbs - 1), (t - paired, rbs))
        }
    }

    /// Rows `rows` (a multiple of [`KB_MR`]) by columns `cols` (column block `cb`, the task's
    /// `place` among the `tasks` of its pair) in lane-major tiles: the block's weight panel is
    /// packed unless this thread holds it, then the tiles run the whole segment range, the last
    /// segment's last lane group storing the outputs.
    #[cfg(target_arch = "x86_64")]
    fn run_lanes(
        &self,
        (cb, (place, tasks)): (usize, (usize, usize)),
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        xtile: impl Fn(usize) -> *const f32,
        wrow: impl Fn(usize) -> *const u8,
        yrow: impl Fn(usize) -> *mut f32,
    ) {
        use super::x86::{lanes_avx512, lm_state_floats, pack_lanes_avx512, LaneBlock, LM_NR};
        let (seg_len, count) = (self.segs.seg.seg_len, self.segs.count);
        LANE_BUFS.with_borrow_mut(|bufs| {
            let aligned = |v: &mut Vec<f32>, floats: usize| {
                if v.len() < floats + 16 {
                    v.resize(floats + 16, 0.0);
                }
                let p = v.as_mut_ptr();
                p.wrapping_add(p.align_offset(64))
            };
            let slot = cb % LANE_PAIR;
            let panel = aligned(&mut bufs.panels[slot], count * seg_len * LM_NR);
            if bufs.packed[slot] != Some((self.id, cb)) {
                let ws: [*const u8; LM_NR] = std::array::from_fn(|j| wrow(cols.start + j));
                // SAFETY: only an ISA that `Isa::is_available` confirmed runs (the caller checked
                // AVX-512); rows are clamped weight rows; the panel holds count × seg_len × 48 floats.
                unsafe { pack_lanes_avx512(self.w.dtype, &ws, self.x.k_real, seg_len, count, panel) };
                bufs.packed[slot] = Some((self.id, cb));
            }
            // This task's share of the next pair's weight rows (contiguous in W), fetched into L2
            // while it computes: the panels of that pair are packed from them next, and the
            // packing would otherwise wait on memory for every line.
            let row_bytes = self.w.row_bytes();
            let first = (cb / LANE_PAIR + 1) * LANE_PAIR * LM_NR;
            let (n0, n1) = (first.min(self.w.rows), (first + LANE_PAIR * LM_NR).min(self.w.rows));
            let next = &self.w.bytes[n0 * row_bytes..n1 * row_bytes];
            let share = next.len().div_ceil(tasks);
            let prefetch = next.get(place * share..((place + 1) * share).min(next.len())).unwrap_or(&[]);
            let block = LaneBlock {
                x: xtile(rows.start / KB_MR),
                padded: self.x.padded,
                rows: rows.len(),
                panel,
                seg_len,
                count,
                state: aligned(&mut bufs.scratch, lm_state_floats(rows.len())),
                y: yrow(rows.start).wrapping_add(cols.start),
                n: self.w.rows,
                cols: cols.len(),
                prefetch,
            };
            // SAFETY: as above; x holds the block's packed rows, and output rows `rows` hold
            // columns `cols`, which belong to this task alone.
            unsafe { lanes_avx512(&block) };
        });
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run_lanes(
        &self,
        _task: (usize, (usize, usize)),
        _rows: std::ops::Range<usize>,
        _cols: std::ops::Range<usize>,
        _xtile: impl Fn(usize) -> *const f32,
        _wrow: impl Fn(usize) -> *const u8,
        _yrow: impl Fn(usize) -> *mut f32,
    ) {
        unreachable!("lane-major tiles run on AVX-512 only")
    }
}

pub(crate) fn linear_invariant(
    be: &CpuBackend,
    x: &[f32],
    m: usize,
    w: WeightView<'_>,
    segs: SegmentRange,
    y: &mut [f32],
) {
    if m == 0 || w.rows == 0 {
        return;
    }
    let px = PaddedX::new(be, x, m, w.cols, segs);
    let job = Job::new(be, &px, w, segs, y);
    be.run_tasks(job.tasks(), |t| job.run(t));
}

/// The K-blocked tiles of one task (see the module comment).
struct KTiles<'a> {
    dtype: DType,
    k_real: usize,
    seg_len: usize,
    count: usize,
    chunks: &'a [ChunkSpan],
}

#[cfg(target_arch = "x86_64")]
use super::x86::{KB_ACC_FLOATS, KB_MR, KB_NR, KB_STACK_FLOATS, KB_STATE_FLOATS, LM_MAX_SEG};
#[cfg(not(target_arch = "x86_64"))]
const KB_MR: usize = usize::MAX;
#[cfg(not(target_arch = "x86_64"))]
const LM_MAX_SEG: usize = 0;

impl KTiles<'_> {
    /// Rows `rows` (a multiple of [`KB_MR`]) by columns `cols`; `xtile(row / 8)` is the packed x
    /// of 8 rows (see `KChunk::x`) and `yrow(row)` the output row, of which only columns `cols`
    /// are written. Past the last real column, tiles read the last row again (`wrow` clamps) and
    /// drop the results.
    #[cfg(target_arch = "x86_64")]
    fn run(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        xtile: impl Fn(usize) -> *const f32,
        wrow: impl Fn(usize) -> *const u8,
        yrow: impl Fn(usize) -> *mut f32,
    ) {
        use super::x86::{kchunk_avx512, KChunk};
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        let tiles_r = rows.len() / KB_MR;
        let tiles_c = cols.len().div_ceil(KB_NR);
        let ws: Vec<[*const u8; KB_NR]> =
            (0..tiles_c).map(|ct| std::array::from_fn(|j| wrow(cols.start + ct * KB_NR + j))).collect();
        KB_STATES.with_borrow_mut(|states| {
            let need = tiles_r * tiles_c * KB_STATE_FLOATS;
            if states.len() < need {
                states.resize(need, 0.0);
            }
            let base = states.as_mut_ptr();
            let chunk = |rt: usize, ct: usize, span: &ChunkSpan, prefetch: bool| {
                let c = KChunk {
                    x: xtile(rows.start / KB_MR + rt),
                    ws: &ws[ct],
                    dtype: self.dtype,
                    k_real: self.k_real,
                    begin: span.begin,
                    end: span.end,
                    seg_len: self.seg_len,
                    // SAFETY: tile (rt, ct) owns floats [tile · KB_STATE_FLOATS, +KB_STATE_FLOATS).
                    state: unsafe { base.add((rt * tiles_c + ct) * KB_STATE_FLOATS) },
                    // The next column tile reads these columns next (its rows, clamped to W).
                    prefetch: (prefetch && ct + 1 < tiles_c).then(|| &ws[ct + 1]),
                };
                // SAFETY: only an ISA that `Isa::is_available` confirmed runs (the caller checked
                // AVX-512); rows are padded x rows and clamped weight rows; state is this tile's.
                unsafe { kchunk_avx512(&c) }
            };
            // The output lines of row block `rt`, fetched for writing while its last chunk
            // computes: a store that misses the cache would otherwise stall the write-out below
            // (a task's rows lie n floats apart, so each one starts new lines).
            let prefetch_out = |rt: usize| {
                for r in rows.start + rt * KB_MR..rows.start + (rt + 1) * KB_MR {
                    let line = yrow(r).wrapping_add(cols.start);
                    for off in (0..cols.len()).step_by(16) {
                        // SAFETY: a prefetch never faults; the address lies inside row r anyway.
                        unsafe { _mm_prefetch::<_MM_HINT_ET0>(line.wrapping_add(off) as *const i8) };
                    }
                    // SAFETY: as above (the block's last column).
                    unsafe { _mm_prefetch::<_MM_HINT_ET0>(line.wrapping_add(cols.len() - 1) as *const i8) };
                }
            };
            let last = self.chunks.len() - 1;
            if tiles_r == 1 {
                // One row block: nothing to share between column tiles, so each tile runs its
                // whole K at once and streams its weight rows front to back.
                prefetch_out(0);
                for ct in 0..tiles_c {
                    self.chunks.iter().for_each(|span| chunk(0, ct, span, true));
                }
            } else {
                for (i, span) in self.chunks.iter().enumerate() {
                    for rt in 0..tiles_r {
                        if i == last {
                            prefetch_out(rt);
                        }
                        // The first row block meets each weight chunk first: it prefetches.
                        (0..tiles_c).for_each(|ct| chunk(rt, ct, span, rt == 0));
                    }
                }
            }
            // The stack holds one finished run per binary digit of the count, largest first;
            // they are added left to right, as `reference::tree_reduce` does. Row by row, so each
            // output row's columns are stored in order.
            let runs = self.count.count_ones() as usize;
            for rt in 0..tiles_r {
                for i in 0..KB_MR {
                    let y = yrow(rows.start + rt * KB_MR + i);
                    for ct in 0..tiles_c {
                        let stack = &states[(rt * tiles_c + ct) * KB_STATE_FLOATS + KB_ACC_FLOATS..];
                        for j in 0..KB_NR {
                            let (col, o) = (cols.start + ct * KB_NR + j, i * KB_NR + j);
                            if col < cols.end {
                                let total = (1..runs).fold(stack[o], |t, d| t + stack[d * KB_STACK_FLOATS + o]);
                                // SAFETY: (row, col) is inside this task's block; blocks are disjoint.
                                unsafe { *y.add(col) = total };
                            }
                        }
                    }
                }
            }
        });
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run(
        &self,
        _rows: std::ops::Range<usize>,
        _cols: std::ops::Range<usize>,
        _xtile: impl Fn(usize) -> *const f32,
        _wrow: impl Fn(usize) -> *const u8,
        _yrow: impl Fn(usize) -> *mut f32,
    ) {
        unreachable!("K-blocked tiles run on AVX-512 only")
    }
}

fn run_tile(isa: Isa, t: &Tile<'_>, out: &mut [f32; 16]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the backend only selects an ISA that `Isa::is_available` confirmed.
        Isa::Avx512 => unsafe { super::x86::tile_avx512(t, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { super::x86::tile_avx2(t, out) },
        _ => tile_scalar(t, out),
    }
}

/// The portable lane loop: one output at a time, 16 accumulators in an array.
fn tile_scalar(t: &Tile<'_>, out: &mut [f32; 16]) {
    let row_bytes = t.dtype.row_bytes(t.k_real).expect("a weight row is whole blocks");
    for (i, &xp) in t.xs.iter().enumerate() {
        for (j, &wp) in t.ws.iter().enumerate() {
            // SAFETY: a w row holds k_real weights in `row_bytes` bytes.
            let row = unsafe { std::slice::from_raw_parts(wp, row_bytes) };
            let mut sums = [0.0f32; 64];
            for (s, sum) in sums.iter_mut().enumerate().take(t.count) {
                let mut acc = [0.0f32; LANES];
                for e in s * t.seg_len..(s + 1) * t.seg_len {
                    // SAFETY: x rows are padded to count × seg_len elements, and e < count × seg_len.
                    let xv = unsafe { *xp.add(e) };
                    let wv = if e < t.k_real { t.dtype.widen_at(row, e) } else { 0.0 };
                    acc[e % LANES] = xv.mul_add(wv, acc[e % LANES]);
                }
                *sum = lane_tree(acc);
            }
            out[i * t.ws.len() + j] = segment_tree_inplace(&mut sums[..t.count]);
        }
    }
}

/// The canonical segment tree, in place (no allocation on the hot path).
#[inline(always)]
pub(crate) fn segment_tree_inplace(v: &mut [f32]) -> f32 {
    crate::reference::tree_reduce(v, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::splitmix::SplitMix64;
    use crate::{reference, Backend, CpuConfig, HostWeight, KernelMode, NumericsConfig};

    /// K chunks that hold several short segments — in groups of unequal size, with the real row
    /// ending inside the last segment — and the row-by-row write-out of finished tiles leave every
    /// output bit the reference's, for one row block and for several.
    #[test]
    fn k_blocked_grouped_segments_equal_reference() {
        let spans = |count, seg_len| k_chunks(count, seg_len).iter().map(|s| (s.begin, s.end)).collect::<Vec<_>>();
        assert_eq!(spans(3, 320), [(0, 640), (640, 960)]);
        assert_eq!(spans(8, 112), [(0, 448), (448, 896)]);
        assert_eq!(spans(1, 1408), [(0, 480), (480, 960), (960, 1408)]);
        if !Isa::Avx512.is_available() {
            eprintln!("SKIPPED k_blocked_grouped_segments_equal_reference: no AVX-512 on this CPU");
            return;
        }
        let mut rng = SplitMix64::new(7);
        // (m, k, n, S): seg_len 320 in groups of 2 + 1; 128 in groups of 4 with k ending at 1000.
        for (m, k, n, segments) in [(16, 960, 50, 3), (9, 1000, 7, 8), (72, 1000, 97, 8)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.unit_f64() as f32 * 2.0 - 1.0).collect();
            let vals: Vec<f32> = (0..n * k).map(|_| rng.unit_f64() as f32 * 2.0 - 1.0).collect();
            for dtype in [DType::F32, DType::Bf16] {
                let w = HostWeight::from_f32(&vals, dtype, n, k);
                let want: Vec<u32> =
                    reference::linear(&x, m, w.view(), None, segments).iter().map(|v| v.to_bits()).collect();
                let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
                for threads in [1, 2] {
                    let config = CpuConfig { threads, isa: Some(Isa::Avx512), mode: KernelMode::Invariant, numerics };
                    let be = CpuBackend::new(config).unwrap();
                    let mut y = vec![0.0; m * n];
                    be.linear(&x, m, &w, None, &mut y);
                    let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "m={m} k={k} n={n} S={segments} {dtype:?} threads={threads}");
                }
            }
        }
    }
}
