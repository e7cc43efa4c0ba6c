//! Contract tests: every backend path equals the scalar reference bit for bit, and no result bit
//! depends on the batch, the thread count, the ISA or the tensor-parallel split.
//! Comparisons are on `f32::to_bits`, never with a tolerance.

use lockstep_kernels::sampling::{gumbel, shard_sample};
use lockstep_kernels::{
    merge_shard_samples, reference, AttnParams, AttnSeq, Backend, CpuBackend, CpuConfig, DType, HostWeight, Isa,
    KernelMode, KvLayout, NumericsConfig, RopeConfig, RopeScaling, RopeTables, SampleRequest, SamplingParams,
    Segmentation, VocabShard,
};

mod common;
use common::{assert_rows_alone_equal_batched, columns_of, quant_weight, ContractData, Rng};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn backend(isa: Isa, threads: usize) -> CpuBackend {
    backend_with(isa, threads, NumericsConfig::default())
}

fn backend_with(isa: Isa, threads: usize, numerics: NumericsConfig) -> CpuBackend {
    CpuBackend::new(CpuConfig { threads, isa: Some(isa), mode: KernelMode::Invariant, numerics }).unwrap()
}

const DTYPES: [DType; 3] = [DType::F32, DType::Bf16, DType::F16];

fn weight(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> HostWeight {
    HostWeight::from_f32(&rng.vec(rows * cols), dtype, rows, cols)
}

/// `linear` on every ISA at each of `threads` gives the reference's bits (`m` rows, `n` outputs).
fn assert_linear_equals_reference(
    x: &[f32],
    m: usize,
    w: &HostWeight,
    n: usize,
    numerics: NumericsConfig,
    threads: impl IntoIterator<Item = usize> + Clone,
    case: &str,
) {
    let want = bits(&reference::linear(x, m, w.view(), None, numerics.reduce_segments));
    let x = x.to_vec();
    for isa in Isa::available() {
        for t in threads.clone() {
            let mut y = vec![0.0; m * n];
            backend_with(isa, t, numerics).linear(&x, m, w, None, &mut y);
            assert_eq!(bits(&y), want, "{isa:?} threads={t} {case}");
        }
    }
}

/// Rank `rank` of a `degree`-way row-parallel split of x (`m` rows) through a fresh weight of
/// `n` rows of `dtype` (a block type: the shard's columns must be whole blocks): its partial on
/// every ISA (2 threads) must equal the reference's bits.
#[allow(clippy::too_many_arguments)]
fn assert_rank_partial_equals_reference(
    rng: &mut Rng,
    x: &[f32],
    m: usize,
    n: usize,
    dtype: DType,
    numerics: NumericsConfig,
    (rank, degree): (usize, usize),
    case: &str,
) {
    let k = x.len() / m;
    let segs = Segmentation::new(k, numerics.reduce_segments).unwrap().shard(rank, degree).unwrap();
    let cols = segs.real_range();
    let w =
        if dtype.is_quantized() { quant_weight(rng, dtype, n, cols.len()) } else { weight(rng, dtype, n, cols.len()) };
    let xs = columns_of(x, k, cols);
    let want = bits(&reference::linear_partial(&xs, m, w.view(), segs));
    for isa in Isa::available() {
        let mut p = vec![0.0; m * n];
        backend_with(isa, 2, numerics).linear_partial(&xs, m, &w, segs, &mut p);
        assert_eq!(bits(&p), want, "{isa:?} partial rank {rank} of {degree} {case}");
    }
}

#[test]
fn every_isa_linear_equals_reference_on_random_shapes() {
    let mut rng = Rng::new(1);
    let available = Isa::available();
    eprintln!("ISA paths tested: {available:?}");
    for case in 0..40 {
        let m = 1 + rng.below(13);
        let k = 1 + rng.below(300);
        let n = 1 + rng.below(70);
        let segments = [1, 2, 3, 4, 6, 8, 12, 16, 24, 48][rng.below(10)];
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * k);
        let w = weight(&mut rng, dtype, n, k);
        let b = weight(&mut rng, dtype, 1, n);
        let want = bits(&reference::linear(&x, m, w.view(), Some(b.view()), segments));
        for &isa in &available {
            let be = backend_with(isa, 2, NumericsConfig { reduce_segments: segments, ..Default::default() });
            let mut y = vec![0.0; m * n];
            be.linear(&x, m, &w, Some(&b), &mut y);
            assert_eq!(bits(&y), want, "{isa:?} m={m} k={k} n={n} S={segments} {dtype:?}");
        }
    }
}

#[test]
fn every_isa_row_ops_equal_reference() {
    let mut rng = Rng::new(2);
    for case in 0..12 {
        let m = 1 + rng.below(9);
        let n = 1 + rng.below(200);
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * n);
        let g = rng.vec(m * n);
        let w = weight(&mut rng, dtype, 1, n);
        let norm = bits(&reference::rms_norm(&x, w.view(), 1e-5, 8));
        let swi = bits(&reference::swiglu(&x, &g));
        let ids: Vec<u32> = (0..m).map(|_| rng.below(7) as u32).collect();
        let table = weight(&mut rng, dtype, 7, n);
        let emb = bits(&reference::embedding(&ids, table.view()));
        for isa in Isa::available() {
            let be = backend(isa, 3);
            let mut o = vec![0.0; m * n];
            be.rms_norm(&x, &w, 1e-5, &mut o);
            assert_eq!(bits(&o), norm, "rms_norm {isa:?} n={n}");
            be.swiglu(&x, &g, &mut o);
            assert_eq!(bits(&o), swi, "swiglu {isa:?}");
            be.embedding(&ids, &table, &mut o);
            assert_eq!(bits(&o), emb, "embedding {isa:?}");
            let mut sum = x.clone();
            be.add_assign(&mut sum, &g);
            assert_eq!(bits(&sum), bits(&reference::add(&x, &g)));
        }
    }
}

#[test]
fn rope_matches_reference_and_hf_rotate_half() {
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
    let x = rng.vec(5 * 2 * 16);
    let pos = [0u32, 3, 17, 255, 299];
    let mut want = x.clone();
    reference::rope(&mut want, 2, &pos, &t);
    // Position 0 is the identity.
    assert_eq!(bits(&want[..32]), bits(&x[..32]));
    for isa in Isa::available() {
        let mut got = x.clone();
        backend(isa, 2).rope(&mut got, 2, &pos, &t);
        assert_eq!(bits(&got), bits(&want));
    }
}

