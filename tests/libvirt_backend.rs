//! `LibvirtBackend` against libvirt's in-process test driver (tier 7): real libvirt semantics,
//! no daemon and no QEMU. Each test opens `test:///<tempdir>/node.xml`, a private fresh state,
//! except the `list` test, which uses the shared `test:///default` (it has a foreign domain).
//! `ensure_defined` really runs `qemu-img` and writes files, so the whole path is exercised.

#[path = "common/libvirt.rs"]
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::{make_base_image, spec, test_driver_uri, unique_name, wait_event, TEST_AGENT};
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::{
    Accel, BackendError, BootMode, DomainOwner, PowerState, StopCause, VmBackend, VmEvent, VmSpec,
};

const EVENT_WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    dir: tempfile::TempDir,
    backend: LibvirtBackend,
    base: std::path::PathBuf,
}

async fn fixture() -> Fixture {
    common::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let uri = test_driver_uri(dir.path());
    let backend = LibvirtBackend::connect(&uri)
        .await
        .expect("connect to the test driver");
    let base = dir.path().join("images/base.raw");
    make_base_image(&base, 16);
    Fixture { dir, backend, base }
}

impl Fixture {
    fn spec(&self, name: &str) -> VmSpec {
        spec(
            self.dir.path(),
            name,
            &self.base,
            Accel::Tcg,
            BootMode::Disk,
        )
    }
}

