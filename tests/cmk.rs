//! Customer-managed RSA keys against the real tools: PEM keys made by `openssl genpkey` (plain
//! and passphrase-protected PKCS#8, PKCS#1 by `openssl rsa -traditional`, a 2048-bit key that
//! must be refused) and RSA keys inside a SoftHSM2 token made by `softhsm2-util` and
//! `pkcs11-tool`.
//!
//! Keys are made once per test binary (tests/common/keys.rs). SoftHSM reads `SOFTHSM2_CONF` when the
//! module is first initialised in the process, so every HSM test shares one token folder:
//! token `bv` (key `cmk` id 01); token `spare` (key `cmk` id 01), which only the wrong-PIN
//! test logs in to, so that no other test's login is shared with it; token `doomed` (key
//! `gone` id 02), whose private key one test deletes with `pkcs11-tool` (SoftHSM may hide a
//! token from another process while this one is using it, so that token is used by no other
//! test). Token labels share no prefix: `pkcs11-tool --token-label` matches prefixes.

mod common;

use std::process::Command;
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use blockvault::crypto::kek::{KekId, KekKind, KekProvider};
use blockvault::crypto::rsa::{
    read_public_key, CmkKey, EnrolPolicy, OaepHash, PemKek, Pkcs11Kek, Pkcs11Options,
    PrivateKeyFile, SecretSource,
};
use blockvault::crypto::Secret32;
use blockvault::ErrorKind;
use common::keys::{fixture_dir, pem_keys, softhsm, PemKeys, SoftHsm};

// ---------------------------------------------------------------------------------------------
// PEM keys (made once per test binary: tests/common/keys.rs)
// ---------------------------------------------------------------------------------------------

fn public(keys: &PemKeys, kind: KekKind, file: &str) -> CmkKey {
    read_public_key(kind, 1, OaepHash::Sha256, &keys.path(file)).unwrap()
}

fn private(keys: &PemKeys, file: &str, pass: Option<&str>) -> Option<PrivateKeyFile> {
    Some(PrivateKeyFile {
        path: keys.path(file),
        passphrase: pass.map(|p| SecretSource::File(keys.path(p))),
    })
}

/// The unwrap check of customer key `public_file` through the private key file `private_file`
/// (its passphrase in the file `pass`) fails with a `Key` error naming each of `needles`.
fn refused(
    keys: &PemKeys,
    public_file: &str,
    private_file: Option<&str>,
    pass: Option<&str>,
    needles: &[&str],
) {
    let private = private_file.and_then(|f| private(keys, f, pass));
    let err = PemKek::new(public(keys, KekKind::CustomerRsa, public_file), private)
        .unwrap()
        .check_unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key, "{err}");
    for needle in needles {
        assert!(err.to_string().contains(needle), "{needle:?} in {err}");
    }
}

/// The contract every provider keeps: round trip; other AAD, swapped blobs, flipped bits and
/// truncation refused.
fn check_contract(wrapper: &dyn KekProvider, unwrapper: &dyn KekProvider) {
    let id = wrapper.current().unwrap();
    let dek_a = Secret32::from_bytes([0xa1; 32]);
    let dek_b = Secret32::from_bytes([0xb2; 32]);
    let wa = wrapper.wrap(id, &dek_a, b"vault|disk-a|gen0").unwrap();
    let wb = wrapper.wrap(id, &dek_b, b"vault|disk-b|gen0").unwrap();
    assert_ne!(wa, wrapper.wrap(id, &dek_a, b"vault|disk-a|gen0").unwrap());
    let back = unwrapper.unwrap(id, &wa, b"vault|disk-a|gen0").unwrap();
    assert_eq!(back.expose(), dek_a.expose());
    // Another AAD: refused.
    let err = unwrapper
        .unwrap(id, &wa, b"vault|disk-b|gen0")
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}");
    // Blobs swapped between two disks: each refused under the other's AAD.
    assert!(unwrapper.unwrap(id, &wb, b"vault|disk-a|gen0").is_err());
    assert!(unwrapper.unwrap(id, &wa, b"vault|disk-b|gen0").is_err());
    // RSA part of one with GCM part of the other.
    let n = u16::from_le_bytes([wa[0], wa[1]]) as usize;
    let mut mixed = wa[..2 + n].to_vec();
    mixed.extend_from_slice(&wb[2 + n..]);
    assert!(unwrapper.unwrap(id, &mixed, b"vault|disk-a|gen0").is_err());
    // A flipped bit in the RSA ciphertext, in the GCM part, and in the length field.
    for at in [2 + n / 2, 2 + n + 20, 0] {
        let mut bad = wa.clone();
        bad[at] ^= 0x04;
        let err = unwrapper
            .unwrap(id, &bad, b"vault|disk-a|gen0")
            .err()
            .unwrap();
        assert!(
            matches!(err.kind(), ErrorKind::Integrity | ErrorKind::Key),
            "flip at {at}: {err:?}"
        );
    }
    let err = unwrapper
        .unwrap(id, &wa[..wa.len() - 1], b"vault|disk-a|gen0")
        .err()
        .unwrap();
    assert!(err.to_string().contains("bytes, expected"), "{err}");
    // Another key id: refused before any decryption.
    let other = KekId {
        kind: id.kind,
        version: id.version + 1,
    };
    assert_eq!(
        unwrapper
            .unwrap(other, &wa, b"vault|disk-a|gen0")
            .err()
            .unwrap()
            .kind(),
        ErrorKind::Key
    );
}

