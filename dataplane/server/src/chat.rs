//! The chat role (stateless): validates client requests, enforces membership, resolves direct
//! conversations, hands appends to the sequencer, records acknowledgements and forwards
//! receipts. Handlers of both WebSocket frames and HTTP requests call into it.

use crate::auth::Identity;
use crate::error::ApiError;
use crate::routes::{Delivery, Routes};
use crate::sequencer::{PendingAppend, Sequencer};
use courier_proto::{AckKind, Body, Event, EventPayload, Receipt, Sender, ServerFrame, ids};
use courier_store::{Append, MessageStore, NewConversation, ReceiptKind};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// Events per `fetch` when the client gives no limit.
pub const DEFAULT_FETCH_LIMIT: u32 = 100;
/// Most events per `fetch`; larger limits are lowered to it.
pub const MAX_FETCH_LIMIT: u32 = 1000;

/// The id of the direct conversation between two users: the same whoever starts it, and
/// within the conversation-id alphabet whatever the user ids are.
pub fn direct_conversation_id(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let mut hash = Sha256::new();
    hash.update(first.as_bytes());
    hash.update([0]);
    hash.update(second.as_bytes());
    format!("d:{}", hex::encode(&hash.finalize()[..16]))
}

/// A conversation as listed by `GET /v1/conversations`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub kind: String,
    pub name: String,
    pub head_seq: u64,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

/// One conversation of a catch-up: send events in `(from, head]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    pub conversation_id: String,
    pub from: u64,
    pub head: u64,
}

pub struct Chat {
    store: MessageStore,
    sequencer: Arc<dyn Sequencer>,
    routes: Arc<Routes>,
}

impl Chat {
    pub fn new(store: MessageStore, sequencer: Arc<dyn Sequencer>, routes: Arc<Routes>) -> Self {
        Self {
            store,
            sequencer,
            routes,
        }
    }

    pub fn store(&self) -> &MessageStore {
        &self.store
    }

    /// Checks that `conv` exists and `user` belongs to it.
    pub async fn check_member(&self, conv: &str, user: &str) -> Result<(), ApiError> {
        ids::conversation_id(conv)?;
        if self.store.is_member(conv, user).await? {
            return Ok(());
        }
        if self.store.conversation(conv).await?.is_none() {
            return Err(ApiError::not_found(format!("no conversation {conv}")));
        }
        Err(ApiError::forbidden(format!(
            "you are not a member of {conv}"
        )))
    }