#[test]
fn rows_are_identical_alone_and_inside_batches_of_1_to_64() {
    let mut rng = Rng::new(4);
    let (k, n) = (203, 37);
    for dtype in DTYPES {
        let w = weight(&mut rng, dtype, n, k);
        let x = rng.vec(64 * k);
        for isa in Isa::available() {
            assert_rows_alone_equal_batched(&backend(isa, 2), &w, &x, k, &format!("{isa:?} {dtype:?}"));
        }
    }
    // Row-wise ops and sampling.
    let be = backend(Isa::best(), 2);
    let hidden = 96;
    let nw = weight(&mut rng, DType::Bf16, 1, hidden);
    let x = rng.vec(64 * hidden);
    let shard = VocabShard::full(hidden, 8).unwrap();
    let req = |i: usize| SampleRequest {
        params: SamplingParams { temperature: 0.7, top_k: 5 * (i % 3) as u32, top_p: 0.9, seed: 11 },
        step: i as u64,
    };
    for m in [1, 2, 7, 31, 64] {
        let xs = x[..m * hidden].to_vec();
        let mut norm = vec![0.0; m * hidden];
        be.rms_norm(&xs, &nw, 1e-6, &mut norm);
        let mut sw = vec![0.0; m * hidden];
        be.swiglu(&xs, &norm, &mut sw);
        let reqs: Vec<SampleRequest> = (0..m).map(req).collect();
        let samples = be.sample_shard(&xs, shard, &reqs);
        for i in 0..m {
            let row = x[i * hidden..(i + 1) * hidden].to_vec();
            let mut n1 = vec![0.0; hidden];
            be.rms_norm(&row, &nw, 1e-6, &mut n1);
            assert_eq!(bits(&norm[i * hidden..(i + 1) * hidden]), bits(&n1));
            let mut s1 = vec![0.0; hidden];
            be.swiglu(&row, &n1, &mut s1);
            assert_eq!(bits(&sw[i * hidden..(i + 1) * hidden]), bits(&s1));
            assert_eq!(samples[i], be.sample_shard(&row, shard, &[req(i)])[0]);
        }
    }
}

/// Batches of 8 rows or more run K-blocked tiles on AVX-512 (below 64 rows — 32 for bf16/f16 at
/// K ≤ 2048, 16 for block types — or segments over 640 columns): a tile carries its lane accumulators across the chunks of a
/// long segment and its segment-tree stack across segments. Every output must still equal the
/// reference — for segments cut into chunks (seg_len > 640) and not, both segment-count
/// families, row-parallel subtrees, every storage type, and row counts that leave 4×4 and
/// single-row remainders and more than one 64-row task.
#[test]
fn k_blocked_tiles_equal_reference_across_chunked_segments_and_row_remainders() {
    let mut rng = Rng::new(31);
    // (m, k, n, S): 2016 at S = 1 is one 2016-column segment (four chunks), 1408 at S = 2 two of
    // 704 (two chunks each), 896 at S = 8 (Qwen2.5's hidden, one chunk per segment); 40 rows at
    // K = 2432 (bf16/f16 below 64 rows with K > 2048); 77 and 150 rows (more than one task) at
    // 704- and 2016-column segments, which lane-major tiles leave.
    let cases = [
        (8, 2016, 7, 1),
        (13, 1408, 10, 2),
        (15, 896, 50, 8),
        (29, 288, 23, 12),
        (31, 160, 5, 3),
        (40, 2432, 10, 8),
        (77, 1408, 23, 2),
        (150, 2016, 5, 1),
    ];
    let dtypes = [DType::F32, DType::Bf16, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1];
    for &(m, k, n, segments) in &cases {
        let x = rng.vec(m * k);
        for dtype in dtypes {
            let w =
                if dtype.is_quantized() { quant_weight(&mut rng, dtype, n, k) } else { weight(&mut rng, dtype, n, k) };
            let want = bits(&reference::linear(&x, m, w.view(), None, segments));
            let seg = Segmentation::new(k, segments).unwrap();
            let degree = *Segmentation::tp_degrees(segments).last().unwrap();
            for isa in Isa::available() {
                for threads in [1, 2] {
                    let be =
                        backend_with(isa, threads, NumericsConfig { reduce_segments: segments, ..Default::default() });
                    let mut y = vec![0.0; m * n];
                    be.linear(&x, m, &w, None, &mut y);
                    assert_eq!(bits(&y), want, "{isa:?} threads={threads} m={m} k={k} n={n} S={segments} {dtype:?}");
                }
                // The first rank of the widest split: a subtree of one segment.
                let be = backend_with(isa, 2, NumericsConfig { reduce_segments: segments, ..Default::default() });
                let segs = seg.shard(0, degree).unwrap();
                let cols = segs.real_range();
                if dtype.is_quantized() && !cols.end.is_multiple_of(32) {
                    continue;
                }
                let (xs, ws) = (columns_of(&x, k, cols.clone()), w.columns(cols).unwrap());
                let mut p = vec![0.0; m * n];
                be.linear_partial(&xs, m, &ws, segs, &mut p);
                let want = bits(&reference::linear_partial(&xs, m, ws.view(), segs));
                assert_eq!(bits(&p), want, "{isa:?} partial m={m} k={k} S={segments} {dtype:?}");
            }
        }
    }
}

/// Batches of 64 rows or more (32 for bf16/f16 at K ≤ 2048, 16 for block types) with segments of
/// at most 640 columns run lane-major tiles on AVX-512: a zmm holds one lane of 16 outputs, lanes run two at a time
/// against a weight panel packed per call, and the lane tree is folded partly in registers and
/// partly through a stack. Every output must still equal the reference — for both segment-count
/// families, K not a multiple of 16 (the real row ending inside a lane's last step), output
/// counts that leave a partial 48-column block, row counts that leave 1–7 rows to the other
/// tiles and more than one 64-row task, 1 to 4 threads (tasks of one column block split between
/// threads, each packing its own panel), and a row-parallel subtree.
#[test]
fn lane_major_tiles_equal_reference_across_segment_counts_partial_blocks_and_threads() {
    let mut rng = Rng::new(47);
    // (m, k, n, S): Qwen2.5's K = 896 at S = 8 (seg_len 112), at 512 rows and at 40 (bf16/f16
    // at a short K take these tiles from 32 rows, f32 not); 1000 at S = 8 (seg_len 128, the
    // row ends mid-step); 200 at S = 1 (one 208-column segment); 333 at S = 3 (seg_len 112);
    // 300 at S = 12 (seg_len 32); Qwen2.5's down projection, K = 4864 at S = 8 (seg_len 608,
    // the longest lane-major segments, 38 steps per lane chain); 1250 at S = 2 (seg_len 640, the
    // row ends mid-step); and 1300 at S = 2, 2016 at S = 1, segments too long for lane-major
    // tiles (the routing between the two kinds of tiles inside one backend).
    let cases = [
        (512, 896, 50, 8),
        (40, 896, 50, 8),
        (64, 4864, 50, 8),
        (72, 1250, 49, 2),
        (64, 1000, 97, 8),
        (71, 200, 48, 1),
        (136, 333, 1, 3),
        (130, 300, 145, 12),
        (264, 1300, 70, 2),
        (64, 2016, 20, 1),
    ];
    for &(m, k, n, segments) in &cases {
        let x = rng.vec(m * k);
        let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
        for dtype in DTYPES {
            let w = weight(&mut rng, dtype, n, k);
            assert_linear_equals_reference(
                &x,
                m,
                &w,
                n,
                numerics,
                1..=4,
                &format!("m={m} k={k} n={n} S={segments} {dtype:?}"),
            );
        }
        // The last rank of the widest split: a subtree of one segment (or of the whole range).
        let degree = *Segmentation::tp_degrees(segments).last().unwrap();
        let case = format!("m={m} k={k} S={segments}");
        assert_rank_partial_equals_reference(&mut rng, &x, m, n, DType::Bf16, numerics, (degree - 1, degree), &case);
    }
}

