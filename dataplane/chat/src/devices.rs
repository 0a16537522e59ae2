//! Devices of a user: admission of their tokens, last seen, push registration, unlinking
//! (tokens issued before are refused, cursors dropped, open connections closed), activity for
//! retention.
//!
//! Invariants: a device is linked until unlinked, and linked again when it signs in with a
//! token issued after its last unlink, with no cursor of its old link (it catches up from the
//! beginning of retained history, as a new device does); every change of a device record is
//! a read-modify-write fenced on the value read (`MessageStore::update_device`), so concurrent changes (a
//! reconnect's last-seen, an unlink, a push registration) never undo one another. A connection
//! records its device before its catch-up ends, so a device that has had `sync_done` is listed;
//! any authenticated request records a device not seen before ([`Devices::admit`]).
//!
//! A user has at most `--max-devices-per-user` linked devices: a token that would link one
//! more (a device not seen before, or one unlinked signing in again) is refused `forbidden`,
//! at its WebSocket upgrade and at any HTTP request, with a message naming the device seen
//! least recently to unlink (`DELETE /v1/devices/{device}`); another device is never
//! unlinked in its place, and a device already linked is never refused by the limit. Each
//! device is read by retention and the push notifier, listed, and holds a cursor per
//! conversation, so a token issuer that lets device ids vary would otherwise make them pile
//! up for good. The count is race-safe ([`MessageStore::record_device_link`]).

use courier_core::auth::{AuthError, Identity};
use courier_core::clock::now_ms;
use courier_core::error::ApiError;
use courier_core::gateways::Gateways;
use courier_store::{DeviceRecord, MessageStore, StoreError, TooManyDevices};

pub use courier_core::chat::DeviceView;

/// Whether a device's token is still honoured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Linked,
    /// The device was unlinked after the token was issued.
    Unlinked,
    /// The device is not linked, and its user has the most linked devices allowed.
    TooManyDevices(TooManyDevices),
}

/// The push providers a device may register with (`PUT /v1/devices/me/push`).
pub const PUSH_PROVIDERS: [&str; 3] = ["fcm", "apns", "webhook"];

pub struct Devices {
    store: MessageStore,
    /// Most linked devices of a user (0: no limit), for the calls that may link one.
    max_devices: u64,
}

/// How far behind a device's recorded last activity may be (`last_seen_ms` is to the minute).
pub const SEEN_RESOLUTION_MS: u64 = 60_000;

impl Devices {
    /// Devices of `store`, linking any number of them: for the calls that link none (list,
    /// unlink, push), else see [`Devices::with_max_devices`].
    pub fn new(store: MessageStore) -> Self {
        Self {
            store,
            max_devices: 0,
        }
    }

    /// Links at most `max` devices of a user (`--max-devices-per-user`; 0: no limit).
    pub fn with_max_devices(self, max: u64) -> Self {
        Self {
            max_devices: max,
            ..self
        }
    }

    /// Admits a verified token: refuses it if issued (at or) before the device's last unlink;
    /// remembers it if it is the device's newest, which links an unlinked device again (not
    /// seen since: `last_seen_ms` 0 until it connects). A device not seen before is recorded
    /// (not yet active: `last_seen_ms` 0, so that it holds no events back from retention), so
    /// that a device which only calls the HTTP API is
    /// listed and can be unlinked like any other. What it writes needs no fsync of its own
    /// ([`MessageStore::record_device_activity`]): a write lost to a power loss is made again
    /// by the next request with the same token, and an unlink, synced, is never lost with it.
    /// A token that would link a device past the user's limit is refused `forbidden`.
    pub async fn admit(&self, who: &Identity) -> Result<(), ApiError> {
        let issued = who.issued_at_ms;
        let lead = issuer_lead(issued, now_ms());
        let newer = |record: Option<&DeviceRecord>| match record {
            None => Some(DeviceRecord {
                token_issued_ms: issued,
                issuer_lead_ms: lead,
                ..DeviceRecord::default()
            }),
            // Linked again: not seen since, as a device first seen here (the old link's
            // activity would count it active for retention, from an empty cursor).
            Some(r) if r.accepts(issued) && !r.is_linked() => Some(DeviceRecord {
                token_issued_ms: issued,
                last_seen_ms: 0,
                issuer_lead_ms: r.issuer_lead_ms.max(lead),
                ..r.clone()
            }),
            Some(r) if r.accepts(issued) && issued > r.token_issued_ms => Some(DeviceRecord {
                token_issued_ms: issued,
                issuer_lead_ms: r.issuer_lead_ms.max(lead),
                ..r.clone()
            }),
            Some(_) => None,
        };
        let record = self
            .store
            .record_device_link(&who.user, &who.device, newer, self.max_devices)
            .await?
            .map_err(|refused| too_many_devices(who, &refused))?;
        match link(record.as_ref(), issued) {
            Link::Linked => Ok(()),
            Link::Unlinked => Err(AuthError::Unlinked.into()),
            Link::TooManyDevices(refused) => Err(too_many_devices(who, &refused)),
        }
    }

