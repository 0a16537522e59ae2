//! The controllers against kube's mocked API server (`tower-test`): each test states the exact
//! requests a reconciliation makes, in order, and what the API server answers; a request
//! that is not expected fails the test. The data plane is a fake with the admin API's
//! behaviour (samples, moves, drains).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use courier_operator::controllers::{
    Context, DataPlane, RebalancerState, cluster, gateway_pool, shard_set,
};
use courier_operator::crd::{
    CourierCluster, CourierClusterSpec, EmbeddedStorage, FoundationDbStorage, GatewayPool,
    GatewayPoolSettings, GatewayPoolSpec, MediaStore, RebalanceMode, S3MediaStore, SecretKeyRef,
    SequencerSettings, SequencerShardSet, SequencerShardSetSpec, ServiceType, Storage,
    StoragePartition, WorkloadSettings,
};
use courier_operator::leader::{Leadership, NotLeader};
use courier_operator::metrics::Metrics;
use courier_operator::rebalance::executor::{AdminError, Sample, ShardAdmin};
use courier_operator::rebalance::{Move, MoveReason, ObservedShard, PlannerPolicy, Rebalancer};
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube::core::ObjectMeta;
use serde_json::{Value, json};

const NS: &str = "chat";

/// One request the API server expects, and its answer.
struct Expect {
    method: Method,
    path: String,
    /// Checks the request's body (JSON, or Null without one).
    check: Box<dyn Fn(&Value) + Send>,
    /// The answer; `None` echoes the request's body.
    answer: Option<Value>,
    /// The answer's HTTP status.
    status: u16,
}

fn expect(method: Method, path: &str, check: impl Fn(&Value) + Send + 'static) -> Expect {
    Expect {
        method,
        path: path.to_owned(),
        check: Box::new(check),
        answer: None,
        status: 200,
    }
}

impl Expect {
    fn answer(mut self, answer: Value) -> Self {
        self.answer = Some(answer);
        self
    }

    /// Answers 404 Not Found, as the API server does for an object that does not exist.
    fn not_found(mut self) -> Self {
        self.status = 404;
        self.answer = Some(json!({
            "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"
        }));
        self
    }
}

/// A client whose API server answers `expected`, in order; returns the client and a task that
/// ends once every expected request came (and fails on an unexpected one).
fn api_server(expected: Vec<Expect>) -> (Client, tokio::task::JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        for expectation in expected {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                panic!(
                    "no request; expected {} {}",
                    expectation.method, expectation.path
                )
            });
            let (parts, body) = request.into_parts();
            // A path ending in `*` stands for any path it begins (an object named by the
            // client, such as an aggregated event).
            let path = match expectation.path.strip_suffix('*') {
                Some(prefix) if parts.uri.path().starts_with(prefix) => parts.uri.path(),
                _ => expectation.path.as_str(),
            };
            assert_eq!(
                (&parts.method, parts.uri.path()),
                (&expectation.method, path),
                "request {} {} (query {:?})",
                parts.method,
                parts.uri,
                parts.uri.query()
            );
            if parts.method == Method::PATCH {
                let query = parts.uri.query().unwrap_or_default();
                if query.contains("fieldManager") {
                    assert!(
                        query.contains("fieldManager=courier-operator")
                            && query.contains("force=true"),
                        "server-side apply as courier-operator: {query}"
                    );
                }
            }
            let bytes = body.collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            (expectation.check)(&body);
            let answer = expectation.answer.unwrap_or(body);
            send.send_response(
                Response::builder()
                    .status(expectation.status)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    (Client::new(service, NS), server)
}

/// A replica that leads (`true`), or one another replica took the Lease from.
struct Leading(bool);

#[async_trait::async_trait]
impl Leadership for Leading {
    async fn confirm(&self, _now_ms: u64) -> Result<(), NotLeader> {
        match self.0 {
            true => Ok(()),
            false => Err(NotLeader::NotHeld {
                holder: Some("courier-operator-b".to_owned()),
                identity: "courier-operator-a".to_owned(),
            }),
        }
    }
}

/// The controllers' context over `client` and `data_plane`, leading or not.
fn context(client: Client, data_plane: Arc<FakeDataPlane>, leading: bool) -> Context {
    let leadership = Arc::new(Leading(leading));
    Context::new(client, data_plane, leadership, Arc::new(Metrics::new()))
}

/// Runs `reconcile` against `expected` requests and checks that all of them, and no other,
/// were made.
async fn reconciled<F>(expected: Vec<Expect>, data_plane: Arc<FakeDataPlane>, reconcile: F)
where
    F: AsyncFnOnce(Arc<Context>),
{
    reconciled_leading(true, expected, data_plane, reconcile).await;
}

/// [`reconciled`] by a replica that leads (`leading`) or no longer does.
async fn reconciled_leading<F>(
    leading: bool,
    expected: Vec<Expect>,
    data_plane: Arc<FakeDataPlane>,
    reconcile: F,
) where
    F: AsyncFnOnce(Arc<Context>),
{
    let (client, server) = api_server(expected);
    let mut context = context(client, data_plane, leading);
    context.clock = || 1_000_000;
    let context = Arc::new(context);
    reconcile(context.clone()).await;
    // Without the client, a request still expected ends the server with "no request".
    drop(context);
    server.await.expect("every expected request was made");
}

/// An admin API that serves `sample` and records moves and drains.
#[derive(Default)]
struct FakeAdmin {
    sample: Mutex<Sample>,
    moves: Mutex<Vec<Move>>,
    drains: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl ShardAdmin for FakeAdmin {
    async fn sample(&self) -> Result<Sample, AdminError> {
        Ok(self.sample.lock().unwrap().clone())
    }

    async fn move_shard(&self, _sample: &Sample, planned: &Move) -> Result<u64, AdminError> {
        self.moves.lock().unwrap().push(planned.clone());
        let mut sample = self.sample.lock().unwrap();
        sample.shards.get_mut(&planned.shard).unwrap().owner = planned.to.clone();
        Ok(7)
    }

    async fn drain(&self, _sample: &Sample, node: &str) -> Result<Vec<u32>, AdminError> {
        self.drains.lock().unwrap().push(node.to_owned());
        Ok(Vec::new())
    }
}

/// The fake admin API, and gateway connections by pod IP.
#[derive(Default)]
struct FakeDataPlane {
    admin: Arc<FakeAdmin>,
    connections: BTreeMap<String, u64>,
    /// If set, no gateway answers until this many reads are under way at once.
    answer_together: Option<tokio::sync::Barrier>,
}

impl FakeDataPlane {
    fn with_sample(sample: Sample) -> Self {
        FakeDataPlane {
            admin: Arc::new(FakeAdmin {
                sample: Mutex::new(sample),
                ..FakeAdmin::default()
            }),
            ..FakeDataPlane::default()
        }
    }
}

#[async_trait::async_trait]
impl DataPlane for FakeDataPlane {
    fn shard_admin(
        &self,
        _token: courier_rpc::ClusterToken,
        _seeds: Vec<String>,
    ) -> Arc<dyn ShardAdmin> {
        self.admin.clone()
    }

    async fn gateway_connections(&self, pod_ip: &str) -> Result<u64, String> {
        if let Some(together) = &self.answer_together {
            together.wait().await;
        }
        self.connections
            .get(pod_ip)
            .copied()
            .ok_or_else(|| format!("no pod at {pod_ip}"))
    }
}

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(NS.to_owned()),
        uid: Some(format!("uid-{name}")),
        generation: Some(3),
        ..ObjectMeta::default()
    }
}

fn secret(name: &str, key: &str) -> SecretKeyRef {
    SecretKeyRef {
        name: name.to_owned(),
        key: key.to_owned(),
    }
}

fn cluster(embedded: bool) -> CourierCluster {
    let storage = if embedded {
        Storage {
            embedded: Some(EmbeddedStorage {
                size: "5Gi".to_owned(),
                storage_class_name: None,
            }),
            foundation_db: None,
        }
    } else {
        Storage {
            embedded: None,
            foundation_db: Some(FoundationDbStorage {
                cluster_file_secret: Some(secret("fdb", "fdb.cluster")),
                partitions: Vec::new(),
                cluster_token_secret: secret("courier-token", "token"),
            }),
        }
    };
    CourierCluster {
        metadata: meta("prod"),
        spec: CourierClusterSpec {
            image: "ghcr.io/courier-chat/courier:0.1.0".to_owned(),
            image_pull_secrets: Vec::new(),
            priority_class_name: None,
            storage,
            jwt_secret: Some(secret("courier-jwt", "secret")),
            media: (!embedded).then(|| MediaStore {
                s3: S3MediaStore {
                    bucket: "media".to_owned(),
                    credentials_secret: "s3".to_owned(),
                },
                pods: WorkloadSettings {
                    replicas: 3,
                    resources: None,
                },
            }),
            push_secret: (!embedded).then(|| "courier-push".to_owned()),
            config_map: None,
            shards: 64,
            gateways: GatewayPoolSettings::default(),
            sequencers: SequencerSettings::default(),
            fanout: WorkloadSettings::default(),
            chat: WorkloadSettings::default(),
        },
        status: None,
    }
}

