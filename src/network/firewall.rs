//! vmhost's nftables ruleset, rendered from typed values. Pure.
//!
//! vmhost keeps the desired state (which VMs exist, their NICs, MACs, addresses and open
//! ports) in its database and, on every change, renders the *whole* ruleset with [`render`]
//! and hands it to `nft -f` (see [`super::nft`]). The script replaces vmhost's two tables,
//! `bridge <table>` and `ip <table>`, in one transaction: `table X` (create if absent),
//! `delete table X`, `table X { ... }`. Either all of it applies or none; no other table is
//! ever named, so the operator's and libvirt's rules are untouched, and a failed apply is
//! repaired by the next one.
//!
//! # Why these hooks
//!
//! - **No bridge conntrack.** `ct state` in a bridge table is not available on our hosts
//!   (nft answers "Protocol error"), so stateful filtering of bridged traffic happens in the
//!   `ip` family: with `br_netfilter` loaded and `net.bridge.bridge-nf-call-iptables = 1`,
//!   bridged IPv4 passes the `ip` forward hook, conntrack included. That is why the host check
//!   [`super::nft::NftFirewall::prepare_host`] insists on that sysctl.
//! - **Stateless checks in the bridge family.** Anti-spoofing and isolation only need the
//!   frame itself and the port it came from or goes to, so they live in the bridge table,
//!   where every protocol (ARP, IPv6, VLAN tags, ...) is visible, not only IPv4.
//! - **Static addresses are known.** vmhost allocates every NIC's MAC and address itself
//!   (private ones from its subnet, public ones from a pool), so the filter pins each tap to
//!   exactly one MAC and one address; nothing has to be learnt from DHCP snooping.
//! - **Inert rules.** Rules match tap names (and public addresses). A tap that does not exist
//!   yet matches nothing, so the plan is applied *before* a VM starts and its NICs are never
//!   unfiltered.
//!
//! # Layout
//!
//! `bridge <table>`:
//! - `prerouting` (hook prerouting): `iifname vmap @guard` sends every frame from a guarded tap
//!   to that NIC's chain `from_j<job>_r<rank>_n<nic>`: Ethernet source must be the NIC's MAC;
//!   ARP must carry that MAC and the NIC's address (or 0.0.0.0, RFC 5227 probes); DHCP server
//!   replies (UDP sport 67) are dropped; IPv4 must come from the NIC's address (private NICs
//!   may also send the DHCP client's `0.0.0.0:68 → 255.255.255.255:67`); everything else
//!   (IPv6, VLAN-tagged frames, other ethertypes) is dropped.
//! - `forward`: frames to a public tap may only be ARP or IPv4 (link-local IPv6 would otherwise
//!   reach the VM past the IPv4 firewall); frames from a private tap go through their owner's
//!   chain `owner_<n>` (`iifname vmap @isolate`), which lets them reach the private taps of the
//!   same owner and drops them to any other private tap.
//! - `input`: a VM may not route through the host back into the private subnet (libvirt's own
//!   rules would accept that hairpin): from a private tap, IPv4 to the subnet other than the
//!   gateway and the broadcast address is dropped.
//!
//! `ip <table>`:
//! - `forward` (priority filter - 10, before libvirt's and the operator's filter chains):
//!   `ip daddr vmap @public_in` sends traffic to a public address to its chain
//!   `to_j<job>_r<rank>_n<nic>`: replies and related ICMP (`ct state established,related`) and
//!   the open port ranges are accepted, everything else is dropped.
//!
//! Everything else (VMs' outbound traffic, DHCP and DNS to the gateway, NAT) is libvirt's
//! business and passes. Traffic from the host itself to a public address does not pass the
//! forward hook and is not filtered: the host is trusted.
//!
//! # Hostile strings
//!
//! Strings reach the script only in forms nft cannot misparse: tap names only when they are
//! plain (`[A-Za-z0-9_.-]`, at most 15 bytes) and quoted; MACs re-formatted from parsed
//! bytes; chain and table names and comments rebuilt from a small alphabet. A plan with
//! anything else is rejected by [`FirewallPlan::validate`]; [`render`] stays safe even so, and
//! fails closed (an unparsable MAC drops everything from its tap, a reversed port range opens
//! nothing, a NIC whose tap cannot be named safely is left out: vmhost never picks such a name).
//!
//! # Cost
//!
//! Dispatch is one verdict-map lookup per frame or packet, whatever the number of VMs. The
//! price of rendering everything is paid when applying: nft and the kernel take roughly a
//! millisecond per VM (see `benches/firewall.rs`), dominated by the number of rules and of
//! anonymous sets, so the renderer avoids sets where one value will do.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Everything the firewall guards, as one desired state. Applying it replaces vmhost's own
/// tables (`ip <table>` and `bridge <table>`) in one atomic transaction; no other table is
/// touched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FirewallPlan {
    /// Name of vmhost's tables in both families.
    pub table: String,
    /// vmhost's private network, if it has one.
    pub private: Option<PrivateSegment>,
    /// One entry per VM that exists (running or not); rules of absent taps are inert.
    pub vms: Vec<GuardedVm>,
}

