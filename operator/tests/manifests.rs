//! The CourierCluster the kind suite applies is one the types accept, with no key they would
//! drop (the API server, with these CRDs, prunes unknown fields silently).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use courier_operator::crd::CourierCluster;
use serde_json::Value;

/// Every key path of `value` (objects only; arrays by index).
fn paths(value: &Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                let path = format!("{prefix}.{key}");
                out.push(path.clone());
                paths(child, &path, out);
            }
        }
        Value::Array(list) => {
            for (i, child) in list.iter().enumerate() {
                paths(child, &format!("{prefix}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_e2e_cluster_manifest_matches_the_types_key_for_key() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/cluster.yaml");
    let text = std::fs::read_to_string(file).unwrap();
    let written: Value = serde_saphyr::from_str(&text).unwrap();
    let parsed: CourierCluster =
        serde_json::from_value(written.clone()).expect("a valid CourierCluster");
    assert!(parsed.spec.storage.foundation_db.is_some());
    let round_trip = serde_json::to_value(&parsed).unwrap();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    paths(&written, "", &mut before);
    paths(&round_trip, "", &mut after);
    let dropped: Vec<&String> = before.iter().filter(|p| !after.contains(p)).collect();
    assert!(
        dropped.is_empty(),
        "keys the types do not know: {dropped:?}"
    );
}

/// The chart's sample cluster takes a volume size the CRD takes, and only such: its values
/// schema checks `sampleCluster.volumeSize` with the CRD's own pattern (it lacked the decimal
/// suffixes, `10G`, that the CRD accepts).
#[test]
fn the_charts_sample_volume_size_is_checked_as_the_crd_checks_it() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(CourierCluster::crd()).unwrap();
    let size = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/storage/properties/embedded/properties/size/pattern";
    let crd_pattern = crd.pointer(size).expect("the CRD's size pattern");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/courier/values.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let chart_pattern = schema
        .pointer("/properties/sampleCluster/properties/volumeSize/pattern")
        .expect("the chart's volumeSize pattern");
    assert_eq!(chart_pattern, crd_pattern);
}

/// The operator's own rules in the chart (the first document of `rbac.yaml`: the ClusterRole,
/// or the Role of `watchNamespace`), as `group/resource` and its verbs.
fn operator_rules() -> BTreeMap<String, BTreeSet<String>> {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/courier/templates/rbac.yaml");
    let text = std::fs::read_to_string(file).unwrap();
    let start = text.find("\nrules:\n").expect("the operator's rules") + "\nrules:\n".len();
    let end = start + text[start..].find("\n---").expect("the end of the rules");
    let rules: Vec<Value> = serde_saphyr::from_str(&text[start..end]).unwrap();
    let mut granted = BTreeMap::<String, BTreeSet<String>>::new();
    for rule in rules {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                granted
                    .entry(format!("{group}/{resource}"))
                    .or_default()
                    .extend(strings("verbs"));
            }
        }
    }
    granted
}

/// The chart grants the operator what it calls and nothing more: a verb it never uses is
/// power an attacker holding its token (or a bug) has for nothing. What it calls, and where:
/// clusters are watched and read (the controller, `Context::cluster`) and only their status is
/// written; the pools, shard sets and plans it renders are watched and applied (server-side
/// apply creates: `create` and `patch`); Services and budgets are applied, never read nor
/// watched; ConfigMaps are read (a cluster's `configMap`), watched and applied (the partition
/// table); statuses are applied (`patch`), never read on their own; pods are listed and
/// marked (`patch`), Secrets read, events written.
#[test]
fn the_chart_grants_the_operator_what_it_calls_and_no_more() {
    let read = ["get", "list", "watch"];
    let rendered = ["get", "list", "watch", "create", "patch"];
    let applied = ["create", "patch"];
    let expected: BTreeMap<String, BTreeSet<String>> = [
        ("courier.dev/courierclusters", &read[..]),
        ("courier.dev/gatewaypools", &rendered[..]),
        ("courier.dev/sequencershardsets", &rendered[..]),
        ("courier.dev/shardrebalances", &rendered[..]),
        ("courier.dev/courierclusters/status", &["patch"][..]),
        ("courier.dev/gatewaypools/status", &["patch"][..]),
        ("courier.dev/sequencershardsets/status", &["patch"][..]),
        ("courier.dev/shardrebalances/status", &["patch"][..]),
        ("apps/statefulsets", &rendered[..]),
        ("apps/deployments", &rendered[..]),
        ("/configmaps", &rendered[..]),
        ("/services", &applied[..]),
        ("policy/poddisruptionbudgets", &applied[..]),
        ("/pods", &["list", "patch"][..]),
        ("/secrets", &["get"][..]),
        ("events.k8s.io/events", &applied[..]),
    ]
    .into_iter()
    .map(|(resource, verbs)| {
        let verbs = verbs.iter().map(|v| (*v).to_owned()).collect();
        (resource.to_owned(), verbs)
    })
    .collect();
    assert_eq!(operator_rules(), expected);
}
