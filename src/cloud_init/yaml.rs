//! The two edges where seed data meets YAML text.
//!
//! * Writing: [`to_string`] emits pretty JSON that YAML parsers (cloud-init uses PyYAML, a YAML
//!   1.1 parser) read back as exactly the same structure. Plain `serde_json` output is not quite
//!   that: PyYAML rejects the whole document on a raw DEL or C1 control character, folds raw
//!   U+0085/U+2028/U+2029 into spaces, and reads `1e100` as a string. The [`YamlSafe`] formatter
//!   escapes those characters as `\uXXXX` (the same escape in JSON and YAML) and writes floats as
//!   `1.0e+100`. Everything else stays plain `serde_json`.
//! * Reading: [`parse_user_cloud_config`] turns a user's cloud-config text (YAML or JSON, with or
//!   without the `#cloud-config` line) into a JSON object, refusing what JSON cannot carry
//!   (non-string keys, tags, NaN) instead of guessing.

use std::io;

use serde::Serialize;
use serde_json::ser::{Formatter, PrettyFormatter};
use serde_json::{Map, Value};

use super::validate::shown;
use super::{SeedError, MAX_USER_DATA_BYTES};

/// Serialises `value` as pretty JSON that reads back identically as YAML.
pub(crate) fn to_string<T: Serialize + ?Sized>(value: &T) -> Result<String, SeedError> {
    let mut out = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, YamlSafe(PrettyFormatter::new()));
    value.serialize(&mut ser).map_err(SeedError::Encode)?;
    out.push(b'\n');
    // serde_json only writes UTF-8, and YamlSafe only adds ASCII escapes.
    Ok(String::from_utf8(out).expect("serde_json output is UTF-8"))
}

/// Characters that must not appear raw in a YAML document: non-printable for YAML (DEL, C1
/// controls, U+FFFE/U+FFFF) or line breaks in YAML 1.1 (NEL, LS, PS), plus the BOM, which some
/// readers strip. Controls below U+0020, `"` and `\` are already escaped by serde_json.
fn needs_escape(c: char) -> bool {
    matches!(
        c,
        '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
    )
}

/// A `serde_json` formatter: [`PrettyFormatter`] with YAML-safe strings and floats.
struct YamlSafe<'a>(PrettyFormatter<'a>);

