//! The controllers, one module each, in the controller-rs style: `reconcile(object, context)`
//! returns when to look again, `error_policy` decides what a failure costs, and everything they
//! write goes through server-side apply under one field manager. A reconciliation that fails
//! says so in the object's status before it is retried (`reported`): `Ready` false, with
//! the error's reason and message.
//!
//! - [`cluster`]: `CourierCluster` → an embedded `courier serve` StatefulSet, or the pools;
//! - [`gateway_pool`]: `GatewayPool` → Deployment, Service, PDB, and the autoscaler;
//! - [`shard_set`]: `SequencerShardSet` → StatefulSet, headless Service, PDB, the rebalancer
//!   (with a finalizer that releases the shards when the set is deleted), and in mode
//!   `Proposal` the `ShardRebalance` that holds the plan until it is approved.
//!
//! [`run`] starts the three, watching their resources in a [`WatchScope`]: every namespace,
//! or one.

pub mod cluster;
pub mod gateway_pool;
pub mod shard_set;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::core::object::HasStatus;
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::autoscale::GatewayAutoscaler;
use crate::crd::{
    ConditionType, Conditions, CourierCluster, GatewayPool, ObservedStatus, Salvaged, SecretKeyRef,
    SequencerShardSet, ShardRebalance,
};
use crate::leader::{Leadership, NotLeader};
use crate::metrics::{ControllerLabel, Metrics, ResourceLabel};
use crate::rebalance::Rebalancer;
use crate::rebalance::executor::{AdminError, ShardAdmin};
use crate::render::{FIELD_MANAGER, RenderError, pod};
use crate::scope::WatchScope;

