//! Where mail for a domain goes by DNS (RFC 5321 section 5.1): its MX
//! records by preference; without any, the domain's own addresses (the
//! implicit MX); a *null MX* (RFC 7505) or a domain that does not exist
//! means the mail can never be delivered; a failed lookup means later.
//!
//! The lookups are `hickory-resolver`'s, with its TTL-honouring cache;
//! what is decided from their answers ([`plan`], [`order`]) is pure.
//!
//! May import: `config`.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;

use crate::config::{DnsConfig, IpPreference};

/// What the MX lookup of a domain said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxAnswer {
    /// MX records: (preference, host) with the host without its final dot
    /// ("" for the root, as in a null MX).
    Records(Vec<(u16, String)>),
    /// The domain exists and has no MX records.
    NoRecords,
    /// The domain does not exist.
    NoDomain,
}

/// Why a domain's mail cannot go out now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxError {
    /// Never: the reply to give each recipient (5xx).
    Permanent(String),
    /// Not now: the reply to give (4xx); tried again later.
    Temporary(String),
}

impl MxError {
    /// The SMTP-style reply for the recipients.
    pub fn reply(&self) -> &str {
        match self {
            MxError::Permanent(r) | MxError::Temporary(r) => r,
        }
    }
}

/// The hosts to try for `domain`, best first, from its MX answer: by
/// preference, equal preferences in name order (so one receiving site is
/// always the same list, and shares its associations), at most `max`.
pub fn plan(domain: &str, answer: MxAnswer, max: usize) -> Result<Vec<String>, MxError> {
    let mut records = match answer {
        MxAnswer::NoDomain => {
            return Err(MxError::Permanent(format!(
                "550 5.1.2 {domain} does not exist (NXDOMAIN)"
            )))
        }
        // RFC 5321 5.1: the domain itself, as if it had an MX of 0.
        MxAnswer::NoRecords => return Ok(vec![domain.to_string()]),
        MxAnswer::Records(r) => r,
    };
    // RFC 7505: a single MX with the root as its host.
    if records.len() == 1 && records[0].1.is_empty() {
        return Err(MxError::Permanent(format!(
            "556 5.1.10 {domain} accepts no mail (null MX)"
        )));
    }
    records.retain(|(_, host)| !host.is_empty());
    records.sort();
    records.dedup_by(|a, b| a.1 == b.1);
    let hosts: Vec<String> = records.into_iter().map(|(_, h)| h).take(max).collect();
    if hosts.is_empty() {
        return Err(MxError::Permanent(format!(
            "550 5.1.2 {domain} has no usable MX host"
        )));
    }
    Ok(hosts)
}

/// `addrs` with the preferred family first, each family in the order
/// DNS gave it.
pub fn order(addrs: &[IpAddr], prefer: IpPreference) -> Vec<IpAddr> {
    let first = |ip: &&IpAddr| match prefer {
        IpPreference::Ipv6 => ip.is_ipv6(),
        IpPreference::Ipv4 => ip.is_ipv4(),
    };
    let (mut out, rest): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(first);
    out.extend(rest);
    out
}

/// Resolves recipient domains to next hops.
pub struct MxResolver {
    resolver: TokioResolver,
    config: DnsConfig,
    /// This node's own addresses: an MX pointing at one is a loop.
    own: Vec<IpAddr>,
}

