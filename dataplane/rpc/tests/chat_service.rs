//! The chat service over gRPC on 127.0.0.1 (ephemeral ports), with a chat role that answers
//! by the request: refusals cross as the client's error itself, a send is accepted then
//! answered with the sequencer's outcome or error, a gateway's calls skip a dead chat node when
//! repeating them is safe and never repeat a group change, and the cluster token is required.

use courier_core::auth::Identity;
use courier_core::chat::{
    CatchUpPlan, ChatService, ConversationSummary, DeviceView, Page, Readable,
};
use courier_core::error::ApiError;
use courier_core::sequencing::{PendingAppend, SequencerError};
use courier_proto::{Body, ErrorCode};
use courier_rpc::{ChatNodeService, ClusterChat, ClusterToken};
use courier_store::embedded::EmbeddedEngine;
use courier_store::nodes::NodeRecord;
use courier_store::{AppendOutcome, MessageStore};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";

/// A chat role whose answers depend on the request: a send's text names its outcome.
#[derive(Default)]
struct Scripted {
    groups_created: AtomicUsize,
}

fn not_here() -> ApiError {
    ApiError::not_found("not scripted")
}

#[async_trait::async_trait]
impl ChatService for Scripted {
    async fn submit_send(
        &self,
        who: &Identity,
        send: &courier_proto::Send,
    ) -> Result<(String, PendingAppend), ApiError> {
        let Body::Text(text) = &send.body else {
            return Err(not_here());
        };
        let outcome = match text.as_str() {
            "stranger" => return Err(ApiError::forbidden("you are not a member of g:1")),
            "slow down" => Err(SequencerError::RateLimited {
                retry_after_ms: 250,
            }),
            _ => Ok(AppendOutcome {
                seq: 7,
                server_msg_id: format!("{}/{}", who.user, send.client_msg_id),
                ts_ms: 9,
                duplicate: true,
            }),
        };
        Ok(("d:conv".into(), Box::pin(async move { outcome })))
    }

    async fn submit_delete(
        &self,
        _: &Identity,
        _: &courier_proto::Delete,
    ) -> Result<(String, PendingAppend), ApiError> {
        Err(not_here())
    }

    async fn typing(&self, _: &Identity, _: &courier_proto::Typing) -> Result<(), ApiError> {
        Err(not_here())
    }

    async fn acknowledge(&self, _: &Identity, _: &courier_proto::Ack) -> Result<(), ApiError> {
        Err(ApiError::bad_request(
            "seq 9 is beyond the last event you may read, 3",
        ))
    }

    /// `d:big`: a page of a thousand of the largest messages a client may send (64 KiB
    /// frames), as a chat node answers `fetch` with `limit` 1000.
    async fn fetch(
        &self,
        _: &Identity,
        conv: &str,
        _: u64,
        _: Option<u32>,
    ) -> Result<Page, ApiError> {
        if conv != "d:big" {
            return Err(not_here());
        }
        let text = "x".repeat(64 * 1024 - 200);
        let events = (1..=1000)
            .map(|seq| courier_proto::Event {
                conversation_id: conv.to_owned(),
                seq,
                server_msg_id: format!("s{seq}"),
                sender: courier_proto::Sender {
                    user: "bob".into(),
                    device: "phone".into(),
                },
                ts_ms: 1,
                payload: courier_proto::EventPayload::Message {
                    body: Some(Body::Text(text.clone())),
                    client_msg_id: format!("c{seq}"),
                    reply_to: None,
                    deleted: false,
                },
            })
            .collect();
        Ok(Page {
            events,
            head_seq: 1000,
            trimmed: None,
        })
    }

    async fn readable(&self, _: &str, _: &str) -> Result<Readable, ApiError> {
        Err(not_here())
    }

    async fn catch_up_plan(
        &self,
        _: &Identity,
        _: &BTreeMap<String, u64>,
    ) -> Result<CatchUpPlan, ApiError> {
        Err(not_here())
    }

    async fn conversations(&self, _: &Identity) -> Result<Vec<ConversationSummary>, ApiError> {
        Err(not_here())
    }

    async fn receipts(
        &self,
        who: &Identity,
        conv: &str,
    ) -> Result<Vec<courier_proto::Receipt>, ApiError> {
        match conv {
            "d:conv" => Ok(vec![courier_proto::Receipt {
                conversation_id: conv.to_owned(),
                user: who.user.clone(),
                delivered_seq: 3,
                read_seq: 2,
            }]),
            _ => Err(ApiError::forbidden(format!(
                "you are not a member of {conv}"
            ))),
        }
    }

    async fn create_group(&self, _: &Identity, _: &str, _: &[String]) -> Result<String, ApiError> {
        let n = self.groups_created.fetch_add(1, Ordering::SeqCst);
        Ok(format!("g:{n}"))
    }

