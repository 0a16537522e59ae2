//! The sequencer role over gRPC: [`SequencerService`] serves any in-process
//! [`Sequencer`](courier_core::sequencing::Sequencer) (the shard owner's), and
//! [`RemoteSequencer`] is the `Sequencer` a chat node calls it through.
//!
//! **Invariants.** An append crosses the network whole (event, idempotency key, conversation to
//! create) and comes back as the owner's outcome or refusal. Errors keep their type: the one
//! mapping is [`to_status`] / [`sequencer_error`] here, with a store's error inside carried by
//! [`crate::status`].
//!
//! **Failure policy.** A submit whose answer is lost (connection broken, timeout, node killed)
//! is a store error of unknown outcome ([`StoreError::MaybeCommitted`]): the client is told
//! `unavailable` and retries with the same `client_msg_id`, which the idempotency record
//! answers if the append did land. A refused call (wrong token) is an engine error: nothing
//! was appended. A trim whose answer is lost is an engine error (retention runs it again).
//! An append the node cannot decode (a chat node of another version, or damage), and a refusal
//! the chat node cannot decode, are [`StoreError::Invalid`]: refused for good, the client is
//! told `internal` with what did not decode, since a retry would be refused again.

use crate::auth::{AttachToken, ClusterToken, RequireToken};
use crate::lock;
use crate::proto::sequencer_client::SequencerClient;
use crate::proto::sequencer_server::{self, SequencerServer};
use crate::proto::{
    self, AppendRequest, AppendResponse, Refusal, SequencerErrorDetail, SequencerErrorKind,
    SequencerFailure, SubmitRequest, TrimRequest, TrimResponse, append_response, submit_request,
};
use crate::status::{self, Call};
use crate::{MAX_MESSAGE_BYTES, lazy_channel};
use courier_core::sequencing::{PendingAppend, PendingTrim, Sequencer, SequencerError};
use courier_proto::{Event, pb};
use courier_store::{
    Append, AppendKey, AppendOutcome, AppendRefused, MediaReference, NewConversation, StoreError,
};
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use prost::Message;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::codegen::InterceptedService;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// The binary metadata entry holding the [`SequencerErrorDetail`] of a failed call.
pub const SEQUENCER_ERROR_METADATA: &str = "courier-sequencer-error-bin";

/// Longest wait for an append's answer. A commit takes milliseconds; an append unanswered
/// after this (its node paused, or cut off) is an unknown outcome: the client retries with the
/// same `client_msg_id`, through the shard's owner of that moment.
pub const APPEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for a trim's answer.
pub const TRIM_TIMEOUT: Duration = Duration::from_secs(30);

/// Appends one stream carries that are not answered yet, at each end: a chat node's appends
/// past it are refused as overloaded (the client retries); a sequencer node reads no more of
/// the stream until some are answered.
pub const STREAM_WINDOW: usize = 4096;

/// The status a sequencer node answers for `error`.
pub fn to_status(error: &SequencerError) -> Status {
    let (kind, mut status) = match error {
        SequencerError::Overloaded => (
            SequencerErrorKind::Overloaded,
            Status::resource_exhausted(error.to_string()),
        ),
        SequencerError::ShardMoved => (
            SequencerErrorKind::ShardMoved,
            Status::failed_precondition(error.to_string()),
        ),
        SequencerError::RateLimited { .. } => (
            SequencerErrorKind::RateLimited,
            Status::resource_exhausted(error.to_string()),
        ),
        SequencerError::DeliveryBehind => (
            SequencerErrorKind::DeliveryBehind,
            Status::resource_exhausted(error.to_string()),
        ),
        SequencerError::Store(e) => (SequencerErrorKind::Store, status::to_status(e)),
        // Refusals are answers (`SubmitResponse::refused`), never statuses; a trim is never
        // refused. Kept total all the same.
        SequencerError::Refused(refused) => (
            SequencerErrorKind::Store,
            Status::failed_precondition(refused.to_string()),
        ),
    };
    let detail = SequencerErrorDetail {
        kind: kind.into(),
        retry_after_ms: retry_after_ms(error),
    };
    status.metadata_mut().insert_bin(
        SEQUENCER_ERROR_METADATA,
        MetadataValue::from_bytes(&detail.encode_to_vec()),
    );
    status
}

