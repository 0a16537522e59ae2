//! `courier backup` and `courier restore` as an operator runs them: a backup taken while the
//! server runs (and while it is stopped), restored into a new data directory that a server
//! then serves as the original did at the backup's moment.

mod support;

use courier_client::proto::*;
use courier_client::{Client, Target};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{Server, token_for};

fn courier(args: &[&str], paths: &[(&str, &Path)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_courier"));
    command.args(args);
    for (flag, path) in paths {
        command.arg(flag).arg(path);
    }
    command.output().unwrap()
}

fn succeeded(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{stderr}");
    stderr
}

fn failed(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "expected a failure: {stderr}");
    stderr
}

fn backup(data_dir: &Path, to: &Path) -> Output {
    courier(&["backup"], &[("--data-dir", data_dir), ("--to", to)])
}

fn restore(from: &Path, data_dir: &Path) -> Output {
    courier(&["restore"], &[("--from", from), ("--data-dir", data_dir)])
}

async fn upload(server: &Server, user: &str, bytes: Vec<u8>) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", server.http_url()))
        .bearer_auth(server.token(user, "phone"))
        .header("content-type", "image/png")
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

async fn download(server: &Server, user: &str, id: &str) -> (u16, Vec<u8>) {
    let response = reqwest::Client::new()
        .get(format!("{}/v1/media/{id}", server.http_url()))
        .bearer_auth(server.token(user, "phone"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

fn picture(uploaded: &serde_json::Value) -> Body {
    Body::Media(Box::new(Media {
        media_id: uploaded["media_id"].as_str().unwrap().to_owned(),
        mime: "ignored/by-server".into(),
        size: 0,
        sha256: String::new(),
        name: None,
        caption: None,
    }))
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 % 251) as u8).collect()
}

/// What `client`'s catch-up brings, as `(seq, text)` (`picture` for a media message).
async fn caught_up(client: &mut Client) -> Vec<(u64, String)> {
    let events = client.events_until_sync_done().await.unwrap();
    events
        .iter()
        .filter_map(|event| match &event.payload {
            EventPayload::Message {
                body: Some(Body::Text(text)),
                ..
            } => Some((event.seq, text.clone())),
            EventPayload::Message {
                body: Some(Body::Media(_)),
                ..
            } => Some((event.seq, "picture".to_owned())),
            _ => None,
        })
        .collect()
}

/// A backup (`whole.tar`, in a directory of its own) of a running server where alice has sent
/// bob `hello`.
struct Backed {
    archive: PathBuf,
    /// Where `archive` is, and where tests write the archives they make of it.
    archives: tempfile::TempDir,
    // Dropped in this order: the server before its data directory.
    _server: Server,
    data_dir: tempfile::TempDir,
}

async fn backup_of_a_message() -> Backed {
    let (data_dir, archives) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server = with_a_message(data_dir.path()).await;
    let archive = archives.path().join("whole.tar");
    succeeded(&backup(data_dir.path(), &archive));
    Backed {
        archive,
        archives,
        _server: server,
        data_dir,
    }
}

/// A server in `data_dir` where alice has sent bob `hello`.
async fn with_a_message(data_dir: &Path) -> Server {
    let server = Server::start_in(data_dir, &[]);
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    alice
        .send_text(Target::User("bob".into()), "m1", "hello")
        .await
        .unwrap();
    server
}

#[tokio::test]
async fn a_backup_of_a_running_server_restores_its_messages_media_and_tokens() {
    let (first, second, archives) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut server = Server::start_in(first.path(), &[]);
    let socket = first.path().join("backup.sock");
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600,
        "only the data directory's owner may take a backup"
    );
    let made_aside: Vec<_> = std::fs::read_dir(first.path())
        .unwrap()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(".b"))
        .collect();
    assert!(made_aside.is_empty(), "{made_aside:?}");
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let bob = Target::User("bob".into());
    for i in 1..=3 {
        alice
            .send_text(bob.clone(), &format!("m{i}"), &format!("text {i}"))
            .await
            .unwrap();
    }
    let bytes = pattern(300_000);
    let uploaded = upload(&server, "alice", bytes.clone()).await;
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    alice
        .send(bob.clone(), "m4", picture(&uploaded))
        .await
        .unwrap();

    let archive = archives.path().join("courier.tar");
    let said = succeeded(&backup(first.path(), &archive));
    assert!(said.contains("from the running server"), "{said}");
    assert!(said.contains("1 media"), "{said}");
    // After the backup's moment: not in it.
    alice
        .send_text(bob.clone(), "m5", "after the backup")
        .await
        .unwrap();
    drop(alice);
    server.terminate();

    succeeded(&restore(&archive, second.path()));
    let restored = Server::start_in(second.path(), &[]);
    // A token signed with the first server's secret is good on the restored one.
    let token = token_for(first.path(), "bob", "phone", 3600);
    let mut bob_phone = Client::connect(&restored.ws_url(), &token, Encoding::Json)
        .await
        .unwrap();
    assert_eq!(
        caught_up(&mut bob_phone).await,
        vec![
            (1, "text 1".to_owned()),
            (2, "text 2".to_owned()),
            (3, "text 3".to_owned()),
            (4, "picture".to_owned()),
        ],
        "the conversation as it was at the backup"
    );
    assert_eq!(download(&restored, "bob", &id).await, (200, bytes));

    // The conversation goes on from the restored head, delivered live.
    let mut alice = restored.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let sent = alice
        .send_text(bob.clone(), "m6", "after the restore")
        .await
        .unwrap();
    assert_eq!(sent.seq, 5);
    let live = support::next_event(&mut bob_phone).await;
    assert_eq!(live.seq, 5);
    // An idempotent retry of a send the backup holds finds its record.
    let retried = alice.send_text(bob, "m2", "text 2").await.unwrap();
    assert!(retried.duplicate);
    assert_eq!(retried.seq, 2);
}

