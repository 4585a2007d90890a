//! The seed disk: a small FAT filesystem labelled `CIDATA` with `meta-data`, `user-data` and
//! `network-config` in its root, built in memory with `fatfs` (no external tools, no mounts).
//!
//! Invariants:
//! * deterministic: the same [`SeedFiles`] give the same bytes (fixed timestamps, volume id
//!   derived from the instance id), so a caller can compare before rewriting;
//! * FAT12 at 1 MiB for every seed `render` produces (user-data is capped at 64 KiB); larger
//!   hand-built contents get a larger image, up to [`MAX_IMAGE_BYTES`];
//! * long file names (the names are not 8.3), which cloud-init finds through blkid's
//!   `LABEL=CIDATA` + `TYPE=vfat` on a raw virtio disk.

use std::io::{self, Cursor, Write};

use fatfs::{Date, DateTime, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};
use sha2::{Digest, Sha256};

use super::{SeedError, SeedFiles};

/// The label cloud-init searches for (it also accepts lowercase), padded to FAT's 11 bytes.
const VOLUME_LABEL: [u8; 11] = *b"CIDATA     ";
const MIB: u64 = 1024 * 1024;
/// The smallest image: FAT12 with 512-byte clusters, the size `cloud-localds` recipes use.
const MIN_IMAGE_BYTES: u64 = MIB;
/// A seed is metadata, not a data disk; anything this large is a bug upstream.
pub(crate) const MAX_IMAGE_BYTES: u64 = 32 * MIB;
/// Cluster size never exceeds this below 128 MiB (fatfs' choice), so rounding every file up to
/// it over-estimates the data area.
const WORST_CLUSTER_BYTES: u64 = 4096;
/// Boot sector, two FATs and the fixed 512-entry root directory, with room to spare.
const METADATA_BYTES: u64 = 256 * 1024;

/// Builds the seed image. The caller writes it to disk and attaches it read-only.
pub fn vfat_image(files: &SeedFiles) -> Result<Vec<u8>, SeedError> {
    let entries: [(&str, &str); 3] = [
        ("meta-data", &files.meta_data),
        ("user-data", &files.user_data),
        ("network-config", &files.network_config),
    ];
    let data: u64 = entries
        .iter()
        .map(|(_, content)| {
            (content.len() as u64).div_ceil(WORST_CLUSTER_BYTES) * WORST_CLUSTER_BYTES
        })
        .sum();
    let size = (data + METADATA_BYTES).div_ceil(MIB) * MIB;
    let size = size.max(MIN_IMAGE_BYTES);
    if size > MAX_IMAGE_BYTES {
        return Err(SeedError::Invalid(format!(
            "seed files need a {size}-byte image, more than the {MAX_IMAGE_BYTES}-byte limit"
        )));
    }
    let len = usize::try_from(size)
        .map_err(|_| SeedError::Image(io::Error::other("image size overflows usize")))?;

    let mut disk = Cursor::new(vec![0u8; len]);
    let options = FormatVolumeOptions::new()
        .volume_label(VOLUME_LABEL)
        .volume_id(volume_id(&files.instance_id));
    fatfs::format_volume(&mut disk, options).map_err(SeedError::Image)?;
    {
        let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(&FIXED_TIME))
            .map_err(SeedError::Image)?;
        for (name, content) in entries {
            let mut file = fs.root_dir().create_file(name).map_err(SeedError::Image)?;
            file.write_all(content.as_bytes())
                .map_err(SeedError::Image)?;
            file.flush().map_err(SeedError::Image)?;
        }
        fs.unmount().map_err(SeedError::Image)?;
    }
    Ok(disk.into_inner())
}

