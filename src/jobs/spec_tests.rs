use super::*;
use crate::images::Catalog;

fn base() -> JobSpec {
    serde_json::from_value(serde_json::json!({
        "application": { "name": "debian-cloud", "version": "12" },
        "product": { "id": "vm-small", "category": "vm", "provider": "vmhost" },
    }))
    .unwrap()
}

fn check(spec: &JobSpec) -> Result<LaunchPlan, SpecError> {
    validate(spec, &Config::default(), &Catalog::load(None).unwrap())
}

#[test]
fn minimal_spec_uses_product_defaults() {
    let plan = check(&base()).unwrap();
    assert_eq!(plan.replicas, 1);
    assert_eq!(plan.disk_gib, 8);
    assert!(plan.ssh_keys.is_empty());
    assert_eq!(plan.time_allocation_ms, None);
}

#[test]
fn parameters_are_typed_and_checked() {
    let mut spec = base();
    spec.parameters = Some(
        serde_json::json!({
            "sshPublicKeys": { "type": "text", "value": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\n\n" },
            "diskSize": { "type": "integer", "value": 12 },
        })
        .as_object()
        .unwrap()
        .clone(),
    );
    let plan = check(&spec).unwrap();
    assert_eq!(plan.ssh_keys.len(), 1);
    assert_eq!(plan.disk_gib, 12);
    for bad in [
        serde_json::json!({ "diskSize": { "type": "text", "value": "12" } }),
        serde_json::json!({ "diskSize": { "type": "integer", "value": -1 } }),
        serde_json::json!({ "diskSize": { "type": "integer", "value": 1 } }),
        serde_json::json!({ "sshPublicKeys": "ssh-ed25519 AAAA" }),
        serde_json::json!({ "sshPublicKeys": { "type": "text", "value": "rm -rf /" } }),
        serde_json::json!({ "other": { "type": "text", "value": "x" } }),
    ] {
        spec.parameters = Some(bad.as_object().unwrap().clone());
        assert!(matches!(check(&spec), Err(SpecError::Invalid(_))), "{bad}");
    }
}

#[test]
fn product_application_and_limits_are_enforced() {
    let mut spec = base();
    spec.product.provider = "other".into();
    assert!(matches!(
        check(&spec),
        Err(SpecError::UnknownProduct { .. })
    ));
    let mut spec = base();
    spec.application.version = "11".into();
    assert!(matches!(
        check(&spec),
        Err(SpecError::UnknownApplication { .. })
    ));
    for (mutate, what) in [
        (
            Box::new(|s: &mut JobSpec| s.replicas = Some(0)) as Box<dyn Fn(&mut JobSpec)>,
            "zero replicas",
        ),
        (
            Box::new(|s: &mut JobSpec| s.replicas = Some(9)),
            "too many replicas",
        ),
        (
            Box::new(|s: &mut JobSpec| s.name = Some("a\nb".into())),
            "control characters",
        ),
        (
            Box::new(|s: &mut JobSpec| s.name = Some("x".repeat(201))),
            "long name",
        ),
        (
            Box::new(|s: &mut JobSpec| s.opened_file = Some("/x".into())),
            "openedFile",
        ),
        (
            Box::new(|s: &mut JobSpec| {
                s.time_allocation = Some(SimpleDuration {
                    hours: 0,
                    minutes: 0,
                    seconds: 0,
                })
            }),
            "zero time",
        ),
        (
            Box::new(|s: &mut JobSpec| {
                s.resources = Some(vec![serde_json::json!({"type": "peer"})])
            }),
            "peer without hostname",
        ),
        (
            Box::new(|s: &mut JobSpec| {
                s.resources = Some(vec![serde_json::json!({"type": "ingress", "id": "1"})])
            }),
            "unsupported resource",
        ),
        (
            Box::new(|s: &mut JobSpec| {
                s.resources = Some(vec![
                    serde_json::json!({"type": "peer", "hostname": "db\n10.0.0.1 evil", "jobId": "1"}),
                ])
            }),
            "peer hostname with a newline",
        ),
        (
            Box::new(|s: &mut JobSpec| {
                s.resources = Some(vec![
                    serde_json::json!({"type": "network", "id": "4"}),
                    serde_json::json!({"type": "network", "id": "4"}),
                ])
            }),
            "the same public IP twice",
        ),
    ] {
        let mut spec = base();
        mutate(&mut spec);
        assert!(matches!(check(&spec), Err(SpecError::Invalid(_))), "{what}");
    }
}

#[test]
fn network_and_peer_values_are_collected_from_resources_and_parameters() {
    let mut spec = base();
    spec.resources = Some(vec![
        serde_json::json!({"type": "network", "id": "4"}),
        serde_json::json!({"type": "peer", "hostname": "DB", "jobId": "9"}),
    ]);
    spec.parameters.get_or_insert_with(Default::default).insert(
        "ip".into(),
        serde_json::json!({"type": "network", "id": "5"}),
    );
    let plan = check(&spec).unwrap();
    assert_eq!(plan.public_ips, vec!["4".to_owned(), "5".to_owned()]);
    assert_eq!(
        plan.peers,
        vec![Peer {
            hostname: "db".into(),
            job_id: "9".into()
        }]
    );
}

#[test]
fn fingerprint_ignores_the_display_name_but_not_the_shape() {
    let a = base();
    let mut named = base();
    named.name = Some("other name".into());
    assert_eq!(a.fingerprint(), named.fingerprint());
    let mut bigger = base();
    bigger.replicas = Some(2);
    assert_ne!(a.fingerprint(), bigger.fingerprint());
}

#[test]
fn hostnames_are_dns_labels() {
    assert_eq!(hostname("7", None, 0, 1), "job-7");
    assert_eq!(
        hostname("7", Some("My Analysis #1!"), 0, 1),
        "my-analysis-1"
    );
    assert_eq!(hostname("7", Some("---"), 0, 1), "job-7");
    assert_eq!(
        hostname("7", Some("x\n  - runcmd: [reboot]"), 0, 1),
        "x-runcmd-reboot"
    );
    assert_eq!(hostname("7", Some("cluster"), 2, 3), "cluster-2");
    assert!(hostname("7", Some(&"a".repeat(300)), 0, 1).len() <= 63);
    assert_eq!(hostname("7", Some("2fast"), 0, 1), "2fast");
}