/// `error` as it travels on an append stream.
fn failure(error: &SequencerError) -> SequencerFailure {
    let (kind, store) = match error {
        SequencerError::Overloaded => (SequencerErrorKind::Overloaded, None),
        SequencerError::ShardMoved => (SequencerErrorKind::ShardMoved, None),
        SequencerError::RateLimited { .. } => (SequencerErrorKind::RateLimited, None),
        SequencerError::DeliveryBehind => (SequencerErrorKind::DeliveryBehind, None),
        SequencerError::Store(e) => (SequencerErrorKind::Store, Some(status::detail(e))),
        SequencerError::Refused(_) => (SequencerErrorKind::Unspecified, None),
    };
    SequencerFailure {
        sequencer: Some(SequencerErrorDetail {
            kind: kind.into(),
            retry_after_ms: retry_after_ms(error),
        }),
        store,
    }
}

fn retry_after_ms(error: &SequencerError) -> u64 {
    match error {
        SequencerError::RateLimited { retry_after_ms } => *retry_after_ms,
        _ => 0,
    }
}

/// The error a detail names by its kind alone, if it is one of those.
fn named_error(detail: &SequencerErrorDetail) -> Option<SequencerError> {
    match SequencerErrorKind::try_from(detail.kind).ok()? {
        SequencerErrorKind::Overloaded => Some(SequencerError::Overloaded),
        SequencerErrorKind::ShardMoved => Some(SequencerError::ShardMoved),
        SequencerErrorKind::RateLimited => Some(SequencerError::RateLimited {
            retry_after_ms: detail.retry_after_ms.max(1),
        }),
        SequencerErrorKind::DeliveryBehind => Some(SequencerError::DeliveryBehind),
        SequencerErrorKind::Store | SequencerErrorKind::Unspecified => None,
    }
}

/// The error a [`SequencerFailure`] carries; one of another version is an unknown outcome.
fn from_failure(failure: SequencerFailure) -> SequencerError {
    if let Some(named) = failure.sequencer.as_ref().and_then(named_error) {
        return named;
    }
    SequencerError::Store(
        failure
            .store
            .and_then(status::from_detail)
            .unwrap_or(StoreError::MaybeCommitted),
    )
}

/// The response that answers append `id` with `result`.
pub(crate) fn response(id: u64, result: Result<AppendOutcome, SequencerError>) -> AppendResponse {
    let result = match result {
        Ok(outcome) => append_response::Result::Outcome(proto::Outcome {
            seq: outcome.seq,
            server_msg_id: outcome.server_msg_id,
            ts_ms: outcome.ts_ms,
            duplicate: outcome.duplicate,
        }),
        Err(SequencerError::Refused(refused)) => {
            append_response::Result::Refused(refusal(refused).into())
        }
        Err(e) => append_response::Result::Failure(failure(&e)),
    };
    AppendResponse {
        id,
        result: Some(result),
    }
}

/// The outcome an [`AppendResponse`] carries, as the chat node that sent the append takes it.
pub fn outcome(result: Option<append_response::Result>) -> Result<AppendOutcome, SequencerError> {
    match result {
        Some(append_response::Result::Outcome(o)) => Ok(AppendOutcome {
            seq: o.seq,
            server_msg_id: o.server_msg_id,
            ts_ms: o.ts_ms,
            duplicate: o.duplicate,
        }),
        Some(append_response::Result::Refused(code)) => match Refusal::try_from(code) {
            Ok(Refusal::NotMember) => Err(AppendRefused::NotMember.into()),
            Ok(Refusal::NotAdmin) => Err(AppendRefused::NotAdmin.into()),
            Ok(Refusal::NoChange) => Err(AppendRefused::NoChange.into()),
            Ok(Refusal::TooManyConversations) => Err(AppendRefused::TooManyConversations.into()),
            Ok(Refusal::Damaged) => Err(AppendRefused::Damaged.into()),
            // Nothing was appended, and a retry would be refused the same way.
            _ => Err(SequencerError::Store(StoreError::Invalid(format!(
                "a sequencer node answered an unknown refusal ({code})"
            )))),
        },
        Some(append_response::Result::Failure(failure)) => Err(from_failure(failure)),
        None => Err(SequencerError::Store(StoreError::MaybeCommitted)),
    }
}

