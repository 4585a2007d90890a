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

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

/// What a create checks: [`validate`], then the `user-data` render with `templates`.
fn check_create(spec: &JobSpec, templates: &SeedTemplates) -> Result<LaunchPlan, SpecError> {
    let plan = check(spec)?;
    check_user_data(&plan, templates)?;
    Ok(plan)
}

fn with_params(params: serde_json::Value) -> JobSpec {
    let mut spec = base();
    spec.parameters = Some(params.as_object().unwrap().clone());
    spec
}

fn with_user_data(text: &str) -> JobSpec {
    with_params(serde_json::json!({ "userData": { "type": "text", "value": text } }))
}

#[track_caller]
fn assert_refused_at_create(spec: &JobSpec, templates: &SeedTemplates, needle: &str) {
    match check_create(spec, templates) {
        Err(SpecError::Invalid(why)) => assert!(why.contains(needle), "{why:?} lacks {needle:?}"),
        other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
    }
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

#[test]
fn user_data_breaking_the_seed_rules_is_refused_at_create() {
    let defaults = crate::cloud_init::load_templates(None).unwrap();
    for (text, needle) in [
        (
            "hostname: evil",
            "parameter userData: invalid seed input: user data sets \"hostname\"",
        ),
        ("ssh_pwauth: true", "vmhost always sets ssh_pwauth: false"),
        // The login user of debian-cloud 12.
        ("users: [debian]", "user data declares user \"debian\""),
        (
            "users: [{name: debian, sudo: false}]",
            "user data declares user \"debian\"",
        ),
        ("users: 5", "`users` must be a list, not a number"),
    ] {
        let spec = with_user_data(text);
        // validate alone only parses user data; the render is what refuses it.
        assert!(check(&spec).is_ok(), "{text}");
        assert_refused_at_create(&spec, &defaults, needle);
    }
    let template = SeedTemplates {
        user_data: serde_json::json!({"users": [{"name": "support"}]})
            .as_object()
            .unwrap()
            .clone(),
    };
    assert_refused_at_create(
        &with_user_data("users: [support]"),
        &template,
        "user data declares user \"support\"",
    );
}

#[test]
fn keys_and_user_data_over_the_rendered_size_limit_are_refused_at_create() {
    let defaults = crate::cloud_init::load_templates(None).unwrap();
    // Each key is valid and under the 8 KiB line limit; together they are not.
    let key = format!("{KEY} {}", "c".repeat(7900));
    let keys = vec![key; 10].join("\n");
    let spec =
        with_params(serde_json::json!({ "sshPublicKeys": { "type": "text", "value": keys } }));
    assert_eq!(check(&spec).unwrap().ssh_keys.len(), 10);
    assert_refused_at_create(&spec, &defaults, "parameter sshPublicKeys: ");
    assert_refused_at_create(&spec, &defaults, "more than the 65536-byte limit");

    let mut both = with_user_data(&format!("runcmd: [{}]", "x".repeat(40_000)));
    both.parameters.as_mut().unwrap().insert(
        "sshPublicKeys".into(),
        serde_json::json!({ "type": "text", "value": vec![format!("{KEY} {}", "c".repeat(7900)); 4].join("\n") }),
    );
    assert_refused_at_create(&both, &defaults, "parameters sshPublicKeys and userData: ");
    assert_refused_at_create(&both, &defaults, "more than the 65536-byte limit");
}

#[test]
fn peer_hosts_lines_count_towards_the_size_limit() {
    let defaults = crate::cloud_init::load_templates(None).unwrap();
    let no_peer = check(&base()).unwrap();
    let one_peer = LaunchPlan {
        peers: vec![Peer {
            hostname: "p".repeat(63),
            job_id: "1".into(),
        }],
        ..no_peer.clone()
    };
    let fits = |plan: &LaunchPlan, size: usize| {
        let text = format!("runcmd: [{}]", "x".repeat(size));
        let user_data = Some(crate::cloud_init::parse_user_cloud_config(&text).unwrap());
        check_user_data(
            &LaunchPlan {
                user_data,
                ..plan.clone()
            },
            &defaults,
        )
        .is_ok()
    };
    // The smallest user data that no longer fits next to the peer's /etc/hosts line...
    let (mut fitting, mut too_big) = (0, 64 * 1024);
    while too_big - fitting > 1 {
        let mid = (fitting + too_big) / 2;
        if fits(&one_peer, mid) {
            fitting = mid;
        } else {
            too_big = mid;
        }
    }
    // ...fits without it.
    assert!(fits(&no_peer, too_big));
}

#[test]
fn valid_user_data_and_keys_are_accepted_at_create() {
    let defaults = crate::cloud_init::load_templates(None).unwrap();
    let mut spec = with_params(serde_json::json!({
        "sshPublicKeys": { "type": "text", "value": format!("{KEY} me@laptop\n{KEY} other") },
        "userData": { "type": "text", "value": "#cloud-config\n\
            ssh_pwauth: false\n\
            packages: [htop]\n\
            users: [ops, {name: backup, shell: /bin/sh}]\n\
            runcmd: [[touch, /run/ready]]\n" },
    }));
    spec.resources = Some(vec![
        serde_json::json!({"type": "peer", "hostname": "db", "jobId": "9"}),
    ]);
    let plan = check_create(&spec, &defaults).unwrap();
    assert_eq!(plan.ssh_keys.len(), 2);
    assert_eq!(
        plan.user_data.unwrap()["packages"],
        serde_json::json!(["htop"])
    );
}
