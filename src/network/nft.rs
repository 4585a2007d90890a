//! The [`Firewall`] seam: installs a [`FirewallPlan`] on the host.
//!
//! [`NftFirewall`] pipes the script of [`render`] into `nft -f -`: one nft run is one netlink
//! transaction, so vmhost's tables are replaced atomically and a rejected script changes
//! nothing. Every call carries the whole desired state, so there is no incremental bookkeeping
//! to drift from the kernel's.

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::io::AsyncWriteExt;

use super::firewall::{render, FirewallPlan, PlanError};

/// With br_netfilter loaded, this makes bridged IPv4 pass the `ip` family's hooks (and
/// conntrack), which the inbound rules of public addresses rely on.
pub const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("nft refused the ruleset: {stderr}")]
    Rejected { stderr: String },
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    #[error("the host cannot filter bridged traffic: {0}")]
    HostUnsuitable(String),
    #[error("invalid firewall plan")]
    InvalidPlan(#[from] PlanError),
}

/// Installs vmhost's firewall. Every call carries the whole desired state, so a call that
/// failed is repaired by the next one.
#[async_trait]
pub trait Firewall: Send + Sync + std::fmt::Debug + 'static {
    /// Replaces vmhost's tables with `plan`, atomically.
    async fn apply(&self, plan: &FirewallPlan) -> Result<(), FirewallError>;
    /// Deletes vmhost's tables named `table`; `Ok` if they do not exist.
    async fn remove(&self, table: &str) -> Result<(), FirewallError>;
}

/// The real firewall: `nft -f -`.
#[derive(Debug, Clone)]
pub struct NftFirewall {
    /// The command that runs nft, e.g. `["nft"]` or `["ip", "netns", "exec", "ns1", "nft"]`.
    command: Vec<String>,
}

impl Default for NftFirewall {
    fn default() -> Self {
        Self::new()
    }
}

impl NftFirewall {
    /// Runs `nft` from `PATH` in vmhost's own network namespace.
    pub fn new() -> NftFirewall {
        NftFirewall::with_command(["nft"])
    }

    /// Runs nft through another command (tests and benchmarks use `ip netns exec <ns> nft`).
    pub fn with_command<S: Into<String>>(command: impl IntoIterator<Item = S>) -> NftFirewall {
        let command: Vec<String> = command.into_iter().map(Into::into).collect();
        assert!(!command.is_empty(), "the nft command cannot be empty");
        NftFirewall { command }
    }

    /// Checks, at startup with public pools configured, that the host can filter bridged
    /// traffic statefully: `bridge-nf-call-iptables` must exist (br_netfilter loaded) and be
    /// 1; it is switched on if it is 0. (It is per network namespace: this checks vmhost's.)
    /// With it, bridged IPv4 also meets the host's own `ip` filter chains, so a FORWARD policy
    /// of drop (Docker sets one) drops traffic to public addresses too.
    pub async fn prepare_host() -> Result<(), FirewallError> {
        ensure_bridge_nf_call_iptables(Path::new(BRIDGE_NF_CALL_IPTABLES)).await
    }

    /// Feeds `script` to `nft -f -`.
    async fn run(&self, script: &str) -> Result<(), FirewallError> {
        let mut child = tokio::process::Command::new(&self.command[0])
            .args(&self.command[1..])
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(FirewallError::Spawn)?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        // nft reads the whole script before it answers, so write first, then wait. A write
        // error means nft exited early; its stderr says why.
        let written = stdin.write_all(script.as_bytes()).await;
        drop(stdin);
        let out = child
            .wait_with_output()
            .await
            .map_err(FirewallError::Spawn)?;
        if out.status.success() {
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if let Err(e) = written {
            stderr = format!("{stderr} (writing the script: {e})");
        }
        Err(FirewallError::Rejected { stderr })
    }
}

#[async_trait]
impl Firewall for NftFirewall {
    async fn apply(&self, plan: &FirewallPlan) -> Result<(), FirewallError> {
        plan.validate()?;
        let script = render(plan);
        let started = std::time::Instant::now();
        self.run(&script).await?;
        tracing::debug!(
            table = %plan.table,
            vms = plan.vms.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "firewall applied"
        );
        Ok(())
    }