/// GGUF block weights (Q8_0, Q4_0, Q4_1) take the lane-major tiles too, widened into the panel
/// by the quantization formula instead of inside the FMA loop: each half-block of 16 weights
/// must land in its lanes with the same bits every other path gives it (`quant_weight` plants
/// f16 scale edge cases — zero, −0, subnormal, ±max). Qwen2.5's K = 896 at S = 8, its down
/// projection's 4864 (608-column segments), SmolLM2's 576 (72-column segments, ending mid-step)
/// and 1536 at S = 8; partial 48-column blocks; 1–4 threads; the last rank of the widest split
/// where its columns fall on block boundaries.
#[test]
fn lane_major_tiles_widen_block_weights_into_the_panel_equal_reference() {
    let mut rng = Rng::new(57);
    let cases = [(512, 896, 50, 8), (64, 4864, 20, 8), (130, 576, 49, 8), (71, 1536, 97, 8), (96, 320, 145, 12)];
    for &(m, k, n, segments) in &cases {
        let x = rng.vec(m * k);
        let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
        for dtype in QTYPES {
            let w = quant_weight(&mut rng, dtype, n, k);
            let case = format!("m={m} k={k} n={n} S={segments} {dtype:?}");
            assert_linear_equals_reference(&x, m, &w, n, numerics, 1..=4, &case);
            let degree = *Segmentation::tp_degrees(segments).last().unwrap();
            let segs = Segmentation::new(k, segments).unwrap().shard(degree - 1, degree).unwrap();
            if segs.real_range().start.is_multiple_of(32) {
                assert_rank_partial_equals_reference(&mut rng, &x, m, n, dtype, numerics, (degree - 1, degree), &case);
            }
        }
    }
}

/// Lane-major tiles run a segment's 8 lane groups unrolled, each group's push onto the lane
/// stack specialised for its place in the bit-reversed order, and the last tile of a group
/// prefetches the next group's (or the next segment's) x. Every segment count puts a different
/// depth on the segment stack behind those pushes: each must still equal the reference, with
/// Qwen2.5's 7-step lane chains (seg_len 112) and 2-step ones, the real row ending mid-step,
/// two row blocks (the second of 2 tiles) and a partial 48-column block.
#[test]
fn lane_major_unrolled_groups_equal_reference_at_every_segment_count() {
    let mut rng = Rng::new(48);
    let (m, n) = (72, 50);
    for segments in [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64] {
        for k in [segments * 112 - 3, segments * 16 + 7] {
            let x = rng.vec(m * k);
            let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
            for dtype in DTYPES {
                let w = weight(&mut rng, dtype, n, k);
                assert_linear_equals_reference(
                    &x,
                    m,
                    &w,
                    n,
                    numerics,
                    [1, 2],
                    &format!("k={k} S={segments} {dtype:?}"),
                );
            }
        }
    }
}

/// Lane-major tasks run in pairs of column blocks, a row block meeting both in turn, each thread
/// keeping two packed panels; an odd block count leaves one block unpaired, and 2–4 threads split
/// the tasks mid-pair. Every output must equal the reference for 1–5 column blocks (the last
/// partial), 1–3 row blocks (the last partial) and 1–4 threads.
#[test]
fn lane_major_column_block_pairs_equal_reference_for_odd_counts_and_threads() {
    let mut rng = Rng::new(49);
    let (k, segments) = (896, 8);
    let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
    for (m, n) in [(64, 30), (136, 96), (72, 97), (200, 150), (130, 240)] {
        let x = rng.vec(m * k);
        let w = weight(&mut rng, DType::Bf16, n, k);
        assert_linear_equals_reference(&x, m, &w, n, numerics, 1..=4, &format!("m={m} n={n}"));
    }
}

/// Lane-major tiles add the last segment's result to the earlier runs of the segment stack in
/// registers and store each output straight from there, masked to the block's columns. Every
/// count of runs the contract has (one for `2^k`, two for `3·2^k`; a row-parallel rank's subtree,
/// one), every width of the last 48-column block (1 to 48 columns, stores that end mid-vector),
/// two row blocks and 1–4 threads must give the reference's bits.
#[test]
fn lane_major_segment_totals_stored_from_registers_equal_reference() {
    let mut rng = Rng::new(50);
    let m = 72;
    for segments in [1, 3, 8, 12] {
        let k = segments * 112 - 5;
        let x = rng.vec(m * k);
        let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
        for n in [1, 16, 17, 47, 48, 49, 95] {
            let w = weight(&mut rng, DType::F32, n, k);
            assert_linear_equals_reference(&x, m, &w, n, numerics, 1..=4, &format!("n={n} k={k} S={segments}"));
        }
        for degree in Segmentation::tp_degrees(segments) {
            for rank in 0..degree {
                let case = format!("S={segments}");
                assert_rank_partial_equals_reference(&mut rng, &x, m, 65, DType::Bf16, numerics, (rank, degree), &case);
            }
        }
    }
}

/// Lane-major tiles read x packed on the team (a task per 8 rows) into the buffer the previous
/// call of the thread left, which holds that call's pack — longer, shorter, another layout —
/// and is not cleared, or grown where short. One thread runs calls of growing and shrinking
/// packs in turn (Qwen2.5's K = 896, its down projection's 4864, K = 333 at S = 3 and 1000
/// ending mid-step, 64 to 200 rows) at 1–4 threads: every output must equal the reference.
#[test]
fn lane_major_x_packed_on_the_team_into_a_reused_buffer_equals_reference() {
    let mut rng = Rng::new(51);
    let calls =
        [(64, 896, 8), (72, 4864, 8), (136, 896, 8), (64, 333, 3), (200, 1000, 8), (136, 4864, 8), (130, 896, 8)];
    for threads in 1..=4 {
        for isa in Isa::available() {
            let mut backends: Vec<(usize, CpuBackend)> = Vec::new();
            for &(m, k, segments) in &calls {
                if !backends.iter().any(|(s, _)| *s == segments) {
                    let numerics = NumericsConfig { reduce_segments: segments, ..Default::default() };
                    backends.push((segments, backend_with(isa, threads, numerics)));
                }
                let be = &backends.iter().find(|(s, _)| *s == segments).unwrap().1;
                let (x, n) = (rng.vec(m * k), 50);
                let w = weight(&mut rng, DType::Bf16, n, k);
                let want = bits(&reference::linear(&x, m, w.view(), None, segments));
                let mut y = vec![0.0; m * n];
                be.linear(&x, m, &w, None, &mut y);
                assert_eq!(bits(&y), want, "{isa:?} threads={threads} m={m} k={k} S={segments}");
            }
        }
    }
}

