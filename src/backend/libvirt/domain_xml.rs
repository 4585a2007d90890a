//! Domain XML for one VM: [`render`] turns a [`VmSpec`] into libvirt domain XML, and
//! [`parse_owner`] reads the vmhost stamp back out of the XML libvirt returns.
//!
//! Both are pure functions with no I/O; the adapter in `mod.rs` only sends and receives strings.
//!
//! Invariants:
//! - every interpolated value goes through [`escape`], so names, paths and IDs may contain any of
//!   `& < > ' "`; characters XML 1.0 cannot carry at all (NUL and most C0 controls) become
//!   U+FFFD. Paths that are not UTF-8 would be rendered lossily, which is why
//!   `LibvirtBackend::ensure_defined` rejects them before rendering;
//! - the VM is owned through a `<vmhost:instance>` element in `<metadata>` in the namespace
//!   [`METADATA_NS`]. libvirt keeps the element but may rewrite quoting and the prefix, so
//!   [`parse_owner`] matches on the namespace URI, not on the text.
//!
//! Choices checked under TCG on libvirt 9.0 / QEMU 7.2 (`machine='pc'`):
//! - `kvm` domains get `<cpu mode='host-model'/>`; `tcg` domains get no `<cpu>` element, so
//!   libvirt uses QEMU's default `qemu64` model (`host-model` also starts under TCG here, but its
//!   meaning is tied to the host CPU and KVM);
//! - `<video><model type='vga'/>` works under TCG with VNC `<listen type='none'/>` (no TCP port;
//!   the agent reaches the console through `virDomainOpenGraphicsFD`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;

use crate::backend::{Accel, BootMode, DomainOwner, NicAttachment, VmSpec};

/// XML namespace of the vmhost metadata element.
pub const METADATA_NS: &str = "https://vmhost.dev/xmlns/vmhost/1";

/// Renders the libvirt domain XML for `spec`.
pub fn render(spec: &VmSpec) -> String {
    let mut x = String::with_capacity(4096);
    // `write!` into a String cannot fail.
    let w = &mut x;
    let domain_type = match spec.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let _ = writeln!(w, "<domain type='{domain_type}'>");
    let _ = writeln!(w, "  <name>{}</name>", escape(&spec.name));
    let _ = writeln!(w, "  <metadata>");
    let _ = writeln!(
        w,
        "    <vmhost:instance xmlns:vmhost='{METADATA_NS}' agent='{}' job='{}' rank='{}'/>",
        escape(&spec.agent_id),
        escape(&spec.job_id),
        spec.rank
    );
    let _ = writeln!(w, "  </metadata>");
    let _ = writeln!(w, "  <memory unit='MiB'>{}</memory>", spec.memory_mib);
    let _ = writeln!(w, "  <vcpu>{}</vcpu>", spec.vcpus);
    let _ = writeln!(w, "  <os>");
    let _ = writeln!(w, "    <type arch='x86_64' machine='pc'>hvm</type>");
    match &spec.boot {
        BootMode::Disk => {
            let _ = writeln!(w, "    <boot dev='hd'/>");
        }
        BootMode::Kernel {
            kernel,
            initrd,
            cmdline,
        } => {
            let _ = writeln!(w, "    <kernel>{}</kernel>", path(kernel));
            let _ = writeln!(w, "    <initrd>{}</initrd>", path(initrd));
            let _ = writeln!(w, "    <cmdline>{}</cmdline>", escape(cmdline));
        }
    }
    let _ = writeln!(w, "  </os>");
    let _ = writeln!(w, "  <features>");
    let _ = writeln!(w, "    <acpi/>");
    let _ = writeln!(w, "    <apic/>");
    let _ = writeln!(w, "  </features>");
    if spec.accel == Accel::Kvm {
        let _ = writeln!(w, "  <cpu mode='host-model'/>");
    }
    let _ = writeln!(w, "  <on_poweroff>destroy</on_poweroff>");
    let _ = writeln!(w, "  <on_reboot>restart</on_reboot>");
    let _ = writeln!(w, "  <on_crash>destroy</on_crash>");
    let _ = writeln!(w, "  <devices>");
    render_devices(w, spec);
    let _ = writeln!(w, "  </devices>");
    let _ = writeln!(w, "</domain>");
    x
}

