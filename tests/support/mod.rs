//! Test support: a real `courier serve` process on 127.0.0.1 with an ephemeral port and a
//! temporary data directory, and clients for it.
#![allow(dead_code)]

use courier_client::proto::{Encoding, Event, ServerFrame};
use courier_client::{Client, ClientError, HttpApi, Target};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Longest wait for a server to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for an event a test expects.
pub const WAIT: Duration = Duration::from_secs(30);

/// A server with `args` in a fresh temporary data directory (removed when dropped).
pub fn start(args: &[&str]) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), args);
    (dir, server)
}

/// A connection of `user`'s `device` that has had its catch-up.
pub async fn connected(server: &Server, user: &str, device: &str) -> Client {
    let mut client = server.connect(user, device).await;
    client.events_until_sync_done().await.unwrap();
    client
}

/// The next event of `client`, within [`WAIT`].
pub async fn next_event(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("an event in time")
        .unwrap()
}

/// A history longer than the socket buffers hold: 400 messages of 48 KiB from `from` to
/// `to`, so that a catch-up of it is still being written long after it begins. The server is
/// to take them at any rate (`--user-sends-per-sec 0`): at the default rate a fast machine
/// refuses some as `rate_limited`.
pub async fn send_long_history(from: &mut Client, to: Target) {
    let body = "x".repeat(48 * 1024);
    for i in 0..400 {
        from.send_text(to.clone(), &format!("m{i}"), &body)
            .await
            .unwrap();
    }
}

/// Reads `client` until its connection ends: the events it got first, and how it ended.
pub async fn events_until_closed(client: &mut Client) -> (usize, ClientError) {
    let mut events = 0;
    loop {
        match client.next_frame_within(WAIT).await {
            Ok(ServerFrame::Event(_)) => events += 1,
            Ok(_) => {}
            Err(e) => return (events, e),
        }
    }
}

/// User ids from names.
pub fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The address of `/metrics` when the server was given `--metrics-listen` (from its
    /// `courier metrics on ADDR` line); without it `/metrics` is on [`Server::addr`].
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// The subcommand and its first arguments (`serve`, or `node --roles ...`).
    command: Vec<String>,
    extra_args: Vec<String>,
}

impl Server {
    /// Starts a server in `data_dir` with extra flags.
    pub fn start_in(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_as(&["serve"], data_dir, extra_args)
    }

    /// Starts `courier <command...>` (a subcommand that serves clients, e.g. `node --roles
    /// gateway,...`) in `data_dir` with extra flags.
    pub fn start_as(command: &[&str], data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_listening(command, data_dir, "127.0.0.1:0", extra_args)
    }

