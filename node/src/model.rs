//! The forward pass: one **step** over a mixed batch of prefill chunks and decode tokens.
//!
//! A step is a [`StepPlan`]: for each sequence, some tokens at known positions, the KV blocks they
//! go to, and whether to sample after the last one. The model concatenates every sequence's tokens
//! into one `[T, hidden]` activation and runs each layer once for all of them; only attention
//! looks at sequence boundaries. Every kernel is batch-invariant, so a sequence's bits do not
//! depend on what else is in `T`, and because each step writes its own K/V into the paged cache
//! *before* attention reads it back, prefill, chunked prefill, decode and recompute after
//! preemption all see identical keys.
//!
//! The model holds one tensor-parallel shard ([`ShardPlan`]); with `tp = 1` that is the whole model.
//! Row-parallel layers (o_proj, down_proj) produce segment-subtree partials that the
//! [`Collective`] finishes; sampling returns each vocab shard's [`ShardSample`], never logits.

use std::path::Path;

use lockstep_kernels::{
    AttnParams, AttnSeq, Backend, GroupLinear, HostWeight, KvLayout, RopeTables, SampleRequest, ShardSample,
};
use lockstep_proto::step::StepPlan;

use crate::config::ModelConfig;
use crate::error::LoadError;
use crate::shard::{ShardError, ShardPlan};
use crate::source::WeightStore;
use crate::weights::layer_tensor;

/// Finishes the segment tree of a row-parallel layer across ranks.
pub trait Collective: Send + Sync {
    /// Number of ranks in the group.
    fn ranks(&self) -> usize;
    /// Every rank passes its partial (same length everywhere); every rank gets in `out` (the same
    /// length) the tree combine of all partials in rank order.
    fn all_reduce(&self, partial: &[f32], out: &mut [f32]) -> Result<(), StepError>;
}

