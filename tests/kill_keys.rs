//! Key management under SIGKILL: `key rotate` (platform KEK, `--new-dek`, `--new-cmk` with
//! PEM keys), `key revoke`, `key enable`, `key import`, `key escrow`, `init` (platform, and
//! with `--cmk`, `--recovery-key`, `--infrastructure-encryption`), a backup running while a
//! rotation is killed, `key recover` (the repair command itself) and `restore`, each killed in loops of random delays aimed inside the
//! command: the delay is drawn between 0 and the measured duration of an uninterrupted run,
//! and vaults hold many disks (key records) so that a rotation is mid-way when it dies.
//!
//! After every kill: `verify` passes, or the vault is in a state the documented repair (running
//! the command again, `key enable` after a revoke) takes back to one where it passes; then
//! earlier snapshots restore bit for bit (all of them at the end of each test), a new backup
//! works, and no key material is found in the clear in the vault or out of place in the
//! keystore folder, temp files left by the kill included (tests/common/secrets.rs).
//!
//! Seed: `BLOCKVAULT_TEST_SEED` (printed by each test), so that a failure reproduces.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockvault::crypto::keyring::KeyAccess;
use blockvault::crypto::rsa::PrivateKeyFile;
use blockvault::crypto::Keystore;
use blockvault::vault::Vault;
use serde_json::Value;

use common::keys::pem_keys;
use common::secrets::{assert_no_key_material, private_components, tree as secrets_tree};
use common::v1_fixtures;
use common::*;

const IMAGE: usize = MIB as usize;