    /// [`Server::start_as`], with the client port on `listen`.
    fn start_listening(
        command: &[&str],
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> Server {
        // COURIER_TEST_BIN runs the suite against another build (a release, an older commit).
        let binary = std::env::var_os("COURIER_TEST_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_courier")),
            PathBuf::from,
        );
        // The free-space watermarks are off unless a test sets them: a test machine's disk may
        // be nearly full, and tests/full_disk.rs checks them on a disk of its own.
        let watermarks: &[&str] = if extra_args.iter().any(|a| a.ends_with("min-free-disk")) {
            &[]
        } else {
            &["--min-free-disk", "0", "--media-min-free-disk", "0"]
        };
        let mut child = Command::new(binary)
            .args(command)
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(watermarks)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn courier");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            // Logged before the ready line, when the server has a metrics port of its own.
            let mut metrics = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = metrics_address(&line) {
                    metrics = Some(addr.to_owned());
                }
                if let Some(addr) = ready_address(&line) {
                    let _ = tx.send((addr.to_owned(), metrics.clone()));
                }
                if std::env::var_os("COURIER_TEST_LOG").is_some() {
                    eprintln!("[server] {line}");
                }
            }
        });
        let (addr, metrics_addr) = rx
            .recv_timeout(START_TIMEOUT)
            .expect("server did not report ready");
        Server {
            child,
            addr: addr.parse().expect("ready line has an address"),
            metrics_addr: metrics_addr.map(|a| a.parse().expect("metrics line has an address")),
            data_dir: data_dir.to_owned(),
            command: command.iter().map(|s| s.to_string()).collect(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token(&self, user: &str, device: &str) -> String {
        token_for(&self.data_dir, user, device, 3600)
    }

    pub async fn connect(&self, user: &str, device: &str) -> Client {
        self.connect_with(user, device, Encoding::Json).await
    }

    pub async fn connect_with(&self, user: &str, device: &str, encoding: Encoding) -> Client {
        Client::connect(&self.ws_url(), &self.token(user, device), encoding)
            .await
            .expect("connect")
    }

    /// The text of `/metrics` (on the metrics port, if the server has one).
    pub async fn metrics_text(&self) -> String {
        let addr = self.metrics_addr.unwrap_or(self.addr);
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of a counter or gauge without labels on `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        self.sample(name).await
    }

    /// [`metric`](Self::metric) for one that is not a whole number (seconds).
    pub async fn metric_f64(&self, name: &str) -> f64 {
        self.sample(name).await
    }

    async fn sample<T: std::str::FromStr>(&self, name: &str) -> T {
        let text = self.metrics_text().await;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    }

    pub fn http(&self, user: &str, device: &str) -> HttpApi {
        HttpApi::new(&self.http_url(), &self.token(user, device)).unwrap()
    }

    /// The server's `/proc/<pid>/status`.
    pub fn proc_status(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("proc status")
    }

    /// The files the server holds open (`/proc/<pid>/fd`), sockets and pipes left out.
    pub fn open_files(&self) -> Vec<PathBuf> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).expect("fds");
        fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.is_absolute())
            .collect()
    }

    /// How many file descriptors the server holds: its files, sockets and pipes.
    pub fn descriptors(&self) -> usize {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).expect("fds");
        fds.count()
    }

    /// Sets the server's open-file limit to `limit` (`prlimit`), as `ulimit -n` would have.
    pub fn limit_open_files(&self, limit: u64) {
        let limit = libc::rlimit {
            rlim_cur: limit,
            rlim_max: limit,
        };
        // SAFETY: prlimit(2) on our own child's pid, with a valid new limit and no old one.
        let set = unsafe {
            libc::prlimit(
                self.child.id() as i32,
                libc::RLIMIT_NOFILE,
                &limit,
                std::ptr::null_mut(),
            )
        };
        assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// How many of the server's threads are named `name` (`/proc/<pid>/task/*/comm`).
    pub fn threads_named(&self, name: &str) -> usize {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("tasks");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .filter(|comm| comm.trim_end() == name)
            .count()
    }

    /// SIGKILL: no chance to flush or drain.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// Sends `signal` (SIGSTOP, SIGCONT...) to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        terminate(&mut self.child)
    }

    /// Stops (SIGTERM) and starts again on the same port, data directory and flags.
    pub fn restart(&mut self) {
        self.terminate();
        let command: Vec<&str> = self.command.iter().map(String::as_str).collect();
        let args: Vec<&str> = self.extra_args.iter().map(String::as_str).collect();
        let listen = self.addr.to_string();
        *self = Server::start_listening(&command, &self.data_dir.clone(), &listen, &args);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in the server's ready line, in text or JSON logs (`... courier ready on ADDR ...`
/// or `{..."message":"courier ready on ADDR",...}`).
pub fn ready_address(line: &str) -> Option<&str> {
    let rest = line.split("courier ready on ").nth(1)?;
    rest.split(|c: char| c.is_whitespace() || c == '"').next()
}

/// The address in the server's line for its metrics port (`... courier metrics on ADDR ...`),
/// in text or JSON logs.
pub fn metrics_address(line: &str) -> Option<&str> {
    let rest = line.split("courier metrics on ").nth(1)?;
    rest.split(|c: char| c.is_whitespace() || c == '"').next()
}

/// A token signed with the data directory's generated secret.
pub fn token_for(data_dir: &Path, user: &str, device: &str, ttl_secs: i64) -> String {
    let secret = std::fs::read_to_string(data_dir.join("jwt-secret")).expect("secret file");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + ttl_secs;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": user, "dev": device, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap()
}

/// A token with an `iat` `ahead_secs` in the future (as if signed in after an unlink).
pub fn token_with_iat(data_dir: &Path, user: &str, device: &str, ahead_secs: i64) -> String {
    let secret = std::fs::read_to_string(data_dir.join("jwt-secret")).expect("secret file");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({ "sub": user, "dev": device, "exp": now + 3600, "iat": now + ahead_secs }),
        &jsonwebtoken::EncodingKey::from_secret(secret.trim().as_bytes()),
    )
    .unwrap()
}

/// Sends SIGTERM to `child`, then waits for its exit.
pub fn terminate(child: &mut Child) -> ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().expect("wait")
}