// ---------------------------------------------------------------------------------------------
// PEM keys
// ---------------------------------------------------------------------------------------------

#[test]
fn pem_wraps_with_public_key_and_unwraps_with_private_key() {
    let Some(k) = pem_keys("pem_wraps_with_public_key_and_unwraps_with_private_key") else {
        return;
    };
    let wrapper = PemKek::new(public(k, KekKind::CustomerRsa, "a.pub"), None).unwrap();
    let unwrapper = PemKek::new(
        public(k, KekKind::CustomerRsa, "a.pub"),
        private(k, "a.key", None),
    )
    .unwrap();
    assert_eq!(wrapper.current().unwrap().to_string(), "cmk-rsa-v1");
    assert_eq!(wrapper.key().bits(), 3072);
    check_contract(&wrapper, &unwrapper);
    unwrapper.check_unwrap().unwrap();
}

#[test]
fn pkcs1_and_spki_public_keys_have_one_fingerprint() {
    let Some(k) = pem_keys("pkcs1_and_spki_public_keys_have_one_fingerprint") else {
        return;
    };
    let spki = public(k, KekKind::CustomerRsa, "a.pub");
    let pkcs1 = public(k, KekKind::CustomerRsa, "a.pkcs1.pub");
    assert_eq!(spki.fingerprint(), pkcs1.fingerprint());
    assert_eq!(spki.public_spki(), pkcs1.public_spki());
    // The fingerprint is what `openssl pkey -pubout -outform DER | sha256sum` prints.
    let der = Command::new("openssl")
        .args(["pkey", "-pubin", "-in"])
        .arg(k.path("a.pub"))
        .args(["-outform", "DER"])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(spki.public_spki(), &der[..]);
    // Wrapped by the PKCS#1 form, unwrapped through the SPKI form's descriptor.
    let w = PemKek::new(pkcs1, None).unwrap();
    let u = PemKek::new(spki, private(k, "a.key", None)).unwrap();
    check_contract(&w, &u);
}

#[test]
fn pkcs1_private_keys_unwrap_and_legacy_encrypted_ones_are_refused() {
    let Some(k) = pem_keys("pkcs1_private_keys_unwrap_and_legacy_encrypted_ones_are_refused")
    else {
        return;
    };
    let text = std::fs::read_to_string(k.path("a.pkcs1.key")).unwrap();
    assert!(
        text.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "{text:.40}"
    );
    // Unwraps what the SPKI descriptor wrapped, and passes the fingerprint check.
    let kek = PemKek::new(
        public(k, KekKind::CustomerRsa, "a.pub"),
        private(k, "a.pkcs1.key", None),
    )
    .unwrap();
    kek.check_unwrap().unwrap();
    let w = PemKek::new(public(k, KekKind::CustomerRsa, "a.pub"), None).unwrap();
    check_contract(&w, &kek);
    // The PKCS#1 form of another key is named as the wrong key, as a PKCS#8 one is.
    refused(
        k,
        "b.pub",
        Some("a.pkcs1.key"),
        None,
        &["a.pkcs1.key holds key sha256:"],
    );
    // Legacy-encrypted PKCS#1: refused with the conversion, even with the right passphrase.
    let conversion = [
        "a.pkcs1.enc.key",
        "Proc-Type: 4,ENCRYPTED",
        "openssl pkcs8 -topk8",
    ];
    refused(
        k,
        "a.pub",
        Some("a.pkcs1.enc.key"),
        Some("pass"),
        &conversion,
    );
}

