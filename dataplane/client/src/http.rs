//! The HTTP API of PROTOCOL.md.

use crate::ClientError;
use crate::connection::{MAX_BUFFERED_BYTES, REPLY_TIMEOUT};
use courier_proto::{Media, ids};
use serde_json::Value;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

/// The most bytes of an answer's body (JSON, or the text of an error) the SDK reads into
/// memory: as many as the largest WebSocket message it takes ([`crate::websocket_config`]),
/// so that a page of history too large for a `messages` frame is the only one too large here.
/// A larger answer fails its call, where a broken or hostile server's answer was read whole for
/// as long as it came.
pub const MAX_ANSWER_BYTES: usize = MAX_BUFFERED_BYTES;

/// HTTP calls with one device's token.
#[derive(Clone)]
pub struct HttpApi {
    base: String,
    token: String,
    http: reqwest::Client,
}

/// `e` with its causes: reqwest's own text is only what failed (`builder error`, `error
/// sending request for url`), not why.
fn http_error(e: reqwest::Error) -> ClientError {
    let mut said = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(e) = cause {
        said.push_str(&format!(": {e}"));
        cause = e.source();
    }
    ClientError::Http(said)
}

impl HttpApi {
    /// `base_url` is `http://host:port`; a connection not made within [`REPLY_TIMEOUT`]
    /// fails the request. Fails when the HTTP client cannot be built, saying why: with TLS,
    /// on a machine with no CA certificates (a minimal container image), or whose
    /// `SSL_CERT_FILE` names none. It fell back to reqwest's default client, which has no
    /// connect timeout, and whose building, failing the same way, panicked.
    pub fn new(base_url: &str, token: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(REPLY_TIMEOUT)
            .build()
            .map_err(http_error)?;
        Ok(Self::with_client(http, base_url, token))
    }

    /// [`HttpApi::new`] on `http`, a client (and its pool of connections) that many devices
    /// share: building a client costs milliseconds, and each keeps connections of its own.
    pub fn with_client(http: reqwest::Client, base_url: &str, token: &str) -> Self {
        Self {
            base: base_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        }
    }

