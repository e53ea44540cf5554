//! Routes: which Kafka topic and key an MQTT topic maps to.
//!
//! A route pairs an MQTT topic filter with a Kafka topic and a key template. Filters without
//! wildcards are looked up first (one hash lookup), then filters with wildcards in the order
//! the configuration gives them, so a specific route can always override a general one.

use std::collections::HashMap;
use std::sync::Arc;

use telemetry_core::kafka::KafkaConfig;

use crate::config::RouteConfig;
use crate::schema::{Schema, SchemaError};

/// One level of a topic filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+`: exactly one level, captured.
    Single,
    /// `#`: the rest of the topic (possibly nothing), captured; always last.
    Multi,
}

/// An MQTT topic filter, checked against the rules of MQTT 5 section 4.7.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    levels: Vec<Level>,
}

impl Filter {
    pub fn parse(filter: &str) -> Result<Filter, String> {
        if filter.is_empty() {
            return Err("a topic filter cannot be empty".into());
        }
        if filter.starts_with("$share/") {
            return Err(
                "use mqtt.shared_group for shared subscriptions, not a $share/ filter".into(),
            );
        }
        if filter.contains('\0') {
            return Err("a topic filter cannot contain NUL".into());
        }
        let parts: Vec<&str> = filter.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            levels.push(match *part {
                "+" => Level::Single,
                "#" if index + 1 == parts.len() => Level::Multi,
                "#" => return Err("'#' must be the last level".into()),
                part if part.contains(['+', '#']) => {
                    return Err(format!(
                        "level '{part}' mixes a wildcard with text; '+' and '#' must fill a whole level"
                    ))
                }
                part => Level::Exact(part.to_owned()),
            });
        }
        Ok(Filter { levels })
    }

    /// How many levels the filter captures (`+` and `#`).
    pub fn wildcards(&self) -> usize {
        self.levels
            .iter()
            .filter(|level| !matches!(level, Level::Exact(_)))
            .count()
    }

    fn is_exact(&self) -> bool {
        self.wildcards() == 0
    }

    /// Whether `topic` matches, pushing the wildcard levels onto `captures` when it does.
    pub fn matches<'t>(&self, topic: &'t str, captures: &mut Vec<&'t str>) -> bool {
        captures.clear();
        // Topics starting with `$` (broker internals such as `$SYS`) never match a filter that
        // starts with a wildcard (MQTT 5, 4.7.2).
        if topic.starts_with('$') && !matches!(self.levels.first(), Some(Level::Exact(_))) {
            return false;
        }
        let mut rest = Some(topic);
        for level in &self.levels {
            match level {
                Level::Multi => {
                    captures.push(rest.unwrap_or(""));
                    return true;
                }
                Level::Single | Level::Exact(_) => {
                    let Some(remaining) = rest else {
                        return false;
                    };
                    let (head, tail) = match remaining.split_once('/') {
                        Some((head, tail)) => (head, Some(tail)),
                        None => (remaining, None),
                    };
                    match level {
                        Level::Single => captures.push(head),
                        Level::Exact(text) if text == head => {}
                        _ => return false,
                    }
                    rest = tail;
                }
            }
        }
        rest.is_none()
    }
}

/// A Kafka key built from the levels a filter captured: `{1}/{2}` for the contract's
/// `{user}/{device}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<KeyPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyPart {
    Text(String),
    /// Index into the captures, from 0.
    Capture(usize),
}

impl KeyTemplate {
    pub fn parse(template: &str, wildcards: usize) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!("key '{template}' has a '}}' without '{{'"));
            }
            if open > 0 {
                parts.push(KeyPart::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 1..];
            let close = after
                .find('}')
                .ok_or_else(|| format!("key '{template}' has a '{{' without '}}'"))?;
            let number: usize = after[..close].parse().map_err(|_| {
                format!(
                    "key '{template}': '{{{}}}' is not a wildcard number; use {{1}} to {{{wildcards}}}",
                    &after[..close]
                )
            })?;
            if number == 0 || number > wildcards {
                return Err(format!(
                    "key '{template}': the filter has {wildcards} wildcard(s), so {{{number}}} matches nothing"
                ));
            }
            parts.push(KeyPart::Capture(number - 1));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(KeyPart::Text(rest.to_owned()));
        }
        Ok(KeyTemplate { parts })
    }

    pub fn render(&self, captures: &[&str]) -> String {
        let mut key = String::with_capacity(64);
        for part in &self.parts {
            match part {
                KeyPart::Text(text) => key.push_str(text),
                KeyPart::Capture(index) => {
                    key.push_str(captures.get(*index).copied().unwrap_or(""))
                }
            }
        }
        key
    }
}

/// A route ready to use.
#[derive(Debug)]
pub struct Route {
    filter: Filter,
    /// The Kafka topic records go to.
    pub topic: String,
    pub key: KeyTemplate,
    /// Whether records go to the telemetry topic and so must follow the wire contract.
    pub contract: bool,
    pub schema: Option<Arc<Schema>>,
}

