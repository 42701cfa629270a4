//! Resource groups on this node: the VIP, the SMTP listener on it and the
//! outbound source address, run by a monitor that gives every operation
//! its own task and a deadline.

pub mod machine;
