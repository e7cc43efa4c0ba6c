//! [`CudaBackend`]: device buffers, kernel launches, and the host half of sampling.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::plan::{self, filters_on};
use super::{libs, nvrtc, CudaConfig, CudaError, CudaMode, MAX_HEAD_DIM, MAX_KV_CHUNK};
use crate::sampling::shard_sample;
use crate::{
    AttnParams, AttnSeq, Backend, DType, HostWeight, KernelMode, KvLayout, NumericsConfig, RopeTables, SampleRequest,
    SegmentRange, Segmentation, ShardSample, VocabShard,
};

/// An activation buffer in device memory (`f32`). Zero-length buffers hold one unused element,
/// since the driver refuses empty allocations.
pub struct CudaBuf {
    data: CudaSlice<f32>,
    len: usize,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The device allocation (at least one element long).
    pub fn slice(&self) -> &CudaSlice<f32> {
        &self.data
    }
    pub fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.data
    }
}

/// A weight matrix in device memory, in its stored dtype (widened exactly inside the kernels).
pub struct CudaWeight {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<u8>,
}

impl CudaWeight {
    /// The device bytes (row-major, little-endian, at least one byte long).
    pub fn slice(&self) -> &CudaSlice<u8> {
        &self.data
    }
}

/// One layer's paged K and V in device memory (same layout as the CPU's `CpuKvCache`).
pub struct CudaKvCache {
    pub layout: KvLayout,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
}

impl CudaKvCache {
    pub fn k(&self) -> &CudaSlice<f32> {
        &self.k
    }
    pub fn v(&self) -> &CudaSlice<f32> {
        &self.v
    }
}

pub struct CudaBackend {
    cfg: CudaConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Compute capability as `10·major + minor` (80 = sm_80).
    sm: u32,
    name: String,
    fns: HashMap<String, CudaFunction>,
}

/// A CUDA failure after start-up: the trait has no error channel (see the module docs).
#[track_caller]
fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    panic!("CUDA {what} failed: {e}")
}

/// A kernel `int` argument.
#[track_caller]
fn int(x: usize) -> i32 {
    i32::try_from(x).unwrap_or_else(|_| panic!("{x} exceeds the CUDA kernels' 32-bit index range"))
}

fn grid_1d(n: usize) -> LaunchConfig {
    plan::elementwise(n).config()
}

fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
        DType::F16 => "f16",
        DType::Q8_0 => "q8_0",
        DType::Q4_0 => "q4_0",
        DType::Q4_1 => "q4_1",
    }
}

