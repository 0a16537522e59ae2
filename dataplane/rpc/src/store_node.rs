//! The store node: any [`KvEngine`] served over gRPC (`courier.internal.v1.KvStore`), so that
//! the nodes of a multi-process test cluster share one store.
//!
//! **Not a production store.** It is a test and development stand-in for FoundationDB: one
//! process, one disk, no replication, no failover. Production nodes reach FoundationDB directly.
//!
//! **Role.** [`KvStoreService`] turns each call into one call of the wrapped engine (a
//! `Ranges` call into one `range` per range, read concurrently; `GetMany` into `get_many`) and
//! its answer (or its [`StoreError`], through [`crate::status`]) into the reply; it adds no logic,
//! no cache and no retry, so the engine's semantics (fences, atomic `MAX`/`ADD`, versionstamps,
//! group commit, halting) are exactly what remote callers get. [`serve_store_node`] runs it on
//! a TCP listener behind the cluster token until a shutdown signal.
//!
//! **Invariants.**
//! - Every call is authenticated ([`crate::auth::RequireToken`]) before its handler runs.
//! - Messages are limited to [`crate::max_message_bytes`] of the engine's limits both ways, so
//!   the largest batch the engine accepts always fits in a request. A range answer is read from
//!   one snapshot of the engine and streamed in chunks of at most that size, so any range the
//!   engine can answer reaches the caller, still from one snapshot.
//! - `limits` and `health` answer from the wrapped engine, never from configuration.
//!
//! **Failure policy.** An engine error is answered as the same `StoreError` variant. A commit
//! whose caller disconnects is not cancelled in the engine once handed to it (the embedded
//! engine's writer applies what it has queued): the caller sees a lost answer, which it treats
//! as [`StoreError::MaybeCommitted`]. A request that does not decode (a mutation without a
//! kind) is refused as [`StoreError::Invalid`] and nothing is applied: it is never retried.
//!
//! **Bounds.** At most [`MAX_CONCURRENT_STREAMS`](crate::MAX_CONCURRENT_STREAMS) calls in flight per connection (HTTP/2
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; further calls wait in the client); commits then queue in
//! the engine itself (the embedded engine's bounded queue, whose backpressure reaches the
//! caller as a slower commit). There are no channels: a range answer is a finite stream over
//! the chunks already read.

use crate::auth::{ClusterToken, RequireToken};
use crate::proto::kv_store_server::{KvStore, KvStoreServer};
use crate::proto::{
    CommitRequest, CommitResponse, DropExpiredRequest, DropExpiredResponse, GetManyRequest,
    GetManyResponse, GetRequest, GetResponse, HealthRequest, HealthResponse, LimitsRequest,
    LimitsResponse, RangeChunk, RangeRequest, RangesChunk, RangesRequest,
};
use crate::{convert, max_message_bytes, stall, status};
use courier_store::{KvEngine, StoreError};
use futures::stream::BoxStream;
use prost::Message;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

/// Any [`KvEngine`] as the `KvStore` gRPC service.
#[derive(Clone)]
pub struct KvStoreService {
    engine: Arc<dyn KvEngine>,
}

impl KvStoreService {
    pub fn new(engine: Arc<dyn KvEngine>) -> Self {
        Self { engine }
    }

    /// The service ready to add to a tonic server: message limits from the engine's limits,
    /// and every call checked against `token`.
    pub fn into_server(
        self,
        token: ClusterToken,
    ) -> InterceptedService<KvStoreServer<Self>, RequireToken> {
        let max = max_message_bytes(&self.engine.limits());
        let server = KvStoreServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        InterceptedService::new(server, RequireToken::new(token))
    }
}

fn refuse(error: StoreError) -> Status {
    tracing::debug!(%error, "store call failed");
    status::to_status(&error)
}

