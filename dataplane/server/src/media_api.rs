//! The client media endpoints of a node running the media role (PROTOCOL.md, "HTTP API"):
//! `POST /v1/media` (the raw body, streamed into storage), `GET /v1/media/{id}` (the bytes,
//! with `Range`; or without a token through a signed URL) and `GET /v1/media/{id}/url`.
//! Handlers of a few lines over [`MediaService`]; authentication as on every client endpoint
//! ([`ClientAuth`]). A gateway node without the media role answers the same paths and
//! methods ([`routes`]) by forwarding them to a media node ([`crate::media_proxy`]).

use crate::http::{Authenticates, Caller, ClientAuth, PathParams, QueryParams};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use axum::{Json, Router};
use courier_core::error::ApiError;
use courier_media::{Caching, MediaService};
use std::sync::Arc;

/// The upload endpoint.
pub const UPLOAD: &str = "/v1/media";
/// The download endpoint (`Range`, `If-None-Match`, signed URLs).
pub const DOWNLOAD: &str = "/v1/media/{id}";
/// The signed download URL of a media id.
pub const SIGNED_URL: &str = "/v1/media/{id}/url";

/// The media endpoints and their methods: what a media node serves and what a gateway node
/// without media forwards.
pub fn routes<S: Clone + Send + Sync + 'static>(
    upload: MethodRouter<S>,
    download: MethodRouter<S>,
    signed_url: MethodRouter<S>,
) -> Router<S> {
    Router::new()
        // The media role enforces its own (streamed) size limit.
        .route(UPLOAD, upload.layer(DefaultBodyLimit::disable()))
        .route(DOWNLOAD, download)
        .route(SIGNED_URL, signed_url)
}

/// What the media handlers share.
pub struct MediaApi {
    pub media: Arc<MediaService>,
    pub auth: Arc<ClientAuth>,
}

impl Authenticates for MediaApi {
    fn client_auth(&self) -> &ClientAuth {
        &self.auth
    }
}

/// The media endpoints served by `api`.
pub fn router(api: Arc<MediaApi>) -> Router {
    routes(post(upload), get(download), get(signed_url)).with_state(api)
}

async fn upload(
    State(api): State<Arc<MediaApi>>,
    Caller(who): Caller,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let uploaded = api.media.upload(&who, mime, body).await?;
    Ok((StatusCode::CREATED, Json(uploaded)).into_response())
}

#[derive(serde::Deserialize)]
struct SignedQuery {
    expires: Option<u64>,
    signature: Option<String>,
}

async fn download(
    State(api): State<Arc<MediaApi>>,
    PathParams(id): PathParams<String>,
    QueryParams(signed): QueryParams<SignedQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (who, record, caching) = match (signed.expires, signed.signature) {
        (Some(expires), Some(signature)) => {
            let record = api.media.signed(&id, expires, &signature).await?;
            (None, record, Caching::SharedUntil(expires))
        }
        _ => {
            let who = api.auth.authenticate(&headers).await?;
            let record = api.media.readable(&who.user, &id).await?;
            (Some(who.user), record, Caching::Private)
        }
    };
    (api.media)
        .download(who.as_deref(), &record, &headers, caching)
        .await
}

async fn signed_url(
    State(api): State<Arc<MediaApi>>,
    Caller(who): Caller,
    PathParams(id): PathParams<String>,
) -> Result<Response, ApiError> {
    api.media.readable(&who.user, &id).await?;
    let url = api
        .media
        .signed_path(&id)
        .ok_or_else(|| ApiError::not_found("signed URLs are not enabled on this server"))?;
    Ok(Json(serde_json::json!({ "url": url })).into_response())
}
