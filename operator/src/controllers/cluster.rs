//! The `CourierCluster` controller: an embedded cluster becomes one `courier serve`
//! StatefulSet and its Service; a FoundationDB cluster becomes a `GatewayPool` and a
//! `SequencerShardSet` (whose own controllers render their pods), the chat Deployment, the
//! media Deployment and its Service, the fanout Deployment (each of these three with a
//! PodDisruptionBudget of one pod down) and, with push providers, the push notifier's
//! (without them, a notifier left from earlier is scaled to zero); with storage partitions,
//! first the ConfigMap of their table. The status says which, and is Ready when what it owns
//! is; it is Progressing until every part runs its current spec (a Deployment's old pods
//! serving while they are replaced, or a status its controller wrote before seeing the spec
//! just applied, are not rolled out).
//!
//! Every pod template carries the digest of the cluster's configuration file (its
//! `configMap`, read at each reconciliation), so that an edit of the ConfigMap in place rolls
//! the pods; a `configMap` that is missing, or has no `courier.toml`, applies nothing and
//! says so in the status (`Ready` false, reason `ConfigMapUnusable`).
//!
//! A FoundationDB storage the data plane would refuse (a partition table with a gap, an
//! overlap, a range beyond the shards) is not rendered: the status says what is wrong
//! (`Degraded`, reason `InvalidStorage`) and what runs is left as it was.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::{Context, Error, apply, apply_status, counted, reported, retry_after_error, timestamp};
use crate::crd::{
    ConditionType, Conditions, CourierCluster, CourierClusterStatus, GatewayPool, SequencerShardSet,
};
use crate::render::partitions::{self, StorageError};
use crate::render::pod::{Component, with_config_digest};
use crate::render::{backends, delivery, embedded, name_and_namespace, pools, stateless_budget};

const CONTROLLER: &str = "cluster";

/// Brings what `cluster` owns in line with its spec.
pub async fn reconcile(cluster: Arc<CourierCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted(&ctx.metrics, CONTROLLER);
    reported(&ctx, cluster.as_ref(), run(&cluster, &ctx).await).await
}

