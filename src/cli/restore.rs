//! `blockvault restore DISK[@ID|@latest] TARGET`

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use blockvault::engine::require_disk;
use blockvault::restore::{self, RestoreOptions};
use blockvault::util::human_bytes;

use super::output::mb_per_s;
use super::Context;

/// Arguments of `restore`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// DISK, DISK@latest or DISK@SNAPSHOT-ID (a unique prefix is enough).
    snapshot: String,
    /// File or block device to write.
    target: PathBuf,
    /// Overwrite a non-empty target file.
    #[arg(long)]
    force: bool,
    /// Return without waiting for the data to reach stable storage.
    #[arg(long)]
    no_sync: bool,
    /// Only LEN bytes from byte OFF of the disk (e.g. 1048576:4096 or 1M:64K), written to
    /// the start of TARGET.
    #[arg(long, value_name = "OFF:LEN", value_parser = parse_range)]
    range: Option<std::ops::Range<u64>>,
}

/// Restore a snapshot.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault()?;
    let (name, spec) = a
        .snapshot
        .split_once('@')
        .unwrap_or((&a.snapshot, "latest"));
    let disk = require_disk(&vault, name)?;
    let m = vault.resolve_snapshot(&disk, spec)?;
    let bar = ctx.out.progress("restore");
    let r = restore::restore(
        &vault,
        &disk,
        &m,
        &a.target,
        &RestoreOptions {
            force: a.force,
            sync: !a.no_sync,
            range: a.range.clone(),
        },
        &bar,
    )?;
    drop(bar);
    let doc = json!({
        "command": "restore",
        "disk": disk.name,
        "snapshot": m.id.hex(),
        "target": a.target.display().to_string(),
        "bytes_total": r.bytes_total,
        "bytes_written": r.bytes_written,
        "bytes_fetched": r.bytes_fetched,
        "slots_zero": r.slots_zero,
        "seconds": r.seconds,
        "mb_per_s": mb_per_s(r.bytes_total, r.seconds),
        "verified_digest": true,
    });
    ctx.out.result(doc, || {
        format!(
            "restored {}@{} to {}: {} ({} data), digest verified, {:.2} s, {} MB/s\n",
            disk.name,
            m.id.short(),
            a.target.display(),
            human_bytes(r.bytes_total),
            human_bytes(r.bytes_written),
            r.seconds,
            mb_per_s(r.bytes_total, r.seconds)
        )
    });
    Ok(ExitCode::SUCCESS)
}

fn parse_range(s: &str) -> Result<std::ops::Range<u64>, String> {
    let (off, len) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not OFF:LEN"))?;
    let (off, len) = (super::parse_size(off)?, super::parse_size(len)?);
    let end = off
        .checked_add(len)
        .ok_or_else(|| format!("{s} overflows"))?;
    Ok(off..end)
}
