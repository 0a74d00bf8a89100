//! Progress of long work, as a display (the CLI's bar) sees it.
//!
//! The total is the work the job will do, and progress advances only as that work is done,
//! so a rate and an ETA computed from it are real:
//! - backup: the bytes it will read (`Plan::bytes_to_read`), advanced as each read is
//!   processed. Holes, zero ranges the source reports, and slots carried over from the
//!   parent are not read, so they are not part of the total (counting them as done at once
//!   made a sparse disk look 10x faster at first and the ETA 10x too short);
//! - restore: the bytes it will write to the target, advanced as each slot is written: the
//!   slots holding data, plus zero slots on a block device, where zeros are written (a file
//!   keeps them as holes, which cost nothing);
//! - verify `--read-data`: the bytes of packs it will read.

/// Receives progress in bytes of work (see the module docs for what counts).
pub trait Progress: Sync {
    /// The work starts: `total` bytes to do.
    fn start(&self, total: u64);
    /// `bytes` more done.
    fn advance(&self, bytes: u64);
}

/// No progress display.
pub struct NoProgress;
impl Progress for NoProgress {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::crypto::Keystore;
    use crate::engine::{backup, BackupOptions, ChangeClaim, ParentSpec};
    use crate::restore::{restore, RestoreOptions};
    use crate::source::{self, OpenOptions};
    use crate::vault::manifest::ChangeSource;

    const MIB: u64 = 1 << 20;

    /// Records what a job reported.
    #[derive(Default)]
    struct Tally {
        totals: Mutex<Vec<u64>>,
        done: AtomicU64,
    }

    impl Progress for Tally {
        fn start(&self, total: u64) {
            self.totals.lock().unwrap().push(total);
        }
        fn advance(&self, bytes: u64) {
            self.done.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    impl Tally {
        /// The one total announced; every byte of it was reported done, no more.
        fn total(&self) -> u64 {
            let totals = self.totals.lock().unwrap();
            assert_eq!(totals.len(), 1, "start called {} times", totals.len());
            assert_eq!(self.done.load(Ordering::Relaxed), totals[0]);
            totals[0]
        }
    }

    /// A 64 MiB sparse disk: 3 MiB of data at 8 MiB, 1 MiB of written zeros at 20 MiB, 1 MiB
    /// of data at 40 MiB; holes elsewhere.
    fn sparse_disk(dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("disk.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 * MIB).unwrap();
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 251) as u8 + 1).collect();
        f.write_all_at(&data, 8 * MIB).unwrap();
        f.write_all_at(&vec![0; MIB as usize], 20 * MIB).unwrap();
        f.write_all_at(&data[..MIB as usize], 40 * MIB).unwrap();
        path
    }

    fn options(parent: ParentSpec, changes: Option<ChangeClaim>) -> BackupOptions {
        BackupOptions {
            disk: "d".into(),
            parent,
            changes,
            threads: 2,
            ..BackupOptions::default()
        }
    }

    #[test]
    fn backup_counts_the_bytes_it_reads_and_restore_the_bytes_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let vault = crate::keys::init::init(
            dir.path().join("vault").to_str().unwrap(),
            &Keystore::new(dir.path().join("keystore")),
            &crate::keys::init::InitOptions::default(),
        )
        .unwrap()
        .vault;
        let path = sparse_disk(dir.path());
        let src = source::open(path.to_str().unwrap(), &OpenOptions::default()).unwrap();

        // Full backup: the data ranges the file reports (the written zeros included, as the
        // reader cannot know they are zeros), never the holes.
        let tally = Tally::default();
        let full = backup(
            &vault,
            src.as_ref(),
            &options(ParentSpec::None, None),
            &tally,
        )
        .unwrap();
        let read = tally.total();
        assert_eq!(read, full.stats.bytes_read);
        assert_eq!(read, 5 * MIB, "holes are not work");

        // An incremental that a change list drives reads only the changed 4 KiB.
        let changed = std::iter::once(9 * MIB + 4096..9 * MIB + 8192);
        let claim = ChangeClaim {
            source: ChangeSource::ChangedList,
            detail: "test".into(),
            list: crate::changes::ChangeList::new(1, changed),
            bitmap: None,
            covers: None,
        };
        let mut opts = options(ParentSpec::Latest, Some(claim));
        opts.verify_unchanged = 0;
        let tally = Tally::default();
        let inc = backup(&vault, src.as_ref(), &opts, &tally).unwrap();
        assert_eq!(tally.total(), inc.stats.bytes_read);
        assert_eq!(tally.total(), 4096, "carried slots are not work");

        // Restore to a file: the data slots only (the zero slot and the holes stay holes).
        let disk = vault.find_disk("d").unwrap().unwrap();
        let m = vault.resolve_snapshot(&disk, "latest").unwrap();
        let tally = Tally::default();
        let target = dir.path().join("restored.raw");
        let r = restore(
            &vault,
            &disk,
            &m,
            &target,
            &RestoreOptions::default(),
            &tally,
        )
        .unwrap();
        assert_eq!(tally.total(), r.bytes_written);
        assert_eq!(tally.total(), 4 * MIB);

        // A range: only its data part.
        let tally = Tally::default();
        let opts = RestoreOptions {
            force: true,
            range: Some(10 * MIB + 512..22 * MIB),
            ..RestoreOptions::default()
        };
        let r = restore(&vault, &disk, &m, &target, &opts, &tally).unwrap();
        assert_eq!(tally.total(), r.bytes_written);
        assert_eq!(tally.total(), MIB - 512);
    }
}
