//! The only door to the hypervisor.
//!
//! [`VmBackend`] is a small, coarse interface: make a VM exist (disk overlay, seed image and
//! domain definition), power it on and off, remove it with every file it owns, and observe it.
//! [`libvirt::LibvirtBackend`] implements it on a real libvirt daemon; [`fake::FakeBackend`] is an
//! in-memory hypervisor for component tests and `backend = "fake"`.
//!
//! Every method is idempotent where the operation allows it (`ensure_*`, `remove` of a missing
//! VM is `Ok`), so the job runner can simply repeat an interrupted step after a crash.

pub mod fake;
pub mod libvirt;

use std::path::PathBuf;

use async_trait::async_trait;
use tokio::sync::broadcast;

/// Hypervisor acceleration used for a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation (`<domain type='kvm'>`).
    Kvm,
    /// Software emulation (`<domain type='qemu'>`).
    Tcg,
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootMode {
    /// The disk carries its own bootloader (real cloud images).
    Disk,
    /// Direct kernel boot: the kernel and initrd live next to the base image.
    Kernel {
        kernel: PathBuf,
        initrd: PathBuf,
        cmdline: String,
    },
}

/// What a VM's NIC is plugged into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicAttachment {
    /// A libvirt network (vmhost's private NAT network).
    Network(String),
    /// A host bridge the operator set up (where a public IP pool lives).
    Bridge(String),
}

/// A network interface of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    pub attachment: NicAttachment,
    /// MAC address, lowercase `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// Host-side tap device name (at most 15 bytes); the firewall matches on it, so it is
    /// chosen by vmhost, never by libvirt.
    pub tap: String,
}

/// vmhost's private network: a libvirt NAT network it defines, starts and owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateNetworkSpec {
    /// libvirt network name.
    pub name: String,
    /// Host bridge device libvirt creates for it (at most 15 bytes).
    pub bridge: String,
    /// The host's address on the bridge: the guests' gateway and DNS server.
    pub gateway: std::net::Ipv4Addr,
    pub prefix_len: u8,
}

impl PrivateNetworkSpec {
    /// Why this spec cannot be a network vmhost owns, if it cannot: libvirt accepts some of
    /// these (a gateway that is the subnet's broadcast address) and fails late on others (a
    /// bridge name the kernel refuses), so both backends check them first.
    pub fn problem(&self) -> Option<String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Some("the network name is empty or contains '/'".to_owned());
        }
        if !is_ifname(&self.bridge) {
            return Some(format!(
                "bridge name {:?} is not 1 to 15 bytes of [A-Za-z0-9_.-]",
                self.bridge
            ));
        }
        if !(8..=30).contains(&self.prefix_len) {
            return Some(format!(
                "prefix /{} leaves no room for guests (use /8 to /30)",
                self.prefix_len
            ));
        }
        let (network, broadcast) = self.subnet_bounds();
        if self.gateway == network || self.gateway == broadcast {
            return Some(format!(
                "gateway {} is the network or broadcast address of /{}",
                self.gateway, self.prefix_len
            ));
        }
        None
    }

    /// Why `host` cannot be a fixed lease of this network, if it cannot (libvirt itself
    /// accepts an address outside the subnet and a name that breaks dnsmasq's hosts file).
    pub fn host_problem(&self, host: &DhcpHost) -> Option<String> {
        if let Some(p) = host.problem() {
            return Some(p);
        }
        let (network, broadcast) = self.subnet_bounds();
        let a = host.address;
        if a <= network || a >= broadcast || a == self.gateway {
            return Some(format!(
                "address {a} is not a guest address of {}/{}",
                network, self.prefix_len
            ));
        }
        None
    }

    /// The subnet's network and broadcast addresses.
    fn subnet_bounds(&self) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len.min(32)))
            .unwrap_or(0);
        let gw = u32::from(self.gateway);
        ((gw & mask).into(), (gw | !mask).into())
    }
}

/// A fixed DHCP lease of the private network: this MAC always gets this address and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: String,
    pub address: std::net::Ipv4Addr,
    pub hostname: String,
}

impl DhcpHost {
    /// Why this entry is malformed, if it is: the MAC must be `xx:xx:xx:xx:xx:xx` (hex) and
    /// the hostname one DNS label (libvirt would write a comma or space in it straight into
    /// dnsmasq's hosts file).
    pub fn problem(&self) -> Option<String> {
        let octets: Vec<_> = self.mac.split(':').collect();
        let mac_ok = octets.len() == 6
            && octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
        if !mac_ok {
            return Some(format!("MAC {:?} is not xx:xx:xx:xx:xx:xx", self.mac));
        }
        let h = &self.hostname;
        let label_ok = (1..=63).contains(&h.len())
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !h.starts_with('-')
            && !h.ends_with('-');
        if !label_ok {
            return Some(format!("hostname {h:?} is not a DNS label"));
        }
        None
    }

