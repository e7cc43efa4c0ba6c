//! The determinism fingerprint (DESIGN.md §1) and the weights content hash it starts from.
//!
//! Two runs promise identical bits only when everything that can change a bit is identical:
//! the weights' *content*, the config, the dtypes, the kernel contract version, the backend and
//! the deployment's numerics parameters. [`determinism_fingerprint`] hashes all of them into a
//! short `fp_` + 16 hex id that the API reports as `system_fingerprint`.
//!
//! The weights are identified by content, not by path: two replicas with the same files in
//! different directories must agree, and a re-downloaded file with different bytes must not. The
//! content hash is a SHA-256 over the index JSON (if sharded) and every safetensors file, each
//! framed by its file name and length so that no two different file sets hash alike. Hashing a
//! multi-gigabyte model takes seconds, so each file's digest is cached on disk, keyed by
//! (canonical path, size, mtime in ns); a changed size or mtime re-hashes. The cache lives in
//! `$LOCKSTEP_CACHE_DIR`, else `$XDG_CACHE_HOME/lockstep`, else `~/.cache/lockstep`; when it
//! cannot be written the hash is simply computed every time. Like git's index, a file modified
//! twice within one mtime tick with the same size could fool the key, so digests of files whose
//! mtime is within the last few seconds are not cached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lockstep_kernels::DType;
use sha2::{Digest, Sha256};

use crate::error::{LoadError, Result};
use crate::source::WeightStore;
use crate::weights::{SafetensorsRepo, WeightFile};

/// Files modified more recently than this are hashed but not cached (see the module docs).
const RACY_WINDOW: Duration = Duration::from_secs(3);

/// Version of the cache entry format and of the hash framing; bump on any change.
const HASH_VERSION: &str = "lockstep-weights-v1";

/// The on-disk cache of per-file SHA-256 digests.
#[derive(Debug, Clone)]
pub struct HashCache {
    dir: Option<PathBuf>,
}

/// What [`HashCache::weights_hash`] did, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightsHash {
    /// Hex SHA-256 of the framed file digests.
    pub hex: String,
    /// Files whose bytes were read and hashed.
    pub files_hashed: usize,
    /// Files whose digest came from the cache.
    pub cache_hits: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CacheEntry {
    version: String,
    path: String,
    size: u64,
    mtime_ns: u128,
    sha256: String,
}

impl HashCache {
    /// The cache directory from the environment (see the module docs).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = var("LOCKSTEP_CACHE_DIR")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("lockstep")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("lockstep")));
        HashCache { dir }
    }

    /// A cache in `dir` (created on first write).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        HashCache { dir: Some(dir.into()) }
    }

    /// No cache: every call hashes.
    pub fn disabled() -> Self {
        HashCache { dir: None }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The content hash of a repo's files (index first, then shards in name order).
    pub fn weights_hash(&self, repo: &SafetensorsRepo) -> Result<WeightsHash> {
        self.hash_files(&repo.all_files())
    }

    /// The content hash of `files`, in the given order.
    pub fn hash_files(&self, files: &[WeightFile]) -> Result<WeightsHash> {
        let mut total = Sha256::new();
        total.update(HASH_VERSION.as_bytes());
        let (mut files_hashed, mut cache_hits) = (0, 0);
        for f in files {
            let (digest, hit) = self.file_sha256(&f.path)?;
            if hit {
                cache_hits += 1;
            } else {
                files_hashed += 1;
            }
            let name = f.path.file_name().unwrap_or_default().to_string_lossy();
            frame(&mut total, name.as_bytes());
            total.update(f.size.to_le_bytes());
            frame(&mut total, digest.as_bytes());
        }
        Ok(WeightsHash { hex: hex(&total.finalize()), files_hashed, cache_hits })
    }

    /// Hex SHA-256 of one file's bytes, and whether it came from the cache.
    pub fn file_sha256(&self, path: &Path) -> Result<(String, bool)> {
        let meta = std::fs::metadata(path).map_err(|e| LoadError::io(path, e))?;
        let mtime = meta.modified().map_err(|e| LoadError::io(path, e))?;
        let mtime_ns = mtime.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let canonical = std::fs::canonicalize(path).map_err(|e| LoadError::io(path, e))?;
        let key_path = canonical.to_string_lossy().into_owned();
        let entry_path = self.dir.as_ref().map(|d| d.join(entry_name(&key_path)));

        if let Some(p) = &entry_path {
            if let Some(hit) = read_entry(p, &key_path, meta.len(), mtime_ns) {
                return Ok((hit, true));
            }
        }
        let digest = sha256_file(path)?;
        let racy = SystemTime::now().duration_since(mtime).map_or(true, |age| age < RACY_WINDOW);
        if let (Some(p), false) = (&entry_path, racy) {
            let entry = CacheEntry {
                version: HASH_VERSION.into(),
                path: key_path,
                size: meta.len(),
                mtime_ns,
                sha256: digest.clone(),
            };
            // A cache that cannot be written is not an error: the hash is still right.
            let _ = write_entry(p, &entry);
        }
        Ok((digest, false))
    }
}

