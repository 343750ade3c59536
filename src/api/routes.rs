//! Route handlers: parse, call the repo, shape the answer.

use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures::{Stream, StreamExt};
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};

use super::dto::*;
use super::{ApiError, AppState, JsonBody, QueryParams};
use crate::model::{ConflictPolicy, FieldDef};
use crate::peer::PeerConfig;

type ApiResult<T> = Result<T, ApiError>;

pub async fn status(State(s): State<AppState>) -> ApiResult<Json<Status>> {
    let info = s.info.clone();
    let (listen_addrs, peers) = match &info.net {
        Some(net) => (net.listen_addrs().await, net.peers().await),
        None => (Vec::new(), Vec::new()),
    };
    let (trackers, items, clock) = s
        .blocking(|r| {
            Ok((
                r.store().tracker_count(),
                r.store().live_items(),
                r.clock_last(),
            ))
        })
        .await?;
    Ok(Json(Status {
        node_id: info.node.to_string(),
        peer_id: info.peer_id.to_string(),
        listen_addrs,
        trackers,
        items,
        peers,
        clock: clock.to_string(),
        version: env!("CARGO_PKG_VERSION"),
        bundle: (*s.bundle.op.lock().expect("bundle op lock")).map(|op| BundleProgress {
            op,
            done: s
                .bundle
                .progress
                .done
                .load(std::sync::atomic::Ordering::Relaxed),
            total: s
                .bundle
                .progress
                .total
                .load(std::sync::atomic::Ordering::Relaxed),
        }),
    }))
}

pub async fn create_tracker(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<CreateTracker>,
) -> ApiResult<impl IntoResponse> {
    let fields: Vec<FieldDef> = body.fields.into_iter().map(Into::into).collect();
    let policy = body.conflict_policy.unwrap_or_default();
    let t = s
        .blocking_write(move |r| r.create_tracker(&body.name, fields, policy))
        .await?;
    Ok((StatusCode::CREATED, Json(t)))
}

pub async fn list_trackers(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.repo.trackers()))
}

pub async fn get_tracker(
    State(s): State<AppState>,
    Path(t): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.blocking(move |r| r.tracker(&t)).await?))
}

pub async fn update_tracker(
    State(s): State<AppState>,
    Path(t): Path<String>,
    JsonBody(body): JsonBody<UpdateTracker>,
) -> ApiResult<impl IntoResponse> {
    let policy: ConflictPolicy = body.conflict_policy;
    Ok(Json(
        s.blocking_write(move |r| r.set_policy(&t, policy)).await?,
    ))
}

pub async fn add_field(
    State(s): State<AppState>,
    Path(t): Path<String>,
    JsonBody(body): JsonBody<FieldIn>,
) -> ApiResult<impl IntoResponse> {
    let field: FieldDef = body.into();
    Ok(Json(
        s.blocking_write(move |r| r.add_field(&t, field)).await?,
    ))
}

pub async fn create_item(
    State(s): State<AppState>,
    Path(t): Path<String>,
    JsonBody(body): JsonBody<ItemFields>,
) -> ApiResult<impl IntoResponse> {
    let item = s
        .blocking_write(move |r| r.create_item(&t, body.fields))
        .await?;
    Ok((StatusCode::CREATED, Json(ItemOut::from(item))))
}

pub async fn list_items(
    State(s): State<AppState>,
    Path(t): Path<String>,
    QueryParams(q): QueryParams<ListQuery>,
) -> ApiResult<impl IntoResponse> {
    let deleted = match q.deleted.as_deref() {
        None | Some("false") => Some(false),
        Some("true") => None,
        Some("only") => Some(true),
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("deleted={other:?}: use true, false or only"),
            ))
        }
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > crate::repo::MAX_PAGE {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("limit must be 1 to {}", crate::repo::MAX_PAGE),
        ));
    }
    let (items, next) = s
        .blocking(move |r| r.list_items(&t, q.after, limit, deleted))
        .await?;
    Ok(Json(ItemPage {
        items: items.into_iter().map(Into::into).collect(),
        next,
    }))
}

