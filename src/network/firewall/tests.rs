//! Rendering tests: a snapshot, the rules' details, hostile strings, and `nft -c` (check
//! mode: parsed and validated by the kernel, never committed) when running as root.

use std::io::Write;
use std::process::{Command, Stdio};

use proptest::prelude::*;

use super::*;

fn tcp(start: u16, end: u16) -> PortRange {
    PortRange {
        start,
        end,
        protocol: Protocol::Tcp,
    }
}

fn udp(start: u16, end: u16) -> PortRange {
    PortRange {
        start,
        end,
        protocol: Protocol::Udp,
    }
}

fn private_segment() -> PrivateSegment {
    PrivateSegment {
        bridge: "vmhost0".into(),
        subnet: "10.213.0.0/24".parse().unwrap(),
        gateway: "10.213.0.1".parse().unwrap(),
    }
}

fn private_nic(tap: &str, last: u8) -> GuardedNic {
    GuardedNic {
        tap: tap.into(),
        mac: format!("52:54:00:00:00:{last:02x}"),
        address: Ipv4Addr::new(10, 213, 0, last),
        role: NicRole::Private,
    }
}

fn public_nic(tap: &str, last: u8, open_ports: Vec<PortRange>) -> GuardedNic {
    GuardedNic {
        tap: tap.into(),
        mac: format!("52:54:00:00:01:{last:02x}"),
        address: Ipv4Addr::new(203, 0, 113, last),
        role: NicRole::Public { open_ports },
    }
}

fn vm(job: &str, rank: u32, owner: &str, nics: Vec<GuardedNic>) -> GuardedVm {
    GuardedVm {
        job_id: job.into(),
        rank,
        owner: owner.into(),
        nics,
    }
}

/// Two ranks of alice's job (private + public NIC), one VM of bob's (private only).
fn sample_plan() -> FirewallPlan {
    FirewallPlan {
        table: "vmhost".into(),
        private: Some(private_segment()),
        vms: vec![
            vm(
                "4312",
                0,
                "alice#1234",
                vec![
                    private_nic("vh4312r0en0", 11),
                    public_nic(
                        "vh4312r0en1",
                        10,
                        vec![tcp(22, 22), tcp(8000, 8010), udp(53, 53)],
                    ),
                ],
            ),
            vm(
                "4312",
                1,
                "alice#1234",
                vec![private_nic("vh4312r1en0", 12)],
            ),
            vm("4400", 0, "bob", vec![private_nic("vh4400r0en0", 13)]),
        ],
    }
}

/// A plan of `n` VMs of 10 owners, each with a private and a public NIC.
fn many_vms(n: u32) -> FirewallPlan {
    let vms = (0..n)
        .map(|i| {
            let (hi, lo) = ((i / 250) as u8, (i % 250) as u8 + 2);
            let mut private = private_nic(&format!("vh{i}p"), lo);
            private.address = Ipv4Addr::new(10, 213, hi, lo);
            private.mac = format!("52:54:00:00:{hi:02x}:{lo:02x}");
            let mut public =
                public_nic(&format!("vh{i}q"), lo, vec![tcp(22, 22), udp(60000, 61000)]);
            public.address = Ipv4Addr::new(198, 51, hi, lo);
            public.mac = format!("52:54:00:01:{hi:02x}:{lo:02x}");
            vm(
                &format!("{}", 5000 + i),
                0,
                &format!("user{}", i % 10),
                vec![private, public],
            )
        })
        .collect();
    FirewallPlan {
        table: "vmhost".into(),
        private: Some(PrivateSegment {
            subnet: "10.213.0.0/16".parse().unwrap(),
            ..private_segment()
        }),
        vms,
    }
}

/// Whether `nft -c` can run here; skips (with a note) unless `VMHOST_REQUIRE_REAL_VM` is set.
fn nft_available(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let nft = Command::new("nft").arg("--version").output().is_ok();
    if root && nft {
        return true;
    }
    assert!(
        std::env::var_os("VMHOST_REQUIRE_REAL_VM").is_none(),
        "{test} needs root and nft"
    );
    eprintln!("SKIPPING {test}: needs root and nft");
    false
}

/// `nft -c -f -`: the kernel validates the whole transaction, then it is thrown away.
fn nft_check(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-c", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn renders_a_representative_plan() {
    let plan = sample_plan();
    plan.validate().unwrap();
    insta::assert_snapshot!(render(&plan));
}

