//! The QEMU guest agent (qemu-ga inside the VM, reached through the host end of its
//! virtio-serial channel, a Unix socket): freezing the guest's filesystems around the point
//! in time, so a backup is application-consistent rather than crash-consistent.
//!
//! The agent has no greeting and may hold replies meant for an earlier client (the channel
//! outlives connections), so a session starts with `guest-sync-delimited` and a random id:
//! the agent answers with a 0xFF byte and `{"return": ID}`, and everything before that reply
//! is discarded. Then `guest-fsfreeze-freeze` (every filesystem the guest can freeze; it
//! returns how many it froze) and, always, `guest-fsfreeze-thaw` right after the QMP
//! transaction. A guest stays frozen until thawed: the freeze is held for the transaction
//! only (milliseconds), and a caller thaws on every path out, errors included.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::wire::Message;
use super::{qemu_error, Channel, QemuError};
use crate::crypto::secret::random_bytes;
use crate::error::{Error, Result};

/// A session with a guest agent.
pub struct Agent {
    channel: Channel,
}

impl Agent {
    /// Connect to the agent's socket at `path` and synchronise (module doc).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Agent> {
        let what = format!("the guest agent's socket {}", path.display());
        let channel = Channel::connect(path, what, timeout)?;
        let mut agent = Agent { channel };
        let bytes: [u8; 4] = random_bytes()?;
        // The agent takes ids as JSON integers; keep it positive and within 31 bits.
        let id = u32::from_le_bytes(bytes) >> 1;
        // A 0xFF first resets the agent's parser, should an earlier client have left half a
        // command in the channel.
        agent.channel.send_raw(&[0xff], "guest-sync-delimited")?;
        let deadline = Instant::now() + timeout;
        agent.channel.send(
            &json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
            "guest-sync-delimited",
        )?;
        loop {
            match agent.channel.receive(
                deadline,
                "the reply to guest-sync-delimited (is qemu-ga running in the guest?)",
            )? {
                Message::Return { value, .. } if value == id => return Ok(agent),
                // Replies to an earlier client's commands, or its stale sync: skip.
                _ => continue,
            }
        }
    }

    /// Run `command`; QEMU's refusal is the inner error.
    fn call(
        &mut self,
        command: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, QemuError>> {
        let mut msg = json!({ "execute": command });
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = args;
        }
        self.channel.send(&msg, command)?;
        let deadline = Instant::now() + self.channel.timeout;
        match self
            .channel
            .receive(deadline, &format!("the reply to {command}"))?
        {
            Message::Return { value, .. } => Ok(Ok(value)),
            Message::Error { class, desc, .. } => Ok(Err(QemuError {
                command: command.to_owned(),
                class,
                desc,
            })),
            other => Err(Error::integrity(format!(
                "{}: unexpected answer to {command}: {other:?}",
                self.channel.what
            ))),
        }
    }

    fn count(&mut self, command: &str) -> Result<u64> {
        let v = self
            .call(command, json!({}))?
            .map_err(|e| qemu_error(&self.channel.what, e))?;
        v.as_u64().ok_or_else(|| {
            Error::integrity(format!(
                "{}: {command} returned {v}, not a count of filesystems",
                self.channel.what
            ))
        })
    }

    /// `guest-fsfreeze-freeze`: the number of filesystems frozen.
    pub fn freeze(&mut self) -> Result<u64> {
        self.count("guest-fsfreeze-freeze")
    }

    /// `guest-fsfreeze-thaw`: the number of filesystems thawed.
    pub fn thaw(&mut self) -> Result<u64> {
        self.count("guest-fsfreeze-thaw")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// The agent's side of the protocol, as qemu-ga speaks it: no greeting; a stale reply
    /// from an earlier client still in the channel; 0xFF before the reply to
    /// guest-sync-delimited; then the scripted answers, one per command.
    fn agent(answers: Vec<&'static str>) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"return\": 77}\n").unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).unwrap();
            // The 0xFF that resets the parser, then the sync command.
            assert_eq!(line[0], 0xff);
            let sync: Value = serde_json::from_slice(&line[1..]).unwrap();
            assert_eq!(sync["execute"], "guest-sync-delimited");
            let id = sync["arguments"]["id"].clone();
            let mut reply = vec![0xffu8];
            reply.extend(format!("{{\"return\": {id}}}\n").bytes());
            s.write_all(&reply).unwrap();
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    return;
                }
                s.write_all(a.as_bytes()).unwrap();
            }
        });
        (dir, path)
    }

    #[test]
    fn a_session_syncs_past_stale_replies_then_freezes_and_thaws() {
        let (_d, path) = agent(vec![
            "{\"return\": 2}\n",
            "{\"return\": 2}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Command guest-fsfreeze-freeze has been disabled\"}}\n",
        ]);
        let mut a = Agent::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(a.freeze().unwrap(), 2);
        assert_eq!(a.thaw().unwrap(), 2);
        let e = a.freeze().unwrap_err();
        assert!(
            e.to_string().ends_with(
                "qga.sock: guest-fsfreeze-freeze failed: Command guest-fsfreeze-freeze has \
                 been disabled (GenericError)"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let e = Agent::connect(&path, Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .contains("guest-sync-delimited (is qemu-ga running"),
            "{e}"
        );
        drop(held.join());
    }
}
