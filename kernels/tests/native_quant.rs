//! CPU native numerics for block weights (Q8_0, Q4_0, Q4_1; `cpu::qdot`, docs/DESIGN.md §2.2):
//! the AVX512-VNNI kernels give the bits of the rule's scalar model, no bit depends on the batch,
//! the thread count or the tensor-parallel split, and the result stays close to the contract's
//! f32 result (so a wrong formula fails, not just an inconsistent one).
//!
//! Hardware checks print `SKIPPED <test>: CPU has no AVX512-VNNI` and pass where the CPU lacks
//! the instruction; the model checks run everywhere.

use lockstep_kernels::cpu::dpbf16::Dpbf16Exec;
use lockstep_kernels::cpu::qdot::{vnni_available, QdotExec};
use lockstep_kernels::cpu::NativeExec;
use lockstep_kernels::{
    reference, Backend, CpuBackend, CpuConfig, DType, GroupLinear, HostWeight, KernelMode, NumericsConfig, Segmentation,
};

mod common;
use common::{assert_rows_alone_equal_batched, columns_of, quant_weight, ContractData, Rng};

const BLOCK_TYPES: [DType; 3] = [DType::Q8_0, DType::Q4_0, DType::Q4_1];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn backend(threads: usize, segments: usize, exec: QdotExec) -> CpuBackend {
    let cfg = CpuConfig {
        threads,
        isa: None,
        mode: KernelMode::Native,
        numerics: NumericsConfig { reduce_segments: segments, ..Default::default() },
    };
    CpuBackend::with_native(cfg, NativeExec::Avx512Bf16(Dpbf16Exec::Model)).unwrap().with_qdot_exec(exec).unwrap()
}

