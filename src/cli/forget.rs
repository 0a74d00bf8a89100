//! `blockvault forget [--disk NAME] --keep-… [--dry-run] [--prune]`

use std::process::ExitCode;

use serde_json::json;

use blockvault::retention::forget::{self, Decision, GroupOutcome, Scope};
use blockvault::retention::policy::{Policy, Within};

use super::output::time;
use super::Context;

/// Arguments of `forget`: restic's retention rules (README, "forget").
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this disk (default: every disk, each on its own).
    #[arg(long)]
    disk: Option<String>,
    /// The groups of this VM (`backup qmp://`): the rules count groups by their point in
    /// time, and a removed group's members go together.
    #[arg(long, value_name = "VM", conflicts_with = "disk")]
    group: Option<String>,
    /// Let a rule remove a group's member while another member stays (a disk that left the
    /// VM): the group becomes incomplete. Without it a member stays while its group does.
    #[arg(long, conflicts_with = "group")]
    split_groups: bool,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N newest hours that have one (UTC).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_hourly: Option<u32>,
    /// ... of the N newest days (UTC).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_daily: Option<u32>,
    /// ... of the N newest ISO weeks.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_weekly: Option<u32>,
    /// ... of the N newest months.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_monthly: Option<u32>,
    /// ... of the N newest years.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    keep_yearly: Option<u32>,
    /// Keep every snapshot within this span of the disk's newest one, e.g. 1y6m, 14d, 36h.
    #[arg(long, value_name = "SPAN")]
    keep_within: Option<Within>,
    /// Say what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Then run `prune` (not with --dry-run).
    #[arg(long, conflicts_with = "dry_run")]
    prune: bool,
}

fn decision(d: &Decision) -> serde_json::Value {
    json!({
        "id": d.id.hex(),
        "short_id": d.id.short(),
        "time": time(d.time),
        "reasons": d.reasons,
    })
}

fn group(g: &GroupOutcome) -> serde_json::Value {
    json!({
        "vm": g.vm,
        "id": g.id,
        "time": time(g.time),
        "kept": !g.reasons.is_empty(),
        "reasons": g.reasons,
        "split": g.split,
    })
}

/// Forget the snapshots the policy does not keep.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
    };
    policy.check()?;
    let vault = ctx.open_vault_unwrapping()?;
    let scope = match (&a.disk, &a.group) {
        (Some(disk), _) => Scope::Disk(disk),
        (None, Some(vm)) => Scope::Vm(vm),
        (None, None) => Scope::AllDisks,
    };
    let outcome = forget::forget(&vault, scope, &policy, a.dry_run, a.split_groups)?;
    let outcomes = &outcome.disks;
    let pruned = if a.prune {
        Some(blockvault::retention::prune::prune(&vault, false)?)
    } else {
        None
    };
    let mut doc = json!({
        "command": "forget",
        "dry_run": a.dry_run,
        "kept": outcomes.iter().map(|o| o.kept.len()).sum::<usize>(),
        "removed": outcomes.iter().map(|o| o.removed.len()).sum::<usize>(),
        "disks": outcomes.iter().map(|o| json!({
            "disk": o.disk,
            "kept": o.kept.iter().map(decision).collect::<Vec<_>>(),
            "removed": o.removed.iter().map(decision).collect::<Vec<_>>(),
            "manifests_left": o.manifests_left,
        })).collect::<Vec<_>>(),
        "groups": outcome.groups.iter().map(group).collect::<Vec<_>>(),
    });
    if let Some(r) = &pruned {
        doc["prune"] = super::prune::json(r)?;
    }
    ctx.out.result(doc, || {
        let mut t = String::new();
        for o in outcomes {
            t += &format!(
                "disk {}: keep {}, {} {}\n",
                o.disk,
                o.kept.len(),
                if a.dry_run { "would remove" } else { "removed" },
                o.removed.len()
            );
            for d in &o.kept {
                t += &format!(
                    "  keep    {}  {}  {}\n",
                    d.id.short(),
                    time(d.time),
                    d.reasons.join(", ")
                );
            }
            for d in &o.removed {
                t += &format!("  remove  {}  {}\n", d.id.short(), time(d.time));
            }
        }
        for g in &outcome.groups {
            let verdict = match (g.reasons.is_empty(), g.split.is_empty()) {
                (true, _) if a.dry_run => "would be removed".to_owned(),
                (true, _) => "removed".to_owned(),
                (false, true) => format!("kept ({})", g.reasons.join(", ")),
                (false, false) => format!(
                    "split: {} {}, the group incomplete",
                    g.split.join(", "),
                    if a.dry_run {
                        "would be removed"
                    } else {
                        "removed"
                    }
                ),
            };
            t += &format!(
                "group {}@{}  {}  {verdict}\n",
                g.vm,
                &g.id[..8.min(g.id.len())],
                time(g.time)
            );
        }
        if let Some(r) = &pruned {
            t += &super::prune::human(r);
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}
