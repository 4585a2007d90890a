//! Public IPs, the firewall, anti-spoofing and peers on real TCG VMs.
//!
//! The test builds its own world and tears it down: a bridge holding a "public" pool in
//! 203.0.113.0/24, a network namespace as the outside host on that bridge (203.0.113.1, the
//! pool's gateway), and its own private libvirt network. All traffic stays on that bridge,
//! that namespace and those VMs.

mod common;
#[path = "common/real.rs"]
mod real;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestDaemon;
use serde_json::{json, Value};
use vmhost::backend::libvirt::LibvirtBackend;
use vmhost::backend::Accel;
use vmhost::network::config::{PrivateNetworkConfig, PublicPoolConfig};

const OUTSIDE: &str = "203.0.113.1";

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) -> String {
    ok(Command::new("ip").args(args))
}

/// The test's bridge and outside namespace; removed on drop (and, for dead runs, on start).
struct World {
    bridge: String,
    netns: String,
    veth: String,
}

impl World {
    fn names(pid: u32) -> (String, String, String) {
        (
            format!("vhtb{pid}"),
            format!("vmhost-test-out-{pid}"),
            format!("vhto{pid}"),
        )
    }

    /// Removes what dead earlier runs left (their pid is in the names): the namespace, bridge
    /// and veth, the private network and the firewall tables.
    fn remove_leftovers() {
        let dead = |pid: &str| !pid.is_empty() && !Path::new("/proc").join(pid).exists();
        let virsh = |args: &[&str]| {
            let out = run(Command::new("virsh")
                .args(["-c", "qemu:///system"])
                .args(args));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        for network in virsh(&["net-list", "--all", "--name"])
            .lines()
            .map(str::trim)
        {
            if network.strip_prefix("vmhost-test-").is_some_and(dead) {
                virsh(&["net-destroy", network]);
                virsh(&["net-undefine", network]);
            }
        }
        let tables =
            String::from_utf8_lossy(&run(Command::new("nft").args(["list", "tables"])).stdout)
                .into_owned();
        for line in tables.lines() {
            let mut words = line.split_whitespace().skip(1);
            let (Some(family), Some(table)) = (words.next(), words.next()) else {
                continue;
            };
            if table.strip_prefix("vmhost_e2e_net_p").is_some_and(dead) {
                let _ = run(Command::new("nft").args(["delete", "table", family, table]));
            }
        }
        let netns =
            String::from_utf8_lossy(&run(Command::new("ip").args(["netns", "list"])).stdout)
                .into_owned();
        for line in netns.lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let Some(pid) = name.strip_prefix("vmhost-test-out-") else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                if let Ok(pid) = pid.parse() {
                    World::teardown(pid);
                }
            }
        }
    }

    fn teardown(pid: u32) {
        let (bridge, netns, veth) = World::names(pid);
        for args in [
            vec!["netns", "delete", netns.as_str()],
            vec!["link", "delete", veth.as_str()],
            vec!["link", "delete", bridge.as_str()],
        ] {
            let _ = run(Command::new("ip").args(&args));
        }
    }

    fn build() -> World {
        World::remove_leftovers();
        let pid = std::process::id();
        let (bridge, netns, veth) = World::names(pid);
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["link", "set", &bridge, "up"]);
        ip(&["netns", "add", &netns]);
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(&["link", "set", &veth, "master", &bridge, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{OUTSIDE}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        World {
            bridge,
            netns,
            veth,
        }
    }

    /// A command run inside the outside namespace.
    fn outside(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns, program]);
        cmd
    }

    /// Whether a TCP connection from outside to `address:port` is accepted within 3 s.
    fn tcp_reachable(&self, address: &str, port: u16) -> bool {
        let script = format!(
            "import socket\ns=socket.socket()\ns.settimeout(3)\n\
             try:\n    s.connect(('{address}', {port}))\n    print('open')\n\
             except Exception as e:\n    print('closed', e)\n"
        );
        let out = ok(self.outside("python3").args(["-c", &script]));
        out.starts_with("open")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = (&self.bridge, &self.veth);
        World::teardown(std::process::id());
    }
}

/// SSH into a VM from the outside namespace with the job's key.
struct Ssh {
    key: PathBuf,
    user: String,
}

impl Ssh {
    fn command(&self, world: &World, host: &str, remote: &str) -> Command {
        let mut cmd = world.outside("ssh");
        cmd.args(["-i"])
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("{}@{host}", self.user))
            .arg(remote);
        cmd
    }

    /// Runs `remote` on the VM; panics if it fails.
    fn run(&self, world: &World, host: &str, remote: &str) -> String {
        ok(&mut self.command(world, host, remote))
    }

    /// Waits until SSH on `host` answers and cloud-init has finished: its last modules may
    /// restart sshd, and a connection attempted then is refused.
    async fn wait(&self, world: &World, host: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let remote = "cloud-init status --wait >/dev/null 2>&1; hostname";
            let out = run(&mut self.command(world, host, remote));
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).trim().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "SSH to {host} never answered: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
}

