//! The human rendering of a [`Layout`], as `inspect` prints it without `--json`.

use super::model::{
    BitLockerVariant, CopyState, EncryptedVolume, Layout, Location, LuksCopy, PartitionTable,
    VolumeFormat,
};
use crate::util::human_bytes;
use std::fmt::{self, Display, Formatter, Write as _};
use std::ops::Range;

impl Layout {
    /// Text for people: table, partitions, volumes, problems (one line each, indented).
    pub fn render(&self) -> String {
        self.to_string()
    }
}

fn state(s: &CopyState) -> String {
    match s {
        CopyState::Ok => "ok".into(),
        CopyState::Missing => "missing".into(),
        CopyState::Damaged(why) => format!("damaged ({why})"),
        CopyState::Mismatch(why) => format!("mismatch ({why})"),
    }
}

fn bytes(r: &Range<u64>) -> String {
    format!(
        "bytes {}..{} ({})",
        r.start,
        r.end,
        human_bytes(r.end.saturating_sub(r.start))
    )
}

impl Display for Layout {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "disk: {} ({} bytes)",
            human_bytes(self.disk_size),
            self.disk_size
        )?;
        match &self.table {
            PartitionTable::None => writeln!(f, "partition table: none")?,
            PartitionTable::Mbr(t) => writeln!(
                f,
                "partition table: MBR, {}-byte sectors, disk signature {}",
                t.sector_size, t.disk_signature
            )?,
            PartitionTable::Gpt(t) => {
                writeln!(
                    f,
                    "partition table: GPT, {}-byte sectors, disk GUID {}",
                    t.sector_size, t.disk_guid
                )?;
                writeln!(
                    f,
                    "  primary header: {}; backup header: {}; partitions from the {:?} copy",
                    state(&t.primary),
                    state(&t.backup),
                    t.used
                )?;
            }
        }
        let parts = self.table.partitions();
        if !parts.is_empty() {
            writeln!(
                f,
                "  {:>3} {:>14} {:>14} {:>10}  type",
                "#", "first byte", "last byte", "size"
            )?;
        }
        for p in parts {
            let mut line = format!(
                "  {:>3} {:>14} {:>14} {:>10}  {}",
                p.index,
                p.first_byte,
                p.last_byte,
                human_bytes(p.range().end - p.first_byte),
                p.type_name.as_deref().unwrap_or(&p.type_code)
            );
            if let Some(role) = p.mbr_role {
                let _ = write!(line, " ({role:?}, {})", p.type_code);
            }
            if let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) {
                let _ = write!(line, " \"{}\"", name.escape_debug());
            }
            if p.attributes != 0 {
                let _ = write!(line, " attributes 0x{:x}", p.attributes);
            }
            writeln!(f, "{line}")?;
        }
        if self.volumes.is_empty() {
            writeln!(f, "encrypted volumes: none found")?;
        } else {
            writeln!(f, "encrypted volumes:")?;
        }
        for v in &self.volumes {
            volume(f, v)?;
        }
        if !self.problems.is_empty() {
            writeln!(f, "problems:")?;
        }
        for p in &self.problems {
            writeln!(f, "  {} at byte {}: {}", p.structure, p.offset, p.message)?;
        }
        Ok(())
    }
}

fn volume(f: &mut Formatter<'_>, v: &EncryptedVolume) -> fmt::Result {
    let at = match v.location {
        Location::Disk => "whole disk".to_string(),
        Location::Partition { index } => format!("partition {index}"),
    };
    let kind = match &v.format {
        VolumeFormat::Luks1 => "LUKS1".to_string(),
        VolumeFormat::Luks2(_) => "LUKS2".to_string(),
        VolumeFormat::BitLocker(b) => format!(
            "BitLocker ({}) {}",
            match b.variant {
                BitLockerVariant::Vista => "Vista",
                BitLockerVariant::Win7 => "Windows 7+",
                BitLockerVariant::ToGo => "To Go",
            },
            b.method
        ),
    };
    let unknown = || "?".to_string();
    writeln!(
        f,
        "  {at}, {}: {kind}, cipher {} {}, {} key bits",
        bytes(&v.volume),
        v.cipher.clone().unwrap_or_else(unknown),
        v.mode.clone().unwrap_or_else(unknown),
        v.key_bits.map_or_else(unknown, |k| k.to_string()),
    )?;
    let payload = match &v.payload {
        None => unknown(),
        Some(p) if p.is_empty() => "none (nothing is encrypted)".to_string(),
        Some(p) => bytes(p),
    };
    let uuid = v.uuid.clone().unwrap_or_else(unknown);
    writeln!(f, "    payload {payload}; UUID {uuid}")?;
    if !v.plaintext.is_empty() {
        let plain: Vec<String> = v.plaintext.iter().map(bytes).collect();
        writeln!(f, "    not yet encrypted (plaintext): {}", plain.join(", "))?;
    }
    if let Some(size) = v.volume_size {
        writeln!(f, "    volume size (from its header): {size} bytes")?;
    }
    match &v.format {
        VolumeFormat::Luks1 => {}
        VolumeFormat::Luks2(h) => {
            let copy = |c: &super::model::Luks2Copy| {
                let seq = c.seqid.map_or_else(unknown, |s| s.to_string());
                format!("at byte {} {} (seqid {seq})", c.offset, state(&c.state))
            };
            let used = match h.used {
                LuksCopy::Primary => "primary",
                LuksCopy::Secondary => "secondary",
            };
            writeln!(
                f,
                "    headers ({} bytes each): primary {}; secondary {}; using the {used}",
                h.header_size,
                copy(&h.primary),
                copy(&h.secondary)
            )?;
        }
        VolumeFormat::BitLocker(b) => {
            let blocks: Vec<String> = b
                .metadata_blocks
                .iter()
                .map(|m| format!("at byte {} {}", m.offset, state(&m.state)))
                .collect();
            writeln!(
                f,
                "    FVE metadata blocks: {}; method code 0x{:04x}",
                blocks.join(", "),
                b.method_code
            )?;
            if !b.state.is_empty() {
                writeln!(f, "    state: {}", b.state)?;
            }
            if let Some(n) = b.encrypted_size {
                writeln!(f, "    encrypted size: {n} bytes")?;
            }
            if let (Some(at), Some(len)) = (b.volume_header_offset, b.volume_header_size) {
                writeln!(f, "    boot sectors relocated to byte {at} ({len} bytes)")?;
            }
            if b.used_space_only {
                writeln!(
                    f,
                    "    used space only: clusters free at encryption may hold plaintext"
                )?;
            }
        }
    }
    Ok(())
}
