//! The sequencer over gRPC on 127.0.0.1 (ephemeral port): appends keep the order `submit` was
//! called in, every outcome and error crosses the network as itself, a broken stream answers
//! its waiters and the next append opens a new one, and the cluster token is required.

use courier_core::error::ApiError;
use courier_core::sequencing::{PendingAppend, PendingTrim, Sequencer, SequencerError};
use courier_proto::{Body, ErrorCode, Sender, pb};
use courier_rpc::auth::AttachToken;
use courier_rpc::proto::sequencer_client::SequencerClient;
use courier_rpc::proto::{AppendRequest, SubmitRequest};
use courier_rpc::sequencer::{outcome, submit_request};
use courier_rpc::{ClusterToken, RemoteSequencer, SequencerService};
use courier_store::{
    Append, AppendOutcome, AppendRefused, MediaReference, NewConversation, StoreError,
};
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;

const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";

/// Numbers appends per conversation in the order they are submitted; a message whose text
/// names an error fails with it. Keeps the trims it is asked for.
#[derive(Default)]
struct Numbering {
    heads: Mutex<HashMap<String, u64>>,
    trims: Mutex<Vec<(String, u64, Vec<MediaReference>)>>,
}

impl Sequencer for Numbering {
    fn submit(&self, append: Append) -> PendingAppend {
        let text = match &append.payload {
            courier_proto::EventPayload::Message {
                body: Some(Body::Text(text)),
                ..
            } => text.clone(),
            _ => String::new(),
        };
        let result = match text.as_str() {
            "overloaded" => Err(SequencerError::Overloaded),
            "moved" => Err(SequencerError::ShardMoved),
            "fence" => Err(SequencerError::Store(StoreError::FenceChanged {
                key: b"k".to_vec(),
            })),
            "admin" => Err(SequencerError::Refused(AppendRefused::NotAdmin)),
            "damaged" => Err(SequencerError::Refused(AppendRefused::Damaged)),
            _ => {
                let mut heads = self.heads.lock().unwrap();
                let head = heads.entry(append.conversation_id.clone()).or_default();
                *head += 1;
                Ok(AppendOutcome {
                    seq: *head,
                    server_msg_id: format!("s{head}"),
                    ts_ms: 7,
                    duplicate: false,
                })
            }
        };
        Box::pin(async move { result })
    }

    fn trim(
        &self,
        conversation_id: &str,
        new_floor: u64,
        media: Vec<MediaReference>,
    ) -> PendingTrim {
        let trim = (conversation_id.to_owned(), new_floor, media);
        self.trims.lock().unwrap().push(trim);
        Box::pin(async move { Ok(new_floor - 1) })
    }
}

fn message(conv: &str, id: &str, text: &str) -> Append {
    let sender = Sender {
        user: "alice".into(),
        device: "p".into(),
    };
    Append {
        create: Some(NewConversation::direct("alice", "bob")),
        ..Append::message(
            conv.into(),
            sender,
            id.into(),
            Body::Text(text.into()),
            None,
        )
    }
}

/// Serves `sequencer` until the returned sender is dropped or fired.
async fn serve(sequencer: Arc<dyn Sequencer>, token: &str) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let service = SequencerService::new(sequencer).into_server(ClusterToken::new(token).unwrap());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    (address, stop)
}

