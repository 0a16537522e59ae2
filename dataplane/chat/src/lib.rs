//! The chat role (stateless): validates client requests, enforces membership, resolves direct
//! conversations, hands appends to the sequencer, records acknowledgements and forwards
//! receipts. Handlers of both WebSocket frames and HTTP requests call into it.

pub mod admission;
pub mod devices;
pub mod groups;
pub mod receipts;

use crate::admission::{AdmissionLimits, Admitted, SendAdmission};
use crate::devices::Devices;
use crate::receipts::ReceiptRelay;
use courier_core::auth::Identity;
use courier_core::clock::now_ms;
use courier_core::context::Context;
use courier_core::error::ApiError;
use courier_core::gateways::{Gateways, Offer};
use courier_core::limits::{KeyedLimit, Rate};
use courier_core::membership::MembershipCache;
use courier_core::metrics::{Metrics, ScopeLabel};
use courier_core::sequencing::{PendingAppend, Sequencer};
use courier_core::storage_health::StorageHealth;
use courier_proto::{
    AckKind, Body, ErrorCode, EventPayload, Receipt, Sender, ServerFrame, TypingNotice, ids,
};
use courier_store::{
    Append, AppendKey, MediaRecord, MemberRecord, MessageStore, NewConversation, ReadBounds,
    ReceiptKind, StoreError,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Events per `fetch` when the client gives no limit.
pub const DEFAULT_FETCH_LIMIT: u32 = 100;
/// Most events per `fetch`; larger limits are lowered to it.
pub const MAX_FETCH_LIMIT: u32 = 1000;

/// Times a send marks the media it shares ([`Chat::shared_media`]): a mark refused because the
/// record changed reads it again, and then finds it fresh (uploaded or shared meanwhile) or
/// gone, so a second refusal means the record keeps changing.
const SHARE_ATTEMPTS: usize = 2;

/// The id of the direct conversation between two users: the same whoever starts it, and
/// within the conversation-id alphabet whatever the user ids are.
pub fn direct_conversation_id(a: &str, b: &str) -> String {
    let (first, second) = if a <= b { (a, b) } else { (b, a) };
    let mut hash = Sha256::new();
    hash.update(first.as_bytes());
    hash.update([0]);
    hash.update(second.as_bytes());
    // Built without `format!` or `hex::encode` (a `char` at a time): it runs on every send to
    // a user.
    let mut id = *b"d:00000000000000000000000000000000";
    hex::encode_to_slice(&hash.finalize()[..16], &mut id[2..]).expect("16 bytes take 32 digits");
    String::from_utf8(id.to_vec()).expect("hex digits are UTF-8")
}

pub use courier_core::chat::{
    CatchUp, CatchUpPlan, ChatService, ConversationSummary, DeviceView, Page, Readable,
};

/// Limits and policies of the chat role; see `docs/groups.md`.
#[derive(Debug, Clone)]
pub struct ChatLimits {
    pub max_group_members: usize,
    pub max_groups_per_user: u64,
    /// Most direct conversations a user may start (0: no limit): each is a cursor its devices
    /// hold and a conversation every connection of theirs catches up on.
    pub max_direct_conversations_per_user: u64,
    /// Longest group name, in characters.
    pub max_group_name: usize,
    /// Most users named in one create or add request.
    pub max_users_per_request: usize,
    /// Events before its join that a new group member may read (0: from its join on).
    pub history_on_join: u64,
    /// Most members of a group whose typing is relayed (`--large-group-threshold`): in a
    /// larger one each frame would be offered to every member, and a few typists would cost
    /// more than the group's messages.
    pub typing_members_max: usize,
    /// When new sends are answered `unavailable` because the node is past its capacity.
    pub admission: AdmissionLimits,
    pub user_sends: Rate,
    /// The media sweeper's TTL (`--media-unreferenced-ttl`): a send that shares media unused
    /// for half of it marks the media shared first ([`MessageStore::share_media`]), so that the
    /// sweeper cannot forget it before the send's reference commits.
    pub media_unreferenced_ttl: Duration,
}

impl Default for ChatLimits {
    fn default() -> Self {
        Self {
            max_group_members: 100_000,
            max_groups_per_user: 10_000,
            max_direct_conversations_per_user: 10_000,
            max_group_name: 128,
            max_users_per_request: 1000,
            history_on_join: 0,
            typing_members_max: 1000,
            admission: AdmissionLimits::default(),
            user_sends: Rate {
                per_second: 100,
                burst: 200,
            },
            // `--media-unreferenced-ttl`'s default.
            media_unreferenced_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What the chat role shares with the roles it calls.
pub struct Chat {
    pub(crate) store: MessageStore,
    pub(crate) sequencer: Arc<dyn Sequencer>,
    pub(crate) gateways: Arc<dyn Gateways>,
    pub(crate) membership: Arc<MembershipCache>,
    pub(crate) receipts: Arc<ReceiptRelay>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) limits: ChatLimits,
    storage: Arc<StorageHealth>,
    user_sends: KeyedLimit,
    admission: Arc<SendAdmission>,
}

impl Chat {
    pub fn new(
        context: Context,
        sequencer: Arc<dyn Sequencer>,
        receipts: Arc<ReceiptRelay>,
        limits: ChatLimits,
        storage: Arc<StorageHealth>,
    ) -> Self {
        let Context {
            store,
            gateways,
            membership,
            metrics,
        } = context;
        Self {
            storage,
            user_sends: KeyedLimit::new(limits.user_sends, "sends from this user"),
            admission: SendAdmission::new(limits.admission, metrics.clone()),
            store,
            sequencer,
            gateways,
            membership,
            receipts,
            metrics,
            limits,
        }
    }

    pub fn store(&self) -> &MessageStore {
        &self.store
    }

    /// Forgets idle rate-limit buckets (called periodically).
    pub fn forget_idle_limits(&self) {
        self.user_sends.forget_idle();
    }

    /// What `user` may read of `conv`: the events of its periods of membership (a former
    /// member keeps what it could read while a member). Refused for a user who never belonged
    /// to the conversation.
    pub async fn readable(&self, conv: &str, user: &str) -> Result<Readable, ApiError> {
        let record = self.member_record(conv, user).await?;
        Ok(self.readable_with(record, self.store.floor(conv).await?))
    }

    /// What a member with `record` may read of a conversation whose lowest retained seq is
    /// `floor`.
    fn readable_with(&self, record: MemberRecord, floor: u64) -> Readable {
        Readable {
            record,
            history_on_join: self.limits.history_on_join,
            floor,
        }
    }

    /// The membership record (current or former) of `user` in `conv`; refused for a user who
    /// never belonged to it.
    async fn member_record(&self, conv: &str, user: &str) -> Result<MemberRecord, ApiError> {
        ids::conversation_id(conv)?;
        match self.store.member(conv, user).await? {
            Some(record) => Ok(record),
            None => Err(self.not_a_member(conv).await),
        }
    }

    /// `not_found` for a group that does not exist, else `forbidden`. A direct conversation
    /// is `forbidden` whether it exists or not: anyone can derive its id from the two user
    /// ids, and the answer must not tell a stranger whether those two have talked.
    async fn not_a_member(&self, conv: &str) -> ApiError {
        if ids::is_direct(conv) {
            return ApiError::forbidden(format!("you are not a member of {conv}"));
        }
        match self.store.conversation(conv).await {
            Ok(None) => ApiError::not_found(format!("no conversation {conv}")),
            Ok(Some(_)) => ApiError::forbidden(format!("you are not a member of {conv}")),
            Err(e) => e.into(),
        }
    }

    fn count_limited(
        &self,
        scope: &'static str,
        result: Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        if result.is_err() {
            self.metrics
                .rate_limited
                .get_or_create(&ScopeLabel { scope })
                .inc();
        }
        result
    }

    /// Takes a token of `who`'s send rate (`rate_limited` past it) for an event every member
    /// gets: a message, a delete for everyone, a membership change made to others (`groups`
    /// module documentation, "Rate").
    fn check_user_rate(&self, who: &Identity) -> Result<(), ApiError> {
        self.count_limited("user", self.user_sends.check(&who.user))
    }

    /// Refuses new sends while storage cannot take them (low disk, halted store). Sends to a
    /// shard whose delivery is behind are refused by the shard's sequencer, which reads the
    /// outbox lag in the store (`SequencerError::DeliveryBehind`).
    fn check_backpressure(&self) -> Result<(), ApiError> {
        self.storage.check_send()
    }

    /// Queues `append` with the sequencer once admitted; the place is given back when the
    /// append is answered (or the caller stops waiting for it).
    fn submit(&self, admitted: Admitted, append: Append) -> PendingAppend {
        let pending = self.sequencer.submit(append);
        Box::pin(async move {
            let outcome = pending.await;
            admitted.answered();
            outcome
        })
    }

    /// Checks that `conv` exists and `user` is a member of it now.
    pub async fn check_member(&self, conv: &str, user: &str) -> Result<(), ApiError> {
        ids::conversation_id(conv)?;
        if self.store.is_member(conv, user).await? {
            return Ok(());
        }
        Err(self.not_a_member(conv).await)
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
        self.check_user_rate(who)?;
        self.check_backpressure()?;
        let admitted = self.admission.admit()?;
        if send.reply_to == Some(0) {
            return Err(ApiError::bad_request("reply_to must be a seq (1 or more)"));
        }
        let body = self.checked_media(who, &send.body).await?;
        let mut refused = None;
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
            // Sends to a group are rate-limited by the owner of its shard (the sequencer).
            (Some(conv), None) => {
                let member = self.check_member(conv, &who.user).await;
                refused = member.err();
                (conv.clone(), None)
            }
            (None, Some(peer)) => {
                ids::user_id(peer).map_err(|e| ApiError::bad_request(format!("to_user: {e}")))?;
                let create = NewConversation::direct(&who.user, peer)
                    .started_at_most(self.limits.max_direct_conversations_per_user);
                (direct_conversation_id(&who.user, peer), Some(create))
            }
        };
        let sender = Sender {
            user: who.user.clone(),
            device: who.device.clone(),
        };
        let message = Append::message(
            conversation_id.clone(),
            sender,
            send.client_msg_id.clone(),
            body,
            send.reply_to,
        );
        if let Some(refused) = refused {
            // A former member's retry of a send committed while it was one gets that send's
            // outcome (`duplicate`), as the protocol promises a retry; any other send of a
            // non-member is refused here, taking none of the group's send rate.
            return match self.store.earlier_outcome(&message).await? {
                Some(outcome) => Ok((conversation_id, Box::pin(async move { Ok(outcome) }))),
                None => Err(refused),
            };
        }
        // A reply names a message before it: heads only grow, so a seq past the head now is
        // past it when the reply is sequenced too. One read, for replies only.
        if let Some(reply_to) = send.reply_to
            && reply_to > self.store.head(&conversation_id).await?
        {
            return Err(ApiError::bad_request(format!(
                "reply_to: the conversation has no message {reply_to}"
            )));
        }
        let pending = self.submit(admitted, Append { create, ..message });
        Ok((conversation_id, pending))
    }

    /// A media body may name only media the sender uploaded; its type, size and hash are
    /// taken from the upload, not from the client.
    async fn checked_media(&self, who: &Identity, body: &Body) -> Result<Body, ApiError> {
        let Body::Media(media) = body else {
            return Ok(body.clone());
        };
        let record = self.shared_media(&media.media_id, &who.user).await?;
        let mut media = media.clone();
        media.mime = record.mime;
        media.size = record.size;
        media.sha256 = record.sha256;
        Ok(Body::Media(media))
    }

    /// The record of media `id` that `user` sends, kept from the sweeper until the send's
    /// reference commits: a record unused for half the sweeper's TTL is marked shared first
    /// (its commit fenced on the record read, as the sweeper's forget is), and a younger one is
    /// not forgotten for at least half a TTL, far longer than a send waits. Refused when the
    /// media is not `user`'s (or not there: ids cannot be probed), `not_found` when the sweeper
    /// forgot it between this read and the mark.
    async fn shared_media(&self, id: &str, user: &str) -> Result<MediaRecord, ApiError> {
        let mut record = match self.store.media(id).await? {
            Some(record) if record.owner == user => record,
            _ => {
                return Err(ApiError::forbidden(format!(
                    "you can send only media you uploaded; {id} is not yours"
                )));
            }
        };
        let fresh_for = self.limits.media_unreferenced_ttl.as_millis() as u64 / 2;
        for _ in 0..SHARE_ATTEMPTS {
            let now = now_ms();
            if now.saturating_sub(record.latest_use_ms()) < fresh_for {
                return Ok(record);
            }
            match self.store.share_media(id, &record, now).await {
                Ok(()) => return Ok(record),
                // Uploaded or shared again meanwhile (then fresh), or forgotten by the sweeper.
                Err(StoreError::FenceChanged { .. }) => {
                    record = self.store.media(id).await?.ok_or_else(|| {
                        ApiError::not_found(format!("no media {id}; upload it again"))
                    })?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::Overloaded(format!("media record {id} kept changing; retry")).into())
    }

    /// Records an `ack` (a deferred commit: `docs/operations.md`, Durability), then tells the
    /// other members' devices if the user's receipt cursors moved.
    pub async fn acknowledge(
        &self,
        who: &Identity,
        ack: &courier_proto::Ack,
    ) -> Result<(), ApiError> {
        let conv = &ack.conversation_id;
        ids::conversation_id(conv)?;
        // One read of the four keys: one call to a remote store.
        let bounds = self.store.ack_bounds(conv, &who.user).await?;
        let Some(member) = bounds.member else {
            return Err(self.not_a_member(conv).await);
        };
        let (head, before_delivered, before_read) = (bounds.head, bounds.delivered, bounds.read);
        if ack.seq == 0 {
            return Err(ApiError::bad_request("seq must be 1 or more"));
        }
        // A former member acknowledges up to its removal, no further.
        let readable = head.min(member.visibility(0, 1).last());
        if ack.seq > readable {
            // An event sequenced after a former member's removal is there, and not its to read:
            // refused as its send would be. A seq past the head is a malformed one.
            if ack.seq <= head && !member.is_member() {
                return Err(ApiError::forbidden(format!(
                    "you are not a member of {conv}: your last event there is {readable}"
                )));
            }
            return Err(ApiError::bad_request(format!(
                "seq {} is beyond the last event you may read, {readable}",
                ack.seq
            )));
        }
        let kind = match ack.kind {
            AckKind::Delivered => ReceiptKind::Delivered,
            AckKind::Read => ReceiptKind::Read,
        };
        self.store
            .acknowledge(&who.user, &who.device, conv, ack.seq, kind)
            .await?;
        // What the commit's MAX left, unless another device of the user acknowledged more
        // meanwhile: its own receipt then carries the higher cursors, and clients keep the
        // highest they saw.
        let delivered_seq = before_delivered.max(ack.seq);
        let read_seq = match kind {
            ReceiptKind::Read => before_read.max(ack.seq),
            ReceiptKind::Delivered => before_read,
        };
        let moved = (delivered_seq, read_seq) != (before_delivered, before_read);
        if moved && member.is_member() {
            let receipt = Receipt {
                conversation_id: conv.clone(),
                user: who.user.clone(),
                delivered_seq,
                read_seq,
            };
            // The read cursor never passes the delivered one, so the lower moved cursor is
            // where the newly covered events begin.
            let covered_after = if read_seq != before_read {
                before_read
            } else {
                before_delivered
            };
            self.receipts.publish(receipt, covered_after).await?;
        }
        Ok(())
    }

    /// Events of `conv` after `after_seq` (at most `limit`), the conversation's head, and the
    /// retention floor when events the client asked for were cleared. Retention may clear
    /// some between the read of the floor and that of the events: a range that does not start
    /// where it was asked to (its seqs are dense but for trims) has the floor read again, so
    /// that the page tells of the gap (`trimmed`) instead of starting silently above it.
    pub async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<Page, ApiError> {
        ids::conversation_id(conv)?;
        let limit = match limit {
            Some(0) => return Err(ApiError::bad_request("limit must be 1 or more")),
            Some(n) => n.min(MAX_FETCH_LIMIT) as usize,
            None => DEFAULT_FETCH_LIMIT as usize,
        };
        // The membership, floor and head in one read: read apart, a removal and a message
        // committed between them would pair a member's record with a head past its removal.
        let bounds = self.store.read_bounds(&who.user, &[conv]).await?;
        let Some(ReadBounds {
            member: Some(record),
            floor,
            head,
        }) = bounds.into_iter().next().transpose()?
        else {
            return Err(self.not_a_member(conv).await);
        };
        let readable = self.readable_with(record, floor);
        let visible = readable.visibility();
        // A former member sees the conversation as it was at its removal.
        let head_seq = head.min(visible.last());
        let mut events = Vec::new();
        let mut gap = false;
        for (after, through) in visible.ranges(after_seq, head_seq) {
            let wanted = (limit - events.len()).min((through - after) as usize);
            let read = self.store.events(conv, after, through, wanted).await?;
            gap |= wanted > 0 && read.first().map(|e| e.seq) != Some(after + 1);
            events.extend(read);
            if events.len() == limit {
                break;
            }
        }
        let readable = match gap {
            true => self.readable_with(readable.record, self.store.floor(conv).await?),
            false => readable,
        };
        Ok(Page {
            events,
            head_seq,
            trimmed: readable.trimmed_after(after_seq),
        })
    }

    /// The user's conversations with their heads and the user's receipt cursors. Every read
    /// at once, whatever the number of conversations: a remote store answers in three round
    /// trips (the list, every conversation's record, head and cursors, the direct ones'
    /// members for their names), not four per conversation.
    pub async fn conversations(
        &self,
        who: &Identity,
    ) -> Result<Vec<ConversationSummary>, ApiError> {
        let conversations = self.store.conversations_of(&who.user).await?;
        let ids: Vec<&str> = conversations
            .iter()
            .filter(|c| c.left_seq.is_none())
            .map(|c| c.conversation_id.as_str())
            .collect();
        let rows = self.store.conversation_rows(&who.user, &ids).await?;
        let rows: Vec<_> = ids
            .into_iter()
            .zip(rows)
            .filter_map(|(conv, row)| readable_or_logged(conv, row, "the list of conversations"))
            .collect();
        let direct: Vec<&str> = rows
            .iter()
            .filter(|(_, row)| row.record.kind == "direct")
            .map(|(id, _)| *id)
            .collect();
        let mut peers = self.store.members_of(&direct).await?.into_iter();
        let mut out = Vec::with_capacity(rows.len());
        for (conv, row) in rows {
            let name = if row.record.kind == "direct" {
                peers
                    .next()
                    .unwrap_or_default()
                    .into_iter()
                    .find(|m| *m != who.user)
                    .unwrap_or_else(|| who.user.clone())
            } else {
                row.record.name
            };
            out.push(ConversationSummary {
                unread: self.unread(row.member.as_ref(), row.read, row.head),
                head_seq: row.head,
                conversation_id: conv.to_owned(),
                kind: row.record.kind,
                name,
                delivered_seq: row.delivered,
                read_seq: row.read,
            });
        }
        Ok(out)
    }

    /// The events after `read` through `head` that a member with `record` may read (retained
    /// or cleared since): not those of its times away, nor those before its join beyond
    /// `--history-on-join`, which it is never given.
    fn unread(&self, record: Option<&MemberRecord>, read: u64, head: u64) -> u64 {
        record.map_or(0, |record| {
            record
                .visibility(self.limits.history_on_join, 1)
                .ranges(read, head)
                .map(|(after, through)| through - after)
                .sum()
        })
    }

    /// Every current member's receipt cursors in `conv` (the caller's own among them), for a
    /// current member: `receipt` frames reach only the devices connected when the cursors
    /// move, so a device that was away reads here what moved meanwhile. A former member is
    /// refused, as it no longer receives receipts, and so is a group whose receipts go only to
    /// the senders they cover (more than `--receipt-coalesce-above` members): its members are
    /// not told every member's cursors, and listing them would read two keys per member.
    /// Three reads: the caller's membership (a stranger's request reads nothing more), the
    /// members, then their cursors.
    pub async fn receipts(&self, who: &Identity, conv: &str) -> Result<Vec<Receipt>, ApiError> {
        self.check_member(conv, &who.user).await?;
        // Sized by the cached membership, which a large group's members are not read to know.
        let size = self.membership.current(conv).await?.len();
        if !self.receipts.go_to_everyone(size) {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "{conv} has {size} members: receipts are listed for groups whose receipts \
                     go to every member, and in larger ones they go to the senders they cover"
                ),
            ));
        }
        let members = self.store.members(conv).await?;
        Ok(self.store.receipts_of(conv, members).await?)
    }

    /// What a device must be sent to catch up: for each conversation of the user (and each it
    /// left, up to its removal) with events it may read above the device's delivered cursor
    /// (or the client's override of it), the range. Also returns where live delivery resumes
    /// in each conversation.
    pub async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &BTreeMap<String, u64>,
    ) -> Result<CatchUpPlan, ApiError> {
        // Every read at once, whatever the number of conversations: a remote store answers a
        // device's connect in three round trips, not three per conversation.
        let (cursors, conversations) = tokio::try_join!(
            self.store.device_cursors(&who.user, &who.device),
            self.store.conversations_of(&who.user),
        )?;
        let candidates: Vec<(String, u64)> = conversations
            .into_iter()
            .filter_map(|conv| {
                let cursor = overrides
                    .get(&conv.conversation_id)
                    .or_else(|| cursors.get(&conv.conversation_id))
                    .copied()
                    .unwrap_or(0);
                let left = conv.left_seq.is_some_and(|left| cursor >= left);
                (!left).then_some((conv.conversation_id, cursor))
            })
            .collect();
        let ids: Vec<&str> = candidates.iter().map(|(id, _)| id.as_str()).collect();
        let bounds = self.store.read_bounds(&who.user, &ids).await?;
        let mut plan = CatchUpPlan::default();
        for ((conversation_id, cursor), bounds) in candidates.into_iter().zip(bounds) {
            let bounds = match bounds {
                Ok(bounds) => bounds,
                Err(error) => {
                    passed_over(&conversation_id, &error, "a catch-up");
                    plan.unreadable.push((conversation_id, error.to_string()));
                    continue;
                }
            };
            let Some(record) = bounds.member else {
                return Err(self.not_a_member(&conversation_id).await);
            };
            let readable = self.readable_with(record, bounds.floor);
            let visible = readable.visibility();
            let head = bounds.head.min(visible.last());
            // A client's cursor beyond the head would hold back the live events to come.
            let cursor = cursor.min(head);
            let trimmed = readable.trimmed_after(cursor);
            plan.resume.insert(conversation_id.clone(), cursor);
            if visible.ranges(cursor, head).next().is_some() || trimmed.is_some() {
                plan.ranges.push(CatchUp {
                    conversation_id,
                    from: cursor,
                    head,
                    visible,
                    trimmed,
                });
            }
        }
        Ok(plan)
    }

    /// Relays a typing indicator to the other members' connected devices. Never stored;
    /// dropped first when a connection's queue is filling, and in a group of more than
    /// [`ChatLimits::typing_members_max`] members (counted as dropped).
    pub async fn typing(
        &self,
        who: &Identity,
        typing: &courier_proto::Typing,
    ) -> Result<(), ApiError> {
        // Checked in the store first: a stranger's frame never reaches the cache.
        self.check_member(&typing.conversation_id, &who.user)
            .await?;
        let members = self.membership.current(&typing.conversation_id).await?;
        if members.len() > self.limits.typing_members_max {
            self.metrics.typing_dropped.inc();
            return Ok(());
        }
        let frame = Arc::new(ServerFrame::Typing(TypingNotice {
            conversation_id: typing.conversation_id.clone(),
            user: who.user.clone(),
            active: typing.active,
        }));
        let users: Vec<&str> = members
            .iter()
            .map(String::as_str)
            .filter(|member| *member != who.user)
            .collect();
        let dropped: usize = self
            .gateways
            .offer(&[Offer { users, frame }])
            .values()
            .sum();
        self.metrics.typing_dropped.inc_by(dropped as u64);
        Ok(())
    }

    /// Validates a delete for everyone and queues its `delete` event. Members delete their own
    /// messages; group admins delete any. Returns the `client_msg_id` its `sent` carries
    /// (`delete:<seq>`) and the pending append, keyed by its target in the server's own key
    /// space (a client's ids cannot collide with it), so that retries are idempotent.
    pub async fn submit_delete(
        &self,
        who: &Identity,
        delete: &courier_proto::Delete,
    ) -> Result<(String, PendingAppend), ApiError> {
        let conv = &delete.conversation_id;
        // A delete is an event every member gets, as a message is: it draws on the user's
        // send rate and waits out delivery's backpressure like one.
        self.check_user_rate(who)?;
        self.check_backpressure()?;
        self.check_member(conv, &who.user).await?;
        let readable = self.readable(conv, &who.user).await?;
        if !readable.visibility().contains(delete.seq) {
            return Err(ApiError::not_found(format!(
                "no message {} in {conv}",
                delete.seq
            )));
        }
        let target =
            self.store.event(conv, delete.seq).await?.ok_or_else(|| {
                ApiError::not_found(format!("no message {} in {conv}", delete.seq))
            })?;
        if !matches!(target.payload, EventPayload::Message { .. }) {
            return Err(ApiError::bad_request("only messages can be deleted"));
        }
        if target.sender.user != who.user {
            let admin = self
                .store
                .member(conv, &who.user)
                .await?
                .is_some_and(|m| m.admin);
            if !(ids::is_group(conv) && admin) {
                return Err(ApiError::forbidden("you can delete only your own messages"));
            }
        }
        let client_msg_id = format!("delete:{}", delete.seq);
        let admitted = self.admission.admit()?;
        let pending = self.submit(
            admitted,
            Append {
                conversation_id: conv.clone(),
                sender: Sender {
                    user: who.user.clone(),
                    device: who.device.clone(),
                },
                key: AppendKey::Server(client_msg_id.clone()),
                payload: EventPayload::Delete {
                    target_seq: delete.seq,
                },
                create: None,
            },
        );
        Ok((client_msg_id, pending))
    }
}

