//! UCloud wire types (the seed document's shapes) and their conversion from domain types.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::ProductConfig;
use crate::images::ImageEntry;
use crate::jobs::spec::{SimpleDuration, PARAM_DISK_SIZE, PARAM_SSH_KEYS, PARAM_USER_DATA};
use crate::jobs::{JobRecord, JobSpec, JobState, JobUpdate};
use crate::network::ip::{FirewallSpec, PublicIpRecord};

/// `BulkRequest<T>`. An empty `items` is refused for every call alike: it can only be a
/// client's mistake, and answering it with an empty success would hide that.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct BulkRequest<T> {
    #[serde(deserialize_with = "non_empty")]
    pub items: Vec<T>,
}

fn non_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let items = Vec::<T>::deserialize(deserializer)?;
    if items.is_empty() {
        return Err(serde::de::Error::custom(
            "items must hold at least one item",
        ));
    }
    Ok(items)
}

/// `BulkResponse<T>`.
#[derive(Debug, Serialize)]
pub struct BulkResponse<T> {
    pub responses: Vec<T>,
}

/// `FindByStringId`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindByStringId {
    pub id: String,
}

/// `Unit`: an empty object.
#[derive(Debug, Serialize)]
pub struct Unit {}

/// `JobsExtendRequestItem`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtendItem {
    pub job_id: String,
    pub requested_time: SimpleDuration,
}

/// `JobIncludeFlags`, as query parameters or a JSON object.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobIncludeFlags {
    pub filter_application: Option<String>,
    pub filter_state: Option<JobState>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub include_parameters: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub include_application: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub include_product: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub include_others: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub include_updates: Option<bool>,
    #[serde(default, deserialize_with = "lenient::opt_bool")]
    pub include_support: Option<bool>,
    pub filter_created_by: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    pub filter_created_after: Option<i64>,
    #[serde(default, deserialize_with = "lenient::opt_i64")]
    pub filter_created_before: Option<i64>,
    pub filter_provider: Option<String>,
    pub filter_product_id: Option<String>,
    pub filter_product_category: Option<String>,
    pub filter_provider_ids: Option<String>,
    pub filter_ids: Option<String>,
    pub hide_product_id: Option<String>,
    pub hide_product_category: Option<String>,
    pub hide_provider: Option<String>,
}

/// `ResourceRetrieveRequest<JobIncludeFlags>` as query parameters.
#[derive(Debug, Deserialize)]
pub struct RetrieveQuery {
    pub id: String,
    #[serde(flatten)]
    pub flags: JobIncludeFlags,
}

/// `ResourceBrowseRequest<JobIncludeFlags>` as query parameters.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BrowseQuery {
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub items_per_page: Option<u32>,
    pub next: Option<String>,
    #[serde(flatten)]
    pub flags: JobIncludeFlags,
}

/// A page request without flags (`itemsPerPage`, `next`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PageQuery {
    #[serde(default, deserialize_with = "lenient::opt_u32")]
    pub items_per_page: Option<u32>,
    pub next: Option<String>,
}

/// A resource id as a query parameter; other parameters (UCloud's include flags) are ignored.
#[derive(Debug, Deserialize)]
pub struct IdQuery {
    pub id: String,
}

/// One item of `networkips/firewall`: the end-user form `{id, firewall}` or the provider form
/// `{networkIp: {id, ...}, firewall}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FirewallItem {
    pub id: Option<String>,
    pub network_ip: Option<PublicIpRef>,
    pub firewall: FirewallSpec,
}

/// A whole `PublicIp` of which only the `id` matters here.
#[derive(Debug, Deserialize)]
pub struct PublicIpRef {
    pub id: String,
}

impl FirewallItem {
    pub fn into_parts(self) -> Result<(String, FirewallSpec), crate::api::ApiError> {
        let id = self.id.or(self.network_ip.map(|ip| ip.id)).ok_or_else(|| {
            crate::api::ApiError::BadRequest(
                "each item needs the public IP's id (or networkIp.id)".into(),
            )
        })?;
        Ok((id, self.firewall))
    }
}