/// Every route, indexed for lookup.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Exact filter text -> index into `routes`; the first route with that filter wins.
    exact: HashMap<String, usize>,
    /// Indexes of routes with wildcards, in configuration order.
    wildcard: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("route {index} ('{filter}'): {reason}")]
    Invalid {
        index: usize,
        filter: String,
        reason: String,
    },
    #[error("route {index} ('{filter}'): {source}")]
    Schema {
        index: usize,
        filter: String,
        source: SchemaError,
    },
}

impl Router {
    /// Compiles the routes, each schema once (routes naming the same file share it).
    pub fn new(routes: &[RouteConfig], kafka: &KafkaConfig) -> Result<Router, RouteError> {
        let mut compiled = Vec::with_capacity(routes.len());
        let mut schemas: HashMap<&std::path::Path, Arc<Schema>> = HashMap::new();
        let mut exact = HashMap::new();
        let mut wildcard = Vec::new();
        for (index, config) in routes.iter().enumerate() {
            let invalid = |reason: String| RouteError::Invalid {
                index: index + 1,
                filter: config.filter.clone(),
                reason,
            };
            let filter = Filter::parse(&config.filter).map_err(invalid)?;
            let key = KeyTemplate::parse(&config.key, filter.wildcards()).map_err(invalid)?;
            let schema = match &config.schema {
                None => None,
                Some(path) => Some(match schemas.get(path.as_path()) {
                    Some(schema) => schema.clone(),
                    None => {
                        let schema =
                            Arc::new(Schema::load(path).map_err(|source| RouteError::Schema {
                                index: index + 1,
                                filter: config.filter.clone(),
                                source,
                            })?);
                        schemas.insert(path, schema.clone());
                        schema
                    }
                }),
            };
            let topic = config.topic.clone().unwrap_or_else(|| kafka.topic.clone());
            if filter.is_exact() {
                exact.entry(config.filter.clone()).or_insert(index);
            } else {
                wildcard.push(index);
            }
            compiled.push(Route {
                filter,
                contract: topic == kafka.topic,
                topic,
                key,
                schema,
            });
        }
        Ok(Router {
            routes: compiled,
            exact,
            wildcard,
        })
    }

