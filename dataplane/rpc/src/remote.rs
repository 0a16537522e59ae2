//! [`RemoteEngine`]: a [`KvEngine`] whose store is a store node, reached over gRPC, so that the
//! rest of Courier uses a shared test store like any engine.
//!
//! **Role.** Each `KvEngine` call is one gRPC call (a range is one call with a streamed answer,
//! and so are several ranges read at once; several keys are one call too) carrying the cluster
//! token. No cache except the engine's limits, read once at
//! [`RemoteEngine::connect`] (they are fixed for an engine's lifetime), and the last known halt.
//!
//! **Invariants.**
//! - A batch beyond the node's limits is refused with [`StoreError::TooLarge`] before it is
//!   sent, exactly as the engine itself would refuse it; so is a commit whose encoded request
//!   exceeds [`crate::max_message_bytes`], the message limit of both ends.
//! - Errors answered by the node come back as the very [`StoreError`] variant the engine
//!   returned ([`crate::status`]).
//!
//! **Failure policy.** A transport failure (connection refused or lost, timeout) during a read
//! (`get`, `get_many`, `range`, `ranges`) is [`StoreError::Engine`] (the store is unreachable; retry later). During
//! `commit` it is [`StoreError::MaybeCommitted`]: the batch may have been applied before the
//! answer was lost; callers resolve it through their idempotency keys, as with FoundationDB's
//! `commit_unknown_result`. A lost connection is re-established by the next call.
//!
//! **Halted.** [`KvEngine::halted`] must be cheap and cannot make a call: it reports the last
//! state seen, set by a commit answered [`StoreError::Halted`] or by [`RemoteEngine::health`],
//! and cleared by a successful commit or a healthy answer (a restarted node).
//!
//! **Bounds.** Calls in flight wait in the channel's buffer (tonic's default, 1024 requests),
//! then at the caller; every call is limited by [`REQUEST_TIMEOUT`].

use crate::auth::{AttachToken, ClusterToken};
use crate::proto::kv_store_client::KvStoreClient;
use crate::proto::{
    DropExpiredRequest, GetManyRequest, GetRequest, HealthRequest, LimitsRequest, RangeRequest,
    RangesRequest,
};
use crate::status::{self, Call};
use crate::{convert, max_message_bytes};
use async_trait::async_trait;
use courier_store::kv::{BatchLimits, CommitStamp, KeyValue};
use courier_store::{Batch, KvEngine, StoreError};
use prost::Message;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Longest wait for a TCP connection to the store node.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the answer of one call; a commit that times out is `MaybeCommitted`.
/// Above the embedded engine's worst group commit (one fsync of up to 16 MiB).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often an idle connection is pinged, and how long the answer may take before the
/// connection is considered lost (a node that vanished without closing its socket).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest header block accepted from the node (hyper's default is 16 KiB): an error's detail
/// travels in the trailers, base64-encoded, and may hold a key of up to 10 kB and a text of up
/// to [`status::MAX_REASON_BYTES`] (about 100 kB on the wire). A status that does not fit
/// would be lost, and a commit's outcome wrongly unknown.
pub const MAX_HEADER_LIST_BYTES: u32 = 256 << 10;

type Client = KvStoreClient<InterceptedService<Channel, AttachToken>>;

/// A [`KvEngine`] served by a store node. Cheap to share behind an `Arc`; all calls share one
/// HTTP/2 connection.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use courier_rpc::{ClusterToken, RemoteEngine};
/// use courier_store::{Batch, KvEngine};
/// use std::sync::Arc;
///
/// let token = ClusterToken::from_env(courier_rpc::auth::TOKEN_ENV)?;
/// let store: Arc<dyn KvEngine> =
///     Arc::new(RemoteEngine::connect("http://store-node:7400", token).await?);
/// let mut batch = Batch::new();
/// batch.set(b"key".to_vec(), b"value".to_vec());
/// store.commit(batch).await?;
/// # Ok(()) }
/// ```
pub struct RemoteEngine {
    client: Client,
    limits: BatchLimits,
    max_message: usize,
    /// The last halt reported by the node, `None` while it accepted writes.
    halted: Mutex<Option<String>>,
}

impl std::fmt::Debug for RemoteEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteEngine")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RemoteEngine {
    /// Connects to the store node at `address` (`http://host:port`), reads its limits and
    /// health. Fails with [`StoreError::Engine`] when the address is invalid, the node is
    /// unreachable or refuses the token.
    pub async fn connect(address: &str, token: ClusterToken) -> Result<Self, StoreError> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|e| StoreError::Engine(format!("invalid store node address {address}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
        let channel = endpoint.connect().await.map_err(|e| {
            StoreError::Engine(format!("cannot reach the store node at {address}: {e}"))
        })?;
        let mut client = KvStoreClient::with_interceptor(channel, AttachToken::new(token));
        let limits = client
            .limits(LimitsRequest {})
            .await
            .map_err(|s| status::store_error(&s, Call::Read))?
            .into_inner();
        let limits = convert::limits(limits)?;
        let max_message = max_message_bytes(&limits);
        let client = client
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let engine = Self {
            client,
            limits,
            max_message,
            halted: Mutex::new(None),
        };
        engine.health().await?;
        Ok(engine)
    }

    /// Asks the node whether its engine accepts writes: `Some(reason)` once it has halted.
    /// Also refreshes what [`KvEngine::halted`] reports.
    pub async fn health(&self) -> Result<Option<String>, StoreError> {
        let halted = self
            .client
            .clone()
            .health(HealthRequest {})
            .await
            .map_err(|s| status::store_error(&s, Call::Read))?
            .into_inner()
            .halted;
        self.set_halted(halted.clone());
        Ok(halted)
    }

    fn set_halted(&self, halted: Option<String>) {
        if let Ok(mut slot) = self.halted.lock() {
            *slot = halted;
        }
    }
}