async fn run(cluster: &CourierCluster, ctx: &Context) -> Result<Action, Error> {
    let now = timestamp((ctx.clock)());
    if let Some(fdb) = &cluster.spec.storage.foundation_db
        && let Err(problem) = partitions::check(fdb, cluster.spec.shards)
    {
        // Nothing is applied: pods rendered from this spec would not start.
        let status = invalid_storage(cluster, &problem, now);
        apply_status(&ctx.client, cluster, &status).await?;
        return Ok(Action::await_change());
    }
    // Before anything is applied: without its file, no pod of the cluster could start.
    let digest = ctx.config_digest(cluster).await?;
    let digest = digest.as_deref();
    let ready = if cluster.spec.storage.embedded.is_some() {
        let children = embedded::build(cluster)?;
        let stateful_set: StatefulSet = apply(
            &ctx.client,
            &with_config_digest(children.stateful_set, digest),
        )
        .await?;
        apply(&ctx.client, &children.service).await?;
        let ready = stateful_set
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        Readiness {
            ready: ready >= 1,
            rolled_out: ready >= 1,
            message: format!("{ready}/1 courier serve pod ready"),
        }
    } else {
        // The table first: the pods mount it.
        if let Some(table) = partitions::config_map(cluster)? {
            apply(&ctx.client, &table).await?;
        }
        let pools = pools::build(cluster)?;
        let gateways: GatewayPool = apply(&ctx.client, &pools.gateways).await?;
        let sequencers: SequencerShardSet = apply(&ctx.client, &pools.sequencers).await?;
        let (name, _) = name_and_namespace(cluster)?;
        let chat = with_config_digest(backends::chat(cluster)?, digest);
        let chat: Deployment = apply(&ctx.client, &chat).await?;
        let chat_name = backends::chat_name(&name);
        apply_budget(ctx, cluster, Component::Chat, &chat_name).await?;
        let media = match backends::media(cluster)? {
            Some((deployment, service)) => {
                let deployment = with_config_digest(deployment, digest);
                let deployment: Deployment = apply(&ctx.client, &deployment).await?;
                apply(&ctx.client, &service).await?;
                let media_name = backends::media_name(&name);
                apply_budget(ctx, cluster, Component::Media, &media_name).await?;
                Some(deployment)
            }
            None => None,
        };
        let fanout = with_config_digest(delivery::fanout(cluster)?, digest);
        let fanout: Deployment = apply(&ctx.client, &fanout).await?;
        let fanout_name = delivery::fanout_name(&name);
        apply_budget(ctx, cluster, Component::Fanout, &fanout_name).await?;
        match delivery::push(cluster)? {
            Some(push) => {
                apply(&ctx.client, &with_config_digest(push, digest)).await?;
            }
            None => stop_push(ctx, cluster, digest).await?,
        }
        let parts = [
            Part::of_resource(
                gateways.metadata.generation,
                gateways.status.as_ref().map(|s| &s.conditions[..]),
            ),
            Part::of_resource(
                sequencers.metadata.generation,
                sequencers.status.as_ref().map(|s| &s.conditions[..]),
            ),
            Part::of_deployment(&chat),
            media.as_ref().map_or(Part::RolledOut, Part::of_deployment),
            Part::of_deployment(&fanout),
        ];
        let [gateways, sequencers, chat, media, fanout] = parts.map(Part::as_str);
        Readiness {
            ready: parts.iter().all(|part| *part != Part::NotReady),
            rolled_out: parts.iter().all(|part| *part == Part::RolledOut),
            message: format!(
                "gateway pool {gateways}, shard set {sequencers}, chat {chat}, media {media}, fanout {fanout}"
            ),
        }
    };
    let status = status(cluster, ready, now);
    apply_status(&ctx.client, cluster, &status).await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Applies the PodDisruptionBudget of the stateless `component` pods of the Deployment `name`.
async fn apply_budget(
    ctx: &Context,
    cluster: &CourierCluster,
    component: Component,
    name: &str,
) -> Result<(), Error> {
    let budget = stateless_budget(cluster, component, name)?;
    apply(&ctx.client, &budget).await?;
    Ok(())
}

/// Scales the push notifier a removed `pushSecret` leaves behind to zero pods (the operator
/// deletes nothing): left running, it would go on sending with the old Secret and image. A
/// cluster that never had one gets none; a Deployment of that name this cluster does not own
/// is left alone.
async fn stop_push(
    ctx: &Context,
    cluster: &CourierCluster,
    digest: Option<&str>,
) -> Result<(), Error> {
    let (name, namespace) = name_and_namespace(cluster)?;
    let found = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&delivery::push_name(&name))
        .await?;
    let uid = cluster.metadata.uid.as_deref();
    let running = found.filter(|push| {
        let owned = push
            .owner_references()
            .iter()
            .any(|owner| Some(owner.uid.as_str()) == uid);
        let replicas = push.spec.as_ref().and_then(|s| s.replicas);
        owned && replicas != Some(0)
    });
    if running.is_some() {
        let stopped = with_config_digest(delivery::push_stopped(cluster)?, digest);
        apply(&ctx.client, &stopped).await?;
    }
    Ok(())
}

/// Counts the failure and retries later, the later the more often the object failed in a
/// row.
pub fn error_policy(cluster: Arc<CourierCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_error(&ctx, CONTROLLER, cluster.as_ref(), error)
}

/// Whether what a cluster owns serves (`ready`: `Ready`) and runs its current spec
/// (`rolled_out`: `Progressing` false), and how each part stands (`message`).
struct Readiness {
    ready: bool,
    rolled_out: bool,
    message: String,
}

