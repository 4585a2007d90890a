//! The rendered firewall, applied with `NftFirewall` inside network namespaces (see
//! `common/netns.rs`), against real traffic: every check first passes without the firewall,
//! so a blocked probe is the firewall's doing and not a broken test network.
//!
//! Needs root, iproute2, nftables and python3; skipped otherwise unless
//! `VMHOST_REQUIRE_REAL_VM` is set.

#[path = "common/netns.rs"]
mod netns;
#[path = "common/real.rs"]
mod real;

use std::net::Ipv4Addr;

use netns::{frame, run, VmNic, World, GATEWAY, MARKER_LEN, OUTSIDE_IP, OUTSIDE_MAC};
use vmhost::network::firewall::{
    render, FirewallPlan, GuardedNic, GuardedVm, NicRole, PortRange, PrivateSegment, Protocol,
};
use vmhost::network::nft::Firewall;

const TABLE: &str = "vmhost";
const SPOOFED_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 77);
const SPOOFED_MAC: &str = "52:54:00:99:99:99";

/// Three VMs: alice's rank 0 (a public and a private NIC) and rank 1 (private), bob's VM
/// (private).
struct Setup {
    world: World,
    public1: VmNic,
    private1: VmNic,
    private2: VmNic,
    private3: VmNic,
}

fn setup() -> Setup {
    let mut world = World::new();
    let (a, b, c) = (world.netns("a"), world.netns("b"), world.netns("c"));
    let ip = |last| Ipv4Addr::new(203, 0, 113, last);
    let private = |last| Ipv4Addr::new(10, 213, 0, last);
    Setup {
        public1: world.vm_nic(&a, "eth0", "vh101r0en0", "52:54:00:00:01:0a", ip(10)),
        private1: world.vm_nic(&a, "eth1", "vh101r0en1", "52:54:00:00:00:0b", private(11)),
        private2: world.vm_nic(&b, "eth0", "vh101r1en0", "52:54:00:00:00:0c", private(12)),
        private3: world.vm_nic(&c, "eth0", "vh202r0en0", "52:54:00:00:00:0d", private(13)),
        world,
    }
}

fn guarded(nic: &VmNic, role: NicRole) -> GuardedNic {
    GuardedNic {
        tap: nic.tap.clone(),
        mac: nic.mac.clone(),
        address: nic.address,
        role,
    }
}

fn ports(ranges: &[(u16, u16, Protocol)]) -> Vec<PortRange> {
    ranges
        .iter()
        .map(|&(start, end, protocol)| PortRange {
            start,
            end,
            protocol,
        })
        .collect()
}

fn plan(s: &Setup, open_ports: Vec<PortRange>) -> FirewallPlan {
    let vm = |job: &str, rank, owner: &str, nics| GuardedVm {
        job_id: job.into(),
        rank,
        owner: owner.into(),
        nics,
    };
    FirewallPlan {
        table: TABLE.into(),
        private: Some(PrivateSegment {
            bridge: "brpriv".into(),
            subnet: "10.213.0.0/24".parse().unwrap(),
            gateway: GATEWAY,
        }),
        vms: vec![
            vm(
                "101",
                0,
                "alice",
                vec![
                    guarded(&s.private1, NicRole::Private),
                    guarded(&s.public1, NicRole::Public { open_ports }),
                ],
            ),
            vm(
                "101",
                1,
                "alice",
                vec![guarded(&s.private2, NicRole::Private)],
            ),
            vm(
                "202",
                0,
                "bob",
                vec![guarded(&s.private3, NicRole::Private)],
            ),
        ],
    }
}

