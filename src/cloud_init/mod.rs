//! NoCloud seed: the three files cloud-init reads on a VM's first boot, and the vfat disk that
//! carries them.
//!
//! `render` turns a [`SeedSpec`] (typed, partly user-controlled) plus the operator's
//! [`SeedTemplates`] into [`SeedFiles`]. It is pure: no I/O, no clock, no randomness, so the
//! same inputs always give byte-identical files (which the snapshot tests pin). The only I/O in
//! this module is [`load_templates`] (reads the operator's template directory once, at start-up)
//! and nothing else: [`vfat_image`] builds the disk image in memory and the caller writes it.
//!
//! # Injection safety
//! Every file is a JSON document produced by `serde_json` (JSON is YAML), never text pasted
//! together. The writer (`yaml.rs`) additionally escapes the characters that YAML parsers
//! reject or fold (DEL, C1 controls, U+2028/9, …) and writes floats in a form YAML 1.1 still reads
//! as numbers, so cloud-init's PyYAML sees exactly the structure `serde_json` describes. A
//! hostname, SSH key comment or user-data string can therefore never become configuration. The
//! inputs that end up outside JSON strings (hostname, login user, MACs, keys) are validated
//! anyway (`validate.rs`), because they also become file names, account names and interface
//! matches inside the guest.
//!
//! # What the user controls, and what vmhost keeps
//! `user-data` = operator template, deep-merged with the user's own cloud-config (maps merge,
//! lists append, other values: the user's wins), then vmhost's keys written last:
//! * `users`: the first entry is always the job's login user (sudo, locked password, the job's
//!   SSH keys). Users from the template and then from the user follow it. An entry reusing the
//!   login user's name, or (from the user) an operator template user's name, is refused: cloud-init
//!   merges same-name entries, which would let them change the login user's keys or sudo rule.
//! * `ssh_pwauth: false` and `preserve_hostname: false`: accepted from a source only with that
//!   same value, refused otherwise (a silent override would surprise whoever wrote it).
//! * Refused outright, because they would break how vmhost drives the guest or are not the seed's
//!   business: `hostname`, `fqdn`, `prefer_fqdn_over_hostname` (vmhost names the VM through
//!   meta-data `local-hostname`), `datasource`, `datasource_list`, `network` (network-config is
//!   vmhost's; cloud-init ignores `network` in user-data anyway), `cloud_init_modules`,
//!   `cloud_config_modules`, `cloud_final_modules` (dropping `users_groups`/`ssh` would leave the
//!   login user uncreated), `system_info`, `merge_how`, `merge_type`.
//! * Everything else (`runcmd`, `packages`, `write_files`, `disable_root`, `chpasswd`, …) is the
//!   user's: it is their VM and they are root in it. This list is about keeping the seed
//!   coherent, not a security boundary: a `runcmd` can undo anything.
//!
//! User cloud-config is read as YAML 1.2 (`serde_yaml`), cloud-init reads YAML 1.1: plain `yes`,
//! `no`, `on`, `off` and `1_000` are strings here, `0644` is the string `"0644"` (which
//! cloud-init's `write_files` reads as octal, as intended). The rendered JSON fixes one meaning.
//!
//! # Limits
//! `user-data` is capped at [`MAX_USER_DATA_BYTES`] (64 KiB, Nova's limit), both as user input
//! and as the rendered file. Mapping keys are capped at [`MAX_KEY_CHARS`] characters because YAML
//! parsers give up on flow-mapping keys over 1024 characters.

use std::net::Ipv4Addr;

mod image;
mod network;
mod template;
mod user_data;
mod validate;
mod yaml;

pub use image::vfat_image;
pub use template::load_templates;
pub use yaml::parse_user_cloud_config;

/// Largest `user-data`, in bytes, accepted from a user and emitted in a seed (Nova's limit).
pub const MAX_USER_DATA_BYTES: usize = 64 * 1024;

/// Longest mapping key, in characters, anywhere in `user-data`. Escaped, such a key stays well
/// under the 1024-character limit YAML parsers put on flow-mapping keys.
pub const MAX_KEY_CHARS: usize = 128;

/// How one NIC gets its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicAddressing {
    Dhcp,
    Static {
        address: Ipv4Addr,
        prefix_len: u8,
        gateway: Option<Ipv4Addr>,
        dns: Vec<Ipv4Addr>,
    },
}

/// A NIC as cloud-init network-config v2 sees it (matched by MAC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedNic {
    /// Lowercase `xx:xx:xx:xx:xx:xx`, unicast; the guest interface is matched by it.
    pub mac: String,
    pub addressing: NicAddressing,
}

