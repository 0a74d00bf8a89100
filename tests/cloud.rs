//! Vaults on object storage through the binary, against real servers on loopback: Azurite
//! (Azure Blob over HTTPS with a test CA) and SeaweedFS (S3). The whole life of a vault there,
//! two hosts sharing one, and the refusals: credentials never shown, plain HTTP and unknown CAs
//! refused, a store that ignores conditional writes refused at open, a killed backup's lease
//! taken over by the next run; `snapshots` served from the local manifest cache.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use blockvault::vault::store::cloud::{CloudConfig, CloudStore};
use blockvault::vault::store::Store;
use blockvault::ErrorKind;
use common::servers::{self, Kind};
use common::*;
use serde_json::Value;

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// Init, full backup, incremental, byte-exact restores, verify --read-data, key rotation, and
/// a second host (its own keystore, after `key import`) backing up another disk into the same
/// vault, whose backup the first host then restores.
#[test]
fn a_vault_lives_on_object_storage_and_two_hosts_share_it() {
    for server in servers::servers("a_vault_lives_on_object_storage") {
        let bv = server.bv();
        let doc = bv.json(&["init"]);
        assert!(
            doc.to_string().contains(&*bv.vault.to_string_lossy()),
            "{doc}"
        );
        let img = bv.path("disk.img");
        let mut data = mixed_data(1, 24 * MIB as usize);
        write_file(&img, &data);
        let full = bv.backup(&img, "vm1", &[]);
        assert_eq!(
            full["slots_new"].as_u64().unwrap() + full["slots_zero"].as_u64().unwrap(),
            24
        );
        // Change three slots: the incremental stores those three.
        for (i, slot) in [2u64, 9, 17].iter().enumerate() {
            let at = (slot * MIB + 4096 * i as u64) as usize;
            data[at..at + 8192].copy_from_slice(&random_data(50 + i as u64, 8192));
        }
        write_file(&img, &data);
        let inc = bv.backup(&img, "vm1", &[]);
        assert_eq!(inc["slots_new"], 3, "{inc}");
        assert!(
            inc["bytes_stored"].as_u64().unwrap() < 3 * 64 * KIB,
            "{inc}"
        );
        let snaps = bv.snapshots();
        assert_eq!(snaps.len(), 2);
        let first = snaps[0]["id"].as_str().unwrap();
        bv.restore_and_compare("vm1@latest", &data);
        bv.restore_and_compare(&format!("vm1@{first}"), &mixed_data(1, 24 * MIB as usize));
        bv.verify_ok();

        // Key rotation: the old snapshots still restore, new backups use the new key.
        bv.run(&["key", "rotate"]).ok();
        data[0..4096].copy_from_slice(&random_data(77, 4096));
        write_file(&img, &data);
        bv.backup(&img, "vm1", &[]);
        bv.restore_and_compare("vm1@latest", &data);
        bv.restore_and_compare(&format!("vm1@{first}"), &mixed_data(1, 24 * MIB as usize));

        // A second host: its own keystore, filled by `key import`.
        let pass = bv.path("pass");
        std::fs::write(&pass, "a passphrase for the second host\n").unwrap();
        let export = bv.path("keys.export");
        bv.run(&["key", "export", s(&export), "--passphrase-file", s(&pass)])
            .ok();
        let host2 = bv.path("host2-keystore");
        let run2 = |args: &[&str]| bv.run_cmd(bv.command_with_keystore(&host2), args);
        run2(&["key", "import", s(&export), "--passphrase-file", s(&pass)]).ok();
        let img2 = bv.path("disk2.img");
        let data2 = mixed_data(2, 12 * MIB as usize);
        write_file(&img2, &data2);
        run2(&["backup", s(&img2), "--disk", "vm2"]).ok();
        // Host 1 sees and restores host 2's disk, and the vault still verifies.
        let disks: Vec<String> = bv
            .snapshots()
            .iter()
            .map(|s| s["disk"].as_str().unwrap().to_string())
            .collect();
        assert!(disks.contains(&"vm2".to_string()), "{disks:?}");
        bv.restore_and_compare("vm2@latest", &data2);
        bv.verify_ok();
    }
}

