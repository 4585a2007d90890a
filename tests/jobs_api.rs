//! Component tests: the Jobs API and job manager over the in-memory hypervisor.

mod common;

use std::sync::Arc;

use common::{spec, vm_spec, TestDaemon, OTHER_TOKEN, SSH_KEY, TOKEN};
use serde_json::{json, Value};
use vmhost::backend::fake::FakeBackend;
use vmhost::backend::{PowerState, StopCause};

async fn daemon() -> (TestDaemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let d = TestDaemon::start(common::config(dir.path()), Arc::new(FakeBackend::default())).await;
    (d, dir)
}

fn statuses(job: &Value) -> Vec<(String, String)> {
    job["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["state"].as_str().unwrap_or("").to_owned(),
                u["status"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn create_runs_a_vm_and_terminate_removes_it() {
    let (d, _dir) = daemon().await;
    let mut s = vm_spec();
    s["name"] = json!("My analysis #1");
    s["parameters"] = json!({ "sshPublicKeys": { "type": "text", "value": SSH_KEY } });
    let id = d.create(s).await;
    let job = d.wait_state(&id, "RUNNING", 10).await;
    assert_eq!(job["owner"]["createdBy"], "alice");
    assert!(job["status"]["startedAt"].is_i64());
    assert_eq!(
        statuses(&job),
        [
            (
                "IN_QUEUE".into(),
                "Your job is now waiting in the queue!".into()
            ),
            ("RUNNING".into(), "Your job is now running!".into())
        ]
    );
    let domains = d.fake.snapshot();
    let domain = &domains[&format!("vmhost-test-{id}-0")];
    assert_eq!(domain.state, PowerState::Running);
    assert_eq!(domain.spec.vcpus, 1);
    assert_eq!(domain.spec.memory_mib, 1024);
    assert_eq!(domain.spec.disk_gib, 8);

    let (status, body) = d
        .post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    assert_eq!((status, body), (200, json!({ "responses": [{}] })));
    let job = d.wait_state(&id, "SUCCESS", 10).await;
    assert_eq!(
        statuses(&job).last().unwrap().1,
        "Your job has been cancelled!"
    );
    assert!(d.fake.snapshot().is_empty(), "domain left behind");
    assert_eq!(job["status"]["expiresAt"], Value::Null);

    let (status, body) = d
        .post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn bad_requests_are_refused_with_why_and_create_nothing() {
    let (d, _dir) = daemon().await;
    let mut unknown_product = vm_spec();
    unknown_product["product"]["id"] = json!("vm-huge");
    let mut wrong_provider = vm_spec();
    wrong_provider["product"]["provider"] = json!("elsewhere");
    let mut wrong_type = vm_spec();
    wrong_type["parameters"] = json!({ "sshPublicKeys": { "type": "integer", "value": 3 } });
    let mut unknown_param = vm_spec();
    unknown_param["parameters"] = json!({ "nope": { "type": "text", "value": "x" } });
    let mut bad_key = vm_spec();
    bad_key["parameters"] = json!({ "sshPublicKeys": { "type": "text", "value": "not a key" } });
    let mut too_many = vm_spec();
    too_many["replicas"] = json!(1000);
    let mut zero = vm_spec();
    zero["replicas"] = json!(0);
    let mut negative = vm_spec();
    negative["replicas"] = json!(-1);
    let mut small_disk = vm_spec();
    small_disk["parameters"] = json!({ "diskSize": { "type": "integer", "value": 1 } });
    let mut unknown_field = vm_spec();
    unknown_field["surprise"] = json!(true);
    let mut resources = vm_spec();
    resources["resources"] = json!([{ "type": "ingress", "id": "1" }]);
    let bad = [
        unknown_product,
        wrong_provider,
        spec("no-such-app", "1"),
        wrong_type,
        unknown_param,
        bad_key,
        too_many,
        zero,
        negative,
        small_disk,
        unknown_field,
        resources,
    ];
    for (i, s) in bad.into_iter().enumerate() {
        // A valid item first proves that one bad item refuses the whole request.
        let (status, body) = d
            .post("/api/jobs", json!({ "items": [vm_spec(), s] }))
            .await;
        assert_eq!(status, 400, "case {i}: {body}");
        assert!(
            body["why"].as_str().is_some_and(|w| !w.is_empty()),
            "case {i}: {body}"
        );
        assert_eq!(body["errorCode"], "BAD_REQUEST", "case {i}: {body}");
    }
    let raw = |body: &'static str| {
        d.client
            .post(format!("{}/api/jobs", d.base))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
    };
    let resp = raw("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["why"].as_str().unwrap().contains("malformed JSON"),
        "{body}"
    );
    let huge = format!(
        "{{\"items\": [], \"pad\": \"{}\"}}",
        "x".repeat(2 * 1024 * 1024)
    );
    let resp = d
        .client
        .post(format!("{}/api/jobs", d.base))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let (status, _) = d.post("/api/jobs", json!({ "items": [] })).await;
    assert_eq!(status, 400);
    let (status, body) = d
        .call(
            "POST",
            "/api/jobs",
            "wrong-token",
            Some(json!({ "items": [vm_spec()] })),
        )
        .await;
    assert_eq!(status, 401, "{body}");

    let (_, page) = d.get("/api/jobs/browse").await;
    assert_eq!(page["items"], json!([]), "a refused request created a job");
    assert!(d.fake.snapshot().is_empty());
}

#[tokio::test]
async fn user_data_and_keys_that_would_fail_the_seed_are_refused_at_create() {
    let (d, _dir) = daemon().await;
    let with_params = |params: Value| {
        let mut s = vm_spec();
        s["parameters"] = params;
        s
    };
    let user_data =
        |text: &str| with_params(json!({ "userData": { "type": "text", "value": text } }));
    // Valid keys, each under the 8 KiB line limit, that render past the 64 KiB user-data limit.
    let big_keys = vec![format!("{SSH_KEY} {}", "c".repeat(7900)); 10].join("\n");
    let cases = [
        (user_data("hostname: evil"), "user data sets \"hostname\""),
        (
            user_data("ssh_pwauth: true"),
            "vmhost always sets ssh_pwauth: false",
        ),
        (
            user_data("users: [debian]"),
            "user data declares user \"debian\"",
        ),
        (user_data("users: 5"), "`users` must be a list"),
        (
            with_params(json!({ "sshPublicKeys": { "type": "text", "value": big_keys } })),
            "more than the 65536-byte limit",
        ),
    ];
    for (s, needle) in cases {
        // A valid item first: one refused item refuses the whole request.
        let (status, body) = d
            .post("/api/jobs", json!({ "items": [vm_spec(), s] }))
            .await;
        assert_eq!(status, 400, "{needle}: {body}");
        let why = body["why"].as_str().unwrap_or_default();
        assert!(why.starts_with("item 1: "), "{body}");
        assert!(why.contains(needle), "{needle}: {body}");
    }
    let (_, page) = d.get("/api/jobs/browse").await;
    assert_eq!(page["items"], json!([]), "a refused request created a job");
    assert!(d.fake.snapshot().is_empty());

    let ok = user_data("#cloud-config\npackages: [htop]\nusers: [ops]\n");
    let id = d.create(ok).await;
    d.wait_state(&id, "RUNNING", 10).await;
}

#[tokio::test]
async fn duplicates_are_refused_unless_allowed() {
    let (d, _dir) = daemon().await;
    let mut s = vm_spec();
    s["allowDuplicateJob"] = json!(false);
    let first = d.create(s.clone()).await;
    let (status, body) = d.post("/api/jobs", json!({ "items": [s.clone()] })).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["why"].as_str().unwrap().contains(&first), "{body}");
    let mut allowed = s.clone();
    allowed["allowDuplicateJob"] = json!(true);
    let second = d.create(allowed).await;
    // Bob is another user: his identical job is not a duplicate of Alice's.
    let (status, _) = d
        .call(
            "POST",
            "/api/jobs",
            OTHER_TOKEN,
            Some(json!({ "items": [s.clone()] })),
        )
        .await;
    assert_eq!(status, 200);
    // Once no identical job is active, the same specification is accepted again.
    d.post(
        "/api/jobs/terminate",
        json!({ "items": [{ "id": first }, { "id": second }] }),
    )
    .await;
    d.wait_state(&first, "SUCCESS", 10).await;
    d.wait_state(&second, "SUCCESS", 10).await;
    d.create(s).await;
}

#[tokio::test]
async fn users_see_and_act_on_their_own_jobs_only() {
    let (d, _dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    for (method, path, body) in [
        ("GET", format!("/api/jobs/retrieve?id={id}"), None),
        (
            "POST",
            "/api/jobs/terminate".to_owned(),
            Some(json!({ "items": [{ "id": id }] })),
        ),
        (
            "POST",
            "/api/jobs/extend".to_owned(),
            Some(
                json!({ "items": [{ "jobId": id, "requestedTime": { "hours": 1, "minutes": 0, "seconds": 0 } }] }),
            ),
        ),
    ] {
        let (status, body) = d.call(method, &path, OTHER_TOKEN, body).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (_, page) = d.call("GET", "/api/jobs/browse", OTHER_TOKEN, None).await;
    assert_eq!(page["items"], json!([]));
    d.wait_state(&id, "RUNNING", 10).await;
}

#[tokio::test]
async fn browse_pages_filters_and_include_flags() {
    let (d, _dir) = daemon().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let mut s = vm_spec();
        s["name"] = json!(format!("job number {i}"));
        s["parameters"] = json!({ "diskSize": { "type": "integer", "value": 10 + i } });
        ids.push(d.create(s).await);
    }
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(n) => format!("/api/jobs/browse?itemsPerPage=2&next={n}"),
            None => "/api/jobs/browse?itemsPerPage=2".to_owned(),
        };
        let (status, page) = d.get(&path).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["itemsPerPage"], 2);
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
            assert_eq!(
                item["specification"]["parameters"],
                Value::Null,
                "parameters need includeParameters"
            );
            assert_eq!(
                item["updates"].as_array().unwrap().len(),
                1,
                "one update without includeUpdates"
            );
        }
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_owned()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let filter = format!("/api/jobs/browse?filterIds={},{}&includeParameters=true&includeProduct=true&includeApplication=true&includeSupport=true&includeOthers=true", ids[0], ids[3]);
    let (_, page) = d.get(&filter).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[0]["specification"]["parameters"]["diskSize"]["value"],
        13
    );
    assert_eq!(items[0]["status"]["resolvedProduct"]["cpu"], 1);
    assert_eq!(
        items[0]["status"]["resolvedApplication"]["metadata"]["name"],
        "debian-cloud"
    );
    assert_eq!(
        items[0]["status"]["resolvedSupport"]["virtualMachine"]["enabled"],
        true
    );
    assert_eq!(items[0]["permissions"]["myself"], json!(["ADMIN"]));

    for id in &ids {
        d.wait_state(id, "RUNNING", 10).await;
    }
    d.post(
        "/api/jobs/terminate",
        json!({ "items": [{ "id": ids[1] }] }),
    )
    .await;
    d.wait_state(&ids[1], "SUCCESS", 10).await;
    let (_, page) = d.get("/api/jobs/browse?filterState=SUCCESS").await;
    let found: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(found, [ids[1].as_str()]);
    for (query, expected) in [
        ("filterApplication=debian-cloud", 5),
        ("filterApplication=other", 0),
        ("filterProductId=vm-small", 5),
        ("hideProductId=vm-small", 0),
        ("filterCreatedBy=alice", 5),
        ("filterCreatedBy=bob", 0),
        ("filterProviderIds=vmhost", 5),
        ("filterProvider=elsewhere", 0),
        ("hideProvider=vmhost", 0),
        ("filterCreatedAfter=0", 5),
        ("filterCreatedBefore=0", 0),
    ] {
        let (_, page) = d.get(&format!("/api/jobs/browse?{query}")).await;
        assert_eq!(page["items"].as_array().unwrap().len(), expected, "{query}");
    }
    let (status, page) = d
        .post(
            "/api/jobs/search",
            json!({ "query": "number 3", "flags": {} }),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"][0]["id"], ids[3]);
    let (status, _) = d.get("/api/jobs/browse?next=garbage").await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn replicas_start_one_vm_per_rank() {
    let (d, _dir) = daemon().await;
    let mut s = vm_spec();
    s["replicas"] = json!(3);
    s["name"] = json!("cluster");
    let id = d.create(s).await;
    d.wait_state(&id, "RUNNING", 10).await;
    let domains = d.fake.snapshot();
    assert_eq!(domains.len(), 3);
    for rank in 0..3 {
        let dom = &domains[&format!("vmhost-test-{id}-{rank}")];
        assert_eq!(dom.spec.rank, rank);
        assert_eq!(dom.state, PowerState::Running);
    }
    d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    d.wait_state(&id, "SUCCESS", 10).await;
    assert!(d.fake.snapshot().is_empty());
}

#[tokio::test]
async fn a_failed_start_leaves_nothing_and_says_why() {
    let (d, _dir) = daemon().await;
    d.fake.fail_start_of("-1");
    let mut s = vm_spec();
    s["replicas"] = json!(2);
    let id = d.create(s).await;
    let job = d.wait_state(&id, "FAILURE", 10).await;
    let why = statuses(&job).last().unwrap().1.clone();
    assert!(why.contains("injected start failure"), "{why}");
    assert!(d.fake.snapshot().is_empty(), "rank 0 was left behind");
}

#[tokio::test]
async fn hypervisor_events_keep_the_job_state_true() {
    let (d, _dir) = daemon().await;
    let off = d.create(vm_spec()).await;
    let crashed = d.create(vm_spec()).await;
    let vanished = d.create(vm_spec()).await;
    for id in [&off, &crashed, &vanished] {
        d.wait_state(id, "RUNNING", 10).await;
    }
    d.fake
        .simulate_stop(&format!("vmhost-test-{off}-0"), StopCause::GuestShutdown);
    d.fake
        .simulate_stop(&format!("vmhost-test-{crashed}-0"), StopCause::Crashed);
    d.fake.vanish_silently(&format!("vmhost-test-{vanished}-0"));
    let job = d.wait_state(&off, "SUSPENDED", 10).await;
    assert_eq!(
        statuses(&job).last().unwrap().1,
        "The virtual machine was powered off from inside"
    );
    let job = d.wait_state(&crashed, "SUSPENDED", 10).await;
    assert!(statuses(&job).last().unwrap().1.contains("crashed"));
    // No event at all: the periodic sync (1 s in tests) notices.
    let job = d.wait_state(&vanished, "FAILURE", 10).await;
    assert!(statuses(&job).last().unwrap().1.contains("disappeared"));
    assert!(
        d.fake
            .snapshot()
            .contains_key(&format!("vmhost-test-{off}-0")),
        "disk of a powered-off VM kept"
    );
    d.post("/api/jobs/terminate", json!({ "items": [{ "id": off }] }))
        .await;
    d.wait_state(&off, "SUCCESS", 10).await;
    assert!(!d
        .fake
        .snapshot()
        .contains_key(&format!("vmhost-test-{off}-0")));
}

#[tokio::test]
async fn time_allocation_sets_a_deadline_that_extend_moves_and_expiry_enforces() {
    let (d, _dir) = daemon().await;
    let mut s = vm_spec();
    s["timeAllocation"] = json!({ "hours": 5, "minutes": 0, "seconds": 0 });
    let id = d.create(s).await;
    let job = d.wait_state(&id, "RUNNING", 10).await;
    let started = job["status"]["startedAt"].as_i64().unwrap();
    let expires = job["status"]["expiresAt"].as_i64().unwrap();
    assert!((expires - started - 5 * 3_600_000).abs() < 2_000, "{job:#}");
    let (status, body) = d
        .post("/api/jobs/extend", json!({ "items": [{ "jobId": id, "requestedTime": { "hours": 1, "minutes": 0, "seconds": 0 } }] }))
        .await;
    assert_eq!((status, body), (200, json!({ "responses": [{}] })));
    let job = d.retrieve(&id).await;
    assert_eq!(
        job["status"]["expiresAt"].as_i64().unwrap(),
        expires + 3_600_000
    );
    assert_eq!(
        job["specification"]["timeAllocation"]["hours"], 5,
        "the spec is echoed as given"
    );

    let no_deadline = d.create(vm_spec()).await;
    let (status, _) = d
        .post("/api/jobs/extend", json!({ "items": [{ "jobId": no_deadline, "requestedTime": { "hours": 1, "minutes": 0, "seconds": 0 } }] }))
        .await;
    assert_eq!(status, 400);

    let mut short = vm_spec();
    short["timeAllocation"] = json!({ "hours": 0, "minutes": 0, "seconds": 1 });
    let short_id = d.create(short).await;
    let job = d.wait_state(&short_id, "EXPIRED", 15).await;
    assert!(statuses(&job).last().unwrap().1.contains("expired"));
    assert!(!d
        .fake
        .snapshot()
        .contains_key(&format!("vmhost-test-{short_id}-0")));
    let (status, _) = d
        .post("/api/jobs/extend", json!({ "items": [{ "jobId": short_id, "requestedTime": { "hours": 1, "minutes": 0, "seconds": 0 } }] }))
        .await;
    assert_eq!(status, 409, "extending a final job");
}

#[tokio::test]
async fn restart_readopts_running_vms_and_repairs_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeBackend::default());
    let d = TestDaemon::start(common::config(dir.path()), fake.clone()).await;
    let kept = d.create(vm_spec()).await;
    let vanishes = d.create(vm_spec()).await;
    let powered_off = d.create(vm_spec()).await;
    for id in [&kept, &vanishes, &powered_off] {
        d.wait_state(id, "RUNNING", 10).await;
    }
    let finished = d.create(vm_spec()).await;
    d.wait_state(&finished, "RUNNING", 10).await;
    d.post(
        "/api/jobs/terminate",
        json!({ "items": [{ "id": finished }] }),
    )
    .await;
    d.wait_state(&finished, "SUCCESS", 10).await;
    let config = d.config.clone();
    d.kill();

    // While vmhost is down: one VM disappears, one is powered off, an operator defines a
    // domain of their own with our prefix, and a finished job's domain reappears.
    fake.vanish_silently(&format!("vmhost-test-{vanishes}-0"));
    fake.simulate_stop(
        &format!("vmhost-test-{powered_off}-0"),
        StopCause::Destroyed,
    );
    let mut foreign = fake.snapshot()[&format!("vmhost-test-{kept}-0")]
        .spec
        .clone();
    foreign.name = "vmhost-test-operator".into();
    foreign.agent_id = "someone-else".into();
    fake.insert_foreign(foreign, PowerState::Running);
    let mut stale = fake.snapshot()[&format!("vmhost-test-{kept}-0")]
        .spec
        .clone();
    stale.name = format!("vmhost-test-{finished}-0");
    stale.job_id = finished.clone();
    fake.insert_foreign(stale, PowerState::Running);

    let d = TestDaemon::start(config, fake.clone()).await;
    let job = d.wait_state(&kept, "RUNNING", 10).await;
    assert_eq!(
        job["updates"].as_array().unwrap().len(),
        2,
        "re-adoption adds no update"
    );
    d.wait_state(&vanishes, "FAILURE", 10).await;
    d.wait_state(&powered_off, "SUSPENDED", 10).await;
    let domains = fake.snapshot();
    assert!(
        domains.contains_key("vmhost-test-operator"),
        "a foreign domain was touched"
    );
    assert!(
        !domains.contains_key(&format!("vmhost-test-{finished}-0")),
        "final job's domain kept"
    );
    assert_eq!(domains["vmhost-test-operator"].state, PowerState::Running);
}

