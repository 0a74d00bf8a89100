//! Talking to a running QEMU: its QMP monitor ([`Qmp`]) and the guest agent inside the VM
//! ([`agent::Agent`]).
//!
//! Both are JSON over a Unix socket, framed and classified by [`wire`]. A QMP session:
//!
//! ```text
//! connect ──▶ greeting {"QMP": {version, capabilities}} ──▶ qmp_capabilities ──▶ commands
//! command {"execute", "arguments", "id": N} ──▶ events (kept, at most MAX_EVENTS) … ──▶
//!         {"return": V, "id": N}  or  {"error": {class, desc}, "id": N}
//! ```
//!
//! Every wait has a deadline (the timeout given at connect): a QEMU that never greets (its
//! monitor serves one client at a time, and another one, libvirt or a second blockvault,
//! holds it), never answers, or died (the socket closes) ends the wait with an error naming
//! the socket and the command, never a hang. A command QEMU refuses is a [`QemuError`] with
//! QEMU's class and description, returned as a value by [`Qmp::call`] (for callers that
//! expect some refusals) or as an [`Error`] by [`Qmp::execute`].

pub mod agent;
pub mod wire;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};
pub use wire::Version;
use wire::{Framer, Message};

/// Events kept for [`Qmp::take_events`]; older ones are dropped.
const MAX_EVENTS: usize = 1024;

/// A command QEMU refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuError {
    /// The command.
    pub command: String,
    /// QEMU's error class (`GenericError`, `DeviceNotFound`, `CommandNotFound`, ...).
    pub class: String,
    /// QEMU's description.
    pub desc: String,
}

impl std::fmt::Display for QemuError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {} ({})", self.command, self.desc, self.class)
    }
}

impl std::error::Error for QemuError {}

/// An asynchronous event QEMU sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its name.
    pub name: String,
    /// Its data.
    pub data: Value,
}

/// A JSON-over-Unix-socket connection with deadlines: the part QMP and the guest agent share.
pub(crate) struct Channel {
    stream: UnixStream,
    framer: Framer,
    /// What the peer is, for messages: "QEMU's QMP socket /run/vm1.qmp".
    pub(crate) what: String,
    pub(crate) timeout: Duration,
}

impl Channel {
    /// Connect to the socket at `path`; `what` names it in errors.
    pub(crate) fn connect(path: &Path, what: String, timeout: Duration) -> Result<Channel> {
        let stream = UnixStream::connect(path).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound => " (is the VM running, and is this its socket?)",
                std::io::ErrorKind::ConnectionRefused => {
                    " (nothing listens on it: the VM is gone?)"
                }
                _ => "",
            };
            Error::io(format!("{what}: cannot connect{hint}"), e)
        })?;
        Ok(Channel {
            stream,
            framer: Framer::new(),
            what,
            timeout,
        })
    }

    /// Send one JSON message.
    pub(crate) fn send(&mut self, msg: &Value, command: &str) -> Result<()> {
        let mut bytes = serde_json::to_vec(msg).expect("JSON values serialise");
        bytes.push(b'\n');
        self.stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|_| self.stream.write_all(&bytes))
            .map_err(|e| Error::io(format!("{}: sending {command}", self.what), e))
    }

    /// Send raw bytes (the guest agent's 0xFF resynchronisation).
    pub(crate) fn send_raw(&mut self, bytes: &[u8], command: &str) -> Result<()> {
        self.stream
            .set_write_timeout(Some(self.timeout))
            .and_then(|_| self.stream.write_all(bytes))
            .map_err(|e| Error::io(format!("{}: sending {command}", self.what), e))
    }

    /// The next message, waiting at most until `deadline`; `waiting_for` says what for, in
    /// the error.
    pub(crate) fn receive(&mut self, deadline: Instant, waiting_for: &str) -> Result<Message> {
        let mut buf = [0u8; 64 << 10];
        loop {
            let framed = self.framer.next_message().map_err(|why| {
                Error::integrity(format!(
                    "{}: malformed message while waiting for {waiting_for}: {why}",
                    self.what
                ))
            })?;
            if let Some(bytes) = framed {
                return wire::parse(&bytes).map_err(|why| {
                    Error::integrity(format!(
                        "{}: malformed message while waiting for {waiting_for}: {why}",
                        self.what
                    ))
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timed_out(waiting_for));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|e| Error::io(format!("{}: setting a timeout", self.what), e))?;
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    return Err(Error::new(
                        ErrorKind::Io,
                        format!(
                        "{}: connection closed while waiting for {waiting_for} (did QEMU exit?)",
                        self.what
                    ),
                    ))
                }
                Ok(n) => self.framer.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timed_out(waiting_for))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!("{}: reading while waiting for {waiting_for}", self.what),
                        e,
                    ))
                }
            }
        }
    }

    fn timed_out(&self, waiting_for: &str) -> Error {
        Error::new(
            ErrorKind::Io,
            format!(
                "{}: no answer within {} s while waiting for {waiting_for}",
                self.what,
                self.timeout.as_secs_f64()
            ),
        )
    }
}

/// A QMP session with a running QEMU.
pub struct Qmp {
    channel: Channel,
    path: PathBuf,
    next_id: u64,
    events: VecDeque<Event>,
    version: Version,
}

