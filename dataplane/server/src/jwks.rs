//! An identity provider's signing keys, from its key set URL (`--jwt-jwks-url`, the
//! `jwks_uri` of its OpenID configuration): providers rotate their keys on their own and
//! publish the new one there first, so a node that fetches the set again now and then, and at
//! once for a token naming a key it lacks, follows every rotation with no one's help.
//!
//! - **Fetches.** At start (the node serves no client before it has keys), then every
//!   `--jwt-jwks-refresh`, and for a token whose `kid` the set lacks, at most once per
//!   [`UNKNOWN_KEY_REFETCH_GAP`] (a client cannot make the node fetch for every made-up `kid`).
//!   Fetches never overlap: a token naming an unknown key that comes during one waits for it
//!   (the others are verified with the keys in place), and runs to its end even when the
//!   request that asked goes away. A fetch that fails keeps the keys in place.
//! - **The last set fetched is kept** in the data directory ([`CACHE_FILE`]): a node that
//!   restarts while the provider is unreachable starts on it (and says so), rather than not at
//!   all. A node that never fetched one cannot start until it does, nor one whose kept set
//!   was fetched from another URL (another provider's keys).
//! - **Only over TLS**, but to a loopback address: keys fetched in the clear could be swapped
//!   by anyone on the path, and with them every identity. A redirect is followed only where
//!   the URL itself could point (never from https to plain http).

use anyhow::Context as _;
use courier_core::auth::TokenVerifier;
use courier_core::loops::BackgroundLoops;
use courier_core::metrics::{Metrics, OutcomeLabel};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The last key set fetched, in the data directory.
pub const CACHE_FILE: &str = "jwks.json";
/// Least time between two fetches for tokens naming an unknown key.
pub const UNKNOWN_KEY_REFETCH_GAP: Duration = Duration::from_secs(30);
/// Largest key set read (providers publish a few kilobytes).
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// Most redirects a fetch follows (reqwest's own default).
const MAX_REDIRECTS: usize = 10;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Fetches at start before the node gives up (without a kept set), and the wait after the
/// first failure (doubled each time).
const START_ATTEMPTS: u32 = 3;
const START_FIRST_WAIT: Duration = Duration::from_secs(1);

/// Where a [`TokenVerifier::key_set`] verifier gets its keys.
pub struct KeySetSource {
    url: reqwest::Url,
    http: reqwest::Client,
    verifier: TokenVerifier,
    cache: PathBuf,
    metrics: Arc<Metrics>,
    /// Held through each fetch, so that they never overlap; it holds when the last fetch for
    /// an unknown key began. Shared with the task of such a fetch, which holds it to its end.
    fetching: Arc<Mutex<Option<Instant>>>,
}

