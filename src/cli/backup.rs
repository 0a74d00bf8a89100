//! `blockvault backup SOURCE --disk NAME`, and `backup qmp:///SOCKET --disk-map …` ([`vm`]).

mod vm;

use std::process::ExitCode;

use serde_json::json;

use blockvault::changes;
use blockvault::engine::{self, auto_bitmap, BackupOptions, ChangeClaim, Compression, ParentSpec};
use blockvault::source::{self, OpenOptions, Source};
use blockvault::util::human_bytes;
use blockvault::vault::manifest::ChangeSource;

use super::output::{mb_per_s, mib_per_s, seconds};
use super::Context;

/// Arguments of `backup`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A raw or qcow2 disk image, a block device, an NBD export
    /// (`nbd://HOST:PORT/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`), or a running VM's QMP
    /// socket (`qmp:///PATH`, with --disk-map).
    source: String,
    /// Name of the disk in the vault.
    #[arg(
        long,
        required_unless_present = "disk_map",
        conflicts_with = "disk_map"
    )]
    disk: Option<String>,
    /// Snapshot to compare with: an id, `latest` (default) or `none` for a full read.
    #[arg(long, default_value = "latest")]
    parent: String,
    /// Slot size for the disk's first backup, a power of two from 64K to 4M.
    #[arg(long, default_value = "1M", value_parser = parse_slot_size)]
    slot_size: u32,
    /// zstd level.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    zstd_level: i32,
    /// Store data uncompressed.
    #[arg(long)]
    no_compress: bool,
    /// Read with pread instead of io_uring (also BLOCKVAULT_READER=pread).
    #[arg(long)]
    pread: bool,
    /// Do not use O_DIRECT on block devices.
    #[arg(long)]
    no_direct: bool,
    /// Seconds to wait for an NBD server (connecting, each handshake step, each reply)
    /// before failing the backup.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    nbd_timeout: u64,
    /// Worker threads, 0 for one per core [default: all cores]
    #[arg(long, value_name = "N", default_value_t = 0, hide_default_value = true)]
    threads: usize,
    /// Reads in flight.
    #[arg(long, default_value_t = 8)]
    queue_depth: usize,
    /// Read only what this dirty bitmap of the source (qcow2 image or NBD export) marks as
    /// written; carry every other slot over from the parent. Trusted only if the parent
    /// snapshot recorded it as present and recording; otherwise every slot is compared by
    /// hash. `auto` (qcow2 files): blockvault adds the next bitmap itself before reading,
    /// reads the one the parent added, and removes that one once the snapshot is committed.
    #[arg(long, value_name = "NAME|auto", conflicts_with = "changed")]
    bitmap: Option<String>,
    /// Read only the byte ranges this JSON file lists as changed (plain, AWS EBS, Azure page
    /// ranges or VMware CBT shapes; see README); carry every other slot over from the parent.
    #[arg(long, value_name = "FILE")]
    changed: Option<String>,
    /// With --bitmap or --changed: re-read at least this many random slots the change source
    /// calls unchanged (more for larger claims, at least 32 MiB of slots; 0: none) and, if
    /// any differs from the parent, compare every slot by hash instead.
    #[arg(long, value_name = "N", default_value_t = 8)]
    verify_unchanged: usize,
    /// Create a vault with a platform-managed key if the location holds none (otherwise
    /// only `init` creates one, so a mistyped --vault fails instead).
    #[arg(long)]
    init: bool,
    /// Back up a source whose partition table identity (GPT disk GUID, MBR disk signature)
    /// differs from the disk's latest snapshot.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    vm: vm::VmArgs,
}