impl MxResolver {
    /// A resolver asking `config.servers` (or those of /etc/resolv.conf);
    /// MX hosts at one of `own` are refused as a mail loop.
    pub fn new(config: &DnsConfig, own: Vec<IpAddr>) -> Result<MxResolver, String> {
        let mut builder = if config.servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("reading /etc/resolv.conf: {e}"))?
        } else {
            let servers = config
                .servers
                .iter()
                .map(|s| {
                    let mut ns = NameServerConfig::udp_and_tcp(s.ip());
                    for c in &mut ns.connections {
                        c.port = s.port();
                    }
                    ns
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = config.timeout;
        opts.ip_strategy = match config.prefer {
            IpPreference::Ipv6 => LookupIpStrategy::Ipv6AndIpv4,
            IpPreference::Ipv4 => LookupIpStrategy::Ipv4AndIpv6,
        };
        let resolver = builder.build().map_err(|e| e.to_string())?;
        Ok(MxResolver {
            resolver,
            config: config.clone(),
            own,
        })
    }

    /// The next hops for `domain`'s mail on `port`, best first.
    pub async fn next_hops(&self, domain: &str, port: u16) -> Result<Vec<SocketAddr>, MxError> {
        let fqdn = format!("{domain}.");
        let answer = match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => MxAnswer::Records(
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, host_name(&mx.exchange.to_ascii()))),
                        _ => None,
                    })
                    .collect(),
            ),
            Err(e) if e.is_nx_domain() => MxAnswer::NoDomain,
            Err(e) if e.is_no_records_found() => MxAnswer::NoRecords,
            Err(e) => return Err(temporary(domain, "MX", &e)),
        };
        let hosts = plan(domain, answer, self.config.max_mx_hosts)?;
        let mut hops = Vec::new();
        let mut failed = None;
        for host in &hosts {
            match self.resolver.lookup_ip(format!("{host}.").as_str()).await {
                Ok(ips) => {
                    let ips: Vec<IpAddr> = ips.iter().collect();
                    if let Some(ip) = ips.iter().find(|ip| self.own.contains(ip)) {
                        return Err(MxError::Permanent(format!(
                            "554 5.4.6 mail loop: {domain}'s MX host {host} is this node ({ip})"
                        )));
                    }
                    let ordered = order(&ips, self.config.prefer);
                    hops.extend(ordered.into_iter().map(|ip| SocketAddr::new(ip, port)));
                }
                // A host without addresses is skipped, as the next one
                // may do; only when none does is that the answer.
                Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
                Err(e) => failed = Some(temporary(domain, "address", &e)),
            }
        }
        if hops.is_empty() {
            return Err(failed.unwrap_or_else(|| {
                MxError::Permanent(format!("550 5.1.2 no MX host of {domain} has an address"))
            }));
        }
        Ok(hops)
    }
}

/// "mx1.example.test." as "mx1.example.test"; the root as "".
fn host_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn temporary(domain: &str, what: &str, e: &impl std::fmt::Display) -> MxError {
    MxError::Temporary(format!("451 4.4.3 {what} lookup for {domain} failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(r: &[(u16, &str)]) -> MxAnswer {
        MxAnswer::Records(r.iter().map(|(p, h)| (*p, h.to_string())).collect())
    }

    #[test]
    fn hosts_go_by_preference_and_equal_ones_by_name() {
        let answer = records(&[(20, "c.mx"), (10, "b.mx"), (10, "a.mx"), (30, "d.mx")]);
        assert_eq!(
            plan("x.test", answer, 3),
            Ok(vec!["a.mx".into(), "b.mx".into(), "c.mx".into()])
        );
    }

    #[test]
    fn no_mx_means_the_domain_itself_and_no_domain_is_final() {
        assert_eq!(
            plan("x.test", MxAnswer::NoRecords, 5),
            Ok(vec!["x.test".into()])
        );
        let e = plan("x.test", MxAnswer::NoDomain, 5).unwrap_err();
        assert!(
            matches!(&e, MxError::Permanent(r) if r.starts_with("550 5.1.2")),
            "{e:?}"
        );
    }

    #[test]
    fn a_null_mx_is_final_and_a_root_beside_others_is_skipped() {
        let e = plan("x.test", records(&[(0, "")]), 5).unwrap_err();
        assert!(
            matches!(&e, MxError::Permanent(r) if r.starts_with("556 5.1.10")),
            "{e:?}"
        );
        assert_eq!(
            plan("x.test", records(&[(0, ""), (10, "a.mx")]), 5),
            Ok(vec!["a.mx".into()])
        );
    }

    #[test]
    fn the_preferred_family_comes_first() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(order(&[v4, v6], IpPreference::Ipv6), vec![v6, v4]);
        assert_eq!(order(&[v6, v4], IpPreference::Ipv4), vec![v4, v6]);
    }
}