fn args(body: &Value) -> Vec<String> {
    serde_json::from_value(body["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap()
}

const APPLY: Method = Method::PATCH;

/// The rebalancer of `prod-sequencers` has seen the sample's loads for two samples (a hot
/// pod is hot at the next) and its plan is due.
fn plan_due(ctx: &Context, data_plane: &FakeDataPlane) {
    let mut rebalancer = Rebalancer::new(PlannerPolicy::default());
    let view = data_plane.admin.sample.lock().unwrap().view(None);
    for _ in 0..2 {
        rebalancer.observe(&view);
    }
    ctx.rebalancers.lock().unwrap().insert(
        format!("{NS}/prod-sequencers"),
        RebalancerState {
            rebalancer,
            next_plan_ms: 0,
            last_sample_ms: None,
            evacuating: false,
        },
    );
}

#[tokio::test]
async fn an_embedded_cluster_creates_one_courier_serve_statefulset_its_service_and_a_status() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let expected = vec![
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod",
            |body| {
                assert_eq!(body["spec"]["replicas"], 1);
                assert_eq!(
                    args(body),
                    [
                        "--log-format",
                        "json",
                        "serve",
                        "--listen",
                        "0.0.0.0:8080",
                        "--metrics-listen",
                        "0.0.0.0:9090",
                        "--drain-window",
                        "0s",
                        "--drain-timeout",
                        "25s"
                    ]
                );
                assert_eq!(
                    body["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
                    "5Gi"
                );
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-prod");
                let container = &body["spec"]["template"]["spec"]["containers"][0];
                assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
                assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
                assert_eq!(
                    body["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
                    true
                );
            },
        ),
        expect(APPLY, "/api/v1/namespaces/chat/services/prod", |body| {
            assert_eq!(body["spec"]["type"], "ClusterIP");
            assert_eq!(
                body["spec"]["selector"]["app.kubernetes.io/component"],
                "server"
            );
        }),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |body| {
                assert_eq!(body["status"]["storage"], "embedded");
                assert_eq!(body["status"]["observedGeneration"], 3);
                assert_eq!(body["status"]["conditions"][0]["type"], "Ready");
                assert_eq!(body["status"]["conditions"][0]["status"], "False");
            },
        )
        .answer(serde_json::to_value(cluster(true)).unwrap()),
    ];
    reconciled(expected, data_plane.clone(), async |ctx| {
        cluster::reconcile(Arc::new(cluster(true)), ctx)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_foundationdb_cluster_applies_its_pools_and_a_workload_per_role() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let expected = vec![
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/gatewaypools/prod-gateways",
            |body| {
                assert_eq!(body["spec"]["cluster"], "prod");
                assert_eq!(body["spec"]["minReplicas"], 2);
                assert_eq!(
                    body["metadata"]["ownerReferences"][0]["kind"],
                    "CourierCluster"
                );
            },
        ),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/sequencershardsets/prod-sequencers",
            |body| {
                assert_eq!(body["spec"]["shards"], 64);
                assert_eq!(body["spec"]["rebalance"]["mode"], "Auto");
            },
        ),
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-chat",
            |body| {
                assert_eq!(body["spec"]["replicas"], 2);
                assert_eq!(args(body)[2..5], ["node", "--roles", "chat"]);
                let container = body["spec"]["template"]["spec"]["containers"][0].to_string();
                for secret in ["COURIER_JWT_SECRET", "\"s3\"", "courier-push"] {
                    assert!(!container.contains(secret), "chat pods get no {secret}");
                }
            },
        ),
        budget("chat"),
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-media",
            |body| {
                assert_eq!(body["spec"]["replicas"], 3);
                let args = args(body);
                assert_eq!(args[2..5], ["node", "--roles", "media"]);
                assert!(
                    args.windows(2)
                        .any(|w| w == ["--advertise-http", "$(POD_IP):8080"]),
                    "{args:?}"
                );
                let container = body["spec"]["template"]["spec"]["containers"][0].to_string();
                assert!(
                    container.contains("COURIER_JWT_SECRET"),
                    "media verifies tokens"
                );
                assert!(container.contains("COURIER_MEDIA_S3_BUCKET"), "{container}");
                assert!(
                    container.contains("\"s3\""),
                    "media gets the S3 credentials"
                );
                assert!(!container.contains("courier-push"), "{container}");
            },
        ),
        expect(
            APPLY,
            "/api/v1/namespaces/chat/services/prod-media",
            |body| {
                assert_eq!(body["spec"]["type"], "ClusterIP");
                assert_eq!(
                    body["spec"]["selector"]["app.kubernetes.io/component"],
                    "media"
                );
                assert_eq!(body["spec"]["ports"][0]["port"], 8080);
            },
        ),
        budget("media"),
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-fanout",
            |body| {
                assert_eq!(body["spec"]["replicas"], 2);
                assert_eq!(args(body)[2..5], ["node", "--roles", "fanout"]);
                let env = body["spec"]["template"]["spec"]["containers"][0]["env"].to_string();
                assert!(
                    !env.contains("COURIER_JWT_SECRET"),
                    "fanout pods get no client secret"
                );
            },
        ),
        budget("fanout"),
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            |body| {
                assert_eq!(body["spec"]["replicas"], 1);
                assert_eq!(args(body)[2..5], ["node", "--roles", "push"]);
                let container = body["spec"]["template"]["spec"]["containers"][0].to_string();
                assert!(container.contains("courier-push"), "the push Secret");
                assert!(!container.contains("COURIER_JWT_SECRET"), "{container}");
                assert!(!container.contains("\"s3\""), "{container}");
            },
        ),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |body| {
                assert_eq!(body["status"]["storage"], "foundationDb");
            },
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
    ];
    reconciled(expected, data_plane.clone(), async |ctx| {
        cluster::reconcile(Arc::new(cluster(false)), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// The PodDisruptionBudget of `prod`'s stateless `component` pods: one down at a time (a node
/// drain evicting all of them at once would stop that role until they came back).
fn budget(component: &'static str) -> Expect {
    expect(
        APPLY,
        &format!("/apis/policy/v1/namespaces/chat/poddisruptionbudgets/prod-{component}"),
        move |body| {
            assert_eq!(body["spec"]["maxUnavailable"], 1);
            let labels = &body["spec"]["selector"]["matchLabels"];
            assert_eq!(labels["app.kubernetes.io/component"], component);
            assert_eq!(labels["app.kubernetes.io/instance"], "prod");
            assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-prod");
        },
    )
}

/// The push notifier's Deployment as the API server has it: `replicas` pods, owned by the
/// cluster `prod` (`uid-prod`).
fn push_deployment(replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": "prod-push", "namespace": NS,
            "ownerReferences": [{
                "apiVersion": "courier.dev/v1alpha1", "kind": "CourierCluster",
                "name": "prod", "uid": "uid-prod", "controller": true
            }]
        },
        "spec": { "replicas": replicas, "selector": {}, "template": {} }
    })
}

/// The requests of a FoundationDB cluster's reconciliation up to its push notifier.
fn cluster_applies_before_push() -> Vec<Expect> {
    let paths = [
        "/apis/courier.dev/v1alpha1/namespaces/chat/gatewaypools/prod-gateways",
        "/apis/courier.dev/v1alpha1/namespaces/chat/sequencershardsets/prod-sequencers",
        "/apis/apps/v1/namespaces/chat/deployments/prod-chat",
        "/apis/policy/v1/namespaces/chat/poddisruptionbudgets/prod-chat",
        "/apis/apps/v1/namespaces/chat/deployments/prod-media",
        "/api/v1/namespaces/chat/services/prod-media",
        "/apis/policy/v1/namespaces/chat/poddisruptionbudgets/prod-media",
        "/apis/apps/v1/namespaces/chat/deployments/prod-fanout",
        "/apis/policy/v1/namespaces/chat/poddisruptionbudgets/prod-fanout",
    ];
    paths
        .into_iter()
        .map(|path| expect(APPLY, path, |_| {}))
        .collect()
}

thread_local! {
    /// The clock of [`status_after`]: the test sets it, its reconciliation reads it (on the
    /// test's own thread: a `tokio::test` runtime has one), whatever other tests run beside.
    static CLOCK_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(1_000_000) };
}

/// The status one reconciliation writes, at `now_ms`: `before` are the requests before the
/// status write, `status` the path of the status and `answer` the API server's answer to its
/// write, `reconcile` the reconciliation.
async fn status_after<F>(
    now_ms: u64,
    before: Vec<Expect>,
    (status, answer): (&str, Value),
    data_plane: Arc<FakeDataPlane>,
    setup: impl FnOnce(&Context),
    reconcile: F,
) -> Value
where
    F: AsyncFnOnce(Arc<Context>),
{
    let written = Arc::new(Mutex::new(Value::Null));
    let into = written.clone();
    let mut expected = before;
    expected.push(
        expect(APPLY, status, move |body| {
            *into.lock().unwrap() = body["status"].clone();
        })
        .answer(answer),
    );
    let (client, server) = api_server(expected);
    let mut context = context(client, data_plane, true);
    CLOCK_MS.set(now_ms);
    context.clock = || CLOCK_MS.get();
    setup(&context);
    let context = Arc::new(context);
    reconcile(context.clone()).await;
    drop(context);
    server.await.expect("every expected request was made");
    written.lock().unwrap().clone()
}

/// Each status write of a cluster wakes it again (it watches itself), as does each of its
/// pool's and shard set's: a status that differed from one reconciliation to the next of an
/// unchanged world would be written at every wake-up, and wake it again, for good.
#[tokio::test]
async fn a_clusters_status_is_the_same_at_the_next_reconciliation_of_an_unchanged_world() {
    let status_path = "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status";
    let before = || {
        let mut before = cluster_applies_before_push();
        before.push(expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            |_| {},
        ));
        before
    };
    let data_plane = Arc::new(FakeDataPlane::default());
    let first = status_after(
        1_000_000,
        before(),
        (status_path, serde_json::to_value(cluster(false)).unwrap()),
        data_plane.clone(),
        |_| {},
        async |ctx| {
            cluster::reconcile(Arc::new(cluster(false)), ctx)
                .await
                .unwrap();
        },
    )
    .await;
    let mut seen = cluster(false);
    seen.status = Some(serde_json::from_value(first.clone()).unwrap());
    let second = status_after(
        1_060_000,
        before(),
        (status_path, serde_json::to_value(cluster(false)).unwrap()),
        data_plane,
        |_| {},
        async |ctx| {
            cluster::reconcile(Arc::new(seen), ctx).await.unwrap();
        },
    )
    .await;
    assert_eq!(second, first);
}

/// A pool sampled at the same load twice writes the same status (the Deployment and its pods
/// unchanged).
#[tokio::test]
async fn a_gateway_pools_status_is_the_same_at_the_next_sample_of_an_unchanged_world() {
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([("10.0.0.1".to_owned(), 900), ("10.0.0.2".to_owned(), 950)]),
        ..FakeDataPlane::default()
    });
    let before = || {
        after_pool_reads(
            vec![
                gateway_pod("gw-a", "10.0.0.1"),
                gateway_pod("gw-b", "10.0.0.2"),
            ],
            2,
            pool_applies(|_| {}),
        )
    };
    let first = status_after(
        1_000_000,
        before(),
        (POOL_STATUS, serde_json::to_value(pool()).unwrap()),
        data_plane.clone(),
        |_| {},
        async |ctx| {
            gateway_pool::reconcile(Arc::new(pool()), ctx)
                .await
                .unwrap();
        },
    )
    .await;
    let mut seen = pool();
    seen.status = Some(serde_json::from_value(first.clone()).unwrap());
    let second = status_after(
        1_015_000,
        before(),
        (POOL_STATUS, serde_json::to_value(pool()).unwrap()),
        data_plane,
        |_| {},
        async |ctx| {
            gateway_pool::reconcile(Arc::new(seen), ctx).await.unwrap();
        },
    )
    .await;
    assert_eq!(second, first);
}

#[tokio::test]
async fn a_push_notifier_left_without_push_providers_is_scaled_to_zero() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let mut without_push = cluster(false);
    without_push.spec.push_secret = None;
    let mut expected = cluster_applies_before_push();
    expected.extend([
        // pushSecret was removed: the notifier it ran must not go on with the old Secret.
        expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            |_| {},
        )
        .answer(push_deployment(1)),
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            |body| {
                assert_eq!(body["spec"]["replicas"], 0);
                let pod = body["spec"]["template"].to_string();
                assert!(!pod.contains("courier-push"), "no push Secret: {pod}");
            },
        ),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |_| {},
        )
        .answer(serde_json::to_value(&without_push).unwrap()),
    ]);
    let reconciled_cluster = without_push.clone();
    reconciled(expected, data_plane.clone(), async move |ctx| {
        cluster::reconcile(Arc::new(reconciled_cluster), ctx)
            .await
            .unwrap();
    })
    .await;

    // Never had one, or already stopped: nothing is applied.
    for found in [None, Some(push_deployment(0))] {
        let mut expected = cluster_applies_before_push();
        let get = expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            |_| {},
        );
        expected.push(match found {
            Some(deployment) => get.answer(deployment),
            None => get.not_found(),
        });
        expected.push(
            expect(
                APPLY,
                "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
                |_| {},
            )
            .answer(serde_json::to_value(&without_push).unwrap()),
        );
        let reconciled_cluster = without_push.clone();
        reconciled(expected, data_plane.clone(), async move |ctx| {
            cluster::reconcile(Arc::new(reconciled_cluster), ctx)
                .await
                .unwrap();
        })
        .await;
    }
}

/// `cluster(false)` on two storage partitions: shards 0-31 and 32-63.
fn partitioned() -> CourierCluster {
    let mut cluster = cluster(false);
    let fdb = cluster.spec.storage.foundation_db.as_mut().unwrap();
    fdb.cluster_file_secret = None;
    fdb.partitions = vec![
        StoragePartition {
            first_shard: 0,
            last_shard: 31,
            cluster_file_secret: secret("fdb-east", "fdb.cluster"),
        },
        StoragePartition {
            first_shard: 32,
            last_shard: 63,
            cluster_file_secret: secret("fdb-west", "fdb.cluster"),
        },
    ];
    cluster
}

