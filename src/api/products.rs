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
use crate::jobs::capacity::Resources;

pub(super) async fn jobs_retrieve_products(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> Json<Value> {
    let config = state.manager.config();
    let mut items = Vec::with_capacity(config.products.len());
    for p in &config.products {
        items.push(json!({
            "product": product(p, &config.provider_id),
            "support": support_for(&state, p, true).await,
        }));
    }
    let by_provider: BTreeMap<&str, Vec<Value>> = [(config.provider_id.as_str(), items)].into();
    Json(json!({ "productsByProvider": by_provider }))
}

/// The product's `ComputeSupport`: enabled only while the hypervisor answers and the machine
/// fits on this host at all. `logs` says whether the caller's follow stream is served.
pub(super) async fn support_for(state: &AppState, p: &ProductConfig, logs: bool) -> Value {
    let fits = state.manager.schedulable().await.is_some_and(|total| {
        let needs = Resources {
            vcpus: u64::from(p.cpu),
            memory_mib: u64::from(p.memory_in_gigs) * 1024,
            disk_gib: u64::from(p.disk_gib),
        };
        needs.fits_in(total) && p.gpu == 0
    });
    let features = VmFeatures {
        enabled: fits,
        logs,
        vnc: true,
        terminal: true,
        time_extension: true,
        suspension: true,
        utilization: true,
        peers: state.manager.config().private_network().is_some(),
    };
    compute_support(p, &state.manager.config().provider_id, features)
}

pub(super) async fn jobs_retrieve_utilization(
    State(state): State<AppState>,
    AuthUser(_): AuthUser,
) -> Result<Json<Value>, ApiError> {
    let u = state
        .manager
        .utilization()
        .await?
        .ok_or_else(|| ApiError::Busy("the hypervisor is unavailable; retry shortly".into()))?;
    let mib = 1024 * 1024_u64;
    // vCPU counts are small integers; f64 holds them exactly.
    #[allow(clippy::cast_precision_loss)]
    let cpu = |r: &Resources| r.vcpus as f64;
    Ok(Json(json!({
        "capacity": { "cpu": cpu(&u.capacity), "memory": u.capacity.memory_mib * mib },
        "usedCapacity": { "cpu": cpu(&u.used), "memory": u.used.memory_mib * mib },
        "queueStatus": { "running": u.running, "pending": u.pending },
    })))
}