impl Chat {
    /// The user's linked devices.
    pub async fn devices(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        Devices::new(self.store.clone()).list(user).await
    }

    /// Registers (or replaces) the device's push endpoint.
    pub async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError> {
        Devices::new(self.store.clone())
            .register_push(who, provider, token, configured)
            .await
    }

    /// Unlinks one of the user's devices and closes its connections, on every gateway.
    pub async fn unlink_device(&self, user: &str, device: &str) -> Result<(), ApiError> {
        Devices::new(self.store.clone())
            .unlink(user, device, self.gateways.as_ref())
            .await
    }
}

/// The in-process binding of the chat seam: each method is the inherent one of the same name.
#[async_trait::async_trait]
impl ChatService for Chat {
    async fn submit_send(
        &self,
        who: &Identity,
        send: &courier_proto::Send,
    ) -> Result<(String, PendingAppend), ApiError> {
        Chat::submit_send(self, who, send).await
    }

    async fn submit_delete(
        &self,
        who: &Identity,
        delete: &courier_proto::Delete,
    ) -> Result<(String, PendingAppend), ApiError> {
        Chat::submit_delete(self, who, delete).await
    }

    async fn typing(&self, who: &Identity, typing: &courier_proto::Typing) -> Result<(), ApiError> {
        Chat::typing(self, who, typing).await
    }