/// The K-blocked tiles' x packs are built on the team into the spare buffer an earlier call left
/// (here a lane-major pack of infinite x, so every float of it is stale): the padding past K
/// must be written as zeros, not assumed, or an infinite x times a masked-off zero weight makes
/// a NaN. Batches below 32 rows (16 for block types), f32 below 64 and segments over 640 columns
/// take these tiles; K ends mid-block in every case. Every output must equal the reference, at
/// 1–4 threads.
#[test]
fn k_blocked_x_packed_on_the_team_into_a_reused_buffer_equals_reference() {
    let mut rng = Rng::new(53);
    // (m, k, S, weights): padded K 336, 1024, 1024, 2016.
    let calls =
        [(8, 333, 3, DType::F32), (31, 1000, 8, DType::Bf16), (15, 992, 8, DType::Q8_0), (77, 2000, 1, DType::F16)];
    let stale = vec![f32::INFINITY; 200 * 1000];
    let stale_w = weight(&mut rng, DType::Bf16, 8, 1000);
    for threads in 1..=4 {
        for isa in Isa::available() {
            for &(m, k, segments, dtype) in &calls {
                let be = backend_with(isa, threads, NumericsConfig { reduce_segments: segments, ..Default::default() });
                // Leaves this thread's spare x pack (AVX-512's lane-major one) full of infinities.
                be.linear(&stale, 200, &stale_w, None, &mut vec![0.0; 200 * 8]);
                let x = rng.vec(m * k);
                let n = 20;
                let w = if dtype.is_quantized() {
                    quant_weight(&mut rng, dtype, n, k)
                } else {
                    weight(&mut rng, dtype, n, k)
                };
                let want = bits(&reference::linear(&x, m, w.view(), None, segments));
                let mut y = vec![0.0; m * n];
                be.linear(&x, m, &w, None, &mut y);
                assert_eq!(bits(&y), want, "{isa:?} threads={threads} m={m} k={k} S={segments} {dtype:?}");
            }
        }
    }
}

#[test]
fn thread_counts_1_2_3_8_give_identical_bits() {
    let mut rng = Rng::new(5);
    let (m, k, n) = (70, 333, 150);
    let w = weight(&mut rng, DType::Bf16, n, k);
    let x = rng.vec(m * k);
    let (layout, q, kc, vc, seqs_owned) = attention_case(&mut rng, &[(0, 40), (0, 1), (13, 20)], 4, 2, 16);
    let seqs: Vec<AttnSeq> = seqs_owned.iter().map(|s| s.as_seq()).collect();
    let params = attn_params(&layout, 4, 5);
    let mut first: Option<(Vec<u32>, Vec<u32>)> = None;
    for isa in Isa::available() {
        for threads in [1, 2, 3, 8] {
            let be = backend(isa, threads);
            let mut y = vec![0.0; m * n];
            be.linear(&x, m, &w, None, &mut y);
            let mut o = vec![0.0; q.len()];
            be.attention_into(&q, &seqs, &kc, &vc, &layout, params, &mut o);
            let got = (bits(&y), bits(&o));
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(&got, f, "{isa:?} threads={threads}"),
            }
        }
    }
}

#[test]
fn row_parallel_shards_plus_tree_combine_equal_unsplit() {
    let mut rng = Rng::new(6);
    for case in 0..12 {
        let (m, k, n) = (1 + rng.below(6), 1 + rng.below(400), 1 + rng.below(40));
        let dtype = DTYPES[case % 3];
        let x = rng.vec(m * k);
        let wf = rng.vec(n * k);
        let w = HostWeight::from_f32(&wf, dtype, n, k);
        // Both families of segment counts, with every degree whose shares are subtrees.
        let (segments, degrees): (usize, &[usize]) = [(8, &[2, 4, 8][..]), (12, &[3, 6, 12]), (6, &[3, 6])][case % 3];
        for isa in Isa::available() {
            let be = backend_with(isa, 2, NumericsConfig { reduce_segments: segments, ..Default::default() });
            let mut full = vec![0.0; m * n];
            be.linear(&x, m, &w, None, &mut full);
            let seg = Segmentation::new(k, segments).unwrap();
            for &t in degrees {
                let mut parts = Vec::new();
                for r in 0..t {
                    let segs = seg.shard(r, t).unwrap();
                    let cols = segs.real_range();
                    let xs: Vec<f32> = columns_of(&x, k, cols.clone());
                    let ws: Vec<f32> = (0..n).flat_map(|j| wf[j * k + cols.start..j * k + cols.end].to_vec()).collect();
                    let wsh = HostWeight::from_f32(&ws, dtype, n, cols.len());
                    let mut p = vec![0.0; m * n];
                    be.linear_partial(&xs, m, &wsh, segs, &mut p);
                    assert_eq!(bits(&p), bits(&reference::linear_partial(&xs, m, wsh.view(), segs)));
                    parts.push(p);
                }
                let refs: Vec<&Vec<f32>> = parts.iter().collect();
                let mut y = vec![0.0; m * n];
                be.tree_combine(&refs, &mut y);
                assert_eq!(bits(&y), bits(&full), "{isa:?} S={segments} t={t} k={k}");
            }
        }
    }
}

#[test]
fn column_parallel_shards_are_slices_of_the_full_output() {
    let mut rng = Rng::new(7);
    let (m, k, n) = (5, 96, 48);
    let wf = rng.vec(n * k);
    let x = rng.vec(m * k);
    let be = backend(Isa::best(), 2);
    let w = HostWeight::from_f32(&wf, DType::Bf16, n, k);
    let mut full = vec![0.0; m * n];
    be.linear(&x, m, &w, None, &mut full);
    for t in [2, 4, 8] {
        let rows = n / t;
        for r in 0..t {
            let ws = HostWeight::from_f32(&wf[r * rows * k..(r + 1) * rows * k], DType::Bf16, rows, k);
            let mut y = vec![0.0; m * rows];
            be.linear(&x, m, &ws, None, &mut y);
            for i in 0..m {
                assert_eq!(bits(&y[i * rows..(i + 1) * rows]), bits(&full[i * n + r * rows..i * n + (r + 1) * rows]));
            }
        }
    }
}

#[test]
fn sharded_lse_argmax_and_gumbel_equal_unsharded() {
    let mut rng = Rng::new(8);
    for vocab in [1, 17, 512, 1000, 4099] {
        let logits: Vec<f32> = rng.vec(vocab).iter().map(|v| v * 6.0).collect();
        for (segments, degrees) in [(8, &[2, 4, 8][..]), (12, &[3, 6, 12])] {
            let seg = Segmentation::new(vocab, segments).unwrap();
            let params = [
                SamplingParams { temperature: 0.0, ..Default::default() },
                SamplingParams { temperature: 0.8, seed: 42, ..Default::default() },
                SamplingParams { temperature: 1.3, top_k: 7, top_p: 1.0, seed: 5 },
                SamplingParams { temperature: 0.6, top_k: 0, top_p: 0.8, seed: 9 },
                SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.5, seed: 1 },
            ];
            for p in params {
                for step in 0..4 {
                    let req = SampleRequest { params: p, step };
                    let full = shard_sample(&logits, &VocabShard::new(seg.full()), &req);
                    let want = merge_shard_samples(&[&full], &req);
                    for &t in degrees {
                        let shards: Vec<_> = (0..t)
                            .map(|r| {
                                let sh = VocabShard::new(seg.shard(r, t).unwrap());
                                shard_sample(&logits[sh.offset..sh.offset + sh.rows], &sh, &req)
                            })
                            .collect();
                        let refs: Vec<_> = shards.iter().collect();
                        let got = merge_shard_samples(&refs, &req);
                        assert_eq!(got.id, want.id, "vocab={vocab} S={segments} t={t} {p:?}");
                        assert_eq!(got.logprob.to_bits(), want.logprob.to_bits(), "vocab={vocab} t={t}");
                    }
                    if p.temperature == 0.0 {
                        let best = (0..vocab).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
                        assert_eq!(want.id as usize, best, "greedy is the argmax, ties to the lowest id");
                    }
                }
            }
        }
    }
}