/// The change source named on the command line, loaded.
fn change_claim(a: &Args, src: &dyn Source) -> anyhow::Result<Option<ChangeClaim>> {
    if a.parent == "none" && (a.bitmap.is_some() || a.changed.is_some()) {
        anyhow::bail!(blockvault::Error::usage(
            "--parent none reads the whole disk: it cannot be combined with --bitmap or --changed"
        ));
    }
    if let Some(name) = &a.bitmap {
        return Ok(Some(ChangeClaim {
            source: ChangeSource::Bitmap,
            detail: format!("bitmap {name}"),
            list: src.dirty_ranges(name)?,
            covers: None,
            bitmap: Some(name.clone()),
        }));
    }
    if let Some(path) = &a.changed {
        let loaded = changes::file::load(path)?;
        return Ok(Some(ChangeClaim {
            source: ChangeSource::ChangedList,
            detail: format!("change list {path} ({})", loaded.format),
            list: loaded.list,
            covers: loaded.covers,
            bitmap: None,
        }));
    }
    Ok(None)
}

/// The `--bitmap` value that asks blockvault to rotate the image's bitmaps itself.
const AUTO: &str = "auto";

fn parse_slot_size(s: &str) -> Result<u32, String> {
    u32::try_from(super::parse_size(s)?).map_err(|_| format!("{s} is too large"))
}