pub async fn get_item(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(ItemOut::from(s.blocking(move |r| r.item(&id)).await?)))
}

pub async fn update_item(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ItemFields>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(ItemOut::from(
        s.blocking_write(move |r| r.update_item(&id, body.fields))
            .await?,
    )))
}

pub async fn delete_item(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(ItemOut::from(
        s.blocking_write(move |r| r.delete_item(&id)).await?,
    )))
}

pub async fn restore_item(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(ItemOut::from(
        s.blocking_write(move |r| r.restore_item(&id)).await?,
    )))
}

pub async fn item_history(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let h = s.blocking(move |r| r.history(&id)).await?;
    Ok(Json(
        h.into_iter().map(HistoryOut::from).collect::<Vec<_>>(),
    ))
}

pub async fn item_conflicts(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let c = s.blocking(move |r| r.item_conflicts(&id)).await?;
    Ok(Json(
        c.into_iter()
            .map(|c| ConflictOut::new(None, c))
            .collect::<Vec<_>>(),
    ))
}

pub async fn restore_conflict(
    State(s): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<RestoreConflict>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(ItemOut::from(
        s.blocking_write(move |r| r.restore_conflict(&id, &body.field, &body.hlc))
            .await?,
    )))
}

pub async fn tracker_conflicts(
    State(s): State<AppState>,
    Path(t): Path<String>,
    QueryParams(q): QueryParams<InboxQuery>,
) -> ApiResult<impl IntoResponse> {
    let all = q.all.unwrap_or(false);
    let c = s.blocking(move |r| r.conflict_inbox(&t, all)).await?;
    Ok(Json(
        c.into_iter()
            .map(|(item, c)| ConflictOut::new(Some(item), c))
            .collect::<Vec<_>>(),
    ))
}

/// Mark an item's conflicts (or one field's) reviewed: they leave the inbox until a new
/// concurrent write arrives.
pub async fn ack_item_conflicts(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let body: AckConflicts = if body.iter().all(u8::is_ascii_whitespace) {
        AckConflicts::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("acknowledgement: {e}")))?
    };
    let n = s
        .blocking(move |r| r.ack_conflicts(&id, body.field.as_deref()))
        .await?;
    Ok(Json(serde_json::json!({"acknowledged": n})))
}

/// Mark every conflict in a tracker's inbox reviewed.
pub async fn ack_tracker_conflicts(
    State(s): State<AppState>,
    Path(t): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let n = s.blocking(move |r| r.ack_tracker_conflicts(&t)).await?;
    Ok(Json(serde_json::json!({"acknowledged": n})))
}