fn skip_without_vnni(test: &str) -> bool {
    if vnni_available() {
        return false;
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: CPU has no AVX512-VNNI");
    true
}

/// The model everywhere, and the hardware where the CPU has it (else a printed skip of that half).
fn model_and_hardware(test: &str) -> Vec<QdotExec> {
    let hardware = !skip_without_vnni(&format!("{test} (hardware half)"));
    [QdotExec::Model].into_iter().chain(hardware.then_some(QdotExec::Hardware)).collect()
}

fn linear(be: &CpuBackend, x: &[f32], m: usize, w: &HostWeight) -> Vec<f32> {
    let mut y = vec![0.0; m * w.rows];
    be.linear(&x.to_vec(), m, w, None, &mut y);
    y
}

/// Every M from 1 to 64, threads 1, 2 and 3, the held (cached packing) and the bare-view path:
/// the VNNI tiles give the model's bits, for each block type, with segments that cut blocks
/// (K = 576 in 8 segments of 80 columns) and ones that do not.
#[test]
fn qdot_hardware_equals_the_model_bitwise_for_m_1_to_64_threads_1_2_3() {
    if skip_without_vnni("qdot_hardware_equals_the_model_bitwise_for_m_1_to_64_threads_1_2_3") {
        return;
    }
    let mut rng = Rng::new(41);
    for (case, (k, n, segments)) in [(576, 37, 8), (96, 50, 1), (1536, 19, 3), (32, 17, 4)].into_iter().enumerate() {
        let dtype = BLOCK_TYPES[case % 3];
        let w = quant_weight(&mut rng, dtype, n, k);
        let x = rng.vec(64 * k);
        let model = linear(&backend(2, segments, QdotExec::Model), &x, 64, &w);
        for threads in [1, 2, 3] {
            let hw = backend(threads, segments, QdotExec::Hardware);
            for m in 1..=64 {
                let got = linear(&hw, &x[..m * k], m, &w);
                assert_eq!(bits(&got), bits(&model[..m * n]), "{dtype:?} k={k} n={n} S={segments} M={m} t={threads}");
            }
            let mut view = vec![0.0; 64 * n];
            hw.linear_into(&x, 64, w.view(), None, &mut view);
            assert_eq!(bits(&view), bits(&model), "{dtype:?} bare view, t={threads}");
        }
    }
    // Every block type on every tile shape once more, on the shapes of SmolLM2's projections.
    for dtype in BLOCK_TYPES {
        let w = quant_weight(&mut rng, dtype, 100, 576);
        let x = rng.vec(9 * 576);
        for m in 1..=9 {
            let want = linear(&backend(1, 8, QdotExec::Model), &x[..m * 576], m, &w);
            assert_eq!(bits(&linear(&backend(2, 8, QdotExec::Hardware), &x[..m * 576], m, &w)), bits(&want));
        }
    }
}

/// Held weights pack at their first call, back to back in their backend's arena (where a
/// tile's prefetch runs on past a packing's end into the next one's): each gives the bits of a
/// packing of its own (the bare-view path) and of the model, for every block type, with
/// packings whose ends fall inside a cache line (Q8_0 at K = 96: 1632-byte panels).
#[test]
fn qdot_weights_packed_back_to_back_in_the_arena_equal_their_own_packings_and_the_model() {
    if skip_without_vnni("qdot_weights_packed_back_to_back_in_the_arena_equal_their_own_packings_and_the_model") {
        return;
    }
    let mut rng = Rng::new(43);
    for k in [96, 576] {
        let weights: Vec<HostWeight> = [(DType::Q8_0, 33), (DType::Q4_1, 37), (DType::Q8_0, 1), (DType::Q4_0, 50)]
            .into_iter()
            .map(|(dtype, n)| quant_weight(&mut rng, dtype, n, k))
            .collect();
        let x = rng.vec(3 * k);
        let (hw, model) = (backend(2, 4, QdotExec::Hardware), backend(2, 4, QdotExec::Model));
        for m in [1, 3, 1] {
            for w in &weights {
                let got = linear(&hw, &x[..m * k], m, w);
                let mut own = vec![0.0; m * w.rows];
                hw.linear_into(&x[..m * k], m, w.view(), None, &mut own);
                let what = format!("{:?} k={k} n={} M={m}", w.dtype, w.rows);
                assert_eq!(bits(&got), bits(&own), "arena vs own packing: {what}");
                assert_eq!(bits(&got), bits(&linear(&model, &x[..m * k], m, w)), "arena vs model: {what}");
            }
        }
    }
}

/// A row's bits are the same alone as inside every batch of 1 to 64 rows, on the model and on
/// the hardware.
#[test]
fn qdot_rows_are_identical_alone_and_inside_batches_of_1_to_64() {
    let mut rng = Rng::new(42);
    for exec in model_and_hardware("qdot_rows_are_identical_alone_and_inside_batches_of_1_to_64") {
        for dtype in BLOCK_TYPES {
            let (k, n) = (320, 45);
            let w = quant_weight(&mut rng, dtype, n, k);
            let x = rng.vec(64 * k);
            assert_rows_alone_equal_batched(&backend(2, 4, exec), &w, &x, k, &format!("{dtype:?} {exec:?}"));
        }
    }
}

/// Row-parallel shards cut on whole blocks (TP 2 and 4 of 8 segments, 3 and 6 of 6; K = 576
/// whose 8 segments of 80 columns cut blocks inside the shards) recombine through `tree_combine`
/// to the unsplit bits.
/// Passes whose tasks do and do not divide evenly among the threads (a task split or packing that
/// followed the thread count was tried, BENCHMARKS §20.3): SmolLM2's o/down (36 panels), its
/// q/k/v group (36 + 12 + 12), Qwen2.5's o (56), a ragged 37 and a group of ragged widths, at
/// threads 1 to 4, batch 1 and 8, on weights packed by this backend and on ones packed by another
/// (the first one's): every output has the bits of the scalar model on one thread.
#[test]
fn qdot_tasks_cut_evenly_or_not_among_threads_1_to_4_give_the_models_bits() {
    if skip_without_vnni("qdot_tasks_cut_evenly_or_not_among_threads_1_to_4_give_the_models_bits") {
        return;
    }
    let (k, segments) = (576, 8);
    let mut rng = Rng::new(43);
    let groups: [&[usize]; 5] = [&[576], &[576, 192, 192], &[896], &[592], &[584, 200, 40]];
    for (case, widths) in groups.into_iter().enumerate() {
        let dtype = BLOCK_TYPES[case % 3];
        let ws: Vec<HostWeight> = widths.iter().map(|&n| quant_weight(&mut rng, dtype, n, k)).collect();
        let x = rng.vec(8 * k);
        let model = backend(1, segments, QdotExec::Model);
        for m in [1, 8] {
            let want: Vec<Vec<f32>> = ws.iter().map(|w| linear(&model, &x[..m * k], m, w)).collect();
            for (threads, packed_here) in (1..=4).flat_map(|t| [(t, true), (t, false)]) {
                let hw = backend(threads, segments, QdotExec::Hardware);
                let fresh: Vec<HostWeight> =
                    ws.iter().map(|w| HostWeight::new(w.dtype, w.bytes.clone(), w.rows, w.cols).unwrap()).collect();
                let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
                let weights = if packed_here { &fresh } else { &ws };
                let mut group: Vec<GroupLinear<'_, HostWeight, Vec<f32>>> = weights
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(w, out)| GroupLinear { weight: w, bias: None, out })
                    .collect();
                hw.linear_group(&x[..m * k].to_vec(), m, &mut group);
                for (i, (got, want)) in outs.iter().zip(&want).enumerate() {
                    let label = format!("{dtype:?} widths {widths:?} member {i} M={m} t={threads} here={packed_here}");
                    assert_eq!(bits(got), bits(want), "{label}");
                }
            }
        }
    }
}

