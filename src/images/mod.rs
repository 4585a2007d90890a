//! Base images: which ones exist ([`catalog`]) and how they get onto this host ([`cache`]).
//!
//! A UCloud application (`name`, `version`) maps to one [`ImageEntry`] of the catalog. The entry
//! names its base disk and, for direct kernel boot, a kernel and initrd. Each of these is a
//! [`ImageSource`]: a file built locally by `images/build-images.sh`, a file downloaded once and
//! pinned by its sha256, or a blank raw disk the cache makes itself.
//!
//! Invariants:
//! - A catalog that parsed is valid: no duplicate `(name, version)`, kernel boot has a kernel
//!   and an initrd, hashes are 64 hex digits, URLs are http(s), formats are ones `qemu-img`
//!   and the domain XML support.
//! - Base images are never written after they are in place. Every VM writes into its own qcow2
//!   overlay; the files the cache creates are made read-only (0444) to keep it that way.
//!
//! The catalog is pure (string in, validated value out). The cache is the only part that touches
//! the filesystem and the network.

pub mod cache;
pub mod catalog;

use std::path::PathBuf;

pub use cache::{ImageCache, LocalImage};
pub use catalog::{BootKind, Catalog, ImageEntry, ImageSource};

/// Errors of the image catalog and the image cache.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("failed to read image catalog {path}")]
    ReadCatalog {
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    /// TOML syntax, an unknown or missing field, or a malformed source table. The source carries
    /// the line and column.
    #[error("invalid image catalog")]
    ParseCatalog {
        #[source]
        err: toml::de::Error,
    },
    #[error("image {name}:{version} is listed more than once")]
    Duplicate { name: String, version: String },
    #[error("image {image}: `{field}` {problem}")]
    InvalidField {
        image: String,
        field: &'static str,
        problem: &'static str,
    },
    #[error("image {image}: boot = \"kernel\" needs `{field}`")]
    MissingBootFile { image: String, field: &'static str },
    #[error("image {image}: `{field}` is only used with boot = \"kernel\"")]
    UnusedBootField { image: String, field: &'static str },
    #[error("image {image}: `{field}` has sha256 {value:?}, which is not 64 hex digits")]
    InvalidSha256 {
        image: String,
        field: &'static str,
        value: String,
    },
    #[error("image {image}: `{field}` has url {url:?}, which is not an http or https URL")]
    InvalidUrl {
        image: String,
        field: &'static str,
        url: String,
    },
    #[error("image {image}: format {format:?} is not supported (use \"qcow2\" or \"raw\")")]
    UnsupportedFormat { image: String, format: String },

    #[error(
        "image file {path} does not exist; build the local images with images/build-images.sh"
    )]
    MissingFile { path: PathBuf },
    #[error("image file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        err: std::io::Error,
    },
    #[error("failed to download {url}")]
    Download {
        url: String,
        #[source]
        err: reqwest::Error,
    },
    #[error("download of {url} failed with HTTP status {status}")]
    HttpStatus { url: String, status: u16 },
    #[error("checksum mismatch for {url}: expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        url: String,
        expected: String,
        actual: String,
    },
}