#[tokio::test]
async fn a_public_address_takes_only_its_open_ports() {
    if !netns::available("a_public_address_takes_only_its_open_ports") {
        return;
    }
    let mut s = setup();
    let (vm, outside) = (s.public1.clone(), s.world.outside.clone());
    s.world.tcp_listen(&vm.ns, 22);
    s.world.tcp_listen(&vm.ns, 8080);
    s.world.tcp_listen(&outside, 7000);
    let w = &s.world;
    assert!(w.tcp_reaches(&outside, vm.address, 22));
    assert!(w.tcp_reaches(&outside, vm.address, 8080));
    assert!(w.udp_arrives(&outside, None, &vm.ns, vm.address, 6000));

    let open = [(22, 22, Protocol::Tcp), (5000, 5010, Protocol::Udp)];
    w.firewall().apply(&plan(&s, ports(&open))).await.unwrap();
    assert!(w.tcp_reaches(&outside, vm.address, 22), "open port");
    assert!(!w.tcp_reaches(&outside, vm.address, 8080), "closed port");
    assert!(
        w.udp_arrives(&outside, None, &vm.ns, vm.address, 5005),
        "open UDP"
    );
    assert!(
        !w.udp_arrives(&outside, None, &vm.ns, vm.address, 6000),
        "closed UDP"
    );
    assert!(
        !w.udp_arrives(&outside, None, &vm.ns, vm.address, 22),
        "TCP port, not UDP"
    );
    // The VM's own connections out get their replies back through conntrack.
    assert!(w.tcp_reaches(&vm.ns, OUTSIDE_IP, 7000), "VM to outside");

    let open = [(22, 22, Protocol::Tcp), (8000, 8080, Protocol::Tcp)];
    w.firewall().apply(&plan(&s, ports(&open))).await.unwrap();
    assert!(w.tcp_reaches(&outside, vm.address, 8080), "opened at once");
    assert!(
        !w.udp_arrives(&outside, None, &vm.ns, vm.address, 5005),
        "UDP closed again"
    );
}

/// What, sent from `(netns, device)`, the frame, looked for at `(netns, device)`, whether it
/// passes the firewall.
type FrameCase<'a> = (
    &'static str,
    (&'a str, &'a str),
    Vec<u8>,
    (&'a str, &'a str),
    bool,
);