#[test]
fn replaces_only_its_own_tables_in_both_families() {
    let script = render(&sample_plan());
    let table_lines: Vec<&str> = script.lines().filter(|l| l.contains("table ")).collect();
    assert_eq!(
        table_lines,
        [
            "table bridge vmhost",
            "delete table bridge vmhost",
            "table bridge vmhost {",
            "table ip vmhost",
            "delete table ip vmhost",
            "table ip vmhost {",
        ]
    );
    assert!(!script.contains("flush"), "{script}");
}

#[test]
fn an_empty_plan_still_replaces_both_tables() {
    let plan = FirewallPlan {
        table: "vmhost".into(),
        ..FirewallPlan::default()
    };
    plan.validate().unwrap();
    let script = render(&plan);
    assert!(script.contains("table bridge vmhost {"));
    assert!(script.contains("table ip vmhost {"));
    assert!(!script.contains("elements"), "{script}");
    assert!(
        !script.contains("chain input"),
        "no private network, no hairpin rule"
    );
}

#[test]
fn pins_each_tap_to_its_mac_and_address() {
    let script = render(&sample_plan());
    let chain = chain_body(&script, "from_j4312_r0_n1");
    assert!(chain.contains("ether saddr != 52:54:00:00:01:0a counter drop"));
    assert!(chain.contains("arp saddr ether 52:54:00:00:01:0a arp saddr ip 203.0.113.10 accept"));
    assert!(chain.contains("arp saddr ether 52:54:00:00:01:0a arp saddr ip 0.0.0.0 accept"));
    assert!(chain.contains("ether type ip ip saddr 203.0.113.10 accept"));
    assert!(
        !chain.contains("udp dport 67 accept"),
        "DHCP only on the private NIC"
    );
    assert_eq!(
        chain.lines().rev().nth(1).map(str::trim),
        Some("counter drop")
    );
    let private = chain_body(&script, "from_j4312_r0_n0");
    assert!(private
        .contains("ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept"));
    // Server replies are dropped before the address rule could accept them.
    let reply = private.find("udp sport 67 counter drop").unwrap();
    assert!(reply < private.find("ip saddr 10.213.0.11 accept").unwrap());
    assert!(script.contains("\t\"vh4312r0en1\" : jump from_j4312_r0_n1,\n"));
}

#[test]
fn isolates_owners_and_blocks_hairpins() {
    let script = render(&sample_plan());
    // Owners sorted: alice#1234 is owner_0, bob owner_1.
    let alice = chain_body(&script, "owner_0");
    assert!(
        alice.contains("oifname { \"vh4312r0en0\", \"vh4312r1en0\" } return"),
        "{alice}"
    );
    assert!(alice.contains("oifname @private_taps counter drop"));
    let bob = chain_body(&script, "owner_1");
    assert!(bob.contains("oifname { \"vh4400r0en0\" } return"), "{bob}");
    assert!(script.contains("\t\"vh4400r0en0\" : jump owner_1,\n"));
    assert!(
        !script.contains("\"vh4312r0en1\" : jump owner_"),
        "public NICs are not isolated by owner"
    );
    assert!(script.contains(
        "iifname @private_taps ip daddr 10.213.0.0/24 ip daddr != { 10.213.0.1, 10.213.0.255 } counter drop"
    ));
    assert!(script.contains("oifname @public_taps ether type != { arp, ip } counter drop"));
}

#[test]
fn opens_only_the_listed_ports_of_each_public_address() {
    let script = render(&sample_plan());
    let chain = chain_body(&script, "to_j4312_r0_n1");
    let rules: Vec<&str> = chain.lines().map(str::trim).skip(2).collect();
    assert_eq!(
        rules,
        [
            "ct state established,related accept",
            "tcp dport { 22, 8000-8010 } accept",
            "udp dport 53 accept",
            "counter drop",
            "}",
        ]
    );
    assert!(script.contains("\t203.0.113.10 : jump to_j4312_r0_n1,\n"));
    assert!(
        !script.contains("to_j4312_r1"),
        "no public NIC, no inbound chain"
    );
}

#[test]
fn merges_overlapping_port_ranges_and_ignores_reversed_ones() {
    let ranges = [
        tcp(100, 200),
        tcp(150, 300),
        tcp(301, 301),
        tcp(22, 22),
        tcp(9, 5),
        udp(1, 2),
    ];
    assert_eq!(port_set(&ranges, Protocol::Tcp).unwrap(), "{ 22, 100-301 }");
    assert_eq!(port_set(&ranges, Protocol::Udp).unwrap(), "1-2");
    assert_eq!(
        port_set(&[tcp(0, 65535), tcp(65535, 65535)], Protocol::Tcp).unwrap(),
        "0-65535"
    );
    assert_eq!(port_set(&[tcp(9, 5)], Protocol::Tcp), None);
    assert_eq!(port_set(&[], Protocol::Udp), None);
}