/// The private network's bridge and subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateSegment {
    pub bridge: String,
    /// The subnet, e.g. 10.213.0.0/24.
    pub subnet: Ipv4Net,
    /// The host's address on the bridge (gateway, DHCP and DNS server).
    pub gateway: Ipv4Addr,
}

/// One VM (one rank of a job) and its NICs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedVm {
    pub job_id: String,
    pub rank: u32,
    /// Owner of the job: VMs of different owners must not reach each other privately.
    pub owner: String,
    pub nics: Vec<GuardedNic>,
}

/// One NIC: the only MAC and address its VM may send from on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardedNic {
    /// Host-side tap device name.
    pub tap: String,
    /// Lowercase `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    pub address: Ipv4Addr,
    pub role: NicRole,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicRole {
    /// On the private network.
    Private,
    /// A public address: inbound traffic only to these ports (plus replies).
    Public { open_ports: Vec<PortRange> },
}

/// UCloud's `PortRangeAndProto`: `{start, end, protocol}`, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Why a plan cannot be rendered faithfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("table name {0:?} is not an identifier ([A-Za-z][A-Za-z0-9_]*, at most 64 bytes)")]
    TableName(String),
    #[error("tap name {0:?} is not 1-15 bytes of [A-Za-z0-9_.-]")]
    TapName(String),
    #[error("tap {0:?} appears more than once")]
    DuplicateTap(String),
    #[error("MAC {mac:?} of tap {tap} is not a unicast xx:xx:xx:xx:xx:xx")]
    Mac { tap: String, mac: String },
    #[error("address {address} of tap {tap} cannot be a NIC's own address")]
    Address { tap: String, address: Ipv4Addr },
    #[error("public address {0} is on more than one NIC")]
    DuplicateAddress(Ipv4Addr),
    #[error("port range {start}-{end} of tap {tap} ends before it starts")]
    PortRange { tap: String, start: u16, end: u16 },
    #[error("gateway {gateway} is not inside the private subnet {subnet}")]
    Gateway { gateway: Ipv4Addr, subnet: Ipv4Net },
}