impl KeySetSource {
    /// A source for `verifier` at `url` (https, or http to a loopback address), keeping the
    /// last set in `data_dir`, its fetches counted in `metrics`.
    pub fn new(
        url: &str,
        verifier: TokenVerifier,
        data_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url)
            .with_context(|| format!("--jwt-jwks-url {url:?} is not a URL"))?;
        anyhow::ensure!(
            fetchable(&url),
            "--jwt-jwks-url {url} must be https:// (keys fetched in the clear could be swapped \
             on the way, and with them every identity); http:// only to a loopback address"
        );
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::custom(redirect))
            .user_agent(concat!("courier/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            url,
            http,
            verifier,
            cache: data_dir.join(CACHE_FILE),
            metrics,
            fetching: Arc::new(Mutex::new(None)),
        })
    }

    /// The first keys, before the node serves: fetched (a few attempts, a second or more
    /// apart), or else the set kept from an earlier run.
    pub async fn load(&self) -> anyhow::Result<()> {
        let mut wait = START_FIRST_WAIT;
        let mut attempt = 1;
        let failed = loop {
            let fetched = {
                let _fetching = self.fetching.lock().await;
                self.fetch().await
            };
            match fetched {
                Ok(()) => return Ok(()),
                Err(e) if attempt == START_ATTEMPTS => break e,
                Err(e) => {
                    tracing::warn!(url = %self.url, error = %format!("{e:#}"), "could not fetch the identity provider's keys; trying again in {wait:?}");
                }
            }
            tokio::time::sleep(wait).await;
            wait *= 2;
            attempt += 1;
        };
        let kept = std::fs::read(&self.cache).map_err(|e| {
            anyhow::anyhow!(
                "could not fetch the identity provider's keys from {} ({failed:#}), and no set \
                 was kept from an earlier run ({}: {e})",
                self.url,
                self.cache.display()
            )
        })?;
        // One kept by an earlier version names no URL: taken, as then (the next fetch names it).
        if let Some(from) = kept_from(&kept)
            && from != self.url.as_str()
        {
            anyhow::bail!(
                "could not fetch the identity provider's keys from {} ({failed:#}), and the set \
                 kept from an earlier run ({}) was fetched from another URL, {from}: its keys are \
                 not this provider's",
                self.url,
                self.cache.display()
            );
        }
        self.verifier
            .set_keys(&kept)
            .with_context(|| format!("the kept key set {}", self.cache.display()))?;
        tracing::warn!(url = %self.url, error = %format!("{failed:#}"), kept = %self.cache.display(), "could not fetch the identity provider's keys: starting on the set kept from an earlier run");
        Ok(())
    }

    /// Fetches the set again after a token named key `kid`, which it lacks, unless the last
    /// fetch for an unknown key began less than [`UNKNOWN_KEY_REFETCH_GAP`] ago. A fetch under
    /// way is waited for (the caller then verifies its token again either way).
    ///
    /// The fetch runs in a task of its own, to its end, whether or not its caller waits: the
    /// request that asked for it goes away when its client hangs up, and a fetch dropped with
    /// it would still have begun the gap, so that a client asking and hanging up every
    /// [`UNKNOWN_KEY_REFETCH_GAP`] would keep a provider's new key out until the next refresh.
    pub async fn refetch_for_unknown_key(self: &Arc<Self>, kid: &str) {
        let mut last = self.fetching.clone().lock_owned().await;
        if last.is_some_and(|at| at.elapsed() < UNKNOWN_KEY_REFETCH_GAP) {
            return;
        }
        *last = Some(Instant::now());
        tracing::info!(
            kid,
            "a token names a key the identity provider's set lacks: fetching the set again"
        );
        let source = self.clone();
        let fetch = tokio::spawn(async move {
            let _fetching = last;
            source.refresh().await;
        });
        // A fetch that panicked is as one that failed: the keys in place stay.
        let _ = fetch.await;
    }

    /// Fetches the set every `interval` (the first time one interval from now).
    pub fn start_refreshing(self: &Arc<Self>, interval: Duration, loops: &BackgroundLoops) {
        let source = self.clone();
        loops.spawn("refresh the identity provider's keys", move |cancel| {
            let source = source.clone();
            async move {
                let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let run = async {
                    loop {
                        ticks.tick().await;
                        let _fetching = source.fetching.lock().await;
                        source.refresh().await;
                    }
                };
                cancel.run_until_cancelled(run).await;
            }
        });
    }

    /// [`KeySetSource::fetch`], a failure logged: the keys in place stay.
    async fn refresh(&self) {
        if let Err(e) = self.fetch().await {
            tracing::warn!(url = %self.url, error = %format!("{e:#}"), "could not fetch the identity provider's keys: the keys in place stay");
        }
    }

    /// One fetch (its caller holds `fetching`): the set replaces the verifier's keys and is
    /// kept in the data directory.
    async fn fetch(&self) -> anyhow::Result<()> {
        let fetched = self.fetch_document().await;
        let outcome = if fetched.is_ok() { "fetched" } else { "failed" };
        self.metrics
            .token_key_set_fetches
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        fetched
    }

    async fn fetch_document(&self) -> anyhow::Result<()> {
        let document = self.download().await?;
        let read = self.verifier.set_keys(&document)?;
        for why in &read.reasons {
            tracing::debug!(url = %self.url, "a key of the identity provider's set passed over: {why}");
        }
        tracing::info!(url = %self.url, keys = read.taken, passed_over = read.passed_over, "fetched the identity provider's keys");
        if let Err(e) = kept_document(&document, &self.url).and_then(|kept| {
            keep(&self.cache, &kept)?;
            Ok(())
        }) {
            tracing::warn!(file = %self.cache.display(), error = %e, "could not keep the identity provider's keys for the next start");
        }
        Ok(())
    }

    async fn download(&self) -> anyhow::Result<Vec<u8>> {
        let mut response = self
            .http
            .get(self.url.clone())
            .send()
            .await?
            .error_for_status()?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            anyhow::ensure!(
                body.len() + chunk.len() <= MAX_DOCUMENT_BYTES,
                "the key set is larger than {MAX_DOCUMENT_BYTES} bytes"
            );
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }
}