#[test]
fn validate_names_what_render_cannot_express() {
    let with = |f: &dyn Fn(&mut FirewallPlan)| {
        let mut plan = sample_plan();
        f(&mut plan);
        plan.validate().unwrap_err()
    };
    assert!(matches!(
        with(&|p| p.table = "vm host".into()),
        PlanError::TableName(_)
    ));
    assert!(matches!(
        with(&|p| p.vms[0].nics[0].tap = "vh*".into()),
        PlanError::TapName(_)
    ));
    assert!(matches!(
        with(&|p| p.vms[0].nics[0].tap = "sixteen-bytes-xx".into()),
        PlanError::TapName(_)
    ));
    assert!(matches!(
        with(&|p| p.vms[1].nics[0].tap = "vh4312r0en0".into()),
        PlanError::DuplicateTap(_)
    ));
    assert!(matches!(
        with(&|p| p.vms[0].nics[0].mac = "52:54:00:00:00".into()),
        PlanError::Mac { .. }
    ));
    assert!(matches!(
        with(&|p| p.vms[0].nics[0].mac = "01:00:5e:00:00:01".into()),
        PlanError::Mac { .. }
    ));
    assert!(matches!(
        with(&|p| p.vms[0].nics[0].address = Ipv4Addr::UNSPECIFIED),
        PlanError::Address { .. }
    ));
    assert!(matches!(
        with(&|p| p.vms[1].nics.push(public_nic("vhx", 10, vec![]))),
        PlanError::DuplicateAddress(_)
    ));
    assert!(matches!(
        with(&|p| p.vms[0].nics[1].role = NicRole::Public {
            open_ports: vec![tcp(9, 5)]
        }),
        PlanError::PortRange { .. }
    ));
    assert!(matches!(
        with(&|p| p.private.as_mut().unwrap().gateway = "10.0.0.1".parse().unwrap()),
        PlanError::Gateway { .. }
    ));
    assert_eq!(
        parse_mac("52:54:00:AB:cd:EF"),
        Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
    );
}

#[test]
fn fails_closed_on_what_it_cannot_express() {
    let mut plan = sample_plan();
    plan.vms[0].nics[1].mac = "not a mac".into();
    plan.vms[2].nics[0].tap = "bad\" tap".into();
    let script = render(&plan);
    let chain = chain_body(&script, "from_j4312_r0_n1");
    assert_eq!(
        chain.lines().map(str::trim).nth(2),
        Some("counter drop"),
        "{chain}"
    );
    assert!(!script.contains("bad"), "{script}");
}

#[test]
fn sanitised_job_ids_keep_their_chains_apart() {
    let mut plan = sample_plan();
    plan.vms[1].job_id = "43 12".into();
    plan.vms[1].rank = 0;
    plan.vms[2].job_id = "43;12".into();
    plan.vms[2].rank = 0;
    let script = render(&plan);
    for chain in ["from_j43_12_r0_n0 ", "from_j43_12_r0_n0_2 "] {
        assert!(
            script.contains(&format!("chain {chain}")),
            "{chain} in {script}"
        );
    }
}

#[test]
fn nft_accepts_rendered_plans() {
    if !nft_available("nft_accepts_rendered_plans") {
        return;
    }
    let table = format!("vmhost_check_{}", std::process::id());
    let only_private = FirewallPlan {
        vms: vec![vm("1", 0, "a", vec![private_nic("vhp0", 20)])],
        ..sample_plan()
    };
    let many_ranges = FirewallPlan {
        private: None,
        vms: vec![vm(
            "2",
            3,
            "b",
            vec![public_nic(
                "vhq0",
                30,
                vec![
                    tcp(1, 1024),
                    tcp(500, 2000),
                    udp(53, 53),
                    udp(5000, 6000),
                    tcp(65535, 65535),
                ],
            )],
        )],
        ..sample_plan()
    };
    let plans = [
        ("empty", FirewallPlan::default()),
        ("only private", only_private),
        ("public, several ranges", many_ranges),
        ("sample", sample_plan()),
        ("500 VMs", many_vms(500)),
    ];
    for (what, mut plan) in plans {
        plan.table = table.clone();
        plan.validate().unwrap();
        nft_check(&render(&plan)).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn nft_check_catches_a_broken_script() {
    // Guards the test above: check mode really parses and validates.
    if !nft_available("nft_check_catches_a_broken_script") {
        return;
    }
    let script = render(&sample_plan()).replace("ct state", "ct stat");
    assert!(nft_check(&script).is_err());
}

/// Strings a bug or an attacker could slip in, beside arbitrary ones.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"; flush ruleset; \"".to_owned()),
        Just("vh*".to_owned()),
        Just("a\nflush ruleset".to_owned()),
        Just("x } table ip filter { chain y".to_owned()),
        Just("# comment".to_owned()),
        Just("vh\\\"".to_owned()),
        "[a-z0-9]{1,15}",
        "\\PC{0,20}",
        any::<String>(),
    ]
}

