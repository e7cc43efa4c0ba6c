//! Shapes and views shared by every backend.

use std::ops::Range;
use std::sync::{Arc, OnceLock};

use crate::{KernelError, LANES, QUANT_BLOCK};

/// Storage type of a weight tensor.
///
/// `F32`, `Bf16` and `F16` are element types: widening to f32 is exact. `Q8_0`, `Q4_0` and `Q4_1`
/// are GGUF block types ([`crate::quant`]): a row is a run of blocks of [`QUANT_BLOCK`] weights,
/// kept as stored, and every kernel widens each weight by the one formula of [`crate::quant`]
/// (candle's dequantization, bit for bit) before it enters the dot product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl DType {
    /// Bytes of one element of an element type.
    ///
    /// # Panics
    /// For a block type, which has no per-element size: use [`DType::row_bytes`].
    pub fn size(self) -> usize {
        assert_eq!(self.block_len(), 1, "{self:?} is a block type: use DType::row_bytes");
        self.block_bytes()
    }
    /// Weights per storage block: 1 for element types, [`QUANT_BLOCK`] for block types.
    pub fn block_len(self) -> usize {
        if self.is_quantized() {
            QUANT_BLOCK
        } else {
            1
        }
    }
    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
            DType::Q8_0 => crate::quant::Q8_0_BYTES,
            DType::Q4_0 => crate::quant::Q4_0_BYTES,
            DType::Q4_1 => crate::quant::Q4_1_BYTES,
        }
    }
    pub fn is_quantized(self) -> bool {
        matches!(self, DType::Q8_0 | DType::Q4_0 | DType::Q4_1)
    }
    /// Bytes of a row of `cols` weights, or `None` when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_len()).then(|| cols / self.block_len() * self.block_bytes())
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }
    /// The safetensors dtype tag (`F32`, `BF16`, `F16`), if supported.
    pub fn from_safetensors(tag: &str) -> Option<DType> {
        match tag {
            "F32" => Some(DType::F32),
            "BF16" => Some(DType::Bf16),
            "F16" => Some(DType::F16),
            _ => None,
        }
    }
    /// The safetensors tag of an element type; the GGUF type name (`Q8_0`, …) of a block type,
    /// which safetensors cannot hold.
    pub fn safetensors_tag(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
            DType::F16 => "F16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_1 => "Q4_1",
        }
    }
    /// Exact widening of one little-endian element of an element type.
    ///
    /// # Panics
    /// For a block type (an element needs its block's scale): use [`DType::widen_at`].
    #[inline]
    pub fn widen(self, b: &[u8]) -> f32 {
        match self {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => panic!("{self:?} is a block type: use DType::widen_at"),
        }
    }
    /// Weight `e` of `row` (a run of whole blocks, starting at a block boundary) widened to f32:
    /// exactly for element types, by the [`crate::quant`] formula for block types.
    #[inline]
    pub fn widen_at(self, row: &[u8], e: usize) -> f32 {
        use crate::quant;
        match self {
            DType::F32 | DType::Bf16 | DType::F16 => {
                let s = self.block_bytes();
                self.widen(&row[e * s..(e + 1) * s])
            }
            DType::Q8_0 => quant::widen_q8_0(quant::block(row, e, quant::Q8_0_BYTES), e % QUANT_BLOCK),
            DType::Q4_0 => quant::widen_q4_0(quant::block(row, e, quant::Q4_0_BYTES), e % QUANT_BLOCK),
            DType::Q4_1 => quant::widen_q4_1(quant::block(row, e, quant::Q4_1_BYTES), e % QUANT_BLOCK),
        }
    }
    /// Round an f32 to an element type (round to nearest even) and append its little-endian bytes.
    ///
    /// # Panics
    /// For a block type: quantizing is the model writer's business, not the kernels'.
    pub fn push_from_f32(self, x: f32, out: &mut Vec<u8>) {
        match self {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                panic!("{self:?} is a block type: it cannot be written per element")
            }
        }
    }
}