fn render_devices(w: &mut String, spec: &VmSpec) {
    let _ = writeln!(w, "    <disk type='file' device='disk'>");
    let _ = writeln!(
        w,
        "      <driver name='qemu' type='qcow2' discard='unmap'/>"
    );
    let _ = writeln!(w, "      <source file='{}'/>", path(&spec.overlay));
    let _ = writeln!(w, "      <target dev='vda' bus='virtio'/>");
    let _ = writeln!(w, "    </disk>");
    if spec.seed_image.is_some() {
        let _ = writeln!(w, "    <disk type='file' device='disk'>");
        let _ = writeln!(w, "      <driver name='qemu' type='raw'/>");
        let _ = writeln!(w, "      <source file='{}'/>", path(&spec.seed_path));
        let _ = writeln!(w, "      <target dev='vdb' bus='virtio'/>");
        let _ = writeln!(w, "      <readonly/>");
        let _ = writeln!(w, "    </disk>");
    }
    for nic in &spec.nics {
        match &nic.attachment {
            NicAttachment::Network(network) => {
                let _ = writeln!(w, "    <interface type='network'>");
                let _ = writeln!(w, "      <source network='{}'/>", escape(network));
            }
            NicAttachment::Bridge(bridge) => {
                let _ = writeln!(w, "    <interface type='bridge'>");
                let _ = writeln!(w, "      <source bridge='{}'/>", escape(bridge));
            }
        }
        let _ = writeln!(w, "      <mac address='{}'/>", escape(&nic.mac));
        let _ = writeln!(w, "      <target dev='{}'/>", escape(&nic.tap));
        let _ = writeln!(w, "      <model type='virtio'/>");
        let _ = writeln!(w, "    </interface>");
    }
    let _ = writeln!(w, "    <serial type='pty'>");
    let _ = writeln!(
        w,
        "      <log file='{}' append='on'/>",
        path(&spec.console_log)
    );
    let _ = writeln!(w, "      <target port='0'/>");
    let _ = writeln!(w, "    </serial>");
    let _ = writeln!(w, "    <console type='pty'>");
    let _ = writeln!(w, "      <target type='serial' port='0'/>");
    let _ = writeln!(w, "    </console>");
    let _ = writeln!(w, "    <channel type='unix'>");
    let _ = writeln!(
        w,
        "      <target type='virtio' name='org.qemu.guest_agent.0'/>"
    );
    let _ = writeln!(w, "    </channel>");
    let _ = writeln!(w, "    <input type='tablet' bus='usb'/>");
    let _ = writeln!(w, "    <graphics type='vnc'>");
    let _ = writeln!(w, "      <listen type='none'/>");
    let _ = writeln!(w, "    </graphics>");
    let _ = writeln!(w, "    <video>");
    let _ = writeln!(w, "      <model type='vga'/>");
    let _ = writeln!(w, "    </video>");
    let _ = writeln!(w, "    <memballoon model='virtio'/>");
    let _ = writeln!(w, "    <rng model='virtio'>");
    let _ = writeln!(w, "      <backend model='random'>/dev/urandom</backend>");
    let _ = writeln!(w, "    </rng>");
}

fn path(p: &Path) -> String {
    escape(&p.to_string_lossy()).into_owned()
}