impl CudaBackend {
    /// Start the backend on `cfg.device`: check the driver, create the context, compile with NVRTC
    /// (or take from the PTX cache) and load every kernel. Fails with a clear [`CudaError`] — never
    /// a panic — on a machine without a driver or that device, or without NVRTC when the cache
    /// lacks the PTX.
    pub fn new(cfg: CudaConfig) -> Result<Self, CudaError> {
        cfg.numerics.validate()?;
        if cfg.numerics.kv_chunk > MAX_KV_CHUNK {
            return Err(CudaError::Unsupported(format!(
                "kv_chunk {} (the attention kernel takes at most {MAX_KV_CHUNK})",
                cfg.numerics.kv_chunk
            )));
        }
        libs::require_driver()?;
        let count = CudaContext::device_count().map_err(|e| CudaError::NoDevice {
            device: cfg.device,
            detail: format!("the driver reports no usable GPU ({e})"),
        })?;
        if cfg.device >= count.max(0) as usize {
            return Err(CudaError::NoDevice { device: cfg.device, detail: format!("{count} CUDA device(s) visible") });
        }
        let ctx = CudaContext::new(cfg.device).map_err(|e| CudaError::driver("cuCtx (primary context)", e))?;
        // One stream, used in call order: cudarc's per-buffer event tracking is for multi-stream
        // programs and would only add an event record per launch argument.
        // SAFETY: no buffer exists yet, and every later buffer and launch uses `stream`.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| CudaError::driver("cuStreamCreate", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| CudaError::driver("compute capability", e))?;
        let sm = (major * 10 + minor) as u32;
        if cfg.mode == CudaMode::Native && sm < 80 {
            return Err(CudaError::Unsupported(format!(
                "native numerics need bf16 tensor cores (sm_80 or newer); this device is sm_{sm}"
            )));
        }
        // NVRTC is needed only for PTX missing from the cache (compile_ptx_cached says so).
        let arch = if libs::nvrtc_present() { pick_arch(sm)? } else { sm };
        let mut sources = vec![nvrtc::LINEAR_PORTABLE, nvrtc::NORM_ROPE_SWIGLU, nvrtc::ATTENTION, nvrtc::SAMPLING];
        if cfg.mode == CudaMode::Native {
            sources.push(nvrtc::LINEAR_NATIVE);
        }
        let mut fns = HashMap::new();
        for src in sources {
            let ptx = nvrtc::compile_ptx_cached(&src, arch)?;
            let module = ctx.load_module(Ptx::from_src(ptx)).map_err(|e| {
                CudaError::driver(
                    format!("cuModuleLoadData({}, compute_{arch}; PTX from NVRTC 13.0 needs driver 580+)", src.file),
                    e,
                )
            })?;
            for &entry in src.entries {
                let f = module
                    .load_function(entry)
                    .map_err(|e| CudaError::driver(format!("cuModuleGetFunction({entry})"), e))?;
                fns.insert(entry.to_string(), f);
            }
        }
        let name = match cfg.mode {
            CudaMode::Portable => "portable".to_string(),
            CudaMode::Native => format!("cuda-native-sm_{sm}"),
        };
        Ok(CudaBackend { cfg, ctx, stream, sm, name, fns })
    }

