//! Smoke test of `courier bench`: every scenario runs against a real server with tiny sizes
//! and its `--json` result is well formed and shows no lost message. Correctness only: no
//! timing thresholds.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;
use support::Server;

/// Rate limits off, as for any benchmark.
const UNLIMITED: [&str; 4] = [
    "--user-sends-per-sec",
    "0",
    "--connection-frames-per-sec",
    "0",
];

/// The outcome of one `courier bench` run: exit success, stderr, and the JSON result.
struct BenchRun {
    success: bool,
    stderr: String,
    json: Option<Value>,
}

fn bench(common: &[&str], scenario: &[&str]) -> BenchRun {
    bench_for("2s", common, scenario)
}

/// `bench` with a measured phase of `duration` (per rate for `latency-curve`).
fn bench_for(duration: &str, common: &[&str], scenario: &[&str]) -> BenchRun {
    let out_dir = tempfile::tempdir().unwrap();
    let json_path = out_dir.path().join("result.json");
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("bench")
        .args(common)
        .args(["--no-progress", "--duration", duration, "--json"])
        .arg(&json_path)
        .args(scenario)
        .output()
        .expect("run courier bench");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    eprintln!("{}{stderr}", String::from_utf8_lossy(&output.stdout));
    BenchRun {
        success: output.status.success(),
        stderr,
        json: read_json(&json_path),
    }
}

fn read_json(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).expect("the result is valid JSON"))
}

fn common_for(server: &Server) -> Vec<String> {
    vec![
        "--url".into(),
        server.ws_url(),
        "--data-dir".into(),
        server.data_dir.display().to_string(),
    ]
}

/// The one scenario that sends no messages, so has no `lost` count.
const WITHOUT_MESSAGES: &str = "connections";

/// A successful run whose result names the scenario, has no problems and, unless it sends no
/// messages, reports that it lost none.
fn assert_clean(run: &BenchRun, scenario: &str) -> Value {
    assert!(run.success, "bench {scenario} failed: {}", run.stderr);
    let json = run.json.clone().expect("a --json result");
    assert_eq!(json["scenario"], scenario);
    assert_eq!(json["problems"], Value::Array(vec![]), "{json:#}");
    if scenario != WITHOUT_MESSAGES {
        let lost = json["counts"].get("lost");
        assert_eq!(
            lost,
            Some(&Value::from(0)),
            "counts.lost must be 0: {json:#}"
        );
    }
    json
}

/// `scenario` against a new server started with `server_args`.
fn bench_against(server_args: &[&str], scenario: &[&str]) -> BenchRun {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), server_args);
    let common = common_for(&server);
    let common: Vec<&str> = common.iter().map(String::as_str).collect();
    bench(&common, scenario)
}

fn run_against_server(scenario: &[&str]) -> Value {
    assert_clean(&bench_against(&UNLIMITED, scenario), scenario[0])
}

#[test]
fn throughput_delivers_and_receipts_every_message() {
    let json = run_against_server(&["throughput", "--pairs", "2", "--rate", "100"]);
    let counts = &json["counts"];
    assert!(counts["acked"].as_u64().unwrap() > 0, "{json:#}");
    assert_eq!(counts["acked"], counts["delivered"]);
    assert_eq!(counts["acked"], counts["receipted"]);
    assert!(json["latencies_ms"]["delivery"]["count"].as_u64().unwrap() > 0);
    // Every send-ACK is in the timeline, in the second its message was meant to go.
    let seconds = json["send_ack_by_second"].as_array().expect("a timeline");
    let count = |second: &Value| second["count"].as_u64().unwrap();
    let at = |second: &Value| second["at_secs"].as_u64().unwrap();
    assert_eq!(
        seconds.iter().map(count).sum::<u64>(),
        json["latencies_ms"]["send_ack"]["count"].as_u64().unwrap(),
        "{json:#}"
    );
    assert!(
        seconds.windows(2).all(|w| at(&w[0]) < at(&w[1])),
        "{json:#}"
    );
    assert!(
        seconds
            .iter()
            .all(|s| s["p99_ms_at_most"].as_f64().unwrap() > 0.0)
    );
    let lateness = &json["latencies_ms"]["send_lateness"];
    let written = lateness["count"].as_u64().unwrap();
    assert!(
        written > 0 && written <= counts["attempted"].as_u64().unwrap(),
        "{json:#}"
    );
    // The server's store writer over the run, from its `/metrics`.
    let busy = json["metrics"]["server_store_writer_busy"]
        .as_f64()
        .unwrap();
    assert!(busy > 0.0 && busy < 1.5, "{json:#}");
    let batches = json["metrics"]["server_store_batches_per_group"].as_f64();
    assert!(batches.unwrap() >= 1.0, "{json:#}");
}

