//! The sequencing seam: what the chat role asks of the sequencer role ([`Sequencer`]) and what
//! the sequencer tells those who tail its outbox after each commit ([`CommitListener`]). The
//! in-process binding is `courier_sequencer::LocalSequencer`.

use courier_store::{
    Append, AppendOutcome, AppendRefused, ListedEntry, MediaReference, StoreError,
};
use futures::future::BoxFuture;
use std::sync::Arc;

/// Why an append was not sequenced. The store's error is kept as it is, so that clients learn
/// by its type whether a retry with the same `client_msg_id` is safe (see `error.rs`); a
/// `Refused` append is refused for good.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SequencerError {
    /// Refused at its place in the conversation's order (membership); retrying changes nothing.
    #[error(transparent)]
    Refused(#[from] AppendRefused),
    #[error("the sequencer is overloaded; retry with the same client_msg_id")]
    Overloaded,
    /// Past the conversation's send rate (a group's, kept by the owner of its shard).
    #[error("too many sends to this group; slow down")]
    RateLimited { retry_after_ms: u64 },
    #[error("this node no longer owns the conversation's shard; retry")]
    ShardMoved,
    /// The conversation's shard has an outbox entry older than the sequencer's
    /// `outbox_lag_limit` (fanout is behind on it): a message is refused before anything is
    /// committed, and the client retries with the same `client_msg_id`.
    #[error("delivery is behind; retry shortly")]
    DeliveryBehind,
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

    /// Clears the events of `conversation_id` below `new_floor` (retention), and with them the
    /// references of those messages that share media (`media`), in one commit fenced by the
    /// shard's epoch like every other shard write.
    fn trim(
        &self,
        conversation_id: &str,
        new_floor: u64,
        media: Vec<MediaReference>,
    ) -> PendingTrim;
}

/// Told after each commit which shard's outbox grew (fanout, in-process).
pub trait CommitListener: Send + Sync + 'static {
    /// `events` new entries in `shard`'s outbox that nobody lists: committed by another node,
    /// or by a commit whose outcome was unknown for a while (then possibly none).
    fn committed(&self, shard: u32, events: usize);

    /// The entries a commit of this process added to `shard`'s outbox, in key order: a shard's
    /// commits are told in their order. By default only their count is taken.
    fn committed_entries(&self, shard: u32, entries: Vec<ListedEntry>) {
        self.committed(shard, entries.len());
    }

    /// The entries a commit of this process added to `shard`'s outbox, lent: for a listener
    /// that keeps what it needs of them, not the entries (the push notifier, their headers).
    /// By default a listener that keeps entries takes a copy, and any other their count.
    fn committed_listed(&self, shard: u32, entries: &[ListedEntry]) {
        if self.keeps_entries() {
            self.committed_entries(shard, entries.to_vec());
        } else {
            self.committed(shard, entries.len());
        }
    }

    /// Whether this listener keeps the entries it is given (fanout's tail): [`Listeners`]
    /// gives the list itself only to such a listener, and lends it to the others, so that
    /// events are not copied for a listener that does not keep them.
    fn keeps_entries(&self) -> bool {
        false
    }
}

/// Told that a gateway of this process recorded places to notify a device of
/// (`courier_store::MessageStore::owe_pushes`, at a silent close): the push notifier of the
/// same process reads them at its next pass. A cluster's notifier reads them every round.
pub trait OwedPushListener: Send + Sync + 'static {
    fn owed(&self);
}

/// Several listeners told of every commit, in order.
pub struct Listeners(pub Vec<Arc<dyn CommitListener>>);

impl CommitListener for Listeners {
    fn committed(&self, shard: u32, events: usize) {
        for listener in &self.0 {
            listener.committed(shard, events);
        }
    }

    /// The last listener that keeps entries gets the commit's list, after the others had it
    /// lent ([`CommitListener::committed_listed`]: another that keeps entries takes a copy).
    fn committed_entries(&self, shard: u32, entries: Vec<ListedEntry>) {
        let last_keeper = self.0.iter().rposition(|listener| listener.keeps_entries());
        for (i, listener) in self.0.iter().enumerate() {
            if Some(i) != last_keeper {
                listener.committed_listed(shard, &entries);
            }
        }
        if let Some(last) = last_keeper {
            self.0[last].committed_entries(shard, entries);
        }
    }

