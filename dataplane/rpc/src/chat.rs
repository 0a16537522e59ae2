//! The chat role over gRPC: [`ChatNodeService`] serves a chat node's in-process
//! [`ChatService`] (`courier_chat::Chat`), [`RemoteChat`] calls one chat node, and
//! [`ClusterChat`] is the [`ChatService`] a gateway node without the chat role uses: it calls
//! the live chat nodes of the node registry.
//!
//! **Identity.** A request names the client (user, device, token time) as the gateway
//! authenticated it; the chat node takes it as given, because the call carries the cluster
//! token ([`crate::auth`]), which only nodes of the cluster hold.
//!
//! **Errors.** A request the chat role refuses fails with the client's [`ApiError`] inside
//! ([`status::api_status`]); the gateway gets it back whole ([`status::api_error`]) and tells the
//! client exactly what `courier serve` would. A send's outcome comes back as the sequencer's
//! answer ([`SequencerError`] kept by type), which the gateway maps as it maps an in-process one.
//! A request the chat node cannot decode (a gateway node of another version) is refused the
//! same way, as `internal`: never a failed call, which the gateway would try on every chat
//! node and then tell the client `unavailable`. Likewise an answer the gateway cannot decode
//! (an event of a page, a membership record, a send answered out of order or with a step it
//! does not know): final `internal`, logged, not tried on another chat node.
//!
//! **Order.** A send (or delete) is a server stream: its first message says the chat node
//! queued the append with the sequencer, the second is the sequencer's answer. The gateway
//! waits for the first before it reads the device's next frame, as it waits for the in-process
//! call, and [`ClusterChat`] sends one user's requests to one chat node (below), so a device's
//! sends to a conversation keep their order.
//!
//! **Which chat node.** [`ClusterChat`] ranks the live chat nodes per user by rendezvous
//! hashing of the user and the node id: every device of a user calls the same node while the
//! set of chat nodes stays the same, so the user's send rate limit is one bucket on one node
//! whichever gateways its devices are on, and a node that joins or leaves moves only the users
//! it gains or had (their buckets start full on the new node) ([`NodeDirectory`]: the registry is read at most every
//! [`DIRECTORY_TTL`](crate::directory::DIRECTORY_TTL)); one client (one HTTP/2 connection) is
//! kept per node.
//!
//! **Failure policy.** A call that fails without the chat role's answer (node unreachable,
//! connection broken, no answer within [`CALL_TIMEOUT`]) marks the node down for
//! [`DOWN_FOR`](crate::directory::DOWN_FOR) (it is ranked last meanwhile), and is tried on
//! the next node when it is safe to repeat: sends (the same `client_msg_id` is sequenced once; a retry answers
//! `duplicate: true`) and deletes (keyed by their target) until they are accepted, reads, acks
//! (cursors only move forward), typing, push registrations. Group changes and unlinks are not
//! repeated (a repeated `create_group` would create a second group): the client is told
//! `unavailable`. A send whose chat node dies after accepting it resolves to an unknown outcome
//! (`StoreError::MaybeCommitted`): the client is told `unavailable` and retries with the same
//! `client_msg_id`, through another chat node.

