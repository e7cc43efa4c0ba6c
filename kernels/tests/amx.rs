//! CPU native numerics (AMX, `native-amx`): the tile program equals a plain restatement of the
//! native rule (docs/DESIGN.md §2.2) bit for bit, and no bit depends on the batch, the thread
//! count or the tensor-parallel split.
//!
//! Every check runs twice: on the software model of the tile unit (`CpuBackend::with_amx_model`,
//! everywhere) and on the CPU's tile unit (`CpuBackend::new` in native mode), which only a CPU
//! with AMX can run — elsewhere those tests print `SKIPPED <test>: CPU has no AMX` and pass (a
//! hardware skip, not a missing file). The model shares the packing, the tile configuration and
//! the instruction order with the `asm!` path, so the model tests check those on any machine.

use lockstep_kernels::cpu::amx::amx_available;
use lockstep_kernels::{
    reference, Backend, CpuBackend, CpuConfig, DType, HostWeight, KernelError, KernelMode, NumericsConfig,
    SegmentRange, Segmentation,
};

mod common;
use common::{assert_rows_alone_equal_batched, columns_of, quant_weight, ContractData, Rng};

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

/// How a test gets a native backend: the software model, or the tile unit.
type Make = fn(usize, usize) -> CpuBackend;

fn model(threads: usize, segments: usize) -> CpuBackend {
    CpuBackend::with_amx_model(config(threads, segments)).unwrap()
}

fn hardware(threads: usize, segments: usize) -> CpuBackend {
    CpuBackend::new(config(threads, segments)).unwrap()
}

/// The hardware variant of a check, or a printed skip where this CPU cannot run tiles.
fn on_hardware(test: &str, check: fn(Make)) {
    match amx_available() {
        Ok(()) => check(hardware),
        // Straight to the stderr handle: libtest hides the printed output of passing tests, and a
        // skip must be seen.
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: CPU has no AMX ({e})");
        }
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
    let planes: Vec<Vec<f32>> = match dtype {
        DType::Bf16 => vec![w.to_vec()],
        DType::F16 => {
            let hi: Vec<f32> = w.iter().map(|&v| bf16(v)).collect();
            let lo = w.iter().zip(&hi).map(|(&v, &h)| bf16(v - h)).collect();
            vec![hi, lo]
        }
        other => panic!("{other:?} is not a tile type"),
    };
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

fn native_linear(x: &[f32], m: usize, w: &HostWeight, segs: SegmentRange) -> Vec<f32> {
    let (k, wf) = (w.cols, w.view().to_f32());
    (0..m)
        .flat_map(|i| {
            let wf = &wf;
            (0..w.rows).map(move |j| native_dot(&x[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k], w.dtype, segs))
        })
        .collect()
}

// ---------------------------------------------------------------- the checks

fn equals_the_rule_on_random_shapes(make: Make) {
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
        assert_eq!(bits(&y), bits(&native_linear(&x, m, &w, segs)), "m={m} k={k} n={n} S={segments} {dtype:?}");
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

#[test]
fn model_tile_program_equals_the_native_rule_on_random_shapes() {
    equals_the_rule_on_random_shapes(model)
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
    on_hardware("amx_tile_program_equals_the_native_rule_on_random_shapes", equals_the_rule_on_random_shapes)
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
        let mut rng = Rng::new(25);
        for dtype in [DType::Bf16, DType::F16] {
            let (m, k, n) = (37, 517, 45);
            let x = rng.vec(m * k);
            let w = HostWeight::from_f32(&rng.vec(n * k), dtype, n, k);
            let (mut a, mut b) = (vec![0.0; m * n], vec![0.0; m * n]);
            hw(2, 8).linear(&x, m, &w, None, &mut a);
            model(2, 8).linear(&x, m, &w, None, &mut b);
            assert_eq!(bits(&a), bits(&b), "{dtype:?}");
        }
    })
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

/// f32 and GGUF block weights have no tile path: native mode runs them on the portable kernels,
/// bit for bit the contract's.
#[test]
fn native_mode_keeps_the_portable_bits_for_f32_and_block_weights() {
    let mut rng = Rng::new(27);
    let (m, k, n) = (5, 256, 19);
    let x = rng.vec(m * k);
    let weights = [
        HostWeight::from_f32(&rng.vec(n * k), DType::F32, n, k),
        quant_weight(&mut rng, DType::Q8_0, n, k),
        quant_weight(&mut rng, DType::Q4_0, n, k),
        quant_weight(&mut rng, DType::Q4_1, n, k),
    ];
    for w in &weights {
        let mut y = vec![0.0; m * n];
        model(2, 8).linear(&x, m, w, None, &mut y);
        assert_eq!(bits(&y), bits(&reference::linear(&x, m, w.view(), None, 8)), "{:?}", w.dtype);
    }
}

/// Where the CPU or Linux cannot run tiles, native mode refuses to start and says what is
/// missing and what to use instead; where they can, it starts.
#[test]
fn native_mode_starts_only_where_amx_runs_and_says_what_is_missing() {
    match (amx_available(), CpuBackend::new(config(1, 8))) {
        (Ok(()), Ok(be)) => assert_eq!(be.fingerprint_name(), "native-amx"),
        (Err(_), Err(e @ KernelError::AmxUnavailable(_))) => {
            let msg = e.to_string();
            assert!(msg.contains("cpu native numerics need AMX"), "{msg}");
            assert!(msg.contains("--numerics portable"), "{msg}");
        }
        (probe, started) => panic!("probe {probe:?} but start {:?}", started.map(|_| ())),
    }
}
