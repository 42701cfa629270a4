//! Group leases, held from a majority of voters — without I/O.
//!
//! The owner of a group under epoch E asks every voter for a grant, again
//! and again. A voter grants only while its applied state says the owner
//! holds E and E is not revoked, and remembers until when it promised.
//! The owner counts each grant from the moment it *sent* the request, so
//! its view of a grant ends no later than the voter's. It holds the lease
//! while a majority of every voter configuration has unexpired grants.
//!
//! To take a group back, the leader revokes E through the log (voters then
//! grant nothing more for it) and asks voters how long their promises may
//! last. Once a majority has answered and their promises have run out, no
//! majority can still back the old owner — any two majorities share a
//! voter — and the next epoch may start. Leader elections do not touch
//! any of this: owners keep renewing with the voters while a new leader is
//! elected, and a new leader learns the promises by asking.
//!
//! Promises live in memory. A voter that restarts cannot vouch for what it
//! promised before, so for a while after it starts it answers as if it had
//! promised up to then: for the longest promise it ever made, which it
//! records on disk before it first promises that long (see group_rpc).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::rpc::group::GrantRefusal;
use crate::cluster::state::groups::GroupState;
use crate::cluster::state::NodeId;

/// Longest grant a voter gives, whatever the owner asks for.
pub const MAX_LEASE: Duration = Duration::from_secs(60);

/// A voter's promises.
#[derive(Debug)]
pub struct Grants {
    started: Instant,
    /// For this long after it starts, this voter covers promises it may
    /// have made before a restart.
    grace: Duration,
    /// Per group: until when this voter promised it.
    promises: HashMap<String, Instant>,
}

impl Grants {
    /// A voter that started at `started` and may have promised up to
    /// `grace` before.
    pub fn new(started: Instant, grace: Duration) -> Grants {
        Grants {
            started,
            grace,
            promises: HashMap::new(),
        }
    }

    /// Grant `owner` the group under `epoch` for `ttl` (capped), if this
    /// voter's applied state `g` agrees; returns the time promised.
    pub fn grant(
        &mut self,
        group: &str,
        owner: NodeId,
        epoch: u64,
        g: Option<&GroupState>,
        ttl: Duration,
        now: Instant,
    ) -> Result<Duration, GrantRefusal> {
        let Some(g) = g else {
            return Err(GrantRefusal::UnknownGroup);
        };
        if g.epoch != epoch || g.owner != Some(owner) {
            return Err(GrantRefusal::OtherOwner {
                epoch: g.epoch,
                owner: g.owner,
            });
        }
        if g.revoked || g.released {
            return Err(GrantRefusal::EpochOver);
        }
        let ttl = ttl.min(MAX_LEASE);
        let until = now + ttl;
        let p = self.promises.entry(group.to_string()).or_insert(until);
        *p = (*p).max(until);
        Ok(ttl)
    }

    /// How long from `now` a promise for `group` may still be relied on.
    pub fn outstanding(&self, group: &str, now: Instant) -> Duration {
        let promised = self
            .promises
            .get(group)
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        let grace = (self.started + self.grace).saturating_duration_since(now);
        promised.max(grace)
    }
}

/// The owner's side: the grants it collected.
#[derive(Debug, Default, Clone)]
pub struct Holding {
    /// Per voter: until when its grant holds, counted from the moment
    /// the request was sent.
    grants: BTreeMap<NodeId, Instant>,
}

impl Holding {
    /// `voter` granted the request sent at `sent` for `ttl`.
    pub fn granted(&mut self, voter: NodeId, sent: Instant, ttl: Duration) {
        let end = self.grants.entry(voter).or_insert(sent + ttl);
        *end = (*end).max(sent + ttl);
    }

    /// Forget every grant (a new epoch starts from nothing).
    pub fn clear(&mut self) {
        self.grants.clear();
    }

    /// Until when the lease holds: the last instant at which a majority
    /// of every configuration in `configs` still has unexpired grants.
    /// None: no majority has granted.
    pub fn valid_until(&self, configs: &[BTreeSet<NodeId>]) -> Option<Instant> {
        // Per configuration, the need-th latest end: after it, fewer than
        // a majority hold; the earliest over all configurations counts.
        marks(configs, |v| self.grants.get(v).copied(), true, majority)?
            .into_iter()
            .min()
    }

    /// Until when the lease holds in at least one of `configs`: enough
    /// for an owner when the leader, to free the group, needs a majority
    /// of *every* configuration the owner may count in — two majorities of
    /// one configuration share a voter (see [`crate::cluster::state::history`]).
    pub fn valid_in_any(&self, configs: &[BTreeSet<NodeId>]) -> Option<Instant> {
        configs
            .iter()
            .filter_map(|c| self.valid_until(std::slice::from_ref(c)))
            .max()
    }
}

/// When the revoked group is certainly free, from voters' answers: each
/// is the latest instant its promises may last (the time the answer
/// arrived plus what the voter said remained). None while some
/// configuration lacks enough answers. `margin` covers clock-rate
/// differences between machines.
pub fn free_at(
    configs: &[BTreeSet<NodeId>],
    answers: &BTreeMap<NodeId, Instant>,
    margin: Duration,
) -> Option<Instant> {
    // Per configuration of n voters, once n - majority + 1 of them have
    // run out, the rest are too few to form a majority for the owner;
    // the latest over all configurations counts.
    let free = marks(
        configs,
        |v| answers.get(v).copied(),
        false,
        |n| n - majority(n) + 1,
    )?
    .into_iter()
    .max()?;
    Some(free + margin)
}

fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// For each configuration, the instant `k(n)` of its n voters pass: the
/// k-th earliest of their instants (`latest`: the k-th latest). None if
/// some configuration has fewer instants than that.
fn marks(
    configs: &[BTreeSet<NodeId>],
    at: impl Fn(&NodeId) -> Option<Instant>,
    latest: bool,
    k: impl Fn(usize) -> usize,
) -> Option<Vec<Instant>> {
    configs
        .iter()
        .map(|voters| {
            let mut ends: Vec<Instant> = voters.iter().filter_map(&at).collect();
            ends.sort_unstable();
            if latest {
                ends.reverse();
            }
            ends.get(k(voters.len()).checked_sub(1)?).copied()
        })
        .collect()
}

#[cfg(test)]
#[path = "lease_tests.rs"]
mod tests;
