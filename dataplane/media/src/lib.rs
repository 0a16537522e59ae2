//! The media role: upload and download over HTTP, bytes in object storage (the `object_store`
//! crate: the local filesystem under the data directory by default, any S3-compatible bucket by
//! configuration), content-addressed by sha256 so the same bytes are stored once.
//!
//! - Each user's upload is its own record and id (derived from the uploader, the MIME type and
//!   the sha256, keyed with the store's secret: [`upload_id`]), so a re-upload of the same
//!   bytes by anyone never changes what another id serves; the records share the stored bytes.
//! - Uploads are streamed: hashed and written part by part, never held whole in memory; above
//!   the size limit the upload is aborted and answered 413 (at once, before it takes a place
//!   in flight, when its `Content-Length` is already past it); one that sends nothing for
//!   [`UPLOAD_IDLE_TIMEOUT`] is aborted too (400). Each user may keep a quota of
//!   upload bytes (413 past it), charged when an upload is recorded and given back when the
//!   sweeper forgets it. An upload is answered only once its bytes are durable (a local
//!   directory is synced, files and directory entries). Uploads are refused (`unavailable`)
//!   while the disk is low ([`StorageHealth`]), before sends are, and so is the rest of an
//!   upload under way when it runs low. Uploads in flight on a node are bounded
//!   (`--media-uploads-in-flight`, each holds up to three 5 MiB parts), and so are each
//!   user's ([`UPLOADS_IN_FLIGHT_PER_USER`]): one more is refused (`unavailable`, or
//!   `rate_limited` for the user's, to retry). The rest of a refused upload's body is read out
//!   for a while, so that its client reads the refusal ([`REFUSED_BODY_READ_FOR`]).
//! - Access: the uploader, and whoever may read (by the membership rule) a retained,
//!   undeleted message that shares the media (the sender must own the media id when sending).
//!   Each message holds its own reference, so deleting or trimming one message leaves the
//!   others' access intact. Others get 404.
//! - Downloads stream too, with `Range` (206), `ETag` and `If-None-Match` (304).
//! - Optional signed URLs: `?expires=<unix s>&signature=<hex HMAC-SHA256(secret, "<id>:<expires>")>`
//!   download without a token until `expires` (for a CDN in front of Courier, which may keep
//!   their downloads until then: [`Caching`]).
//! - A sweeper deletes media records that no message references once their latest upload or share
//!   is older than the TTL, and the bytes once no record keeps them (moved aside first and checked
//!   again, so that an upload of the same bytes meanwhile keeps them); retention drops the
//!   references of the messages it clears, and the sweeper clears a reference whose message is gone
//!   (`MessageStore::is_media_referenced`), left by versions that did not. A send that shares media
//!   unused for half the TTL marks it shared first (`courier_chat`), so that a sweep never forgets
//!   media a message is being sent with (`MessageStore::share_media`). It also deletes the bytes
//!   staged by uploads a crash or a kill cut, once untouched for [`STAGING_GRACE`]. The sweeper is
//!   a loop owned by the node's [`BackgroundLoops`]: it stops at once when cancelled (a sweep is
//!   idempotent: a record forgotten is fenced, bytes are deleted only once no record keeps them)
//!   and is restarted if it panics (it keeps no state between sweeps but bytes moved aside and the
//!   notes of records forgotten whose bytes are not yet deleted, which later sweeps settle).

use axum::body::{Body, BodyDataStream, HttpBody as _};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::Args;
use courier_chat::ChatBinding;
use courier_core::auth::Identity;
use courier_core::clock::now_ms;
use courier_core::error::ApiError;
use courier_core::leases::JobLead;
use courier_core::loops::BackgroundLoops;
use courier_core::metrics::Metrics;
use courier_core::storage_health::StorageHealth;
use courier_proto::ErrorCode;
use courier_store::{MediaAdmission, MediaRecord, MessageStore, StoreError};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Media ids listed per step of a sweep.
const SWEEP_PAGE: usize = 256;
/// Where the sweeper moves bytes it is about to delete (`MediaService::delete_unused_blob`).
const TRASH: &str = "trash";
/// Parts uploaded concurrently per upload (each part is 5 MiB): bounds upload memory.
const UPLOAD_CONCURRENCY: usize = 2;
/// Uploads in flight on a node per user: a user's devices rarely send more at once, and the
/// node's other places stay for other users.
pub const UPLOADS_IN_FLIGHT_PER_USER: usize = 4;
/// Downloads in flight on a node per user: a chat's pictures loading at once, and the node's
/// other places stay for other users.
pub const DOWNLOADS_IN_FLIGHT_PER_USER: usize = 32;
/// The `retry_after_ms` of a transfer refused as one too many in flight.
const RETRY_AFTER_MS: u64 = 1000;
/// Where uploads stage their bytes until they are kept (`MediaService::keep`).
const STAGING: &str = "staging";
/// Staged bytes untouched for this long are deleted by the sweeper
/// (`MediaService::settle_staged`).
const STAGING_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Longest wait for the next bytes of an upload (400 past it): a client gone without closing
/// its connection (a phone that lost its network) would otherwise hold the upload, its staged
/// file and its buffered part for good. As long as a gateway waits on a media node
/// (`media_proxy::READ_TIMEOUT`); a slow client sends something far more often.
pub const UPLOAD_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the rest of a refused upload's body is read, and thrown away, once the refusal is
/// answered ([`MediaService::read_out`]): as long as its client takes to read the answer and
/// stop sending, or at worst to send this long for nothing (as nginx's `lingering_time`).
const REFUSED_BODY_READ_FOR: Duration = Duration::from_secs(10);

/// Fewest bytes of `--media-url-secret`: a signed URL downloads without a token, so a short
/// secret that can be guessed (or an empty one) would let anyone sign URLs for any media.
pub const MIN_URL_SECRET_BYTES: usize = 32;

/// Largest object S3 copies in one request: the sweeper moves unused bytes aside with a copy
/// (then deletes the source) before it deletes them, so larger uploads could never be deleted.
pub const S3_MAX_COPY_BYTES: u64 = 5 * 1024 * 1024 * 1024;

#[derive(Debug, Clone, Args)]
pub struct MediaConfig {
    /// Largest upload in bytes (413 above).
    #[arg(long, env = "COURIER_MEDIA_MAX_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub media_max_bytes: u64,
    /// Bytes of media each user may keep uploaded (0: no quota); uploads past it get 413.
    /// An upload counts until the sweeper deletes it.
    #[arg(long, env = "COURIER_MEDIA_QUOTA_PER_USER", default_value = "10GiB", value_parser = courier_core::units::parse_bytes)]
    pub media_quota_per_user: u64,
    /// Uploads in flight on this node (at least 1); one more gets 503 `unavailable`, to
    /// retry. Each holds up to three 5 MiB parts in memory.
    #[arg(long, env = "COURIER_MEDIA_UPLOADS_IN_FLIGHT", default_value_t = 64)]
    pub media_uploads_in_flight: usize,
    /// Fewest bytes a second an upload must average, from its start, once it has had a
    /// minute (0: no such bound); a slower one is ended (400). Bounds how long an upload holds
    /// its place.
    #[arg(long, env = "COURIER_MEDIA_UPLOAD_MIN_RATE", default_value = "4KiB", value_parser = courier_core::units::parse_bytes)]
    pub media_upload_min_rate: u64,
    /// Downloads in flight on this node (at least 1); one more gets 503 `unavailable`, to
    /// retry. Each holds an open file (or a request to the bucket) until its client has read
    /// it or gone.
    #[arg(long, env = "COURIER_MEDIA_DOWNLOADS_IN_FLIGHT", default_value_t = 512)]
    pub media_downloads_in_flight: usize,
    /// Directory of media bytes (default: `<data-dir>/media`).
    #[arg(long, env = "COURIER_MEDIA_DIR")]
    pub media_dir: Option<PathBuf>,
    /// Uploads get `unavailable` while the media directory's filesystem has less free space
    /// than this (0: off); at least `--min-free-disk`, so uploads stop before sends.
    #[arg(long, env = "COURIER_MEDIA_MIN_FREE_DISK", default_value = "1GiB", value_parser = courier_core::units::parse_bytes)]
    pub media_min_free_disk: u64,
    /// Store media in this S3-compatible bucket instead; credentials, region and endpoint come
    /// from the usual `AWS_*` variables (`AWS_ENDPOINT` for non-AWS services).
    #[arg(long, env = "COURIER_MEDIA_S3_BUCKET")]
    pub media_s3_bucket: Option<String>,
    /// Media referenced by no message is deleted this long after its latest upload, or after
    /// the latest send that shared it (a send marks media unused for half of this as shared).
    #[arg(long, env = "COURIER_MEDIA_UNREFERENCED_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub media_unreferenced_ttl: Duration,
    /// Time between sweeps of unreferenced media.
    #[arg(long, env = "COURIER_MEDIA_SWEEP_INTERVAL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub media_sweep_interval: Duration,
    /// Secret for signed download URLs (`GET /v1/media/{id}/url`); without it they are off.
    /// At least [`MIN_URL_SECRET_BYTES`] bytes.
    #[arg(long, env = "COURIER_MEDIA_URL_SECRET", hide_env_values = true)]
    pub media_url_secret: Option<String>,
    /// Validity of signed download URLs.
    #[arg(long, env = "COURIER_MEDIA_URL_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub media_url_ttl: Duration,
}

