//! Public IPs, private addresses and peers over the in-memory hypervisor and firewall:
//! the `/api/networkips` calls, binding to jobs, the firewall plan each change installs, and
//! what the guest is told in its seed.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::net::Ipv4Addr;
use std::sync::Arc;

use common::{vm_spec, TestDaemon, OTHER_TOKEN, SSH_KEY, TOKEN};
use serde_json::{json, Value};
use vmhost::backend::fake::FakeBackend;
use vmhost::backend::NicAttachment;
use vmhost::network::config::PublicPoolConfig;
use vmhost::network::firewall::{NicRole, PortRange, Protocol};

fn pool(subnet: &str, gateway: &str, exclude: &[&str]) -> PublicPoolConfig {
    PublicPoolConfig {
        name: "public-ip".into(),
        subnet: subnet.parse().unwrap(),
        gateway: gateway.parse().unwrap(),
        dns: vec!["203.0.113.53".parse().unwrap()],
        exclude: exclude.iter().map(|e| e.parse().unwrap()).collect(),
        bridge: "br-test".into(),
        description: "test pool".into(),
    }
}

async fn daemon(dir: &std::path::Path, pool: PublicPoolConfig) -> TestDaemon {
    let mut config = common::config(dir);
    config.private_network.enabled = true;
    config.public_pools = vec![pool];
    TestDaemon::start(config, Arc::new(FakeBackend::default())).await
}

fn ip_request(open: &[(u32, u32, &str)]) -> Value {
    let ports: Vec<Value> = open
        .iter()
        .map(|(start, end, protocol)| json!({"start": start, "end": end, "protocol": protocol}))
        .collect();
    json!({
        "product": {"id": "public-ip", "category": "public-ip", "provider": "vmhost"},
        "firewall": {"openPorts": ports},
    })
}