impl Qmp {
    /// Connect to the QMP socket at `path`, read the greeting and leave capabilities
    /// negotiation mode. Every later wait is bounded by `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let what = format!("QEMU's QMP socket {}", path.display());
        let mut channel = Channel::connect(path, what, timeout)?;
        let deadline = Instant::now() + timeout;
        let version = loop {
            match channel.receive(
                deadline,
                "QEMU's greeting (another client, libvirt or another blockvault run, may hold \
                 this monitor: QEMU serves one client per QMP socket)",
            )? {
                Message::Greeting { version, .. } => break version,
                Message::Event { .. } => continue,
                other => {
                    return Err(Error::integrity(format!(
                        "{}: expected QEMU's greeting, got {other:?}",
                        channel.what
                    )))
                }
            }
        };
        let mut qmp = Qmp {
            channel,
            path: path.to_owned(),
            next_id: 1,
            events: VecDeque::new(),
            version,
        };
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// QEMU's version, from its greeting.
    pub fn version(&self) -> &Version {
        &self.version
    }

    /// Run `command` with `args` (an object, or `{}`); the outer error is the connection's
    /// (QEMU gone, no answer, a malformed message), the inner one QEMU's refusal.
    pub fn call(
        &mut self,
        command: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, QemuError>> {
        let id = format!("blockvault-{}", self.next_id);
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = args;
        }
        self.channel.send(&msg, command)?;
        let deadline = Instant::now() + self.channel.timeout;
        let want = Value::from(id);
        loop {
            match self
                .channel
                .receive(deadline, &format!("the reply to {command}"))?
            {
                Message::Event { name, data } => {
                    if self.events.len() == MAX_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(Event { name, data });
                }
                Message::Return {
                    id: Some(id),
                    value,
                } if id == want => return Ok(Ok(value)),
                Message::Error {
                    id: Some(id),
                    class,
                    desc,
                } if id == want => {
                    return Ok(Err(QemuError {
                        command: command.to_owned(),
                        class,
                        desc,
                    }))
                }
                // A reply to a command whose wait timed out earlier: not ours.
                Message::Return { .. } | Message::Error { .. } => {}
                Message::Greeting { .. } => {
                    return Err(Error::integrity(format!(
                        "{}: a second greeting while waiting for the reply to {command}",
                        self.channel.what
                    )))
                }
            }
        }
    }

    /// Run `command`; QEMU's refusal becomes an [`Error`] naming the socket, the command,
    /// QEMU's description and class (`CommandNotFound`: [`ErrorKind::Unsupported`],
    /// `DeviceNotFound`: [`ErrorKind::NotFound`], others [`ErrorKind::Io`]).
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value> {
        self.call(command, args)?
            .map_err(|e| qemu_error(&self.channel.what, e))
    }

    /// The events received so far, oldest first; they are forgotten here.
    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }
}

/// The library error for a command QEMU refused at `what`.
pub fn qemu_error(what: &str, e: QemuError) -> Error {
    let kind = match e.class.as_str() {
        "CommandNotFound" => ErrorKind::Unsupported,
        "DeviceNotFound" => ErrorKind::NotFound,
        _ => ErrorKind::Io,
    };
    Error::new(kind, format!("{what}: {e}")).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A QMP peer that answers from a script: for each command it reads, the next lines.
    fn serve(script: Vec<Vec<&'static str>>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n").unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            for answers in script {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
                for a in answers {
                    let a = a.replace("ID", &id.to_string());
                    s.write_all(a.as_bytes()).unwrap();
                }
            }
            // Then hold the connection open without answering.
            std::thread::sleep(Duration::from_secs(5));
        });
        (dir, path)
    }

    #[test]
    fn commands_match_their_replies_and_events_are_kept() {
        let (_d, path) = serve(vec![
            vec!["{\"return\": {}, \"id\": ID}\r\n"],
            vec![
                "{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\"}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n",
                "{\"return\": {\"x\": 1}, \"id\": \"stale\"}\r\n",
                "{\"return\": [1, 2], \"id\": ID}\r\n",
            ],
            vec!["{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"no node x\"}, \"id\": ID}\r\n"],
        ]);
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version().numbers, (7, 2, 0));
        assert_eq!(q.execute("query-jobs", json!({})).unwrap(), json!([1, 2]));
        let events = q.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "JOB_STATUS_CHANGE");
        let e = q.execute("query-x", json!({"node": "x"})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(
            e.to_string()
                .ends_with("qmp.sock: query-x failed: no node x (DeviceNotFound)"),
            "{e}"
        );
    }

    #[test]
    fn silence_and_a_closed_socket_end_the_wait() {
        let (_d, path) = serve(vec![vec!["{\"return\": {}, \"id\": ID}\r\n"]]);
        let mut q = Qmp::connect(&path, Duration::from_millis(300)).unwrap();
        let e = q.execute("query-status", json!({})).unwrap_err();
        assert!(
            e.to_string()
                .contains("no answer within 0.3 s while waiting for the reply to query-status"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || drop(listener.accept().unwrap()));
        let e = Qmp::connect(&path, Duration::from_secs(5)).err().unwrap();
        assert!(e.to_string().contains("connection closed"), "{e}");
        let e = Qmp::connect(&dir.path().join("none"), Duration::from_secs(1))
            .err()
            .unwrap();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert!(e.to_string().contains("is the VM running"), "{e}");
    }
}
