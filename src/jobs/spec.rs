//! A job's specification, as UCloud shapes it, and its validation against what this host offers.
//!
//! [`JobSpec`] is stored as given (so `retrieve` echoes it back); [`validate`] turns it into a
//! [`LaunchPlan`], the typed inputs the runner needs, and [`check_user_data`] renders the plan's
//! cloud-init `user-data` with the operator's templates, as provisioning will. A create runs
//! both, so input that could only fail the job later is refused up front. Validation is pure: it
//! reads the products, the image catalog, the templates and the seed rules, and never touches the
//! host, so a refused request changes nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::cloud_init::{self, HostEntry, SeedTemplates, UserDataSpec};
use crate::config::{Config, ProductConfig};
use crate::images::{Catalog, ImageEntry};

/// `NameAndVersion`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRef {
    pub name: String,
    pub version: String,
}

pub use crate::ucloud::ProductRef;

/// `SimpleDuration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpleDuration {
    pub hours: u32,
    pub minutes: u32,
    pub seconds: u32,
}

/// The longest time allocation a job may have, extensions included: ten years. It keeps every
/// deadline far from overflowing milliseconds since the epoch.
pub const MAX_TIME_ALLOCATION_MS: i64 = 10 * 365 * 24 * 3_600_000;

/// `ms` if it is a time allocation within [`MAX_TIME_ALLOCATION_MS`]; `None` stands for a sum
/// that overflowed on the way.
pub fn within_allocation_limit(ms: Option<i64>) -> Result<i64, String> {
    ms.filter(|&ms| ms <= MAX_TIME_ALLOCATION_MS)
        .ok_or_else(|| {
            format!(
                "a time allocation may not exceed {} hours",
                MAX_TIME_ALLOCATION_MS / 3_600_000
            )
        })
}

impl SimpleDuration {
    pub fn as_millis(self) -> i64 {
        (i64::from(self.hours) * 3600 + i64::from(self.minutes) * 60 + i64::from(self.seconds))
            * 1000
    }
}

/// UCloud's `JobSpecification`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSpec {
    pub application: AppRef,
    pub product: ProductRef,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub replicas: Option<u32>,
    #[serde(default)]
    pub allow_duplicate_job: Option<bool>,
    #[serde(default)]
    pub parameters: Option<Map<String, Value>>,
    #[serde(default)]
    pub resources: Option<Vec<Value>>,
    #[serde(default)]
    pub time_allocation: Option<SimpleDuration>,
    #[serde(default)]
    pub opened_file: Option<String>,
    #[serde(default)]
    pub restart_on_exit: Option<bool>,
}

impl JobSpec {
    pub fn replicas(&self) -> u32 {
        self.replicas.unwrap_or(1)
    }

    /// Identity for duplicate detection: everything that shapes the VM, not its display name.
    pub fn fingerprint(&self) -> String {
        let shape = serde_json::json!({
            "application": self.application,
            "product": self.product,
            "replicas": self.replicas(),
            "parameters": self.parameters.clone().unwrap_or_default(),
            "resources": self.resources.clone().unwrap_or_default(),
            "timeAllocation": self.time_allocation,
        });
        // serde_json maps are ordered (BTreeMap), so equal shapes serialise equally.
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(shape.to_string().as_bytes()))
    }
}

/// Parameters a VM application accepts.
pub const PARAM_SSH_KEYS: &str = "sshPublicKeys";
pub const PARAM_USER_DATA: &str = "userData";
pub const PARAM_DISK_SIZE: &str = "diskSize";

const MAX_NAME_LEN: usize = 200;
const MAX_DISK_GIB: u64 = 16 * 1024;

/// The typed inputs to start a validated job.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    pub image: ImageEntry,
    pub product: ProductConfig,
    pub replicas: u32,
    pub disk_gib: u64,
    pub ssh_keys: Vec<String>,
    pub user_data: Option<Map<String, Value>>,
    pub time_allocation_ms: Option<i64>,
    /// Ids of the owner's public IPs to attach (`{type: "network", id}`).
    pub public_ips: Vec<String>,
    /// Jobs this one connects to (`{type: "peer", hostname, jobId}`).
    pub peers: Vec<Peer>,
}

/// Another job of the same owner, reachable from this one under `hostname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub hostname: String,
    pub job_id: String,
}

/// Why a specification is refused; the message is shown to the user as `why`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("unknown product {id:?} in category {category:?} of provider {provider:?}")]
    UnknownProduct {
        id: String,
        category: String,
        provider: String,
    },
    #[error("unknown application {name:?} version {version:?}")]
    UnknownApplication { name: String, version: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid<T>(why: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError::Invalid(why.into()))
}