async fn create_ip(d: &TestDaemon, open: &[(u32, u32, &str)]) -> (String, Ipv4Addr) {
    let (status, body) = d
        .post("/api/networkips", json!({"items": [ip_request(open)]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["responses"][0]["id"].as_str().unwrap().to_owned();
    let ip = retrieve_ip(d, &id).await;
    (
        id,
        ip["status"]["ipAddress"].as_str().unwrap().parse().unwrap(),
    )
}

async fn retrieve_ip(d: &TestDaemon, id: &str) -> Value {
    let (status, body) = d
        .get(&format!(
            "/api/networkips/retrieve?id={id}&includeProduct=true"
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Calls `/api/jobs/<call>` for `job`, then waits until it is in `state`.
async fn job_call(d: &TestDaemon, call: &str, job: &str, state: &str) {
    let (status, body) = d
        .post(
            &format!("/api/jobs/{call}"),
            json!({"items": [{"id": job}]}),
        )
        .await;
    assert_eq!(status, 200, "{call}: {body}");
    d.wait_state(job, state, 10).await;
}

fn job_with(resources: Value) -> Value {
    let mut spec = vm_spec();
    spec["resources"] = resources;
    spec["parameters"] = json!({"sshPublicKeys": {"type": "text", "value": SSH_KEY}});
    spec
}

/// The fake domain of rank `rank` of job `id`.
fn domain(d: &TestDaemon, id: &str, rank: u32) -> vmhost::backend::fake::FakeDomain {
    d.fake
        .snapshot()
        .into_iter()
        .find(|(name, _)| name.ends_with(&format!("-{id}-{rank}")))
        .map(|(_, dom)| dom)
        .unwrap_or_else(|| panic!("no domain for job {id} rank {rank}"))
}

/// A file of the VM's NoCloud seed image.
fn seed_file(dom: &vmhost::backend::fake::FakeDomain, name: &str) -> String {
    let image = dom.spec.seed_image.clone().expect("a seed");
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(image), fatfs::FsOptions::new()).unwrap();
    let mut text = String::new();
    fs.root_dir()
        .open_file(name)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text
}

fn guarded_ports(d: &TestDaemon, job: &str) -> Vec<PortRange> {
    let plan = d.firewall.current().expect("a firewall plan");
    let vm = plan
        .vms
        .iter()
        .find(|vm| vm.job_id == job)
        .unwrap_or_else(|| panic!("job {job} is not guarded: {plan:?}"));
    vm.nics
        .iter()
        .find_map(|nic| match &nic.role {
            NicRole::Public { open_ports } => Some(open_ports.clone()),
            NicRole::Private => None,
        })
        .expect("a public NIC")
}

#[tokio::test]
async fn addresses_come_from_the_pool_once_each_and_are_owner_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(
        dir.path(),
        pool("203.0.113.0/24", "203.0.113.1", &["203.0.113.2/32"]),
    )
    .await;
    let (id, address) = create_ip(&d, &[(22, 22, "TCP")]).await;
    assert_eq!(
        address,
        Ipv4Addr::new(203, 0, 113, 3),
        "gateway and excluded skipped"
    );
    let ip = retrieve_ip(&d, &id).await;
    assert_eq!(ip["status"]["state"], "READY");
    assert_eq!(ip["status"]["boundTo"], json!([]));
    assert_eq!(
        ip["specification"]["firewall"]["openPorts"][0]["protocol"],
        "TCP"
    );
    assert_eq!(ip["owner"]["createdBy"], "alice");

    let (status, _) = d
        .call(
            "GET",
            &format!("/api/networkips/retrieve?id={id}"),
            OTHER_TOKEN,
            None,
        )
        .await;
    assert_eq!(status, 404, "another user's address is not found");
    let (status, page) = d
        .call("GET", "/api/networkips/browse", OTHER_TOKEN, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["items"], json!([]));

    // 100 concurrent allocations through the API: 100 distinct addresses.
    let requests = (0..100).map(|_| d.post("/api/networkips", json!({"items": [ip_request(&[])]})));
    let ids: Vec<String> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, 200, "{body}");
            body["responses"][0]["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut seen = HashSet::from([address]);
    for id in &ids {
        let ip = retrieve_ip(&d, id).await;
        let a: Ipv4Addr = ip["status"]["ipAddress"].as_str().unwrap().parse().unwrap();
        assert!(seen.insert(a), "{a} handed out twice");
    }
    assert_eq!(seen.len(), 101);

    // Paging through browse sees every address once.
    let mut listed = HashSet::new();
    let mut next: Option<String> = None;
    loop {
        let path = match &next {
            Some(n) => format!("/api/networkips/browse?itemsPerPage=40&next={n}"),
            None => "/api/networkips/browse?itemsPerPage=40".to_owned(),
        };
        let (status, page) = d.get(&path).await;
        assert_eq!(status, 200, "{page}");
        for item in page["items"].as_array().unwrap() {
            assert!(listed.insert(item["id"].as_str().unwrap().to_owned()));
        }
        match page["next"].as_str() {
            Some(n) => next = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed.len(), 101);
}

#[tokio::test]
async fn an_exhausted_pool_is_a_conflict_and_bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // 203.0.113.0/29: hosts .1-.6, gateway .1 → five addresses.
    let d = daemon(dir.path(), pool("203.0.113.0/29", "203.0.113.1", &[])).await;
    for _ in 0..4 {
        create_ip(&d, &[]).await;
    }
    let two = json!({"items": [ip_request(&[]), ip_request(&[])]});
    let (status, body) = d.post("/api/networkips", two).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["why"]
            .as_str()
            .unwrap()
            .contains("no more IP addresses"),
        "{body}"
    );
    create_ip(&d, &[]).await; // the last one is still there: the refused pair took nothing
    let (status, _) = d
        .post("/api/networkips", json!({"items": [ip_request(&[])]}))
        .await;
    assert_eq!(status, 409);

    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    for (bad, why) in [
        (
            json!({"items": [ip_request(&[(443, 80, "TCP")])]}),
            "ends before",
        ),
        (json!({"items": [ip_request(&[(70000, 70000, "TCP")])]}), ""),
        (json!({"items": [ip_request(&[(1, 2, "ICMP")])]}), ""),
        (
            json!({"items": [{"product": {"id": "nope", "category": "nope", "provider": "vmhost"}}]}),
            "unknown public IP product",
        ),
        (json!({"items": []}), "at least one"),
    ] {
        let (status, body) = d.post("/api/networkips", bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["why"].as_str().unwrap().contains(why), "{body}");
    }
    let (_, page) = d.get("/api/networkips/browse").await;
    assert_eq!(
        page["items"],
        json!([]),
        "refused requests allocated nothing"
    );
}

#[tokio::test]
async fn a_bound_address_gets_a_guarded_nic_and_is_released_at_terminate() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    let (ip_id, address) = create_ip(&d, &[(22, 22, "TCP")]).await;
    let job = d
        .create(job_with(json!([{"type": "network", "id": ip_id}])))
        .await;
    d.wait_state(&job, "RUNNING", 10).await;
    // The addresses are announced right after RUNNING is recorded.
    let attached = format!("Attached public IP {address}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let running = d.retrieve(&job).await;
        let statuses: Vec<&str> = running["updates"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|u| u["status"].as_str())
            .collect();
        let private = statuses
            .iter()
            .any(|s| s.contains("private address 10.213.0."));
        if statuses.contains(&attached.as_str()) && private {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{statuses:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        retrieve_ip(&d, &ip_id).await["status"]["boundTo"],
        json!([job])
    );

    // NIC 0 private, NIC 1 on the pool's bridge with the MAC of its address.
    let dom = domain(&d, &job, 0);
    assert_eq!(dom.spec.nics.len(), 2, "{:?}", dom.spec.nics);
    assert_eq!(
        dom.spec.nics[0].attachment,
        NicAttachment::Network("vmhost".into())
    );
    assert_eq!(
        dom.spec.nics[1].attachment,
        NicAttachment::Bridge("br-test".into())
    );
    let [a, b, c, e] = address.octets();
    assert_eq!(
        dom.spec.nics[1].mac,
        format!("52:54:{a:02x}:{b:02x}:{c:02x}:{e:02x}")
    );
    // The guest is told the same address, with the default route through the pool gateway.
    let network: Value = serde_yaml::from_str(&seed_file(&dom, "network-config")).unwrap();
    let public = &network["ethernets"]["nic1"];
    assert_eq!(public["addresses"], json!([format!("{address}/24")]));
    assert_eq!(public["routes"][0]["via"], "203.0.113.1");
    assert!(
        network["ethernets"]["nic0"].get("routes").is_none(),
        "{network}"
    );
    // The firewall guards the same MAC and address, with the open ports.
    let plan = d.firewall.current().unwrap();
    let vm = plan.vms.iter().find(|vm| vm.job_id == job).unwrap();
    assert_eq!(vm.owner, "alice");
    assert_eq!(vm.nics[1].mac, dom.spec.nics[1].mac);
    assert_eq!(vm.nics[1].tap, dom.spec.nics[1].tap);
    assert_eq!(vm.nics[1].address, address);
    let ssh = PortRange {
        start: 22,
        end: 22,
        protocol: Protocol::Tcp,
    };
    assert_eq!(guarded_ports(&d, &job), vec![ssh]);

    // In use: not deletable, not bindable by another job (which then does not exist).
    let (status, body) = d
        .call(
            "DELETE",
            "/api/networkips",
            TOKEN,
            Some(json!({"items": [{"id": ip_id}]})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(body["why"]
        .as_str()
        .unwrap()
        .contains(&format!("in use by job {job}")));
    let (status, body) = d
        .post(
            "/api/jobs",
            json!({"items": [job_with(json!([{"type": "network", "id": ip_id}]))]}),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (_, page) = d.get("/api/jobs/browse").await;
    assert_eq!(
        page["items"].as_array().unwrap().len(),
        1,
        "the refused job was not stored"
    );
    // Another user cannot use it at all.
    let (status, _) = d
        .call(
            "POST",
            "/api/jobs",
            OTHER_TOKEN,
            Some(json!({"items": [job_with(json!([{"type": "network", "id": ip_id}]))]})),
        )
        .await;
    assert_eq!(status, 400);

    // A firewall change reaches the running VM's rules at once.
    let web = json!({"start": 8000, "end": 8010, "protocol": "UDP"});
    let (status, body) = d
        .post(
            "/api/networkips/firewall",
            json!({"items": [{"id": ip_id, "firewall": {"openPorts": [web]}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        guarded_ports(&d, &job),
        vec![PortRange {
            start: 8000,
            end: 8010,
            protocol: Protocol::Udp
        }]
    );

    // Suspend keeps the binding; terminate releases it and removes the rules.
    job_call(&d, "suspend", &job, "SUSPENDED").await;
    assert_eq!(
        retrieve_ip(&d, &ip_id).await["status"]["boundTo"],
        json!([job])
    );
    job_call(&d, "terminate", &job, "SUCCESS").await;
    assert_eq!(
        retrieve_ip(&d, &ip_id).await["status"]["boundTo"],
        json!([])
    );
    let plan = d.firewall.current().unwrap();
    assert!(plan.vms.iter().all(|vm| vm.job_id != job), "{plan:?}");
    let (status, body) = d
        .call(
            "DELETE",
            "/api/networkips",
            TOKEN,
            Some(json!({"items": [{"id": ip_id}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = d.get(&format!("/api/networkips/retrieve?id={ip_id}")).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn peers_resolve_by_hostname_and_must_be_the_owners_running_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    let first = d.create(job_with(json!(null))).await;
    d.wait_state(&first, "RUNNING", 10).await;
    let first_address = domain(&d, &first, 0).spec.nics[0].mac.clone();

    let second = d
        .create(job_with(
            json!([{"type": "peer", "hostname": "alpha", "jobId": first}]),
        ))
        .await;
    d.wait_state(&second, "RUNNING", 10).await;
    let user_data = seed_file(&domain(&d, &second, 0), "user-data");
    let doc: Value = serde_yaml::from_str(&user_data).unwrap();
    let hosts = doc["write_files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/etc/hosts")
        .expect("an /etc/hosts entry");
    let line = hosts["content"].as_str().unwrap();
    let peer_ip: Ipv4Addr = line.split_whitespace().next().unwrap().parse().unwrap();
    let [_, _, c, e] = peer_ip.octets();
    assert!(
        first_address.ends_with(&format!("{c:02x}:{e:02x}")),
        "{line} vs {first_address}"
    );
    assert_eq!(line.trim_end(), format!("{peer_ip} alpha"));
    // Both VMs are guarded as the same owner's, so they may talk privately.
    let plan = d.firewall.current().unwrap();
    let owners: HashSet<&str> = plan.vms.iter().map(|vm| vm.owner.as_str()).collect();
    assert_eq!(owners, HashSet::from(["alice"]));

    // Another user's job, a job that is not running, and a bad hostname are refused.
    let (status, body) = d
        .call(
            "POST",
            "/api/jobs",
            OTHER_TOKEN,
            Some(json!({"items": [job_with(json!([{"type": "peer", "hostname": "a", "jobId": first}]))]})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    job_call(&d, "suspend", &first, "SUSPENDED").await;
    let (status, body) = d
        .post(
            "/api/jobs",
            json!({"items": [job_with(json!([{"type": "peer", "hostname": "a", "jobId": first}]))]}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["why"].as_str().unwrap().contains("is not running"),
        "{body}"
    );
    let (status, _) = d
        .post(
            "/api/jobs",
            json!({"items": [job_with(json!([{"type": "peer", "hostname": "-x", "jobId": second}]))]}),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn private_addresses_are_distinct_stable_and_leased_by_dhcp() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    let mut spec = job_with(json!(null));
    spec["replicas"] = json!(2);
    let job = d.create(spec).await;
    d.wait_state(&job, "RUNNING", 10).await;
    let macs: Vec<String> = (0..2)
        .map(|rank| domain(&d, &job, rank).spec.nics[0].mac.clone())
        .collect();
    assert_ne!(macs[0], macs[1]);
    let leases = d.fake.dhcp_hosts("vmhost");
    for mac in &macs {
        assert!(
            leases.iter().any(|l| &l.mac == mac),
            "{mac} not leased: {leases:?}"
        );
    }
    // Suspend and unsuspend: the same NIC comes back.
    job_call(&d, "suspend", &job, "SUSPENDED").await;
    job_call(&d, "unsuspend", &job, "RUNNING").await;
    assert_eq!(domain(&d, &job, 0).spec.nics[0].mac, macs[0]);
    // Terminate gives the leases back.
    job_call(&d, "terminate", &job, "SUCCESS").await;
    let leases = d.fake.dhcp_hosts("vmhost");
    assert!(leases.iter().all(|l| !macs.contains(&l.mac)), "{leases:?}");
}

#[tokio::test]
async fn products_report_the_firewall_and_peers() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    let (status, body) = d.get("/api/networkips/retrieveProducts").await;
    assert_eq!(status, 200);
    let item = &body["productsByProvider"]["vmhost"][0];
    assert_eq!(item["support"]["firewall"]["enabled"], true);
    assert_eq!(item["support"]["product"]["id"], "public-ip");
    let (_, body) = d.get("/api/jobs/retrieveProducts").await;
    assert_eq!(
        body["productsByProvider"]["vmhost"][0]["support"]["virtualMachine"]["peers"],
        true
    );
}

#[tokio::test]
async fn a_restarted_vmhost_installs_the_rules_of_existing_vms_again() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeBackend::default());
    let mut config = common::config(dir.path());
    config.private_network.enabled = true;
    config.public_pools = vec![pool("203.0.113.0/24", "203.0.113.1", &[])];
    let d = TestDaemon::start(config.clone(), fake.clone()).await;
    let (ip_id, address) = create_ip(&d, &[(22, 22, "TCP")]).await;
    let job = d
        .create(job_with(json!([{"type": "network", "id": ip_id}])))
        .await;
    d.wait_state(&job, "RUNNING", 10).await;
    d.kill();

    let d = TestDaemon::start(config, fake).await;
    let plan = d.firewall.current().expect("rules installed at start");
    let vm = plan
        .vms
        .iter()
        .find(|vm| vm.job_id == job)
        .expect("the VM is guarded");
    assert!(vm.nics.iter().any(|nic| nic.address == address), "{plan:?}");
    assert_eq!(
        retrieve_ip(&d, &ip_id).await["status"]["boundTo"],
        json!([job])
    );
}

#[tokio::test]
async fn an_expired_job_releases_its_public_ip() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    let (ip_id, _) = create_ip(&d, &[]).await;
    let mut spec = job_with(json!([{"type": "network", "id": ip_id}]));
    spec["timeAllocation"] = json!({"hours": 0, "minutes": 0, "seconds": 1});
    let job = d.create(spec).await;
    d.wait_state(&job, "EXPIRED", 10).await;
    assert_eq!(
        retrieve_ip(&d, &ip_id).await["status"]["boundTo"],
        json!([])
    );
    let plan = d.firewall.current().unwrap();
    assert!(plan.vms.is_empty(), "{plan:?}");
}

#[tokio::test]
async fn a_private_network_stopped_under_vmhost_is_started_again_for_the_next_vm() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    d.fake.simulate_network_stop("vmhost");
    let job = d.create(job_with(json!(null))).await;
    d.wait_state(&job, "RUNNING", 10).await;
    assert!(d.fake.networks()["vmhost"].active);
}

/// One address in two items of a create, or under a second name, is the request's mistake: a
/// 400 that names it, not a conflict with a job that never existed.
#[tokio::test]
async fn an_address_named_twice_in_one_create_is_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), pool("203.0.113.0/24", "203.0.113.1", &[])).await;
    let (ip_id, _) = create_ip(&d, &[]).await;
    let network = json!([{ "type": "network", "id": ip_id }]);
    let twice = json!({ "items": [job_with(network.clone()), job_with(network)] });
    let (status, body) = d.post("/api/jobs", twice).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["why"]
            .as_str()
            .unwrap()
            .contains("already attached to item 0"),
        "{body}"
    );
    let alias = json!([{ "type": "network", "id": format!("0{ip_id}") }]);
    let (status, body) = d
        .post("/api/jobs", json!({ "items": [job_with(alias)] }))
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, page) = d.get("/api/jobs/browse").await;
    assert_eq!(page["items"], json!([]), "no job was stored");
    assert_eq!(
        retrieve_ip(&d, &ip_id).await["status"]["boundTo"],
        json!([])
    );
}
