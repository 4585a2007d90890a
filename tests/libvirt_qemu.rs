//! `LibvirtBackend` on the real `qemu:///system` with TCG (tier 8): boots a tiny guest.
//!
//! Runs when libvirtd's socket exists. Locally `VMHOST_SKIP_REAL_VM=1` skips it (with a
//! message); under `CI` it always runs and a missing libvirtd is a failure.
//!
//! Guests, booted one after the other (each: define, start, Started event, console output,
//! destroy, Stopped{Destroyed} event, remove, nothing left):
//! 1. `/var/lib/vmhost/images/busybox-tiny/{vmlinuz,initrd.img}` (the project's test image),
//!    when it has been built;
//! 2. the newest `/boot/vmlinuz-*` (Debian `linux-image-cloud-amd64`) with an initramfs built
//!    here from `/bin/busybox` (busybox-static) that prints a marker and powers off on the ACPI
//!    power button: this one also checks `shutdown` → Stopped{GuestShutdown};
//! 3. only if neither exists: a firmware-only boot of a blank disk (QEMU runs, the console log
//!    is created but stays quiet).
//!
//! A second test boots the busybox-tiny image (required under CI) for the consoles:
//! `open_vnc` (RFB 3.8 handshake with security None, ServerInit, a full FramebufferUpdate) and
//! `open_serial` (a shell round trip, FORCE re-attach ending the older session, the bridge
//! threads ending when a session is dropped or the domain is destroyed), and `NotRunning` for a
//! shut-off domain.
//!
//! The private network (root, `ip` and `/bin/busybox` needed; required where real VMs are):
//! - `ensure_network` creates the bridge with the gateway address and a dnsmasq; a lease put
//!   with `put_dhcp_host` is in dnsmasq's hosts file, and `busybox udhcpc` in a network
//!   namespace whose veth is on the bridge gets exactly the fixed address (and the gateway
//!   resolves the lease's hostname), an unlisted MAC gets no lease, a replaced lease is
//!   served live, a removed one is gone; a lease put while the network is stopped is served
//!   after `ensure_network` starts it again;
//! - a busybox-tiny domain with a `Network` and a `Bridge` NIC runs with vmhost's tap names,
//!   each enslaved to its bridge.
//!
//! Domains are named `vmhost-test-qemu-<pid>-…` and stamped with job `pid-<pid>`; networks
//! `vmhost-test-pnet-<pid>-…`, namespaces `vmhost-test-ns-<pid>-…`, bridges `vhr<pid>`/`vhb<pid>…`,
//! on a free 10.250.x.0/24. Leftovers of earlier runs whose process is gone are removed
//! first. Nothing else is touched, and test traffic stays on the test's own bridge.

#[path = "common/libvirt.rs"]
mod common;
#[path = "common/net.rs"]
mod net;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{busybox_initramfs, host_kernel, make_base_image, spec, unique_name, wait_event};
use vmhost::backend::libvirt::{network_xml, LibvirtBackend};
use vmhost::backend::{
    Accel, BackendError, BootMode, DhcpHost, NicAttachment, NicSpec, PowerState,
    PrivateNetworkSpec, StopCause, VmBackend, VmEvent, VmFiles,
};

const URI: &str = "qemu:///system";
const SOCKET: &str = "/var/run/libvirt/libvirt-sock";
const PREFIX: &str = "vmhost-test-qemu-";
const TEST_IMAGE: &str = "/var/lib/vmhost/images/busybox-tiny";

/// `Some(reason)` when the test must be skipped.
fn skip_reason() -> Option<String> {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false");
    if !ci && std::env::var_os("VMHOST_SKIP_REAL_VM").is_some() {
        return Some("VMHOST_SKIP_REAL_VM is set".to_owned());
    }
    if !Path::new(SOCKET).exists() {
        assert!(
            !ci,
            "libvirtd must run in CI ({SOCKET} is missing): start virtlogd -d; libvirtd -d"
        );
        return Some(format!(
            "{SOCKET} does not exist (start virtlogd -d; libvirtd -d)"
        ));
    }
    None
}

enum Guest {
    /// The project's busybox test image: boots, output unknown.
    TestImage,
    /// Our own initramfs: prints the marker and powers off on ACPI.
    OwnInitramfs,
    /// No kernel found: firmware only.
    Firmware,
}

