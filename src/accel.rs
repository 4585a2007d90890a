//! Choosing the accelerator for guests: KVM or TCG (QEMU's software emulation).
//!
//! `accel = "auto"` must not trust the mere presence of `/dev/kvm`. On nested or paravirtual
//! hosts KVM can open, create VMs and even run a few instructions, yet be unusable: on the
//! development host (a `kvm-pvm` nested setup) SeaBIOS takes 3-7 s to reach the boot sector and
//! a 50-million-iteration loop, 0.3 s under TCG, does not finish in a minute. A Linux guest
//! there looks hung. So [`probe`] boots a real guest and measures that it *runs*:
//!
//! ```text
//! 7c00: cli; cld; xor ax,ax; mov ds,ax; mov ss,ax; mov sp,0x7c00; mov dx,0x3f8
//!       mov si,START; call print        ; "VMHOST-PROBE-START\r\n": the guest booted
//!       mov ecx,50_000_000; l: dec ecx; jnz l
//!       mov si,DONE; call print         ; "VMHOST-PROBE-OK\r\n": the guest runs at speed
//! halt: cli; hlt; jmp halt
//! print: lodsb; test al,al; jz ret; out dx,al; jmp print
//! ```
//!
//! QEMU boots that sector with `-serial stdio`; the accelerator counts as working only if the
//! done marker appears within [`ProbeConfig::timeout`]. The loop costs about 0.05 s on working
//! KVM and 0.3 s under TCG, so the 8 s default leaves a wide margin either way, and the same
//! probe under TCG is how the tests show the program itself is right.
//!
//! Decisions per setting (see [`resolve_with`]):
//! - `tcg`: always TCG, nothing is checked.
//! - `kvm`: trusts the operator, and only fails if the KVM device is missing. It does not run
//!   the probe: vmhost may lack access to `/dev/kvm` while libvirt's QEMU has it, and an
//!   operator who forces KVM should not be second-guessed by a timing test.
//! - `auto`: no device → TCG; otherwise KVM only if the probe passes. This costs well under a
//!   second where KVM works, and the full timeout, once at startup, where it does not.
//!
//! The probe kills the QEMU it started (and only that one, through its handle) once the verdict
//! is in; a guest that hangs or finishes is never left running.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tracing::{info, warn};

use crate::backend::Accel;

/// Printed by the probe guest once it runs, before the timed loop.
pub const PROBE_BOOT_MARKER: &str = "VMHOST-PROBE-START";
/// Printed by the probe guest after the timed loop: the accelerator works.
pub const PROBE_DONE_MARKER: &str = "VMHOST-PROBE-OK";
/// Iterations of the timed loop; see the module docs for the timings.
pub const PROBE_LOOP_ITERATIONS: u32 = 50_000_000;

/// The accelerator setting of the configuration file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    Kvm,
    Tcg,
    /// KVM if the probe passes, TCG otherwise.
    #[default]
    Auto,
}

/// How to run the probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// QEMU binary; a bare name is looked up in `PATH`.
    pub qemu: PathBuf,
    /// How long the guest gets to print the done marker, boot included.
    pub timeout: Duration,
    /// The KVM device whose absence settles `auto` (TCG) and `kvm` (error) without a probe.
    pub kvm_device: PathBuf,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            qemu: PathBuf::from("qemu-system-x86_64"),
            timeout: Duration::from_secs(8),
            kvm_device: PathBuf::from("/dev/kvm"),
        }
    }
}

/// The verdict of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The guest printed the done marker after `elapsed` (QEMU start included).
    Working { elapsed: Duration },
    /// No done marker within the timeout. `booted_after` is when the boot marker appeared, if it
    /// did: a guest that boots but does not finish runs far too slowly.
    TimedOut {
        after: Duration,
        booted_after: Option<Duration>,
    },
    /// QEMU exited before the guest finished, e.g. because the accelerator failed to start.
    Exited { code: Option<i32>, stderr: String },
}

