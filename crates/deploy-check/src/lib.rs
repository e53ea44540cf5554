//! Static checks of how the pipeline is deployed, against the code it deploys.
//!
//! The files under test are the top-level `docker-compose.yml` and `Dockerfile`, and
//! `deploy/` (Prometheus, Grafana, EMQX, PgBouncer, Kubernetes), `redpanda/` and `vector/`.
//! None of them can be run here (no Docker, no cluster), so the tests in `tests/` check what can
//! be checked without running them: that they parse, that they agree with each other and with
//! the contract constants, that every setting they pass reaches a real config field of the
//! binary it configures, that every metric the dashboard plots is one the services export, and
//! that the Kubernetes manifests validate against the Kubernetes (and KEDA) schemas.
//!
//! This library holds the parsing the tests share; each test file reads as one story.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use telemetry_core::config::Validate;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        path: String,
        source: serde_norway::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{what}: {message}")]
    Config { what: String, message: String },
}

/// The repository's top-level directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the crate lives two levels below the repository root")
}

/// A file of the repository, by its path from the top.
pub fn read(relative: &str) -> Result<String, CheckError> {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).map_err(|source| CheckError::Read { path, source })
}

/// One YAML document as JSON values, with `<<:` merge keys applied (compose files use them).
pub fn yaml(relative: &str) -> Result<Value, CheckError> {
    let text = read(relative)?;
    let mut docs = yaml_documents(relative, &text)?;
    Ok(docs.pop().unwrap_or(Value::Null))
}

/// Every document of a multi-document YAML text (`---` separated), as JSON values.
pub fn yaml_documents(name: &str, text: &str) -> Result<Vec<Value>, CheckError> {
    let yaml_error = |source| CheckError::Yaml {
        path: name.to_owned(),
        source,
    };
    let mut docs = Vec::new();
    for document in serde_norway::Deserializer::from_str(text) {
        let mut value = <serde_norway::Value as serde::Deserialize>::deserialize(document)
            .map_err(yaml_error)?;
        value.apply_merge().map_err(yaml_error)?;
        if !value.is_null() {
            docs.push(
                serde_json::to_value(&value).map_err(|source| CheckError::Json {
                    path: name.to_owned(),
                    source,
                })?,
            );
        }
    }
    Ok(docs)
}

pub fn json(relative: &str) -> Result<Value, CheckError> {
    serde_json::from_str(&read(relative)?).map_err(|source| CheckError::Json {
        path: relative.to_owned(),
        source,
    })
}

/// Loads a stage's config the way its binary does (`telemetry_core::config::load`): defaults,
/// then the TOML file, then `{prefix}*` environment variables (nested with `__`), then checks
/// it. Unknown fields are errors, so a misspelt variable in a manifest fails here, not at
/// start-up in a cluster.
pub fn load_stage_config<T>(
    what: &str,
    toml_file: Option<&str>,
    env: &BTreeMap<String, String>,
    prefix: &str,
) -> Result<T, CheckError>
where
    T: DeserializeOwned + Serialize + Default + Validate,
{
    let config_error = |message: String| CheckError::Config {
        what: what.to_owned(),
        message,
    };
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(text) = toml_file {
        figment = figment.merge(Toml::string(text));
    }
    for (name, value) in env {
        let Some(field) = name.strip_prefix(prefix) else {
            continue;
        };
        // Read by the flag parser, not a config field (telemetry_core::config).
        if field == "CONFIG" {
            continue;
        }
        let key = field.to_ascii_lowercase().replace("__", ".");
        let value: figment::value::Value = value.parse().expect("parsing a value is infallible");
        figment = figment.merge(Serialized::default(&key, value));
    }
    let config: T = figment.extract().map_err(|e| config_error(e.to_string()))?;
    config.validate().map_err(|e| config_error(e.to_string()))?;
    Ok(config)
}

