//! Parsing and validation of the image catalog, one test per rule.
use super::*;

const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A valid kernel-boot entry; tests replace or append lines to break it.
fn entry(extra: &str) -> String {
    format!(
        r#"
[[image]]
name = "x"
version = "1"
title = "X"
login_user = "root"
min_disk_gib = 1
cloud_init = false
{extra}
"#
    )
}

fn kernel_entry(disk: &str) -> String {
    entry(&format!(
        "format = \"raw\"\nboot = \"kernel\"\ndisk = {disk}\n\
         kernel = {{ path = \"k\" }}\ninitrd = {{ path = \"i\" }}\ncmdline = \"console=ttyS0\""
    ))
}

fn disk_entry(format: &str, disk: &str) -> String {
    entry(&format!(
        "format = \"{format}\"\nboot = \"disk\"\ndisk = {disk}"
    ))
}

#[track_caller]
fn parse_err(toml: &str) -> ImageError {
    match Catalog::parse(toml) {
        Ok(c) => panic!("expected an error, parsed {c:?}"),
        Err(e) => e,
    }
}

/// The message of a serde-level error (its source), which names line and column.
#[track_caller]
fn parse_msg(toml: &str) -> String {
    match parse_err(toml) {
        ImageError::ParseCatalog { err } => err.to_string(),
        other => panic!("expected ParseCatalog, got {other:?}"),
    }
}

#[test]
fn shipped_catalog_parses() {
    let catalog = Catalog::parse(EMBEDDED).unwrap();
    let debian = catalog.find("debian-cloud", "12").unwrap();
    assert_eq!(debian.format, "qcow2");
    assert_eq!(debian.boot, BootKind::Kernel);
    assert_eq!(
        debian.disk,
        ImageSource::Path("debian12-cloud/disk.qcow2".into())
    );
    assert!(debian.cloud_init);
    let tiny = catalog.find("busybox-tiny", "1").unwrap();
    assert_eq!(tiny.disk, ImageSource::Blank);
    assert_eq!(tiny.format, "raw");
    assert_eq!(tiny.login_user, "root");
    assert_eq!(tiny.cmdline.as_deref(), Some("console=ttyS0"));
    assert!(!tiny.cloud_init);
    assert_eq!(Catalog::embedded(), catalog);
    assert_eq!(Catalog::load(None).unwrap(), catalog);
}

