//! The leader Lease against a fake API server that keeps one Lease (`tower-test`): on a
//! shutdown the controllers stop first, then the Lease is released (its holder cleared), so
//! that no replica holds it past the leader's exit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use courier_operator::leader;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use kube_lease_manager::LeaseManagerBuilder;
use serde_json::{Value, json};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/courier-operator";

/// What happened, in order: `held by <identity>`, `released`, `controllers stopped`.
type Log = Arc<Mutex<Vec<String>>>;

/// An API server holding one Lease: GET reads it (404 before it exists), POST creates it, a
/// PATCH merges its `spec` (a null removes the field). Every change of holder is logged.
fn lease_server(log: Log) -> Client {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut lease: Option<Value> = None;
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, answer) = match (parts.method.clone(), parts.uri.path()) {
                (Method::GET, LEASE) => match &lease {
                    Some(lease) => (200, lease.clone()),
                    None => (404, not_found()),
                },
                (Method::POST, path) if LEASE.starts_with(path) => {
                    let mut created = body.clone();
                    created["metadata"]["resourceVersion"] = json!("1");
                    lease = Some(created.clone());
                    (201, created)
                }
                (Method::PATCH, LEASE) => {
                    let current = lease.get_or_insert_with(|| json!({"spec": {}}));
                    if !current["spec"].is_object() {
                        current["spec"] = json!({});
                    }
                    let before = current["spec"]["holderIdentity"].clone();
                    for (key, value) in body["spec"].as_object().cloned().unwrap_or_default() {
                        let spec = current["spec"].as_object_mut().unwrap();
                        match value {
                            Value::Null => spec.remove(&key),
                            value => spec.insert(key, value),
                        };
                    }
                    let after = current["spec"]["holderIdentity"].clone();
                    if before != after {
                        log.lock().unwrap().push(match after.as_str() {
                            Some(holder) => format!("held by {holder}"),
                            None => "released".to_owned(),
                        });
                    }
                    (200, current.clone())
                }
                (method, path) => panic!("unexpected {method} {path}"),
            };
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    Client::new(service, "ops")
}

fn not_found() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
        "reason": "NotFound", "code": 404, "message": "not found"
    })
}

#[tokio::test]
async fn on_shutdown_the_controllers_stop_and_then_the_lease_is_released() {
    let log: Log = Arc::default();
    let client = lease_server(log.clone());
    let manager = LeaseManagerBuilder::new(client, "courier-operator")
        .with_namespace("ops")
        .with_identity("operator-0")
        .build()
        .await
        .unwrap();
    let (leader, lease_task) = manager.watch().await;
    let (shut_down, shutdown) = tokio::sync::oneshot::channel::<()>();
    let (leading_tx, leading) = tokio::sync::oneshot::channel::<()>();
    let controllers = {
        let log = log.clone();
        move |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
            let _ = leading_tx.send(());
            let _ = stopped.wait_for(|stop| *stop).await;
            log.lock().unwrap().push("controllers stopped".to_owned());
        }
    };
    let led = tokio::spawn(leader::lead(leader, lease_task, controllers, async {
        let _ = shutdown.await;
    }));
    tokio::time::timeout(Duration::from_secs(30), leading)
        .await
        .expect("led within the deadline")
        .unwrap();
    shut_down.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), led)
        .await
        .expect("ended within the deadline")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    assert_eq!(
        *log.lock().unwrap(),
        ["held by operator-0", "controllers stopped", "released"]
    );
}

/// The fence the controllers ask before each move or drain: only the replica holding the Lease,
/// within its hold, is confirmed as the leader; a standby, a replica whose hold expired (it
/// paused past the renewal) and any replica while no one holds the Lease are not.
#[tokio::test]
async fn only_the_holder_of_an_unexpired_lease_is_confirmed_as_the_leader() {
    use leader::{Leadership, LeaseFence, NotLeader};
    let client = lease_server(Arc::default());
    let fence =
        |identity: &str| LeaseFence::new(client.clone(), "ops", "courier-operator", identity);
    let now_ms = || {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
        now.unwrap().as_millis() as u64
    };
    assert!(matches!(
        fence("operator-0").confirm(now_ms()).await,
        Err(NotLeader::NotHeld { holder: None, .. })
    ));
    let manager = LeaseManagerBuilder::new(client.clone(), "courier-operator")
        .with_namespace("ops")
        .with_identity("operator-0")
        .build()
        .await
        .unwrap();
    assert!(
        manager.changed().await.unwrap(),
        "operator-0 holds the Lease"
    );
    fence("operator-0").confirm(now_ms()).await.unwrap();
    let standby = fence("operator-1").confirm(now_ms()).await.unwrap_err();
    assert_eq!(
        standby.to_string(),
        "the leader Lease is held by operator-0, not by this replica (operator-1)"
    );
    // The Lease lasts 30 s from its renewal: a minute on, the hold has lapsed.
    match fence("operator-0").confirm(now_ms() + 60_000).await {
        Err(NotLeader::Expired { ago_ms }) => assert!(ago_ms >= 29_000, "{ago_ms}"),
        other => panic!("{other:?}"),
    }
    manager.release().await.unwrap();
    assert!(matches!(
        fence("operator-0").confirm(now_ms()).await,
        Err(NotLeader::NotHeld { holder: None, .. })
    ));
}
