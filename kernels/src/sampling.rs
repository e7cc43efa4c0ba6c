//! Sampling: greedy argmax, canonical log-sum-exp, Gumbel-max with counter-based noise.

use std::sync::OnceLock;

use crate::math::{exp, ln};
use crate::{KernelError, VocabShard, LANES};

/// Temperatures below this sample greedily: the contract's rule that every positive temperature
/// gives its limit. `logit / T` overflows f32 for tiny `T` (at `T = 1e-40` every positive logit
/// becomes +inf and the lowest id wins), while at `T ≥ GREEDY_BELOW` no logit below 3.4e33 can
/// overflow and Gumbel-max differs from argmax only between logits closer than ~2e-4 — which is
/// that temperature's own distribution. (vLLM uses the same 1e-5 threshold.)
pub const GREEDY_BELOW: f32 = 1e-5;

/// Per-request sampling parameters. `temperature == 0` (or below [`GREEDY_BELOW`]) is greedy; `top_k == 0` and `top_p == 1`
/// switch those filters off.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }
    /// The parameters the sampler actually uses: a temperature below [`GREEDY_BELOW`] is 0.
    pub fn effective(&self) -> Self {
        if self.temperature < GREEDY_BELOW {
            SamplingParams { temperature: 0.0, ..*self }
        } else {
            *self
        }
    }

    pub fn validate(&self) -> Result<(), KernelError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(KernelError::BadSampling(format!("temperature must be >= 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(KernelError::BadSampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        // The contract's candidate set is at most MAX_CANDIDATES wide; a larger top_k is refused
        // everywhere (API, CLI, engine), never silently clamped.
        if self.top_k as usize > MAX_CANDIDATES {
            return Err(KernelError::BadSampling(format!(
                "top_k must be at most {MAX_CANDIDATES} (the sampler's candidate limit), got {}",
                self.top_k
            )));
        }
        Ok(())
    }
}

/// What to sample for one logits row: the parameters and the index of the generated token
/// (`step` 0 is the first generated token), which keys the noise.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleRequest {
    pub params: SamplingParams,
    pub step: u64,
}

/// Log-sum-exp state of a run of segments: `max` and `sum = Σ exp(x - max)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LsePartial {
    pub max: f32,
    pub sum: f32,
}

/// One token considered by the sampler.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    pub id: u32,
    /// The raw logit.
    pub logit: f32,
    /// The temperature-scaled logit `logit / T` (equal to `logit` when greedy).
    pub z: f32,
    /// The selection score: `z + gumbel(seed, step, id)` (or `logit` when greedy).
    pub score: f32,
}

/// What one vocab shard reports for one row: never the full logits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardSample {
    pub lse: LsePartial,
    pub lse_scaled: Option<LsePartial>,
    pub best: Option<Candidate>,
    pub candidates: Vec<Candidate>,
}

/// The merged choice for one row.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampledToken {
    pub id: u32,
    pub logprob: f32,
}

/// Most candidates a shard reports when top-k or top-p is on: top-k is clamped to it, and the
/// top-p nucleus is searched among this many most likely tokens. A constant of the contract, so
/// the candidate set never depends on the sharding.
pub const MAX_CANDIDATES: usize = 1024;

/// Domain-separation word in the Philox counter, so lockstep's noise never collides with another
/// user of the same generator and seed.
const NOISE_DOMAIN: u32 = 0x6c6f_636b; // "lock"

/// Philox4x32-10 (Salmon et al., SC'11): a counter-based generator, so noise is a pure function of
/// its inputs and any shard can evaluate any token's noise without shared state.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (counter, key);
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        c = [((p1 >> 32) as u32) ^ c[1] ^ k[0], p1 as u32, ((p0 >> 32) as u32) ^ c[3] ^ k[1], p0 as u32];
    }
    c
}

/// Uniform `u ∈ (0, 1)` (exclusive both ends) for `(seed, step, token)`: 23 random bits as the odd
/// numerator `2j + 1` over 2^24, exact in f32.
pub fn uniform(seed: u64, step: u64, token: u32) -> f32 {
    let r = philox4x32_10([token, step as u32, (step >> 32) as u32, NOISE_DOMAIN], [seed as u32, (seed >> 32) as u32]);
    ((r[0] >> 9) * 2 + 1) as f32 * (1.0 / 16_777_216.0)
}