/// [`partitioned`] with its second partition changed by `change`.
fn partitioned_with(change: impl FnOnce(&mut StoragePartition)) -> CourierCluster {
    let mut cluster = partitioned();
    let fdb = cluster.spec.storage.foundation_db.as_mut().unwrap();
    change(&mut fdb.partitions[1]);
    cluster
}

#[tokio::test]
async fn a_partitioned_cluster_applies_its_table_before_the_pods_that_mount_it() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let deployment = |name: &str| {
        expect(
            APPLY,
            &format!("/apis/apps/v1/namespaces/chat/deployments/{name}"),
            |body| {
                let spec = &body["spec"]["template"]["spec"];
                let env = spec["containers"][0]["env"].to_string();
                assert!(
                    env.contains("/etc/courier/partitions/partitions.json"),
                    "{env}"
                );
                assert!(!env.contains("COURIER_FDB_CLUSTER_FILE"), "{env}");
                let volumes = spec["volumes"].to_string();
                for name in ["fdb-east", "fdb-west", "prod-storage-partitions"] {
                    assert!(volumes.contains(name), "{name} in {volumes}");
                }
                let annotations = &body["spec"]["template"]["metadata"]["annotations"];
                assert!(
                    annotations["courier.dev/storage-partitions-sha256"].is_string(),
                    "{annotations}"
                );
            },
        )
    };
    let expected = vec![
        expect(
            APPLY,
            "/api/v1/namespaces/chat/configmaps/prod-storage-partitions",
            |body| {
                assert_eq!(body["kind"], "ConfigMap");
                assert_eq!(body["metadata"]["ownerReferences"][0]["uid"], "uid-prod");
                let table: Value =
                    serde_json::from_str(body["data"]["partitions.json"].as_str().unwrap())
                        .unwrap();
                assert_eq!(
                    table,
                    json!({"partitions": [
                        {"shards": [0, 31], "cluster_file": "/etc/courier/fdb/0/fdb.cluster"},
                        {"shards": [32, 63], "cluster_file": "/etc/courier/fdb/1/fdb.cluster"},
                    ]})
                );
            },
        ),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/gatewaypools/prod-gateways",
            |_| {},
        ),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/sequencershardsets/prod-sequencers",
            |_| {},
        ),
        deployment("prod-chat"),
        budget("chat"),
        deployment("prod-media"),
        expect(APPLY, "/api/v1/namespaces/chat/services/prod-media", |_| {}),
        budget("media"),
        deployment("prod-fanout"),
        budget("fanout"),
        deployment("prod-push"),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |body| {
                assert_eq!(body["status"]["storage"], "foundationDb");
                assert_eq!(body["status"]["conditions"][0]["reason"], "Starting");
            },
        )
        .answer(serde_json::to_value(partitioned()).unwrap()),
    ];
    reconciled(expected, data_plane.clone(), async |ctx| {
        cluster::reconcile(Arc::new(partitioned()), ctx)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_table_with_a_gap_renders_nothing_and_says_why_in_the_status() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let broken = partitioned_with(|p| p.first_shard = 40);
    // Only the status: no ConfigMap, no pool, no Deployment.
    let expected = vec![
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |body| {
                let conditions = body["status"]["conditions"].as_array().unwrap();
                let degraded = conditions
                    .iter()
                    .find(|c| c["type"] == "Degraded")
                    .expect("a Degraded condition");
                assert_eq!(degraded["status"], "True");
                assert_eq!(degraded["reason"], "InvalidStorage");
                let message = degraded["message"].as_str().unwrap();
                assert!(
                    message.contains("partitions[1] starts at shard 40")
                        && message.contains("shards 32 to 39 have no partition"),
                    "{message}"
                );
                let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
                assert_eq!(ready["status"], "False");
                assert_eq!(body["status"]["observedGeneration"], 3);
            },
        )
        .answer(serde_json::to_value(partitioned()).unwrap()),
    ];
    let cluster = Arc::new(broken);
    reconciled(expected, data_plane.clone(), async |ctx| {
        cluster::reconcile(cluster, ctx).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_gateway_pool_of_a_cluster_with_a_bad_table_applies_no_pod() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let broken = partitioned_with(|p| p.last_shard = 64);
    // It reads what it needs, then refuses to render: no Deployment is applied, and the
    // status says why.
    let expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(&broken).unwrap()),
        expect(Method::GET, "/api/v1/namespaces/chat/pods", |_| {}).answer(pod_list(vec![])),
        pool_deployment_read(2),
        expect(APPLY, POOL_STATUS, |body| {
            let ready = condition(body, "Ready");
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "InvalidStorage");
            assert!(
                ready["message"]
                    .as_str()
                    .unwrap()
                    .contains("beyond the last shard (63)"),
                "{ready}"
            );
        })
        .answer(serde_json::to_value(pool()).unwrap()),
    ];
    reconciled(expected, data_plane, async |ctx| {
        let error = gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("beyond the last shard (63)"),
            "{error}"
        );
    })
    .await;
}

fn pool() -> GatewayPool {
    GatewayPool {
        metadata: meta("prod-gateways"),
        spec: GatewayPoolSpec {
            cluster: "prod".to_owned(),
            pool: GatewayPoolSettings {
                min_replicas: 2,
                max_replicas: 8,
                target_connections_per_pod: 1000,
                ..GatewayPoolSettings::default()
            },
        },
        status: None,
    }
}

/// Has the pool's autoscaler take a sample of `connections` with `replicas` running, `ago`
/// ms before the test's clock (1,000,000 ms), under the pool's policy (2 to 8 pods, 1,000
/// connections each).
fn sampled_before(
    ctx: &Context,
    replicas: i32,
    connections: courier_operator::autoscale::ConnectionSample,
    ago: u64,
) {
    let policy = courier_operator::autoscale::ScalePolicy::new(2, 8, 1000);
    let mut autoscalers = ctx.autoscalers.lock().unwrap();
    let autoscaler = autoscalers
        .entry(format!("{NS}/prod-gateways"))
        .or_default();
    autoscaler.decide(&policy, replicas, &connections, 1_000_000 - ago);
}

fn gateway_pod(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": NS },
        "status": { "podIP": ip, "conditions": [{ "type": "Ready", "status": "True" }] }
    })
}

fn pod_list(pods: Vec<Value>) -> Value {
    json!({ "apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods })
}

fn deployment(replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": "prod-gateways", "namespace": NS },
        "spec": { "replicas": replicas, "selector": {}, "template": {} }
    })
}

/// The read of the cluster `prod` (on FoundationDB) that a pool's reconciliation begins with.
fn pool_cluster_read() -> Expect {
    expect(
        Method::GET,
        "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
        |_| {},
    )
    .answer(serde_json::to_value(cluster(false)).unwrap())
}

/// The read of the pool's Deployment, answered with one of `replicas`.
fn pool_deployment_read(replicas: i32) -> Expect {
    expect(
        Method::GET,
        "/apis/apps/v1/namespaces/chat/deployments/prod-gateways",
        |_| {},
    )
    .answer(deployment(replicas))
}

/// The reads of a gateway pool's sample (its cluster, its pods, its Deployment of `replicas`),
/// then `then`.
fn after_pool_reads(pods: Vec<Value>, replicas: i32, then: Vec<Expect>) -> Vec<Expect> {
    let reads = vec![
        pool_cluster_read(),
        expect(Method::GET, "/api/v1/namespaces/chat/pods", |_| {}).answer(pod_list(pods)),
        pool_deployment_read(replicas),
    ];
    reads.into_iter().chain(then).collect()
}

/// The applies of a pool's objects, in order: its Deployment (checked by `deployment`), its
/// client Service (the gateways' port) and its PodDisruptionBudget (a tenth of the pods down
/// at a time).
fn pool_applies(deployment: impl Fn(&Value) + Send + 'static) -> Vec<Expect> {
    vec![
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-gateways",
            deployment,
        ),
        expect(APPLY, "/api/v1/namespaces/chat/services/prod", |body| {
            assert_eq!(body["spec"]["ports"][0]["port"], 8080);
        }),
        expect(
            APPLY,
            "/apis/policy/v1/namespaces/chat/poddisruptionbudgets/prod-gateways",
            |body| assert_eq!(body["spec"]["maxUnavailable"], "10%"),
        ),
    ]
}

/// The path of the pool's status.
const POOL_STATUS: &str =
    "/apis/courier.dev/v1alpha1/namespaces/chat/gatewaypools/prod-gateways/status";

/// The requests of a pool's sample, in order: its reads ([`after_pool_reads`] of `pods` and
/// `replicas`), `first` (marks, events), [`pool_applies`] (`deployment` checks the
/// Deployment), and the write of its status, checked by `status`.
fn pool_sample(
    pods: Vec<Value>,
    replicas: i32,
    first: Vec<Expect>,
    deployment: impl Fn(&Value) + Send + 'static,
    status: impl Fn(&Value) + Send + 'static,
) -> Vec<Expect> {
    let status = expect(APPLY, POOL_STATUS, status).answer(serde_json::to_value(pool()).unwrap());
    let then = first
        .into_iter()
        .chain(pool_applies(deployment))
        .chain([status])
        .collect();
    after_pool_reads(pods, replicas, then)
}

/// The requests of a pool woken between samples, its Deployment at `replicas`: the reads of
/// its cluster and Deployment, and [`pool_applies`] (`deployment` checks the Deployment).
fn pool_between_samples(
    replicas: i32,
    deployment: impl Fn(&Value) + Send + 'static,
) -> Vec<Expect> {
    let reads = [pool_cluster_read(), pool_deployment_read(replicas)];
    reads.into_iter().chain(pool_applies(deployment)).collect()
}

