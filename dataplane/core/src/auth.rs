//! Authentication: JWTs with claims `sub` (user), `dev` (device) and `exp`, verified with an
//! HS256 shared secret (created in the data directory on first start when none is configured),
//! EdDSA / RS256 public keys, or an identity provider's key set (JWKS: RSA, P-256 / P-384 and
//! Ed25519 keys, each named by its `kid`), the public keys or the key set with secrets beside
//! them (while clients move from a backend's tokens to an identity provider's); and, when the
//! server is told to, `iss` (the issuer) and `aud` (the audience) of an identity provider's
//! tokens.
//!
//! A verifier holds its keys (more than one during a key rotation: the keys before and after
//! it). A token is tried with those of its algorithm, of a key set only the one its `kid`
//! names when the set has it (else those naming none, and at most [`MAX_KEYS_TRIED`]), in
//! turn: the first whose signature matches decides whether it is valid.

use courier_proto::ids;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far ahead of this server's clock a token's `nbf` and `iat` may be: issuers commonly
/// set them to the time of issue, and a clock a little ahead would otherwise have fresh
/// tokens refused. `exp` has no such allowance.
pub const CLOCK_SKEW_SECS: f64 = 60.0;

/// Most bytes kept of why a key set, or one of its keys, was refused: a parse error quotes
/// what it could not read, and a junk set (a fetch reads up to 1 MiB) would be logged whole at
/// each failed fetch.
pub const MAX_REASON_BYTES: usize = 200;

/// Most bytes of a token's `kid` kept when the key set lacks it: it is logged and told to the
/// client, and anyone can make one up (as long as a token's header).
const MAX_KID_SHOWN: usize = 64;

/// Most keys of a set whose reasons for being passed over are kept (the others are counted).
pub const MAX_REASONS: usize = 8;

/// What [`TokenVerifier::set_keys`] made of a key set.
#[derive(Debug)]
pub struct KeysRead {
    /// Signing keys taken.
    pub taken: usize,
    /// Keys passed over.
    pub passed_over: usize,
    /// Why, for the first [`MAX_REASONS`] keys passed over, each cut to [`MAX_REASON_BYTES`].
    pub reasons: Vec<String>,
}

/// Most keys of an identity provider's set a token is tried with. Providers name the key in
/// every token (`kid`: Auth0, Keycloak, Google, Cognito, Entra ID), and the set's key that
/// it names is the one tried; a token naming none is tried with each key of its algorithm,
/// one signature check each, and refused when that would be more than these.
pub const MAX_KEYS_TRIED: usize = 4;

/// Name of the generated secret inside the data directory.
pub const SECRET_FILE: &str = "jwt-secret";

/// The claims Courier reads from a token. Its dates are RFC 7519 NumericDates: JSON numbers of
/// seconds that may have a fraction (some issuers write `exp: 1765000000.5`); `exp` is checked
/// by `jsonwebtoken` itself, which takes fractions too.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    dev: String,
    /// Issue time (seconds); tokens issued before a device was unlinked are refused, and so
    /// are tokens dated ahead of this server's clock by more than [`CLOCK_SKEW_SECS`]:
    /// they would outlive an unlink until that date.
    #[serde(default)]
    iat: Option<f64>,
    /// Not before (seconds): a token an issuer dated ahead is refused until then, give or take
    /// [`CLOCK_SKEW_SECS`].
    #[serde(default)]
    nbf: Option<f64>,
}

/// The claims of a token Courier signs (`courier token`): whole seconds.
#[derive(Serialize)]
struct MintedClaims<'a> {
    sub: &'a str,
    dev: &'a str,
    exp: u64,
    iat: u64,
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
    #[error(
        "missing token: send `Authorization: Bearer <jwt>` (or, to `GET /v1/ws` only, the \
         query parameter `access_token=<jwt>`)"
    )]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("this device was unlinked; sign in again for a new token")]
    Unlinked,
    /// The token names a key (`kid`) the identity provider's key set, as last fetched, lacks.
    #[error("invalid token: signed with a key this server does not know yet (kid {0:?})")]
    UnknownKey(String),
}

/// Fewest bytes of an HS256 secret: the key must be at least as long as the hash (RFC 7518,
/// 3.2). A shorter one can be guessed, and an empty one lets anyone sign tokens for any user.
pub const MIN_SECRET_BYTES: usize = 32;

/// Refuses an HS256 `secret` shorter than [`MIN_SECRET_BYTES`].
fn check_secret(secret: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(
        secret.len() >= MIN_SECRET_BYTES,
        "the token secret is {} bytes: HS256 needs at least {MIN_SECRET_BYTES} (with a shorter \
         one anyone who guesses it can sign tokens for any user)",
        secret.len()
    );
    Ok(())
}

/// A key a verifier holds: the algorithm it verifies and, from a key set, its id.
#[derive(Clone)]
struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens. Clones share their keys: a key set refreshed through one
/// ([`TokenVerifier::set_keys`]) is the key set of all.
#[derive(Clone)]
pub struct TokenVerifier {
    /// The keys it was given (secrets, PEM public keys), none named: at least one without a
    /// key set; more during a key rotation.
    given: Arc<[VerifyingKey]>,
    /// An identity provider's key set, where a key's id (`kid`) names it (a token naming a key
    /// the set lacks was signed with a key not fetched yet); empty until fetched. `None`
    /// without one.
    key_set: Option<Arc<RwLock<Arc<[VerifyingKey]>>>>,
    validation: Validation,
    /// Whether `aud` is checked ([`TokenVerifier::with_audiences`]); if not, a token with
    /// one is refused (RFC 7519, 4.1.3: it is meant for someone else).
    audiences: bool,
}

