//! Locks where there is no `flock`: a lease object on the store itself.
//!
//! A lock `NAME` is the object `locks/NAME`, created only if absent (so one of any number of
//! racing hosts gets it), holding who holds it and until when. While the guard lives, a thread
//! renews it by compare-and-swap every third of its time to live; dropping the guard stops the
//! renewer and deletes the object. A holder that dies stops renewing:
//!
//! ```text
//!  acquire ──create if absent──► held ──CAS every ttl/3──► held ──drop──► deleted
//!     │ exists                                   │ CAS lost: taken over (logged; the guard
//!     ▼                                          ▼ reports it lost)
//!  stale? ──yes──► CAS the stale lease with ours (one racer wins)
//!     │ no
//!     └─ wait (up to `wait`, polling with backoff) ──► "NAME is locked by HOST pid P"
//! ```
//!
//! Stale means: written on this machine (same kernel boot id) by a process that no longer
//! exists (its pid is gone or now belongs to a process started at another time) — found at
//! once, so a killed backup does not block the next one; or, from any machine, past its
//! expiry by more than one time to live by the local clock (hosts' clocks must agree to
//! within the time to live; the default is 60 s, so within a minute).
//!
//! The record (docs/FORMAT.md §1.5, little-endian):
//! `"BVLS" | u16 1 | u16 0 | holder [16] | u64 expires (ms since the Unix epoch, holder's clock)
//! | u32 ttl (ms) | boot id [16] | u32 pid | u64 process start (clock ticks after boot) | str host`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{Precondition, Store, Tag};
use crate::crypto::secret::random_bytes;
use crate::error::{Error, ErrorKind, Result};
use crate::vault::codec::{Dec, Enc};

/// Time to live of the leases `Store::lock` takes on object storage.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
/// Folder of lease objects.
pub const FOLDER: &str = "locks";

const MAGIC: &[u8; 4] = b"BVLS";
const VERSION: u16 = 1;
/// Longest poll interval while waiting for a holder.
const MAX_POLL: Duration = Duration::from_secs(1);

/// Who holds a lease and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Random id of this holding (one per acquisition).
    pub holder: [u8; 16],
    /// Expiry, in ms since the Unix epoch by the holder's clock.
    pub expires_ms: u64,
    /// Time to live the holder renews with, in ms.
    pub ttl_ms: u32,
    /// The holder machine's kernel boot id (zeros if unknown).
    pub boot_id: [u8; 16],
    /// The holder's process id.
    pub pid: u32,
    /// When that process started, in clock ticks after boot (tells a reused pid apart).
    pub start_ticks: u64,
    /// The holder machine's host name, for messages.
    pub host: String,
}

impl LeaseRecord {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::with_capacity(80 + self.host.len());
        e.bytes(MAGIC)
            .u16(VERSION)
            .u16(0)
            .bytes(&self.holder)
            .u64(self.expires_ms)
            .u32(self.ttl_ms)
            .bytes(&self.boot_id)
            .u32(self.pid)
            .u64(self.start_ticks)
            .str(&self.host);
        e.finish()
    }

    /// Parse stored bytes; `what` names the object in errors.
    pub fn decode(bytes: &[u8], what: &str) -> Result<LeaseRecord> {
        let mut d = Dec::new(bytes, what);
        d.prologue(MAGIC, VERSION, "lease")?;
        let rec = LeaseRecord {
            holder: d.array()?,
            expires_ms: d.u64()?,
            ttl_ms: d.u32()?,
            boot_id: d.array()?,
            pid: d.u32()?,
            start_ticks: d.u64()?,
            host: d.str()?,
        };
        d.end()?;
        Ok(rec)
    }

    /// Whether the holder ran on this machine and has exited (found at once, whatever the
    /// clocks say).
    pub fn holder_exited(&self) -> bool {
        let me = boot_id().unwrap_or([0; 16]);
        me != [0; 16] && self.boot_id == me && process_start(self.pid) != Some(self.start_ticks)
    }

    /// Whether a waiter on this machine (`me`) at `now_ms` may take this lease over.
    fn stale(&self, me: &Identity, now_ms: u64) -> bool {
        if me.boot_id != [0; 16] && self.boot_id == me.boot_id {
            return process_start(self.pid) != Some(self.start_ticks);
        }
        now_ms > self.expires_ms.saturating_add(u64::from(self.ttl_ms))
    }
}

/// This process, as a lease names it.
struct Identity {
    boot_id: [u8; 16],
    pid: u32,
    start_ticks: u64,
    host: String,
}

