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
//! Domains are named `vmhost-test-qemu-<pid>-…` and stamped with job `pid-<pid>`; leftovers of
//! earlier runs whose process is gone are removed first. Nothing else is touched.

#[path = "common/libvirt.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{busybox_initramfs, host_kernel, make_base_image, spec, unique_name, wait_event};
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::{Accel, BootMode, PowerState, StopCause, VmBackend, VmEvent, VmFiles};

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
            .remove(&d.name, &files)
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
    let dir = tempfile::Builder::new()
        .prefix("vmhost-test-qemu-")
        .tempdir()
        .expect("tempdir");
    // QEMU runs as libvirt-qemu and must traverse the directory (tempdirs are 0700).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let backend = LibvirtBackend::connect(URI)
        .await
        .expect("connect to qemu:///system");
    remove_leftovers(&backend).await;

    let base = dir.path().join("base.raw");
    make_base_image(&base, 16);
    for (guest, boot) in guests(dir.path()) {
        let s = spec(dir.path(), &unique_name(PREFIX), &base, Accel::Tcg, boot);
        let outcome = tokio::spawn(lifecycle(backend.clone(), s.clone(), guest)).await;
        // Clean up even when the body failed.
        backend.remove(&s.name, &s.files()).await.expect("remove");
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
            // The guest's acpid powers it off on the ACPI power button.
            backend.shutdown(&s.name).await.expect("shutdown");
            let stopped = |e: &VmEvent| e.name() == s.name && matches!(e, VmEvent::Stopped { .. });
            let ev = wait_event(&mut events, boot_wait, stopped).await;
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
