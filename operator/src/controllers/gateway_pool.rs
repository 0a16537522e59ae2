//! The `GatewayPool` controller: reads each ready gateway pod's connections, lets the
//! autoscaler decide the pool's size, marks the pod to remove first on a scale-down, and
//! applies the Deployment, the client Service and the PodDisruptionBudget.
//!
//! A pool refuses a cluster on the embedded store, whose own pod holds the connections behind
//! a Service of the name the pool's would have: it renders nothing and says so in its status
//! (`Degraded`, reason `NotFoundationDb`), as it does for a cluster that does not exist and
//! for a cluster whose pool is another (`NotTheClustersOwn`: a cluster runs the pool it
//! creates, and a second one would take its Service and mark its pods).
//!
//! A ready pod whose `/metrics` cannot be read keeps the pool from shrinking (the autoscaler
//! does not guess what it holds), and the status says so: `Degraded`, reason
//! `MetricsUnavailable`, naming the pods.
//!
//! The mark of the pod to go first lasts one sample: at every sample any other pod still
//! carrying it (a scale-down that did not happen: the Deployment's apply failed, load came
//! back, the pool's limits were raised) has it removed before the Deployment is applied, or a
//! later, unrelated scale-down would remove that pod rather than the one the autoscaler picks.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::{
    Context, Error, apply, apply_status, counted, key, lock, reported, retry_after_error, timestamp,
};
use crate::autoscale::{ConnectionSample, DELETION_COST, ScaleDecision, ScalePolicy, ScaleReason};
use crate::crd::{ConditionType, Conditions, GatewayPool, GatewayPoolStatus};
use crate::metrics::ResourceLabel;
use crate::render::pod::{Component, selector_labels, with_config_digest};
use crate::render::{RenderError, foundation_db, gateways, name_and_namespace, pools};

const CONTROLLER: &str = "gateway-pool";

/// How often a pool is looked at (a connection sample each time).
const SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// The deletion cost of the pod picked to go first (others have the default, 0).
const FIRST_TO_GO: &str = "-1000";

/// Scales the pool and applies its objects.
pub async fn reconcile(pool: Arc<GatewayPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted(&ctx.metrics, CONTROLLER);
    reported(&ctx, pool.as_ref(), run(&pool, &ctx).await).await
}

