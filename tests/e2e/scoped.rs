//! The operator confined to one namespace (`watchNamespace`, docs/operator.md "One namespace
//! only") on a real cluster, with the permissions the chart grants and no others: the second
//! phase of `tests/e2e/run.sh`, which uninstalls the cluster-wide release and installs a
//! release of its own name with `--set watchNamespace=...`. Runs only with `COURIER_E2E=1`
//! and `COURIER_E2E_OTHER_NAMESPACE` set (run.sh sets both for this phase alone: beside a
//! cluster-wide operator the checks would fail).
//!
//! [`E2e::namespace`] is the watched namespace here, [`E2e::cluster`] the embedded
//! CourierCluster the test applies there (and, the same spec, in the other namespace), and
//! [`E2e::gateway`] the NodePort [`NODE_PORT`] its Service takes (`spec.gateways.nodePort`).

use std::collections::BTreeSet;
use std::sync::Arc;

use courier_e2e::{Conversation, E2e, eventually, pod_is_ready};
use courier_operator::crd::CourierCluster;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding, Subject};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};

/// The NodePort the watched cluster's Service takes (`spec.gateways.nodePort`); `kind.yaml`
/// maps it to the host's 127.0.0.1:30081.
const NODE_PORT: i32 = 30081;

/// What the controllers list and watch (group, resource): `operator/src/controllers/mod.rs`.
const WATCHED: [(&str, &str); 7] = [
    ("courier.dev", "courierclusters"),
    ("courier.dev", "gatewaypools"),
    ("courier.dev", "sequencershardsets"),
    ("courier.dev", "shardrebalances"),
    ("apps", "statefulsets"),
    ("apps", "deployments"),
    ("", "configmaps"),
];

/// The field manager of what the test applies.
const MANAGER: &str = "courier-e2e";

/// The scoped install of `run.sh`'s second phase, beside [`E2e`].
#[derive(Debug, Clone)]
struct Scope {
    /// A namespace the operator does not watch.
    other_namespace: String,
    /// The release's namespace: the operator's Deployment, ServiceAccount and Lease.
    operator_namespace: String,
    /// The operator's ServiceAccount (and Deployment): the release's full name.
    operator_account: String,
}

impl Scope {
    /// The scoped install, or `None` (and a note) outside `run.sh`'s second phase.
    fn from_env() -> Option<Scope> {
        let Ok(other_namespace) = std::env::var("COURIER_E2E_OTHER_NAMESPACE") else {
            eprintln!(
                "skipped: the scoped-operator test runs in the second phase of tests/e2e/run.sh \
                 (COURIER_E2E_OTHER_NAMESPACE)"
            );
            return None;
        };
        let var =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
        Some(Scope {
            other_namespace,
            operator_namespace: var("COURIER_E2E_OPERATOR_NAMESPACE", "courier-system"),
            operator_account: var("COURIER_E2E_OPERATOR_ACCOUNT", "courier-team-a"),
        })
    }

    /// The user name the API server gives the operator's pods.
    fn user(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.operator_namespace, self.operator_account
        )
    }

    /// The groups of that user, so that what is bound to them counts too.
    fn groups(&self) -> Vec<String> {
        vec![
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", self.operator_namespace),
            "system:authenticated".to_owned(),
        ]
    }

    /// A client that is the operator's ServiceAccount (impersonation by the suite's admin
    /// kubeconfig): what it may do is what the operator may do.
    async fn operator_client(&self) -> kube::Client {
        let mut config = kube::Config::infer()
            .await
            .expect("a kubeconfig for the kind cluster");
        config.auth_info.impersonate = Some(self.user());
        config.auth_info.impersonate_groups = Some(self.groups());
        kube::Client::try_from(config).expect("an impersonating client")
    }

    /// Whether the operator's ServiceAccount binds to a role in this binding.
    fn is_bound_in(&self, subjects: Option<&Vec<Subject>>) -> bool {
        subjects.is_some_and(|subjects| {
            subjects.iter().any(|s| {
                s.kind == "ServiceAccount"
                    && s.name == self.operator_account
                    && s.namespace.as_deref() == Some(self.operator_namespace.as_str())
            })
        })
    }
}