    pub fn config(&self) -> &CudaConfig {
        &self.cfg
    }
    /// Compute capability as `10·major + minor`.
    pub fn sm(&self) -> u32 {
        self.sm
    }
    pub fn device_name(&self) -> String {
        self.ctx.name().unwrap_or_else(|_| "unknown CUDA device".to_string())
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream every operation of this backend runs on (NCCL communicators should use it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// Wait until every queued operation has finished (for timing).
    pub fn synchronize(&self) {
        self.stream.synchronize().unwrap_or_else(|e| fail("stream synchronize", e))
    }

    #[track_caller]
    fn func(&self, name: &str) -> &CudaFunction {
        self.fns.get(name).unwrap_or_else(|| panic!("CUDA kernel {name} is not loaded in this mode"))
    }

    #[track_caller]
    fn alloc<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> CudaSlice<T> {
        self.stream.alloc_zeros::<T>(len.max(1)).unwrap_or_else(|e| fail("alloc", e))
    }

    #[track_caller]
    fn to_device<T: DeviceRepr + ValidAsZeroBits>(&self, data: &[T]) -> CudaSlice<T> {
        if data.is_empty() {
            return self.alloc(1);
        }
        self.stream.clone_htod(data).unwrap_or_else(|e| fail("host-to-device copy", e))
    }

    /// Wrap a device buffer (its length is the logical length).
    pub fn wrap(&self, data: CudaSlice<f32>) -> CudaBuf {
        let len = data.len();
        CudaBuf { data, len }
    }

    /// Row-parallel partial or full linear on device buffers (no bias).
    fn linear_into(&self, x: &CudaBuf, m: usize, w: &CudaWeight, segs: SegmentRange, y: &mut CudaBuf) {
        let (n, k) = (w.rows, w.cols);
        assert_eq!(k, segs.real_range().len(), "weight columns must cover the segment range");
        assert_eq!(x.len, m * k, "x shape");
        assert_eq!(y.len, m * n, "y shape");
        if m == 0 || n == 0 {
            return;
        }
        // Tensor cores take bf16/f16 weights and a power-of-two segment tree (LEVELS). Block
        // types and `3·2^k` segmentations run the portable kernel — chosen by the dtype and the
        // deployment's S, never by a rank's share, so every TP degree takes the same path.
        let native = matches!(w.dtype, DType::Bf16 | DType::F16) && segs.seg.segments.is_power_of_two();
        if self.cfg.mode == CudaMode::Native && native {
            self.linear_native(x, m, w, segs, y)
        } else {
            self.linear_portable(x, m, w, segs, y)
        }
    }

    fn linear_portable(&self, x: &CudaBuf, m: usize, w: &CudaWeight, segs: SegmentRange, y: &mut CudaBuf) {
        let count = segs.count;
        let (mt, launch) = plan::linear_portable(m, w.rows, count);
        let f = self.func(&format!("linear_portable_{}_m{mt}", dtype_suffix(w.dtype)));
        let (mi, ni, ki, sl, ci) = (int(m), int(w.rows), int(w.cols), int(segs.seg.seg_len), int(count));
        let mut b = self.stream.launch_builder(f);
        b.arg(&x.data).arg(&w.data).arg(&mut y.data).arg(&mi).arg(&ni).arg(&ki).arg(&sl).arg(&ci);
        // SAFETY: the argument list matches the kernel's signature; x is [m, k], w [n, k] of the
        // stated dtype, y [m, n] (asserted by the caller), and every index the kernel forms stays
        // inside those extents.
        unsafe { b.launch(launch.config()) }.unwrap_or_else(|e| fail("linear_portable launch", e));
    }

    fn linear_native(&self, x: &CudaBuf, m: usize, w: &CudaWeight, segs: SegmentRange, y: &mut CudaBuf) {
        let t = dtype_suffix(w.dtype);
        let kp = segs.padded_len();
        let mut xh = self.alloc::<u16>(m * kp);
        let (mi, ki, kpi) = (int(m), int(w.cols), int(kp));
        {
            let f = self.func(&format!("convert_x_{t}"));
            let mut b = self.stream.launch_builder(f);
            b.arg(&x.data).arg(&mut xh).arg(&mi).arg(&ki).arg(&kpi);
            // SAFETY: x is [m, k] f32, xh [m, kp] u16.
            unsafe { b.launch(grid_1d(m * kp)) }.unwrap_or_else(|e| fail("convert_x launch", e));
        }
        let levels = segs.count.trailing_zeros();
        let cfg = plan::linear_native(m, w.rows).config();
        let f = self.func(&format!("linear_native_{t}_l{levels}"));
        let (ni, sl) = (int(w.rows), int(segs.seg.seg_len));
        let mut b = self.stream.launch_builder(f);
        b.arg(&xh).arg(&w.data).arg(&mut y.data).arg(&mi).arg(&ni).arg(&ki).arg(&kpi).arg(&sl);
        // SAFETY: xh is [m, kp] 16-bit, w [n, k] 16-bit, y [m, n] f32; kp = count·seg_len.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("linear_native launch", e));
    }

    fn add_bias_into(&self, y: &mut CudaBuf, bias: &CudaWeight) {
        let nb = bias.rows * bias.cols;
        if y.len == 0 {
            return;
        }
        assert!(nb > 0, "empty bias");
        let f = self.func(&format!("add_bias_{}", dtype_suffix(bias.dtype)));
        let (total, nbi) = (int(y.len), int(nb));
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut y.data).arg(&bias.data).arg(&total).arg(&nbi);
        // SAFETY: y has `total` elements; the kernel reads bias[j mod nb].
        unsafe { b.launch(grid_1d(y.len)) }.unwrap_or_else(|e| fail("add_bias launch", e));
    }

    /// Tree-combine `t` device arrays of `n` floats (given by address) into `y`.
    pub(crate) fn tree_combine_ptrs(&self, ptrs: &[u64], n: usize, y: &mut CudaBuf) {
        let t = ptrs.len();
        assert!(crate::is_segment_count(t), "tree_combine needs 2^k or 3·2^k (at most 64) partials, got {t}");
        assert_eq!(y.len, n, "tree_combine output length");
        if n == 0 {
            return;
        }
        let dptrs = self.to_device(ptrs);
        let (ti, ni) = (int(t), int(n));
        let f = self.func("tree_combine");
        let mut b = self.stream.launch_builder(f);
        b.arg(&dptrs).arg(&ti).arg(&ni).arg(&mut y.data);
        // SAFETY: each pointer addresses n floats that stay alive until the stream passes this
        // kernel (the caller holds them; frees are stream-ordered).
        unsafe { b.launch(grid_1d(n)) }.unwrap_or_else(|e| fail("tree_combine launch", e));
    }

    fn sample_partials(
        &self,
        logits: &CudaBuf,
        shard: &VocabShard,
        requests: &[SampleRequest],
    ) -> (Vec<f32>, Vec<u32>) {
        let r = requests.len();
        let count = shard.segs.count;
        // The contract's greedy threshold applies on the device too.
        let temps: Vec<f32> = requests.iter().map(|q| q.params.effective().temperature).collect();
        let seeds: Vec<u64> = requests.iter().map(|q| q.params.seed).collect();
        let steps: Vec<u64> = requests.iter().map(|q| q.step).collect();
        let (dt, ds, dst) = (self.to_device(&temps), self.to_device(&seeds), self.to_device(&steps));
        let mut out_f = self.alloc::<f32>(r * count * 5);
        let mut out_u = self.alloc::<u32>(r * count * 2);
        let seg = shard.segs.seg;
        let (rows, off, len, sl, first, ci) =
            (int(shard.rows), int(shard.offset), int(seg.len), int(seg.seg_len), int(shard.segs.first), int(count));
        let cfg = plan::sample(count, r).config();
        let f = self.func("sample_partials");
        let mut b = self.stream.launch_builder(f);
        b.arg(&logits.data)
            .arg(&rows)
            .arg(&off)
            .arg(&len)
            .arg(&sl)
            .arg(&first)
            .arg(&ci)
            .arg(&dt)
            .arg(&ds)
            .arg(&dst)
            .arg(&mut out_f)
            .arg(&mut out_u);
        // SAFETY: logits is [r, shard.rows]; the shard's segments cover exactly ids
        // offset..offset + rows; the outputs are [r, count, 5] and [r, count, 2].
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("sample_partials launch", e));
        let f_host = self.stream.clone_dtoh(&out_f).unwrap_or_else(|e| fail("device-to-host copy", e));
        let u_host = self.stream.clone_dtoh(&out_u).unwrap_or_else(|e| fail("device-to-host copy", e));
        (f_host, u_host)
    }
}

