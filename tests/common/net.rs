//! Helpers for the real private-network tests: test names carrying the pid, free test
//! subnets, network namespaces with a veth on a bridge, a DHCP client in them, and removal of
//! the leftovers of dead test processes. Everything is named `vh…<pid>…` or
//! `vmhost-test-…-<pid>-…`, so only this test's own resources are ever touched.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

/// Prefix of the libvirt networks these tests define: `vmhost-test-pnet-<pid>-<n>`.
pub const NET_PREFIX: &str = "vmhost-test-pnet-";
/// Prefix of the network namespaces: `vmhost-test-ns-<pid>-<n>`.
pub const NS_PREFIX: &str = "vmhost-test-ns-";
/// Prefix of the plain Linux bridges some tests create: `vhr<pid>`.
pub const BRIDGE_PREFIX: &str = "vhr";

/// Runs a command and returns its stdout; panics with stderr if it fails.
pub fn run(args: &[&str]) -> String {
    try_run(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// Runs a command; `Err(stderr)` if it fails.
pub fn try_run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", args[0]))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn pid_is_dead(pid: &str) -> bool {
    pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in `<prefix><pid>-…` or `<prefix><pid>`.
fn pid_of<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    Some(
        rest.split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or(""),
    )
}

/// A `10.250.x.1/24` gateway whose subnet no route on this host uses yet (libvirt refuses to
/// start a network on a subnet in use), starting from one derived from the pid and `salt`.
pub fn free_subnet(salt: u32) -> Ipv4Addr {
    let routes = run(&["ip", "-4", "route", "show"]);
    let start = (std::process::id() + salt * 37) % 200;
    for i in 0..200 {
        let x = u8::try_from(20 + (start + i) % 200).expect("small");
        if !routes.contains(&format!("10.250.{x}.")) {
            return Ipv4Addr::new(10, 250, x, 1);
        }
    }
    panic!("no free 10.250.x.0/24 subnet");
}

/// Removes the test networks, namespaces and bridges of test processes that are gone.
pub fn remove_leftovers(conn: &virt::connect::Connect) {
    for n in conn.list_all_networks(0).expect("list networks") {
        let Ok(name) = n.name() else { continue };
        if pid_of(&name, NET_PREFIX).is_some_and(pid_is_dead) {
            eprintln!("removing leftover network {name}");
            let _ = n.destroy();
            let _ = n.undefine();
        }
    }
    for ns in run(&["ip", "netns", "list"]).lines() {
        let name = ns.split_whitespace().next().unwrap_or("");
        if pid_of(name, NS_PREFIX).is_some_and(pid_is_dead) {
            eprintln!("removing leftover netns {name}");
            let _ = try_run(&["ip", "netns", "delete", name]);
        }
    }
    for line in run(&["ip", "-o", "link", "show", "type", "bridge"]).lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        if pid_of(name, BRIDGE_PREFIX).is_some_and(pid_is_dead) {
            eprintln!("removing leftover bridge {name}");
            let _ = try_run(&["ip", "link", "delete", name]);
        }
    }
}

/// A network namespace with one veth: the host end enslaved to a bridge, the namespace end
/// (`eth0`) with a chosen MAC. Deleted (with both veth ends) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(n: u32, bridge: &str, mac: &str) -> Netns {
        let pid = std::process::id();
        let name = format!("{NS_PREFIX}{pid}-{n}");
        let host_end = format!("vhv{pid}x{n}");
        assert!(host_end.len() <= 15);
        run(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        run(&[
            "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ]);
        run(&["ip", "link", "set", &host_end, "master", bridge]);
        run(&["ip", "link", "set", &host_end, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.set_mac(mac);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn try_exec(&self, args: &[&str]) -> Result<String, String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        try_run(&full)
    }

    /// Sets the MAC of `eth0` and forgets its addresses.
    pub fn set_mac(&self, mac: &str) {
        self.exec(&["ip", "link", "set", "eth0", "down"]);
        self.exec(&["ip", "link", "set", "eth0", "address", mac]);
        self.exec(&["ip", "addr", "flush", "dev", "eth0"]);
        self.exec(&["ip", "link", "set", "eth0", "up"]);
    }

    /// Runs `busybox udhcpc` on `eth0` (`tries` discovers, 1 s apart) with a script that
    /// configures the address; the leased address, or `None` if no server offered one.
    pub fn dhcp(&self, script_dir: &Path, tries: u32) -> Option<Ipv4Addr> {
        let script = script_dir.join("udhcpc.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\n\
             case \"$1\" in\n\
             bound|renew) ip addr flush dev \"$interface\"; \
             ip addr add \"$ip/$mask\" dev \"$interface\"; echo \"LEASE=$ip\";;\n\
             esac\n",
        )
        .expect("write udhcpc script");
        let perms = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755);
        std::fs::set_permissions(&script, perms).expect("chmod");
        let tries = tries.to_string();
        let script = script.to_str().expect("utf-8");
        let out = self
            .try_exec(&[
                "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", &tries, "-T", "1", "-A",
                "1", "-s", script,
            ])
            .ok()?;
        out.lines()
            .find_map(|l| l.strip_prefix("LEASE="))
            .map(|a| a.parse().expect("an IPv4 address"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = try_run(&["ip", "netns", "delete", &self.name]);
    }
}

/// A plain Linux bridge (for `NicAttachment::Bridge`), deleted on drop.
pub struct HostBridge {
    pub name: String,
}

impl HostBridge {
    pub fn new() -> HostBridge {
        let name = format!("{BRIDGE_PREFIX}{}", std::process::id());
        run(&["ip", "link", "add", &name, "type", "bridge"]);
        run(&["ip", "link", "set", &name, "up"]);
        HostBridge { name }
    }
}

impl Drop for HostBridge {
    fn drop(&mut self) {
        let _ = try_run(&["ip", "link", "delete", &self.name]);
    }
}

/// The bridge `dev` is enslaved to, from `ip -o link show dev`.
pub fn master_of(dev: &str) -> Option<String> {
    let out = try_run(&["ip", "-o", "link", "show", "dev", dev]).ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "master")?;
    words.next().map(str::to_owned)
}