impl TokenVerifier {
    /// A verifier for an HS256 `secret` of [`MIN_SECRET_BYTES`] at least.
    pub fn hs256(secret: &[u8]) -> anyhow::Result<Self> {
        Self::hs256_secrets(&[secret])
    }

    /// A verifier for HS256 tokens signed with any of `secrets` (the current one and, during a
    /// rotation, the previous one), each of [`MIN_SECRET_BYTES`] at least.
    pub fn hs256_secrets(secrets: &[&[u8]]) -> anyhow::Result<Self> {
        Self::with(hs256_keys(secrets)?)
    }

    /// This verifier, taking HS256 tokens signed with any of `secrets` as well (each of
    /// [`MIN_SECRET_BYTES`] at least): beside an identity provider's keys, the tokens a
    /// backend signs while its clients move to the provider's.
    pub fn and_hs256_secrets(mut self, secrets: &[&[u8]]) -> anyhow::Result<Self> {
        let mut given = self.given.to_vec();
        given.extend(hs256_keys(secrets)?);
        self.given = Arc::from(given);
        Ok(self)
    }

    /// A verifier for a PEM public key (`EdDSA` for Ed25519, `RS256` for RSA).
    pub fn public_key(pem: &[u8], algorithm: Algorithm) -> anyhow::Result<Self> {
        Self::public_keys(&[pem], algorithm)
    }

