//! Interactive sessions: `interactiveSession`, the VNC and shell WebSockets, and the pages.
//!
//! `interactiveSession` checks the job (owner, RUNNING, rank) and issues a one-time token,
//! within the bounds of [`crate::console::tokens`]: at most 64 items a request (400), at most
//! 256 open links a user (409: wait for them to expire), and all or nothing.
//! The browser then connects without a bearer token: the token (VNC) or session identifier
//! (shell) is the credential. Every check — Origin, token, job still running, console opens —
//! happens *before* the WebSocket upgrade, so a refusal is a plain HTTP status with the UCloud
//! error body and nothing reaches QEMU. A session closes with a reason when its VM stops.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{AppJson, AppQuery, AuthUser};
use super::types::{BulkRequest, BulkResponse};
use super::AppState;
use crate::console::tokens;
use crate::console::{
    configure_upgrade, origin_allowed, proxy, run_shell, CloseReason, Grant, ProxyConfig,
    SessionKind, ShellConfig, SocketConfig, StopSignal, TokenError, WsAdapter, WsUpgrade,
};
use crate::jobs::{JobState, Owner};

/// `JobsOpenInteractiveSessionRequestItem`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct OpenSessionItem {
    id: String,
    #[serde(default)]
    rank: u32,
    session_type: SessionType,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub(super) enum SessionType {
    Web,
    Vnc,
    Shell,
}

#[derive(Debug, Deserialize)]
pub(super) struct TokenQuery {
    token: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct SessionQuery {
    session: String,
}

pub(super) async fn jobs_open_interactive_session(
    State(state): State<AppState>,
    AuthUser(owner): AuthUser,
    AppJson(request): AppJson<BulkRequest<OpenSessionItem>>,
) -> Result<Json<BulkResponse<Value>>, ApiError> {
    let config = state.manager.config();
    let requests = request
        .items
        .into_iter()
        .map(|item| SessionRequest {
            owner: owner.clone(),
            shown_id: item.id.clone(),
            job_id: item.id,
            rank: item.rank,
            session_type: item.session_type,
        })
        .collect();
    let sessions = open_sessions(&state, requests).await?;
    let base = config.public_url.trim_end_matches('/');
    let responses = sessions
        .into_iter()
        .map(|session| {
            json!({ "providerDomain": base, "providerId": config.provider_id, "session": session })
        })
        .collect();
    Ok(Json(BulkResponse { responses }))
}

/// One console session asked for, by the standalone API or by UCloud/Core.
pub(super) struct SessionRequest {
    pub(super) owner: Owner,
    /// vmhost's id of the job.
    pub(super) job_id: String,
    /// The id the caller knows the job by (Core's own, for Core), echoed in the session.
    pub(super) shown_id: String,
    pub(super) rank: u32,
    pub(super) session_type: SessionType,
}

/// UCloud's `OpenSession` of each request (`{"type":"vnc",...}` or `{"type":"shell",...}`).
/// Every request is checked (owner, RUNNING, rank, not WEB) before any token is issued, and
/// the tokens are issued all or nothing.
pub(super) async fn open_sessions(
    state: &AppState,
    requests: Vec<SessionRequest>,
) -> Result<Vec<Value>, ApiError> {
    let config = state.manager.config();
    // Refused before any per-item work: one request cannot make vmhost look up thousands of
    // jobs, nor ask for more tokens than `issue_all` would grant.
    tokens::check_request_size(requests.len()).map_err(token_error)?;
    for request in &requests {
        if matches!(request.session_type, SessionType::Web) {
            return Err(ApiError::NotSupported(
                "virtual machines have no web interface; use VNC or SHELL".into(),
            ));
        }
        state
            .manager
            .console_domain(&request.owner, &request.job_id, request.rank)
            .await?;
    }
    let base = config.public_url.trim_end_matches('/');
    let provider = &config.provider_id;
    let grants = requests
        .iter()
        .map(|request| Grant {
            job_id: request.job_id.clone(),
            rank: request.rank,
            user: request.owner.0.clone(),
            kind: session_kind(request.session_type),
        })
        .collect();
    let tokens = state.tokens.issue_all(grants).map_err(token_error)?;
    let sessions = requests.into_iter().zip(tokens).map(|(request, token)| {
        let (id, rank) = (request.shown_id, request.rank);
        match session_kind(request.session_type) {
            SessionKind::Vnc => json!({
                "type": "vnc", "jobId": id, "rank": rank,
                "url": format!("{base}/ucloud/{provider}/vnc?token={token}"),
                "password": "",
            }),
            SessionKind::Shell => json!({
                "type": "shell", "jobId": id, "rank": rank, "sessionIdentifier": token,
            }),
        }
    });
    Ok(sessions.collect())
}

fn session_kind(t: SessionType) -> SessionKind {
    match t {
        SessionType::Vnc => SessionKind::Vnc,
        // WEB is refused before any token is issued.
        SessionType::Shell | SessionType::Web => SessionKind::Shell,
    }
}

/// `GET /ucloud/{provider}/vnc?token=`: the noVNC WebSocket.
pub(super) async fn console_vnc(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    AppQuery(query): AppQuery<TokenQuery>,
    headers: HeaderMap,
    ws: WsUpgrade,
) -> Result<Response, ApiError> {
    let (grant, domain) =
        admit(&state, &provider, &headers, &query.token, SessionKind::Vnc).await?;
    let stream = state
        .manager
        .backend()
        .open_vnc(&domain)
        .await
        .map_err(console_unavailable)?;
    let stop = stop_when_not_running(&state, &grant.job_id);
    Ok(
        ws.on_upgrade(SocketConfig::vnc(), move |socket| async move {
            let summary = proxy(socket, stream, stop, ProxyConfig::default()).await;
            tracing::info!(job_id = %grant.job_id, rank = grant.rank, ended = ?summary.ended,
                bytes_to_vm = summary.to_upstream_bytes, bytes_to_browser = summary.to_client_bytes,
                "VNC session closed");
        }),
    )
}

/// `GET /ucloud/{provider}/websocket?session=`: UCloud's interactive shell.
pub(super) async fn console_shell(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    AppQuery(query): AppQuery<SessionQuery>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws?;
    let (grant, domain) = admit(
        &state,
        &provider,
        &headers,
        &query.session,
        SessionKind::Shell,
    )
    .await?;
    let stream = state
        .manager
        .backend()
        .open_serial(&domain)
        .await
        .map_err(console_unavailable)?;
    let stop = stop_when_not_running(&state, &grant.job_id);
    Ok(
        configure_upgrade(ws, SessionKind::Shell).on_upgrade(move |socket| async move {
            let session = query.session;
            let summary = run_shell(
                WsAdapter::new(socket),
                stream,
                &session,
                stop,
                ShellConfig::default(),
            )
            .await;
            tracing::info!(job_id = %grant.job_id, rank = grant.rank, ended = ?summary.ended,
            "shell session closed");
        }),
    )
}

/// The checks that precede every console upgrade. The token is spent here, so a refused
/// attempt cannot be retried with it.
async fn admit(
    state: &AppState,
    provider: &str,
    headers: &HeaderMap,
    token: &str,
    kind: SessionKind,
) -> Result<(Grant, String), ApiError> {
    let config = state.manager.config();
    if provider != config.provider_id {
        return Err(ApiError::NotFound(format!("unknown provider {provider:?}")));
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if !origin_allowed(origin, &config.allowed_origins, &config.public_url) {
        return Err(ApiError::Forbidden(format!(
            "WebSocket connections from origin {} are not allowed",
            origin.unwrap_or("<none>")
        )));
    }
    let grant = state.tokens.redeem(token, kind).map_err(token_error)?;
    let domain = state
        .manager
        .console_domain(&Owner(grant.user.clone()), &grant.job_id, grant.rank)
        .await?;
    Ok((grant, domain))
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        TokenError::Expired => ApiError::Gone(format!("{e}; open the console again")),
        TokenError::Unknown | TokenError::WrongKind { .. } => ApiError::Forbidden(e.to_string()),
        TokenError::TooManyAtOnce { .. } => ApiError::BadRequest(e.to_string()),
        // `ApiError` has no 429; 409 says that the caller's own state (their open links) is in
        // the way, and the `why` says to wait for them to expire.
        TokenError::UserFull { .. } => ApiError::Conflict(e.to_string()),
        // The host's capacity, not the caller's doing.
        TokenError::Full => ApiError::Busy(e.to_string()),
    }
}

fn console_unavailable(e: crate::backend::BackendError) -> ApiError {
    ApiError::Busy(format!(
        "the virtual machine's console cannot be opened: {}",
        crate::telemetry::error_chain(&e)
    ))
}

/// A stop signal fired when the job leaves RUNNING, with a reason the browser can show.
fn stop_when_not_running(state: &AppState, job_id: &str) -> StopSignal {
    let stop = StopSignal::new();
    let mut changes = state.manager.subscribe();
    let (signal, job_id) = (stop.clone(), job_id.to_owned());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                change = changes.recv() => match change {
                    Ok(change) if change.job_id == job_id => {
                        let reason = match change.update.state {
                            Some(JobState::Suspended) => CloseReason::vm_suspended(),
                            Some(JobState::InQueue) => CloseReason::vm_stopped(),
                            Some(s) if s.is_final() => CloseReason::job_ended(),
                            _ => continue,
                        };
                        signal.stop(reason);
                        return;
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                // The session ended on its own: stop watching.
                _ = signal.stopped() => return,
            }
        }
    });
    stop
}

