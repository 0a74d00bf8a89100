//! `blockvault verify [--disk NAME] [--read-data]`

use std::process::ExitCode;

use blockvault::restore::verify;
use blockvault::util::human_bytes;

use super::{Context, INTEGRITY};

/// Arguments of `verify`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
    /// Read, decrypt and authenticate every stored piece.
    #[arg(long)]
    read_data: bool,
}

/// Verify; exit 3 when anything is damaged.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault_unwrapping()?;
    if let Some(d) = &a.disk {
        blockvault::engine::require_disk(&vault, d)?;
    }
    let bar = ctx.out.progress("verify");
    let r = verify::verify(&vault, a.disk.as_deref(), a.read_data, &bar)?;
    drop(bar);
    let mut doc = serde_json::to_value(&r)?;
    doc["command"] = "verify".into();
    doc["ok"] = r.problems.is_empty().into();
    doc["seconds"] = super::output::seconds(r.seconds).into();
    ctx.out.result(doc, || {
        let mut t = format!(
            "checked {} disks, {} snapshots, {} packs{}\n",
            r.disks,
            r.snapshots,
            r.packs,
            if a.read_data {
                format!(
                    ", {} extents ({} read)",
                    r.extents_checked,
                    human_bytes(r.bytes_read)
                )
            } else {
                String::new()
            }
        );
        if r.unreferenced_packs > 0 {
            t += &format!(
                "{} unreferenced packs (left by interrupted backups; harmless)\n",
                r.unreferenced_packs
            );
        }
        for p in &r.problems {
            t += &format!("DAMAGED {}: {}", p.object, p.problem);
            if !p.snapshots.is_empty() {
                t += &format!(" (affects {})", p.snapshots.join(", "));
            }
            t += "\n";
        }
        t += if r.problems.is_empty() {
            "no problems found\n"
        } else {
            "vault has damage\n"
        };
        t
    });
    Ok(if r.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(INTEGRITY)
    })
}
