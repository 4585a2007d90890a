//! Handlers of `retrieveProducts` and `retrieveUtilization`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::AuthUser;
use super::types::{compute_support, product, VmFeatures};
use super::AppState;
use crate::config::ProductConfig;

pub(super) async fn jobs_retrieve_products(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> Json<Value> {
    let config = state.manager.config();
    let mut items = Vec::with_capacity(config.products.len());
    for p in &config.products {
        items.push(json!({
            "product": product(p, &config.provider_id),
            "support": support_for(&state, p).await,
        }));
    }
    let by_provider: BTreeMap<&str, Vec<Value>> = [(config.provider_id.as_str(), items)].into();
    Json(json!({ "productsByProvider": by_provider }))
}

/// The product's `ComputeSupport`: enabled only while the hypervisor answers and the machine
/// fits on this host.
pub(super) async fn support_for(state: &AppState, p: &ProductConfig) -> Value {
    let host = state.manager.backend().host_info().await.ok();
    let fits = host.is_some_and(|h| {
        p.cpu <= h.cpus && u64::from(p.memory_in_gigs) * 1024 <= h.memory_mib && p.gpu == 0
    });
    let features = VmFeatures {
        enabled: fits,
        logs: true,
        vnc: false,
        terminal: false,
        time_extension: true,
        suspension: false,
        utilization: true,
    };
    compute_support(p, &state.manager.config().provider_id, features)
}

pub(super) async fn jobs_retrieve_utilization(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let host = state
        .manager
        .backend()
        .host_info()
        .await
        .map_err(|e| ApiError::Busy(format!("the hypervisor is unavailable: {e}")))?;
    let usage = state.manager.usage().await?;
    let gib = 1024 * 1024 * 1024_u64;
    Ok(Json(json!({
        "capacity": { "cpu": f64::from(host.cpus), "memory": host.memory_mib * 1024 * 1024 },
        "usedCapacity": { "cpu": f64::from(usage.cpu), "memory": usage.memory_gib * gib },
        "queueStatus": { "running": usage.running, "pending": usage.pending },
    })))
}
