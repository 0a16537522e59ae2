//! The `SequencerShardSet` controller: applies the sequencer StatefulSet, headless Service and
//! PodDisruptionBudget, samples every pod's shard loads through the admin API, and rebalances.
//!
//! - **Scale-up**: the StatefulSet grows at once; the new pods are empty, so the planner fills
//!   them.
//! - **Scale-down**: pods past `replicas` are evacuated first (in every mode: the scale-down
//!   was asked for); once a leaving pod holds nothing it is drained (it takes no shard again)
//!   and only then does the StatefulSet shrink. Blind (the admin API does not answer), the
//!   StatefulSet never shrinks.
//! - **Modes**: `Auto` carries load moves out as planned; `Proposal` writes them to the
//!   `ShardRebalance` `<set>-rebalance` and carries them out once it is approved by annotation
//!   ([`proposal`]); `Off` plans nothing.
//! - **Pauses**: no moves while pods are missing, not ready (starting, or deleted to roll
//!   them), or not answering, or while some shards have no live owner (the admin API's shard
//!   map, read from the store: a failover is under way), or while events have waited more
//!   than 30 s for fanout (the shard map's outbox lag: the store or fanout cannot keep up).
//!   A pod on an older template pauses nothing: under `OnDelete` only its deletion rolls it.
//! - **Leading**: each batch of moves and each drain is made only once the Lease confirms that
//!   this replica still leads ([`crate::leader::Leadership`]); otherwise the reconciliation
//!   fails `NotLeader`, having acted on nothing.
//! - **Deletion**: a finalizer drains every pod of the set first (its own: not the cluster's
//!   other sequencers), so their shards are released in the store at once rather than when
//!   their leases lapse.
//! - **One per cluster**: a set is its cluster's own (`<cluster>-sequencers`, which the
//!   cluster creates) or renders nothing and samples nothing (`NotTheClustersOwn`): a second
//!   one would see the first one's pods holding shards that are not its own and evacuate them,
//!   the first one moving them back, for good.

mod proposal;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use courier_rpc::ClusterToken;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use rand::Rng;

use super::{
    Context, Error, RebalancerState, apply, apply_status, counted, key, lock, reported,
    retry_after_error, timestamp,
};
use crate::crd::{
    ConditionType, Conditions, CourierCluster, PodLoad, RebalanceMode, RecordedMove,
    SequencerShardSet, SequencerShardSetStatus, ShardRebalance,
};
use crate::metrics::{MoveLabel, ResourceLabel};
use crate::rebalance::executor::{AdminError, Sample, ShardAdmin, carry_out};
use crate::rebalance::{Move, MoveReason, PlannerPolicy, PodId, Rebalancer};
use crate::render::pod::with_config_digest;
use crate::render::sequencers::{self, admin_address, pod_name};
use crate::render::{RenderError, foundation_db, name_and_namespace, pools};

const CONTROLLER: &str = "shard-set";

/// The finalizer that drains the pods before the set goes.
pub const FINALIZER: &str = "courier.dev/release-shards";

pub use proposal::REBALANCE_ANNOTATION;

/// Time between samples while shards leave pods that go: a hand-off takes ~0.1 s, and the
/// planner moves at most `maxConcurrentMoves` shards (4) at a time, so evacuating a pod at the
/// set's sample interval (15 s) would take an hour for a thousand shards.
pub const EVACUATION_PACE: Duration = Duration::from_secs(1);

/// Moves kept in the status.
const RECENT_MOVES: usize = 20;