/// The guests this machine can boot. Kernels and initrds are copied into `dir` (libvirt
/// relabels them while the VM runs, and system files must not be touched).
fn guests(dir: &Path) -> Vec<(Guest, BootMode)> {
    let cmdline = "console=ttyS0 panic=-1".to_owned();
    let mut out = Vec::new();
    let image = Path::new(TEST_IMAGE);
    if image.join("vmlinuz").exists() && image.join("initrd.img").exists() {
        let (kernel, initrd) = (dir.join("image-vmlinuz"), dir.join("image-initrd.img"));
        std::fs::copy(image.join("vmlinuz"), &kernel).expect("copy kernel");
        std::fs::copy(image.join("initrd.img"), &initrd).expect("copy initrd");
        out.push((
            Guest::TestImage,
            BootMode::Kernel {
                kernel,
                initrd,
                cmdline: cmdline.clone(),
            },
        ));
    } else {
        eprintln!("{TEST_IMAGE} is not built: not booting the project's test image");
    }
    match host_kernel().and_then(|hk| Some((busybox_initramfs(&hk.modules)?, hk))) {
        Some((cpio, hk)) => {
            let (kernel, initrd) = (dir.join("own-vmlinuz"), dir.join("own-initrd.img"));
            std::fs::copy(&hk.vmlinuz, &kernel).expect("copy kernel");
            std::fs::write(&initrd, cpio).expect("write initramfs");
            out.push((
                Guest::OwnInitramfs,
                BootMode::Kernel {
                    kernel,
                    initrd,
                    cmdline,
                },
            ));
        }
        None => eprintln!("no /boot/vmlinuz-* or /bin/busybox: not checking ACPI shutdown"),
    }
    if out.is_empty() {
        out.push((Guest::Firmware, BootMode::Disk));
    }
    out
}

/// Removes domains of earlier runs of this test whose process no longer exists.
async fn remove_leftovers(backend: &LibvirtBackend) {
    for d in backend.list(PREFIX).await.expect("list leftovers") {
        let Some(owner) = &d.owner else { continue };
        let pid = owner
            .job_id
            .strip_prefix("pid-")
            .and_then(|p| p.parse::<u32>().ok());
        let Some(pid) = pid else { continue };
        if owner.agent_id != common::TEST_AGENT || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let gone = PathBuf::from("/nonexistent/vmhost-test-leftover");
        let files = VmFiles {
            overlay: gone.clone(),
            seed: gone.clone(),
            console_log: gone,
        };
        backend
            .remove(&d.name, owner, &files)
            .await
            .expect("remove leftover");
    }
}

/// Polls the console log until it contains `needle` (or, with `None`, is non-empty).
async fn wait_console(log: &Path, needle: Option<&str>, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let text = std::fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned());
        let text = text.unwrap_or_default();
        let done = match needle {
            Some(n) => text.contains(n),
            None => !text.is_empty(),
        };
        if done {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "console log {} lacks {needle:?}: {text}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_qemu_tcg_guest_lifecycle() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the real-QEMU test: {reason}");
        return;
    }
    common::init_tracing();
    let t0 = Instant::now();
    let (dir, backend) = qemu_test_setup().await;

    let base = dir.path().join("base.raw");
    make_base_image(&base, 16);
    for (guest, boot) in guests(dir.path()) {
        let s = spec(dir.path(), &unique_name(PREFIX), &base, Accel::Tcg, boot);
        let outcome = tokio::spawn(lifecycle(backend.clone(), s.clone(), guest)).await;
        // Clean up even when the body failed.
        backend
            .remove(&s.name, &s.owner(), &s.files())
            .await
            .expect("remove");
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
        assert_eq!(backend.state(&s.name).await.expect("state"), None);
        for f in s.files().all() {
            assert!(!f.exists(), "{} left behind", f.display());
        }
    }
    eprintln!("real-QEMU lifecycle took {:?}", t0.elapsed());
}