    /// Checks a verified token without writing: refuses it if issued (at or) before the
    /// device's last unlink. For a WebSocket upgrade, whose connection then records the device
    /// ([`Devices::seen`]) before its catch-up: admitted as an API request is, a new device
    /// would be written twice. A token that would link a device past the user's limit is
    /// refused `forbidden` (the connection's record counts again, race-safe).
    pub async fn check(&self, who: &Identity) -> Result<(), ApiError> {
        let record = self.store.device(&who.user, &who.device).await?;
        match link(record.as_ref(), who.issued_at_ms) {
            Link::Linked => {}
            Link::Unlinked => return Err(AuthError::Unlinked.into()),
            Link::TooManyDevices(refused) => return Err(too_many_devices(who, &refused)),
        }
        if !record.as_ref().is_some_and(DeviceRecord::is_linked)
            && let Some(refused) = self
                .store
                .device_limit_reached(&who.user, &who.device, self.max_devices)
                .await?
        {
            return Err(too_many_devices(who, &refused));
        }
        Ok(())
    }

    /// Records that the device is active now (creating its record on its first connection),
    /// unless the device was unlinked after `who`'s token was issued. A device recorded active
    /// less than [`SEEN_RESOLUTION_MS`] ago with this token is only read: a reconnect storm
    /// reads device records instead of committing one per device. The record is committed
    /// without an fsync of its own ([`MessageStore::record_device_activity`]): a power loss
    /// that takes it back is made good by the device's next connection, and an unlink, synced,
    /// is never lost with it. A device it would link past the user's limit is not recorded:
    /// [`Link::TooManyDevices`].
    pub async fn seen(&self, who: &Identity) -> Result<Link, StoreError> {
        let (issued, now) = (who.issued_at_ms, now_ms());
        let lead = issuer_lead(issued, now);
        let seen = |record: Option<&DeviceRecord>| match record {
            Some(r) if !r.accepts(issued) => None,
            Some(r)
                if r.token_issued_ms >= issued
                    && now < r.last_seen_ms.saturating_add(SEEN_RESOLUTION_MS) =>
            {
                None
            }
            Some(r) => Some(DeviceRecord {
                last_seen_ms: r.last_seen_ms.max(now),
                token_issued_ms: r.token_issued_ms.max(issued),
                issuer_lead_ms: r.issuer_lead_ms.max(lead),
                ..r.clone()
            }),
            None => Some(DeviceRecord {
                last_seen_ms: now,
                token_issued_ms: issued,
                issuer_lead_ms: lead,
                ..DeviceRecord::default()
            }),
        };
        let record = self
            .store
            .record_device_link(&who.user, &who.device, seen, self.max_devices)
            .await?;
        Ok(match record {
            Ok(record) => link(record.as_ref(), issued),
            Err(refused) => Link::TooManyDevices(refused),
        })
    }

    /// Records that a device with a connection open is still active: its `last_seen_ms` moves
    /// to now when it is [`SEEN_RESOLUTION_MS`] old or older. An unlinked device, whose
    /// connections close, and a device with no record, which its connection records, are left
    /// as they are. Committed without an fsync of its own, as [`Devices::seen`] is. Returns
    /// the record read, which says which tokens its connections may still hold
    /// ([`DeviceRecord::accepts`]).
    pub async fn still_connected(
        &self,
        user: &str,
        device: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let now = now_ms();
        let refreshed = |record: Option<&DeviceRecord>| match record {
            Some(r)
                if r.is_linked() && now >= r.last_seen_ms.saturating_add(SEEN_RESOLUTION_MS) =>
            {
                Some(DeviceRecord {
                    last_seen_ms: now,
                    ..r.clone()
                })
            }
            _ => None,
        };
        self.store
            .record_device_activity(user, device, refreshed)
            .await
    }

