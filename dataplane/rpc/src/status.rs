//! The one mapping between [`StoreError`] and [`tonic::Status`], used by both ends of every
//! internal call that reaches a store; and, for the chat service, between the client's
//! [`ApiError`] and [`tonic::Status`] ([`api_status`], [`api_error`]: see "Client errors"
//! below).
//!
//! **Role.** A store node answers a failed call with [`to_status`]; the caller turns the status
//! back with [`store_error`], and gets the very variant the engine returned, so logic such as
//! "[`StoreError::MaybeCommitted`]: retry with the same idempotency key" or "[`StoreError::TooLarge`]:
//! split the batch" works through the network exactly as in process.
//!
//! **Invariants.** The variant travels machine-readable: a [`StoreErrorDetail`] (protobuf) in
//! the binary metadata entry [`STORE_ERROR_METADATA`] of the status, with the variant's key and
//! text verbatim (texts beyond [`MAX_REASON_BYTES`], which no engine writes, are cut). The status message is for humans and logs only and is never parsed (it is cut
//! to [`MAX_MESSAGE_CHARS`]). The gRPC code is chosen per variant for tools that only see codes
//! (see [`code_of`]).
//!
//! **Failure policy.** A status without the detail did not come from a store's answer: it came
//! from the transport (connection lost, timeout) or from the server's machinery before the
//! handler ran (token refused, unknown method). [`store_error`] then says what is *known*:
//! - for a read, [`StoreError::Engine`] (the store node is unreachable: retry later, as with an
//!   unreachable FoundationDB cluster);
//! - for a commit, [`StoreError::MaybeCommitted`] (the batch may have been applied before the
//!   connection broke: callers resolve it by their idempotency keys), except for the refusals
//!   that happen before any handler runs (`Unauthenticated`, `PermissionDenied`,
//!   `Unimplemented`), which are [`StoreError::Engine`]: nothing was applied.
//!
//! A detail that does not decode, or of a kind this node does not know (a node of another
//! version), is treated as no detail. So a node older than [`StoreError::Invalid`] takes that
//! refusal of a newer one for an engine error (a read) or an unknown outcome (a commit), as
//! it did before the variant existed.
//!
//! **Client errors.** A chat node answers a refused request with [`api_status`]: the
//! [`ApiError`] the client is to be told travels whole (code, message, retry delay) as an
//! [`ApiErrorDetail`] in [`API_ERROR_METADATA`], so the gateway writes exactly the `error` frame
//! (or HTTP error) it would write had it called chat in process. A status without the detail
//! did not come from the chat role (the node was unreachable, the token refused): [`api_error`]
//! makes it `unavailable`, which the client retries (with the same `client_msg_id` for a send).

use crate::proto::{ApiErrorDetail, StoreErrorDetail, StoreErrorKind};
use courier_core::error::ApiError;
use courier_proto::ErrorCode;
use courier_store::StoreError;
use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// The binary metadata entry (gRPC `-bin`, base64 on the wire) holding the [`StoreErrorDetail`].
pub const STORE_ERROR_METADATA: &str = "courier-store-error-bin";

/// Longest human-readable status message, in characters; the full text travels in the detail.
pub const MAX_MESSAGE_CHARS: usize = 1024;

/// Longest error text carried in the detail, in bytes; a longer one is cut (at a character
/// boundary). The variant and the key always travel whole. With a key at the engines' limit
/// (10 kB) the detail stays well under what [`crate::remote::MAX_HEADER_LIST_BYTES`] lets a
/// client receive in a status's trailers.
pub const MAX_REASON_BYTES: usize = 64 << 10;

/// Which kind of call failed: it decides what a status without a store's detail means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `get`, `range`, `limits`, health, and `drop_expired` (whose keys are expired: a lost
    /// answer is harmless, a retry drops the same): failing is always safe to retry.
    Read,
    /// `commit`: a lost answer leaves the outcome unknown.
    Commit,
}

/// The gRPC code of each variant, for tools and logs that only see codes.
pub fn code_of(error: &StoreError) -> Code {
    match error {
        StoreError::FenceChanged { .. } => Code::FailedPrecondition,
        // gRPC's own "may have completed" code is DEADLINE_EXCEEDED; UNKNOWN says it plainly.
        StoreError::MaybeCommitted => Code::Unknown,
        StoreError::Overloaded(_) => Code::ResourceExhausted,
        StoreError::TooLarge(_) | StoreError::Invalid(_) => Code::InvalidArgument,
        StoreError::Corrupt { .. } => Code::DataLoss,
        StoreError::Engine(_) | StoreError::Halted(_) => Code::Unavailable,
    }
}