    async fn acknowledge(&self, who: &Identity, ack: &courier_proto::Ack) -> Result<(), ApiError> {
        Chat::acknowledge(self, who, ack).await
    }

    async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<Page, ApiError> {
        Chat::fetch(self, who, conv, after_seq, limit).await
    }

    async fn readable(&self, conv: &str, user: &str) -> Result<Readable, ApiError> {
        Chat::readable(self, conv, user).await
    }

    async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &BTreeMap<String, u64>,
    ) -> Result<CatchUpPlan, ApiError> {
        Chat::catch_up_plan(self, who, overrides).await
    }

    async fn conversations(&self, who: &Identity) -> Result<Vec<ConversationSummary>, ApiError> {
        Chat::conversations(self, who).await
    }

    async fn receipts(&self, who: &Identity, conv: &str) -> Result<Vec<Receipt>, ApiError> {
        Chat::receipts(self, who, conv).await
    }

    async fn create_group(
        &self,
        who: &Identity,
        name: &str,
        members: &[String],
    ) -> Result<String, ApiError> {
        Chat::create_group(self, who, name, members).await
    }

    async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Result<Vec<String>, ApiError> {
        Chat::add_members(self, who, conv, users).await
    }

    async fn remove_member(&self, who: &Identity, conv: &str, user: &str) -> Result<(), ApiError> {
        Chat::remove_member(self, who, conv, user).await
    }

    async fn devices(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        Chat::devices(self, user).await
    }

    async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError> {
        Chat::register_push(self, who, provider, token, configured).await
    }

    async fn unlink_device(&self, user: &str, device: &str) -> Result<(), ApiError> {
        Chat::unlink_device(self, user, device).await
    }
}

