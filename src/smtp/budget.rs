//! What a session may ask of its client's share of the node: messages and
//! recipients per minute, authentication attempts, body memory. The
//! [`clients`](super::clients) table keeps one budget per address; tests
//! and trusted clients use their own.

/// What a session asks of its address's budget for this minute.
pub trait Budget: Send + Sync + std::fmt::Debug {
    /// One more message; false if the address has sent its share.
    fn message(&self) -> bool;
    /// One more recipient; false likewise.
    fn recipient(&self) -> bool;
    /// Take one authentication attempt; false if the address has used
    /// its share. Counted when the attempt starts, so attempts running at
    /// once count too.
    fn auth_attempt(&self) -> bool {
        true
    }
    /// The attempt succeeded: it does not count against the address.
    fn auth_succeeded(&self) {}
    /// Take `n` more bytes of message-body memory for the address, whose
    /// sessions may hold `share` together; false if that would be more.
    fn take_memory(&self, _n: u64, _share: u64) -> bool {
        true
    }
    /// Give back `n` bytes taken with `take_memory`.
    fn give_memory(&self, _n: u64) {}
}