    async fn remove(&self, table: &str) -> Result<(), FirewallError> {
        // Validated as the table name of an empty plan: nothing unparsable reaches nft.
        FirewallPlan {
            table: table.to_owned(),
            ..FirewallPlan::default()
        }
        .validate()?;
        // Declaring a table first makes the delete succeed when it is absent; both families in
        // one transaction.
        let script = format!(
            "table bridge {table}\ndelete table bridge {table}\n\
             table ip {table}\ndelete table ip {table}\n"
        );
        self.run(&script).await?;
        tracing::info!(%table, "firewall removed");
        Ok(())
    }
}

/// The check of [`NftFirewall::prepare_host`] on a given sysctl file.
async fn ensure_bridge_nf_call_iptables(path: &Path) -> Result<(), FirewallError> {
    let value = match tokio::fs::read_to_string(path).await {
        Ok(value) => value,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(FirewallError::HostUnsuitable(format!(
                "{} is missing: br_netfilter is not loaded; run `modprobe br_netfilter` (and \
                 add it to /etc/modules-load.d/) so that public addresses can be firewalled",
                path.display()
            )));
        }
        Err(e) => {
            return Err(FirewallError::HostUnsuitable(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
    };
    if value.trim() == "1" {
        return Ok(());
    }
    tracing::warn!(path = %path.display(), was = value.trim(), "enabling bridged IPv4 filtering");
    tokio::fs::write(path, "1\n").await.map_err(|e| {
        FirewallError::HostUnsuitable(format!(
            "{} is {} and cannot be set to 1 ({e}); run `sysctl -w \
             net.bridge.bridge-nf-call-iptables=1`",
            path.display(),
            value.trim()
        ))
    })
}

/// Records plans instead of installing them (component tests, `backend = "fake"`).
#[derive(Debug, Default)]
pub struct FakeFirewall {
    applied: Mutex<Vec<FirewallPlan>>,
}

impl FakeFirewall {
    /// The last plan applied, if any.
    pub fn current(&self) -> Option<FirewallPlan> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }
}

#[async_trait]
impl Firewall for FakeFirewall {
    async fn apply(&self, plan: &FirewallPlan) -> Result<(), FirewallError> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(plan.clone());
        Ok(())
    }

    async fn remove(&self, _table: &str) -> Result<(), FirewallError> {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(FirewallPlan::default());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prepare_host_switches_bridge_filtering_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bridge-nf-call-iptables");
        std::fs::write(&path, "0\n").unwrap();
        ensure_bridge_nf_call_iptables(&path).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "1");
        ensure_bridge_nf_call_iptables(&path).await.unwrap();
    }

    #[tokio::test]
    async fn prepare_host_names_the_fix_without_br_netfilter() {
        let dir = tempfile::tempdir().unwrap();
        let err = ensure_bridge_nf_call_iptables(&dir.path().join("absent"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FirewallError::HostUnsuitable(m) if m.contains("modprobe br_netfilter")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn apply_refuses_an_invalid_plan_without_running_nft() {
        let fw = NftFirewall::with_command(["/nonexistent/nft"]);
        let plan = FirewallPlan {
            table: "bad name".into(),
            ..FirewallPlan::default()
        };
        assert!(matches!(
            fw.apply(&plan).await,
            Err(FirewallError::InvalidPlan(_))
        ));
        assert!(matches!(
            fw.remove("x;y").await,
            Err(FirewallError::InvalidPlan(_))
        ));
    }

    #[tokio::test]
    async fn a_missing_nft_is_a_spawn_error() {
        let fw = NftFirewall::with_command(["/nonexistent/nft"]);
        let plan = FirewallPlan {
            table: "vmhost".into(),
            ..FirewallPlan::default()
        };
        assert!(matches!(
            fw.apply(&plan).await,
            Err(FirewallError::Spawn(_))
        ));
    }

    #[tokio::test]
    async fn a_rejected_script_carries_nft_stderr() {
        // `sh -c 'cat >/dev/null; echo ... >&2; exit 1' -f -` stands in for a refusing nft.
        let fw = NftFirewall::with_command([
            "sh",
            "-c",
            "cat >/dev/null; echo 'Error: syntax error' >&2; exit 1",
        ]);
        let err = fw.remove("vmhost").await.unwrap_err();
        assert!(
            matches!(&err, FirewallError::Rejected { stderr } if stderr == "Error: syntax error"),
            "{err}"
        );
    }
}
