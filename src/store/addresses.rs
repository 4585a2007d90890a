//! The SQL of addresses: public IPs (allocation, binding, firewall) and the private addresses
//! of job VMs. Every allocation picks from [`AddressPool`] and inserts in the same
//! transaction; the UNIQUE constraints are the final word on uniqueness.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};

use super::{row_id, StoreError};
use crate::network::config::PublicPoolConfig;
use crate::network::ip::{FirewallSpec, PublicIpRecord, PublicIpSpec};
use crate::network::pool::AddressPool;

const IP_COLUMNS: &str = "p.id, p.owner, p.pool, p.address, p.spec, p.created_at, p.bound_job";

/// A `public_ips` row before its JSON is decoded.
struct IpRow {
    id: i64,
    owner: String,
    pool: String,
    address: u32,
    spec: String,
    created_at: i64,
    bound_job: Option<i64>,
}

fn ip_from_row(r: &Row<'_>) -> rusqlite::Result<IpRow> {
    Ok(IpRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        pool: r.get(2)?,
        address: r.get(3)?,
        spec: r.get(4)?,
        created_at: r.get(5)?,
        bound_job: r.get(6)?,
    })
}

fn decode(row: IpRow) -> Result<PublicIpRecord, StoreError> {
    let spec = serde_json::from_str(&row.spec).map_err(|e| StoreError::Corrupt {
        id: format!("public IP {}", row.id),
        why: e.to_string(),
    })?;
    Ok(PublicIpRecord {
        id: row.id.to_string(),
        owner: row.owner,
        pool: row.pool,
        address: Ipv4Addr::from(row.address),
        spec,
        bound_job: row.bound_job.map(|j| j.to_string()),
        created_at: row.created_at,
    })
}

fn encode(spec: &PublicIpSpec) -> Result<String, StoreError> {
    serde_json::to_string(spec).map_err(|e| StoreError::Corrupt {
        id: "<new public IP>".into(),
        why: e.to_string(),
    })
}

fn taken_public(tx: &Transaction<'_>, pool: &str) -> Result<HashSet<Ipv4Addr>, StoreError> {
    let mut stmt = tx.prepare_cached("SELECT address FROM public_ips WHERE pool = ?1")?;
    let rows = stmt.query_map([pool], |r| r.get::<_, u32>(0))?;
    Ok(rows
        .map(|a| a.map(Ipv4Addr::from))
        .collect::<Result<_, _>>()?)
}

pub(super) fn insert_public_ips(
    c: &mut Connection,
    owner: &str,
    items: &[(PublicIpSpec, PublicPoolConfig)],
    created_at: i64,
) -> Result<Vec<PublicIpRecord>, StoreError> {
    let tx = c.transaction()?;
    let mut created = Vec::with_capacity(items.len());
    // Each pool's taken set is read once per request, then kept current as we allocate.
    let mut taken_by_pool: HashMap<&str, HashSet<Ipv4Addr>> = HashMap::new();
    for (spec, pool) in items {
        let taken = match taken_by_pool.entry(&pool.name) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(taken_public(&tx, &pool.name)?),
        };
        let address = pool
            .pool()
            .first_free(taken)
            .ok_or_else(|| StoreError::PoolExhausted {
                pool: pool.name.clone(),
            })?;
        taken.insert(address);
        tx.execute(
            "INSERT INTO public_ips (owner, pool, address, spec, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                owner,
                pool.name,
                u32::from(address),
                encode(spec)?,
                created_at
            ],
        )?;
        created.push(PublicIpRecord {
            id: tx.last_insert_rowid().to_string(),
            owner: owner.to_owned(),
            pool: pool.name.clone(),
            address,
            spec: spec.clone(),
            bound_job: None,
            created_at,
        });
    }
    tx.commit()?;
    Ok(created)
}

pub(super) fn public_ip(
    c: &mut Connection,
    id: &str,
) -> Result<Option<PublicIpRecord>, StoreError> {
    let Some(numeric) = row_id(id) else {
        return Ok(None);
    };
    let row = c
        .query_row(
            &format!("SELECT {IP_COLUMNS} FROM public_ips p WHERE p.id = ?1"),
            [numeric],
            ip_from_row,
        )
        .optional()?;
    row.map(decode).transpose()
}

pub(super) fn public_ips(
    c: &mut Connection,
    owner: &str,
    before_id: Option<i64>,
    limit: u32,
) -> Result<Vec<PublicIpRecord>, StoreError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {IP_COLUMNS} FROM public_ips p WHERE p.owner = ?1 AND p.id < ?2
         ORDER BY p.id DESC LIMIT ?3"
    ))?;
    let rows = stmt.query_map(
        params![owner, before_id.unwrap_or(i64::MAX), limit],
        ip_from_row,
    )?;
    rows.map(|r| decode(r?)).collect()
}

/// The owner's address `id` inside a transaction, or why it cannot be used.
fn owned_ip(tx: &Transaction<'_>, owner: &str, id: &str) -> Result<PublicIpRecord, StoreError> {
    let unknown = || StoreError::AddressUnknown { id: id.to_owned() };
    let numeric = row_id(id).ok_or_else(unknown)?;
    let row = tx
        .query_row(
            &format!("SELECT {IP_COLUMNS} FROM public_ips p WHERE p.id = ?1"),
            [numeric],
            ip_from_row,
        )
        .optional()?
        .ok_or_else(unknown)?;
    let record = decode(row)?;
    if record.owner == owner {
        Ok(record)
    } else {
        Err(unknown())
    }
}

