//! Conversation membership as fanout sees it: cached per conversation and kept in step with
//! the conversation's own order. Fanout applies each membership event as it passes through
//! (sequenced invalidation), so an event is delivered to exactly the members at its seq.

use courier_proto::{Event, EventPayload};
use courier_store::{MessageStore, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Members with the seq they joined at.
pub type Members = Arc<Vec<(String, u64)>>;

/// Conversations cached before the cache is emptied and refilled on demand.
const CACHE_CONVERSATIONS: usize = 50_000;

pub struct MembershipCache {
    store: MessageStore,
    cache: Mutex<HashMap<String, Members>>,
}

impl MembershipCache {
    pub fn new(store: MessageStore) -> Self {
        Self {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, conv: &str) -> Option<Members> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(conv)
            .cloned()
    }

    /// The members of `conv`.
    pub async fn members(&self, conv: &str) -> Result<Members, StoreError> {
        if let Some(members) = self.cached(conv) {
            return Ok(members);
        }
        let records = self.store.member_records(conv).await?;
        let members: Members = Arc::new(
            records
                .into_iter()
                .map(|(u, r)| (u, r.joined_seq))
                .collect(),
        );
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= CACHE_CONVERSATIONS {
            cache.clear();
        }
        cache.insert(conv.to_owned(), members.clone());
        Ok(members)
    }

    /// The members an event goes to: those who had joined by its seq. A `member_removed`
    /// event still goes to the removed user; nothing after it does.
    pub async fn recipients(&self, event: &Event) -> Result<Members, StoreError> {
        let members = self.members(&event.conversation_id).await?;
        let recipients: Members = match &event.payload {
            EventPayload::MemberRemoved { user } if !members.iter().any(|(m, _)| m == user) => {
                let mut with_removed = (*members).clone();
                with_removed.push((user.clone(), 0));
                Arc::new(with_removed)
            }
            _ if members.iter().any(|(_, joined)| *joined > event.seq) => Arc::new(
                members
                    .iter()
                    .filter(|(_, joined)| *joined <= event.seq)
                    .cloned()
                    .collect(),
            ),
            _ => members,
        };
        self.apply(event);
        Ok(recipients)
    }

    /// Updates the cached membership of the event's conversation, if cached.
    fn apply(&self, event: &Event) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Some(members) = cache.get_mut(&event.conversation_id) else {
            return;
        };
        match &event.payload {
            EventPayload::MemberAdded { user } if !members.iter().any(|(m, _)| m == user) => {
                Arc::make_mut(members).push((user.clone(), event.seq));
            }
            EventPayload::MemberRemoved { user } => {
                Arc::make_mut(members).retain(|(m, _)| m != user);
            }
            EventPayload::GroupCreated {
                members: founders, ..
            } => {
                *members = Arc::new(founders.iter().map(|u| (u.clone(), event.seq)).collect());
            }
            _ => {}
        }
    }
}
