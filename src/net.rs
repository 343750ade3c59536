//! The only code that names libp2p. One task owns the Swarm; [`NetHandle`] sends it commands
//! with oneshot replies. Repo work (serving and applying documents) runs on the blocking pool
//! and reports back to the loop.
//!
//! Sync is pull-based: each side pulls the other's change feed from its checkpoint
//! (CouchDB-style), one pull in flight per peer; a durable local change sends connected peers
//! a `Notify`, which makes them pull now (live sync; notifies and pulls coalesce under load).
//! Changes applied from one peer move our feed too, so they travel on to the next hop.
//!
//! Authorization: only peers in the allow-list (persisted peer configurations) are dialed,
//! served or pulled from; an unauthorized peer's connection is closed as soon as it opens, and
//! any request from it is refused. Removing a peer disconnects it at once.

mod reconcile;
pub mod wire;

/// Wire conversions, for the fuzz harness.
pub fn wire_uuid(b: &[u8]) -> Result<Uuid, wire::WireError> {
    wire::uuid(b, "id")
}

pub fn wire_heads(h: &[Vec<u8>]) -> Result<Vec<[u8; 32]>, wire::WireError> {
    wire::heads(h)
}

pub fn wire_doc(e: pb::Entry) -> Result<RemoteDoc, wire::WireError> {
    wire::doc_from_wire(e)
}

/// A frame payload on the deflate protocol, inflated (within the response limit) and decoded
/// as a response, as the codec does.
pub fn wire_inflate_response(frame: &[u8]) -> std::io::Result<pb::Response> {
    wire::unpack_deflated(frame.to_vec(), wire::MAX_RESPONSE_BYTES)
}

/// Sync messages written by this process so far: (messages, of which plain, their bytes
/// before compression).
pub fn wire_messages_out() -> (u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        wire::MESSAGES_OUT.load(Relaxed),
        wire::PLAIN_OUT.load(Relaxed),
        wire::PAYLOAD_OUT.load(Relaxed),
    )
}

/// Sync bytes (read, written) by this process so far.
pub fn wire_bytes() -> (u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (wire::BYTES_IN.load(Relaxed), wire::BYTES_OUT.load(Relaxed))
}

/// Pull requests this process sent, live pushes it took in place of a pull, and live pushes
/// it built from the changes in memory (no feed read).
static PULLS_SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PUSHES_TAKEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PUSHES_FROM_MEMORY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Documents a received page or push left incomplete (missing earlier changes) that we
/// fetched again: each costs a round trip.
static INCOMPLETE_FETCHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// (pulls sent, pushes taken, pushes built from memory, incomplete documents fetched) since
/// the process started.
pub fn pull_counts() -> (u64, u64, u64, u64) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        PULLS_SENT.load(Relaxed),
        PUSHES_TAKEN.load(Relaxed),
        PUSHES_FROM_MEMORY.load(Relaxed),
        INCOMPLETE_FETCHED.load(Relaxed),
    )
}

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour, SwarmEvent};
use libp2p::{
    identify, identity::Keypair, mdns, noise, ping, tcp, yamux, Multiaddr, PeerId, Swarm,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use crate::peer::PeerConfig;
use crate::repo::{Applied, RemoteDoc, Repo};
pub use wire::pb;

/// Commands queued to the network loop.
const COMMAND_QUEUE: usize = 64;
/// Results of repo work queued back to the loop.
const WORK_QUEUE: usize = 256;
/// How long a pull or fetch may take before it is abandoned (and retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections stay open while idle: peers sync continuously.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Redial and retry backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a peer dropped for misbehaving waits before we dial it again.
const MISBEHAVIOUR_PAUSE: Duration = Duration::from_secs(30);
/// Peer status counts waiting changes up to this many (each costs a metadata read, and
/// status is polled): "1000" reads "1,000 or more".
pub const WAITING_COUNT_MAX: u64 = 1_000;
/// How often mDNS asks the LAN who is there.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(5);
/// Documents whose stamps were too far ahead are retried after this long.
const DEFERRED_RETRY: Duration = Duration::from_secs(5);

#[derive(NetworkBehaviour)]
struct Behaviour {
    rr: request_response::Behaviour<wire::Codec>,
    /// Outbound only, on the deflate protocol alone, for peers that announced it (identify):
    /// with a single protocol to offer, the stream's negotiation is optimistic (`V1Lazy`) and
    /// the request goes out with it instead of a round trip later.
    rr_fast: request_response::Behaviour<wire::Codec>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
}

/// A peer as the status route shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerStatus {
    #[serde(flatten)]
    pub config: PeerConfig,
    pub connected: bool,
    /// Last sequence number of the peer's feed we have applied.
    pub checkpoint: Option<u64>,
    /// When a pull from this peer last reached the end of its feed with everything applied
    /// (RFC 3339), since this node started.
    pub last_sync: Option<String>,
    /// When the peer last pulled our feed to its end (RFC 3339), since this node started.
    pub last_sent: Option<String>,
    /// Our changes the peer has not pulled yet: documents changed after what we last served
    /// it, or (before it pulls again after our restart) after the end of the last page we
    /// served it, kept on disk; every document, if it never pulled. Counted up to
    /// [`WAITING_COUNT_MAX`] among the next ten times as many changes (a lower bound past
    /// them, see [`crate::store::Store::feed_count_since`]).
    pub waiting: u64,
    /// Items merged so far in the pull under way (progress of a long sync), 0 when idle.
    pub receiving: u64,
    /// What `waiting` is counted from (filled off the network loop), at least where the
    /// peer's last pull started on the feed we present to it (`incarnation`).
    #[serde(skip)]
    served_seq: u64,
    /// The peer's id as stored keys name it (its position on our feed, its tag).
    #[serde(skip)]
    peer_key: Vec<u8>,
    #[serde(skip)]
    incarnation: Uuid,
    #[serde(skip)]
    shared: Option<std::collections::HashSet<Uuid>>,
    /// Per tracker shared with the peer: when it was last synced from the peer (a pull moves
    /// every shared tracker at once, so they share `last_sync`).
    pub last_sync_by_tracker: std::collections::BTreeMap<String, Option<String>>,
    pub last_error: Option<String>,
}

/// What a one-shot sync did with one peer.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PeerSyncResult {
    pub peer: String,
    pub sent: u64,
    pub received: u64,
    pub conflicts: u64,
    /// Changes of the peer we did not apply: it may not make them (allowed operations).
    pub refused: u64,
    pub error: Option<String>,
}

/// The summary of a one-shot sync.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncSummary {
    pub sent: u64,
    pub received: u64,
    pub conflicts: u64,
    /// Peers the sync failed with (see `peers` for why).
    pub errors: u64,
    pub duration_ms: u64,
    /// The tracker the sync was asked for; counts cover every tracker shared with the peers.
    pub tracker: Option<String>,
    pub peers: Vec<PeerSyncResult>,
}

/// How long a one-shot sync waits for its peers (to connect, send and take changes).
const MANUAL_SYNC_TIMEOUT: Duration = Duration::from_secs(60);

/// A one-shot sync in progress: per peer, done once we pulled to the end of its feed and it
/// pulled ours up to where it stood when the sync began.
struct ManualSync {
    /// The tracker the user named (it is moved with every other shared tracker).
    tracker: Option<String>,
    time: chrono::DateTime<chrono::Utc>,
    started: Instant,
    targets: HashMap<PeerId, ManualTarget>,
    reply: Option<oneshot::Sender<Result<SyncSummary, String>>>,
}

struct ManualTarget {
    pull_done: bool,
    push_done: bool,
    /// Our last sequence number at the start: the peer has taken our changes once it pulled
    /// up to here.
    push_seq: u64,
    result: PeerSyncResult,
}

enum Command {
    AddPeer(PeerConfig, oneshot::Sender<Result<PeerConfig, String>>),
    Sync(
        Option<String>,
        Option<String>,
        oneshot::Sender<Result<SyncSummary, String>>,
    ),
    RemovePeer(String, oneshot::Sender<bool>),
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    ListenAddrs(oneshot::Sender<Vec<String>>),
    /// A bundle from this peer was imported: our checkpoint on its feed moved.
    CheckpointMoved(PeerId, Uuid, u64),
}

/// Cloneable handle to the network loop.
#[derive(Clone)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    repo: Arc<Repo>,
}

impl NetHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    pub async fn add_peer(&self, config: PeerConfig) -> Result<PeerConfig, String> {
        self.ask(|tx| Command::AddPeer(config, tx))
            .await
            .unwrap_or_else(|| Err("the network is shutting down".into()))
    }

    /// Sync now with one peer (or every peer), whatever their schedules; waits until done.
    /// `tracker`: a tracker that must be shared with the peer(s); the run still moves every
    /// shared tracker (sync follows the node's change feed, not one tracker's).
    pub async fn sync_now(
        &self,
        peer: Option<String>,
        tracker: Option<String>,
    ) -> Result<SyncSummary, String> {
        self.ask(|tx| Command::Sync(peer, tracker, tx))
            .await
            .unwrap_or_else(|| Err("the network loop stopped".into()))
    }

    pub async fn remove_peer(&self, peer_id: String) -> bool {
        self.ask(|tx| Command::RemovePeer(peer_id, tx))
            .await
            .unwrap_or(false)
    }

    pub async fn peers(&self) -> Vec<PeerStatus> {
        let list = self.ask(Command::Peers).await.unwrap_or_default();
        // Counting waiting changes reads the store: off the network loop.
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || {
            let mut list = list;
            let store = repo.store();
            for p in &mut list {
                // After a restart nothing was served yet, but the peer's last pull (recorded
                // on disk) says what it holds: counting from 0 would read the metadata of up
                // to ten thousand documents it already has, and delay the first status. Where
                // its last pull started would count that pull's page again (a catch-up of
                // 1,000 documents: 10 ms), so where that page ended is kept too.
                let ours = p.incarnation;
                let position = |at: crate::store::Result<Option<(Uuid, u64)>>| match at {
                    Ok(Some((incarnation, seq))) if incarnation == ours => seq,
                    _ => 0,
                };
                let holds = position(store.peer_has(&p.peer_key))
                    .max(position(store.peer_served(&p.peer_key)));
                p.waiting = store
                    .feed_count_since(
                        p.served_seq.max(holds),
                        WAITING_COUNT_MAX,
                        crate::store::peer_tag(&p.peer_key),
                        p.shared.as_ref(),
                    )
                    .unwrap_or(0);
            }
            list
        })
        .await
        .unwrap_or_default()
    }

    /// A bundle import moved our checkpoint on `peer`'s feed: pull from there next.
    pub async fn checkpoint_moved(&self, peer: PeerId, incarnation: Uuid, seq: u64) {
        let _ = self
            .tx
            .send(Command::CheckpointMoved(peer, incarnation, seq))
            .await;
    }

    pub async fn listen_addrs(&self) -> Vec<String> {
        self.ask(Command::ListenAddrs).await.unwrap_or_default()
    }
}

pub struct Net {
    pub handle: NetHandle,
    task: JoinHandle<()>,
}

