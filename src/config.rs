//! Daemon configuration: one TOML file, every key with an embedded default.
//!
//! `vmhost serve` without `--config` runs on [`Config::default`]: SQLite store and disks under
//! `/var/lib/vmhost`, the local libvirt daemon, the shipped image catalog and two products.
//! Semantic checks run once at startup in [`Config::validate`], never lazily.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::accel::AccelSetting;
use crate::network::config::{PrivateNetworkConfig, PublicPoolConfig};

/// Which hypervisor implementation to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Libvirt,
    /// In-memory hypervisor: no libvirt needed, VMs are simulated.
    Fake,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// HTTP + WebSocket listener.
    pub listen: SocketAddr,
    /// Store, disks, seeds and console logs live here.
    pub data_dir: PathBuf,
    pub backend: BackendKind,
    pub libvirt_uri: String,
    pub accel: AccelSetting,
    /// The providerId and product category provider.
    pub provider_id: String,
    /// Public base URL of this vmhost as browsers reach it (scheme, host, port, path prefix).
    pub public_url: String,
    /// Browser origins (besides `public_url`'s) allowed to open console WebSockets, e.g. the
    /// UCloud web app's `https://cloud.example.org`.
    pub allowed_origins: Vec<String>,
    /// How long a console link may wait before it is used, in seconds (single use).
    pub console_token_ttl_secs: u64,
    /// Directory with the browser assets (`web/` of the source tree, with `npm ci` run in it).
    pub web_dir: PathBuf,
    /// Every domain vmhost creates is named `<domain_prefix>-<job>-<rank>`.
    pub domain_prefix: String,
    /// Where built or hand-placed base images live (relative catalog paths resolve here).
    pub image_dir: PathBuf,
    /// Image catalog file; the shipped `images/catalog.toml` when unset.
    pub catalog: Option<PathBuf>,
    /// Directory with operator cloud-init templates; the shipped `cloud-init/` when unset.
    pub cloud_init_dir: Option<PathBuf>,
    /// vmhost's private NAT network (`[private_network]`); `enabled = false` for none.
    pub private_network: PrivateNetworkConfig,
    /// Public IP pools on host bridges (`[[public_pools]]`); none by default.
    pub public_pools: Vec<PublicPoolConfig>,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Interval of the periodic power-state sync against the hypervisor, in seconds.
    pub sync_interval_secs: u64,
    /// Largest accepted `replicas`.
    pub max_replicas: u32,
    /// How long a suspend waits for the guest to power off after ACPI requests, in seconds,
    /// before forcing it off.
    pub suspend_grace_secs: u64,
    /// Interval at which the ACPI power-button request is repeated during a suspend, in seconds.
    pub suspend_retry_secs: u64,
    /// Schedulable vCPUs per host CPU.
    pub cpu_overcommit: f64,
    /// Schedulable memory per byte of host memory (after `reserved_memory_mib`).
    pub memory_overcommit: f64,
    /// Schedulable overlay disk per byte of the data directory's filesystem.
    pub disk_overcommit: f64,
    /// Host memory never given to VMs, in MiB.
    pub reserved_memory_mib: u64,
    pub users: Vec<UserConfig>,
    pub products: Vec<ProductConfig>,
    /// Serving UCloud/Core as one of its compute providers (`[ucloud]`); without it vmhost
    /// serves only its standalone API.
    pub ucloud: Option<UcloudConfig>,
}

/// What Core's provider registration hands out (`GET /api/providers/retrieve`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UcloudConfig {
    /// Core's base URL, e.g. `https://cloud.example.org`; the control calls go there.
    pub core_url: String,
    /// The provider's refresh token, exchanged at Core for short-lived access tokens.
    pub refresh_token: String,
    /// The provider's `publicKey`: base64 DER SubjectPublicKeyInfo of the RSA key whose
    /// private half Core signs its calls to this provider with.
    pub public_key: String,
}

/// A standalone API user and their bearer token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub token: String,
}

/// A machine type offered to users.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    pub name: String,
    pub category: String,
    #[serde(default)]
    pub description: String,
    pub cpu: u32,
    pub memory_in_gigs: u32,
    #[serde(default)]
    pub gpu: u32,
    /// Size of the VM's disk in GiB (the overlay is grown to this).
    pub disk_gib: u32,
    /// Price per unit, in the unit of `unit_of_price`.
    #[serde(default)]
    pub price_per_unit: u64,
    #[serde(default = "default_unit_of_price")]
    pub unit_of_price: String,
}

fn default_unit_of_price() -> String {
    "CREDITS_PER_MINUTE".to_owned()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("/var/lib/vmhost"),
            backend: BackendKind::Libvirt,
            libvirt_uri: "qemu:///system".to_owned(),
            accel: AccelSetting::Auto,
            provider_id: "vmhost".to_owned(),
            public_url: "http://127.0.0.1:8080".to_owned(),
            allowed_origins: Vec::new(),
            console_token_ttl_secs: 60,
            web_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/web")),
            domain_prefix: "vmhost".to_owned(),
            image_dir: PathBuf::from("/var/lib/vmhost/images"),
            catalog: None,
            cloud_init_dir: None,
            private_network: PrivateNetworkConfig::default(),
            public_pools: Vec::new(),
            ucloud: None,
            max_body_bytes: 1024 * 1024,
            sync_interval_secs: 10,
            max_replicas: 8,
            suspend_grace_secs: 60,
            suspend_retry_secs: 10,
            cpu_overcommit: 4.0,
            memory_overcommit: 1.0,
            disk_overcommit: 1.0,
            reserved_memory_mib: 1024,
            users: Vec::new(),
            products: default_products(),
        }
    }
}

