//! Server processes: how they are spawned, under which user, on which port, and how they stop.
//!
//! Guarantee: a server never outlives the test process. Graceful paths (`Drop`, the exit
//! handler) stop it; if the test process is killed, the kernel sends the server SIGKILL through
//! `PR_SET_PDEATHSIG`. That signal fires when the *thread* that forked dies, and the test harness
//! runs every test on its own short-lived thread, so all forks happen on one spawner thread that
//! lives as long as the process.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::Error;

/// How long a server gets to become ready. Generous because CI machines with two cores may be
/// compiling something else at the same time.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of a server log quoted in an error; enough to show a bind or config error with context.
const TAIL_LINES: usize = 30;

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Hands a command to the spawner thread and waits for the child.
fn spawn_on_spawner(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("test-servers-spawner".into())
            .spawn(move || {
                for (mut command, reply) in queue {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("cannot start the test-servers spawner thread");
        jobs
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| io::Error::other("the test-servers spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| io::Error::other("the test-servers spawner thread is gone"))?
}

/// Spawns `command` so that it dies with the test process and sits in its own process group:
/// a terminal's Ctrl-C then reaches only the test binary, not the servers behind its back, and
/// a simulated crash can kill a server together with helpers that stayed in its group.
pub(crate) fn spawn(mut command: Command) -> io::Result<Child> {
    let parent = std::process::id() as libc::pid_t;
    command.process_group(0).stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls.
    // std runs it after setuid, which matters because a uid change clears PDEATHSIG.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died before prctl, no signal will ever come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    spawn_on_spawner(command)
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The user a server runs as when the tests run as root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Account {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

impl Account {
    /// The account PostgreSQL and PgBouncer run as: they refuse to run as root, so as root they
    /// run as `postgres` (created by the Debian package); otherwise as the current user.
    pub(crate) fn for_postgres() -> Result<Option<Account>, Error> {
        static ACCOUNT: OnceLock<Option<Account>> = OnceLock::new();
        if let Some(account) = ACCOUNT.get() {
            return Ok(*account);
        }
        let account = if is_root() {
            let passwd = std::fs::read_to_string("/etc/passwd").map_err(Error::Passwd)?;
            Some(parse_passwd(&passwd, "postgres").ok_or(Error::NoPostgresUser)?)
        } else {
            None
        };
        Ok(*ACCOUNT.get_or_init(|| account))
    }

    pub(crate) fn apply(account: Option<Account>, command: &mut Command) {
        if let Some(account) = account {
            command.uid(account.uid).gid(account.gid);
        }
    }

    /// Makes `path` writable by the server's account.
    pub(crate) fn give(account: Option<Account>, path: &Path) -> Result<(), Error> {
        match account {
            Some(account) => std::os::unix::fs::chown(path, Some(account.uid), Some(account.gid))
                .map_err(|source| Error::Chown {
                    path: path.to_owned(),
                    uid: account.uid,
                    source,
                }),
            None => Ok(()),
        }
    }
}

fn parse_passwd(passwd: &str, user: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        Some(Account {
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

/// A port on 127.0.0.1 that was free a moment ago and that this process has never handed out
/// before, so a stopped server keeps its port for `start_again` while other servers start.
pub(crate) fn free_port() -> Result<u16, Error> {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    for _ in 0..100 {
        let listener = TcpListener::bind(("127.0.0.1", 0)).map_err(Error::FreePort)?;
        let port = listener.local_addr().map_err(Error::FreePort)?.port();
        if lock(&HANDED_OUT).insert(port) {
            return Ok(port);
        }
    }
    Err(Error::FreePort(io::Error::other(
        "the kernel kept offering ports this process already uses",
    )))
}

/// Runs `start`, and once more if the first attempt lost its port to another process.
pub(crate) fn retry_on_address_in_use<T>(
    mut start: impl FnMut() -> Result<T, Error>,
) -> Result<T, Error> {
    match start() {
        Err(error) if error.is_address_in_use() => start(),
        result => result,
    }
}

/// Resolves a server binary: the override from `env_var`, else its usual Debian path.
pub(crate) fn binary(
    name: &'static str,
    env_var: &str,
    default: &str,
    install: &'static str,
) -> Result<PathBuf, Error> {
    let path = std::env::var_os(env_var)
        .filter(|value| !value.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from);
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            name,
            looked: format!("at {} (override with {env_var})", path.display()),
            install,
        })
    }
}

pub(crate) fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// A server process that can be stopped and started again with the same command line.
#[derive(Debug)]
pub(crate) struct Process {
    /// Names the server in errors, e.g. "postgres on port 5433".
    name: String,
    /// Receives the server's stdout and stderr across restarts.
    log: PathBuf,
    /// `None` while stopped, so every operation knows whether there is anything to signal.
    child: Mutex<Option<Child>>,
}

impl Process {
    pub(crate) fn new(name: String, log: PathBuf) -> Process {
        Process {
            name,
            log,
            child: Mutex::new(None),
        }
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Starts the server unless it is already running, with output appended to the log.
    pub(crate) fn launch(&self, mut command: Command) -> Result<(), Error> {
        let mut child = lock(&self.child);
        if let Some(running) = child.as_mut() {
            if running.try_wait().ok().flatten().is_none() {
                return Ok(());
            }
        }
        let mut log = self.open_log()?;
        let _ = writeln!(log, "--- test-servers: starting {}", self.name);
        command.stdout(self.clone_log(&log)?).stderr(log);
        let program = PathBuf::from(command.get_program());
        *child = Some(spawn(command).map_err(|source| Error::Spawn { program, source })?);
        Ok(())
    }

    /// Polls `check` until it succeeds, the process exits, or `timeout` passes.
    pub(crate) fn wait_ready(
        &self,
        timeout: Duration,
        mut check: impl FnMut() -> Result<(), String>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            self.fail_if_exited()?;
            let last = match check() {
                // Another process answering on our port would also pass the check.
                Ok(()) => return self.fail_if_exited(),
                Err(last) => last,
            };
            if started.elapsed() >= timeout {
                return Err(Error::NotReady {
                    server: self.name.clone(),
                    waited: timeout,
                    last,
                    log: self.log.clone(),
                    tail: self.tail(),
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn fail_if_exited(&self) -> Result<(), Error> {
        let status = lock(&self.child)
            .as_mut()
            .and_then(|child| child.try_wait().ok().flatten());
        match status {
            Some(status) => Err(self.exited(status)),
            None => Ok(()),
        }
    }

    pub(crate) fn exited(&self, status: ExitStatus) -> Error {
        Error::Exited {
            server: self.name.clone(),
            status,
            log: self.log.clone(),
            tail: self.tail(),
        }
    }

    /// Sends `signal` to the server itself (not its group), e.g. SIGSTOP to freeze it.
    pub(crate) fn signal(&self, signal: libc::c_int) {
        if let Some(child) = lock(&self.child).as_ref() {
            // SAFETY: the child is not reaped yet, so its pid still names it.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    /// Asks the server to stop with `signal`, then kills its group if it takes longer than
    /// `grace`. Returns once it has exited.
    pub(crate) fn stop(&self, signal: libc::c_int, grace: Duration) {
        let Some(mut child) = lock(&self.child).take() else {
            return;
        };
        let pid = child.id() as libc::pid_t;
        // SAFETY: the child is not reaped yet, so its pid still names it. SIGCONT makes a paused
        // server act on the stop signal instead of leaving it pending forever.
        unsafe {
            libc::kill(pid, signal);
            libc::kill(pid, libc::SIGCONT);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                self.note("stopped");
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.note(&format!("did not stop within {grace:?}; killing it"));
        kill_group(&mut child);
    }

    /// Kills the server with SIGKILL, like a crash, together with whatever stayed in its
    /// process group.
    pub(crate) fn kill9(&self) {
        if let Some(mut child) = lock(&self.child).take() {
            self.note("killed with SIGKILL");
            kill_group(&mut child);
        }
    }

    fn note(&self, what: &str) {
        if let Ok(mut log) = self.open_log() {
            let _ = writeln!(log, "--- test-servers: {} {what}", self.name);
        }
    }

    fn open_log(&self) -> Result<File, Error> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| Error::WriteFile {
                path: self.log.clone(),
                source,
            })
    }

    fn clone_log(&self, log: &File) -> Result<File, Error> {
        log.try_clone().map_err(|source| Error::WriteFile {
            path: self.log.clone(),
            source,
        })
    }

    /// The last lines of the log, for error messages.
    pub(crate) fn tail(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.child).take() {
            kill_group(&mut child);
        }
    }
}

fn kill_group(child: &mut Child) {
    // SAFETY: the group leader is not reaped yet, so its pid cannot name a newer group.
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    let _ = child.wait();
}

/// The last lines of a log file; reads only its end, since logs of busy servers grow large.
pub(crate) fn tail(path: &Path) -> String {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map_or(0, |meta| meta.len());
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)));
    let mut bytes = Vec::new();
    let _ = file.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// Locks `mutex` even if a panicking test poisoned it; the guarded state stays consistent
/// because every critical section here is a single take or insert.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A command for a server binary, run from `dir` so nothing reads files from the test's
/// working directory (Tansu, for one, loads any `.env` it finds there).
pub(crate) fn command(program: &Path, dir: &Path) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir);
    command
}

pub(crate) fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), Error> {
    std::fs::write(path, contents).map_err(|source| Error::WriteFile {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn create_dir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|source| Error::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Looks `name` up in PATH.
pub(crate) fn in_path(name: impl AsRef<OsStr>) -> Option<PathBuf> {
    let name = name.as_ref();
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lookup_finds_the_users_ids() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgres:x:101:104:PostgreSQL administrator:/var/lib/postgresql:/bin/bash\n";
        let account = parse_passwd(passwd, "postgres").unwrap();
        assert_eq!((account.uid, account.gid), (101, 104));
        assert!(parse_passwd(passwd, "mosquitto").is_none());
    }

    #[test]
    fn a_missing_binary_names_the_install_command() {
        let error = binary(
            "mosquitto",
            "TEST_SERVERS_UNSET_VARIABLE",
            "/nonexistent/mosquitto",
            "sudo apt-get install -y mosquitto",
        )
        .unwrap_err();
        assert_eq!(
            error.to_string(),
            "mosquitto not found at /nonexistent/mosquitto (override with \
             TEST_SERVERS_UNSET_VARIABLE); install it with: make deps   (or: sudo apt-get \
             install -y mosquitto)"
        );
    }

    #[test]
    fn ports_are_never_handed_out_twice() {
        let ports: BTreeSet<u16> = (0..20).map(|_| free_port().unwrap()).collect();
        assert_eq!(ports.len(), 20);
    }
}
