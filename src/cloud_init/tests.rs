//! Whole-seed tests: snapshots of a typical seed, injection attempts parsed back as YAML, property
//! tests over arbitrary strings, and (when PyYAML is installed) cloud-init's own YAML reader as an
//! oracle.

use std::process::Command;

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::user_data::{FORBIDDEN_KEYS, VMHOST_SCALARS};
use super::validate::tests::ed25519;
use super::*;

fn typical_spec() -> SeedSpec {
    let user_text = "#cloud-config\n\
        packages: [htop, jq]\n\
        runcmd:\n  - [sh, -c, 'echo ready > /run/ready']\n\
        write_files:\n  - path: /etc/motd\n    permissions: '0644'\n    content: |\n      Welcome to UCloud\n";
    SeedSpec {
        instance_id: "job-0b5b6a2e-6a8e-4c55-9a5c-3c2d2d0b7f01".to_owned(),
        hostname: "job1".to_owned(),
        login_user: "ucloud".to_owned(),
        ssh_authorized_keys: vec![ed25519("alice@laptop"), ed25519("")],
        extra_user_data: Some(parse_user_cloud_config(user_text).unwrap()),
        nics: vec![
            SeedNic {
                mac: "52:54:00:aa:bb:01".to_owned(),
                addressing: NicAddressing::Static {
                    address: [203, 0, 113, 10].into(),
                    prefix_len: 24,
                    gateway: Some([203, 0, 113, 1].into()),
                    dns: vec![[1, 1, 1, 1].into()],
                },
            },
            SeedNic {
                mac: "52:54:00:aa:bb:02".to_owned(),
                addressing: NicAddressing::Dhcp,
            },
        ],
        hosts: Vec::new(),
    }
}

#[test]
fn peer_hosts_are_appended_to_etc_hosts_after_the_users_files() {
    let spec = SeedSpec {
        hosts: vec![HostEntry {
            address: [10, 213, 0, 2].into(),
            name: "db".to_owned(),
        }],
        ..typical_spec()
    };
    let files = render(&spec, &SeedTemplates::empty()).unwrap();
    let doc = yaml(&files.user_data);
    assert_eq!(doc["write_files"][0]["path"], json!("/etc/motd"));
    assert_eq!(
        doc["write_files"][1],
        json!({"path": "/etc/hosts", "append": true, "content": "10.213.0.2 db\n"})
    );
    let hostile = SeedSpec {
        hosts: vec![HostEntry {
            address: [10, 213, 0, 2].into(),
            name: "db\n10.0.0.1 bank".to_owned(),
        }],
        ..typical_spec()
    };
    assert!(matches!(
        render(&hostile, &SeedTemplates::empty()),
        Err(SeedError::Invalid(_))
    ));
}

fn minimal_spec() -> SeedSpec {
    SeedSpec {
        extra_user_data: None,
        nics: Vec::new(),
        ..typical_spec()
    }
}

/// Parses a rendered file back the way a YAML consumer would (the `#cloud-config` line is a
/// comment to YAML).
#[track_caller]
fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"))
}

fn login_entry(spec: &SeedSpec, keys: Value) -> Value {
    json!({
        "name": spec.login_user,
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "shell": "/bin/bash",
        "lock_passwd": true,
        "ssh_authorized_keys": keys,
    })
}

/// The user-data document vmhost must produce for `extra` with an empty template.
fn expected_user_data(spec: &SeedSpec, extra: &Map<String, Value>) -> Value {
    let mut doc = extra.clone();
    let keys: Vec<String> = spec
        .ssh_authorized_keys
        .iter()
        .map(|k| k.trim_matches([' ', '\t']).to_owned())
        .collect();
    doc.insert("users".to_owned(), json!([login_entry(spec, json!(keys))]));
    doc.insert("ssh_pwauth".to_owned(), json!(false));
    doc.insert("preserve_hostname".to_owned(), json!(false));
    Value::Object(doc)
}

fn with_snapshot_dir(f: impl FnOnce()) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path("../../testdata/cloud_init");
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(f);
}

#[test]
fn typical_seed_snapshots() {
    let files = render(&typical_spec(), &load_templates(None).unwrap()).unwrap();
    with_snapshot_dir(|| {
        insta::assert_snapshot!("meta-data", files.meta_data);
        insta::assert_snapshot!("user-data", files.user_data);
        insta::assert_snapshot!("network-config", files.network_config);
    });
}

