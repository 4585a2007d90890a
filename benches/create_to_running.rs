//! Create request to RUNNING: vmhost beside `virsh create` of the same domain XML (the floor).
//!
//! Needs libvirtd and the busybox-tiny image (`images/build-images.sh`); prints figures and a
//! ratio. Run: `cargo bench --bench create_to_running` (as root). `BENCH_RUNS` sets the count.

mod common;

use std::path::Path;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::Accel;
use vmhost::config::{BackendKind, Config, UserConfig};
use vmhost::network::config::PrivateNetworkConfig;
use vmhost::network::nft::NftFirewall;

const TOKEN: &str = "bench-token-0123";
const PREFIX: &str = "vmhost-bench-ctr";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let images = Path::new("/var/lib/vmhost/images/busybox-tiny/initrd.img");
    if !Path::new("/var/run/libvirt/libvirt-sock").exists() || !images.exists() {
        println!("create_to_running: needs libvirtd and the busybox-tiny image; skipped");
        return;
    }
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    for name in String::from_utf8_lossy(&common::virsh(&["list", "--all", "--name"]).stdout).lines()
    {
        if name.starts_with(PREFIX) {
            common::virsh(&["destroy", name]);
            common::virsh(&["undefine", name]);
        }
    }
    let dir = tempfile::Builder::new()
        .prefix("vmhost-bench-")
        .tempdir_in("/var/tmp")
        .unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = Config {
        backend: BackendKind::Libvirt,
        data_dir: dir.path().to_owned(),
        domain_prefix: PREFIX.into(),
        // Measured against `virsh` on the same domain XML, which has no NIC.
        private_network: PrivateNetworkConfig {
            enabled: false,
            ..PrivateNetworkConfig::default()
        },
        users: vec![UserConfig {
            name: "bench".into(),
            token: TOKEN.into(),
        }],
        ..Config::default()
    };
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let daemon = vmhost::server::build_with(
        config,
        backend,
        Arc::new(NftFirewall::default()),
        Accel::Tcg,
    )
    .await
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, daemon.router).await.unwrap() });
    let client = reqwest::Client::new();
    let call = |method: &str, path: &str, body: Option<Value>| {
        let mut req = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { req.send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let spec = json!({
        "application": { "name": "busybox-tiny", "version": "1" },
        "product": { "id": "vm-small", "category": "vm", "provider": "vmhost" },
        "allowDuplicateJob": true,
    });
    let mut vmhost_samples = Vec::new();
    let mut floor_samples = Vec::new();
    for i in 0..runs {
        let t0 = Instant::now();
        let created = call("POST", "/api/jobs", Some(json!({ "items": [spec] }))).await;
        let id = created["responses"][0]["id"].as_str().unwrap().to_owned();
        loop {
            let job = call("GET", &format!("/api/jobs/retrieve?id={id}"), None).await;
            match job["status"]["state"].as_str() {
                Some("RUNNING") => break,
                Some("FAILURE") => panic!("job failed: {job}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        vmhost_samples.push(t0.elapsed());

        // The floor: the very XML vmhost defined, on fresh copies of its files, via virsh.
        let domain = format!("{PREFIX}-{id}-0");
        let xml = String::from_utf8(common::virsh(&["dumpxml", &domain]).stdout).unwrap();
        let vm_dir = dir.path().join("vms").join(&domain);
        let floor_dir = dir.path().join(format!("floor-{i}"));
        common::prepare_floor(&vm_dir, &floor_dir).unwrap();
        let floor_name = format!("{PREFIX}-floor-{i}");
        let floor_xml = common::floor_xml(&xml, &domain, &floor_name, &vm_dir, &floor_dir);
        let xml_path = floor_dir.join("domain.xml");
        std::fs::write(&xml_path, floor_xml).unwrap();
        call(
            "POST",
            "/api/jobs/terminate",
            Some(json!({ "items": [{ "id": id }] })),
        )
        .await;
        let t0 = Instant::now();
        let out = common::virsh(&["create", xml_path.to_str().unwrap()]);
        floor_samples.push(t0.elapsed());
        assert!(
            out.status.success(),
            "virsh create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::virsh(&["destroy", &floor_name]);
        std::fs::remove_dir_all(&floor_dir).unwrap();
        loop {
            let job = call("GET", &format!("/api/jobs/retrieve?id={id}"), None).await;
            if job["status"]["state"] == "SUCCESS" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!("create request to RUNNING, busybox-tiny under TCG, {runs} runs");
    let ours = common::stats("vmhost POST -> RUNNING", &mut vmhost_samples);
    let floor = common::stats("virsh create (floor)", &mut floor_samples);
    println!("ratio vmhost / virsh create (medians): {:.2}", ours / floor);
}