/// The [`SequencerError`] a caller of `call` sees for `status` (see the module's failure
/// policy for a status no sequencer wrote).
pub fn sequencer_error(status: &Status, call: Call) -> SequencerError {
    status
        .metadata()
        .get_bin(SEQUENCER_ERROR_METADATA)
        .and_then(|value| value.to_bytes().ok())
        .and_then(|bytes| SequencerErrorDetail::decode(bytes).ok())
        .and_then(|detail| named_error(&detail))
        .unwrap_or_else(|| SequencerError::Store(status::store_error(status, call)))
}

fn refusal(refused: AppendRefused) -> Refusal {
    match refused {
        AppendRefused::NotMember => Refusal::NotMember,
        AppendRefused::NotAdmin => Refusal::NotAdmin,
        AppendRefused::NoChange => Refusal::NoChange,
        AppendRefused::TooManyConversations => Refusal::TooManyConversations,
        AppendRefused::Damaged => Refusal::Damaged,
    }
}

/// The request that carries `append`.
pub fn submit_request(append: Append) -> SubmitRequest {
    let key = match append.key {
        AppendKey::Client(id) => submit_request::Key::Client(id),
        AppendKey::Server(id) => submit_request::Key::Server(id),
    };
    let create = append.create.map(|c| proto::NewConversation {
        kind: c.kind.to_owned(),
        name: c.name,
        members: c.members,
        started_limit: c.started_limit,
    });
    let event = Event {
        conversation_id: append.conversation_id,
        seq: 0,
        server_msg_id: String::new(),
        sender: append.sender,
        ts_ms: 0,
        payload: append.payload,
    };
    SubmitRequest {
        event: pb::Event::from(event).encode_to_vec(),
        key: Some(key),
        create,
    }
}

/// The append a [`SubmitRequest`] carries; `InvalidArgument` for one no Courier node sends.
pub fn append_of(request: SubmitRequest) -> Result<Append, Status> {
    let invalid = |what: String| Status::invalid_argument(what);
    let event = pb::Event::decode(request.event.as_slice())
        .map_err(|e| invalid(format!("undecodable event: {e}")))
        .and_then(|pb| Event::try_from(pb).map_err(|e| invalid(format!("invalid event: {e}"))))?;
    let key = match request.key {
        Some(submit_request::Key::Client(id)) => AppendKey::Client(id),
        Some(submit_request::Key::Server(id)) => AppendKey::Server(id),
        None => return Err(invalid("an append needs an idempotency key".into())),
    };
    let create = match request.create {
        None => None,
        Some(c) if c.kind == "direct" => Some(NewConversation {
            kind: "direct",
            name: c.name,
            members: c.members,
            started_limit: c.started_limit,
        }),
        Some(c) => {
            return Err(invalid(format!(
                "cannot create a {:?} conversation",
                c.kind
            )));
        }
    };
    Ok(Append {
        conversation_id: event.conversation_id,
        sender: event.sender,
        key,
        payload: event.payload,
        create,
    })
}

/// Serves a node's in-process sequencer to the chat nodes.
#[derive(Clone)]
pub struct SequencerService {
    sequencer: Arc<dyn Sequencer>,
}

impl SequencerService {
    pub fn new(sequencer: Arc<dyn Sequencer>) -> Self {
        Self { sequencer }
    }

    /// The service with the cluster token required on every call.
    pub fn into_server(
        self,
        token: ClusterToken,
    ) -> InterceptedService<SequencerServer<Self>, RequireToken> {
        let server = SequencerServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, RequireToken::new(token))
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<AppendResponse, Status>> + Send>>;

#[tonic::async_trait]
impl sequencer_server::Sequencer for SequencerService {
    type AppendStream = ResponseStream;