fn hostile_plan() -> impl Strategy<Value = FirewallPlan> {
    let nic = (
        hostile(),
        prop_oneof![hostile(), Just("52:54:00:12:34:56".to_owned())],
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(tap, mac, address, public)| GuardedNic {
            tap,
            mac,
            address: Ipv4Addr::from(address),
            role: if public {
                NicRole::Public {
                    open_ports: vec![tcp(22, 22)],
                }
            } else {
                NicRole::Private
            },
        });
    let vm = (
        hostile(),
        any::<u32>(),
        hostile(),
        proptest::collection::vec(nic, 0..3),
    )
        .prop_map(|(job_id, rank, owner, nics)| GuardedVm {
            job_id,
            rank,
            owner,
            nics,
        });
    (
        prop_oneof![hostile(), Just("vmhost".to_owned())],
        proptest::collection::vec(vm, 0..4),
    )
        .prop_map(|(table, vms)| FirewallPlan {
            table,
            private: Some(private_segment()),
            vms,
        })
}

/// The script's lexical shape: printable ASCII, quotes closed on their line and holding only
/// plain text, no comment sign or statement separator outside quotes except in base chains.
fn assert_well_formed(script: &str) {
    for line in script.lines() {
        assert!(
            line.chars().all(|c| c == '\t' || (' '..='~').contains(&c)),
            "{line:?}"
        );
        let parts: Vec<&str> = line.split('"').collect();
        assert!(parts.len() % 2 == 1, "unbalanced quotes: {line:?}");
        for (i, part) in parts.iter().enumerate() {
            if i % 2 == 1 {
                assert!(
                    part.chars()
                        .all(|c| c.is_ascii_alphanumeric() || " -_.@#+:".contains(c)),
                    "{line:?}"
                );
            } else {
                assert!(!part.contains(['#', '\\', '*']), "{line:?}");
                assert!(
                    !part.contains(';') || part.contains("type filter hook"),
                    "{line:?}"
                );
            }
        }
    }
}

proptest! {
    #[test]
    fn hostile_strings_cannot_break_out(plan in hostile_plan()) {
        let script = render(&plan);
        assert_well_formed(&script);
        let tables: Vec<&str> = script.lines().filter(|l| l.contains("table ")).collect();
        prop_assert_eq!(tables.len(), 6);
        let name = tables[0].trim_start_matches("table bridge ");
        prop_assert!(is_identifier(name));
        for line in &tables {
            prop_assert!(line.split_whitespace().any(|w| w == name), "{}", line);
        }
        // A plan that validates is rendered with every tap.
        if plan.validate().is_ok() {
            for nic in plan.vms.iter().flat_map(|vm| &vm.nics) {
                let tap = format!("\t\"{}\" : jump from_", nic.tap);
                prop_assert!(script.contains(&tap));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn nft_parses_plans_with_hostile_strings(plan in hostile_plan()) {
        if !nft_available("nft_parses_plans_with_hostile_strings") {
            return Ok(());
        }
        let mut plan = plan;
        plan.table = format!("vmhost_prop_{}", std::process::id());
        // Overlapping public addresses and taps are left out by render; nft must still parse it.
        let script = render(&plan);
        prop_assert!(nft_check(&script).is_ok(), "{}\n{:?}", script, nft_check(&script));
    }
}

/// The text of `chain <name> { ... }` up to its closing brace.
fn chain_body<'a>(script: &'a str, name: &str) -> &'a str {
    let start = script
        .find(&format!("chain {name} {{"))
        .unwrap_or_else(|| panic!("no chain {name} in\n{script}"));
    let end = script[start..].find("\n\t}").unwrap();
    &script[start..start + end + 3]
}