impl Net {
    pub async fn start(
        keypair: Keypair,
        listen: &[Multiaddr],
        mdns_on: bool,
        join_key: Option<&str>,
        repo: Arc<Repo>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Net> {
        let peer_id = keypair.public().to_peer_id();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .context("cannot set up TCP transport")?
            .with_behaviour(|key| {
                let rr_config = || {
                    request_response::Config::default()
                        .with_request_timeout(REQUEST_TIMEOUT)
                        .with_max_concurrent_streams(64)
                };
                let rr = request_response::Behaviour::with_codec(
                    wire::Codec,
                    [
                        (wire::PROTOCOL_DEFLATE, ProtocolSupport::Full),
                        (wire::PROTOCOL, ProtocolSupport::Full),
                    ],
                    rr_config(),
                );
                let rr_fast = request_response::Behaviour::with_codec(
                    wire::Codec,
                    [(wire::PROTOCOL_DEFLATE, ProtocolSupport::Outbound)],
                    rr_config(),
                );
                let mdns = if mdns_on {
                    // Ask again every few seconds (libp2p's default is 5 minutes): a node
                    // that missed the first answers, on a busy or lossy LAN, still finds its
                    // peers promptly.
                    Some(mdns::tokio::Behaviour::new(
                        mdns::Config {
                            query_interval: MDNS_QUERY_INTERVAL,
                            ..mdns::Config::default()
                        },
                        peer_id,
                    )?)
                } else {
                    None
                };
                Ok(Behaviour {
                    rr,
                    rr_fast,
                    identify: identify::Behaviour::new(identify::Config::new(
                        "/trackersync/1".into(),
                        key.public(),
                    )),
                    ping: ping::Behaviour::new(ping::Config::new()),
                    mdns: Toggle::from(mdns),
                })
            })
            .map_err(|e| anyhow::anyhow!("cannot set up the network behaviour: {e}"))?
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(IDLE_TIMEOUT)
                    // The dialer of a stream sends its data right after the protocol it
                    // proposes when it offers only one (`rr_fast`, identify, ping). With
                    // several (`rr`) it still waits for the answer to each but the last.
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
            })
            .build();
        for addr in listen {
            swarm
                .listen_on(addr.clone())
                .with_context(|| format!("cannot listen on {addr}"))?;
        }
        let mut peers = HashMap::new();
        for raw in repo.store().peers()? {
            match serde_json::from_slice::<PeerConfig>(&raw) {
                Ok(c) => match c.peer_id.parse::<PeerId>() {
                    Ok(id) => {
                        for a in &c.addrs {
                            if let Ok(m) = a.parse::<Multiaddr>() {
                                swarm.add_peer_address(id, m);
                            }
                        }
                        peers.insert(id, PeerState::new(c));
                    }
                    Err(e) => {
                        tracing::error!(peer = %c.peer_id, error = %e, "stored peer has a bad id; ignored")
                    }
                },
                Err(e) => {
                    tracing::error!(error = %e, "stored peer configuration unreadable; ignored")
                }
            }
        }
        let (tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (work_tx, work_rx) = mpsc::channel(WORK_QUEUE);
        let changes = repo.watch_changes();
        let handle_repo = repo.clone();
        let mut event_loop = EventLoop {
            swarm,
            repo,
            peers,
            connected: HashSet::new(),
            outbound: HashMap::new(),
            deflate_peers: HashSet::new(),
            commands,
            work_tx,
            work_rx,
            helper: Helper::start().context("cannot start the page-apply thread")?,
            changes,
            listen_addrs: Vec::new(),
            discovered: HashMap::new(),
            redial: HashMap::new(),
            join_key: join_key.map(|k| blake3::derive_key(JOIN_CONTEXT, k.as_bytes())),
            manual: Vec::new(),
            unauthorized: (0, None),
        };
        // Dial every known peer at start-up.
        let now = Instant::now();
        for state in event_loop.peers.values_mut() {
            state.retry_at = Some(now);
        }
        let task = tokio::spawn(
            async move { event_loop.run(shutdown).await }
                .instrument(tracing::info_span!("net", %peer_id)),
        );
        Ok(Net {
            handle: NetHandle {
                tx,
                repo: handle_repo,
            },
            task,
        })
    }

    pub async fn shutdown(self) {
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "network task panicked");
        }
    }
}

/// Sync bookkeeping for one authorized peer.
struct PeerState {
    config: PeerConfig,
    /// A pull request is on the wire.
    pull_in_flight: bool,
    pull_again: bool,
    /// A page is being applied (or completed by a fetch). Pulls are pipelined: the next page
    /// is requested while this one applies, and waits in `queued`; pages apply in order.
    applying: bool,
    queued: Option<(PullPage, Vec<RemoteDoc>)>,
    /// The peer said more pages follow its last reply.
    more: bool,
    /// Where the next pull starts: (peer's store incarnation, sequence number). Ahead of the
    /// durable checkpoint while pages are queued or applying.
    cursor: Option<(Uuid, u64)>,
    /// Where the current run of pages began (`Pull.base`): kept while the peer says more
    /// pages follow, so a page asks for each document's changes since then.
    pull_base: Option<(Uuid, u64)>,
    /// Bumped whenever `cursor` is reset; replies to older pulls are discarded.
    epoch: u64,
    recon: Option<Recon>,
    /// A scheduled or one-shot run is under way (peers not on `continuous` sync only then).
    run_active: bool,
    /// When the next scheduled run is due (interval schedules).
    next_run: Option<Instant>,
    /// When a read-only refusal was last logged.
    refusal_logged: Option<Instant>,
    /// When the peer's clock skew (changes deferred) was last logged.
    skew_logged: Option<Instant>,
    /// The session pulling this peer's changes, and the one serving it ours.
    pulling: Option<Session>,
    serving: Option<Session>,
    notify_in_flight: bool,
    notify_again: bool,
    /// When to dial or pull again (after a failure, or for deferred documents).
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Last checkpoint reached: every page up to it is applied and durable.
    checkpoint: Option<(Uuid, u64)>,
    last_sync: Option<chrono::DateTime<chrono::Utc>>,
    /// Our feed as far as we served it to the peer, and when it last reached the end.
    served_seq: u64,
    /// Where the peer's cursor on our feed stands as far as we know: the end of the last page
    /// or push we sent it. Behind `served_seq` only by pushes left unsent because they
    /// carried nothing the peer lacks (its own changes coming back).
    told_seq: u64,
    /// The peer's own share policy, from its last pull (what our pushes to it carry).
    wanted: Option<Vec<String>>,
    last_sent: Option<chrono::DateTime<chrono::Utc>>,
    last_error: Option<String>,
    /// Cut off (`EventLoop::cut_off`): not dialed before this, and the reason stays in
    /// `last_error` (the failures its disconnection causes do not replace it).
    paused_until: Option<Instant>,
}

impl PeerState {
    fn new(config: PeerConfig) -> Self {
        PeerState {
            config,
            pull_in_flight: false,
            pull_again: false,
            applying: false,
            queued: None,
            more: false,
            cursor: None,
            pull_base: None,
            epoch: 0,
            recon: None,
            run_active: false,
            next_run: None,
            refusal_logged: None,
            skew_logged: None,
            pulling: None,
            serving: None,
            notify_in_flight: false,
            notify_again: false,
            retry_at: None,
            backoff: BACKOFF_MIN,
            checkpoint: None,
            last_sync: None,
            served_seq: 0,
            told_seq: 0,
            wanted: None,
            last_sent: None,
            last_error: None,
            paused_until: None,
        }
    }

    /// Whether the peer is paused after being cut off.
    fn paused(&self) -> bool {
        self.paused_until.is_some_and(|t| t > Instant::now())
    }

    /// Forget pipelined work: the next pull starts again from the last checkpoint reached.
    fn reset_pull(&mut self) {
        self.epoch += 1;
        self.queued = None;
        self.cursor = self.checkpoint;
        self.pull_in_flight = false;
        self.recon = None;
    }
}

/// A page that applied at least this many documents has its checkpoint flushed at once.
const CHECKPOINT_FLUSH_ITEMS: usize = 64;

/// A pull in progress: the page being applied, waiting for a fetch of incomplete documents.
struct PullPage {
    incarnation: Uuid,
    last_seq: u64,
    /// Lowest sender sequence number that could not be applied (the checkpoint stops below it).
    blocked_from: Option<u64>,
    started: Instant,
    received: usize,
    /// Automerge bytes the page carried (before any fetch).
    bytes: usize,
    seqs: HashMap<Uuid, u64>,
    /// Documents a reconciliation found to differ (no checkpoint to move on their own).
    reconcile: bool,
}

/// A sync session with one peer in one direction, accumulated for the sync log.
struct Session {
    time: chrono::DateTime<chrono::Utc>,
    started: Instant,
    items: u64,
    conflicts: u64,
    /// Changes not applied because the peer may not make them (allowed operations).
    refused: u64,
    refusal: Option<String>,
    trigger: &'static str,
}

impl Session {
    fn new(trigger: &'static str) -> Session {
        Session {
            time: chrono::Utc::now(),
            started: Instant::now(),
            items: 0,
            conflicts: 0,
            refused: 0,
            refusal: None,
            trigger,
        }
    }
}

/// A reconciliation by range fingerprints in progress with one peer (see `reconcile`).
struct Recon {
    /// The peer's incarnation and last sequence number at its first answer: our checkpoint
    /// once every differing document is applied.
    at: Option<(Uuid, u64)>,
    pending: Vec<reconcile::IdRange>,
    wanted: Vec<Uuid>,
    rounds: u32,
    started: Instant,
    fetched: usize,
}

/// Reconciliation rounds before we give up and pull the peer's whole feed instead (an honest
/// peer needs a handful per `reconcile::MAX_RANGES` differing ranges).
const MAX_RECON_ROUNDS: u32 = 10_000;

/// Our requests in flight (the peer comes with the response event).
enum Outbound {
    /// Sent at, and the peer's pull epoch then.
    Pull(Instant, u64),
    Fetch(PullPage, Fetched),
    Reconcile(u64),
    Notify,
    /// A notify carrying a push: the last sequence number and the documents it covers.
    Push(u64, u64),
    Join,
}

/// Which fetch a page's documents came from. A fetch names our heads and asks for what we
/// lack; a peer that does not know all of them (we hold changes it lacks) answers with its
/// heads only. If we lack some of those, the next fetch asks for the whole document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fetched {
    /// A pulled page or push: not from a fetch.
    No,
    /// A fetch naming our heads.
    Diff,
    /// A fetch for whole documents.
    Whole,
}

/// A live push carries at most this many documents and bytes; more is left to a pull.
const PUSH_MAX_ENTRIES: usize = 64;
const PUSH_MAX_BYTES: usize = 256 * 1024;

enum Work {
    Respond(ResponseChannel<pb::Response>, pb::Response),
    Applied(
        PeerId,
        PullPage,
        Result<Vec<(Uuid, u64, Applied)>, String>,
        Fetched,
    ),
    Compared(PeerId, u64, Result<reconcile::Outcome, wire::WireError>),
    /// We served a pull: entries sent, whether more follow, the page's last sequence number.
    Served(PeerId, u64, bool, u64),
    /// A live push read from the feed: (peer, since, incarnation, entries, last seq, more).
    Push(PeerId, u64, Uuid, Vec<RemoteDoc>, u64, bool),
}

type Job = Box<dyn FnOnce() + Send>;

/// One long-lived thread that applies half of each large received page while the blocking
/// thread that received it applies the other half. A thread spawned per page (as before)
/// started a fresh allocator heap each time and left its partly used pages behind when it
/// ended (see `BLOCKING_THREADS` in `main.rs`). Pages from several peers queue here; a job
/// waits for nothing but slot locks, which a caller never holds while it waits for its half,
/// so the queue cannot deadlock.
#[derive(Clone)]
struct Helper(std::sync::mpsc::Sender<Job>);

