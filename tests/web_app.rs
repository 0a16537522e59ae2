//! `courier serve --web-dir DIR`: the built web app at `/`, under a strict
//! Content-Security-Policy, next to an API that still asks for a token; without the flag the
//! server serves no files.

mod support;

use std::process::Command;

/// A directory that looks like the built web app.
fn web_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.html"),
        "<!doctype html><title>Courier web test page</title>",
    )
    .unwrap();
    std::fs::write(dir.path().join("app.js"), "console.log('courier');").unwrap();
    dir
}

#[tokio::test]
async fn web_dir_serves_the_app_at_the_root_and_the_api_still_needs_a_token() {
    let web = web_dir();
    let web_path = web.path().to_str().unwrap();
    let (_data, server) = support::start(&["--web-dir", web_path]);
    let http = reqwest::Client::new();

    let page = http.get(server.http_url() + "/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(page.text().await.unwrap().contains("Courier web test page"));

    let script = http
        .get(server.http_url() + "/app.js")
        .send()
        .await
        .unwrap();
    assert_eq!(script.status(), 200);
    assert!(
        script.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("javascript")
    );

    let missing = http
        .get(server.http_url() + "/no-such-file.js")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // A path that climbs out of the directory is not answered with a file outside it.
    let outside = http
        .get(server.http_url() + "/..%2F..%2F..%2Fetc%2Fpasswd")
        .send()
        .await
        .unwrap();
    assert_eq!(outside.status(), 404);

    let api = http
        .get(server.http_url() + "/v1/conversations")
        .send()
        .await
        .unwrap();
    assert_eq!(
        api.status(),
        401,
        "the API still refuses a request without a token"
    );
    // A path under the API's that no route takes is the API's `not_found`, not the app's.
    let unknown = http
        .get(server.http_url() + "/v1/no-such-endpoint")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.headers().get("content-security-policy").is_none());
    let body: serde_json::Value = unknown.json().await.unwrap();
    assert_eq!(body["code"], "not_found", "{body}");
    let ready = http
        .get(server.http_url() + "/readyz")
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn without_web_dir_the_root_is_not_found() {
    let (_data, server) = support::start(&[]);
    let root = reqwest::get(server.http_url() + "/").await.unwrap();
    assert_eq!(root.status(), 404);
    assert!(root.headers().get("content-security-policy").is_none());
}

#[test]
fn a_web_dir_without_index_html_is_refused_at_start_up() {
    let data = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--web-dir")
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no index.html there"),
        "the error says what is wrong: {stderr}"
    );
}