impl FirewallPlan {
    /// Checks that [`render`] expresses this plan exactly (it never emits anything unsafe, but
    /// leaves out or closes what it cannot express).
    pub fn validate(&self) -> Result<(), PlanError> {
        if !is_identifier(&self.table) {
            return Err(PlanError::TableName(self.table.clone()));
        }
        if let Some(p) = &self.private {
            if !p.subnet.contains(&p.gateway) {
                return Err(PlanError::Gateway {
                    gateway: p.gateway,
                    subnet: p.subnet,
                });
            }
        }
        let mut taps = HashSet::new();
        let mut public = HashSet::new();
        for nic in self.vms.iter().flat_map(|vm| &vm.nics) {
            let tap = || nic.tap.clone();
            if !is_tap_name(&nic.tap) {
                return Err(PlanError::TapName(tap()));
            }
            if !taps.insert(&nic.tap) {
                return Err(PlanError::DuplicateTap(tap()));
            }
            if parse_mac(&nic.mac).is_none() {
                let mac = nic.mac.clone();
                return Err(PlanError::Mac { tap: tap(), mac });
            }
            let a = nic.address;
            if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
                return Err(PlanError::Address {
                    tap: tap(),
                    address: a,
                });
            }
            if let NicRole::Public { open_ports } = &nic.role {
                if !public.insert(a) {
                    return Err(PlanError::DuplicateAddress(a));
                }
                if let Some(r) = open_ports.iter().find(|r| r.start > r.end) {
                    let (start, end) = (r.start, r.end);
                    return Err(PlanError::PortRange {
                        tap: tap(),
                        start,
                        end,
                    });
                }
            }
        }
        Ok(())
    }
}

/// The `nft -f` script that makes the kernel's vmhost tables equal `plan`.
pub fn render(plan: &FirewallPlan) -> String {
    let table = table_name(&plan.table);
    let nics = guarded_nics(plan);
    let mut out = String::new();
    render_bridge(&mut out, &table, plan.private.as_ref(), &nics);
    render_ip(&mut out, &table, &nics);
    out
}

/// A NIC that made it into the script, with the names derived for it.
struct Nic<'a> {
    vm: &'a GuardedVm,
    nic: &'a GuardedNic,
    /// `j<job>_r<rank>_n<index>`, unique in the plan.
    name: String,
    /// `None` if the plan's MAC does not parse: then nothing from the tap passes.
    mac: Option<[u8; 6]>,
}

impl Nic<'_> {
    fn comment(&self) -> String {
        let (vm, nic) = (self.vm, self.nic);
        let owner = comment_text(&vm.owner);
        let job = comment_text(&vm.job_id);
        format!("job {job} rank {} owner {owner} tap {}", vm.rank, nic.tap)
    }
}

/// The NICs with nameable taps, each tap once (the first wins), with unique chain names.
fn guarded_nics(plan: &FirewallPlan) -> Vec<Nic<'_>> {
    let mut taps = HashSet::new();
    let mut names = HashSet::new();
    let mut nics = Vec::new();
    for vm in &plan.vms {
        for (i, nic) in vm.nics.iter().enumerate() {
            if !is_tap_name(&nic.tap) || !taps.insert(nic.tap.as_str()) {
                continue;
            }
            let base = format!("j{}_r{}_n{i}", name_part(&vm.job_id), vm.rank);
            // Sanitising can make two jobs look alike; a suffix keeps their chains apart.
            let mut name = base.clone();
            let mut k = 2;
            while !names.insert(name.clone()) {
                name = format!("{base}_{k}");
                k += 1;
            }
            let mac = parse_mac(&nic.mac);
            nics.push(Nic { vm, nic, name, mac });
        }
    }
    nics
}

