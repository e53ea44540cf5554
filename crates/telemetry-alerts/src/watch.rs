//! Rules reload without restart.
//!
//! [`RulesWatcher`] loads the rules file at start-up (a broken file is an error then, naming the
//! file and the field) and afterwards polls it: when its modification time, size or inode
//! changed, it reads it, and when the content's hash changed, it parses it and publishes the new
//! [`RuleSet`] through a `tokio::sync::watch` channel. A file that does not parse keeps the old
//! rules in force; the reason is logged once per distinct content and counted in
//! `telemetry_alerts_rule_reloads_total{result="error"}`.
//!
//! Polling rather than inotify works the same on every filesystem, including Kubernetes
//! ConfigMap mounts (which swap a symlink) and network mounts, for the price of one `stat` per
//! interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use telemetry_core::config::{ConfigError, Validate};
use telemetry_core::Shutdown;
use tokio::sync::watch;

use crate::error::AlertError;
use crate::metrics;
use crate::rules::RuleSet;

/// Where the rules are and how often to look for changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// The rules file (see `crates/telemetry-alerts/examples/rules.toml`); unset means no rules.
    pub path: Option<PathBuf>,
    /// How often the file is checked for changes, in milliseconds.
    pub reload_interval_ms: u64,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            path: None,
            reload_interval_ms: 1_000,
        }
    }
}

impl RulesConfig {
    pub fn reload_interval(&self) -> Duration {
        Duration::from_millis(self.reload_interval_ms)
    }
}

impl Validate for RulesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(100..=3_600_000).contains(&self.reload_interval_ms) {
            return Err(ConfigError::invalid(
                "alerts.rules.reload_interval_ms",
                "must be between 100 and 3600000",
            ));
        }
        if self.path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::invalid(
                "alerts.rules.path",
                "is empty; name the rules file or leave the setting out",
            ));
        }
        Ok(())
    }
}

/// What one check of the file found.
#[derive(Debug)]
pub enum Reload {
    /// Same file, same content, or the same failure as last time.
    Unchanged,
    /// New rules are in force.
    Reloaded { rules: usize },
    /// The file changed but cannot be used; the previous rules stay in force.
    Rejected(AlertError),
}

/// Watches the rules file and publishes every valid version of it.
#[derive(Debug)]
pub struct RulesWatcher {
    path: PathBuf,
    interval: Duration,
    sender: watch::Sender<Arc<RuleSet>>,
    /// The file's metadata at the last read, to skip reading an untouched file.
    seen: Option<Stamp>,
    /// Hash of the content last applied or rejected: neither is parsed or reported again.
    content: [u8; 32],
    /// The last read failure, so a file that stays missing is reported once.
    failure: Option<String>,
}

/// Metadata that changes when the file is written or replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// A write within this long of the last read might not have moved the modification time
/// (coarse filesystem clocks), so such a file is read again at the next check; the same idea as
/// git's "racily clean" entries.
const RACY_WINDOW: Duration = Duration::from_secs(2);

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            inode: metadata.ino(),
        }
    }

    fn is_racy(&self) -> bool {
        match self.modified {
            Some(modified) => SystemTime::now()
                .duration_since(modified)
                .map_or(true, |age| age < RACY_WINDOW),
            None => true,
        }
    }
}

impl RulesWatcher {
    /// Loads the rules file now; a missing or broken file is an error that names the file and
    /// what is wrong in it.
    pub fn start(path: impl Into<PathBuf>, interval: Duration) -> Result<RulesWatcher, AlertError> {
        let path = path.into();
        let (stamp, text) = read(&path)?;
        let rules = RuleSet::from_toml(&text).map_err(|e| AlertError::RulesFile {
            path: path.clone(),
            source: Box::new(e),
        })?;
        tracing::info!(path = %path.display(), rules = rules.len(), "alert rules loaded");
        let (sender, _) = watch::channel(Arc::new(rules));
        Ok(RulesWatcher {
            path,
            interval,
            sender,
            seen: Some(stamp),
            content: Sha256::digest(text.as_bytes()).into(),
            failure: None,
        })
    }