/// The test's random source, from `BLOCKVAULT_TEST_SEED` or a fixed seed, mixed with the
/// test's name so that the tests draw different delays.
fn rng_for(test: &str) -> Rng {
    let seed: u64 = std::env::var("BLOCKVAULT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x4B11_4B3E);
    eprintln!("{test}: seed {seed} (set BLOCKVAULT_TEST_SEED to change)");
    Rng::new(
        seed ^ u64::from_le_bytes(
            blake3::hash(test.as_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap(),
        ),
    )
}

/// What happened to a command started with [`kill_after`].
enum Ended {
    /// It finished before the delay ran out.
    Finished(Run),
    /// It was SIGKILLed.
    Killed,
}

/// Start `args`, and SIGKILL it after `delay` unless it has finished by then.
fn kill_after(bv: &Bv, args: &[String], delay: Duration) -> Ended {
    kill_when(bv, args, || true, delay)
}

/// Start `args`; once `seen()` holds (polled every 200 µs), wait `delay` more and SIGKILL it
/// unless it has finished by then. Aims a kill at a phase of a command that cannot be timed
/// from outside, such as the re-wrapping that follows storing a new key.
fn kill_when(bv: &Bv, args: &[String], seen: impl Fn() -> bool, delay: Duration) -> Ended {
    let (mut child, what) = bv.spawn(args);
    let mut finished = false;
    while !seen() {
        if child.try_wait().expect("try_wait").is_some() {
            finished = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    if !finished {
        std::thread::sleep(delay);
        finished = child.try_wait().expect("try_wait").is_some();
    }
    if !finished {
        child.kill().expect("SIGKILL");
    }
    let run = Run::wait(child, what);
    if !finished {
        return Ended::Killed;
    }
    Ended::Finished(run)
}

/// Run `args` to completion; it must succeed. Returns how long it took.
fn timed(bv: &Bv, args: &[String]) -> Duration {
    let t = Instant::now();
    bv.run(args).ok();
    t.elapsed()
}

/// A delay aimed inside a command that takes `full` when left alone.
fn aim(rng: &mut Rng, full: Duration) -> Duration {
    Duration::from_micros(rng.below(full.as_micros() as u64 + 1))
}

/// The next aim after a command finished before its kill: the duration it was aimed by came
/// from a slow run (the machine is shared), so the next delays are drawn from a shorter span.
fn shorter(full: Duration) -> Duration {
    full * 3 / 4
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The snapshots a vault must keep restoring, with their content.
#[derive(Default)]
struct Book {
    snaps: Vec<(String, String, Vec<u8>)>,
}

impl Book {
    /// Back up `data` as `disk` (the image file is rewritten) and remember the snapshot.
    fn backup(&mut self, bv: &Bv, disk: &str, data: Vec<u8>) {
        let img = bv.path(&format!("{disk}.img"));
        write_file(&img, &data);
        let doc = bv.backup(&img, disk, &["--slot-size", "64K"]);
        self.snaps.push((disk.into(), text(&doc, "snapshot"), data));
    }

    /// A new backup of `disk` with fresh content.
    fn new_backup(&mut self, bv: &Bv, disk: &str, rng: &mut Rng) {
        self.backup(bv, disk, mixed_data(rng.next_u64(), IMAGE));
    }

    /// Every snapshot restores bit for bit.
    fn restore_all(&self, bv: &Bv) {
        for (disk, id, data) in &self.snaps {
            bv.restore_and_compare(&format!("{disk}@{id}"), data);
        }
    }

    /// The oldest, the newest and a random snapshot restore bit for bit: after a kill in
    /// key management, what could break is a key record, which every snapshot of its DEK
    /// generation shares (tests end with [`Book::restore_all`]).
    fn restore_some(&self, bv: &Bv, rng: &mut Rng) {
        let n = self.snaps.len();
        let mut picks = vec![0, n - 1, rng.below(n as u64) as usize];
        picks.sort_unstable();
        picks.dedup();
        for i in picks {
            let (disk, id, data) = &self.snaps[i];
            bv.restore_and_compare(&format!("{disk}@{id}"), data);
        }
    }
}

/// `verify` and `verify --read-data` find no problem.
fn verify_ok(bv: &Bv, trial: &str) {
    for read_data in [false, true] {
        let r = bv.verify(read_data);
        assert_eq!(
            r.code, 0,
            "{trial}: `{}` failed:\n{}{}",
            r.what, r.stdout, r.stderr
        );
        assert_eq!(r.json()["ok"], true, "{trial}: {}", r.stdout);
    }
}

/// Register `n` more disks (key records of generation 0, no snapshots) through the library:
/// what makes a rotation long enough to be killed half-way. `cmk_private` opens a customer
/// key vault.
fn add_disks(bv: &Bv, n: usize, cmk_private: Option<&Path>) {
    let access = KeyAccess {
        cmk_private: cmk_private.map(|p| PrivateKeyFile {
            path: p.to_path_buf(),
            passphrase: None,
        }),
        ..KeyAccess::default()
    };
    let vault = Vault::open_with(s(&bv.vault), &Keystore::new(&bv.keystore), &access)
        .expect("open the vault");
    for i in 0..n {
        vault
            .register_disk(&format!("filler-{i:04}"))
            .expect("register a disk");
    }
}

/// `key show --json`: the wraps of every key record (`wrapped_by` ids) and the KEKs.
fn key_show(bv: &Bv) -> Value {
    bv.json(&["key", "show"])
}

/// The `wrapped_by` lists of every key record.
fn wraps(show: &Value) -> Vec<Vec<String>> {
    show["dek_generations"]
        .as_array()
        .expect("dek_generations")
        .iter()
        .map(|g| {
            g["wrapped_by"]
                .as_array()
                .expect("wrapped_by")
                .iter()
                .map(|w| w.as_str().expect("id").to_string())
                .collect()
        })
        .collect()
}

/// The KEK ids of a `key show` document, in order.
fn kek_ids(show: &Value) -> Vec<String> {
    show["keks"]
        .as_array()
        .expect("keks")
        .iter()
        .map(|k| text(k, "id"))
        .collect()
}

/// The current KEK of a `key show` document (`current_kek`, such as `platform-v3`) and its
/// version.
fn current(show: &Value) -> (String, u32) {
    let id = text(show, "current_kek");
    let version = id
        .rsplit_once("-v")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("current_kek {id:?}"));
    (id, version)
}

/// Where a rotation was when it died: `before` the new key was stored, `midway` (the new key
/// stored, the head not yet swapped to it: records re-wrapped as new revisions, or none yet),
/// or `done` (the head names the new key; what is left is deleting what it replaced).
#[derive(Debug, Default)]
struct Landed {
    finished: usize,
    before: usize,
    midway: usize,
    done: usize,
}

impl Landed {
    /// Classify one kill from `key show` after it (`now`) and whether the new key `new_id`
    /// was `stored` (in the keystore, or as a descriptor). The head swaps every record at once,
    /// so the records are all on the old key or all on the new one.
    fn record(&mut self, now: &Value, new_id: &str, stored: bool) {
        let records = wraps(now);
        let on_new = records.iter().filter(|w| w[0] == new_id).count();
        assert!(
            on_new == 0 || on_new == records.len(),
            "records split between keys: {now}"
        );
        if current(now).0 == new_id {
            assert_eq!(on_new, records.len(), "{now}");
            self.done += 1;
        } else if stored {
            self.midway += 1;
        } else {
            self.before += 1;
        }
    }

    /// Fail unless at least a third of `trials` rotations were killed rather than finished:
    /// a loop whose kills all come too late tests nothing.
    fn assert_enough_killed(&self, trials: usize) {
        assert!(
            self.finished <= trials * 2 / 3,
            "only {} of {trials} rotations were killed",
            trials - self.finished
        );
    }
}

/// Every key record wrapped by exactly `ids` (the newest primary KEK, then the recovery key's).
fn all_wrapped_by(show: &Value, ids: &[&str], trial: &str) {
    for w in wraps(show) {
        assert_eq!(
            w, ids,
            "{trial}: a key record is not wrapped by {ids:?}: {show}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Platform KEK rotation, with and without --new-dek, and backups running meanwhile
// ---------------------------------------------------------------------------------------------

/// `key rotate` and `key rotate --new-dek` SIGKILLed at random points of a vault of 80
/// disks, some trials with a backup running at the same time. A rotation killed half-way
/// leaves records under the old and the new KEK version, both in the keystore: `verify`
/// passes at once, and running the rotation again re-wraps every record under one version.
#[test]
fn platform_rotation_killed_midway() {
    const TEST: &str = "platform_rotation_killed_midway";
    const TRIALS: usize = 12;
    let mut rng = rng_for(TEST);
    let bv = Bv::new();
    bv.json(&["init"]);
    let mut book = Book::default();
    book.new_backup(&bv, "d1", &mut rng);
    book.new_backup(&bv, "d2", &mut rng);
    add_disks(&bv, 80, None);

    let rotate = args(&["--json", "key", "rotate"]);
    let rotate_dek = args(&["--json", "key", "rotate", "--new-dek"]);
    let mut full = timed(&bv, &rotate).max(timed(&bv, &rotate));
    let mut full_dek = timed(&bv, &rotate_dek);
    eprintln!("{TEST}: a rotation takes {full:?}, with --new-dek {full_dek:?}");
    let mut landed = Landed::default();
    let (mut backups_ok, mut backups_failed) = (0, 0);
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let new_dek = trial % 4 == 1;
        let cmd = if new_dek { &rotate_dek } else { &rotate };
        let took = if new_dek { full_dek } else { full };
        let new_id = format!("platform-v{}", current(&key_show(&bv)).1 + 1);

        // Every third trial a backup (an incremental, or a new disk) runs while the rotation
        // is killed.
        let backup = (trial % 3 == 2).then(|| {
            let disk = if trial % 2 == 0 {
                "d1".to_string()
            } else {
                format!("n{trial}")
            };
            let data = mixed_data(rng.next_u64(), IMAGE);
            let img = bv.path(&format!("{disk}.img"));
            write_file(&img, &data);
            let child = bv.spawn(&[
                "--json",
                "backup",
                s(&img),
                "--disk",
                &disk,
                "--slot-size",
                "64K",
            ]);
            (disk, data, child)
        });
        let delay = aim(&mut rng, took);
        match kill_after(&bv, cmd, delay) {
            Ended::Finished(r) => {
                r.ok();
                landed.finished += 1;
            }
            Ended::Killed => {
                let now = key_show(&bv);
                let stored = kek_ids(&now).contains(&new_id);
                landed.record(&now, &new_id, stored);
            }
        }
        if let Some((disk, data, (child, what))) = backup {
            let r = Run::wait(child, what);
            if r.code == 0 {
                backups_ok += 1;
                book.snaps.push((disk, text(&r.json(), "snapshot"), data));
            } else {
                // A backup may lose a race with the rotation, but only cleanly.
                r.failed();
                eprintln!("{label}: the concurrent backup failed: {}", r.stderr.trim());
                backups_failed += 1;
            }
        }

        // Half-way is a valid state: both KEK versions are in the keystore.
        verify_ok(&bv, &label);
        // The repair: run the rotation again; afterwards every record is under its key.
        let t = timed(&bv, cmd);
        if new_dek {
            full_dek = t;
        } else {
            full = t;
        }
        let after = key_show(&bv);
        // The new version, or the one after it when the kill came after the head swap (the
        // run again is then a rotation of its own).
        let (newest, _) = current(&after);
        all_wrapped_by(&after, &[&newest], &label);
        // Rotation destroys the versions it replaced: the keystore holds the current one only.
        assert_eq!(kek_ids(&after), std::slice::from_ref(&newest), "{label}");
        verify_ok(&bv, &label);
        book.restore_some(&bv, &mut rng);
        book.new_backup(&bv, "d2", &mut rng);
        assert_no_key_material(&bv, None, &[]);
    }
    book.restore_all(&bv);
    eprintln!("{TEST}: {landed:?}; concurrent backups: {backups_ok} ok, {backups_failed} failed");
    landed.assert_enough_killed(TRIALS);
}

// ---------------------------------------------------------------------------------------------
// Rotation to a new customer key (PEM)
// ---------------------------------------------------------------------------------------------

/// `key rotate --new-cmk` between two PEM keys (`a`, `b`, with the recovery key `r`) SIGKILLed
/// at random points of a vault of 17 disks, half of the kills aimed at the re-wrapping. Until the rotation has finished, the records are
/// split between the old and the new key, and the new private key alone cannot read the old
/// ones: `verify` with it fails cleanly, naming a key record; running the rotation again
/// (with the old private key, as the first run) finishes it, and `verify` passes.
#[test]
fn cmk_rotation_killed_midway() {
    const TEST: &str = "cmk_rotation_killed_midway";
    const TRIALS: usize = 10;
    let Some(k) = pem_keys(TEST) else {
        return;
    };
    let mut rng = rng_for(TEST);
    let mut bv = Bv::new();
    let uses = |bv: &mut Bv, key: &str| {
        bv.env = vec![("BLOCKVAULT_CMK_PRIVATE".into(), k.key(key))];
    };
    uses(&mut bv, "a");
    bv.json(&[
        "init",
        "--cmk",
        &k.spec("a"),
        "--recovery-key",
        &k.spec("r"),
    ]);
    let mut book = Book::default();
    book.new_backup(&bv, "d1", &mut rng);
    add_disks(&bv, 16, Some(&k.path("a.key")));
    let rotate = |from: &str, to: &str, new_dek: bool| {
        let mut a = args(&["--json", "key", "rotate", "--new-cmk", &k.spec(to)]);
        a.extend(["--cmk-private".into(), k.key(from)]);
        if new_dek {
            a.push("--new-dek".into());
        }
        a
    };
    // How long a whole rotation takes, and how much of it follows the new descriptor's
    // appearance (the re-wrapping).
    let kek_dir = bv.vault.join("kek");
    let descriptor = |version: u32| kek_dir.join(format!("cmk-rsa-{version:08x}"));
    let t = Instant::now();
    let (mut child, _) = bv.spawn(&rotate("a", "b", false));
    while !descriptor(2).exists() && child.try_wait().expect("try_wait").is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let stored = t.elapsed();
    assert!(child.wait().expect("wait").success());
    let mut full = t.elapsed();
    let rewrap = full - stored;
    uses(&mut bv, "b");
    eprintln!("{TEST}: a rotation takes {full:?}, {rewrap:?} of it after storing the new key");
    let pems: Vec<(String, Vec<u8>)> = ["a", "b", "r"]
        .iter()
        .flat_map(|n| private_components(&k.key(n)))
        .collect();
    let (mut old, mut new) = ("b", "a");
    let mut landed = Landed::default();
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let cmd = rotate(old, new, trial % 4 == 1);
        let version = current(&key_show(&bv)).1 + 1;
        let new_id = format!("cmk-rsa-v{version}");
        // Every other kill is aimed at the re-wrapping, the phase after the new key is stored.
        let ended = if trial % 2 == 0 {
            kill_after(&bv, &cmd, aim(&mut rng, full))
        } else {
            kill_when(
                &bv,
                &cmd,
                || descriptor(version).exists(),
                aim(&mut rng, rewrap),
            )
        };
        match ended {
            Ended::Finished(r) => {
                r.ok();
                landed.finished += 1;
            }
            Ended::Killed => landed.record(&key_show(&bv), &new_id, descriptor(version).exists()),
        }
        // The new private key reads everything once the rotation is done; before that,
        // verify fails cleanly and names what it cannot read.
        uses(&mut bv, new);
        let v = bv.verify(false);
        if v.code != 0 {
            v.failed().stderr_has(&["key record"]);
            let t = Instant::now();
            bv.run(&cmd).ok();
            full = t.elapsed();
        }
        all_wrapped_by(&key_show(&bv), &[&new_id, "recovery-v1"], &label);
        verify_ok(&bv, &label);
        book.restore_some(&bv, &mut rng);
        book.new_backup(&bv, "d1", &mut rng);
        assert_no_key_material(&bv, Some(&k.path(&format!("{new}.key"))), &pems);
        (old, new) = (new, old);
    }
    book.restore_all(&bv);
    eprintln!("{TEST}: {landed:?}");
    landed.assert_enough_killed(TRIALS);
}

/// Regression: `key rotate --new-cmk B --new-dek`, killed while re-wrapping, could not be
/// run again: it started new DEK generations first, which needs every disk read with the old
/// private key, and the records already re-wrapped under B no longer open with it. In format 2
/// the re-wrapped records are new revisions the head lists only at its swap, so the state
/// such a kill leaves is made exactly from a finished rotation: every vault object as it was
/// before it (the head, the old record revisions and descriptor it deleted) and this host's
/// memory of the head put back, beside what the rotation wrote (B's descriptor, the new
/// revisions and generations). The same command finishes it, with the old private key.
#[test]
fn cmk_rotation_with_new_dek_resumes_after_a_kill() {
    const TEST: &str = "cmk_rotation_with_new_dek_resumes_after_a_kill";
    let Some(k) = pem_keys(TEST) else {
        return;
    };
    let mut rng = rng_for(TEST);
    let mut bv = Bv::new();
    bv.env = vec![("BLOCKVAULT_CMK_PRIVATE".into(), k.key("a"))];
    bv.json(&[
        "init",
        "--cmk",
        &k.spec("a"),
        "--recovery-key",
        &k.spec("r"),
    ]);
    let mut book = Book::default();
    book.new_backup(&bv, "d1", &mut rng);
    add_disks(&bv, 3, Some(&k.path("a.key")));
    let vault_before = secrets_tree(&bv.vault);
    let state_file = bv.key_file().with_extension("state");
    let state_before = read_file(&state_file);
    let rotate = [
        "key",
        "rotate",
        "--new-cmk",
        &k.spec("b"),
        "--new-dek",
        "--cmk-private",
        &k.key("a"),
    ];
    let doc = bv.json(&rotate);
    assert_eq!(doc["new_dek_generations"], 4, "{doc}");
    for (name, bytes) in &vault_before {
        write_file(&bv.vault.join(name), bytes);
    }
    write_file(&state_file, &state_before);
    assert_eq!(text(&key_show(&bv), "current_kek"), "cmk-rsa-v1");
    let doc = bv.json(&rotate);
    assert_eq!(doc["resumed"], true, "{doc}");
    assert_eq!(doc["new_dek_generations"], 4, "{doc}");
    assert_eq!(doc["records_rewrapped"], 4, "{doc}");
    bv.env = vec![("BLOCKVAULT_CMK_PRIVATE".into(), k.key("b"))];
    let show = key_show(&bv);
    assert_eq!(wraps(&show).len(), 8, "{show}");
    all_wrapped_by(&show, &["cmk-rsa-v2", "recovery-v1"], TEST);
    verify_ok(&bv, TEST);
    book.new_backup(&bv, "d1", &mut rng);
    book.restore_all(&bv);
}

// ---------------------------------------------------------------------------------------------
// Revoke, enable, import, escrow
// ---------------------------------------------------------------------------------------------

/// The states of the platform KEK versions in a `key show` document.
fn states(show: &Value) -> Vec<String> {
    show["keks"]
        .as_array()
        .expect("keks")
        .iter()
        .filter(|k| k["kind"] == "platform")
        .map(|k| text(k, "state"))
        .collect()
}

/// `key revoke`, `key enable`, `key import --force` (into a keystore that lost its file) and
/// `key escrow`, in turn, SIGKILLed after random delays up to their measured duration. Each
/// writes one object atomically, so the state is the old one or the new one, never a mix:
/// every KEK version revoked or none; the key file absent or whole; the escrow record absent
/// or whole (`verify` opens it). Running the command again completes it (then `key enable`
/// after a revoke), and the checks follow.
#[test]
fn keystore_and_escrow_commands_killed() {
    const TEST: &str = "keystore_and_escrow_commands_killed";
    const TRIALS: usize = 16;
    let mut rng = rng_for(TEST);
    let bv = Bv::new();
    bv.json(&["init"]);
    let mut book = Book::default();
    book.new_backup(&bv, "d1", &mut rng);
    bv.json(&["key", "rotate"]);
    let pass = bv.path("pass");
    std::fs::write(&pass, "export passphrase\n").unwrap();
    let export = bv.path("keys.export");
    bv.json(&["key", "export", s(&export), "--passphrase-file", s(&pass)]);
    let key_file = bv.key_file();
    let secret = bv.path("secret");
    let escrowed = bv.path("escrowed");

    let revoke = args(&["--json", "key", "revoke"]);
    let enable = args(&["--json", "key", "enable"]);
    let import = args(&[
        "--json",
        "key",
        "import",
        s(&export),
        "--passphrase-file",
        s(&pass),
        "--force",
    ]);
    let escrow = args(&[
        "--json",
        "key",
        "escrow",
        "d1",
        "--name",
        "luks",
        "--secret-file",
        s(&secret),
    ]);
    let mut value = b"first secret".to_vec();
    std::fs::write(&secret, &value).unwrap();
    let mut full = [&revoke, &enable, &import, &escrow].map(|c| timed(&bv, c));
    eprintln!("{TEST}: revoke, enable, import, escrow take {full:?}");
    let mut killed = 0;
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let op = trial % 4;
        match op {
            // `key enable` is killed on a revoked vault.
            1 => {
                bv.json(&["key", "revoke"]);
            }
            // `key import` puts back a lost key file.
            2 => std::fs::remove_file(&key_file).unwrap(),
            3 => {
                value = format!("secret of trial {trial} {}", rng.next_u64()).into_bytes();
                std::fs::write(&secret, &value).unwrap();
            }
            _ => {}
        }
        let cmd = [&revoke, &enable, &import, &escrow][op];
        match kill_after(&bv, cmd, aim(&mut rng, full[op])) {
            Ended::Finished(r) => {
                r.ok();
                full[op] = shorter(full[op]);
            }
            Ended::Killed => killed += 1,
        }
        // The old state or the new, never a mix; then the command once more.
        match op {
            0 | 1 => {
                let st = states(&key_show(&bv));
                assert!(st.windows(2).all(|w| w[0] == w[1]), "{label}: {st:?}");
            }
            2 => {
                if key_file.exists() {
                    verify_ok(&bv, &label);
                }
            }
            _ => verify_ok(&bv, &label),
        }
        full[op] = timed(&bv, cmd);
        match op {
            0 => {
                assert!(
                    states(&key_show(&bv)).iter().all(|s| s == "revoked"),
                    "{label}"
                );
                bv.verify(false).failed().stderr_has(&["revoked"]);
                bv.json(&["key", "enable"]);
            }
            1 => assert!(
                states(&key_show(&bv)).iter().all(|s| s == "enabled"),
                "{label}"
            ),
            3 => {
                let _ = std::fs::remove_dir_all(&escrowed);
                let target = bv.path("escrow-restore");
                bv.restore("d1", &target, &["--force", "--with-escrow", s(&escrowed)])
                    .ok();
                assert_eq!(read_file(&escrowed.join("luks")), value, "{label}");
            }
            _ => {}
        }
        verify_ok(&bv, &label);
        book.restore_some(&bv, &mut rng);
        book.new_backup(&bv, "d1", &mut rng);
        assert_no_key_material(&bv, None, &[("escrowed secret".into(), value.clone())]);
    }
    book.restore_all(&bv);
    eprintln!("{TEST}: {killed} of {TRIALS} commands killed before they finished");
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} commands were killed"
    );
}

/// `key recover --take-over --anchor-fingerprint FP --recovery-private` after the keystore
/// file is lost, SIGKILLed after random delays up to its measured duration (every other one
/// counted from when it writes the new key file, to land among the anchor, the config and the
/// records it re-wraps). Half-way, `verify` fails naming the state (no key file yet: exit 1,
/// "keystore has no key for vault"), or passes; running `key recover` again, with the
/// fingerprint known before the kill, finishes it (a key file already made by the killed run
/// is used: the anchor may already be under its new auth key). Each take-over makes a new auth
/// key: the next trial uses the fingerprint `key show` prints.
#[test]
fn recovery_killed_then_run_again() {
    const TEST: &str = "recovery_killed_then_run_again";
    const TRIALS: usize = 10;
    let Some(k) = pem_keys(TEST) else {
        return;
    };
    let mut rng = rng_for(TEST);
    let bv = Bv::new();
    let doc = bv.json(&["init", "--recovery-key", &k.spec("r")]);
    let mut fingerprint = text(&doc, "recovery_fingerprint");
    let mut book = Book::default();
    book.new_backup(&bv, "d1", &mut rng);
    add_disks(&bv, 16, None);
    let key_file = bv.key_file();
    let recover = |fp: &str| {
        args(&[
            "--json",
            "key",
            "recover",
            "--recovery-private",
            &k.key("r"),
            "--take-over",
            "--anchor-fingerprint",
            fp,
        ])
    };
    let pems = private_components(&k.key("r"));
    std::fs::remove_file(&key_file).unwrap();
    let mut full = timed(&bv, &recover(&fingerprint));
    fingerprint = text(&key_show(&bv), "auth_fingerprint");
    eprintln!("{TEST}: a recovery takes {full:?}");
    let (mut killed, mut broken) = (0, 0);
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        std::fs::remove_file(&key_file).unwrap();
        let cmd = recover(&fingerprint);
        let ended = if trial % 2 == 0 {
            kill_after(&bv, &cmd, aim(&mut rng, full))
        } else {
            kill_when(&bv, &cmd, || key_file.exists(), aim(&mut rng, full / 2))
        };
        match ended {
            Ended::Finished(r) => {
                r.ok();
                full = shorter(full);
            }
            Ended::Killed => killed += 1,
        }
        // Half-way: the key file not written yet, or the take-over not finished.
        let v = bv.verify(false);
        if v.code != 0 || !key_file.exists() {
            if !key_file.exists() {
                v.code(1).stderr_has(&["keystore has no key for vault"]);
            }
            broken += 1;
            full = timed(&bv, &cmd);
        }
        let show = key_show(&bv);
        fingerprint = text(&show, "auth_fingerprint");
        let (platform, _) = current(&show);
        all_wrapped_by(&show, &[&platform, "recovery-v1"], &label);
        verify_ok(&bv, &label);
        book.restore_some(&bv, &mut rng);
        book.new_backup(&bv, "d1", &mut rng);
        assert_no_key_material(&bv, None, &pems);
    }
    book.restore_all(&bv);
    eprintln!("{TEST}: {killed} of {TRIALS} killed, {broken} left a vault that needed the re-run");
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} recoveries were killed"
    );
}