/// The FAT serial number: stable per instance, distinct across instances (fatfs would otherwise
/// give every seed 1234-5678).
pub(crate) fn volume_id(instance_id: &str) -> u32 {
    let digest = Sha256::digest(instance_id.as_bytes());
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Timestamps fixed at the FAT epoch (1980-01-01 00:00), as reproducible archives do: the files'
/// dates carry no information and would otherwise make every image differ.
#[derive(Debug)]
struct FixedTime;

static FIXED_TIME: FixedTime = FixedTime;

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: self.get_current_date(),
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::path::Path;
    use std::process::Command;

    use fatfs::FatType;

    use super::*;

    fn files(user_data: &str) -> SeedFiles {
        SeedFiles {
            instance_id: "job-0b5b6a2e".to_owned(),
            meta_data: "{\"instance-id\": \"job-0b5b6a2e\", \"local-hostname\": \"job1\"}\n"
                .to_owned(),
            user_data: user_data.to_owned(),
            network_config: "{\"version\": 2, \"ethernets\": {}}\n".to_owned(),
        }
    }

    fn read_back(image: Vec<u8>) -> (Vec<(String, String)>, String, u32, FatType) {
        let fs = FileSystem::new(Cursor::new(image), FsOptions::new()).unwrap();
        let mut out = Vec::new();
        for entry in fs.root_dir().iter() {
            let entry = entry.unwrap();
            let mut content = String::new();
            entry.to_file().read_to_string(&mut content).unwrap();
            out.push((entry.file_name(), content));
        }
        (out, fs.volume_label(), fs.volume_id(), fs.fat_type())
    }

    #[test]
    fn image_round_trips_through_fatfs() {
        let f = files("#cloud-config\n{}\n");
        let image = vfat_image(&f).unwrap();
        assert_eq!(image.len() as u64, MIN_IMAGE_BYTES);
        let (entries, label, id, fat) = read_back(image);
        assert_eq!(
            entries,
            [
                ("meta-data".to_owned(), f.meta_data.clone()),
                ("user-data".to_owned(), f.user_data.clone()),
                ("network-config".to_owned(), f.network_config.clone()),
            ]
        );
        assert_eq!(label, "CIDATA");
        assert_eq!(id, volume_id("job-0b5b6a2e"));
        assert_ne!(id, 0x1234_5678);
        assert_eq!(fat, FatType::Fat12);
    }

    #[test]
    fn image_is_deterministic_and_volume_id_follows_instance() {
        let f = files("#cloud-config\n{}\n");
        assert_eq!(vfat_image(&f).unwrap(), vfat_image(&f).unwrap());
        assert_ne!(volume_id("job-a"), volume_id("job-b"));
    }

    #[test]
    fn largest_rendered_user_data_still_fits_fat12_at_1_mib() {
        let big = "x".repeat(super::super::MAX_USER_DATA_BYTES);
        let image = vfat_image(&files(&big)).unwrap();
        assert_eq!(image.len() as u64, MIN_IMAGE_BYTES);
        let (entries, _, _, fat) = read_back(image);
        assert_eq!(entries[1].1, big);
        assert_eq!(fat, FatType::Fat12);
    }

    #[test]
    fn bigger_content_gets_a_bigger_image_up_to_the_limit() {
        let big = "y".repeat(3 * MIB as usize);
        let image = vfat_image(&files(&big)).unwrap();
        assert!(image.len() as u64 > 3 * MIB);
        assert_eq!(read_back(image).0[1].1, big);

        let huge = "z".repeat(MAX_IMAGE_BYTES as usize);
        assert!(matches!(
            vfat_image(&files(&huge)),
            Err(SeedError::Invalid(_))
        ));
    }

    fn have(tool: &str) -> bool {
        Command::new(tool).arg("--version").output().is_ok()
    }

    fn write_image(dir: &Path) -> (std::path::PathBuf, SeedFiles) {
        let f = files("#cloud-config\n{\"runcmd\": [\"echo hi\"]}\n");
        let path = dir.join("seed.img");
        std::fs::write(&path, vfat_image(&f).unwrap()).unwrap();
        (path, f)
    }

    #[test]
    fn blkid_sees_a_cidata_vfat_volume() {
        if Command::new("blkid").arg("-V").output().is_err() {
            eprintln!("note: blkid not installed; skipping the blkid check of the seed image");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_image(dir.path());
        let out = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "blkid failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"LABEL=CIDATA"), "{text}");
        assert!(lines.contains(&"TYPE=vfat"), "{text}");
        assert!(lines.contains(&"VERSION=FAT12"), "{text}");
    }

    #[test]
    fn mtools_and_fsck_read_the_image_when_installed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, f) = write_image(dir.path());
        if have("mtype") {
            for (name, want) in [
                ("meta-data", &f.meta_data),
                ("user-data", &f.user_data),
                ("network-config", &f.network_config),
            ] {
                let out = Command::new("mtype")
                    .env("MTOOLS_SKIP_CHECK", "1")
                    .arg("-i")
                    .arg(&path)
                    .arg(format!("::{name}"))
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "mtype {name}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                assert_eq!(String::from_utf8_lossy(&out.stdout), want.as_str());
            }
            let out = Command::new("mdir")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&path)
                .arg("::")
                .output()
                .unwrap();
            let listing = String::from_utf8_lossy(&out.stdout);
            assert!(
                listing.contains("network-config") && listing.contains("CIDATA"),
                "{listing}"
            );
        } else {
            eprintln!(
                "note: mtools not installed; skipping the mtype/mdir check of the seed image"
            );
        }
        if have("fsck.fat") {
            let out = Command::new("fsck.fat")
                .arg("-n")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "fsck.fat: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            eprintln!("note: fsck.fat not installed; skipping the fsck check of the seed image");
        }
    }
}