impl MediaConfig {
    /// Refuses no upload or download in flight, a signed-URL secret shorter than [`MIN_URL_SECRET_BYTES`],
    /// and uploads larger than [`S3_MAX_COPY_BYTES`] into a bucket.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.media_uploads_in_flight > 0,
            "--media-uploads-in-flight is 0: at least 1 is required, or no upload is ever taken"
        );
        anyhow::ensure!(
            self.media_downloads_in_flight > 0,
            "--media-downloads-in-flight is 0: at least 1 is required, or no download is ever \
             served"
        );
        anyhow::ensure!(
            self.media_s3_bucket.is_none() || self.media_max_bytes <= S3_MAX_COPY_BYTES,
            "--media-max-bytes is {} with --media-s3-bucket: at most {S3_MAX_COPY_BYTES} (5 GiB) \
             are allowed there, as S3 copies at most that in one request and the media sweeper \
             moves unused bytes aside with a copy before it deletes them",
            self.media_max_bytes
        );
        if let Some(secret) = &self.media_url_secret {
            anyhow::ensure!(
                secret.len() >= MIN_URL_SECRET_BYTES,
                "--media-url-secret is {} bytes: at least {MIN_URL_SECRET_BYTES} are required, \
                 as anyone who guesses it can sign download URLs for any media (generate one \
                 with `openssl rand -hex 32`, or leave it unset to turn signed URLs off)",
                secret.len()
            );
        }
        Ok(())
    }

    /// The local directory of media bytes; `None` when they live in a bucket.
    pub fn local_dir(&self, data_dir: &std::path::Path) -> Option<PathBuf> {
        if self.media_s3_bucket.is_some() {
            return None;
        }
        Some(
            self.media_dir
                .clone()
                .unwrap_or_else(|| data_dir.join("media")),
        )
    }
}

/// Who may keep a download (`Cache-Control`); the bytes of an id never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caching {
    /// A download with a token, for its caller alone: the browser keeps it, no shared cache.
    Private,
    /// A signed URL's, valid until this Unix time (s): made for a CDN, which may keep it
    /// until then and no longer (the URL downloads nothing past it).
    SharedUntil(u64),
}

impl Caching {
    fn cache_control(self) -> String {
        match self {
            Caching::Private => "private, max-age=31536000, immutable".into(),
            Caching::SharedUntil(expires) => {
                let left = expires.saturating_sub(now_ms() / 1000);
                format!("public, max-age={left}, immutable")
            }
        }
    }
}

/// What an upload returns (`POST /v1/media`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Uploaded {
    pub media_id: String,
    pub mime: String,
    pub size: u64,
    pub sha256: String,
}

pub struct MediaService {
    objects: Arc<dyn ObjectStore>,
    store: MessageStore,
    /// Who may read which message (media access follows it).
    chat: ChatBinding,
    config: MediaConfig,
    metrics: Arc<Metrics>,
    health: Arc<StorageHealth>,
    /// The local directory of staged bytes (`None` in a bucket): read by the sweeper itself
    /// ([`MediaService::settle_staged`]).
    staging_dir: Option<PathBuf>,
    /// The key of upload ids ([`upload_id`]), read from the store at the first upload.
    id_key: tokio::sync::OnceCell<[u8; 32]>,
    /// A permit per upload in flight (`--media-uploads-in-flight`).
    uploads: tokio::sync::Semaphore,
    /// Uploads in flight per user with any ([`UPLOADS_IN_FLIGHT_PER_USER`]).
    uploaders: PerUser,
    /// A permit per download in flight (`--media-downloads-in-flight`), held by its body.
    downloads: Arc<tokio::sync::Semaphore>,
    /// Downloads in flight per user with any ([`DOWNLOADS_IN_FLIGHT_PER_USER`]).
    downloaders: PerUser,
    /// A permit per refused upload whose body is still read out
    /// ([`MediaService::read_out`]): as many as uploads in flight; past them, a refused
    /// upload's connection is closed with its body unread.
    read_outs: Arc<tokio::sync::Semaphore>,
}

/// Transfers of a kind in flight on the node, per user with any.
type PerUser = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// A user's place among the transfers of a kind in flight, given back when dropped.
struct UserPlace {
    in_flight: PerUser,
    user: String,
}

impl UserPlace {
    /// A place for `user`'s transfer, unless it has `most` in flight already.
    fn take(in_flight: &PerUser, user: &str, most: usize) -> Option<Self> {
        let mut counts = lock(in_flight);
        let count = counts.entry(user.to_owned()).or_default();
        if *count >= most {
            return None;
        }
        *count += 1;
        Some(Self {
            in_flight: in_flight.clone(),
            user: user.to_owned(),
        })
    }
}

impl Drop for UserPlace {
    fn drop(&mut self) {
        let mut counts = lock(&self.in_flight);
        if let Some(count) = counts.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(&self.user);
            }
        }
    }
}

/// A download's places (the node's, and its user's unless through a signed URL), held by its
/// body until it is read whole or dropped (its client gone, its connection cut).
struct DownloadPlace {
    _node: tokio::sync::OwnedSemaphorePermit,
    _user: Option<UserPlace>,
    metrics: Arc<Metrics>,
}

impl Drop for DownloadPlace {
    fn drop(&mut self) {
        self.metrics.media_downloads_in_flight.dec();
    }
}

/// A poisoned lock (a panic while held) still guards counts that each stay consistent.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn storage_error(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "media storage error");
    ApiError::new(ErrorCode::Internal, "media storage error")
}

/// Whether `mime` is one media type (RFC 9110, 8.3.1): `type/subtype`, then `; name=value`
/// parameters, each value a token or a quoted string. A browser given several types
/// (`image/png,text/html`) takes the last (Fetch, "extract a MIME type"): what an upload is
/// served as must be what the checks below looked at.
fn is_media_type(mime: &str) -> bool {
    let token = |s: &str| {
        s.find(|c: char| !(c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)))
            .unwrap_or(s.len())
    };
    fn ows(s: &str) -> &str {
        s.trim_start_matches([' ', '\t'])
    }
    // The end of a quoted string's text (its closing quote), `\` escaping the next byte.
    let closing_quote = |s: &str| {
        let mut escaped = false;
        s.bytes().position(|b| {
            let closes = b == b'"' && !escaped;
            escaped = b == b'\\' && !escaped;
            closes
        })
    };
    let kind = token(mime);
    let Some(subtype) = mime[kind..].strip_prefix('/').filter(|_| kind > 0) else {
        return false;
    };
    let length = token(subtype);
    if length == 0 {
        return false;
    }
    let mut rest = &subtype[length..];
    loop {
        rest = ows(rest);
        if rest.is_empty() {
            return true;
        }
        let Some(parameter) = rest.strip_prefix(';').map(ows) else {
            return false;
        };
        if parameter.is_empty() || parameter.starts_with(';') {
            rest = parameter;
            continue;
        }
        let name = token(parameter);
        let Some(value) = parameter[name..].strip_prefix('=').filter(|_| name > 0) else {
            return false;
        };
        rest = match value.strip_prefix('"') {
            Some(quoted) => match closing_quote(quoted) {
                Some(end) => &quoted[end + 1..],
                None => return false,
            },
            None => match token(value) {
                0 => return false,
                length => &value[length..],
            },
        };
    }
}

/// Whether media of type `mime` may be shown in the browser rather than saved: pictures (but
/// SVG, which may hold scripts), sound and video.
fn shown_inline(mime: &str) -> bool {
    if !is_media_type(mime) {
        return false;
    }
    let mime = mime.to_ascii_lowercase();
    let picture = mime.starts_with("image/") && !mime.contains("svg");
    picture || mime.starts_with("audio/") || mime.starts_with("video/")
}

/// The type a download is served with: the uploader's, but for the types a page would run or
/// apply from a URL of its origin (scripts, style sheets, WebAssembly), served as bytes. With
/// `nosniff` a browser then loads none of them as such: the web app's `script-src 'self'` would
/// otherwise admit a script anyone uploaded, should a page of the origin ever be made to
/// include it. A type that is not one media type (stored before uploads were checked for it)
/// is served as bytes too.
fn served_type(mime: &str) -> &str {
    if !is_media_type(mime) {
        return "application/octet-stream";
    }
    let essence = mime
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let runnable = ["javascript", "ecmascript", "jscript", "livescript"]
        .iter()
        .any(|script| essence.contains(script))
        || essence == "text/css"
        || essence == "application/wasm";
    if runnable {
        "application/octet-stream"
    } else {
        mime
    }
}

fn blob_path(sha256: &str) -> ObjectPath {
    ObjectPath::from(format!("blobs/{sha256}"))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!("media is limited to {limit} bytes"),
    )
}

fn over_quota(quota: u64, used: u64) -> ApiError {
    ApiError::new(
        ErrorCode::TooLarge,
        format!(
            "media quota exceeded: each user may keep {quota} bytes of uploads and yours hold \
             {used}; media no message references is deleted after a while"
        ),
    )
}

/// The id of `owner`'s upload of the bytes `sha256` as `mime`: the same upload again gets the
/// same id, any other upload (another user, another type) its own. Keyed with the store's
/// secret `key` ([`MessageStore::media_id_key`]): an id made of public facts alone (the
/// uploader, the type, the bytes' hash, as ids were before) let whoever knew a file's bytes
/// make its id and ask whether that user had uploaded it. Ids made before stay as stored.
fn upload_id(key: &[u8], owner: &str, mime: &str, sha256: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts any key length");
    for part in [owner, mime, sha256] {
        mac.update(part.as_bytes());
        mac.update(&[0]);
    }
    hex::encode(mac.finalize().into_bytes())
}