/// The chat role as the gateway, the client HTTP API and media hold it: this process's
/// [`Chat`], called directly (no boxed future, no hop: `courier serve` and a node running
/// `gateway,chat`), or another binding of [`ChatService`] (a gateway node without the chat
/// role: `courier_rpc::ClusterChat`). Cheap to clone.
#[derive(Clone)]
pub enum ChatBinding {
    Local(Arc<Chat>),
    Remote(Arc<dyn ChatService>),
}

/// Calls `$method` on the binding: inherent (static dispatch) in process, through the trait
/// otherwise.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            ChatBinding::Local(chat) => Chat::$method(chat, $($arg),*).await,
            ChatBinding::Remote(chat) => chat.$method($($arg),*).await,
        }
    };
}

impl ChatBinding {
    pub async fn submit_send(
        &self,
        who: &Identity,
        send: &courier_proto::Send,
    ) -> Result<(String, PendingAppend), ApiError> {
        dispatch!(self.submit_send(who, send))
    }

    pub async fn submit_delete(
        &self,
        who: &Identity,
        delete: &courier_proto::Delete,
    ) -> Result<(String, PendingAppend), ApiError> {
        dispatch!(self.submit_delete(who, delete))
    }

    pub async fn typing(
        &self,
        who: &Identity,
        typing: &courier_proto::Typing,
    ) -> Result<(), ApiError> {
        dispatch!(self.typing(who, typing))
    }

    pub async fn acknowledge(
        &self,
        who: &Identity,
        ack: &courier_proto::Ack,
    ) -> Result<(), ApiError> {
        dispatch!(self.acknowledge(who, ack))
    }

    pub async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<Page, ApiError> {
        dispatch!(self.fetch(who, conv, after_seq, limit))
    }

    pub async fn readable(&self, conv: &str, user: &str) -> Result<Readable, ApiError> {
        dispatch!(self.readable(conv, user))
    }