#[tokio::test]
async fn a_gateway_pool_scales_up_at_once_to_what_its_connections_need() {
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([("10.0.0.1".to_owned(), 2500), ("10.0.0.2".to_owned(), 2300)]),
        ..FakeDataPlane::default()
    });
    let expected = pool_sample(
        vec![
            gateway_pod("gw-a", "10.0.0.1"),
            gateway_pod("gw-b", "10.0.0.2"),
        ],
        2,
        vec![expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/chat/events",
            |body| {
                assert_eq!(body["reason"], "ScaledUp");
                assert_eq!(body["note"], "2 -> 5 gateway pods for 4800 connections");
            },
        )],
        |body| {
            assert_eq!(body["spec"]["replicas"], 5);
            let args = args(body);
            assert_eq!(args[2..5], ["node", "--roles", "gateway"]);
            let env = body["spec"]["template"]["spec"]["containers"][0].to_string();
            assert!(env.contains("COURIER_JWT_SECRET"), "gateways verify tokens");
            assert!(!env.contains("\"s3\""), "gateways get no S3 credentials");
            // SIGTERM tells the clients to reconnect in batches over 60 s; the drain
            // ends within 90 s, inside the grace period.
            let drain = args.windows(2).filter(|w| w[0].starts_with("--drain"));
            assert_eq!(
                drain.map(|w| w.join(" ")).collect::<Vec<_>>(),
                ["--drain-window 60s", "--drain-timeout 90s"]
            );
            let pod = &body["spec"]["template"]["spec"];
            assert_eq!(pod["terminationGracePeriodSeconds"], 110);
            assert_eq!(
                pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"],
                5
            );
        },
        |body| assert_eq!(body["status"]["connections"], 4800),
    );
    reconciled(expected, data_plane, async |ctx| {
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// A gateway slow to answer `/metrics` (busy: when the pool most needs to grow) delays no
/// other read: one read at a time, a sample of N pods answering in 2 s each took 2N s before
/// the pool could grow.
#[tokio::test]
async fn a_gateway_pools_pods_are_read_together() {
    let pods = ["10.0.0.1", "10.0.0.2", "10.0.0.3"];
    let data_plane = Arc::new(FakeDataPlane {
        connections: pods.iter().map(|ip| (ip.to_string(), 1500)).collect(),
        answer_together: Some(tokio::sync::Barrier::new(pods.len())),
        ..FakeDataPlane::default()
    });
    let expected = pool_sample(
        pods.iter()
            .enumerate()
            .map(|(i, ip)| gateway_pod(&format!("gw-{i}"), ip))
            .collect(),
        3,
        vec![expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/chat/events",
            |body| assert_eq!(body["reason"], "ScaledUp"),
        )],
        |body| assert_eq!(body["spec"]["replicas"], 5),
        |body| assert_eq!(body["status"]["connections"], 4500),
    );
    reconciled(expected, data_plane, async |ctx| {
        let reconciled = gateway_pool::reconcile(Arc::new(pool()), ctx);
        tokio::time::timeout(std::time::Duration::from_secs(60), reconciled)
            .await
            .expect("every pod's /metrics read at once, not one after the other")
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_quiet_gateway_pool_removes_the_pod_with_the_fewest_connections_first() {
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([
            ("10.0.0.1".to_owned(), 300),
            ("10.0.0.2".to_owned(), 100),
            ("10.0.0.3".to_owned(), 200),
        ]),
        ..FakeDataPlane::default()
    });
    let expected = pool_sample(
        vec![
            gateway_pod("gw-a", "10.0.0.1"),
            gateway_pod("gw-b", "10.0.0.2"),
            gateway_pod("gw-c", "10.0.0.3"),
        ],
        3,
        vec![
            expect(Method::PATCH, "/api/v1/namespaces/chat/pods/gw-b", |body| {
                assert_eq!(
                    body["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
                    "-1000"
                );
            })
            .answer(gateway_pod("gw-b", "10.0.0.2")),
            expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/chat/events",
                |body| {
                    assert_eq!(body["reason"], "ScaledDown");
                },
            ),
        ],
        |body| assert_eq!(body["spec"]["replicas"], 2),
        |_| {},
    );
    reconciled(expected, data_plane, async |ctx| {
        // The autoscaler saw the same quiet load a whole window ago.
        let quiet = BTreeMap::from([("gw-a".to_owned(), 600)]);
        sampled_before(&ctx, 3, quiet.into(), 600_000);
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// A pod marked to go first at a scale-down that did not happen (the Deployment's apply
/// failed, or load came back before the ReplicaSet removed it) loses its mark at the next
/// sample: left, it would be the pod removed at some later, unrelated scale-down, whatever it
/// holds then.
#[tokio::test]
async fn a_mark_left_from_a_scale_down_that_did_not_happen_is_removed() {
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([("10.0.0.1".to_owned(), 900), ("10.0.0.2".to_owned(), 950)]),
        ..FakeDataPlane::default()
    });
    let mut marked = gateway_pod("gw-a", "10.0.0.1");
    marked["metadata"]["annotations"] =
        json!({ "controller.kubernetes.io/pod-deletion-cost": "-1000" });
    let expected = pool_sample(
        vec![marked, gateway_pod("gw-b", "10.0.0.2")],
        2,
        vec![
            expect(Method::PATCH, "/api/v1/namespaces/chat/pods/gw-a", |body| {
                assert_eq!(
                    body["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"],
                    Value::Null,
                    "the mark is removed: {body}"
                );
            })
            .answer(gateway_pod("gw-a", "10.0.0.1")),
        ],
        |body| assert_eq!(body["spec"]["replicas"], 2),
        |_| {},
    );
    reconciled(expected, data_plane, async |ctx| {
        // The pool was sampled a whole window ago, at the load it has now: it stays at 2.
        let busy = BTreeMap::from([("gw-a".to_owned(), 900), ("gw-b".to_owned(), 950)]);
        sampled_before(&ctx, 2, busy.into(), 600_000);
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

fn shard_set(replicas: i32) -> SequencerShardSet {
    let mut metadata = meta("prod-sequencers");
    metadata.finalizers = Some(vec![shard_set::FINALIZER.to_owned()]);
    SequencerShardSet {
        metadata,
        spec: SequencerShardSetSpec {
            cluster: "prod".to_owned(),
            shards: 4,
            sequencers: SequencerSettings {
                replicas,
                ..SequencerSettings::default()
            },
        },
        status: None,
    }
}

fn stateful_set(replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": { "name": "prod-sequencers", "namespace": NS },
        "spec": { "replicas": replicas, "selector": {}, "template": {}, "serviceName": "prod-sequencers" },
        "status": { "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                    "currentRevision": "r1", "updateRevision": "r1" }
    })
}

fn token_secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": { "name": "courier-token", "namespace": NS },
        // base64 of a 46-byte token
        "data": { "token": "Y291cmllci1vcGVyYXRvci10ZXN0LWNsdXN0ZXItdG9rZW4tMDEyMzQ1Njc4OQ==" }
    })
}

/// A sample of `pods` (sequencer pods by ordinal) owning `owners[shard]` with `loads[shard]`.
fn sample(pods: &[i32], owners: &[i32], loads: &[f64]) -> Sample {
    Sample {
        nodes: pods
            .iter()
            .map(|i| (format!("prod-sequencers-{i}"), format!("10.1.0.{i}:7500")))
            .collect(),
        shards: owners
            .iter()
            .zip(loads)
            .enumerate()
            .map(|(shard, (owner, load))| {
                (
                    shard as u32,
                    ObservedShard {
                        owner: format!("prod-sequencers-{owner}"),
                        load: *load,
                    },
                )
            })
            .collect(),
        unowned: Default::default(),
        outbox_lag_ms: 0,
        draining: Default::default(),
    }
}

/// The requests of a shard set's reconciliation up to its workloads.
fn shard_set_reads_and_applies(running: i32, applied_replicas: i32) -> Vec<Expect> {
    vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod-sequencers",
            |_| {},
        )
        .answer(stateful_set(running)),
        expect(
            Method::GET,
            "/api/v1/namespaces/chat/secrets/courier-token",
            |_| {},
        )
        .answer(token_secret()),
    ]
    .into_iter()
    .chain(shard_set_applies(applied_replicas))
    .collect()
}

fn shard_set_applies(replicas: i32) -> Vec<Expect> {
    vec![
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod-sequencers",
            move |body| {
                assert_eq!(body["spec"]["replicas"], replicas);
                assert_eq!(body["spec"]["updateStrategy"]["type"], "OnDelete");
                let args = args(body);
                assert!(
                    args.contains(
                        &"$(POD_NAME).prod-sequencers.$(POD_NAMESPACE).svc:7500".to_owned()
                    ),
                    "{args:?}"
                );
            },
        )
        .answer(stateful_set(replicas)),
        expect(
            APPLY,
            "/api/v1/namespaces/chat/services/prod-sequencers",
            |body| {
                assert_eq!(body["spec"]["clusterIP"], "None");
                assert_eq!(body["spec"]["publishNotReadyAddresses"], true);
            },
        ),
        expect(
            APPLY,
            "/apis/policy/v1/namespaces/chat/poddisruptionbudgets/prod-sequencers",
            |body| {
                assert_eq!(body["spec"]["maxUnavailable"], 1);
            },
        ),
    ]
}

fn status_patch(check: impl Fn(&Value) + Send + 'static) -> Expect {
    expect(
        APPLY,
        "/apis/courier.dev/v1alpha1/namespaces/chat/sequencershardsets/prod-sequencers/status",
        check,
    )
    .answer(serde_json::to_value(shard_set(2)).unwrap())
}

#[tokio::test]
async fn a_hot_sequencer_pod_gives_a_shard_to_the_other_and_the_move_is_recorded() {
    // Pod 0 carries two busy shards, pod 1 two idle ones.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let mut expected = shard_set_reads_and_applies(2, 2);
    expected.push(expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/chat/events",
        |body| {
            assert_eq!(body["reason"], "ShardMoved");
            assert_eq!(
                body["note"],
                "shard 0 moved prod-sequencers-0 -> prod-sequencers-1 (Relieve), epoch 7"
            );
        },
    ));
    expected.push(status_patch(|body| {
        let status = &body["status"];
        assert_eq!(status["recentMoves"][0]["shard"], 0);
        assert_eq!(status["recentMoves"][0]["outcome"], "epoch 7");
        let rebalancing = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Rebalancing")
            .unwrap();
        assert_eq!(rebalancing["status"], "True");
    }));
    reconciled(expected, data_plane.clone(), async |ctx| {
        plan_due(&ctx, &data_plane);
        shard_set::reconcile(Arc::new(shard_set(2)), ctx)
            .await
            .unwrap();
    })
    .await;
    let moves = data_plane.admin.moves.lock().unwrap().clone();
    assert_eq!(
        moves,
        [Move {
            shard: 0,
            from: "prod-sequencers-0".into(),
            to: "prod-sequencers-1".into(),
            reason: MoveReason::Relieve
        }]
    );
}

#[tokio::test]
async fn scaling_down_keeps_the_leaving_pod_until_its_shards_are_evacuated() {
    // replicas 2 -> 1: pod 1 still holds shards 2 and 3.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[5.0, 5.0, 5.0, 5.0],
    )));
    let mut expected = shard_set_reads_and_applies(2, 2);
    expected.push(expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/chat/events",
        |body| {
            assert_eq!(body["reason"], "ShardMoved");
        },
    ));
    // The second move's event joins the first's series.
    expected.push(expect(
        Method::PATCH,
        "/apis/events.k8s.io/v1/namespaces/chat/events/prod-sequencers.*",
        |body| {
            assert_eq!(body["series"]["count"], 2);
        },
    ));
    expected.push(status_patch(|body| {
        let progressing = body["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Progressing")
            .unwrap()
            .clone();
        assert_eq!(progressing["reason"], "Evacuating");
    }));
    reconciled(expected, data_plane.clone(), async |ctx| {
        let action = shard_set::reconcile(Arc::new(shard_set(1)), ctx)
            .await
            .unwrap();
        assert_eq!(
            action,
            kube::runtime::controller::Action::requeue(shard_set::EVACUATION_PACE),
            "the next shard leaves at the evacuation's pace, not the sample interval's"
        );
    })
    .await;
    let moves = data_plane.admin.moves.lock().unwrap().clone();
    assert_eq!(moves.len(), 2, "the pod's shards leave together");
    for m in &moves {
        assert_eq!(m.reason, MoveReason::Evacuate);
        assert_eq!(m.from, "prod-sequencers-1");
    }
    assert!(
        data_plane.admin.drains.lock().unwrap().is_empty(),
        "not drained while it holds shards"
    );
}

