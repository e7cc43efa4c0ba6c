//! CPU native numerics, both classes — AMX (`native-amx`) and AVX512-BF16 (`native-avx512bf16`):
//! each class's kernels equal a plain restatement of its rule (docs/DESIGN.md §2.2) bit for bit,
//! and no bit depends on the batch, the thread count or the tensor-parallel split.
//!
//! Every check runs twice per class: on the class's bit-exact software model (everywhere) and on
//! the hardware, which only a CPU with AMX (resp. AVX512-BF16) can run — elsewhere those tests
//! print `SKIPPED <test>: CPU has no …` and pass (a hardware skip, not a missing file). A model
//! shares the packing and the instruction order with its hardware path, so the model tests check
//! those on any machine.

use lockstep_kernels::cpu::amx::{amx_available, AmxExec};
use lockstep_kernels::cpu::dpbf16::{avx512bf16_available, Dpbf16Exec};
use lockstep_kernels::cpu::{native_exec, NativeExec};
use lockstep_kernels::{
    reference, Backend, CpuBackend, CpuConfig, DType, HostWeight, KernelError, KernelMode, NumericsConfig,
    SegmentRange, Segmentation,
};

mod common;
use common::{assert_rows_alone_equal_batched, columns_of, ContractData, Rng};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn config(threads: usize, segments: usize) -> CpuConfig {
    CpuConfig {
        threads,
        isa: None,
        mode: KernelMode::Native,
        numerics: NumericsConfig { reduce_segments: segments, ..Default::default() },
    }
}

/// How a test gets a native backend (threads, segments), and the rule it must follow.
type Make = fn(usize, usize) -> CpuBackend;
type Rule = fn(&[f32], &[f32], DType, SegmentRange) -> f32;

fn model(threads: usize, segments: usize) -> CpuBackend {
    CpuBackend::with_amx_model(config(threads, segments)).unwrap()
}

fn hardware(threads: usize, segments: usize) -> CpuBackend {
    CpuBackend::with_native(config(threads, segments), NativeExec::Amx(AmxExec::Hardware)).unwrap()
}

fn dp_model(threads: usize, segments: usize) -> CpuBackend {
    CpuBackend::with_native(config(threads, segments), NativeExec::Avx512Bf16(Dpbf16Exec::Model)).unwrap()
}

fn dp_hardware(threads: usize, segments: usize) -> CpuBackend {
    CpuBackend::with_native(config(threads, segments), NativeExec::Avx512Bf16(Dpbf16Exec::Hardware)).unwrap()
}

/// A printed skip. Straight to the stderr handle: libtest hides the printed output of passing
/// tests, and a skip must be seen.
fn skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The hardware variant of a check, or a printed skip where this CPU cannot run tiles.
fn on_hardware(test: &str, check: fn(Make)) {
    match amx_available() {
        Ok(()) => check(hardware),
        Err(e) => skip(test, &format!("CPU has no AMX ({e})")),
    }
}

/// The same for the AVX512-BF16 class.
fn on_avx512bf16(test: &str, check: impl FnOnce(Make)) {
    if avx512bf16_available() {
        check(dp_hardware)
    } else {
        skip(test, "CPU has no AVX512-BF16")
    }
}

// ---------------------------------------------------------------- the rule, restated plainly

fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

fn bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// The native rule for one dot product over a segment range, written from DESIGN §2.2 without
/// tiles: per segment, per K tile of 32 (zeros past the segment or the row), per bf16 plane of
/// the weights, even and odd products accumulate apart (fma, DAZ/FTZ) and meet once, added to the
/// segment's running sum; the segments meet in the contract's tree.
fn native_dot(x: &[f32], w: &[f32], dtype: DType, segs: SegmentRange) -> f32 {
    let seg_len = segs.seg.seg_len;
    let planes = weight_planes(w, dtype);
    let sums: Vec<f32> = (0..segs.count)
        .map(|s| {
            let mut c = 0.0f32;
            for t in 0..seg_len.div_ceil(32) {
                for plane in &planes {
                    let (mut even, mut odd) = (0.0f32, 0.0f32);
                    for k in 0..16 {
                        for (h, acc) in [(0, &mut even), (1, &mut odd)] {
                            let e = t * 32 + 2 * k + h;
                            let col = s * seg_len + e;
                            let (a, b) =
                                if e < seg_len && col < x.len() { (bf16(x[col]), plane[col]) } else { (0.0, 0.0) };
                            *acc = flush(flush(a).mul_add(flush(b), *acc));
                        }
                    }
                    c = flush(c + flush(even + odd));
                }
            }
            c
        })
        .collect();
    reference::segment_tree(&sums)
}

