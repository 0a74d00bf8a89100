//! The one bridge from the engine's threads to the async object-store client.
//!
//! The engine is synchronous (an io_uring reader, rayon workers, a writer and an uploader
//! thread); `object_store` is async. Rather than spreading async through the engine, every
//! cloud request goes through [`block_on`] here, on one multi-threaded tokio runtime per
//! process, made on first use. `Runtime::block_on` may be called from many threads at once
//! (restore's rayon workers each wait on their own ranged GET while the runtime's two I/O
//! threads drive every connection), so the engine's parallelism carries over as requests in
//! flight. It must not be called from inside the runtime, and nothing here does: the callers
//! are the engine's own threads and the lease renewer (a plain thread).

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Builder, Runtime};

use crate::error::{Error, ErrorKind, Result};

/// I/O threads of the runtime: they only drive sockets and TLS, the work is elsewhere; two
/// keep a 32 MiB upload and ranged reads moving on a 2-core machine.
const IO_THREADS: usize = 2;

static RUNTIME: OnceLock<std::result::Result<Runtime, String>> = OnceLock::new();

/// Run `future` to completion on the process's runtime, blocking the calling thread.
pub(crate) fn block_on<F: Future>(future: F) -> Result<F::Output> {
    let runtime = RUNTIME.get_or_init(|| {
        Builder::new_multi_thread()
            .worker_threads(IO_THREADS)
            .thread_name("blockvault-io")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    });
    match runtime {
        Ok(rt) => Ok(rt.block_on(future)),
        Err(e) => Err(Error::new(
            ErrorKind::Io,
            format!("cannot start the object-store I/O threads: {e}"),
        )),
    }
}