#[tokio::test]
async fn a_stopped_server_is_backed_up_from_its_store_and_a_restore_never_overwrites_one() {
    let (first, archives) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut server = with_a_message(first.path()).await;
    server.terminate();

    let archive = archives.path().join("stopped.tar");
    let said = succeeded(&backup(first.path(), &archive));
    assert!(said.contains("no server running"), "{said}");

    let refused = failed(&restore(&archive, first.path()));
    assert!(refused.contains("already holds a store"), "{refused}");

    let second = tempfile::tempdir().unwrap();
    succeeded(&restore(&archive, second.path()));
    let restored = Server::start_in(second.path(), &[]);
    let mut bob = restored.connect("bob", "phone").await;
    assert_eq!(caught_up(&mut bob).await, vec![(1, "hello".to_owned())]);
}

#[tokio::test]
async fn a_damaged_or_cut_backup_is_refused_and_restores_nothing() {
    let backed = backup_of_a_message().await;
    let (archives, archive) = (backed.archives.path(), &backed.archive);
    let whole = std::fs::read(archive).unwrap();

    // One byte changed in the store's pairs (after the manifest's header and body).
    let mut damaged = whole.clone();
    damaged[2048] ^= 0x55;
    let target = tempfile::tempdir().unwrap();
    refused(archives, &damaged, target.path(), "damaged");

    // Cut inside its store's pairs, and cut where its last entry begins (the end's header
    // and body, and the archive's two closing blocks: 512 bytes each).
    for (cut, why) in [
        (whole.len() / 2, "damaged"),
        (whole.len() - 2048, "cut short"),
    ] {
        refused(archives, &whole[..cut], target.path(), why);
    }

    // And the whole one still restores into the same directory.
    succeeded(&restore(archive, target.path()));
    assert!(target.path().join("store").exists());
}

