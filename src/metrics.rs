//! Prometheus metrics for `/metrics`. Store-derived figures are read at scrape time; request
//! counts are kept here.

use axum::http::StatusCode;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::repo::Repo;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusClass {
    class: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<StatusClass, Counter>,
    items: Gauge,
    trackers: Gauge,
    flushes: Gauge,
    last_seq: Gauge,
    disk_bytes: Gauge,
    sync_in: Gauge,
    sync_out: Gauge,
    pulls: Gauge,
    pushes: Gauge,
    pushes_from_memory: Gauge,
    incomplete_fetched: Gauge,
    messages_out: Gauge,
    plain_out: Gauge,
    payload_out: Gauge,
    cache_bytes: Gauge,
    cache_entries: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trackersync");
        let requests = Family::<StatusClass, Counter>::default();
        registry.register(
            "api_requests",
            "Local API requests by status class",
            requests.clone(),
        );
        let items = Gauge::default();
        registry.register("items", "Live (not deleted) items", items.clone());
        let trackers = Gauge::default();
        registry.register("trackers", "Trackers", trackers.clone());
        let flushes = Gauge::default();
        registry.register(
            "store_flushes",
            "Store flushes (fsyncs) since start; each covers a group of writes",
            flushes.clone(),
        );
        let last_seq = Gauge::default();
        registry.register(
            "change_seq",
            "Last local change sequence number",
            last_seq.clone(),
        );
        let disk_bytes = Gauge::default();
        registry.register(
            "store_disk_bytes",
            "Bytes the store occupies on disk",
            disk_bytes.clone(),
        );
        let sync_in = Gauge::default();
        registry.register(
            "sync_bytes_received",
            "Sync protocol bytes received from peers",
            sync_in.clone(),
        );
        let sync_out = Gauge::default();
        registry.register(
            "sync_bytes_sent",
            "Sync protocol bytes sent to peers",
            sync_out.clone(),
        );
        let pulls = Gauge::default();
        registry.register(
            "sync_pulls_sent",
            "Pull requests sent to peers",
            pulls.clone(),
        );
        let pushes = Gauge::default();
        registry.register(
            "sync_pushes_taken",
            "Live pushes from peers taken in place of a pull",
            pushes.clone(),
        );
        let pushes_from_memory = Gauge::default();
        registry.register(
            "sync_pushes_from_memory",
            "Live pushes to peers built from the last changes in memory, without a feed read",
            pushes_from_memory.clone(),
        );
        let incomplete_fetched = Gauge::default();
        registry.register(
            "sync_incomplete_fetched",
            "Received documents that lacked earlier changes and were fetched again (each costs its page a round trip)",
            incomplete_fetched.clone(),
        );
        let messages_out = Gauge::default();
        registry.register(
            "sync_messages_sent",
            "Sync protocol messages sent to peers",
            messages_out.clone(),
        );
        let plain_out = Gauge::default();
        registry.register(
            "sync_messages_sent_plain",
            "Of the sync messages sent, those not deflated (peers without the deflate protocol)",
            plain_out.clone(),
        );
        let payload_out = Gauge::default();
        registry.register(
            "sync_payload_bytes_sent",
            "Encoded bytes of the sync messages sent, before compression",
            payload_out.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "doc_cache_bytes",
            "Estimated memory held by decoded documents in the cache",
            cache_bytes.clone(),
        );
        let cache_entries = Gauge::default();
        registry.register(
            "doc_cache_entries",
            "Documents in the decoded-document cache",
            cache_entries.clone(),
        );
        Metrics {
            cache_bytes,
            cache_entries,
            messages_out,
            plain_out,
            payload_out,
            pulls,
            pushes,
            pushes_from_memory,
            incomplete_fetched,
            sync_in,
            sync_out,
            registry,
            requests,
            items,
            trackers,
            flushes,
            last_seq,
            disk_bytes,
        }
    }

    pub fn count_request(&self, status: StatusCode) {
        let class = match status.as_u16() {
            200..=299 => "2xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.requests.get_or_create(&StatusClass { class }).inc();
    }

    pub fn render(&self, repo: &Repo) -> String {
        let store = repo.store();
        self.items.set(store.live_items() as i64);
        self.trackers.set(store.tracker_count() as i64);
        self.flushes.set(store.flush_count() as i64);
        self.last_seq.set(store.last_seq() as i64);
        self.disk_bytes
            .set(store.size_on_disk().unwrap_or(0) as i64);
        let (bytes_in, bytes_out) = crate::net::wire_bytes();
        self.sync_in.set(bytes_in as i64);
        self.sync_out.set(bytes_out as i64);
        let (messages, plain, payload) = crate::net::wire_messages_out();
        self.messages_out.set(messages as i64);
        self.plain_out.set(plain as i64);
        self.payload_out.set(payload as i64);
        let (pulls, pushes, from_memory, incomplete) = crate::net::pull_counts();
        self.incomplete_fetched.set(incomplete as i64);
        self.pulls.set(pulls as i64);
        self.pushes.set(pushes as i64);
        self.pushes_from_memory.set(from_memory as i64);
        let (cache_bytes, cache_entries) = repo.doc_cache_usage();
        self.cache_bytes.set(cache_bytes as i64);
        self.cache_entries.set(cache_entries as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
