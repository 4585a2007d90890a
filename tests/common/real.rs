//! Helpers for tests against the real libvirt daemon (`qemu:///system`, TCG).
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const IMAGE_DIR: &str = "/var/lib/vmhost/images";

/// Whether real-VM tests can run here. They are skipped (with a note) only on a developer
/// machine that lacks libvirt or the built images; with `VMHOST_REQUIRE_REAL_VM` set (CI does)
/// a missing prerequisite fails the test instead.
pub fn available(test: &str, images: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !Path::new("/var/run/libvirt/libvirt-sock").exists() {
        missing.push("libvirtd (run scripts/start-libvirt.sh)".to_owned());
    }
    for image in images {
        if !Path::new(IMAGE_DIR).join(image).exists() {
            missing.push(format!("{IMAGE_DIR}/{image} (run images/build-images.sh)"));
        }
    }
    if std::env::var_os("VMHOST_SKIP_REAL_VM").is_some()
        && std::env::var_os("VMHOST_REQUIRE_REAL_VM").is_none()
    {
        missing.push("VMHOST_SKIP_REAL_VM is set".to_owned());
    }
    runnable(test, &missing)
}

/// Whether a test lacking `missing` runs: yes when nothing is missing; otherwise it is skipped
/// with a note, or fails when `VMHOST_REQUIRE_REAL_VM` is set (CI).
pub fn runnable(test: &str, missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("VMHOST_REQUIRE_REAL_VM").is_none(),
        "{test} needs: {}",
        missing.join(", ")
    );
    eprintln!("SKIPPING {test}: missing {}", missing.join(", "));
    false
}

/// A data directory QEMU (running as its own user) can traverse.
pub fn data_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("vmhost-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Names of libvirt domains starting with `prefix`, via virsh (independent of vmhost).
pub fn domains_with_prefix(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "list", "--all", "--name"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// Removes domains that an interrupted earlier run of the same test left behind: those whose
/// test process is gone. Domains of a run still in progress (another checkout testing at the
/// same time) are left alone.
pub fn remove_leftovers(prefix: &str) {
    let family = prefix
        .rsplit_once("-p")
        .map_or(prefix, |(family, _)| family);
    for name in domains_with_prefix(&format!("{family}-p")) {
        let pid = name[family.len() + 2..]
            .split('-')
            .next()
            .unwrap_or_default();
        let alive = !pid.is_empty() && Path::new("/proc").join(pid).exists();
        if alive {
            continue;
        }
        let virsh = |args: &[&str]| {
            let _ = std::process::Command::new("virsh")
                .args(["-c", "qemu:///system"])
                .args(args)
                .output();
        };
        virsh(&["destroy", &name]);
        virsh(&["undefine", &name]);
    }
    // A run that failed half-way may also have left its firewall tables (named after the prefix).
    let table_family = family.replace('-', "_") + "_p";
    let tables = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in tables.lines() {
        let mut words = line.split_whitespace().skip(1);
        let (Some(nft_family), Some(table)) = (words.next(), words.next()) else {
            continue;
        };
        let Some(pid) = table.strip_prefix(&table_family) else {
            continue;
        };
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
            let _ = std::process::Command::new("nft")
                .args(["delete", "table", nft_family, table])
                .output();
        }
    }
}

/// Every file under `dir`, for "nothing left behind" checks.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// A recognisable prefix for one test's domains: the test's name and this process's id, so
/// concurrent runs never touch each other's domains and a rerun can find a dead run's leftovers.
pub fn prefix(test: &str) -> String {
    format!("vmhost-e2e-{test}-p{}", std::process::id())
}

/// The config of a test daemon on the real `qemu:///system`, with the built images.
/// Real-VM tests that are not about networking run without the private network, so they
/// neither share nor wait for one; `tests/network_qemu.rs` builds its own.
pub fn libvirt_config(base: vmhost::config::Config, prefix: &str) -> vmhost::config::Config {
    vmhost::config::Config {
        backend: vmhost::config::BackendKind::Libvirt,
        image_dir: IMAGE_DIR.into(),
        domain_prefix: prefix.to_owned(),
        private_network: vmhost::network::config::PrivateNetworkConfig {
            enabled: false,
            ..vmhost::network::config::PrivateNetworkConfig::default()
        },
        ..base
    }
}

/// Waits until the busybox-tiny guest has booted (its banner is in the console log).
pub async fn wait_for_tiny_boot(console_log: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(console_log)
        .unwrap_or_default()
        .contains("vmhost-tiny: booted")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the tiny guest never booted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
