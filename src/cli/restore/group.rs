//! `blockvault restore group:VM[@ID|@latest] FOLDER | DISK=PATH[,…]`: every disk of a group,
//! and its VM configuration (the library's `vm::restore` does the work).

use std::process::ExitCode;

use serde_json::json;

use blockvault::restore::target::Format;
use blockvault::util::human_bytes;
use blockvault::vm::{group, restore};
use blockvault::Error;

use super::super::output::{mb_per_s, mib_per_s, seconds, time};
use super::super::Context;
use super::{damage_lines, options, Args};

/// What marks a group in `restore`'s first argument.
pub const PREFIX: &str = "group:";

/// Restore the group `spec` names.
pub fn run(ctx: &Context, spec: &str, a: &Args) -> anyhow::Result<ExitCode> {
    if a.range.is_some() || a.with_escrow.is_some() {
        anyhow::bail!(Error::usage(
            "--range and --with-escrow restore one disk: name it (DISK@ID) instead of a group"
        ));
    }
    let vault = ctx.open_vault_unwrapping()?;
    let g = group::resolve(&vault, spec)?;
    let qcow2 = matches!(a.format.map(Format::from), Some(Format::Qcow2));
    let targets = restore::targets(&g, &a.target, qcow2)?;
    let bar = ctx.out.progress("restore");
    let (done, config) = restore::restore_group(
        &vault,
        &g,
        &targets,
        a.vm_config.as_deref(),
        &options(a),
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
            "seconds": seconds(d.report.seconds),
            "mb_per_s": mb_per_s(d.report.bytes_written, seconds(d.report.seconds)),
            "verified_digest": true,
            "target_kind": d.report.target_kind,
            "format": d.report.format,
            "damaged": d.report.damaged,
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
                "  {}@{} to {}: {} ({} data), digest verified, {:.2} s, written at {:.1} MiB/s\n",
                d.disk,
                &d.snapshot[..8],
                d.target.display(),
                human_bytes(d.report.bytes_total),
                human_bytes(d.report.bytes_written),
                d.report.seconds,
                mib_per_s(d.report.bytes_written, seconds(d.report.seconds))
            );
            t += &damage_lines(&d.report.damaged);
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
    if done.iter().all(|d| d.report.damaged.is_empty()) {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(super::super::INTEGRITY))
    }
}