/// The bf16 planes a weight row is multiplied as (f16: the exact split `hi`, `lo`).
fn weight_planes(w: &[f32], dtype: DType) -> Vec<Vec<f32>> {
    match dtype {
        DType::Bf16 => vec![w.to_vec()],
        DType::F16 => {
            let hi: Vec<f32> = w.iter().map(|&v| bf16(v)).collect();
            let lo = w.iter().zip(&hi).map(|(&v, &h)| bf16(v - h)).collect();
            vec![hi, lo]
        }
        other => panic!("{other:?} has no native path"),
    }
}

/// The AVX512-BF16 rule for one dot product, from DESIGN §2.2 without vectors: per segment one
/// accumulator from +0 over the segment's column pairs (real columns only; a pair cut by the row's
/// end has a zero second half), per pair and plane the odd product then the even one, each an f32
/// fma with DAZ/FTZ; the segments meet in the contract's tree.
fn dp_dot(x: &[f32], w: &[f32], dtype: DType, segs: SegmentRange) -> f32 {
    let seg_len = segs.seg.seg_len;
    let planes = weight_planes(w, dtype);
    let at = |v: &[f32], e: usize| if e < x.len() { v[e] } else { 0.0 };
    let sums: Vec<f32> = (0..segs.count)
        .map(|s| {
            let (lo, hi) = ((s * seg_len).min(x.len()), ((s + 1) * seg_len).min(x.len()));
            let mut c = 0.0f32;
            for p in if lo < hi { lo / 2..hi.div_ceil(2) } else { 0..0 } {
                for plane in &planes {
                    let (a0, b0) = (flush(bf16(at(x, 2 * p))), flush(at(plane, 2 * p)));
                    let (a1, b1) = (flush(bf16(at(x, 2 * p + 1))), flush(at(plane, 2 * p + 1)));
                    c = flush(a0.mul_add(b0, flush(a1.mul_add(b1, c))));
                }
            }
            c
        })
        .collect();
    reference::segment_tree(&sums)
}

fn native_linear(rule: Rule, x: &[f32], m: usize, w: &HostWeight, segs: SegmentRange) -> Vec<f32> {
    let (k, wf) = (w.cols, w.view().to_f32());
    (0..m)
        .flat_map(|i| {
            let wf = &wf;
            (0..w.rows).map(move |j| rule(&x[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k], w.dtype, segs))
        })
        .collect()
}

// ---------------------------------------------------------------- the checks

fn equals_the_rule_on_random_shapes(make: Make, rule: Rule) {
    let mut rng = Rng::new(21);
    for case in 0..16 {
        let (m, k, n) = (1 + rng.below(20), 1 + rng.below(300), 1 + rng.below(40));
        let segments = [1, 2, 3, 4, 6, 8, 12][rng.below(7)];
        let dtype = [DType::Bf16, DType::F16][case % 2];
        let x = rng.vec(m * k);
        let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
        let segs = Segmentation::new(k, segments).unwrap().full();
        let be = make(2, segments);
        let mut y = vec![0.0; m * n];
        be.linear(&x, m, &w, None, &mut y);
        assert_eq!(bits(&y), bits(&native_linear(rule, &x, m, &w, segs)), "m={m} k={k} n={n} S={segments} {dtype:?}");
    }
}

fn rows_alone_equal_rows_in_batches_of_1_to_64(make: Make) {
    let mut rng = Rng::new(22);
    let (k, n) = (203, 37);
    let be = make(2, 4);
    for dtype in [DType::Bf16, DType::F16] {
        let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
        let x = rng.vec(64 * k);
        assert_rows_alone_equal_batched(&be, &w, &x, k, &format!("{dtype:?}"));
    }
}

