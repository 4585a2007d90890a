//! Suspend and unsuspend: vmhost beside `virsh shutdown` and `virsh start` of the same domain
//! XML (the floor).
//!
//! Per run: create a busybox-tiny job and wait for its `vmhost-tiny: booted` banner (printed once
//! busybox acpid runs, so the ACPI power button works); time `POST /api/jobs/suspend` until
//! `retrieve` says SUSPENDED, then `POST /api/jobs/unsuspend` until RUNNING; wait for the banner
//! again. Then the job's persistent domain XML is defined again under another name on fresh
//! copies of its files (vmhost no longer runs anything meanwhile: the job is terminated first),
//! booted to its banner, and `virsh shutdown --mode acpi` until `virsh domstate` says "shut off"
//! and `virsh start` are timed on it.
//!
//! Needs libvirtd and the busybox-tiny image (`images/build-images.sh`); prints figures and two
//! ratios. Run: `cargo bench --bench suspend_resume` (as root). `BENCH_RUNS` sets the count.

mod common;

use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::Accel;
use vmhost::config::{BackendKind, Config, UserConfig};
use vmhost::network::config::PrivateNetworkConfig;
use vmhost::network::nft::NftFirewall;

const TOKEN: &str = "bench-token-0123";
const PREFIX: &str = "vmhost-bench-sr";
const BANNER: &str = "vmhost-tiny: booted";
/// What the guest prints when the power button reaches it.
const POWERING_OFF: &str = "vmhost-tiny: power button, powering off";
/// How long the guest may take to print its banner, or to power off, before the run fails.
const PATIENCE: Duration = Duration::from_secs(120);
/// Pause after the banner before pressing the power button: the banner follows `acpid`'s fork,
/// which may not have opened the input device yet (a press then is lost). Same for both sides.
const SETTLE: Duration = Duration::from_millis(500);

fn virsh_ok(args: &[&str]) -> anyhow::Result<String> {
    let out = common::virsh(args);
    ensure!(
        out.status.success(),
        "virsh {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn domstate(name: &str) -> String {
    String::from_utf8_lossy(&common::virsh(&["domstate", name]).stdout)
        .trim()
        .to_owned()
}

/// Destroys and undefines every domain with the bench's prefix.
fn remove_leftover_domains() {
    for name in String::from_utf8_lossy(&common::virsh(&["list", "--all", "--name"]).stdout).lines()
    {
        if name.starts_with(PREFIX) {
            common::virsh(&["destroy", name]);
            common::virsh(&["undefine", name]);
        }
    }
}

fn count(log: &Path, line: &str) -> usize {
    std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).matches(line).count())
        .unwrap_or(0)
}

