//! Shapes and views shared by every backend.

use std::ops::Range;
use std::sync::Arc;

use crate::{KernelError, LANES};

/// Storage type of a weight tensor. Widening to f32 is exact for all three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    Bf16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 | DType::F16 => 2,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
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
    pub fn safetensors_tag(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::Bf16 => "BF16",
            DType::F16 => "F16",
        }
    }
    /// Exact widening of one little-endian element.
    #[inline]
    pub fn widen(self, b: &[u8]) -> f32 {
        match self {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::Bf16 => f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16),
            DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        }
    }
    /// Round an f32 to this dtype (round to nearest even) and append its little-endian bytes.
    pub fn push_from_f32(self, x: f32, out: &mut Vec<u8>) {
        match self {
            DType::F32 => out.extend_from_slice(&x.to_le_bytes()),
            DType::Bf16 => out.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(x).to_bits().to_le_bytes()),
        }
    }
}

/// A row-major `[rows, cols]` matrix of `dtype` elements in little-endian bytes (no alignment
/// requirement: memory-mapped safetensors data is used in place).
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub dtype: DType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
}

impl<'a> WeightView<'a> {
    pub fn new(dtype: DType, bytes: &'a [u8], rows: usize, cols: usize) -> Result<Self, KernelError> {
        let need = rows * cols * dtype.size();
        if bytes.len() != need {
            return Err(KernelError::WeightSize { rows, cols, dtype, got: bytes.len(), need });
        }
        Ok(WeightView { dtype, bytes, rows, cols })
    }
    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let w = self.cols * self.dtype.size();
        &self.bytes[r * w..(r + 1) * w]
    }
    #[inline]
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let s = self.dtype.size();
        let o = (r * self.cols + c) * s;
        self.dtype.widen(&self.bytes[o..o + s])
    }
    pub fn to_f32(&self) -> Vec<f32> {
        let s = self.dtype.size();
        self.bytes.chunks_exact(s).map(|b| self.dtype.widen(b)).collect()
    }
}

/// Bytes owned by something shared (a memory map, a `Vec`), addressed by a range.
#[derive(Clone)]
pub struct SharedBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl SharedBytes {
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Self {
        assert!(range.end <= (*owner).as_ref().len(), "SharedBytes range out of bounds");
        SharedBytes { owner, range }
    }
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        SharedBytes { owner: Arc::new(v), range: 0..len }
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

/// A weight matrix in host memory, as loaded (dtype kept as stored).
#[derive(Clone)]
pub struct HostWeight {
    pub dtype: DType,
    pub bytes: SharedBytes,
    pub rows: usize,
    pub cols: usize,
}

impl HostWeight {
    pub fn new(dtype: DType, bytes: SharedBytes, rows: usize, cols: usize) -> Result<Self, KernelError> {
        WeightView::new(dtype, bytes.as_slice(), rows, cols)?;
        Ok(HostWeight { dtype, bytes, rows, cols })
    }
    /// Build from f32 values, rounding to `dtype`.
    pub fn from_f32(values: &[f32], dtype: DType, rows: usize, cols: usize) -> Self {
        assert_eq!(values.len(), rows * cols);
        let mut bytes = Vec::with_capacity(values.len() * dtype.size());
        for &x in values {
            dtype.push_from_f32(x, &mut bytes);
        }
        HostWeight { dtype, bytes: SharedBytes::from_vec(bytes), rows, cols }
    }
    pub fn view(&self) -> WeightView<'_> {
        WeightView { dtype: self.dtype, bytes: self.bytes.as_slice(), rows: self.rows, cols: self.cols }
    }
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
        if !segments.is_power_of_two() || segments > 64 {
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
    /// The segments held by `rank` of `t` (t a power of two dividing `segments`).
    pub fn shard(&self, rank: usize, t: usize) -> Result<SegmentRange, KernelError> {
        let count = self.segments.checked_div(t).unwrap_or(0);
        SegmentRange::new(*self, rank * count, count)
    }
}

/// A consecutive, aligned power-of-two run of segments: exactly one subtree of the segment tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SegmentRange {
    pub seg: Segmentation,
    pub first: usize,
    pub count: usize,
}

impl SegmentRange {
    pub fn new(seg: Segmentation, first: usize, count: usize) -> Result<Self, KernelError> {
        let ok = count.is_power_of_two()
            && count <= seg.segments
            && first.is_multiple_of(count)
            && first + count <= seg.segments;
        if !ok {
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
