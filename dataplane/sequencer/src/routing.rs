//! [`RoutedSequencer`]: the [`Sequencer`] a chat node uses in a cluster. Each append goes to
//! the node that owns its conversation's shard: this node's own [`LocalSequencer`] when it
//! owns it, otherwise that node's sequencer over gRPC ([`RemoteSequencer`]).
//!
//! **Routes.** The owner of a shard is read from its ownership record in the store, the node's
//! address from the node registry, and the route is cached per shard. A route is forgotten
//! when an append through it fails because the shard moved or the node could not be reached;
//! the next append reads the owner again.
//!
//! **Order.** `submit` keeps the order of calls within a conversation, as the [`Sequencer`]
//! contract asks: with a cached route the append is queued on it before `submit` returns;
//! while a shard's route is being read, its appends wait in a queue of their own and are
//! handed to the route in arrival order once it is known.
//!
//! **Commits it sees.** An append answered by another node was committed there, and that
//! node's fanout is not this node's: the router tells this node's [`CommitListener`] (its
//! fanout and notifier) of every new event it was answered, as the local sequencer does.
//!
//! **Failure policy.** Nothing is retried here: an append refused because the shard moved, or
//! whose node was unreachable, reaches the client as `unavailable`, and the client's retry with
//! the same `client_msg_id` goes to the new owner (the idempotency record answers it if the
//! first attempt did land). A shard with no live owner (between a node's death and the end of
//! its lease) answers `ShardMoved` until another node takes it.

use crate::LocalSequencer;
use crate::lock;
use courier_core::clock::now_ms;
use courier_core::sequencing::{
    CommitListener, PendingAppend, PendingTrim, Sequencer, SequencerError,
};
use courier_rpc::{ClusterToken, RemoteSequencer};
use courier_store::ownership::Duty;
use courier_store::{Append, AppendOutcome, MediaReference, MessageStore, StoreError};
use foldhash::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Appends waiting for one shard's route, in arrival order.
type Waiting = Vec<(
    Append,
    oneshot::Sender<Result<AppendOutcome, SequencerError>>,
)>;

/// Most appends that wait for one shard's route; later ones are refused as overloaded.
const MAX_WAITING: usize = 4096;

enum Route {
    Known(Arc<dyn Sequencer>),
    Reading(Waiting),
}

/// Routes appends to their shard's owner (see the module documentation). Cheap to clone.
#[derive(Clone)]
pub struct RoutedSequencer {
    router: Arc<Router>,
}

struct Router {
    store: MessageStore,
    /// This node's id and sequencer, when it runs the sequencer role.
    local: Option<(String, Arc<LocalSequencer>)>,
    token: ClusterToken,
    /// Told of each new event another node committed for this node's appends.
    listener: Arc<dyn CommitListener>,
    routes: Mutex<HashMap<u32, Route>>,
    /// Sequencer nodes by address (one append stream each).
    remotes: Mutex<HashMap<String, Arc<RemoteSequencer>>>,
}

impl RoutedSequencer {
    /// Routes by the ownership records of `store`; `local` is this node's id and sequencer
    /// when it runs the sequencer role; `token` authenticates calls to the other nodes;
    /// `listener` is told of the events other nodes committed for this node.
    pub fn new(
        store: MessageStore,
        local: Option<(String, Arc<LocalSequencer>)>,
        token: ClusterToken,
        listener: Arc<dyn CommitListener>,
    ) -> Self {
        Self {
            router: Arc::new(Router {
                store,
                local,
                token,
                listener,
                routes: Mutex::default(),
                remotes: Mutex::default(),
            }),
        }
    }
}

impl Router {
    /// Where appends of `shard` go now, read from the store.
    async fn read_route(&self, shard: u32) -> Result<Arc<dyn Sequencer>, SequencerError> {
        let owner = self
            .store
            .shard_owner(Duty::Sequencing, shard)
            .await?
            .filter(|owner| owner.is_live(now_ms()))
            .ok_or(SequencerError::ShardMoved)?;
        if let Some((node, local)) = &self.local
            && *node == owner.node
        {
            return Ok(local.clone());
        }
        let nodes = self.store.nodes().await?;
        let (_, record) = nodes
            .into_iter()
            .find(|(id, _)| *id == owner.node)
            .ok_or(SequencerError::ShardMoved)?;
        let address = format!("http://{}", record.address);
        let mut remotes = lock(&self.remotes);
        if let Some(remote) = remotes.get(&address) {
            return Ok(remote.clone());
        }
        let remote = Arc::new(RemoteSequencer::new(&address, self.token.clone())?);
        remotes.insert(address, remote.clone());
        Ok(remote)
    }

