//! Handlers of the public IP calls (`/api/networkips`): create, retrieve, browse, delete,
//! firewall, retrieveProducts.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{AppJson, AppQuery, AuthUser};
use super::jobs::{acknowledged, ids_of};
use super::paging::PageRequest;
use super::types::{
    wire_public_ip, BulkRequest, BulkResponse, FindByStringId, FirewallItem, IdQuery, PageQuery,
    PageV2, Unit,
};
use super::AppState;
use crate::network::ip::PublicIpSpec;

pub(super) async fn create(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<PublicIpSpec>>,
) -> Result<Json<BulkResponse<FindByStringId>>, ApiError> {
    let created = state.public_ips.create(&owner, request.items).await?;
    Ok(Json(BulkResponse {
        responses: created
            .into_iter()
            .map(|ip| FindByStringId { id: ip.id })
            .collect(),
    }))
}

pub(super) async fn retrieve(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppQuery(query): AppQuery<IdQuery>,
) -> Result<Json<Value>, ApiError> {
    let ip = state.public_ips.retrieve(&owner, &query.id).await?;
    Ok(Json(wire_public_ip(&ip, state.public_ips.config())))
}

pub(super) async fn browse(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppQuery(query): AppQuery<PageQuery>,
) -> Result<Json<PageV2<Value>>, ApiError> {
    let page = PageRequest::parse(query.items_per_page, query.next.as_deref())?;
    let mut ips = state
        .public_ips
        .browse(&owner, page.before_id, page.fetch_limit())
        .await?;
    let next = page.finish(&mut ips, |ip| &ip.id);
    let config = state.public_ips.config();
    Ok(Json(PageV2 {
        items_per_page: page.items_per_page,
        items: ips.iter().map(|ip| wire_public_ip(ip, config)).collect(),
        next,
    }))
}

pub(super) async fn delete(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<FindByStringId>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let ids = ids_of(request);
    let count = ids.len();
    state.public_ips.delete(&owner, ids).await?;
    Ok(acknowledged(count))
}

pub(super) async fn update_firewall(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<FirewallItem>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let items: Vec<_> = request
        .items
        .into_iter()
        .map(FirewallItem::into_parts)
        .collect::<Result<_, _>>()?;
    let count = items.len();
    state.public_ips.update_firewall(&owner, items).await?;
    Ok(acknowledged(count))
}

/// `SupportByProvider` of the public IP products: one per pool, with the firewall.
pub(super) async fn retrieve_products(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> Json<Value> {
    let config = state.public_ips.config();
    let provider = config.provider_id.as_str();
    let items: Vec<Value> = config
        .public_pools
        .iter()
        .map(|pool| {
            let reference = json!({ "id": pool.name, "category": pool.name, "provider": provider });
            json!({
                "product": {
                    "type": "network_ip",
                    "name": pool.name,
                    "category": { "name": pool.name, "provider": provider },
                    "description": pool.description,
                    "pricePerUnit": 0,
                    "freeToUse": true,
                    "unitOfPrice": "PER_UNIT",
                    "chargeType": "ABSOLUTE",
                    "productType": "NETWORK_IP",
                    "version": 1,
                },
                "support": { "product": reference, "firewall": { "enabled": true } },
            })
        })
        .collect();
    let by_provider: BTreeMap<&str, Vec<Value>> = [(provider, items)].into();
    Json(json!({ "productsByProvider": by_provider }))
}
