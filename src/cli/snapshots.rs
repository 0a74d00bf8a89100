//! `blockvault snapshots`, with the groups their snapshots belong to ([`groups`]).

mod groups;

use std::process::ExitCode;

use serde_json::json;

use blockvault::util::human_bytes;

use super::output::time;
use super::Context;

/// Arguments of `snapshots`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
}

/// List snapshots, oldest first per disk.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault()?;
    let mut all = Vec::new();
    for disk in vault.disks()? {
        all.extend(vault.snapshots(&disk)?);
    }
    let groups = groups::of(&all, a.disk.as_deref());
    let rows: Vec<_> = all
        .into_iter()
        .filter(|m| a.disk.as_ref().is_none_or(|d| *d == m.disk_name))
        .collect();
    if let Some(d) = &a.disk {
        if rows.is_empty() && vault.find_disk(d)?.is_none() {
            return Err(blockvault::Error::new(
                blockvault::ErrorKind::NotFound,
                format!("vault has no disk named {d}"),
            )
            .into());
        }
    }
    let doc = json!({
        "command": "snapshots",
        "snapshots": rows.iter().map(|m| json!({
            "id": m.id.hex(),
            "short_id": m.id.short(),
            "disk": m.disk_name,
            "time": time(m.created),
            "source": m.source,
            "parent": m.parent.map(|p| p.hex()),
            "disk_size": m.disk_size,
            "slot_size": m.slot_size,
            "change_source": m.change_source,
            "change_detail": m.change_detail,
            "stats": m.stats,
            "bitmaps": m.info.bitmaps,
            "bitmap_created": m.info.bitmap_created,
            "notes": m.info.notes,
            "group": m.info.group.as_ref().map(|g| &g.id),
            "layout": serde_json::from_str::<serde_json::Value>(&m.layout).ok(),
        })).collect::<Vec<_>>(),
        "groups": groups::json(&groups),
    });
    ctx.out.result(doc, || {
        let mut t = format!(
            "{:<9} {:<16} {:<21} {:>10} {:>10} {:<9} {}\n",
            "ID", "DISK", "TIME", "SIZE", "STORED", "PARENT", "CHANGES"
        );
        for m in &rows {
            t += &format!(
                "{:<9} {:<16} {:<21} {:>10} {:>10} {:<9} {}\n",
                m.id.short(),
                m.disk_name,
                time(m.created),
                human_bytes(m.disk_size),
                human_bytes(m.stats.bytes_stored),
                m.parent.map(|p| p.short()).unwrap_or_else(|| "-".into()),
                serde_json::to_value(m.change_source)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            );
        }
        t += &format!("{} snapshots\n", rows.len());
        t += &groups::text(&groups);
        t
    });
    Ok(ExitCode::SUCCESS)
}
