//! `user-data`: the policy of who may set what (see the `cloud_init` module doc for the why of
//! each key), the deep merge of operator template and user cloud-config, and vmhost's own keys
//! written last. Pure.

use serde_json::{json, Map, Value};

use super::validate::shown;
use super::yaml::{self, kind_of};
use super::{SeedError, SeedTemplates, UserDataSpec, MAX_KEY_CHARS, MAX_USER_DATA_BYTES};

/// Top-level keys no source may set (operator template or user).
pub(crate) const FORBIDDEN_KEYS: &[&str] = &[
    "hostname",
    "fqdn",
    "prefer_fqdn_over_hostname",
    "datasource",
    "datasource_list",
    "network",
    "cloud_init_modules",
    "cloud_config_modules",
    "cloud_final_modules",
    "system_info",
    "merge_how",
    "merge_type",
];

/// Top-level scalars vmhost always writes; a source may repeat them only with the same value.
pub(crate) const VMHOST_SCALARS: &[(&str, bool)] =
    &[("ssh_pwauth", false), ("preserve_hostname", false)];

/// The sudo rule of the login user. UCloud users are administrators of their own VM.
const LOGIN_SUDO: &str = "ALL=(ALL) NOPASSWD:ALL";
const LOGIN_SHELL: &str = "/bin/bash";

/// Who wrote a piece of cloud-config, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Template,
    User,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Template => "the operator's user-data template",
            Source::User => "user data",
        }
    }
}

/// Checks a source's top-level keys and the shape of its `users`; returns the user names it
/// declares. Run on templates at load time too, so operator mistakes show at start-up.
pub(crate) fn check_source(
    map: &Map<String, Value>,
    source: Source,
) -> Result<Vec<String>, SeedError> {
    for key in map.keys() {
        if FORBIDDEN_KEYS.contains(&key.as_str()) {
            return Err(SeedError::Invalid(format!(
                "{} sets {}, which vmhost does not allow (it decides the hostname, datasource, \
                 network and module lists itself)",
                source.name(),
                shown(key)
            )));
        }
    }
    for (key, required) in VMHOST_SCALARS {
        match map.get(*key) {
            Some(Value::Bool(b)) if b == required => {}
            Some(other) => {
                return Err(SeedError::Invalid(format!(
                    "{} sets {key} to {other}, but vmhost always sets {key}: {required}",
                    source.name()
                )))
            }
            None => {}
        }
    }
    check_keys(map)?;
    match map.get("users") {
        None => Ok(Vec::new()),
        Some(Value::Array(entries)) => {
            entries
                .iter()
                .map(|e| entry_names(e, source))
                .try_fold(Vec::new(), |mut acc, names| {
                    acc.extend(names?);
                    Ok(acc)
                })
        }
        Some(other) => Err(SeedError::Invalid(format!(
            "{}: `users` must be a list, not {}",
            source.name(),
            kind_of(other)
        ))),
    }
}

/// The account names one `users` entry stands for, the way cloud-init reads it: a string is a
/// comma-separated list of names, a mapping names one user (`default` when `name` is missing).
fn entry_names(entry: &Value, source: Source) -> Result<Vec<String>, SeedError> {
    let bad = |why: &str| SeedError::Invalid(format!("{}: `users` entry {why}", source.name()));
    match entry {
        Value::String(names) => Ok(names
            .split(',')
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect()),
        Value::Object(user) => match user.get("name") {
            None => Ok(vec!["default".to_owned()]),
            Some(Value::String(name)) => Ok(vec![name.trim().to_owned()]),
            Some(other) => Err(bad(&format!(
                "has a `name` that is {}, not a string",
                kind_of(other)
            ))),
        },
        other => Err(bad(&format!(
            "must be a name or a mapping, not {}",
            kind_of(other)
        ))),
    }
}

/// Refuses mapping keys too long for a YAML flow mapping (see `MAX_KEY_CHARS`), at any depth.
fn check_keys(map: &Map<String, Value>) -> Result<(), SeedError> {
    for (key, value) in map {
        if key.chars().count() > MAX_KEY_CHARS {
            return Err(SeedError::Invalid(format!(
                "mapping key {} is longer than {MAX_KEY_CHARS} characters",
                shown(key)
            )));
        }
        check_value_keys(value)?;
    }
    Ok(())
}

fn check_value_keys(value: &Value) -> Result<(), SeedError> {
    match value {
        Value::Object(map) => check_keys(map),
        Value::Array(items) => items.iter().try_for_each(check_value_keys),
        _ => Ok(()),
    }
}

