//! Configuration: typed structs, loaded from one TOML file by `load`,
//! which reports every error with file, line and field path.
//!
//! May import: nothing of mtad; every other module reads it.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

mod cluster;
mod error;
mod group;
mod live;
mod load;
mod reader;
mod smtp;
mod spool;
#[cfg(test)]
mod tests;

pub use error::{file_errors, ConfigError, ConfigErrors, FileProblem};
pub use live::{Applied, Live};
pub use load::{load_file, load_str};
pub use spool::MAX_REPLICAS;

/// The built-in configuration `mtad run` uses without `--config`: the
/// same text as `config/mtad.toml` (one node on 127.0.0.1:2525 that
/// delivers everything into `./var/outbox`), printed by
/// `mtad config default`.
pub const DEFAULT: &str = include_str!("../../config/mtad.toml");

/// The name the built-in configuration's errors and logs go by.
pub const DEFAULT_NAME: &str = "(built-in default)";

/// Loads the built-in configuration.
pub fn load_default() -> Result<Config, ConfigErrors> {
    load_str(DEFAULT, DEFAULT_NAME)
}

/// The whole node configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `[node]`
    pub node: NodeConfig,
    /// `[smtp]`
    pub smtp: SmtpConfig,
    /// `[delivery]`
    pub delivery: DeliveryConfig,
    /// `[spool]`
    pub spool: SpoolConfig,
    /// `[[route]]`, first match wins.
    /// Shared with the jobs routed by them: a job keeps its route across
    /// a reload that changes the list.
    pub routes: Vec<Arc<Route>>,
    /// `[log]`
    pub log: LogConfig,
    /// `[cluster]`; absent for a single node.
    pub cluster: Option<ClusterConfig>,
    /// `[admin]`; absent: no admin API.
    pub admin: Option<AdminConfig>,
    /// `[[group]]`s, in file order.
    pub groups: Vec<GroupConfig>,
    /// `[dns]`: how MX routes resolve.
    pub dns: DnsConfig,
}

/// `[dns]`: the resolver MX routes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (empty: those of /etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    /// Which address family of an MX host is tried first.
    pub prefer: IpPreference,
    /// Most MX hosts tried for one domain.
    pub max_mx_hosts: usize,
    /// Longest wait for one lookup.
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            prefer: IpPreference::Ipv6,
            max_mx_hosts: 5,
            timeout: Duration::from_secs(5),
        }
    }
}

/// An MX host's IPv6 or IPv4 addresses first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpPreference {
    /// IPv6, then IPv4.
    Ipv6,
    /// IPv4, then IPv6.
    Ipv4,
}

/// `[spool]`: the durable store of accepted messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Past this, new messages get `452 4.3.1` (before the disk is full).
    pub max_size: SpoolSize,
    /// Copies of a message on distinct members (this node's included)
    /// wanted before "250": 2 by default in a cluster, 1 alone.
    pub replicas: u8,
    /// Fewer durable copies than this: `451 4.4.0`, nothing acknowledged.
    pub min_replicas: u8,
}

impl SpoolConfig {
    /// The defaults of a node without a cluster: one copy, its own.
    pub fn standalone() -> Self {
        SpoolConfig {
            max_size: SpoolSize::Percent(80),
            replicas: 1,
            min_replicas: 1,
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self::standalone()
    }
}

/// How large the spool may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolSize {
    /// This share of its filesystem's size, in percent.
    Percent(u8),
    /// This many bytes.
    Bytes(u64),
}

/// `[admin]`: the admin HTTP API that `mtad ctl` talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where it listens; loopback by default.
    pub listen: SocketAddr,
    /// A file holding the bearer token every request must carry; required
    /// off loopback.
    pub token_file: Option<PathBuf>,
}

/// `[cluster]`: this node's cluster and how it joins it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The cluster's name; nodes of another cluster are refused.
    pub name: String,
    /// Address for node-to-node traffic.
    pub listen: SocketAddr,
    /// Members to contact when joining.
    pub seeds: Vec<SocketAddr>,
    /// File holding the shared cluster secret.
    pub secret_file: PathBuf,
    /// Files of other secrets also accepted from peers, to change the
    /// secret without stopping the cluster.
    pub accept_secret_files: Vec<PathBuf>,
    /// A full member, or a witness that only votes.
    pub role: ClusterRole,
    /// Most voters; further members join as non-voters.
    pub max_voters: usize,
    /// Leader heartbeat period.
    pub heartbeat_interval: Duration,
    /// Silence after which a follower calls an election.
    pub election_timeout: Duration,
    /// First delay between join attempts.
    pub join_backoff_min: Duration,
    /// Longest delay between join attempts.
    pub join_backoff_max: Duration,
    /// A join that has not finished by then is rolled back.
    pub join_timeout: Duration,
}

