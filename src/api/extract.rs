//! Request extractors whose rejections speak UCloud's error format.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRef, FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;
use crate::jobs::Owner;

/// JSON body; malformed or mistyped bodies become 400 with the parser's reason.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<S, T> FromRequest<S> for AppJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(AppJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonDataError(e) => {
            ApiError::BadRequest(format!("invalid request: {}", e.body_text()))
        }
        JsonRejection::JsonSyntaxError(e) => {
            ApiError::BadRequest(format!("malformed JSON: {}", e.body_text()))
        }
        JsonRejection::MissingJsonContentType(_) => {
            ApiError::BadRequest("expected a JSON body with Content-Type: application/json".into())
        }
        JsonRejection::BytesRejection(e) => {
            ApiError::BadRequest(format!("cannot read body: {}", e.body_text()))
        }
        other => ApiError::BadRequest(other.body_text()),
    }
}

/// Query string parameters; bad values become 400.
#[derive(Debug)]
pub struct AppQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for AppQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| AppQuery(q))
            .map_err(|e: QueryRejection| {
                ApiError::BadRequest(format!("invalid query: {}", e.body_text()))
            })
    }
}

/// The user behind `Authorization: Bearer <token>`.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Owner);

impl<S> FromRequestParts<S> for AuthUser
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let state = AppState::from_ref(state);
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthenticated)?;
        state
            .user_for_token(token)
            .map(AuthUser)
            .ok_or(ApiError::Unauthenticated)
    }
}
