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
use vmhost::config::Config;

use common::{TestDaemon, SSH_KEY, TOKEN};

fn real_config(dir: &std::path::Path, prefix: &str) -> Config {
    real::libvirt_config(common::config(dir), prefix)
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

/// cloud-config for the suspend test: a first-boot marker with random content, and a unit that
/// prints it (with the hostname and the SSH host key) on every boot. On the second boot the
/// guest powers itself off, to exercise a shutdown chosen from inside.
fn marker_user_data() -> String {
    let script = r#"#!/bin/sh
n=$(( $(cat /var/lib/vmhost-boots 2>/dev/null || echo 0) + 1 ))
echo $n > /var/lib/vmhost-boots
key=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2)
echo "VMHOST-BOOT n=$n marker=$(cat /var/lib/vmhost-marker) host=$(hostname) hostkey=$key END" > /dev/console
if [ "$n" = 2 ]; then sleep 3; systemctl poweroff --no-block; fi
"#;
    let unit = "[Unit]\nDescription=vmhost e2e boot marker\nAfter=ssh.service\n\n[Service]\nType=oneshot\nExecStart=/usr/local/bin/vmhost-boot-marker\n\n[Install]\nWantedBy=multi-user.target\n";
    let config = json!({
        "write_files": [
            { "path": "/usr/local/bin/vmhost-boot-marker", "permissions": "0755", "content": script },
            { "path": "/etc/systemd/system/vmhost-boot-marker.service", "content": unit },
        ],
        "runcmd": [
            ["sh", "-c", "od -An -N8 -tx1 /dev/urandom | tr -d ' \\n' > /var/lib/vmhost-marker"],
            ["systemctl", "enable", "--now", "vmhost-boot-marker.service"],
        ],
    });
    config.to_string()
}

/// The `VMHOST-BOOT ... END` lines printed so far, in order.
fn boot_lines(console: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|l| l.find("VMHOST-BOOT").map(|i| &l[i..]))
        .filter(|l| l.contains("END"))
        .map(|l| l.trim_end_matches('\r').to_owned())
        .collect()
}

