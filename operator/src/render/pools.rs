//! A FoundationDB cluster's pools: the `GatewayPool` and the `SequencerShardSet` it owns,
//! named `<cluster>-gateways` and `<cluster>-sequencers`, with the settings of its spec. Those
//! are the only ones a cluster runs: a pool or shard set of another name that names it is
//! refused ([`own_gateway_pool`], [`own_shard_set`]).

use kube::ResourceExt;

use super::pod::Component;
use super::{RenderError, child_meta, name_and_namespace, owner_reference};
use crate::crd::{
    CourierCluster, GatewayPool, GatewayPoolSpec, SequencerShardSet, SequencerShardSetSpec,
};

/// The pools of a FoundationDB cluster.
#[derive(Debug, Clone)]
pub struct Pools {
    /// The gateway pods.
    pub gateways: GatewayPool,
    /// The sequencer pods.
    pub sequencers: SequencerShardSet,
}

/// The name of `cluster`'s gateway pool.
pub fn gateway_pool_name(cluster: &str) -> String {
    format!("{cluster}-gateways")
}

/// The name of `cluster`'s shard set.
pub fn shard_set_name(cluster: &str) -> String {
    format!("{cluster}-sequencers")
}

/// Refuses `pool` unless it is its cluster's own ([`gateway_pool_name`]): see
/// [`RenderError::NotTheClustersOwn`].
pub fn own_gateway_pool(pool: &GatewayPool) -> Result<(), RenderError> {
    let own = gateway_pool_name(&pool.spec.cluster);
    refuse_unless_own("GatewayPool", pool.name_any(), &pool.spec.cluster, own)
}

/// Refuses `set` unless it is its cluster's own ([`shard_set_name`]): see
/// [`RenderError::NotTheClustersOwn`].
pub fn own_shard_set(set: &SequencerShardSet) -> Result<(), RenderError> {
    let own = shard_set_name(&set.spec.cluster);
    refuse_unless_own("SequencerShardSet", set.name_any(), &set.spec.cluster, own)
}

fn refuse_unless_own(
    kind: &'static str,
    name: String,
    cluster: &str,
    own: String,
) -> Result<(), RenderError> {
    match name == own {
        true => Ok(()),
        false => Err(RenderError::NotTheClustersOwn {
            kind,
            name,
            cluster: cluster.to_owned(),
            own,
        }),
    }
}

/// The pools `cluster` owns.
pub fn build(cluster: &CourierCluster) -> Result<Pools, RenderError> {
    let (name, namespace) = name_and_namespace(cluster)?;
    let owner = owner_reference(cluster)?;
    let gateways = GatewayPool {
        metadata: child_meta(
            &gateway_pool_name(&name),
            &namespace,
            &name,
            Component::Gateway,
            owner.clone(),
        ),
        spec: GatewayPoolSpec {
            cluster: name.clone(),
            pool: cluster.spec.gateways.clone(),
        },
        status: None,
    };
    let sequencers = SequencerShardSet {
        metadata: child_meta(
            &shard_set_name(&name),
            &namespace,
            &name,
            Component::Sequencer,
            owner,
        ),
        spec: SequencerShardSetSpec {
            cluster: name.clone(),
            shards: cluster.spec.shards,
            sequencers: cluster.spec.sequencers.clone(),
        },
        status: None,
    };
    Ok(Pools {
        gateways,
        sequencers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::fixtures::foundation_db_cluster;
    use crate::render::{gateways, sequencers};

    /// The pools a cluster creates are its own; one of another name naming it renders no pod.
    #[test]
    fn only_the_clusters_own_pools_render_pods() {
        let cluster = foundation_db_cluster(None);
        let mut own = build(&cluster).unwrap();
        // As read from the API server: their children's owner references need a uid.
        own.gateways.metadata.uid = Some("uid-gateways".into());
        own.sequencers.metadata.uid = Some("uid-sequencers".into());
        assert!(gateways::build(&own.gateways, &cluster, 2).is_ok());
        assert!(sequencers::build(&own.sequencers, &cluster, 3).is_ok());
        let mut pool = own.gateways.clone();
        pool.metadata.name = Some("prod-gateways-b".into());
        let mut set = own.sequencers.clone();
        set.metadata.name = Some("prod-sequencers-canary".into());
        assert!(matches!(
            gateways::build(&pool, &cluster, 2),
            Err(RenderError::NotTheClustersOwn { own, .. }) if own == "prod-gateways"
        ));
        assert!(matches!(
            sequencers::build(&set, &cluster, 3),
            Err(RenderError::NotTheClustersOwn { own, .. }) if own == "prod-sequencers"
        ));
    }
}