#[tokio::test]
async fn one_backup_at_a_time_and_a_reader_that_goes_frees_the_server_for_the_next() {
    use std::io::{BufRead, BufReader};
    let (first, archives) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let server = Server::start_in(first.path(), &[]);
    // More than the socket's buffers hold, so a reader that reads nothing holds the backup.
    upload(&server, "alice", pattern(4 << 20)).await;
    let stalled =
        std::os::unix::net::UnixStream::connect(first.path().join("backup.sock")).unwrap();
    let mut status = String::new();
    BufReader::new(&stalled).read_line(&mut status).unwrap();
    assert_eq!(status, "OK\n");

    let archive = archives.path().join("second.tar");
    let said = failed(&backup(first.path(), &archive));
    assert!(said.contains("already under way"), "{said}");
    assert!(!archive.exists(), "a failed backup leaves no file");

    drop(stalled);
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        let output = backup(first.path(), &archive);
        if output.status.success() {
            break;
        }
        let said = failed(&output);
        assert!(said.contains("already under way"), "{said}");
        assert!(
            std::time::Instant::now() < deadline,
            "the first backup never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(archive.exists());
}

/// A backup taken while messages are being sent holds each conversation up to one seq with
/// none missing below it: at least what was acknowledged before it began, and the restored
/// conversation goes on right after it.
#[tokio::test]
async fn a_backup_under_writes_holds_each_conversation_whole_up_to_its_moment() {
    let (first, second, archives) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut server = Server::start_in(first.path(), &["--user-sends-per-sec", "0"]);
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let (acked_tx, mut acked_rx) = tokio::sync::watch::channel(0u64);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let sending = tokio::spawn(async move {
        let mut i = 0u64;
        while !*stop_rx.borrow() {
            i += 1;
            let sent = alice
                .send_text(
                    Target::User("bob".into()),
                    &format!("m{i}"),
                    &format!("text {i}"),
                )
                .await
                .unwrap();
            assert_eq!(sent.seq, i);
            acked_tx.send_replace(i);
        }
        i
    });
    acked_rx.wait_for(|acked| *acked >= 200).await.unwrap();
    let acked_before = *acked_rx.borrow();
    let archive = archives.path().join("busy.tar");
    let data_dir = first.path().to_owned();
    let backed_up = {
        let archive = archive.clone();
        tokio::task::spawn_blocking(move || backup(&data_dir, &archive))
            .await
            .unwrap()
    };
    succeeded(&backed_up);
    stop_tx.send_replace(true);
    let sent = sending.await.unwrap();
    server.terminate();

    succeeded(&restore(&archive, second.path()));
    let restored = Server::start_in(second.path(), &[]);
    let mut bob = restored.connect("bob", "phone").await;
    let texts = caught_up(&mut bob).await;
    let held = texts.len() as u64;
    assert!(
        (acked_before..=sent).contains(&held),
        "{held} held, {acked_before} acknowledged before the backup, {sent} sent"
    );
    let expected: Vec<(u64, String)> = (1..=held).map(|i| (i, format!("text {i}"))).collect();
    assert_eq!(
        texts, expected,
        "every seq up to the backup's moment, none missing"
    );
    let mut alice = restored.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let next = alice
        .send_text(Target::User("bob".into()), "after", "after the restore")
        .await
        .unwrap();
    assert_eq!(next.seq, held + 1);
}

/// A data directory whose path is too long for a Unix socket (108 bytes): the server runs
/// without online backups, `courier backup` says why it cannot take one while it runs, and
/// takes one from the store once it has stopped.
#[tokio::test]
async fn a_data_directory_too_long_for_a_socket_is_backed_up_from_its_store() {
    let (base, archives, second) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let first = base.path().join("d".repeat(120));
    let mut server = with_a_message(&first).await;
    let archive = archives.path().join("long.tar");
    let refused = failed(&backup(&first, &archive));
    assert!(refused.contains("open in another process"), "{refused}");
    server.terminate();

    let said = succeeded(&backup(&first, &archive));
    assert!(said.contains("no server running"), "{said}");
    succeeded(&restore(&archive, second.path()));
    let restored = Server::start_in(second.path(), &[]);
    let mut bob = restored.connect("bob", "phone").await;
    assert_eq!(caught_up(&mut bob).await, vec![(1, "hello".to_owned())]);
}

/// A data directory whose `backup.sock` path fits a socket, however near its limit, has online
/// backups.
#[tokio::test]
async fn a_data_directory_near_the_socket_path_limit_is_backed_up_while_the_server_runs() {
    let (base, archives) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // `<data dir>/backup.sock` of 107 bytes, the longest a socket's path can be.
    let room = 107 - "/backup.sock".len() - base.path().as_os_str().len() - 1;
    let first = base.path().join("d".repeat(room));
    let _server = with_a_message(&first).await;
    let archive = archives.path().join("near.tar");
    let said = succeeded(&backup(&first, &archive));
    assert!(said.contains("from the running server"), "{said}");
}

/// A restore that fails once the archive is read (here, the token secret cannot be put in
/// place) leaves no store a server would open without it.
#[tokio::test]
async fn a_restore_that_cannot_place_the_token_secret_places_no_store() {
    let (backed, target) = (backup_of_a_message().await, tempfile::tempdir().unwrap());
    let archive = &backed.archive;

    // A directory where the secret goes, with something in it: no file can be moved there.
    std::fs::create_dir_all(target.path().join("jwt-secret").join("in the way")).unwrap();
    failed(&restore(archive, target.path()));
    assert!(
        !target.path().join("store").exists(),
        "no store without its secret"
    );

    std::fs::remove_dir_all(target.path().join("jwt-secret")).unwrap();
    succeeded(&restore(archive, target.path()));
    assert!(target.path().join("store").exists());
    assert!(target.path().join("jwt-secret").is_file());
}

/// `archive` rewritten entry by entry: `change` gives an entry's new bytes, or `None` to keep
/// them.
fn rewritten(archive: &Path, change: impl Fn(&str, &[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    use std::io::Read;
    let mut input = tar::Archive::new(std::fs::File::open(archive).unwrap());
    let mut out = tar::Builder::new(Vec::new());
    let mut append = |path: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        header.set_entry_type(tar::EntryType::Regular);
        out.append_data(&mut header, path, bytes).unwrap();
    };
    for entry in input.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        let bytes = change(&path, &bytes).unwrap_or(bytes);
        append(&path, &bytes);
    }
    out.into_inner().unwrap()
}

/// `archive` with its manifest changed by `edit`.
fn with_manifest(archive: &Path, edit: impl Fn(&mut serde_json::Value)) -> Vec<u8> {
    rewritten(archive, |path, bytes| {
        (path == "courier-backup.json").then(|| {
            let mut manifest: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            edit(&mut manifest);
            serde_json::to_vec(&manifest).unwrap()
        })
    })
}

/// `courier restore` refuses the archive `bytes` (written in `archives`), saying `why`, and
/// puts no store in `target`.
fn refused(archives: &Path, bytes: &[u8], target: &Path, why: &str) {
    let archive = archives.join("refused.tar");
    std::fs::write(&archive, bytes).unwrap();
    let said = failed(&restore(&archive, target));
    assert!(said.contains(why), "{said}");
    assert!(!said.contains("   "), "a message to read: {said}");
    assert!(!target.join("store").exists(), "nothing restored");
}

/// A manifest whose commit versions' ceiling no store reaches (its next stamps would wrap past
/// `u64::MAX`, below those it holds) is refused, and nothing is restored.
#[tokio::test]
async fn a_backup_whose_ceiling_no_store_reaches_is_refused() {
    let (backed, target) = (backup_of_a_message().await, tempfile::tempdir().unwrap());
    let (archives, archive) = (backed.archives.path(), &backed.archive);
    let hostile = with_manifest(archive, |manifest| {
        manifest["commit_version_ceiling"] = u64::MAX.into();
    });
    refused(archives, &hostile, target.path(), "ceiling");
}

/// A token secret the restored server would refuse to start with (empty, or too short) is
/// refused by the restore, and nothing is restored.
#[tokio::test]
async fn a_backup_whose_token_secret_a_server_refuses_is_refused() {
    let backed = backup_of_a_message().await;
    let (archives, archive) = (backed.archives.path(), &backed.archive);
    for secret in [&b""[..], b"short\n", &[0xff; 64]] {
        let target = tempfile::tempdir().unwrap();
        let hostile = rewritten(archive, |path, _| {
            (path == "jwt-secret").then(|| secret.to_vec())
        });
        refused(archives, &hostile, target.path(), "jwt-secret is damaged");
        assert!(
            !target.path().join("jwt-secret").exists(),
            "nothing restored"
        );
    }
}

/// With the server stopped, a `--media-dir` that is not there is refused (a backup without the
/// media would have been written), and with none given, where the server kept its media
/// elsewhere, the backup says that no media bytes are in it.
#[tokio::test]
async fn a_stopped_servers_backup_refuses_a_missing_media_dir_and_says_when_none_is_copied() {
    let (first, media, archives) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let media_flag = media.path().to_str().unwrap();
    let mut server = Server::start_in(first.path(), &["--media-dir", media_flag]);
    upload(&server, "alice", pattern(1000)).await;
    server.terminate();

    let archive = archives.path().join("media.tar");
    let missing = first.path().join("no such directory");
    let said = failed(&courier(
        &["backup"],
        &[
            ("--data-dir", first.path()),
            ("--to", &archive),
            ("--media-dir", &missing),
        ],
    ));
    assert!(said.contains("--media-dir"), "{said}");
    assert!(!archive.exists(), "a failed backup leaves no file");

    let said = succeeded(&backup(first.path(), &archive));
    assert!(said.contains("no media bytes"), "{said}");

    let said = succeeded(&courier(
        &["backup"],
        &[
            ("--data-dir", first.path()),
            ("--to", &archive),
            ("--media-dir", media.path()),
        ],
    ));
    assert!(said.contains("1 media"), "{said}");
}

/// A server asked to stop (SIGTERM) while a backup's reader holds it stops at once, and the
/// reader finds the archive cut short, not whole.
#[tokio::test]
async fn a_server_stopping_under_a_backup_stops_and_the_backup_is_cut_short() {
    use std::io::{BufRead, BufReader, Read};
    let (first, archives) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut server = Server::start_in(first.path(), &[]);
    upload(&server, "alice", pattern(4 << 20)).await;
    let stalled =
        std::os::unix::net::UnixStream::connect(first.path().join("backup.sock")).unwrap();
    let mut reader = BufReader::new(&stalled);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert_eq!(status, "OK\n");

    let stopping = std::thread::spawn(move || server.terminate());
    let deadline = std::time::Instant::now() + support::WAIT;
    while !stopping.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not stop"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(stopping.join().unwrap().success());
    assert!(!first.path().join("backup.sock").exists());

    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    let cut = archives.path().join("cut.tar");
    std::fs::write(&cut, &rest).unwrap();
    let target = tempfile::tempdir().unwrap();
    let said = failed(&courier(
        &["restore"],
        &[("--from", &cut), ("--data-dir", target.path())],
    ));
    assert!(
        said.contains("cut short") || said.contains("damaged"),
        "{said}"
    );
    assert!(!target.path().join("store").exists(), "{said}");
}

/// A backup cut after its media leaves none of them in the media directory: a server started
/// there would keep them for good, with no record of them to sweep.
#[tokio::test]
async fn a_backup_cut_after_its_media_restores_none_of_them() {
    let (first, archives, target) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let server = Server::start_in(first.path(), &[]);
    upload(&server, "alice", pattern(1000)).await;
    let archive = archives.path().join("whole.tar");
    succeeded(&backup(first.path(), &archive));
    // Everything but the end (its header, its body, the two closing blocks).
    let whole = std::fs::read(&archive).unwrap();
    let cut = archives.path().join("cut.tar");
    std::fs::write(&cut, &whole[..whole.len() - 2048]).unwrap();

    let said = failed(&restore(&cut, target.path()));
    assert!(said.contains("cut short"), "{said}");
    let media = target.path().join("media");
    let left: Vec<_> = walk(&media);
    assert!(left.is_empty(), "{left:?}");

    succeeded(&restore(&archive, target.path()));
    assert_eq!(walk(&media).len(), 1);
}

/// The files under `dir`, however deep.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().unwrap().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

/// A manifest whose commit versions' ceiling was changed (one digit) is refused as damaged: a
/// store restored with a lower one would stamp its commits with versions its outbox holds.
#[tokio::test]
async fn a_backup_whose_ceiling_was_changed_is_refused_as_damaged() {
    let (backed, target) = (backup_of_a_message().await, tempfile::tempdir().unwrap());
    let (archives, archive) = (backed.archives.path(), &backed.archive);
    let changed = with_manifest(archive, |manifest| {
        let ceiling = manifest["commit_version_ceiling"].as_u64().unwrap();
        assert!(ceiling > 0, "{manifest}");
        manifest["commit_version_ceiling"] = (ceiling - 1).into();
    });
    refused(archives, &changed, target.path(), "damaged");
}

/// Another user of the machine cannot take a backup, even of a data directory that others may
/// enter: the socket is its owner's alone. (Needs root, to run the attacker as `nobody`.)
#[tokio::test]
async fn another_user_cannot_take_a_backup_of_a_data_directory_others_may_enter() {
    use std::os::unix::process::CommandExt;
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a command as another user");
        return;
    }
    let (first, archives) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [first.path(), archives.path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let _server = with_a_message(first.path()).await;
    let archive = archives.path().join("stolen.tar");
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["backup", "--data-dir"])
        .arg(first.path())
        .arg("--to")
        .arg(&archive)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let said = failed(&output);
    assert!(said.contains("ermission denied"), "{said}");
    assert!(!archive.exists());
}

