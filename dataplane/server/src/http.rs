//! HTTP: the WebSocket upgrade, the REST API of PROTOCOL.md, health, readiness and metrics.
//! `/healthz` fails once the store has halted; `/readyz` also while starting, draining or low
//! on disk ([`StorageHealth`]). `/metrics` ([`metrics_router`]) is not authenticated: it is
//! served on the client port only without `--metrics-listen`, else on that port alone.
//! Handlers are thin: they authenticate, then call the chat role. The media endpoints are
//! routed apart: served by the node's media role ([`crate::media_api`]) or forwarded to the
//! media nodes ([`crate::media_proxy`]).
//! With `--web-dir`, every other `GET` is answered from the built web app ([`with_web_app`]).

use crate::http_server::WebSocketInFlight;
use crate::jwks::KeySetSource;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use courier_chat::ChatBinding;
use courier_chat::devices::{Devices, PUSH_PROVIDERS};
use courier_core::auth::{AuthError, Identity, TokenVerifier, bearer_token};
use courier_core::error::ApiError;
use courier_core::metrics::Metrics;
use courier_core::storage_health::StorageHealth;
use courier_gateway::Gateway;
use courier_proto::{Encoding, ErrorCode, SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO};
use courier_push::providers::PushProviders;
use courier_store::MessageStore;
use futures::{FutureExt, StreamExt, stream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Read buffer of each WebSocket connection, allocated up front and kept while idle; also the
/// most tungstenite reads per call. 512 bytes hold a typical frame; a larger frame grows the
/// buffer and is read 512 bytes per call. Against 4 KiB: 3.6-4 KB less per idle connection,
/// 0.24 more system calls per message at peak load (`docs/benchmarks.md`, "Idle connection
/// memory").
const READ_BUFFER_BYTES: usize = 512;
/// Buffered outbound bytes of each WebSocket connection before they are written out. The
/// buffer never gives back what it grew to, so an idle connection keeps up to about twice
/// this after its catch-up: 4 KiB rather than 16 holds 11-15 KB less per connection that
/// caught up 100 events, with the same catch-up time and peak throughput (`docs/benchmarks.md`,
/// "Fewer bound writes, and a smaller connection").
const WRITE_BUFFER_BYTES: usize = 4 * 1024;
/// The `retry_after_ms` of a connection refused by a draining gateway.
const RECONNECT_ELSEWHERE_MS: u64 = 1000;

/// What the handlers share.
pub struct AppState {
    /// The chat role: in this process, or on the cluster's chat nodes.
    pub chat: ChatBinding,
    pub push: PushProviderNames,
    pub gateway: Arc<Gateway>,
    pub auth: Arc<ClientAuth>,
    pub storage: Arc<StorageHealth>,
    pub ready: AtomicBool,
    /// A cluster node's registration: not ready for a while after another node ended its
    /// lease ([`crate::node::ENDED_LEASE_HOLD_DOWN`]).
    pub registration: Option<Arc<crate::node::RegistrationNotices>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        // GET over HTTP/1.1; CONNECT over HTTP/2 (RFC 8441's extended CONNECT, which the
        // server's settings allow: a proxy such as Envoy forwards WebSockets so).
        .route("/v1/ws", get(websocket).connect(websocket))
        .route("/v1/conversations", get(conversations))
        .route("/v1/conversations/{id}/messages", get(messages))
        .route("/v1/conversations/{id}/receipts", get(receipts))
        .route("/v1/groups", post(create_group))
        .route("/v1/groups/{id}/members", post(add_members))
        .route("/v1/groups/{id}/members/{user}", delete(remove_member))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/me/push", axum::routing::put(register_push))
        .route("/v1/devices/{device}", delete(unlink_device))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .with_state(state)
}

/// `/metrics` (OpenMetrics text), without authentication: on the port of `--metrics-listen`,
/// which the cluster's network reaches and clients do not, or (without it) merged into the
/// client port's routes.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(metrics)
}

