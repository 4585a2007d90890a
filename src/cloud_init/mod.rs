//! NoCloud seed rendering (pure) — to be filled in.
use std::net::Ipv4Addr;

/// How one NIC gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicAddressing {
    Dhcp,
    Static { address: Ipv4Addr, prefix_len: u8, gateway: Option<Ipv4Addr>, dns: Vec<Ipv4Addr> },
}

/// A NIC as cloud-init network-config v2 sees it (matched by MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedNic {
    pub mac: String,
    pub addressing: NicAddressing,
}

/// Typed inputs of one VM's seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedSpec {
    pub instance_id: String,
    pub hostname: String,
    pub login_user: String,
    pub ssh_authorized_keys: Vec<String>,
    /// The user's own cloud-config (already parsed into a JSON object), merged into ours.
    pub extra_user_data: Option<serde_json::Map<String, serde_json::Value>>,
    pub nics: Vec<SeedNic>,
}

/// The three files of a NoCloud seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Operator-editable defaults loaded from `cloud-init/`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedTemplates {
    pub user_data: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("invalid seed input: {0}")]
    Invalid(String),
}
// TEMPORARY stand-ins until the seed module lands.
pub fn render(s: &SeedSpec, _t: &SeedTemplates) -> Result<SeedFiles, SeedError> { Ok(SeedFiles { meta_data: s.hostname.clone(), user_data: String::new(), network_config: String::new() }) }
pub fn vfat_image(_f: &SeedFiles) -> Result<Vec<u8>, SeedError> { Ok(vec![0; 16]) }
pub fn validate_ssh_keys(k: &[String]) -> Result<(), SeedError> { if k.iter().any(|k| !k.starts_with("ssh-")) { return Err(SeedError::Invalid("bad key".into())) } Ok(()) }
pub fn parse_user_cloud_config(_t: &str) -> Result<serde_json::Map<String, serde_json::Value>, SeedError> { Ok(Default::default()) }
pub fn load_templates(_d: Option<&std::path::Path>) -> Result<SeedTemplates, SeedError> { Ok(SeedTemplates { user_data: Default::default() }) }