    pub async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &BTreeMap<String, u64>,
    ) -> Result<CatchUpPlan, ApiError> {
        dispatch!(self.catch_up_plan(who, overrides))
    }

    pub async fn conversations(
        &self,
        who: &Identity,
    ) -> Result<Vec<ConversationSummary>, ApiError> {
        dispatch!(self.conversations(who))
    }

    pub async fn receipts(&self, who: &Identity, conv: &str) -> Result<Vec<Receipt>, ApiError> {
        dispatch!(self.receipts(who, conv))
    }

    pub async fn create_group(
        &self,
        who: &Identity,
        name: &str,
        members: &[String],
    ) -> Result<String, ApiError> {
        dispatch!(self.create_group(who, name, members))
    }

    pub async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Result<Vec<String>, ApiError> {
        dispatch!(self.add_members(who, conv, users))
    }

    pub async fn remove_member(
        &self,
        who: &Identity,
        conv: &str,
        user: &str,
    ) -> Result<(), ApiError> {
        dispatch!(self.remove_member(who, conv, user))
    }

    pub async fn devices(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        dispatch!(self.devices(user))
    }

    pub async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError> {
        dispatch!(self.register_push(who, provider, token, configured))
    }

    pub async fn unlink_device(&self, user: &str, device: &str) -> Result<(), ApiError> {
        dispatch!(self.unlink_device(user, device))
    }
}

/// What the store read of `conv` for a read of many conversations (`what`, for the log), or
/// `None` when a record it needs is damaged ([`StoreError::Corrupt`]: its membership record,
/// head or floor), logged at error: that conversation is passed over and the others served.
/// Failing on it, the whole read failed: every catch-up of the user, or their list of
/// conversations, until the record was repaired.
fn readable_or_logged<'c, T>(
    conv: &'c str,
    read: Result<T, StoreError>,
    what: &str,
) -> Option<(&'c str, T)> {
    match read {
        Ok(read) => Some((conv, read)),
        Err(error) => {
            passed_over(conv, &error, what);
            None
        }
    }
}