/// Standard Gumbel noise `-ln(-ln u)` with the contract's `ln`.
pub fn gumbel(seed: u64, step: u64, token: u32) -> f32 {
    -ln(-ln(uniform(seed, step, token)))
}

/// Combine two log-sum-exp states (the node of the tree): rebase both sums to the larger max.
pub fn lse_combine(a: LsePartial, b: LsePartial) -> LsePartial {
    if a.max == f32::NEG_INFINITY {
        return b;
    }
    if b.max == f32::NEG_INFINITY {
        return a;
    }
    let max = a.max.max(b.max);
    LsePartial { max, sum: a.sum * exp(a.max - max) + b.sum * exp(b.max - max) }
}

/// Reduce partials in order with the canonical tree ([`crate::reference::tree_reduce`]).
pub fn lse_tree(parts: &[LsePartial]) -> LsePartial {
    crate::reference::tree_reduce(&mut parts.to_vec(), lse_combine)
}

impl LsePartial {
    pub const EMPTY: LsePartial = LsePartial { max: f32::NEG_INFINITY, sum: 0.0 };
    /// `max + ln(sum)`.
    pub fn value(&self) -> f32 {
        self.max + ln(self.sum)
    }
}

/// Log-sum-exp of one vocab shard of `values` (ids `shard.offset..`): per segment of the canonical
/// vocab segmentation, the segment max, then `exp(x − max)` summed in 16 logical lanes (lane `l`
/// takes the segment's elements `l, l+16, …`) and the lane tree; segments by the segment tree.
pub fn lse_shard(values: &[f32], shard: &VocabShard) -> LsePartial {
    lse_shard_with(values, shard, segment_exp_lanes)
}

/// The 16 lane sums `Σ exp(x − max)` of one segment (lane `l` takes elements `l, l+16, …`).
pub fn segment_exp_lanes(xs: &[f32], max: f32) -> [f32; LANES] {
    let mut lanes = [0.0f32; LANES];
    for (i, &x) in xs.iter().enumerate() {
        lanes[i % LANES] += exp(x - max);
    }
    lanes
}

/// [`lse_shard`] with the per-segment lane sums computed by `lanes` (a SIMD twin of
/// [`segment_exp_lanes`] that must give the same bits).
pub fn lse_shard_with(values: &[f32], shard: &VocabShard, lanes: impl Fn(&[f32], f32) -> [f32; LANES]) -> LsePartial {
    let parts: Vec<LsePartial> = (0..shard.segs.count).map(|s| lse_segment(values, shard, s, &lanes)).collect();
    lse_tree(&parts)
}

/// The shard's elements of its `s`-th segment of the canonical vocab segmentation, as a range of
/// `values` (the shard's own values, from `shard.offset`).
fn segment_range(shard: &VocabShard, s: usize) -> std::ops::Range<usize> {
    let seg = shard.segs.seg;
    let s = shard.segs.first + s;
    let lo = (s * seg.seg_len).min(seg.len);
    let hi = ((s + 1) * seg.seg_len).min(seg.len);
    lo - shard.offset..hi - shard.offset
}

/// The log-sum-exp partial of the shard's `s`-th segment (see [`lse_shard`]).
fn lse_segment(
    values: &[f32],
    shard: &VocabShard,
    s: usize,
    lanes: impl Fn(&[f32], f32) -> [f32; LANES],
) -> LsePartial {
    let xs = &values[segment_range(shard, s)];
    let max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if max == f32::NEG_INFINITY {
        return LsePartial::EMPTY;
    }
    LsePartial { max, sum: lane_tree(lanes(xs, max)) }
}

/// The contract's fold of 16 lanes: `(l, l+8)`, `(l, l+4)`, `(l, l+2)`, `(l, l+1)`.
#[inline]
pub fn lane_tree(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w >= 1 {
        for l in 0..w {
            a[l] += a[l + w];
        }
        w /= 2;
    }
    a[0]
}

