//! A FoundationDB cluster's pools: the `GatewayPool` and the `SequencerShardSet` it owns,
//! named `<cluster>-gateways` and `<cluster>-sequencers`, with the settings of its spec.

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