/// How one part of a cluster (a Deployment, its pool, its shard set) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Some of the pods it asks for are not ready.
    NotReady,
    /// Its pods are ready, but not all of them run its current spec yet (or its controller
    /// has not seen that spec yet): old pods serve while they are replaced.
    RollingOut,
    /// Every pod it asks for is ready and runs its current spec.
    RolledOut,
}

impl Part {
    /// A Deployment as its apply answered it. Its status may be of an older generation (its
    /// controller has not seen the template just applied), and its ready pods of an older
    /// template (being replaced): neither is rolled out.
    fn of_deployment(deployment: &Deployment) -> Part {
        let wanted = deployment
            .spec
            .as_ref()
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let status = deployment.status.clone().unwrap_or_default();
        if status.ready_replicas.unwrap_or(0) < wanted {
            return Part::NotReady;
        }
        let seen = status.observed_generation >= deployment.metadata.generation;
        let updated = status.updated_replicas.unwrap_or(0) >= wanted;
        // Old pods still running beside the new ones (a surge) are not gone yet.
        let old_gone = status.replicas.unwrap_or(0) <= wanted;
        match seen && updated && old_gone {
            true => Part::RolledOut,
            false => Part::RollingOut,
        }
    }

    /// A pool or shard set at `generation`, by its conditions: `Ready`, at its current
    /// generation and not `Progressing`, is rolled out; `Ready` of an older generation (its
    /// controller has not seen the spec the cluster just applied) or `Progressing` is rolling
    /// out.
    fn of_resource(generation: Option<i64>, conditions: Option<&[Condition]>) -> Part {
        let conditions = conditions.unwrap_or_default();
        let holds = |kind: ConditionType| {
            conditions
                .iter()
                .find(|c| c.type_ == kind.as_str() && c.status == "True")
        };
        match (
            holds(ConditionType::Ready),
            holds(ConditionType::Progressing),
        ) {
            (None, _) => Part::NotReady,
            (Some(ready), None) if ready.observed_generation >= generation => Part::RolledOut,
            (Some(_), _) => Part::RollingOut,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Part::NotReady => "not ready",
            Part::RollingOut => "rolling out",
            Part::RolledOut => "ready",
        }
    }
}

/// The conditions `cluster`'s status holds now (none before its first status).
fn previous_conditions(cluster: &CourierCluster) -> Vec<Condition> {
    cluster
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default()
}

/// The status of `cluster` given how what it owns stands.
fn status(cluster: &CourierCluster, readiness: Readiness, now: Timestamp) -> CourierClusterStatus {
    let generation = cluster.metadata.generation;
    let Readiness {
        ready,
        rolled_out,
        message,
    } = readiness;
    let conditions = Conditions::new(&previous_conditions(cluster), generation, now)
        .set(
            ConditionType::Ready,
            ready,
            if ready { "Available" } else { "Starting" },
            &message,
        )
        .set(
            ConditionType::Progressing,
            !rolled_out,
            if rolled_out { "Settled" } else { "RollingOut" },
            &message,
        )
        .into_vec();
    CourierClusterStatus {
        observed_generation: generation,
        storage: Some(cluster.spec.storage.kind_name().to_owned()),
        conditions,
        unreadable: Vec::new(),
    }
}

/// The status of `cluster` whose FoundationDB storage is refused for `problem`.
fn invalid_storage(
    cluster: &CourierCluster,
    problem: &StorageError,
    now: Timestamp,
) -> CourierClusterStatus {
    let generation = cluster.metadata.generation;
    let message = format!("{problem}; nothing is rolled out until it is fixed");
    let conditions = Conditions::new(&previous_conditions(cluster), generation, now)
        .set(ConditionType::Ready, false, "InvalidStorage", &message)
        .set(
            ConditionType::Progressing,
            false,
            "InvalidStorage",
            &message,
        )
        .set(ConditionType::Degraded, true, "InvalidStorage", &message)
        .into_vec();
    CourierClusterStatus {
        observed_generation: generation,
        storage: Some(cluster.spec.storage.kind_name().to_owned()),
        conditions,
        unreadable: Vec::new(),
    }
}
