//! `blockvault init [--cmk rsa:PUB.pem|pkcs11:URI] [--recovery-key rsa:PUB.pem]
//! [--infrastructure-encryption [--infra-recovery-key rsa:PUB.pem]] [--forget-vault ID]`

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;

use blockvault::crypto::kek::KekKind;
use blockvault::crypto::rsa::{self, CmkKey, EnrolPolicy, OaepHash, Pkcs11Kek};
use blockvault::keys::init::{self, InitOptions};
use blockvault::Error;

use super::Context;

/// Arguments of `init`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Wrap every DEK with a customer-managed RSA key (3072 bits or more) instead of the
    /// platform key: `rsa:PUBLIC.pem` or `pkcs11:URI` (RFC 7512). Fixed for the vault's life.
    #[arg(long, value_name = "KEY")]
    cmk: Option<String>,
    /// Also wrap every DEK with this offline RSA public key (`rsa:PUBLIC.pem`), so that a lost
    /// keystore or HSM does not lose the backups (`key recover`).
    #[arg(long, value_name = "KEY")]
    recovery_key: Option<String>,
    /// Add a second, independent encryption layer (AES-256-XTS, platform-managed key) over
    /// every stored object. Only with --cmk.
    #[arg(long)]
    infrastructure_encryption: bool,
    #[command(flatten)]
    enrol: EnrolArgs,
    /// A second offline RSA public key (`rsa:PUBLIC.pem`) that alone recovers the
    /// infrastructure layer's key, so that neither recovery key opens both layers (without it,
    /// --recovery-key recovers that key too).
    #[arg(long, value_name = "KEY", requires = "infrastructure_encryption")]
    infra_recovery_key: Option<String>,
    /// This host knew a vault at the URL that is gone for good: forget it (its id) and create
    /// a new one in its place.
    #[arg(long, value_name = "VAULT_ID", value_parser = parse_vault_id)]
    forget_vault: Option<[u8; 16]>,
}

fn parse_vault_id(s: &str) -> Result<[u8; 16], String> {
    let mut id = [0u8; 16];
    hex::decode_to_slice(s, &mut id)
        .map_err(|_| format!("{s:?} is not a vault id (32 hex digits)"))?;
    Ok(id)
}

/// How a new customer-managed key is enrolled (`init --cmk`, `key rotate --new-cmk`,
/// `key recover --new-cmk`). Both options loosen a rule, so neither is ever a default.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct EnrolArgs {
    /// RSA-OAEP hash of a PKCS#11 key: sha256, or sha1 for a token that refuses SHA-256
    /// (SoftHSM 2.6 does). Recorded with the key for its life. PEM keys always use sha256.
    #[arg(long, value_enum, default_value_t = Oaep::Sha256)]
    oaep: Oaep,
    /// Enrol a PKCS#11 private key even if it can leave the token (CKA_SENSITIVE false,
    /// CKA_EXTRACTABLE true) or be used without a PIN (CKA_PRIVATE false), with a warning.
    #[arg(long)]
    allow_extractable_key: bool,
}

/// `--oaep` values.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Oaep {
    Sha256,
    Sha1,
}

impl EnrolArgs {
    /// The library's policy for a PKCS#11 key.
    fn policy(&self) -> EnrolPolicy {
        EnrolPolicy {
            oaep: match self.oaep {
                Oaep::Sha256 => OaepHash::Sha256,
                Oaep::Sha1 => OaepHash::Sha1,
            },
            allow_extractable: self.allow_extractable_key,
        }
    }

    /// `Usage` error if an option meant for PKCS#11 keys was given with the PEM key `spec`:
    /// it would change nothing, so it is a mistake.
    fn pkcs11_only(&self, spec: &str) -> Result<(), Error> {
        let given = [
            (self.oaep == Oaep::Sha1, "--oaep sha1"),
            (self.allow_extractable_key, "--allow-extractable-key"),
        ];
        match given.iter().find(|(on, _)| *on) {
            Some((_, flag)) => Err(Error::usage(format!(
                "{flag} applies to PKCS#11 keys only; {spec} is a PEM key, always used with \
                 RSA-OAEP SHA-256"
            ))),
            None => Ok(()),
        }
    }
}