fn thread_counts_give_identical_bits(make: Make) {
    let mut rng = Rng::new(23);
    let (m, k, n) = (70, 333, 150);
    let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
    let x = rng.vec(m * k);
    let mut first: Option<Vec<u32>> = None;
    for threads in [1, 2, 3, 8] {
        let mut y = vec![0.0; m * n];
        make(threads, 8).linear(&x, m, &w, None, &mut y);
        match &first {
            None => first = Some(bits(&y)),
            Some(f) => assert_eq!(&bits(&y), f, "threads={threads}"),
        }
    }
}

fn row_parallel_shards_finish_the_unsplit_tree(make: Make) {
    let mut rng = Rng::new(24);
    for case in 0..6 {
        let (m, k, n) = (1 + rng.below(20), 1 + rng.below(400), 1 + rng.below(40));
        let dtype = [DType::Bf16, DType::F16][case % 2];
        let x = rng.vec(m * k);
        let wf = rng.vec(n * k);
        let w = HostWeight::from_f32(&wf, dtype, n, k);
        let (segments, degrees): (usize, &[usize]) = [(8, &[1, 2, 4][..]), (4, &[1, 2, 4]), (6, &[3, 6])][case % 3];
        let be = make(2, segments);
        let mut full = vec![0.0; m * n];
        be.linear(&x, m, &w, None, &mut full);
        let seg = Segmentation::new(k, segments).unwrap();
        for &t in degrees {
            let mut parts = Vec::new();
            for r in 0..t {
                let segs = seg.shard(r, t).unwrap();
                let cols = segs.real_range();
                let xs = columns_of(&x, k, cols.clone());
                let ws: Vec<f32> = (0..n).flat_map(|j| wf[j * k + cols.start..j * k + cols.end].to_vec()).collect();
                let wsh = HostWeight::from_f32(&ws, dtype, n, cols.len());
                let mut p = vec![0.0; m * n];
                be.linear_partial(&xs, m, &wsh, segs, &mut p);
                parts.push(p);
            }
            let refs: Vec<&Vec<f32>> = parts.iter().collect();
            let mut y = vec![0.0; m * n];
            be.tree_combine(&refs, &mut y);
            assert_eq!(bits(&y), bits(&full), "{dtype:?} S={segments} t={t} k={k} m={m}");
        }
    }
}

/// Every AMX block shape and tail equals the rule, through a held weight (packed once) and a bare
/// view (packed per task): M ≤ 16 (one row tile × up to four column tiles) and M > 16 (2 × 2, with
/// a last row block of one tile and a partial tile), column tails of one to four tiles and a
/// partial panel, bf16 and f16 (two planes), short segments (one ending inside the row, one past
/// it), one long segment, and S = 3.
fn every_block_shape_equals_the_rule(make: Make) {
    let mut rng = Rng::new(31);
    let cases =
        [(1, 517, 130, 8), (5, 517, 16, 8), (16, 300, 100, 3), (17, 517, 64, 8), (33, 1100, 45, 1), (50, 300, 130, 4)];
    for (case, &(m, k, n, segments)) in cases.iter().enumerate() {
        let dtype = [DType::Bf16, DType::F16][case % 2];
        let x = rng.vec(m * k);
        let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
        let want = bits(&native_linear(native_dot, &x, m, &w, Segmentation::new(k, segments).unwrap().full()));
        let be = make(2, segments);
        let (mut held, mut view) = (vec![0.0; m * n], vec![0.0; m * n]);
        be.linear(&x, m, &w, None, &mut held);
        be.linear_into(&x, m, w.view(), None, &mut view);
        let what = format!("m={m} k={k} n={n} S={segments} {dtype:?}");
        assert_eq!(bits(&held), want, "held weight, {what}");
        assert_eq!(bits(&view), want, "bare view, {what}");
    }
}

