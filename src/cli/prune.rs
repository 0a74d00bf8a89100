//! `blockvault prune [--dry-run]`

use std::process::ExitCode;

use blockvault::retention::prune;
use blockvault::util::human_bytes;

use super::Context;

/// Arguments of `prune`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Say what would be deleted now; change nothing (and wait for no backup).
    #[arg(long)]
    pub dry_run: bool,
}

/// Delete the packs no snapshot references.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault_unwrapping()?;
    let r = prune::prune(&vault, a.dry_run)?;
    let mut doc = json(&r)?;
    doc["command"] = "prune".into();
    ctx.out.result(doc, || human(&r));
    Ok(ExitCode::SUCCESS)
}

/// The report as JSON (also `forget --prune`'s `prune` field).
pub fn json(r: &prune::PruneReport) -> anyhow::Result<serde_json::Value> {
    let mut doc = serde_json::to_value(r)?;
    doc["seconds"] = super::output::seconds(r.seconds).into();
    Ok(doc)
}

/// The report as text.
pub fn human(r: &prune::PruneReport) -> String {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    let mut t = format!(
        "{verb} {} of {} packs, {} freed; {} live packs hold {} no snapshot needs (packs are not repacked); {:.2} s\n",
        r.packs_deleted,
        r.packs,
        human_bytes(r.bytes_freed),
        r.live_packs,
        human_bytes(r.dead_bytes),
        r.seconds
    );
    if r.leases_waited > 0 {
        t += &format!(
            "waited for {} running backups; {} packs they committed were kept\n",
            r.leases_waited, r.packs_kept_for_backups
        );
    }
    if r.leases_removed > 0 {
        t += &format!(
            "{} lapsed backup leases removed (those backups cannot commit)\n",
            r.leases_removed
        );
    }
    t
}