/// Brings the set's pods in line with its spec and rebalances its shards.
pub async fn reconcile(set: Arc<SequencerShardSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    counted(&ctx.metrics, CONTROLLER);
    let (_, namespace) = name_and_namespace(set.as_ref())?;
    let api = Api::<SequencerShardSet>::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, set, |event| async {
        match event {
            Finalizer::Apply(set) => reported(&ctx, set.as_ref(), run(&set, &ctx).await).await,
            Finalizer::Cleanup(set) => {
                let released = release(&set, &ctx).await;
                if released.is_ok() {
                    ctx.reconciled(set.as_ref());
                }
                released
            }
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// Counts the failure and retries later, the later the more often the object failed in a
/// row.
pub fn error_policy(set: Arc<SequencerShardSet>, error: &Error, ctx: Arc<Context>) -> Action {
    retry_after_error(&ctx, CONTROLLER, set.as_ref(), error)
}

/// The admin API of `set`'s pods, with the cluster's token; `pods` is how many to ask.
async fn admin_of(
    ctx: &Context,
    set: &SequencerShardSet,
    cluster: &CourierCluster,
    pods: i32,
) -> Result<Arc<dyn ShardAdmin>, Error> {
    let (name, namespace) = name_and_namespace(set)?;
    let fdb = foundation_db(cluster, "SequencerShardSet")?;
    let secret = &fdb.cluster_token_secret;
    let text = ctx.secret_text(&namespace, secret).await?;
    let token = ClusterToken::new(text.trim()).map_err(|e| Error::Secret {
        name: secret.name.clone(),
        key: secret.key.clone(),
        problem: e.to_string(),
    })?;
    let seeds = (0..pods.max(1))
        .map(|ordinal| admin_address(&name, &namespace, ordinal))
        .collect();
    Ok(ctx.data_plane.shard_admin(token, seeds))
}

async fn run(set: &SequencerShardSet, ctx: &Context) -> Result<Action, Error> {
    let (name, namespace) = name_and_namespace(set)?;
    let now_ms = (ctx.clock)();
    let cluster = ctx.cluster(&namespace, &set.spec.cluster).await?;
    // Before anything is sampled: a second set would move the cluster's shards to its pods.
    pools::own_shard_set(set)?;
    let stateful_sets = Api::<StatefulSet>::namespaced(ctx.client.clone(), &namespace);
    let existing = stateful_sets.get_opt(&name).await?;
    let running = existing
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let wanted = set.spec.sequencers.replicas;
    let policy = &set.spec.sequencers.rebalance;
    let sample_ms = millis(sample_interval(ctx, set, policy.sample_seconds));
    if let Some(wait_ms) = sample_wait(ctx, set, now_ms, sample_ms) {
        // Woken between samples (a watch event): keep the workloads applied (never shrinking
        // them blind), and sample when the next one is due, so that the trends count samples,
        // not events.
        apply_children(ctx, set, &cluster, running.max(wanted)).await?;
        return Ok(Action::requeue(Duration::from_millis(wait_ms)));
    }
    let admin = admin_of(ctx, set, &cluster, running.max(wanted)).await?;
    let sample = if running > 0 {
        Some(admin.sample().await)
    } else {
        None
    };
    let mut notes = Notes::default();
    let replicas = match &sample {
        Some(Ok(sample)) => {
            let replicas = replicas_to_run(&name, wanted, running, sample);
            for ordinal in replicas..running {
                drain_leaving(ctx, set, admin.as_ref(), sample, &pod_name(&name, ordinal)).await?;
            }
            replicas
        }
        Some(Err(e)) => {
            notes.admin_error = Some(e.to_string());
            running.max(wanted)
        }
        None => wanted,
    };
    let stateful_set = apply_children(ctx, set, &cluster, replicas).await?;
    let rebalance = match (&sample, policy.mode) {
        (Some(Ok(_)), RebalanceMode::Proposal) => proposal::read(ctx, set).await?,
        _ => None,
    };
    let mut state = take_state(ctx, set, now_ms);
    state.last_sample_ms = Some(now_ms);
    state.evacuating = false;
    let stepped = match &sample {
        Some(Ok(sample)) => {
            notes.paused = pods_not_ready(&stateful_set, replicas)
                .or_else(|| failover(sample))
                .or_else(|| delivery_trouble(sample));
            let paused = notes.paused.as_deref();
            move_shards(
                ctx,
                set,
                admin.as_ref(),
                sample,
                paused,
                rebalance,
                &mut state,
            )
            .await
        }
        _ => Ok(Round::default()),
    };
    if let Ok(round) = &stepped {
        // A failed evacuation waits for the usual interval rather than being retried at once.
        state.evacuating = round
            .done
            .iter()
            .any(|(planned, outcome)| planned.reason == MoveReason::Evacuate && outcome.is_ok());
    }
    // The trends and cooldowns are kept whatever became of the plan's writes.
    put_state(ctx, set, state);
    let round = stepped?;
    let status = status(set, &stateful_set, sample.as_ref(), &round, &notes, now_ms);
    apply_status(&ctx.client, set, &status).await?;
    Ok(Action::requeue(sample_interval(
        ctx,
        set,
        policy.sample_seconds,
    )))
}

/// Time between samples: the set's `sample_seconds`, or [`EVACUATION_PACE`] while the last
/// sample moved shards off leaving pods.
fn sample_interval(ctx: &Context, set: &SequencerShardSet, sample_seconds: u64) -> Duration {
    let evacuating = lock(&ctx.rebalancers)
        .get(&key(set))
        .is_some_and(|state| state.evacuating);
    match evacuating {
        true => EVACUATION_PACE,
        false => Duration::from_secs(sample_seconds.max(1)),
    }
}

/// What one rebalancing step did.
#[derive(Debug, Default)]
struct Round {
    /// The moves carried out, with the new epoch or the failure.
    done: Vec<(Move, Result<u64, AdminError>)>,
    /// The `ShardRebalance` whose plan waits for approval (mode `Proposal`).
    awaiting_approval: Option<String>,
}

/// Folds `sample` into the set's rebalancer, plans when a plan is due and nothing pauses load
/// moves, and carries out evacuations, load moves (mode `Auto`) and an approved plan (mode
/// `Proposal`, whose `ShardRebalance` is `rebalance`).
async fn move_shards(
    ctx: &Context,
    set: &SequencerShardSet,
    admin: &dyn ShardAdmin,
    sample: &Sample,
    paused: Option<&str>,
    rebalance: Option<ShardRebalance>,
    state: &mut RebalancerState,
) -> Result<Round, Error> {
    let (name, _) = name_and_namespace(set)?;
    let now_ms = (ctx.clock)();
    let policy = &set.spec.sequencers.rebalance;
    let desired: BTreeSet<PodId> = (0..set.spec.sequencers.replicas)
        .map(|ordinal| pod_name(&name, ordinal))
        .filter(|pod| sample.nodes.contains_key(pod) && !sample.draining.contains(pod))
        .collect();
    let view = sample.view(Some(&desired));
    state.rebalancer.set_policy(PlannerPolicy::from(policy));
    state.rebalancer.observe(&view);
    let urgent = view.shards.values().any(|s| !view.pods.contains(&s.owner))
        || view
            .pods
            .iter()
            .any(|pod| view.shards.values().all(|s| &s.owner != pod));
    let refresh =
        rebalance.as_ref().and_then(proposal::Request::of) == Some(proposal::Request::Refresh);
    let planning = paused.is_none() && (now_ms >= state.next_plan_ms || urgent || refresh);
    let planned = if planning {
        state.next_plan_ms = now_ms.saturating_add(jittered(policy.interval_seconds));
        state.rebalancer.plan(&view, now_ms)
    } else {
        Vec::new()
    };
    let (mut to_do, proposed) = split_by_mode(policy.mode, planned);
    let plan = if policy.mode == RebalanceMode::Proposal {
        // Nothing else moves while leaving pods are evacuated: neither does an approved plan.
        let held = paused.or_else(|| {
            (!to_do.is_empty()).then_some("shards of leaving pods are being evacuated")
        });
        let round = planning.then_some(proposed.as_slice());
        let decision = proposal::decide(rebalance.as_ref(), round, sample, &desired, held);
        let step =
            proposal::PlanStep::begin(ctx, set, rebalance, decision, timestamp(now_ms)).await?;
        to_do.extend_from_slice(step.moves());
        Some(step)
    } else {
        None
    };
    if !to_do.is_empty() {
        // The sample may be older than another replica's lead (this one paused past its Lease).
        ctx.leading().await?;
    }
    let done = carry_out(&mut state.rebalancer, admin, sample, &to_do, ctx.clock).await;
    record_moves(ctx, set, &done).await;
    ctx.metrics
        .max_over_mean
        .get_or_create(&ResourceLabel { resource: key(set) })
        .set(max_over_mean(sample, &desired));
    let awaiting_approval = match plan {
        Some(step) => step.finish(ctx, &done, timestamp((ctx.clock)())).await?,
        None => None,
    };
    Ok(Round {
        done,
        awaiting_approval,
    })
}

/// Why the last step could not do everything.
#[derive(Debug, Default)]
struct Notes {
    admin_error: Option<String>,
    paused: Option<String>,
}

/// Applies the set's StatefulSet (with `replicas` pods), headless Service and PDB.
async fn apply_children(
    ctx: &Context,
    set: &SequencerShardSet,
    cluster: &CourierCluster,
    replicas: i32,
) -> Result<StatefulSet, Error> {
    let digest = ctx.config_digest(cluster).await?;
    let children = sequencers::build(set, cluster, replicas)?;
    let stateful_set = with_config_digest(children.stateful_set, digest.as_deref());
    let stateful_set = apply(&ctx.client, &stateful_set).await?;
    apply(&ctx.client, &children.service).await?;
    apply(&ctx.client, &children.disruption_budget).await?;
    Ok(stateful_set)
}

/// How long until the next sample is due, or `None` when it is (10 % early is on time).
fn sample_wait(ctx: &Context, set: &SequencerShardSet, now_ms: u64, sample_ms: u64) -> Option<u64> {
    let last = lock(&ctx.rebalancers).get(&key(set))?.last_sample_ms?;
    sample_due_in(last, now_ms, sample_ms)
}

/// How long after `now_ms` a sample `sample_ms` after the one at `last_ms` is due, or `None`
/// when it is. Saturating: a stored interval longer than the CRD allows today must not wrap
/// round to a sample at every wake-up (each one writes a status, which wakes the set again).
fn sample_due_in(last_ms: u64, now_ms: u64, sample_ms: u64) -> Option<u64> {
    let next = last_ms.saturating_add(sample_ms);
    (now_ms.saturating_add(sample_ms / 10) < next).then(|| next - now_ms)
}

/// `duration` in milliseconds, at most `u64::MAX`.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Pods to run: the wanted ones, and any of the `running` ones past them that still holds
/// shards. An owner past the running pods is none of them (the owners are node ids from the
/// store, of any node with the cluster's token): it grows nothing, and its shards are
/// evacuated as a leaving pod's are.
pub fn replicas_to_run(set: &str, wanted: i32, running: i32, sample: &Sample) -> i32 {
    sample
        .shards
        .values()
        .filter_map(|shard| ordinal_of(set, &shard.owner))
        .filter(|ordinal| *ordinal < running)
        .map(|ordinal| ordinal + 1)
        .fold(wanted, i32::max)
}

/// The ordinal of pod `pod` of set `set`, if it is named as one of its pods is (`s-0`, not
/// `s-00`, `s-+0` or `s--1`).
fn ordinal_of(set: &str, pod: &str) -> Option<i32> {
    let ordinal: i32 = pod.strip_prefix(set)?.strip_prefix('-')?.parse().ok()?;
    (ordinal >= 0 && pod_name(set, ordinal) == pod).then_some(ordinal)
}

/// Why moves wait, if they do: some of the `replicas` pods are missing or not ready (starting,
/// or deleted to roll them: a sequencer fails `/readyz` as soon as it drains on SIGTERM, and
/// the shards it releases have no live owner, see [`failover`]).
///
/// Readiness alone decides, never the StatefulSet's revisions: under `OnDelete` Kubernetes does
/// not promote `currentRevision` to `updateRevision` even once every pod runs the new template
/// (kubernetes/kubernetes#73492), so after a template change the two would differ for good and
/// nothing would move again, evacuations of a scale-down included. A ready pod on an older
/// template is not being replaced: only a person deleting it replaces it.
fn pods_not_ready(stateful_set: &StatefulSet, replicas: i32) -> Option<String> {
    let ready = stateful_set
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    (ready < replicas).then(|| format!("{ready}/{replicas} sequencer pods ready"))
}

/// Why moves wait, if they do: shards without a live owner (a sequencer died or was drained,
/// and the others take its shards at their next lease round). A plan made now would see those
/// shards nowhere.
fn failover(sample: &Sample) -> Option<String> {
    (!sample.unowned.is_empty()).then(|| {
        format!(
            "{} shards have no live sequencer (a failover is under way)",
            sample.unowned.len()
        )
    })
}

/// An outbox lag past which moves wait: events have waited this long for fanout.
pub const TROUBLED_OUTBOX_LAG: Duration = Duration::from_secs(30);

/// Why moves wait, if they do: events wait for fanout longer than [`TROUBLED_OUTBOX_LAG`]
/// (the store or the fanout nodes cannot keep up); a hand-off would add to their load.
fn delivery_trouble(sample: &Sample) -> Option<String> {
    (sample.outbox_lag_ms > TROUBLED_OUTBOX_LAG.as_millis() as u64).then(|| {
        format!(
            "events have waited {} s for fanout (outbox lag): the store or fanout cannot keep up",
            sample.outbox_lag_ms / 1000
        )
    })
}

/// Drains a leaving pod that holds no shard any more, so that it takes none before it goes.
async fn drain_leaving(
    ctx: &Context,
    set: &SequencerShardSet,
    admin: &dyn ShardAdmin,
    sample: &Sample,
    pod: &str,
) -> Result<(), Error> {
    if !sample.nodes.contains_key(pod) {
        return Ok(());
    }
    ctx.leading().await?;
    let released = admin.drain(sample, pod).await?;
    ctx.event(
        set,
        EventType::Normal,
        "Drained",
        "Drain",
        format!(
            "{pod} drained before removal ({} shards released)",
            released.len()
        ),
    )
    .await;
    Ok(())
}

/// Drains every pod of a set being deleted; a cluster that is gone or does not answer does not
/// hold the deletion up.
async fn release(set: &SequencerShardSet, ctx: &Context) -> Result<Action, Error> {
    let (name, namespace) = name_and_namespace(set)?;
    ctx.forget_shard_set(&key(set));
    let cluster = match ctx.cluster(&namespace, &set.spec.cluster).await {
        Ok(cluster) => cluster,
        Err(Error::ClusterNotFound(_)) => return Ok(Action::await_change()),
        Err(e) => return Err(e),
    };
    let admin = match admin_of(ctx, set, &cluster, set.spec.sequencers.replicas).await {
        Ok(admin) => admin,
        // Nothing to drain without sequencer pods or their token.
        Err(Error::Render(RenderError::NotFoundationDb { .. }) | Error::Secret { .. }) => {
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    match admin.sample().await {
        Ok(sample) => {
            // Its own pods only: the admin API lists every sequencer of the cluster, and a
            // drained node takes no shard until it restarts.
            let own: Vec<&String> = sample
                .nodes
                .keys()
                .filter(|node| ordinal_of(&name, node).is_some())
                .collect();
            ctx.leading().await?;
            for node in &own {
                if let Err(e) = admin.drain(&sample, node).await {
                    tracing::warn!(%node, error = %e, "draining a sequencer of a deleted set failed");
                }
            }
            ctx.event(
                set,
                EventType::Normal,
                "Released",
                "Drain",
                format!("{} sequencer pods drained before deletion", own.len()),
            )
            .await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "the sequencers of a deleted set do not answer; their leases will lapse")
        }
    }
    Ok(Action::await_change())
}

/// Moves to carry out now and moves to propose: evacuations always go now; load moves go now
/// in `Auto`, are proposed in `Proposal`, and never planned in `Off`.
fn split_by_mode(mode: RebalanceMode, planned: Vec<Move>) -> (Vec<Move>, Vec<Move>) {
    let (evacuations, load): (Vec<Move>, Vec<Move>) = planned
        .into_iter()
        .partition(|m| m.reason == MoveReason::Evacuate);
    match mode {
        RebalanceMode::Auto => (evacuations.into_iter().chain(load).collect(), Vec::new()),
        RebalanceMode::Proposal => (evacuations, load),
        RebalanceMode::Off => (evacuations, Vec::new()),
    }
}

/// A move as recorded in a status, with its `outcome` and the time it ended.
fn recorded_move(m: &Move, outcome: String, at: &str) -> RecordedMove {
    RecordedMove {
        shard: m.shard,
        from: m.from.clone(),
        to: m.to.clone(),
        reason: m.reason.as_str().to_owned(),
        outcome,
        at: at.to_owned(),
    }
}

/// A move's outcome for people: the shard's new epoch, or why it failed.
fn outcome_text(outcome: &Result<u64, AdminError>) -> String {
    match outcome {
        Ok(epoch) => format!("epoch {epoch}"),
        Err(e) => format!("failed: {e}"),
    }
}

/// `interval_seconds` in milliseconds, give or take 10 % (saturating, as [`sample_due_in`]).
fn jittered(interval_seconds: u64) -> u64 {
    let base = interval_seconds.saturating_mul(1000);
    let spread = base / 10;
    (base - spread).saturating_add(rand::rng().random_range(0..=spread * 2))
}

fn take_state(ctx: &Context, set: &SequencerShardSet, now_ms: u64) -> RebalancerState {
    lock(&ctx.rebalancers)
        .remove(&key(set))
        .unwrap_or_else(|| RebalancerState {
            rebalancer: rebalancer_recalling(set, now_ms),
            next_plan_ms: now_ms
                .saturating_add(jittered(set.spec.sequencers.rebalance.interval_seconds)),
            last_sample_ms: None,
            evacuating: false,
        })
}

/// A planner for `set` that has sampled nothing yet, and knows its latest moves from its
/// status: an operator that restarts or takes the lead over from another would otherwise move
/// a shard moved a minute before, through the cooldown the set asks for.
fn rebalancer_recalling(set: &SequencerShardSet, now_ms: u64) -> Rebalancer {
    let mut rebalancer = Rebalancer::new(PlannerPolicy::from(&set.spec.sequencers.rebalance));
    let recent = set.status.iter().flat_map(|status| &status.recent_moves);
    for recorded in recent {
        if let Ok(at) = recorded.at.parse::<Timestamp>() {
            // A time to come (a clock set wrong, a status written by hand) is now: it would
            // hold the shard still until that time and a cooldown after it, for years.
            let finished_ms = u64::try_from(at.as_millisecond()).unwrap_or(0).min(now_ms);
            rebalancer.recall_finished(recorded.shard, finished_ms, now_ms);
        }
    }
    rebalancer
}

fn put_state(ctx: &Context, set: &SequencerShardSet, state: RebalancerState) {
    lock(&ctx.rebalancers).insert(key(set), state);
}

/// An event and a count per move.
async fn record_moves(
    ctx: &Context,
    set: &SequencerShardSet,
    done: &[(Move, Result<u64, AdminError>)],
) {
    for (m, outcome) in done {
        let (type_, reason, note, label) = match outcome {
            Ok(epoch) => (
                EventType::Normal,
                "ShardMoved",
                format!(
                    "shard {} moved {} -> {} ({}), epoch {epoch}",
                    m.shard,
                    m.from,
                    m.to,
                    m.reason.as_str()
                ),
                "done",
            ),
            Err(e) => (
                EventType::Warning,
                "ShardMoveFailed",
                format!(
                    "shard {} {} -> {} ({}) failed: {e}",
                    m.shard,
                    m.from,
                    m.to,
                    m.reason.as_str()
                ),
                "failed",
            ),
        };
        ctx.metrics
            .shard_moves
            .get_or_create(&MoveLabel {
                reason: m.reason.as_str(),
                outcome: label,
            })
            .inc();
        ctx.event(set, type_, reason, "MoveShard", note).await;
    }
}

/// Per-pod loads of the pods in `pods`, and the busiest over the mean.
fn pod_loads(sample: &Sample, pods: &BTreeSet<PodId>) -> Vec<PodLoad> {
    let mut loads: BTreeMap<&str, (u32, f64)> =
        pods.iter().map(|p| (p.as_str(), (0, 0.0))).collect();
    for shard in sample.shards.values() {
        let entry = loads.entry(shard.owner.as_str()).or_default();
        entry.0 += 1;
        entry.1 += shard.load;
    }
    loads
        .into_iter()
        .map(|(pod, (shards, load))| PodLoad {
            pod: pod.to_owned(),
            shards,
            appends_per_sec: load,
        })
        .collect()
}

fn max_over_mean(sample: &Sample, pods: &BTreeSet<PodId>) -> f64 {
    let loads = pod_loads(sample, pods);
    let total: f64 = loads.iter().map(|p| p.appends_per_sec).sum();
    if loads.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let max = loads.iter().map(|p| p.appends_per_sec).fold(0.0, f64::max);
    max / (total / loads.len() as f64)
}

fn status(
    set: &SequencerShardSet,
    stateful_set: &StatefulSet,
    sample: Option<&Result<Sample, AdminError>>,
    round: &Round,
    notes: &Notes,
    now_ms: u64,
) -> SequencerShardSetStatus {
    let now = timestamp(now_ms);
    let done = &round.done;
    let previous = set.status.clone().unwrap_or_default();
    let observed = stateful_set.status.clone().unwrap_or_default();
    let wanted = set.spec.sequencers.replicas;
    let running = stateful_set
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(0);
    let ready = observed.ready_replicas.unwrap_or(0);
    let sample = sample.and_then(|s| s.as_ref().ok());
    let all_pods: BTreeSet<PodId> = sample
        .map(|s| s.nodes.keys().cloned().collect())
        .unwrap_or_default();
    let mut recent_moves = previous.recent_moves.clone();
    let at = now.to_string();
    recent_moves.extend(
        done.iter()
            .map(|(m, outcome)| recorded_move(m, outcome_text(outcome), &at)),
    );
    let excess = recent_moves.len().saturating_sub(RECENT_MOVES);
    recent_moves.drain(..excess);
    let failed = done.iter().filter(|(_, o)| o.is_err()).count();
    let degraded = match (&notes.admin_error, failed) {
        (Some(e), _) => Some((
            "AdminUnavailable",
            format!("the admin API did not answer: {e}"),
        )),
        (None, 0) => None,
        (None, n) => Some(("MovesFailed", format!("{n} shard moves failed; see events"))),
    };
    let rebalancing = if !done.is_empty() {
        (
            true,
            "Moving",
            format!("{} shards moved in the last step", done.len()),
        )
    } else if let Some(why) = &notes.paused {
        (false, "Paused", format!("load moves wait: {why}"))
    } else if let Some(plan) = &round.awaiting_approval {
        (
            false,
            "AwaitingApproval",
            format!(
                "the plan in ShardRebalance {plan} waits: kubectl annotate srb {plan} {REBALANCE_ANNOTATION}=approve"
            ),
        )
    } else {
        (false, "Balanced", "no move needed".to_owned())
    };
    // Pods on the current template (`updatedReplicas` counts them right under `OnDelete`, where
    // `currentRevision` is never promoted); a status of the generation before counts those of
    // the template before.
    let seen = observed.observed_generation >= stateful_set.metadata.generation;
    let updated = match seen {
        true => observed.updated_replicas.unwrap_or(0),
        false => 0,
    };
    let pods_running = format!("{running} pods running for {wanted} wanted");
    let progress = if running > wanted {
        ("Evacuating", pods_running)
    } else if ready < running {
        ("RollingOut", pods_running)
    } else if updated < running {
        (
            "OlderTemplate",
            format!(
                "{updated}/{running} pods on the current template: under OnDelete, delete the others to roll them"
            ),
        )
    } else {
        ("Settled", pods_running)
    };
    let pods_ready = format!("{ready}/{wanted} sequencer pods ready");
    let (is_ready, ready_reason, ready_message) = match (&notes.admin_error, ready >= wanted) {
        (_, false) => (false, "PodsNotReady", pods_ready),
        (Some(e), true) => (
            false,
            "AdminUnavailable",
            format!("{pods_ready}, but the admin API did not answer: {e}"),
        ),
        (None, true) => (true, "Available", pods_ready),
    };
    let conditions = Conditions::new(&previous.conditions, set.metadata.generation, now)
        .set(ConditionType::Ready, is_ready, ready_reason, &ready_message)
        .set(
            ConditionType::Progressing,
            running != wanted || ready < running || updated < running,
            progress.0,
            &progress.1,
        )
        .set(
            ConditionType::Degraded,
            degraded.is_some(),
            degraded.as_ref().map_or("Healthy", |d| d.0),
            degraded
                .as_ref()
                .map_or("every pod answers", |d| d.1.as_str()),
        )
        .set(
            ConditionType::Rebalancing,
            rebalancing.0,
            rebalancing.1,
            &rebalancing.2,
        )
        .into_vec();
    SequencerShardSetStatus {
        observed_generation: set.metadata.generation,
        replicas: observed.replicas,
        ready_replicas: ready,
        max_over_mean: sample.map(|s| max_over_mean(s, &all_pods)),
        pods: sample
            .map(|s| pod_loads(s, &all_pods))
            .unwrap_or(previous.pods),
        recent_moves,
        conditions,
        unreadable: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rebalance::ObservedShard;

    fn sample(owners: &[&str]) -> Sample {
        Sample {
            nodes: owners
                .iter()
                .map(|o| (o.to_string(), format!("{o}:7500")))
                .collect(),
            shards: owners
                .iter()
                .enumerate()
                .map(|(shard, owner)| {
                    (
                        shard as u32,
                        ObservedShard {
                            owner: owner.to_string(),
                            load: 1.0,
                        },
                    )
                })
                .collect(),
            unowned: Default::default(),
            outbox_lag_ms: 0,
            draining: Default::default(),
        }
    }

    fn planned(shard: u32, from: &str, to: &str, reason: MoveReason) -> Move {
        Move {
            shard,
            from: from.into(),
            to: to.into(),
            reason,
        }
    }

    #[test]
    fn pods_past_the_wanted_ones_keep_running_while_they_hold_shards() {
        let holding = sample(&["s-0", "s-0", "s-3"]);
        assert_eq!(replicas_to_run("s", 2, 4, &holding), 4);
        let evacuated = sample(&["s-0", "s-1"]);
        assert_eq!(replicas_to_run("s", 2, 4, &evacuated), 2);
        assert_eq!(ordinal_of("s", "s-12"), Some(12));
        assert_eq!(ordinal_of("s", "other-1"), None);
    }

    /// A shard's owner is a node id from the store: one that only looks like a pod of the set
    /// beyond those running (a node started by hand, `s-500`; `s-2147483647`, whose next
    /// ordinal overflowed) is no pod to keep, and must not grow the StatefulSet to its
    /// ordinal; its shards are evacuated like any leaving node's.
    #[test]
    fn an_owner_that_is_no_running_pod_of_the_set_grows_nothing() {
        let strays = sample(&["s-0", "s-500", "s-2147483647", "s-+1", "s-01", "s--1"]);
        assert_eq!(replicas_to_run("s", 2, 3, &strays), 2);
        for stray in ["s-+1", "s-01", "s--1", "s-"] {
            assert_eq!(ordinal_of("s", stray), None, "{stray}");
        }
    }

    fn stateful_set(ready: i32, current: &str, update: &str) -> StatefulSet {
        StatefulSet {
            status: Some(k8s_openapi::api::apps::v1::StatefulSetStatus {
                replicas: 3,
                ready_replicas: Some(ready),
                current_revision: Some(current.to_owned()),
                update_revision: Some(update.to_owned()),
                ..Default::default()
            }),
            ..StatefulSet::default()
        }
    }

    /// A set of three pods at generation 2.
    fn three_pod_set() -> SequencerShardSet {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "courier.dev/v1alpha1",
            "kind": "SequencerShardSet",
            "metadata": {"name": "s", "namespace": "chat", "generation": 2},
            "spec": {"cluster": "prod", "shards": 8, "replicas": 3},
        }))
        .unwrap()
    }

    #[test]
    fn moves_wait_for_missing_or_unready_pods_not_for_an_older_template() {
        let why = pods_not_ready(&stateful_set(2, "r1", "r1"), 3).expect("paused");
        assert_eq!(why, "2/3 sequencer pods ready");
        assert_eq!(pods_not_ready(&stateful_set(3, "r1", "r1"), 3), None);
        // OnDelete: every pod ready, some or all on the new template, `currentRevision` stale.
        assert_eq!(pods_not_ready(&stateful_set(3, "r1", "r2"), 3), None);
        assert_eq!(
            pods_not_ready(&StatefulSet::default(), 1).as_deref(),
            Some("0/1 sequencer pods ready"),
            "a StatefulSet without a status yet has no ready pod"
        );
    }

    #[test]
    fn moves_wait_while_shards_have_no_live_owner() {
        let mut failing_over = sample(&["s-0", "s-1"]);
        assert_eq!(failover(&failing_over), None);
        failing_over.unowned = [2, 3].into();
        let why = failover(&failing_over).expect("paused");
        assert!(why.starts_with("2 shards have no live sequencer"), "{why}");
    }

    #[test]
    fn moves_wait_while_events_wait_long_for_fanout() {
        let mut troubled = sample(&["s-0", "s-1"]);
        troubled.outbox_lag_ms = TROUBLED_OUTBOX_LAG.as_millis() as u64;
        assert_eq!(
            delivery_trouble(&troubled),
            None,
            "at the bound, moves go on"
        );
        troubled.outbox_lag_ms = 45_000;
        let why = delivery_trouble(&troubled).expect("paused");
        assert!(
            why.starts_with("events have waited 45 s for fanout"),
            "{why}"
        );
    }

    /// Pods ready but the admin API not answering: the set is not Ready, and its `Ready`
    /// condition says why rather than `Available` (a condition false for the reason that
    /// everything is available sent whoever read it to the pods, which were fine).
    #[test]
    fn a_set_whose_admin_api_does_not_answer_is_not_ready_and_says_why() {
        let set = three_pod_set();
        let mut running = stateful_set(3, "r1", "r1");
        running.spec = Some(Default::default());
        running.spec.as_mut().unwrap().replicas = Some(3);
        let unanswered = Err(AdminError::UnknownNode("s-0".into()));
        let notes = Notes {
            admin_error: Some(unanswered.as_ref().unwrap_err().to_string()),
            paused: None,
        };
        let status = status(
            &set,
            &running,
            Some(&unanswered),
            &Round::default(),
            &notes,
            1_000_000,
        );
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "AdminUnavailable")
        );
        assert_eq!(
            ready.message,
            "3/3 sequencer pods ready, but the admin API did not answer: node s-0 is not a live sequencer node"
        );
    }

    /// After a template change (a new image) the pods take it only when deleted (`OnDelete`):
    /// until each was, the set is `Progressing` and says how many run the current template (it
    /// said `Settled`, and its cluster too, while the sequencers ran the old image for good).
    #[test]
    fn a_set_whose_pods_run_an_older_template_is_progressing_until_each_is_deleted() {
        let set = three_pod_set();
        let progressing = |observed_generation: i64, updated: i32| {
            let mut running = stateful_set(3, "r1", "r2");
            running.metadata.generation = Some(7);
            running.spec = Some(Default::default());
            running.spec.as_mut().unwrap().replicas = Some(3);
            let status = running.status.as_mut().unwrap();
            status.observed_generation = Some(observed_generation);
            status.updated_replicas = Some(updated);
            let status = status_of(&set, &running);
            let condition = status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Progressing")
                .unwrap();
            (condition.status, condition.reason, condition.message)
        };
        let older = progressing(7, 1);
        assert_eq!(
            (older.0.as_str(), older.1.as_str()),
            ("True", "OlderTemplate")
        );
        assert_eq!(
            older.2,
            "1/3 pods on the current template: under OnDelete, delete the others to roll them"
        );
        let unseen = progressing(6, 3);
        assert_eq!(
            (unseen.0.as_str(), unseen.1.as_str()),
            ("True", "OlderTemplate"),
            "a status of the generation before counts the pods of the template before"
        );
        let rolled = progressing(7, 3);
        assert_eq!((rolled.0.as_str(), rolled.1.as_str()), ("False", "Settled"));
    }

    /// The status of `set` sampled with every pod answering, no move made.
    fn status_of(set: &SequencerShardSet, running: &StatefulSet) -> SequencerShardSetStatus {
        let sampled = Ok(sample(&["s-0", "s-1", "s-2"]));
        let notes = Notes::default();
        status(
            set,
            running,
            Some(&sampled),
            &Round::default(),
            &notes,
            1_000_000,
        )
    }

    /// The cooldowns of moves a previous leader made survive in the status.
    #[test]
    fn a_new_planner_recalls_the_cooldowns_of_the_moves_in_the_status() {
        let mut set: SequencerShardSet = serde_json::from_value(serde_json::json!({
            "apiVersion": "courier.dev/v1alpha1",
            "kind": "SequencerShardSet",
            "metadata": {"name": "s", "namespace": "chat"},
            "spec": {"cluster": "prod", "shards": 8, "replicas": 2},
        }))
        .unwrap();
        let moved = |shard, at: &str| RecordedMove {
            shard,
            from: "s-0".into(),
            to: "s-1".into(),
            reason: "Relieve".into(),
            outcome: "epoch 2".into(),
            at: at.into(),
        };
        set.status = Some(SequencerShardSetStatus {
            recent_moves: vec![
                moved(1, "2026-12-06T10:00:00Z"),
                moved(2, "2026-12-06T09:00:00Z"),
                moved(3, "not a time"),
                moved(4, "9999-01-01T00:00:00Z"),
            ],
            ..SequencerShardSetStatus::default()
        });
        let cooldown_ms = set.spec.sequencers.rebalance.cooldown_seconds * 1000;
        let moved_ms = 1_796_551_200_000; // 2026-12-06T10:00:00Z
        let now_ms = moved_ms + 60_000;
        assert!(
            cooldown_ms > 60_000,
            "the default cooldown is longer than a minute"
        );
        let rebalancer = rebalancer_recalling(&set, now_ms);
        assert!(!rebalancer.movable(1, now_ms), "moved a minute ago");
        assert!(rebalancer.movable(1, moved_ms + cooldown_ms));
        assert!(rebalancer.movable(2, now_ms), "moved an hour ago");
        assert!(
            rebalancer.movable(3, now_ms),
            "an unreadable time is no cooldown"
        );
        assert!(!rebalancer.movable(4, now_ms), "a time to come is now");
        assert!(
            rebalancer.movable(4, now_ms + cooldown_ms),
            "and cools down for one cooldown, not until the year 9999"
        );
    }

    /// Intervals as long as a stored spec may hold (older than the CRD's maxima) neither
    /// panic nor wrap round to a plan or a sample at every wake-up.
    #[test]
    fn the_longest_intervals_saturate_rather_than_wrap() {
        let day_ms = 86_400_000;
        let jitter = jittered(86_400);
        assert!(
            (day_ms * 9 / 10..=day_ms * 11 / 10).contains(&jitter),
            "{jitter}"
        );
        assert!(jittered(u64::MAX) >= u64::MAX / 10 * 9);
        let last_ms = 1_000_000;
        assert_eq!(
            sample_due_in(last_ms, last_ms + 1, u64::MAX),
            Some(u64::MAX - last_ms - 1)
        );
        assert_eq!(sample_due_in(last_ms, last_ms + 15_000, 15_000), None);
        assert_eq!(
            sample_due_in(last_ms, last_ms + 5_000, 15_000),
            Some(10_000)
        );
        assert_eq!(millis(Duration::from_secs(u64::MAX)), u64::MAX);
        assert_eq!(millis(EVACUATION_PACE), 1_000);
    }

    #[test]
    fn evacuations_run_in_every_mode_and_load_moves_only_in_auto() {
        let moves = vec![
            planned(1, "a", "b", MoveReason::Evacuate),
            planned(2, "b", "c", MoveReason::Relieve),
        ];
        let (now, proposed) = split_by_mode(RebalanceMode::Auto, moves.clone());
        assert_eq!((now.len(), proposed.len()), (2, 0));
        let (now, proposed) = split_by_mode(RebalanceMode::Proposal, moves.clone());
        assert_eq!((now[0].shard, proposed[0].shard), (1, 2));
        let (now, proposed) = split_by_mode(RebalanceMode::Off, moves);
        assert_eq!((now.len(), proposed.len()), (1, 0));
    }
}