/// The collective of a one-rank group: the partial already is the whole tree.
pub struct SingleRank;
impl Collective for SingleRank {
    fn ranks(&self) -> usize {
        1
    }
    fn all_reduce(&self, partial: &[f32], out: &mut [f32]) -> Result<(), StepError> {
        out.copy_from_slice(partial);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Shard(#[from] ShardError),
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum StepError {
    #[error("position {pos} of sequence {seq} is beyond the model's context of {max} positions")]
    PositionOutOfRange { seq: u64, pos: usize, max: usize },
    #[error("invalid step plan: {0}")]
    Plan(#[from] lockstep_proto::step::StepPlanError),
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("all-reduce failed: {0}")]
    Collective(String),
}

/// Engine-side sizing of one model instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    /// KV cache blocks (each `block_size` positions, all layers).
    pub num_blocks: usize,
    pub block_size: usize,
    /// Longest context served (≤ `max_position_embeddings`); sizes the RoPE tables.
    pub max_context: usize,
}

struct Layer<B: Backend> {
    input_norm: B::Weight,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    q_bias: Option<B::Weight>,
    k_bias: Option<B::Weight>,
    v_bias: Option<B::Weight>,
    /// Per-head RMSNorm weights `[head_dim]` (Qwen3).
    q_norm: Option<B::Weight>,
    k_norm: Option<B::Weight>,
    o: B::Weight,
    o_bias: Option<B::Weight>,
    post_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

pub struct Model<B: Backend> {
    be: B,
    cfg: ModelConfig,
    plan: ShardPlan,
    opts: ModelOptions,
    layers: Vec<Layer<B>>,
    embed: B::Weight,
    norm: B::Weight,
    lm_head: B::Weight,
    rope: RopeTables,
    kv_layout: KvLayout,
    kv: Vec<B::KvCache>,
    collective: Box<dyn Collective>,
    /// The last step's activation buffers, reused by the next step of the same token count (every
    /// decode step of a steady batch): every kernel overwrites its whole output, so what they held
    /// changes no bit.
    buffers: Option<StepBuffers<B>>,
    /// The last step's lm-head buffers, reused by the next step that samples as many rows (at
    /// batch-1 decode a fresh 49k-float logits buffer per step was zeroed, and its free
    /// consolidated the heap, on the step's thread while the team waited).
    head: Option<HeadBuffers<B>>,
}

/// The lm-head's buffers for `rows` sampled rows.
struct HeadBuffers<B: Backend> {
    rows: usize,
    /// The sampled rows' hidden states, then normalised.
    last: B::Buf,
    normed: B::Buf,
    logits: B::Buf,
}

/// One step's activation buffers, for `t` tokens.
struct StepBuffers<B: Backend> {
    t: usize,
    x: B::Buf,
    h: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    a: B::Buf,
    /// Qwen3's per-head norms write here (the kernels do not normalise in place).
    qn: B::Buf,
    kn: B::Buf,
    o: B::Buf,
    /// Where the all-reduce writes its result (then swapped with `o`).
    reduced: B::Buf,
    g: B::Buf,
    u: B::Buf,
    s: B::Buf,
}

impl<B: Backend> StepBuffers<B> {
    #[allow(clippy::too_many_arguments)]
    fn new(be: &B, t: usize, hidden: usize, qw: usize, kvw: usize, inter: usize, qk_norm: bool, ranks: usize) -> Self {
        StepBuffers {
            t,
            x: be.zeros(t * hidden),
            h: be.zeros(t * hidden),
            q: be.zeros(t * qw),
            k: be.zeros(t * kvw),
            v: be.zeros(t * kvw),
            a: be.zeros(t * qw),
            qn: be.zeros(if qk_norm { t * qw } else { 0 }),
            kn: be.zeros(if qk_norm { t * kvw } else { 0 }),
            o: be.zeros(t * hidden),
            reduced: be.zeros(if ranks > 1 { t * hidden } else { 0 }),
            g: be.zeros(t * inter),
            u: be.zeros(t * inter),
            s: be.zeros(t * inter),
        }
    }
}

/// One sampled row of a step: which sequence, and this shard's report.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSample {
    pub seq_id: u64,
    pub request: SampleRequest,
    pub sample: ShardSample,
}

impl<B: Backend> Model<B> {
    /// Load rank `plan.rank`'s shard of the model at `path` (a HF directory or a GGUF file),
    /// reading only the bytes that shard needs (column slices of row-parallel weights are copied,
    /// everything else in a kept dtype is memory-mapped).
    pub fn load(
        be: B,
        path: &Path,
        cfg: ModelConfig,
        plan: ShardPlan,
        opts: ModelOptions,
        collective: Box<dyn Collective>,
    ) -> Result<Self, ModelError> {
        let repo = WeightStore::open(path)?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        if plan.segments != be.numerics().reduce_segments {
            return Err(ModelError::Invalid(format!(
                "shard plan uses {} segments but the backend {}",
                plan.segments,
                be.numerics().reduce_segments
            )));
        }
        if opts.max_context > cfg.max_position_embeddings {
            return Err(ModelError::Invalid(format!(
                "max context {} exceeds the model's max_position_embeddings {}",
                opts.max_context, cfg.max_position_embeddings
            )));
        }
        let check = |name: &str, shape: &[usize]| repo.check_shape(name, shape);
        // Column-parallel: a slice of rows. Row-parallel: a slice of columns. Vectors: whole.
        let rows = |name: &str, shape: [usize; 2], r: std::ops::Range<usize>| -> Result<B::Weight, LoadError> {
            check(name, &shape)?;
            Ok(be.prepare_weight(repo.get_rows(name, r)?))
        };
        let cols = |name: &str, shape: [usize; 2], c: std::ops::Range<usize>| -> Result<B::Weight, LoadError> {
            check(name, &shape)?;
            let w = if c.len() == shape[1] { repo.get(name)? } else { repo.get_cols(name, c)? };
            Ok(be.prepare_weight(w))
        };
        let vector = |name: &str, len: usize, part: Option<std::ops::Range<usize>>| -> Result<B::Weight, LoadError> {
            check(name, &[len])?;
            let w: HostWeight = match part {
                Some(c) if c.len() != len => repo.get_cols(name, c)?,
                _ => repo.get(name)?,
            };
            Ok(be.prepare_weight(w))
        };
        let (q_dim, kv_dim, inter) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate_size);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let t = |s: &str| layer_tensor(i, s);
            let bias = |on: bool, s: &str, len: usize, part: std::ops::Range<usize>| {
                on.then(|| vector(&t(s), len, Some(part))).transpose()
            };
            layers.push(Layer {
                input_norm: vector(&t("input_layernorm.weight"), h, None)?,
                q: rows(&t("self_attn.q_proj.weight"), [q_dim, h], plan.q_rows.clone())?,
                k: rows(&t("self_attn.k_proj.weight"), [kv_dim, h], plan.kv_rows.clone())?,
                v: rows(&t("self_attn.v_proj.weight"), [kv_dim, h], plan.kv_rows.clone())?,
                q_bias: bias(cfg.qkv_bias, "self_attn.q_proj.bias", q_dim, plan.q_rows.clone())?,
                k_bias: bias(cfg.qkv_bias, "self_attn.k_proj.bias", kv_dim, plan.kv_rows.clone())?,
                v_bias: bias(cfg.qkv_bias, "self_attn.v_proj.bias", kv_dim, plan.kv_rows.clone())?,
                q_norm: cfg.qk_norm.then(|| vector(&t("self_attn.q_norm.weight"), cfg.head_dim, None)).transpose()?,
                k_norm: cfg.qk_norm.then(|| vector(&t("self_attn.k_norm.weight"), cfg.head_dim, None)).transpose()?,
                o: cols(&t("self_attn.o_proj.weight"), [h, q_dim], plan.o_segs.real_range())?,
                o_bias: bias(cfg.o_bias, "self_attn.o_proj.bias", h, 0..h)?,
                post_norm: vector(&t("post_attention_layernorm.weight"), h, None)?,
                gate: rows(&t("mlp.gate_proj.weight"), [inter, h], plan.mlp_rows())?,
                up: rows(&t("mlp.up_proj.weight"), [inter, h], plan.mlp_rows())?,
                down: cols(&t("mlp.down_proj.weight"), [h, inter], plan.mlp_rows())?,
            });
        }
        let embed = be.prepare_weight({
            check("model.embed_tokens.weight", &[v, h])?;
            repo.get("model.embed_tokens.weight")?
        });
        let lm_name = if cfg.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        let lm_head = rows(lm_name, [v, h], plan.vocab_rows())?;
        let norm = vector("model.norm.weight", h, None)?;
        let rope =
            RopeTables::new(&cfg.rope_config(), opts.max_context).map_err(|e| ModelError::Invalid(e.to_string()))?;
        let kv_layout = KvLayout {
            num_blocks: opts.num_blocks,
            block_size: opts.block_size,
            n_kv_heads: plan.n_kv_heads,
            head_dim: plan.head_dim,
        };
        let kv = (0..cfg.num_hidden_layers).map(|_| be.alloc_kv(kv_layout)).collect();
        Ok(Model {
            be,
            cfg,
            plan,
            opts,
            layers,
            embed,
            norm,
            lm_head,
            rope,
            kv_layout,
            kv,
            collective,
            buffers: None,
            head: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }
    pub fn options(&self) -> &ModelOptions {
        &self.opts
    }
    pub fn kv_layout(&self) -> KvLayout {
        self.kv_layout
    }
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// Run one step; returns this shard's sampling report for every chunk that asked for one, in
    /// the order of the plan's chunks.
    pub fn step(&mut self, plan: &StepPlan) -> Result<Vec<StepSample>, StepError>
    where
        B::Buf: 'static,
    {
        match self.be.step_pool() {
            Some(pool) => pool.install(|| self.step_on_this_thread(plan)),
            None => self.step_on_this_thread(plan),
        }
    }

    fn step_on_this_thread(&mut self, plan: &StepPlan) -> Result<Vec<StepSample>, StepError>
    where
        B::Buf: 'static,
    {
        let be = &self.be;
        let (hidden, hd) = (self.cfg.hidden_size, self.plan.head_dim);
        let (nh, nkv) = (self.plan.n_heads, self.plan.n_kv_heads);
        let bs = self.opts.block_size;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut slots = Vec::new();
        let mut sample_rows = Vec::new();
        let mut requests = Vec::new();
        let mut sample_seqs = Vec::new();
        // One validator for every plan a node runs (sequences unique, blocks in range, tables long
        // enough, no KV slot written twice): a bad plan is an error, never another sequence's KV.
        plan.validate(bs as u32, u32::try_from(self.opts.num_blocks).unwrap_or(u32::MAX))?;
        for c in &plan.chunks {
            let first = c.first_pos as usize;
            let end = first + c.tokens.len();
            if end > self.opts.max_context {
                return Err(StepError::PositionOutOfRange { seq: c.seq_id, pos: end - 1, max: self.opts.max_context });
            }
            for (i, &t) in c.tokens.iter().enumerate() {
                if t as usize >= self.cfg.vocab_size {
                    return Err(StepError::TokenOutOfRange { token: t, vocab: self.cfg.vocab_size });
                }
                let p = first + i;
                tokens.push(t);
                positions.push(p as u32);
                slots.push(c.block_table[p / bs] * bs as u32 + (p % bs) as u32);
            }
            if let Some(req) = c.sample {
                sample_rows.push((tokens.len() - 1) as u32);
                requests.push(req);
                sample_seqs.push(c.seq_id);
            }
        }
        let t = tokens.len();
        if t == 0 {
            return Ok(Vec::new());
        }
        let mut seqs = Vec::with_capacity(plan.chunks.len());
        let mut row = 0;
        for c in &plan.chunks {
            seqs.push(AttnSeq {
                block_table: &c.block_table,
                q_row: row,
                n_q: c.tokens.len(),
                first_pos: c.first_pos as usize,
            });
            row += c.tokens.len();
        }
        let attn =
            AttnParams { n_heads: nh, n_kv_heads: nkv, head_dim: hd, block_size: bs, kv_chunk: be.numerics().kv_chunk };
        let eps = self.cfg.rms_norm_eps as f32;
        let (qw, kvw) = (nh * hd, nkv * hd);
        let inter = self.plan.mlp_rows().len();

        let mut buffers = match self.buffers.take() {
            Some(b) if b.t == t => b,
            _ => StepBuffers::new(be, t, hidden, qw, kvw, inter, self.cfg.qk_norm, self.collective.ranks()),
        };
        let StepBuffers { x, h, q, k, v, a, qn, kn, o, reduced, g, u, s, .. } = &mut buffers;
        be.embedding(&tokens, &self.embed, x);
        for (layer, cache) in self.layers.iter().zip(self.kv.iter_mut()) {
            be.rms_norm(x, &layer.input_norm, eps, h);
            be.linear_group(
                h,
                t,
                &mut [
                    GroupLinear { weight: &layer.q, bias: layer.q_bias.as_ref(), out: &mut *q },
                    GroupLinear { weight: &layer.k, bias: layer.k_bias.as_ref(), out: &mut *k },
                    GroupLinear { weight: &layer.v, bias: layer.v_bias.as_ref(), out: &mut *v },
                ],
            );
            // RMSNorm over each head: the weight is `[head_dim]`, so every head is one row.
            if let (Some(qw_norm), Some(kw_norm)) = (&layer.q_norm, &layer.k_norm) {
                be.rms_norm(q, qw_norm, eps, qn);
                std::mem::swap(q, qn);
                be.rms_norm(k, kw_norm, eps, kn);
                std::mem::swap(k, kn);
            }
            be.rope(q, nh, &positions, &self.rope);
            be.rope(k, nkv, &positions, &self.rope);
            be.write_kv(cache, k, v, &slots);
            be.attention(q, &seqs, cache, attn, a);
            be.linear_partial(a, t, &layer.o, self.plan.o_segs, o);
            all_reduce(be, self.collective.as_ref(), o, reduced)?;
            if let Some(b) = &layer.o_bias {
                be.add_bias(o, b);
            }
            be.add_assign(x, o);
            be.rms_norm(x, &layer.post_norm, eps, h);
            be.linear_group(
                h,
                t,
                &mut [
                    GroupLinear { weight: &layer.gate, bias: None, out: &mut *g },
                    GroupLinear { weight: &layer.up, bias: None, out: &mut *u },
                ],
            );
            be.swiglu(g, u, s);
            be.linear_partial(s, t, &layer.down, self.plan.mlp_segs, o);
            all_reduce(be, self.collective.as_ref(), o, reduced)?;
            be.add_assign(x, o);
        }
        let r = sample_rows.len();
        if r == 0 {
            self.buffers = Some(buffers);
            return Ok(Vec::new());
        }
        let mut head = match self.head.take() {
            Some(b) if b.rows == r => b,
            _ => HeadBuffers {
                rows: r,
                last: be.zeros(r * hidden),
                normed: be.zeros(r * hidden),
                logits: be.zeros(r * self.plan.vocab.rows),
            },
        };
        let HeadBuffers { last, normed, logits, .. } = &mut head;
        be.gather_rows(x, hidden, &sample_rows, last);
        self.buffers = Some(buffers);
        be.rms_norm(last, &self.norm, eps, normed);
        be.linear(normed, r, &self.lm_head, None, logits);
        let samples = be.sample_shard(logits, self.plan.vocab, &requests);
        self.head = Some(head);
        Ok(sample_seqs
            .into_iter()
            .zip(requests)
            .zip(samples)
            .map(|((seq_id, request), sample)| StepSample { seq_id, request, sample })
            .collect())
    }
}

/// Finish a row-parallel partial in `buf` across ranks, using `scratch` (as long as `buf`) for
/// the result; a no-op for one rank.
///
/// A host buffer (the CPU backend's `Vec<f32>`) is handed to the collective as it is and the result
/// swapped in, so the activation is neither downloaded nor uploaded; a device buffer goes through
/// the host. The kernels' `Backend` has no host view of a buffer, hence the type check.
fn all_reduce<B: Backend>(be: &B, c: &dyn Collective, buf: &mut B::Buf, scratch: &mut B::Buf) -> Result<(), StepError>
where
    B::Buf: 'static,
{
    if c.ranks() == 1 {
        return Ok(());
    }
    if let (Some(partial), Some(out)) = (host_vec(buf), host_vec(scratch)) {
        c.all_reduce(partial, out)?;
        std::mem::swap(buf, scratch);
        return Ok(());
    }
    let partial = be.download(buf);
    let mut out = vec![0.0; partial.len()];
    c.all_reduce(&partial, &mut out)?;
    *buf = be.upload(&out);
    Ok(())
}

/// `buf` as the host vector it is on the CPU backend.
fn host_vec<T: 'static>(buf: &mut T) -> Option<&mut Vec<f32>> {
    (buf as &mut dyn std::any::Any).downcast_mut()
}
