//! The one place where a refusal or failure becomes an HTTP response.
//!
//! What the client reads is written here on purpose, one message per reason; no internal error
//! text ever reaches a client, so nothing sensitive can leak through an error body.

use crate::body::ResponseBody;
use apiwarden_core::event::Reason;
use http::{header, HeaderValue, Response, StatusCode};

/// Status and client-facing message for a reason.
pub fn status_and_message(reason: Reason) -> (StatusCode, &'static str) {
    match reason {
        Reason::Ok => (StatusCode::OK, "ok"),
        Reason::RequestMalformed => (StatusCode::BAD_REQUEST, "the request is not valid HTTP"),
        Reason::RequestBadPath => (StatusCode::BAD_REQUEST, "the request path is not valid"),
        Reason::RequestHeadersTooLarge => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "the request headers are too large",
        ),
        Reason::RequestBodyTooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large",
        ),
        Reason::RequestBodyTimeout => (
            StatusCode::REQUEST_TIMEOUT,
            "the request body stopped arriving; send the whole body without long pauses",
        ),
        Reason::RouteNotFound => (StatusCode::NOT_FOUND, "no route matches this request"),
        Reason::AuthnMissing => (StatusCode::UNAUTHORIZED, "a credential is required"),
        Reason::AuthnUnavailable => (
            StatusCode::UNAUTHORIZED,
            "this route's authentication method is not available",
        ),
        Reason::AuthnMalformed => (StatusCode::UNAUTHORIZED, "the credential is malformed"),
        Reason::AuthnTokenExpired => (StatusCode::UNAUTHORIZED, "the token has expired"),
        Reason::AuthnTokenNotYetValid => (StatusCode::UNAUTHORIZED, "the token is not valid yet"),
        Reason::AuthnCertificateInvalid => (
            StatusCode::UNAUTHORIZED,
            "the client certificate is no longer valid (expired, or no longer trusted); reconnect with a valid certificate",
        ),
        Reason::AuthnKeysUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the token issuer's keys cannot be fetched now; retry later",
        ),
        Reason::AuthnIntrospectionUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the token cannot be checked now; retry later",
        ),
        Reason::AuthnTokenInactive => (StatusCode::UNAUTHORIZED, "the token is not active"),
        Reason::AuthnAlgNone
        | Reason::AuthnAlgConfusion
        | Reason::AuthnAlgNotAllowed
        | Reason::AuthnUnknownKid
        | Reason::AuthnBadSignature
        | Reason::AuthnWrongIssuer
        | Reason::AuthnWrongAudience
        | Reason::AuthnInvalidKey
        | Reason::AuthnExpiredKey
        | Reason::AuthnRevokedKey => {
            // One message for all three: the client learns nothing about which keys exist.
            (StatusCode::UNAUTHORIZED, "the credential is not valid")
        }
        Reason::AuthzIpNotAllowed => (
            StatusCode::FORBIDDEN,
            "the credential is not accepted from this address",
        ),
        Reason::AuthzMissingRole => (
            StatusCode::FORBIDDEN,
            "the caller does not hold a role this route requires",
        ),
        Reason::AuthzMissingScope => (
            StatusCode::FORBIDDEN,
            "the credential does not grant access to this route",
        ),
        Reason::UpstreamUnavailable => (
            StatusCode::BAD_GATEWAY,
            "the upstream service could not be reached",
        ),
        Reason::UpstreamError => (StatusCode::BAD_GATEWAY, "the upstream service failed"),
        Reason::UpstreamTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "the upstream service did not answer in time",
        ),
        Reason::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is shutting down",
        ),
        Reason::ClientDisconnected => (StatusCode::BAD_REQUEST, "the client went away"),
        Reason::RateLimitExceeded => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded; retry after the number of seconds in Retry-After",
        ),
        Reason::RateLimitUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the rate limit cannot be checked now; retry later",
        ),
        Reason::Blocked => (StatusCode::FORBIDDEN, "this client is blocked"),
        Reason::AdminAction => (StatusCode::OK, "ok"),
        Reason::LedgerRecordCut | Reason::LedgerRetention => {
            (StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
        Reason::AuditUnavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the request cannot be recorded now, so it was not forwarded; retry later",
        ),
    }
}

/// A JSON error response: `{"error": "...", "request_id": "..."}`.
pub fn error_response(reason: Reason, request_id: &HeaderValue) -> Response<ResponseBody> {
    let (status, message) = status_and_message(reason);
    // The request id is a UUID the gateway generated: no escaping is needed.
    let body = format!(
        "{{\"error\":\"{message}\",\"request_id\":\"{}\"}}\n",
        request_id.to_str().unwrap_or("")
    );
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(crate::pipeline::X_REQUEST_ID, request_id.clone());
    resp
}
