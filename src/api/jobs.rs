//! Handlers of the Jobs calls: create, retrieve, browse, search, terminate, extend, init.

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::extract::{AppJson, AppQuery, AuthUser};
use super::paging::PageRequest;
use super::types::{
    wire_job, BrowseQuery, BulkRequest, BulkResponse, ExtendItem, FindByStringId, JobIncludeFlags,
    PageV2, Resolved, RetrieveQuery, SearchRequest, Unit, WireJob,
};
use super::{products, AppState};
use crate::jobs::{JobRecord, JobSpec};
use crate::store::JobQuery;

pub(super) async fn jobs_create(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<JobSpec>>,
) -> Result<Json<BulkResponse<FindByStringId>>, ApiError> {
    let ids = state.manager.create(&owner, request.items).await?;
    Ok(Json(BulkResponse {
        responses: ids.into_iter().map(|id| FindByStringId { id }).collect(),
    }))
}

pub(super) async fn jobs_retrieve(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppQuery(query): AppQuery<RetrieveQuery>,
) -> Result<Json<WireJob>, ApiError> {
    let job = state.manager.retrieve(&owner, &query.id).await?;
    Ok(Json(to_wire(&state, &job, &query.flags).await))
}

pub(super) async fn jobs_browse(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppQuery(query): AppQuery<BrowseQuery>,
) -> Result<Json<PageV2<WireJob>>, ApiError> {
    page(
        &state,
        &owner,
        query.flags,
        None,
        query.items_per_page,
        query.next,
    )
    .await
    .map(Json)
}

pub(super) async fn jobs_search(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<SearchRequest>,
) -> Result<Json<PageV2<WireJob>>, ApiError> {
    let text = Some(request.query).filter(|q| !q.trim().is_empty());
    page(
        &state,
        &owner,
        request.flags,
        text,
        request.items_per_page,
        request.next,
    )
    .await
    .map(Json)
}

pub(super) async fn jobs_terminate(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<FindByStringId>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let ids = ids_of(request);
    state.manager.terminate(&owner, &ids).await?;
    Ok(acknowledged(ids.len()))
}

pub(super) async fn jobs_suspend(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<FindByStringId>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let ids = ids_of(request);
    state.manager.suspend(&owner, &ids).await?;
    Ok(acknowledged(ids.len()))
}

pub(super) async fn jobs_unsuspend(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<FindByStringId>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let ids = ids_of(request);
    state.manager.unsuspend(&owner, &ids).await?;
    Ok(acknowledged(ids.len()))
}

pub(super) async fn jobs_extend(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<ExtendItem>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let items: Vec<_> = request
        .items
        .into_iter()
        .map(|i| (i.job_id, i.requested_time))
        .collect();
    state.manager.extend(&owner, &items).await?;
    Ok(acknowledged(items.len()))
}

pub(super) fn ids_of(request: BulkRequest<FindByStringId>) -> Vec<String> {
    request.items.into_iter().map(|i| i.id).collect()
}

/// `BulkResponse<Unit>` with one empty object per item.
pub(super) fn acknowledged(items: usize) -> Json<BulkResponse<Unit>> {
    Json(BulkResponse {
        responses: (0..items).map(|_| Unit {}).collect(),
    })
}

/// Nothing needs initialising per user on a standalone host; UCloud may call it any time.
pub(super) async fn jobs_init(AuthUser(_): AuthUser) -> Json<Unit> {
    Json(Unit {})
}

pub(super) async fn jobs_not_supported(AuthUser(_): AuthUser) -> ApiError {
    ApiError::NotSupported("this operation is not supported by this provider yet".into())
}

async fn page(
    state: &AppState,
    owner: &crate::jobs::Owner,
    flags: JobIncludeFlags,
    text: Option<String>,
    items_per_page: Option<u32>,
    next: Option<String>,
) -> Result<PageV2<WireJob>, ApiError> {
    let page = PageRequest::parse(items_per_page, next.as_deref())?;
    let mut query = query_from_flags(&flags);
    query.text = text;
    query.before_id = page.before_id;
    query.limit = Some(page.fetch_limit());
    let mut jobs = state.manager.browse(owner, query).await?;
    let next = page.finish(&mut jobs, |j| &j.id);
    let mut items = Vec::with_capacity(jobs.len());
    for job in &jobs {
        items.push(to_wire(state, job, &flags).await);
    }
    Ok(PageV2 {
        items_per_page: page.items_per_page,
        items,
        next,
    })
}

fn query_from_flags(flags: &JobIncludeFlags) -> JobQuery {
    let list = |s: &Option<String>| {
        s.as_ref().map(|s| {
            s.split(',')
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect()
        })
    };
    let mut providers: Option<Vec<String>> = list(&flags.filter_provider_ids);
    if let Some(p) = &flags.filter_provider {
        providers.get_or_insert_with(Vec::new).push(p.clone());
    }
    JobQuery {
        ids: list(&flags.filter_ids),
        state: flags.filter_state,
        app_name: flags.filter_application.clone(),
        created_by: flags.filter_created_by.clone(),
        created_after: flags.filter_created_after,
        created_before: flags.filter_created_before,
        providers,
        product_id: flags.filter_product_id.clone(),
        product_category: flags.filter_product_category.clone(),
        hide_product_id: flags.hide_product_id.clone(),
        hide_product_category: flags.hide_product_category.clone(),
        hide_provider: flags.hide_provider.clone(),
        ..JobQuery::default()
    }
}

pub(super) async fn to_wire(state: &AppState, job: &JobRecord, flags: &JobIncludeFlags) -> WireJob {
    let config = state.manager.config();
    let product = config.product(&job.spec.product.id, &job.spec.product.category);
    let support = match (flags.include_support.unwrap_or(false), product) {
        (true, Some(p)) => products::support_for(state, p, true).await,
        _ => serde_json::Value::Null,
    };
    let resolved = Resolved {
        product,
        image: state
            .manager
            .catalog()
            .find(&job.spec.application.name, &job.spec.application.version),
        provider_id: &config.provider_id,
        support,
    };
    wire_job(job, flags, &resolved)
}
