//! The soak report: unique completions, divergences, logprob bits, load — as JSON, as a
//! self-contained HTML page with inline SVG plots, and as a terminal summary.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::loadgen::percentile;

use super::{group_variants, BackgroundStats, CopyResult, LoadSample, SoakOptions};

/// How a variant departs from the most common completion.
#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    /// First token index that differs (by token ids when known, else estimated from text).
    pub token_index: Option<usize>,
    pub char_index: usize,
    /// The text just before the divergence.
    pub before: String,
    /// The most common completion's continuation and this variant's.
    pub common: String,
    pub variant: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Variant {
    pub count: usize,
    pub example_copy: usize,
    pub text: String,
    pub token_count: Option<usize>,
    pub divergence: Option<Divergence>,
    /// Copies of this variant whose logprob bits equal the first copy's.
    pub logprob_bits_identical: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptReport {
    pub prompt: String,
    pub copies: usize,
    pub errors: usize,
    pub unique_completions: usize,
    pub variants: Vec<Variant>,
    /// Among copies identical in tokens, how many have different logprob bits.
    pub logprob_bit_mismatches: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub ttft_p50: Option<f64>,
    pub ttft_p99: Option<f64>,
}

/// Latency of the copies that were in flight while the server migrated requests (a node failure
/// it healed): the cost of a fault as the clients saw it, next to the soak-wide [`Latency`].
#[derive(Debug, Clone, Serialize)]
pub struct FaultLatency {
    /// Copies whose lifetime spans a load sample at which the server's migration count rose.
    pub copies: usize,
    pub p50: f64,
    pub p99: f64,
}

impl FaultLatency {
    /// `None` when no migration was seen during the soak.
    fn of(copies: &[&CopyResult], load: &[LoadSample]) -> Option<FaultLatency> {
        let fault_times: Vec<f64> =
            load.windows(2).filter(|w| w[1].migrations > w[0].migrations).map(|w| w[1].t).collect();
        if fault_times.is_empty() {
            return None;
        }
        let mut lat: Vec<f64> = copies
            .iter()
            .filter(|r| fault_times.iter().any(|&t| r.started_s <= t && t <= r.started_s + r.latency_s))
            .map(|r| r.latency_s)
            .collect();
        Some(FaultLatency { copies: lat.len(), p50: percentile(&mut lat, 50.0), p99: percentile(&mut lat, 99.0) })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub url: String,
    pub model: String,
    pub requests: usize,
    pub max_tokens: u32,
    pub temperature: f32,
    pub seed: Option<u64>,
    pub concurrency_ramp: Vec<usize>,
    pub background_per_s: f64,
    pub duration_s: f64,
    pub completed: usize,
    pub errors: usize,
    pub error_samples: Vec<String>,
    pub fingerprints: BTreeMap<String, usize>,
    pub prompts: Vec<PromptReport>,
    pub completion_tokens: usize,
    pub completion_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub latency_s: Latency,
    pub background: BackgroundStats,
    pub load: Vec<LoadSample>,
    /// Requests the server moved to another group during the soak (node failures it healed).
    pub migrations: u64,
    /// Latency of the copies in flight while requests were being migrated; absent without faults.
    pub latency_during_faults_s: Option<FaultLatency>,
    /// Copy index → (start time, variant rank within its prompt) for the divergence plot.
    pub copy_variants: Vec<(f64, usize, usize)>,
    pub verdict: String,
}

/// Character index (at a char boundary) where two texts first differ.
fn common_prefix(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map(|((i, _), _)| i).unwrap_or(a.len().min(b.len()))
}

fn tail(s: &str, n: usize) -> String {
    let start = s.char_indices().rev().nth(n.saturating_sub(1)).map(|(i, _)| i).unwrap_or(0);
    s[start..].to_string()
}

fn head(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

impl SoakReport {
    pub fn build(
        o: &SoakOptions,
        model: &str,
        results: Vec<CopyResult>,
        background: BackgroundStats,
        load: Vec<LoadSample>,
        duration_s: f64,
    ) -> SoakReport {
        let mut fingerprints = BTreeMap::new();
        for r in results.iter().filter(|r| r.error.is_none()) {
            *fingerprints.entry(r.fingerprint.clone().unwrap_or_else(|| "(none)".into())).or_insert(0) += 1;
        }
        let mut copy_variants = Vec::new();
        let prompts: Vec<PromptReport> = o
            .prompts
            .iter()
            .enumerate()
            .map(|(p, text)| {
                let groups = group_variants(&results, p);
                let common = groups.first().map(|g| g[0]);
                let variants: Vec<Variant> = groups
                    .iter()
                    .enumerate()
                    .map(|(rank, g)| {
                        for r in g {
                            copy_variants.push((r.started_s, r.index, rank));
                        }
                        let first = g[0];
                        let divergence = (rank > 0).then(|| {
                            let c = common.expect("rank > 0 implies a most common variant");
                            let ci = common_prefix(&c.text, &first.text);
                            let token_index = match (&c.token_ids, &first.token_ids) {
                                (Some(a), Some(b)) => {
                                    Some(a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len())))
                                }
                                _ => None,
                            };
                            Divergence {
                                token_index,
                                char_index: ci,
                                before: tail(&c.text[..ci], 60),
                                common: head(&c.text[ci..], 60),
                                variant: head(&first.text[ci..], 60),
                            }
                        });
                        Variant {
                            count: g.len(),
                            example_copy: first.index,
                            text: first.text.clone(),
                            token_count: first.token_ids.as_ref().map(Vec::len),
                            divergence,
                            logprob_bits_identical: g.iter().filter(|r| r.logprob_bits == first.logprob_bits).count(),
                        }
                    })
                    .collect();
                let mismatches = variants.iter().map(|v| v.count - v.logprob_bits_identical).sum();
                PromptReport {
                    prompt: text.clone(),
                    copies: results.iter().filter(|r| r.prompt == p).count(),
                    errors: results.iter().filter(|r| r.prompt == p && r.error.is_some()).count(),
                    unique_completions: variants.len(),
                    variants,
                    logprob_bit_mismatches: mismatches,
                }
            })
            .collect();
        let ok: Vec<&CopyResult> = results.iter().filter(|r| r.error.is_none()).collect();
        let completion_tokens: usize =
            ok.iter().map(|r| r.token_ids.as_ref().map_or(r.logprob_bits.len(), Vec::len)).sum();
        let mut lat: Vec<f64> = ok.iter().map(|r| r.latency_s).collect();
        let mut ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
        let errors = results.len() - ok.len();
        let verdict =
            if errors == 0 && prompts.iter().all(|p| p.unique_completions == 1 && p.logprob_bit_mismatches == 0) {
                "deterministic: 1 unique completion per prompt, identical logprob bits".to_string()
            } else {
                let u: Vec<String> = prompts.iter().map(|p| p.unique_completions.to_string()).collect();
                format!(
                    "NOT deterministic: unique completions per prompt [{}], logprob mismatches {}, errors {errors}",
                    u.join(", "),
                    prompts.iter().map(|p| p.logprob_bit_mismatches).sum::<usize>()
                )
            };
        SoakReport {
            url: o.url.clone(),
            model: model.to_string(),
            requests: o.requests,
            max_tokens: o.max_tokens,
            temperature: o.temperature,
            seed: o.seed,
            concurrency_ramp: o.concurrency_ramp.clone(),
            background_per_s: o.background_per_s,
            duration_s,
            completed: ok.len(),
            errors,
            error_samples: results.iter().filter_map(|r| r.error.clone()).take(5).collect(),
            fingerprints,
            prompts,
            completion_tokens,
            completion_tokens_per_s: completion_tokens as f64 / duration_s.max(1e-9),
            requests_per_s: ok.len() as f64 / duration_s.max(1e-9),
            latency_s: Latency {
                p50: percentile(&mut lat, 50.0),
                p90: percentile(&mut lat, 90.0),
                p99: percentile(&mut lat, 99.0),
                ttft_p50: (!ttft.is_empty()).then(|| percentile(&mut ttft, 50.0)),
                ttft_p99: (!ttft.is_empty()).then(|| percentile(&mut ttft, 99.0)),
            },
            background,
            migrations: load.last().map_or(0, |l| l.migrations),
            latency_during_faults_s: FaultLatency::of(&ok, &load),
            load,
            copy_variants,
            verdict,
        }
    }

    pub fn is_deterministic(&self) -> bool {
        self.errors == 0 && self.prompts.iter().all(|p| p.unique_completions == 1 && p.logprob_bit_mismatches == 0)
    }

    /// The compact form posted to `/ops/soak` for the dashboard.
    pub fn summary(&self) -> Value {
        json!({
            "finished_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "url": self.url,
            "model": self.model,
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "migrations": self.migrations,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "seed": self.seed,
            "concurrency_ramp": self.concurrency_ramp,
            "unique_completions": self.prompts.iter().map(|p| p.unique_completions).collect::<Vec<_>>(),
            "logprob_bit_mismatches": self.prompts.iter().map(|p| p.logprob_bit_mismatches).sum::<usize>(),
            "fingerprints": self.fingerprints,
            "completion_tokens_per_s": self.completion_tokens_per_s,
            "latency_p50_s": self.latency_s.p50,
            "latency_p99_s": self.latency_s.p99,
            "verdict": self.verdict,
        })
    }

    /// The terminal summary.
    pub fn print(&self) {
        println!("soak of {} ({}): {}", self.url, self.model, self.verdict);
        println!(
            "  {} copies × {} tokens, T={}, seed {:?}, ramp {:?}, background {}/s ({} sent, {} cancelled) in {:.1} s",
            self.requests,
            self.max_tokens,
            self.temperature,
            self.seed,
            self.concurrency_ramp,
            self.background_per_s,
            self.background.sent,
            self.background.cancelled,
            self.duration_s
        );
        println!("  requests migrated by the server after node failures: {}", self.migrations);
        if let Some(f) = &self.latency_during_faults_s {
            println!(
                "  latency of the {} copies in flight during migrations: p50 {:.3}s p99 {:.3}s",
                f.copies, f.p50, f.p99
            );
        }
        println!(
            "  throughput {:.1} completion tok/s, {:.2} req/s; latency p50 {:.3}s p99 {:.3}s; fingerprints {:?}",
            self.completion_tokens_per_s,
            self.requests_per_s,
            self.latency_s.p50,
            self.latency_s.p99,
            self.fingerprints
        );
        for p in &self.prompts {
            println!(
                "  prompt {:?}: {} copies, {} unique completion(s), {} logprob-bit mismatches, {} errors",
                p.prompt, p.copies, p.unique_completions, p.logprob_bit_mismatches, p.errors
            );
            for (i, v) in p.variants.iter().enumerate().take(10) {
                match &v.divergence {
                    None => println!("    #{i}: {} × (most common)", v.count),
                    Some(d) => println!(
                        "    #{i}: {} × diverges at token {} after {:?}: {:?} / {:?}",
                        v.count,
                        d.token_index.map_or("?".into(), |t| t.to_string()),
                        d.before,
                        d.common,
                        d.variant
                    ),
                }
            }
        }
        for e in &self.error_samples {
            println!("  error: {e}");
        }
    }
}

/// Two soaks of the same request against two servers, side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub a: SoakReport,
    pub b: SoakReport,
    /// Per prompt: do the two servers' most common completions agree?
    pub most_common_agree: Vec<bool>,
    pub first_difference: Vec<Option<Divergence>>,
}

