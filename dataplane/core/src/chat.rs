//! The chat seam: what the gateway (WebSocket frames), the client HTTP API and media ask of the
//! chat role per request ([`ChatService`]), and the values it answers with.
//!
//! Two bindings: in-process, `courier_chat::Chat` (what `courier serve` and a node running
//! `gateway,chat` call, without a box or a hop: see `courier_chat::ChatBinding`), and remote,
//! `courier_rpc::ClusterChat` (a gateway node without the chat role, calling the chat nodes of
//! its cluster over gRPC).
//!
//! **Identity.** Every call names the caller ([`Identity`]) as the gateway authenticated it
//! (client token verified, device admitted). The chat role trusts it: in process it is the same
//! value, and across nodes the call carries the cluster token, which only nodes of the cluster
//! hold (`courier_rpc::auth`).
//!
//! **What is not in the seam.** Plain store reads that a permission check of the seam guards
//! stay with the caller: a connection streams its catch-up and gap fills from the store itself
//! (the ranges and visibility come from [`ChatService::catch_up_plan`] and
//! [`ChatService::readable`]), reads its device's cursor, and records its device as seen; the
//! HTTP API admits a token's device (`courier_chat::devices::Devices::admit`) before any call.
//! These are reads and writes of the caller's own device record, not chat decisions.
//!
//! **Errors.** Every method answers the [`ApiError`] the client gets; a send's or a delete's
//! outcome resolves to a [`SequencerError`](crate::sequencing::SequencerError), which the
//! gateway maps like any other (`error.rs`). A remote binding gives back exactly the error the
//! in-process one would.

use crate::auth::Identity;
use crate::error::ApiError;
use crate::sequencing::PendingAppend;
use courier_proto::Event;
use courier_store::{MemberRecord, Visibility};
use std::collections::{BTreeMap, HashMap};

/// A page of events.
#[derive(Debug, Clone)]
pub struct Page {
    pub events: Vec<Event>,
    pub head_seq: u64,
    /// The retention floor, when events after the requested seq were cleared.
    pub trimmed: Option<u64>,
}

/// A conversation as listed by `GET /v1/conversations`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConversationSummary {
    pub conversation_id: String,
    pub kind: String,
    pub name: String,
    pub head_seq: u64,
    pub delivered_seq: u64,
    pub read_seq: u64,
    /// Events above the user's read cursor that it may read (its own included; not those of
    /// its times away, nor those before its join).
    pub unread: u64,
}

/// One conversation of a catch-up: send the events in `(from, head]` that `visible` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUp {
    pub conversation_id: String,
    pub from: u64,
    pub head: u64,
    pub visible: Visibility,
    /// The retention floor, when events the device has not had were cleared.
    pub trimmed: Option<u64>,
}

/// What a device must be sent to catch up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CatchUpPlan {
    /// A [`CatchUp`] per conversation with something to send.
    pub ranges: Vec<CatchUp>,
    /// Where live delivery resumes in each of the user's conversations.
    pub resume: HashMap<String, u64>,
    /// The conversations passed over, their stored records damaged, each with why: the
    /// client is told of each (`internal`), as it is of one a gap fill cannot read.
    pub unreadable: Vec<(String, String)>,
}

/// What one user may read of one conversation: its membership (current or former) and the
/// conversation's retention floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Readable {
    pub record: MemberRecord,
    pub history_on_join: u64,
    pub floor: u64,
}

impl Readable {
    /// The seqs the user may read that are still retained.
    pub fn visibility(&self) -> Visibility {
        self.record.visibility(self.history_on_join, self.floor)
    }

    /// The retention floor, if retention cleared events after `cursor` that the user could
    /// have read.
    pub fn trimmed_after(&self, cursor: u64) -> Option<u64> {
        let below_floor = self.floor.saturating_sub(1);
        self.record
            .visibility(self.history_on_join, 1)
            .ranges(cursor, below_floor)
            .next()
            .map(|_| self.floor)
    }
}

/// A device as listed by `GET /v1/devices`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceView {
    pub device: String,
    pub last_seen_ms: u64,
    pub push: bool,
}

/// The chat role, as the roles that hold clients' requests call it (see the module
/// documentation). Every method is one client request, or one step of a connection.
#[async_trait::async_trait]
pub trait ChatService: Send + Sync + 'static {
    /// Validates a `send` and queues it with the sequencer. Returns the conversation id and a
    /// future that resolves once the message is durable. Two calls for one device keep their
    /// order: the first is queued before the call returns.
    async fn submit_send(
        &self,
        who: &Identity,
        send: &courier_proto::Send,
    ) -> Result<(String, PendingAppend), ApiError>;

    /// Validates a delete for everyone and queues its `delete` event. Returns the
    /// `client_msg_id` its `sent` carries (`delete:<seq>`) and the pending append.
    async fn submit_delete(
        &self,
        who: &Identity,
        delete: &courier_proto::Delete,
    ) -> Result<(String, PendingAppend), ApiError>;

    /// Relays a typing indicator to the other members' connected devices.
    async fn typing(&self, who: &Identity, typing: &courier_proto::Typing) -> Result<(), ApiError>;

    /// Records an `ack` and tells the other members' devices if the receipt cursors moved.
    async fn acknowledge(&self, who: &Identity, ack: &courier_proto::Ack) -> Result<(), ApiError>;

    /// Events of `conv` after `after_seq` (at most `limit`) that `who` may read.
    async fn fetch(
        &self,
        who: &Identity,
        conv: &str,
        after_seq: u64,
        limit: Option<u32>,
    ) -> Result<Page, ApiError>;

    /// What `user` may read of `conv`; refused (`not_found` or `forbidden`) for a user who
    /// never belonged to it.
    async fn readable(&self, conv: &str, user: &str) -> Result<Readable, ApiError>;

    /// What `who`'s device must be sent to catch up, above its delivered cursors (or the
    /// client's `overrides` of them).
    async fn catch_up_plan(
        &self,
        who: &Identity,
        overrides: &BTreeMap<String, u64>,
    ) -> Result<CatchUpPlan, ApiError>;

    /// The user's conversations with their heads and receipt cursors.
    async fn conversations(&self, who: &Identity) -> Result<Vec<ConversationSummary>, ApiError>;

    /// Every current member's receipt cursors in `conv`, for a member: `receipt` frames reach
    /// only the devices connected when the cursors move.
    async fn receipts(
        &self,
        who: &Identity,
        conv: &str,
    ) -> Result<Vec<courier_proto::Receipt>, ApiError>;

    /// Creates a group with `who` as admin; returns its id once `group_created` is durable.
    async fn create_group(
        &self,
        who: &Identity,
        name: &str,
        members: &[String],
    ) -> Result<String, ApiError>;

    /// Adds users to a group (admins only); returns those added.
    async fn add_members(
        &self,
        who: &Identity,
        conv: &str,
        users: &[String],
    ) -> Result<Vec<String>, ApiError>;

    /// Removes a member (an admin removes anyone, a member itself).
    async fn remove_member(&self, who: &Identity, conv: &str, user: &str) -> Result<(), ApiError>;

    /// The user's linked devices.
    async fn devices(&self, user: &str) -> Result<Vec<DeviceView>, ApiError>;

    /// Registers the device's push endpoint; `configured` says whether the client's node has
    /// that provider (the node that serves the request answers for its configuration).
    async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError>;

    /// Unlinks one of the user's devices and closes its connections, on every gateway.
    async fn unlink_device(&self, user: &str, device: &str) -> Result<(), ApiError>;
}
