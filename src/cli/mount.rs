//! `blockvault mount MOUNTPOINT [--disk NAME]`: snapshots as read-only raw files over FUSE.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use blockvault::engine::require_disk;
use blockvault::mount::{mount, MountedDisk};

use super::Context;

/// Arguments of `mount`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// An empty folder: DISK/TIME_ID.raw appears in it for every snapshot.
    mountpoint: PathBuf,
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
}

/// Mount the vault's snapshots until unmounted, SIGINT or SIGTERM.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault_unwrapping()?;
    let disks = match &a.disk {
        Some(name) => vec![require_disk(&vault, name)?],
        None => vault.disks()?,
    };
    let snapshots = disks
        .iter()
        .map(|d| vault.snapshots(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mounted: Vec<MountedDisk> = disks
        .iter()
        .zip(&snapshots)
        .map(|(disk, snapshots)| MountedDisk { disk, snapshots })
        .collect();
    let count: usize = snapshots.iter().map(Vec::len).sum();
    mount(&vault, &mounted, &a.mountpoint, || {
        ctx.out.event(json!({ "event": "ready", "mountpoint": a.mountpoint.display().to_string(), "disks": disks.len(), "snapshots": count }));
        eprintln!(
            "mounted {count} snapshots of {} disks read-only on {}; umount, Ctrl-C or SIGTERM ends it",
            disks.len(),
            a.mountpoint.display()
        );
    })?;
    ctx.out.event(json!({ "event": "stopped" }));
    eprintln!("unmounted {}", a.mountpoint.display());
    Ok(ExitCode::SUCCESS)
}