#[test]
fn argmax_ties_go_to_the_lowest_id_across_shards() {
    let mut logits = vec![0.0f32; 256];
    logits[200] = 3.0;
    logits[77] = 3.0;
    logits[150] = 3.0;
    let seg = Segmentation::new(256, 8).unwrap();
    let req = SampleRequest { params: SamplingParams::greedy(), step: 0 };
    for t in [1, 2, 4, 8] {
        let shards: Vec<_> = (0..t)
            .map(|r| {
                let sh = VocabShard::new(seg.shard(r, t).unwrap());
                shard_sample(&logits[sh.offset..sh.offset + sh.rows], &sh, &req)
            })
            .collect();
        let refs: Vec<_> = shards.iter().collect();
        assert_eq!(merge_shard_samples(&refs, &req).id, 77);
    }
}

#[test]
fn seeded_sampling_is_a_pure_function_and_seeds_differ() {
    let mut rng = Rng::new(9);
    let logits: Vec<f32> = rng.vec(300).iter().map(|v| v * 2.0).collect();
    let shard = VocabShard::full(300, 8).unwrap();
    let draw = |seed: u64| -> Vec<u32> {
        (0..64)
            .map(|step| {
                let req =
                    SampleRequest { params: SamplingParams { temperature: 1.0, seed, ..Default::default() }, step };
                merge_shard_samples(&[&shard_sample(&logits, &shard, &req)], &req).id
            })
            .collect()
    };
    assert_eq!(draw(1), draw(1));
    assert_ne!(draw(1), draw(2));
    assert_ne!(draw(2), draw(3));
    assert_ne!(gumbel(1, 0, 5).to_bits(), gumbel(1, 1, 5).to_bits(), "steps differ");
}

#[test]
fn gumbel_max_samples_the_softmax_distribution_chi_square() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0, 0.25, -2.0];
    let temperature = 0.9f32;
    let z: Vec<f64> = logits.iter().map(|&l| (l / temperature) as f64).collect();
    let zmax = z.iter().cloned().fold(f64::MIN, f64::max);
    let total: f64 = z.iter().map(|v| (v - zmax).exp()).sum();
    let probs: Vec<f64> = z.iter().map(|v| (v - zmax).exp() / total).collect();
    let shard = VocabShard::full(logits.len(), 8).unwrap();
    let draws = 40_000u64;
    let mut counts = [0u64; 8];
    for step in 0..draws {
        let req = SampleRequest { params: SamplingParams { temperature, seed: 1234, ..Default::default() }, step };
        counts[merge_shard_samples(&[&shard_sample(&logits, &shard, &req)], &req).id as usize] += 1;
    }
    let chi2: f64 = counts
        .iter()
        .zip(&probs)
        .map(|(&c, &p)| {
            let e = p * draws as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum();
    // 7 degrees of freedom: the 99.9th percentile is 24.3.
    assert!(chi2 < 24.3, "chi-square {chi2} counts {counts:?} probs {probs:?}");
}

#[test]
fn top_k_and_top_p_restrict_the_choice() {
    let mut logits = vec![-10.0f32; 100];
    logits[3] = 5.0;
    logits[40] = 4.9;
    logits[90] = 4.8;
    let shard = VocabShard::full(100, 8).unwrap();
    for step in 0..300 {
        let k2 = SampleRequest { params: SamplingParams { temperature: 5.0, top_k: 2, top_p: 1.0, seed: 3 }, step };
        let id = merge_shard_samples(&[&shard_sample(&logits, &shard, &k2)], &k2).id;
        assert!(id == 3 || id == 40, "top-k 2 chose {id}");
        let p = SampleRequest { params: SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.3, seed: 3 }, step };
        assert_eq!(merge_shard_samples(&[&shard_sample(&logits, &shard, &p)], &p).id, 3, "top-p 0.3 keeps one token");
    }
}

// ---------------------------------------------------------------- attention

struct SeqCase {
    table: Vec<u32>,
    q_row: usize,
    n_q: usize,
    first_pos: usize,
}
impl SeqCase {
    fn as_seq(&self) -> AttnSeq<'_> {
        AttnSeq { block_table: &self.table, q_row: self.q_row, n_q: self.n_q, first_pos: self.first_pos }
    }
}

fn attn_params(layout: &KvLayout, n_heads: usize, kv_chunk: usize) -> AttnParams {
    AttnParams {
        n_heads,
        n_kv_heads: layout.n_kv_heads,
        head_dim: layout.head_dim,
        block_size: layout.block_size,
        kv_chunk,
    }
}

/// Sequences given as (first_pos, n_q), random block placement, random cache contents.
#[allow(clippy::type_complexity)]
fn attention_case(
    rng: &mut Rng,
    shape: &[(usize, usize)],
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
) -> (KvLayout, Vec<f32>, Vec<f32>, Vec<f32>, Vec<SeqCase>) {
    let block_size = 4;
    let blocks_needed: usize = shape.iter().map(|&(f, n)| (f + n).div_ceil(block_size)).sum();
    let layout = KvLayout { num_blocks: blocks_needed + 5, block_size, n_kv_heads: n_kv, head_dim };
    let mut free: Vec<u32> = (0..layout.num_blocks as u32).collect();
    let mut seqs = Vec::new();
    let mut row = 0;
    for &(first_pos, n_q) in shape {
        let table =
            (0..(first_pos + n_q).div_ceil(block_size)).map(|_| free.swap_remove(rng.below(free.len()))).collect();
        seqs.push(SeqCase { table, q_row: row, n_q, first_pos });
        row += n_q;
    }
    let q = rng.vec(row * n_heads * head_dim);
    (layout, q, rng.vec(layout.floats()), rng.vec(layout.floats()), seqs)
}

#[test]
fn every_isa_attention_equals_reference() {
    let mut rng = Rng::new(10);
    for (n_heads, n_kv, d) in [(4, 2, 16), (8, 4, 8), (2, 2, 20), (6, 1, 64)] {
        let (layout, q, kc, vc, sc) =
            attention_case(&mut rng, &[(0, 9), (30, 1), (5, 3), (0, 1), (70, 2)], n_heads, n_kv, d);
        let seqs: Vec<AttnSeq> = sc.iter().map(|s| s.as_seq()).collect();
        for kv_chunk in [1, 5, 64] {
            let p = attn_params(&layout, n_heads, kv_chunk);
            let want = bits(&reference::attention(&q, &seqs, &kc, &vc, &layout, p));
            for isa in Isa::available() {
                let mut o = vec![0.0; q.len()];
                backend(isa, 2).attention_into(&q, &seqs, &kc, &vc, &layout, p, &mut o);
                assert_eq!(bits(&o), want, "{isa:?} heads={n_heads}/{n_kv} d={d} chunk={kv_chunk}");
            }
        }
    }
}

