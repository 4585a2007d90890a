//! The provider side of UCloud: the calls UCloud/Core makes to vmhost as one of its compute
//! providers, under `/ucloud/{provider}/`.
//!
//! Every call carries Core's RS256 JWT ([`crate::provider::auth`]); without `[ucloud]` in the
//! config these paths are 404. Core names jobs by its own ids and sends whole `Job` objects;
//! the handlers map Core's ids to vmhost's and act for the job's `owner.createdBy`, through the
//! same [`crate::jobs::JobManager`] calls as the standalone API. Core never changes a job's
//! state itself: every update reaches it through [`crate::provider::reporter`].
//!
//! Served: `jobs` (create), `jobs/terminate`, `jobs/suspend`, `jobs/unsuspend`, `jobs/extend`,
//! `jobs/interactiveSession`, `jobs/retrieveProducts`, and the calls Core makes whatever the
//! provider does (`jobs/verify`, `jobs/init`, `jobs/requestDynamicParameters`,
//! `integration/init`, `integration/retrieveManifest`). Not served: the follow WebSocket
//! (`logs` is false in the products' support, so Core does not open it) and runtime
//! `attachResource`.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::{header, request};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::console::{open_sessions, SessionRequest, SessionType};
use super::error::ApiError;
use super::extract::AppJson;
use super::types::{BulkRequest, BulkResponse, Unit};
use super::AppState;
use crate::jobs::spec::SimpleDuration;
use crate::jobs::state::Denied;
use crate::jobs::{JobError, JobSpec, NewJobRequest, Owner};

/// A call Core signed; extracting it checks the provider id in the path and the bearer token.
pub(super) struct CoreCall;

impl FromRequestParts<AppState> for CoreCall {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut request::Parts,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let not_served = || ApiError::NotFound("no such endpoint".into());
        let verifier = state.core.as_ref().ok_or_else(not_served)?;
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|_| not_served())?;
        let provider = params.iter().find(|(name, _)| name == "provider");
        if provider.map(|(_, p)| p.as_str()) != Some(state.manager.config().provider_id.as_str()) {
            return Err(not_served());
        }
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        verifier.verify_header(authorization).map_err(|e| {
            tracing::warn!(error = %e, "refused a call claiming to be UCloud/Core");
            ApiError::Unauthenticated
        })?;
        Ok(CoreCall)
    }
}

