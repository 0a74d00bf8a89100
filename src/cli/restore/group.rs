//! `blockvault restore group:VM[@ID|@latest] FOLDER | DISK=PATH[,…]`: every disk of a group,
//! and its VM configuration (the library's `vm::restore` does the work).

use std::process::ExitCode;

use serde_json::json;

use blockvault::restore::RestoreOptions;
use blockvault::util::human_bytes;
use blockvault::vm::{group, restore};
use blockvault::Error;

use super::super::output::{mb_per_s, time};
use super::super::Context;
use super::Args;

/// What marks a group in `restore`'s first argument.
pub const PREFIX: &str = "group:";

/// Restore the group `spec` names.
pub fn run(ctx: &Context, spec: &str, a: &Args) -> anyhow::Result<ExitCode> {
    if a.range.is_some() || a.with_escrow.is_some() {
        anyhow::bail!(Error::usage(
            "--range and --with-escrow restore one disk: name it (DISK@ID) instead of a group"
        ));
    }
    let vault = ctx.open_vault()?;
    let g = group::resolve(&vault, spec)?;
    let targets = restore::targets(&g, &a.target)?;
    let bar = ctx.out.progress("restore");
    let (done, config) = restore::restore_group(
        &vault,
        &g,
        &targets,
        a.vm_config.as_deref(),
        &RestoreOptions {
            force: a.force,
            sync: !a.no_sync,
            range: None,
        },
        &bar,
    )?;
    drop(bar);
    let r = &g.record;
    let doc = json!({
        "command": "restore",
        "group": r.id,
        "vm": r.vm,
        "point_in_time": time(r.time),
        "consistency": r.consistency,
        "vm_config": config.as_ref().map(|p| p.display().to_string()),
        "disks": done.iter().map(|d| json!({
            "disk": d.disk,
            "snapshot": d.snapshot,
            "target": d.target.display().to_string(),
            "bytes_total": d.report.bytes_total,
            "bytes_written": d.report.bytes_written,
            "bytes_fetched": d.report.bytes_fetched,
            "slots_zero": d.report.slots_zero,
            "seconds": d.report.seconds,
            "mb_per_s": mb_per_s(d.report.bytes_total, d.report.seconds),
            "verified_digest": true,
        })).collect::<Vec<_>>(),
    });
    ctx.out.result(doc, || {
        let mut t = format!(
            "restored group {} of VM {} ({}):\n",
            &r.id[..8],
            r.vm,
            time(r.time)
        );
        for d in &done {
            t += &format!(
                "  {}@{} to {}: {} ({} data), digest verified, {:.2} s\n",
                d.disk,
                &d.snapshot[..8],
                d.target.display(),
                human_bytes(d.report.bytes_total),
                human_bytes(d.report.bytes_written),
                d.report.seconds
            );
        }
        match (&config, &r.vm_config) {
            (Some(p), _) => t += &format!("  VM configuration to {}\n", p.display()),
            (None, Some(c)) => {
                t += &format!(
                    "  VM configuration {} kept with the group, not written (--vm-config FILE)\n",
                    c.name
                )
            }
            (None, None) => {}
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}
