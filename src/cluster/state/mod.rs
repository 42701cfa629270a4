//! The replicated cluster state: who is a member, at which address, in what
//! state, and the commands that change it.
//!
//! `ClusterState::apply` is pure and deterministic: every node applies the same
//! committed commands in the same order and must reach the same state, so
//! nothing here reads a clock or a random source (times travel in commands).
//! Its children: each group's state and commands ([`groups`]) and the
//! voter configurations owners may count their leases in ([`history`]).
//!
//! May import: nothing of the cluster (openraft's type config aside);
//! every other layer reads and writes the cluster through these types.

pub mod groups;
pub mod history;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use groups::{GroupCommand, GroupState};
use history::VoterHistory;

/// A raft node id: the node's *incarnation*, a random id made when its data
/// dir is first created, so a node that returns with a wiped disk is a new id.
pub type NodeId = u64;

/// What a member does in the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A full member: votes and may own groups.
    #[default]
    Member,
    /// A resource-less tie-breaker: votes, never owns a group.
    Witness,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Member => "member",
            Role::Witness => "witness",
        })
    }
}

/// A member's record; also openraft's `Node` type, so it rides in raft
/// membership entries too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The configured node name (`[node] name`); unique in the cluster.
    pub name: String,
    /// Cluster listen address, "ip:port".
    pub addr: String,
    /// Member or witness.
    pub role: Role,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{} ({})", self.name, self.addr, self.role)
    }
}

/// How the cluster currently sees a member.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Reachable and healthy.
    #[default]
    Up,
    /// Missed heartbeats; not yet declared down.
    Suspect,
    /// Declared down.
    Down,
    /// Stopped on purpose (SIGTERM): not a failure. It stays a member and
    /// is up again when it returns and rejoins.
    Left,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Up => "up",
            NodeState::Suspect => "suspect",
            NodeState::Down => "down",
            NodeState::Left => "left",
        })
    }
}

/// A replicated command: the application data of a raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Record a member. Another id with the same name is a stale incarnation
    /// and is dropped; the leader changes the raft voter set separately.
    Upsert {
        /// The member's incarnation.
        id: NodeId,
        /// Its record.
        member: Member,
    },
    /// Forget a member.
    Remove {
        /// The member's incarnation.
        id: NodeId,
    },
    /// Record an observed state change of a member.
    SetState {
        /// The member's incarnation.
        id: NodeId,
        /// Its new state.
        state: NodeState,
        /// When it was observed, in ms since the Unix epoch (leader's clock).
        at_ms: u64,
        /// Only if it is in this state when the command applies: a decision
        /// made on an older view (a leader that has not applied everything,
        /// or raced another writer) then changes nothing.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<NodeState>,
    },
    /// A change to a resource group.
    Group(GroupCommand),
    /// A member joined or rejoined after its data directory's start
    /// number `generation`; only a higher number than recorded applies.
    Started {
        /// The member's incarnation.
        id: NodeId,
        /// Its generation.
        generation: u64,
        /// The start's random id.
        start: u64,
    },
    /// An operator drains a member (it takes no new mail and hands its
    /// groups away) or ends the drain.
    Drain {
        /// The member's incarnation.
        id: NodeId,
        /// True to drain, false to end it.
        draining: bool,
    },
}

/// The result of applying one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The command took effect (also the answer for blank and membership entries).
    Done,
    /// An upsert took effect and dropped the stale entry of the same name.
    Replaced {
        /// The stale incarnation that was dropped.
        stale: NodeId,
    },
    /// The command named an id that is not a member; nothing changed.
    UnknownMember,
    /// A conditional state change found the member in another state;
    /// nothing changed.
    Stale,
}

impl Response {
    /// True when the command changed (or confirmed) the state.
    pub fn is_ok(&self) -> bool {
        !matches!(self, Response::UnknownMember)
    }
}

