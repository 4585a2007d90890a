//! Handlers of the public IP calls (`/api/networkips`): create, retrieve, browse, delete,
//! firewall, retrieveProducts.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{AppJson, AppQuery, AuthUser};
use super::jobs::{decode_cursor, encode_cursor, DEFAULT_PAGE, MAX_PAGE};
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
    let items_per_page = query
        .items_per_page
        .unwrap_or(DEFAULT_PAGE)
        .clamp(1, MAX_PAGE);
    let before_id = query.next.as_deref().map(decode_cursor).transpose()?;
    // One extra row tells whether another page exists.
    let mut ips = state
        .public_ips
        .browse(&owner, before_id, items_per_page + 1)
        .await?;
    let more = ips.len() > items_per_page as usize;
    ips.truncate(items_per_page as usize);
    let next = more
        .then(|| ips.last().map(|ip| encode_cursor(&ip.id)))
        .flatten();
    let config = state.public_ips.config();
    Ok(Json(PageV2 {
        items_per_page,
        items: ips.iter().map(|ip| wire_public_ip(ip, config)).collect(),
        next,
    }))
}

pub(super) async fn delete(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<FindByStringId>>,
) -> Result<Json<BulkResponse<Unit>>, ApiError> {
    let ids: Vec<String> = request.items.into_iter().map(|i| i.id).collect();
    let count = ids.len();
    state.public_ips.delete(&owner, ids).await?;
    Ok(Json(BulkResponse {
        responses: (0..count).map(|_| Unit {}).collect(),
    }))
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
    Ok(Json(BulkResponse {
        responses: (0..count).map(|_| Unit {}).collect(),
    }))
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