use crate::auth::{AttachToken, ClusterToken, RequireToken};
use crate::directory::NodeDirectory;
use crate::lock;
use crate::proto::chat_client::ChatClient;
use crate::proto::chat_server::{self, ChatServer};
use crate::proto::{
    self, CallerRequest, CatchUpRange, CatchUpRequest, CatchUpResponse, ConversationRequest,
    ConversationsResponse, CreateGroupRequest, CreateGroupResponse, DevicesResponse, Done,
    FetchRequest, FrameRequest, MemberReceipt, MembersRequest, MembersResponse, PageResponse,
    ReadableRequest, ReadableResponse, ReceiptsResponse, RegisterPushRequest, RemoveMemberRequest,
    SendProgress, SeqPeriod, UnlinkDeviceRequest, send_progress,
};
use crate::sequencer::{outcome, response};
use crate::status::{api_error, api_status, decode_api_error};
use crate::{MAX_MESSAGE_BYTES, lazy_channel};
use courier_core::auth::Identity;
use courier_core::chat::{
    CatchUp, CatchUpPlan, ChatService, ConversationSummary, DeviceView, Page, Readable,
};
use courier_core::error::ApiError;
use courier_core::sequencing::{PendingAppend, SequencerError};
use courier_proto::{ClientFrame, Encoding, ErrorCode, Event, Payload, Receipt, pb};
use courier_store::membership::MembershipPeriod;
use courier_store::{MemberRecord, MessageStore, StoreError, Visibility};
use futures::Stream;
use futures::StreamExt;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::codegen::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Longest wait for a chat node's answer to a call (for a send: until it is queued with the
/// sequencer; the outcome is bounded by the gateway's `send_timeout`). Group changes wait for
/// a commit (at most the sequencer's append timeout, 5 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The role name chat nodes register with.
pub const CHAT_ROLE: &str = "chat";

fn caller_of(who: &Identity) -> Option<proto::Caller> {
    Some(proto::Caller {
        user: who.user.clone(),
        device: who.device.clone(),
        issued_at_ms: who.issued_at_ms,
    })
}

/// The refusal of a request this chat node cannot decode (a gateway node of another version,
/// or damage in transit): the chat role's own answer, `internal` saying what did not decode,
/// so the gateway neither tries it on every other chat node nor tells the client
/// `unavailable`, which it would retry (a send with the same `client_msg_id`) for ever: the
/// same request is refused the same way every time. Logged as a warning, once per request.
fn undecodable(what: impl std::fmt::Display) -> Status {
    tracing::warn!(%what, "refused a request this chat node cannot decode");
    api_status(&ApiError::new(
        ErrorCode::Internal,
        format!(
            "internal error, retrying will not help: the chat node could not decode the request: {what}"
        ),
    ))
}

fn identity(caller: Option<proto::Caller>) -> Result<Identity, Status> {
    let caller = caller.ok_or_else(|| undecodable("a chat call names its caller"))?;
    Ok(Identity {
        user: caller.user,
        device: caller.device,
        issued_at_ms: caller.issued_at_ms,
    })
}

fn frame_request(who: &Identity, frame: ClientFrame) -> FrameRequest {
    let frame = match Encoding::Proto.encode_client(&frame) {
        Payload::Binary(bytes) => bytes,
        Payload::Text(text) => text.into_bytes(),
    };
    FrameRequest {
        caller: caller_of(who),
        frame,
    }
}

fn frame_of(request: FrameRequest) -> Result<(Identity, ClientFrame), Status> {
    let who = identity(request.caller)?;
    let frame = Encoding::Proto
        .decode_client(&request.frame)
        .map_err(|e| undecodable(format!("undecodable frame: {e}")))?;
    Ok((who, frame))
}

fn wrong_frame() -> Status {
    undecodable("this call takes another kind of frame")
}

fn encode_event(event: Event) -> Vec<u8> {
    pb::Event::from(event).encode_to_vec()
}

/// An answer of a chat node that this gateway node cannot decode (a chat node of another
/// version, or damage in transit): final, `internal` saying what did not decode, as the chat
/// node's refusal of a request it cannot decode ([`undecodable`]). Not a failed call: the
/// gateway would try it on every chat node, each answering the same, then tell the client
/// `unavailable`, which it would retry (a `fetch`, a catch-up, a send) for ever. Logged.
fn undecodable_answer(what: impl std::fmt::Display) -> ApiError {
    tracing::error!(%what, "a chat node's answer this gateway node cannot decode; the client is told internal");
    ApiError::new(
        ErrorCode::Internal,
        format!(
            "internal error, retrying will not help: the gateway node could not decode a chat node's answer: {what}"
        ),
    )
}

