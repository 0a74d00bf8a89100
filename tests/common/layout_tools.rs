//! The fixtures of the disk layout tests (`tests/layout.rs`, `tests/layout_shapes.rs`):
//! partition tables written by `sfdisk` and read back with `sfdisk --json`, LUKS volumes made
//! by `cryptsetup luksFormat`, loop devices with 4096-byte sectors, and the scan-and-compare
//! helpers that hold a [`Layout`] against what the tools report.

use super::tools::run_tool;
use super::LoopDev;
use blockvault::layout::{
    self, EncryptedVolume, Layout, PartitionTable, ScanOptions, VolumeFormat,
};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// sfdisk, for [`super::tools::tools`].
pub const SFDISK: (&str, &str) = ("sfdisk", "fdisk");
/// cryptsetup, for [`super::tools::tools`].
pub const CRYPTSETUP: (&str, &str) = ("cryptsetup", "cryptsetup-bin");

/// Run a command with `stdin`, panicking with its output if it fails; its stdout.
pub fn run(program: &str, args: &[&str], stdin: &str) -> String {
    String::from_utf8(run_tool(Command::new(program).args(args), stdin)).expect("UTF-8 output")
}

/// Partition `target` (an image file or a device) with an sfdisk script.
pub fn sfdisk(target: &Path, script: &str) {
    let t = target.to_str().unwrap();
    run(
        "sfdisk",
        &[
            "-q",
            "--no-reread",
            "--no-tell-kernel",
            "--wipe",
            "always",
            t,
        ],
        script,
    );
}

/// `sfdisk --json` of `target`: the "partitiontable" object.
pub fn sfdisk_json(target: &Path) -> Value {
    let out = run("sfdisk", &["--json", target.to_str().unwrap()], "");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["partitiontable"].clone()
}

/// A fresh sparse file of `size` bytes.
pub fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

pub const KEY: &[u8] = b"a key file for the layout tests, 32+ bytes long";

/// `cryptsetup luksFormat` a new file of `size` bytes with the fastest key derivation.
pub fn luks_format(dir: &Path, name: &str, size: u64, extra: &[&str]) -> PathBuf {
    let path = image(dir, name, size);
    let key = dir.join("key");
    std::fs::write(&key, KEY).unwrap();
    let mut args = vec![
        "luksFormat",
        "-q",
        "--key-file",
        key.to_str().unwrap(),
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
    ];
    args.extend_from_slice(extra);
    args.push(path.to_str().unwrap());
    run("cryptsetup", &args, "");
    path
}

/// A `Name: value` line of `cryptsetup luksDump` output.
pub fn dump_field(dump: &str, name: &str) -> String {
    dump.lines()
        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {name} in luksDump:\n{dump}"))
}

// ---------------------------------------------------------------------------------------------
// Scanning and comparing
// ---------------------------------------------------------------------------------------------

pub fn scan_file_with(path: &Path, opts: &ScanOptions) -> Layout {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let read = |off: u64, buf: &mut [u8]| {
        f.read_exact_at(buf, off)
            .map_err(|e| blockvault::Error::io(path.display().to_string(), e))
    };
    let layout = layout::scan_with(&read, size, opts).unwrap();
    // Every layout survives the JSON a manifest or `inspect --json` stores it as.
    let json = serde_json::to_string(&layout).unwrap();
    assert_eq!(serde_json::from_str::<Layout>(&json).unwrap(), layout);
    layout
}

pub fn scan_file(path: &Path) -> Layout {
    scan_file_with(path, &ScanOptions::default())
}

