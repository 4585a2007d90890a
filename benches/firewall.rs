//! Firewall: how long rendering and applying vmhost's whole ruleset takes as VMs add up.
//!
//! For 1, 100 and 500 VMs (each a private NIC and a public NIC with three open port ranges):
//! (a) `render` of the plan; (b) `NftFirewall::apply` of it over an existing ruleset (the
//! steady state: every change re-applies everything); (c) a firewall change, one VM's open
//! ports switched back and forth, whole plan re-applied. nft runs inside a scratch network
//! namespace (`ip netns exec`), so the host's ruleset is never touched; the cost of
//! `ip netns exec` alone is printed for reference. Medians over `BENCH_RUNS` runs (default 9).
//!
//! Needs root and nft. Run: `cargo bench --bench firewall`.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use vmhost::network::firewall::{
    render, FirewallPlan, GuardedNic, GuardedVm, NicRole, PortRange, PrivateSegment, Protocol,
};
use vmhost::network::nft::{Firewall, NftFirewall};

fn runs() -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(9)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn ports(extra: u16) -> Vec<PortRange> {
    let range = |start, end, protocol| PortRange {
        start,
        end,
        protocol,
    };
    vec![
        range(22, 22, Protocol::Tcp),
        range(8000, 8000 + extra, Protocol::Tcp),
        range(60000, 61000, Protocol::Udp),
    ]
}

/// `n` VMs of 20 owners; public addresses from TEST-NET-2 and -3 (nothing is sent anyway).
fn plan(n: u32) -> FirewallPlan {
    let vms = (0..n)
        .map(|i| {
            let (hi, lo) = ((i / 250) as u8, (i % 250) as u8 + 2);
            let public = if hi == 0 {
                Ipv4Addr::new(203, 0, 113, lo)
            } else {
                Ipv4Addr::new(198, 51, 100, lo)
            };
            let nic = |tap: String, mac_kind: u8, address, role| GuardedNic {
                tap,
                mac: format!("52:54:00:{mac_kind:02x}:{hi:02x}:{lo:02x}"),
                address,
                role,
            };
            GuardedVm {
                job_id: format!("{}", 100_000 + i),
                rank: 0,
                owner: format!("user{}", i % 20),
                nics: vec![
                    nic(
                        format!("vh{i:08x}en0"),
                        0,
                        Ipv4Addr::new(10, 213, hi, lo),
                        NicRole::Private,
                    ),
                    nic(
                        format!("vh{i:08x}en1"),
                        1,
                        public,
                        NicRole::Public {
                            open_ports: ports(10),
                        },
                    ),
                ],
            }
        })
        .collect();
    FirewallPlan {
        table: "vmhost".into(),
        private: Some(PrivateSegment {
            bridge: "vmhost0".into(),
            subnet: "10.213.0.0/16".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 213, 0, 1),
        }),
        vms,
    }
}

/// A scratch namespace, deleted on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn main() -> anyhow::Result<()> {
    let runs = runs();
    let ns = Netns(format!("vmfwb{}", std::process::id()));
    let added = Command::new("ip").args(["netns", "add", &ns.0]).status()?;
    anyhow::ensure!(
        added.success(),
        "cannot create a network namespace (root needed)"
    );
    let fw = NftFirewall::with_command(["ip", "netns", "exec", &ns.0, "nft"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let exec_overhead = median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                let _ = Command::new("ip")
                    .args(["netns", "exec", &ns.0, "true"])
                    .status();
                t.elapsed()
            })
            .collect(),
    );
    println!(
        "firewall bench: medians of {runs} runs; `ip netns exec <ns> true` alone takes {}",
        ms(exec_overhead)
    );
    println!(
        "{:>5} {:>10} {:>9} {:>12} {:>14} {:>14} {:>14}",
        "VMs", "script", "chains", "render", "first apply", "re-apply", "ports change"
    );
    for n in [1, 100, 500] {
        let mut plan = plan(n);
        let script = render(&plan);
        let chains = script.matches("\tchain ").count();
        let render_time = median(
            (0..runs.max(20))
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(render(std::hint::black_box(&plan)));
                    t.elapsed()
                })
                .collect(),
        );
        let timed_apply = |plan: &FirewallPlan| -> anyhow::Result<Duration> {
            let t = Instant::now();
            rt.block_on(fw.apply(plan))?;
            Ok(t.elapsed())
        };
        fw_remove(&rt, &fw)?;
        let first = timed_apply(&plan)?;
        let reapply = median(
            (0..runs)
                .map(|_| timed_apply(&plan))
                .collect::<anyhow::Result<_>>()?,
        );
        let mut changes = Vec::new();
        for i in 0..runs {
            let NicRole::Public { open_ports } = &mut plan.vms[0].nics[1].role else {
                unreachable!("the second NIC is public")
            };
            *open_ports = ports(if i % 2 == 0 { 20 } else { 10 });
            changes.push(timed_apply(&plan)?);
        }
        println!(
            "{n:>5} {:>8}KB {chains:>9} {:>12} {:>14} {:>14} {:>14}",
            script.len() / 1024,
            ms(render_time),
            ms(first),
            ms(reapply),
            ms(median(changes))
        );
    }
    fw_remove(&rt, &fw)?;
    Ok(())
}

fn fw_remove(rt: &tokio::runtime::Runtime, fw: &NftFirewall) -> anyhow::Result<()> {
    rt.block_on(fw.remove("vmhost"))?;
    Ok(())
}