fn decode_event(bytes: &[u8]) -> Result<Event, ApiError> {
    let event = pb::Event::decode(bytes)
        .map_err(|e| undecodable_answer(format!("an event of a page: {e}")))?;
    Event::try_from(event).map_err(|e| undecodable_answer(format!("an event of a page: {e}")))
}

fn visibility_to_proto(visible: &Visibility) -> Vec<SeqPeriod> {
    visible
        .periods()
        .iter()
        .map(|p| SeqPeriod {
            from: p.from,
            through: p.through,
        })
        .collect()
}

fn visibility_of(periods: Vec<SeqPeriod>) -> Visibility {
    Visibility::from_periods(
        periods
            .into_iter()
            .map(|p| MembershipPeriod {
                from: p.from,
                through: p.through,
            })
            .collect(),
    )
}

/// Serves a node's in-process chat role to the gateway nodes.
#[derive(Clone)]
pub struct ChatNodeService {
    chat: Arc<dyn ChatService>,
}

impl ChatNodeService {
    pub fn new(chat: Arc<dyn ChatService>) -> Self {
        Self { chat }
    }

    /// The service with the cluster token required on every call.
    pub fn into_server(
        self,
        token: ClusterToken,
    ) -> InterceptedService<ChatServer<Self>, RequireToken> {
        let server = ChatServer::new(self).max_decoding_message_size(MAX_MESSAGE_BYTES);
        InterceptedService::new(server, RequireToken::new(token))
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<SendProgress, Status>> + Send>>;

/// `accepted`, then the sequencer's answer once `pending` resolves.
fn progress(accepted: String, pending: PendingAppend) -> ProgressStream {
    let first = SendProgress {
        step: Some(send_progress::Step::Accepted(accepted)),
    };
    let answer = async move {
        Ok(SendProgress {
            step: Some(send_progress::Step::Answer(response(0, pending.await))),
        })
    };
    Box::pin(futures::stream::once(async { Ok(first) }).chain(futures::stream::once(answer)))
}

fn refused(e: ApiError) -> Status {
    api_status(&e)
}

#[tonic::async_trait]
impl chat_server::Chat for ChatNodeService {
    type SendStream = ProgressStream;
    type DeleteStream = ProgressStream;

    async fn send(
        &self,
        request: Request<FrameRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let (who, frame) = frame_of(request.into_inner())?;
        let ClientFrame::Send(send) = frame else {
            return Err(wrong_frame());
        };
        let (conversation_id, pending) =
            self.chat.submit_send(&who, &send).await.map_err(refused)?;
        Ok(Response::new(progress(conversation_id, pending)))
    }

    async fn delete(
        &self,
        request: Request<FrameRequest>,
    ) -> Result<Response<ProgressStream>, Status> {
        let (who, frame) = frame_of(request.into_inner())?;
        let ClientFrame::Delete(delete) = frame else {
            return Err(wrong_frame());
        };
        let (client_msg_id, pending) = self
            .chat
            .submit_delete(&who, &delete)
            .await
            .map_err(refused)?;
        Ok(Response::new(progress(client_msg_id, pending)))
    }

    async fn typing(&self, request: Request<FrameRequest>) -> Result<Response<Done>, Status> {
        let (who, frame) = frame_of(request.into_inner())?;
        let ClientFrame::Typing(typing) = frame else {
            return Err(wrong_frame());
        };
        self.chat.typing(&who, &typing).await.map_err(refused)?;
        Ok(Response::new(Done {}))
    }

    async fn acknowledge(&self, request: Request<FrameRequest>) -> Result<Response<Done>, Status> {
        let (who, frame) = frame_of(request.into_inner())?;
        let ClientFrame::Ack(ack) = frame else {
            return Err(wrong_frame());
        };
        self.chat.acknowledge(&who, &ack).await.map_err(refused)?;
        Ok(Response::new(Done {}))
    }

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<PageResponse>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        let page = self
            .chat
            .fetch(
                &who,
                &request.conversation_id,
                request.after_seq,
                request.limit,
            )
            .await
            .map_err(refused)?;
        Ok(Response::new(PageResponse {
            events: page.events.into_iter().map(encode_event).collect(),
            head_seq: page.head_seq,
            trimmed: page.trimmed,
        }))
    }

    async fn readable(
        &self,
        request: Request<ReadableRequest>,
    ) -> Result<Response<ReadableResponse>, Status> {
        let request = request.into_inner();
        let readable = self
            .chat
            .readable(&request.conversation_id, &request.user)
            .await
            .map_err(refused)?;
        Ok(Response::new(ReadableResponse {
            member_record: readable.record.encode_to_vec(),
            history_on_join: readable.history_on_join,
            floor: readable.floor,
        }))
    }

    async fn catch_up_plan(
        &self,
        request: Request<CatchUpRequest>,
    ) -> Result<Response<CatchUpResponse>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        let overrides: BTreeMap<String, u64> = request.overrides.into_iter().collect();
        let plan = self
            .chat
            .catch_up_plan(&who, &overrides)
            .await
            .map_err(refused)?;
        let ranges = plan
            .ranges
            .into_iter()
            .map(|range| CatchUpRange {
                visible: visibility_to_proto(&range.visible),
                conversation_id: range.conversation_id,
                from: range.from,
                head: range.head,
                trimmed: range.trimmed,
            })
            .collect();
        Ok(Response::new(CatchUpResponse {
            ranges,
            resume: plan.resume.into_iter().collect(),
            unreadable: plan.unreadable.into_iter().collect(),
        }))
    }