    /// The user's linked devices.
    pub async fn list(&self, user: &str) -> Result<Vec<DeviceView>, ApiError> {
        Ok(self
            .store
            .devices(user)
            .await?
            .into_iter()
            .filter(|(_, record)| record.is_linked())
            .map(|(device, record)| DeviceView {
                device,
                last_seen_ms: record.last_seen_ms,
                push: !record.push_token.is_empty(),
            })
            .collect())
    }

    /// Registers (or replaces) the device's push endpoint.
    pub async fn register_push(
        &self,
        who: &Identity,
        provider: &str,
        token: &str,
        configured: bool,
    ) -> Result<(), ApiError> {
        if !PUSH_PROVIDERS.contains(&provider) {
            return Err(ApiError::bad_request(
                "provider must be \"fcm\", \"apns\" or \"webhook\"",
            ));
        }
        if !configured {
            return Err(ApiError::bad_request(format!(
                "this server has no {provider} push provider configured"
            )));
        }
        courier_proto::ids::push_token(provider, token)?;
        let issued = who.issued_at_ms;
        let register = |record: Option<&DeviceRecord>| {
            let record = match record {
                Some(r) if !r.accepts(issued) => return None,
                Some(r) => r.clone(),
                None => DeviceRecord {
                    token_issued_ms: issued,
                    ..DeviceRecord::default()
                },
            };
            Some(DeviceRecord {
                push_provider: provider.to_owned(),
                push_token: token.to_owned(),
                ..record
            })
        };
        let record = self
            .store
            .register_push_token(&who.user, &who.device, register)
            .await?;
        match link(record.as_ref(), issued) {
            Link::Linked => Ok(()),
            Link::Unlinked => Err(AuthError::Unlinked.into()),
            Link::TooManyDevices(refused) => Err(too_many_devices(who, &refused)),
        }
    }

    /// Drops the device's push registration if it is still `token` (the one a provider
    /// refused), not one registered since. Whether it was `token` (false: the device has
    /// another registration, or none).
    pub async fn drop_push(
        &self,
        user: &str,
        device: &str,
        token: &str,
    ) -> Result<bool, StoreError> {
        let drop_token = |record: Option<&DeviceRecord>| {
            let record = record.filter(|r| r.push_token == token)?;
            Some(DeviceRecord {
                push_provider: String::new(),
                push_token: String::new(),
                ..record.clone()
            })
        };
        let record = self.store.update_device(user, device, drop_token).await?;
        Ok(record.is_some_and(|r| r.push_token == token))
    }

    /// Unlinks one of the user's devices and closes its connections.
    pub async fn unlink(
        &self,
        user: &str,
        device: &str,
        gateways: &dyn Gateways,
    ) -> Result<(), ApiError> {
        courier_proto::ids::device_id(device)?;
        if !self.store.unlink_device(user, device, now_ms()).await? {
            return Err(ApiError::not_found(format!("no linked device {device}")));
        }
        gateways.unlinked(user, device);
        Ok(())
    }
}

/// The refusal of `who`'s token, which would link one device more than its user may have.
pub fn too_many_devices(who: &Identity, refused: &TooManyDevices) -> ApiError {
    ApiError::forbidden(format!(
        "{} has {} linked devices, the most allowed: unlink one (DELETE /v1/devices/{{device}}; \
         seen least recently: {}) to link device {}",
        who.user, refused.max, refused.least_recent, who.device
    ))
}

/// How far ahead of this server's clock, `now`, a token issued at `issued` is dated
/// ([`DeviceRecord::issuer_lead_ms`]): at most the clock skew a token is allowed.
fn issuer_lead(issued: u64, now: u64) -> u64 {
    issued
        .saturating_sub(now)
        .min(courier_core::auth::CLOCK_SKEW_SECS as u64 * 1000)
}