async fn wait_for_boot_line(console_log: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(420);
    loop {
        let console = std::fs::read_to_string(console_log).unwrap_or_default();
        let lines = boot_lines(&console);
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "boot line {n} never appeared:\n{console}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn domstate(domain: &str) -> String {
    let out = Command::new("virsh")
        .args(["-c", "qemu:///system", "domstate", domain])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_keeps_the_disk_and_unsuspend_boots_it_again() {
    if !real::available("suspend_keeps_the_disk", &["debian12-cloud/disk.qcow2"]) {
        return;
    }
    let prefix = real::prefix("suspend");
    real::remove_leftovers(&prefix);
    let dir = real::data_dir();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let mut config = real_config(dir.path(), &prefix);
    config.suspend_grace_secs = 120;
    config.suspend_retry_secs = 10;
    let d = TestDaemon::start_with(config, backend, Accel::Tcg).await;

    let mut spec = common::vm_spec();
    spec["name"] = json!("e2e-suspend");
    spec["parameters"] = json!({
        "sshPublicKeys": { "type": "text", "value": SSH_KEY },
        "userData": { "type": "text", "value": marker_user_data() },
    });
    let id = d.create(spec).await;
    d.wait_state(&id, "RUNNING", 60).await;
    let domain = format!("{prefix}-{id}-0");
    let vm_dir = dir.path().join("vms").join(&domain);
    let console_log = vm_dir.join("console.log");
    let first = wait_for_boot_line(&console_log, 1).await;
    assert!(first[0].starts_with("VMHOST-BOOT n=1 marker="), "{first:?}");
    assert!(first[0].contains("host=e2e-suspend "), "{first:?}");

    let t0 = Instant::now();
    let (status, _) = d
        .post("/api/jobs/suspend", json!({ "items": [{ "id": id }] }))
        .await;
    assert_eq!(status, 200);
    let job = d.wait_state(&id, "SUSPENDED", 150).await;
    eprintln!("suspended after {:?}", t0.elapsed());
    let status_text = job["updates"].as_array().unwrap().last().unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        status_text.contains("shut down gracefully"),
        "{status_text}"
    );
    assert_eq!(domstate(&domain), "shut off");
    assert!(
        vm_dir.join("disk.qcow2").exists() && vm_dir.join("seed.img").exists(),
        "disk and seed kept"
    );

    let t0 = Instant::now();
    let (status, _) = d
        .post("/api/jobs/unsuspend", json!({ "items": [{ "id": id }] }))
        .await;
    assert_eq!(status, 200);
    d.wait_state(&id, "RUNNING", 60).await;
    eprintln!("running again after {:?}", t0.elapsed());
    let lines = wait_for_boot_line(&console_log, 2).await;
    // Same marker (first-boot modules did not run again), same hostname, same host key.
    assert_eq!(lines[1].replace("n=2", "n=1"), lines[0], "{lines:?}");

    // The marker unit powers the guest off on its second boot: a shutdown chosen from inside.
    let job = d.wait_state(&id, "SUSPENDED", 180).await;
    let status_text = job["updates"].as_array().unwrap().last().unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        status_text,
        "The virtual machine was powered off from inside"
    );
    assert!(vm_dir.join("disk.qcow2").exists());

    d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    d.wait_state(&id, "SUCCESS", 60).await;
    assert!(real::domains_with_prefix(&prefix).is_empty());
    assert!(real::files_under(&dir.path().join("vms")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_allocation_ends_expired_with_nothing_left() {
    if !real::available(
        "a_short_allocation_ends_expired",
        &["busybox-tiny/initrd.img"],
    ) {
        return;
    }
    let prefix = real::prefix("expiry");
    real::remove_leftovers(&prefix);
    let dir = real::data_dir();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let d = TestDaemon::start_with(real_config(dir.path(), &prefix), backend, Accel::Tcg).await;
    let mut spec = common::spec("busybox-tiny", "1");
    spec["timeAllocation"] = json!({ "hours": 0, "minutes": 0, "seconds": 5 });
    let id = d.create(spec).await;
    d.wait_state(&id, "RUNNING", 60).await;
    assert_eq!(real::domains_with_prefix(&prefix).len(), 1);
    let job = d.wait_state(&id, "EXPIRED", 60).await;
    assert_eq!(job["status"]["expiresAt"], Value::Null);
    assert!(
        real::domains_with_prefix(&prefix).is_empty(),
        "domain left in libvirt"
    );
    assert!(
        real::files_under(&dir.path().join("vms")).is_empty(),
        "files left behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_off_by_the_guest_is_reported_as_from_inside() {
    if !real::available("a_power_off_by_the_guest", &["busybox-tiny/initrd.img"]) {
        return;
    }
    let prefix = real::prefix("poweroff");
    real::remove_leftovers(&prefix);
    let dir = real::data_dir();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let d = TestDaemon::start_with(real_config(dir.path(), &prefix), backend, Accel::Tcg).await;
    let id = d.create(common::spec("busybox-tiny", "1")).await;
    d.wait_state(&id, "RUNNING", 60).await;
    let domain = format!("{prefix}-{id}-0");
    let console_log = dir.path().join("vms").join(&domain).join("console.log");
    real::wait_for_tiny_boot(&console_log).await;
    // The ACPI button pressed behind vmhost's back: the guest's acpid powers it off itself.
    // A press just as acpid starts can be lost, so press again until the job is suspended.
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.retrieve(&id).await["status"]["state"] != "SUSPENDED" {
        assert!(Instant::now() < deadline, "the guest never powered off");
        let _ = Command::new("virsh")
            .args([
                "-c",
                "qemu:///system",
                "shutdown",
                "--mode",
                "acpi",
                &domain,
            ])
            .output();
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let job = d.wait_state(&id, "SUSPENDED", 60).await;
    let status = job["updates"].as_array().unwrap().last().unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(status, "The virtual machine was powered off from inside");
    d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    d.wait_state(&id, "SUCCESS", 60).await;
    assert!(real::domains_with_prefix(&prefix).is_empty());
}
