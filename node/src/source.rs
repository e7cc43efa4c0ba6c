//! Where a model comes from: a Hugging Face directory (`config.json` + safetensors) or one GGUF
//! file. `--model` takes either; everything downstream asks this module for the config and for
//! tensors by their Hugging Face names, so the forward pass, the shard plan and the fingerprint
//! have one code path for both formats.

use std::ops::Range;
use std::path::Path;

use lockstep_kernels::{DType, HostWeight};

use crate::config::ModelConfig;
use crate::error::{LoadError, Result};
use crate::gguf::{is_gguf_path, GgufFile, GgufModel};
use crate::weights::{SafetensorsRepo, WeightFile};

/// The config of the model at `path` (a HF directory or a `.gguf` file).
pub fn load_config(path: &Path) -> Result<ModelConfig> {
    if is_gguf_path(path) {
        GgufFile::open(path)?.config()
    } else {
        ModelConfig::from_dir(path)
    }
}

/// The tensors of a model, by Hugging Face name.
#[derive(Debug)]
pub enum WeightStore {
    Safetensors(SafetensorsRepo),
    Gguf(GgufModel),
}

impl WeightStore {
    /// Open the model at `path`: a `.gguf` file, else a HF directory.
    pub fn open(path: &Path) -> Result<Self> {
        if is_gguf_path(path) {
            Ok(WeightStore::Gguf(GgufModel::open(path)?))
        } else {
            Ok(WeightStore::Safetensors(SafetensorsRepo::open(path)?))
        }
    }

    /// The shape of a tensor as HF writes it (`[out, in]` matrices, 1-D vectors).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        match self {
            WeightStore::Safetensors(r) => Ok(r.info(name)?.shape.clone()),
            WeightStore::Gguf(g) => g.shape(name),
        }
    }

    /// The file a tensor is read from (for error messages).
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        match self {
            WeightStore::Safetensors(r) => r.file_of(name),
            WeightStore::Gguf(g) => Ok(g.file().path()),
        }
    }

    /// A tensor whose shape must be `shape`.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let got = self.shape(name)?;
        if got != shape {
            return Err(LoadError::ShapeMismatch {
                file: self.file_of(name)?.to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got,
            });
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<HostWeight> {
        match self {
            WeightStore::Safetensors(r) => r.get(name),
            WeightStore::Gguf(g) => g.get(name),
        }
    }

    pub fn get_rows(&self, name: &str, rows: Range<usize>) -> Result<HostWeight> {
        match self {
            WeightStore::Safetensors(r) => r.get_rows(name, rows),
            WeightStore::Gguf(g) => g.get_rows(name, rows),
        }
    }

    pub fn get_cols(&self, name: &str, cols: Range<usize>) -> Result<HostWeight> {
        match self {
            WeightStore::Safetensors(r) => r.get_cols(name, cols),
            WeightStore::Gguf(g) => g.get_cols(name, cols),
        }
    }

    /// Every file the weights consist of, for the content hash.
    pub fn all_files(&self) -> Vec<WeightFile> {
        match self {
            WeightStore::Safetensors(r) => r.all_files(),
            WeightStore::Gguf(g) => vec![g.file().weight_file()],
        }
    }

    /// The distinct dtypes of the tensors as the kernels get them, sorted `f32 < bf16 < f16`.
    pub fn dtypes(&self) -> Result<Vec<DType>> {
        match self {
            WeightStore::Safetensors(r) => Ok(r.dtypes()),
            WeightStore::Gguf(g) => g.dtypes(),
        }
    }
}
