//! The one place where errors become HTTP statuses and UCloud error bodies.
//!
//! Every error leaves as `{"why": ..., "errorCode": ..., "statusCode": ...}`. 5xx responses
//! carry a generic message; their full chain goes to the log only.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::jobs::state::Denied;
use crate::jobs::{JobError, SpecError};
use crate::network::public_ips::PublicIpError;
use crate::store::StoreError;
use crate::telemetry::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid bearer token")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotSupported(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    UpgradeRequired(String),
    #[error("{0}")]
    Busy(String),
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<PublicIpError> for ApiError {
    fn from(e: PublicIpError) -> Self {
        match e {
            PublicIpError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            PublicIpError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            PublicIpError::Exhausted { .. } | PublicIpError::InUse { .. } => {
                ApiError::Conflict(e.to_string())
            }
            PublicIpError::Store(err) => ApiError::Internal(Box::new(err)),
            PublicIpError::Firewall(err) => ApiError::Internal(Box::new(err)),
        }
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "BAD_REQUEST"),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            ApiError::Gone(_) => (StatusCode::GONE, "GONE"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            ApiError::NotSupported(_) => (StatusCode::BAD_REQUEST, "NOT_SUPPORTED"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            ApiError::UpgradeRequired(_) => (StatusCode::UPGRADE_REQUIRED, "UPGRADE_REQUIRED"),
            ApiError::Busy(_) => (StatusCode::SERVICE_UNAVAILABLE, "BUSY"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
        }
    }

    /// The UCloud error body and its status.
    pub fn body(&self) -> (StatusCode, serde_json::Value) {
        let (status, code) = self.status_and_code();
        let why = match self {
            ApiError::Internal(e) => {
                tracing::error!(error = %error_chain(e.as_ref()), "request failed");
                "Internal error in vmhost; the operator can find details in its log".to_owned()
            }
            other => other.to_string(),
        };
        (
            status,
            crate::ucloud::error_body(status.as_u16(), code, &why),
        )
    }
}

impl ApiError {
    /// The same kind of error with another message (internal errors keep theirs).
    fn with_why(self, why: String) -> ApiError {
        match self {
            ApiError::BadRequest(_) => ApiError::BadRequest(why),
            ApiError::NotFound(_) => ApiError::NotFound(why),
            ApiError::Forbidden(_) => ApiError::Forbidden(why),
            ApiError::Gone(_) => ApiError::Gone(why),
            ApiError::Conflict(_) => ApiError::Conflict(why),
            ApiError::NotSupported(_) => ApiError::NotSupported(why),
            ApiError::MethodNotAllowed(_) => ApiError::MethodNotAllowed(why),
            ApiError::UpgradeRequired(_) => ApiError::UpgradeRequired(why),
            ApiError::Busy(_) => ApiError::Busy(why),
            ApiError::Unauthenticated | ApiError::Internal(_) => self,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.body();
        (status, Json(body)).into_response()
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotFound { .. } => ApiError::NotFound(e.to_string()),
            JobError::InvalidSpec { ref source, .. } => match source {
                SpecError::UnknownProduct { .. }
                | SpecError::UnknownApplication { .. }
                | SpecError::Invalid(_) => ApiError::BadRequest(e.to_string()),
            },
            JobError::Duplicate { .. } | JobError::Conflict(_) => ApiError::Conflict(e.to_string()),
            JobError::Denied { denied, .. } => match denied {
                Denied::AlreadyFinal
                | Denied::NotRunning
                | Denied::NotSuspended
                | Denied::NotApplicable => ApiError::Conflict(e.to_string()),
            },
            JobError::NoDeadline { .. } | JobError::BadRequest(_) => {
                ApiError::BadRequest(e.to_string())
            }
            JobError::Busy => ApiError::Busy(e.to_string()),
            JobError::Backend(err) => ApiError::Internal(err),
            JobError::Bulk { errors } => {
                // Every refused item is named in `why`; the first one decides the status.
                let why = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                match errors.into_iter().next().map(ApiError::from) {
                    Some(first) => first.with_why(why),
                    None => ApiError::BadRequest(why),
                }
            }
            JobError::Store(err) => ApiError::Internal(Box::new(err)),
        }
    }
}

impl From<WebSocketUpgradeRejection> for ApiError {
    fn from(rejection: WebSocketUpgradeRejection) -> Self {
        let why = rejection.body_text();
        match rejection.status() {
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(why),
            StatusCode::UPGRADE_REQUIRED => ApiError::UpgradeRequired(why),
            _ => ApiError::BadRequest(why),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Internal(Box::new(e))
    }
}