    /// Queues each append on the local sequencer as it arrives (so in stream order), and
    /// answers each after its commit. At most [`STREAM_WINDOW`] are in flight; the stream is
    /// not read further until some are answered.
    async fn append(
        &self,
        request: Request<tonic::Streaming<AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let mut incoming = request.into_inner();
        let sequencer = self.sequencer.clone();
        let (answers, answered) = mpsc::channel(STREAM_WINDOW);
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut reading = true;
            loop {
                tokio::select! {
                    next = incoming.message(), if reading && in_flight.len() < STREAM_WINDOW => {
                        match next {
                            Ok(Some(AppendRequest { id, submit })) => {
                                let append = submit
                                    .ok_or_else(|| Status::invalid_argument("an append without its request"))
                                    .and_then(append_of);
                                match append {
                                    // Queued now, before the next message is read: stream order.
                                    Ok(append) => {
                                        let pending = sequencer.submit(append);
                                        in_flight.push(async move { (id, pending.await) });
                                    }
                                    // Refused for good: the same bytes would be refused
                                    // again (a chat node of another version, or damage).
                                    Err(status) => {
                                        let reason = format!(
                                            "the sequencer node could not decode an append: {}",
                                            status.message()
                                        );
                                        tracing::warn!(id, %reason, "refused an append it cannot decode");
                                        let error = SequencerError::Store(StoreError::Invalid(reason));
                                        if answers.send(Ok(response(id, Err(error)))).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                            }
                            Ok(None) | Err(_) => reading = false,
                        }
                    }
                    Some((id, result)) = in_flight.next(), if !in_flight.is_empty() => {
                        if answers.send(Ok(response(id, result))).await.is_err() {
                            // The chat node is gone; what is in flight still commits.
                            return;
                        }
                    }
                    else => return,
                }
            }
        });
        let stream = futures::stream::unfold(answered, |mut answered| async move {
            answered.recv().await.map(|answer| (answer, answered))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn trim(&self, request: Request<TrimRequest>) -> Result<Response<TrimResponse>, Status> {
        let TrimRequest {
            conversation_id,
            new_floor,
            media,
        } = request.into_inner();
        let media = media
            .into_iter()
            .map(|m| MediaReference {
                media_id: m.media_id,
                seq: m.seq,
            })
            .collect();
        let cleared = self
            .sequencer
            .trim(&conversation_id, new_floor, media)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(TrimResponse { cleared }))
    }
}

type Client = SequencerClient<InterceptedService<Channel, AttachToken>>;

type Waiter = oneshot::Sender<Result<AppendOutcome, SequencerError>>;

/// The appends one stream carries that are not answered yet.
#[derive(Default)]
struct Waiters {
    /// Set when the stream ended: its waiters were answered, nothing more may be added.
    closed: bool,
    by_id: HashMap<u64, Waiter>,
}

/// One append stream to a sequencer node.
struct Link {
    requests: mpsc::Sender<AppendRequest>,
    waiters: Arc<Mutex<Waiters>>,
}

/// A sequencer node, reached over gRPC: one append stream, opened on first use and again
/// after it broke. Appends are written to the stream in the order `submit` is called, and the
/// node queues them in that order.
#[derive(Clone)]
pub struct RemoteSequencer {
    client: Client,
    link: Arc<Mutex<Option<Link>>>,
    next_id: Arc<AtomicU64>,
}

impl RemoteSequencer {
    /// The sequencer listening at `address` (`http://host:port`); nothing is sent until the
    /// first call.
    pub fn new(address: &str, token: ClusterToken) -> Result<Self, StoreError> {
        let channel = lazy_channel(address, "sequencer")?;
        Ok(Self {
            client: SequencerClient::with_interceptor(channel, AttachToken::new(token))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            link: Arc::default(),
            next_id: Arc::default(),
        })
    }

    /// Opens a stream: its requests are sent as they are queued, its answers go to their
    /// waiters; when it ends, every waiter left is answered with an unknown outcome.
    fn open(&self) -> Link {
        let (requests, queued) = mpsc::channel(STREAM_WINDOW);
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let mut client = self.client.clone();
        let answered = waiters.clone();
        tokio::spawn(async move {
            let outgoing = futures::stream::unfold(queued, |mut queued| async move {
                queued.recv().await.map(|request| (request, queued))
            });
            // What the waiters left when the stream ends are told: a stream refused at its
            // start (wrong token) appended nothing; one that broke may have.
            let refused = match client.append(outgoing).await {
                Ok(response) => {
                    let mut answers = response.into_inner();
                    while let Ok(Some(answer)) = answers.message().await {
                        let waiter = lock(&answered).by_id.remove(&answer.id);
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(outcome(answer.result));
                        }
                    }
                    None
                }
                Err(status) => Some(status),
            };
            let mut waiters = lock(&answered);
            waiters.closed = true;
            for (_, waiter) in waiters.by_id.drain() {
                let error = match &refused {
                    Some(status) => sequencer_error(status, Call::Commit),
                    None => SequencerError::Store(StoreError::MaybeCommitted),
                };
                let _ = waiter.send(Err(error));
            }
        });
        Link { requests, waiters }
    }
}

impl Sequencer for RemoteSequencer {
    fn submit(&self, append: Append) -> PendingAppend {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = AppendRequest {
            id,
            submit: Some(submit_request(append)),
        };
        let (waiter, answer) = oneshot::channel();
        let mut waiters_of_link = None;
        let queued = {
            let mut current = lock(&self.link);
            if current.as_ref().is_some_and(|l| lock(&l.waiters).closed) {
                *current = None;
            }
            let link = current.get_or_insert_with(|| self.open());
            let mut waiters = lock(&link.waiters);
            match link.requests.try_send(request) {
                Ok(()) => {
                    waiters.by_id.insert(id, waiter);
                    waiters_of_link = Some(link.waiters.clone());
                    Ok(())
                }
                Err(mpsc::error::TrySendError::Full(_)) => Err(SequencerError::Overloaded),
                // The stream's task ended after the check: nothing was sent.
                Err(mpsc::error::TrySendError::Closed(_)) => Err(SequencerError::ShardMoved),
            }
        };
        Box::pin(async move {
            queued?;
            match tokio::time::timeout(APPEND_TIMEOUT, answer).await {
                Ok(answer) => {
                    answer.unwrap_or(Err(SequencerError::Store(StoreError::MaybeCommitted)))
                }
                Err(_) => {
                    if let Some(waiters) = waiters_of_link {
                        lock(&waiters).by_id.remove(&id);
                    }
                    Err(SequencerError::Store(StoreError::MaybeCommitted))
                }
            }
        })
    }

