//! The QEMU tools the image and NBD tests run (Debian package `qemu-utils`): `qemu-io` to
//! write into images and exports, and a real `qemu-nbd` server to read exports from, stopped
//! when the test ends however it ends.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::tools::run_tool;
use super::unique;

/// qemu-img and qemu-io, for [`super::tools`].
pub const QEMU: &[(&str, &str)] = &[("qemu-img", "qemu-utils"), ("qemu-io", "qemu-utils")];

/// qemu-img, qemu-io and qemu-nbd, for [`super::tools`].
pub const QEMU_NBD: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
];

/// Run a QEMU tool (`qemu-img`, `qemu-io`) with `args` in folder `dir`; returns its stdout
/// and stderr. Panics with that output if it fails, also when it only says so in its output:
/// qemu-io reports a failed command there, not always in its exit code.
pub fn run_in(dir: &Path, tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed"),
        "{tool} {args:?}: {}\n{text}",
        out.status
    );
    text
}

/// The content `qemu-img convert -O raw` reads from image `img` of format `fmt` (written to a
/// scratch file in `dir`).
pub fn converted(dir: &Path, img: &Path, fmt: &str) -> Vec<u8> {
    let out = dir.join(format!("expect-{}.raw", unique()));
    let (img, out_s) = (
        img.to_str().expect("UTF-8 path"),
        out.to_str().expect("UTF-8 path"),
    );
    run_tool(
        Command::new("qemu-img").args(["convert", "-f", fmt, "-O", "raw", img, out_s]),
        "",
    );
    std::fs::read(&out).expect("read converted image")
}

/// The virtual size of an image (`qemu-img info`).
pub fn virtual_size(img: &Path, fmt: &str) -> u64 {
    let out = run_tool(
        Command::new("qemu-img")
            .args(["info", "-f", fmt, "--output=json"])
            .arg(img),
        "",
    );
    let doc: serde_json::Value = serde_json::from_slice(&out).expect("qemu-img info JSON");
    super::num(&doc, "virtual-size")
}

/// Restore `spec` to a raw file and compare it with `image` (format `fmt`) as QEMU reads it:
/// same size, and `qemu-img compare` finds them identical.
pub fn assert_restores(bv: &super::Bv, spec: &str, image: &Path, fmt: &str) {
    let target = bv.path(&format!("restored-{}.raw", unique()));
    bv.restore(spec, &target, &[]).ok();
    let size = std::fs::metadata(&target).expect("restored file").len();
    assert_eq!(
        size,
        virtual_size(image, fmt),
        "{spec}: restored size vs {}",
        image.display()
    );
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", fmt])
        .arg(&target)
        .arg(image)
        .output()
        .expect("qemu-img compare");
    assert!(
        out.status.success(),
        "{spec} restored differs from {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&target).expect("remove restored file");
}

/// An interactive `qemu-io` holding an image open (and QEMU's locks on it), to be killed.
pub struct QemuIoSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
}

impl QemuIoSession {
    /// `qemu-io ARGS` (e.g. `-f qcow2 [-r] NAME`) run in `dir`, given `cmd` on its stdin;
    /// returns once it answered with a line containing `answer` (it then has the image open),
    /// panicking if it says "failed" or ends first.
    pub fn start(dir: &Path, args: &[&str], cmd: &str, answer: &str) -> QemuIoSession {
        use std::io::{BufRead, Write};
        let mut child = Command::new("qemu-io")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{cmd}").expect("command qemu-io");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let got = stdout
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains(answer) || line.contains("failed"));
        assert!(
            got.as_ref().is_some_and(|a| a.contains(answer)),
            "qemu-io answered {got:?} to {cmd}"
        );
        QemuIoSession { child, stdin }
    }

    /// SIGKILL it (it never closes the image) and reap it.
    pub fn kill(self) {
        let QemuIoSession { mut child, stdin } = self;
        child.kill().expect("SIGKILL qemu-io");
        child.wait().expect("reap qemu-io");
        drop(stdin);
    }
}

/// Run qemu-io commands (`write -P 0xab 0 4k`, `write -z 1M 64k`, ...) on `target`: an image
/// file (`fmt` its format) or an NBD URL (`fmt` "raw"). Panics if qemu-io fails, also when it
/// only says so in its output: a failed command does not always change its exit code.
pub fn qemu_io<S: AsRef<str>>(fmt: &str, target: &str, cmds: &[S]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    c.arg(target);
    let out = String::from_utf8_lossy(&run_tool(&mut c, "")).into_owned();
    assert!(!out.contains("failed"), "qemu-io on {target}:\n{out}");
}

/// Assert that no QEMU process can open `image` (of format `fmt`) for writing now: qemu-io's
/// write fails on QEMU's image locks (while blockvault holds the image open for reading).
pub fn assert_write_locked(fmt: &str, image: &Path) {
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", "write 0 512"])
        .arg(image)
        .output()
        .expect("qemu-io");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("lock"),
        "qemu-io wrote {}, which a reader holds: {}\n{said}",
        image.display(),
        out.status
    );
}

/// Where a qemu-nbd server listens.
pub enum Listen<'a> {
    /// 127.0.0.1, a free port.
    Tcp,
    /// A Unix socket at this path.
    Unix(&'a Path),
}

/// What a qemu-nbd server is to serve: [`QemuNbd::serve`], then the options, then
/// [`Serve::start`].
pub struct Serve<'a> {
    image: &'a Path,
    format: &'a str,
    export: &'a str,
    bitmaps: Vec<&'a str>,
    writable: bool,
}