/// An A panel's lines are the previous panel's on the calling thread (not cleared first), so the
/// zeros of every K tile must be written again: after a panel of NaN and infinity (whose products
/// with the zero padding of B would be NaN), panels with K-tile tails, short segments and
/// segments past the row still equal the rule — with fewer rows, more rows, shorter and longer
/// rows than the poisoned one, through a held weight and a bare view.
fn a_panel_padding_is_zero_after_a_nan_panel(make: Make) {
    let mut rng = Rng::new(37);
    let poison = |m: usize, k: usize| -> Vec<f32> {
        (0..m * k).map(|i| [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3]).collect()
    };
    for &(m, k, n, segments) in &[(17, 300, 40, 8), (40, 517, 33, 3), (5, 100, 20, 8), (33, 1100, 17, 12)] {
        let be = make(1, segments);
        let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
        let x = rng.vec(m * k);
        let want = bits(&native_linear(native_dot, &x, m, &w, Segmentation::new(k, segments).unwrap().full()));
        for &(pm, pk) in &[(48, 1100), (m + 16, k), (3, 64)] {
            let (pw, px) = (HostWeight::from_f32(&rng.vec(4 * pk), DType::Bf16, 4, pk), poison(pm, pk));
            be.linear(&px, pm, &pw, None, &mut vec![0.0; pm * 4]);
            let mut held = vec![0.0; m * n];
            be.linear(&x, m, &w, None, &mut held);
            assert_eq!(bits(&held), want, "held weight, m={m} k={k} S={segments} after a {pm}×{pk} NaN panel");
            be.linear(&px, pm, &pw, None, &mut vec![0.0; pm * 4]);
            let mut view = vec![0.0; m * n];
            be.linear_into(&x, m, w.view(), None, &mut view);
            assert_eq!(bits(&view), want, "bare view, m={m} k={k} S={segments} after a {pm}×{pk} NaN panel");
        }
    }
}

#[test]
fn model_a_panel_padding_is_zero_after_a_nan_panel() {
    a_panel_padding_is_zero_after_a_nan_panel(model)
}

#[test]
fn amx_a_panel_padding_is_zero_after_a_nan_panel() {
    on_hardware("amx_a_panel_padding_is_zero_after_a_nan_panel", a_panel_padding_is_zero_after_a_nan_panel)
}

#[test]
fn model_every_block_shape_and_tail_equals_the_native_rule() {
    every_block_shape_equals_the_rule(model)
}

#[test]
fn amx_every_block_shape_and_tail_equals_the_native_rule() {
    on_hardware("amx_every_block_shape_and_tail_equals_the_native_rule", every_block_shape_equals_the_rule)
}

#[test]
fn model_tile_program_equals_the_native_rule_on_random_shapes() {
    equals_the_rule_on_random_shapes(model, native_dot)
}

#[test]
fn model_rows_are_identical_alone_and_inside_batches_of_1_to_64() {
    rows_alone_equal_rows_in_batches_of_1_to_64(model)
}

#[test]
fn model_thread_counts_1_2_3_8_give_identical_bits() {
    thread_counts_give_identical_bits(model)
}

#[test]
fn model_row_parallel_shards_tp_1_2_4_and_3_6_plus_tree_combine_equal_unsplit() {
    row_parallel_shards_finish_the_unsplit_tree(model)
}

#[test]
fn amx_tile_program_equals_the_native_rule_on_random_shapes() {
    on_hardware("amx_tile_program_equals_the_native_rule_on_random_shapes", |make| {
        equals_the_rule_on_random_shapes(make, native_dot)
    })
}

#[test]
fn amx_rows_are_identical_alone_and_inside_batches_of_1_to_64() {
    on_hardware(
        "amx_rows_are_identical_alone_and_inside_batches_of_1_to_64",
        rows_alone_equal_rows_in_batches_of_1_to_64,
    )
}

#[test]
fn amx_thread_counts_1_2_3_8_give_identical_bits() {
    on_hardware("amx_thread_counts_1_2_3_8_give_identical_bits", thread_counts_give_identical_bits)
}

#[test]
fn amx_row_parallel_shards_tp_1_2_4_and_3_6_plus_tree_combine_equal_unsplit() {
    on_hardware(
        "amx_row_parallel_shards_tp_1_2_4_and_3_6_plus_tree_combine_equal_unsplit",
        row_parallel_shards_finish_the_unsplit_tree,
    )
}

/// The tile unit gives the model's bits: where this fails, the model (and DESIGN §2.2's rule)
/// misdescribes the silicon, not the other way round.
#[test]
fn amx_hardware_gives_the_software_models_bits() {
    on_hardware("amx_hardware_gives_the_software_models_bits", |hw| {
        hardware_gives_the_models_bits(hw, model, 25, &[(1, 64), (16, 45), (37, 45), (40, 150)])
    })
}

