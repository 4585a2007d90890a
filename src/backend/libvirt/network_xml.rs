//! Network XML for vmhost's private network: [`render`] turns a [`PrivateNetworkSpec`] into
//! libvirt network XML, [`render_host`] renders one fixed DHCP lease for `virNetworkUpdate`,
//! and [`parse`] reads back what an existing network (as libvirt returns it) actually is, so
//! the backend can compare it with the spec ([`mismatch`]) and find leases by MAC.
//!
//! Pure functions with no I/O, like `domain_xml`, whose escaping and tag reader they share.
//!
//! The network, checked on libvirt 9.0 / dnsmasq 2.89 on qemu:///system:
//! - `<forward mode='nat'/>`: libvirt masquerades the subnet out of the host's default route;
//! - `<bridge name=… stp='off'/>`: with STP on, the kernel holds a new tap port in the listening
//!   and learning states (at least 2 s each) and drops the guest's first DHCP requests; the
//!   bridge only ever has VM taps on it, so there is no loop for STP to break;
//! - `<dns enable='yes'/>`: dnsmasq answers DNS on the gateway address (forwarding to the
//!   host's resolvers) and resolves the leases' hostnames; DHCP hands out the gateway as DNS
//!   server and router;
//! - **no dynamic range**: the `<ip>` element carries no `<dhcp>` at first. With at least one
//!   `<host>` entry and no `<range>`, libvirt writes `dhcp-range=<gateway>,static` into the
//!   dnsmasq config, so dnsmasq answers only the fixed leases (a udhcpc with a listed MAC gets
//!   its address; an unlisted MAC gets no offer). With no host at all libvirt writes no
//!   `dhcp-range` and dnsmasq serves DNS only; the first `virNetworkUpdate` that adds a host
//!   restarts dnsmasq with the static range, and deleting the last one drops it again.
//!   libvirt prints no `<dhcp>` element while it is empty, so none is rendered here.

use std::net::Ipv4Addr;

use super::domain_xml::{escape, tags};
use crate::backend::{DhcpHost, PrivateNetworkSpec};

/// Renders the libvirt network XML for `spec` (no leases; see the module docs).
pub fn render(spec: &PrivateNetworkSpec) -> String {
    format!(
        "<network>\n  \
           <name>{name}</name>\n  \
           <forward mode='nat'/>\n  \
           <bridge name='{bridge}' stp='off' delay='0'/>\n  \
           <dns enable='yes'/>\n  \
           <ip address='{gateway}' prefix='{prefix}'/>\n\
         </network>\n",
        name = escape(&spec.name),
        bridge = escape(&spec.bridge),
        gateway = spec.gateway,
        prefix = spec.prefix_len,
    )
}

/// Renders one fixed lease as the `<host>` element `virNetworkUpdate` expects. The MAC is
/// lowercased: libvirt stores a lease's MAC as written (and compares MACs ignoring case).
pub fn render_host(host: &DhcpHost) -> String {
    render_entry(&HostEntry {
        mac: host.mac.to_ascii_lowercase(),
        ip: Some(host.address),
        name: Some(host.hostname.clone()),
    })
}

/// Renders a `<host>` element with exactly the attributes `entry` has. libvirt's DELETE
/// matches an entry on every attribute given *and* treats an entry without a MAC as matching
/// any MAC, so deleting by MAC alone could remove someone else's name-only entry: deletes pass
/// the entry as it was found.
pub fn render_entry(entry: &HostEntry) -> String {
    let mut x = format!("<host mac='{}'", escape(&entry.mac));
    if let Some(name) = &entry.name {
        x.push_str(&format!(" name='{}'", escape(name)));
    }
    if let Some(ip) = entry.ip {
        x.push_str(&format!(" ip='{ip}'"));
    }
    x.push_str("/>");
    x
}

/// What an existing network is, as far as vmhost cares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkInfo {
    /// `<forward mode=…>`; `None` for an isolated network (no `<forward>`). libvirt defaults
    /// a `<forward>` without `mode` to `nat`.
    pub forward: Option<String>,
    pub bridge: Option<String>,
    /// Every IPv4 `<ip>`: address and prefix (`None` if the prefix or netmask is unusable).
    pub ipv4: Vec<(Ipv4Addr, Option<u8>)>,
    /// The DHCP `<host>` entries that have a MAC (IPv6 and DNS hosts have none).
    pub hosts: Vec<HostEntry>,
}

/// One DHCP `<host>` entry as libvirt stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub mac: String,
    pub ip: Option<Ipv4Addr>,
    pub name: Option<String>,
}

