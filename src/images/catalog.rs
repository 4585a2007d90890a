//! The image catalog: which UCloud application (`name`, `version`) boots from which base image.
//!
//! The catalog is a TOML file with one `[[image]]` table per entry; `images/catalog.toml` is
//! compiled in ([`Catalog::embedded`]) and an operator may point vmhost at another file
//! ([`Catalog::load`]). Parsing is strict (`deny_unknown_fields`) and every semantic check runs
//! in [`Catalog::parse`], so a typo fails at startup, not at the first job that needs the image.
//!
//! A source (`disk`, `kernel`, `initrd`) is one of:
//! - `{ path = "dir/file" }`: built locally; relative paths are relative to the image dir;
//! - `{ url = "https://…", sha256 = "<64 hex>" }`: downloaded once into the cache, pinned by hash;
//! - `{ blank = true }` (only for `disk`, only with `format = "raw"`): an all-zero raw disk of
//!   `min_disk_gib` GiB that the cache creates itself. It exists because every VM disk is a qcow2
//!   overlay over a base, and a guest that brings its whole system in the initrd (busybox-tiny)
//!   still needs some base. Sizing it by `min_disk_gib` keeps one number in the catalog and
//!   guarantees the overlay (grown to at least `min_disk_gib`) is never smaller than its base.
//!
//! This module is pure: no filesystem access except reading the file in [`Catalog::load`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ImageError;

/// The shipped catalog, compiled into the binary.
const EMBEDDED: &str = include_str!("../../images/catalog.toml");

/// Disk formats the backend can put under a qcow2 overlay (`qemu-img` names).
const FORMATS: [&str; 2] = ["qcow2", "raw"];

/// Largest accepted `min_disk_gib` (64 TiB); keeps byte sizes far from overflow.
const MAX_DISK_GIB: u64 = 1 << 16;

/// All images this host can boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    pub images: Vec<ImageEntry>,
}

/// How the guest gets from power-on to its kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    /// Direct kernel boot: QEMU loads `kernel` and `initrd` with `cmdline`.
    Kernel,
    /// The disk carries its own bootloader.
    Disk,
}

/// Where one file of an image comes from. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSource")]
pub enum ImageSource {
    /// A local file; relative to the image dir unless absolute.
    Path(PathBuf),
    /// Downloaded once and verified; `sha256` is lowercase hex.
    Url { url: String, sha256: String },
    /// An all-zero raw disk of the entry's `min_disk_gib`, created by the cache.
    Blank,
}

/// One bootable image, as one UCloud application version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    /// UCloud application name.
    pub name: String,
    /// UCloud application version.
    pub version: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    /// The user the job's SSH key is installed for.
    pub login_user: String,
    /// Smallest disk the image works with; also the size of a blank base disk.
    pub min_disk_gib: u64,
    /// Format of `disk` as `qemu-img` names it: `qcow2` or `raw`.
    pub format: String,
    pub disk: ImageSource,
    pub boot: BootKind,
    #[serde(default)]
    pub kernel: Option<ImageSource>,
    #[serde(default)]
    pub initrd: Option<ImageSource>,
    /// Kernel command line for `boot = "kernel"`; empty when absent.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Whether the guest runs cloud-init. vmhost attaches a seed either way; this tells tests
    /// and operators whether to expect the seed to be applied.
    pub cloud_init: bool,
}

/// The file's top level: `[[image]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    image: Vec<ImageEntry>,
}

/// A source table as written. A flat struct rather than an untagged enum so that a wrong
/// combination gets a precise message instead of serde's "did not match any variant".
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    path: Option<PathBuf>,
    url: Option<String>,
    sha256: Option<String>,
    blank: Option<bool>,
}

impl TryFrom<RawSource> for ImageSource {
    type Error = &'static str;

    /// Checks only the shape of the table; values are checked by [`ImageEntry::validate`] so
    /// that its errors can name the image.
    fn try_from(raw: RawSource) -> Result<Self, Self::Error> {
        match raw {
            RawSource {
                path: Some(path),
                url: None,
                sha256: None,
                blank: None,
            } => {
                if path.as_os_str().is_empty() {
                    return Err("`path` must not be empty");
                }
                Ok(ImageSource::Path(path))
            }
            RawSource {
                path: None,
                url: Some(url),
                sha256: Some(sha256),
                blank: None,
            } => {
                // Normalised because the hash is also the cache file name.
                Ok(ImageSource::Url {
                    url,
                    sha256: sha256.to_ascii_lowercase(),
                })
            }
            RawSource {
                path: None,
                url: Some(_),
                sha256: None,
                blank: None,
            } => Err("a `url` source needs a `sha256`"),
            RawSource {
                path: None,
                url: None,
                sha256: None,
                blank: Some(true),
            } => Ok(ImageSource::Blank),
            RawSource {
                path: None,
                url: None,
                sha256: None,
                blank: Some(false),
            } => Err("`blank` can only be true; use `path` or `url` for a real disk"),
            RawSource {
                url: None,
                sha256: Some(_),
                ..
            } => Err("`sha256` is only used together with `url`"),
            _ => Err("a source sets exactly one of `path`, `url` (with `sha256`) or `blank`"),
        }
    }
}

