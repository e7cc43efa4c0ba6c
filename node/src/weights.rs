//! Safetensors weights: memory-mapped, validated, handed out zero-copy.
//!
//! A model directory holds either one `model.safetensors` or a shard index
//! `model.safetensors.index.json` naming `model-0000i-of-0000n.safetensors` files (as transformers
//! writes them; a single file wins when both exist, as in transformers). Every file is
//! memory-mapped once (asking for 2 MiB pages, [`map_model_file`]) and shared through an `Arc<Mmap>`; a [`HostWeight`] is a [`SharedBytes`]
//! range over that map, so loading a 1B model costs page-table entries, not gigabytes of copies,
//! and a tensor-parallel rank that takes [`SafetensorsRepo::get_rows`] only ever touches (pages in)
//! its own rows.
//!
//! The safetensors header is parsed here rather than with the `safetensors` crate so that each
//! check produces an error naming the file and tensor: the 8-byte little-endian header length
//! must be sane (< 100 MB) and inside the file, the header must be a JSON object of
//! `{dtype, shape, data_offsets}` entries (`__metadata__` ignored), each tensor's byte length must
//! equal `product(shape) × dtype size`, its range must lie inside the file (a truncated download
//! is reported as [`LoadError::Truncated`] with the first tensor that is cut off) and tensors must
//! not overlap. Dtypes stay as stored (F32, BF16, F16; widening to f32 happens in the kernels and
//! is exact); anything else is rejected with the tensor's name.
//!
//! Memory-mapping a file that another process truncates or rewrites while we run is undefined
//! behaviour in principle (the same caveat as every mmap-based loader); model files are treated
//! as immutable, and the determinism fingerprint hashes their content.
//!
//! [`LlamaWeights`] then reads every tensor of a Llama / Qwen2 model with HF's names, checking each
//! shape against the [`ModelConfig`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lockstep_kernels::{DType, HostWeight, SharedBytes};
use memmap2::Mmap;
use serde_json::Value;

use crate::config::ModelConfig;
use crate::error::{LoadError, Result};

/// File name of an unsharded model.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded model's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Largest header accepted. Real headers are kilobytes to a few MB; a bigger length field means a
/// corrupt or non-safetensors file, and refusing it avoids parsing garbage.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Where one tensor lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range inside the file (absolute, i.e. already past the header).
    pub bytes: Range<usize>,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The `[rows, cols]` a [`HostWeight`] gets: a 1-D tensor is one row, a scalar is `[1, 1]`,
    /// higher ranks fold their leading dimensions into rows.
    pub fn matrix_dims(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [lead @ .., last] => (lead.iter().product(), *last),
        }
    }
}

/// Map a model file read-only, asking for 2 MiB pages.
///
/// A batch-1 decode step streams every weight once; with 4 KiB pages that is a TLB miss (a
/// nested page walk in a VM) every 4 KiB, and the decode tiles spent ~15 % more CPU per token on
/// the synthetic Qwen2.5-0.5B than with the weights on 2 MiB pages (BENCHMARKS §2.2).
/// `MADV_HUGEPAGE` makes the kernel fill the page cache with 2 MiB folios when the mapping faults
/// the file in, and map them whole; pages already cached in small folios (the file was read
/// before without the hint) stay small until the cache drops them. A hint: where the kernel has
/// no transparent huge pages for files, nothing changes.
///
/// # Safety
/// As [`Mmap::map`]: the file must not be modified or truncated while mapped.
pub(crate) unsafe fn map_model_file(file: &std::fs::File) -> std::io::Result<Mmap> {
    // SAFETY: the caller keeps the file unmodified while mapped (this function's contract).
    let map = unsafe { Mmap::map(file) }?;
    #[cfg(target_os = "linux")]
    {
        // Refused (EINVAL) where THP is compiled out: the map is as good as without the hint.
        let _ = map.advise(memmap2::Advice::HugePage);
    }
    Ok(map)
}