#[tokio::test]
async fn an_evacuated_pod_is_drained_and_then_the_statefulset_shrinks() {
    // replicas 2 -> 1: pod 1 holds nothing any more.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 0, 0],
        &[5.0, 5.0, 5.0, 5.0],
    )));
    let mut expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod-sequencers",
            |_| {},
        )
        .answer(stateful_set(2)),
        expect(
            Method::GET,
            "/api/v1/namespaces/chat/secrets/courier-token",
            |_| {},
        )
        .answer(token_secret()),
        expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/chat/events",
            |body| {
                assert_eq!(body["reason"], "Drained");
                assert_eq!(
                    body["note"],
                    "prod-sequencers-1 drained before removal (0 shards released)"
                );
            },
        ),
    ];
    expected.extend(shard_set_applies(1));
    expected.push(status_patch(|_| {}));
    reconciled(expected, data_plane.clone(), async |ctx| {
        let action = shard_set::reconcile(Arc::new(shard_set(1)), ctx)
            .await
            .unwrap();
        assert_eq!(
            action,
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(15)),
            "nothing left to evacuate: back to the sample interval (15 s by default)"
        );
    })
    .await;
    assert_eq!(
        data_plane.admin.drains.lock().unwrap().clone(),
        ["prod-sequencers-1"]
    );
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_shard_set_woken_between_samples_applies_its_workloads_and_samples_nothing() {
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let mut expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod-sequencers",
            |_| {},
        )
        .answer(stateful_set(2)),
    ];
    // Even with one replica wanted, nothing shrinks without a sample.
    expected.extend(shard_set_applies(2));
    reconciled(expected, data_plane.clone(), async |ctx| {
        ctx.rebalancers.lock().unwrap().insert(
            format!("{NS}/prod-sequencers"),
            RebalancerState {
                rebalancer: Rebalancer::new(PlannerPolicy::default()),
                next_plan_ms: 0,
                last_sample_ms: Some(1_000_000 - 5_000),
                evacuating: false,
            },
        );
        let action = shard_set::reconcile(Arc::new(shard_set(1)), ctx)
            .await
            .unwrap();
        assert_eq!(
            action,
            kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(10))
        );
    })
    .await;
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
    assert!(data_plane.admin.drains.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_gateway_pool_woken_between_samples_keeps_its_size_and_reads_no_connections() {
    let data_plane = Arc::new(FakeDataPlane::default());
    let expected = pool_between_samples(3, |body| assert_eq!(body["spec"]["replicas"], 3));
    reconciled(expected, data_plane, async |ctx| {
        sampled_before(&ctx, 3, Default::default(), 5_000);
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// A pool whose stored status has a number past its type (`connections` past 2^63, which the
/// API server keeps as a float) is read without it and reconciled, and the pool says so in a
/// `Warning` event: its list, and the watch of every pool of the scope, failed on it.
#[tokio::test]
async fn a_pool_whose_stored_status_does_not_fit_is_reconciled_and_says_so() {
    let mut stored = serde_json::to_value(pool()).unwrap();
    stored["status"] = json!({ "replicas": 3, "connections": 18446744073709552000.0 });
    let damaged: GatewayPool = serde_json::from_value(stored).expect("read without the field");
    let data_plane = Arc::new(FakeDataPlane::default());
    let mut expected = pool_between_samples(3, |_| {});
    expected.push(expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/chat/events",
        |body| {
            assert_eq!(body["type"], "Warning");
            assert_eq!(body["reason"], "StatusUnreadable");
            let note = body["note"].as_str().unwrap();
            assert!(note.contains("read without: connections: "), "{note}");
        },
    ));
    reconciled(expected, data_plane, async |ctx| {
        sampled_before(&ctx, 3, Default::default(), 5_000);
        gateway_pool::reconcile(Arc::new(damaged), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// Connections past what the API server keeps as an integer (2^63 - 1; past it, a float the
/// operator's types cannot read back) are written as 2^63 - 1: gateways reporting absurd
/// counts (any pod answering its metrics port may) made the pool's status unreadable.
#[tokio::test]
async fn a_pools_connections_are_written_as_a_number_the_api_server_keeps() {
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([
            ("10.0.0.1".to_owned(), u64::MAX / 2),
            ("10.0.0.2".to_owned(), u64::MAX / 2),
        ]),
        ..FakeDataPlane::default()
    });
    let expected = pool_sample(
        vec![
            gateway_pod("gw-a", "10.0.0.1"),
            gateway_pod("gw-b", "10.0.0.2"),
        ],
        8,
        Vec::new(),
        |_| {},
        |body| assert_eq!(body["status"]["connections"], i64::MAX),
    );
    reconciled(expected, data_plane, async |ctx| {
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// What the operator keeps of a pool or shard set (the autoscaler's targets, the planner's
/// trends and cooldowns, their gauges, their failures in a row) goes once the controller finds
/// the object gone: it outlived every deleted pool (the autoscaler kept growing, and `/metrics`
/// showed the pool's replicas for good), and a pool created again under the name took the old
/// one's window.
#[tokio::test]
async fn what_is_kept_of_a_deleted_pool_or_shard_set_goes_with_it() {
    use kube::runtime::controller::{self, Action};
    use kube::runtime::reflector::ObjectRef;
    use kube::runtime::watcher;
    type Outcome<K> = Result<
        (ObjectRef<K>, Action),
        controller::Error<courier_operator::controllers::Error, watcher::Error>,
    >;
    fn gone<K: kube::Resource<DynamicType = ()>>(name: &str) -> Outcome<K> {
        let gone = ObjectRef::<K>::new(name).within(NS).erase();
        Err(controller::Error::ObjectNotFound(Box::new(gone)))
    }
    reconciled(vec![], Arc::new(FakeDataPlane::default()), async |ctx| {
        sampled_before(&ctx, 3, Default::default(), 5_000);
        let failure = courier_operator::controllers::Error::ClusterNotFound("prod".to_owned());
        gateway_pool::error_policy(Arc::new(pool()), &failure, ctx.clone());
        shard_set::error_policy(Arc::new(shard_set(2)), &failure, ctx.clone());
        let failing = |ctx: &Context| -> Vec<String> {
            ctx.failures.lock().unwrap().keys().cloned().collect()
        };
        let label = |name: &str| courier_operator::metrics::ResourceLabel {
            resource: format!("{NS}/{name}"),
        };
        ctx.metrics
            .gateway_replicas
            .get_or_create(&label("prod-gateways"))
            .set(3);
        plan_due(&ctx, &FakeDataPlane::default());
        ctx.metrics
            .max_over_mean
            .get_or_create(&label("prod-sequencers"))
            .set(1.5);
        let there: Outcome<GatewayPool> = Ok((
            ObjectRef::new("prod-gateways").within(NS),
            Action::await_change(),
        ));
        ctx.forget_if_gone(&there, Context::forget_gateway_pool);
        assert_eq!(
            ctx.autoscalers.lock().unwrap().len(),
            1,
            "a pool still there"
        );
        ctx.forget_if_gone(
            &gone::<GatewayPool>("prod-gateways"),
            Context::forget_gateway_pool,
        );
        assert!(ctx.autoscalers.lock().unwrap().is_empty());
        assert_eq!(
            failing(&ctx),
            ["SequencerShardSet/chat/prod-sequencers"],
            "a pool created again under the name starts its retries afresh"
        );
        let metrics = ctx.metrics.render();
        assert!(!metrics.contains("prod-gateways"), "{metrics}");
        assert!(metrics.contains("prod-sequencers"), "{metrics}");
        ctx.forget_if_gone(
            &gone::<SequencerShardSet>("prod-sequencers"),
            Context::forget_shard_set,
        );
        assert!(ctx.rebalancers.lock().unwrap().is_empty());
        assert!(failing(&ctx).is_empty());
        assert!(!ctx.metrics.render().contains("prod-sequencers"));
    })
    .await;
}

/// A shard set in rebalance mode `Proposal`.
fn proposal_shard_set(replicas: i32) -> SequencerShardSet {
    let mut set = shard_set(replicas);
    set.spec.sequencers.rebalance.mode = RebalanceMode::Proposal;
    set
}

const REBALANCE: &str =
    "/apis/courier.dev/v1alpha1/namespaces/chat/shardrebalances/prod-sequencers-rebalance";
const REBALANCE_STATUS: &str =
    "/apis/courier.dev/v1alpha1/namespaces/chat/shardrebalances/prod-sequencers-rebalance/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/chat/events";

/// The set's plan, waiting for approval: shard 0 from pod 0 to pod 1, with the annotation
/// `courier.dev/rebalance=<annotation>` if any.
fn waiting_plan(annotation: Option<&str>) -> Value {
    json!({
        "apiVersion": "courier.dev/v1alpha1", "kind": "ShardRebalance",
        "metadata": {
            "name": "prod-sequencers-rebalance", "namespace": NS, "uid": "uid-srb",
            "generation": 1,
            "annotations": annotation.map(|value| json!({ "courier.dev/rebalance": value })),
        },
        "spec": { "shardSet": "prod-sequencers" },
        "status": {
            "moves": [{ "shard": 0, "from": "prod-sequencers-0", "to": "prod-sequencers-1",
                        "reason": "Relieve" }],
            "moveCount": 1,
            "conditions": [{ "type": "ProposalReady", "status": "True", "reason": "Planned",
                             "message": "1 moves wait for approval",
                             "lastTransitionTime": "2026-01-01T00:00:00Z" }]
        }
    })
}

/// The state of a ShardRebalance status patch: its one condition that is true.
fn plan_state(body: &Value) -> (String, String) {
    let conditions = body["status"]["conditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "one state at a time: {conditions:?}");
    assert_eq!(conditions[0]["status"], "True");
    assert_eq!(conditions[0]["observedGeneration"], 1);
    (
        conditions[0]["type"].as_str().unwrap().to_owned(),
        conditions[0]["message"].as_str().unwrap().to_owned(),
    )
}

/// The condition of type `kind` in a status patch.
fn condition(body: &Value, kind: &str) -> Value {
    body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {body}"))
        .clone()
}

fn rebalancing_condition(body: &Value) -> Value {
    condition(body, "Rebalancing")
}

#[tokio::test]
async fn in_proposal_mode_the_plan_goes_to_a_shard_rebalance_and_nothing_moves() {
    // Pod 0 carries two busy shards, pod 1 two idle ones.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let mut expected = shard_set_reads_and_applies(2, 2);
    expected.extend([
        expect(Method::GET, REBALANCE, |_| {}).not_found(),
        expect(APPLY, REBALANCE, |body| {
            assert_eq!(body["spec"]["shardSet"], "prod-sequencers");
            let owner = &body["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "SequencerShardSet");
            assert_eq!(owner["uid"], "uid-prod-sequencers");
            assert_eq!(owner["controller"], true);
        })
        .answer({
            let mut created = waiting_plan(None);
            created.as_object_mut().unwrap().remove("status");
            created
        }),
        expect(APPLY, REBALANCE_STATUS, |body| {
            let (state, message) = plan_state(body);
            assert_eq!(state, "ProposalReady");
            assert!(
                message.ends_with(
                    "kubectl annotate srb prod-sequencers-rebalance courier.dev/rebalance=approve"
                ),
                "{message}"
            );
            assert_eq!(body["status"]["moveCount"], 1);
            assert_eq!(
                body["status"]["moves"][0],
                json!({ "shard": 0, "from": "prod-sequencers-0", "to": "prod-sequencers-1",
                        "reason": "Relieve" })
            );
        })
        .answer(waiting_plan(None)),
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["reason"], "Proposed");
            assert_eq!(body["regarding"]["kind"], "ShardRebalance");
        }),
        status_patch(|body| {
            assert_eq!(body["status"]["recentMoves"], json!([]));
            let rebalancing = rebalancing_condition(body);
            assert_eq!(rebalancing["reason"], "AwaitingApproval");
            assert!(
                rebalancing["message"]
                    .as_str()
                    .unwrap()
                    .contains("kubectl annotate srb prod-sequencers-rebalance"),
                "{rebalancing}"
            );
        }),
    ]);
    reconciled(expected, data_plane.clone(), async |ctx| {
        plan_due(&ctx, &data_plane);
        shard_set::reconcile(Arc::new(proposal_shard_set(2)), ctx)
            .await
            .unwrap();
    })
    .await;
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_plan_without_approval_moves_nothing() {
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let mut expected = shard_set_reads_and_applies(2, 2);
    expected.extend([
        expect(Method::GET, REBALANCE, |_| {}).answer(waiting_plan(None)),
        status_patch(|body| {
            assert_eq!(rebalancing_condition(body)["reason"], "AwaitingApproval");
        }),
    ]);
    reconciled(expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(proposal_shard_set(2)), ctx)
            .await
            .unwrap();
    })
    .await;
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
}

/// The requests that start an approved plan: its state, then the annotation removed.
fn plan_started() -> Vec<Expect> {
    vec![
        expect(APPLY, REBALANCE_STATUS, |body| {
            assert_eq!(plan_state(body).0, "Rebalancing");
            assert!(body["status"]["startedAt"].is_string());
        })
        .answer(waiting_plan(None)),
        expect(Method::PATCH, REBALANCE, |body| {
            assert_eq!(
                *body,
                json!({ "metadata": { "annotations": { "courier.dev/rebalance": null } } })
            );
        })
        .answer(waiting_plan(None)),
    ]
}

#[tokio::test]
async fn an_approved_plan_is_carried_out_and_marked_ready() {
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let mut expected = shard_set_reads_and_applies(2, 2);
    expected.push(expect(Method::GET, REBALANCE, |_| {}).answer(waiting_plan(Some("approve"))));
    expected.extend(plan_started());
    expected.extend([
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["reason"], "ShardMoved");
            assert_eq!(body["regarding"]["kind"], "SequencerShardSet");
        }),
        expect(APPLY, REBALANCE_STATUS, |body| {
            assert_eq!(plan_state(body).0, "Ready");
            assert_eq!(body["status"]["outcomes"][0]["shard"], 0);
            assert_eq!(body["status"]["outcomes"][0]["outcome"], "epoch 7");
            assert!(body["status"]["finishedAt"].is_string());
        })
        .answer(waiting_plan(None)),
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["reason"], "Rebalanced");
            assert_eq!(body["regarding"]["kind"], "ShardRebalance");
        }),
        status_patch(|body| {
            assert_eq!(body["status"]["recentMoves"][0]["shard"], 0);
            assert_eq!(rebalancing_condition(body)["reason"], "Moving");
        }),
    ]);
    reconciled(expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(proposal_shard_set(2)), ctx)
            .await
            .unwrap();
    })
    .await;
    assert_eq!(
        data_plane.admin.moves.lock().unwrap().clone(),
        [Move {
            shard: 0,
            from: "prod-sequencers-0".into(),
            to: "prod-sequencers-1".into(),
            reason: MoveReason::Relieve
        }]
    );
}