// ---------------------------------------------------------------------------------------------
// init
// ---------------------------------------------------------------------------------------------

/// The `init` options of each kind of vault: platform keys; a PEM customer key; with a
/// recovery key; with the infrastructure layer too.
fn init_variants(k: &common::keys::PemKeys) -> [Vec<String>; 4] {
    let cmk = ["init".to_string(), "--cmk".into(), k.spec("a")];
    let recovery = ["--recovery-key".to_string(), k.spec("r")];
    [
        args(&["init"]),
        cmk.to_vec(),
        [&cmk[..], &recovery].concat(),
        [
            &cmk[..],
            &recovery,
            &["--infrastructure-encryption".to_string()],
        ]
        .concat(),
    ]
}

/// A first backup, restore, verify and key scan of a vault `init` has just made.
fn first_use(bv: &Bv, rng: &mut Rng, cmk: bool, pems: &[(String, Vec<u8>)], label: &str) {
    let mut book = Book::default();
    book.new_backup(bv, "d1", rng);
    book.new_backup(bv, "d1", rng);
    verify_ok(bv, label);
    book.restore_all(bv);
    let a = cmk.then(|| PathBuf::from(&bv.env[0].1));
    assert_no_key_material(bv, a.as_deref(), pems);
}

/// `init` of each kind SIGKILLed after random delays up to its measured duration (every other
/// one counted from when the key file appears), in a fresh folder each time. A kill leaves either a whole vault (its config is written last), which
/// verifies, or no config at all, and then `init` with the same options must work again over
/// whatever the killed one wrote (key descriptors, `infra-recovery`, a key file).
#[test]
fn init_killed() {
    const TEST: &str = "init_killed";
    const TRIALS: usize = 12;
    let Some(k) = pem_keys(TEST) else {
        return;
    };
    let mut rng = rng_for(TEST);
    let variants = init_variants(k);
    let pems = private_components(&k.key("a"));
    let fresh = |v: usize| {
        let mut bv = Bv::new();
        if v > 0 {
            bv.env.push(("BLOCKVAULT_CMK_PRIVATE".into(), k.key("a")));
        }
        bv
    };
    // The quickest of three runs: a slow one (the machine is shared) would aim kills past
    // the end.
    let mut full = [0, 1, 2, 3].map(|v| {
        (0..3)
            .map(|_| timed(&fresh(v), &variants[v]))
            .min()
            .unwrap()
    });
    eprintln!("{TEST}: init takes {full:?}");
    let (mut killed, mut leftovers) = (0, 0);
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let v = trial % 4;
        let bv = fresh(v);
        // Every other kill is aimed after the key file is written, among the vault objects.
        let ended = if trial % 2 == 0 {
            kill_after(&bv, &variants[v], aim(&mut rng, full[v]))
        } else {
            let key_file_written = || {
                std::fs::read_dir(&bv.keystore).is_ok_and(|mut d| {
                    d.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "keys")))
                })
            };
            kill_when(
                &bv,
                &variants[v],
                key_file_written,
                aim(&mut rng, full[v] / 2),
            )
        };
        match ended {
            Ended::Finished(r) => {
                r.ok();
            }
            Ended::Killed => killed += 1,
        }
        if bv.vault.join("config").exists() {
            verify_ok(&bv, &label);
        } else {
            if bv.vault.exists() || bv.keystore.exists() {
                leftovers += 1;
            }
            full[v] = timed(&bv, &variants[v]);
        }
        first_use(&bv, &mut rng, v > 0, &pems, &label);
    }
    eprintln!("{TEST}: {killed} of {TRIALS} killed, {leftovers} left objects but no config");
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} inits were killed"
    );
}

