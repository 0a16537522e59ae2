//! Black-box tests of a node whose data directory fills up, on a small tmpfs mounted by the
//! test. They need root (to mount); without it, or when the mount fails, they print why and
//! are skipped. CI runs them as root.

mod support;

use courier_client::proto::*;
use courier_client::{Client, ClientError, Target};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::Server;

const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (after saying why) when the test cannot mount one here.
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: mounting a tmpfs needs root (CI runs this test as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            other => {
                eprintln!("SKIPPED: cannot mount a tmpfs here: {other:?}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    /// Grows the filler file until at most `free` bytes are left (0: until the disk is full).
    fn fill_until(&self, free: u64) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.filler())
            .unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while free_bytes(self.path()) > free {
            let room = (free_bytes(self.path()) - free) as usize;
            if file.write_all(&chunk[..room.min(chunk.len())]).is_err() {
                break;
            }
            file.flush().unwrap();
        }
    }

    fn free_all(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn free_bytes(path: &Path) -> u64 {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string and a zeroed statvfs for the kernel to fill.
    unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        assert_eq!(libc::statvfs(c_path.as_ptr(), &mut stat), 0);
        stat.f_bavail as u64 * stat.f_frsize as u64
    }
}

async fn status(server: &Server, path: &str) -> u16 {
    reqwest::get(format!("{}{path}", server.http_url()))
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn upload(server: &Server, bytes: Vec<u8>) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", server.http_url()))
        .bearer_auth(server.token("alice", "phone"))
        .header("content-type", "image/png")
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn send(client: &mut Client, id: &str) -> Result<Sent, ClientError> {
    client
        .send(Target::User("bob".into()), id, Body::Text("x".repeat(1000)))
        .await
}

fn assert_unavailable(result: Result<Sent, ClientError>) {
    match result {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
}

/// Polls `check` until it holds.
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn low_disk_refuses_uploads_first_then_sends_and_recovers_when_space_returns() {
    let Some(disk) = Tmpfs::mount("16m") else {
        return;
    };
    let server = Server::start_in(
        &disk.path().join("data"),
        &["--min-free-disk", "4MiB", "--media-min-free-disk", "8MiB"],
    );
    let mut alice = server.connect("alice", "phone").await;
    send(&mut alice, "before").await.unwrap();
    assert_eq!(upload(&server, vec![1; 100]).await.0, 201);

    // Between the two thresholds: uploads are refused, sends still go through.
    disk.fill_until(6 << 20);
    wait_until("uploads are refused", || async {
        let (status, body) = upload(&server, vec![1; 100]).await;
        status == 503 && body["code"] == "unavailable"
    })
    .await;
    send(&mut alice, "between").await.unwrap();
    assert_eq!(status(&server, "/readyz").await, 200);

    // Below the lower one: sends are refused too, and the node is not ready.
    disk.fill_until(2 << 20);
    wait_until("the node is not ready", || async {
        status(&server, "/readyz").await == 503
    })
    .await;
    assert_unavailable(send(&mut alice, "low").await);
    assert_eq!(status(&server, "/healthz").await, 200, "still alive");

    // Space back: the same send goes through, and uploads again.
    disk.free_all();
    wait_until("the node is ready again", || async {
        status(&server, "/readyz").await == 200
    })
    .await;
    let sent = send(&mut alice, "low").await.unwrap();
    assert!(!sent.duplicate, "the refused send was not stored");
    assert_eq!(upload(&server, vec![2; 100]).await.0, 201);
}

#[tokio::test]
async fn a_store_that_hits_a_full_disk_says_unavailable_fails_health_and_restarts_with_every_sent_message()
 {
    let Some(disk) = Tmpfs::mount("16m") else {
        return;
    };
    let data = disk.path().join("data");
    let mut server = Server::start_in(
        &data,
        &["--min-free-disk", "0", "--media-min-free-disk", "0"],
    );
    let mut alice = server.connect("alice", "phone").await;
    let conv = send(&mut alice, "m0").await.unwrap().conversation_id;
    let mut sent = vec![0];
    while sent.len() < 50 {
        send(&mut alice, &format!("m{}", sent.len())).await.unwrap();
        sent.push(sent.len());
    }
    disk.fill_until(0);
    let failed = loop {
        let id = format!("m{}", sent.len());
        match send(&mut alice, &id).await {
            Ok(_) => {
                sent.push(sent.len());
                assert!(sent.len() < 10_000, "the disk never filled");
            }
            Err(e) => break (id, Err(e)),
        }
    };
    assert_unavailable(failed.1);
    assert_eq!(status(&server, "/readyz").await, 503, "not ready at once");
    assert_eq!(
        status(&server, "/healthz").await,
        503,
        "not alive: restart me"
    );
    disk.free_all();
    assert_unavailable(send(&mut alice, "after").await);

    // The supervisor restarts the node: every message answered `sent` is there.
    server.kill9();
    let server = Server::start_in(
        &data,
        &["--min-free-disk", "0", "--media-min-free-disk", "0"],
    );
    let mut alice = server.connect("alice", "phone").await;
    let page = alice.fetch(&conv, 0, Some(1000)).await.unwrap();
    let stored: Vec<String> = page
        .events
        .iter()
        .filter_map(|e| match &e.payload {
            EventPayload::Message { client_msg_id, .. } => Some(client_msg_id.clone()),
            _ => None,
        })
        .collect();
    for i in &sent {
        assert!(
            stored.contains(&format!("m{i}")),
            "m{i} was sent and is lost"
        );
    }
    send(&mut alice, &failed.0).await.unwrap();
    send(&mut alice, "after").await.unwrap();
    assert_eq!(status(&server, "/readyz").await, 200);
}