impl Helper {
    fn start() -> std::io::Result<Helper> {
        let (tx, jobs) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("page-apply".into())
            .spawn(move || {
                for job in jobs {
                    // A job that panics drops its result sender: its caller sees the failure.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })?;
        Ok(Helper(tx))
    }

    /// Run `there` on the helper thread while this thread runs `here`; `None` if `there`
    /// panicked.
    fn join<A: Send + 'static, B>(
        &self,
        there: impl FnOnce() -> A + Send + 'static,
        here: impl FnOnce() -> B,
    ) -> (Option<A>, B) {
        let (done, result) = std::sync::mpsc::sync_channel(1);
        let job: Job = Box::new(move || {
            let _ = done.send(there());
        });
        // The thread only ends with the node; if it is gone, run the job here afterwards.
        let left = self.0.send(job).err().map(|e| e.0);
        let b = here();
        if let Some(job) = left {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        }
        (result.recv().ok(), b)
    }
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    repo: Arc<Repo>,
    peers: HashMap<PeerId, PeerState>,
    connected: HashSet<PeerId>,
    /// Requests in flight, by the behaviour that sent them (`true`: `rr_fast`) and its id.
    outbound: HashMap<(bool, OutboundRequestId), Outbound>,
    /// Connected peers that announced the deflate protocol (identify).
    deflate_peers: HashSet<PeerId>,
    commands: mpsc::Receiver<Command>,
    work_tx: mpsc::Sender<Work>,
    work_rx: mpsc::Receiver<Work>,
    /// Applies the second half of large received pages.
    helper: Helper,
    changes: watch::Receiver<u64>,
    listen_addrs: Vec<Multiaddr>,
    /// Addresses mDNS found for peers not (yet) authorized, so `peer add <PeerId>` can use them.
    discovered: HashMap<PeerId, Vec<Multiaddr>>,
    /// Discovered peers to dial again (join key set) after a failed dial: when, and the
    /// delay used. mDNS reports a peer once, so a failed first dial must be retried here.
    redial: HashMap<PeerId, (Instant, Duration)>,
    /// Key derived from the deployment's join key: peers proving it are authorized.
    join_key: Option<[u8; 32]>,
    manual: Vec<ManualSync>,
    /// Connections from unauthorized peers closed since the last warning, and when it was.
    unauthorized: (u64, Option<Instant>),
}

/// BLAKE3 key-derivation context for join keys (fixed forever: changing it splits deployments).
const JOIN_CONTEXT: &str = "trackersync 2026-11-22 network join key v1";

/// A dial to a discovered peer at its known addresses, from a fresh port. Not from the
/// listening port (libp2p's default): two nodes that discover each other at the same moment
/// dial each other at once, and two dials between the same two ports are one TCP
/// simultaneous open, on which both sides start Noise as the initiator and fail.
fn dial_discovered(
    peer: &PeerId,
    addrs: Option<&Vec<Multiaddr>>,
) -> libp2p::swarm::dial_opts::DialOpts {
    libp2p::swarm::dial_opts::DialOpts::peer_id(*peer)
        .addresses(addrs.cloned().unwrap_or_default())
        .allocate_new_port()
        .build()
}

/// Most not-yet-authorized peers whose mDNS addresses we remember.
const DISCOVERED_MAX: usize = 256;

/// A frame that did not decode (bad protobuf, or over the size limit: `wire::Codec` reports
/// both as `InvalidData`): the peer misbehaves. Timeouts and closed connections are not its
/// fault.
fn garbled_io(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidData
}

fn refused(reason: &str) -> pb::Response {
    pb::Response {
        version: wire::VERSION,
        body: Some(pb::response::Body::Refused(pb::Refused {
            reason: reason.into(),
        })),
    }
}

impl EventLoop {
    /// Proof that `from` holds the join key, addressed to `to`.
    fn join_proof(&self, from: &PeerId, to: &PeerId) -> Option<blake3::Hash> {
        let key = self.join_key.as_ref()?;
        let mut h = blake3::Hasher::new_keyed(key);
        h.update(&from.to_bytes());
        h.update(&to.to_bytes());
        Some(h.finalize())
    }

    fn send_join(&mut self, peer: PeerId) {
        let Some(proof) = self.join_proof(self.swarm.local_peer_id(), &peer) else {
            return;
        };
        let req = pb::Request {
            version: wire::VERSION,
            body: Some(pb::request::Body::Join(pb::Join {
                proof: proof.as_bytes().to_vec(),
            })),
        };
        let id = self.request(peer, req);
        self.outbound.insert(id, Outbound::Join);
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            // Local work first: commands and finished repo work before remote input.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => break,
                Some(cmd) = self.commands.recv() => self.on_command(cmd),
                Some(work) = self.work_rx.recv() => self.on_work(work),
                Ok(()) = self.changes.changed() => self.notify_all(),
                event = self.swarm.select_next_some() => self.on_swarm(event),
                _ = tick.tick() => self.on_tick(),
            }
        }
        tracing::info!("network stopped");
    }

    /// The trackers shared with a peer (see [`PeerConfig::shared`]); `None` when all are.
    fn shared(&self, peer: &PeerId) -> Option<std::collections::HashSet<Uuid>> {
        self.peers.get(peer)?.config.shared(&self.repo.trackers())
    }

    /// The store incarnation we present to a peer (see [`PeerConfig::served_incarnation`]).
    fn served_incarnation(&self, peer: &PeerId) -> Uuid {
        let ours = self.repo.store().incarnation();
        self.peers
            .get(peer)
            .map_or(ours, |s| s.config.served_incarnation(ours))
    }