/// UCloud's `PublicIp`.
pub fn wire_public_ip(ip: &PublicIpRecord, config: &crate::config::Config) -> Value {
    let state = "READY";
    json!({
        "id": ip.id,
        "createdAt": ip.created_at,
        "owner": { "createdBy": ip.owner, "project": null },
        "permissions": { "myself": ["ADMIN"], "others": [] },
        "specification": ip.spec,
        "status": {
            "state": state,
            "boundTo": ip.bound_job.iter().collect::<Vec<_>>(),
            "ipAddress": ip.address.to_string(),
        },
        "updates": [{
            "timestamp": ip.created_at,
            "state": state,
            "status": format!("Allocated {} from {}", ip.address, ip.pool),
        }],
        "providerGeneratedId": ip.id,
        "pool": config.public_pool(&ip.pool).map(|p| json!({
            "subnet": p.subnet.to_string(),
            "gateway": p.gateway.to_string(),
            "dns": p.dns.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })),
    })
}

/// `ResourceSearchRequest<JobIncludeFlags>`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchRequest {
    #[serde(default)]
    pub flags: JobIncludeFlags,
    pub query: String,
    pub items_per_page: Option<u32>,
    pub next: Option<String>,
}

/// `PageV2<T>`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PageV2<T> {
    pub items_per_page: u32,
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// `JobUpdate` on the wire.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireJobUpdate {
    pub state: Option<JobState>,
    pub output_folder: Option<String>,
    pub status: Option<String>,
    pub expected_state: Option<JobState>,
    pub expected_different_state: Option<bool>,
    pub new_time_allocation: Option<i64>,
    pub allow_restart: Option<bool>,
    pub new_mounts: Option<Vec<String>>,
    pub timestamp: i64,
}

impl From<&JobUpdate> for WireJobUpdate {
    fn from(u: &JobUpdate) -> Self {
        WireJobUpdate {
            state: u.state,
            output_folder: None,
            status: u.status.clone(),
            expected_state: None,
            expected_different_state: None,
            new_time_allocation: None,
            allow_restart: None,
            new_mounts: None,
            timestamp: u.timestamp,
        }
    }
}

/// `JobStatus`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireJobStatus {
    pub state: JobState,
    pub job_parameters_json: Option<Value>,
    pub started_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub resolved_application: Option<Value>,
    pub resolved_support: Option<Value>,
    pub resolved_product: Option<Value>,
    pub allow_restart: bool,
}

/// `Job`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireJob {
    pub id: String,
    pub owner: Value,
    pub updates: Vec<WireJobUpdate>,
    pub specification: JobSpec,
    pub status: WireJobStatus,
    pub created_at: i64,
    pub output: Option<Value>,
    pub permissions: Option<Value>,
    pub provider_generated_id: Option<String>,
}

/// What `JobIncludeFlags` may pull into a job: resolved from config at the API edge.
pub struct Resolved<'a> {
    pub product: Option<&'a ProductConfig>,
    pub image: Option<&'a ImageEntry>,
    pub provider_id: &'a str,
    pub support: Value,
}

/// A job as the flags ask to see it.
pub fn wire_job(job: &JobRecord, flags: &JobIncludeFlags, resolved: &Resolved<'_>) -> WireJob {
    let on = |flag: Option<bool>| flag.unwrap_or(false);
    let mut specification = job.spec.clone();
    if !on(flags.include_parameters) {
        specification.parameters = None;
        specification.resources = None;
    }
    // `updates` always holds at least one element (the current state); the full story only
    // when asked for.
    let updates: Vec<WireJobUpdate> = if on(flags.include_updates) {
        job.updates.iter().map(Into::into).collect()
    } else {
        job.updates.last().map(Into::into).into_iter().collect()
    };
    WireJob {
        id: job.id.clone(),
        owner: json!({ "createdBy": job.owner, "project": null }),
        updates,
        specification,
        status: wire_status(job, flags, resolved),
        created_at: job.created_at,
        output: None,
        permissions: on(flags.include_others).then(|| json!({ "myself": ["ADMIN"], "others": [] })),
        provider_generated_id: None,
    }
}

pub fn wire_status(
    job: &JobRecord,
    flags: &JobIncludeFlags,
    resolved: &Resolved<'_>,
) -> WireJobStatus {
    let on = |flag: Option<bool>| flag.unwrap_or(false);
    WireJobStatus {
        state: job.state,
        job_parameters_json: None,
        started_at: job.started_at,
        expires_at: job.expires_at,
        resolved_application: on(flags.include_application)
            .then(|| resolved.image.map(application))
            .flatten(),
        resolved_support: on(flags.include_support).then(|| resolved.support.clone()),
        resolved_product: on(flags.include_product)
            .then(|| resolved.product.map(|p| product(p, resolved.provider_id)))
            .flatten(),
        allow_restart: false,
    }
}

