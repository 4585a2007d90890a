//! Real VMs: vmhost on `qemu:///system` under TCG, booting the images built by
//! `images/build-images.sh`.

mod common;
#[path = "common/real.rs"]
mod real;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::Accel;
use vmhost::config::{BackendKind, Config};

use common::{TestDaemon, SSH_KEY, TOKEN};

fn real_config(dir: &std::path::Path, prefix: &str) -> Config {
    Config {
        backend: BackendKind::Libvirt,
        image_dir: real::IMAGE_DIR.into(),
        domain_prefix: prefix.to_owned(),
        ..common::config(dir)
    }
}

/// cloud-init prints authorized keys as `ci-info: | <type> | <fingerprint> | ...`; accept the
/// colon-separated hex and the OpenSSH base64 forms of the SHA-256 fingerprint.
fn fingerprints(key: &str) -> [String; 2] {
    let blob = base64::engine::general_purpose::STANDARD
        .decode(key.split(' ').nth(1).unwrap())
        .unwrap();
    let digest = Sha256::digest(&blob);
    let hex = digest
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
    [hex, format!("SHA256:{b64}")]
}

/// Follows a job over the WebSocket until `done` says the console output so far is enough.
async fn follow_console_until(
    d: &TestDaemon,
    id: &str,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let url = format!("{}/api/jobs", d.base.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let call = json!({ "call": "jobs.follow", "streamId": "s1", "payload": { "id": id }, "bearer": TOKEN });
    ws.send(Message::Text(call.to_string().into()))
        .await
        .unwrap();
    let mut console = String::new();
    let deadline = Instant::now() + limit;
    while !done(&console) {
        let left = deadline.saturating_duration_since(Instant::now());
        let frame = match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            other => panic!(
                "follow ended before the console showed what was expected ({other:?}):\n{console}"
            ),
        };
        let frame: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(frame["streamId"], "s1");
        assert_eq!(frame["type"], "message", "{frame}");
        for log in frame["payload"]["log"].as_array().unwrap() {
            console.push_str(log["stdout"].as_str().unwrap_or_default());
        }
    }
    let _ = ws.close(None).await;
    console
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_vm_applies_cloud_init_and_terminate_leaves_nothing() {
    if !real::available(
        "debian_vm_applies_cloud_init",
        &["debian12-cloud/disk.qcow2"],
    ) {
        return;
    }
    let prefix = real::prefix("debian");
    real::remove_leftovers(&prefix);
    let dir = real::data_dir();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let d = TestDaemon::start_with(real_config(dir.path(), &prefix), backend, Accel::Tcg).await;

    let mut spec = common::vm_spec();
    spec["name"] = json!("e2e-cloud-vm");
    spec["parameters"] = json!({ "sshPublicKeys": { "type": "text", "value": SSH_KEY } });
    let started = Instant::now();
    let id = d.create(spec).await;
    d.wait_state(&id, "RUNNING", 60).await;
    eprintln!("RUNNING after {:?}", started.elapsed());

    let [hex, b64] = fingerprints(SSH_KEY);
    let console = follow_console_until(&d, &id, Duration::from_secs(420), |c| {
        c.contains("e2e-cloud-vm login:") && (c.contains(&hex) || c.contains(&b64))
    })
    .await;
    eprintln!(
        "cloud-init applied hostname and key after {:?}",
        started.elapsed()
    );
    assert!(console.contains("Cloud-init"), "{console}");

    let domain = format!("{prefix}-{id}-0");
    assert_eq!(real::domains_with_prefix(&prefix), [domain]);
    let (status, _) = d
        .post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    assert_eq!(status, 200);
    let job = d.wait_state(&id, "SUCCESS", 60).await;
    assert_eq!(
        job["updates"].as_array().unwrap().last().unwrap()["status"],
        "Your job has been cancelled!"
    );
    assert!(
        real::domains_with_prefix(&prefix).is_empty(),
        "domain left in libvirt"
    );
    let left = real::files_under(&dir.path().join("vms"));
    assert!(left.is_empty(), "files left behind: {left:?}");
}

/// A `vmhost serve` process with its own config, killed with SIGKILL by the test.
struct Process {
    child: Child,
}

impl Process {
    fn start(config_path: &std::path::Path) -> (Process, String) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmhost"))
            .args(["serve", "--config"])
            .arg(config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[vmhost] {line}");
                if line.contains("vmhost is serving") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("vmhost did not start serving");
        (Process { child }, String::new())
    }

    fn kill_9(mut self) {
        // SIGKILL of the child we spawned, by its handle: no cleanup runs.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_operation_loses_nothing() {
    if !real::available(
        "kill_9_mid_operation_loses_nothing",
        &["busybox-tiny/initrd.img"],
    ) {
        return;
    }
    let prefix = real::prefix("restart");
    real::remove_leftovers(&prefix);
    let dir = real::data_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config_path = dir.path().join("vmhost.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
            listen = "127.0.0.1:{port}"
            data_dir = "{data}"
            accel = "tcg"
            domain_prefix = "{prefix}"
            sync_interval_secs = 1
            [[users]]
            name = "alice"
            token = "{TOKEN}"
            [[products]]
            name = "vm-small"
            category = "vm"
            cpu = 1
            memory_in_gigs = 1
            disk_gib = 1
            "#,
            data = dir.path().display()
        ),
    )
    .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let call = |path: &str, body: Option<Value>| {
        let req = match body {
            Some(b) => client.post(format!("{base}{path}")).json(&b),
            None => client.get(format!("{base}{path}")),
        };
        async move {
            let resp = req.bearer_auth(TOKEN).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    };
    let state_of = |id: String| {
        let call = &call;
        async move {
            call(&format!("/api/jobs/retrieve?id={id}"), None).await.1["status"]["state"].clone()
        }
    };
    let wait = |id: String, want: &'static str| {
        let state_of = &state_of;
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                if state_of(id.clone()).await == want {
                    return;
                }
                assert!(Instant::now() < deadline, "job {id} never reached {want}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // 1. Killed right after accepting a job, before or while its VM is created.
    let (vmhost, _) = Process::start(&config_path);
    let spec = common::spec("busybox-tiny", "1");
    let (status, body) = call("/api/jobs", Some(json!({ "items": [spec] }))).await;
    assert_eq!(status, 200, "{body}");
    let id = body["responses"][0]["id"].as_str().unwrap().to_owned();
    vmhost.kill_9();
    let (vmhost, _) = Process::start(&config_path);
    wait(id.clone(), "RUNNING").await;
    assert_eq!(
        real::domains_with_prefix(&prefix),
        [format!("{prefix}-{id}-0")]
    );

    // 2. Killed while running: the VM keeps running and is re-adopted.
    vmhost.kill_9();
    let (vmhost, _) = Process::start(&config_path);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(state_of(id.clone()).await, "RUNNING");

    // 3. Killed right after a terminate was accepted.
    let (status, _) = call(
        "/api/jobs/terminate",
        Some(json!({ "items": [{ "id": id }] })),
    )
    .await;
    assert_eq!(status, 200);
    vmhost.kill_9();
    let (_vmhost, _) = Process::start(&config_path);
    wait(id.clone(), "SUCCESS").await;
    assert!(
        real::domains_with_prefix(&prefix).is_empty(),
        "domain left in libvirt"
    );
    let left = real::files_under(&dir.path().join("vms"));
    assert!(left.is_empty(), "files left behind: {left:?}");
}
