//! A throwaway PostgreSQL: Debian's `postgresql` package, `initdb` into a
//! temporary folder and `postgres` on a free loopback port, run as `nobody`
//! when the tests run as root (PostgreSQL refuses root). Stopped (fast
//! shutdown) when dropped. A missing PostgreSQL fails the test: nothing is
//! skipped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    as_nobody: bool,
    next_db: std::sync::atomic::AtomicUsize,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b).expect(
        "PostgreSQL is missing: install Debian's postgresql package (initdb under /usr/lib/postgresql/<version>/bin)",
    )
}

impl Postgres {
    /// initdb and start. `fsync = off` (a test's database need not survive
    /// power loss) unless `durable`.
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    pub fn start_with(durable: bool) -> Postgres {
        Self::start_configured(durable, "")
    }

    /// With `conf` appended to `postgresql.conf`.
    pub fn start_configured(durable: bool, conf: &str) -> Postgres {
        let more = conf;
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let as_nobody = super::euid() == 0;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&sock).unwrap();
        if as_nobody {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            super::chown_all(&data, 65534, 65534);
            super::chown_all(&sock, 65534, 65534);
        }
        let mut pg = Postgres {
            port: 0,
            bin,
            dir,
            child: None,
            as_nobody,
            next_db: std::sync::atomic::AtomicUsize::new(0),
        };
        let out = pg
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let extra = if durable {
            ""
        } else {
            "fsync = off\nfull_page_writes = off\n"
        };
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\nshared_buffers = 128MB\n{extra}{more}\n",
            sock.display()
        );
        let path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
        pg.run();
        pg
    }

    /// A command from PostgreSQL's bin folder, as the server's user.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if self.as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    /// Starts the server on a free port (again after [`Postgres::stop`], on
    /// the same port) and waits until it takes connections.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        for _ in 0..5 {
            if self.port == 0 {
                self.port = super::free_port();
            }
            let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
            let child = self
                .command("postgres")
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting postgres");
            self.child = Some(child);
            if self.wait_ready(Duration::from_secs(30)) {
                return;
            }
            self.stop();
            self.port = 0;
        }
        panic!("postgres did not start: {}", self.log());
    }

    fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = &mut self.child
                && let Ok(Some(_)) = c.try_wait()
            {
                return false;
            }
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// Fast shutdown (SIGINT): clients are disconnected.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs SQL in database `db` through psql; panics on an error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args([
                "-d",
                db,
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("running psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        let n = self
            .next_db
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("mailmux_{}_{n}", std::process::id());
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