/// Escapes `s` for use in XML text and in attribute values quoted with `'` or `"`.
///
/// Characters that XML 1.0 forbids even as references become U+FFFD.
pub fn escape(s: &str) -> Cow<'_, str> {
    let needs = |c: char| matches!(c, '&' | '<' | '>' | '\'' | '"') || !is_xml_char(c);
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c if !is_xml_char(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `Char` production of XML 1.0 (Rust `char` already excludes surrogates).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// Reads the vmhost stamp from a domain XML, as written by [`render`] and returned (possibly
/// re-serialised) by libvirt. `None` for foreign domains or an incomplete stamp.
pub fn parse_owner(xml: &str) -> Option<DomainOwner> {
    tags(xml).find_map(|tag| {
        let (prefix, local) = match tag.name.split_once(':') {
            Some((p, l)) => (Some(p), l),
            None => (None, tag.name),
        };
        if local != "instance" {
            return None;
        }
        let ns_attr = match prefix {
            Some(p) => format!("xmlns:{p}"),
            None => "xmlns".to_owned(),
        };
        if tag.attr(&ns_attr)?.as_ref() != METADATA_NS {
            return None;
        }
        Some(DomainOwner {
            agent_id: tag.attr("agent")?.into_owned(),
            job_id: tag.attr("job")?.into_owned(),
            rank: tag.attr("rank")?.trim().parse().ok()?,
        })
    })
}

/// A start (or empty-element) tag with its raw attributes.
pub(super) struct Tag<'a> {
    pub(super) name: &'a str,
    attrs: Vec<(&'a str, &'a str)>,
}

impl Tag<'_> {
    /// The decoded value of attribute `name`; `None` if absent or malformed.
    pub(super) fn attr(&self, name: &str) -> Option<Cow<'_, str>> {
        self.attrs
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| unescape(v))
    }
}

/// Iterates over the start tags of `xml`, skipping comments, CDATA, processing instructions,
/// declarations and end tags. Malformed input ends the iteration.
pub(super) fn tags(xml: &str) -> impl Iterator<Item = Tag<'_>> {
    let mut rest = xml;
    std::iter::from_fn(move || loop {
        let lt = rest.find('<')?;
        rest = &rest[lt..];
        let skip_to = |r: &str, end: &str| r.find(end).map(|i| i + end.len());
        let consumed = if rest.starts_with("<!--") {
            skip_to(rest, "-->")?
        } else if rest.starts_with("<![CDATA[") {
            skip_to(rest, "]]>")?
        } else if rest.starts_with("<?") {
            skip_to(rest, "?>")?
        } else if rest.starts_with("<!") || rest.starts_with("</") {
            skip_to(rest, ">")?
        } else {
            let (tag, len) = parse_start_tag(rest)?;
            rest = &rest[len..];
            return Some(tag);
        };
        rest = &rest[consumed..];
    })
}

/// Parses `<name a='v' b="w">` or `<name/>` at the start of `s`; returns the tag and its length.
fn parse_start_tag(s: &str) -> Option<(Tag<'_>, usize)> {
    let is_name_end = |c: char| c.is_whitespace() || c == '>' || c == '/' || c == '=';
    let body = &s[1..];
    let name_len = body.find(is_name_end)?;
    let name = &body[..name_len];
    let mut pos = 1 + name_len;
    let mut attrs = Vec::new();
    loop {
        let r = &s[pos..];
        let trimmed = r.trim_start();
        pos += r.len() - trimmed.len();
        if trimmed.starts_with('>') {
            return Some((Tag { name, attrs }, pos + 1));
        }
        if trimmed.starts_with("/>") {
            return Some((Tag { name, attrs }, pos + 2));
        }
        let an_len = trimmed.find(is_name_end)?;
        if an_len == 0 {
            return None;
        }
        let an = &trimmed[..an_len];
        let after = trimmed[an_len..].trim_start();
        let after = after.strip_prefix('=')?.trim_start();
        let quote = after.chars().next().filter(|q| *q == '\'' || *q == '"')?;
        let vlen = after[1..].find(quote)?;
        attrs.push((an, &after[1..1 + vlen]));
        pos = s.len() - after.len() + 1 + vlen + 1;
    }
}

