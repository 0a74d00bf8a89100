//! Whether this host can reach the private half of the vault's customer-managed key, checked
//! once before a command unwraps any DEK, so that a missing key is one sentence naming the key
//! and the options that provide it, not a failure per disk.
//!
//! A PEM key that was not given at all is known without any I/O. A PKCS#11 key is reached
//! through a module and a PIN, both of which can come from several places (options, the key's
//! URI, the environment): there a probe unwrap through the token says whether it works. The
//! platform key needs nothing from this host beyond the keystore, which opening the vault
//! already read.

use blockvault::crypto::kek::{KekId, KekKind, KekProvider};
use blockvault::vault::Vault;
use blockvault::{Error, ErrorKind};

use super::KeyArgs;

/// Fail, in one sentence, when the vault's KEK is a customer key this host cannot use.
pub fn require(vault: &Vault, keys: &KeyArgs) -> Result<(), Error> {
    match vault.keyring().primary_kind() {
        KekKind::CustomerRsa if keys.cmk_private().is_none() => Err(Error::new(
            ErrorKind::Key,
            format!(
                "vault {} is encrypted with the customer-managed key {}, and this host was not \
                 given its private key: pass --cmk-private PEM or set BLOCKVAULT_CMK_PRIVATE",
                vault.store().location(),
                describe(vault)?,
            ),
        )),
        KekKind::CustomerPkcs11 => vault.keyring().check_unwrap().map_err(|e| {
            e.within(format!(
                "vault {} is encrypted with the customer-managed key {}, which this host cannot \
                 reach: give its PKCS#11 module (--pkcs11-module SO or BLOCKVAULT_PKCS11_MODULE) \
                 and the token's PIN (--pin-file FILE or BLOCKVAULT_PKCS11_PIN)",
                vault.store().location(),
                describe(vault).unwrap_or_else(|_| "(unreadable descriptor)".into()),
            ))
        }),
        _ => Ok(()),
    }
}

/// The vault's current customer key as a person recognises it: id, size, fingerprint and
/// where it came from (the public key file or the PKCS#11 URI).
fn describe(vault: &Vault) -> Result<String, Error> {
    let id: KekId = vault.keyring().current()?;
    Ok(
        match vault.kek_descriptors()?.into_iter().find(|k| k.id() == id) {
            Some(k) => format!(
                "{id} (RSA-{}, sha256:{}, {})",
                k.bits(),
                hex::encode(&k.fingerprint()[..8]),
                k.source()
            ),
            None => id.to_string(),
        },
    )
}