/// One member as the cluster state records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberState {
    /// The member's record.
    pub member: Member,
    /// Its current state.
    pub state: NodeState,
    /// Since when it has been in `state`, in ms since the Unix epoch; 0 for a
    /// member that was upserted and has had no state change recorded since.
    pub since_ms: u64,
}

/// The replicated cluster state (the raft state machine's data).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Members by incarnation.
    pub members: BTreeMap<NodeId, MemberState>,
    /// Resource groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupState>,
    /// The voter configurations an owner may still count its lease in.
    #[serde(default)]
    pub voters: VoterHistory,
    /// Members an operator drains: no group is placed on them.
    #[serde(default)]
    pub draining: BTreeSet<NodeId>,
    /// The latest start each member joined or rejoined with: the count
    /// of starts of its data directory, and the start's random id.
    #[serde(default)]
    pub generations: BTreeMap<NodeId, (u64, u64)>,
}

impl ClusterState {
    /// The generation recorded for member `id` when a start counted
    /// `generation` (with random id `start`) cannot be a later start of
    /// the same data directory: its count is behind, or equal but from
    /// another start — a copy of the directory that ran before.
    pub fn restored(&self, id: NodeId, generation: u64, start: u64) -> Option<u64> {
        let &(seen, seen_start) = self.generations.get(&id)?;
        let copy = seen > generation || (seen == generation && seen_start != start);
        (generation != 0 && copy).then_some(seen)
    }

    /// Applies one command; pure and deterministic.
    pub fn apply(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::Upsert { id, member } => {
                // A name maps to one incarnation; any other id with this name
                // is an older life of the same node (wiped disk) and must go.
                let stale: Vec<NodeId> = self
                    .members
                    .iter()
                    .filter(|(other, m)| *other != id && m.member.name == member.name)
                    .map(|(other, _)| *other)
                    .collect();
                for s in &stale {
                    self.members.remove(s);
                }
                match self.members.get_mut(id) {
                    // Re-recording a known incarnation (e.g. a new address)
                    // keeps its observed state: nothing was observed here.
                    Some(existing) => existing.member = member.clone(),
                    None => {
                        self.members.insert(
                            *id,
                            MemberState {
                                member: member.clone(),
                                state: NodeState::Up,
                                since_ms: 0,
                            },
                        );
                    }
                }
                match stale.first() {
                    Some(&stale) => Response::Replaced { stale },
                    None => Response::Done,
                }
            }
            Command::Started {
                id,
                generation,
                start,
            } => match self.restored(*id, *generation, *start) {
                Some(_) => Response::Stale,
                None => {
                    self.generations.insert(*id, (*generation, *start));
                    Response::Done
                }
            },
            Command::Remove { id } => {
                self.draining.remove(id);
                self.generations.remove(id);
                match self.members.remove(id) {
                    Some(_) => Response::Done,
                    None => Response::UnknownMember,
                }
            }
            Command::Drain { id, draining } => {
                if !self.members.contains_key(id) {
                    return Response::UnknownMember;
                }
                let changed = match draining {
                    true => self.draining.insert(*id),
                    false => self.draining.remove(id),
                };
                match changed {
                    true => Response::Done,
                    false => Response::Stale,
                }
            }
            Command::Group(g) => self.apply_group(g),
            Command::SetState {
                id,
                state,
                at_ms,
                from,
            } => match self.members.get_mut(id) {
                Some(m) if from.is_some_and(|f| f != m.state) => Response::Stale,
                Some(m) => {
                    // `since_ms` is when the member *entered* its state, so a
                    // repeated report of the same state must not move it.
                    if m.state != *state {
                        m.state = *state;
                        m.since_ms = *at_ms;
                    }
                    Response::Done
                }
                None => Response::UnknownMember,
            },
        }
    }

    /// The membership at log `index`, with these voter configurations,
    /// was applied.
    pub fn membership_applied(&mut self, index: u64, configs: Vec<BTreeSet<NodeId>>) {
        self.voters.applied(index, configs);
        self.prune_voters();
    }

    fn apply_group(&mut self, cmd: &GroupCommand) -> Response {
        // An owner can only have applied memberships the log already
        // holds: a claim beyond them would hide configurations.
        if let GroupCommand::Counting { since, .. } = cmd {
            if *since > self.voters.last() {
                return Response::Stale;
            }
        }
        let g = match self.groups.get_mut(cmd.group()) {
            Some(g) => g,
            // Only a first placement or a declaration makes a group: a
            // move or report naming an unknown one must not invent it.
            None if cmd.creates() => self.groups.entry(cmd.group().to_string()).or_default(),
            None => return Response::Stale,
        };
        let r = cmd.apply(g);
        if r == Response::Done && matches!(cmd, GroupCommand::Assign { .. }) {
            // The new owner applies this entry after the membership now
            // current, so it never counts in an older one.
            g.counted_since = self.voters.last();
        }
        self.prune_voters();
        r
    }

    /// Keep the configurations any owner still in office may count in.
    fn prune_voters(&mut self) {
        let oldest = self
            .groups
            .values()
            .filter(|g| g.owner.is_some() && !g.released)
            .map(|g| g.counted_since)
            .min()
            .unwrap_or(u64::MAX);
        self.voters.prune(oldest);
    }

    /// The incarnation and record of the member with this name, if any.
    pub fn by_name(&self, name: &str) -> Option<(NodeId, &MemberState)> {
        self.members
            .iter()
            .find(|(_, m)| m.member.name == name)
            .map(|(id, m)| (*id, m))
    }
}