    /// Whether `mac` is this entry's MAC (libvirt lowercases MACs; callers may not).
    pub fn has_mac(&self, mac: &str) -> bool {
        self.mac.eq_ignore_ascii_case(mac)
    }
}

/// A Linux interface name: 1 to 15 bytes, none of them `/`, `:`, whitespace or NUL (we also
/// keep it to characters that need no quoting anywhere).
fn is_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        && s != "."
        && s != ".."
}

/// Everything the backend needs to create one VM (one rank of a job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// Domain name, unique on the host (`<prefix>-<job>-<rank>`).
    pub name: String,
    /// The job this VM belongs to; stamped into the domain metadata.
    pub job_id: String,
    pub rank: u32,
    /// Identifies the vmhost instance that owns the domain (also in the metadata).
    pub agent_id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
    pub boot: BootMode,
    /// Read-only base image the overlay is backed by.
    pub base_image: PathBuf,
    /// Format of the base image as `qemu-img` names it (`qcow2`, `raw`).
    pub base_format: String,
    /// The job's qcow2 overlay; created by the backend, grown to `disk_gib`.
    pub overlay: PathBuf,
    pub disk_gib: u64,
    /// The NoCloud seed image written by the backend from `seed_image`.
    pub seed_path: PathBuf,
    /// Bytes of the seed image (a vfat filesystem labelled CIDATA); `None` for images without
    /// cloud-init, which then get no seed disk at all.
    pub seed_image: Option<Vec<u8>>,
    /// Serial console log file.
    pub console_log: PathBuf,
    pub nics: Vec<NicSpec>,
}

impl VmSpec {
    /// The stamp in this VM's domain metadata.
    pub fn owner(&self) -> DomainOwner {
        DomainOwner {
            agent_id: self.agent_id.clone(),
            job_id: self.job_id.clone(),
            rank: self.rank,
        }
    }

    /// Files this VM owns on the host, deleted by [`VmBackend::remove`].
    pub fn files(&self) -> VmFiles {
        VmFiles {
            overlay: self.overlay.clone(),
            seed: self.seed_path.clone(),
            console_log: self.console_log.clone(),
        }
    }
}

/// The host files that belong to one VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmFiles {
    pub overlay: PathBuf,
    pub seed: PathBuf,
    pub console_log: PathBuf,
}

impl VmFiles {
    pub fn all(&self) -> [&PathBuf; 3] {
        [&self.overlay, &self.seed, &self.console_log]
    }
}

/// Observed power state of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerState {
    Running,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
}

/// Why a domain stopped, as far as the hypervisor knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The guest powered itself off (or honoured an ACPI request).
    GuestShutdown,
    /// Destroyed from the host (by vmhost or an operator).
    Destroyed,
    /// The QEMU process crashed or was killed.
    Crashed,
    /// Failed to start or some other reason.
    Other,
}

/// A lifecycle event from the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    Started {
        name: String,
    },
    Stopped {
        name: String,
        cause: StopCause,
    },
    /// The guest asked to reboot; the domain stays up.
    Rebooted {
        name: String,
    },
    Undefined {
        name: String,
    },
}

impl VmEvent {
    pub fn name(&self) -> &str {
        match self {
            VmEvent::Started { name }
            | VmEvent::Stopped { name, .. }
            | VmEvent::Rebooted { name }
            | VmEvent::Undefined { name } => name,
        }
    }
}

/// A domain found on the host by [`VmBackend::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    /// `(agent_id, job_id, rank)` from the vmhost metadata, if the domain carries it.
    pub owner: Option<DomainOwner>,
    pub state: PowerState,
}

/// The vmhost stamp in a domain's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainOwner {
    pub agent_id: String,
    pub job_id: String,
    pub rank: u32,
}