/// `hw` and `model` give the same bits for every `(m, n)` at K = 517, bf16 and f16 weights.
fn hardware_gives_the_models_bits(hw: Make, model: Make, seed: u64, cases: &[(usize, usize)]) {
    let mut rng = Rng::new(seed);
    let k = 517;
    for dtype in [DType::Bf16, DType::F16] {
        for &(m, n) in cases {
            let x = rng.vec(m * k);
            let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
            let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
            hw(2, 8).linear(&x, m, &w, None, &mut a);
            model(2, 8).linear(&x, m, &w, None, &mut b);
            assert_eq!(bits(&a), bits(&b), "{dtype:?} m={m}");
        }
    }
}

/// Native numerics are a different rule: on bf16 weights they must not quietly give the
/// portable bits (which would mean the tile path never ran).
#[test]
fn model_native_bits_differ_from_portable_on_bf16_weights() {
    let mut rng = Rng::new(26);
    let (m, k, n) = (8, 896, 64);
    let x = rng.vec(m * k);
    let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
    let mut native = vec![0.0; m * n];
    model(2, 8).linear(&x, m, &w, None, &mut native);
    let portable = reference::linear(&x, m, w.view(), None, 8);
    let differ = bits(&native).iter().zip(bits(&portable)).filter(|(a, b)| **a != *b).count();
    assert!(differ > 0, "native gave the portable bits on every one of {} outputs", m * n);
}

/// f32 weights have no native path: native mode runs them on the portable kernels, bit for bit
/// the contract's. (GGUF block weights have a native rule of their own: `tests/native_quant.rs`.)
#[test]
fn native_mode_keeps_the_portable_bits_for_f32_weights() {
    for make in [model as Make, dp_model] {
        let mut rng = Rng::new(27);
        let (m, k, n) = (5, 256, 19);
        let x = rng.vec(m * k);
        let w = HostWeight::from_f32(&rng.vec(n * k), DType::F32, n, k);
        let mut y = vec![0.0; m * n];
        make(2, 8).linear(&x, m, &w, None, &mut y);
        assert_eq!(bits(&y), bits(&reference::linear(&x, m, w.view(), None, 8)));
    }
}

/// Native mode starts in the best class the CPU has — AMX, else AVX512-BF16 — and names it in
/// the fingerprint; where the CPU has neither it refuses to start and says what is missing and
/// what to use instead.
#[test]
fn native_mode_picks_amx_then_avx512bf16_and_says_what_is_missing() {
    let expected = match (amx_available(), avx512bf16_available()) {
        (Ok(()), _) => Some("native-amx"),
        (Err(_), true) => Some("native-avx512bf16"),
        (Err(_), false) => None,
    };
    match (expected, CpuBackend::new(config(1, 8))) {
        (Some(name), Ok(be)) => {
            assert_eq!(be.fingerprint_name(), name);
            assert_eq!(native_exec().unwrap().fingerprint_name(), name);
            assert_eq!(CpuBackend::fingerprint_name_for(KernelMode::Native), name);
        }
        (None, Err(e @ KernelError::NativeUnavailable(_))) => {
            let msg = e.to_string();
            assert!(msg.contains("cpu native numerics need AMX"), "{msg}");
            assert!(msg.contains("AVX512-BF16"), "{msg}");
            assert!(msg.contains("--numerics portable"), "{msg}");
        }
        (expected, started) => panic!("expected {expected:?} but start {:?}", started.map(|_| ())),
    }
}

// ---------------------------------------------------------------- the AVX512-BF16 class

#[test]
fn avx512bf16_model_equals_the_native_rule_on_random_shapes() {
    equals_the_rule_on_random_shapes(dp_model, dp_dot)
}

#[test]
fn avx512bf16_model_rows_are_identical_alone_and_inside_batches_of_1_to_64() {
    rows_alone_equal_rows_in_batches_of_1_to_64(dp_model)
}

#[test]
fn avx512bf16_model_row_parallel_shards_tp_1_2_4_and_3_6_plus_tree_combine_equal_unsplit() {
    row_parallel_shards_finish_the_unsplit_tree(dp_model)
}

#[test]
fn avx512bf16_equals_the_native_rule_on_random_shapes() {
    on_avx512bf16("avx512bf16_equals_the_native_rule_on_random_shapes", |make| {
        equals_the_rule_on_random_shapes(make, dp_dot)
    })
}