/// An archive with an entry whose name needs a GNU long-name header (never written by
/// `courier backup`) is refused at that header, before anything of it is read: merged into
/// the next entry's name, a hostile header's bytes were read into memory whole.
#[test]
fn an_entry_named_in_a_long_name_header_is_refused_before_it_is_read() {
    let (archives, target) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut tar = tar::Builder::new(Vec::new());
    let manifest = serde_json::json!({
        "format": 1, "courier": "0", "created_ms": 0, "commit_version_ceiling": 0
    })
    .to_string();
    let long_name = format!("media/{}", "a".repeat(200));
    for (path, bytes) in [
        ("courier-backup.json", manifest.as_bytes()),
        (&long_name, b"x"),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o600);
        tar.append_data(&mut header, path, bytes).unwrap();
    }
    let long = tar.into_inner().unwrap();
    refused(archives.path(), &long, target.path(), "@LongLink");
}

/// A `courier restore` into `data_dir` reading the archive from its standard input, given the
/// first `part` of `archive`'s bytes and held there, its staging store made.
fn restore_held_after(archive: &Path, part: usize, data_dir: &Path) -> std::process::Child {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["restore", "--from", "-", "--data-dir"])
        .arg(data_dir)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let whole = std::fs::read(archive).unwrap();
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(&whole[..part]).unwrap();
    stdin.flush().unwrap();
    let staged = data_dir.join("store.restoring").join("version");
    let deadline = std::time::Instant::now() + support::WAIT;
    while !staged.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the restore never began its store"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child
}