/// Waits until `log` holds at least `want` banners, then lets acpid settle.
async fn wait_for_banner(log: &Path, want: usize) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while count(log, BANNER) < want {
        ensure!(
            t0.elapsed() < PATIENCE,
            "no banner #{want} in {} after {PATIENCE:?}",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(SETTLE).await;
    Ok(())
}

#[derive(Default)]
struct Samples {
    suspend: Vec<Duration>,
    unsuspend: Vec<Duration>,
    shutdown: Vec<Duration>,
    start: Vec<Duration>,
    /// vmhost's SUSPENDED message of each run ("... shut down gracefully after N s ...").
    suspend_messages: Vec<String>,
    /// Extra power-button presses the floor needed (the first one was lost).
    floor_repeats: u32,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let images = Path::new("/var/lib/vmhost/images/busybox-tiny/initrd.img");
    if !Path::new("/var/run/libvirt/libvirt-sock").exists() || !images.exists() {
        println!("suspend_resume: needs libvirtd and the busybox-tiny image; skipped");
        return Ok(());
    }
    if std::env::var_os("RUST_LOG").is_some() {
        // vmhost's own log (power-button presses, state changes) on stderr, for diagnosis.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(6);
    remove_leftover_domains();
    let dir = tempfile::Builder::new()
        .prefix("vmhost-bench-sr-")
        .tempdir_in("/var/tmp")?;
    common::chmod_755(dir.path())?;
    let mut samples = Samples::default();
    let outcome = bench(dir.path(), runs, &mut samples).await;
    // Whatever happened: no domain of the bench survives it (the tempdir goes on drop).
    remove_leftover_domains();
    outcome?;

    println!("suspend and unsuspend, busybox-tiny under TCG, {runs} runs");
    let suspend = common::stats("vmhost suspend (request->SUSPENDED)", &mut samples.suspend);
    let shutdown = common::stats("virsh shutdown (->shut off)", &mut samples.shutdown);
    let unsuspend = common::stats(
        "vmhost unsuspend (request->RUNNING)",
        &mut samples.unsuspend,
    );
    let start = common::stats("virsh start", &mut samples.start);
    println!(
        "ratio vmhost suspend / virsh shutdown (medians): {:.2}",
        suspend / shutdown
    );
    println!(
        "ratio vmhost unsuspend / virsh start (medians): {:.2}",
        unsuspend / start
    );
    println!(
        "vmhost SUSPENDED messages: {:?}; extra power-button presses the floor needed: {}",
        samples.suspend_messages, samples.floor_repeats
    );
    Ok(())
}

async fn bench(dir: &Path, runs: usize, samples: &mut Samples) -> anyhow::Result<()> {
    let config = Config {
        backend: BackendKind::Libvirt,
        data_dir: dir.to_owned(),
        domain_prefix: PREFIX.into(),
        // Measured against `virsh` on the same domain XML, which has no NIC.
        private_network: PrivateNetworkConfig {
            enabled: false,
            ..PrivateNetworkConfig::default()
        },
        // The ACPI power button is pressed again after this long if the guest is still up.
        suspend_retry_secs: 1,
        sync_interval_secs: 10,
        users: vec![UserConfig {
            name: "bench".into(),
            token: TOKEN.into(),
        }],
        ..Config::default()
    };
    let vm_root = config.vm_dir();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await?);
    let daemon = vmhost::server::build_with(
        config,
        backend,
        Arc::new(NftFirewall::default()),
        Accel::Tcg,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, daemon.router).await.unwrap() });
    let client = reqwest::Client::new();
    let call = |method: &str, path: &str, body: Option<Value>| {
        let mut req = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let what = format!("{method} {path}");
        async move {
            let resp = req.send().await.with_context(|| what.clone())?;
            let status = resp.status();
            let body: Value = resp.json().await.with_context(|| what.clone())?;
            ensure!(status.is_success(), "{what}: {status} {body}");
            anyhow::Ok(body)
        }
    };
    // Polls `retrieve` every 5 ms until the job is in `want`; returns the job.
    let wait_state = |id: String, want: &'static str| {
        let call = &call;
        async move {
            let t0 = Instant::now();
            loop {
                let job = call("GET", &format!("/api/jobs/retrieve?id={id}"), None).await?;
                match job["status"]["state"].as_str() {
                    Some(s) if s == want => return anyhow::Ok(job),
                    Some("FAILURE") => bail!("job {id} failed: {job}"),
                    _ if t0.elapsed() > PATIENCE => bail!("job {id} not {want}: {job}"),
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }
    };
    let spec = json!({
        "application": { "name": "busybox-tiny", "version": "1" },
        "product": { "id": "vm-small", "category": "vm", "provider": "vmhost" },
        "allowDuplicateJob": true,
    });
    for i in 0..runs {
        let created = call("POST", "/api/jobs", Some(json!({ "items": [spec] }))).await?;
        let id = created["responses"][0]["id"]
            .as_str()
            .with_context(|| format!("no job id in {created}"))?
            .to_owned();
        let items = json!({ "items": [{ "id": id }] });
        wait_state(id.clone(), "RUNNING").await?;
        let domain = format!("{PREFIX}-{id}-0");
        let vm_dir = vm_root.join(&domain);
        let log = vm_dir.join("console.log");
        wait_for_banner(&log, 1).await?;

        let t0 = Instant::now();
        call("POST", "/api/jobs/suspend", Some(items.clone())).await?;
        let job = wait_state(id.clone(), "SUSPENDED").await?;
        samples.suspend.push(t0.elapsed());
        samples.suspend_messages.push(
            job["updates"][0]["status"]
                .as_str()
                .unwrap_or("?")
                .to_owned(),
        );
        ensure!(domstate(&domain) == "shut off", "{domain} still runs");

        let t0 = Instant::now();
        call("POST", "/api/jobs/unsuspend", Some(items.clone())).await?;
        wait_state(id.clone(), "RUNNING").await?;
        samples.unsuspend.push(t0.elapsed());
        wait_for_banner(&log, 2).await?;

        // The floor: the persistent XML vmhost defined, on fresh copies of its files, run by
        // virsh alone. The job goes first so that one guest runs at a time, as for vmhost.
        let xml = virsh_ok(&["dumpxml", "--inactive", &domain])?;
        let floor_dir = dir.join(format!("floor-{i}"));
        let floor_name = format!("{PREFIX}-floor-{i}");
        common::prepare_floor(&vm_dir, &floor_dir)?;
        let floor_xml = common::floor_xml(&xml, &domain, &floor_name, &vm_dir, &floor_dir);
        ensure!(
            !floor_xml.contains(&domain),
            "floor XML still names {domain}"
        );
        let xml_path = floor_dir.join("domain.xml");
        std::fs::write(&xml_path, floor_xml)?;
        call("POST", "/api/jobs/terminate", Some(items)).await?;
        wait_state(id.clone(), "SUCCESS").await?;

        let floor = floor_run(&floor_name, &floor_dir, &xml_path, samples).await;
        common::virsh(&["destroy", &floor_name]);
        common::virsh(&["undefine", &floor_name]);
        std::fs::remove_dir_all(&floor_dir)?;
        floor?;
        eprintln!(
            "run {}/{runs}: suspend {:?} shutdown {:?} unsuspend {:?} start {:?}",
            i + 1,
            samples.suspend[i],
            samples.shutdown[i],
            samples.unsuspend[i],
            samples.start[i]
        );
    }
    Ok(())
}