/// Write `bytes` into `path` at `offset`.
pub fn put(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Copy the whole of `from` into `to` at `offset` (dd of a volume into a partition).
pub fn dd(from: &Path, to: &Path, offset: u64) {
    put(to, offset, &std::fs::read(from).unwrap());
}

pub fn copy(from: &Path, dir: &Path, name: &str) -> PathBuf {
    let to = dir.join(name);
    std::fs::copy(from, &to).unwrap();
    to
}

/// GPT attribute bits from sfdisk's `attrs` text.
/// The BitLocker details of a volume the scan found, panicking if it found another format.
pub fn bitlocker_info(v: &EncryptedVolume) -> &layout::BitLockerInfo {
    match &v.format {
        VolumeFormat::BitLocker(b) => b,
        f => panic!("expected BitLocker, found {f:?}"),
    }
}

pub fn sfdisk_attrs(text: &str) -> u64 {
    let mut bits = 0u64;
    for word in text.split_whitespace() {
        match word {
            "RequiredPartition" => bits |= 1,
            "NoBlockIOProtocol" => bits |= 2,
            "LegacyBIOSBootable" => bits |= 4,
            w => {
                let list = w.strip_prefix("GUID:").expect("known sfdisk attribute");
                for n in list.split(',') {
                    bits |= 1 << n.parse::<u32>().unwrap();
                }
            }
        }
    }
    bits
}

/// The partitions found must be exactly what sfdisk reports.
pub fn assert_same_partitions(layout: &Layout, sf: &Value) {
    let ss = sf["sectorsize"].as_u64().unwrap();
    let want = sf["partitions"].as_array().unwrap();
    let got = layout.table.partitions();
    assert_eq!(got.len(), want.len(), "{got:#?}\nvs sfdisk {want:#?}");
    for (p, w) in got.iter().zip(want) {
        let node = w["node"].as_str().unwrap();
        let digits = node.len() - node.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let index: u32 = node[node.len() - digits..].parse().unwrap();
        assert_eq!(p.index, index, "{node}");
        let start = w["start"].as_u64().unwrap();
        let size = w["size"].as_u64().unwrap();
        assert_eq!(p.first_byte, start * ss, "{node}");
        assert_eq!(p.last_byte, (start + size) * ss - 1, "{node}");
        let sf_type = w["type"].as_str().unwrap();
        match &layout.table {
            PartitionTable::Mbr(_) => {
                let t = u8::from_str_radix(sf_type, 16).unwrap();
                assert_eq!(p.type_code, format!("0x{t:02x}"), "{node}");
                let bootable = w["bootable"].as_bool().unwrap_or(false);
                assert_eq!(p.attributes == 0x80, bootable, "{node}");
            }
            PartitionTable::Gpt(_) => {
                assert_eq!(p.type_code, sf_type, "{node}");
                assert_eq!(p.guid.as_deref(), w["uuid"].as_str(), "{node}");
                assert_eq!(p.name.as_deref(), Some(w["name"].as_str().unwrap_or("")));
                assert_eq!(
                    p.attributes,
                    sfdisk_attrs(w["attrs"].as_str().unwrap_or(""))
                );
            }
            PartitionTable::None => unreachable!(),
        }
    }
}

pub fn only_volume(layout: &Layout) -> &EncryptedVolume {
    assert_eq!(layout.volumes.len(), 1, "{}", layout.render());
    &layout.volumes[0]
}

pub fn luks2_headers(v: &EncryptedVolume) -> &layout::Luks2Headers {
    match &v.format {
        VolumeFormat::Luks2(h) => h,
        f => panic!("expected LUKS2, found {f:?}"),
    }
}

/// A loop device over `img` with 4096-byte logical sectors (a 4Kn disk), or `None` after
/// a SKIP line.
pub fn loop_4k(img: &Path, test: &str) -> Option<LoopDev> {
    let dev = LoopDev::attach(img, test)?;
    let dev_path = dev.path.to_str().unwrap().to_string();
    run("losetup", &["--sector-size", "4096", &dev_path], "");
    let ss = run("blockdev", &["--getss", &dev_path], "");
    assert_eq!(ss.trim(), "4096");
    Some(dev)
}

// ---------------------------------------------------------------------------------------------
// BitLocker volumes, built from the published format
// ---------------------------------------------------------------------------------------------
//
// No Linux tool writes BitLocker, so the headers are built here, field by field, from libbde's
// "BitLocker Drive Encryption (BDE) format" (libyal/libbde, documentation/): the tables
// "Volume header" (BitLocker Windows Vista / Windows 7 and later / To Go), "FVE metadata block
// header version 1 / version 2" and "FVE metadata header (version 1)". The conversion states
// are dislocker's (`metadata.priv.h`, `enum state_types`).

/// The BitLocker identifier 4967D63B-2E29-4AD8-8399-F6A339E3D001 (libbde: "The BitLocker
/// identifier (GUID)"), in the volume header of Windows 7+ (@160) and To Go (@424) volumes.
pub const BITLOCKER_ID: &str = "4967D63B-2E29-4AD8-8399-F6A339E3D001";
/// libbde: "BitLocker Used Disk Space Only encryption uses 92a84d3b-dd80-4d0e-9e4e-b1e3284eaed8".
pub const USED_SPACE_ONLY_ID: &str = "92A84D3B-DD80-4D0E-9E4E-B1E3284EAED8";

/// A GUID's on-disk bytes (first three groups little-endian) from its text form.
pub fn guid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let mut b: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    b.try_into().unwrap()
}

