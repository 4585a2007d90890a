//! vmhost as UCloud/Core's provider, over the fake hypervisor: Core's signed calls, jobs named
//! by Core's ids, and the updates vmhost reports back to a stand-in Core.

mod common;
#[path = "common/fake_core.rs"]
mod fake_core;

use std::sync::Arc;

use common::{vm_spec, TestDaemon, TOKEN};
use fake_core::{core_claims, CoreKeys, FakeCore};
use serde_json::{json, Value};
use vmhost::backend::fake::FakeBackend;
use vmhost::backend::PowerState;
use vmhost::config::UcloudConfig;

struct Provider {
    d: TestDaemon,
    keys: CoreKeys,
    core: FakeCore,
    _dir: tempfile::TempDir,
}

async fn provider() -> Provider {
    let dir = tempfile::tempdir().unwrap();
    let keys = CoreKeys::generate(dir.path());
    let core = FakeCore::default();
    let mut config = common::config(dir.path());
    config.ucloud = Some(UcloudConfig {
        core_url: core.start().await,
        refresh_token: "refresh-token-of-the-provider".into(),
        public_key: keys.public_key.clone(),
    });
    let d = TestDaemon::start(config, Arc::new(FakeBackend::default())).await;
    Provider {
        d,
        keys,
        core,
        _dir: dir,
    }
}

impl Provider {
    /// A call as Core makes it.
    async fn core_call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let token = self.keys.core_token();
        self.d.call(method, path, &token, body).await
    }

    async fn core_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.core_call("POST", path, Some(body)).await
    }

    /// vmhost's own view of Core's job, through the standalone API of its owner.
    async fn local_job(&self, core_id: &str) -> Value {
        let (_, page) = self.d.get("/api/jobs/browse?includeUpdates=true").await;
        let jobs = page["items"].as_array().unwrap().clone();
        assert_eq!(jobs.len(), 1, "one job for Core's {core_id}: {page:#}");
        jobs[0].clone()
    }
}

/// Core's `Job` as Go serialises it: every field, zero values included.
fn core_job(id: &str) -> Value {
    let mut spec = vm_spec();
    spec["name"] = json!("");
    spec["hostname"] = Value::Null;
    spec["labels"] = json!({});
    spec["openedFile"] = json!("");
    spec["restartOnExit"] = json!(false);
    spec["sshEnabled"] = json!(false);
    spec["allowDuplicateJob"] = json!(false);
    json!({
        "id": id, "createdAt": 1_633_329_776_235u64,
        "owner": { "createdBy": "alice", "project": null },
        "permissions": null, "updates": [], "specification": spec,
        "status": { "state": "IN_QUEUE", "resolvedApplication": {}, "resolvedSupport": {} },
        "output": { "outputFolder": null },
    })
}

#[tokio::test]
async fn only_cores_own_signed_calls_are_served() {
    let p = provider().await;
    let path = "/ucloud/vmhost/jobs/retrieveProducts";
    let (status, body) = p.core_call("GET", path, None).await;
    assert_eq!(status, 200, "{body}");
    let support = &body["responses"][0];
    assert_eq!(support["product"]["id"], "vm-small", "{body}");
    assert_eq!(support["virtualMachine"]["enabled"], true, "{body}");
    assert_eq!(support["virtualMachine"]["vnc"], true);
    assert_eq!(
        support["virtualMachine"]["logs"], false,
        "no follow for Core yet"
    );

    let stranger = CoreKeys::generate(p._dir.path());
    let mut provider_token = core_claims(600);
    provider_token["sub"] = json!("#P_vmhost");
    provider_token["role"] = json!("PROVIDER");
    let mut other_issuer = core_claims(600);
    other_issuer["iss"] = json!("someone.else");
    for (why, token) in [
        ("no token", String::new()),
        ("a user's token", TOKEN.to_owned()),
        ("another key", stranger.core_token()),
        ("expired", p.keys.sign(&core_claims(-120))),
        ("the provider's own token", p.keys.sign(&provider_token)),
        ("another issuer", p.keys.sign(&other_issuer)),
    ] {
        let (status, body) = p.d.call("GET", path, &token, None).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body["errorCode"], "UNAUTHENTICATED", "{why}: {body}");
    }
    let (status, _) = p
        .core_call(
            "GET",
            "/ucloud/another-provider/jobs/retrieveProducts",
            None,
        )
        .await;
    assert_eq!(status, 404, "another provider's path");
    for (method, path) in [
        ("POST", "/ucloud/vmhost/jobs/verify"),
        ("POST", "/ucloud/vmhost/integration/init"),
        ("GET", "/ucloud/vmhost/integration/retrieveManifest"),
        ("POST", "/ucloud/vmhost/jobs/requestDynamicParameters"),
    ] {
        let (status, body) = p.core_call(method, path, Some(json!({}))).await;
        assert_eq!(status, 200, "{method} {path}: {body}");
    }
}

