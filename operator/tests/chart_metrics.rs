//! Every metric the chart's alerts and dashboard use, and the connection gauge the autoscaler
//! reads, is one that the data plane or the operator exposes on `/metrics`.

use std::collections::BTreeSet;
use std::path::Path;

use courier_operator::data_plane::CONNECTIONS_METRIC;

/// The series names a `/metrics` text can hold, from its `# TYPE` lines.
fn exposed(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// Every `courier_...` name in `text`.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("courier_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The data plane's `/metrics`, with one series in every labelled family (a family shows on
/// `/metrics` once it has one).
fn data_plane_metrics() -> String {
    use courier_core::metrics::{CodeLabel, Metrics, OutcomeLabel, ScopeLabel, ShardLabel};
    let metrics = Metrics::new();
    metrics
        .shard_appends
        .get_or_create(&ShardLabel { shard: 0 })
        .inc();
    metrics
        .errors
        .get_or_create(&CodeLabel {
            code: "unavailable",
        })
        .inc();
    metrics
        .rate_limited
        .get_or_create(&ScopeLabel { scope: "user" })
        .inc();
    metrics
        .push_notifications
        .get_or_create(&OutcomeLabel { outcome: "failed" })
        .inc();
    metrics.render()
}

/// The operator's `/metrics`, with one series in every family.
fn operator_metrics() -> String {
    use courier_operator::metrics::{ControllerLabel, Metrics, MoveLabel, ResourceLabel};
    let metrics = Metrics::new();
    let controller = ControllerLabel {
        controller: "shard-set",
    };
    metrics.reconciliations.get_or_create(&controller).inc();
    metrics.reconcile_errors.get_or_create(&controller).inc();
    let moved = MoveLabel {
        reason: "Relieve",
        outcome: "done",
    };
    metrics.shard_moves.get_or_create(&moved).inc();
    let resource = ResourceLabel {
        resource: "chat/prod".to_owned(),
    };
    metrics.max_over_mean.get_or_create(&resource).set(1.0);
    metrics.gateway_replicas.get_or_create(&resource).set(2);
    metrics.render()
}

#[test]
fn the_charts_alerts_and_dashboard_use_only_exposed_metrics() {
    let mut all = exposed(&data_plane_metrics());
    all.extend(exposed(&operator_metrics()));
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/courier");
    let mut used = BTreeSet::new();
    for file in ["templates/prometheusrule.yaml", "dashboards/courier.json"] {
        let text = std::fs::read_to_string(chart.join(file)).unwrap();
        used.extend(referenced(&text));
    }
    assert!(
        used.len() >= 8,
        "the chart uses the data plane's metrics: {used:?}"
    );
    let unknown: Vec<&String> = used.iter().filter(|name| !all.contains(*name)).collect();
    assert!(
        unknown.is_empty(),
        "not exposed by any /metrics: {unknown:?}\nexposed: {all:?}"
    );
}

/// The chart's PodMonitor scrapes the port every data-plane pod serves `/metrics` on: its
/// metrics port (`--metrics-listen`), as the client port answers `/metrics` 404.
#[test]
fn the_pod_monitor_scrapes_the_data_plane_pods_metrics_port() {
    use courier_operator::render::pod::METRICS_PORT_NAME;
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/courier");
    let text = std::fs::read_to_string(chart.join("templates/servicemonitor.yaml")).unwrap();
    let endpoints = text
        .split("podMetricsEndpoints:")
        .nth(1)
        .expect("the PodMonitor's endpoints");
    let ports: Vec<&str> = endpoints
        .lines()
        .take_while(|line| !line.starts_with("---"))
        .filter_map(|line| line.trim().strip_prefix("- port:"))
        .map(str::trim)
        .collect();
    assert_eq!(ports, [METRICS_PORT_NAME]);
}

#[test]
fn the_autoscaler_reads_a_gauge_the_gateways_expose() {
    let exposed = exposed(&data_plane_metrics());
    assert!(exposed.contains(CONNECTIONS_METRIC), "{exposed:?}");
}