    /// The route for `topic`, with the levels its filter captured in `captures`.
    pub fn find<'t>(&self, topic: &'t str, captures: &mut Vec<&'t str>) -> Option<&Route> {
        if let Some(&index) = self.exact.get(topic) {
            captures.clear();
            return Some(&self.routes[index]);
        }
        self.wildcard
            .iter()
            .map(|&index| &self.routes[index])
            .find(|route| route.filter.matches(topic, captures))
    }

    /// The Kafka topics records can go to, for start-up checks.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|route| route.topic.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn captures_of(filter: &str, topic: &str) -> Option<Vec<String>> {
        let mut captures = Vec::new();
        Filter::parse(filter)
            .unwrap()
            .matches(topic, &mut captures)
            .then(|| captures.iter().map(|c| c.to_string()).collect())
    }

    #[test]
    fn filters_match_and_capture_like_an_mqtt_broker() {
        let f = "users/+/devices/+/telemetry";
        assert_eq!(
            captures_of(f, "users/u1/devices/d1/telemetry"),
            Some(vec!["u1".into(), "d1".into()])
        );
        assert_eq!(captures_of(f, "users/u1/devices/d1/alerts"), None);
        assert_eq!(captures_of(f, "users/u1/devices/d1/telemetry/x"), None);
        assert_eq!(captures_of(f, "users/u1/devices/d1"), None);
        // `+` matches an empty level, as in MQTT; the contract check catches the empty id.
        assert_eq!(
            captures_of(f, "users//devices/d1/telemetry"),
            Some(vec!["".into(), "d1".into()])
        );
        assert_eq!(
            captures_of("plant/#", "plant/a/b/c"),
            Some(vec!["a/b/c".into()])
        );
        assert_eq!(captures_of("plant/#", "plant"), Some(vec!["".into()]));
        assert_eq!(captures_of("plant/#", "plants/a"), None);
        assert_eq!(captures_of("#", "$SYS/broker/uptime"), None);
        assert_eq!(captures_of("a/b", "a/b"), Some(vec![]));
    }

    #[test]
    fn malformed_filters_say_what_is_wrong() {
        assert!(Filter::parse("a/#/b").unwrap_err().contains("last"));
        assert!(Filter::parse("a/b+").unwrap_err().contains("whole level"));
        assert!(Filter::parse("").is_err());
        assert!(Filter::parse("$share/g/a")
            .unwrap_err()
            .contains("shared_group"));
    }

    #[test]
    fn key_templates_fill_in_the_captured_levels() {
        let key = KeyTemplate::parse("{1}/{2}", 2).unwrap();
        assert_eq!(key.render(&["alice", "thermo-1"]), "alice/thermo-1");
        let key = KeyTemplate::parse("site-{1}", 1).unwrap();
        assert_eq!(key.render(&["a/b"]), "site-a/b");
        assert!(KeyTemplate::parse("{3}", 2)
            .unwrap_err()
            .contains("2 wildcard"));
        assert!(KeyTemplate::parse("{x}", 2).unwrap_err().contains("{x}"));
        assert!(KeyTemplate::parse("{1", 2).is_err());
        assert!(KeyTemplate::parse("1}", 2).is_err());
        assert_eq!(KeyTemplate::parse("fixed", 0).unwrap().render(&[]), "fixed");
    }

    #[test]
    fn exact_routes_win_over_wildcards_and_wildcards_go_in_order() {
        let route = |filter: &str, topic: &str| RouteConfig {
            filter: filter.into(),
            topic: Some(topic.into()),
            key: "k".into(),
            schema: None,
        };
        let routes = vec![
            route("users/+/devices/+/telemetry", "general"),
            route("users/+/devices/#", "catch-all"),
            route("users/vip/devices/d1/telemetry", "vip"),
        ];
        let router = Router::new(&routes, &KafkaConfig::default()).unwrap();
        let topic_of = |topic: &str| {
            router
                .find(topic, &mut Vec::new())
                .map(|r| r.topic.clone())
                .unwrap_or_default()
        };
        assert_eq!(topic_of("users/vip/devices/d1/telemetry"), "vip");
        assert_eq!(topic_of("users/a/devices/d1/telemetry"), "general");
        assert_eq!(topic_of("users/a/devices/d1/status"), "catch-all");
        assert_eq!(topic_of("other/topic"), "");
    }

    #[test]
    fn only_routes_to_the_telemetry_topic_follow_the_contract() {
        let kafka = KafkaConfig::default();
        let mut other = RouteConfig::telemetry();
        other.filter = "legacy/+".into();
        other.key = "{1}".into();
        other.topic = Some("legacy".into());
        let router = Router::new(&[RouteConfig::telemetry(), other], &kafka).unwrap();
        let mut captures = Vec::new();
        let telemetry = router
            .find("users/u/devices/d/telemetry", &mut captures)
            .unwrap();
        assert!(telemetry.contract);
        assert_eq!(telemetry.topic, kafka.topic);
        assert!(!router.find("legacy/x", &mut captures).unwrap().contract);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// MQTT 5 section 4.7 matching, level by level, written as plainly as possible to check
        /// the real matcher against.
        fn reference_match(filter: &[&str], topic: &[&str]) -> bool {
            match (filter.first(), topic.first()) {
                (Some(&"#"), _) => true,
                (None, None) => true,
                (Some(&"+"), Some(_)) => reference_match(&filter[1..], &topic[1..]),
                (Some(level), Some(part)) if level == part => {
                    reference_match(&filter[1..], &topic[1..])
                }
                _ => false,
            }
        }

        /// Topics and filters over a tiny alphabet, so that matches are common.
        fn topic() -> impl Strategy<Value = Vec<String>> {
            prop::collection::vec("[ab]{0,2}", 1..5)
        }

        fn filter() -> impl Strategy<Value = Vec<String>> {
            (
                prop::collection::vec(prop_oneof!["[ab]{0,2}", Just("+".to_owned())], 1..5),
                any::<bool>(),
            )
                .prop_map(|(mut levels, multi)| {
                    if multi {
                        levels.push("#".into());
                    }
                    levels
                })
                .prop_filter("a filter is never empty", |levels| {
                    !levels.join("/").is_empty()
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            #[test]
            fn filters_match_exactly_the_topics_mqtt_says_they_match(
                filter in filter(), topic in topic()
            ) {
                let text = filter.join("/");
                let topic_text = topic.join("/");
                let levels: Vec<&str> = filter.iter().map(String::as_str).collect();
                let parts: Vec<&str> = topic.iter().map(String::as_str).collect();
                let mut captures = Vec::new();
                let parsed = Filter::parse(&text).unwrap();
                prop_assert_eq!(
                    parsed.matches(&topic_text, &mut captures),
                    reference_match(&levels, &parts),
                    "filter {:?} topic {:?}", text, topic_text
                );
            }

            #[test]
            fn any_filter_text_parses_or_is_refused_without_panicking(text in "\\PC{0,30}") {
                if let Ok(filter) = Filter::parse(&text) {
                    let _ = KeyTemplate::parse("{1}/{2}", filter.wildcards());
                    prop_assert!(filter.matches(&text, &mut Vec::new()) || text.contains(['+', '#']) || text.starts_with('$'));
                }
            }

            #[test]
            fn a_key_template_renders_its_captures_in_order(
                captures in prop::collection::vec("[a-z0-9]{1,8}", 1..4),
                separator in "[-/:]",
            ) {
                let template: Vec<String> = (1..=captures.len()).map(|i| format!("{{{i}}}")).collect();
                let key = KeyTemplate::parse(&template.join(&separator), captures.len()).unwrap();
                let refs: Vec<&str> = captures.iter().map(String::as_str).collect();
                prop_assert_eq!(key.render(&refs), captures.join(&separator));
            }
        }
    }
}
