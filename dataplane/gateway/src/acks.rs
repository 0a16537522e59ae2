//! A connection's acks, committed one step at a time. An `ack` takes effect before any later
//! frame of its connection is handled (PROTOCOL.md), so while one commit of acks is under way
//! the connection goes on reading acks only: they queue (at most [`QUEUED_MAX`]; one naming
//! no valid conversation is refused at once, [`queue`]), and the first other frame waits, with
//! reading, until they are committed. The queued acks are then
//! committed together, as one ack per conversation and kind: the highest, since an ack is
//! cumulative. A client that acknowledges every event in its own frame thus costs one commit
//! (and one receipt to the senders) per step, not one per frame, and its acks never wait
//! behind each other's commits one by one.
//!
//! If a merged ack is refused (a seq beyond what the user may read, say), the acks it stands
//! for are committed again one by one, so that each is answered as if it had come alone: the
//! valid ones move the cursors, and each refused one gets its own `error` with its `ref`.
//!
//! Each commit runs as a task of its own, begun as it is made ([`commit`]): it goes on while
//! the connection waits on something else, such as a write to a client that stopped reading
//! (up to the gateway's `write_timeout`, 30 s). Polled by the connection alone, it stalled
//! meanwhile, and a draining `courier serve` (its deadline 25 s) exited with acks read and
//! never committed. Its `PendingAcks` only waits for the outcome: dropped, the commit still
//! ends.

use courier_chat::ChatBinding;
use courier_core::auth::Identity;
use courier_core::error::ApiError;
use courier_core::metrics::Metrics;
use courier_proto::{Ack, AckKind, ErrorCode, ids};
use foldhash::{HashMap, HashMapExt};
use futures::future::{BoxFuture, join_all};
use std::sync::Arc;
use std::time::Instant;

/// Acks queued behind a commit of acks; past it the connection reads nothing more until that
/// commit ends.
pub const QUEUED_MAX: usize = 1024;

/// Queues `ack` behind the commit of acks under way, or refuses it at once when it names no
/// valid conversation: a queued ack stays in memory until that commit ends, and a conversation
/// id is at most 128 bytes where a frame may be 64 KiB. The caller keeps the queue under
/// [`QUEUED_MAX`].
pub fn queue(queued: &mut Vec<Ack>, ack: Ack) -> Result<(), ApiError> {
    ids::conversation_id(&ack.conversation_id)?;
    queued.push(ack);
    Ok(())
}

/// A commit of acks under way: it resolves to the refused ones, each with its `ref`.
pub type PendingAcks = BoxFuture<'static, Vec<(Option<i64>, ApiError)>>;

/// Commits `acks` (in the order they were read) as described in the module documentation, in
/// a task begun now; the returned future waits for its outcome.
pub fn commit(
    chat: ChatBinding,
    who: Arc<Identity>,
    metrics: Arc<Metrics>,
    acks: Vec<Ack>,
) -> PendingAcks {
    let started = Instant::now();
    let count = acks.len();
    let committing = tokio::spawn(async move {
        let refused = match <[Ack; 1]>::try_from(acks) {
            // One ack, as each is below the peak: nothing to merge.
            Ok([ack]) => commit_merged(&chat, &who, ack.clone(), vec![ack]).await,
            Err(acks) => {
                let steps = merged(acks)
                    .into_iter()
                    .map(|(ack, parts)| commit_merged(&chat, &who, ack, parts));
                join_all(steps).await.concat()
            }
        };
        metrics
            .stages
            .ack_commit
            .observe(started.elapsed().as_secs_f64());
        refused
    });
    Box::pin(async move {
        committing.await.unwrap_or_else(|e| {
            // A panic in the chat role: the acks' outcome is unknown, their client is told.
            tracing::error!(error = %e, acks = count, "committing acks failed");
            vec![(
                None,
                ApiError::new(ErrorCode::Internal, "acks not committed"),
            )]
        })
    })
}

/// Commits `ack`, which stands for `parts`; if it is refused, each part alone.
async fn commit_merged(
    chat: &ChatBinding,
    who: &Identity,
    ack: Ack,
    parts: Vec<Ack>,
) -> Vec<(Option<i64>, ApiError)> {
    let Err(e) = chat.acknowledge(who, &ack).await else {
        return Vec::new();
    };
    if let [only] = parts.as_slice() {
        return vec![(only.reference, e)];
    }
    let mut refused = Vec::new();
    for part in parts {
        if let Err(e) = chat.acknowledge(who, &part).await {
            refused.push((part.reference, e));
        }
    }
    refused
}

/// One ack per conversation and kind, with the highest seq of `acks`, in the order each first
/// appears, and the acks it stands for.
fn merged(acks: Vec<Ack>) -> Vec<(Ack, Vec<Ack>)> {
    let mut merged: Vec<(Ack, Vec<Ack>)> = Vec::new();
    let mut index: HashMap<(String, bool), usize> = HashMap::new();
    for ack in acks {
        let key = (ack.conversation_id.clone(), ack.kind == AckKind::Read);
        match index.get(&key) {
            Some(&i) => {
                let (m, parts) = &mut merged[i];
                m.seq = m.seq.max(ack.seq);
                m.reference = None;
                parts.push(ack);
            }
            None => {
                index.insert(key, merged.len());
                merged.push((ack.clone(), vec![ack]));
            }
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::ErrorCode;

    fn ack(reference: i64, conv: &str, seq: u64, kind: AckKind) -> Ack {
        Ack {
            reference: Some(reference),
            conversation_id: conv.into(),
            seq,
            kind,
        }
    }

    #[test]
    fn an_ack_naming_no_valid_conversation_is_refused_rather_than_queued() {
        let mut queued = Vec::new();
        let long = "g:".to_owned() + &"x".repeat(60 * 1024);
        for conv in [long.as_str(), "", "g:a/b"] {
            let refused = queue(&mut queued, ack(1, conv, 3, AckKind::Read)).unwrap_err();
            assert_eq!(refused.code, ErrorCode::BadRequest, "{conv:.10}");
        }
        assert!(queued.is_empty());
        queue(&mut queued, ack(2, "g:a", 3, AckKind::Read)).unwrap();
        assert_eq!(queued, [ack(2, "g:a", 3, AckKind::Read)]);
    }

    #[test]
    fn acks_merge_per_conversation_and_kind_into_the_highest_keeping_their_parts() {
        use AckKind::{Delivered, Read};
        let acks = vec![
            ack(1, "a", 3, Delivered),
            ack(2, "b", 9, Delivered),
            ack(3, "a", 7, Delivered),
            ack(4, "a", 5, Read),
            ack(5, "a", 4, Delivered),
        ];
        let merged = merged(acks);
        let refs = |parts: &[Ack]| parts.iter().map(|p| p.reference).collect::<Vec<_>>();
        let summary: Vec<_> = merged
            .iter()
            .map(|(m, parts)| {
                (
                    m.conversation_id.as_str(),
                    m.seq,
                    m.kind,
                    m.reference,
                    refs(parts),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                ("a", 7, Delivered, None, vec![Some(1), Some(3), Some(5)]),
                ("b", 9, Delivered, Some(2), vec![Some(2)]),
                ("a", 5, Read, Some(4), vec![Some(4)]),
            ]
        );
    }
}