/// A server on `data_dir` serves bob the message of [`backup_of_a_message`].
async fn serves_the_message(data_dir: &Path) {
    let restored = Server::start_in(data_dir, &[]);
    let mut bob = restored.connect("bob", "phone").await;
    assert_eq!(caught_up(&mut bob).await, vec![(1, "hello".to_owned())]);
}

/// A restore killed midway (`kill -9`, a lost SSH session, the machine stopping) leaves its
/// staging directories: the next restore into the same data directory clears them, says so,
/// and leaves none behind.
#[tokio::test]
async fn a_restore_killed_midway_is_cleared_by_the_next_one_which_says_so() {
    let (backed, target) = (backup_of_a_message().await, tempfile::tempdir().unwrap());
    // The manifest (a header and a block) and the next entry's header.
    let mut killed = restore_held_after(&backed.archive, 1536, target.path());
    killed.kill().unwrap();
    killed.wait().unwrap();
    let staging = target.path().join("store.restoring");
    assert!(staging.exists(), "the killed restore left its staging");

    let said = succeeded(&restore(&backed.archive, target.path()));
    assert!(
        said.contains(&format!("cleared {}", staging.display())),
        "{said}"
    );
    assert!(said.contains("cut short"), "{said}");
    assert!(!staging.exists());
    assert!(!target.path().join("media").join("restoring").exists());
    serves_the_message(target.path()).await;
}

