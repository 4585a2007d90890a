//! Public IP allocation throughput through the API, and how allocation cost grows as a pool
//! fills.
//!
//! A vmhost over the in-memory hypervisor and firewall (allocation never touches either) with
//! one pool of 65,534 addresses in 198.18.0.0/16 (RFC 2544's benchmarking range; no traffic is
//! sent anywhere). Measured over HTTP on 127.0.0.1, as a client sees it:
//! - sequential single-address creates (latency per request);
//! - the same with 16 concurrent clients (throughput; every address must be distinct);
//! - one bulk request of 1,000 addresses (one transaction);
//! - single creates once 10,000 addresses are taken (the cost of a fuller pool).
//!
//! `cargo bench --bench public_ips`; `BENCH_IPS_SEQUENTIAL` (default 1000) scales the runs.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmhost::backend::fake::FakeBackend;
use vmhost::backend::Accel;
use vmhost::config::{BackendKind, Config, UserConfig};
use vmhost::network::config::PublicPoolConfig;
use vmhost::network::nft::FakeFirewall;

const TOKEN: &str = "bench-token-0001";
const POOL: &str = "bench-pool";

struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    async fn create(&self, count: usize) -> Vec<String> {
        let item = json!({"product": {"id": POOL, "category": POOL, "provider": "vmhost"}});
        let body = json!({ "items": vec![item; count] });
        let resp = self
            .client
            .post(format!("{}/api/networkips", self.base))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        body["responses"]
            .as_array()
            .expect("responses")
            .iter()
            .map(|r| r["id"].as_str().expect("id").to_owned())
            .collect()
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(name: &str, count: usize, elapsed: Duration, mut latencies: Vec<Duration>) {
    latencies.sort();
    let pick = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "{name:<44} {count:>6} addresses  {:>8.0} /s   p50 {:>6.2} ms  p99 {:>6.2} ms",
        count as f64 / elapsed.as_secs_f64(),
        pick(0.5),
        pick(0.99),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let sequential = env_or("BENCH_IPS_SEQUENTIAL", 1000);
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("images/debian12-cloud/disk.qcow2");
    std::fs::create_dir_all(image.parent().expect("parent"))?;
    std::fs::write(&image, b"")?;
    let config = Config {
        data_dir: dir.path().to_owned(),
        image_dir: dir.path().join("images"),
        backend: BackendKind::Fake,
        users: vec![UserConfig {
            name: "bench".into(),
            token: TOKEN.into(),
        }],
        public_pools: vec![PublicPoolConfig {
            name: POOL.into(),
            subnet: "198.18.0.0/16".parse()?,
            gateway: "198.18.0.1".parse()?,
            dns: Vec::new(),
            exclude: Vec::new(),
            bridge: "br-bench".into(),
            description: String::new(),
        }],
        ..Config::default()
    };
    let daemon = vmhost::server::build_with(
        config,
        Arc::new(FakeBackend::default()),
        Arc::new(FakeFirewall::default()),
        Accel::Tcg,
    )
    .await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, daemon.router).await });
    let api = Arc::new(Api {
        base,
        client: reqwest::Client::new(),
    });
    println!(
        "public IP allocation through the API (pool of 65534 addresses, SQLite synchronous=FULL)"
    );

    let mut ids = HashSet::new();
    let mut latencies = Vec::with_capacity(sequential);
    let started = Instant::now();
    for _ in 0..sequential {
        let t = Instant::now();
        ids.extend(api.create(1).await);
        latencies.push(t.elapsed());
    }
    report(
        "sequential, 1 per request",
        sequential,
        started.elapsed(),
        latencies,
    );

    let clients = 16;
    let per_client = sequential / clients;
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(per_client);
                let mut latencies = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let t = Instant::now();
                    got.extend(api.create(1).await);
                    latencies.push(t.elapsed());
                }
                (got, latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        let (got, lat) = task.await?;
        for id in got {
            assert!(ids.insert(id), "an id was handed out twice");
        }
        latencies.extend(lat);
    }
    report(
        &format!("{clients} concurrent clients, 1 per request"),
        clients * per_client,
        started.elapsed(),
        latencies,
    );

    let started = Instant::now();
    let bulk = api.create(1000).await;
    let elapsed = started.elapsed();
    report(
        "one bulk request of 1000",
        bulk.len(),
        elapsed,
        vec![elapsed],
    );
    ids.extend(bulk);

    while ids.len() < 10_000 {
        ids.extend(api.create(1000.min(10_000 - ids.len())).await);
    }
    let mut latencies = Vec::new();
    let started = Instant::now();
    for _ in 0..200 {
        let t = Instant::now();
        ids.extend(api.create(1).await);
        latencies.push(t.elapsed());
    }
    report(
        "sequential, 10000 already taken",
        200,
        started.elapsed(),
        latencies,
    );
    Ok(())
}