    async fn conversations(
        &self,
        request: Request<CallerRequest>,
    ) -> Result<Response<ConversationsResponse>, Status> {
        let who = identity(request.into_inner().caller)?;
        let conversations = self.chat.conversations(&who).await.map_err(refused)?;
        let conversations = conversations
            .into_iter()
            .map(|c| proto::ConversationSummary {
                conversation_id: c.conversation_id,
                kind: c.kind,
                name: c.name,
                head_seq: c.head_seq,
                delivered_seq: c.delivered_seq,
                read_seq: c.read_seq,
                unread: c.unread,
            })
            .collect();
        Ok(Response::new(ConversationsResponse { conversations }))
    }

    async fn receipts(
        &self,
        request: Request<ConversationRequest>,
    ) -> Result<Response<ReceiptsResponse>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        let receipts = self
            .chat
            .receipts(&who, &request.conversation_id)
            .await
            .map_err(refused)?;
        let receipts = receipts
            .into_iter()
            .map(|r| MemberReceipt {
                user: r.user,
                delivered_seq: r.delivered_seq,
                read_seq: r.read_seq,
            })
            .collect();
        Ok(Response::new(ReceiptsResponse { receipts }))
    }

    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Result<Response<CreateGroupResponse>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        let conversation_id = self
            .chat
            .create_group(&who, &request.name, &request.members)
            .await
            .map_err(refused)?;
        Ok(Response::new(CreateGroupResponse { conversation_id }))
    }

    async fn add_members(
        &self,
        request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        let users = self
            .chat
            .add_members(&who, &request.conversation_id, &request.users)
            .await
            .map_err(refused)?;
        Ok(Response::new(MembersResponse { users }))
    }

    async fn remove_member(
        &self,
        request: Request<RemoveMemberRequest>,
    ) -> Result<Response<Done>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        self.chat
            .remove_member(&who, &request.conversation_id, &request.user)
            .await
            .map_err(refused)?;
        Ok(Response::new(Done {}))
    }

    async fn devices(
        &self,
        request: Request<CallerRequest>,
    ) -> Result<Response<DevicesResponse>, Status> {
        let who = identity(request.into_inner().caller)?;
        let devices = self.chat.devices(&who.user).await.map_err(refused)?;
        let devices = devices
            .into_iter()
            .map(|d| proto::DeviceView {
                device: d.device,
                last_seen_ms: d.last_seen_ms,
                push: d.push,
            })
            .collect();
        Ok(Response::new(DevicesResponse { devices }))
    }

    async fn register_push(
        &self,
        request: Request<RegisterPushRequest>,
    ) -> Result<Response<Done>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        self.chat
            .register_push(&who, &request.provider, &request.token, request.configured)
            .await
            .map_err(refused)?;
        Ok(Response::new(Done {}))
    }

    async fn unlink_device(
        &self,
        request: Request<UnlinkDeviceRequest>,
    ) -> Result<Response<Done>, Status> {
        let request = request.into_inner();
        let who = identity(request.caller)?;
        self.chat
            .unlink_device(&who.user, &request.device)
            .await
            .map_err(refused)?;
        Ok(Response::new(Done {}))
    }
}