#[test]
fn qdot_row_parallel_shards_tp_1_2_3_4_6_plus_tree_combine_equal_unsplit() {
    let mut rng = Rng::new(43);
    for exec in model_and_hardware("qdot_row_parallel_shards_tp_1_2_3_4_6_plus_tree_combine_equal_unsplit") {
        for (case, (segments, degrees)) in [(8, &[1, 2, 4][..]), (6, &[1, 3, 6])].into_iter().enumerate() {
            for dtype in BLOCK_TYPES {
                let (m, k, n) = (5 + case, 576, 40);
                let w = quant_weight(&mut rng, dtype, n, k);
                let x = rng.vec(m * k);
                let be = backend(2, segments, exec);
                let full = linear(&be, &x, m, &w);
                let seg = Segmentation::new(k, segments).unwrap();
                for &t in degrees {
                    let parts: Vec<Vec<f32>> = (0..t)
                        .map(|r| {
                            let segs = seg.shard(r, t).unwrap();
                            let cols = segs.real_range();
                            let mut p = vec![0.0; m * n];
                            be.linear_partial(
                                &columns_of(&x, k, cols.clone()),
                                m,
                                &w.columns(cols).unwrap(),
                                segs,
                                &mut p,
                            );
                            p
                        })
                        .collect();
                    let mut y = vec![0.0; m * n];
                    be.tree_combine(&parts.iter().collect::<Vec<_>>(), &mut y);
                    assert_eq!(bits(&y), bits(&full), "{dtype:?} {exec:?} S={segments} t={t}");
                }
            }
        }
    }
}

/// The integer rule approximates the exact dot product as int8 activations must: per block the
/// error is at most half a quantization step of x times the block's Σ|w| (plus f32 rounding), so
/// a wrong formula (a missing offset, a swapped nibble half, a wrong scale) fails. And it is not
/// the contract: the bits differ from the portable kernels'.
#[test]
fn qdot_results_are_within_the_int8_activation_bound_of_the_exact_dot() {
    let mut rng = Rng::new(44);
    let (m, k, n) = (6, 576, 48);
    for dtype in BLOCK_TYPES {
        let w = quant_weight(&mut rng, dtype, n, k);
        let wf = w.view().to_f32();
        let x = rng.vec(m * k);
        let got = linear(&backend(2, 8, QdotExec::best()), &x, m, &w);
        let portable = reference::linear(&x, m, w.view(), None, 8);
        assert_ne!(bits(&got), bits(&portable), "{dtype:?}: native gave the portable bits");
        for i in 0..m {
            for o in 0..n {
                let (xr, wr) = (&x[i * k..(i + 1) * k], &wf[o * k..(o + 1) * k]);
                let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
                let magnitude: f64 = xr.iter().zip(wr).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                let bound: f64 = xr
                    .chunks(32)
                    .zip(wr.chunks(32))
                    .map(|(xb, wb)| {
                        let amax = xb.iter().fold(0f64, |a, &v| a.max(v.abs() as f64));
                        amax / 254.0 * wb.iter().map(|&v| v.abs() as f64).sum::<f64>()
                    })
                    .sum::<f64>()
                    * 1.0001
                    + 1e-5 * magnitude;
                let err = (got[i * n + o] as f64 - exact).abs();
                assert!(
                    err <= bound,
                    "{dtype:?} row {i} output {o}: {} vs exact {exact}, bound {bound}",
                    got[i * n + o]
                );
            }
        }
    }
}