openraft::declare_raft_types!(
    /// openraft's type configuration for the cluster log.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        // The state is a handful of members: a whole snapshot fits in memory.
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_behind_the_recorded_one_is_a_restored_copy() {
        let mut s = ClusterState::default();
        let started = |generation, start| Command::Started {
            id: 7,
            generation,
            start,
        };
        assert_eq!(s.restored(7, 1, 10), None, "nothing recorded yet");
        assert_eq!(s.apply(&started(1, 10)), Response::Done);
        // The same start asking again (its answer was lost) is not a copy.
        assert_eq!(s.restored(7, 1, 10), None);
        assert_eq!(s.apply(&started(1, 10)), Response::Done);
        assert_eq!(s.apply(&started(2, 20)), Response::Done);
        // Behind, or the same count from another start: a copy.
        assert_eq!(s.restored(7, 1, 30), Some(2));
        assert_eq!(s.restored(7, 2, 30), Some(2));
        assert_eq!(s.apply(&started(2, 30)), Response::Stale);
        assert_eq!(s.generations[&7], (2, 20));
        // Later starts, and nodes that do not count (0), are not.
        assert_eq!(s.restored(7, 3, 40), None);
        assert_eq!(s.restored(7, 0, 0), None);
        assert_eq!(s.apply(&Command::Remove { id: 7 }), Response::UnknownMember);
        assert!(s.generations.is_empty(), "forgotten with the member");
    }

    fn member(name: &str, addr: &str) -> Member {
        Member {
            name: name.into(),
            addr: addr.into(),
            role: Role::Member,
        }
    }

    #[test]
    fn upsert_adds_member_up() {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::Upsert {
            id: 7,
            member: member("a", "127.0.0.1:7400"),
        });
        assert_eq!(r, Response::Done);
        let m = &s.members[&7];
        assert_eq!(m.member.name, "a");
        assert_eq!(m.state, NodeState::Up);
        assert_eq!(m.since_ms, 0);
    }

    #[test]
    fn upsert_replaces_stale_same_name_entry() {
        let mut s = ClusterState::default();
        s.apply(&Command::Upsert {
            id: 1,
            member: member("a", "127.0.0.1:7400"),
        });
        s.apply(&Command::Upsert {
            id: 2,
            member: member("b", "127.0.0.2:7400"),
        });
        let r = s.apply(&Command::Upsert {
            id: 3,
            member: member("a", "127.0.0.1:7400"),
        });
        assert_eq!(r, Response::Replaced { stale: 1 });
        assert!(!s.members.contains_key(&1));
        assert_eq!(s.by_name("a").map(|(id, _)| id), Some(3));
        assert!(s.members.contains_key(&2));
        assert_eq!(s.members.len(), 2);
    }

    #[test]
    fn upsert_same_id_keeps_state_and_updates_record() {
        let mut s = ClusterState::default();
        s.apply(&Command::Upsert {
            id: 1,
            member: member("a", "127.0.0.1:7400"),
        });
        s.apply(&Command::SetState {
            id: 1,
            state: NodeState::Suspect,
            at_ms: 50,
            from: None,
        });
        let r = s.apply(&Command::Upsert {
            id: 1,
            member: member("a", "127.0.0.9:7400"),
        });
        assert_eq!(r, Response::Done);
        let m = &s.members[&1];
        assert_eq!(m.member.addr, "127.0.0.9:7400");
        assert_eq!((m.state, m.since_ms), (NodeState::Suspect, 50));
    }

    #[test]
    fn remove_known_and_unknown() {
        let mut s = ClusterState::default();
        s.apply(&Command::Upsert {
            id: 1,
            member: member("a", "x:1"),
        });
        assert_eq!(s.apply(&Command::Remove { id: 1 }), Response::Done);
        assert!(s.members.is_empty());
        let r = s.apply(&Command::Remove { id: 1 });
        assert_eq!(r, Response::UnknownMember);
        assert!(!r.is_ok());
    }

    #[test]
    fn set_state_records_transition_time_once() {
        let mut s = ClusterState::default();
        s.apply(&Command::Upsert {
            id: 1,
            member: member("a", "x:1"),
        });
        let set = |state, at_ms| Command::SetState {
            id: 1,
            state,
            at_ms,
            from: None,
        };
        assert_eq!(s.apply(&set(NodeState::Suspect, 100)), Response::Done);
        assert_eq!(s.apply(&set(NodeState::Suspect, 200)), Response::Done);
        assert_eq!(s.members[&1].since_ms, 100, "same state keeps since");
        s.apply(&set(NodeState::Down, 300));
        assert_eq!(
            (s.members[&1].state, s.members[&1].since_ms),
            (NodeState::Down, 300)
        );
    }

    #[test]
    fn a_conditional_state_change_on_another_state_changes_nothing() {
        let mut s = ClusterState::default();
        s.apply(&Command::Upsert {
            id: 1,
            member: member("a", "x:1"),
        });
        let set = |state, from| Command::SetState {
            id: 1,
            state,
            at_ms: 5,
            from,
        };
        assert_eq!(s.apply(&set(NodeState::Left, None)), Response::Done);
        // A detector that decided on an older view, when it was still up.
        let stale = set(NodeState::Suspect, Some(NodeState::Up));
        assert_eq!(s.apply(&stale), Response::Stale);
        assert_eq!(s.members[&1].state, NodeState::Left);
        let back = set(NodeState::Up, Some(NodeState::Left));
        assert_eq!(s.apply(&back), Response::Done);
        assert_eq!(s.members[&1].state, NodeState::Up);
    }

    #[test]
    fn set_state_unknown_member_changes_nothing() {
        let mut s = ClusterState::default();
        let r = s.apply(&Command::SetState {
            id: 9,
            state: NodeState::Down,
            at_ms: 1,
            from: None,
        });
        assert_eq!(r, Response::UnknownMember);
        assert!(s.members.is_empty());
    }

    #[test]
    fn command_serde_round_trip() {
        let cmds = [
            Command::Upsert {
                id: u64::MAX,
                member: Member {
                    name: "w".into(),
                    addr: "127.0.0.3:7400".into(),
                    role: Role::Witness,
                },
            },
            Command::Remove { id: 3 },
            Command::SetState {
                id: 3,
                state: NodeState::Suspect,
                at_ms: 42,
                from: None,
            },
        ];
        for c in cmds {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<Command>(&json).unwrap(), c);
        }
    }
}
