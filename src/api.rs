//! The local HTTP/JSON API (axum): routes, authentication, body limits and extractors that turn
//! every bad request into a 4xx JSON error. No business logic: handlers call the repo on the
//! blocking pool and map results to the JSON shapes in `dto`.

mod dto;
mod error;
mod routes;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

pub use error::ApiError;

use crate::config::MAX_BODY_BYTES;
use crate::metrics::Metrics;
use crate::node::NodeInfo;
use crate::repo::Repo;

#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<Repo>,
    pub info: NodeInfo,
    token: Arc<str>,
    pub shutdown: watch::Receiver<bool>,
    pub metrics: Arc<Metrics>,
    /// The export or import under way (one at a time), for progress in `status`.
    pub bundle: Arc<BundleJob>,
}

#[derive(Default)]
pub struct BundleJob {
    pub op: std::sync::Mutex<Option<&'static str>>,
    pub progress: crate::bundle::Progress,
    /// Held for the whole export or import: bundles run one at a time.
    pub running: tokio::sync::Mutex<()>,
}

impl AppState {
    pub fn new(
        repo: Arc<Repo>,
        info: NodeInfo,
        token: String,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AppState {
            repo,
            info,
            token: token.into(),
            shutdown,
            metrics: Arc::new(Metrics::new()),
            bundle: Arc::new(BundleJob::default()),
        }
    }

    /// Run repo work on the blocking pool (Automerge and sled are synchronous).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Repo) -> Result<T, crate::repo::RepoError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let repo = self.repo.clone();
        Ok(tokio::task::spawn_blocking(move || f(&repo)).await??)
    }

    /// [`AppState::blocking`] for a request that writes: a write whose flush another thread
    /// leads waits for it here, as a task, not on the blocking thread (see
    /// [`Repo::deferring`]). Answered once durable either way.
    pub async fn blocking_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Repo) -> Result<T, crate::repo::RepoError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let repo = self.repo.clone();
        // Registered now, so a flush led meanwhile waits for this write to apply and covers it.
        let mut pending = crate::repo::PendingWrite::new(&repo);
        let (result, deferred) = tokio::task::spawn_blocking(move || {
            let _registered = pending.adopt();
            repo.deferring(|| f(&repo))
        })
        .await?;
        if !deferred.is_empty() {
            // Its own task: a client that hangs up must not leave the write unflushed.
            let repo = self.repo.clone();
            tokio::spawn(async move { repo.complete(deferred).await }).await??;
        }
        Ok(result?)
    }
}

pub fn router(state: AppState) -> Router {
    use routes::*;
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/trackers", post(create_tracker).get(list_trackers))
        .route("/trackers/{t}", get(get_tracker).patch(update_tracker))
        .route("/trackers/{t}/fields", post(add_field))
        .route("/trackers/{t}/items", post(create_item).get(list_items))
        .route("/trackers/{t}/conflicts", get(tracker_conflicts))
        .route("/trackers/{t}/conflicts/ack", post(ack_tracker_conflicts))
        .route(
            "/items/{id}",
            get(get_item).patch(update_item).delete(delete_item),
        )
        .route("/items/{id}/restore", post(restore_item))
        .route("/items/{id}/history", get(item_history))
        .route("/items/{id}/conflicts", get(item_conflicts))
        .route("/items/{id}/conflicts/restore", post(restore_conflict))
        .route("/items/{id}/conflicts/ack", post(ack_item_conflicts))
        .route("/events", get(events))
        .route("/peers", get(list_peers).post(add_peer))
        .route(
            "/peers/{peer}",
            axum::routing::patch(update_peer).delete(remove_peer),
        )
        .route("/sync", post(sync_now))
        .route("/log", get(sync_log))
        .route("/export", post(export_bundle))
        .route(
            "/import",
            post(import_bundle).layer(axum::extract::DefaultBodyLimit::max(
                crate::config::MAX_BUNDLE_BYTES,
            )),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authenticate,
        ));
    Router::new()
        .nest("/api/v1", v1)
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn authenticate(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if constant_time_eq(t.trim().as_bytes(), state.token.as_bytes()) => Ok(next.run(req).await),
        Some(_) => Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong API token; it is in the data directory's api-token file")),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing `Authorization: Bearer <token>`; the token is in the data directory's api-token file",
        )),
    }
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    state.metrics.count_request(res.status());
    res
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON request body: size-limited, content type not required, unknown fields refused by the
/// DTOs; every failure is a 4xx JSON error.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("request body is over the {MAX_BODY_BYTES}-byte limit"),
                    )
                } else {
                    ApiError::bad_request("unreadable_body", e.body_text())
                }
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(
                    "malformed_json",
                    format!("request body is not valid JSON: {e}"),
                ),
                Category::Data => {
                    ApiError::bad_request("invalid_request", format!("request body: {e}"))
                }
            }
        })
    }
}

/// Query parameters with JSON errors.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))
    }
}