type Client = ChatClient<InterceptedService<Channel, AttachToken>>;

/// One chat node, reached over gRPC on one lazily connected channel. Cheap to clone. Its
/// methods answer the chat role's refusal as `Ok(Err(ApiError))` and a failure of the call
/// itself (the node could not be reached, or did not answer) as `Err(Status)`.
#[derive(Clone)]
pub struct RemoteChat {
    client: Client,
}

/// What a call to one chat node gives: the chat role's answer (which may be a refusal), or a
/// failure of the call itself, which [`ClusterChat`] may try on another node.
pub type Attempt<T> = Result<Result<T, ApiError>, Status>;

/// Splits a status into the chat role's refusal and a failure of the call.
fn attempt<T>(result: Result<T, Status>) -> Attempt<T> {
    match result {
        Ok(value) => Ok(Ok(value)),
        Err(status) => match decode_api_error(&status) {
            Some(refusal) => Ok(Err(refusal)),
            None => Err(status),
        },
    }
}

fn timed<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

impl RemoteChat {
    /// The chat node listening at `address` (`http://host:port`); nothing is sent until the
    /// first call.
    pub fn new(address: &str, token: ClusterToken) -> Result<Self, StoreError> {
        let channel = lazy_channel(address, "chat")?;
        let client = ChatClient::with_interceptor(channel, AttachToken::new(token))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self { client })
    }

    /// A send or delete: returns once the node queued it, with the pending outcome.
    pub async fn submit(
        &self,
        who: &Identity,
        frame: ClientFrame,
    ) -> Attempt<(String, PendingAppend)> {
        let delete = matches!(frame, ClientFrame::Delete(_));
        let request = frame_request(who, frame);
        let mut client = self.client.clone();
        let accepted = async move {
            let mut stream = match delete {
                true => client.delete(request).await?,
                false => client.send(request).await?,
            }
            .into_inner();
            match stream.message().await? {
                Some(SendProgress {
                    step: Some(send_progress::Step::Accepted(id)),
                }) => Ok(Ok((id, stream))),
                // The same answer from every chat node of that version: final.
                Some(_) => Ok(Err(undecodable_answer(
                    "a send answered out of order (not `accepted` first)",
                ))),
                None => Err(Status::internal(
                    "a chat node ended a send without an answer",
                )),
            }
        };
        let (id, mut stream) = match tokio::time::timeout(CALL_TIMEOUT, accepted).await {
            Ok(result) => match attempt(result)? {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(refusal)) | Err(refusal) => return Ok(Err(refusal)),
            },
            Err(_) => return Err(Status::deadline_exceeded("the chat node did not answer")),
        };
        let pending: PendingAppend = Box::pin(async move {
            match stream.message().await {
                Ok(Some(SendProgress {
                    step: Some(send_progress::Step::Answer(answer)),
                })) => outcome(answer.result),
                // An answer this node cannot read: the outcome is unknown, but a retry (with
                // the same `client_msg_id`) would be answered the same way, for ever. The
                // client is told `internal`; if the message was stored, its catch-up has it.
                Ok(Some(_)) => {
                    let reason = "the gateway node could not decode a chat node's answer to a \
                                  send it had accepted (a step it does not know); the message \
                                  may have been stored";
                    tracing::error!(%reason, "a send's answer this gateway node cannot decode; the client is told internal");
                    Err(SequencerError::Store(StoreError::Invalid(reason.into())))
                }
                // The node died or the connection broke after it queued the append.
                _ => Err(SequencerError::Store(StoreError::MaybeCommitted)),
            }
        });
        Ok(Ok((id, pending)))
    }

    pub async fn typing(&self, who: &Identity, typing: &courier_proto::Typing) -> Attempt<()> {
        let request = timed(frame_request(who, ClientFrame::Typing(typing.clone())));
        attempt(self.client.clone().typing(request).await.map(drop))
    }

    pub async fn acknowledge(&self, who: &Identity, ack: &courier_proto::Ack) -> Attempt<()> {
        let request = timed(frame_request(who, ClientFrame::Ack(ack.clone())));
        attempt(self.client.clone().acknowledge(request).await.map(drop))
    }

    pub async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Attempt<Page> {
        let request = timed(FetchRequest {
            caller: caller_of(who),
            conversation_id: conv.to_owned(),
            after_seq,
            limit,
        });
        let answer = attempt(self.client.clone().fetch(request).await)?;
        Ok(answer.and_then(|page| {
            let page = page.into_inner();
            Ok(Page {
                events: page
                    .events
                    .iter()
                    .map(|e| decode_event(e))
                    .collect::<Result<_, _>>()?,
                head_seq: page.head_seq,
                trimmed: page.trimmed,
            })
        }))
    }

    pub async fn readable(&self, conv: &str, user: &str) -> Attempt<Readable> {
        let request = timed(ReadableRequest {
            conversation_id: conv.to_owned(),
            user: user.to_owned(),
        });
        let answer = attempt(self.client.clone().readable(request).await)?;
        Ok(answer.and_then(|r| {
            let r = r.into_inner();
            let record = MemberRecord::decode(r.member_record.as_slice())
                .map_err(|e| undecodable_answer(format!("a membership record: {e}")))?;
            Ok(Readable {
                record,
                history_on_join: r.history_on_join,
                floor: r.floor,
            })
        }))
    }

    pub async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &BTreeMap<String, u64>,
    ) -> Attempt<CatchUpPlan> {
        let request = timed(CatchUpRequest {
            caller: caller_of(who),
            overrides: overrides.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        });
        let answer = self.client.clone().catch_up_plan(request).await.map(|r| {
            let r = r.into_inner();
            let ranges = r
                .ranges
                .into_iter()
                .map(|range| CatchUp {
                    conversation_id: range.conversation_id,
                    from: range.from,
                    head: range.head,
                    visible: visibility_of(range.visible),
                    trimmed: range.trimmed,
                })
                .collect();
            CatchUpPlan {
                ranges,
                resume: r.resume.into_iter().collect(),
                unreadable: r.unreadable.into_iter().collect(),
            }
        });
        attempt(answer)
    }

    pub async fn conversations(&self, who: &Identity) -> Attempt<Vec<ConversationSummary>> {
        let request = timed(CallerRequest {
            caller: caller_of(who),
        });
        let answer = self.client.clone().conversations(request).await.map(|r| {
            r.into_inner()
                .conversations
                .into_iter()
                .map(|c| ConversationSummary {
                    conversation_id: c.conversation_id,
                    kind: c.kind,
                    name: c.name,
                    head_seq: c.head_seq,
                    delivered_seq: c.delivered_seq,
                    read_seq: c.read_seq,
                    unread: c.unread,
                })
                .collect()
        });
        attempt(answer)
    }

    pub async fn receipts(&self, who: &Identity, conv: &str) -> Attempt<Vec<Receipt>> {
        let request = timed(ConversationRequest {
            caller: caller_of(who),
            conversation_id: conv.to_owned(),
        });
        let answer = self.client.clone().receipts(request).await.map(|r| {
            r.into_inner()
                .receipts
                .into_iter()
                .map(|r| Receipt {
                    conversation_id: conv.to_owned(),
                    user: r.user,
                    delivered_seq: r.delivered_seq,
                    read_seq: r.read_seq,
                })
                .collect()
        });
        attempt(answer)
    }

    pub async fn create_group(
        &self,
        who: &Identity,
        name: &str,
        members: &[String],
    ) -> Attempt<String> {
        let request = timed(CreateGroupRequest {
            caller: caller_of(who),
            name: name.to_owned(),
            members: members.to_vec(),
        });
        let answer = self.client.clone().create_group(request).await;
        attempt(answer.map(|r| r.into_inner().conversation_id))
    }

    pub async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Attempt<Vec<String>> {
        let request = timed(MembersRequest {
            caller: caller_of(who),
            conversation_id: conv.to_owned(),
            users: users.to_vec(),
        });
        let answer = self.client.clone().add_members(request).await;
        attempt(answer.map(|r| r.into_inner().users))
    }

    pub async fn remove_member(&self, who: &Identity, conv: &str, user: &str) -> Attempt<()> {
        let request = timed(RemoveMemberRequest {
            caller: caller_of(who),
            conversation_id: conv.to_owned(),
            user: user.to_owned(),
        });
        attempt(self.client.clone().remove_member(request).await.map(drop))
    }

    pub async fn devices(&self, user: &str) -> Attempt<Vec<DeviceView>> {
        let request = timed(CallerRequest {
            caller: Some(proto::Caller {
                user: user.to_owned(),
                ..proto::Caller::default()
            }),
        });
        let answer = self.client.clone().devices(request).await.map(|r| {
            r.into_inner()
                .devices
                .into_iter()
                .map(|d| DeviceView {
                    device: d.device,
                    last_seen_ms: d.last_seen_ms,
                    push: d.push,
                })
                .collect()
        });
        attempt(answer)
    }

    pub async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Attempt<()> {
        let request = timed(RegisterPushRequest {
            caller: caller_of(who),
            provider: provider.to_owned(),
            token: token.to_owned(),
            configured,
        });
        attempt(self.client.clone().register_push(request).await.map(drop))
    }

    pub async fn unlink_device(&self, user: &str, device: &str) -> Attempt<()> {
        let request = timed(UnlinkDeviceRequest {
            caller: Some(proto::Caller {
                user: user.to_owned(),
                ..proto::Caller::default()
            }),
            device: device.to_owned(),
        });
        attempt(self.client.clone().unlink_device(request).await.map(drop))
    }
}