    /// A verifier for tokens signed with any of the PEM public keys `pems` (during a
    /// rotation, the issuer's keys before and after it), all of one `algorithm`.
    pub fn public_keys(pems: &[&[u8]], algorithm: Algorithm) -> anyhow::Result<Self> {
        let keys = pems
            .iter()
            .map(|pem| {
                let key = match algorithm {
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(pem)?,
                    Algorithm::RS256 => DecodingKey::from_rsa_pem(pem)?,
                    other => {
                        anyhow::bail!(
                            "unsupported public-key algorithm {other:?}: use EdDSA or RS256"
                        )
                    }
                };
                Ok(unnamed(algorithm, key))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Self::with(keys)
    }

    /// A verifier for an identity provider's key set (a JWKS document), empty until its
    /// first [`TokenVerifier::set_keys`].
    pub fn key_set() -> Self {
        Self {
            given: Arc::from([]),
            key_set: Some(Arc::new(RwLock::new(Arc::from([])))),
            validation: validation(),
            audiences: false,
        }
    }

    /// Replaces the keys of a [`TokenVerifier::key_set`] verifier (and of its clones) with
    /// the signing keys of the JWKS document `jwks`: RSA, elliptic-curve (P-256, P-384) and
    /// Ed25519 public keys, each for the algorithm it names or, naming none, its type's usual
    /// one (RS256, ES256 / ES384, EdDSA). Symmetric keys, encryption keys and keys of types
    /// it cannot read are passed over, each with why; refused whole only when it is no key
    /// set at all, or holds no signing key (the keys in place are kept then). What it says
    /// of a set, taken or refused, is a few hundred bytes at most, whatever the set holds.
    pub fn set_keys(&self, jwks: &[u8]) -> anyhow::Result<KeysRead> {
        let Some(key_set) = &self.key_set else {
            anyhow::bail!("this verifier takes no identity provider's key set");
        };
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(jwks).map_err(|e| {
            let why = clipped(&e.to_string(), MAX_REASON_BYTES);
            anyhow::anyhow!("not a JWKS document (`{{\"keys\": [...]}}`): {why}")
        })?;
        let mut keys = Vec::new();
        let (mut passed_over, mut reasons) = (0, Vec::new());
        for (i, value) in document.keys.into_iter().enumerate() {
            let kid = value
                .get("kid")
                .and_then(|kid| kid.as_str())
                .map(str::to_owned);
            match signing_key(value) {
                Ok(key) => keys.push(key),
                Err(why) => {
                    passed_over += 1;
                    if reasons.len() < MAX_REASONS {
                        let kid = kid.as_deref().unwrap_or("no kid");
                        let why = format!("key {i} ({kid}): {why}");
                        reasons.push(clipped(&why, MAX_REASON_BYTES));
                    }
                }
            }
        }
        anyhow::ensure!(
            !keys.is_empty(),
            "the key set holds no signing key this server can use ({}{})",
            reasons.join("; "),
            match passed_over - reasons.len() {
                0 => String::new(),
                more => format!("; and {more} keys more"),
            }
        );
        let taken = keys.len();
        *key_set.write().unwrap_or_else(|e| e.into_inner()) = Arc::from(keys);
        Ok(KeysRead {
            taken,
            passed_over,
            reasons,
        })
    }

    fn with(keys: Vec<VerifyingKey>) -> anyhow::Result<Self> {
        anyhow::ensure!(!keys.is_empty(), "no key to verify tokens with");
        Ok(Self {
            given: Arc::from(keys),
            key_set: None,
            validation: validation(),
            audiences: false,
        })
    }

    /// Accepts only tokens whose `iss` is `issuer` (an identity provider's tokens name it).
    pub fn with_issuer(mut self, issuer: &str) -> Self {
        self.validation.set_issuer(&[issuer]);
        self.require("iss");
        self
    }

    /// Accepts only tokens whose `aud` names one of `audiences` (at least one; an identity
    /// provider names in it the service a token is for). Without this, a token that names
    /// an audience at all is refused.
    pub fn with_audiences(mut self, audiences: &[String]) -> Self {
        if !audiences.is_empty() {
            self.validation.set_audience(audiences);
            self.require("aud");
            self.audiences = true;
        }
        self
    }

    fn require(&mut self, claim: &str) {
        self.validation
            .required_spec_claims
            .insert(claim.to_owned());
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = self.decode(token)?;
        let Claims {
            sub, dev, iat, nbf, ..
        } = data.claims;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        for (claim, time) in [("nbf", nbf), ("iat", iat)] {
            if let Some(time) = time.filter(|&time| time > now + CLOCK_SKEW_SECS) {
                return Err(AuthError::Invalid(format!(
                    "the token's {claim} is {time}, ahead of this server's clock ({now:.0})"
                )));
            }
        }
        ids::user_id(&sub).map_err(|e| AuthError::Invalid(e.to_string()))?;
        ids::device_id(&dev).map_err(|e| AuthError::Invalid(e.to_string()))?;
        Ok(Identity {
            user: sub,
            device: dev,
            // A float to integer cast saturates: an `iat` before 1970 counts as none.
            issued_at_ms: iat.map_or(0, |iat| (iat * 1000.0).round() as u64),
        })
    }

    /// The token's claims, from the first key of its algorithm (of those given, then of the
    /// key set's, the one its `kid` names when the set has it) whose signature matches, checked.
    fn decode(&self, token: &str) -> Result<jsonwebtoken::TokenData<Claims>, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|e| self.refusal(e))?;
        // RFC 7515, 4.1.11: a verifier refuses a token whose critical extensions it does not
        // understand, and this one understands none (the library does not check them).
        if let Some(crit) = &header.crit {
            return Err(AuthError::Invalid(clipped(
                &format!(
                    "the token lists extensions a verifier must understand (`crit`: {crit:?}), \
                     and this server understands none"
                ),
                MAX_REASON_BYTES,
            )));
        }
        let fetched = match &self.key_set {
            Some(key_set) => key_set.read().unwrap_or_else(|e| e.into_inner()).clone(),
            None => Arc::from([]),
        };
        let of_alg = |key: &&VerifyingKey| key.algorithm == header.alg;
        let same_kid = header.kid.is_some() && fetched.iter().any(|key| key.kid == header.kid);
        // The set's keys it names; naming none of them, those that name none (all of them, for
        // a token naming no key): a made-up `kid` costs no signature check per key.
        let tried: Vec<&VerifyingKey> = (fetched.iter().filter(of_alg))
            .filter(|key| match same_kid {
                true => key.kid == header.kid,
                false => header.kid.is_none() || key.kid.is_none(),
            })
            .collect();
        if tried.len() > MAX_KEYS_TRIED {
            return Err(AuthError::Invalid(format!(
                "the token names none of the identity provider's keys (`kid`), and it has {} \
                 {:?} keys: a token is tried with {MAX_KEYS_TRIED} at most",
                tried.len(),
                header.alg
            )));
        }
        let mut outcome = Err(ErrorKind::InvalidAlgorithm.into());
        for key in self.given.iter().filter(of_alg).chain(tried) {
            let mut validation = self.validation.clone();
            validation.algorithms = vec![key.algorithm];
            outcome = jsonwebtoken::decode::<Claims>(token, &key.key, &validation);
            if !matches!(&outcome, Err(e) if *e.kind() == ErrorKind::InvalidSignature) {
                break;
            }
        }
        // No key it names, and none other matched: one the provider added since the last fetch
        // (never a secret: a key set holds none)?
        if self.key_set.is_some()
            && !same_kid
            && header.alg.family() != jsonwebtoken::AlgorithmFamily::Hmac
            && let (Some(kid), Err(e)) = (&header.kid, &outcome)
            && matches!(
                e.kind(),
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm
            )
        {
            return Err(AuthError::UnknownKey(clipped(kid, MAX_KID_SHOWN)));
        }
        outcome.map_err(|e| self.refusal(e))
    }

    /// Why a token was refused, in words a client (and its developer) can act on.
    fn refusal(&self, e: jsonwebtoken::errors::Error) -> AuthError {
        use jsonwebtoken::errors::ErrorKind;
        AuthError::Invalid(match e.kind() {
            ErrorKind::InvalidAudience if !self.audiences => {
                "the token names an audience (`aud`), and this server accepts none \
                 (`--jwt-audience`)"
                    .to_owned()
            }
            ErrorKind::InvalidAudience => {
                "the token's audience (`aud`) is not this server's".to_owned()
            }
            ErrorKind::InvalidIssuer => {
                "the token's issuer (`iss`) is not the one this server trusts".to_owned()
            }
            // Said of a claim that is there but not a number too (`"exp": "soon"`).
            ErrorKind::MissingRequiredClaim(claim) if claim == "exp" => {
                "the token needs `exp`, its expiry as a number of seconds since 1970 (RFC 7519's \
                 NumericDate)"
                    .to_owned()
            }
            _ => e.to_string(),
        })
    }
}

