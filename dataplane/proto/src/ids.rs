//! Validation of the identifiers of PROTOCOL.md ("Identity and tokens").

/// Why an identifier was refused; the text names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} must be {rule}")]
pub struct InvalidId {
    pub field: &'static str,
    pub rule: &'static str,
}

const USER_RULE: &str = "1 to 64 characters of A-Z a-z 0-9 . _ - @";
const CONVERSATION_RULE: &str = "1 to 128 characters of A-Z a-z 0-9 . _ - :";
const CLIENT_MSG_RULE: &str = "1 to 64 characters";
const PUSH_TOKEN_RULE: &str = "1 to 4096 bytes without control characters";
const APNS_TOKEN_RULE: &str =
    "1 to 200 characters of A-Z a-z 0-9 - _ (the hex digits of the device token)";

/// Longest push token (`PUT /v1/devices/me/push`); FCM's are about 160 bytes.
pub const MAX_PUSH_TOKEN: usize = 4096;
/// Longest APNs device token: they are 64 hex digits today; the bound and the alphabet keep
/// any token a single segment of the request's path (`/3/device/<token>`).
pub const MAX_APNS_TOKEN: usize = 200;

fn check(
    value: &str,
    max: usize,
    extra: &[u8],
    field: &'static str,
    rule: &'static str,
) -> Result<(), InvalidId> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b) || extra.contains(&b));
    if ok {
        Ok(())
    } else {
        Err(InvalidId { field, rule })
    }
}

/// A user id: 1 to 64 characters of `A-Z a-z 0-9 . _ - @`.
pub fn user_id(value: &str) -> Result<(), InvalidId> {
    check(value, 64, b"@", "user id", USER_RULE)
}

/// A device id: the same alphabet as user ids.
pub fn device_id(value: &str) -> Result<(), InvalidId> {
    check(value, 64, b"@", "device id", USER_RULE)
}

/// A conversation id: at most 128 characters of `A-Z a-z 0-9 . _ - :`.
pub fn conversation_id(value: &str) -> Result<(), InvalidId> {
    check(value, 128, b":", "conversation_id", CONVERSATION_RULE)
}

/// Whether `conv` is a group conversation: group ids start with `g:`, direct ones with `d:`.
pub fn is_group(conv: &str) -> bool {
    conv.starts_with("g:")
}

/// Whether `conv` is a direct conversation's id (`d:`): derived from the two user ids, so
/// anyone can compute it.
pub fn is_direct(conv: &str) -> bool {
    conv.starts_with("d:")
}

/// A media id: the same alphabet as conversation ids.
pub fn media_id(value: &str) -> Result<(), InvalidId> {
    check(value, 128, b":", "media_id", CONVERSATION_RULE)
}

/// A `client_msg_id`: 1 to 64 characters (of any kind).
pub fn client_msg_id(value: &str) -> Result<(), InvalidId> {
    let n = value.chars().count();
    if (1..=64).contains(&n) {
        Ok(())
    } else {
        Err(InvalidId {
            field: "client_msg_id",
            rule: CLIENT_MSG_RULE,
        })
    }
}

/// A push token of `provider` (`fcm`, `apns` or `webhook`), as a device registers it: one the
/// provider could take. An APNs token goes into the request's path, so it is one path segment
/// ([`MAX_APNS_TOKEN`] characters of `A-Z a-z 0-9 - _`); the others travel in a JSON body and
/// are [`MAX_PUSH_TOKEN`] bytes at most, without control characters.
pub fn push_token(provider: &str, token: &str) -> Result<(), InvalidId> {
    let (ok, field, rule) = match provider {
        "apns" => (
            (1..=MAX_APNS_TOKEN).contains(&token.len())
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "an apns token",
            APNS_TOKEN_RULE,
        ),
        _ => (
            (1..=MAX_PUSH_TOKEN).contains(&token.len()) && !token.chars().any(char::is_control),
            "token",
            PUSH_TOKEN_RULE,
        ),
    };
    match ok {
        true => Ok(()),
        false => Err(InvalidId { field, rule }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabets_and_lengths() {
        assert!(user_id("alice@example.com").is_ok());
        assert!(user_id("").is_err());
        assert!(user_id(&"a".repeat(65)).is_err());
        assert!(user_id("a b").is_err());
        assert!(conversation_id("d:0a1b").is_ok());
        assert!(conversation_id("a@b").is_err());
        assert!(client_msg_id("ünï").is_ok());
        assert!(client_msg_id("").is_err());
    }

    #[test]
    fn push_tokens_are_what_their_provider_takes() {
        assert!(push_token("apns", &"a1".repeat(32)).is_ok());
        assert!(push_token("apns", "apns-bob").is_ok());
        for bad in [
            "",
            "../../x",
            "a/b",
            "a?b",
            "a b",
            "a%2F",
            "a.b",
            &"f".repeat(201),
        ] {
            assert!(push_token("apns", bad).is_err(), "{bad:?}");
        }
        assert!(push_token("fcm", "dAbC-12_x:APA91bH").is_ok());
        assert!(push_token("webhook", "https://relay.example/p?id=1 ünï").is_ok());
        for bad in ["", "a\nb", "a\u{0}", "a\u{7f}", &"t".repeat(4097)] {
            assert!(push_token("webhook", bad).is_err(), "{bad:?}");
        }
    }
}
