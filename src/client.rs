//! A small command-line client of vmhost's own `jobs.follow` stream: `vmhost console`.
//!
//! It prints a job's serial console as it arrives and its updates as they happen, and exits
//! when the job reaches a final state (or on Ctrl-C).

use std::io::Write;

use anyhow::{bail, Context};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Follows job `id` at `base_url` (`http://host:port`) and writes to stdout/stderr.
pub async fn follow_console(base_url: &str, token: &str, id: &str) -> anyhow::Result<()> {
    let ws_url = format!(
        "{}/api/jobs",
        base_url.trim_end_matches('/').replacen("http", "ws", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .with_context(|| format!("connecting to {ws_url}"))?;
    let call = json!({ "call": "jobs.follow", "streamId": "console", "payload": { "id": id }, "bearer": token });
    ws.send(Message::Text(call.to_string().into())).await?;
    let mut stdout = std::io::stdout();
    while let Some(frame) = ws.next().await {
        let Message::Text(text) = frame? else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text)?;
        if frame["type"] == "response" {
            let status = frame["status"].as_u64().unwrap_or(0);
            if status != 200 {
                bail!(
                    "vmhost refused: {}",
                    frame["payload"]["why"].as_str().unwrap_or("unknown error")
                );
            }
            return Ok(());
        }
        let payload = &frame["payload"];
        for update in payload["updates"].as_array().into_iter().flatten() {
            eprintln!(
                "[vmhost] {} {}",
                update["state"].as_str().unwrap_or(""),
                update["status"].as_str().unwrap_or("")
            );
        }
        for log in payload["log"].as_array().into_iter().flatten() {
            stdout.write_all(log["stdout"].as_str().unwrap_or_default().as_bytes())?;
        }
        stdout.flush()?;
    }
    Ok(())
}