/// Host resources as the hypervisor reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostInfo {
    pub cpus: u32,
    pub memory_mib: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("hypervisor is unavailable")]
    Unavailable {
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("domain {name} does not exist")]
    NoSuchDomain { name: String },
    #[error("network {name} does not exist")]
    NoSuchNetwork { name: String },
    /// A network of that name exists but is not the one asked for; vmhost never redefines it.
    #[error("network {name} exists with another configuration: {detail}")]
    NetworkMismatch { name: String, detail: String },
    /// The domain exists but is not running, so it has no console to open.
    #[error("domain {name} is not running")]
    NotRunning { name: String },
    #[error("failed to prepare the disk of {name}")]
    Disk {
        name: String,
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op} is not supported by this hypervisor connection")]
    NotSupported { op: &'static str },
    #[error("{op} failed for domain {name}")]
    Hypervisor {
        op: &'static str,
        name: String,
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A network operation failed or was refused (an invalid spec or lease, an address or
    /// hostname already leased to another MAC).
    #[error("{op} failed for network {name}")]
    Network {
        op: &'static str,
        name: String,
        #[source]
        err: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A byte stream to one of a VM's consoles.
pub type ConsoleStream = Box<dyn ConsoleIo>;

/// What a console stream can do: read and write bytes asynchronously.
pub trait ConsoleIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> ConsoleIo for T {}

/// The hypervisor seam. See the module docs.
#[async_trait]
pub trait VmBackend: Send + Sync + 'static {
    /// Creates the overlay, writes the seed and defines the domain, unless they already exist.
    /// On failure nothing this call created is left behind.
    async fn ensure_defined(&self, spec: &VmSpec) -> Result<(), BackendError>;
    /// Boots a defined domain; `Ok` if it is already running.
    async fn start(&self, name: &str) -> Result<(), BackendError>;
    /// Asks the guest to power off (ACPI power button); returns at once.
    async fn shutdown(&self, name: &str) -> Result<(), BackendError>;
    /// Powers the domain off at once; `Ok` if it is not running.
    async fn destroy(&self, name: &str) -> Result<(), BackendError>;
    /// Powers off and undefines the domain if it is `owner`'s, then deletes the VM's files;
    /// `Ok` if nothing is left already. A domain of that name stamped for anyone else (another
    /// vmhost on the same libvirt, or no stamp at all) is left alone: vmhost only ever removes
    /// what it can prove it made.
    async fn remove(
        &self,
        name: &str,
        owner: &DomainOwner,
        files: &VmFiles,
    ) -> Result<(), BackendError>;
    /// Current power state, `None` when the domain does not exist.
    async fn state(&self, name: &str) -> Result<Option<PowerState>, BackendError>;
    /// Why a shut-off domain stopped, as the hypervisor recorded it; `None` if it is not shut
    /// off (or does not exist). Lets a periodic sync tell a guest power-off from a crash even
    /// when the event was missed.
    async fn stop_cause(&self, name: &str) -> Result<Option<StopCause>, BackendError>;
    /// Every domain on the host whose name starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<DomainInfo>, BackendError>;
    /// Host capacity; also a liveness probe of the hypervisor connection.
    async fn host_info(&self) -> Result<HostInfo, BackendError>;
    /// Opens the VM's VNC display, skipping VNC authentication: the caller has authenticated
    /// the user. QEMU listens on no TCP port; the stream is the only way in.
    async fn open_vnc(&self, name: &str) -> Result<ConsoleStream, BackendError>;
    /// Attaches to the VM's serial console (bytes to and from the guest's ttyS0).
    async fn open_serial(&self, name: &str) -> Result<ConsoleStream, BackendError>;
    /// Defines (persistent, autostarted) and starts the private network unless it already
    /// runs; starts it if it is defined but inactive (after a libvirtd or host restart). An
    /// existing network of that name that is not NAT or has another bridge or address is
    /// [`BackendError::NetworkMismatch`], never silently changed. DHCP serves only the fixed
    /// leases (no dynamic range); the gateway is the guests' router and DNS server.
    async fn ensure_network(&self, spec: &PrivateNetworkSpec) -> Result<(), BackendError>;
    /// Adds or replaces (by MAC, ignoring case) a fixed DHCP lease, live and in the persistent
    /// definition; idempotent. Refused ([`BackendError::Network`]) when the address is not a
    /// guest address of the network or another MAC holds the address or hostname;
    /// [`BackendError::NoSuchNetwork`] for an unknown network.
    async fn put_dhcp_host(&self, network: &str, host: &DhcpHost) -> Result<(), BackendError>;
    /// Removes the fixed lease of `mac`; `Ok` if there is none.
    async fn remove_dhcp_host(&self, network: &str, mac: &str) -> Result<(), BackendError>;
    /// Lifecycle events of all domains. Events can be lost (daemon restart, lagging receiver),
    /// so consumers also poll [`VmBackend::state`] periodically.
    fn subscribe(&self) -> broadcast::Receiver<VmEvent>;
}
