//! A vmhost on 127.0.0.1:0 over the in-memory hypervisor, with an HTTP client for it.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use vmhost::backend::fake::FakeBackend;
use vmhost::backend::{Accel, VmBackend};
use vmhost::config::{BackendKind, Config, UserConfig};
use vmhost::network::nft::{FakeFirewall, Firewall, NftFirewall};

pub const TOKEN: &str = "token-of-alice";
pub const OTHER_TOKEN: &str = "token-of-bob";

pub struct TestDaemon {
    pub base: String,
    pub fake: Arc<FakeBackend>,
    /// The firewall of a daemon over the fake hypervisor (unused over libvirt, which gets nft).
    pub firewall: Arc<FakeFirewall>,
    pub config: Config,
    pub client: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
    manager: vmhost::jobs::JobManager,
    reporter: Option<tokio::task::AbortHandle>,
}

pub fn config(dir: &std::path::Path) -> Config {
    // The fake hypervisor never reads images, but the image cache checks they exist.
    for image in [
        "debian12-cloud/disk.qcow2",
        "debian12-cloud/vmlinuz",
        "debian12-cloud/initrd.img",
        "busybox-tiny/vmlinuz",
        "busybox-tiny/initrd.img",
    ] {
        let path = dir.join("images").join(image);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }
    Config {
        data_dir: dir.to_owned(),
        image_dir: dir.join("images"),
        backend: BackendKind::Fake,
        domain_prefix: "vmhost-test".into(),
        sync_interval_secs: 1,
        suspend_grace_secs: 2,
        suspend_retry_secs: 1,
        // Tests about networking (tests/public_ips.rs) turn it on; the others keep their
        // job stories free of address updates.
        private_network: vmhost::network::config::PrivateNetworkConfig {
            enabled: false,
            ..vmhost::network::config::PrivateNetworkConfig::default()
        },
        users: vec![
            UserConfig {
                name: "alice".into(),
                token: TOKEN.into(),
            },
            UserConfig {
                name: "bob".into(),
                token: OTHER_TOKEN.into(),
            },
        ],
        ..Config::default()
    }
}

impl TestDaemon {
    pub async fn start(config: Config, fake: Arc<FakeBackend>) -> TestDaemon {
        let mut d = Self::start_with(config, fake.clone(), Accel::Tcg).await;
        d.fake = fake;
        d
    }

    /// A daemon over any hypervisor (`fake` is then a fresh, unused fake).
    pub async fn start_with(
        mut config: Config,
        backend: Arc<dyn VmBackend>,
        accel: Accel,
    ) -> TestDaemon {
        // Logs show up in a failing test's output (RUST_LOG filters them).
        vmhost::telemetry::init();
        let fake = Arc::new(FakeBackend::default());
        // Bound first, so console links point at this daemon.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        config.public_url = base.clone();
        let firewall = Arc::new(FakeFirewall::default());
        let installed: Arc<dyn Firewall> = match config.backend {
            BackendKind::Fake => firewall.clone(),
            BackendKind::Libvirt => Arc::new(NftFirewall::default()),
        };
        let daemon = vmhost::server::build_with(config.clone(), backend, installed, accel)
            .await
            .unwrap();
        let manager = daemon.state.manager.clone();
        let reporter = daemon.reporter.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, daemon.router).await.unwrap();
        });
        TestDaemon {
            base,
            fake,
            firewall,
            config,
            client: reqwest::Client::new(),
            server,
            manager,
            reporter,
        }
    }

    /// Stops serving and every job runner, as a killed process would: nothing is cleaned up.
    pub fn kill(self) {
        self.server.abort();
        self.manager.halt();
        if let Some(reporter) = &self.reporter {
            reporter.abort();
        }
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .client
            .request(method.parse().unwrap(), url)
            .bearer_auth(token);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, TOKEN, Some(body)).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, TOKEN, None).await
    }

    pub async fn create(&self, spec: Value) -> String {
        let (status, body) = self.post("/api/jobs", json!({ "items": [spec] })).await;
        assert_eq!(status, 200, "{body}");
        body["responses"][0]["id"].as_str().unwrap().to_owned()
    }

    pub async fn retrieve(&self, id: &str) -> Value {
        let (status, body) = self
            .get(&format!("/api/jobs/retrieve?id={id}&includeUpdates=true"))
            .await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls until the job is in `state`; panics after `secs`.
    pub async fn wait_state(&self, id: &str, state: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let job = self.retrieve(id).await;
            if job["status"]["state"] == state {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {id} never reached {state}: {job:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub fn spec(app: &str, version: &str) -> Value {
    json!({
        "application": { "name": app, "version": version },
        "product": { "id": "vm-small", "category": "vm", "provider": "vmhost" },
        "name": null,
        "replicas": 1,
        "allowDuplicateJob": true,
        "parameters": null,
        "resources": null,
        "timeAllocation": null,
        "openedFile": null,
        "restartOnExit": null
    })
}

pub fn vm_spec() -> Value {
    spec("debian-cloud", "12")
}

pub const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@vmhost";
