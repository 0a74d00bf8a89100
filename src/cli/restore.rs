//! `blockvault restore DISK[@ID|@latest] TARGET`: to a file (raw or qcow2), a block device or
//! an NBD export; `--skip-damaged` for a best-effort restore that lists what it could not.
//! `restore group:VM[@ID] …` restores every disk of a VM's group ([`group`]).

pub(super) mod group;

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;

use blockvault::engine::require_disk;
use blockvault::restore::target::Format;
use blockvault::restore::{self, Damage, RestoreOptions};
use blockvault::util::human_bytes;

use super::output::{mb_per_s, mib_per_s, seconds};
use super::Context;

/// Arguments of `restore`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// DISK, DISK@latest or DISK@SNAPSHOT-ID (a unique prefix is enough); or a group:
    /// group:VM, group:VM@latest, group:VM@GROUP-ID.
    snapshot: String,
    /// File, block device, or NBD export (nbd://HOST:PORT/EXPORT,
    /// nbd+unix:///EXPORT?socket=PATH) to write; for a group, a folder (each disk to
    /// FOLDER/DISK.raw, DISK.qcow2 with --format qcow2) or DISK=TARGET[,DISK=TARGET...] naming
    /// every disk.
    target: PathBuf,
    /// Overwrite a non-empty target file, or a device or NBD export that holds data (never a
    /// device that is mounted or in use).
    #[arg(long)]
    force: bool,
    /// What to write into a file: raw, or a qcow2 image (default: qcow2 for a TARGET named
    /// *.qcow2, else raw).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Best effort: write data that fails its checks (damaged or missing packs) as zeros,
    /// list those ranges, go on, keep the target, and exit 3.
    #[arg(long)]
    skip_damaged: bool,
    /// Return without waiting for the data to reach stable storage.
    #[arg(long)]
    no_sync: bool,
    /// Only LEN bytes from byte OFF of the disk (e.g. 1048576:4096 or 1M:64K), written to
    /// the start of TARGET.
    #[arg(long, value_name = "OFF:LEN", value_parser = parse_range)]
    range: Option<std::ops::Range<u64>>,
    /// Also write the disk's escrowed volume keys (`key escrow`) into DIR, one file per name,
    /// mode 0600 (the folder is created 0700).
    #[arg(long, value_name = "DIR")]
    with_escrow: Option<PathBuf>,
    /// For a group: write the VM configuration kept with it here (default with a folder
    /// target: FOLDER/<its file name>).
    #[arg(long, value_name = "FILE")]
    vm_config: Option<PathBuf>,
}

/// `--format` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

/// The file an escrowed key named `name` is written to. Names are printable text without `/`
/// or NUL; keep the file name plain anyway.
fn file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_alphanumeric() || "-_.@".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Write each escrowed secret of `disk` to `dir/<name>`; returns the names written.
fn write_escrows(
    vault: &blockvault::vault::Vault,
    disk: &blockvault::vault::Disk,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |what: String| move |e| blockvault::Error::io(what, e);
    let escrows = vault.escrows(disk)?;
    for (i, e) in escrows.iter().enumerate() {
        let file = file_name(&e.name);
        if let Some(other) = escrows[..i].iter().find(|o| file_name(&o.name) == file) {
            anyhow::bail!("escrowed keys {:?} and {:?} would both be written to {}: nothing was written; rename one (`key escrow --name`)", other.name, e.name, dir.join(&file).display());
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    let mut names = Vec::new();
    for e in escrows {
        let path = dir.join(file_name(&e.name));
        // O_NOFOLLOW: a link planted in DIR must not send the secret elsewhere.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => blockvault::Error::new(
                    blockvault::ErrorKind::Usage,
                    format!("{} is a symbolic link: an escrowed key is never written through one (remove it or choose another folder)", path.display()),
                ),
                _ => io(format!("creating {}", path.display()))(e),
            })?;
        // An existing file keeps its mode on open: make it private before writing.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .and_then(|_| f.write_all(&e.secret))
            .and_then(|_| f.sync_all())
            .map_err(io(format!("writing {}", path.display())))?;
        names.push(e.name.clone());
    }
    Ok(names)
}

/// How to restore, as the command line says (for one disk, or every member of a group).
fn options(a: &Args) -> RestoreOptions {
    RestoreOptions {
        force: a.force,
        sync: !a.no_sync,
        range: a.range.clone(),
        format: a.format.map(Format::from),
        skip_damaged: a.skip_damaged,
        ..RestoreOptions::default()
    }
}

/// Restore a snapshot.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    if let Some(spec) = a.snapshot.strip_prefix(group::PREFIX) {
        return group::run(ctx, spec, &a);
    }
    let vault = ctx.open_vault_unwrapping()?;
    let (name, spec) = a
        .snapshot
        .split_once('@')
        .unwrap_or((&a.snapshot, "latest"));
    let disk = require_disk(&vault, name)?;
    let m = vault.resolve_snapshot(&disk, spec)?;
    let bar = ctx.out.progress("restore");
    let r = restore::restore(&vault, &disk, &m, &a.target, &options(&a), &bar)?;
    drop(bar);
    let secs = seconds(r.seconds);
    let escrowed = match &a.with_escrow {
        Some(dir) => write_escrows(&vault, &disk, dir)?,
        None => Vec::new(),
    };
    let doc = json!({
        "escrow_written": escrowed,
        "command": "restore",
        "disk": disk.name,
        "snapshot": m.id.hex(),
        "target": a.target.display().to_string(),
        "bytes_total": r.bytes_total,
        "bytes_written": r.bytes_written,
        "bytes_fetched": r.bytes_fetched,
        "slots_zero": r.slots_zero,
        "seconds": secs,
        "mb_per_s": mb_per_s(r.bytes_written, secs),
        "verified_digest": true,
        "target_kind": r.target_kind,
        "format": r.format,
        "damaged": r.damaged,
    });
    ctx.out.result(doc, || {
        format!(
            "restored {}@{} to {}: {} ({} data), digest verified, {:.2} s, written at {:.1} MiB/s\n",
            disk.name,
            m.id.short(),
            a.target.display(),
            human_bytes(r.bytes_total),
            human_bytes(r.bytes_written),
            secs,
            mib_per_s(r.bytes_written, secs)
        ) + &match &a.with_escrow {
            Some(dir) => format!(
                "escrowed keys written to {}: {}\n",
                dir.display(),
                escrowed.join(", ")
            ),
            None => String::new(),
        } + &damage_lines(&r.damaged)
    });
    if r.damaged.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(super::INTEGRITY))
    }
}

/// The damaged ranges a `--skip-damaged` restore wrote as zeros, one line each.
fn damage_lines(damaged: &[Damage]) -> String {
    if damaged.is_empty() {
        return String::new();
    }
    let bytes: u64 = damaged.iter().map(|d| d.length).sum();
    let mut out = format!(
        "DAMAGED: {} range(s), {} written as zeros (the rest is exact):\n",
        damaged.len(),
        human_bytes(bytes)
    );
    for d in damaged {
        out += &format!(
            "  disk offset {}, {} bytes: pack {}, extent {}: {}\n",
            d.offset,
            d.length,
            d.pack,
            &d.extent[..d.extent.len().min(16)],
            d.error
        );
    }
    out
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
