//! GGUF block types kept as stored, and the one formula that widens each weight.
//!
//! A quantized matrix stays in its file's blocks in memory (a Q4 model is a quarter of its bf16
//! size, and a decode step streams every weight once, so bytes are time). Every kernel — the
//! scalar reference, each CPU ISA path, the CUDA kernels — widens a weight to f32 in registers by
//! the formula below and then runs the ordinary dot-product contract (lanes, segments, tree) on
//! it. The formula is candle-core's (and ggml's) dequantization, operation for operation, so a
//! lockstep matmul over a quantized matrix equals the same matmul over candle's dequantized f32
//! matrix bit for bit (`kernels/tests/contract.rs` checks it against candle itself):
//!
//! | type | block (32 weights) | weight `j` of the block |
//! | --- | --- | --- |
//! | Q8_0 | f16 `d`, 32 × i8 `q` | `f32(q[j]) · d` |
//! | Q4_0 | f16 `d`, 16 bytes `qs` | `f32(n − 8) · d` |
//! | Q4_1 | f16 `d`, f16 `m`, 16 bytes `qs` | `f32(n) · d + m` |
//!
//! with `n = qs[j] & 0xF` for `j < 16` and `n = qs[j − 16] >> 4` for `j ≥ 16` (the low nibbles
//! hold the first half of the block), `d` and `m` widened exactly from f16, the product rounded
//! to f32 and then, for Q4_1, one rounded add. In fact the product never rounds: an integer of at
//! most 8 bits times an f16 significand of 11 bits fits in f32's 24 (and f16's range sits well
//! inside f32's normal range), so Q8_0 and Q4_0 widen exactly and Q4_1's only rounding is the add
//! of `m` — which is why a fused `fma(n, d, m)` gives the same bits (the SIMD paths use it), and
//! why a kernel may look a 4-bit weight up in a per-block table of its 16 possible values instead
//! of computing it (the AVX-512 paths do, `cpu/x86.rs`): every route yields this one value.
//!
//! (That is the contract. Native mode, which promises bits of its own, multiplies the weights'
//! integers by int8-quantized activations instead and applies `d` and `m` per block:
//! [`crate::cpu::qdot`].)
//!
//! A row of `cols` weights is `cols / 32` whole blocks; a row-parallel shard holds whole blocks
//! ([`crate::HostWeight::columns`]), so its cuts must fall on multiples of 32.

/// Weights per block of Q8_0, Q4_0 and Q4_1 (ggml's `QK8_0 = QK4_0 = QK4_1`).
pub const QUANT_BLOCK: usize = 32;
/// Bytes per block: f16 scale + 32 signed bytes.
pub const Q8_0_BYTES: usize = 34;
/// Bytes per block: f16 scale + 32 nibbles.
pub const Q4_0_BYTES: usize = 18;
/// Bytes per block: f16 scale, f16 minimum + 32 nibbles.
pub const Q4_1_BYTES: usize = 20;

/// The block holding weight `e` of a row of blocks of `block_bytes` bytes.
#[inline(always)]
pub fn block(row: &[u8], e: usize, block_bytes: usize) -> &[u8] {
    let b = e / QUANT_BLOCK * block_bytes;
    &row[b..b + block_bytes]
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The 4-bit value of weight `j` (0..32) of a nibble array: low nibbles first, then high ones.
#[inline(always)]
pub fn nibble(qs: &[u8], j: usize) -> u8 {
    if j < QUANT_BLOCK / 2 {
        qs[j] & 0x0f
    } else {
        qs[j - QUANT_BLOCK / 2] >> 4
    }
}

/// Weight `j` of a Q8_0 block: `f32(q) · d`.
#[inline(always)]
pub fn widen_q8_0(block: &[u8], j: usize) -> f32 {
    (block[2 + j] as i8) as f32 * f16_at(block, 0)
}

/// Weight `j` of a Q4_0 block: `f32(n − 8) · d`.
#[inline(always)]
pub fn widen_q4_0(block: &[u8], j: usize) -> f32 {
    (nibble(&block[2..], j) as i32 - 8) as f32 * f16_at(block, 0)
}

/// Weight `j` of a Q4_1 block: `f32(n) · d + m`, product and sum each rounded.
#[inline(always)]
pub fn widen_q4_1(block: &[u8], j: usize) -> f32 {
    nibble(&block[4..], j) as f32 * f16_at(block, 0) + f16_at(block, 2)
}