#[tokio::test]
async fn a_vm_sends_only_as_itself() {
    if !netns::available("a_vm_sends_only_as_itself") {
        return;
    }
    let s = setup();
    let w = &s.world;
    let (vm, outside) = (&s.public1, w.outside.clone());
    let (mac, a) = (vm.mac.as_str(), vm.address);
    let udp = |src, dst, sport, dport| frame::ipv4_udp(src, dst, sport, dport, MARKER_LEN);
    let bcast = Ipv4Addr::BROADCAST;
    let to_outside =
        |ethertype, payload: Vec<u8>| frame::ethernet(OUTSIDE_MAC, mac, ethertype, &payload);
    let from_vm = (vm.ns.as_str(), vm.dev.as_str());
    let from_private = (s.private2.ns.as_str(), s.private2.dev.as_str());
    let from_outside = (outside.as_str(), "eth0");
    let cases: Vec<FrameCase<'_>> = vec![
        (
            "own MAC and address",
            from_vm,
            to_outside(0x0800, udp(a, OUTSIDE_IP, 4000, 4000)),
            (&outside, "eth0"),
            true,
        ),
        (
            "spoofed address",
            from_vm,
            to_outside(0x0800, udp(SPOOFED_IP, OUTSIDE_IP, 4000, 4000)),
            (&outside, "eth0"),
            false,
        ),
        (
            "spoofed MAC",
            from_vm,
            frame::ethernet(
                OUTSIDE_MAC,
                SPOOFED_MAC,
                0x0800,
                &udp(a, OUTSIDE_IP, 4000, 4000),
            ),
            (&outside, "eth0"),
            false,
        ),
        (
            "ARP as itself",
            from_vm,
            frame::ethernet(
                frame::BROADCAST,
                mac,
                0x0806,
                &frame::arp(mac, a, OUTSIDE_IP),
            ),
            (&outside, "eth0"),
            true,
        ),
        (
            "ARP probe",
            from_vm,
            frame::ethernet(
                frame::BROADCAST,
                mac,
                0x0806,
                &frame::arp(mac, Ipv4Addr::UNSPECIFIED, a),
            ),
            (&outside, "eth0"),
            true,
        ),
        (
            "ARP for another address",
            from_vm,
            frame::ethernet(
                frame::BROADCAST,
                mac,
                0x0806,
                &frame::arp(mac, SPOOFED_IP, OUTSIDE_IP),
            ),
            (&outside, "eth0"),
            false,
        ),
        (
            "ARP with another MAC inside",
            from_vm,
            frame::ethernet(
                frame::BROADCAST,
                mac,
                0x0806,
                &frame::arp(SPOOFED_MAC, a, OUTSIDE_IP),
            ),
            (&outside, "eth0"),
            false,
        ),
        (
            "IPv6",
            from_vm,
            frame::ethernet("33:33:00:00:00:01", mac, 0x86dd, &frame::ipv6(MARKER_LEN)),
            (&outside, "eth0"),
            false,
        ),
        (
            "VLAN-tagged IPv4",
            from_vm,
            frame::vlan(
                OUTSIDE_MAC,
                mac,
                10,
                0x0800,
                &udp(a, OUTSIDE_IP, 4000, 4000),
            ),
            (&outside, "eth0"),
            false,
        ),
        (
            "DHCP server reply",
            from_vm,
            frame::ethernet(frame::BROADCAST, mac, 0x0800, &udp(a, bcast, 67, 68)),
            (&outside, "eth0"),
            false,
        ),
        (
            "DHCP request on a public NIC",
            from_vm,
            frame::ethernet(
                frame::BROADCAST,
                mac,
                0x0800,
                &udp(Ipv4Addr::UNSPECIFIED, bcast, 68, 67),
            ),
            (&outside, "eth0"),
            false,
        ),
        (
            "DHCP request on a private NIC",
            from_private,
            frame::ethernet(
                frame::BROADCAST,
                &s.private2.mac,
                0x0800,
                &udp(Ipv4Addr::UNSPECIFIED, bcast, 68, 67),
            ),
            (&w.host, "brpriv"),
            true,
        ),
        (
            "other UDP from 0.0.0.0 on a private NIC",
            from_private,
            frame::ethernet(
                frame::BROADCAST,
                &s.private2.mac,
                0x0800,
                &udp(Ipv4Addr::UNSPECIFIED, bcast, 68, 53),
            ),
            (&w.host, "brpriv"),
            false,
        ),
        // Towards a public NIC only ARP and IPv4 pass: IPv6 would bypass the IPv4 firewall.
        (
            "ARP to a public NIC",
            from_outside,
            frame::ethernet(
                frame::BROADCAST,
                OUTSIDE_MAC,
                0x0806,
                &frame::arp(OUTSIDE_MAC, OUTSIDE_IP, a),
            ),
            from_vm,
            true,
        ),
        (
            "IPv6 to a public NIC",
            from_outside,
            frame::ethernet(
                "33:33:00:00:00:01",
                OUTSIDE_MAC,
                0x86dd,
                &frame::ipv6(MARKER_LEN),
            ),
            from_vm,
            false,
        ),
        (
            "VLAN-tagged IPv4 to a public NIC",
            from_outside,
            frame::vlan(
                mac,
                OUTSIDE_MAC,
                10,
                0x0800,
                &udp(OUTSIDE_IP, a, 4000, 4000),
            ),
            from_vm,
            false,
        ),
        (
            // Not 4000 → 4000: the VM's datagram above made that a reply (conntrack).
            "IPv4 to a closed port",
            from_outside,
            frame::ethernet(mac, OUTSIDE_MAC, 0x0800, &udp(OUTSIDE_IP, a, 4001, 4002)),
            from_vm,
            false,
        ),
    ];
    let arrivals = || -> Vec<(&'static str, bool)> {
        let mut seen = Vec::new();
        for (what, (from_ns, from_dev), frame, (ns, dev), _) in &cases {
            seen.push((*what, w.frame_arrives(from_ns, from_dev, frame, ns, dev)));
        }
        seen
    };
    let all_pass: Vec<(&str, bool)> = cases.iter().map(|c| (c.0, true)).collect();
    assert_eq!(arrivals(), all_pass, "without the firewall");
    // The same with sockets: an address added to the VM's interface.
    let from_spoofed = || w.udp_arrives(&vm.ns, Some(SPOOFED_IP), &outside, OUTSIDE_IP, 9000);
    run(&[
        "ip",
        "-n",
        &vm.ns,
        "addr",
        "add",
        &format!("{SPOOFED_IP}/32"),
        "dev",
        &vm.dev,
    ]);
    let neigh = [
        "neigh",
        "replace",
        &OUTSIDE_IP.to_string(),
        "lladdr",
        OUTSIDE_MAC,
        "dev",
        &vm.dev,
    ];
    run(&[&["ip", "-n", &vm.ns][..], &neigh[..]].concat());
    assert!(from_spoofed(), "without the firewall");

    w.firewall().apply(&plan(&s, Vec::new())).await.unwrap();
    let expected: Vec<(&str, bool)> = cases.iter().map(|c| (c.0, c.4)).collect();
    assert_eq!(arrivals(), expected, "with the firewall");
    assert!(!from_spoofed(), "socket bound to a foreign address");
    assert!(
        w.udp_arrives(&vm.ns, Some(a), &outside, OUTSIDE_IP, 9000),
        "own address"
    );
}