    fn authorized(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::AddPeer(config, reply) => {
                let _ = reply.send(self.add_peer(config));
            }
            Command::RemovePeer(id, reply) => {
                let removed = match id.parse::<PeerId>() {
                    Ok(peer) => {
                        let existed = self.peers.remove(&peer).is_some();
                        self.deflate_peers.remove(&peer);
                        if let Err(e) = self.repo.store().remove_peer(&id) {
                            tracing::error!(error = %e, "cannot remove peer from the store");
                        }
                        // Meeting it again is a first contact (reconciled by summaries).
                        if let Err(e) = self.repo.store().remove_checkpoint(&peer.to_bytes()) {
                            tracing::error!(error = %e, "cannot remove the peer's checkpoint");
                        }
                        // Revocation takes effect at once.
                        let _ = self.swarm.disconnect_peer_id(peer);
                        existed
                    }
                    Err(_) => false,
                };
                let _ = reply.send(removed);
            }
            Command::Sync(peer, tracker, reply) => self.start_manual_sync(peer, tracker, reply),
            Command::Peers(reply) => {
                let trackers = self.repo.trackers();
                let shared: HashMap<PeerId, Option<std::collections::HashSet<Uuid>>> =
                    self.peers.keys().map(|p| (*p, self.shared(p))).collect();
                let mut out: Vec<PeerStatus> = self
                    .peers
                    .iter()
                    .map(|(id, s)| PeerStatus {
                        config: s.config.clone(),
                        connected: self.connected.contains(id),
                        checkpoint: s.checkpoint.map(|c| c.1),
                        last_sync: s
                            .last_sync
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                        last_sent: s
                            .last_sent
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
                        waiting: 0,
                        served_seq: s.served_seq,
                        peer_key: id.to_bytes(),
                        incarnation: self.served_incarnation(id),
                        shared: shared.get(id).cloned().flatten(),
                        receiving: s.pulling.as_ref().map_or(0, |p| p.items),
                        last_sync_by_tracker: trackers
                            .iter()
                            .filter(|t| {
                                s.config.trackers.as_ref().is_none_or(|names| {
                                    names.iter().any(|n| *n == t.name || *n == t.id.to_string())
                                })
                            })
                            .map(|t| {
                                (
                                    t.name.clone(),
                                    s.last_sync.map(|x| {
                                        x.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                                    }),
                                )
                            })
                            .collect(),
                        last_error: s.last_error.clone(),
                    })
                    .collect();
                out.sort_by(|a, b| a.config.peer_id.cmp(&b.config.peer_id));
                let _ = reply.send(out);
            }
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.listen_addrs.iter().map(|a| a.to_string()).collect());
            }
            Command::CheckpointMoved(peer, incarnation, seq) => {
                if let Some(s) = self.peers.get_mut(&peer) {
                    let behind = match s.checkpoint {
                        Some((inc, at)) => inc != incarnation || at < seq,
                        None => true,
                    };
                    // Mid-pull, the pipeline's own checkpoint wins; the next pull after it
                    // finds the bundle's documents unchanged.
                    let idle =
                        !s.pull_in_flight && !s.applying && s.queued.is_none() && s.recon.is_none();
                    if behind && idle {
                        s.checkpoint = Some((incarnation, seq));
                        s.cursor = s.checkpoint;
                        s.epoch += 1;
                    }
                }
            }
        }
    }

    fn add_peer(&mut self, mut config: PeerConfig) -> Result<PeerConfig, String> {
        config.validate()?;
        let peer: PeerId = config
            .peer_id
            .parse()
            .map_err(|_| format!("{:?} is not a PeerId", config.peer_id))?;
        if peer == *self.swarm.local_peer_id() {
            return Err("that is this node's own PeerId".into());
        }
        for a in &config.addrs {
            let m: Multiaddr = a.parse().map_err(|_| format!("{a:?} is not a multiaddr"))?;
            self.swarm.add_peer_address(peer, m);
        }
        self.redial.remove(&peer);
        for m in self.discovered.remove(&peer).unwrap_or_default() {
            self.swarm.add_peer_address(peer, m.clone());
            let a = m.to_string();
            if !config.addrs.contains(&a) {
                config.addrs.push(a);
            }
        }
        if let Some(existing) = self.peers.get(&peer) {
            for a in &existing.config.addrs {
                if !config.addrs.contains(a) {
                    config.addrs.push(a.clone());
                }
            }
        }
        let json = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
        self.repo
            .store()
            .put_peer(&config.peer_id, &json)
            .map_err(|e| e.to_string())?;
        let state = self
            .peers
            .entry(peer)
            .or_insert_with(|| PeerState::new(config.clone()));
        let policy_changed = state.config.trackers != config.trackers;
        if policy_changed {
            // We may have passed over documents of a tracker that is shared now: forget our
            // checkpoint, so the next pull reconciles and back-fills it. (The peer's own
            // checkpoint on us lapses too: see `served_incarnation`.)
            if let Err(e) = self.repo.store().remove_checkpoint(&peer.to_bytes()) {
                tracing::error!(error = %e, "cannot reset the peer's checkpoint");
            }
            state.checkpoint = None;
            state.reset_pull();
            state.cursor = None;
        }
        state.config = config.clone();
        // A new schedule starts counting from its last run.
        state.next_run = None;
        if self.connected.contains(&peer) {
            if policy_changed {
                // Its checkpoint on us lapsed with the policy: have it pull now.
                self.send_notify(peer, self.repo.store().last_seq(), false);
            }
            self.start_pull(peer);
        } else if !config.addrs.is_empty() {
            // Now, not at the next tick (up to 250 ms away).
            if let Err(e) = self.dial_peer(peer) {
                tracing::debug!(%peer, error = %e, "dial failed");
                self.backoff(peer, &e.to_string());
            }
        }
        Ok(config)
    }

    fn on_tick(&mut self) {
        if !self.manual.is_empty() {
            self.finish_manual();
        }
        self.run_schedules();
        let now = Instant::now();
        let redial: Vec<PeerId> = self
            .redial
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(p, _)| *p)
            .collect();
        for peer in redial {
            if let Some((at, _)) = self.redial.get_mut(&peer) {
                // Kept (with its delay) until a connection is made, to back off further.
                *at = now + BACKOFF_MAX * 12;
            }
            if !self.swarm.is_connected(&peer) && !self.peers.contains_key(&peer) {
                let _ = self
                    .swarm
                    .dial(dial_discovered(&peer, self.discovered.get(&peer)));
            }
        }
        let due: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, s)| s.retry_at.is_some_and(|t| t <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            if let Some(s) = self.peers.get_mut(&peer) {
                s.retry_at = None;
            }
            if self.connected.contains(&peer) {
                self.start_pull(peer);
            } else if let Err(e) = self.dial_peer(peer) {
                tracing::debug!(%peer, error = %e, "dial failed");
                self.backoff(peer, &e.to_string());
            }
        }
    }

    /// Dial a configured peer at its configured (and learned) addresses. Not the swarm's
    /// address cache alone: libp2p drops an address from it on every failed dial, so a peer
    /// that was unreachable once would never be dialed again.
    fn dial_peer(&mut self, peer: PeerId) -> Result<(), libp2p::swarm::DialError> {
        let addrs: Vec<Multiaddr> = self
            .peers
            .get(&peer)
            .map(|s| {
                s.config
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        match self.swarm.dial(
            libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .allocate_new_port()
                .build(),
        ) {
            // Connected already, or a dial is under way: the connection is what we want.
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => Ok(()),
            other => other,
        }
    }

    fn backoff(&mut self, peer: PeerId, error: &str) {
        if let Some(s) = self.peers.get_mut(&peer).filter(|s| !s.paused()) {
            s.retry_at = Some(Instant::now() + s.backoff);
            s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
            s.last_error = Some(error.to_string());
        }
        self.end_session_with_error(peer, error, false);
    }

    /// Close the peer's pull session (if one is open) as failed, in the log.
    fn end_session_with_error(&mut self, peer: PeerId, error: &str, remote: bool) {
        self.manual_error(peer, error);
        self.finish_manual();
        if let Some(sess) = self.peers.get_mut(&peer).and_then(|s| s.pulling.take()) {
            self.log_session(peer, "received", sess, Some((error, remote)));
        }
    }

    /// Write a finished session to the sync log (off the loop).
    fn log_session(
        &mut self,
        peer: PeerId,
        direction: &str,
        sess: Session,
        error: Option<(&str, bool)>,
    ) {
        let Some(s) = self.peers.get(&peer) else {
            return;
        };
        let entry = crate::synclog::LogEntry {
            sent: if direction == "sent" { sess.items } else { 0 },
            received: if direction == "received" {
                sess.items
            } else {
                0
            },
            conflicts: sess.conflicts,
            refused: sess.refused,
            result: if error.is_some() { "error" } else { "ok" }.to_string(),
            remote_error: error.is_some_and(|(_, remote)| remote),
            message: match error {
                Some((e, _)) => e.to_string(),
                None if direction == "sent" => format!("{} items sent", sess.items),
                None => match &sess.refusal {
                    Some(why) => format!(
                        "{} items received; {} changes refused (last: {why})",
                        sess.items, sess.refused
                    ),
                    None => format!("{} items received", sess.items),
                },
            },
            duration_ms: sess.started.elapsed().as_millis() as u64,
            ..crate::synclog::LogEntry::new(
                sess.time,
                peer.to_string(),
                &s.config,
                direction,
                sess.trigger,
            )
        };
        self.write_log(entry);
    }

    /// A read-only peer announced changes: we do not take them. Logged at most once a minute
    /// per peer, so the log shows it without filling up.
    fn log_read_only_refusal(&mut self, peer: PeerId) {
        let Some(s) = self.peers.get_mut(&peer) else {
            return;
        };
        if s.refusal_logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        s.refusal_logged = Some(Instant::now());
        let entry = crate::synclog::LogEntry {
            refused: 1,
            result: "refused".into(),
            message: "the peer is read-only here: its changes are not taken".into(),
            ..crate::synclog::LogEntry::new(
                chrono::Utc::now(),
                peer.to_string(),
                &s.config,
                "received",
                "peer",
            )
        };
        self.write_log(entry);
    }

    /// A peer sent changes stamped further ahead of our clock than the allowed drift: they
    /// wait (nothing else does). Flag it in the peer's status and, once a minute at most,
    /// in the sync log.
    fn flag_clock_skew(&mut self, peer: PeerId, why: &str) {
        let Some(s) = self.peers.get_mut(&peer) else {
            return;
        };
        s.last_error = Some(format!(
            "clock skew: its changes are stamped ahead of our clock and wait until our clock reaches them ({why})"
        ));
        if s.skew_logged
            .is_some_and(|t| t.elapsed() < Duration::from_secs(60))
        {
            return;
        }
        s.skew_logged = Some(Instant::now());
        let entry = crate::synclog::LogEntry {
            result: "error".into(),
            remote_error: true,
            message: format!(
                "clock skew: the peer's changes are stamped too far ahead and wait ({why})"
            ),
            ..crate::synclog::LogEntry::new(
                chrono::Utc::now(),
                peer.to_string(),
                &s.config,
                "received",
                "continuous",
            )
        };
        self.write_log(entry);
    }

    /// Append to the sync log. Inline: a sled insert without a flush takes microseconds, and
    /// an entry is then in place before the one-shot sync that produced it answers.
    fn write_log(&self, entry: crate::synclog::LogEntry) {
        let bytes = serde_json::to_vec(&entry).expect("log entry serializes");
        if let Err(e) = self.repo.store().append_log(&bytes) {
            tracing::error!(error = %e, "cannot write the sync log");
        }
    }

    fn notify_all(&mut self) {
        let seq = *self.changes.borrow_and_update();
        let targets: Vec<PeerId> = self
            .connected
            .iter()
            .filter(|p| {
                self.peers
                    .get(p)
                    .is_some_and(|s| s.config.pushes() && (s.config.continuous() || s.run_active))
            })
            .copied()
            .collect();
        for peer in targets {
            let Some(s) = self.peers.get_mut(&peer) else {
                continue;
            };
            if s.notify_in_flight {
                s.notify_again = true;
                continue;
            }
            s.notify_in_flight = true;
            self.push_or_notify(peer, seq);
        }
    }

    /// Live sync: send a peer that pulled from us before what its next pull would get, with the
    /// notify (it takes it as that pull's page when its cursor is where the push starts),
    /// unless that is more than a small page; then a plain notify.
    fn push_or_notify(&mut self, peer: PeerId, seq: u64) {
        let Some(s) = self.peers.get(&peer) else {
            return;
        };
        let since = s.served_seq;
        if since == 0 {
            let run = self.run_owed(&peer);
            return self.send_notify(peer, seq, run);
        }
        let incarnation = self.served_incarnation(&peer);
        let mut shared = self.shared(&peer);
        if let Some(names) = s.wanted.clone() {
            let wanted = PeerConfig {
                trackers: Some(names),
                ..PeerConfig::new(String::new())
            }
            .shared(&self.repo.trackers())
            .unwrap_or_default();
            shared = Some(match shared {
                None => wanted,
                Some(s) => s.intersection(&wanted).copied().collect(),
            });
        }
        let tag = crate::store::peer_tag(&peer.to_bytes());
        // The usual live case: the changes since are still in memory.
        if let Some((docs, last, more)) = self.repo.feed_recent(
            since,
            PUSH_MAX_ENTRIES,
            PUSH_MAX_BYTES,
            tag,
            shared.as_ref(),
        ) {
            PUSHES_FROM_MEMORY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return self.on_work(Work::Push(peer, since, incarnation, docs, last, more));
        }
        let (repo, work) = (self.repo.clone(), self.work_tx.clone());
        tokio::task::spawn_blocking(move || {
            // A push continues where the peer's cursor stands (a fetch fills any gap).
            let push = match repo.feed_shared(
                since,
                since,
                PUSH_MAX_ENTRIES,
                PUSH_MAX_BYTES,
                tag,
                shared.as_ref(),
            ) {
                Ok((docs, last, more)) => Work::Push(peer, since, incarnation, docs, last, more),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the change feed");
                    Work::Push(peer, since, incarnation, Vec::new(), seq, true)
                }
            };
            let _ = work.blocking_send(push);
        });
    }

    /// A live push from a peer: taken as the page of the pull it saves when our cursor on the
    /// peer's feed is exactly where it starts and no pull is under way. Returns false when
    /// not taken (the caller pulls instead).
    fn take_push(&mut self, peer: PeerId, notify: pb::Notify) -> bool {
        let Some(s) = self.peers.get_mut(&peer) else {
            return false;
        };
        if !notify.push
            || !s.config.pulls()
            || !(s.config.continuous() || s.run_active)
            || s.pull_in_flight
            || s.queued.is_some()
            || s.recon.is_some()
            || notify.seq < notify.since
        {
            return false;
        }
        let Ok(incarnation) = wire::uuid(&notify.incarnation, "incarnation") else {
            return false;
        };
        if s.cursor != Some((incarnation, notify.since)) {
            return false;
        }
        let mut docs = Vec::with_capacity(notify.entries.len());
        for e in notify.entries {
            match wire::doc_from_wire(e) {
                Ok(d) if d.seq > notify.since && d.seq <= notify.seq => docs.push(d),
                Ok(_) => {
                    self.drop_peer(peer, "a pushed document lies outside the push's range");
                    return true;
                }
                Err(e) => {
                    self.drop_peer(peer, &e.to_string());
                    return true;
                }
            }
        }
        let page = PullPage {
            incarnation,
            last_seq: notify.seq,
            blocked_from: None,
            started: Instant::now(),
            received: docs.len(),
            bytes: docs.iter().map(|d| d.data.len()).sum(),
            seqs: docs.iter().map(|d| (d.id, d.seq)).collect(),
            reconcile: false,
        };
        let trigger = if s.config.continuous() {
            "continuous"
        } else {
            "scheduled"
        };
        s.pulling.get_or_insert_with(|| Session::new(trigger));
        s.more = false;
        s.cursor = Some((incarnation, notify.seq));
        PUSHES_TAKEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if s.applying {
            s.queued = Some((page, docs));
        } else {
            s.applying = true;
            self.apply(peer, page, docs, Fetched::No);
        }
        true
    }

    /// Tell a peer our feed reached `seq` (it pulls when it may); `run` asks it to pull now
    /// whatever its schedule (a one-shot sync).
    fn send_notify(&mut self, peer: PeerId, seq: u64, run: bool) {
        let req = pb::Request {
            version: wire::VERSION,
            body: Some(pb::request::Body::Notify(pb::Notify {
                seq,
                run,
                ..Default::default()
            })),
        };
        let id = self.request(peer, req);
        self.outbound.insert(id, Outbound::Notify);
    }

    fn start_pull(&mut self, peer: PeerId) {
        let Some(s) = self.peers.get_mut(&peer) else {
            return;
        };
        if !s.config.pulls() {
            return;
        }
        // Peers on a schedule (or `manual`) are pulled only during a run; news waits for it.
        if !s.config.continuous() && !s.run_active {
            s.pull_again = true;
            return;
        }
        // One request on the wire and at most one page waiting behind the one applying.
        if s.pull_in_flight || s.queued.is_some() || s.recon.is_some() {
            s.pull_again = true;
            return;
        }
        let (incarnation, since) = match s.cursor {
            Some((inc, seq)) => (inc.as_bytes().to_vec(), seq),
            None => match self.repo.store().checkpoint(&peer.to_bytes()) {
                Ok(Some((inc, seq))) => {
                    s.checkpoint = Some((inc, seq));
                    s.cursor = Some((inc, seq));
                    (inc.as_bytes().to_vec(), seq)
                }
                Ok(None) if self.repo.store().last_seq() > 0 && s.config.trackers.is_none() => {
                    // First contact, and we hold documents already: reconcile by summaries
                    // rather than pull everything the peer has. (With a share policy we pull
                    // instead: a pull is filtered by our policy, summaries are not.)
                    s.recon = Some(Recon {
                        at: None,
                        pending: vec![reconcile::IdRange::ALL],
                        wanted: Vec::new(),
                        rounds: 0,
                        started: Instant::now(),
                        fetched: 0,
                    });
                    s.pull_again = false;
                    return self.send_reconcile(peer);
                }
                Ok(None) => (Vec::new(), 0),
                Err(e) => {
                    tracing::error!(%peer, error = %e, "cannot read checkpoint; pulling from the start");
                    (Vec::new(), 0)
                }
            },
        };
        // A run of pages keeps the base it began with (0 holds for any incarnation: a first
        // pull names none); a new run begins where the cursor is.
        let at = Uuid::from_slice(&incarnation).unwrap_or(Uuid::nil());
        let base = match s.pull_base {
            Some((inc, b)) if s.more && b <= since && (b == 0 || inc == at) => b,
            _ => since,
        };
        s.pull_base = Some((at, base));
        s.pull_in_flight = true;
        s.pull_again = false;
        let trigger = if s.config.continuous() {
            "continuous"
        } else {
            "scheduled"
        };
        s.pulling.get_or_insert_with(|| Session::new(trigger));
        let epoch = s.epoch;
        let req = pb::Request {
            version: wire::VERSION,
            body: Some(pb::request::Body::Pull(pb::Pull {
                since,
                incarnation,
                max_entries: wire::PULL_MAX_ENTRIES as u32,
                filtered: s.config.trackers.is_some(),
                trackers: s.config.trackers.clone().unwrap_or_default(),
                base,
            })),
        };
        let id = self.request(peer, req);
        PULLS_SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.outbound
            .insert(id, Outbound::Pull(Instant::now(), epoch));
    }

    fn start_manual_sync(
        &mut self,
        peer: Option<String>,
        tracker: Option<String>,
        reply: oneshot::Sender<Result<SyncSummary, String>>,
    ) {
        let targets: Vec<PeerId> = match peer {
            Some(p) => match p.parse::<PeerId>() {
                Ok(id) if self.peers.contains_key(&id) => vec![id],
                Ok(_) => {
                    let _ = reply.send(Err(format!("no peer {p}: add it first")));
                    return;
                }
                Err(_) => {
                    let _ = reply.send(Err(format!("{p:?} is not a PeerId")));
                    return;
                }
            },
            None => self.peers.keys().copied().collect(),
        };
        if targets.is_empty() {
            let _ = reply.send(Err("no peers to sync with: add one first".into()));
            return;
        }
        let tracker_id = match &tracker {
            None => None,
            Some(t) => match self.repo.tracker(t) {
                Ok(found) => Some(found.id),
                Err(_) => {
                    let _ = reply.send(Err(format!("no tracker {t:?}")));
                    return;
                }
            },
        };
        if let Some(id) = tracker_id {
            for peer in &targets {
                if self.shared(peer).is_some_and(|s| !s.contains(&id)) {
                    let _ = reply.send(Err(format!(
                        "tracker {:?} is not shared with peer {peer}",
                        tracker.as_deref().unwrap_or("")
                    )));
                    return;
                }
            }
        }
        let push_seq = self.repo.store().last_seq();
        let mut sync = ManualSync {
            tracker,
            time: chrono::Utc::now(),
            started: Instant::now(),
            targets: HashMap::new(),
            reply: Some(reply),
        };
        for peer in &targets {
            let config = &self.peers[peer].config;
            sync.targets.insert(
                *peer,
                ManualTarget {
                    pull_done: !config.pulls(),
                    push_done: !config.pushes(),
                    push_seq,
                    result: PeerSyncResult {
                        peer: peer.to_string(),
                        ..Default::default()
                    },
                },
            );
        }
        self.manual.push(sync);
        for peer in targets {
            if self.connected.contains(&peer) {
                self.manual_kick(peer);
            } else if let Err(e) = self.dial_peer(peer) {
                self.manual_error(peer, &format!("cannot dial: {e}"));
            }
        }
        self.finish_manual();
    }

    /// Start the runs of interval-scheduled peers that are due. A run missed while the node
    /// was down runs once at start-up (its last run time is persisted), not once per interval.
    fn run_schedules(&mut self) {
        let now = Instant::now();
        let wall_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let mut due = Vec::new();
        for (peer, s) in self.peers.iter_mut() {
            let Some(interval) = s.config.interval() else {
                continue;
            };
            let next = *s.next_run.get_or_insert_with(|| {
                let last = self
                    .repo
                    .store()
                    .last_run(&peer.to_bytes())
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let since = Duration::from_millis(wall_ms.saturating_sub(last));
                now + interval.saturating_sub(since)
            });
            if now >= next {
                s.next_run = Some(now + interval);
                due.push(*peer);
            }
        }
        for peer in due {
            tracing::info!(%peer, "scheduled sync run");
            let repo = self.repo.clone();
            let key = peer.to_bytes();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = repo.store().set_last_run(&key, wall_ms) {
                    tracing::error!(error = %e, "cannot record the scheduled run");
                }
            });
            if let Some(s) = self.peers.get_mut(&peer) {
                s.run_active = true;
                s.pulling.get_or_insert_with(|| Session::new("scheduled"));
            }
            if self.connected.contains(&peer) {
                self.start_pull(peer);
                self.notify_all();
            } else if let Err(e) = self.dial_peer(peer) {
                self.backoff(peer, &e.to_string());
            }
        }
    }

    /// Pull from the peer now, and ask it to pull from us.
    fn manual_kick(&mut self, peer: PeerId) {
        let wants = self
            .manual
            .iter()
            .filter_map(|m| m.targets.get(&peer))
            .fold((false, false), |(pull, push), t| {
                (pull || !t.pull_done, push || !t.push_done)
            });
        if let Some(s) = self.peers.get_mut(&peer) {
            s.run_active = true;
            s.pulling.get_or_insert_with(|| Session::new("manual"));
        }
        if wants.0 {
            if let Some(s) = self.peers.get_mut(&peer) {
                s.retry_at = None;
            }
            self.start_pull(peer);
        }
        if wants.1 {
            self.send_notify(peer, self.repo.store().last_seq(), true);
            if let Some(s) = self.peers.get_mut(&peer) {
                s.notify_in_flight = true;
            }
        }
    }

    fn manual_error(&mut self, peer: PeerId, error: &str) {
        for m in &mut self.manual {
            if let Some(t) = m.targets.get_mut(&peer) {
                if !(t.pull_done && t.push_done) {
                    t.result.error.get_or_insert_with(|| error.to_string());
                    t.pull_done = true;
                    t.push_done = true;
                }
            }
        }
    }

    /// Answer and log the one-shot syncs whose peers are all done (or past the deadline).
    fn finish_manual(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.manual.len() {
            let m = &mut self.manual[i];
            if now >= m.started + MANUAL_SYNC_TIMEOUT {
                for t in m.targets.values_mut() {
                    if !(t.pull_done && t.push_done) {
                        t.result.error.get_or_insert_with(|| {
                            format!(
                                "not finished after {} s: the peer is unreachable or did not take our changes",
                                MANUAL_SYNC_TIMEOUT.as_secs()
                            )
                        });
                        t.pull_done = true;
                        t.push_done = true;
                    }
                }
            }
            if !m.targets.values().all(|t| t.pull_done && t.push_done) {
                i += 1;
                continue;
            }
            let m = self.manual.swap_remove(i);
            // The run ends with the one-shot sync, unless another one still needs the peer.
            for peer in m.targets.keys() {
                let busy = self.manual.iter().any(|o| o.targets.contains_key(peer));
                if let Some(s) = self.peers.get_mut(peer) {
                    if !busy {
                        s.run_active = false;
                    }
                }
            }
            let mut summary = SyncSummary {
                duration_ms: m.started.elapsed().as_millis() as u64,
                tracker: m.tracker.clone(),
                ..Default::default()
            };
            let mut results: Vec<(PeerId, PeerSyncResult)> =
                m.targets.into_iter().map(|(p, t)| (p, t.result)).collect();
            results.sort_by(|a, b| a.1.peer.cmp(&b.1.peer));
            for (peer, r) in results {
                summary.sent += r.sent;
                summary.received += r.received;
                summary.conflicts += r.conflicts;
                summary.errors += r.error.is_some() as u64;
                if let Some(s) = self.peers.get(&peer) {
                    self.write_log(crate::synclog::LogEntry {
                        tracker: m.tracker.clone(),
                        sent: r.sent,
                        received: r.received,
                        conflicts: r.conflicts,
                        refused: r.refused,
                        result: if r.error.is_some() { "error" } else { "ok" }.into(),
                        remote_error: r
                            .error
                            .as_ref()
                            .is_some_and(|e| e.starts_with("refused by peer")),
                        message: r.error.clone().unwrap_or_else(|| {
                            format!("{} items sent, {} received", r.sent, r.received)
                        }),
                        duration_ms: summary.duration_ms,
                        ..crate::synclog::LogEntry::new(
                            m.time,
                            r.peer.clone(),
                            &s.config,
                            "both",
                            "manual",
                        )
                    });
                }
                summary.peers.push(r);
            }
            if let Some(reply) = m.reply {
                let _ = reply.send(Ok(summary));
            }
        }
    }

    /// Ask the peer for summaries of the next pending ranges.
    fn send_reconcile(&mut self, peer: PeerId) {
        let Some(s) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(recon) = s.recon.as_mut() else {
            return;
        };
        let n = recon.pending.len().min(reconcile::MAX_RANGES);
        let ranges = recon.pending.drain(..n).map(|r| r.to_wire()).collect();
        s.pull_in_flight = true;
        s.pulling.get_or_insert_with(|| Session::new("reconcile"));
        let epoch = s.epoch;
        let req = pb::Request {
            version: wire::VERSION,
            body: Some(pb::request::Body::Reconcile(pb::Reconcile { ranges })),
        };
        let id = self.request(peer, req);
        self.outbound.insert(id, Outbound::Reconcile(epoch));
    }

    /// Fetch the next documents reconciliation found to differ, or finish: the checkpoint
    /// becomes the peer's sequence number at its first answer, and pulls take over.
    fn recon_fetch(&mut self, peer: PeerId) {
        let Some(s) = self.peers.get_mut(&peer) else {
            return;
        };
        let Some(recon) = s.recon.as_mut() else {
            return;
        };
        let Some((incarnation, last_seq)) = recon.at else {
            return;
        };
        if recon.wanted.is_empty() {
            tracing::info!(
                %peer,
                rounds = recon.rounds,
                fetched = recon.fetched,
                ms = recon.started.elapsed().as_millis() as u64,
                "reconciled with peer"
            );
            s.recon = None;
            s.checkpoint = Some((incarnation, last_seq));
            s.cursor = s.checkpoint;
            let repo = self.repo.clone();
            let key = peer.to_bytes();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = repo.store().set_checkpoint(&key, incarnation, last_seq) {
                    tracing::error!(error = %e, "cannot save checkpoint");
                }
            });
            return self.start_pull(peer);
        }
        let n = recon.wanted.len().min(wire::MAX_FETCH);
        let ids: Vec<Uuid> = recon.wanted.drain(..n).collect();
        recon.fetched += ids.len();
        let mut docs = Vec::with_capacity(ids.len());
        for id in &ids {
            let heads = match self.repo.store().doc_meta(*id) {
                Ok(Some(m)) => m.heads,
                _ => Vec::new(),
            };
            docs.push(pb::Have {
                id: id.as_bytes().to_vec(),
                heads: heads.into_iter().map(|h| h.to_vec()).collect(),
            });
        }
        s.applying = true;
        let page = PullPage {
            incarnation,
            last_seq,
            blocked_from: None,
            started: Instant::now(),
            received: ids.len(),
            bytes: 0,
            seqs: HashMap::new(),
            reconcile: true,
        };
        let req = pb::Request {
            version: wire::VERSION,
            body: Some(pb::request::Body::Fetch(pb::Fetch { docs })),
        };
        let id = self.request(peer, req);
        self.outbound
            .insert(id, Outbound::Fetch(page, Fetched::Diff));
    }

    fn on_swarm(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                self.redial.remove(&peer_id);
                if self.join_key.is_some() {
                    // Both sides prove the join key; each authorizes the other on a valid proof.
                    self.send_join(peer_id);
                }
                if !self.authorized(&peer_id) {
                    if self.join_key.is_none() {
                        // Logged once a minute at most: a flood of dials must not flood the log.
                        self.unauthorized.0 += 1;
                        if self
                            .unauthorized
                            .1
                            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                        {
                            tracing::warn!(
                                peer = %peer_id,
                                addr = %endpoint.get_remote_address(),
                                connections = self.unauthorized.0,
                                "closing connections from unauthorized peers (this one, and the count since the last such line)"
                            );
                            self.unauthorized = (0, Some(Instant::now()));
                        }
                        let _ = self.swarm.disconnect_peer_id(peer_id);
                    }
                    return;
                }
                tracing::info!(peer = %peer_id, "peer connected");
                self.connected.insert(peer_id);
                if let Some(s) = self.peers.get_mut(&peer_id) {
                    s.backoff = BACKOFF_MIN;
                    s.last_error = None;
                    if endpoint.is_dialer() {
                        let addr = endpoint.get_remote_address().to_string();
                        if !s.config.addrs.contains(&addr) {
                            s.config.addrs.push(addr);
                            self.persist_peer(peer_id);
                        }
                    }
                }
                self.start_pull(peer_id);
                if self.manual.iter().any(|m| m.targets.contains_key(&peer_id)) {
                    self.manual_kick(peer_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } if num_established == 0 && self.connected.remove(&peer_id) => {
                tracing::info!(peer = %peer_id, cause = ?cause, "peer disconnected");
                // It may come back as another version; identify tells us again.
                self.deflate_peers.remove(&peer_id);
                if let Some(s) = self.peers.get_mut(&peer_id) {
                    s.reset_pull();
                    s.notify_in_flight = false;
                    if !s.paused() {
                        s.retry_at = Some(Instant::now() + s.backoff);
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                if self.join_key.is_some()
                    && !self.peers.contains_key(&peer)
                    && self.discovered.contains_key(&peer)
                {
                    tracing::debug!(%peer, %error, "dial to a discovered peer failed");
                    let delay = self
                        .redial
                        .get(&peer)
                        .map_or(BACKOFF_MIN, |(_, d)| (*d * 2).min(BACKOFF_MAX));
                    self.redial.insert(peer, (Instant::now() + delay, delay));
                }
                self.backoff(peer, &error.to_string());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if !self.peers.contains_key(&peer) {
                        if self.discovered.len() < DISCOVERED_MAX
                            || self.discovered.contains_key(&peer)
                        {
                            let known = self.discovered.entry(peer).or_default();
                            if !known.contains(&addr) {
                                known.push(addr);
                            }
                        }
                        if self.join_key.is_some() && !self.swarm.is_connected(&peer) {
                            let _ = self
                                .swarm
                                .dial(dial_discovered(&peer, self.discovered.get(&peer)));
                        }
                        continue;
                    }
                    if let Some(s) = self.peers.get_mut(&peer) {
                        self.swarm.add_peer_address(peer, addr.clone());
                        let a = addr.to_string();
                        if !s.config.addrs.contains(&a) {
                            s.config.addrs.push(a);
                            self.persist_peer(peer);
                        }
                        if !self.connected.contains(&peer) {
                            let _ = self.dial_peer(peer);
                        }
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) if self.authorized(&peer_id) => {
                // Only authorized peers are kept track of: anyone can connect.
                if info.protocols.contains(&wire::PROTOCOL_DEFLATE) {
                    self.deflate_peers.insert(peer_id);
                } else {
                    self.deflate_peers.remove(&peer_id);
                }
                for addr in info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Rr(ev)) => self.on_rr(ev, false),
            SwarmEvent::Behaviour(BehaviourEvent::RrFast(ev)) => self.on_rr(ev, true),
            // Two pings in a row unanswered (libp2p reports no single failure): the link went
            // silent, as across a partition that drops packets. The connection would hang
            // on TCP retransmissions long after the network heals; close it, and the backoff
            // dials a fresh one.
            // (A peer without ping support is not judged by it.)
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(ping::Failure::Timeout),
            })) => {
                tracing::info!(%peer, "pings unanswered: closing the connection");
                self.swarm.close_connection(connection);
            }
            _ => {}
        }
    }

    fn persist_peer(&self, peer: PeerId) {
        if let Some(s) = self.peers.get(&peer) {
            if let Ok(json) = serde_json::to_vec(&s.config) {
                if let Err(e) = self.repo.store().put_peer(&s.config.peer_id, &json) {
                    tracing::error!(error = %e, "cannot save peer addresses");
                }
            }
        }
    }

    /// Send a request on the deflate-only behaviour when the peer announced the protocol.
    fn request(&mut self, peer: PeerId, req: pb::Request) -> (bool, OutboundRequestId) {
        let fast = self.deflate_peers.contains(&peer);
        let b = self.swarm.behaviour_mut();
        let id = if fast {
            b.rr_fast.send_request(&peer, req.into())
        } else {
            b.rr.send_request(&peer, req.into())
        };
        (fast, id)
    }

    /// Whether a one-shot sync of ours still waits for `peer` to take our changes (it asked
    /// the peer to pull with `Notify.run`; a page withheld until durable, or a change made
    /// since, reaches the peer in a later notify, which must ask the same).
    fn run_owed(&self, peer: &PeerId) -> bool {
        self.manual
            .iter()
            .any(|m| m.targets.get(peer).is_some_and(|t| !t.push_done))
    }

    /// `peer` took `items` documents of our feed, up to `last` (`complete`: nothing after it
    /// was left out of that page); one-shot syncs waiting for it to take our changes count
    /// them, and are done once it reached where they started.
    fn sent_to(&mut self, peer: PeerId, items: u64, last: u64, complete: bool) {
        for m in &mut self.manual {
            if let Some(t) = m.targets.get_mut(&peer).filter(|t| !t.push_done) {
                t.result.sent += items;
                if complete && last >= t.push_seq {
                    t.push_done = true;
                }
            }
        }
        self.finish_manual();
    }

    /// Our notify to `peer` was answered (or failed): the next may go, and one that waited
    /// behind it goes now.
    fn notify_answered(&mut self, peer: PeerId) {
        let again = self.peers.get_mut(&peer).is_some_and(|s| {
            s.notify_in_flight = false;
            std::mem::take(&mut s.notify_again)
        });
        if again {
            self.notify_all();
        }
    }

    fn on_rr(&mut self, ev: request_response::Event<wire::Req, pb::Response>, fast: bool) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                wire::Req::Msg(request) => self.on_request(peer, request, channel),
                wire::Req::Garbled(why) => {
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .rr
                        .send_response(channel, refused("undecodable request"));
                    self.drop_peer(peer, &format!("sent an undecodable request: {why}"));
                }
                // Dripping bytes, or an honest peer on a very lossy link: cut off, but not
                // paused as a misbehaving peer is; either side may connect again at once.
                wire::Req::Slow(why) => {
                    tracing::warn!(%peer, reason = %why, "disconnecting a peer whose request arrived too slowly");
                    self.cut_off(peer, &format!("disconnected: {why}"), BACKOFF_MIN);
                }
            },
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(out) = self.outbound.remove(&(fast, request_id)) {
                    self.on_response(peer, out, response);
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, error = %error, "request failed");
                let garbled =
                    matches!(&error, request_response::OutboundFailure::Io(e) if garbled_io(e));
                if let Some(out) = self.outbound.remove(&(fast, request_id)) {
                    match out {
                        Outbound::Pull(_, epoch) => {
                            let current = self.peers.get_mut(&peer).is_some_and(|s| {
                                let current = s.epoch == epoch;
                                if current {
                                    s.reset_pull();
                                }
                                current
                            });
                            if current {
                                self.backoff(peer, &error.to_string());
                            } else if let Some(s) =
                                self.peers.get_mut(&peer).filter(|s| !s.paused())
                            {
                                // The connection closed under it; redial backoff is set already.
                                s.last_error = Some(error.to_string());
                            }
                        }
                        Outbound::Fetch(..) => {
                            if let Some(s) = self.peers.get_mut(&peer) {
                                s.applying = false;
                                s.reset_pull();
                            }
                            self.backoff(peer, &error.to_string());
                        }
                        Outbound::Reconcile(epoch) => {
                            if let Some(s) = self.peers.get_mut(&peer) {
                                if s.epoch == epoch {
                                    s.reset_pull();
                                }
                                if !s.paused() {
                                    s.last_error = Some(error.to_string());
                                }
                            }
                        }
                        // A change queued behind the failed notify must not be lost: notify
                        // again (only connected peers are notified; a peer that reconnects
                        // pulls on its own).
                        Outbound::Notify | Outbound::Push(..) => self.notify_answered(peer),
                        Outbound::Join => {}
                    }
                }
                if garbled {
                    self.drop_peer(peer, &format!("sent an undecodable response: {error}"));
                }
            }
            // Undecodable and dripped requests arrive as `wire::Req::Garbled` / `Slow`; what
            // fails here (timeouts, closed streams) is not the peer's fault.
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, error = %error, "inbound request failed");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// A misbehaving peer: log once, disconnect, forget its in-flight state.
    fn drop_peer(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(%peer, reason = why, "disconnecting misbehaving peer");
        self.cut_off(peer, why, MISBEHAVIOUR_PAUSE);
    }

    /// Disconnect a peer and do not dial it for `pause`; meanwhile `why` stays its
    /// `last_error` (the failures the disconnection causes do not replace it).
    fn cut_off(&mut self, peer: PeerId, why: &str, pause: Duration) {
        self.end_session_with_error(peer, why, true);
        if let Some(s) = self.peers.get_mut(&peer) {
            s.last_error = Some(why.to_string());
            s.reset_pull();
            s.retry_at = Some(Instant::now() + pause);
            s.paused_until = s.retry_at;
        }
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_request(
        &mut self,
        peer: PeerId,
        request: pb::Request,
        channel: ResponseChannel<pb::Response>,
    ) {
        if let Some(pb::request::Body::Join(join)) = &request.body {
            return self.on_join(peer, &join.proof, channel);
        }
        let Some(state) = self.peers.get(&peer) else {
            let _ = self
                .swarm
                .behaviour_mut()
                .rr
                .send_response(channel, refused("not authorized"));
            // With a join key the peer may still prove it; without, it never can.
            if self.join_key.is_none() {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            return;
        };
        if request.version != wire::VERSION {
            let _ = self
                .swarm
                .behaviour_mut()
                .rr
                .send_response(channel, refused("unsupported protocol version"));
            return;
        }
        let serves = state.config.pushes();
        match request.body {
            Some(pb::request::Body::Notify(notify)) => {
                if state.config.read_only {
                    self.log_read_only_refusal(peer);
                }
                // A peer running a one-shot sync asks us to take its changes now.
                if notify.run {
                    if let Some(s) = self.peers.get_mut(&peer) {
                        s.run_active = true;
                        s.pulling.get_or_insert_with(|| Session::new("peer"));
                    }
                }
                // Whether the push is taken is known at once (applying it comes later); the
                // sender counts a taken push as served.
                let taken = self.take_push(peer, notify);
                let ack = pb::Response {
                    version: wire::VERSION,
                    body: Some(pb::response::Body::Ack(pb::Ack { taken })),
                };
                let _ = self.swarm.behaviour_mut().rr.send_response(channel, ack);
                if !taken {
                    self.start_pull(peer);
                }
            }
            Some(pb::request::Body::Pull(pull)) if serves => {
                let repo = self.repo.clone();
                let work = self.work_tx.clone();
                let ours = self.served_incarnation(&peer);
                let mut shared = self.shared(&peer);
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.wanted = pull.filtered.then(|| pull.trackers.clone());
                }
                // The requester's own share policy: serve only what it takes, so documents of
                // a tracker it names but does not hold yet are not dropped on arrival.
                if pull.filtered {
                    if pull.trackers.len() > 1000 || pull.trackers.iter().any(|t| t.len() > 200) {
                        let r = refused("a pull names at most 1000 trackers of 200 bytes");
                        let _ = self.swarm.behaviour_mut().rr.send_response(channel, r);
                        return;
                    }
                    let wanted = crate::peer::PeerConfig {
                        trackers: Some(pull.trackers.clone()),
                        ..crate::peer::PeerConfig::new(String::new())
                    }
                    .shared(&self.repo.trackers())
                    .unwrap_or_default();
                    shared = Some(match shared {
                        None => wanted,
                        Some(s) => s.intersection(&wanted).copied().collect(),
                    });
                }
                // A checkpoint from another incarnation of our store means nothing: start over.
                let (base, since) = if pull.incarnation == ours.as_bytes() {
                    (pull.base.min(pull.since), pull.since)
                } else {
                    (0, 0)
                };
                let max = (pull.max_entries as usize).clamp(1, wire::PULL_MAX_ENTRIES);
                let node = repo.node();
                let requester = crate::store::peer_tag(&peer.to_bytes());
                tokio::task::spawn_blocking(move || {
                    // The peer holds our feed up to `since`: a bundle for it starts there.
                    if since > 0 {
                        if let Err(e) = repo.store().set_peer_has(&peer.to_bytes(), ours, since) {
                            tracing::warn!(error = %e, "cannot record the peer's position");
                        }
                    }
                    let started = std::time::Instant::now();
                    let response = match repo.feed_shared(
                        base,
                        since,
                        max,
                        wire::PULL_MAX_BYTES,
                        requester,
                        shared.as_ref(),
                    ) {
                        Ok((docs, last_seq, more)) => {
                            if let Err(e) =
                                repo.store()
                                    .set_peer_served(&peer.to_bytes(), ours, last_seq)
                            {
                                tracing::warn!(error = %e, "cannot record the page served");
                            }
                            let _ = work.blocking_send(Work::Served(
                                peer,
                                docs.len() as u64,
                                more,
                                last_seq,
                            ));
                            if !docs.is_empty() {
                                tracing::info!(
                                    %peer,
                                    direction = "sent",
                                    items = docs.len(),
                                    bytes = docs.iter().map(|d| d.data.len()).sum::<usize>(),
                                    since,
                                    last_seq,
                                    ms = started.elapsed().as_millis() as u64,
                                    "sync page served"
                                );
                            }
                            pb::Response {
                                version: wire::VERSION,
                                body: Some(pb::response::Body::Pull(pb::PullReply {
                                    node: node.as_bytes().to_vec(),
                                    incarnation: ours.as_bytes().to_vec(),
                                    last_seq,
                                    more,
                                    entries: docs.into_iter().map(wire::doc_to_wire).collect(),
                                })),
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the change feed");
                            refused("storage error")
                        }
                    };
                    let _ = work.blocking_send(Work::Respond(channel, response));
                });
            }
            Some(pb::request::Body::Reconcile(req)) if serves => {
                let ranges: Result<Vec<_>, _> = if req.ranges.len() > reconcile::MAX_RANGES {
                    Err(wire::WireError("too many ranges".into()))
                } else {
                    req.ranges
                        .iter()
                        .map(reconcile::IdRange::from_wire)
                        .collect()
                };
                let ranges = match ranges {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .rr
                            .send_response(channel, refused("malformed reconcile"));
                        return self.drop_peer(peer, &e.to_string());
                    }
                };
                let repo = self.repo.clone();
                let work = self.work_tx.clone();
                let incarnation = self.served_incarnation(&peer);
                tokio::task::spawn_blocking(move || {
                    let store = repo.store();
                    // Read before summarizing: anything changed later is in the feed after it.
                    let last_seq = store.last_seq();
                    let response = match store.with_digests(|i| reconcile::summarize(i, &ranges)) {
                        Ok(summaries) => pb::Response {
                            version: wire::VERSION,
                            body: Some(pb::response::Body::Reconcile(pb::ReconcileReply {
                                incarnation: incarnation.as_bytes().to_vec(),
                                last_seq,
                                ranges: summaries,
                            })),
                        },
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read document digests");
                            refused("storage error")
                        }
                    };
                    let _ = work.blocking_send(Work::Respond(channel, response));
                });
            }
            Some(pb::request::Body::Fetch(fetch)) if serves => {
                let mut wanted = Vec::with_capacity(fetch.docs.len());
                for h in fetch.docs.into_iter().take(wire::MAX_FETCH) {
                    match (wire::uuid(&h.id, "document id"), wire::heads(&h.heads)) {
                        (Ok(id), Ok(heads)) => wanted.push((id, heads)),
                        (Err(e), _) | (_, Err(e)) => {
                            let _ = self
                                .swarm
                                .behaviour_mut()
                                .rr
                                .send_response(channel, refused("malformed fetch"));
                            self.drop_peer(peer, &e.to_string());
                            return;
                        }
                    }
                }
                let repo = self.repo.clone();
                let shared = self.shared(&peer);
                let work = self.work_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let mut docs = Vec::new();
                    for (id, have) in wanted {
                        match repo.fetch(id, &have) {
                            Ok(Some(d))
                                if shared.as_ref().is_none_or(|t| t.contains(&d.tracker)) =>
                            {
                                docs.push(wire::doc_to_wire(d))
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => {}
                            Err(e) => tracing::error!(doc = %id, error = %e, "cannot serve fetch"),
                        }
                    }
                    let response = pb::Response {
                        version: wire::VERSION,
                        body: Some(pb::response::Body::Fetch(pb::FetchReply { docs })),
                    };
                    let _ = work.blocking_send(Work::Respond(channel, response));
                });
            }
            Some(_) => {
                let _ = self.swarm.behaviour_mut().rr.send_response(
                    channel,
                    refused("this node does not share with you in that direction"),
                );
            }
            None => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, refused("empty request"));
                self.drop_peer(peer, "empty request");
            }
        }
    }

    /// A peer proves the join key: authorize it (persisted) and start syncing.
    fn on_join(&mut self, peer: PeerId, proof: &[u8], channel: ResponseChannel<pb::Response>) {
        let expected = self.join_proof(&peer, self.swarm.local_peer_id());
        let valid = match (expected, <[u8; 32]>::try_from(proof)) {
            // blake3::Hash compares in constant time.
            (Some(e), Ok(p)) => e == blake3::Hash::from(p),
            _ => false,
        };
        if !valid {
            let _ = self
                .swarm
                .behaviour_mut()
                .rr
                .send_response(channel, refused("join key mismatch"));
            tracing::warn!(%peer, "refused a join: wrong or no join key");
            if !self.authorized(&peer) {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            return;
        }
        let ack = pb::Response {
            version: wire::VERSION,
            body: Some(pb::response::Body::Ack(pb::Ack::default())),
        };
        let _ = self.swarm.behaviour_mut().rr.send_response(channel, ack);
        if !self.authorized(&peer) {
            tracing::info!(%peer, "peer joined with the network join key");
            if let Err(e) = self.add_peer(PeerConfig::new(peer.to_string())) {
                tracing::error!(%peer, error = %e, "cannot authorize joined peer");
                return;
            }
        }
        if self.swarm.is_connected(&peer) && self.connected.insert(peer) {
            self.start_pull(peer);
        }
    }

    fn on_response(&mut self, peer: PeerId, out: Outbound, response: pb::Response) {
        match (out, response.body) {
            (Outbound::Join, Some(pb::response::Body::Ack(_))) => {
                // The peer authorized us; pull if we authorized it too.
                if self.connected.contains(&peer) {
                    self.start_pull(peer);
                }
            }
            (Outbound::Join, _) => {
                tracing::warn!(%peer, "peer refused our join key");
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.last_error = Some("peer refused our join key".into());
                }
            }
            (Outbound::Push(last, items), Some(pb::response::Body::Ack(ack))) if ack.taken => {
                // As a served pull page: a one-shot sync waiting for the peer to take our
                // changes up to its start is done with them.
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.last_sent = Some(chrono::Utc::now());
                }
                self.sent_to(peer, items, last, true);
                self.notify_answered(peer);
            }
            (Outbound::Notify | Outbound::Push(..), _) => self.notify_answered(peer),
            (Outbound::Pull(started, epoch), Some(pb::response::Body::Pull(reply))) => {
                let Some(s) = self.peers.get_mut(&peer) else {
                    return;
                };
                if s.epoch != epoch {
                    // A pull sent before the cursor was reset: its page is pulled again.
                    return;
                }
                let incarnation = match wire::uuid(&reply.incarnation, "incarnation") {
                    Ok(i) => i,
                    Err(e) => return self.drop_peer(peer, &e.to_string()),
                };
                let mut docs = Vec::with_capacity(reply.entries.len());
                for e in reply.entries {
                    match wire::doc_from_wire(e) {
                        Ok(d) => docs.push(d),
                        Err(e) => return self.drop_peer(peer, &e.to_string()),
                    }
                }
                let page = PullPage {
                    incarnation,
                    last_seq: reply.last_seq,
                    blocked_from: None,
                    started,
                    received: docs.len(),
                    bytes: docs.iter().map(|d| d.data.len()).sum(),
                    seqs: docs.iter().map(|d| (d.id, d.seq)).collect(),
                    reconcile: false,
                };
                let Some(s) = self.peers.get_mut(&peer) else {
                    return;
                };
                s.pull_in_flight = false;
                s.more = reply.more;
                s.cursor = Some((incarnation, reply.last_seq));
                let again = reply.more || s.pull_again;
                if s.applying {
                    s.queued = Some((page, docs));
                } else {
                    s.applying = true;
                    self.apply(peer, page, docs, Fetched::No);
                }
                // Pipeline: ask for the next page (or news a notify announced) while this
                // one applies.
                if again {
                    self.start_pull(peer);
                }
            }
            (Outbound::Reconcile(epoch), Some(pb::response::Body::Reconcile(reply))) => {
                let Some(s) = self.peers.get_mut(&peer) else {
                    return;
                };
                if s.epoch != epoch {
                    return;
                }
                s.pull_in_flight = false;
                let incarnation = match wire::uuid(&reply.incarnation, "incarnation") {
                    Ok(i) => i,
                    Err(e) => return self.drop_peer(peer, &e.to_string()),
                };
                let Some(recon) = s.recon.as_mut() else {
                    return;
                };
                match recon.at {
                    None => recon.at = Some((incarnation, reply.last_seq)),
                    Some((inc, _)) if inc != incarnation => {
                        // The peer's store was replaced under us: start over.
                        s.reset_pull();
                        return self.start_pull(peer);
                    }
                    Some(_) => {}
                }
                recon.rounds += 1;
                let repo = self.repo.clone();
                let work = self.work_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let outcome = repo
                        .store()
                        .with_digests(|index| reconcile::compare(index, &reply.ranges))
                        .unwrap_or_else(|e| {
                            tracing::error!(error = %e, "cannot read document digests");
                            Ok(reconcile::Outcome::default())
                        });
                    let _ = work.blocking_send(Work::Compared(peer, epoch, outcome));
                });
            }
            (Outbound::Fetch(page, fetched), Some(pb::response::Body::Fetch(reply))) => {
                let mut docs = Vec::with_capacity(reply.docs.len());
                for e in reply.docs {
                    match wire::doc_from_wire(e) {
                        Ok(mut d) => {
                            d.seq = page.seqs.get(&d.id).copied().unwrap_or(0);
                            docs.push(d);
                        }
                        Err(e) => return self.drop_peer(peer, &e.to_string()),
                    }
                }
                self.apply(peer, page, docs, fetched);
            }
            (out, Some(pb::response::Body::Refused(r))) => {
                tracing::warn!(%peer, reason = %r.reason, "peer refused our request");
                self.end_session_with_error(peer, &format!("refused by peer: {}", r.reason), true);
                if let Some(s) = self.peers.get_mut(&peer) {
                    match out {
                        Outbound::Pull(_, epoch) | Outbound::Reconcile(epoch)
                            if epoch != s.epoch =>
                        {
                            return
                        }
                        Outbound::Fetch(..) => s.applying = false,
                        _ => {}
                    }
                    s.reset_pull();
                    s.last_error = Some(format!("refused by peer: {}", r.reason));
                    // It may authorize us later (a join in flight, or an administrator).
                    s.retry_at = Some(Instant::now() + s.backoff);
                    s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
                }
            }
            (_, _) => self.drop_peer(peer, "unexpected response"),
        }
    }

    fn apply(&mut self, peer: PeerId, page: PullPage, docs: Vec<RemoteDoc>, fetched: Fetched) {
        if docs.is_empty() {
            // An empty page (an already-synced pull) only moves the checkpoint: no blocking
            // thread. Still reported through the work queue, after the caller has updated the
            // peer's state, as every page is.
            let work = self.work_tx.clone();
            tokio::spawn(async move {
                let _ = work
                    .send(Work::Applied(peer, page, Ok(Vec::new()), fetched))
                    .await;
            });
            return;
        }
        let repo = self.repo.clone();
        let work = self.work_tx.clone();
        let helper = self.helper.clone();
        let policy = self
            .peers
            .get(&peer)
            .and_then(|s| s.config.trackers.clone());
        let ops = self
            .peers
            .get(&peer)
            .map_or(crate::peer::Ops::ALL, |s| s.config.ops());
        tokio::task::spawn_blocking(move || {
            let from = crate::store::peer_tag(&peer.to_bytes());
            // Schemas first, so no item becomes visible before its tracker; then the items,
            // which are independent, on every core.
            let (trackers, mut items): (Vec<RemoteDoc>, Vec<RemoteDoc>) = docs
                .into_iter()
                .partition(|d| d.kind == crate::store::DocKind::Tracker);
            let result = (|| {
                let mut out = repo
                    .apply_remote(trackers, from)
                    .map_err(|e| e.to_string())?;
                // A share policy: items of other trackers are not taken (schemas always are:
                // they carry no records, and a policy names trackers we may not hold yet).
                // Items of a tracker we do not hold yet are kept: the peer filtered its pull
                // by our policy's names, and the schema may come in a later page.
                if let Some(names) = &policy {
                    let known = repo.trackers();
                    let shared: std::collections::HashSet<Uuid> = known
                        .iter()
                        .filter(|t| names.iter().any(|n| *n == t.name || *n == t.id.to_string()))
                        .map(|t| t.id)
                        .collect();
                    items.retain(|d| {
                        shared.contains(&d.tracker) || !known.iter().any(|t| t.id == d.tracker)
                    });
                }
                // A small page (live sync) is not worth a thread.
                if items.len() < 32 {
                    out.extend(
                        repo.apply_remote_allowed(items, from, ops)
                            .map_err(|e| e.to_string())?,
                    );
                    return Ok(out);
                }
                let half = items.split_off(items.len() / 2);
                let other = repo.clone();
                let (second, first) = helper.join(
                    move || other.apply_remote_allowed(half, from, ops),
                    || repo.apply_remote_allowed(items, from, ops),
                );
                out.extend(first.map_err(|e| e.to_string())?);
                out.extend(
                    second
                        .ok_or_else(|| "applying a page panicked".to_string())?
                        .map_err(|e| e.to_string())?,
                );
                Ok(out)
            })();
            let _ = work.blocking_send(Work::Applied(peer, page, result, fetched));
        });
    }

    fn on_work(&mut self, work: Work) {
        match work {
            Work::Push(peer, since, incarnation, docs, last, more) => {
                if !self.connected.contains(&peer) {
                    if let Some(s) = self.peers.get_mut(&peer) {
                        s.notify_in_flight = false;
                    }
                    return;
                }
                let seq = self.repo.store().last_seq();
                if more {
                    let run = self.run_owed(&peer);
                    return self.send_notify(peer, seq, run);
                }
                let Some(s) = self.peers.get_mut(&peer) else {
                    return;
                };
                if docs.is_empty() {
                    // Nothing it lacks (typically its own change, just applied here): no
                    // echo. The next push starts where it last heard from us.
                    s.served_seq = s.served_seq.max(last);
                    return self.notify_answered(peer);
                }
                // Between where the peer last heard from us and `since` lie only pushes left
                // unsent; if a page served meanwhile moved it past `since`, the push does not
                // start at its cursor and it pulls instead.
                let items = docs.len() as u64;
                let from = s.told_seq.min(since);
                // It has all of this once it takes the push; if it does not, it pulls from
                // where it is, and its pull tells us.
                s.served_seq = s.served_seq.max(last);
                s.told_seq = s.told_seq.max(last);
                let req = pb::Request {
                    version: wire::VERSION,
                    body: Some(pb::request::Body::Notify(pb::Notify {
                        seq: last,
                        // A one-shot sync of ours still waits for the peer to take our
                        // changes: the push counts as part of that run on its side too.
                        run: self.run_owed(&peer),
                        push: true,
                        since: from,
                        incarnation: incarnation.as_bytes().to_vec(),
                        entries: docs.into_iter().map(wire::doc_to_wire).collect(),
                    })),
                };
                let id = self.request(peer, req);
                self.outbound.insert(id, Outbound::Push(last, items));
            }
            Work::Served(peer, items, more, last_seq) => {
                if let Some(s) = self.peers.get_mut(&peer) {
                    s.served_seq = s.served_seq.max(last_seq);
                    s.told_seq = s.told_seq.max(last_seq);
                    if !more {
                        s.last_sent = Some(chrono::Utc::now());
                    }
                }
                self.sent_to(peer, items, last_seq, !more);
                let Some(s) = self.peers.get_mut(&peer) else {
                    return;
                };
                let sess = s.serving.get_or_insert_with(|| Session::new("peer"));
                sess.items += items;
                if !more {
                    if let Some(sess) = s.serving.take() {
                        if sess.items > 0 {
                            self.log_session(peer, "sent", sess, None);
                        }
                    }
                }
            }
            Work::Compared(peer, epoch, outcome) => {
                let Some(s) = self.peers.get_mut(&peer) else {
                    return;
                };
                if s.epoch != epoch {
                    return;
                }
                let outcome = match outcome {
                    Ok(o) => o,
                    Err(e) => return self.drop_peer(peer, &e.to_string()),
                };
                let Some(recon) = s.recon.as_mut() else {
                    return;
                };
                recon.pending.extend(outcome.next);
                recon.wanted.extend(outcome.wanted);
                if recon.rounds >= MAX_RECON_ROUNDS {
                    tracing::warn!(%peer, "reconciliation does not converge; pulling the whole feed");
                    s.recon = None;
                    s.cursor = Some((Uuid::nil(), 0));
                    return self.start_pull(peer);
                }
                if recon.pending.is_empty() {
                    self.recon_fetch(peer);
                } else {
                    self.send_reconcile(peer);
                }
            }
            Work::Respond(channel, response) => {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .rr
                    .send_response(channel, response);
            }
            Work::Applied(peer, mut page, result, fetched) => {
                let results = match result {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(%peer, error = %e, "cannot apply peer's changes");
                        if let Some(s) = self.peers.get_mut(&peer) {
                            s.applying = false;
                            s.reset_pull();
                        }
                        return self.backoff(peer, &e);
                    }
                };
                let mut fetch = Vec::new();
                let mut merged = 0;
                let mut conflicts = 0;
                let mut refused = 0;
                let mut last_refusal = None;
                for (id, seq, outcome) in results {
                    let block = |page: &mut PullPage| {
                        page.blocked_from = Some(page.blocked_from.map_or(seq, |b| b.min(seq)))
                    };
                    match outcome {
                        Applied::Merged => merged += 1,
                        Applied::MergedWithConflict => {
                            merged += 1;
                            conflicts += 1;
                        }
                        Applied::NotAllowed(why) => {
                            // Not applied and not retried; the checkpoint passes it.
                            tracing::warn!(%peer, doc = %id, reason = %why, "change refused");
                            refused += 1;
                            last_refusal = Some(why);
                        }
                        Applied::Unchanged => {}
                        Applied::Incomplete { have } if fetched != Fetched::Whole => {
                            fetch.push(pb::Have {
                                id: id.as_bytes().to_vec(),
                                // After a fetch by heads, the whole document.
                                heads: match fetched {
                                    Fetched::No => have.into_iter().map(|h| h.to_vec()).collect(),
                                    _ => Vec::new(),
                                },
                            })
                        }
                        Applied::Incomplete { .. } => {
                            tracing::warn!(%peer, doc = %id, "document still incomplete after fetch; retried later");
                            block(&mut page);
                        }
                        Applied::Deferred(why) => {
                            tracing::warn!(%peer, doc = %id, reason = %why, "document deferred");
                            block(&mut page);
                            self.flag_clock_skew(peer, &why);
                        }
                        Applied::Refused(why) => {
                            block(&mut page);
                            return self.drop_peer(peer, &why);
                        }
                        Applied::Panicked => {
                            block(&mut page);
                            return self
                                .drop_peer(peer, "sent bytes that crashed the document decoder");
                        }
                    }
                }
                tracing::debug!(%peer, received = page.received, merged, "applied page");
                if let Some(sess) = self.peers.get_mut(&peer).and_then(|s| s.pulling.as_mut()) {
                    sess.items += merged;
                    sess.conflicts += conflicts;
                    sess.refused += refused;
                    if last_refusal.is_some() {
                        sess.refusal = last_refusal;
                    }
                }
                for m in &mut self.manual {
                    if let Some(t) = m.targets.get_mut(&peer).filter(|t| !t.pull_done) {
                        t.result.received += merged;
                        t.result.conflicts += conflicts;
                        t.result.refused += refused;
                    }
                }
                if !fetch.is_empty() {
                    // Counted once per document: a whole fetch after a fetch by heads is the
                    // same document's second try.
                    if fetched == Fetched::No {
                        INCOMPLETE_FETCHED
                            .fetch_add(fetch.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    let req = pb::Request {
                        version: wire::VERSION,
                        body: Some(pb::request::Body::Fetch(pb::Fetch { docs: fetch })),
                    };
                    let id = self.request(peer, req);
                    let next = match fetched {
                        Fetched::No => Fetched::Diff,
                        _ => Fetched::Whole,
                    };
                    self.outbound.insert(id, Outbound::Fetch(page, next));
                    return;
                }
                self.finish_page(peer, page);
            }
        }
    }

    fn finish_page(&mut self, peer: PeerId, page: PullPage) {
        if page.reconcile {
            let Some(s) = self.peers.get_mut(&peer) else {
                return;
            };
            s.applying = false;
            if page.blocked_from.is_some() {
                // Retried later; with no checkpoint yet, that is a new reconciliation.
                s.reset_pull();
                s.retry_at = Some(Instant::now() + DEFERRED_RETRY);
                return;
            }
            return self.recon_fetch(peer);
        }
        let checkpoint = match page.blocked_from {
            Some(b) => b.saturating_sub(1),
            None => page.last_seq,
        };
        // What the page covers is durable already; the checkpoint itself need not be (a lost
        // one costs a re-pull), so after a small page it rides on the next flush. After a
        // large one it is flushed at once: a node stopped right after catching up would
        // otherwise pull the whole catch-up again. Saved off the loop.
        let repo = self.repo.clone();
        let (key, incarnation) = (peer.to_bytes(), page.incarnation);
        let flush = page.received >= CHECKPOINT_FLUSH_ITEMS;
        tokio::task::spawn_blocking(move || {
            let saved = repo
                .store()
                .set_checkpoint(&key, incarnation, checkpoint)
                .and_then(|()| if flush { repo.store().flush() } else { Ok(()) });
            if let Err(e) = saved {
                tracing::error!(error = %e, "cannot save checkpoint");
            }
        });
        if page.received > 0 {
            tracing::info!(
                %peer,
                direction = "received",
                items = page.received,
                bytes = page.bytes,
                checkpoint,
                ms = page.started.elapsed().as_millis() as u64,
                "sync page applied"
            );
        }
        let Some(s) = self.peers.get_mut(&peer) else {
            return;
        };
        s.applying = false;
        // Never move backwards within one incarnation of the peer's store.
        s.checkpoint = match s.checkpoint {
            Some((inc, seq)) if inc == page.incarnation && seq > checkpoint => Some((inc, seq)),
            _ => Some((page.incarnation, checkpoint)),
        };
        if page.blocked_from.is_some() {
            // Pages pipelined behind this one are pulled again once the blocked documents
            // can be applied.
            s.reset_pull();
            s.retry_at = Some(Instant::now() + DEFERRED_RETRY);
            return;
        }
        if let Some((next, docs)) = s.queued.take() {
            s.applying = true;
            let again = s.more || s.pull_again;
            self.apply(peer, next, docs, Fetched::No);
            if again {
                self.start_pull(peer);
            }
        } else if s.more || s.pull_again {
            self.start_pull(peer);
        } else if !s.pull_in_flight {
            s.last_sync = Some(chrono::Utc::now());
            if let Some(sess) = s.pulling.take() {
                // A one-shot sync logs its own entry, with both directions.
                if (sess.items > 0 || sess.refused > 0) && sess.trigger != "manual" {
                    self.log_session(peer, "received", sess, None);
                }
            }
            for m in &mut self.manual {
                if let Some(t) = m.targets.get_mut(&peer) {
                    t.pull_done = true;
                }
            }
            self.finish_manual();
            let pending = self
                .manual
                .iter()
                .any(|m| m.targets.get(&peer).is_some_and(|t| !t.push_done));
            if let Some(s) = self.peers.get_mut(&peer) {
                if !pending {
                    s.run_active = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Helper;

    #[test]
    fn the_page_helper_runs_half_elsewhere_and_outlives_a_panicking_half() {
        let helper = Helper::start().expect("helper thread");
        let caller = std::thread::current().id();
        let (there, here) = helper.join(
            || std::thread::current().id(),
            || std::thread::current().id(),
        );
        assert_eq!(here, caller);
        assert!(there.is_some_and(|t| t != caller), "{there:?}");
        let (failed, ()) = helper.join(|| -> u8 { panic!("a half panicked") }, || ());
        assert!(failed.is_none());
        let (again, ()) = helper.join(|| 7, || ());
        assert_eq!(again, Some(7));
    }
}