/// The Content-Security-Policy of the web app's files: its own scripts and styles only, images
/// from itself or from `blob:` URLs (downloaded media), connections to its own origin (the API
/// and the WebSocket), and no framing. A script injected through a message could not run.
const WEB_APP_CSP: &str = "default-src 'self'; img-src 'self' blob:; connect-src 'self'; \
     object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Answers the requests no API route takes with the files of `web_dir` (the built web app,
/// `index.html` at `/`), under [`WEB_APP_CSP`]; without a directory, and for every path under
/// `/v1/` either way, with a `not_found` error. A method a route does not take is answered 405
/// with a `bad_request` error. So every refusal of the API has PROTOCOL.md's body, the router's
/// own included. The files are public; the app asks the person for a token and never gets one
/// from the server. A gRPC call is refused as gRPC ([`refuse_grpc`]).
pub fn with_web_app(router: Router, web_dir: Option<&std::path::Path>) -> Router {
    let router = router.method_not_allowed_fallback(method_not_allowed);
    let router = match web_dir {
        None => router.fallback(no_route),
        Some(dir) => {
            let files = Router::new()
                .fallback_service(tower_http::services::ServeDir::new(dir))
                .layer(axum::middleware::map_response(web_app_headers));
            let api_or_files = Router::new()
                .route("/v1/{*rest}", axum::routing::any(no_route))
                .fallback_service(files);
            router.fallback_service(api_or_files)
        }
    };
    router.layer(axum::middleware::from_fn(refuse_grpc))
}

/// A gRPC call (`Content-Type: application/grpc...`, to a path outside the API's `/v1/`, as
/// a gRPC method's `/package.Service/Method` is) to this port, which serves none: the admin
/// API and the other internal services are on the node's `--internal-listen`. Answered
/// `UNIMPLEMENTED` as gRPC, naming that port, so that `courier admin --node` or the operator
/// given the client port by mistake says so; answered as the API, its caller read the JSON
/// refusal as a gRPC message and reported a "compression flag: 123", `INTERNAL`. An upload
/// of that type, under `/v1/`, is the API's.
async fn refuse_grpc(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let grpc = !request.uri().path().starts_with("/v1/")
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| t.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        return next.run(request).await;
    }
    tonic::Status::unimplemented(
        "this is a client port (--listen), which serves no gRPC: call the node's \
         --internal-listen",
    )
    .into_http()
}

/// A path no route takes.
async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// A method the path's route does not take: 405, with the protocol's body.
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let refused = ApiError::bad_request(format!("{method} is not served at {}", uri.path()));
    (StatusCode::METHOD_NOT_ALLOWED, refused).into_response()
}

async fn web_app_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(WEB_APP_CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    response
}

/// Which push providers a node accepts device registrations for (`PUT /v1/devices/me/push`
/// refuses the others, as the notifier could not send with them). In a cluster where no push
/// node is live, a registration is answered `unavailable` (503), to be retried: which
/// providers the cluster has is not known until one is back.
pub enum PushProviderNames {
    /// This node's own: it runs the notifier (`courier serve`, a cluster node with `push`).
    Here(Arc<PushProviders>),
    /// Those of the cluster's live push nodes, as they registered them: a node without the
    /// push role holds no provider secret. Read from the registry at each registration (a
    /// device registers when its app starts, not per message).
    Cluster(MessageStore),
}

impl PushProviderNames {
    async fn configured(&self, provider: &str) -> Result<bool, ApiError> {
        match self {
            PushProviderNames::Here(providers) => Ok(providers.provider(provider).is_some()),
            // An unknown name is refused as such by the registration.
            PushProviderNames::Cluster(_) if !PUSH_PROVIDERS.contains(&provider) => Ok(false),
            PushProviderNames::Cluster(store) => {
                let now = courier_core::clock::now_ms();
                let nodes = store.nodes().await?;
                let mut push_nodes = nodes
                    .iter()
                    .map(|(_, node)| node)
                    .filter(|node| node.is_live(now) && node.roles.iter().any(|r| r == "push"))
                    .peekable();
                if push_nodes.peek().is_none() {
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "no push node is running; try again later",
                    ));
                }
                Ok(push_nodes.any(|node| node.push_providers.iter().any(|p| p == provider)))
            }
        }
    }
}