/// Merges `overlay` into `base`: mappings recursively, lists appended, anything else replaced.
pub(crate) fn deep_merge(base: &mut Map<String, Value>, overlay: Map<String, Value>) {
    for (key, value) in overlay {
        match (base.get_mut(&key), value) {
            (Some(Value::Object(b)), Value::Object(o)) => deep_merge(b, o),
            (Some(Value::Array(b)), Value::Array(o)) => b.extend(o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Renders `user-data`; `keys` are the already validated and normalised SSH keys.
pub(crate) fn render(
    spec: &UserDataSpec<'_>,
    keys: &[String],
    templates: &SeedTemplates,
) -> Result<String, SeedError> {
    let template_names = check_source(&templates.user_data, Source::Template)?;
    if template_names.iter().any(|n| n == spec.login_user) {
        return Err(SeedError::Invalid(format!(
            "the operator's user-data template declares a user named like the login user {}",
            shown(spec.login_user)
        )));
    }
    let mut extra = spec.extra_user_data.cloned().unwrap_or_default();
    let user_names = check_source(&extra, Source::User)?;
    if let Some(name) = user_names
        .iter()
        .find(|n| **n == spec.login_user || template_names.contains(n))
    {
        return Err(SeedError::Invalid(format!(
            "user data declares user {}, which vmhost or the operator already creates; \
             pick another name",
            shown(name)
        )));
    }

    let mut doc = templates.user_data.clone();
    let template_users = take_users(&mut doc);
    let extra_users = take_users(&mut extra);
    deep_merge(&mut doc, extra);

    let login = json!({
        "name": spec.login_user,
        "sudo": LOGIN_SUDO,
        "shell": LOGIN_SHELL,
        "lock_passwd": true,
        "ssh_authorized_keys": keys,
    });
    let users: Vec<Value> = std::iter::once(login)
        .chain(template_users)
        .chain(extra_users)
        .collect();
    doc.insert("users".to_owned(), Value::Array(users));
    for (key, value) in VMHOST_SCALARS {
        doc.insert((*key).to_owned(), Value::Bool(*value));
    }
    if !spec.hosts.is_empty() {
        // Typed lines (a validated label and an address) appended once, on first boot;
        // `manage_etc_hosts: localhost` leaves other lines alone on later boots.
        let content: String = spec
            .hosts
            .iter()
            .map(|h| format!("{} {}\n", h.address, h.name))
            .collect();
        let entry = json!({"path": "/etc/hosts", "append": true, "content": content});
        match doc.get_mut("write_files") {
            Some(Value::Array(files)) => files.push(entry),
            _ => {
                doc.insert("write_files".to_owned(), Value::Array(vec![entry]));
            }
        }
    }

    let text = format!("#cloud-config\n{}", yaml::to_string(&doc)?);
    if text.len() > MAX_USER_DATA_BYTES {
        return Err(SeedError::Invalid(format!(
            "rendered user-data is {} bytes, more than the {MAX_USER_DATA_BYTES}-byte limit",
            text.len()
        )));
    }
    Ok(text)
}

fn take_users(map: &mut Map<String, Value>) -> Vec<Value> {
    match map.remove("users") {
        Some(Value::Array(users)) => users,
        // check_source has refused any other shape.
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn deep_merge_merges_maps_appends_lists_replaces_scalars() {
        let mut base = map(json!({
            "a": {"x": 1, "y": [1], "z": {"deep": true}},
            "list": [1, 2],
            "scalar": "base",
            "typechange": {"k": 1},
        }));
        deep_merge(
            &mut base,
            map(json!({
                "a": {"y": [2], "z": {"deeper": false}, "new": null},
                "list": [3],
                "scalar": "overlay",
                "typechange": [1],
                "added": 5,
            })),
        );
        assert_eq!(
            Value::Object(base),
            json!({
                "a": {"x": 1, "y": [1, 2], "z": {"deep": true, "deeper": false}, "new": null},
                "list": [1, 2, 3],
                "scalar": "overlay",
                "typechange": [1],
                "added": 5,
            })
        );
    }

    #[test]
    fn entry_names_follow_cloud_init() {
        let names = |v: Value| entry_names(&v, Source::User).unwrap();
        assert_eq!(names(json!("a, b,,c ")), ["a", "b", "c"]);
        assert_eq!(names(json!({"name": " ops "})), ["ops"]);
        assert_eq!(names(json!({"gecos": "no name"})), ["default"]);
        assert!(entry_names(&json!(7), Source::User).is_err());
        assert!(entry_names(&json!({"name": ["x"]}), Source::User).is_err());
    }

    #[track_caller]
    fn assert_refused(value: Value, needle: &str) {
        match check_source(&map(value), Source::User) {
            Err(SeedError::Invalid(msg)) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
            }
            other => panic!("expected Invalid containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn forbidden_and_vmhost_keys() {
        for key in FORBIDDEN_KEYS {
            assert_refused(json!({ *key: "x" }), "vmhost does not allow");
        }
        assert_refused(
            json!({"ssh_pwauth": true}),
            "vmhost always sets ssh_pwauth: false",
        );
        assert_refused(
            json!({"ssh_pwauth": "no"}),
            "vmhost always sets ssh_pwauth: false",
        );
        assert_refused(
            json!({"preserve_hostname": true}),
            "preserve_hostname: false",
        );
        assert_refused(json!({"users": "ops"}), "`users` must be a list");
        assert_refused(
            json!({"users": [["nested"]]}),
            "must be a name or a mapping",
        );
        assert_refused(json!({"a": [{"k".repeat(129): 1}]}), "longer than 128");
        let ok = check_source(
            &map(json!({"ssh_pwauth": false, "users": ["a,b", {"name": "c"}]})),
            Source::User,
        );
        assert_eq!(ok.unwrap(), ["a", "b", "c"]);
    }
}
