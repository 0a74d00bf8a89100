//! `blockvault inspect SOURCE`: what a backup of SOURCE would see, without touching a vault.

use std::process::ExitCode;

use serde_json::json;

use blockvault::engine::scan_layout;
use blockvault::source::{self, OpenOptions};
use blockvault::util::human_bytes;

use super::Context;

/// Arguments of `inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A raw or qcow2 image, a block device, or an NBD export.
    source: String,
}

/// Print size, format, allocation, dirty bitmaps, partition table and encrypted volumes.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let src = source::open(&a.source, &OpenOptions::default())?;
    let size = src.size();
    let data = src.data_ranges()?;
    let allocated: u64 = data.iter().map(|r| r.end - r.start).sum();
    let bitmaps = src.bitmaps()?;
    let layout = scan_layout(src.as_ref());
    let doc = json!({
        "command": "inspect",
        "source": a.source,
        "format": src.kind(),
        "size": size,
        "sector_size": src.sector_size(),
        "allocated_bytes": allocated,
        "data_ranges": data.len(),
        "bitmaps": bitmaps,
        "layout": layout,
    });
    ctx.out.result(doc, || {
        let mut t = format!(
            "{}: {}, {} ({} bytes), {}-byte sectors\nallocated: {} in {} range(s) ({:.1} %)\n",
            a.source,
            src.kind(),
            human_bytes(size),
            size,
            src.sector_size(),
            human_bytes(allocated),
            data.len(),
            if size == 0 {
                0.0
            } else {
                100.0 * allocated as f64 / size as f64
            }
        );
        if bitmaps.is_empty() {
            t += "dirty bitmaps: none\n";
        }
        for b in &bitmaps {
            t += &format!(
                "dirty bitmap {}: {}{}{}{}\n",
                b.name,
                match b.enabled {
                    Some(true) => "enabled",
                    Some(false) => "disabled",
                    None => "present (enabled or disabled: not reported over NBD)",
                },
                b.granularity
                    .map(|g| format!(", granularity {}", human_bytes(g)))
                    .unwrap_or_default(),
                b.dirty_bytes
                    .map(|d| format!(", {} dirty", human_bytes(d)))
                    .unwrap_or_default(),
                if b.in_use {
                    ", IN USE (stale: QEMU did not close it; refused for backups)"
                } else {
                    ""
                }
            );
        }
        match &layout {
            Some(l) => t += &l.render(),
            None => t += "layout: the headers could not be read (see the warning above)\n",
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}