/// Authenticates clients: verifies a request's bearer token and admits its device (linked, or
/// linked again by a token issued after its unlink).
pub struct ClientAuth {
    pub verifier: TokenVerifier,
    /// Where `verifier` gets its keys, with `--jwt-jwks-url`: fetched again for a token
    /// naming a key it lacks.
    pub key_set: Option<Arc<KeySetSource>>,
    /// Where the devices are recorded.
    pub store: MessageStore,
    /// Most linked devices of a user (`--max-devices-per-user`; 0: no limit): a token that
    /// would link one more is refused `forbidden` ([`Devices::admit`]).
    pub max_devices_per_user: u64,
}

impl ClientAuth {
    /// The caller of an API request with `headers` (token in `Authorization: Bearer`), its
    /// device admitted ([`Devices::admit`]: recorded if new).
    pub async fn authenticate(
        &self,
        headers: &axum::http::HeaderMap,
    ) -> Result<Identity, ApiError> {
        let who = self.verified(headers, None).await?;
        self.devices().admit(&who).await?;
        Ok(who)
    }

    /// The caller of a WebSocket upgrade, from `headers` or the URL's `query` (token in
    /// `access_token`), its device checked without a write ([`Devices::check`]): the
    /// connection records it.
    pub async fn authenticate_upgrade(
        &self,
        headers: &axum::http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, ApiError> {
        let who = self.verified(headers, query).await?;
        self.devices().check(&who).await?;
        Ok(who)
    }

    fn devices(&self) -> Devices {
        Devices::new(self.store.clone()).with_max_devices(self.max_devices_per_user)
    }

    /// The identity `headers` (or the URL's `query`) carry a valid token for. A token naming
    /// a key the identity provider's set lacks has the set fetched again (at most every
    /// [`crate::jwks::UNKNOWN_KEY_REFETCH_GAP`]) and is verified once more.
    async fn verified(
        &self,
        headers: &axum::http::HeaderMap,
        query: Option<&str>,
    ) -> Result<Identity, ApiError> {
        let authorization = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let token = bearer_token(authorization, query).ok_or(AuthError::Missing)?;
        match (self.verifier.verify(token), &self.key_set) {
            (Err(AuthError::UnknownKey(kid)), Some(key_set)) => {
                key_set.refetch_for_unknown_key(&kid).await;
                Ok(self.verifier.verify(token)?)
            }
            (verified, _) => Ok(verified?),
        }
    }
}

/// A router state that authenticates clients.
pub trait Authenticates {
    fn client_auth(&self) -> &ClientAuth;
}

impl Authenticates for AppState {
    fn client_auth(&self) -> &ClientAuth {
        &self.auth
    }
}

/// The caller, from a verified token in `Authorization: Bearer`, on any router whose state
/// authenticates clients. A token in the URL is not read: logs, browser history and `Referer`
/// headers keep URLs.
pub struct Caller(pub Identity);

impl<S: Authenticates + Send + Sync> FromRequestParts<Arc<S>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<S>) -> Result<Self, ApiError> {
        state
            .client_auth()
            .authenticate(&parts.headers)
            .await
            .map(Caller)
    }
}

/// The caller of the WebSocket upgrade: as [`Caller`], or from the URL's `access_token` query
/// parameter, as a browser cannot set a header on a WebSocket (PROTOCOL.md); its device is
/// checked, and recorded by its connection ([`ClientAuth::authenticate_upgrade`]).
pub struct WebSocketCaller(pub Identity);

impl FromRequestParts<Arc<AppState>> for WebSocketCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        state
            .auth
            .authenticate_upgrade(&parts.headers, parts.uri.query())
            .await
            .map(WebSocketCaller)
    }
}