impl<'a> Serve<'a> {
    /// Export under `name` (`-x`; the default is qemu-nbd's own, the empty name).
    pub fn export(mut self, name: &'a str) -> Self {
        self.export = name;
        self
    }

    /// Export dirty bitmap `name` of the image (`-B`; given again, several bitmaps).
    pub fn bitmap(mut self, name: &'a str) -> Self {
        self.bitmaps.push(name);
        self
    }

    /// Let clients write (read-only, `-r`, otherwise).
    pub fn writable(mut self) -> Self {
        self.writable = true;
        self
    }

    /// Start the server (`--fork`, persistent), its pid file in `dir`. A TCP port is free
    /// when chosen but another process may take it first, so a failed start on TCP is retried
    /// (5 times) on a new port; any other failure panics with qemu-nbd's message.
    pub fn start(self, dir: &Path, at: Listen) -> QemuNbd {
        let arg = |p: &Path| p.to_str().expect("utf-8 path").to_string();
        for attempt in 0.. {
            let pid_file = dir.join(format!("qemu-nbd-{}.pid", unique()));
            let mut args: Vec<String> = vec![
                "-t".into(),
                "--fork".into(),
                "--pid-file".into(),
                arg(&pid_file),
                "-x".into(),
                self.export.into(),
                "-f".into(),
                self.format.into(),
            ];
            if !self.writable {
                args.push("-r".into());
            }
            for b in &self.bitmaps {
                args.extend(["-B".into(), (*b).into()]);
            }
            let url = match at {
                Listen::Tcp => {
                    let port = std::net::TcpListener::bind("127.0.0.1:0")
                        .and_then(|l| l.local_addr())
                        .expect("free port")
                        .port();
                    args.extend([
                        "-b".into(),
                        "127.0.0.1".into(),
                        "-p".into(),
                        port.to_string(),
                    ]);
                    format!("nbd://127.0.0.1:{port}/{}", self.export)
                }
                Listen::Unix(sock) => {
                    args.extend(["-k".into(), arg(sock)]);
                    format!("nbd+unix:///{}?socket={}", self.export, arg(sock))
                }
            };
            args.push(arg(self.image));
            let out = Command::new("qemu-nbd")
                .args(&args)
                .output()
                .expect("running qemu-nbd");
            if out.status.success() {
                let pid = std::fs::read_to_string(&pid_file).expect("qemu-nbd pid file");
                return QemuNbd {
                    pid: pid.trim().to_owned(),
                    url,
                };
            }
            assert!(
                attempt < 5 && matches!(at, Listen::Tcp),
                "qemu-nbd {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        unreachable!()
    }
}

/// A running qemu-nbd server, killed (SIGKILL) when dropped, also while a failed test
/// unwinds.
pub struct QemuNbd {
    /// Empty once the server was stopped: a pid is never signalled again, it may be reused.
    pid: String,
    /// `nbd://127.0.0.1:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`.
    pub url: String,
}

impl QemuNbd {
    /// Serve `image` of `format` (qemu-img's name: qcow2, raw, vmdk, ...): read-only, the
    /// default export name, no bitmap, unless the [`Serve`] options say otherwise.
    pub fn serve<'a>(image: &'a Path, format: &'a str) -> Serve<'a> {
        Serve {
            image,
            format,
            export: "",
            bitmaps: Vec::new(),
            writable: false,
        }
    }

    /// Send `signal` (`-STOP`, `-CONT`) without waiting; nothing once the server was stopped.
    pub fn signal(&self, signal: &str) {
        if self.pid.is_empty() {
            return;
        }
        let _ = Command::new("kill")
            .args([signal, &self.pid])
            .stderr(Stdio::null())
            .status();
    }

    /// Send `signal` (`-TERM` for a clean exit, `-KILL` for a crash) and wait until the
    /// server is gone; panics if it still runs after 10 s.
    pub fn stop(&mut self, signal: &str) {
        assert!(
            self.signal_and_wait(signal),
            "qemu-nbd did not exit after kill {signal}"
        );
    }

    /// Signal the server once and wait until it is gone, or a zombie whose threads are all
    /// gone: it was forked away from us, so it may stay a zombie. The leader thread turns
    /// zombie while qemu-nbd's other threads still run and hold the image (and QEMU's locks
    /// on it) open; the leader's `/proc/PID/fd` is empty by then, so it cannot say whether
    /// the image is closed. The files close when the last thread exits, and exited threads
    /// other than the leader leave `/proc/PID/task`, so a zombie leader alone there is what
    /// says the image is closed. False if it still runs after 10 s.
    fn signal_and_wait(&mut self, signal: &str) -> bool {
        if self.pid.is_empty() {
            return true;
        }
        self.signal(signal);
        let pid = std::mem::take(&mut self.pid);
        let stat = format!("/proc/{pid}/stat");
        let only_the_leader_left = || {
            std::fs::read_dir(format!("/proc/{pid}/task")).map_or(true, |tasks| tasks.count() <= 1)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match std::fs::read_to_string(&stat) {
                Err(_) => return true,
                // The state letter follows the parenthesised command name.
                Ok(st)
                    if st
                        .rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                        && only_the_leader_left() =>
                {
                    return true
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        false
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // No panic here: a drop may run while a failed test unwinds.
        if !self.signal_and_wait("-KILL") {
            eprintln!("warning: a qemu-nbd server survived SIGKILL");
        }
    }
}
