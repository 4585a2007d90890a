//! Consoles of a real TCG VM through vmhost: the RFB handshake over vmhost's WebSocket, a
//! shell command over the serial console, and noVNC in headless Chromium.

mod common;
#[path = "common/real.rs"]
mod real;
#[path = "common/ws.rs"]
mod ws;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{TestDaemon, TOKEN};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::Accel;

async fn session(d: &TestDaemon, id: &str, kind: &str) -> Value {
    let body = json!({ "items": [{ "id": id, "rank": 0, "sessionType": kind }] });
    let (status, body) = d
        .call("POST", "/api/jobs/interactiveSession", TOKEN, Some(body))
        .await;
    assert_eq!(status, 200, "{body}");
    body["responses"][0]["session"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnc_shell_and_browser_reach_a_real_vm() {
    if !real::available("vnc_shell_and_browser", &["busybox-tiny/initrd.img"]) {
        return;
    }
    let prefix = real::prefix("console");
    real::remove_leftovers(&prefix);
    let dir = real::data_dir();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let config = real::libvirt_config(common::config(dir.path()), &prefix);
    let d = TestDaemon::start_with(config, backend, Accel::Tcg).await;
    let id = d.create(common::spec("busybox-tiny", "1")).await;
    d.wait_state(&id, "RUNNING", 60).await;
    let console_log = dir
        .path()
        .join("vms")
        .join(format!("{prefix}-{id}-0"))
        .join("console.log");
    real::wait_for_tiny_boot(&console_log).await;

    // VNC: QEMU listens on no port; vmhost's WebSocket is the way in.
    let url = session(&d, &id, "VNC").await["url"]
        .as_str()
        .unwrap()
        .replace("http://", "ws://");
    let mut vnc = ws::connect(&url, Some(&d.base), None).await.unwrap();
    let (w, h) = ws::rfb_handshake(&mut vnc).await;
    eprintln!("VNC framebuffer {w}x{h}");
    drop(vnc);

    // Shell: a command typed into the serial console runs, and its output comes back.
    let ident = session(&d, &id, "SHELL").await["sessionIdentifier"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!(
        "{}/ucloud/vmhost/websocket?session={ident}",
        d.base.replace("http", "ws")
    );
    let mut shell = ws::connect(&url, None, None).await.unwrap();
    let init = json!({ "type": "initialize", "sessionIdentifier": ident, "cols": 80, "rows": 24 });
    shell
        .send(Message::Text(init.to_string().into()))
        .await
        .unwrap();
    let mut output = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut next_try = Instant::now();
    while !output.contains("vmhost-shell-42-ok") {
        assert!(Instant::now() < deadline, "no command output:\n{output}");
        if Instant::now() >= next_try {
            let input = json!({ "type": "input", "data": "echo vmhost-shell-$((6*7))-ok\r" });
            shell
                .send(Message::Text(input.to_string().into()))
                .await
                .unwrap();
            next_try = Instant::now() + Duration::from_secs(5);
        }
        if let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_secs(1), shell.next()).await
        {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["payload"]["type"] == "data" {
                output.push_str(frame["payload"]["data"].as_str().unwrap());
            }
        }
    }
    drop(shell);

    // A real browser: the console page, noVNC connecting, the VM's screen on the canvas.
    let url = session(&d, &id, "VNC").await["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = url.split("token=").nth(1).unwrap();
    let page = format!("{}/console?token={token}", d.base);
    let artifacts = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("console.png");
    let out = tokio::process::Command::new("node")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/web/browser-test/console-check.mjs"
        ))
        .arg(&page)
        .arg(&screenshot)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser check failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["connected"], true);
    assert!(
        result["distinctColours"].as_u64().unwrap() > 1,
        "blank screen: {result}"
    );
    assert!(screenshot.exists());
    eprintln!("browser: {result}");

    d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    d.wait_state(&id, "SUCCESS", 60).await;
    assert!(real::domains_with_prefix(&prefix).is_empty());
}