/// A row-major `[rows, cols]` matrix of `dtype` weights in little-endian bytes (no alignment
/// requirement: memory-mapped safetensors or GGUF data is used in place). A row of a block type
/// is `cols / 32` whole blocks.
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> WeightView<'a> {
    pub fn new(dtype: DType, bytes: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let row_bytes = dtype.row_bytes(cols).ok_or(KernelError::PartialBlock { cols, dtype })?;
        let need = rows * row_bytes;
        if bytes.len() != need {
            return Err(KernelError::WeightSize { rows, cols, dtype, got: bytes.len(), need });
        }
        Ok(WeightView { dtype, bytes, rows, cols })
    }
    /// Bytes of one row.
    #[inline]
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_len() * self.dtype.block_bytes()
    }
    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let w = self.row_bytes();
        &self.bytes[r * w..(r + 1) * w]
    }
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> f32 {
        self.dtype.widen_at(self.row(r), c)
    }
    /// The weights as the f32 values they are, in place: `None` unless the type is f32 and the
    /// bytes are 4-byte aligned (then callers widen a copy instead).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        // SAFETY: every bit pattern is a valid f32, and `align_to` hands out only the aligned middle.
        match (self.dtype, unsafe { self.bytes.align_to::<f32>() }) {
            (DType::F32, ([], values, [])) => Some(values),
            _ => None,
        }
    }
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        self.widen_rows_into(0..self.rows, &mut out);
        out
    }
    /// Append rows `rows` widened to f32: [`Self::get`]'s values, one loop per element type (the
    /// match stays outside it) so the compiler vectorizes the conversions.
    pub fn widen_rows_into(&self, rows: std::ops::Range<usize>, out: &mut Vec<f32>) {
        let bytes = &self.bytes[rows.start * self.row_bytes()..rows.end * self.row_bytes()];
        match self.dtype {
            DType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            DType::Bf16 => out
                .extend(bytes.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))),
            DType::F16 => out
                .extend(bytes.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())),
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => {
                out.extend(rows.flat_map(|r| (0..self.cols).map(move |c| self.get(r, c))))
            }
        }
    }
}

/// Bytes owned by something shared (a memory map, a `Vec`), addressed by a range.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
    /// The bytes are a read-only map of a file: their resident pages may be dropped at any time
    /// and are read back from the file when next touched.
    file_mapped: bool,
}

impl SharedBytes {
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Self {
        assert!(range.end <= (*owner).as_ref().len(), "SharedBytes range out of bounds");
        SharedBytes { owner, range, file_mapped: false }
    }
    /// Bytes of a read-only memory map of a file (the owner must be one: see
    /// [`Self::release_resident`]).
    pub fn file_mapped(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Self {
        SharedBytes { file_mapped: true, ..Self::new(owner, range) }
    }
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        SharedBytes { owner: Arc::new(v), range: 0..len, file_mapped: false }
    }
    /// Drop this process's resident pages of file-mapped bytes that a kernel has copied into a
    /// layout of its own (`MADV_DONTNEED` on the whole pages inside the range): the copy is what
    /// runs, and counting both would double the weights' RSS. Later reads (an embedding lookup
    /// of a tied lm-head) fault the pages back from the file. A no-op for bytes in memory.
    pub fn release_resident(&self) {
        #[cfg(target_os = "linux")]
        if self.file_mapped {
            // SAFETY: the range lies inside a read-only file mapping that stays mapped (the owner
            // lives); MADV_DONTNEED there only drops page-table entries, and the contents read
            // back are the file's, unchanged.
            unsafe { advise_whole_pages(self.as_slice().as_ptr(), self.len(), libc::MADV_DONTNEED) };
        }
    }
    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }
    pub fn len(&self) -> usize {
        self.range.len()
    }
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// `madvise(advice)` over the whole 4 KiB pages inside `[base, base + len)` (a partial page at
/// either end is shared with other data and left alone).
///
/// # Safety
/// The range is mapped memory this process owns, and `advice` is harmless to its contents there.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn advise_whole_pages(base: *const u8, len: usize, advice: libc::c_int) {
    const PAGE: usize = 4096;
    let (start, end) = ((base as usize).next_multiple_of(PAGE), (base as usize + len) / PAGE * PAGE);
    if start < end {
        libc::madvise(start as *mut libc::c_void, end - start, advice);
    }
}