/// The status a store node answers for `error`.
pub fn to_status(error: &StoreError) -> Status {
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(
        STORE_ERROR_METADATA,
        MetadataValue::from_bytes(&detail(error).encode_to_vec()),
    );
    let message: String = error.to_string().chars().take(MAX_MESSAGE_CHARS).collect();
    Status::with_metadata(code_of(error), message, metadata)
}

/// `error` as the machine-readable detail that carries it (in a status, or in a message).
pub fn detail(error: &StoreError) -> StoreErrorDetail {
    let (kind, key, reason) = match error {
        StoreError::FenceChanged { key } => (StoreErrorKind::FenceChanged, key.clone(), ""),
        StoreError::MaybeCommitted => (StoreErrorKind::MaybeCommitted, Vec::new(), ""),
        StoreError::Overloaded(reason) => (StoreErrorKind::Overloaded, Vec::new(), &reason[..]),
        StoreError::TooLarge(reason) => (StoreErrorKind::TooLarge, Vec::new(), &reason[..]),
        StoreError::Corrupt { key, reason } => (StoreErrorKind::Corrupt, key.clone(), &reason[..]),
        StoreError::Engine(reason) => (StoreErrorKind::Engine, Vec::new(), &reason[..]),
        StoreError::Halted(reason) => (StoreErrorKind::Halted, Vec::new(), &reason[..]),
        StoreError::Invalid(reason) => (StoreErrorKind::Invalid, Vec::new(), &reason[..]),
    };
    StoreErrorDetail {
        kind: kind.into(),
        key,
        reason: reason[..reason.floor_char_boundary(MAX_REASON_BYTES)].to_owned(),
    }
}

/// The store's own error carried by `status`, if it carries one.
pub fn decode(status: &Status) -> Option<StoreError> {
    let bytes = status
        .metadata()
        .get_bin(STORE_ERROR_METADATA)?
        .to_bytes()
        .ok()?;
    from_detail(StoreErrorDetail::decode(bytes).ok()?)
}

/// The error a detail carries; `None` for a detail of an unknown kind (another version).
pub fn from_detail(detail: StoreErrorDetail) -> Option<StoreError> {
    let StoreErrorDetail { kind, key, reason } = detail;
    Some(match StoreErrorKind::try_from(kind).ok()? {
        StoreErrorKind::Unspecified => return None,
        StoreErrorKind::FenceChanged => StoreError::FenceChanged { key },
        StoreErrorKind::MaybeCommitted => StoreError::MaybeCommitted,
        StoreErrorKind::Overloaded => StoreError::Overloaded(reason),
        StoreErrorKind::TooLarge => StoreError::TooLarge(reason),
        StoreErrorKind::Corrupt => StoreError::Corrupt { key, reason },
        StoreErrorKind::Engine => StoreError::Engine(reason),
        StoreErrorKind::Halted => StoreError::Halted(reason),
        StoreErrorKind::Invalid => StoreError::Invalid(reason),
    })
}

/// The [`StoreError`] a caller of a `call` sees for `status`: the store's own error when the
/// status carries one, otherwise what the failure means for that kind of call (see the module
/// documentation).
pub fn store_error(status: &Status, call: Call) -> StoreError {
    if let Some(error) = decode(status) {
        return error;
    }
    let refused_before_handler = matches!(
        status.code(),
        Code::Unauthenticated | Code::PermissionDenied | Code::Unimplemented
    );
    match call {
        Call::Commit if !refused_before_handler => StoreError::MaybeCommitted,
        _ => StoreError::Engine(format!(
            "store node call failed ({:?}): {}",
            status.code(),
            status.message()
        )),
    }
}

/// The binary metadata entry holding the [`ApiErrorDetail`] of a request the chat role refused.
pub const API_ERROR_METADATA: &str = "courier-api-error-bin";

/// How long a client is told to wait before retrying a request whose chat node could not be
/// reached (or did not answer).
pub const CHAT_UNREACHABLE_RETRY_MS: u64 = 100;

/// The gRPC code of each client error code, for tools and logs that only see codes.
pub fn api_code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BadRequest => Code::InvalidArgument,
        ErrorCode::Unauthorized => Code::Unauthenticated,
        ErrorCode::Forbidden => Code::PermissionDenied,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::TooLarge => Code::OutOfRange,
        ErrorCode::RateLimited => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

/// The status a chat node answers for a request refused with `error`.
pub fn api_status(error: &ApiError) -> Status {
    let detail = ApiErrorDetail {
        code: error.code.as_str().to_owned(),
        message: error.message.clone(),
        retry_after_ms: error.retry_after_ms,
    };
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(
        API_ERROR_METADATA,
        MetadataValue::from_bytes(&detail.encode_to_vec()),
    );
    let message: String = error.message.chars().take(MAX_MESSAGE_CHARS).collect();
    Status::with_metadata(api_code_of(error.code), message, metadata)
}

