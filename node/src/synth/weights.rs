//! The weights synth writes: safetensors files (one, or shards of roughly equal size), every
//! tensor drawn from its own keyed stream so a value depends on (seed, tensor name, index) only.

use std::io::Write;
use std::path::Path;

use lockstep_kernels::splitmix::SplitMix64;
use lockstep_kernels::DType;

use super::presets::{Init, TensorSpec};
use crate::error::{LoadError, Result};
use crate::weights::{INDEX_FILE, SINGLE_FILE};

/// Weights from an earlier synth into the same directory would shadow or mix with the new ones
/// (a leftover `model.safetensors` wins over a new index), so remove exactly those file names.
pub(super) fn remove_stale_weights(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| LoadError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SINGLE_FILE || name == INDEX_FILE || is_shard_name(&name) {
            std::fs::remove_file(entry.path()).map_err(|e| LoadError::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// `model-DDDDD-of-DDDDD.safetensors`
fn is_shard_name(name: &str) -> bool {
    let Some(mid) = name.strip_prefix("model-").and_then(|s| s.strip_suffix(".safetensors")) else {
        return false;
    };
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    matches!(mid.split_once("-of-"), Some((a, b)) if digits(a) && digits(b))
}

/// Cut the tensor list (in model order) into `n` consecutive groups of roughly equal bytes.
pub(super) fn split_into_shards(tensors: &[TensorSpec], dtype: DType, n: usize) -> Vec<&[TensorSpec]> {
    let bytes = |t: &TensorSpec| (t.numel() * dtype.size()) as u64;
    let total: u64 = tensors.iter().map(bytes).sum();
    let mut groups = Vec::with_capacity(n);
    let (mut start, mut acc) = (0, 0u64);
    for (i, t) in tensors.iter().enumerate() {
        acc += bytes(t);
        let left_tensors = tensors.len() - (i + 1);
        let left_groups = n - groups.len() - 1;
        // Close a group once it reaches its share, keeping at least one tensor per later group.
        let reached = acc * n as u64 >= total * (groups.len() as u64 + 1);
        if left_groups > 0 && (reached || left_tensors == left_groups) {
            groups.push(&tensors[start..=i]);
            start = i + 1;
        }
    }
    groups.push(&tensors[start..]);
    groups
}

// ---------------------------------------------------------------------------------------------
// Random numbers

/// FNV-1a over a name, to key each tensor's stream.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3))
}

/// Tensor `name`'s own stream: a value does not depend on which tensors are written before it.
fn tensor_stream(seed: u64, name: &str) -> SplitMix64 {
    // Mix once so that nearby seeds do not give related streams.
    SplitMix64::new(SplitMix64::mix(seed ^ fnv1a(name)))
}

// ---------------------------------------------------------------------------------------------
// Safetensors writer

/// Write one safetensors file holding `tensors`; returns the bytes of tensor data.
pub(super) fn write_safetensors(path: &Path, tensors: &[TensorSpec], seed: u64, dtype: DType) -> Result<u64> {
    let io = |e| LoadError::io(path, e);
    // The header, in writing order, by hand: fixed layout whatever serde_json's features.
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0usize;
    for t in tensors {
        let len = t.numel() * dtype.size();
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            r#","{}":{{"dtype":"{}","shape":[{}],"data_offsets":[{},{}]}}"#,
            t.name,
            dtype.safetensors_tag(),
            shape.join(","),
            offset,
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    // Pad with spaces so the data starts 8-byte aligned (8 + header length is a multiple of 8).
    let padded = header.len().next_multiple_of(8);
    header.extend(std::iter::repeat_n(' ', padded - header.len()));

    let file = std::fs::File::create(path).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    // Stream each tensor in chunks: memory stays at one chunk whatever the model size.
    const CHUNK: usize = 1 << 20;
    let mut buf = Vec::with_capacity(CHUNK * 4);
    for t in tensors {
        let mut rng = tensor_stream(seed, &t.name);
        let mut left = t.numel();
        while left > 0 {
            let n = left.min(CHUNK);
            buf.clear();
            fill(&mut buf, &mut rng, t.init, n, dtype);
            w.write_all(&buf).map_err(io)?;
            left -= n;
        }
    }
    // No fsync: a crash mid-write leaves a file the loader reports as truncated.
    w.flush().map_err(io)?;
    Ok(offset as u64)
}

fn fill(buf: &mut Vec<u8>, rng: &mut SplitMix64, init: Init, n: usize, dtype: DType) {
    let value = |rng: &mut SplitMix64| match init {
        Init::Normal(std) => std * rng.normal_f32(),
        Init::AroundOne(std) => 1.0 + std * rng.normal_f32(),
    };
    // Monomorphic loops per dtype: this is the hot path of a multi-gigabyte write.
    match dtype {
        DType::F32 => (0..n).for_each(|_| buf.extend_from_slice(&value(rng).to_le_bytes())),
        DType::Bf16 => (0..n).for_each(|_| buf.extend_from_slice(&half::bf16::from_f32(value(rng)).to_le_bytes())),
        DType::F16 => (0..n).for_each(|_| buf.extend_from_slice(&half::f16::from_f32(value(rng)).to_le_bytes())),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => unreachable!("synth_with refuses block types"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{synth_with, Preset, SynthOptions};
    use crate::weights::tests::TempDir;

    #[test]
    fn shard_split_is_balanced_and_complete() {
        let tensors = Preset::Tiny.spec().tensors();
        for n in [1, 2, 3, 5, tensors.len()] {
            let groups = split_into_shards(&tensors, DType::F32, n);
            assert_eq!(groups.len(), n);
            assert!(groups.iter().all(|g| !g.is_empty()));
            assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), tensors.len());
        }
        assert!(is_shard_name("model-00001-of-00002.safetensors"));
        assert!(!is_shard_name("model-1-of-2.safetensors"));
        let dir = TempDir::new("synth-badshards");
        let e = synth_with(Preset::Tiny, 1, DType::F32, dir.path(), &SynthOptions { shards: 0 }).unwrap_err();
        assert!(e.to_string().contains("shards"), "{e}");
    }
}