    async fn add_members(
        &self,
        _: &Identity,
        _: &str,
        _: &[String],
    ) -> Result<Vec<String>, ApiError> {
        Err(not_here())
    }

    async fn remove_member(&self, _: &Identity, _: &str, _: &str) -> Result<(), ApiError> {
        Err(not_here())
    }

    async fn devices(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        Ok(vec![DeviceView {
            device: format!("{user}-phone"),
            last_seen_ms: 1,
            push: true,
        }])
    }

    async fn register_push(&self, _: &Identity, _: &str, _: &str, _: bool) -> Result<(), ApiError> {
        Err(not_here())
    }

    async fn unlink_device(&self, _: &str, _: &str) -> Result<(), ApiError> {
        Err(not_here())
    }
}

async fn serve(chat: Arc<Scripted>, token: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = ChatNodeService::new(chat).into_server(ClusterToken::new(token).unwrap());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
            .await
            .unwrap();
    });
    address
}

/// An address nothing listens on.
async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A store whose registry lists `nodes` (id, address) as live chat nodes.
async fn registry(dir: &tempfile::TempDir, nodes: &[(&str, SocketAddr)]) -> MessageStore {
    let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
    let store = MessageStore::open(kv, b"", 4).await.unwrap();
    for (id, address) in nodes {
        let record = NodeRecord {
            roles: vec!["chat".into()],
            address: address.to_string(),
            // Live for the test: an hour (one past any lease a node writes is damage).
            lease_until_ms: courier_core::clock::now_ms() + 3_600_000,
            started_ms: 0,
            connections: 0,
            ..NodeRecord::default()
        };
        store.register_node(id, &record).await.unwrap();
    }
    store
}

fn who(user: &str) -> Identity {
    Identity {
        user: user.into(),
        device: "phone".into(),
        issued_at_ms: 1,
    }
}

fn text(id: &str, text: &str) -> courier_proto::Send {
    courier_proto::Send {
        reference: Some(1),
        conversation_id: None,
        to_user: Some("bob".into()),
        client_msg_id: id.into(),
        body: Body::Text(text.into()),
        reply_to: None,
    }
}

#[tokio::test]
async fn answers_and_refusals_cross_as_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let live = serve(Arc::new(Scripted::default()), TOKEN).await;
    let store = registry(&dir, &[("c1", live)]).await;
    let chat = ClusterChat::new(store, ClusterToken::new(TOKEN).unwrap());

    let (conv, pending) = chat
        .submit_send(&who("alice"), &text("m1", "hi"))
        .await
        .unwrap();
    assert_eq!(conv, "d:conv");
    let outcome = pending.await.unwrap();
    assert_eq!(
        (
            outcome.seq,
            outcome.server_msg_id.as_str(),
            outcome.ts_ms,
            outcome.duplicate
        ),
        (7, "alice/m1", 9, true)
    );
    let (_, pending) = chat
        .submit_send(&who("alice"), &text("m2", "slow down"))
        .await
        .unwrap();
    assert!(matches!(
        pending.await,
        Err(SequencerError::RateLimited {
            retry_after_ms: 250
        })
    ));
    let Err(refused) = chat
        .submit_send(&who("alice"), &text("m3", "stranger"))
        .await
    else {
        panic!("a stranger's send was accepted");
    };
    assert_eq!(refused, ApiError::forbidden("you are not a member of g:1"));
    let ack = courier_proto::Ack {
        reference: None,
        conversation_id: "d:conv".into(),
        seq: 9,
        kind: courier_proto::AckKind::Read,
    };
    assert_eq!(
        chat.acknowledge(&who("alice"), &ack).await,
        Err(ApiError::bad_request(
            "seq 9 is beyond the last event you may read, 3"
        ))
    );
    let receipts = chat.receipts(&who("alice"), "d:conv").await.unwrap();
    assert_eq!(
        receipts,
        [courier_proto::Receipt {
            conversation_id: "d:conv".into(),
            user: "alice".into(),
            delivered_seq: 3,
            read_seq: 2,
        }]
    );
    assert_eq!(
        chat.receipts(&who("alice"), "g:1").await,
        Err(ApiError::forbidden("you are not a member of g:1"))
    );
}

/// A page of `fetch` may be a thousand of the largest messages, ~64 MiB: past tonic's default
/// of 4 MiB for a message it decodes, which a gateway node's fetch then failed on.
#[tokio::test]
async fn a_page_of_a_thousand_of_the_largest_messages_crosses() {
    let dir = tempfile::tempdir().unwrap();
    let live = serve(Arc::new(Scripted::default()), TOKEN).await;
    let store = registry(&dir, &[("c1", live)]).await;
    let chat = ClusterChat::new(store, ClusterToken::new(TOKEN).unwrap());
    let page = chat
        .fetch(&who("alice"), "d:big", 0, Some(1000))
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1000);
    assert_eq!(page.events[999].seq, 1000);
}