#[test]
fn parses_every_source_kind() {
    let url = format!(
        r#"{{ url = "https://example.org/d.img", sha256 = "{}" }}"#,
        SHA.to_uppercase()
    );
    let by_url = kernel_entry(&url);
    let by_path =
        disk_entry("qcow2", r#"{ path = "/abs/disk.qcow2" }"#).replace(r#""1""#, r#""2""#);
    let blank = entry(
        r#"format = "raw"
boot = "kernel"
disk = { blank = true }
kernel = { path = "k" }
initrd = { path = "i" }"#,
    )
    .replace(r#""1""#, r#""3""#);
    let toml = [by_url, by_path, blank].concat();
    let catalog = Catalog::parse(&toml).unwrap();
    assert_eq!(catalog.entries().len(), 3);
    let e1 = catalog.find("x", "1").unwrap();
    assert_eq!(
        e1.disk,
        ImageSource::Url {
            url: "https://example.org/d.img".into(),
            sha256: SHA.into()
        }
    );
    assert_eq!(e1.kernel, Some(ImageSource::Path("k".into())));
    assert_eq!(e1.description, "");
    let e2 = catalog.find("x", "2").unwrap();
    assert_eq!(e2.disk, ImageSource::Path("/abs/disk.qcow2".into()));
    assert_eq!(e2.boot, BootKind::Disk);
    let e3 = catalog.find("x", "3").unwrap();
    assert_eq!(e3.disk, ImageSource::Blank);
    assert_eq!(e3.cmdline, None);
    assert!(catalog.find("x", "4").is_none());
    assert!(catalog.find("y", "1").is_none());
}

#[test]
fn empty_catalog_is_valid() {
    assert!(Catalog::parse("").unwrap().entries().is_empty());
}

#[test]
fn rejects_duplicate_name_and_version() {
    let one = disk_entry("qcow2", "{ path = \"d\" }");
    let err = parse_err(&format!("{one}{one}"));
    let ImageError::Duplicate { name, version } = err else {
        panic!("expected Duplicate, got {err:?}");
    };
    assert_eq!((name.as_str(), version.as_str()), ("x", "1"));
    // The same name with another version is a different application version.
    Catalog::parse(&format!("{one}{}", one.replace("\"1\"", "\"2\""))).unwrap();
}

#[test]
fn kernel_boot_needs_kernel_and_initrd() {
    let base = "format = \"raw\"\nboot = \"kernel\"\ndisk = { path = \"d\" }";
    let err = parse_err(&entry(&format!("{base}\ninitrd = {{ path = \"i\" }}")));
    assert!(
        matches!(
            err,
            ImageError::MissingBootFile {
                field: "kernel",
                ..
            }
        ),
        "{err:?}"
    );
    let err = parse_err(&entry(&format!("{base}\nkernel = {{ path = \"k\" }}")));
    assert!(
        matches!(
            err,
            ImageError::MissingBootFile {
                field: "initrd",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn disk_boot_rejects_kernel_fields() {
    for (line, field) in [
        ("kernel = { path = \"k\" }", "kernel"),
        ("initrd = { path = \"i\" }", "initrd"),
        ("cmdline = \"quiet\"", "cmdline"),
    ] {
        let err = parse_err(&format!(
            "{}{line}\n",
            disk_entry("qcow2", "{ path = \"d\" }")
        ));
        assert!(
            matches!(err, ImageError::UnusedBootField { field: f, .. } if f == field),
            "{err:?}"
        );
    }
}

#[test]
fn rejects_bad_sha256() {
    for bad in [
        "abc",
        &SHA[1..],
        &format!("{}g", &SHA[1..]),
        &format!("{SHA}0"),
    ] {
        let err = parse_err(&kernel_entry(&format!(
            "{{ url = \"https://h/d\", sha256 = \"{bad}\" }}"
        )));
        assert!(
            matches!(&err, ImageError::InvalidSha256 { field: "disk", value, .. } if value == bad),
            "{err:?}"
        );
    }
}

#[test]
fn rejects_non_http_urls() {
    for bad in [
        "ftp://h/d",
        "file:///etc/passwd",
        "not a url",
        "https://",
        "/local/path",
    ] {
        let toml = kernel_entry("{ path = \"d\" }").replace(
            "kernel = { path = \"k\" }",
            &format!("kernel = {{ url = \"{bad}\", sha256 = \"{SHA}\" }}"),
        );
        let err = parse_err(&toml);
        assert!(
            matches!(err, ImageError::InvalidUrl { field: "kernel", ref url, .. } if url == bad),
            "{err:?}"
        );
    }
    Catalog::parse(&kernel_entry(&format!(
        "{{ url = \"http://127.0.0.1:8080/d\", sha256 = \"{SHA}\" }}"
    )))
    .unwrap();
}

#[test]
fn rejects_unsupported_format() {
    let err = parse_err(&disk_entry("vmdk", "{ path = \"d\" }"));
    assert!(
        matches!(err, ImageError::UnsupportedFormat { ref format, .. } if format == "vmdk"),
        "{err:?}"
    );
    // Case matters: qemu-img does not know "QCOW2".
    let err = parse_err(&disk_entry("QCOW2", "{ path = \"d\" }"));
    assert!(
        matches!(err, ImageError::UnsupportedFormat { .. }),
        "{err:?}"
    );
}

#[test]
fn blank_is_only_a_raw_disk() {
    let err = parse_err(&disk_entry("qcow2", "{ blank = true }"));
    assert!(
        matches!(err, ImageError::InvalidField { field: "disk", .. }),
        "{err:?}"
    );
    let toml = kernel_entry("{ path = \"d\" }")
        .replace("initrd = { path = \"i\" }", "initrd = { blank = true }");
    let err = parse_err(&toml);
    assert!(
        matches!(
            err,
            ImageError::InvalidField {
                field: "initrd",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn rejects_empty_fields_and_zero_size() {
    let ok = disk_entry("qcow2", "{ path = \"d\" }");
    for (from, to, field) in [
        ("name = \"x\"", "name = \"\"", "name"),
        ("version = \"1\"", "version = \" \"", "version"),
        ("title = \"X\"", "title = \"\"", "title"),
        ("login_user = \"root\"", "login_user = \"\"", "login_user"),
        ("min_disk_gib = 1", "min_disk_gib = 0", "min_disk_gib"),
        ("min_disk_gib = 1", "min_disk_gib = 65537", "min_disk_gib"),
    ] {
        let err = parse_err(&ok.replace(from, to));
        assert!(
            matches!(err, ImageError::InvalidField { field: f, .. } if f == field),
            "{err:?}"
        );
    }
}

#[test]
fn rejects_malformed_sources() {
    for (disk, needle) in [
        ("{ path = \"d\", url = \"https://h/d\" }", "exactly one"),
        ("{ url = \"https://h/d\" }", "needs a `sha256`"),
        (
            &format!("{{ path = \"d\", sha256 = \"{SHA}\" }}"),
            "only used together with `url`",
        ),
        ("{ blank = false }", "can only be true"),
        ("{ path = \"\" }", "must not be empty"),
        ("{}", "exactly one"),
        ("{ file = \"d\" }", "unknown field `file`"),
        ("\"d\"", "invalid type"),
    ] {
        let msg = parse_msg(&disk_entry("raw", disk));
        assert!(msg.contains(needle), "{disk}: {msg}");
    }
}

#[test]
fn rejects_unknown_and_missing_fields() {
    let ok = disk_entry("qcow2", "{ path = \"d\" }");
    assert!(parse_msg(&format!("{ok}colour = \"red\"\n")).contains("unknown field `colour`"));
    let msg = parse_msg(&ok.replace("cloud_init = false", ""));
    assert!(msg.contains("missing field `cloud_init`"), "{msg}");
    assert!(
        parse_msg(&format!("[[images]]\n{}", &ok[ok.find("name").unwrap()..]))
            .contains("unknown field `images`")
    );
    assert!(parse_msg(&ok.replace("boot = \"disk\"", "boot = \"pxe\""))
        .contains("unknown variant `pxe`"));
    assert!(parse_msg("[[image]\n").contains("TOML parse error"));
}

#[test]
fn load_reads_a_file_and_names_a_missing_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, disk_entry("qcow2", "{ path = \"d\" }")).unwrap();
    assert_eq!(Catalog::load(Some(&path)).unwrap().entries().len(), 1);
    let missing = dir.path().join("nope.toml");
    let err = Catalog::load(Some(&missing)).unwrap_err();
    assert!(
        matches!(err, ImageError::ReadCatalog { ref path, .. } if *path == missing),
        "{err:?}"
    );
    assert!(err.to_string().contains("nope.toml"));
}
