//! Courier on a store node (`courier store-node`, `courier serve --store remote`): real
//! processes on 127.0.0.1, the store in another process than the server, real SIGKILLs.

mod support;

use courier_client::Target;
use courier_client::proto::EventPayload;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use support::{Server, WAIT, next_event};

const TOKEN: &str = "courier-test-cluster-token-0123456789abcdef";

fn binary() -> PathBuf {
    std::env::var_os("COURIER_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_courier")),
        PathBuf::from,
    )
}

/// A `courier store-node` process on an ephemeral port of 127.0.0.1.
struct StoreNode {
    child: Child,
    address: String,
    data_dir: PathBuf,
    token_file: PathBuf,
}

impl StoreNode {
    fn start(data_dir: &Path, token_file: &Path, listen: &str) -> StoreNode {
        let mut child = Command::new(binary())
            .args(["store-node", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .arg("--cluster-token-file")
            .arg(token_file)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the store node");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("store node ready on ").nth(1) {
                    let address = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(address.to_owned());
                }
            }
        });
        let address = rx.recv_timeout(WAIT).expect("the store node is ready");
        StoreNode {
            child,
            address,
            data_dir: data_dir.to_owned(),
            token_file: token_file.to_owned(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Starts again on the same directory and port.
    fn restart(&mut self) {
        self.kill9();
        *self = StoreNode::start(
            &self.data_dir.clone(),
            &self.token_file.clone(),
            &self.address.clone(),
        );
    }
}

impl Drop for StoreNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary directory with the cluster token file, and a store node in it.
fn store_node() -> (tempfile::TempDir, StoreNode) {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("cluster-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let node = StoreNode::start(&dir.path().join("store"), &token_file, "127.0.0.1:0");
    (dir, node)
}

fn remote_store_args(node: &StoreNode) -> Vec<String> {
    vec![
        "--store".into(),
        "remote".into(),
        "--store-address".into(),
        node.url(),
        "--cluster-token-file".into(),
        node.token_file.display().to_string(),
    ]
}

#[tokio::test]
async fn a_server_on_a_store_node_keeps_every_sent_message_across_a_sigkill_of_either() {
    let (_dir, mut store) = store_node();
    let server_dir = tempfile::tempdir().unwrap();
    let args = remote_store_args(&store);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Server::start_in(server_dir.path(), &args);
    assert!(
        !server_dir.path().join("store").exists(),
        "the server keeps no store of its own"
    );

    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    for i in 1..=10 {
        let sent = alice
            .send_text(Target::User("bob".into()), &format!("m{i}"), "hi")
            .await
            .unwrap();
        assert_eq!(sent.seq, i);
    }
    drop(alice);

    // The server dies: what it acknowledged is in the store node.
    server.kill9();
    let mut server = Server::start_in(server_dir.path(), &args);
    // The store node dies and comes back on the same port and directory.
    store.restart();
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let sent = alice
        .send_text(Target::User("bob".into()), "m11", "hi")
        .await
        .expect("sends work again once the store node is back");
    assert_eq!(sent.seq, 11, "nothing acknowledged was lost");

    let mut bob = server.connect("bob", "phone").await;
    let mut ids = Vec::new();
    while ids.len() < 11 {
        let event = next_event(&mut bob).await;
        if let EventPayload::Message { client_msg_id, .. } = event.payload {
            ids.push(client_msg_id);
        }
    }
    let expected: Vec<String> = (1..=11).map(|i| format!("m{i}")).collect();
    assert_eq!(ids, expected);
    server.kill9();
}

#[tokio::test]
async fn a_server_with_the_wrong_cluster_token_does_not_start() {
    let (dir, store) = store_node();
    let wrong = dir.path().join("wrong-token");
    std::fs::write(&wrong, "another-cluster-token-0123456789abcdefgh").unwrap();
    let server_dir = tempfile::tempdir().unwrap();
    let output = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(server_dir.path())
        .args(["--store", "remote", "--store-address", &store.url()])
        .arg("--cluster-token-file")
        .arg(&wrong)
        .output()
        .expect("run courier serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cluster token"),
        "the error names the cause: {stderr}"
    );
}