/// Runs the three controllers until `shutdown` turns true (or its sender goes), each watching
/// its resource and what it owns in `scope` (every `Api` comes from [`WatchScope::api`]).
/// Shut down, they start no reconciliation and return once those under way have finished.
///
/// The StatefulSets, Deployments and ConfigMaps are watched by the operator's label alone
/// ([`rendered`]): every one it renders carries it, and a namespace's other workloads would
/// cost memory and wake-ups for nothing. The Courier resources are watched whole: each is
/// Courier's, and a pool or plan made by hand carries no label. The user's own ConfigMaps,
/// which a cluster names as its pods' configuration file (`spec.configMap`), carry no label
/// either: the cluster controller watches the metadata of every ConfigMap (no data, nothing
/// kept) and wakes the clusters that name one that changed ([`clusters_naming`]), so that an
/// edit in place is rolled out and a ConfigMap created late is picked up. The pool and shard
/// set controllers read the file at each reconciliation (every sample, 15 s by default).
///
/// The cluster and pool controllers wait for [`DEBOUNCE`] of quiet before they reconcile an
/// object; the shard set controller does not (see there).
pub async fn run(
    client: Client,
    ctx: Arc<Context>,
    scope: &WatchScope,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let config = watcher::Config::default().any_semantic();
    let rendered = rendered(config.clone());
    let clusters = Controller::new(scope.api::<CourierCluster>(client.clone()), config.clone());
    let known = clusters.store();
    let clusters = clusters
        // Metadata only: a change of content changes the resource version.
        .watches(
            scope.api::<PartialObjectMeta<ConfigMap>>(client.clone()),
            config.clone(),
            move |config_map| clusters_naming(&known, &config_map),
        )
        .owns(scope.api::<StatefulSet>(client.clone()), rendered.clone())
        .owns(scope.api::<Deployment>(client.clone()), rendered.clone())
        .owns(scope.api::<ConfigMap>(client.clone()), rendered.clone())
        .owns(scope.api::<GatewayPool>(client.clone()), config.clone())
        .owns(
            scope.api::<SequencerShardSet>(client.clone()),
            config.clone(),
        )
        .with_config(controller::Config::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(stopped(shutdown.clone()))
        .run(cluster::reconcile, cluster::error_policy, ctx.clone())
        .for_each(|outcome| {
            // Nothing else is kept of a cluster.
            ctx.forget_if_gone(&outcome, |_, _| {});
            async {}
        });
    let pools = Controller::new(scope.api::<GatewayPool>(client.clone()), config.clone())
        .owns(scope.api::<Deployment>(client.clone()), rendered.clone())
        .with_config(controller::Config::default().debounce(DEBOUNCE))
        .graceful_shutdown_on(stopped(shutdown.clone()))
        .run(
            gateway_pool::reconcile,
            gateway_pool::error_policy,
            ctx.clone(),
        )
        .for_each(|outcome| {
            ctx.forget_if_gone(&outcome, Context::forget_gateway_pool);
            async {}
        });
    let shard_sets = Controller::new(
        scope.api::<SequencerShardSet>(client.clone()),
        config.clone(),
    )
    .owns(scope.api::<StatefulSet>(client.clone()), rendered)
    // An annotation on a set's plan (approve, refresh) wakes the set up.
    .owns(scope.api::<ShardRebalance>(client), config)
    // No debounce: it would delay every requeue too, and the set samples every second while
    // it evacuates pods (`shard_set::EVACUATION_PACE`). A wake-up between samples writes no
    // status, so its own writes do not feed back.
    .graceful_shutdown_on(stopped(shutdown))
    .run(shard_set::reconcile, shard_set::error_policy, ctx.clone())
    .for_each(|outcome| {
        ctx.forget_if_gone(&outcome, Context::forget_shard_set);
        async {}
    });
    futures::join!(clusters, pools, shard_sets);
}

/// Resolves once `shutdown` turns true or its sender is dropped.
async fn stopped(mut shutdown: tokio::sync::watch::Receiver<bool>) {
    while !*shutdown.borrow_and_update() {
        if shutdown.changed().await.is_err() {
            return;
        }
    }
}

/// How long the cluster and pool controllers wait for an object's triggers to stop before
/// they reconcile it (kube's trailing-edge debounce). Every status write of a cluster's pool
/// and shard set (each sample: every 15 s, every second while a set evacuates pods), every
/// status change of its Deployments during a rollout, and each object a cluster's own
/// reconciliation changes wakes the cluster: without it each of these ran a whole
/// reconciliation (a dozen writes) on its own, where one after the burst sees the same world.
/// A second: shorter than the fastest steady trigger (a set's status, each second plus its
/// sample), so that no stream of triggers holds a reconciliation back for long; every requeue
/// comes that much later too. The statuses the controllers write are the same from one
/// reconciliation of an unchanged world to the next (tested), so a write wakes no one for good.
pub const DEBOUNCE: Duration = Duration::from_secs(1);

/// The clusters (among those `known`) whose pods take their configuration file from
/// `config_map`: those of its namespace whose `spec.configMap` names it.
fn clusters_naming(
    known: &Store<CourierCluster>,
    config_map: &PartialObjectMeta<ConfigMap>,
) -> Vec<ObjectRef<CourierCluster>> {
    let (Some(name), Some(namespace)) = (
        config_map.metadata.name.as_deref(),
        config_map.metadata.namespace.as_deref(),
    ) else {
        return Vec::new();
    };
    known
        .state()
        .iter()
        .filter(|cluster| {
            cluster.metadata.namespace.as_deref() == Some(namespace)
                && cluster.spec.config_map.as_deref() == Some(name)
        })
        .map(|cluster| ObjectRef::from_obj(cluster.as_ref()))
        .collect()
}

/// `config` narrowed to the objects the operator renders: those with its label
/// ([`pod::MANAGED_BY`]).
fn rendered(config: watcher::Config) -> watcher::Config {
    config.labels(&pod::managed_selector())
}

/// A reconciliation that failed; the controller retries it (see [`error_policy`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("Kubernetes API: {}", kube_message(.0))]
    Kube(#[from] kube::Error),
    /// The object cannot be rendered.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The data plane's admin API failed.
    #[error("admin API: {0}")]
    Admin(#[from] AdminError),
    /// A Secret the cluster names is missing or unusable.
    #[error("Secret {name} key {key}: {problem}")]
    Secret {
        /// The Secret.
        name: String,
        /// The key.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The ConfigMap a cluster names as its pods' configuration file (`spec.configMap`) is
    /// missing or has no [`pod::CONFIG_FILE`]: pods rendered from it could not start (their
    /// volume has no source) or would refuse to (no file), so none is rolled out.
    #[error(
        "ConfigMap {name} (the cluster's configMap): {problem}; no pod is rolled out until it is fixed"
    )]
    ConfigMap {
        /// The ConfigMap.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The `CourierCluster` a pool names does not exist.
    #[error("CourierCluster {0} not found in the namespace")]
    ClusterNotFound(String),
    /// This replica no longer leads (or cannot confirm it does): it acts on nothing.
    #[error("not the leader: {0}")]
    NotLeader(#[from] NotLeader),
    /// The finalizer could not be added or removed, or its cleanup failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// The reason (CamelCase) of the `Ready` condition this failure leaves.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "ApiRequestFailed",
            Error::Render(RenderError::Incomplete { .. }) => "IncompleteObject",
            Error::Render(RenderError::Storage(_)) => "InvalidStorage",
            Error::Render(RenderError::NotFoundationDb { .. }) => "NotFoundationDb",
            Error::Render(RenderError::NotTheClustersOwn { .. }) => "NotTheClustersOwn",
            Error::Admin(_) => "AdminUnavailable",
            Error::Secret { .. } => "SecretUnusable",
            Error::ConfigMap { .. } => "ConfigMapUnusable",
            Error::ClusterNotFound(_) => "ClusterNotFound",
            Error::NotLeader(_) => "NotLeader",
            Error::Finalizer(_) => "FinalizerFailed",
        }
    }
}

/// What the API server said when it refused a request (its message and reason, not the whole
/// response); any other failure as kube words it.
fn kube_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

/// How the operator reaches the data plane: the admin API of a cluster's sequencers, and the
/// connection counts of gateway pods. Real ones speak gRPC and HTTP; tests pass fakes.
#[async_trait::async_trait]
pub trait DataPlane: Send + Sync {
    /// The admin API of the sequencer nodes behind `seeds` (`host:port`), with `token`.
    fn shard_admin(
        &self,
        token: courier_rpc::ClusterToken,
        seeds: Vec<String>,
    ) -> Arc<dyn ShardAdmin>;
    /// Client connections on the gateway pod at `pod_ip` (from its `/metrics`).
    async fn gateway_connections(&self, pod_ip: &str) -> Result<u64, String>;
}

/// What every reconciliation may use.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Writes the events (one recorder, so that repeated events become series).
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// The data plane.
    pub data_plane: Arc<dyn DataPlane>,
    /// Whether this replica still leads, confirmed before each action on the data plane.
    pub leadership: Arc<dyn Leadership>,
    /// The rebalancer of each shard set (`namespace/name`), with its trends and cooldowns;
    /// dropped once the set is gone, as each pool's autoscaler is ([`Self::forget_if_gone`]).
    pub rebalancers: Mutex<BTreeMap<String, RebalancerState>>,
    /// The autoscaler of each gateway pool (`namespace/name`).
    pub autoscalers: Mutex<BTreeMap<String, GatewayAutoscaler>>,
    /// The failed reconciliations in a row of each object (`Kind/namespace/name`) that failed
    /// its last one ([`retry_delay`]); an object leaves it once reconciled, or gone.
    pub failures: Mutex<BTreeMap<String, u32>>,
    /// The clock, in milliseconds since the epoch (a fixed one in tests).
    pub clock: fn() -> u64,
}