/// Read a `rsa:PUBLIC.pem` or `pkcs11:URI` key specification as key `version` of its kind;
/// `enrol` applies to a customer key, not to the recovery key. A PKCS#11 key enrolled only
/// because `--allow-extractable-key` allowed it is announced on stderr.
pub fn read_key_spec(
    ctx: &Context,
    spec: &str,
    recovery: bool,
    version: u32,
    enrol: &EnrolArgs,
) -> anyhow::Result<CmkKey> {
    if let Some(path) = spec.strip_prefix("rsa:") {
        let kind = if recovery {
            KekKind::Recovery
        } else {
            enrol.pkcs11_only(spec)?;
            KekKind::CustomerRsa
        };
        return Ok(rsa::read_public_key(
            kind,
            version,
            OaepHash::Sha256,
            Path::new(path),
        )?);
    }
    if spec.starts_with("pkcs11:") && !recovery {
        let kek = Pkcs11Kek::enroll(spec, version, enrol.policy(), ctx.key_access().pkcs11)?;
        for w in kek.warnings() {
            eprintln!("warning: {w}");
        }
        return Ok(CmkKey::decode(&kek.key().encode(), "enrolled key")?);
    }
    let want = if recovery {
        "rsa:PUBLIC.pem"
    } else {
        "rsa:PUBLIC.pem or pkcs11:URI"
    };
    Err(Error::usage(format!("key {spec:?} must be {want}")).into())
}

/// Create the vault and its keys.
pub fn run(ctx: &Context, a: Args) -> anyhow::Result<ExitCode> {
    let url = ctx.vault_url()?;
    if a.infrastructure_encryption && a.cmk.is_none() {
        return Err(Error::usage(
            "infrastructure encryption can be chosen only together with a customer-managed key (--cmk)",
        )
        .into());
    }
    let opts = InitOptions {
        cmk: a
            .cmk
            .as_deref()
            .map(|s| read_key_spec(ctx, s, false, 1, &a.enrol))
            .transpose()?,
        recovery: a
            .recovery_key
            .as_deref()
            .map(|s| read_key_spec(ctx, s, true, 1, &a.enrol))
            .transpose()?,
        infra_recovery: a
            .infra_recovery_key
            .as_deref()
            .map(|s| read_key_spec(ctx, s, true, 1, &a.enrol))
            .transpose()?,
        infrastructure: a.infrastructure_encryption,
        access: ctx.key_access(),
        forget_vault: a.forget_vault,
    };
    let made = init::init(url, &ctx.keystore()?, &opts)?;
    let vault = &made.vault;
    let ks = vault.keystore_file().display().to_string();
    let id = hex::encode(vault.config().vault_id);
    let kek = vault.keyring().primary_kind().to_string();
    let fingerprint = opts.cmk.as_ref().map(|k| hex::encode(k.fingerprint()));
    let doc = json!({
        "command": "init", "vault": url, "vault_id": id, "keystore": ks, "kek": kek,
        "cmk_fingerprint_sha256": fingerprint,
        "recovery_key": opts.recovery.is_some(),
        "recovery_fingerprint": made.recovery_fingerprint,
        "infrastructure_encryption": opts.infrastructure,
        "forgot_vault": made.forgot.map(hex::encode),
    });
    ctx.out.result(doc, || {
        let mut t = format!("created vault {id} at {url}\nkeystore file {ks}\n  (keep a copy: without it the vault cannot be read; `blockvault key export`)\n");
        t += &format!("DEKs wrapped by the {kek} key");
        if let Some(f) = &fingerprint {
            t += &format!(" sha256:{f}");
        }
        if opts.recovery.is_some() {
            t += ", and by the recovery key";
        }
        t += "\n";
        if opts.infrastructure {
            t += "infrastructure encryption (AES-256-XTS) on\n";
            match (&opts.infra_recovery, &opts.recovery) {
                (Some(_), _) => t += "  its key is recoverable only with the infrastructure recovery key\n",
                (None, Some(_)) => t += "  warning: the recovery key alone now recovers both layers (the DEKs and the infrastructure key); give --infra-recovery-key to keep them apart\n",
                (None, None) => {}
            }
        }
        if let Some(fp) = &made.recovery_fingerprint {
            t += &format!("auth fingerprint {fp}\n  (keep it with the recovery key: `key recover --take-over` asks for it)\n");
        }
        t
    });
    Ok(ExitCode::SUCCESS)
}
