//! Helpers shared by the benchmarks that measure vmhost beside virsh on the same domain.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use serde_json::Value;

pub fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect("virsh runs")
}

pub fn stats(name: &str, samples: &mut [Duration]) -> f64 {
    samples.sort();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() / samples.len() as f64;
    let median = samples[samples.len() / 2].as_secs_f64();
    println!(
        "{name:<28} n={:<3} median {:>7.1} ms  mean {:>7.1} ms  min {:>7.1} ms  max {:>7.1} ms",
        samples.len(),
        median * 1e3,
        mean * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    );
    median
}

pub fn chmod_755(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
}

/// `domain`'s XML rewritten for its floor copy: named `floor_name`, without the UUID (libvirt
/// gives it a new one), and with its files under `floor_dir` instead of `vm_dir`.
pub fn floor_xml(
    xml: &str,
    domain: &str,
    floor_name: &str,
    vm_dir: &Path,
    floor_dir: &Path,
) -> String {
    xml.lines()
        .filter(|l| !l.trim_start().starts_with("<uuid>"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(
            &format!("<name>{domain}</name>"),
            &format!("<name>{floor_name}</name>"),
        )
        .replace(
            vm_dir.to_str().expect("UTF-8 path"),
            floor_dir.to_str().expect("UTF-8 path"),
        )
}

/// A fresh overlay on the job's backing image (and a copy of its seed, if any) in `floor_dir`.
pub fn prepare_floor(vm_dir: &Path, floor_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(floor_dir)?;
    chmod_755(floor_dir)?;
    let info = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(vm_dir.join("disk.qcow2"))
        .output()?;
    let info: Value = serde_json::from_slice(&info.stdout).context("qemu-img info")?;
    let backing = info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())
        .with_context(|| format!("no backing file in {info}"))?;
    let backing_fmt = info["backing-filename-format"].as_str().unwrap_or("raw");
    let size = info["virtual-size"]
        .as_u64()
        .context("no virtual size")?
        .to_string();
    let status = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            backing_fmt,
            "-b",
            backing,
        ])
        .arg(floor_dir.join("disk.qcow2"))
        .arg(&size)
        .status()?;
    ensure!(status.success(), "qemu-img create failed");
    if vm_dir.join("seed.img").exists() {
        std::fs::copy(vm_dir.join("seed.img"), floor_dir.join("seed.img"))?;
    }
    Ok(())
}