#[tokio::test]
async fn a_terminate_interrupted_by_a_crash_finishes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeBackend::default());
    let d = TestDaemon::start(common::config(dir.path()), fake.clone()).await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    // The hypervisor refuses, so the runner keeps retrying the teardown when vmhost dies.
    fake.set_unavailable(true);
    d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let config = d.config.clone();
    d.kill();
    fake.set_unavailable(false);
    let d = TestDaemon::start(config, fake.clone()).await;
    d.wait_state(&id, "SUCCESS", 20).await;
    assert!(fake.snapshot().is_empty());
}

#[tokio::test]
async fn products_report_what_works() {
    let (d, _dir) = daemon().await;
    let (status, body) = d.get("/api/jobs/retrieveProducts").await;
    assert_eq!(status, 200, "{body}");
    let items = body["productsByProvider"]["vmhost"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["product"]["name"], "vm-small");
    assert_eq!(
        items[0]["product"]["category"],
        json!({ "name": "vm", "provider": "vmhost" })
    );
    let vm = &items[0]["support"]["virtualMachine"];
    assert_eq!(vm["enabled"], true);
    assert_eq!(vm["logs"], true);
    assert_eq!(vm["vnc"], true);
    assert_eq!(vm["terminal"], true);
    d.fake.set_unavailable(true);
    let (_, body) = d.get("/api/jobs/retrieveProducts").await;
    assert_eq!(
        body["productsByProvider"]["vmhost"][0]["support"]["virtualMachine"]["enabled"],
        false
    );
    let (status, body) = d.get("/api/jobs/retrieveUtilization").await;
    assert_eq!(status, 503, "{body}");
    d.fake.set_unavailable(false);
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    let (status, body) = d.get("/api/jobs/retrieveUtilization").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usedCapacity"]["cpu"], 1.0);
    assert_eq!(body["queueStatus"]["running"], 1);
    assert_eq!(
        body["capacity"]["cpu"], 256.0,
        "64 host CPUs at the default 4x overcommit"
    );
}