async fn run(pool: &GatewayPool, ctx: &Context) -> Result<Action, Error> {
    let (name, namespace) = name_and_namespace(pool)?;
    let now_ms = (ctx.clock)();
    let now = timestamp(now_ms);
    let cluster = ctx
        .cluster(&namespace, &pool.spec.cluster)
        .await
        .and_then(|cluster| {
            // Before anything is read or applied: see `foundation_db` and `own_gateway_pool`.
            foundation_db(&cluster, "GatewayPool")?;
            pools::own_gateway_pool(pool)?;
            Ok(cluster)
        });
    let cluster = match cluster {
        Ok(cluster) => cluster,
        // Nothing to run on until the cluster is created or the pool names another one: no
        // pod, and the status says why.
        Err(
            refusal @ (Error::ClusterNotFound(_)
            | Error::Render(
                RenderError::NotFoundationDb { .. } | RenderError::NotTheClustersOwn { .. },
            )),
        ) => {
            apply_status(&ctx.client, pool, &degraded(pool, now, &refusal)).await?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Err(e) => return Err(e),
    };
    let digest = ctx.config_digest(&cluster).await?;
    let digest = digest.as_deref();
    let settings = &pool.spec.pool;
    let last = lock(&ctx.autoscalers)
        .get(&key(pool))
        .and_then(|a| a.last_decision_ms());
    let interval = SAMPLE_INTERVAL.as_millis() as u64;
    if let Some(next) = last
        .map(|at| at + interval)
        .filter(|next| now_ms + interval / 10 < *next)
    {
        // Woken between samples (a watch event): keep the objects applied at the current size,
        // and sample when the next one is due.
        let current = current_replicas(ctx, &namespace, &name).await?;
        let children = gateways::build(pool, &cluster, current.unwrap_or(settings.min_replicas))?;
        apply(
            &ctx.client,
            &with_config_digest(children.deployment, digest),
        )
        .await?;
        apply(&ctx.client, &children.service).await?;
        apply(&ctx.client, &children.disruption_budget).await?;
        return Ok(Action::requeue(Duration::from_millis(next - now_ms)));
    }
    let GatewayPods {
        connections,
        marked,
    } = gateway_pods(ctx, &namespace, &pool.spec.cluster).await?;
    let current = current_replicas(ctx, &namespace, &name).await?;
    let policy = ScalePolicy::new(
        settings.min_replicas,
        settings.max_replicas,
        settings.target_connections_per_pod,
    );
    let decision = {
        let mut autoscalers = lock(&ctx.autoscalers);
        let autoscaler = autoscalers.entry(key(pool)).or_default();
        autoscaler.decide(
            &policy,
            current.unwrap_or(settings.min_replicas),
            &connections,
            now_ms,
        )
    };
    // Before the Deployment shrinks: two marked pods, and the ReplicaSet could take either.
    for pod in marked
        .iter()
        .filter(|pod| decision.remove.as_ref() != Some(*pod))
    {
        unmark(ctx, &namespace, pod).await?;
    }
    if let Some(pod) = &decision.remove {
        mark_first_to_go(ctx, &namespace, pod).await?;
    }
    announce(ctx, pool, current, &decision, connections.total()).await;
    let children = gateways::build(pool, &cluster, decision.replicas)?;
    let deployment = with_config_digest(children.deployment, digest);
    let deployment: Deployment = apply(&ctx.client, &deployment).await?;
    apply(&ctx.client, &children.service).await?;
    apply(&ctx.client, &children.disruption_budget).await?;
    ctx.metrics
        .gateway_replicas
        .get_or_create(&ResourceLabel {
            resource: key(pool),
        })
        .set(i64::from(decision.replicas));
    let status = status(pool, &deployment, &connections, now);
    apply_status(&ctx.client, pool, &status).await?;
    Ok(Action::requeue(SAMPLE_INTERVAL))
}

/// Counts the failure and retries later, the later the more often the object failed in a
/// row.
pub fn error_policy(pool: Arc<GatewayPool>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_error(&ctx, CONTROLLER, pool.as_ref(), error)
}

/// The replicas the pool's Deployment asks for, if it exists.
async fn current_replicas(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<i32>, Error> {
    Ok(Api::<Deployment>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await?
        .and_then(|d| d.spec.and_then(|s| s.replicas)))
}

/// What a sample reads of a pool's gateway pods.
struct GatewayPods {
    /// Connections of each ready pod, and the ready pods whose metrics cannot be read.
    connections: ConnectionSample,
    /// The pods (not being deleted) marked to go first.
    marked: BTreeSet<String>,
}

/// The gateway pods of `cluster`: the connections of each ready one, the ready ones whose
/// metrics cannot be read, and those marked to go first.
async fn gateway_pods(ctx: &Context, namespace: &str, cluster: &str) -> Result<GatewayPods, Error> {
    let selector = selector_labels(cluster, Component::Gateway)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .list(&ListParams::default().labels(&selector))
        .await?;
    let marked = pods
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none() && is_marked(pod))
        .map(|pod| pod.metadata.name.clone().unwrap_or_default())
        .collect();
    let ready = pods.into_iter().filter_map(|pod| {
        let ip = ready_ip(&pod)?;
        Some((pod.metadata.name.unwrap_or_default(), ip))
    });
    // Read together: a busy pod slow to answer (when the pool most needs to grow) must not
    // hold up the others, one read after another.
    let reads = futures::stream::iter(ready)
        .map(|(name, ip)| async move {
            let read = ctx.data_plane.gateway_connections(&ip).await;
            (name, read)
        })
        .buffer_unordered(CONCURRENT_READS)
        .collect::<Vec<_>>()
        .await;
    let mut connections = ConnectionSample::default();
    for (name, read) in reads {
        match read {
            Ok(count) => {
                connections.read.insert(name, count);
            }
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "reading a gateway's connections failed");
                connections.unread.insert(name);
            }
        }
    }
    Ok(GatewayPods {
        connections,
        marked,
    })
}

/// Whether `pod` carries the operator's mark to go first (a deletion cost set otherwise, by
/// hand, is left alone).
fn is_marked(pod: &Pod) -> bool {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(DELETION_COST))
        .is_some_and(|cost| cost == FIRST_TO_GO)
}

/// Gateway pods whose `/metrics` are read at once: together, but not thousands of
/// connections from the operator at a time for a pool of thousands of pods.
const CONCURRENT_READS: usize = 64;

/// The pod's IP if it is ready and not being deleted.
fn ready_ip(pod: &Pod) -> Option<String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .as_ref()?
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then(|| status.pod_ip.clone()).flatten()
}

/// Gives `pod` the lowest deletion cost, so that the ReplicaSet removes it first.
async fn mark_first_to_go(ctx: &Context, namespace: &str, pod: &str) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { DELETION_COST: FIRST_TO_GO } }
    });
    Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Removes the mark of `pod` to go first (it gets the default deletion cost again).