    fn committed_listed(&self, shard: u32, entries: &[ListedEntry]) {
        for listener in &self.0 {
            listener.committed_listed(shard, entries);
        }
    }

    fn keeps_entries(&self) -> bool {
        self.0.iter().any(|listener| listener.keeps_entries())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_proto::{Body, Event, EventPayload, Sender};
    use std::sync::Mutex;

    /// What a listener was told: the seqs of a list, or a count.
    #[derive(Default)]
    struct Told {
        keeps: bool,
        /// Reads what is lent to it (as the push notifier does).
        borrows: bool,
        heard: Mutex<Vec<Result<Vec<u64>, usize>>>,
    }

    impl CommitListener for Told {
        fn committed(&self, _shard: u32, events: usize) {
            self.heard.lock().unwrap().push(Err(events));
        }

        fn committed_entries(&self, _shard: u32, entries: Vec<ListedEntry>) {
            let seqs = entries.iter().map(|entry| entry.event.seq).collect();
            self.heard.lock().unwrap().push(Ok(seqs));
        }

        fn committed_listed(&self, shard: u32, entries: &[ListedEntry]) {
            match self.borrows {
                true => {
                    let seqs = entries.iter().map(|entry| entry.event.seq + 100).collect();
                    self.heard.lock().unwrap().push(Ok(seqs));
                }
                false if self.keeps => self.committed_entries(shard, entries.to_vec()),
                false => self.committed(shard, entries.len()),
            }
        }

        fn keeps_entries(&self) -> bool {
            self.keeps
        }
    }

    fn entry(seq: u64) -> ListedEntry {
        ListedEntry {
            key: vec![seq as u8],
            event: Event {
                conversation_id: "d:1".into(),
                seq,
                server_msg_id: format!("m{seq}"),
                sender: Sender {
                    user: "alice".into(),
                    device: "phone".into(),
                },
                ts_ms: 1,
                payload: EventPayload::Message {
                    body: Some(Body::Text("hi".into())),
                    client_msg_id: format!("c{seq}"),
                    reply_to: None,
                    deleted: false,
                },
            },
            bytes: 10,
        }
    }

    #[test]
    fn listeners_give_the_entries_to_those_that_keep_them_and_lend_them_to_the_others() {
        let listener = |keeps, borrows| {
            Arc::new(Told {
                keeps,
                borrows,
                ..Told::default()
            })
        };
        let (counter, first, second) = (
            listener(false, false),
            listener(true, false),
            listener(true, false),
        );
        let borrower = listener(false, true);
        let listeners = Listeners(vec![
            first.clone(),
            counter.clone(),
            borrower.clone(),
            second.clone(),
        ]);
        assert!(listeners.keeps_entries());
        listeners.committed_entries(3, vec![entry(1), entry(2)]);
        listeners.committed(3, 4);
        for kept in [&first, &second] {
            assert_eq!(*kept.heard.lock().unwrap(), [Ok(vec![1, 2]), Err(4)]);
        }
        assert_eq!(*counter.heard.lock().unwrap(), [Err(2), Err(4)]);
        assert_eq!(
            *borrower.heard.lock().unwrap(),
            [Ok(vec![101, 102]), Err(4)]
        );
        // Listeners within listeners lend the list on.
        let nested = Listeners(vec![Arc::new(Listeners(vec![
            borrower.clone(),
            counter.clone(),
        ]))]);
        assert!(!nested.keeps_entries());
        nested.committed_entries(3, vec![entry(5)]);
        assert_eq!(borrower.heard.lock().unwrap().last(), Some(&Ok(vec![105])));
        assert_eq!(counter.heard.lock().unwrap().last(), Some(&Err(1)));
        assert!(!Listeners(vec![counter]).keeps_entries());
    }
}
