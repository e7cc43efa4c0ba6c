//! The CUDA backend's kernel sources and what can be done with them without CUDA: the embedded
//! `.cu` files, the expansion NVRTC compiles, its numerics options and the PTX cache key.
//!
//! None of it needs the `cuda` feature or a CUDA library, so it is always built and its tests run
//! in the default suite; [`crate::cuda::nvrtc`] re-exports it and adds the compiler and the cache.
//! (Kept apart for the suite's sake too: the `cuda` feature's own lib tests would build the
//! kernels' dev-dependencies a second time with another feature set, minutes on a 2-core CI.)

/// One `.cu` file and the kernels (`extern "C"` entry points) it must define.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub file: &'static str,
    pub text: &'static str,
    pub entries: &'static [&'static str],
}

/// Helpers shared by every kernel file, pasted in place of its `#include "common.cuh"`.
pub const COMMON_CUH: &str = include_str!("../cuda/common.cuh");

pub const LINEAR_PORTABLE: KernelSource = KernelSource {
    file: "linear_portable.cu",
    text: include_str!("../cuda/linear_portable.cu"),
    entries: &[
        "linear_portable_f32_m1",
        "linear_portable_f32_m2",
        "linear_portable_f32_m4",
        "linear_portable_f32_m8",
        "linear_portable_bf16_m1",
        "linear_portable_bf16_m2",
        "linear_portable_bf16_m4",
        "linear_portable_bf16_m8",
        "linear_portable_f16_m1",
        "linear_portable_f16_m2",
        "linear_portable_f16_m4",
        "linear_portable_f16_m8",
        "linear_portable_q8_0_m1",
        "linear_portable_q8_0_m2",
        "linear_portable_q8_0_m4",
        "linear_portable_q8_0_m8",
        "linear_portable_q4_0_m1",
        "linear_portable_q4_0_m2",
        "linear_portable_q4_0_m4",
        "linear_portable_q4_0_m8",
        "linear_portable_q4_1_m1",
        "linear_portable_q4_1_m2",
        "linear_portable_q4_1_m4",
        "linear_portable_q4_1_m8",
        "tree_combine",
        "add_bias_f32",
        "add_bias_bf16",
        "add_bias_f16",
        "add_bias_q8_0",
        "add_bias_q4_0",
        "add_bias_q4_1",
    ],
};

pub const LINEAR_NATIVE: KernelSource = KernelSource {
    file: "linear_native.cu",
    text: include_str!("../cuda/linear_native.cu"),
    entries: &[
        "convert_x_bf16",
        "convert_x_f16",
        "linear_native_bf16_l0",
        "linear_native_bf16_l1",
        "linear_native_bf16_l2",
        "linear_native_bf16_l3",
        "linear_native_bf16_l4",
        "linear_native_bf16_l5",
        "linear_native_bf16_l6",
        "linear_native_f16_l0",
        "linear_native_f16_l1",
        "linear_native_f16_l2",
        "linear_native_f16_l3",
        "linear_native_f16_l4",
        "linear_native_f16_l5",
        "linear_native_f16_l6",
    ],
};

pub const NORM_ROPE_SWIGLU: KernelSource = KernelSource {
    file: "norm_rope_swiglu.cu",
    text: include_str!("../cuda/norm_rope_swiglu.cu"),
    entries: &[
        "rms_norm_f32",
        "rms_norm_bf16",
        "rms_norm_f16",
        "rms_norm_q8_0",
        "rms_norm_q4_0",
        "rms_norm_q4_1",
        "rope",
        "swiglu",
        "add_assign",
        "embedding_f32",
        "embedding_bf16",
        "embedding_f16",
        "embedding_q8_0",
        "embedding_q4_0",
        "embedding_q4_1",
        "gather_rows",
        "write_kv",
    ],
};

pub const ATTENTION: KernelSource =
    KernelSource { file: "attention.cu", text: include_str!("../cuda/attention.cu"), entries: &["attention_paged"] };

pub const SAMPLING: KernelSource =
    KernelSource { file: "sampling.cu", text: include_str!("../cuda/sampling.cu"), entries: &["sample_partials"] };

/// Every kernel file. The native linear needs tensor cores with bf16 (`sm_80` or newer); the rest
/// compiles for any architecture CUDA 13 supports.
pub const SOURCES: [KernelSource; 5] = [LINEAR_PORTABLE, LINEAR_NATIVE, NORM_ROPE_SWIGLU, ATTENTION, SAMPLING];

/// The options that fix the numerics, before the architecture.
pub const NUMERICS_FLAGS: [&str; 4] = ["--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true"];