#[tonic::async_trait]
impl KvStore for KvStoreService {
    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let key = request.into_inner().key;
        let value = self.engine.get(&key).await.map_err(refuse)?;
        Ok(Response::new(GetResponse { value }))
    }

    async fn get_many(
        &self,
        request: Request<GetManyRequest>,
    ) -> Result<Response<GetManyResponse>, Status> {
        let keys = request.into_inner().keys;
        let values = self.engine.get_many(keys).await.map_err(refuse)?;
        Ok(Response::new(GetManyResponse {
            values: values
                .into_iter()
                .map(|value| GetResponse { value })
                .collect(),
        }))
    }

    type RangeStream = BoxStream<'static, Result<RangeChunk, Status>>;

    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<Self::RangeStream>, Status> {
        let RangeRequest {
            start,
            end,
            limit,
            reverse,
        } = request.into_inner();
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let pairs = self
            .engine
            .range(start..end, limit, reverse)
            .await
            .map_err(refuse)?;
        let chunks = chunk(pairs, max_message_bytes(&self.engine.limits()));
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    type RangesStream = BoxStream<'static, Result<RangesChunk, Status>>;

    async fn ranges(
        &self,
        request: Request<RangesRequest>,
    ) -> Result<Response<Self::RangesStream>, Status> {
        let reads = request.into_inner().ranges.into_iter().map(|r| {
            let limit = usize::try_from(r.limit).unwrap_or(usize::MAX);
            self.engine.range(r.start..r.end, limit, r.reverse)
        });
        let answers = futures::future::try_join_all(reads).await.map_err(refuse)?;
        let max = max_message_bytes(&self.engine.limits());
        let mut chunks = Vec::new();
        for (index, pairs) in (0u32..).zip(answers) {
            chunks.extend(chunk(pairs, max).into_iter().map(|c| RangesChunk {
                range: index,
                pairs: c.pairs,
            }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    async fn commit(
        &self,
        request: Request<CommitRequest>,
    ) -> Result<Response<CommitResponse>, Status> {
        let batch = convert::batch(request.into_inner()).map_err(refuse)?;
        let stamp = self.engine.commit(batch).await.map_err(refuse)?;
        Ok(Response::new(CommitResponse {
            stamp: stamp.to_vec(),
        }))
    }

    async fn limits(&self, _: Request<LimitsRequest>) -> Result<Response<LimitsResponse>, Status> {
        Ok(Response::new(convert::limits_response(
            &self.engine.limits(),
        )))
    }

    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            halted: self.engine.halted(),
        }))
    }

    async fn drop_expired(
        &self,
        request: Request<DropExpiredRequest>,
    ) -> Result<Response<DropExpiredResponse>, Status> {
        let DropExpiredRequest { start, end } = request.into_inner();
        self.engine.drop_expired(start..end).await.map_err(refuse)?;
        Ok(Response::new(DropExpiredResponse {}))
    }
}

/// Cuts a range answer into chunks whose encoding fits in `max_bytes` each. A single pair is
/// never larger than the engine's key and value limits, far under `max_bytes`.
fn chunk(pairs: Vec<courier_store::kv::KeyValue>, max_bytes: usize) -> Vec<RangeChunk> {
    let mut chunks = Vec::new();
    let mut current = RangeChunk::default();
    let mut size = 0;
    for pair in pairs {
        let pair = convert::pair(pair);
        // The pair's bytes plus its field tag and length prefix.
        let len = pair.encoded_len() + 1 + prost::length_delimiter_len(pair.encoded_len());
        if size + len > max_bytes && !current.pairs.is_empty() {
            chunks.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.pairs.push(pair);
    }
    if !current.pairs.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// Why a store node stopped other than by its shutdown signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the store node's gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `engine` on `listener` to callers holding `token`, until `shutdown` completes; then
/// stops accepting connections and returns once the calls in flight are answered.
///
/// The future a `courier store-node` subcommand runs, each connection under the internal
/// ports' bounds ([`stall::INTERNAL`]). The engine is usually an
/// [`EmbeddedEngine`](courier_store::embedded::EmbeddedEngine); callers reach it with
/// [`RemoteEngine`](crate::RemoteEngine).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use courier_rpc::{ClusterToken, serve_store_node};
/// use courier_store::embedded::EmbeddedEngine;
/// use std::sync::Arc;
///
/// let engine = Arc::new(EmbeddedEngine::open("/var/lib/courier/store".as_ref())?);
/// let listener = tokio::net::TcpListener::bind("0.0.0.0:7400").await?;
/// let token = ClusterToken::from_env(courier_rpc::auth::TOKEN_ENV)?;
/// serve_store_node(engine, listener, token, async {
///     let _ = tokio::signal::ctrl_c().await;
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn serve_store_node(
    engine: Arc<dyn KvEngine>,
    listener: TcpListener,
    token: ClusterToken,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_store_node_with(engine, listener, token, stall::INTERNAL, shutdown).await
}

/// [`serve_store_node`], each connection under `bounds` (tests shorten them).
pub async fn serve_store_node_with(
    engine: Arc<dyn KvEngine>,
    listener: TcpListener,
    token: ClusterToken,
    bounds: stall::ConnectionBounds,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "store node serving (a test and development store, not for production)");
    }
    let incoming = stall::bounded_incoming(listener, bounds);
    crate::internal_server()
        .add_service(KvStoreService::new(engine).into_server(token))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    tracing::info!("store node stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(n: usize, value_bytes: usize) -> Vec<courier_store::kv::KeyValue> {
        (0..n)
            .map(|i| ((i as u32).to_be_bytes().to_vec(), vec![7; value_bytes]))
            .collect()
    }

    #[test]
    fn chunks_fit_the_message_limit_and_keep_every_pair_in_order() {
        let input = pairs(100, 1000);
        let chunks = chunk(input.clone(), 10_000);
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(c.encoded_len() <= 10_000, "{}", c.encoded_len());
        }
        let back: Vec<_> = chunks
            .into_iter()
            .flat_map(|c| c.pairs)
            .map(|p| (p.key, p.value))
            .collect();
        assert_eq!(back, input);
    }

    #[test]
    fn an_empty_answer_is_no_chunk() {
        assert!(chunk(Vec::new(), 100).is_empty());
    }
}