/// Sequences of `shape` (see [`attention_case`]) give the reference's bits on every ISA at 1 to 4
/// threads, at each of `kv_chunks`.
fn attention_equals_reference_at_1_to_4_threads(
    rng: &mut Rng,
    shape: &[(usize, usize)],
    (n_heads, n_kv, d): (usize, usize, usize),
    kv_chunks: &[usize],
) {
    let (layout, q, kc, vc, sc) = attention_case(rng, shape, n_heads, n_kv, d);
    let seqs: Vec<AttnSeq> = sc.iter().map(|s| s.as_seq()).collect();
    for &kv_chunk in kv_chunks {
        let p = attn_params(&layout, n_heads, kv_chunk);
        let want = bits(&reference::attention(&q, &seqs, &kc, &vc, &layout, p));
        for isa in Isa::available() {
            for threads in 1..=4 {
                let mut o = vec![0.0; q.len()];
                backend(isa, threads).attention_into(&q, &seqs, &kc, &vc, &layout, p, &mut o);
                let case = format!("{isa:?} threads={threads} heads={n_heads}/{n_kv} d={d} rows={shape:?}");
                assert_eq!(bits(&o), want, "{case} chunk={kv_chunk}");
            }
        }
    }
}

/// Decode runs one query row, or a few: attention then splits each row into (unit of heads,
/// chunk of keys) tasks — a unit being up to three heads of one KV group where head_dim ≤ 64,
/// else one — computes each chunk's partial apart and folds them in chunk order, so every
/// thread has work and a group's keys are read once. Such rows must give the reference's bits at
/// 1, 2, 3 and 4 threads, whether they run as row tasks or split: contexts of one key, one chunk,
/// two chunks (full, and with a partial last one), five and more chunks, rows of one sequence
/// and of several with different chunk counts; groups of 7 (Qwen2.5), of 3 (SmolLM2), of 1,
/// head_dim 64, 24 (a partial lane block) and 128 (one head per unit).
#[test]
fn few_row_attention_split_into_head_units_and_kv_chunks_equals_reference_at_1_to_4_threads() {
    let mut rng = Rng::new(12);
    for (n_heads, n_kv, d) in [(14, 2, 64), (9, 3, 64), (4, 4, 64), (6, 2, 24), (6, 2, 128)] {
        // (first position, query rows) per sequence: one decode row at 1, 64, 78, 128 and 301
        // keys; two rows of one sequence; three rows of three sequences; nine rows (row tasks at 1
        // or 2 threads, split at 3 or 4).
        let shapes: [&[(usize, usize)]; 9] = [
            &[(0, 1)],
            &[(63, 1)],
            &[(77, 1)],
            &[(127, 1)],
            &[(300, 1)],
            &[(190, 2)],
            &[(0, 1), (70, 1), (5, 1)],
            &[(260, 1), (63, 1), (129, 1)],
            &[(0, 1), (33, 3), (64, 5)],
        ];
        for shape in shapes {
            attention_equals_reference_at_1_to_4_threads(&mut rng, shape, (n_heads, n_kv, d), &[5, 64]);
        }
    }
}

/// A prefill's rows (a sequence of at least 16 query rows, on AVX-512 with head_dim ≤ 64) score
/// against their keys transposed into lanes once per call (16 keys a vector, shared by every row
/// and head), the lane tree as plain vector adds; where every row's sequence has them, units are
/// four heads wide. They must give the reference's bits at 1–4 threads: a prompt from position 0
/// (full and partial chunks), a chunk after cached keys (its diagonal starting mid-chunk),
/// exactly 16 rows and 15 (the fold), two prefills at once, and a prefill beside decode rows
/// (lanes for one sequence, the fold for the others, units of three); groups of 7 (Qwen2.5:
/// 4 + 3), 3 (SmolLM2), 4 and 1; head_dim 64, 24 (a partial lane block), 16 and 128 (no lanes);
/// kv_chunk 5, 16, 64 and 100.
#[test]
fn prefill_rows_with_keys_in_lanes_equal_reference_at_1_to_4_threads() {
    let mut rng = Rng::new(13);
    for (n_heads, n_kv, d) in [(14, 2, 64), (9, 3, 64), (8, 2, 24), (4, 1, 16), (4, 4, 64), (6, 2, 128)] {
        let shapes: [&[(usize, usize)]; 6] =
            [&[(0, 70)], &[(40, 90)], &[(0, 16)], &[(3, 15)], &[(0, 33), (20, 40)], &[(10, 50), (100, 1), (7, 1)]];
        for shape in shapes {
            attention_equals_reference_at_1_to_4_threads(&mut rng, shape, (n_heads, n_kv, d), &[5, 16, 64, 100]);
        }
    }
}

/// A full "model-like" check: one sequence's K/V written by prefill chunks of size 1, 3, 16 or 64
/// into randomly placed blocks, with other sequences around it, gives every query the same bits
/// as one whole-prompt prefill — whether its keys came from the cache or from the current chunk.
#[test]
fn attention_is_identical_for_any_prefill_chunking_and_block_placement() {
    let (n_heads, n_kv, d, len) = (4, 2, 16, 100);
    let mut rng = Rng::new(11);
    let qs = rng.vec(len * n_heads * d);
    let ks = rng.vec(len * n_kv * d);
    let vs = rng.vec(len * n_kv * d);
    let others_q = rng.vec(7 * n_heads * d);
    let be = backend(Isa::best(), 2);
    let run = |chunk: usize, seed: u64| -> Vec<u32> {
        let mut rng = Rng::new(seed);
        let layout = KvLayout { num_blocks: 80, block_size: 4, n_kv_heads: n_kv, head_dim: d };
        let mut cache = be.alloc_kv(layout);
        // Garbage everywhere first: only written slots may matter.
        cache.k = rng.vec(layout.floats()).into();
        cache.v = rng.vec(layout.floats()).into();
        let mut free: Vec<u32> = (0..80).collect();
        let table: Vec<u32> = (0..len.div_ceil(4)).map(|_| free.swap_remove(rng.below(free.len()))).collect();
        let other_table: Vec<u32> = (0..10).map(|_| free.swap_remove(rng.below(free.len()))).collect();
        let mut out = vec![0u32; len * n_heads * d];
        let mut pos = 0;
        while pos < len {
            let n = chunk.min(len - pos);
            // This step: our chunk plus an unrelated decode sequence at a random position.
            let other_pos = rng.below(30);
            let slots: Vec<u32> = (pos..pos + n).map(|p| table[p / 4] * 4 + (p % 4) as u32).collect();
            be.write_kv(
                &mut cache,
                &ks[pos * n_kv * d..(pos + n) * n_kv * d].to_vec(),
                &vs[pos * n_kv * d..(pos + n) * n_kv * d].to_vec(),
                &slots,
            );
            let mut q = qs[pos * n_heads * d..(pos + n) * n_heads * d].to_vec();
            q.extend_from_slice(&others_q[..n_heads * d]);
            let seqs = [
                AttnSeq { block_table: &table, q_row: 0, n_q: n, first_pos: pos },
                AttnSeq { block_table: &other_table, q_row: n, n_q: 1, first_pos: other_pos },
            ];
            let mut o = vec![0.0; q.len()];
            be.attention(&q, &seqs, &cache, attn_params(&layout, n_heads, 16), &mut o);
            out[pos * n_heads * d..(pos + n) * n_heads * d].copy_from_slice(&bits(&o[..n * n_heads * d]));
            pos += n;
        }
        out
    };
    let whole = run(len, 1);
    for (chunk, seed) in [(1, 2), (3, 3), (16, 4), (64, 5), (len, 6)] {
        assert_eq!(run(chunk, seed), whole, "prefill chunk {chunk}");
    }
}

