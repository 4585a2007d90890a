//! Rules the store enforces inside its transactions, whatever its callers read before.

use super::*;
use crate::jobs::JobState;

fn new_job(owner: &str, unique: bool) -> NewJob {
    let spec = serde_json::from_value(serde_json::json!({
        "application": { "name": "debian-cloud", "version": "12" },
        "product": { "id": "vm-small", "category": "vm", "provider": "vmhost" },
    }))
    .expect("a minimal specification");
    NewJob {
        owner: owner.to_owned(),
        spec,
        fingerprint: "same shape".to_owned(),
        created_at: 1,
        first_update: update(JobState::InQueue),
        public_ips: Vec::new(),
        unique,
        core_id: None,
    }
}

fn update(state: JobState) -> JobUpdate {
    JobUpdate {
        timestamp: 2,
        state: Some(state),
        status: Some(format!("now {}", state.as_str())),
    }
}

async fn store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("vmhost.db")).expect("open");
    (store, dir)
}

#[tokio::test]
async fn a_final_state_is_never_left() {
    let (store, _dir) = store().await;
    let ids = store
        .insert_jobs(vec![new_job("alice", false)], None)
        .await
        .expect("insert");
    let id = &ids[0];
    store
        .append_update(id, update(JobState::Expired))
        .await
        .expect("expire");
    for late in [JobState::InQueue, JobState::Running, JobState::Success] {
        let refused = store.append_update(id, update(late)).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::AlreadyFinal {
                    state: "EXPIRED",
                    ..
                })
            ),
            "{late:?}: {refused:?}"
        );
    }
    let job = store.job(id).await.expect("read").expect("exists");
    assert_eq!(job.state, JobState::Expired);
    assert_eq!(job.updates.len(), 2, "{:?}", job.updates);
    let note = JobUpdate {
        timestamp: 3,
        state: None,
        status: Some("a note without a state".to_owned()),
    };
    store
        .append_update(id, note)
        .await
        .expect("notes still append");
}

#[tokio::test]
async fn a_unique_job_is_refused_while_its_twin_is_active() {
    let (store, _dir) = store().await;
    let first = store
        .insert_jobs(vec![new_job("alice", true)], None)
        .await
        .expect("first");
    let twin = store.insert_jobs(vec![new_job("alice", true)], None).await;
    assert!(
        matches!(&twin, Err(StoreError::Duplicate { index: 0, existing }) if *existing == first[0]),
        "{twin:?}"
    );
    let others = store
        .insert_jobs(vec![new_job("bob", true), new_job("alice", false)], None)
        .await
        .expect("another owner, or duplicates allowed");
    for id in [&first[0], &others[1]] {
        store
            .append_update(id, update(JobState::Success))
            .await
            .expect("finish");
    }
    store
        .insert_jobs(vec![new_job("alice", true)], None)
        .await
        .expect("no active twin any more");
}

#[tokio::test]
async fn only_canonical_ids_name_a_row() {
    let (store, _dir) = store().await;
    let ids = store
        .insert_jobs(vec![new_job("alice", false)], None)
        .await
        .expect("insert");
    assert_eq!(ids, ["1"]);
    assert!(store.job("1").await.expect("read").is_some());
    for alias in ["01", "+1", " 1", "1 ", "0", "-1", "1.0"] {
        assert!(store.job(alias).await.expect("read").is_none(), "{alias:?}");
    }
}

#[tokio::test]
async fn a_suspend_is_asked_of_running_jobs_only_and_all_or_none() {
    let (store, _dir) = store().await;
    let ids = store
        .insert_jobs(vec![new_job("alice", false), new_job("alice", false)], None)
        .await
        .expect("insert");
    for id in &ids {
        store
            .append_update(id, update(JobState::Running))
            .await
            .expect("run");
    }
    // The guest powered the second job off since the caller looked.
    store
        .append_update(&ids[1], update(JobState::Suspended))
        .await
        .expect("stopped from inside");
    let refused = store.set_suspend_requested(&ids).await;
    assert!(
        matches!(&refused, Err(StoreError::NotRunning { id }) if *id == ids[1]),
        "{refused:?}"
    );
    let first = store.job(&ids[0]).await.expect("read").expect("exists");
    assert!(!first.suspend_requested, "nothing was asked");
    store
        .set_suspend_requested(&ids[..1])
        .await
        .expect("a running job");
    assert!(store.job(&ids[0]).await.unwrap().unwrap().suspend_requested);
}

#[tokio::test]
async fn a_core_id_names_one_job_only() {
    let (store, _dir) = store().await;
    let from_core = |id: &str| NewJob {
        core_id: Some(id.to_owned()),
        ..new_job("alice", false)
    };
    let ids = store
        .insert_jobs(vec![from_core("54112")], None)
        .await
        .expect("first");
    let again = store
        .insert_jobs(vec![from_core("54113"), from_core("54112")], None)
        .await;
    assert!(
        matches!(&again, Err(StoreError::CoreIdTaken { core_id }) if core_id == "54112"),
        "{again:?}"
    );
    assert_eq!(
        store.job_id_for_core("54113").await.unwrap(),
        None,
        "all or none"
    );
    assert_eq!(
        store.job_id_for_core("54112").await.unwrap(),
        Some(ids[0].clone())
    );
}
