//! The sequencer role: orders appends per conversation and makes them durable.
//!
//! [`Sequencer`] is the interface the chat role calls; [`LocalSequencer`] is the in-process
//! binding. It owns every shard of the store (one node owns all here): one actor per shard,
//! started on first use, group-commits what is queued (bounded by count, bytes and time) in one
//! store commit fenced by the shard's epoch, answers each waiter after the commit, then tells
//! fanout that the shard's outbox has grown.

use crate::metrics::{Metrics, ShardLabel};
use courier_store::{
    Append, AppendOutcome, AppendRefused, HeadCache, MessageStore, ShardLease, StoreError,
};
use futures::future::BoxFuture;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Why an append was not sequenced. Every case but `Refused` is safe to retry with the same
/// `client_msg_id`.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    /// Refused at its place in the conversation's order (membership); retrying changes nothing.
    #[error(transparent)]
    Refused(#[from] AppendRefused),
    #[error("the sequencer is overloaded; retry with the same client_msg_id")]
    Overloaded,
    #[error("this node no longer owns the conversation's shard; retry")]
    ShardMoved,
    #[error("storage failed: {0}")]
    Store(#[from] StoreError),
}

/// An append in flight; resolves once it is durable (or refused).
pub type PendingAppend = BoxFuture<'static, Result<AppendOutcome, SequencerError>>;

/// A retention trim in flight; resolves to the number of seqs cleared.
pub type PendingTrim = BoxFuture<'static, Result<u64, SequencerError>>;

/// Orders and persists appends; the only writer of a conversation's events.
pub trait Sequencer: Send + Sync + 'static {
    /// Queues `append` before returning, so two calls from one task keep their order within a
    /// conversation; the future resolves after the durable commit.
    fn submit(&self, append: Append) -> PendingAppend;

    /// Clears the events of `conversation_id` below `new_floor` (retention), fenced by the
    /// shard's epoch like every other shard write.
    fn trim(&self, conversation_id: &str, new_floor: u64) -> PendingTrim;
}

/// Told after each commit which shard's outbox grew (fanout, in-process).
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, shard: u32, events: usize);
}

/// Several listeners told of every commit, in order.
pub struct Listeners(pub Vec<Arc<dyn CommitListener>>);

impl CommitListener for Listeners {
    fn committed(&self, shard: u32, events: usize) {
        for listener in &self.0 {
            listener.committed(shard, events);
        }
    }
}

/// Bounds of one group commit.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitLimits {
    /// Most appends in one commit.
    pub max_appends: usize,
    /// Most bytes (approximate) in one commit.
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
                heads: HeadCache::default(),
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
        let mut batch = Vec::with_capacity(self.limits.max_appends);
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
                    batch.push(first);
                    let deadline = tokio::time::Instant::now() + self.limits.linger;
                    while batch.len() < self.limits.max_appends && bytes < self.limits.max_bytes {
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
                            Request::Append(append) => {
                                bytes += append.append.approximate_size();
                                batch.push(append);
                            }
                            trim => {
                                next = Some(trim);
                                break;
                            }
                        }
                    }
                    self.commit(&mut batch).await
                }
            };
            if !kept {
                // The shard moved: refuse what is queued and stop.
                requests.close();
                while let Ok(request) = requests.try_recv() {
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

    /// Commits `batch` and answers its waiters; `false` when the shard was lost.
    async fn commit(&mut self, batch: &mut Vec<AppendRequest>) -> bool {
        let appends: Vec<Append> = batch.iter().map(|r| r.append.clone()).collect();
        let result = self
            .store
            .append(self.lease, &mut self.heads, &appends)
            .await;
        let (shard, count) = (self.lease.shard, batch.len());
        match result {
            Ok(results) => {
                let new = results
                    .iter()
                    .filter(|r| r.as_ref().is_ok_and(|o| !o.duplicate))
                    .count();
                for (request, result) in batch.drain(..).zip(results) {
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
                true
            }
            Err(StoreError::FenceChanged { .. }) => {
                tracing::warn!(
                    shard,
                    epoch = self.lease.epoch,
                    "shard taken over by another owner"
                );
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(SequencerError::ShardMoved));
                }
                false
            }
            Err(e) => {
                tracing::error!(shard, error = %e, "append batch failed");
                for request in batch.drain(..) {
                    let _ = request.reply.send(Err(SequencerError::Store(e.clone())));
                }
                true
            }
        }
    }
}
