//! Component tests of interactive sessions (VNC and shell) over the fake hypervisor: the
//! WebSocket proxy end to end, and every refusal before the upgrade.

mod common;
#[path = "common/ws.rs"]
mod ws;

use std::sync::Arc;
use std::time::Duration;

use common::{vm_spec, TestDaemon, OTHER_TOKEN, TOKEN};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use vmhost::backend::fake::FakeBackend;

async fn daemon_with(
    tweak: impl FnOnce(&mut vmhost::config::Config),
) -> (TestDaemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    tweak(&mut config);
    (
        TestDaemon::start(config, Arc::new(FakeBackend::default())).await,
        dir,
    )
}

async fn running_job(d: &TestDaemon) -> String {
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    id
}

async fn open_session(d: &TestDaemon, token: &str, id: &str, kind: &str) -> (u16, Value) {
    let body = json!({ "items": [{ "id": id, "rank": 0, "sessionType": kind }] });
    d.call("POST", "/api/jobs/interactiveSession", token, Some(body))
        .await
}

async fn vnc_url(d: &TestDaemon, id: &str) -> String {
    let (status, body) = open_session(d, TOKEN, id, "VNC").await;
    assert_eq!(status, 200, "{body}");
    body["responses"][0]["session"]["url"]
        .as_str()
        .unwrap()
        .replace("http://", "ws://")
}

#[tokio::test]
async fn a_vnc_session_speaks_rfb_through_vmhost() {
    let (d, _dir) = daemon_with(|_| {}).await;
    let id = running_job(&d).await;
    let (status, body) = open_session(&d, TOKEN, &id, "VNC").await;
    assert_eq!(status, 200, "{body}");
    let open = &body["responses"][0];
    assert_eq!(open["providerId"], "vmhost");
    assert_eq!(open["providerDomain"], d.base.as_str());
    assert_eq!(open["session"]["type"], "vnc");
    assert_eq!(open["session"]["jobId"], id.as_str());
    assert_eq!(open["session"]["rank"], 0);
    assert_eq!(open["session"]["password"], "");
    let url = open["session"]["url"]
        .as_str()
        .unwrap()
        .replace("http://", "ws://");
    assert!(url.contains("/ucloud/vmhost/vnc?token="), "{url}");
    let token = url.split("token=").nth(1).unwrap();
    assert!(token.len() >= 22, "at least 128 bits: {token}");

    let mut ws = ws::connect(&url, Some(&d.base), Some("binary"))
        .await
        .unwrap();
    ws::rfb_handshake(&mut ws).await;
    assert_eq!(d.fake.vnc_sessions(&format!("vmhost-test-{id}-0")), 1);

    // Suspending the VM closes the console with a reason.
    d.post("/api/jobs/suspend", json!({ "items": [{ "id": id }] }))
        .await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    // Whichever comes first names the cause: the display going away as QEMU stops (1000), or
    // vmhost's record of the suspend (4000).
    let close = close.expect("a close reason");
    let code = u16::from(close.code);
    assert!(code == 1000 || code == 4000, "{code}: {}", close.reason);
    assert!(
        close.reason.contains("console closed") || close.reason.contains("suspended"),
        "{}",
        close.reason
    );
}

#[tokio::test]
async fn console_links_are_refused_before_the_upgrade() {
    let (d, _dir) = daemon_with(|c| c.console_token_ttl_secs = 1).await;
    let id = running_job(&d).await;
    let domain = format!("vmhost-test-{id}-0");

    // Used once: a second use is refused.
    let url = vnc_url(&d, &id).await;
    drop(ws::connect(&url, None, None).await.unwrap());
    assert_eq!(
        ws::connect(&url, None, None).await.err(),
        Some(403),
        "reused token"
    );
    // A guessed token.
    let forged = format!(
        "{}/ucloud/vmhost/vnc?token=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        d.base.replace("http", "ws")
    );
    assert_eq!(ws::connect(&forged, None, None).await.err(), Some(403));
    // Expired.
    let url = vnc_url(&d, &id).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        ws::connect(&url, None, None).await.err(),
        Some(410),
        "expired token"
    );
    // A page of another site.
    let url = vnc_url(&d, &id).await;
    assert_eq!(
        ws::connect(&url, Some("https://evil.example"), None)
            .await
            .err(),
        Some(403),
        "wrong Origin"
    );
    // Another user's job, and a suspended job: no link at all.
    let (status, _) = open_session(&d, OTHER_TOKEN, &id, "VNC").await;
    assert_eq!(status, 404);
    let (status, body) = open_session(&d, TOKEN, &id, "WEB").await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = open_session(&d, TOKEN, &id, "VNC").await.clone();
    assert_eq!(status, 200);
    let url = vnc_url(&d, &id).await;
    d.post("/api/jobs/suspend", json!({ "items": [{ "id": id }] }))
        .await;
    d.wait_state(&id, "SUSPENDED", 10).await;
    assert_eq!(
        ws::connect(&url, None, None).await.err(),
        Some(409),
        "link of a job suspended since"
    );
    let (status, _) = open_session(&d, TOKEN, &id, "VNC").await;
    assert_eq!(status, 409, "no sessions on a suspended job");
    assert_eq!(d.fake.vnc_sessions(&domain), 0, "nothing reached the VM");
    let (_, status) = d.get("/api/console/status?token=nope").await;
    assert!(
        status["why"].as_str().unwrap().contains("unknown"),
        "{status}"
    );
}

