//! Every key of the message store, named in one place. Keys are FoundationDB tuples under one
//! root subspace, so that a cluster (or a test run) can hold several stores side by side.
//!
//! | subspace | key | value |
//! |---|---|---|
//! | `meta` | `("meta", "shards")` | shard count, fixed when the store is created |
//! | `shard` | `("shard", n)` | the shard's epoch (u64 LE); every append batch fences on it |
//! | `own` | `("own", n)` | the shard's sequencer: node, epoch, lease deadline (`OwnerRecord`, see `ownership.rs`) |
//! | `fepoch` | `("fepoch", n)` | the epoch of the shard's outbox consumer (u64 LE); every outbox clear fences on it |
//! | `fown` | `("fown", n)` | the shard's outbox consumer (fanout): node, epoch, lease deadline (`OwnerRecord`) |
//! | `route` | `("route", user, device, gateway)` | the device is connected to that gateway node (the connection's id, u64 LE) |
//! | `groute` | `("groute", gateway, user, device)` | the same route, listed by gateway to sweep a lapsed gateway's routes: when it was written (ms, u64 LE, the gateway's clock) |
//! | `node` | `("node", id)` | a node of the cluster: roles, address, lease deadline (`NodeRecord`) |
//! | `conv` | `("conv", conv)` | conversation record (`ConversationRecord`) |
//! | `mem` | `("mem", conv, user)` | membership, current or former (`MemberRecord`: admin, joined seq, past periods) |
//! | `convs` | `("convs", user, conv)` | the user's conversations: empty while a member, else the seq of its `member_removed` (u64 LE) |
//! | `head` | `("head", conv)` | highest seq (u64 LE) |
//! | `ev` | `("ev", conv, seq)` | the event (`courier.v1.Event`, protobuf) |
//! | `hidem` | `("hidem", bucket, conv hash, user, device, client_msg_id)` | the first outcome of a client's send (`IdempotencyRecord`), in the bucket of its time (`bucket`: when the bucket's records expire, `crate::idempotency`), under the conversation's [`stable_hash`] ([`Keys::idempotency`]); cleared by retention a bucket at a time |
//! | `idem` | `("idem", bucket, conv, user, device, client_msg_id)` | the same record as versions before the hash keyed it, under the conversation's id; looked up while any is left. Records of versions before buckets have no `bucket` |
//! | `sidem` | `("sidem", bucket, conv, key)` | the first outcome of a server-made append (a delete's target, a membership request); in buckets likewise |
//! | `cur` | `("cur", user, device, conv)` | the device's delivered cursor (u64 LE, atomic MAX) |
//! | `rcpt` | `("rcpt", conv, user, kind)` | the user's delivered/read cursor (u64 LE, atomic MAX) |
//! | `ob` | `("ob", shard, versionstamp)` | outbox: events committed, not yet both fanned out and read by the push notifier |
//! | `fcur` | `("fcur", shard)` | fanout's bound in the outbox: every entry below it was handed to the gateways (fenced on the delivery epoch) |
//! | `pcur` | `("pcur", shard)` | the push notifier's bound in the outbox: every message below it was expanded into pending notifications |
//! | `floor` | `("floor", conv)` | lowest retained seq (u64 LE); events below were cleared |
//! | `dev` | `("dev", user, device)` | the device (`DeviceRecord`: last seen, unlinked, push) |
//! | `dlinks` | `("dlinks", user)` | links of the user's devices made once it had one (u64 LE, atomic ADD): such a link under `--max-devices-per-user` fences on it, so that two new devices cannot both take the last place |
//! | `ptok` | `("ptok", provider, token)` | the device that registered the push token last (`PushTokenHolder`, `crate::push_tokens`) |
//! | `gcount` | `("gcount", user, shard)` | groups of `shard` the user belongs to (i64 LE, atomic ADD); a user's group count is the sum of these |
//! | `dcount` | `("dcount", user, shard)` | direct conversations of `shard` the user started (i64 LE, atomic ADD), for `--max-direct-conversations-per-user` |
//! | `ngroups` | `("ngroups", user)` | groups the user belonged to, as counted before `gcount` (i64 LE): read and added, no longer written |
//! | `media` | `("media", id)` | one user's upload (`MediaRecord`: owner, mime, size, sha256, time) |
//! | `mblob` | `("mblob", sha256, id)` | media record `id` keeps the bytes `sha256` (empty) |
//! | `mgone` | `("mgone", id)` | media record `id` as the sweeper forgot it (`MediaRecord`): the sweeper deletes its bytes unless a record keeps them, then this |
//! | `mbytes` | `("mbytes", user)` | bytes of the user's media records, for the quota (u64 LE) |
//! | `mref` | `("mref", id, conv, seq)` | message `seq` of `conv` references it (empty); one per message |
//! | `pushq` | `("pushq", user, device, conv)` | a pending, collapsed notification (`PendingPush`) |
//! | `pushowed` | `("pushowed", user, device, conv)` | events a connection closed for silence wrote to the device in the conversation, through this seq (u64 LE, atomic MAX): the push notifier notifies the device of those it did not acknowledge, then clears this |
//! | `trimq` | `("trimq", due, conv)` | the retention queue: a pass looks at the conversation once `due` (ms) has come (empty) |
//! | `meta` | `("meta", "pushreg")` | how many times a device's push registration began or ended (u64 LE, atomic ADD) |
//! | `meta` | `("meta", "pushreg", slot)` | the same, for the users of one slot ([`push_registration_slot`]): the push notifier keeps the registrations it read of a slot's users while its count stays put |
//! | `meta` | `("meta", "trimq")` | the retention window the queue was built for and when (two u64 LE) |
//! | `meta` | `("meta", "mediakey")` | the key media ids are made with (32 random bytes, made at the first upload) |
//! | `meta` | `("meta", "partitions")`, `("meta", "partition")` | with storage partitions: the table's shard ranges (in the directory) and each partition's index (in each partition) |
//!
//! **Placement.** With storage partitions (`crate::partitions`), every key lives in the
//! partition [`Keys::placement`] names: shard-scoped keys with their shard, conversation-scoped
//! keys (also `convs`, `mref`, `pushq` and `pushowed`, which name a conversation after a user
//! or a media id) with their conversation's shard, `ngroups` with the shard it counts, and the
//! rest in the directory (partition 0). `docs/decisions/0005-storage-partitions.md` says why.

