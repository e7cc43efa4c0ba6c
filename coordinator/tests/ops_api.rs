//! The ops surface on a real service (stories260K, skipped visibly when `../shared` is absent):
//! `/metrics` is valid Prometheus text whose counters follow real requests, `/ops/cluster`
//! describes the deployment, the determinism canary matches while other traffic shares its
//! batches and reports a tampered reference as a mismatch, ops keys are enforced, the soak report
//! is kept, and every metric the dashboard reads is exported.

mod ops_common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockstep_coordinator::ops::canary::{Canary, Variant};
use lockstep_coordinator::ops::metrics::Metrics;
use lockstep_test_env::stories260k;
use ops_common::*;

#[test]
fn metrics_follow_real_requests_and_render_valid_prometheus() {
    let Some(model) = stories260k() else { return };
    let metrics = Arc::new(Metrics::new());
    let service = local_service(&model, metrics.clone());
    let server = serve(app_state(service.clone(), metrics.clone(), Arc::new(Canary::new()), &[]));

    let before = parse_prometheus(&get(server.addr, "/metrics").body);
    assert_eq!(series(&before, "lockstep_generation_tokens_total"), Some(0.0));
    assert_eq!(series(&before, "lockstep_time_to_first_token_seconds_count"), Some(0.0));

    let prompts = ["Once upon a time", "Lily and Ben", "The little dog ran to the park and"];
    let prompt_tokens: usize = prompts.iter().map(|p| service.info().tokenizer.encode(p, true).unwrap().len()).sum();
    let mut generated = 0;
    for (i, p) in prompts.iter().enumerate() {
        let (ids, reason) = generate(&service, p, 5 + i as u32);
        assert_eq!(reason, "length");
        generated += ids.len();
    }
    // The greedy continuation the model card promises: the service is real.
    let (ids, _) = generate(&service, "Once upon a time", 10);
    let text = service.info().tokenizer.decode(&ids, true).unwrap();
    assert!(text.contains("there was a little girl"), "{text:?}");
    generated += ids.len();
    let n = prompts.len() as f64 + 1.0;
    let prompt_tokens = prompt_tokens + service.info().tokenizer.encode("Once upon a time", true).unwrap().len();

    // The engine publishes its load right after dispatching the last events: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.replicas()[0].running > 0 {
        assert!(Instant::now() < deadline, "the engine never went idle");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = get(server.addr, "/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"), "{:?}", r.headers);
    let m = parse_prometheus(&r.body);
    assert_eq!(series(&m, "lockstep_generation_tokens_total"), Some(generated as f64));
    assert_eq!(series(&m, "lockstep_prompt_tokens_total"), Some(prompt_tokens as f64));
    assert_eq!(series(&m, "lockstep_requests_admitted_total"), Some(n));
    assert_eq!(series(&m, "lockstep_request_success_total{finished_reason=\"length\"}"), Some(n));
    assert_eq!(series(&m, "lockstep_request_success_total{finished_reason=\"stop\"}"), Some(0.0));
    assert_eq!(series(&m, "lockstep_time_to_first_token_seconds_count"), Some(n));
    assert_eq!(series(&m, "lockstep_e2e_request_latency_seconds_count"), Some(n));
    assert_eq!(series(&m, "lockstep_request_queue_time_seconds_count"), Some(n));
    // Every token after a sequence's first is one inter-token gap.
    assert_eq!(series(&m, "lockstep_inter_token_latency_seconds_count"), Some(generated as f64 - n));
    assert!(series(&m, "lockstep_e2e_request_latency_seconds_sum").unwrap() > 0.0);
    assert_eq!(series(&m, "lockstep_num_requests_running"), Some(0.0));
    assert_eq!(series(&m, "lockstep_num_requests_waiting"), Some(0.0));
    assert!(series(&m, "lockstep_engine_steps_total").unwrap() >= generated as f64);
    let fp = &service.info().system_fingerprint;
    let build = &m["lockstep_build_info"].samples[0].0;
    assert!(build.contains(&format!("system_fingerprint=\"{fp}\"")), "{build}");
    for (name, f) in &m {
        if f.kind != "histogram" {
            continue;
        }
        let buckets: Vec<f64> = f.samples.iter().filter(|(s, _)| s.contains("_bucket{")).map(|(_, v)| *v).collect();
        assert!(buckets.len() > 5, "{name}: buckets");
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{name}: buckets must be cumulative");
        let les: Vec<&str> = f.samples.iter().filter_map(|(s, _)| s.split("le=\"").nth(1)).collect();
        assert_eq!(les.last(), Some(&"+Inf\"}"), "{name}: last bucket is +Inf");
        let count = f.samples.iter().find(|(s, _)| s.ends_with("_count")).unwrap().1;
        assert_eq!(*buckets.last().unwrap(), count, "{name}: +Inf bucket == _count");
    }

    // The cluster document (an in-process engine: one group, no nodes).
    let c = get(server.addr, "/ops/cluster").json();
    assert_eq!(c["system_fingerprint"], fp.as_str());
    assert_eq!(c["model"]["name"], "stories260K");
    assert_eq!(c["numerics"]["reduce_segments"], 4);
    assert_eq!(c["groups"].as_array().unwrap().len(), 1);
    assert_eq!(c["groups"][0]["generated_tokens"], generated as u64);
    assert_eq!(c["nodes"].as_array().unwrap().len(), 0);
    assert_eq!(c["kv_cache"]["total_blocks"], 512);
    assert!(c["throughput"]["tokens_per_sec"].as_f64().is_some());
    assert_eq!(c["generated_tokens_total"], generated as u64);
    // Tokens/s: the tokens above land in the window once their second is complete.
    let history = |c: &serde_json::Value| -> u64 {
        c["throughput"]["history"].as_array().unwrap().iter().map(|p| p["tokens"].as_u64().unwrap()).sum()
    };
    wait_until(Duration::from_secs(10), "the generated tokens' seconds to complete", || {
        history(&get(server.addr, "/ops/cluster").json()) >= generated as u64
    });
    let c = get(server.addr, "/ops/cluster").json();
    assert_eq!(history(&c), generated as u64, "every generated token is in the per-second history");
    assert!(c["throughput"]["tokens_per_sec"].as_f64().unwrap() > 0.0, "{}", c["throughput"]);
}

