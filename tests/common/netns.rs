//! A small network built inside network namespaces for firewall tests: nothing of it is in
//! the host's namespace, so the host's interfaces and ruleset are never touched.
//!
//! ```text
//!  outside ns (203.0.113.1)                vm namespaces: one veth per NIC, MAC and address
//!        │ eth0                            from the plan; the host-side ends carry the tap
//!  ┌─────┴──────────── host ns ─────────┐   names of the plan.
//!  │ brpub ── taps of public NICs       │
//!  │ brpriv (10.213.0.1) ── private taps│
//!  └────────────────────────────────────┘
//! ```
//!
//! Probes are small python3 programs run with `ip netns exec`: TCP listeners and connects,
//! UDP datagrams, and raw Ethernet frames (sent with AF_PACKET, caught by a raw socket) for
//! what sockets cannot forge. Only 203.0.113.0/24, 198.51.100.0/24 and 10.213.0.0/24 are used.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use vmhost::network::nft::NftFirewall;

/// Length of the marker each probe sends, for the length fields of raw frames.
pub const MARKER_LEN: usize = 24;
/// How long a probe waits for something that should arrive (and so for what must not).
pub const PROBE_SECS: f64 = 0.8;
const PREFIX: &str = "vmfw";

/// Whether the netns tests can run: root, `ip`, `nft` and python3. Skipped with a note
/// otherwise, unless `VMHOST_REQUIRE_REAL_VM` is set (CI), which turns the skip into a failure.
pub fn available(test: &str) -> bool {
    let mut missing = Vec::new();
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if !root {
        missing.push("root".to_owned());
    }
    for (tool, arg) in [("ip", "-V"), ("nft", "--version"), (python(), "--version")] {
        if Command::new(tool).arg(arg).output().is_err() {
            missing.push(tool.to_owned());
        }
    }
    crate::real::runnable(test, &missing)
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// Runs a command and insists it succeeds.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deletes namespaces of earlier runs whose process is gone (`vmfw<pid>_<n><role>`).
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('_') else {
            continue;
        };
        if pid.is_empty() || !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if !Path::new("/proc").join(pid).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

/// A VM's NIC as the test world builds it.
#[derive(Debug, Clone)]
pub struct VmNic {
    /// The VM's namespace.
    pub ns: String,
    /// Inside the VM.
    pub dev: String,
    pub tap: String,
    pub mac: String,
    pub address: Ipv4Addr,
}

/// The namespaces of one test; deleted (with every interface in them) on drop.
pub struct World {
    pub host: String,
    pub outside: String,
    tag: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

pub const OUTSIDE_MAC: &str = "02:00:00:00:00:01";
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);

impl World {
    /// The host namespace with both bridges (stateful bridge filtering switched on, IPv4
    /// forwarding on, ICMP redirects off) and the outside namespace on the public bridge.
    pub fn new() -> World {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        remove_leftovers();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{PREFIX}{}_{n}", std::process::id());
        let mut world = World {
            host: String::new(),
            outside: String::new(),
            tag,
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        world.host = world.netns("h");
        world.outside = world.netns("o");
        let h = world.host.clone();
        // br_netfilter's switches are per namespace: set them here, not on the host.
        world.sysctl(&h, "net.bridge.bridge-nf-call-iptables", "1");
        world.sysctl(&h, "net.ipv4.ip_forward", "1");
        world.sysctl(&h, "net.ipv4.conf.all.send_redirects", "0");
        world.sysctl(&h, "net.ipv4.conf.default.send_redirects", "0");
        for bridge in ["brpub", "brpriv"] {
            run(&["ip", "-n", &h, "link", "add", bridge, "type", "bridge"]);
            run(&["ip", "-n", &h, "link", "set", bridge, "up"]);
        }
        run(&[
            "ip",
            "-n",
            &h,
            "addr",
            "add",
            "10.213.0.1/24",
            "dev",
            "brpriv",
        ]);
        world.link(
            "brpub",
            "vout",
            &world.outside.clone(),
            "eth0",
            OUTSIDE_MAC,
            "203.0.113.1/24",
        );
        world
    }

    /// A new namespace `<tag><role>` with loopback up.
    pub fn netns(&mut self, role: &str) -> String {
        let name = format!("{}{role}", self.tag);
        assert!(name.len() <= 15, "{name}");
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]);
        let out = run(&["ip", "netns", "exec", ns, "sysctl", "-n", key]);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            value,
            "{key} in {ns}"
        );
    }

    /// A veth from `bridge` in the host namespace (end `tap`) to `dev` in `ns`.
    fn link(&self, bridge: &str, tap: &str, ns: &str, dev: &str, mac: &str, cidr: &str) {
        let h = &self.host;
        run(&[
            "ip", "-n", h, "link", "add", tap, "type", "veth", "peer", "name", dev, "netns", ns,
        ]);
        run(&["ip", "-n", h, "link", "set", tap, "master", bridge, "up"]);
        run(&["ip", "-n", ns, "link", "set", dev, "address", mac, "up"]);
        run(&["ip", "-n", ns, "addr", "add", cidr, "dev", dev]);
    }

    /// A VM NIC on the public bridge (`/24` of 203.0.113.0) or the private one (10.213.0.0/24).
    pub fn vm_nic(&self, ns: &str, dev: &str, tap: &str, mac: &str, address: Ipv4Addr) -> VmNic {
        let private = address.octets()[0] == 10;
        let bridge = if private { "brpriv" } else { "brpub" };
        self.link(bridge, tap, ns, dev, mac, &format!("{address}/24"));
        // Guests in these tests take no ICMP redirects, so a route via the gateway stays one.
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.accept_redirects=0",
            ])
            .output();
        VmNic {
            ns: ns.to_owned(),
            dev: dev.to_owned(),
            tap: tap.to_owned(),
            mac: mac.to_owned(),
            address,
        }
    }

    /// vmhost's nft, run inside the host namespace.
    pub fn firewall(&self) -> NftFirewall {
        NftFirewall::with_command(["ip", "netns", "exec", &self.host, "nft"])
    }

    /// `nft <args>` in the host namespace, for inspection and foreign tables.
    pub fn nft(&self, args: &[&str]) -> String {
        let mut all = vec!["ip", "netns", "exec", &self.host, "nft"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&run(&all).stdout).into_owned()
    }

    /// Starts a TCP server on `port` in `ns` that answers `ok` to every connection; it lives
    /// until the world is dropped (or this process dies).
    pub fn tcp_listen(&mut self, ns: &str, port: u16) {
        let child = self.start(ns, TCP_SERVER, &[&port.to_string()]);
        self.children.push(child);
    }

    /// Whether a TCP connection from `ns` to `addr:port` gets the server's `ok`.
    pub fn tcp_reaches(&self, ns: &str, addr: Ipv4Addr, port: u16) -> bool {
        let args = [addr.to_string(), port.to_string(), PROBE_SECS.to_string()];
        self.python(ns, TCP_CONNECT, &args).status.success()
    }

    /// Whether a UDP datagram from `from_ns` (bound to `src`, if given) to `dst:port` arrives
    /// at a socket on that port in `to_ns`.
    pub fn udp_arrives(
        &self,
        from_ns: &str,
        src: Option<Ipv4Addr>,
        to_ns: &str,
        dst: Ipv4Addr,
        port: u16,
    ) -> bool {
        let marker = self.marker();
        let mut receiver = self.start(
            to_ns,
            UDP_RECEIVE,
            &[&port.to_string(), &PROBE_SECS.to_string(), &marker],
        );
        let src = src.map(|a| a.to_string()).unwrap_or_default();
        let args = [src, dst.to_string(), port.to_string(), marker];
        let sent = self.python(from_ns, UDP_SEND, &args);
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        receiver.wait().unwrap().success()
    }

    /// Whether a raw Ethernet frame sent on `dev` in `from_ns` is seen on `seen_dev` in `to_ns`.
    /// A unique marker is appended to `frame`, and the receiver looks only for it.
    pub fn frame_arrives(
        &self,
        from_ns: &str,
        dev: &str,
        frame: &[u8],
        to_ns: &str,
        seen_dev: &str,
    ) -> bool {
        let marker = self.marker();
        let mut frame = frame.to_vec();
        frame.extend_from_slice(marker.as_bytes());
        let mut receiver = self.start(
            to_ns,
            FRAME_RECEIVE,
            &[seen_dev, &PROBE_SECS.to_string(), &marker],
        );
        let sent = self.python(from_ns, FRAME_SEND, &[dev.to_owned(), hex::encode(&frame)]);
        assert!(
            sent.status.success(),
            "{}",
            String::from_utf8_lossy(&sent.stderr)
        );
        receiver.wait().unwrap().success()
    }

    /// [`MARKER_LEN`] bytes, unique per probe of this process.
    fn marker(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        format!("vmfw{:010}{n:010}", std::process::id())
    }

    fn python<S: AsRef<str>>(&self, ns: &str, program: &str, args: &[S]) -> Output {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, python(), "-c", program]);
        cmd.args(args.iter().map(AsRef::as_ref));
        cmd.output().unwrap()
    }

    /// Starts `program` in `ns` and waits for its `ready` line.
    fn start(&self, ns: &str, program: &str, args: &[&str]) -> Child {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, python(), "-c", program])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "probe in {ns} did not start");
        child
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Servers exit when the test process that started them is gone.
const TCP_SERVER: &str = r#"
import os, socket, sys
parent = os.getppid()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
s.settimeout(1)
print("ready", flush=True)
while os.getppid() == parent:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.sendall(b"ok")
    c.close()
