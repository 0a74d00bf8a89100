//! `blockvault serve DISK[@ID]|group:VM[@ID]… [--listen HOST:PORT | --socket PATH] [--writable --overlay FILE]`:
//! snapshots as NBD exports until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use serde_json::json;

use blockvault::engine::require_disk;
use blockvault::reader::{check_digest, SnapshotReader, CACHE_BYTES};
use blockvault::serve::overlay::{Overlay, OverlayId};
use blockvault::serve::{serve, Export, Listen, Listener};
use blockvault::vm::group;

use super::Context;

/// Arguments of `serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// DISK, DISK@latest or DISK@SNAPSHOT-ID (a unique prefix is enough); each is served as
    /// an export named DISK@ID (ID: the snapshot's short id). group:VM, group:VM@latest or
    /// group:VM@GROUP-ID serves every disk of a VM's group, each as its own export.
    #[arg(required = true, value_name = "DISK[@ID]|group:VM[@ID]")]
    snapshots: Vec<String>,
    /// TCP address to listen on (port 0: any free port, shown in the ready line).
    #[arg(
        long,
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:10809",
        conflicts_with = "socket"
    )]
    listen: String,
    /// Listen on this Unix socket instead (created, removed on exit).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Accept writes, copy-on-write into --overlay FILE; the vault is never written.
    #[arg(long, requires = "overlay")]
    writable: bool,
    /// The overlay file of a --writable export: created sparse, or continued when it was made
    /// for the same snapshot.
    #[arg(long, value_name = "FILE", requires = "writable")]
    overlay: Option<PathBuf>,
}

/// Serve snapshots.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    if a.writable && a.snapshots.len() != 1 {
        bail!(blockvault::Error::usage(
            "--writable serves one snapshot (one overlay file belongs to one snapshot)"
        ));
    }
    let vault = ctx.open_vault_unwrapping()?;
    let mut opened = Vec::new();
    for spec in &a.snapshots {
        if let Some(vm) = spec.strip_prefix(super::restore::group::PREFIX) {
            // Every member, each its own export: one point in time of the whole VM.
            let g = group::resolve(&vault, vm)?;
            for (member, m) in g.require_complete()? {
                let disk = require_disk(&vault, &member.disk)?;
                check_digest(&disk, m)?;
                opened.push((disk, m.clone()));
            }
            continue;
        }
        let (name, id) = spec.split_once('@').unwrap_or((spec, "latest"));
        let disk = require_disk(&vault, name)?;
        let m = vault.resolve_snapshot(&disk, id)?;
        check_digest(&disk, &m)?;
        opened.push((disk, m));
    }
    if a.writable && opened.len() != 1 {
        bail!(blockvault::Error::usage(
            "--writable serves one disk (one overlay file belongs to one snapshot); a group has several"
        ));
    }
    let mut exports = Vec::new();
    for (disk, m) in &opened {
        let overlay = match &a.overlay {
            None => None,
            Some(path) => Some(Overlay::open(
                path,
                &OverlayId {
                    vault: vault.config().vault_id,
                    disk: disk.id,
                    snapshot: m.id.0,
                    size: m.disk_size,
                },
            )?),
        };
        let name = format!("{}@{}", disk.name, m.id.short());
        if exports.iter().any(|e: &Export| e.name == name) {
            bail!(blockvault::Error::usage(format!("{name} is named twice")));
        }
        exports.push(Export::new(
            name,
            SnapshotReader::new(&vault, disk, m, CACHE_BYTES),
            overlay,
        ));
    }
    let listen = match &a.socket {
        Some(p) => Listen::Unix(p.clone()),
        None => Listen::Tcp(a.listen.clone()),
    };
    let listener = Listener::bind(&listen)?;
    let list: Vec<_> = exports
        .iter()
        .map(|e| {
            json!({
                "name": e.name,
                "url": listener.export_url(&e.name),
                "size": e.size(),
                "writable": e.writable(),
                "overlay_blocks": e.blocks_written(),
            })
        })
        .collect();
    ctx.out
        .event(json!({ "event": "ready", "url": listener.url(), "exports": list }));
    let names: Vec<String> = exports
        .iter()
        .map(|e| listener.export_url(&e.name))
        .collect();
    eprintln!(
        "serving {} on {} ({}); Ctrl-C or SIGTERM stops",
        if a.writable {
            "copy-on-write"
        } else {
            "read-only"
        },
        listener.url(),
        names.join(", ")
    );
    let r = serve(&exports, &listener)?;
    let written: u64 = exports.iter().map(Export::blocks_written).sum();
    ctx.out.event(json!({
        "event": "stopped",
        "signal": r.signal,
        "connections": r.connections,
        "refused": r.refused,
        "overlay_blocks": written,
    }));
    eprintln!(
        "stopped by {} after {} connections",
        r.signal, r.connections
    );
    Ok(ExitCode::SUCCESS)
}