#[test]
fn latency_curve_runs_every_rate_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &UNLIMITED);
    let common = common_for(&server);
    let common: Vec<&str> = common.iter().map(String::as_str).collect();
    let scenario = ["latency-curve", "--pairs", "2", "--rates", "50,100"];
    let json = assert_clean(&bench_for("1s", &common, &scenario), "latency-curve");
    let runs = json["runs"].as_array().expect("one run per rate");
    assert_eq!(runs.len(), 2, "{json:#}");
    let mut acked_total = 0;
    for (run, rate) in runs.iter().zip([50.0, 100.0]) {
        assert_eq!(run["scenario"], "throughput");
        assert_eq!(run["params"]["rate"], rate);
        assert_eq!(run["params"]["pairs"], 2);
        assert_eq!(run["problems"], Value::Array(vec![]), "{run:#}");
        let counts = &run["counts"];
        assert_eq!(counts["lost"], 0, "{run:#}");
        assert!(counts["acked"].as_u64().unwrap() > 0, "{run:#}");
        assert_eq!(counts["acked"], counts["delivered"]);
        assert_eq!(counts["acked"], counts["receipted"]);
        assert!(run["metrics"]["acked_msgs_per_sec"].as_f64().unwrap() > 0.0);
        for latency in ["send_ack", "delivery", "receipt"] {
            let summary = &run["latencies_ms"][latency];
            assert!(summary["count"].as_u64().unwrap() > 0, "{run:#}");
            assert!(summary["p999_ms"].as_f64().unwrap() >= summary["p50_ms"].as_f64().unwrap());
        }
        acked_total += counts["acked"].as_u64().unwrap();
    }
    assert_eq!(
        json["counts"]["acked"], acked_total,
        "counts are sums over the runs"
    );
}

#[test]
fn throughput_as_fast_as_possible_over_protobuf() {
    let json = run_against_server(&[
        "throughput",
        "--pairs",
        "2",
        "--rate",
        "0",
        "--window",
        "8",
        "--protocol",
        "proto",
    ]);
    assert_eq!(json["protocol"], "proto");
    assert_eq!(json["counts"]["acked"], json["counts"]["delivered"]);
}

#[test]
fn connections_from_two_processes() {
    let json = run_against_server(&[
        "connections",
        "--connections",
        "40",
        "--processes",
        "2",
        "--source-addrs",
        "2",
        "--hold",
        "200ms",
    ]);
    assert_eq!(json["counts"]["connected"], 40);
    assert_eq!(json["counts"]["failed"], 0);
    assert_eq!(json["metrics"]["server_connections_delta"], 40.0);
}

/// A storm of 20 devices with 3 messages pending each, and `extra` arguments.
fn reconnect_storm(extra: &[&str]) -> Value {
    let mut scenario = vec![
        "reconnect-storm",
        "--devices",
        "20",
        "--pending",
        "3",
        "--senders",
        "2",
    ];
    scenario.extend_from_slice(extra);
    run_against_server(&scenario)
}

#[test]
fn reconnect_storm_catches_up_every_pending_message() {
    let json = reconnect_storm(&[]);
    assert_eq!(json["counts"]["synced"], 20);
    assert_eq!(json["counts"]["events_received"], 60);
    // Every device's catch-up read its conversation's events, from the server's cache of
    // recent events (`/metrics`) or from its tables.
    let read = |from: &str| json["counts"][from].as_u64().unwrap();
    let reads = read("server_event_reads_from_memory") + read("server_event_reads_from_store");
    assert!(reads >= 20, "{json:#}");
}

#[test]
fn a_returning_devices_storm_catches_up_only_what_came_since_its_ack() {
    let json = reconnect_storm(&["--returning"]);
    assert_eq!(json["params"]["returning"], true);
    assert_eq!(json["counts"]["synced"], 20);
    // Each device acknowledged its first message before going offline: its catch-up holds
    // the pending three, not the first one again.
    assert_eq!(json["counts"]["events_received"], 60);
    assert_eq!(json["counts"]["gaps"], 0);
}

