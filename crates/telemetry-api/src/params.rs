//! Query parameters, checked one by one so that a bad request is told which parameter is wrong
//! and why (422 with `field`), instead of a generic deserialisation error. Unknown and repeated
//! parameters are refused too: a typo such as `limt=10` must not silently fall back to defaults.

use chrono::{DateTime, Duration, Utc};

use crate::config::LimitsConfig;
use crate::cursor::Cursor;
use crate::problem::Problem;

/// A request's query parameters, each known to the route and given at most once.
#[derive(Debug)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

/// An optional window `[from, to)`: either end may be open.
pub type OpenRange = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// A time window `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Params {
    /// Refuses parameters outside `allowed` and parameters given twice.
    pub fn new(pairs: Vec<(String, String)>, allowed: &[&'static str]) -> Result<Params, Problem> {
        for (i, (name, _)) in pairs.iter().enumerate() {
            if !allowed.contains(&name.as_str()) {
                return Err(Problem::invalid_parameter(
                    name.clone(),
                    format!(
                        "unknown query parameter '{name}'; this route takes {}",
                        allowed.join(", ")
                    ),
                ));
            }
            if pairs[..i].iter().any(|(earlier, _)| earlier == name) {
                return Err(Problem::invalid_parameter(
                    name.clone(),
                    format!("'{name}' is given more than once"),
                ));
            }
        }
        Ok(Params { pairs })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// `limit`: rows per page, from 1 to `limits.max_page_size`.
    pub fn limit(&self, limits: &LimitsConfig) -> Result<u32, Problem> {
        let Some(text) = self.get("limit") else {
            return Ok(limits.default_page_size);
        };
        match text.parse::<u32>() {
            Ok(limit) if (1..=limits.max_page_size).contains(&limit) => Ok(limit),
            _ => Err(Problem::invalid_parameter(
                "limit",
                format!(
                    "limit must be a whole number from 1 to {}; got '{text}'",
                    limits.max_page_size
                ),
            )),
        }
    }

    /// `cursor`: the `next_cursor` of the previous page of the same listing.
    pub fn cursor(&self, listing: &'static str) -> Result<Option<Cursor>, Problem> {
        let Some(text) = self.get("cursor") else {
            return Ok(None);
        };
        let cursor = Cursor::decode(text)
            .map_err(|why| Problem::invalid_parameter("cursor", format!("cursor {why}")))?;
        if cursor.listing() != listing {
            return Err(Problem::invalid_parameter(
                "cursor",
                format!(
                    "cursor pages through {}, not {listing}; pass next_cursor of this listing",
                    cursor.listing()
                ),
            ));
        }
        Ok(Some(cursor))
    }

    /// A time parameter: RFC 3339 (`2025-11-24T16:00:00Z`) or whole milliseconds since the Unix
    /// epoch, like the payload's `ts`.
    pub fn time(&self, name: &'static str) -> Result<Option<DateTime<Utc>>, Problem> {
        let Some(text) = self.get(name) else {
            return Ok(None);
        };
        let parsed = match text.parse::<i64>() {
            Ok(millis) => DateTime::from_timestamp_millis(millis),
            Err(_) => DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        };
        parsed.map(Some).ok_or_else(|| {
            Problem::invalid_parameter(
                name,
                format!("{name} must be an RFC 3339 time (2025-11-24T16:00:00Z) or milliseconds since the Unix epoch; got '{text}'"),
            )
        })
    }

    /// `from` and `to` for telemetry history: `to` defaults to now, `from` to
    /// `limits.default_range_hours` before `to`; the window may not be empty or wider than
    /// `limits.max_range_hours`.
    pub fn bounded_range(
        &self,
        limits: &LimitsConfig,
        now: DateTime<Utc>,
    ) -> Result<Range, Problem> {
        let to = self.time("to")?.unwrap_or(now);
        let from = match self.time("from")? {
            Some(from) => from,
            None => to - Duration::hours(limits.default_range_hours.into()),
        };
        if from >= to {
            return Err(Problem::invalid_parameter(
                "from",
                format!("from ({from}) must be before to ({to})"),
            ));
        }
        let max = Duration::hours(limits.max_range_hours.into());
        if to - from > max {
            return Err(Problem::invalid_parameter(
                "from",
                format!(
                    "from..to spans {} hours; the limit is {} hours: narrow the window and page through it",
                    (to - from).num_hours(),
                    limits.max_range_hours
                ),
            ));
        }
        Ok(Range { from, to })
    }

    /// `from` and `to` for alert history: both optional and unbounded (alerts are few, and the
    /// page size bounds each query), but `from` must be before `to` when both are given.
    pub fn open_range(&self) -> Result<OpenRange, Problem> {
        let (from, to) = (self.time("from")?, self.time("to")?);
        if let (Some(from), Some(to)) = (from, to) {
            if from >= to {
                return Err(Problem::invalid_parameter(
                    "from",
                    format!("from ({from}) must be before to ({to})"),
                ));
            }
        }
        Ok((from, to))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &[(&str, &str)]) -> Result<Params, Problem> {
        Params::new(
            query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            &["from", "to", "limit", "cursor"],
        )
    }

    fn field(problem: Problem) -> String {
        problem.field.unwrap().into_owned()
    }

    #[test]
    fn unknown_and_repeated_parameters_are_named() {
        assert_eq!(field(params(&[("limt", "5")]).unwrap_err()), "limt");
        assert_eq!(
            field(params(&[("limit", "5"), ("limit", "6")]).unwrap_err()),
            "limit"
        );
    }

    #[test]
    fn limits_outside_the_page_size_are_refused() {
        let limits = LimitsConfig::default();
        assert_eq!(params(&[]).unwrap().limit(&limits).unwrap(), 100);
        assert_eq!(
            params(&[("limit", "1000")])
                .unwrap()
                .limit(&limits)
                .unwrap(),
            1000
        );
        for bad in ["0", "1001", "-1", "ten", ""] {
            let problem = params(&[("limit", bad)])
                .unwrap()
                .limit(&limits)
                .unwrap_err();
            assert_eq!(problem.field.as_deref(), Some("limit"), "{bad}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_epoch_milliseconds() {
        let p = params(&[
            ("from", "2025-11-24T16:00:00+01:00"),
            ("to", "1764000000123"),
        ])
        .unwrap();
        assert_eq!(
            p.time("from").unwrap().unwrap().to_rfc3339(),
            "2025-11-24T15:00:00+00:00"
        );
        assert_eq!(
            p.time("to").unwrap().unwrap().timestamp_millis(),
            1_764_000_000_123
        );
        let bad = params(&[("to", "yesterday")])
            .unwrap()
            .time("to")
            .unwrap_err();
        assert_eq!(bad.field.as_deref(), Some("to"));
    }

    #[test]
    fn the_history_window_defaults_to_a_day_and_may_not_exceed_the_limit() {
        let limits = LimitsConfig::default();
        let now = DateTime::from_timestamp(1_764_000_000, 0).unwrap();
        let range = params(&[]).unwrap().bounded_range(&limits, now).unwrap();
        assert_eq!(
            (range.to, range.to - range.from),
            (now, Duration::hours(24))
        );
        let too_wide = params(&[("from", "2020-01-01T00:00:00Z")])
            .unwrap()
            .bounded_range(&limits, now)
            .unwrap_err();
        assert_eq!(too_wide.field.as_deref(), Some("from"));
        let backwards = params(&[("from", "1764000001000"), ("to", "1764000000000")])
            .unwrap()
            .bounded_range(&limits, now)
            .unwrap_err();
        assert_eq!(backwards.field.as_deref(), Some("from"));
    }

    #[test]
    fn a_cursor_of_another_listing_is_refused() {
        let device_cursor = Cursor::Device {
            device: "d1".into(),
        }
        .encode();
        let problem = params(&[("cursor", &device_cursor)])
            .unwrap()
            .cursor("telemetry")
            .unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("cursor"));
        assert!(params(&[("cursor", "nonsense")])
            .unwrap()
            .cursor("telemetry")
            .is_err());
    }
}
