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

/// List snapshots, oldest first across disks.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let vault = ctx.open_vault_unwrapping()?;
    let mut per_disk = Vec::new();
    for disk in vault.disks()? {
        per_disk.push(vault.snapshots(&disk)?);
    }
    // Groups from every disk's snapshots: a group lists all its members, also those on
    // disks --disk leaves out.
    let all: Vec<_> = per_disk.iter().flatten().cloned().collect();
    let groups = groups::of(&all, a.disk.as_deref());
    per_disk.retain(|h| a.disk.is_none() || h.first().map(|m| &m.disk_name) == a.disk.as_ref());
    let rows = oldest_first(per_disk, |m| m.created, |m| &m.disk_name);
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

/// The snapshots of every disk in one list, oldest first. Each disk's own order (its
/// sequence numbers, `Vault::snapshots`) is kept even where the clock went backwards between
/// two of its backups: a snapshot sorts by the latest time among it and its predecessors.
/// Equal times sort by disk name.
fn oldest_first<T>(
    per_disk: Vec<Vec<T>>,
    created: impl Fn(&T) -> u64,
    disk: impl Fn(&T) -> &str,
) -> Vec<T> {
    let mut all: Vec<(u64, T)> = Vec::new();
    for history in per_disk {
        let mut latest = 0;
        for m in history {
            latest = latest.max(created(&m));
            all.push((latest, m));
        }
    }
    // Stable: snapshots of one disk with equal keys stay in sequence order.
    all.sort_by(|(a, ma), (b, mb)| a.cmp(b).then_with(|| disk(ma).cmp(disk(mb))));
    all.into_iter().map(|(_, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_interleave_by_time_and_each_keeps_its_sequence() {
        // (disk, created, sequence); the clock went back between a's second and third backup.
        let b = vec![("b", 100, 0), ("b", 300, 1)];
        let a = vec![("a", 200, 0), ("a", 400, 1), ("a", 350, 2)];
        let c = vec![("c", 100, 0)];
        let rows = oldest_first(vec![b, a, c], |s| s.1, |s| s.0);
        let got: Vec<(&str, u64)> = rows.iter().map(|s| (s.0, s.2)).collect();
        assert_eq!(
            got,
            [("b", 0), ("c", 0), ("a", 0), ("b", 1), ("a", 1), ("a", 2)]
        );
    }
}