impl MediaService {
    /// Opens the configured object store (local directory or S3 bucket).
    pub fn open(
        config: MediaConfig,
        data_dir: &std::path::Path,
        store: MessageStore,
        chat: ChatBinding,
        metrics: Arc<Metrics>,
        health: Arc<StorageHealth>,
    ) -> anyhow::Result<Arc<Self>> {
        let staging_dir = config.local_dir(data_dir).map(|dir| dir.join(STAGING));
        let objects: Arc<dyn ObjectStore> = match config.local_dir(data_dir) {
            Some(dir) => {
                // Readable by the server's user alone (`courier_core::dirs`).
                courier_core::dirs::create_private(&dir)?;
                // Synced (files and their directories) before an upload is answered: bytes
                // left in the page cache would be lost by a power cut that their record,
                // committed by the store, outlives. A bucket is durable when it answers.
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
                Arc::new(local.with_fsync(true))
            }
            None => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(config.media_s3_bucket.clone().unwrap_or_default())
                    .build()?,
            ),
        };
        Ok(Arc::new(Self {
            objects,
            store,
            chat,
            metrics,
            health,
            staging_dir,
            id_key: Default::default(),
            uploads: tokio::sync::Semaphore::new(config.media_uploads_in_flight),
            uploaders: Default::default(),
            downloads: Arc::new(tokio::sync::Semaphore::new(
                config.media_downloads_in_flight,
            )),
            downloaders: Default::default(),
            read_outs: Arc::new(tokio::sync::Semaphore::new(config.media_uploads_in_flight)),
            config,
        }))
    }

    /// Streams an upload into storage, hashing as it goes; the same bytes are kept once.
    pub async fn upload(
        &self,
        who: &Identity,
        mime: &str,
        body: Body,
    ) -> Result<Uploaded, ApiError> {
        let stated = body.size_hint().lower();
        let mut stream = body.into_data_stream();
        let uploaded = self.receive(who, mime, stated, &mut stream).await;
        if uploaded.is_err() {
            self.read_out(stream);
        }
        uploaded
    }

    /// The refusal of an upload or a download (`transfer`) as one too many in flight: past the
    /// user's `per_user` (`rate_limited`), or past the node's bound (0: `unavailable`).
    fn refused(&self, transfer: &'static str, per_user: usize) -> ApiError {
        let limit = if per_user > 0 { "user" } else { "node" };
        self.metrics.media_refused(transfer, limit);
        if per_user > 0 {
            return ApiError {
                code: ErrorCode::RateLimited,
                message: format!("you have {per_user} {transfer}s in flight; retry once one ends"),
                retry_after_ms: Some(RETRY_AFTER_MS),
            };
        }
        ApiError::unavailable(
            format!("too many {transfer}s in flight on this server; retry shortly"),
            RETRY_AFTER_MS,
        )
    }

    /// How much longer an upload that has received `size` bytes, and waited `waited` for
    /// them, may wait for its next bytes before it is slower than `--media-upload-min-rate`
    /// (averaged from its start, [`UPLOAD_IDLE_TIMEOUT`] given free); `None` with no such
    /// rate. The idle timeout alone let a client holding an upload's place send a byte a
    /// minute, up to `--media-max-bytes`: for good.
    fn slow_upload_in(&self, size: u64, waited: Duration) -> Option<Duration> {
        let rate = self.config.media_upload_min_rate;
        if rate == 0 {
            return None;
        }
        let earned = Duration::from_millis(size.saturating_mul(1000) / rate);
        Some((UPLOAD_IDLE_TIMEOUT + earned).saturating_sub(waited))
    }

    /// The places of a download by `who` (`None`: a signed URL's, a CDN's for many users,
    /// bounded by the node's places alone).
    fn download_place(&self, who: Option<&str>) -> Result<DownloadPlace, ApiError> {
        let user = match who {
            Some(user) => Some(
                UserPlace::take(&self.downloaders, user, DOWNLOADS_IN_FLIGHT_PER_USER)
                    .ok_or_else(|| self.refused("download", DOWNLOADS_IN_FLIGHT_PER_USER))?,
            ),
            None => None,
        };
        let node = (self.downloads.clone().try_acquire_owned())
            .map_err(|_| self.refused("download", 0))?;
        self.metrics.media_downloads_in_flight.inc();
        Ok(DownloadPlace {
            _node: node,
            _user: user,
            metrics: self.metrics.clone(),
        })
    }

    /// Reads what is left of a refused upload's body, and throws it away, for at most
    /// [`REFUSED_BODY_READ_FOR`] (not when it has all been read, nor while every permit of
    /// `read_outs` is taken): its client is still sending while the refusal is answered, and a
    /// connection closed with bytes unread is reset, so its next write failed before it read
    /// the answer (a broken pipe, not 413 or 503 with when to retry). A client that reads the
    /// answer as it sends stops sending then.
    fn read_out(&self, stream: BodyDataStream) {
        if stream.is_end_stream() {
            return;
        }
        let Ok(place) = self.read_outs.clone().try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let thrown_away = stream.for_each(|_| std::future::ready(()));
            let _ = tokio::time::timeout(REFUSED_BODY_READ_FOR, thrown_away).await;
            drop(place);
        });
    }

    /// [`MediaService::upload`] of `stream`, whose length is at least `stated`; what it
    /// refuses leaves the rest of `stream` unread.
    async fn receive(
        &self,
        who: &Identity,
        mime: &str,
        stated: u64,
        stream: &mut BodyDataStream,
    ) -> Result<Uploaded, ApiError> {
        if mime.len() > 255 || !is_media_type(mime) {
            return Err(ApiError::bad_request(
                "Content-Type must be one MIME type such as image/jpeg (at most 255 characters)",
            ));
        }
        // A stated length (`Content-Length`) past the limit is refused before any place is
        // taken or byte read: streamed, it wasted the bytes and held a place until the limit.
        // The stream below is checked still (chunked uploads state no length). Not the quota:
        // the same upload again costs none of it (same id), which only its hash tells.
        if stated > self.config.media_max_bytes {
            return Err(too_large(self.config.media_max_bytes));
        }
        self.health.check_upload()?;
        // Both held until the upload ends, whichever way.
        let user_place = UserPlace::take(&self.uploaders, &who.user, UPLOADS_IN_FLIGHT_PER_USER);
        let _place =
            user_place.ok_or_else(|| self.refused("upload", UPLOADS_IN_FLIGHT_PER_USER))?;
        let _in_flight = (self.uploads.try_acquire()).map_err(|_| self.refused("upload", 0))?;
        let id_key = (self.id_key)
            .get_or_try_init(|| self.store.media_id_key())
            .await?;
        let staging = ObjectPath::from(format!(
            "{STAGING}/{}",
            hex::encode(rand::random::<[u8; 16]>())
        ));
        let upload = self
            .objects
            .put_multipart(&staging)
            .await
            .map_err(storage_error)?;
        let mut writer = WriteMultipart::new(upload);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        // Time spent waiting for the client's bytes (not for storage).
        let mut waited = Duration::ZERO;
        loop {
            let slow_in = self.slow_upload_in(size, waited);
            let wait = slow_in.map_or(UPLOAD_IDLE_TIMEOUT, |left| left.min(UPLOAD_IDLE_TIMEOUT));
            let asked = tokio::time::Instant::now();
            let next = tokio::time::timeout(wait, stream.next()).await;
            waited += asked.elapsed();
            let chunk = match next {
                Ok(None) => break,
                Ok(Some(Ok(chunk))) => chunk,
                Ok(Some(Err(e))) => {
                    let _ = writer.abort().await;
                    return Err(ApiError::bad_request(format!("upload interrupted: {e}")));
                }
                Err(_) if slow_in.is_some_and(|left| left < UPLOAD_IDLE_TIMEOUT) => {
                    let _ = writer.abort().await;
                    self.metrics.media_refused("upload", "slow");
                    return Err(ApiError::bad_request(format!(
                        "upload too slow: an upload must come at {} bytes a second at least, \
                         after its first {} s; upload again",
                        self.config.media_upload_min_rate,
                        UPLOAD_IDLE_TIMEOUT.as_secs()
                    )));
                }
                Err(_) => {
                    let _ = writer.abort().await;
                    return Err(ApiError::bad_request(format!(
                        "upload stalled: no bytes came for {} s; upload again",
                        UPLOAD_IDLE_TIMEOUT.as_secs()
                    )));
                }
            };
            size += chunk.len() as u64;
            if size > self.config.media_max_bytes {
                let _ = writer.abort().await;
                return Err(too_large(self.config.media_max_bytes));
            }
            // Checked for every chunk, not only at the start: uploads begun above the watermark
            // (many at once, each up to the size limit) would go on writing past it, into the
            // store's own margin when they share a filesystem.
            if let Err(e) = self.health.check_upload() {
                let _ = writer.abort().await;
                return Err(e);
            }
            hash.update(&chunk);
            if let Err(e) = writer.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                let _ = writer.abort().await;
                return Err(storage_error(e));
            }
            writer.put(chunk);
        }
        if size == 0 {
            let _ = writer.abort().await;
            return Err(ApiError::bad_request("empty upload"));
        }
        writer.finish().await.map_err(storage_error)?;
        let sha256 = hex::encode(hash.finalize());
        let media_id = upload_id(id_key, &who.user, mime, &sha256);
        let record = MediaRecord {
            mime: mime.to_owned(),
            size,
            sha256: sha256.clone(),
            created_ms: now_ms(),
            owner: who.user.clone(),
            shared_ms: 0,
        };
        if let Err(e) = self.keep(&staging, &media_id, &record).await {
            // Nothing keeps the staged bytes once their record or their move failed.
            let _ = self.objects.delete(&staging).await;
            return Err(e);
        }
        self.metrics.media_uploaded_bytes.inc_by(size);
        Ok(Uploaded {
            media_id,
            mime: record.mime,
            size,
            sha256,
        })
    }

    /// Records the upload staged at `staging` as `id`, then keeps its bytes under their hash
    /// (once: the same bytes staged again are dropped, unless those stored are of another
    /// size). The quota is decided by the record's
    /// commit (the same upload again costs nothing), before the bytes are kept; should keeping
    /// them fail, the record names missing bytes until the same upload is retried (same id) or
    /// the sweeper forgets it.
    async fn keep(
        &self,
        staging: &ObjectPath,
        id: &str,
        record: &MediaRecord,
    ) -> Result<(), ApiError> {
        let quota = self.config.media_quota_per_user;
        if let MediaAdmission::OverQuota { used } = self.store.put_media(id, record, quota).await? {
            return Err(over_quota(quota, used));
        }
        // Bytes of another size under the hash were cut (a power cut before uploads were
        // synced) or damaged since: the upload's replace them.
        let blob = blob_path(&record.sha256);
        match self.objects.head(&blob).await {
            Ok(stored) if stored.size == record.size => self.objects.delete(staging).await,
            _ => self.objects.rename(staging, &blob).await,
        }
        .map_err(storage_error)
    }

    /// The record of media `id` if `user` may read it: its uploader, or a user who may read a
    /// message sharing it (current or former member, by the membership rule). 404 otherwise,
    /// so ids cannot be probed.
    pub async fn readable(&self, user: &str, id: &str) -> Result<MediaRecord, ApiError> {
        let not_found = || ApiError::not_found(format!("no media {id}"));
        courier_proto::ids::media_id(id).map_err(|_| not_found())?;
        let record = self.store.media(id).await?.ok_or_else(not_found)?;
        if record.owner == user {
            return Ok(record);
        }
        // Only the references from the user's conversations: media the uploader sent to
        // 100,000 conversations must not cost every download 100,000 reads.
        for (conv, seq) in self.store.media_references_for(id, user).await? {
            let readable = match self.chat.readable(&conv, user).await {
                Ok(readable) => readable,
                // A user who never belonged to `conv`.
                Err(e) if matches!(e.code, ErrorCode::Forbidden | ErrorCode::NotFound) => continue,
                Err(e) => return Err(e),
            };
            if readable.visibility().contains(seq) {
                return Ok(record);
            }
        }
        Err(not_found())
    }

    /// The record of media `id` for a signed URL, if the signature holds and has not expired.
    pub async fn signed(
        &self,
        id: &str,
        expires: u64,
        signature: &str,
    ) -> Result<MediaRecord, ApiError> {
        let not_found = || ApiError::not_found(format!("no media {id}"));
        let secret = self
            .config
            .media_url_secret
            .as_deref()
            .ok_or_else(not_found)?;
        let signature = hex::decode(signature).map_err(|_| not_found())?;
        if expires < now_ms() / 1000 || sign(secret, id, expires).verify_slice(&signature).is_err()
        {
            return Err(not_found());
        }
        self.store.media(id).await?.ok_or_else(not_found)
    }

    /// A signed download path for media `id`, valid for the configured TTL.
    pub fn signed_path(&self, id: &str) -> Option<String> {
        let secret = self.config.media_url_secret.as_deref()?;
        let expires = now_ms() / 1000 + self.config.media_url_ttl.as_secs();
        let signature = hex::encode(sign(secret, id, expires).finalize().into_bytes());
        Some(format!(
            "/v1/media/{id}?expires={expires}&signature={signature}"
        ))
    }

    /// Streams media bytes to `who` (`None`: through a signed URL), honouring `Range` and
    /// `If-None-Match`, to be kept as `caching` says. A download holds a place of the node's
    /// (`--media-downloads-in-flight`) and of its user's ([`DOWNLOADS_IN_FLIGHT_PER_USER`])
    /// until its body is read or dropped; one more is refused, to retry: without a bound, each
    /// client reading slowly (or not at all, within `--http-write-timeout`) held an open file
    /// and its task, as many as it opened.
    pub async fn download(
        &self,
        who: Option<&str>,
        record: &MediaRecord,
        headers: &HeaderMap,
        caching: Caching,
    ) -> Result<Response, ApiError> {
        let etag = format!("\"{}\"", record.sha256);
        // Compared weakly (RFC 9110, 13.1.2): a cache that weakened the tag (`W/"..."`, as
        // one that compresses does) revalidates with it.
        let cached = headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .map(str::trim)
                    .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
            });
        let mut response = Response::builder()
            .header(header::ETAG, &etag)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::CACHE_CONTROL, caching.cache_control())
            // What a user uploaded never acts as a page of the origin it is served from (the
            // web app's, with `--web-dir`): no script runs in it, its type is taken as given,
            // and any type but pictures, sound and video is saved rather than shown.
            .header(
                header::CONTENT_SECURITY_POLICY,
                "sandbox; default-src 'none'",
            )
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .header(
                header::CONTENT_DISPOSITION,
                if shown_inline(&record.mime) {
                    "inline"
                } else {
                    "attachment"
                },
            );
        if cached {
            return response
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .map_err(storage_error);
        }
        let asked = headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .filter(|_| range_applies(headers, &etag));
        let range = match asked.map(|value| parse_range(value, record.size)) {
            Some(Ranged::Part(range)) => Some(range),
            Some(Ranged::Unsatisfiable) => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{}", record.size))],
                )
                    .into_response());
            }
            Some(Ranged::Whole) | None => None,
        };
        let place = self.download_place(who)?;
        let options = GetOptions {
            range: range.clone().map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let object = self
            .objects
            .get_opts(&blob_path(&record.sha256), options)
            .await
            .map_err(storage_error)?;
        let mime = HeaderValue::from_str(served_type(&record.mime))
            .unwrap_or(HeaderValue::from_static("application/octet-stream"));
        response = response.header(header::CONTENT_TYPE, mime);
        response = match range {
            Some(range) => response
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {}-{}/{}", range.start, range.end - 1, record.size),
                )
                .header(header::CONTENT_LENGTH, range.end - range.start),
            None => response
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, record.size),
        };
        response
            .body(Body::from_stream(object.into_stream().map(move |chunk| {
                let _held = &place;
                chunk
            })))
            .map_err(storage_error)
    }

    /// Deletes media records that no message references and that were last uploaded or shared
    /// more than the TTL ago, and their bytes once no record keeps them. Returns how many were
    /// deleted.
    pub async fn sweep(&self) -> Result<u64, StoreError> {
        let cutoff = now_ms().saturating_sub(self.config.media_unreferenced_ttl.as_millis() as u64);
        self.settle_left_aside().await?;
        self.settle_staged().await;
        self.settle_forgotten().await?;
        let mut swept = 0;
        let mut after: Option<String> = None;
        loop {
            let page = self.store.media_ids(after.as_deref(), SWEEP_PAGE).await?;
            let Some(last) = page.last().cloned() else {
                return Ok(swept);
            };
            for id in page {
                let Some(record) = self.store.media(&id).await? else {
                    continue;
                };
                if record.latest_use_ms() > cutoff || self.store.is_media_referenced(&id).await? {
                    continue;
                }
                match self.store.forget_media(&id, &record).await {
                    // Uploaded or shared by a send meanwhile: kept.
                    Err(StoreError::FenceChanged { .. }) => continue,
                    other => other?,
                }
                swept += 1;
                self.settle_forgotten_blob(&id, &record).await?;
            }
            after = Some(last);
        }
    }

    /// Settles the bytes of the records an earlier sweep forgot and did not get to (a failure
    /// or a crash between the forget and the bytes' deletion).
    async fn settle_forgotten(&self) -> Result<(), StoreError> {
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .forgotten_media(after.as_deref(), SWEEP_PAGE)
                .await?;
            let Some((last, _)) = page.last() else {
                return Ok(());
            };
            after = Some(last.clone());
            for (id, record) in &page {
                self.settle_forgotten_blob(id, record).await?;
            }
        }
    }

    /// Deletes the bytes of forgotten media record `id` unless a record keeps them, then
    /// clears the note that it was forgotten; the note stays, for the next sweep, when the
    /// bytes could not be moved.
    async fn settle_forgotten_blob(
        &self,
        id: &str,
        record: &MediaRecord,
    ) -> Result<(), StoreError> {
        if self.delete_unused_blob(&record.sha256).await? {
            self.store.settled_forgotten_media(id, record).await?;
        }
        Ok(())
    }

    /// Deletes the bytes `sha256` if no media record keeps them. An upload of the same bytes
    /// may record itself at any moment and then, finding the bytes stored, not store them
    /// again ([`MediaService::keep`]): so the bytes are first moved aside (under `trash/`),
    /// then the records are looked at again, and the bytes moved back if one appeared
    /// meanwhile. An upload recorded after the move finds no bytes and stores its own. Bytes
    /// left aside (a crash, a failed call) are settled by a later sweep
    /// ([`MediaService::settle_left_aside`]). Returns whether the bytes are settled: `false`
    /// when they could not be moved aside.
    async fn delete_unused_blob(&self, sha256: &str) -> Result<bool, StoreError> {
        if self.store.blob_in_use(sha256).await? {
            return Ok(true);
        }
        // Each move aside has its own path: two sweepers (a paused leader resuming) each
        // settle only their own.
        let aside = ObjectPath::from(format!(
            "{TRASH}/{sha256}.{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        match self.objects.rename(&blob_path(sha256), &aside).await {
            Ok(()) => self.settle_aside(&aside, sha256).await.map(|()| true),
            Err(object_store::Error::NotFound { .. }) => Ok(true),
            Err(e) => {
                tracing::warn!(sha256, error = %e, "could not delete media bytes; the next sweep tries again");
                Ok(false)
            }
        }
    }

    /// Deletes the bytes `sha256` moved aside to `aside`, or moves them back when a media
    /// record keeps them now.
    async fn settle_aside(&self, aside: &ObjectPath, sha256: &str) -> Result<(), StoreError> {
        let settled = if self.store.blob_in_use(sha256).await? {
            self.objects.rename(aside, &blob_path(sha256)).await
        } else {
            self.objects.delete(aside).await
        };
        if let Err(e) = settled
            && !matches!(e, object_store::Error::NotFound { .. })
        {
            tracing::warn!(sha256, error = %e, "could not settle media bytes moved aside; the next sweep tries again");
        }
        Ok(())
    }

    /// Settles the bytes a sweep left aside ([`MediaService::delete_unused_blob`]) once they
    /// have been aside for three sweep intervals (a sweep's lead). A move aside may still be
    /// under way in another sweeper (a paused leader resuming): on S3 a move is a copy, then
    /// the delete of the source, and bytes this sweep moved back between the two would be
    /// deleted by the other's second step, while the other finds nothing left to move back.
    /// (A local directory's rename is atomic, and keeps the file's time, the bytes' upload,
    /// older than the TTL for bytes no record keeps: there, the next sweep settles them.)
    async fn settle_left_aside(&self) -> Result<(), StoreError> {
        let grace = self.config.media_sweep_interval.saturating_mul(3);
        let settled_before = now_ms().saturating_sub(grace.as_millis() as u64);
        let mut aside = self.objects.list(Some(&ObjectPath::from(TRASH)));
        while let Some(entry) = aside.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(error = %e, "could not list media bytes moved aside");
                    return Ok(());
                }
            };
            if u64::try_from(entry.last_modified.timestamp_millis())
                .is_ok_and(|modified| modified > settled_before)
            {
                continue;
            }
            let sha256 = entry
                .location
                .filename()
                .and_then(|name| name.split_once('.'))
                .map(|(sha256, _)| sha256.to_owned());
            if let Some(sha256) = sha256 {
                self.settle_aside(&entry.location, &sha256).await?;
            }
        }
        Ok(())
    }

    /// Deletes the bytes staged by uploads that a crash or a kill cut (a node stopped past its
    /// drain deadline: nothing aborted them), once untouched for [`STAGING_GRACE`]: an upload
    /// under way writes its staged file at each part (5 MiB) and waits at most
    /// [`UPLOAD_IDLE_TIMEOUT`] for its next bytes. A local directory is read itself, as
    /// `object_store` does not list a part written midway (`<name>#<n>`); in a bucket, a
    /// multipart upload never completed is no object (a lifecycle rule aborts it,
    /// `docs/media-and-push.md`). Failures are logged: the next sweep tries again.
    async fn settle_staged(&self) {
        let before_ms = now_ms().saturating_sub(STAGING_GRACE.as_millis() as u64);
        if let Some(dir) = self.staging_dir.clone() {
            let before = std::time::UNIX_EPOCH + Duration::from_millis(before_ms);
            let deleted = tokio::task::spawn_blocking(move || delete_older(&dir, before)).await;
            if let Err(e) = deleted.map_err(std::io::Error::other).and_then(|r| r) {
                tracing::warn!(error = %e, "could not delete media bytes staged by cut uploads");
            }
            return;
        }
        let mut staged = self.objects.list(Some(&ObjectPath::from(STAGING)));
        while let Some(entry) = staged.next().await {
            let deleted = match entry {
                Ok(entry)
                    if u64::try_from(entry.last_modified.timestamp_millis())
                        .is_ok_and(|modified| modified < before_ms) =>
                {
                    self.objects.delete(&entry.location).await
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = deleted
                && !matches!(e, object_store::Error::NotFound { .. })
            {
                tracing::warn!(error = %e, "could not delete media bytes staged by cut uploads");
                return;
            }
        }
    }

    /// Sweeps every `--media-sweep-interval` until `loops` shuts down, when this node leads
    /// the media sweep (one node of a cluster at a time, `courier_store::leaders`).
    pub fn start_sweeper(self: &Arc<Self>, loops: &BackgroundLoops, lead: JobLead) {
        let media = self.clone();
        loops.spawn("media sweeper", move |cancel| {
            let (media, lead) = (media.clone(), lead.clone());
            async move {
                cancel.run_until_cancelled(media.sweep_every(&lead)).await;
            }
        });
    }

    async fn sweep_every(&self, lead: &JobLead) {
        let interval = self.config.media_sweep_interval;
        loop {
            tokio::time::sleep(interval).await;
            if !lead.runs_pass(interval).await {
                continue;
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(swept) => {
                    self.metrics.media_swept.inc_by(swept);
                    tracing::info!(swept, "media sweep");
                }
                Err(e) => tracing::warn!(error = %e, "media sweep failed; will retry"),
            }
        }
    }
}

/// Deletes the files of `dir` last modified before `before` (none when `dir` is missing).
fn delete_older(dir: &std::path::Path, before: std::time::SystemTime) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        entries => entries?,
    };
    for entry in entries {
        let entry = entry?;
        let metadata = entry.metadata()?;
        if !metadata.is_file() || metadata.modified()? >= before {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

fn sign(secret: &str, id: &str, expires: u64) -> Hmac<Sha256> {
    // HMAC takes keys of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts any key length");
    mac.update(format!("{id}:{expires}").as_bytes());
    mac
}

/// What a `Range` header asks of an object (RFC 9110, 14.2).
#[derive(Debug, PartialEq)]
enum Ranged {
    /// The whole object (200): no range this server serves was asked for.
    Whole,
    /// These bytes (206).
    Part(std::ops::Range<u64>),
    /// A range of bytes that starts past the end (416).
    Unsatisfiable,
}

/// Parses a `Range` header against an object of `size` bytes (never 0: empty uploads are
/// refused). One range of bytes is served; another unit, several ranges (as S3 does) and a
/// malformed range are ignored, so the client gets the whole object rather than an error (a
/// server must ignore a unit it does not understand, and may ignore the rest). A position past
/// `u64::MAX` is still a position: past the end of any object.
fn parse_range(value: &str, size: u64) -> Ranged {
    let position = |digits: &str| {
        (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| digits.parse().unwrap_or(u64::MAX))
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ranged::Whole;
    };
    let Some((first, last)) = spec.split_once('-').filter(|_| !spec.contains(',')) else {
        return Ranged::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let (start, end) = match (first, position(first), position(last)) {
        // The last `n` bytes (all of them when there are fewer).
        ("", _, Some(0)) => return Ranged::Unsatisfiable,
        ("", _, Some(n)) => (size.saturating_sub(n), size - 1),
        (_, Some(start), None) if last.is_empty() => (start, size - 1),
        (_, Some(start), Some(end)) if start <= end => (start, end.min(size - 1)),
        _ => return Ranged::Whole,
    };
    if start < size {
        Ranged::Part(start..end + 1)
    } else {
        Ranged::Unsatisfiable
    }
}

/// Whether the range asked may be served: without `If-Range`, or with one naming this very
/// object (`etag`). Any other validator (another ETag, a date: no `Last-Modified` is sent)
/// names another version, and the whole object is served (RFC 9110, 13.1.5).
fn range_applies(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get(header::IF_RANGE)
        .is_none_or(|v| v.to_str().is_ok_and(|v| v.trim() == etag))
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_chat::Chat;
    use courier_chat::receipts::ReceiptRelay;
    use courier_core::context::Context;
    use courier_core::gateways::NoGateways;
    use courier_core::membership::MembershipCache;
    use courier_core::sequencing::{PendingAppend, PendingTrim, Sequencer};
    use courier_store::faulty_engine::FaultyEngine;
    use courier_store::ownership::Duty;
    use courier_store::{Append, HeadCache, MediaReference, ShardLease};

    const TTL: Duration = Duration::from_secs(24 * 3600);

    /// Sequences every append at once, as the owner of every shard.
    struct Sequencing {
        store: MessageStore,
        leases: Vec<ShardLease>,
    }

    impl Sequencer for Sequencing {
        fn submit(&self, append: Append) -> PendingAppend {
            let store = self.store.clone();
            let lease = self.leases[store.shard_of(&append.conversation_id) as usize];
            Box::pin(async move {
                let mut heads = HeadCache::default();
                let mut results = store.append(lease, &mut heads, &[append]).await?;
                Ok(results.remove(0)?)
            })
        }

        fn trim(&self, _: &str, _: u64, _: Vec<MediaReference>) -> PendingTrim {
            Box::pin(async { Ok(0) })
        }
    }

    /// The media role over `engine`, its bytes under `dir`, with a chat role whose sends are
    /// sequenced at once (the sweeper's TTL [`TTL`]).
    async fn media_over(engine: &Arc<FaultyEngine>, dir: &std::path::Path) -> Arc<MediaService> {
        media_on(engine.store(4).await, dir).await
    }

    /// The media role as [`media_over`] does, over a store of two partitions (shards 0-1 and
    /// 2-3), one on each engine.
    async fn media_over_partitions(
        engines: &[Arc<FaultyEngine>; 2],
        dir: &std::path::Path,
    ) -> Arc<MediaService> {
        let table = courier_store::PartitionTable::parse(
            r#"{"partitions": [
                {"shards": [0, 1], "store_address": "http://127.0.0.1:7400"},
                {"shards": [2, 3], "store_address": "http://127.0.0.1:7401"}]}"#,
            4,
        )
        .unwrap();
        let engines = engines
            .iter()
            .map(|e| e.clone() as Arc<dyn courier_store::KvEngine>)
            .collect();
        let store = MessageStore::open_partitioned(engines, &table, b"", 4)
            .await
            .unwrap();
        media_on(store, dir).await
    }

    async fn media_on(store: MessageStore, dir: &std::path::Path) -> Arc<MediaService> {
        let health = StorageHealth::new(store.clone(), None, 0, None, 0);
        media_watched(store, dir, health).await
    }

    /// The media role as [`media_on`] builds it, its free space watched by `health`.
    async fn media_watched(
        store: MessageStore,
        dir: &std::path::Path,
        health: Arc<StorageHealth>,
    ) -> Arc<MediaService> {
        let leases = store
            .acquire_shards(Duty::Sequencing, "test", &[0, 1, 2, 3], 4, 0, u64::MAX)
            .await
            .unwrap();
        let context = Context {
            store: store.clone(),
            gateways: Arc::new(NoGateways),
            membership: Arc::new(MembershipCache::new(store.clone())),
            metrics: Arc::new(Metrics::new()),
        };
        let sequencer = Arc::new(Sequencing {
            store: store.clone(),
            leases,
        });
        let receipts = ReceiptRelay::new(&context, 100);
        let limits = courier_chat::ChatLimits {
            media_unreferenced_ttl: TTL,
            ..Default::default()
        };
        let chat = Chat::new(context, sequencer, receipts, limits, health.clone());
        let config = MediaConfig {
            media_max_bytes: 1024,
            media_quota_per_user: 0,
            media_uploads_in_flight: 16,
            media_upload_min_rate: 1024,
            media_downloads_in_flight: 64,
            media_dir: None,
            media_min_free_disk: 0,
            media_s3_bucket: None,
            media_unreferenced_ttl: TTL,
            media_sweep_interval: Duration::from_secs(600),
            media_url_secret: None,
            media_url_ttl: Duration::from_secs(3600),
        };
        let chat = ChatBinding::Local(Arc::new(chat));
        MediaService::open(config, dir, store, chat, Arc::new(Metrics::new()), health).unwrap()
    }

    /// Makes the store's key of media ids, as the first upload does: for a test of what
    /// comes after it in an upload (a fault in a commit, a pause of time).
    async fn id_key_made(media: &MediaService) {
        let key = media.id_key.get_or_try_init(|| media.store.media_id_key());
        key.await.unwrap();
    }

    fn user(name: &str) -> Identity {
        Identity {
            user: name.into(),
            device: "phone".into(),
            issued_at_ms: 0,
        }
    }

    /// Alice's upload of an image, its record as if uploaded `ago` before now.
    async fn upload_made(media: &MediaService, ago: Duration) -> (String, MediaRecord) {
        let uploaded = media
            .upload(&user("alice"), "image/png", Body::from(vec![7u8; 10]))
            .await
            .unwrap();
        let mut record = media
            .store
            .media(&uploaded.media_id)
            .await
            .unwrap()
            .unwrap();
        record.created_ms = now_ms() - ago.as_millis() as u64;
        media
            .store
            .put_media(&uploaded.media_id, &record, 0)
            .await
            .unwrap();
        (uploaded.media_id, record)
    }

    fn picture_to(peer: &str, media_id: &str) -> courier_proto::Send {
        let picture = courier_proto::Media {
            media_id: media_id.into(),
            mime: "image/png".into(),
            size: 10,
            sha256: String::new(),
            name: None,
            caption: None,
        };
        courier_proto::Send {
            reference: None,
            conversation_id: None,
            to_user: Some(peer.into()),
            client_msg_id: "m".into(),
            body: courier_proto::Body::Media(Box::new(picture)),
            reply_to: None,
        }
    }

    /// A send that shares old, unreferenced media after the sweeper found it so, and before
    /// the sweeper forgets it, keeps it: bob may download what alice sent him.
    #[tokio::test]
    async fn a_send_between_the_sweepers_check_and_its_forget_keeps_the_media() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let (id, record) = upload_made(&media, 2 * TTL).await;
        // The sweeper's first commit is its forget: the send commits just before it.
        let (chat, send) = (media.chat.clone(), picture_to("bob", &id));
        engine.before_next_commit(Box::pin(async move {
            let (_, sent) = chat.submit_send(&user("alice"), &send).await.unwrap();
            sent.await.unwrap();
        }));
        assert_eq!(media.sweep().await.unwrap(), 0);
        assert_eq!(media.store.media_references(&id).await.unwrap().len(), 1);
        assert_eq!(
            media.readable("bob", &id).await.unwrap().sha256,
            record.sha256
        );
        assert!(media.objects.head(&blob_path(&record.sha256)).await.is_ok());
    }

    /// An upload of the same bytes between the sweeper's finding them kept by no record and
    /// its deleting them (a paused sweeper resuming, or plain bad luck) keeps them: the
    /// upload was answered 201, so its bytes must stay downloadable.
    #[tokio::test]
    async fn an_upload_of_the_same_bytes_while_the_sweeper_deletes_them_keeps_them() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let (_, record) = upload_made(&media, 2 * TTL).await;
        // The sweeper's first commit forgets alice's record; its next read finds no record
        // keeping the bytes; bob uploads the same bytes right after that read.
        let (racer, reads) = (media.clone(), engine.clone());
        let uploaded = Arc::new(std::sync::Mutex::new(None));
        let bobs = uploaded.clone();
        engine.before_next_commit(Box::pin(async move {
            reads.after_next_read(Box::pin(async move {
                let body = Body::from(vec![7u8; 10]);
                let upload = racer.upload(&user("bob"), "image/png", body).await;
                *bobs.lock().unwrap() = Some(upload.unwrap().media_id);
            }));
        }));
        assert_eq!(media.sweep().await.unwrap(), 1, "alice's upload swept");
        let bobs = uploaded.lock().unwrap().take().expect("bob uploaded");
        let kept = media.readable("bob", &bobs).await.unwrap();
        assert_eq!(kept.sha256, record.sha256);
        assert!(
            media.objects.head(&blob_path(&record.sha256)).await.is_ok(),
            "bob's upload lost its bytes"
        );
        // Nothing is left aside either.
        assert_eq!(media.sweep().await.unwrap(), 0);
        let aside: Vec<_> = media
            .objects
            .list(Some(&ObjectPath::from("trash")))
            .collect()
            .await;
        assert!(aside.is_empty(), "{aside:?}");
    }

    /// An object store whose rename is a copy, then the delete of the source, as on S3; a
    /// hook, set once, runs after the next copy of bytes into `trash/` (between the two steps
    /// of a move aside).
    #[derive(Default)]
    struct CopyThenDelete {
        inner: object_store::memory::InMemory,
        after_copy_aside: std::sync::Mutex<Option<futures::future::BoxFuture<'static, ()>>>,
    }

    impl std::fmt::Debug for CopyThenDelete {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CopyThenDelete")
        }
    }

    impl std::fmt::Display for CopyThenDelete {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("CopyThenDelete")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for CopyThenDelete {
        async fn put_opts(
            &self,
            location: &ObjectPath,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &ObjectPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &ObjectPath,
            options: GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjectPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjectPath>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjectPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy_opts(
            &self,
            from: &ObjectPath,
            to: &ObjectPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await?;
            if to.as_ref().starts_with("trash/") {
                let hook = self.after_copy_aside.lock().unwrap().take();
                if let Some(hook) = hook {
                    hook.await;
                }
            }
            Ok(())
        }
    }

    /// On S3 a move aside is a copy, then a delete. A second sweeper (a paused leader
    /// resuming) that starts between the two steps, after an upload of the same bytes found
    /// them still in place, must not move them back itself: the first sweeper's delete would
    /// then remove them, and its own move back would find nothing. The upload, answered 201,
    /// keeps its bytes.
    #[tokio::test]
    async fn bytes_moved_back_by_a_second_sweeper_during_an_s3_move_aside_are_kept() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let local = media_over(&engine, dir.path()).await;
        let objects = Arc::new(CopyThenDelete::default());
        let media = Arc::new(MediaService {
            objects: objects.clone(),
            ..Arc::into_inner(local).unwrap()
        });
        let (_, record) = upload_made(&media, 2 * TTL).await;
        let uploaded = Arc::new(std::sync::Mutex::new(None));
        let (racer, bobs) = (media.clone(), uploaded.clone());
        *objects.after_copy_aside.lock().unwrap() = Some(Box::pin(async move {
            let body = Body::from(vec![7u8; 10]);
            let upload = racer.upload(&user("bob"), "image/png", body).await;
            *bobs.lock().unwrap() = Some(upload.unwrap().media_id);
            racer.sweep().await.unwrap();
        }));
        assert_eq!(media.sweep().await.unwrap(), 1, "alice's upload swept");
        let bobs = uploaded.lock().unwrap().take().expect("bob uploaded");
        assert_eq!(
            media.readable("bob", &bobs).await.unwrap().sha256,
            record.sha256
        );
        assert!(
            media.objects.head(&blob_path(&record.sha256)).await.is_ok(),
            "bob's upload lost its bytes"
        );
    }

    /// A sweep cut after it forgot a record and before it deleted its bytes (here the
    /// forget's second step, which clears the media's references in every partition, fails)
    /// leaves no bytes behind for good: a later sweep deletes them, though the record is gone.
    #[tokio::test]
    async fn bytes_a_sweep_cut_short_forgot_are_deleted_by_a_later_sweep() {
        let (engines, dir) = (
            [FaultyEngine::new(), FaultyEngine::new()],
            tempfile::tempdir().unwrap(),
        );
        let media = media_over_partitions(&engines, dir.path()).await;
        let (id, record) = upload_made(&media, 2 * TTL).await;
        engines[1].set_fault(Some(Box::new(|_| {
            Some(StoreError::Engine("partition 1 unreachable".into()))
        })));
        assert!(media.sweep().await.is_err());
        assert_eq!(media.store.media(&id).await.unwrap(), None, "forgotten");
        engines[1].set_fault(None);
        media.sweep().await.unwrap();
        assert!(
            media
                .objects
                .head(&blob_path(&record.sha256))
                .await
                .is_err(),
            "the bytes of a forgotten record are left for good"
        );
        let notes = media.store.forgotten_media(None, 10).await.unwrap();
        assert!(notes.is_empty(), "{notes:?}");
    }

    /// An upload unreferenced for longer than the TTL is swept, unless a send shared it
    /// within the TTL.
    #[tokio::test]
    async fn media_is_swept_a_ttl_after_its_latest_upload_or_share() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let (id, record) = upload_made(&media, 2 * TTL).await;
        let shared_at = now_ms() - TTL.as_millis() as u64 / 2;
        media
            .store
            .share_media(&id, &record, shared_at)
            .await
            .unwrap();
        assert_eq!(media.sweep().await.unwrap(), 0, "shared half a TTL ago");
        let shared = media.store.media(&id).await.unwrap().unwrap();
        let unshared = MediaRecord {
            shared_ms: now_ms() - 2 * TTL.as_millis() as u64,
            ..shared
        };
        media.store.put_media(&id, &unshared, 0).await.unwrap();
        assert_eq!(media.sweep().await.unwrap(), 1, "unused for two TTLs");
        assert_eq!(media.store.media(&id).await.unwrap(), None);
    }

    /// A trim that cleared messages but not their references (as a sequencer node of a
    /// version before trims took them did, ignoring those a newer retention sent it) left
    /// references whose messages are gone. They grant no download, and the sweeper clears
    /// them instead of keeping the media for them: it keeps media only for a retained message.
    #[tokio::test]
    async fn references_whose_messages_were_trimmed_keep_no_media() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let (id, record) = upload_made(&media, 2 * TTL).await;
        for client_msg_id in ["first", "second"] {
            let send = courier_proto::Send {
                client_msg_id: client_msg_id.into(),
                ..picture_to("bob", &id)
            };
            let (_, sent) = media.chat.submit_send(&user("alice"), &send).await.unwrap();
            sent.await.unwrap();
        }
        let references = media.store.media_references(&id).await.unwrap();
        let [(conv, first), (_, second)] = &references[..] else {
            panic!("one reference per message: {references:?}");
        };
        let trim_without_references = |floor: u64| {
            let (store, conv) = (media.store.clone(), conv.clone());
            async move {
                let shard = store.shard_of(&conv);
                let lease = store
                    .acquire_shards(Duty::Sequencing, "test", &[shard], 1, 0, u64::MAX)
                    .await
                    .unwrap()[0];
                store.trim(lease, &conv, floor, &[]).await.unwrap();
            }
        };
        trim_without_references(first + 1).await;
        // Unused for two TTLs again (the sends marked it shared).
        media.store.put_media(&id, &record, 0).await.unwrap();
        assert_eq!(
            media.sweep().await.unwrap(),
            0,
            "the second message keeps it"
        );
        assert_eq!(
            media.store.media_references(&id).await.unwrap(),
            [(conv.clone(), *second)],
            "the first message's reference was cleared"
        );

        trim_without_references(second + 1).await;
        assert_eq!(
            media.readable("bob", &id).await.unwrap_err().code,
            ErrorCode::NotFound,
            "no message bob may read shares it"
        );
        assert_eq!(media.sweep().await.unwrap(), 1, "nothing keeps it");
        assert!(media.store.media_references(&id).await.unwrap().is_empty());
        assert!(
            media
                .objects
                .head(&blob_path(&record.sha256))
                .await
                .is_err()
        );
    }

    /// An upload is answered 201 only once its bytes are on disk. Without fsync they sat in
    /// the page cache: a power cut lost them while their record, committed by the store
    /// (which syncs), outlived it and named bytes that were gone or cut short; a later upload
    /// of the same bytes, finding a file under their hash, kept it as it was.
    #[tokio::test]
    async fn local_media_bytes_are_synced_before_an_upload_is_answered() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        // `LocalFileSystem` says whether it syncs only in its `Debug` form.
        let objects = format!("{:?}", media.objects);
        assert!(objects.contains("fsync: true"), "{objects}");
    }

    /// A client that stops sending midway without closing its connection (a phone that lost
    /// its network: no FIN, no RST) has its upload ended once no byte came for
    /// [`UPLOAD_IDLE_TIMEOUT`], and nothing is left staged. The upload held its task, its
    /// staged file and its buffered part (up to 5 MiB) for good.
    #[tokio::test(start_paused = true)]
    async fn an_upload_whose_client_stops_sending_is_ended_and_leaves_nothing_staged() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        id_key_made(&media).await;
        let first = futures::stream::iter([Ok::<_, std::io::Error>(vec![7u8; 10])]);
        let body = Body::from_stream(first.chain(futures::stream::pending()));
        let alice = user("alice");
        let upload = media.upload(&alice, "image/png", body);
        let ended = tokio::time::timeout(10 * UPLOAD_IDLE_TIMEOUT, upload)
            .await
            .expect("the upload waits for its client for good");
        assert_eq!(ended.unwrap_err().code, ErrorCode::BadRequest);
        let staged: Vec<_> = std::fs::read_dir(dir.path().join("media/staging"))
            .map(|files| files.collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "{staged:?}");
    }

    /// An upload whose client keeps sending, but a few bytes a minute, is ended once it falls
    /// below `--media-upload-min-rate` (after its first minute), and nothing is left staged:
    /// within the idle timeout it held its place (of a few per user and per node, with its
    /// buffered part and staged file) for as long as its client liked.
    #[tokio::test(start_paused = true)]
    async fn an_upload_slower_than_the_least_rate_is_ended_and_leaves_nothing_staged() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        id_key_made(&media).await;
        // Ten bytes at once, then ten more every 50 s: within the idle timeout, far below the
        // rate.
        let trickle = futures::stream::unfold(true, |first| async move {
            if !first {
                tokio::time::sleep(Duration::from_secs(50)).await;
            }
            Some((Ok::<_, std::io::Error>(vec![7u8; 10]), false))
        });
        let alice = user("alice");
        let upload = media.upload(&alice, "image/png", Body::from_stream(trickle));
        let ended = tokio::time::timeout(10 * UPLOAD_IDLE_TIMEOUT, upload)
            .await
            .expect("the upload goes on as long as its client sends");
        let refused = ended.unwrap_err();
        assert_eq!(refused.code, ErrorCode::BadRequest);
        assert!(refused.message.contains("too slow"), "{}", refused.message);
        let staged: Vec<_> = std::fs::read_dir(dir.path().join("media/staging"))
            .map(|files| files.collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "{staged:?}");
    }

    /// An upload under way when the media disk runs low is refused from then on, as a new one
    /// is: uploads begun above the watermark (many at once, each up to the size limit) went on
    /// writing past it, and into the store's own margin when they share a filesystem.
    #[tokio::test]
    async fn an_upload_under_way_when_the_disk_runs_low_is_refused() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let store = engine.store(4).await;
        // Any disk is low against this watermark, once sampled (not yet: space counts as
        // plenty before the first sample).
        let media_dir = dir.path().join("media");
        std::fs::create_dir_all(&media_dir).unwrap();
        let health = StorageHealth::new(store.clone(), None, 0, Some(media_dir), u64::MAX);
        let media = media_watched(store, dir.path(), health.clone()).await;
        let loops = BackgroundLoops::new();
        let chunks = futures::stream::iter(0..3).map(move |i| {
            if i == 1 {
                // The first sample, between the first bytes and the rest.
                health.start(&loops);
            }
            Ok::<_, std::io::Error>(vec![7u8; 10])
        });
        let refused = media
            .upload(&user("alice"), "image/png", Body::from_stream(chunks))
            .await;
        assert_eq!(refused.unwrap_err().code, ErrorCode::Unavailable);
        let staged: Vec<_> = std::fs::read_dir(dir.path().join("media/staging"))
            .map(|files| files.collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "{staged:?}");
    }

    /// Bytes staged by uploads that a crash or a kill cut (a node stopped past its drain
    /// deadline: nothing aborts them) are deleted by a sweep once untouched for
    /// [`STAGING_GRACE`], both a part written midway (`<id>#1`, which `object_store` lists
    /// not) and a finished one that was not yet kept; a younger one, maybe an upload under
    /// way, is left. They were left for good.
    #[tokio::test]
    async fn bytes_staged_by_uploads_a_crash_cut_are_deleted_by_a_sweep() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let staging = dir.path().join("media/staging");
        std::fs::create_dir_all(&staging).unwrap();
        let stale = std::time::SystemTime::now() - STAGING_GRACE - Duration::from_secs(60);
        for (name, modified) in [
            ("cut-midway#1", stale),
            ("finished-not-kept", stale),
            ("under-way#1", std::time::SystemTime::now()),
        ] {
            let file = std::fs::File::create(staging.join(name)).unwrap();
            file.set_modified(modified).unwrap();
        }
        assert_eq!(media.sweep().await.unwrap(), 0);
        let mut left: Vec<_> = std::fs::read_dir(&staging)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["under-way#1"]);
    }

    /// Uploads in flight on a node are bounded (`--media-uploads-in-flight`): each holds up
    /// to three 5 MiB parts in memory, and a few hundred at once (a script, a busy hour) took
    /// all of it, until the kernel killed the process and every send in flight with it. One
    /// past the bound is answered `unavailable` at once, to retry; an upload that ends frees
    /// its place.
    #[tokio::test]
    async fn uploads_past_the_bound_in_flight_are_refused_until_one_ends() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let local = media_over(&engine, dir.path()).await;
        let media = Arc::new(MediaService {
            uploads: tokio::sync::Semaphore::new(1),
            ..Arc::into_inner(local).unwrap()
        });
        // Alice's upload: its first bytes, then the rest once `finish` says so.
        let (read, first_read) = tokio::sync::oneshot::channel();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let mut read = Some(read);
        let first = futures::stream::iter([vec![1u8; 10]]).map(move |bytes| {
            if let Some(read) = read.take() {
                let _ = read.send(());
            }
            Ok::<_, std::io::Error>(bytes)
        });
        let rest = futures::stream::once(finished).filter_map(|_| async { None });
        let body = Body::from_stream(first.chain(rest));
        let uploading = tokio::spawn({
            let media = media.clone();
            async move { media.upload(&user("alice"), "image/png", body).await }
        });
        first_read.await.unwrap();
        let bobs = || Body::from(vec![2u8; 10]);
        let refused = media.upload(&user("bob"), "image/png", bobs()).await;
        assert_eq!(refused.unwrap_err().code, ErrorCode::Unavailable);
        finish.send(()).unwrap();
        uploading.await.unwrap().unwrap();
        media
            .upload(&user("bob"), "image/png", bobs())
            .await
            .unwrap();
    }

    /// An upload whose `Content-Length` already passes `--media-max-bytes` is refused 413 at
    /// once, before it takes a place in flight: it was streamed until the limit was reached,
    /// its bytes wasted and a place of `--media-uploads-in-flight` held meanwhile (here the
    /// only place is taken, and it was answered `unavailable`).
    #[tokio::test]
    async fn an_upload_whose_length_passes_the_limit_is_refused_at_once() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let local = media_over(&engine, dir.path()).await;
        let media = Arc::new(MediaService {
            uploads: tokio::sync::Semaphore::new(0),
            ..Arc::into_inner(local).unwrap()
        });
        let max = media.config.media_max_bytes as usize;
        // `Body::from` knows its length, as hyper's body knows a `Content-Length`.
        let refused = media
            .upload(&user("alice"), "image/png", Body::from(vec![1u8; max + 1]))
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::TooLarge);
    }

    /// An upload of no stated length (chunked), or one whose length lied, is still refused 413
    /// once its bytes pass the limit.
    #[tokio::test]
    async fn an_upload_of_no_stated_length_is_refused_once_past_the_limit() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let max = media.config.media_max_bytes as usize;
        let chunks =
            futures::stream::iter([vec![1u8; max], vec![2u8; 1]]).map(Ok::<_, std::io::Error>);
        let refused = media
            .upload(&user("alice"), "image/png", Body::from_stream(chunks))
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::TooLarge);
    }

    /// One user's uploads in flight on a node are bounded apart ([`UPLOADS_IN_FLIGHT_PER_USER`]):
    /// the node's bound alone let one user (a script trickling bytes) hold every place, and
    /// every other user's upload was refused for as long as it kept them. One more of that
    /// user's is `rate_limited`; another user's is taken.
    #[tokio::test]
    async fn one_users_uploads_in_flight_leave_places_to_the_others() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        assert!(media.config.media_uploads_in_flight > UPLOADS_IN_FLIGHT_PER_USER);
        // Mallory's uploads: their first bytes, then the rest once `finish` says so.
        let (finish, finished) = tokio::sync::watch::channel(false);
        let mut uploading = Vec::new();
        for n in 0..UPLOADS_IN_FLIGHT_PER_USER {
            let (read, first_read) = tokio::sync::oneshot::channel();
            let mut read = Some(read);
            let first = futures::stream::iter([vec![n as u8; 10]]).map(move |bytes| {
                if let Some(read) = read.take() {
                    let _ = read.send(());
                }
                Ok::<_, std::io::Error>(bytes)
            });
            let mut finished = finished.clone();
            let rest = futures::stream::once(async move {
                let _ = finished.wait_for(|finished| *finished).await;
            })
            .filter_map(|_| async { None });
            let body = Body::from_stream(first.chain(rest));
            uploading.push(tokio::spawn({
                let media = media.clone();
                async move { media.upload(&user("mallory"), "image/png", body).await }
            }));
            first_read.await.unwrap();
        }
        let one_more = Body::from(vec![9u8; 10]);
        let refused = media.upload(&user("mallory"), "image/png", one_more).await;
        assert_eq!(refused.unwrap_err().code, ErrorCode::RateLimited);
        let alices = Body::from(vec![1u8; 10]);
        media
            .upload(&user("alice"), "image/png", alices)
            .await
            .unwrap();
        finish.send(true).unwrap();
        for upload in uploading {
            upload.await.unwrap().unwrap();
        }
        let again = Body::from(vec![9u8; 10]);
        media
            .upload(&user("mallory"), "image/png", again)
            .await
            .unwrap();
    }

    /// Downloads in flight on a node are bounded (`--media-downloads-in-flight`), and so are
    /// each user's ([`DOWNLOADS_IN_FLIGHT_PER_USER`]): a download holds an open file and its
    /// task until its client has read it, and clients that read slowly (or a script opening
    /// downloads by the thousand) held as many as they opened. A body not read yet holds its
    /// places; one more download is refused, to retry; a body read whole, or dropped (its
    /// client gone), gives them back.
    #[tokio::test]
    async fn downloads_in_flight_are_bounded_per_node_and_per_user() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let (_, record) = upload_made(&media, Duration::ZERO).await;
        let download = |who: Option<&'static str>| {
            let (media, record) = (media.clone(), record.clone());
            async move {
                let headers = HeaderMap::new();
                media
                    .download(who, &record, &headers, Caching::Private)
                    .await
            }
        };
        let mut unread = Vec::new();
        for _ in 0..DOWNLOADS_IN_FLIGHT_PER_USER {
            unread.push(download(Some("mallory")).await.unwrap());
        }
        let refused = download(Some("mallory")).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        // Signed URLs' downloads take the node's other places.
        let left = media.config.media_downloads_in_flight - DOWNLOADS_IN_FLIGHT_PER_USER;
        for _ in 0..left {
            unread.push(download(None).await.unwrap());
        }
        let refused = download(Some("alice")).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert_eq!(
            download(None).await.unwrap_err().code,
            ErrorCode::Unavailable
        );
        let in_flight = media.metrics.media_downloads_in_flight.get();
        assert_eq!(in_flight, media.config.media_downloads_in_flight as i64);
        let read = unread.pop().unwrap().into_body();
        axum::body::to_bytes(read, usize::MAX).await.unwrap();
        let alices = download(Some("alice")).await.unwrap().into_body();
        let bytes = axum::body::to_bytes(alices, usize::MAX).await.unwrap();
        assert_eq!(bytes, vec![7u8; 10]);
        unread.clear();
        assert_eq!(media.metrics.media_downloads_in_flight.get(), 0);
        download(Some("mallory")).await.unwrap();
    }

    /// Bytes found under their hash with another size than the upload's (cut by a power cut
    /// before uploads were synced, or damaged since) are replaced by the upload's. A re-upload
    /// of the same bytes was answered 201 and kept the cut file: every download of it, by
    /// anyone it was sent to, ended short, and no upload could repair it.
    #[tokio::test]
    async fn an_upload_replaces_bytes_of_another_size_found_under_its_hash() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let bytes = vec![7u8; 10];
        let body = || Body::from(bytes.clone());
        let uploaded = media.upload(&user("alice"), "image/png", body()).await;
        let blob = dir
            .path()
            .join("media/blobs")
            .join(uploaded.unwrap().sha256);
        std::fs::write(&blob, &bytes[..3]).unwrap();
        media
            .upload(&user("alice"), "image/png", body())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&blob).unwrap(), bytes);
    }

    /// A media id is not made of public facts alone. It was the sha256 of the uploader, the
    /// type and the bytes' hash: whoever knew a file's bytes made the id of anyone's upload of
    /// it and asked the server whether it was there. Keyed with the store's secret, the same
    /// upload again gets the same id (from any node of the store), another store another one.
    #[tokio::test]
    async fn an_outsider_cannot_make_the_id_of_an_upload() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let upload = |media: Arc<MediaService>| async move {
            let body = Body::from(vec![7u8; 10]);
            media
                .upload(&user("alice"), "image/png", body)
                .await
                .unwrap()
        };
        let uploaded = upload(media.clone()).await;
        let mut public = Sha256::new();
        for part in ["alice", "image/png", &uploaded.sha256] {
            public.update(part.as_bytes());
            public.update([0]);
        }
        let made = hex::encode(public.finalize());
        assert_ne!(uploaded.media_id, made);
        assert_eq!(media.store.media(&made).await.unwrap(), None);
        let another_node = media_on(media.store.clone(), dir.path()).await;
        assert_eq!(upload(another_node).await.media_id, uploaded.media_id);
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let another_store = media_over(&engine, dir.path()).await;
        assert_ne!(upload(another_store).await.media_id, uploaded.media_id);
    }

    /// Nodes making the store's key of media ids at once keep one: the node whose commit comes
    /// second takes the key the first made, so that the same upload gets the same id on both.
    #[tokio::test]
    async fn nodes_making_the_key_of_media_ids_at_once_keep_one() {
        let engine = FaultyEngine::new();
        let store = engine.store(4).await;
        let (other, made) = tokio::sync::oneshot::channel();
        let racer = store.clone();
        engine.before_next_commit(Box::pin(async move {
            let _ = other.send(racer.media_id_key().await.unwrap());
        }));
        let key = store.media_id_key().await.unwrap();
        assert_eq!(key, made.await.unwrap());
        assert_eq!(store.media_id_key().await.unwrap(), key);
    }

    /// Media uploaded before ids were keyed stays under the id it was given: its uploader and
    /// whoever it was sent to still download it.
    #[tokio::test]
    async fn media_uploaded_under_an_id_of_before_stays_readable() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        let bytes = vec![7u8; 10];
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let before = "a".repeat(64);
        let record = MediaRecord {
            mime: "image/png".into(),
            size: 10,
            sha256: sha256.clone(),
            created_ms: now_ms(),
            owner: "alice".into(),
            shared_ms: 0,
        };
        media.store.put_media(&before, &record, 0).await.unwrap();
        media
            .objects
            .put(&blob_path(&sha256), bytes.clone().into())
            .await
            .unwrap();
        let readable = media.readable("alice", &before).await.unwrap();
        let answer = media
            .download(
                Some("alice"),
                &readable,
                &HeaderMap::new(),
                Caching::Private,
            )
            .await
            .unwrap();
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX);
        assert_eq!(body.await.unwrap(), bytes);
    }

    /// An upload whose record cannot be committed leaves no staged bytes behind.
    #[tokio::test]
    async fn an_upload_that_cannot_be_recorded_leaves_nothing_staged() {
        let (engine, dir) = (FaultyEngine::new(), tempfile::tempdir().unwrap());
        let media = media_over(&engine, dir.path()).await;
        id_key_made(&media).await;
        engine.set_fault(Some(Box::new(|_| {
            Some(courier_store::StoreError::Engine("the disk is gone".into()))
        })));
        let body = Body::from(vec![7u8; 10]);
        let refused = media.upload(&user("alice"), "image/png", body).await;
        assert!(refused.is_err());
        let staged: Vec<_> = media
            .objects
            .list(Some(&ObjectPath::from("staging")))
            .collect()
            .await;
        assert!(staged.is_empty(), "{staged:?}");
    }

    /// A type stored before uploads were checked for being one type (`image/png,text/html`,
    /// which a browser takes as its last type) is served as bytes, to be saved.
    #[test]
    fn a_stored_type_of_several_types_is_served_as_bytes_to_be_saved() {
        for mime in [
            "image/png,text/html",
            "image/png, text/css",
            "video/mp4 text/html",
        ] {
            assert_eq!(served_type(mime), "application/octet-stream", "{mime}");
            assert!(!shown_inline(mime), "{mime}");
        }
        assert_eq!(served_type("image/png; q=\"a,b\""), "image/png; q=\"a,b\"");
        assert!(shown_inline("image/png; q=\"a,b\""));
    }

    #[test]
    fn ranges_follow_rfc_9110() {
        use Ranged::{Part, Unsatisfiable, Whole};
        assert_eq!(parse_range("bytes=0-99", 1000), Part(0..100));
        assert_eq!(parse_range("bytes=900-", 1000), Part(900..1000));
        assert_eq!(parse_range("bytes=-100", 1000), Part(900..1000));
        assert_eq!(parse_range("bytes=-5000", 1000), Part(0..1000));
        assert_eq!(parse_range("bytes=990-2000", 1000), Part(990..1000));
        assert_eq!(parse_range("bytes=0-99999999999999999999", 10), Part(0..10));
        assert_eq!(parse_range("bytes=-99999999999999999999", 10), Part(0..10));
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(
            parse_range("bytes=99999999999999999999-", 10),
            Unsatisfiable
        );
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 1000), Whole);
        assert_eq!(parse_range("bytes=+5-", 1000), Whole);
        assert_eq!(parse_range("bytes=-", 1000), Whole);
        assert_eq!(parse_range("bytes=0-1,5-6", 1000), Whole);
        assert_eq!(parse_range("items=0-1", 1000), Whole);
    }
}