async fn lifecycle(backend: LibvirtBackend, s: vmhost::backend::VmSpec, guest: Guest) {
    let boot_wait = Duration::from_secs(120);
    let mut events = backend.subscribe();
    backend.ensure_defined(&s).await.expect("define");
    backend
        .ensure_defined(&s)
        .await
        .expect("define is idempotent");
    assert_eq!(
        backend.state(&s.name).await.expect("state"),
        Some(PowerState::ShutOff)
    );

    backend.start(&s.name).await.expect("start");
    let ev = wait_event(&mut events, Duration::from_secs(30), |e| e.name() == s.name).await;
    assert_eq!(
        ev,
        VmEvent::Started {
            name: s.name.clone()
        }
    );
    assert_eq!(
        backend.state(&s.name).await.expect("state"),
        Some(PowerState::Running)
    );

    match guest {
        Guest::OwnInitramfs => {
            wait_console(&s.console_log, Some(common::GUEST_UP), boot_wait).await;
            // The guest's acpid powers it off on the ACPI power button. The marker can come
            // before acpid listens, and a press then is lost: press again every few seconds,
            // as vmhost's suspend does.
            let stopped = |e: &VmEvent| e.name() == s.name && matches!(e, VmEvent::Stopped { .. });
            let deadline = tokio::time::Instant::now() + boot_wait;
            let ev = loop {
                backend.shutdown(&s.name).await.expect("shutdown");
                let press =
                    async { wait_event(&mut events, Duration::from_secs(3600), stopped).await };
                if let Ok(ev) = tokio::time::timeout(Duration::from_secs(3), press).await {
                    break ev;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the guest ignored the power button"
                );
            };
            assert_eq!(
                ev,
                VmEvent::Stopped {
                    name: s.name.clone(),
                    cause: StopCause::GuestShutdown
                }
            );
            backend.start(&s.name).await.expect("start again");
        }
        Guest::TestImage => {
            // The image records the line its init prints in build-info.txt (`banner=`).
            let info = std::fs::read_to_string(Path::new(TEST_IMAGE).join("build-info.txt"));
            let banner = info.ok().and_then(|i| {
                i.lines()
                    .find_map(|l| l.strip_prefix("banner=").map(str::to_owned))
            });
            wait_console(&s.console_log, banner.as_deref(), boot_wait).await;
        }
        Guest::Firmware => {
            eprintln!("no kernel found: checking a firmware-only boot");
            // virtlogd creates the log when QEMU starts, even if the guest prints nothing.
            assert!(
                s.console_log.exists(),
                "virtlogd did not create the console log"
            );
        }
    }

    backend.destroy(&s.name).await.expect("destroy");
    let stopped = |e: &VmEvent| e.name() == s.name && matches!(e, VmEvent::Stopped { .. });
    let ev = wait_event(&mut events, Duration::from_secs(30), stopped).await;
    assert_eq!(
        ev,
        VmEvent::Stopped {
            name: s.name.clone(),
            cause: StopCause::Destroyed
        }
    );
    assert_eq!(
        backend.state(&s.name).await.expect("state"),
        Some(PowerState::ShutOff)
    );

    let listed = backend.list(&s.name).await.expect("list");
    assert_eq!(listed.len(), 1);
    let owner = listed[0]
        .owner
        .as_ref()
        .expect("owner stamp survives libvirt");
    assert_eq!(
        (owner.job_id.as_str(), owner.rank),
        (s.job_id.as_str(), s.rank)
    );
}

/// Whether the project's test image is here; fails instead of skipping where it must exist.
/// A directory QEMU (running as libvirt-qemu) can traverse, and a connection, after removing
/// what dead earlier runs left behind.
async fn qemu_test_setup() -> (tempfile::TempDir, LibvirtBackend) {
    let dir = tempfile::Builder::new()
        .prefix("vmhost-test-qemu-")
        .tempdir()
        .expect("tempdir");
    // Tempdirs are 0700.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let backend = LibvirtBackend::connect(URI)
        .await
        .expect("connect to qemu:///system");
    remove_leftovers(&backend).await;
    (dir, backend)
}

fn test_image_available() -> bool {
    let image = Path::new(TEST_IMAGE);
    if image.join("vmlinuz").exists() && image.join("initrd.img").exists() {
        return true;
    }
    let required = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
        || std::env::var_os("VMHOST_REQUIRE_REAL_VM").is_some();
    assert!(
        !required,
        "{TEST_IMAGE} is missing: run images/build-images.sh"
    );
    eprintln!("skipping the console test: {TEST_IMAGE} is not built");
    false
}