/// A shard set's rebalancer and when it plans next.
#[derive(Debug, Clone)]
pub struct RebalancerState {
    /// The planner.
    pub rebalancer: Rebalancer,
    /// When the next load-driven plan is due (ms since the epoch).
    pub next_plan_ms: u64,
    /// When the loads were last sampled (ms since the epoch).
    pub last_sample_ms: Option<u64>,
    /// The last sample moved shards off leaving pods: the next one comes after
    /// `shard_set::EVACUATION_PACE`, not the set's sample interval, until none is left.
    pub evacuating: bool,
}

impl Context {
    /// A context over `client` and `data_plane`, acting on the data plane while `leadership`
    /// confirms it leads, on the system clock.
    pub fn new(
        client: Client,
        data_plane: Arc<dyn DataPlane>,
        leadership: Arc<dyn Leadership>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            data_plane,
            leadership,
            rebalancers: Mutex::new(BTreeMap::new()),
            autoscalers: Mutex::new(BTreeMap::new()),
            failures: Mutex::new(BTreeMap::new()),
            clock: system_now_ms,
        }
    }

    /// Drops what is kept in memory of an object whose controller says it is gone: kube
    /// reports a reconciliation due for an object no longer in its store as `ObjectNotFound`,
    /// and every pool and shard set is requeued (at its next sample, or retry), so each one
    /// deleted comes out within that interval. Its failures in a row go (an object that
    /// failed is requeued too); `forget` drops the rest by its `namespace/name`.
    pub fn forget_if_gone<K, E>(
        &self,
        outcome: &Result<(ObjectRef<K>, Action), controller::Error<E, watcher::Error>>,
        forget: fn(&Self, &str),
    ) where
        K: Resource,
        E: std::error::Error + 'static,
    {
        if let Err(controller::Error::ObjectNotFound(gone)) = outcome {
            let namespace = gone.namespace.as_deref().unwrap_or_default();
            let key = format!("{namespace}/{}", gone.name);
            lock(&self.failures).remove(&format!("{}/{key}", gone.dyntype.kind));
            forget(self, &key);
        }
    }

    /// Forgets the failures in a row of `object`, which was reconciled: its next failure is
    /// retried after [`FIRST_RETRY`].
    fn reconciled<K: Resource<DynamicType = ()>>(&self, object: &K) {
        lock(&self.failures).remove(&failure_key(object));
    }

    /// Drops the autoscaler and the replicas gauge of the gateway pool `key`, which is gone.
    pub fn forget_gateway_pool(&self, key: &str) {
        lock(&self.autoscalers).remove(key);
        self.metrics.gateway_replicas.remove(&ResourceLabel {
            resource: key.to_owned(),
        });
    }

    /// Drops the rebalancer and the load gauge of the shard set `key`, which is gone.
    pub fn forget_shard_set(&self, key: &str) {
        lock(&self.rebalancers).remove(key);
        self.metrics.max_over_mean.remove(&ResourceLabel {
            resource: key.to_owned(),
        });
    }

    /// Publishes an event about `object`; a failure to publish is logged, not fatal.
    async fn event<K>(&self, object: &K, type_: EventType, reason: &str, action: &str, note: String)
    where
        K: Resource<DynamicType = ()>,
    {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(note),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &object.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }

    /// `Ok` if this replica still leads ([`Leadership`]): asked right before each action on
    /// the data plane.
    async fn leading(&self) -> Result<(), Error> {
        Ok(self.leadership.confirm((self.clock)()).await?)
    }

    /// The cluster `name` in `namespace`.
    async fn cluster(&self, namespace: &str, name: &str) -> Result<CourierCluster, Error> {
        Api::<CourierCluster>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await?
            .ok_or_else(|| Error::ClusterNotFound(name.to_owned()))
    }

    /// The digest of the configuration file the pods of `cluster` are given (its `configMap`,
    /// key [`pod::CONFIG_FILE`]; [`pod::with_config_digest`]), or `None` without one. Read at
    /// every reconciliation that renders pods: the ConfigMap is the user's, edited in place.
    async fn config_digest(&self, cluster: &CourierCluster) -> Result<Option<String>, Error> {
        let Some(name) = cluster.spec.config_map.as_deref() else {
            return Ok(None);
        };
        let (_, namespace) = crate::render::name_and_namespace(cluster)?;
        let problem = |problem: String| Error::ConfigMap {
            name: name.to_owned(),
            problem,
        };
        let found = Api::<ConfigMap>::namespaced(self.client.clone(), &namespace)
            .get_opt(name)
            .await?
            .ok_or_else(|| problem("no such ConfigMap in the namespace".to_owned()))?;
        // The volume projects `binaryData` keys as files too.
        let text = found
            .data
            .as_ref()
            .and_then(|data| data.get(pod::CONFIG_FILE));
        let bytes = found
            .binary_data
            .as_ref()
            .and_then(|data| data.get(pod::CONFIG_FILE));
        let file = match (text, bytes) {
            (Some(text), _) => text.as_bytes(),
            (None, Some(bytes)) => &bytes.0[..],
            (None, None) => return Err(problem(format!("no key {}", pod::CONFIG_FILE))),
        };
        Ok(Some(pod::config_digest(file)))
    }

    /// The value of a Secret's key, as text.
    async fn secret_text(&self, namespace: &str, secret: &SecretKeyRef) -> Result<String, Error> {
        let problem = |problem: &str| Error::Secret {
            name: secret.name.clone(),
            key: secret.key.clone(),
            problem: problem.to_owned(),
        };
        let found = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_opt(&secret.name)
            .await?
            .ok_or_else(|| problem("no such Secret"))?;
        let bytes = found
            .data
            .as_ref()
            .and_then(|data| data.get(&secret.key))
            .ok_or_else(|| problem("no such key"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| problem("not UTF-8 text"))
    }
}