impl Comparison {
    pub fn new(a: SoakReport, b: SoakReport) -> Self {
        let mut agree = Vec::new();
        let mut diffs = Vec::new();
        for (pa, pb) in a.prompts.iter().zip(&b.prompts) {
            let (ta, tb) = (pa.variants.first().map(|v| v.text.as_str()), pb.variants.first().map(|v| v.text.as_str()));
            agree.push(ta == tb && ta.is_some());
            diffs.push(match (ta, tb) {
                (Some(x), Some(y)) if x != y => {
                    let ci = common_prefix(x, y);
                    Some(Divergence {
                        token_index: None,
                        char_index: ci,
                        before: tail(&x[..ci], 60),
                        common: head(&x[ci..], 60),
                        variant: head(&y[ci..], 60),
                    })
                }
                _ => None,
            });
        }
        Comparison { a, b, most_common_agree: agree, first_difference: diffs }
    }

    pub fn print(&self) {
        println!("== A: {}", self.a.url);
        self.a.print();
        println!("== B: {}", self.b.url);
        self.b.print();
        for (i, (ok, d)) in self.most_common_agree.iter().zip(&self.first_difference).enumerate() {
            match d {
                None if *ok => println!("prompt {i}: A and B agree on the most common completion"),
                Some(d) => {
                    println!("prompt {i}: A and B DISAGREE after {:?}: {:?} / {:?}", d.before, d.common, d.variant)
                }
                None => println!("prompt {i}: no completion to compare"),
            }
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Horizontal bars of variant frequencies.
fn svg_frequency(p: &PromptReport) -> String {
    let w = 640.0;
    let rows = p.variants.len().min(20);
    let max = p.variants.iter().map(|v| v.count).max().unwrap_or(1) as f64;
    let mut s = format!(r#"<svg viewBox="0 0 {w} {}" class="plot">"#, 24 * rows + 10);
    for (i, v) in p.variants.iter().take(rows).enumerate() {
        let bw = (w - 210.0) * v.count as f64 / max;
        let y = 5 + 24 * i;
        let label = match &v.divergence {
            None => "most common".to_string(),
            Some(d) => format!("diverges @ tok {}", d.token_index.map_or("?".into(), |t| t.to_string())),
        };
        s += &format!(
            r##"<rect x="150" y="{y}" width="{bw:.1}" height="18" fill="{}"/><text x="0" y="{}" class="lbl">{}</text><text x="{:.1}" y="{}" class="lbl">{}</text>"##,
            if i == 0 { "#3fb950" } else { "#f85149" },
            y + 14,
            esc(&label),
            155.0 + bw,
            y + 14,
            v.count
        );
    }
    s + "</svg>"
}

/// Copies over time, coloured by variant (0 = most common).
fn svg_divergence(r: &SoakReport) -> String {
    let (w, h) = (640.0, 160.0);
    let tmax = r.copy_variants.iter().map(|c| c.0).fold(1e-9, f64::max);
    let vmax = r.copy_variants.iter().map(|c| c.2).max().unwrap_or(0).max(1) as f64;
    let mut s = format!(
        r##"<svg viewBox="0 0 {w} {h}" class="plot"><line x1="40" y1="{}" x2="{w}" y2="{}" stroke="#555"/>"##,
        h - 20.0,
        h - 20.0
    );
    for (t, _, v) in &r.copy_variants {
        let x = 40.0 + (w - 50.0) * t / tmax;
        let y = h - 25.0 - (h - 40.0) * (*v as f64) / vmax;
        s += &format!(
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="2.5" fill="{}"/>"##,
            if *v == 0 { "#3fb950" } else { "#f85149" }
        );
    }
    s += &format!(
        r#"<text x="0" y="{}" class="lbl">variant</text><text x="{}" y="{h}" class="lbl">time →</text></svg>"#,
        12,
        w - 60.0
    );
    s
}

/// In-flight copies and background requests over time.
fn svg_load(r: &SoakReport) -> String {
    let (w, h) = (640.0, 160.0);
    let tmax = r.load.iter().map(|l| l.t).fold(1e-9, f64::max);
    let ymax = r.load.iter().map(|l| l.copies_in_flight.max(l.background_in_flight)).max().unwrap_or(1).max(1) as f64;
    let x = |t: f64| 40.0 + (w - 50.0) * t / tmax;
    // A red tick wherever the server migrated requests (a node failed and the cluster healed).
    let marks: String = r
        .load
        .windows(2)
        .filter(|p| p[1].migrations > p[0].migrations)
        .map(|p| {
            format!(
                r##"<line x1="{0:.1}" x2="{0:.1}" y1="16" y2="{1:.1}" stroke="#f85149" stroke-width="1.5"><title>{2} migration(s)</title></line>"##,
                x(p[1].t),
                h - 20.0,
                p[1].migrations - p[0].migrations
            )
        })
        .collect();
    let line = |f: &dyn Fn(&LoadSample) -> usize| -> String {
        r.load
            .iter()
            .map(|l| format!("{:.1},{:.1}", 40.0 + (w - 50.0) * l.t / tmax, h - 20.0 - (h - 30.0) * f(l) as f64 / ymax))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        r##"<svg viewBox="0 0 {w} {h}" class="plot"><polyline fill="none" stroke="#58a6ff" stroke-width="2" points="{}"/><polyline fill="none" stroke="#d29922" stroke-width="2" points="{}"/><text x="45" y="12" class="lbl" fill="#58a6ff">copies in flight (max {})</text><text x="300" y="12" class="lbl">background in flight</text><text x="480" y="12" class="lbl" fill="#f85149">migrations: {}</text>{marks}</svg>"##,
        line(&|l| l.copies_in_flight),
        line(&|l| l.background_in_flight),
        ymax,
        r.migrations
    )
}

fn html_section(r: &SoakReport) -> String {
    let mut s = format!(
        "<h2>{}</h2><p class=\"verdict {}\">{}</p><table><tr><td>model</td><td>{}</td></tr><tr><td>copies</td><td>{} × {} tokens, T={}, seed {:?}</td></tr><tr><td>concurrency ramp</td><td>{:?}</td></tr><tr><td>background</td><td>{}/s: {} sent, {} completed, {} cancelled, {} failed</td></tr><tr><td>fingerprints</td><td>{}</td></tr><tr><td>throughput</td><td>{:.1} completion tok/s, {:.2} req/s over {:.1} s</td></tr><tr><td>latency</td><td>p50 {:.3} s, p90 {:.3} s, p99 {:.3} s, TTFT p50 {}</td></tr></table>",
        esc(&r.url),
        if r.is_deterministic() { "ok" } else { "bad" },
        esc(&r.verdict),
        esc(&r.model),
        r.requests,
        r.max_tokens,
        r.temperature,
        r.seed,
        r.concurrency_ramp,
        r.background_per_s,
        r.background.sent,
        r.background.completed,
        r.background.cancelled,
        r.background.failed,
        esc(&format!("{:?}", r.fingerprints)),
        r.completion_tokens_per_s,
        r.requests_per_s,
        r.duration_s,
        r.latency_s.p50,
        r.latency_s.p90,
        r.latency_s.p99,
        r.latency_s.ttft_p50.map_or("-".into(), |t| format!("{t:.3} s")),
    );
    for p in &r.prompts {
        s += &format!(
            "<h3>Prompt {:?}: {} unique completion(s) of {} copies, {} logprob-bit mismatches</h3>",
            esc(&p.prompt),
            p.unique_completions,
            p.copies,
            p.logprob_bit_mismatches
        );
        s += &svg_frequency(p);
        s += "<table><tr><th>#</th><th>count</th><th>diverges at</th><th>text before</th><th>most common</th><th>this variant</th></tr>";
        for (i, v) in p.variants.iter().enumerate().take(50) {
            match &v.divergence {
                None => s += &format!("<tr><td>{i}</td><td>{}</td><td colspan=4><i>most common</i>: {}</td></tr>", v.count, esc(&head(&v.text, 160))),
                Some(d) => {
                    s += &format!(
                        "<tr><td>{i}</td><td>{}</td><td>token {}</td><td>…{}</td><td class=ok>{}</td><td class=bad>{}</td></tr>",
                        v.count,
                        d.token_index.map_or("?".into(), |t| t.to_string()),
                        esc(&d.before),
                        esc(&d.common),
                        esc(&d.variant)
                    )
                }
            }
        }
        s += "</table>";
    }
    s += "<h3>Copies over time by variant</h3>";
    s += &svg_divergence(r);
    s += "<h3>Load over time</h3>";
    s += &svg_load(r);
    s
}

/// Write `report.json` and `report.html` (one report, or a comparison) into `dir`.
pub fn write_report(dir: &Path, reports: &[&SoakReport], comparison: Option<&Comparison>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = match comparison {
        Some(c) => serde_json::to_string_pretty(c)?,
        None => serde_json::to_string_pretty(reports[0])?,
    };
    std::fs::write(dir.join("report.json"), json)?;
    let mut body = String::new();
    if let Some(c) = comparison {
        body += "<h2>Comparison</h2><ul>";
        for (i, ok) in c.most_common_agree.iter().enumerate() {
            body += &format!(
                "<li>prompt {i}: {}</li>",
                if *ok {
                    "A and B agree on the most common completion".to_string()
                } else {
                    "A and B disagree".to_string()
                }
            );
        }
        body += "</ul><div class=cols>";
        for r in reports {
            body += &format!("<div>{}</div>", html_section(r));
        }
        body += "</div>";
    } else {
        body += &html_section(reports[0]);
    }
    let page = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>lockstep soak report</title><style>
body{{background:#0d1117;color:#c9d1d9;font:14px/1.45 system-ui,sans-serif;margin:24px;max-width:1400px}}
h1,h2,h3{{color:#e6edf3}} table{{border-collapse:collapse;margin:8px 0}} td,th{{border:1px solid #30363d;padding:3px 8px;vertical-align:top}}
.verdict{{font-size:18px;font-weight:600}} .verdict.ok,.ok{{color:#3fb950}} .verdict.bad,.bad{{color:#f85149}}
.plot{{width:640px;background:#161b22;border:1px solid #30363d;margin:6px 0;display:block}} .lbl{{fill:#8b949e;font-size:11px}}
.cols{{display:flex;gap:24px}} .cols>div{{flex:1}}
</style></head><body><h1>lockstep soak report</h1>{body}</body></html>"#
    );
    std::fs::write(dir.join("report.html"), page)?;
    Ok(())
}

#[cfg(test)]
mod fault_latency_tests {
    use super::*;

    fn copy(started_s: f64, latency_s: f64) -> CopyResult {
        CopyResult {
            index: 0,
            prompt: 0,
            phase_concurrency: 1,
            streamed: false,
            error: None,
            text: String::new(),
            token_ids: None,
            logprob_bits: Vec::new(),
            fingerprint: None,
            started_s,
            latency_s,
            ttft_s: None,
        }
    }

    fn sample(t: f64, migrations: u64) -> LoadSample {
        LoadSample { t, copies_in_flight: 0, background_in_flight: 0, copies_done: 0, migrations }
    }

    #[test]
    fn fault_latency_counts_only_copies_in_flight_when_migrations_rose() {
        let copies = [copy(0.0, 1.0), copy(1.5, 3.0), copy(2.0, 0.5), copy(9.0, 1.0)];
        let refs: Vec<&CopyResult> = copies.iter().collect();
        let quiet = [sample(0.0, 0), sample(3.0, 0), sample(6.0, 0)];
        assert!(FaultLatency::of(&refs, &quiet).is_none(), "no migration, no fault window");
        // The count rises at t = 2.2 (inside the copies 1.5..4.5 and 2.0..2.5) and at t = 9.5
        // (inside 9.0..10.0); the copy 0.0..1.0 saw no fault.
        let faulty = [sample(0.0, 0), sample(2.2, 3), sample(6.0, 3), sample(9.5, 4)];
        let f = FaultLatency::of(&refs, &faulty).unwrap();
        assert_eq!(f.copies, 3);
        assert_eq!((f.p50, f.p99), (1.0, 3.0));
    }
}