/// `[[group]]`: a resource group the cluster places on one node at a time.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupConfig {
    /// Unique name.
    pub name: String,
    /// The virtual IP with its prefix length (None only in a config that
    /// failed to load).
    pub vip: Option<ipnet::IpNet>,
    /// How the VIP is brought up.
    pub provider: VipProvider,
    /// Interface the netlink provider adds the VIP to.
    pub interface: Option<String>,
    /// Nodes to place it on, in order of preference; empty: any member.
    pub preferred_nodes: Vec<String>,
    /// SMTP port served on the VIP.
    pub smtp_port: u16,
    /// Move back to a more preferred node when it returns.
    pub failback: bool,
    /// How long an owner's grant from each voter lasts.
    pub lease: Duration,
    /// Deadline for starting each resource.
    pub start_timeout: Duration,
    /// Deadline for stopping each resource; a stop that misses it fences
    /// the node for the group.
    pub stop_timeout: Duration,
    /// Period of health checks.
    pub check_interval: Duration,
    /// Deadline of one health check.
    pub check_timeout: Duration,
    /// Restarts in place within `restart_window` before failing over.
    pub max_restarts: u32,
    /// The window restarts are counted in.
    pub restart_window: Duration,
    /// Period of gratuitous ARP / neighbour advertisements (netlink).
    pub announce_interval: Duration,
    /// A graceful move lets open SMTP transactions finish this long.
    pub drain_timeout: Duration,
}

/// How a group's VIP is brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VipProvider {
    /// Add the address to an interface with rtnetlink and announce it.
    Netlink,
    /// The address is already local (e.g. 127.0.0.100): only bind it.
    Loopback,
}

/// What a node is in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterRole {
    /// Votes, hosts resources and serves SMTP.
    Member,
    /// Votes only: the tie-breaker of a two-node cluster.
    Witness,
}

/// `[node]`: identity and where state lives.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Node name, unique in a cluster.
    pub name: String,
    /// Spool and cluster state live below this directory.
    pub data_dir: PathBuf,
    /// On SIGTERM: how long open SMTP transactions and group handovers
    /// may take before the node stops anyway.
    pub shutdown_grace: Duration,
}

/// `[smtp]`: the inbound listener and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct SmtpConfig {
    /// Addresses to listen on when no group owns a VIP.
    pub listen: Vec<SocketAddr>,
    /// Name announced in the greeting and EHLO reply.
    pub hostname: String,
    /// Listen backlog passed to listen(2).
    pub backlog: u32,
    /// Concurrent sessions; more are answered `421 4.3.2` and closed.
    pub max_connections: usize,
    /// Largest message accepted, in bytes (announced in SIZE).
    pub max_message_size: u64,
    /// Memory all sessions' message bodies may hold at once; a message
    /// that would take more gets `452 4.3.1`. At least `max_message_size`.
    pub receive_memory: u64,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Commands allowed before MAIL without penalty (NOOP/RSET/VRFY/HELP…).
    pub max_commands_before_mail: usize,
    /// Longest silence from a client before the session is closed.
    pub idle_timeout: Duration,
    /// Clients allowed to relay to any domain.
    pub relay_networks: Vec<IpNet>,
    /// Domains anyone may send to.
    pub accept_domains: Vec<String>,
    /// `[smtp.tls]`: STARTTLS offered with this certificate; None: not
    /// offered.
    pub tls: Option<InboundTls>,
    /// Limits per client address (clients in `relay_networks` are exempt
    /// from the per-address ones).
    pub limits: ClientLimits,
    /// `[smtp.auth]`: SMTP AUTH over TLS against this credentials file
    /// (`user:argon2-hash` lines); None: not offered.
    pub auth: Option<PathBuf>,
}

impl SmtpConfig {
    /// Whether a client at `ip` is trusted to relay (and exempt from the
    /// per-address limits); IPv4-mapped IPv6 counts as IPv4.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.relay_networks.iter().any(|n| n.contains(&ip))
    }
}