/// `GET /api/console/status?token=`: why a console link would be refused, without spending it.
pub(super) async fn console_status(
    State(state): State<AppState>,
    AppQuery(query): AppQuery<TokenQuery>,
) -> Json<Value> {
    let why = match state.tokens.peek(&query.token, SessionKind::Vnc) {
        Err(e) => token_error(e).to_string(),
        Ok(grant) => {
            let owner = Owner(grant.user.clone());
            match state
                .manager
                .console_domain(&owner, &grant.job_id, grant.rank)
                .await
            {
                Ok(_) => String::new(),
                Err(e) => ApiError::from(e).to_string(),
            }
        }
    };
    Json(json!({ "why": why }))
}

/// `GET /console?token=` and `GET /terminal?session=`: the pages, with the provider filled in.
pub(super) async fn console_page(State(state): State<AppState>) -> Response {
    page(&state, include_str!("../../web/console.html"))
}

pub(super) async fn terminal_page(State(state): State<AppState>) -> Response {
    page(&state, include_str!("../../web/terminal.html"))
}

fn page(state: &AppState, template: &str) -> Response {
    let provider = html_escape(&state.manager.config().provider_id);
    let html = template.replace("__VMHOST_PROVIDER__", &provider);
    // The pages load only their own scripts; nothing may frame them.
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:; \
                 frame-ancestors 'none'",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(html),
    )
        .into_response()
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The pages' own scripts, compiled in.
pub(super) async fn page_script(Path(name): Path<String>) -> Result<Response, ApiError> {
    let script = match name.as_str() {
        "console.js" => include_str!("../../web/console.js"),
        "terminal.js" => include_str!("../../web/terminal.js"),
        _ => return Err(ApiError::NotFound("no such asset".into())),
    };
    Ok((
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        script,
    )
        .into_response())
}