/// Both bridge threads of every serial session of this process (see `threads_named`).
fn serial_threads() -> usize {
    common::threads_named("vmhost-con-rx") + common::threads_named("vmhost-con-tx")
}

/// Polls until the serial bridge threads are back to `count`; panics after `within`.
async fn wait_serial_threads(count: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while serial_threads() != count {
        assert!(
            Instant::now() < deadline,
            "{} serial bridge threads, want {count}",
            serial_threads()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_qemu_vnc_display_and_serial_console() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the real-QEMU console test: {reason}");
        return;
    }
    if !test_image_available() {
        return;
    }
    common::init_tracing();
    let t0 = Instant::now();
    let (dir, backend) = qemu_test_setup().await;

    let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd.img"));
    std::fs::copy(Path::new(TEST_IMAGE).join("vmlinuz"), &kernel).expect("copy kernel");
    std::fs::copy(Path::new(TEST_IMAGE).join("initrd.img"), &initrd).expect("copy initrd");
    let boot = BootMode::Kernel {
        kernel,
        initrd,
        cmdline: "console=ttyS0 panic=-1".to_owned(),
    };
    let base = dir.path().join("base.raw");
    make_base_image(&base, 16);
    let s = spec(dir.path(), &unique_name(PREFIX), &base, Accel::Tcg, boot);
    let outcome = tokio::spawn(consoles(backend.clone(), s.clone())).await;
    backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    eprintln!("real-QEMU console test took {:?}", t0.elapsed());
}

#[track_caller]
fn assert_not_running(r: Result<vmhost::backend::ConsoleStream, BackendError>, name: &str) {
    match r {
        Err(BackendError::NotRunning { name: n }) => assert_eq!(n, name),
        Err(e) => panic!("expected NotRunning, got {e:?}"),
        Ok(_) => panic!("opened a console of a domain that is not running"),
    }
}

/// Types `echo vmhost-serial-$((N*(N+1)))-ok` into the guest's shell and waits for the
/// computed line, so the match is the shell's output, not the terminal's echo of the input.
/// Retries a few times: the shell may still be starting right after the boot banner.
async fn shell_round_trip(io: &mut vmhost::backend::ConsoleStream, n: u32) {
    use tokio::io::AsyncWriteExt;

    let command = format!("echo vmhost-serial-$(({n}*{}))-ok\n", n + 1);
    let want = format!("vmhost-serial-{}-ok", n * (n + 1));
    let mut last = String::new();
    for _ in 0..4 {
        io.write_all(command.as_bytes()).await.expect("type");
        match common::read_until(io, &want, Duration::from_secs(10)).await {
            Ok(_) => return,
            Err(e) => last = e,
        }
    }
    panic!("the guest shell never printed {want:?}: {last}");
}

async fn consoles(backend: LibvirtBackend, s: vmhost::backend::VmSpec) {
    let step = Duration::from_secs(30);
    let boot_wait = Duration::from_secs(120);
    backend.ensure_defined(&s).await.expect("define");
    assert_not_running(backend.open_vnc(&s.name).await, &s.name);
    assert_not_running(backend.open_serial(&s.name).await, &s.name);

    let t = Instant::now();
    backend.start(&s.name).await.expect("start");
    let mut vnc = backend.open_vnc(&s.name).await.expect("open_vnc");
    let (w, h, desktop) =
        tokio::time::timeout(step, common::rfb_none_handshake_and_update(&mut vnc))
            .await
            .expect("RFB handshake and update in time");
    eprintln!(
        "VNC: {w}x{h} {desktop:?}, first update {:?} after start",
        t.elapsed()
    );

    wait_console(&s.console_log, Some("vmhost-tiny: booted"), boot_wait).await;
    eprintln!("guest booted {:?} after start", t.elapsed());
    let threads_before = serial_threads();
    let t = Instant::now();
    let mut first = backend.open_serial(&s.name).await.expect("open_serial");
    // The typed line comes back as `$((6*7))`; only the shell's output contains `42`.
    shell_round_trip(&mut first, 6).await;
    eprintln!("serial round trip {:?}", t.elapsed());
    assert_eq!(serial_threads(), threads_before + 2);

    // FORCE: a second attach replaces the first, whose stream ends.
    let t = Instant::now();
    let mut second = backend
        .open_serial(&s.name)
        .await
        .expect("second open_serial");
    common::wait_closed(&mut first, step).await;
    eprintln!(
        "serial FORCE re-attach ended the first session after {:?}",
        t.elapsed()
    );
    shell_round_trip(&mut second, 7).await;
    drop(first);
    wait_serial_threads(threads_before + 2, step).await;

    // Dropping the caller's end ends the session and both of its threads.
    drop(second);
    wait_serial_threads(threads_before, step).await;

    // Destroying the domain ends open consoles; new ones are refused.
    let mut serial = backend
        .open_serial(&s.name)
        .await
        .expect("third open_serial");
    backend.destroy(&s.name).await.expect("destroy");
    common::wait_closed(&mut vnc, step).await;
    common::wait_closed(&mut serial, step).await;
    drop(serial);
    wait_serial_threads(threads_before, step).await;
    assert_not_running(backend.open_vnc(&s.name).await, &s.name);
    assert_not_running(backend.open_serial(&s.name).await, &s.name);
}

// ---- the private network on the real daemon ----

/// Whether this process can make network namespaces and veths (root with `ip`).
fn can_make_netns() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(str::to_owned))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"));
    let ok = root && Path::new("/bin/busybox").exists() && net::try_run(&["ip", "-V"]).is_ok();
    let required = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
        || std::env::var_os("VMHOST_REQUIRE_REAL_VM").is_some();
    assert!(
        ok || !required,
        "the network tests need root, ip and /bin/busybox"
    );
    if !ok {
        eprintln!("skipping the real network test: needs root, ip and /bin/busybox");
    }
    ok
}