/// Server-sent events: one JSON object per durable item change. A subscriber that falls more
/// than the buffer behind gets a `lagged` event with the number of changes it missed.
pub async fn events(
    State(s): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let mut stop = s.shutdown.clone();
    let stream = BroadcastStream::new(s.repo.subscribe())
        .map(|ev| {
            Ok(match ev {
                Ok(ev) => Event::default()
                    .json_data(ev)
                    .unwrap_or_else(|_| Event::default().event("error")),
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    Event::default().event("lagged").data(n.to_string())
                }
            })
        })
        .take_until(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

pub async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    let body = s.metrics.render(&s.repo);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

pub async fn list_peers(State(s): State<AppState>) -> ApiResult<impl IntoResponse> {
    match &s.info.net {
        Some(net) => Ok(Json(
            serde_json::to_value(net.peers().await).unwrap_or_default(),
        )),
        None => {
            let stored = s.blocking(|r| Ok(r.store().peers()?)).await?;
            let list: Vec<serde_json::Value> = stored
                .iter()
                .filter_map(|b| serde_json::from_slice(b).ok())
                .collect();
            Ok(Json(serde_json::Value::Array(list)))
        }
    }
}

/// Store (and, when the network runs, apply) a peer configuration.
async fn save_peer(s: &AppState, config: PeerConfig) -> ApiResult<PeerConfig> {
    match &s.info.net {
        Some(net) => net
            .add_peer(config)
            .await
            .map_err(|e| ApiError::bad_request("invalid_peer", e)),
        None => {
            config
                .validate()
                .map_err(|e| ApiError::bad_request("invalid_peer", e))?;
            config.peer_id.parse::<libp2p::PeerId>().map_err(|_| {
                ApiError::bad_request(
                    "invalid_peer",
                    format!("{:?} is not a PeerId", config.peer_id),
                )
            })?;
            let json = serde_json::to_vec(&config)
                .map_err(|e| ApiError::bad_request("invalid_peer", e.to_string()))?;
            let id = config.peer_id.clone();
            s.blocking(move |r| Ok(r.store().put_peer(&id, &json)?))
                .await?;
            Ok(config)
        }
    }
}

pub async fn add_peer(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<PeerIn>,
) -> ApiResult<impl IntoResponse> {
    let mut addrs = body.addrs.unwrap_or_default();
    let peer_id = match (&body.addr, &body.peer_id) {
        (Some(addr), given) => {
            let m: libp2p::Multiaddr = addr.parse().map_err(|_| {
                ApiError::bad_request("invalid_peer", format!("{addr:?} is not a multiaddr"))
            })?;
            let Some(libp2p::multiaddr::Protocol::P2p(id)) = m.iter().last() else {
                return Err(ApiError::bad_request(
                    "invalid_peer",
                    "the address must end in /p2p/<peer id>",
                ));
            };
            if given.as_ref().is_some_and(|g| *g != id.to_string()) {
                return Err(ApiError::bad_request(
                    "invalid_peer",
                    "peer_id does not match the address",
                ));
            }
            addrs.push(addr.clone());
            id.to_string()
        }
        (None, Some(id)) => id.clone(),
        (None, None) => {
            return Err(ApiError::bad_request(
                "invalid_peer",
                "give \"addr\" (a multiaddr ending in /p2p/<peer id>) or \"peer_id\"",
            ))
        }
    };
    let mut config = PeerConfig::new(peer_id);
    config.addrs = addrs;
    config.name = body.name;
    if let Some(m) = body.mode {
        config.mode = m;
    }
    if let Some(sch) = body.schedule {
        config.schedule = sch;
    }
    config.read_only = body.read_only.unwrap_or(false);
    config.trackers = body.trackers.flatten();
    config.allow = body.allow.flatten();
    let saved = save_peer(&s, config).await?;
    Ok((StatusCode::CREATED, Json(saved)))
}

pub async fn update_peer(
    State(s): State<AppState>,
    Path(peer): Path<String>,
    JsonBody(body): JsonBody<PeerIn>,
) -> ApiResult<impl IntoResponse> {
    let stored = s.blocking(|r| Ok(r.store().peers()?)).await?;
    let mut config = stored
        .iter()
        .filter_map(|b| serde_json::from_slice::<PeerConfig>(b).ok())
        .find(|c| c.peer_id == peer)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "peer_not_found",
                format!("no peer {peer:?}"),
            )
        })?;
    if body.addr.is_some() || body.peer_id.is_some() {
        return Err(ApiError::bad_request(
            "invalid_peer",
            "a peer's id cannot change; add addresses with \"addrs\"",
        ));
    }
    if let Some(a) = body.addrs {
        config.addrs = a;
    }
    if body.name.is_some() {
        config.name = body.name;
    }
    if let Some(m) = body.mode {
        config.mode = m;
    }
    if let Some(sch) = body.schedule {
        config.schedule = sch;
    }
    if let Some(ro) = body.read_only {
        config.read_only = ro;
    }
    if let Some(t) = body.trackers {
        config.trackers = t;
    }
    if let Some(a) = body.allow {
        config.allow = a;
    }
    Ok(Json(save_peer(&s, config).await?))
}

pub async fn remove_peer(
    State(s): State<AppState>,
    Path(peer): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let removed = match &s.info.net {
        Some(net) => net.remove_peer(peer.clone()).await,
        None => {
            let p = peer.clone();
            s.blocking(move |r| Ok(r.store().remove_peer(&p)?)).await?
        }
    };
    if !removed {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "peer_not_found",
            format!("no peer {peer:?}"),
        ));
    }
    Ok(Json(serde_json::json!({"removed": peer})))
}