/// Whether a call may be tried on another chat node after a failure without the chat role's
/// answer (module documentation, "Failure policy").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    Safe,
    Never,
}

/// The [`ChatService`] of a gateway node without the chat role: each call goes to a live chat
/// node of the registry (module documentation). Cheap to clone.
#[derive(Clone)]
pub struct ClusterChat {
    inner: Arc<ChatNodes>,
}

struct ChatNodes {
    directory: NodeDirectory,
    token: ClusterToken,
    clients: Mutex<HashMap<String, RemoteChat>>,
}

impl ClusterChat {
    /// Calls the chat nodes registered in `store`, authenticated with `token`.
    pub fn new(store: MessageStore, token: ClusterToken) -> Self {
        Self {
            inner: Arc::new(ChatNodes {
                directory: NodeDirectory::new(store, CHAT_ROLE, |node| &node.address),
                token,
                clients: Mutex::default(),
            }),
        }
    }

    /// The live chat nodes in the order `user`'s calls try them: by rank, nodes marked down
    /// last.
    async fn candidates(&self, user: &str) -> Result<Vec<(String, RemoteChat)>, ApiError> {
        let nodes = self.inner.directory.ranked(user).await?;
        if nodes.is_empty() {
            return Err(ApiError::unavailable(
                "no chat node is running; retry with the same client_msg_id",
                1000,
            ));
        }
        let mut clients = lock(&self.inner.clients);
        let mut out = Vec::with_capacity(nodes.len());
        for (id, address) in nodes {
            let address = format!("http://{address}");
            let client = match clients.get(&address) {
                Some(client) => client.clone(),
                None => {
                    let client = RemoteChat::new(&address, self.inner.token.clone())?;
                    clients.insert(address, client.clone());
                    client
                }
            };
            out.push((id, client));
        }
        Ok(out)
    }