mod follow {
    use super::*;
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    async fn next_frame(
        ws: &mut (impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
                  + Unpin),
    ) -> Value {
        loop {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
                .await
                .expect("a frame within 10 s")
                .expect("stream open")
                .unwrap();
            if let Message::Text(text) = msg {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn follow_streams_the_story_console_and_end() {
        let (d, _dir) = daemon().await;
        let id = d.create(vm_spec()).await;
        d.wait_state(&id, "RUNNING", 10).await;
        // The fake hypervisor writes no console; put some where virtlogd would.
        let log = d
            .config
            .vm_dir()
            .join(format!("vmhost-test-{id}-0"))
            .join("console.log");
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::fs::write(&log, "boot line 1\n").unwrap();

        let url = format!("{}/api/jobs", d.base.replace("http://", "ws://"));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let call = json!({ "call": "jobs.follow", "streamId": "s1", "payload": { "id": id }, "bearer": TOKEN });
        ws.send(Message::Text(call.to_string().into()))
            .await
            .unwrap();
        let first = next_frame(&mut ws).await;
        assert_eq!(first["type"], "message");
        assert_eq!(first["streamId"], "s1");
        assert_eq!(first["payload"]["updates"].as_array().unwrap().len(), 2);
        assert_eq!(first["payload"]["newStatus"]["state"], "RUNNING");
        assert_eq!(
            first["payload"]["log"],
            json!([{ "rank": 0, "stdout": "boot line 1\n", "stderr": null }])
        );

        std::fs::write(&log, "boot line 1\nlogin: \n").unwrap();
        let more = next_frame(&mut ws).await;
        assert_eq!(more["payload"]["log"][0]["stdout"], "login: \n");

        d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
            .await;
        let mut states = Vec::new();
        loop {
            let frame = next_frame(&mut ws).await;
            if frame["type"] == "response" {
                assert_eq!(frame["status"], 200);
                break;
            }
            for u in frame["payload"]["updates"].as_array().into_iter().flatten() {
                states.push(u["state"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(states, ["SUCCESS"]);
    }

    #[tokio::test]
    async fn follow_refuses_strangers_and_unknown_jobs() {
        let (d, _dir) = daemon().await;
        let id = d.create(vm_spec()).await;
        let url = format!("{}/api/jobs", d.base.replace("http://", "ws://"));
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        for (stream, payload, bearer, status) in [
            ("a", json!({ "id": id }), "wrong", 401),
            ("b", json!({ "id": id }), OTHER_TOKEN, 404),
            ("c", json!({ "id": "999" }), TOKEN, 404),
            ("d", json!({}), TOKEN, 400),
        ] {
            let call = json!({ "call": "jobs.follow", "streamId": stream, "payload": payload, "bearer": bearer });
            ws.send(Message::Text(call.to_string().into()))
                .await
                .unwrap();
            let frame = next_frame(&mut ws).await;
            assert_eq!(frame["type"], "response", "{frame}");
            assert_eq!(frame["streamId"], stream);
            assert_eq!(frame["status"], status, "{frame}");
            assert!(frame["payload"]["why"].is_string());
        }
    }
}

/// `"01"` names job 1 to SQLite but a second job to everything keyed by the name (runners,
/// consoles, followers); only the canonical id is known.
#[tokio::test]
async fn ids_are_known_by_their_canonical_form_only() {
    let (d, _dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    let (status, body) = d.get(&format!("/api/jobs/retrieve?id=0{id}")).await;
    assert_eq!(status, 404, "{body}");
    for alias in [format!("0{id}"), format!("+{id}"), format!("{id} ")] {
        for call in ["terminate", "suspend"] {
            let (status, body) = d
                .post(
                    &format!("/api/jobs/{call}"),
                    json!({ "items": [{ "id": alias }] }),
                )
                .await;
            assert_eq!(status, 404, "{call} {alias:?}: {body}");
        }
    }
    let job = d.retrieve(&id).await;
    assert_eq!(job["status"]["state"], "RUNNING");
    assert_eq!(
        statuses(&job).len(),
        2,
        "nothing happened to the job: {job:#}"
    );
}

#[tokio::test]
async fn an_extension_past_ten_years_is_refused_and_changes_nothing() {
    let (d, _dir) = daemon().await;
    let mut s = vm_spec();
    s["timeAllocation"] = json!({ "hours": 1, "minutes": 0, "seconds": 0 });
    let id = d.create(s).await;
    let job = d.wait_state(&id, "RUNNING", 10).await;
    let expires = job["status"]["expiresAt"].as_i64().unwrap();
    let item = |hours: u64| json!({ "jobId": id, "requestedTime": { "hours": hours, "minutes": 0, "seconds": 0 } });
    // Each item alone would overflow a deadline in milliseconds once summed in SQL.
    let flood: Vec<Value> = (0..600).map(|_| item(4_294_967_295)).collect();
    let (status, body) = d.post("/api/jobs/extend", json!({ "items": flood })).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["why"].as_str().unwrap().contains("may not exceed"),
        "{body}"
    );
    // Two items that pass alone but not together.
    let (status, body) = d
        .post(
            "/api/jobs/extend",
            json!({ "items": [item(50_000), item(50_000)] }),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let job = d.retrieve(&id).await;
    assert_eq!(job["status"]["expiresAt"].as_i64().unwrap(), expires);
    assert_eq!(
        statuses(&job).len(),
        2,
        "no extension was recorded: {job:#}"
    );
    let (status, body) = d.get("/api/jobs/retrieveUtilization").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = d
        .post("/api/jobs/extend", json!({ "items": [item(50_000)] }))
        .await;
    assert_eq!(status, 200, "up to ten years is fine");

    let mut forever = vm_spec();
    forever["timeAllocation"] = json!({ "hours": 4_294_967_295u64, "minutes": 0, "seconds": 0 });
    let (status, body) = d.post("/api/jobs", json!({ "items": [forever] })).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["why"].as_str().unwrap().contains("may not exceed"),
        "{body}"
    );
}

#[tokio::test]
async fn identical_creates_at_once_admit_exactly_one() {
    let (d, _dir) = daemon().await;
    let mut s = vm_spec();
    s["allowDuplicateJob"] = json!(false);
    let request = json!({ "items": [s] });
    let attempts = (0..8).map(|_| d.post("/api/jobs", request.clone()));
    let statuses: Vec<u16> = futures::future::join_all(attempts)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|&&s| s == 409).count(),
        7,
        "{statuses:?}"
    );
    let (_, page) = d.get("/api/jobs/browse").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page:#}");
}

#[tokio::test]
async fn empty_bulk_requests_are_refused() {
    let (d, _dir) = daemon().await;
    for path in [
        "/api/jobs/terminate",
        "/api/jobs/suspend",
        "/api/jobs/unsuspend",
        "/api/jobs/extend",
        "/api/jobs/interactiveSession",
    ] {
        let (status, body) = d.post(path, json!({ "items": [] })).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(
            body["why"].as_str().unwrap().contains("at least one"),
            "{path}: {body}"
        );
    }
}

/// A wrong method, or a plain request to a WebSocket route, is refused in UCloud's format.
#[tokio::test]
async fn refusals_outside_the_handlers_speak_ucloud_errors() {
    let (d, _dir) = daemon().await;
    for (method, path, expected) in [
        ("GET", "/api/jobs/terminate", 405),
        ("PUT", "/api/jobs", 405),
        ("DELETE", "/api/jobs/retrieve", 405),
        ("GET", "/api/jobs", 400),
        ("GET", "/ucloud/vmhost/vnc?token=x", 400),
        ("GET", "/ucloud/vmhost/websocket?session=x", 400),
    ] {
        let (status, body) = d.call(method, path, TOKEN, None).await;
        assert_eq!(status, expected, "{method} {path}: {body}");
        assert_eq!(body["statusCode"], expected, "{method} {path}: {body}");
        assert!(
            body["why"].as_str().is_some_and(|w| !w.is_empty()),
            "{body}"
        );
        assert!(body["errorCode"].is_string(), "{body}");
    }
}

/// Two vmhosts with the same `domain_prefix` on one hypervisor both name their first job's VM
/// `vmhost-test-1-0`. The second one's define is refused, its job fails, and the first one's
/// running VM is never touched.
#[tokio::test]
async fn another_vmhosts_domain_of_the_same_name_is_never_touched() {
    let fake = Arc::new(FakeBackend::default());
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestDaemon::start(common::config(dir_a.path()), fake.clone()).await;
    let b = TestDaemon::start(common::config(dir_b.path()), fake.clone()).await;
    let id_a = a.create(vm_spec()).await;
    a.wait_state(&id_a, "RUNNING", 10).await;
    let id_b = b.create(vm_spec()).await;
    assert_eq!(id_a, id_b, "both name their first job the same");
    let job = b.wait_state(&id_b, "FAILURE", 10).await;
    assert!(
        statuses(&job).last().unwrap().1.contains("not this VM"),
        "{job:#}"
    );
    let domain = &fake.snapshot()[&format!("vmhost-test-{id_a}-0")];
    assert_eq!(
        domain.state,
        PowerState::Running,
        "the first vmhost's VM was stopped"
    );
    assert_eq!(a.retrieve(&id_a).await["status"]["state"], "RUNNING");
}

/// A crash while the seed was written leaves a temporary file no record names; removing the VM
/// still removes its whole directory.
#[tokio::test]
async fn terminate_removes_the_vms_directory_with_strays_in_it() {
    let (d, _dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    let vm_dir = d.config.vm_dir().join(format!("vmhost-test-{id}-0"));
    std::fs::create_dir_all(&vm_dir).unwrap();
    std::fs::write(vm_dir.join(".seed.img.tmp-0123"), b"half a seed").unwrap();
    d.post("/api/jobs/terminate", json!({ "items": [{ "id": id }] }))
        .await;
    d.wait_state(&id, "SUCCESS", 10).await;
    assert!(!vm_dir.exists(), "{} is left behind", vm_dir.display());
}