impl Formatter for YamlSafe<'_> {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while let Some(pos) = rest.find(needs_escape) {
            w.write_all(&rest.as_bytes()[..pos])?;
            let c = rest[pos..].chars().next().unwrap_or_default();
            // All escaped characters are in the BMP, so one \uXXXX suffices.
            write!(w, "\\u{:04x}", u32::from(c))?;
            rest = &rest[pos + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(yaml11_float(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(yaml11_float(f64::from(value)).as_bytes())
    }

    // The rest is PrettyFormatter's layout.
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
}

/// A finite float in a spelling both JSON and YAML 1.1 read as that float: YAML 1.1 wants a `.`
/// in the mantissa and a sign on the exponent (`1e100` is a string to PyYAML).
fn yaml11_float(value: f64) -> String {
    if !value.is_finite() {
        // serde_json writes non-finite floats as null before reaching the formatter.
        return "null".to_owned();
    }
    // Debug is the shortest round-tripping form; it uses an exponent only for very large/small.
    let text = format!("{value:?}");
    let (mantissa, exponent) = match text.split_once('e') {
        Some((m, e)) => (m.to_owned(), Some(e)),
        None => (text.clone(), None),
    };
    let mantissa = if mantissa.contains('.') {
        mantissa
    } else {
        format!("{mantissa}.0")
    };
    match exponent {
        Some(e) if e.starts_with('-') => format!("{mantissa}e{e}"),
        Some(e) => format!("{mantissa}e+{e}"),
        None => mantissa,
    }
}

/// Header lines of the user-data formats cloud-init knows other than `#cloud-config`: each is a
/// different thing (a script, an include list, a template…) that vmhost cannot merge.
const OTHER_FORMATS: &[&str] = &[
    "#!",
    "#include",
    "#cloud-config-archive",
    "#cloud-config-jsonp",
    "#cloud-boothook",
    "#part-handler",
    "#upstart-job",
    "## template:",
    "content-type:",
    "mime-version:",
];

/// Reads a user's cloud-config: an optional `#cloud-config` first line, then a YAML (or JSON)
/// mapping. An empty document means "nothing to add" and gives an empty map. Capped at
/// [`MAX_USER_DATA_BYTES`].
///
/// Read as YAML 1.2: see the module doc of `cloud_init` for how that differs from cloud-init.
pub fn parse_user_cloud_config(text: &str) -> Result<Map<String, Value>, SeedError> {
    if text.len() > MAX_USER_DATA_BYTES {
        return Err(SeedError::Invalid(format!(
            "user data is {} bytes, more than the {MAX_USER_DATA_BYTES}-byte limit",
            text.len()
        )));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first_line = text.lines().next().unwrap_or_default().trim_end();
    let first_lower = first_line.to_ascii_lowercase();
    if first_lower != "#cloud-config" {
        if let Some(kind) = OTHER_FORMATS.iter().find(|f| first_lower.starts_with(*f)) {
            return Err(SeedError::Invalid(format!(
                "user data starting with {} is not supported: only #cloud-config (a YAML \
                 mapping) can be merged; run scripts with `runcmd` instead",
                shown(kind)
            )));
        }
    }

    let body = text.trim_start();
    let value: Value = if body.starts_with('{') {
        // Looks like JSON: serde_json's errors are the clearer ones for JSON input, but a YAML
        // flow mapping (`{a: 1}`) is also valid cloud-config.
        match serde_json::from_str(body) {
            Ok(value) => value,
            Err(json_err) => yaml_value(text).map_err(|_| SeedError::Json(json_err))?,
        }
    } else {
        yaml_value(text)?
    };
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Map::new()),
        other => Err(SeedError::Invalid(format!(
            "user data must be a mapping of cloud-config keys, not {}",
            kind_of(&other)
        ))),
    }
}

fn yaml_value(text: &str) -> Result<Value, SeedError> {
    if let Some(tag) = unsupported_tag(text) {
        return Err(SeedError::Invalid(format!(
            "YAML tag {} is not supported (for file contents use write_files `encoding: b64`); \
             if it is part of a string, rephrase it",
            shown(&tag)
        )));
    }
    // serde_yaml bounds recursion depth and alias expansion ("billion laughs") itself.
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(text).map_err(SeedError::Yaml)?;
    // `<<: *anchor` merge keys are YAML 1.1, which cloud-init's PyYAML applies.
    yaml.apply_merge().map_err(SeedError::Yaml)?;
    yaml_to_json(yaml, "")
}

/// Core-schema tags that serde_yaml resolves the way PyYAML does.
const SUPPORTED_TAGS: &[&str] = &["str", "int", "bool", "float", "null", "map", "seq"];

/// Finds a YAML tag serde_yaml would silently drop (`!!binary` becomes its base64 text, `!!set`
/// a mapping, a global tag on a quoted scalar vanishes) while PyYAML would honour it. serde_yaml
/// does not expose tags, so this scans the text: a `!` starting a token (after whitespace or a
/// flow indicator) followed by a tag name, `!<…>` or a `%TAG` directive. It can also refuse such
/// a sequence inside a string; the error message says so.
fn unsupported_tag(text: &str) -> Option<String> {
    if text.lines().any(|l| l.starts_with("%TAG")) {
        return Some("%TAG".to_owned());
    }
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('!') {
        let at_token_start = i == 0
            || matches!(
                bytes[i - 1],
                b' ' | b'\t' | b'\n' | b'\r' | b'[' | b'{' | b','
            );
        if !at_token_start {
            continue;
        }
        let rest = &text[i + 1..];
        let (prefix, name_start) = match rest.strip_prefix('!') {
            Some(after) => ("!!", after),
            None => ("!", rest),
        };
        if name_start.starts_with('<') {
            return Some(format!("{prefix}<…>"));
        }
        let name: String = name_start
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-' | ':'))
            .collect();
        let starts_with_letter = name.starts_with(|c: char| c.is_ascii_alphabetic());
        if starts_with_letter && !(prefix == "!!" && SUPPORTED_TAGS.contains(&name.as_str())) {
            return Some(format!("{prefix}{name}"));
        }
    }
    None
}