fn set(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The fields of one BitLocker volume that a test chooses; [`Bde::new`] fills in what a
/// Windows-made volume typically holds.
#[derive(Clone)]
pub struct Bde {
    pub variant: blockvault::layout::BitLockerVariant,
    /// Volume header @11.
    pub bytes_per_sector: u16,
    /// Volume header @13 (Vista: block 1's cluster number is counted in these).
    pub sectors_per_cluster: u8,
    /// The three FVE metadata block offsets, from the volume start.
    pub blocks: [u64; 3],
    /// To Go volume header @3 (libbde's table says "MSWIN4.1").
    pub oem_name: [u8; 8],
    /// The identifier GUID @160 (Windows 7+) or @424 (To Go).
    pub identifier: &'static str,
    /// Volume header total sector count (Vista @40, To Go @32).
    pub total_sectors: u64,
    /// FVE metadata header @36: the encryption method.
    pub method: u16,
    /// FVE metadata header @16: the volume identifier.
    pub volume_guid: &'static str,
    /// FVE block header @12 (and its copy @14): 1 decrypted, 2 converting, 4 encrypted,
    /// 5 paused.
    pub state: u16,
    /// FVE block header v2 @16: "Encrypted volume size".
    pub encrypted_size: u64,
    /// FVE block header v2 @28: "Number of volume header sectors".
    pub header_sectors: u32,
    /// FVE block header v2 @56: "Volume header offset" (from the volume start).
    pub header_offset: u64,
}

impl Bde {
    /// A fully encrypted volume of `len` bytes with 512-byte sectors, 8 per cluster, the FVE
    /// blocks at 512 KiB + 32 KiB, 1.5 MiB and 2.5 MiB, and 16 relocated boot sectors after
    /// block 3 (Windows 7's usual 8 KiB).
    pub fn new(variant: blockvault::layout::BitLockerVariant, len: u64) -> Bde {
        let blocks = [(1 << 19) + 4096 * 8, 3 << 19, 5 << 19];
        Bde {
            variant,
            bytes_per_sector: 512,
            sectors_per_cluster: 8,
            blocks,
            oem_name: *b"MSWIN4.1",
            identifier: BITLOCKER_ID,
            total_sectors: len / 512,
            method: 0x8004,
            volume_guid: "0A1B2C3D-4E5F-6071-8293-A4B5C6D7E8F9",
            state: 4,
            encrypted_size: len,
            header_sectors: 16,
            header_offset: blocks[2] + 65536,
        }
    }

    fn is_vista(&self) -> bool {
        self.variant == blockvault::layout::BitLockerVariant::Vista
    }

    /// The 512-byte volume header (libbde "Volume header", the variant's table).
    pub fn volume_header(&self) -> Vec<u8> {
        use blockvault::layout::BitLockerVariant as V;
        let mut h = vec![0u8; 512];
        set(&mut h, 11, &self.bytes_per_sector.to_le_bytes()); // Bytes per sector
        h[13] = self.sectors_per_cluster; // Sectors per cluster block
        h[21] = 0xf8; // Media descriptor
        set(&mut h, 24, &63u16.to_le_bytes()); // Sectors per track (0x3f)
        set(&mut h, 26, &255u16.to_le_bytes()); // Number of heads
        match self.variant {
            V::Vista => {
                set(&mut h, 0, &[0xeb, 0x52, 0x90]); // Boot entry point
                set(&mut h, 3, b"-FVE-FS-"); // File system signature
                set(&mut h, 40, &self.total_sectors.to_le_bytes()); // sectors (64-bit)
                set(&mut h, 48, &4u64.to_le_bytes()); // MFT cluster block number
                let cluster =
                    u64::from(self.bytes_per_sector) * u64::from(self.sectors_per_cluster);
                // FVE metadata block 1 cluster block number
                set(&mut h, 56, &(self.blocks[0] / cluster).to_le_bytes());
            }
            V::Win7 => {
                set(&mut h, 0, &[0xeb, 0x58, 0x90]); // Boot entry point
                set(&mut h, 3, b"-FVE-FS-"); // File system signature
                set(&mut h, 82, b"FAT32   "); // File system signature
                set(&mut h, 160, &guid_bytes(self.identifier)); // BitLocker identifier
                for (i, b) in self.blocks.iter().enumerate() {
                    set(&mut h, 176 + 8 * i, &b.to_le_bytes()); // FVE metadata block i offset
                }
            }
            V::ToGo => {
                set(&mut h, 0, &[0xeb, 0x58, 0x90]); // Boot entry point
                set(&mut h, 3, &self.oem_name); // Signature
                set(&mut h, 32, &(self.total_sectors as u32).to_le_bytes()); // sectors (32-bit)
                set(&mut h, 71, b"NO NAME    FAT32   "); // Volume label, file system signature
                set(&mut h, 424, &guid_bytes(self.identifier)); // BitLocker identifier
                for (i, b) in self.blocks.iter().enumerate() {
                    set(&mut h, 440 + 8 * i, &b.to_le_bytes()); // FVE metadata block i offset
                }
            }
        }
        set(&mut h, 510, &[0x55, 0xaa]); // Sector signature
        h
    }

    /// An FVE metadata block: the 64-byte block header (libbde "FVE metadata block header
    /// version 1 - Windows Vista" or "version 2 - Windows 7 and later") and the 48-byte
    /// "FVE metadata header (version 1)", with no entries.
    pub fn fve_block(&self) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 48];
        set(&mut b, 0, b"-FVE-FS-"); // Signature
        set(&mut b, 8, &64u16.to_le_bytes()); // Unknown (Size)
        let version: u16 = if self.is_vista() { 1 } else { 2 };
        set(&mut b, 10, &version.to_le_bytes()); // Version
        set(&mut b, 12, &self.state.to_le_bytes()); // Unknown (state; "0x04 commonly")
        set(&mut b, 14, &self.state.to_le_bytes()); // Unknown copy
        if version == 2 {
            set(&mut b, 16, &self.encrypted_size.to_le_bytes()); // Encrypted volume size
            set(&mut b, 28, &self.header_sectors.to_le_bytes()); // Number of volume header sectors
            set(&mut b, 56, &self.header_offset.to_le_bytes()); // Volume header offset
        }
        for (i, o) in self.blocks.iter().enumerate() {
            set(&mut b, 32 + 8 * i, &o.to_le_bytes()); // FVE metadata block i offset
        }
        let m = 64;
        set(&mut b, m, &48u32.to_le_bytes()); // Metadata size
        set(&mut b, m + 4, &1u32.to_le_bytes()); // Version
        set(&mut b, m + 8, &48u32.to_le_bytes()); // Metadata header size
        set(&mut b, m + 12, &48u32.to_le_bytes()); // Metadata size copy
        set(&mut b, m + 16, &guid_bytes(self.volume_guid)); // Volume identifier
        set(&mut b, m + 32, &1u32.to_le_bytes()); // Next nonce counter
        set(&mut b, m + 36, &u32::from(self.method).to_le_bytes()); // Encryption method
        set(&mut b, m + 40, &0x01d9_0000_0000_0000u64.to_le_bytes()); // Creation time
        b
    }

    /// Write the volume header and the three FVE blocks into `img` at `start`.
    pub fn write(&self, img: &Path, start: u64) {
        put(img, start, &self.volume_header());
        let block = self.fve_block();
        for b in self.blocks {
            put(img, start + b, &block);
        }
    }
}