/// One memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    len: u64,
    map: Arc<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Map and validate one file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| LoadError::io(&path, e))?;
        let len = file.metadata().map_err(|e| LoadError::io(&path, e))?.len();
        let corrupt = |reason: String| LoadError::CorruptHeader { file: path.clone(), reason };
        if len < 8 {
            return Err(corrupt(format!("the file has {len} bytes, fewer than the 8-byte header length")));
        }
        // SAFETY: the map is read-only and model files are treated as immutable while served
        // (see the module docs); all reads are bounds-checked against `len` below.
        let map = unsafe { map_model_file(&file) }.map_err(|e| LoadError::io(&path, e))?;
        let header_len = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
        if header_len > MAX_HEADER_BYTES {
            return Err(corrupt(format!("header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")));
        }
        if 8 + header_len > len {
            return Err(corrupt(format!(
                "header length {header_len} runs past the end of the {len}-byte file (truncated?)"
            )));
        }
        let data_start = 8 + header_len as usize;
        let header: Value = serde_json::from_slice(&map[8..data_start])
            .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let entries = header.as_object().ok_or_else(|| corrupt("header is not a JSON object".into()))?;

        let mut tensors = BTreeMap::new();
        for (name, entry) in entries {
            if name == "__metadata__" {
                continue;
            }
            let info = parse_entry(&path, name, entry, data_start, len)?;
            tensors.insert(name.clone(), info);
        }

        // Overlapping tensors mean a corrupt header (and aliasing weights would be a silent bug).
        let mut by_start: Vec<(&String, &TensorInfo)> = tensors.iter().collect();
        by_start.sort_by_key(|(_, t)| (t.bytes.start, t.bytes.end));
        for pair in by_start.windows(2) {
            let ((a, ta), (b, tb)) = (pair[0], pair[1]);
            if tb.bytes.start < ta.bytes.end {
                return Err(corrupt(format!("tensors {a:?} and {b:?} overlap")));
            }
        }

        Ok(SafetensorsFile { path, len, map: Arc::new(map), tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }

    fn shared(&self, range: Range<usize>) -> SharedBytes {
        SharedBytes::file_mapped(self.map.clone(), range)
    }
}

fn parse_entry(path: &Path, name: &str, entry: &Value, data_start: usize, file_len: u64) -> Result<TensorInfo> {
    let corrupt = |what: String| LoadError::CorruptHeader {
        file: path.to_path_buf(),
        reason: format!("tensor {name:?}: {what}"),
    };
    let obj = entry.as_object().ok_or_else(|| corrupt("entry is not an object".into()))?;
    let tag = obj.get("dtype").and_then(Value::as_str).ok_or_else(|| corrupt("missing dtype".into()))?;
    let shape: Vec<usize> = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| corrupt("missing shape".into()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| corrupt("shape is not a list of non-negative integers".into()))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
        .ok_or_else(|| corrupt("data_offsets is not a pair of non-negative integers".into()))?;
    let (begin, end) = offsets;
    if begin > end {
        return Err(corrupt(format!("data_offsets [{begin}, {end}] has begin > end")));
    }
    let dtype = DType::from_safetensors(tag).ok_or_else(|| LoadError::UnsupportedDType {
        file: path.to_path_buf(),
        name: name.to_string(),
        dtype: tag.to_string(),
    })?;
    let need = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| corrupt(format!("shape {shape:?} overflows")))?;
    if end - begin != need {
        return Err(corrupt(format!(
            "data_offsets [{begin}, {end}] hold {} bytes, but shape {shape:?} of {tag} needs {need}",
            end - begin
        )));
    }
    let abs_end = (data_start as u64).saturating_add(end);
    if abs_end > file_len {
        return Err(LoadError::Truncated {
            file: path.to_path_buf(),
            name: name.to_string(),
            needed: abs_end,
            file_len,
        });
    }
    Ok(TensorInfo { dtype, shape, bytes: data_start + begin as usize..abs_end as usize })
}

/// A weights file with its size (for listings and the content hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFile {
    pub path: PathBuf,
    pub size: u64,
}

/// All safetensors files of one model directory, with a tensor-name lookup across shards.
#[derive(Debug)]
pub struct SafetensorsRepo {
    dir: PathBuf,
    index: Option<WeightFile>,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    lookup: BTreeMap<String, usize>,
}