use crate::ownership::Duty;
use foundationdb_tuple::{Subspace, TuplePack, Versionstamp};
use std::ops::Range;

/// FNV-1a: a stable hash, so a conversation maps to the same shard in every process and version.
pub(crate) fn stable_hash(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Slots that the users' push registrations are counted in, a count per slot.
pub const PUSH_REGISTRATION_SLOTS: u16 = 256;

/// The slot whose count a change of `user`'s push registrations moves: the same in every
/// process and version.
pub fn push_registration_slot(user: &str) -> u16 {
    (stable_hash(user.bytes()) % u64::from(PUSH_REGISTRATION_SLOTS)) as u16
}

/// Which partition a key lives in (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The directory (partition 0): cluster-wide, per-user, per-device and media keys.
    Directory,
    /// The partition of this shard.
    Shard(u32),
    /// The partition of the shard of the conversation whose id has this [`stable_hash`].
    Conversation(u64),
}

/// The subspaces of idempotency records, in key order: client sends under their conversation's
/// hash and under its id, server-made appends.
const IDEMPOTENCY_SUBSPACES: [&str; 3] = ["hidem", "idem", "sidem"];

/// The first element of every event key as packed: the string `"ev"`.
const EVENT_ELEMENT: &[u8] = b"\x02ev\x00";

/// Reads the elements of a packed tuple one by one, as far as they are whole (a range's
/// bounds end in `0x00` or `0xff`, which are not elements Courier writes).
struct TupleReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> TupleReader<'a> {
    /// A string element's bytes as packed (a `0x00` in it is escaped as `0x00 0xff`).
    fn string(&mut self) -> Option<&'a [u8]> {
        if self.bytes.get(self.at) != Some(&0x02) {
            return None;
        }
        let start = self.at + 1;
        let mut i = start;
        loop {
            i += self.bytes.get(i..)?.iter().position(|&b| b == 0x00)?;
            if self.bytes.get(i + 1) != Some(&0xff) {
                break;
            }
            i += 2;
        }
        self.at = i + 1;
        Some(&self.bytes[start..i])
    }

    /// A non-negative integer element.
    fn uint(&mut self) -> Option<u64> {
        let len = usize::from(self.bytes.get(self.at)?.checked_sub(0x14)?);
        let digits = self.bytes.get(self.at + 1..self.at + 1 + len)?;
        if len > 8 {
            return None;
        }
        self.at += 1 + len;
        Some(digits.iter().fold(0, |n, d| (n << 8) | u64::from(*d)))
    }

    /// The stable hash of a string element, unescaped (the conversation id as written).
    fn hashed_string(&mut self) -> Option<u64> {
        let packed = self.string()?;
        let mut escaped = false;
        Some(stable_hash(packed.iter().copied().filter(|&b| {
            let skip = escaped && b == 0xff;
            escaped = b == 0x00;
            !skip
        })))
    }
}

/// Builds the keys of one store.
#[derive(Debug, Clone)]
pub struct Keys {
    root: Subspace,
}

/// Which receipt cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

impl ReceiptKind {
    fn tag(self) -> &'static str {
        match self {
            ReceiptKind::Delivered => "d",
            ReceiptKind::Read => "r",
        }
    }
}

fn range_of(space: Subspace) -> Range<Vec<u8>> {
    let (begin, end) = space.range();
    begin..end
}

/// Room for a typical key after the root: packing one then allocates once, where
/// `Subspace::pack` starts from the root alone and grows the key with each element it writes.
const KEY_CAPACITY: usize = 64;

impl Keys {
    /// Keys under `root` (the empty prefix for a whole embedded database).
    pub fn new(root: &[u8]) -> Self {
        Self {
            root: Subspace::from_bytes(root.to_vec()),
        }
    }