    /// Validates a `send` and queues it with the sequencer. Returns the conversation id and a
    /// future that resolves once the message is durable.
    pub async fn submit_send(
        &self,
        who: &Identity,
        send: &courier_proto::Send,
    ) -> Result<(String, PendingAppend), ApiError> {
        ids::client_msg_id(&send.client_msg_id)?;
        validate_body(&send.body)?;
        if send.reply_to == Some(0) {
            return Err(ApiError::bad_request("reply_to must be a seq (1 or more)"));
        }
        let (conversation_id, create) = match (&send.conversation_id, &send.to_user) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give either conversation_id or to_user, not both",
                ));
            }
            (None, None) => {
                return Err(ApiError::bad_request(
                    "conversation_id or to_user is required",
                ));
            }
            (Some(conv), None) => {
                self.check_member(conv, &who.user).await?;
                (conv.clone(), None)
            }
            (None, Some(peer)) => {
                ids::user_id(peer).map_err(|e| ApiError::bad_request(format!("to_user: {e}")))?;
                let mut members = vec![who.user.clone(), peer.clone()];
                members.dedup();
                let create = NewConversation {
                    kind: "direct",
                    name: String::new(),
                    members,
                };
                (direct_conversation_id(&who.user, peer), Some(create))
            }
        };
        let pending = self.sequencer.submit(Append {
            conversation_id: conversation_id.clone(),
            sender: Sender {
                user: who.user.clone(),
                device: who.device.clone(),
            },
            client_msg_id: Some(send.client_msg_id.clone()),
            payload: EventPayload::Message {
                body: Some(send.body.clone()),
                client_msg_id: send.client_msg_id.clone(),
                reply_to: send.reply_to,
                deleted: false,
            },
            create,
        });
        Ok((conversation_id, pending))
    }

    /// Records an `ack` durably, then tells the other members' devices if the user's receipt
    /// cursors moved.
    pub async fn acknowledge(
        &self,
        who: &Identity,
        ack: &courier_proto::Ack,
    ) -> Result<(), ApiError> {
        let conv = &ack.conversation_id;
        self.check_member(conv, &who.user).await?;
        if ack.seq == 0 {
            return Err(ApiError::bad_request("seq must be 1 or more"));
        }
        let head = self.store.head(conv).await?;
        if ack.seq > head {
            return Err(ApiError::bad_request(format!(
                "seq {} is beyond the conversation's head {head}",
                ack.seq
            )));
        }
        let (before_delivered, before_read) = self.store.receipt(conv, &who.user).await?;
        let kind = match ack.kind {
            AckKind::Delivered => ReceiptKind::Delivered,
            AckKind::Read => ReceiptKind::Read,
        };
        self.store
            .acknowledge(&who.user, &who.device, conv, ack.seq, kind)
            .await?;
        let (delivered_seq, read_seq) = self.store.receipt(conv, &who.user).await?;
        if (delivered_seq, read_seq) != (before_delivered, before_read) {
            let receipt = Arc::new(ServerFrame::Receipt(Receipt {
                conversation_id: conv.clone(),
                user: who.user.clone(),
                delivered_seq,
                read_seq,
            }));
            for member in self.store.members(conv).await? {
                if member == who.user {
                    continue;
                }
                for connection in self.routes.connections(&member) {
                    connection.deliver(Delivery::Frame(receipt.clone()));
                }
            }
        }
        Ok(())
    }

    /// Events of `conv` after `after_seq` (at most `limit`) and the conversation's head.
    pub async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<(Vec<Event>, u64), ApiError> {
        self.check_member(conv, &who.user).await?;
        let limit = match limit {
            Some(0) => return Err(ApiError::bad_request("limit must be 1 or more")),
            Some(n) => n.min(MAX_FETCH_LIMIT),
            None => DEFAULT_FETCH_LIMIT,
        };
        let head = self.store.head(conv).await?;
        let events = self.store.events(conv, after_seq, limit as usize).await?;
        Ok((events, head))
    }

    /// The user's conversations with their heads and the user's receipt cursors.
    pub async fn conversations(
        &self,
        who: &Identity,
    ) -> Result<Vec<ConversationSummary>, ApiError> {
        let mut out = Vec::new();
        for conv in self.store.conversations_of(&who.user).await? {
            let record = self.store.conversation(&conv).await?.unwrap_or_default();
            let name = if record.kind == "direct" {
                let members = self.store.members(&conv).await?;
                members
                    .into_iter()
                    .find(|m| *m != who.user)
                    .unwrap_or_else(|| who.user.clone())
            } else {
                record.name
            };
            let (delivered_seq, read_seq) = self.store.receipt(&conv, &who.user).await?;
            out.push(ConversationSummary {
                head_seq: self.store.head(&conv).await?,
                conversation_id: conv,
                kind: record.kind,
                name,
                delivered_seq,
                read_seq,
            });
        }
        Ok(out)
    }

    /// What a device must be sent to catch up: for each of the user's conversations whose head
    /// is above the device's delivered cursor (or the client's override of it), the range.
    /// Also returns the device's cursors, where live delivery resumes.
    pub async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &std::collections::BTreeMap<String, u64>,
    ) -> Result<(Vec<CatchUp>, HashMap<String, u64>), ApiError> {
        let cursors = self.store.device_cursors(&who.user, &who.device).await?;
        let mut plan = Vec::new();
        for conv in self.store.conversations_of(&who.user).await? {
            let from = overrides
                .get(&conv)
                .or_else(|| cursors.get(&conv))
                .copied()
                .unwrap_or(0);
            let head = self.store.head(&conv).await?;
            if head > from {
                plan.push(CatchUp {
                    conversation_id: conv,
                    from,
                    head,
                });
            }
        }
        Ok((plan, cursors))
    }
}

fn validate_body(body: &Body) -> Result<(), ApiError> {
    match body {
        Body::Text(text) if text.is_empty() => Err(ApiError::bad_request("body.text is empty")),
        Body::Text(_) => Ok(()),
        Body::Media(media) => {
            ids::media_id(&media.media_id)?;
            if media.mime.is_empty() || media.mime.len() > 255 {
                return Err(ApiError::bad_request(
                    "body.media.mime must be 1 to 255 characters",
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_ids_are_symmetric_and_url_safe() {
        let id = direct_conversation_id("alice@example.com", "bob");
        assert_eq!(id, direct_conversation_id("bob", "alice@example.com"));
        assert!(ids::conversation_id(&id).is_ok());
        assert_ne!(id, direct_conversation_id("alice", "bob"));
    }
}
