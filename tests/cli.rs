//! What a person sees, through the binary: colour only on a terminal (and never with
//! NO_COLOR), each error once, a customer key this host lacks named in one sentence, usage
//! errors as JSON under `--json`, RFC 3339 times, snapshots oldest first across disks, help
//! headings and defaults, completions and the manual page (docs/blockvault.1 kept current),
//! PKCS#1 keys from `openssl genrsa -traditional`, the NBD hint about `--persistent`, and the
//! progress bar's total in a pseudo-terminal (`script`).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use common::keys::pem_keys;
use common::tools::{run_tool, tools};
use common::{assert_file_eq, bin, make_sparse, random_data, skip, write_file, Bv, Run, MIB};

/// `p` as a `&str` argument.
fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A vault made by `init`, with one 64 MiB sparse disk `d` (6 MiB of data) backed up.
fn vault_with_disk() -> (Bv, Vec<u8>) {
    let bv = Bv::new();
    bv.run(&["init"]).ok();
    let img = bv.path("d.raw");
    let data = make_sparse(
        &img,
        64 * MIB,
        &[(5 * MIB, random_data(1, 6 * MIB as usize))],
    );
    bv.backup(&img, "d", &[]);
    (bv, data)
}

/// The lines of `text` that are not empty.
fn lines(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Back up a second disk `e` and damage its key record: `snapshots` then warns that it cannot
/// read that disk's keys, and lists disk `d`. (A damaged manifest is no longer skipped with a
/// warning: the vault head lists it, so it is an error.)
fn damage_another_disks_keys(bv: &Bv) {
    let before = bv.objects("keys");
    bv.backup(&bv.path("d.raw"), "e", &[]);
    let records: Vec<_> = bv
        .objects("keys")
        .into_iter()
        .filter(|k| !before.contains(k))
        .collect();
    assert_eq!(records.len(), 1, "{records:?}");
    common::flip_byte(&records[0], 40);
}

// ---------------------------------------------------------------------------------------------
// Colour, and each message once
// ---------------------------------------------------------------------------------------------

#[test]
fn warnings_in_a_log_file_carry_no_colour_codes() {
    let (bv, _) = vault_with_disk();
    damage_another_disks_keys(&bv);
    let log = bv.path("stderr.log");
    let mut c = bv.command();
    c.arg("snapshots")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
    let out = c.output().expect("run");
    assert_eq!(out.status.code(), Some(0));
    let logged = std::fs::read(&log).unwrap();
    let text = String::from_utf8_lossy(&logged);
    assert!(
        text.contains("WARN") && text.contains("cannot read a disk's key records"),
        "{text}"
    );
    assert!(
        !logged.contains(&0x1b),
        "escape codes in a log file:\n{text:?}"
    );
}

/// Run `args` against `bv` in a pseudo-terminal (`script`), with `env` added; what the
/// terminal showed (stdout and stderr together), or `None` after a SKIP line.
fn in_terminal(bv: &Bv, test: &str, env: &[(&str, &str)], args: &[&str]) -> Option<String> {
    if !tools(test, &[("script", "bsdutils")]) {
        return None;
    }
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let mut line = vec![quote(bin()), "--vault".into(), quote(s(&bv.vault))];
    line.extend(["--keystore".into(), quote(s(&bv.keystore))]);
    line.extend(args.iter().map(|a| quote(a)));
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &line.join(" "), "/dev/null"]);
    c.env_remove("NO_COLOR").env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("BLOCKVAULT_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied()).current_dir(bv.dir.path());
    let out = c.stdin(Stdio::null()).output().expect("running script");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{}` in a terminal failed:\n{shown}",
        line.join(" ")
    );
    Some(shown)
}

#[test]
fn a_terminal_gets_colour_unless_no_color_is_set() {
    const T: &str = "a_terminal_gets_colour_unless_no_color_is_set";
    let (bv, _) = vault_with_disk();
    damage_another_disks_keys(&bv);
    let Some(coloured) = in_terminal(&bv, T, &[], &["snapshots"]) else {
        return;
    };
    assert!(coloured.contains("WARN"), "{coloured}");
    assert!(
        coloured.contains("\x1b["),
        "a terminal should get colour:\n{coloured:?}"
    );
    let plain = in_terminal(&bv, T, &[("NO_COLOR", "1")], &["snapshots"]).unwrap();
    assert!(plain.contains("WARN"), "{plain}");
    assert!(
        !plain.contains('\x1b'),
        "NO_COLOR=1 still coloured:\n{plain:?}"
    );
}

#[test]
fn a_revoked_key_is_one_error_not_a_warning_per_disk_and_an_error() {
    let (bv, _) = vault_with_disk();
    bv.backup(&bv.path("d.raw"), "e", &[]);
    bv.run(&["key", "revoke"]).ok();
    for args in [
        vec!["snapshots"],
        vec!["verify"],
        vec!["restore", "d", s(&bv.path("r.raw"))],
    ] {
        let r = bv.run(&args);
        r.code(1);
        let shown = lines(&r.stderr);
        assert_eq!(
            shown.len(),
            1,
            "`{}` printed more than its error:\n{}",
            r.what,
            r.stderr
        );
        assert!(
            shown[0].starts_with("error: ") && shown[0].contains("revoked"),
            "{}",
            r.stderr
        );
    }
}

/// The one sentence a customer-key vault without its private key gives.
fn assert_names_the_missing_key(r: &Run, fingerprint: &str) {
    let shown = lines(&r.stderr);
    assert_eq!(
        shown.len(),
        1,
        "`{}`: one line expected:\n{}",
        r.what,
        r.stderr
    );
    for needle in [
        "cmk-rsa-v1",
        &format!("sha256:{}", &fingerprint[..16]),
        "was not given its private key",
        "--cmk-private",
        "BLOCKVAULT_CMK_PRIVATE",
    ] {
        assert!(
            shown[0].contains(needle),
            "`{}`: {needle:?} in\n{}",
            r.what,
            r.stderr
        );
    }
}

#[test]
fn a_customer_key_without_its_private_half_is_one_sentence_for_every_command() {
    const T: &str = "a_customer_key_without_its_private_half_is_one_sentence_for_every_command";
    let Some(k) = pem_keys(T) else {
        return;
    };
    let bv = Bv::new();
    let init = bv.json(&["init", "--cmk", &k.spec("a")]);
    let fingerprint = init["cmk_fingerprint_sha256"].as_str().unwrap().to_string();
    let img = bv.path("d.raw");
    let data = random_data(2, 3 * MIB as usize);
    write_file(&img, &data);
    bv.backup(&img, "d", &["--cmk-private", &k.key("a")]);

    let target = bv.path("r.raw");
    for args in [
        vec!["snapshots"],
        vec!["verify"],
        vec!["verify", "--read-data"],
        vec!["restore", "d", s(&target)],
        vec!["backup", s(&img), "--disk", "d"],
    ] {
        let r = bv.run(&args);
        r.code(1);
        assert_names_the_missing_key(&r, &fingerprint);
        assert!(!target.exists());
    }
    // `key show` still shows the keys, and says why disk names are missing.
    let r = bv.run(&["key", "show"]);
    r.ok();
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    r.stdout_has(&["cmk-rsa-v1", "disk names unreadable", "--cmk-private"]);
    let doc = bv.json(&["key", "show"]);
    let note = doc["disk_names_unreadable"].as_str().unwrap();
    assert!(note.contains("BLOCKVAULT_CMK_PRIVATE"), "{doc}");
    // Given the key, every command works.
    let r = bv.run(&["--cmk-private", &k.key("a"), "restore", "d", s(&target)]);
    r.ok();
    assert_file_eq(&target, &data);
}

// ---------------------------------------------------------------------------------------------
// JSON and listings
// ---------------------------------------------------------------------------------------------

#[test]
fn usage_errors_are_json_under_json() {
    let bv = Bv::new();
    let img = bv.path("d.raw");
    write_file(&img, &random_data(3, MIB as usize));
    for (args, needle) in [
        (vec!["--json", "backup", s(&img)], "--disk"),
        (vec!["backup", s(&img), "--json"], "--disk"),
        (vec!["--json", "frobnicate"], "frobnicate"),
        (vec!["--json", "restore"], "<SNAPSHOT>"),
        (
            vec![
                "--json",
                "backup",
                s(&img),
                "--disk",
                "d",
                "--slot-size",
                "3Q",
            ],
            "3Q",
        ),
        (vec!["--json"], "subcommand"),
    ] {
        let r = bv.run(&args);
        r.code(2);
        let doc = r.json();
        assert_eq!(doc["kind"], "Usage", "{doc}");
        let error = doc["error"].as_str().unwrap();
        assert!(error.contains(needle), "{needle:?} in {doc}");
        assert!(
            !error.contains("Usage:") && !error.starts_with("error"),
            "{doc}"
        );
        // The person at the terminal still gets clap's text.
        r.stderr_has(&["error:", needle]);
    }
    // Without --json: stdout stays empty. Help is not an error.
    let r = bv.run(&["backup", s(&img)]);
    r.code(2);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    let r = bv.run(&["--json", "backup", "--help"]);
    r.ok();
    r.stdout_has(&["Usage: blockvault backup"]);
}

/// Run `args` with the vault, the keystore and a private key named only by `BLOCKVAULT_*`.
fn run_from_env(bv: &Bv, args: &[&str]) -> Run {
    let mut c = Command::new(bin());
    c.env("BLOCKVAULT_VAULT", &bv.vault)
        .env("BLOCKVAULT_KEYSTORE", &bv.keystore)
        .env("BLOCKVAULT_CMK_PRIVATE", bv.path("k.pem"))
        .env_remove("RUST_LOG")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Run::wait(c.spawn().expect("starting blockvault"), args.join(" "))
}

#[test]
fn the_usage_line_does_not_show_options_that_come_from_the_environment() {
    let bv = Bv::new();
    let r = run_from_env(&bv, &["backup", "some.raw"]);
    r.code(2);
    let usage = r.stderr.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert_eq!(
        usage, "Usage: blockvault backup --disk <DISK> <SOURCE>",
        "{}",
        r.stderr
    );
    // And the variables do stand in for the options.
    run_from_env(&bv, &["--json", "init"]).ok();
    assert!(bv.vault.join("config").exists());
    assert!(bv.key_file().starts_with(&bv.keystore));
}

/// Every field named `time` or `created` in `doc`, at any depth.
fn time_fields<'a>(doc: &'a Value, found: &mut Vec<&'a Value>) {
    match doc {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "time" || k == "created" {
                    found.push(v);
                }
                time_fields(v, found);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| time_fields(v, found)),
        _ => {}
    }
}

/// Every time in `doc` is RFC 3339 UTC to the second (`2026-12-06T20:01:51Z`), every
/// duration (`seconds`) to the millisecond; returns how many times there were.
fn assert_times(doc: &Value) -> usize {
    let mut found = Vec::new();
    time_fields(doc, &mut found);
    for t in &found {
        let text = t
            .as_str()
            .unwrap_or_else(|| panic!("time {t} is not text in {doc}"));
        humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert!(text.len() == 20 && text.ends_with('Z'), "{text}");
    }
    if let Some(secs) = doc["seconds"].as_f64() {
        assert_eq!((secs * 1000.0).round() / 1000.0, secs, "{doc}");
    }
    found.len()
}

#[test]
fn every_time_is_rfc3339_utc() {
    let (bv, _) = vault_with_disk();
    bv.run(&["key", "rotate"]).ok();
    let snapshots = bv.json(&["snapshots"]);
    assert_eq!(assert_times(&snapshots), 1);
    // The current platform KEK version only: the rotation destroyed version 1.
    let keys = bv.json(&["key", "show"]);
    assert_eq!(assert_times(&keys), 1, "{keys}");
    let backup = bv.backup(&bv.path("d.raw"), "d", &[]);
    assert_times(&backup);
    let restore = bv.json(&["restore", "d", s(&bv.path("r.raw"))]);
    assert_times(&restore);
    assert_times(&bv.verify_ok());
    // The text listing uses the same form as the JSON.
    let r = bv.run(&["snapshots"]);
    r.ok()
        .stdout_has(&[snapshots["snapshots"][0]["time"].as_str().unwrap()]);
}

#[test]
fn rates_count_what_was_read_or_written_not_the_disk() {
    let (bv, _) = vault_with_disk();
    let rate = |bytes: u64, secs: f64| (bytes as f64 / 1e6 / secs * 10.0).round() / 10.0;
    let doc = bv.backup(&bv.path("d.raw"), "d", &["--parent", "none"]);
    assert_eq!(common::num(&doc, "bytes_read"), 6 * MIB);
    assert_eq!(common::num(&doc, "disk_size"), 64 * MIB);
    let secs = doc["seconds"].as_f64().unwrap();
    if secs > 0.0 {
        assert_eq!(doc["mb_per_s"].as_f64(), Some(rate(6 * MIB, secs)), "{doc}");
    }
    let doc = bv.json(&["restore", "d", s(&bv.path("r.raw"))]);
    assert_eq!(common::num(&doc, "bytes_written"), 6 * MIB);
    let secs = doc["seconds"].as_f64().unwrap();
    if secs > 0.0 {
        assert_eq!(doc["mb_per_s"].as_f64(), Some(rate(6 * MIB, secs)), "{doc}");
    }
    // The text says which unit it uses, the one of its sizes.
    let r = bv.run(&["backup", s(&bv.path("d.raw")), "--disk", "d"]);
    r.ok().stdout_has(&["read 6.0 MiB", " MiB/s"]);
    assert!(!r.stdout.contains("MB/s"), "{}", r.stdout);
}

#[test]
fn snapshots_are_listed_oldest_first_across_disks() {
    let bv = Bv::new();
    bv.run(&["init"]).ok();
    let img = bv.path("d.raw");
    write_file(&img, &random_data(4, MIB as usize));
    // Creation times have a resolution of one second: a pause between backups orders them.
    let order = ["zeta", "alpha", "mid", "zeta"];
    for (i, disk) in order.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }
        bv.backup(&img, disk, &[]);
    }
    let listed: Vec<String> = bv
        .snapshots()
        .iter()
        .map(|m| m["disk"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, order);
    let r = bv.run(&["snapshots"]);
    r.ok();
    let rows: Vec<&str> = r
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .take(order.len())
        .collect();
    assert_eq!(rows, order, "{}", r.stdout);
}

// ---------------------------------------------------------------------------------------------
// Help, completions, manual page
// ---------------------------------------------------------------------------------------------

/// The section of `help` that starts with the line `heading`, up to the next blank line.
fn section<'a>(help: &'a str, heading: &str) -> &'a str {
    let start = help
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("no {heading:?} section in\n{help}"));
    let rest = &help[start + heading.len() + 2..];
    &rest[..rest.find("\n\n").unwrap_or(rest.len())]
}

#[test]
fn help_keeps_shared_options_under_their_own_headings() {
    let bv = Bv::new();
    let r = bv.run(&["backup", "--help"]);
    r.ok();
    let own = section(&r.stdout, "Options:");
    let global = section(&r.stdout, "Global options:");
    let keys = section(&r.stdout, "Key access options:");
    // Whether a section lists `opt` (a description may mention it).
    let lists = |section: &str, opt: &str| {
        section
            .lines()
            .any(|l| l.split_whitespace().next() == Some(opt))
    };
    for opt in ["--vault", "--keystore", "--json"] {
        assert!(
            lists(global, opt) && !lists(own, opt),
            "{opt}:\n{}",
            r.stdout
        );
    }
    for opt in [
        "--cmk-private",
        "--cmk-passphrase-file",
        "--pin-file",
        "--pkcs11-module",
    ] {
        assert!(lists(keys, opt) && !lists(own, opt), "{opt}:\n{}", r.stdout);
    }
    let threads = own.lines().find(|l| l.contains("--threads")).unwrap();
    assert!(threads.contains("[default: all cores]"), "{threads}");
    assert!(!threads.contains("[default: 0]"), "{threads}");
    // The long help ends with the environment and the exit codes.
    let r = bv.run(&["--help"]);
    r.ok()
        .stdout_has(&["BLOCKVAULT_VAULT", "NO_COLOR", "Exit status: 0 success"]);
}

const COMMANDS: [&str; 9] = [
    "init",
    "backup",
    "snapshots",
    "restore",
    "verify",
    "key",
    "inspect",
    "completions",
    "manpage",
];
const KEY_COMMANDS: [&str; 8] = [
    "show", "rotate", "revoke", "enable", "recover", "export", "import", "escrow",
];

#[test]
fn completions_for_bash_zsh_and_fish() {
    let bv = Bv::new();
    let bash = bv.run(&["completions", "bash"]);
    bash.ok();
    let script = bv.path("blockvault.bash");
    write_file(&script, bash.stdout.as_bytes());
    // `bash -n`: the script parses (run_tool fails the test with bash's message otherwise).
    run_tool(Command::new("bash").arg("-n").arg(&script), "");
    for shell in ["bash", "zsh", "fish"] {
        let r = bv.run(&["completions", shell]);
        r.ok();
        for word in COMMANDS
            .iter()
            .chain(&KEY_COMMANDS)
            .chain(&["--cmk-private"])
        {
            assert!(r.stdout.contains(word), "{shell} completions lack {word}");
        }
    }
    bv.run(&["completions", "tcsh"]).code(2);
}

#[test]
fn the_manual_page_renders_and_docs_has_the_current_one() {
    const T: &str = "the_manual_page_renders_and_docs_has_the_current_one";
    let bv = Bv::new();
    let r = bv.run(&["manpage"]);
    r.ok();
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/blockvault.1");
    let current = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        current == r.stdout,
        "docs/blockvault.1 is out of date: regenerate it with \
         `target/release/blockvault manpage > docs/blockvault.1`"
    );
    if !tools(T, &[("groff", "groff-base")]) {
        return;
    }
    let page = bv.path("blockvault.1");
    write_file(&page, r.stdout.as_bytes());
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(&page)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = run_tool(
        Command::new("groff")
            .args(["-man", "-Tascii", "-P", "-cbou"])
            .arg(&page),
        "",
    );
    let text = String::from_utf8_lossy(&text);
    for heading in ["NAME", "SYNOPSIS", "GLOBAL OPTIONS", "KEY ACCESS OPTIONS"] {
        assert!(text.contains(heading), "{heading} in\n{text}");
    }
    for c in COMMANDS {
        assert!(
            text.contains(&format!("BLOCKVAULT {}", c.to_uppercase())),
            "{c}"
        );
    }
    for c in KEY_COMMANDS {
        assert!(
            text.contains(&format!("BLOCKVAULT KEY {}", c.to_uppercase())),
            "{c}"
        );
    }
    // Justified lines may stretch the spaces between words.
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(words.contains("--verify-unchanged") && words.contains("Exit status"));
}

// ---------------------------------------------------------------------------------------------
// Keys, NBD, progress
// ---------------------------------------------------------------------------------------------

/// `openssl ARGS` in `dir`, or `None` after a SKIP line when openssl is missing.
fn openssl(test: &str, dir: &Path, args: &[&str]) -> Option<()> {
    let installed = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        skip(test, "openssl is not installed (apt-get install openssl)");
        return None;
    }
    run_tool(Command::new("openssl").args(args).current_dir(dir), "");
    Some(())
}

#[test]
fn a_pkcs1_key_from_genrsa_backs_up_and_restores() {
    const T: &str = "a_pkcs1_key_from_genrsa_backs_up_and_restores";
    let bv = Bv::new();
    let dir = bv.dir.path();
    let args = ["genrsa", "-traditional", "-out", "k.pem", "3072"];
    if openssl(T, dir, &args).is_none() {
        return;
    }
    openssl(T, dir, &["rsa", "-in", "k.pem", "-pubout", "-out", "k.pub"]).unwrap();
    let pem = std::fs::read_to_string(dir.join("k.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    bv.json(&["init", "--cmk", &format!("rsa:{}", s(&dir.join("k.pub")))]);
    let img = bv.path("d.raw");
    let data = random_data(5, 3 * MIB as usize + 12345);
    write_file(&img, &data);
    let key = s(&dir.join("k.pem")).to_string();
    bv.backup(&img, "d", &["--cmk-private", &key]);
    let target = bv.path("r.raw");
    bv.run(&["--cmk-private", &key, "restore", "d", s(&target)])
        .ok();
    assert_file_eq(&target, &data);

    // The same key encrypted the legacy way: refused, saying how to convert it.
    let legacy = [
        "rsa",
        "-in",
        "k.pem",
        "-traditional",
        "-aes256",
        "-passout",
        "pass:pw",
    ];
    openssl(T, dir, &[&legacy[..], &["-out", "enc.pem"]].concat()).unwrap();
    std::fs::write(dir.join("pw"), "pw\n").unwrap();
    let enc = s(&dir.join("enc.pem")).to_string();
    let pw = s(&dir.join("pw")).to_string();
    let r = bv.run(&[
        "--cmk-private",
        &enc,
        "--cmk-passphrase-file",
        &pw,
        "restore",
        "d",
        s(&bv.path("r2.raw")),
    ]);
    r.code(1)
        .stderr_has(&["enc.pem", "Proc-Type: 4,ENCRYPTED", "openssl pkcs8 -topk8"]);
}

/// A qemu-nbd serving `image` on the unix socket `sock` to one client only (no
/// `--persistent`): it exits when that client leaves. Killed when dropped.
struct OneShotNbd {
    pid: String,
}

impl OneShotNbd {
    fn start(image: &Path, sock: &Path) -> OneShotNbd {
        let pid_file = sock.with_extension("pid");
        let args = [
            "--fork",
            "-r",
            "-f",
            "raw",
            "--pid-file",
            s(&pid_file),
            "-k",
            s(sock),
        ];
        run_tool(Command::new("qemu-nbd").args(args).arg(image), "");
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .to_string();
        OneShotNbd { pid }
    }

    /// Whether the server has exited (or is a zombie with its files closed).
    fn gone(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid));
        stat.map_or(true, |st| {
            st.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    }
}

impl Drop for OneShotNbd {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-KILL", &self.pid]).status();
    }
}

#[test]
fn a_missing_nbd_server_hints_at_persistent() {
    const T: &str = "a_missing_nbd_server_hints_at_persistent";
    let (bv, _) = vault_with_disk();
    let hint = "qemu-nbd serves one client and exits unless started with --persistent";
    // No socket at all.
    let sock = bv.path("none.sock");
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    let r = bv.run(&["backup", &url, "--disk", "n"]);
    r.code(1)
        .stderr_has(&[s(&sock), hint, "No such file or directory"]);
    // Nobody listening on a TCP port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let r = bv.run(&["inspect", &format!("nbd://127.0.0.1:{port}/x")]);
    r.code(1)
        .stderr_has(&[&format!("127.0.0.1:{port}"), hint, "refused"]);

    // The newcomer's case: `inspect` is the one client of a one-shot qemu-nbd.
    if !tools(T, &[("qemu-nbd", "qemu-utils")]) {
        return;
    }
    let img = bv.path("d.raw");
    let sock = bv.path("one.sock");
    let server = OneShotNbd::start(&img, &sock);
    let url = format!("nbd+unix:///?socket={}", s(&sock));
    bv.run(&["inspect", &url]).ok();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !server.gone() {
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-nbd stayed after its client"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = bv.run(&["backup", &url, "--disk", "n"]);
    r.code(1).stderr_has(&[s(&sock), hint]);
}

#[test]
fn the_bar_counts_the_data_not_the_disk() {
    const T: &str = "the_bar_counts_the_data_not_the_disk";
    let (bv, data) = vault_with_disk();
    let img = s(&bv.path("d.raw")).to_string();
    // A 64 MiB disk holding 6 MiB: the bar's total is the 6 MiB read, then written.
    let Some(shown) = in_terminal(
        &bv,
        T,
        &[],
        &["backup", &img, "--disk", "d", "--parent", "none"],
    ) else {
        return;
    };
    assert!(
        shown.contains("backup [") && shown.contains("/6.00 MiB"),
        "{shown:?}"
    );
    assert!(!shown.contains("/64.00 MiB"), "{shown:?}");
    assert!(shown.contains("read 6.0 MiB"), "{shown:?}");
    let target = bv.path("r.raw");
    let shown = in_terminal(&bv, T, &[], &["restore", "d", s(&target)]).unwrap();
    assert!(
        shown.contains("restore [") && shown.contains("/6.00 MiB"),
        "{shown:?}"
    );
    assert!(!shown.contains("/64.00 MiB"), "{shown:?}");
    assert_file_eq(&target, &data);
    // Not on a terminal: no bar at all.
    let r = bv.run(&["backup", &img, "--disk", "d"]);
    r.ok();
    assert!(!r.stderr.contains("backup ["), "{}", r.stderr);
}

#[test]
fn debug_logging_names_each_stage_with_its_figures() {
    let (bv, _) = vault_with_disk();
    let mut c = bv.command();
    c.env("RUST_LOG", "blockvault=debug");
    let r = bv.run_cmd(
        c,
        &[
            "backup",
            s(&bv.path("d.raw")),
            "--disk",
            "d",
            "--parent",
            "none",
        ],
    );
    r.ok();
    for stage in [
        "vault opened",
        "plan",
        "bytes_to_read=6291456",
        "reader and workers start",
        "reader and workers done",
        "writer: pack sealed",
        "uploader: pack stored",
        "writer: every pack durable",
        "commit: writing the manifest",
    ] {
        assert!(r.stderr.contains(stage), "{stage:?} in\n{}", r.stderr);
    }
    let mut c = bv.command();
    c.env("RUST_LOG", "blockvault=debug");
    let r = bv.run_cmd(c, &["restore", "d", s(&bv.path("r.raw"))]);
    r.ok();
    for stage in [
        "restore: target open",
        "restore: every slot written",
        "bytes_written=6291456",
        "restore: syncing",
    ] {
        assert!(r.stderr.contains(stage), "{stage:?} in\n{}", r.stderr);
    }
}