/// Whether keys may be fetched from `url`: over TLS, or in the clear from this machine.
fn fetchable(url: &reqwest::Url) -> bool {
    let loopback = match url.host_str() {
        Some("localhost") => true,
        Some(host) => host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    };
    url.scheme() == "https" || (url.scheme() == "http" && loopback)
}

/// Where a fetch follows a redirect: as far as [`MAX_REDIRECTS`], and only to a URL that
/// `--jwt-jwks-url` could name ([`fetchable`]). A provider's key set behind a redirect to
/// plain http would be read in the clear, where anyone on the path could swap it.
fn redirect(attempt: reqwest::redirect::Attempt) -> reqwest::redirect::Action {
    if attempt.previous().len() > MAX_REDIRECTS {
        attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
    } else if !fetchable(attempt.url()) {
        let refused = format!(
            "redirect to {} refused: a key set is fetched over https only (http only from a \
             loopback address)",
            attempt.url()
        );
        attempt.error(refused)
    } else {
        attempt.follow()
    }
}

/// The member of a kept key set that names the URL it was fetched from.
const KEPT_FROM: &str = "courier_fetched_from";

/// The key set `document` fetched from `url`, as kept: with [`KEPT_FROM`], so that a node
/// given another URL (another identity provider) never starts on the keys of the one before.
fn kept_document(document: &[u8], url: &reqwest::Url) -> anyhow::Result<Vec<u8>> {
    let mut value: serde_json::Value = serde_json::from_slice(document)?;
    value
        .as_object_mut()
        .context("the key set is not a JSON object")?
        .insert(KEPT_FROM.to_owned(), url.as_str().into());
    Ok(serde_json::to_vec(&value)?)
}

/// The URL a kept key set was fetched from, if it names one ([`kept_document`]).
fn kept_from(kept: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(kept).ok()?;
    Some(value.get(KEPT_FROM)?.as_str()?.to_owned())
}