/// Limits that keep one client from taking the server: per address, and
/// per session.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientLimits {
    /// Sessions open at once from one address; more get `421 4.7.0`.
    pub connections_per_client: usize,
    /// New sessions per minute from one address; more get `421 4.7.0`.
    pub connection_rate_per_client: usize,
    /// Longest a session may last, however busy; then `421 4.4.2`.
    pub max_session_time: Duration,
    /// Messages per minute from one address; more get `451 4.7.1` at MAIL.
    pub messages_per_client: usize,
    /// Recipients per minute from one address; more get `451 4.7.1`.
    pub recipients_per_client: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            connections_per_client: 50,
            connection_rate_per_client: 600,
            max_session_time: Duration::from_secs(3600),
            messages_per_client: 600,
            recipients_per_client: 6000,
        }
    }
}

/// `[smtp.tls]`: the certificate STARTTLS presents.
#[derive(Debug, Clone, PartialEq)]
pub struct InboundTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Clients in `relay_networks` must start TLS before MAIL.
    pub require_tls: bool,
    /// Addresses that speak TLS from the first byte (RFC 8314, port 465).
    pub implicit_listen: Vec<SocketAddr>,
}

/// `[delivery]`: associations, retries and expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// Backlog per open association before another one is opened.
    pub association_threshold: usize,
    /// Most associations per destination.
    pub max_associations: usize,
    /// Messages an association carries before it is renegotiated.
    pub max_messages_per_association: u64,
    /// Age after which an association is renegotiated.
    pub association_lifetime: Duration,
    /// An association with nothing to do for this long is closed.
    pub idle_timeout: Duration,
    /// An association with work but no progress for this long is torn down.
    pub stall_timeout: Duration,
    /// Longest one transaction may take, from MAIL to the reply after the
    /// content, however steadily the next hop answers.
    pub transaction_timeout: Duration,
    /// Time to establish a TCP connection to a next hop.
    pub connect_timeout: Duration,
    /// Delays between attempts; the last one repeats.
    pub retry: Vec<Duration>,
    /// A message older than this is bounced as expired.
    pub max_queue_lifetime: Duration,
}

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Lower-case domains, or `*` for any.
    pub domains: Vec<String>,
    /// Where mail for these domains goes.
    pub target: RouteTarget,
    /// Local address outbound connections are made from.
    pub source_address: Option<IpAddr>,
    /// Outbound TLS policy.
    pub tls: TlsPolicy,
    /// With `tls = "required"`: PEM certificates of the authorities the
    /// next hop's certificate must chain to (None: the system's roots).
    pub tls_ca: Option<PathBuf>,
    /// With `tls = "required"`: the name the next hop's certificate must
    /// carry (None: the next hop's IP address).
    pub tls_name: Option<String>,
}

/// Where a route delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteTarget {
    /// SMTP next hops, tried in order.
    Smtp(Vec<SocketAddr>),
    /// A local directory: one `.eml` file per message.
    DropDir(PathBuf),
    /// The recipient domain's MX hosts (RFC 5321 section 5.1), on `port`.
    Mx {
        /// The port MX hosts listen on: 25, except in tests.
        port: u16,
    },
}

/// Outbound TLS policy of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, without checking the certificate (RFC 7435
    /// opportunistic security); if it fails, plaintext on a new
    /// connection.
    Opportunistic,
    /// STARTTLS with a verified certificate, or defer: never plaintext.
    Required,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `mtad=debug`.
    pub level: String,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Text,
}

impl Route {
    /// Whether this route serves `domain` (already lower-case).
    pub fn matches(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == "*" || d == domain)
    }
}

impl Config {
    /// Index of the first route matching `domain`, if any.
    pub fn route_for(&self, domain: &str) -> Option<usize> {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.routes.iter().position(|r| r.matches(&domain))
    }
}

#[cfg(test)]
mod routing_tests {
    use super::*;

    fn cfg() -> Config {
        let text = "[node]\nname = \"n\"\ndata_dir = \"d\"\n\
                    [[route]]\ndomains = [\"dest.example\", \"other.example\"]\nnext_hops = [\"127.0.0.1:2526\"]\n\
                    [[route]]\ndomains = [\"*\"]\ndrop_dir = \"out\"\n";
        load_str(text, "t.toml").unwrap()
    }

    #[test]
    fn the_first_matching_route_wins_case_and_trailing_dot_ignored() {
        let c = cfg();
        assert_eq!(c.route_for("dest.example"), Some(0));
        assert_eq!(c.route_for("DEST.Example."), Some(0));
        assert_eq!(c.route_for("other.example"), Some(0));
        assert_eq!(c.route_for("sub.dest.example"), Some(1));
        assert_eq!(c.route_for(""), Some(1));
    }

    #[test]
    fn without_a_catch_all_some_domains_have_no_route() {
        let mut c = cfg();
        c.routes.pop();
        assert_eq!(c.route_for("elsewhere.example"), None);
    }
}