impl SafetensorsRepo {
    /// Open `<dir>/model.safetensors`, or else the shards named by
    /// `<dir>/model.safetensors.index.json`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            return Ok(Self::from_files(dir, None, vec![file]));
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&dir, &index);
        }
        Err(LoadError::NoWeights { dir })
    }

    /// Open one safetensors file on its own (any name).
    pub fn open_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self::from_files(dir, None, vec![file]))
    }

    fn from_files(dir: PathBuf, index: Option<WeightFile>, files: Vec<SafetensorsFile>) -> Self {
        let mut lookup = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                lookup.insert(name.clone(), i);
            }
        }
        SafetensorsRepo { dir, index, files, lookup }
    }

    fn open_index(dir: &Path, index_path: &Path) -> Result<Self> {
        let text = std::fs::read(index_path).map_err(|e| LoadError::io(index_path, e))?;
        let size = text.len() as u64;
        let bad = |reason: String| LoadError::BadIndex { file: index_path.to_path_buf(), reason };
        let json: Value =
            serde_json::from_slice(&text).map_err(|e| LoadError::Json { path: index_path.to_path_buf(), source: e })?;
        let map =
            json.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no weight_map object".into()))?;
        // Shard name → tensor names the index puts there.
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, shard) in map {
            let shard =
                shard.as_str().ok_or_else(|| bad(format!("tensor {name:?} maps to {shard}, not a file name")))?;
            // The index is data from the download: never let it point outside the directory.
            let plain = Path::new(shard).file_name().is_some_and(|f| f == shard) && shard != "..";
            if !plain {
                return Err(bad(format!("tensor {name:?} maps to {shard:?}, not a plain file name")));
            }
            shards.entry(shard).or_default().push(name);
        }
        if shards.is_empty() {
            return Err(bad("weight_map is empty".into()));
        }
        let mut files = Vec::with_capacity(shards.len());
        let mut lookup = BTreeMap::new();
        for (i, (shard, names)) in shards.iter().enumerate() {
            let file = SafetensorsFile::open(dir.join(shard))?;
            for name in names {
                if !file.tensors.contains_key(*name) {
                    return Err(LoadError::MissingTensor { file: file.path.clone(), name: name.to_string() });
                }
                lookup.insert(name.to_string(), i);
            }
            files.push(file);
        }
        Ok(SafetensorsRepo {
            dir: dir.to_path_buf(),
            index: Some(WeightFile { path: index_path.to_path_buf(), size }),
            files,
            lookup,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The shard index, for a sharded model.
    pub fn index_file(&self) -> Option<&WeightFile> {
        self.index.as_ref()
    }

    /// The safetensors files with their sizes, in file-name order.
    pub fn files(&self) -> Vec<WeightFile> {
        self.files.iter().map(|f| WeightFile { path: f.path.clone(), size: f.len }).collect()
    }

    /// Every file the weights consist of: the index (if any) first, then the safetensors files.
    pub fn all_files(&self) -> Vec<WeightFile> {
        self.index.iter().cloned().chain(self.files()).collect()
    }

    /// Total size of the safetensors files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.len).sum()
    }

    /// The file errors about the repo as a whole are reported against.
    fn source(&self) -> PathBuf {
        match (&self.index, self.files.as_slice()) {
            (Some(index), _) => index.path.clone(),
            (None, [f]) => f.path.clone(),
            _ => self.dir.clone(),
        }
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.lookup.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.lookup.contains_key(name)
    }

    /// The distinct dtypes stored, sorted.
    pub fn dtypes(&self) -> Vec<DType> {
        let set: BTreeSet<&str> = self.infos().map(|(_, _, t)| t.dtype.as_str()).collect();
        [DType::F32, DType::Bf16, DType::F16].into_iter().filter(|d| set.contains(d.as_str())).collect()
    }

    fn infos(&self) -> impl Iterator<Item = (&str, &SafetensorsFile, &TensorInfo)> {
        self.lookup.iter().map(|(name, &i)| (name.as_str(), &self.files[i], &self.files[i].tensors[name]))
    }

    fn locate(&self, name: &str) -> Result<(&SafetensorsFile, &TensorInfo)> {
        let i = self
            .lookup
            .get(name)
            .ok_or_else(|| LoadError::MissingTensor { file: self.source(), name: name.to_string() })?;
        let file = &self.files[*i];
        Ok((file, &file.tensors[name]))
    }

    /// Dtype, shape and location of a tensor.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.locate(name).map(|(_, t)| t)
    }

    /// The file holding a tensor.
    pub fn file_of(&self, name: &str) -> Result<&Path> {
        self.locate(name).map(|(f, _)| f.path.as_path())
    }

    /// A whole tensor, zero-copy (see [`TensorInfo::matrix_dims`] for its `[rows, cols]`).
    pub fn get(&self, name: &str) -> Result<HostWeight> {
        let (file, info) = self.locate(name)?;
        let (rows, cols) = info.matrix_dims();
        host_weight(file, name, info.dtype, file.shared(info.bytes.clone()), rows, cols)
    }

    /// A tensor whose shape must be exactly `shape` (e.g. `&[rows, cols]`).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<HostWeight> {
        let (file, info) = self.locate(name)?;
        if info.shape != shape {
            return Err(LoadError::ShapeMismatch {
                file: file.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: info.shape.clone(),
            });
        }
        self.get(name)
    }

    /// A 1-D tensor of `len` elements, as a `[1, len]` weight.
    pub fn get_vector(&self, name: &str, len: usize) -> Result<HostWeight> {
        self.get_shaped(name, &[len])
    }

    /// Rows `rows` of a matrix, zero-copy (a column-parallel shard: its output features).
    pub fn get_rows(&self, name: &str, rows: Range<usize>) -> Result<HostWeight> {
        let (file, info) = self.locate(name)?;
        let (n_rows, cols) = info.matrix_dims();
        check_range(file, name, "rows", &rows, n_rows)?;
        let row_bytes = cols * info.dtype.size();
        let start = info.bytes.start + rows.start * row_bytes;
        let end = info.bytes.start + rows.end * row_bytes;
        host_weight(file, name, info.dtype, file.shared(start..end), rows.len(), cols)
    }

    /// Columns `cols` of every row, copied into an owned buffer (a row-parallel shard: its slice
    /// of the reduction dimension; also slices a 1-D bias, which is one row).
    pub fn get_cols(&self, name: &str, cols: Range<usize>) -> Result<HostWeight> {
        let (file, info) = self.locate(name)?;
        let (rows, n_cols) = info.matrix_dims();
        check_range(file, name, "columns", &cols, n_cols)?;
        let out = copy_cols(&(*file.map)[info.bytes.clone()], info.dtype.size(), n_cols, rows, &cols);
        host_weight(file, name, info.dtype, SharedBytes::from_vec(out), rows, cols.len())
    }
}

