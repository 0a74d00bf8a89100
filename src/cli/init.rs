//! `blockvault init`

use std::process::ExitCode;

use serde_json::json;

use super::Context;

/// Arguments of `init`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Create the vault and its platform key.
pub fn run(ctx: &Context, _args: Args) -> anyhow::Result<ExitCode> {
    let url = ctx.vault_url()?;
    let vault = blockvault::vault::Vault::init(url, &ctx.keystore()?)?;
    let ks = vault.keystore_file().display().to_string();
    let id = hex::encode(vault.config().vault_id);
    ctx.out.result(json!({ "command": "init", "vault": url, "vault_id": id, "keystore": ks, "kek": "platform" }), || {
        format!("created vault {id} at {url}\nplatform key stored in {ks}\n  (keep a copy: without it the vault cannot be read)\n")
    });
    Ok(ExitCode::SUCCESS)
}