/// A weight matrix in host memory, as loaded (dtype kept as stored).
#[derive(Clone)]
pub struct HostWeight {
    pub dtype: DType,
    pub bytes: SharedBytes,
    pub rows: usize,
    pub cols: usize,
    /// The weight packed for a CPU native class's linear (AVX512-BF16 panels or AMX B tiles),
    /// made at its first such call and shared by clones (a tied embedding and lm-head pack once).
    /// Empty in every other mode.
    pub(crate) native_packed: Arc<OnceLock<crate::cpu::NativePacked>>,
}

impl HostWeight {
    pub fn new(dtype: DType, bytes: SharedBytes, rows: usize, cols: usize) -> Result<Self, KernelError> {
        WeightView::new(dtype, bytes.as_slice(), rows, cols)?;
        Ok(HostWeight { dtype, bytes, rows, cols, native_packed: Arc::default() })
    }
    /// Build from f32 values, rounding to `dtype` (an element type; panics for a block type).
    pub fn from_f32(values: &[f32], dtype: DType, rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols);
        let mut bytes = Vec::with_capacity(values.len() * dtype.block_bytes());
        for &x in values {
            dtype.push_from_f32(x, &mut bytes);
        }
        HostWeight { dtype, bytes: SharedBytes::from_vec(bytes), rows, cols, native_packed: Arc::default() }
    }
    pub fn view(&self) -> WeightView<'_> {
        WeightView { dtype: self.dtype, bytes: self.bytes.as_slice(), rows: self.rows, cols: self.cols }
    }
    /// Columns `cols` of every row, copied (a row-parallel shard). For a block type the range
    /// must fall on block boundaries: a shard holds whole blocks, never a cut one.
    pub fn columns(&self, cols: Range<usize>) -> Result<HostWeight, KernelError> {
        let block = self.dtype.block_len();
        let aligned = cols.start.is_multiple_of(block) && cols.end.is_multiple_of(block);
        if cols.start > cols.end || cols.end > self.cols || !aligned {
            return Err(KernelError::BadColumns {
                start: cols.start,
                end: cols.end,
                cols: self.cols,
                dtype: self.dtype,
            });
        }
        let view = self.view();
        let (from, to) = (cols.start / block * self.dtype.block_bytes(), cols.end / block * self.dtype.block_bytes());
        let mut out = Vec::with_capacity(self.rows * (to - from));
        for r in 0..self.rows {
            out.extend_from_slice(&view.row(r)[from..to]);
        }
        HostWeight::new(self.dtype, SharedBytes::from_vec(out), self.rows, cols.len())
    }
}

/// Whether `n` may be a segment count: `2^k` or `3·2^k`, at most 64. The segment tree over such a
/// count is [`crate::reference::segment_tree`]: balanced pairs for `2^k`; for `3·2^k` the first
/// two thirds as one balanced tree, the last third as another, then one add — so the three
/// thirds are subtrees and three ranks can each hold one.
pub fn is_segment_count(n: usize) -> bool {
    let odd = n >> n.trailing_zeros().min(usize::BITS - 1);
    (1..=64).contains(&n) && (odd == 1 || odd == 3)
}

/// The canonical cut of a reduction of length `len` into `segments` equal segments of `seg_len`
/// elements (`seg_len` a multiple of [`LANES`]; the tail past `len` is zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Segmentation {
    pub len: usize,
    pub segments: usize,
    pub seg_len: usize,
}