/// Every output of every command (stdout, stderr with debug logging, JSON, errors) is free of
/// the store's secret, on success and on an authentication failure; a distinctive SAS token
/// that Azurite rejects never shows either.
#[test]
fn credentials_never_appear_in_outputs() {
    for server in servers::servers("credentials_never_appear_in_outputs") {
        let mut bv = server.bv();
        let secret = match server.kind {
            Kind::Seaweed => server.secret.clone(),
            Kind::Azurite => {
                // The emulator's key is public; a SAS token (which travels in URLs) is the
                // secret to watch. Azurite refuses this one: every request fails.
                let sas = "sv=2021-08-06&ss=b&srt=sco&sp=rwdlac&se=2099-01-01T00:00:00Z\
                           &sig=BvDistinctiveSasSignature0123456789abcdefXYZ%3D";
                bv.env.push(("AZURE_STORAGE_SAS_TOKEN".into(), sas.into()));
                "BvDistinctiveSasSignature0123456789".into()
            }
        };
        let img = bv.path("disk.img");
        write_file(&img, &mixed_data(3, 6 * MIB as usize));
        let mut runs = Vec::new();
        let mut c = bv.command();
        c.env("RUST_LOG", "debug");
        runs.push(bv.run_cmd(c, &["--json", "init"]));
        if server.kind == Kind::Seaweed {
            runs[0].ok();
            for args in [
                vec!["--json", "backup", s(&img), "--disk", "d"],
                vec!["--json", "snapshots"],
                vec!["--json", "verify", "--read-data"],
                vec!["backup", s(&img), "--disk", "d"],
            ] {
                let mut c = bv.command();
                c.env("RUST_LOG", "debug");
                let r = bv.run_cmd(c, &args);
                r.ok();
                runs.push(r);
            }
            // A wrong secret: authentication fails, and the message does not repeat it.
            let mut wrong = bv.command();
            let bad = format!("{secret}-but-wrong");
            wrong
                .env("AWS_SECRET_ACCESS_KEY", &bad)
                .env("RUST_LOG", "debug");
            let r = bv.run_cmd(wrong, &["--json", "snapshots"]);
            r.code(1);
            assert!(!r.stdout.contains("-but-wrong") && !r.stderr.contains("-but-wrong"));
            runs.push(r);
        } else {
            runs[0].code(1).stderr_has(&[&*bv.vault.to_string_lossy()]);
        }
        for r in &runs {
            assert!(
                !r.stdout.contains(&secret) && !r.stderr.contains(&secret),
                "`{}` printed the secret:\n{}\n{}",
                r.what,
                r.stdout,
                r.stderr
            );
        }
        // And none of it in argv: credentials have no command-line option at all.
        let help = bv.run(&["--help"]);
        // (The help does name the environment variables secrets come from; no option takes one.)
        for word in [
            "--secret",
            "--sas",
            "--access-key",
            "--password",
            "--aws",
            "--azure",
        ] {
            assert!(
                !help.stdout.to_lowercase().contains(word),
                "{word}: {}",
                help.stdout
            );
        }
    }
}

/// Plain HTTP needs BLOCKVAULT_ALLOW_HTTP=1; HTTPS needs a certificate the client trusts
/// (system roots, or BLOCKVAULT_CA_CERT): both refusals name the vault and what to do.
#[test]
fn plain_http_and_unknown_certificates_are_refused() {
    if let Some(server) = servers::seaweed("plain_http_is_refused") {
        let mut bv = server.bv();
        bv.env.retain(|(k, _)| k != "BLOCKVAULT_ALLOW_HTTP");
        bv.run(&["init"]).code(2).stderr_has(&[
            "plain HTTP",
            "BLOCKVAULT_ALLOW_HTTP=1",
            &*bv.vault.to_string_lossy(),
        ]);
    }
    if let Some(server) = servers::azurite("unknown_certificates_are_refused") {
        let mut bv = server.bv();
        bv.env.retain(|(k, _)| k != "BLOCKVAULT_CA_CERT");
        bv.run(&["init"])
            .code(1)
            .stderr_has(&[&*bv.vault.to_string_lossy()]);
        // With the CA it works.
        let bv = server.bv();
        bv.run(&["init"]).ok();
    }
}