#[tokio::test]
async fn an_approved_move_whose_shard_changed_owner_is_dropped() {
    // Shard 0 went from pod 0 to pod 2 after the plan was made.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1, 2],
        &[2, 0, 1, 1],
        &[1.0, 1.0, 1.0, 1.0],
    )));
    let mut expected = shard_set_reads_and_applies(3, 3);
    expected.push(expect(Method::GET, REBALANCE, |_| {}).answer(waiting_plan(Some("approve"))));
    expected.extend(plan_started());
    expected.extend([
        expect(APPLY, REBALANCE_STATUS, |body| {
            assert_eq!(plan_state(body).0, "Stale");
            assert_eq!(
                body["status"]["outcomes"][0]["outcome"],
                "dropped: the shard is on prod-sequencers-2 now"
            );
        })
        .answer(waiting_plan(None)),
        expect(Method::POST, EVENTS, |body| {
            assert_eq!(body["reason"], "Stale");
        }),
        status_patch(|body| {
            assert_eq!(body["status"]["recentMoves"], json!([]));
        }),
    ]);
    reconciled(expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(proposal_shard_set(3)), ctx)
            .await
            .unwrap();
    })
    .await;
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
}

/// The StatefulSet as Kubernetes (up to 1.35) reports it under `OnDelete` once its template
/// changed and every pod was deleted by hand and came back on the new template: all pods
/// updated and ready, but `currentRevision` is never promoted (kubernetes/kubernetes#73492).
fn stateful_set_after_manual_roll(replicas: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": { "name": "prod-sequencers", "namespace": NS },
        "spec": { "replicas": replicas, "selector": {}, "template": {}, "serviceName": "prod-sequencers",
                  "updateStrategy": { "type": "OnDelete" } },
        "status": { "replicas": replicas, "readyReplicas": replicas, "updatedReplicas": replicas,
                    "currentRevision": "prod-sequencers-r1", "updateRevision": "prod-sequencers-r2" }
    })
}

/// [`shard_set_reads_and_applies`] of `replicas` pods, the StatefulSet read and applied being
/// [`stateful_set_after_manual_roll`].
fn reads_and_applies_after_manual_roll(replicas: i32) -> Vec<Expect> {
    let mut expected = shard_set_reads_and_applies(replicas, replicas);
    for stateful_set in [1, 3] {
        expected[stateful_set].answer = Some(stateful_set_after_manual_roll(replicas));
    }
    expected
}

#[tokio::test]
async fn scale_down_evacuates_after_an_on_delete_template_change() {
    // replicas 2 -> 1 after an image bump whose pods were all rolled by hand: pod 1 holds 2, 3.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[5.0, 5.0, 5.0, 5.0],
    )));
    let mut expected = reads_and_applies_after_manual_roll(2);
    expected.push(expect(Method::POST, EVENTS, |body| {
        assert_eq!(body["reason"], "ShardMoved");
    }));
    expected.push(expect(
        Method::PATCH,
        "/apis/events.k8s.io/v1/namespaces/chat/events/prod-sequencers.*",
        |_| {},
    ));
    expected.push(status_patch(|body| {
        let rebalancing = rebalancing_condition(body);
        assert_eq!(rebalancing["reason"], "Moving", "{rebalancing}");
    }));
    reconciled(expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(shard_set(1)), ctx)
            .await
            .unwrap();
    })
    .await;
    assert_eq!(
        data_plane.admin.moves.lock().unwrap().len(),
        2,
        "pod 1's shards are evacuated"
    );
}

#[tokio::test]
async fn load_moves_go_on_while_ready_pods_run_an_older_template() {
    // Pod 0 carries two busy shards, pod 1 two idle ones; every pod is ready, whatever
    // template it runs.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let mut expected = reads_and_applies_after_manual_roll(2);
    expected.push(expect(Method::POST, EVENTS, |body| {
        assert_eq!(body["reason"], "ShardMoved");
    }));
    expected.push(status_patch(|body| {
        let rebalancing = rebalancing_condition(body);
        assert_eq!(rebalancing["reason"], "Moving", "{rebalancing}");
    }));
    reconciled(expected, data_plane.clone(), async |ctx| {
        plan_due(&ctx, &data_plane);
        shard_set::reconcile(Arc::new(shard_set(2)), ctx)
            .await
            .unwrap();
    })
    .await;
    assert_eq!(data_plane.admin.moves.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_gateway_pool_does_not_shrink_while_a_ready_pods_metrics_cannot_be_read() {
    // Four ready gateways with 900 connections each (3,600: four pods of 1,000), but only
    // gw-a's /metrics answers (the three others time out, as they have for the whole window).
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([("10.0.0.1".to_owned(), 900)]),
        ..FakeDataPlane::default()
    });
    let expected = pool_sample(
        vec![
            gateway_pod("gw-a", "10.0.0.1"),
            gateway_pod("gw-b", "10.0.0.2"),
            gateway_pod("gw-c", "10.0.0.3"),
            gateway_pod("gw-d", "10.0.0.4"),
        ],
        4,
        Vec::new(),
        |body| {
            assert_eq!(
                body["spec"]["replicas"], 4,
                "no pod removed on metrics it could not read"
            );
        },
        |body| {
            let degraded = condition(body, "Degraded");
            assert_eq!(degraded["status"], "True");
            assert_eq!(degraded["reason"], "MetricsUnavailable");
            assert_eq!(
                degraded["message"],
                "3 ready gateway pods did not answer /metrics (gw-b, gw-c, gw-d): \
                 the pool does not shrink until they do"
            );
            assert_eq!(body["status"]["connections"], 900);
        },
    );
    reconciled(expected, data_plane, async |ctx| {
        // The same partial reading a whole window ago.
        let partial = BTreeMap::from([("gw-a".to_owned(), 900)]);
        sampled_before(&ctx, 4, partial.into(), 600_000);
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_failing_reconcile_does_not_leave_the_cluster_ready() {
    // The embedded cluster was Ready at generation 3; its volume size was then edited
    // (generation 4). The API server refuses the StatefulSet (volumeClaimTemplates are
    // immutable): the status must stop saying Ready.
    let mut edited = cluster(true);
    edited.metadata.generation = Some(4);
    edited.spec.storage.embedded.as_mut().unwrap().size = "50Gi".to_owned();
    let available = courier_operator::crd::Conditions::new(
        &[],
        Some(3),
        k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
    )
    .set(
        courier_operator::crd::ConditionType::Ready,
        true,
        "Available",
        "1/1 courier serve pod ready",
    )
    .into_vec();
    edited.status = Some(courier_operator::crd::CourierClusterStatus {
        observed_generation: Some(3),
        storage: Some("embedded".to_owned()),
        conditions: available,
        ..Default::default()
    });
    let mut refused = expect(
        APPLY,
        "/apis/apps/v1/namespaces/chat/statefulsets/prod",
        |_| {},
    );
    refused.status = 422;
    refused.answer = Some(json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "reason": "Invalid", "code": 422,
        "message": "StatefulSet.apps \"prod\" is invalid: spec: Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"
    }));
    let expected = vec![
        refused,
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |body| {
                assert_eq!(body["status"]["observedGeneration"], 4);
                assert_eq!(body["status"]["storage"], "embedded", "the rest is kept");
                let ready = condition(body, "Ready");
                assert_eq!(ready["status"], "False", "{ready}");
                assert_eq!(ready["reason"], "ApiRequestFailed");
                assert_eq!(ready["observedGeneration"], 4);
                assert_eq!(
                    ready["message"],
                    "Kubernetes API: StatefulSet.apps \"prod\" is invalid: spec: Forbidden: \
                     updates to statefulset spec for fields other than 'replicas', 'ordinals', \
                     'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and \
                     'minReadySeconds' are forbidden (Invalid)"
                );
            },
        )
        .answer(serde_json::to_value(cluster(true)).unwrap()),
    ];
    reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
        let error = cluster::reconcile(Arc::new(edited), ctx).await.unwrap_err();
        assert_eq!(
            error.reason(),
            "ApiRequestFailed",
            "the error is still retried"
        );
    })
    .await;
}

#[tokio::test]
async fn a_shard_set_whose_token_secret_is_missing_is_not_ready_and_says_why() {
    let expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod-sequencers",
            |_| {},
        )
        .answer(stateful_set(2)),
        expect(
            Method::GET,
            "/api/v1/namespaces/chat/secrets/courier-token",
            |_| {},
        )
        .not_found(),
        status_patch(|body| {
            let ready = condition(body, "Ready");
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "SecretUnusable");
            assert_eq!(
                ready["message"],
                "Secret courier-token key token: no such Secret"
            );
        }),
    ];
    reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
        let result = shard_set::reconcile(Arc::new(shard_set(2)), ctx).await;
        assert!(result.is_err(), "{result:?}");
    })
    .await;
}

#[test]
fn a_gateway_pool_never_renders_the_service_of_an_embedded_cluster() {
    // The embedded cluster's client Service is named after the cluster, as a pool's is, but
    // selects its one `courier serve` pod: the pool's would take it over.
    let embedded = cluster(true);
    let served = courier_operator::render::embedded::build(&embedded)
        .unwrap()
        .service;
    assert_eq!(served.metadata.name.as_deref(), Some("prod"));
    let refused = courier_operator::render::gateways::build(&pool(), &embedded, 2).unwrap_err();
    assert_eq!(
        refused.to_string(),
        "CourierCluster prod has embedded storage (one courier serve pod that runs every role): \
         a GatewayPool needs storage.foundationDb"
    );
}