#[tokio::test]
async fn a_shell_session_follows_the_ucloud_protocol() {
    let (d, _dir) = daemon_with(|_| {}).await;
    let id = running_job(&d).await;
    let (status, body) = open_session(&d, TOKEN, &id, "SHELL").await;
    assert_eq!(status, 200, "{body}");
    let session = &body["responses"][0]["session"];
    assert_eq!(session["type"], "shell");
    let ident = session["sessionIdentifier"].as_str().unwrap().to_owned();
    let url = format!(
        "{}/ucloud/vmhost/websocket?session={ident}",
        d.base.replace("http", "ws")
    );
    let mut ws = ws::connect(&url, None, None).await.unwrap();
    let init = json!({ "type": "initialize", "sessionIdentifier": ident, "cols": 80, "rows": 24 });
    ws.send(Message::Text(init.to_string().into()))
        .await
        .unwrap();
    ws.send(Message::Text(
        json!({ "type": "input", "data": "echo vmhost-shell-ok\r" })
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut output = String::new();
    while !output.contains("vmhost-shell-ok\r\n") {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(text) = msg else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(frame["type"], "message", "{frame}");
        let kind = frame["payload"]["type"].as_str().unwrap().to_owned();
        if kind == "data" {
            output.push_str(frame["payload"]["data"].as_str().unwrap());
        }
        seen.push(kind);
    }
    assert_eq!(seen[0], "initialize");
    assert!(seen.contains(&"ack".to_owned()), "{seen:?}");
    let (status, _) = open_session(&d, OTHER_TOKEN, &id, "SHELL").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn the_console_pages_are_served_under_a_strict_policy() {
    let (d, _dir) = daemon_with(|_| {}).await;
    let resp = d
        .client
        .get(format!("{}/console?token=x", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let html = resp.text().await.unwrap();
    assert!(html.contains(r#"<meta name="vmhost-provider" content="vmhost">"#));
    assert!(html.contains("./assets/console.js"));
    let js = d
        .client
        .get(format!("{}/assets/console.js", d.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        js.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    let terminal = d
        .client
        .get(format!("{}/terminal?session=x", d.base))
        .send()
        .await
        .unwrap();
    assert!(terminal
        .text()
        .await
        .unwrap()
        .contains("./assets/terminal.js"));
    // noVNC and xterm.js come from web/node_modules (installed by scripts/install-deps.sh).
    for asset in ["/assets/novnc/core/rfb.js", "/assets/xterm/lib/xterm.mjs"] {
        let r = d
            .client
            .get(format!("{}{asset}", d.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{asset}: run npm ci in web/");
    }
}

/// The flood of the bug report: alice asks for 5 × 20,000 console links. Bob's link, issued
/// before, must still open his console; alice is held to her own caps, all or nothing.
#[tokio::test]
async fn one_user_flooding_console_links_cannot_break_another_users_link() {
    let (d, _dir) = daemon_with(|_| {}).await;
    let alices = running_job(&d).await;
    let (status, body) = d
        .call(
            "POST",
            "/api/jobs",
            OTHER_TOKEN,
            Some(json!({ "items": [vm_spec()] })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let bobs = body["responses"][0]["id"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let bob_url = loop {
        let (status, body) = open_session(&d, OTHER_TOKEN, &bobs, "VNC").await;
        if status == 200 {
            break body["responses"][0]["session"]["url"]
                .as_str()
                .unwrap()
                .replace("http://", "ws://");
        }
        assert!(tokio::time::Instant::now() < deadline, "{status}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let items = |n: usize| {
        let item = json!({ "id": alices, "rank": 0, "sessionType": "VNC" });
        json!({ "items": vec![item; n] })
    };
    let mut flood = Vec::new();
    for _ in 0..5 {
        flood.push(d.post("/api/jobs/interactiveSession", items(20_000)).await);
    }
    // Checked before alice's statuses, so the bug shows as what bob sees.
    assert!(
        ws::connect(&bob_url, None, None).await.is_ok(),
        "bob's link was refused after alice's flood"
    );
    assert_eq!(d.fake.vnc_sessions(&format!("vmhost-test-{bobs}-0")), 1);
    for (status, body) in flood {
        assert_eq!(status, 400, "{body}");
        assert!(
            body["why"].as_str().unwrap().contains("at most 64"),
            "{body}"
        );
    }

    // Alice at her own cap of 256 open links: refused, and a refused request issues nothing.
    let mut alice_urls = Vec::new();
    for _ in 0..4 {
        let (status, body) = d.post("/api/jobs/interactiveSession", items(64)).await;
        assert_eq!(status, 200, "{body}");
        alice_urls.push(
            body["responses"][0]["session"]["url"]
                .as_str()
                .unwrap()
                .replace("http://", "ws://"),
        );
    }
    let (status, body) = d.post("/api/jobs/interactiveSession", items(1)).await;
    assert_eq!(status, 409, "{body}");
    let why = body["why"].as_str().unwrap();
    assert!(
        why.contains("too many open console links") && why.contains("expire"),
        "{why}"
    );
    // One link used leaves room for exactly one: a 64-item request is refused whole.
    assert!(ws::connect(&alice_urls[0], None, None).await.is_ok());
    let (status, body) = d.post("/api/jobs/interactiveSession", items(64)).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = open_session(&d, TOKEN, &alices, "VNC").await;
    assert_eq!(status, 200, "the refused request issued nothing: {body}");
    let (status, body) = open_session(&d, TOKEN, &alices, "VNC").await;
    assert_eq!(status, 409, "{body}");
    // Bob is not affected by any of it.
    let (status, body) = open_session(&d, OTHER_TOKEN, &bobs, "SHELL").await;
    assert_eq!(status, 200, "{body}");
}