/// Converts explicitly rather than through serde, so the refusals can say where they are.
fn yaml_to_json(value: serde_yaml::Value, path: &str) -> Result<Value, SeedError> {
    use serde_yaml::Value as Y;
    let refuse = |what: String| {
        SeedError::Invalid(format!(
            "user data at {}: {what}",
            if path.is_empty() { "top level" } else { path }
        ))
    };
    Ok(match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                serde_json::Number::from_f64(f)
                    .map(Value::Number)
                    .ok_or_else(|| {
                        refuse(format!(
                            "{f} cannot be represented (NaN and infinities are not allowed)"
                        ))
                    })?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| yaml_to_json(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let Y::String(key) = k else {
                    return Err(refuse(format!(
                        "mapping keys must be strings; quote the key {}",
                        shown(serde_yaml::to_string(&k).unwrap_or_default().trim_end())
                    )));
                };
                let child = yaml_to_json(v, &format!("{path}.{key}"))?;
                map.insert(key, child);
            }
            Value::Object(map)
        }
        Y::Tagged(tagged) => {
            return Err(refuse(format!(
                "YAML tags such as {} are not supported",
                shown(&tagged.tag.to_string())
            )))
        }
    })
}

pub(crate) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse_back(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn emitted_json_is_still_json_and_reads_back_as_yaml() {
        let value = json!({
            "nasty": "\u{7f}\u{80}\u{85}\u{9f}\u{a0}\u{2028}\u{2029}\u{feff}\u{fffe}\u{ffff}\u{10ffff}é\"\\\n\t",
            "floats": [1e100, 1.5e-7, 0.1, -0.0, 1.0, 123456789.0, f64::MAX, f64::MIN_POSITIVE],
            "ints": [0, -1, u64::MAX, i64::MIN],
            "---\n#cloud-config": null,
        });
        let text = to_string(&value).unwrap();
        assert!(
            !text.contains(['\u{7f}', '\u{85}', '\u{2028}', '\u{feff}']),
            "{text}"
        );
        let as_json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(as_json, value);
        assert_eq!(parse_back(&text), value);
    }

    #[test]
    fn floats_have_a_yaml11_spelling() {
        assert_eq!(yaml11_float(1e100), "1.0e+100");
        assert_eq!(yaml11_float(1.5e-7), "1.5e-7");
        assert_eq!(yaml11_float(2.0), "2.0");
        assert_eq!(yaml11_float(-0.25), "-0.25");
        assert_eq!(yaml11_float(f64::NAN), "null");
    }

    #[test]
    fn parses_yaml_and_json_with_or_without_header() {
        let want = json!({"runcmd": ["echo hi"], "package_update": true});
        for text in [
            "#cloud-config\nruncmd:\n  - echo hi\npackage_update: true\n",
            "runcmd: [echo hi]\npackage_update: true",
            "\u{feff}#cloud-config\r\nruncmd: [echo hi]\r\npackage_update: true\r\n",
            r#"{"runcmd": ["echo hi"], "package_update": true}"#,
            "#cloud-config\n{\"runcmd\": [\"echo hi\"], \"package_update\": true}",
            "{runcmd: [echo hi], package_update: true}",
        ] {
            assert_eq!(
                Value::Object(parse_user_cloud_config(text).unwrap()),
                want,
                "{text:?}"
            );
        }
        assert!(parse_user_cloud_config("").unwrap().is_empty());
        assert!(parse_user_cloud_config("#cloud-config\n")
            .unwrap()
            .is_empty());
        assert!(parse_user_cloud_config("# just a comment\n")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn yaml12_scalars_are_read_as_documented() {
        let map =
            parse_user_cloud_config("a: yes\nb: 0644\nc: 0o644\nd: 1_000\ne: ~\nf: 1e3").unwrap();
        assert_eq!(
            Value::Object(map),
            json!({"a": "yes", "b": "0644", "c": 420, "d": "1_000", "e": null, "f": 1000.0})
        );
    }

    #[track_caller]
    fn assert_invalid(text: &str, needle: &str) {
        match parse_user_cloud_config(text) {
            Err(SeedError::Invalid(msg)) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
            }
            other => panic!("{text:?}: expected Invalid containing {needle:?}, got {other:?}"),
        }
    }

    #[test]
    fn refuses_what_is_not_a_cloud_config_mapping() {
        assert_invalid("- a\n- b", "not a list");
        assert_invalid("just text", "not a string");
        assert_invalid("42", "not a number");
        assert_invalid("#!/bin/bash\necho hi", "\"#!\"");
        assert_invalid("#include\nhttp://example.com/x", "#include");
        assert_invalid("#cloud-config-archive\n- type: x", "#cloud-config-archive");
        assert_invalid("## template: jinja\n#cloud-config\na: 1", "## template:");
        assert_invalid("Content-Type: multipart/mixed\n", "content-type:");
        assert_invalid("1: one", "mapping keys must be strings");
        assert_invalid("a:\n  [1, 2]: x", "at .a: mapping keys must be strings");
        assert_invalid("a: !!binary aGVsbG8=", "YAML tag \"!!binary\"");
        assert_invalid(
            "write_files:\n- content: !!binary |\n    aGVsbG8=",
            "!!binary",
        );
        assert_invalid("a: !!set {x, y}", "!!set");
        assert_invalid("a: [!!timestamp 2001-12-14]", "!!timestamp");
        assert_invalid(
            "a: !!python/object:os.system x",
            "!!python/object:os.system",
        );
        assert_invalid("a: !<tag:yaml.org,2002:binary> aGk=", "!<…>");
        assert_invalid("a: !custom x", "\"!custom\"");
        assert_invalid("a: {b: !custom 'x'}", "\"!custom\"");
        assert_invalid("%TAG !e! tag:example.com,2000:\n---\na: !e!foo x", "%TAG");
        assert_invalid("a: [1, .nan]", "at .a[1]");
        assert_invalid("a: .inf", "NaN and infinities");
        assert_invalid(
            &format!("a: \"{}\"", "x".repeat(MAX_USER_DATA_BYTES)),
            "byte limit",
        );
    }

    #[test]
    fn harmless_tags_bangs_and_merge_keys_are_read_like_pyyaml() {
        let map = parse_user_cloud_config(
            "a: !!str 0644\nb: !!int 7\nc: \"hi!\"\nruncmd: ['[ ! -f x ] && echo hi!!', 'sudo !!']\n\
             base: &b {x: 1, y: 1}\nd:\n  <<: *b\n  y: 2\ne: \"#!/bin/sh\"\n",
        )
        .unwrap();
        assert_eq!(
            Value::Object(map),
            json!({
                "a": "0644", "b": 7, "c": "hi!",
                "runcmd": ["[ ! -f x ] && echo hi!!", "sudo !!"],
                "base": {"x": 1, "y": 1}, "d": {"x": 1, "y": 2}, "e": "#!/bin/sh",
            })
        );
    }

    #[test]
    fn syntax_errors_carry_their_source() {
        let err = parse_user_cloud_config("a: [1, 2\nb: 3").unwrap_err();
        assert!(matches!(err, SeedError::Yaml(_)), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
        let err = parse_user_cloud_config("{\"a\": 1,}}").unwrap_err();
        assert!(matches!(err, SeedError::Json(_)), "{err:?}");
        let err = parse_user_cloud_config("a: 1\n---\nb: 2").unwrap_err();
        assert!(matches!(err, SeedError::Yaml(_)), "{err:?}");
        let err = parse_user_cloud_config("a: 1\na: 2").unwrap_err();
        assert!(matches!(err, SeedError::Yaml(_)), "duplicate keys: {err:?}");
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let err = parse_user_cloud_config(&text).unwrap_err();
        assert!(matches!(err, SeedError::Yaml(_)), "{err:?}");
    }
}