/// The smallest CourierCluster: one `courier serve` pod on the embedded store, the client
/// token secret `courier-jwt` that `run.sh` creates in both namespaces, and its Service on
/// the node port `node_port` if given (a node port is the whole cluster's: the other
/// namespace's copy, never reconciled, asks for none).
fn embedded_cluster(name: &str, node_port: Option<i32>) -> serde_json::Value {
    let mut cluster = serde_json::json!({
        "apiVersion": "courier.dev/v1alpha1",
        "kind": "CourierCluster",
        "metadata": { "name": name },
        "spec": {
            "image": "courier:e2e",
            "storage": { "embedded": { "size": "1Gi" } },
            "jwtSecret": { "name": "courier-jwt", "key": "secret" },
        },
    });
    if let Some(node_port) = node_port {
        cluster["spec"]["gateways"] =
            serde_json::json!({ "serviceType": "NodePort", "nodePort": node_port });
    }
    cluster
}

fn is_ready(cluster: &CourierCluster) -> bool {
    cluster.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Expects a 403 Forbidden from the API server.
fn forbidden<T>(what: &str, result: kube::Result<T>) {
    match result {
        Err(kube::Error::Api(status)) if status.is_forbidden() => {}
        Err(e) => panic!("{what}: expected 403 Forbidden, got {e}"),
        Ok(_) => panic!("{what}: the operator's ServiceAccount may do it"),
    }
}

#[tokio::test]
async fn an_operator_watching_one_namespace_runs_a_cluster_there_and_nothing_elsewhere() {
    let Some(e2e) = E2e::from_env().await else {
        return;
    };
    let Some(scope) = Scope::from_env() else {
        return;
    };
    let e2e = Arc::new(e2e);
    // The checks in a task of their own, so that the clean-up runs when one fails.
    let outcome = tokio::spawn(scenario(e2e.clone(), scope.clone())).await;
    clean_up(&e2e, &scope).await;
    match outcome {
        Ok(()) => the_cluster_goes_with_its_resource(&e2e).await,
        Err(failed) => match failed.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the scenario did not finish: {e}"),
        },
    }
}