fn render_bridge(
    out: &mut String,
    table: &str,
    private: Option<&PrivateSegment>,
    nics: &[Nic<'_>],
) {
    let privates: Vec<&Nic<'_>> = nics
        .iter()
        .filter(|n| n.nic.role == NicRole::Private)
        .collect();
    let publics = nics.iter().filter(|n| n.nic.role != NicRole::Private);

    *out +=
        &format!("table bridge {table}\ndelete table bridge {table}\ntable bridge {table} {{\n");
    set(
        out,
        "private_taps",
        "ifname",
        privates.iter().map(|n| quoted(&n.nic.tap)),
    );
    set(
        out,
        "public_taps",
        "ifname",
        publics.map(|n| quoted(&n.nic.tap)),
    );

    for n in nics {
        let (nic, name) = (n.nic, &n.name);
        *out += &format!("\tchain from_{name} {{\n\t\tcomment \"{}\"\n", n.comment());
        if let Some(mac) = n.mac {
            let mac = format_mac(mac);
            let a = nic.address;
            // Two ARP rules rather than one with `{ A, 0.0.0.0 }`: every anonymous set costs
            // the kernel a search of the whole transaction, which adds up over hundreds of VMs.
            let arp = format!(
                "ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether {mac}"
            );
            *out += &format!(
                "\t\tether saddr != {mac} counter drop\n\
                 \t\t{arp} arp saddr ip {a} accept\n\
                 \t\t{arp} arp saddr ip 0.0.0.0 accept\n\
                 \t\tether type ip udp sport 67 counter drop\n\
                 \t\tether type ip ip saddr {a} accept\n"
            );
            if nic.role == NicRole::Private {
                *out += "\t\tether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 \
                         udp sport 68 udp dport 67 accept\n";
            }
        }
        *out += "\t\tcounter drop\n\t}\n";
    }

    // One chain per owner of private NICs: its taps may talk to each other, to no other VM.
    let mut owners: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in &privates {
        owners.entry(&n.vm.owner).or_default().push(&n.nic.tap);
    }
    let owner_chain: BTreeMap<&str, String> = owners
        .keys()
        .enumerate()
        .map(|(i, owner)| (*owner, format!("owner_{i}")))
        .collect();
    for (owner, taps) in &owners {
        *out += &format!(
            "\tchain {} {{\n\t\tcomment \"owner {}\"\n\t\toifname {} return\n\
             \t\toifname @private_taps counter drop\n\t}}\n",
            owner_chain[owner],
            comment_text(owner),
            set_literal(taps.iter().map(|t| quoted(t))),
        );
    }

    vmap(
        out,
        "guard",
        "ifname",
        nics.iter()
            .map(|n| (quoted(&n.nic.tap), format!("from_{}", n.name))),
    );
    vmap(
        out,
        "isolate",
        "ifname",
        privates
            .iter()
            .map(|n| (quoted(&n.nic.tap), owner_chain[n.vm.owner.as_str()].clone())),
    );

    *out +=
        "\tchain prerouting {\n\t\ttype filter hook prerouting priority filter; policy accept;\n\
             \t\tiifname vmap @guard\n\t}\n\
             \tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\
             \t\toifname @public_taps ether type != { arp, ip } counter drop\n\
             \t\tiifname vmap @isolate\n\t}\n";
    if let Some(p) = private {
        let subnet = p.subnet.trunc();
        let own = set_literal([p.gateway, subnet.broadcast()]);
        *out += &format!(
            "\tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname @private_taps ip daddr {subnet} ip daddr != {own} counter drop\n\t}}\n"
        );
    }
    *out += "}\n";
}

fn render_ip(out: &mut String, table: &str, nics: &[Nic<'_>]) {
    *out += &format!("table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n");
    let mut addresses = HashSet::new();
    let mut entries = Vec::new();
    for n in nics {
        let NicRole::Public { open_ports } = &n.nic.role else {
            continue;
        };
        // One address, one chain: a second NIC claiming it would be a bug elsewhere.
        if !addresses.insert(n.nic.address) {
            continue;
        }
        *out += &format!(
            "\tchain to_{} {{\n\t\tcomment \"{}\"\n\t\tct state established,related accept\n",
            n.name,
            n.comment()
        );
        for (protocol, keyword) in [(Protocol::Tcp, "tcp"), (Protocol::Udp, "udp")] {
            if let Some(ports) = port_set(open_ports, protocol) {
                *out += &format!("\t\t{keyword} dport {ports} accept\n");
            }
        }
        *out += "\t\tcounter drop\n\t}\n";
        entries.push((n.nic.address.to_string(), format!("to_{}", n.name)));
    }
    vmap(out, "public_in", "ipv4_addr", entries.into_iter());
    *out +=
        "\tchain forward {\n\t\ttype filter hook forward priority filter - 10; policy accept;\n\
             \t\tip daddr vmap @public_in\n\t}\n}\n";
}

/// A named set.
fn set(out: &mut String, name: &str, ty: &str, elements: impl Iterator<Item = String>) {
    let elements: Vec<String> = elements.collect();
    *out += &format!("\tset {name} {{\n\t\ttype {ty}\n");
    elements_block(out, &elements);
    *out += "\t}\n";
}

/// A named verdict map whose entries jump to chains.
fn vmap(out: &mut String, name: &str, ty: &str, entries: impl Iterator<Item = (String, String)>) {
    let elements: Vec<String> = entries
        .map(|(k, chain)| format!("{k} : jump {chain}"))
        .collect();
    *out += &format!("\tmap {name} {{\n\t\ttype {ty} : verdict\n");
    elements_block(out, &elements);
    *out += "\t}\n";
}

/// One element a line, so that diffs of rulesets stay readable; nft refuses `elements = { }`,
/// so an empty set has no block.
fn elements_block(out: &mut String, elements: &[String]) {
    if elements.is_empty() {
        return;
    }
    *out += "\t\telements = {\n";
    for element in elements {
        *out += &format!("\t\t\t{element},\n");
    }
    *out += "\t\t}\n";
}

/// `{ a, b }` without duplicates (nft rejects those in anonymous sets).
fn set_literal<T: ToString + Ord>(items: impl IntoIterator<Item = T>) -> String {
    let items: BTreeSet<T> = items.into_iter().collect();
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The open ports of one protocol for `dport`: a port, a range or a set of them, overlapping
/// and adjacent ranges merged (nft rejects overlapping intervals); `None` if none is open.
/// Reversed ranges open nothing.
fn port_set(ranges: &[PortRange], protocol: Protocol) -> Option<String> {
    let mut spans: Vec<(u16, u16)> = ranges
        .iter()
        .filter(|r| r.protocol == protocol && r.start <= r.end)
        .map(|r| (r.start, r.end))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(u16, u16)> = Vec::new();
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if u32::from(start) <= u32::from(last.1) + 1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    if merged.is_empty() {
        return None;
    }
    let items: Vec<String> = merged
        .iter()
        .map(|&(s, e)| {
            if s == e {
                s.to_string()
            } else {
                format!("{s}-{e}")
            }
        })
        .collect();
    // A single port or range needs no set (sets are the costly part of a big transaction).
    match items.as_slice() {
        [one] => Some(one.clone()),
        _ => Some(format!("{{ {} }}", items.join(", "))),
    }
}

fn is_identifier(s: &str) -> bool {
    s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A name Linux accepts for a device and nft reads back verbatim inside quotes (no `*`
/// wildcard, no quote, no backslash, no whitespace).
pub fn is_tap_name(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

fn quoted(tap: &str) -> String {
    debug_assert!(is_tap_name(tap));
    format!("\"{tap}\"")
}

/// The table name, or a harmless stand-in when it is not an identifier (`validate` refuses
/// such plans; this only keeps `render` safe).
fn table_name(s: &str) -> String {
    if is_identifier(s) {
        s.to_owned()
    } else {
        format!("t_{}", name_part(s))
    }
}

/// A chain-name fragment: `[A-Za-z0-9_]`, at most 48 bytes.
fn name_part(s: &str) -> String {
    s.chars()
        .take(48)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Text for inside a quoted comment: no quote, no control characters, short (nft limits a
/// comment to 128 bytes).
fn comment_text(s: &str) -> String {
    s.chars()
        .take(32)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.@#+:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A unicast MAC in `xx:xx:xx:xx:xx:xx` form (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    let unicast = mac[0] & 1 == 0;
    (parts.next().is_none() && unicast).then_some(mac)
}

fn format_mac(mac: [u8; 6]) -> String {
    let parts: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    parts.join(":")
}

#[cfg(test)]
mod tests;