/// Two restores into one data directory at once: the second is refused and deletes nothing
/// of the first, which ends whole (the second deleted the first's staging store and wrote its
/// own there, and the first moved that one, half written, into place or failed).
#[tokio::test]
async fn a_restore_into_a_data_directory_another_restore_is_writing_is_refused() {
    use std::io::Write;
    let (backed, target) = (backup_of_a_message().await, tempfile::tempdir().unwrap());
    let mut first = restore_held_after(&backed.archive, 1536, target.path());

    let said = failed(&restore(&backed.archive, target.path()));
    assert!(said.contains("another `courier restore`"), "{said}");

    let whole = std::fs::read(&backed.archive).unwrap();
    let mut stdin = first.stdin.take().unwrap();
    stdin.write_all(&whole[1536..]).unwrap();
    drop(stdin);
    succeeded(&first.wait_with_output().unwrap());
    serves_the_message(target.path()).await;
}

/// A directory where a restore stages its store or its media that a restore did not make
/// (no mark of one) is refused, and nothing in it deleted.
#[tokio::test]
async fn a_restore_deletes_no_staging_directory_it_did_not_make() {
    let backed = backup_of_a_message().await;
    for staging in ["store.restoring", "media/restoring"] {
        let target = tempfile::tempdir().unwrap();
        let theirs = target.path().join(staging);
        std::fs::create_dir_all(&theirs).unwrap();
        std::fs::write(theirs.join("precious"), b"not a restore's").unwrap();

        let said = failed(&restore(&backed.archive, target.path()));
        assert!(said.contains("is in the way"), "{said}");
        assert_eq!(
            std::fs::read(theirs.join("precious")).unwrap(),
            b"not a restore's"
        );
        assert!(!target.path().join("store").exists());
    }
}

