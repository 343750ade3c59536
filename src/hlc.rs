//! Hybrid logical clock: wall-clock milliseconds, a logical counter and the writing node as the
//! final tie-break. Pure: the caller passes `now`, so tests and the simulator control time.
//!
//! Invariants: a stamp issued by [`HlcState::tick`] is strictly greater than every stamp issued
//! or observed before it, whatever the wall clock does; [`HlcState::observe`] refuses remote
//! stamps further ahead than the allowed drift so one skewed node cannot drag everyone's clock
//! into the future.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Default bound on how far ahead of our wall clock a remote stamp may be (SPEC section 2).
pub const DEFAULT_MAX_DRIFT_MS: u64 = 5 * 60 * 1000;

/// Encoded size of an [`Hlc`]: wall (8) + logical (4) + node (16), all big-endian so byte order is
/// stamp order.
pub const HLC_BYTES: usize = 28;

/// A node's identity as users see it (Sahana's repository UUID).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct NodeId(pub Uuid);

impl NodeId {
    pub fn random() -> Self {
        NodeId(Uuid::new_v4())
    }
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
    /// Eight hex digits, used to build display ids (`<short>-<n>`).
    pub fn short(&self) -> String {
        self.0.simple().to_string()[..8].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.0)
    }
}

impl FromStr for NodeId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(NodeId)
    }
}

/// One stamp. Field order gives the derived `Ord`: wall, then logical, then node.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Hlc {
    pub wall_ms: u64,
    pub logical: u32,
    pub node: NodeId,
}

impl Hlc {
    pub fn to_bytes(&self) -> [u8; HLC_BYTES] {
        let mut out = [0u8; HLC_BYTES];
        out[..8].copy_from_slice(&self.wall_ms.to_be_bytes());
        out[8..12].copy_from_slice(&self.logical.to_be_bytes());
        out[12..].copy_from_slice(self.node.as_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<Hlc> {
        if b.len() < HLC_BYTES {
            return None;
        }
        let wall_ms = u64::from_be_bytes(b[..8].try_into().ok()?);
        let logical = u32::from_be_bytes(b[8..12].try_into().ok()?);
        let node = NodeId(Uuid::from_bytes(b[12..28].try_into().ok()?));
        Some(Hlc {
            wall_ms,
            logical,
            node,
        })
    }
}

/// Text form that sorts in stamp order: `2026-11-22T18:45:17.123Z+0000000000@<node uuid>`.
/// Wall clocks before year 0 or after 9999 cannot be written this way; they fall back to
/// a zero-padded millisecond count, which still sorts after every dated stamp of year < 10000
/// only by accident, so [`FromStr`] accepts both.
impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match chrono::DateTime::from_timestamp_millis(self.wall_ms as i64)
            .filter(|_| self.wall_ms < 253_402_300_800_000)
        {
            Some(t) => write!(
                f,
                "{}+{:010}@{}",
                t.format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                self.logical,
                self.node
            ),
            None => write!(f, "{:020}+{:010}@{}", self.wall_ms, self.logical, self.node),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("not a stamp: expected TIME+COUNTER@NODE, got {0:?}")]
pub struct ParseHlcError(String);

impl FromStr for Hlc {
    type Err = ParseHlcError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHlcError(s.to_string());
        let (time, rest) = s.split_once('+').ok_or_else(err)?;
        let (logical, node) = rest.split_once('@').ok_or_else(err)?;
        let wall_ms = match chrono::DateTime::parse_from_rfc3339(time) {
            Ok(t) => u64::try_from(t.timestamp_millis()).map_err(|_| err())?,
            Err(_) => time.parse::<u64>().map_err(|_| err())?,
        };
        Ok(Hlc {
            wall_ms,
            logical: logical.parse().map_err(|_| err())?,
            node: node.parse().map_err(|_| err())?,
        })
    }
}

/// A remote stamp too far in the future to accept now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "stamp {stamp} is {ahead_ms} ms ahead of the local clock (allowed drift {max_drift_ms} ms)"
)]
pub struct DriftError {
    pub stamp: Hlc,
    pub ahead_ms: u64,
    pub max_drift_ms: u64,
}

/// The clock state of one node. Pure; persisted by the store as a high-water mark with every
/// write, so a restart never issues a stamp below one already on disk.
#[derive(Debug, Clone)]
pub struct HlcState {
    node: NodeId,
    wall_ms: u64,
    logical: u32,
    max_drift_ms: u64,
}

impl HlcState {
    pub fn new(node: NodeId, max_drift_ms: u64) -> Self {
        HlcState {
            node,
            wall_ms: 0,
            logical: 0,
            max_drift_ms,
        }
    }