#[tokio::test]
async fn safe_calls_skip_a_dead_chat_node_and_group_changes_are_never_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let scripted = Arc::new(Scripted::default());
    let live = serve(scripted.clone(), TOKEN).await;
    let dead = dead_address().await;
    let store = registry(&dir, &[("dead", dead), ("live", live)]).await;
    let users: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();

    // Sends and reads: every one answered, wherever its device ranks the dead node.
    let chat = ClusterChat::new(store.clone(), ClusterToken::new(TOKEN).unwrap());
    for user in &users {
        let (_, pending) = chat
            .submit_send(&who(user), &text("m", "hi"))
            .await
            .unwrap();
        assert_eq!(pending.await.unwrap().seq, 7);
        assert_eq!(
            chat.devices(user).await.unwrap()[0].device,
            format!("{user}-phone")
        );
    }

    // Group changes: one that reached the dead node first is `unavailable`, not repeated;
    // then the dead node is ranked last and the others go through.
    let chat = ClusterChat::new(store, ClusterToken::new(TOKEN).unwrap());
    let mut unavailable = 0;
    for user in &users {
        match chat.create_group(&who(user), "g", &[]).await {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                unavailable += 1;
            }
        }
    }
    assert_eq!(
        unavailable, 1,
        "the first call that met the dead node failed, no other"
    );
    assert_eq!(
        scripted.groups_created.load(Ordering::SeqCst),
        users.len() - 1
    );
}

#[tokio::test]
async fn a_gateway_with_another_token_is_refused_and_told_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let live = serve(Arc::new(Scripted::default()), TOKEN).await;
    let store = registry(&dir, &[("c1", live)]).await;
    let other = ClusterToken::new("another-cluster-token-0123456789abcdef").unwrap();
    let chat = ClusterChat::new(store, other);
    let e = chat.devices("alice").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable);
}

/// A request the chat node cannot decode (a frame of a gateway node of another version, a
/// call without its caller) is the chat role's refusal for good: the client is told
/// `internal`, naming what did not decode. As a failed call it was tried on every chat node
/// and then told `unavailable`, which the client retried with the same `client_msg_id` for
/// ever.
#[tokio::test]
async fn a_request_the_chat_node_cannot_decode_is_refused_for_good() {
    use courier_rpc::auth::AttachToken;
    use courier_rpc::proto::FrameRequest;
    use courier_rpc::proto::chat_client::ChatClient;
    let live = serve(Arc::new(Scripted::default()), TOKEN).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{live}"))
        .unwrap()
        .connect_lazy();
    let mut client =
        ChatClient::with_interceptor(channel, AttachToken::new(ClusterToken::new(TOKEN).unwrap()));
    let caller = Some(courier_rpc::proto::Caller {
        user: "alice".into(),
        device: "phone".into(),
        issued_at_ms: 1,
    });
    let garbage = FrameRequest {
        caller: caller.clone(),
        frame: vec![0xff; 3],
    };
    let nobody = FrameRequest {
        caller: None,
        frame: Vec::new(),
    };
    let refusals = [
        (client.send(garbage.clone()).await.err().unwrap(), "frame"),
        (client.typing(garbage).await.unwrap_err(), "frame"),
        (client.acknowledge(nobody).await.unwrap_err(), "caller"),
    ];
    for (status, says) in refusals {
        let told = courier_rpc::status::api_error(&status);
        assert_eq!(told.code, ErrorCode::Internal, "{status:?}");
        assert_eq!(told.retry_after_ms, None, "{told:?}");
        assert!(told.message.contains(says), "{told:?}");
    }
}

/// A chat node of a newer version, as a gateway node of this one reads it: a send answered
/// with a step this node does not know (first, or after it was accepted), a page whose event
/// and a membership record that do not decode. Every other call is refused as unimplemented.
#[derive(Default)]
struct NewerChatNode {
    calls: AtomicUsize,
}