fn default_products() -> Vec<ProductConfig> {
    let product = |name: &str, cpu, memory_in_gigs, disk_gib, price_per_unit| ProductConfig {
        name: name.to_owned(),
        category: "vm".to_owned(),
        description: format!("{cpu} vCPU, {memory_in_gigs} GiB RAM, {disk_gib} GiB disk"),
        cpu,
        memory_in_gigs,
        gpu: 0,
        disk_gib,
        price_per_unit,
        unit_of_price: default_unit_of_price(),
    };
    vec![
        product("vm-small", 1, 1, 8, 1),
        product("vm-medium", 2, 2, 20, 2),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Io {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("cannot parse config file {path}")]
    Parse {
        path: PathBuf,
        #[source]
        err: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Io {
            path: path.to_owned(),
            err,
        })?;
        Self::parse(&text).map_err(|err| match err {
            ConfigError::Io { err, .. } => ConfigError::Io {
                path: path.to_owned(),
                err,
            },
            ConfigError::Parse { err, .. } => ConfigError::Parse {
                path: path.to_owned(),
                err,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            err,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that cannot be expressed in the types.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.products.is_empty() {
            return invalid("at least one [[products]] entry is required".into());
        }
        let mut names = std::collections::HashSet::new();
        for p in &self.products {
            if !names.insert(&p.name) {
                return invalid(format!("product {:?} is defined twice", p.name));
            }
            if p.cpu == 0 || p.memory_in_gigs == 0 || p.disk_gib == 0 {
                return invalid(format!(
                    "product {:?} needs cpu, memory_in_gigs and disk_gib > 0",
                    p.name
                ));
            }
            if p.name.is_empty() || p.category.is_empty() {
                return invalid("products need a name and a category".into());
            }
        }
        let mut tokens = std::collections::HashSet::new();
        for u in &self.users {
            if u.name.is_empty() || u.token.len() < 8 {
                return invalid(format!(
                    "user {:?} needs a name and a token of 8+ characters",
                    u.name
                ));
            }
            if !tokens.insert(&u.token) {
                return invalid(format!(
                    "user {:?} shares a token with another user",
                    u.name
                ));
            }
        }
        let prefix_ok = !self.domain_prefix.is_empty()
            && self.domain_prefix.len() <= 32
            && self
                .domain_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !prefix_ok {
            return invalid("domain_prefix must be 1-32 characters of [A-Za-z0-9-]".into());
        }
        if self.max_replicas == 0 {
            return invalid("max_replicas must be at least 1".into());
        }
        let ratios = [
            self.cpu_overcommit,
            self.memory_overcommit,
            self.disk_overcommit,
        ];
        if ratios
            .iter()
            .any(|r| !r.is_finite() || *r <= 0.0 || *r > 64.0)
        {
            return invalid("overcommit ratios must be greater than 0 and at most 64".into());
        }
        if self.suspend_retry_secs == 0 || self.suspend_grace_secs == 0 {
            return invalid("suspend_grace_secs and suspend_retry_secs must be at least 1".into());
        }
        if self.console_token_ttl_secs == 0 || self.console_token_ttl_secs > 3600 {
            return invalid("console_token_ttl_secs must be between 1 and 3600".into());
        }
        if self.sync_interval_secs == 0 {
            return invalid("sync_interval_secs must be at least 1".into());
        }
        crate::network::config::validate(self.private_network(), &self.public_pools)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            return invalid("public_url must start with http:// or https://".into());
        }
        Ok(())
    }

    pub fn product(&self, name: &str, category: &str) -> Option<&ProductConfig> {
        self.products
            .iter()
            .find(|p| p.name == name && p.category == category)
    }

    /// The private network, if enabled.
    pub fn private_network(&self) -> Option<&PrivateNetworkConfig> {
        Some(&self.private_network).filter(|p| p.enabled)
    }

    pub fn public_pool(&self, name: &str) -> Option<&PublicPoolConfig> {
        self.public_pools.iter().find(|p| p.name == name)
    }

    pub fn store_path(&self) -> PathBuf {
        self.data_dir.join("vmhost.sqlite3")
    }

    pub fn vm_dir(&self) -> PathBuf {
        self.data_dir.join("vms")
    }

    pub fn image_cache_dir(&self) -> PathBuf {
        self.data_dir.join("image-cache")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_example_config_parses() {
        let c = Config::parse(
            r#"
            listen = "127.0.0.1:8080"
            data_dir = "/var/lib/vmhost"
            backend = "libvirt"
            libvirt_uri = "qemu:///system"
            accel = "auto"
            provider_id = "vmhost"
            [[users]]
            name = "user"
            token = "secret-user-token"
            "#,
        )
        .unwrap();
        assert_eq!(c.users[0].name, "user");
        assert_eq!(c.backend, BackendKind::Libvirt);
        assert_eq!(
            c.products.len(),
            2,
            "embedded products stay when none are given"
        );
    }

    #[test]
    fn shipped_example_configs_parse() {
        for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/configs")).unwrap() {
            let path = entry.unwrap().path();
            Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(matches!(
            Config::parse("listn = \"x\""),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::parse("backend = \"xen\""),
            Err(ConfigError::Parse { .. })
        ));
        let dup = r#"
            [[users]]
            name = "a"
            token = "same-token-1"
            [[users]]
            name = "b"
            token = "same-token-1"
        "#;
        assert!(matches!(Config::parse(dup), Err(ConfigError::Invalid(_))));
        assert!(matches!(
            Config::parse("domain_prefix = \"a b\""),
            Err(ConfigError::Invalid(_))
        ));
        assert!(matches!(
            Config::parse("max_replicas = 0"),
            Err(ConfigError::Invalid(_))
        ));
    }
}