/// The WebSocket upgrade of a request, one that is not (no `Upgrade` header, a version or a
/// key missing) refused with axum's status and PROTOCOL.md's body, `bad_request`, as every
/// other refusal of the API: axum answered it with a line of plain text.
pub struct Upgrade(pub WebSocketUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Response> {
        match WebSocketUpgrade::from_request_parts(parts, state).await {
            Ok(upgrade) => Ok(Upgrade(upgrade)),
            Err(e) => {
                let refused = ApiError::bad_request(e.body_text());
                Err((e.status(), refused).into_response())
            }
        }
    }
}

async fn websocket(
    State(state): State<Arc<AppState>>,
    WebSocketCaller(who): WebSocketCaller,
    Upgrade(upgrade): Upgrade,
    headers: axum::http::HeaderMap,
    in_flight: Option<Extension<WebSocketInFlight>>,
) -> Response {
    if state.gateway.drain.is_draining() {
        // The client goes to another gateway (the load balancer no longer sends it here once
        // readiness fails).
        return ApiError::unavailable(
            "this gateway is draining; connect again (to another gateway)",
            RECONNECT_ELSEWHERE_MS,
        )
        .into_response();
    }
    let asked = headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL);
    let limit = state.gateway.limits.max_frame_bytes;
    let upgrade = upgrade
        .protocols([SUBPROTOCOL_JSON, SUBPROTOCOL_PROTO])
        .max_message_size(limit)
        .max_frame_size(limit)
        // tungstenite reserves its read buffer per connection up front (128 KiB by default):
        // most of an idle connection's memory. Frames larger than this are read in pieces.
        .read_buffer_size(READ_BUFFER_BYTES)
        // The gateway buffers frames and flushes when its queue is empty; the buffer grows
        // only while frames wait, and is written out whenever it passes this size.
        .write_buffer_size(WRITE_BUFFER_BYTES);
    let encoding = match upgrade.selected_protocol() {
        Some(name) => name.to_str().ok().and_then(Encoding::from_subprotocol),
        None if asked => None,
        None => Some(Encoding::Json),
    };
    let Some(encoding) = encoding else {
        return ApiError::bad_request(format!(
            "unsupported subprotocol: use {SUBPROTOCOL_JSON} or {SUBPROTOCOL_PROTO}"
        ))
        .into_response();
    };
    let gateway = state.gateway.clone();
    // The connection gets a task of its own and axum's upgrade task ends: run inside it, every
    // connection would also hold what that task keeps for the upgrade. Boxed, as tokio aligns
    // a task to 128 bytes, which the allocator pays with a block 128 bytes larger for a large
    // task; a boxed connection has its plain size class (`docs/benchmarks.md`, "A connection's
    // task, one size class down"). Over HTTP/2 the task holds its connection's count of
    // requests in flight, so that the connection is not closed as idle under it, and is once
    // it has ended ([`WebSocketInFlight`]): held in the boxed future, beside the connection,
    // as the task itself holds nothing but the box (one more field in it took the next
    // 128-byte task cell). Not by an `async` block awaiting the connection, which would keep
    // room for it twice, as its capture and as what it awaits.
    upgrade.on_upgrade(move |socket| {
        let serving = gateway
            .serve(socket, who, encoding)
            .map(move |()| drop(in_flight));
        tokio::spawn(Box::pin(serving));
        std::future::ready(())
    })
}

async fn conversations(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
) -> Result<Response, ApiError> {
    let conversations = state.chat.conversations(&who).await?;
    Ok(Json(serde_json::json!({ "conversations": conversations })).into_response())
}

#[derive(serde::Deserialize)]
struct PageQuery {
    after_seq: Option<u64>,
    limit: Option<u32>,
}