    /// A request with an optional JSON body; returns the status and the JSON body (`Null`
    /// when the body is not JSON). A request not answered within [`REPLY_TIMEOUT`] fails
    /// with [`ClientError::Timeout`]: reqwest waits for ever by default, and a server that
    /// took a request and never answered held its caller until killed.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ClientError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let answered = async {
            let response = request.send().await.map_err(http_error)?;
            let status = response.status().as_u16();
            let body = serde_json::from_slice(&body_of(response).await?).unwrap_or(Value::Null);
            Ok((status, body))
        };
        within_reply_timeout(answered).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.request(reqwest::Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), ClientError> {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<(u16, Value), ClientError> {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    /// Uploads a file (streamed) as media of type `mime`; returns the upload's JSON
    /// (`media_id`, `mime`, `size`, `sha256`). What is not a regular file (a directory, a
    /// device) is refused by name before any request: a directory opens on Linux, and the
    /// read that then failed inside the request said only that sending it failed. An upload
    /// fails with [`ClientError::Timeout`] when the server takes none of its bytes for
    /// [`REPLY_TIMEOUT`], or has not answered [`REPLY_TIMEOUT`] after the last: one that moves,
    /// however large and slow, is not cut (a timeout of the whole request would be), and one
    /// that stalls no longer holds its caller (`courier chat`'s session) for ever.
    pub async fn upload_media(
        &self,
        path: &std::path::Path,
        mime: &str,
    ) -> Result<Value, ClientError> {
        let io = |e: std::io::Error| ClientError::Http(format!("{}: {e}", path.display()));
        let file = tokio::fs::File::open(path).await.map_err(io)?;
        let metadata = file.metadata().await.map_err(io)?;
        if !metadata.is_file() {
            return Err(ClientError::Http(format!(
                "{} is not a file",
                path.display()
            )));
        }
        let taken = Arc::new(Mutex::new(Instant::now()));
        let body = reqwest::Body::wrap_stream(tokio_util_stream(file, taken.clone()));
        let request = self
            .http
            .post(format!("{}/v1/media", self.base))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, mime)
            // Its size up front: a server refuses one over its limit before reading it.
            .header(reqwest::header::CONTENT_LENGTH, metadata.len())
            .body(body)
            .send();
        let answered = async {
            let response = request.await.map_err(http_error)?;
            let status = response.status().as_u16();
            let body = body_of(response).await?;
            match status {
                201 => serde_json::from_slice(&body)
                    .map_err(|e| ClientError::Http(format!("the upload's answer: {e}"))),
                status => Err(ClientError::Http(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                ))),
            }
        };
        tokio::select! {
            answered = answered => answered,
            stalled = stalled(&taken) => Err(stalled),
        }
    }

    /// Downloads the media a message shares into a new file (streamed), checked against what
    /// the message says of it; returns the number of bytes written. Bytes of another length or
    /// SHA-256 (a media store that lost or changed them, a proxy's page in their place) are
    /// removed and refused: there is no download that keeps bytes unchecked, as the file the
    /// sender shared. A `media_id` PROTOCOL.md does not allow is refused before any request (as
    /// every id a method puts in a path: `..` in it would name another endpoint). A file
    /// already at `out` is left as it is and the download refused: the name to save a file as
    /// is often the one its sender chose (`courier chat` offers it), and a stranger's `.bashrc`
    /// must not replace the reader's. The answer, and each part of the bytes, is waited for up
    /// to [`REPLY_TIMEOUT`]: a download that moves is not cut, one that stalls fails (it held
    /// `courier chat`, whose session waited on it, until killed). A download that fails part
    /// way removes what it wrote.
    pub async fn download_shared_media(
        &self,
        media: &Media,
        out: &std::path::Path,
    ) -> Result<u64, ClientError> {
        use futures::StreamExt;
        use sha2::Digest;
        use tokio::io::AsyncWriteExt;
        let media_id = media.media_id.as_str();
        ids::media_id(media_id)?;
        let request = self
            .http
            .get(format!("{}/v1/media/{media_id}", self.base))
            .bearer_auth(&self.token)
            .send();
        let response = within_reply_timeout(async { request.await.map_err(http_error) }).await?;
        if response.status().as_u16() != 200 {
            return Err(ClientError::Http(format!(
                "HTTP {}",
                response.status().as_u16()
            )));
        }
        let io = |e: std::io::Error| ClientError::Http(format!("{}: {e}", out.display()));
        let mut file = match tokio::fs::File::create_new(out).await {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ClientError::Http(format!(
                    "{} exists: save under another name",
                    out.display()
                )));
            }
            Err(e) => return Err(io(e)),
        };
        let not_shared = |what: &str| {
            ClientError::Http(format!(
                "{media_id}: the server's bytes are not those the message shares ({what})"
            ))
        };
        let copied = async {
            let mut written = 0u64;
            let mut sha256 = sha2::Sha256::new();
            let mut stream = response.bytes_stream();
            while let Some(chunk) = within_reply_timeout(async { Ok(stream.next().await) }).await? {
                let chunk = chunk.map_err(http_error)?;
                written += chunk.len() as u64;
                if written > media.size {
                    return Err(not_shared("longer"));
                }
                sha256.update(&chunk);
                file.write_all(&chunk).await.map_err(io)?;
            }
            file.flush().await.map_err(io)?;
            if written != media.size {
                return Err(not_shared("shorter"));
            }
            if !hex::encode(sha256.finalize()).eq_ignore_ascii_case(&media.sha256) {
                return Err(not_shared("another SHA-256"));
            }
            Ok(written)
        }
        .await;
        if copied.is_err() {
            let _ = tokio::fs::remove_file(out).await;
        }
        copied
    }

    /// Creates a group; returns its conversation id.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<String, ClientError> {
        let body = serde_json::json!({ "name": name, "members": members });
        match self.post("/v1/groups", &body).await? {
            (201, body) => body["conversation_id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| ClientError::Http(format!("no conversation_id in {body}"))),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }

    /// Adds members to a group (admins only). A `conversation_id` PROTOCOL.md does not allow
    /// is refused before any request.
    pub async fn add_members(
        &self,
        conversation_id: &str,
        users: &[String],
    ) -> Result<(), ClientError> {
        ids::conversation_id(conversation_id)?;
        let body = serde_json::json!({ "users": users });
        match self
            .post(&format!("/v1/groups/{conversation_id}/members"), &body)
            .await?
        {
            (200, _) => Ok(()),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }

    /// Removes a member from a group (an admin, or the member itself). A `conversation_id` or
    /// `user` PROTOCOL.md does not allow is refused before any request: `../../../devices/phone`
    /// would have been sent as `DELETE /v1/devices/phone`, unlinking the caller's phone.
    pub async fn remove_member(
        &self,
        conversation_id: &str,
        user: &str,
    ) -> Result<(), ClientError> {
        ids::conversation_id(conversation_id)?;
        ids::user_id(user)?;
        match self
            .delete(&format!("/v1/groups/{conversation_id}/members/{user}"))
            .await?
        {
            (200, _) => Ok(()),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }

    /// `GET /v1/conversations`.
    pub async fn conversations(&self) -> Result<Value, ClientError> {
        match self.get("/v1/conversations").await? {
            (200, body) => Ok(body),
            (status, body) => Err(ClientError::Http(format!("HTTP {status}: {body}"))),
        }
    }
}

/// The body of `response`, up to [`MAX_ANSWER_BYTES`].
async fn body_of(mut response: reqwest::Response) -> Result<Vec<u8>, ClientError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(http_error)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(ClientError::Http(format!(
                "the server's answer is larger than {MAX_ANSWER_BYTES} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `answer`, unless it takes longer than [`REPLY_TIMEOUT`].
async fn within_reply_timeout<T>(
    answer: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(REPLY_TIMEOUT, answer)
        .await
        .map_err(|_| ClientError::Timeout(REPLY_TIMEOUT))?
}

/// The bytes of an upload read from its file at a time: small enough that a server taking
/// them at 2 KiB/s moves the upload on (a chunk asked for) within [`REPLY_TIMEOUT`].
const UPLOAD_CHUNK: usize = 64 * 1024;

/// Resolves [`REPLY_TIMEOUT`] after the instant in `taken` (which moves on as a request goes)
/// with [`ClientError::Timeout`].
async fn stalled(taken: &Mutex<Instant>) -> ClientError {
    loop {
        let deadline = *taken.lock().unwrap_or_else(PoisonError::into_inner) + REPLY_TIMEOUT;
        if Instant::now() >= deadline {
            return ClientError::Timeout(REPLY_TIMEOUT);
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A file as a stream of chunks of [`UPLOAD_CHUNK`] bytes, for a streamed request body; `taken`
/// is set to the time of each chunk asked for, and of the end. The HTTP client asks for the
/// next chunk when the socket has taken room for it from what it holds, so `taken` stands
/// still while the server takes no bytes, and marks the last byte once the file is sent.
fn tokio_util_stream(
    file: tokio::fs::File,
    taken: Arc<Mutex<Instant>>,
) -> impl futures::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures::stream::unfold(file, move |mut file| {
        *taken.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        async move {
            let mut chunk = vec![0u8; UPLOAD_CHUNK];
            match file.read(&mut chunk).await {
                Ok(0) => None,
                Ok(n) => {
                    chunk.truncate(n);
                    Some((Ok(chunk), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that takes a request and never answers fails it, a call of the API or a
    /// download, after [`REPLY_TIMEOUT`].
    #[tokio::test(start_paused = true)]
    async fn a_request_a_server_never_answers_fails_with_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = HttpApi::new(&format!("http://{}", listener.local_addr().unwrap()), "t").unwrap();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        let answered = tokio::time::timeout(REPLY_TIMEOUT * 4, api.get("/v1/conversations"))
            .await
            .expect("the request was still waiting");
        assert!(
            matches!(answered, Err(ClientError::Timeout(_))),
            "{answered:?}"
        );
        let out = std::env::temp_dir().join(format!("courier-client-{}", std::process::id()));
        let media = shared("m1", b"the bytes");
        let download = api.download_shared_media(&media, &out);
        let downloaded = tokio::time::timeout(REPLY_TIMEOUT * 4, download)
            .await
            .expect("the download was still waiting");
        assert!(
            matches!(downloaded, Err(ClientError::Timeout(_))),
            "{downloaded:?}"
        );
        assert!(!out.exists());
        silent.abort();
    }

    /// An upload to a server that takes none of its bytes, or takes them all and never
    /// answers, fails after [`REPLY_TIMEOUT`] with a timeout. It waited for ever (only the
    /// connection had a timeout): a `/send-file` in `courier chat` held its session until killed.
    #[tokio::test(start_paused = true)]
    async fn an_upload_a_server_stalls_fails_with_a_timeout() {
        let file = std::env::temp_dir().join(format!("courier-upload-{}", std::process::id()));
        // Larger than what the sockets' buffers take without the server reading.
        std::fs::write(&file, vec![7u8; 32 << 20]).unwrap();
        let deaf = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let deaf_url = format!("http://{}", deaf.local_addr().unwrap());
        let deaf = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = deaf.accept().await {
                held.push(tcp);
            }
        });
        let mute = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mute_url = format!("http://{}", mute.local_addr().unwrap());
        let mute = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = mute.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut tcp, &mut tokio::io::sink()).await;
                    std::future::pending::<()>().await;
                });
            }
        });
        for url in [deaf_url, mute_url] {
            let api = HttpApi::new(&url, "t").unwrap();
            let uploaded = tokio::time::timeout(REPLY_TIMEOUT * 4, api.upload_media(&file, "a/b"))
                .await
                .unwrap_or_else(|_| panic!("{url}: the upload was still waiting"));
            assert!(
                matches!(uploaded, Err(ClientError::Timeout(_))),
                "{url}: {uploaded:?}"
            );
        }
        let _ = std::fs::remove_file(&file);
        deaf.abort();
        mute.abort();
    }

    /// The media `media_id` of `bytes`, as a message shares it.
    fn shared(media_id: &str, bytes: &[u8]) -> Media {
        use sha2::Digest;
        Media {
            media_id: media_id.into(),
            mime: "text/plain".into(),
            size: bytes.len() as u64,
            sha256: hex::encode(sha2::Sha256::digest(bytes)),
            name: None,
            caption: None,
        }
    }

    /// An API on a server that answers every request with `response` (its head and body as
    /// written), and that server's task.
    async fn answered_with(response: String) -> (HttpApi, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = HttpApi::new(&format!("http://{}", listener.local_addr().unwrap()), "t").unwrap();
        let server = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = vec![0u8; 4096];
                let _ = tcp.read(&mut head).await;
                let _ = tcp.write_all(response.as_bytes()).await;
            }
        });
        (api, server)
    }

    /// An answer larger than [`MAX_ANSWER_BYTES`] (a broken or hostile server) fails the call
    /// with an error saying so: it was read whole, however large, for as long as it came.
    #[tokio::test]
    async fn an_answer_larger_than_the_bound_fails_the_call() {
        let text = "x".repeat(MAX_ANSWER_BYTES);
        let body = format!(r#"{{"conversations":"{text}"}}"#);
        let (api, server) = answered_with(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        ))
        .await;
        match api.conversations().await {
            Err(ClientError::Http(message)) => {
                assert!(message.contains(&MAX_ANSWER_BYTES.to_string()), "{message}")
            }
            Err(other) => panic!("{other}"),
            Ok(body) => panic!("read {} bytes", body.to_string().len()),
        }
        server.abort();
    }

    /// A download of shared media whose bytes are not those the message names (their length,
    /// their SHA-256) is refused and leaves no file; the right bytes are kept. It kept any bytes
    /// as the file the sender shared.
    #[tokio::test]
    async fn shared_media_of_other_bytes_is_refused() {
        let (api, server) =
            answered_with("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nthe bytes".into()).await;
        let shared = |bytes: &[u8]| shared("m1", bytes);
        let dir = std::env::temp_dir();
        let out = dir.join(format!("courier-shared-{}", std::process::id()));
        for other in [&b"the byte"[..], b"the bytes!", b"THE BYTES"] {
            match api.download_shared_media(&shared(other), &out).await {
                Err(ClientError::Http(message)) => {
                    assert!(message.contains("not those"), "{message}")
                }
                outcome => panic!("{outcome:?}"),
            }
            assert!(!out.exists());
        }
        assert_eq!(
            api.download_shared_media(&shared(b"the bytes"), &out)
                .await
                .unwrap(),
            9
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"the bytes");
        let _ = std::fs::remove_file(&out);
        server.abort();
    }

    /// An id put in a request's path is checked first, and one PROTOCOL.md does not allow is
    /// refused before any request: a user named `../../../devices/phone` (typed by a person,
    /// listed by a server) given to `remove_member` was sent as it was, the URL's dot segments
    /// taken away, as `DELETE /v1/devices/phone`, which unlinked the caller's own phone; a
    /// media id of `../conversations` downloaded the caller's conversations.
    #[tokio::test]
    async fn an_id_that_would_leave_its_path_is_refused_before_any_request() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = HttpApi::new(&format!("http://{}", listener.local_addr().unwrap()), "t").unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let heard = asked.clone();
        let server = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut head = vec![0u8; 4096];
                let n = tcp.read(&mut head).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&head[..n]);
                let line = line.lines().next().unwrap_or_default().to_owned();
                heard.lock().unwrap().push(line);
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let out = std::env::temp_dir().join(format!("courier-escape-{}", std::process::id()));
        let refused = [
            api.remove_member("g:1", "../../../devices/phone").await,
            api.remove_member("g:1/../../../devices/phone", "bob").await,
            api.add_members("g:1/../../../devices/phone", &["bob".into()])
                .await,
            api.download_shared_media(&shared("../conversations", b""), &out)
                .await
                .map(drop),
        ];
        assert_eq!(*asked.lock().unwrap(), Vec::<String>::new());
        for outcome in refused {
            assert!(
                matches!(outcome, Err(ClientError::InvalidId(_))),
                "{outcome:?}"
            );
        }
        assert!(!out.exists());
        server.abort();
    }

    /// A directory is refused by name before any request (on Linux a directory opens, and the
    /// read that failed inside the request's body said only `error sending request`).
    #[tokio::test]
    async fn an_upload_of_what_is_not_a_file_is_refused_by_name() {
        let dir = std::env::temp_dir();
        // No server: nothing may be sent.
        let api = HttpApi::new("http://127.0.0.1:9", "t").unwrap();
        match api.upload_media(&dir, "image/png").await {
            Err(ClientError::Http(message)) => {
                assert!(message.contains("is not a file"), "{message}");
                assert!(message.contains(&dir.display().to_string()), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
}
