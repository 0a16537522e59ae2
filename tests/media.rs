//! Black-box tests of media upload and download against a real `courier serve`.

mod support;

use courier_client::proto::*;
use courier_client::{ClientError, Target};
use support::{Server, start};

async fn upload(
    server: &Server,
    user: &str,
    mime: &str,
    bytes: Vec<u8>,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/media", server.http_url()))
        .bearer_auth(server.token(user, "phone"))
        .header("content-type", mime)
        .body(bytes)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn download(
    server: &Server,
    user: &str,
    id: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(format!("{}/v1/media/{id}", server.http_url()))
        .bearer_auth(server.token(user, "phone"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn media_body(uploaded: &serde_json::Value) -> Body {
    Body::Media(Box::new(Media {
        media_id: uploaded["media_id"].as_str().unwrap().to_owned(),
        mime: "ignored/by-server".into(),
        size: 0,
        sha256: String::new(),
        name: Some("photo.jpg".into()),
        caption: Some("look".into()),
    }))
}

#[tokio::test]
async fn upload_then_members_download_with_ranges_and_etags() {
    let (_dir, server) = start(&[]);
    let bytes = pattern(3 * 1024 * 1024 + 17);
    let (status, uploaded) = upload(&server, "alice", "image/jpeg", bytes.clone()).await;
    assert_eq!(status, 201, "{uploaded}");
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    assert_eq!(uploaded["sha256"], sha.as_str());
    assert_eq!(uploaded["size"], bytes.len() as u64);
    assert_eq!(uploaded["mime"], "image/jpeg");
    let id = uploaded["media_id"].as_str().unwrap().to_owned();

    // Bob may not read it until a message shares it with him.
    assert_eq!(download(&server, "bob", &id, &[]).await.status(), 404);
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    alice
        .send(Target::User("bob".into()), "pic", media_body(&uploaded))
        .await
        .unwrap();
    let mut bob = server.connect("bob", "phone").await;
    let events = bob.events_until_sync_done().await.unwrap();
    match &events[0].payload {
        EventPayload::Message {
            body: Some(Body::Media(m)),
            ..
        } => {
            assert_eq!(
                (m.mime.as_str(), m.size, m.sha256.as_str()),
                ("image/jpeg", bytes.len() as u64, sha.as_str()),
                "facts come from the upload"
            );
            assert_eq!(m.caption.as_deref(), Some("look"));
        }
        other => panic!("expected a media message, got {other:?}"),
    }

    let full = download(&server, "bob", &id, &[]).await;
    assert_eq!(full.status(), 200);
    assert_eq!(full.headers()["content-type"], "image/jpeg");
    let etag = full.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{sha}\""));
    assert_eq!(full.bytes().await.unwrap().as_ref(), bytes.as_slice());

    let part = download(&server, "bob", &id, &[("range", "bytes=1000-1999")]).await;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 1000-1999/{}", bytes.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &bytes[1000..2000]);
    let tail = download(&server, "bob", &id, &[("range", "bytes=-10")]).await;
    assert_eq!(
        tail.bytes().await.unwrap().as_ref(),
        &bytes[bytes.len() - 10..]
    );
    assert_eq!(
        download(&server, "bob", &id, &[("range", "bytes=999999999-")])
            .await
            .status(),
        416
    );
    assert_eq!(
        download(&server, "bob", &id, &[("if-none-match", &etag)])
            .await
            .status(),
        304
    );
    assert_eq!(
        download(&server, "mallory", &id, &[]).await.status(),
        404,
        "non-members get 404"
    );
    assert_eq!(download(&server, "bob", "0000", &[]).await.status(), 404);
}

/// Every `Range` gets the answer RFC 9110 gives it (14.1, 14.2, 13.1.5): a range of bytes
/// that overlaps the media 206 with exactly those bytes (however large its numbers), one that
/// starts past the end 416 with `Content-Range: bytes */size`, and whatever the server does
/// not serve as a range (another unit, several ranges, a malformed one, an `If-Range` that
/// does not match) the whole media, 200: the client asked for bytes it may have.
#[tokio::test]
async fn range_requests_get_the_answers_of_rfc_9110() {
    let (_dir, server) = start(&[]);
    let bytes = pattern(1000);
    let (status, uploaded) = upload(&server, "alice", "video/mp4", bytes.clone()).await;
    assert_eq!(status, 201, "{uploaded}");
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    let etag = format!("\"{}\"", uploaded["sha256"].as_str().unwrap());
    let huge = "99999999999999999999999";
    type Headers<'a> = &'a [(&'a str, &'a str)];
    let parts: [(Headers, (usize, usize)); 6] = [
        (&[("range", "bytes=10-19")], (10, 20)),
        (&[("range", "bytes=990-")], (990, 1000)),
        (&[("range", "bytes=-5")], (995, 1000)),
        (&[("range", &format!("bytes=0-{huge}"))], (0, 1000)),
        (&[("range", &format!("bytes=-{huge}"))], (0, 1000)),
        (&[("range", "bytes=10-19"), ("if-range", &etag)], (10, 20)),
    ];
    for (headers, (start, end)) in parts {
        let part = download(&server, "alice", &id, headers).await;
        assert_eq!(part.status(), 206, "{headers:?}");
        assert_eq!(
            part.headers()["content-range"],
            format!("bytes {start}-{}/1000", end - 1).as_str(),
            "{headers:?}"
        );
        assert_eq!(
            part.headers()["content-length"],
            (end - start).to_string().as_str()
        );
        assert_eq!(part.bytes().await.unwrap().as_ref(), &bytes[start..end]);
    }
    for range in [
        "bytes=1000-",
        "bytes=1000-2000",
        &format!("bytes={huge}-"),
        "bytes=-0",
    ] {
        let refused = download(&server, "alice", &id, &[("range", range)]).await;
        assert_eq!(refused.status(), 416, "{range}");
        assert_eq!(
            refused.headers()["content-range"],
            "bytes */1000",
            "{range}"
        );
    }
    let whole: [Headers; 6] = [
        &[("range", "items=0-9")],
        &[("range", "bytes=0-1,5-6")],
        &[("range", "bytes=5-1")],
        &[("range", "bytes=ten-")],
        &[("range", "bytes=-")],
        &[
            ("range", "bytes=10-19"),
            ("if-range", "\"another-version\""),
        ],
    ];
    for headers in whole {
        let served = download(&server, "alice", &id, headers).await;
        assert_eq!(served.status(), 200, "{headers:?}");
        assert!(served.headers().get("content-range").is_none());
        assert_eq!(served.bytes().await.unwrap().as_ref(), bytes.as_slice());
    }
}

/// `If-None-Match` compares entity tags weakly (RFC 9110, 13.1.2, a must): a cache that holds
/// the media under a weakened ETag (`W/"<sha256>"`, as a CDN or proxy that compresses makes
/// it) revalidates with it and gets 304. It got the whole media again, at every revalidation.
#[tokio::test]
async fn a_weakened_etag_revalidates_the_media() {
    let (_dir, server) = start(&[]);
    let (_, uploaded) = upload(&server, "alice", "video/mp4", pattern(1000)).await;
    let id = uploaded["media_id"].as_str().unwrap();
    let weak = format!("W/\"{}\"", uploaded["sha256"].as_str().unwrap());
    let listed = format!("\"0000\", {weak}");
    for tags in [weak.as_str(), listed.as_str()] {
        let revalidated = download(&server, "alice", id, &[("if-none-match", tags)]).await;
        assert_eq!(revalidated.status(), 304, "{tags}");
    }
    let other = download(&server, "alice", id, &[("if-none-match", "W/\"0000\"")]).await;
    assert_eq!(other.status(), 200);
}

#[tokio::test]
async fn same_bytes_are_stored_once_and_the_size_limit_is_enforced() {
    let (dir, server) = start(&["--media-max-bytes", "100000"]);
    let bytes = pattern(50_000);
    let (_, first) = upload(&server, "alice", "application/pdf", bytes.clone()).await;
    let (_, second) = upload(&server, "bob", "application/pdf", bytes).await;
    assert_ne!(
        first["media_id"], second["media_id"],
        "each uploader's upload has its own id"
    );
    assert_eq!(first["sha256"], second["sha256"]);
    let blobs = std::fs::read_dir(dir.path().join("media/blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 1, "content-addressed: one copy");
    for (user, uploaded) in [("alice", &first), ("bob", &second)] {
        let id = uploaded["media_id"].as_str().unwrap();
        assert_eq!(
            download(&server, user, id, &[]).await.status(),
            200,
            "each uploader may read"
        );
    }

    let (status, body) = upload(&server, "alice", "video/mp4", pattern(100_001)).await;
    assert_eq!((status, body["code"].as_str()), (413, Some("too_large")));
    let (status, _) = upload(&server, "alice", "", pattern(10)).await;
    assert_eq!(status, 400, "a MIME type is required");
    let staging = std::fs::read_dir(dir.path().join("media/staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staging, 0, "aborted uploads leave nothing behind");
}

/// An upload that states no length (chunked: a client streaming a recording as it is made) is
/// refused once its bytes pass the limit, and its client, still sending, reads that answer,
/// 413 `too_large`, as one with a `Content-Length` does. The server closed the connection with
/// the rest of the body unread: the client's next write failed (a broken pipe) before it read
/// the answer, so it saw a network error, and retried the same upload, rather than "too large".
#[tokio::test]
async fn an_upload_refused_midway_gets_its_answer_while_its_client_still_sends() {
    let (_dir, server) = start(&["--media-max-bytes", "100000"]);
    for _ in 0..3 {
        let chunks = (0..128).map(|_| Ok::<_, std::io::Error>(pattern(64 * 1024)));
        let refused = reqwest::Client::new()
            .post(format!("{}/v1/media", server.http_url()))
            .bearer_auth(server.token("alice", "phone"))
            .header("content-type", "video/mp4")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await
            .expect("the refusal is read, not a broken connection");
        assert_eq!(refused.status(), 413);
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "too_large", "{body}");
    }
}

#[tokio::test]
async fn only_the_uploader_may_send_media_and_deleted_media_is_hidden() {
    let (_dir, server) = start(&[]);
    let (_, uploaded) = upload(&server, "alice", "image/png", pattern(1000)).await;
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    let mut mallory = server.connect("mallory", "phone").await;
    match mallory
        .send(Target::User("bob".into()), "steal", media_body(&uploaded))
        .await
    {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
    let mut alice = server.connect("alice", "phone").await;
    let sent = alice
        .send(Target::User("bob".into()), "pic", media_body(&uploaded))
        .await
        .unwrap();
    assert_eq!(download(&server, "bob", &id, &[]).await.status(), 200);
    alice.delete(&sent.conversation_id, sent.seq).await.unwrap();
    assert_eq!(
        download(&server, "bob", &id, &[]).await.status(),
        404,
        "deleted for everyone"
    );
    assert_eq!(
        download(&server, "alice", &id, &[]).await.status(),
        200,
        "the uploader keeps access"
    );
}

#[tokio::test]
async fn unreferenced_media_is_swept_after_its_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let (_, kept) = upload(&server, "alice", "image/png", pattern(10)).await;
    let mut alice = server.connect("alice", "phone").await;
    alice
        .send(Target::User("bob".into()), "pic", media_body(&kept))
        .await
        .unwrap();
    let (_, lonely) = upload(&server, "alice", "image/png", pattern(20)).await;
    let lonely_sha = lonely["sha256"].as_str().unwrap().to_owned();
    let lonely = lonely["media_id"].as_str().unwrap().to_owned();
    assert!(dir.path().join("media/blobs").join(&lonely_sha).exists());
    // Restarted with a zero TTL, the sweeper finds the unreferenced upload expired.
    server.terminate();
    let server = Server::start_in(
        dir.path(),
        &[
            "--media-unreferenced-ttl",
            "0s",
            "--media-sweep-interval",
            "50ms",
        ],
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while download(&server, "alice", &lonely, &[]).await.status() != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweeper did not run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let kept = kept["media_id"].as_str().unwrap();
    assert_eq!(
        download(&server, "bob", kept, &[]).await.status(),
        200,
        "referenced media stays"
    );
    assert!(
        !dir.path().join("media/blobs").join(&lonely_sha).exists(),
        "its bytes are gone"
    );
}

#[tokio::test]
async fn signed_urls_download_without_a_token_until_they_expire() {
    let (_dir, server) = start(&[
        "--media-url-secret",
        "cdn-secret-of-thirty-two-bytes-or-more",
    ]);
    let (_, uploaded) = upload(&server, "alice", "image/png", pattern(64)).await;
    let id = uploaded["media_id"].as_str().unwrap();
    let (status, body) = server
        .http("alice", "phone")
        .get(&format!("/v1/media/{id}/url"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let path = body["url"].as_str().unwrap();
    let signed = reqwest::get(format!("{}{path}", server.http_url()))
        .await
        .unwrap();
    assert_eq!(signed.status(), 200);
    assert_eq!(
        signed.bytes().await.unwrap().as_ref(),
        pattern(64).as_slice()
    );
    let tampered = path.replace("expires=", "expires=1");
    assert_eq!(
        reqwest::get(format!("{}{tampered}", server.http_url()))
            .await
            .unwrap()
            .status(),
        404
    );
    let (status, _) = server
        .http("bob", "phone")
        .get(&format!("/v1/media/{id}/url"))
        .await
        .unwrap();
    assert_eq!(status, 404, "only readers get signed URLs");
    let malformed = reqwest::get(format!(
        "{}/v1/media/{id}?expires=soon&signature=x",
        server.http_url()
    ))
    .await
    .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: serde_json::Value = malformed.json().await.unwrap();
    assert_eq!(body["code"], "bad_request", "{body}");
}

/// A signed URL is for a CDN (docs/media-and-push.md): its download may be kept by any cache
/// until the URL expires, and no longer. It was `Cache-Control: private`, which a CDN must
/// not store: every download went to the server. A download with a token stays private.
#[tokio::test]
async fn a_signed_urls_download_may_be_kept_by_a_cdn_until_it_expires() {
    let (_dir, server) = start(&[
        "--media-url-secret",
        "cdn-secret-of-thirty-two-bytes-or-more",
        "--media-url-ttl",
        "1h",
    ]);
    let (_, uploaded) = upload(&server, "alice", "image/png", pattern(64)).await;
    let id = uploaded["media_id"].as_str().unwrap();
    let (status, body) = server
        .http("alice", "phone")
        .get(&format!("/v1/media/{id}/url"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let signed = reqwest::get(format!(
        "{}{}",
        server.http_url(),
        body["url"].as_str().unwrap()
    ))
    .await
    .unwrap();
    assert_eq!(signed.status(), 200);
    let cache = signed.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_owned();
    let max_age: u64 = cache
        .strip_prefix("public, max-age=")
        .and_then(|rest| rest.strip_suffix(", immutable"))
        .and_then(|age| age.parse().ok())
        .unwrap_or_else(|| panic!("not kept by shared caches until it expires: {cache}"));
    assert!(0 < max_age && max_age <= 3600, "{cache}");
    let own = download(&server, "alice", id, &[]).await;
    assert_eq!(
        own.headers()["cache-control"],
        "private, max-age=31536000, immutable"
    );
}

/// Media a user uploaded never acts as a page of the server's origin (the web app's, with
/// `--web-dir`): a page or an SVG is served sandboxed, as itself, and to be saved; a picture
/// may be shown.
#[tokio::test]
async fn uploaded_pages_are_served_inert() {
    let (_dir, server) = start(&[]);
    let page = b"<script>alert(sessionStorage.getItem('courier.token'))</script>".to_vec();
    let bytes = "application/octet-stream";
    for (mime, served_as, disposition) in [
        ("text/html", "text/html", "attachment"),
        ("image/svg+xml", "image/svg+xml", "attachment"),
        ("application/pdf", "application/pdf", "attachment"),
        ("image/png", "image/png", "inline"),
        ("video/mp4", "video/mp4", "inline"),
        // Nothing a page of the origin would run or apply from a URL of its own.
        ("text/javascript", bytes, "attachment"),
        (
            "Application/X-JavaScript; charset=utf-8",
            bytes,
            "attachment",
        ),
        ("text/css", bytes, "attachment"),
        ("application/wasm", bytes, "attachment"),
    ] {
        let (status, uploaded) = upload(&server, "mallory", mime, page.clone()).await;
        assert_eq!(status, 201, "{uploaded}");
        let id = uploaded["media_id"].as_str().unwrap();
        let served = download(&server, "mallory", id, &[]).await;
        assert_eq!(served.status(), 200);
        let header = |name: &str| {
            let value = served.headers().get(name).map(|v| v.to_str().unwrap());
            value.unwrap_or_default().to_owned()
        };
        assert_eq!(header("content-type"), served_as, "{mime}");
        assert_eq!(header("content-disposition"), disposition, "{mime}");
        assert_eq!(header("x-content-type-options"), "nosniff");
        assert!(header("content-security-policy").starts_with("sandbox"));
    }
}

/// A `Content-Type` naming several types is refused: a browser takes the last of them
/// (Fetch, "extract a MIME type"), so `image/png,text/html` was served inline as a page, and
/// `image/png,text/css` as a style sheet past the check that serves style sheets as bytes.
/// One type, its parameters quoted as they need, is taken.
#[tokio::test]
async fn a_content_type_of_several_types_is_refused() {
    let (_dir, server) = start(&[]);
    let page = b"<h1>Your session expired: sign in again</h1>".to_vec();
    for mime in [
        "image/png,text/html",
        "image/png, text/css",
        "image/png;a=b,text/html",
        "image/png text/html",
        "image/",
        "/png",
        "image/png; name",
    ] {
        let (status, refused) = upload(&server, "mallory", mime, page.clone()).await;
        assert_eq!(
            (status, refused["code"].as_str()),
            (400, Some("bad_request")),
            "{mime}: {refused}"
        );
    }
    for mime in [
        "image/png",
        "text/plain; charset=utf-8",
        "image/png; name=\"a,b.png\"",
    ] {
        let (status, uploaded) = upload(&server, "mallory", mime, page.clone()).await;
        assert_eq!(status, 201, "{mime}: {uploaded}");
        assert_eq!(uploaded["mime"], mime);
    }
}

/// Two messages of one conversation carry the same media id.
async fn share_twice(server: &Server, uploaded: &serde_json::Value) -> (String, u64, u64) {
    let mut alice = server.connect("alice", "phone").await;
    alice.events_until_sync_done().await.unwrap();
    let first = alice
        .send(Target::User("bob".into()), "pic-1", media_body(uploaded))
        .await
        .unwrap();
    let second = alice
        .send(Target::User("bob".into()), "pic-2", media_body(uploaded))
        .await
        .unwrap();
    (first.conversation_id, first.seq, second.seq)
}

#[tokio::test]
async fn deleting_one_of_two_messages_sharing_media_keeps_it_for_the_other() {
    let (_dir, server) = start(&[]);
    let (_, uploaded) = upload(&server, "alice", "image/png", pattern(1000)).await;
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    let (conv, first, second) = share_twice(&server, &uploaded).await;
    let mut alice = server.connect("alice", "phone").await;
    alice.delete(&conv, first).await.unwrap();
    assert_eq!(
        download(&server, "bob", &id, &[]).await.status(),
        200,
        "the second message still shares the media"
    );
    alice.delete(&conv, second).await.unwrap();
    assert_eq!(
        download(&server, "bob", &id, &[]).await.status(),
        404,
        "no message shares it any more"
    );
}

#[tokio::test]
async fn trimming_the_older_of_two_messages_sharing_media_keeps_it_and_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let retention = ["--retention", "0s", "--retention-interval", "50ms"];
    let mut server = Server::start_in(dir.path(), &retention);
    let (_, uploaded) = upload(&server, "alice", "image/png", pattern(1000)).await;
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    let (conv, first, _) = share_twice(&server, &uploaded).await;
    // Every device has the first message only: retention clears it and keeps the second.
    for user in ["alice", "bob"] {
        let mut client = server.connect(user, "phone").await;
        client.ack(&conv, first, AckKind::Delivered).await.unwrap();
        client.ping().await.unwrap();
    }
    wait_for_floor(&server, &conv, first + 1).await;
    assert_eq!(
        download(&server, "bob", &id, &[]).await.status(),
        200,
        "the retained message still shares the media"
    );

    // A sweep with a zero TTL (seen done by an unreferenced upload going) keeps the bytes.
    let (_, lonely) = upload(&server, "alice", "image/png", pattern(20)).await;
    let lonely = lonely["media_id"].as_str().unwrap().to_owned();
    server.terminate();
    let mut args = retention.to_vec();
    args.extend([
        "--media-unreferenced-ttl",
        "0s",
        "--media-sweep-interval",
        "50ms",
    ]);
    let server = Server::start_in(dir.path(), &args);
    wait_until_gone(&server, "alice", &lonely).await;
    let kept = download(&server, "bob", &id, &[]).await;
    assert_eq!(kept.status(), 200, "the sweeper kept the shared media");
    assert_eq!(
        kept.bytes().await.unwrap().as_ref(),
        pattern(1000).as_slice()
    );
}

/// Waits until retention has moved the floor of `conv` to `floor`.
async fn wait_for_floor(server: &Server, conv: &str, floor: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, body) = server
            .http("alice", "phone")
            .get(&format!("/v1/conversations/{conv}/messages"))
            .await
            .unwrap();
        if body["floor_seq"] == floor {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retention did not trim to {floor}: {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until `user` can no longer download `id` (the sweeper removed it).
async fn wait_until_gone(server: &Server, user: &str, id: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while download(server, user, id, &[]).await.status() != 404 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweeper did not run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reupload_of_the_same_bytes_does_not_change_the_type_served_to_others() {
    let (_dir, server) = start(&[]);
    let bytes = pattern(500);
    let (_, photo) = upload(&server, "alice", "image/png", bytes.clone()).await;
    let id = photo["media_id"].as_str().unwrap().to_owned();
    let mut alice = server.connect("alice", "phone").await;
    alice
        .send(Target::User("bob".into()), "pic", media_body(&photo))
        .await
        .unwrap();
    // Mallory knows the bytes and uploads them again as HTML.
    let (status, page) = upload(&server, "mallory", "text/html", bytes.clone()).await;
    assert_eq!(status, 201);
    assert_eq!(page["mime"], "text/html");
    let (_, again) = upload(&server, "alice", "text/html", bytes).await;
    assert_eq!(again["mime"], "text/html", "alice's own upload as HTML");

    let served = download(&server, "bob", &id, &[]).await;
    assert_eq!(served.status(), 200);
    assert_eq!(
        served.headers()["content-type"],
        "image/png",
        "bob gets the type of the upload the message names"
    );
    assert_eq!(
        download(&server, "alice", &id, &[]).await.headers()["content-type"],
        "image/png"
    );
    let mallorys = page["media_id"].as_str().unwrap();
    assert_eq!(
        download(&server, "bob", mallorys, &[]).await.status(),
        404,
        "mallory's upload is hers alone"
    );
}

#[tokio::test]
async fn uploads_beyond_the_per_user_quota_are_refused() {
    let (_dir, server) = start(&["--media-quota-per-user", "3000"]);
    let (status, first) = upload(&server, "alice", "image/png", pattern(2000)).await;
    assert_eq!(status, 201, "{first}");
    let (status, again) = upload(&server, "alice", "image/png", pattern(2000)).await;
    assert_eq!(
        (status, &again["media_id"]),
        (201, &first["media_id"]),
        "the same upload again costs nothing more"
    );
    let (status, refused) = upload(&server, "alice", "image/jpeg", pattern(1001)).await;
    assert_eq!((status, refused["code"].as_str()), (413, Some("too_large")));
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("quota"), "{message}");
    let (status, _) = upload(&server, "alice", "image/jpeg", pattern(1000)).await;
    assert_eq!(status, 201, "up to the quota exactly");
    let (status, _) = upload(&server, "bob", "image/png", pattern(2000)).await;
    assert_eq!(status, 201, "the quota is per user");
}

#[tokio::test]
async fn media_is_served_only_to_members_who_may_read_the_message_sharing_it() {
    let (_dir, server) = start(&[]);
    let (_, uploaded) = upload(&server, "alice", "image/png", pattern(300)).await;
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    let admin = server.http("alice", "phone");
    let group = admin.create_group("g", &["bob".to_owned()]).await.unwrap();
    let mut alice = server.connect("alice", "phone").await;
    alice
        .send(
            Target::Conversation(group.clone()),
            "pic",
            media_body(&uploaded),
        )
        .await
        .unwrap();
    admin
        .add_members(&group, &["carol".to_owned()])
        .await
        .unwrap();
    assert_eq!(
        download(&server, "carol", &id, &[]).await.status(),
        404,
        "carol joined after the message: she may not read it"
    );
    let (status, _) = admin
        .delete(&format!("/v1/groups/{group}/members/bob"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        download(&server, "bob", &id, &[]).await.status(),
        200,
        "bob may still read what was sent while he was a member"
    );
}

/// A download of `id` by its uploader `alice` over a raw socket with a `receive_buffer`-byte
/// receive buffer, asking the server to close the connection once the response is sent: what
/// the caller reads is the response, head and body.
async fn raw_download(server: &Server, id: &str, receive_buffer: u32) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(receive_buffer).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    let request = format!(
        "GET /v1/media/{id} HTTP/1.1\r\nhost: courier\r\nauthorization: Bearer {}\r\n\
         connection: close\r\n\r\n",
        server.token("alice", "phone")
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// The body's length in `response` (head and body), once the head has ended.
fn body_length(response: &[u8]) -> usize {
    let head = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    response.len() - head - 4
}

/// Reads `stream` until the server closes it (EOF, or a reset), pausing `pause` after each of
/// the first `paused_reads` reads.
async fn read_to_close(
    stream: &mut tokio::net::TcpStream,
    paused_reads: usize,
    pause: std::time::Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for read in 0.. {
        match tokio::time::timeout(support::WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => response.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server neither sent nor closed for {:?}", support::WAIT),
        }
        if read < paused_reads {
            tokio::time::sleep(pause).await;
        }
    }
    response
}

#[tokio::test]
async fn a_download_its_client_stops_reading_is_cut_and_its_file_closed() {
    let (_dir, server) = start(&["--http-write-timeout", "2s"]);
    let bytes = pattern(8 * 1024 * 1024);
    let (status, uploaded) = upload(&server, "alice", "video/mp4", bytes.clone()).await;
    assert_eq!(status, 201, "{uploaded}");
    let id = uploaded["media_id"].as_str().unwrap().to_owned();
    // The stored media: the only file of its size among the server's.
    let media_files = || {
        server
            .open_files()
            .into_iter()
            .filter(|path| std::fs::metadata(path).is_ok_and(|m| m.len() == bytes.len() as u64))
            .count()
    };
    let wait_until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + support::WAIT;
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };

    // A client that reads nothing: once its receive buffer and the server's send buffer are
    // full, no byte is taken for 2s, and the server ends the connection and closes the file.
    let mut stalled = raw_download(&server, &id, 4096).await;
    wait_until("the download opened the media file", &|| media_files() == 1);
    wait_until("the stalled download was ended", &|| media_files() == 0);
    let cut = read_to_close(&mut stalled, 0, std::time::Duration::ZERO).await;
    assert!(
        body_length(&cut) < bytes.len(),
        "the stalled download was cut short"
    );

    // A client that reads slowly, less often than every 2s overall but some bytes each time,
    // gets the whole media.
    let mut slow = raw_download(&server, &id, 64 * 1024).await;
    let whole = read_to_close(&mut slow, 30, std::time::Duration::from_millis(100)).await;
    assert!(whole.starts_with(b"HTTP/1.1 200"), "{:?}", &whole[..64]);
    assert_eq!(body_length(&whole), bytes.len());
    assert_eq!(media_files(), 0);
}