// ---------------------------------------------------------------- negative control

/// The fast path is a conventional GEMM. Measure whether row 0 of a 896×4864 bf16-weight product
/// changes bits as M grows, and keep the observation honest: the test asserts only what it prints.
/// (For reference, PyTorch 2.15's CPU matmul changes row 0 once M ≥ 4 on this machine kind.)
#[test]
fn negative_control_fast_path_batch_variance_is_measured() {
    let mut rng = Rng::new(12);
    let (k, n) = (896, 4864);
    let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
    let x = rng.vec(64 * k);
    for mode in [KernelMode::Fast, KernelMode::Invariant] {
        let be =
            CpuBackend::new(CpuConfig { threads: 2, isa: None, mode, numerics: NumericsConfig::default() }).unwrap();
        let w = be.prepare_weight(w.clone());
        let mut row0 = vec![0.0; n];
        be.linear(&x[..k].to_vec(), 1, &w, None, &mut row0);
        let mut differs = Vec::new();
        for m in [2, 4, 8, 16, 32, 64] {
            let mut y = vec![0.0; m * n];
            be.linear(&x[..m * k].to_vec(), m, &w, None, &mut y);
            if bits(&y[..n]) != bits(&row0) {
                differs.push(m);
            }
        }
        eprintln!("{mode:?}: row 0 differs from M=1 at M in {differs:?}");
        match mode {
            KernelMode::Invariant | KernelMode::Native => assert!(differs.is_empty()),
            // Observed on x86-64 (AVX2 and AVX-512): gemm's M=1 path and its blocked kernels sum
            // in different orders, so row 0 changes as soon as the batch grows.
            KernelMode::Fast => assert!(!differs.is_empty(), "fast path became batch-invariant: update the docs"),
        }
    }
}

// ---------------------------------------------------------------- three-way splits

#[test]
fn segment_counts_of_three_times_a_power_of_two_are_two_thirds_plus_one_third() {
    assert!([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64].iter().all(|&n| lockstep_kernels::is_segment_count(n)));
    assert!([0, 5, 7, 9, 10, 18, 96, 128].iter().all(|&n| !lockstep_kernels::is_segment_count(n)));
    assert_eq!(Segmentation::tp_degrees(8), vec![1, 2, 4, 8]);
    assert_eq!(Segmentation::tp_degrees(12), vec![1, 3, 6, 12]);
    assert_eq!(Segmentation::tp_degrees(3), vec![1, 3]);
    // The tree over six sums, spelled out: ((s0+s1)+(s2+s3)) + (s4+s5).
    let v = [1e8f32, 1.0, -1e8, 3.0, 0.5, 7.25];
    let want = ((v[0] + v[1]) + (v[2] + v[3])) + (v[4] + v[5]);
    assert_eq!(reference::segment_tree(&v).to_bits(), want.to_bits());
    let thirds = [v[0] + v[1], v[2] + v[3], v[4] + v[5]];
    assert_eq!(reference::segment_tree(&thirds).to_bits(), want.to_bits(), "three ranks finish the same tree");
    // A rank's share must be a subtree: halves of 12 segments are not.
    let seg = Segmentation::new(576, 12).unwrap();
    assert!(seg.shard(0, 2).is_err() && seg.shard(0, 4).is_err());
    assert_eq!(seg.shard(1, 3).unwrap().real_range(), 192..384);
    assert!(Segmentation::new(10, 5).is_err());
}

// ---------------------------------------------------------------- quantized weights

const QTYPES: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4_1];

fn candle_type(d: DType) -> candle_core::quantized::GgmlDType {
    use candle_core::quantized::GgmlDType;
    match d {
        DType::Q8_0 => GgmlDType::Q8_0,
        DType::Q4_0 => GgmlDType::Q4_0,
        DType::Q4_1 => GgmlDType::Q4_1,
        other => unreachable!("{other:?} is not a block type"),
    }
}

/// candle's dequantization of a block matrix, as f32 values.
fn candle_dequantize(w: &HostWeight) -> Vec<f32> {
    use candle_core::{quantized::ggml_file::qtensor_from_ggml, Device};
    let q = qtensor_from_ggml(candle_type(w.dtype), w.bytes.as_slice(), vec![w.rows * w.cols], &Device::Cpu).unwrap();
    q.dequantize(&Device::Cpu).unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn quantized_widening_equals_candle_dequantization_bit_for_bit() {
    let mut rng = Rng::new(21);
    for dtype in QTYPES {
        let w = quant_weight(&mut rng, dtype, 64, 256);
        let ours = w.view().to_f32();
        let theirs = candle_dequantize(&w);
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{dtype:?} weight {i}: {a} vs candle {b}"
            );
        }
    }
}

#[test]
fn quantized_linear_equals_the_contract_over_candles_dequantized_matrix() {
    let mut rng = Rng::new(22);
    for (case, dtype) in QTYPES.into_iter().cycle().take(9).enumerate() {
        let (m, k, n) = (1 + rng.below(9), 32 * (1 + rng.below(12)), 1 + rng.below(40));
        let segments = [1, 3, 4, 6, 8, 12, 16][case % 7];
        let w = quant_weight(&mut rng, dtype, n, k);
        let wf = HostWeight::from_f32(&candle_dequantize(&w), DType::F32, n, k);
        let x = rng.vec(m * k);
        let want = bits(&reference::linear(&x, m, wf.view(), None, segments));
        assert_eq!(bits(&reference::linear(&x, m, w.view(), None, segments)), want, "{dtype:?} reference");
        for isa in Isa::available() {
            let be = backend_with(isa, 2, NumericsConfig { reduce_segments: segments, ..Default::default() });
            let mut y = vec![0.0; m * n];
            be.linear(&x, m, &w, None, &mut y);
            assert_eq!(bits(&y), want, "{isa:?} {dtype:?} m={m} k={k} n={n} S={segments}");
        }
    }
}