/// The metric names a PromQL expression reads: identifiers that are not PromQL keywords,
/// functions, label names or label values. Good enough for the dashboard's expressions, which
/// use no recording rules and no `__name__` matchers.
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ];
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut braces = 0usize; // inside {...}: label matchers
    let mut parens_after_grouping = Vec::new(); // inside by (...) / without (...): label names
    let mut depth = 0usize;
    let mut last_word = String::new();
    while i < bytes.len() {
        let c = bytes[i] as char;
        match c {
            '"' | '\'' => {
                // A string literal: skip to its end.
                i += 1;
                while i < bytes.len() && bytes[i] as char != c {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '[' => {
                // A range or subquery duration, e.g. [5m] or [$__rate_interval].
                while i < bytes.len() && bytes[i] != b']' {
                    i += 1;
                }
            }
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            '(' => {
                depth += 1;
                if matches!(
                    last_word.as_str(),
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    parens_after_grouping.push(depth);
                }
            }
            ')' => {
                if parens_after_grouping.last() == Some(&depth) {
                    parens_after_grouping.pop();
                }
                depth = depth.saturating_sub(1);
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' => {
                let start = i;
                while i < bytes.len()
                    && ((bytes[i] as char).is_ascii_alphanumeric()
                        || matches!(bytes[i], b'_' | b':' | b'$'))
                {
                    i += 1;
                }
                let word = &expr[start..i];
                let rest = expr[i..].trim_start();
                let is_call = rest.starts_with('(');
                let in_labels = braces > 0 || !parens_after_grouping.is_empty();
                let is_variable = word.starts_with('$');
                let is_duration_or_number =
                    start > 0 && (bytes[start - 1] as char).is_ascii_digit();
                if !is_call
                    && !in_labels
                    && !is_variable
                    && !is_duration_or_number
                    && !KEYWORDS.contains(&word)
                    && !matches!(word, "inf" | "nan" | "Inf" | "NaN")
                {
                    names.insert(word.to_owned());
                }
                last_word = word.to_owned();
                continue;
            }
            _ => {}
        }
        if !c.is_whitespace() {
            last_word.clear();
        }
        i += 1;
    }
    names
}

/// The sample names in a Prometheus text exposition (`name{labels} value` lines), including
/// the `_bucket`, `_sum` and `_count` series of histograms and summaries.
pub fn exposition_sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// A Dockerfile stage: its `FROM` image, its name (`AS name`) and its instructions, with
/// continuation lines joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerStage {
    pub image: String,
    pub name: Option<String>,
    /// (instruction in upper case, arguments)
    pub instructions: Vec<(String, String)>,
}

pub fn dockerfile_stages(text: &str) -> Vec<DockerStage> {
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.starts_with('#') || trimmed.is_empty()) {
            continue;
        }
        if trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stages: Vec<DockerStage> = Vec::new();
    for instruction in logical {
        let (keyword, args) = instruction
            .split_once(char::is_whitespace)
            .unwrap_or((&instruction, ""));
        let keyword = keyword.to_ascii_uppercase();
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        if keyword == "FROM" {
            let mut words = args.split(' ').filter(|w| !w.starts_with("--"));
            let image = words.next().unwrap_or_default().to_owned();
            let name = match (words.next(), words.next()) {
                (Some(as_), Some(name)) if as_.eq_ignore_ascii_case("as") => Some(name.to_owned()),
                _ => None,
            };
            stages.push(DockerStage {
                image,
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = stages.last_mut() {
            stage.instructions.push((keyword, args));
        }
    }
    stages
}

/// True when an image reference names an exact version: a digest, or a tag that is not
/// `latest`, not a bare major version, and not a moving name like `stable`.
pub fn image_is_pinned(image: &str) -> bool {
    if image.contains("@sha256:") {
        return true;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    let Some((_, tag)) = last.split_once(':') else {
        return false;
    };
    let version_part = tag
        .trim_start_matches('v')
        .split(['-', '_'])
        .next()
        .unwrap_or_default();
    let numbers: Vec<&str> = version_part.split('.').collect();
    numbers.len() >= 2
        && numbers
            .iter()
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promql_names_skip_functions_labels_and_durations() {
        let names = promql_metric_names(
            "histogram_quantile(0.99, sum by (le, job) (rate(a_seconds_bucket{job=\"worker\"}[$__rate_interval]))) / on (job) group_left b_total offset 5m + count(up == 1)",
        );
        assert_eq!(
            names,
            ["a_seconds_bucket", "b_total", "up"]
                .map(String::from)
                .into()
        );
    }

    #[test]
    fn exposition_names_include_histogram_series() {
        let text = "# TYPE x histogram\nx_bucket{le=\"1\"} 3\nx_sum 2.5\nx_count 3\ny_total{reason=\"a\"} 1\n";
        assert_eq!(
            exposition_sample_names(text),
            ["x_bucket", "x_count", "x_sum", "y_total"]
                .map(String::from)
                .into()
        );
    }

    #[test]
    fn pinned_images_name_an_exact_version() {
        for pinned in [
            "emqx/emqx:5.8.6",
            "docker.redpanda.com/redpandadata/redpanda:v24.3.6",
            "timescale/timescaledb:2.17.2-pg16",
            "rust:1.95.0-slim-bookworm",
            "debian:12.12-slim",
            "localhost:5000/x@sha256:0123",
        ] {
            assert!(image_is_pinned(pinned), "{pinned}");
        }
        for moving in [
            "emqx/emqx",
            "emqx/emqx:latest",
            "debian:bookworm-slim",
            "rust:1",
            "localhost:5000/x",
        ] {
            assert!(!image_is_pinned(moving), "{moving}");
        }
    }

    #[test]
    fn dockerfile_stages_join_continued_lines() {
        let stages = dockerfile_stages(
            "# c\nFROM a:1.0 AS build\nRUN one \\\n    # inner comment\n    two\nFROM b:2.0\nUSER 10\n",
        );
        assert_eq!(stages.len(), 2);
        assert_eq!(stages[0].name.as_deref(), Some("build"));
        assert_eq!(
            stages[0].instructions,
            vec![("RUN".to_owned(), "one two".to_owned())]
        );
        assert_eq!(stages[1].image, "b:2.0");
    }
}