/// One-shot sync with one peer or all, whatever their schedules: answers once done.
pub async fn sync_now(
    State(s): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    // An empty body means "every peer".
    let body: SyncIn = if body.iter().all(u8::is_ascii_whitespace) {
        SyncIn::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("sync request: {e}")))?
    };
    let Some(net) = &s.info.net else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "sync_unavailable",
            "this node runs without networking: start it with `trackersync serve`",
        ));
    };
    match net.sync_now(body.peer.clone(), body.tracker.clone()).await {
        Ok(summary) => Ok(Json(summary)),
        Err(e) if e.starts_with("no peer ") => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "peer_not_found", e))
        }
        Err(e) if e.starts_with("no tracker ") => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "tracker_not_found", e))
        }
        Err(e) => Err(ApiError::bad_request("invalid_sync", e)),
    }
}

/// The sync log, newest first.
pub async fn sync_log(
    State(s): State<AppState>,
    QueryParams(q): QueryParams<LogQuery>,
) -> ApiResult<impl IntoResponse> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit as u64 > crate::store::LOG_MAX_ENTRIES {
        return Err(ApiError::bad_request(
            "invalid_limit",
            format!(
                "limit must be between 1 and {}",
                crate::store::LOG_MAX_ENTRIES
            ),
        ));
    }
    let since = match &q.since {
        Some(t) => Some(
            chrono::DateTime::parse_from_rfc3339(t)
                .map_err(|e| {
                    ApiError::bad_request(
                        "invalid_since",
                        format!("since {t:?} is not an RFC 3339 time: {e}"),
                    )
                })?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    let peer = q.peer.clone();
    let entries = s
        .blocking(move |r| {
            let rows = r.store().log_entries(limit, |v| {
                let Ok(e) = serde_json::from_slice::<crate::synclog::LogEntry>(v) else {
                    return false;
                };
                peer.as_ref().is_none_or(|p| &e.peer == p)
                    && since.is_none_or(|t| {
                        chrono::DateTime::parse_from_rfc3339(&e.time).is_ok_and(|et| et >= t)
                    })
            })?;
            Ok(rows
                .into_iter()
                .filter_map(|(n, v)| {
                    let mut e: crate::synclog::LogEntry = serde_json::from_slice(&v).ok()?;
                    e.id = n;
                    Some(e)
                })
                .collect::<Vec<_>>())
        })
        .await?;
    Ok(Json(entries))
}

fn bundle_error(e: crate::bundle::BundleError) -> ApiError {
    use crate::bundle::BundleError as E;
    match e {
        E::Repo(r) => r.into(),
        E::Request(m) if m.starts_with("no peer ") => {
            ApiError::new(StatusCode::NOT_FOUND, "peer_not_found", m)
        }
        E::Request(m) => ApiError::bad_request("invalid_export", m),
        e => ApiError::bad_request("bad_bundle", e.to_string()),
    }
}

/// Run an export or import as the one bundle job, its progress visible in `status`.
async fn bundle_job<T: Send + 'static>(
    s: &AppState,
    op: &'static str,
    f: impl FnOnce(
            &crate::repo::Repo,
            &crate::bundle::Progress,
        ) -> Result<T, crate::bundle::BundleError>
        + Send
        + 'static,
) -> ApiResult<T> {
    let _one = s.bundle.running.lock().await;
    *s.bundle.op.lock().expect("bundle op lock") = Some(op);
    let (repo, job) = (s.repo.clone(), s.bundle.clone());
    let result = tokio::task::spawn_blocking(move || f(&repo, &job.progress)).await;
    *s.bundle.op.lock().expect("bundle op lock") = None;
    result
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "bundle task failed",
            )
        })?
        .map_err(bundle_error)
}

