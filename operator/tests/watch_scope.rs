//! What the running controllers list and watch, against kube's mocked API server
//! (`tower-test`): scoped to one namespace, every request stays in that namespace, so the
//! Role the chart grants there is enough and no cluster-wide list is ever made; unscoped,
//! they watch every namespace as before.

use std::sync::Arc;
use std::time::Duration;

use courier_operator::controllers::{self, Context, DataPlane};
use courier_operator::leader::LeaseFence;
use courier_operator::metrics::Metrics;
use courier_operator::rebalance::executor::ShardAdmin;
use courier_operator::scope::WatchScope;
use http::Response;
use kube::Client;
use kube::client::Body;
use serde_json::json;

/// The controllers reconcile nothing here (every list is empty): the data plane is never used.
struct NoDataPlane;

#[async_trait::async_trait]
impl DataPlane for NoDataPlane {
    fn shard_admin(
        &self,
        _token: courier_rpc::ClusterToken,
        _seeds: Vec<String>,
    ) -> Arc<dyn ShardAdmin> {
        unreachable!("no object, no admin API")
    }

    async fn gateway_connections(&self, _pod_ip: &str) -> Result<u64, String> {
        unreachable!("no object, no gateway")
    }
}

/// One watcher per resource a controller watches or owns: the cluster controller seven (the
/// ConfigMaps twice: those it renders, and the metadata of every one, for those clusters
/// name), the pool controller two, the shard set controller three.
const WATCHERS: usize = 12;

/// The requests the controllers make in `scope`: the paths of their lists and of their
/// watches, each sorted, and every request's path with its label selector (if any) and
/// whether it asks for metadata only. The API server answers every list with no objects and holds every
/// watch open; the controllers run until each of the [`WATCHERS`] has listed and started
/// to watch (or a deadline passes, which fails the test).
async fn requests_in(scope: WatchScope) -> (Vec<String>, Vec<String>, Vec<Request>) {
    let (service, mut handle) = tower_test::mock::pair::<http::Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    // Never asked: nothing reaches the data plane.
    let leadership = LeaseFence::new(client.clone(), "default", "courier-operator", "a");
    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(NoDataPlane),
        Arc::new(leadership),
        Arc::new(Metrics::new()),
    ));
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let running =
        tokio::spawn(async move { controllers::run(client, ctx, &scope, shutdown).await });
    let (mut lists, mut watches, mut selectors) = (Vec::new(), Vec::new(), Vec::new());
    // Answering a watch would end it and start a new list; holding it keeps the count exact.
    let mut held = Vec::new();
    let observed = tokio::time::timeout(Duration::from_secs(30), async {
        while lists.len() < WATCHERS || watches.len() < WATCHERS {
            let (request, send) = handle
                .next_request()
                .await
                .expect("the controllers stopped before every watcher watched");
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let selector = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("labelSelector="))
                .map(|s| {
                    s.replace("%2F", "/")
                        .replace("%3D", "=")
                        .replace("%2C", ",")
                });
            let metadata_only = request
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|accept| accept.to_str().ok())
                .is_some_and(|accept| accept.contains("as=PartialObjectMetadata"));
            selectors.push(Request {
                path: path.clone(),
                selector,
                metadata_only,
            });
            if query.split('&').any(|pair| pair == "watch=true") {
                watches.push(path);
                held.push(send);
            } else {
                lists.push(path);
                let empty = json!({
                    "apiVersion": "v1", "kind": "List",
                    "metadata": { "resourceVersion": "1" }, "items": []
                });
                send.send_response(
                    Response::builder()
                        .body(Body::from(serde_json::to_vec(&empty).unwrap()))
                        .unwrap(),
                );
            }
        }
    })
    .await;
    running.abort();
    assert!(
        observed.is_ok(),
        "not every watcher listed and watched within the deadline; lists {lists:?}, watches {watches:?}"
    );
    lists.sort();
    watches.sort();
    (lists, watches, selectors)
}

/// A list or watch request the controllers made.
struct Request {
    path: String,
    /// Its label selector, if any.
    selector: Option<String>,
    /// Whether it asks for the objects' metadata only.
    metadata_only: bool,
}

/// The paths the [`WATCHERS`] list and watch, sorted, under `courier` (`courier.dev`), `apps`
/// and `core` prefixes that say where they are.
fn watched_paths(courier: &str, apps: &str, core: &str) -> Vec<String> {
    let mut paths = vec![
        format!("{courier}/courierclusters"),
        format!("{apps}/statefulsets"),
        format!("{apps}/deployments"),
        format!("{core}/configmaps"),
        format!("{core}/configmaps"),
        format!("{courier}/gatewaypools"),
        format!("{courier}/sequencershardsets"),
        format!("{courier}/gatewaypools"),
        format!("{apps}/deployments"),
        format!("{courier}/sequencershardsets"),
        format!("{apps}/statefulsets"),
        format!("{courier}/shardrebalances"),
    ];
    paths.sort();
    paths
}

#[tokio::test]
async fn scoped_to_a_namespace_the_controllers_list_and_watch_only_in_it() {
    let (lists, watches, _) = requests_in(WatchScope::Namespace("team-a".to_owned())).await;
    let expected = watched_paths(
        "/apis/courier.dev/v1alpha1/namespaces/team-a",
        "/apis/apps/v1/namespaces/team-a",
        "/api/v1/namespaces/team-a",
    );
    assert_eq!(lists, expected);
    assert_eq!(watches, expected);
    for path in lists.iter().chain(&watches) {
        assert!(
            path.contains("/namespaces/team-a/"),
            "a request outside the namespace: {path}"
        );
    }
}

#[tokio::test]
async fn unscoped_the_controllers_watch_every_namespace_as_before() {
    let (lists, watches, _) = requests_in(WatchScope::AllNamespaces).await;
    let expected = watched_paths("/apis/courier.dev/v1alpha1", "/apis/apps/v1", "/api/v1");
    assert_eq!(lists, expected);
    assert_eq!(watches, expected);
}

/// The StatefulSets, Deployments and ConfigMaps the controllers own are listed and watched
/// with the label every object the operator renders carries (`render::pod::MANAGED_BY`,
/// checked on each rendered object by the render tests): in a namespace of many other
/// workloads, the operator holds and is woken by its own objects only. The Courier resources
/// are watched whole: every one is Courier's, and one made by hand carries no label. So are
/// the ConfigMaps a cluster may name as its configuration file (the user's, unlabelled), but
/// their metadata only: their data is neither sent nor held.
#[tokio::test]
async fn the_workloads_and_config_maps_are_watched_by_the_operators_label_only() {
    let (_, _, requests) = requests_in(WatchScope::Namespace("team-a".to_owned())).await;
    assert_eq!(requests.len(), 2 * WATCHERS);
    let mut metadata_only = 0;
    for request in requests {
        let courier = request.path.contains("/courier.dev/");
        let named = request.path.ends_with("/configmaps") && request.selector.is_none();
        if named {
            assert!(request.metadata_only, "{}: metadata only", request.path);
            metadata_only += 1;
            continue;
        }
        let expected =
            (!courier).then(|| "app.kubernetes.io/managed-by=courier-operator".to_owned());
        assert_eq!(request.selector, expected, "{}", request.path);
    }
    assert_eq!(
        metadata_only, 2,
        "one list and one watch of every ConfigMap's metadata"
    );
}
