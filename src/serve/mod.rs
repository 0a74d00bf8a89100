//! `serve`: snapshots as NBD exports, read-only or copy-on-write, for `qemu-img`, `qemu-io`,
//! `nbdcopy`, the kernel's `nbd-client`, or a VM booting straight from the backup.
//!
//! ```text
//!  listener (TCP or Unix) ─ accept, poll the stop flag ─► a thread per connection (≤ MAX_CONNECTIONS)
//!     negotiate (fixed newstyle, options, GO)  ─► transmit: requests read in order, answered
//!                                                   by up to 8 workers (reply), any order
//!                                                   └► Export: overlay blocks, else the
//!                                                      SnapshotReader (one per export, its
//!                                                      cache shared by every connection)
//! ```
//! Every export is named `DISK@ID` (the snapshot's short id); an empty name asks for the
//! first. The wire format is shared with the NBD client (`source::nbd::proto`,
//! `source::nbd::handshake`); what the server parses is in [`wire`]. SIGINT and SIGTERM stop
//! accepting, end every connection at its next request (or within [`socket::POLL`] when it
//! is idle), and return.

pub mod export;
pub mod negotiate;
pub mod overlay;
pub mod parts;
pub mod reply;
pub mod socket;
pub mod transmit;
pub mod wire;

use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};
use crate::source::nbd::stream::Stream;
pub use export::Export;
use socket::Stop;

/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 64;

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// `HOST:PORT`.
    Tcp(String),
    /// A Unix socket path (created; removed again when the server stops).
    Unix(PathBuf),
}

/// A bound listener.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket, and its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind `at` (non-blocking, so the accept loop can watch the stop flag).
    pub fn bind(at: &Listen) -> Result<Listener> {
        let l = match at {
            Listen::Tcp(addr) => TcpListener::bind(addr.as_str())
                .and_then(|l| l.set_nonblocking(true).map(|()| Listener::Tcp(l)))
                .map_err(|e| Error::io(format!("listening on {addr}"), e))?,
            Listen::Unix(path) => {
                if path.exists() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "socket {} already exists; remove it or name another",
                            path.display()
                        ),
                    ));
                }
                UnixListener::bind(path)
                    .and_then(|l| {
                        l.set_nonblocking(true)
                            .map(|()| Listener::Unix(l, path.clone()))
                    })
                    .map_err(|e| Error::io(format!("listening on {}", path.display()), e))?
            }
        };
        Ok(l)
    }

    /// Where clients connect: `nbd://HOST:PORT` or `nbd+unix:///?socket=PATH` (add the
    /// export name after the `/`).
    pub fn url(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("nbd://{a}"),
                Err(_) => "nbd://?".into(),
            },
            Listener::Unix(_, p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }

    /// The URL of export `name`.
    pub fn export_url(&self, name: &str) -> String {
        match self {
            Listener::Tcp(_) => format!("{}/{name}", self.url()),
            Listener::Unix(_, p) => format!("nbd+unix:///{name}?socket={}", p.display()),
        }
    }

    fn accept(&self) -> std::io::Result<Stream> {
        let s = match self {
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            })?,
            Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Stream::Unix(s))
            })?,
        };
        s.set_timeouts(Some(socket::POLL), None)?;
        Ok(s)
    }

    fn socket_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix(_, p) => Some(p),
            Listener::Tcp(_) => None,
        }
    }
}

/// What a server did until it stopped.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeReport {
    /// Connections accepted.
    pub connections: u64,
    /// Connections closed at once because [`MAX_CONNECTIONS`] were open.
    pub refused: u64,
    /// The signal that stopped it.
    pub signal: String,
}

/// Serve `exports` on `listener` until SIGINT or SIGTERM.
pub fn serve(exports: &[Export], listener: &Listener) -> Result<ServeReport> {
    let open = AtomicUsize::new(0);
    let (accepted, refused) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = std::thread::scope(|scope| -> Result<()> {
        loop {
            if crate::interrupt::requested().is_some() {
                return Ok(());
            }
            let mut s = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "serve: accept failed");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                refused.fetch_add(1, Ordering::Relaxed);
                s.shutdown();
                continue;
            }
            let n = accepted.fetch_add(1, Ordering::Relaxed);
            let open = &open;
            let spawned = std::thread::Builder::new()
                .name(format!("bv-serve-{n}"))
                .spawn_scoped(scope, move || {
                    connection(&mut s, exports, n);
                    s.shutdown();
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            if let Err(e) = spawned {
                open.fetch_sub(1, Ordering::SeqCst);
                tracing::warn!(error = %e, "serve: no thread for a connection");
            }
        }
    });
    if let Some(p) = listener.socket_path() {
        let _ = std::fs::remove_file(p);
    }
    result?;
    Ok(ServeReport {
        connections: accepted.into_inner(),
        refused: refused.into_inner(),
        signal: crate::interrupt::requested()
            .map(crate::interrupt::signal_name)
            .unwrap_or_default(),
    })
}

/// One client, handshake to disconnect; what ends it is logged, never fatal to the server.
fn connection(s: &mut Stream, exports: &[Export], n: u64) {
    let span = tracing::debug_span!("connection", n);
    let _g = span.enter();
    let ended = negotiate::negotiate(s, exports).and_then(|session| match session {
        None => Ok(()),
        Some(session) => {
            let export = &exports[session.export];
            tracing::debug!(export = %export.name, structured = session.structured, allocation = session.allocation, "serve: transmission");
            transmit::transmit(s, export, &session)
        }
    });
    match ended {
        Ok(()) | Err(Stop::Closed) | Err(Stop::Signal) => {
            tracing::debug!("serve: connection closed")
        }
        Err(Stop::Failed(e)) => tracing::debug!(error = %e, "serve: connection ended"),
    }
}
