//! The route registry of a cluster: which gateway node each connected device is on, so that
//! fanout, typing, receipts and device unlinks reach it from any node.
//!
//! A route is written by the gateway when a device connects, **before** the connection's
//! catch-up reads the store, and cleared when the device's last connection on that gateway
//! ends (a clearing that fails is tried again by the gateway every lease round:
//! `courier_gateway::ClusterRoutes`). An event committed after the route was written is delivered to it live; one committed
//! before is read by the catch-up: a device never falls between the two.
//!
//! Each route holds the id of the connection that wrote it. The gateway clears it when the
//! device's last connection there ends, unless a connection still open there wrote it
//! ([`MessageStore::remove_route_unless`]): a newer connection of the same device on the same
//! gateway keeps its route when an older one closes, and an older one open keeps it when a
//! newer one closes.
//!
//! Routes to a gateway whose node lease lapsed are ignored by their readers and swept by any
//! gateway ([`MessageStore::clear_gateway_routes`]): each route is also listed under its
//! gateway (`groute`, with the time it was written) for that sweep. A gateway whose lease
//! lapsed while it was alive (paused, cut off) closes its connections when it notices, so its
//! devices reconnect, write new routes and catch up; a sweep clears only the routes written
//! before the lapse it saw, so it never takes a route written after the gateway came back. A
//! gateway that starts again under the same node id sweeps its own routes first.
//!
//! A route key that does not decode (damage) is passed over by the readers, logged at error:
//! its device misses live deliveries there until it reconnects, and no delivery batch fails
//! for it.

use crate::kv::{Batch, KeyValue, StoreError, decode_u64};
use crate::message_store::{MessageStore, corrupt};

/// Routes cleared per commit of a sweep.
const SWEEP_PAGE: usize = 1000;

/// One device of a user connected to one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub device: String,
    /// The gateway's node id.
    pub gateway: String,
}

impl MessageStore {
    /// Records that `user`'s `device` is connected to `gateway` by connection `connection`,
    /// at `now_ms` by the gateway's clock.
    pub async fn add_route(
        &self,
        user: &str,
        device: &str,
        gateway: &str,
        connection: u64,
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::new();
        batch
            .set(
                self.keys().route(user, device, gateway),
                connection.to_le_bytes().to_vec(),
            )
            .set(
                self.keys().gateway_route(gateway, user, device),
                now_ms.to_le_bytes().to_vec(),
            );
        self.kv().commit(batch).await.map(drop)
    }

    /// Clears the route of `user`'s `device` to `gateway` if connection `connection` wrote it
    /// (a newer connection's route is kept). Returns whether it was cleared.
    pub async fn remove_route(
        &self,
        user: &str,
        device: &str,
        gateway: &str,
        connection: u64,
    ) -> Result<bool, StoreError> {
        self.remove_route_unless(user, device, gateway, |wrote| wrote != connection)
            .await
    }

