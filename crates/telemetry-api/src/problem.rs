//! What a caller gets when a request fails: a status code and a JSON body that says what went
//! wrong and, for a bad parameter, which one:
//!
//! ```json
//! {"error": "invalid_parameter", "field": "limit", "message": "limit must be between 1 and 1000; got '5000'"}
//! ```
//!
//! `error` is a stable code for programs, `message` is for people. Server-side failures are
//! logged with their cause; the caller gets the code and a hint, never a stack of internals.

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use telemetry_core::contract::{PayloadError, Segment, TopicError};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Problem {
    #[serde(skip)]
    pub status: StatusCode,
    /// Stable code: `unauthorized`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `invalid_parameter`, `invalid_payload`, `payload_too_large`, `unavailable`, `internal`.
    pub error: &'static str,
    /// The query parameter or path segment at fault, for `invalid_parameter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<Cow<'static, str>>,
    /// The wire-contract reason code (`docs/contract.md`), for `invalid_payload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    pub message: String,
}

impl Problem {
    fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        Problem {
            status,
            error,
            field: None,
            reason: None,
            message: message.into(),
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    pub fn invalid_parameter(
        field: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            field: Some(field.into()),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_parameter",
                message,
            )
        }
    }

    /// A path's user or device id that breaks the contract's id rules.
    pub fn invalid_id(error: &TopicError) -> Self {
        let field = match error {
            TopicError::EmptySegment(segment)
            | TopicError::Wildcard(segment, _)
            | TopicError::ControlCharacter(segment, _)
            | TopicError::TooLong(segment, _) => *segment,
            _ => Segment::Device,
        };
        Self::invalid_parameter(field.to_string(), error.to_string())
    }

    pub fn invalid_payload(error: &PayloadError) -> Self {
        Problem {
            reason: Some(error.reason().code()),
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_payload",
                error.to_string(),
            )
        }
    }

    pub fn payload_too_large(max: usize) -> Self {
        Problem {
            reason: Some(telemetry_core::contract::DeadLetterReason::PayloadTooLarge.code()),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {max} bytes, the most a reading may be"),
            )
        }
    }

    /// A dependency (PostgreSQL, Kafka) failed or was too slow; the request may be retried.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, Json(self)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"telemetry-api\""),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_parameter_names_its_field_in_the_body() {
        let body =
            serde_json::to_value(Problem::invalid_parameter("limit", "must be at most 1000"))
                .unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "error": "invalid_parameter",
                "field": "limit",
                "message": "must be at most 1000"
            })
        );
    }

    #[test]
    fn a_bad_device_id_names_the_device() {
        let error = telemetry_core::contract::DeviceId::new("alice", "a+b").unwrap_err();
        let problem = Problem::invalid_id(&error);
        assert_eq!(problem.field.as_deref(), Some("device"));
        assert_eq!(problem.status, StatusCode::UNPROCESSABLE_ENTITY);
    }
}