/// The virtual architecture to compile for: the device's own, or the newest NVRTC knows below it
/// (PTX runs on any later GPU).
fn pick_arch(sm: u32) -> Result<u32, CudaError> {
    use cudarc::nvrtc::sys;
    let mut n = 0i32;
    // SAFETY: NVRTC is loaded (checked by the caller); the pointer is valid for writes.
    if unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) } != sys::nvrtcResult::NVRTC_SUCCESS || n <= 0 {
        return Ok(sm);
    }
    let mut archs = vec![0i32; n as usize];
    // SAFETY: `archs` holds the `n` elements NVRTC writes.
    if unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) } != sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(sm);
    }
    archs
        .iter()
        .map(|&a| a as u32)
        .filter(|&a| a <= sm)
        .max()
        .ok_or_else(|| CudaError::Unsupported(format!("sm_{sm} is older than every architecture this NVRTC supports")))
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Weight = CudaWeight;
    type KvCache = CudaKvCache;

    fn fingerprint_name(&self) -> String {
        self.name.clone()
    }
    fn numerics(&self) -> NumericsConfig {
        self.cfg.numerics
    }
    fn mode(&self) -> KernelMode {
        // Both CUDA modes are invariant; the fast (conventional GEMM) mode is CPU-only.
        KernelMode::Invariant
    }

    fn upload(&self, data: &[f32]) -> CudaBuf {
        CudaBuf { data: self.to_device(data), len: data.len() }
    }
    fn download(&self, buf: &CudaBuf) -> Vec<f32> {
        if buf.len == 0 {
            return Vec::new();
        }
        let view = buf.data.slice(0..buf.len);
        self.stream.clone_dtoh(&view).unwrap_or_else(|e| fail("device-to-host copy", e))
    }
    fn zeros(&self, len: usize) -> CudaBuf {
        CudaBuf { data: self.alloc(len), len }
    }
    fn prepare_weight(&self, w: HostWeight) -> CudaWeight {
        CudaWeight { dtype: w.dtype, rows: w.rows, cols: w.cols, data: self.to_device(w.bytes.as_slice()) }
    }
    fn alloc_kv(&self, layout: KvLayout) -> CudaKvCache {
        CudaKvCache { layout, k: self.alloc(layout.floats()), v: self.alloc(layout.floats()) }
    }

    fn linear(&self, x: &CudaBuf, m: usize, w: &CudaWeight, bias: Option<&CudaWeight>, y: &mut CudaBuf) {
        let segs = Segmentation::new(w.cols, self.cfg.numerics.reduce_segments).expect("validated").full();
        self.linear_into(x, m, w, segs, y);
        if let Some(b) = bias {
            self.add_bias_into(y, b);
        }
    }
    fn linear_partial(&self, x: &CudaBuf, m: usize, w: &CudaWeight, segs: SegmentRange, y: &mut CudaBuf) {
        self.linear_into(x, m, w, segs, y)
    }
    fn tree_combine(&self, partials: &[&CudaBuf], y: &mut CudaBuf) {
        assert!(partials.iter().all(|p| p.len == y.len), "partials and output differ in length");
        let guards: Vec<_> = partials.iter().map(|p| p.data.device_ptr(&self.stream)).collect();
        let ptrs: Vec<u64> = guards.iter().map(|(p, _)| *p).collect();
        self.tree_combine_ptrs(&ptrs, y.len, y);
    }
    fn add_bias(&self, y: &mut CudaBuf, bias: &CudaWeight) {
        self.add_bias_into(y, bias)
    }
    fn embedding(&self, ids: &[u32], table: &CudaWeight, out: &mut CudaBuf) {
        assert_eq!(out.len, ids.len() * table.cols, "embedding output shape");
        if out.len == 0 {
            return;
        }
        assert!(ids.iter().all(|&i| (i as usize) < table.rows), "token id beyond the embedding table");
        let dids = self.to_device(ids);
        let (t, c) = (int(ids.len()), int(table.cols));
        let f = self.func(&format!("embedding_{}", dtype_suffix(table.dtype)));
        let mut b = self.stream.launch_builder(f);
        b.arg(&dids).arg(&table.data).arg(&mut out.data).arg(&t).arg(&c);
        // SAFETY: ids are below table.rows (checked); out is [t, cols].
        unsafe { b.launch(grid_1d(out.len)) }.unwrap_or_else(|e| fail("embedding launch", e));
    }
    fn rms_norm(&self, x: &CudaBuf, weight: &CudaWeight, eps: f32, out: &mut CudaBuf) {
        let n = weight.rows * weight.cols;
        assert!(n > 0 && x.len.is_multiple_of(n) && out.len == x.len, "rms_norm shapes");
        let rows = x.len / n;
        if rows == 0 {
            return;
        }
        let seg = Segmentation::new(n, self.cfg.numerics.reduce_segments).expect("validated");
        let (ni, si, sl) = (int(n), int(seg.segments), int(seg.seg_len));
        let cfg = plan::rms_norm(rows).config();
        let f = self.func(&format!("rms_norm_{}", dtype_suffix(weight.dtype)));
        let mut b = self.stream.launch_builder(f);
        b.arg(&x.data).arg(&weight.data).arg(&mut out.data).arg(&ni).arg(&si).arg(&sl).arg(&eps);
        // SAFETY: x and out are [rows, n], the weight holds n elements, segments ≤ 64.
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("rms_norm launch", e));
    }
    fn rope(&self, x: &mut CudaBuf, n_heads: usize, positions: &[u32], tables: &RopeTables) {
        let d = tables.head_dim;
        let h = d / 2;
        assert_eq!(x.len, positions.len() * n_heads * d, "rope shape");
        if x.len == 0 || h == 0 {
            return;
        }
        // Only the rows of this call's positions travel; the tables themselves are the crate's.
        let mut cos = Vec::with_capacity(positions.len() * h);
        let mut sin = Vec::with_capacity(positions.len() * h);
        for &p in positions {
            let (c, s) = tables.row(p as usize).expect("position within rope table");
            cos.extend_from_slice(c);
            sin.extend_from_slice(s);
        }
        let (dc, ds) = (self.to_device(&cos), self.to_device(&sin));
        let (t, nh, di) = (int(positions.len()), int(n_heads), int(d));
        let f = self.func("rope");
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut x.data).arg(&dc).arg(&ds).arg(&t).arg(&nh).arg(&di);
        // SAFETY: x is [t, n_heads·d], cos/sin are [t, d/2].
        unsafe { b.launch(grid_1d(positions.len() * n_heads * h)) }.unwrap_or_else(|e| fail("rope launch", e));
    }
    fn swiglu(&self, gate: &CudaBuf, up: &CudaBuf, out: &mut CudaBuf) {
        assert!(gate.len == up.len && out.len == gate.len, "swiglu shapes");
        if out.len == 0 {
            return;
        }
        let n = int(out.len);
        let f = self.func("swiglu");
        let mut b = self.stream.launch_builder(f);
        b.arg(&gate.data).arg(&up.data).arg(&mut out.data).arg(&n);
        // SAFETY: all three hold n elements.
        unsafe { b.launch(grid_1d(out.len)) }.unwrap_or_else(|e| fail("swiglu launch", e));
    }
    fn add_assign(&self, y: &mut CudaBuf, x: &CudaBuf) {
        assert_eq!(y.len, x.len, "add_assign shapes");
        if y.len == 0 {
            return;
        }
        let n = int(y.len);
        let f = self.func("add_assign");
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut y.data).arg(&x.data).arg(&n);
        // SAFETY: both hold n elements.
        unsafe { b.launch(grid_1d(y.len)) }.unwrap_or_else(|e| fail("add_assign launch", e));
    }
    fn gather_rows(&self, x: &CudaBuf, width: usize, rows: &[u32], out: &mut CudaBuf) {
        assert_eq!(out.len, rows.len() * width, "gather_rows output shape");
        if out.len == 0 {
            return;
        }
        assert!(rows.iter().all(|&r| (r as usize + 1) * width <= x.len), "gather_rows row out of range");
        let drows = self.to_device(rows);
        let (n, w) = (int(rows.len()), int(width));
        let f = self.func("gather_rows");
        let mut b = self.stream.launch_builder(f);
        b.arg(&x.data).arg(&drows).arg(&mut out.data).arg(&n).arg(&w);
        // SAFETY: every row index is inside x (checked); out is [rows, width].
        unsafe { b.launch(grid_1d(out.len)) }.unwrap_or_else(|e| fail("gather_rows launch", e));
    }
    fn write_kv(&self, cache: &mut CudaKvCache, k: &CudaBuf, v: &CudaBuf, slots: &[u32]) {
        let w = cache.layout.row_width();
        assert!(k.len == slots.len() * w && v.len == k.len, "write_kv shapes");
        if k.len == 0 {
            return;
        }
        assert!(slots.iter().all(|&s| (s as usize) < cache.layout.slots()), "KV slot out of range");
        let dslots = self.to_device(slots);
        let (t, wi) = (int(slots.len()), int(w));
        let f = self.func("write_kv");
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut cache.k).arg(&mut cache.v).arg(&k.data).arg(&v.data).arg(&dslots).arg(&t).arg(&wi);
        // SAFETY: every slot is inside the cache (checked); k and v are [t, width].
        unsafe { b.launch(grid_1d(k.len)) }.unwrap_or_else(|e| fail("write_kv launch", e));
    }
    fn attention(&self, q: &CudaBuf, seqs: &[AttnSeq<'_>], cache: &CudaKvCache, params: AttnParams, out: &mut CudaBuf) {
        let p = params;
        let width = p.n_heads * p.head_dim;
        assert!(q.len == out.len && width > 0 && q.len.is_multiple_of(width), "attention shapes");
        let l = &cache.layout;
        assert!(p.n_kv_heads == l.n_kv_heads && p.head_dim == l.head_dim && p.block_size == l.block_size);
        assert!(
            p.head_dim <= MAX_HEAD_DIM,
            "head_dim {} exceeds the CUDA attention limit of {MAX_HEAD_DIM}",
            p.head_dim
        );
        assert!(
            (1..=MAX_KV_CHUNK).contains(&p.kv_chunk),
            "kv_chunk {} outside the CUDA attention range 1..={MAX_KV_CHUNK}",
            p.kv_chunk
        );
        let mut rows: Vec<i32> = Vec::new();
        let mut tables: Vec<u32> = Vec::new();
        for s in seqs {
            let last = s.first_pos + s.n_q;
            assert!(s.n_q == 0 || last.div_ceil(p.block_size) <= s.block_table.len(), "block table too short");
            assert!(s.block_table.iter().all(|&b| (b as usize) < l.num_blocks), "block id out of range");
            let off = int(tables.len());
            tables.extend_from_slice(s.block_table);
            for i in 0..s.n_q {
                assert!((s.q_row + i + 1) * width <= q.len, "query row out of range");
                rows.extend_from_slice(&[int(s.q_row + i), int(s.first_pos + i), off]);
            }
        }
        let n_rows = rows.len() / 3;
        if n_rows == 0 {
            return;
        }
        let (warps, launch) = plan::attention(n_rows, p.n_heads, p.kv_chunk);
        let cfg = launch.config();
        let (drows, dtables) = (self.to_device(&rows), self.to_device(&tables));
        let (nh, nkv, d, bs, ch, wpb) =
            (int(p.n_heads), int(p.n_kv_heads), int(p.head_dim), int(p.block_size), int(p.kv_chunk), int(warps));
        let scale = p.scale();
        let f = self.func("attention_paged");
        let mut b = self.stream.launch_builder(f);
        b.arg(&q.data)
            .arg(&mut out.data)
            .arg(&cache.k)
            .arg(&cache.v)
            .arg(&drows)
            .arg(&dtables)
            .arg(&nh)
            .arg(&nkv)
            .arg(&d)
            .arg(&bs)
            .arg(&ch)
            .arg(&scale)
            .arg(&wpb);
        // SAFETY: rows and block tables were bounds-checked above; the dynamic shared memory holds
        // kv_chunk floats per warp (≤ 48 KiB).
        unsafe { b.launch(cfg) }.unwrap_or_else(|e| fail("attention launch", e));
    }
    fn sample_shard(&self, logits: &CudaBuf, shard: VocabShard, requests: &[SampleRequest]) -> Vec<ShardSample> {
        assert_eq!(logits.len, requests.len() * shard.rows, "sample_shard logits shape");
        if requests.is_empty() {
            return Vec::new();
        }
        // Rows with top-k / top-p need the sorted candidate list: the host computes them from the
        // downloaded row with the CPU's own function (identical by construction).
        let host = requests.iter().any(|r| filters_on(&r.params)).then(|| self.download(logits));
        let (pf, pu) = if requests.iter().any(|r| !filters_on(&r.params)) {
            self.sample_partials(logits, &shard, requests)
        } else {
            (Vec::new(), Vec::new())
        };
        let count = shard.segs.count;
        requests
            .iter()
            .enumerate()
            .map(|(i, req)| {
                if filters_on(&req.params) {
                    let h = host.as_ref().expect("downloaded");
                    return shard_sample(&h[i * shard.rows..(i + 1) * shard.rows], &shard, req);
                }
                plan::assemble_sample(&pf, &pu, i, count)
            })
            .collect()
    }
}