#[test]
fn encrypted_pkcs8_needs_the_right_passphrase() {
    let Some(k) = pem_keys("encrypted_pkcs8_needs_the_right_passphrase") else {
        return;
    };
    let kek = |pass| {
        PemKek::new(
            public(k, KekKind::CustomerRsa, "a.pub"),
            private(k, "a.enc.key", pass),
        )
        .unwrap()
    };
    let good = kek(Some("pass"));
    good.check_unwrap().unwrap();
    check_contract(&good, &good);
    let err = kek(Some("wrongpass")).check_unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(err.to_string().contains("passphrase incorrect"), "{err}");
    let err = kek(None).check_unwrap().unwrap_err();
    assert!(err.to_string().contains("no passphrase"), "{err}");
}

#[test]
fn small_keys_and_private_keys_as_public_keys_are_refused() {
    let Some(k) = pem_keys("small_keys_and_private_keys_as_public_keys_are_refused") else {
        return;
    };
    let err = read_public_key(
        KekKind::CustomerRsa,
        1,
        OaepHash::Sha256,
        &k.path("small.pub"),
    )
    .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(err.to_string().contains("2048 bits is too small"), "{err}");
    assert!(err.to_string().contains("at least 3072"), "{err}");
    let err =
        read_public_key(KekKind::CustomerRsa, 1, OaepHash::Sha256, &k.path("a.key")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Usage);
    assert!(err.to_string().contains("is a private key"), "{err}");
    let err = read_public_key(
        KekKind::CustomerRsa,
        1,
        OaepHash::Sha256,
        &k.path("nope.pub"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    // A 2048-bit private key cannot sneak in at unwrap time either: its fingerprint differs.
    let kek = PemKek::new(
        public(k, KekKind::CustomerRsa, "a.pub"),
        private(k, "small.key", None),
    )
    .unwrap();
    assert!(kek.check_unwrap().is_err());
}

#[test]
fn check_unwrap_names_a_missing_or_wrong_private_key() {
    let Some(k) = pem_keys("check_unwrap_names_a_missing_or_wrong_private_key") else {
        return;
    };
    refused(k, "a.pub", None, None, &["private key file missing"]);
    refused(k, "a.pub", Some("gone.key"), None, &["gone.key missing"]);
    refused(
        k,
        "a.pub",
        Some("b.key"),
        None,
        &["b.key holds key sha256:"],
    );
}

#[test]
fn recovery_key_is_its_own_kind() {
    let Some(k) = pem_keys("recovery_key_is_its_own_kind") else {
        return;
    };
    let rec = PemKek::new(
        public(k, KekKind::Recovery, "b.pub"),
        private(k, "b.key", None),
    )
    .unwrap();
    let id = rec.current().unwrap();
    assert_eq!(id.to_string(), "recovery-v1");
    check_contract(&rec, &rec);
    // A recovery wrap is not accepted under the customer key's id, nor the reverse.
    let w = rec
        .wrap(id, &Secret32::from_bytes([3; 32]), b"aad")
        .unwrap();
    let cmk_id = KekId {
        kind: KekKind::CustomerRsa,
        version: 1,
    };
    assert!(rec.unwrap(cmk_id, &w, b"aad").is_err());
    // A PKCS#11 descriptor is not a PEM key.
    let err = PemKek::new(public(k, KekKind::CustomerPkcs11, "b.pub"), None)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Usage);
}

#[test]
fn descriptor_round_trips_and_refuses_edits() {
    let Some(k) = pem_keys("descriptor_round_trips_and_refuses_edits") else {
        return;
    };
    let key = public(k, KekKind::CustomerRsa, "a.pub");
    let bytes = key.encode();
    let back = CmkKey::decode(&bytes, "config cmk").unwrap();
    assert_eq!(back.id(), key.id());
    assert_eq!(back.oaep(), key.oaep());
    assert_eq!(back.fingerprint(), key.fingerprint());
    assert_eq!(back.source(), key.source());
    assert_eq!(back.encode(), bytes);
    // A DEK wrapped through the decoded descriptor opens with the private key.
    let w = PemKek::new(back, None).unwrap();
    let u = PemKek::new(key, private(k, "a.key", None)).unwrap();
    check_contract(&w, &u);
    // Fingerprint edited: refused. Every truncation: refused.
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    let err = CmkKey::decode(&bad, "config cmk").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Integrity);
    assert!(err.to_string().contains("fingerprint"), "{err}");
    for len in 0..bytes.len() {
        assert!(CmkKey::decode(&bytes[..len], "config cmk").is_err());
    }
}