/// Whether a token issued at `issued` is honoured by the device's `record` (none: a device not
/// seen yet, whose tokens are all honoured).
fn link(record: Option<&DeviceRecord>, issued: u64) -> Link {
    match record {
        Some(record) if !record.accepts(issued) => Link::Unlinked,
        _ => Link::Linked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_store::faulty_engine::FaultyEngine;
    use courier_store::kv::Durability;
    use std::sync::{Arc, Mutex};

    fn phone(issued_at_ms: u64) -> Identity {
        Identity {
            user: "alice".into(),
            device: "phone".into(),
            issued_at_ms,
        }
    }

    /// A store whose next commit is preceded by an unlink of alice's phone (made through the
    /// same store, as another node would).
    async fn unlink_races_next_commit() -> MessageStore {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let linked = Devices::new(store.clone()).seen(&phone(1_000)).await;
        assert_eq!(linked.unwrap(), Link::Linked);
        let unlinker = store.clone();
        engine.before_next_commit(Box::pin(async move {
            let unlinked = unlinker.unlink_device("alice", "phone", now_ms()).await;
            assert!(unlinked.unwrap(), "the phone was linked");
        }));
        store
    }

    #[tokio::test]
    async fn a_devices_activity_is_committed_deferred_and_its_unlink_synced() {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let committed = Arc::new(Mutex::new(Vec::new()));
        let seen = committed.clone();
        engine.set_fault(Some(Box::new(move |batch| {
            seen.lock().unwrap().push(batch.durability);
            None
        })));
        let devices = Devices::new(store.clone());
        assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
        assert!(
            store
                .unlink_device("alice", "phone", now_ms())
                .await
                .unwrap()
        );
        assert_eq!(
            *committed.lock().unwrap(),
            [Durability::Deferred, Durability::Synced],
            "the first record, then the unlink"
        );
    }

    #[tokio::test]
    async fn a_reconnect_does_not_undo_a_concurrent_unlink() {
        let store = unlink_races_next_commit().await;
        // A newer token: the reconnect writes its record.
        let seen = Devices::new(store.clone())
            .seen(&phone(2_000))
            .await
            .unwrap();
        assert_eq!(seen, Link::Unlinked, "the connection learns of the unlink");
        let record = store.device("alice", "phone").await.unwrap().unwrap();
        assert!(!record.is_linked(), "still unlinked: {record:?}");
        assert!(!record.accepts(2_000));
    }

    #[tokio::test]
    async fn a_device_seen_a_moment_ago_is_read_not_written_and_an_unlink_still_counts() {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let devices = Devices::new(store.clone());
        assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
        let first = store.device("alice", "phone").await.unwrap().unwrap();
        // Another connection of the same token a moment later: no commit at all (every
        // commit fails meanwhile).
        engine.set_fault(Some(Box::new(|_| {
            Some(StoreError::Engine("no commit expected".into()))
        })));
        assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
        engine.set_fault(None);
        let again = store.device("alice", "phone").await.unwrap().unwrap();
        assert_eq!(
            again, first,
            "the record is as the first connection left it"
        );
        // A newer token is recorded at once.
        assert_eq!(devices.seen(&phone(3_000)).await.unwrap(), Link::Linked);
        let newer = store.device("alice", "phone").await.unwrap().unwrap();
        assert_eq!(newer.token_issued_ms, 3_000);
        // Activity older than the resolution is recorded again.
        let stale = now_ms() - SEEN_RESOLUTION_MS - 1;
        let aged = |r: Option<&DeviceRecord>| {
            r.map(|r| DeviceRecord {
                last_seen_ms: stale,
                ..r.clone()
            })
        };
        store.update_device("alice", "phone", aged).await.unwrap();
        devices.seen(&phone(3_000)).await.unwrap();
        let seen = store.device("alice", "phone").await.unwrap().unwrap();
        assert!(seen.last_seen_ms > stale, "{seen:?}");
        // An unlink is seen by the read alone.
        assert!(
            store
                .unlink_device("alice", "phone", now_ms())
                .await
                .unwrap()
        );
        assert_eq!(devices.seen(&phone(3_000)).await.unwrap(), Link::Unlinked);
    }

    /// An issuer whose clock runs ahead of the server's dates a token it signs just before an
    /// unlink after it. One the device had not used yet (so not the newest it used, which the
    /// unlink refuses) was taken after the unlink; the unlink now refuses tokens dated up to
    /// as far after it as the device's tokens ran ahead. A token signed after the unlink
    /// links the device again.
    #[tokio::test]
    async fn a_token_an_issuer_ahead_signed_before_an_unlink_is_refused_after_it() {
        const AHEAD: u64 = 30_000;
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let devices = Devices::new(store.clone());
        let signed_at = now_ms();
        devices.admit(&phone(signed_at + AHEAD)).await.unwrap();
        // Signed 5 s after the token in use, not used before the unlink 10 s after it.
        let unused = phone(signed_at + 5_000 + AHEAD);
        let unlinked_at = signed_at + 10_000;
        assert!(
            store
                .unlink_device("alice", "phone", unlinked_at)
                .await
                .unwrap()
        );
        let refused = devices.admit(&unused).await.unwrap_err();
        assert_eq!(refused.code, courier_proto::ErrorCode::Unauthorized);
        assert_eq!(devices.seen(&unused).await.unwrap(), Link::Unlinked);

        let signed_after = phone(unlinked_at + 5_000 + AHEAD);
        devices.admit(&signed_after).await.unwrap();
        assert_eq!(devices.seen(&signed_after).await.unwrap(), Link::Linked);
    }

    /// An ack committed while the device is being unlinked (its connection not closed yet,
    /// or on a gateway the unlink has not reached) leaves a cursor the unlink did not read:
    /// the device linked again must start from the beginning of retained history all the
    /// same, over a WebSocket or the HTTP API, not skip what the old link acknowledged.
    #[tokio::test]
    async fn a_device_linked_again_starts_with_no_cursor_an_ack_racing_its_unlink_left() {
        for http in [false, true] {
            let engine = FaultyEngine::new();
            let store = engine.store(8).await;
            let devices = Devices::new(store.clone());
            assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
            let ack = |conv: &'static str| {
                let store = store.clone();
                async move {
                    let kind = courier_store::ReceiptKind::Delivered;
                    store.acknowledge("alice", "phone", conv, 5, kind).await
                }
            };
            ack("d:1").await.unwrap();
            let racing = ack("d:2");
            engine.before_next_commit(Box::pin(async move { racing.await.unwrap() }));
            let unlinked_at = now_ms();
            assert!(
                store
                    .unlink_device("alice", "phone", unlinked_at)
                    .await
                    .unwrap()
            );
            let again = phone(unlinked_at + 1);
            if http {
                devices.admit(&again).await.unwrap();
            } else {
                assert_eq!(devices.seen(&again).await.unwrap(), Link::Linked);
            }
            let left = store.device_cursors("alice", "phone").await.unwrap();
            assert!(
                left.is_empty(),
                "http {http}: cursors of the old link: {left:?}"
            );
        }
    }

    /// A device linked again through the HTTP API alone is new to retention and to its user's
    /// list, as a device first seen there is: `last_seen_ms` 0, not the old link's activity,
    /// which counted it active (holding back every conversation of its user from an empty
    /// cursor, for up to `--device-inactive-after` from the old link's last connection).
    #[tokio::test]
    async fn a_device_linked_again_through_the_http_api_is_not_seen_yet() {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let devices = Devices::new(store.clone());
        assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
        let unlinked_at = now_ms();
        assert!(
            store
                .unlink_device("alice", "phone", unlinked_at)
                .await
                .unwrap()
        );
        devices.admit(&phone(unlinked_at + 1)).await.unwrap();
        let listed = devices.list("alice").await.unwrap();
        assert_eq!(listed.len(), 1, "linked again: {listed:?}");
        assert_eq!(
            listed[0].last_seen_ms, 0,
            "not seen since it was linked again"
        );
    }

    /// Alice's device `device`, with a token issued at 1,000.
    fn device(device: &str) -> Identity {
        Identity {
            device: device.into(),
            ..phone(1_000)
        }
    }

    /// At `--max-devices-per-user`, a new device is refused by the upgrade's check, an HTTP
    /// request and a connection alike, and of two new devices racing for the last place
    /// (the upgrade's check passed for both) the connection that commits second is refused.
    #[tokio::test]
    async fn of_two_new_devices_racing_for_the_last_place_one_is_refused() {
        let engine = FaultyEngine::new();
        let store = engine.store(8).await;
        let devices = Devices::new(store.clone()).with_max_devices(2);
        assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
        devices.check(&device("laptop")).await.unwrap();
        devices.check(&device("tablet")).await.unwrap();
        let racing = Devices::new(store.clone()).with_max_devices(2);
        engine.before_next_commit(Box::pin(async move {
            racing.admit(&device("laptop")).await.unwrap();
        }));
        let Link::TooManyDevices(refused) = devices.seen(&device("tablet")).await.unwrap() else {
            panic!("the tablet took a place past the limit");
        };
        assert_eq!((refused.max, refused.least_recent.as_str()), (2, "laptop"));
        let listed: Vec<_> = devices.list("alice").await.unwrap();
        let listed: Vec<_> = listed.iter().map(|d| d.device.as_str()).collect();
        assert_eq!(listed, ["laptop", "phone"]);
        for refused in [
            devices.check(&device("tablet")).await,
            devices.admit(&device("tablet")).await,
        ] {
            let refused = refused.unwrap_err();
            assert_eq!(refused.code, courier_proto::ErrorCode::Forbidden);
        }
        // Linked devices are not refused; an unlink makes room.
        devices.admit(&device("laptop")).await.unwrap();
        assert_eq!(devices.seen(&phone(1_000)).await.unwrap(), Link::Linked);
        assert!(
            store
                .unlink_device("alice", "laptop", now_ms())
                .await
                .unwrap()
        );
        assert_eq!(devices.seen(&device("tablet")).await.unwrap(), Link::Linked);
    }

    /// A token its provider can never take is refused at registration, with what a token must
    /// be: accepted, it was answered 204 and listed as `push: true`, and the first
    /// notification removed it without a word (an APNs token as old iOS printed it, with
    /// angle brackets and spaces, say), so the app's developer never learned why no
    /// notification came. Control characters are refused whatever the provider.
    #[tokio::test]
    async fn a_push_token_its_provider_cannot_take_is_refused_at_registration() {
        let store = FaultyEngine::new().store(8).await;
        let devices = Devices::new(store.clone());
        let apns = "a1b2".repeat(16);
        for (provider, token) in [
            ("apns", format!("<{} {}>", &apns[..32], &apns[32..])),
            ("apns", "a/b".to_owned()),
            ("apns", "f".repeat(201)),
            ("fcm", "tok\nen".to_owned()),
            ("webhook", "tok\u{0}".to_owned()),
            ("webhook", String::new()),
            ("webhook", "t".repeat(4097)),
        ] {
            let refused = devices
                .register_push(&phone(1_000), provider, &token, true)
                .await
                .expect_err(&format!("{provider} {token:?}"));
            assert_eq!(refused.code, courier_proto::ErrorCode::BadRequest);
            assert!(refused.message.contains("token"), "{}", refused.message);
            let record = store.device("alice", "phone").await.unwrap();
            assert!(
                record.is_none_or(|r| r.push_token.is_empty()),
                "{provider} {token:?} registered"
            );
        }
        for (provider, token) in [
            ("apns", apns.as_str()),
            ("fcm", "dAbC-12_x:APA91bHun4MxP5egoKMwt2KZFBaFUH"),
            ("webhook", "https://relay.example/p?id=1&k=a b"),
        ] {
            devices
                .register_push(&phone(1_000), provider, token, true)
                .await
                .unwrap();
            let record = store.device("alice", "phone").await.unwrap().unwrap();
            assert_eq!(record.push_token, token);
        }
    }

    #[tokio::test]
    async fn a_push_registration_does_not_undo_a_concurrent_unlink() {
        let store = unlink_races_next_commit().await;
        let registered = Devices::new(store.clone())
            .register_push(&phone(1_000), "webhook", "tok", true)
            .await;
        assert!(
            registered.is_err(),
            "the unlinked device's token is refused"
        );
        let record = store.device("alice", "phone").await.unwrap().unwrap();
        assert!(!record.is_linked(), "still unlinked: {record:?}");
        assert!(
            record.push_token.is_empty(),
            "no push for an unlinked device"
        );
    }
}
