//! The sequencer role: orders appends per conversation and makes them durable.
//!
//! [`Sequencer`] is the interface the chat role calls; [`LocalSequencer`] is the in-process
//! binding. It owns every shard of the store (one node owns all here): one actor per shard,
//! started on first use, group-commits what is queued (bounded by count, estimated bytes and
//! time, and never above the engine's batch limit) in one store commit fenced by the shard's
//! epoch, answers each waiter after the commit, then tells fanout that the shard's outbox has
//! grown. Each actor caches the heads of the conversations it appends to, a bounded number
//! ([`CACHED_HEADS`] across all actors).
//!
//! Failure policy: a batch the engine refuses as too large is split in halves, down to the one
//! append that is too large alone; any other store error reaches every waiter of the batch as
//! it is (typed), and `error.rs` maps it to the client's code; a fence that moved means the
//! shard moved: the actor refuses what is queued and stops.

pub mod retention;

use courier_core::metrics::{Metrics, ShardLabel};
use courier_core::sequencing::{
    CommitListener, PendingAppend, PendingTrim, Sequencer, SequencerError,
};
use courier_store::{Append, AppendOutcome, HeadCache, MessageStore, ShardLease, StoreError};
use futures::future::BoxFuture;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Conversation heads the shard actors of one sequencer cache together (each an equal part):
/// about 100 MB at most. A head not cached is read from the store on the next append.
const CACHED_HEADS: usize = 1 << 20;

/// Bounds of one group commit.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitLimits {
    /// Most appends in one commit.
    pub max_appends: usize,
    /// Most bytes in one commit, as estimated by [`Append::approximate_size`]; the engine's
    /// own batch limit lowers it.
    pub max_bytes: usize,
    /// How long the first append of a batch may wait for more (0: take what is queued).
    pub linger: Duration,
    /// Appends queued per shard before new ones are refused as overloaded.
    pub queue_capacity: usize,
}

impl Default for GroupCommitLimits {
    fn default() -> Self {
        Self {
            max_appends: 512,
            max_bytes: 4 << 20,
            linger: Duration::ZERO,
            queue_capacity: 4096,
        }
    }
}

struct AppendRequest {
    append: Append,
    reply: oneshot::Sender<Result<AppendOutcome, SequencerError>>,
}

// Appends are the common case: boxing them would cost an allocation per message.
#[allow(clippy::large_enum_variant)]
enum Request {
    Append(AppendRequest),
    Trim {
        conversation_id: String,
        new_floor: u64,
        reply: oneshot::Sender<Result<u64, SequencerError>>,
    },
}

fn queued<T: Send + 'static>(
    queued: Result<(), mpsc::error::TrySendError<Request>>,
    outcome: oneshot::Receiver<Result<T, SequencerError>>,
) -> BoxFuture<'static, Result<T, SequencerError>> {
    Box::pin(async move {
        match queued {
            Ok(()) => outcome.await.unwrap_or(Err(SequencerError::ShardMoved)),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SequencerError::Overloaded),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SequencerError::ShardMoved),
        }
    })
}

/// The in-process sequencer over one message store.
pub struct LocalSequencer {
    store: MessageStore,
    leases: Vec<ShardLease>,
    shards: Vec<OnceLock<mpsc::Sender<Request>>>,
    limits: GroupCommitLimits,
    listener: Arc<dyn CommitListener>,
    metrics: Arc<Metrics>,
}

