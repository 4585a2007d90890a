//! Component tests of suspend/unsuspend, guest power, and the capacity queue over the fake
//! hypervisor.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{vm_spec, TestDaemon, OTHER_TOKEN};
use serde_json::{json, Value};
use vmhost::backend::fake::FakeBackend;
use vmhost::backend::{HostInfo, PowerState, StopCause};

async fn daemon_on(
    fake: FakeBackend,
    tweak: impl FnOnce(&mut vmhost::config::Config),
) -> (TestDaemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    tweak(&mut config);
    (TestDaemon::start(config, Arc::new(fake)).await, dir)
}

async fn daemon() -> (TestDaemon, tempfile::TempDir) {
    daemon_on(FakeBackend::default(), |_| {}).await
}

fn last_status(job: &Value) -> String {
    job["updates"].as_array().unwrap().last().unwrap()["status"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Polls until the job's last update says `text`; panics after 10 s.
async fn wait_status(d: &TestDaemon, id: &str, text: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let job = d.retrieve(id).await;
        if last_status(&job).contains(text) {
            return job;
        }
        assert!(Instant::now() < deadline, "{job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn items(ids: &[&str]) -> Value {
    json!({ "items": ids.iter().map(|id| json!({ "id": id })).collect::<Vec<_>>() })
}

#[tokio::test]
async fn suspend_powers_off_keeping_the_disk_and_unsuspend_boots_the_same_vm() {
    let (d, _dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    let first = d.wait_state(&id, "RUNNING", 10).await;
    let domain = format!("vmhost-test-{id}-0");
    let (status, body) = d.post("/api/jobs/suspend", items(&[&id])).await;
    assert_eq!((status, body), (200, json!({ "responses": [{}] })));
    let job = d.wait_state(&id, "SUSPENDED", 10).await;
    assert!(
        last_status(&job).contains("shut down gracefully"),
        "{job:#}"
    );
    let dom = d.fake.snapshot()[&domain].clone();
    assert_eq!(dom.state, PowerState::ShutOff, "domain kept, powered off");
    assert_eq!(dom.shutdown_requests, 1, "one ACPI press was enough");

    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, _) = d.post("/api/jobs/unsuspend", items(&[&id])).await;
    assert_eq!(status, 200);
    let job = d.wait_state(&id, "RUNNING", 10).await;
    let states: Vec<&str> = job["updates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        states,
        ["IN_QUEUE", "RUNNING", "SUSPENDED", "IN_QUEUE", "RUNNING"]
    );
    assert!(
        job["status"]["startedAt"].as_i64() > first["status"]["startedAt"].as_i64(),
        "startedAt moves to the new start"
    );
    let dom = &d.fake.snapshot()[&domain];
    assert_eq!(dom.state, PowerState::Running);
    assert_eq!(dom.spec.overlay, d.fake.snapshot()[&domain].spec.overlay);
    assert_eq!(
        d.fake.snapshot().len(),
        1,
        "the same domain boots again, no new one"
    );
}

#[tokio::test]
async fn a_guest_that_ignores_acpi_is_forced_off_after_the_grace_period() {
    let fake = FakeBackend::default();
    fake.ignore_acpi_of("vmhost-test-");
    let (d, _dir) = daemon_on(fake, |_| {}).await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    let t0 = Instant::now();
    d.post("/api/jobs/suspend", items(&[&id])).await;
    let job = d.wait_state(&id, "SUSPENDED", 10).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "forced off before the 2 s grace"
    );
    assert!(last_status(&job).contains("forced off"), "{job:#}");
    let dom = &d.fake.snapshot()[&format!("vmhost-test-{id}-0")];
    assert!(
        dom.shutdown_requests >= 2,
        "the ACPI request is re-sent: {}",
        dom.shutdown_requests
    );
    assert_eq!(dom.state, PowerState::ShutOff);
}

#[tokio::test]
async fn terminate_during_the_grace_period_wins() {
    let fake = FakeBackend::default();
    fake.ignore_acpi_of("vmhost-test-");
    let (d, _dir) = daemon_on(fake, |c| c.suspend_grace_secs = 30).await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    d.post("/api/jobs/suspend", items(&[&id])).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let (status, _) = d.post("/api/jobs/terminate", items(&[&id])).await;
    assert_eq!(status, 200);
    let job = d.wait_state(&id, "SUCCESS", 10).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "terminate waited for the suspend"
    );
    assert_eq!(last_status(&job), "Your job has been cancelled!");
    assert!(d.fake.snapshot().is_empty());
}

#[tokio::test]
async fn illegal_requests_are_refused_per_item_and_change_nothing() {
    let (d, _dir) = daemon().await;
    let running = d.create(vm_spec()).await;
    let other = d.create(vm_spec()).await;
    d.wait_state(&running, "RUNNING", 10).await;
    d.wait_state(&other, "RUNNING", 10).await;
    // One good item and three bad ones: nothing is suspended, every bad item is named.
    d.post("/api/jobs/suspend", items(&[&other])).await;
    d.wait_state(&other, "SUSPENDED", 10).await;
    let (status, body) = d
        .post("/api/jobs/suspend", items(&[&running, &other, "999"]))
        .await;
    assert_eq!(status, 409, "{body}");
    let why = body["why"].as_str().unwrap();
    assert!(
        why.contains(&format!("job {other}")) && why.contains("999"),
        "{why}"
    );
    assert_eq!(d.retrieve(&running).await["status"]["state"], "RUNNING");
    let (status, body) = d.post("/api/jobs/unsuspend", items(&[&running])).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["why"].as_str().unwrap().contains("not suspended"));
    let (status, _) = d
        .call(
            "POST",
            "/api/jobs/unsuspend",
            OTHER_TOKEN,
            Some(items(&[&other])),
        )
        .await;
    assert_eq!(status, 404, "another user's job");
    assert_eq!(d.retrieve(&other).await["status"]["state"], "SUSPENDED");
}