    /// Reads `shard`'s route, then hands it what waited, in order.
    async fn resolve(self: Arc<Self>, shard: u32) {
        let route = self.read_route(shard).await;
        let waiting = {
            let mut routes = lock(&self.routes);
            let waiting = match routes.remove(&shard) {
                Some(Route::Reading(waiting)) => waiting,
                Some(known @ Route::Known(_)) => {
                    routes.insert(shard, known);
                    Vec::new()
                }
                None => Vec::new(),
            };
            if let Ok(route) = &route {
                routes.insert(shard, Route::Known(route.clone()));
            }
            // Queued on the route while the lock is held: no later append can overtake them.
            waiting
                .into_iter()
                .map(|(append, answer)| {
                    let pending = match &route {
                        Ok(route) => Ok(route.submit(append)),
                        Err(e) => Err(e.clone()),
                    };
                    (pending, answer)
                })
                .collect::<Vec<_>>()
        };
        for (pending, answer) in waiting {
            let this = self.clone();
            let route = route.as_ref().ok().cloned();
            tokio::spawn(async move {
                let result = match pending {
                    Ok(pending) => pending.await,
                    Err(e) => Err(e),
                };
                if let Some(route) = route {
                    this.answered(shard, &route, &result);
                }
                let _ = answer.send(result);
            });
        }
    }

    /// After an append through `route`: tells the listener of a new event another node
    /// committed, forgets a stale route.
    fn answered(
        &self,
        shard: u32,
        route: &Arc<dyn Sequencer>,
        result: &Result<AppendOutcome, SequencerError>,
    ) {
        if let Ok(outcome) = result
            && !outcome.duplicate
            && !self.is_local(route)
        {
            self.listener.committed(shard, 1);
        }
        self.forget_if_stale(shard, route, result);
    }

    fn is_local(&self, route: &Arc<dyn Sequencer>) -> bool {
        self.local
            .as_ref()
            .is_some_and(|(_, local)| std::ptr::addr_eq(Arc::as_ptr(route), Arc::as_ptr(local)))
    }

    /// Forgets `route` for `shard` when `result` says it is stale.
    fn forget_if_stale<T>(
        &self,
        shard: u32,
        route: &Arc<dyn Sequencer>,
        result: &Result<T, SequencerError>,
    ) {
        let stale = matches!(
            result,
            Err(SequencerError::ShardMoved
                | SequencerError::Store(StoreError::MaybeCommitted | StoreError::Engine(_)))
        );
        if !stale {
            return;
        }
        let mut routes = lock(&self.routes);
        if let Some(Route::Known(known)) = routes.get(&shard)
            && Arc::ptr_eq(known, route)
        {
            routes.remove(&shard);
        }
    }
}

impl Sequencer for RoutedSequencer {
    fn submit(&self, append: Append) -> PendingAppend {
        let router = &self.router;
        let shard = router.store.shard_of(&append.conversation_id);
        let mut routes = lock(&router.routes);
        match routes.get_mut(&shard) {
            Some(Route::Known(route)) => {
                let route = route.clone();
                let pending = route.submit(append);
                drop(routes);
                let this = router.clone();
                Box::pin(async move {
                    let result = pending.await;
                    this.answered(shard, &route, &result);
                    result
                })
            }
            Some(Route::Reading(waiting)) if waiting.len() >= MAX_WAITING => {
                Box::pin(async { Err(SequencerError::Overloaded) })
            }
            Some(Route::Reading(waiting)) => {
                let (answer, answered) = oneshot::channel();
                waiting.push((append, answer));
                Box::pin(async move { answered.await.unwrap_or(Err(SequencerError::ShardMoved)) })
            }
            None => {
                let (answer, answered) = oneshot::channel();
                routes.insert(shard, Route::Reading(vec![(append, answer)]));
                drop(routes);
                tokio::spawn(router.clone().resolve(shard));
                Box::pin(async move { answered.await.unwrap_or(Err(SequencerError::ShardMoved)) })
            }
        }
    }

    fn trim(
        &self,
        conversation_id: &str,
        new_floor: u64,
        media: Vec<MediaReference>,
    ) -> PendingTrim {
        let shard = self.router.store.shard_of(conversation_id);
        let this = self.router.clone();
        let conversation_id = conversation_id.to_owned();
        Box::pin(async move {
            let route = this.read_route(shard).await?;
            let result = route.trim(&conversation_id, new_floor, media).await;
            this.forget_if_stale(shard, &route, &result);
            result
        })
    }
}
