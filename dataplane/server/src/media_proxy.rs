//! The media endpoints of a gateway node without the media role: clients have one base URL
//! (PROTOCOL.md), so the node answers `/v1/media*` ([`media_api::routes`]) by forwarding each
//! request to a live media node of the registry, and the media node's answer back.
//!
//! - **Streaming both ways.** The request body goes out as it comes in and the answer's body
//!   comes back as it is read (`reqwest` over `hyper`): an upload of hundreds of MB or a long
//!   video download holds a few buffers in memory, never the whole body.
//! - **Unchanged.** Method, path and query, and every end-to-end header go as they came
//!   (`Authorization`, `Range`, `Content-Type`, `Content-Length`, `If-None-Match`...); the
//!   media node's status and end-to-end headers come back as it wrote them. Hop-by-hop headers
//!   (RFC 9110, 7.6.1) stay on their hop. The media node authenticates the caller and applies
//!   its limits: what a client gets is what a media node answers it directly.
//! - **Which media node.** Any live node registered with `media` and the address of its HTTP
//!   port (`http_address`), through a [`NodeDirectory`]: a random key per request spreads the
//!   requests, and a node that could not be reached is ranked last for a while.
//! - **Failure policy.** No live media node: 503 `unavailable`. A node that cannot be reached
//!   (refused, reset before an answer, no connection within [`CONNECT_TIMEOUT`]) is marked
//!   down; a download (no body) is tried on the next node, an upload is answered 503
//!   `unavailable` (its body was being read: the client uploads again, and the same bytes get
//!   the same media id). A media node that stops sending mid-body (more than [`READ_TIMEOUT`]
//!   without a byte) ends the client's response early, as a direct connection would.
//!
//! An Ingress or HTTPRoute can send `/v1/media` straight to the media nodes' Service and skip
//! this hop (`docs/operator.md`).

use crate::media_api;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use courier_core::error::ApiError;
use courier_rpc::directory::NodeDirectory;
use courier_store::MessageStore;
use std::sync::Arc;
use std::time::Duration;

/// The role media nodes register with.
const MEDIA_ROLE: &str = "media";
/// Longest wait for a connection to a media node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence of a media node while its answer is read.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The `retry_after_ms` of a media request no media node could take.
const RETRY_AFTER_MS: u64 = 1000;

/// Forwards media requests to the cluster's media nodes (module documentation).
pub struct MediaProxy {
    nodes: NodeDirectory,
    http: reqwest::Client,
}

impl MediaProxy {
    /// Forwards to the media nodes registered in `store`.
    pub fn new(store: MessageStore) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            nodes: NodeDirectory::new(store, MEDIA_ROLE, |node| &node.http_address),
            http,
        })
    }

    /// The media node's answer to `request`, or 503 `unavailable` when none could take it.
    #[tracing::instrument(skip_all, fields(method = %request.method(), path = %request.uri().path()))]
    async fn forward(&self, request: Request) -> Result<Response, ApiError> {
        let nodes = self.nodes.ranked(rand::random::<u64>()).await?;
        if nodes.is_empty() {
            return Err(ApiError::unavailable(
                "no media node is running; retry shortly",
                RETRY_AFTER_MS,
            ));
        }
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let headers = end_to_end(&parts.headers);
        // A download (GET, HEAD: no body) may be tried on the next node; a body is read once.
        let repeatable = parts.method.is_safe();
        let mut body = (!repeatable).then(|| reqwest::Body::wrap_stream(body.into_data_stream()));
        for (node, address) in nodes {
            let mut forwarded = self
                .http
                .request(parts.method.clone(), format!("http://{address}{path}"))
                .headers(headers.clone());
            if let Some(body) = body.take() {
                forwarded = forwarded.body(body);
            }
            match forwarded.send().await {
                Ok(answer) => return Ok(relay(answer)),
                Err(e) => {
                    // Without the URL: its query may hold a signed URL's signature, or a
                    // token a client put there (refused, but in the URL all the same). The
                    // span has the method and the path.
                    let e = e.without_url();
                    tracing::warn!(node, address, error = %e, "a media node could not be reached; it is ranked last for a while");
                    self.nodes.mark_down(&node);
                    if !repeatable {
                        break;
                    }
                }
            }
        }
        Err(ApiError::unavailable(
            "the media node could not be reached; retry",
            RETRY_AFTER_MS,
        ))
    }
}

/// The media endpoints, forwarded by `proxy`.
pub fn router(proxy: Arc<MediaProxy>) -> Router {
    media_api::routes(post(forward), get(forward), get(forward)).with_state(proxy)
}

async fn forward(State(proxy): State<Arc<MediaProxy>>, request: Request) -> Response {
    proxy.forward(request).await.into_response()
}

/// The media node's answer, its body streamed.
fn relay(answer: reqwest::Response) -> Response {
    let answer = axum::http::Response::from(answer);
    let (mut parts, body) = answer.into_parts();
    parts.headers = end_to_end(&parts.headers);
    Response::from_parts(parts, Body::new(body))
}

/// `headers` without the hop-by-hop ones: those named by `Connection`, and the fields RFC 9110
/// (7.6.1) and RFC 9112 reserve to one connection; `Host` is the forwarded request's own.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut kept = headers.clone();
    for name in [
        header::CONNECTION,
        header::HOST,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        kept.remove(name);
    }
    kept.remove("keep-alive");
    kept.remove("proxy-connection");
    for name in named {
        kept.remove(name.as_str());
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::{MediaProxy, end_to_end};
    use axum::http::{HeaderMap, HeaderValue};
    use std::sync::{Arc, Mutex};

    /// Log lines, written into memory.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A signed URL carries its signature in the query, and a client may put its token there
    /// (`access_token`, refused on media routes but in the URL all the same): neither may
    /// reach the logs when a media node cannot be reached.
    #[tokio::test]
    async fn an_unreachable_media_node_is_logged_without_the_query() {
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let store = courier_store::MessageStore::open(Arc::new(engine), b"", 4)
            .await
            .unwrap();
        // A port nothing listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = closed.local_addr().unwrap().to_string();
        drop(closed);
        let record = courier_store::nodes::NodeRecord {
            roles: vec!["media".into()],
            http_address: address,
            lease_until_ms: courier_core::clock::now_ms() + 60_000,
            ..Default::default()
        };
        store.register_node("m1", &record).await.unwrap();
        let proxy = MediaProxy::new(store).unwrap();

        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let request = axum::http::Request::get(
            "/v1/media/abc?access_token=the-callers-jwt&signature=the-urls-signature",
        )
        .body(axum::body::Body::empty())
        .unwrap();
        assert!(proxy.forward(request).await.is_err());
        let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("could not be reached"), "{logged}");
        assert!(!logged.contains("the-callers-jwt"), "{logged}");
        assert!(!logged.contains("the-urls-signature"), "{logged}");
    }

    #[test]
    fn hop_by_hop_headers_stay_on_their_hop_and_the_rest_go_on() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("authorization", "Bearer t"),
            ("range", "bytes=0-9"),
            ("content-type", "video/mp4"),
            ("content-length", "10"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("host", "gateway:8080"),
            ("upgrade", "websocket"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        let kept = end_to_end(&headers);
        let mut names: Vec<&str> = kept.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            ["authorization", "content-length", "content-type", "range"]
        );
    }
}