async fn scenario(e2e: Arc<E2e>, scope: Scope) {
    let client = e2e.kube.clone();
    the_operator_runs_scoped(&e2e, &scope).await;

    // The other namespace's cluster first, so that the operator has all the time the watched
    // one takes to start to (wrongly) pick it up.
    let apply = PatchParams::apply(MANAGER).force();
    let watched = Api::<CourierCluster>::namespaced(client.clone(), &e2e.namespace);
    let other = Api::<CourierCluster>::namespaced(client.clone(), &scope.other_namespace);
    other
        .patch(
            &e2e.cluster,
            &apply,
            &Patch::Apply(embedded_cluster(&e2e.cluster, None)),
        )
        .await
        .expect("apply the cluster in the other namespace");
    watched
        .patch(
            &e2e.cluster,
            &apply,
            &Patch::Apply(embedded_cluster(&e2e.cluster, Some(NODE_PORT))),
        )
        .await
        .expect("apply the cluster in the watched namespace");

    // Reconciled in the watched namespace: Ready, its pod running.
    eventually("the watched cluster to be Ready", || async {
        watched.get(&e2e.cluster).await.is_ok_and(|c| is_ready(&c))
    })
    .await;
    let services = Api::<Service>::namespaced(client.clone(), &e2e.namespace);
    let service = services
        .get(&e2e.cluster)
        .await
        .expect("the cluster's Service")
        .spec
        .expect("the cluster's Service has a spec");
    let node_ports: Vec<_> = service
        .ports
        .iter()
        .flatten()
        .map(|p| p.node_port)
        .collect();
    assert_eq!(node_ports, [Some(NODE_PORT)], "the Service's node port");
    let selector = service
        .selector
        .expect("the Service selects the cluster's pods");
    let labels = selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods = Api::<Pod>::namespaced(client.clone(), &e2e.namespace);
    eventually("the cluster's pod to run", || async {
        pods.list(&ListParams::default().labels(&labels))
            .await
            .is_ok_and(|list| {
                !list.items.is_empty()
                    && list.items.iter().all(|p| {
                        pod_is_ready(p)
                            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
            })
    })
    .await;

    // A client connects and sends through its Service.
    let mut conversation = Conversation::new("scoped-alice", "scoped-bob");
    let mut alice = e2e.connect("scoped-alice").await;
    for _ in 0..3 {
        conversation.send_next(&e2e, &mut alice).await;
    }
    conversation.check(&e2e).await;

    // Not reconciled in the other namespace: no status, nothing rendered.
    the_other_cluster_is_left_alone(&e2e, &scope).await;

    // What the operator's ServiceAccount may do: Secrets in the watched namespace only.
    let operator = scope.operator_client().await;
    Api::<Secret>::namespaced(operator.clone(), &e2e.namespace)
        .get("courier-jwt")
        .await
        .expect("the operator reads a Secret in the watched namespace");
    forbidden(
        "get a Secret in the other namespace",
        Api::<Secret>::namespaced(operator.clone(), &scope.other_namespace)
            .get("courier-jwt")
            .await,
    );
    forbidden(
        "list Secrets in every namespace",
        Api::<Secret>::all(operator.clone())
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "list Secrets in the operator's own namespace",
        Api::<Secret>::namespaced(operator.clone(), &scope.operator_namespace)
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "list CourierClusters in every namespace",
        Api::<CourierCluster>::all(operator.clone())
            .list(&ListParams::default())
            .await,
    );
    forbidden(
        "list pods in the other namespace",
        Api::<Pod>::namespaced(operator.clone(), &scope.other_namespace)
            .list(&ListParams::default())
            .await,
    );
    // Every list and watch of the controllers (operator/src/controllers/mod.rs) and the
    // writes, asked rather than tried: allowed in the watched namespace, nowhere else.
    let mut asked: Vec<(&str, &str, &str, &str, bool)> = Vec::new();
    for (group, resource) in WATCHED {
        for verb in ["list", "watch"] {
            asked.push((verb, group, resource, e2e.namespace.as_str(), true));
            asked.push((verb, group, resource, scope.other_namespace.as_str(), false));
            asked.push((verb, group, resource, "", false));
        }
    }
    for namespace in [e2e.namespace.as_str(), scope.other_namespace.as_str(), ""] {
        let allowed = namespace == e2e.namespace;
        asked.push(("get", "", "secrets", namespace, allowed));
        asked.push(("patch", "", "pods", namespace, allowed));
        asked.push(("create", "apps", "statefulsets", namespace, allowed));
        asked.push((
            "patch",
            "courier.dev",
            "courierclusters/status",
            namespace,
            allowed,
        ));
    }
    for (verb, group, resource, namespace, allowed) in asked {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_owned())),
            None => (resource, None),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(scope.user()),
                groups: Some(scope.groups()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some(verb.to_owned()),
                    group: Some(group.to_owned()),
                    resource: Some(resource.to_owned()),
                    subresource,
                    namespace: Some(namespace.to_owned()),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = Api::<SubjectAccessReview>::all(client.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("a SubjectAccessReview");
        let where_ = if namespace.is_empty() {
            "every namespace"
        } else {
            namespace
        };
        assert_eq!(
            answer.status.map(|s| s.allowed),
            Some(allowed),
            "{verb} {group}/{resource} in {where_} by {}",
            scope.user()
        );
    }

    // Granted by the chart exactly so: bound in the watched namespace (the Role) and its own
    // (the Lease), and nowhere cluster-wide.
    let cluster_wide: Vec<String> = Api::<ClusterRoleBinding>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list ClusterRoleBindings")
        .items
        .into_iter()
        .filter(|b| scope.is_bound_in(b.subjects.as_ref()))
        .filter_map(|b| b.metadata.name)
        .collect();
    assert!(
        cluster_wide.is_empty(),
        "ClusterRoleBindings of {}: {cluster_wide:?}",
        scope.user()
    );
    let bound_in: BTreeSet<String> = Api::<RoleBinding>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("list RoleBindings")
        .items
        .into_iter()
        .filter(|b| scope.is_bound_in(b.subjects.as_ref()))
        .filter_map(|b| b.metadata.namespace)
        .collect();
    assert_eq!(
        bound_in,
        BTreeSet::from([e2e.namespace.clone(), scope.operator_namespace.clone()]),
        "the namespaces of {}'s RoleBindings",
        scope.user()
    );

    // Still left alone after all that, the operator still up.
    the_other_cluster_is_left_alone(&e2e, &scope).await;
    the_operator_runs_scoped(&e2e, &scope).await;
}

/// The scoped release's operator: its Deployment told to watch the one namespace, its pods
/// ready.
async fn the_operator_runs_scoped(e2e: &E2e, scope: &Scope) {
    let deployments = Api::<Deployment>::namespaced(e2e.kube.clone(), &scope.operator_namespace);
    let deployment = deployments
        .get(&scope.operator_account)
        .await
        .expect("the operator's Deployment");
    let watch_namespace = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.env)
        .and_then(|env| {
            env.into_iter()
                .find(|v| v.name == "COURIER_OPERATOR_WATCH_NAMESPACE")
        })
        .and_then(|v| v.value);
    assert_eq!(watch_namespace.as_deref(), Some(e2e.namespace.as_str()));
    let pods = Api::<Pod>::namespaced(e2e.kube.clone(), &scope.operator_namespace)
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/name=courier-operator,app.kubernetes.io/instance={}",
            scope.operator_account
        )))
        .await
        .expect("list the operator's pods")
        .items;
    assert!(!pods.is_empty(), "no operator pod");
    for pod in &pods {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        assert!(pod_is_ready(pod), "operator pod {name} is not ready");
    }
}

