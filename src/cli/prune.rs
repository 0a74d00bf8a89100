//! `blockvault prune [--dry-run] [--max-unused PERCENT]`

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
    /// Repack live packs with more than this share of their frame bytes unreferenced: `5%`
    /// (the default, as restic), `0` repacks any pack with a dead frame, `100%` never repacks.
    #[arg(long, value_name = "PERCENT", value_parser = percent, default_value = "5%")]
    pub max_unused: f64,
}

/// `N` or `N%`, 0 to 100.
fn percent(s: &str) -> Result<f64, String> {
    let n: f64 = s
        .strip_suffix('%')
        .unwrap_or(s)
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage (like 5% or 0)"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(n)
}

/// Repack mostly dead packs, delete the packs no snapshot references.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault_unwrapping()?;
    let r = prune::prune_with(
        &vault,
        &prune::Options {
            dry_run: a.dry_run,
            max_unused: a.max_unused,
        },
    )?;
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
        "{verb} {} of {} packs, {} freed; {} live packs hold {} no snapshot needs (within --max-unused {}%); {:.2} s\n",
        r.packs_deleted,
        r.packs,
        human_bytes(r.bytes_freed),
        r.live_packs,
        human_bytes(r.dead_bytes),
        r.max_unused_percent,
        r.seconds
    );
    if r.repack.packs_repacked > 0 {
        let verb = if r.dry_run {
            "would repack"
        } else {
            "repacked"
        };
        t += &format!(
            "{verb} {} packs ({} live) into {} new packs; {} manifests rewritten\n",
            r.repack.packs_repacked,
            human_bytes(r.repack.bytes_repacked),
            r.repack.packs_written,
            r.repack.manifests_rewritten
        );
    }
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
