//! The operator's way to the data plane over the network: the sequencers' admin gRPC API, and
//! the gateways' `/metrics` (on their metrics port, [`METRICS_PORT`]) for their connection
//! counts (the admin API does not list connections per gateway yet).

use std::sync::Arc;
use std::time::Duration;

use courier_rpc::ClusterToken;

use crate::controllers::DataPlane;
use crate::rebalance::executor::{AdminApi, ShardAdmin};
use crate::render::pod::METRICS_PORT;

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
        let url = metrics_url(pod_ip);
        let text = metrics_text(&self.http, &url).await?;
        connections_in(&text).ok_or_else(|| format!("no {CONNECTIONS_METRIC} in {url}"))
    }
}

/// The most of a gateway's `/metrics` the operator reads. A gateway's is tens of kB; any pod
/// may answer on its metrics port (the gateways face the internet), and 64 are read at once
/// (`controllers::gateway_pool`), so an answer past it is no count of connections and is not
/// held in memory: it was read whole, as much as a pod sent within the 10 s timeout.
pub const METRICS_BODY_LIMIT: usize = 4 << 20;

/// The text `url` answers, at most [`METRICS_BODY_LIMIT`] bytes of UTF-8.
async fn metrics_text(http: &reqwest::Client, url: &str) -> Result<String, String> {
    let failed = |e: reqwest::Error| format!("GET {url}: {e}");
    let mut response = http
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(failed)?;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > METRICS_BODY_LIMIT {
            return Err(format!(
                "GET {url}: the answer passed {METRICS_BODY_LIMIT} bytes, more than any gateway's metrics"
            ));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| format!("GET {url}: the answer is not UTF-8"))
}

/// Where the pod at `pod_ip` serves `/metrics`: its metrics port (`--metrics-listen`), as the
/// operator renders every pod; its client port answers `/metrics` 404. An IPv6 address is
/// bracketed (`http://[fd00::1]:9090`): bare, no pod of an IPv6 cluster could be read, and
/// its gateway pools never shrank.
pub fn metrics_url(pod_ip: &str) -> String {
    match pod_ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("http://[{ip}]:{METRICS_PORT}/metrics"),
        _ => format!("http://{pod_ip}:{METRICS_PORT}/metrics"),
    }
}

/// The connection gauge's value in a `/metrics` text, if it is a count: a value that is not
/// a whole number from 0 to 2^64 (NaN, infinite, negative, fractional) says nothing of what
/// the pod holds, and is not read as 0 (the pool would shrink on it) nor as 2^64.
pub fn connections_in(metrics: &str) -> Option<u64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(CONNECTIONS_METRIC)?.strip_prefix(' ')?;
        let value = value.trim().parse::<f64>().ok()?;
        let count = (0.0..u64::MAX as f64).contains(&value) && value.fract() == 0.0;
        count.then_some(value as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The autoscaler reads a gateway's connections where the pod serves them: the port its
    /// `--metrics-listen` names, not the client port (which answers `/metrics` 404).
    #[test]
    fn the_connections_are_read_on_the_metrics_port_the_pods_listen_on() {
        use crate::render::pod::{HTTP_PORT, metrics_listen};
        let url = metrics_url("10.1.2.3");
        assert_eq!(url, "http://10.1.2.3:9090/metrics");
        assert_eq!(metrics_url("fd00::1"), "http://[fd00::1]:9090/metrics");
        let listen = metrics_listen()[1].clone();
        let port = listen.rsplit_once(':').unwrap().1;
        assert_eq!(port, METRICS_PORT.to_string());
        assert!(url.ends_with(&format!(":{port}/metrics")), "{url}");
        assert!(!url.contains(&format!(":{HTTP_PORT}/")), "{url}");
    }

    #[test]
    fn reads_the_connection_gauge_and_nothing_that_merely_starts_like_it() {
        let text = "# TYPE courier_gateway_connections gauge\n\
                    courier_gateway_connections_total_bogus 9\n\
                    courier_gateway_connections 1234\n";
        assert_eq!(connections_in(text), Some(1234));
        assert_eq!(connections_in("courier_other 1\n"), None);
    }

    /// A pod answering its metrics port with more than any gateway's metrics (a finite but
    /// huge body, the gauge at its end) is unread, and what it sends past the limit is not
    /// held: 64 such pods at once could hold gigabytes of the operator's memory.
    #[tokio::test]
    async fn an_answer_past_the_limit_is_refused_not_held() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0];
                stream.read_exact(&mut byte).await.unwrap();
                request.push(byte[0]);
            }
            let filler = "# filler\n".repeat(8192);
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await;
            // 64 MiB, then the gauge: a stream cut short by the reader ends the server.
            for _ in 0..(64 << 20) / filler.len() {
                if stream.write_all(filler.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = stream.write_all(b"courier_gateway_connections 5\n").await;
        });
        let http = reqwest::Client::new();
        let error = match metrics_text(&http, &url).await {
            Ok(text) => panic!("read {} bytes past the limit", text.len()),
            Err(error) => error,
        };
        assert!(error.contains("the answer passed 4194304 bytes"), "{error}");
        server.await.unwrap();
    }

    /// A gauge that is no count of connections says nothing of what the pod holds: the pod is
    /// unread (the pool does not shrink on it), not a pod of zero or of 2^64 connections.
    #[test]
    fn a_gauge_that_is_no_count_is_not_read() {
        for garbage in ["NaN", "+Inf", "-Inf", "-3", "1e300", "12.5"] {
            let text = format!("courier_gateway_connections {garbage}\n");
            assert_eq!(connections_in(&text), None, "{garbage}");
        }
        assert_eq!(
            connections_in("courier_gateway_connections 3e3\n"),
            Some(3000)
        );
    }
}