/// The same cluster in the other namespace: no status, and no StatefulSet or Service.
async fn the_other_cluster_is_left_alone(e2e: &E2e, scope: &Scope) {
    let client = e2e.kube.clone();
    let cluster = Api::<CourierCluster>::namespaced(client.clone(), &scope.other_namespace)
        .get(&e2e.cluster)
        .await
        .expect("the cluster in the other namespace");
    assert_eq!(
        cluster.status, None,
        "the cluster in {} has a status",
        scope.other_namespace
    );
    let stateful_set = Api::<StatefulSet>::namespaced(client.clone(), &scope.other_namespace)
        .get_opt(&e2e.cluster)
        .await
        .expect("look for a StatefulSet");
    assert!(
        stateful_set.is_none(),
        "a StatefulSet in {}",
        scope.other_namespace
    );
    let service = Api::<Service>::namespaced(client, &scope.other_namespace)
        .get_opt(&e2e.cluster)
        .await
        .expect("look for a Service");
    assert!(service.is_none(), "a Service in {}", scope.other_namespace);
}

/// Deletes what the test applied; a failure to is reported, not raised, so that it cannot
/// hide the scenario's own.
async fn clean_up(e2e: &E2e, scope: &Scope) {
    let client = e2e.kube.clone();
    let delete = DeleteParams::default();
    let report = |result: kube::Result<()>, what: &str| match result {
        Err(kube::Error::Api(status)) if status.is_not_found() => {}
        Err(e) => eprintln!("clean-up: delete {what}: {e}"),
        Ok(()) => {}
    };
    for namespace in [&e2e.namespace, &scope.other_namespace] {
        report(
            Api::<CourierCluster>::namespaced(client.clone(), namespace)
                .delete(&e2e.cluster, &delete)
                .await
                .map(|_| ()),
            &format!("the cluster in {namespace}"),
        );
    }
}

/// After the clean-up of a scenario that passed: the watched cluster's StatefulSet goes with
/// it (the garbage collector follows the operator's owner references).
async fn the_cluster_goes_with_its_resource(e2e: &E2e) {
    let stateful_sets = Api::<StatefulSet>::namespaced(e2e.kube.clone(), &e2e.namespace);
    eventually("the watched cluster's StatefulSet to go", || async {
        stateful_sets
            .get_opt(&e2e.cluster)
            .await
            .is_ok_and(|s| s.is_none())
    })
    .await;
}

/// What the test applies parses as the types it stands for (this runs without a cluster).
#[test]
fn what_the_test_applies_is_well_formed() {
    let cluster: CourierCluster =
        serde_json::from_value(embedded_cluster("scoped", Some(NODE_PORT)))
            .expect("a CourierCluster");
    assert!(cluster.spec.storage.embedded.is_some());
    assert!(cluster.spec.storage.foundation_db.is_none());
    assert_eq!(cluster.spec.gateways.node_port, Some(NODE_PORT));
    let other: CourierCluster =
        serde_json::from_value(embedded_cluster("scoped", None)).expect("a CourierCluster");
    assert_eq!(other.spec.gateways.node_port, None);
}