fn keypair(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    ok(Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "vmhost-network-test",
            "-f",
        ])
        .arg(&key));
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_owned())
}

/// vmhost's rules in both families, as `nft` lists them.
fn nft_rules(table: &str) -> String {
    ["bridge", "ip"]
        .iter()
        .map(|family| {
            let out = run(Command::new("nft").args(["list", "table", family, table]));
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

async fn create_ip(d: &TestDaemon, pool: &str, open: Value) -> (String, String) {
    let item = json!({
        "product": {"id": pool, "category": pool, "provider": "vmhost"},
        "firewall": {"openPorts": open},
    });
    let (status, body) = d.post("/api/networkips", json!({"items": [item]})).await;
    assert_eq!(status, 200, "{body}");
    let id = body["responses"][0]["id"].as_str().unwrap().to_owned();
    let (_, ip) = d.get(&format!("/api/networkips/retrieve?id={id}")).await;
    (id, ip["status"]["ipAddress"].as_str().unwrap().to_owned())
}

fn vm_job(name: &str, key: &str, resources: Value) -> Value {
    let mut spec = common::vm_spec();
    spec["name"] = json!(name);
    spec["parameters"] = json!({"sshPublicKeys": {"type": "text", "value": key}});
    spec["resources"] = resources;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_ip_firewall_antispoofing_and_peers_on_real_vms() {
    if !real::available("network e2e", &["debian12-cloud"]) {
        return;
    }
    let prefix = real::prefix("net");
    real::remove_leftovers(&prefix);
    let world = World::build();
    let dir = real::data_dir();
    let (key, public_key) = keypair(dir.path());
    let pid = std::process::id();
    let pool_name = "public-test";
    let mut config = real::libvirt_config(common::config(dir.path()), &prefix);
    config.private_network = PrivateNetworkConfig {
        enabled: true,
        name: format!("vmhost-test-{pid}"),
        bridge: format!("vhtp{pid}"),
        subnet: format!("10.251.{}.0/24", pid % 250).parse().unwrap(),
    };
    config.public_pools = vec![PublicPoolConfig {
        name: pool_name.into(),
        subnet: "203.0.113.0/24".parse().unwrap(),
        gateway: OUTSIDE.parse().unwrap(),
        dns: vec![OUTSIDE.parse().unwrap()],
        exclude: Vec::new(),
        bridge: world.bridge.clone(),
        description: String::new(),
    }];
    let private_network = config.private_network.name.clone();
    let backend = Arc::new(LibvirtBackend::connect("qemu:///system").await.unwrap());
    let d = TestDaemon::start_with(config, backend, Accel::Tcg).await;
    let table = prefix.replace('-', "_");

    // First VM: a public IP with only SSH open. Second VM: its own IP, and a peer "alpha".
    let (ip1_id, ip1) = create_ip(
        &d,
        pool_name,
        json!([{"start": 22, "end": 22, "protocol": "TCP"}]),
    )
    .await;
    let (ip2_id, ip2) = create_ip(
        &d,
        pool_name,
        json!([{"start": 22, "end": 22, "protocol": "TCP"}]),
    )
    .await;
    let first = d
        .create(vm_job(
            "first",
            &public_key,
            json!([{"type": "network", "id": ip1_id}]),
        ))
        .await;
    d.wait_state(&first, "RUNNING", 60).await;
    let second = d
        .create(vm_job(
            "second",
            &public_key,
            json!([{"type": "network", "id": ip2_id}, {"type": "peer", "hostname": "alpha", "jobId": first}]),
        ))
        .await;
    d.wait_state(&second, "RUNNING", 60).await;
    let rules = nft_rules(&table);
    assert!(rules.contains(&ip1) && rules.contains(&ip2), "{rules}");

    let ssh = Ssh {
        key,
        user: "debian".into(),
    };
    assert_eq!(
        ssh.wait(&world, &ip1, Duration::from_secs(400)).await,
        "first"
    );
    assert_eq!(
        ssh.wait(&world, &ip2, Duration::from_secs(400)).await,
        "second"
    );

    // A port the VM listens on but the firewall does not open is unreachable from outside...
    ssh.run(
        &world,
        &ip1,
        "nohup python3 -m http.server 8080 >/dev/null 2>&1 </dev/null & \
         for i in $(seq 60); do \
           python3 -c \"import socket; socket.create_connection(('127.0.0.1', 8080), 3)\" 2>/dev/null && exit 0; \
           sleep 1; done; exit 1",
    );
    assert!(world.tcp_reachable(&ip1, 22), "SSH is open");
    assert!(!world.tcp_reachable(&ip1, 8080), "8080 must be filtered");
    // ...until the firewall opens it, while the VM keeps running.
    let open = json!([
        {"start": 22, "end": 22, "protocol": "TCP"},
        {"start": 8080, "end": 8080, "protocol": "TCP"},
    ]);
    let (status, body) = d
        .post(
            "/api/networkips/firewall",
            json!({"items": [{"id": ip1_id, "firewall": {"openPorts": open}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(world.tcp_reachable(&ip1, 8080), "8080 opened live");

    // Anti-spoofing: from inside the VM, UDP from its own address arrives, from another not.
    let listener = world
        .outside("python3")
        .args([
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0',9999))\ns.settimeout(20)\nseen=set()\nend=time.time()+20\n\
             while time.time()<end:\n    try:\n        d,a=s.recvfrom(100)\n        seen.add(a[0]); print(a[0], flush=True)\n    except Exception:\n        break\n",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spoofed = "203.0.113.250";
    ssh.run(
        &world,
        &ip1,
        &format!(
            "nic=$(ip -o -4 addr show | awk '/{ip1}\\//{{print $2}}'); \
             sudo ip addr add {spoofed}/32 dev $nic; \
             for i in 1 2 3; do \
               python3 -c \"import socket; s=socket.socket(2,2); s.bind(('{spoofed}',0)); s.sendto(b'x',('{OUTSIDE}',9999))\"; \
               python3 -c \"import socket; s=socket.socket(2,2); s.bind(('{ip1}',0)); s.sendto(b'x',('{OUTSIDE}',9999))\"; \
               sleep 1; done; sudo ip addr del {spoofed}/32 dev $nic"
        ),
    );
    let out = listener.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains(&ip1), "its own address must arrive: {seen:?}");
    assert!(
        !seen.contains(spoofed),
        "a spoofed source must not arrive: {seen:?}"
    );

    // Peers: inside the second VM "alpha" is the first VM's private address, and it connects.
    let resolved = ssh.run(&world, &ip2, "getent hosts alpha");
    let alpha: String = resolved
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .into();
    assert!(
        alpha.starts_with("10.251."),
        "alpha resolved to {resolved:?}"
    );
    ssh.run(
        &world,
        &ip2,
        "python3 -c \"import socket; socket.create_connection(('alpha', 22), 5).recv(7)\"",
    );
    // ...and the first reaches the second back on the private network.
    let second_private = ssh.run(
        &world,
        &ip2,
        "ip -o -4 addr show | awk '/10\\.251\\./{print $4}'",
    );
    let second_private = second_private.trim().split('/').next().unwrap().to_owned();
    ssh.run(
        &world,
        &ip1,
        &format!(
            "python3 -c \"import socket; socket.create_connection(('{second_private}', 22), 5)\""
        ),
    );

    // Terminate releases the addresses and removes the rules and leases.
    let (status, _) = d
        .post(
            "/api/jobs/terminate",
            json!({"items": [{"id": first}, {"id": second}]}),
        )
        .await;
    assert_eq!(status, 200);
    d.wait_state(&first, "SUCCESS", 120).await;
    d.wait_state(&second, "SUCCESS", 120).await;
    for id in [&ip1_id, &ip2_id] {
        let (_, ip) = d.get(&format!("/api/networkips/retrieve?id={id}")).await;
        assert_eq!(ip["status"]["boundTo"], json!([]), "{ip}");
    }
    let rules = nft_rules(&table);
    assert!(!rules.contains(&ip1) && !rules.contains(&ip2), "{rules}");
    assert!(real::domains_with_prefix(&prefix).is_empty());
    let hosts = std::fs::read_to_string(format!(
        "/var/lib/libvirt/dnsmasq/{private_network}.hostsfile"
    ))
    .unwrap_or_default();
    assert!(hosts.trim().is_empty(), "leases left: {hosts}");
    d.kill();
    // The private network and the test's firewall tables are the test's own: remove them.
    let _ =
        run(Command::new("virsh").args(["-c", "qemu:///system", "net-destroy", &private_network]));
    let _ =
        run(Command::new("virsh").args(["-c", "qemu:///system", "net-undefine", &private_network]));
    for family in ["bridge", "ip"] {
        let _ = run(Command::new("nft").args(["delete", "table", family, &table]));
    }
}