    /// Runs `call` on the chat nodes in `user`'s order until one answers (its answer may be a
    /// refusal), trying the next only when `repeat` allows.
    async fn call<T, F, Fut>(&self, user: &str, repeat: Repeat, call: F) -> Result<T, ApiError>
    where
        F: Fn(RemoteChat) -> Fut,
        Fut: Future<Output = Attempt<T>>,
    {
        let candidates = self.candidates(user).await?;
        let mut failure = None;
        for (node, client) in candidates {
            match call(client).await {
                Ok(answer) => return answer,
                Err(status) => {
                    tracing::warn!(node, code = ?status.code(), message = status.message(), "a chat node failed a call; it is ranked last for a while");
                    self.inner.directory.mark_down(&node);
                    failure = Some(status);
                    if repeat == Repeat::Never {
                        break;
                    }
                }
            }
        }
        let status = failure.unwrap_or_else(|| Status::unavailable("no chat node"));
        Err(api_error(&status))
    }
}

#[async_trait::async_trait]
impl ChatService for ClusterChat {
    async fn submit_send(
        &self,
        who: &Identity,
        send: &courier_proto::Send,
    ) -> Result<(String, PendingAppend), ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.submit(who, ClientFrame::Send(send.clone())).await
        })
        .await
    }

    async fn submit_delete(
        &self,
        who: &Identity,
        delete: &courier_proto::Delete,
    ) -> Result<(String, PendingAppend), ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.submit(who, ClientFrame::Delete(delete.clone())).await
        })
        .await
    }

    async fn typing(&self, who: &Identity, typing: &courier_proto::Typing) -> Result<(), ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.typing(who, typing).await
        })
        .await
    }

    async fn acknowledge(&self, who: &Identity, ack: &courier_proto::Ack) -> Result<(), ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.acknowledge(who, ack).await
        })
        .await
    }

    async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<Page, ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.fetch(who, conv, after_seq, limit).await
        })
        .await
    }

    async fn readable(&self, conv: &str, user: &str) -> Result<Readable, ApiError> {
        self.call(user, Repeat::Safe, |chat| async move {
            chat.readable(conv, user).await
        })
        .await
    }

    async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &BTreeMap<String, u64>,
    ) -> Result<CatchUpPlan, ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.catch_up_plan(who, overrides).await
        })
        .await
    }

    async fn conversations(&self, who: &Identity) -> Result<Vec<ConversationSummary>, ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.conversations(who).await
        })
        .await
    }

    async fn receipts(&self, who: &Identity, conv: &str) -> Result<Vec<Receipt>, ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.receipts(who, conv).await
        })
        .await
    }

    async fn create_group(
        &self,
        who: &Identity,
        name: &str,
        members: &[String],
    ) -> Result<String, ApiError> {
        self.call(&who.user, Repeat::Never, |chat| async move {
            chat.create_group(who, name, members).await
        })
        .await
    }

    async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Result<Vec<String>, ApiError> {
        self.call(&who.user, Repeat::Never, |chat| async move {
            chat.add_members(who, conv, users).await
        })
        .await
    }

    async fn remove_member(&self, who: &Identity, conv: &str, user: &str) -> Result<(), ApiError> {
        self.call(&who.user, Repeat::Never, |chat| async move {
            chat.remove_member(who, conv, user).await
        })
        .await
    }

    async fn devices(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        self.call(user, Repeat::Safe, |chat| async move {
            chat.devices(user).await
        })
        .await
    }

    async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError> {
        self.call(&who.user, Repeat::Safe, |chat| async move {
            chat.register_push(who, provider, token, configured).await
        })
        .await
    }

    async fn unlink_device(&self, user: &str, device: &str) -> Result<(), ApiError> {
        self.call(user, Repeat::Never, |chat| async move {
            chat.unlink_device(user, device).await
        })
        .await
    }
}