#[async_trait]
impl KvEngine for RemoteEngine {
    fn halted(&self) -> Option<String> {
        self.halted.lock().ok().and_then(|slot| slot.clone())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let request = GetRequest { key: key.to_vec() };
        let response = self
            .client
            .clone()
            .get(request)
            .await
            .map_err(|s| status::store_error(&s, Call::Read))?;
        Ok(response.into_inner().value)
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let asked = keys.len();
        let response = self
            .client
            .clone()
            .get_many(GetManyRequest { keys })
            .await
            .map_err(|s| status::store_error(&s, Call::Read))?;
        let values = response.into_inner().values;
        if values.len() != asked {
            return Err(StoreError::Engine(format!(
                "the store node answered {} values for {asked} keys",
                values.len()
            )));
        }
        Ok(values.into_iter().map(|answer| answer.value).collect())
    }

    async fn range(
        &self,
        range: Range<Vec<u8>>,
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if range.start >= range.end || limit == 0 {
            return Ok(Vec::new());
        }
        let request = RangeRequest {
            start: range.start,
            end: range.end,
            limit: u64::try_from(limit).unwrap_or(u64::MAX),
            reverse,
        };
        let read_error = |s: tonic::Status| status::store_error(&s, Call::Read);
        let mut chunks = self
            .client
            .clone()
            .range(request)
            .await
            .map_err(read_error)?
            .into_inner();
        let mut pairs = Vec::new();
        while let Some(chunk) = chunks.message().await.map_err(read_error)? {
            pairs.extend(chunk.pairs.into_iter().map(|p| (p.key, p.value)));
        }
        Ok(pairs)
    }

    async fn ranges(
        &self,
        ranges: Vec<Range<Vec<u8>>>,
        limit: usize,
    ) -> Result<Vec<Vec<KeyValue>>, StoreError> {
        let mut answers = vec![Vec::new(); ranges.len()];
        if ranges.is_empty() || limit == 0 {
            return Ok(answers);
        }
        let request = RangesRequest {
            ranges: ranges
                .into_iter()
                .map(|range| RangeRequest {
                    start: range.start,
                    end: range.end,
                    limit: u64::try_from(limit).unwrap_or(u64::MAX),
                    reverse: false,
                })
                .collect(),
        };
        let read_error = |s: tonic::Status| status::store_error(&s, Call::Read);
        let mut chunks = self
            .client
            .clone()
            .ranges(request)
            .await
            .map_err(read_error)?
            .into_inner();
        let asked = answers.len();
        while let Some(chunk) = chunks.message().await.map_err(read_error)? {
            let answer = usize::try_from(chunk.range)
                .ok()
                .and_then(|index| answers.get_mut(index))
                .ok_or_else(|| {
                    StoreError::Engine(format!(
                        "the store node answered range {} of a read of {asked}",
                        chunk.range
                    ))
                })?;
            answer.extend(chunk.pairs.into_iter().map(|p| (p.key, p.value)));
        }
        Ok(answers)
    }

    async fn commit(&self, batch: Batch) -> Result<CommitStamp, StoreError> {
        batch.check(&self.limits)?;
        let request = convert::commit_request(batch);
        let size = request.encoded_len();
        if size > self.max_message {
            return Err(StoreError::TooLarge(format!(
                "the batch encodes to {size} bytes; a store node takes at most {} per commit",
                self.max_message
            )));
        }
        let outcome = self.client.clone().commit(request).await;
        let response = match outcome {
            Ok(response) => response.into_inner(),
            Err(s) => {
                let error = status::store_error(&s, Call::Commit);
                if let StoreError::Halted(reason) = &error {
                    self.set_halted(Some(reason.clone()));
                }
                return Err(error);
            }
        };
        self.set_halted(None);
        CommitStamp::try_from(response.stamp.as_slice()).map_err(|_| {
            // Committed, but the stamp is unusable: only the idempotency keys can tell what
            // landed, exactly as when the answer is lost.
            tracing::error!(
                len = response.stamp.len(),
                "the store node answered a commit with a malformed stamp"
            );
            StoreError::MaybeCommitted
        })
    }

    /// Asks the store node's engine. A node that predates the call drops nothing, which the
    /// contract allows: the caller clears the range key by key.
    async fn drop_expired(&self, range: Range<Vec<u8>>) -> Result<(), StoreError> {
        let request = DropExpiredRequest {
            start: range.start,
            end: range.end,
        };
        match self.client.clone().drop_expired(request).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Ok(()),
            Err(s) => Err(status::store_error(&s, Call::Read)),
        }
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }
}