/// Typed inputs of one VM's seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedSpec {
    /// Also a directory name inside the guest (`/var/lib/cloud/instances/<id>`); changing it
    /// makes cloud-init treat the next boot as a first boot.
    pub instance_id: String,
    /// RFC 1123 label, lowercase.
    pub hostname: String,
    /// POSIX account created with sudo and the SSH keys below.
    pub login_user: String,
    /// OpenSSH public key lines, `<type> <base64> [comment]`.
    pub ssh_authorized_keys: Vec<String>,
    /// The user's own cloud-config (already parsed into a JSON object), merged into ours.
    pub extra_user_data: Option<serde_json::Map<String, serde_json::Value>>,
    /// In guest order: the first becomes `eth0`.
    pub nics: Vec<SeedNic>,
    /// Names the guest resolves through `/etc/hosts` (peers), appended on first boot.
    pub hosts: Vec<HostEntry>,
}

/// One `/etc/hosts` line: an address and an RFC 1123 label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub address: Ipv4Addr,
    pub name: String,
}

/// The three files of a NoCloud seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    /// The `instance-id` inside `meta_data`, kept so the image's volume id can derive from it.
    pub instance_id: String,
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// Operator-editable defaults loaded from `cloud-init/`.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedTemplates {
    pub user_data: serde_json::Map<String, serde_json::Value>,
}

/// Everything that can go wrong building a seed. `Display` never repeats the source: log or
/// show the whole chain (the YAML/JSON sources carry the line and column a user needs).
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Input that vmhost refuses; the message is meant for the person who wrote it.
    #[error("invalid seed input: {0}")]
    Invalid(String),
    #[error("cloud-config is not valid YAML")]
    Yaml(#[source] serde_yaml::Error),
    #[error("cloud-config is not valid JSON")]
    Json(#[source] serde_json::Error),
    #[error("failed to read cloud-init template {path}")]
    TemplateRead {
        path: std::path::PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("invalid cloud-init template {path}")]
    Template {
        path: std::path::PathBuf,
        #[source]
        err: Box<SeedError>,
    },
    #[error("no user-data.yaml or user-data.json in cloud-init template directory {dir}")]
    TemplateMissing { dir: std::path::PathBuf },
    #[error("both user-data.yaml and user-data.json in cloud-init template directory {dir}")]
    TemplateAmbiguous { dir: std::path::PathBuf },
    /// Serialising a seed file failed; a bug, not bad input.
    #[error("failed to encode a seed file")]
    Encode(#[source] serde_json::Error),
    /// Building the vfat image failed; a bug or a size estimate gone wrong, not bad input.
    #[error("failed to build the seed image")]
    Image(#[source] std::io::Error),
}

/// Checks a job's SSH public keys the same way [`render`] will, so a bad key is refused
/// when the job is submitted rather than when its VM is built.
pub fn validate_ssh_keys(keys: &[String]) -> Result<(), SeedError> {
    keys.iter()
        .try_for_each(|key| validate::ssh_key(key).map(drop))
}

/// What `user-data` is rendered from: the part of a [`SeedSpec`] that is the same for every
/// replica and known before the job has an id, so a job can be checked when it is submitted
/// with the very function that later writes its seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UserDataSpec<'a> {
    pub login_user: &'a str,
    pub ssh_authorized_keys: &'a [String],
    pub extra_user_data: Option<&'a serde_json::Map<String, serde_json::Value>>,
    pub hosts: &'a [HostEntry],
}

impl SeedSpec {
    pub fn user_data_spec(&self) -> UserDataSpec<'_> {
        UserDataSpec {
            login_user: &self.login_user,
            ssh_authorized_keys: &self.ssh_authorized_keys,
            extra_user_data: self.extra_user_data.as_ref(),
            hosts: &self.hosts,
        }
    }
}

/// Renders the three seed files. Pure: validates every input, then serialises.
pub fn render(spec: &SeedSpec, templates: &SeedTemplates) -> Result<SeedFiles, SeedError> {
    validate::instance_id(&spec.instance_id)?;
    validate::hostname(&spec.hostname)?;
    let user_data = render_user_data(&spec.user_data_spec(), templates)?;

    let meta_data = serde_json::json!({
        "instance-id": spec.instance_id,
        "local-hostname": spec.hostname,
    });
    Ok(SeedFiles {
        instance_id: spec.instance_id.clone(),
        meta_data: yaml::to_string(&meta_data)?,
        user_data,
        network_config: network::render(&spec.nics)?,
    })
}

/// Renders `user-data` alone, exactly as [`render`] does: every rule on who may set what, and
/// the size limit on the rendered file, apply here.
pub fn render_user_data(
    spec: &UserDataSpec<'_>,
    templates: &SeedTemplates,
) -> Result<String, SeedError> {
    validate::login_user(spec.login_user)?;
    for host in spec.hosts {
        validate::hostname(&host.name)?;
    }
    let keys = spec
        .ssh_authorized_keys
        .iter()
        .map(|key| validate::ssh_key(key))
        .collect::<Result<Vec<_>, _>>()?;
    user_data::render(spec, &keys, templates)
}

#[cfg(test)]
mod tests;