pub(super) fn delete_public_ips(
    c: &mut Connection,
    owner: &str,
    ids: &[String],
) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    for id in ids {
        let record = owned_ip(&tx, owner, id)?;
        if let Some(job) = record.bound_job {
            return Err(StoreError::AddressInUse {
                id: id.clone(),
                job,
            });
        }
        tx.execute("DELETE FROM public_ips WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    Ok(())
}

/// Replaces firewalls; true if any of the addresses is attached to a job (rules must change).
pub(super) fn set_public_ip_firewalls(
    c: &mut Connection,
    owner: &str,
    items: &[(String, FirewallSpec)],
) -> Result<bool, StoreError> {
    let tx = c.transaction()?;
    let mut any_bound = false;
    for (id, firewall) in items {
        let mut record = owned_ip(&tx, owner, id)?;
        any_bound |= record.bound_job.is_some();
        record.spec.firewall = Some(firewall.clone());
        tx.execute(
            "UPDATE public_ips SET spec = ?2 WHERE id = ?1",
            params![id, encode(&record.spec)?],
        )?;
    }
    tx.commit()?;
    Ok(any_bound)
}

/// Attaches the owner's addresses to a new job, inside the transaction that creates it.
pub(super) fn bind_public_ips(
    tx: &Transaction<'_>,
    job_id: &str,
    owner: &str,
    ids: &[String],
) -> Result<(), StoreError> {
    for id in ids {
        let record = owned_ip(tx, owner, id)?;
        if let Some(job) = record.bound_job {
            return Err(StoreError::AddressInUse {
                id: id.clone(),
                job,
            });
        }
        tx.execute(
            "UPDATE public_ips SET bound_job = ?2 WHERE id = ?1",
            params![id, job_id],
        )?;
    }
    Ok(())
}

/// Gives every rank of a new job a private address, inside the transaction that creates it.
pub(super) fn allocate_private(
    tx: &Transaction<'_>,
    job_id: &str,
    replicas: u32,
    pool: &AddressPool,
) -> Result<(), StoreError> {
    let mut taken: HashSet<Ipv4Addr> = {
        let mut stmt = tx.prepare_cached("SELECT address FROM private_addresses")?;
        let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
        rows.map(|a| a.map(Ipv4Addr::from))
            .collect::<Result<_, _>>()?
    };
    for rank in 0..replicas {
        let address = pool
            .first_free(&taken)
            .ok_or_else(|| StoreError::PoolExhausted {
                pool: "private network".into(),
            })?;
        tx.execute(
            "INSERT INTO private_addresses (job_id, rank, address) VALUES (?1, ?2, ?3)",
            params![job_id, rank, u32::from(address)],
        )?;
        taken.insert(address);
    }
    Ok(())
}

/// Gives back what a job held, in the transaction that makes it final.
pub(super) fn release_job(tx: &Transaction<'_>, job_id: &str) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE public_ips SET bound_job = NULL WHERE bound_job = ?1",
        [job_id],
    )?;
    tx.execute("DELETE FROM private_addresses WHERE job_id = ?1", [job_id])?;
    Ok(())
}

/// A job's addresses: private ones by rank, and the public IPs attached to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobAddresses {
    pub private: Vec<(u32, Ipv4Addr)>,
    pub public: Vec<PublicIpRecord>,
}

impl JobAddresses {
    pub fn private_of(&self, rank: u32) -> Option<Ipv4Addr> {
        self.private
            .iter()
            .find(|(r, _)| *r == rank)
            .map(|(_, a)| *a)
    }
}

pub(super) fn job_addresses(c: &mut Connection, job_id: &str) -> Result<JobAddresses, StoreError> {
    let mut stmt = c.prepare_cached(
        "SELECT rank, address FROM private_addresses WHERE job_id = ?1 ORDER BY rank",
    )?;
    let private = stmt
        .query_map([job_id], |r| {
            Ok((r.get::<_, u32>(0)?, Ipv4Addr::from(r.get::<_, u32>(1)?)))
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {IP_COLUMNS} FROM public_ips p WHERE p.bound_job = ?1 ORDER BY p.id"
    ))?;
    let public = stmt
        .query_map([job_id], ip_from_row)?
        .map(|r| decode(r?))
        .collect::<Result<_, _>>()?;
    Ok(JobAddresses { private, public })
}

/// A VM that exists (or may: its record is written first) with what the firewall needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressedVm {
    pub job_id: String,
    pub rank: u32,
    pub owner: String,
    pub addresses: JobAddresses,
}

/// Every VM record with its job's owner and addresses, read in one go.
pub(super) fn addressed_vms(c: &mut Connection) -> Result<Vec<AddressedVm>, StoreError> {
    let rows: Vec<(i64, u32, String)> = {
        let mut stmt = c.prepare_cached(
            "SELECT v.job_id, v.rank, j.owner FROM job_vms v JOIN jobs j ON j.id = v.job_id
             ORDER BY v.job_id, v.rank",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut vms = Vec::with_capacity(rows.len());
    for (job_id, rank, owner) in rows {
        let job_id = job_id.to_string();
        let addresses = job_addresses(c, &job_id)?;
        vms.push(AddressedVm {
            job_id,
            rank,
            owner,
            addresses,
        });
    }
    Ok(vms)
}