/// The parts of Core's `Job` that vmhost reads; Core sends much more.
#[derive(Debug, Deserialize)]
pub(super) struct CoreJob {
    id: String,
    owner: CoreOwner,
    #[serde(default)]
    specification: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CoreOwner {
    created_by: String,
}

impl CoreJob {
    fn owner(&self) -> Owner {
        Owner(self.owner.created_by.clone())
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct JobItem {
    job: CoreJob,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ExtendItem {
    job: CoreJob,
    requested_time: SimpleDuration,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SessionItem {
    job: CoreJob,
    #[serde(default)]
    rank: u32,
    session_type: SessionType,
}

/// `POST /ucloud/{provider}/jobs`. A Core id that already names a job here is skipped, not
/// refused: Core retries a create whose answer it did not see, and a refusal would make it
/// delete the job the first attempt created.
pub(super) async fn create(
    State(state): State<AppState>,
    _: CoreCall,
    AppJson(request): AppJson<BulkRequest<CoreJob>>,
) -> Result<Json<BulkResponse<Value>>, ApiError> {
    let count = request.items.len();
    let store = state.manager.store();
    let mut new_jobs = Vec::with_capacity(count);
    for (index, job) in request.items.into_iter().enumerate() {
        if store.job_id_for_core(&job.id).await?.is_some() {
            tracing::info!(core_id = %job.id, "UCloud job exists already; create skipped");
            continue;
        }
        let owner = job.owner();
        let spec = job_spec(job.specification.unwrap_or(Value::Null))
            .map_err(|why| ApiError::BadRequest(format!("item {index}: {why}")))?;
        new_jobs.push(NewJobRequest {
            owner,
            spec,
            core_id: Some(job.id),
        });
    }
    if !new_jobs.is_empty() {
        state.manager.create_requests(new_jobs).await?;
    }
    // vmhost generates no id of its own: Core's id is the job's name here too.
    let responses = (0..count).map(|_| json!({ "id": "" })).collect();
    Ok(Json(BulkResponse { responses }))
}

/// Core's `JobSpecification` as the standalone API takes it. Go sends every field, empty
/// values included, and some the standalone API does not know; those mean nothing for a VM.
fn job_spec(mut spec: Value) -> Result<JobSpec, String> {
    let Some(fields) = spec.as_object_mut() else {
        return Err("specification must be an object".into());
    };
    for core_only in ["labels", "hostname", "sshEnabled"] {
        fields.remove(core_only);
    }
    let empty = |v: &Value| v.is_null() || v.as_str() == Some("") || v == &Value::Bool(false);
    for optional in ["name", "openedFile", "restartOnExit", "allowDuplicateJob"] {
        if fields.get(optional).is_some_and(empty) {
            fields.remove(optional);
        }
    }
    serde_json::from_value(Value::Object(std::mem::take(fields)))
        .map_err(|e| format!("invalid specification: {e}"))
}

/// vmhost's ids of Core's jobs, each with its owner; an unknown Core id refuses the request
/// before anything is done.
async fn local_jobs(state: &AppState, jobs: &[&CoreJob]) -> Result<Vec<(Owner, String)>, ApiError> {
    let mut local = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id = state
            .manager
            .store()
            .job_id_for_core(&job.id)
            .await?
            .ok_or_else(|| {
                ApiError::NotFound(format!("UCloud job {} is not on this provider", job.id))
            })?;
        local.push((job.owner(), id));
    }
    Ok(local)
}

/// `POST /ucloud/{provider}/jobs/terminate`. A job that already ended counts as terminated:
/// Core asks again when it did not see the answer.
pub(super) async fn terminate(
    State(state): State<AppState>,
    _: CoreCall,
    AppJson(request): AppJson<BulkRequest<CoreJob>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let jobs: Vec<&CoreJob> = request.items.iter().collect();
    for (owner, id) in local_jobs(&state, &jobs).await? {
        match state
            .manager
            .terminate(&owner, std::slice::from_ref(&id))
            .await
        {
            Err(JobError::Denied {
                denied: Denied::AlreadyFinal,
                ..
            }) => {}
            other => other?,
        }
    }
    Ok(acknowledged(jobs.len()))
}

/// `POST /ucloud/{provider}/jobs/suspend`.
pub(super) async fn suspend(
    State(state): State<AppState>,
    _: CoreCall,
    AppJson(request): AppJson<BulkRequest<JobItem>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    power(&state, &request.items, Power::Off).await
}

/// `POST /ucloud/{provider}/jobs/unsuspend`.
pub(super) async fn unsuspend(
    State(state): State<AppState>,
    _: CoreCall,
    AppJson(request): AppJson<BulkRequest<JobItem>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    power(&state, &request.items, Power::On).await
}

enum Power {
    Off,
    On,
}

/// Suspends or unsuspends each job, for its owner.
async fn power(
    state: &AppState,
    items: &[JobItem],
    power: Power,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let jobs: Vec<&CoreJob> = items.iter().map(|item| &item.job).collect();
    for (owner, id) in local_jobs(state, &jobs).await? {
        match power {
            Power::Off => state.manager.suspend(&owner, &[id]).await?,
            Power::On => state.manager.unsuspend(&owner, &[id]).await?,
        }
    }
    Ok(acknowledged(jobs.len()))
}

/// `POST /ucloud/{provider}/jobs/extend`.
pub(super) async fn extend(
    State(state): State<AppState>,
    _: CoreCall,
    AppJson(request): AppJson<BulkRequest<ExtendItem>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let jobs: Vec<&CoreJob> = request.items.iter().map(|item| &item.job).collect();
    let local = local_jobs(&state, &jobs).await?;
    for ((owner, id), item) in local.into_iter().zip(&request.items) {
        state
            .manager
            .extend(&owner, &[(id, item.requested_time)])
            .await?;
    }
    Ok(acknowledged(jobs.len()))
}

/// `POST /ucloud/{provider}/jobs/interactiveSession`: the bare `OpenSession` of each item;
/// Core wraps them itself.
pub(super) async fn interactive_session(
    State(state): State<AppState>,
    _: CoreCall,
    AppJson(request): AppJson<BulkRequest<SessionItem>>,
) -> Result<Json<BulkResponse<Value>>, ApiError> {
    let jobs: Vec<&CoreJob> = request.items.iter().map(|item| &item.job).collect();
    let local = local_jobs(&state, &jobs).await?;
    let requests = local
        .into_iter()
        .zip(&request.items)
        .map(|((owner, job_id), item)| SessionRequest {
            owner,
            job_id,
            shown_id: item.job.id.clone(),
            rank: item.rank,
            session_type: item.session_type,
        })
        .collect();
    let responses = open_sessions(&state, requests).await?;
    Ok(Json(BulkResponse { responses }))
}

/// `GET /ucloud/{provider}/jobs/retrieveProducts`: each product's `JobSupport`.
pub(super) async fn retrieve_products(
    State(state): State<AppState>,
    _: CoreCall,
) -> Json<BulkResponse<Value>> {
    let mut responses = Vec::new();
    for product in &state.manager.config().products {
        // No follow WebSocket for Core yet, so no `logs`: Core then does not open one.
        responses.push(super::products::support_for(&state, product, false).await);
    }
    Json(BulkResponse { responses })
}

/// Calls Core makes of every provider that need nothing from vmhost: `jobs/verify`,
/// `jobs/init`, `integration/init` (users need no mapping: they are Core's users).
pub(super) async fn nothing_to_do(_: CoreCall) -> Json<Map<String, Value>> {
    Json(Map::new())
}

/// `POST /ucloud/{provider}/jobs/requestDynamicParameters`: VM applications take their
/// parameters from vmhost's catalog, none are added per user.
pub(super) async fn dynamic_parameters(_: CoreCall) -> Json<Value> {
    Json(json!({ "parameters": [] }))
}

/// `GET /ucloud/{provider}/integration/retrieveManifest`: no connection step for users.
pub(super) async fn manifest(_: CoreCall) -> Json<Value> {
    Json(json!({ "enabled": false, "expireAfterMs": null }))
}

fn acknowledged(count: usize) -> Json<BulkResponse<Unit>> {
    Json(BulkResponse {
        responses: (0..count).map(|_| Unit {}).collect(),
    })
}