#[tokio::test]
async fn terminating_a_suspended_job_deletes_its_disk() {
    let (d, _dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    d.post("/api/jobs/suspend", items(&[&id])).await;
    d.wait_state(&id, "SUSPENDED", 10).await;
    d.post("/api/jobs/terminate", items(&[&id])).await;
    d.wait_state(&id, "SUCCESS", 10).await;
    assert!(d.fake.snapshot().is_empty());
}

#[tokio::test]
async fn restart_on_exit_boots_the_vm_again_after_a_guest_power_off() {
    let (d, _dir) = daemon().await;
    let mut spec = vm_spec();
    spec["restartOnExit"] = json!(true);
    let id = d.create(spec).await;
    d.wait_state(&id, "RUNNING", 10).await;
    let domain = format!("vmhost-test-{id}-0");
    d.fake.simulate_stop(&domain, StopCause::GuestShutdown);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let job = d.retrieve(&id).await;
        if last_status(&job).contains("restartOnExit") {
            assert_eq!(job["status"]["state"], "RUNNING");
            break;
        }
        assert!(Instant::now() < deadline, "{job:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.fake.snapshot()[&domain].state, PowerState::Running);
}

#[tokio::test]
async fn jobs_queue_in_fifo_order_until_capacity_frees() {
    // 2 CPUs, no overcommit: one vm-medium (2 vCPU) fills the host.
    let fake = FakeBackend::new(HostInfo {
        cpus: 2,
        memory_mib: 64 * 1024,
    });
    let (d, _dir) = daemon_on(fake, |c| c.cpu_overcommit = 1.0).await;
    let mut medium = vm_spec();
    medium["product"]["id"] = json!("vm-medium");
    let first = d.create(medium.clone()).await;
    d.wait_state(&first, "RUNNING", 10).await;
    let second = d.create(medium.clone()).await;
    let small = d.create(vm_spec()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let job = d.retrieve(&second).await;
    assert_eq!(job["status"]["state"], "IN_QUEUE");
    assert!(
        last_status(&job).contains("Waiting in the queue for free capacity"),
        "{job:#}"
    );
    assert_eq!(
        d.retrieve(&small).await["status"]["state"],
        "IN_QUEUE",
        "FIFO: no overtaking"
    );
    let (_, u) = d.get("/api/jobs/retrieveUtilization").await;
    assert_eq!(u["queueStatus"], json!({ "running": 1, "pending": 2 }));
    assert_eq!(u["capacity"]["cpu"], 2.0);
    assert_eq!(u["usedCapacity"]["cpu"], 2.0);

    // A suspend frees the CPUs (the disk stays held): the second job starts, then the small
    // one waits for it.
    d.post("/api/jobs/suspend", json!({ "items": [{ "id": first }] }))
        .await;
    d.wait_state(&second, "RUNNING", 10).await;
    assert_eq!(d.retrieve(&small).await["status"]["state"], "IN_QUEUE");
    d.post(
        "/api/jobs/terminate",
        json!({ "items": [{ "id": second }] }),
    )
    .await;
    d.wait_state(&small, "RUNNING", 10).await;

    // The suspended job must now wait to power on again.
    let (status, _) = d
        .post("/api/jobs/unsuspend", json!({ "items": [{ "id": first }] }))
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(d.retrieve(&first).await["status"]["state"], "IN_QUEUE");
    d.post("/api/jobs/terminate", json!({ "items": [{ "id": small }] }))
        .await;
    d.wait_state(&first, "RUNNING", 10).await;

    let mut huge = vm_spec();
    huge["replicas"] = json!(3);
    let (status, body) = d.post("/api/jobs", json!({ "items": [huge] })).await;
    assert_eq!(status, 400, "a job larger than the host: {body}");
    assert!(body["why"]
        .as_str()
        .unwrap()
        .contains("more than this host"));
}

#[tokio::test]
async fn a_suspended_job_still_expires() {
    let (d, _dir) = daemon().await;
    let mut spec = vm_spec();
    spec["timeAllocation"] = json!({ "hours": 0, "minutes": 0, "seconds": 2 });
    let id = d.create(spec).await;
    d.wait_state(&id, "RUNNING", 10).await;
    d.post("/api/jobs/suspend", items(&[&id])).await;
    d.wait_state(&id, "SUSPENDED", 10).await;
    d.wait_state(&id, "EXPIRED", 10).await;
    assert!(d.fake.snapshot().is_empty(), "expiry removes the disk too");
}

#[tokio::test]
async fn a_suspend_interrupted_by_a_crash_finishes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeBackend::default());
    fake.ignore_acpi_of("vmhost-test-");
    let d = TestDaemon::start(common::config(dir.path()), fake.clone()).await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    d.post("/api/jobs/suspend", items(&[&id])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let config = d.config.clone();
    d.kill();
    let d = TestDaemon::start(config, fake.clone()).await;
    let job = d.wait_state(&id, "SUSPENDED", 10).await;
    assert!(last_status(&job).contains("forced off"));
    assert_eq!(
        fake.snapshot()[&format!("vmhost-test-{id}-0")].state,
        PowerState::ShutOff
    );
}

#[tokio::test]
async fn support_flags_report_suspension_and_utilization() {
    let (d, _dir) = daemon().await;
    let (_, body) = d.get("/api/jobs/retrieveProducts").await;
    let vm = &body["productsByProvider"]["vmhost"][0]["support"]["virtualMachine"];
    assert_eq!(vm["suspension"], true);
    assert_eq!(vm["timeExtension"], true);
    assert_eq!(vm["utilization"], true);
}

#[tokio::test]
async fn a_failed_unsuspend_keeps_the_disk() {
    let (d, _dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    d.post("/api/jobs/suspend", items(&[&id])).await;
    d.wait_state(&id, "SUSPENDED", 10).await;
    let domain = format!("vmhost-test-{id}-0");
    d.fake.fail_start_of(&domain);
    let (status, _) = d.post("/api/jobs/unsuspend", items(&[&id])).await;
    assert_eq!(status, 200);
    let job = wait_status(&d, &id, "its disk is kept").await;
    assert_eq!(job["status"]["state"], "SUSPENDED");
    assert!(last_status(&job).contains("injected start failure"));
    assert!(
        d.fake.snapshot().contains_key(&domain),
        "the user's disk was deleted"
    );
}

/// The base image vanished while the job was suspended: the unsuspend cannot boot, and the job
/// goes back to SUSPENDED with its disk, not to FAILURE with everything left behind.
#[tokio::test]
async fn an_unsuspend_without_its_base_image_stays_suspended_and_keeps_the_disk() {
    let (d, dir) = daemon().await;
    let id = d.create(vm_spec()).await;
    d.wait_state(&id, "RUNNING", 10).await;
    d.post("/api/jobs/suspend", items(&[&id])).await;
    d.wait_state(&id, "SUSPENDED", 10).await;
    let base = dir.path().join("images/debian12-cloud/disk.qcow2");
    std::fs::rename(&base, base.with_extension("away")).unwrap();
    let (status, _) = d.post("/api/jobs/unsuspend", items(&[&id])).await;
    assert_eq!(status, 200);
    let job = wait_status(&d, &id, "its disk is kept").await;
    assert_eq!(job["status"]["state"], "SUSPENDED", "{job:#}");
    assert!(last_status(&job).contains("base image"), "{job:#}");
    let domain = format!("vmhost-test-{id}-0");
    assert_eq!(d.fake.snapshot()[&domain].state, PowerState::ShutOff);

    std::fs::rename(base.with_extension("away"), &base).unwrap();
    let (status, _) = d.post("/api/jobs/unsuspend", items(&[&id])).await;
    assert_eq!(status, 200);
    d.wait_state(&id, "RUNNING", 10).await;
    assert_eq!(d.fake.snapshot()[&domain].state, PowerState::Running);
}