/// Checks `spec` against this host's products, images and rules.
pub fn validate(
    spec: &JobSpec,
    config: &Config,
    catalog: &Catalog,
) -> Result<LaunchPlan, SpecError> {
    let product = spec
        .product
        .provider
        .eq(&config.provider_id)
        .then(|| config.product(&spec.product.id, &spec.product.category))
        .flatten()
        .ok_or_else(|| SpecError::UnknownProduct {
            id: spec.product.id.clone(),
            category: spec.product.category.clone(),
            provider: spec.product.provider.clone(),
        })?;
    let image = catalog
        .find(&spec.application.name, &spec.application.version)
        .ok_or_else(|| SpecError::UnknownApplication {
            name: spec.application.name.clone(),
            version: spec.application.version.clone(),
        })?;
    if let Some(name) = &spec.name {
        if name.chars().count() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return invalid(format!(
                "name must be at most {MAX_NAME_LEN} characters without control characters"
            ));
        }
    }
    let replicas = spec.replicas();
    if replicas == 0 || replicas > config.max_replicas {
        return invalid(format!(
            "replicas must be between 1 and {}",
            config.max_replicas
        ));
    }
    if spec.opened_file.is_some() {
        return invalid("openedFile is not supported for virtual machines");
    }
    let time_allocation_ms = spec.time_allocation.map(SimpleDuration::as_millis);
    if time_allocation_ms == Some(0) {
        return invalid("timeAllocation must be longer than zero");
    }
    if let Some(ms) = time_allocation_ms {
        within_allocation_limit(Some(ms))
            .map_err(|why| SpecError::Invalid(format!("timeAllocation: {why}")))?;
    }
    let params = spec.parameters.clone().unwrap_or_default();
    let mut plan = LaunchPlan {
        image: image.clone(),
        product: product.clone(),
        replicas,
        disk_gib: u64::from(product.disk_gib),
        ssh_keys: Vec::new(),
        user_data: None,
        time_allocation_ms,
        public_ips: Vec::new(),
        peers: Vec::new(),
    };
    for (index, value) in spec.resources.iter().flatten().enumerate() {
        add_resource(&mut plan, &format!("resources[{index}]"), value)?;
    }
    for (name, value) in &params {
        if matches!(value_type(value).as_str(), "network" | "peer") {
            add_resource(&mut plan, &format!("parameter {name}"), value)?;
            continue;
        }
        let needs_cloud_init = name == PARAM_SSH_KEYS || name == PARAM_USER_DATA;
        if needs_cloud_init && !image.cloud_init {
            return invalid(format!(
                "parameter {name} needs cloud-init, which {} {} does not have",
                image.name, image.version
            ));
        }
        match name.as_str() {
            PARAM_SSH_KEYS => {
                plan.ssh_keys = text_param(name, value)?
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                cloud_init::validate_ssh_keys(&plan.ssh_keys).map_err(|e| {
                    SpecError::Invalid(format!(
                        "parameter {name}: {}",
                        crate::telemetry::error_chain(&e)
                    ))
                })?;
            }
            PARAM_USER_DATA => {
                let text = text_param(name, value)?;
                plan.user_data = Some(cloud_init::parse_user_cloud_config(text).map_err(|e| {
                    SpecError::Invalid(format!(
                        "parameter {name}: {}",
                        crate::telemetry::error_chain(&e)
                    ))
                })?);
            }
            PARAM_DISK_SIZE => {
                let gib = integer_param(name, value)?;
                if gib < image.min_disk_gib || gib > MAX_DISK_GIB {
                    return invalid(format!(
                        "parameter {name} must be between {} and {MAX_DISK_GIB} GiB",
                        image.min_disk_gib
                    ));
                }
                plan.disk_gib = gib;
            }
            other => {
                return invalid(format!(
                    "unknown parameter {other:?}; virtual machines accept {PARAM_SSH_KEYS}, \
                     {PARAM_USER_DATA} and {PARAM_DISK_SIZE}"
                ))
            }
        }
    }
    if !plan.peers.is_empty() && config.private_network().is_none() {
        return invalid("peers need vmhost's private network, which this host does not have");
    }
    if plan.disk_gib < image.min_disk_gib {
        return invalid(format!(
            "product {} has a {} GiB disk but {} {} needs at least {} GiB",
            product.name, plan.disk_gib, image.name, image.version, image.min_disk_gib
        ));
    }
    Ok(plan)
}