/// The state an `init` killed just before writing its config leaves, made from a finished
/// one: its config removed, and this host's memory of the vault (`<vault id>.state`, which
/// `init` writes only once the config is there) with it.
fn forget_config(bv: &Bv) {
    let config = bv.vault.join("config");
    let id = blockvault::vault::config::Config::decode_unverified(&read_file(&config))
        .expect("a config")
        .vault_id;
    std::fs::remove_file(&config).unwrap();
    std::fs::remove_file(bv.keystore.join(format!("{}.state", hex::encode(id)))).unwrap();
}

/// Regression: an `init` killed after writing its key descriptors and `infra-recovery` but
/// before the config (the state is made exactly by [`forget_config`] from a finished `init`)
/// used to leave a folder where `init` failed for ever ("File exists") and where a first
/// backup made a platform vault that could not open ("key descriptor failed
/// authentication"). Both now take over the leftovers. A folder that holds key records or
/// snapshots without a config is no interrupted `init`, and `init` leaves it alone.
#[test]
fn init_takes_over_what_an_interrupted_init_left() {
    const TEST: &str = "init_takes_over_what_an_interrupted_init_left";
    let Some(k) = pem_keys(TEST) else {
        return;
    };
    let mut rng = rng_for(TEST);
    let pems = private_components(&k.key("a"));
    let variants = init_variants(k);
    for (v, again) in [(3, 3), (2, 2), (3, 0)] {
        let label = format!("{TEST}: {:?} then {:?}", variants[v], variants[again]);
        let mut bv = Bv::new();
        bv.env.push(("BLOCKVAULT_CMK_PRIVATE".into(), k.key("a")));
        bv.json(&variants[v]);
        forget_config(&bv);
        bv.json(&variants[again]);
        first_use(&bv, &mut rng, again > 0, &pems, &label);
    }
    // A backup, which makes a platform vault where there is none, also takes over.
    let mut bv = Bv::new();
    bv.env.push(("BLOCKVAULT_CMK_PRIVATE".into(), k.key("a")));
    bv.json(&variants[3]);
    forget_config(&bv);
    first_use(&bv, &mut rng, false, &pems, TEST);
    assert_eq!(text(&key_show(&bv), "kek_kind"), "platform");

    // Key records without a config: refused, nothing removed.
    forget_config(&bv);
    let before = secrets_tree(&bv.vault);
    bv.run(&["init"])
        .failed()
        .stderr_has(&["keys/", "no config"]);
    assert_eq!(
        secrets_tree(&bv.vault),
        before,
        "init changed a folder it refused"
    );
}