async fn unmark(ctx: &Context, namespace: &str, pod: &str) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": { "annotations": { DELETION_COST: null } }
    });
    let removed = Api::<Pod>::namespaced(ctx.client.clone(), namespace)
        .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await;
    match removed {
        // Deleted since the list: nothing left to unmark.
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other.map(|_| ()).map_err(Error::from),
    }
}

/// An event when the pool changes size.
async fn announce(
    ctx: &Context,
    pool: &GatewayPool,
    current: Option<i32>,
    decision: &ScaleDecision,
    connections: u64,
) {
    let Some(current) = current else { return };
    if current == decision.replicas {
        return;
    }
    let reason = match decision.reason {
        ScaleReason::Up => "ScaledUp",
        ScaleReason::Down => "ScaledDown",
        ScaleReason::Limits | ScaleReason::Steady => "Rescaled",
    };
    let removed = decision
        .remove
        .as_deref()
        .map(|pod| format!("; {pod} (fewest connections) goes first"))
        .unwrap_or_default();
    ctx.event(
        pool,
        EventType::Normal,
        reason,
        "Scale",
        format!(
            "{current} -> {} gateway pods for {connections} connections{removed}",
            decision.replicas
        ),
    )
    .await;
}

fn status(
    pool: &GatewayPool,
    deployment: &Deployment,
    connections: &ConnectionSample,
    now: Timestamp,
) -> GatewayPoolStatus {
    let observed = deployment.status.clone().unwrap_or_default();
    let wanted = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let ready = observed.ready_replicas.unwrap_or(0);
    // A status its controller wrote before it saw the template just applied counts the pods
    // of the template before as updated.
    let seen = observed.observed_generation >= deployment.metadata.generation;
    let updated = match seen {
        true => observed.updated_replicas.unwrap_or(0),
        false => 0,
    };
    let message = format!("{ready}/{wanted} gateway pods ready");
    let (degraded, reason, why) = match connections.unread.is_empty() {
        true => (
            false,
            "Healthy",
            "the cluster is found and every ready pod's connections are read".to_owned(),
        ),
        false => (
            true,
            "MetricsUnavailable",
            unread_message(&connections.unread),
        ),
    };
    let previous = pool
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let conditions = Conditions::new(&previous, pool.metadata.generation, now)
        .set(
            ConditionType::Ready,
            ready >= wanted && wanted > 0,
            if ready >= wanted {
                "Available"
            } else {
                "PodsNotReady"
            },
            &message,
        )
        .set(
            ConditionType::Progressing,
            updated < wanted || ready < wanted,
            if updated < wanted {
                "RollingOut"
            } else {
                "Settled"
            },
            &format!("{updated}/{wanted} pods on the current template"),
        )
        .set(ConditionType::Degraded, degraded, reason, &why)
        .into_vec();
    GatewayPoolStatus {
        observed_generation: pool.metadata.generation,
        replicas: observed.replicas.unwrap_or(0),
        ready_replicas: ready,
        // Past 2^63 - 1 the API server keeps a float, which no `u64` reads back.
        connections: connections.total().min(i64::MAX as u64),
        conditions,
        unreadable: Vec::new(),
    }
}

/// Pods named in a message at most (a condition's message is bounded).
const NAMED_PODS: usize = 5;

/// Why the pool cannot shrink: the ready pods whose `/metrics` did not answer.
fn unread_message(unread: &BTreeSet<String>) -> String {
    let mut named: Vec<String> = unread.iter().take(NAMED_PODS).cloned().collect();
    if unread.len() > NAMED_PODS {
        named.push(format!("{} more", unread.len() - NAMED_PODS));
    }
    format!(
        "{} ready gateway pods did not answer /metrics ({}): the pool does not shrink until they do",
        unread.len(),
        named.join(", ")
    )
}

/// The status of `pool`, which has no cluster to run on (`refusal`).
fn degraded(pool: &GatewayPool, now: Timestamp, refusal: &Error) -> GatewayPoolStatus {
    let previous = pool.status.clone().unwrap_or_default();
    let (reason, message) = (refusal.reason(), refusal.to_string());
    let conditions = Conditions::new(&previous.conditions, pool.metadata.generation, now)
        .set(ConditionType::Ready, false, reason, &message)
        .set(ConditionType::Degraded, true, reason, &message)
        .into_vec();
    GatewayPoolStatus {
        observed_generation: pool.metadata.generation,
        conditions,
        ..previous
    }
}