impl LocalSequencer {
    /// Takes every shard of `store` (bumping their epochs) and returns the sequencer.
    pub async fn start(
        store: MessageStore,
        limits: GroupCommitLimits,
        listener: Arc<dyn CommitListener>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, StoreError> {
        let all: Vec<u32> = (0..store.shard_count()).collect();
        let leases = store.acquire_shards(&all).await?;
        let shards = (0..all.len()).map(|_| OnceLock::new()).collect();
        Ok(Arc::new(Self {
            store,
            leases,
            shards,
            limits,
            listener,
            metrics,
        }))
    }

    fn shard_queue(&self, shard: u32) -> &mpsc::Sender<Request> {
        self.shards[shard as usize].get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.limits.queue_capacity);
            let actor = ShardActor {
                store: self.store.clone(),
                lease: self.leases[shard as usize],
                heads: HeadCache::with_capacity(CACHED_HEADS / self.shards.len()),
                limits: self.limits,
                listener: self.listener.clone(),
                metrics: self.metrics.clone(),
            };
            tokio::spawn(actor.run(rx));
            tx
        })
    }
}

impl Sequencer for LocalSequencer {
    fn submit(&self, append: Append) -> PendingAppend {
        let shard = self.store.shard_of(&append.conversation_id);
        let (reply, outcome) = oneshot::channel();
        let request = Request::Append(AppendRequest { append, reply });
        queued(self.shard_queue(shard).try_send(request), outcome)
    }

    fn trim(&self, conversation_id: &str, new_floor: u64) -> PendingTrim {
        let shard = self.store.shard_of(conversation_id);
        let (reply, outcome) = oneshot::channel();
        let request = Request::Trim {
            conversation_id: conversation_id.to_owned(),
            new_floor,
            reply,
        };
        queued(self.shard_queue(shard).try_send(request), outcome)
    }
}

struct ShardActor {
    store: MessageStore,
    lease: ShardLease,
    heads: HeadCache,
    limits: GroupCommitLimits,
    listener: Arc<dyn CommitListener>,
    metrics: Arc<Metrics>,
}

