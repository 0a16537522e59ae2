//! The cluster token: a shared secret that every internal call carries, as
//! `authorization: Bearer <token>` metadata.
//!
//! **Role.** Internal services (the store node first) listen on the pod network; the token keeps
//! anything that is not a node of the same cluster from calling them. It authenticates the
//! cluster, not a role or a user: a node that holds it may make every internal call.
//!
//! **Invariants.** A token is at least [`MIN_TOKEN_BYTES`] bytes of visible ASCII (so it fits
//! in a header unchanged), loaded from a file or an environment variable and checked when
//! loaded, so a node with a weak or empty token refuses to start instead of running open. The
//! server compares the presented header with the expected one in constant time ([`subtle`]).
//! The token is never logged: its `Debug` prints `ClusterToken(..)`.
//!
//! **Failure policy.** A call without the header, or with another token, is refused with
//! `Unauthenticated` before any handler runs, so it has no effect (the store's error mapping
//! relies on that: see [`crate::status`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Shortest token accepted, in bytes: 32 bytes of visible ASCII, e.g. `openssl rand -hex 16`
/// (32 hex digits, 128 bits) or better `openssl rand -hex 32`.
pub const MIN_TOKEN_BYTES: usize = 32;

/// The environment variable a node reads its token from when no file is given.
pub const TOKEN_ENV: &str = "COURIER_CLUSTER_TOKEN";

/// The metadata entry that carries the token.
const AUTHORIZATION: &str = "authorization";

/// Why a token could not be loaded. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the cluster token is {len} bytes; at least {MIN_TOKEN_BYTES} are required \
         (generate one with `openssl rand -hex 32`)"
    )]
    TooShort { len: usize },
    #[error(
        "the cluster token may hold only visible ASCII characters (no spaces or control \
         characters); byte {position} is not one (generate one with `openssl rand -hex 32`)"
    )]
    InvalidCharacter { position: usize },
    #[error("cannot read the cluster token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the cluster token variable {var} is not set (or not valid UTF-8)")]
    MissingEnv { var: String },
}

/// The shared secret of a cluster. Cheap to clone.
#[derive(Clone)]
pub struct ClusterToken {
    /// `Bearer <token>`, the exact header value sent and expected.
    header: Arc<str>,
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterToken(..)")
    }
}

impl ClusterToken {
    /// A token from its text, refused when shorter than [`MIN_TOKEN_BYTES`] or when it holds
    /// anything but visible ASCII.
    ///
    /// ```
    /// use courier_rpc::ClusterToken;
    /// assert!(ClusterToken::new("0123456789abcdef0123456789abcdef").is_ok());
    /// assert!(ClusterToken::new("secret").is_err());
    /// ```
    pub fn new(token: &str) -> Result<Self, TokenError> {
        if let Some(position) = token.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(TokenError::InvalidCharacter { position });
        }
        if token.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::TooShort { len: token.len() });
        }
        Ok(Self {
            header: format!("Bearer {token}").into(),
        })
    }

    /// The token held in a file (a mounted Kubernetes Secret, for example); surrounding
    /// whitespace, such as a final newline, is not part of it.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::new(text.trim())
    }

    /// The token held in the environment variable `var` (usually [`TOKEN_ENV`]).
    pub fn from_env(var: &str) -> Result<Self, TokenError> {
        let text = std::env::var(var).map_err(|_| TokenError::MissingEnv {
            var: var.to_owned(),
        })?;
        Self::new(text.trim())
    }

    fn header_value(&self) -> AsciiMetadataValue {
        // Checked in `new`: visible ASCII and a space only.
        MetadataValue::try_from(&*self.header).unwrap_or_else(|_| MetadataValue::from_static(""))
    }

    /// Whether `presented` (an `authorization` value) is this token, in constant time.
    fn matches(&self, presented: &[u8]) -> bool {
        self.header.as_bytes().ct_eq(presented).into()
    }
}

/// Client side: attaches the token to every call.
#[derive(Debug, Clone)]
pub struct AttachToken(ClusterToken);

impl AttachToken {
    pub fn new(token: ClusterToken) -> Self {
        Self(token)
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.0.header_value());
        Ok(request)
    }
}

/// Server side: refuses every call that does not carry the token with `Unauthenticated`.
#[derive(Debug, Clone)]
pub struct RequireToken {
    token: ClusterToken,
    refusals: Arc<Refusals>,
}

impl RequireToken {
    pub fn new(token: ClusterToken) -> Self {
        Self {
            token,
            refusals: Arc::default(),
        }
    }
}

/// How often the calls refused for a wrong token are logged at most: each is one line
/// otherwise, and anyone who reaches an internal port could fill the logs with them.
const REFUSALS_LOGGED_EVERY_MS: u64 = 60_000;

