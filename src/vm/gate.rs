//! The group's commit gate ([`crate::engine::gate`]): the members of a group take turns to
//! read (one at a time, so memory and the host's I/O are those of one backup), each waits at
//! its commit point with its packs stored, and they commit together once the last one
//! arrives. A member that fails, or SIGINT/SIGTERM while members wait, releases everyone with
//! an error, and every member unwinds as a failed backup does.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::engine::gate::CommitGate;
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Default)]
struct State {
    /// Members at the gate.
    arrived: usize,
    /// Whether a member is reading now.
    reading: bool,
    /// Why the group will not commit.
    failed: Option<String>,
}

/// The gate of one group of `members` backups.
#[derive(Debug)]
pub struct GroupGate {
    members: usize,
    state: Mutex<State>,
    changed: Condvar,
}

impl GroupGate {
    /// A gate for `members` backups.
    pub fn new(members: usize) -> GroupGate {
        GroupGate {
            members,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for this member's turn to read; an error if the group already failed.
    pub fn take_turn(&self) -> Result<()> {
        let mut s = self.lock();
        loop {
            if let Some(why) = &s.failed {
                return Err(abandoned(why));
            }
            if !s.reading {
                s.reading = true;
                return Ok(());
            }
            s = self.wait(s);
        }
    }

    /// A member failed (`why` names it): nobody commits.
    pub fn fail(&self, why: String) {
        let mut s = self.lock();
        s.reading = false;
        s.failed.get_or_insert(why);
        self.changed.notify_all();
    }

    /// Wait a little for a change; a SIGINT/SIGTERM meanwhile fails the group.
    fn wait<'a>(&self, s: std::sync::MutexGuard<'a, State>) -> std::sync::MutexGuard<'a, State> {
        let (mut s, _) = self
            .changed
            .wait_timeout(s, Duration::from_millis(100))
            .unwrap_or_else(|e| e.into_inner());
        if let Err(e) = crate::interrupt::check() {
            s.failed.get_or_insert(e.to_string());
            self.changed.notify_all();
        }
        s
    }
}

impl CommitGate for GroupGate {
    fn ready(&self) -> Result<()> {
        let mut s = self.lock();
        s.reading = false;
        s.arrived += 1;
        self.changed.notify_all();
        loop {
            if let Some(why) = &s.failed {
                return Err(abandoned(why));
            }
            if s.arrived == self.members {
                return Ok(());
            }
            s = self.wait(s);
        }
    }
}

fn abandoned(why: &str) -> Error {
    let kind = match crate::interrupt::requested() {
        Some(_) => ErrorKind::Interrupted,
        None => ErrorKind::Io,
    };
    Error::new(
        kind,
        format!("not committed: the group is abandoned ({why})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn members_take_turns_and_commit_together_or_not_at_all() {
        let gate = Arc::new(GroupGate::new(3));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let g = gate.clone();
                std::thread::spawn(move || {
                    g.take_turn().unwrap();
                    g.ready()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        let gate = Arc::new(GroupGate::new(2));
        let g = gate.clone();
        let waiting = std::thread::spawn(move || {
            g.take_turn().unwrap();
            g.ready()
        });
        // The second member fails while reading.
        while gate.lock().arrived == 0 {
            std::thread::yield_now();
        }
        gate.take_turn().unwrap();
        gate.fail("disk b: no space".into());
        let e = waiting.join().unwrap().unwrap_err();
        assert_eq!(
            e.to_string(),
            "not committed: the group is abandoned (disk b: no space)"
        );
        assert!(gate.take_turn().is_err());
    }
}
