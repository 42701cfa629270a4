//! The voter configurations the cluster went through, kept as long as an
//! owner may still count its lease in one of them.
//!
//! The rule that keeps two owners apart across membership changes:
//! - the **owner** holds its lease while a majority of *any one* voter
//!   configuration it counts in has unexpired grants. It counts in the
//!   memberships it has applied (committed ones only) from a floor on: the
//!   one current at its assignment, raised when it tells the leader
//!   (`GroupCommand::Counting`) — which it does only once it already
//!   holds a majority in the newer membership, so a change never costs
//!   it the lease;
//! - the **leader** frees a revoked group only once a majority of *every*
//!   configuration from the recorded floor on (and the one in force) has
//!   said its grants ran out, and only after applying every membership in
//!   its log, so its history misses none.
//!
//! The owner's configuration is always among the leader's, and two
//! majorities of one configuration share a voter, who cannot both grant
//! and have run out. Each group records its floor in
//! `GroupState::counted_since`; this history keeps the configurations
//! from the oldest floor of any owner in office on.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::NodeId;

/// Voter configurations by the log index of the membership entry that
/// brought them in (two in a joint membership).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoterHistory {
    entries: BTreeMap<u64, Vec<BTreeSet<NodeId>>>,
}

impl VoterHistory {
    /// The membership at log `index` was applied.
    pub fn applied(&mut self, index: u64, configs: Vec<BTreeSet<NodeId>>) {
        self.entries.insert(index, configs);
    }

    /// The log index of the last membership applied (0: none recorded).
    pub fn last(&self) -> u64 {
        self.entries.keys().next_back().copied().unwrap_or(0)
    }

    /// Every configuration in force at or after log index `since`: the
    /// membership that was current at `since` and all later ones,
    /// without repeats.
    pub fn since(&self, since: u64) -> Vec<BTreeSet<NodeId>> {
        let from = self.floor(since);
        let mut out: Vec<BTreeSet<NodeId>> = Vec::new();
        for c in self.entries.range(from..).flat_map(|(_, cs)| cs) {
            if !out.contains(c) {
                out.push(c.clone());
            }
        }
        out
    }

    /// Forget memberships older than the one current at `oldest`; the
    /// last is always kept.
    pub fn prune(&mut self, oldest: u64) {
        let from = self.floor(oldest).min(self.last());
        self.entries = self.entries.split_off(&from);
    }

    /// The index of the membership current at `index` (0 if none is
    /// recorded that early: then all are counted).
    fn floor(&self, index: u64) -> u64 {
        self.entries
            .range(..=index)
            .next_back()
            .map_or(0, |(i, _)| *i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    fn grown() -> VoterHistory {
        // {1} → joint({1},{1,2,3}) → {1,2,3} → {1,2,3,4,5}.
        let mut h = VoterHistory::default();
        h.applied(1, vec![set(&[1])]);
        h.applied(5, vec![set(&[1]), set(&[1, 2, 3])]);
        h.applied(6, vec![set(&[1, 2, 3])]);
        h.applied(9, vec![set(&[1, 2, 3, 4, 5])]);
        h
    }

    #[test]
    fn since_counts_the_membership_current_then_and_every_later_one() {
        let h = grown();
        assert_eq!(h.last(), 9);
        assert_eq!(
            h.since(7),
            vec![set(&[1, 2, 3]), set(&[1, 2, 3, 4, 5])],
            "at index 7 the membership of index 6 was current"
        );
        assert_eq!(h.since(9), vec![set(&[1, 2, 3, 4, 5])]);
        assert_eq!(
            h.since(0),
            vec![set(&[1]), set(&[1, 2, 3]), set(&[1, 2, 3, 4, 5])],
            "before the first recorded membership everything counts, once each"
        );
    }

    #[test]
    fn prune_keeps_what_an_owner_may_still_count_and_always_the_last() {
        let mut h = grown();
        h.prune(7);
        assert_eq!(h.since(0), vec![set(&[1, 2, 3]), set(&[1, 2, 3, 4, 5])]);
        h.prune(u64::MAX);
        assert_eq!(h.since(0), vec![set(&[1, 2, 3, 4, 5])]);
        assert_eq!(h.last(), 9);
    }

    #[test]
    fn an_empty_history_counts_nothing() {
        let mut h = VoterHistory::default();
        h.prune(3);
        assert_eq!(h.last(), 0);
        assert!(h.since(0).is_empty());
    }
}