/// Ranking key: NaN never wins, and −0 ties with +0 (as `==` has them; `total_cmp` would not).
#[inline]
fn key(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x + 0.0
    }
}

/// The candidates' order: higher value first, ties to the lower token id. A total order that is
/// `Equal` only for the same id and value, so sorting and selecting are well defined.
#[inline]
fn rank(av: f32, aid: u32, bv: f32, bid: u32) -> std::cmp::Ordering {
    key(bv).total_cmp(&key(av)).then(aid.cmp(&bid))
}

/// Where the best of `xs` by [`rank`] (ids in index order) lies: the first of the largest
/// [`key`]s, `None` for no values. One pass of 16 lanes, each keeping its largest key and where it
/// first saw it (so the loop vectorizes), then the lanes' largest key and, among the lanes that
/// hold it, the first place; a scan that compares each value by `rank` finds the same one
/// (greedy sampling of a 49k vocabulary spent ~1.5 % of a SmolLM2 batch-1 step in such a scan).
#[inline(always)]
pub(crate) fn first_of_largest(xs: &[f32]) -> Option<usize> {
    const LANES_SCANNED: usize = 16;
    if xs.len() < LANES_SCANNED {
        let top = xs.iter().map(|&x| key(x)).reduce(f32::max)?;
        return xs.iter().position(|&x| key(x) == top);
    }
    // Lane `l` holds element `l` of the first block, then each larger key of its later elements.
    let mut best: [f32; LANES_SCANNED] = std::array::from_fn(|l| key(xs[l]));
    let mut at: [usize; LANES_SCANNED] = std::array::from_fn(|l| l);
    let blocks = xs[LANES_SCANNED..].chunks_exact(LANES_SCANNED);
    let tail = blocks.remainder();
    for (b, block) in blocks.enumerate() {
        for l in 0..LANES_SCANNED {
            let k = key(block[l]);
            let larger = k > best[l];
            best[l] = if larger { k } else { best[l] };
            at[l] = if larger { (b + 1) * LANES_SCANNED + l } else { at[l] };
        }
    }
    let tail_start = xs.len() - tail.len();
    for (l, &x) in tail.iter().enumerate() {
        if key(x) > best[l] {
            (best[l], at[l]) = (key(x), tail_start + l);
        }
    }
    let top = best.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (0..LANES_SCANNED).filter(|&l| best[l] == top).map(|l| at[l]).min()
}

/// `a` ranks before `b` in [`rank`]'s order.
#[inline]
pub(crate) fn ranks_before(av: f32, aid: u32, bv: f32, bid: u32) -> bool {
    rank(av, aid, bv, bid).is_lt()
}

fn filters_on(p: &SamplingParams) -> bool {
    p.temperature > 0.0 && (p.top_k > 0 || p.top_p < 1.0)
}

fn candidate_cap(p: &SamplingParams) -> usize {
    if p.top_k > 0 {
        (p.top_k as usize).min(MAX_CANDIDATES)
    } else {
        MAX_CANDIDATES
    }
}

/// Everything one vocab shard reports for one logits row (`logits` = the shard's `rows` values).
pub fn shard_sample(logits: &[f32], shard: &VocabShard, req: &SampleRequest) -> ShardSample {
    shard_sample_with(logits, shard, req, segment_exp_lanes)
}

/// Gumbel noise lies in `[−ln(−ln 2⁻²⁴), −ln(−ln(1−2⁻²⁴))] ≈ [−2.81, 16.64]`, so a token whose
/// scaled logit is more than ~19.5 below the best can never win the Gumbel-max. Skipping its
/// noise is exact; the margin also covers f32 rounding of `z + g` (relative term for huge `z`).
fn gumbel_cutoff(z_max: f32) -> f32 {
    z_max - (24.0 + z_max.abs() * 1e-4)
}

/// [`shard_sample`] with the log-sum-exp lane sums computed by `lanes` (see [`lse_shard_with`]).
pub fn shard_sample_with(
    logits: &[f32],
    shard: &VocabShard,
    req: &SampleRequest,
    lanes: impl Fn(&[f32], f32) -> [f32; LANES] + Copy + Sync,
) -> ShardSample {
    shard_sample_on(logits, shard, req, lanes, &|tasks, task| (0..tasks).for_each(task))
}