/// `--restart-with`: the server restarts (SIGTERM, then started again on its port and data
/// directory) once the messages are pending, and every device catches up after it.
#[test]
fn a_storm_after_a_restart_catches_up_every_pending_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &UNLIMITED);
    let signals = tempfile::tempdir().unwrap();
    // The command asks this test for the restart and waits until it is done.
    let asked = signals.path().join("restart");
    let command = format!(
        "touch {asked} && while [ -e {asked} ]; do sleep 0.02; done",
        asked = asked.display()
    );
    let common = common_for(&server);
    let storm = std::thread::spawn(move || {
        let common: Vec<&str> = common.iter().map(String::as_str).collect();
        let scenario = ["--devices", "20", "--pending", "3", "--senders", "2"];
        let restart = ["--restart-with", command.as_str()];
        bench(
            &common,
            &[&["reconnect-storm"][..], &scenario, &restart].concat(),
        )
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !asked.exists() {
        assert!(std::time::Instant::now() < deadline, "no restart asked for");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.restart();
    std::fs::remove_file(&asked).unwrap();
    let json = assert_clean(&storm.join().unwrap(), "reconnect-storm");
    assert_eq!(json["params"]["restarted"], true);
    assert_eq!(json["counts"]["synced"], 20);
    assert_eq!(json["counts"]["events_received"], 60);
    // A command that fails stops the run.
    let failed = bench(
        &common_for(&server)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        &[
            "reconnect-storm",
            "--devices",
            "2",
            "--restart-with",
            "exit 3",
        ],
    );
    assert!(!failed.success);
    assert!(
        failed.stderr.contains("--restart-with `exit 3` failed"),
        "{}",
        failed.stderr
    );
}

#[test]
fn group_fanout_reaches_every_member() {
    let json = run_against_server(&[
        "group-fanout",
        "--members",
        "10",
        "--senders",
        "2",
        "--rate",
        "20",
    ]);
    let counts = &json["counts"];
    assert!(counts["acked"].as_u64().unwrap() > 0, "{json:#}");
    assert_eq!(counts["delivered"], counts["deliveries_expected"]);
}

/// A server with a webhook push provider (at an address nobody listens on: every device of
/// these runs stays connected, so none is notified).
const WEBHOOK: [&str; 4] = [
    "--push-webhook-url",
    "http://127.0.0.1:9/hook",
    "--push-webhook-secret",
    "s3cret",
];

fn run_with_push_provider(scenario: &[&str]) -> Value {
    let server_args = [&UNLIMITED[..], &WEBHOOK[..]].concat();
    let scenario = [scenario, &["--push-provider", "webhook"]].concat();
    let json = assert_clean(&bench_against(&server_args, &scenario), scenario[0]);
    assert_eq!(json["params"]["push_provider"], "webhook", "{json:#}");
    json
}

#[test]
fn scenarios_with_push_registrations_lose_nothing() {
    let scenarios: [&[&str]; 2] = [
        &["throughput", "--pairs", "2", "--rate", "100"],
        &["group-fanout", "--members", "10", "--rate", "20"],
    ];
    for scenario in scenarios {
        let json = run_with_push_provider(scenario);
        assert!(json["counts"]["acked"].as_u64().unwrap() > 0, "{json:#}");
    }
}

#[test]
fn push_registrations_need_a_provider_the_server_has() {
    let scenario = ["throughput", "--pairs", "1", "--push-provider", "fcm"];
    let run = bench_against(&UNLIMITED, &scenario);
    assert!(!run.success);
    assert!(
        run.stderr.contains("PUT /v1/devices/me/push answered 400")
            && run.stderr.contains("no fcm push provider configured"),
        "{}",
        run.stderr
    );
}

#[test]
fn crash_scenario_finds_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().display().to_string();
    let run = bench(
        &["--data-dir", &data_dir],
        &[
            "crash",
            "--server-bin",
            env!("CARGO_BIN_EXE_courier"),
            // As for every test server: no free-space watermarks on a test machine's disk.
            "--server-arg=--min-free-disk=0",
            "--server-arg=--media-min-free-disk=0",
            "--pairs",
            "2",
            "--kill-after",
            "200",
        ],
    );
    let json = assert_clean(&run, "crash");
    let counts = &json["counts"];
    assert!(counts["acked"].as_u64().unwrap() > 0, "{json:#}");
    assert_eq!(counts["seq_changed"], 0);
    assert_eq!(counts["duplicates"], 0);
    assert_eq!(counts["gaps"], 0);
}

#[test]
fn compare_prints_ratios() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, rate: f64| {
        let path = dir.path().join(name);
        let report = serde_json::json!({
            "scenario": "throughput", "protocol": "json", "url": "ws://x", "started_unix_ms": 0,
            "params": {}, "metrics": { "acked_msgs_per_sec": rate }, "latencies_ms": {},
            "counts": {}, "errors": {}, "problems": []
        });
        std::fs::write(&path, report.to_string()).unwrap();
        path
    };
    let (a, b) = (write("a.json", 1000.0), write("b.json", 2500.0));
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["bench", "compare"])
        .args([&a, &b])
        .output()
        .unwrap();
    assert!(output.status.success());
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("acked_msgs_per_sec") && l.ends_with("2.500")),
        "{table}"
    );
}