#[tokio::test]
async fn without_ucloud_config_the_provider_paths_do_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let keys = CoreKeys::generate(dir.path());
    let d = TestDaemon::start(common::config(dir.path()), Arc::new(FakeBackend::default())).await;
    let (status, body) = d
        .call(
            "GET",
            "/ucloud/vmhost/jobs/retrieveProducts",
            &keys.core_token(),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn core_runs_a_vm_under_its_own_job_id_through_its_whole_life() {
    let p = provider().await;
    let create = json!({ "items": [core_job("54112")] });
    let (status, body) = p.core_post("/ucloud/vmhost/jobs", create.clone()).await;
    assert_eq!(
        (status, &body),
        (200, &json!({ "responses": [{ "id": "" }] })),
        "{body}"
    );
    let local_id = p.local_job("54112").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = p.d.wait_state(&local_id, "RUNNING", 10).await;
    assert_eq!(job["owner"]["createdBy"], "alice");
    let domain = format!("vmhost-test-{local_id}-0");
    assert_eq!(p.d.fake.snapshot()[&domain].state, PowerState::Running);

    // Core retries a create whose answer it missed: nothing new is made.
    let (status, _) = p.core_post("/ucloud/vmhost/jobs", create).await;
    assert_eq!(status, 200);
    p.local_job("54112").await;

    let (status, body) = p
        .core_post(
            "/ucloud/vmhost/jobs/interactiveSession",
            json!({ "items": [{ "job": core_job("54112"), "rank": 0, "sessionType": "VNC", "target": null }] }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let session = &body["responses"][0];
    assert_eq!(session["type"], "vnc", "{body}");
    assert_eq!(session["jobId"], "54112", "Core's id, not vmhost's: {body}");
    let url = session["url"].as_str().unwrap();
    assert!(url.contains("/ucloud/vmhost/vnc?token="), "{url}");

    let item = json!({ "items": [{ "job": core_job("54112") }] });
    let (status, body) = p
        .core_post("/ucloud/vmhost/jobs/suspend", item.clone())
        .await;
    assert_eq!(status, 200, "{body}");
    p.d.wait_state(&local_id, "SUSPENDED", 10).await;
    assert_eq!(p.d.fake.snapshot()[&domain].state, PowerState::ShutOff);
    let (status, body) = p.core_post("/ucloud/vmhost/jobs/unsuspend", item).await;
    assert_eq!(status, 200, "{body}");
    p.d.wait_state(&local_id, "RUNNING", 10).await;

    let terminate = json!({ "items": [core_job("54112")] });
    let (status, body) = p
        .core_post("/ucloud/vmhost/jobs/terminate", terminate.clone())
        .await;
    assert_eq!(
        (status, &body),
        (200, &json!({ "responses": [{}] })),
        "{body}"
    );
    p.d.wait_state(&local_id, "SUCCESS", 10).await;
    assert!(p.d.fake.snapshot().is_empty(), "the VM is gone");
    let (status, _) = p
        .core_post("/ucloud/vmhost/jobs/terminate", terminate)
        .await;
    assert_eq!(status, 200, "terminating an ended job again is fine");

    // Core heard the whole story, in order, under its own id.
    let story = [
        "IN_QUEUE",
        "RUNNING",
        "SUSPENDED",
        "IN_QUEUE",
        "RUNNING",
        "SUCCESS",
    ];
    let told = p.core.wait_states("54112", &story).await;
    let updates = p.core.updates.lock().unwrap().clone();
    assert!(told, "{updates:#?}");
    assert!(
        updates.iter().all(|u| u["id"] == "54112"),
        "only Core's id is ever sent: {updates:#?}"
    );
}

/// Updates made while Core is unreachable, or before a restart, are delivered later, once and
/// in order: the store keeps what Core has acknowledged.
#[tokio::test]
async fn reports_survive_an_unreachable_core_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keys = CoreKeys::generate(dir.path());
    // Nothing listens here yet: a port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = common::config(dir.path());
    config.ucloud = Some(UcloudConfig {
        core_url: format!("http://127.0.0.1:{port}"),
        refresh_token: "refresh-token-of-the-provider".into(),
        public_key: keys.public_key.clone(),
    });
    let fake = Arc::new(FakeBackend::default());
    let first = TestDaemon::start(config.clone(), fake.clone()).await;
    let token = keys.core_token();
    let create = json!({ "items": [core_job("7")] });
    let (status, body) = first
        .call("POST", "/ucloud/vmhost/jobs", &token, Some(create))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, page) = first.get("/api/jobs/browse").await;
    let local_id = page["items"][0]["id"].as_str().unwrap().to_owned();
    first.wait_state(&local_id, "RUNNING", 10).await;
    first.kill();

    let core = FakeCore::default();
    core.start_on(port).await;
    let second = TestDaemon::start(config, fake).await;
    let told = core.wait_states("7", &["IN_QUEUE", "RUNNING"]).await;
    assert!(told, "{:#?}", core.updates.lock().unwrap());
    second.kill();
}

#[tokio::test]
async fn core_calls_about_unknown_jobs_or_bad_specifications_change_nothing() {
    let p = provider().await;
    let (status, body) = p
        .core_post(
            "/ucloud/vmhost/jobs/suspend",
            json!({ "items": [{ "job": core_job("999") }] }),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let mut bad = core_job("1");
    bad["specification"]["product"]["id"] = json!("no-such-product");
    let mut good = core_job("2");
    good["specification"]["name"] = json!("fine");
    let (status, body) = p
        .core_post("/ucloud/vmhost/jobs", json!({ "items": [good, bad] }))
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, page) = p.d.get("/api/jobs/browse").await;
    assert_eq!(page["items"], json!([]), "all or nothing: {page:#}");
    let (status, body) = p
        .core_post("/ucloud/vmhost/jobs", json!({ "items": [] }))
        .await;
    assert_eq!(status, 400, "{body}");
}