/// Columns `cols` of the first `rows` rows of a row-major matrix of `n_cols` elements of `size`
/// bytes each, copied out.
pub(crate) fn copy_cols(src: &[u8], size: usize, n_cols: usize, rows: usize, cols: &Range<usize>) -> Vec<u8> {
    let mut out = Vec::with_capacity(rows * cols.len() * size);
    for row in src.chunks_exact(n_cols * size).take(rows) {
        out.extend_from_slice(&row[cols.start * size..cols.end * size]);
    }
    out
}

fn check_range(file: &SafetensorsFile, name: &str, what: &'static str, r: &Range<usize>, len: usize) -> Result<()> {
    if r.start > r.end || r.end > len {
        return Err(LoadError::SliceOutOfBounds {
            file: file.path.clone(),
            name: name.to_string(),
            what,
            range: format!("{}..{}", r.start, r.end),
            len,
        });
    }
    Ok(())
}

fn host_weight(
    file: &SafetensorsFile,
    name: &str,
    dtype: DType,
    bytes: SharedBytes,
    rows: usize,
    cols: usize,
) -> Result<HostWeight> {
    HostWeight::new(dtype, bytes, rows, cols).map_err(|e| LoadError::Kernel {
        file: file.path.clone(),
        name: name.to_string(),
        source: e,
    })
}

/// One decoder layer's weights, HF layout (`[out_features, in_features]` matrices).
#[derive(Clone)]
pub struct LayerWeights {
    /// `[1, hidden]`
    pub input_layernorm: HostWeight,
    /// `[heads × head_dim, hidden]`
    pub q_proj: HostWeight,
    /// `[kv_heads × head_dim, hidden]`
    pub k_proj: HostWeight,
    /// `[kv_heads × head_dim, hidden]`
    pub v_proj: HostWeight,
    /// `[hidden, heads × head_dim]`
    pub o_proj: HostWeight,
    /// `[1, heads × head_dim]` when [`ModelConfig::qkv_bias`].
    pub q_bias: Option<HostWeight>,
    /// `[1, kv_heads × head_dim]` when [`ModelConfig::qkv_bias`].
    pub k_bias: Option<HostWeight>,
    /// `[1, kv_heads × head_dim]` when [`ModelConfig::qkv_bias`].
    pub v_bias: Option<HostWeight>,
    /// `[1, hidden]` when [`ModelConfig::o_bias`] (Llama or Qwen3 with `attention_bias`).
    pub o_bias: Option<HostWeight>,
    /// `[1, head_dim]` when [`ModelConfig::qk_norm`] (Qwen3).
    pub q_norm: Option<HostWeight>,
    /// `[1, head_dim]` when [`ModelConfig::qk_norm`] (Qwen3).
    pub k_norm: Option<HostWeight>,
    /// `[1, hidden]`
    pub post_attention_layernorm: HostWeight,
    /// `[intermediate, hidden]`
    pub gate_proj: HostWeight,
    /// `[intermediate, hidden]`
    pub up_proj: HostWeight,
    /// `[hidden, intermediate]`
    pub down_proj: HostWeight,
}