impl HostEntry {
    /// Whether this entry is exactly `host` (MACs compared case-insensitively).
    pub fn is(&self, host: &DhcpHost) -> bool {
        host.has_mac(&self.mac)
            && self.ip == Some(host.address)
            && self.name.as_deref() == Some(host.hostname.as_str())
    }
}

impl NetworkInfo {
    /// The entry for `mac`, if any.
    pub fn host(&self, mac: &str) -> Option<&HostEntry> {
        self.hosts.iter().find(|h| h.mac.eq_ignore_ascii_case(mac))
    }

    /// Why `host` cannot be added or replaced here: another MAC's entry holds its address or
    /// its hostname (libvirt refuses such an ADD, and a MODIFY would match the other entry).
    pub fn conflict(&self, host: &DhcpHost) -> Option<String> {
        self.hosts
            .iter()
            .filter(|e| !host.has_mac(&e.mac))
            .find_map(|e| {
                if e.ip == Some(host.address) {
                    Some(format!("address {} is leased to {}", host.address, e.mac))
                } else if e
                    .name
                    .as_deref()
                    .is_some_and(|n| n.eq_ignore_ascii_case(&host.hostname))
                {
                    Some(format!("hostname {} is leased to {}", host.hostname, e.mac))
                } else {
                    None
                }
            })
    }
}

/// Reads a network XML as libvirt returns it (`virNetworkGetXMLDesc`). Unknown elements are
/// ignored; malformed input yields what was read before it.
pub fn parse(xml: &str) -> NetworkInfo {
    let mut info = NetworkInfo::default();
    for tag in tags(xml) {
        match tag.name {
            "forward" => {
                let mode = tag.attr("mode").map_or("nat".into(), |m| m.into_owned());
                info.forward = Some(mode);
            }
            "bridge" => info.bridge = tag.attr("name").map(|n| n.into_owned()),
            "ip" => {
                let family = tag.attr("family");
                if family.is_some_and(|f| f != "ipv4") {
                    continue;
                }
                let Some(address) = tag.attr("address").and_then(|a| a.parse().ok()) else {
                    continue;
                };
                let prefix = match (tag.attr("prefix"), tag.attr("netmask")) {
                    (Some(p), _) => p.trim().parse().ok().filter(|p| *p <= 32),
                    (None, Some(m)) => m.parse().ok().and_then(netmask_prefix),
                    // libvirt fills in the classful default; never the case for ours.
                    (None, None) => None,
                };
                info.ipv4.push((address, prefix));
            }
            "host" => {
                let Some(mac) = tag.attr("mac") else { continue };
                info.hosts.push(HostEntry {
                    mac: mac.into_owned(),
                    ip: tag.attr("ip").and_then(|a| a.parse().ok()),
                    name: tag.attr("name").map(|n| n.into_owned()),
                });
            }
            _ => {}
        }
    }
    info
}

/// The prefix length of a contiguous netmask.
fn netmask_prefix(mask: Ipv4Addr) -> Option<u8> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then(|| u8::try_from(ones).unwrap_or(32))
}