/// A private network spec of this process (`salt` tells a test's networks apart).
fn private_network(salt: u32) -> PrivateNetworkSpec {
    let pid = std::process::id();
    let bridge = format!("vhb{pid}n{salt}");
    assert!(bridge.len() <= 15);
    PrivateNetworkSpec {
        name: format!("{}{pid}-{salt}", net::NET_PREFIX),
        bridge,
        gateway: net::free_subnet(salt),
        prefix_len: 24,
    }
}

fn lease(spec: &PrivateNetworkSpec, mac_last: u8, last: u8, hostname: &str) -> DhcpHost {
    let [a, b, c, _] = spec.gateway.octets();
    DhcpHost {
        mac: format!(
            "52:54:00:fa:{:02x}:{mac_last:02x}",
            std::process::id() % 256
        ),
        address: std::net::Ipv4Addr::new(a, b, c, last),
        hostname: hostname.to_owned(),
    }
}

fn dnsmasq_file(net: &str, ext: &str) -> String {
    std::fs::read_to_string(format!("/var/lib/libvirt/dnsmasq/{net}.{ext}")).unwrap_or_default()
}

/// Whether a dnsmasq runs with this network's config file.
fn dnsmasq_runs(net: &str) -> bool {
    let conf = format!("--conf-file=/var/lib/libvirt/dnsmasq/{net}.conf");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .any(|c| c.split(|b| *b == 0).any(|arg| arg == conf.as_bytes()))
}

/// The persistent definition's leases, through a raw connection.
fn persistent_hosts(conn: &virt::connect::Connect, net: &str) -> Vec<network_xml::HostEntry> {
    let n = conn.lookup_network_by_name(net).expect("network");
    let xml = n
        .xml_desc(virt::sys::VIR_NETWORK_XML_INACTIVE)
        .expect("inactive xml");
    network_xml::parse(&xml).hosts
}

/// Destroys and undefines `net` (ours) if it exists.
fn remove_network(conn: &virt::connect::Connect, net: &str) {
    if let Ok(n) = conn.lookup_network_by_name(net) {
        let _ = n.destroy();
        let _ = n.undefine();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_private_network_gives_a_dhcp_client_its_fixed_address() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the real network test: {reason}");
        return;
    }
    if !can_make_netns() {
        return;
    }
    common::init_tracing();
    let t0 = Instant::now();
    let backend = LibvirtBackend::connect(URI).await.expect("connect");
    let raw = virt::connect::Connect::open(Some(URI)).expect("raw connect");
    net::remove_leftovers(&raw);
    let spec = private_network(0);
    let outcome = tokio::spawn(fixed_leases(backend.clone(), spec.clone())).await;
    remove_network(&raw, &spec.name);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    assert!(!dnsmasq_runs(&spec.name), "dnsmasq outlived the network");
    assert!(net::try_run(&["ip", "link", "show", &spec.bridge]).is_err());
    eprintln!("real network test took {:?}", t0.elapsed());
}

