//! Who is using a block device: mounts of it or of its partitions, and the kernel's holders
//! (device-mapper, md RAID, bcache) of either.
//!
//! A restore opens its target device with O_EXCL, which the kernel refuses (EBUSY) while a
//! filesystem is mounted on it or on a partition, or while a holder or another O_EXCL user
//! has it. EBUSY alone does not say who; this module finds the names a person can act on:
//! the mount point (`/proc/self/mountinfo`, matched by major:minor or by source path) and
//! the holder (`/sys/dev/block/MAJ:MIN/holders`, and each partition's, with a dm device's
//! name from its `dm/name`).

use std::path::{Path, PathBuf};

/// How each user of the device `rdev` (its `st_rdev`), named `path`, is described; empty
/// when none is visible here (an O_EXCL opener, or a mount in another mount namespace).
pub(super) fn users(rdev: u64, path: &Path) -> Vec<String> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    users_in(&sys, &mountinfo, path)
}

/// [`users`] over the sysfs folder `sys` of the device and the text of a mountinfo file.
fn users_in(sys: &Path, mountinfo: &str, path: &Path) -> Vec<String> {
    let parts = device_and_partitions(sys);
    let mut paths: Vec<PathBuf> = parts
        .iter()
        .map(|(name, _, _)| Path::new("/dev").join(name))
        .collect();
    paths.extend(std::fs::canonicalize(path).ok());
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let left: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(devnum), Some(point), Some(fstype), Some(source)) =
            (left.get(2), left.get(4), right.first(), right.get(1))
        else {
            continue;
        };
        let source = unescape(source);
        let by_number = parts.iter().any(|(_, n, _)| n == devnum);
        let by_path = Path::new(&source).is_absolute()
            && std::fs::canonicalize(&source).is_ok_and(|s| paths.contains(&s));
        if by_number || by_path {
            found.push(format!(
                "mounted at {} ({fstype}, {source})",
                unescape(point)
            ));
        }
    }
    for (name, _, dir) in &parts {
        let Ok(holders) = std::fs::read_dir(dir.join("holders")) else {
            continue;
        };
        for h in holders.flatten() {
            let holder = h.file_name().to_string_lossy().into_owned();
            let what = match std::fs::read_to_string(h.path().join("dm/name")) {
                Ok(dm) => format!("held by {holder} (device-mapper device {})", dm.trim()),
                Err(_) => format!("held by {holder}"),
            };
            found.push(if name == &parts[0].0 {
                what
            } else {
                format!("{what}, through partition {name}")
            });
        }
    }
    found
}

/// The device's and its partitions' (name, "major:minor", sysfs folder), the device first.
fn device_and_partitions(sys: &Path) -> Vec<(String, String, PathBuf)> {
    let entry = |dir: PathBuf| -> Option<(String, String, PathBuf)> {
        let name = dir
            .canonicalize()
            .ok()?
            .file_name()?
            .to_string_lossy()
            .into_owned();
        let devnum = std::fs::read_to_string(dir.join("dev")).ok()?;
        Some((name, devnum.trim().to_owned(), dir))
    };
    let mut out: Vec<_> = entry(sys.to_owned()).into_iter().collect();
    if let Ok(rd) = std::fs::read_dir(sys) {
        let mut partitions: Vec<_> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("partition").is_file())
            .filter_map(entry)
            .collect();
        partitions.sort();
        out.extend(partitions);
    }
    out
}

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |a, c| a.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn mounts_and_holders_of_the_device_and_its_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("loop7");
        put(&sys.join("dev"), "7:7\n");
        put(&sys.join("loop7p1/partition"), "1\n");
        put(&sys.join("loop7p1/dev"), "259:3\n");
        put(&sys.join("loop7p2/partition"), "2\n");
        put(&sys.join("loop7p2/dev"), "259:4\n");
        put(&sys.join("loop7p2/holders/md0/md/level"), "raid1\n");
        put(&sys.join("holders/dm-2/dm/name"), "vg-data\n");
        std::fs::create_dir_all(sys.join("queue")).unwrap();
        let mountinfo = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
90 27 259:3 / /mnt/a\\040b rw,relatime - ext4 /dev/loop7p1 rw
91 27 7:8 / /mnt/other rw,relatime - xfs /dev/loop8 rw
";
        let users = users_in(&sys, mountinfo, Path::new("/nonexistent/loop7"));
        assert_eq!(
            users,
            [
                "mounted at /mnt/a b (ext4, /dev/loop7p1)",
                "held by dm-2 (device-mapper device vg-data)",
                "held by md0, through partition loop7p2",
            ]
        );
        assert!(users_in(&dir.path().join("none"), mountinfo, Path::new("/x")).is_empty());
    }

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(unescape(r"/a\040b\134c\011"), "/a b\\c\t");
        assert_eq!(unescape(r"/plain\04"), r"/plain\04");
    }
}