/// `now_ms` (ms since the epoch) as a timestamp.
fn timestamp(now_ms: u64) -> Timestamp {
    Timestamp::from_millisecond(now_ms as i64).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Applies `object` (server-side apply, taking over fields from other managers).
async fn apply<K>(client: &Client, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let namespace = object.namespace().unwrap_or_default();
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    let params = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api
        .patch(&object.name_any(), &params, &Patch::Apply(object))
        .await?)
}

/// Applies the status of `object` (the `status` subresource, server-side apply).
async fn apply_status<K, S>(client: &Client, object: &K, status: &S) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + DeserializeOwned,
    S: Serialize,
{
    let namespace = object.namespace().unwrap_or_default();
    let api = Api::<K>::namespaced(client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(&object.name_any(), &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// The outcome of reconciling `object`; a failure is first written to its status: `Ready`
/// false, with the error's [`reason`](Error::reason) and message, at the object's generation
/// (unless this replica no longer leads).
/// Without it a spec the operator could not roll out (a refused apply, a missing Secret) would
/// go on showing the `Ready` of the last one that worked. The other conditions are left as
/// the last reconciliation that got through set them. A status that cannot be written is
/// logged: the reconciliation's own error is the one retried.
async fn reported<K>(
    ctx: &Context,
    object: &K,
    outcome: Result<Action, Error>,
) -> Result<Action, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + HasStatus
        + Clone
        + Debug
        + DeserializeOwned,
    K::Status: ObservedStatus + Salvaged + Clone + Default + Serialize,
{
    report_unreadable(ctx, object).await;
    let Err(error) = outcome else {
        ctx.reconciled(object);
        return outcome;
    };
    if let Error::NotLeader(_) = error {
        // The leader writes the statuses.
        return Err(error);
    }
    let generation = object.meta().generation;
    let now = timestamp((ctx.clock)());
    let mut status = object.status().cloned().unwrap_or_default();
    let conditions = Conditions::keeping(status.conditions(), generation, now)
        .set(
            ConditionType::Ready,
            false,
            error.reason(),
            &error.to_string(),
        )
        .into_vec();
    status.observe(generation, conditions);
    if let Err(e) = apply_status(&ctx.client, object, &status).await {
        tracing::warn!(object = %key(object), error = %e, "writing a failure to the status failed");
    }
    Err(error)
}

/// A `Warning` event (`StatusUnreadable`) when the stored status of `object` had fields that
/// did not fit the operator's types ([`crate::crd::stored`]): they were read as absent, and the
/// status written next replaces them. Named in full up to the length an event's note may have.
async fn report_unreadable<K>(ctx: &Context, object: &K)
where
    K: Resource<DynamicType = ()> + HasStatus,
    K::Status: Salvaged,
{
    let Some(unreadable) = object
        .status()
        .map(Salvaged::unreadable)
        .filter(|unreadable| !unreadable.is_empty())
    else {
        return;
    };
    let mut note = format!(
        "the stored status did not fit the operator's types and was read without: {}",
        unreadable.join("; ")
    );
    if note.len() > EVENT_NOTE {
        let end = (0..=EVENT_NOTE - 3)
            .rev()
            .find(|at| note.is_char_boundary(*at))
            .unwrap_or(0);
        note.truncate(end);
        note.push_str("...");
    }
    ctx.event(
        object,
        EventType::Warning,
        "StatusUnreadable",
        "ReadStatus",
        note,
    )
    .await;
}

/// The longest note the API server takes in an event (`events.k8s.io/v1`: 1 kB).
const EVENT_NOTE: usize = 1024;

/// `namespace/name` of an object.
fn key<K: Resource>(object: &K) -> String {
    format!(
        "{}/{}",
        object.meta().namespace.as_deref().unwrap_or_default(),
        object.meta().name.as_deref().unwrap_or_default()
    )
}

/// What a failed reconciliation of `object` costs: counted, logged, retried after a pause
/// that grows while the object goes on failing ([`retry_delay`]).
fn retry_after_error<K>(
    ctx: &Context,
    controller: &'static str,
    object: &K,
    error: &Error,
) -> Action
where
    K: Resource<DynamicType = ()>,
{
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ControllerLabel { controller })
        .inc();
    let failures = {
        let mut failures = lock(&ctx.failures);
        let count = failures.entry(failure_key(object)).or_default();
        *count = count.saturating_add(1);
        *count
    };
    let delay = retry_delay(failures);
    tracing::warn!(
        controller,
        object = %key(object),
        failures,
        retry_in = ?delay,
        %error,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// The pause before retrying an object after its first failed reconciliation in a row.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);

/// The longest pause between retries of an object that goes on failing.
pub const LAST_RETRY: Duration = Duration::from_secs(300);

/// The pause after the `failures`-th failed reconciliation in a row of an object:
/// [`FIRST_RETRY`], doubled at each failure, at most [`LAST_RETRY`]. A passing failure (a
/// conflict, an API server restarting) is retried within seconds; a lasting one (a missing
/// Secret, an object the API server refuses) costs a request every few minutes, not twice a
/// minute for good.
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(LAST_RETRY)
}

/// The key of `object` among the [`Context::failures`]: its kind, namespace and name.
fn failure_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    format!("{}/{}", K::kind(&()), key(object))
}

fn counted(metrics: &Metrics, controller: &'static str) {
    metrics
        .reconciliations
        .get_or_create(&ControllerLabel { controller })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::foundation_db_cluster;
    use kube::runtime::reflector;

    fn named(name: &str, namespace: &str, config_map: Option<&str>) -> CourierCluster {
        let mut cluster = foundation_db_cluster(None);
        cluster.metadata.name = Some(name.to_owned());
        cluster.metadata.namespace = Some(namespace.to_owned());
        cluster.spec.config_map = config_map.map(str::to_owned);
        cluster
    }

    /// A ConfigMap's change wakes the clusters of its namespace that name it, and no other.
    #[test]
    fn a_config_map_wakes_the_clusters_of_its_namespace_that_name_it() {
        let (known, mut writer) = reflector::store::<CourierCluster>();
        for cluster in [
            named("prod", "chat", Some("tuning")),
            named("staging", "chat", Some("tuning")),
            named("plain", "chat", None),
            named("other", "chat", Some("tuning-v2")),
            named("prod", "elsewhere", Some("tuning")),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(cluster));
        }
        let config_map = |name: &str| PartialObjectMeta::<ConfigMap> {
            metadata: kube::core::ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("chat".to_owned()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut woken: Vec<String> = clusters_naming(&known, &config_map("tuning"))
            .into_iter()
            .map(|cluster| format!("{}/{}", cluster.namespace.unwrap_or_default(), cluster.name))
            .collect();
        woken.sort();
        assert_eq!(woken, ["chat/prod", "chat/staging"]);
        assert!(clusters_naming(&known, &config_map("unrelated")).is_empty());
    }
}