/// Every tensor of a Llama / Qwen2 model, shape-checked against its config.
#[derive(Clone)]
pub struct LlamaWeights {
    /// `[vocab, hidden]`
    pub embed_tokens: HostWeight,
    pub layers: Vec<LayerWeights>,
    /// `[1, hidden]`
    pub norm: HostWeight,
    /// `[vocab, hidden]`: `lm_head.weight`, or the embedding itself when tied.
    pub lm_head: HostWeight,
    /// `lm_head` is `embed_tokens` (the same bytes; no `lm_head.weight` was read).
    pub lm_head_tied: bool,
}

/// HF tensor name of layer `i`'s `suffix` (e.g. `self_attn.q_proj.weight`).
pub fn layer_tensor(i: usize, suffix: &str) -> String {
    format!("model.layers.{i}.{suffix}")
}

impl LlamaWeights {
    /// Read every tensor the config calls for. With `tie_word_embeddings` the embedding is used
    /// as `lm_head` even if the file also stores an `lm_head.weight` (transformers does the same).
    pub fn load(repo: &SafetensorsRepo, cfg: &ModelConfig) -> Result<Self> {
        let (h, v, inter) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let (q, kv) = (cfg.q_dim(), cfg.kv_dim());
        let embed_tokens = repo.get_shaped("model.embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let t = |s: &str| layer_tensor(i, s);
            let bias = |on: bool, s: &str, n: usize| -> Result<Option<HostWeight>> {
                on.then(|| repo.get_vector(&t(s), n)).transpose()
            };
            layers.push(LayerWeights {
                input_layernorm: repo.get_vector(&t("input_layernorm.weight"), h)?,
                q_proj: repo.get_shaped(&t("self_attn.q_proj.weight"), &[q, h])?,
                k_proj: repo.get_shaped(&t("self_attn.k_proj.weight"), &[kv, h])?,
                v_proj: repo.get_shaped(&t("self_attn.v_proj.weight"), &[kv, h])?,
                o_proj: repo.get_shaped(&t("self_attn.o_proj.weight"), &[h, q])?,
                q_bias: bias(cfg.qkv_bias, "self_attn.q_proj.bias", q)?,
                k_bias: bias(cfg.qkv_bias, "self_attn.k_proj.bias", kv)?,
                v_bias: bias(cfg.qkv_bias, "self_attn.v_proj.bias", kv)?,
                o_bias: bias(cfg.o_bias, "self_attn.o_proj.bias", h)?,
                q_norm: bias(cfg.qk_norm, "self_attn.q_norm.weight", cfg.head_dim)?,
                k_norm: bias(cfg.qk_norm, "self_attn.k_norm.weight", cfg.head_dim)?,
                post_attention_layernorm: repo.get_vector(&t("post_attention_layernorm.weight"), h)?,
                gate_proj: repo.get_shaped(&t("mlp.gate_proj.weight"), &[inter, h])?,
                up_proj: repo.get_shaped(&t("mlp.up_proj.weight"), &[inter, h])?,
                down_proj: repo.get_shaped(&t("mlp.down_proj.weight"), &[h, inter])?,
            });
        }
        let norm = repo.get_vector("model.norm.weight", h)?;
        let lm_head =
            if cfg.tie_word_embeddings { embed_tokens.clone() } else { repo.get_shaped("lm_head.weight", &[v, h])? };
        Ok(LlamaWeights { embed_tokens, layers, norm, lm_head, lm_head_tied: cfg.tie_word_embeddings })
    }