// ---------------------------------------------------------------------------------------------
// restore
// ---------------------------------------------------------------------------------------------

/// `restore` of a 24 MiB snapshot SIGKILLed after random delays up to its measured duration:
/// the partial target is refused without `--force` (exit 1, untouched) and a run with
/// `--force` over it restores every byte.
#[test]
fn restore_killed_then_forced() {
    const TEST: &str = "restore_killed_then_forced";
    const TRIALS: usize = 10;
    let mut rng = rng_for(TEST);
    let bv = Bv::new();
    let data = mixed_data(rng.next_u64(), 24 * MIB as usize);
    let img = bv.path("d1.img");
    write_file(&img, &data);
    bv.backup(&img, "d1", &[]);
    let target = bv.path("target");
    let restore = args(&["--json", "restore", "d1", s(&target)]);
    let mut forced = restore.clone();
    forced.push("--force".into());
    // The quicker of two runs: a slow one (the machine is shared) would aim kills past the end.
    let mut full = timed(&bv, &forced).min(timed(&bv, &forced));
    eprintln!("{TEST}: a restore takes {full:?}");
    let mut partial = 0;
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let _ = std::fs::remove_file(&target);
        if let Ended::Finished(r) = kill_after(&bv, &restore, aim(&mut rng, full)) {
            r.ok();
            full = shorter(full);
        }
        if target.metadata().is_ok_and(|m| m.len() > 0) {
            let before = read_file(&target);
            if before != data {
                partial += 1;
            }
            bv.run(&restore).code(1).stderr_has(&["--force"]);
            assert_bytes_eq(&read_file(&target), &before, &label);
            bv.run(&forced).ok();
        } else {
            bv.run(&restore).ok();
        }
        assert_file_eq(&target, &data);
    }
    verify_ok(&bv, TEST);
    eprintln!("{TEST}: {partial} of {TRIALS} kills left a partial target");
    assert!(
        partial >= TRIALS / 3,
        "only {partial} of {TRIALS} restores were interrupted"
    );
}

