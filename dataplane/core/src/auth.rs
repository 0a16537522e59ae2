//! Authentication: JWTs with claims `sub` (user), `dev` (device) and `exp`, verified with an
//! HS256 shared secret (created in the data directory on first start when none is configured)
//! or an EdDSA / RS256 public key.

use courier_proto::ids;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name of the generated secret inside the data directory.
pub const SECRET_FILE: &str = "jwt-secret";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    dev: String,
    exp: u64,
    /// Issue time (seconds); tokens issued before a device was unlinked are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// The identity a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub user: String,
    pub device: String,
    /// The token's `iat` in milliseconds (0 when the token has none).
    pub issued_at_ms: u64,
}

/// Why a token was refused. Shown to the client, so it names the problem without secrets.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing token: send `Authorization: Bearer <jwt>` or `access_token=<jwt>`")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("this device was unlinked; sign in again for a new token")]
    Unlinked,
}

/// Verifies tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    pub fn hs256(secret: &[u8]) -> Self {
        Self::with(DecodingKey::from_secret(secret), Algorithm::HS256)
    }

    /// A verifier for a PEM public key (`EdDSA` for Ed25519, `RS256` for RSA).
    pub fn public_key(pem: &[u8], algorithm: Algorithm) -> anyhow::Result<Self> {
        let key = match algorithm {
            Algorithm::EdDSA => DecodingKey::from_ed_pem(pem)?,
            Algorithm::RS256 => DecodingKey::from_rsa_pem(pem)?,
            other => {
                anyhow::bail!("unsupported public-key algorithm {other:?}: use EdDSA or RS256")
            }
        };
        Ok(Self::with(key, algorithm))
    }

    fn with(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self { key, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let Claims { sub, dev, iat, .. } = data.claims;
        ids::user_id(&sub).map_err(|e| AuthError::Invalid(e.to_string()))?;
        ids::device_id(&dev).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Identity {
            user: sub,
            device: dev,
            issued_at_ms: iat.unwrap_or(0).saturating_mul(1000),
        })
    }
}

/// Signs an HS256 token for `user`/`device`, valid for `ttl`.
pub fn mint(secret: &[u8], user: &str, device: &str, ttl: Duration) -> anyhow::Result<String> {
    ids::user_id(user)?;
    ids::device_id(device)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = Claims {
        sub: user.to_owned(),
        dev: device.to_owned(),
        exp: now + ttl.as_secs(),
        iat: Some(now),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRET_FILE)
}

/// Reads the data directory's secret.
pub fn read_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = secret_path(data_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the token secret {}: {e}; run `courier serve --data-dir {}` once to create it, \
             or pass --jwt-secret",
            path.display(),
            data_dir.display()
        )
    })?;
    Ok(text.trim().as_bytes().to_vec())
}

/// Reads the data directory's secret, creating it (256 random bits, mode 0600) if absent.
pub fn read_or_create_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = secret_path(data_dir);
    if !path.exists() {
        use std::io::Write;
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(&path) {
            Ok(mut file) => {
                file.write_all(secret.as_bytes())?;
                file.sync_all()?;
                tracing::info!(path = %path.display(), "created a token secret");
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    read_secret(data_dir)
}

/// The token of a request: `Authorization: Bearer` first, then the `access_token` query
/// parameter.
pub fn bearer_token<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(token) = authorization.and_then(|h| h.strip_prefix("Bearer ")) {
        return Some(token.trim());
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_verify_and_expired_or_forged_ones_do_not() {
        let verifier = TokenVerifier::hs256(b"secret");
        let token = mint(b"secret", "alice", "phone", Duration::from_secs(60)).unwrap();
        let identity = verifier.verify(&token).unwrap();
        assert_eq!(
            (identity.user.as_str(), identity.device.as_str()),
            ("alice", "phone")
        );
        assert!(identity.issued_at_ms > 0);
        let forged = mint(b"other", "alice", "phone", Duration::from_secs(60)).unwrap();
        assert!(verifier.verify(&forged).is_err());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: "alice".into(),
                dev: "phone".into(),
                exp: 1,
                iat: None,
            },
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(verifier.verify(&expired).is_err());
    }

    #[test]
    fn bearer_header_wins_over_query() {
        assert_eq!(
            bearer_token(Some("Bearer abc"), Some("access_token=def")),
            Some("abc")
        );
        assert_eq!(
            bearer_token(None, Some("x=1&access_token=def")),
            Some("def")
        );
        assert_eq!(bearer_token(None, Some("access_token=")), None);
    }
}