/// Runs `task(0..tasks)`, each index once, in any order or at once (a backend's thread team),
/// and returns when all have run.
pub type RunTasks<'a> = dyn Fn(usize, &(dyn Fn(usize) + Sync)) + 'a;

/// [`shard_sample_with`] with the per-segment work run as tasks by `run`, one per vocab segment:
/// each segment's log-sum-exp partial and its best candidate. Where a task runs changes no bit:
/// the partials are combined by the contract's tree in segment order, and the best candidate is
/// the first in [`rank`]'s order, a total order, so the segments' bests combine to the one best of
/// the shard in any order. (A batch-1 decode step of a 49k vocabulary spent ~2.5 % of its time
/// here on one thread while the others waited.)
pub fn shard_sample_on(
    logits: &[f32],
    shard: &VocabShard,
    req: &SampleRequest,
    lanes: impl Fn(&[f32], f32) -> [f32; LANES] + Copy + Sync,
    run: &RunTasks<'_>,
) -> ShardSample {
    let p = &req.params.effective();
    let cand = |i: usize| {
        let id = (shard.offset + i) as u32;
        let logit = logits[i];
        if p.temperature > 0.0 {
            let z = logit / p.temperature;
            Candidate { id, logit, z, score: z + gumbel(p.seed, req.step, id) }
        } else {
            Candidate { id, logit, z: logit, score: logit }
        }
    };
    // The best candidate of `range` whose scaled logit is not below `cutoff`.
    let best_in = |range: std::ops::Range<usize>, cutoff: f32| {
        let mut best: Option<Candidate> = None;
        for i in range {
            // NaN scaled logits never win either, so they are skipped too.
            let z = logits[i] / p.temperature;
            if cutoff > f32::NEG_INFINITY && (z.is_nan() || z < cutoff) {
                continue;
            }
            let c = cand(i);
            if best.is_none_or(|b| ranks_before(c.score, c.id, b.score, b.id)) {
                best = Some(c);
            }
        }
        best
    };
    let first = |a: Option<Candidate>, b: Option<Candidate>| match (a, b) {
        (Some(a), Some(b)) => Some(if ranks_before(b.score, b.id, a.score, a.id) { b } else { a }),
        (a, b) => a.or(b),
    };
    let segments = shard.segs.count;
    let scan = !filters_on(p);
    // Greedy has no cutoff, so its scan runs in the first pass; Gumbel-max needs the shard's
    // largest scaled logit for its cutoff first.
    let greedy_scan = scan && p.temperature == 0.0;
    let gumbel_scan = scan && p.temperature > 0.0;
    let firsts: Vec<OnceLock<(LsePartial, f32, Option<Candidate>)>> = (0..segments).map(|_| OnceLock::new()).collect();
    run(segments, &|s| {
        let range = segment_range(shard, s);
        let z_max = if gumbel_scan {
            logits[range.clone()].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x / p.temperature))
        } else {
            f32::NEG_INFINITY
        };
        let best =
            if greedy_scan { first_of_largest(&logits[range.clone()]).map(|i| cand(range.start + i)) } else { None };
        let _ = firsts[s].set((lse_segment(logits, shard, s, lanes), z_max, best));
    });
    let firsts: Vec<_> = firsts.into_iter().map(|f| f.into_inner().expect("every segment ran")).collect();
    let lse = lse_tree(&firsts.iter().map(|f| f.0).collect::<Vec<_>>());
    if greedy_scan {
        let best = firsts.iter().fold(None, |a, f| first(a, f.2));
        return ShardSample { lse, lse_scaled: None, best, candidates: Vec::new() };
    }
    if gumbel_scan {
        let z_max = firsts.iter().fold(f32::NEG_INFINITY, |m, f| m.max(f.1));
        let cutoff = if z_max.is_finite() { gumbel_cutoff(z_max) } else { f32::NEG_INFINITY };
        let bests: Vec<OnceLock<Option<Candidate>>> = (0..segments).map(|_| OnceLock::new()).collect();
        run(segments, &|s| {
            let _ = bests[s].set(best_in(segment_range(shard, s), cutoff));
        });
        let best = bests.into_iter().fold(None, |a, b| first(a, b.into_inner().expect("every segment ran")));
        return ShardSample { lse, lse_scaled: None, best, candidates: Vec::new() };
    }
    let z: Vec<f32> = logits.iter().map(|&x| x / p.temperature).collect();
    let lse_scaled = (p.top_p < 1.0).then(|| lse_shard_with(&z, shard, lanes));
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let order = |a: &u32, b: &u32| rank(z[*a as usize], *a, z[*b as usize], *b);
    let cap = candidate_cap(p).min(idx.len());
    if cap < idx.len() && cap > 0 {
        idx.select_nth_unstable_by(cap - 1, order);
        idx.truncate(cap);
    }
    idx.sort_unstable_by(order);
    let candidates = idx.iter().map(|&i| cand(i as usize)).collect();
    ShardSample { lse, lse_scaled, best: None, candidates }
}