impl ShardActor {
    async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        // Batches stay under the engine's limit by their estimated size.
        let max_bytes = self
            .limits
            .max_bytes
            .min(self.store.batch_limits().max_batch_bytes);
        let mut next = None;
        loop {
            let first = match next.take() {
                Some(request) => request,
                None => match requests.recv().await {
                    Some(request) => request,
                    None => return,
                },
            };
            let kept = match first {
                Request::Trim {
                    conversation_id,
                    new_floor,
                    reply,
                } => {
                    let result = self
                        .store
                        .trim(self.lease, &conversation_id, new_floor)
                        .await;
                    let lost = matches!(result, Err(StoreError::FenceChanged { .. }));
                    let _ = reply.send(result.map_err(|e| {
                        if lost {
                            SequencerError::ShardMoved
                        } else {
                            e.into()
                        }
                    }));
                    !lost
                }
                Request::Append(first) => {
                    let mut bytes = first.append.approximate_size();
                    let mut batch = vec![first];
                    let deadline = tokio::time::Instant::now() + self.limits.linger;
                    while batch.len() < self.limits.max_appends && bytes < max_bytes {
                        let request = match requests.try_recv() {
                            Ok(request) => request,
                            Err(_) if self.limits.linger.is_zero() => break,
                            Err(_) => {
                                match tokio::time::timeout_at(deadline, requests.recv()).await {
                                    Ok(Some(request)) => request,
                                    _ => break,
                                }
                            }
                        };
                        match request {
                            Request::Append(append)
                                if bytes + append.append.approximate_size() <= max_bytes =>
                            {
                                bytes += append.append.approximate_size();
                                batch.push(append);
                            }
                            // A trim, or an append for the next batch.
                            other => {
                                next = Some(other);
                                break;
                            }
                        }
                    }
                    self.commit(batch).await
                }
            };
            if !kept {
                // The shard moved: refuse what is queued and stop.
                requests.close();
                let queued = next.take().into_iter();
                for request in queued.chain(std::iter::from_fn(|| requests.try_recv().ok())) {
                    match request {
                        Request::Append(r) => drop(r.reply.send(Err(SequencerError::ShardMoved))),
                        Request::Trim { reply, .. } => {
                            drop(reply.send(Err(SequencerError::ShardMoved)))
                        }
                    }
                }
                return;
            }
        }
    }

    /// Commits `batch` and answers its waiters; `false` when the shard was lost. A batch the
    /// engine refuses as too large (its size was underestimated) is split in halves, committed
    /// in order, so that only an append too large on its own fails (`too_large`).
    async fn commit(&mut self, batch: Vec<AppendRequest>) -> bool {
        // Parts still to commit, the next one last.
        let mut parts = vec![batch];
        while let Some(mut part) = parts.pop() {
            let appends: Vec<Append> = part.iter().map(|r| r.append.clone()).collect();
            let started = std::time::Instant::now();
            let result = self
                .store
                .append(self.lease, &mut self.heads, &appends)
                .await;
            self.metrics
                .stages
                .commit
                .observe(started.elapsed().as_secs_f64());
            let (shard, count) = (self.lease.shard, part.len());
            match result {
                Err(StoreError::TooLarge(_)) if count > 1 => {
                    let second = part.split_off(count / 2);
                    parts.push(second);
                    parts.push(part);
                }
                Ok(results) => {
                    let new = results
                        .iter()
                        .filter(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
                        .count();
                    for (request, result) in part.into_iter().zip(results) {
                        let _ = request.reply.send(result.map_err(SequencerError::from));
                    }
                    self.metrics.commit_batch_size.observe(count as f64);
                    self.metrics
                        .shard_appends
                        .get_or_create(&ShardLabel { shard })
                        .inc_by(new as u64);
                    if new > 0 {
                        self.listener.committed(shard, new);
                    }
                }
                Err(StoreError::FenceChanged { .. }) => {
                    tracing::warn!(
                        shard,
                        epoch = self.lease.epoch,
                        "shard taken over by another owner"
                    );
                    for request in parts.into_iter().flatten().chain(part) {
                        let _ = request.reply.send(Err(SequencerError::ShardMoved));
                    }
                    return false;
                }
                Err(e) => {
                    tracing::error!(shard, error = %e, "append batch failed");
                    for request in part {
                        let _ = request.reply.send(Err(SequencerError::Store(e.clone())));
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_core::error::ApiError;
    use courier_core::sequencing::Listeners;
    use courier_proto::{Body, ErrorCode, EventPayload, Sender};
    use courier_store::faulty_engine::FaultyEngine;
    use courier_store::{AppendKey, NewConversation};

    fn message(conv: &str, client_msg_id: &str, text: &str) -> Append {
        let sender = Sender {
            user: "alice".into(),
            device: "phone".into(),
        };
        let body = Body::Text(text.into());
        Append {
            create: Some(NewConversation::direct("alice", "bob")),
            ..Append::message(conv.into(), sender, client_msg_id.into(), body, None)
        }
    }

    async fn sequencer(engine: &Arc<FaultyEngine>) -> Arc<LocalSequencer> {
        LocalSequencer::start(
            engine.store(4).await,
            GroupCommitLimits::default(),
            Arc::new(Listeners(Vec::new())),
            Arc::new(Metrics::new()),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn unknown_outcomes_and_overload_reach_clients_as_unavailable() {
        let engine = FaultyEngine::new();
        let sequencer = sequencer(&engine).await;
        let faults = [
            StoreError::MaybeCommitted,
            StoreError::Overloaded("throttled".into()),
            StoreError::Engine("I/O error".into()),
        ];
        for (i, fault) in faults.into_iter().enumerate() {
            let injected = fault.clone();
            engine.set_fault(Some(Box::new(move |_| Some(injected.clone()))));
            let refused = sequencer
                .submit(message("d:1", &format!("m{i}"), "hello"))
                .await
                .unwrap_err();
            let api = ApiError::from(refused);
            assert_eq!(api.code, ErrorCode::Unavailable, "{fault:?}: {api:?}");
            assert!(api.retry_after_ms.is_some(), "{fault:?}: {api:?}");
        }
        engine.set_fault(None);
        // The retry the client makes with the same id is sequenced, once.
        let sent = sequencer
            .submit(message("d:1", "m0", "hello"))
            .await
            .unwrap();
        assert_eq!((sent.seq, sent.duplicate), (1, false));
    }

    #[tokio::test]
    async fn a_burst_too_large_for_one_commit_is_split_and_only_a_lone_oversize_append_fails() {
        const BATCH_LIMIT: usize = 160 << 10;
        // Known up front, the limit bounds batches by their estimated size; lowered once the
        // shard's actor runs, the estimate no longer keeps batches under it (as when it is
        // wrong) and the engine refuses them: they are split.
        for limit_known in [true, false] {
            let engine = FaultyEngine::new();
            if limit_known {
                engine.set_max_batch_bytes(BATCH_LIMIT);
            }
            let sequencer = sequencer(&engine).await;
            sequencer.submit(message("d:1", "m0", "hi")).await.unwrap();
            engine.set_max_batch_bytes(BATCH_LIMIT);
            // Each body is well under the limit, the burst together far over it (each append
            // writes its body twice: the event and the outbox entry).
            let body = "x".repeat(16 << 10);
            // Alone over the batch limit (written twice), under the value limit.
            let oversize = "y".repeat(90_000);
            let pending: Vec<_> = (1..=40)
                .map(|i| {
                    let text = if i == 20 { &oversize } else { &body };
                    sequencer.submit(message("d:1", &format!("m{i}"), text))
                })
                .collect();
            let mut seqs = Vec::new();
            for (i, outcome) in (1..).zip(futures::future::join_all(pending).await) {
                match outcome {
                    Ok(sent) if i != 20 => seqs.push(sent.seq),
                    Err(e) if i == 20 => {
                        assert_eq!(ApiError::from(e).code, ErrorCode::TooLarge);
                    }
                    other => panic!("append {i} (limit known: {limit_known}): {other:?}"),
                }
            }
            assert_eq!(seqs, (2..=40).collect::<Vec<u64>>(), "dense, in order");
        }
    }

    #[tokio::test]
    async fn the_size_estimate_covers_what_an_append_writes() {
        let engine = FaultyEngine::new();
        let store = engine.store(1).await;
        let lease = store.acquire_shards(&[0]).await.unwrap()[0];
        let written = Arc::new(std::sync::Mutex::new(0));
        let seen = written.clone();
        engine.set_fault(Some(Box::new(move |batch| {
            *seen.lock().unwrap() = batch.approximate_size();
            None
        })));
        let caption = courier_proto::Media {
            media_id: "m1".into(),
            mime: "image/png".into(),
            size: 1,
            sha256: "0".repeat(64),
            name: Some("cat.png".into()),
            caption: Some("c".repeat(30_000)),
        };
        let mut media = message("d:2", "media", "");
        if let EventPayload::Message { body, .. } = &mut media.payload {
            *body = Some(Body::Media(caption));
        }
        let group = Append {
            conversation_id: "g:1".into(),
            key: AppendKey::Server("created".into()),
            payload: EventPayload::GroupCreated {
                name: "friends".into(),
                members: (0..100).map(|i| format!("user{i}")).collect(),
            },
            create: None,
            ..message("g:1", "-", "")
        };
        let appends = [
            message("d:1", "first", &"x".repeat(60_000)),
            message("d:1", "second", "hi"),
            media,
            group,
        ];
        for append in appends {
            let estimate = append.approximate_size();
            store
                .append(
                    lease,
                    &mut HeadCache::default(),
                    std::slice::from_ref(&append),
                )
                .await
                .unwrap();
            let written = *written.lock().unwrap();
            assert!(
                written <= estimate && estimate < 2 * written + 1024,
                "{:?}: estimate {estimate}, written {written}",
                append.payload
            );
        }
    }
}