type Progress = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<courier_rpc::proto::SendProgress, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl courier_rpc::proto::chat_server::Chat for NewerChatNode {
    type SendStream = Progress;
    type DeleteStream = Progress;

    async fn send(
        &self,
        request: tonic::Request<courier_rpc::proto::FrameRequest>,
    ) -> Result<tonic::Response<Progress>, tonic::Status> {
        use courier_rpc::proto::{SendProgress, send_progress::Step};
        self.calls.fetch_add(1, Ordering::SeqCst);
        let frame = courier_proto::Encoding::Proto
            .decode_client(&request.into_inner().frame)
            .unwrap();
        let courier_proto::ClientFrame::Send(send) = frame else {
            panic!("a send expected");
        };
        let unknown = SendProgress { step: None };
        let steps = match send.client_msg_id.as_str() {
            "unknown-first" => vec![unknown],
            _ => vec![
                SendProgress {
                    step: Some(Step::Accepted("d:conv".into())),
                },
                unknown,
            ],
        };
        let steps = futures::stream::iter(steps.into_iter().map(Ok));
        Ok(tonic::Response::new(Box::pin(steps)))
    }

    async fn delete(
        &self,
        _: tonic::Request<courier_rpc::proto::FrameRequest>,
    ) -> Result<tonic::Response<Progress>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn typing(
        &self,
        _: tonic::Request<courier_rpc::proto::FrameRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::Done>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn acknowledge(
        &self,
        _: tonic::Request<courier_rpc::proto::FrameRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::Done>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn fetch(
        &self,
        _: tonic::Request<courier_rpc::proto::FetchRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::PageResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(courier_rpc::proto::PageResponse {
            events: vec![vec![0xff; 3]],
            head_seq: 1,
            trimmed: None,
        }))
    }

    async fn readable(
        &self,
        _: tonic::Request<courier_rpc::proto::ReadableRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::ReadableResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(tonic::Response::new(courier_rpc::proto::ReadableResponse {
            member_record: vec![0xff; 3],
            ..Default::default()
        }))
    }

    async fn catch_up_plan(
        &self,
        _: tonic::Request<courier_rpc::proto::CatchUpRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::CatchUpResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn conversations(
        &self,
        _: tonic::Request<courier_rpc::proto::CallerRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::ConversationsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn receipts(
        &self,
        _: tonic::Request<courier_rpc::proto::ConversationRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::ReceiptsResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn create_group(
        &self,
        _: tonic::Request<courier_rpc::proto::CreateGroupRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::CreateGroupResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn add_members(
        &self,
        _: tonic::Request<courier_rpc::proto::MembersRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::MembersResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn remove_member(
        &self,
        _: tonic::Request<courier_rpc::proto::RemoveMemberRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::Done>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn devices(
        &self,
        _: tonic::Request<courier_rpc::proto::CallerRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::DevicesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn register_push(
        &self,
        _: tonic::Request<courier_rpc::proto::RegisterPushRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::Done>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }

    async fn unlink_device(
        &self,
        _: tonic::Request<courier_rpc::proto::UnlinkDeviceRequest>,
    ) -> Result<tonic::Response<courier_rpc::proto::Done>, tonic::Status> {
        Err(tonic::Status::unimplemented("not here"))
    }
}

/// An answer of a chat node that the gateway node cannot decode (a chat node of another
/// version, in a rolling upgrade) is final: the client is told `internal`, saying what did
/// not decode, with no retry delay, and the call is not tried on the other chat nodes. As a
/// failed call it was tried on every chat node, then told `unavailable`: a `fetch`, a catch-up
/// or a send (with the same `client_msg_id`) retried for ever. A send whose outcome does not
/// decode after it was accepted is told `internal` too: its outcome is unknown, and its
/// retries would meet the same answer.
#[tokio::test]
async fn an_answer_the_gateway_cannot_decode_is_final_internal_not_retried() {
    let dir = tempfile::tempdir().unwrap();
    let newer = Arc::new(NewerChatNode::default());
    let mut nodes = Vec::new();
    for id in ["c1", "c2"] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodes.push((id, listener.local_addr().unwrap()));
        let service = courier_rpc::proto::chat_server::ChatServer::from_arc(newer.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpIncoming::from(listener))
                .await
                .unwrap();
        });
    }
    let store = registry(&dir, &nodes).await;
    let chat = ClusterChat::new(store, ClusterToken::new(TOKEN).unwrap());
    let final_internal = |told: ApiError| {
        assert_eq!(told.code, ErrorCode::Internal, "{told:?}");
        assert_eq!(told.retry_after_ms, None, "{told:?}");
        assert!(told.message.contains("could not decode"), "{told:?}");
    };

    final_internal(chat.fetch(&who("alice"), "d:1", 0, None).await.unwrap_err());
    assert_eq!(newer.calls.load(Ordering::SeqCst), 1, "not tried again");
    final_internal(chat.readable("d:1", "alice").await.unwrap_err());
    assert_eq!(newer.calls.load(Ordering::SeqCst), 2, "not tried again");
    let refused = chat
        .submit_send(&who("alice"), &text("unknown-first", "hi"))
        .await;
    final_internal(refused.err().unwrap());
    assert_eq!(newer.calls.load(Ordering::SeqCst), 3, "not tried again");
    let (_, pending) = chat
        .submit_send(&who("alice"), &text("unknown-answer", "hi"))
        .await
        .unwrap();
    final_internal(ApiError::from(pending.await.unwrap_err()));
}