/// Merge the shards' reports (in rank order) into the chosen token and its log-probability under
/// the raw (temperature-1) distribution. Equal to the unsharded choice by construction: argmax,
/// Gumbel-max and top-k are exact maxima/orderings, and log-sum-exp uses the same tree.
pub fn merge_shard_samples(shards: &[&ShardSample], req: &SampleRequest) -> SampledToken {
    let p = &req.params.effective();
    let lse = lse_tree(&shards.iter().map(|s| s.lse).collect::<Vec<_>>()).value();
    let winner = if !filters_on(p) {
        shards
            .iter()
            .filter_map(|s| s.best)
            .reduce(|a, b| if ranks_before(b.score, b.id, a.score, a.id) { b } else { a })
    } else {
        let mut all: Vec<Candidate> = shards.iter().flat_map(|s| s.candidates.iter().copied()).collect();
        all.sort_unstable_by(|a, b| rank(a.z, a.id, b.z, b.id));
        all.truncate(candidate_cap(p));
        if p.top_p < 1.0 {
            let parts: Vec<LsePartial> = shards.iter().map(|s| s.lse_scaled.unwrap_or(LsePartial::EMPTY)).collect();
            let lse_z = lse_tree(&parts).value();
            let mut cum = 0.0f32;
            let mut keep = 0;
            for c in &all {
                keep += 1;
                cum += exp(c.z - lse_z);
                if cum >= p.top_p {
                    break;
                }
            }
            all.truncate(keep);
        }
        all.into_iter().reduce(|a, b| if ranks_before(b.score, b.id, a.score, a.id) { b } else { a })
    };
    match winner {
        Some(c) => SampledToken { id: c.id, logprob: c.logit - lse },
        // Only reachable with an empty vocabulary: there is nothing to choose.
        None => SampledToken { id: 0, logprob: f32::NEG_INFINITY },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The greedy scan's lanes find the candidate that a scan comparing each value by `rank`
    /// keeps: every length around the 16-lane blocks, with ties (inside a lane, across lanes, in
    /// the tail), NaN, ±0 (which tie: the first wins), −inf, and rows of NaN or −inf only.
    #[test]
    fn the_greedy_lanes_find_the_first_of_the_best_as_a_rank_scan_does() {
        let mut rng = crate::splitmix::SplitMix64::new(21);
        let special = [f32::NAN, -0.0, 0.0, f32::NEG_INFINITY, f32::INFINITY, 1.0];
        for len in 0..=70 {
            for trial in 0..40 {
                let xs: Vec<f32> = (0..len)
                    .map(|_| match trial % 4 {
                        // Few distinct values: ties everywhere.
                        0 => special[(rng.unit_f64() * special.len() as f64) as usize],
                        1 => (rng.unit_f64() * 4.0).floor() as f32 - 2.0,
                        2 => {
                            if rng.unit_f64() < 0.5 {
                                f32::NAN
                            } else {
                                f32::NEG_INFINITY
                            }
                        }
                        _ => rng.unit_f64() as f32 - 0.5,
                    })
                    .collect();
                let scan = (0..len).fold(None, |b: Option<usize>, i| match b {
                    Some(b) if !ranks_before(xs[i], i as u32, xs[b], b as u32) => Some(b),
                    _ => Some(i),
                });
                assert_eq!(first_of_largest(&xs), scan, "{xs:?}");
            }
        }
    }

    #[test]
    fn philox_matches_random123_known_answer() {
        // Random123 kat_vectors: philox4x32_10, counter 0, key 0.
        assert_eq!(philox4x32_10([0; 4], [0; 2]), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        let all = u32::MAX;
        assert_eq!(philox4x32_10([all; 4], [all; 2]), [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]);
    }

    #[test]
    fn top_k_above_the_candidate_limit_is_refused_not_clamped() {
        let at = SamplingParams { temperature: 1.0, top_k: MAX_CANDIDATES as u32, ..Default::default() };
        assert!(at.validate().is_ok());
        let above = SamplingParams { top_k: MAX_CANDIDATES as u32 + 1, ..at };
        assert!(above.validate().unwrap_err().to_string().contains("top_k must be at most 1024"));
    }

    #[test]
    fn candidate_order_is_total_ties_go_to_the_lower_id_and_nan_never_wins() {
        use std::cmp::Ordering::{Equal, Greater, Less};
        assert_eq!(rank(2.0, 9, 1.0, 0), Less, "higher value first");
        assert_eq!(rank(1.0, 3, 1.0, 4), Less, "a tie goes to the lower id");
        assert_eq!(rank(1.0, 4, 1.0, 3), Greater);
        assert_eq!(rank(1.0, 4, 1.0, 4), Equal, "only a candidate equals itself");
        assert_eq!(rank(-0.0, 1, 0.0, 2), Less, "-0 ties with +0");
        assert_eq!(rank(0.0, 2, -0.0, 1), Greater);
        assert_eq!(rank(f32::NAN, 0, f32::MIN, 1), Greater, "NaN ranks below every number");
        assert_eq!(rank(f32::NAN, 0, f32::NEG_INFINITY, 1), Less, "NaN ties with -inf");
        // Sorting by it is a sort, whatever the input order.
        let mut v = [(0.5, 3), (f32::NAN, 0), (0.5, 1), (-0.0, 7), (2.0, 9), (0.0, 2)];
        v.sort_unstable_by(|a, b| rank(a.0, a.1, b.0, b.1));
        let ids: Vec<u32> = v.iter().map(|c| c.1).collect();
        assert_eq!(ids, [9, 1, 3, 2, 7, 0]);
    }

    /// Every positive temperature gives its limit: below `GREEDY_BELOW` the greedy token, down to
    /// the smallest positive f32 (whose `logit / T` used to overflow and pick the lowest id).
    #[test]
    fn tiny_temperatures_sample_the_greedy_token() {
        let shard = VocabShard::full(512, 4).unwrap();
        let logits: Vec<f32> =
            (0..512u32).map(|i| ((i * 7919) % 512) as f32 * 0.03 - 4.0 + (i % 3) as f32 * 0.5).collect();
        let sample = |temperature: f32, top_k: u32, step: u64| {
            let req = SampleRequest { params: SamplingParams { temperature, top_k, top_p: 1.0, seed: 9 }, step };
            merge_shard_samples(&[&shard_sample(&logits, &shard, &req)], &req)
        };
        for step in 0..4 {
            let greedy = sample(0.0, 0, step);
            for t in [f32::from_bits(1), 1e-40, f32::MIN_POSITIVE, 1e-30, 1e-6, GREEDY_BELOW * 0.999] {
                assert_eq!(sample(t, 0, step), greedy, "T = {t:e}, step {step}");
                assert_eq!(sample(t, 40, step), greedy, "T = {t:e} with top-k, step {step}");
            }
        }
        assert_eq!(SamplingParams { temperature: 1e-40, ..SamplingParams::default() }.effective().temperature, 0.0);
        assert_eq!(
            SamplingParams { temperature: GREEDY_BELOW, ..SamplingParams::default() }.effective().temperature,
            GREEDY_BELOW
        );
    }

    #[test]
    fn uniform_stays_strictly_inside_unit_interval() {
        for t in 0..10_000 {
            let u = uniform(7, t as u64, t);
            assert!(u > 0.0 && u < 1.0);
            assert!(gumbel(7, 3, t).is_finite());
        }
    }
}