/// A backup SIGKILLed while it holds its disk's lease leaves the lease object behind; the
/// next backup of the disk, on the same machine, sees its holder is gone and takes it over at
/// once, and the vault verifies.
#[test]
fn a_killed_backups_lease_is_taken_over_by_the_next_run() {
    let Some(server) = servers::seaweed("a_killed_backups_lease") else {
        return;
    };
    let bv = server.bv();
    let img = bv.path("disk.img");
    let data = random_data(4, 64 * MIB as usize);
    write_file(&img, &data);
    bv.run(&["init"]).ok();
    bv.backup(&img, "d", &["--parent", "none"]);
    let (mut child, _) = bv.spawn(&["backup", s(&img), "--disk", "d", "--parent", "none"]);
    let store = CloudStore::open(&bv.vault.to_string_lossy(), &server.config()).unwrap();
    // Wait until the backup holds its disk lease, then kill it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let held = loop {
        let leases: Vec<String> = store
            .list("locks")
            .unwrap()
            .into_iter()
            .filter(|k| k != "locks/keys")
            .collect();
        if !leases.is_empty() || std::time::Instant::now() > deadline {
            break leases;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!held.is_empty(), "never saw the backup's disk lease");
    assert!(
        !status.success(),
        "the backup finished before it was killed"
    );
    assert!(store.list("locks").unwrap().contains(&held[0]), "{held:?}");
    let doc = bv.backup(&img, "d", &[]);
    assert_eq!(doc["slots_new"], 0, "{doc}");
    bv.restore_and_compare("d@latest", &data);
    bv.verify_ok();
}

/// A header-stripping HTTP proxy: forwards each request to `upstream` without its
/// `If-None-Match` and `If-Match` headers, as a store that accepts conditional writes and
/// ignores them behaves. One request per connection.
fn stripping_proxy(upstream: String, strip: bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut out = String::new();
                for line in text.split("\r\n").filter(|l| !l.is_empty()) {
                    let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
                    if name == "connection"
                        || (strip && (name == "if-none-match" || name == "if-match"))
                    {
                        continue;
                    }
                    out.push_str(line);
                    out.push_str("\r\n");
                }
                out.push_str("Connection: close\r\n\r\n");
                let Ok(mut server) = TcpStream::connect(&upstream) else {
                    return;
                };
                server.write_all(out.as_bytes()).unwrap();
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut s2);
                });
                let _ = std::io::copy(&mut server, &mut client);
                let _ = client.shutdown(std::net::Shutdown::Both);
                let _ = up.join();
            });
        }
    });
    port
}

/// A store that takes If-None-Match and If-Match and ignores them (SeaweedFS behind a proxy
/// that drops the headers, reached anonymously so the signature does not cover them) is
/// refused at open, saying why; the same path without the stripping opens.
#[test]
fn a_store_that_ignores_conditional_writes_is_refused() {
    let Some(server) = servers::seaweed("a_store_that_ignores_conditional_writes") else {
        return;
    };
    let endpoint = server
        .env
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .unwrap()
        .1
        .trim_start_matches("http://")
        .to_string();
    // The open bucket: anonymous requests may read and write it (servers.rs), made by a
    // signed write first.
    CloudStore::open(
        &format!("s3://{}/x", servers::OPEN_BUCKET),
        &server.config(),
    )
    .unwrap();
    for strip in [true, false] {
        let port = stripping_proxy(endpoint.clone(), strip);
        let config = CloudConfig::from_pairs([
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_SKIP_SIGNATURE", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("BLOCKVAULT_ALLOW_HTTP", "1".into()),
        ]);
        let url = format!("s3://{}/ignoring-{strip}", servers::OPEN_BUCKET);
        match CloudStore::open(&url, &config) {
            Ok(s) => {
                assert!(!strip, "a store ignoring conditional writes was accepted");
                s.put("config", b"works").unwrap();
            }
            Err(e) => {
                assert!(strip, "{e:?}");
                assert_eq!(e.kind(), ErrorKind::Unsupported, "{e:?}");
                for says in ["does not enforce conditional writes", "If-None-Match", &url] {
                    assert!(e.to_string().contains(says), "{says}: {e}");
                }
            }
        }
    }
}