async fn messages(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
    QueryParams(page): QueryParams<PageQuery>,
) -> Result<Response, ApiError> {
    // Room for the page at its most before it is read, lowered once encoded.
    let mut room = state.gateway.pages.reserve_page(&who.user, page.limit)?;
    let page = state
        .chat
        .fetch(&who, &id, page.after_seq.unwrap_or(0), page.limit)
        .await?;
    let body = serde_json::to_vec(&MessagesPage {
        events: page.events,
        head_seq: page.head_seq,
        floor_seq: page.trimmed,
    })
    .map_err(|e| ApiError::new(ErrorCode::Internal, format!("the page did not encode: {e}")))?;
    room.settle(body.len());
    // The page's room is given back once hyper has taken its last byte (the body dropped).
    let body = stream::once(async { Ok::<_, std::convert::Infallible>(body) }).map(move |piece| {
        let _held = &room;
        piece
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// The body of `GET /v1/conversations/{id}/messages`.
#[derive(serde::Serialize)]
struct MessagesPage {
    events: Vec<courier_proto::Event>,
    head_seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    floor_seq: Option<u64>,
}

/// Every current member's receipt cursors in the conversation, each as a `receipt` frame
/// carries them (without `type`): what moved while the caller's devices were away.
async fn receipts(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    let receipts = state.chat.receipts(&who, &id).await?;
    Ok(Json(serde_json::json!({ "receipts": receipts })).into_response())
}

/// A URL's query parameters, with decoding errors answered as `bad_request`.
pub struct QueryParams<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(QueryParams(value)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// A URL's path parameters, with decoding errors (a segment that is not UTF-8 once
/// percent-decoded) answered as `bad_request`.
pub struct PathParams<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// Longest a JSON body may go without a byte once its request head came, as a media upload
/// (`courier_media`): past it the request is answered `bad_request` and its connection
/// closed. Unbounded, a client that sent a head and part of its body held the connection and
/// its task for good (the request head has its own timeout, `http_server`).
pub const BODY_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Most bytes of a JSON body: axum's default limit, which [`JsonBody`] applies (the largest
/// body a client has reason to send, a group of `max_users_per_request` members, is tens of
/// kilobytes).
pub const MAX_JSON_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A JSON body, with decoding errors answered as `bad_request`, and a body past
/// [`MAX_JSON_BODY_BYTES`] as `too_large`: the client is to send less, not to fix its JSON.
/// One whose `Content-Length` says so is refused before a byte of it is read (its client may
/// wait for the answer before it sends, `Expect: 100-continue`); it was read until it passed
/// the limit, and a client that declared more than it sent was answered `bad_request` after
/// [`BODY_IDLE_TIMEOUT`]. One that sends nothing for [`BODY_IDLE_TIMEOUT`] is answered
/// `bad_request`.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let declared = axum::body::HttpBody::size_hint(request.body()).lower();
        if declared > MAX_JSON_BODY_BYTES as u64 {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "the body is {declared} bytes; a JSON body may have at most \
                     {MAX_JSON_BODY_BYTES}"
                ),
            ));
        }
        let request = request.map(|body| {
            axum::body::Body::new(tower_http::timeout::TimeoutBody::new(
                BODY_IDLE_TIMEOUT,
                body,
            ))
        });
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(ErrorCode::TooLarge, e.body_text()))
            }
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

#[derive(serde::Deserialize)]
struct NewGroup {
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

async fn create_group(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    JsonBody(group): JsonBody<NewGroup>,
) -> Result<Response, ApiError> {
    let conversation_id = state
        .chat
        .create_group(&who, &group.name, &group.members)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "conversation_id": conversation_id })),
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct NewMembers {
    users: Vec<String>,
}

async fn add_members(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
    JsonBody(request): JsonBody<NewMembers>,
) -> Result<Response, ApiError> {
    let added = state.chat.add_members(&who, &id, &request.users).await?;
    Ok(Json(serde_json::json!({ "conversation_id": id, "added": added })).into_response())
}

async fn remove_member(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams((id, user)): PathParams<(String, String)>,
) -> Result<Response, ApiError> {
    state.chat.remove_member(&who, &id, &user).await?;
    Ok(Json(serde_json::json!({ "conversation_id": id, "removed": user })).into_response())
}

async fn devices(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
) -> Result<Response, ApiError> {
    let devices = state.chat.devices(&who.user).await?;
    Ok(Json(serde_json::json!({ "devices": devices })).into_response())
}