#[test]
fn quantized_rows_are_identical_alone_inside_batches_of_1_to_64_and_across_threads() {
    let mut rng = Rng::new(23);
    let (k, n) = (224, 37);
    for dtype in QTYPES {
        let w = quant_weight(&mut rng, dtype, n, k);
        let x = rng.vec(64 * k);
        let want: Vec<Vec<u32>> =
            (0..64).map(|i| bits(&reference::linear(&x[i * k..(i + 1) * k], 1, w.view(), None, 8))).collect();
        for isa in Isa::available() {
            for threads in [1, 3] {
                let be = backend(isa, threads);
                for m in 1..=64 {
                    let mut y = vec![0.0; m * n];
                    be.linear(&x[..m * k].to_vec(), m, &w, None, &mut y);
                    for i in 0..m {
                        assert_eq!(
                            bits(&y[i * n..(i + 1) * n]),
                            want[i],
                            "{isa:?} {dtype:?} threads={threads} row {i} of M={m}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn quantized_row_parallel_shards_on_block_boundaries_and_column_slices_equal_unsplit() {
    let mut rng = Rng::new(24);
    // SmolLM2-135M's shapes: o_proj [576, 576] and down_proj [576, 1536] (a few rows of each).
    for (case, &(k, segments, degrees)) in
        [(576, 12, &[3, 6][..]), (1536, 12, &[3, 6, 12]), (576, 8, &[2, 4]), (1536, 8, &[2, 4, 8])].iter().enumerate()
    {
        let dtype = QTYPES[case % 3];
        let (m, n) = (3, 12);
        let w = quant_weight(&mut rng, dtype, n, k);
        let x = rng.vec(m * k);
        let seg = Segmentation::new(k, segments).unwrap();
        for isa in Isa::available() {
            let be = backend_with(isa, 2, NumericsConfig { reduce_segments: segments, ..Default::default() });
            let mut full = vec![0.0; m * n];
            be.linear(&x, m, &w, None, &mut full);
            for &t in degrees {
                let parts: Vec<Vec<f32>> = (0..t)
                    .map(|r| {
                        let segs = seg.shard(r, t).unwrap();
                        let cols = segs.real_range();
                        let wsh = w.columns(cols.clone()).expect("shares cut on whole blocks");
                        let xs: Vec<f32> = columns_of(&x, k, cols.clone());
                        let mut p = vec![0.0; m * n];
                        be.linear_partial(&xs, m, &wsh, segs, &mut p);
                        assert_eq!(bits(&p), bits(&reference::linear_partial(&xs, m, wsh.view(), segs)));
                        p
                    })
                    .collect();
                let mut y = vec![0.0; m * n];
                be.tree_combine(&parts.iter().collect::<Vec<_>>(), &mut y);
                assert_eq!(bits(&y), bits(&full), "{isa:?} {dtype:?} k={k} S={segments} t={t}");
            }
            // Column-parallel: a rank's rows are whole rows of blocks, its outputs a slice.
            for t in [3, 4] {
                let rows = n / t;
                for r in 0..t {
                    let rb = w.view().row_bytes();
                    let bytes = w.bytes.as_slice()[r * rows * rb..(r + 1) * rows * rb].to_vec();
                    let ws = HostWeight::new(dtype, lockstep_kernels::SharedBytes::from_vec(bytes), rows, k).unwrap();
                    let mut y = vec![0.0; m * rows];
                    be.linear(&x, m, &ws, None, &mut y);
                    for i in 0..m {
                        assert_eq!(
                            bits(&y[i * rows..(i + 1) * rows]),
                            bits(&full[i * n + r * rows..i * n + (r + 1) * rows])
                        );
                    }
                }
            }
        }
    }
    // A cut inside a block is refused, not silently misread.
    let w = quant_weight(&mut rng, DType::Q4_1, 2, 64);
    assert!(w.columns(0..48).is_err() && w.columns(16..64).is_err());
    assert!(w.columns(32..64).is_ok());
}

#[test]
fn quantized_embedding_rows_equal_candles_dequantized_rows() {
    let mut rng = Rng::new(25);
    for dtype in QTYPES {
        let table = quant_weight(&mut rng, dtype, 9, 96);
        let deq = candle_dequantize(&table);
        let ids = [3u32, 0, 8, 3];
        for isa in Isa::available() {
            let mut out = vec![0.0; ids.len() * 96];
            backend(isa, 2).embedding(&ids, &table, &mut out);
            let want: Vec<f32> =
                ids.iter().flat_map(|&i| deq[i as usize * 96..(i as usize + 1) * 96].to_vec()).collect();
            assert_eq!(bits(&out), bits(&want), "{isa:?} {dtype:?}");
        }
    }
}

/// The decode tile (few x rows) walks each segment in whole blocks and carries the second half of
/// a block that a segment boundary cuts in two into the next segment: every segment length (an
/// odd or even number of half blocks, a segment shorter than a block, segments past the real
/// columns), ragged last tiles and the rows left over beside a multi-row tile must still give the
/// reference's bits.
#[test]
fn quantized_decode_rows_equal_reference_when_segments_cut_blocks_in_half() {
    let mut rng = Rng::new(26);
    for dtype in QTYPES {
        for k in [32, 96, 160, 576, 608] {
            let n = 37;
            let w = quant_weight(&mut rng, dtype, n, k);
            for segments in [1, 2, 3, 4, 6, 8, 12, 16, 24, 48] {
                for m in [1, 2, 3, 5] {
                    let x = rng.vec(m * k);
                    let want = bits(&reference::linear(&x, m, w.view(), None, segments));
                    for isa in Isa::available() {
                        let be =
                            backend_with(isa, 2, NumericsConfig { reduce_segments: segments, ..Default::default() });
                        let mut y = vec![0.0; m * n];
                        be.linear(&x, m, &w, None, &mut y);
                        assert_eq!(bits(&y), want, "{isa:?} {dtype:?} m={m} k={k} S={segments}");
                    }
                }
            }
        }
    }
}

/// Fast mode widens bf16/f16 weights one tile of rows per call (not the whole model at load): the
/// tiles must cover every output column exactly once, including a ragged last tile, at any M and
/// thread count. Fast mode promises no bits, so this compares with the reference within f32
/// rounding of a K-long dot product.
#[test]
fn fast_mode_tiles_cover_every_output_column_for_every_dtype() {
    let mut rng = Rng::new(31);
    let (k, n) = (67, 300); // 300 rows = two full 128-row tiles and a ragged one
    for dtype in [DType::F32, DType::Bf16, DType::F16] {
        let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
        for threads in [1, 2, 3] {
            let be = CpuBackend::new(CpuConfig {
                threads,
                isa: None,
                mode: KernelMode::Fast,
                numerics: NumericsConfig::default(),
            })
            .unwrap();
            let w = be.prepare_weight(w.clone());
            for m in [1, 3, 17] {
                let x = rng.vec(m * k);
                let want = reference::linear(&x, m, w.view(), None, NumericsConfig::default().reduce_segments);
                let mut y = vec![f32::NAN; m * n];
                be.linear(&x, m, &w, None, &mut y);
                for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{dtype:?} threads {threads} M {m} [{i}]: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// `WeightView::widen_rows_into` (RMSNorm's weight, the embedding rows, fast mode's tiles) gives
/// per-element `get`'s bits for every weight type: raw random bytes for the element types (NaNs,
/// infinities and subnormals included), random blocks with edge scales for the block types, and
/// a row range that starts past row 0.
#[test]
fn widened_rows_equal_per_element_widening_for_every_dtype() {
    let mut rng = Rng::new(0x5eed_71de);
    let (rows, cols) = (5usize, 64usize);
    for dtype in [DType::F32, DType::Bf16, DType::F16, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
        let w = if dtype.is_quantized() {
            quant_weight(&mut rng, dtype, rows, cols)
        } else {
            let bytes: Vec<u8> = (0..rows * cols * dtype.block_bytes()).map(|_| rng.next_u64() as u8).collect();
            HostWeight::new(dtype, lockstep_kernels::SharedBytes::from_vec(bytes), rows, cols).unwrap()
        };
        let v = w.view();
        for range in [0..rows, 2..4, 3..3] {
            let mut wide = vec![7.0f32];
            v.widen_rows_into(range.clone(), &mut wide);
            let want: Vec<u32> = range.flat_map(|r| (0..cols).map(move |c| v.get(r, c).to_bits())).collect();
            assert_eq!(wide[0], 7.0, "{dtype:?}: appends, keeping what was there");
            assert_eq!(wide[1..].iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want, "{dtype:?}");
        }
    }
}
