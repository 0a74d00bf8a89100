//! `blockvault backup qmp:///SOCKET --disk-map NODE=DISK[,…]`: a running VM's disks as one
//! group (the library's `vm` module does the work).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use blockvault::vault::info::VmConfig;
use blockvault::vm::{self, VmBackup};
use blockvault::Error;

use super::super::output::time;
use super::super::Context;
use super::{created_text, merge, open_vault, options, snapshot_doc, snapshot_text, Args};

/// The options of a running VM's backup.
#[derive(clap::Args, Debug)]
pub struct VmArgs {
    /// With a qmp:/// source: which drive goes to which vault disk, NODE=DISK[,NODE=DISK...]
    /// (NODE: a block node name, or a device id). The disks form one group.
    #[arg(long, value_name = "NODE=DISK,...")]
    disk_map: Option<String>,
    /// With qmp://: the VM's name in the group (default: QEMU's -name, else the socket's
    /// file name).
    #[arg(long, value_name = "NAME", requires = "disk_map")]
    vm_name: Option<String>,
    /// With qmp://: the VM's configuration (libvirt domain XML, a QEMU command line: UTF-8
    /// text up to 1 MiB), kept sealed with the group and restored with it.
    #[arg(long, value_name = "FILE", requires = "disk_map")]
    vm_config: Option<PathBuf>,
    /// With qmp://: the guest agent's socket; the guest's filesystems are frozen for the
    /// moment of the point in time (application-consistent), else crash-consistent.
    #[arg(long, value_name = "SOCKET", requires = "disk_map")]
    guest_agent: Option<PathBuf>,
    /// With qmp://: folder for the fleecing images and the NBD socket, which QEMU must be
    /// able to open (default: the QMP socket's folder).
    #[arg(long, value_name = "DIR", requires = "disk_map")]
    scratch: Option<PathBuf>,
    /// With qmp://: seconds to wait for QEMU and the guest agent at each step.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    qmp_timeout: u64,
    /// With qmp://: a JSON array of more QMP transaction actions, applied in the same
    /// transaction as the point in time (e.g. a drive-backup of a disk kept elsewhere).
    #[arg(long, value_name = "FILE", requires = "disk_map")]
    qmp_actions: Option<PathBuf>,
}

/// Back up the VM at `a.source`.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let v = &a.vm;
    let Some(map) = &v.disk_map else {
        anyhow::bail!(Error::usage(format!(
            "{}: a running VM's disks are named with --disk-map NODE=DISK[,NODE=DISK...], \
             not --disk",
            a.source
        )));
    };
    if a.bitmap.is_some() || a.changed.is_some() {
        anyhow::bail!(Error::usage(
            "a running VM's bitmaps are blockvault's to manage: --bitmap and --changed do not \
             apply to qmp:/// sources"
        ));
    }
    let socket = vm::socket_path(&a.source)?;
    let map = vm::parse_disk_map(map)?;
    let vm_config = v.vm_config.as_ref().map(read_config).transpose()?;
    let extra_actions = v.qmp_actions.as_ref().map(read_actions).transpose()?;
    // The socket first: a typo in its path must not leave a new, empty vault behind.
    std::fs::metadata(&socket).map_err(|e| {
        Error::io(
            format!("QEMU's QMP socket {} (from {})", socket.display(), a.source),
            e,
        )
    })?;
    let url = ctx.vault_url()?;
    let (vault, created) = open_vault(ctx, &a)?;
    let ks = vault.keystore_file().display().to_string();
    let req = VmBackup {
        qmp: socket,
        map,
        vm_name: v.vm_name.clone(),
        vm_config,
        agent: v.guest_agent.clone(),
        scratch: v.scratch.clone(),
        timeout: Duration::from_secs(v.qmp_timeout),
        nbd_timeout: Duration::from_secs(a.nbd_timeout),
        extra_actions: extra_actions.unwrap_or_default(),
        options: options(&a),
    };
    let bar = ctx.out.progress("backup");
    let r = vm::backup(&vault, &req, &bar)?;
    drop(bar);
    for w in &r.warnings {
        eprintln!("{w}");
    }
    let g = &r.group;
    let mut doc = json!({
        "command": "backup",
        "vault": url,
        "vault_created": created,
        "keystore": ks,
        "vm": g.vm,
        "group": g.id,
        "point_in_time": time(g.time),
        "consistency": g.consistency,
        "qemu": r.qemu,
        "transaction_seconds": r.transaction_seconds,
        "frozen_filesystems": r.frozen.map(|f| f.0),
        "freeze_seconds": r.frozen.map(|f| f.1),
        "vm_config": g.vm_config.as_ref().map(|c| &c.name),
        "cleaned": r.cleaned,
        "bitmaps_removed": r.bitmaps_removed,
        "warnings": r.warnings,
        "disks": r.members.iter().map(snapshot_doc).collect::<Vec<_>>(),
    });
    if r.members.len() == 1 {
        merge(&mut doc, snapshot_doc(&r.members[0]));
    }
    ctx.out.result(doc, || {
        let mut t = String::new();
        if created {
            t += &created_text(url, &ks);
        }
        for c in &r.cleaned {
            t += &format!("cleaned up: {c}\n");
        }
        t += &format!(
            "group {} of VM {}: {} disks at {} ({}-consistent), QEMU {}, transaction {:.1} ms\n",
            &g.id[..8],
            g.vm,
            g.members.len(),
            time(g.time),
            serde_json::to_value(g.consistency)
                .ok()
                .and_then(|c| c.as_str().map(String::from))
                .unwrap_or_default(),
            r.qemu,
            r.transaction_seconds * 1000.0
        );
        for m in &r.members {
            t += &snapshot_text(m);
            if let Some(b) = &m.info.bitmap_created {
                t += &format!("  bitmap {b} added: the next backup of the VM reads it\n");
            }
        }
        for b in &r.bitmaps_removed {
            t += &format!("  bitmap {b} removed\n");
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}

/// `--vm-config FILE`: UTF-8 text up to 1 MiB, kept under its file name.
fn read_config(path: &PathBuf) -> anyhow::Result<VmConfig> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading --vm-config {}", path.display()), e))?;
    if bytes.len() > vm::MAX_VM_CONFIG {
        anyhow::bail!(Error::usage(format!(
            "--vm-config {} holds {} bytes; at most {} are kept with a group",
            path.display(),
            bytes.len(),
            vm::MAX_VM_CONFIG
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::usage(format!(
            "--vm-config {} is not UTF-8 text (byte {} is not)",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    Ok(VmConfig {
        name: path
            .file_name()
            .map_or_else(|| "vm-config".into(), |n| n.to_string_lossy().into_owned()),
        text,
    })
}

/// `--qmp-actions FILE`: a JSON array of transaction actions (objects with a "type").
fn read_actions(path: &PathBuf) -> anyhow::Result<Vec<Value>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::io(format!("reading --qmp-actions {}", path.display()), e))?;
    let bad = |why: String| {
        Error::usage(format!(
            "--qmp-actions {}: {why} (expected a JSON array of QMP transaction actions, \
             [{{\"type\": ..., \"data\": {{...}}}}])",
            path.display()
        ))
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let Value::Array(actions) = v else {
        anyhow::bail!(bad("not an array".into()));
    };
    if let Some(i) = actions.iter().position(|a| !a["type"].is_string()) {
        anyhow::bail!(bad(format!("action {i} has no \"type\"")));
    }
    Ok(actions)
}
