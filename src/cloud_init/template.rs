//! Operator templates: the defaults every VM's `user-data` starts from. Read once at start-up
//! (the only file I/O of `cloud_init`) and checked then, so an operator mistake stops the daemon
//! instead of failing each job. `cloud-init/README.md` is the operator's documentation.

use std::path::Path;

use serde_json::{Map, Value};

use super::user_data::{check_source, Source};
use super::yaml::{kind_of, parse_user_cloud_config};
use super::{SeedError, SeedTemplates};

/// The default template, compiled in so a vmhost without a template directory still works.
const DEFAULT_USER_DATA: &str = include_str!("../../cloud-init/user-data.yaml");

/// Loads `user-data.yaml` or `user-data.json` from `dir` (exactly one of them must exist), or the
/// built-in default with `None`.
pub fn load_templates(dir: Option<&Path>) -> Result<SeedTemplates, SeedError> {
    let Some(dir) = dir else {
        return parse_template(DEFAULT_USER_DATA, false);
    };
    let yaml_path = dir.join("user-data.yaml");
    let json_path = dir.join("user-data.json");
    let path = match (yaml_path.is_file(), json_path.is_file()) {
        (true, true) => {
            return Err(SeedError::TemplateAmbiguous {
                dir: dir.to_owned(),
            })
        }
        (false, false) => {
            return Err(SeedError::TemplateMissing {
                dir: dir.to_owned(),
            })
        }
        (true, false) => yaml_path,
        (false, true) => json_path,
    };
    let text = std::fs::read_to_string(&path).map_err(|err| SeedError::TemplateRead {
        path: path.clone(),
        err,
    })?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    parse_template(&text, is_json).map_err(|err| SeedError::Template {
        path,
        err: Box::new(err),
    })
}

/// Parses and checks template text: the same reader and the same key policy as user data, so a
/// template can hold nothing a user could not (except user names a user may not reuse).
pub(crate) fn parse_template(text: &str, is_json: bool) -> Result<SeedTemplates, SeedError> {
    let user_data = if is_json {
        match serde_json::from_str(text).map_err(SeedError::Json)? {
            Value::Object(map) => map,
            other => {
                return Err(SeedError::Invalid(format!(
                    "template must be a mapping, not {}",
                    kind_of(&other)
                )))
            }
        }
    } else {
        parse_user_cloud_config(text)?
    };
    check_source(&user_data, Source::Template)?;
    Ok(SeedTemplates { user_data })
}

impl SeedTemplates {
    /// No operator defaults at all; mostly for tests and embedding.
    #[must_use]
    pub fn empty() -> Self {
        SeedTemplates {
            user_data: Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn default_template_loads_and_is_sensible() {
        let t = load_templates(None).unwrap();
        assert_eq!(t.user_data.get("ssh_pwauth"), Some(&json!(false)));
        assert_eq!(t.user_data.get("disable_root"), Some(&json!(true)));
        assert_eq!(t.user_data.get("package_update"), Some(&json!(false)));
        assert!(t
            .user_data
            .get("final_message")
            .and_then(Value::as_str)
            .is_some_and(|m| m.contains("vmhost")));
    }

    #[test]
    fn loads_yaml_or_json_from_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("user-data.yaml"),
            "#cloud-config\npackage_update: true\n",
        )
        .unwrap();
        let t = load_templates(Some(dir.path())).unwrap();
        assert_eq!(Value::Object(t.user_data), json!({"package_update": true}));

        std::fs::write(dir.path().join("user-data.json"), "{}").unwrap();
        assert!(matches!(
            load_templates(Some(dir.path())),
            Err(SeedError::TemplateAmbiguous { .. })
        ));

        std::fs::remove_file(dir.path().join("user-data.yaml")).unwrap();
        std::fs::write(dir.path().join("user-data.json"), r#"{"runcmd": ["true"]}"#).unwrap();
        let t = load_templates(Some(dir.path())).unwrap();
        assert_eq!(Value::Object(t.user_data), json!({"runcmd": ["true"]}));
    }

    #[test]
    fn template_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_templates(Some(dir.path())),
            Err(SeedError::TemplateMissing { .. })
        ));

        let path = dir.path().join("user-data.yaml");
        for (text, inner) in [
            ("hostname: all-the-same\n", "Invalid"),
            ("ssh_pwauth: true\n", "Invalid"),
            ("users: root\n", "Invalid"),
            ("a: [1\n", "Yaml"),
        ] {
            std::fs::write(&path, text).unwrap();
            match load_templates(Some(dir.path())) {
                Err(SeedError::Template { path: p, err }) => {
                    assert_eq!(p, path);
                    assert!(format!("{err:?}").starts_with(inner), "{text:?}: {err:?}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::write(dir.path().join("user-data.json"), "[1]").unwrap();
        assert!(matches!(
            load_templates(Some(dir.path())),
            Err(SeedError::Template { .. })
        ));
    }

    #[test]
    fn unreadable_template_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        // Invalid UTF-8 makes read_to_string fail without needing permissions tricks (tests run as root).
        std::fs::write(dir.path().join("user-data.yaml"), [0xff, 0xfe, 0x00]).unwrap();
        assert!(matches!(
            load_templates(Some(dir.path())),
            Err(SeedError::TemplateRead { .. })
        ));
    }
}