// ---------------------------------------------------------------------------------------------
// SoftHSM2
// ---------------------------------------------------------------------------------------------

/// The shared token folder (see the module docs).
struct Hsm {
    token: SoftHsm,
}

/// SoftHSM's file store is not safe against another process changing a token while this one
/// reads it (GetTokenInfo fails, tokens vanish for a moment), so the test that runs
/// `pkcs11-tool --delete-object` holds this exclusively and every other HSM test shares it.
static HSM_LOCK: RwLock<()> = RwLock::new(());

impl Hsm {
    fn shared(&self) -> RwLockReadGuard<'static, ()> {
        HSM_LOCK.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'static, ()> {
        HSM_LOCK.write().unwrap_or_else(|p| p.into_inner())
    }

    fn pin(&self, name: &str) -> Pkcs11Options {
        Pkcs11Options {
            module: None,
            pin: Some(SecretSource::File(self.token.pin(name))),
        }
    }

    /// Enrol `uri` with RSA-OAEP SHA-256 if the token takes it, else with the SHA-1 that
    /// Debian 12's SoftHSM 2.6.1 needs, chosen explicitly as an operator would (`--oaep sha1`):
    /// enrolment itself never falls back.
    fn enroll(&self, uri: &str) -> Pkcs11Kek {
        match Pkcs11Kek::enroll(uri, 1, EnrolPolicy::default(), self.pin("pin")) {
            Ok(kek) => kek,
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                Pkcs11Kek::enroll(uri, 1, sha1(), self.pin("pin")).unwrap()
            }
            Err(e) => panic!("enrolling {uri}: {e:?}"),
        }
    }
}

/// The policy of `--oaep sha1`.
fn sha1() -> EnrolPolicy {
    EnrolPolicy {
        oaep: OaepHash::Sha1,
        ..EnrolPolicy::default()
    }
}

/// The shared SoftHSM token folder (see the module docs). `None` (after a SKIP line) when
/// SoftHSM2 or OpenSC is missing.
fn hsm(test: &str) -> Option<&'static Hsm> {
    if !softhsm(test) {
        return None;
    }
    static H: OnceLock<Hsm> = OnceLock::new();
    Some(H.get_or_init(|| {
        let token = SoftHsm::new(fixture_dir("hsm"));
        // Before any PKCS#11 call of this process.
        std::env::set_var("SOFTHSM2_CONF", &token.conf);
        for label in ["bv", "spare", "doomed"] {
            token.init_token(label);
        }
        for (label, object, id) in [
            ("bv", "cmk", "01"),
            ("spare", "cmk", "01"),
            ("doomed", "gone", "02"),
        ] {
            token.keypair(label, object, id);
        }
        Hsm { token }
    }))
}

#[test]
fn hsm_round_trip_with_login_per_job() {
    let Some(h) = hsm("hsm_round_trip_with_login_per_job") else {
        return;
    };
    let _hsm = h.shared();
    let kek = h.enroll("pkcs11:token=bv;object=cmk;id=%01");
    let key = kek.key();
    assert_eq!(key.id().to_string(), "cmk-pkcs11-v1");
    assert_eq!(key.bits(), 3072);
    assert_eq!(key.source(), "pkcs11:token=bv;object=cmk;id=%01");
    // Debian 12's SoftHSM 2.6.1 supports RSA-OAEP with SHA-1 only; a newer one SHA-256.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "hsm_round_trip_with_login_per_job: token uses {}\n",
            key.oaep()
        )
        .as_bytes(),
    );
    // One login for a batch of unwraps, and a login per call.
    let job = kek.login().unwrap();
    check_contract(&kek, &job);
    drop(job);
    check_contract(&kek, &kek);
    kek.check_unwrap().unwrap();
    // The stored descriptor reopens without touching the token, and still unwraps.
    let stored = CmkKey::decode(&key.encode(), "config cmk").unwrap();
    let reopened = Pkcs11Kek::open(stored, h.pin("pin")).unwrap();
    check_contract(&kek, &reopened);
    // PIN from the environment when no file is given.
    std::env::set_var("BLOCKVAULT_PKCS11_PIN", "1234");
    let stored = CmkKey::decode(&key.encode(), "config cmk").unwrap();
    Pkcs11Kek::open(stored, Pkcs11Options::default())
        .unwrap()
        .check_unwrap()
        .unwrap();
}