#[test]
fn typical_seed_has_the_intended_structure() {
    let spec = typical_spec();
    let files = render(&spec, &load_templates(None).unwrap()).unwrap();
    assert_eq!(files.instance_id, spec.instance_id);
    assert_eq!(
        yaml(&files.meta_data),
        json!({"instance-id": spec.instance_id, "local-hostname": "job1"})
    );
    assert!(files.user_data.starts_with("#cloud-config\n{"));
    let doc = yaml(&files.user_data);
    assert_eq!(
        doc["users"][0],
        login_entry(&spec, json!([ed25519("alice@laptop"), ed25519("")]))
    );
    assert_eq!(doc["users"].as_array().map(Vec::len), Some(1));
    assert_eq!(doc["ssh_pwauth"], json!(false));
    assert_eq!(doc["preserve_hostname"], json!(false));
    assert_eq!(doc["disable_root"], json!(true), "from the template");
    assert_eq!(doc["packages"], json!(["htop", "jq"]), "from the user");
    assert_eq!(doc["write_files"][0]["permissions"], json!("0644"));
    let nets = yaml(&files.network_config);
    assert_eq!(nets["ethernets"]["nic1"]["set-name"], json!("eth1"));
}

#[test]
fn template_and_user_merge_with_vmhost_last() {
    let template = SeedTemplates {
        user_data: parse_user_cloud_config(
            "runcmd: [from-template]\nusers: [{name: support}]\nssh_pwauth: false\napt: {primary: [{arches: [default]}]}\n",
        )
        .unwrap(),
    };
    let mut spec = minimal_spec();
    spec.extra_user_data = Some(
        parse_user_cloud_config("runcmd: [from-user]\nusers: [bob, {name: carol}]\napt: {conf: x}\ndisable_root: false\n")
            .unwrap(),
    );
    let doc = yaml(&render(&spec, &template).unwrap().user_data);
    assert_eq!(doc["runcmd"], json!(["from-template", "from-user"]));
    assert_eq!(
        doc["apt"],
        json!({"primary": [{"arches": ["default"]}], "conf": "x"})
    );
    assert_eq!(doc["disable_root"], json!(false));
    let names: Vec<&Value> = doc["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| if u.is_string() { u } else { &u["name"] })
        .collect();
    assert_eq!(
        names,
        [
            &json!("ucloud"),
            &json!("support"),
            &json!("bob"),
            &json!("carol")
        ]
    );
}

#[track_caller]
fn assert_refused(spec: &SeedSpec, templates: &SeedTemplates, needle: &str) {
    match render(spec, templates) {
        Err(SeedError::Invalid(msg)) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
        other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn render_refuses_each_invalid_input() {
    let none = SeedTemplates::empty();
    let with = |f: &dyn Fn(&mut SeedSpec)| {
        let mut spec = minimal_spec();
        f(&mut spec);
        spec
    };
    assert_refused(
        &with(&|s| s.instance_id = "../x".into()),
        &none,
        "instance id",
    );
    assert_refused(&with(&|s| s.hostname = "Job_1".into()), &none, "hostname");
    assert_refused(
        &with(&|s| s.login_user = "root".into()),
        &none,
        "login user",
    );
    assert_refused(
        &with(&|s| s.ssh_authorized_keys.push("ssh-dss AAAA".into())),
        &none,
        "ssh key",
    );
    assert_refused(
        &with(&|s| {
            s.nics.push(SeedNic {
                mac: "bad".into(),
                addressing: NicAddressing::Dhcp,
            })
        }),
        &none,
        "MAC",
    );
    let extra = |text: &str| {
        let map = parse_user_cloud_config(text).unwrap();
        with(&move |s| s.extra_user_data = Some(map.clone()))
    };
    assert_refused(
        &extra("users: [{name: ucloud, sudo: false}]"),
        &none,
        "already creates",
    );
    assert_refused(&extra("users: ['alice, ucloud']"), &none, "already creates");
    assert_refused(&extra("hostname: other"), &none, "vmhost does not allow");
    assert_refused(&extra("ssh_pwauth: true"), &none, "ssh_pwauth");
    let big = format!("runcmd: [\"{}\"]", "x".repeat(MAX_USER_DATA_BYTES - 100));
    assert_refused(&extra(&big), &none, "rendered user-data");

    let support = SeedTemplates {
        user_data: parse_user_cloud_config("users: [{name: support}]").unwrap(),
    };
    assert_refused(&extra("users: [support]"), &support, "already creates");
    let clash = SeedTemplates {
        user_data: parse_user_cloud_config("users: [ucloud]").unwrap(),
    };
    assert_refused(
        &minimal_spec(),
        &clash,
        "template declares a user named like the login user",
    );
    let bad_template = SeedTemplates {
        user_data: parse_user_cloud_config("datasource_list: [None]").unwrap(),
    };
    assert_refused(
        &minimal_spec(),
        &bad_template,
        "operator's user-data template",
    );
}

/// Strings that would become configuration if pasted into YAML.
const NASTY: &[&str] = &[
    "\n  - runcmd:\n    - reboot",
    "x\nruncmd: [reboot]",
    "---\nruncmd: [reboot]\n...",
    "#cloud-config\nruncmd: [reboot]",
    "\"}, \"runcmd\": [\"reboot\"], \"x\": {\"",
    "\\\", \\\"runcmd\\\": 1",
    "{{ ds.meta_data.instance_id }}",
    "## template: jinja",
    "&anchor *alias !!python/object:os.system",
    "a: b\n- c",
    "\u{85}runcmd: [reboot]",
    "\u{2028}runcmd: [reboot]\u{2029}",
    "\u{7f}\u{80}\u{9f}\u{feff}\u{fffe}\u{ffff}",
    "\r\nruncmd: [reboot]\r",
    "\t- reboot",
    "'single' \"double\" `back`",
    "𝕦𝕟𝕚𝕔𝕠𝕕𝕖 é 中文 \u{10ffff}",
    "",
    "1e100",
    "yes",
    "null",
];

#[test]
fn user_strings_never_become_configuration() {
    let spec0 = minimal_spec();
    for s in NASTY {
        let extra = json!({
            "runcmd": [s, [s, s]],
            "write_files": [{"path": "/tmp/x", "content": s}],
            "bootcmd": [{ *s: s }],
        });
        let extra = extra.as_object().unwrap().clone();
        let spec = SeedSpec {
            extra_user_data: Some(extra.clone()),
            ..spec0.clone()
        };
        let files = render(&spec, &SeedTemplates::empty()).unwrap();
        assert_eq!(
            yaml(&files.user_data),
            expected_user_data(&spec, &extra),
            "{s:?}"
        );
        assert_eq!(files.user_data.lines().next(), Some("#cloud-config"));
    }
}

#[test]
fn ssh_comments_and_hostnames_cannot_inject() {
    for s in NASTY {
        let mut spec = minimal_spec();
        spec.ssh_authorized_keys = vec![ed25519(&format!("me{s}"))];
        match render(&spec, &SeedTemplates::empty()) {
            Ok(files) => {
                assert!(!s.chars().any(char::is_control), "{s:?} accepted");
                assert_eq!(
                    yaml(&files.user_data),
                    expected_user_data(&spec, &Map::new()),
                    "{s:?}"
                );
            }
            Err(SeedError::Invalid(_)) => {}
            Err(e) => panic!("{s:?}: {e:?}"),
        }
        let mut spec = minimal_spec();
        spec.hostname = format!("vm{s}");
        let refused = matches!(
            render(&spec, &SeedTemplates::empty()),
            Err(SeedError::Invalid(_))
        );
        assert_eq!(refused, !is_rfc1123_label(&spec.hostname), "{s:?}");
    }
}

#[test]
fn pyyaml_reads_what_serde_yaml_reads() {
    // cloud-init parses user-data with PyYAML's SafeLoader; use it as an oracle when present.
    let probe = Command::new("python3").args(["-c", "import yaml"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("note: python3 with PyYAML not installed; skipping the PyYAML cross-check");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    let all_bmp_specials: String = (0x7fu32..0xa1)
        .chain([0x2028, 0x2029, 0xfeff, 0xfffe, 0xffff])
        .filter_map(char::from_u32)
        .collect();
    let controls: String = (0u32..0x20).filter_map(char::from_u32).collect();
    for s in NASTY
        .iter()
        .copied()
        .chain([all_bmp_specials.as_str(), controls.as_str()])
    {
        let extra = json!({"runcmd": [s], "k": {s: [s, 1e100, 1.5e-7, -0.0, u64::MAX]}});
        let spec = SeedSpec {
            extra_user_data: extra.as_object().cloned(),
            ..minimal_spec()
        };
        let files = render(&spec, &SeedTemplates::empty()).unwrap();
        cases.push((
            files.user_data,
            expected_user_data(&spec, extra.as_object().unwrap()),
        ));
        cases.push((
            files.meta_data,
            yaml(&render(&spec, &SeedTemplates::empty()).unwrap().meta_data),
        ));
    }
    let files = render(&typical_spec(), &load_templates(None).unwrap()).unwrap();
    cases.push((files.network_config.clone(), yaml(&files.network_config)));
    let cases_path = dir.path().join("cases.json");
    let cases_json: Vec<Value> = cases
        .iter()
        .map(|(text, want)| json!({"text": text, "want": want}))
        .collect();
    std::fs::write(&cases_path, serde_json::to_string(&cases_json).unwrap()).unwrap();
    let script = r#"
import json, sys, yaml
loaders = [yaml.SafeLoader] + ([yaml.CSafeLoader] if hasattr(yaml, "CSafeLoader") else [])
for i, case in enumerate(json.load(open(sys.argv[1]))):
    for loader in loaders:
        got = yaml.load(case["text"], Loader=loader)
        if got != case["want"]:
            print(f"case {i} {loader.__name__}: {got!r} != {case['want']!r}")
            sys.exit(1)
print("ok")
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&cases_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_rfc1123_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9-]{0,70}", "[ -~\n]{0,20}"]
}

proptest! {
    #[test]
    fn any_hostname_is_refused_or_lands_verbatim_in_meta_data(hostname in interesting_string()) {
        let spec = SeedSpec { hostname: hostname.clone(), ..minimal_spec() };
        let base = render(&minimal_spec(), &SeedTemplates::empty()).unwrap();
        match render(&spec, &SeedTemplates::empty()) {
            Ok(files) => {
                prop_assert!(is_rfc1123_label(&hostname));
                prop_assert_eq!(yaml(&files.meta_data), json!({"instance-id": spec.instance_id, "local-hostname": hostname}));
                prop_assert_eq!(&files.user_data, &base.user_data);
                prop_assert_eq!(&files.network_config, &base.network_config);
            }
            Err(SeedError::Invalid(_)) => prop_assert!(!is_rfc1123_label(&hostname)),
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn any_ssh_comment_is_refused_or_lands_verbatim(comment in any::<String>()) {
        let mut spec = minimal_spec();
        spec.ssh_authorized_keys = vec![ed25519(&comment)];
        let trimmed = comment.trim_matches([' ', '\t']);
        match render(&spec, &SeedTemplates::empty()) {
            Ok(files) => {
                prop_assert!(!trimmed.chars().any(char::is_control));
                spec.ssh_authorized_keys = vec![ed25519(trimmed)];
                prop_assert_eq!(yaml(&files.user_data), expected_user_data(&spec, &Map::new()));
            }
            Err(SeedError::Invalid(_)) => prop_assert!(trimmed.chars().any(char::is_control)),
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn any_user_data_string_is_refused_or_parses_back_exactly(s in any::<String>(), k in interesting_string()) {
        let mut extra = json!({
            "runcmd": [s, [k, s]],
            "write_files": [{"path": k, "content": s}],
            "nested": { k.clone(): { s.clone(): s } },
        }).as_object().cloned().unwrap();
        extra.insert(k.clone(), json!(s));
        let spec = SeedSpec { extra_user_data: Some(extra.clone()), ..minimal_spec() };
        let reserved = FORBIDDEN_KEYS.contains(&k.as_str())
            || VMHOST_SCALARS.iter().any(|(key, _)| *key == k)
            || k == "users";
        let too_long = k.chars().count() > MAX_KEY_CHARS || s.chars().count() > MAX_KEY_CHARS;
        match render(&spec, &SeedTemplates::empty()) {
            Ok(files) => {
                prop_assert!(!reserved && !too_long);
                prop_assert_eq!(yaml(&files.user_data), expected_user_data(&spec, &extra));
            }
            Err(SeedError::Invalid(_)) => prop_assert!(reserved || too_long),
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }
}
