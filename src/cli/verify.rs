//! `blockvault verify [--disk NAME] [--read-data | --read-data-subset N/M|P%]`

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
    /// As --read-data, for a subset of the packs: N/M (slice N of M; N = 1..M in turn reads
    /// every pack once) or a random percentage, e.g. 10%.
    #[arg(long, value_name = "N/M|P%", conflicts_with = "read_data")]
    read_data_subset: Option<verify::ReadData>,
}

/// Verify; exit 3 when anything is damaged.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault_unwrapping()?;
    if let Some(d) = &a.disk {
        blockvault::engine::require_disk(&vault, d)?;
    }
    let bar = ctx.out.progress("verify");
    let data = match (a.read_data_subset, a.read_data) {
        (Some(subset), _) => subset,
        (None, true) => verify::ReadData::All,
        (None, false) => verify::ReadData::None,
    };
    let r = verify::verify(&vault, a.disk.as_deref(), data, &bar)?;
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
            if r.read_data {
                format!(
                    ", {} extents in {} packs read{} ({} read)",
                    r.extents_checked,
                    r.packs_read,
                    r.read_data_subset
                        .as_ref()
                        .map(|s| format!(" (subset {s})"))
                        .unwrap_or_default(),
                    human_bytes(r.bytes_read)
                )
            } else {
                String::new()
            }
        );
        t += &leftovers(&r);
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

/// The lines about what killed runs left, if they left anything.
fn leftovers(r: &verify::VerifyReport) -> String {
    let mut t = String::new();
    if r.unreferenced_packs > 0 {
        t += &format!(
            "{} unreferenced packs, {}: stored by backups killed before they committed\n",
            r.unreferenced_packs,
            human_bytes(r.unreferenced_pack_bytes)
        );
    }
    if r.unfinished_writes > 0 {
        t += &format!(
            "{} unfinished writes, {} in temp files: left by processes killed while writing\n",
            r.unfinished_writes,
            human_bytes(r.unfinished_write_bytes)
        );
    }
    if !t.is_empty() {
        t += "  (harmless: no snapshot uses them; `prune` reclaims the packs)\n";
    }
    t
}
