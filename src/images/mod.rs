//! TEMPORARY stand-in until the catalog lands.
use std::path::{Path, PathBuf};
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind { Disk, Kernel }
#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry { pub name: String, pub version: String, pub title: String, pub description: String, pub login_user: String, pub min_disk_gib: u64, pub format: String, pub boot: BootKind, pub cmdline: Option<String>, pub cloud_init: bool }
#[derive(Debug, Clone, Default)]
pub struct Catalog { pub images: Vec<ImageEntry> }
#[derive(Debug, thiserror::Error)]
pub enum ImageError { #[error("x")] X }
impl Catalog {
    pub fn load(_p: Option<&Path>) -> Result<Catalog, ImageError> { Ok(Catalog { images: vec![ImageEntry { name: "debian-cloud".into(), version: "12".into(), title: "t".into(), description: "d".into(), login_user: "debian".into(), min_disk_gib: 3, format: "qcow2".into(), boot: BootKind::Kernel, cmdline: Some("console=ttyS0".into()), cloud_init: true }] }) }
    pub fn find(&self, name: &str, version: &str) -> Option<&ImageEntry> { self.images.iter().find(|i| i.name == name && i.version == version) }
}
#[derive(Debug, Clone)]
pub struct LocalImage { pub disk: PathBuf, pub format: String, pub kernel: Option<PathBuf>, pub initrd: Option<PathBuf> }
#[derive(Debug, Clone)]
pub struct ImageCache { dir: PathBuf }
impl ImageCache {
    pub fn new(dir: PathBuf, _c: PathBuf) -> Self { ImageCache { dir } }
    pub async fn ensure_local(&self, e: &ImageEntry) -> Result<LocalImage, ImageError> { Ok(LocalImage { disk: self.dir.join(&e.name), format: e.format.clone(), kernel: None, initrd: None }) }
}
