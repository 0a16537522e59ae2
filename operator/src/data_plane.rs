//! The operator's way to the data plane over the network: the sequencers' admin gRPC API, and
//! the gateways' `/metrics` for their connection counts (the admin API does not list
//! connections per gateway yet).

use std::sync::Arc;
use std::time::Duration;

use courier_rpc::ClusterToken;

use crate::controllers::DataPlane;
use crate::rebalance::executor::{AdminApi, ShardAdmin};
use crate::render::pod::HTTP_PORT;

/// The gauge of open client connections on a gateway's `/metrics`.
pub const CONNECTIONS_METRIC: &str = "courier_gateway_connections";

/// Longest wait for one admin call or metrics read.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The data plane reached over gRPC and HTTP.
#[derive(Debug, Clone)]
pub struct NetworkDataPlane {
    http: reqwest::Client,
}

impl NetworkDataPlane {
    /// A data plane client with the operator's timeouts.
    pub fn new() -> Result<Self, reqwest::Error> {
        Ok(NetworkDataPlane {
            http: reqwest::Client::builder().timeout(TIMEOUT).build()?,
        })
    }
}

#[async_trait::async_trait]
impl DataPlane for NetworkDataPlane {
    fn shard_admin(&self, token: ClusterToken, seeds: Vec<String>) -> Arc<dyn ShardAdmin> {
        Arc::new(AdminApi::new(token, seeds, TIMEOUT))
    }

    async fn gateway_connections(&self, pod_ip: &str) -> Result<u64, String> {
        let url = format!("http://{pod_ip}:{HTTP_PORT}/metrics");
        let text = self
            .http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("GET {url}: {e}"))?
            .text()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        connections_in(&text).ok_or_else(|| format!("no {CONNECTIONS_METRIC} in {url}"))
    }
}

/// The connection gauge's value in a `/metrics` text.
pub fn connections_in(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(CONNECTIONS_METRIC)?.strip_prefix(' ')?;
        value.trim().parse::<f64>().ok().map(|v| v.max(0.0) as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_connection_gauge_and_nothing_that_merely_starts_like_it() {
        let text = "# TYPE courier_gateway_connections gauge\n\
                    courier_gateway_connections_total_bogus 9\n\
                    courier_gateway_connections 1234\n";
        assert_eq!(connections_in(text), Some(1234));
        assert_eq!(connections_in("courier_other 1\n"), None);
    }
}