// ---------------------------------------------------------------------------------------------
// upgrade, destroy, auth rotation
// ---------------------------------------------------------------------------------------------

/// `upgrade` of copies of the format 1 fixtures (tests/fixtures/upgrade/, alternately the
/// platform-key and the customer-key one) SIGKILLed after random delays up to its measured
/// duration (every other one counted from when it writes the head, to land around the switch
/// and the clean-up after it). Killed before the switch, the vault is still format 1 and every
/// other command still refuses it, naming `upgrade`; after it, format 2. Either way `upgrade`
/// run again finishes, and then the vault verifies, every snapshot restores exactly, a backup
/// continues from the old ones, and no key material is in the clear.
#[test]
fn upgrade_killed_then_run_again() {
    const TEST: &str = "upgrade_killed_then_run_again";
    const TRIALS: usize = 12;
    // openssl reads the PEM keys' private components for the scan.
    if pem_keys(TEST).is_none() {
        return;
    }
    let mut rng = rng_for(TEST);
    let fixtures = [&v1_fixtures::PLATFORM, &v1_fixtures::CMK];
    let snaps = fixtures.map(v1_fixtures::snaps);
    let upgrade = args(&["--json", "upgrade"]);
    // The quicker of two runs: a slow one (the machine is shared) would aim kills past the end.
    let mut full = fixtures.map(|f| {
        (0..2)
            .map(|_| timed(&v1_fixtures::copy(f), &upgrade))
            .min()
            .unwrap()
    });
    eprintln!("{TEST}: upgrade takes {full:?}");
    let (mut killed, mut before_switch, mut after_switch) = (0, 0, 0);
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let i = trial % 2;
        let (f, snaps) = (fixtures[i], &snaps[i]);
        let bv = v1_fixtures::copy(f);
        let head = bv.vault.join("head");
        let ended = if trial % 4 < 2 {
            kill_after(&bv, &upgrade, aim(&mut rng, full[i]))
        } else {
            kill_when(&bv, &upgrade, || head.exists(), aim(&mut rng, full[i] / 4))
        };
        match ended {
            Ended::Finished(r) => {
                r.ok();
                full[i] = shorter(full[i]);
            }
            Ended::Killed => {
                killed += 1;
                if v1_fixtures::format_version(&bv) == 1 {
                    before_switch += 1;
                    bv.run(&["snapshots"])
                        .code(1)
                        .stderr_has(&["blockvault upgrade"]);
                } else {
                    after_switch += 1;
                }
                bv.run(&upgrade).ok();
            }
        }
        assert_eq!(v1_fixtures::format_version(&bv), 2, "{label}");
        let again = bv.json(&["upgrade"]);
        assert_eq!(again["already"], true, "{label}: {again}");
        verify_ok(&bv, &label);
        for s in snaps {
            bv.restore_and_compare(&format!("{}@{}", s.disk, s.id), &s.data);
        }
        let latest = snaps.last().expect("a snapshot");
        let data = v1_fixtures::image(
            &latest.disk,
            v1_fixtures::disk_mib(f, &latest.disk),
            latest.version + 1,
        );
        let img = bv.path("next.img");
        write_file(&img, &data);
        let doc = bv.backup(&img, &latest.disk, &[]);
        assert_eq!(text(&doc, "parent"), latest.id, "{label}: {doc}");
        bv.restore_and_compare(
            &format!("{}@{}", latest.disk, text(&doc, "snapshot")),
            &data,
        );
        let pems: Vec<(String, Vec<u8>)> = ["a", "b", "r"]
            .iter()
            .flat_map(|k| {
                private_components(&bv.path(&format!("keys/{k}.key")).display().to_string())
            })
            .collect();
        let cmk = f.cmk_private.map(|k| bv.path("keys").join(k));
        assert_no_key_material(&bv, cmk.as_deref(), &pems);
    }
    eprintln!(
        "{TEST}: {killed} of {TRIALS} killed, {before_switch} before the switch, {after_switch} after it"
    );
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} upgrades were killed"
    );
}