    /// `tuple` packed under the root: the bytes of `Subspace::pack`.
    fn pack<T: TuplePack>(&self, tuple: &T) -> Vec<u8> {
        let mut key = self.root_with_room(0);
        foundationdb_tuple::pack_into(tuple, &mut key);
        key
    }

    /// The root's bytes, with room for a typical key after them and `more` bytes: a key
    /// packed into it allocates once.
    fn root_with_room(&self, more: usize) -> Vec<u8> {
        let root = self.root.bytes();
        let mut key = Vec::with_capacity(root.len() + KEY_CAPACITY + more);
        key.extend_from_slice(root);
        key
    }

    pub fn shard_count(&self) -> Vec<u8> {
        self.pack(&("meta", "shards"))
    }

    /// The epoch `duty`'s owners of `shard` fence on.
    pub fn shard_epoch(&self, duty: Duty, shard: u32) -> Vec<u8> {
        match duty {
            Duty::Sequencing => self.pack(&("shard", shard)),
            Duty::Delivery => self.pack(&("fepoch", shard)),
        }
    }

    /// The ownership record of `shard` for `duty`.
    pub fn shard_owner(&self, duty: Duty, shard: u32) -> Vec<u8> {
        match duty {
            Duty::Sequencing => self.pack(&("own", shard)),
            Duty::Delivery => self.pack(&("fown", shard)),
        }
    }

    /// The leader record of a cluster-wide job (`crate::leaders`).
    pub fn leader(&self, job: &str) -> Vec<u8> {
        self.pack(&("lead", job))
    }

    /// The ownership records of every shard for `duty`, in shard order.
    pub fn shard_owners(&self, duty: Duty) -> Range<Vec<u8>> {
        match duty {
            Duty::Sequencing => range_of(self.root.subspace(&("own",))),
            Duty::Delivery => range_of(self.root.subspace(&("fown",))),
        }
    }

    /// The epochs of every shard for `duty` (see [`Keys::shard_epoch`]), in shard order.
    pub fn shard_epochs(&self, duty: Duty) -> Range<Vec<u8>> {
        match duty {
            Duty::Sequencing => range_of(self.root.subspace(&("shard",))),
            Duty::Delivery => range_of(self.root.subspace(&("fepoch",))),
        }
    }

    /// The shard of a key from [`Keys::shard_owners`].
    pub fn shard_owner_shard(&self, key: &[u8]) -> Option<u32> {
        self.root
            .unpack::<(String, u32)>(key)
            .ok()
            .map(|(_, shard)| shard)
    }

    pub fn route(&self, user: &str, device: &str, gateway: &str) -> Vec<u8> {
        self.pack(&("route", user, device, gateway))
    }

