//! Tests that cross the cluster's layers: three real openraft nodes over
//! authenticated links ([`network`], with joins), whole cluster nodes on
//! the in-memory network (start, heal after a partition, a cut join,
//! leave: [`node`]), and the seeded simulation ([`sim`]).

mod network;
mod node;
mod sim;