/// What a device that received messages sent after the backup sees once the server is
/// restored (`docs/operations.md`, "After a restore"): it is served from the restored head
/// whatever cursor it claims, its ack past the head is refused `bad_request`, and the new
/// message takes a seq it holds, with another `server_msg_id`, by which a client can tell.
#[tokio::test]
async fn a_device_ahead_of_a_restored_server_can_tell_its_copy_is_no_longer_the_servers() {
    let (first, second, archives) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut server = with_a_message(first.path()).await;
    let archive = archives.path().join("before.tar");
    succeeded(&backup(first.path(), &archive));
    let mut bob = server.connect("bob", "phone").await;
    bob.events_until_sync_done().await.unwrap();
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let lost = alice
        .send_text(Target::User("bob".into()), "m2", "lost by the restore")
        .await
        .unwrap();
    let held = support::next_event(&mut bob).await;
    assert_eq!((held.seq, &held.server_msg_id), (2, &lost.server_msg_id));
    let conv = lost.conversation_id.clone();
    bob.ack(&conv, 2, AckKind::Delivered).await.unwrap();
    drop((alice, bob));
    server.terminate();

    succeeded(&restore(&archive, second.path()));
    let restored = Server::start_in(second.path(), &[]);
    let mut bob = restored.connect("bob", "phone").await;
    assert_eq!(caught_up(&mut bob).await, vec![(1, "hello".to_owned())]);
    let claimed = std::collections::BTreeMap::from([(conv.clone(), 2)]);
    assert!(bob.sync(claimed).await.unwrap().is_empty());
    bob.ack(&conv, 2, AckKind::Delivered).await.unwrap();
    let refused = loop {
        if let ServerFrame::Error(e) = bob.next_frame_within(support::WAIT).await.unwrap() {
            break e;
        }
    };
    assert_eq!(refused.code, ErrorCode::BadRequest, "{refused:?}");
    assert!(refused.message.contains("beyond"), "{refused:?}");

    let mut alice = restored.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let new = alice
        .send_text(Target::User("bob".into()), "m3", "after the restore")
        .await
        .unwrap();
    let live = support::next_event(&mut bob).await;
    assert_eq!(live.seq, 2, "a seq bob holds");
    assert_eq!(live.server_msg_id, new.server_msg_id);
    assert_ne!(live.server_msg_id, held.server_msg_id, "bob can tell");
}