/// Writes `document` to `path` whole: to a file beside it, then renamed over it.
fn keep(path: &Path, document: &[u8]) -> std::io::Result<()> {
    let staged = path.with_extension(format!("{}.new", hex::encode(rand::random::<[u8; 8]>())));
    std::fs::write(&staged, document)?;
    std::fs::rename(&staged, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&staged);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys fetched in the clear could be swapped on the way: only https, or http to this
    /// machine; anything but a URL is refused, naming the flag.
    #[test]
    fn a_key_set_url_is_https_or_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let source = |url: &str| {
            KeySetSource::new(url, TokenVerifier::key_set(), dir.path(), metrics.clone())
        };
        for taken in [
            "https://id.example.com/.well-known/jwks.json",
            "http://127.0.0.1:8081/jwks",
            "http://[::1]:8081/jwks",
            "http://localhost/jwks",
        ] {
            source(taken).unwrap();
        }
        for refused in [
            "http://id.example.com/jwks",
            "http://10.0.0.1/jwks",
            "ftp://127.0.0.1/jwks",
            "id.example.com/jwks",
        ] {
            let Err(e) = source(refused) else {
                panic!("{refused} taken");
            };
            assert!(e.to_string().contains("--jwt-jwks-url"), "{refused}: {e}");
        }
    }

    /// `app` served on loopback: the URL of its `/jwks`.
    async fn serving(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }

    /// A key set document holding the JWK of the test fixture `name`.
    fn key_set_of(name: &str) -> String {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let jwk = std::fs::read_to_string(format!("{fixtures}/{name}")).unwrap();
        format!("{{\"keys\": [{jwk}]}}")
    }

    /// A provider on loopback serving the key set of `jwt-test-ed25519.jwk.json`: its URL.
    async fn provider() -> String {
        let document = key_set_of("jwt-test-ed25519.jwk.json");
        serving(
            axum::Router::new().route("/jwks", axum::routing::get(move || async move { document })),
        )
        .await
    }

    /// A provider on loopback whose key set URL redirects to `to`.
    async fn redirecting_to(to: String) -> String {
        serving(axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || async move { axum::response::Redirect::temporary(&to) }),
        ))
        .await
    }

    /// A redirect is held to the rule of the URL given: keys fetched in the clear after a
    /// redirect to plain http could be swapped on the way as well, so such a redirect is
    /// refused before anything is fetched from it; one to loopback is followed.
    #[tokio::test]
    async fn a_redirect_to_plain_http_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let keys = provider().await;

        // 198.51.100.1 (TEST-NET-2) is no loopback address, and no one's.
        let clear = redirecting_to("http://198.51.100.1/jwks".to_owned()).await;
        let source = KeySetSource::new(
            &clear,
            TokenVerifier::key_set(),
            dir.path(),
            metrics.clone(),
        )
        .unwrap();
        let refused = format!("{:#}", source.fetch().await.unwrap_err());
        assert!(
            refused.contains("redirect to http://198.51.100.1/jwks refused"),
            "{refused}"
        );

        let loopback = redirecting_to(keys.replace("127.0.0.1", "localhost")).await;
        let source =
            KeySetSource::new(&loopback, TokenVerifier::key_set(), dir.path(), metrics).unwrap();
        source.fetch().await.unwrap();
    }

    /// A fetch for a key the set lacks runs to its end even when the request that asked for
    /// it goes away midway (its client hung up): dropped with it, the fetch was lost while
    /// the gap it began held every other such token back, so a client that asked and hung up
    /// every 30 s kept a provider's new key out until the next refresh.
    #[tokio::test]
    async fn a_fetch_for_an_unknown_key_outlives_the_request_that_asked() {
        let dir = tempfile::tempdir().unwrap();
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let read = |name: &str| std::fs::read(format!("{fixtures}/{name}")).unwrap();
        let document = key_set_of("jwt-test-ed25519-next.jwk.json");
        // The provider says when it is asked, and answers once released.
        let (asked, mut was_asked) = tokio::sync::mpsc::channel::<()>(4);
        let release = Arc::new(tokio::sync::Notify::new());
        let released = release.clone();
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (asked, released, document) =
                    (asked.clone(), released.clone(), document.clone());
                async move {
                    let _ = asked.send(()).await;
                    released.notified().await;
                    document
                }
            }),
        );
        let url = serving(app).await;

        let verifier = TokenVerifier::key_set();
        let metrics = Arc::new(Metrics::new());
        let source =
            Arc::new(KeySetSource::new(&url, verifier.clone(), dir.path(), metrics).unwrap());
        tokio::select! {
            _ = source.refetch_for_unknown_key("2026-next") => panic!("answered unreleased"),
            _ = was_asked.recv() => {}
        }
        // The request that asked is gone; the provider answers.
        release.notify_one();

        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("2026-next".to_owned());
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp });
        let key = jsonwebtoken::EncodingKey::from_ed_pem(&read("jwt-test-ed25519-next.pem"));
        let token = jsonwebtoken::encode(&header, &claims, &key.unwrap()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while verifier.verify(&token).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the fetch was dropped with the request"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The set kept for a restart while the provider is down is that provider's: a node given
    /// another key set URL (an identity provider replaced, say after its keys leaked), whose
    /// provider is down at start, does not start on the keys of the one before, which it would
    /// otherwise have taken tokens of.
    #[tokio::test]
    async fn a_set_kept_from_another_url_is_not_started_on() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let before = provider().await;
        let source = |url: &str| {
            KeySetSource::new(url, TokenVerifier::key_set(), dir.path(), metrics.clone()).unwrap()
        };
        source(&before).load().await.unwrap();

        // The next provider is down: nothing listens at its port.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let next = format!("http://{}/jwks", closed.local_addr().unwrap());
        drop(closed);
        let refused = format!("{:#}", source(&next).load().await.unwrap_err());
        assert!(refused.contains("another URL"), "{refused}");
    }
}