/// Renders the plan's `user-data` with the same function that writes the seed, so what it
/// refuses here (keys the user data may not set, a `users` entry reusing the login user's or a
/// template user's name, keys and user data together over the size limit) can never first
/// show up as a failed job. [`validate`] leaves this out because it also runs at scheduling and
/// provisioning, which need no render (provisioning renders the real seed).
pub fn check_user_data(plan: &LaunchPlan, templates: &SeedTemplates) -> Result<(), SpecError> {
    if !plan.image.cloud_init {
        return Ok(());
    }
    // Peer addresses are leased only when the VM is built. The widest address stands in for
    // each, so the size checked here bounds the size provisioning renders (a peer that has
    // ended by then is left out, which only makes the file smaller).
    let hosts: Vec<HostEntry> = plan
        .peers
        .iter()
        .map(|peer| HostEntry {
            address: std::net::Ipv4Addr::BROADCAST,
            name: peer.hostname.clone(),
        })
        .collect();
    let spec = UserDataSpec {
        login_user: &plan.image.login_user,
        ssh_authorized_keys: &plan.ssh_keys,
        extra_user_data: plan.user_data.as_ref(),
        hosts: &hosts,
    };
    cloud_init::render_user_data(&spec, templates)
        .map(drop)
        .map_err(|e| {
            let given = match (plan.ssh_keys.is_empty(), plan.user_data.is_none()) {
                (false, false) => format!("parameters {PARAM_SSH_KEYS} and {PARAM_USER_DATA}"),
                (false, true) => format!("parameter {PARAM_SSH_KEYS}"),
                (true, false) => format!("parameter {PARAM_USER_DATA}"),
                (true, true) => "user-data".to_owned(),
            };
            SpecError::Invalid(format!("{given}: {}", crate::telemetry::error_chain(&e)))
        })
}

/// Adds a `network` or `peer` value to the plan; anything else is refused.
fn add_resource(plan: &mut LaunchPlan, place: &str, value: &Value) -> Result<(), SpecError> {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match value_type(value).as_str() {
        "network" => {
            let Some(id) = field("id") else {
                return invalid(format!(
                    "{place} must be {{\"type\": \"network\", \"id\": <public IP id>}}"
                ));
            };
            if plan.public_ips.iter().any(|known| known == id) {
                return invalid(format!("{place}: public IP {id} is attached twice"));
            }
            plan.public_ips.push(id.to_owned());
        }
        "peer" => {
            let (Some(hostname), Some(job_id)) = (field("hostname"), field("jobId")) else {
                return invalid(format!(
                    "{place} must be {{\"type\": \"peer\", \"hostname\": <name>, \"jobId\": <job id>}}"
                ));
            };
            if !is_dns_label(hostname) {
                return invalid(format!(
                    "{place}: hostname {hostname:?} must be 1-63 letters, digits or '-', not starting or ending with '-'"
                ));
            }
            let hostname = hostname.to_ascii_lowercase();
            if plan.peers.iter().any(|p| p.hostname == hostname) {
                return invalid(format!("{place}: peer hostname {hostname:?} is used twice"));
            }
            plan.peers.push(Peer {
                hostname,
                job_id: job_id.to_owned(),
            });
        }
        other => {
            return invalid(format!(
                "{place}: resources of type {other:?} are not supported by this provider; \
                 virtual machines accept \"network\" and \"peer\""
            ))
        }
    }
    Ok(())
}

/// A hostname label as RFC 1123 allows it.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn value_type(value: &Value) -> String {
    value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("<missing type>")
        .to_owned()
}

fn text_param<'a>(name: &str, value: &'a Value) -> Result<&'a str, SpecError> {
    match (value_type(value).as_str(), value.get("value")) {
        ("text" | "textarea", Some(Value::String(s))) => Ok(s),
        _ => invalid(format!(
            "parameter {name} must be {{\"type\": \"text\", \"value\": <string>}}"
        )),
    }
}

fn integer_param(name: &str, value: &Value) -> Result<u64, SpecError> {
    match (
        value_type(value).as_str(),
        value.get("value").and_then(Value::as_u64),
    ) {
        ("integer", Some(n)) => Ok(n),
        _ => invalid(format!(
            "parameter {name} must be {{\"type\": \"integer\", \"value\": <non-negative number>}}"
        )),
    }
}

/// The guest hostname: the job name made DNS-safe, or `job-<id>`; ranks get a suffix.
pub fn hostname(job_id: &str, name: Option<&str>, rank: u32, replicas: u32) -> String {
    let mut base: String = name
        .unwrap_or_default()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    base = base
        .split('-')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    base.truncate(50);
    let base = base.trim_end_matches('-');
    let base = if base.is_empty() {
        format!("job-{job_id}")
    } else {
        base.to_owned()
    };
    if replicas > 1 {
        format!("{base}-{rank}")
    } else {
        base
    }
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