/// A platform fixture copy, upgraded: platform KEK versions 1 (revoked), 2 and 3 (current).
fn upgraded_platform() -> (Bv, Vec<v1_fixtures::Snap>) {
    let f = &v1_fixtures::PLATFORM;
    let bv = v1_fixtures::copy(f);
    bv.json(&["upgrade"]);
    (bv, v1_fixtures::snaps(f))
}

/// Whether platform KEK `version` is gone from `key show` and listed as destroyed.
fn destroyed(show: &Value, version: u32) -> bool {
    let id = format!("platform-v{version}");
    let tombstone = format!("platform KEK version {version}");
    let listed = show["destroyed"]
        .as_array()
        .expect("destroyed")
        .iter()
        .any(|d| d.as_str() == Some(tombstone.as_str()));
    assert_eq!(listed, !kek_ids(show).contains(&id), "{show}");
    listed
}

/// `key destroy --version N` SIGKILLed after random delays up to its measured duration (every
/// other one counted from when it rewrites the key file, to land between the keystore and the
/// head swap that follows), on copies of the upgraded platform fixture: version 1 (revoked)
/// or 2 (enabled, wrapping nothing). The version is in the keystore or destroyed, never half;
/// `key destroy` run again finishes (exit 0 while anything was left to do), after which the
/// head lists no revocation of a destroyed version 1, so `key export` works; the vault
/// verifies, every snapshot restores exactly, a backup works, and no key material is in the
/// clear.
#[test]
fn destroy_killed_then_run_again() {
    const TEST: &str = "destroy_killed_then_run_again";
    const TRIALS: usize = 12;
    let mut rng = rng_for(TEST);
    let destroy = |v: u32| args(&["--json", "key", "destroy", "--version", &v.to_string()]);
    let mut full = {
        let (bv, _) = upgraded_platform();
        timed(&bv, &destroy(2)).min(timed(&bv, &destroy(1)))
    };
    eprintln!("{TEST}: destroy takes {full:?}");
    let (mut killed, mut rerun_finished) = (0, 0);
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let version = 1 + (trial % 2) as u32;
        let (bv, snaps) = upgraded_platform();
        let key_file = bv.key_file();
        let original = read_file(&key_file);
        let cmd = destroy(version);
        let ended = if trial % 4 < 2 {
            kill_after(&bv, &cmd, aim(&mut rng, full))
        } else {
            let changed = || std::fs::read(&key_file).is_ok_and(|b| b != original);
            kill_when(&bv, &cmd, changed, aim(&mut rng, full / 4))
        };
        match ended {
            Ended::Finished(r) => {
                r.ok();
                full = shorter(full);
            }
            Ended::Killed => killed += 1,
        }
        let was = destroyed(&bv.json(&["key", "show"]), version);
        let again = bv.run(&cmd);
        if again.code == 0 {
            rerun_finished += usize::from(was);
        } else {
            assert!(was, "{label}: {again:?}");
            again.code(1).stderr_has(&["destroyed already"]);
        }
        let show = bv.json(&["key", "show"]);
        assert!(destroyed(&show, version), "{label}: {show}");
        assert_eq!(text(&show, "current_kek"), "platform-v3", "{label}");
        if version == 1 {
            // No revocation left in the head or the keystore: the export is allowed again.
            let pass = bv.path("pass");
            std::fs::write(&pass, "a long export passphrase\n").unwrap();
            let export = bv.path("keys.export");
            bv.json(&["key", "export", s(&export), "--passphrase-file", s(&pass)]);
        }
        verify_ok(&bv, &label);
        let mut book = Book {
            snaps: snaps
                .iter()
                .map(|s| (s.disk.clone(), s.id.clone(), s.data.clone()))
                .collect(),
        };
        book.restore_some(&bv, &mut rng);
        book.new_backup(&bv, "new", &mut rng);
        book.restore_all(&bv);
        assert_no_key_material(&bv, None, &[]);
    }
    eprintln!("{TEST}: {killed} of {TRIALS} killed, {rerun_finished} finished by the re-run after the key was gone");
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} destroys were killed"
    );
}