#[test]
fn hsm_sha1_only_when_asked() {
    let Some(h) = hsm("hsm_sha1_only_when_asked") else {
        return;
    };
    let _hsm = h.shared();
    let uri = "pkcs11:token=bv;object=cmk";
    match Pkcs11Kek::enroll(uri, 1, EnrolPolicy::default(), h.pin("pin")) {
        // A token with SHA-256 (SoftHSM 2.6.1 has none) is enrolled with it.
        Ok(kek) => assert_eq!(kek.key().oaep(), OaepHash::Sha256),
        // Otherwise enrolment fails, saying how to choose SHA-1 and what that means: it
        // never falls back to SHA-1 on its own.
        Err(err) => {
            assert_eq!(err.kind(), ErrorKind::Unsupported, "{err:?}");
            for says in ["refuses RSA-OAEP with SHA-256", "--oaep sha1", "collision"] {
                assert!(err.to_string().contains(says), "{says}: {err}");
            }
        }
    }
    let kek = Pkcs11Kek::enroll(uri, 1, sha1(), h.pin("pin")).unwrap();
    assert_eq!(kek.key().oaep(), OaepHash::Sha1);
    check_contract(&kek, &kek);
}

#[test]
fn hsm_wrong_pin_fails_clearly() {
    let Some(h) = hsm("hsm_wrong_pin_fails_clearly") else {
        return;
    };
    let _hsm = h.shared();
    let uri = "pkcs11:token=spare;object=cmk;id=%01";
    let err = Pkcs11Kek::enroll(uri, 1, sha1(), h.pin("badpin"))
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(
        err.to_string().contains("PIN incorrect for token 'spare'"),
        "{err}"
    );
    // A stored key with the wrong PIN: the pre-backup check says so.
    let good = h.enroll(uri);
    let stored = CmkKey::decode(&good.key().encode(), "config cmk").unwrap();
    let bad = Pkcs11Kek::open(stored, h.pin("badpin")).unwrap();
    let err = bad.check_unwrap().unwrap_err();
    assert!(err.to_string().contains("PIN incorrect"), "{err}");
    // A missing PIN file names the file.
    let err = Pkcs11Kek::enroll(uri, 1, sha1(), h.pin("no-such-pin"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("no-such-pin"), "{err}");
}

#[test]
fn hsm_deleted_private_key_fails_check_but_public_key_still_wraps() {
    let Some(h) = hsm("hsm_deleted_private_key_fails_check_but_public_key_still_wraps") else {
        return;
    };
    let _hsm = h.exclusive();
    let kek = h.enroll("pkcs11:token=doomed;object=gone;id=%02");
    kek.check_unwrap().unwrap();
    let id = kek.current().unwrap();
    let before = kek
        .wrap(id, &Secret32::from_bytes([9; 32]), b"aad")
        .unwrap();
    h.token.delete_private("doomed", "02");
    let err = kek.check_unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(
        err.to_string()
            .contains("private key not found on token 'doomed' (object=gone id=02)"),
        "{err}"
    );
    assert!(err.to_string().contains("revoked or unreachable"), "{err}");
    // Wrapping needs only the public key, so it still "works": exactly why the check exists.
    kek.wrap(id, &Secret32::from_bytes([9; 32]), b"aad")
        .unwrap();
    assert!(kek.unwrap(id, &before, b"aad").is_err());
}

#[test]
fn hsm_unreachable_token_and_module_are_named() {
    let Some(h) = hsm("hsm_unreachable_token_and_module_are_named") else {
        return;
    };
    let _hsm = h.shared();
    let err = Pkcs11Kek::enroll("pkcs11:token=nope;object=cmk", 1, sha1(), h.pin("pin"))
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(err.to_string().contains("token 'nope' not found"), "{err}");
    assert!(err.to_string().contains("revoked or unreachable"), "{err}");
    let err = Pkcs11Kek::enroll(
        "pkcs11:token=bv;object=cmk?module-path=/nonexistent/libpkcs11.so",
        1,
        sha1(),
        h.pin("pin"),
    )
    .err()
    .unwrap();
    assert_eq!(err.kind(), ErrorKind::Key);
    assert!(
        err.to_string()
            .contains("/nonexistent/libpkcs11.so cannot be loaded"),
        "{err}"
    );
    let err = Pkcs11Kek::enroll(
        "pkcs11:token=bv;object=cmk?pin-value=1234",
        1,
        sha1(),
        h.pin("pin"),
    )
    .err()
    .unwrap();
    assert_eq!(err.kind(), ErrorKind::Usage);
}