/// What every verifier checks: `exp` (no leeway) and `sub` present; the algorithm is set per key.
fn validation() -> Validation {
    let mut validation = Validation::default();
    validation.leeway = 0;
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation
}

/// The keys of HS256 `secrets`, each of [`MIN_SECRET_BYTES`] at least.
fn hs256_keys(secrets: &[&[u8]]) -> anyhow::Result<Vec<VerifyingKey>> {
    secrets
        .iter()
        .map(|secret| {
            check_secret(secret)?;
            Ok(unnamed(Algorithm::HS256, DecodingKey::from_secret(secret)))
        })
        .collect()
}

/// `text`, cut at a character boundary to `max` bytes at most, then saying how many it cut.
fn clipped(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let end = text.floor_char_boundary(max);
    format!("{}... ({} bytes more)", &text[..end], text.len() - end)
}

/// A key of a verifier given its keys one by one (no key set): no `kid`.
fn unnamed(algorithm: Algorithm, key: DecodingKey) -> VerifyingKey {
    VerifyingKey {
        kid: None,
        algorithm,
        key,
    }
}

/// The signing key a JWK describes, or why it is none (module documentation of
/// [`TokenVerifier::set_keys`]).
fn signing_key(value: serde_json::Value) -> Result<VerifyingKey, String> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
    let jwk: Jwk =
        serde_json::from_value(value).map_err(|e| format!("not a JWK this server reads: {e}"))?;
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return Err("not a signing key (`use`)".to_owned());
    }
    let usual = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            ref other => return Err(format!("elliptic curve {other:?} is not supported")),
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKeyPair(okp) => {
            return Err(format!("curve {:?} is not supported", okp.curve));
        }
        // A shared secret published in a key set would let anyone who reads it sign tokens.
        AlgorithmParameters::OctetKey(_) => return Err("a symmetric key (`oct`)".to_owned()),
    };
    let algorithm = match jwk.common.key_algorithm {
        Some(named) => named
            .to_string()
            .parse::<Algorithm>()
            .map_err(|_| format!("algorithm {named} does not sign"))?,
        None => usual,
    };
    if algorithm.family() != usual.family() {
        return Err(format!(
            "algorithm {algorithm:?} does not fit the key's type"
        ));
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unreadable: {e}"))?;
    Ok(VerifyingKey {
        kid: jwk.common.key_id,
        algorithm,
        key,
    })
}