/// Logs at error that `what` passes over `conv`, whose stored records are damaged (`error`).
fn passed_over(conv: &str, error: &StoreError, what: &str) {
    tracing::error!(
        conversation = conv,
        %error,
        "a conversation whose stored records are damaged is passed over by {what}; the others are served"
    );
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
    use courier_core::gateways::NoGateways;
    use courier_core::sequencing::{PendingTrim, SequencerError};
    use courier_store::embedded::EmbeddedEngine;
    use courier_store::ownership::Duty;
    use courier_store::{AppendOutcome, HeadCache, MediaReference, ShardLease};
    use std::sync::Mutex;
    use tokio::sync::oneshot;

    /// Holds every append until the test answers it.
    #[derive(Default)]
    struct HeldSequencer {
        held: Mutex<Vec<oneshot::Sender<Result<AppendOutcome, SequencerError>>>>,
    }

    impl Sequencer for HeldSequencer {
        fn submit(&self, _append: Append) -> PendingAppend {
            let (reply, outcome) = oneshot::channel();
            self.held.lock().unwrap().push(reply);
            Box::pin(async move { outcome.await.unwrap_or(Err(SequencerError::ShardMoved)) })
        }

        fn trim(
            &self,
            _conversation_id: &str,
            _new_floor: u64,
            _media: Vec<MediaReference>,
        ) -> PendingTrim {
            Box::pin(async { Ok(0) })
        }
    }

    async fn chat(sequencer: Arc<HeldSequencer>, limits: ChatLimits) -> (tempfile::TempDir, Chat) {
        let dir = tempfile::tempdir().unwrap();
        let kv = Arc::new(EmbeddedEngine::open(&dir.path().join("s")).unwrap());
        let store = MessageStore::open(kv, b"", 4).await.unwrap();
        (dir, chat_on(store, sequencer, limits))
    }

    fn chat_on(store: MessageStore, sequencer: Arc<dyn Sequencer>, limits: ChatLimits) -> Chat {
        let context = Context {
            store: store.clone(),
            gateways: Arc::new(NoGateways),
            membership: Arc::new(MembershipCache::new(store.clone())),
            metrics: Arc::new(Metrics::new()),
        };
        chat_in(context, sequencer, limits)
    }

    fn chat_in(context: Context, sequencer: Arc<dyn Sequencer>, limits: ChatLimits) -> Chat {
        let receipts = ReceiptRelay::new(&context, 100);
        let storage = StorageHealth::new(context.store.clone(), None, 0, None, 0);
        Chat::new(context, sequencer, receipts, limits, storage)
    }

    fn text_to(peer: &str, id: &str) -> courier_proto::Send {
        courier_proto::Send {
            reference: None,
            conversation_id: None,
            to_user: Some(peer.into()),
            client_msg_id: id.into(),
            body: Body::Text("hi".into()),
            reply_to: None,
        }
    }

    /// The leases of the four shards of `store`, taken for the test.
    async fn every_shard_of_four(store: &MessageStore) -> Vec<ShardLease> {
        store
            .acquire_shards(
                Duty::Sequencing,
                "test",
                &[0, 1, 2, 3],
                usize::MAX,
                0,
                u64::MAX,
            )
            .await
            .unwrap()
    }

    /// Bob, with a message from each of `peer0` to `peer19` in a direct conversation (`d:0`
    /// to `d:19`), on a store that counts its reads.
    async fn bob_messaged_by_twenty_peers() -> (
        Arc<courier_store::faulty_engine::FaultyEngine>,
        Chat,
        Identity,
    ) {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let leases = every_shard_of_four(&store).await;
        let mut heads = HeadCache::default();
        for i in 0..20 {
            let conv = format!("d:{i}");
            let peer = format!("peer{i}");
            let sender = Sender {
                user: peer.clone(),
                device: "p".into(),
            };
            let append = Append {
                create: Some(NewConversation::direct(&peer, "bob")),
                ..Append::message(
                    conv.clone(),
                    sender,
                    "m".into(),
                    Body::Text("hi".into()),
                    None,
                )
            };
            let lease = leases[store.shard_of(&conv) as usize];
            let sent = store.append(lease, &mut heads, &[append]).await.unwrap();
            assert!(sent[0].is_ok(), "{sent:?}");
        }
        let chat = chat_on(
            store,
            Arc::new(HeldSequencer::default()),
            ChatLimits::default(),
        );
        let bob = Identity {
            user: "bob".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        };
        (engine, chat, bob)
    }

    /// A device's connect reads the store three times (its cursors and its conversations at
    /// once, then every conversation's membership, floor and head in one call), not three
    /// times per conversation: each read is a round trip to a remote store.
    #[tokio::test]
    async fn a_catch_up_plan_reads_the_store_in_three_calls_whatever_the_conversations() {
        let (engine, chat, bob) = bob_messaged_by_twenty_peers().await;
        let before = engine.read_calls();
        let CatchUpPlan {
            ranges: plan,
            resume,
            ..
        } = chat.catch_up_plan(&bob, &BTreeMap::new()).await.unwrap();
        assert_eq!(engine.read_calls() - before, 3);
        assert_eq!(plan.len(), 20, "one message to catch up in each");
        assert!(plan.iter().all(|c| (c.from, c.head) == (0, 1)));
        assert_eq!(resume.len(), 20);
    }

    /// Bob's conversations `d:0` to `d:19`, `d:3`'s head cut short and `d:5`'s head and
    /// `d:8`'s floor longer than their 8 bytes, and his membership record in `d:11` damaged.
    async fn bob_with_damaged_conversations() -> (Chat, Identity) {
        use courier_store::KvEngine as _;
        let (engine, chat, bob) = bob_messaged_by_twenty_peers().await;
        let keys = chat.store.keys();
        let mut damage = courier_store::Batch::new();
        damage
            .set(keys.head("d:3"), vec![1])
            .set(keys.head("d:5"), vec![1; 9])
            .set(keys.floor("d:8"), vec![1; 9])
            .set(keys.member("d:11", "bob"), vec![0xff; 3]);
        engine.commit(damage).await.unwrap();
        (chat, bob)
    }

    const DAMAGED: [&str; 4] = ["d:3", "d:5", "d:8", "d:11"];

    /// A catch-up passes over the conversations whose head, floor or membership record is
    /// damaged, logged at error, and plans the others: failing on one, it failed every
    /// connect of the user; read as numbers, a head cut short kept events from the device and
    /// a longer one set its place past every event to come.
    #[tokio::test]
    async fn a_catch_up_passes_over_conversations_whose_bounds_are_damaged() {
        let (chat, bob) = bob_with_damaged_conversations().await;
        let CatchUpPlan {
            ranges: plan,
            resume,
            unreadable,
        } = chat.catch_up_plan(&bob, &BTreeMap::new()).await.unwrap();
        let planned: Vec<_> = plan.iter().map(|c| c.conversation_id.as_str()).collect();
        let unreadable: Vec<_> = unreadable.iter().map(|(conv, _)| conv.as_str()).collect();
        assert_eq!(unreadable.len(), DAMAGED.len(), "{unreadable:?}");
        assert!(
            DAMAGED.iter().all(|conv| unreadable.contains(conv)),
            "each passed over, to be told of: {unreadable:?}"
        );
        assert_eq!(planned.len(), 16, "{planned:?}");
        assert!(
            DAMAGED.iter().all(|conv| !planned.contains(conv)),
            "{planned:?}"
        );
        assert!(plan.iter().all(|c| (c.from, c.head) == (0, 1)));
        assert_eq!(resume.len(), 16);
        // A read of one of them alone is refused: told internal, the client's retry useless.
        let fetch = chat.fetch(&bob, "d:5", 0, None).await.unwrap_err();
        assert_eq!(fetch.code, ErrorCode::Internal);
        let ack = courier_proto::Ack {
            reference: None,
            conversation_id: "d:5".into(),
            seq: 2,
            kind: AckKind::Delivered,
        };
        let ack = chat.acknowledge(&bob, &ack).await.unwrap_err();
        assert_eq!(ack.code, ErrorCode::Internal);
    }

    /// The list of conversations passes over those whose head or membership record is
    /// damaged, logged at error, and lists the others.
    #[tokio::test]
    async fn the_list_of_conversations_passes_over_those_whose_records_are_damaged() {
        let (chat, bob) = bob_with_damaged_conversations().await;
        let listed = chat.conversations(&bob).await.unwrap();
        let listed: Vec<_> = listed.iter().map(|c| c.conversation_id.as_str()).collect();
        assert_eq!(listed.len(), 17, "{listed:?}");
        assert!(
            ["d:3", "d:5", "d:11"]
                .iter()
                .all(|conv| !listed.contains(conv))
        );
    }

    /// The list of a user's conversations reads the store three times (the list; every
    /// record, head and receipt cursor; the direct conversations' members), not four times
    /// per conversation.
    #[tokio::test]
    async fn the_list_of_conversations_reads_the_store_in_three_calls_whatever_their_number() {
        let (engine, chat, bob) = bob_messaged_by_twenty_peers().await;
        chat.store
            .acknowledge("bob", "phone", "d:7", 1, ReceiptKind::Read)
            .await
            .unwrap();
        let before = engine.read_calls();
        let listed = chat.conversations(&bob).await.unwrap();
        assert_eq!(engine.read_calls() - before, 3);
        let mut listed: Vec<_> = listed
            .into_iter()
            .map(|c| {
                let read = (c.delivered_seq, c.read_seq, c.unread);
                (c.conversation_id, c.kind, c.name, c.head_seq, read)
            })
            .collect();
        listed.sort_by_key(|c| c.0[2..].parse::<u32>().unwrap());
        let expected: Vec<_> = (0..20)
            .map(|i| {
                let read = if i == 7 { (1, 1, 0) } else { (0, 0, 1) };
                (
                    format!("d:{i}"),
                    "direct".to_owned(),
                    format!("peer{i}"),
                    1,
                    read,
                )
            })
            .collect();
        assert_eq!(listed, expected);
    }

    #[tokio::test]
    async fn sends_are_unavailable_while_the_shards_owner_says_delivery_is_behind() {
        let sequencer = Arc::new(HeldSequencer::default());
        let limits = ChatLimits {
            admission: AdmissionLimits {
                max_in_flight: 1,
                ..AdmissionLimits::default()
            },
            ..ChatLimits::default()
        };
        let (_dir, chat) = chat(sequencer.clone(), limits).await;
        let alice = Identity {
            user: "alice".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        };
        // This node's fanout gauge is a metric, not a control signal any more.
        chat.metrics.fanout_backlog.set(i64::MAX);
        let (_, pending) = chat
            .submit_send(&alice, &text_to("bob", "m1"))
            .await
            .unwrap();
        let held = sequencer.held.lock().unwrap().pop().unwrap();
        held.send(Err(SequencerError::DeliveryBehind)).unwrap();
        let refused = ApiError::from(pending.await.unwrap_err());
        assert_eq!(
            refused,
            ApiError::unavailable("delivery is behind; retry shortly", 500),
            "the answer clients got when chat refused on the fanout backlog"
        );
        // The refused send gave its place back: the retry (same id) is taken.
        let (_, _retry) = chat
            .submit_send(&alice, &text_to("bob", "m1"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn sends_past_the_in_flight_limit_are_unavailable_until_one_is_answered() {
        let sequencer = Arc::new(HeldSequencer::default());
        let limits = ChatLimits {
            admission: AdmissionLimits {
                max_in_flight: 2,
                ..AdmissionLimits::default()
            },
            ..ChatLimits::default()
        };
        let (_dir, chat) = chat(sequencer.clone(), limits).await;
        let alice = Identity {
            user: "alice".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        };
        let (_, first) = chat
            .submit_send(&alice, &text_to("bob", "m1"))
            .await
            .unwrap();
        let (_, _second) = chat
            .submit_send(&alice, &text_to("carol", "m2"))
            .await
            .unwrap();
        let Err(refused) = chat.submit_send(&alice, &text_to("dave", "m3")).await else {
            panic!("a third send in flight was accepted");
        };
        assert_eq!(refused.code, courier_proto::ErrorCode::Unavailable);
        assert!(refused.retry_after_ms.is_some_and(|ms| ms > 0));
        assert_eq!(chat.metrics.sends_in_flight.get(), 2);

        // The first is answered: its place is free again.
        let answer = AppendOutcome {
            seq: 1,
            server_msg_id: "s1".into(),
            ts_ms: 1,
            duplicate: false,
        };
        let reply = sequencer.held.lock().unwrap().remove(0);
        reply.send(Ok(answer)).unwrap();
        assert_eq!(first.await.unwrap().seq, 1);
        assert_eq!(chat.metrics.sends_in_flight.get(), 1);
        let (_, _third) = chat
            .submit_send(&alice, &text_to("dave", "m3"))
            .await
            .unwrap();
    }

    /// A removal, and a message after it, committed while a `fetch` of the removed member is
    /// between two of its reads: the member is served nothing past its removal.
    #[tokio::test]
    async fn a_fetch_never_serves_a_removed_member_what_came_after_its_removal() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let conv = "g:review".to_owned();
        let leases = every_shard_of_four(&store).await;
        let lease = leases[store.shard_of(&conv) as usize];
        let alice = Sender {
            user: "alice".into(),
            device: "p".into(),
        };
        let append = |id: &str, payload: EventPayload| Append {
            conversation_id: conv.clone(),
            sender: alice.clone(),
            key: AppendKey::Server(id.into()),
            payload,
            create: None,
        };
        let text = |id: &str| {
            append(
                id,
                EventPayload::Message {
                    body: Some(Body::Text(id.into())),
                    client_msg_id: id.into(),
                    reply_to: None,
                    deleted: false,
                },
            )
        };
        let mut heads = HeadCache::default();
        let created = append(
            "c",
            EventPayload::GroupCreated {
                name: "g".into(),
                members: vec!["alice".into(), "bob".into()],
            },
        );
        for a in [created, text("m2")] {
            let done = store.append(lease, &mut heads, &[a]).await.unwrap();
            assert!(done[0].is_ok(), "{done:?}");
        }
        // After fetch's first read: bob is removed (3), then alice writes (4).
        let (removal, after) = (
            append(
                "r",
                EventPayload::MemberRemoved(courier_proto::MembershipChange::new(vec![
                    "bob".into(),
                ])),
            ),
            text("m4"),
        );
        let racing = store.clone();
        engine.after_next_read(Box::pin(async move {
            let mut heads = HeadCache::default();
            for a in [removal, after] {
                let done = racing.append(lease, &mut heads, &[a]).await.unwrap();
                assert!(done[0].is_ok(), "{done:?}");
            }
        }));
        let chat = chat_on(
            store,
            Arc::new(HeldSequencer::default()),
            ChatLimits::default(),
        );
        let bob = Identity {
            user: "bob".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        };
        let page = chat.fetch(&bob, &conv, 0, None).await.unwrap();
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert!(
            seqs.iter().all(|&seq| seq <= 3) && page.head_seq <= 3,
            "bob, removed at 3, was served {seqs:?} (head_seq {})",
            page.head_seq
        );
    }

    /// Retention trims events a `fetch` asks for while the fetch is between its reads (the
    /// floor read, then the events): the page says so (`trimmed`, the new floor), rather than
    /// starting silently above the seq asked for, which a client took for dense history.
    #[tokio::test]
    async fn a_fetch_of_events_trimmed_between_its_reads_says_they_were_trimmed() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let conv = "g:old".to_owned();
        let leases = every_shard_of_four(&store).await;
        let lease = leases[store.shard_of(&conv) as usize];
        let alice = Sender {
            user: "alice".into(),
            device: "p".into(),
        };
        let created = Append {
            conversation_id: conv.clone(),
            sender: alice.clone(),
            key: AppendKey::Server("c".into()),
            payload: EventPayload::GroupCreated {
                name: "g".into(),
                members: vec!["alice".into(), "bob".into()],
            },
            create: None,
        };
        let mut appends = vec![created];
        for id in ["m2", "m3", "m4", "m5"] {
            let body = Body::Text(id.into());
            appends.push(Append::message(
                conv.clone(),
                alice.clone(),
                id.into(),
                body,
                None,
            ));
        }
        let mut heads = HeadCache::default();
        for append in appends {
            let done = store.append(lease, &mut heads, &[append]).await.unwrap();
            assert!(done[0].is_ok(), "{done:?}");
        }
        // After fetch's first read (membership, floor and head), retention clears 1 to 3.
        let racing = store.clone();
        let trim = conv.clone();
        engine.after_next_read(Box::pin(async move {
            assert_eq!(racing.trim(lease, &trim, 4, &[]).await.unwrap(), 3);
        }));
        let chat = chat_on(
            store,
            Arc::new(HeldSequencer::default()),
            ChatLimits::default(),
        );
        let bob = Identity {
            user: "bob".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        };
        let page = chat.fetch(&bob, &conv, 0, None).await.unwrap();
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [4, 5]);
        assert_eq!(page.trimmed, Some(4), "the gap below 4 is told");
    }

    /// Alice's chat over `engine`, and an image she uploaded `uploaded_ms` ago (unshared).
    async fn alice_with_an_upload(
        engine: &Arc<courier_store::faulty_engine::FaultyEngine>,
        sequencer: Arc<HeldSequencer>,
        uploaded_ms: u64,
    ) -> (Chat, MediaRecord) {
        let store = engine.store(4).await;
        let record = MediaRecord {
            mime: "image/png".into(),
            size: 1,
            sha256: "00".into(),
            created_ms: now_ms() - uploaded_ms,
            owner: "alice".into(),
            shared_ms: 0,
        };
        store.put_media("m1", &record, 0).await.unwrap();
        (chat_on(store, sequencer, ChatLimits::default()), record)
    }

    fn alice() -> Identity {
        Identity {
            user: "alice".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        }
    }

    fn picture_to(peer: &str) -> courier_proto::Send {
        let picture = courier_proto::Media {
            media_id: "m1".into(),
            mime: "image/png".into(),
            size: 1,
            sha256: "00".into(),
            name: None,
            caption: None,
        };
        courier_proto::Send {
            body: Body::Media(Box::new(picture)),
            ..text_to(peer, "p1")
        }
    }

    /// A send that read its media's record just before the sweeper forgot it finds, when it
    /// marks the record shared, that it is gone: refused as not found, nothing sequenced (a
    /// message sharing media whose bytes are deleted would answer 404 to everyone).
    #[tokio::test]
    async fn a_send_of_media_the_sweeper_forgets_meanwhile_is_refused_as_not_found() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let sequencer = Arc::new(HeldSequencer::default());
        let ttl = ChatLimits::default().media_unreferenced_ttl.as_millis() as u64;
        let (chat, record) = alice_with_an_upload(&engine, sequencer.clone(), ttl).await;
        let sweeper = chat.store.clone();
        engine.before_next_commit(Box::pin(async move {
            sweeper.forget_media("m1", &record).await.unwrap();
        }));
        let refused = chat.submit_send(&alice(), &picture_to("bob")).await;
        assert_eq!(
            refused.err(),
            Some(ApiError::not_found("no media m1; upload it again"))
        );
        assert!(sequencer.held.lock().unwrap().is_empty(), "sequenced");
        assert_eq!(chat.store.media("m1").await.unwrap(), None);
    }

    /// A send of media uploaded or shared less than half the sweeper's TTL ago writes nothing
    /// before its message: the sweeper leaves the record alone for at least another half.
    #[tokio::test]
    async fn a_send_of_media_used_within_half_the_ttl_writes_nothing_before_its_message() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let sequencer = Arc::new(HeldSequencer::default());
        let ttl = ChatLimits::default().media_unreferenced_ttl.as_millis() as u64;
        let (chat, record) = alice_with_an_upload(&engine, sequencer.clone(), ttl / 4).await;
        engine.set_fault(Some(Box::new(|_: &courier_store::Batch| {
            Some(courier_store::StoreError::Engine("a commit".into()))
        })));
        let (_, _sent) = chat
            .submit_send(&alice(), &picture_to("bob"))
            .await
            .unwrap();
        assert_eq!(sequencer.held.lock().unwrap().len(), 1);
        assert_eq!(chat.store.media("m1").await.unwrap(), Some(record));
    }

    /// A send of media unused for more than half the sweeper's TTL marks it shared before its
    /// message is sequenced; another send right after finds it fresh.
    #[tokio::test]
    async fn a_send_of_media_unused_for_half_the_ttl_marks_it_shared_first() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let sequencer = Arc::new(HeldSequencer::default());
        let ttl = ChatLimits::default().media_unreferenced_ttl.as_millis() as u64;
        let (chat, _) = alice_with_an_upload(&engine, sequencer.clone(), ttl / 2 + 1).await;
        let before = now_ms();
        let (_, _sent) = chat
            .submit_send(&alice(), &picture_to("bob"))
            .await
            .unwrap();
        let shared = chat.store.media("m1").await.unwrap().unwrap();
        assert!(shared.shared_ms >= before, "{shared:?}");
        assert_eq!(shared.latest_use_ms(), shared.shared_ms);
        let (_, _sent) = chat
            .submit_send(&alice(), &picture_to("carol"))
            .await
            .unwrap();
        assert_eq!(chat.store.media("m1").await.unwrap(), Some(shared));
        assert_eq!(sequencer.held.lock().unwrap().len(), 2);
    }

    /// Commits each append to the store, then fails every read: a store that stops answering
    /// reads just after a change landed.
    struct CommitThenFailReads {
        engine: Arc<courier_store::faulty_engine::FaultyEngine>,
        store: MessageStore,
        lease: ShardLease,
    }

    impl Sequencer for CommitThenFailReads {
        fn submit(&self, append: Append) -> PendingAppend {
            let (engine, store, lease) = (self.engine.clone(), self.store.clone(), self.lease);
            Box::pin(async move {
                let mut heads = HeadCache::default();
                let mut done = store.append(lease, &mut heads, &[append]).await?;
                engine.set_read_fault(Some(Box::new(|_: &[u8]| {
                    Some(courier_store::StoreError::Engine("a read".into()))
                })));
                Ok(done.remove(0)?)
            })
        }

        fn trim(
            &self,
            _conversation_id: &str,
            _new_floor: u64,
            _media: Vec<MediaReference>,
        ) -> PendingTrim {
            Box::pin(async { Ok(0) })
        }
    }

    /// Alice's group `g:team` with bob, and her chat, whose store fails every read once a
    /// change of hers has landed (until the test clears the fault).
    async fn alices_group_whose_reads_fail_after_a_change() -> (
        Arc<courier_store::faulty_engine::FaultyEngine>,
        Chat,
        String,
    ) {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let conv = "g:team".to_owned();
        let lease = every_shard_of_four(&store).await[store.shard_of(&conv) as usize];
        let created = Append {
            conversation_id: conv.clone(),
            sender: Sender {
                user: "alice".into(),
                device: "phone".into(),
            },
            key: AppendKey::Server("c".into()),
            payload: EventPayload::GroupCreated {
                name: "team".into(),
                members: vec!["alice".into(), "bob".into()],
            },
            create: None,
        };
        let mut heads = HeadCache::default();
        let done = store.append(lease, &mut heads, &[created]).await.unwrap();
        assert!(done[0].is_ok(), "{done:?}");
        let sequencer = Arc::new(CommitThenFailReads {
            engine: engine.clone(),
            store: store.clone(),
            lease,
        });
        (
            engine,
            chat_on(store, sequencer, ChatLimits::default()),
            conv,
        )
    }

    /// An add that landed is answered as done, with who was added, though the store fails
    /// the reads after it: an error made the client retry or show a failure for a change made.
    #[tokio::test]
    async fn an_add_that_landed_is_answered_as_done_whatever_the_reads_after_it() {
        let (engine, chat, conv) = alices_group_whose_reads_fail_after_a_change().await;
        let added = chat.add_members(&alice(), &conv, &["carol".into()]).await;
        assert_eq!(added, Ok(vec!["carol".to_owned()]));
        engine.set_read_fault(None);
        assert!(chat.store.is_member(&conv, "carol").await.unwrap());
    }

    /// A removal that landed is answered as done though the store fails the reads after it,
    /// and the typing and receipts relayed after the answer still never reach the removed
    /// member: the node's membership is read again from the store, where the removal is.
    #[tokio::test]
    async fn a_removal_that_landed_is_answered_as_done_whatever_the_reads_after_it() {
        let (engine, chat, conv) = alices_group_whose_reads_fail_after_a_change().await;
        assert_eq!(
            *chat.membership.current(&conv).await.unwrap(),
            ["alice", "bob"]
        );
        assert_eq!(chat.remove_member(&alice(), &conv, "bob").await, Ok(()));
        engine.set_read_fault(None);
        assert!(!chat.store.is_member(&conv, "bob").await.unwrap());
        assert_eq!(*chat.membership.current(&conv).await.unwrap(), ["alice"]);
    }

    /// The users each receipt was offered to.
    #[derive(Default)]
    struct ReceiptsOffered(Mutex<Vec<Vec<String>>>);

    #[async_trait::async_trait]
    impl Gateways for ReceiptsOffered {
        async fn deliver(
            &self,
            _batch: Vec<(courier_proto::Event, courier_core::membership::Members)>,
        ) -> Result<(), courier_core::gateways::DeliveryError> {
            Ok(())
        }

        fn offer<'a>(&self, offers: &[Offer<'a>]) -> courier_core::gateways::Refused<'a> {
            let mut offered = self.0.lock().unwrap();
            for offer in offers {
                if let ServerFrame::Receipt(_) = *offer.frame {
                    offered.push(offer.users.iter().map(|u| u.to_string()).collect());
                }
            }
            courier_core::gateways::Refused::new()
        }

        fn missed(&self, _recipients: &[String], _at: Option<(&str, u64)>) {}

        fn unlinked(&self, _user: &str, _device: &str) {}

        async fn connected_devices(&self, _user: &str) -> Result<Vec<String>, StoreError> {
            Ok(Vec::new())
        }
    }

    /// On a cluster node (a membership cache that checks heads), a member removed on another
    /// node between an ack's reads and its commit gets no receipt of it: the cursor moved
    /// once it was no longer a member. The relay took the members through the head read
    /// before the commit, from a cache loaded before the removal, and offered bob the receipt
    /// after his removal was answered.
    #[tokio::test]
    async fn a_receipt_committed_after_a_removal_elsewhere_never_reaches_the_removed_member() {
        let engine = courier_store::faulty_engine::FaultyEngine::new();
        let store = engine.store(4).await;
        let conv = "g:team".to_owned();
        let lease = every_shard_of_four(&store).await[store.shard_of(&conv) as usize];
        let by_alice = |key: &str, payload| Append {
            conversation_id: conv.clone(),
            sender: Sender {
                user: "alice".into(),
                device: "phone".into(),
            },
            key: AppendKey::Server(key.into()),
            payload,
            create: None,
        };
        let created = by_alice(
            "created",
            EventPayload::GroupCreated {
                name: "team".into(),
                members: vec!["alice".into(), "bob".into(), "carol".into()],
            },
        );
        let mut heads = HeadCache::default();
        let done = store.append(lease, &mut heads, &[created]).await.unwrap();
        assert!(done[0].is_ok(), "{done:?}");
        let offered = Arc::new(ReceiptsOffered::default());
        let context = Context {
            store: store.clone(),
            gateways: offered.clone(),
            membership: Arc::new(MembershipCache::checking_heads(store.clone())),
            metrics: Arc::new(Metrics::new()),
        };
        let chat = chat_in(
            context,
            Arc::new(HeldSequencer::default()),
            ChatLimits::default(),
        );
        // This node relayed something of the group before: its cache holds the three.
        assert_eq!(
            *chat.membership.current(&conv).await.unwrap(),
            ["alice", "bob", "carol"]
        );
        // Another node removes bob between carol's ack's reads and its commit.
        let removal = by_alice(
            "removal",
            EventPayload::MemberRemoved(courier_proto::MembershipChange::new(vec!["bob".into()])),
        );
        let removing = store.clone();
        engine.before_next_commit(Box::pin(async move {
            let mut heads = HeadCache::default();
            let done = removing.append(lease, &mut heads, &[removal]).await;
            assert!(done.unwrap()[0].is_ok());
        }));
        let carol = Identity {
            user: "carol".into(),
            device: "phone".into(),
            issued_at_ms: 0,
        };
        let ack = courier_proto::Ack {
            reference: None,
            conversation_id: conv.clone(),
            seq: 1,
            kind: AckKind::Read,
        };
        chat.acknowledge(&carol, &ack).await.unwrap();
        assert!(!store.is_member(&conv, "bob").await.unwrap());
        assert_eq!(*offered.0.lock().unwrap(), [["alice"]]);
    }

    #[test]
    fn direct_ids_are_symmetric_and_url_safe() {
        let id = direct_conversation_id("alice@example.com", "bob");
        assert_eq!(id, direct_conversation_id("bob", "alice@example.com"));
        assert!(ids::conversation_id(&id).is_ok());
        assert_ne!(id, direct_conversation_id("alice", "bob"));
        assert_eq!(
            direct_conversation_id("bob", "alice"),
            "d:141a4cd242b67e82edf4a78bb418d40a",
            "stored conversations are named by it: it never changes"
        );
    }
}