/// The weights content hash with the environment's cache (see the module docs).
pub fn weights_hash(repo: &SafetensorsRepo) -> Result<String> {
    Ok(HashCache::from_env().weights_hash(repo)?.hex)
}

fn entry_name(key_path: &str) -> String {
    format!("sha256-{}.json", &hex(&Sha256::digest(key_path.as_bytes()))[..32])
}

fn read_entry(p: &Path, key_path: &str, size: u64, mtime_ns: u128) -> Option<String> {
    let text = std::fs::read(p).ok()?;
    let e: CacheEntry = serde_json::from_slice(&text).ok()?;
    let valid = e.version == HASH_VERSION
        && e.path == key_path
        && e.size == size
        && e.mtime_ns == mtime_ns
        && e.sha256.len() == 64
        && e.sha256.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then_some(e.sha256)
}

fn write_entry(p: &Path, e: &CacheEntry) -> std::io::Result<()> {
    let dir = p.parent().expect("cache entries live in a directory");
    std::fs::create_dir_all(dir)?;
    // Write then rename, so a concurrent reader never sees half an entry.
    let tmp = dir.join(format!(".{}.{}.tmp", p.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(e).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, p).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| LoadError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Length-prefix a field so that concatenations cannot collide (`"ab"+"c"` vs `"a"+"bc"`).
fn frame(h: &mut Sha256, bytes: &[u8]) {
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Everything that decides the output bits of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintInputs<'a> {
    /// [`weights_hash`] of the model files.
    pub weights_hash: &'a str,
    /// [`ModelConfig::canonical_json`](crate::config::ModelConfig::canonical_json).
    pub config_json: &'a str,
    /// Dtypes in a fixed order chosen by the caller (e.g. the stored weight dtypes, sorted).
    pub dtypes: &'a [DType],
    /// [`lockstep_kernels::CONTRACT_VERSION`].
    pub contract_version: u32,
    /// [`Backend::fingerprint_name`](lockstep_kernels::Backend::fingerprint_name).
    pub backend: &'a str,
    pub reduce_segments: usize,
    pub kv_chunk: usize,
}

impl FingerprintInputs<'_> {
    /// `fp_` + the first 16 hex digits of a SHA-256 over every input, each length-framed.
    pub fn fingerprint(&self) -> String {
        self.fingerprint_with_revisions(lockstep_kernels::cpu::native_rule_revisions(self.backend))
    }

    /// The fingerprint with the backend's later rule revisions given (`None`: as before any).
    fn fingerprint_with_revisions(&self, revisions: Option<&str>) -> String {
        let mut h = Sha256::new();
        frame(&mut h, b"lockstep-fingerprint-v1");
        frame(&mut h, self.weights_hash.as_bytes());
        frame(&mut h, self.config_json.as_bytes());
        let dtypes: Vec<&str> = self.dtypes.iter().map(|d| d.as_str()).collect();
        frame(&mut h, dtypes.join(",").as_bytes());
        h.update(self.contract_version.to_le_bytes());
        frame(&mut h, self.backend.as_bytes());
        // A native class's later rules (block weights' integer dot products) change its bits
        // without renaming it: their revision joins the hash, so nodes built before them differ.
        if let Some(revisions) = revisions {
            frame(&mut h, revisions.as_bytes());
        }
        h.update((self.reduce_segments as u64).to_le_bytes());
        h.update((self.kv_chunk as u64).to_le_bytes());
        format!("fp_{}", &hex(&h.finalize())[..16])
    }
}

/// The determinism fingerprint: `fp_` + 16 hex digits (see [`FingerprintInputs`]).
pub fn determinism_fingerprint(
    weights_hash: &str,
    config_json: &str,
    dtypes: &[DType],
    contract_version: u32,
    backend: &str,
    reduce_segments: usize,
    kv_chunk: usize,
) -> String {
    FingerprintInputs { weights_hash, config_json, dtypes, contract_version, backend, reduce_segments, kv_chunk }
        .fingerprint()
}

/// The fingerprint of a deployment of the model in `store`: everything [`FingerprintInputs`]
/// names, with the loaded dtypes in a fixed order. The coordinator computes it to know what to
/// expect; every node computes it again from the files it actually loaded.
pub fn deployment_fingerprint(
    store: &WeightStore,
    config: &crate::config::ModelConfig,
    backend: &str,
    reduce_segments: usize,
    kv_chunk: usize,
) -> Result<(String, String)> {
    let weights = HashCache::from_env().hash_files(&store.all_files())?.hex;
    let mut dtypes = store.dtypes()?;
    dtypes.sort_by_key(|d| d.as_str());
    dtypes.dedup();
    let fp = determinism_fingerprint(
        &weights,
        &config.canonical_json(),
        &dtypes,
        lockstep_kernels::CONTRACT_VERSION,
        backend,
        reduce_segments,
        kv_chunk,
    );
    Ok((fp, weights))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::tests::TempDir;
    use std::fs::File;

    fn set_mtime(path: &Path, t: SystemTime) {
        File::options().write(true).open(path).unwrap().set_modified(t).unwrap();
    }

    fn an_hour_ago() -> SystemTime {
        SystemTime::now() - Duration::from_secs(3600)
    }

    #[test]
    fn every_component_changes_the_fingerprint() {
        let base = FingerprintInputs {
            weights_hash: "aa",
            config_json: "{}",
            dtypes: &[DType::Bf16],
            contract_version: 1,
            backend: "cpu",
            reduce_segments: 8,
            kv_chunk: 64,
        };
        let fp = base.fingerprint();
        assert!(fp.starts_with("fp_") && fp.len() == 19, "{fp}");
        assert!(fp[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(fp, base.clone().fingerprint(), "pure function");
        assert_eq!(fp, determinism_fingerprint("aa", "{}", &[DType::Bf16], 1, "cpu", 8, 64));
        let variants = [
            FingerprintInputs { weights_hash: "ab", ..base.clone() },
            FingerprintInputs { config_json: "{\"a\":1}", ..base.clone() },
            FingerprintInputs { dtypes: &[DType::F32], ..base.clone() },
            FingerprintInputs { dtypes: &[DType::Bf16, DType::F32], ..base.clone() },
            FingerprintInputs { contract_version: 2, ..base.clone() },
            FingerprintInputs { backend: "cuda", ..base.clone() },
            FingerprintInputs { reduce_segments: 16, ..base.clone() },
            FingerprintInputs { kv_chunk: 128, ..base.clone() },
            // Framing: moving a byte between adjacent fields must not collide.
            FingerprintInputs { weights_hash: "a", config_json: "a{}", ..base.clone() },
        ];
        let mut seen = std::collections::BTreeSet::from([fp]);
        for v in variants {
            assert!(seen.insert(v.fingerprint()), "{v:?} collides");
        }
    }

    /// A node built before native mode's block-weight rule computed other bits for Q4/Q8 models
    /// under the same class name: the rule's revision joins native fingerprints (so such a node is
    /// refused) and leaves every other backend's fingerprint as it was.
    #[test]
    fn native_fingerprints_carry_the_block_weight_rule_revision_and_others_are_unchanged() {
        let inputs = |backend| FingerprintInputs {
            weights_hash: "aa",
            config_json: "{}",
            dtypes: &[DType::Q4_1],
            contract_version: 2,
            backend,
            reduce_segments: 8,
            kv_chunk: 64,
        };
        for backend in ["native-amx", "native-avx512bf16"] {
            let i = inputs(backend);
            assert_ne!(i.fingerprint(), i.fingerprint_with_revisions(None), "{backend}");
            assert_eq!(i.fingerprint(), i.fingerprint_with_revisions(Some("qdot-1")), "{backend}");
        }
        for backend in ["portable", "cpu-fast", "cuda-native-sm_90"] {
            let i = inputs(backend);
            assert_eq!(i.fingerprint(), i.fingerprint_with_revisions(None), "{backend}");
        }
    }

    #[test]
    fn cache_hit_skips_rehash_and_invalidates_on_change() {
        let tmp = TempDir::new("hash-cache");
        let cache = HashCache::at(tmp.path().join("cache"));
        let file = tmp.path().join("w.safetensors");
        std::fs::write(&file, b"0123456789").unwrap();
        set_mtime(&file, an_hour_ago());
        let files = |size| vec![WeightFile { path: file.clone(), size }];

        let first = cache.hash_files(&files(10)).unwrap();
        assert_eq!((first.files_hashed, first.cache_hits), (1, 0));
        let second = cache.hash_files(&files(10)).unwrap();
        assert_eq!((second.files_hashed, second.cache_hits), (0, 1));
        assert_eq!(first.hex, second.hex);
        // Same as an uncached computation.
        assert_eq!(HashCache::disabled().hash_files(&files(10)).unwrap().hex, first.hex);

        // New mtime, same size and bytes: re-hashed, same digest.
        set_mtime(&file, an_hour_ago() - Duration::from_secs(1));
        let third = cache.hash_files(&files(10)).unwrap();
        assert_eq!((third.files_hashed, third.cache_hits), (1, 0));
        assert_eq!(third.hex, first.hex);

        // New size (and content) with the old mtime: re-hashed, different digest.
        let t = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, b"0123456789a").unwrap();
        set_mtime(&file, t);
        let fourth = cache.hash_files(&files(11)).unwrap();
        assert_eq!((fourth.files_hashed, fourth.cache_hits), (1, 0));
        assert_ne!(fourth.hex, first.hex);
        assert_eq!(cache.hash_files(&files(11)).unwrap().cache_hits, 1);

        // A just-written file is hashed but not cached (mtime may not have ticked yet).
        std::fs::write(&file, b"fresh bytes").unwrap();
        let fifth = cache.hash_files(&files(11)).unwrap();
        let sixth = cache.hash_files(&files(11)).unwrap();
        assert_eq!((fifth.files_hashed, sixth.files_hashed), (1, 1));
        assert_eq!(fifth.hex, sixth.hex);
    }

    #[test]
    fn unwritable_cache_still_hashes() {
        let tmp = TempDir::new("hash-nocache");
        let file = tmp.path().join("w.bin");
        std::fs::write(&file, b"abc").unwrap();
        set_mtime(&file, an_hour_ago());
        // The "cache dir" is a regular file, so nothing can be created under it.
        let blocker = tmp.path().join("not-a-dir");
        std::fs::write(&blocker, b"").unwrap();
        let cache = HashCache::at(blocker.join("cache"));
        let files = [WeightFile { path: file.clone(), size: 3 }];
        let a = cache.hash_files(&files).unwrap();
        let b = cache.hash_files(&files).unwrap();
        assert_eq!((a.files_hashed, b.files_hashed), (1, 1));
        assert_eq!(a.hex, b.hex);
        // Per-file digest is the plain SHA-256 of the bytes.
        let (d, hit) = cache.file_sha256(&file).unwrap();
        assert!(!hit);
        assert_eq!(d, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let e = cache.file_sha256(&tmp.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn content_hash_ignores_location_but_not_content() {
        use crate::synth::{synth_with, Preset, SynthOptions};
        let (a, b, c) = (TempDir::new("fp-a"), TempDir::new("fp-b"), TempDir::new("fp-c"));
        let o = SynthOptions::default();
        synth_with(Preset::Tiny, 3, DType::F32, a.path(), &o).unwrap();
        synth_with(Preset::Tiny, 3, DType::F32, b.path(), &o).unwrap();
        synth_with(Preset::Tiny, 4, DType::F32, c.path(), &o).unwrap();
        let cache = HashCache::disabled();
        let h = |d: &TempDir| cache.weights_hash(&SafetensorsRepo::open(d.path()).unwrap()).unwrap().hex;
        assert_eq!(h(&a), h(&b));
        assert_ne!(h(&a), h(&c));
        // A sharded copy of the same tensors is a different file set, so a different hash.
        let s = TempDir::new("fp-s");
        synth_with(Preset::Tiny, 3, DType::F32, s.path(), &SynthOptions { shards: 2 }).unwrap();
        let repo = SafetensorsRepo::open(s.path()).unwrap();
        let hs = cache.weights_hash(&repo).unwrap();
        assert_eq!(hs.files_hashed, 3, "index + 2 shards");
        assert_ne!(hs.hex, h(&a));
    }
}