#[test]
fn every_metric_the_dashboard_reads_is_exported() {
    let Some(model) = stories260k() else { return };
    let metrics = Arc::new(Metrics::new());
    let service = local_service(&model, metrics.clone());
    let server = serve(app_state(service, metrics, Arc::new(Canary::new()), &[]));
    let m = parse_prometheus(&get(server.addr, "/metrics").body);
    let names = dashboard_metric_names();
    assert!(names.len() >= 8, "the dashboard's METRICS table: {names:?}");
    for n in &names {
        assert!(m.contains_key(n), "the dashboard reads {n}, which /metrics does not export");
    }
    let d = get(server.addr, "/dashboard");
    assert_eq!(d.status, 200);
    assert!(d.header("content-type").unwrap().starts_with("text/html"));
    assert!(d.body.contains("Determinism canary") && !d.body.contains("https://"), "self-contained page");
}

#[test]
fn canary_matches_in_the_live_batch_under_concurrent_load() {
    let Some(model) = stories260k() else { return };
    let metrics = Arc::new(Metrics::new());
    let service = local_service(&model, metrics.clone());
    let canary = Canary::start(service.clone(), metrics.clone(), Duration::from_millis(700));
    let server = serve(app_state(service.clone(), metrics.clone(), canary.clone(), &[]));
    // The reference is recorded alone, before any load.
    let deadline = Instant::now() + Duration::from_secs(60);
    while canary.reference().is_none() {
        assert!(Instant::now() < deadline, "no reference: {:?}", canary.status().last_error);
        std::thread::sleep(Duration::from_millis(20));
    }
    let reference = canary.reference().unwrap();
    assert!(reference.alone);
    assert_eq!(reference.greedy.token_ids.len(), 32);
    assert_eq!(reference.seeded.token_ids.len(), 32);
    assert_ne!(reference.greedy.token_ids, reference.seeded.token_ids, "T=0.8 samples something else");

    let load = Background::start(&service, 6);
    assert!(canary.wait_for_checks(4, Duration::from_secs(120)), "{:?}", canary.status());
    drop(load);
    let s = canary.status();
    assert_eq!(s.state, "running");
    assert!(s.checks >= 4);
    assert_eq!((s.matches, s.mismatches, s.errors), (s.checks, 0, 0), "{s:?}");
    assert!(s.first_differing_token.is_none());
    assert!(s.last_batch_running > 2, "the canary shared its batch with other traffic: {s:?}");
    assert_eq!(s.reference_tokens, reference.greedy.token_ids);
    assert!(s.reference_text.as_deref().unwrap_or("").contains("there was a little girl"), "{s:?}");

    let j = get(server.addr, "/ops/canary").json();
    assert!(j["matches"].as_u64().unwrap() >= 4);
    assert_eq!(j["mismatches"], 0);
    assert_eq!(j["reference_tokens"].as_array().unwrap().len(), 32);
    let m = parse_prometheus(&get(server.addr, "/metrics").body);
    assert!(series(&m, "lockstep_canary_checks_total{result=\"match\"}").unwrap() >= 4.0);
    assert_eq!(series(&m, "lockstep_canary_checks_total{result=\"mismatch\"}"), Some(0.0));
    assert!(series(&m, "lockstep_canary_last_check_timestamp_seconds").unwrap() > 1.7e9);

    // Dropping the service stops the canary.
    drop(server);
    drop(service);
    let deadline = Instant::now() + Duration::from_secs(30);
    while canary.status().state != "stopped" {
        assert!(Instant::now() < deadline, "the canary outlived its service");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_tampered_canary_reference_is_reported_as_a_mismatch() {
    let Some(model) = stories260k() else { return };
    let metrics = Arc::new(Metrics::new());
    let service = local_service(&model, metrics.clone());
    let honest = Canary::start(service.clone(), metrics.clone(), Duration::from_secs(3600));
    let deadline = Instant::now() + Duration::from_secs(60);
    while honest.reference().is_none() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut reference = honest.reference().unwrap();
    drop(honest);

    // An untouched reference carried over matches.
    let canary =
        Canary::start_with_reference(service.clone(), metrics.clone(), Duration::from_millis(200), reference.clone())
            .unwrap();
    assert!(canary.wait_for_checks(1, Duration::from_secs(60)));
    assert_eq!(canary.status().mismatches, 0, "{:?}", canary.status());
    drop(canary);

    // One logprob bit flipped at token 5 of the seeded answer.
    reference.seeded.logprob_bits[5] ^= 1;
    let canary =
        Canary::start_with_reference(service.clone(), metrics.clone(), Duration::from_millis(200), reference.clone())
            .unwrap();
    assert!(canary.wait_for_checks(1, Duration::from_secs(60)));
    let s = canary.status();
    assert_eq!((s.checks, s.mismatches, s.matches), (1, 1, 0), "{s:?}");
    let d = s.first_differing_token.expect("where it differs");
    assert_eq!((d.variant, d.index), (Variant::Seeded, 5));
    assert_eq!(d.expected_id, d.got_id, "same token, different bits");
    assert_eq!(d.expected_logprob_bits.unwrap() ^ 1, d.got_logprob_bits.unwrap());
    drop(canary);

    // A different token id at 0 of the greedy answer.
    reference.seeded.logprob_bits[5] ^= 1;
    reference.greedy.token_ids[0] = (reference.greedy.token_ids[0] + 1) % 512;
    let canary =
        Canary::start_with_reference(service.clone(), metrics.clone(), Duration::from_millis(200), reference).unwrap();
    assert!(canary.wait_for_checks(1, Duration::from_secs(60)));
    let d = canary.status().first_differing_token.expect("mismatch");
    assert_eq!((d.variant, d.index), (Variant::Greedy, 0));
    assert!(d.expected_text.is_some() && d.got_text.is_some());

    let server = serve(app_state(service.clone(), metrics.clone(), canary, &[]));
    let m = parse_prometheus(&get(server.addr, "/metrics").body);
    assert_eq!(series(&m, "lockstep_canary_checks_total{result=\"mismatch\"}"), Some(2.0));

    // A reference from another deployment is refused outright.
    let mut other = server.state.canary.reference().unwrap();
    other.system_fingerprint = "fp_someone_else".into();
    let err = Canary::start_with_reference(service, metrics, Duration::from_secs(1), other).err().unwrap();
    assert!(err.to_string().contains("fp_someone_else"), "{err}");
}

#[test]
fn ops_routes_enforce_ops_keys_and_keep_the_soak_report() {
    let Some(model) = stories260k() else { return };
    let metrics = Arc::new(Metrics::new());
    let service = local_service(&model, metrics.clone());
    let server = serve(app_state(service, metrics, Arc::new(Canary::new()), &["opskey"]));
    let a = server.addr;
    for path in ["/metrics", "/ops/cluster", "/ops/canary", "/ops/soak", "/dashboard"] {
        let r = get(a, path);
        assert_eq!(r.status, 401, "{path}");
        let e = r.json();
        assert_eq!(e["error"]["code"], "invalid_api_key", "{path}: {e}");
        assert!(e["error"]["message"].as_str().unwrap().contains("ops key"));
        assert!(r.header("www-authenticate").unwrap().starts_with("Basic"), "browsers can log in");
        assert_eq!(http(a, "GET", path, Some("Bearer wrong"), None).status, 401);
    }
    let ok = Some("Bearer opskey");
    assert_eq!(http(a, "GET", "/metrics", ok, None).status, 200);
    assert_eq!(http(a, "GET", "/dashboard", Some("Basic b3BzOm9wc2tleQ=="), None).status, 200); // ops:opskey
    let c = http(a, "GET", "/ops/canary", ok, None).json();
    assert_eq!(c["state"], "disabled");

    // Soak: nothing yet, then the posted report (stamped), refusing junk and oversize bodies.
    let r = http(a, "GET", "/ops/soak", ok, None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "no_soak_report");
    let report = br#"{"requests": 100, "unique_completions": [1], "verdict": "deterministic"}"#;
    assert_eq!(http(a, "POST", "/ops/soak", None, Some(report)).status, 401);
    let r = http(a, "POST", "/ops/soak", ok, Some(report));
    assert_eq!(r.status, 200, "{}", r.body);
    let got = http(a, "GET", "/ops/soak", ok, None).json();
    assert_eq!(got["requests"], 100);
    assert_eq!(got["verdict"], "deterministic");
    assert!(got["received_unix"].as_f64().unwrap() > 1.7e9);
    assert_eq!(http(a, "POST", "/ops/soak", ok, Some(b"[1, 2]")).status, 400);
    assert_eq!(http(a, "POST", "/ops/soak", ok, Some(b"{not json")).status, 400);
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(300 << 10));
    let r = http(a, "POST", "/ops/soak", ok, Some(big.as_bytes()));
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(http(a, "GET", "/ops/soak", ok, None).json()["requests"], 100, "the last good report stays");
}
