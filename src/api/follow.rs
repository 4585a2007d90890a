//! `jobs.follow` over a WebSocket at `/api/jobs`, in UCloud's envelope.
//!
//! The client sends `{"call":"jobs.follow","streamId":..,"payload":{"id":..},"bearer":..}`.
//! vmhost answers with `{"type":"message","streamId":..,"payload":JobsFollowResponse}` frames:
//! first the whole story so far (updates, status, the recent console output), then each new
//! update and console chunk. A final state ends the stream with a `{"type":"response"}` frame;
//! so does an error, with the UCloud error body and status.

use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::error::ApiError;
use super::jobs::to_wire;
use super::types::{FollowResponse, JobIncludeFlags, JobsLog, WireJobUpdate};
use super::AppState;
use crate::jobs::console::ConsoleTail;

/// Console output sent with the first frame, per VM.
const CONSOLE_BACKLOG: u64 = 64 * 1024;
const CONSOLE_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    call: String,
    stream_id: String,
    payload: Value,
    bearer: Option<String>,
}

pub(super) async fn jobs_follow(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    Ok(ws?.on_upgrade(move |socket| session(state, socket)))
}

async fn session(state: AppState, mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let Message::Text(text) = msg else {
            if matches!(msg, Message::Close(_)) {
                return;
            }
            continue;
        };
        let envelope: Envelope = match serde_json::from_str(&text) {
            Ok(e) => e,
            Err(e) => {
                let err = ApiError::BadRequest(format!("malformed envelope: {e}"));
                let _ = send(&mut socket, &response("", &err)).await;
                continue;
            }
        };
        let stream_id = envelope.stream_id.clone();
        let outcome = match envelope.call.as_str() {
            "jobs.follow" => follow(&state, &mut socket, envelope).await,
            other => Err(ApiError::NotFound(format!("unknown call {other:?}"))),
        };
        let end = match outcome {
            Ok(Ended::Finished) => {
                json!({ "type": "response", "streamId": stream_id, "status": 200, "payload": {} })
            }
            Ok(Ended::ClientGone) => return,
            Err(e) => response(&stream_id, &e),
        };
        if send(&mut socket, &end).await.is_err() {
            return;
        }
    }
}

enum Ended {
    Finished,
    ClientGone,
}

fn response(stream_id: &str, err: &ApiError) -> Value {
    let (status, body) = err.body();
    json!({ "type": "response", "streamId": stream_id, "status": status.as_u16(), "payload": body })
}

async fn send(socket: &mut WebSocket, frame: &Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(frame.to_string().into())).await
}

async fn follow(
    state: &AppState,
    socket: &mut WebSocket,
    envelope: Envelope,
) -> Result<Ended, ApiError> {
    let owner = envelope
        .bearer
        .as_deref()
        .and_then(|token| state.user_for_token(token))
        .ok_or(ApiError::Unauthenticated)?;
    let id = envelope
        .payload
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::BadRequest("payload must be {\"id\": <job id>}".into()))?
        .to_owned();
    // Subscribe before reading so no update falls between the read and the subscription.
    let mut changes = state.manager.subscribe();
    let job = state.manager.retrieve(&owner, &id).await?;
    let flags = JobIncludeFlags::default();
    let mut tail = ConsoleTail::new(CONSOLE_BACKLOG);
    tail.track(&state.manager.console_logs(&id).await?);
    let mut sent_updates = job.updates.len();
    let first = FollowResponse {
        updates: job.updates.iter().map(WireJobUpdate::from).collect(),
        log: logs(tail.read_new().await),
        new_status: Some(to_wire(state, &job, &flags).await.status),
    };
    let stream_id = envelope.stream_id;
    let message = |payload: &FollowResponse| json!({ "type": "message", "streamId": stream_id, "payload": payload });
    if send(socket, &message(&first)).await.is_err() {
        return Ok(Ended::ClientGone);
    }
    if job.state.is_final() {
        return Ok(Ended::Finished);
    }
    let mut poll = tokio::time::interval(CONSOLE_POLL);
    loop {
        tokio::select! {
            change = changes.recv() => {
                let relevant = match change {
                    Ok(change) => change.job_id == id,
                    // Missed some: re-read the store, which has them all.
                    Err(RecvError::Lagged(_)) => true,
                    Err(RecvError::Closed) => return Ok(Ended::Finished),
                };
                if !relevant {
                    continue;
                }
                let job = state.manager.retrieve(&owner, &id).await?;
                tail.track(&state.manager.console_logs(&id).await?);
                let frame = FollowResponse {
                    updates: job.updates.iter().skip(sent_updates).map(WireJobUpdate::from).collect(),
                    log: logs(tail.read_new().await),
                    new_status: Some(to_wire(state, &job, &flags).await.status),
                };
                sent_updates = job.updates.len();
                if send(socket, &message(&frame)).await.is_err() {
                    return Ok(Ended::ClientGone);
                }
                if job.state.is_final() {
                    return Ok(Ended::Finished);
                }
            }
            _ = poll.tick() => {
                let log = logs(tail.read_new().await);
                if !log.is_empty() {
                    let frame = FollowResponse { updates: Vec::new(), log, new_status: None };
                    if send(socket, &message(&frame)).await.is_err() {
                        return Ok(Ended::ClientGone);
                    }
                }
            }
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(Ended::ClientGone),
                Some(Ok(_)) => {}
            },
        }
    }
}

fn logs(chunks: Vec<(u32, String)>) -> Vec<JobsLog> {
    chunks
        .into_iter()
        .map(|(rank, stdout)| JobsLog {
            rank,
            stdout: Some(stdout),
            stderr: None,
        })
        .collect()
}