/// Signs an HS256 token for `user`/`device`, valid for `ttl`.
pub fn mint(secret: &[u8], user: &str, device: &str, ttl: Duration) -> anyhow::Result<String> {
    check_secret(secret)?;
    ids::user_id(user)?;
    ids::device_id(device)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = MintedClaims {
        sub: user,
        dev: device,
        exp: now.saturating_add(ttl.as_secs()),
        iat: now,
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

/// Reads the data directory's secret; one shorter than [`MIN_SECRET_BYTES`] is refused.
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
    let secret = text.trim().as_bytes().to_vec();
    anyhow::ensure!(
        secret.len() >= MIN_SECRET_BYTES,
        "the token secret {} holds {} bytes, fewer than {MIN_SECRET_BYTES}: anyone could sign \
         tokens with it. Delete it to have `courier serve` create a new one (tokens signed with \
         the old one stop working), or pass --jwt-secret",
        path.display(),
        secret.len()
    );
    Ok(secret)
}

/// Reads the data directory's secret, creating it (256 random bits, mode 0600) if absent. It
/// is written whole under another name, then linked into place: no process, and no restart
/// after a crash, finds the file without its secret. A hard link, unlike a rename, fails if
/// another process linked its own first, whose secret is then used.
pub fn read_or_create_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = secret_path(data_dir);
    if !path.exists() {
        use std::io::Write;
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let nonce = hex::encode(rand::random::<[u8; 8]>());
        let staged = data_dir.join(format!("{SECRET_FILE}.{nonce}.new"));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&staged)?;
        file.write_all(secret.as_bytes())?;
        file.sync_all()?;
        let linked = std::fs::hard_link(&staged, &path);
        std::fs::remove_file(&staged)?;
        match linked {
            Ok(()) => {
                std::fs::File::open(data_dir)?.sync_all()?;
                tracing::info!(path = %path.display(), "created a token secret");
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
    }
    read_secret(data_dir)
}

/// The token of a request: `Authorization: Bearer` first, then the `access_token` parameter
/// of `query`, which only the WebSocket upgrade passes (PROTOCOL.md). The header is read as
/// RFC 9110 (11.4) writes it: the scheme in any case, one or more spaces, the token.
pub fn bearer_token<'a>(authorization: Option<&'a str>, query: Option<&'a str>) -> Option<&'a str> {
    let bearer = authorization
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("Bearer"));
    if let Some((_, token)) = bearer {
        return Some(token.trim_start_matches(' '));
    }
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix("access_token="))
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"a-secret-of-thirty-two-bytes-or-more";

    #[test]
    fn minted_tokens_verify_and_expired_or_forged_ones_do_not() {
        let verifier = TokenVerifier::hs256(SECRET).unwrap();
        let token = mint(SECRET, "alice", "phone", Duration::from_secs(60)).unwrap();
        let identity = verifier.verify(&token).unwrap();
        assert_eq!(
            (identity.user.as_str(), identity.device.as_str()),
            ("alice", "phone")
        );
        assert!(identity.issued_at_ms > 0);
        let other = b"another-secret-of-thirty-two-bytes-or-more";
        let forged = mint(other, "alice", "phone", Duration::from_secs(60)).unwrap();
        assert!(verifier.verify(&forged).is_err());
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "sub": "alice", "dev": "phone", "exp": 1 }),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(verifier.verify(&expired).is_err());
    }

    /// A token its issuer dated ahead is refused, give or take a minute of the two clocks:
    /// one to take effect later (`nbf`) until then, one issued later (`iat`) at all, as it
    /// would outlive an unlink of its device until that date. Neither claim is required.
    #[test]
    fn tokens_dated_ahead_are_refused_past_a_minute_of_clock_skew() {
        let verifier = TokenVerifier::hs256(SECRET).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = |iat: Option<u64>, nbf: Option<f64>| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &serde_json::json!({
                    "sub": "alice", "dev": "phone", "exp": now + 3_600, "iat": iat, "nbf": nbf
                }),
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let not_yet = token(Some(now), Some(now as f64 + 600.0));
        let issued_later = token(Some(now + 600), None);
        for (claim, ahead) in [("nbf", not_yet), ("iat", issued_later)] {
            let error = verifier.verify(&ahead).unwrap_err();
            assert!(error.to_string().contains(claim), "{error}");
        }
        assert!(
            verifier
                .verify(&token(Some(now), Some(now as f64 - 1.0)))
                .is_ok()
        );
        assert!(
            verifier
                .verify(&token(Some(now + 30), Some(now as f64 + 30.5)))
                .is_ok(),
            "an issuer's clock a little ahead"
        );
        assert!(verifier.verify(&token(None, None)).is_ok());
    }

    /// RFC 7519's dates may have a fraction: a token whose `exp` and `iat` do is as good as one
    /// in whole seconds, and its issue time keeps its milliseconds for the unlink check.
    #[test]
    fn fractional_dates_are_read() {
        let verifier = TokenVerifier::hs256(SECRET).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let iat = (now - 10.0).floor() + 0.25;
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({
                "sub": "alice", "dev": "phone", "exp": now + 600.5, "iat": iat, "nbf": iat
            }),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        let identity = verifier.verify(&token).unwrap();
        assert_eq!(identity.issued_at_ms, (iat * 1000.0) as u64);
        assert_eq!(identity.issued_at_ms % 1000, 250);
    }

    /// An empty or short secret would let anyone sign tokens: neither a verifier, nor a
    /// token, nor a data directory's secret file takes one.
    #[test]
    fn secrets_shorter_than_thirty_two_bytes_are_refused() {
        let short = &SECRET[..MIN_SECRET_BYTES - 1];
        for secret in [b"".as_slice(), short] {
            assert!(TokenVerifier::hs256(secret).is_err());
            assert!(mint(secret, "alice", "phone", Duration::from_secs(60)).is_err());
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(secret_path(dir.path()), "\n").unwrap();
        for read in [read_secret, read_or_create_secret] {
            let refused = read(dir.path()).unwrap_err().to_string();
            assert!(refused.contains("holds 0 bytes"), "{refused}");
        }
    }

    /// Processes that start together on an empty data directory all get the one secret
    /// written, whole.
    #[test]
    fn a_secret_created_by_racing_processes_is_one_and_whole() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let secrets: Vec<Vec<u8>> = std::thread::scope(|scope| {
                let racers: Vec<_> = (0..4)
                    .map(|_| scope.spawn(|| read_or_create_secret(dir.path()).unwrap()))
                    .collect();
                racers.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(secrets[0].len(), 64);
            assert!(secrets.iter().all(|s| *s == secrets[0]));
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only the secret is left");
        }
    }

    /// An attacker's forms of token: unsigned (`alg: none`), HS256 keyed with the public key
    /// a server verifies EdDSA with (the algorithm confusion of some JWT libraries), claims
    /// with ids outside the protocol's alphabet, and no `exp`. None is accepted.
    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        use base64::Engine as _;
        let b64 = |json: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
        };
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = serde_json::json!({ "sub": "alice", "dev": "phone", "exp": exp });
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let public = std::fs::read(format!("{fixtures}/jwt-test-ed25519.pub.pem")).unwrap();
        let eddsa = TokenVerifier::public_key(&public, Algorithm::EdDSA).unwrap();
        let hs256 = TokenVerifier::hs256(SECRET).unwrap();

        for verifier in [&eddsa, &hs256] {
            for alg in ["none", "None", "NONE"] {
                let unsigned = format!(
                    "{}.{}.",
                    b64(serde_json::json!({ "alg": alg, "typ": "JWT" })),
                    b64(claims.clone())
                );
                assert!(verifier.verify(&unsigned).is_err(), "alg {alg}");
            }
        }
        let confused = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&public),
        )
        .unwrap();
        assert!(
            eddsa.verify(&confused).is_err(),
            "HS256 keyed with the public key"
        );

        let sign = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        for (sub, dev) in [
            ("alice/../bob", "phone"),
            ("alice", "phone\nINFO forged"),
            ("", "phone"),
            (&*"a".repeat(65), "phone"),
            ("alice", ""),
        ] {
            let token = sign(serde_json::json!({ "sub": sub, "dev": dev, "exp": exp }));
            assert!(hs256.verify(&token).is_err(), "sub {sub:?} dev {dev:?}");
        }
        for missing in ["sub", "dev", "exp"] {
            let mut partial = claims.clone();
            partial.as_object_mut().unwrap().remove(missing);
            let refused = hs256.verify(&sign(partial)).unwrap_err().to_string();
            assert!(refused.contains(missing), "no {missing}: {refused}");
        }
        // An expiry that is no number is told as such, not as a missing claim.
        let mut worded = claims.clone();
        worded["exp"] = "in ten minutes".into();
        let refused = hs256.verify(&sign(worded)).unwrap_err().to_string();
        assert!(refused.contains("number of seconds"), "{refused}");
        assert!(hs256.verify(&sign(claims)).is_ok());
    }

    fn in_ten_minutes() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    }

    fn hs256_token(secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    /// A token whose header lists extensions its verifier must understand (`crit`, RFC 7515,
    /// 4.1.11) is refused: this server understands none, and an issuer that sets one means the
    /// token to be refused by a verifier that does not know it (e.g. an unencoded payload,
    /// RFC 7797, read another way). An empty list is refused too (the RFC forbids it).
    #[test]
    fn a_token_with_critical_extensions_is_refused() {
        let verifier = TokenVerifier::hs256(SECRET).unwrap();
        let claims = serde_json::json!({ "sub": "alice", "dev": "d", "exp": in_ten_minutes() });
        for crit in [vec!["x-policy".to_owned()], vec![]] {
            let mut header = Header::new(Algorithm::HS256);
            header.crit = Some(crit.clone());
            header
                .extras
                .insert("x-policy".to_owned(), "strict".to_owned());
            let token =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(SECRET)).unwrap();
            let refused = verifier.verify(&token).unwrap_err().to_string();
            assert!(refused.contains("`crit`"), "crit {crit:?}: {refused}");
        }
        assert!(verifier.verify(&hs256_token(SECRET, claims)).is_ok());
    }

    /// During a rotation a verifier holds the keys before and after it: a token signed with
    /// either is taken, one signed with neither is not, and a token whose signature matched
    /// is judged by that key alone (an expired one is refused as expired, not as forged).
    #[test]
    fn a_verifier_of_several_keys_takes_tokens_of_each_and_of_no_other() {
        const NEXT: &[u8] = b"the-secret-after-the-rotation-of-32-bytes";
        const OTHER: &[u8] = b"an-attackers-secret-of-thirty-two-bytes";
        let both = TokenVerifier::hs256_secrets(&[SECRET, NEXT]).unwrap();
        let exp = in_ten_minutes();
        for (secret, user) in [(SECRET, "alice"), (NEXT, "bob")] {
            let token = hs256_token(
                secret,
                serde_json::json!({ "sub": user, "dev": "d", "exp": exp }),
            );
            assert_eq!(both.verify(&token).unwrap().user, user);
        }
        let forged = hs256_token(
            OTHER,
            serde_json::json!({ "sub": "alice", "dev": "d", "exp": exp }),
        );
        let refused = both.verify(&forged).unwrap_err().to_string();
        assert!(refused.contains("InvalidSignature"), "{refused}");
        let expired = hs256_token(
            NEXT,
            serde_json::json!({ "sub": "bob", "dev": "d", "exp": 1 }),
        );
        let refused = both.verify(&expired).unwrap_err().to_string();
        assert!(refused.contains("ExpiredSignature"), "{refused}");
        assert!(TokenVerifier::hs256_secrets(&[SECRET, b"short"]).is_err());
        assert!(TokenVerifier::hs256_secrets(&[]).is_err());

        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let read = |name: &str| std::fs::read(format!("{fixtures}/{name}")).unwrap();
        let (old, next) = (
            read("jwt-test-ed25519.pub.pem"),
            read("jwt-test-ed25519-next.pub.pem"),
        );
        let eddsa = TokenVerifier::public_keys(&[&old, &next], Algorithm::EdDSA).unwrap();
        let only_old = TokenVerifier::public_key(&old, Algorithm::EdDSA).unwrap();
        let claims = serde_json::json!({ "sub": "carol", "dev": "d", "exp": exp });
        let signed_with = |private: &str| {
            let key = EncodingKey::from_ed_pem(&read(private)).unwrap();
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &key).unwrap()
        };
        for private in ["jwt-test-ed25519.pem", "jwt-test-ed25519-next.pem"] {
            assert!(eddsa.verify(&signed_with(private)).is_ok(), "{private}");
        }
        assert!(
            only_old
                .verify(&signed_with("jwt-test-ed25519-next.pem"))
                .is_err()
        );
    }

    /// An identity provider's tokens name their issuer and audience. A server told which
    /// ones to trust takes only tokens that name them (a token the provider issued for another
    /// service, or another provider's, is refused, and so is one that names none); a server
    /// told no audience refuses a token that names one (RFC 7519, 4.1.3), saying why.
    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let exp = in_ten_minutes();
        let token = |extra: serde_json::Value| {
            let mut claims = serde_json::json!({ "sub": "alice", "dev": "d", "exp": exp });
            claims
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            hs256_token(SECRET, claims)
        };
        let plain = TokenVerifier::hs256(SECRET).unwrap();
        assert!(
            plain
                .verify(&token(serde_json::json!({ "iss": "anyone" })))
                .is_ok()
        );
        let refused = plain
            .verify(&token(serde_json::json!({ "aud": "chat" })))
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--jwt-audience"), "{refused}");

        let strict = TokenVerifier::hs256(SECRET)
            .unwrap()
            .with_issuer("https://id.example.com/")
            .with_audiences(&["chat".to_owned(), "chat-staging".to_owned()]);
        let iss = "https://id.example.com/";
        for taken in [
            serde_json::json!({ "iss": iss, "aud": "chat" }),
            serde_json::json!({ "iss": iss, "aud": ["billing", "chat-staging"] }),
        ] {
            assert!(strict.verify(&token(taken.clone())).is_ok(), "{taken}");
        }
        for (refused, why) in [
            (
                serde_json::json!({ "iss": iss, "aud": "billing" }),
                "audience",
            ),
            (
                serde_json::json!({ "iss": iss, "aud": ["billing"] }),
                "audience",
            ),
            (serde_json::json!({ "iss": iss }), "aud"),
            (
                serde_json::json!({ "iss": "https://evil.example.com/", "aud": "chat" }),
                "issuer",
            ),
            (serde_json::json!({ "aud": "chat" }), "iss"),
        ] {
            let e = strict
                .verify(&token(refused.clone()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{refused}: {e}");
        }
        // No audiences given: as if none was configured.
        let lenient = TokenVerifier::hs256(SECRET).unwrap().with_audiences(&[]);
        assert!(lenient.verify(&token(serde_json::json!({}))).is_ok());
    }

    /// The fixture JWK `name` (`tests/fixtures/<name>.jwk.json`: an Ed25519 public key of the
    /// fixtures, with its `kid`).
    fn fixture_jwk(name: &str) -> serde_json::Value {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let text = std::fs::read_to_string(format!("{fixtures}/{name}.jwk.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn eddsa_token(private: &str, kid: Option<&str>) -> String {
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
        let key = std::fs::read(format!("{fixtures}/{private}")).unwrap();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = kid.map(str::to_owned);
        let claims = serde_json::json!({ "sub": "alice", "dev": "d", "exp": in_ten_minutes() });
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(&key).unwrap()).unwrap()
    }

    /// A token is tried with few keys of a key set: a token naming no key (`kid`) with each of
    /// its algorithm up to [`MAX_KEYS_TRIED`], and refused past them, saying why; one naming a
    /// key the set lacks with none of the keys the set names (a key it signed with is not
    /// found that way: fetched again, the set is asked for it), its `kid` cut to
    /// [`MAX_KID_SHOWN`] bytes in what is said of it. A set of many keys made each such token
    /// cost a signature check per key.
    #[test]
    fn a_token_is_tried_with_few_keys_of_a_key_set() {
        let old = fixture_jwk("jwt-test-ed25519");
        let set = |n: usize| {
            let keys: Vec<_> = (0..n)
                .map(|i| {
                    let mut key = old.clone();
                    key["kid"] = format!("k{i}").into();
                    key
                })
                .collect();
            serde_json::json!({ "keys": keys }).to_string()
        };
        let verifier = TokenVerifier::key_set();
        let no_kid = eddsa_token("jwt-test-ed25519.pem", None);
        verifier.set_keys(set(MAX_KEYS_TRIED).as_bytes()).unwrap();
        assert!(verifier.verify(&no_kid).is_ok());

        verifier
            .set_keys(set(MAX_KEYS_TRIED + 1).as_bytes())
            .unwrap();
        let refused = verifier.verify(&no_kid).unwrap_err().to_string();
        assert!(
            refused.contains("`kid`") && refused.contains("at most"),
            "{refused}"
        );
        let named = eddsa_token("jwt-test-ed25519.pem", Some("k4"));
        assert!(verifier.verify(&named).is_ok());
        let made_up = eddsa_token("jwt-test-ed25519.pem", Some("made-up"));
        assert!(
            matches!(verifier.verify(&made_up), Err(AuthError::UnknownKey(kid)) if kid == "made-up")
        );
        // A made-up `kid` is logged and told to the client: cut, however long.
        let long = eddsa_token("jwt-test-ed25519.pem", Some(&"k".repeat(4000)));
        assert!(
            matches!(verifier.verify(&long), Err(AuthError::UnknownKey(kid)) if kid.len() < 100)
        );
    }

    /// An identity provider's key set: a token is verified with the key its `kid` names; one
    /// naming a key the set lacks is told apart (the server fetches the set again), and so
    /// is taken once the set has it, by every clone of the verifier. Keys that cannot sign
    /// tokens safely (a shared secret, an encryption key) or that it cannot read are passed
    /// over, each named; a set with no usable key is refused and the keys in place kept.
    #[test]
    fn a_key_set_verifies_by_key_id_and_is_replaced_whole() {
        let verifier = TokenVerifier::key_set();
        let clone = verifier.clone();
        let old = fixture_jwk("jwt-test-ed25519");
        let next = fixture_jwk("jwt-test-ed25519-next");
        let set = |keys: Vec<serde_json::Value>| serde_json::json!({ "keys": keys }).to_string();
        let odd = vec![
            serde_json::json!({ "kty": "oct", "k": "c2VjcmV0", "kid": "shared" }),
            serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": old["x"], "use": "enc", "kid": "e" }),
            serde_json::json!({ "kty": "future-type", "kid": "f" }),
            serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": old["x"], "alg": "RS256", "kid": "g" }),
        ];
        let mut keys = vec![old.clone()];
        keys.extend(odd.clone());
        let read = verifier.set_keys(set(keys).as_bytes()).unwrap();
        assert_eq!((read.taken, read.passed_over), (1, 4));
        let passed_over = read.reasons;
        assert_eq!(passed_over.len(), 4, "{passed_over:?}");
        for (i, why) in [
            "symmetric",
            "not a signing key",
            "not a JWK",
            "does not fit",
        ]
        .iter()
        .enumerate()
        {
            assert!(passed_over[i].contains(why), "{passed_over:?}");
        }

        let with_old = eddsa_token("jwt-test-ed25519.pem", Some("2026-old"));
        assert_eq!(clone.verify(&with_old).unwrap().user, "alice");
        let no_kid = eddsa_token("jwt-test-ed25519.pem", None);
        assert!(clone.verify(&no_kid).is_ok());
        let with_next = eddsa_token("jwt-test-ed25519-next.pem", Some("2026-next"));
        assert!(
            matches!(clone.verify(&with_next), Err(AuthError::UnknownKey(kid)) if kid == "2026-next")
        );
        // Signed with the next key but naming the old one: forged, not unknown.
        let misnamed = eddsa_token("jwt-test-ed25519-next.pem", Some("2026-old"));
        assert!(matches!(
            clone.verify(&misnamed),
            Err(AuthError::Invalid(_))
        ));

        let refused = verifier
            .set_keys(set(odd).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(refused.contains("no signing key"), "{refused}");
        assert!(verifier.set_keys(b"{}").is_err());
        assert!(
            clone.verify(&with_old).is_ok(),
            "the keys in place are kept"
        );

        verifier.set_keys(set(vec![old, next]).as_bytes()).unwrap();
        assert!(clone.verify(&with_next).is_ok());
        assert!(clone.verify(&with_old).is_ok());
    }

    /// A junk key set (a fetch reads up to 1 MiB) is told of in a few hundred bytes, not
    /// quoted whole, nor is each of its keys: it was logged at every failed fetch (~20 MB
    /// for a set of many junk keys). A set it takes tells of the first keys it passed over
    /// and counts the others.
    #[test]
    fn what_a_junk_key_set_says_is_bounded() {
        const MIB: usize = 1 << 20;
        let verifier = TokenVerifier::key_set();
        let refused = |document: String| {
            assert!(document.len() <= MIB + 64, "{}", document.len());
            let e = verifier.set_keys(document.as_bytes()).unwrap_err();
            format!("{e:#}")
        };
        let junk = "é".repeat(MIB / 2 - 16);
        let said = refused(format!("{{\"keys\": \"{junk}\"}}"));
        assert!(said.len() < 2 * MAX_REASON_BYTES, "{} bytes", said.len());
        let half = &junk[..junk.len() / 2];
        let big_kid = serde_json::json!({ "kty": half, "kid": half });
        let said = refused(serde_json::json!({ "keys": [big_kid] }).to_string());
        assert!(said.len() < 2 * MAX_REASON_BYTES, "{} bytes", said.len());
        let small: Vec<_> = (0..MIB / 24)
            .map(|i| serde_json::json!({ "kid": i.to_string() }))
            .collect();
        let said = refused(serde_json::json!({ "keys": small }).to_string());
        assert!(
            said.len() < (MAX_REASONS + 1) * MAX_REASON_BYTES,
            "{} bytes",
            said.len()
        );
        assert!(
            said.contains(&format!("and {} keys more", small.len() - MAX_REASONS)),
            "{said}"
        );

        let mut keys = vec![fixture_jwk("jwt-test-ed25519")];
        keys.extend(small.iter().cloned());
        let set = serde_json::json!({ "keys": keys }).to_string();
        let read = verifier.set_keys(set.as_bytes()).unwrap();
        assert_eq!((read.taken, read.passed_over), (1, small.len()));
        assert_eq!(read.reasons.len(), MAX_REASONS);
    }

    /// The scheme is case-insensitive (RFC 9110, 11.1); anything but spaces between it and
    /// the token, or another scheme, is no bearer token.
    #[test]
    fn the_bearer_scheme_is_read_in_any_case_and_strictly_otherwise() {
        for header in [
            "Bearer abc",
            "bearer abc",
            "BEARER abc",
            "bEaReR abc",
            "Bearer   abc",
        ] {
            assert_eq!(bearer_token(Some(header), None), Some("abc"), "{header:?}");
        }
        for header in [
            "Bearerabc",
            "Bearer\tabc",
            "Bearer: abc",
            "Basic abc",
            "Bearers abc",
        ] {
            assert_eq!(bearer_token(Some(header), None), None, "{header:?}");
        }
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