    /// Clears the route of `user`'s `device` to `gateway` unless the connection that wrote it
    /// is one to `keep` (still open there). Returns whether it was cleared.
    pub async fn remove_route_unless(
        &self,
        user: &str,
        device: &str,
        gateway: &str,
        keep: impl Fn(u64) -> bool,
    ) -> Result<bool, StoreError> {
        let key = self.keys().route(user, device, gateway);
        let value = self.kv().get(&key).await?;
        if value.as_deref().map(decode_u64).is_none_or(keep) {
            return Ok(false);
        }
        let mut batch = Batch::new();
        batch
            .fence(key.clone(), value)
            .clear(key)
            .clear(self.keys().gateway_route(gateway, user, device));
        match self.kv().commit(batch).await {
            Ok(_) => Ok(true),
            // A newer connection of the device wrote its route meanwhile.
            Err(StoreError::FenceChanged { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every route of `user`, live gateway or not.
    pub async fn routes(&self, user: &str) -> Result<Vec<Route>, StoreError> {
        let rows = self
            .kv()
            .range(self.keys().routes(user), usize::MAX, false)
            .await?;
        self.decode_routes(rows)
    }

    /// Every route of each of `users`, in their order, with one read of the store.
    pub async fn routes_of(&self, users: &[&str]) -> Result<Vec<Vec<Route>>, StoreError> {
        let ranges = users.iter().map(|user| self.keys().routes(user)).collect();
        let answers = self.kv().ranges(ranges, usize::MAX).await?;
        answers
            .into_iter()
            .map(|rows| self.decode_routes(rows))
            .collect()
    }

    /// The routes of `rows`, a key that does not decode (damage, or a layout of another
    /// version) passed over and logged at error: it names no device and gateway to deliver
    /// to, and failing the read for it failed every delivery batch with its user among the
    /// recipients, for good (the batch's shard delivered nothing more).
    fn decode_routes(&self, rows: Vec<KeyValue>) -> Result<Vec<Route>, StoreError> {
        Ok(rows
            .into_iter()
            .filter_map(|(key, _)| match self.keys().route_parts(&key) {
                Some((device, gateway)) => Some(Route { device, gateway }),
                None => {
                    tracing::error!(
                        error = %corrupt(&key, "not a route key"),
                        "a route that does not decode is passed over"
                    );
                    None
                }
            })
            .collect())
    }

    /// Clears the routes to `gateway` written before `written_before_ms` by its clock (all of
    /// them for a gateway starting again; those older than its lapsed lease for a sweep), a
    /// page per commit. Returns how many were cleared.
    pub async fn clear_gateway_routes(
        &self,
        gateway: &str,
        written_before_ms: u64,
    ) -> Result<usize, StoreError> {
        let mut cleared = 0;
        let mut range = self.keys().gateway_routes(gateway);
        loop {
            let rows = self.kv().range(range.clone(), SWEEP_PAGE, false).await?;
            let Some((last, _)) = rows.last() else {
                return Ok(cleared);
            };
            range.start = [last.as_slice(), &[0]].concat();
            let mut batch = Batch::new();
            for (key, written) in &rows {
                if decode_u64(written) >= written_before_ms {
                    continue;
                }
                let (user, device) = self
                    .keys()
                    .gateway_route_parts(key)
                    .ok_or_else(|| corrupt(key, "not a gateway route key"))?;
                // Fenced: a route written again meanwhile (the device reconnected) stays.
                batch
                    .fence(key.clone(), Some(written.clone()))
                    .clear(key.clone())
                    .clear(self.keys().route(&user, &device, gateway));
                cleared += 1;
            }
            if !batch.is_empty() {
                self.kv().commit(batch).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_store;

    fn route(device: &str, gateway: &str) -> Route {
        Route {
            device: device.into(),
            gateway: gateway.into(),
        }
    }

    #[tokio::test]
    async fn a_user_has_one_route_per_device_and_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        store.add_route("bob", "phone", "g1", 1, 10).await.unwrap();
        store.add_route("bob", "laptop", "g2", 2, 10).await.unwrap();
        store
            .add_route("bobby", "phone", "g1", 3, 10)
            .await
            .unwrap();
        assert_eq!(
            store.routes("bob").await.unwrap(),
            [route("laptop", "g2"), route("phone", "g1")],
            "another user whose id starts alike is not listed"
        );
        assert!(store.routes("carol").await.unwrap().is_empty());
    }

    /// A route key that does not decode (damage, or a layout of another version) is passed
    /// over, logged: the user's other routes are read. It failed the read of every route of
    /// the user: each delivery batch of fanout with the user among its recipients failed, for
    /// good, so the batch's shard delivered nothing more and, past `--outbox-lag-limit`,
    /// refused every send to any of its conversations.
    #[tokio::test]
    async fn a_route_key_that_does_not_decode_is_passed_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        store.add_route("bob", "phone", "g1", 1, 10).await.unwrap();
        store.add_route("bob", "laptop", "g2", 2, 10).await.unwrap();
        let mut damaged = store.keys().route("bob", "phone", "g1");
        damaged.push(0x99);
        let mut batch = Batch::new();
        batch.set(damaged, 3u64.to_le_bytes().to_vec());
        store.kv().commit(batch).await.unwrap();

        let bobs = [route("laptop", "g2"), route("phone", "g1")];
        assert_eq!(store.routes("bob").await.unwrap(), bobs);
        store.add_route("carol", "tab", "g1", 4, 10).await.unwrap();
        assert_eq!(
            store.routes_of(&["bob", "carol"]).await.unwrap(),
            [bobs.to_vec(), vec![route("tab", "g1")]]
        );
    }

    #[tokio::test]
    async fn an_older_connection_closing_keeps_the_newer_connections_route() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        store.add_route("bob", "phone", "g1", 1, 10).await.unwrap();
        store.add_route("bob", "phone", "g1", 2, 10).await.unwrap();
        assert!(!store.remove_route("bob", "phone", "g1", 1).await.unwrap());
        assert_eq!(store.routes("bob").await.unwrap(), [route("phone", "g1")]);
        assert!(store.remove_route("bob", "phone", "g1", 2).await.unwrap());
        assert!(store.routes("bob").await.unwrap().is_empty());
        assert_eq!(store.clear_gateway_routes("g1", u64::MAX).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_sweep_clears_a_gateways_routes_written_before_its_lapse_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = temp_store(&dir, 4).await;
        for i in 0..2500u64 {
            store
                .add_route(&format!("u{i}"), "phone", "g", i, 100)
                .await
                .unwrap();
        }
        store
            .add_route("u1", "laptop", "other", 9, 100)
            .await
            .unwrap();
        // The gateway came back after its lease lapsed at 500: u7 reconnected at 600.
        store
            .add_route("u7", "phone", "g", 7000, 600)
            .await
            .unwrap();
        assert_eq!(store.clear_gateway_routes("g", 500).await.unwrap(), 2499);
        assert_eq!(
            store.routes("u1").await.unwrap(),
            [route("laptop", "other")]
        );
        assert!(store.routes("u2000").await.unwrap().is_empty());
        assert_eq!(store.routes("u7").await.unwrap(), [route("phone", "g")]);
        assert_eq!(store.clear_gateway_routes("g", u64::MAX).await.unwrap(), 1);
        assert!(store.routes("u7").await.unwrap().is_empty());
    }
}