/// Decodes the predefined entities and character references; `None` for a malformed reference.
fn unescape(v: &str) -> Option<Cow<'_, str>> {
    if !v.contains('&') {
        return Some(Cow::Borrowed(v));
    }
    let mut out = String::with_capacity(v.len());
    let mut rest = v;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let semi = rest[amp..].find(';')? + amp;
        let ent = &rest[amp + 1..semi];
        let c = match ent {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "apos" => '\'',
            "quot" => '"',
            _ => {
                let code = if let Some(hex) = ent.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16).ok()?
                } else {
                    ent.strip_prefix('#')?.parse().ok()?
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &rest[semi + 1..];
    }
    out.push_str(rest);
    Some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::backend::{NicAttachment, NicSpec};

    fn spec(name: &str, accel: Accel, boot: BootMode, nics: Vec<NicSpec>) -> VmSpec {
        let dir = PathBuf::from("/var/lib/vmhost/jobs").join(name);
        VmSpec {
            name: name.to_owned(),
            job_id: "job-42".to_owned(),
            rank: 1,
            agent_id: "agent-a".to_owned(),
            vcpus: 2,
            memory_mib: 2048,
            accel,
            boot,
            base_image: PathBuf::from("/var/lib/vmhost/images/debian/disk.qcow2"),
            base_format: "qcow2".to_owned(),
            overlay: dir.join("disk.qcow2"),
            disk_gib: 20,
            seed_path: dir.join("seed.img"),
            seed_image: Some(vec![0; 16]),
            console_log: dir.join("console.log"),
            nics,
        }
    }

    fn kernel_boot() -> BootMode {
        BootMode::Kernel {
            kernel: PathBuf::from("/var/lib/vmhost/images/debian/vmlinuz"),
            initrd: PathBuf::from("/var/lib/vmhost/images/debian/initrd.img"),
            cmdline: "console=ttyS0 root=/dev/vda rw".to_owned(),
        }
    }

    #[test]
    fn kernel_boot_tcg_renders_direct_boot_without_cpu_model() {
        let xml = render(&spec("vmhost-job-42-1", Accel::Tcg, kernel_boot(), vec![]));
        insta::assert_snapshot!(xml);
    }

    #[test]
    fn disk_boot_kvm_with_two_nics_renders_host_model_and_interfaces() {
        let nics = vec![
            NicSpec {
                attachment: NicAttachment::Bridge("br-public".to_owned()),
                mac: "52:54:00:aa:bb:01".to_owned(),
                tap: "vh0123456789-0".to_owned(),
            },
            NicSpec {
                attachment: NicAttachment::Network("vmhost-private".to_owned()),
                mac: "52:54:00:aa:bb:02".to_owned(),
                tap: "vh0123456789-1".to_owned(),
            },
        ];
        let xml = render(&spec("vmhost-job-42-1", Accel::Kvm, BootMode::Disk, nics));
        insta::assert_snapshot!(xml);
    }

    #[test]
    fn hostile_values_are_escaped() {
        let mut s = spec(
            "evil'\"<&>",
            Accel::Tcg,
            BootMode::Kernel {
                kernel: PathBuf::from("/img/<k>&'\".bin"),
                initrd: PathBuf::from("/img/i'nit"),
                cmdline: "console=ttyS0 x=\"a b\" y='c' </cmdline><evil/>".to_owned(),
            },
            vec![NicSpec {
                attachment: NicAttachment::Network("net'><x".to_owned()),
                mac: "52:54:00:00:00:01".to_owned(),
                tap: "vh'><x".to_owned(),
            }],
        );
        s.job_id = "job\"/><evil a='".to_owned();
        s.agent_id = "ag&ent\u{1}".to_owned();
        s.console_log = PathBuf::from("/logs/a'b\"c<d>&e.log");
        let xml = render(&s);
        insta::assert_snapshot!(xml);
        // Every tag in the output is one we wrote: nothing was injected.
        let names: Vec<_> = tags(&xml).map(|t| t.name).collect();
        assert!(!names.contains(&"evil"), "{names:?}");
        assert!(!names.contains(&"x"), "{names:?}");
    }

    #[test]
    fn escape_leaves_plain_text_borrowed() {
        assert!(matches!(escape("plain-name_1.2"), Cow::Borrowed(_)));
        assert_eq!(escape("a&b<c>d'e\"f"), "a&amp;b&lt;c&gt;d&apos;e&quot;f");
        assert_eq!(
            escape("nul\0bell\u{7}tab\t"),
            "nul\u{FFFD}bell\u{FFFD}tab\t"
        );
    }

    #[test]
    fn parse_owner_round_trips_render() {
        let mut s = spec("vmhost-x", Accel::Tcg, BootMode::Disk, vec![]);
        s.job_id = "j&<>'\"1".to_owned();
        s.agent_id = "agent 'b'".to_owned();
        s.rank = 7;
        let owner = parse_owner(&render(&s)).expect("owner");
        assert_eq!(
            owner,
            DomainOwner {
                agent_id: "agent 'b'".to_owned(),
                job_id: "j&<>'\"1".to_owned(),
                rank: 7
            }
        );
    }

    #[test]
    fn parse_owner_reads_libvirt_reserialised_metadata() {
        // As `virsh dumpxml` prints it: double quotes, other prefix, entities, other apps' metadata.
        let xml = r#"<domain type="qemu" id="3">
  <name>vmhost-job-1-0</name>
  <description>&lt;v:instance xmlns:v="https://vmhost.dev/xmlns/vmhost/1" agent="fake" job="x" rank="9"/&gt;</description>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    <!-- <v:instance xmlns:v="https://vmhost.dev/xmlns/vmhost/1" agent="c" job="c" rank="1"/> -->
    <v:instance xmlns:v="https://vmhost.dev/xmlns/vmhost/1" agent="a&amp;1" job="&quot;j&#39;&#x41;" rank="3"/>
  </metadata>
</domain>"#;
        assert_eq!(
            parse_owner(xml),
            Some(DomainOwner {
                agent_id: "a&1".to_owned(),
                job_id: "\"j'A".to_owned(),
                rank: 3
            })
        );
    }

    #[test]
    fn parse_owner_ignores_foreign_domains() {
        let plain = "<domain type='kvm'><name>web</name><memory>1</memory></domain>";
        assert_eq!(parse_owner(plain), None);
        let other_ns = "<domain><metadata><x:instance xmlns:x='https://example.com/ns' \
                        agent='a' job='j' rank='0'/></metadata></domain>";
        assert_eq!(parse_owner(other_ns), None);
        let bad_rank = format!(
            "<domain><metadata><v:instance xmlns:v='{METADATA_NS}' agent='a' job='j' \
             rank='-1'/></metadata></domain>"
        );
        assert_eq!(parse_owner(&bad_rank), None);
        let missing_job = format!(
            "<domain><metadata><v:instance xmlns:v='{METADATA_NS}' agent='a' rank='1'/>\
             </metadata></domain>"
        );
        assert_eq!(parse_owner(&missing_job), None);
        assert_eq!(parse_owner(""), None);
        assert_eq!(parse_owner("<domain><metadata><v:instance xmlns:v='"), None);
    }

    #[test]
    fn parse_owner_accepts_default_namespace() {
        let xml = format!(
            "<domain><metadata><instance xmlns=\"{METADATA_NS}\" agent=\"a\" job=\"j\" \
             rank=\"2\"></instance></metadata></domain>"
        );
        assert_eq!(
            parse_owner(&xml),
            Some(DomainOwner {
                agent_id: "a".to_owned(),
                job_id: "j".to_owned(),
                rank: 2
            })
        );
    }
}