async fn fixed_leases(backend: LibvirtBackend, spec: PrivateNetworkSpec) {
    let raw = virt::connect::Connect::open(Some(URI)).expect("raw connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let net = spec.name.as_str();
    backend.ensure_network(&spec).await.expect("ensure_network");
    backend.ensure_network(&spec).await.expect("again");
    let addr = net::run(&["ip", "-4", "-o", "addr", "show", "dev", &spec.bridge]);
    assert!(
        addr.contains(&format!("inet {}/24", spec.gateway)),
        "bridge address: {addr}"
    );
    assert!(dnsmasq_runs(net), "no dnsmasq for {net}");
    // No lease yet: libvirt gives dnsmasq no DHCP range at all.
    assert!(!dnsmasq_file(net, "conf").contains("dhcp-range"));

    let a = lease(&spec, 0x10, 10, "pnet-a");
    backend.put_dhcp_host(net, &a).await.expect("put");
    backend.put_dhcp_host(net, &a).await.expect("put again");
    let hosts_line = format!("{},{},{}", a.mac, a.address, a.hostname);
    assert_eq!(dnsmasq_file(net, "hostsfile").trim(), hosts_line);
    let conf = dnsmasq_file(net, "conf");
    assert!(
        conf.contains(&format!("dhcp-range={},static", spec.gateway)),
        "only fixed leases: {conf}"
    );
    assert_eq!(persistent_hosts(&raw, net).len(), 1);

    // A client with the lease's MAC behind a veth on the bridge gets exactly its address,
    // and the gateway resolves its hostname.
    let ns = net::Netns::new(0, &spec.bridge, &a.mac);
    let t = Instant::now();
    assert_eq!(ns.dhcp(dir.path(), 15), Some(a.address), "fixed lease");
    eprintln!("DHCP lease after {:?}", t.elapsed());
    let gw = spec.gateway.to_string();
    let answer = ns.exec(&["busybox", "nslookup", &a.hostname, &gw]);
    assert!(answer.contains(&a.address.to_string()), "{answer}");

    // An unknown MAC gets nothing: there is no dynamic range.
    ns.set_mac(&lease(&spec, 0x99, 99, "x").mac);
    assert_eq!(ns.dhcp(dir.path(), 3), None, "an unlisted MAC got a lease");

    // Replacing the lease of the MAC takes effect live.
    ns.set_mac(&a.mac);
    let a2 = lease(&spec, 0x10, 20, "pnet-a2");
    backend.put_dhcp_host(net, &a2).await.expect("replace");
    let line2 = format!("{},{},{}", a.mac, a2.address, a2.hostname);
    assert_eq!(dnsmasq_file(net, "hostsfile").trim(), line2);
    assert_eq!(ns.dhcp(dir.path(), 15), Some(a2.address), "replaced lease");

    backend.remove_dhcp_host(net, &a.mac).await.expect("remove");
    backend
        .remove_dhcp_host(net, &a.mac)
        .await
        .expect("remove again");
    assert!(!dnsmasq_file(net, "hostsfile").contains(&a.mac));
    assert!(persistent_hosts(&raw, net).is_empty());
    assert_eq!(
        ns.dhcp(dir.path(), 3),
        None,
        "a removed lease is still served"
    );

    // After a restart the network is defined but inactive: a lease put meanwhile goes into
    // the definition, and ensure_network starts the network with it.
    raw.lookup_network_by_name(net)
        .expect("network")
        .destroy()
        .expect("stop the network");
    let b = lease(&spec, 0x11, 11, "pnet-b");
    backend
        .put_dhcp_host(net, &b)
        .await
        .expect("put while stopped");
    backend.ensure_network(&spec).await.expect("start again");
    assert!(dnsmasq_runs(net));
    let line_b = format!("{},{},{}", b.mac, b.address, b.hostname);
    assert_eq!(dnsmasq_file(net, "hostsfile").trim(), line_b);
    ns.set_mac(&b.mac);
    // The new bridge port of the re-created bridge: attach the veth again.
    let host_end = format!("vhv{}x0", std::process::id());
    net::run(&["ip", "link", "set", &host_end, "master", &spec.bridge]);
    assert_eq!(
        ns.dhcp(dir.path(), 15),
        Some(b.address),
        "lease after restart"
    );
    backend
        .remove_dhcp_host(net, &b.mac)
        .await
        .expect("remove b");
    assert!(persistent_hosts(&raw, net).is_empty());
    assert!(dnsmasq_file(net, "hostsfile").trim().is_empty());

    let mut other = spec.clone();
    other.prefix_len = 16;
    let e = backend.ensure_network(&other).await.expect_err("mismatch");
    assert!(matches!(e, BackendError::NetworkMismatch { .. }), "{e:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn real_domain_nics_get_the_tap_names_vmhost_chose() {
    if let Some(reason) = skip_reason() {
        eprintln!("skipping the real tap test: {reason}");
        return;
    }
    if !test_image_available() || !can_make_netns() {
        return;
    }
    common::init_tracing();
    let t0 = Instant::now();
    let (dir, backend) = qemu_test_setup().await;
    let raw = virt::connect::Connect::open(Some(URI)).expect("raw connect");
    net::remove_leftovers(&raw);

    let (kernel, initrd) = (dir.path().join("vmlinuz"), dir.path().join("initrd.img"));
    std::fs::copy(Path::new(TEST_IMAGE).join("vmlinuz"), &kernel).expect("copy kernel");
    std::fs::copy(Path::new(TEST_IMAGE).join("initrd.img"), &initrd).expect("copy initrd");
    let boot = BootMode::Kernel {
        kernel,
        initrd,
        cmdline: "console=ttyS0 panic=-1".to_owned(),
    };
    let base = dir.path().join("base.raw");
    make_base_image(&base, 16);
    let mut s = spec(dir.path(), &unique_name(PREFIX), &base, Accel::Tcg, boot);
    let network = private_network(1);
    let bridge = net::HostBridge::new();
    let pid = std::process::id();
    s.nics = vec![
        NicSpec {
            attachment: NicAttachment::Network(network.name.clone()),
            mac: lease(&network, 0x20, 20, "x").mac,
            tap: format!("vht{pid}n0"),
        },
        NicSpec {
            attachment: NicAttachment::Bridge(bridge.name.clone()),
            mac: lease(&network, 0x21, 21, "x").mac,
            tap: format!("vht{pid}n1"),
        },
    ];
    let outcome = tokio::spawn(taps(
        backend.clone(),
        s.clone(),
        network.clone(),
        bridge.name.clone(),
    ))
    .await;
    backend
        .remove(&s.name, &s.owner(), &s.files())
        .await
        .expect("remove");
    remove_network(&raw, &network.name);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    for nic in &s.nics {
        assert!(
            net::try_run(&["ip", "link", "show", &nic.tap]).is_err(),
            "{} left",
            nic.tap
        );
    }
    eprintln!("real tap test took {:?}", t0.elapsed());
}

async fn taps(
    backend: LibvirtBackend,
    s: vmhost::backend::VmSpec,
    network: PrivateNetworkSpec,
    bridge: String,
) {
    backend.ensure_network(&network).await.expect("network");
    backend.ensure_defined(&s).await.expect("define");
    backend.start(&s.name).await.expect("start");
    wait_console(
        &s.console_log,
        Some("vmhost-tiny: booted"),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(
        backend.state(&s.name).await.expect("state"),
        Some(PowerState::Running)
    );
    let masters = [network.bridge.as_str(), bridge.as_str()];
    for (nic, master) in s.nics.iter().zip(masters) {
        net::run(&["ip", "link", "show", &nic.tap]);
        assert_eq!(
            net::master_of(&nic.tap).as_deref(),
            Some(master),
            "{}",
            nic.tap
        );
    }
    // libvirt reports the same names in the live XML.
    let raw = virt::connect::Connect::open(Some(URI)).expect("raw connect");
    let xml = raw
        .lookup_domain_by_name(&s.name)
        .expect("domain")
        .xml_desc(0)
        .expect("xml");
    for nic in &s.nics {
        assert!(
            xml.contains(&format!("<target dev='{}'/>", nic.tap)),
            "{xml}"
        );
    }
    backend.destroy(&s.name).await.expect("destroy");
}
