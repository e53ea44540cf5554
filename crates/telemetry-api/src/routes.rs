//! The HTTP routes: who may call them, what they check, and what they answer.
//!
//! Every `/v1` route except the OpenAPI document needs `Authorization: Bearer <token>`. Checks run
//! in a fixed order so that a caller learns nothing it may not know: no or bad token is 401
//! before anything else; a token of another user is 403 whether or not the device exists; then
//! bad path ids and query parameters are 422 naming the field; only then can a device be 404.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;
use telemetry_core::contract::DeviceId;

use crate::config::LimitsConfig;
use crate::ingest::{Accepted, HttpIngest};
use crate::metrics;
use crate::params::Params;
use crate::problem::Problem;
use crate::store::{Alert, Device, Latest, Reading, Store};
use crate::tokens::Authenticator;

/// The OpenAPI 3 description of every route, kept by hand next to the code; a test checks that
/// it lists exactly the routes of [`route_table`].
pub const OPENAPI: &str = include_str!("../openapi.json");

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct App(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    store: Store,
    auth: Authenticator,
    ingest: HttpIngest,
    limits: LimitsConfig,
}

impl App {
    pub fn new(store: Store, auth: Authenticator, ingest: HttpIngest, limits: LimitsConfig) -> App {
        App(Arc::new(Inner {
            store,
            auth,
            ingest,
            limits,
        }))
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    pub fn ingest(&self) -> &HttpIngest {
        &self.0.ingest
    }

    /// 401 without a valid token, 403 when it belongs to another user than `user`.
    async fn authorize(&self, headers: &HeaderMap, user: &str) -> Result<(), Problem> {
        let Some(token) = bearer_token(headers) else {
            metrics::auth_failure("missing");
            return Err(Problem::unauthorized(
                "send an API token as `Authorization: Bearer tpa_...`; `telemetry-api token create --user U` makes one",
            ));
        };
        let Some(owner) = self.0.auth.user_for(token).await? else {
            metrics::auth_failure("unknown");
            return Err(Problem::unauthorized(
                "the API token is not valid (mistyped or revoked)",
            ));
        };
        if *owner != *user {
            metrics::auth_failure("forbidden");
            return Err(Problem::forbidden(
                "this token reads only its own user's devices",
            ));
        }
        Ok(())
    }
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The routes, each with the methods the OpenAPI document must describe.
fn routes() -> Vec<(&'static str, &'static [&'static str], MethodRouter<App>)> {
    vec![
        ("/v1/devices/{user}/{device}/latest", &["get"], get(latest)),
        (
            "/v1/devices/{user}/{device}/telemetry",
            &["get", "post"],
            get(history).post(ingest),
        ),
        ("/v1/devices/{user}/{device}/alerts", &["get"], get(alerts)),
        ("/v1/users/{user}/devices", &["get"], get(devices)),
        ("/v1/openapi.json", &["get"], get(openapi)),
    ]
}

/// Paths and methods of every route, for the OpenAPI check.
pub fn route_table() -> Vec<(&'static str, &'static [&'static str])> {
    routes()
        .into_iter()
        .map(|(path, methods, _)| (path, methods))
        .collect()
}

pub fn router(app: App) -> Router {
    let max_body = app.0.ingest.max_payload_bytes();
    let mut router = Router::new();
    for (path, _, route) in routes() {
        router = router.route(path, route);
    }
    router
        .route_layer(middleware::from_fn(track))
        .layer(DefaultBodyLimit::max(max_body))
        .fallback(|| async { Problem::not_found("no such route; see /v1/openapi.json") })
        .method_not_allowed_fallback(|| async {
            Problem::method_not_allowed(
                "this route does not take that method; see /v1/openapi.json",
            )
        })
        .with_state(app)
}

/// Counts and times every request by route template and status.
async fn track(path: MatchedPath, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::request(path.as_str(), response.status().as_u16(), started.elapsed());
    response
}

/// The path's ids, checked with the contract's rules after the caller is authorized. A `/`
/// can reach a segment percent-encoded (`%2F`); the contract forbids it because it separates
/// the key's user from its device, and the worker would dead-letter such a key.
fn device_id(user: &str, device: &str) -> Result<DeviceId, Problem> {
    for (field, id) in [("user", user), ("device", device)] {
        if id.contains('/') {
            return Err(Problem::invalid_parameter(
                field,
                format!("the {field} id '{id}' contains '/', which ids may not"),
            ));
        }
    }
    DeviceId::new(user, device).map_err(|e| Problem::invalid_id(&e))
}

fn path_problem(rejection: PathRejection) -> Problem {
    Problem::invalid_parameter("path", rejection.body_text())
}

fn query_pairs(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    allowed: &[&'static str],
) -> Result<Params, Problem> {
    let Query(pairs) = query.map_err(|e| Problem::invalid_parameter("query", e.body_text()))?;
    Params::new(pairs, allowed)
}

async fn latest(
    State(app): State<App>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Latest>, Problem> {
    let Path((user, device)) = path.map_err(path_problem)?;
    app.authorize(&headers, &user).await?;
    device_id(&user, &device)?;
    match app.store().latest(&user, &device).await? {
        Some(latest) => Ok(Json(latest)),
        None => Err(Problem::not_found(format!(
            "device '{device}' of user '{user}' has no stored reading"
        ))),
    }
}

#[derive(Debug, Serialize)]
struct HistoryPage {
    user: String,
    device: String,
    /// The window actually used, so that a caller who left `from`/`to` out can page with the
    /// same window.
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    items: Vec<Reading>,
    next_cursor: Option<String>,
}

async fn history(
    State(app): State<App>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<HistoryPage>, Problem> {
    let Path((user, device)) = path.map_err(path_problem)?;
    app.authorize(&headers, &user).await?;
    device_id(&user, &device)?;
    let params = query_pairs(query, &["from", "to", "limit", "cursor"])?;
    let limits = &app.0.limits;
    let range = params.bounded_range(limits, Utc::now())?;
    let limit = params.limit(limits)?;
    let cursor = params.cursor("telemetry")?;
    let page = app
        .store()
        .history(&user, &device, range, limit, cursor.as_ref())
        .await?;
    if page.items.is_empty()
        && cursor.is_none()
        && !app.store().device_known(&user, &device).await?
    {
        return Err(unknown_device(&user, &device));
    }
    Ok(Json(HistoryPage {
        user,
        device,
        from: range.from,
        to: range.to,
        items: page.items,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

#[derive(Debug, Serialize)]
struct AlertPage {
    user: String,
    device: String,
    items: Vec<Alert>,
    next_cursor: Option<String>,
}

async fn alerts(
    State(app): State<App>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<AlertPage>, Problem> {
    let Path((user, device)) = path.map_err(path_problem)?;
    app.authorize(&headers, &user).await?;
    device_id(&user, &device)?;
    let params = query_pairs(query, &["from", "to", "limit", "cursor"])?;
    let range = params.open_range()?;
    let limit = params.limit(&app.0.limits)?;
    let cursor = params.cursor("alerts")?;
    let page = app
        .store()
        .alerts(&user, &device, range, limit, cursor.as_ref())
        .await?;
    if page.items.is_empty()
        && cursor.is_none()
        && !app.store().device_known(&user, &device).await?
    {
        return Err(unknown_device(&user, &device));
    }
    Ok(Json(AlertPage {
        user,
        device,
        items: page.items,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

#[derive(Debug, Serialize)]
struct DevicePage {
    user: String,
    items: Vec<Device>,
    next_cursor: Option<String>,
}

async fn devices(
    State(app): State<App>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<DevicePage>, Problem> {
    let Path(user) = path.map_err(path_problem)?;
    app.authorize(&headers, &user).await?;
    let params = query_pairs(query, &["limit", "cursor"])?;
    let limit = params.limit(&app.0.limits)?;
    let cursor = params.cursor("devices")?;
    let page = app.store().devices(&user, limit, cursor.as_ref()).await?;
    Ok(Json(DevicePage {
        user,
        items: page.items,
        next_cursor: page.next.map(|c| c.encode()),
    }))
}

#[derive(Debug, Serialize)]
struct IngestAnswer {
    user: String,
    device: String,
    #[serde(flatten)]
    accepted: Accepted,
}

async fn ingest(
    State(app): State<App>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<IngestAnswer>), Problem> {
    let Path((user, device)) = path.map_err(path_problem)?;
    app.authorize(&headers, &user).await?;
    let id = device_id(&user, &device)?;
    let body = match body {
        Ok(body) => body,
        Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => {
            metrics::ingested("invalid");
            return Err(Problem::payload_too_large(app.ingest().max_payload_bytes()));
        }
        Err(rejection) => {
            return Err(Problem {
                status: StatusCode::BAD_REQUEST,
                ..Problem::invalid_parameter("body", rejection.body_text())
            })
        }
    };
    let accepted = app.ingest().accept(&id, &body).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(IngestAnswer {
            user,
            device,
            accepted,
        }),
    ))
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

fn unknown_device(user: &str, device: &str) -> Problem {
    Problem::not_found(format!(
        "device '{device}' of user '{user}' has never stored a reading"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_served_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert!(
            doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
            "an OpenAPI 3 document"
        );
        let paths = doc["paths"].as_object().expect("paths");
        let table = route_table();
        for (path, methods) in &table {
            let described = paths
                .get(*path)
                .unwrap_or_else(|| panic!("{path} is missing from openapi.json"));
            for method in *methods {
                assert!(
                    described.get(*method).is_some(),
                    "{method} {path} is missing from openapi.json"
                );
            }
            let documented: Vec<&String> = described
                .as_object()
                .unwrap()
                .keys()
                .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                .collect();
            assert_eq!(documented.len(), methods.len(), "{path}: {documented:?}");
        }
        for path in paths.keys() {
            assert!(
                table.iter().any(|(p, _)| p == path),
                "openapi.json describes {path}, which is not served"
            );
        }
    }

    #[test]
    fn bearer_tokens_are_read_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "bearer tpa_x".parse().unwrap());
        assert_eq!(bearer_token(&headers), Some("tpa_x"));
        headers.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&headers), None);
    }
}
