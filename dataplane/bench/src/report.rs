//! The result of a run: a human summary table, and JSON for machines and `bench compare`.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Latency percentiles of one kind of operation, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Percentile (as text, e.g. "99.9") to milliseconds, for plots.
    #[serde(default)]
    pub percentiles_ms: BTreeMap<String, f64>,
}

/// How many of a run's slowest seconds the summary names.
const SLOWEST_SECONDS_SHOWN: usize = 5;

/// One run's results. `metrics` and `latencies_ms` are what `compare` compares; `counts` are
/// the correctness figures (messages acknowledged, delivered, lost...).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub protocol: String,
    pub url: String,
    /// Wall-clock start, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The scenario's parameters, as given.
    pub params: BTreeMap<String, Value>,
    /// Rates, durations, sizes (higher or lower is better depending on the name).
    pub metrics: BTreeMap<String, f64>,
    pub latencies_ms: BTreeMap<String, LatencySummary>,
    pub counts: BTreeMap<String, u64>,
    /// Error frames and connection failures, by code.
    pub errors: BTreeMap<String, u64>,
    /// Correctness problems found; empty when nothing was lost, duplicated or reordered.
    pub problems: Vec<String>,
    /// Send-ACK latency second by second (`throughput`): each second of the run that saw a
    /// message meant to go, with the bucket of its 99th percentile.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub send_ack_by_second: Vec<super::stats::Second>,
    /// The runs a sweep is made of, in the order they ran (`latency-curve`: one `throughput`
    /// run per offered rate, `params.rate` holding that rate); empty for a single run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<Report>,
}

impl Report {
    pub fn new(scenario: &str, common: &super::CommonArgs) -> Report {
        Report {
            scenario: scenario.to_owned(),
            protocol: common.protocol.name().to_owned(),
            url: common.url.join(","),
            started_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or_default(),
            ..Report::default()
        }
    }

    pub fn param(&mut self, name: &str, value: impl Into<Value>) {
        self.params.insert(name.to_owned(), value.into());
    }

    pub fn metric(&mut self, name: &str, value: f64) {
        self.metrics.insert(name.to_owned(), value);
    }

    pub fn count(&mut self, name: &str, value: u64) {
        self.counts.insert(name.to_owned(), value);
    }

    pub fn latency(&mut self, name: &str, latency: &super::stats::Latency) {
        self.latencies_ms.insert(name.to_owned(), latency.summary());
    }