/// `snapshots --json` with the store's debug request counters on: the document and the GETs
/// the run made (summed over the store's counter lines).
fn snapshots_and_gets(bv: &Bv) -> (Value, u64) {
    let mut c = bv.command();
    c.env("RUST_LOG", "blockvault=debug");
    let r = bv.run_cmd(c, &["--json", "snapshots"]);
    r.ok();
    let plain = String::from_utf8(strip_ansi(r.stderr.as_bytes())).unwrap();
    let gets: Vec<u64> = plain
        .lines()
        .filter(|l| l.contains("object store requests"))
        .map(|l| {
            let at = l.find(" get=").expect("get counter") + 5;
            let digits: String = l[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().unwrap()
        })
        .collect();
    assert!(!gets.is_empty(), "no request counters in {}", r.stderr);
    (r.json(), gets.iter().sum())
}

fn strip_ansi(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == 0x1b {
            while i < bytes.len() && bytes[i] != b'm' {
                i += 1;
            }
        } else {
            out.push(bytes[i]);
        }
        i += 1;
    }
    out
}

/// The second `snapshots` on a SeaweedFS vault reads no manifest (exactly as many GETs fewer
/// as there are snapshots) and lists the same; a tampered cache entry is ignored, the manifest
/// fetched again and the entry rewritten.
#[test]
fn snapshots_come_from_the_manifest_cache_the_second_time() {
    let Some(server) = servers::seaweed("snapshots_come_from_the_manifest_cache") else {
        return;
    };
    let bv = server.bv();
    bv.json(&["init"]);
    let img = bv.path("disk.img");
    let mut data = mixed_data(3, 4 * MIB as usize);
    for round in 0..3u64 {
        data[0..4096].copy_from_slice(&random_data(90 + round, 4096));
        write_file(&img, &data);
        bv.backup(&img, "vm1", &[]);
    }
    let cache = cache_files(&bv);
    assert!(cache.is_empty(), "backups fill no cache: {cache:?}");
    let (first, cold) = snapshots_and_gets(&bv);
    let (second, warm) = snapshots_and_gets(&bv);
    assert_eq!(first, second);
    assert_eq!(first["snapshots"].as_array().unwrap().len(), 3);
    assert_eq!(cold - warm, 3, "cold {cold} GETs, warm {warm}");

    let cache = cache_files(&bv);
    assert_eq!(cache.len(), 3, "{cache:?}");
    let good = std::fs::read(&cache[0]).unwrap();
    let mut bad = good.clone();
    bad[40] ^= 1;
    std::fs::write(&cache[0], &bad).unwrap();
    let (third, tampered) = snapshots_and_gets(&bv);
    assert_eq!(third, first);
    assert_eq!(tampered, warm + 1);
    assert_eq!(std::fs::read(&cache[0]).unwrap(), good);
}

/// The manifest cache's files in the keystore of `bv`, sorted.
fn cache_files(bv: &Bv) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = walk(&bv.keystore)
        .into_iter()
        .filter(|p| {
            p.parent()
                .unwrap()
                .to_string_lossy()
                .ends_with(".manifests")
        })
        .collect();
    files.sort();
    files
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