    /// The last stamp issued or observed (the high-water mark to persist).
    pub fn last(&self) -> Hlc {
        Hlc {
            wall_ms: self.wall_ms,
            logical: self.logical,
            node: self.node,
        }
    }

    /// Issue a stamp for a local event.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms {
            self.wall_ms = now_ms;
            self.logical = 0;
        } else if self.logical < u32::MAX {
            self.logical += 1;
        } else {
            // Counter exhausted within one millisecond: borrow the next millisecond.
            self.wall_ms += 1;
            self.logical = 0;
        }
        self.last()
    }

    /// Raise the clock to at least `seen` without a drift check: used for stamps already
    /// accepted (our own persisted high-water mark, values already in a document).
    pub fn witness(&mut self, seen: Hlc) {
        if (seen.wall_ms, seen.logical) > (self.wall_ms, self.logical) {
            self.wall_ms = seen.wall_ms;
            self.logical = seen.logical;
        }
    }

    /// Check a remote stamp against the drift bound and raise the clock to it.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<(), DriftError> {
        self.check_drift(remote, now_ms)?;
        self.witness(remote);
        Ok(())
    }

    /// Whether `remote` is within the allowed drift of `now_ms`.
    pub fn check_drift(&self, remote: Hlc, now_ms: u64) -> Result<(), DriftError> {
        let limit = now_ms.saturating_add(self.max_drift_ms);
        if remote.wall_ms > limit {
            return Err(DriftError {
                stamp: remote,
                ahead_ms: remote.wall_ms - now_ms,
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }
}

/// Source of wall-clock time, injected so tests control it.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system clock, optionally shifted (for skew tests of real processes).
#[derive(Debug, Default)]
pub struct SystemClock {
    pub offset_ms: i64,
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        now.saturating_add(self.offset_ms).max(0) as u64
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(ms: u64) -> Self {
        ManualClock(AtomicU64::new(ms))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(n: u8) -> NodeId {
        NodeId(Uuid::from_bytes([n; 16]))
    }

    #[test]
    fn tick_is_monotonic_when_wall_clock_goes_back() {
        let mut c = HlcState::new(node(1), DEFAULT_MAX_DRIFT_MS);
        let a = c.tick(1000);
        let b = c.tick(500);
        let d = c.tick(1000);
        assert!(a < b && b < d, "{a:?} {b:?} {d:?}");
        assert_eq!(b.wall_ms, 1000);
    }

    #[test]
    fn tick_after_observe_exceeds_remote() {
        let mut c = HlcState::new(node(1), DEFAULT_MAX_DRIFT_MS);
        let remote = Hlc {
            wall_ms: 5000,
            logical: 7,
            node: node(9),
        };
        c.observe(remote, 4000).expect("within drift");
        let t = c.tick(4500);
        assert!(t > remote);
        assert_eq!((t.wall_ms, t.logical), (5000, 8));
    }

    #[test]
    fn observe_refuses_stamps_beyond_drift() {
        let mut c = HlcState::new(node(1), 1000);
        let remote = Hlc {
            wall_ms: 10_001,
            logical: 0,
            node: node(2),
        };
        let err = c.observe(remote, 9000).expect_err("beyond drift");
        assert_eq!(err.ahead_ms, 1001);
        assert_eq!(
            c.last().wall_ms,
            0,
            "a refused stamp must not move the clock"
        );
    }

    #[test]
    fn logical_overflow_borrows_next_millisecond() {
        let mut c = HlcState::new(node(1), DEFAULT_MAX_DRIFT_MS);
        c.witness(Hlc {
            wall_ms: 10,
            logical: u32::MAX,
            node: node(1),
        });
        let t = c.tick(10);
        assert_eq!((t.wall_ms, t.logical), (11, 0));
    }

    #[test]
    fn bytes_and_text_sort_like_stamps() {
        let stamps = [
            Hlc {
                wall_ms: 1_700_000_000_000,
                logical: 2,
                node: node(1),
            },
            Hlc {
                wall_ms: 1_700_000_000_000,
                logical: 10,
                node: node(1),
            },
            Hlc {
                wall_ms: 1_700_000_000_001,
                logical: 0,
                node: node(0),
            },
            Hlc {
                wall_ms: 1_700_000_000_001,
                logical: 0,
                node: node(3),
            },
        ];
        for w in stamps.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_bytes() < w[1].to_bytes());
            assert!(w[0].to_string() < w[1].to_string());
        }
        for s in stamps {
            assert_eq!(Hlc::from_bytes(&s.to_bytes()), Some(s));
            assert_eq!(s.to_string().parse::<Hlc>().expect("round trip"), s);
        }
    }
}