    pub fn problem(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// The name of a sweep's run in flattened metrics and tables: `rate_R` for a run with a
    /// `rate` parameter, else its position.
    fn run_key(&self, index: usize) -> String {
        match self.params.get("rate").and_then(Value::as_f64) {
            Some(rate) => format!("rate_{}", human(rate)),
            None => format!("run_{index}"),
        }
    }

    /// Every comparable number, flattened: metrics as is, latencies as `latency.NAME.pXX_ms`,
    /// counts as `count.NAME`, and a sweep's runs prefixed with their key (`rate_1000.`).
    pub fn flat_metrics(&self) -> BTreeMap<String, f64> {
        let mut flat = self.metrics.clone();
        for (name, l) in &self.latencies_ms {
            for (field, value) in [
                ("p50_ms", l.p50_ms),
                ("p99_ms", l.p99_ms),
                ("p999_ms", l.p999_ms),
                ("max_ms", l.max_ms),
                ("mean_ms", l.mean_ms),
            ] {
                flat.insert(format!("latency.{name}.{field}"), value);
            }
        }
        for (name, value) in &self.counts {
            flat.insert(format!("count.{name}"), *value as f64);
        }
        for (index, run) in self.runs.iter().enumerate() {
            let key = run.run_key(index);
            for (name, value) in run.flat_metrics() {
                flat.insert(format!("{key}.{name}"), value);
            }
        }
        flat
    }

    /// A sweep's runs, one line each: offered and acknowledged rate, p50/p99/p99.9 of every
    /// latency the runs measured (send-ACK and delivery first), and messages lost. Only a
    /// header when there are no runs.
    pub fn runs_table(&self) -> String {
        let rank = |name: &str| match name {
            "send_ack" => 0,
            "delivery" => 1,
            "receipt" => 2,
            _ => 3,
        };
        let mut names: Vec<&str> = self
            .runs
            .iter()
            .flat_map(|run| run.latencies_ms.keys().map(String::as_str))
            .collect();
        names.sort_by_key(|name| (rank(name), *name));
        names.dedup();
        let mut out = format!("  {:>9} {:>9}", "offered/s", "acked/s");
        for name in &names {
            let p50 = format!("{name} p50");
            out += &format!(
                "  {p50:>w$} {:>7} {:>7}",
                "p99",
                "p99.9",
                w = name.len() + 4
            );
        }
        out += &format!(" {:>6}\n", "lost");
        let cell = |value: Option<f64>| value.map_or("-".to_owned(), |v| format!("{v:.1}"));
        for run in &self.runs {
            let offered = run.params.get("rate").and_then(Value::as_f64);
            let acked = run.metrics.get("acked_msgs_per_sec").copied();
            out += &format!("  {:>9} {:>9}", cell(offered), cell(acked));
            for name in &names {
                let l = run.latencies_ms.get(*name);
                out += &format!(
                    "  {:>w$} {:>7} {:>7}",
                    cell(l.map(|l| l.p50_ms)),
                    cell(l.map(|l| l.p99_ms)),
                    cell(l.map(|l| l.p999_ms)),
                    w = name.len() + 4
                );
            }
            let lost = run
                .counts
                .get("lost")
                .map_or("-".to_owned(), u64::to_string);
            out += &format!(" {lost:>6}\n");
        }
        out
    }

    /// The human summary, on stdout.
    pub fn print(&self) {
        println!();
        println!(
            "== courier bench {} ({}, {}) ==",
            self.scenario, self.protocol, self.url
        );
        if !self.params.is_empty() {
            let params: Vec<String> = self
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("params: {}", params.join(" "));
        }
        for (name, value) in &self.metrics {
            println!("  {name:<34} {}", human(*value));
        }
        if !self.runs.is_empty() {
            println!("  latencies in ms, rates in msgs/s:");
            print!("{}", self.runs_table());
        }
        if !self.latencies_ms.is_empty() {
            println!(
                "  {:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency (ms)", "count", "p50", "p99", "p99.9", "max", "mean"
            );
            for (name, l) in &self.latencies_ms {
                println!(
                    "  {:<16} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name, l.count, l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms
                );
            }
        }
        if let Some(line) = self.slowest_seconds() {
            println!("  {line}");
        }
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !counts.is_empty() {
            println!("  counts: {}", counts.join(" "));
        }
        if !self.errors.is_empty() {
            let errors: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            println!("  errors: {}", errors.join(" "));
        }
        if self.problems.is_empty() {
            println!("  correctness: ok");
        } else {
            for problem in &self.problems {
                println!("  PROBLEM: {problem}");
            }
        }
    }

    /// The seconds whose send-ACK p99 was the highest, against the median second's: the
    /// moments a run's tail comes from. `None` without a timeline.
    pub fn slowest_seconds(&self) -> Option<String> {
        let mut seconds = self.send_ack_by_second.clone();
        if seconds.is_empty() {
            return None;
        }
        seconds.sort_by(|a, b| b.p99_ms_at_most.total_cmp(&a.p99_ms_at_most));
        let median = seconds[seconds.len() / 2].p99_ms_at_most;
        let worst: Vec<String> = seconds
            .iter()
            .take(SLOWEST_SECONDS_SHOWN)
            .map(|s| format!("{} s ({:.1})", s.at_secs, s.p99_ms_at_most))
            .collect();
        Some(format!(
            "send_ack p99 by second, ms at most: median {median:.1} of {} seconds; slowest {}",
            seconds.len(),
            worst.join(", ")
        ))
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }

    pub fn read_json(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a courier bench result", path.display()))
    }
}

/// A number for people: integers without decimals, others with three.
pub fn human(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}