"#;

const TCP_CONNECT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    sys.exit(0 if s.recv(2) == b"ok" else 1)
except OSError:
    sys.exit(1)
"#;

const UDP_RECEIVE: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
deadline = time.time() + float(sys.argv[2])
print("ready", flush=True)
while time.time() < deadline:
    s.settimeout(max(deadline - time.time(), 0.01))
    try:
        data, _ = s.recvfrom(2048)
    except socket.timeout:
        break
    if data == sys.argv[3].encode():
        sys.exit(0)
sys.exit(1)
"#;

const UDP_SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
if sys.argv[1]:
    s.bind((sys.argv[1], 0))
for _ in range(3):
    s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"#;

const FRAME_RECEIVE: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
deadline = time.time() + float(sys.argv[2])
marker = sys.argv[3].encode()
print("ready", flush=True)
while time.time() < deadline:
    s.settimeout(max(deadline - time.time(), 0.01))
    try:
        frame = s.recv(65535)
    except socket.timeout:
        break
    if marker in frame:
        sys.exit(0)
sys.exit(1)
"#;

const FRAME_SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((sys.argv[1], 0))
for _ in range(3):
    s.send(bytes.fromhex(sys.argv[2]))
"#;

/// Raw frames for the probes that sockets cannot forge.
pub mod frame {
    use std::net::Ipv4Addr;