/// The calls refused for a wrong token since the last line that said so, and when that was.
#[derive(Debug, Default)]
struct Refusals {
    since_logged: AtomicU64,
    logged_at_ms: AtomicU64,
}

impl Refusals {
    /// Counts one refusal at `now_ms`; returns how many to log now, if a line is due (the
    /// first refusal, then at most one line per [`REFUSALS_LOGGED_EVERY_MS`]).
    fn refused(&self, now_ms: u64) -> Option<u64> {
        self.since_logged.fetch_add(1, Ordering::Relaxed);
        let last = self.logged_at_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= REFUSALS_LOGGED_EVERY_MS;
        // One caller wins the line; the count it takes includes the others' of the moment.
        (due && self
            .logged_at_ms
            .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok())
        .then(|| self.since_logged.swap(0, Ordering::Relaxed))
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(presented) = request.metadata().get(AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "this internal call needs the cluster token (`authorization: Bearer <token>`)",
            ));
        };
        if !self.token.matches(presented.as_encoded_bytes()) {
            if let Some(calls) = self.refusals.refused(courier_core::clock::now_ms()) {
                tracing::warn!(
                    calls,
                    "refused internal calls with a wrong cluster token (logged at most once a minute)"
                );
            }
            return Err(Status::unauthenticated(
                "wrong cluster token: every node of a cluster must be given the same token",
            ));
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn short_empty_and_odd_tokens_are_refused() {
        assert!(matches!(
            ClusterToken::new(""),
            Err(TokenError::TooShort { len: 0 })
        ));
        assert!(matches!(
            ClusterToken::new(&GOOD[1..]),
            Err(TokenError::TooShort { len: 31 })
        ));
        assert!(matches!(
            ClusterToken::new(&format!("{GOOD} x")),
            Err(TokenError::InvalidCharacter { position: 32 })
        ));
        assert!(matches!(
            ClusterToken::new(&format!("{GOOD}é")),
            Err(TokenError::InvalidCharacter { .. })
        ));
        let message = ClusterToken::new("short").unwrap_err().to_string();
        assert!(message.contains("at least 32"), "{message}");
    }

    /// A stream of calls with a wrong token (anyone who reaches an internal port can send
    /// one) logged a line each: the first is logged, then at most one line a minute, which
    /// says how many calls it stands for.
    #[test]
    fn wrong_tokens_are_logged_at_most_once_a_minute_with_their_count() {
        let refusals = Refusals::default();
        let start = 1_000_000;
        assert_eq!(refusals.refused(start), Some(1));
        for i in 1..1000 {
            assert_eq!(refusals.refused(start + i), None);
        }
        assert_eq!(
            refusals.refused(start + REFUSALS_LOGGED_EVERY_MS),
            Some(1000),
            "the 999 held back and this one"
        );
        assert_eq!(refusals.refused(start + REFUSALS_LOGGED_EVERY_MS + 1), None);
    }

    #[test]
    fn a_file_token_loses_its_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{GOOD}\n")).unwrap();
        let token = ClusterToken::from_file(&path).unwrap();
        assert!(token.matches(format!("Bearer {GOOD}").as_bytes()));
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            ClusterToken::from_file(&path),
            Err(TokenError::TooShort { len: 0 })
        ));
        assert!(matches!(
            ClusterToken::from_file(&dir.path().join("absent")),
            Err(TokenError::Read { .. })
        ));
    }

    #[test]
    fn a_missing_variable_is_named() {
        let error = ClusterToken::from_env("COURIER_TEST_NO_SUCH_TOKEN_VARIABLE").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("COURIER_TEST_NO_SUCH_TOKEN_VARIABLE")
        );
    }

    #[test]
    fn the_token_is_not_printed() {
        let token = ClusterToken::new(GOOD).unwrap();
        assert!(!format!("{token:?}").contains(GOOD));
    }

    #[test]
    fn the_server_accepts_only_the_same_token() {
        let token = ClusterToken::new(GOOD).unwrap();
        let mut attach = AttachToken::new(token.clone());
        let mut require = RequireToken::new(token);
        let signed = attach.call(Request::new(())).unwrap();
        assert!(require.call(signed).is_ok());

        let unsigned = Request::new(());
        assert_eq!(
            require.call(unsigned).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let other = ClusterToken::new(&GOOD.replace('0', "1")).unwrap();
        let forged = AttachToken::new(other).call(Request::new(())).unwrap();
        assert_eq!(
            require.call(forged).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        // A prefix of the right header is not the header.
        let mut prefix = Request::new(());
        prefix
            .metadata_mut()
            .insert(AUTHORIZATION, MetadataValue::from_static("Bearer 0123"));
        assert!(require.call(prefix).is_err());
    }
}