fn remote(address: SocketAddr, token: &str) -> RemoteSequencer {
    RemoteSequencer::new(
        &format!("http://{address}"),
        ClusterToken::new(token).unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn appends_are_sequenced_in_the_order_they_were_submitted() {
    let (address, _stop) = serve(Arc::new(Numbering::default()), TOKEN).await;
    let remote = remote(address, TOKEN);
    // Submitted without waiting, as a connection pipelines its sends.
    let pending: Vec<PendingAppend> = (0..2_000)
        .map(|i| remote.submit(message(&format!("c{}", i % 3), &format!("m{i}"), "hi")))
        .collect();
    let outcomes = futures::future::join_all(pending).await;
    for (i, outcome) in outcomes.into_iter().enumerate() {
        assert_eq!(
            outcome.unwrap().seq,
            i as u64 / 3 + 1,
            "append {i} out of order"
        );
    }
}

#[tokio::test]
async fn outcomes_and_errors_cross_the_network_as_themselves() {
    let numbering = Arc::new(Numbering::default());
    let (address, _stop) = serve(numbering.clone(), TOKEN).await;
    let remote = remote(address, TOKEN);
    let ok = remote.submit(message("c", "1", "hi")).await.unwrap();
    assert_eq!((ok.seq, ok.server_msg_id.as_str(), ok.ts_ms), (1, "s1", 7));
    assert!(matches!(
        remote.submit(message("c", "2", "overloaded")).await,
        Err(SequencerError::Overloaded)
    ));
    assert!(matches!(
        remote.submit(message("c", "3", "moved")).await,
        Err(SequencerError::ShardMoved)
    ));
    assert!(matches!(
        remote.submit(message("c", "4", "fence")).await,
        Err(SequencerError::Store(StoreError::FenceChanged { key })) if key == b"k"
    ));
    assert!(matches!(
        remote.submit(message("c", "5", "admin")).await,
        Err(SequencerError::Refused(AppendRefused::NotAdmin))
    ));
    assert!(matches!(
        remote.submit(message("c", "6", "damaged")).await,
        Err(SequencerError::Refused(AppendRefused::Damaged))
    ));
    let shared = vec![MediaReference {
        media_id: "m1".into(),
        seq: 4,
    }];
    assert_eq!(remote.trim("c", 10, shared.clone()).await.unwrap(), 9);
    assert_eq!(
        *numbering.trims.lock().unwrap(),
        [("c".to_owned(), 10, shared)],
        "the trimmed messages' media crossed with the trim"
    );
}

/// Never answers: appends stay in flight until the stream breaks.
struct Silent;

impl Sequencer for Silent {
    fn submit(&self, _append: Append) -> PendingAppend {
        Box::pin(futures::future::pending())
    }

    fn trim(
        &self,
        _conversation_id: &str,
        _new_floor: u64,
        _media: Vec<MediaReference>,
    ) -> PendingTrim {
        Box::pin(futures::future::pending())
    }
}

#[tokio::test]
async fn a_broken_stream_makes_its_appends_unknown_and_the_next_append_opens_a_new_one() {
    let (address, stop) = serve(Arc::new(Silent), TOKEN).await;
    let remote = remote(address, TOKEN);
    let in_flight = remote.submit(message("c", "1", "hi"));
    // The node goes away with the append in flight (its outcome is unknown to the caller).
    drop(stop);
    assert!(matches!(
        in_flight.await,
        Err(SequencerError::Store(StoreError::MaybeCommitted))
    ));
    // A node answers at the same place again (another port here: the address is the node's).
    let (address, _stop) = serve(Arc::new(Numbering::default()), TOKEN).await;
    let again = self::remote(address, TOKEN);
    assert_eq!(again.submit(message("c", "1", "hi")).await.unwrap().seq, 1);
}

#[tokio::test]
async fn a_stream_without_the_cluster_token_appends_nothing() {
    let numbering = Arc::new(Numbering::default());
    let (address, _stop) = serve(numbering.clone(), TOKEN).await;
    let stranger = remote(address, "another-cluster-token-0123456789abcdefgh");
    let refused = stranger.submit(message("c", "1", "hi")).await;
    assert!(
        matches!(refused, Err(SequencerError::Store(StoreError::Engine(_)))),
        "refused before anything was appended, not an unknown outcome: {refused:?}"
    );
    assert!(numbering.heads.lock().unwrap().is_empty());
    assert!(stranger.trim("c", 10, Vec::new()).await.is_err());
}

/// An append the sequencer node cannot decode (here an event kind only a newer chat node
/// knows, as in a rolling upgrade; a request without its append; bytes that are no event) is
/// refused for good: the client is told `internal`, naming what did not decode, and never
/// `unavailable`, which it would retry with the same `client_msg_id` forever. Nothing is
/// appended, and the stream goes on serving the appends it can decode.
#[tokio::test]
async fn an_append_the_node_cannot_decode_is_refused_for_good_not_retried() {
    let numbering = Arc::new(Numbering::default());
    let (address, _stop) = serve(numbering.clone(), TOKEN).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect_lazy();
    let mut client = SequencerClient::with_interceptor(
        channel,
        AttachToken::new(ClusterToken::new(TOKEN).unwrap()),
    );
    let mut newer_kind = submit_request(message("c", "1", "hi"));
    let mut event = pb::Event::decode(newer_kind.event.as_slice()).unwrap();
    event.kind = "reaction".into();
    newer_kind.event = event.encode_to_vec();
    let no_event = SubmitRequest {
        event: vec![0xff; 3],
        ..submit_request(message("c", "2", "hi"))
    };
    let requests = vec![
        AppendRequest {
            id: 1,
            submit: Some(newer_kind),
        },
        AppendRequest {
            id: 2,
            submit: None,
        },
        AppendRequest {
            id: 3,
            submit: Some(no_event),
        },
        AppendRequest {
            id: 4,
            submit: Some(submit_request(message("c", "4", "hi"))),
        },
    ];
    let mut answers = client
        .append(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut by_id = HashMap::new();
    while let Some(answer) = answers.message().await.unwrap() {
        by_id.insert(answer.id, outcome(answer.result));
        if by_id.len() == 4 {
            break;
        }
    }
    for (id, says) in [
        (1, "unknown event kind `reaction`"),
        (2, "without"),
        (3, "event"),
    ] {
        let refused = by_id.remove(&id).unwrap().unwrap_err();
        let told = ApiError::from(refused);
        assert_eq!(told.code, ErrorCode::Internal, "append {id}: {told:?}");
        assert_eq!(told.retry_after_ms, None, "append {id}: {told:?}");
        assert!(told.message.contains(says), "append {id}: {told:?}");
    }
    assert_eq!(by_id.remove(&4).unwrap().unwrap().seq, 1);
    assert_eq!(numbering.heads.lock().unwrap().get("c"), Some(&1));
}
