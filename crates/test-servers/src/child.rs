//! A child process that a test started and that must not outlive it.

use std::ops::{Deref, DerefMut};
use std::process::Child;

/// Kills (SIGKILL) and reaps its process when dropped, so a test that fails half-way does not
/// leave a binary it started running on after the test binary is gone. Derefs to [`Child`]
/// for `kill`, `wait` and `id`; dropping one that has already exited does nothing.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // Only signals a process not yet reaped: a child already waited for is left alone.
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends SIGTERM and waits up to `within` for the process to exit; kills it (SIGKILL) and returns
/// None if it has not.
pub fn terminate(
    child: &mut Child,
    within: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_dropped_child_is_killed_and_reaped() {
        let guard = KillOnDrop(Command::new("sleep").arg("60").spawn().unwrap());
        let pid = guard.id();
        drop(guard);
        // Reaped, so no zombie is left: /proc has no entry for it.
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