    /// The distinct dtypes of the loaded tensors, sorted as `f32 < bf16 < f16`.
    pub fn dtypes(&self) -> Vec<DType> {
        let mut all = vec![self.embed_tokens.dtype, self.norm.dtype, self.lm_head.dtype];
        for l in &self.layers {
            all.extend(
                [
                    &l.input_layernorm,
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.post_attention_layernorm,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .iter()
                .map(|w| w.dtype),
            );
            let optional = [&l.q_bias, &l.k_bias, &l.v_bias, &l.o_bias, &l.q_norm, &l.k_norm];
            all.extend(optional.into_iter().flatten().map(|w| w.dtype));
        }
        [DType::F32, DType::Bf16, DType::F16].into_iter().filter(|d| all.contains(d)).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::synth::{synth_with, Preset, SynthOptions};

    /// A fresh, empty directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "lockstep-node-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Write a safetensors file from `(name, dtype tag, shape, data)` entries, exactly as the
    /// format says (so tests can then break it in controlled ways).
    pub(crate) fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, tag, shape, bytes) in tensors {
            let begin = data.len();
            data.extend_from_slice(bytes);
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": tag, "shape": shape, "data_offsets": [begin, data.len()]}),
            );
        }
        let mut h = Value::Object(header).to_string().into_bytes();
        h.resize(h.len().next_multiple_of(8), b' ');
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&h);
        out.extend_from_slice(&data);
        std::fs::write(path, out).unwrap();
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn err_of(r: Result<impl Sized>) -> LoadError {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn stories260k_loads() {
        let Some(dir) = lockstep_test_env::stories260k() else { return };
        let dir = dir.as_path();
        let cfg = ModelConfig::from_dir(dir).unwrap();
        let repo = SafetensorsRepo::open(dir).unwrap();
        assert_eq!(repo.files().len(), 1);
        assert!(repo.index_file().is_none());
        assert_eq!(repo.tensor_names().count(), 47);
        assert_eq!(repo.dtypes(), vec![DType::F32]);
        let w = LlamaWeights::load(&repo, &cfg).unwrap();
        assert_eq!(w.layers.len(), 5);
        assert!(w.lm_head_tied);
        assert_eq!((w.embed_tokens.rows, w.embed_tokens.cols), (512, 64));
        assert_eq!((w.lm_head.rows, w.lm_head.cols), (512, 64));
        let l = &w.layers[0];
        assert_eq!((l.q_proj.rows, l.q_proj.cols), (64, 64));
        assert_eq!((l.k_proj.rows, l.k_proj.cols), (32, 64));
        assert_eq!((l.o_proj.rows, l.o_proj.cols), (64, 64));
        assert_eq!((l.gate_proj.rows, l.gate_proj.cols), (172, 64));
        assert_eq!((l.down_proj.rows, l.down_proj.cols), (64, 172));
        assert_eq!((l.input_layernorm.rows, l.input_layernorm.cols), (1, 64));
        assert!(l.q_bias.is_none() && l.o_bias.is_none());
        assert_eq!(w.dtypes(), vec![DType::F32]);
        // Zero-copy: the weight's bytes are the file's bytes at the header's offsets.
        let info = repo.info("model.embed_tokens.weight").unwrap().clone();
        let raw = std::fs::read(dir.join(SINGLE_FILE)).unwrap();
        assert_eq!(w.embed_tokens.bytes.as_slice(), &raw[info.bytes]);
        // Finite values in the norm weights (spot check of the dtype handling).
        assert!(w.norm.view().to_f32().iter().all(|x| x.is_finite() && *x != 0.0));
    }

    #[test]
    fn rows_and_cols_slices() {
        let tmp = TempDir::new("slices");
        let path = tmp.path().join("m.safetensors");
        let m: Vec<f32> = (0..12).map(|x| x as f32).collect(); // [3, 4]
        write_safetensors(&path, &[("m", "F32", vec![3, 4], f32_bytes(&m)), ("b", "F32", vec![4], f32_bytes(&m[..4]))]);
        let repo = SafetensorsRepo::open_file(&path).unwrap();
        let r = repo.get_rows("m", 1..3).unwrap();
        assert_eq!((r.rows, r.cols), (2, 4));
        assert_eq!(r.view().to_f32(), (4..12).map(|x| x as f32).collect::<Vec<_>>());
        let c = repo.get_cols("m", 1..3).unwrap();
        assert_eq!((c.rows, c.cols), (3, 2));
        assert_eq!(c.view().to_f32(), vec![1.0, 2.0, 5.0, 6.0, 9.0, 10.0]);
        let b = repo.get_cols("b", 2..4).unwrap();
        assert_eq!(b.view().to_f32(), vec![2.0, 3.0]);
        let e = err_of(repo.get_rows("m", 2..4));
        assert!(matches!(&e, LoadError::SliceOutOfBounds { name, .. } if name == "m"), "{e}");
        let e = err_of(repo.get_cols("m", 3..5));
        assert!(e.to_string().contains("m.safetensors") && e.to_string().contains("\"m\""), "{e}");
        // Shape checks.
        assert!(repo.get_shaped("m", &[3, 4]).is_ok());
        assert!(repo.get_vector("b", 4).is_ok());
        let e = err_of(repo.get_shaped("m", &[4, 3]));
        match &e {
            LoadError::ShapeMismatch { file, name, expected, got } => {
                assert_eq!((file, name.as_str()), (&path, "m"));
                assert_eq!((expected.clone(), got.clone()), (vec![4, 3], vec![3, 4]));
            }
            other => panic!("wrong error {other}"),
        }
        let e = err_of(repo.get("nope"));
        assert!(matches!(&e, LoadError::MissingTensor { file, name } if file == &path && name == "nope"), "{e}");
    }

    #[test]
    fn half_dtypes_kept_as_stored() {
        let tmp = TempDir::new("dtypes");
        let path = tmp.path().join("model.safetensors");
        let bf: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
        let f16: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
        write_safetensors(&path, &[("a", "BF16", vec![2], bf), ("b", "F16", vec![1, 2], f16)]);
        let repo = SafetensorsRepo::open(tmp.path()).unwrap();
        let a = repo.get("a").unwrap();
        assert_eq!((a.dtype, a.rows, a.cols), (DType::Bf16, 1, 2));
        assert_eq!(a.view().to_f32(), vec![1.5, -2.0]);
        let b = repo.get("b").unwrap();
        assert_eq!((b.dtype, b.rows, b.cols), (DType::F16, 1, 2));
        assert_eq!(b.view().to_f32(), vec![0.25, 3.0]);
        assert_eq!(repo.dtypes(), vec![DType::Bf16, DType::F16]);
    }

    #[test]
    fn corrupt_files_are_named() {
        let tmp = TempDir::new("corrupt");
        let good = tmp.path().join("good.safetensors");
        write_safetensors(&good, &[("w", "F32", vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0]))]);
        let bytes = std::fs::read(&good).unwrap();

        let check = |file: &str, data: &[u8], needle: &str| {
            let p = tmp.path().join(file);
            std::fs::write(&p, data).unwrap();
            let e = SafetensorsFile::open(&p).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(file) && msg.contains(needle), "{file}: {msg}");
            e
        };
        // Shorter than the length field.
        let e = check("tiny.safetensors", &bytes[..5], "fewer than");
        assert!(matches!(e, LoadError::CorruptHeader { .. }));
        // Absurd header length.
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        check("huge.safetensors", &huge, "limit");
        // Header length past the end.
        let mut past = bytes.clone();
        past[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
        check("past.safetensors", &past, "past the end");
        // Garbage JSON.
        let mut garbage = bytes.clone();
        garbage[8] = b'#';
        check("garbage.safetensors", &garbage, "not valid JSON");
        // Truncated data: names the tensor.
        let e = check("trunc.safetensors", &bytes[..bytes.len() - 3], "\"w\"");
        assert!(matches!(&e, LoadError::Truncated { name, .. } if name == "w"), "{e}");

        // Offsets / sizes / dtypes.
        let header = |h: &str| {
            let mut h = h.as_bytes().to_vec();
            h.resize(h.len().next_multiple_of(8), b' ');
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&[0u8; 64]);
            out
        };
        check("order.safetensors", &header(r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#), "begin > end");
        check("size.safetensors", &header(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#), "needs 12");
        check(
            "overlap.safetensors",
            &header(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            ),
            "overlap",
        );
        check("noshape.safetensors", &header(r#"{"w":{"dtype":"F32","data_offsets":[0,8]}}"#), "missing shape");
        let e = check(
            "i64.safetensors",
            &header(r#"{"__metadata__":{"format":"pt"},"idx":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#),
            "I64",
        );
        match &e {
            LoadError::UnsupportedDType { name, dtype, .. } => {
                assert_eq!((name.as_str(), dtype.as_str()), ("idx", "I64"))
            }
            other => panic!("wrong error {other}"),
        }
        assert!(e.to_string().contains("\"idx\""));
        // Empty directory.
        let empty = TempDir::new("empty");
        let e = SafetensorsRepo::open(empty.path()).unwrap_err();
        assert!(matches!(e, LoadError::NoWeights { .. }), "{e}");
    }

    #[test]
    fn missing_and_misshapen_model_tensors() {
        let tmp = TempDir::new("model-errors");
        synth_with(Preset::Tiny, 1, DType::F32, tmp.path(), &SynthOptions::default()).unwrap();
        let cfg = ModelConfig::from_dir(tmp.path()).unwrap();
        let repo = SafetensorsRepo::open(tmp.path()).unwrap();
        LlamaWeights::load(&repo, &cfg).unwrap();

        // A config that wants biases this file does not have.
        let mut biased = cfg.clone();
        biased.qkv_bias = true;
        let e = err_of(LlamaWeights::load(&repo, &biased));
        match &e {
            LoadError::MissingTensor { file, name } => {
                assert_eq!(file, &tmp.path().join(SINGLE_FILE));
                assert_eq!(name, "model.layers.0.self_attn.q_proj.bias");
            }
            other => panic!("wrong error {other}"),
        }
        // A config whose sizes do not match the file.
        let mut wide = cfg.clone();
        wide.intermediate_size += 1;
        let e = err_of(LlamaWeights::load(&repo, &wide));
        match &e {
            LoadError::ShapeMismatch { name, expected, got, .. } => {
                assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
                assert_eq!((expected[0], got[0]), (cfg.intermediate_size + 1, cfg.intermediate_size));
            }
            other => panic!("wrong error {other}"),
        }
        assert!(e.to_string().contains("model.safetensors"), "{e}");
    }

    #[test]
    fn sharded_index_loads_like_single_file() {
        let single = TempDir::new("single");
        let sharded = TempDir::new("sharded");
        synth_with(Preset::Tiny, 7, DType::Bf16, single.path(), &SynthOptions::default()).unwrap();
        let opts = SynthOptions { shards: 2 };
        synth_with(Preset::Tiny, 7, DType::Bf16, sharded.path(), &opts).unwrap();
        assert!(!sharded.path().join(SINGLE_FILE).exists());

        let cfg = ModelConfig::from_dir(sharded.path()).unwrap();
        let a = SafetensorsRepo::open(single.path()).unwrap();
        let b = SafetensorsRepo::open(sharded.path()).unwrap();
        assert_eq!(b.files().len(), 2);
        assert_eq!(b.index_file().unwrap().path, sharded.path().join(INDEX_FILE));
        assert_eq!(b.all_files().len(), 3);
        assert!(b.files()[0].path.ends_with("model-00001-of-00002.safetensors"));
        assert_eq!(a.tensor_names().collect::<Vec<_>>(), b.tensor_names().collect::<Vec<_>>());
        let files_used: BTreeSet<&Path> = b.tensor_names().map(|n| b.file_of(n).unwrap()).collect();
        assert_eq!(files_used.len(), 2);
        for name in a.tensor_names() {
            let (x, y) = (a.get(name).unwrap(), b.get(name).unwrap());
            assert_eq!((x.dtype, x.rows, x.cols), (y.dtype, y.rows, y.cols), "{name}");
            assert_eq!(x.bytes.as_slice(), y.bytes.as_slice(), "{name}");
        }
        let w = LlamaWeights::load(&b, &cfg).unwrap();
        assert_eq!(w.dtypes(), vec![DType::Bf16]);
        assert!(!w.lm_head_tied);

        // An index entry pointing at a shard that lacks the tensor.
        let index_path = sharded.path().join(INDEX_FILE);
        let mut index: Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
        let map = index["weight_map"].as_object_mut().unwrap();
        let shard1 = map["model.norm.weight"].as_str().unwrap().to_string();
        let other = if shard1.starts_with("model-00001") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert("model.norm.weight".into(), other.into());
        std::fs::write(&index_path, index.to_string()).unwrap();
        let e = SafetensorsRepo::open(sharded.path()).unwrap_err();
        match &e {
            LoadError::MissingTensor { file, name } => {
                assert!(file.ends_with(other), "{e}");
                assert_eq!(name, "model.norm.weight");
            }
            other => panic!("wrong error {other}"),
        }
        // A path escaping the directory.
        index["weight_map"]["model.norm.weight"] = "../evil.safetensors".into();
        std::fs::write(&index_path, index.to_string()).unwrap();
        let e = SafetensorsRepo::open(sharded.path()).unwrap_err();
        assert!(matches!(e, LoadError::BadIndex { .. }), "{e}");
        // A missing shard file.
        index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors".into();
        std::fs::write(&index_path, index.to_string()).unwrap();
        let e = SafetensorsRepo::open(sharded.path()).unwrap_err();
        assert!(e.to_string().contains("model-00003-of-00002.safetensors"), "{e}");
    }
}