#[test]
fn an_embedded_clusters_service_takes_the_gateways_type_port_and_node_port() {
    // Its one pod is the cluster's gateway: `spec.gateways`' Service settings are its
    // Service's, as they are a gateway pool's (a nodePort asked for was left to Kubernetes).
    let mut embedded = cluster(true);
    embedded.spec.gateways.service_type = ServiceType::NodePort;
    embedded.spec.gateways.port = 9000;
    embedded.spec.gateways.node_port = Some(30081);
    let spec = courier_operator::render::embedded::build(&embedded)
        .unwrap()
        .service
        .spec
        .unwrap();
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    let ports = spec.ports.unwrap();
    assert_eq!(
        (ports[0].port, ports[0].node_port),
        (9000, Some(30081)),
        "{ports:?}"
    );
}

#[tokio::test]
async fn a_gateway_pool_of_an_embedded_cluster_renders_nothing_and_says_why() {
    // As a SequencerShardSet does, a GatewayPool naming an embedded cluster (e.g. the chart's
    // sample cluster) says so rather than render gateway pods and take over the cluster's
    // client Service: no pod is listed, no Deployment, Service or PDB applied.
    let expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(true)).unwrap()),
        expect(APPLY, POOL_STATUS, |body| {
            let degraded = condition(body, "Degraded");
            assert_eq!(degraded["status"], "True");
            assert_eq!(degraded["reason"], "NotFoundationDb");
            assert!(
                degraded["message"]
                    .as_str()
                    .unwrap()
                    .ends_with("a GatewayPool needs storage.foundationDb"),
                "{degraded}"
            );
            assert_eq!(condition(body, "Ready")["status"], "False");
        })
        .answer(serde_json::to_value(pool()).unwrap()),
    ];
    reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// `cluster(embedded)` whose pods take their configuration file from the ConfigMap
/// `courier-tuning`.
fn tuned(embedded: bool) -> CourierCluster {
    let mut cluster = cluster(embedded);
    cluster.spec.config_map = Some("courier-tuning".to_owned());
    cluster
}

/// The ConfigMap `courier-tuning` holding `file` as `courier.toml`.
fn tuning(file: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": { "name": "courier-tuning", "namespace": NS },
        "data": { "courier.toml": file }
    })
}

/// The read of the ConfigMap `courier-tuning`, answered with `file` as `courier.toml`.
fn tuning_read(file: &str) -> Expect {
    expect(
        Method::GET,
        "/api/v1/namespaces/chat/configmaps/courier-tuning",
        |_| {},
    )
    .answer(tuning(file))
}

/// The configuration file's digest on the pod template of the workload `body`.
fn config_digest(body: &Value) -> Value {
    body["spec"]["template"]["metadata"]["annotations"]["courier.dev/config-sha256"].clone()
}

/// The SHA-256 of `file`, in hex.
fn sha256(file: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(file.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The pods read their configuration file only as they start: an edit of the ConfigMap in
/// place must change the pod template (its digest), or no pod would ever take it.
#[tokio::test]
async fn an_edit_of_a_clusters_config_map_in_place_changes_its_pod_template() {
    let template_after = async |file: &str| {
        let digest = Arc::new(Mutex::new(Value::Null));
        let into = digest.clone();
        let expected = vec![
            tuning_read(file),
            expect(
                APPLY,
                "/apis/apps/v1/namespaces/chat/statefulsets/prod",
                move |body| {
                    *into.lock().unwrap() = config_digest(body);
                },
            ),
            expect(APPLY, "/api/v1/namespaces/chat/services/prod", |_| {}),
            expect(
                APPLY,
                "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
                |_| {},
            )
            .answer(serde_json::to_value(tuned(true)).unwrap()),
        ];
        reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
            cluster::reconcile(Arc::new(tuned(true)), ctx)
                .await
                .unwrap();
        })
        .await;
        digest.lock().unwrap().clone()
    };
    let before = template_after("user-sends-per-sec = 20\n").await;
    let after = template_after("user-sends-per-sec = 5\n").await;
    assert_eq!(before, json!(sha256("user-sends-per-sec = 20\n")));
    assert_eq!(after, json!(sha256("user-sends-per-sec = 5\n")));
    assert_eq!(
        template_after("user-sends-per-sec = 20\n").await,
        before,
        "the same file, the same template: nothing rolls"
    );
}

/// Every workload a FoundationDB cluster's own controller renders carries the digest.
#[tokio::test]
async fn every_workload_of_a_foundationdb_cluster_carries_its_config_maps_digest() {
    let file = "max-devices-per-user = 8\n";
    let carries = move |body: &Value| assert_eq!(config_digest(body), json!(sha256(file)));
    let mut expected = vec![tuning_read(file)];
    for (path, check) in cluster_applies_before_push().into_iter().map(|e| {
        let check = e.path.contains("/deployments/");
        (e.path, check)
    }) {
        expected.push(expect(APPLY, &path, move |body| {
            if check {
                carries(body);
            }
        }));
    }
    expected.extend([
        expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            carries,
        ),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
            |_| {},
        )
        .answer(serde_json::to_value(tuned(false)).unwrap()),
    ]);
    reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
        cluster::reconcile(Arc::new(tuned(false)), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// The gateway pool and shard set controllers render their pods from the cluster too: theirs
/// carry the digest of the file they read.
#[tokio::test]
async fn gateway_and_sequencer_pods_carry_their_clusters_config_map_digest() {
    let file = "user-sends-per-sec = 20\n";
    let carries = move |body: &Value| assert_eq!(config_digest(body), json!(sha256(file)));
    let cluster_read = || {
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(tuned(false)).unwrap())
    };
    let reads = [cluster_read(), tuning_read(file), pool_deployment_read(3)];
    let pool_requests = reads.into_iter().chain(pool_applies(carries)).collect();
    reconciled(
        pool_requests,
        Arc::new(FakeDataPlane::default()),
        async |ctx| {
            sampled_before(&ctx, 3, Default::default(), 5_000);
            gateway_pool::reconcile(Arc::new(pool()), ctx)
                .await
                .unwrap();
        },
    )
    .await;
    let mut set_requests = vec![
        cluster_read(),
        expect(
            Method::GET,
            "/apis/apps/v1/namespaces/chat/statefulsets/prod-sequencers",
            |_| {},
        )
        .answer(stateful_set(2)),
        tuning_read(file),
    ];
    let mut applies = shard_set_applies(2);
    let stateful_set_apply = applies.remove(0);
    set_requests.push(
        expect(APPLY, &stateful_set_apply.path, move |body| {
            (stateful_set_apply.check)(body);
            carries(body);
        })
        .answer(stateful_set(2)),
    );
    set_requests.extend(applies);
    reconciled(
        set_requests,
        Arc::new(FakeDataPlane::default()),
        async |ctx| {
            ctx.rebalancers.lock().unwrap().insert(
                format!("{NS}/prod-sequencers"),
                RebalancerState {
                    rebalancer: Rebalancer::new(PlannerPolicy::default()),
                    next_plan_ms: 0,
                    last_sample_ms: Some(1_000_000 - 5_000),
                    evacuating: false,
                },
            );
            shard_set::reconcile(Arc::new(shard_set(2)), ctx)
                .await
                .unwrap();
        },
    )
    .await;
}

/// A cluster naming a ConfigMap that does not exist (yet) applies nothing (its pods could not
/// start: their volume has no source) and says why in its status; the reconciliation is
/// retried, and a ConfigMap created later wakes the cluster (`controllers::run`).
#[tokio::test]
async fn a_cluster_whose_config_map_is_missing_applies_nothing_and_says_why() {
    for (answer, problem) in [
        (None, "no such ConfigMap in the namespace"),
        (
            Some(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": { "name": "courier-tuning", "namespace": NS },
                "data": { "courier.conf": "user-sends-per-sec = 20\n" }
            })),
            "no key courier.toml",
        ),
    ] {
        let read = expect(
            Method::GET,
            "/api/v1/namespaces/chat/configmaps/courier-tuning",
            |_| {},
        );
        let read = match answer {
            Some(answer) => read.answer(answer),
            None => read.not_found(),
        };
        let message = format!(
            "ConfigMap courier-tuning (the cluster's configMap): {problem}; no pod is rolled out until it is fixed"
        );
        let expected = vec![
            read,
            expect(
                APPLY,
                "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status",
                move |body| {
                    let ready = condition(body, "Ready");
                    assert_eq!(ready["status"], "False");
                    assert_eq!(ready["reason"], "ConfigMapUnusable");
                    assert_eq!(ready["message"], message.as_str());
                },
            )
            .answer(serde_json::to_value(tuned(false)).unwrap()),
        ];
        reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
            let error = cluster::reconcile(Arc::new(tuned(false)), ctx)
                .await
                .unwrap_err();
            assert_eq!(error.reason(), "ConfigMapUnusable");
        })
        .await;
    }
}

/// A shard set made by hand for a cluster that has its own (`prod-sequencers`).
fn second_shard_set() -> SequencerShardSet {
    let mut set = shard_set(1);
    set.metadata = meta("prod-sequencers-canary");
    set.metadata.finalizers = Some(vec![shard_set::FINALIZER.to_owned()]);
    set
}

/// A cluster runs the shard set it creates: a second one naming it would see the first one's
/// pods among the cluster's sequencers, holding shards that are not its own, and evacuate them
/// to its pods (in every mode), the first one evacuating them back, for good. It renders
/// nothing, samples nothing and says why.
#[tokio::test]
async fn a_second_shard_set_of_a_cluster_renders_nothing_and_moves_no_shard() {
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/sequencershardsets/prod-sequencers-canary/status",
            |body| {
                let ready = condition(body, "Ready");
                assert_eq!(ready["status"], "False");
                assert_eq!(ready["reason"], "NotTheClustersOwn");
                let message = ready["message"].as_str().unwrap();
                assert!(
                    message.contains("prod-sequencers-canary")
                        && message.contains("prod-sequencers"),
                    "{message}"
                );
            },
        )
        .answer(serde_json::to_value(second_shard_set()).unwrap()),
    ];
    reconciled(expected, data_plane.clone(), async |ctx| {
        let result = shard_set::reconcile(Arc::new(second_shard_set()), ctx).await;
        assert!(result.is_err(), "{result:?}");
    })
    .await;
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
    assert!(data_plane.admin.drains.lock().unwrap().is_empty());
}

/// A shard set being deleted drains its own pods, not every sequencer of its cluster: the
/// deletion of a set made by hand beside the cluster's own must not stop the cluster's
/// sequencers taking shards (a drained node takes none until it restarts).
#[tokio::test]
async fn deleting_a_shard_set_drains_its_own_pods_only() {
    let mut sample = sample(&[0, 1], &[0, 0, 1, 1], &[5.0, 5.0, 5.0, 5.0]);
    sample.nodes.insert(
        "prod-sequencers-canary-0".to_owned(),
        "10.1.0.9:7500".to_owned(),
    );
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample));
    let mut deleted = second_shard_set();
    deleted.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
        ));
    let expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            Method::GET,
            "/api/v1/namespaces/chat/secrets/courier-token",
            |_| {},
        )
        .answer(token_secret()),
        expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/chat/events",
            |body| {
                assert_eq!(body["reason"], "Released");
                assert_eq!(body["note"], "1 sequencer pods drained before deletion");
            },
        ),
        // The finalizer goes.
        expect(
            Method::PATCH,
            "/apis/courier.dev/v1alpha1/namespaces/chat/sequencershardsets/prod-sequencers-canary",
            |_| {},
        )
        .answer(serde_json::to_value(second_shard_set()).unwrap()),
    ];
    reconciled(expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(deleted), ctx).await.unwrap();
    })
    .await;
    assert_eq!(
        data_plane.admin.drains.lock().unwrap().clone(),
        ["prod-sequencers-canary-0"]
    );
}