/// The client's error carried by `status`, if a chat node answered one (a detail of an
/// unknown code, from another version, counts as none).
pub fn decode_api_error(status: &Status) -> Option<ApiError> {
    let bytes = status
        .metadata()
        .get_bin(API_ERROR_METADATA)?
        .to_bytes()
        .ok()?;
    let detail = ApiErrorDetail::decode(bytes).ok()?;
    let code = ErrorCode::parse(&detail.code)?;
    Some(ApiError {
        code,
        message: detail.message,
        retry_after_ms: detail.retry_after_ms,
    })
}

/// The error the client is told for `status`: the chat role's own, or `unavailable` when the
/// status did not come from it (module documentation, "Client errors").
pub fn api_error(status: &Status) -> ApiError {
    decode_api_error(status).unwrap_or_else(|| {
        tracing::warn!(code = ?status.code(), message = status.message(), "a chat node could not be reached or did not answer; the client retries");
        ApiError::unavailable(
            "chat is unavailable; retry with the same client_msg_id",
            CHAT_UNREACHABLE_RETRY_MS,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One of each variant, with keys and texts that a lossy mapping would damage: non-UTF-8
    /// and empty keys, non-ASCII and long texts.
    fn every_variant() -> Vec<StoreError> {
        vec![
            StoreError::FenceChanged {
                key: vec![0, 0xff, b'e', 0x80, 1],
            },
            StoreError::FenceChanged { key: Vec::new() },
            StoreError::MaybeCommitted,
            StoreError::Overloaded("throttled: ünïcode and \n newlines".into()),
            StoreError::TooLarge("a batch is limited to 16777216 bytes".into()),
            StoreError::Corrupt {
                key: vec![0xfe; 300],
                reason: "bad varint".into(),
            },
            StoreError::Engine("x".repeat(MAX_REASON_BYTES)),
            StoreError::Halted("disk full".into()),
            StoreError::Invalid("undecodable event: unknown event kind `reaction`".into()),
        ]
    }

    /// `StoreError` has no `PartialEq`; compare variant and contents through `Debug`, which
    /// prints every field.
    fn same(a: &StoreError, b: &StoreError) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn every_variant_round_trips_exactly() {
        for error in every_variant() {
            let status = to_status(&error);
            for call in [Call::Read, Call::Commit] {
                let back = store_error(&status, call);
                assert!(same(&error, &back), "{error:?} came back as {back:?}");
            }
        }
    }

    /// A match that names every variant: adding one to `StoreError` breaks this build until the
    /// new variant is given a detail kind above and a case in `every_variant`.
    #[test]
    fn every_variant_is_listed() {
        for error in every_variant() {
            match error {
                StoreError::FenceChanged { .. }
                | StoreError::MaybeCommitted
                | StoreError::Overloaded(_)
                | StoreError::TooLarge(_)
                | StoreError::Corrupt { .. }
                | StoreError::Engine(_)
                | StoreError::Halted(_)
                | StoreError::Invalid(_) => {}
            }
        }
        assert_eq!(every_variant().len(), 9);
    }

    /// Through real header encoding: metadata is base64 on the wire; a status rebuilt from
    /// its headers (as the client does) still decodes to the same variant.
    #[test]
    fn variants_survive_the_header_encoding() {
        for error in every_variant() {
            let mut headers = tonic::codegen::http::HeaderMap::new();
            to_status(&error).add_header(&mut headers).unwrap();
            let back = Status::from_header_map(&headers).expect("a status in the headers");
            assert!(same(&error, &store_error(&back, Call::Commit)));
        }
    }

    #[test]
    fn the_message_is_for_humans_and_bounded() {
        let status = to_status(&StoreError::Engine("y".repeat(MAX_REASON_BYTES)));
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS);
        let StoreError::Engine(reason) = store_error(&status, Call::Read) else {
            panic!("not Engine");
        };
        assert_eq!(
            reason.len(),
            MAX_REASON_BYTES,
            "the full text travels in the detail"
        );
    }

    #[test]
    fn overlong_texts_are_cut_at_a_character_boundary() {
        let text = "é".repeat(MAX_REASON_BYTES);
        let StoreError::Halted(reason) =
            store_error(&to_status(&StoreError::Halted(text.clone())), Call::Commit)
        else {
            panic!("not Halted");
        };
        assert!(reason.len() <= MAX_REASON_BYTES && reason.len() > MAX_REASON_BYTES - 4);
        assert!(text.starts_with(&reason));
    }

    #[test]
    fn codes_follow_grpc_meanings() {
        assert_eq!(
            to_status(&StoreError::FenceChanged { key: vec![] }).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            to_status(&StoreError::Overloaded(String::new())).code(),
            Code::ResourceExhausted
        );
        assert_eq!(
            to_status(&StoreError::Halted(String::new())).code(),
            Code::Unavailable
        );
    }

    #[test]
    fn a_lost_commit_answer_is_an_unknown_outcome() {
        for code in [
            Code::Unavailable,
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::DeadlineExceeded,
        ] {
            let status = Status::new(code, "connection reset");
            assert!(matches!(
                store_error(&status, Call::Commit),
                StoreError::MaybeCommitted
            ));
            assert!(matches!(
                store_error(&status, Call::Read),
                StoreError::Engine(_)
            ));
        }
    }

    #[test]
    fn refusals_before_the_handler_are_not_unknown_outcomes() {
        for code in [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
        ] {
            let status = Status::new(code, "refused");
            assert!(matches!(
                store_error(&status, Call::Commit),
                StoreError::Engine(_)
            ));
        }
    }

    #[test]
    fn the_message_text_is_never_parsed() {
        // A status whose message looks like a store error but carries no detail.
        let status = Status::new(
            Code::FailedPrecondition,
            "commit refused: the fence changed",
        );
        assert!(matches!(
            store_error(&status, Call::Commit),
            StoreError::MaybeCommitted
        ));
    }

    #[test]
    fn an_undecodable_detail_counts_as_none() {
        let mut metadata = MetadataMap::new();
        metadata.insert_bin(
            STORE_ERROR_METADATA,
            MetadataValue::from_bytes(&[0xff, 0xff, 0xff]),
        );
        let status = Status::with_metadata(Code::Unavailable, "?", metadata);
        assert!(decode(&status).is_none());
    }

    /// One error of each client code, with texts a lossy mapping would damage.
    fn every_client_error() -> Vec<ApiError> {
        let mut errors: Vec<ApiError> = ErrorCode::ALL
            .into_iter()
            .map(|code| ApiError::new(code, format!("{} — ünïcode, \n newline", code.as_str())))
            .collect();
        errors.push(ApiError::unavailable(
            "delivery is behind; retry shortly",
            500,
        ));
        errors.push(ApiError {
            code: ErrorCode::RateLimited,
            message: "too many sends to this group; slow down".into(),
            retry_after_ms: Some(250),
        });
        errors.push(ApiError::forbidden("you are not a member of g:0123"));
        errors
    }

    #[test]
    fn every_client_error_round_trips_exactly() {
        for error in every_client_error() {
            let mut headers = tonic::codegen::http::HeaderMap::new();
            api_status(&error).add_header(&mut headers).unwrap();
            let back = Status::from_header_map(&headers).expect("a status in the headers");
            assert_eq!(back.code(), api_code_of(error.code));
            assert_eq!(api_error(&back), error);
        }
    }

    #[test]
    fn client_codes_follow_grpc_meanings() {
        let code = |e: ApiError| api_status(&e).code();
        assert_eq!(code(ApiError::forbidden("x")), Code::PermissionDenied);
        assert_eq!(code(ApiError::not_found("x")), Code::NotFound);
        assert_eq!(code(ApiError::bad_request("x")), Code::InvalidArgument);
        assert_eq!(code(ApiError::unavailable("x", 1)), Code::Unavailable);
    }

    #[test]
    fn a_status_the_chat_role_did_not_answer_is_unavailable() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Cancelled,
            Code::DeadlineExceeded,
            Code::Unauthenticated,
            // Looks like the chat role's answer, but carries no detail: never parsed.
            Code::PermissionDenied,
        ] {
            let error = api_error(&Status::new(code, "you are not a member of g:1"));
            assert_eq!(error.code, ErrorCode::Unavailable, "{code:?}");
            assert_eq!(error.retry_after_ms, Some(CHAT_UNREACHABLE_RETRY_MS));
        }
    }

    #[test]
    fn a_client_error_of_an_unknown_code_counts_as_none() {
        let detail = ApiErrorDetail {
            code: "teapot".into(),
            message: "?".into(),
            retry_after_ms: None,
        };
        let mut metadata = MetadataMap::new();
        metadata.insert_bin(
            API_ERROR_METADATA,
            MetadataValue::from_bytes(&detail.encode_to_vec()),
        );
        let status = Status::with_metadata(Code::NotFound, "?", metadata);
        assert!(decode_api_error(&status).is_none());
        assert_eq!(api_error(&status).code, ErrorCode::Unavailable);
    }
}