#[derive(serde::Deserialize)]
struct PushRegistration {
    provider: String,
    token: String,
}

async fn register_push(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    JsonBody(registration): JsonBody<PushRegistration>,
) -> Result<StatusCode, ApiError> {
    let configured = state.push.configured(&registration.provider).await?;
    state
        .chat
        .register_push(
            &who,
            &registration.provider,
            &registration.token,
            configured,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unlink_device(
    State(state): State<Arc<AppState>>,
    Caller(who): Caller,
    PathParams(device): PathParams<String>,
) -> Result<StatusCode, ApiError> {
    state.chat.unlink_device(&who.user, &device).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 200 while serving, 503 while starting, draining (on SIGTERM or by the admin API), low on
/// disk or with a halted store, or for a while after a fanout node ended this gateway's lease
/// ([`crate::node::ENDED_LEASE_HOLD_DOWN`]); the body says which.
async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    let not_ready = if !state.ready.load(Ordering::Acquire) {
        Some("starting")
    } else if state.gateway.drain.is_draining() {
        Some("draining")
    } else if !state.storage.ready() {
        Some("the store takes no sends: low on disk, or halted")
    } else if state
        .registration
        .as_ref()
        .is_some_and(|r| r.ended.holds_down(std::time::Instant::now()))
    {
        Some("another node ended this gateway's lease: the fanout nodes cannot reach it")
    } else {
        None
    };
    match not_ready {
        None => (StatusCode::OK, "ready"),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
    }
}

/// 200 unless the store has halted: then only a restart helps.
async fn healthz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.storage.alive() {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the store accepts no writes; restart the process",
        )
    }
}

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::FromRequest;
    use courier_core::auth::{TokenVerifier, mint};
    use futures::StreamExt;
    use std::time::Duration;

    /// A new device's first connection records it once, from its connection
    /// (`Devices::seen`): the upgrade's check writes nothing, where an API request records
    /// the device. Written at both, the record took two commits and two memtable versions
    /// per new device (`docs/benchmarks.md`, "A new device written twice").
    /// A JSON body whose client stops sending midway is refused once it has sent nothing for
    /// [`BODY_IDLE_TIMEOUT`], rather than held, with its connection and task, for good.
    #[tokio::test(start_paused = true)]
    async fn a_json_body_that_stops_coming_is_refused() {
        let first = futures::stream::iter([Ok::<_, std::io::Error>(
            axum::body::Bytes::from_static(b"{\"name\": "),
        )]);
        let body = axum::body::Body::from_stream(first.chain(futures::stream::pending()));
        let request = axum::http::Request::post("/v1/groups")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap();
        let read = JsonBody::<serde_json::Value>::from_request(request, &());
        let refused = tokio::time::timeout(BODY_IDLE_TIMEOUT * 2, read)
            .await
            .expect("the body's wait was bounded");
        let Err(error) = refused else {
            panic!("a cut body was decoded");
        };
        assert_eq!(error.into_response().status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn a_websocket_upgrade_checks_a_new_device_without_writing_it() {
        let dir = tempfile::tempdir().unwrap();
        let engine = courier_store::embedded::EmbeddedEngine::open(&dir.path().join("s")).unwrap();
        let store = MessageStore::open(Arc::new(engine), b"", 4).await.unwrap();
        let secret = [7u8; 32];
        let auth = ClientAuth {
            verifier: TokenVerifier::hs256(&secret).unwrap(),
            key_set: None,
            store: store.clone(),
            max_devices_per_user: 32,
        };
        let token = mint(&secret, "alice", "phone", Duration::from_secs(60)).unwrap();
        let mut headers = axum::http::HeaderMap::new();
        let bearer = format!("Bearer {token}").parse().unwrap();
        headers.insert(header::AUTHORIZATION, bearer);

        auth.authenticate_upgrade(&headers, None).await.unwrap();
        assert_eq!(store.device("alice", "phone").await.unwrap(), None);
        auth.authenticate(&headers).await.unwrap();
        assert!(store.device("alice", "phone").await.unwrap().is_some());
    }
}
