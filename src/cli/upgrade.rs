//! `blockvault upgrade`: bring a vault of an older format to the current one, in place.

use std::process::ExitCode;

use serde_json::json;

use blockvault::keys::upgrade;

use super::Context;

/// Arguments of `upgrade`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Upgrade the vault.
pub fn run(ctx: &Context, _a: Args) -> anyhow::Result<ExitCode> {
    let url = ctx.vault_url()?;
    let r = upgrade::upgrade(url, &ctx.keystore()?, &ctx.key_access())?;
    ctx.out.result(
        json!({
            "command": "upgrade",
            "already": r.already,
            "disks": r.disks,
            "key_records": r.records,
            "snapshots": r.snapshots,
            "escrows": r.escrows,
            "damaged_manifests": r.damaged_manifests,
            "removed_v1_objects": r.removed,
            "auth_fingerprint": r.auth_fingerprint,
        }),
        || {
            if r.already {
                return format!("vault {url} is at the current format{}\n", if r.removed > 0 { format!(" ({} leftover object(s) of the upgrade removed)", r.removed) } else { String::new() });
            }
            let mut t = format!(
                "vault {url} upgraded to format version 2: {} disk(s), {} key record(s), {} snapshot(s), {} escrow record(s)\nauth fingerprint {} (keep it with the recovery key, if the vault has one)\n",
                r.disks, r.records, r.snapshots, r.escrows, r.auth_fingerprint
            );
            for m in &r.damaged_manifests {
                t += &format!("left out (damaged, unreadable before too): {m}\n");
            }
            t
        },
    );
    Ok(ExitCode::SUCCESS)
}