#[test]
fn avx512bf16_rows_are_identical_alone_and_inside_batches_of_1_to_64() {
    on_avx512bf16(
        "avx512bf16_rows_are_identical_alone_and_inside_batches_of_1_to_64",
        rows_alone_equal_rows_in_batches_of_1_to_64,
    )
}

#[test]
fn avx512bf16_thread_counts_1_2_3_8_give_identical_bits() {
    on_avx512bf16("avx512bf16_thread_counts_1_2_3_8_give_identical_bits", thread_counts_give_identical_bits)
}

#[test]
fn avx512bf16_row_parallel_shards_tp_1_2_4_and_3_6_plus_tree_combine_equal_unsplit() {
    on_avx512bf16(
        "avx512bf16_row_parallel_shards_tp_1_2_4_and_3_6_plus_tree_combine_equal_unsplit",
        row_parallel_shards_finish_the_unsplit_tree,
    )
}

/// The instruction gives the model's bits on real shapes (every tile shape 1…8 rows, panel tails,
/// f16's two planes): where this fails, the model and DESIGN §2.2 misdescribe the silicon.
#[test]
fn avx512bf16_hardware_gives_the_software_models_bits() {
    on_avx512bf16("avx512bf16_hardware_gives_the_software_models_bits", |hw| {
        let cases: Vec<(usize, usize)> = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 37].map(|m| (m, 45 + 16 * (m % 4))).into();
        hardware_gives_the_models_bits(hw, dp_model, 28, &cases)
    })
}

/// A held weight packs once (AVX512-BF16 panels, AMX B tiles) and keeps the packing; a bare view
/// packs per call. Both give the same bits, a second call on the held weight (from its cache) gives
/// them again, and a backend with another segmentation does not take the tiles packed for the
/// first (AMX tiles depend on the segments).
#[test]
fn cached_native_packing_gives_the_bits_of_a_fresh_packing_in_both_classes() {
    let mut rng = Rng::new(29);
    let (m, k, n) = (3, 300, 50);
    let x = rng.vec(m * k);
    for (make, rule) in [(model as Make, native_dot as Rule), (dp_model, dp_dot)] {
        for dtype in [DType::Bf16, DType::F16] {
            let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
            let be = make(2, 4);
            let (mut held, mut again, mut view) = (vec![0.0; m * n], vec![0.0; m * n], vec![0.0; m * n]);
            be.linear(&x, m, &w, None, &mut held);
            be.linear(&x, m, &w.clone(), None, &mut again);
            be.linear_into(&x, m, w.view(), None, &mut view);
            assert_eq!(bits(&held), bits(&view), "{dtype:?}");
            assert_eq!(bits(&again), bits(&view), "{dtype:?}");
            let segs = Segmentation::new(k, 4).unwrap().full();
            assert_eq!(bits(&held), bits(&native_linear(rule, &x, m, &w, segs)), "{dtype:?}");
            let mut other = vec![0.0; m * n];
            make(2, 8).linear(&x, m, &w, None, &mut other);
            let segs8 = Segmentation::new(k, 8).unwrap().full();
            assert_eq!(bits(&other), bits(&native_linear(rule, &x, m, &w, segs8)), "{dtype:?}, S = 8 after S = 4");
        }
    }
}

#[test]
fn avx512bf16_model_native_bits_differ_from_portable_and_from_amx() {
    let mut rng = Rng::new(30);
    let (m, k, n) = (8, 896, 64);
    let x = rng.vec(m * k);
    let w = HostWeight::from_f32(&rng.vec(n * k), DType::Bf16, n, k);
    let (mut dp, mut amx) = (vec![0.0; m * n], vec![0.0; m * n]);
    dp_model(2, 8).linear(&x, m, &w, None, &mut dp);
    model(2, 8).linear(&x, m, &w, None, &mut amx);
    let portable = reference::linear(&x, m, w.view(), None, 8);
    let differ = |a: &[f32], b: &[f32]| bits(a).iter().zip(bits(b)).filter(|(a, b)| **a != *b).count();
    assert!(differ(&dp, &portable) > 0, "avx512bf16 gave the portable bits on all {} outputs", m * n);
    assert!(differ(&dp, &amx) > 0, "avx512bf16 gave the AMX bits on all {} outputs", m * n);
}