impl Identity {
    fn current() -> Identity {
        let pid = std::process::id();
        Identity {
            boot_id: boot_id().unwrap_or([0; 16]),
            pid,
            start_ticks: process_start(pid).unwrap_or(0),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "unknown host".into()),
        }
    }

    fn record(&self, holder: [u8; 16], ttl: Duration) -> LeaseRecord {
        LeaseRecord {
            holder,
            expires_ms: now_ms().saturating_add(ttl.as_millis() as u64),
            ttl_ms: ttl.as_millis().min(u128::from(u32::MAX)) as u32,
            boot_id: self.boot_id,
            pid: self.pid,
            start_ticks: self.start_ticks,
            host: self.host.clone(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The kernel's boot id: the same for every process of one machine until it reboots.
fn boot_id() -> Option<[u8; 16]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let hex_digits: String = text.trim().chars().filter(|c| *c != '-').collect();
    hex::decode(hex_digits).ok()?.try_into().ok()
}

/// When process `pid` started (field 22 of `/proc/PID/stat`), if it exists.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A held lease: renewed in the background until dropped, then deleted.
pub struct Lease {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

struct Shared {
    store: Arc<dyn Store>,
    key: String,
    holder: [u8; 16],
    ttl: Duration,
    tag: Mutex<Tag>,
    lost: AtomicBool,
    /// Local time (ms) at which the request that last wrote our record was sent: the record
    /// is good until `ttl` after it, by anyone's reckoning.
    written_ms: AtomicU64,
}

impl Lease {
    /// Take the lease `locks/NAME` on `store`, waiting up to `wait` for a live holder; fails
    /// with [`ErrorKind::AlreadyExists`] naming the holder. `ttl` is how long it lasts
    /// without renewal (renewed every third of it).
    pub fn acquire(
        store: Arc<dyn Store>,
        name: &str,
        wait: Duration,
        ttl: Duration,
    ) -> Result<Lease> {
        let key = format!("{FOLDER}/{name}");
        let me = Identity::current();
        let holder = random_bytes::<16>()?;
        let deadline = Instant::now() + wait;
        let mut poll = Duration::from_millis(25);
        let mut sent;
        let tag = loop {
            let ours = me.record(holder, ttl).encode();
            sent = now_ms();
            match store.put_if(&key, &ours, &Precondition::Absent) {
                Ok(tag) => break tag,
                Err(e) if e.kind() == ErrorKind::Conflict => {}
                Err(e) => return Err(e),
            }
            let (bytes, tag) = match store.get_tagged(&key) {
                Ok(got) => got,
                // Released between our create and our read: try again at once.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let current = LeaseRecord::decode(&bytes, &key);
            // A record nobody can read protects nothing: it is taken over like a stale one.
            let stale = current.as_ref().map_or(true, |r| r.stale(&me, now_ms()));
            if stale {
                sent = now_ms();
                match store.put_if(&key, &ours, &Precondition::Matches(tag)) {
                    Ok(tag) => {
                        tracing::warn!(lock = %key, vault = %store.location(), "took over a stale lease");
                        break tag;
                    }
                    Err(e) if e.kind() == ErrorKind::Conflict => continue,
                    Err(e) => return Err(e),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let by = match &current {
                    Ok(r) => format!(
                        "{} pid {} (lease until {} by its clock)",
                        r.host,
                        r.pid,
                        humantime::format_rfc3339_seconds(
                            UNIX_EPOCH + Duration::from_millis(r.expires_ms)
                        )
                    ),
                    Err(_) => "an unreadable holder".into(),
                };
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{name} is locked by another blockvault process on {by}: lease {key} in vault {}",
                        store.location()
                    ),
                ));
            }
            std::thread::sleep(poll.min(left));
            poll = (poll * 2).min(MAX_POLL);
        };
        let shared = Arc::new(Shared {
            store,
            key,
            holder,
            ttl,
            tag: Mutex::new(tag),
            lost: AtomicBool::new(false),
            written_ms: AtomicU64::new(sent),
        });
        let (stop, stopped) = mpsc::channel();
        let renewer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("blockvault-lease".into())
                .spawn(move || shared.renew_until(stopped, me))
                .map_err(|e| Error::io("starting the lease renewer thread", e))?
        };
        Ok(Lease {
            shared,
            stop: Some(stop),
            renewer: Some(renewer),
        })
    }

    /// Whether another process took the lease over (this one failed to renew in time).
    pub fn is_lost(&self) -> bool {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Fail unless the lease is still held for at least `margin`: not lost, and our record
    /// written less than its time to live minus `margin` ago. A holder that was suspended
    /// (SIGSTOP, a paused VM, a closed laptop) past its time to live fails here even before
    /// its renewer runs again, since others may have judged the lease expired meanwhile.
    pub fn check_held(&self, margin: Duration) -> Result<()> {
        let s = &self.shared;
        let written = s.written_ms.load(Ordering::Relaxed);
        let until = written.saturating_add(s.ttl.as_millis() as u64);
        if s.lost.load(Ordering::Relaxed)
            || now_ms().saturating_add(margin.as_millis() as u64) >= until
        {
            return Err(Error::new(
                ErrorKind::Conflict,
                format!(
                    "lease {} lapsed: it was last renewed {} s ago, its time to live is {} s (the host was suspended or cut off from vault {})",
                    s.key,
                    now_ms().saturating_sub(written) / 1000,
                    s.ttl.as_secs_f64(),
                    s.store.location()
                ),
            ));
        }
        Ok(())
    }
}

impl Shared {
    fn renew_until(&self, stopped: mpsc::Receiver<()>, me: Identity) {
        loop {
            match stopped.recv_timeout(self.ttl / 3) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let written = self.written_ms.load(Ordering::Relaxed);
            if now_ms() >= written.saturating_add(self.ttl.as_millis() as u64) {
                // Lapsed (this process was stopped, or the store unreachable, for a whole time
                // to live): others may have acted on its expiry, so it is never revived.
                self.lost.store(true, Ordering::Relaxed);
                tracing::error!(lock = %self.key, vault = %self.store.location(), "lease lapsed: not renewed within its time to live");
                return;
            }
            let ours = me.record(self.holder, self.ttl).encode();
            let mut tag = self.tag.lock().unwrap_or_else(|p| p.into_inner());
            let sent = now_ms();
            match self
                .store
                .put_if(&self.key, &ours, &Precondition::Matches(tag.clone()))
            {
                Ok(new) => {
                    *tag = new;
                    self.written_ms.store(sent, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    self.lost.store(true, Ordering::Relaxed);
                    tracing::error!(lock = %self.key, vault = %self.store.location(), "lease lost: another process took it over after a missed renewal");
                    return;
                }
                // The store is unreachable for now; the lease lasts `ttl`, try again.
                Err(e) => tracing::warn!(lock = %self.key, error = %e, "lease renewal failed"),
            }
        }
    }

    /// Delete the lease if it is still ours.
    fn release(&self) {
        // Also when lost: the holder check below leaves a lease another process took over.
        let ours = match self.store.get(&self.key) {
            Ok(bytes) => {
                LeaseRecord::decode(&bytes, &self.key).is_ok_and(|r| r.holder == self.holder)
            }
            Err(_) => false,
        };
        if ours {
            if let Err(e) = self.store.delete(&self.key) {
                tracing::warn!(lock = %self.key, error = %e, "could not delete a released lease; it expires by itself");
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(r) = self.renewer.take() {
            let _ = r.join();
        }
        self.shared.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LeaseRecord {
        LeaseRecord {
            holder: [7; 16],
            expires_ms: 1_800_000_000_000,
            ttl_ms: 60_000,
            boot_id: [1; 16],
            pid: 4242,
            start_ticks: 99,
            host: "backup-host-1".into(),
        }
    }

    #[test]
    fn records_round_trip_and_refuse_damage() {
        let r = record();
        let b = r.encode();
        assert_eq!(LeaseRecord::decode(&b, "locks/x").unwrap(), r);
        for cut in 0..b.len() {
            assert!(LeaseRecord::decode(&b[..cut], "locks/x").is_err(), "{cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(LeaseRecord::decode(&long, "locks/x").is_err());
    }

    #[test]
    fn staleness_by_process_on_this_machine_and_by_expiry_elsewhere() {
        let me = Identity::current();
        if me.boot_id == [0; 16] {
            return; // no /proc boot id here: only expiry decides, tested below
        }
        let mut r = me.record([1; 16], Duration::from_secs(60));
        // This very process: alive, never stale, even long after its expiry.
        assert!(!r.stale(&me, r.expires_ms + 3_600_000));
        // A pid of this machine that no longer runs (start time differs): stale at once.
        r.start_ticks = r.start_ticks.wrapping_add(1);
        assert!(r.stale(&me, 0));
        // Another machine: stale only past expiry plus one time to live.
        r.boot_id = [9; 16];
        assert!(!r.stale(&me, r.expires_ms + 60_000));
        assert!(r.stale(&me, r.expires_ms + 60_001));
    }
}