/// Defines and boots the floor domain, then times `virsh shutdown` and `virsh start` on it.
async fn floor_run(
    name: &str,
    dir: &Path,
    xml_path: &Path,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let log: PathBuf = dir.join("console.log");
    virsh_ok(&["define", xml_path.to_str().unwrap()])?;
    virsh_ok(&["start", name])?;
    wait_for_banner(&log, 1).await?;

    // `--mode acpi`: the power button, as vmhost presses it (plain `virsh shutdown` would try
    // the guest agent first if one answered).
    let t0 = Instant::now();
    virsh_ok(&["shutdown", "--mode", "acpi", name])?;
    let mut pressed = t0;
    while domstate(name) != "shut off" {
        ensure!(t0.elapsed() < PATIENCE, "{name} did not power off");
        // vmhost presses again after suspend_retry_secs (1 s); the floor does too, but only if
        // the guest did not react (libvirt's teardown after the guest's power-off takes > 1 s).
        if pressed.elapsed() >= Duration::from_secs(1) && count(&log, POWERING_OFF) == 0 {
            samples.floor_repeats += 1;
            common::virsh(&["shutdown", "--mode", "acpi", name]);
            pressed = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    samples.shutdown.push(t0.elapsed());

    let t0 = Instant::now();
    virsh_ok(&["start", name])?;
    samples.start.push(t0.elapsed());
    // The guest really comes back (as checked for vmhost's unsuspend).
    wait_for_banner(&log, 2).await
}