    /// A receiver that always holds the rules in force.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RuleSet>> {
        self.sender.subscribe()
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<RuleSet> {
        self.sender.borrow().clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Looks at the file once, publishing new rules if it holds a new valid version.
    pub fn check(&mut self) -> Reload {
        let (stamp, text) = match self.read_if_touched() {
            Ok(Some(read)) => read,
            Ok(None) => return Reload::Unchanged,
            Err(error) => {
                self.seen = None;
                let message = error.to_string();
                if self.failure.as_ref() == Some(&message) {
                    return Reload::Unchanged;
                }
                self.failure = Some(message);
                return Reload::Rejected(error);
            }
        };
        self.failure = None;
        self.seen = Some(stamp);
        let content: [u8; 32] = Sha256::digest(text.as_bytes()).into();
        if content == self.content {
            return Reload::Unchanged;
        }
        self.content = content;
        match RuleSet::from_toml(&text) {
            Ok(rules) => {
                let count = rules.len();
                self.sender.send_replace(Arc::new(rules));
                Reload::Reloaded { rules: count }
            }
            Err(e) => Reload::Rejected(AlertError::RulesFile {
                path: self.path.clone(),
                source: Box::new(e),
            }),
        }
    }

    fn read_if_touched(&self) -> Result<Option<(Stamp, String)>, AlertError> {
        let metadata = std::fs::metadata(&self.path).map_err(|source| AlertError::ReadRules {
            path: self.path.clone(),
            source,
        })?;
        let stamp = Stamp::of(&metadata);
        if self.seen == Some(stamp) && !stamp.is_racy() {
            return Ok(None);
        }
        read(&self.path).map(Some)
    }

    /// Checks the file every interval until shutdown. The file is small and read with blocking
    /// calls, which take microseconds; a rules file on a hung network mount would stall this
    /// task, not the worker's batches.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.wait() => return,
                _ = ticks.tick() => {}
            }
            match self.check() {
                Reload::Unchanged => {}
                Reload::Reloaded { rules } => {
                    metrics::rule_reload(true);
                    tracing::info!(path = %self.path.display(), rules, "alert rules reloaded");
                }
                Reload::Rejected(error) => {
                    metrics::rule_reload(false);
                    tracing::warn!(error = %error, "alert rules not reloaded; the previous rules stay in force");
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<(Stamp, String), AlertError> {
    let read_error = |source| AlertError::ReadRules {
        path: path.to_owned(),
        source,
    };
    // Metadata first: if the file changes between the two calls, the next check reads it again.
    let stamp = Stamp::of(&std::fs::metadata(path).map_err(read_error)?);
    let text = std::fs::read_to_string(path).map_err(read_error)?;
    Ok((stamp, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(value: f64) -> String {
        format!(
            "[[rule]]\nname = \"hot\"\nreading = \"/t\"\nop = \">\"\nvalue = {value:.1}\nseverity = \"info\"\n"
        )
    }

    const BROKEN: &str =
        "[[rule]]\nname = \"hot\"\nreading = \"/t\"\nop = \">\"\nvalue = 80.0\nclear = 90.0\nseverity = \"info\"\n";

    fn threshold(rules: &RuleSet) -> f64 {
        match &rules.rules()[0].condition {
            crate::rules::Condition::Threshold {
                test: crate::rules::Test::Compare { value, .. },
                ..
            } => *value,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_is_published_without_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule(80.0)).unwrap();
        let watcher = RulesWatcher::start(&path, Duration::from_secs(1)).unwrap();
        let mut rules = watcher.subscribe();
        assert_eq!(threshold(&rules.borrow_and_update()), 80.0);
        let shutdown = Shutdown::new();
        let task = tokio::spawn(watcher.run(shutdown.clone()));

        std::fs::write(&path, rule(90.0)).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rules.changed())
            .await
            .expect("reloaded within one interval")
            .unwrap();
        assert_eq!(threshold(&rules.borrow_and_update()), 90.0);

        // Nothing new is published while the file stays the same.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!rules.has_changed().unwrap());
        shutdown.trigger();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_file_keeps_the_old_rules_until_it_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule(80.0)).unwrap();
        let watcher = RulesWatcher::start(&path, Duration::from_secs(1)).unwrap();
        let mut rules = watcher.subscribe();
        rules.borrow_and_update();
        let shutdown = Shutdown::new();
        let task = tokio::spawn(watcher.run(shutdown.clone()));

        std::fs::write(&path, BROKEN).unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !rules.has_changed().unwrap(),
            "a broken file publishes nothing"
        );
        assert_eq!(threshold(&rules.borrow()), 80.0);

        std::fs::write(&path, rule(70.0)).unwrap();
        tokio::time::timeout(Duration::from_secs(2), rules.changed())
            .await
            .expect("the fixed file is picked up")
            .unwrap();
        assert_eq!(threshold(&rules.borrow_and_update()), 70.0);
        shutdown.trigger();
        task.await.unwrap();
    }

    #[test]
    fn each_check_reports_what_it_found_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rule(80.0)).unwrap();
        let mut watcher = RulesWatcher::start(&path, Duration::from_secs(1)).unwrap();
        assert!(matches!(watcher.check(), Reload::Unchanged));

        // Rewritten with the same content: read again, but not reloaded.
        std::fs::write(&path, rule(80.0)).unwrap();
        assert!(matches!(watcher.check(), Reload::Unchanged));

        std::fs::write(&path, BROKEN).unwrap();
        match watcher.check() {
            Reload::Rejected(e) => assert_eq!(
                e.to_string(),
                format!(
                    "rules file {}: rule 'hot': field 'clear' must be below 'value' for '>' \
                     (got clear = 90, value = 80)",
                    path.display()
                )
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(watcher.check(), Reload::Unchanged),
            "the same broken content is reported once"
        );
        assert_eq!(threshold(&watcher.rules()), 80.0);

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            watcher.check(),
            Reload::Rejected(AlertError::ReadRules { .. })
        ));
        assert!(matches!(watcher.check(), Reload::Unchanged));
        assert_eq!(threshold(&watcher.rules()), 80.0);

        std::fs::write(&path, rule(60.0)).unwrap();
        assert!(matches!(watcher.check(), Reload::Reloaded { rules: 1 }));
        assert_eq!(threshold(&watcher.rules()), 60.0);
    }

    #[test]
    fn start_up_with_a_broken_or_missing_file_names_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, BROKEN).unwrap();
        let e = RulesWatcher::start(&path, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!(
                "rules file {}: rule 'hot': field 'clear'",
                path.display()
            )),
            "{e}"
        );
        std::fs::write(&path, "[[rule]]\nname = \"hot\"\nvalue = 'high'\n").unwrap();
        let e = RulesWatcher::start(&path, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("value") && e.contains("line 3"),
            "{e}"
        );
        let missing = dir.path().join("missing.toml");
        let e = RulesWatcher::start(&missing, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read the rules file") && e.contains("missing.toml"),
            "{e}"
        );
    }

    #[test]
    fn the_reload_interval_is_checked() {
        let mut config = RulesConfig::default();
        config.validate().unwrap();
        config.reload_interval_ms = 10;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("alerts.rules.reload_interval_ms"));
    }
}