#[tokio::test]
async fn private_vms_reach_only_vms_of_their_owner() {
    if !netns::available("private_vms_reach_only_vms_of_their_owner") {
        return;
    }
    let mut s = setup();
    let (one, two, three) = (s.private1.clone(), s.private2.clone(), s.private3.clone());
    let host = s.world.host.clone();
    s.world.tcp_listen(&one.ns, 7000);
    let w = &s.world;
    let reachable = || {
        let via_gateway = [
            "route",
            "add",
            &format!("{}/32", one.address),
            "via",
            &GATEWAY.to_string(),
        ];
        let direct = [
            (
                "alice to alice",
                w.udp_arrives(&two.ns, None, &one.ns, one.address, 5000),
            ),
            (
                "alice to alice, TCP",
                w.tcp_reaches(&two.ns, one.address, 7000),
            ),
            (
                "bob to alice",
                w.udp_arrives(&three.ns, None, &one.ns, one.address, 5000),
            ),
            (
                "bob to alice, TCP",
                w.tcp_reaches(&three.ns, one.address, 7000),
            ),
            (
                "alice to bob",
                w.udp_arrives(&one.ns, None, &three.ns, three.address, 5000),
            ),
            (
                "bob to the gateway",
                w.udp_arrives(&three.ns, None, &host, GATEWAY, 5000),
            ),
        ];
        // Hairpin: alice's other VM routes through the host to her first one.
        run(&[&["ip", "-n", &two.ns][..], &via_gateway[..]].concat());
        let hairpin = w.udp_arrives(&two.ns, None, &one.ns, one.address, 5000);
        run(&[
            "ip",
            "-n",
            &two.ns,
            "route",
            "del",
            &format!("{}/32", one.address),
        ]);
        let mut all = direct.to_vec();
        all.push(("alice to alice through the host", hairpin));
        all
    };
    for (what, reached) in reachable() {
        assert!(reached, "{what}, without the firewall");
    }
    w.firewall().apply(&plan(&s, Vec::new())).await.unwrap();
    let expected = [
        ("alice to alice", true),
        ("alice to alice, TCP", true),
        ("bob to alice", false),
        ("bob to alice, TCP", false),
        ("alice to bob", false),
        ("bob to the gateway", true),
        ("alice to alice through the host", false),
    ];
    assert_eq!(reachable(), expected);
}