impl Segmentation {
    pub fn new(len: usize, segments: usize) -> Result<Self, KernelError> {
        if !is_segment_count(segments) {
            return Err(KernelError::BadSegments(segments));
        }
        let unit = segments * LANES;
        let padded = len.div_ceil(unit).max(1) * unit;
        Ok(Segmentation { len, segments, seg_len: padded / segments })
    }
    pub fn padded_len(&self) -> usize {
        self.seg_len * self.segments
    }
    pub fn full(&self) -> SegmentRange {
        SegmentRange { seg: *self, first: 0, count: self.segments }
    }
    /// The segments held by `rank` of `t`: `segments / t` of them, which must be a subtree
    /// (`t = 1`, or `segments / t` a power of two — so `t ∈ {1, 2, 4, …}` for `S = 2^k` and
    /// `t ∈ {1, 3, 6, …}` for `S = 3·2^k`).
    pub fn shard(&self, rank: usize, t: usize) -> Result<SegmentRange, KernelError> {
        if t == 0 || !self.segments.is_multiple_of(t) {
            return Err(KernelError::BadSegmentRange { first: 0, count: 0, segments: self.segments });
        }
        let count = self.segments / t;
        SegmentRange::new(*self, rank * count, count)
    }
    /// The tensor-parallel degrees whose row-parallel shards are subtrees of this segmentation.
    pub fn tp_degrees(segments: usize) -> Vec<usize> {
        (1..=segments).filter(|&t| segments.is_multiple_of(t) && (t == 1 || (segments / t).is_power_of_two())).collect()
    }
}

/// Segments `first..first + count` forming exactly one subtree of the segment tree: all of them,
/// or an aligned power-of-two run (which lies inside one balanced part of the tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SegmentRange {
    pub seg: Segmentation,
    pub first: usize,
    pub count: usize,
}

impl SegmentRange {
    pub fn new(seg: Segmentation, first: usize, count: usize) -> Result<Self, KernelError> {
        let whole = first == 0 && count == seg.segments;
        let aligned = count.is_power_of_two() && first.is_multiple_of(count) && first + count <= seg.segments;
        if !(whole || aligned) {
            return Err(KernelError::BadSegmentRange { first, count, segments: seg.segments });
        }
        Ok(SegmentRange { seg, first, count })
    }
    /// The real (unpadded) indices of the full reduction covered by this range.
    pub fn real_range(&self) -> Range<usize> {
        let start = (self.first * self.seg.seg_len).min(self.seg.len);
        let end = ((self.first + self.count) * self.seg.seg_len).min(self.seg.len);
        start..end
    }
    /// Padded length covered (`count × seg_len`).
    pub fn padded_len(&self) -> usize {
        self.count * self.seg.seg_len
    }
}

/// Geometry of one layer's paged KV cache. Slot `s` (= block × block_size + offset) holds, for each
/// KV head, `head_dim` floats of K and of V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    pub fn slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
    pub fn row_width(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    pub fn floats(&self) -> usize {
        self.slots() * self.row_width()
    }
}

/// One sequence's part of an attention batch: `n_q` consecutive query rows starting at row
/// `q_row` of the batch, for positions `first_pos ..first_pos + n_q`. Keys for positions
/// `0..=first_pos + n_q - 1` must already be in the cache (the step writes its own K/V first).
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub block_table: &'a [u32],
    pub q_row: usize,
    pub n_q: usize,
    pub first_pos: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub kv_chunk: usize,
}

impl AttnParams {
    /// Softmax scale `1/sqrt(head_dim)`: computed in f64 (sqrt and division are correctly rounded)
    /// and rounded once to f32.
    pub fn scale(&self) -> f32 {
        (1.0f64 / (self.head_dim as f64).sqrt()) as f32
    }
}

/// The vocab rows a rank holds: ids `offset..offset + rows` of a vocabulary of `vocab` ids, which
/// is exactly the real part of `segs` (segments of the canonical vocab segmentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabShard {
    pub segs: SegmentRange,
    pub offset: usize,
    pub rows: usize,
}

impl VocabShard {
    pub fn new(segs: SegmentRange) -> Self {
        let r = segs.real_range();
        VocabShard { segs, offset: r.start, rows: r.len() }
    }
    pub fn full(vocab: usize, segments: usize) -> Result<Self, KernelError> {
        Ok(Self::new(Segmentation::new(vocab, segments)?.full()))
    }
}