/// Regression: a `key destroy` killed between its keystore update and its head swap (the
/// state is made exactly: the head and this host's memory of it put back as they were before
/// a finished destroy of the revoked version 1) left the version in the head's revoked list,
/// so `key export` was refused for ever ("destroy them first"), and destroying it again only
/// said it was destroyed already. The same command now finishes it.
#[test]
fn destroy_finishes_what_a_killed_one_left_in_the_head() {
    const TEST: &str = "destroy_finishes_what_a_killed_one_left_in_the_head";
    let (bv, snaps) = upgraded_platform();
    let head = bv.vault.join("head");
    let state_file = bv.key_file().with_extension("state");
    let (head_before, state_before) = (read_file(&head), read_file(&state_file));
    bv.json(&["key", "destroy", "--version", "1"]);
    write_file(&head, &head_before);
    write_file(&state_file, &state_before);
    let pass = bv.path("pass");
    std::fs::write(&pass, "a long export passphrase\n").unwrap();
    let export = bv.path("keys.export");
    let export_args = ["key", "export", s(&export), "--passphrase-file", s(&pass)];
    bv.run(&export_args).code(2).stderr_has(&["{1}", "revoked"]);
    bv.json(&["key", "destroy", "--version", "1"]);
    bv.json(&export_args);
    bv.run(&["key", "destroy", "--version", "1"])
        .code(1)
        .stderr_has(&["destroyed already"]);
    verify_ok(&bv, TEST);
    for s in &snaps {
        bv.restore_and_compare(&format!("{}@{}", s.disk, s.id), &s.data);
    }
}

/// `key rotate --auth` SIGKILLed after random delays up to its measured duration (every other
/// one counted from when it stores the new auth key in the key file, to land among the config,
/// the recovery anchor and the head it re-authenticates), on a platform vault with a recovery
/// key and 16 disks. After each kill the vault opens and verifies (the keystore holds the old
/// and the new auth key until the end), and `key rotate --auth` run again finishes: one auth
/// version left, newer than before, whose fingerprint `key show` prints. Then snapshots
/// restore, a backup works, no key material is in the clear; at the end the keystore is lost
/// and `key recover --take-over` with the last fingerprint and the recovery key opens the
/// vault again, which proves the anchor was rewritten under the auth key the head names.
#[test]
fn auth_rotation_killed_then_run_again() {
    const TEST: &str = "auth_rotation_killed_then_run_again";
    const TRIALS: usize = 12;
    let Some(k) = pem_keys(TEST) else {
        return;
    };
    let mut rng = rng_for(TEST);
    let bv = Bv::new();
    bv.json(&["init", "--recovery-key", &k.spec("r")]);
    let mut book = Book::default();
    book.new_backup(&bv, "d1", &mut rng);
    add_disks(&bv, 16, None);
    let key_file = bv.key_file();
    let rotate = args(&["--json", "key", "rotate", "--auth"]);
    let mut full = timed(&bv, &rotate).min(timed(&bv, &rotate));
    eprintln!("{TEST}: an auth rotation takes {full:?}");
    let pems = private_components(&k.key("r"));
    let mut killed = 0;
    for trial in 0..TRIALS {
        let label = format!("{TEST} trial {trial}");
        let before = num(&key_show(&bv), "auth_key_version");
        let original = read_file(&key_file);
        let ended = if trial % 2 == 0 {
            kill_after(&bv, &rotate, aim(&mut rng, full))
        } else {
            let changed = || std::fs::read(&key_file).is_ok_and(|b| b != original);
            kill_when(&bv, &rotate, changed, aim(&mut rng, full / 2))
        };
        match ended {
            Ended::Finished(r) => {
                r.ok();
            }
            Ended::Killed => killed += 1,
        }
        verify_ok(&bv, &label);
        full = timed(&bv, &rotate);
        let show = key_show(&bv);
        let version = num(&show, "auth_key_version");
        assert!(
            version > before,
            "{label}: auth version {version} after {before}"
        );
        book.restore_some(&bv, &mut rng);
        book.new_backup(&bv, "d1", &mut rng);
        verify_ok(&bv, &label);
        assert_no_key_material(&bv, None, &pems);
    }
    let fingerprint = text(&key_show(&bv), "auth_fingerprint");
    std::fs::remove_dir_all(&bv.keystore).unwrap();
    bv.json(&[
        "key",
        "recover",
        "--recovery-private",
        &k.key("r"),
        "--take-over",
        "--anchor-fingerprint",
        &fingerprint,
    ]);
    verify_ok(&bv, TEST);
    book.restore_all(&bv);
    eprintln!("{TEST}: {killed} of {TRIALS} auth rotations killed");
    assert!(
        killed >= TRIALS / 3,
        "only {killed} of {TRIALS} auth rotations were killed"
    );
}
