//! Stopping cleanly on SIGINT and SIGTERM.
//!
//! The binary calls [`install`] once; the first SIGINT or SIGTERM then only sets a flag, and
//! long-running work (the backup reader and workers, restore) calls [`check`] between units
//! of work, unwinds with an [`ErrorKind::Interrupted`] error and cleans up what it would on
//! any other failure (a backup removes the packs it wrote, a restore the file it created). A
//! second signal while the first is being handled ends the process at once, as a terminal
//! user pressing Ctrl-C twice expects; what it leaves is what a SIGKILL leaves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, ErrorKind, Result};

/// The signal received (0: none yet), shared with the handlers.
static RECEIVED: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

fn received() -> &'static Arc<AtomicUsize> {
    RECEIVED.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// Route SIGINT and SIGTERM to the flag [`check`] reads. A second signal of either kind
/// ends the process with the shell's code for it (128 + signal number).
pub fn install() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = received();
    for signal in [SIGINT, SIGTERM] {
        let terminate = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let registered = signal_hook::flag::register_conditional_shutdown(
            signal,
            128 + signal,
            terminate.clone(),
        )
        .and_then(|_| signal_hook::flag::register(signal, terminate))
        .and_then(|_| signal_hook::flag::register_usize(signal, flag.clone(), signal as usize));
        registered.map_err(|e| Error::io("installing the SIGINT/SIGTERM handlers", e))?;
    }
    Ok(())
}

/// The signal that asked the process to stop, if one did.
pub fn requested() -> Option<i32> {
    match received().load(Ordering::Relaxed) {
        0 => None,
        s => Some(s as i32),
    }
}

/// Fail with [`ErrorKind::Interrupted`] once a stop was requested.
pub fn check() -> Result<()> {
    match requested() {
        None => Ok(()),
        Some(signal) => Err(Error::new(
            ErrorKind::Interrupted,
            format!("interrupted by {}", signal_name(signal)),
        )),
    }
}

/// `SIGINT`, `SIGTERM`, or the number.
pub fn signal_name(signal: i32) -> String {
    match signal {
        signal_hook::consts::SIGINT => "SIGINT".into(),
        signal_hook::consts::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}