    /// Every route of `user`: one per connected device and gateway.
    pub fn routes(&self, user: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("route", user)))
    }

    /// The device and gateway of a key from [`Keys::routes`].
    pub fn route_parts(&self, key: &[u8]) -> Option<(String, String)> {
        self.root
            .unpack::<(String, String, String, String)>(key)
            .ok()
            .map(|(_, _, device, gateway)| (device, gateway))
    }

    pub fn gateway_route(&self, gateway: &str, user: &str, device: &str) -> Vec<u8> {
        self.pack(&("groute", gateway, user, device))
    }

    /// Every route to `gateway`.
    pub fn gateway_routes(&self, gateway: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("groute", gateway)))
    }

    /// The user and device of a key from [`Keys::gateway_routes`].
    pub fn gateway_route_parts(&self, key: &[u8]) -> Option<(String, String)> {
        self.root
            .unpack::<(String, String, String, String)>(key)
            .ok()
            .map(|(_, _, user, device)| (user, device))
    }

    pub fn node(&self, id: &str) -> Vec<u8> {
        self.pack(&("node", id))
    }

    pub fn nodes(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("node",)))
    }

    /// The node id of a key from [`Keys::nodes`].
    pub fn node_id(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String)>(key)
            .ok()
            .map(|(_, id)| id)
    }

    pub fn conversation(&self, conv: &str) -> Vec<u8> {
        self.pack(&("conv", conv))
    }

    pub fn member(&self, conv: &str, user: &str) -> Vec<u8> {
        self.pack(&("mem", conv, user))
    }

    pub fn members(&self, conv: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("mem", conv)))
    }

    /// The user id of a key from [`Keys::members`].
    pub fn member_user(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String, String)>(key)
            .ok()
            .map(|(_, _, user)| user)
    }

    pub fn user_conversation(&self, user: &str, conv: &str) -> Vec<u8> {
        self.pack(&("convs", user, conv))
    }

    pub fn user_conversations(&self, user: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("convs", user)))
    }

    /// The conversation id of a key from [`Keys::user_conversations`].
    pub fn user_conversation_id(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String, String)>(key)
            .ok()
            .map(|(_, _, conv)| conv)
    }

    /// Every conversation record, for background jobs.
    pub fn conversations(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("conv",)))
    }

    /// The conversation id of a key from [`Keys::conversations`].
    pub fn conversation_id(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String)>(key)
            .ok()
            .map(|(_, conv)| conv)
    }

    /// `conv`'s entry in the retention queue, due at `due_ms`.
    pub fn trim_due(&self, due_ms: u64, conv: &str) -> Vec<u8> {
        self.pack(&("trimq", due_ms, conv))
    }

    /// The retention queue's entries due at or before `now_ms`.
    pub fn trims_due(&self, now_ms: u64) -> Range<Vec<u8>> {
        self.pack(&("trimq", 0u64))..self.pack(&("trimq", now_ms.saturating_add(1)))
    }

    /// Every entry of the retention queue.
    pub fn trim_queue(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("trimq",)))
    }

    /// The due time and conversation of a key from [`Keys::trim_queue`].
    pub fn trim_due_entry(&self, key: &[u8]) -> Option<(u64, String)> {
        self.root
            .unpack::<(String, u64, String)>(key)
            .ok()
            .map(|(_, due, conv)| (due, conv))
    }

    /// The retention window the queue was built for, and when.
    pub fn trim_queue_built(&self) -> Vec<u8> {
        self.pack(&("meta", "trimq"))
    }

    pub fn floor(&self, conv: &str) -> Vec<u8> {
        self.pack(&("floor", conv))
    }

    pub fn device(&self, user: &str, device: &str) -> Vec<u8> {
        self.pack(&("dev", user, device))
    }

    /// The device that registered `provider`'s push `token` last.
    pub fn push_token(&self, provider: &str, token: &str) -> Vec<u8> {
        self.pack(&("ptok", provider, token))
    }

    /// The count of push registrations begun or ended (module documentation).
    pub fn push_registration_changes(&self) -> Vec<u8> {
        self.pack(&("meta", "pushreg"))
    }

    /// The count of push registrations begun or ended by the users of `slot`.
    pub fn push_registration_changes_in(&self, slot: u16) -> Vec<u8> {
        self.pack(&("meta", "pushreg", u64::from(slot)))
    }

    /// The count of `user`'s device links (module documentation).
    pub fn device_links(&self, user: &str) -> Vec<u8> {
        self.pack(&("dlinks", user))
    }

    pub fn devices(&self, user: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("dev", user)))
    }

    /// The device id of a key from [`Keys::devices`].
    pub fn device_id(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String, String)>(key)
            .ok()
            .map(|(_, _, device)| device)
    }

    pub fn media(&self, id: &str) -> Vec<u8> {
        self.pack(&("media", id))
    }

    /// Every media record, for the sweeper.
    pub fn all_media(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("media",)))
    }

    /// Media record `id` as it was forgotten, until the sweeper has settled its bytes.
    pub fn forgotten_media(&self, id: &str) -> Vec<u8> {
        self.pack(&("mgone", id))
    }

    /// Every forgotten media record whose bytes the sweeper has not settled yet.
    pub fn all_forgotten_media(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("mgone",)))
    }

    /// The media id of a key from [`Keys::all_media`] or [`Keys::all_forgotten_media`].
    pub fn media_id(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String)>(key)
            .ok()
            .map(|(_, id)| id)
    }

    pub fn blob_user(&self, sha256: &str, id: &str) -> Vec<u8> {
        self.pack(&("mblob", sha256, id))
    }

    pub fn blob_users(&self, sha256: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("mblob", sha256)))
    }

    /// Every media record's claim on its bytes, in the order of the bytes' hashes.
    pub fn all_blob_users(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("mblob",)))
    }

    /// The bytes' hash (`sha256`) of a key from [`Keys::all_blob_users`].
    pub fn blob_of_user(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String, String)>(key)
            .ok()
            .map(|(_, sha256, _)| sha256)
    }

    pub fn media_usage(&self, user: &str) -> Vec<u8> {
        self.pack(&("mbytes", user))
    }

    pub fn media_reference(&self, id: &str, conv: &str, seq: u64) -> Vec<u8> {
        self.pack(&("mref", id, conv, seq))
    }

    pub fn media_references(&self, id: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("mref", id)))
    }

    /// The references to media `id` from messages of `conv`.
    pub fn media_references_in(&self, id: &str, conv: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("mref", id, conv)))
    }

    /// `(conv, seq)` of a key from [`Keys::media_references`].
    pub fn media_reference_parts(&self, key: &[u8]) -> Option<(String, u64)> {
        self.root
            .unpack::<(String, String, String, u64)>(key)
            .ok()
            .map(|(_, _, conv, seq)| (conv, seq))
    }

    pub fn pending_push(&self, user: &str, device: &str, conv: &str) -> Vec<u8> {
        self.pack(&("pushq", user, device, conv))
    }

    pub fn pending_pushes(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("pushq",)))
    }

    /// `(user, device, conv)` of a key from [`Keys::pending_pushes`].
    pub fn pending_push_parts(&self, key: &[u8]) -> Option<(String, String, String)> {
        self.root
            .unpack::<(String, String, String, String)>(key)
            .ok()
            .map(|(_, user, device, conv)| (user, device, conv))
    }

    /// Where a connection closed for silence left `user`'s `device` in `conv`: the push
    /// notifier notifies the device of what it wrote there and the device did not acknowledge.
    pub fn owed_push(&self, user: &str, device: &str, conv: &str) -> Vec<u8> {
        self.pack(&("pushowed", user, device, conv))
    }

    pub fn owed_pushes(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("pushowed",)))
    }

    /// `(user, device, conv)` of a key from [`Keys::owed_pushes`].
    pub fn owed_push_parts(&self, key: &[u8]) -> Option<(String, String, String)> {
        self.pending_push_parts(key)
    }

    /// The count of `user`'s groups whose conversations are in `shard`.
    pub fn group_counter(&self, user: &str, shard: u32) -> Vec<u8> {
        self.pack(&("gcount", user, shard))
    }

    /// The count of direct conversations `user` started whose conversations are in `shard`.
    pub fn direct_counter(&self, user: &str, shard: u32) -> Vec<u8> {
        self.pack(&("dcount", user, shard))
    }

    /// Every direct conversation counter of `user`, one per shard.
    pub fn direct_counters(&self, user: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("dcount", user)))
    }

    /// Every group counter of `user`, one per shard.
    pub fn group_counters(&self, user: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("gcount", user)))
    }

    /// `user`'s group count as kept before [`Keys::group_counter`] (stores written before
    /// storage partitions): read and added to the counters.
    pub fn former_group_count(&self, user: &str) -> Vec<u8> {
        self.pack(&("ngroups", user))
    }

    /// The key media ids are made with.
    pub fn media_id_key(&self) -> Vec<u8> {
        self.pack(&("meta", "mediakey"))
    }

    /// The table of a partitioned store (its shard ranges), kept in the directory.
    pub fn partition_table(&self) -> Vec<u8> {
        self.pack(&("meta", "partitions"))
    }

    /// A partition's own index, kept in each partition of a partitioned store.
    pub fn partition_index(&self) -> Vec<u8> {
        self.pack(&("meta", "partition"))
    }

    /// Where `key` lives, and how many of its first bytes decide it (every key that starts
    /// with them lives there too); `None` for a key of no known subspace, or a range bound
    /// cut before what decides it.
    pub fn placement(&self, key: &[u8]) -> Option<(Placement, usize)> {
        let root = self.root.bytes();
        let mut tuple = TupleReader {
            bytes: key.strip_prefix(root)?,
            at: 0,
        };
        let place = match tuple.string()? {
            b"meta" | b"lead" | b"route" | b"groute" | b"node" | b"dev" | b"dlinks" | b"ptok"
            | b"cur" | b"media" | b"mgone" | b"mblob" | b"mbytes" | b"ngroups" => {
                Placement::Directory
            }
            b"shard" | b"own" | b"fepoch" | b"fown" | b"ob" | b"fcur" | b"pcur" => {
                Placement::Shard(u32::try_from(tuple.uint()?).ok()?)
            }
            b"gcount" | b"dcount" => {
                tuple.string()?;
                Placement::Shard(u32::try_from(tuple.uint()?).ok()?)
            }
            b"conv" | b"mem" | b"head" | b"ev" | b"rcpt" | b"floor" => {
                Placement::Conversation(tuple.hashed_string()?)
            }
            b"trimq" => {
                tuple.uint()?;
                Placement::Conversation(tuple.hashed_string()?)
            }
            b"hidem" => {
                tuple.uint()?;
                Placement::Conversation(tuple.uint()?)
            }
            b"idem" | b"sidem" => {
                // A bucket first, but for records written before buckets.
                tuple.uint();
                Placement::Conversation(tuple.hashed_string()?)
            }
            b"convs" | b"mref" => {
                tuple.string()?;
                Placement::Conversation(tuple.hashed_string()?)
            }
            b"pushq" | b"pushowed" => {
                tuple.string()?;
                tuple.string()?;
                Placement::Conversation(tuple.hashed_string()?)
            }
            _ => return None,
        };
        Some((place, root.len() + tuple.at))
    }

    pub fn head(&self, conv: &str) -> Vec<u8> {
        self.pack(&("head", conv))
    }

    pub fn event(&self, conv: &str, seq: u64) -> Vec<u8> {
        self.pack(&("ev", conv, seq))
    }

    /// Events of `conv` with `seq` in `[from, to)`.
    pub fn events(&self, conv: &str, from: u64, to: u64) -> Range<Vec<u8>> {
        self.event(conv, from)..self.event(conv, to)
    }

    /// Events of `conv` with a seq above `seq`, to the last one it may hold.
    pub fn events_after(&self, conv: &str, seq: u64) -> Range<Vec<u8>> {
        self.event(conv, seq.saturating_add(1))..range_of(self.root.subspace(&("ev", conv))).end
    }

    /// Every event key, of every conversation.
    pub fn all_events(&self) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("ev",)))
    }

    /// An event key split into its conversation's part (its bytes before the seq) and its
    /// seq; `None` for any other key or a range bound that is not an event key.
    pub fn event_parts<'k>(&self, key: &'k [u8]) -> Option<(&'k [u8], u64)> {
        let root = self.root.bytes();
        let bytes = key.strip_prefix(root)?;
        // Told apart by their first element's bytes, before any parsing: most keys a group
        // commit writes are not events, and the store's writer asks for each (`event_cache`).
        if !bytes.starts_with(EVENT_ELEMENT) {
            return None;
        }
        let mut tuple = TupleReader {
            bytes,
            at: EVENT_ELEMENT.len(),
        };
        tuple.string()?;
        let conversation = root.len() + tuple.at;
        let seq = tuple.uint()?;
        (root.len() + tuple.at == key.len()).then_some((&key[..conversation], seq))
    }

    /// The event key of `seq` in the conversation whose part [`Keys::event_parts`] gave.
    pub fn event_from_parts(conversation: &[u8], seq: u64) -> Vec<u8> {
        let mut key = Vec::with_capacity(conversation.len() + 9);
        key.extend_from_slice(conversation);
        foundationdb_tuple::pack_into(&seq, &mut key);
        key
    }

    /// The idempotency record of a client's send in each of `buckets` (the times their
    /// records expire, `crate::idempotency`), in their order: under the conversation's
    /// [`stable_hash`] (9 bytes packed, which also place it with its conversation) instead of
    /// its id (36 for a direct conversation), then the sender and its id. Each record is
    /// written again at the flush of its memtable and at each merge of its tables, a key a
    /// message. Two conversations whose ids share a hash only share records of a device that
    /// gave both sends the same `client_msg_id` (the protocol has it unique per device).
    ///
    /// The ids themselves stay in the key, in their order: a client whose ids grow (a counter,
    /// a time-ordered UUID) then writes and looks up its records next to each other, where the
    /// memtable's search is warm. A digest of all four ids (a shorter key still) put each
    /// record at a random place and cost the 1:1 peak ~30 % (decision 0017,
    /// `docs/decisions/0017-idempotency-keys.md`).
    pub fn idempotency(
        &self,
        buckets: &[u64],
        conv: &str,
        user: &str,
        device: &str,
        client_msg_id: &str,
    ) -> Vec<Vec<u8>> {
        let tail = (stable_hash(conv.bytes()), user, device, client_msg_id);
        self.in_buckets("hidem", buckets, &tail)
    }

    /// The record of a client's send in each of `buckets` as versions before the hash keyed
    /// it: under the conversation's id.
    pub fn named_idempotency(
        &self,
        buckets: &[u64],
        conv: &str,
        user: &str,
        device: &str,
        client_msg_id: &str,
    ) -> Vec<Vec<u8>> {
        self.in_buckets("idem", buckets, &(conv, user, device, client_msg_id))
    }

    /// The idempotency record of a server-made append in each of `buckets`: a subspace of its
    /// own, so that no client id can collide with it.
    pub fn server_idempotency(&self, buckets: &[u64], conv: &str, key: &str) -> Vec<Vec<u8>> {
        self.in_buckets("sidem", buckets, &(conv, key))
    }

    /// `(space, bucket, tail...)` for each bucket, the tail packed once (a tuple's encoding is
    /// its elements' encodings one after another).
    fn in_buckets<T: TuplePack>(&self, space: &str, buckets: &[u64], tail: &T) -> Vec<Vec<u8>> {
        // A client's tail (conversation, user, device and message ids) passes a typical key.
        let mut packed_tail = Vec::with_capacity(2 * KEY_CAPACITY);
        foundationdb_tuple::pack_into(tail, &mut packed_tail);
        buckets
            .iter()
            .map(|&bucket| {
                let mut key = self.root_with_room(packed_tail.len());
                foundationdb_tuple::pack_into(&(space, bucket), &mut key);
                key.extend_from_slice(&packed_tail);
                key
            })
            .collect()
    }

    /// The idempotency records, of client sends (under their conversation's hash, then its id)
    /// and of server-made appends, in the buckets that expire at or before `now_ms`.
    pub fn expired_idempotency_buckets(&self, now_ms: u64) -> [Range<Vec<u8>>; 3] {
        IDEMPOTENCY_SUBSPACES
            .map(|space| self.pack(&(space, 0u64))..self.pack(&(space, now_ms.saturating_add(1))))
    }

    /// The idempotency records' three subspaces, of client sends (under their conversation's
    /// hash, then its id) and of server-made appends, whole, in key order (the embedded engine
    /// keeps them apart: `crate::keyspaces`).
    pub fn idempotency_subspaces(&self) -> [Range<Vec<u8>>; 3] {
        IDEMPOTENCY_SUBSPACES.map(|space| range_of(self.root.subspace(&(space,))))
    }

    /// The records of client sends in buckets under their conversation's id, as versions
    /// before the hash wrote them: their buckets (integers) sort after the conversations
    /// (strings) of the records written before buckets.
    pub fn named_idempotency_records(&self) -> Range<Vec<u8>> {
        self.pack(&("idem", 0u64))..range_of(self.root.subspace(&("idem",))).end
    }

    /// An idempotency record of a client's send written before buckets.
    pub fn legacy_idempotency(
        &self,
        conv: &str,
        user: &str,
        device: &str,
        client_msg_id: &str,
    ) -> Vec<u8> {
        self.pack(&("idem", conv, user, device, client_msg_id))
    }

    /// An idempotency record of a server-made append written before buckets.
    pub fn legacy_server_idempotency(&self, conv: &str, key: &str) -> Vec<u8> {
        self.pack(&("sidem", conv, key))
    }

    /// The idempotency records written before buckets, of both subspaces: their conversation
    /// (a string) sorts before every bucket (an integer).
    pub fn legacy_idempotency_records(&self) -> [Range<Vec<u8>>; 2] {
        ["idem", "sidem"]
            .map(|space| range_of(self.root.subspace(&(space,))).start..self.pack(&(space, 0u64)))
    }

    pub fn cursor(&self, user: &str, device: &str, conv: &str) -> Vec<u8> {
        self.pack(&("cur", user, device, conv))
    }

    pub fn cursors(&self, user: &str, device: &str) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("cur", user, device)))
    }

    /// The conversation id of a key from [`Keys::cursors`].
    pub fn cursor_conversation(&self, key: &[u8]) -> Option<String> {
        self.root
            .unpack::<(String, String, String, String)>(key)
            .ok()
            .map(|(_, _, _, conv)| conv)
    }

    pub fn receipt(&self, conv: &str, user: &str, kind: ReceiptKind) -> Vec<u8> {
        self.pack(&("rcpt", conv, user, kind.tag()))
    }

    /// An outbox key of `shard` to be completed with the commit's versionstamp; `order` tells
    /// apart the entries of one commit.
    pub fn outbox_entry(&self, shard: u32, order: u16) -> Vec<u8> {
        let mut key = self.root_with_room(0);
        let entry = ("ob", shard, Versionstamp::incomplete(order));
        foundationdb_tuple::pack_into_with_versionstamp(&entry, &mut key);
        key
    }

    pub fn outbox(&self, shard: u32) -> Range<Vec<u8>> {
        range_of(self.root.subspace(&("ob", shard)))
    }

    /// Fanout's bound in `shard`'s outbox (every entry below it was delivered).
    pub fn delivered_bound(&self, shard: u32) -> Vec<u8> {
        self.pack(&("fcur", shard))
    }

    /// The push notifier's bound in `shard`'s outbox (every message below it was expanded).
    pub fn pushed_bound(&self, shard: u32) -> Vec<u8> {
        self.pack(&("pcur", shard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn events_sort_by_seq_and_stay_inside_their_conversation() {
        let keys = Keys::new(b"t");
        assert!(keys.event("a", 2) < keys.event("a", 10));
        assert!(keys.event("a", u64::MAX) < keys.event("a0", 0));
        let range = keys.events("a", 1, 3);
        assert!(range.contains(&keys.event("a", 2)));
        assert!(!range.contains(&keys.event("a", 3)));
    }

    #[test]
    fn an_event_key_splits_into_its_conversation_and_seq_and_back() {
        for keys in [Keys::new(&[]), Keys::new(b"t")] {
            for (conv, seq) in [("d:ab", 0), ("g:\0x", 1), ("a", 255), ("a", u64::MAX)] {
                let key = keys.event(conv, seq);
                let (conversation, split) = keys.event_parts(&key).unwrap();
                assert_eq!(split, seq);
                assert_eq!(conversation, &keys.event(conv, 0)[..conversation.len()]);
                assert_eq!(Keys::event_from_parts(conversation, seq), key);
                assert!(keys.all_events().contains(&key));
            }
            for other in [keys.head("a"), keys.floor("a"), keys.member("a", "ev")] {
                assert_eq!(keys.event_parts(&other), None);
                assert!(!keys.all_events().contains(&other));
            }
        }
        assert_eq!(
            Keys::new(&[]).event_parts(&Keys::new(b"t").event("a", 1)),
            None
        );
    }

    /// The expired buckets hold the records of buckets up to the time given, in each layout;
    /// the named range only records in buckets under their conversation's id, and the legacy
    /// ranges only records keyed by conversation.
    #[test]
    fn idempotency_ranges_split_records_by_bucket_and_layout() {
        let keys = Keys::new(b"t");
        let [sends, named, server] = keys.expired_idempotency_buckets(1_000);
        let [old_sends, old_server] = keys.legacy_idempotency_records();
        let all_named = keys.named_idempotency_records();
        let expired = [0, 999, 1_000];
        assert!(
            keys.idempotency(&expired, "d:a", "u", "p", "c")
                .iter()
                .all(|k| sends.contains(k) && !all_named.contains(k))
        );
        assert!(
            keys.named_idempotency(&expired, "d:a", "u", "p", "c")
                .iter()
                .all(|k| named.contains(k) && all_named.contains(k) && !sends.contains(k))
        );
        assert!(
            keys.server_idempotency(&expired, "d:a", "k")
                .iter()
                .all(|k| server.contains(k))
        );
        let kept = [1_001, u64::MAX];
        assert!(
            !keys
                .idempotency(&kept, "d:a", "u", "p", "c")
                .iter()
                .any(|k| sends.contains(k))
        );
        assert!(
            keys.named_idempotency(&kept, "d:a", "u", "p", "c")
                .iter()
                .all(|k| !named.contains(k) && all_named.contains(k))
        );
        assert!(
            !keys
                .server_idempotency(&kept, "d:a", "k")
                .iter()
                .any(|k| server.contains(k))
        );
        for conv in ["", "d:a", "\u{ff}"] {
            let legacy = keys.legacy_idempotency(conv, "u", "p", "c");
            let legacy_server = keys.legacy_server_idempotency(conv, "k");
            assert!(old_sends.contains(&legacy) && !sends.contains(&legacy));
            assert!(!all_named.contains(&legacy));
            assert!(old_server.contains(&legacy_server) && !server.contains(&legacy_server));
        }
        assert!(!old_sends.contains(&keys.idempotency(&[0], "d:a", "u", "p", "c")[0]));
        assert!(!old_server.contains(&keys.server_idempotency(&[0], "d:a", "k")[0]));
        assert!(!old_sends.contains(&keys.head("d:a")) && !sends.contains(&keys.head("d:a")));
    }

    /// A record's key tells apart ids that differ anywhere, also where one id's end moves into
    /// the next, and sorts a device's records by their ids.
    #[test]
    fn a_records_key_tells_every_id_apart() {
        let keys = Keys::new(b"t");
        let ids = [
            ["d:a", "u", "p", "c"],
            ["d:b", "u", "p", "c"],
            ["d:a", "v", "p", "c"],
            ["d:a", "u", "q", "c"],
            ["d:a", "u", "p", "d"],
            ["d:a", "up", "", "c"],
            ["d:a", "u", "pc", ""],
            ["d:a", "u\0", "p", "c"],
        ];
        let distinct: HashSet<Vec<u8>> = ids
            .iter()
            .map(|[conv, user, device, id]| {
                keys.idempotency(&[7], conv, user, device, id).remove(0)
            })
            .collect();
        assert_eq!(distinct.len(), ids.len());
        let direct = "d:0123456789abcdef0123456789abcdef";
        let record = |id: &str| keys.idempotency(&[7], direct, "u", "p", id).remove(0);
        assert!(record("m-1") < record("m-2") && record("m-2") < record("m-3"));
        let named = keys
            .named_idempotency(&[7], direct, "u", "p", "m-1")
            .remove(0);
        // The conversation's 36 bytes packed against its hash's 9, and the subspace's name a
        // byte longer.
        assert_eq!(named.len() - record("m-1").len(), 36 - 9 - 1);
    }

    /// Keys are stored: their bytes are FoundationDB's tuple encoding under the root, whatever
    /// their length and content (escaped zero bytes included).
    #[test]
    fn keys_are_the_tuple_encoding_under_the_root() {
        let long = "u".repeat(200);
        for root in [&b""[..], b"cluster-a"] {
            let keys = Keys::new(root);
            let space = Subspace::from_bytes(root.to_vec());
            assert_eq!(keys.head("d:a\0b"), space.pack(&("head", "d:a\0b")));
            assert_eq!(
                keys.server_idempotency(&[3], "d:a\0b", "k"),
                [space.pack(&("sidem", 3u64, "d:a\0b", "k"))]
            );
            assert_eq!(
                keys.named_idempotency(&[9, u64::MAX], "g:1", &long, "phone", "c-1"),
                [9, u64::MAX].map(|b| space.pack(&(
                    "idem",
                    b,
                    "g:1",
                    long.as_str(),
                    "phone",
                    "c-1"
                )))
            );
            let conv_hash = stable_hash("g:1".bytes());
            assert_eq!(
                keys.idempotency(&[9, u64::MAX], "g:1", &long, "phone", "c-1"),
                [9, u64::MAX].map(|b| space.pack(&(
                    "hidem",
                    b,
                    conv_hash,
                    long.as_str(),
                    "phone",
                    "c-1"
                )))
            );
            assert_eq!(
                keys.event("g:1", u64::MAX),
                space.pack(&("ev", "g:1", u64::MAX))
            );
            assert_eq!(
                keys.shard_epoch(Duty::Delivery, 7),
                space.pack(&("fepoch", 7u32))
            );
            // With the versionstamp's offset after it, counted from the root's first byte.
            assert_eq!(
                keys.outbox_entry(5, 300),
                space.pack_with_versionstamp(&("ob", 5u32, Versionstamp::incomplete(300)))
            );
        }
    }

    #[test]
    fn parts_are_read_back_from_keys() {
        let keys = Keys::new(b"");
        assert_eq!(
            keys.member_user(&keys.member("g:1", "bob")).as_deref(),
            Some("bob")
        );
        assert_eq!(
            keys.user_conversation_id(&keys.user_conversation("bob", "d:x"))
                .as_deref(),
            Some("d:x")
        );
        assert_eq!(
            keys.cursor_conversation(&keys.cursor("bob", "p", "d:x"))
                .as_deref(),
            Some("d:x")
        );
    }
}