#[tokio::test]
async fn remove_deletes_only_vmhost_tables_and_a_rejected_script_changes_nothing() {
    if !netns::available("remove_deletes_only_vmhost_tables") {
        return;
    }
    let s = setup();
    let w = &s.world;
    for table in ["ip foreign", "bridge foreign", "inet vmhost", "ip6 vmhost"] {
        let words: Vec<&str> = table.split(' ').collect();
        w.nft(&["add", "table", words[0], words[1]]);
    }
    w.nft(&["add", "chain", "ip", "foreign", "keep"]);
    let fw = w.firewall();
    let open = ports(&[(22, 22, Protocol::Tcp)]);
    fw.apply(&plan(&s, open.clone())).await.unwrap();
    fw.apply(&plan(&s, open.clone())).await.unwrap();
    let ours = w.nft(&["list", "table", "bridge", TABLE]);
    assert_eq!(
        ours.matches("chain prerouting").count(),
        1,
        "replaced, not added to"
    );
    assert!(ours.contains("chain from_j101_r0_n1"), "{ours}");

    // One bad line anywhere and nothing of the script applies: the old rules stay.
    let mut broken = render(&plan(&s, ports(&[(1, 1000, Protocol::Tcp)])));
    broken.push_str("add rule ip vmhost forward bogus\n");
    let out = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("ip netns exec {} nft -f - <<'EOF'\n{broken}EOF", w.host),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let inbound = w.nft(&["list", "table", "ip", TABLE]);
    assert!(
        inbound.contains("tcp dport 22 accept") && !inbound.contains("1-1000"),
        "{inbound}"
    );

    fw.remove(TABLE).await.unwrap();
    let tables = w.nft(&["list", "tables"]);
    for kept in [
        "table ip foreign",
        "table bridge foreign",
        "table inet vmhost",
        "table ip6 vmhost",
    ] {
        assert!(tables.contains(kept), "{kept} in {tables}");
    }
    assert!(
        !tables.contains("table ip vmhost\n") && !tables.contains("table bridge vmhost\n"),
        "{tables}"
    );
    assert!(w
        .nft(&["list", "table", "ip", "foreign"])
        .contains("chain keep"));
    fw.remove(TABLE).await.unwrap();
}

/// vmhost's tables of a test in the host's own namespace, deleted on drop.
struct RootTable(String);

impl Drop for RootTable {
    fn drop(&mut self) {
        let script = format!(
            "table bridge {0}\ndelete table bridge {0}\ntable ip {0}\ndelete table ip {0}\n",
            self.0
        );
        let _ = std::process::Command::new("sh")
            .args(["-c", &format!("nft -f - <<'EOF'\n{script}EOF")])
            .output();
    }
}

#[tokio::test]
async fn nft_firewall_applies_and_removes_in_the_host_namespace() {
    if !netns::available("nft_firewall_applies_and_removes_in_the_host_namespace") {
        return;
    }
    // Tables of dead earlier runs first; then this run's, whose rules match only taps that do
    // not exist and a TEST-NET-3 address.
    let tables = String::from_utf8_lossy(&run(&["nft", "list", "tables"]).stdout).into_owned();
    for line in tables.lines() {
        let Some(pid) = line
            .rsplit(' ')
            .next()
            .and_then(|t| t.strip_prefix("vmhost_fwtest_"))
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid).exists() {
            drop(RootTable(format!("vmhost_fwtest_{pid}")));
        }
    }
    let pid = std::process::id();
    let table = RootTable(format!("vmhost_fwtest_{pid}"));
    let nic = |tap: String, last, role| GuardedNic {
        tap,
        mac: format!("52:54:00:00:02:{last:02x}"),
        address: Ipv4Addr::new(203, 0, 113, last),
        role,
    };
    let plan = FirewallPlan {
        table: table.0.clone(),
        private: None,
        vms: vec![GuardedVm {
            job_id: "fwtest".into(),
            rank: 0,
            owner: "nobody".into(),
            nics: vec![
                nic(
                    format!("vhfw{pid}a"),
                    250,
                    NicRole::Public {
                        open_ports: ports(&[(22, 22, Protocol::Tcp)]),
                    },
                ),
                nic(format!("vhfw{pid}b"), 251, NicRole::Private),
            ],
        }],
    };
    let fw = vmhost::network::nft::NftFirewall::new();
    fw.apply(&plan).await.unwrap();
    let listed =
        String::from_utf8_lossy(&run(&["nft", "list", "table", "bridge", &table.0]).stdout)
            .into_owned();
    assert!(
        listed.contains(&format!("\"vhfw{pid}a\" : jump from_jfwtest_r0_n0")),
        "{listed}"
    );
    run(&["nft", "list", "table", "ip", &table.0]);
    fw.remove(&table.0).await.unwrap();
    let tables = String::from_utf8_lossy(&run(&["nft", "list", "tables"]).stdout).into_owned();
    assert!(!tables.contains(&table.0), "{tables}");
}
