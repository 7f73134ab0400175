//! The one mapping from errors to HTTP: a JSON body
//! `{"error": {"code", "message"}}`; 4xx say what was wrong, 5xx log the
//! cause and say little.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::crypto::CryptoError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no such request")]
    NotFound,
    /// A path the gateway does not serve: the message says what it serves.
    #[error("{0}")]
    NoRoute(String),
    /// The methods the path takes, for the `Allow` header.
    #[error("this method is not allowed here; it takes {0}")]
    MethodNotAllowed(&'static str),
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("the path, query, headers and callback URL together pass the limit of {0} bytes")]
    HeadersTooLarge(usize),
    #[error("the body is larger than the limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("this needs the admin token: Authorization: Bearer <--admin-token>")]
    Unauthorized,
    #[error("{0}")]
    Conflict(String),
    #[error("the response was larger than --max-response-size and was not kept")]
    ResponseTooLarge,
    #[error("the request body could not be read: {0}")]
    BodyUnreadable(String),
    #[error(
        "this credential already has {0} requests waiting (--max-pending-per-credential); retry later"
    )]
    TooManyPending(u64),
    #[error("the gateway is short of disk space; nothing was stored, retry later")]
    InsufficientStorage,
    #[error("the request is being sent upstream and cannot be cancelled now")]
    InFlight,
    #[error("this Idempotency-Key was used for a different request (method, target or body)")]
    IdempotencyKeyReused,
    #[error("storage unavailable")]
    Store(StoreError),
    #[error("internal error")]
    Crypto(#[from] CryptoError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NoSpace => ApiError::InsufficientStorage,
            StoreError::LaneFull(cap) => ApiError::TooManyPending(cap),
            StoreError::TooLarge(n) => ApiError::HeadersTooLarge(n),
            StoreError::InFlight => ApiError::InFlight,
            StoreError::IdempotencyReused => ApiError::IdempotencyKeyReused,
            other => ApiError::Store(other),
        }
    }
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound | ApiError::NoRoute(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BadRequest { code, .. } => code,
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::HeadersTooLarge(_) => "headers_too_large",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Conflict(_) => "conflict",
            ApiError::ResponseTooLarge => "response_too_large",
            ApiError::BodyUnreadable(_) => "body_unreadable",
            ApiError::TooManyPending(_) => "too_many_pending",
            ApiError::InsufficientStorage => "insufficient_storage",
            ApiError::InFlight => "in_flight",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::Store(StoreError::Codec(_) | StoreError::Transition(_)) => "internal_error",
            ApiError::Store(_) => "store_unavailable",
            ApiError::Crypto(_) => "internal_error",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadRequest { .. } | ApiError::BodyUnreadable(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Conflict(_) | ApiError::InFlight => StatusCode::CONFLICT,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::ResponseTooLarge => StatusCode::BAD_GATEWAY,
            ApiError::TooManyPending(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::InsufficientStorage => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Store(StoreError::Codec(_) | StoreError::Transition(_))
            | ApiError::Crypto(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        if status.is_server_error() {
            log::error!("{}: {self}: {:?}", status.as_u16(), self);
        }
        let message = match self {
            ApiError::Store(StoreError::NotDurable) => {
                "the store failed while making this write durable: it was not acknowledged, and may or may not have been kept; the gateway restarts"
                    .to_string()
            }
            ApiError::Store(_) if status == StatusCode::SERVICE_UNAVAILABLE => {
                "the store cannot take writes right now; nothing was acknowledged, retry later"
                    .to_string()
            }
            other => other.to_string(),
        };
        let mut answer = HttpResponse::build(status);
        match self {
            ApiError::TooManyPending(_) => {
                answer.insert_header((actix_web::http::header::RETRY_AFTER, "1"));
            }
            // RFC 9110 §15.5.6: a 405 says what the path takes.
            ApiError::MethodNotAllowed(allow) => {
                answer.insert_header((actix_web::http::header::ALLOW, *allow));
            }
            _ => {}
        }
        answer.json(json!({"error": {"code": self.code(), "message": message}}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_are_503_and_unreadable_data_500() {
        for e in [
            StoreError::NotDurable,
            StoreError::Closed,
            StoreError::Unavailable("disk full".into()),
        ] {
            let r = ApiError::Store(e).error_response();
            assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        let r = ApiError::Store(StoreError::Codec("bad".into())).error_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