/// A second gateway pool of a cluster (its own is `prod-gateways`) would take over the client
/// Service and count, mark and unmark the first one's pods (both select the cluster's gateway
/// pods): it lists no pod, applies nothing and says why.
#[tokio::test]
async fn a_second_gateway_pool_of_a_cluster_renders_nothing_and_says_why() {
    let mut second = pool();
    second.metadata = meta("prod-gateways-b");
    let answer = serde_json::to_value(&second).unwrap();
    let expected = vec![
        expect(
            Method::GET,
            "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod",
            |_| {},
        )
        .answer(serde_json::to_value(cluster(false)).unwrap()),
        expect(
            APPLY,
            "/apis/courier.dev/v1alpha1/namespaces/chat/gatewaypools/prod-gateways-b/status",
            |body| {
                let degraded = condition(body, "Degraded");
                assert_eq!(degraded["status"], "True");
                assert_eq!(degraded["reason"], "NotTheClustersOwn");
                assert!(
                    degraded["message"]
                        .as_str()
                        .unwrap()
                        .starts_with("GatewayPool prod-gateways-b names CourierCluster prod, whose GatewayPool is prod-gateways"),
                    "{degraded}"
                );
                assert_eq!(condition(body, "Ready")["status"], "False");
            },
        )
        .answer(answer),
    ];
    reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
        gateway_pool::reconcile(Arc::new(second), ctx)
            .await
            .unwrap();
    })
    .await;
}

/// A failed reconciliation is retried soon, then less and less often while the same object
/// goes on failing, up to a cap, and soon again once it has been reconciled; each object
/// backs off on its own. A flat 30 s retried a passing failure (a conflict, an API server
/// restarting) late, and a lasting one (a missing Secret, a refused object) twice a minute
/// for good, whatever it cost the API server.
#[tokio::test]
async fn a_failing_object_is_retried_sooner_then_less_often_and_afresh_once_reconciled() {
    use courier_operator::controllers::Error;
    use kube::runtime::controller::Action;
    let after = |seconds| Action::requeue(std::time::Duration::from_secs(seconds));
    // Woken between samples: a reconciliation that gets through.
    let expected = pool_between_samples(3, |_| {});
    reconciled(expected, Arc::new(FakeDataPlane::default()), async |ctx| {
        let failure = || Error::ClusterNotFound("prod".to_owned());
        let failed =
            |pool: GatewayPool| gateway_pool::error_policy(Arc::new(pool), &failure(), ctx.clone());
        let delays: Vec<Action> = (0..9).map(|_| failed(pool())).collect();
        assert_eq!(
            delays,
            [5, 10, 20, 40, 80, 160, 300, 300, 300].map(after),
            "from 5 s, doubled at each failure, at most 5 min"
        );
        let mut other = pool();
        other.metadata = meta("canary-gateways");
        assert_eq!(failed(other), after(5), "each object backs off on its own");
        let set = Arc::new(shard_set(2));
        assert_eq!(
            shard_set::error_policy(set, &failure(), ctx.clone()),
            after(5),
            "an object of another kind under the same name too"
        );
        sampled_before(&ctx, 3, Default::default(), 5_000);
        gateway_pool::reconcile(Arc::new(pool()), ctx.clone())
            .await
            .unwrap();
        assert_eq!(failed(pool()), after(5), "reconciled, it starts over");
    })
    .await;
}

/// A replica that lost the leader Lease while paused (past its expiry: another took it) and
/// resumes mid-reconciliation moves no shard and drains no pod on the sample it took before
/// (the new leader plans from its own), and writes no status: it learns it lost the Lease
/// only when its Lease's watch next reads it, which the reconciliation does not wait for.
#[tokio::test]
async fn a_replica_that_lost_the_lease_moves_no_shard_and_drains_no_pod() {
    // Pod 0 hot, as in `a_hot_sequencer_pod_gives_a_shard_to_the_other...`: a move is due.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 1, 1],
        &[100.0, 100.0, 0.0, 0.0],
    )));
    let expected = shard_set_reads_and_applies(2, 2);
    reconciled_leading(false, expected, data_plane.clone(), async |ctx| {
        plan_due(&ctx, &data_plane);
        let error = shard_set::reconcile(Arc::new(shard_set(2)), ctx)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains(
                "not the leader: the leader Lease is held by courier-operator-b, \
                 not by this replica (courier-operator-a)"
            ),
            "{error}"
        );
    })
    .await;
    assert!(data_plane.admin.moves.lock().unwrap().is_empty());
    // replicas 2 -> 1, pod 1 evacuated: it would be drained.
    let data_plane = Arc::new(FakeDataPlane::with_sample(sample(
        &[0, 1],
        &[0, 0, 0, 0],
        &[5.0, 5.0, 5.0, 5.0],
    )));
    let expected = shard_set_reads_and_applies(2, 2)
        .into_iter()
        .take(3)
        .collect();
    reconciled_leading(false, expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(shard_set(1)), ctx)
            .await
            .unwrap_err();
    })
    .await;
    assert!(data_plane.admin.drains.lock().unwrap().is_empty());
    // A set being deleted: its pods would be drained.
    let mut deleted = shard_set(2);
    deleted.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
        ));
    let expected = shard_set_reads_and_applies(2, 2)
        .into_iter()
        .enumerate()
        .filter(|(at, _)| [0, 2].contains(at))
        .map(|(_, read)| read)
        .collect();
    reconciled_leading(false, expected, data_plane.clone(), async |ctx| {
        shard_set::reconcile(Arc::new(deleted), ctx)
            .await
            .unwrap_err();
    })
    .await;
    assert!(data_plane.admin.drains.lock().unwrap().is_empty());
}

/// A Deployment of the cluster `prod` as the API server answers its apply: `name`, at
/// generation 5, its status `observed` at `observed_generation` with every one of its 2 pods
/// ready and `updated` of them on the current template.
fn applied_deployment(name: &str, observed_generation: i64, updated: i32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": { "name": name, "namespace": NS, "generation": 5 },
        "spec": { "replicas": 2, "selector": {}, "template": {} },
        "status": { "observedGeneration": observed_generation, "replicas": 2,
                    "readyReplicas": 2, "updatedReplicas": updated }
    })
}

/// A cluster's status says it is rolling out while any of its Deployments runs pods of an
/// older template: after an upgrade (a new `image`), the chat, media and fanout Deployments'
/// old pods stay ready while they are replaced, and the cluster said `Progressing` false,
/// `Settled`, for the whole rollout (and `kubectl wait --for=condition=Progressing=false`
/// returned at once).
#[tokio::test]
async fn a_cluster_whose_deployments_roll_out_says_it_is_progressing_until_they_are_done() {
    let status_path = "/apis/courier.dev/v1alpha1/namespaces/chat/courierclusters/prod/status";
    let ready_conditions = json!([
        { "type": "Ready", "status": "True", "reason": "Available", "message": "",
          "observedGeneration": 3, "lastTransitionTime": "2026-12-06T10:00:00Z" }
    ]);
    let mut pool = serde_json::to_value(pool()).unwrap();
    pool["status"] = json!({ "conditions": ready_conditions });
    let mut set = serde_json::to_value(shard_set(2)).unwrap();
    set["status"] = json!({ "conditions": ready_conditions });
    let requests = |chat: Value| {
        let mut requests = cluster_applies_before_push();
        let answers = [
            (0, pool.clone()),
            (1, set.clone()),
            (2, chat),
            (4, applied_deployment("prod-media", 5, 2)),
            (7, applied_deployment("prod-fanout", 5, 2)),
        ];
        for (at, answer) in answers {
            let path = requests[at].path.clone();
            requests[at] = expect(APPLY, &path, |_| {}).answer(answer);
        }
        requests.push(expect(
            APPLY,
            "/apis/apps/v1/namespaces/chat/deployments/prod-push",
            |_| {},
        ));
        requests
    };
    let status = async |chat: Value| {
        status_after(
            1_000_000,
            requests(chat),
            (status_path, serde_json::to_value(cluster(false)).unwrap()),
            Arc::new(FakeDataPlane::default()),
            |_| {},
            async |ctx| {
                cluster::reconcile(Arc::new(cluster(false)), ctx)
                    .await
                    .unwrap();
            },
        )
        .await
    };
    let state = |status: &Value, kind: &str| {
        let condition = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
            .clone();
        (condition["status"].clone(), condition["reason"].clone())
    };
    // Just applied: its controller has not seen the new template yet.
    let unseen = status(applied_deployment("prod-chat", 4, 2)).await;
    // Seen, none of its pods replaced yet.
    let replacing = status(applied_deployment("prod-chat", 5, 0)).await;
    for rolling in [&unseen, &replacing] {
        assert_eq!(state(rolling, "Ready"), (json!("True"), json!("Available")));
        assert_eq!(
            state(rolling, "Progressing"),
            (json!("True"), json!("RollingOut")),
            "{rolling}"
        );
        let message = rolling["conditions"][0]["message"].as_str().unwrap();
        assert!(message.contains("chat rolling out"), "{message}");
    }
    let done = status(applied_deployment("prod-chat", 5, 2)).await;
    assert_eq!(state(&done, "Ready"), (json!("True"), json!("Available")));
    assert_eq!(
        state(&done, "Progressing"),
        (json!("False"), json!("Settled"))
    );
}

/// A pool whose Deployment's controller has not yet seen the template just applied (its
/// status, of the generation before, counts every pod as updated) is still `Progressing`: it
/// said `Settled` at the start of each rollout, until its next sample, and the cluster took
/// the pool as rolled out.
#[tokio::test]
async fn a_pools_rollout_not_yet_seen_by_its_deployments_controller_is_progressing() {
    let data_plane = Arc::new(FakeDataPlane {
        connections: BTreeMap::from([("10.0.0.1".to_owned(), 900), ("10.0.0.2".to_owned(), 950)]),
        ..FakeDataPlane::default()
    });
    let mut applied = deployment(2);
    applied["metadata"]["generation"] = json!(5);
    applied["status"] = json!({
        "observedGeneration": 4, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2
    });
    let mut then = pool_applies(|_| {});
    let deployment_apply = then.remove(0).answer(applied);
    then.insert(0, deployment_apply);
    then.push(
        expect(APPLY, POOL_STATUS, |body| {
            assert_eq!(condition(body, "Ready")["status"], "True");
            let progressing = condition(body, "Progressing");
            assert_eq!(progressing["status"], "True", "{progressing}");
            assert_eq!(progressing["reason"], "RollingOut");
        })
        .answer(serde_json::to_value(pool()).unwrap()),
    );
    let pods = vec![
        gateway_pod("gw-a", "10.0.0.1"),
        gateway_pod("gw-b", "10.0.0.2"),
    ];
    reconciled(after_pool_reads(pods, 2, then), data_plane, async |ctx| {
        let busy = BTreeMap::from([("gw-a".to_owned(), 900), ("gw-b".to_owned(), 950)]);
        sampled_before(&ctx, 2, busy.into(), 600_000);
        gateway_pool::reconcile(Arc::new(pool()), ctx)
            .await
            .unwrap();
    })
    .await;
}