impl Catalog {
    /// Parses and validates a catalog.
    pub fn parse(toml: &str) -> Result<Catalog, ImageError> {
        let file: CatalogFile =
            toml::from_str(toml).map_err(|err| ImageError::ParseCatalog { err })?;
        let mut seen = HashSet::new();
        for entry in &file.image {
            entry.validate()?;
            if !seen.insert((entry.name.as_str(), entry.version.as_str())) {
                return Err(ImageError::Duplicate {
                    name: entry.name.clone(),
                    version: entry.version.clone(),
                });
            }
        }
        Ok(Catalog { images: file.image })
    }

    /// The catalog shipped in `images/catalog.toml`.
    pub fn embedded() -> Catalog {
        // Cannot fail at runtime: `tests::shipped_catalog_parses` parses this very string.
        Catalog::parse(EMBEDDED).expect("the embedded images/catalog.toml is valid")
    }

    /// Reads `path`, or returns the embedded catalog when no path is configured.
    pub fn load(path: Option<&Path>) -> Result<Catalog, ImageError> {
        let Some(path) = path else {
            return Ok(Catalog::embedded());
        };
        let text = std::fs::read_to_string(path).map_err(|err| ImageError::ReadCatalog {
            path: path.to_owned(),
            err,
        })?;
        Catalog::parse(&text)
    }

    pub fn find(&self, name: &str, version: &str) -> Option<&ImageEntry> {
        self.images
            .iter()
            .find(|e| e.name == name && e.version == version)
    }

    pub fn entries(&self) -> &[ImageEntry] {
        &self.images
    }
}

impl ImageEntry {
    /// `name:version`, as errors and logs show it.
    pub fn label(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }

    /// Semantic checks of one entry. [`Catalog::parse`] runs them; they are public so that an
    /// entry built in code can be held to the same rules.
    pub fn validate(&self) -> Result<(), ImageError> {
        let image = self.label();
        let invalid = |field, problem| ImageError::InvalidField {
            image: image.clone(),
            field,
            problem,
        };
        for (field, value) in [
            ("name", &self.name),
            ("version", &self.version),
            ("title", &self.title),
            ("login_user", &self.login_user),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        if self.min_disk_gib == 0 {
            return Err(invalid("min_disk_gib", "must be at least 1"));
        }
        if self.min_disk_gib > MAX_DISK_GIB {
            return Err(invalid("min_disk_gib", "must be at most 65536"));
        }
        if !FORMATS.contains(&self.format.as_str()) {
            return Err(ImageError::UnsupportedFormat {
                image,
                format: self.format.clone(),
            });
        }
        if self.disk == ImageSource::Blank && self.format != "raw" {
            return Err(invalid("disk", "can only be blank with format = \"raw\""));
        }
        let sources = [
            ("disk", Some(&self.disk)),
            ("kernel", self.kernel.as_ref()),
            ("initrd", self.initrd.as_ref()),
        ];
        for (field, source) in sources {
            match source {
                Some(ImageSource::Url { url, sha256 }) => {
                    check_url_source(&image, field, url, sha256)?
                }
                Some(ImageSource::Blank) if field != "disk" => {
                    return Err(invalid(field, "cannot be blank; only `disk` can"));
                }
                _ => {}
            }
        }
        match self.boot {
            BootKind::Kernel => {
                if self.kernel.is_none() {
                    return Err(ImageError::MissingBootFile {
                        image,
                        field: "kernel",
                    });
                }
                if self.initrd.is_none() {
                    return Err(ImageError::MissingBootFile {
                        image,
                        field: "initrd",
                    });
                }
            }
            BootKind::Disk => {
                // A kernel next to a disk-booted image would be silently ignored; refuse it so
                // the author notices the entry does not do what it says.
                let present = [
                    ("kernel", self.kernel.is_some()),
                    ("initrd", self.initrd.is_some()),
                    ("cmdline", self.cmdline.is_some()),
                ];
                if let Some((field, _)) = present.into_iter().find(|(_, set)| *set) {
                    return Err(ImageError::UnusedBootField { image, field });
                }
            }
        }
        Ok(())
    }
}

fn check_url_source(
    image: &str,
    field: &'static str,
    url: &str,
    sha256: &str,
) -> Result<(), ImageError> {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageError::InvalidSha256 {
            image: image.to_owned(),
            field,
            value: sha256.to_owned(),
        });
    }
    let ok = reqwest::Url::parse(url).is_ok_and(|u| {
        matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
    });
    if !ok {
        return Err(ImageError::InvalidUrl {
            image: image.to_owned(),
            field,
            url: url.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