    fn trim(
        &self,
        conversation_id: &str,
        new_floor: u64,
        media: Vec<MediaReference>,
    ) -> PendingTrim {
        let mut client = self.client.clone();
        let media = media
            .into_iter()
            .map(|m| proto::MediaReference {
                media_id: m.media_id,
                seq: m.seq,
            })
            .collect();
        let mut request = Request::new(TrimRequest {
            conversation_id: conversation_id.to_owned(),
            new_floor,
            media,
        });
        request.set_timeout(TRIM_TIMEOUT);
        Box::pin(async move {
            client
                .trim(request)
                .await
                .map(|r| r.into_inner().cleared)
                .map_err(|s| sequencer_error(&s, Call::Read))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_failure_crosses_the_wire_as_itself() {
        let errors = [
            SequencerError::Overloaded,
            SequencerError::ShardMoved,
            SequencerError::RateLimited {
                retry_after_ms: 250,
            },
            SequencerError::DeliveryBehind,
            SequencerError::Store(StoreError::Overloaded("throttled".into())),
        ];
        for error in errors {
            let on_stream = from_failure(failure(&error));
            let as_status = sequencer_error(&to_status(&error), Call::Commit);
            for received in [on_stream, as_status] {
                assert_eq!(format!("{received:?}"), format!("{error:?}"));
            }
        }
    }
}