    pub const BROADCAST: &str = "ff:ff:ff:ff:ff:ff";

    pub fn mac(s: &str) -> [u8; 6] {
        let bytes: Vec<u8> = s
            .split(':')
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    }

    pub fn ethernet(dst: &str, src: &str, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&mac(dst));
        f.extend_from_slice(&mac(src));
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// An 802.1Q-tagged frame: the tag, then `ethertype` and `payload`.
    pub fn vlan(dst: &str, src: &str, vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut inner = vid.to_be_bytes().to_vec();
        inner.extend_from_slice(&ethertype.to_be_bytes());
        inner.extend_from_slice(payload);
        ethernet(dst, src, 0x8100, &inner)
    }

    /// An ARP request from `sender`: `(mac, ip)` in the ARP body.
    pub fn arp(sender_mac: &str, sender_ip: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&mac(sender_mac));
        a.extend_from_slice(&sender_ip.octets());
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target.octets());
        a
    }

    /// An IPv4 header and a UDP header (checksum 0, none) for `len` bytes of data that the
    /// probe appends (its marker). The IP checksum is right: br_netfilter drops bad ones.
    pub fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, len: usize) -> Vec<u8> {
        let total = (20 + 8 + len) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let sum = ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        let sum = !((sum & 0xffff) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&sport.to_be_bytes());
        ip.extend_from_slice(&dport.to_be_bytes());
        ip.extend_from_slice(&((8 + len) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip
    }

    /// A minimal IPv6 header (link-local to all-nodes, no next header) for `len` bytes.
    pub fn ipv6(len: usize) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&(len as u16).to_be_bytes());
        ip.extend_from_slice(&[59, 255]);
        ip.extend_from_slice(&[
            0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x50, 0x54, 0, 0xff, 0xfe, 0, 1, 0x0a,
        ]);
        ip.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        ip
    }
}