/// Run a backup (with `--init`, creating the vault first if the location holds none).
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    if blockvault::vm::is_qmp_url(&a.source) {
        return vm::run(ctx, a);
    }
    let Some(disk) = a.disk.clone() else {
        anyhow::bail!(blockvault::Error::usage(
            "--disk-map is for qmp:/// sources: give --disk NAME"
        ));
    };
    let url = ctx.vault_url()?;
    let auto = a.bitmap.as_deref() == Some(AUTO);
    let open = OpenOptions {
        no_direct: a.no_direct,
        nbd: source::NbdOptions {
            timeout: std::time::Duration::from_secs(a.nbd_timeout),
            bitmap: a.bitmap.clone().filter(|_| !auto),
        },
    };
    // The source first: a typo in its path must not leave a new, empty vault behind. An auto
    // backup opens it itself, around the qemu-img runs; here it is only checked.
    let src = match auto {
        true => {
            auto_bitmap::probe(&a.source, &open)?;
            None
        }
        false => Some(source::open(&a.source, &open)?),
    };
    let changes = match &src {
        Some(src) => change_claim(&a, src.as_ref())?,
        None => None,
    };
    let (vault, created) = open_vault(ctx, &a)?;
    let opts = BackupOptions {
        disk,
        changes,
        ..options(&a)
    };
    let ks = vault.keystore_file().display().to_string();
    let bar = ctx.out.progress("backup");
    let done = match src {
        Some(src) => engine::backup(&vault, src.as_ref(), &opts, &bar).map(|r| (r, None)),
        None => auto_bitmap::backup(&vault, &a.source, &open, &opts, &bar)
            .map(|done| (done.backup, Some(done.removed))),
    };
    let (r, removed) = done.map_err(|e| {
        let e = anyhow::Error::from(e);
        if !created {
            return e;
        }
        // The vault stays: say where its key is even though the backup failed.
        e.context(format!(
            "created vault at {url} (platform key in {ks}: keep a copy; `blockvault key export`), but its first backup failed"
        ))
    })?;
    drop(bar);
    for line in r.remarks.recorded() {
        eprintln!("{line}");
    }
    let mut doc = json!({
        "command": "backup",
        "vault": url,
        "vault_created": created,
        "keystore": ks,
        "bitmaps_removed": removed,
    });
    merge(&mut doc, snapshot_doc(&r));
    ctx.out.result(doc, || {
        let mut t = String::new();
        if created {
            t += &created_text(url, &ks);
        }
        t += &snapshot_text(&r);
        if let Some(b) = &r.info.bitmap_created {
            t += &format!("  bitmap {b} added: the next --bitmap auto backup reads it\n");
        }
        for b in removed.iter().flatten() {
            t += &format!("  bitmap {b} removed\n");
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}

/// The options of a backup the command line sets, other than its disk and change claim.
fn options(a: &Args) -> BackupOptions {
    BackupOptions {
        parent: match a.parent.as_str() {
            "latest" => ParentSpec::Latest,
            "none" => ParentSpec::None,
            id => ParentSpec::Id(id.to_string()),
        },
        slot_size: a.slot_size,
        compression: Compression {
            level: (!a.no_compress).then_some(a.zstd_level),
        },
        force_pread: a.pread,
        queue_depth: a.queue_depth.max(1),
        threads: a.threads,
        verify_unchanged: a.verify_unchanged,
        force: a.force,
        ..BackupOptions::default()
    }
}

/// The vault, created first with `--init` if the location holds none; whether it was.
fn open_vault(ctx: &Context, a: &Args) -> anyhow::Result<(blockvault::vault::Vault, bool)> {
    let (vault, created) = if a.init {
        let (vault, created) = blockvault::keys::init::open_or_init(
            ctx.vault_url()?,
            &ctx.keystore()?,
            &ctx.key_access(),
        )?;
        super::opened(&vault);
        (vault, created)
    } else {
        (ctx.open_vault()?, false)
    };
    // Nothing is written with a key that cannot unwrap: no backups nobody could read.
    super::key_access::require(&vault, &ctx.keys)?;
    vault.check_keys()?;
    Ok((vault, created))
}

/// Add the members of object `more` to object `doc`.
fn merge(doc: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(d), serde_json::Value::Object(m)) = (doc.as_object_mut(), more) {
        d.extend(m);
    }
}

/// What a first `backup --init` says about the vault it created.
fn created_text(url: &str, ks: &str) -> String {
    format!("created vault at {url}\nplatform key stored in {ks}\n  (keep a copy: without it the vault cannot be read; `blockvault key export`)\n")
}

/// The JSON figures of one snapshot a backup wrote.
fn snapshot_doc(r: &engine::BackupReport) -> serde_json::Value {
    let s = r.stats;
    let secs = seconds(s.duration_ms as f64 / 1000.0);
    json!({
        "disk": r.disk,
        "new_disk": r.new_disk,
        "snapshot": r.snapshot.hex(),
        "short_id": r.snapshot.short(),
        "parent": r.parent.map(|p| p.hex()),
        "change_source": r.change_source,
        "change_detail": r.change_detail,
        "reader": format!("{:?}", r.reader).to_lowercase(),
        "disk_size": r.disk_size,
        "slot_size": r.slot_size,
        "bytes_read": s.bytes_read,
        "bytes_stored": s.bytes_stored,
        "bytes_uploaded": r.bytes_uploaded,
        "slots_new": s.slots_new,
        "slots_reused": s.slots_reused,
        "slots_zero": s.slots_zero,
        "verify_unchanged": r.verify_unchanged,
        "bitmaps": r.info.bitmaps,
        "bitmap_created": r.info.bitmap_created,
        "seconds": secs,
        "mb_per_s": mb_per_s(s.bytes_read, secs),
        "warnings": r.remarks.warnings,
        "notes": r.notes,
    })
}

/// What a person reads about one snapshot a backup wrote.
fn snapshot_text(r: &engine::BackupReport) -> String {
    let s = r.stats;
    let secs = seconds(s.duration_ms as f64 / 1000.0);
    let mut t = String::new();
    if !r.change_detail.is_empty() {
        t += &format!("changes from {}\n", r.change_detail);
    }
    // Notes about the source were printed on stderr already.
    let about_source = |n: &String| r.remarks.notes.contains(n);
    for note in r
        .notes
        .iter()
        .filter(|n| **n != r.change_detail && !about_source(n))
    {
        t += &format!("note: {note}\n");
    }
    t += &format!(
        "snapshot {} of disk {} ({}{})\n  disk {}, read {}, stored {} new\n  slots: {} new, {} unchanged, {} zero; {:.2} s, read at {:.1} MiB/s\n",
        r.snapshot.short(),
        r.disk,
        serde_json::to_value(r.change_source).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default(),
        r.parent.map(|p| format!(", parent {}", p.short())).unwrap_or_default(),
        human_bytes(r.disk_size),
        human_bytes(s.bytes_read),
        human_bytes(s.bytes_stored),
        s.slots_new,
        s.slots_reused,
        s.slots_zero,
        secs,
        mib_per_s(s.bytes_read, secs),
    );
    t
}