/// Full NVRTC option list for virtual architecture `compute_{arch}` (e.g. 80, 90).
pub fn nvrtc_options(arch: u32) -> Vec<String> {
    let mut o: Vec<String> = NUMERICS_FLAGS.iter().map(|s| s.to_string()).collect();
    o.push(format!("--gpu-architecture=compute_{arch}"));
    o.push("--std=c++17".to_string());
    o
}

/// The source NVRTC sees: `common.cuh` pasted in place of the include, with `#line` markers so
/// compiler messages name the real file and line.
pub fn expand(src: &KernelSource) -> String {
    const INCLUDE: &str = "#include \"common.cuh\"";
    // The directive itself, at the start of a line (comments may mention it too).
    let at = src
        .text
        .match_indices(INCLUDE)
        .map(|(i, _)| i)
        .find(|&i| i == 0 || src.text.as_bytes()[i - 1] == b'\n')
        .unwrap_or_else(|| panic!("{} must include common.cuh", src.file));
    let line_after = src.text[..at].lines().count() + 2;
    format!(
        "{}#line 1 \"common.cuh\"\n{}\n#line {} \"{}\"\n{}",
        &src.text[..at],
        COMMON_CUH,
        line_after,
        src.file,
        strip_one_newline(&src.text[at + INCLUDE.len()..])
    )
}

fn strip_one_newline(s: &str) -> &str {
    s.strip_prefix("\r\n").or_else(|| s.strip_prefix('\n')).unwrap_or(s)
}

/// FNV-1a 64: a cache key, not a security boundary (the cache lives in the user's own directory).
// Only the `cuda` feature's PTX cache uses it; its test runs without.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_includes_common_and_expands_with_line_markers() {
        for s in SOURCES {
            let e = expand(&s);
            assert!(!e.lines().any(|l| l.trim_start().starts_with("#include")), "{} still includes a file", s.file);
            assert!(e.contains("#line 1 \"common.cuh\""));
            assert!(e.contains(&format!("\"{}\"", s.file)));
            for entry in s.entries {
                assert!(s.text.contains(entry), "{} does not mention {entry}", s.file);
            }
        }
    }

    #[test]
    fn device_constants_are_the_contracts_bits() {
        let want: &[(&str, f32)] = &[
            ("LS_LOG2E", std::f32::consts::LOG2_E),
            ("LS_LN2_HI", crate::math::LN2_HI),
            ("LS_LN2_LO", crate::math::LN2_LO),
            ("LS_EXP_MAX", crate::math::EXP_MAX),
            ("LS_EXP_MIN", crate::math::EXP_MIN),
            ("LS_EXP_P0", crate::math::EXP_POLY[0]),
            ("LS_EXP_P1", crate::math::EXP_POLY[1]),
            ("LS_EXP_P2", crate::math::EXP_POLY[2]),
            ("LS_EXP_P3", crate::math::EXP_POLY[3]),
            ("LS_EXP_P4", crate::math::EXP_POLY[4]),
            ("LS_EXP_P5", crate::math::EXP_POLY[5]),
            ("LS_SQRT2", std::f32::consts::SQRT_2),
            ("LS_LN_P0", 1.0 / 11.0),
            ("LS_LN_P1", 1.0 / 9.0),
            ("LS_LN_P2", 1.0 / 7.0),
            ("LS_LN_P3", 1.0 / 5.0),
            ("LS_LN_P4", 1.0 / 3.0),
            ("LS_MIN_POSITIVE", f32::MIN_POSITIVE),
            ("LS_TWO_23", 8_388_608.0),
            ("LS_TWO_M24", 1.0 / 16_777_216.0),
        ];
        assert_eq!(&crate::math::EXP_POLY[6..], &[1.0, 1.0], "the kernel hard-codes the last two coefficients");
        for (name, v) in want {
            let line = COMMON_CUH
                .lines()
                .find(|l| l.starts_with(&format!("#define {name} ")))
                .unwrap_or_else(|| panic!("{name} missing from common.cuh"));
            let hex = line.split_whitespace().nth(2).unwrap().trim_end_matches('u');
            let bits = u32::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap();
            assert_eq!(bits, v.to_bits(), "{name}: common.cuh has {hex}, the contract {:#010x}", v.to_bits());
        }
    }

    #[test]
    fn cache_key_changes_with_source_options_and_version() {
        let a = fnv1a(&[b"src", b"opts", b"v1"]);
        assert_ne!(a, fnv1a(&[b"src2", b"opts", b"v1"]));
        assert_ne!(a, fnv1a(&[b"src", b"opts2", b"v1"]));
        assert_ne!(a, fnv1a(&[b"src", b"opts", b"v2"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
