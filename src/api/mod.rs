//! The HTTP and WebSocket surface: UCloud's end-user Jobs and public IP APIs, served
//! standalone, and the provider calls UCloud/Core makes when vmhost is one of its providers.
//!
//! Handlers only translate: extract and authenticate, call [`crate::jobs::JobManager`], map the
//! result. HTTP statuses are chosen in `error` alone.

mod console;
mod error;
mod extract;
mod follow;
mod jobs;
mod networkips;
mod paging;
mod products;
mod provider;
pub mod types;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use sha2::{Digest, Sha256};
use tower_http::services::ServeDir;

pub use error::ApiError;

use crate::jobs::{JobManager, Owner};
use crate::network::public_ips::PublicIps;

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    pub manager: JobManager,
    pub public_ips: PublicIps,
    /// SHA-256 of each user's token, with the user's name.
    users: Arc<Vec<([u8; 32], String)>>,
    /// One-time console links handed out by `interactiveSession`.
    pub tokens: Arc<crate::console::SessionTokens>,
    /// Checks UCloud/Core's calls; `None` unless vmhost is configured as Core's provider.
    pub core: Option<Arc<crate::provider::auth::CoreVerifier>>,
}

impl AppState {
    pub fn new(
        manager: JobManager,
        public_ips: PublicIps,
        users: &[crate::config::UserConfig],
    ) -> AppState {
        let users = users
            .iter()
            .map(|u| (Sha256::digest(u.token.as_bytes()).into(), u.name.clone()));
        let ttl = std::time::Duration::from_secs(manager.config().console_token_ttl_secs);
        AppState {
            manager,
            public_ips,
            users: Arc::new(users.collect()),
            tokens: Arc::new(crate::console::SessionTokens::new(ttl)),
            core: None,
        }
    }

    /// Serves UCloud/Core's provider calls, checked with `verifier`.
    pub fn with_core(mut self, verifier: crate::provider::auth::CoreVerifier) -> AppState {
        self.core = Some(Arc::new(verifier));
        self
    }

    /// Comparing digests rather than tokens keeps the comparison time independent of how
    /// much of a guessed token is right.
    pub fn user_for_token(&self, token: &str) -> Option<Owner> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.users
            .iter()
            .find(|(d, _)| *d == digest)
            .map(|(_, name)| Owner(name.clone()))
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.manager.config().max_body_bytes;
    let web = state.manager.config().web_dir.clone();
    Router::new()
        .route(
            "/api/jobs",
            post(jobs::jobs_create).get(follow::jobs_follow),
        )
        .route("/api/jobs/retrieve", get(jobs::jobs_retrieve))
        .route("/api/jobs/browse", get(jobs::jobs_browse))
        .route("/api/jobs/search", post(jobs::jobs_search))
        .route("/api/jobs/terminate", post(jobs::jobs_terminate))
        .route("/api/jobs/extend", post(jobs::jobs_extend))
        .route("/api/jobs/init", post(jobs::jobs_init))
        .route("/api/jobs/suspend", post(jobs::jobs_suspend))
        .route("/api/jobs/unsuspend", post(jobs::jobs_unsuspend))
        .route(
            "/api/jobs/interactiveSession",
            post(console::jobs_open_interactive_session),
        )
        .route("/ucloud/{provider}/vnc", get(console::console_vnc))
        .route("/ucloud/{provider}/websocket", get(console::console_shell))
        .route("/api/console/status", get(console::console_status))
        .route("/console", get(console::console_page))
        .route("/terminal", get(console::terminal_page))
        .route("/assets/{name}", get(console::page_script))
        .nest_service(
            "/assets/novnc",
            ServeDir::new(web.join("node_modules/@novnc/novnc")),
        )
        .nest_service(
            "/assets/xterm",
            ServeDir::new(web.join("node_modules/@xterm/xterm")),
        )
        .route("/api/jobs/updateAcl", post(jobs::jobs_not_supported))
        .route("/ucloud/{provider}/jobs", post(provider::create))
        .route(
            "/ucloud/{provider}/jobs/terminate",
            post(provider::terminate),
        )
        .route("/ucloud/{provider}/jobs/suspend", post(provider::suspend))
        .route(
            "/ucloud/{provider}/jobs/unsuspend",
            post(provider::unsuspend),
        )
        .route("/ucloud/{provider}/jobs/extend", post(provider::extend))
        .route(
            "/ucloud/{provider}/jobs/interactiveSession",
            post(provider::interactive_session),
        )
        .route(
            "/ucloud/{provider}/jobs/retrieveProducts",
            get(provider::retrieve_products),
        )
        .route(
            "/ucloud/{provider}/jobs/verify",
            post(provider::nothing_to_do),
        )
        .route(
            "/ucloud/{provider}/jobs/init",
            post(provider::nothing_to_do),
        )
        .route(
            "/ucloud/{provider}/integration/init",
            post(provider::nothing_to_do),
        )
        .route(
            "/ucloud/{provider}/jobs/requestDynamicParameters",
            post(provider::dynamic_parameters),
        )
        .route(
            "/ucloud/{provider}/integration/retrieveManifest",
            get(provider::manifest),
        )
        .route(
            "/api/networkips",
            post(networkips::create).delete(networkips::delete),
        )
        .route("/api/networkips/retrieve", get(networkips::retrieve))
        .route("/api/networkips/browse", get(networkips::browse))
        .route(
            "/api/networkips/firewall",
            post(networkips::update_firewall),
        )
        .route(
            "/api/networkips/retrieveProducts",
            get(networkips::retrieve_products),
        )
        .route(
            "/api/jobs/retrieveProducts",
            get(products::jobs_retrieve_products),
        )
        .route(
            "/api/jobs/retrieveUtilization",
            get(products::jobs_retrieve_utilization),
        )
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|method: axum::http::Method| async move {
            ApiError::MethodNotAllowed(format!("{method} is not allowed on this endpoint"))
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