fn backing_file(overlay: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(overlay)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["backing-filename"]
        .as_str()
        .expect("backing file")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn define_start_shutdown_remove_round_trip() {
    let f = fixture().await;
    let s = f.spec(&unique_name("vmhost-test-life-"));
    let mut events = f.backend.subscribe();

    f.backend.ensure_defined(&s).await.expect("define");
    assert_eq!(
        f.backend.state(&s.name).await.expect("state"),
        Some(PowerState::ShutOff)
    );
    assert_eq!(
        Some(std::fs::read(&s.seed_path).expect("seed")),
        s.seed_image
    );
    let seed_mode = std::fs::metadata(&s.seed_path).expect("stat").mode() & 0o777;
    assert_eq!(seed_mode, 0o644);
    assert_eq!(backing_file(&s.overlay), f.base.to_str().expect("utf-8"));

    f.backend.start(&s.name).await.expect("start");
    f.backend
        .start(&s.name)
        .await
        .expect("start again is a no-op");
    assert_eq!(
        f.backend.state(&s.name).await.expect("state"),
        Some(PowerState::Running)
    );
    let ev = wait_event(&mut events, EVENT_WAIT, |e| e.name() == s.name).await;
    assert_eq!(
        ev,
        VmEvent::Started {
            name: s.name.clone()
        }
    );

    // test:/// refuses the ACPI flag; the backend falls back to a plain shutdown.
    f.backend.shutdown(&s.name).await.expect("shutdown");
    let ev = wait_event(&mut events, EVENT_WAIT, |e| {
        matches!(e, VmEvent::Stopped { .. })
    })
    .await;
    assert_eq!(
        ev,
        VmEvent::Stopped {
            name: s.name.clone(),
            cause: StopCause::GuestShutdown
        }
    );
    assert_eq!(
        f.backend.state(&s.name).await.expect("state"),
        Some(PowerState::ShutOff)
    );
    f.backend
        .shutdown(&s.name)
        .await
        .expect("shutdown of a stopped domain is a no-op");

    std::fs::write(&s.console_log, b"boot log").expect("fake console log");
    f.backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove");
    let ev = wait_event(&mut events, EVENT_WAIT, |e| {
        matches!(e, VmEvent::Undefined { .. })
    })
    .await;
    assert_eq!(
        ev,
        VmEvent::Undefined {
            name: s.name.clone()
        }
    );
    assert_eq!(f.backend.state(&s.name).await.expect("state"), None);
    for file in s.files().all() {
        assert!(!file.exists(), "{} still exists", file.display());
    }
    f.backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove again is a no-op");
}

#[tokio::test(flavor = "multi_thread")]
async fn destroy_reports_destroyed_and_remove_stops_a_running_domain() {
    let f = fixture().await;
    let s = f.spec(&unique_name("vmhost-test-destroy-"));
    let mut events = f.backend.subscribe();
    f.backend.ensure_defined(&s).await.expect("define");
    f.backend.start(&s.name).await.expect("start");
    f.backend.destroy(&s.name).await.expect("destroy");
    let ev = wait_event(&mut events, EVENT_WAIT, |e| {
        matches!(e, VmEvent::Stopped { .. })
    })
    .await;
    assert_eq!(
        ev,
        VmEvent::Stopped {
            name: s.name.clone(),
            cause: StopCause::Destroyed
        }
    );
    f.backend
        .destroy(&s.name)
        .await
        .expect("destroy of a stopped domain is a no-op");

    f.backend.start(&s.name).await.expect("start again");
    f.backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove a running domain");
    assert_eq!(f.backend.state(&s.name).await.expect("state"), None);
    assert!(!s.overlay.exists() && !s.seed_path.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_defined_twice_is_idempotent() {
    let f = fixture().await;
    let s = f.spec(&unique_name("vmhost-test-idem-"));
    f.backend.ensure_defined(&s).await.expect("first define");
    let inode = std::fs::metadata(&s.overlay).expect("overlay").ino();
    f.backend.ensure_defined(&s).await.expect("second define");
    assert_eq!(
        std::fs::metadata(&s.overlay).expect("overlay").ino(),
        inode,
        "overlay kept"
    );
    let listed = f.backend.list("vmhost-test-idem-").await.expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_defined_keeps_a_matching_overlay_and_replaces_a_stale_one() {
    let f = fixture().await;
    let good = f.spec(&unique_name("vmhost-test-reuse-"));
    std::fs::create_dir_all(good.overlay.parent().expect("parent")).expect("mkdir");
    let created = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .args([&f.base, &good.overlay])
        .arg("1G")
        .status()
        .expect("qemu-img");
    assert!(created.success());
    let inode = std::fs::metadata(&good.overlay).expect("overlay").ino();
    f.backend
        .ensure_defined(&good)
        .await
        .expect("define with leftover overlay");
    assert_eq!(
        std::fs::metadata(&good.overlay).expect("overlay").ino(),
        inode
    );

    let stale = f.spec(&unique_name("vmhost-test-stale-"));
    std::fs::create_dir_all(stale.overlay.parent().expect("parent")).expect("mkdir");
    std::fs::write(&stale.overlay, b"not a qcow2 image").expect("write junk");
    f.backend
        .ensure_defined(&stale)
        .await
        .expect("define with stale overlay");
    assert_eq!(
        backing_file(&stale.overlay),
        f.base.to_str().expect("utf-8")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_defined_with_missing_base_leaves_nothing_behind() {
    let f = fixture().await;
    let mut s = f.spec(&unique_name("vmhost-test-fail-"));
    s.base_image = f.dir.path().join("images/missing.raw");
    let err = f
        .backend
        .ensure_defined(&s)
        .await
        .expect_err("define must fail");
    assert!(matches!(err, BackendError::Disk { .. }), "{err:?}");
    let chain = error_chain(&err);
    assert!(
        chain.contains("missing.raw"),
        "qemu-img stderr is in the chain: {chain}"
    );
    assert!(!s.overlay.exists(), "overlay left behind");
    assert!(!s.seed_path.exists(), "seed left behind");
    assert!(
        !s.overlay.parent().expect("parent").exists(),
        "job directory left behind"
    );
    assert_eq!(f.backend.state(&s.name).await.expect("state"), None);
    assert!(f.backend.list("").await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn list_returns_only_prefixed_domains_with_their_owner() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The shared default state has a foreign domain named "test" without vmhost metadata.
    let backend = LibvirtBackend::connect("test:///default")
        .await
        .expect("connect");
    let base = dir.path().join("base.raw");
    make_base_image(&base, 16);
    let prefix = unique_name("vmhost-test-list-");
    let mine = [format!("{prefix}-a"), format!("{prefix}-b&'<\">")];
    let other = unique_name("other-");
    let mut defined = Vec::new();
    for (rank, name) in (0u32..).zip(mine.iter().chain([&other])) {
        let mut s = spec(dir.path(), name, &base, Accel::Kvm, BootMode::Disk);
        s.rank = rank;
        s.job_id = format!("job \"{rank}\" & <co>");
        s.nics = vec![vmhost::backend::NicSpec {
            attachment: vmhost::backend::NicAttachment::Network("default".to_owned()),
            mac: format!("52:54:00:00:10:{rank:02x}"),
            tap: format!("vhtest{rank}"),
        }];
        backend.ensure_defined(&s).await.expect("define");
        defined.push(s);
    }
    backend.start(&mine[1]).await.expect("start");

    let listed = backend.list(&prefix).await.expect("list");
    let names: Vec<_> = listed.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, [mine[0].as_str(), mine[1].as_str()]);
    for (rank, d) in (0u32..).zip(&listed) {
        let owner = DomainOwner {
            agent_id: TEST_AGENT.to_owned(),
            job_id: format!("job \"{rank}\" & <co>"),
            rank,
        };
        assert_eq!(d.owner.as_ref(), Some(&owner));
    }
    assert_eq!(listed[0].state, PowerState::ShutOff);
    assert_eq!(listed[1].state, PowerState::Running);

    let all = backend.list("").await.expect("list all");
    let foreign = all
        .iter()
        .find(|d| d.name == "test")
        .expect("the driver's own domain");
    assert_eq!(foreign.owner, None);

    // Removing under another owner's name leaves the domain (and its state) alone.
    let mut stranger = defined[1].owner();
    stranger.agent_id = "another-vmhost".to_owned();
    backend
        .remove(&mine[1], &stranger, &defined[1].files())
        .await
        .expect("remove refuses quietly");
    let state = backend.state(&mine[1]).await.expect("state");
    assert_eq!(
        state,
        Some(PowerState::Running),
        "another owner's domain was touched"
    );
    for s in &defined {
        backend
            .remove(&s.name, &s.owner(), &s.files())
            .await
            .expect("remove");
    }
    assert!(backend.list(&prefix).await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_domains_are_reported_or_ignored_as_documented() {
    let f = fixture().await;
    let s = f.spec("vmhost-test-absent");
    assert!(matches!(
        f.backend.start(&s.name).await,
        Err(BackendError::NoSuchDomain { .. })
    ));
    assert!(matches!(
        f.backend.shutdown(&s.name).await,
        Err(BackendError::NoSuchDomain { .. })
    ));
    f.backend
        .destroy(&s.name)
        .await
        .expect("destroy of a missing domain");
    f.backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove of a missing domain");
    assert_eq!(f.backend.state(&s.name).await.expect("state"), None);
}

/// The kind of a console error, for assertions (a `ConsoleStream` is not `Debug`).
fn console_error(r: Result<vmhost::backend::ConsoleStream, BackendError>) -> BackendError {
    match r {
        Ok(_) => panic!("the test driver opened a console"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn consoles_are_unsupported_on_the_test_driver_and_checked_first() {
    let f = fixture().await;
    let missing = "vmhost-test-console-absent";
    for r in [
        f.backend.open_vnc(missing).await,
        f.backend.open_serial(missing).await,
    ] {
        let e = console_error(r);
        assert!(matches!(e, BackendError::NoSuchDomain { .. }), "{e:?}");
    }

    let s = f.spec(&unique_name("vmhost-test-console-"));
    f.backend.ensure_defined(&s).await.expect("define");
    for r in [
        f.backend.open_vnc(&s.name).await,
        f.backend.open_serial(&s.name).await,
    ] {
        let e = console_error(r);
        assert!(
            matches!(&e, BackendError::NotRunning { name } if *name == s.name),
            "{e:?}"
        );
    }

    f.backend.start(&s.name).await.expect("start");
    let e = console_error(f.backend.open_vnc(&s.name).await);
    assert!(
        matches!(e, BackendError::NotSupported { op: "open_vnc" }),
        "{e:?}"
    );
    let e = console_error(f.backend.open_serial(&s.name).await);
    assert!(
        matches!(e, BackendError::NotSupported { op: "open_serial" }),
        "{e:?}"
    );
    f.backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove");
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_defined_refuses_a_foreign_domain_with_the_same_name() {
    let f = fixture().await;
    let s = f.spec(&unique_name("vmhost-test-owner-"));
    f.backend.ensure_defined(&s).await.expect("define");
    let mut other_job = s.clone();
    other_job.job_id = "someone-else".to_owned();
    let err = f
        .backend
        .ensure_defined(&other_job)
        .await
        .expect_err("must refuse");
    assert!(
        matches!(err, BackendError::Hypervisor { op: "define", .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ensure_defined_redefines_a_domain_that_lost_its_files() {
    let f = fixture().await;
    let s = f.spec(&unique_name("vmhost-test-lost-"));
    f.backend.ensure_defined(&s).await.expect("define");
    std::fs::remove_file(&s.overlay).expect("rm overlay");
    f.backend.ensure_defined(&s).await.expect("define again");
    assert!(s.overlay.exists() && s.seed_path.exists());
    assert_eq!(
        f.backend.state(&s.name).await.expect("state"),
        Some(PowerState::ShutOff)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn host_info_reports_the_node() {
    let f = fixture().await;
    let info = f.backend.host_info().await.expect("host info");
    assert_eq!(info.cpus, 4);
    assert_eq!(info.memory_mib, 8192);
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_to_a_missing_daemon_is_unavailable() {
    let err = LibvirtBackend::connect("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
        .await
        .expect_err("must fail");
    assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
    assert!(vmhost::backend::libvirt::libvirt_version()
        .expect("version")
        .starts_with(|c: char| c.is_ascii_digit()));
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_ensure_defined_of_one_vm_defines_it_once() {
    let f = fixture().await;
    let s = f.spec(&unique_name("vmhost-test-conc-"));
    let calls = (0..4).map(|_| {
        let (b, s) = (f.backend.clone(), s.clone());
        tokio::spawn(async move { b.ensure_defined(&s).await })
    });
    for r in futures::future::join_all(calls).await {
        r.expect("join").expect("define");
    }
    assert!(s.overlay.exists() && s.seed_path.exists());
    assert_eq!(
        f.backend
            .list("vmhost-test-conc-")
            .await
            .expect("list")
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_the_daemon_restarts() {
    common::init_tracing();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = match common::PrivateDaemon::start(&dir.path().join("daemon")) {
        Ok(d) => d,
        Err(reason) => {
            eprintln!("skipping the reconnect test: {reason}");
            return;
        }
    };
    daemon.wait_ready().await;
    let backend = LibvirtBackend::connect(&daemon.uri())
        .await
        .expect("connect");
    let mut events = backend.subscribe();
    backend.host_info().await.expect("host info while up");

    daemon.kill();
    // The close callback (or the failing call) marks the link dead; reconnecting fails.
    let down = async {
        loop {
            match backend.host_info().await {
                Err(BackendError::Unavailable { .. }) => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("unexpected error while the daemon is down: {e:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), down)
        .await
        .expect("never unavailable");

    daemon.restart();
    daemon.wait_ready().await;
    let up = async {
        while backend.host_info().await.is_err() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), up)
        .await
        .expect("never reconnected");

    // Events flow again on the same subscription through the new connection.
    let base = dir.path().join("base.raw");
    make_base_image(&base, 16);
    let s = spec(
        dir.path(),
        &unique_name("vmhost-test-reconn-"),
        &base,
        Accel::Tcg,
        BootMode::Disk,
    );
    backend
        .ensure_defined(&s)
        .await
        .expect("define after reconnect");
    backend.start(&s.name).await.expect("start after reconnect");
    let ev = wait_event(&mut events, EVENT_WAIT, |e| e.name() == s.name).await;
    assert_eq!(
        ev,
        VmEvent::Started {
            name: s.name.clone()
        }
    );
    backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove");
}

// ---- the private network (on the shared `test:///default`, so a second, raw connection can
// look at and tamper with what the backend did; every name is unique to the test) ----

mod network {
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicU32, Ordering};

    use vmhost::backend::libvirt::network_xml::{self, HostEntry, NetworkInfo};
    use vmhost::backend::libvirt::LibvirtBackend;
    use vmhost::backend::{BackendError, DhcpHost, PrivateNetworkSpec, VmBackend};

    use super::common::{init_tracing, unique_name};

    const SHARED: &str = "test:///default";

    struct Net {
        backend: LibvirtBackend,
        /// A raw connection to the same state, for looking and tampering.
        raw: virt::connect::Connect,
        spec: PrivateNetworkSpec,
    }

    impl Net {
        async fn new() -> Net {
            init_tracing();
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::SeqCst);
            let backend = LibvirtBackend::connect(SHARED).await.expect("connect");
            let raw = virt::connect::Connect::open(Some(SHARED)).expect("raw connect");
            let third = u8::try_from(n % 200).expect("small");
            let spec = PrivateNetworkSpec {
                name: unique_name("vmhost-test-net-"),
                // At most 15 bytes: "vht" + up to 7 pid digits + the counter.
                bridge: format!("vht{}x{n}", std::process::id() % 10_000_000),
                gateway: Ipv4Addr::new(10, 250, third, 1),
                prefix_len: 24,
            };
            Net { backend, raw, spec }
        }

        fn network(&self) -> virt::network::Network {
            self.raw
                .lookup_network_by_name(&self.spec.name)
                .expect("the network exists")
        }

        fn info(&self) -> NetworkInfo {
            network_xml::parse(&self.network().xml_desc(0).expect("xml"))
        }

        fn lease(&self, mac_last: u8, last: u8, name: &str) -> DhcpHost {
            let [a, b, c, _] = self.spec.gateway.octets();
            DhcpHost {
                mac: format!("52:54:00:fa:00:{mac_last:02x}"),
                address: Ipv4Addr::new(a, b, c, last),
                hostname: name.to_owned(),
            }
        }

        fn entries(&self) -> Vec<HostEntry> {
            self.info().hosts
        }
    }

    impl Drop for Net {
        fn drop(&mut self) {
            if let Ok(n) = self.raw.lookup_network_by_name(&self.spec.name) {
                let _ = n.destroy();
                let _ = n.undefine();
            }
        }
    }

    fn entry(h: &DhcpHost) -> HostEntry {
        HostEntry {
            mac: h.mac.clone(),
            ip: Some(h.address),
            name: Some(h.hostname.clone()),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn ensure_network_defines_starts_and_is_idempotent() {
        let t = Net::new().await;
        t.backend.ensure_network(&t.spec).await.expect("create");
        let n = t.network();
        assert!(n.is_active().expect("active"));
        assert!(n.is_persistent().expect("persistent"));
        assert!(n.autostart().expect("autostart"));
        assert_eq!(n.bridge_name().expect("bridge"), t.spec.bridge);
        let info = t.info();
        assert_eq!(network_xml::mismatch(&t.spec, &info), None, "{info:?}");
        assert!(info.hosts.is_empty());
        let uuid = n.uuid_string().expect("uuid");

        t.backend.ensure_network(&t.spec).await.expect("again");
        assert_eq!(
            t.network().uuid_string().expect("uuid"),
            uuid,
            "not redefined"
        );

        // After a libvirtd or host restart the persistent network is defined but inactive,
        // and autostart may have been turned off by an operator.
        n.destroy().expect("stop it");
        n.set_autostart(false).expect("autostart off");
        assert!(!t.network().is_active().expect("active"));
        t.backend.ensure_network(&t.spec).await.expect("start it");
        assert!(t.network().is_active().expect("active"));
        assert!(t.network().autostart().expect("autostart"));
        assert_eq!(t.network().uuid_string().expect("uuid"), uuid);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn ensure_network_refuses_a_network_with_another_config() {
        let t = Net::new().await;
        let [a, b, c, _] = t.spec.gateway.octets();
        let cases = [
            (
                format!(
                    "<forward mode='nat'/><bridge name='{}y'/><ip address='{}' prefix='24'/>",
                    &t.spec.bridge[..t.spec.bridge.len().min(14)],
                    t.spec.gateway
                ),
                "bridge is",
            ),
            (
                format!(
                    "<forward mode='nat'/><bridge name='{}'/><ip address='{}' prefix='16'/>",
                    t.spec.bridge, t.spec.gateway
                ),
                "/16",
            ),
            (
                format!(
                    "<forward mode='nat'/><bridge name='{}'/>\
                     <ip address='{a}.{b}.{c}.254' netmask='255.255.255.0'/>",
                    t.spec.bridge
                ),
                ".254/24",
            ),
            (
                format!(
                    "<bridge name='{}'/><ip address='{}' prefix='24'/>",
                    t.spec.bridge, t.spec.gateway
                ),
                "isolated",
            ),
        ];
        for (body, needle) in cases {
            let xml = format!("<network><name>{}</name>{body}</network>", t.spec.name);
            let n = t.raw.define_network_xml(&xml).expect("define theirs");
            n.create().expect("start theirs");
            let before = n.xml_desc(0).expect("xml");
            let e = t
                .backend
                .ensure_network(&t.spec)
                .await
                .expect_err("refused");
            match &e {
                BackendError::NetworkMismatch { name, detail } => {
                    assert_eq!(name, &t.spec.name);
                    assert!(detail.contains(needle), "{needle:?} not in {detail:?}");
                }
                other => panic!("expected a mismatch, got {other:?}"),
            }
            assert_eq!(
                t.network().xml_desc(0).expect("xml"),
                before,
                "never changed"
            );
            n.destroy().expect("destroy");
            n.undefine().expect("undefine");
        }

        let mut bad = t.spec.clone();
        bad.bridge = "sixteen-bytes-xx".to_owned();
        let e = t.backend.ensure_network(&bad).await.expect_err("invalid");
        assert!(matches!(e, BackendError::Network { .. }), "{e:?}");
        assert!(t.raw.lookup_network_by_name(&t.spec.name).is_err());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn dhcp_hosts_are_put_replaced_and_removed_idempotently() {
        let t = Net::new().await;
        let net = t.spec.name.as_str();
        let a = t.lease(0x10, 10, "job-a");
        let e = t
            .backend
            .put_dhcp_host(net, &a)
            .await
            .expect_err("no network yet");
        assert!(
            matches!(&e, BackendError::NoSuchNetwork { name } if name == net),
            "{e:?}"
        );
        let e = t
            .backend
            .remove_dhcp_host(net, &a.mac)
            .await
            .expect_err("no network yet");
        assert!(matches!(&e, BackendError::NoSuchNetwork { .. }), "{e:?}");

        t.backend.ensure_network(&t.spec).await.expect("network");
        t.backend.put_dhcp_host(net, &a).await.expect("add");
        t.backend.put_dhcp_host(net, &a).await.expect("add again");
        let b = t.lease(0x11, 11, "job-b");
        t.backend.put_dhcp_host(net, &b).await.expect("add b");
        assert_eq!(t.entries(), [entry(&a), entry(&b)]);

        // Same MAC (in another case), new address and name: replaced in place.
        let mut a2 = t.lease(0x10, 20, "job-a2");
        a2.mac = a2.mac.to_uppercase();
        t.backend.put_dhcp_host(net, &a2).await.expect("replace");
        let mut a2_stored = entry(&a2);
        a2_stored.mac = a.mac.clone(); // stored lowercase
        assert_eq!(t.entries(), [a2_stored.clone(), entry(&b)]);

        // Another MAC may not take b's address or name, nor use a non-guest address.
        for (h, needle) in [
            (t.lease(0x12, 11, "job-c"), "is leased to 52:54:00:fa:00:11"),
            (t.lease(0x12, 12, "job-b"), "hostname job-b is leased"),
            (t.lease(0x12, 1, "job-c"), "not a guest address"),
            (t.lease(0x12, 12, "a,b"), "hostname"),
        ] {
            let e = t.backend.put_dhcp_host(net, &h).await.expect_err("refused");
            let text = format!("{e}: {:?}", std::error::Error::source(&e));
            assert!(matches!(e, BackendError::Network { .. }), "{text}");
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
        assert_eq!(t.entries(), [a2_stored, entry(&b)]);

        t.backend
            .remove_dhcp_host(net, &a.mac)
            .await
            .expect("remove");
        t.backend
            .remove_dhcp_host(net, &a.mac)
            .await
            .expect("remove again");
        assert_eq!(t.entries(), [entry(&b)]);

        // On a stopped network a lease goes into the definition and is there once it runs.
        // (The test driver then keeps a stale persistent definition without it, which it does
        // not show: removing it must still work. qemu_system checks the real driver.)
        t.network().destroy().expect("stop");
        let c = t.lease(0x12, 12, "job-c");
        t.backend
            .put_dhcp_host(net, &c)
            .await
            .expect("add while stopped");
        t.backend.ensure_network(&t.spec).await.expect("start");
        assert_eq!(t.entries(), [entry(&b), entry(&c)]);
        t.backend
            .remove_dhcp_host(net, &b.mac)
            .await
            .expect("remove b");
        t.backend
            .remove_dhcp_host(net, &c.mac)
            .await
            .expect("remove c");
        t.backend
            .remove_dhcp_host(net, &c.mac)
            .await
            .expect("remove c again");
        assert!(t.entries().is_empty());
        // And put again: the live view lacks it, the stale persistent one may not.
        t.backend.put_dhcp_host(net, &c).await.expect("add c again");
        assert_eq!(t.entries(), [entry(&c)]);
    }
}
