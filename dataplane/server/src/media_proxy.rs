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
//!   the same media id); a client that goes away midway through its upload gets 400
//!   `bad_request`, the media node left up. A media node's answer is waited for at most
//!   [`READ_TIMEOUT`] once the request's body has all been sent (an upload takes as long as its
//!   client sends), then taken for unreachable; one that stops sending mid-body (more than
//!   [`READ_TIMEOUT`] without a byte) ends the client's response early, as a direct
//!   connection would.
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
use futures::StreamExt;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::watch;

/// The role media nodes register with.
const MEDIA_ROLE: &str = "media";
/// Longest wait for a connection to a media node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a media node's answer once the request has all been sent, and longest
/// silence of a media node while its answer's body is read.
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
            // No `read_timeout`: reqwest's runs from the request's start to the answer's
            // headers, which an upload's whole body comes before (`answer_deadline`, `relay`).
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
        let (mut body, read) = match repeatable {
            true => (None, None),
            false => {
                let (progress, read) = watch::channel(BodyRead::Reading);
                (Some(telling_its_end(body, progress)), Some(read))
            }
        };
        for (node, address) in nodes {
            let mut forwarded = self
                .http
                .request(parts.method.clone(), format!("http://{address}{path}"))
                .headers(headers.clone());
            if let Some(body) = body.take() {
                forwarded = forwarded.body(body);
            }
            let answer = tokio::select! {
                // Without the URL: its query may hold a signed URL's signature, or a token a
                // client put there (refused, but in the URL all the same). The span has the
                // method and the path.
                answer = forwarded.send() => answer.map_err(|e| e.without_url().to_string()),
                () = answer_deadline(read.clone()) => Err(format!(
                    "no answer within {} s of the request",
                    READ_TIMEOUT.as_secs()
                )),
            };
            match answer {
                Ok(answer) => return Ok(relay(answer)),
                // The client went away midway: no fault of the media node's.
                Err(e)
                    if read
                        .as_ref()
                        .is_some_and(|r| *r.borrow() == BodyRead::Failed) =>
                {
                    tracing::debug!(node, error = %e, "an upload's client went away midway");
                    return Err(ApiError::bad_request(
                        "upload interrupted: the request's body ended early",
                    ));
                }
                Err(e) => {
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

/// How far the client's body of a forwarded upload has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyRead {
    Reading,
    /// All of it: the media node answers now.
    All,
    /// It failed midway: the client went away.
    Failed,
}

/// `body` as the forwarded request's, telling `progress` once it has all been read out (an
/// upload takes as long as its client takes to send it, minutes for a video over a slow link,
/// and the media node answers only then), or failed.
fn telling_its_end(body: Body, progress: watch::Sender<BodyRead>) -> reqwest::Body {
    let progress = Arc::new(progress);
    let failed = progress.clone();
    let read = body.into_data_stream().inspect(move |chunk| {
        if chunk.is_err() {
            failed.send_replace(BodyRead::Failed);
        }
    });
    let end = futures::stream::poll_fn(move |_| {
        progress.send_if_modified(|read| {
            let first = *read == BodyRead::Reading;
            if first {
                *read = BodyRead::All;
            }
            first
        });
        Poll::Ready(None)
    });
    reqwest::Body::wrap_stream(read.chain(end))
}

/// Resolves [`READ_TIMEOUT`] after the request's body has all been read out or failed (`read`,
/// or dropped with the body; `None`: a request without one): the longest wait for a media
/// node's answer.
async fn answer_deadline(read: Option<watch::Receiver<BodyRead>>) {
    if let Some(mut read) = read {
        let _ = read.wait_for(|read| *read != BodyRead::Reading).await;
    }
    tokio::time::sleep(READ_TIMEOUT).await;
}

/// The media node's answer, its body streamed; a media node that sends nothing of it for
/// [`READ_TIMEOUT`] ends it early, as a direct connection would end.
fn relay(answer: reqwest::Response) -> Response {
    let answer = axum::http::Response::from(answer);
    let (mut parts, body) = answer.into_parts();
    parts.headers = end_to_end(&parts.headers);
    let body = Body::new(body).into_data_stream();
    let limited = futures::stream::unfold(Some(body), |body| async move {
        let mut body = body?;
        match tokio::time::timeout(READ_TIMEOUT, body.next()).await {
            Ok(Some(chunk)) => Some((chunk, Some(body))),
            Ok(None) => None,
            Err(_) => {
                let silent = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the media node stopped sending the answer",
                );
                Some((Err(axum::Error::new(silent)), None))
            }
        }
    });
    Response::from_parts(parts, Body::from_stream(limited))
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
    use super::{MediaProxy, READ_TIMEOUT, end_to_end};
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

    /// A proxy over a store with live media nodes `ids`, all at `address`.
    async fn proxy_to(address: String, ids: &[&str]) -> (tempfile::TempDir, MediaProxy) {
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let store = courier_store::MessageStore::open(Arc::new(engine), b"", 4)
            .await
            .unwrap();
        let record = courier_store::nodes::NodeRecord {
            roles: vec!["media".into()],
            http_address: address,
            lease_until_ms: courier_core::clock::now_ms() + 60_000,
            ..Default::default()
        };
        for id in ids {
            store.register_node(id, &record).await.unwrap();
        }
        (dir, MediaProxy::new(store).unwrap())
    }

    /// A media node that answers an upload 201 with the number of bytes it read, or 400 with
    /// why it could not read them all; its address.
    async fn counting_media_node() -> String {
        use axum::http::StatusCode;
        let media_node = axum::Router::new().fallback(|body: axum::body::Body| async move {
            match axum::body::to_bytes(body, usize::MAX).await {
                Ok(bytes) => (StatusCode::CREATED, bytes.len().to_string()),
                Err(e) => (StatusCode::BAD_REQUEST, e.to_string()),
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, media_node).await });
        address
    }

    /// An upload that takes longer than [`READ_TIMEOUT`] to send (a video over a slow link:
    /// 100 MiB at 10 Mbit/s is 80 s) gets the media node's answer; the wait for it begins once
    /// the body is all sent. It began with the request: the client got 503 `unavailable` for
    /// every such upload, however often it tried, and the media node was marked down.
    #[tokio::test(start_paused = true)]
    async fn an_upload_slower_than_the_read_timeout_gets_the_media_nodes_answer() {
        use axum::http::StatusCode;
        use futures::StreamExt;
        let address = counting_media_node().await;
        let (_dir, proxy) = proxy_to(address, &["m1"]).await;
        // Its second half comes two read timeouts after its first (the clock is paused: it
        // moves only when every task waits).
        let slow = futures::stream::iter([false, true]).then(|late| async move {
            if late {
                tokio::time::sleep(2 * READ_TIMEOUT).await;
            }
            Ok::<_, std::io::Error>(vec![7u8; 1000])
        });
        let request = axum::http::Request::post("/v1/media")
            .header("content-type", "video/mp4")
            .body(axum::body::Body::from_stream(slow))
            .unwrap();
        let answer = match proxy.forward(request).await {
            Ok(answer) => answer,
            Err(e) => panic!("{} {}", e.status(), e.message),
        };
        assert_eq!(answer.status(), StatusCode::CREATED);
        let body = axum::body::to_bytes(answer.into_body(), 100).await.unwrap();
        assert_eq!(body, "2000");
    }

    /// A client that goes away midway through an upload (a phone losing its network) is its
    /// own failure: it gets the media node's answer to an upload cut short (400), and the
    /// media node is not taken for unreachable. It was marked down (ranked last for a while,
    /// its share of requests going to the others) and logged as unreachable, for every
    /// upload a client dropped.
    #[tokio::test]
    async fn an_upload_its_client_drops_midway_leaves_the_media_node_up() {
        let address = counting_media_node().await;
        // Two media nodes (the same server): which one ranks first depends on the key, unless
        // one is marked down.
        let (_dir, proxy) = proxy_to(address, &["m1", "m2"]).await;

        let dropped = futures::stream::iter([
            Ok(vec![7u8; 1000]),
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the client went away",
            )),
        ]);
        let request = axum::http::Request::post("/v1/media")
            .header("content-type", "video/mp4")
            .body(axum::body::Body::from_stream(dropped))
            .unwrap();
        let refused = proxy.forward(request).await.map(|a| a.status());
        assert_eq!(
            refused.map_err(|e| e.code),
            Err(courier_proto::ErrorCode::BadRequest)
        );
        let mut first = std::collections::BTreeSet::new();
        for key in 0..64u64 {
            first.insert(proxy.nodes.ranked(key).await.unwrap()[0].0.clone());
        }
        assert_eq!(first.len(), 2, "a media node was marked down: {first:?}");
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