/// A server started on a data directory where a restore was cut short (or is under way) is
/// refused: it started with an empty store and a new token secret, and the restore, run
/// again, was refused for the store it had made. Once the restore is run again, it starts.
#[tokio::test]
async fn a_server_is_not_started_where_a_restore_was_cut_short() {
    let (backed, target) = (backup_of_a_message().await, tempfile::tempdir().unwrap());
    let mut killed = restore_held_after(&backed.archive, 1536, target.path());
    killed.kill().unwrap();
    killed.wait().unwrap();

    let mut serve = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(target.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + support::WAIT;
    while serve.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            serve.kill().unwrap();
            panic!("the server started on a data directory a restore had not finished");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let said = failed(&serve.wait_with_output().unwrap());
    assert!(said.contains("did not finish"), "{said}");
    assert!(!target.path().join("store").exists());

    succeeded(&restore(&backed.archive, target.path()));
    serves_the_message(target.path()).await;
}

/// The hidden files in `dir` (a backup's file while it is written).
fn hidden_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// A backup killed while it writes (`kill -9`, a cron job's timeout, the machine stopping)
/// leaves its file beside `--to`, as large as what it wrote: the next backup into that
/// directory removes it and says so, and keeps the file of a backup under way and a file it
/// did not write.
#[tokio::test]
async fn a_backup_killed_midway_leaves_a_file_the_next_one_removes() {
    use std::io::Write;
    let backed = backup_of_a_message().await;
    let archives = backed.archives.path();
    // A server that begins each backup and sends nothing more.
    let held = tempfile::tempdir().unwrap();
    let listener = std::os::unix::net::UnixListener::bind(held.path().join("backup.sock")).unwrap();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut streams = Vec::new();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            stream.write_all(b"OK\n").unwrap();
            streams.push(stream);
            if accepted_tx.send(()).is_err() {
                break;
            }
        }
    });
    let held_backup = |to: &str| {
        let child = Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["backup", "--data-dir"])
            .arg(held.path())
            .arg("--to")
            .arg(archives.join(to))
            .spawn()
            .unwrap();
        accepted.recv_timeout(support::WAIT).unwrap();
        child
    };
    let theirs = archives.join(".courier-backup-theirs.partial");
    std::fs::write(&theirs, b"not a backup's").unwrap();
    let mut under_way = held_backup("under-way.tar");
    let before = hidden_in(archives);
    let mut killed = held_backup("killed.tar");
    killed.kill().unwrap();
    killed.wait().unwrap();
    let left = hidden_in(archives);
    assert_eq!(left.len(), before.len() + 1, "{before:?} -> {left:?}");

    let said = succeeded(&backup(backed.data_dir.path(), &archives.join("next.tar")));
    assert!(said.contains("cut short"), "{said}");
    assert_eq!(
        hidden_in(archives),
        before,
        "the killed one's file removed, no other"
    );
    assert_eq!(std::fs::read(&theirs).unwrap(), b"not a backup's");
    under_way.kill().unwrap();
    under_way.wait().unwrap();
}