/// `Product.Compute`.
pub fn product(p: &ProductConfig, provider_id: &str) -> Value {
    json!({
        "type": "compute",
        "balance": null,
        "name": p.name,
        "pricePerUnit": p.price_per_unit,
        "category": { "name": p.category, "provider": provider_id },
        "description": p.description,
        "priority": 0,
        "cpu": p.cpu,
        "memoryInGigs": p.memory_in_gigs,
        "gpu": p.gpu,
        "version": 1,
        "freeToUse": p.price_per_unit == 0,
        "unitOfPrice": p.unit_of_price,
        "chargeType": "ABSOLUTE",
        "hiddenInGrantApplications": false,
        "productType": "COMPUTE",
    })
}

/// Which `ComputeSupport.VirtualMachine` features work right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmFeatures {
    pub enabled: bool,
    pub logs: bool,
    pub vnc: bool,
    pub terminal: bool,
    pub time_extension: bool,
    pub suspension: bool,
    pub utilization: bool,
    pub peers: bool,
}

/// `ComputeSupport` for one product.
pub fn compute_support(p: &ProductConfig, provider_id: &str, f: VmFeatures) -> Value {
    json!({
        "product": { "id": p.name, "category": p.category, "provider": provider_id },
        "docker": {
            "enabled": false, "web": false, "vnc": false, "logs": false, "terminal": false,
            "peers": false, "timeExtension": false, "utilization": false,
        },
        "virtualMachine": {
            "enabled": f.enabled,
            "logs": f.enabled && f.logs,
            "vnc": f.enabled && f.vnc,
            "terminal": f.enabled && f.terminal,
            "timeExtension": f.enabled && f.time_extension,
            "suspension": f.enabled && f.suspension,
            "utilization": f.enabled && f.utilization,
            "peers": f.enabled && f.peers,
        },
    })
}

/// `Application`, as far as a VM image describes one.
pub fn application(image: &ImageEntry) -> Value {
    let text = |name: &str, title: &str, description: &str, optional: bool| {
        json!({ "type": "text", "name": name, "title": title, "description": description,
                "optional": optional, "defaultValue": null })
    };
    json!({
        "metadata": {
            "name": image.name,
            "version": image.version,
            "authors": ["vmhost"],
            "title": image.title,
            "description": image.description,
            "website": null,
            "public": true,
        },
        "invocation": {
            "tool": {
                "name": image.name,
                "version": image.version,
                "tool": null,
            },
            "invocation": [],
            "parameters": [
                text(PARAM_SSH_KEYS, "SSH public keys",
                    &format!("OpenSSH public keys, one per line, installed for user {}", image.login_user), true),
                text(PARAM_USER_DATA, "cloud-init user-data",
                    "Extra #cloud-config merged into the VM's configuration", true),
                { "type": "integer", "name": PARAM_DISK_SIZE, "title": "Disk size (GiB)",
                  "description": "Size of the VM's disk", "optional": true, "defaultValue": null,
                  "min": image.min_disk_gib, "unitName": "GiB" },
            ],
            "outputFileGlobs": [],
            "applicationType": "BATCH",
            "vnc": null,
            "web": null,
            "container": null,
            "environment": null,
            "allowAdditionalMounts": false,
            "allowAdditionalPeers": false,
            "allowMultiNode": true,
            "allowPublicIp": false,
            "allowPublicLink": false,
            "fileExtensions": [],
            "licenseServers": [],
        },
    })
}

/// `JobsFollowResponse`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FollowResponse {
    pub updates: Vec<WireJobUpdate>,
    pub log: Vec<JobsLog>,
    pub new_status: Option<WireJobStatus>,
}

/// `JobsLog`.
#[derive(Debug, Serialize)]
pub struct JobsLog {
    pub rank: u32,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
}

/// Query strings carry every value as text, and `#[serde(flatten)]` hides the target type from
/// the query deserializer; these accept both the native JSON value and its text form.
mod lenient {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OrText<T> {
        Native(T),
        Text(String),
    }

    fn parse<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + std::str::FromStr,
    {
        match Option::<OrText<T>>::deserialize(d)? {
            None => Ok(None),
            Some(OrText::Native(v)) => Ok(Some(v)),
            Some(OrText::Text(t)) => t
                .parse()
                .map(Some)
                .map_err(|_| serde::de::Error::custom(format!("invalid value {t:?}"))),
        }
    }

    pub(super) fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        parse(d)
    }

    pub(super) fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        parse(d)
    }

    pub(super) fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        parse(d)
    }
}