impl ProbeOutcome {
    pub fn is_working(&self) -> bool {
        matches!(self, ProbeOutcome::Working { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    #[error("accel = \"kvm\" is configured but {device} does not exist")]
    KvmMissing { device: PathBuf },
    #[error("failed to write the probe boot sector {path}")]
    WriteBootSector {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("failed to run {qemu}")]
    SpawnQemu {
        qemu: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("failed to read the serial output of {qemu}")]
    ReadOutput {
        qemu: PathBuf,
        #[source]
        err: std::io::Error,
    },
}

/// Decides the accelerator with the default [`ProbeConfig`].
pub async fn resolve(setting: AccelSetting) -> Result<Accel, AccelError> {
    resolve_with(setting, &ProbeConfig::default()).await
}

/// Decides the accelerator; see the module docs for the rules.
pub async fn resolve_with(
    setting: AccelSetting,
    config: &ProbeConfig,
) -> Result<Accel, AccelError> {
    let device = config.kvm_device.display().to_string();
    let has_device = config.kvm_device.exists();
    match setting {
        AccelSetting::Tcg => {
            info!(accel = "tcg", reason = "configured", "accelerator chosen");
            Ok(Accel::Tcg)
        }
        AccelSetting::Kvm if has_device => {
            info!(accel = "kvm", reason = "configured", "accelerator chosen");
            Ok(Accel::Kvm)
        }
        AccelSetting::Kvm => Err(AccelError::KvmMissing {
            device: config.kvm_device.clone(),
        }),
        AccelSetting::Auto if !has_device => {
            info!(
                accel = "tcg",
                reason = "no KVM device",
                device,
                "accelerator chosen"
            );
            Ok(Accel::Tcg)
        }
        AccelSetting::Auto => match probe("kvm", config).await? {
            ProbeOutcome::Working { elapsed } => {
                info!(
                    accel = "kvm",
                    reason = "probe guest ran",
                    elapsed_ms = elapsed.as_millis(),
                    "accelerator chosen"
                );
                Ok(Accel::Kvm)
            }
            ProbeOutcome::TimedOut {
                after,
                booted_after,
            } => {
                warn!(
                    accel = "tcg",
                    timeout_ms = after.as_millis(),
                    booted_after_ms = booted_after.map(|d| d.as_millis()),
                    "KVM probe guest did not finish in time, guests would crawl; using TCG"
                );
                Ok(Accel::Tcg)
            }
            ProbeOutcome::Exited { code, stderr } => {
                warn!(
                    accel = "tcg",
                    code,
                    stderr = stderr.trim(),
                    device,
                    "QEMU could not run the KVM probe guest (no access to the device?); using TCG"
                );
                Ok(Accel::Tcg)
            }
        },
    }
}

/// Boots the probe guest under `accel` (`kvm`, `tcg`, … as `-accel` takes it) and reports
/// whether it ran to completion in time. Errors only when the probe itself cannot run.
pub async fn probe(accel: &str, config: &ProbeConfig) -> Result<ProbeOutcome, AccelError> {
    let image = BootSectorFile::write().await?;
    let started = Instant::now();
    let mut child = Command::new(&config.qemu)
        .args(probe_args(accel, &image.path))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Backstop for a cancelled probe future; every normal path kills explicitly below.
        .kill_on_drop(true)
        .spawn()
        .map_err(|err| AccelError::SpawnQemu {
            qemu: config.qemu.clone(),
            err,
        })?;
    let stderr = tokio::spawn(read_capped(child.stderr.take()));
    let mut booted_after = None;
    let watched = tokio::time::timeout(
        config.timeout,
        watch_serial(child.stdout.take(), started, &mut booted_after),
    )
    .await;
    let elapsed = started.elapsed();
    // The guest halts forever once done, so QEMU is killed whatever the verdict.
    let code = reap(&mut child).await;
    let outcome = match watched {
        Ok(Ok(true)) => ProbeOutcome::Working { elapsed },
        Ok(Ok(false)) => ProbeOutcome::Exited {
            code,
            stderr: stderr.await.unwrap_or_default(),
        },
        Ok(Err(err)) => {
            return Err(AccelError::ReadOutput {
                qemu: config.qemu.clone(),
                err,
            })
        }
        Err(_elapsed) => ProbeOutcome::TimedOut {
            after: config.timeout,
            booted_after,
        },
    };
    info!(accel, ?outcome, "accelerator probe finished");
    Ok(outcome)
}

/// QEMU arguments for the probe: the smallest PC, serial on stdout, no display, no defaults.
pub fn probe_args(accel: &str, boot_sector: &Path) -> Vec<OsString> {
    // QEMU option values escape a comma by doubling it.
    let mut drive = OsString::from("file=");
    drive.push(boot_sector.to_string_lossy().replace(',', ",,"));
    drive.push(",format=raw,if=ide");
    let fixed =
        "-machine pc -m 16 -nodefaults -no-user-config -display none -serial stdio -no-reboot";
    ["-accel", accel]
        .into_iter()
        .chain(fixed.split(' '))
        .chain(["-drive"])
        .map(OsString::from)
        .chain([drive])
        .collect()
}

/// The probe guest: a 512-byte x86 real-mode boot sector (listing in the module docs).
pub fn probe_boot_sector() -> [u8; 512] {
    /// Where the BIOS loads a boot sector.
    const LOAD: u16 = 0x7c00;
    /// Length of the code; the strings follow it.
    const CODE: usize = 0x31;
    let start_msg = LOAD + CODE as u16;
    let done_msg = start_msg + (PROBE_BOOT_MARKER.len() + 3) as u16; // + "\r\n\0"
    let [s0, s1] = start_msg.to_le_bytes();
    let [d0, d1] = done_msg.to_le_bytes();
    let [n0, n1, n2, n3] = PROBE_LOOP_ITERATIONS.to_le_bytes();
    #[rustfmt::skip]
    let code: [u8; CODE] = [
        0xFA,                         // 00 cli
        0xFC,                         // 01 cld             lodsb counts up
        0x31, 0xC0,                   // 02 xor ax, ax
        0x8E, 0xD8,                   // 04 mov ds, ax      strings are at 0:7cxx
        0x8E, 0xD0,                   // 06 mov ss, ax
        0xBC, 0x00, 0x7C,             // 08 mov sp, 0x7c00  a known stack for `call`
        0xBA, 0xF8, 0x03,             // 0b mov dx, 0x3f8   COM1 data register
        0xBE, s0, s1,                 // 0e mov si, START
        0xE8, 0x14, 0x00,             // 11 call 0x28
        0x66, 0xB9, n0, n1, n2, n3,   // 14 mov ecx, PROBE_LOOP_ITERATIONS
        0x66, 0x49,                   // 1a dec ecx
        0x75, 0xFC,                   // 1c jnz 0x1a
        0xBE, d0, d1,                 // 1e mov si, DONE
        0xE8, 0x04, 0x00,             // 21 call 0x28
        0xFA,                         // 24 cli
        0xF4,                         // 25 hlt
        0xEB, 0xFC,                   // 26 jmp 0x24        an NMI resumes after hlt
        0xAC,                         // 28 lodsb           print: al = [si++]
        0x84, 0xC0,                   // 29 test al, al
        0x74, 0x03,                   // 2b jz 0x30
        0xEE,                         // 2d out dx, al      the UART sends without setup
        0xEB, 0xF8,                   // 2e jmp 0x28
        0xC3,                         // 30 ret
    ];
    let mut sector = [0u8; 512];
    sector[..CODE].copy_from_slice(&code);
    let mut at = CODE;
    for part in [PROBE_BOOT_MARKER, "\r\n\0", PROBE_DONE_MARKER, "\r\n\0"] {
        sector[at..at + part.len()].copy_from_slice(part.as_bytes());
        at += part.len();
    }
    sector[510..].copy_from_slice(&[0x55, 0xAA]);
    sector
}

/// Reads QEMU's serial output until the done marker (`true`) or end of file (`false`, QEMU
/// exited). Records in `booted_after` when the boot marker appeared; the caller reads it after a
/// timeout has dropped this future.
async fn watch_serial(
    stdout: Option<tokio::process::ChildStdout>,
    started: Instant,
    booted_after: &mut Option<Duration>,
) -> std::io::Result<bool> {
    let Some(mut stdout) = stdout else {
        return Ok(false);
    };
    let mut seen = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stdout.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        seen.extend_from_slice(&chunk[..n]);
        if booted_after.is_none() && contains(&seen, PROBE_BOOT_MARKER) {
            *booted_after = Some(started.elapsed());
        }
        if contains(&seen, PROBE_DONE_MARKER) {
            return Ok(true);
        }
        // A misbehaving guest must not grow this without bound; a marker split across the
        // cut survives because the tail kept is longer than any marker.
        if seen.len() > 64 * 1024 {
            seen.drain(..seen.len() - 256);
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Everything QEMU writes to stderr, capped at 16 KiB, lossily decoded.
async fn read_capped(stderr: Option<tokio::process::ChildStderr>) -> String {
    let Some(stderr) = stderr else {
        return String::new();
    };
    let mut buf = Vec::new();
    // An error just ends the capture: stderr only decorates the verdict.
    let _ = stderr.take(16 * 1024).read_to_end(&mut buf).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// Kills the probe's QEMU (if it still runs) and waits for it; returns its exit code when it
/// exited on its own. Bounded: a QEMU stuck in the kernel is left to `kill_on_drop`.
async fn reap(child: &mut Child) -> Option<i32> {
    if let Ok(Some(status)) = child.try_wait() {
        return status.code();
    }
    if let Err(err) = child.start_kill() {
        warn!(pid = child.id(), error = %err, "failed to kill the probe QEMU");
    }
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        // Killed by us: a signal, so no code; or it exited on its own just before.
        Ok(Ok(status)) => status.code(),
        Ok(Err(err)) => {
            warn!(pid = child.id(), error = %err, "failed to wait for the probe QEMU");
            None
        }
        Err(_) => {
            warn!(
                pid = child.id(),
                "the probe QEMU did not exit 5 s after SIGKILL"
            );
            None
        }
    }
}

/// The boot sector in a uniquely named temp file, deleted on drop.
#[derive(Debug)]
struct BootSectorFile {
    path: PathBuf,
}

impl BootSectorFile {
    async fn write() -> Result<BootSectorFile, AccelError> {
        let name = format!("vmhost-accel-probe-{}.img", uuid::Uuid::new_v4());
        let file = BootSectorFile {
            path: std::env::temp_dir().join(name),
        };
        tokio::fs::write(&file.path, probe_boot_sector())
            .await
            .map_err(|err| AccelError::WriteBootSector {
                path: file.path.clone(),
                err,
            })?;
        Ok(file)
    }
}

impl Drop for BootSectorFile {
    fn drop(&mut self) {
        // Best effort: a stray 512-byte file in the temp dir is harmless.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `probe_boot_sector()` as GNU as assembles the listing in the module docs (up to the end
    /// of the strings; the rest is zeroes and the signature).
    const ASSEMBLED: &str =
        "fafc31c08ed88ed0bc007cbaf803be317ce8140066b980f0fa02664975fcbe467ce804\
        00faf4ebfcac84c07403eeebf8c3564d484f53542d50524f42452d53544152540d0a00564d484f53542d50524f\
        42452d4f4b0d0a00";

    #[test]
    fn boot_sector_layout() {
        let sector = probe_boot_sector();
        assert_eq!(sector[510..], [0x55, 0xAA], "BIOS boot signature");
        // `mov si, imm16` operands point at the NUL-terminated markers behind the code.
        for (operand, marker) in [(0x0f, PROBE_BOOT_MARKER), (0x1f, PROBE_DONE_MARKER)] {
            let at =
                usize::from(u16::from_le_bytes([sector[operand], sector[operand + 1]]) - 0x7c00);
            let text = format!("{marker}\r\n\0");
            assert_eq!(&sector[at..at + text.len()], text.as_bytes());
        }
        // Both `call rel16` (after them: 0x14, 0x24) land on print at 0x28.
        assert_eq!(sector[0x12..0x14], 0x14u16.to_le_bytes());
        assert_eq!(sector[0x22..0x24], 0x04u16.to_le_bytes());
        assert_eq!(sector[0x28], 0xAC, "print starts with lodsb");
        assert_eq!(sector[0x2d], 0xEE, "print writes with out dx, al");
        assert_eq!(sector[0x0b..0x0e], [0xBA, 0xF8, 0x03], "dx = COM1");
        assert_eq!(sector[0x16..0x1a], PROBE_LOOP_ITERATIONS.to_le_bytes());
        let expected = hex::decode(ASSEMBLED.replace(' ', "")).unwrap();
        assert_eq!(sector[..expected.len()], expected[..]);
        assert!(sector[expected.len()..510].iter().all(|&b| b == 0));
    }

    #[test]
    fn probe_args_escape_commas_in_the_path() {
        let args = probe_args("tcg", Path::new("/tmp/a,b.img"));
        assert_eq!(args[..2], [OsString::from("-accel"), OsString::from("tcg")]);
        assert_eq!(args.last().unwrap(), "file=/tmp/a,,b.img,format=raw,if=ide");
    }

    #[test]
    fn setting_parses_lowercase() {
        #[derive(serde::Deserialize)]
        struct Config {
            accel: AccelSetting,
        }
        for (text, want) in [
            ("kvm", AccelSetting::Kvm),
            ("tcg", AccelSetting::Tcg),
            ("auto", AccelSetting::Auto),
        ] {
            let config: Config = toml::from_str(&format!("accel = \"{text}\"")).unwrap();
            assert_eq!(config.accel, want);
        }
        assert!(toml::from_str::<Config>("accel = \"KVM\"").is_err());
        assert_eq!(AccelSetting::default(), AccelSetting::Auto);
    }

    /// A config under which running QEMU would fail the test: proves no probe ran.
    fn no_qemu(kvm_device: PathBuf) -> ProbeConfig {
        ProbeConfig {
            qemu: "/nonexistent/qemu".into(),
            timeout: Duration::from_secs(1),
            kvm_device,
        }
    }

    #[tokio::test]
    async fn tcg_setting_is_always_tcg() {
        let config = no_qemu("/dev/kvm".into());
        assert_eq!(
            resolve_with(AccelSetting::Tcg, &config).await.unwrap(),
            Accel::Tcg
        );
    }

    #[tokio::test]
    async fn kvm_setting_trusts_the_operator_but_needs_the_device() {
        let tmp = tempfile::tempdir().unwrap();
        let device = tmp.path().join("kvm");
        let err = resolve_with(AccelSetting::Kvm, &no_qemu(device.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AccelError::KvmMissing { device: ref d } if *d == device),
            "{err:?}"
        );
        std::fs::write(&device, b"").unwrap();
        assert_eq!(
            resolve_with(AccelSetting::Kvm, &no_qemu(device))
                .await
                .unwrap(),
            Accel::Kvm
        );
    }

    #[tokio::test]
    async fn auto_without_the_device_is_tcg_without_probing() {
        let config = no_qemu("/nonexistent/kvm".into());
        assert_eq!(
            resolve_with(AccelSetting::Auto, &config).await.unwrap(),
            Accel::Tcg
        );
    }

    #[tokio::test]
    async fn missing_qemu_is_an_error() {
        let err = probe("tcg", &no_qemu("/dev/kvm".into())).await.unwrap_err();
        assert!(matches!(err, AccelError::SpawnQemu { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn qemu_rejecting_the_accelerator_is_reported_as_exited() {
        let outcome = probe("no-such-accel", &ProbeConfig::default())
            .await
            .unwrap();
        match outcome {
            ProbeOutcome::Exited { code, stderr } => {
                assert_eq!(code, Some(1));
                assert!(stderr.contains("no-such-accel"), "{stderr}");
            }
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    /// Proves the probe program and the runner: emulation always works.
    #[tokio::test]
    async fn probe_passes_under_tcg() {
        let outcome = probe("tcg", &ProbeConfig::default()).await.unwrap();
        eprintln!("tcg probe: {outcome:?}");
        assert!(outcome.is_working(), "{outcome:?}");
    }

    /// On the development host KVM is broken (guests crawl), elsewhere it may work: either way
    /// the probe must come back within its timeout, and `auto` must follow its verdict.
    #[tokio::test]
    async fn kvm_probe_returns_in_time_and_auto_follows_it() {
        let config = ProbeConfig::default();
        if !config.kvm_device.exists() {
            eprintln!("skipped: {} does not exist", config.kvm_device.display());
            return;
        }
        let started = Instant::now();
        let (outcome, chosen) = tokio::join!(probe("kvm", &config), resolve(AccelSetting::Auto));
        let (outcome, chosen) = (outcome.unwrap(), chosen.unwrap());
        let took = started.elapsed();
        eprintln!("kvm probe: {outcome:?}; auto chose {chosen:?}; took {took:?}");
        // Timeout plus the bounded kill-and-reap and process start-up.
        assert!(
            took < config.timeout + Duration::from_secs(7),
            "took {took:?}"
        );
        let expected = if outcome.is_working() {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        assert_eq!(chosen, expected, "probe said {outcome:?}");
    }
}
