//! HS256 tokens minted by the bench itself, from `--jwt-secret` or the data directory's secret.

use super::CommonArgs;
use anyhow::Context;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long minted tokens are valid: longer than any run.
const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// Signs tokens for any user and device with the server's shared secret.
#[derive(Clone)]
pub struct TokenMinter {
    secret: Vec<u8>,
    key: jsonwebtoken::EncodingKey,
}

impl TokenMinter {
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            secret: secret.to_vec(),
            key: jsonwebtoken::EncodingKey::from_secret(secret),
        }
    }

    /// From `--jwt-secret`, else from `--data-dir`/jwt-secret.
    pub fn from_args(common: &CommonArgs) -> anyhow::Result<Self> {
        if let Some(secret) = &common.jwt_secret {
            return Ok(Self::from_secret(secret.trim().as_bytes()));
        }
        let Some(dir) = &common.data_dir else {
            anyhow::bail!(
                "the bench mints its own tokens: pass --data-dir (the server's data directory) \
                 or --jwt-secret"
            );
        };
        let path = dir.join("jwt-secret");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read the token secret {}; start `courier serve --data-dir {}` once, \
                 or pass --jwt-secret",
                path.display(),
                dir.display()
            )
        })?;
        Ok(Self::from_secret(text.trim().as_bytes()))
    }

    /// The secret, to hand to worker processes.
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// A token for `user`'s `device`.
    pub fn token(&self, user: &str, device: &str) -> anyhow::Result<String> {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(TOKEN_TTL)
            .as_secs();
        let claims = serde_json::json!({ "sub": user, "dev": device, "exp": exp });
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &self.key)
            .context("cannot sign a token")
    }
}
