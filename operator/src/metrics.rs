//! The operator's own Prometheus metrics, named `courier_operator_<what>`, served on
//! `/metrics` with `/healthz` ([`serve`]).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Labels of a controller's counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `cluster`, `gateway-pool` or `shard-set`.
    pub controller: &'static str,
}

/// Labels of a shard move.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabel {
    /// `Evacuate`, `Isolate`, `Relieve` or `Fill`.
    pub reason: &'static str,
    /// `done` or `failed`.
    pub outcome: &'static str,
}

/// Labels of a resource's gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabel {
    /// `namespace/name`.
    pub resource: String,
}

/// Every metric of the operator.
pub struct Metrics {
    registry: Registry,
    /// Reconciliations run.
    pub reconciliations: Family<ControllerLabel, Counter>,
    /// Reconciliations that failed.
    pub reconcile_errors: Family<ControllerLabel, Counter>,
    /// Shard moves carried out.
    pub shard_moves: Family<MoveLabel, Counter>,
    /// The busiest sequencer pod's load over the mean, per shard set.
    pub max_over_mean: Family<ResourceLabel, Gauge<f64, AtomicU64>>,
    /// Gateway pods asked for, per pool.
    pub gateway_replicas: Family<ResourceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut metrics = Metrics {
            registry: Registry::with_prefix("courier_operator"),
            reconciliations: Family::default(),
            reconcile_errors: Family::default(),
            shard_moves: Family::default(),
            max_over_mean: Family::default(),
            gateway_replicas: Family::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "reconciliations",
            "Reconciliations run",
            metrics.reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed",
            metrics.reconcile_errors.clone(),
        );
        registry.register(
            "shard_moves",
            "Sequencer shard moves carried out",
            metrics.shard_moves.clone(),
        );
        registry.register(
            "pod_load_max_over_mean",
            "The busiest sequencer pod's load over the mean pod load",
            metrics.max_over_mean.clone(),
        );
        registry.register(
            "gateway_replicas",
            "Gateway pods asked for",
            metrics.gateway_replicas.clone(),
        );
        metrics
    }

    /// The metrics in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }),
        );
    axum::serve(listener, router).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_health_and_the_operators_metrics() {
        let metrics = Arc::new(Metrics::new());
        metrics
            .reconciliations
            .get_or_create(&ControllerLabel {
                controller: "shard-set",
            })
            .inc();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, metrics));
        let health = reqwest::get(format!("http://{address}/healthz"))
            .await
            .unwrap();
        assert_eq!(health.status(), 200);
        let text = reqwest::get(format!("http://{address}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("courier_operator_reconciliations_total{controller=\"shard-set\"} 1"),
            "{text}"
        );
        server.abort();
    }
}
