//! `Backend::linear_group` (q/k/v and gate/up in one pass over the CPU backend's threads, `x`
//! prepared once per format) gives every output exactly the bits of its own `linear` call: in
//! portable mode on every ISA path this CPU has, in both native classes' bit-exact models (and on
//! the hardware where present), for every weight type, M = 1…9 and prefill sizes, threads 1/2/3,
//! with and without bias, and for groups that mix weight types (each format prepares x once).
//!
//! Hardware executors this CPU lacks print `SKIPPED <test>: …` for their half; the rest runs
//! everywhere.

use lockstep_kernels::cpu::amx::{amx_available, AmxExec};
use lockstep_kernels::cpu::dpbf16::{avx512bf16_available, Dpbf16Exec};
use lockstep_kernels::cpu::qdot::{vnni_available, QdotExec};
use lockstep_kernels::cpu::NativeExec;
use lockstep_kernels::{
    Backend, CpuBackend, CpuConfig, DType, GroupLinear, HostWeight, Isa, KernelMode, NumericsConfig,
};

mod common;
use common::{quant_weight, ContractData, Rng};

const K: usize = 320;
/// Output widths of a q/k/v-like group: none a multiple of 16 (partial panels and tiles).
const WIDTHS: [usize; 3] = [40, 24, 24];
/// Decode sizes, a prefill size past the K-blocked tiles' 8 rows and the threaded x
/// quantization's 16, and one past a task's 64 rows.
const MS: [usize; 11] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 70];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn weight(rng: &mut Rng, dtype: DType, rows: usize) -> HostWeight {
    match dtype {
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => quant_weight(rng, dtype, rows, K),
        _ => HostWeight::from_f32(&rng.vec(rows * K), dtype, rows, K),
    }
}

/// A backend kind under test, built for a thread count.
type Make = Box<dyn Fn(usize) -> CpuBackend>;

fn config(threads: usize, mode: KernelMode, isa: Option<Isa>) -> CpuConfig {
    // Eight segments of 48 columns (K = 320 padded to 384): segments cut the 32-column blocks.
    CpuConfig { threads, isa, mode, numerics: NumericsConfig { reduce_segments: 8, ..Default::default() } }
}

/// Every backend this CPU can run: portable on each ISA path, each native class's model, and the
/// native hardware executors it has (the others are reported skipped).
fn backends(test: &str) -> Vec<(String, Make)> {
    let mut all: Vec<(String, Make)> = Vec::new();
    for isa in Isa::available() {
        all.push((
            format!("portable {}", isa.as_str()),
            Box::new(move |t| CpuBackend::new(config(t, KernelMode::Invariant, Some(isa))).unwrap()),
        ));
    }
    let native = |exec: NativeExec, qdot: QdotExec| -> Make {
        Box::new(move |t| {
            CpuBackend::with_native(config(t, KernelMode::Native, None), exec).unwrap().with_qdot_exec(qdot).unwrap()
        })
    };
    all.push(("native-amx model".into(), native(NativeExec::Amx(AmxExec::Model), QdotExec::Model)));
    all.push(("native-avx512bf16 model".into(), native(NativeExec::Avx512Bf16(Dpbf16Exec::Model), QdotExec::Model)));
    let skip = |what: &str| eprintln!("SKIPPED {test} ({what} half): CPU has no {what}");
    let qdot = if vnni_available() {
        QdotExec::Hardware
    } else {
        skip("AVX512-VNNI");
        QdotExec::Model
    };
    if avx512bf16_available() {
        all.push(("native-avx512bf16 hardware".into(), native(NativeExec::Avx512Bf16(Dpbf16Exec::Hardware), qdot)));
    } else {
        skip("AVX512-BF16");
    }
    if amx_available().is_ok() {
        all.push(("native-amx hardware".into(), native(NativeExec::Amx(AmxExec::Hardware), qdot)));
    } else {
        skip("AMX");
    }
    all
}

/// Runs `dtypes` (one per member) as one group and as separate calls, on fresh weights for each
/// (a weight's native packing is made at its first call, so the group call makes it here).
fn assert_group_equals_separate_calls(
    be: &CpuBackend,
    rng: &mut Rng,
    dtypes: [DType; 3],
    m: usize,
    bias: bool,
    label: &str,
) {
    let x = rng.vec(m * K);
    let ws: Vec<HostWeight> = dtypes.iter().zip(WIDTHS).map(|(&d, n)| weight(rng, d, n)).collect();
    let biases: Vec<Option<HostWeight>> =
        WIDTHS.iter().map(|&n| bias.then(|| HostWeight::from_f32(&rng.vec(n), DType::F32, 1, n))).collect();
    let mut grouped: Vec<Vec<f32>> = WIDTHS.iter().map(|&n| vec![f32::NAN; m * n]).collect();
    {
        let mut group: Vec<GroupLinear<'_, HostWeight, Vec<f32>>> = ws
            .iter()
            .zip(&biases)
            .zip(grouped.iter_mut())
            .map(|((w, b), out)| GroupLinear { weight: w, bias: b.as_ref(), out })
            .collect();
        be.linear_group(&x, m, &mut group);
    }
    for (i, ((w, b), got)) in ws.iter().zip(&biases).zip(&grouped).enumerate() {
        let mut alone = vec![f32::NAN; m * w.rows];
        be.linear(&x, m, w, b.as_ref(), &mut alone);
        assert_eq!(bits(got), bits(&alone), "{label}: member {i} ({:?}) of {dtypes:?}, M={m}, bias={bias}", w.dtype);
    }
}

#[test]
fn a_linear_group_gives_each_output_the_bits_of_its_own_call_in_every_mode_and_weight_type() {
    let test = "a_linear_group_gives_each_output_the_bits_of_its_own_call_in_every_mode_and_weight_type";
    let mut rng = Rng::new(0x6c69_6e67);
    for (name, make) in backends(test) {
        for threads in [1, 2, 3] {
            let be = make(threads);
            for dtype in [DType::Bf16, DType::F16, DType::F32, DType::Q8_0, DType::Q4_0, DType::Q4_1] {
                for m in MS {
                    // Bias on every other size: both kinds meet every path.
                    let bias = m % 2 == 1;
                    assert_group_equals_separate_calls(
                        &be,
                        &mut rng,
                        [dtype; 3],
                        m,
                        bias,
                        &format!("{name} t={threads}"),
                    );
                }
            }
        }
    }
}

/// A group whose members are of different types prepares x once per format and still gives each
/// member its own call's bits (as GGUF files mix types between q, k and v).
#[test]
fn a_linear_group_of_mixed_weight_types_gives_each_output_the_bits_of_its_own_call() {
    let test = "a_linear_group_of_mixed_weight_types_gives_each_output_the_bits_of_its_own_call";
    let mut rng = Rng::new(0x6d69_7864);
    for (name, make) in backends(test) {
        for threads in [1, 2] {
            let be = make(threads);
            for dtypes in [[DType::Q4_1, DType::Q8_0, DType::F32], [DType::Bf16, DType::Q4_0, DType::F16]] {
                for m in [1, 3, 9, 33] {
                    assert_group_equals_separate_calls(
                        &be,
                        &mut rng,
                        dtypes,
                        m,
                        m == 3,
                        &format!("{name} t={threads}"),
                    );
                }
            }
        }
    }
}