/// How the network `info` differs from `spec` in what vmhost relies on (NAT, the bridge name,
/// exactly the gateway address and prefix); `None` if it is the network asked for.
pub fn mismatch(spec: &PrivateNetworkSpec, info: &NetworkInfo) -> Option<String> {
    let mut problems = Vec::new();
    if info.forward.as_deref() != Some("nat") {
        let found = info.forward.as_deref().unwrap_or("none (isolated)");
        problems.push(format!("forward mode is {found}, want nat"));
    }
    if info.bridge.as_deref() != Some(spec.bridge.as_str()) {
        let found = info.bridge.as_deref().unwrap_or("unset");
        problems.push(format!("bridge is {found}, want {}", spec.bridge));
    }
    let want = (spec.gateway, Some(spec.prefix_len));
    if info.ipv4 != [want] {
        let found: Vec<_> = info
            .ipv4
            .iter()
            .map(|(a, p)| match p {
                Some(p) => format!("{a}/{p}"),
                None => format!("{a}/?"),
            })
            .collect();
        let found = if found.is_empty() {
            "none".to_owned()
        } else {
            found.join(", ")
        };
        problems.push(format!(
            "IPv4 address is {found}, want {}/{}",
            spec.gateway, spec.prefix_len
        ));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PrivateNetworkSpec {
        PrivateNetworkSpec {
            name: "vmhost-private".to_owned(),
            bridge: "vmhost0".to_owned(),
            gateway: Ipv4Addr::new(10, 250, 7, 1),
            prefix_len: 24,
        }
    }

    fn host(mac: &str, last: u8, name: &str) -> DhcpHost {
        DhcpHost {
            mac: mac.to_owned(),
            address: Ipv4Addr::new(10, 250, 7, last),
            hostname: name.to_owned(),
        }
    }

    /// As `virsh net-dumpxml` prints a running network of ours with two leases and extras.
    const LIVE: &str = r#"<network connections='2'>
  <name>vmhost-private</name>
  <uuid>0907ffae-cb42-49a2-8c3c-8731102b4e40</uuid>
  <forward mode="nat">
    <nat>
      <port start='1024' end='65535'/>
    </nat>
  </forward>
  <bridge name='vmhost0' stp='off' delay='0'/>
  <mac address='52:54:00:be:73:45'/>
  <dns enable='yes'>
    <host ip='10.250.7.99'><hostname>pinned</hostname></host>
  </dns>
  <ip address='10.250.7.1' prefix='24'>
    <dhcp>
      <host mac='52:54:00:fa:00:10' name='job-a' ip='10.250.7.10'/>
      <host mac="52:54:00:fa:00:11" name="b&amp;c" ip="10.250.7.11"/>
    </dhcp>
  </ip>
  <ip family='ipv6' address='fd00::1' prefix='64'>
    <dhcp><host id='0:1:0:1:2c:2b' name='v6' ip='fd00::10'/></dhcp>
  </ip>
</network>
"#;

    #[test]
    fn renders_a_nat_network_without_leases() {
        insta::assert_snapshot!(render(&spec()));
    }

    #[test]
    fn renders_hosts_for_network_update() {
        insta::assert_snapshot!(render_host(&host("52:54:00:FA:00:10", 10, "job-a")));
        let partial = HostEntry {
            mac: "52:54:00:fa:00:12".to_owned(),
            ip: None,
            name: Some("only-name".to_owned()),
        };
        assert_eq!(
            render_entry(&partial),
            "<host mac='52:54:00:fa:00:12' name='only-name'/>"
        );
    }

    #[test]
    fn hostile_values_are_escaped() {
        let mut s = spec();
        s.name = "net'/><forward mode='bridge'/><x a=\"".to_owned();
        s.bridge = "br<&>'\"".to_owned();
        let xml = render(&s);
        let h = DhcpHost {
            mac: "52:54:00:00:00:01' ip='10.0.0.1".to_owned(),
            address: Ipv4Addr::new(10, 250, 7, 5),
            hostname: "h'/><host mac='x".to_owned(),
        };
        let host_xml = render_host(&h);
        insta::assert_snapshot!(format!("{xml}{host_xml}\n"));
        let names: Vec<_> = tags(&xml).map(|t| t.name).collect();
        assert_eq!(names, ["network", "name", "forward", "bridge", "dns", "ip"]);
        assert_eq!(parse(&xml).forward.as_deref(), Some("nat"));
        assert_eq!(parse(&xml).bridge.as_deref(), Some("br<&>'\""));
        let parsed = parse(&host_xml);
        assert_eq!(parsed.hosts.len(), 1, "{host_xml}");
        assert_eq!(parsed.hosts[0].mac, h.mac);
        assert_eq!(parsed.hosts[0].name.as_deref(), Some(h.hostname.as_str()));
    }

    #[test]
    fn parse_reads_our_rendered_network_back() {
        let info = parse(&render(&spec()));
        assert_eq!(mismatch(&spec(), &info), None, "{info:?}");
        assert!(info.hosts.is_empty());
    }

    #[test]
    fn parse_reads_a_live_network_with_leases() {
        let info = parse(LIVE);
        assert_eq!(info.forward.as_deref(), Some("nat"));
        assert_eq!(info.bridge.as_deref(), Some("vmhost0"));
        assert_eq!(info.ipv4, [(Ipv4Addr::new(10, 250, 7, 1), Some(24))]);
        assert_eq!(
            info.hosts,
            [
                HostEntry {
                    mac: "52:54:00:fa:00:10".to_owned(),
                    ip: Some(Ipv4Addr::new(10, 250, 7, 10)),
                    name: Some("job-a".to_owned()),
                },
                HostEntry {
                    mac: "52:54:00:fa:00:11".to_owned(),
                    ip: Some(Ipv4Addr::new(10, 250, 7, 11)),
                    name: Some("b&c".to_owned()),
                },
            ]
        );
        assert_eq!(mismatch(&spec(), &info), None);
        assert!(info.host("52:54:00:FA:00:10").is_some(), "MACs ignore case");
        assert!(info.host("52:54:00:fa:00:12").is_none());
        assert!(info.hosts[0].is(&host("52:54:00:FA:00:10", 10, "job-a")));
        assert!(!info.hosts[0].is(&host("52:54:00:fa:00:10", 12, "job-a")));
        assert!(!info.hosts[0].is(&host("52:54:00:fa:00:10", 10, "job-z")));
    }

    #[test]
    fn netmask_and_classless_forms_compare_equal() {
        let xml = "<network><forward/><bridge name='vmhost0'/>\
                   <ip address='10.250.7.1' netmask='255.255.255.0'/></network>";
        assert_eq!(
            mismatch(&spec(), &parse(xml)),
            None,
            "forward defaults to nat"
        );
        let odd = "<network><forward mode='nat'/><bridge name='vmhost0'/>\
                   <ip address='10.250.7.1' netmask='255.0.255.0'/></network>";
        assert_eq!(
            mismatch(&spec(), &parse(odd)).as_deref(),
            Some("IPv4 address is 10.250.7.1/?, want 10.250.7.1/24")
        );
    }

    #[test]
    fn mismatches_are_described() {
        let other = "<network><name>vmhost-private</name><bridge name='virbr9'/>\
                     <ip address='10.250.7.1' prefix='16'/><ip address='10.9.0.1' prefix='24'/>\
                     </network>";
        insta::assert_snapshot!(mismatch(&spec(), &parse(other)).expect("a mismatch"));
        let routed = LIVE.replace("mode=\"nat\"", "mode='route'");
        assert_eq!(
            mismatch(&spec(), &parse(&routed)).as_deref(),
            Some("forward mode is route, want nat")
        );
        let moved = LIVE.replace("10.250.7.1'", "10.250.7.254'");
        assert_eq!(
            mismatch(&spec(), &parse(&moved)).as_deref(),
            Some("IPv4 address is 10.250.7.254/24, want 10.250.7.1/24")
        );
        assert_eq!(
            mismatch(&spec(), &parse("")).as_deref(),
            Some(
                "forward mode is none (isolated), want nat; bridge is unset, want vmhost0; \
                 IPv4 address is none, want 10.250.7.1/24"
            )
        );
    }

    #[test]
    fn conflicts_are_other_macs_holding_the_address_or_name() {
        let info = parse(LIVE);
        // Replacing our own entry is no conflict, whatever changes.
        assert_eq!(info.conflict(&host("52:54:00:fa:00:10", 20, "job-z")), None);
        assert_eq!(info.conflict(&host("52:54:00:fa:00:12", 12, "new")), None);
        assert_eq!(
            info.conflict(&host("52:54:00:fa:00:12", 10, "new"))
                .as_deref(),
            Some("address 10.250.7.10 is leased to 52:54:00:fa:00:10")
        );
        assert_eq!(
            info.conflict(&host("52:54:00:fa:00:12", 12, "JOB-A"))
                .as_deref(),
            Some("hostname JOB-A is leased to 52:54:00:fa:00:10")
        );
    }

    #[test]
    fn spec_and_host_validation() {
        assert_eq!(spec().problem(), None);
        let bad = |f: fn(&mut PrivateNetworkSpec)| {
            let mut s = spec();
            f(&mut s);
            s.problem().expect("a problem")
        };
        assert!(bad(|s| s.bridge = "a-sixteen-byte-x".to_owned()).contains("bridge"));
        assert!(bad(|s| s.bridge = "br'0".to_owned()).contains("bridge"));
        assert!(bad(|s| s.name = "a/b".to_owned()).contains("name"));
        assert!(bad(|s| s.prefix_len = 31).contains("prefix"));
        assert!(bad(|s| s.gateway = Ipv4Addr::new(10, 250, 7, 255)).contains("broadcast"));
        assert!(bad(|s| s.gateway = Ipv4Addr::new(10, 250, 7, 0)).contains("broadcast"));

        let s = spec();
        assert_eq!(
            s.host_problem(&host("52:54:00:fa:00:10", 10, "job-a")),
            None
        );
        for (h, needle) in [
            (host("52:54:00:fa:00:10", 1, "a"), "not a guest address"),
            (host("52:54:00:fa:00:10", 0, "a"), "not a guest address"),
            (host("52:54:00:fa:00:10", 255, "a"), "not a guest address"),
            (host("52:54:00:fa:00", 10, "a"), "MAC"),
            (host("52:54:00:fa:00:1g", 10, "a"), "MAC"),
            (host("52:54:00:fa:00:10", 10, "a,b"), "hostname"),
            (host("52:54:00:fa:00:10", 10, "-a"), "hostname"),
            (host("52:54:00:fa:00:10", 10, ""), "hostname"),
        ] {
            let p = s.host_problem(&h).unwrap_or_default();
            assert!(p.contains(needle), "{h:?}: {p:?}");
        }
        let outside = DhcpHost {
            address: Ipv4Addr::new(10, 250, 8, 10),
            ..host("52:54:00:fa:00:10", 10, "a")
        };
        assert!(s.host_problem(&outside).is_some());
    }
}