/// A bundle of this node's store: `{"trackers"?, "since"?, "for_peer"?}` -> the file's bytes.
pub async fn export_bundle(
    State(s): State<AppState>,
    body: axum::body::Bytes,
) -> ApiResult<impl IntoResponse> {
    let body: ExportIn = if body.iter().all(u8::is_ascii_whitespace) {
        ExportIn::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request("invalid_json", format!("export request: {e}")))?
    };
    let opts = crate::bundle::ExportOptions {
        trackers: body.trackers,
        since: body.since,
        for_peer: body.for_peer,
    };
    let me = s.info.peer_id;
    let (bytes, summary) = bundle_job(&s, "export", move |r, p| {
        crate::bundle::export(r, &me, &opts, p)
    })
    .await?;
    if let Some(peer) = summary.header.for_peer.clone() {
        let mut entry = log_entry(&s, &peer, "sent").await;
        entry.sent = summary.header.item_docs + summary.header.tracker_docs;
        entry.duration_ms = summary.duration_ms;
        entry.message = format!(
            "bundle of {} bytes, feed up to {}",
            summary.bytes, summary.header.last_seq
        );
        write_log(&s, entry).await;
    }
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/vnd.trackersync.bundle",
        )],
        bytes,
    ))
}

/// Apply a bundle (the request body) -> what it changed.
pub async fn import_bundle(
    State(s): State<AppState>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<impl IntoResponse> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "a bundle is at most {} bytes",
                    crate::config::MAX_BUNDLE_BYTES
                ),
            )
        } else {
            ApiError::bad_request("unreadable_body", e.body_text())
        }
    })?;
    let me = s.info.peer_id;
    let started = chrono::Utc::now();
    let result = bundle_job(&s, "import", move |r, p| {
        let bundle = crate::bundle::read(&body)?;
        let incarnation = bundle.incarnation;
        let summary = crate::bundle::import(r, &me, bundle, p)?;
        Ok((summary, incarnation))
    })
    .await;
    let (summary, incarnation) = match result {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(error = %e.message, "bundle refused");
            return Err(e);
        }
    };
    if let Ok(peer) = summary.peer_id.parse::<libp2p::PeerId>() {
        if summary.checkpoint {
            if let Some(net) = &s.info.net {
                net.checkpoint_moved(peer, incarnation, summary.last_seq)
                    .await;
            }
        }
        let mut entry = log_entry(&s, &summary.peer_id, "received").await;
        entry.time = started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        entry.received = summary.merged;
        entry.conflicts = summary.conflicts;
        entry.refused = summary.not_allowed;
        entry.duration_ms = summary.duration_ms;
        if summary.refused > 0 || summary.incomplete > 0 || summary.deferred > 0 {
            entry.result = "error".into();
            entry.remote_error = summary.refused > 0;
        }
        entry.message = format!(
            "bundle: {} unchanged, {} incomplete, {} waiting for the clock, {} invalid",
            summary.unchanged, summary.incomplete, summary.deferred, summary.refused
        );
        write_log(&s, entry).await;
    }
    Ok(Json(summary))
}

/// A sync log entry for a bundle session with `peer` (configured or not).
async fn log_entry(s: &AppState, peer: &str, direction: &str) -> crate::synclog::LogEntry {
    let (repo, id) = (s.repo.clone(), peer.to_string());
    let config = tokio::task::spawn_blocking(move || {
        repo.store()
            .peers()
            .ok()?
            .iter()
            .filter_map(|b| serde_json::from_slice::<PeerConfig>(b).ok())
            .find(|c| c.peer_id == id)
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| PeerConfig::new(peer.to_string()));
    crate::synclog::LogEntry::new(
        chrono::Utc::now(),
        peer.to_string(),
        &config,
        direction,
        "bundle",
    )
}

async fn write_log(s: &AppState, entry: crate::synclog::LogEntry) {
    let repo = s.repo.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let json = serde_json::to_vec(&entry).expect("log entries serialize");
        if let Err(e) = repo.store().append_log(&json) {
            tracing::error!(error = %e, "cannot write the sync log");
        }
    })
    .await;
}

pub async fn not_found(req: axum::extract::Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

pub async fn method_not_allowed(req: axum::extract::Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}
