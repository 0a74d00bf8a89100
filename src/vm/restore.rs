//! Restoring a group: every member disk, and the VM's configuration when the group has one.
//!
//! Targets are a folder (created if missing: each disk to `FOLDER/<disk>.raw`, the
//! configuration under its own file name) or a list `DISK=PATH[,DISK=PATH…]` naming every
//! member (files or block devices; the configuration then goes where `vm_config` says, or
//! nowhere). An incomplete group is refused: its members are not one point in time.
//! Members are restored one after another, each as `restore` does (checked, a target file
//! it created removed on failure); a failure stops there and names what was restored.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::group::Group;
use crate::engine::{require_disk, Progress};
use crate::error::{Error, ErrorKind, Result};
use crate::restore::{self, RestoreOptions, RestoreReport};
use crate::source::nbd::is_nbd_url;
use crate::vault::Vault;

/// One member restored.
#[derive(Debug)]
pub struct Restored {
    /// The disk.
    pub disk: String,
    /// Its snapshot.
    pub snapshot: String,
    /// Where it went.
    pub target: PathBuf,
    /// The figures.
    pub report: RestoreReport,
}

/// Where each member goes.
#[derive(Debug, Clone)]
pub struct Targets {
    /// Each member's disk and target, in the group's order.
    pub disks: Vec<(String, PathBuf)>,
    /// The folder, when the target was one.
    pub folder: Option<PathBuf>,
}

/// Where each member goes: `target` is a folder (each disk to `DISK.raw`, or `DISK.qcow2`
/// when `qcow2`), or `DISK=TARGET[,…]` naming every member (a file, a device or an NBD URL).
pub fn targets(group: &Group, target: &Path, qcow2: bool) -> Result<Targets> {
    let disks: Vec<&str> = group
        .record
        .members
        .iter()
        .map(|m| m.disk.as_str())
        .collect();
    let text = target.to_string_lossy();
    let pairs: Option<Vec<(&str, &str)>> = text
        .split(',')
        .map(|p| p.split_once('=').filter(|(d, _)| disks.contains(d)))
        .collect();
    let Some(pairs) = pairs else {
        folder_only(target)?;
        let ext = match qcow2 {
            true => "qcow2",
            false => "raw",
        };
        return Ok(Targets {
            disks: disks
                .iter()
                .map(|d| {
                    (
                        d.to_string(),
                        target.join(format!("{}.{ext}", file_name(d))),
                    )
                })
                .collect(),
            folder: Some(target.to_owned()),
        });
    };
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for (disk, path) in pairs {
        if out.iter().any(|(d, _)| d == disk) {
            return Err(Error::usage(format!("{disk} is given twice in {text}")));
        }
        out.push((disk.to_owned(), PathBuf::from(path)));
    }
    let missing: Vec<&str> = disks
        .iter()
        .filter(|d| !out.iter().any(|(o, _)| o == *d))
        .copied()
        .collect();
    if !missing.is_empty() {
        return Err(Error::usage(format!(
            "{text} names no target for {} of the group (a group restores whole: give \
             every disk, or a folder)",
            missing.join(", ")
        )));
    }
    Ok(Targets {
        disks: out,
        folder: None,
    })
}

/// A group's target that is not a `DISK=TARGET` list must be a folder: an NBD export or a
/// file holds one disk, so it is refused (saying how to name it) rather than taken for a
/// folder to create.
fn folder_only(target: &Path) -> Result<()> {
    let text = target.to_string_lossy();
    let one_disk = match std::fs::metadata(target) {
        _ if is_nbd_url(&text) => Some("an NBD export"),
        Ok(md) if !md.is_dir() => Some("not a folder"),
        _ => None,
    };
    match one_disk {
        Some(what) => Err(Error::usage(format!(
            "{text} is {what}: a group restores to a folder, or to DISK=TARGET[,DISK=TARGET…] \
             naming a target for every disk"
        ))),
        None => Ok(()),
    }
}

/// Restore every member of `group` to `targets` and, if the group has one and `vm_config`
/// says where (default: in the target folder, under its own name), its VM configuration (not
/// overwritten unless `opts.force`). Returns the members restored and where the
/// configuration went.
pub fn restore_group(
    vault: &Vault,
    group: &Group,
    targets: &Targets,
    vm_config: Option<&Path>,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<(Vec<Restored>, Option<PathBuf>)> {
    let members = group.require_complete()?;
    let config = match (&group.record.vm_config, vm_config, &targets.folder) {
        (None, _, _) => None,
        (Some(_), Some(p), _) => Some(p.to_owned()),
        (Some(c), None, Some(folder)) => Some(folder.join(file_name(&c.name))),
        (Some(_), None, None) => None,
    };
    let folders: Vec<&Path> = targets
        .disks
        .iter()
        .filter(|(_, p)| !is_nbd_url(&p.to_string_lossy()))
        .filter_map(|(_, p)| p.parent())
        .chain(config.as_deref().and_then(Path::parent))
        .collect();
    for f in folders.into_iter().filter(|f| !f.as_os_str().is_empty()) {
        std::fs::create_dir_all(f)
            .map_err(|e| Error::io(format!("creating {}", f.display()), e))?;
    }
    if let (Some(c), Some(path)) = (&group.record.vm_config, &config) {
        write_config(path, &c.text, opts.force)?;
    }
    let mut done: Vec<Restored> = Vec::new();
    for (member, m) in members {
        let target = &targets
            .disks
            .iter()
            .find(|(d, _)| *d == member.disk)
            .expect("targets() names every member")
            .1;
        let restored = require_disk(vault, &member.disk)
            .and_then(|disk| restore::restore(vault, &disk, m, target, opts, progress));
        match restored {
            Ok(report) => done.push(Restored {
                disk: member.disk.clone(),
                snapshot: member.snapshot.clone(),
                target: target.clone(),
                report,
            }),
            Err(e) => {
                let so_far: Vec<String> = done
                    .iter()
                    .map(|r| format!("{} to {}", r.disk, r.target.display()))
                    .collect();
                let before = match so_far.is_empty() {
                    true => String::new(),
                    false => format!(" (restored before it: {})", so_far.join(", ")),
                };
                return Err(e.within(format!(
                    "restoring {}@{} of group {}{before}",
                    member.disk,
                    &member.snapshot[..member.snapshot.len().min(8)],
                    &group.record.id[..group.record.id.len().min(8)]
                )));
            }
        }
    }
    Ok((done, config))
}

/// `name` as a plain file name: no folders, nothing but letters, digits and `-_.@`.
fn file_name(name: &str) -> String {
    let plain: String = name
        .chars()
        .map(|c| match c.is_alphanumeric() || "-_.@".contains(c) {
            true => c,
            false => '_',
        })
        .collect();
    match plain.trim_start_matches('.').is_empty() {
        true => "vm-config".into(),
        false => plain,
    }
}

fn write_config(path: &Path, text: &str, force: bool) -> Result<()> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).mode(0o600);
    match force {
        true => o.create(true).truncate(true),
        false => o.create_new(true),
    };
    let mut f = o.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::new(
                ErrorKind::Usage,
                format!("{} exists; pass --force to overwrite it", path.display()),
            )
        } else {
            Error::io(format!("creating {}", path.display()), e)
        }
    })?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}
